//! `grads`: per-sample gradients from a checkpoint, written as safetensors files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use gradshard_models::{write_grads, Device, GradsOptions, ParamSet, Progress};

use crate::progress::counter;

#[derive(Args, Debug)]
pub struct GradsArgs {
    /// Model directory: config.json, model.safetensors (or a sharded index), tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL task file: {"text"} or {"input_ids"}, optional "id".
    #[arg(long)]
    pub input: PathBuf,
    /// Output directory for <id>.safetensors files.
    #[arg(long)]
    pub out: PathBuf,
    /// Parameter set: attn, attn,mlp or all-2d.
    #[arg(long, default_value = "attn")]
    pub params: ParamSet,
    /// Truncate samples to this many tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Samples per backward pass (1 = one backward per sample).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// cpu, or cuda[:N] in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// CPU engine: `auto` (the native engine for the LLaMA family with attn or
    /// attn,mlp, burn otherwise), `native` (fail if it does not run the model) or `burn`.
    #[arg(long, value_enum, default_value_t = crate::collectcmd::CpuEngineArg::Auto)]
    pub cpu_engine: crate::collectcmd::CpuEngineArg,
}

pub fn grads(a: GradsArgs) -> Result<ExitCode> {
    gradshard_store::guard::check_output("--out", &a.out)?;
    let mut o = GradsOptions::new(a.model.clone(), a.input.clone(), a.out.clone());
    o.params = a.params;
    o.max_tokens = a.max_tokens;
    o.batch = a.batch.max(1);
    o.device = a.device;
    o.cpu_engine = a.cpu_engine.into();
    let bar = counter(0, "grads");
    let r = write_grads(&o, &mut |p| match p {
        Progress::Sample { done, .. } => bar.set_position(done as u64),
        Progress::Skipped { id, line, tokens } => bar.println(format!(
            "skipped sample {id} (line {line}): {tokens} token(s), at least 2 needed"
        )),
        _ => {}
    });
    bar.finish_and_clear();
    let r = r?;
    println!(
        "grads: {} samples written, {} skipped, {} predicted tokens, loss_sum {:.4}, {:.2} s -> {}",
        r.written,
        r.skipped,
        r.tokens,
        r.loss_sum,
        r.elapsed.as_secs_f64(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
