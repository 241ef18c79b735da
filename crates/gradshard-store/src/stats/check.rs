//! What `verify` checks in `stats/`: every task file (checksum, version, layout,
//! whether it is current) and the side log (header, records).

use std::path::{Path, PathBuf};

use super::{ids_digest, stats_dir, SideLog, SideLogTail, StatsLayout, TaskStats};
use crate::error::Error;
use crate::{Store, VerifyReport};

/// The `stats/` part of `verify`: adds what [`check_files`] and [`check_side_log`] find
/// to `rep`, when the store can be opened (a store that cannot is reported by the rest
/// of `verify`).
pub(crate) fn check_store(dir: &Path, rep: &mut VerifyReport) {
    let Ok(store) = Store::open(dir) else {
        return;
    };
    for c in [check_files(&store), check_side_log(&store)] {
        rep.problems.extend(c.problems);
        rep.warnings.extend(c.warnings);
    }
}

/// What [`check_files`] found in a store's `stats/`.
#[derive(Debug, Default, Clone)]
pub struct StatsCheck {
    /// Files that cannot be trusted (checksum, format, layout): damage.
    pub problems: Vec<String>,
    /// Files that are merely out of date, or old.
    pub warnings: Vec<String>,
    /// Statistics files checked.
    pub files: usize,
}

/// Checks every `stats/<task>.json` of `store`: checksum, version, that it fits the
/// store's layout, and whether it describes exactly the task's committed samples.
pub fn check_files(store: &Store) -> StatsCheck {
    let mut out = StatsCheck::default();
    let dir = stats_dir(store.dir());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for path in paths {
        out.files += 1;
        let s = match TaskStats::load(&path) {
            Ok(s) => s,
            Err(e @ Error::StatsWithoutChecksum { .. }) => {
                out.warnings.push(e.to_string());
                continue;
            }
            Err(e) => {
                out.problems.push(e.to_string());
                continue;
            }
        };
        if let Err(e) = s.to_welford(&layout, &path) {
            out.problems.push(e.to_string());
            continue;
        }
        match store.samples(s.task.as_str()) {
            Ok(recs) if ids_digest(recs) == s.ids_xxh3 && recs.len() as u64 == s.n_samples => {}
            Ok(recs) => out.warnings.push(format!(
                "{}: describes {} sample(s), the store holds {} of task `{}` (out of date; the next collect or merge rewrites it, `gradshard salvage` rebuilds it)",
                path.display(),
                s.n_samples,
                recs.len(),
                s.task
            )),
            Err(_) => out.warnings.push(format!(
                "{}: task `{}` has no committed samples in the store",
                path.display(),
                s.task
            )),
        }
    }
    out
}

/// Checks the side log `stats/samples.bin` of `store`, when there is one: its header
/// and layout, and that every record up to the end of the file is whole and passes its
/// checksum. A record cut short at the end (a writer killed mid-append) is a warning;
/// a whole record that fails its checksum, or a bad header, is a problem.
pub fn check_side_log(store: &Store) -> StatsCheck {
    let mut out = StatsCheck::default();
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let path = stats_dir(store.dir()).join(super::SIDE_LOG);
    if !path.exists() {
        return out;
    }
    out.files += 1;
    match SideLog::open(store.dir(), layout.len(), false) {
        Err(e) => out.problems.push(format!(
            "{e}; `gradshard salvage --store {}` sets it aside and recomputes the statistics from the samples",
            store.dir().display()
        )),
        Ok(side) => match side.tail() {
            SideLogTail::Whole => {}
            SideLogTail::Torn { at, bytes } => out.warnings.push(format!(
                "{}: torn last record ({bytes} bytes at offset {at}) from an interrupted write; the next collect or salvage cuts it",
                path.display()
            )),
            SideLogTail::Damaged { at, bytes } => out.problems.push(format!(
                "{}: the record at offset {at} fails its checksum (the file was edited or damaged); the {bytes} bytes from there on (that record and any after it) are not used (their samples' sums are recomputed from the stored frames); `gradshard salvage --store {}` cuts them",
                path.display(),
                store.dir().display()
            )),
        },
    }
    out
}
