//! A gradshard store: a directory of checksummed, compressed shard files with a
//! commit log and a manifest (docs/format.md). Writers stream per-sample
//! gradients in through a bounded pipeline; readers map shards and fetch exactly
//! the frames a question needs.

mod error;
pub mod fsutil;
pub mod guard;
mod index_rows;
pub mod ingest;
mod manifest;
mod merge;
mod reader;
mod salvage;
pub mod sink;
pub mod stats;
pub mod synth;
mod verify;
mod writer;

use std::path::{Path, PathBuf};

pub use error::{Error, NoStoreWhy, Result};
pub use index_rows::{FrameKind, FrameRow};
pub use manifest::{CodecName, CodecSpec, Manifest, StoreSpec, MANIFEST_COPY_FILE, MANIFEST_FILE};
pub use merge::{merge, merge_with, MergeEvent, MergeReport};
pub use reader::{
    Factor, FactorTile, Footprint, IoStats, SliceFactors, Store, DEFAULT_SHARED_CACHE_BYTES,
};
pub use salvage::{SalvageOptions, SalvageReport};
pub use sink::{
    FactorSample, Factors, GradSample, Gradient, NanPolicy, RepresentationChoice, SampleSink,
    SinkOptions, SinkReport, SkippedSample,
};
pub use verify::{verify, VerifyReport};
pub use writer::{
    LiveCounters, Representation, SampleHandle, SampleMeta, StoreWriter, WriteReport, WriterOptions,
};

/// Salvages the store at `dir`: rebuilds a damaged commit log from what reads whole
/// (the samples, the log, the shard footers), then rebuilds `stats/` from the kept
/// samples (a side log that cannot be used is set aside or cut; see
/// [`stats::salvage_stats`]). With `dry_run`, says what it would do and changes
/// nothing. The report's `actions` list both parts in order.
pub fn salvage(dir: &Path, dry_run: bool) -> Result<SalvageReport> {
    salvage_with(
        dir,
        &SalvageOptions {
            dry_run,
            spec_from: None,
        },
    )
}

/// [`salvage`] with options: `spec_from` names where a missing or unreadable
/// manifest's description comes from (see [`SalvageOptions`]).
pub fn salvage_with(dir: &Path, opts: &SalvageOptions) -> Result<SalvageReport> {
    let mut rep = salvage::salvage_with(dir, opts)?;
    rep.actions.extend(stats::salvage_stats(dir, opts.dry_run)?);
    Ok(rep)
}

pub(crate) fn shards_dir(dir: &Path) -> PathBuf {
    dir.join("shards")
}

pub(crate) fn log_path(dir: &Path) -> PathBuf {
    dir.join("samples.log")
}

pub(crate) fn lock_path(dir: &Path) -> PathBuf {
    dir.join("LOCK")
}

/// Marker file of a store whose making is not finished (a `merge` in progress or
/// killed). Readers refuse such a store; the file says how to finish it.
pub const UNFINISHED_FILE: &str = "UNFINISHED";

/// Path of the unfinished-work marker of a store.
pub fn unfinished_path(dir: &Path) -> PathBuf {
    dir.join(UNFINISHED_FILE)
}

/// The marker's text when `dir` is marked unfinished.
pub fn unfinished(dir: &Path) -> Option<String> {
    let p = unfinished_path(dir);
    match std::fs::read_to_string(&p) {
        Ok(t) => Some(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("(unreadable marker: {e})")),
    }
}

/// Path of shard `no`: `shards/shard-000042.gss`.
pub fn shard_path(dir: &Path, no: u32) -> PathBuf {
    shards_dir(dir).join(format!("shard-{no:06}.gss"))
}

/// Maps a whole file read-only. Shard files are only appended to (or, by a recovering
/// writer holding the lock, truncated past uncommitted bytes), so bytes a committed
/// record points at do not change while mapped.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    use error::IoContext;
    let f = std::fs::File::open(path).at(path)?;
    // SAFETY: see above; readers only touch committed byte ranges.
    unsafe { memmap2::Mmap::map(&f) }.at(path)
}

/// Bytes advised at each end of a shard by [`advise_shard_ends`]: the header, and the
/// footer (the list of sealed tables, 16 bytes a sample, and its trailer).
const SHARD_END_ADVICE: usize = 64 << 10;

/// `madvise(WILLNEED)` on the first and last [`SHARD_END_ADVICE`] bytes of a mapped
/// shard, where its header and footer lie: callers that parse many shards advise them
/// all first, so that a cold store's headers and footers are fetched at once rather
/// than one page fault after another. Advice only; its error changes nothing.
pub(crate) fn advise_shard_ends(m: &memmap2::Mmap) {
    if m.is_empty() {
        return;
    }
    let n = m.len().min(SHARD_END_ADVICE);
    let _ = m.advise_range(memmap2::Advice::WillNeed, 0, n);
    let _ = m.advise_range(memmap2::Advice::WillNeed, m.len() - n, n);
}

pub(crate) fn parse_shard_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("shard-")?.strip_suffix(".gss")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
