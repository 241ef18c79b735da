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

#[test]
fn default_setting_from_f32_and_bf16_stores_matches_the_oracle() {
    for model in ["llama-gqa", "gpt2"] {
        let oracle: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(model).join("oracle.json")).unwrap(),
        )
        .unwrap();
        let want = &oracle["settings"]["default"]["math_vs_general"];
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::Bf16, 2e-2)] {
            let dir = tempfile::tempdir().unwrap();
            store_of(model, dtype, dir.path());
            let store = Store::open(dir.path()).unwrap();
            let mut o = ScoreOptions::new(t("math"), t("general"));
            o.n_boot = 0;
            o.n_perm = 0;
            let r =
                gradshard_score::score(&StoreSource { store: &store }, &o, &mut |_| {}).unwrap();
            let g = &r.geometry;
            let mut worst = 0f64;
            for b in Block::ALL {
                let avg = want[b.as_str()]["layer_head_avg"].as_array().unwrap();
                for (l, row) in avg.iter().enumerate() {
                    for (h, v) in row.as_array().unwrap().iter().enumerate() {
                        let stored_head = if b.is_kv() { g.kv_head_of(h) } else { h };
                        let cell = r
                            .cells
                            .iter()
                            .find(|c| c.block == b && c.layer == l && c.head == stored_head)
                            .unwrap();
                        worst = worst.max(rel(cell.score_mean, v.as_f64().unwrap()));
                    }
                }
                if dtype == DType::F32 {
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
                    let ours: Vec<_> = r
                        .top
                        .iter()
                        .filter(|p| p.block == b)
                        .map(|p| {
                            let id = |s: &SampleId| match s {
                                SampleId::Int(v) => *v,
                                SampleId::Str(_) => panic!("fixture ids are integers"),
                            };
                            (id(&p.sample_a), id(&p.sample_b), p.layer, p.head)
                        })
                        .collect();
                    let n = seen.len().min(ours.len());
                    assert!(n >= 5, "{model} {b}: too few top pairs to compare");
                    assert_eq!(&ours[..n], &seen[..n], "{model} {b} top pairs");
                }
            }
            assert!(
                worst <= tol,
                "{model} {dtype}: worst relative error {worst} > {tol}"
            );
        }
    }
}
