//! Named model shapes (`synth --preset`, `make-model --preset`): attention and
//! MLP sizes of public checkpoints, written as the Hugging Face config a
//! checkpoint of that shape would carry, so that every command reads them
//! through the one description ([`ModelShape`]).

use serde_json::{json, Value};

use crate::error::{Error, Result};

use super::shape::ModelShape;

/// A named shape: (name, model_type, layers, hidden, heads, kv_heads, head_dim, intermediate).
pub type Preset = (
    &'static str,
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// The named shapes.
pub const PRESETS: &[Preset] = &[
    ("tiny", "llama", 2, 64, 4, 2, 16, 96),
    ("small", "llama", 4, 512, 8, 4, 64, 1376),
    ("llama-0.9b", "llama", 16, 2048, 16, 16, 128, 5632),
    ("llama-2-7b", "llama", 32, 4096, 32, 32, 128, 11008),
    ("llama-3-8b", "llama", 32, 4096, 32, 8, 128, 14336),
    ("gpt2", "gpt2", 12, 768, 12, 12, 64, 3072),
];

/// Vocabulary of a preset unless one is given.
pub const PRESET_VOCAB: usize = 32000;

fn find(name: &str) -> Result<&'static Preset> {
    PRESETS
        .iter()
        .find(|p| p.0 == name)
        .ok_or_else(|| Error::UnknownPreset {
            name: name.to_string(),
            known: PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
        })
}

/// The Hugging Face config of preset `name`, with `layers` (default: the
/// preset's) and `vocab`. Sizes are not checked here; [`ModelShape`] checks them.
pub fn preset_config(name: &str, layers: Option<usize>, vocab: usize) -> Result<Value> {
    let &(_, model_type, l, hidden, heads, kv_heads, head_dim, ff) = find(name)?;
    let layers = layers.unwrap_or(l);
    Ok(if model_type == "gpt2" {
        json!({"model_type": "gpt2", "n_embd": hidden, "n_layer": layers, "n_head": heads,
               "n_inner": ff, "n_positions": 1024, "vocab_size": vocab,
               "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"})
    } else {
        json!({"model_type": model_type, "hidden_size": hidden, "intermediate_size": ff,
               "num_hidden_layers": layers, "num_attention_heads": heads,
               "num_key_value_heads": kv_heads, "head_dim": head_dim,
               "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "max_position_embeddings": 4096, "tie_word_embeddings": false,
               "hidden_act": "silu"})
    })
}

/// The shape of preset `name` (its own layer count, [`PRESET_VOCAB`]).
pub fn preset_shape(name: &str) -> Result<ModelShape> {
    let v = preset_config(name, None, PRESET_VOCAB)?;
    ModelShape::from_value(std::path::Path::new(&format!("preset `{name}`")), &v)
}
