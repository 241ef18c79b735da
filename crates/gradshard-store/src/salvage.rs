//! `salvage`: bring a damaged store back to one that verifies, keeping every sample
//! that can still be read whole, and saying what was done.
//!
//! The commit log is the store's truth, so salvage rebuilds a log:
//! 1. the log's records up to its first bad record (later bytes cannot be trusted to be
//!    records at all);
//! 2. minus records whose shard is missing or belongs to another store, whose sample
//!    table or frames fail their checksums, and second commits of a (task, id) (the
//!    first is kept);
//! 3. plus samples the log lost: a sealed shard's footer lists every table it holds,
//!    and each table is followed by a copy of its sample's log record (written since
//!    this version; older shards have none), so a listed table that the log lacks is
//!    re-admitted when its copy and all its frames check out.
//!
//! The old log is kept beside the new one (`samples.log.before-salvage-<n>`); shards
//! keep every byte of their frames (only the footers of sealed shards are rewritten
//! to list exactly the kept tables). Nothing a kept sample references is touched, and
//! a rerun of salvage on its own output changes nothing. Statistics files are rebuilt
//! by the caller (they live in the collector crate).

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use gradshard_format::{
    decode_log_record, encode_footer, encode_log_record, parse_footer, LogRecord, ShardHeader,
    LOG_HEADER, LOG_HEADER_LEN,
};
use gradshard_index::FrameOrder;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifest;
use crate::{log_path, parse_shard_name, shard_path, shards_dir};

/// (table_offset, table_len) of sample tables, as a footer lists them.
type Tables = Vec<(u64, u32)>;

/// What salvage found and did (or, with `dry_run`, would do).
#[derive(Debug, Default, Clone)]
pub struct SalvageReport {
    /// Samples in the rebuilt log.
    pub kept: u64,
    /// One line per action, in the order taken.
    pub actions: Vec<String>,
    /// Things salvage cannot mend (reported, left as they are).
    pub notes: Vec<String>,
    /// Where the old log was kept, when it was replaced.
    pub old_log: Option<PathBuf>,
    /// Whether anything needed changing.
    pub changed: bool,
}

/// Why a sample cannot be kept (the first problem `verify` would report for it), or
/// `None` when its table and frames check out.
fn unreadable(
    dir: &Path,
    data: &[u8],
    r: &LogRecord,
    manifest: &Manifest,
    order: &FrameOrder,
) -> Option<String> {
    let (frames, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let (problems, _) = crate::verify::check_sample(dir, data, r, manifest, order, &frames, &bytes);
    problems.into_iter().next()
}

/// How to salvage.
#[derive(Debug, Clone, Default)]
pub struct SalvageOptions {
    /// Say what would be done, change nothing.
    pub dry_run: bool,
    /// Where a missing or damaged manifest's geometry, dtype, codec and tensors come
    /// from: another store of the same model (its directory) or a manifest file. The
    /// shard headers carry only the store id and the format version.
    pub spec_from: Option<PathBuf>,
}

/// Salvages the store at `dir` (the samples, the log and the manifest; the crate's
/// `salvage_with` then rebuilds `stats/`). The caller holds no writer on it; salvage
/// takes the writer lock itself, so it never runs beside a writer. A missing or
/// unreadable manifest is rebuilt (see [`SalvageOptions::spec_from`]).
pub fn salvage_with(dir: &Path, opts: &SalvageOptions) -> Result<SalvageReport> {
    let dry_run = opts.dry_run;
    crate::guard::require_store_dir(dir)?;
    let mut rep = SalvageReport::default();
    let (manifest, rebuilt) = match Manifest::load(dir) {
        Ok(m) => (m, false),
        Err(Error::Manifest { path, detail }) => {
            let copy = dir.join(crate::manifest::MANIFEST_COPY_FILE);
            let from = match &opts.spec_from {
                Some(f) => Some(f.clone()),
                None if Manifest::load_file(&copy, dir).is_ok() => Some(copy.clone()),
                None => None,
            };
            let Some(from) = &from else {
                return Err(Error::Manifest {
                    path,
                    detail: format!(
                        "{detail}\n(salvage cannot rebuild it alone: its copy {} is missing or unreadable, and a shard header carries the store id and the format version, but not the geometry, dtype, codec, blocks or other tensors a manifest needs; pass --spec-from)",
                        copy.display()
                    ),
                });
            };
            (rebuild_manifest(dir, from, &path, &detail, &mut rep)?, true)
        }
        Err(e) => return Err(e),
    };
    let lock = crate::writer::acquire_lock(dir)?;
    let order = manifest.spec.frame_order();
    let store_id = manifest.store_id_bytes()?;
    if let Some(why) = crate::unfinished(dir) {
        rep.notes.push(format!(
            "{}: the store is unfinished ({why}); salvage does not finish it",
            crate::unfinished_path(dir).display()
        ));
    }

    // 1. The log up to its first bad record. A missing log is an empty one: the
    // samples it lost are re-admitted from their record copies in the shards (4.).
    let lp = log_path(dir);
    let (log, log_missing) = match std::fs::read(&lp) {
        Ok(b) => (b, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), true),
        Err(e) => {
            return Err(Error::Io {
                path: lp,
                source: e,
            })
        }
    };
    let mut records = Vec::new();
    let mut rewrite_log = false;
    if log_missing {
        rep.actions.push(format!(
            "{}: missing; a new log is written (samples are re-admitted from the record copies in the shards)",
            lp.display()
        ));
        rewrite_log = true;
    } else if log.is_empty() {
        rep.actions.push(format!(
            "{}: empty; a new log is written (samples are re-admitted from the record copies in the shards)",
            lp.display()
        ));
        rewrite_log = true;
    } else if log.len() < LOG_HEADER_LEN || log[..LOG_HEADER_LEN] != LOG_HEADER[..] {
        rep.actions.push(format!(
            "{}: the log header is damaged; a new log is written",
            lp.display()
        ));
        rewrite_log = true;
    } else {
        let mut p = LOG_HEADER_LEN;
        while p < log.len() {
            match decode_log_record(&log[p..]) {
                Ok((r, n)) => {
                    records.push(r);
                    p += n;
                }
                Err(e) => {
                    rep.actions.push(format!(
                        "{}: cut at offset {p}, its first bad record ({e}); the {} byte(s) from there on are dropped",
                        lp.display(),
                        log.len() - p
                    ));
                    rewrite_log = true;
                    break;
                }
            }
        }
    }

    // 2. The shards: identity, footers.
    let sd = shards_dir(dir);
    let mut shards: BTreeMap<u32, memmap2::Mmap> = BTreeMap::new();
    for e in std::fs::read_dir(&sd).at(&sd)? {
        let e = e.at(&sd)?;
        let Some(no) = parse_shard_name(&e.file_name().to_string_lossy()) else {
            continue;
        };
        let m = crate::map_file(&e.path())?;
        match ShardHeader::parse(&m) {
            Ok(h) if h.store_id == store_id && h.shard_no == no => {
                shards.insert(no, m);
            }
            Ok(_) => rep.notes.push(format!(
                "{}: belongs to another store or is misnamed; its samples are not used (the file is left in place)",
                e.path().display()
            )),
            Err(_) => rep.notes.push(format!(
                "{}: no valid shard header; its samples are not used (the next writer removes an empty one)",
                e.path().display()
            )),
        }
    }

    // 3. Which logged samples stay.
    let checks: Vec<Option<String>> = records
        .par_iter()
        .map(|r| match shards.get(&r.shard) {
            None => Some(format!(
                "its shard {} is missing or unusable",
                shard_path(dir, r.shard).display()
            )),
            Some(data) => unreadable(dir, data, r, &manifest, &order),
        })
        .collect();
    let mut kept: Vec<LogRecord> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for (r, why) in records.into_iter().zip(checks) {
        let who = format!("task `{}` sample {} (seq {})", r.task, r.id, r.seq);
        if let Some(why) = why {
            rep.actions
                .push(format!("dropped {who} from the log: {why}"));
            rewrite_log = true;
            continue;
        }
        if !seen.insert((r.task.to_string(), format!("{:?}", r.id))) {
            rep.actions.push(format!(
                "dropped {who} from the log: committed twice, the first commit is kept"
            ));
            rewrite_log = true;
            continue;
        }
        kept.push(r);
    }

    // 4. Samples that sealed footers list but the log lost.
    let logged: HashSet<(u32, u64)> = kept.iter().map(|r| (r.shard, r.table_offset)).collect();
    let mut footers: BTreeMap<u32, (u64, Tables)> = BTreeMap::new();
    let mut readmit: Vec<LogRecord> = Vec::new();
    for (no, data) in &shards {
        let path = shard_path(dir, *no);
        let f = match parse_footer(data) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                rep.notes.push(format!(
                    "{}: footer unreadable ({e}); the next writer cannot seal it again, its logged samples are still read",
                    path.display()
                ));
                continue;
            }
        };
        let mut lost: Vec<LogRecord> = Vec::new();
        for &(off, len) in &f.tables {
            if logged.contains(&(*no, off)) {
                continue;
            }
            let end = off + len as u64;
            let copy = data
                .get(end as usize..)
                .and_then(|b| decode_log_record(b).ok())
                .map(|(r, _)| r)
                .filter(|r| r.shard == *no && r.table_offset == off && r.table_len == len);
            match copy {
                None => rep.notes.push(format!(
                    "{}: the sample table at offset {off} is not in the log and has no record copy (written by an older gradshard); it cannot be re-admitted",
                    path.display()
                )),
                Some(r) => match unreadable(dir, data, &r, &manifest, &order) {
                    Some(why) => rep.notes.push(format!(
                        "{}: task `{}` sample {} is not in the log and cannot be re-admitted: {why}",
                        path.display(),
                        r.task,
                        r.id
                    )),
                    None => lost.push(r),
                },
            }
        }
        readmit.extend(lost);
        footers.insert(*no, (f.offset, f.tables));
    }
    // Re-admitted samples in commit-sequence order across all shards.
    readmit.sort_by_key(|r| r.seq);
    for r in readmit {
        if seen.insert((r.task.to_string(), format!("{:?}", r.id))) {
            rep.actions.push(format!(
                "re-admitted task `{}` sample {} (seq {}) from {}: its log record was lost, its table and frames check out",
                r.task,
                r.id,
                r.seq,
                shard_path(dir, r.shard).display()
            ));
            rewrite_log = true;
            kept.push(r);
        }
    }
    // Kept records stay in log order (a writer with several workers commits samples
    // in the order they complete, not in seq order); re-admitted ones follow, by seq.
    let seqs: HashSet<u64> = kept.iter().map(|r| r.seq).collect();
    if seqs.len() != kept.len() {
        rep.notes.push(
            "two kept samples share a sequence number; the store's log was rewritten by hand?"
                .into(),
        );
    }

    // 5. Footers must list exactly the kept tables of their shard.
    // (shard, footer offset, the tables it must list)
    let mut new_footers: Vec<(u32, u64, Tables)> = Vec::new();
    for (no, (offset, tables)) in &footers {
        let mut want: Vec<(u64, u32)> = kept
            .iter()
            .filter(|r| r.shard == *no)
            .map(|r| (r.table_offset, r.table_len))
            .collect();
        want.sort_unstable();
        let mut have = tables.clone();
        have.sort_unstable();
        if want != have {
            rep.actions.push(format!(
                "{}: footer rewritten to list the {} kept sample table(s) (it listed {})",
                shard_path(dir, *no).display(),
                want.len(),
                have.len()
            ));
            new_footers.push((*no, *offset, want));
        }
    }
    rep.kept = kept.len() as u64;
    rep.changed = rewrite_log || !new_footers.is_empty() || rebuilt;
    if dry_run || !rep.changed {
        return Ok(rep);
    }

    // 6. Write: the rebuilt manifest (the damaged one kept beside it); the new log
    // beside the old one, then swap; then the footers.
    drop(shards);
    if rebuilt {
        let mp = dir.join(crate::MANIFEST_FILE);
        if mp.exists() {
            let aside = free_name(dir, "manifest.json.damaged");
            std::fs::rename(&mp, &aside).at(&aside)?;
            rep.actions.push(format!(
                "{}: the damaged manifest is kept as {}",
                mp.display(),
                aside.display()
            ));
        }
        manifest.save(dir)?;
    }
    if rewrite_log {
        let mut bytes = LOG_HEADER.to_vec();
        for r in &kept {
            bytes.extend(encode_log_record(r));
        }
        if !log_missing {
            let old = free_name(dir, "samples.log.before-salvage");
            std::fs::copy(&lp, &old).at(&old)?;
            rep.old_log = Some(old);
        }
        crate::fsutil::write_atomic(&lp, &bytes)?;
    }
    for (no, offset, tables) in new_footers {
        let path = shard_path(dir, no);
        let mut f = OpenOptions::new().write(true).open(&path).at(&path)?;
        f.set_len(offset).at(&path)?;
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::End(0)).at(&path)?;
        f.write_all(&encode_footer(offset, &tables)).at(&path)?;
        f.sync_all().at(&path)?;
    }
    // 7. A writer opened and closed at once seals what is unsealed (its usual recovery).
    drop(lock);
    crate::StoreWriter::open_or_create(dir, &manifest.spec, crate::WriterOptions::default())?
        .finish()?;
    Ok(rep)
}

/// `dir/<stem>-<k>` for the smallest k not taken.
fn free_name(dir: &Path, stem: &str) -> PathBuf {
    let mut k = 0;
    loop {
        let p = dir.join(format!("{stem}-{k}"));
        if !p.exists() {
            return p;
        }
        k += 1;
    }
}

/// A manifest for the store at `dir`, whose own (`path`) is missing or damaged
/// (`detail`): the store id and format version from the shard headers (which must
/// agree), everything else from `from` (a store directory or a manifest file), and
/// every sample the log or the shards' record copies name checked against it. Refused,
/// naming the disagreement, when the headers disagree or a sample does not fit.
fn rebuild_manifest(
    dir: &Path,
    from: &Path,
    path: &Path,
    detail: &str,
    rep: &mut SalvageReport,
) -> Result<Manifest> {
    let refuse = |why: String| Error::Manifest {
        path: path.to_path_buf(),
        detail: format!("{detail}\nnot rebuilt: {why}"),
    };
    let src = if from.is_dir() {
        Manifest::load(from)?
    } else {
        Manifest::load_file(from, dir)?
    };
    // Store id and version: every readable shard header must say the same.
    let sd = shards_dir(dir);
    let mut first: Option<(PathBuf, ShardHeader)> = None;
    let mut maps: Vec<(u32, memmap2::Mmap)> = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&sd)
        .at(&sd)?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_shard_name(&e.file_name().to_string_lossy()).map(|n| (n, e.path())))
        .collect();
    entries.sort();
    for (no, p) in entries {
        let m = crate::map_file(&p)?;
        let h = match ShardHeader::parse(&m) {
            Ok(h) => h,
            Err(e) => {
                rep.notes.push(format!(
                    "{}: no valid shard header ({e}); not used to rebuild the manifest",
                    p.display()
                ));
                continue;
            }
        };
        if h.shard_no != no {
            return Err(refuse(format!(
                "{}: its header says shard {}",
                p.display(),
                h.shard_no
            )));
        }
        match &first {
            None => first = Some((p.clone(), h)),
            Some((fp, fh)) => {
                if fh.store_id != h.store_id {
                    return Err(refuse(format!(
                        "the shards disagree on the store id: {} says {}, {} says {}",
                        fp.display(),
                        hex(&fh.store_id),
                        p.display(),
                        hex(&h.store_id)
                    )));
                }
                if fh.version != h.version {
                    return Err(refuse(format!(
                        "the shards disagree on the format version: {} says {}, {} says {}",
                        fp.display(),
                        fh.version,
                        p.display(),
                        h.version
                    )));
                }
            }
        }
        maps.push((no, m));
    }
    let Some((_, h)) = first else {
        return Err(refuse(format!(
            "no shard in {} has a valid header, so the store id is unknown",
            sd.display()
        )));
    };
    let m = Manifest {
        format_version: h.version,
        store_id: hex(&h.store_id),
        created_by: format!(
            "{} (manifest rebuilt by gradshard {} salvage from the shard headers and {})",
            src.created_by,
            env!("CARGO_PKG_VERSION"),
            from.display()
        ),
        n_frames: src.spec.frame_order().n_frames(),
        spec: src.spec.clone(),
        shard_target_bytes: src.shard_target_bytes,
        source: src.source.clone(),
    };
    if m.spec.codec.name == crate::CodecName::ZstdExp && m.format_version < 3 {
        return Err(refuse(format!(
            "{} uses codec zstd-exp, which the shards' format version {} cannot hold",
            from.display(),
            m.format_version
        )));
    }
    // Every sample the store names (log records, then record copies after the tables
    // the footers list) must read whole under the rebuilt manifest.
    let order = m.spec.frame_order();
    let lp = log_path(dir);
    let mut records: Vec<LogRecord> = std::fs::read(&lp)
        .ok()
        .filter(|b| b.len() >= LOG_HEADER_LEN && b[..LOG_HEADER_LEN] == LOG_HEADER[..])
        .map(|b| {
            let mut out = Vec::new();
            let mut p = LOG_HEADER_LEN;
            while let Ok((r, n)) = decode_log_record(&b[p..]) {
                out.push(r);
                p += n;
                if p >= b.len() {
                    break;
                }
            }
            out
        })
        .unwrap_or_default();
    for (no, data) in &maps {
        if let Ok(Some(f)) = parse_footer(data) {
            for &(off, len) in &f.tables {
                let end = off + len as u64;
                if let Some(r) = data
                    .get(end as usize..)
                    .and_then(|b| decode_log_record(b).ok())
                    .map(|(r, _)| r)
                    .filter(|r| r.shard == *no && r.table_offset == off && r.table_len == len)
                {
                    records.push(r);
                }
            }
        }
    }
    let by_no: BTreeMap<u32, &memmap2::Mmap> = maps.iter().map(|(n, m)| (*n, m)).collect();
    let mut checked = 0u64;
    for r in &records {
        let Some(data) = by_no.get(&r.shard) else {
            continue;
        };
        if let Some(why) = unreadable(dir, data, r, &m, &order) {
            return Err(refuse(format!(
                "the geometry, dtype or tensors of {} do not fit the stored samples: {why}",
                from.display()
            )));
        }
        checked += 1;
    }
    rep.actions.push(format!(
        "{}: rebuilt (store id {} and format version {} from the shard headers; geometry, dtype, codec and tensors from {}; all {checked} sample(s) the store names read whole under it)",
        path.display(),
        m.store_id,
        m.format_version,
        from.display()
    ));
    if checked == 0 {
        rep.notes.push(format!(
            "no sample could be checked against the geometry of {}: the store names none",
            from.display()
        ));
    }
    Ok(m)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
