//! The writer pipeline: producer → bounded channel → N compression workers →
//! one appender thread that writes shards, sample tables and the commit log.
//!
//! Memory is bounded by [`WriterOptions::memory_budget`]: every frame is charged
//! for its f32 input, its encoded bytes and its compressed bytes from the moment
//! the producer hands it in until the appender has written it; the producer
//! blocks while the budget is spent.

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

impl Budget {
    fn acquire(&self, n: u64, failed: &Mutex<Option<String>>) -> Result<()> {
        let mut used = self.used.lock().expect("budget lock");
        // A frame larger than the whole budget may go alone.
        while *used > 0 && *used + n > self.limit {
            if let Some(e) = failed.lock().expect("failed lock").clone() {
                return Err(Error::Pipeline(e));
            }
            used = self
                .cv
                .wait_timeout(used, Duration::from_millis(100))
                .expect("budget lock")
                .0;
        }
        *used += n;
        Ok(())
    }

    fn release(&self, n: u64) {
        let mut used = self.used.lock().expect("budget lock");
        *used -= n;
        self.cv.notify_all();
    }
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

pub(crate) fn acquire_lock(dir: &Path) -> Result<File> {
    let path = lock_path(dir);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .at(&path)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Locked {
                store: dir.to_path_buf(),
                lock: path,
                holder: if holder.trim().is_empty() {
                    "unknown process".into()
                } else {
                    holder.trim().to_string()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::Io { path, source: e }),
    }
    f.set_len(0).at(&path)?;
    write!(f, "pid {}", std::process::id()).at(&path)?;
    f.flush().at(&path)?;
    Ok(f)
}

impl StoreWriter {
    /// Opens the store at `dir` for appending, creating it with `spec` if it does not
    /// exist. An existing store must match `spec` (geometry, dtype, blocks, tensors);
    /// its codec is kept. Recovers from a crashed writer: cuts a torn log tail,
    /// truncates and seals unsealed shards.
    pub fn open_or_create(
        dir: &Path,
        spec: &StoreSpec,
        opts: WriterOptions,
    ) -> Result<StoreWriter> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).at(dir)?;
            if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(p)?;
            }
        }
        let lock = acquire_lock(dir)?;
        let manifest_path = dir.join(crate::manifest::MANIFEST_FILE);
        let manifest = if manifest_path.exists() {
            let m = Manifest::load(dir)?;
            m.check_matches(dir, spec)?;
            m
        } else {
            let m = Manifest {
                format_version: gradshard_format::FORMAT_VERSION,
                store_id: new_store_id(),
                created_by: format!("gradshard {}", env!("CARGO_PKG_VERSION")),
                n_frames: spec.frame_order().n_frames(),
                spec: spec.clone(),
                shard_target_bytes: opts.shard_target_bytes,
                source: opts.source.clone(),
            };
            std::fs::create_dir_all(shards_dir(dir)).at(&shards_dir(dir))?;
            sync_dir(dir)?;
            let log = log_path(dir);
            write_atomic(&log, &LOG_HEADER)?;
            // The manifest is written last: a directory without one is not a store yet.
            m.save(dir)?;
            m
        };
        let order = manifest.spec.frame_order();
        let (records, next_shard) = recover(dir, &manifest)?;
        let index = Index::from_records(records.iter().cloned())?;
        let committed: HashSet<_> = index
            .records()
            .map(|r| (r.task.clone(), r.id.clone()))
            .collect();
        let next_seq = records.iter().map(|r| r.seq + 1).max().unwrap_or(0);
        let already = committed.len() as u64;

        let workers_n = opts.workers.max(1);
        let (job_tx, job_rx) = bounded::<Job>(workers_n * 2);
        let (app_tx, app_rx) = unbounded::<AppMsg>();
        let budget = Arc::new(Budget {
            limit: opts.memory_budget.max(1),
            used: Mutex::new(0),
            cv: Condvar::new(),
        });
        let failed = Arc::new(Mutex::new(None));
        let live = opts.live.clone();
        let dtype = manifest.spec.dtype;
        let codec = manifest.spec.codec;
        let mut workers = Vec::new();
        for _ in 0..workers_n {
            let rx = job_rx.clone();
            let tx = app_tx.clone();
            let failed = failed.clone();
            workers.push(std::thread::spawn(move || {
                compress_worker(rx, tx, dtype, codec.codec(), codec.shuffle, failed)
            }));
        }
        let state = Appender {
            dir: dir.to_path_buf(),
            store_id: manifest.store_id_bytes()?,
            version: manifest.format_version,
            n_frames: order.n_frames(),
            n_shared: order.n_shared(),
            target: manifest.shard_target_bytes,
            next_shard,
            shards: HashMap::new(),
            current: None,
            samples: HashMap::new(),
            ready: Vec::new(),
            log: OpenOptions::new()
                .append(true)
                .open(log_path(dir))
                .at(&log_path(dir))?,
            stats: AppendStats::default(),
            budget: budget.clone(),
            live: live.clone(),
        };
        let failed_app = failed.clone();
        let appender = std::thread::spawn(move || {
            let r = state.run(&app_rx);
            // The cause is recorded while the queue is still open: the producer and the
            // workers only see a closed channel after this, so they report this error
            // (a full disk, say) and never a bare "thread exited".
            if let Err(e) = &r {
                *failed_app.lock().expect("failed lock") = Some(e.to_string());
            }
            drop(app_rx);
            r
        });
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            manifest,
            order,
            _lock: lock,
            committed,
            in_flight: HashSet::new(),
            next_seq,
            job_tx: Some(job_tx),
            app_tx: Some(app_tx),
            workers,
            appender: Some(appender),
            budget,
            failed,
            live,
            started: Instant::now(),
            already,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn order(&self) -> &FrameOrder {
        &self.order
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Live counters (committed samples, bytes) for progress display.
    pub fn live(&self) -> Arc<LiveCounters> {
        self.live.clone()
    }

    /// Whether (task, id) is already committed (resume skips it).
    pub fn is_committed(&self, task: &TaskName, id: &SampleId) -> bool {
        self.committed.contains(&(task.clone(), id.clone()))
    }

    fn check_failed(&self) -> Result<()> {
        match self.failed.lock().expect("failed lock").clone() {
            Some(e) => Err(Error::Pipeline(e)),
            None => Ok(()),
        }
    }

    fn pipeline_error(&self) -> Error {
        match self.failed.lock().expect("failed lock").clone() {
            Some(e) => Error::Pipeline(e),
            None => Error::Pipeline("a pipeline thread exited".into()),
        }
    }

    /// Starts a sample stored as full slices. A (task, id) that is committed or in flight
    /// is refused.
    pub fn begin_sample(&mut self, meta: SampleMeta) -> Result<SampleHandle> {
        self.begin_sample_as(meta, Representation::Full)
    }

    /// Starts a sample in the given representation. A factored sample takes
    /// [`put_factor`](Self::put_factor) for every frame and
    /// [`put_shared`](Self::put_shared) for every shared factor.
    pub fn begin_sample_as(
        &mut self,
        meta: SampleMeta,
        repr: Representation,
    ) -> Result<SampleHandle> {
        self.check_failed()?;
        if repr == Representation::Factored && self.manifest.format_version < 2 {
            return Err(Error::Invalid(format!(
                "store {} is format version {}: factored samples need version 2 (collect into a new store)",
                self.dir.display(),
                self.manifest.format_version
            )));
        }
        let key = (meta.task.clone(), meta.id.clone());
        if self.committed.contains(&key) || self.in_flight.contains(&key) {
            return Err(Error::Sample {
                task: meta.task,
                id: meta.id,
                what: "duplicate".into(),
                detail: format!("already in store {}", self.dir.display()),
            });
        }
        if meta.tokens == 0 {
            return Err(Error::Sample {
                task: meta.task,
                id: meta.id,
                what: "tokens".into(),
                detail: "T must be at least 1 (C = g²/T)".into(),
            });
        }
        self.in_flight.insert(key);
        let seq = self.next_seq;
        self.next_seq += 1;
        let factored = repr == Representation::Factored;
        self.app_tx
            .as_ref()
            .expect("open writer")
            .send(AppMsg::Begin {
                seq,
                meta,
                factored,
            })
            .map_err(|_| self.pipeline_error())?;
        let slots = self.order.n_frames() + if factored { self.order.n_shared() } else { 0 };
        Ok(SampleHandle {
            seq,
            repr,
            put: vec![false; slots],
            n_put: 0,
            shared_rows: vec![0; if factored { self.order.n_shared() } else { 0 }],
        })
    }

    fn check_frame(&self, h: &SampleHandle, frame: usize, numel: usize) -> Result<()> {
        if h.repr != Representation::Full {
            return Err(Error::Invalid(format!(
                "{}: a full frame handed to a {} sample",
                self.order.describe(frame),
                h.repr
            )));
        }
        let want = self.order.frame_numel(frame).ok_or_else(|| {
            Error::Invalid(format!(
                "frame {frame} out of range ({} frames per sample)",
                self.order.n_frames()
            ))
        })?;
        if numel != want {
            return Err(Error::Invalid(format!(
                "{}: {numel} values, expected {want}",
                self.order.describe(frame)
            )));
        }
        self.check_unput(h, frame, || self.order.describe(frame))
    }

    fn check_unput(
        &self,
        h: &SampleHandle,
        slot: usize,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        if h.put[slot] {
            return Err(Error::Invalid(format!("{} written twice", what())));
        }
        Ok(())
    }

    /// Checks a factor of `rows × width` values for a factored sample's `what`.
    fn check_factor(
        &self,
        h: &SampleHandle,
        what: &dyn Fn() -> String,
        n: usize,
        width: usize,
        numel: usize,
    ) -> Result<u32> {
        if h.repr != Representation::Factored {
            return Err(Error::Invalid(format!(
                "{}: a factor handed to a {} sample",
                what(),
                h.repr
            )));
        }
        let rows = u32::try_from(n)
            .ok()
            .filter(|r| (1..=gradshard_format::MAX_FACTOR_ROWS).contains(r))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: {n} factor rows (1..={} allowed)",
                    what(),
                    gradshard_format::MAX_FACTOR_ROWS
                ))
            })?;
        if numel != n * width {
            return Err(Error::Invalid(format!(
                "{}: {numel} values, expected {n} rows × {width}",
                what()
            )));
        }
        Ok(rows)
    }

    /// Hands in the per-frame factor P (`n × rows`, position-major) of frame `frame` of a
    /// factored sample: the slice is Pᵀ S with S its shared factor.
    pub fn put_factor(
        &mut self,
        h: &mut SampleHandle,
        frame: usize,
        n: usize,
        values: Vec<f32>,
    ) -> Result<()> {
        let (_, width, _) = self.order.factor_of(frame).ok_or_else(|| {
            Error::Invalid(format!(
                "frame {frame} out of range ({} frames per sample)",
                self.order.n_frames()
            ))
        })?;
        let what = || format!("{} (factor P)", self.order.describe(frame));
        let rows = self.check_factor(h, &what, n, width, values.len())?;
        self.check_unput(h, frame, what)?;
        let charge = self.charge(values.len());
        self.submit(
            h,
            frame,
            FrameKind::Factor,
            rows,
            Payload::F32(values),
            charge,
        )
    }

    /// Hands in shared factor `j` (`n × cols`, position-major) of a factored sample.
    pub fn put_shared(
        &mut self,
        h: &mut SampleHandle,
        j: usize,
        n: usize,
        values: Vec<f32>,
    ) -> Result<()> {
        let cols = self
            .order
            .shared()
            .get(j)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "shared factor {j} out of range ({} per sample)",
                    self.order.n_shared()
                ))
            })?
            .cols;
        let what = || self.order.describe_shared(j);
        let rows = self.check_factor(h, &what, n, cols, values.len())?;
        let slot = self.order.n_frames() + j;
        self.check_unput(h, slot, what)?;
        let charge = self.charge(values.len());
        self.submit(
            h,
            slot,
            FrameKind::Shared,
            rows,
            Payload::F32(values),
            charge,
        )?;
        h.shared_rows[j] = rows;
        Ok(())
    }

    fn charge(&self, numel: usize) -> u64 {
        // f32 input + dtype bytes + compressed copy (≤ dtype bytes + zstd bound slack).
        (numel * (4 + 2 * self.manifest.spec.dtype.size()) + 4096) as u64
    }

    fn submit(
        &mut self,
        h: &mut SampleHandle,
        frame: usize,
        kind: FrameKind,
        rows: u32,
        payload: Payload,
        charge: u64,
    ) -> Result<()> {
        self.budget.acquire(charge, &self.failed)?;
        let job = Job {
            seq: h.seq,
            frame,
            kind,
            rows,
            payload,
            charge,
        };
        if self
            .job_tx
            .as_ref()
            .expect("open writer")
            .send(job)
            .is_err()
        {
            self.budget.release(charge);
            return Err(self.pipeline_error());
        }
        h.put[frame] = true;
        h.n_put += 1;
        Ok(())
    }

    /// Hands in frame `frame` of a sample (values in canonical order, f32).
    /// Blocks while the memory budget is spent.
    pub fn put_frame(
        &mut self,
        h: &mut SampleHandle,
        frame: usize,
        values: Vec<f32>,
    ) -> Result<()> {
        self.check_frame(h, frame, values.len())?;
        let charge = self.charge(values.len());
        self.submit(h, frame, FrameKind::Full, 0, Payload::F32(values), charge)
    }

    /// Like [`put_frame`](Self::put_frame), but the values are produced by `fill` on a
    /// worker thread (used by the synthetic source to generate in parallel).
    pub fn put_frame_with(
        &mut self,
        h: &mut SampleHandle,
        frame: usize,
        fill: impl FnOnce(&mut [f32]) + Send + 'static,
    ) -> Result<()> {
        let numel = self.order.frame_numel(frame).unwrap_or(0);
        self.check_frame(h, frame, numel)?;
        let charge = self.charge(numel);
        self.submit(
            h,
            frame,
            FrameKind::Full,
            0,
            Payload::Gen(numel, Box::new(fill)),
            charge,
        )
    }

    /// Declares a sample complete; it commits once its frames are written.
    pub fn end_sample(&mut self, h: SampleHandle) -> Result<()> {
        if h.n_put != h.put.len() {
            let missing = h.put.iter().position(|p| !p).expect("a frame is missing");
            let n = self.order.n_frames();
            return Err(Error::Invalid(format!(
                "sample ended with {} of {} frames; first missing: {}",
                h.n_put,
                h.put.len(),
                if missing < n {
                    self.order.describe(missing)
                } else {
                    self.order.describe_shared(missing - n)
                }
            )));
        }
        self.app_tx
            .as_ref()
            .expect("open writer")
            .send(AppMsg::End { seq: h.seq })
            .map_err(|_| self.pipeline_error())
    }

    /// Waits for every handed-in sample to commit, seals the shards and reports.
    pub fn finish(mut self) -> Result<WriteReport> {
        drop(self.job_tx.take());
        let mut compress = Duration::ZERO;
        for w in self.workers.drain(..) {
            compress += w
                .join()
                .map_err(|_| Error::Pipeline("a compression worker panicked".into()))?;
        }
        drop(self.app_tx.take());
        let stats = self
            .appender
            .take()
            .expect("appender")
            .join()
            .map_err(|_| Error::Pipeline("the appender panicked".into()))??;
        self.check_failed()?;
        Ok(WriteReport {
            samples_committed: stats.samples,
            frames: stats.frames,
            raw_bytes: stats.raw,
            stored_bytes: stats.stored,
            already_committed: self.already,
            elapsed: self.started.elapsed(),
            io_time: stats.io,
            compress_time: compress,
        })
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        // Dropped without finish (an error upstream): stop the threads; samples that
        // did not commit are simply absent, and the next writer recovers.
        drop(self.job_tx.take());
        drop(self.app_tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(a) = self.appender.take() {
            let _ = a.join();
        }
    }
}

fn compress_worker(
    rx: Receiver<Job>,
    tx: Sender<AppMsg>,
    dtype: DType,
    codec: gradshard_format::Codec,
    shuffle: bool,
    failed: Arc<Mutex<Option<String>>>,
) -> Duration {
    let mut busy = Duration::ZERO;
    let mut enc = match Encoder::new(codec, shuffle) {
        Ok(e) => e,
        Err(e) => {
            *failed.lock().expect("failed lock") = Some(e.to_string());
            return busy;
        }
    };
    let mut raw = Vec::new();
    for job in rx {
        let t = Instant::now();
        let values = match job.payload {
            Payload::F32(v) => v,
            Payload::Gen(n, fill) => {
                let mut v = vec![0f32; n];
                fill(&mut v);
                v
            }
        };
        raw.clear();
        dtype.encode_into(&values, &mut raw);
        drop(values);
        let mut out = Vec::new();
        match enc.encode_kind(dtype, job.kind, job.rows, &raw, &mut out) {
            Ok(h) => {
                busy += t.elapsed();
                let msg = AppMsg::Frame {
                    seq: job.seq,
                    frame: job.frame,
                    bytes: out,
                    raw_len: h.raw_len,
                    checksum: h.checksum,
                    charge: job.charge,
                };
                if tx.send(msg).is_err() {
                    return busy;
                }
            }
            Err(e) => {
                *failed.lock().expect("failed lock") = Some(e.to_string());
                return busy;
            }
        }
    }
    busy
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

impl Appender {
    fn run(mut self, rx: &Receiver<AppMsg>) -> Result<AppendStats> {
        for msg in rx.iter() {
            self.handle(msg)?;
            // Group commit: fsync once for every sample that completed while the queue was busy.
            if !self.ready.is_empty() && (rx.is_empty() || self.ready.len() >= 256) {
                self.commit()?;
            }
        }
        self.commit()?;
        if let Some((no, s)) = self.samples.iter().next() {
            return Err(Error::Pipeline(format!(
                "sample seq {no} ended incomplete ({} of {} frames)",
                s.received,
                s.entries.len()
            )));
        }
        let open: Vec<u32> = self.shards.keys().copied().collect();
        for no in open {
            self.seal(no)?;
        }
        Ok(self.stats)
    }

    fn handle(&mut self, msg: AppMsg) -> Result<()> {
        match msg {
            AppMsg::Begin {
                seq,
                meta,
                factored,
            } => {
                let slots = self.n_frames + if factored { self.n_shared } else { 0 };
                self.samples.insert(
                    seq,
                    PendingSample {
                        meta: Some(meta),
                        factored,
                        shard: None,
                        entries: vec![None; slots],
                        received: 0,
                        ended: false,
                    },
                );
            }
            AppMsg::Frame {
                seq,
                frame,
                bytes,
                raw_len,
                checksum,
                charge,
            } => {
                let shard_no = match self.samples.get(&seq).and_then(|s| s.shard) {
                    Some(no) => no,
                    None => {
                        let no = self.shard_for_new_sample()?;
                        self.shards.get_mut(&no).expect("open shard").live += 1;
                        self.samples.get_mut(&seq).expect("begun sample").shard = Some(no);
                        no
                    }
                };
                let t = Instant::now();
                let frame_len = bytes.len() as u32;
                let sh = self.shards.get_mut(&shard_no).expect("open shard");
                let offset = sh.len;
                write_shard(&mut sh.file, &bytes, &sh.path)?;
                sh.len += bytes.len() as u64;
                sh.dirty = true;
                self.stats.io += t.elapsed();
                self.stats.frames += 1;
                self.stats.raw += raw_len as u64;
                self.stats.stored += bytes.len() as u64;
                self.live
                    .raw_bytes
                    .fetch_add(raw_len as u64, std::sync::atomic::Ordering::Relaxed);
                self.live
                    .stored_bytes
                    .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                drop(bytes);
                self.budget.release(charge);
                let s = self.samples.get_mut(&seq).expect("begun sample");
                s.entries[frame] = Some(TableEntry {
                    offset,
                    frame_len,
                    raw_len,
                    checksum,
                });
                s.received += 1;
                self.maybe_complete(seq)?;
            }
            AppMsg::End { seq } => {
                self.samples.get_mut(&seq).expect("begun sample").ended = true;
                self.maybe_complete(seq)?;
            }
        }
        Ok(())
    }

    fn shard_for_new_sample(&mut self) -> Result<u32> {
        if let Some(no) = self.current {
            let sh = &self.shards[&no];
            if sh.len < self.target {
                return Ok(no);
            }
            // Roll over: the old shard is sealed once its last sample commits.
            self.current = None;
            if sh.live == 0 {
                self.seal(no)?;
            }
        }
        let no = self.next_shard;
        self.next_shard += 1;
        let path = shard_path(&self.dir, no);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        file.write_all(&ShardHeader::with_version(self.version, no, self.store_id).encode())
            .at(&path)?;
        file.sync_all().at(&path)?;
        sync_dir(&shards_dir(&self.dir))?;
        self.shards.insert(
            no,
            OpenShard {
                file,
                path,
                len: SHARD_HEADER_LEN as u64,
                live: 0,
                tables: Vec::new(),
                dirty: false,
            },
        );
        self.current = Some(no);
        Ok(no)
    }

    fn maybe_complete(&mut self, seq: u64) -> Result<()> {
        let s = &self.samples[&seq];
        if !(s.ended && s.received == s.entries.len()) {
            return Ok(());
        }
        let mut s = self.samples.remove(&seq).expect("present");
        let entries: Vec<TableEntry> = s
            .entries
            .iter()
            .map(|e| e.expect("all frames received"))
            .collect();
        let (frames, shared) = entries.split_at(self.n_frames);
        debug_assert_eq!(shared.is_empty(), !s.factored);
        let table = encode_sample_table(seq, frames, shared);
        let shard_no = s.shard.expect("assigned on first frame");
        let sh = self.shards.get_mut(&shard_no).expect("open shard");
        let t = Instant::now();
        let table_offset = sh.len;
        let meta = s.meta.take().expect("meta");
        let rec = LogRecord {
            seq,
            shard: shard_no,
            table_offset,
            table_len: table.len() as u32,
            tokens: meta.tokens,
            loss_sum: meta.loss_sum,
            task: meta.task,
            id: meta.id,
        };
        // The table, then a copy of the sample's log record (docs/format.md): the
        // shard then says by itself which sample each sealed table is, so `salvage`
        // can re-admit samples whose records a damaged log lost.
        let mut bytes = table;
        bytes.extend(encode_log_record(&rec));
        write_shard(&mut sh.file, &bytes, &sh.path)?;
        sh.len += bytes.len() as u64;
        self.stats.io += t.elapsed();
        self.ready.push(rec);
        Ok(())
    }

    /// Makes every ready sample durable: fsync its shard, append its log record, fsync the log.
    fn commit(&mut self) -> Result<()> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        for sh in self.shards.values_mut().filter(|s| s.dirty) {
            sh.file.sync_data().at(&sh.path)?;
            sh.dirty = false;
        }
        let mut buf = Vec::new();
        for r in &self.ready {
            buf.extend(encode_log_record(r));
        }
        let lp = log_path(&self.dir);
        self.log.write_all(&buf).at(&lp)?;
        self.log.sync_data().at(&lp)?;
        self.stats.io += t.elapsed();
        let ready = std::mem::take(&mut self.ready);
        let mut to_seal = Vec::new();
        for r in ready {
            let sh = self.shards.get_mut(&r.shard).expect("open shard");
            sh.tables.push((r.table_offset, r.table_len));
            sh.live -= 1;
            if sh.live == 0 && self.current != Some(r.shard) {
                to_seal.push(r.shard);
            }
            self.stats.samples += 1;
            self.live
                .committed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        for no in to_seal {
            self.seal(no)?;
        }
        Ok(())
    }

    fn seal(&mut self, no: u32) -> Result<()> {
        let Some(mut sh) = self.shards.remove(&no) else {
            return Ok(());
        };
        if self.current == Some(no) {
            self.current = None;
        }
        let footer = encode_footer(sh.len, &sh.tables);
        sh.file.write_all(&footer).at(&sh.path)?;
        sh.file.sync_all().at(&sh.path)?;
        Ok(())
    }
}

/// Length of the copy of `rec` that follows its sample table at `table_end` in a
/// shard's bytes, if a whole, matching copy is there.
pub(crate) fn record_copy_len(data: &[u8], table_end: u64, rec: &LogRecord) -> Option<usize> {
    let at = usize::try_from(table_end).ok()?;
    let (copy, n) = gradshard_format::decode_log_record(data.get(at..)?).ok()?;
    (copy == *rec).then_some(n)
}

/// Appends bytes to a shard. Unit tests can make it fail as a full disk does.
fn write_shard(file: &mut File, bytes: &[u8], path: &Path) -> Result<()> {
    #[cfg(test)]
    if fault::disk_full(path, bytes.len()) {
        return Err(std::io::Error::from_raw_os_error(28)).at(path);
    }
    file.write_all(bytes).at(path)
}

/// Test-only fault injection: a byte allowance per store directory, after which shard
/// writes fail with ENOSPC.
#[cfg(test)]
mod fault {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static ALLOWANCE: Mutex<Option<HashMap<PathBuf, u64>>> = Mutex::new(None);

    pub fn set(store: &Path, bytes: u64) {
        let mut m = ALLOWANCE.lock().unwrap();
        m.get_or_insert_with(HashMap::new)
            .insert(store.to_path_buf(), bytes);
    }

    pub fn disk_full(shard: &Path, n: usize) -> bool {
        let Some(store) = shard.parent().and_then(Path::parent) else {
            return false;
        };
        let mut m = ALLOWANCE.lock().unwrap();
        match m.as_mut().and_then(|m| m.get_mut(store)) {
            Some(left) if *left < n as u64 => true,
            Some(left) => {
                *left -= n as u64;
                false
            }
            None => false,
        }
    }
}

/// Crash recovery at writer open: reads the log (cutting a torn tail), truncates each
/// unsealed shard to the end of its last committed sample table and seals it.
/// Returns the committed records and the next free shard number.
fn recover(dir: &Path, manifest: &Manifest) -> Result<(Vec<LogRecord>, u32)> {
    let lp = log_path(dir);
    let bytes = std::fs::read(&lp).at(&lp)?;
    let scan = decode_log(&bytes).at(&lp)?;
    if scan.torn_tail > 0 {
        let f = OpenOptions::new().write(true).open(&lp).at(&lp)?;
        f.set_len(scan.valid_len).at(&lp)?;
        f.sync_all().at(&lp)?;
    }
    let store_id = manifest.store_id_bytes()?;
    let mut next = 0u32;
    let sd = shards_dir(dir);
    let mut entries: Vec<_> = std::fs::read_dir(&sd)
        .at(&sd)?
        .collect::<std::io::Result<Vec<_>>>()
        .at(&sd)?;
    entries.sort_by_key(|e| e.file_name());
    // Every shard mapped and its header and footer asked of the kernel at once before
    // they are parsed one by one (see `advise_shard_ends`); a shard that does not map
    // is reported in its turn below.
    let shards: Vec<(u32, PathBuf, Result<memmap2::Mmap>)> = entries
        .iter()
        .filter_map(|e| {
            let no = crate::parse_shard_name(&e.file_name().to_string_lossy())?;
            let path = e.path();
            let data = crate::map_file(&path);
            if let Ok(m) = &data {
                crate::advise_shard_ends(m);
            }
            Some((no, path, data))
        })
        .collect();
    for (no, path, data) in shards {
        next = next.max(no + 1);
        // Mapped, not read: only the header and the footer pages are touched.
        let data = data?;
        let header = ShardHeader::parse(&data).at(&path);
        let tables: Vec<(u64, u32)> = scan
            .records
            .iter()
            .filter(|r| r.shard == no)
            .map(|r| (r.table_offset, r.table_len))
            .collect();
        match header {
            Ok(h) if h.store_id == store_id && h.shard_no == no => {}
            Ok(_) => {
                return Err(Error::Format {
                    path,
                    source: Box::new(gradshard_format::Error::Invalid {
                        what: "shard header",
                        detail:
                            "store id or shard number does not match the manifest and file name"
                                .into(),
                    }),
                })
            }
            Err(_) if tables.is_empty() => {
                // A shard whose header never became durable (a crash while it was created) holds nothing committed.
                std::fs::remove_file(&path).at(&path)?;
                continue;
            }
            Err(err) => return Err(err),
        }
        if parse_footer(&data).at(&path)?.is_some() {
            continue;
        }
        // The end of the last committed table, and of the record copy after it when
        // that copy is whole (older writers wrote none).
        let end = scan
            .records
            .iter()
            .filter(|r| r.shard == no)
            .map(|r| {
                let t = r.table_offset + r.table_len as u64;
                t + record_copy_len(&data, t, r).unwrap_or(0) as u64
            })
            .max()
            .unwrap_or(SHARD_HEADER_LEN as u64);
        if end > data.len() as u64 {
            return Err(Error::Format {
                path,
                source: Box::new(gradshard_format::Error::Truncated {
                    what: "shard (a committed sample table lies past the end of the file)",
                    need: end,
                    have: data.len() as u64,
                }),
            });
        }
        // Unmap before truncating: no access may reach past the new end.
        drop(data);
        let mut f = OpenOptions::new().write(true).open(&path).at(&path)?;
        f.set_len(end).at(&path)?;
        f.seek(SeekFrom::End(0)).at(&path)?;
        f.write_all(&encode_footer(end, &tables)).at(&path)?;
        f.sync_all().at(&path)?;
    }
    Ok((scan.records, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::CodecSpec;
    use gradshard_core::Block;

    fn spec() -> StoreSpec {
        let cfg = serde_json::json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
            "num_attention_heads":4,"num_key_value_heads":2});
        StoreSpec {
            geometry: gradshard_core::ModelShape::geometry_of(&cfg).unwrap(),
            dtype: DType::F32,
            codec: CodecSpec::DEFAULT,
            blocks: Block::ALL.to_vec(),
            other_tensors: Vec::new(),
        }
    }

    /// Writes samples until the injected full disk stops the writer; returns its error.
    fn write_until_full(dir: &Path, allowance: u64, workers: usize) -> String {
        let spec = spec();
        fault::set(dir, allowance);
        let opts = WriterOptions {
            workers,
            memory_budget: 1 << 20,
            ..Default::default()
        };
        let mut w = StoreWriter::open_or_create(dir, &spec, opts).unwrap();
        let order = w.order().clone();
        let mut err = None;
        'samples: for i in 0..200i64 {
            let meta = SampleMeta {
                task: TaskName::new("t").unwrap(),
                id: SampleId::Int(i),
                tokens: 3,
                loss_sum: 1.0,
            };
            let mut h = match w.begin_sample(meta) {
                Ok(h) => h,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            };
            for f in 0..order.n_frames() {
                let n = order.frame_numel(f).unwrap();
                let v: Vec<f32> = (0..n).map(|k| ((k * 7 + f) as f32).sin()).collect();
                if let Err(e) = w.put_frame(&mut h, f, v) {
                    err = Some(e);
                    break 'samples;
                }
            }
            if let Err(e) = w.end_sample(h) {
                err = Some(e);
                break;
            }
        }
        let fin = w.finish();
        err.map(|e| e.to_string())
            .or_else(|| fin.err().map(|e| e.to_string()))
            .expect("the full disk stopped the writer")
    }

    #[test]
    fn a_full_disk_is_reported_as_such_never_as_a_thread_exit() {
        for round in 0..12u64 {
            let dir = tempfile::tempdir().unwrap();
            let store = dir.path().join("s");
            std::fs::create_dir_all(&store).unwrap();
            let store = store.canonicalize().unwrap();
            let msg = write_until_full(&store, 40_000 + round * 9_973, 1 + (round % 3) as usize);
            assert!(
                msg.contains("No space left on device") && msg.contains("shard-"),
                "round {round}: {msg}"
            );
            assert!(!msg.contains("thread exited"), "round {round}: {msg}");
            // What committed is intact.
            let rep = crate::verify(&store, &|_, _| {}).unwrap();
            assert!(rep.ok(), "round {round}: {:?}", rep.problems);
        }
    }
}
