//! Parsing of Hugging Face `config.json` into the few numbers the forward pass
//! needs. Fields are read from a `serde_json::Value` so that each missing or
//! ill-typed field yields an error naming it (HF configs vary a lot between
//! transformers versions).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::families::DecoderConfig;

/// Architectures implemented by this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Gpt2,
    /// GPT-NeoX / Pythia (`gpt_neox`).
    GptNeox,
    Phi3,
    /// BERT as a causal LM (`bert` with `is_decoder`).
    Bert,
    Qwen3,
    Gemma2,
    /// Gemma 3 text model (`gemma3_text`, or the `text_config` of a `gemma3` checkpoint).
    Gemma3Text,
    Olmo2,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Gpt2 => "gpt2",
            Arch::GptNeox => "gpt_neox",
            Arch::Phi3 => "phi3",
            Arch::Bert => "bert",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3Text => "gemma3_text",
            Arch::Olmo2 => "olmo2",
        }
    }
}

/// Element-wise activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(x) (`silu`, `swish`).
    Silu,
    /// Exact GELU with erf (`gelu`).
    Gelu,
    /// Tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`-free).
    GeluTanh,
    /// max(x, 0).
    Relu,
}

impl Activation {
    pub(crate) fn parse(path: &Path, s: &str) -> Result<Self> {
        Ok(match s {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("activation function {other:?}"),
                })
            }
        })
    }
}

/// How RoPE frequencies are rescaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: inv_freq[i] = theta^(-2i/d).
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// LLaMA-3.1 frequency-dependent rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// LLaMA-family configuration (llama, mistral, qwen2), as parsed; the model
/// runs it as the [`DecoderConfig`] `families::describe_llama` makes of it.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    /// D, the residual width.
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    /// H, query heads.
    pub num_heads: usize,
    /// H_kv, key/value heads (H_kv divides H).
    pub num_kv_heads: usize,
    /// d, per-head size; from `head_dim` when present, else D / H.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (qwen2 always; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate/up/down (llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub act: Activation,
    /// Mistral sliding window: query i sees keys j with i - j < window.
    pub sliding_window: Option<usize>,
    /// `max_position_embeddings`: longer inputs are refused before any allocation.
    pub max_positions: Option<usize>,
}

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
    /// Every other family, described for the generic decoder (`families.rs`);
    /// the LLaMA family is parsed into a [`LlamaConfig`] first.
    Decoder(DecoderConfig),
}

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

    /// Read and parse `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        Self::from_value(path, &v)
    }

    /// Parse an already-loaded JSON value; `path` is used in error messages only.
    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let r = Reader {
            path: path.to_path_buf(),
            v,
        };
        let model_type = r.req_str("model_type")?;
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => {
                let arch = match model_type.as_str() {
                    "llama" => Arch::Llama,
                    "mistral" => Arch::Mistral,
                    _ => Arch::Qwen2,
                };
                Ok(ModelConfig::Decoder(crate::families::describe_llama(
                    &parse_llama(&r, arch)?,
                )))
            }
            "gpt2" => Ok(ModelConfig::Gpt2(parse_gpt2(&r)?)),
            other => match crate::families::parse(&r, other)? {
                Some(c) => Ok(ModelConfig::Decoder(c)),
                None => Err(Error::UnsupportedModel {
                    path: path.to_path_buf(),
                    model_type,
                }),
            },
        }
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) path: PathBuf,
    pub(crate) v: &'a Value,
}

impl<'a> Reader<'a> {
    /// The field, treating JSON null as absent.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }

    pub(crate) fn err(&self, msg: String) -> Error {
        Error::config(&self.path, msg)
    }

    pub(crate) fn req_str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(format!("`{key}` must be a string, got {other}"))),
            None => Err(self.err(format!("missing `{key}`"))),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.err(format!("`{key}` must be a string, got {other}"))),
            None => Ok(None),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            Some(x) => match x.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.err(format!("`{key}` must be a non-negative integer, got {x}"))),
            },
            None => Ok(None),
        }
    }

    pub(crate) fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing `{key}`")))
    }

    pub(crate) fn positive(&self, key: &str) -> Result<usize> {
        let n = self.req_usize(key)?;
        if n == 0 {
            return Err(self.err(format!("`{key}` must be > 0")));
        }
        Ok(n)
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {x}"))),
            None => Ok(None),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(x) => Err(self.err(format!("`{key}` must be a boolean, got {x}"))),
            None => Ok(None),
        }
    }

    pub(crate) fn unsupported(&self, what: String) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            what,
        }
    }

    /// Whether the key is written at all (JSON null counts as written).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.v.get(key).is_some()
    }

    /// A reader over the object under `key` (absent or null: None).
    pub(crate) fn sub(&self, key: &str) -> Result<Option<Reader<'a>>> {
        match self.v.get(key).filter(|x| !x.is_null()) {
            Some(x @ Value::Object(_)) => Ok(Some(Reader {
                path: self.path.clone(),
                v: x,
            })),
            Some(other) => Err(self.err(format!("`{key}` must be an object, got {other}"))),
            None => Ok(None),
        }
    }
}

fn parse_rope(r: &Reader<'_>) -> Result<RopeConfig> {
    // transformers >= 5 nests everything under `rope_parameters`; older
    // configs have a top-level `rope_theta` and an optional `rope_scaling`.
    let params = r.get("rope_parameters").or_else(|| r.get("rope_scaling"));
    let sub = params.map(|p| Reader {
        path: r.path.clone(),
        v: p,
    });
    let theta = match sub.as_ref().map(|s| s.opt_f64("rope_theta")).transpose()? {
        Some(Some(t)) => t,
        _ => r.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    if theta.is_nan() || theta <= 0.0 {
        return Err(r.err(format!("`rope_theta` must be > 0, got {theta}")));
    }
    if let Some(f) = r.opt_f64("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(r.unsupported(format!("partial_rotary_factor = {f}")));
        }
    }
    let scaling = match sub {
        None => RopeScaling::None,
        Some(s) => parse_scaling(r, &s)?,
    };
    Ok(RopeConfig { theta, scaling })
}

/// The rescaling described by a `rope_parameters` / `rope_scaling` object.
pub(crate) fn parse_scaling(r: &Reader<'_>, s: &Reader<'_>) -> Result<RopeScaling> {
    // `rope_type` in new configs, `type` in old ones.
    let kind = match s.opt_str("rope_type")? {
        Some(k) => k,
        None => s.opt_str("type")?.unwrap_or_else(|| "default".into()),
    };
    let factor = || -> Result<f64> {
        s.opt_f64("factor")?
            .ok_or_else(|| s.err(format!("rope scaling {kind:?} lacks `factor`")))
    };
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => {
            let need = |k: &str| -> Result<f64> {
                s.opt_f64(k)?
                    .ok_or_else(|| s.err(format!("llama3 rope scaling lacks `{k}`")))
            };
            let sc = RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = sc
            {
                if high_freq_factor == low_freq_factor {
                    return Err(s.err(
                        "llama3 rope scaling needs high_freq_factor != low_freq_factor".into(),
                    ));
                }
            }
            sc
        }
        other => {
            return Err(r.unsupported(format!(
                "rope_type {other:?} (supported: default, linear, llama3)"
            )))
        }
    })
}

fn parse_llama(r: &Reader<'_>, arch: Arch) -> Result<LlamaConfig> {
    let hidden_size = r.positive("hidden_size")?;
    let num_heads = r.positive("num_attention_heads")?;
    let num_kv_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(r.err(format!(
            "num_key_value_heads ({num_kv_heads}) must divide num_attention_heads ({num_heads})"
        )));
    }
    let head_dim = match r.opt_usize("head_dim")? {
        Some(d) => d,
        None => {
            if hidden_size % num_heads != 0 {
                return Err(r.err(format!(
                    "no `head_dim` and hidden_size {hidden_size} is not a multiple of {num_heads} heads"
                )));
            }
            hidden_size / num_heads
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(r.err(format!(
            "head_dim must be even and > 0 for RoPE, got {head_dim}"
        )));
    }
    let attention_bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    let (qkv_bias, o_bias) = match arch {
        Arch::Qwen2 => (true, false),
        Arch::Llama => (attention_bias, attention_bias),
        _ => (false, false),
    };
    let sliding_window = match arch {
        Arch::Mistral => r.opt_usize("sliding_window")?,
        Arch::Qwen2 => {
            if r.opt_bool("use_sliding_window")?.unwrap_or(false) {
                return Err(r.unsupported("qwen2 use_sliding_window = true".into()));
            }
            None
        }
        _ => None,
    };
    let act = Activation::parse(
        &r.path,
        &r.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into()),
    )?;
    Ok(LlamaConfig {
        arch,
        vocab_size: r.positive("vocab_size")?,
        hidden_size,
        intermediate_size: r.positive("intermediate_size")?,
        num_layers: r.positive("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope: parse_rope(r)?,
        tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        o_bias,
        mlp_bias: arch == Arch::Llama && r.opt_bool("mlp_bias")?.unwrap_or(false),
        act,
        sliding_window,
        max_positions: r.opt_usize("max_position_embeddings")?,
    })
}

fn parse_gpt2(r: &Reader<'_>) -> Result<Gpt2Config> {
    let n_embd = r.positive("n_embd")?;
    let n_head = r.positive("n_head")?;
    if n_embd % n_head != 0 {
        return Err(r.err(format!(
            "n_embd {n_embd} is not a multiple of n_head {n_head}"
        )));
    }
    if r.opt_bool("add_cross_attention")?.unwrap_or(false) {
        return Err(r.unsupported("gpt2 add_cross_attention = true".into()));
    }
    Ok(Gpt2Config {
        vocab_size: r.positive("vocab_size")?,
        n_embd,
        n_layer: r.positive("n_layer")?,
        n_head,
        n_inner: r.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
        n_positions: r.positive("n_positions")?,
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
