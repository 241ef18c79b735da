//! The vocabulary of a model description: which family, which activation,
//! which rotary embedding; and how the RoPE fields of a config are read (both
//! transformers 5's `rope_parameters` and the older `rope_theta` /
//! `rope_scaling` forms).

use std::path::Path;

use crate::error::Error;

use super::reader::{Reader, Result};

/// The families gradshard knows.
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
    /// Gemma 1: its attention geometry is known (`ingest`, `synth`), its forward
    /// pass is not implemented.
    Gemma,
    Gemma2,
    /// Gemma 3 text model (`gemma3_text`, or the `text_config` of a `gemma3` checkpoint).
    Gemma3Text,
    Olmo2,
}

impl Arch {
    /// Every `model_type` of `config.json` that names a family (`gemma3` nests a
    /// `gemma3_text` model).
    pub const MODEL_TYPES: &'static [&'static str] = &[
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gemma3",
        "olmo2",
        "phi3",
        "gpt2",
        "gpt_neox",
        "bert",
    ];

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
            Arch::Gemma => "gemma",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3Text => "gemma3_text",
            Arch::Olmo2 => "olmo2",
        }
    }

    /// The family of a (non-nesting) `model_type`.
    pub fn from_model_type(s: &str) -> Option<Arch> {
        Some(match s {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "gpt2" => Arch::Gpt2,
            "gpt_neox" => Arch::GptNeox,
            "phi3" => Arch::Phi3,
            "bert" => Arch::Bert,
            "qwen3" => Arch::Qwen3,
            "gemma" => Arch::Gemma,
            "gemma2" => Arch::Gemma2,
            "gemma3_text" => Arch::Gemma3Text,
            "olmo2" => Arch::Olmo2,
            _ => return None,
        })
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
    /// The activation a config names; `path` is used in the error only.
    pub fn parse(path: &Path, s: &str) -> std::result::Result<Self, Error> {
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

/// The RoPE of the LLaMA family: `rope_parameters` (or `rope_scaling`) with a
/// top-level `rope_theta` fallback (default 10000).
pub(crate) fn parse_llama_rope(r: &Reader<'_>) -> Result<RopeConfig> {
    // transformers >= 5 nests everything under `rope_parameters`; older
    // configs have a top-level `rope_theta` and an optional `rope_scaling`.
    let params = r.get("rope_parameters").or_else(|| r.get("rope_scaling"));
    let sub = params.map(|p| r.at(p));
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
            let factor = factor()?;
            let (low_freq_factor, high_freq_factor) =
                (need("low_freq_factor")?, need("high_freq_factor")?);
            let sc = RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            };
            if high_freq_factor == low_freq_factor {
                return Err(
                    s.err("llama3 rope scaling needs high_freq_factor != low_freq_factor".into())
                );
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

/// The base RoPE parameters of a model: `rope_parameters` (transformers 5) or
/// `rope_theta` (under `legacy_theta` names) and `rope_scaling`. Returns the
/// parameters and the partial-rotary factor written with them, if any.
pub(crate) fn rope_base(
    r: &Reader<'_>,
    legacy_theta: &[&str],
) -> Result<(RopeConfig, Option<f64>)> {
    if let Some(p) = r.sub("rope_parameters")? {
        return rope_object(r, &p, "rope_parameters");
    }
    let mut theta = None;
    for k in legacy_theta {
        if let Some(t) = r.opt_f64(k)? {
            theta = Some(t);
            break;
        }
    }
    let theta = theta.ok_or_else(|| {
        r.err(format!(
            "missing `rope_parameters.rope_theta` (or legacy `{}`)",
            legacy_theta.join("` / `")
        ))
    })?;
    let scaling = match r.sub("rope_scaling")? {
        Some(s) => parse_scaling(r, &s)?,
        None => RopeScaling::None,
    };
    check_theta(r, theta)?;
    Ok((RopeConfig { theta, scaling }, None))
}

pub(crate) fn check_theta(r: &Reader<'_>, theta: f64) -> Result<()> {
    if theta.is_nan() || theta <= 0.0 {
        return Err(r.err(format!("`rope_theta` must be > 0, got {theta}")));
    }
    Ok(())
}

/// One `rope_parameters`-style object: `rope_theta`, `rope_type` and its
/// scaling fields, optionally `partial_rotary_factor`.
pub(crate) fn rope_object(
    r: &Reader<'_>,
    p: &Reader<'_>,
    what: &str,
) -> Result<(RopeConfig, Option<f64>)> {
    let theta = p
        .opt_f64("rope_theta")?
        .ok_or_else(|| r.err(format!("missing `{what}.rope_theta`")))?;
    check_theta(r, theta)?;
    let scaling = parse_scaling(r, p).map_err(|e| in_field(r, what, e))?;
    Ok((
        RopeConfig { theta, scaling },
        p.opt_f64("partial_rotary_factor")?,
    ))
}

fn in_field(r: &Reader<'_>, field: &str, e: Error) -> Error {
    match e {
        Error::Unsupported { what, .. } => r.unsupported(format!("`{field}`: {what}")),
        Error::Config { msg, .. } => r.err(format!("`{field}`: {msg}")),
        other => other,
    }
}

/// The rotated width of a head: `factor` · d, even and > 0.
pub(crate) fn rotary_dim(
    r: &Reader<'_>,
    head_dim: usize,
    factor: f64,
    field: &str,
) -> Result<usize> {
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(r.unsupported(format!("`{field}` = {factor} (must be in (0, 1])")));
    }
    // transformers: int(head_dim * factor)
    let dim = (head_dim as f64 * factor) as usize;
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(r.err(format!(
            "`{field}` = {factor} gives {dim} rotary dimensions of {head_dim}; RoPE needs an even number > 0"
        )));
    }
    Ok(dim)
}
