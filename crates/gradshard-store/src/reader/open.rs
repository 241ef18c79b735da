//! Opening a store: shards mapped and checked, the log read into the index; sample
//! tables located and advised.

use super::*;

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

    pub(super) fn shard(&self, r: &LogRecord) -> Result<&Mmap> {
        self.shards.get(&r.shard).ok_or_else(|| Error::Input {
            path: shard_path(&self.dir, r.shard),
            what: "shard file is not mapped".into(),
        })
    }

    pub(super) fn past_end(&self, r: &LogRecord, what: &str, end: u64, len: usize) -> Error {
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
    pub(super) fn advise_tables<'r>(&self, records: impl Iterator<Item = &'r LogRecord>) {
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

    /// The task names in the store.
    pub fn tasks(&self) -> Vec<TaskName> {
        self.index.tasks().cloned().collect()
    }
}
