//! ingest, synth, inspect, verify.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use gradshard_core::{Geometry, TaskName};
use gradshard_store::ingest::{ingest as run_ingest, IngestOptions};
use gradshard_store::synth::{preset, synth as run_synth, SynthOptions, PRESETS};
use gradshard_store::{
    fsutil, CodecName, CodecSpec, LiveCounters, Store, WriteReport, WriterOptions,
};
use serde_json::json;

use crate::progress::{counter, WriteBar};
use crate::{human, WriteArgs};

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// Model directory with config.json (gives the attention geometry).
    #[arg(long)]
    pub model: PathBuf,
    /// NAME=DIR: a task and its directory of <id>.safetensors files. Repeatable.
    #[arg(long = "task", required = true, value_parser = parse_task)]
    pub tasks: Vec<(TaskName, PathBuf)>,
    /// Store directory (created if absent; an existing store is resumed).
    #[arg(long)]
    pub store: PathBuf,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Parses `NAME=PATH` (a task and where its data is); `path_kind` names PATH in messages.
pub(crate) fn parse_task_path(s: &str, path_kind: &str) -> Result<(TaskName, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME={path_kind}"))?;
    let name = TaskName::new(name).map_err(|e| e.to_string())?;
    if path.is_empty() {
        return Err(format!("`{s}`: empty {path_kind}"));
    }
    Ok((name, PathBuf::from(path)))
}

fn parse_task(s: &str) -> Result<(TaskName, PathBuf), String> {
    parse_task_path(s, "DIR")
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Store directory (created if absent; rerunning the same command resumes).
    #[arg(long)]
    pub store: PathBuf,
    /// Named geometry.
    #[arg(long, default_value = "tiny", conflicts_with = "config", value_parser = clap::builder::PossibleValuesParser::new(PRESETS.iter().map(|p| p.0)))]
    pub preset: String,
    /// A Hugging Face config.json (or its directory) instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Comma-separated task names.
    #[arg(long, default_value = "math,general", value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Samples per task.
    #[arg(long, default_value_t = 16)]
    pub samples: usize,
    /// Seed of the generated gradients (same seed, same store contents).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also store MLP weights (row groups); needs the intermediate size from the preset or config.
    #[arg(long)]
    pub mlp: bool,
    /// Draw attention frames from a pool of N pre-generated frames (benchmarks: measures the
    /// writer, not the random number generator). 0 generates every frame.
    #[arg(long, default_value_t = 0)]
    pub pool: usize,
    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// List every sample (id, T, loss).
    #[arg(long)]
    pub samples: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the index (one row per frame: key -> shard, offset, length, checksum) as Parquet.
    #[arg(long)]
    pub index_parquet: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Store directory.
    #[arg(long)]
    pub store: PathBuf,
}

#[derive(Args, Debug)]
pub struct SalvageArgs {
    /// Store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// Say what would be done, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Writer options and codec from the shared writer flags (every command that writes a store).
pub(crate) fn writer_options(
    w: &WriteArgs,
    live: Arc<LiveCounters>,
) -> Result<(WriterOptions, CodecSpec)> {
    if w.zstd_level < 0 || w.zstd_level > 22 {
        bail!("--zstd-level {} is out of range 0..=22", w.zstd_level);
    }
    let name = match (w.zstd_level, w.codec, w.no_shuffle) {
        (0, _, _) => CodecName::None,
        (_, Some(crate::CodecArg::ZstdExp), true) => {
            bail!("--codec zstd-exp compresses the exponent byte plane: it needs the byte shuffle (drop --no-shuffle, or use --codec zstd)")
        }
        (_, Some(crate::CodecArg::Zstd), _) | (_, None, true) => CodecName::Zstd,
        _ => CodecName::ZstdExp,
    };
    let codec = CodecSpec {
        name,
        level: w.zstd_level,
        shuffle: !w.no_shuffle,
    };
    let opts = WriterOptions {
        workers: w
            .workers
            .unwrap_or_else(WriterOptions::default_workers)
            .max(1),
        memory_budget: w.memory_budget,
        shard_target_bytes: w.shard_size,
        source: serde_json::Value::Null,
        live,
    };
    Ok((opts, codec))
}

fn report(
    what: &str,
    r: &WriteReport,
    extra: serde_json::Value,
    json_path: Option<&Path>,
) -> Result<()> {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let ratio = if r.stored_bytes > 0 {
        r.raw_bytes as f64 / r.stored_bytes as f64
    } else {
        0.0
    };
    let peak = fsutil::peak_rss_bytes();
    println!(
        "{what}: {} samples committed ({} already present), {} frames",
        r.samples_committed, r.already_committed, r.frames
    );
    println!(
        "  raw {} -> on disk {} (ratio {ratio:.3}x) in {secs:.2} s: {:.3} GB/s in, {:.3} GB/s to disk",
        human(r.raw_bytes),
        human(r.stored_bytes),
        r.raw_bytes as f64 / secs / 1e9,
        r.stored_bytes as f64 / secs / 1e9
    );
    println!(
        "  time: compression {:.2} s (summed over workers), write+fsync {:.2} s; peak RSS {}",
        r.compress_time.as_secs_f64(),
        r.io_time.as_secs_f64(),
        peak.map(human).unwrap_or_else(|| "n/a".into())
    );
    if let Some(p) = json_path {
        let mut v = json!({
            "samples_committed": r.samples_committed,
            "already_committed": r.already_committed,
            "frames": r.frames,
            "raw_bytes": r.raw_bytes,
            "stored_bytes": r.stored_bytes,
            "ratio": ratio,
            "seconds": secs,
            "raw_gb_per_s": r.raw_bytes as f64 / secs / 1e9,
            "disk_gb_per_s": r.stored_bytes as f64 / secs / 1e9,
            "compress_seconds": r.compress_time.as_secs_f64(),
            "io_seconds": r.io_time.as_secs_f64(),
            "peak_rss_bytes": peak,
        });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn ingest(a: IngestArgs) -> Result<ExitCode> {
    let live = Arc::new(LiveCounters::default());
    let (writer, codec) = writer_options(&a.write, live.clone())?;
    let opts = IngestOptions {
        model_dir: a.model.clone(),
        tasks: a.tasks.clone(),
        store: a.store.clone(),
        dtype: a.write.dtype,
        codec,
        writer,
    };
    let mut bar: Option<WriteBar> = None;
    let r = run_ingest(&opts, &mut |done, total| {
        let b = bar.get_or_insert_with(|| WriteBar::new(total, "ingest"));
        b.update(done, Some(&live));
    });
    if let Some(b) = &bar {
        b.finish();
    }
    let r = r?;
    if !r.ignored_tensors.is_empty() {
        println!("ignored (not 2-D): {}", r.ignored_tensors.join(", "));
    }
    report(
        "ingest",
        &r.write,
        json!({"files": r.files, "skipped": r.skipped}),
        a.write.report_json.as_deref(),
    )?;
    println!("store: {}", a.store.display());
    Ok(ExitCode::SUCCESS)
}

pub fn synth(a: SynthArgs) -> Result<ExitCode> {
    let (geometry, intermediate) = match &a.config {
        Some(p) => {
            let g = Geometry::from_config_path(p)?;
            let file = if p.is_dir() {
                p.join("config.json")
            } else {
                p.clone()
            };
            let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
            let inter = ["intermediate_size", "n_inner"]
                .iter()
                .find_map(|k| cfg.get(*k).and_then(|v| v.as_u64()))
                .map(|v| v as usize)
                .unwrap_or(4 * g.hidden);
            (g, inter)
        }
        None => preset(&a.preset)?,
    };
    let tasks = a
        .tasks
        .iter()
        .map(|t| TaskName::new(t.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let live = Arc::new(LiveCounters::default());
    let (writer, codec) = writer_options(&a.write, live.clone())?;
    let opts = SynthOptions {
        geometry,
        mlp: a.mlp.then_some(intermediate),
        tasks,
        samples_per_task: a.samples,
        seed: a.seed,
        dtype: a.write.dtype,
        codec,
        writer,
        pool: a.pool,
    };
    let raw = opts.raw_bytes()?;
    eprintln!(
        "synth: {} of raw gradients into {}",
        human(raw),
        a.store.display()
    );
    let bar = WriteBar::new((opts.tasks.len() * opts.samples_per_task) as u64, "synth");
    let r = run_synth(&a.store, &opts, &mut |done, _| {
        bar.update(done, Some(&live))
    });
    bar.finish();
    let r = r?;
    report(
        "synth",
        &r,
        json!({"memory_budget": a.write.memory_budget}),
        a.write.report_json.as_deref(),
    )?;
    Ok(ExitCode::SUCCESS)
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

pub fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let store = Store::open(&a.store)?;
    if let Some(p) = &a.index_parquet {
        let rows = crate::indexexport::write_index(&store, p)?;
        eprintln!("index: {rows} frames written to {}", p.display());
    }
    let m = store.manifest();
    let g = &m.spec.geometry;
    let order = store.order();
    let per_sample_values: u64 = (0..order.n_frames())
        .map(|f| order.frame_numel(f).unwrap_or(0) as u64)
        .sum();
    let n = store.index().n_samples() as u64;
    // What the samples would take as full slices (the equivalent full size).
    let raw = per_sample_values * m.spec.dtype.size() as u64 * n;
    // Per representation: samples, frame bytes on disk, decoded bytes.
    let mut by_repr = [(0u64, 0u64, 0u64); 2];
    store.prefetch_tables();
    for r in store.index().records() {
        let f = store.footprint(r)?;
        let e = &mut by_repr[usize::from(f.factored)];
        e.0 += 1;
        e.1 += f.stored_bytes;
        e.2 += f.raw_bytes;
    }
    // Every frame of every sample, a factored sample's shared factors included: the
    // count `verify` checks and the rows of `--index-parquet`.
    let frames_total = n * order.n_frames() as u64 + by_repr[1].0 * order.n_shared() as u64;
    let repr_json = |e: (u64, u64, u64)| {
        json!({"samples": e.0, "frame_bytes": e.1, "decoded_bytes": e.2,
               "equivalent_full_bytes": e.0 * per_sample_values * m.spec.dtype.size() as u64})
    };
    let on_disk = dir_bytes(&a.store);
    let shard_bytes = store.shard_bytes();
    let tasks: Vec<serde_json::Value> = store
        .tasks()
        .iter()
        .map(|t| {
            let s = store.samples(t.as_str()).expect("listed task");
            let tok: u64 = s.iter().map(|r| r.tokens as u64).sum();
            let mut v = json!({"task": t.as_str(), "samples": s.len(), "tokens_total": tok});
            if a.samples {
                v["sample_list"] = s
                    .iter()
                    .map(|r| json!({"id": r.id, "tokens": r.tokens, "loss_sum": r.loss_sum}))
                    .collect();
            }
            v
        })
        .collect();
    let mut tensors: Vec<serde_json::Value> = g
        .all_attn_tensors()
        .iter()
        .map(|t| json!({"name": t.name, "shape": t.shape, "blocks": t.blocks.iter().map(|b| b.as_str()).collect::<Vec<_>>()}))
        .collect();
    tensors.extend(
        m.spec
            .other_tensors
            .iter()
            .map(|t| json!({"name": t.name, "shape": t.shape, "rows_per_group": t.rows_per_group})),
    );
    let ratio = if shard_bytes > 0 {
        raw as f64 / shard_bytes as f64
    } else {
        0.0
    };
    let summary = json!({
        "store": a.store.display().to_string(),
        "store_id": m.store_id,
        "format_version": m.format_version,
        "created_by": m.created_by,
        "geometry": g,
        "dtype": m.spec.dtype,
        "codec": m.spec.codec,
        "blocks": m.spec.blocks,
        "frames_per_sample": order.n_frames(),
        "frames": frames_total,
        "samples": n,
        "tasks": tasks,
        "tensors": tensors,
        "raw_bytes": raw,
        "equivalent_full_bytes": raw,
        "representations": {"full": repr_json(by_repr[0]), "factored": repr_json(by_repr[1])},
        "shared_factors_per_sample": order.n_shared(),
        "shard_bytes": shard_bytes,
        "bytes_on_disk": on_disk,
        "compression_ratio": ratio,
        "torn_log_tail": store.torn_log_tail,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "store      {} (id {}, format v{}, {})",
        a.store.display(),
        m.store_id,
        m.format_version,
        m.created_by
    );
    println!(
        "model      {} ({:?}): {} layers, D = {}, H = {}, H_kv = {}, d = {}",
        g.model_type, g.layout, g.layers, g.hidden, g.heads, g.kv_heads, g.head_dim
    );
    let codec = match m.spec.codec.name {
        CodecName::None => "none".into(),
        n => format!("{} level {}", n.as_str(), m.spec.codec.level),
    };
    println!(
        "storage    {} values, {codec}{}, blocks {}, {} frames per sample",
        m.spec.dtype,
        if m.spec.codec.shuffle {
            " + byte-shuffle"
        } else {
            ""
        },
        m.spec
            .blocks
            .iter()
            .map(|b| b.as_str())
            .collect::<Vec<_>>()
            .join(""),
        order.n_frames()
    );
    println!(
        "frames     {frames_total} in all samples{}",
        if by_repr[1].0 > 0 {
            format!(
                " ({} per full sample, {} + {} shared factors per factored sample)",
                order.n_frames(),
                order.n_frames(),
                order.n_shared()
            )
        } else {
            String::new()
        }
    );
    println!("tasks");
    for t in store.tasks() {
        let s = store.samples(t.as_str())?;
        let tok: u64 = s.iter().map(|r| r.tokens as u64).sum();
        println!(
            "  {:<20} {:>8} samples  {:>10} predicted tokens",
            t.as_str(),
            s.len(),
            tok
        );
        if a.samples {
            for r in s {
                println!(
                    "    id {:<12} T = {:<6} loss_sum = {:.6}",
                    r.id.to_string(),
                    r.tokens,
                    r.loss_sum
                );
            }
        }
    }
    println!(
        "tensors    {} attention tensors{}",
        g.layers * g.attn_tensors(0).len(),
        if m.spec.other_tensors.is_empty() {
            String::new()
        } else {
            format!(
                ", {} other 2-D tensors (row groups)",
                m.spec.other_tensors.len()
            )
        }
    );
    println!(
        "bytes      as full slices {} | shards {} | on disk {} | full size / shards {ratio:.3}x",
        human(raw),
        human(shard_bytes),
        human(on_disk)
    );
    for (name, e) in [("full", by_repr[0]), ("factored", by_repr[1])] {
        if e.0 == 0 {
            continue;
        }
        let full = e.0 * per_sample_values * m.spec.dtype.size() as u64;
        println!(
            "  {name:<9} {:>8} samples: {} in frames ({} decoded), as full slices {} ({:.2}x of that)",
            e.0,
            human(e.1),
            human(e.2),
            human(full),
            full as f64 / e.1.max(1) as f64
        );
    }
    if store.torn_log_tail > 0 {
        println!("note       the commit log ends in a torn record ({} bytes): a writer crashed; the next writer removes it", store.torn_log_tail);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let bar = counter(0, "verify");
    let rep = gradshard_store::verify(&a.store, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let mut rep = rep?;
    // The statistics in stats/ are checked too (checksum, layout, up to date), when the
    // store itself can be opened.
    if let Ok(store) = Store::open(&a.store) {
        let st = gradshard_collect::stats::check_files(&store);
        rep.problems.extend(st.problems);
        rep.warnings.extend(st.warnings);
    }
    for w in &rep.warnings {
        println!("warning: {w}");
    }
    for p in &rep.problems {
        println!("PROBLEM: {p}");
    }
    println!(
        "verify: {} samples, {} frames ({}) in {} shards, {} unreferenced bytes: {}",
        rep.samples,
        rep.frames,
        human(rep.frame_bytes),
        rep.shards,
        rep.unreferenced_bytes,
        if rep.ok() {
            "OK".to_string()
        } else {
            format!("{} PROBLEMS", rep.problems.len())
        }
    );
    Ok(if rep.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub fn salvage(a: SalvageArgs) -> Result<ExitCode> {
    if !a.store.join(gradshard_store::MANIFEST_FILE).exists() {
        bail!(
            "{}: not a store (no {}); salvage needs the manifest",
            a.store.display(),
            gradshard_store::MANIFEST_FILE
        );
    }
    let rep = gradshard_store::salvage(&a.store, a.dry_run)?;
    let verb = if a.dry_run { "would do" } else { "did" };
    for act in &rep.actions {
        println!("{verb}: {act}");
    }
    for n in &rep.notes {
        println!("note: {n}");
    }
    if let Some(old) = &rep.old_log {
        println!("the previous log is kept as {}", old.display());
    }
    // Statistics: rebuilt from the kept samples when the store has any (or any was damaged).
    let stats_dir = gradshard_collect::stats::stats_dir(&a.store);
    if stats_dir.is_dir() {
        if a.dry_run {
            println!(
                "would do: rebuild {} from the kept samples",
                stats_dir.display()
            );
        } else {
            let side = stats_dir.join(gradshard_collect::stats::SIDE_LOG);
            let rebuilt = match gradshard_collect::stats::rebuild(&a.store) {
                Ok(r) => r,
                Err(e) if side.exists() => {
                    // A damaged side log: set it aside, recompute every sum from the frames.
                    let aside = side.with_extension("bin.damaged");
                    std::fs::rename(&side, &aside)
                        .with_context(|| format!("{}: moving it aside", side.display()))?;
                    println!(
                        "did: {} could not be used ({e}); moved to {}, sums recomputed from the stored frames",
                        side.display(),
                        aside.display()
                    );
                    gradshard_collect::stats::rebuild(&a.store)?
                }
                Err(e) => return Err(e.into()),
            };
            for f in &rebuilt.files {
                println!("did: rebuilt {}", f.display());
            }
        }
    }
    println!(
        "salvage: {} sample(s) kept; {}",
        rep.kept,
        if rep.changed {
            if a.dry_run {
                "changes needed (rerun without --dry-run)"
            } else {
                "store mended"
            }
        } else {
            "the samples and the log needed no change"
        }
    );
    if a.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    verify(VerifyArgs { store: a.store })
}
