//! A new user's first hour: progress in a log without a terminal, errors that say
//! each cause once and name the file, the answer of `score` on the console, the
//! accepted values in `--help`.

use std::path::PathBuf;

mod common;
use common::{bin, fixtures, ok, p, run};

fn fixture() -> PathBuf {
    fixtures().join("llama-gqa")
}

/// Runs a command that must fail; returns its stderr after checking that no part of the
/// `a: b: c` chain is said twice.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "gradshard {args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let line = err
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_else(|| panic!("no error line in {err}"))
        .to_string();
    let parts: Vec<&str> = line.split(": ").map(str::trim).collect();
    for (i, a) in parts.iter().enumerate() {
        for b in &parts[i + 1..] {
            assert!(a.len() < 8 || a != b, "`{a}` is said twice in: {line}");
        }
    }
    line
}

#[test]
fn collect_without_a_terminal_logs_progress_lines_before_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let store = dir.path().join("s");
    let tasks = fixture().join("tasks");
    // As under nohup or sbatch: stdout and stderr both to one file. A gap of 0 between
    // progress lines: a line at each tenth, however quick the run.
    let f = std::fs::File::create(&log).unwrap();
    let status = bin()
        .env("GRADSHARD_PROGRESS_SECS", "0")
        .args([
            "collect",
            "--model",
            p(&fixture().join("model")),
            "--task",
            &format!("math={}", p(&tasks.join("math.jsonl"))),
            "--task",
            &format!("general={}", p(&tasks.join("general.jsonl"))),
            "--store",
            p(&store),
        ])
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let progress: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("collect: ") && l.contains("samples/s") && l.contains('%'))
        .map(|(i, _)| i)
        .collect();
    let report = lines
        .iter()
        .position(|l| l.contains("samples stored"))
        .unwrap_or_else(|| panic!("no report in {text}"));
    assert!(progress.len() >= 5, "progress lines: {text}");
    assert!(progress[0] < report, "{text}");
    assert!(
        lines[progress[progress.len() - 1]].contains("16/16"),
        "{text}"
    );
}

#[test]
fn errors_name_the_file_and_say_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    // A store path that does not exist.
    let e = fails(&["inspect", "--store", "/nonexistent/store"]);
    assert!(e.contains("/nonexistent/store"), "{e}");
    // A directory that is not a store.
    let e = fails(&["verify", "--store", p(dir.path())]);
    assert!(e.contains("not a gradshard store"), "{e}");
    let e = fails(&[
        "score",
        "--store",
        p(dir.path()),
        "--task-a",
        "a",
        "--task-b",
        "b",
    ]);
    assert!(e.contains("not a gradshard store"), "{e}");
    // A bad layer list says the accepted form.
    let o = run(&[
        "score", "--store", "x", "--task-a", "a", "--task-b", "b", "--layers", "0-x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("comma-separated"),
        "{err}"
    );
    // make-model with a bad config names the config file, not the output.
    let cfg = dir.path().join("bad-config.json");
    std::fs::write(&cfg, r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    let out = dir.path().join("out-model");
    let e = fails(&["make-model", "--out", p(&out), "--config", p(&cfg)]);
    assert!(e.contains("bad-config.json"), "{e}");
    // merge of stores of different models describes both in words.
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    for (s, preset) in [(&a, "tiny"), (&b, "small")] {
        ok(&[
            "synth",
            "--store",
            p(s),
            "--preset",
            preset,
            "--samples",
            "1",
        ]);
    }
    let e = fails(&["merge", "--out", p(&dir.path().join("m")), p(&a), p(&b)]);
    assert!(!e.contains("Geometry {") && e.contains("layers"), "{e}");
}

#[test]
fn score_prints_the_answer_and_where_the_time_went() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    common::collect(
        &fixture().join("model"),
        &fixture().join("tasks"),
        &store,
        &[],
    );
    let out = ok(&[
        "score",
        "--store",
        p(&store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(&dir.path().join("scores")),
        "--n-boot",
        "50",
        "--n-perm",
        "50",
        "--layers",
        "0-1",
        "--no-pictures",
    ]);
    let most = out
        .lines()
        .find(|l| l.starts_with("most conflicted: block "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(most.contains("layer") && most.contains("CI ["), "{most}");
    assert!(out.contains("top sample pairs"), "{out}");
    // The cell is named as summary.json names it, and its number explained.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("scores/summary.json")).unwrap(),
    )
    .unwrap();
    let h = &summary["most_conflicted_head"];
    let kv = h["block"] == "K" || h["block"] == "V";
    let name = format!(
        "block {} layer {} head {}{}:",
        h["block"].as_str().unwrap(),
        h["layer"],
        h["head"],
        if kv {
            format!(" / kv_head {}", h["kv_head"])
        } else {
            String::new()
        }
    );
    assert!(most.contains(&name), "{most} vs {name}");
    assert!(out.contains("M = Σ (C_A / den) · |g_B|"), "{out}");
    assert!(
        out.contains("x the median cell") || out.contains("the median cell (M"),
        "{out}"
    );
    // A listed pair whose q-value exceeds 0.05 is marked as not significant.
    let pairs: Vec<&str> = out.lines().filter(|l| l.contains(" x general ")).collect();
    assert!(!pairs.is_empty(), "{out}");
    let mut seen = std::collections::BTreeMap::new();
    for l in &pairs {
        let q: f64 = l.split("q = ").nth(1).unwrap()[..5].parse().unwrap();
        assert_eq!(q > 0.05, l.ends_with("[not significant]"), "{l}");
        let ids = l.trim().split(':').next().unwrap();
        let (a, b) = ids.split_once(" x ").unwrap();
        *seen.entry(a.to_string()).or_insert(0) += 1;
        *seen.entry(b.to_string()).or_insert(0) += 1;
    }
    // One sample in more than half of the listed pairs is said to dominate them.
    let most = seen.values().max().copied().unwrap_or(0);
    let dominated = pairs.len() >= 3 && 2 * most > pairs.len();
    assert_eq!(
        dominated,
        out.contains("one sample dominates the top pairs"),
        "{out}"
    );
    // The phases add up to the wall time.
    let wall = out.lines().find(|l| l.starts_with("wall ")).unwrap();
    let total: f64 = wall["wall ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sum: f64 = wall
        .split(" = ")
        .nth(1)
        .unwrap()
        .split(" + ")
        .map(|p| {
            p.trim_end_matches(" s")
                .rsplit(' ')
                .next()
                .unwrap()
                .parse::<f64>()
                .unwrap()
        })
        .sum();
    assert!((sum - total).abs() <= 0.03 + 0.01 * total, "{wall}");
    assert!(wall.contains("permutation test"), "{wall}");
    assert!(
        !out.contains("host->device"),
        "no device line on the CPU: {out}"
    );
}

#[test]
fn help_lists_accepted_values() {
    let h = ok(&["score", "--help"]);
    for v in ["unsigned", "signed", "symmetric", "sum", "mean", "pooled"] {
        assert!(h.contains(v), "score --help lacks `{v}`");
    }
    let h = ok(&["collect", "--help"]);
    assert!(h.contains("factored") && h.contains("auto"), "{h}");
}

/// `inspect … | head -1`: a closed stdout ends the program quietly (no panic).
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    common::synth(&store, &["--preset", "tiny", "--samples", "2"]);
    let mut child = bin()
        .args(["inspect", "--store", p(&store), "--samples"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // Ended by SIGPIPE, as any Unix tool (`yes | head -1`), or done writing before the
    // reader went away: never an error exit or a panic's exit code 101.
    use std::os::unix::process::ExitStatusExt;
    const SIGPIPE: i32 = 13;
    assert!(
        out.status.success() || out.status.signal() == Some(SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}

/// A sample longer than the model's positions is refused before any allocation, naming
/// the sample and --max-tokens (a 10⁶-token line used to abort on a 4 TB allocation).
#[test]
fn a_sample_past_the_models_positions_is_refused_naming_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.jsonl");
    let ids: Vec<String> = (0..5000).map(|i| (i % 50).to_string()).collect();
    std::fs::write(
        &long,
        format!("{{\"id\": 7, \"input_ids\": [{}]}}\n", ids.join(",")),
    )
    .unwrap();
    let o = run(&[
        "collect",
        "--model",
        p(&fixture().join("model")),
        "--task",
        &format!("long={}", p(&long)),
        "--store",
        p(&dir.path().join("s")),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("5000 tokens") && err.contains("--max-tokens"),
        "{err}"
    );
}

/// An unusable `--out` fails before any computation; temporary output directories of
/// killed runs are removed by the next run.
#[test]
fn score_checks_its_output_first_and_clears_leftovers_of_killed_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    common::synth(&store, &["--preset", "tiny", "--samples", "2"]);
    // A regular file where the output's parent should be.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let bad = blocker.join("scores");
    let o = run(&[
        "score",
        "--store",
        p(&store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(&bad),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && err.contains("--out") && err.contains("file"),
        "{err}"
    );
    assert!(!out.contains("score:"), "it computed before failing: {out}");
    // A leftover of a dead run (pid 999999999 cannot be alive) is removed.
    let stale = dir.path().join(".scores.tmp-999999999-1");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("heatmap.parquet"), b"partial").unwrap();
    ok(&[
        "score",
        "--store",
        p(&store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(&dir.path().join("scores")),
        "--n-boot",
        "0",
        "--n-perm",
        "0",
        "--no-pictures",
    ]);
    assert!(!stale.exists());
    assert!(dir.path().join("scores/summary.json").is_file());
}

/// An empty task file and samples without ids are said, not passed over.
#[test]
fn empty_task_files_and_missing_ids_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let noid = dir.path().join("noid.jsonl");
    std::fs::write(
        &noid,
        "{\"input_ids\": [1, 2, 3, 4]}\n{\"id\": 9, \"input_ids\": [5, 6, 7]}\n",
    )
    .unwrap();
    let o = run(&[
        "collect",
        "--model",
        p(&fixture().join("model")),
        "--task",
        &format!("e={}", p(&empty)),
        "--task",
        &format!("n={}", p(&noid)),
        "--store",
        p(&dir.path().join("s")),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning: task `e`") && err.contains("holds no sample"),
        "{err}"
    );
    assert!(
        err.contains("warning: task `n`: 1 of 2 samples") && err.contains("line index"),
        "{err}"
    );
}

/// Without a terminal, quick work writes (almost) no progress lines: `verify` of a
/// small store piped to a file, with the default pacing.
#[test]
fn verify_of_a_small_store_piped_to_a_file_logs_at_most_three_progress_lines() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    common::synth(&store, &["--samples", "8"]);
    let log = dir.path().join("log.txt");
    let f = std::fs::File::create(&log).unwrap();
    let status = bin()
        .env_remove("GRADSHARD_PROGRESS_SECS")
        .args(["verify", "--store", p(&store)])
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let progress = text
        .lines()
        .filter(|l| l.starts_with("verify: ") && l.contains("items/s"))
        .count();
    assert!(progress <= 3, "{progress} progress lines:\n{text}");
    assert!(text.contains("OK"), "{text}");
}
