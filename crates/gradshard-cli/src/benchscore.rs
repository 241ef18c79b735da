//! `bench-score` (hidden): scoring throughput from the store next to a baseline that
//! scores the same tiles from uncompressed, memory-mapped f32 arrays with the same
//! engine and GEMM. Used by scripts/bench_score.sh.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use gradshard_core::{Block, Geometry, OtherTensor, SampleId, TaskName};
use gradshard_score::{Error, ScoreOptions, SliceId, TileSource};
use gradshard_store::{fsutil, Store};
use memmap2::Mmap;
use rayon::prelude::*;

use gradshard_score::StoreSource;

#[derive(Args, Debug)]
pub struct BenchScoreArgs {
    /// Store to score.
    #[arg(long)]
    pub store: PathBuf,
    /// Directory for the uncompressed f32 baseline (written once if absent).
    #[arg(long)]
    pub raw: PathBuf,
    /// Task A (as `score --task-a`).
    #[arg(long, default_value = "math")]
    pub task_a: String,
    /// Task B (as `score --task-b`).
    #[arg(long, default_value = "general")]
    pub task_b: String,
    /// Bootstrap resamples per heatmap cell (as `score --n-boot`).
    #[arg(long, default_value_t = 0)]
    pub n_boot: usize,
    /// Permutations for the top-pair p-values (as `score --n-perm`).
    #[arg(long, default_value_t = 0)]
    pub n_perm: usize,
    /// Which source to time: store, raw or both.
    #[arg(long, default_value = "both")]
    pub only: String,
}

/// Uncompressed baseline: `<raw>/<task>/<pos>.f32` holds a sample's attention frames
/// in frame order, f32 little-endian, memory-mapped.
struct RawSource {
    geometry: Geometry,
    order: gradshard_index::FrameOrder,
    samples: Vec<RawTask>,
}

/// One task of the baseline: its name, (id, T) per sample, and one mapped file per sample.
type RawTask = (TaskName, Vec<(SampleId, u32)>, Vec<Mmap>);

impl TileSource for RawSource {
    fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    fn samples(&self, task: &TaskName) -> gradshard_score::Result<Vec<(SampleId, u32)>> {
        self.samples
            .iter()
            .find(|s| &s.0 == task)
            .map(|s| s.1.clone())
            .ok_or_else(|| {
                Error::source(
                    "raw baseline",
                    std::io::Error::other(format!("no task {task}")),
                )
            })
    }
    fn has_block(&self, block: Block) -> bool {
        self.order.has_block(block)
    }
    fn read_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> gradshard_score::Result<()> {
        let SliceId { layer, block, head } = slice;
        let maps = &self
            .samples
            .iter()
            .find(|s| &s.0 == task)
            .expect("known task")
            .2;
        let numel = self.geometry.slice_numel();
        let frame = self.order.attn(layer, block, head).expect("stored slice");
        let w = cols.len();
        out.par_chunks_mut(w)
            .zip(samples.par_iter())
            .for_each(|(row, s)| {
                let m = &maps[*s];
                let base = (frame * numel + cols.start) * 4;
                for (o, c) in row.iter_mut().zip(m[base..base + w * 4].chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            });
        Ok(())
    }
    fn other_tensors(&self) -> Vec<OtherTensor> {
        Vec::new()
    }
    fn read_other(
        &self,
        _: &TaskName,
        _: usize,
        t: &str,
        _: &mut Vec<f32>,
    ) -> gradshard_score::Result<()> {
        Err(Error::source(
            "raw baseline",
            std::io::Error::other(format!("no tensor {t}")),
        ))
    }
}

fn export_raw(store: &Store, task: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let n_attn = store.order().n_attn_frames();
    for (pos, r) in store.samples(task)?.iter().enumerate() {
        let path = dir.join(format!("{pos}.f32"));
        if path.exists() {
            continue;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for frame in 0..n_attn {
            for v in store.read_frame(r, frame)? {
                f.write_all(&v.to_le_bytes())?;
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

pub fn bench_score(a: BenchScoreArgs) -> Result<ExitCode> {
    let store = Store::open(&a.store)?;
    let (ta, tb) = (
        TaskName::new(a.task_a.as_str())?,
        TaskName::new(a.task_b.as_str())?,
    );
    let mut opts = ScoreOptions::new(ta.clone(), tb.clone());
    opts.n_boot = a.n_boot;
    opts.n_perm = a.n_perm;
    opts.group_fisher = false;
    let g = store.order().geometry().clone();
    let mut results = Vec::new();
    if a.only == "store" || a.only == "both" {
        store.stats().reset();
        let t = Instant::now();
        let r = gradshard_score::score(&StoreSource { store: &store }, &opts, &mut |_| {})?;
        let secs = t.elapsed().as_secs_f64();
        let bytes = store.stats().bytes();
        println!(
            "{{\"source\":\"store\",\"seconds\":{secs:.3},\"bytes_read\":{bytes},\"gb_per_s\":{:.4},\"slices\":{},\"peak_rss_bytes\":{}}}",
            bytes as f64 / secs / 1e9,
            r.cells.len(),
            fsutil::peak_rss_bytes().unwrap_or(0)
        );
        results.push(r);
    }
    if a.only == "raw" || a.only == "both" {
        let mut samples = Vec::new();
        for t in [&ta, &tb] {
            let dir = a.raw.join(t.as_str());
            export_raw(&store, t.as_str(), &dir)
                .with_context(|| format!("writing the f32 baseline to {}", dir.display()))?;
            let recs = store.samples(t.as_str())?;
            let maps = (0..recs.len())
                .map(|p| {
                    let f = std::fs::File::open(dir.join(format!("{p}.f32")))?;
                    // SAFETY: baseline files are written once above and never modified while mapped.
                    unsafe { Mmap::map(&f) }
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            samples.push((
                t.clone(),
                recs.iter().map(|r| (r.id.clone(), r.tokens)).collect(),
                maps,
            ));
        }
        let raw = RawSource {
            geometry: g.clone(),
            order: store.order().clone(),
            samples,
        };
        let t = Instant::now();
        let r = gradshard_score::score(&raw, &opts, &mut |_| {})?;
        let secs = t.elapsed().as_secs_f64();
        let n = (raw.samples[0].1.len() + raw.samples[1].1.len()) as u64;
        let bytes = r.cells.len() as u64 * n * g.slice_numel() as u64 * 4;
        println!(
            "{{\"source\":\"raw_f32_mmap\",\"seconds\":{secs:.3},\"bytes_read\":{bytes},\"gb_per_s\":{:.4},\"slices\":{},\"peak_rss_bytes\":{}}}",
            bytes as f64 / secs / 1e9,
            r.cells.len(),
            fsutil::peak_rss_bytes().unwrap_or(0)
        );
        results.push(r);
    }
    if results.len() == 2 {
        // Same tiles, same engine: the heatmaps must agree (bf16 decoded values are exact in f32).
        for (x, y) in results[0].cells.iter().zip(&results[1].cells) {
            let (p, q) = (x.score_mean, y.score_mean);
            if (p - q).abs() > 1e-9 * p.abs().max(q.abs()).max(1e-300) {
                bail!(
                    "store and baseline disagree at {:?} {} {}: {p} vs {q}",
                    x.block,
                    x.layer,
                    x.head
                );
            }
        }
        println!("{{\"agree\":true}}");
    }
    Ok(ExitCode::SUCCESS)
}
