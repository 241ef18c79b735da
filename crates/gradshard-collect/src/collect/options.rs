//! The settings, events and report of a collect run.

use std::path::PathBuf;
use std::time::Duration;

use gradshard_core::{DType, SampleId, TaskName};
use gradshard_models::{CpuEngine, Device, ParamSet};
use gradshard_store::{stats, CodecSpec, WriteReport, WriterOptions};
pub use gradshard_store::{NanPolicy, RepresentationChoice, SkippedSample};

/// `k/N`: this worker takes the samples whose 0-based index in their task file

/// (among the samples the reader yields) is ≡ k mod N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSplit {
    pub k: usize,
    pub n: usize,
}

impl Default for WorkerSplit {
    fn default() -> Self {
        WorkerSplit { k: 0, n: 1 }
    }
}

impl std::str::FromStr for WorkerSplit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected K/N, e.g. 0/4"))?;
        let k: usize = k.trim().parse().map_err(|_| format!("`{s}`: bad K"))?;
        let n: usize = n.trim().parse().map_err(|_| format!("`{s}`: bad N"))?;
        if n == 0 || k >= n {
            return Err(format!("`{s}`: need 0 <= K < N"));
        }
        Ok(WorkerSplit { k, n })
    }
}

/// Settings of one collect run (the CLI flags).
#[derive(Debug, Clone)]
pub struct CollectOptions {
    pub model_dir: PathBuf,
    /// (task, JSONL file), in order.
    pub tasks: Vec<(TaskName, PathBuf)>,
    pub store: PathBuf,
    pub params: ParamSet,
    pub dtype: DType,
    pub codec: CodecSpec,
    pub device: Device,
    /// Which engine runs the model on the CPU.
    pub cpu_engine: CpuEngine,
    /// Only the first N samples of each task file (before the worker split).
    pub max_samples: Option<usize>,
    /// Truncate each sample to this many tokens.
    pub max_tokens: Option<usize>,
    /// Samples per backward pass.
    pub batch: usize,
    pub nan_policy: NanPolicy,
    pub worker: WorkerSplit,
    /// Also write `stats/<task>.fisher.safetensors`.
    pub full_fisher: bool,
    /// Benchmark mode: compute gradients, cut frames and sum statistics, but
    /// store nothing (the model-only speed).
    pub model_only: bool,
    /// Full slices, factors, or per sample the smaller (`--representation`).
    pub representation: RepresentationChoice,
    pub writer: WriterOptions,
}

impl CollectOptions {
    pub fn new(model_dir: impl Into<PathBuf>, store: impl Into<PathBuf>) -> CollectOptions {
        CollectOptions {
            model_dir: model_dir.into(),
            tasks: Vec::new(),
            store: store.into(),
            params: ParamSet::Attn,
            dtype: DType::Bf16,
            codec: CodecSpec::DEFAULT,
            device: Device::Cpu,
            cpu_engine: CpuEngine::Auto,
            max_samples: None,
            max_tokens: None,
            batch: 1,
            nan_policy: NanPolicy::Error,
            worker: WorkerSplit::default(),
            full_fisher: false,
            model_only: false,
            representation: RepresentationChoice::Auto,
            writer: WriterOptions::default(),
        }
    }
}

/// Events for a progress display.
#[derive(Debug, Clone)]
pub enum CollectEvent {
    /// The model is loaded and the store open.
    Started {
        /// Samples of this worker's share (non-empty lines after the worker split
        /// and --max-samples), including those already committed.
        planned: u64,
        values_per_sample: u64,
    },
    /// A sample was handed to the writer.
    Sample {
        task: TaskName,
        id: SampleId,
        done: u64,
    },
    /// A sample was left out.
    Skipped {
        task: TaskName,
        id: SampleId,
        why: String,
    },
    /// Something the user should know that is not an error (an empty task file,
    /// samples without ids).
    Warning(String),
    /// The writer finished; statistics are being rebuilt.
    Finishing,
}

/// What a collect run did.
#[derive(Debug, Clone)]
pub struct CollectReport {
    pub write: WriteReport,
    /// Samples computed and stored by this run.
    pub stored: u64,
    /// Samples of this worker's share already in the store (resume).
    pub resumed: u64,
    /// Samples left out: fewer than 2 tokens, non-finite gradients.
    pub skipped: Vec<SkippedSample>,
    /// Time in the model (forward + backward, including reading the input).
    pub compute_time: Duration,
    /// Time cutting frames and summing Fisher statistics on the model thread.
    pub prepare_time: Duration,
    /// Time the model thread waited on the writer (budget full): 0 means the
    /// disk never held the model back.
    pub blocked_time: Duration,
    pub elapsed: Duration,
    pub stats: stats::RebuildReport,
    pub full_fisher: Vec<PathBuf>,
    /// Gradient values per sample (all tracked tensors).
    pub values_per_sample: u64,
    /// Bytes per stored value (the store's dtype).
    pub dtype_bytes: u64,
    /// Samples stored as full slices and as factors by this run.
    pub full_samples: u64,
    pub factored_samples: u64,
    /// Values handed to the writer by this run (factors count their own size).
    pub values_stored: u64,
    /// The engine that computed the gradients (`native`, `burn`, `burn-cuda`).
    pub engine: &'static str,
}
