//! Acceptance for the families on the generic decoder (GPT-NeoX, Phi-3,
//! causal BERT, Qwen3, Gemma 2, Gemma 3, OLMo-2) against the float64 PyTorch
//! fixtures in tests/fixtures/<family>: T and loss_sum within 1e-5, every
//! reference gradient within 1e-4 (normwise relative per tensor), by the
//! one-sample loop, by batches of 4 (padding included) and by the factored
//! taps of the same batch.
//!
//! The fixtures keep two reference samples per family (the longest `math`
//! sample and the shortest `general` one); the other fourteen are checked
//! through their scores by the CLI's `families` test (collect → score against
//! the oracle).

mod common;

use common::*;
use gradshard_models::{Device, GradModel, ParamSet, SampleGrads, TokenSample};
use std::collections::BTreeSet;

const FAMILIES: [&str; 7] = ["neox", "phi3", "bert", "qwen3", "gemma2", "gemma3", "olmo2"];

/// The samples of `model` that have a reference gradient file, as (task, sample).
fn referenced(model: &str) -> Vec<(&'static str, TokenSample)> {
    let mut out = vec![];
    for task in TASKS {
        let dir = fixtures().join(model).join("grads").join(task);
        let have: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for s in token_samples(model, task) {
            if have.contains(&format!("{}.safetensors", s.id)) {
                out.push((task, s));
            }
        }
    }
    assert_eq!(out.len(), 2, "{model}: reference samples");
    out
}

/// Checks one result against its reference file; returns the worst tensor error.
fn check(model: &str, task: &str, g: &SampleGrads, what: &str) -> f64 {
    let r = ref_grads(model, task, &g.id);
    assert_eq!(g.tokens, r.tokens, "{model}/{what}/{task}/{}: T", g.id);
    let loss_rel = (g.loss_sum - r.loss_sum).abs() / r.loss_sum.abs();
    assert!(
        loss_rel <= 1e-5,
        "{model}/{what}/{task}/{}: loss_sum {} vs reference {} (rel {loss_rel:e})",
        g.id,
        g.loss_sum,
        r.loss_sum
    );
    let ours: BTreeSet<&str> = g.grads.iter().map(|t| t.name.as_str()).collect();
    let theirs: BTreeSet<&str> = r.tensors.keys().map(String::as_str).collect();
    assert_eq!(ours, theirs, "{model}/{what}: tensor names");
    let mut worst = 0.0f64;
    for t in &g.grads {
        let (shape, vals) = &r.tensors[&t.name];
        assert_eq!(&t.shape, shape, "{model}/{what}: shape of {}", t.name);
        let e = rel_err(&t.data, vals);
        assert!(
            e <= 1e-4,
            "{model}/{what}/{task}/{}: {} rel err {e:e} > 1e-4",
            g.id,
            t.name
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn loop_batched_and_factored_gradients_match_the_references() {
    for model in FAMILIES {
        let m = GradModel::load(&model_dir(model), Device::Cpu, ParamSet::AttnMlp)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        let refs = referenced(model);
        let mut worst = [0.0f64; 3];
        for (task, s) in &refs {
            let g = m.grads_loop(s).unwrap_or_else(|e| panic!("{model}: {e}"));
            worst[0] = worst[0].max(check(model, task, &g, "loop"));
        }
        // A batch of 4: the two references (a long and a short sample) and two
        // more of other lengths, so every reference shares a padded batch.
        let extra: Vec<TokenSample> = token_samples(model, "math")
            .into_iter()
            .filter(|s| refs.iter().all(|(_, r)| r.id != s.id || r.ids != s.ids))
            .take(2)
            .collect();
        let mut batch: Vec<TokenSample> = vec![refs[1].1.clone(), extra[0].clone()];
        batch.push(refs[0].1.clone());
        batch.push(extra[1].clone());
        let lens: BTreeSet<usize> = batch.iter().map(|s| s.ids.len()).collect();
        assert!(lens.len() > 1, "{model}: the batch must need padding");
        let task_of = |i: usize| if i == 0 { refs[1].0 } else { refs[0].0 };
        let batched = m.grads_batched(&batch).unwrap();
        worst[1] = worst[1].max(check(model, task_of(0), &batched[0], "batch4"));
        worst[1] = worst[1].max(check(model, task_of(2), &batched[2], "batch4"));
        let factored: Vec<SampleGrads> = m
            .factors(&batch)
            .unwrap()
            .into_iter()
            .map(|f| f.into_grads())
            .collect();
        worst[2] = worst[2].max(check(model, task_of(0), &factored[0], "factors"));
        worst[2] = worst[2].max(check(model, task_of(2), &factored[2], "factors"));
        // The two extra samples: batched and factored agree with their own loop.
        for i in [1, 3] {
            let l = m.grads_loop(&batch[i]).unwrap();
            for (what, g) in [("batch4", &batched[i]), ("factors", &factored[i])] {
                assert_eq!(g.tokens, l.tokens);
                assert!((g.loss_sum - l.loss_sum).abs() <= 1e-5 * l.loss_sum.abs());
                for (a, b) in g.grads.iter().zip(&l.grads) {
                    let e = rel_err(&a.data, &b.data);
                    assert!(
                        e <= 1e-5,
                        "{model}/{what}/{}: {} vs loop {e:e}",
                        g.id,
                        a.name
                    );
                }
            }
        }
        eprintln!(
            "{model}: worst per-tensor rel err vs float64: loop {:.2e}, batch4 {:.2e}, factors {:.2e}",
            worst[0], worst[1], worst[2]
        );
    }
}

#[test]
fn tokenizers_reproduce_the_fixture_ids() {
    for model in FAMILIES {
        let tok_path = model_dir(model).join("tokenizer.json");
        let tok = gradshard_models::load_tokenizer(&tok_path).unwrap();
        for task in TASKS {
            for s in read_task(model, task) {
                let ids = gradshard_models::encode(&tok, &s.text, &tok_path).unwrap();
                assert_eq!(ids, s.input_ids, "{model}/{task}/{}", s.id);
            }
        }
    }
}

/// A bf16 copy of each checkpoint is a different model within bf16 rounding:
/// every reference gradient within 2e-2, and measurably not f32-exact.
#[test]
fn bf16_checkpoints_stay_within_2e_2() {
    for model in FAMILIES {
        let tmp = tempfile::tempdir().unwrap();
        write_checkpoint(
            model,
            tmp.path(),
            &read_checkpoint(model),
            safetensors::Dtype::BF16,
            1,
        );
        let m = GradModel::load(tmp.path(), Device::Cpu, ParamSet::AttnMlp).unwrap();
        let mut worst = 0.0f64;
        for (task, s) in referenced(model) {
            let g = m.grads_loop(&s).unwrap();
            let r = ref_grads(model, task, &g.id);
            assert_eq!(g.tokens, r.tokens);
            let loss_rel = (g.loss_sum - r.loss_sum).abs() / r.loss_sum.abs();
            assert!(
                loss_rel < 2e-2,
                "{model}/{task}/{}: loss rel {loss_rel:e}",
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
        assert!(worst > 1e-5, "{model}: bf16 copy gave f32-exact gradients");
        eprintln!("{model}: worst per-tensor rel err (bf16 checkpoint) = {worst:.2e}");
    }
}
