//! `gradshard`: per-sample gradient stores beyond RAM.

mod benchscore;
mod collectcmd;
mod democmd;
pub mod exit;
mod gradscmd;
mod indexexport;
mod makemodel;
mod mergecmd;
mod plan;
mod progress;
mod scorecmd;
mod storecmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gradshard_core::DType;

/// Per-sample gradients of LLM attention, stored compressed and checksummed,
/// indexed to the (task, sample, layer, block, head) slice.
#[derive(Parser, Debug)]
#[command(name = "gradshard", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// One value, parsed once at start-up: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write per-sample safetensors gradient files (PyTorch users' output) into a store.
    Ingest(storecmd::IngestArgs),
    /// Write a seeded synthetic store for any geometry (benchmarks, tests).
    Synth(storecmd::SynthArgs),
    /// Show what a store holds: tasks, samples, tensors, bytes on disk, compression ratio.
    Inspect(storecmd::InspectArgs),
    /// Check every checksum and index entry of a store; non-zero exit on any problem.
    Verify(storecmd::VerifyArgs),
    /// Mend a damaged store: cut the log at its first bad record, drop unreadable and
    /// duplicate samples, re-admit samples the log lost, rebuild stats/; then verify.
    Salvage(storecmd::SalvageArgs),
    /// Score QK-OV interference between two tasks of a store; writes Parquet, JSON, PNG and SVG.
    Score(scorecmd::ScoreArgs),
    /// Compute per-sample gradients of a Hugging Face checkpoint with burn and write them as
    /// <id>.safetensors files (the layout `ingest` reads).
    Grads(gradscmd::GradsArgs),
    /// Benchmark: scoring from the store vs from uncompressed mmap'd f32 arrays (scripts/bench_score.sh).
    #[command(hide = true)]
    BenchScore(benchscore::BenchScoreArgs),
    /// Bytes a collection will need (model config, parameter set, dtype, samples) against free disk.
    Plan(plan::PlanArgs),
    /// Run a Hugging Face model over JSONL tasks and store every sample's gradients, with
    /// running Fisher statistics; resumable, splittable with --worker K/N.
    Collect(collectcmd::CollectArgs),
    /// Combine stores of one model (e.g. worker shares) into one store.
    Merge(mergecmd::MergeArgs),
    /// The whole pipeline on a bundled tiny model, offline: collect -> score -> Parquet + heatmaps.
    Demo(democmd::DemoArgs),
    /// Write a seeded random checkpoint of a named or given shape (and random token
    /// tasks), for benchmarks without a model hub, e.g. `collect --device cuda`.
    MakeModel(makemodel::MakeModelArgs),
}

/// Writer settings shared by the commands that write stores.
#[derive(Args, Debug, Clone)]
pub struct WriteArgs {
    /// Stored element type.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Frame codec: `zstd-exp` (zstd on the sign/exponent byte plane, mantissa bytes
    /// raw: smaller and faster to read on gradients) or `zstd` (zstd on every byte
    /// plane). Default zstd-exp, or zstd with --no-shuffle.
    #[arg(long, value_enum)]
    pub codec: Option<CodecArg>,
    /// zstd level (1 is the measured sweet spot; 0 disables compression).
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    /// Store bytes as they are instead of byte-shuffled planes before compression.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Compression worker threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Bytes of gradient data in flight in the writer pipeline, e.g. 512MiB, 2GiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub memory_budget: u64,
    /// A shard takes no new samples past this size.
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
    pub shard_size: u64,
    /// Also write the final report as JSON to this file.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
}

/// `--codec`: how frames are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CodecArg {
    ZstdExp,
    Zstd,
}

pub fn parse_dtype(s: &str) -> Result<DType, String> {
    s.parse()
}

/// Parses sizes like `1048576`, `512MiB`, `2GiB`, `64M`, `1G`, `10GB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let bytes = v * mult as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

/// Human-readable bytes (binary units).
pub fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// glibc's allocator returns freed memory above 128 KiB to the kernel (munmap, or a brk
/// trim of the heap top) and takes it back on the next allocation, one zero-filled page
/// fault per 4 KiB. The scorer and the collector allocate and free buffers of 0.1-30 MiB
/// per slice or per sample, so a score pass spent ~8% of its cycles in page faults and
/// TLB shootdowns (perf, 2-core AMD EPYC VM). Keeping such buffers in the heap for reuse
/// (mmap only from 32 MiB, trim only above 256 MiB of free heap top) cut a score
/// pass's page faults 10 779 → 3 398 and its CPU time 503 → 425 ms. Freed buffers are
/// reused by the next allocations; up to 256 MiB of them may stay with the process.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        // Grow the heap 64 MiB at a time: fewer brk calls (address space, not memory).
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn main() -> ExitCode {
    // A closed stdout (`gradshard inspect … | head -1`) ends the program quietly, as for
    // any Unix tool, instead of a panic in println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tune_malloc();
    // Arguments are parsed (and rejected) before any I/O.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    let r = match cli.cmd {
        Cmd::Ingest(a) => storecmd::ingest(a),
        Cmd::Synth(a) => storecmd::synth(a),
        Cmd::Inspect(a) => storecmd::inspect(a),
        Cmd::Verify(a) => storecmd::verify(a),
        Cmd::Salvage(a) => storecmd::salvage(a),
        Cmd::Plan(a) => plan::plan(a),
        Cmd::Score(a) => scorecmd::score(a),
        Cmd::BenchScore(a) => benchscore::bench_score(a),
        Cmd::Grads(a) => gradscmd::grads(a),
        Cmd::Collect(a) => collectcmd::collect(a),
        Cmd::Merge(a) => mergecmd::merge(a),
        Cmd::Demo(a) => democmd::demo(a),
        Cmd::MakeModel(a) => makemodel::make_model(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::from(exit::classify(&e).code())
        }
    }
}

/// The error and its causes, each said once: library errors already name their cause
/// in their own message (`path: cause`), so a cause whose text is already there is
/// not repeated.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let msg = io.to_string();
        let e = anyhow::Error::new(gradshard_store::Error::Io {
            path: "/x/manifest.json".into(),
            source: io,
        })
        .context("inspect /x");
        let r = render_error(&e);
        assert_eq!(r.matches(&msg).count(), 1, "{r}");
        assert!(r.starts_with("inspect /x: /x/manifest.json"), "{r}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
        assert_eq!(human(1536), "1.50 KiB");
    }

    /// Every argument of every subcommand (hidden ones too) says what it is for.
    #[test]
    fn every_flag_has_help_text() {
        use clap::CommandFactory;
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let text = a.get_help().or(a.get_long_help()).map(|h| h.to_string());
                if text.is_none_or(|t| t.trim().is_empty()) {
                    missing.push(format!("{path} --{}", a.get_long().unwrap_or(id)));
                }
            }
            for sub in c.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cli = Cli::command();
        let mut missing = Vec::new();
        walk(&cli, "gradshard", &mut missing);
        assert!(cli.get_subcommands().count() >= 13);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
