//! The sizes of a model, read once from its config and bounded before anything
//! is allocated or written: every command (`collect`, `make-model`, `plan`,
//! `ingest`, `synth --config`) reads them here, and the attention
//! [`Geometry`] is derived from them.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::geometry::{Geometry, Layout};

use super::kinds::Arch;
use super::reader::Reader;

/// Upper bounds of every size a config may declare. They are far above any
/// published checkpoint and keep every derived count far from overflow; a
/// config past one is refused before anything is allocated or written.
pub mod limits {
    /// `num_hidden_layers` / `n_layer`.
    pub const LAYERS: usize = 1 << 12;
    /// `num_attention_heads` and `num_key_value_heads`.
    pub const HEADS: usize = 1 << 12;
    /// `hidden_size` / `n_embd`.
    pub const HIDDEN: usize = 1 << 20;
    /// `head_dim`.
    pub const HEAD_DIM: usize = 1 << 16;
    /// `vocab_size` (and BERT's `type_vocab_size`).
    pub const VOCAB: usize = 1 << 24;
    /// `intermediate_size` / `n_inner`.
    pub const INTERMEDIATE: usize = 1 << 22;
    /// Rows of a learned position table (`n_positions`, BERT's `max_position_embeddings`).
    pub const POSITIONS: usize = 1 << 24;
}

/// The sizes of a model as its config declares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub arch: Arch,
    /// L.
    pub layers: usize,
    /// D, the residual width.
    pub hidden: usize,
    /// H, query heads.
    pub heads: usize,
    /// H_kv, key/value heads (divides H).
    pub kv_heads: usize,
    /// d, from `head_dim` when written, else D / H.
    pub head_dim: usize,
    /// `vocab_size`, when written.
    pub vocab: Option<usize>,
    /// F, the MLP width (`intermediate_size`; GPT-2: `n_inner` or 4 D), when known.
    pub intermediate: Option<usize>,
    /// The language model is nested in the checkpoint (`gemma3`'s `text_config`).
    pub nested: bool,
}

/// `value` of `field` within `limit`.
pub(crate) fn bounded(r: &Reader<'_>, field: &str, value: usize, limit: usize) -> Result<usize> {
    if value > limit {
        return Err(r.err(format!("`{field}` {value} is out of range (limit {limit})")));
    }
    Ok(value)
}

impl ModelShape {
    /// The shape of a parsed `config.json`; `path` names the file in errors.
    pub fn from_value(path: &Path, v: &Value) -> Result<ModelShape> {
        let r = Reader::new(path, v);
        let model_type = r.req_str("model_type")?;
        if model_type == "gemma3" {
            let text = super::nested::gemma3_text_config(&r)?;
            let mut s = ModelShape::read(&r.at(&text), Arch::Gemma3Text, false)
                .map_err(|e| super::nested::in_text_config(&r, e))?;
            s.nested = true;
            return Ok(s);
        }
        let arch =
            Arch::from_model_type(&model_type).ok_or_else(|| unsupported(path, &model_type))?;
        ModelShape::read(&r, arch, false)
    }

    /// The attention geometry of a parsed `config.json` (named `config.json` in errors).
    pub fn geometry_of(v: &Value) -> Result<Geometry> {
        ModelShape::from_value(Path::new("config.json"), v)?.geometry()
    }

    /// Reads `config.json` (or the one in a directory).
    pub fn from_path(path: &Path) -> Result<ModelShape> {
        let (file, v) = super::read_config(path)?;
        ModelShape::from_value(&file, &v)
    }

    /// The sizes under the usual names of `arch` (GPT-2: `n_layer`, `n_embd`,
    /// `n_head`, `n_inner`, or the usual names), each within [`limits`].
    /// `head_dim_required`: the family has no D / H default (Gemma).
    pub(crate) fn read(r: &Reader<'_>, arch: Arch, head_dim_required: bool) -> Result<ModelShape> {
        let gpt2 = arch == Arch::Gpt2;
        let keys = |new: &'static str, old: &'static str| -> Vec<&'static str> {
            if gpt2 {
                vec![old, new]
            } else {
                vec![new]
            }
        };
        let layer_keys = keys("num_hidden_layers", "n_layer");
        let layers = r.positive_of(&layer_keys)?;
        bounded(r, layer_keys[0], layers, limits::LAYERS)?;
        let hidden_keys = keys("hidden_size", "n_embd");
        let hidden = r.positive_of(&hidden_keys)?;
        bounded(r, hidden_keys[0], hidden, limits::HIDDEN)?;
        let heads_keys = keys("num_attention_heads", "n_head");
        let heads = r.positive_of(&heads_keys)?;
        bounded(r, heads_keys[0], heads, limits::HEADS)?;
        let kv_heads = if gpt2 {
            heads
        } else {
            r.opt_usize("num_key_value_heads")?.unwrap_or(heads)
        };
        bounded(r, "num_key_value_heads", kv_heads, limits::HEADS)?;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(r.err(format!(
                "`num_key_value_heads` ({kv_heads}) must divide `num_attention_heads` ({heads})"
            )));
        }
        let head_dim = match if gpt2 { None } else { r.opt_usize("head_dim")? } {
            Some(0) => return Err(r.err("`head_dim` must be > 0".into())),
            Some(d) => bounded(r, "head_dim", d, limits::HEAD_DIM)?,
            None if head_dim_required => return Err(r.err("missing `head_dim`".into())),
            None => {
                if !hidden.is_multiple_of(heads) {
                    return Err(r.err(format!(
                        "no `head_dim` and `{}` {hidden} is not a multiple of {heads} heads",
                        hidden_keys[0]
                    )));
                }
                hidden / heads
            }
        };
        let vocab = r.opt_positive_of(&["vocab_size"])?;
        if let Some(v) = vocab {
            bounded(r, "vocab_size", v, limits::VOCAB)?;
        }
        let inter_keys = keys("intermediate_size", "n_inner");
        let intermediate = match r.opt_positive_of(&inter_keys)? {
            Some(f) => Some(bounded(r, inter_keys[0], f, limits::INTERMEDIATE)?),
            // GPT-2's default MLP width.
            None if gpt2 => Some(bounded(r, "n_inner", 4 * hidden, limits::INTERMEDIATE)?),
            None => None,
        };
        Ok(ModelShape {
            arch,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            vocab,
            intermediate,
            nested: false,
        })
    }

    /// The layout of the attention weights in the checkpoint.
    pub fn layout(&self) -> Layout {
        match self.arch {
            Arch::Phi3 => Layout::FusedQkv,
            Arch::Gpt2 => Layout::Gpt2Conv1d,
            Arch::GptNeox => Layout::NeoxInterleaved,
            _ => Layout::SplitLinear,
        }
    }

    /// Where the weights start in a checkpoint written by transformers.
    pub fn root(&self) -> &'static str {
        match self.arch {
            // transformers 5 layout of a Gemma 3 checkpoint (see `Geometry::detect_root`).
            _ if self.nested => "model.language_model.",
            Arch::Gpt2 => "transformer.",
            Arch::GptNeox => "gpt_neox.",
            Arch::Bert => "bert.",
            _ => "model.",
        }
    }

    /// The attention geometry: where every head slice lives.
    pub fn geometry(&self) -> Result<Geometry> {
        Geometry::new(
            self.arch.as_str(),
            self.layout(),
            self.root(),
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads,
            self.head_dim,
        )
    }
}

pub(crate) fn unsupported(path: &Path, model_type: &str) -> Error {
    Error::UnsupportedModel {
        path: path.to_path_buf(),
        model_type: model_type.to_string(),
        supported: Arch::MODEL_TYPES.join(", "),
    }
}
