//! The pipeline's threads: compression workers (f32 → dtype, shuffle, zstd, checksum)
//! and the appender (frames at shard ends, sample tables, group commit: fsync shards,
//! append log records, fsync log; shards rolled over and sealed).

use super::*;
impl Budget {
    pub(super) fn acquire(&self, n: u64, failed: &Mutex<Option<String>>) -> Result<()> {
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

    pub(super) fn release(&self, n: u64) {
        let mut used = self.used.lock().expect("budget lock");
        *used -= n;
        self.cv.notify_all();
    }
}

pub(super) fn compress_worker(
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

impl Appender {
    pub(super) fn run(mut self, rx: &Receiver<AppMsg>) -> Result<AppendStats> {
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

    pub(super) fn handle(&mut self, msg: AppMsg) -> Result<()> {
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

    pub(super) fn shard_for_new_sample(&mut self) -> Result<u32> {
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

    pub(super) fn maybe_complete(&mut self, seq: u64) -> Result<()> {
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
    pub(super) fn commit(&mut self) -> Result<()> {
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

    pub(super) fn seal(&mut self, no: u32) -> Result<()> {
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

/// Appends bytes to a shard. Unit tests can make it fail as a full disk does.
pub(super) fn write_shard(file: &mut File, bytes: &[u8], path: &Path) -> Result<()> {
    #[cfg(test)]
    if fault::disk_full(path, bytes.len()) {
        return Err(std::io::Error::from_raw_os_error(28)).at(path);
    }
    file.write_all(bytes).at(path)
}

/// Test-only fault injection: a byte allowance per store directory, after which shard
/// writes fail with ENOSPC.
#[cfg(test)]
pub(super) mod fault {
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
