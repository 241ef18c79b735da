//! End-to-end tests of `gradshard collect`, `merge` and `demo` on the bundled
//! LLaMA-GQA fixture: the float64 oracle's scores, the fixtures' Fisher, crash
//! and resume, worker shares merged, the demo.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use common::{bin, fixtures, ok, p, run};

use arrow::array::{Array, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray};
use arrow::datatypes::DataType;
use gradshard_core::{Block, Geometry};
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn fixture() -> PathBuf {
    fixtures().join("llama-gqa")
}

/// `collect` arguments for the fixture model with both task files (or `tasks`).
fn collect_args(store: &Path, tasks: &Path, extra: &[&str]) -> Vec<String> {
    common::collect_args(&fixture().join("model"), tasks, store, extra)
}

fn collect(store: &Path, tasks: &Path, extra: &[&str]) -> String {
    common::collect(&fixture().join("model"), tasks, store, extra)
}

/// Reads a Parquet table as rows of JSON values.
fn table(path: &Path) -> Vec<BTreeMap<String, Value>> {
    let f = std::fs::File::open(path).unwrap();
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for b in r {
        let b = b.unwrap();
        let schema = b.schema();
        for i in 0..b.num_rows() {
            let mut row = BTreeMap::new();
            for (c, field) in schema.fields().iter().enumerate() {
                let col = b.column(c);
                let v = if col.is_null(i) {
                    Value::Null
                } else {
                    match field.data_type() {
                        DataType::Utf8 => Value::from(
                            col.as_any().downcast_ref::<StringArray>().unwrap().value(i),
                        ),
                        DataType::Int32 => {
                            Value::from(col.as_any().downcast_ref::<Int32Array>().unwrap().value(i))
                        }
                        DataType::Int64 => {
                            Value::from(col.as_any().downcast_ref::<Int64Array>().unwrap().value(i))
                        }
                        DataType::Float64 => Value::from(
                            col.as_any()
                                .downcast_ref::<Float64Array>()
                                .unwrap()
                                .value(i),
                        ),
                        DataType::Boolean => Value::from(
                            col.as_any()
                                .downcast_ref::<BooleanArray>()
                                .unwrap()
                                .value(i),
                        ),
                        _ => Value::String(format!("{:?}", field.data_type())),
                    }
                };
                row.insert(field.name().clone(), v);
            }
            rows.push(row);
        }
    }
    rows
}

/// `score` with every head's pair matrix, no resampling; returns the output dir.
fn score(store: &Path, out: &Path) -> PathBuf {
    let pairs: Vec<String> = (0..2)
        .flat_map(|l| (0..4).map(move |h| format!("{l}:{h}")))
        .collect();
    common::score(store, out, &["--pairs-for", &pairs.join(",")]);
    out.to_path_buf()
}

fn stats(store: &Path, task: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(store.join("stats").join(format!("{task}.json"))).unwrap(),
    )
    .unwrap()
}

fn tasks_dir() -> PathBuf {
    fixture().join("tasks")
}

#[test]
fn collect_then_score_reproduces_the_oracle() {
    oracle_check("full");
}

#[test]
fn factored_collect_then_score_reproduces_the_oracle() {
    oracle_check("factored");
}

/// `collect --representation REPR --dtype f32` then `score`: every score within 1e-4
/// of the float64 oracle.
fn oracle_check(repr: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let out = collect(
        &store,
        &tasks_dir(),
        &["--dtype", "f32", "--representation", repr, "--batch", "3"],
    );
    assert!(out.contains("16 samples stored"), "{out}");
    let want = if repr == "factored" {
        "(16 as factors, 0 as full slices)"
    } else {
        "(0 as factors, 16 as full slices)"
    };
    assert!(out.contains(want), "{out}");
    let v = ok(&["verify", "--store", p(&store)]);
    assert!(v.contains("OK"), "{v}");
    let res = score(&store, &dir.path().join("scores"));
    let oracle: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("oracle.json")).unwrap())
            .unwrap();
    let g = Geometry::from_config_path(&fixture().join("model")).unwrap();
    let pairs = table(&res.join("pairs.parquet"));
    let heat = table(&res.join("heatmap.parquet"));
    let mut worst = 0f64;
    let mut checked = 0;
    for block in Block::ALL {
        let ob = &oracle["settings"]["default"]["math_vs_general"][block.as_str()];
        let mut by_key = BTreeMap::new();
        for r in pairs.iter().filter(|r| r["block"] == block.as_str()) {
            by_key.insert(
                (
                    r["layer"].as_i64().unwrap() as usize,
                    r["head"].as_i64().unwrap() as usize,
                    r["sample_a"].as_str().unwrap().parse::<usize>().unwrap(),
                    r["sample_b"].as_str().unwrap().parse::<usize>().unwrap(),
                ),
                r["score"].as_f64().unwrap(),
            );
        }
        for (i, row) in ob["scores"].as_array().unwrap().iter().enumerate() {
            for (j, lh) in row.as_array().unwrap().iter().enumerate() {
                for (l, hs) in lh.as_array().unwrap().iter().enumerate() {
                    for (h, want) in hs.as_array().unwrap().iter().enumerate() {
                        let want = want.as_f64().unwrap();
                        let sh = if block.is_kv() { g.kv_head_of(h) } else { h };
                        let got = by_key[&(l, sh, i, j)];
                        let rel = (got - want).abs() / want.abs();
                        worst = worst.max(rel);
                        assert!(
                            rel <= 1e-4,
                            "{block} M[{i}][{j}] l{l} h{h}: {got} vs oracle {want}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        for (l, hs) in ob["layer_head_avg"].as_array().unwrap().iter().enumerate() {
            for (h, want) in hs.as_array().unwrap().iter().enumerate() {
                let want = want.as_f64().unwrap();
                let r = heat
                    .iter()
                    .find(|r| {
                        r["block"] == block.as_str()
                            && r["layer"].as_i64() == Some(l as i64)
                            && r["head"].as_i64() == Some(h as i64)
                    })
                    .unwrap_or_else(|| panic!("heatmap row {block} l{l} h{h}"));
                let got = r["score_mean"].as_f64().unwrap();
                let rel = (got - want).abs() / want.abs();
                worst = worst.max(rel);
                assert!(rel <= 1e-4, "{block} avg l{l} h{h}: {got} vs oracle {want}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * (64 * 8 + 8));
    eprintln!(
        "collect ({repr}) -> score vs oracle: worst relative error {worst:.2e} over {checked} values"
    );
}

/// Per-sample gradients of the fixture files: (T, tensor name -> values).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn fixture_grads(task: &str) -> Vec<(u32, Tensors)> {
    let dir = fixture().join("grads").join(task);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let t: u32 = meta.metadata().as_ref().unwrap()["tokens"].parse().unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut m = BTreeMap::new();
            for (name, v) in st.tensors() {
                let data: Vec<f32> = v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                m.insert(name.to_string(), (v.shape().to_vec(), data));
            }
            (t, m)
        })
        .collect()
}

#[test]
fn group_fisher_equals_the_fixtures_mean_of_g2_over_t() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    collect(
        &store,
        &tasks_dir(),
        &["--dtype", "f32", "--params", "attn,mlp", "--full-fisher"],
    );
    let g = Geometry::from_config_path(&fixture().join("model")).unwrap();
    let mut worst = 0f64;
    // --full-fisher: the elementwise mean of g²/T, per tensor, normwise within 1e-5.
    for task in ["math", "general"] {
        let samples = fixture_grads(task);
        let bytes = std::fs::read(
            store
                .join("stats")
                .join(format!("{task}.fisher.safetensors")),
        )
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), samples[0].1.len());
        for (name, (shape, _)) in &samples[0].1 {
            let v = st.tensor(name).unwrap();
            assert_eq!(v.shape(), shape.as_slice(), "{name}");
            let got: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let (mut d2, mut n2) = (0f64, 0f64);
            for (k, x) in got.iter().enumerate() {
                let want = samples
                    .iter()
                    .map(|(t, m)| (m[name].1[k] as f64).powi(2) / *t as f64)
                    .sum::<f64>()
                    / samples.len() as f64;
                d2 += (*x as f64 - want).powi(2);
                n2 += want * want;
            }
            assert!(
                d2.sqrt() <= 1e-5 * n2.sqrt(),
                "{task} {name}: full Fisher off by {}",
                (d2 / n2).sqrt()
            );
        }
    }
    for task in ["math", "general"] {
        let s = stats(&store, task);
        let samples = fixture_grads(task);
        let n = samples.len() as f64;
        assert_eq!(s["n_samples"].as_u64().unwrap(), samples.len() as u64);
        let groups = s["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 2 * (4 + 2 + 2 + 4));
        for gs in groups {
            let (l, b, h) = (
                gs["layer"].as_u64().unwrap() as usize,
                gs["block"].as_str().unwrap().parse::<Block>().unwrap(),
                gs["head"].as_u64().unwrap() as usize,
            );
            let spec = g.slice_spec(l, b, h).unwrap();
            let want: f64 = samples
                .iter()
                .map(|(t, m)| {
                    let slice = spec.cut(&m[&spec.tensor].1).unwrap();
                    slice.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / *t as f64
                })
                .sum::<f64>()
                / n;
            let got = gs["mean"].as_f64().unwrap();
            let rel = (got - want).abs() / want;
            worst = worst.max(rel);
            assert!(rel <= 1e-5, "{task} l{l} {b} h{h}: {got} vs {want}");
            // M2 is the spread of the per-sample group sums, never (E g)^2.
            let per: Vec<f64> = samples
                .iter()
                .map(|(t, m)| {
                    let slice = spec.cut(&m[&spec.tensor].1).unwrap();
                    slice.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / *t as f64
                })
                .collect();
            let m2: f64 = per.iter().map(|x| (x - want).powi(2)).sum();
            let got_m2 = gs["m2"].as_f64().unwrap();
            assert!(
                (got_m2 - m2).abs() <= 1e-4 * m2,
                "{task} l{l} {b} h{h}: m2 {got_m2} vs {m2}"
            );
        }
        // MLP: per output channel (rows of [out, in] Linear weights).
        let chans = s["channels"].as_array().unwrap();
        assert_eq!(chans.len(), 6);
        for c in chans {
            let name = c["tensor"].as_str().unwrap();
            let mean: Vec<f64> = c["mean"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let (shape, _) = &samples[0].1[name];
            assert_eq!(mean.len(), shape[0], "{name}");
            for (ch, got) in mean.iter().enumerate() {
                let want: f64 = samples
                    .iter()
                    .map(|(t, m)| {
                        let row = &m[name].1[ch * shape[1]..(ch + 1) * shape[1]];
                        row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / *t as f64
                    })
                    .sum::<f64>()
                    / n;
                let rel = (got - want).abs() / want;
                worst = worst.max(rel);
                assert!(rel <= 1e-5, "{task} {name} channel {ch}: {got} vs {want}");
            }
        }
    }
    eprintln!("group Fisher vs fixtures: worst relative error {worst:.2e}");
}

#[test]
fn collected_store_equals_the_ingested_fixture_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("collected");
    let b = dir.path().join("ingested");
    collect(
        &a,
        &tasks_dir(),
        &["--dtype", "f32", "--params", "attn,mlp"],
    );
    ok(&[
        "ingest",
        "--model",
        p(&fixture().join("model")),
        "--task",
        &format!("math={}", p(&fixture().join("grads/math"))),
        "--task",
        &format!("general={}", p(&fixture().join("grads/general"))),
        "--store",
        p(&b),
        "--dtype",
        "f32",
    ]);
    let sa = gradshard_store::Store::open(&a).unwrap();
    let sb = gradshard_store::Store::open(&b).unwrap();
    assert_eq!(
        sa.manifest().spec.other_tensors,
        sb.manifest().spec.other_tensors
    );
    assert_eq!(sa.order().n_frames(), sb.order().n_frames());
    let mut worst = 0f64;
    for task in ["math", "general"] {
        let (ra, rb) = (sa.samples(task).unwrap(), sb.samples(task).unwrap());
        assert_eq!(ra.len(), 8);
        for (x, y) in ra.iter().zip(rb) {
            assert_eq!((&x.id, x.tokens), (&y.id, y.tokens));
            assert!((x.loss_sum - y.loss_sum).abs() <= 1e-5 * y.loss_sum);
            for f in 0..sa.order().n_frames() {
                let (u, v) = (sa.read_frame(x, f).unwrap(), sb.read_frame(y, f).unwrap());
                let norm = v.iter().map(|z| (*z as f64).powi(2)).sum::<f64>().sqrt();
                let diff = u
                    .iter()
                    .zip(&v)
                    .map(|(p, q)| ((*p - *q) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                worst = worst.max(diff / norm);
                assert!(
                    diff <= 1e-5 * norm,
                    "{task} sample {} {}: relative difference {}",
                    x.id,
                    sa.order().describe(f),
                    diff / norm
                );
            }
        }
    }
    eprintln!("collected vs ingested frames: worst normwise relative difference {worst:.2e}");
}

/// Task files with `n` samples each, cycling the fixture samples under new ids.
fn bigger_tasks(dir: &Path, n: usize) -> PathBuf {
    let out = dir.join("tasks");
    std::fs::create_dir_all(&out).unwrap();
    for t in ["math", "general"] {
        let lines: Vec<Value> = std::fs::read_to_string(tasks_dir().join(format!("{t}.jsonl")))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut s = String::new();
        for i in 0..n {
            let mut v = lines[i % lines.len()].clone();
            v["id"] = Value::from(i as i64);
            s.push_str(&v.to_string());
            s.push('\n');
        }
        std::fs::write(out.join(format!("{t}.jsonl")), s).unwrap();
    }
    out
}

fn sample_ids(store: &Path) -> BTreeMap<String, Vec<i64>> {
    let j: Value = serde_json::from_str(&ok(&[
        "inspect",
        "--store",
        p(store),
        "--json",
        "--samples",
    ]))
    .unwrap();
    j["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["task"].as_str().unwrap().to_string(),
                t["sample_list"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["id"].as_i64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

fn same_scores(a: &Path, b: &Path) {
    for t in ["heatmap.parquet", "pairs.parquet", "group_fisher.parquet"] {
        let (x, y) = (table(&a.join(t)), table(&b.join(t)));
        assert_eq!(x.len(), y.len(), "{t}");
        assert!(!x.is_empty(), "{t} is empty");
        assert_eq!(x, y, "{t} differs");
    }
}

#[test]
fn killed_collect_resumes_with_every_sample_exactly_once_and_identical_scores() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = bigger_tasks(dir.path(), 100);
    let store = dir.path().join("s");
    let reference = dir.path().join("ref");
    let extra = [
        "--params",
        "attn,mlp",
        "--dtype",
        "f32",
        "--shard-size",
        "1MiB",
        "--memory-budget",
        "1MiB",
        "--workers",
        "2",
    ];
    let t = Instant::now();
    collect(&reference, &tasks, &extra);
    let full = t.elapsed();
    let args = collect_args(&store, &tasks, &extra);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut kills = 0;
    for _ in 0..80 {
        if kills >= 12 {
            break;
        }
        let mut child = bin()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Each run is killed after a random 1-6% of an uninterrupted run's time
        // (a resumed run has less to do, and parallel tests slow runs unevenly;
        // 12 kills then cover about 40% of the work): during model load, mid-sample,
        // mid-commit, mid-recovery.
        std::thread::sleep(full.mul_f64(rng.random_range(0.01..0.06)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        kills >= 10,
        "only {kills} runs were still going when killed"
    );
    let before = sample_ids(&store);
    eprintln!(
        "{kills} kills (uninterrupted run {:.2} s); {} samples committed before the final run",
        full.as_secs_f64(),
        before.values().map(Vec::len).sum::<usize>()
    );
    collect(&store, &tasks, &extra);
    let v = ok(&["verify", "--store", p(&store)]);
    assert!(v.contains("OK"), "{v}");
    let ids = sample_ids(&store);
    for t in ["math", "general"] {
        assert_eq!(ids[t], (0..100).collect::<Vec<_>>(), "task {t}");
    }
    same_scores(
        &score(&store, &dir.path().join("o1")),
        &score(&reference, &dir.path().join("o2")),
    );
    for t in ["math", "general"] {
        let (a, b) = (stats(&store, t), stats(&reference, t));
        assert_eq!(a["n_samples"], 100);
        assert_eq!(a["groups"], b["groups"], "task {t}");
        assert_eq!(a["channels"], b["channels"], "task {t}");
        assert_eq!(a["ids_xxh3"], b["ids_xxh3"]);
    }
}

fn rel_close(a: &Value, b: &Value, tol: f64, what: &str) {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{what}");
            for (u, v) in x.iter().zip(y) {
                rel_close(u, v, tol, what);
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            for (k, u) in x {
                rel_close(u, &y[k], tol, &format!("{what}.{k}"));
            }
        }
        (Value::Number(u), Value::Number(v)) => {
            let (u, v) = (u.as_f64().unwrap(), v.as_f64().unwrap());
            assert!(
                (u - v).abs() <= tol * u.abs().max(v.abs()).max(1e-300),
                "{what}: {u} vs {v}"
            );
        }
        _ => assert_eq!(a, b, "{what}"),
    }
}

#[test]
fn two_worker_shares_merged_equal_a_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = bigger_tasks(dir.path(), 13);
    let extra = ["--params", "attn,mlp", "--dtype", "bf16"];
    let single = dir.path().join("single");
    collect(&single, &tasks, &extra);
    let w0 = dir.path().join("w0");
    let w1 = dir.path().join("w1");
    collect(&w0, &tasks, &[&extra[..], &["--worker", "0/2"]].concat());
    collect(&w1, &tasks, &[&extra[..], &["--worker", "1/2"]].concat());
    let i0 = sample_ids(&w0);
    assert_eq!(i0["math"], vec![0, 2, 4, 6, 8, 10, 12]);
    assert_eq!(sample_ids(&w1)["math"], vec![1, 3, 5, 7, 9, 11]);
    let merged = dir.path().join("merged");
    let out = ok(&["merge", "--out", p(&merged), p(&w0), p(&w1)]);
    assert!(out.contains("13") || out.contains("26"), "{out}");
    let v = ok(&["verify", "--store", p(&merged)]);
    assert!(v.contains("OK"), "{v}");
    assert_eq!(sample_ids(&merged), sample_ids(&single));
    same_scores(
        &score(&merged, &dir.path().join("o1")),
        &score(&single, &dir.path().join("o2")),
    );
    for t in ["math", "general"] {
        let (a, b) = (stats(&merged, t), stats(&single, t));
        assert_eq!(a["method"], "chan-merge");
        assert_eq!(a["n_samples"], 13);
        assert_eq!(a["tokens_total"], b["tokens_total"]);
        assert_eq!(a["ids_xxh3"], b["ids_xxh3"]);
        rel_close(&a["groups"], &b["groups"], 1e-6, &format!("{t} groups"));
        rel_close(
            &a["channels"],
            &b["channels"],
            1e-6,
            &format!("{t} channels"),
        );
    }
    // Refusals: a sample in two inputs; inputs of another model.
    let o = run(&[
        "merge",
        "--out",
        p(&dir.path().join("m2")),
        p(&w0),
        p(&merged),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("is in both") && e.contains("task `"), "{e}");
    let other = dir.path().join("other");
    ok(&[
        "synth",
        "--store",
        p(&other),
        "--preset",
        "tiny",
        "--samples",
        "2",
    ]);
    let o = run(&[
        "merge",
        "--out",
        p(&dir.path().join("m3")),
        p(&w0),
        p(&other),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("cannot be merged") && e.contains("other"), "{e}");
}

#[test]
fn nan_gradients_error_naming_the_sample_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    // A copy of the model whose embedding row of one token is NaN: only samples
    // containing that token get non-finite gradients.
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(fixture().join("model").join(f), model.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture().join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let token = 17usize; // in math sample 0 ("half"), not in every sample
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for (n, shape, data) in &mut owned {
        if n == "model.embed_tokens.weight" {
            let d = shape[1];
            for k in 0..d {
                let o = (token * d + k) * 4;
                data[o..o + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &model.join("model.safetensors")).unwrap();
    let with: Vec<i64> = std::fs::read_to_string(tasks_dir().join("math.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| {
            v["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t.as_u64() == Some(token as u64))
        })
        .map(|v| v["id"].as_i64().unwrap())
        .collect();
    assert!(!with.is_empty() && with.len() < 8, "{with:?}");
    let task = format!("math={}", p(&tasks_dir().join("math.jsonl")));
    let store = dir.path().join("s");
    let o = run(&[
        "collect",
        "--model",
        p(&model),
        "--task",
        &task,
        "--store",
        p(&store),
        "--quiet",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("non-finite")
            && e.contains("task `math`")
            && e.contains(&format!("sample {}", with[0]))
            && e.contains("tensor `model."),
        "{e}"
    );
    let store2 = dir.path().join("s2");
    let out = ok(&[
        "collect",
        "--model",
        p(&model),
        "--task",
        &task,
        "--store",
        p(&store2),
        "--quiet",
        "--nan-policy",
        "skip",
    ]);
    assert!(
        out.contains(&format!("{} samples stored", 8 - with.len()))
            && out.contains(&format!("{} skipped", with.len())),
        "{out}"
    );
    let ids = sample_ids(&store2);
    assert!(ids["math"].iter().all(|i| !with.contains(i)));
    assert_eq!(ids["math"].len(), 8 - with.len());
    assert_eq!(stats(&store2, "math")["n_samples"], (8 - with.len()) as u64);
}

#[test]
fn demo_runs_offline_and_writes_tables_and_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let t = Instant::now();
    let o = bin()
        .args(["demo", "--out", p(&out)])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for f in [
        "scores/heatmap.parquet",
        "scores/top_pairs.parquet",
        "scores/group_fisher.parquet",
        "scores/heatmap_Q.png",
        "scores/heatmap_O.png",
        "store/stats/math.json",
    ] {
        let m = std::fs::metadata(out.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(m.len() > 0, "{f} empty");
    }
    assert!(
        text.contains("heatmap.parquet") || text.contains("Parquet"),
        "{text}"
    );
    assert_eq!(table(&out.join("scores/heatmap.parquet")).len(), 4 * 2 * 4);
    // Debug builds are slower; the 2-minute bound is for a release build.
    assert!(secs < 240.0, "demo took {secs:.1} s");
}
