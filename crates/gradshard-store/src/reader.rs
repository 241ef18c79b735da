//! Read-only access to a store through memory-mapped shards. Every frame read
//! verifies its checksum; corruption is reported with task, sample, slice and file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use gradshard_core::{Block, SampleId, TaskName};
use gradshard_format::{decode_frame, decode_log, LogRecord};
use gradshard_index::{FrameOrder, Index, ReadPlan};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifest;
use crate::{log_path, shard_path};

/// Drops the mapped pages lying wholly inside `[start, end)` from this process's page
/// tables once a frame is decoded, so that a pass over a store larger than RAM keeps its
/// resident set bounded (the pages stay in the kernel's page cache; a later read simply
/// maps them again). Advisory: where the kernel refuses (another page size), memory use is
/// higher but nothing read changes, so the refusal is not an error.
fn release_pages(m: &Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let a = start.div_ceil(PAGE) * PAGE;
    let b = end / PAGE * PAGE;
    if b > a {
        // SAFETY: the mapping is read-only and file-backed; MADV_DONTNEED only unmaps the
        // pages, and any later access faults the same file bytes back in. Frames never
        // overlap, so these whole pages belong to this frame alone, whose bytes are no
        // longer borrowed.
        let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
    }
}

/// I/O counters, for tests and benchmarks ("reading one slice performs one frame read").
#[derive(Debug, Default)]
pub struct IoStats {
    pub frames_read: AtomicU64,
    pub frame_bytes: AtomicU64,
    pub table_lookups: AtomicU64,
}

impl IoStats {
    pub fn frames(&self) -> u64 {
        self.frames_read.load(Ordering::Relaxed)
    }
    pub fn bytes(&self) -> u64 {
        self.frame_bytes.load(Ordering::Relaxed)
    }
    pub fn reset(&self) {
        self.frames_read.store(0, Ordering::Relaxed);
        self.frame_bytes.store(0, Ordering::Relaxed);
        self.table_lookups.store(0, Ordering::Relaxed);
    }
}

/// An open store (read-only). Sees the samples committed when it was opened.
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    order: FrameOrder,
    index: Index,
    shards: HashMap<u32, Mmap>,
    stats: IoStats,
    /// Bytes of a torn log tail (a crashed writer; the next writer cuts it).
    pub torn_log_tail: u64,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
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
        for r in &scan.records {
            if let std::collections::hash_map::Entry::Vacant(e) = shards.entry(r.shard) {
                e.insert(crate::map_file(&shard_path(dir, r.shard))?);
            }
        }
        let index = Index::from_records(scan.records)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            order,
            index,
            shards,
            stats: IoStats::default(),
            torn_log_tail: scan.torn_tail,
        })
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

    /// Plans reading `frames` of `samples` (records of one task).
    pub fn plan(&self, samples: &[&LogRecord], frames: &[usize]) -> Result<ReadPlan> {
        Ok(ReadPlan::for_frames(&self.order, samples, frames, |r| {
            self.table_bytes(r)
                .map_err(|e| gradshard_index::Error::NoSuchFrame {
                    what: "sample table",
                    detail: e.to_string(),
                })
        })?)
    }

    /// Reads, verifies and decodes one frame into `out` (cleared first) as f32.
    fn read_entry(
        &self,
        r: &LogRecord,
        frame: usize,
        entry: gradshard_format::TableEntry,
        scratch: &mut Vec<u8>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let m = self.shard(r)?;
        let end = entry.offset.saturating_add(entry.frame_len as u64);
        if end > m.len() as u64 {
            return Err(self.past_end(r, &self.order.describe(frame), end, m.len()));
        }
        let bytes = &m[entry.offset as usize..end as usize];
        self.stats.frames_read.fetch_add(1, Ordering::Relaxed);
        self.stats
            .frame_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let corrupt = |source| Error::Corrupt {
            path: shard_path(&self.dir, r.shard),
            task: r.task.clone(),
            id: r.id.clone(),
            slice: format!(
                "{} (frame {frame} at offset {})",
                self.order.describe(frame),
                entry.offset
            ),
            source: Box::new(source),
        };
        let decoded = decode_frame(bytes, Some(entry.checksum), scratch);
        release_pages(m, entry.offset as usize, end as usize);
        let h = decoded.map_err(corrupt)?;
        let want =
            self.order.frame_numel(frame).expect("planned frame") * self.manifest.spec.dtype.size();
        if h.raw_len as usize != want
            || h.raw_len != entry.raw_len
            || h.dtype != self.manifest.spec.dtype
        {
            return Err(corrupt(gradshard_format::Error::Invalid {
                what: "frame",
                detail: format!(
                    "{} bytes of {}, expected {want} bytes of {}",
                    h.raw_len, h.dtype, self.manifest.spec.dtype
                ),
            }));
        }
        out.clear();
        self.manifest.spec.dtype.decode_into(scratch, out);
        Ok(())
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

    /// One frame of one sample, as f32.
    pub fn read_frame(&self, r: &LogRecord, frame: usize) -> Result<Vec<f32>> {
        let plan = self.plan(&[r], &[frame])?;
        let mut out = Vec::new();
        self.read_entry(r, frame, plan.reads[0].entry, &mut Vec::new(), &mut out)?;
        Ok(out)
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
        let frame = self.attn_frame(layer, block, head)?;
        let recs = self.samples(task)?;
        let chosen: Vec<&LogRecord> = positions
            .iter()
            .map(|p| {
                recs.get(*p).ok_or_else(|| {
                    Error::Invalid(format!(
                        "task `{task}` has {} samples, asked for #{p}",
                        recs.len()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let numel = self.order.geometry().slice_numel();
        if out.len() != chosen.len() * numel {
            return Err(Error::Invalid(format!(
                "tile buffer holds {} values, {} samples × {numel} needed",
                out.len(),
                chosen.len()
            )));
        }
        let plan = self.plan(&chosen, &[frame])?;
        let mut slots: Vec<(usize, gradshard_format::TableEntry)> =
            plan.reads.iter().map(|p| (p.slot, p.entry)).collect();
        slots.sort_by_key(|s| s.0);
        out.par_chunks_mut(numel)
            .zip(slots.par_iter())
            .try_for_each_init(
                || (Vec::new(), Vec::new()),
                |(scratch, vals), (row, (slot, entry))| {
                    self.read_entry(chosen[*slot], frame, *entry, scratch, vals)?;
                    row.copy_from_slice(vals);
                    Ok(())
                },
            )
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
        let (mut scratch, mut vals) = (Vec::new(), Vec::new());
        let mut reads = plan.reads.clone();
        reads.sort_by_key(|p| p.slot);
        for p in reads {
            let g = p.frame - self.order.other(ti, 0).expect("group 0");
            let (g0, g1) = t.group_rows(g);
            self.read_entry(r, p.frame, p.entry, &mut scratch, &mut vals)?;
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
