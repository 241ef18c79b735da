//! `collect`: a Hugging Face checkpoint and JSONL task files → per-sample
//! gradients (burn) → a store, with running Fisher statistics; resumable,
//! splittable into `--worker k/N` shares.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use gradshard_collect::{
    CollectEvent, CollectOptions, CollectReport, NanPolicy, RepresentationChoice, WorkerSplit,
};
use gradshard_core::TaskName;
use gradshard_models::{CpuEngine, Device, ParamSet};
use gradshard_store::{fsutil, LiveCounters};
use serde_json::json;

use crate::progress::WriteBar;
use crate::{human, WriteArgs};

#[derive(Args, Debug, Clone)]
pub struct CollectArgs {
    /// Model directory: config.json, model.safetensors (or sharded), tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// NAME=FILE.jsonl: a task and its samples ({"id", "text" | "input_ids"} per line). Repeatable.
    #[arg(long = "task", required = true, value_parser = parse_task_file)]
    pub tasks: Vec<(TaskName, PathBuf)>,
    /// Store directory (created if absent; rerunning the same command resumes).
    #[arg(long)]
    pub store: PathBuf,
    /// Weights whose per-sample gradients are stored: attn, attn,mlp or all-2d.
    #[arg(long, default_value = "attn", value_parser = parse_params)]
    pub params: ParamSet,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// CPU engine: `auto` (the native engine for the LLaMA family with attn or
    /// attn,mlp, burn otherwise), `native` (fail if it does not run the model) or `burn`.
    #[arg(long, value_enum, default_value_t = CpuEngineArg::Auto)]
    pub cpu_engine: CpuEngineArg,
    /// Only the first N samples of each task file (before the worker split).
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Truncate every sample to this many tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Samples per backward pass (per-sample gradients from one batched pass).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// A NaN/inf gradient: `error` stops naming task, sample and tensor; `skip` leaves the sample out.
    #[arg(long, value_enum, default_value_t = NanPolicyArg::Error)]
    pub nan_policy: NanPolicyArg,
    /// K/N: take the samples whose index in their task file is ≡ K mod N (job arrays, several GPUs).
    #[arg(long, default_value = "0/1")]
    pub worker: WorkerSplit,
    /// Also write the full-resolution Fisher mean per task (stats/<task>.fisher.safetensors).
    #[arg(long)]
    pub full_fisher: bool,
    /// How each sample is stored: `full` (every slice), `factored` (the backprop and
    /// activation factors of every slice, exact on read; 5-20x fewer values at short
    /// sequences), or `auto` (per sample, whichever holds fewer values for its length).
    #[arg(long, value_enum, default_value_t = RepresentationArg::Auto)]
    pub representation: RepresentationArg,
    /// Benchmark: compute gradients, frames and statistics but store nothing (model-only speed).
    #[arg(long, hide = true)]
    pub model_only: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub write: WriteArgs,
}

fn parse_task_file(s: &str) -> Result<(TaskName, PathBuf), String> {
    crate::storecmd::parse_task_path(s, "FILE.jsonl")
}

fn parse_params(s: &str) -> Result<ParamSet, String> {
    s.parse()
        .map_err(|e: gradshard_models::Error| e.to_string())
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse()
        .map_err(|e: gradshard_models::Error| e.to_string())
}

/// `--cpu-engine` (collect, grads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CpuEngineArg {
    Auto,
    Native,
    Burn,
}

impl From<CpuEngineArg> for CpuEngine {
    fn from(v: CpuEngineArg) -> CpuEngine {
        match v {
            CpuEngineArg::Auto => CpuEngine::Auto,
            CpuEngineArg::Native => CpuEngine::Native,
            CpuEngineArg::Burn => CpuEngine::Burn,
        }
    }
}

/// `--nan-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NanPolicyArg {
    Error,
    Skip,
}

/// `--representation`: how each sample is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepresentationArg {
    Full,
    Factored,
    Auto,
}

impl From<RepresentationArg> for RepresentationChoice {
    fn from(v: RepresentationArg) -> RepresentationChoice {
        match v {
            RepresentationArg::Full => RepresentationChoice::Full,
            RepresentationArg::Factored => RepresentationChoice::Factored,
            RepresentationArg::Auto => RepresentationChoice::Auto,
        }
    }
}

/// Runs collect and prints its report; returns the report.
pub fn run_collect(a: &CollectArgs) -> Result<CollectReport> {
    let live = Arc::new(LiveCounters::default());
    let (writer, codec) = crate::storecmd::writer_options(&a.write, live.clone())?;
    let mut o = CollectOptions::new(&a.model, &a.store);
    o.tasks = a.tasks.clone();
    o.params = a.params;
    o.dtype = a.write.dtype;
    o.codec = codec;
    o.device = a.device;
    o.cpu_engine = a.cpu_engine.into();
    o.max_samples = a.max_samples;
    o.max_tokens = a.max_tokens;
    o.batch = a.batch;
    o.nan_policy = match a.nan_policy {
        NanPolicyArg::Error => NanPolicy::Error,
        NanPolicyArg::Skip => NanPolicy::Skip,
    };
    o.worker = a.worker;
    o.full_fisher = a.full_fisher;
    o.model_only = a.model_only;
    o.representation = a.representation.into();
    o.writer = writer;
    let mut bar: Option<WriteBar> = None;
    let r = gradshard_collect::collect(&o, &mut |e| match e {
        CollectEvent::Started { planned, .. } if !a.quiet => {
            bar = Some(WriteBar::new(planned, "collect"));
        }
        CollectEvent::Sample { done, .. } => {
            if let Some(b) = &bar {
                b.update(done, Some(&live));
            }
        }
        CollectEvent::Warning(w) => eprintln!("warning: {w}"),
        CollectEvent::Finishing => {
            if let Some(b) = &bar {
                b.finish();
            }
        }
        _ => {}
    });
    if let Some(b) = &bar {
        b.finish();
    }
    let r = r.with_context(|| format!("collect into {}", a.store.display()))?;
    print_report(&r, a)?;
    Ok(r)
}

fn print_report(r: &CollectReport, a: &CollectArgs) -> Result<()> {
    let w = &r.write;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let ratio = if w.stored_bytes > 0 {
        w.raw_bytes as f64 / w.stored_bytes as f64
    } else {
        0.0
    };
    let peak = fsutil::peak_rss_bytes();
    if a.model_only {
        let bytes = r.stored * r.values_per_sample * r.dtype_bytes;
        println!(
            "collect --model-only: {} samples in {secs:.2} s: {:.2} samples/s, {:.3} GB/s of {}-B gradients (nothing stored); model ({} engine) {:.2} s, frames+stats {:.2} s; peak RSS {}",
            r.stored,
            r.stored as f64 / secs,
            bytes as f64 / secs / 1e9,
            r.dtype_bytes,
            r.engine,
            r.compute_time.as_secs_f64(),
            r.prepare_time.as_secs_f64(),
            peak.map(human).unwrap_or_else(|| "n/a".into())
        );
    } else {
        println!(
            "collect: {} samples stored ({} as factors, {} as full slices), {} already in the store (resumed), {} skipped",
            r.stored,
            r.factored_samples,
            r.full_samples,
            r.resumed,
            r.skipped.len()
        );
        for s in r.skipped.iter().take(20) {
            println!("  skipped: task `{}` sample {}: {}", s.task, s.id, s.why);
        }
        if r.skipped.len() > 20 {
            println!("  … and {} more skipped", r.skipped.len() - 20);
        }
        println!(
        "  {:.2} samples/s; raw {} -> on disk {} (ratio {ratio:.3}x) in {secs:.2} s: {:.3} GB/s raw, {:.3} GB/s to disk",
        r.stored as f64 / secs,
        human(w.raw_bytes),
        human(w.stored_bytes),
        w.raw_bytes as f64 / secs / 1e9,
        w.stored_bytes as f64 / secs / 1e9
    );
        println!(
        "  time: model ({} engine) {:.2} s, frames+stats {:.2} s, waited on the writer {:.2} s | compression {:.2} s (summed over workers), write+fsync {:.2} s; peak RSS {}",
        r.engine,
        r.compute_time.as_secs_f64(),
        r.prepare_time.as_secs_f64(),
        r.blocked_time.as_secs_f64(),
        w.compress_time.as_secs_f64(),
        w.io_time.as_secs_f64(),
        peak.map(human).unwrap_or_else(|| "n/a".into())
    );
        println!(
        "  statistics: {} task file(s) rebuilt from {} side-log records and {} samples re-read from the store",
        r.stats.files.len(),
        r.stats.from_side_log,
        r.stats.from_store
    );
        for f in r.stats.files.iter().chain(&r.full_fisher) {
            println!("    {}", f.display());
        }
        println!("store: {}", a.store.display());
    }
    if let Some(p) = &a.write.report_json {
        let v = json!({
            "stored": r.stored,
            "resumed": r.resumed,
            "skipped": r.skipped.iter().map(|s| json!({"task": s.task.as_str(), "id": s.id, "why": s.why})).collect::<Vec<_>>(),
            "samples_per_s": r.stored as f64 / secs,
            "model_only": a.model_only,
            "representation": a.representation.to_possible_value().expect("not skipped").get_name(),
            "factored_samples": r.factored_samples,
            "full_samples": r.full_samples,
            "values_stored": r.values_stored,
            "gradient_bytes": r.stored * r.values_per_sample * r.dtype_bytes,
            "gradient_gb_per_s": (r.stored * r.values_per_sample * r.dtype_bytes) as f64 / secs / 1e9,
            "raw_bytes": w.raw_bytes,
            "stored_bytes": w.stored_bytes,
            "ratio": ratio,
            "seconds": secs,
            "raw_gb_per_s": w.raw_bytes as f64 / secs / 1e9,
            "disk_gb_per_s": w.stored_bytes as f64 / secs / 1e9,
            "engine": r.engine,
            "model_seconds": r.compute_time.as_secs_f64(),
            "prepare_seconds": r.prepare_time.as_secs_f64(),
            "blocked_on_writer_seconds": r.blocked_time.as_secs_f64(),
            "compress_seconds": w.compress_time.as_secs_f64(),
            "io_seconds": w.io_time.as_secs_f64(),
            "peak_rss_bytes": peak,
            "stats_files": r.stats.files,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn collect(a: CollectArgs) -> Result<ExitCode> {
    crate::storecmd::guard_store_outputs(&a.store, a.write.report_json.as_deref())?;
    run_collect(&a)?;
    Ok(ExitCode::SUCCESS)
}
