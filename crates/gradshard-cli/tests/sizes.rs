//! Sizes are bounded before anything is allocated or written: an absurd layer
//! count, vocabulary, hidden or MLP width in a config or on the command line is
//! refused by the model description within seconds, with an error naming the
//! field, a small non-zero exit code (no abort, no backtrace) and no file left
//! behind; a checkpoint that does not fit the disk is refused before its first
//! byte. And `plan --like` never applies one dtype's compression ratio to another.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Runs a command that must be refused quickly and cleanly; returns its stderr.
fn refused(args: &[&str]) -> (i32, String) {
    let t0 = Instant::now();
    let o = run(args);
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let code = o
        .status
        .code()
        .unwrap_or_else(|| panic!("gradshard {args:?} was killed by a signal (an abort?): {err}"));
    assert!(
        code != 0 && code < 100,
        "gradshard {args:?} exited {code}: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace") && !err.contains("allocation"),
        "gradshard {args:?}: {err}"
    );
    assert!(
        took < Duration::from_secs(20),
        "gradshard {args:?} took {took:?} to refuse"
    );
    (code, err)
}

/// The fixture LLaMA's config with `key` set to `value`, written to `dir/config.json`.
fn llama_config_with(dir: &Path, key: &str, value: Value) -> std::path::PathBuf {
    let src = fixtures().join("llama-gqa/model/config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    v[key] = value;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    path
}

#[test]
fn make_model_refuses_absurd_sizes_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let (_, e) = refused(&[
        "make-model",
        "--out",
        p(&out),
        "--preset",
        "tiny",
        "--layers",
        "1000000000",
    ]);
    assert!(
        e.contains("num_hidden_layers") && e.contains("out of range (limit 4096)"),
        "{e}"
    );
    assert!(!out.exists(), "make-model left {}", out.display());
    let (_, e) = refused(&[
        "make-model",
        "--out",
        p(&out),
        "--preset",
        "tiny",
        "--vocab",
        "1000000000000",
    ]);
    assert!(
        e.contains("vocab_size") && e.contains("out of range"),
        "{e}"
    );
    assert!(!out.exists(), "make-model left {}", out.display());
}

#[test]
fn make_model_refuses_absurd_sizes_in_a_config() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("num_hidden_layers", json!(1_000_000_000u64)),
        ("hidden_size", json!(1u64 << 40)),
        ("intermediate_size", json!(1u64 << 50)),
        ("vocab_size", json!(1_000_000_000_000u64)),
        ("num_attention_heads", json!(1u64 << 30)),
        ("head_dim", json!(1u64 << 40)),
    ] {
        let cfg = llama_config_with(&dir.path().join(format!("cfg-{key}")), key, value);
        let out = dir.path().join(format!("out-{key}"));
        let (_, e) = refused(&["make-model", "--out", p(&out), "--config", p(&cfg)]);
        assert!(
            e.contains(key) && e.contains("out of range") && e.contains("config.json"),
            "{key}: {e}"
        );
        assert!(!out.exists(), "{key}: make-model left {}", out.display());
    }
}

#[test]
fn collect_refuses_a_config_with_a_billion_layers_and_writes_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let src = fixtures().join("llama-gqa/model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    llama_config_with(&model, "num_hidden_layers", json!(1_000_000_000u64));
    let store = dir.path().join("store");
    let task = format!("math={}", p(&fixtures().join("llama-gqa/tasks/math.jsonl")));
    let (_, e) = refused(&[
        "collect",
        "--model",
        p(&model),
        "--task",
        &task,
        "--store",
        p(&store),
        "--quiet",
    ]);
    assert!(
        e.contains("num_hidden_layers") && e.contains("out of range (limit 4096)"),
        "{e}"
    );
    assert!(!store.exists(), "collect left {}", store.display());
    // plan reads the same description and refuses it the same way.
    let (_, e) = refused(&["plan", "--model", p(&model), "--samples", "1"]);
    assert!(
        e.contains("num_hidden_layers") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn make_model_refuses_a_checkpoint_larger_than_the_free_space_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Every size within its limit, the product (16 Mi × 1 Mi embedding values) not.
    let cfg = llama_config_with(&dir.path().join("cfg"), "vocab_size", json!(1u64 << 24));
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["hidden_size"] = json!(1u64 << 20);
    v["num_attention_heads"] = json!(16);
    v["num_key_value_heads"] = json!(16);
    v["head_dim"] = json!(1u64 << 16);
    v["intermediate_size"] = json!(8);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let out = dir.path().join("huge");
    let (code, e) = refused(&["make-model", "--out", p(&out), "--config", p(&cfg)]);
    assert_eq!(code, 3, "{e}");
    assert!(
        e.contains("free") && e.contains("nothing was written"),
        "{e}"
    );
    assert!(!out.exists(), "make-model left {}", out.display());
}

#[test]
fn make_model_still_writes_a_model_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    ok(&[
        "make-model",
        "--out",
        p(&out),
        "--preset",
        "tiny",
        "--layers",
        "1",
        "--vocab",
        "100",
    ]);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["config.json", "model.safetensors"], "{names:?}");
}

fn plan_like(store: &Path, dtype: &str) -> Value {
    serde_json::from_str(&ok(&[
        "plan",
        "--model",
        p(&fixtures().join("llama-gqa/model")),
        "--samples",
        "10",
        "--like",
        p(store),
        "--dtype",
        dtype,
        "--json",
    ]))
    .unwrap()
}

#[test]
fn plan_like_uses_a_ratio_of_the_requested_dtype_or_says_which_it_assumed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("f32");
    ok(&[
        "synth",
        "--store",
        p(&store),
        "--preset",
        "tiny",
        "--samples",
        "2",
        "--dtype",
        "f32",
    ]);
    // Same dtype: the store's measured ratio.
    let same = plan_like(&store, "f32");
    let src = same["ratio_source"].as_str().unwrap();
    assert!(src.starts_with("measured on"), "{src}");
    let measured = same["ratio_assumed"].as_f64().unwrap();
    // Another dtype: the f32 ratio is not applied; the bf16 one is assumed, and said so.
    let other = plan_like(&store, "bf16");
    let src = other["ratio_source"].as_str().unwrap();
    assert!(
        src.contains("assumed for bf16") && src.contains("f32"),
        "{src}"
    );
    assert_eq!(other["ratio_assumed"].as_f64().unwrap(), 1.25);
    assert_ne!(other["ratio_assumed"].as_f64().unwrap(), measured);
    // The console report says it too.
    let text = ok(&[
        "plan",
        "--model",
        p(&fixtures().join("llama-gqa/model")),
        "--samples",
        "10",
        "--like",
        p(&store),
    ]);
    assert!(
        text.contains("assumed for bf16") && text.contains("holds f32 samples"),
        "{text}"
    );
}
