use std::path::PathBuf;

use gradshard_core::{Block, SampleId};

/// Errors of the scorer. Every variant names the task, sample, layer, block or
/// head at fault; nothing is ever replaced by a zero.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown task `{task}` (the source holds: {known})")]
    UnknownTask { task: String, known: String },
    #[error("task `{task}` has no samples")]
    EmptyTask { task: String },
    #[error("task `{task}` has no sample with id {id}")]
    UnknownSample { task: String, id: SampleId },
    #[error("task `{task}`, sample {id}: token count T = 0 (C = g²/T is undefined)")]
    ZeroTokens { task: String, id: SampleId },
    #[error("block {block} is not in the store (it is an error, never zeros)")]
    MissingBlock { block: Block },
    #[error("geometry mismatch: {what}: expected {expected}, found {found}")]
    GeometryMismatch {
        what: String,
        expected: String,
        found: String,
    },
    #[error(
        "non-finite gradient value {value} in task `{task}`, sample {id}, layer {layer}, block {block}, head {head}, element {element}"
    )]
    NonFinite {
        task: String,
        id: SampleId,
        layer: usize,
        block: Block,
        head: usize,
        element: usize,
        value: f32,
    },
    #[error("non-finite gradient value {value} in task `{task}`, sample {id}, tensor `{tensor}`, element {element}")]
    NonFiniteOther {
        task: String,
        id: SampleId,
        tensor: String,
        element: usize,
        value: f32,
    },
    #[error("non-finite score in layer {layer}, block {block}, head {head} (overflow of C/den: raise eps or lam)")]
    NonFiniteScore {
        layer: usize,
        block: Block,
        head: usize,
    },
    #[error("invalid option `{name}`: {why}")]
    InvalidOption { name: &'static str, why: String },
    #[error(
        "memory budget {budget} bytes is too small: one column of the slice tile needs {needed} bytes"
    )]
    BudgetTooSmall { budget: usize, needed: usize },
    #[error("tile source returned {found} values for task `{task}` layer {layer} block {block} head {head}, expected {expected}")]
    TileLength {
        task: String,
        layer: usize,
        block: Block,
        head: usize,
        expected: usize,
        found: usize,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Fixture { path: PathBuf, message: String },
    #[error("backend {backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
    #[error(transparent)]
    Core(#[from] gradshard_core::Error),
    /// An error raised by a [`TileSource`](crate::TileSource) implementation
    /// (a store reader), with the context of the read that failed.
    #[error("{context}: {source}")]
    Source {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// Wraps a source implementation's own error, with what was being read.
    pub fn source(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Source {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
