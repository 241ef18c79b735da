//! Factored storage end to end (`collect --representation`): slices equal to the
//! fixtures' PyTorch gradients for LLaMA-GQA and GPT-2, bf16 factors no worse than bf16
//! full slices, the byte saving on a `make-model --preset small` checkpoint, and
//! `auto` choosing by sample length on both sides of the break-even.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{fixtures, ok, p};

/// `collect` of a fixture's two tasks (or a model dir + tasks dir) into `store`.
use common::collect;

fn ingest(fixture: &Path, store: &Path) {
    common::ingest(fixture, store, &["--dtype", "f32"]);
}

/// Normwise relative error of every frame of `a` against the same frame of `truth`,
/// with the squared norms of the difference and of the truth.
fn frame_errors(a: &Path, truth: &Path) -> Vec<(String, f64, f64, f64)> {
    let sa = gradshard_store::Store::open(a).unwrap();
    let sb = gradshard_store::Store::open(truth).unwrap();
    assert_eq!(sa.order().n_frames(), sb.order().n_frames());
    let mut out = Vec::new();
    for task in ["math", "general"] {
        let (ra, rb) = (sa.samples(task).unwrap(), sb.samples(task).unwrap());
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            assert_eq!((&x.id, x.tokens), (&y.id, y.tokens));
            for f in 0..sa.order().n_frames() {
                let (u, v) = (sa.read_frame(x, f).unwrap(), sb.read_frame(y, f).unwrap());
                let norm = v.iter().map(|z| (*z as f64).powi(2)).sum::<f64>().sqrt();
                let diff = u
                    .iter()
                    .zip(&v)
                    .map(|(p, q)| ((*p - *q) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                out.push((
                    format!("{task} sample {} {}", x.id, sa.order().describe(f)),
                    diff / norm.max(f64::MIN_POSITIVE),
                    diff * diff,
                    norm * norm,
                ));
            }
        }
    }
    out
}

fn inspect(store: &Path) -> Value {
    common::inspect_json(store)
}

#[test]
fn f32_factors_reproduce_the_fixture_gradients_of_llama_and_gpt2() {
    for name in ["llama-gqa", "gpt2"] {
        let fx = fixtures().join(name);
        let dir = tempfile::tempdir().unwrap();
        let truth = dir.path().join("ingested");
        ingest(&fx, &truth);
        // Batched (padding inside every batch) and one sample per backward.
        for batch in ["3", "1"] {
            let store = dir.path().join(format!("factored-{batch}"));
            let out = collect(
                &fx.join("model"),
                &fx.join("tasks"),
                &store,
                &[
                    "--dtype",
                    "f32",
                    "--params",
                    "attn,mlp",
                    "--representation",
                    "factored",
                    "--batch",
                    batch,
                ],
            );
            assert!(out.contains("(16 as factors, 0 as full slices)"), "{out}");
            let v = ok(&["verify", "--store", p(&store)]);
            assert!(v.contains("OK"), "{v}");
            let errs = frame_errors(&store, &truth);
            let worst = errs.iter().map(|e| e.1).fold(0.0, f64::max);
            for (what, e, _, _) in &errs {
                assert!(
                    *e <= 1e-5,
                    "{name} batch {batch} {what}: relative error {e:.2e}"
                );
            }
            eprintln!(
                "{name} f32 factors (batch {batch}): worst slice error {worst:.2e} over {} slices",
                errs.len()
            );
            let j = inspect(&store);
            assert_eq!(j["representations"]["factored"]["samples"], 16);
            assert_eq!(j["representations"]["full"]["samples"], 0);
        }
    }
}

#[test]
fn bf16_factors_are_as_exact_as_bf16_full_slices() {
    let fx = fixtures().join("llama-gqa");
    let dir = tempfile::tempdir().unwrap();
    let truth = dir.path().join("ingested");
    ingest(&fx, &truth);
    let mut worst = Vec::new();
    for repr in ["full", "factored"] {
        let store = dir.path().join(repr);
        collect(
            &fx.join("model"),
            &fx.join("tasks"),
            &store,
            &[
                "--params",
                "attn,mlp",
                "--representation",
                repr,
                "--batch",
                "4",
            ],
        );
        let errs = frame_errors(&store, &truth);
        let max = errs.iter().map(|e| e.1).fold(0.0, f64::max);
        let mean = errs.iter().map(|e| e.1).sum::<f64>() / errs.len() as f64;
        let whole =
            (errs.iter().map(|e| e.2).sum::<f64>() / errs.iter().map(|e| e.3).sum::<f64>()).sqrt();
        eprintln!(
            "bf16 {repr}: worst slice error {max:.2e}, mean {mean:.2e}, whole store (normwise) {whole:.2e}"
        );
        worst.push((max, mean, whole));
    }
    let (full, fact) = (worst[0], worst[1]);
    // The whole gradient, normwise: within 1.5x of rounding every slice to bf16.
    assert!(
        fact.2 <= 1.5 * full.2,
        "whole store: factored {fact:?} vs full {full:?}"
    );
    assert!(full.0 > 1e-4, "bf16 rounding should show: {full:?}");
    // The typical slice: within 1.5x of rounding the slice itself to bf16.
    assert!(
        fact.1 <= 1.5 * full.1,
        "mean: factored {fact:?} vs full {full:?}"
    );
    // The worst slice can be worse: a slice whose sum over positions cancels amplifies
    // the factors' rounding (measured 1.9x here); f32 factors are the exact choice.
    assert!(
        fact.0 <= 2.5 * full.0,
        "worst: factored {fact:?} vs full {full:?}"
    );
}

/// A `make-model --preset small` checkpoint (2 of its 4 layers) with `samples` random
/// samples of `seq` tokens per task.
fn small_model(dir: &Path, seq: usize, samples: usize) -> PathBuf {
    let out = dir.join(format!("small-{seq}"));
    ok(&[
        "make-model",
        "--out",
        p(&out),
        "--preset",
        "small",
        "--layers",
        "2",
        "--vocab",
        "2000",
        "--dtype",
        "f32",
        "--samples",
        &samples.to_string(),
        "--seq",
        &seq.to_string(),
    ]);
    out
}

/// make-model writes its task files next to the checkpoint.
fn tasks_of(model: &Path) -> PathBuf {
    assert!(
        model.join("math.jsonl").is_file(),
        "make-model wrote no tasks in {}",
        model.display()
    );
    model.to_path_buf()
}

#[test]
fn factored_bytes_are_under_a_third_at_64_tokens_and_auto_chooses_by_length() {
    let dir = tempfile::tempdir().unwrap();
    let m64 = small_model(dir.path(), 64, 4);
    let mut bytes = Vec::new();
    for repr in ["full", "factored"] {
        let store = dir.path().join(format!("s64-{repr}"));
        collect(
            &m64,
            &tasks_of(&m64),
            &store,
            &["--representation", repr, "--batch", "4"],
        );
        let j = inspect(&store);
        bytes.push(j["shard_bytes"].as_u64().unwrap());
    }
    let ratio = bytes[1] as f64 / bytes[0] as f64;
    eprintln!(
        "small preset, 64 tokens, bf16: full {} B, factored {} B ({ratio:.3}x)",
        bytes[0], bytes[1]
    );
    assert!(ratio <= 0.3, "factored/full = {ratio:.3}");

    // auto: 64 tokens is far below the break-even (~307 positions), 400 is past it.
    let store = dir.path().join("auto64");
    let out = collect(&m64, &tasks_of(&m64), &store, &["--batch", "4"]);
    assert!(out.contains("(8 as factors, 0 as full slices)"), "{out}");
    let m400 = small_model(dir.path(), 400, 1);
    let store = dir.path().join("auto400");
    let out = collect(&m400, &tasks_of(&m400), &store, &[]);
    assert!(out.contains("(0 as factors, 2 as full slices)"), "{out}");
    // plan agrees: it tokenizes the task files and names auto's choice.
    let plan = |m: &Path| -> Value {
        let t = tasks_of(m);
        serde_json::from_str(&ok(&[
            "plan",
            "--model",
            p(m),
            "--task",
            &format!("math={}", p(&t.join("math.jsonl"))),
            "--json",
        ]))
        .unwrap()
    };
    assert_eq!(plan(&m64)["auto"]["factored_samples"], 4);
    assert_eq!(plan(&m400)["auto"]["factored_samples"], 0);
    assert_eq!(plan(&m64)["break_even_positions"], 307);
}

/// `--params all-2d` (embeddings, GPT-2's tied `wte` used twice, untied LLaMA
/// `lm_head`): every frame of a factored store equals the full store's.
#[test]
fn all_2d_factored_equals_full_slices() {
    for name in ["gpt2", "llama-gqa"] {
        let fx = fixtures().join(name);
        let dir = tempfile::tempdir().unwrap();
        let mut stores = Vec::new();
        for repr in ["full", "factored"] {
            let store = dir.path().join(repr);
            collect(
                &fx.join("model"),
                &fx.join("tasks"),
                &store,
                &[
                    "--dtype",
                    "f32",
                    "--params",
                    "all-2d",
                    "--representation",
                    repr,
                    "--batch",
                    "4",
                ],
            );
            stores.push(store);
        }
        let errs = frame_errors(&stores[1], &stores[0]);
        let worst = errs.iter().map(|e| e.1).fold(0.0, f64::max);
        eprintln!("{name} all-2d factored vs full: worst frame difference {worst:.2e}");
        for (what, e, _, _) in &errs {
            assert!(*e <= 1e-5, "{name} {what}: {e:.2e}");
        }
    }
}

/// One frame count everywhere on a factored store: `inspect`, `verify` and the index
/// export count the same frames, shared factors included; each index row points at a
/// frame on disk of its length and kind, and their lengths sum to the samples' frame
/// bytes.
#[test]
fn inspect_verify_and_the_index_count_the_same_frames() {
    use arrow::array::{Array, Int64Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let fx = fixtures().join("llama-gqa");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    collect(
        &fx.join("model"),
        &fx.join("tasks"),
        &store,
        &["--representation", "factored", "--max-samples", "3"],
    );
    let info: Value =
        serde_json::from_str(&ok(&["inspect", "--store", p(&store), "--json"])).unwrap();
    let frames = info["frames"].as_u64().unwrap();
    let (n, per, shared) = (
        info["samples"].as_u64().unwrap(),
        info["frames_per_sample"].as_u64().unwrap(),
        info["shared_factors_per_sample"].as_u64().unwrap(),
    );
    assert!(shared > 0, "{info}");
    assert_eq!(frames, n * (per + shared), "{info}");
    let text = ok(&["inspect", "--store", p(&store)]);
    assert!(
        text.contains(&format!("frames     {frames} in all samples")),
        "{text}"
    );
    let v = ok(&["verify", "--store", p(&store)]);
    assert!(v.contains(&format!(", {frames} frames (")), "{v}");
    let out = dir.path().join("index.parquet");
    ok(&["inspect", "--store", p(&store), "--index-parquet", p(&out)]);
    let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut kinds = std::collections::BTreeMap::new();
    for b in r {
        let b = b.unwrap();
        let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
        let (shard, off, len, kind) = (
            col("shard"),
            col("offset"),
            col("length"),
            col("frame_kind"),
        );
        let shard = shard
            .as_any()
            .downcast_ref::<arrow::array::Int32Array>()
            .unwrap();
        let off = off.as_any().downcast_ref::<Int64Array>().unwrap();
        let len = len.as_any().downcast_ref::<Int64Array>().unwrap();
        let kind = kind.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..b.num_rows() {
            let file =
                std::fs::read(gradshard_store::shard_path(&store, shard.value(i) as u32)).unwrap();
            let h = gradshard_format::parse_frame_header(&file[off.value(i) as usize..]).unwrap();
            assert_eq!(h.frame_len() as i64, len.value(i), "row {i}");
            let want = match h.kind {
                gradshard_format::FrameKind::Full => "full",
                gradshard_format::FrameKind::Factor => "factor",
                gradshard_format::FrameKind::Shared => "shared",
            };
            assert_eq!(kind.value(i), want, "row {i}");
            assert!(!kind.is_null(i));
            *kinds.entry(want).or_insert(0u64) += 1;
            bytes += len.value(i) as u64;
            rows += 1;
        }
    }
    assert_eq!(rows, frames);
    assert_eq!(kinds.get("shared"), Some(&(n * shared)), "{kinds:?}");
    assert_eq!(kinds.get("factor"), Some(&(n * per)), "{kinds:?}");
    let frame_bytes = info["representations"]["factored"]["frame_bytes"]
        .as_u64()
        .unwrap()
        + info["representations"]["full"]["frame_bytes"]
            .as_u64()
            .unwrap();
    assert_eq!(bytes, frame_bytes);
}
