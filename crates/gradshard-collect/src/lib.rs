//! Phase 1 of gradshard: per-sample gradients of a Hugging Face model (computed
//! with burn by `gradshard-models`) streamed into a store through its bounded
//! writer pipeline, with running Fisher statistics per task, resume after a
//! crash, deterministic worker shares and the merge of worker stores.
//!
//! Entry points: [`collect`], [`merge`], [`stats::rebuild`].

mod collect;
mod error;
pub mod fisher;
mod merge;
pub mod stats;

pub use collect::{
    collect, factored_values, full_values, spec_from_params, CollectEvent, CollectOptions,
    CollectReport, NanPolicy, RepresentationChoice, SkippedSample, WorkerSplit,
};
pub use error::{Error, Result};
pub use merge::{merge, merge_with, MergeEvent, MergeReport};
