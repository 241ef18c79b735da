//! Shared vocabulary of gradshard: ids, blocks, dtypes, and the attention
//! head-slice geometry of every supported Hugging Face architecture.
//!
//! Nothing here does I/O beyond reading a `config.json` file; byte formats live
//! in `gradshard-format`, storage in `gradshard-store`.

mod dtype;
mod error;
pub mod factor;
mod geometry;
mod ids;

pub use dtype::{bf16_bits_to_f32, f32_to_bf16_bits, DType};
pub use error::{Error, Result};
pub use geometry::{
    nested_text_config, AttnTensor, Axis, Geometry, Layout, OtherTensor, SliceSpec,
    GEMMA3_TEXT_DEFAULTS, SUPPORTED_MODEL_TYPES,
};
pub use ids::{Block, HeadId, LayerId, SampleId, TaskName};
