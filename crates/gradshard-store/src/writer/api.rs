//! [`StoreWriter`]'s API: open (recovering a crashed writer's leftovers), samples in
//! (frames, factors, shared factors), finish.

use super::*;
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
