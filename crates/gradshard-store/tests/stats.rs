//! The statistics through the store's own API: the per-sample sink writes `stats/`
//! and its side log; the library's `verify` names a tampered task file or side log;
//! the library's `salvage` mends both, giving back the same numbers.

use std::path::Path;

use gradshard_core::{Block, DType, SampleId, TaskName};
use gradshard_store::sink::{FactorSample, Factors, GradSample, Gradient};
use gradshard_store::synth::preset;
use gradshard_store::{
    salvage, stats, verify, CodecSpec, SampleSink, SinkOptions, Store, StoreSpec, StoreWriter,
    VerifyReport, WriterOptions,
};
use serde_json::Value;

fn spec() -> StoreSpec {
    let (geometry, _) = preset("tiny").unwrap();
    StoreSpec {
        geometry,
        dtype: DType::Bf16,
        codec: CodecSpec::DEFAULT,
        blocks: Block::ALL.to_vec(),
        other_tensors: Vec::new(),
    }
}

/// Deterministic values in [-0.5, 0.5).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1000) as f32 / 1000.0 - 0.5
        })
        .collect()
}

fn grads(spec: &StoreSpec, seed: u64) -> GradSample {
    let grads = spec
        .geometry
        .all_attn_tensors()
        .into_iter()
        .enumerate()
        .map(|(k, t)| Gradient {
            data: values(t.shape[0] * t.shape[1], seed * 100 + k as u64),
            name: t.name,
            shape: t.shape.to_vec(),
        })
        .collect();
    GradSample {
        tokens: 5 + seed as usize,
        loss_sum: 1.5 * seed as f64,
        grads,
    }
}

/// Factors over `n` positions: Q, K and V of a layer share their input (B), as a
/// model's taps give them.
fn factors(spec: &StoreSpec, seed: u64, n: usize) -> FactorSample {
    let factors = spec
        .geometry
        .all_attn_tensors()
        .into_iter()
        .enumerate()
        .map(|(k, t)| {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let shares_input = !t.name.contains("o_proj");
            Factors {
                a: values(n * rows, seed * 1000 + k as u64),
                b: if shares_input {
                    values(n * cols, seed * 1000 + 500 + t.layer as u64)
                } else {
                    values(n * cols, seed * 1000 + 700 + k as u64)
                },
                name: t.name,
                shape: t.shape.to_vec(),
                n,
            }
        })
        .collect();
    FactorSample {
        tokens: n - 1,
        loss_sum: 0.25 * seed as f64,
        factors,
    }
}

/// A store of two tasks through the sink: `math` from full gradients, `general` from
/// factors (stored factored: `Auto` at a small n).
fn collected(dir: &Path) {
    let spec = spec();
    let w = StoreWriter::open_or_create(
        dir,
        &spec,
        WriterOptions {
            workers: 2,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    let mut sink = SampleSink::new(w, SinkOptions::default()).unwrap();
    let (math, general) = (
        TaskName::new("math").unwrap(),
        TaskName::new("general").unwrap(),
    );
    for i in 0..4u64 {
        assert!(sink
            .put(&math, SampleId::Int(i as i64), grads(&spec, i + 1))
            .unwrap());
        assert!(sink
            .put_factors(&general, SampleId::Int(i as i64), factors(&spec, i + 1, 4))
            .unwrap());
    }
    // A tensor the store does not hold: an error naming it; nothing of the sample commits.
    let mut bad = grads(&spec, 9);
    bad.grads[0].name = "model.layers.0.self_attn.nope.weight".into();
    let e = sink
        .put(&math, SampleId::Int(99), bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("task `math` sample 99") && e.contains("nope"),
        "{e}"
    );
    let r = sink.finish().unwrap();
    assert_eq!((r.stored, r.full_samples, r.factored_samples), (8, 4, 4));
    assert_eq!(r.stats.files.len(), 2);
    assert_eq!(r.stats.from_side_log, 8);
    let store = Store::open(dir).unwrap();
    assert_eq!(store.samples("math").unwrap().len(), 4);
    assert!(store.sample("math", &SampleId::Int(99)).is_err());
}

fn check(dir: &Path) -> VerifyReport {
    verify(dir, &|_, _| {}).unwrap()
}

fn groups(dir: &Path, task: &str) -> Value {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("stats/{task}.json"))).unwrap(),
    )
    .unwrap();
    v["groups"].clone()
}

#[test]
fn library_verify_names_a_tampered_task_file_and_salvage_rebuilds_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    collected(d);
    let rep = check(d);
    assert!(rep.ok() && rep.warnings.is_empty(), "{rep:?}");
    let orig = (groups(d, "math"), groups(d, "general"));

    let path = d.join("stats/math.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let m = v["groups"][3]["mean"].as_f64().unwrap();
    v["groups"][3]["mean"] = Value::from(m * 10.0);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let rep = check(d);
    assert!(!rep.ok(), "{rep:?}");
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("stats/math.json") && p.contains("checksum mismatch")),
        "{:?}",
        rep.problems
    );

    // A dry run says what it would do and changes nothing.
    let dry = salvage(d, true).unwrap();
    assert!(
        dry.actions
            .iter()
            .any(|a| a.contains("rebuild") && a.contains("stats")),
        "{:?}",
        dry.actions
    );
    assert!(!check(d).ok());

    let rep = salvage(d, false).unwrap();
    assert!(
        rep.actions
            .iter()
            .any(|a| a.starts_with("rebuilt") && a.contains("math.json")),
        "{:?}",
        rep.actions
    );
    let after = check(d);
    assert!(after.ok(), "{after:?}");
    assert_eq!((groups(d, "math"), groups(d, "general")), orig);
}

#[test]
fn library_verify_names_a_damaged_side_log_warns_on_a_torn_tail_and_salvage_mends_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    collected(d);
    let orig = (groups(d, "math"), groups(d, "general"));
    let side = d.join("stats").join(stats::SIDE_LOG);
    let good = std::fs::read(&side).unwrap();

    // A torn last record (a writer killed mid-append) is a warning, not damage.
    let mut torn = good.clone();
    torn.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&side, &torn).unwrap();
    let rep = check(d);
    assert!(rep.ok(), "{rep:?}");
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("samples.bin") && w.contains("torn")),
        "{:?}",
        rep.warnings
    );

    // One byte changed inside a record: a problem naming the file.
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x5a;
    std::fs::write(&side, &bad).unwrap();
    let rep = check(d);
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("stats/samples.bin") && p.contains("fails its checksum")),
        "{rep:?}"
    );
    let s = salvage(d, false).unwrap();
    assert!(
        s.actions
            .iter()
            .any(|a| a.contains("samples.bin") && a.contains("cut at offset")),
        "{:?}",
        s.actions
    );
    let after = check(d);
    assert!(after.ok() && after.warnings.is_empty(), "{after:?}");
    // The sums the cut records held are recomputed from the frames: the same numbers.
    assert_eq!((groups(d, "math"), groups(d, "general")), orig);

    // A header that is not a side log's: a problem; salvage sets the file aside.
    let mut head = good.clone();
    head[0] ^= 0xff;
    std::fs::write(&side, &head).unwrap();
    let rep = check(d);
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("samples.bin") && p.contains("not a gradshard statistics side log")),
        "{rep:?}"
    );
    let s = salvage(d, false).unwrap();
    assert!(
        s.actions.iter().any(|a| a.contains("samples.bin.damaged")),
        "{:?}",
        s.actions
    );
    assert!(d.join("stats/samples.bin.damaged").exists() && !side.exists());
    assert!(check(d).ok());
    assert_eq!((groups(d, "math"), groups(d, "general")), orig);
}
