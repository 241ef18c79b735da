//! Read-only access to a store: shard headers, sample tables and footers through
//! memory maps, frames with positioned reads (`pread`) into reused per-thread buffers.
//! Every frame read verifies its checksum; corruption is reported with task, sample,
//! slice and file.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gradshard_core::{Block, DType, SampleId, TaskName};
use gradshard_format::{
    decode_log, decode_payload_bf16_planes, decode_payload_f32, verify_frame, FrameKind, LogRecord,
    TableEntry,
};
use gradshard_index::{FrameOrder, Index, PlannedRead, ReadPlan};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifest;
use crate::{log_path, shard_path};

/// One thread's frame buffers: the stored bytes of a frame (read with `pread`, one copy
/// out of the page cache) and its zstd-decompressed bytes. Frames are read into these
/// instead of being mapped: nothing of a shard's frames is mapped, so a pass over a store
/// larger than RAM keeps its resident set bounded without releasing pages per frame
/// (which cost a page fault per page on every warm read and a TLB shootdown per frame).
#[derive(Default)]
struct FrameBufs {
    stored: Vec<u8>,
    raw: Vec<u8>,
}

/// Buffers above this size are not kept for the next frame (a row group of a large
/// non-attention tensor, or a corrupt length): bounded memory per thread.
const KEEP_BUF_BYTES: usize = 64 << 20;

thread_local! {
    static FRAME_BUFS: RefCell<FrameBufs> = RefCell::new(FrameBufs::default());
}

/// Runs `f` with this thread's frame buffers (fresh ones if a caller up the stack holds them).
fn with_frame_bufs<T>(f: impl FnOnce(&mut FrameBufs) -> T) -> T {
    let mut b = FRAME_BUFS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let r = f(&mut b);
    for v in [&mut b.stored, &mut b.raw] {
        if v.capacity() > KEEP_BUF_BYTES {
            *v = Vec::new();
        }
    }
    FRAME_BUFS.with(|c| *c.borrow_mut() = b);
    r
}

/// Where a frame's decoded values go: a growable vector (factors) or a tile row of
/// exactly the frame's length (full frames, decoded in place).
enum Dest<'o> {
    Vec(&'o mut Vec<f32>),
    Slice(&'o mut [f32]),
    /// bf16 values as their two byte planes (`Store::read_tile_bf16_planes`).
    Planes(&'o mut [u8]),
}

/// I/O counters, for tests and benchmarks ("reading one slice performs one frame read").
#[derive(Debug, Default)]
pub struct IoStats {
    /// Frames verified and decoded (full frames, factors P, shared factors S).
    pub frames_read: AtomicU64,
    pub frame_bytes: AtomicU64,
    pub table_lookups: AtomicU64,
    /// Shared factors decoded (also counted in `frames_read`).
    pub shared_decoded: AtomicU64,
    /// Shared factors served from the decoded-factor cache (no read, no decode).
    pub shared_hits: AtomicU64,
}

impl IoStats {
    pub fn frames(&self) -> u64 {
        self.frames_read.load(Ordering::Relaxed)
    }
    pub fn bytes(&self) -> u64 {
        self.frame_bytes.load(Ordering::Relaxed)
    }
    pub fn shared_decoded(&self) -> u64 {
        self.shared_decoded.load(Ordering::Relaxed)
    }
    pub fn shared_hits(&self) -> u64 {
        self.shared_hits.load(Ordering::Relaxed)
    }
    pub fn reset(&self) {
        for c in [
            &self.frames_read,
            &self.frame_bytes,
            &self.table_lookups,
            &self.shared_decoded,
            &self.shared_hits,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// What one sample occupies (see [`Store::footprint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub factored: bool,
    /// Frame bytes in the shard (headers + compressed payloads).
    pub stored_bytes: u64,
    /// Decoded bytes of those frames (factors count their own size).
    pub raw_bytes: u64,
}

/// A decoded factor: `rows × (values.len() / rows)` f32, position-major.
#[derive(Debug, Clone)]
pub struct Factor {
    pub rows: usize,
    pub values: Arc<Vec<f32>>,
}

/// One slice of one sample as factors: the slice is `pᵀ s` (`p` is `n × r`, `s` is
/// `n × c`). A sample stored as full slices is given as `p = I_r` (n = r) and `s` = the
/// slice itself, so every sample of a tile has this one form.
#[derive(Debug, Clone)]
pub struct SliceFactors {
    pub n: usize,
    pub p: Vec<f32>,
    pub s: Arc<Vec<f32>>,
}

/// The slice (layer, block, head) of several samples as factors, for a compute backend
/// that reconstructs on its device: `r × c` is the slice shape (`d × D`).
#[derive(Debug, Clone)]
pub struct FactorTile {
    pub r: usize,
    pub c: usize,
    pub samples: Vec<SliceFactors>,
}

impl FactorTile {
    /// f32 values the tile holds (what a device upload moves).
    pub fn values(&self) -> usize {
        self.samples.iter().map(|f| f.p.len() + f.s.len()).sum()
    }
}

/// Decoded shared factors, least recently used evicted past a byte budget: the Q, K and
/// V slices of one layer (and the O slices) of a sample all need the same S, so a pass
/// over a layer's slices decodes each sample's S once when the budget holds them.
struct SharedCache {
    cap: u64,
    used: u64,
    tick: u64,
    map: HashMap<(u32, u64), (Factor, u64)>,
}

impl SharedCache {
    fn get(&mut self, key: (u32, u64)) -> Option<Factor> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(&key).map(|(f, last)| {
            *last = t;
            f.clone()
        })
    }

    fn put(&mut self, key: (u32, u64), f: Factor) {
        let size = f.values.len() as u64 * 4;
        if size > self.cap {
            return;
        }
        while self.used + size > self.cap {
            let Some((&k, _)) = self.map.iter().min_by_key(|(_, (_, last))| *last) else {
                break;
            };
            let (old, _) = self.map.remove(&k).expect("present");
            self.used -= old.values.len() as u64 * 4;
        }
        self.tick += 1;
        if self.map.insert(key, (f, self.tick)).is_none() {
            self.used += size;
        }
    }
}

/// An open store (read-only). Sees the samples committed when it was opened.
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    order: FrameOrder,
    index: Index,
    shards: HashMap<u32, Mmap>,
    /// The same shard files, for positioned frame reads.
    files: HashMap<u32, File>,
    stats: IoStats,
    shared_cache: Mutex<SharedCache>,
    any_factored: std::sync::OnceLock<bool>,
    /// Whether every sample table has been advised ([`Store::prefetch_tables`]).
    tables_advised: std::sync::atomic::AtomicBool,
    /// Bytes of a torn log tail (a crashed writer; the next writer cuts it).
    pub torn_log_tail: u64,
}

/// A mapped shard must be this store's shard `no` (a shard copied from another store
/// of the same layout would otherwise be read without a word).
fn check_shard_identity(path: &Path, m: &Mmap, no: u32, store_id: &[u8; 16]) -> Result<()> {
    let h = gradshard_format::ShardHeader::parse(m).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    if h.store_id != *store_id || h.shard_no != no {
        return Err(Error::Input {
            path: path.to_path_buf(),
            what: if h.store_id != *store_id {
                "belongs to another store (its store id differs from manifest.json's); it was copied or moved here".into()
            } else {
                format!("header says shard {}, the file name {no}", h.shard_no)
            },
        });
    }
    Ok(())
}

/// Every sample table that a sealed shard's footer lists must be in the commit log: a
/// log cut short (truncated by hand, or a lost tail) would otherwise hide committed
/// samples without a word. A writer appends records before it seals, so a table
/// missing from the log read at open is looked for again in a fresh read of the log
/// before it is reported.
fn check_log_complete(
    dir: &Path,
    log: &Path,
    records: &[LogRecord],
    store_id: &[u8; 16],
) -> Result<()> {
    // The footers are read once; a table missing from the log read at open is looked
    // for again in a fresh read of the log, against these same footers (a shard sealed
    // after that fresh read must not be compared with it).
    let mut footers: Vec<(u32, Vec<u64>)> = Vec::new();
    let sd = crate::shards_dir(dir);
    let mut maps = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&sd) {
        for e in entries.flatten() {
            let Some(no) = crate::parse_shard_name(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let Ok(m) = crate::map_file(&e.path()) else {
                continue;
            };
            // Headers and footers are fetched together (see `open_unfinished`).
            crate::advise_shard_ends(&m);
            maps.push((no, m));
        }
    }
    for (no, m) in maps {
        // Only this store's sealed shards say what was committed.
        match gradshard_format::ShardHeader::parse(&m) {
            Ok(h) if h.store_id == *store_id && h.shard_no == no => {}
            _ => continue,
        }
        if let Ok(Some(f)) = gradshard_format::parse_footer(&m) {
            footers.push((no, f.tables.iter().map(|t| t.0).collect()));
        }
    }
    let missing = |records: &[LogRecord]| -> Vec<(u32, usize)> {
        let logged: std::collections::HashSet<(u32, u64)> =
            records.iter().map(|r| (r.shard, r.table_offset)).collect();
        footers
            .iter()
            .map(|(no, tables)| {
                let lost = tables
                    .iter()
                    .filter(|off| !logged.contains(&(*no, **off)))
                    .count();
                (*no, lost)
            })
            .filter(|(_, lost)| *lost > 0)
            .collect()
    };
    if missing(records).is_empty() {
        return Ok(());
    }
    let bytes = std::fs::read(log).at(log)?;
    let fresh = decode_log(&bytes).at(log)?;
    let mut lost = missing(&fresh.records);
    lost.sort_unstable();
    if lost.is_empty() {
        return Ok(());
    }
    let n: usize = lost.iter().map(|l| l.1).sum();
    let shards: Vec<String> = lost
        .iter()
        .map(|(no, k)| format!("{} ({k})", shard_path(dir, *no).display()))
        .collect();
    Err(Error::Input {
        path: log.to_path_buf(),
        what: format!(
            "the commit log lacks {n} committed sample(s) that sealed shards list in their footers: {}; the log was cut short, so reading on would silently use fewer samples. `gradshard salvage --store {}` re-admits them from the shards (or restore samples.log)",
            shards.join(", "),
            dir.display()
        ),
    })
}

/// Default byte budget of the decoded shared-factor cache.
pub const DEFAULT_SHARED_CACHE_BYTES: u64 = 1 << 30;

impl Store {
    /// Opens a store for reading. A store marked unfinished (see [`crate::UNFINISHED_FILE`])
    /// is refused: it verifies and reads, but lacks samples its maker still had to add.
    pub fn open(dir: &Path) -> Result<Store> {
        if let Some(why) = crate::unfinished(dir) {
            return Err(Error::Input {
                path: crate::unfinished_path(dir),
                what: format!("this store is unfinished and must not be read: {why}"),
            });
        }
        Self::open_unfinished(dir)
    }

    /// Opens a store even if it is marked unfinished (for the tool finishing it).
    pub fn open_unfinished(dir: &Path) -> Result<Store> {
        if !dir.is_dir() {
            return Err(Error::Input {
                path: dir.to_path_buf(),
                what: "no such store directory".into(),
            });
        }
        let manifest = Manifest::load(dir)?;
        let order = manifest.spec.frame_order();
        let lp = log_path(dir);
        let bytes = std::fs::read(&lp).at(&lp)?;
        let scan = decode_log(&bytes).at(&lp)?;
        let mut shards = HashMap::new();
        let mut files = HashMap::new();
        let store_id = manifest.store_id_bytes()?;
        // Every shard mapped and its header and footer advised first, then checked:
        // on a cold page cache each shard's header is otherwise one page fault taken
        // after the other (300 shards: 1.3-1.9 s before anything is read).
        for r in &scan.records {
            if let std::collections::hash_map::Entry::Vacant(e) = shards.entry(r.shard) {
                let path = shard_path(dir, r.shard);
                let m = crate::map_file(&path)?;
                crate::advise_shard_ends(&m);
                e.insert(m);
                files.insert(r.shard, File::open(&path).at(&path)?);
            }
        }
        let mut nos: Vec<u32> = shards.keys().copied().collect();
        nos.sort_unstable();
        for no in nos {
            check_shard_identity(&shard_path(dir, no), &shards[&no], no, &store_id)?;
        }
        check_log_complete(dir, &lp, &scan.records, &store_id)?;
        let index = Index::from_records(scan.records)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            order,
            index,
            shards,
            files,
            stats: IoStats::default(),
            shared_cache: Mutex::new(SharedCache {
                cap: DEFAULT_SHARED_CACHE_BYTES,
                used: 0,
                tick: 0,
                map: HashMap::new(),
            }),
            any_factored: std::sync::OnceLock::new(),
            tables_advised: std::sync::atomic::AtomicBool::new(false),
            torn_log_tail: scan.torn_tail,
        })
    }

    /// Sets the byte budget of the decoded shared-factor cache (0 disables it) and empties it.
    pub fn set_shared_cache_bytes(&self, bytes: u64) {
        let mut c = self.shared_cache.lock().expect("cache lock");
        c.cap = bytes;
        c.used = 0;
        c.map.clear();
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn order(&self) -> &FrameOrder {
        &self.order
    }
    pub fn index(&self) -> &Index {
        &self.index
    }
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// Bytes of every shard file mapped by this reader.
    pub fn shard_bytes(&self) -> u64 {
        self.shards.values().map(|m| m.len() as u64).sum()
    }

    /// Samples of a task in id order.
    pub fn samples(&self, task: &str) -> Result<&[LogRecord]> {
        Ok(self.index.samples(task)?)
    }

    /// The record of (task, id).
    pub fn sample(&self, task: &str, id: &SampleId) -> Result<&LogRecord> {
        let recs = self.samples(task)?;
        let t = &recs.first().expect("a listed task has samples").task;
        let pos =
            self.index
                .position(t, id)
                .ok_or_else(|| gradshard_index::Error::UnknownSample {
                    task: t.clone(),
                    id: id.clone(),
                })?;
        Ok(&recs[pos])
    }

    fn shard(&self, r: &LogRecord) -> Result<&Mmap> {
        self.shards.get(&r.shard).ok_or_else(|| Error::Input {
            path: shard_path(&self.dir, r.shard),
            what: "shard file is not mapped".into(),
        })
    }

    fn past_end(&self, r: &LogRecord, what: &str, end: u64, len: usize) -> Error {
        Error::Corrupt {
            path: shard_path(&self.dir, r.shard),
            task: r.task.clone(),
            id: r.id.clone(),
            slice: what.to_string(),
            source: Box::new(gradshard_format::Error::Truncated {
                what: "index entry past end of file",
                need: end,
                have: len as u64,
            }),
        }
    }

    /// The bytes of a sample's table (bounds-checked against the shard file).
    pub fn table_bytes(&self, r: &LogRecord) -> Result<&[u8]> {
        let m = self.shard(r)?;
        let end = r.table_offset.saturating_add(r.table_len as u64);
        if end > m.len() as u64 {
            return Err(self.past_end(r, "sample table", end, m.len()));
        }
        self.stats.table_lookups.fetch_add(1, Ordering::Relaxed);
        Ok(&m[r.table_offset as usize..end as usize])
    }

    /// Asks the kernel to start reading every sample table now (`madvise(WILLNEED)` on
    /// their mapped ranges), once per store. A table lies after its sample's frames, so
    /// on a cold page cache the tables of a store are as many scattered reads, and
    /// parsing them one after another waits for each in turn (24 tables of an 8.5 GB
    /// store: 0.2 s of page faults before the first slice); advised together, they are
    /// read from the disk at once. Advice only: a failing `madvise` changes nothing
    /// but speed, so its error is not reported.
    pub fn prefetch_tables(&self) {
        if self.tables_advised.swap(true, Ordering::Relaxed) {
            return;
        }
        self.advise_tables(self.index.records());
    }

    /// `madvise(WILLNEED)` on the tables of `records` that lie inside their shards.
    fn advise_tables<'r>(&self, records: impl Iterator<Item = &'r LogRecord>) {
        for r in records {
            if let Some(m) = self.shards.get(&r.shard) {
                let end = r.table_offset.saturating_add(r.table_len as u64);
                if end <= m.len() as u64 {
                    let _ = m.advise_range(
                        memmap2::Advice::WillNeed,
                        r.table_offset as usize,
                        r.table_len as usize,
                    );
                }
            }
        }
    }

    /// Plans reading `frames` of `samples` (records of one task).
    pub fn plan(&self, samples: &[&LogRecord], frames: &[usize]) -> Result<ReadPlan> {
        // The tables this plan parses, advised together (unless the whole store's were).
        if !self.tables_advised.load(Ordering::Relaxed) {
            self.advise_tables(samples.iter().copied());
        }
        let plan = ReadPlan::for_frames(&self.order, samples, frames, |r| {
            self.table_bytes(r)
                .map_err(|e| gradshard_index::Error::NoSuchFrame {
                    what: "sample table",
                    detail: e.to_string(),
                })
        })?;
        if self.manifest.format_version < 2 {
            if let Some(p) = plan.reads.iter().find(|p| p.shared.is_some()) {
                let r = samples
                    .iter()
                    .find(|r| r.shard == p.shard)
                    .expect("a planned sample");
                return Err(self.table_error(
                    r,
                    gradshard_format::Error::Invalid {
                        what: "sample table",
                        detail: format!(
                            "lists shared factors, which format version {} does not have",
                            self.manifest.format_version
                        ),
                    },
                ));
            }
        }
        Ok(plan)
    }

    /// Reads, verifies and decodes one frame into `out` as f32 (a vector is resized to
    /// the frame; a slice must be its length). `what` names it in errors; the frame must
    /// be of `kind`, and hold `width`-wide rows (a factor: `rows × width`, the header's n)
    /// or exactly `width` values (a full frame). The bytes come from one `pread` into this
    /// thread's buffer; header and checksum are verified before anything is decoded.
    /// Returns the factor's row count (0 for a full frame).
    fn decode_entry(
        &self,
        r: &LogRecord,
        what: &dyn Fn() -> String,
        entry: TableEntry,
        kind: FrameKind,
        width: usize,
        out: Dest<'_>,
    ) -> Result<usize> {
        let m = self.shard(r)?;
        let end = entry.offset.saturating_add(entry.frame_len as u64);
        if end > m.len() as u64 {
            return Err(self.past_end(r, &what(), end, m.len()));
        }
        let file = self.files.get(&r.shard).ok_or_else(|| Error::Input {
            path: shard_path(&self.dir, r.shard),
            what: "shard file is not open".into(),
        })?;
        self.stats.frames_read.fetch_add(1, Ordering::Relaxed);
        self.stats
            .frame_bytes
            .fetch_add(entry.frame_len as u64, Ordering::Relaxed);
        let corrupt = |source| Error::Corrupt {
            path: shard_path(&self.dir, r.shard),
            task: r.task.clone(),
            id: r.id.clone(),
            slice: format!("{} (at offset {})", what(), entry.offset),
            source: Box::new(source),
        };
        let dtype = self.manifest.spec.dtype;
        with_frame_bufs(|bufs| {
            // Grown (zero-filled) only when a frame is longer than any before: pread
            // overwrites the bytes it reads, so refilling them with zeros per frame was
            // pure memset (2 % of a score pass).
            let len = entry.frame_len as usize;
            if bufs.stored.len() < len {
                bufs.stored.resize(len, 0);
            }
            let stored = &mut bufs.stored[..len];
            file.read_exact_at(stored, entry.offset)
                .at(&shard_path(&self.dir, r.shard))?;
            let (h, payload) = verify_frame(stored, Some(entry.checksum)).map_err(corrupt)?;
            let rows = h.rows as usize;
            let want = match kind {
                FrameKind::Full => width * dtype.size(),
                _ => rows * width * dtype.size(),
            };
            if h.kind != kind
                || h.raw_len as usize != want
                || h.raw_len != entry.raw_len
                || h.dtype != dtype
            {
                return Err(corrupt(gradshard_format::Error::Invalid {
                    what: "frame",
                    detail: format!(
                        "{} of {} bytes of {}, expected a {kind} of {want} bytes of {dtype}",
                        h.kind, h.raw_len, h.dtype
                    ),
                }));
            }
            let n = want / dtype.size();
            let dst: &mut [f32] = match out {
                Dest::Vec(v) => {
                    v.clear();
                    v.resize(n, 0.0);
                    v
                }
                Dest::Slice(s) => s,
                Dest::Planes(p) => {
                    decode_payload_bf16_planes(&h, payload, &mut bufs.raw, p).map_err(corrupt)?;
                    return Ok(rows);
                }
            };
            decode_payload_f32(&h, payload, &mut bufs.raw, dst).map_err(corrupt)?;
            Ok(rows)
        })
    }

    /// A shared factor of a sample, from the cache or decoded (and cached).
    fn shared_factor(&self, r: &LogRecord, j: usize, entry: TableEntry) -> Result<Factor> {
        let key = (r.shard, entry.offset);
        if let Some(f) = self.shared_cache.lock().expect("cache lock").get(key) {
            self.stats.shared_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(f);
        }
        let cols = self.order.shared()[j].cols;
        let mut vals = Vec::new();
        let rows = self.decode_entry(
            r,
            &|| self.order.describe_shared(j),
            entry,
            FrameKind::Shared,
            cols,
            Dest::Vec(&mut vals),
        )?;
        self.stats.shared_decoded.fetch_add(1, Ordering::Relaxed);
        let f = Factor {
            rows,
            values: Arc::new(vals),
        };
        self.shared_cache
            .lock()
            .expect("cache lock")
            .put(key, f.clone());
        Ok(f)
    }

    /// The factors of one planned frame of a factored sample: (P, S).
    fn planned_factors(&self, r: &LogRecord, p: &PlannedRead) -> Result<(Factor, Factor)> {
        let (j, se) = p.shared.expect("a factored read");
        let (_, width, _) = self.order.factor_of(p.frame).expect("planned frame");
        let what = || format!("{} (factor P)", self.order.describe(p.frame));
        let mut pv = Vec::new();
        let n = self.decode_entry(
            r,
            &what,
            p.entry,
            FrameKind::Factor,
            width,
            Dest::Vec(&mut pv),
        )?;
        let s = self.shared_factor(r, j, se)?;
        if s.rows != n {
            return Err(Error::Corrupt {
                path: shard_path(&self.dir, r.shard),
                task: r.task.clone(),
                id: r.id.clone(),
                slice: what(),
                source: Box::new(gradshard_format::Error::Invalid {
                    what: "factor rows",
                    detail: format!(
                        "P has {n} rows, its {} has {}",
                        self.order.describe_shared(j),
                        s.rows
                    ),
                }),
            });
        }
        Ok((
            Factor {
                rows: n,
                values: Arc::new(pv),
            },
            s,
        ))
    }

    /// Reads one planned frame as f32 values into `out` (`frame_numel` long), decoding
    /// a full frame in place or reconstructing Pᵀ S for a factored sample.
    fn read_planned(&self, r: &LogRecord, p: &PlannedRead, out: &mut [f32]) -> Result<()> {
        let numel = self.order.frame_numel(p.frame).expect("planned frame");
        if out.len() != numel {
            return Err(Error::Invalid(format!(
                "frame buffer holds {} values, frame {} has {numel}",
                out.len(),
                p.frame
            )));
        }
        if p.shared.is_none() {
            let what = || format!("{} (frame {})", self.order.describe(p.frame), p.frame);
            self.decode_entry(r, &what, p.entry, FrameKind::Full, numel, Dest::Slice(out))?;
            return Ok(());
        }
        let (pf, sf) = self.planned_factors(r, p)?;
        let (_, rr, c) = self.order.factor_of(p.frame).expect("planned frame");
        gradshard_core::factor::pt_s(&pf.values, &sf.values, pf.rows, rr, c, out);
        Ok(())
    }

    /// One frame of one sample, as f32 (reconstructed from its factors when factored).
    pub fn read_frame(&self, r: &LogRecord, frame: usize) -> Result<Vec<f32>> {
        let plan = self.plan(&[r], &[frame])?;
        let numel = self.order.frame_numel(frame).unwrap_or(0);
        let mut out = vec![0f32; numel];
        self.read_planned(r, &plan.reads[0], &mut out)?;
        Ok(out)
    }

    /// The factors of frame `frame` of a factored sample: (shared-factor index j, P, S);
    /// an error for a sample stored as full slices.
    pub fn read_frame_factors(
        &self,
        r: &LogRecord,
        frame: usize,
    ) -> Result<(usize, Factor, Factor)> {
        let plan = self.plan(&[r], &[frame])?;
        let p = &plan.reads[0];
        let Some((j, _)) = p.shared else {
            return Err(Error::Invalid(format!(
                "task `{}` sample {} is stored as full slices, not factors",
                r.task, r.id
            )));
        };
        let (pf, sf) = self.planned_factors(r, p)?;
        Ok((j, pf, sf))
    }

    /// How a sample is stored: representation, bytes of its frames in the shard and
    /// their decoded bytes (from its sample table; nothing is decoded).
    pub fn footprint(&self, r: &LogRecord) -> Result<Footprint> {
        let view = gradshard_format::TableView::parse_unverified(self.table_bytes(r)?)
            .map_err(|e| self.table_error(r, e))?;
        let (mut stored, mut raw) = (0u64, 0u64);
        for e in view.all_entries() {
            stored += e.frame_len as u64;
            raw += e.raw_len as u64;
        }
        Ok(Footprint {
            factored: view.is_factored(),
            stored_bytes: stored,
            raw_bytes: raw,
        })
    }

    /// Whether any committed sample is stored as factors (read from the sample tables
    /// once, then remembered).
    pub fn any_factored(&self) -> bool {
        *self.any_factored.get_or_init(|| {
            self.prefetch_tables();
            self.index
                .records()
                .any(|r| self.is_factored(r).unwrap_or(false))
        })
    }

    /// Whether a sample is stored as factors (format v2) rather than full slices.
    pub fn is_factored(&self, r: &LogRecord) -> Result<bool> {
        let view = gradshard_format::TableView::parse_unverified(self.table_bytes(r)?)
            .map_err(|e| self.table_error(r, e))?;
        Ok(view.is_factored())
    }

    fn table_error(&self, r: &LogRecord, source: gradshard_format::Error) -> Error {
        Error::Corrupt {
            path: shard_path(&self.dir, r.shard),
            task: r.task.clone(),
            id: r.id.clone(),
            slice: "sample table".into(),
            source: Box::new(source),
        }
    }

    fn attn_frame(&self, layer: usize, block: Block, head: usize) -> Result<usize> {
        self.order.attn(layer, block, head).ok_or_else(|| {
            Error::Invalid(format!(
                "store {} holds no slice layer {layer} block {block} head {head} (blocks stored: {:?}, {} layers, {} heads of {block})",
                self.dir.display(),
                self.order.blocks(),
                self.order.geometry().layers,
                self.order.geometry().heads_of(block)
            ))
        })
    }

    /// One (layer, block, head) slice of one sample, `d × D` f32 (one frame read).
    pub fn read_slice(
        &self,
        task: &str,
        id: &SampleId,
        layer: usize,
        block: Block,
        head: usize,
    ) -> Result<Vec<f32>> {
        let frame = self.attn_frame(layer, block, head)?;
        let r = self.sample(task, id)?;
        self.read_frame(r, frame)
    }

    /// A tile: slice (layer, block, head) of the samples at `positions` (into
    /// [`samples`](Self::samples) of `task`), row-major `[positions.len() × d·D]` into `out`.
    /// Frames are decoded in parallel; exactly one frame read per sample.
    pub fn read_tile(
        &self,
        task: &str,
        positions: &[usize],
        layer: usize,
        block: Block,
        head: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.tile_rows(
            task,
            positions,
            (layer, block, head),
            out,
            1,
            |r, p, row| self.read_planned(r, p, row),
        )
    }

    /// The frame of slice `(layer, block, head)` of each sample at `positions`, one
    /// `per_value · d·D`-element row of `out` each, filled by `read` in parallel (each
    /// frame decodes straight into its row).
    fn tile_rows<T: Send>(
        &self,
        task: &str,
        positions: &[usize],
        (layer, block, head): (usize, Block, usize),
        out: &mut [T],
        per_value: usize,
        read: impl Fn(&LogRecord, &PlannedRead, &mut [T]) -> Result<()> + Sync,
    ) -> Result<()> {
        let frame = self.attn_frame(layer, block, head)?;
        let chosen = self.chosen(task, positions)?;
        let numel = self.order.geometry().slice_numel();
        if out.len() != chosen.len() * per_value * numel {
            return Err(Error::Invalid(format!(
                "tile buffer holds {} elements, {} samples × {numel} values × {per_value} needed",
                out.len(),
                chosen.len()
            )));
        }
        let plan = self.plan(&chosen, &[frame])?;
        let mut reads = plan.reads;
        reads.sort_by_key(|p| p.slot);
        out.par_chunks_mut(per_value * numel)
            .zip(reads.par_iter())
            .try_for_each(|(row, p)| read(chosen[p.slot], p, row))
    }

    /// [`read_tile`](Self::read_tile) of a bf16 store with each value kept as the two
    /// bytes the frames store: row i of `out` (`2 · d·D` bytes) holds the low bytes of
    /// sample `positions[i]`'s slice, then their high bytes (see
    /// `gradshard_format::widen_bf16`). Half the bytes of the f32 tile and no per-value
    /// work for shuffled frames (zstd decompresses straight into the row). An error for
    /// an f32 store and for samples stored as factors (whose slices are f32 products);
    /// [`bf16_planes`](Self::bf16_planes) says whether every slice can be read this way.
    pub fn read_tile_bf16_planes(
        &self,
        task: &str,
        positions: &[usize],
        layer: usize,
        block: Block,
        head: usize,
        out: &mut [u8],
    ) -> Result<()> {
        if self.manifest.spec.dtype != DType::Bf16 {
            return Err(Error::Invalid(format!(
                "bf16 byte planes asked of a store of {}",
                self.manifest.spec.dtype
            )));
        }
        let numel = self.order.geometry().slice_numel();
        self.tile_rows(task, positions, (layer, block, head), out, 2, |r, p, row| {
            if p.shared.is_some() {
                return Err(Error::Invalid(format!(
                    "task `{}` sample {} is stored as factors: its slices are f32 products, not bf16 frames",
                    r.task, r.id
                )));
            }
            let what = || format!("{} (frame {})", self.order.describe(p.frame), p.frame);
            self.decode_entry(r, &what, p.entry, FrameKind::Full, numel, Dest::Planes(row))
                .map(|_| ())
        })
    }

    /// Whether [`read_tile_bf16_planes`](Self::read_tile_bf16_planes) serves every
    /// slice: a bf16 store with no factored sample.
    pub fn bf16_planes(&self) -> bool {
        self.manifest.spec.dtype == DType::Bf16 && !self.any_factored()
    }

    /// The samples at `positions` of a task (records, checked).
    fn chosen(&self, task: &str, positions: &[usize]) -> Result<Vec<&LogRecord>> {
        let recs = self.samples(task)?;
        positions
            .iter()
            .map(|p| {
                recs.get(*p).ok_or_else(|| {
                    Error::Invalid(format!(
                        "task `{task}` has {} samples, asked for #{p}",
                        recs.len()
                    ))
                })
            })
            .collect()
    }

    /// Like [`read_tile`](Self::read_tile), but as factors, for a backend that multiplies
    /// them out on its device: factored samples give their stored P and S (S decoded once
    /// per sample and layer while the shared-factor cache holds it); full samples are
    /// given as `I · slice` (see [`SliceFactors`]). Frames are decoded in parallel.
    pub fn read_factor_tile(
        &self,
        task: &str,
        positions: &[usize],
        layer: usize,
        block: Block,
        head: usize,
    ) -> Result<FactorTile> {
        let frame = self.attn_frame(layer, block, head)?;
        let chosen = self.chosen(task, positions)?;
        let plan = self.plan(&chosen, &[frame])?;
        let mut reads = plan.reads;
        reads.sort_by_key(|p| p.slot);
        let g = self.order.geometry();
        let (r, c) = (g.head_dim, g.hidden);
        let samples = reads
            .par_iter()
            .map(|p| -> Result<SliceFactors> {
                let rec = chosen[p.slot];
                if p.shared.is_some() {
                    let (pf, sf) = self.planned_factors(rec, p)?;
                    return Ok(SliceFactors {
                        n: pf.rows,
                        p: Arc::try_unwrap(pf.values).unwrap_or_else(|a| (*a).clone()),
                        s: sf.values,
                    });
                }
                let numel = self.order.frame_numel(p.frame).expect("planned frame");
                let mut vals = vec![0f32; numel];
                self.read_planned(rec, p, &mut vals)?;
                let mut eye = vec![0f32; r * r];
                for i in 0..r {
                    eye[i * r + i] = 1.0;
                }
                Ok(SliceFactors {
                    n: r,
                    p: eye,
                    s: Arc::new(vals),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FactorTile { r, c, samples })
    }

    /// Rows `[start, end)` of a non-attention tensor of one sample (reads only the row groups that hold them).
    pub fn read_rows(
        &self,
        task: &str,
        id: &SampleId,
        tensor: &str,
        start: usize,
        end: usize,
    ) -> Result<Vec<f32>> {
        let ti = self.order.other_index(tensor).ok_or_else(|| {
            Error::Invalid(format!(
                "store {} does not hold tensor `{tensor}`",
                self.dir.display()
            ))
        })?;
        let t = &self.order.others()[ti];
        let frames: Vec<usize> = self
            .order
            .other_rows(ti, start, end)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "rows {start}..{end} out of range for `{tensor}` {:?}",
                    t.shape
                ))
            })?
            .collect();
        let r = self.sample(task, id)?;
        let plan = self.plan(&[r], &frames)?;
        let cols = t.shape[1];
        let mut out = Vec::with_capacity((end - start) * cols);
        let mut vals = Vec::new();
        let mut reads = plan.reads.clone();
        reads.sort_by_key(|p| p.slot);
        for p in reads {
            let g = p.frame - self.order.other(ti, 0).expect("group 0");
            let (g0, g1) = t.group_rows(g);
            vals.resize(self.order.frame_numel(p.frame).expect("planned frame"), 0.0);
            self.read_planned(r, &p, &mut vals)?;
            let (a, b) = (start.max(g0), end.min(g1));
            out.extend_from_slice(&vals[(a - g0) * cols..(b - g0) * cols]);
        }
        Ok(out)
    }

    /// A whole stored tensor of one sample in its Hugging Face shape (attention tensors are
    /// reassembled from their head slices; blocks not stored stay NaN).
    pub fn read_tensor(
        &self,
        task: &str,
        id: &SampleId,
        name: &str,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        if let Some(ti) = self.order.other_index(name) {
            let shape = self.order.others()[ti].shape;
            return Ok((shape.to_vec(), self.read_rows(task, id, name, 0, shape[0])?));
        }
        let g = self.order.geometry();
        let t = g.find_attn_tensor(name).ok_or_else(|| {
            Error::Invalid(format!(
                "store {} does not hold tensor `{name}`",
                self.dir.display()
            ))
        })?;
        let mut full = vec![f32::NAN; t.shape[0] * t.shape[1]];
        for b in &t.blocks {
            if !self.order.has_block(*b) {
                continue;
            }
            for h in 0..g.heads_of(*b) {
                let spec = g.slice_spec(t.layer, *b, h)?;
                let s = self.read_slice(task, id, t.layer, *b, h)?;
                spec.paste(&s, &mut full)?;
            }
        }
        Ok((t.shape.to_vec(), full))
    }

    /// The task names in the store.
    pub fn tasks(&self) -> Vec<TaskName> {
        self.index.tasks().cloned().collect()
    }
}
