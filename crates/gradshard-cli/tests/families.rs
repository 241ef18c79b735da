//! `collect --dtype f32` then `score` for every family on the generic decoder
//! (tests/fixtures/{neox,phi3,bert,qwen3,gemma2,gemma3,olmo2}), in the full
//! and the factored representation: every pair score and every heatmap cell
//! of the default setting within 1e-3 of the float64 oracle. This covers all
//! 16 samples of each fixture, where the models crate's parity test holds
//! two reference gradient files per family.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, Float64Array, Int32Array, Int64Array, StringArray};
use common::*;
use gradshard_core::{Block, Geometry};
use serde_json::Value;

const FAMILIES: [&str; 7] = ["neox", "phi3", "bert", "qwen3", "gemma2", "gemma3", "olmo2"];

/// An integer or string column value as i64 / String.
fn int_at(col: &dyn Array, i: usize) -> i64 {
    if let Some(a) = col.as_any().downcast_ref::<Int32Array>() {
        a.value(i) as i64
    } else if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
        a.value(i)
    } else {
        panic!("not an integer column: {:?}", col.data_type())
    }
}

/// Rows of `path` as (block, layer, head, a, b) -> value of column `value`;
/// a and b are the sample ids (0 for tables without them).
fn read(path: &Path, value: &str) -> BTreeMap<(String, i64, i64, i64, i64), f64> {
    let f = std::fs::File::open(path).unwrap();
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let mut out = BTreeMap::new();
    for b in r {
        let b = b.unwrap();
        let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
        let (block, layer, head, v) = (col("block"), col("layer"), col("head"), col(value));
        let block = block.as_any().downcast_ref::<StringArray>().unwrap();
        let v = v.as_any().downcast_ref::<Float64Array>().unwrap();
        let ids = b.schema().index_of("sample_a").ok().map(|_| {
            let s = |n: &str| {
                col(n)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            (s("sample_a"), s("sample_b"))
        });
        for i in 0..b.num_rows() {
            let (a, bb) = match &ids {
                Some((a, bb)) => (a.value(i).parse().unwrap(), bb.value(i).parse().unwrap()),
                None => (0, 0),
            };
            out.insert(
                (
                    block.value(i).to_string(),
                    int_at(layer.as_ref(), i),
                    int_at(head.as_ref(), i),
                    a,
                    bb,
                ),
                v.value(i),
            );
        }
    }
    out
}

/// Collects `family` in `repr` (f32, batches of 4), scores math vs general;
/// returns the worst relative error against the oracle.
fn collect_and_score(family: &str, repr: &str, dir: &Path) -> f64 {
    let fx = fixtures().join(family);
    let model = fx.join("model");
    let store = dir.join(format!("{family}-{repr}"));
    let tasks = fx.join("tasks");
    let out = ok(&[
        "collect",
        "--model",
        p(&model),
        "--task",
        &format!("math={}", p(&tasks.join("math.jsonl"))),
        "--task",
        &format!("general={}", p(&tasks.join("general.jsonl"))),
        "--store",
        p(&store),
        "--quiet",
        "--dtype",
        "f32",
        "--batch",
        "4",
        "--representation",
        repr,
    ]);
    assert!(out.contains("16 samples stored"), "{family}: {out}");
    let want = if repr == "factored" {
        "(16 as factors, 0 as full slices)"
    } else {
        "(0 as factors, 16 as full slices)"
    };
    assert!(out.contains(want), "{family}: {out}");
    score_against_oracle(family, &store, &format!("{family}-{repr}"), dir)
}

/// `grads --batch 4` (the `ingest` layout) for both tasks, then `ingest --dtype f32`.
fn grads_then_ingest(family: &str, dir: &Path) -> f64 {
    let fx = fixtures().join(family);
    let model = fx.join("model");
    let out = dir.join(format!("{family}-grads"));
    for task in ["math", "general"] {
        ok(&[
            "grads",
            "--model",
            p(&model),
            "--input",
            p(&fx.join("tasks").join(format!("{task}.jsonl"))),
            "--out",
            p(&out.join(task)),
            "--params",
            "attn,mlp",
            "--batch",
            "4",
        ]);
    }
    let store = dir.join(format!("{family}-ingested"));
    ok(&[
        "ingest",
        "--model",
        p(&model),
        "--task",
        &format!("math={}", p(&out.join("math"))),
        "--task",
        &format!("general={}", p(&out.join("general"))),
        "--store",
        p(&store),
        "--dtype",
        "f32",
    ]);
    score_against_oracle(family, &store, &format!("{family}-ingest"), dir)
}

/// Scores math vs general of `store` (default setting, every pair matrix) and
/// checks it against the fixture's oracle; returns the worst relative error.
fn score_against_oracle(family: &str, store: &Path, label: &str, dir: &Path) -> f64 {
    let fx = fixtures().join(family);
    let model = fx.join("model");
    let repr = label;
    let g = Geometry::from_config_path(&model).unwrap();
    let pairs: Vec<String> = (0..g.layers)
        .flat_map(|l| (0..g.heads).map(move |h| format!("{l}:{h}")))
        .collect();
    let res = dir.join(format!("{label}-scores"));
    ok(&[
        "score",
        "--store",
        p(store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(&res),
        "--n-boot",
        "0",
        "--n-perm",
        "0",
        "--min-samples",
        "0",
        "--no-pictures",
        "--pairs-for",
        &pairs.join(","),
    ]);
    let oracle: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("oracle.json")).unwrap()).unwrap();
    let got_pairs = read(&res.join("pairs.parquet"), "score");
    let got_cells = read(&res.join("heatmap.parquet"), "score_mean");
    let (mut worst, mut checked) = (0f64, 0usize);
    let mut cmp = |got: f64, want: f64, what: &str| {
        let rel = (got - want).abs() / want.abs().max(1e-30);
        assert!(
            rel <= 1e-3,
            "{family} ({repr}) {what}: {got} vs oracle {want}"
        );
        worst = worst.max(rel);
        checked += 1;
    };
    for block in Block::ALL {
        let ob = &oracle["settings"]["default"]["math_vs_general"][block.as_str()];
        let b = block.as_str().to_string();
        for (i, row) in ob["scores"].as_array().unwrap().iter().enumerate() {
            for (j, lh) in row.as_array().unwrap().iter().enumerate() {
                for (l, hs) in lh.as_array().unwrap().iter().enumerate() {
                    for (h, want) in hs.as_array().unwrap().iter().enumerate() {
                        let sh = if block.is_kv() { g.kv_head_of(h) } else { h };
                        let key = (b.clone(), l as i64, sh as i64, i as i64, j as i64);
                        let got = *got_pairs
                            .get(&key)
                            .unwrap_or_else(|| panic!("{family}: no pair score {key:?}"));
                        cmp(
                            got,
                            want.as_f64().unwrap(),
                            &format!("{b} M[{i}][{j}] l{l} h{h}"),
                        );
                    }
                }
            }
        }
        for (l, hs) in ob["layer_head_avg"].as_array().unwrap().iter().enumerate() {
            for (h, want) in hs.as_array().unwrap().iter().enumerate() {
                let key = (b.clone(), l as i64, h as i64, 0, 0);
                let got = *got_cells
                    .get(&key)
                    .unwrap_or_else(|| panic!("{family}: no heatmap cell {key:?}"));
                cmp(got, want.as_f64().unwrap(), &format!("{b} avg l{l} h{h}"));
            }
        }
    }
    let cells = g.layers * g.heads;
    assert_eq!(
        checked,
        4 * (64 * cells + cells),
        "{family}: values checked"
    );
    worst
}

#[test]
fn collect_then_score_reproduces_every_familys_oracle() {
    let dir = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        for repr in ["full", "factored"] {
            let t0 = std::time::Instant::now();
            let worst = collect_and_score(family, repr, dir.path());
            eprintln!(
                "{family} ({repr}): collect -> score vs oracle, worst relative error {worst:.2e} ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    }
}

/// `ingest` knows every family's geometry: the gradients `grads` writes,
/// ingested and scored, give the oracle's scores too.
#[test]
fn grads_then_ingest_then_score_reproduces_every_familys_oracle() {
    let dir = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let worst = grads_then_ingest(family, dir.path());
        eprintln!("{family}: grads -> ingest -> score vs oracle, worst relative error {worst:.2e}");
    }
}

/// `make-model --config` takes a family's config as it is (here Gemma 3, with
/// `--layers` repeating its `layer_types` pattern, and the same config nested
/// as a `gemma3` checkpoint's `text_config`); `collect` stores what it wrote.
#[test]
fn make_model_writes_collectable_checkpoints_of_a_family() {
    let dir = tempfile::tempdir().unwrap();
    let text: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gemma3/model/config.json")).unwrap(),
    )
    .unwrap();
    let nested = serde_json::json!({"model_type": "gemma3", "text_config": text});
    for (name, cfg) in [("text", &text), ("nested", &nested)] {
        let cfg_path = dir.path().join(format!("{name}.json"));
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let model = dir.path().join(name);
        let out = ok(&[
            "make-model",
            "--out",
            p(&model),
            "--config",
            p(&cfg_path),
            "--layers",
            "6",
            "--dtype",
            "f32",
            "--samples",
            "3",
            "--seq",
            "9",
            "--tasks",
            "a",
        ]);
        assert!(out.contains("make-model:"), "{out}");
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        let t = if name == "nested" {
            &written["text_config"]
        } else {
            &written
        };
        assert_eq!(t["num_hidden_layers"], 6, "{name}");
        assert_eq!(t["layer_types"].as_array().unwrap().len(), 6, "{name}");
        let store = dir.path().join(format!("{name}-store"));
        let out = ok(&[
            "collect",
            "--model",
            p(&model),
            "--task",
            &format!("a={}", p(&model.join("a.jsonl"))),
            "--store",
            p(&store),
            "--quiet",
            "--params",
            "attn,mlp",
        ]);
        assert!(out.contains("3 samples stored"), "{name}: {out}");
    }
}
