use std::path::PathBuf;

use gradshard_core::{SampleId, TaskName};

/// Store errors. Each names the file and, where it applies, the task, sample,
/// tensor or slice at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: Box<gradshard_format::Error>,
    },
    #[error(transparent)]
    Core(#[from] gradshard_core::Error),
    #[error(transparent)]
    Index(#[from] gradshard_index::Error),
    #[error("{path}: invalid manifest: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error(
        "{path}: store was written by format version {found}; this build reads {oldest}..={newest}"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u16,
        oldest: u16,
        newest: u16,
    },
    #[error("store {store} is being written by another process ({holder}, holding a lock on {lock}); wait for it to finish or stop it. Do not delete the lock file: the lock is released when that process ends, even if it is killed, and a new writer then recovers the store by itself")]
    Locked {
        store: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error("store {store} does not match the input: {field} is {store_value} in the store but {input_value} in the input")]
    Mismatch {
        store: PathBuf,
        field: String,
        store_value: String,
        input_value: String,
    },
    #[error("task `{task}` sample {id}: {what}: {detail}")]
    Sample {
        task: TaskName,
        id: SampleId,
        what: String,
        detail: String,
    },
    #[error("{path}: task `{task}` sample {id} {slice}: {source}")]
    Corrupt {
        path: PathBuf,
        task: TaskName,
        id: SampleId,
        slice: String,
        #[source]
        source: Box<gradshard_format::Error>,
    },
    #[error("{path}: {what}")]
    Input { path: PathBuf, what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the writer pipeline stopped: {0}")]
    Pipeline(String),
    /// A statistics file (`stats/<task>.json`, `stats/samples.bin`) is malformed.
    #[error("{path}: {what}")]
    Stats { path: PathBuf, what: String },
    /// A statistics file of version 1 (no checksum): recomputed where it is needed,
    /// reported by `verify` as a warning.
    #[error("{path}: statistics version 1, written by an older gradshard without a checksum; `gradshard salvage --store {store}` rebuilds it from the samples")]
    StatsWithoutChecksum { path: PathBuf, store: PathBuf },
    /// Stores that cannot be merged, with the reason.
    #[error("merge: {0}")]
    Merge(String),
    /// A gradient value is NaN or infinite (`NanPolicy::Error`).
    #[error("task `{task}` sample {id}: tensor `{tensor}` has a non-finite gradient {value} at flat index {index} (use --nan-policy skip to leave such samples out)")]
    NonFinite {
        task: TaskName,
        id: SampleId,
        tensor: String,
        index: usize,
        value: f32,
    },
    /// A sample handed to the per-sample sink does not fit the store (tensor names,
    /// shapes, factor sizes, T).
    #[error("task `{task}` sample {id}: {what}")]
    SampleInput {
        task: TaskName,
        id: SampleId,
        what: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `map_err` helper: an I/O error on `path`.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl<T> IoContext<T> for gradshard_format::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Format {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}
