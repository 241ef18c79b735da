//! The index: turns a question — (task, sample, layer, block, head), or a row
//! range of another tensor — into the byte ranges that hold exactly that data.
//!
//! Two pieces: [`FrameOrder`] maps keys to frame numbers (fixed per store by the
//! manifest), and [`Index`] maps (task, sample) to the sample's commit-log record,
//! which points at its sample table. A [`ReadPlan`] lists the frames a query needs,
//! sorted by shard and offset. No I/O happens here: the store hands in table bytes.

mod order;
mod plan;

pub use order::{FrameKey, FrameOrder, SharedFactor, SharedKey};
pub use plan::{Index, PlannedRead, ReadPlan};

use gradshard_core::{SampleId, TaskName};

/// Index errors; each names the task and sample at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "duplicate sample: task `{task}` sample {id} is committed twice (seq {first} and {second})"
    )]
    DuplicateSample {
        task: TaskName,
        id: SampleId,
        first: u64,
        second: u64,
    },
    #[error("unknown task `{task}` (the store has: {known})")]
    UnknownTask { task: String, known: String },
    #[error("task `{task}` has no sample {id}")]
    UnknownSample { task: TaskName, id: SampleId },
    #[error("no frame for {what}: {detail}")]
    NoSuchFrame { what: &'static str, detail: String },
    #[error("task `{task}` sample {id}: sample table: {source}")]
    Table {
        task: TaskName,
        id: SampleId,
        #[source]
        source: gradshard_format::Error,
    },
    #[error(
        "task `{task}` sample {id}: sample table has {found} frames, the manifest says {expected}"
    )]
    FrameCount {
        task: TaskName,
        id: SampleId,
        found: u32,
        expected: usize,
    },
    #[error(
        "task `{task}` sample {id}: sample table has {found} shared factors, the manifest says {expected} (or 0 for a sample stored as full slices)"
    )]
    SharedCount {
        task: TaskName,
        id: SampleId,
        found: u32,
        expected: usize,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
