//! `write_random_checkpoint` / `write_random_tasks`: what they write loads like a
//! Hugging Face checkpoint, trains like an untrained model, and is a pure function
//! of config and seed.

use gradshard_models::{
    write_random_checkpoint, write_random_tasks, Device, GradModel, ParamSet, ReaderOptions,
    SampleReader, WeightDtype,
};
use serde_json::json;

fn llama_gqa() -> serde_json::Value {
    json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 97, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "max_position_embeddings": 256, "tie_word_embeddings": false})
}

#[test]
fn random_llama_loads_and_its_loss_is_that_of_an_untrained_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let w = write_random_checkpoint(&dir, &llama_gqa(), 7, WeightDtype::Bf16, 0.02).unwrap();
    // embed + lm_head 97x64 each, per layer q 64x64, k/v 32x64, o 64x64, 3 MLP 176x64, 2 norms; final norm.
    let per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 176 * 64 + 2 * 64;
    assert_eq!(w.params, (2 * 97 * 64 + 2 * per_layer + 64) as u64);
    assert_eq!(w.tensors, 2 + 2 * 9 + 1);
    let files = write_random_tasks(tmp.path(), &["a".into(), "b".into()], 3, 20, 97, 7).unwrap();
    assert_eq!(files.len(), 2);

    let m = GradModel::load(&dir, Device::Cpu, ParamSet::Attn).unwrap();
    let opts = ReaderOptions {
        vocab_size: Some(97),
        ..Default::default()
    };
    let samples: Vec<_> = SampleReader::open(&files[0], None, opts)
        .unwrap()
        .map(|s| s.unwrap())
        .collect();
    assert_eq!(samples.len(), 3);
    for s in &samples {
        assert_eq!(s.ids.len(), 20);
        let g = m.grads_loop(s).unwrap();
        // Near-zero logits: every token costs about ln(vocab) nats.
        let per_token = g.loss_sum / g.tokens as f64;
        assert!(
            (per_token - (97f64).ln()).abs() < 0.05 * (97f64).ln(),
            "loss per token {per_token}"
        );
        assert_eq!(g.grads.len(), 2 * 4);
        for t in &g.grads {
            assert!(t.data.iter().all(|v| v.is_finite()), "{}", t.name);
            assert!(t.data.iter().any(|v| *v != 0.0), "{} is all zero", t.name);
        }
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes_and_nothing_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = json!({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
                      "n_positions": 64, "vocab_size": 50});
    let read = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    for (d, seed) in [("x", 1), ("y", 1), ("z", 2)] {
        write_random_checkpoint(&tmp.path().join(d), &gpt2, seed, WeightDtype::F32, 0.02).unwrap();
    }
    assert_eq!(read("x"), read("y"));
    assert_ne!(read("x"), read("z"));
    assert!(GradModel::load(&tmp.path().join("x"), Device::Cpu, ParamSet::Attn).is_ok());
    // A second write into the same directory is refused and leaves the files as they were.
    let before = read("x");
    let e = write_random_checkpoint(&tmp.path().join("x"), &gpt2, 9, WeightDtype::F32, 0.02)
        .unwrap_err();
    assert!(e.to_string().contains("already holds"), "{e}");
    assert_eq!(read("x"), before);
    // A config the loader rejects is rejected before anything is written.
    let bad = json!({"model_type": "mamba"});
    assert!(
        write_random_checkpoint(&tmp.path().join("w"), &bad, 0, WeightDtype::F32, 0.02).is_err()
    );
    assert!(!tmp.path().join("w").exists());
}
