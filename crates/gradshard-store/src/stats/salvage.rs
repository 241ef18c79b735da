//! The `stats/` part of `salvage`: the statistics rebuilt from the samples the store
//! kept, the side log mended first.

use std::path::Path;

use super::{rebuild, stats_dir, SideLog, SideLogTail, StatsLayout, SIDE_LOG};
use crate::error::{io, Result};
use crate::Manifest;

/// Rebuilds `stats/<task>.json` of the store at `dir` from its committed samples, and
/// returns one line per action taken (with `dry_run`, what would be done; nothing is
/// changed). Before that, the side log `stats/samples.bin` is mended: a torn or damaged
/// tail is cut, and a log that cannot be used at all (a bad header, another layout) is
/// moved aside to `samples.bin.damaged`; the sums it no longer gives are recomputed
/// from the stored frames. Takes the writer lock. A store without `stats/` is left
/// as it is.
pub fn salvage_stats(dir: &Path, dry_run: bool) -> Result<Vec<String>> {
    let sd = stats_dir(dir);
    if !sd.is_dir() {
        return Ok(Vec::new());
    }
    if dry_run {
        return Ok(vec![format!(
            "rebuild {} from the kept samples",
            sd.display()
        )]);
    }
    let lock = crate::writer::acquire_lock(dir)?;
    let mut actions = Vec::new();
    let side = sd.join(SIDE_LOG);
    if side.exists() {
        let spec = Manifest::load(dir)?.spec;
        let layout = StatsLayout::new(&spec.frame_order(), spec.dtype);
        match SideLog::open(dir, layout.len(), true) {
            Ok(log) => match log.tail() {
                SideLogTail::Whole => {}
                SideLogTail::Torn { at, bytes } | SideLogTail::Damaged { at, bytes } => {
                    actions.push(format!(
                        "{}: cut at offset {at} ({bytes} bytes of torn or damaged records; their samples' sums recomputed from the stored frames)",
                        side.display()
                    ))
                }
            },
            Err(e) => {
                let aside = side.with_extension("bin.damaged");
                std::fs::rename(&side, &aside).map_err(io(&side))?;
                actions.push(format!(
                    "{} could not be used ({e}); moved to {}, sums recomputed from the stored frames",
                    side.display(),
                    aside.display()
                ));
            }
        }
    }
    let rebuilt = rebuild(dir)?;
    actions.extend(
        rebuilt
            .files
            .iter()
            .map(|f| format!("rebuilt {}", f.display())),
    );
    drop(lock);
    Ok(actions)
}
