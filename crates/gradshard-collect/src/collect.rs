//! `gradshard collect`: model → per-sample gradients → frames → the store's
//! writer pipeline (bounded queue → compression workers → appender), with the
//! per-sample Fisher sums logged for the statistics.

use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gradshard_core::{Axis, Block, DType, Geometry, OtherTensor, SampleId, TaskName};
use gradshard_index::FrameOrder;
use gradshard_models::{
    load_tokenizer, CpuEngine, Device, GradModel, ParamInfo, ParamSet, ReaderOptions,
    SampleFactors, SampleGrads, SampleReader,
};
use gradshard_store::{
    CodecSpec, Representation, SampleMeta, StoreSpec, StoreWriter, WriteReport, WriterOptions,
};

use crate::error::{Error, Result};
use crate::stats::{self, SideLog, StatsLayout};

/// What to do with a sample whose gradient holds NaN or ±inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NanPolicy {
    /// Stop with an error naming the task, sample and tensor.
    #[default]
    Error,
    /// Leave the sample out of the store and count it.
    Skip,
}

impl std::str::FromStr for NanPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "error" => Ok(NanPolicy::Error),
            "skip" => Ok(NanPolicy::Skip),
            _ => Err(format!("unknown NaN policy `{s}` (use error or skip)")),
        }
    }
}

/// How `collect` stores each sample (`--representation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepresentationChoice {
    /// Every slice as a full frame (format v1's only representation).
    Full,
    /// Every sample as factors P, S (docs/format.md, "Factored samples").
    Factored,
    /// Per sample, whichever of the two holds fewer values for its n.
    #[default]
    Auto,
}

impl std::str::FromStr for RepresentationChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(RepresentationChoice::Full),
            "factored" => Ok(RepresentationChoice::Factored),
            "auto" => Ok(RepresentationChoice::Auto),
            _ => Err(format!(
                "unknown representation `{s}` (use full, factored or auto)"
            )),
        }
    }
}

/// Values a sample's factors take in a store of frame order `order`, for factor row
/// counts `n_of(frame)` per frame and `n_shared[j]` per shared factor.
pub fn factored_values(order: &FrameOrder, n_frame: &[usize], n_shared: &[usize]) -> u64 {
    let p: u64 = (0..order.n_frames())
        .map(|f| {
            let (_, r, _) = order.factor_of(f).expect("frame in range");
            (r * n_frame[f]) as u64
        })
        .sum();
    let s: u64 = order
        .shared()
        .iter()
        .zip(n_shared)
        .map(|(sf, n)| (sf.cols * n) as u64)
        .sum();
    p + s
}

/// Values of a sample stored as full slices.
pub fn full_values(order: &FrameOrder) -> u64 {
    (0..order.n_frames())
        .map(|f| order.frame_numel(f).expect("frame in range") as u64)
        .sum()
}

/// `k/N`: this worker takes the samples whose 0-based index in their task file
/// (among the samples the reader yields) is ≡ k mod N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSplit {
    pub k: usize,
    pub n: usize,
}

impl Default for WorkerSplit {
    fn default() -> Self {
        WorkerSplit { k: 0, n: 1 }
    }
}

impl std::str::FromStr for WorkerSplit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected K/N, e.g. 0/4"))?;
        let k: usize = k.trim().parse().map_err(|_| format!("`{s}`: bad K"))?;
        let n: usize = n.trim().parse().map_err(|_| format!("`{s}`: bad N"))?;
        if n == 0 || k >= n {
            return Err(format!("`{s}`: need 0 <= K < N"));
        }
        Ok(WorkerSplit { k, n })
    }
}

/// Settings of one collect run (the CLI flags).
#[derive(Debug, Clone)]
pub struct CollectOptions {
    pub model_dir: PathBuf,
    /// (task, JSONL file), in order.
    pub tasks: Vec<(TaskName, PathBuf)>,
    pub store: PathBuf,
    pub params: ParamSet,
    pub dtype: DType,
    pub codec: CodecSpec,
    pub device: Device,
    /// Which engine runs the model on the CPU.
    pub cpu_engine: CpuEngine,
    /// Only the first N samples of each task file (before the worker split).
    pub max_samples: Option<usize>,
    /// Truncate each sample to this many tokens.
    pub max_tokens: Option<usize>,
    /// Samples per backward pass.
    pub batch: usize,
    pub nan_policy: NanPolicy,
    pub worker: WorkerSplit,
    /// Also write `stats/<task>.fisher.safetensors`.
    pub full_fisher: bool,
    /// Benchmark mode: compute gradients, cut frames and sum statistics, but
    /// store nothing (the model-only speed).
    pub model_only: bool,
    /// Full slices, factors, or per sample the smaller (`--representation`).
    pub representation: RepresentationChoice,
    pub writer: WriterOptions,
}

impl CollectOptions {
    pub fn new(model_dir: impl Into<PathBuf>, store: impl Into<PathBuf>) -> CollectOptions {
        CollectOptions {
            model_dir: model_dir.into(),
            tasks: Vec::new(),
            store: store.into(),
            params: ParamSet::Attn,
            dtype: DType::Bf16,
            codec: CodecSpec::DEFAULT,
            device: Device::Cpu,
            cpu_engine: CpuEngine::Auto,
            max_samples: None,
            max_tokens: None,
            batch: 1,
            nan_policy: NanPolicy::Error,
            worker: WorkerSplit::default(),
            full_fisher: false,
            model_only: false,
            representation: RepresentationChoice::Auto,
            writer: WriterOptions::default(),
        }
    }
}

/// Events for a progress display.
#[derive(Debug, Clone)]
pub enum CollectEvent {
    /// The model is loaded and the store open.
    Started {
        /// Samples of this worker's share (non-empty lines after the worker split
        /// and --max-samples), including those already committed.
        planned: u64,
        values_per_sample: u64,
    },
    /// A sample was handed to the writer.
    Sample {
        task: TaskName,
        id: SampleId,
        done: u64,
    },
    /// A sample was left out.
    Skipped {
        task: TaskName,
        id: SampleId,
        why: String,
    },
    /// Something the user should know that is not an error (an empty task file,
    /// samples without ids).
    Warning(String),
    /// The writer finished; statistics are being rebuilt.
    Finishing,
}

/// A sample that was not stored, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedSample {
    pub task: TaskName,
    pub id: SampleId,
    pub why: String,
}

/// What a collect run did.
#[derive(Debug, Clone)]
pub struct CollectReport {
    pub write: WriteReport,
    /// Samples computed and stored by this run.
    pub stored: u64,
    /// Samples of this worker's share already in the store (resume).
    pub resumed: u64,
    /// Samples left out: fewer than 2 tokens, non-finite gradients.
    pub skipped: Vec<SkippedSample>,
    /// Time in the model (forward + backward, including reading the input).
    pub compute_time: Duration,
    /// Time cutting frames and summing Fisher statistics on the model thread.
    pub prepare_time: Duration,
    /// Time the model thread waited on the writer (budget full): 0 means the
    /// disk never held the model back.
    pub blocked_time: Duration,
    pub elapsed: Duration,
    pub stats: stats::RebuildReport,
    pub full_fisher: Vec<PathBuf>,
    /// Gradient values per sample (all tracked tensors).
    pub values_per_sample: u64,
    /// Bytes per stored value (the store's dtype).
    pub dtype_bytes: u64,
    /// Samples stored as full slices and as factors by this run.
    pub full_samples: u64,
    pub factored_samples: u64,
    /// Values handed to the writer by this run (factors count their own size).
    pub values_stored: u64,
    /// The engine that computed the gradients (`native`, `burn`, `burn-cuda`).
    pub engine: &'static str,
}

fn to_core_id(task: &TaskName, id: &gradshard_models::SampleId, line: usize) -> Result<SampleId> {
    Ok(match id {
        gradshard_models::SampleId::Int(v) => SampleId::Int(*v),
        gradshard_models::SampleId::Str(v) => SampleId::string(v.clone())
            .map_err(|e| Error::InvalidArgument(format!("task `{task}` line {line}: {e}")))?,
    })
}

/// The store spec of a model's tracked parameters: every attention tensor of the
/// geometry (all must be tracked), plus every other tracked 2-D tensor as row
/// groups, sorted by name (the order `ingest` uses).
pub fn spec_from_params(
    model_dir: &Path,
    tracked: &[ParamInfo],
    dtype: DType,
    codec: CodecSpec,
) -> Result<StoreSpec> {
    let mut g = Geometry::from_config_path(model_dir)?;
    g.detect_root(tracked.iter().map(|p| p.name.as_str()));
    let attn = g.all_attn_tensors();
    for t in &attn {
        let p = tracked.iter().find(|p| p.name == t.name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: attention tensor `{}` is not among the model's tracked parameters",
                model_dir.display(),
                t.name
            ))
        })?;
        g.check_shape(t, &p.shape)?;
    }
    let mut others: Vec<OtherTensor> = tracked
        .iter()
        .filter(|p| !attn.iter().any(|t| t.name == p.name))
        .filter_map(|p| match p.shape.as_slice() {
            [r, c] if *r > 0 && *c > 0 => Some(OtherTensor::new(
                p.name.clone(),
                [*r, *c],
                g.out_axis_of(&p.name),
            )),
            _ => None,
        })
        .collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(StoreSpec {
        geometry: g,
        dtype,
        codec,
        blocks: Block::ALL.to_vec(),
        other_tensors: others,
    })
}

/// Non-empty lines of a JSONL file (an upper bound of its samples, for ETA).
fn count_lines(path: &Path) -> Result<u64> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).map_err(crate::error::io(path))?;
    let mut n = 0;
    for l in std::io::BufReader::new(f).lines() {
        if !l.map_err(crate::error::io(path))?.trim().is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

/// Whether `a` and `b` hold the same bits (NaN payloads and ±0 told apart), in
/// blocks of 256 without an early exit inside a block (vectorised).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.chunks(256).zip(b.chunks(256)).all(|(x, y)| {
            x.iter()
                .zip(y)
                .fold(0u32, |d, (x, y)| d | (x.to_bits() ^ y.to_bits()))
                == 0
        })
}

/// The first value that is NaN or ±inf. Blocks of 256 are tested without an early
/// exit (an exponent field of all ones, OR-ed over the block: vectorised), and only a
/// block that has one is searched.
fn first_non_finite(v: &[f32]) -> Option<(usize, f32)> {
    const B: usize = 256;
    let bad = |x: &f32| x.to_bits() & 0x7f80_0000 == 0x7f80_0000;
    v.chunks(B).enumerate().find_map(|(k, c)| {
        let any = c.iter().fold(0u32, |a, x| a | u32::from(bad(x)));
        (any != 0).then(|| {
            let i = c.iter().position(bad).expect("the block has one");
            (k * B + i, c[i])
        })
    })
}

struct Sink<'a> {
    /// None: `model_only` (gradients, frames and sums are computed, then dropped).
    w: Option<&'a RefCell<StoreWriter>>,
    side: Option<SideLog>,
    layout: StatsLayout,
    attn_of: HashMap<String, gradshard_core::AttnTensor>,
    geometry: Geometry,
    nan_policy: NanPolicy,
    representation: RepresentationChoice,
    dtype: DType,
    stored: u64,
    full_samples: u64,
    factored_samples: u64,
    values_stored: u64,
    skipped: Vec<SkippedSample>,
    prepare: Duration,
    blocked: Duration,
}

/// Where a model tensor goes in the store.
enum Target {
    Attn(gradshard_core::AttnTensor),
    Other(usize),
}

/// Columns `start..start + len` of a row-major `n × w` matrix, as an `n × len` matrix.
fn cut_cols(m: &[f32], n: usize, w: usize, start: usize, len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * len);
    for t in 0..n {
        out.extend_from_slice(&m[t * w + start..t * w + start + len]);
    }
    out
}

impl Sink<'_> {
    /// The stored place of a model tensor; the set and shapes must be the store's.
    fn target(
        &self,
        task: &TaskName,
        id: &SampleId,
        name: &str,
        shape: &[usize],
    ) -> Result<Target> {
        let order = self.layout.order();
        let (t, want) = if let Some(at) = self.attn_of.get(name) {
            (Target::Attn(at.clone()), at.shape)
        } else if let Some(ti) = order.other_index(name) {
            (Target::Other(ti), order.others()[ti].shape)
        } else {
            return Err(Error::Sample {
                task: task.clone(),
                id: id.clone(),
                what: format!("the model returned tensor `{name}`, which this store does not hold"),
            });
        };
        if shape != want {
            return Err(Error::Sample {
                task: task.clone(),
                id: id.clone(),
                what: format!("tensor `{name}` has shape {shape:?}, the store holds {want:?}"),
            });
        }
        Ok(t)
    }

    fn check_count(&self, task: &TaskName, id: &SampleId, got: usize) -> Result<()> {
        let n_expected = self.attn_of.len() + self.layout.order().others().len();
        if got != n_expected {
            return Err(Error::Sample {
                task: task.clone(),
                id: id.clone(),
                what: format!("the model returned {got} tensors, the store holds {n_expected}"),
            });
        }
        Ok(())
    }

    /// Applies the NaN policy to one tensor's values: `Ok(false)` when the sample is skipped.
    fn finite_or_skip(
        &mut self,
        task: &TaskName,
        id: &SampleId,
        tensor: &str,
        v: &[f32],
    ) -> Result<bool> {
        let Some((index, value)) = first_non_finite(v) else {
            return Ok(true);
        };
        match self.nan_policy {
            NanPolicy::Error => Err(Error::NonFinite {
                task: task.clone(),
                id: id.clone(),
                tensor: tensor.to_string(),
                index,
                value,
            }),
            NanPolicy::Skip => {
                let why = format!(
                    "non-finite gradient {value} in tensor `{tensor}` at flat index {index}"
                );
                tracing::warn!("task `{task}` sample {id}: skipped: {why}");
                self.skipped.push(SkippedSample {
                    task: task.clone(),
                    id: id.clone(),
                    why,
                });
                Ok(false)
            }
        }
    }

    fn tokens_u32(task: &TaskName, id: &SampleId, tokens: usize) -> Result<u32> {
        u32::try_from(tokens).map_err(|_| Error::Sample {
            task: task.clone(),
            id: id.clone(),
            what: format!("T = {tokens} does not fit in u32"),
        })
    }

    /// Logs the sums and ends the sample in the writer (the sample then commits).
    fn finish(
        &mut self,
        task: &TaskName,
        id: &SampleId,
        tokens: u32,
        mut sums: Vec<f64>,
        h: Option<gradshard_store::SampleHandle>,
    ) -> Result<()> {
        self.layout.finish_sample(&mut sums, tokens);
        // The sums are logged before the sample can commit.
        if let Some(side) = &mut self.side {
            side.append(task, id, tokens, &sums)?;
        }
        if let (Some(w), Some(h)) = (self.w, h) {
            w.borrow_mut().end_sample(h)?;
        }
        self.stored += 1;
        Ok(())
    }

    fn put(&mut self, task: &TaskName, id: SampleId, g: SampleGrads) -> Result<bool> {
        let t0 = Instant::now();
        for t in &g.grads {
            if !self.finite_or_skip(task, &id, &t.name, &t.data)? {
                return Ok(false);
            }
        }
        let order = self.layout.order().clone();
        self.check_count(task, &id, g.grads.len())?;
        let tokens = Self::tokens_u32(task, &id, g.tokens)?;
        let mut sums = vec![0f64; self.layout.len()];
        let mut h = match self.w {
            Some(w) => Some(w.borrow_mut().begin_sample(SampleMeta {
                task: task.clone(),
                id: id.clone(),
                tokens,
                loss_sum: g.loss_sum,
            })?),
            None => None,
        };
        for t in g.grads {
            match self.target(task, &id, &t.name, &t.shape)? {
                Target::Attn(at) => {
                    // Each head's slice is cut and its Σ g² taken in parallel; the
                    // frames then go to the writer in order. Each frame has its own
                    // sums entry, so the sums are those of one by one, bit for bit.
                    let heads: Vec<(Block, usize)> = at
                        .blocks
                        .iter()
                        .flat_map(|b| (0..self.geometry.heads_of(*b)).map(move |h| (*b, h)))
                        .collect();
                    let (geometry, layout, data) = (&self.geometry, &self.layout, &t.data);
                    let cut: Vec<(usize, Vec<f32>, f64)> = heads
                        .par_iter()
                        .map(|&(b, head)| {
                            let frame = order.attn(at.layer, b, head).expect("all blocks stored");
                            let slice = geometry.slice_spec(at.layer, b, head)?.cut(data)?;
                            let s = layout.attn_sum(&slice);
                            Ok((frame, slice, s))
                        })
                        .collect::<Result<_>>()?;
                    for (frame, slice, s) in cut {
                        sums[frame] += s;
                        if let (Some(w), Some(h)) = (self.w, h.as_mut()) {
                            let tb = Instant::now();
                            w.borrow_mut().put_frame(h, frame, slice)?;
                            self.blocked += tb.elapsed();
                        }
                    }
                }
                Target::Other(ti) => {
                    let o = &order.others()[ti];
                    for gi in 0..o.groups() {
                        let (a, b) = o.group_rows(gi);
                        let frame = order.other(ti, gi).expect("group in range");
                        let part = t.data[a * o.shape[1]..b * o.shape[1]].to_vec();
                        self.layout.accumulate(frame, &part, &mut sums);
                        if let (Some(w), Some(h)) = (self.w, h.as_mut()) {
                            let tb = Instant::now();
                            w.borrow_mut().put_frame(h, frame, part)?;
                            self.blocked += tb.elapsed();
                        }
                    }
                }
            }
        }
        self.finish(task, &id, tokens, sums, h)?;
        self.full_samples += 1;
        self.values_stored += full_values(&order);
        self.prepare += t0.elapsed();
        Ok(true)
    }

    /// A sample from the model's factors: stored as factors, or (auto, past the
    /// break-even n) multiplied out and stored as full slices.
    fn put_factors(&mut self, task: &TaskName, id: SampleId, f: SampleFactors) -> Result<bool> {
        let t0 = Instant::now();
        for t in &f.factors {
            for (which, v) in [("output-side factor", &t.a), ("input-side factor", &t.b)] {
                let name = format!("{} ({which})", t.name);
                if !self.finite_or_skip(task, &id, &name, v)? {
                    return Ok(false);
                }
            }
        }
        let order = self.layout.order().clone();
        self.check_count(task, &id, f.factors.len())?;
        // Cut each frame's P; take each shared S from the first tensor that has it and
        // check every other tensor of the group gives the same values.
        let mut p_of: Vec<Option<(usize, Vec<f32>)>> = vec![None; order.n_frames()];
        let mut s_of: Vec<Option<(usize, Vec<f32>, String)>> = vec![None; order.n_shared()];
        for t in &f.factors {
            let target = self.target(task, &id, &t.name, &t.shape)?;
            let (rows, cols, n) = (t.shape[0], t.shape[1], t.n);
            if t.a.len() != n * rows || t.b.len() != n * cols {
                return Err(Error::Sample {
                    task: task.clone(),
                    id: id.clone(),
                    what: format!(
                        "tensor `{}`: factors of {} and {} values, expected {n} × {rows} and {n} × {cols}",
                        t.name,
                        t.a.len(),
                        t.b.len()
                    ),
                });
            }
            let mut frames: Vec<(usize, Vec<f32>, &[f32])> = Vec::new();
            match target {
                Target::Attn(at) => {
                    for b in &at.blocks {
                        for head in 0..self.geometry.heads_of(*b) {
                            let frame = order.attn(at.layer, *b, head).expect("all blocks stored");
                            let spec = self.geometry.slice_spec(at.layer, *b, head)?;
                            let (src_p, wp, src_s) = match spec.axis {
                                Axis::Rows => (&t.a, rows, &t.b[..]),
                                Axis::Cols => (&t.b, cols, &t.a[..]),
                            };
                            frames.push((
                                frame,
                                cut_cols(src_p, n, wp, spec.start, spec.len),
                                src_s,
                            ));
                        }
                    }
                }
                Target::Other(ti) => {
                    let o = &order.others()[ti];
                    for gi in 0..o.groups() {
                        let (a, b) = o.group_rows(gi);
                        let frame = order.other(ti, gi).expect("group in range");
                        frames.push((frame, cut_cols(&t.a, n, rows, a, b - a), &t.b[..]));
                    }
                }
            }
            // The frames of one tensor share its S: each shared factor is taken or
            // checked once per tensor, not once per head.
            let mut seen: Vec<usize> = Vec::new();
            for (frame, p, s) in frames {
                let (j, _, c) = order.factor_of(frame).expect("frame in range");
                p_of[frame] = Some((n, p));
                if seen.contains(&j) {
                    continue;
                }
                seen.push(j);
                match &s_of[j] {
                    None => s_of[j] = Some((n, s.to_vec(), t.name.clone())),
                    Some((sn, sv, from)) => {
                        if *sn != n || !same_bits(sv, s) {
                            return Err(Error::Sample {
                                task: task.clone(),
                                id: id.clone(),
                                what: format!(
                                    "tensors `{from}` and `{}` should share the {} ({n} × {c}) but their factors differ",
                                    t.name,
                                    order.describe_shared(j)
                                ),
                            });
                        }
                    }
                }
            }
        }
        let p_of: Vec<(usize, Vec<f32>)> = p_of
            .into_iter()
            .enumerate()
            .map(|(fr, p)| {
                p.ok_or_else(|| Error::Sample {
                    task: task.clone(),
                    id: id.clone(),
                    what: format!("the model gave no factor for {}", order.describe(fr)),
                })
            })
            .collect::<Result<_>>()?;
        let s_of: Vec<(usize, Vec<f32>, String)> = s_of
            .into_iter()
            .enumerate()
            .map(|(j, s)| {
                s.ok_or_else(|| Error::Sample {
                    task: task.clone(),
                    id: id.clone(),
                    what: format!("the model gave no {}", order.describe_shared(j)),
                })
            })
            .collect::<Result<_>>()?;
        let n_frame: Vec<usize> = p_of.iter().map(|p| p.0).collect();
        let n_shared: Vec<usize> = s_of.iter().map(|s| s.0).collect();
        let fv = factored_values(&order, &n_frame, &n_shared);
        let factored = match self.representation {
            RepresentationChoice::Factored => true,
            RepresentationChoice::Auto => fv < full_values(&order),
            RepresentationChoice::Full => false,
        };
        if !factored {
            drop((p_of, s_of));
            self.prepare += t0.elapsed();
            return self.put(task, id, f.into_grads());
        }
        let tokens = Self::tokens_u32(task, &id, f.tokens)?;
        // Round to the store's dtype now: the sums describe the factors as stored, and
        // the writer's own rounding of a rounded value changes nothing.
        let dtype = self.dtype;
        let round = |v: &mut Vec<f32>| {
            if dtype == DType::Bf16 {
                for x in v.iter_mut() {
                    *x = gradshard_core::bf16_bits_to_f32(gradshard_core::f32_to_bf16_bits(*x));
                }
            }
        };
        let mut p_of = p_of;
        let mut s_of = s_of;
        p_of.iter_mut().for_each(|p| round(&mut p.1));
        s_of.iter_mut().for_each(|s| round(&mut s.1));
        // The Gram matrices and the frames' squared sums are many small products:
        // computed in parallel, one product per task (gemm runs single-threaded
        // inside the pool), then added in frame order, as one by one.
        let shared: Vec<_> = s_of.iter().zip(order.shared()).collect();
        let grams: Vec<Vec<f64>> = shared
            .par_iter()
            .map(|((n, v, _), sf)| gradshard_core::factor::gram(v, *n, sf.cols))
            .collect();
        let layout = &self.layout;
        let terms: Vec<_> = p_of
            .par_iter()
            .enumerate()
            .map(|(frame, (n, p))| {
                let (j, _, _) = order.factor_of(frame).expect("frame in range");
                layout.factored_terms(frame, p, &s_of[j].1, *n, &grams[j])
            })
            .collect();
        let mut sums = vec![0f64; self.layout.len()];
        for t in &terms {
            t.add_to(&mut sums);
        }
        let mut h = None;
        if let Some(w) = self.w {
            let tb = Instant::now();
            let mut w = w.borrow_mut();
            let mut hh = w.begin_sample_as(
                SampleMeta {
                    task: task.clone(),
                    id: id.clone(),
                    tokens,
                    loss_sum: f.loss_sum,
                },
                Representation::Factored,
            )?;
            for (frame, (n, p)) in p_of.into_iter().enumerate() {
                w.put_factor(&mut hh, frame, n, p)?;
            }
            for (j, (n, s, _)) in s_of.into_iter().enumerate() {
                w.put_shared(&mut hh, j, n, s)?;
            }
            h = Some(hh);
            self.blocked += tb.elapsed();
        }
        self.finish(task, &id, tokens, sums, h)?;
        self.factored_samples += 1;
        self.values_stored += fv;
        self.prepare += t0.elapsed();
        Ok(true)
    }
}

/// Runs a collection; see the module docs. Rerunning the same options after a
/// crash continues: committed (task, id) pairs are not recomputed.
/// Bytes of memory available to this process (MemAvailable), where /proc says.
fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses a sample whose forward and backward would need more memory than the
/// machine has, before anything is allocated for it (one line of 10⁶ tokens used to
/// abort the process inside the allocator). The estimate is deliberately rough but
/// on the low side: per layer, the attention scores, probabilities and their
/// gradient (3 · heads · T² f32), and about 16 · D f32 of activations per token
/// (residual, norms, q/k/v/o, the MLP at 4·D, and their gradients), times the batch.
pub struct MemoryGuard {
    layers: u64,
    heads: u64,
    hidden: u64,
    batch: u64,
    available: Option<u64>,
}

impl MemoryGuard {
    pub fn new(g: &gradshard_core::Geometry, batch: usize, available: Option<u64>) -> MemoryGuard {
        MemoryGuard {
            layers: g.layers as u64,
            heads: g.heads as u64,
            hidden: g.hidden as u64,
            batch: batch.max(1) as u64,
            available,
        }
    }

    /// Estimated bytes to compute one batch of sequences of `tokens` tokens.
    pub fn estimate(&self, tokens: u64) -> u64 {
        let t = tokens.saturating_sub(1);
        let attn = 3u64
            .saturating_mul(self.heads)
            .saturating_mul(t.saturating_mul(t));
        let act = 16u64.saturating_mul(self.hidden).saturating_mul(t);
        attn.saturating_add(act)
            .saturating_mul(4)
            .saturating_mul(self.layers)
            .saturating_mul(self.batch)
    }

    /// The longest sample whose estimate fits in `budget` bytes.
    pub fn longest_fitting(&self, budget: u64) -> u64 {
        let (mut lo, mut hi) = (2u64, 1u64 << 32);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.estimate(mid) <= budget {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    pub fn check(&self, task: &TaskName, id: &SampleId, tokens: usize) -> Result<()> {
        let Some(avail) = self.available else {
            return Ok(());
        };
        let need = self.estimate(tokens as u64);
        if need <= avail {
            return Ok(());
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        Err(Error::Sample {
            task: task.clone(),
            id: id.clone(),
            what: format!(
                "{tokens} tokens would need about {:.1} GiB to compute (estimate: attention 3·heads·T² and 16·D·T activations per layer, f32, x batch {}), more than the {:.1} GiB available; truncate with --max-tokens {} (or a smaller --batch)",
                gib(need),
                self.batch,
                gib(avail),
                self.longest_fitting(avail)
            ),
        })
    }
}

pub fn collect(
    opts: &CollectOptions,
    progress: &mut dyn FnMut(CollectEvent),
) -> Result<CollectReport> {
    let start = Instant::now();
    if opts.tasks.is_empty() {
        return Err(Error::InvalidArgument(
            "at least one --task is needed".into(),
        ));
    }
    for (i, (t, _)) in opts.tasks.iter().enumerate() {
        if opts.tasks[..i].iter().any(|(u, _)| u == t) {
            return Err(Error::InvalidArgument(format!("task `{t}` is given twice")));
        }
    }
    if opts.batch == 0 {
        return Err(Error::InvalidArgument("--batch must be >= 1".into()));
    }
    if matches!(opts.max_tokens, Some(0 | 1)) {
        return Err(Error::InvalidArgument(
            "--max-tokens must be >= 2 (one input and one label)".into(),
        ));
    }
    for (t, f) in &opts.tasks {
        if !f.is_file() {
            return Err(Error::InvalidArgument(format!(
                "task `{t}`: {} is not a file",
                f.display()
            )));
        }
    }
    let model = GradModel::load_with(&opts.model_dir, opts.device, opts.params, opts.cpu_engine)?;
    let engine = model.engine_name();
    let tracked = model.tracked_params();
    let spec = spec_from_params(&opts.model_dir, &tracked, opts.dtype, opts.codec)?;
    let mut wopts = opts.writer.clone();
    if wopts.source.is_null() {
        wopts.source = serde_json::json!({
            "kind": "collect",
            "model": opts.model_dir.display().to_string(),
            "params": format!("{:?}", opts.params),
            "tasks": opts.tasks.iter().map(|(t, f)| (t.to_string(), f.display().to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            "max_tokens": opts.max_tokens,
            "max_samples": opts.max_samples,
        });
    }
    let writer = if opts.model_only {
        None
    } else {
        Some(StoreWriter::open_or_create(&opts.store, &spec, wopts)?)
    };
    let (order, dtype) = match &writer {
        Some(w) => (w.order().clone(), w.manifest().spec.dtype),
        None => (spec.frame_order(), spec.dtype),
    };
    let layout = StatsLayout::new(&order, dtype);
    // A format-1 store holds full slices only: `auto` stores full slices there, and
    // `factored` is refused before any compute.
    let mut representation = opts.representation;
    if let Some(w) = &writer {
        if w.manifest().format_version < 2 && representation != RepresentationChoice::Full {
            if representation == RepresentationChoice::Factored {
                return Err(Error::InvalidArgument(format!(
                    "store {} is format version {}, which holds full slices only: collect --representation factored into a new store",
                    opts.store.display(),
                    w.manifest().format_version
                )));
            }
            representation = RepresentationChoice::Full;
        }
    }
    // Opened (and a torn tail cut) while this process holds the store's LOCK.
    let side = match &writer {
        Some(_) => Some(SideLog::open(&opts.store, layout.len(), true)?),
        None => None,
    };
    let geometry = order.geometry().clone();
    let attn_of = geometry
        .all_attn_tensors()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let writer = writer.map(RefCell::new);

    // Plan for the progress display: lines per task after split and cap.
    let mut planned = 0u64;
    for (_, f) in &opts.tasks {
        let lines = count_lines(f)?;
        let lines = opts.max_samples.map_or(lines, |m| lines.min(m as u64));
        let (k, n) = (opts.worker.k as u64, opts.worker.n as u64);
        planned += lines / n + u64::from(lines % n > k);
    }
    let memory_guard = MemoryGuard::new(order.geometry(), opts.batch, available_memory());
    let tok_path = opts.model_dir.join("tokenizer.json");
    let values_per_sample: u64 = tracked
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();

    let mut sink = Sink {
        w: writer.as_ref(),
        side,
        layout,
        attn_of,
        geometry,
        nan_policy: opts.nan_policy,
        representation,
        dtype,
        full_samples: 0,
        factored_samples: 0,
        values_stored: 0,
        stored: 0,
        skipped: Vec::new(),
        prepare: Duration::ZERO,
        blocked: Duration::ZERO,
    };
    let mut resumed = 0u64;
    let mut started = false;
    let mut compute_total = Duration::ZERO;
    for (task, file) in &opts.tasks {
        let tokenizer = if tok_path.exists() {
            Some((load_tokenizer(&tok_path)?, tok_path.clone()))
        } else {
            None
        };
        let mut reader = SampleReader::open(
            file,
            tokenizer,
            ReaderOptions {
                max_tokens: opts.max_tokens,
                vocab_size: Some(model.config().vocab_size()),
                max_positions: model.config().max_positions(),
            },
        )?;
        // Decide which samples this run computes: index cap, worker share, resume.
        let mut idx = 0usize;
        let mut id_err: Option<Error> = None;
        {
            let mut resumed_here = 0u64;
            let iter = std::iter::from_fn(|| loop {
                let item = reader.next()?;
                let s = match item {
                    Err(e) => return Some(Err(e)),
                    Ok(s) => s,
                };
                let i = idx;
                idx += 1;
                if opts.max_samples.is_some_and(|m| i >= m) {
                    return None;
                }
                if i % opts.worker.n != opts.worker.k {
                    continue;
                }
                let id = match to_core_id(task, &s.id, s.line) {
                    Ok(id) => id,
                    Err(e) => {
                        id_err = Some(e);
                        return None;
                    }
                };
                if let Err(e) = memory_guard.check(task, &id, s.ids.len()) {
                    id_err = Some(e);
                    return None;
                }
                if writer
                    .as_ref()
                    .is_some_and(|w| w.borrow().is_committed(task, &id))
                {
                    resumed_here += 1;
                    continue;
                }
                return Some(Ok(s));
            });
            if !started {
                started = true;
                progress(CollectEvent::Started {
                    planned,
                    values_per_sample,
                });
            }
            let mut sink_err: Option<Error> = None;
            let t_task = Instant::now();
            let mut in_sink = Duration::ZERO;
            let mut handle = |got: Got| {
                let ts = Instant::now();
                let res = (|| -> Result<()> {
                    let raw_id = match &got {
                        Got::Grads(g) => &g.id,
                        Got::Factors(f) => &f.id,
                    };
                    let id = to_core_id(task, raw_id, 0)?;
                    let done_id = id.clone();
                    let kept = match got {
                        Got::Grads(g) => sink.put(task, id, g)?,
                        Got::Factors(f) => sink.put_factors(task, id, f)?,
                    };
                    if kept {
                        progress(CollectEvent::Sample {
                            task: task.clone(),
                            id: done_id,
                            done: sink.stored,
                        });
                    } else if let Some(s) = sink.skipped.last() {
                        progress(CollectEvent::Skipped {
                            task: s.task.clone(),
                            id: s.id.clone(),
                            why: s.why.clone(),
                        });
                    }
                    Ok(())
                })();
                in_sink += ts.elapsed();
                res.map_err(|e| {
                    let msg = e.to_string();
                    sink_err = Some(e);
                    gradshard_models::Error::InvalidArgument(msg)
                })
            };
            let r = if representation == RepresentationChoice::Full {
                model.for_each_grads(iter, opts.batch, |g| handle(Got::Grads(g)))
            } else {
                model.for_each_factors(iter, opts.batch, |f| handle(Got::Factors(f)))
            };
            compute_total += t_task.elapsed().saturating_sub(in_sink);
            if let Some(e) = sink_err {
                return Err(e);
            }
            if let Some(e) = id_err.take() {
                return Err(e);
            }
            r?;
            resumed += resumed_here;
        }
        if reader.samples_read() == 0 && reader.skipped().is_empty() {
            progress(CollectEvent::Warning(format!(
                "task `{task}`: {} holds no sample",
                file.display()
            )));
        }
        if reader.ids_from_lines() > 0 {
            progress(CollectEvent::Warning(format!(
                "task `{task}`: {} of {} samples in {} have no \"id\"; their 0-based line index is used as their id",
                reader.ids_from_lines(),
                reader.samples_read(),
                file.display()
            )));
        }
        for s in reader.skipped() {
            let id = match &s.id {
                gradshard_models::SampleId::Int(v) => SampleId::Int(*v),
                gradshard_models::SampleId::Str(v) => SampleId::Str(v.clone()),
            };
            let why = format!(
                "{} token(s) at line {}: needs at least 2 (one input, one label)",
                s.tokens, s.line
            );
            progress(CollectEvent::Skipped {
                task: task.clone(),
                id: id.clone(),
                why: why.clone(),
            });
            sink.skipped.push(SkippedSample {
                task: task.clone(),
                id,
                why,
            });
        }
    }
    progress(CollectEvent::Finishing);
    if let Some(side) = &sink.side {
        side.sync()?;
    }
    let Sink {
        stored,
        skipped,
        prepare,
        blocked,
        full_samples,
        factored_samples,
        values_stored,
        ..
    } = sink;
    let mut write = WriteReport::default();
    let mut stats = stats::RebuildReport::default();
    let mut full_fisher = Vec::new();
    if let Some(w) = writer {
        write = w.into_inner().finish()?;
        stats = stats::rebuild(&opts.store)?;
        if opts.full_fisher {
            let store = gradshard_store::Store::open(&opts.store)?;
            for t in store.tasks() {
                full_fisher.push(crate::fisher::write_full_fisher(&store, &t)?);
            }
        }
    }
    Ok(CollectReport {
        engine,
        write,
        stored,
        resumed,
        skipped,
        compute_time: compute_total,
        prepare_time: prepare.saturating_sub(blocked),
        blocked_time: blocked,
        elapsed: start.elapsed(),
        stats,
        full_fisher,
        values_per_sample,
        dtype_bytes: dtype.size() as u64,
        full_samples,
        factored_samples,
        values_stored,
    })
}

/// What the model hands the sink: gradients (`--representation full`) or factors.
enum Got {
    Grads(SampleGrads),
    Factors(SampleFactors),
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn a_sample_too_long_for_memory_is_refused_naming_the_longest_that_fits() {
        let cfg = serde_json::json!({"model_type":"llama","num_hidden_layers":32,"hidden_size":4096,
            "num_attention_heads":32,"num_key_value_heads":8});
        let g = gradshard_core::ModelShape::geometry_of(&cfg).unwrap();
        let avail = 24u64 << 30;
        let guard = MemoryGuard::new(&g, 1, Some(avail));
        let t = TaskName::new("math").unwrap();
        guard.check(&t, &SampleId::Int(1), 512).unwrap();
        let e = guard
            .check(&t, &SampleId::Int(7), 1_000_000)
            .unwrap_err()
            .to_string();
        let n = guard.longest_fitting(avail);
        assert!(guard.estimate(n) <= avail && guard.estimate(n + 1) > avail);
        assert!(
            e.contains("task `math` sample 7")
                && e.contains("1000000 tokens")
                && e.contains(&format!("--max-tokens {n}")),
            "{e}"
        );
        // A batch of 8 needs 8 times the memory: the longest sample shrinks.
        let b8 = MemoryGuard::new(&g, 8, Some(avail));
        assert!(b8.longest_fitting(avail) < n);
        // Without a memory figure nothing is refused.
        MemoryGuard::new(&g, 1, None)
            .check(&t, &SampleId::Int(7), 1_000_000)
            .unwrap();
    }

    #[test]
    fn first_non_finite_finds_the_first_at_any_position() {
        let mut v = vec![1.5f32; 1000];
        assert_eq!(first_non_finite(&v), None);
        assert_eq!(first_non_finite(&[]), None);
        for (at, bad) in [
            (0, f32::NAN),
            (255, f32::INFINITY),
            (256, f32::NEG_INFINITY),
            (700, f32::NAN),
            (999, f32::INFINITY),
        ] {
            v[at] = bad;
            if at < 999 {
                v[999] = f32::NAN; // a later one must not win
            }
            let (i, x) = first_non_finite(&v).expect("has one");
            assert_eq!(i, at);
            assert_eq!(x.to_bits(), bad.to_bits());
            v.fill(1.5);
        }
        // The largest finite values and subnormals are finite.
        assert_eq!(first_non_finite(&[f32::MAX, f32::MIN, 1e-45, -0.0]), None);
    }

    #[test]
    fn same_bits_tells_every_difference() {
        let a: Vec<f32> = (0..700).map(|i| i as f32 * 0.25).collect();
        assert!(same_bits(&a, &a.clone()));
        assert!(!same_bits(&a, &a[..699]));
        for at in [0, 255, 256, 699] {
            let mut b = a.clone();
            b[at] = f32::from_bits(b[at].to_bits() ^ 1);
            assert!(!same_bits(&a, &b), "{at}");
        }
        assert!(!same_bits(&[0.0], &[-0.0]));
    }
}
