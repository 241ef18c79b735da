//! The crate's error type: every variant names the store, file, task, sample
//! or tensor it is about.

use std::path::PathBuf;

use gradshard_core::{SampleId, TaskName};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Boxed: the store's error is large and this type travels through every `?`.
    #[error(transparent)]
    Store(Box<gradshard_store::Error>),

    #[error(transparent)]
    Model(#[from] gradshard_models::Error),

    #[error(transparent)]
    Core(#[from] gradshard_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A gradient value is NaN or infinite (`--nan-policy error`).
    #[error("task `{task}` sample {id}: tensor `{tensor}` has a non-finite gradient {value} at flat index {index} (use --nan-policy skip to leave such samples out)")]
    NonFinite {
        task: TaskName,
        id: SampleId,
        tensor: String,
        index: usize,
        value: f32,
    },

    /// The model's gradients do not match what the store holds.
    #[error("task `{task}` sample {id}: {what}")]
    Sample {
        task: TaskName,
        id: SampleId,
        what: String,
    },

    /// A statistics side file is malformed.
    #[error("{path}: {what}")]
    Stats { path: PathBuf, what: String },

    /// A statistics file of version 1 (no checksum): recomputed where it is needed,
    /// reported by `verify` as a warning.
    #[error("{path}: statistics version 1, written by an older gradshard without a checksum; `gradshard salvage --store {store}` rebuilds it from the samples")]
    StatsWithoutChecksum { path: PathBuf, store: PathBuf },

    /// Stores that cannot be merged, with the reason.
    #[error("merge: {0}")]
    Merge(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

impl From<gradshard_store::Error> for Error {
    fn from(e: gradshard_store::Error) -> Self {
        Error::Store(Box::new(e))
    }
}
