//! The crate's single error type. Every variant names the file, and where it
//! applies the tensor or the line, so a user can find the problem without a
//! debugger.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading a model, reading samples,
/// computing gradients or writing them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file or directory.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `config.json` (or the shard index) is not valid JSON or lacks a field.
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },

    /// `model_type` names an architecture this crate does not implement.
    #[error(
        "{path}: unsupported model_type {model_type:?} (supported: llama, mistral, qwen2, qwen3, gpt2, gpt_neox, phi3, bert, gemma2, gemma3_text, gemma3, olmo2)"
    )]
    UnsupportedModel { path: PathBuf, model_type: String },

    /// A config feature this crate does not implement (e.g. a RoPE scaling type).
    #[error("{path}: unsupported configuration: {what}")]
    Unsupported { path: PathBuf, what: String },

    /// The safetensors container itself is malformed.
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    /// A weight the architecture needs is not in the checkpoint.
    #[error("{path}: missing weight `{tensor}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
    },

    /// The checkpoint holds a weight the architecture does not use.
    #[error(
        "{path}: unexpected weight `{tensor}` with shape {shape:?} (not part of this {arch} model)"
    )]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        arch: String,
    },

    /// A weight is present but its shape disagrees with config.json.
    #[error(
        "{path}: weight `{tensor}` has shape {found:?}, expected {expected:?} from config.json"
    )]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A weight is stored in a dtype we cannot convert to f32.
    #[error("{path}: weight `{tensor}` has unsupported dtype {dtype} (supported: F32, BF16, F16)")]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    /// `tokenizer.json` could not be loaded or could not encode a text.
    #[error("{path}: tokenizer error: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    /// A malformed line in a JSONL task file (line numbers start at 1).
    #[error("{path}:{line}: {msg}")]
    Input {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    /// A problem with an output file (e.g. an id that is not a safe file name).
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },

    /// A tensor operation or data transfer failed on the backend.
    #[error("backend error while {context}: {msg}")]
    Backend { context: String, msg: String },

    /// The requested device is not available in this build or on this machine.
    #[error("device {device}: {msg}")]
    Device { device: String, msg: String },

    /// An invalid argument (e.g. batch size 0).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Any other error of the model description or geometry.
    #[error(transparent)]
    Core(gradshard_core::Error),
}

/// The description's config errors keep this crate's variants (each names the file).
impl From<gradshard_core::Error> for Error {
    fn from(e: gradshard_core::Error) -> Self {
        use gradshard_core::Error as C;
        match e {
            C::Io { path, source } => Error::Io { path, source },
            C::Config { path, msg } => Error::Config { path, msg },
            C::UnsupportedModel {
                path, model_type, ..
            } => Error::UnsupportedModel { path, model_type },
            C::Unsupported { path, what } => Error::Unsupported { path, what },
            other => Error::Core(other),
        }
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
