//! The batched (one backward, output taps) path gives the same per-sample
//! gradients as the one-sample-per-backward loop, including under padding,
//! tied embeddings (GPT-2 wte used twice) and embedding tables (All2d).

mod common;

use common::*;
use gradshard_models::{Device, GradModel, ParamSet, SampleGrads, SampleId, TokenSample};

fn check(model: &str, set: ParamSet, batch: usize) {
    let m = GradModel::load(&model_dir(model), Device::Cpu, set).unwrap();
    for task in TASKS {
        let samples = token_samples(model, task);
        let lens: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
        assert!(
            lens.iter().min() != lens.iter().max(),
            "fixture lengths should vary so padding is exercised"
        );
        let loops: Vec<SampleGrads> = samples.iter().map(|s| m.grads_loop(s).unwrap()).collect();
        for chunk_start in (0..samples.len()).step_by(batch) {
            let end = (chunk_start + batch).min(samples.len());
            let batched = m.grads_batched(&samples[chunk_start..end]).unwrap();
            assert_eq!(batched.len(), end - chunk_start);
            for (b, l) in batched.iter().zip(&loops[chunk_start..end]) {
                assert_same_grads(
                    l,
                    b,
                    1e-5,
                    &format!("{model}/{task}/{set:?}/batch{batch} vs loop"),
                );
            }
        }
    }
}

#[test]
fn batched_matches_loop_attn_mlp() {
    for model in MODELS {
        check(model, ParamSet::AttnMlp, 8);
        check(model, ParamSet::AttnMlp, 3);
    }
}

#[test]
fn batched_matches_loop_all_2d() {
    for model in MODELS {
        check(model, ParamSet::All2d, 8);
    }
}

#[test]
fn all_2d_includes_embeddings_and_head() {
    let m = GradModel::load(&model_dir("gpt2"), Device::Cpu, ParamSet::All2d).unwrap();
    let names: Vec<String> = m.tracked_params().into_iter().map(|p| p.name).collect();
    assert!(names.contains(&"transformer.wte.weight".to_string()));
    assert!(names.contains(&"transformer.wpe.weight".to_string()));
    let m = GradModel::load(&model_dir("llama-gqa"), Device::Cpu, ParamSet::All2d).unwrap();
    let names: Vec<String> = m.tracked_params().into_iter().map(|p| p.name).collect();
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(names.contains(&"lm_head.weight".to_string()));
}

/// A long padded neighbour must not change a short sample's gradient, and
/// the long sample must be unaffected by sharing a batch.
#[test]
fn padding_does_not_leak_between_samples() {
    let m = GradModel::load(&model_dir("llama-gqa"), Device::Cpu, ParamSet::AttnMlp).unwrap();
    let short = TokenSample {
        id: SampleId::Str("short".into()),
        ids: vec![5, 9, 12],
        line: 0,
    };
    let long = TokenSample {
        id: SampleId::Str("long".into()),
        ids: (0..40).map(|i| (i * 7 % 60 + 2) as u32).collect(),
        line: 0,
    };
    let alone_s = m.grads_loop(&short).unwrap();
    let alone_l = m.grads_loop(&long).unwrap();
    let both = m.grads_batched(&[short.clone(), long.clone()]).unwrap();
    assert_same_grads(&alone_s, &both[0], 1e-5, "short");
    assert_same_grads(&alone_l, &both[1], 1e-5, "long");
    assert_eq!(both[0].tokens, 2);
    assert_eq!(both[1].tokens, 39);
}
