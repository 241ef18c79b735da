//! `plan`: bytes a collection will need, against the free space of the target disk.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use gradshard_core::{DType, Geometry, ModelConfig};
use gradshard_models::{ParamInfo, ParamKind, ParamSet};
use gradshard_store::CodecSpec;

use crate::human;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model directory or its config.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Parameter set: attn, attn,mlp or all-2d (adds embeddings and lm_head).
    #[arg(long, default_value = "attn")]
    pub params: String,
    /// Element type the store will hold: bf16 or f32 (as `collect --dtype`).
    #[arg(long, default_value = "bf16", value_parser = crate::parse_dtype)]
    pub dtype: DType,
    /// Samples to collect (all tasks together). With --task, the task files' samples.
    #[arg(long, required_unless_present = "tasks")]
    pub samples: Option<u64>,
    /// NAME=FILE.jsonl: tokenize a task file with the model's tokenizer, so the factored
    /// representation is estimated from each sample's real length. Repeatable.
    #[arg(long = "task", value_parser = parse_task_file)]
    pub tasks: Vec<(gradshard_core::TaskName, PathBuf)>,
    /// Tokens per sample to assume without --task (the factored size grows with it).
    #[arg(long, default_value_t = 512)]
    pub tokens: u64,
    /// Truncate each sample to this many tokens (as `collect --max-tokens`).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Where the store will live (its disk's free space is checked).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Compression ratio to assume (default: measured on --like, else 1.25 for bf16 and
    /// 1.06 for f32, what this repository's benchmarks measured; see the README).
    #[arg(long, conflicts_with = "like")]
    pub ratio: Option<f64>,
    /// An existing store of similar data: its measured compression ratio is used.
    #[arg(long)]
    pub like: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_task_file(s: &str) -> Result<(gradshard_core::TaskName, PathBuf), String> {
    crate::storecmd::parse_task_path(s, "FILE.jsonl")
}

/// What one sample of a model takes: values as full slices, values per
/// predicted position as factors, and the full values by part.
pub struct SampleSizes {
    pub full: u64,
    pub factored_per_position: u64,
    pub parts: Vec<(String, u64)>,
}

/// The sizes of one sample of the model at `model` (a directory or its
/// config.json) for the parameter set `params`: the store spec `collect` would
/// write (`spec_from_params` over the tensors the model description lists) and
/// `collect`'s own counts of its frames (`full_values`, `factored_values`).
pub fn sample_sizes(model: &Path, params: &str, dtype: DType) -> Result<SampleSizes> {
    let set: ParamSet = params
        .parse()
        .map_err(|_| anyhow::anyhow!("--params `{params}`: expected attn, attn,mlp or all-2d"))?;
    let config = ModelConfig::from_file(model)?;
    let tracked: Vec<ParamInfo> = gradshard_models::config_params(&config)
        .into_iter()
        .filter(|p| p.shape.len() == 2 && set.contains(p.kind))
        .collect();
    let spec = gradshard_collect::spec_from_params(model, &tracked, dtype, CodecSpec::DEFAULT)?;
    let order = spec.frame_order();
    let full = gradshard_collect::full_values(&order);
    // Factor sizes grow linearly with the predicted positions n: count them at n = 1.
    let factored_per_position = gradshard_collect::factored_values(
        &order,
        &vec![1; order.n_frames()],
        &vec![1; order.shared().len()],
    );
    let numel = |kinds: &[ParamKind]| -> u64 {
        tracked
            .iter()
            .filter(|p| kinds.contains(&p.kind))
            .map(|p| p.shape.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    };
    let mut parts = vec![("attention".to_string(), numel(&[ParamKind::Attn]))];
    if set.contains(ParamKind::Mlp) {
        parts.push(("mlp".into(), numel(&[ParamKind::Mlp])));
    }
    if set.contains(ParamKind::Embedding) {
        parts.push((
            "embeddings and lm_head".into(),
            numel(&[ParamKind::Embedding, ParamKind::LmHead]),
        ));
    }
    Ok(SampleSizes {
        full,
        factored_per_position,
        parts,
    })
}

/// Free bytes on the file system holding `p` (or its nearest existing ancestor).
pub fn free_bytes(p: &Path) -> Result<u64> {
    let mut q = p.to_path_buf();
    while !q.exists() {
        if !q.pop() {
            q = PathBuf::from(".");
            break;
        }
    }
    if q.as_os_str().is_empty() {
        q = PathBuf::from(".");
    }
    let c =
        std::ffi::CString::new(q.as_os_str().as_encoded_bytes()).context("path has a NUL byte")?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", q.display()));
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// The compression ratio assumed for `dtype` when none is measured: what this
/// repository's benchmarks measured (README).
fn default_ratio(dtype: DType) -> f64 {
    match dtype {
        DType::Bf16 => 1.25,
        DType::F32 => 1.06,
    }
}

pub fn plan(a: PlanArgs) -> Result<ExitCode> {
    let g = Geometry::from_config_path(&a.model)?;
    let file = if a.model.is_dir() {
        a.model.join("config.json")
    } else {
        a.model.clone()
    };
    // Predicted positions of every sample: from the task files, else --samples × --tokens.
    let lengths: Vec<u64> = if a.tasks.is_empty() {
        let samples = a.samples.unwrap_or(0);
        if samples == 0 {
            bail!("--samples must be at least 1");
        }
        if a.tokens < 2 {
            bail!("--tokens must be at least 2 (one input and one label)");
        }
        vec![a.tokens - 1; samples as usize]
    } else {
        sample_lengths(&a, &file)?
    };
    if lengths.is_empty() {
        bail!("the task files hold no sample of at least 2 tokens");
    }
    let samples = lengths.len() as u64;
    let sizes = sample_sizes(&a.model, &a.params, a.dtype)?;
    let (values, parts) = (sizes.full, sizes.parts);
    let (ratio, ratio_source) = match (&a.ratio, &a.like) {
        (Some(r), _) => (*r, "given with --ratio".to_string()),
        (None, Some(dir)) => {
            let store = gradshard_store::Store::open(dir)
                .with_context(|| format!("--like {}", dir.display()))?;
            let like_dtype = store.manifest().spec.dtype;
            let (mut raw, mut stored) = (0u64, 0u64);
            store.prefetch_tables();
            for r in store.index().records() {
                let f = store.footprint(r)?;
                raw += f.raw_bytes;
                stored += f.stored_bytes;
            }
            if stored == 0 {
                bail!(
                    "--like {}: the store holds no sample to measure",
                    dir.display()
                );
            }
            let measured = raw as f64 / stored as f64;
            if like_dtype == a.dtype {
                (measured, format!("measured on {}", dir.display()))
            } else {
                // A ratio does not carry over between dtypes (f32 mantissas compress
                // worse than bf16's): assume the requested dtype's and say so.
                let assumed = default_ratio(a.dtype);
                (
                    assumed,
                    format!(
                        "assumed for {}: --like {} holds {} samples, whose measured ratio {measured:.2}x does not apply to {} (measure on a {} store)",
                        a.dtype,
                        dir.display(),
                        like_dtype,
                        a.dtype,
                        a.dtype
                    ),
                )
            }
        }
        (None, None) => (
            default_ratio(a.dtype),
            format!(
                "assumed for {} (pass --like STORE to measure it on your data)",
                a.dtype
            ),
        ),
    };
    if !(ratio.is_finite() && ratio > 0.0) {
        bail!("--ratio must be a positive number");
    }
    let size = a.dtype.size() as u64;
    let per_sample = values * size;
    let raw = per_sample * samples;
    let (mut factored, mut auto, mut auto_factored) = (0u64, 0u64, 0u64);
    let per_n = sizes.factored_per_position;
    for n in &lengths {
        let fv = per_n * n;
        factored += fv * size;
        if fv < values {
            auto += fv * size;
            auto_factored += 1;
        } else {
            auto += per_sample;
        }
    }
    // Break-even: the largest n at which factors are still smaller.
    let break_even = values.div_ceil(per_n.max(1)).saturating_sub(1);
    // Frame headers and sample tables: 48 bytes per head slice at most, negligible.
    let estimate = |b: u64| (b as f64 / ratio) as u64;
    let free = free_bytes(&a.dir)?;
    let need = estimate(auto);
    let fits = need <= free;
    let mean_n = lengths.iter().sum::<u64>() as f64 / samples as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "values_per_sample": values, "bytes_per_sample_raw": per_sample, "samples": samples,
                "mean_predicted_positions": mean_n,
                "raw_bytes": raw, "ratio_assumed": ratio, "ratio_source": ratio_source, "estimated_bytes": need,
                "full": {"raw_bytes": raw, "estimated_bytes": estimate(raw)},
                "factored": {"raw_bytes": factored, "estimated_bytes": estimate(factored)},
                "auto": {"raw_bytes": auto, "estimated_bytes": need, "factored_samples": auto_factored, "full_samples": samples - auto_factored},
                "break_even_positions": break_even,
                "free_bytes": free, "fits": fits,
                "parts": parts.iter().map(|(n, v)| serde_json::json!({"part": n, "values": v})).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "model {} ({} layers, D = {}, H = {}, H_kv = {}, d = {}), params {}, {}",
            g.model_type, g.layers, g.hidden, g.heads, g.kv_heads, g.head_dim, a.params, a.dtype
        );
        for (n, v) in &parts {
            println!("  {n:<24} {v:>16} values per sample");
        }
        println!(
            "{samples} samples, {mean_n:.1} predicted positions on average; factors are smaller up to n = {break_even}"
        );
        println!("compression ratio {ratio:.2}x, {ratio_source}");
        println!("  representation     raw          at {ratio:.2}x compression");
        for (name, b) in [("full", raw), ("factored", factored), ("auto", auto)] {
            println!("  {name:<18} {:<12} {}", human(b), human(estimate(b)));
        }
        println!(
            "auto stores {auto_factored} of {samples} samples as factors ({:.1}x fewer bytes than full)",
            raw as f64 / auto.max(1) as f64
        );
        println!(
            "free space   {} on {}: {}",
            human(free),
            a.dir.display(),
            if fits {
                "fits".to_string()
            } else {
                format!("DOES NOT FIT (short by {})", human(need - free))
            }
        );
    }
    Ok(if fits {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Predicted positions (T) of every sample of the task files, tokenized as `collect` does.
fn sample_lengths(a: &PlanArgs, config: &Path) -> Result<Vec<u64>> {
    let dir = config.parent().unwrap_or(Path::new("."));
    let tok_path = dir.join("tokenizer.json");
    let mut out = Vec::new();
    for (task, f) in &a.tasks {
        let tokenizer = if tok_path.exists() {
            Some((
                gradshard_models::load_tokenizer(&tok_path)?,
                tok_path.clone(),
            ))
        } else {
            None
        };
        let reader = gradshard_models::SampleReader::open(
            f,
            tokenizer,
            gradshard_models::ReaderOptions {
                max_tokens: a.max_tokens,
                vocab_size: None,
                max_positions: None,
            },
        )
        .with_context(|| format!("task `{task}`"))?;
        for s in reader {
            let s = s.with_context(|| format!("task `{task}`: {}", f.display()))?;
            out.push(s.predicted() as u64);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn llama2_7b_is_4_3_gb_per_sample_in_bf16() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = json!({"model_type":"llama","num_hidden_layers":32,"hidden_size":4096,
            "num_attention_heads":32,"num_key_value_heads":32,"intermediate_size":11008,"vocab_size":32000});
        let model = dir.path().join("config.json");
        std::fs::write(&model, cfg.to_string()).unwrap();
        let v = sample_sizes(&model, "attn", DType::Bf16).unwrap().full;
        assert_eq!(v, 32 * 4 * 4096 * 4096);
        // docs/design.md §1: 4.3 GB per sample in bf16.
        assert!(((v * 2) as f64 / 1e9 - 4.3).abs() < 0.05);
        let v2 = sample_sizes(&model, "attn,mlp", DType::Bf16).unwrap().full;
        assert_eq!(v2 - v, 32 * 3 * 4096 * 11008);
        assert!(sample_sizes(&model, "bogus", DType::Bf16).is_err());
    }
}
