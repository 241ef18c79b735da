//! The model description: a Hugging Face `config.json` parsed once, here, into
//! what every part of gradshard needs to know about a model.
//!
//! - [`ModelShape`]: the sizes (layers, hidden, heads, kv heads, head_dim,
//!   vocab, intermediate), each bounded by [`limits`] before anything is
//!   allocated or written, and the attention [`Geometry`](crate::Geometry)
//!   derived from them. Read by every command, including those that need only
//!   the attention layout (`ingest`, `synth --config`, `plan`).
//! - [`ModelConfig`]: the full description a forward pass runs from — GPT-2's
//!   [`Gpt2Config`], or for every other family a [`DecoderConfig`] for the one
//!   generic decoder, with the Hugging Face names of each tensor role
//!   ([`roles`]). Its sizes are read by [`ModelShape`]'s own reader.
//! - [`PRESETS`]: named shapes, as the configs a checkpoint of that shape carries.
//!
//! Adding a family: a variant of [`Arch`] (its `model_type`), its sizes'
//! names if they differ (`shape.rs`), one `describe_*` function
//! (`families.rs`) and one [`Roles`] table (`decoder.rs`), and its test.
//! docs/models.md walks through it.

mod config;
mod decoder;
mod families;
mod kinds;
mod nested;
mod presets;
mod reader;
mod shape;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub use config::{Gpt2Config, ModelConfig};
pub use decoder::{
    roles, DecoderConfig, HeadKind, LayerKind, MlpKind, NormKind, NormPlacement, Positions, QkNorm,
    QkvLayout, Roles,
};
pub use kinds::{Activation, Arch, RopeConfig, RopeScaling};
pub use nested::GEMMA3_TEXT_DEFAULTS;
pub use presets::{preset_config, preset_shape, Preset, PRESETS, PRESET_VOCAB};
pub use shape::{limits, ModelShape};

/// The `config.json` at `path` (or in the directory `path`): its file name and
/// its JSON.
pub fn read_config(path: &Path) -> Result<(PathBuf, Value)> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
        path: file.clone(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: file.clone(),
        msg: e.to_string(),
    })?;
    Ok((file, v))
}

#[cfg(test)]
mod tests;
