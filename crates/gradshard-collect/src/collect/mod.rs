//! `gradshard collect`: model → per-sample gradients (or factors) → the store's
//! per-sample sink ([`gradshard_store::SampleSink`]: frames, Σ g²/T statistics, side
//! log, representation) → its writer pipeline (bounded queue → compression workers →
//! appender).
//!
//! - `options`: the settings of a run ([`CollectOptions`]), its progress events and
//!   its report.
//! - `run`: loading the model, choosing the samples (`--max-samples`, `--worker k/N`,
//!   resume), running the model and handing each sample to the sink.

mod options;
mod run;

pub use options::{
    CollectEvent, CollectOptions, CollectReport, NanPolicy, RepresentationChoice, SkippedSample,
    WorkerSplit,
};
pub use run::{collect, spec_from_params};
