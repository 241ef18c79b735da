//! The writer lock, and crash recovery at writer open: a torn log tail cut, unsealed
//! shards truncated to their last committed sample table and sealed.

use super::*;
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

/// Length of the copy of `rec` that follows its sample table at `table_end` in a
/// shard's bytes, if a whole, matching copy is there.
pub(crate) fn record_copy_len(data: &[u8], table_end: u64, rec: &LogRecord) -> Option<usize> {
    let at = usize::try_from(table_end).ok()?;
    let (copy, n) = gradshard_format::decode_log_record(data.get(at..)?).ok()?;
    (copy == *rec).then_some(n)
}

/// Crash recovery at writer open: reads the log (cutting a torn tail), truncates each
/// unsealed shard to the end of its last committed sample table and seals it.
/// Returns the committed records and the next free shard number.
pub(super) fn recover(dir: &Path, manifest: &Manifest) -> Result<(Vec<LogRecord>, u32)> {
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
