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

    /// A sample cannot be computed (e.g. too long for the memory available).
    #[error("task `{task}` sample {id}: {what}")]
    Sample {
        task: TaskName,
        id: SampleId,
        what: String,
    },

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
