//! Read plans and frame decoding: one frame or factor, whole frames, rows of a
//! non-attention tensor, whole tensors.

use super::*;

impl Store {
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
    pub(super) fn decode_entry(
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
    pub(super) fn shared_factor(
        &self,
        r: &LogRecord,
        j: usize,
        entry: TableEntry,
    ) -> Result<Factor> {
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
    pub(super) fn planned_factors(
        &self,
        r: &LogRecord,
        p: &PlannedRead,
    ) -> Result<(Factor, Factor)> {
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
    pub(super) fn read_planned(
        &self,
        r: &LogRecord,
        p: &PlannedRead,
        out: &mut [f32],
    ) -> Result<()> {
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

    pub(super) fn table_error(&self, r: &LogRecord, source: gradshard_format::Error) -> Error {
        Error::Corrupt {
            path: shard_path(&self.dir, r.shard),
            task: r.task.clone(),
            id: r.id.clone(),
            slice: "sample table".into(),
            source: Box::new(source),
        }
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
}
