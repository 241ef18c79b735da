//! The writer pipeline: producer → bounded channel → N compression workers →
//! one appender thread that writes shards, sample tables and the commit log.
//!
//! Memory is bounded by [`WriterOptions::memory_budget`]: every frame is charged
//! for its f32 input, its encoded bytes and its compressed bytes from the moment
//! the producer hands it in until the appender has written it; the producer
//! blocks while the budget is spent.
//!
//! - `mod.rs`: the public types and the state the threads share.
//! - `api`: [`StoreWriter`]'s methods (open, samples in, finish).
//! - `pipeline`: the compression workers and the appender thread (shards, sample
//!   tables, group commit, sealing).
//! - `recovery`: the writer lock and crash recovery at open.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use gradshard_core::{DType, SampleId, TaskName};
use gradshard_format::{
    decode_log, encode_footer, encode_log_record, encode_sample_table, parse_footer, Encoder,
    FrameKind, LogRecord, ShardHeader, TableEntry, LOG_HEADER, SHARD_HEADER_LEN,
};
use gradshard_index::{FrameOrder, Index};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{sync_dir, write_atomic};
use crate::manifest::{new_store_id, Manifest, StoreSpec};
use crate::{lock_path, log_path, shard_path, shards_dir};

mod api;
mod pipeline;
mod recovery;
#[cfg(test)]
mod tests;

use pipeline::compress_worker;
#[cfg(test)]
use pipeline::fault;
use recovery::recover;
pub(crate) use recovery::{acquire_lock, record_copy_len};

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Compression worker threads.
    pub workers: usize,
    /// Bytes of frame data in flight (see the module docs).
    pub memory_budget: u64,
    /// A shard takes no new samples once it is this large.
    pub shard_target_bytes: u64,
    /// Free-form provenance saved in a new manifest.
    pub source: serde_json::Value,
    /// Counters the writer updates as it goes (share a clone to draw progress).
    pub live: Arc<LiveCounters>,
}

impl WriterOptions {
    pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;
    pub const DEFAULT_SHARD_TARGET: u64 = 4 << 30;

    pub fn default_workers() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    }
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            workers: Self::default_workers(),
            memory_budget: Self::DEFAULT_MEMORY_BUDGET,
            shard_target_bytes: Self::DEFAULT_SHARD_TARGET,
            source: serde_json::Value::Null,
            live: Arc::default(),
        }
    }
}

/// Metadata of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleMeta {
    pub task: TaskName,
    pub id: SampleId,
    /// T: predicted positions that count.
    pub tokens: u32,
    pub loss_sum: f64,
}

/// What a finished writer did.
#[derive(Debug, Clone, Default)]
pub struct WriteReport {
    pub samples_committed: u64,
    pub frames: u64,
    /// Decoded bytes of the frames written (dtype bytes).
    pub raw_bytes: u64,
    /// Frame bytes written to shards (headers + compressed payloads).
    pub stored_bytes: u64,
    /// Samples that were already committed when the writer opened.
    pub already_committed: u64,
    pub elapsed: Duration,
    /// Time the appender spent in write + fsync.
    pub io_time: Duration,
    /// Time the workers spent encoding (summed over workers).
    pub compress_time: Duration,
}

/// Counts live while writing, for progress bars.
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub committed: std::sync::atomic::AtomicU64,
    pub raw_bytes: std::sync::atomic::AtomicU64,
    pub stored_bytes: std::sync::atomic::AtomicU64,
}

/// A byte budget shared by producer and appender.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    cv: Condvar,
}

/// Fills a frame's values on a worker thread.
type Fill = Box<dyn FnOnce(&mut [f32]) + Send>;

enum Payload {
    F32(Vec<f32>),
    Gen(usize, Fill),
}

struct Job {
    seq: u64,
    /// Table slot: a frame number, or `n_frames + j` for shared factor j.
    frame: usize,
    kind: FrameKind,
    /// Factor rows n (0 for a full frame).
    rows: u32,
    payload: Payload,
    charge: u64,
}

enum AppMsg {
    Begin {
        seq: u64,
        meta: SampleMeta,
        factored: bool,
    },
    Frame {
        seq: u64,
        frame: usize,
        bytes: Vec<u8>,
        raw_len: u32,
        checksum: u64,
        charge: u64,
    },
    End {
        seq: u64,
    },
}

/// How one sample's slices are stored (docs/format.md, "Factored samples").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Representation {
    /// One frame per slice or row group (format v1 and v2).
    #[default]
    Full,
    /// A per-frame factor P for every slice plus the shared factors S (format v2):
    /// each slice is Pᵀ S.
    Factored,
}

impl std::fmt::Display for Representation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Representation::Full => "full",
            Representation::Factored => "factored",
        })
    }
}

/// Handle of a sample being written.
#[derive(Debug)]
pub struct SampleHandle {
    seq: u64,
    repr: Representation,
    /// Table slots handed in: frames, then (factored) shared factors.
    put: Vec<bool>,
    n_put: usize,
    /// Row count n of each shared factor handed in (factored samples).
    shared_rows: Vec<u32>,
}

impl SampleHandle {
    pub fn representation(&self) -> Representation {
        self.repr
    }
}

/// Writes samples into a store. One writer per store (a lock file enforces it).
pub struct StoreWriter {
    dir: PathBuf,
    manifest: Manifest,
    order: FrameOrder,
    _lock: File,
    committed: HashSet<(TaskName, SampleId)>,
    in_flight: HashSet<(TaskName, SampleId)>,
    next_seq: u64,
    job_tx: Option<Sender<Job>>,
    app_tx: Option<Sender<AppMsg>>,
    workers: Vec<JoinHandle<Duration>>,
    appender: Option<JoinHandle<Result<AppendStats>>>,
    budget: Arc<Budget>,
    failed: Arc<Mutex<Option<String>>>,
    live: Arc<LiveCounters>,
    started: Instant,
    already: u64,
}

#[derive(Default)]
struct AppendStats {
    samples: u64,
    frames: u64,
    raw: u64,
    stored: u64,
    io: Duration,
}

struct OpenShard {
    file: File,
    path: PathBuf,
    len: u64,
    /// Samples assigned to this shard and not yet committed.
    live: usize,
    /// Committed (table_offset, table_len).
    tables: Vec<(u64, u32)>,
    dirty: bool,
}

struct PendingSample {
    meta: Option<SampleMeta>,
    factored: bool,
    shard: Option<u32>,
    entries: Vec<Option<TableEntry>>,
    received: usize,
    ended: bool,
}

struct Appender {
    dir: PathBuf,
    store_id: [u8; 16],
    /// Format version of new shard headers (the store's).
    version: u16,
    n_frames: usize,
    n_shared: usize,
    target: u64,
    next_shard: u32,
    shards: HashMap<u32, OpenShard>,
    current: Option<u32>,
    samples: HashMap<u64, PendingSample>,
    /// Samples whose frames and table are written, awaiting the group commit.
    ready: Vec<LogRecord>,
    log: File,
    stats: AppendStats,
    budget: Arc<Budget>,
    live: Arc<LiveCounters>,
}
