//! Read-only access to a store: shard headers, sample tables and footers through
//! memory maps, frames with positioned reads (`pread`) into reused per-thread buffers.
//! Every frame read verifies its checksum; corruption is reported with task, sample,
//! slice and file.
//!
//! - `mod.rs`: the public types, the per-thread frame buffers and the shared-factor
//!   cache.
//! - `open`: opening a store (shard identity, log completeness), the index and the
//!   sample tables.
//! - `read`: read plans, decoding one frame or factor, whole frames, rows and tensors.
//! - `tiles`: slices and tiles (one slice of many samples), as f32 rows, bf16 byte
//!   planes or factors.

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

mod open;
mod read;
mod tiles;

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

/// Default byte budget of the decoded shared-factor cache.
pub const DEFAULT_SHARED_CACHE_BYTES: u64 = 1 << 30;
