//! `verify`: every checksum, every index entry, every shard header and footer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use gradshard_format::{
    decode_frame, decode_log, parse_footer, FrameKind, LogRecord, ShardHeader, TableView,
    SHARD_HEADER_LEN, TRAILER_LEN,
};
use gradshard_index::FrameOrder;
use rayon::prelude::*;

use crate::error::{IoContext, Result};
use crate::manifest::Manifest;
use crate::{log_path, parse_shard_name, shard_path, shards_dir};

/// What `verify` found. `problems` non-empty means the store is damaged.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub samples: u64,
    pub frames: u64,
    pub frame_bytes: u64,
    pub shards: u64,
    /// Bytes inside shards that no committed sample references (uncommitted work of a crashed writer).
    pub unreferenced_bytes: u64,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the whole store. Returns `Err` only when the store cannot be read at all
/// (no manifest); damage is listed in the report. `progress(done, total)` counts samples.
pub fn verify(dir: &Path, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<VerifyReport> {
    let manifest = Manifest::load(dir)?;
    let order = manifest.spec.frame_order();
    let store_id = manifest.store_id_bytes()?;
    let mut rep = VerifyReport::default();
    if let Some(why) = crate::unfinished(dir) {
        rep.problems.push(format!(
            "{}: the store is unfinished: {why}",
            crate::unfinished_path(dir).display()
        ));
    }

    let lp = log_path(dir);
    let log = match std::fs::read(&lp) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            rep.problems.push(format!(
                "{}: the commit log is missing (`gradshard salvage --store {}` writes a new one and re-admits every sample whose record copy in the shards checks out)",
                lp.display(),
                dir.display()
            ));
            return Ok(rep);
        }
        Err(e) => {
            return Err(crate::Error::Io {
                path: lp,
                source: e,
            })
        }
    };
    let records = match decode_log(&log) {
        Ok(s) => {
            if s.torn_tail > 0 {
                rep.warnings.push(format!(
                    "{}: torn last record ({} bytes) from an interrupted write; the next writer removes it",
                    lp.display(),
                    s.torn_tail
                ));
            }
            s.records
        }
        Err(e) => {
            rep.problems.push(format!(
                "{}: {e} (`gradshard salvage --store {}` cuts the log there and keeps what is whole)",
                lp.display(),
                dir.display()
            ));
            return Ok(rep);
        }
    };
    rep.samples = records.len() as u64;

    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    for r in &records {
        let key = (r.task.to_string(), format!("{:?}", r.id));
        if let Some(first) = seen.insert(key, r.seq) {
            rep.problems.push(format!(
                "task `{}` sample {} committed twice (seq {first} and {})",
                r.task, r.id, r.seq
            ));
        }
    }

    // Shard files: header, name, footer.
    let sd = shards_dir(dir);
    let mut files: BTreeMap<u32, memmap2::Mmap> = BTreeMap::new();
    for e in std::fs::read_dir(&sd).at(&sd)? {
        let e = e.at(&sd)?;
        let name = e.file_name().to_string_lossy().into_owned();
        match parse_shard_name(&name) {
            Some(no) => {
                let p = e.path();
                files.insert(no, crate::map_file(&p)?);
            }
            None => rep
                .warnings
                .push(format!("{}: not a shard file, ignored", e.path().display())),
        }
    }
    rep.shards = files.len() as u64;
    // A consistent snapshot of a store being written: the samples checked are those of
    // the log read *before* the shards were mapped (their bytes were durable before
    // their records, so they lie inside the mappings), and the footers are compared
    // with a log read *after* (a writer appends records before it seals a shard, so a
    // footer seen in a mapping lists only samples of that later log).
    let later = std::fs::read(&lp)
        .ok()
        .and_then(|b| decode_log(&b).ok())
        .map(|s| s.records)
        .filter(|l| l.len() >= records.len() && l[..records.len()] == records[..]);
    let footer_records: &[LogRecord] = later.as_deref().unwrap_or(&records);
    if footer_records.len() > records.len() {
        rep.warnings.push(format!(
            "{} sample(s) were committed while verify ran (a writer is active); they are not checked in this run",
            footer_records.len() - records.len()
        ));
    }
    let mut by_shard: HashMap<u32, Vec<&LogRecord>> = HashMap::new();
    for r in footer_records {
        by_shard.entry(r.shard).or_default().push(r);
    }
    let mut bad_shards = HashSet::new();
    let mut footer_len: HashMap<u32, u64> = HashMap::new();
    for (no, data) in &files {
        let p = shard_path(dir, *no);
        match ShardHeader::parse(data) {
            Ok(h) if h.shard_no != *no => {
                rep.problems
                    .push(format!("{}: header says shard {}", p.display(), h.shard_no))
            }
            Ok(h) if h.store_id != store_id => rep.problems.push(format!(
                "{}: belongs to another store (store id differs)",
                p.display()
            )),
            Ok(_) => {}
            Err(_) if data.len() < SHARD_HEADER_LEN && !by_shard.contains_key(no) => {
                // Being created right now, or left by a creation that failed (a full
                // disk): it holds no committed sample, and the next writer removes it.
                rep.warnings.push(format!(
                    "{}: {} bytes, shorter than a shard header, and no committed sample is in it (a shard being created, or one whose creation failed, e.g. on a full disk); the next writer removes it",
                    p.display(),
                    data.len()
                ));
                bad_shards.insert(*no);
                continue;
            }
            Err(e) => {
                rep.problems.push(format!("{}: {e}", p.display()));
                bad_shards.insert(*no);
                continue;
            }
        }
        let mut logged: Vec<(u64, u32)> = by_shard
            .get(no)
            .map(|v| v.iter().map(|r| (r.table_offset, r.table_len)).collect())
            .unwrap_or_default();
        logged.sort_unstable();
        match parse_footer(data) {
            Ok(Some(gradshard_format::Footer {
                offset: off,
                mut tables,
            })) => {
                footer_len.insert(*no, data.len() as u64 - off);
                tables.sort_unstable();
                if tables != logged {
                    rep.problems.push(format!(
                        "{}: footer lists {} sample tables, the log {} (they differ)",
                        p.display(),
                        tables.len(),
                        logged.len()
                    ));
                }
            }
            Ok(None) => rep.warnings.push(format!(
                "{}: not sealed (a writer is running or crashed; the next writer seals it)",
                p.display()
            )),
            Err(e) => rep.problems.push(format!("{}: {e}", p.display())),
        }
    }

    // Every sample: table, entries, frames.
    let frames = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let total = records.len() as u64;
    // Per sample: its problems, and the (shard, start, end) byte ranges it references.
    type Checked = (Vec<String>, Vec<(u32, u64, u64)>);
    let per_sample: Vec<Checked> = records
        .par_iter()
        .map(|r| {
            let who = format!("task `{}` sample {}", r.task, r.id);
            let Some(data) = files.get(&r.shard) else {
                let p = format!(
                    "{who}: shard {} is missing",
                    shard_path(dir, r.shard).display()
                );
                return (vec![p], Vec::new());
            };
            if bad_shards.contains(&r.shard) {
                let p = format!(
                    "{who}: in damaged shard {}",
                    shard_path(dir, r.shard).display()
                );
                return (vec![p], Vec::new());
            }
            let (probs, ranges) = check_sample(dir, data, r, &manifest, &order, &frames, &bytes);
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            (probs, ranges)
        })
        .collect();
    let mut ranges: Vec<(u32, u64, u64)> = Vec::new();
    for (p, r) in per_sample {
        rep.problems.extend(p);
        ranges.extend(r);
    }
    rep.frames = frames.into_inner();
    rep.frame_bytes = bytes.into_inner();

    // Overlaps between referenced ranges, and unreferenced bytes.
    ranges.sort_unstable();
    let mut referenced: HashMap<u32, u64> = HashMap::new();
    for w in ranges.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.0 == b.0 && b.1 < a.2 {
            rep.problems.push(format!(
                "{}: byte ranges {}..{} and {}..{} overlap",
                shard_path(dir, a.0).display(),
                a.1,
                a.2,
                b.1,
                b.2
            ));
        }
    }
    for (s, a, b) in &ranges {
        *referenced.entry(*s).or_default() += b - a;
    }
    for (no, data) in &files {
        let used = SHARD_HEADER_LEN as u64
            + referenced.get(no).copied().unwrap_or(0)
            + footer_len.get(no).copied().unwrap_or(0);
        rep.unreferenced_bytes += (data.len() as u64).saturating_sub(used);
    }
    let _ = TRAILER_LEN;
    Ok(rep)
}

/// Checks one committed sample in its shard's bytes: the table (place, checksum, frame
/// count, seq, shared-factor count), every frame (place, checksums, kind, dtype, size)
/// and, for a factored sample, that each P has its S's row count. Returns the problems
/// (each naming the shard, task, sample and slice) and the byte ranges the sample
/// references. `frames` and `bytes` count what decoded. `salvage` keeps a sample only
/// when this finds nothing, so a salvaged store passes `verify`.
pub(crate) fn check_sample(
    dir: &Path,
    data: &[u8],
    r: &LogRecord,
    manifest: &Manifest,
    order: &FrameOrder,
    frames: &AtomicU64,
    bytes: &AtomicU64,
) -> (Vec<String>, Vec<(u32, u64, u64)>) {
    let mut probs = Vec::new();
    let mut ranges = Vec::new();
    let who = format!("task `{}` sample {}", r.task, r.id);
    let n_frames = order.n_frames();
    let dtype = manifest.spec.dtype;
    let p = shard_path(dir, r.shard);
    let end = r.table_offset.saturating_add(r.table_len as u64);
    if end > data.len() as u64 || r.table_offset < SHARD_HEADER_LEN as u64 {
        probs.push(format!(
            "{}: {who}: index entry past end of file (sample table {}..{end}, file {} bytes)",
            p.display(),
            r.table_offset,
            data.len()
        ));
        return (probs, ranges);
    }
    let view = match TableView::parse(&data[r.table_offset as usize..end as usize]) {
        Ok(v) => v,
        Err(e) => {
            probs.push(format!("{}: {who}: sample table: {e}", p.display()));
            return (probs, ranges);
        }
    };
    if view.n_frames as usize != n_frames || view.seq != r.seq {
        probs.push(format!(
            "{}: {who}: sample table has {} frames and seq {}, expected {n_frames} and {}",
            p.display(),
            view.n_frames,
            view.seq,
            r.seq
        ));
        return (probs, ranges);
    }
    let factored = view.is_factored();
    if factored && (view.n_shared as usize != order.n_shared() || manifest.format_version < 2) {
        probs.push(format!(
            "{}: {who}: sample table has {} shared factors, expected 0 or {} (format version {})",
            p.display(),
            view.n_shared,
            order.n_shared(),
            manifest.format_version
        ));
        return (probs, ranges);
    }
    ranges.push((r.shard, r.table_offset, end));
    if let Some(n) = crate::writer::record_copy_len(data, end, r) {
        ranges.push((r.shard, end, end + n as u64));
    }
    let mut scratch = Vec::new();
    // Factor row counts: every P of a shared factor S has S's n.
    let mut shared_rows = vec![None; view.n_shared as usize];
    let mut factor_rows: Vec<(usize, usize)> = Vec::new();
    for (i, e) in view.all_entries().enumerate() {
        let fend = e.offset.saturating_add(e.frame_len as u64);
        let (slice, kind, width) = if i >= n_frames {
            let j = i - n_frames;
            (
                order.describe_shared(j),
                FrameKind::Shared,
                order.shared()[j].cols,
            )
        } else if factored {
            let (_, w, _) = order.factor_of(i).expect("frame in range");
            (
                format!("{} (factor P)", order.describe(i)),
                FrameKind::Factor,
                w,
            )
        } else {
            (
                order.describe(i),
                FrameKind::Full,
                order.frame_numel(i).unwrap_or(0),
            )
        };
        if fend > data.len() as u64 || e.offset < SHARD_HEADER_LEN as u64 {
            probs.push(format!(
                "{}: {who} {slice}: index entry past end of file (frame {}..{fend}, file {} bytes)",
                p.display(),
                e.offset,
                data.len()
            ));
            continue;
        }
        ranges.push((r.shard, e.offset, fend));
        match decode_frame(
            &data[e.offset as usize..fend as usize],
            Some(e.checksum),
            &mut scratch,
        ) {
            Ok(h) => {
                let rows = if kind == FrameKind::Full {
                    1
                } else {
                    h.rows as usize
                };
                let want = rows * width * dtype.size();
                if h.kind != kind
                    || h.raw_len as usize != want
                    || h.dtype != dtype
                    || h.raw_len != e.raw_len
                {
                    probs.push(format!(
                        "{}: {who} {slice}: a {} of {} bytes of {}, expected a {kind} of {want} bytes of {dtype}",
                        p.display(),
                        h.kind,
                        h.raw_len,
                        h.dtype
                    ));
                }
                match kind {
                    FrameKind::Shared => shared_rows[i - n_frames] = Some(rows),
                    FrameKind::Factor => factor_rows.push((i, rows)),
                    FrameKind::Full => {}
                }
                frames.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(e.frame_len as u64, Ordering::Relaxed);
            }
            Err(err) => probs.push(format!(
                "{}: {who} {slice} at offset {}: {err}",
                p.display(),
                e.offset
            )),
        }
    }
    for (f, n) in factor_rows {
        let (j, _, _) = order.factor_of(f).expect("frame in range");
        if let Some(sn) = shared_rows[j].filter(|sn| *sn != n) {
            probs.push(format!(
                "{}: {who} {} (factor P): {n} rows, its {} has {sn}",
                p.display(),
                order.describe(f),
                order.describe_shared(j)
            ));
        }
    }
    (probs, ranges)
}
