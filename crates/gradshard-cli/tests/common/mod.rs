//! Helpers shared by the CLI's integration tests: run the `gradshard` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gradshard"))
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run gradshard")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "gradshard {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// Borrows owned arguments for [`run`] / [`ok`].
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `collect` arguments: `model` with the `math` and `general` task files of `tasks`
/// into `store`, without a progress bar, then `extra`.
pub fn collect_args(model: &Path, tasks: &Path, store: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "collect".into(),
        "--model".into(),
        p(model).into(),
        "--task".into(),
        format!("math={}", p(&tasks.join("math.jsonl"))),
        "--task".into(),
        format!("general={}", p(&tasks.join("general.jsonl"))),
        "--store".into(),
        p(store).into(),
        "--quiet".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs [`collect_args`], which must succeed; returns stdout.
pub fn collect(model: &Path, tasks: &Path, store: &Path, extra: &[&str]) -> String {
    ok(&strs(&collect_args(model, tasks, store, extra)))
}

/// `ingest` arguments: a fixture directory's model with its `grads/math` and
/// `grads/general` files into `store`, then `extra`.
pub fn ingest_args(fixture: &Path, store: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "ingest".into(),
        "--model".into(),
        p(&fixture.join("model")).into(),
        "--task".into(),
        format!("math={}", p(&fixture.join("grads/math"))),
        "--task".into(),
        format!("general={}", p(&fixture.join("grads/general"))),
        "--store".into(),
        p(store).into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs [`ingest_args`], which must succeed; returns stdout.
pub fn ingest(fixture: &Path, store: &Path, extra: &[&str]) -> String {
    ok(&strs(&ingest_args(fixture, store, extra)))
}

/// `synth --store STORE` then `extra`, which must succeed; returns stdout.
pub fn synth(store: &Path, extra: &[&str]) -> String {
    let mut v = vec!["synth", "--store", p(store)];
    v.extend_from_slice(extra);
    ok(&v)
}

/// `score` arguments: math against general of `store` into `out`, without resampling,
/// minimum sample count or pictures, then `extra`.
pub fn score_args(store: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
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
        "--min-samples",
        "0",
        "--no-pictures",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs [`score_args`], which must succeed; returns stdout.
pub fn score(store: &Path, out: &Path, extra: &[&str]) -> String {
    ok(&strs(&score_args(store, out, extra)))
}

/// `inspect --json --samples` of a store.
pub fn inspect_json(store: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&[
        "inspect",
        "--store",
        p(store),
        "--json",
        "--samples",
    ]))
    .unwrap()
}
