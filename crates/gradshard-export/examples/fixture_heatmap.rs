//! Scores a fixture model and writes every output: `cargo run -p gradshard-export
//! --example fixture_heatmap -- <model: llama-gqa|gpt2> <out_dir>`.
use std::path::PathBuf;

use gradshard_core::TaskName;
use gradshard_score::fixture::FixtureSource;
use gradshard_score::{score, ScoreOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).map_or("llama-gqa", String::as_str);
    let out = PathBuf::from(args.get(2).map_or("fixture-scores", String::as_str));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(model);
    let src = FixtureSource::open(&root, false)?;
    let mut o = ScoreOptions::new(TaskName::new("math")?, TaskName::new("general")?);
    o.pairs_for = vec![(0, 0)];
    let res = score(&src, &o, &mut |p| eprintln!("{p:?}"))?;
    let w = gradshard_export::write_outputs(&res, &out, &format!("fixture:{model}"))?;
    println!("{} files in {}", w.files.len(), w.dir.display());
    Ok(())
}
