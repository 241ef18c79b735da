//! Shared vocabulary of gradshard: ids, blocks, dtypes, the model description
//! (a Hugging Face `config.json` parsed once: [`model`]) and the attention
//! head-slice geometry of every supported architecture.
//!
//! Nothing here does I/O beyond reading a `config.json` file; byte formats live
//! in `gradshard-format`, storage in `gradshard-store`.

mod dtype;
mod error;
pub mod factor;
mod geometry;
mod ids;
pub mod model;

pub use dtype::{bf16_bits_to_f32, f32_to_bf16_bits, DType};
pub use error::{Error, Result};
pub use geometry::{AttnTensor, Axis, Geometry, Layout, OtherTensor, SliceSpec};
pub use ids::{Block, HeadId, LayerId, SampleId, TaskName};
pub use model::{ModelConfig, ModelShape};
