//! `make-model`: a seeded random checkpoint (and random token tasks) of a named or
//! given shape, for benchmarks on machines with no model hub — e.g. the 0.89 B
//! LLaMA shape of docs/design.md §6's PyTorch figure, for `collect --device cuda`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gradshard_models::WeightDtype;
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

/// The Hugging Face config of a `synth` preset.
fn preset_config(a: &MakeModelArgs) -> Result<Value> {
    let (g, ff) = gradshard_store::synth::preset(&a.preset)?;
    let layers = a.layers.unwrap_or(g.layers);
    Ok(if g.model_type == "gpt2" {
        json!({"model_type": "gpt2", "n_embd": g.hidden, "n_layer": layers, "n_head": g.heads,
               "n_inner": ff, "n_positions": 1024, "vocab_size": a.vocab,
               "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"})
    } else {
        json!({"model_type": g.model_type, "hidden_size": g.hidden, "intermediate_size": ff,
               "num_hidden_layers": layers, "num_attention_heads": g.heads,
               "num_key_value_heads": g.kv_heads, "head_dim": g.head_dim,
               "vocab_size": a.vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "max_position_embeddings": 4096, "tie_word_embeddings": false,
               "hidden_act": "silu"})
    })
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
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{}: not JSON", p.display()))?
        }
        None => preset_config(&a)?,
    };
    if let (Some(l), Some(_)) = (a.layers, &a.config) {
        set_layers(&mut config, l);
    }
    let dtype = match a.dtype {
        WeightDtypeArg::F32 => WeightDtype::F32,
        WeightDtypeArg::Bf16 => WeightDtype::Bf16,
    };
    let t0 = std::time::Instant::now();
    let w = gradshard_models::write_random_checkpoint(&a.out, &config, a.seed, dtype, a.std)
        .with_context(|| match &a.config {
            Some(p) => format!("model config {}", p.display()),
            None => format!("preset `{}`", a.preset),
        })?;
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
        let tasks: Vec<String> = a
            .tasks
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if tasks.is_empty() {
            bail!("--tasks names no task");
        }
        // A nested (gemma3) config keeps the vocabulary in its text config.
        let text = gradshard_core::nested_text_config(&config)?.unwrap_or_else(|| config.clone());
        let vocab = text
            .get("vocab_size")
            .and_then(Value::as_u64)
            .context("the config has no vocab_size")? as usize;
        let files =
            gradshard_models::write_random_tasks(&a.out, &tasks, a.samples, a.seq, vocab, a.seed)?;
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
