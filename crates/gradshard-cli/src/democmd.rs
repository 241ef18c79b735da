//! `demo`: the whole pipeline on a tiny bundled model, offline, in seconds:
//! collect (burn, per-sample gradients) → store → score → Parquet tables and
//! heatmap pictures.
//!
//! The model (LLaMA architecture with GQA, 2 layers, D = 64, random weights,
//! `tests/fixtures/llama-gqa/model`) and its two 8-sample task files are
//! compiled into the binary, so the demo runs from any directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser};

use crate::collectcmd::{run_collect, CollectArgs};
use crate::scorecmd::ScoreArgs;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the inputs, the store and the scores go.
    #[arg(long, default_value = "gradshard-demo")]
    pub out: PathBuf,
}

const FILES: &[(&str, &[u8])] = &[
    (
        "model/config.json",
        include_bytes!("../../../tests/fixtures/llama-gqa/model/config.json"),
    ),
    (
        "model/generation_config.json",
        include_bytes!("../../../tests/fixtures/llama-gqa/model/generation_config.json"),
    ),
    (
        "model/model.safetensors",
        include_bytes!("../../../tests/fixtures/llama-gqa/model/model.safetensors"),
    ),
    (
        "model/tokenizer.json",
        include_bytes!("../../../tests/fixtures/llama-gqa/model/tokenizer.json"),
    ),
    (
        "tasks/math.jsonl",
        include_bytes!("../../../tests/fixtures/llama-gqa/tasks/math.jsonl"),
    ),
    (
        "tasks/general.jsonl",
        include_bytes!("../../../tests/fixtures/llama-gqa/tasks/general.jsonl"),
    ),
];

fn write_inputs(dir: &Path) -> Result<()> {
    for (rel, bytes) in FILES {
        let p = dir.join(rel);
        if std::fs::read(&p).ok().as_deref() == Some(*bytes) {
            continue;
        }
        let parent = p.parent().expect("file in a folder");
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[derive(Parser)]
struct Wrap<T: clap::Args> {
    #[command(flatten)]
    a: T,
}

fn parse<T: clap::Args>(args: &[&str]) -> Result<T> {
    Ok(Wrap::<T>::try_parse_from(std::iter::once("gradshard").chain(args.iter().copied()))?.a)
}

pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    let t = std::time::Instant::now();
    let inputs = a.out.join("inputs");
    write_inputs(&inputs)?;
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let model = s(inputs.join("model"));
    let math = format!("math={}", s(inputs.join("tasks/math.jsonl")));
    let general = format!("general={}", s(inputs.join("tasks/general.jsonl")));
    let store = s(a.out.join("store"));
    let scores = s(a.out.join("scores"));
    println!(
        "demo: tiny LLaMA-GQA model (2 layers, 4 heads, 2 kv heads, D = 64), tasks math and general (8 samples each)"
    );
    println!("step 1/2: collect per-sample gradients of attention and MLP weights into {store}");
    let c: CollectArgs = parse(&[
        "--model", &model, "--task", &math, "--task", &general, "--store", &store, "--params",
        "attn,mlp", "--dtype", "f32",
    ])?;
    run_collect(&c)?;
    println!("step 2/2: score QK-OV interference math vs general into {scores}");
    let sc: ScoreArgs = parse(&[
        "--store",
        &store,
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        &scores,
        "--overwrite",
        "--mlp-fisher",
        "--min-samples",
        "8",
    ])?;
    crate::scorecmd::score(sc)?;
    println!();
    println!("demo done in {:.1} s.", t.elapsed().as_secs_f64());
    println!("  Parquet tables : {scores}/*.parquet (heatmap, top_pairs, pairs, diagnostics, group_fisher, masks, overlap)");
    println!("  heatmaps       : {scores}/heatmap_Q.png, heatmap_K.png, heatmap_V.png, heatmap_O.png (and .svg)");
    println!("  summary        : {scores}/summary.json");
    println!("  store          : {store} (try: gradshard inspect --store {store})");
    println!("  Fisher stats   : {store}/stats/math.json, {store}/stats/general.json");
    Ok(ExitCode::SUCCESS)
}
