//! A store never hands back a wrong answer quietly: tampered statistics, killed
//! merges, damaged logs and lost records are refused, named and mended by `salvage`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{bin, fixtures, ok, p, run, score_args, strs};
use serde_json::Value;

fn stderr(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A collected store (with stats/) of the LLaMA-GQA fixture's tasks.
fn collected(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let f = fixtures().join("llama-gqa");
    let store = dir.join(name);
    let extra = [&["--dtype", "f32"], extra].concat();
    common::collect(&f.join("model"), &f.join("tasks"), &store, &extra);
    store
}

fn sample_count(store: &Path) -> u64 {
    common::inspect_json(store)["samples"].as_u64().unwrap()
}

/// Case 3: a `mean` of stats/math.json multiplied by 10 (still valid JSON) used to pass
/// through `merge` unchanged, and `verify` did not look at stats/.
#[test]
fn tampered_statistics_are_refused_by_merge_reported_by_verify_and_rebuilt_by_salvage() {
    let dir = tempfile::tempdir().unwrap();
    let a = collected(dir.path(), "a", &["--worker", "0/2"]);
    let b = collected(dir.path(), "b", &["--worker", "1/2"]);
    let path = a.join("stats/math.json");
    let good = std::fs::read_to_string(&path).unwrap();
    let mut v: Value = serde_json::from_str(&good).unwrap();
    let m = v["groups"][3]["mean"].as_f64().unwrap();
    v["groups"][3]["mean"] = Value::from(m * 10.0);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();

    let o = run(&["verify", "--store", p(&a)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("stats/math.json") && e.contains("checksum mismatch"),
        "{e}"
    );

    let merged = dir.path().join("m");
    let o = run(&["merge", "--out", p(&merged), p(&a), p(&b)]);
    let e = stderr(&o);
    assert!(
        !o.status.success(),
        "merge carried tampered statistics: {e}"
    );
    assert!(
        e.contains("stats/math.json") && e.contains("salvage"),
        "{e}"
    );
    assert!(
        !merged.join("manifest.json").exists(),
        "merge wrote before refusing"
    );

    // score does not use stats/ but says so out loud.
    let out = dir.path().join("o");
    let o = run(&strs(&score_args(&a, &out, &[])));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("warning") && e.contains("stats/math.json"),
        "{e}"
    );

    let s = ok(&["salvage", "--store", p(&a)]);
    assert!(
        s.contains("rebuilt") && s.contains("math.json") && s.contains("OK"),
        "{s}"
    );
    let rebuilt: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let orig: Value = serde_json::from_str(&good).unwrap();
    assert_eq!(
        rebuilt["groups"], orig["groups"],
        "salvage rebuilt other numbers"
    );
    ok(&["merge", "--out", p(&merged), p(&a), p(&b)]);
    assert!(ok(&["verify", "--store", p(&merged)]).contains("OK"));
}

/// Case 4: a killed merge left a store that verified and scored, though incomplete.
#[test]
fn a_killed_merge_is_refused_by_readers_until_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<PathBuf> = (0..2)
        .map(|k| {
            let s = dir.path().join(format!("in{k}"));
            ok(&[
                "synth",
                "--store",
                p(&s),
                "--preset",
                "tiny",
                "--samples",
                "150",
                "--seed",
                &k.to_string(),
                "--tasks",
                &format!("t{k}a,t{k}b"),
            ]);
            s
        })
        .collect();
    let out = dir.path().join("merged");
    let merge_args = ["merge", "--out", p(&out), p(&inputs[0]), p(&inputs[1])];
    // Kill merges at growing delays until one dies with samples already in the output.
    let mut killed_mid_way = false;
    for delay_ms in [40u64, 80, 120, 200, 300, 450, 700, 1000] {
        std::fs::remove_dir_all(&out).ok();
        let mut child = bin()
            .args(merge_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(delay_ms) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok();
        child.wait().unwrap();
        if finished || !out.join("UNFINISHED").exists() {
            continue;
        }
        killed_mid_way = true;
        let score = score_args(&out, &dir.path().join("o"), &[]);
        for args in [vec!["inspect", "--store", p(&out)], strs(&score)] {
            let o = run(&args);
            let e = stderr(&o);
            assert!(
                !o.status.success(),
                "{args:?} read an unfinished merge: {e}"
            );
            assert!(
                e.contains("unfinished") && e.contains("rerun the same merge command"),
                "{e}"
            );
        }
        let o = run(&["verify", "--store", p(&out)]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("unfinished"));
        break;
    }
    assert!(killed_mid_way, "no kill landed inside a merge");
    ok(&merge_args);
    assert!(!out.join("UNFINISHED").exists());
    assert!(ok(&["verify", "--store", p(&out)]).contains("OK"));
    assert_eq!(sample_count(&out), 600);
}

/// Byte offsets at which each log record starts (after the 16-byte header).
fn record_starts(log: &[u8]) -> Vec<usize> {
    let mut at = 16;
    let mut out = Vec::new();
    while at + 12 <= log.len() {
        out.push(at);
        let len = u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
        at += 12 + len;
    }
    out
}

/// Case 9 (garbage appended to the log left the store unreadable, with no salvage) and
/// the salvage path: a cut log re-admitted from the shards, a duplicate commit dropped,
/// a missing shard's samples dropped; each time `verify` passes afterwards and a second
/// salvage changes nothing.
#[test]
fn salvage_mends_garbage_a_cut_log_a_duplicate_and_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    ok(&[
        "synth",
        "--store",
        p(&store),
        "--preset",
        "tiny",
        "--samples",
        "12",
        "--shard-size",
        "48KiB",
    ]);
    let log = store.join("samples.log");
    let full = std::fs::read(&log).unwrap();
    let n = sample_count(&store);
    assert_eq!(n, 24);
    let salvage = |what: &str| -> String {
        let s = ok(&["salvage", "--store", p(&store)]);
        assert!(s.contains("verify:") && s.contains("OK"), "{what}: {s}");
        let again = ok(&["salvage", "--store", p(&store)]);
        assert!(
            again.contains("needed no change"),
            "{what}: second salvage: {again}"
        );
        s
    };

    // Garbage after the last record.
    let mut g = full.clone();
    g.extend((0..300u32).map(|i| (i * 37 % 251) as u8 | 1));
    std::fs::write(&log, &g).unwrap();
    let o = run(&["inspect", "--store", p(&store)]);
    assert!(!o.status.success());
    let o = run(&["salvage", "--store", p(&store), "--dry-run"]);
    assert!(stderr(&o).contains("would do: ") && stderr(&o).contains("cut at offset"));
    assert_eq!(std::fs::read(&log).unwrap(), g, "--dry-run changed the log");
    let s = salvage("garbage");
    assert!(s.contains("cut at offset"), "{s}");
    assert_eq!(sample_count(&store), n);
    assert_eq!(
        std::fs::read(&log).unwrap(),
        full,
        "salvage changed good records"
    );

    // The log cut short by three records: they come back from the shards.
    let starts = record_starts(&full);
    std::fs::write(&log, &full[..starts[starts.len() - 3]]).unwrap();
    assert!(!run(&["inspect", "--store", p(&store)]).status.success());
    let s = salvage("cut");
    assert_eq!(s.matches("re-admitted").count(), 3, "{s}");
    assert_eq!(sample_count(&store), n);

    // A sample committed twice: the second commit goes.
    let now = std::fs::read(&log).unwrap();
    let starts = record_starts(&now);
    let mut dup = now.clone();
    dup.extend_from_slice(&now[starts[0]..starts[1]]);
    std::fs::write(&log, &dup).unwrap();
    assert_eq!(
        run(&["verify", "--store", p(&store)]).status.code(),
        Some(2)
    );
    let s = salvage("duplicate");
    assert!(s.contains("committed twice"), "{s}");
    assert_eq!(sample_count(&store), n);

    // A shard deleted: its samples go, the others stay readable.
    let shard = store.join("shards/shard-000001.gss");
    std::fs::remove_file(&shard).unwrap();
    let s = salvage("missing shard");
    let dropped = s.matches("dropped task").count() as u64;
    assert!(dropped > 0 && s.contains("is missing"), "{s}");
    assert_eq!(sample_count(&store), n - dropped);
    common::score(&store, &dir.path().join("o"), &[]);
}

/// Case 7: one JSONL line of 10⁶ tokens made `collect` abort inside the allocator
/// (exit 134). With no position limit in the config, the memory estimate refuses it
/// first, naming the sample and --max-tokens, and the store keeps what it had.
#[test]
fn a_sample_too_long_for_memory_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures().join("llama-gqa/model");
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(&f).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let cfg_path = model.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut()
        .unwrap()
        .remove("max_position_embeddings");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let ids: Vec<String> = (0..1_000_000u32).map(|i| (i % 50).to_string()).collect();
    let tasks = dir.path().join("long.jsonl");
    std::fs::write(
        &tasks,
        format!(
            "{{\"id\": 1, \"input_ids\": [1, 2, 3, 4]}}\n{{\"id\": 2, \"input_ids\": [{}]}}\n",
            ids.join(",")
        ),
    )
    .unwrap();
    let store = dir.path().join("s");
    let task = format!("long={}", p(&tasks));
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
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("sample 2") && e.contains("1000000 tokens") && e.contains("--max-tokens"),
        "{e}"
    );
    // The first sample was committed and is intact.
    assert!(ok(&["verify", "--store", p(&store)]).contains("OK"));
    assert_eq!(sample_count(&store), 1);
}
