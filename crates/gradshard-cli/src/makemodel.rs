//! `make-model`: a seeded random checkpoint (and random token tasks) of a named or
//! given shape, for benchmarks on machines with no model hub — e.g. the 0.89 B
//! LLaMA shape of docs/design.md §6's PyTorch figure, for `collect --device cuda`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gradshard_models::{ModelConfig, WeightDtype};
use serde_json::{json, Value};

/// `--dtype`: element type of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightDtypeArg {
    Bf16,
    F32,
}

#[derive(Args, Debug)]
pub struct MakeModelArgs {
    /// Directory for config.json and model.safetensors (must not hold them yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Named shape (the `synth` presets: tiny, small, llama-0.9b, llama-2-7b,
    /// llama-3-8b, gpt2).
    #[arg(long, default_value = "small", conflicts_with = "config")]
    pub preset: String,
    /// A config.json to use as it is instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Transformer layers (overrides the preset's, e.g. to fit a small machine).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Vocabulary size of a preset model.
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    /// Seed of the random weights and task tokens (same seed, same files).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Element type of the weights: bf16 or f32.
    #[arg(long, value_enum, default_value_t = WeightDtypeArg::Bf16)]
    pub dtype: WeightDtypeArg,
    /// Standard deviation of the 2-D weights (uniform).
    #[arg(long, default_value_t = 0.02)]
    pub std: f32,
    /// Also write `<out>/<task>.jsonl` for these tasks (with --samples > 0).
    #[arg(long, default_value = "math,general")]
    pub tasks: String,
    /// Samples per task file (0: no task files).
    #[arg(long, default_value_t = 0)]
    pub samples: usize,
    /// Tokens per sample in the task files.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
}

/// 44.2 M, 0.89 B, 6.74 B: a parameter count people read at a glance.
fn count(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1} K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} M", n as f64 / 1e6),
        _ => format!("{:.2} B", n as f64 / 1e9),
    }
}

/// `--layers` on a given config: the layer count of the (possibly nested)
/// language model, and its `layer_types` pattern repeated or cut to match.
fn set_layers(config: &mut Value, layers: usize) {
    let target = match config.get_mut("text_config") {
        Some(t) if t.is_object() => t,
        _ => config,
    };
    let key = if target.get("n_layer").is_some() {
        "n_layer"
    } else {
        "num_hidden_layers"
    };
    target[key] = json!(layers);
    if let Some(Value::Array(types)) = target.get("layer_types") {
        if !types.is_empty() {
            let cycled: Vec<Value> = types.iter().cycle().take(layers).cloned().collect();
            target["layer_types"] = Value::Array(cycled);
        }
    }
}

pub fn make_model(a: MakeModelArgs) -> Result<ExitCode> {
    gradshard_store::guard::check_output("--out", &a.out)?;
    let mut config = match &a.config {
        Some(p) => {
            let (_, v) = gradshard_core::model::read_config(p)?;
            v
        }
        None => gradshard_core::model::preset_config(&a.preset, a.layers, a.vocab)?,
    };
    if let (Some(l), Some(_)) = (a.layers, &a.config) {
        set_layers(&mut config, l);
    }
    let dtype = match a.dtype {
        WeightDtypeArg::F32 => WeightDtype::F32,
        WeightDtypeArg::Bf16 => WeightDtype::Bf16,
    };
    let what = || match &a.config {
        Some(p) => format!("model config {}", p.display()),
        None => format!("preset `{}`", a.preset),
    };
    // The description bounds every size before anything is allocated; the bytes
    // to write are known before the first one is, and must fit the disk.
    let cfg_name = match &a.config {
        Some(p) => p.clone(),
        None => a.out.join("config.json"),
    };
    let parsed = ModelConfig::from_value(&cfg_name, &config).with_context(what)?;
    let tasks: Vec<String> = a
        .tasks
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if a.samples > 0 && tasks.is_empty() {
        bail!("--tasks names no task");
    }
    let task_bytes = if a.samples > 0 {
        // A token id is at most 8 digits and a comma (vocab < 2^24), plus the line's frame.
        (tasks.len() as u64)
            .saturating_mul(a.samples as u64)
            .saturating_mul((a.seq as u64).saturating_mul(9).saturating_add(32))
    } else {
        0
    };
    let need = gradshard_models::checkpoint_bytes(&parsed, dtype).saturating_add(task_bytes);
    let free = crate::plan::free_bytes(&a.out)?;
    if need > free {
        eprintln!(
            "make-model: {} needs {} but {} has {} free (short by {}); nothing was written",
            what(),
            crate::human(need),
            a.out.display(),
            crate::human(free),
            crate::human(need - free)
        );
        return Ok(ExitCode::from(3));
    }
    let t0 = std::time::Instant::now();
    let w = gradshard_models::write_random_checkpoint(&a.out, &config, a.seed, dtype, a.std)
        .with_context(what)?;
    println!(
        "make-model: {} tensors, {} parameters, {:.2} GB ({}) in {} ({:.1} s)",
        w.tensors,
        count(w.params as u64),
        w.bytes as f64 / 1e9,
        a.dtype.to_possible_value().expect("not skipped").get_name(),
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    if a.samples > 0 {
        let files = gradshard_models::write_random_tasks(
            &a.out,
            &tasks,
            a.samples,
            a.seq,
            parsed.vocab_size(),
            a.seed,
        )?;
        for f in files {
            println!(
                "  {} ({} samples of {} tokens)",
                f.display(),
                a.samples,
                a.seq
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
