use std::path::PathBuf;

/// Errors of the exporter. A failed export leaves no half-written output directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("output directory {0} already exists and is not empty (pass overwrite to replace it)")]
    OutputExists(PathBuf),
    /// `overwrite` replaces only a previous score output (see [`crate::check_replaceable`]).
    #[error("output directory {path} is not replaced: {why}")]
    NotAScoreOutput { path: PathBuf, why: String },
    #[error("arrow table `{table}`: {source}")]
    Arrow {
        table: &'static str,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("parquet file `{table}`: {source}")]
    Parquet {
        table: &'static str,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("summary.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("picture {path}: {message}")]
    Picture { path: PathBuf, message: String },
    #[error("schema `{table}`: {message}")]
    Schema { table: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
