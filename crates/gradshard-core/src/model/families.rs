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

use crate::error::Result;

use super::decoder::{
    DecoderConfig, HeadKind, LayerKind, MlpKind, NormKind, NormPlacement, Positions, QkNorm,
    QkvLayout,
};
use super::kinds::{
    check_theta, parse_llama_rope, rope_base, rope_object, rotary_dim, Activation, Arch,
    RopeConfig, RopeScaling,
};
use super::reader::Reader;
use super::shape::{bounded, limits, ModelShape};

/// The description of a family on the generic decoder, from its config.
pub(crate) fn describe(r: &Reader<'_>, arch: Arch) -> Result<Option<DecoderConfig>> {
    Ok(Some(match arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 => describe_llama(r, arch)?,
        Arch::GptNeox => describe_neox(r)?,
        Arch::Phi3 => describe_phi3(r)?,
        Arch::Bert => describe_bert(r)?,
        Arch::Qwen3 => describe_qwen3(r)?,
        Arch::Gemma2 => describe_gemma(r, Arch::Gemma2)?,
        Arch::Gemma3Text => describe_gemma(r, Arch::Gemma3Text)?,
        Arch::Olmo2 => describe_olmo2(r)?,
        Arch::Gpt2 | Arch::Gemma => return Ok(None),
    }))
}

/// A `gemma3` checkpoint: its language model's description, from `text_config`
/// completed with Gemma3TextConfig's defaults.
pub(crate) fn describe_gemma3(r: &Reader<'_>) -> Result<DecoderConfig> {
    let merged = super::nested::gemma3_text_config(r)?;
    let mut c = describe_gemma(&r.at(&merged), Arch::Gemma3Text)
        .map_err(|e| super::nested::in_text_config(r, e))?;
    // The tie is declared by the outer config.
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    c.nested = true;
    Ok(c)
}

/// The sizes every family declares, with the vocabulary and MLP width the
/// forward pass needs.
fn sizes(r: &Reader<'_>, arch: Arch, head_dim_required: bool) -> Result<ModelShape> {
    let s = ModelShape::read(r, arch, head_dim_required)?;
    if s.vocab.is_none() {
        return Err(r.err("missing `vocab_size`".into()));
    }
    if s.intermediate.is_none() {
        return Err(r.err("missing `intermediate_size`".into()));
    }
    Ok(s)
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
fn rotary_base(r: &Reader<'_>, arch: Arch, s: &ModelShape) -> Result<DecoderConfig> {
    Ok(DecoderConfig {
        arch,
        vocab_size: s.vocab.expect("checked by sizes"),
        hidden_size: s.hidden,
        intermediate_size: s.intermediate.expect("checked by sizes"),
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

/// The LLaMA family (llama, mistral, qwen2): pre-norm RMSNorm, split Q/K/V,
/// SwiGLU, full RoPE; Mistral's window on every layer.
fn describe_llama(r: &Reader<'_>, arch: Arch) -> Result<DecoderConfig> {
    let s = sizes(r, arch, false)?;
    if !s.head_dim.is_multiple_of(2) {
        return Err(r.err(format!(
            "head_dim must be even and > 0 for RoPE, got {}",
            s.head_dim
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
    let mut c = rotary_base(r, arch, &s)?;
    c.act = Activation::parse(
        &r.path,
        &r.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into()),
    )?;
    c.norm_eps = rms_eps(r, 1e-6)?;
    let rope = parse_llama_rope(r)?;
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    (c.qkv_bias, c.o_bias) = (qkv_bias, o_bias);
    c.mlp_bias = arch == Arch::Llama && r.opt_bool("mlp_bias")?.unwrap_or(false);
    c.uniform_layers(&rope, &vec![true; s.layers], sliding_window);
    Ok(c)
}

/// GPT-NeoX (Pythia): interleaved fused QKV, partial rotary, parallel
/// residual, LayerNorm with bias, untied `embed_out`.
fn describe_neox(r: &Reader<'_>) -> Result<DecoderConfig> {
    let s = sizes(r, Arch::GptNeox, false)?;
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
    let s = sizes(r, Arch::Phi3, false)?;
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
    let s = sizes(r, Arch::Bert, false)?;
    if s.kv_heads != s.heads {
        return Err(r.unsupported("bert with num_key_value_heads != num_attention_heads".into()));
    }
    let max = bounded(
        r,
        "max_position_embeddings",
        r.positive("max_position_embeddings")?,
        limits::POSITIONS,
    )?;
    let token_types = bounded(
        r,
        "type_vocab_size",
        r.positive("type_vocab_size")?,
        limits::VOCAB,
    )?;
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
    let s = sizes(r, Arch::Qwen3, false)?;
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
    let s = sizes(r, Arch::Olmo2, false)?;
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
    let s = sizes(r, arch, true)?;
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
