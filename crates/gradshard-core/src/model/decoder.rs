//! The description of a decoder-only transformer: what differs between the
//! families that run on the generic decoder ([`DecoderConfig`]), and which
//! Hugging Face tensor plays which role ([`Roles`]). `families.rs` derives a
//! description from each family's `config.json`.

use super::kinds::{Activation, Arch, RopeConfig};

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
pub struct Roles {
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
pub fn roles(arch: Arch) -> Roles {
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
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Gpt2 | Arch::Gemma => LLAMA_ROLES,
    }
}

const GEMMA_NORMS: [Option<&str>; 4] = [
    Some("model.layers.{i}.input_layernorm"),
    Some("model.layers.{i}.post_attention_layernorm"),
    Some("model.layers.{i}.pre_feedforward_layernorm"),
    Some("model.layers.{i}.post_feedforward_layernorm"),
];

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
