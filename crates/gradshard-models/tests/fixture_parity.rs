//! Acceptance: agreement with the float64 PyTorch reference fixtures
//! (tests/fixtures/{llama-gqa,gpt2}) for tokenization, T, loss_sum and every
//! stored gradient tensor, on the f32 checkpoint and on a bf16 copy.

mod common;

use common::*;
use gradshard_models::{encode, load_tokenizer, Device, GradModel, ParamSet, SampleGrads};
use safetensors::Dtype;
use std::collections::BTreeSet;

/// Compare one sample against its reference file; returns the worst tensor error.
fn check_against_reference(model: &str, task: &str, g: &SampleGrads, tol: f64) -> f64 {
    let r = ref_grads(model, task, &g.id);
    assert_eq!(g.tokens, r.tokens, "{model}/{task}/{}: T", g.id);
    let loss_rel = (g.loss_sum - r.loss_sum).abs() / r.loss_sum.abs();
    assert!(
        loss_rel <= 1e-5,
        "{model}/{task}/{}: loss_sum {} vs reference {} (rel {loss_rel:e})",
        g.id,
        g.loss_sum,
        r.loss_sum
    );
    let ours: BTreeSet<&str> = g.grads.iter().map(|t| t.name.as_str()).collect();
    let theirs: BTreeSet<&str> = r.tensors.keys().map(String::as_str).collect();
    assert_eq!(ours, theirs, "{model}/{task}/{}: tensor names", g.id);
    let mut worst = 0.0f64;
    for t in &g.grads {
        let (shape, vals) = &r.tensors[&t.name];
        assert_eq!(
            &t.shape, shape,
            "{model}/{task}/{}: shape of {}",
            g.id, t.name
        );
        let e = rel_err(&t.data, vals);
        assert!(
            e <= tol,
            "{model}/{task}/{}: {} rel err {e:e} > {tol:e}",
            g.id,
            t.name
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn tokenizer_reproduces_fixture_input_ids() {
    for model in MODELS {
        let tok_path = model_dir(model).join("tokenizer.json");
        let tok = load_tokenizer(&tok_path).unwrap();
        for task in TASKS {
            for s in read_task(model, task) {
                let ids = encode(&tok, &s.text, &tok_path).unwrap();
                assert_eq!(ids, s.input_ids, "{model}/{task}/{}: {:?}", s.id, s.text);
            }
        }
    }
}

#[test]
fn loop_gradients_match_reference_f32() {
    for model in MODELS {
        let m = GradModel::load(&model_dir(model), Device::Cpu, ParamSet::AttnMlp).unwrap();
        let mut worst = 0.0f64;
        for task in TASKS {
            let samples = token_samples(model, task);
            assert_eq!(samples.len(), 8);
            for s in &samples {
                let g = m.grads_loop(s).unwrap();
                worst = worst.max(check_against_reference(model, task, &g, 1e-4));
            }
        }
        eprintln!("{model}: worst per-tensor rel err (f32, loop) = {worst:e}");
    }
}

#[test]
fn attn_param_set_is_the_attention_subset() {
    for model in MODELS {
        let m = GradModel::load(&model_dir(model), Device::Cpu, ParamSet::Attn).unwrap();
        let names: Vec<String> = m.tracked_params().into_iter().map(|p| p.name).collect();
        assert!(!names.is_empty());
        for n in &names {
            assert!(
                n.contains("self_attn") || n.contains(".attn."),
                "{model}: {n}"
            );
        }
        let s = &token_samples(model, "math")[0];
        let g = m.grads_loop(s).unwrap();
        assert_eq!(g.grads.len(), names.len());
        let r = ref_grads(model, "math", &s.id);
        for t in &g.grads {
            assert!(
                rel_err(&t.data, &r.tensors[&t.name].1) <= 1e-4,
                "{}",
                t.name
            );
        }
    }
}

#[test]
fn bf16_checkpoint_gradients_within_2e_2() {
    for model in MODELS {
        let tmp = tempfile::tempdir().unwrap();
        write_checkpoint(model, tmp.path(), &read_checkpoint(model), Dtype::BF16, 1);
        let m = GradModel::load(tmp.path(), Device::Cpu, ParamSet::AttnMlp).unwrap();
        let mut worst = 0.0f64;
        for task in TASKS {
            for s in token_samples(model, task) {
                let g = m.grads_loop(&s).unwrap();
                let r = ref_grads(model, task, &g.id);
                assert_eq!(g.tokens, r.tokens);
                let loss_rel = (g.loss_sum - r.loss_sum).abs() / r.loss_sum;
                assert!(
                    loss_rel < 2e-2,
                    "{model}/{task}/{}: loss rel {loss_rel}",
                    g.id
                );
                for t in &g.grads {
                    let e = rel_err(&t.data, &r.tensors[&t.name].1);
                    assert!(
                        e <= 2e-2,
                        "{model}/{task}/{}: {} rel err {e:e}",
                        g.id,
                        t.name
                    );
                    worst = worst.max(e);
                }
            }
        }
        // The bf16 copy really is a different model: errors are not ~f32 round-off.
        assert!(
            worst > 1e-5,
            "{model}: bf16 copy gave f32-exact gradients ({worst:e})"
        );
        eprintln!("{model}: worst per-tensor rel err (bf16 checkpoint) = {worst:e}");
    }
}

#[test]
fn f16_sharded_checkpoint_loads() {
    // f16 weights split over 3 shards with an index: same model within f16 rounding.
    let model = "llama-gqa";
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(model, tmp.path(), &read_checkpoint(model), Dtype::F16, 3);
    assert!(tmp.path().join("model.safetensors.index.json").exists());
    let m = GradModel::load(tmp.path(), Device::Cpu, ParamSet::AttnMlp).unwrap();
    for s in token_samples(model, "math") {
        let g = m.grads_loop(&s).unwrap();
        let r = ref_grads(model, "math", &g.id);
        for t in &g.grads {
            let e = rel_err(&t.data, &r.tensors[&t.name].1);
            assert!(e <= 2e-2, "{}: {} rel err {e:e}", g.id, t.name);
        }
    }
}

#[test]
fn f32_sharded_checkpoint_is_exact() {
    let model = "gpt2";
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(model, tmp.path(), &read_checkpoint(model), Dtype::F32, 2);
    let a = GradModel::load(tmp.path(), Device::Cpu, ParamSet::AttnMlp).unwrap();
    let b = GradModel::load(&model_dir(model), Device::Cpu, ParamSet::AttnMlp).unwrap();
    let s = &token_samples(model, "general")[3];
    assert_eq!(a.grads_loop(s).unwrap(), b.grads_loop(s).unwrap());
}

#[test]
fn legacy_gpt2_names_without_transformer_prefix() {
    // Old GPT-2 checkpoints store `h.0.attn...` instead of `transformer.h.0.attn...`;
    // gradients are still reported under the canonical names.
    let model = "gpt2";
    let tmp = tempfile::tempdir().unwrap();
    let ts: Vec<_> = read_checkpoint(model)
        .into_iter()
        .map(|(n, s, v)| {
            (
                n.strip_prefix("transformer.").unwrap_or(&n).to_string(),
                s,
                v,
            )
        })
        .collect();
    write_checkpoint(model, tmp.path(), &ts, Dtype::F32, 1);
    let m = GradModel::load(tmp.path(), Device::Cpu, ParamSet::AttnMlp).unwrap();
    let s = &token_samples(model, "math")[0];
    let g = m.grads_loop(s).unwrap();
    check_against_reference(model, "math", &g, 1e-4);
}
