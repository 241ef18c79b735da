//! The native CPU engine (src/native.rs) against the burn engine on the same
//! checkpoints: per-sample gradients one sample at a time, packed chunks of
//! several samples, and factors, for the LLaMA fixture and random LLaMA-family
//! checkpoints that exercise what the native engine must get right (GQA,
//! q/k/v biases, sliding windows, tied embeddings, head_dim ≠ D/H, RoPE
//! scaling, o/MLP biases). The fixture parity tests (fixture_parity.rs) check
//! the native engine against PyTorch float64, since `GradModel::load` picks it
//! for LLaMA on the CPU.

mod common;

use common::*;
use gradshard_models::{
    write_random_checkpoint, write_random_tasks, CpuEngine, Device, GradModel, ParamSet,
    ReaderOptions, SampleGrads, SampleReader, TokenSample, WeightDtype,
};
use serde_json::json;

/// `got` (native) equals `reference` (burn), with no tracked gradient all zero.
fn same(reference: &SampleGrads, got: &SampleGrads, tol: f64, what: &str) {
    assert_same_grads(reference, got, tol, &format!("{what} native vs burn"));
    for x in &reference.grads {
        assert!(
            x.data.iter().any(|v| *v != 0.0),
            "{what}: {} is zero",
            x.name
        );
    }
}

/// Native (one sample, a packed chunk, factors) against burn's loop.
fn compare(dir: &std::path::Path, samples: &[TokenSample], set: ParamSet, what: &str) {
    let native = GradModel::load_with(dir, Device::Cpu, set, CpuEngine::Native).unwrap();
    let burn = GradModel::load_with(dir, Device::Cpu, set, CpuEngine::Burn).unwrap();
    assert_eq!(native.engine_name(), "native");
    assert_eq!(burn.engine_name(), "burn");
    assert_eq!(native.tracked_params(), burn.tracked_params(), "{what}");
    let reference: Vec<SampleGrads> = samples
        .iter()
        .map(|s| burn.grads_loop(s).unwrap())
        .collect();
    for (s, r) in samples.iter().zip(&reference) {
        same(
            r,
            &native.grads_loop(s).unwrap(),
            1e-5,
            &format!("{what}/loop"),
        );
    }
    // Streamed one sample per backward (several in flight) and packed.
    let mut streamed = vec![];
    native
        .for_each_grads(samples.iter().cloned().map(Ok), 1, |g| {
            streamed.push(g);
            Ok(())
        })
        .unwrap();
    assert_eq!(streamed.len(), samples.len());
    for (g, r) in streamed.iter().zip(&reference) {
        same(r, g, 1e-5, &format!("{what}/streamed"));
    }
    let packed = native.grads_batched(samples).unwrap();
    for (p, r) in packed.iter().zip(&reference) {
        same(r, p, 1e-5, &format!("{what}/packed"));
    }
    let factors = native.factors(samples).unwrap();
    for (f, r) in factors.into_iter().zip(&reference) {
        for t in &f.factors {
            assert_eq!(t.n, f.tokens, "{what}: factor rows of {}", t.name);
        }
        same(r, &f.into_grads(), 1e-5, &format!("{what}/factors"));
    }
    let losses = native.loss(samples).unwrap();
    for (l, r) in losses.iter().zip(&reference) {
        assert!((l.loss_sum - r.loss_sum).abs() <= 1e-6 * r.loss_sum.abs());
    }
}

#[test]
fn native_matches_burn_on_the_llama_fixture() {
    for task in TASKS {
        let samples = token_samples("llama-gqa", task);
        compare(
            &model_dir("llama-gqa"),
            &samples,
            ParamSet::AttnMlp,
            &format!("llama-gqa/{task}"),
        );
    }
}

fn random_samples(dir: &std::path::Path, vocab: usize, seq: usize) -> Vec<TokenSample> {
    let files = write_random_tasks(dir, &["t".into()], 3, seq, vocab, 11).unwrap();
    let opts = ReaderOptions {
        vocab_size: Some(vocab),
        ..Default::default()
    };
    let mut samples: Vec<TokenSample> = SampleReader::open(&files[0], None, opts)
        .unwrap()
        .map(|s| s.unwrap())
        .collect();
    // Different lengths in one packed chunk.
    samples[1].ids.truncate(seq - 5);
    samples[2].ids.truncate(seq / 2);
    samples
}

#[test]
fn native_matches_burn_on_llama_family_variants() {
    let base = json!({"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 61,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128});
    let variants = [
        (
            "llama, tied, head_dim 12 != D/H",
            json!({"model_type": "llama",
            "tie_word_embeddings": true, "head_dim": 12}),
        ),
        (
            "llama with attention and MLP biases, llama3 RoPE",
            json!({"model_type": "llama",
            "tie_word_embeddings": false, "attention_bias": true, "mlp_bias": true,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        ),
        (
            "qwen2 (q/k/v biases)",
            json!({"model_type": "qwen2", "tie_word_embeddings": false}),
        ),
        (
            "mistral, sliding window 5",
            json!({"model_type": "mistral",
            "tie_word_embeddings": false, "sliding_window": 5}),
        ),
    ];
    for (what, extra) in variants {
        let mut cfg = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        write_random_checkpoint(&dir, &cfg, 5, WeightDtype::F32, 0.15).unwrap();
        let samples = random_samples(tmp.path(), 61, 24);
        compare(&dir, &samples, ParamSet::AttnMlp, what);
        compare(&dir, &samples[..1], ParamSet::Attn, what);
    }
}

#[test]
fn auto_picks_native_only_where_it_runs_the_model() {
    let llama = model_dir("llama-gqa");
    let pick = |dir: &std::path::Path, set| {
        GradModel::load(dir, Device::Cpu, set)
            .unwrap()
            .engine_name()
    };
    assert_eq!(pick(&llama, ParamSet::Attn), "native");
    assert_eq!(pick(&llama, ParamSet::AttnMlp), "native");
    // Embedding and LM-head gradients, and GPT-2, stay on burn.
    assert_eq!(pick(&llama, ParamSet::All2d), "burn");
    assert_eq!(pick(&model_dir("gpt2"), ParamSet::Attn), "burn");
    let err = GradModel::load_with(
        &model_dir("gpt2"),
        Device::Cpu,
        ParamSet::Attn,
        CpuEngine::Native,
    )
    .err()
    .expect("gpt2 is not a native model")
    .to_string();
    assert!(
        err.contains("native CPU engine") && err.contains("gpt2"),
        "{err}"
    );
    let err = GradModel::load_with(&llama, Device::Cpu, ParamSet::All2d, CpuEngine::Native)
        .err()
        .expect("all-2d is not native")
        .to_string();
    assert!(err.contains("all-2d"), "{err}");
}

#[test]
fn native_gradients_are_the_same_bits_run_to_run() {
    let samples = token_samples("llama-gqa", "math");
    let m = GradModel::load_with(
        &model_dir("llama-gqa"),
        Device::Cpu,
        ParamSet::Attn,
        CpuEngine::Native,
    )
    .unwrap();
    let a = m.grads_batched(&samples[..4]).unwrap();
    let b = m.grads_batched(&samples[..4]).unwrap();
    assert_eq!(a, b);
}
