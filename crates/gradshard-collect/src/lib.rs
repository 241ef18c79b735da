//! Phase 1 of gradshard: per-sample gradients of a Hugging Face model (computed
//! with burn or the native engine by `gradshard-models`) streamed into a store
//! through the store's per-sample sink and writer pipeline, with resume after a
//! crash and deterministic worker shares.
//!
//! What is about the store's own files lives in `gradshard-store`: the per-sample
//! sink ([`gradshard_store::SampleSink`]), the statistics (`gradshard_store::stats`),
//! the full Fisher and `merge`.
//!
//! Entry point: [`collect`].

mod collect;
mod error;

pub use collect::{
    collect, spec_from_params, CollectEvent, CollectOptions, CollectReport, NanPolicy,
    RepresentationChoice, SkippedSample, WorkerSplit,
};
pub use error::{Error, Result};
pub use gradshard_store::sink::{factored_values, full_values};
/// The statistics of a store (`stats/`), owned by `gradshard-store`.
pub use gradshard_store::stats;
