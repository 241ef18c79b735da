//! A parsed `config.json`: the full description a forward pass runs from.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::geometry::Geometry;

use super::decoder::DecoderConfig;
use super::kinds::{Activation, Arch};
use super::reader::Reader;
use super::shape::{bounded, limits, ModelShape};

/// GPT-2 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width, `n_inner` or 4 * n_embd.
    pub n_inner: usize,
    /// Number of learned positions; sequences longer than this are an error.
    pub n_positions: usize,
    pub layer_norm_epsilon: f64,
    pub act: Activation,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub tie_word_embeddings: bool,
}

/// A parsed `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    /// Every other family, described for the generic decoder (`families.rs`).
    Decoder(DecoderConfig),
}

/// `model_type`s whose forward pass is implemented.
const RUNNABLE: &str =
    "llama, mistral, qwen2, qwen3, gpt2, gpt_neox, phi3, bert, gemma2, gemma3_text, gemma3, olmo2";

impl ModelConfig {
    pub fn arch(&self) -> Arch {
        match self {
            ModelConfig::Gpt2(_) => Arch::Gpt2,
            ModelConfig::Decoder(c) => c.arch,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Decoder(c) => c.vocab_size,
        }
    }

    /// Longest sequence the model accepts (GPT-2's learned positions); None = unbounded.
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            ModelConfig::Gpt2(c) => Some(c.n_positions),
            ModelConfig::Decoder(c) => c.max_positions,
        }
    }

    /// The sizes of the model.
    pub fn shape(&self) -> ModelShape {
        match self {
            ModelConfig::Gpt2(c) => ModelShape {
                arch: Arch::Gpt2,
                layers: c.n_layer,
                hidden: c.n_embd,
                heads: c.n_head,
                kv_heads: c.n_head,
                head_dim: c.n_embd / c.n_head,
                vocab: Some(c.vocab_size),
                intermediate: Some(c.n_inner),
                nested: false,
            },
            ModelConfig::Decoder(c) => ModelShape {
                arch: c.arch,
                layers: c.num_layers,
                hidden: c.hidden_size,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                vocab: Some(c.vocab_size),
                intermediate: Some(c.intermediate_size),
                nested: c.nested,
            },
        }
    }

    /// The attention geometry (where every head slice lives).
    pub fn geometry(&self) -> Result<Geometry> {
        self.shape().geometry()
    }

    /// Reads and parses `path` (a `config.json`, or a directory holding one).
    pub fn from_file(path: &Path) -> Result<Self> {
        let (file, v) = super::read_config(path)?;
        Self::from_value(&file, &v)
    }

    /// Parses an already-loaded JSON value; `path` is used in error messages only.
    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let r = Reader::new(path, v);
        let model_type = r.req_str("model_type")?;
        let unsupported = || Error::UnsupportedModel {
            path: path.to_path_buf(),
            model_type: model_type.clone(),
            supported: RUNNABLE.into(),
        };
        if model_type == "gemma3" {
            return Ok(ModelConfig::Decoder(super::families::describe_gemma3(&r)?));
        }
        let arch = Arch::from_model_type(&model_type).ok_or_else(unsupported)?;
        if arch == Arch::Gpt2 {
            return Ok(ModelConfig::Gpt2(parse_gpt2(&r)?));
        }
        match super::families::describe(&r, arch)? {
            Some(c) => Ok(ModelConfig::Decoder(c)),
            None => Err(unsupported()),
        }
    }
}

fn parse_gpt2(r: &Reader<'_>) -> Result<Gpt2Config> {
    let s = ModelShape::read(r, Arch::Gpt2, false)?;
    if r.opt_bool("add_cross_attention")?.unwrap_or(false) {
        return Err(r.unsupported("gpt2 add_cross_attention = true".into()));
    }
    let vocab_size = s
        .vocab
        .ok_or_else(|| r.err("missing `vocab_size`".into()))?;
    let n_positions = bounded(
        r,
        "n_positions",
        r.positive("n_positions")?,
        limits::POSITIONS,
    )?;
    Ok(Gpt2Config {
        vocab_size,
        n_embd: s.hidden,
        n_layer: s.layers,
        n_head: s.heads,
        n_inner: s.intermediate.expect("GPT-2 has a default MLP width"),
        n_positions,
        layer_norm_epsilon: r.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
        act: Activation::parse(
            &r.path,
            &r.opt_str("activation_function")?
                .unwrap_or_else(|| "gelu_new".into()),
        )?,
        scale_attn_weights: r.opt_bool("scale_attn_weights")?.unwrap_or(true),
        scale_attn_by_inverse_layer_idx: r
            .opt_bool("scale_attn_by_inverse_layer_idx")?
            .unwrap_or(false),
        tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(true),
    })
}
