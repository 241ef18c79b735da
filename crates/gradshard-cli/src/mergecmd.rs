//! `merge`: combine stores of one model (worker shares) into one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use gradshard_store::{fsutil, LiveCounters, MergeEvent, WriterOptions};

use crate::human;
use crate::progress::WriteBar;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Output store (created if absent; rerunning an interrupted merge resumes it).
    #[arg(long)]
    pub out: PathBuf,
    /// Input stores, e.g. the stores of `collect --worker k/N`.
    #[arg(required = true)]
    pub stores: Vec<PathBuf>,
    /// Compression worker threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Bytes of gradient data in flight in the writer pipeline.
    #[arg(long, default_value = "1GiB", value_parser = crate::parse_bytes)]
    pub memory_budget: u64,
    /// A shard takes no new samples past this size.
    #[arg(long, default_value = "4GiB", value_parser = crate::parse_bytes)]
    pub shard_size: u64,
}

pub fn merge(a: MergeArgs) -> Result<ExitCode> {
    let live = Arc::new(LiveCounters::default());
    let wopts = WriterOptions {
        workers: a
            .workers
            .unwrap_or_else(WriterOptions::default_workers)
            .max(1),
        memory_budget: a.memory_budget,
        shard_target_bytes: a.shard_size,
        source: serde_json::Value::Null,
        live: live.clone(),
    };
    let mut bar: Option<WriteBar> = None;
    let r = gradshard_store::merge(&a.out, &a.stores, wopts, &mut |e| match e {
        MergeEvent::Started { total } => bar = Some(WriteBar::new(total, "merge")),
        MergeEvent::Sample { done } => {
            if let Some(b) = &bar {
                b.update(done, Some(&live));
            }
        }
    });
    if let Some(b) = &bar {
        b.finish();
    }
    let r = r.with_context(|| format!("merge into {}", a.out.display()))?;
    let secs = r.write.elapsed.as_secs_f64().max(1e-9);
    println!(
        "merge: {} stores -> {}: {} samples copied, {} already there; {} -> {} on disk in {secs:.2} s; peak RSS {}",
        r.inputs,
        a.out.display(),
        r.copied,
        r.already,
        human(r.write.raw_bytes),
        human(r.write.stored_bytes),
        fsutil::peak_rss_bytes()
            .map(human)
            .unwrap_or_else(|| "n/a".into())
    );
    for (t, f) in r.tasks.iter().zip(&r.stats_files) {
        println!(
            "  statistics of `{}` ({} samples, Chan merge): {}",
            t.task,
            t.n_samples,
            f.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
