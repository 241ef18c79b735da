//! Checkpoints that nest their language model: a `gemma3` config keeps the text
//! model's config under `text_config`, written as a diff against
//! transformers' `Gemma3TextConfig` defaults.

use serde_json::Value;

use crate::error::{Error, Result};

use super::reader::Reader;

/// Defaults of transformers' `Gemma3TextConfig`. A `gemma3` checkpoint's
/// `config.json` nests its language model under `text_config`, written as a
/// diff against these, so a field left out there has exactly this value.
pub const GEMMA3_TEXT_DEFAULTS: &[(&str, f64)] = &[
    ("vocab_size", 262_208.0),
    ("hidden_size", 2304.0),
    ("intermediate_size", 9216.0),
    ("num_hidden_layers", 26.0),
    ("num_attention_heads", 8.0),
    ("num_key_value_heads", 4.0),
    ("head_dim", 256.0),
    ("rms_norm_eps", 1e-6),
    ("rope_theta", 1_000_000.0),
    ("rope_local_base_freq", 10_000.0),
    ("query_pre_attn_scalar", 256.0),
    ("sliding_window", 4096.0),
    ("sliding_window_pattern", 6.0),
    ("max_position_embeddings", 131_072.0),
];

/// The text model's config of a `gemma3` checkpoint: `text_config`, completed
/// with [`GEMMA3_TEXT_DEFAULTS`] and its non-numeric defaults.
pub(crate) fn gemma3_text_config(r: &Reader<'_>) -> Result<Value> {
    let mut text = match r.v.get("text_config") {
        Some(t @ Value::Object(_)) => t.clone(),
        _ => {
            return Err(r.err(
                "field `text_config` is missing or not an object (a `gemma3` config nests its language model there)"
                    .into(),
            ))
        }
    };
    let obj = text.as_object_mut().expect("checked above");
    for (k, v) in GEMMA3_TEXT_DEFAULTS {
        let v = if v.fract() == 0.0 && *v >= 1.0 {
            Value::from(*v as u64)
        } else {
            Value::from(*v)
        };
        obj.entry(*k).or_insert(v);
    }
    for (k, v) in [
        ("model_type", Value::from("gemma3_text")),
        ("hidden_activation", Value::from("gelu_pytorch_tanh")),
        ("attn_logit_softcapping", Value::Null),
        ("final_logit_softcapping", Value::Null),
    ] {
        obj.entry(k).or_insert(v);
    }
    Ok(text)
}

/// Errors inside a nested `text_config` say so.
pub(crate) fn in_text_config(r: &Reader<'_>, e: Error) -> Error {
    match e {
        Error::Config { msg, .. } => r.err(format!("text_config: {msg}")),
        Error::Unsupported { what, .. } => r.unsupported(format!("text_config: {what}")),
        other => other,
    }
}
