//! `stats/<task>.json` rebuilt from a store's committed samples (side-log record
//! first, the stored frames otherwise), or loaded when it is current.

use std::path::{Path, PathBuf};

use gradshard_core::TaskName;
use gradshard_format::LogRecord;

use super::{ids_digest, task_stats_path, SideLog, StatsLayout, TaskStats, Welford};
use crate::error::{Error, Result};
use crate::Store;

/// What a rebuild used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildReport {
    pub tasks: Vec<TaskStats>,
    pub files: Vec<PathBuf>,
    /// Samples whose sums came from the side log.
    pub from_side_log: u64,
    /// Samples whose sums were recomputed from their stored frames.
    pub from_store: u64,
}

/// Welford accumulator of one task.
pub struct TaskAccum {
    pub task: TaskName,
    pub welford: Welford,
    pub tokens: u64,
}

/// Per-task accumulators over a store, and where the sums came from.
pub struct StoreAccum {
    pub tasks: Vec<TaskAccum>,
    pub from_side_log: u64,
    pub from_store: u64,
}

/// Per-task Welford accumulators over the committed samples of `store`, in store order.
pub fn accumulate_store(store: &Store, side: Option<&SideLog>) -> Result<StoreAccum> {
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let mut acc = StoreAccum {
        tasks: Vec::new(),
        from_side_log: 0,
        from_store: 0,
    };
    for task in store.tasks() {
        let mut w = Welford::new(layout.len());
        let mut tokens = 0u64;
        for rec in store.samples(task.as_str())? {
            let sums = match side
                .map(|s| s.get(&task, &rec.id, rec.tokens))
                .transpose()?
            {
                Some(Some(v)) => {
                    acc.from_side_log += 1;
                    v
                }
                _ => {
                    acc.from_store += 1;
                    layout.from_store(store, rec)?
                }
            };
            w.push(&sums);
            tokens += u64::from(rec.tokens);
        }
        acc.tasks.push(TaskAccum {
            task,
            welford: w,
            tokens,
        });
    }
    Ok(acc)
}

/// Rebuilds `stats/<task>.json` of every task of the store at `dir` from its
/// committed samples (side log first, stored frames otherwise) and writes them.
pub fn rebuild(dir: &Path) -> Result<RebuildReport> {
    let store = Store::open(dir)?;
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let side = SideLog::open(dir, layout.len(), false)?;
    let acc = accumulate_store(&store, Some(&side))?;
    let mut rep = RebuildReport {
        from_side_log: acc.from_side_log,
        from_store: acc.from_store,
        ..Default::default()
    };
    for t in acc.tasks {
        let digest = ids_digest(store.samples(t.task.as_str())?);
        let s = TaskStats::from_welford(&layout, &t.task, &t.welford, t.tokens, digest, "rebuilt");
        rep.files.push(s.save(dir)?);
        rep.tasks.push(s);
    }
    Ok(rep)
}

/// Loads `stats/<task>.json` if it describes exactly the store's committed
/// samples of the task; otherwise recomputes it (without writing).
pub fn load_or_compute(store: &Store, task: &TaskName) -> Result<TaskStats> {
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let recs = store.samples(task.as_str())?;
    let digest = ids_digest(recs);
    let path = task_stats_path(store.dir(), task);
    if path.exists() {
        let s = match TaskStats::load(&path) {
            Err(e @ Error::StatsWithoutChecksum { .. }) => {
                tracing::warn!("{e}; recomputing");
                return compute(store, task, &layout, recs, digest);
            }
            r => r?,
        };
        if s.ids_xxh3 == digest && s.n_samples == recs.len() as u64 {
            s.to_welford(&layout, &path)?;
            return Ok(s);
        }
        tracing::warn!(
            "{} does not describe the store's committed samples; recomputing",
            path.display()
        );
    }
    compute(store, task, &layout, recs, digest)
}

fn compute(
    store: &Store,
    task: &TaskName,
    layout: &StatsLayout,
    recs: &[LogRecord],
    digest: String,
) -> Result<TaskStats> {
    let side = SideLog::open(store.dir(), layout.len(), false)?;
    let mut w = Welford::new(layout.len());
    let mut tokens = 0u64;
    for rec in recs {
        let sums = match side.get(task, &rec.id, rec.tokens)? {
            Some(v) => v,
            None => layout.from_store(store, rec)?,
        };
        w.push(&sums);
        tokens += u64::from(rec.tokens);
    }
    Ok(TaskStats::from_welford(
        layout, task, &w, tokens, digest, "rebuilt",
    ))
}
