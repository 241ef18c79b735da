use std::path::PathBuf;

/// Errors of the core crate. Every variant names the file, tensor or field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `config.json` is not valid JSON, lacks a field, or has one out of range.
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    /// `model_type` names an architecture gradshard does not know.
    #[error("{path}: unsupported model_type {model_type:?} (supported: {supported})")]
    UnsupportedModel {
        path: PathBuf,
        model_type: String,
        supported: String,
    },
    /// A config feature gradshard does not implement (e.g. a RoPE scaling type).
    #[error("{path}: unsupported configuration: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// A named model shape (`synth --preset`, `make-model --preset`) that does not exist.
    #[error("unknown preset `{name}` (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("config: field `{field}` is {problem}")]
    ConfigField { field: String, problem: String },
    #[error("config: unsupported model_type `{model_type}` (supported: {supported})")]
    UnsupportedModelType {
        model_type: String,
        supported: String,
    },
    #[error("tensor `{tensor}`: expected shape {expected:?}, found {actual:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{tensor}`: {len} values do not fill shape {shape:?}")]
    LengthMismatch {
        tensor: String,
        shape: Vec<usize>,
        len: usize,
    },
    #[error("unknown attention tensor `{0}` for this architecture (no head layout known)")]
    UnknownLayout(String),
    #[error("invalid {what} `{value}`: {why}")]
    InvalidId {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{what} {value} is out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        value: usize,
        limit: usize,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
