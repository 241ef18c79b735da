//! No command may destroy a store: every path a command writes is guarded, salvage
//! mends a lost log or manifest, and every failure has its documented exit code
//! (docs/errors.md). Each test checks the bytes that must survive.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{bin, fixtures, ok, p, run};

/// Exit codes of docs/errors.md.
const DAMAGE: i32 = 2;
const NOT_FOUND: i32 = 4;
const NOT_A_STORE: i32 = 5;
const REFUSED: i32 = 6;
const BUSY: i32 = 7;
const USAGE: i32 = 64;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir` (relative path -> bytes): what must stay byte-identical.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn synth(store: &Path, extra: &[&str]) {
    let mut args = vec!["synth", "--store", p(store)];
    if !extra.contains(&"--samples") {
        args.extend(["--samples", "3"]);
    }
    args.extend_from_slice(extra);
    ok(&args);
}

fn score_args<'a>(store: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "score",
        "--store",
        p(store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(out),
        "--n-boot",
        "0",
        "--n-perm",
        "0",
        "--no-pictures",
    ]
}

/// A refused command: the guard's exit code and a message naming the path and why.
fn refused(args: &[&str], names: &str) {
    let o = run(args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(REFUSED), "{args:?}: {e}");
    assert!(e.contains("refusing") || e.contains("not replaced"), "{e}");
    assert!(
        e.contains(names),
        "{args:?}: message does not name {names}: {e}"
    );
}

/// The score outputs that must be equal for two runs on the same data.
fn score_files(out: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut s = snapshot(out);
    // summary.json says when and how long; the tables and the answer must match.
    let summary = s.remove(Path::new("summary.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&summary).unwrap();
    strip_times(&mut v);
    s.insert(
        "summary.json (times removed)".into(),
        serde_json::to_vec(&v).unwrap(),
    );
    s
}

fn strip_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !(k.contains("second") || k.contains("time") || k.contains("elapsed")));
            m.values_mut().for_each(strip_times);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_times),
        _ => {}
    }
}

#[test]
fn score_out_never_replaces_a_store_or_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("proj");
    let st = proj.join("st");
    synth(&st, &[]);
    std::fs::write(proj.join("notes.txt"), "beside the store").unwrap();
    let before = snapshot(&proj);
    for out in [
        st.clone(),
        proj.clone(),
        st.join("shards"),
        st.join("shards/../../st"),
        st.join("stats-new"),
    ] {
        let mut a = score_args(&st, &out);
        a.push("--overwrite");
        refused(&a, "store");
        assert_eq!(
            snapshot(&proj),
            before,
            "score --out {out:?} changed the store"
        );
    }
    // A relative path into the store, from the store's parent.
    let o = bin()
        .current_dir(&proj)
        .args([
            "score", "--store", "st", "--task-a", "math", "--task-b", "general",
        ])
        .args(["--out", "st/../st/shards", "--overwrite", "--n-boot", "0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(REFUSED), "{}", stderr(&o));
    assert_eq!(snapshot(&proj), before);

    // --overwrite replaces a previous score output, and only that.
    let scores = dir.path().join("scores");
    ok(&score_args(&st, &scores));
    assert!(scores.join(".gradshard-score").is_file());
    let mut a = score_args(&st, &scores);
    let o = run(&a);
    assert_eq!(o.status.code(), Some(REFUSED), "{}", stderr(&o));
    a.push("--overwrite");
    ok(&a);
    std::fs::write(scores.join("my-notes.txt"), "mine").unwrap();
    refused(&a, "my-notes.txt");
    assert_eq!(
        std::fs::read_to_string(scores.join("my-notes.txt")).unwrap(),
        "mine"
    );
    // A directory that is not a score output.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("thesis.tex"), "mine").unwrap();
    let mut a = score_args(&st, &other);
    a.push("--overwrite");
    refused(&a, "other");
    assert_eq!(
        std::fs::read_to_string(other.join("thesis.tex")).unwrap(),
        "mine"
    );
    assert_eq!(snapshot(&proj), before);
}

#[test]
fn side_outputs_never_land_on_store_files() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    let other = dir.path().join("other");
    synth(&st, &[]);
    synth(&other, &["--seed", "3"]);
    let before = (snapshot(&st), snapshot(&other));
    let shard = st.join("shards/shard-000000.gss");
    for target in [st.join("manifest.json"), shard.clone(), st.clone()] {
        refused(
            &["inspect", "--store", p(&st), "--index-parquet", p(&target)],
            p(&target),
        );
    }
    // ingest's report onto the log of the store it writes.
    let f = fixtures().join("llama-gqa");
    let task = format!("math={}", p(&f.join("grads/math")));
    refused(
        &[
            "ingest",
            "--model",
            p(&f.join("model")),
            "--task",
            &task,
            "--store",
            p(&st),
            "--report-json",
            p(&st.join("samples.log")),
        ],
        "samples.log",
    );
    // synth's report onto another store's manifest: refused before the new store exists.
    let fresh = dir.path().join("fresh");
    refused(
        &[
            "synth",
            "--store",
            p(&fresh),
            "--samples",
            "1",
            "--report-json",
            p(&other.join("manifest.json")),
        ],
        "manifest.json",
    );
    assert!(!fresh.exists(), "a refused synth wrote its store");
    // A store inside a store's shards, a model or gradients written into a store.
    refused(
        &[
            "synth",
            "--store",
            p(&st.join("shards/inner")),
            "--samples",
            "1",
        ],
        "inner",
    );
    refused(&["make-model", "--out", p(&st), "--preset", "tiny"], p(&st));
    refused(
        &[
            "grads",
            "--model",
            p(&f.join("model")),
            "--input",
            p(&f.join("tasks/math.jsonl")),
            "--out",
            p(&st.join("shards")),
        ],
        "shards",
    );
    assert_eq!((snapshot(&st), snapshot(&other)), before);
    // Outputs elsewhere still work.
    ok(&[
        "inspect",
        "--store",
        p(&st),
        "--index-parquet",
        p(&dir.path().join("index.parquet")),
    ]);
    assert_eq!((snapshot(&st), snapshot(&other)), before);
}

#[test]
fn a_deleted_or_emptied_log_is_mended_by_salvage() {
    for how in ["deleted", "emptied"] {
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("st");
        synth(&st, &[]);
        let s0 = dir.path().join("s0");
        ok(&score_args(&st, &s0));
        let shards = snapshot(&st.join("shards"));
        let log = std::fs::read(st.join("samples.log")).unwrap();
        if how == "deleted" {
            std::fs::remove_file(st.join("samples.log")).unwrap();
        } else {
            std::fs::write(st.join("samples.log"), b"").unwrap();
        }
        let o = run(&["verify", "--store", p(&st)]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(DAMAGE), "{how}: {out}{}", stderr(&o));
        assert!(
            out.contains("samples.log") && out.contains("salvage"),
            "{out}"
        );
        let said = ok(&["salvage", "--store", p(&st)]);
        assert!(
            said.contains("re-admitted") && said.contains("6 sample(s) kept"),
            "{said}"
        );
        assert!(ok(&["verify", "--store", p(&st)]).contains("OK"));
        // The log holds the same records (in commit order) and the shards are untouched.
        assert_eq!(std::fs::read(st.join("samples.log")).unwrap(), log, "{how}");
        assert_eq!(snapshot(&st.join("shards")), shards);
        let s1 = dir.path().join("s1");
        ok(&score_args(&st, &s1));
        assert_eq!(score_files(&s0), score_files(&s1), "{how}");
    }
}

#[test]
fn a_garbage_manifest_is_rebuilt_from_the_shard_headers() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    synth(&st, &[]);
    // A store of the same model (other samples): where the geometry comes from.
    let like = dir.path().join("like");
    synth(&like, &["--seed", "9", "--samples", "1"]);
    let small = dir.path().join("small");
    synth(&small, &["--preset", "small", "--samples", "1"]);
    let s0 = dir.path().join("s0");
    ok(&score_args(&st, &s0));
    let manifest = std::fs::read(st.join("manifest.json")).unwrap();
    // A store is written with a copy of its manifest; salvage mends from it alone.
    let mended = dir.path().join("mended");
    copy_dir(&st, &mended);
    std::fs::write(
        mended.join("manifest.json"),
        [0xffu8, 0xfe, 0x00, 0x13, 0x37],
    )
    .unwrap();
    let said = ok(&["salvage", "--store", p(&mended)]);
    assert!(said.contains("rebuilt"), "{said}");
    assert!(ok(&["verify", "--store", p(&mended)]).contains("OK"));
    let sm = dir.path().join("sm");
    ok(&score_args(&mended, &sm));
    assert_eq!(score_files(&s0), score_files(&sm));
    // Without the copy, salvage needs a store of the same model.
    std::fs::remove_file(st.join("manifest.copy.json")).unwrap();
    std::fs::write(st.join("manifest.json"), [0xffu8, 0xfe, 0x00, 0x13, 0x37]).unwrap();
    let damaged = snapshot(&st);

    // Every reader names the file and says what mends it.
    let o = run(&["verify", "--store", p(&st)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(DAMAGE), "{e}");
    assert!(
        e.contains("manifest.json") && e.contains("damaged") && e.contains("salvage"),
        "{e}"
    );
    let o = run(&["inspect", "--store", p(&st)]);
    assert_eq!(o.status.code(), Some(DAMAGE));
    assert!(stderr(&o).contains("manifest.json"), "{}", stderr(&o));
    // salvage alone says what it lacks; a store of another model is refused, naming why.
    let o = run(&["salvage", "--store", p(&st)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--spec-from"), "{}", stderr(&o));
    let o = run(&["salvage", "--store", p(&st), "--spec-from", p(&small)]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("not rebuilt") && e.contains(p(&small)), "{e}");
    assert_eq!(
        snapshot(&st),
        damaged,
        "a refused rebuild changed the store"
    );

    let said = ok(&["salvage", "--store", p(&st), "--spec-from", p(&like)]);
    assert!(said.contains("rebuilt"), "{said}");
    assert!(ok(&["verify", "--store", p(&st)]).contains("OK"));
    // The rebuilt manifest says what the original said, but where it came from.
    let strip = |b: &[u8]| {
        let mut v: serde_json::Value = serde_json::from_slice(b).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("created_by");
        o.remove("source");
        v
    };
    assert_eq!(
        strip(&std::fs::read(st.join("manifest.json")).unwrap()),
        strip(&manifest)
    );
    let s1 = dir.path().join("s1");
    ok(&score_args(&st, &s1));
    assert_eq!(score_files(&s0), score_files(&s1));
}

#[test]
fn merge_refuses_an_input_a_writer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    synth(&a, &[]);
    let before = snapshot(&a);
    // Hold the writer lock as a running writer does.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.join("LOCK"))
        .unwrap();
    lock.lock().unwrap();
    std::fs::write(a.join("LOCK"), format!("pid {}", std::process::id())).unwrap();
    let held = snapshot(&a);
    let m = dir.path().join("m");
    let o = run(&["merge", "--out", p(&m), p(&a)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(BUSY), "{e}");
    assert!(
        e.contains(&format!("pid {}", std::process::id())) && e.contains("--snapshot"),
        "{e}"
    );
    assert!(!m.exists(), "a refused merge made its output");
    assert_eq!(snapshot(&a), held);
    // --snapshot copies what is committed.
    let said = ok(&["merge", "--out", p(&m), "--snapshot", p(&a)]);
    assert!(said.contains("6 samples copied"), "{said}");
    drop(lock);
    let _ = before;
}

#[test]
fn an_id_past_i64_is_called_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("t.jsonl");
    std::fs::write(
        &tasks,
        "{\"id\": 18446744073709551616, \"input_ids\": [1, 2, 3, 4]}\n",
    )
    .unwrap();
    let store = dir.path().join("s");
    let task = format!("t={}", p(&tasks));
    let model = fixtures().join("llama-gqa/model");
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
    assert!(!o.status.success());
    assert!(
        e.contains("18446744073709551616") && e.contains("out of range") && !e.contains("e+19"),
        "{e}"
    );
}

#[test]
fn a_tensor_missing_from_a_safetensors_header_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures().join("llama-gqa");
    let grads = dir.path().join("math");
    std::fs::create_dir(&grads).unwrap();
    let bytes = std::fs::read(f.join("grads/math/0.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert!(header.as_object_mut().unwrap().remove(q).is_some());
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(grads.join("0.safetensors"), out).unwrap();
    let task = format!("math={}", p(&grads));
    let store = dir.path().join("s");
    let o = run(&[
        "ingest",
        "--model",
        p(&f.join("model")),
        "--task",
        &task,
        "--store",
        p(&store),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains(q) && e.contains("missing from the header") && e.contains("0.safetensors"),
        "{e}"
    );
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let o = run(&["verify", "--store", p(&missing)]);
    assert_eq!(o.status.code(), Some(NOT_FOUND), "{}", stderr(&o));
    assert!(stderr(&o).contains("no such store directory"));
    let file = dir.path().join("README.md");
    std::fs::write(&file, "# not a store").unwrap();
    for cmd in ["verify", "inspect", "salvage"] {
        let o = run(&[cmd, "--store", p(&file)]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(NOT_A_STORE), "{cmd}: {e}");
        assert!(
            e.contains("README.md") && e.contains("not a directory"),
            "{e}"
        );
    }
    let o = run(&["verify", "--store", p(dir.path())]);
    assert_eq!(o.status.code(), Some(NOT_A_STORE));
    assert!(stderr(&o).contains("not a gradshard store"));
    // Damage: a flipped byte in a shard.
    let st = dir.path().join("st");
    synth(&st, &[]);
    let shard = st.join("shards/shard-000000.gss");
    let mut d = std::fs::read(&shard).unwrap();
    d[300] ^= 0x55;
    std::fs::write(&shard, d).unwrap();
    let o = run(&["verify", "--store", p(&st)]);
    assert_eq!(o.status.code(), Some(DAMAGE));
    assert!(String::from_utf8_lossy(&o.stdout).contains("salvage"));
    // Damage: a deleted manifest (the store's other files are there).
    let st2 = dir.path().join("st2");
    synth(&st2, &[]);
    std::fs::remove_file(st2.join("manifest.json")).unwrap();
    for cmd in ["verify", "inspect"] {
        let o = run(&[cmd, "--store", p(&st2)]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(DAMAGE), "{cmd}: {e}");
        assert!(
            e.contains("manifest.json") && e.contains("missing") && e.contains("salvage --store"),
            "{e}"
        );
    }
    // Bad arguments.
    let o = run(&["verify"]);
    assert_eq!(o.status.code(), Some(USAGE));
    let o = run(&["verify", "--help"]);
    assert_eq!(o.status.code(), Some(0));
}

/// Random relative paths around a store, given as every output a command writes:
/// whatever the guard lets through, nothing in the store ever changes.
#[test]
fn fuzz_random_output_paths_never_change_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("proj");
    let st = proj.join("st");
    synth(&st, &["--samples", "2"]);
    std::fs::create_dir_all(proj.join("x/y")).unwrap();
    std::os::unix::fs::symlink(&st, proj.join("x/link")).unwrap();
    let before = snapshot(&st);
    let parts = [
        ".",
        "..",
        "st",
        "shards",
        "shard-000000.gss",
        "manifest.json",
        "samples.log",
        "LOCK",
        "x",
        "y",
        "link",
        "out",
        "proj",
    ];
    // xorshift64*, fixed seed.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut refused_n = 0;
    for i in 0..200 {
        let depth = 1 + (next() % 4) as usize;
        let rel: Vec<&str> = (0..depth)
            .map(|_| parts[(next() % parts.len() as u64) as usize])
            .collect();
        let rel = rel.join("/");
        let o = match i % 3 {
            0 => bin()
                .current_dir(&proj)
                .args(["inspect", "--store", "st", "--index-parquet", &rel])
                .output(),
            1 => bin()
                .current_dir(&proj)
                .args(["score", "--store", "st", "--task-a", "math"])
                .args(["--task-b", "general", "--n-boot", "0", "--n-perm", "0"])
                .args(["--no-pictures", "--overwrite", "--out", &rel])
                .output(),
            _ => bin()
                .current_dir(&proj)
                .args(["make-model", "--preset", "tiny", "--out", &rel])
                .output(),
        }
        .unwrap();
        if o.status.code() == Some(REFUSED) {
            refused_n += 1;
        }
        assert!(
            o.status.code().is_some_and(|c| c < 100),
            "{rel}: aborted: {}",
            stderr(&o)
        );
        assert_eq!(
            snapshot(&st),
            before,
            "iteration {i}: {rel} changed the store"
        );
    }
    assert!(refused_n > 20, "only {refused_n} of 200 refused");
}
