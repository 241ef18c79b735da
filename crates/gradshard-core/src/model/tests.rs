//! The description's own checks: sizes bounded per field, presets derive the
//! geometry the store crates always used, and the full description reads its
//! sizes through the same reader as the shape.

use std::path::Path;

use serde_json::{json, Value};

use super::*;
use crate::geometry::Layout;

fn shape(v: &Value) -> crate::Result<ModelShape> {
    ModelShape::from_value(Path::new("config.json"), v)
}

fn llama() -> Value {
    json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":64,"num_attention_heads":4,
           "num_key_value_heads":2,"intermediate_size":96,"vocab_size":100})
}

#[test]
fn every_size_past_its_limit_is_refused_naming_the_field() {
    for (key, value, limit) in [
        ("num_hidden_layers", 1_000_000_000u64, limits::LAYERS),
        ("hidden_size", 1 << 40, limits::HIDDEN),
        ("num_attention_heads", 1 << 30, limits::HEADS),
        ("num_key_value_heads", 1 << 30, limits::HEADS),
        ("head_dim", 1 << 40, limits::HEAD_DIM),
        ("vocab_size", 1_000_000_000_000, limits::VOCAB),
        ("intermediate_size", 1 << 50, limits::INTERMEDIATE),
    ] {
        let mut v = llama();
        v[key] = json!(value);
        for e in [
            shape(&v).unwrap_err().to_string(),
            ModelConfig::from_value(Path::new("config.json"), &v)
                .unwrap_err()
                .to_string(),
        ] {
            assert!(
                e.contains(&format!("`{key}` {value} is out of range (limit {limit})"))
                    && e.contains("config.json"),
                "{key}: {e}"
            );
        }
    }
    let e = shape(
        &json!({"model_type":"gpt2","n_layer":2,"n_embd":64,"n_head":4,"n_inner":1u64 << 50}),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`n_inner`") && e.contains("out of range"), "{e}");
}

#[test]
fn the_full_description_and_the_shape_agree() {
    let v = llama();
    let s = shape(&v).unwrap();
    let c = ModelConfig::from_value(Path::new("config.json"), &v).unwrap();
    assert_eq!(c.shape(), s);
    assert_eq!(c.geometry().unwrap(), s.geometry().unwrap());
    assert_eq!(
        (s.vocab, s.intermediate, s.head_dim),
        (Some(100), Some(96), 16)
    );
    // The shape needs no vocabulary or MLP width; the full description does.
    let mut v = llama();
    v.as_object_mut().unwrap().remove("vocab_size");
    assert_eq!(shape(&v).unwrap().vocab, None);
    let e = ModelConfig::from_value(Path::new("config.json"), &v).unwrap_err();
    assert!(e.to_string().contains("missing `vocab_size`"), "{e}");
}

#[test]
fn presets_give_the_shapes_synth_always_used() {
    let s = preset_shape("llama-3-8b").unwrap();
    let g = s.geometry().unwrap();
    assert_eq!(
        (
            g.layers,
            g.hidden,
            g.heads,
            g.kv_heads,
            g.head_dim,
            s.intermediate
        ),
        (32, 4096, 32, 8, 128, Some(14336))
    );
    assert_eq!((g.layout, g.root.as_str()), (Layout::SplitLinear, "model."));
    let g = preset_shape("gpt2").unwrap().geometry().unwrap();
    assert_eq!(
        (g.layout, g.root.as_str()),
        (Layout::Gpt2Conv1d, "transformer.")
    );
    // Every preset is a config the full description runs.
    for p in PRESETS {
        let v = preset_config(p.0, None, PRESET_VOCAB).unwrap();
        ModelConfig::from_value(Path::new("preset"), &v).unwrap();
    }
    let e = preset_shape("nope").unwrap_err().to_string();
    assert!(
        e.contains("unknown preset `nope`") && e.contains("tiny"),
        "{e}"
    );
    let e = preset_config("tiny", Some(1_000_000_000), 100)
        .map(|v| shape(&v))
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("num_hidden_layers") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn geometry_only_families_are_known_to_the_shape_not_to_the_forward_pass() {
    let v = json!({"model_type":"gemma","num_hidden_layers":1,"hidden_size":32,
                   "num_attention_heads":2,"num_key_value_heads":1,"head_dim":24});
    assert_eq!(shape(&v).unwrap().geometry().unwrap().model_type, "gemma");
    let e = ModelConfig::from_value(Path::new("config.json"), &v).unwrap_err();
    assert!(e.to_string().contains("unsupported model_type"), "{e}");
}
