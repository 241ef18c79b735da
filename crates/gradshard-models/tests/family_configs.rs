//! Configs of the decoder families: a field the model needs, removed, or a
//! value it does not implement, is an error naming the field (one test per
//! family); the older hub forms of each config (`rope_theta`, `rotary_pct`,
//! `rotary_emb_base`, `rope_local_base_freq`, `sliding_window_pattern`, no
//! `layer_types`) give the same gradients as the transformers 5 form; a
//! `gemma3` checkpoint with its text config nested and its weights under the
//! language model's prefix gives Gemma 3's gradients; `make-model` writes a
//! random checkpoint of every family that loads and runs.

mod common;

use common::*;
use gradshard_models::{Device, GradModel, ModelConfig, ParamSet, SampleGrads, WeightDtype};
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::Path;

fn config(model: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir(model).join("config.json")).unwrap())
        .unwrap()
}

/// Parses `v` and returns the error text (the config must be refused).
fn refused(v: &Value) -> String {
    match ModelConfig::from_value(Path::new("config.json"), v) {
        Ok(c) => panic!("config was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// `config(model)` with `edit` applied must fail naming every word of `names`.
fn assert_refused(model: &str, edit: impl Fn(&mut Value), names: &[&str]) {
    let mut v = config(model);
    assert!(
        ModelConfig::from_value(Path::new("config.json"), &v).is_ok(),
        "{model}: fixture config must parse"
    );
    edit(&mut v);
    let msg = refused(&v);
    for n in names {
        assert!(msg.contains(n), "{model}: error should name {n:?}: {msg}");
    }
}

/// Checkpoint tensors: (name, shape, f32 values).
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A change to a config.
type Edit = Box<dyn Fn(&mut Value)>;

fn remove(v: &mut Value, key: &str) {
    v.as_object_mut().unwrap().remove(key).expect(key);
}

#[test]
fn neox_config_errors_name_the_field() {
    assert_refused(
        "neox",
        |v| {
            v["rope_parameters"]
                .as_object_mut()
                .unwrap()
                .remove("partial_rotary_factor");
        },
        &["missing", "partial_rotary_factor", "rotary_pct"],
    );
    assert_refused(
        "neox",
        |v| v["hidden_act"] = json!("squared_relu"),
        &["hidden_act", "squared_relu"],
    );
    assert_refused(
        "neox",
        |v| v["rope_parameters"]["partial_rotary_factor"] = json!(0.1),
        &["partial_rotary_factor"],
    );
}

#[test]
fn phi3_config_errors_name_the_field() {
    assert_refused(
        "phi3",
        |v| v["rope_parameters"]["rope_type"] = json!("longrope"),
        &["unsupported", "rope_parameters", "longrope"],
    );
    assert_refused(
        "phi3",
        |v| remove(v, "intermediate_size"),
        &["missing", "intermediate_size"],
    );
}

#[test]
fn bert_config_errors_name_the_field() {
    assert_refused(
        "bert",
        |v| v["is_decoder"] = json!(false),
        &["unsupported", "is_decoder"],
    );
    assert_refused(
        "bert",
        |v| remove(v, "is_decoder"),
        &["missing", "is_decoder"],
    );
    assert_refused(
        "bert",
        |v| remove(v, "type_vocab_size"),
        &["missing", "type_vocab_size"],
    );
    assert_refused(
        "bert",
        |v| v["position_embedding_type"] = json!("relative_key"),
        &["position_embedding_type", "relative_key"],
    );
}

#[test]
fn qwen3_config_errors_name_the_field() {
    assert_refused(
        "qwen3",
        |v| remove(v, "rope_parameters"),
        &["missing", "rope_theta"],
    );
    assert_refused(
        "qwen3",
        |v| v["layer_types"] = json!(["full_attention", "chunked_attention"]),
        &["layer_types", "chunked_attention"],
    );
    assert_refused(
        "qwen3",
        |v| v["layer_types"] = json!(["full_attention", "sliding_attention"]),
        &["missing", "sliding_window"],
    );
}

#[test]
fn gemma2_config_errors_name_the_field() {
    assert_refused(
        "gemma2",
        |v| remove(v, "query_pre_attn_scalar"),
        &["missing", "query_pre_attn_scalar"],
    );
    assert_refused(
        "gemma2",
        |v| remove(v, "attn_logit_softcapping"),
        &["missing", "attn_logit_softcapping"],
    );
    assert_refused(
        "gemma2",
        |v| v["hidden_activation"] = json!("tanh"),
        &["hidden_activation", "tanh"],
    );
}

#[test]
fn gemma3_config_errors_name_the_field() {
    assert_refused(
        "gemma3",
        |v| {
            for k in [
                "layer_types",
                "sliding_window_pattern",
                "_sliding_window_pattern",
            ] {
                remove(v, k);
            }
        },
        &["missing", "layer_types"],
    );
    assert_refused(
        "gemma3",
        |v| v["rope_parameters"]["sliding_attention"]["rope_type"] = json!("yarn"),
        &["rope_parameters.sliding_attention", "yarn"],
    );
    assert_refused(
        "gemma3",
        |v| {
            v["rope_parameters"]
                .as_object_mut()
                .unwrap()
                .remove("full_attention");
        },
        &["missing", "rope_parameters.full_attention"],
    );
}

#[test]
fn olmo2_config_errors_name_the_field() {
    assert_refused(
        "olmo2",
        |v| remove(v, "num_attention_heads"),
        &["missing", "num_attention_heads"],
    );
    assert_refused(
        "olmo2",
        |v| v["rope_parameters"]["rope_type"] = json!("dynamic"),
        &["unsupported", "rope_parameters", "dynamic"],
    );
}

/// A copy of fixture `model` whose config is `cfg` and whose tensors are
/// `tensors` (default: the fixture's), in a temporary directory.
fn variant(model: &str, cfg: &Value, tensors: Option<Tensors>) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = tensors.unwrap_or_else(|| read_checkpoint(model));
    write_checkpoint(model, tmp.path(), &tensors, Dtype::F32, 1);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    tmp
}

/// Loop gradients of the longest math sample.
fn grads(dir: &Path, model: &str) -> SampleGrads {
    let m = GradModel::load(dir, Device::Cpu, ParamSet::AttnMlp)
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    let s = token_samples(model, "math")
        .into_iter()
        .max_by_key(|s| s.ids.len())
        .unwrap();
    m.grads_loop(&s).unwrap()
}

fn assert_same_grads(a: &SampleGrads, b: &SampleGrads, strip: &str, what: &str) {
    assert_eq!(a.loss_sum, b.loss_sum, "{what}: loss");
    assert_eq!(a.grads.len(), b.grads.len(), "{what}");
    for (x, y) in a.grads.iter().zip(&b.grads) {
        assert_eq!(x.name.replacen(strip, "model.", 1), y.name, "{what}");
        assert_eq!(x.data, y.data, "{what}: {}", x.name);
    }
}

#[test]
fn legacy_config_forms_give_the_same_gradients() {
    // model, the transformers 5 config turned into what older hub checkpoints say
    let cases: Vec<(&str, Edit)> = vec![
        (
            "neox",
            Box::new(|v| {
                remove(v, "rope_parameters");
                v["rotary_pct"] = json!(0.5);
                v["rotary_emb_base"] = json!(10000);
            }),
        ),
        (
            "phi3",
            Box::new(|v| {
                remove(v, "rope_parameters");
                v["rope_theta"] = json!(10000.0);
                v["rope_scaling"] = Value::Null;
            }),
        ),
        (
            "qwen3",
            Box::new(|v| {
                remove(v, "rope_parameters");
                remove(v, "layer_types");
                v["rope_theta"] = json!(10000.0);
            }),
        ),
        (
            "gemma2",
            Box::new(|v| {
                remove(v, "rope_parameters");
                remove(v, "layer_types");
                v["rope_theta"] = json!(10000.0);
            }),
        ),
        (
            "gemma3",
            Box::new(|v| {
                remove(v, "rope_parameters");
                remove(v, "layer_types");
                remove(v, "_sliding_window_pattern");
                v["rope_theta"] = json!(1_000_000.0);
                v["rope_local_base_freq"] = json!(10000.0);
                v["rope_scaling"] = Value::Null;
            }),
        ),
        (
            "olmo2",
            Box::new(|v| {
                remove(v, "rope_parameters");
                v["rope_theta"] = json!(10000.0);
            }),
        ),
    ];
    for (model, edit) in cases {
        let want = grads(&model_dir(model), model);
        let mut v = config(model);
        edit(&mut v);
        let dir = variant(model, &v, None);
        assert_same_grads(&grads(dir.path(), model), &want, "model.", model);
    }
    // A change the legacy fields are read for must change the gradients.
    let mut v = config("gemma3");
    v["rope_parameters"]["sliding_attention"]["rope_theta"] = json!(1_000_000.0);
    let dir = variant("gemma3", &v, None);
    let other = grads(dir.path(), "gemma3");
    assert_ne!(other.grads, grads(&model_dir("gemma3"), "gemma3").grads);
}

#[test]
fn neox_sequential_residual_is_read() {
    let mut v = config("neox");
    v["use_parallel_residual"] = json!(false);
    let dir = variant("neox", &v, None);
    let seq = grads(dir.path(), "neox");
    let par = grads(&model_dir("neox"), "neox");
    assert!((seq.loss_sum - par.loss_sum).abs() > 1e-6);
}

#[test]
fn nested_gemma3_checkpoints_give_gemma3_text_gradients() {
    let want = grads(&model_dir("gemma3"), "gemma3");
    let mut text = config("gemma3");
    let tie = text["tie_word_embeddings"].clone();
    text.as_object_mut().unwrap().remove("tie_word_embeddings");
    let outer = json!({"model_type": "gemma3", "text_config": text,
                       "tie_word_embeddings": tie, "architectures": ["Gemma3ForConditionalGeneration"]});
    // transformers 5 and 4.5x prefixes of the language model's weights
    for prefix in ["model.language_model.", "language_model.model."] {
        let mut tensors: Vec<_> = read_checkpoint("gemma3")
            .into_iter()
            .map(|(n, s, v)| (n.replacen("model.", prefix, 1), s, v))
            .collect();
        tensors.push((
            "model.vision_tower.patch_embedding.weight".into(),
            vec![2, 3],
            vec![0.5; 6],
        ));
        tensors.push((
            "model.multi_modal_projector.mm_input_projection_weight".into(),
            vec![3, 2],
            vec![0.25; 6],
        ));
        let dir = variant("gemma3", &outer, Some(tensors));
        let got = grads(dir.path(), "gemma3");
        assert!(
            got.grads[0].name.starts_with(prefix),
            "{}",
            got.grads[0].name
        );
        assert_same_grads(&got, &want, prefix, prefix);
    }
}

#[test]
fn random_checkpoints_of_every_family_load_and_run() {
    for model in ["neox", "phi3", "bert", "qwen3", "gemma2", "gemma3", "olmo2"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let w = gradshard_models::write_random_checkpoint(
            &dir,
            &config(model),
            7,
            WeightDtype::F32,
            0.02,
        )
        .unwrap_or_else(|e| panic!("{model}: {e}"));
        // Same tensors, names and shapes as the fixture checkpoint.
        let want: Vec<(String, Vec<usize>)> = read_checkpoint(model)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        assert_eq!(w.tensors, want.len(), "{model}");
        std::fs::copy(
            model_dir(model).join("tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .unwrap();
        let m = GradModel::load(&dir, Device::Cpu, ParamSet::AttnMlp).unwrap();
        let mut names: Vec<(String, Vec<usize>)> = m
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        names.sort();
        let mut tied = want.clone();
        tied.sort();
        assert_eq!(names, tied, "{model}");
        let s = &token_samples(model, "math")[0];
        let g = m.grads_loop(s).unwrap();
        assert!(g.loss_sum.is_finite() && g.loss_sum > 0.0, "{model}");
        assert!(g.grads.iter().all(|t| t.data.iter().all(|x| x.is_finite())));
    }
}
