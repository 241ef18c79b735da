//! The families built on the generic decoder (`decoder.rs`): for each one,
//! how its `config.json` becomes a [`DecoderConfig`] and which Hugging Face
//! tensor plays which role (`Roles`). Adding a family means adding one
//! `describe_*` function and one `Roles` table here; the forward pass and the
//! gradient taps are shared. docs/models.md explains every family's trap.
//!
//! Config fields are read in both forms transformers has written: version 5
//! (`rope_parameters`, possibly keyed by layer type, and `layer_types`) and
//! older hub checkpoints (`rope_theta`, `rope_scaling`, `rotary_pct`,
//! `rotary_emb_base`, `partial_rotary_factor`, `sliding_window_pattern`,
//! `rope_local_base_freq`). A field the forward pass depends on and that has no
//! harmless Hugging Face default is required: its absence is an error naming
//! it, as is any value this crate does not implement.

use serde_json::Value;

use crate::config::{
    parse_scaling, Activation, Arch, LlamaConfig, Reader, RopeConfig, RopeScaling,
};
use crate::error::Result;

/// How a norm normalises and scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// x / rms(x) · w (LLaMA, Qwen3, OLMo-2, Phi-3).
    Rms,
    /// x / rms(x) · (1 + w) (Gemma: the stored weight is an offset from 1).
    RmsOffset,
    /// (x − mean) / std · w + b (GPT-NeoX, BERT).
    Layer,
}

/// Where a layer's norms sit around its attention and MLP sublayers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// x + f(norm(x)): the norm on the sublayer input (LLaMA, Phi-3, Qwen3, GPT-NeoX).
    Pre,
    /// x + norm_out(f(norm_in(x))): both (Gemma 2 and 3).
    Sandwich,
    /// x + norm(f(x)): the norm on the sublayer output only (OLMo-2).
    Post,
    /// norm(x + f(x)): the norm after the residual sum (BERT).
    PostAdd,
}

impl NormPlacement {
    /// Which of the four per-layer norm slots exist:
    /// (attention input, attention output, MLP input, MLP output).
    pub fn slots(self) -> [bool; 4] {
        match self {
            NormPlacement::Pre => [true, false, true, false],
            NormPlacement::Sandwich => [true, true, true, true],
            NormPlacement::Post | NormPlacement::PostAdd => [false, true, false, true],
        }
    }
}

/// Whether queries and keys are normalised before RoPE, and over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's d values, one weight of length d shared by all heads (Qwen3, Gemma 3).
    PerHead,
    /// Over all H·d (H_kv·d) values of a token: couples the heads (OLMo-2).
    AllHeads,
}

/// How Q, K and V are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// Three Linear weights.
    Split,
    /// One `[(H + 2 H_kv)·d, D]` weight: all Q rows, then K, then V (Phi-3).
    Fused,
    /// One `[3·H·d, D]` weight interleaved per head: q, k, v of head 0, then head 1 … (GPT-NeoX).
    NeoxInterleaved,
}

/// The MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// down(act(gate(x)) · up(x)) with separate gate and up weights (SwiGLU, GeGLU).
    Gated,
    /// The same with one `[2F, D]` weight, gate rows first (Phi-3 `gate_up_proj`).
    GatedFused,
    /// down(act(fc(x))) (GPT-NeoX, BERT).
    Plain,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// RoPE on the first `rotary_dim` values of each head (rotate-half), the
    /// rest passed through; the per-layer parameters are in [`LayerKind::rope`].
    Rotary { rotary_dim: usize },
    /// A learned table of `max` positions plus token-type 0's embedding (BERT).
    Learned { max: usize, token_types: usize },
}

/// What a layer's attention sees.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerKind {
    /// Query i sees keys j with i − j < window (a `sliding_attention` layer).
    pub sliding_window: Option<usize>,
    /// RoPE parameters of this layer (None for learned positions).
    pub rope: Option<RopeConfig>,
}

/// The head on top of the last layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// final norm, then the LM head.
    Linear,
    /// BERT's `cls.predictions`: dense, activation, LayerNorm, then the
    /// decoder (the LM head) with its own bias.
    BertTransform,
}

/// A decoder-only transformer, described by what differs between families.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    /// D.
    pub hidden_size: usize,
    /// F, the MLP width.
    pub intermediate_size: usize,
    pub num_layers: usize,
    /// H.
    pub num_heads: usize,
    /// H_kv (divides H).
    pub num_kv_heads: usize,
    /// d (need not be D / H).
    pub head_dim: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub placement: NormPlacement,
    /// x + attn(n1(x)) + mlp(n2(x)) instead of two sequential residual steps (GPT-NeoX).
    pub parallel_residual: bool,
    pub qk_norm: QkNorm,
    pub qkv: QkvLayout,
    pub mlp: MlpKind,
    pub act: Activation,
    /// Biases on Q/K/V, on O, on the MLP weights.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub positions: Positions,
    /// One per layer.
    pub layer_kinds: Vec<LayerKind>,
    /// Attention logits are q·k times this (d^-1/2, or `query_pre_attn_scalar`^-1/2).
    pub attn_scale: f64,
    /// Attention logits become c·tanh(logits / c) before the mask (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Output logits become c·tanh(logits / c) (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Token embeddings are multiplied by this (√D for Gemma).
    pub embed_scale: Option<f64>,
    /// A LayerNorm right after the embeddings (BERT).
    pub embed_norm: bool,
    pub head: HeadKind,
    pub tie_word_embeddings: bool,
    /// A bias on the LM head (BERT's `cls.predictions.bias`).
    pub lm_head_bias: bool,
    /// `max_position_embeddings`: longer inputs are refused.
    pub max_positions: Option<usize>,
    /// The weights sit under another model inside the checkpoint (a `gemma3`
    /// checkpoint's language model); the prefix is found at load time.
    pub nested: bool,
}

/// Hugging Face names of every role, with `{i}` for the layer index. A name
/// is a module path; `.weight` / `.bias` are appended. For nested checkpoints
/// the leading `model.` is replaced by the prefix found in the checkpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Roles {
    pub embed: &'static str,
    pub positions: Option<&'static str>,
    pub token_types: Option<&'static str>,
    pub embed_norm: Option<&'static str>,
    /// Norm slots in [`NormPlacement::slots`] order.
    pub norms: [Option<&'static str>; 4],
    /// Q, K, V for split layouts; the fused tensor is `qkv[0]`.
    pub qkv: [&'static str; 3],
    pub o: &'static str,
    pub q_norm: Option<&'static str>,
    pub k_norm: Option<&'static str>,
    /// Gate (gated), fused gate_up, or the first Linear (plain).
    pub mlp_in: &'static str,
    /// Up (gated with separate weights only).
    pub mlp_up: Option<&'static str>,
    pub mlp_down: &'static str,
    pub final_norm: Option<&'static str>,
    pub head_dense: Option<&'static str>,
    pub head_norm: Option<&'static str>,
    pub lm_head: &'static str,
    /// Full name of the LM head's bias.
    pub lm_head_bias: Option<&'static str>,
}

/// The LLaMA-style names most families share.
const LLAMA_ROLES: Roles = Roles {
    embed: "model.embed_tokens",
    positions: None,
    token_types: None,
    embed_norm: None,
    norms: [
        Some("model.layers.{i}.input_layernorm"),
        None,
        Some("model.layers.{i}.post_attention_layernorm"),
        None,
    ],
    qkv: [
        "model.layers.{i}.self_attn.q_proj",
        "model.layers.{i}.self_attn.k_proj",
        "model.layers.{i}.self_attn.v_proj",
    ],
    o: "model.layers.{i}.self_attn.o_proj",
    q_norm: None,
    k_norm: None,
    mlp_in: "model.layers.{i}.mlp.gate_proj",
    mlp_up: Some("model.layers.{i}.mlp.up_proj"),
    mlp_down: "model.layers.{i}.mlp.down_proj",
    final_norm: Some("model.norm"),
    head_dense: None,
    head_norm: None,
    lm_head: "lm_head",
    lm_head_bias: None,
};

/// Every family's names, in one place each.
pub(crate) fn roles(arch: Arch) -> Roles {
    match arch {
        Arch::GptNeox => Roles {
            embed: "gpt_neox.embed_in",
            norms: [
                Some("gpt_neox.layers.{i}.input_layernorm"),
                None,
                Some("gpt_neox.layers.{i}.post_attention_layernorm"),
                None,
            ],
            qkv: ["gpt_neox.layers.{i}.attention.query_key_value", "", ""],
            o: "gpt_neox.layers.{i}.attention.dense",
            mlp_in: "gpt_neox.layers.{i}.mlp.dense_h_to_4h",
            mlp_up: None,
            mlp_down: "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
            final_norm: Some("gpt_neox.final_layer_norm"),
            lm_head: "embed_out",
            ..LLAMA_ROLES
        },
        Arch::Phi3 => Roles {
            qkv: ["model.layers.{i}.self_attn.qkv_proj", "", ""],
            mlp_in: "model.layers.{i}.mlp.gate_up_proj",
            mlp_up: None,
            ..LLAMA_ROLES
        },
        Arch::Bert => Roles {
            embed: "bert.embeddings.word_embeddings",
            positions: Some("bert.embeddings.position_embeddings"),
            token_types: Some("bert.embeddings.token_type_embeddings"),
            embed_norm: Some("bert.embeddings.LayerNorm"),
            norms: [
                None,
                Some("bert.encoder.layer.{i}.attention.output.LayerNorm"),
                None,
                Some("bert.encoder.layer.{i}.output.LayerNorm"),
            ],
            qkv: [
                "bert.encoder.layer.{i}.attention.self.query",
                "bert.encoder.layer.{i}.attention.self.key",
                "bert.encoder.layer.{i}.attention.self.value",
            ],
            o: "bert.encoder.layer.{i}.attention.output.dense",
            mlp_in: "bert.encoder.layer.{i}.intermediate.dense",
            mlp_up: None,
            mlp_down: "bert.encoder.layer.{i}.output.dense",
            final_norm: None,
            head_dense: Some("cls.predictions.transform.dense"),
            head_norm: Some("cls.predictions.transform.LayerNorm"),
            lm_head: "cls.predictions.decoder",
            lm_head_bias: Some("cls.predictions.bias"),
            ..LLAMA_ROLES
        },
        Arch::Qwen3 | Arch::Gemma3Text => Roles {
            norms: if arch == Arch::Qwen3 {
                LLAMA_ROLES.norms
            } else {
                GEMMA_NORMS
            },
            q_norm: Some("model.layers.{i}.self_attn.q_norm"),
            k_norm: Some("model.layers.{i}.self_attn.k_norm"),
            ..LLAMA_ROLES
        },
        Arch::Gemma2 => Roles {
            norms: GEMMA_NORMS,
            ..LLAMA_ROLES
        },
        Arch::Olmo2 => Roles {
            norms: [
                None,
                Some("model.layers.{i}.post_attention_layernorm"),
                None,
                Some("model.layers.{i}.post_feedforward_layernorm"),
            ],
            q_norm: Some("model.layers.{i}.self_attn.q_norm"),
            k_norm: Some("model.layers.{i}.self_attn.k_norm"),
            ..LLAMA_ROLES
        },
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Gpt2 => LLAMA_ROLES,
    }
}

const GEMMA_NORMS: [Option<&str>; 4] = [
    Some("model.layers.{i}.input_layernorm"),
    Some("model.layers.{i}.post_attention_layernorm"),
    Some("model.layers.{i}.pre_feedforward_layernorm"),
    Some("model.layers.{i}.post_feedforward_layernorm"),
];

/// The description of `model_type`, or None when it is not a decoder family.
pub(crate) fn parse(r: &Reader<'_>, model_type: &str) -> Result<Option<DecoderConfig>> {
    Ok(Some(match model_type {
        "gpt_neox" => describe_neox(r)?,
        "phi3" => describe_phi3(r)?,
        "bert" => describe_bert(r)?,
        "qwen3" => describe_qwen3(r)?,
        "gemma2" => describe_gemma(r, Arch::Gemma2)?,
        "gemma3_text" => describe_gemma(r, Arch::Gemma3Text)?,
        "gemma3" => {
            // The language model's config, completed with Gemma3TextConfig's
            // defaults (one table, in gradshard-core, shared with the geometry).
            let merged = gradshard_core::nested_text_config(r.v)
                .map_err(|e| r.err(e.to_string()))?
                .expect("model_type is gemma3");
            let sub = Reader {
                path: r.path.clone(),
                v: &merged,
            };
            let mut c = describe_gemma(&sub, Arch::Gemma3Text).map_err(|e| in_text_config(r, e))?;
            // The tie is declared by the outer config.
            c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(true);
            c.nested = true;
            c
        }
        "olmo2" => describe_olmo2(r)?,
        _ => return Ok(None),
    }))
}

/// Errors inside a nested `text_config` say so.
fn in_text_config(r: &Reader<'_>, e: crate::error::Error) -> crate::error::Error {
    use crate::error::Error;
    match e {
        Error::Config { msg, .. } => r.err(format!("text_config: {msg}")),
        Error::Unsupported { what, .. } => r.unsupported(format!("text_config: {what}")),
        other => other,
    }
}

/// The sizes every family has under the usual names.
struct Sizes {
    vocab: usize,
    hidden: usize,
    ff: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn sizes(r: &Reader<'_>, head_dim_required: bool) -> Result<Sizes> {
    let hidden = r.positive("hidden_size")?;
    let heads = r.positive("num_attention_heads")?;
    let kv_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(r.err(format!(
            "`num_key_value_heads` ({kv_heads}) must divide `num_attention_heads` ({heads})"
        )));
    }
    let head_dim = match r.opt_usize("head_dim")? {
        Some(0) => return Err(r.err("`head_dim` must be > 0".into())),
        Some(d) => d,
        None if head_dim_required => return Err(r.err("missing `head_dim`".into())),
        None => {
            if hidden % heads != 0 {
                return Err(r.err(format!(
                    "no `head_dim` and `hidden_size` {hidden} is not a multiple of {heads} heads"
                )));
            }
            hidden / heads
        }
    };
    Ok(Sizes {
        vocab: r.positive("vocab_size")?,
        hidden,
        ff: r.positive("intermediate_size")?,
        layers: r.positive("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim,
    })
}

/// The activation under `key` (the first of `keys` that is written).
fn activation(r: &Reader<'_>, keys: &[&str], default: Option<&str>) -> Result<Activation> {
    for k in keys {
        if let Some(s) = r.opt_str(k)? {
            return Activation::parse(&r.path, &s).map_err(|_| {
                r.unsupported(format!(
                    "`{k}` = {s:?} (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu)"
                ))
            });
        }
    }
    match default {
        Some(d) => Activation::parse(&r.path, d),
        None => Err(r.err(format!("missing `{}`", keys.join("` or `")))),
    }
}

/// The base RoPE parameters of a model: `rope_parameters` (transformers 5) or
/// `rope_theta` (under `legacy_theta` names) and `rope_scaling`. Returns the
/// parameters and the partial-rotary factor written with them, if any.
fn rope_base(r: &Reader<'_>, legacy_theta: &[&str]) -> Result<(RopeConfig, Option<f64>)> {
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

fn check_theta(r: &Reader<'_>, theta: f64) -> Result<()> {
    if theta.is_nan() || theta <= 0.0 {
        return Err(r.err(format!("`rope_theta` must be > 0, got {theta}")));
    }
    Ok(())
}

/// One `rope_parameters`-style object: `rope_theta`, `rope_type` and its
/// scaling fields, optionally `partial_rotary_factor`.
fn rope_object(r: &Reader<'_>, p: &Reader<'_>, what: &str) -> Result<(RopeConfig, Option<f64>)> {
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

fn in_field(r: &Reader<'_>, field: &str, e: crate::error::Error) -> crate::error::Error {
    use crate::error::Error;
    match e {
        Error::Unsupported { what, .. } => r.unsupported(format!("`{field}`: {what}")),
        Error::Config { msg, .. } => r.err(format!("`{field}`: {msg}")),
        other => other,
    }
}

/// The rotated width of a head: `factor` · d, even and > 0.
fn rotary_dim(r: &Reader<'_>, head_dim: usize, factor: f64, field: &str) -> Result<usize> {
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

/// Which layers are `sliding_attention`: `layer_types` (transformers 5), else
/// `legacy(i)`; any other layer type is an error naming the field.
fn layer_types(
    r: &Reader<'_>,
    layers: usize,
    legacy: impl Fn(usize) -> Option<bool>,
) -> Result<Vec<bool>> {
    match r.get("layer_types") {
        Some(Value::Array(a)) => {
            if a.len() != layers {
                return Err(r.err(format!(
                    "`layer_types` has {} entries for {layers} layers (`num_hidden_layers`)",
                    a.len()
                )));
            }
            a.iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => Err(r.unsupported(format!(
                        "`layer_types` entry {t} (supported: full_attention, sliding_attention)"
                    ))),
                })
                .collect()
        }
        Some(other) => Err(r.err(format!("`layer_types` must be an array, got {other}"))),
        None => (0..layers)
            .map(|i| {
                legacy(i).ok_or_else(|| {
                    r.err("missing `layer_types` (or legacy `sliding_window_pattern`)".into())
                })
            })
            .collect(),
    }
}

/// The window of sliding layers (`sliding_window`, required when any layer slides).
fn window(r: &Reader<'_>, sliding: &[bool]) -> Result<Option<usize>> {
    if !sliding.iter().any(|&s| s) {
        return Ok(None);
    }
    match r.opt_usize("sliding_window")? {
        Some(0) => Err(r.err("`sliding_window` must be > 0".into())),
        Some(w) => Ok(Some(w)),
        None => Err(r.err("missing `sliding_window` (sliding_attention layers need it)".into())),
    }
}

/// A key that must be written (null allowed, meaning "none"): an optional
/// positive number with a non-trivial Hugging Face default.
fn explicit_opt_f64(r: &Reader<'_>, key: &str) -> Result<Option<f64>> {
    if !r.has(key) {
        return Err(r.err(format!(
            "missing `{key}` (write null if the model has none)"
        )));
    }
    let v = r.opt_f64(key)?;
    if let Some(x) = v {
        if !(x > 0.0 && x.is_finite()) {
            return Err(r.err(format!("`{key}` must be > 0, got {x}")));
        }
    }
    Ok(v)
}

fn refuse_true(r: &Reader<'_>, key: &str, why: &str) -> Result<()> {
    if r.opt_bool(key)?.unwrap_or(false) {
        return Err(r.unsupported(format!("`{key}` = true ({why})")));
    }
    Ok(())
}

/// Fields shared by the RoPE families, filled with LLaMA-style choices.
fn rotary_base(r: &Reader<'_>, arch: Arch, s: &Sizes) -> Result<DecoderConfig> {
    Ok(DecoderConfig {
        arch,
        vocab_size: s.vocab,
        hidden_size: s.hidden,
        intermediate_size: s.ff,
        num_layers: s.layers,
        num_heads: s.heads,
        num_kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        norm: NormKind::Rms,
        norm_eps: 1e-6,
        placement: NormPlacement::Pre,
        parallel_residual: false,
        qk_norm: QkNorm::None,
        qkv: QkvLayout::Split,
        mlp: MlpKind::Gated,
        act: Activation::Silu,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        positions: Positions::Rotary {
            rotary_dim: s.head_dim,
        },
        layer_kinds: vec![],
        attn_scale: 1.0 / (s.head_dim as f64).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        embed_scale: None,
        embed_norm: false,
        head: HeadKind::Linear,
        tie_word_embeddings: false,
        lm_head_bias: false,
        max_positions: r.opt_usize("max_position_embeddings")?,
        nested: false,
    })
}

impl DecoderConfig {
    /// Every layer with the same RoPE and the given sliding flags.
    fn uniform_layers(&mut self, rope: &RopeConfig, sliding: &[bool], window: Option<usize>) {
        self.layer_kinds = sliding
            .iter()
            .map(|&s| LayerKind {
                sliding_window: if s { window } else { None },
                rope: Some(rope.clone()),
            })
            .collect();
    }
}

fn rms_eps(r: &Reader<'_>, default: f64) -> Result<f64> {
    Ok(r.opt_f64("rms_norm_eps")?.unwrap_or(default))
}

/// The LLaMA family (llama, mistral, qwen2) as parsed by `config.rs`: pre-norm
/// RMSNorm, split Q/K/V, SwiGLU, full RoPE; Mistral's window on every layer.
pub(crate) fn describe_llama(l: &LlamaConfig) -> DecoderConfig {
    DecoderConfig {
        arch: l.arch,
        vocab_size: l.vocab_size,
        hidden_size: l.hidden_size,
        intermediate_size: l.intermediate_size,
        num_layers: l.num_layers,
        num_heads: l.num_heads,
        num_kv_heads: l.num_kv_heads,
        head_dim: l.head_dim,
        norm: NormKind::Rms,
        norm_eps: l.rms_norm_eps,
        placement: NormPlacement::Pre,
        parallel_residual: false,
        qk_norm: QkNorm::None,
        qkv: QkvLayout::Split,
        mlp: MlpKind::Gated,
        act: l.act,
        qkv_bias: l.qkv_bias,
        o_bias: l.o_bias,
        mlp_bias: l.mlp_bias,
        positions: Positions::Rotary {
            rotary_dim: l.head_dim,
        },
        layer_kinds: vec![
            LayerKind {
                sliding_window: l.sliding_window,
                rope: Some(l.rope.clone()),
            };
            l.num_layers
        ],
        attn_scale: 1.0 / (l.head_dim as f64).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        embed_scale: None,
        embed_norm: false,
        head: HeadKind::Linear,
        tie_word_embeddings: l.tie_word_embeddings,
        lm_head_bias: false,
        max_positions: l.max_positions,
        nested: false,
    }
}

/// GPT-NeoX (Pythia): interleaved fused QKV, partial rotary, parallel
/// residual, LayerNorm with bias, untied `embed_out`.
fn describe_neox(r: &Reader<'_>) -> Result<DecoderConfig> {
    let s = sizes(r, false)?;
    if s.kv_heads != s.heads {
        return Err(
            r.unsupported("gpt_neox with num_key_value_heads != num_attention_heads".into())
        );
    }
    let (rope, partial) = rope_base(r, &["rope_theta", "rotary_emb_base"])?;
    let (factor, field) = match (partial, r.opt_f64("rotary_pct")?) {
        (Some(f), _) => (f, "rope_parameters.partial_rotary_factor"),
        (None, Some(f)) => (f, "rotary_pct"),
        (None, None) => match r.opt_f64("partial_rotary_factor")? {
            Some(f) => (f, "partial_rotary_factor"),
            None => {
                return Err(r.err(
                    "missing `rope_parameters.partial_rotary_factor` (or legacy `rotary_pct`)"
                        .into(),
                ))
            }
        },
    };
    let mut c = rotary_base(r, Arch::GptNeox, &s)?;
    c.positions = Positions::Rotary {
        rotary_dim: rotary_dim(r, s.head_dim, factor, field)?,
    };
    c.norm = NormKind::Layer;
    c.norm_eps = r.opt_f64("layer_norm_eps")?.unwrap_or(1e-5);
    c.parallel_residual = r.opt_bool("use_parallel_residual")?.unwrap_or(true);
    c.qkv = QkvLayout::NeoxInterleaved;
    c.mlp = MlpKind::Plain;
    c.act = activation(r, &["hidden_act"], Some("gelu"))?;
    let bias = r.opt_bool("attention_bias")?.unwrap_or(true);
    (c.qkv_bias, c.o_bias, c.mlp_bias) = (bias, bias, true);
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    c.uniform_layers(&rope, &vec![false; s.layers], None);
    Ok(c)
}

/// Phi-3: fused `qkv_proj` (Q, K, V blocks) and `gate_up_proj`, GQA.
fn describe_phi3(r: &Reader<'_>) -> Result<DecoderConfig> {
    let s = sizes(r, false)?;
    let (rope, partial) = rope_base(r, &["rope_theta"])?;
    let mut c = rotary_base(r, Arch::Phi3, &s)?;
    let (factor, field) = match partial {
        Some(f) => (f, "rope_parameters.partial_rotary_factor"),
        None => (
            r.opt_f64("partial_rotary_factor")?.unwrap_or(1.0),
            "partial_rotary_factor",
        ),
    };
    c.positions = Positions::Rotary {
        rotary_dim: rotary_dim(r, s.head_dim, factor, field)?,
    };
    c.norm_eps = rms_eps(r, 1e-5)?;
    c.qkv = QkvLayout::Fused;
    c.mlp = MlpKind::GatedFused;
    c.act = activation(r, &["hidden_act"], Some("silu"))?;
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    // Phi-3 applies `sliding_window` (when set) to every layer.
    let w = r.opt_usize("sliding_window")?;
    c.uniform_layers(&rope, &vec![w.is_some(); s.layers], w);
    Ok(c)
}

/// BERT as a causal LM: post-LayerNorm, learned positions, token type 0,
/// the `cls.predictions` head tied to the word embeddings.
fn describe_bert(r: &Reader<'_>) -> Result<DecoderConfig> {
    match r.opt_bool("is_decoder")? {
        Some(true) => {}
        Some(false) => {
            return Err(r.unsupported(
                "`is_decoder` = false (a bidirectional BERT is not a causal LM)".into(),
            ))
        }
        None => return Err(r.err("missing `is_decoder` (must be true)".into())),
    }
    refuse_true(r, "add_cross_attention", "cross-attention needs an encoder")?;
    if let Some(p) = r.opt_str("position_embedding_type")? {
        if p != "absolute" {
            return Err(r.unsupported(format!(
                "`position_embedding_type` = {p:?} (supported: absolute)"
            )));
        }
    }
    let s = sizes(r, false)?;
    if s.kv_heads != s.heads {
        return Err(r.unsupported("bert with num_key_value_heads != num_attention_heads".into()));
    }
    let max = r.positive("max_position_embeddings")?;
    let token_types = r.positive("type_vocab_size")?;
    let mut c = rotary_base(r, Arch::Bert, &s)?;
    c.positions = Positions::Learned { max, token_types };
    c.layer_kinds = vec![
        LayerKind {
            sliding_window: None,
            rope: None,
        };
        s.layers
    ];
    c.norm = NormKind::Layer;
    c.norm_eps = r.opt_f64("layer_norm_eps")?.unwrap_or(1e-12);
    c.placement = NormPlacement::PostAdd;
    c.mlp = MlpKind::Plain;
    c.act = activation(r, &["hidden_act"], Some("gelu"))?;
    (c.qkv_bias, c.o_bias, c.mlp_bias) = (true, true, true);
    c.embed_norm = true;
    c.head = HeadKind::BertTransform;
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    c.lm_head_bias = true;
    c.max_positions = Some(max);
    Ok(c)
}

/// Qwen3: LLaMA with per-head q/k RMSNorm before RoPE and a free `head_dim`.
fn describe_qwen3(r: &Reader<'_>) -> Result<DecoderConfig> {
    let s = sizes(r, false)?;
    let (rope, partial) = rope_base(r, &["rope_theta"])?;
    if let Some(f) = partial.filter(|&f| f != 1.0) {
        return Err(r.unsupported(format!("`rope_parameters.partial_rotary_factor` = {f}")));
    }
    let mut c = rotary_base(r, Arch::Qwen3, &s)?;
    c.norm_eps = rms_eps(r, 1e-6)?;
    c.qk_norm = QkNorm::PerHead;
    c.act = activation(r, &["hidden_act"], Some("silu"))?;
    let bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    (c.qkv_bias, c.o_bias) = (bias, bias);
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    // Before `layer_types`: layers from `max_window_layers` on slide when
    // `use_sliding_window` is set.
    let slide = r.opt_bool("use_sliding_window")?.unwrap_or(false);
    let from = r.opt_usize("max_window_layers")?;
    let sliding = layer_types(r, s.layers, |i| Some(slide && from.is_none_or(|m| i >= m)))?;
    let w = window(r, &sliding)?;
    c.uniform_layers(&rope, &sliding, w);
    Ok(c)
}

/// OLMo-2: q/k RMSNorm over all heads of a token, norms on the sublayer outputs.
fn describe_olmo2(r: &Reader<'_>) -> Result<DecoderConfig> {
    let s = sizes(r, false)?;
    let (rope, partial) = rope_base(r, &["rope_theta"])?;
    if let Some(f) = partial.filter(|&f| f != 1.0) {
        return Err(r.unsupported(format!("`rope_parameters.partial_rotary_factor` = {f}")));
    }
    let mut c = rotary_base(r, Arch::Olmo2, &s)?;
    c.norm_eps = rms_eps(r, 1e-5)?;
    c.placement = NormPlacement::Post;
    c.qk_norm = QkNorm::AllHeads;
    c.act = activation(r, &["hidden_act"], Some("silu"))?;
    let bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    (c.qkv_bias, c.o_bias) = (bias, bias);
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    c.uniform_layers(&rope, &vec![false; s.layers], None);
    Ok(c)
}

/// Gemma 2 and Gemma 3 (text): (1 + w) RMSNorm in sandwich placement, √D
/// embedding scale, `query_pre_attn_scalar`, GeGLU, sliding layers; Gemma 2
/// soft-caps, Gemma 3 per-head q/k norms and a RoPE per layer type.
fn describe_gemma(r: &Reader<'_>, arch: Arch) -> Result<DecoderConfig> {
    let s = sizes(r, true)?;
    refuse_true(
        r,
        "use_bidirectional_attention",
        "bidirectional attention is not a causal LM",
    )?;
    let mut c = rotary_base(r, arch, &s)?;
    c.norm = NormKind::RmsOffset;
    c.norm_eps = rms_eps(r, 1e-6)?;
    c.placement = NormPlacement::Sandwich;
    c.act = activation(r, &["hidden_activation", "hidden_act"], None)?;
    let bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    (c.qkv_bias, c.o_bias) = (bias, bias);
    c.embed_scale = Some((s.hidden as f64).sqrt());
    let scalar = r.opt_f64("query_pre_attn_scalar")?.ok_or_else(|| {
        r.err("missing `query_pre_attn_scalar` (Gemma scales attention by its inverse square root, not head_dim's)".into())
    })?;
    if scalar.is_nan() || scalar <= 0.0 {
        return Err(r.err(format!("`query_pre_attn_scalar` must be > 0, got {scalar}")));
    }
    c.attn_scale = 1.0 / scalar.sqrt();
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    if arch == Arch::Gemma2 {
        c.attn_softcap = explicit_opt_f64(r, "attn_logit_softcapping")?;
        c.final_softcap = explicit_opt_f64(r, "final_logit_softcapping")?;
        // Gemma 2 before `layer_types`: even layers slide.
        let sliding = layer_types(r, s.layers, |i| Some(i % 2 == 0))?;
        let w = window(r, &sliding)?;
        let (rope, partial) = rope_base(r, &["rope_theta"])?;
        if let Some(f) = partial.filter(|&f| f != 1.0) {
            return Err(r.unsupported(format!("`rope_parameters.partial_rotary_factor` = {f}")));
        }
        c.uniform_layers(&rope, &sliding, w);
        return Ok(c);
    }
    c.qk_norm = QkNorm::PerHead;
    c.attn_softcap = r.opt_f64("attn_logit_softcapping")?;
    c.final_softcap = r.opt_f64("final_logit_softcapping")?;
    let pattern = match r.opt_usize("sliding_window_pattern")? {
        Some(p) => Some(p),
        None => r.opt_usize("_sliding_window_pattern")?,
    };
    if pattern == Some(0) {
        return Err(r.err("`sliding_window_pattern` must be > 0".into()));
    }
    let sliding = layer_types(r, s.layers, |i| pattern.map(|p| (i + 1) % p != 0))?;
    let w = window(r, &sliding)?;
    // transformers 5: rope_parameters keyed by layer type; before: rope_theta
    // (+ rope_scaling) for full layers, rope_local_base_freq for sliding ones.
    let (full, local) = match r.sub("rope_parameters")? {
        Some(p) if p.has("full_attention") || p.has("sliding_attention") => {
            let one = |key: &str| -> Result<RopeConfig> {
                let sub = p.sub(key)?.ok_or_else(|| {
                    r.err(format!("missing `rope_parameters.{key}` (a RoPE per layer type)"))
                })?;
                let (rope, partial) = rope_object(r, &sub, &format!("rope_parameters.{key}"))?;
                if let Some(f) = partial.filter(|&f| f != 1.0) {
                    return Err(r.unsupported(format!(
                        "`rope_parameters.{key}.partial_rotary_factor` = {f}"
                    )));
                }
                Ok(rope)
            };
            (one("full_attention")?, one("sliding_attention")?)
        }
        Some(_) => {
            return Err(r.err(
                "`rope_parameters` of gemma3_text must be keyed by layer type (full_attention, sliding_attention)"
                    .into(),
            ))
        }
        None => {
            let (full, _) = rope_base(r, &["rope_theta"])?;
            let theta = r.opt_f64("rope_local_base_freq")?.ok_or_else(|| {
                r.err("missing `rope_local_base_freq` (the RoPE theta of sliding layers)".into())
            })?;
            check_theta(r, theta)?;
            (
                full,
                RopeConfig {
                    theta,
                    scaling: RopeScaling::None,
                },
            )
        }
    };
    c.layer_kinds = sliding
        .iter()
        .map(|&sl| LayerKind {
            sliding_window: if sl { w } else { None },
            rope: Some(if sl { local.clone() } else { full.clone() }),
        })
        .collect();
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_table_matches_its_placement() {
        for arch in [
            Arch::GptNeox,
            Arch::Phi3,
            Arch::Bert,
            Arch::Qwen3,
            Arch::Gemma2,
            Arch::Gemma3Text,
            Arch::Olmo2,
        ] {
            let placement = match arch {
                Arch::Bert => NormPlacement::PostAdd,
                Arch::Gemma2 | Arch::Gemma3Text => NormPlacement::Sandwich,
                Arch::Olmo2 => NormPlacement::Post,
                _ => NormPlacement::Pre,
            };
            let roles = roles(arch);
            for (slot, has) in placement.slots().iter().enumerate() {
                assert_eq!(roles.norms[slot].is_some(), *has, "{arch:?} slot {slot}");
            }
        }
    }
}
