//! End-to-end tests of the `gradshard` binary: crash and resume, bounded memory,
//! exit codes and messages.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use common::{bin, fixtures, ingest_args, inspect_json, ok, run, strs};

use rand::{Rng, SeedableRng};

const SYNTH: &[&str] = &[
    "synth",
    "--preset",
    "small",
    "--samples",
    "15",
    "--seed",
    "11",
    "--memory-budget",
    "24MiB",
    "--shard-size",
    "20MiB",
    "--workers",
    "2",
];

#[test]
fn killed_writer_resumes_with_every_sample_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let reference = dir.path().join("ref");
    let s = store.to_str().unwrap();
    // Uninterrupted run for comparison, timed to place the kills.
    let t = Instant::now();
    ok(&[SYNTH, &["--store", reference.to_str().unwrap()]].concat());
    let full = t.elapsed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut kills = 0;
    // Each run is killed after a random 1-6% of an uninterrupted run's time (12 kills cover
    // about 40% of the work even when parallel tests slow the runs unevenly), so that
    // most kills land mid-write (including mid-commit and mid-recovery).
    for _ in 0..30 {
        if kills >= 12 {
            break;
        }
        let mut child = bin()
            .args([SYNTH, &["--store", s]].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let wait = full.mul_f64(rng.random_range(0.01..0.06));
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL: no destructor, no flush
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        kills >= 10,
        "only {kills} runs were still going when killed"
    );
    ok(&[SYNTH, &["--store", s]].concat());
    let v = ok(&["verify", "--store", s]);
    assert!(v.contains("OK"), "{v}");
    let j = inspect_json(&store);
    for t in j["tasks"].as_array().unwrap() {
        let ids: Vec<i64> = t["sample_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, (0..15).collect::<Vec<_>>(), "task {}", t["task"]);
    }
    // Same bytes as the uninterrupted run, slice for slice.
    let a = gradshard_store::Store::open(&store).unwrap();
    let b = gradshard_store::Store::open(&reference).unwrap();
    for task in ["math", "general"] {
        for (ra, rb) in a
            .samples(task)
            .unwrap()
            .iter()
            .zip(b.samples(task).unwrap())
        {
            assert_eq!((ra.tokens, ra.loss_sum), (rb.tokens, rb.loss_sum));
            for f in [0, a.order().n_frames() / 2, a.order().n_frames() - 1] {
                assert_eq!(a.read_frame(ra, f).unwrap(), b.read_frame(rb, f).unwrap());
            }
        }
    }
}

#[test]
fn store_four_times_the_budget_stays_within_budget_plus_256_mib() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let report = dir.path().join("r.json");
    let budget: u64 = 64 << 20;
    ok(&[
        "synth",
        "--preset",
        "small",
        "--samples",
        "22",
        "--memory-budget",
        "64MiB",
        "--store",
        store.to_str().unwrap(),
        "--report-json",
        report.to_str().unwrap(),
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let raw = r["raw_bytes"].as_u64().unwrap();
    let peak = r["peak_rss_bytes"]
        .as_u64()
        .expect("VmHWM available on Linux");
    assert!(
        raw >= 4 * budget,
        "store of {raw} bytes is not 4x the budget"
    );
    assert!(
        peak <= budget + (256 << 20),
        "peak RSS {peak} exceeds budget + 256 MiB"
    );
}

#[test]
fn bad_input_exits_non_zero_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    // Missing store.
    let o = run(&[
        "inspect",
        "--store",
        dir.path().join("nope").to_str().unwrap(),
    ]);
    // Not found: exit 4 (docs/errors.md).
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
    // Unknown dtype: rejected by argument parsing before any I/O.
    let store = dir.path().join("s");
    let o = run(&[
        "synth",
        "--store",
        store.to_str().unwrap(),
        "--dtype",
        "fp8",
    ]);
    // Bad arguments: exit 64 (docs/errors.md; 2 means damage found).
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("fp8"));
    assert!(!store.exists(), "argument errors must not touch the disk");
    // Task without a directory.
    let o = run(&[
        "ingest",
        "--model",
        "m",
        "--task",
        "math",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(64));
    // Model with an unsupported model_type.
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    std::fs::write(m.join("config.json"), r#"{"model_type":"t5"}"#).unwrap();
    let g = fixtures().join("llama-gqa/grads/math");
    let o = run(&[
        "ingest",
        "--model",
        m.to_str().unwrap(),
        "--task",
        &format!("math={}", g.display()),
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("t5"));
}

#[test]
fn verify_exits_2_on_a_damaged_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let s = store.to_str().unwrap();
    ok(&["synth", "--store", s, "--samples", "3"]);
    let shard = store.join("shards/shard-000000.gss");
    let mut d = std::fs::read(&shard).unwrap();
    d[200] ^= 0x55;
    std::fs::write(&shard, d).unwrap();
    let o = run(&["verify", "--store", s]);
    assert_eq!(o.status.code(), Some(2));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("PROBLEM") && out.contains("sample 0"), "{out}");
}

/// `--codec`: the choice lands in the manifest, zstd-exp without the shuffle is refused
/// before anything is written, and every codec stores the same values (scores equal).
#[test]
fn codec_flag_is_recorded_checked_and_changes_no_value() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixtures().join("llama-gqa");
    let ingest = |store: &Path, extra: &[&str]| run(&strs(&ingest_args(&root, store, extra)));
    let bad = dir.path().join("bad");
    let o = ingest(&bad, &["--codec", "zstd-exp", "--no-shuffle"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--codec zstd-exp") && err.contains("shuffle"),
        "{err}"
    );
    assert!(!bad.exists(), "a refused command created the store");
    let mut heatmaps = Vec::new();
    for (name, extra) in [
        ("zstd-exp", &[][..]),
        ("zstd", &["--codec", "zstd"][..]),
        ("none", &["--zstd-level", "0"][..]),
    ] {
        let store = dir.path().join(name);
        let o = ingest(&store, extra);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(store.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["codec"]["name"], name);
        assert_eq!(m["format_version"], 3);
        let out = dir.path().join(format!("o-{name}"));
        ok(&[
            "score",
            "--store",
            store.to_str().unwrap(),
            "--task-a",
            "math",
            "--task-b",
            "general",
            "--n-boot",
            "0",
            "--n-perm",
            "0",
            "--no-pictures",
            "--out",
            out.to_str().unwrap(),
        ]);
        heatmaps.push(std::fs::read(out.join("heatmap.parquet")).unwrap());
    }
    assert!(
        heatmaps.windows(2).all(|w| w[0] == w[1]),
        "codecs changed the scores"
    );
}

#[test]
fn ingest_then_inspect_reports_tasks_and_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let root = fixtures().join("gpt2");
    common::ingest(&root, &store, &[]);
    let j = inspect_json(&store);
    assert_eq!(j["samples"], 16);
    assert_eq!(j["geometry"]["model_type"], "gpt2");
    assert!(j["compression_ratio"].as_f64().unwrap() > 1.0);
    // Rerunning skips every committed sample.
    let out = ok(&[
        "ingest",
        "--model",
        root.join("model").to_str().unwrap(),
        "--task",
        &format!("math={}", root.join("grads/math").display()),
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(
        out.contains("0 samples committed (16 already present)"),
        "{out}"
    );
}

#[test]
fn index_parquet_matches_its_schema_and_the_store() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    common::synth(&store, &["--samples", "3", "--mlp"]);
    let out = dir.path().join("index.parquet");
    ok(&[
        "inspect",
        "--store",
        store.to_str().unwrap(),
        "--index-parquet",
        out.to_str().unwrap(),
    ]);
    let reader = SerializedFileReader::new(std::fs::File::open(&out).unwrap()).unwrap();
    let rows = reader.metadata().file_metadata().num_rows();
    let s = gradshard_store::Store::open(&store).unwrap();
    assert_eq!(rows as usize, s.index().n_samples() * s.order().n_frames());
    let schema = parquet::arrow::parquet_to_arrow_schema(
        reader.metadata().file_metadata().schema_descr(),
        reader.metadata().file_metadata().key_value_metadata(),
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/store/index.arrow.json"),
        )
        .unwrap(),
    )
    .unwrap();
    gradshard_export::check_against_json("index", &schema, &doc).unwrap();
}

/// `make-model` writes a checkpoint and tasks that `collect` takes as they are; a
/// second run into the same directory is refused and changes nothing.
#[test]
fn make_model_feeds_collect_and_refuses_to_overwrite() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    let ms = m.to_str().unwrap();
    ok(&[
        "make-model",
        "--out",
        ms,
        "--preset",
        "tiny",
        "--vocab",
        "300",
        "--samples",
        "3",
        "--seq",
        "24",
    ]);
    let store = t.path().join("s");
    ok(&[
        "collect",
        "--model",
        ms,
        "--task",
        &format!("math={ms}/math.jsonl"),
        "--task",
        &format!("general={ms}/general.jsonl"),
        "--store",
        store.to_str().unwrap(),
        "--params",
        "attn",
    ]);
    let j = inspect_json(&store);
    assert_eq!(j["samples"].as_u64(), Some(6), "{j}");
    let before = std::fs::read(m.join("model.safetensors")).unwrap();
    let o = run(&["make-model", "--out", ms, "--preset", "tiny", "--seed", "5"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds"));
    assert_eq!(std::fs::read(m.join("model.safetensors")).unwrap(), before);
}
