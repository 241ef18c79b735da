//! End to end through the store: ingest the fixture gradients (f32 and bf16),
//! score from the store, compare with the float64 oracle.

use std::path::{Path, PathBuf};

use gradshard_core::{Block, DType, SampleId, TaskName};
use gradshard_score::{ScoreOptions, StoreSource};
use gradshard_store::ingest::{ingest, IngestOptions};
use gradshard_store::{CodecSpec, Store, WriterOptions};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn t(s: &str) -> TaskName {
    TaskName::new(s).unwrap()
}

fn store_of(model: &str, dtype: DType, dir: &Path) {
    let root = fixtures().join(model);
    ingest(
        &IngestOptions {
            model_dir: root.join("model"),
            tasks: vec![
                (t("math"), root.join("grads/math")),
                (t("general"), root.join("grads/general")),
            ],
            store: dir.to_path_buf(),
            dtype,
            codec: CodecSpec::DEFAULT,
            writer: WriterOptions::default(),
        },
        &mut |_, _| {},
    )
    .unwrap();
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Every oracle setting, from stores ingested in f32 (1e-5) and bf16 (2e-2).
/// Signed sums cancel (docs/design.md §4, docs/scoring.md), so signed cells are compared
/// against the block's largest |value|; the other variants cell by cell.
#[test]
fn every_setting_from_f32_and_bf16_stores_matches_the_oracle() {
    for model in ["llama-gqa", "gpt2"] {
        let oracle: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(model).join("oracle.json")).unwrap(),
        )
        .unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::Bf16, 2e-2)] {
            let dir = tempfile::tempdir().unwrap();
            store_of(model, dtype, dir.path());
            let store = Store::open(dir.path()).unwrap();
            for (name, setting) in oracle["settings"].as_object().unwrap() {
                check_setting(model, name, setting, dtype, tol, &store);
            }
        }
    }
}

fn check_setting(model: &str, name: &str, setting: &Value, dtype: DType, tol: f64, store: &Store) {
    let (ta, tb, key) = if name == "default_reverse" {
        ("general", "math", "general_vs_math")
    } else {
        ("math", "general", "math_vs_general")
    };
    let want = &setting[key];
    let p = &setting["params"];
    let mut o = ScoreOptions::new(t(ta), t(tb));
    o.n_boot = 0;
    o.n_perm = 0;
    if let Some(v) = p["lam_rel"].as_f64() {
        o.lam_rel = v;
    }
    if let Some(v) = p["aggregate"].as_str() {
        o.aggregate = v.parse().unwrap();
    }
    if let Some(v) = p["variant"].as_str() {
        o.variant = v.parse().unwrap();
    }
    if let Some(v) = p["pool"].as_str() {
        o.fisher_pool = v.parse().unwrap();
    }
    let signed = o.variant == gradshard_score::Variant::Signed;
    let r = gradshard_score::score(&StoreSource { store }, &o, &mut |_| {}).unwrap();
    let g = &r.geometry;
    let mut worst = 0f64;
    for b in Block::ALL {
        let avg = want[b.as_str()]["layer_head_avg"].as_array().unwrap();
        let scale = avg
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap().abs())
            })
            .fold(0f64, f64::max);
        for (l, row) in avg.iter().enumerate() {
            for (h, v) in row.as_array().unwrap().iter().enumerate() {
                let stored_head = if b.is_kv() { g.kv_head_of(h) } else { h };
                let cell = r
                    .cells
                    .iter()
                    .find(|c| c.block == b && c.layer == l && c.head == stored_head)
                    .unwrap();
                let v = v.as_f64().unwrap();
                let e = if signed {
                    (cell.score_mean - v).abs() / scale
                } else {
                    rel(cell.score_mean, v)
                };
                worst = worst.max(e);
            }
        }
        if dtype == DType::F32 && !signed {
            // Top pairs: same ids in the same order (K/V: the oracle repeats each kv pair per query head).
            let mut seen = Vec::new();
            for e in want[b.as_str()]["top"].as_array().unwrap() {
                let h = e["head"].as_u64().unwrap() as usize;
                let key = (
                    e["sample_i"].as_i64().unwrap(),
                    e["sample_j"].as_i64().unwrap(),
                    e["layer"].as_u64().unwrap() as usize,
                    if b.is_kv() { g.kv_head_of(h) } else { h },
                );
                if !seen.contains(&key) {
                    seen.push(key);
                }
            }
            let id = |s: &SampleId| match s {
                SampleId::Int(v) => *v,
                SampleId::Str(_) => panic!("fixture ids are integers"),
            };
            let ours: Vec<_> = r
                .top
                .iter()
                .filter(|p| p.block == b)
                .map(|p| (id(&p.sample_a), id(&p.sample_b), p.layer, p.head))
                .collect();
            let n = seen.len().min(ours.len());
            assert!(n >= 5, "{model} {name} {b}: too few top pairs to compare");
            assert_eq!(&ours[..n], &seen[..n], "{model} {name} {b} top pairs");
        }
    }
    assert!(
        worst <= tol,
        "{model} {name} {dtype}: worst relative error {worst} > {tol}"
    );
}
