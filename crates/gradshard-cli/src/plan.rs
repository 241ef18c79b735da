//! `plan`: bytes a collection will need, against the free space of the target disk.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use gradshard_core::{DType, Geometry, Layout};
use serde_json::Value;

use crate::human;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model directory or its config.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Parameter set: attn, attn,mlp or all-2d (adds embeddings and lm_head).
    #[arg(long, default_value = "attn")]
    pub params: String,
    #[arg(long, default_value = "bf16", value_parser = crate::parse_dtype)]
    pub dtype: DType,
    /// Samples to collect (all tasks together).
    #[arg(long)]
    pub samples: u64,
    /// Where the store will live (its disk's free space is checked).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Compression ratio to assume (default: 1.46 for bf16, 1.10 for f32; see the README's measurements).
    #[arg(long)]
    pub ratio: Option<f64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn get(cfg: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_u64))
}

/// Values per sample of the parameter set.
pub fn values_per_sample(
    g: &Geometry,
    cfg: &Value,
    params: &str,
) -> Result<(u64, Vec<(String, u64)>)> {
    let (l, d, h, kv, hd) = (
        g.layers as u64,
        g.hidden as u64,
        g.heads as u64,
        g.kv_heads as u64,
        g.head_dim as u64,
    );
    let attn = l * (2 * h * hd * d + 2 * kv * hd * d);
    let mut parts = vec![("attention".to_string(), attn)];
    let want_mlp = match params {
        "attn" => false,
        "attn,mlp" | "mlp,attn" | "all-2d" => true,
        other => bail!("--params `{other}`: expected attn, attn,mlp or all-2d"),
    };
    if want_mlp {
        let inter = get(cfg, &["intermediate_size", "n_inner"]).unwrap_or(4 * d);
        let per_layer = match (g.layout, g.model_type.as_str()) {
            (Layout::SplitLinear, "bert")
            | (Layout::Gpt2Conv1d, _)
            | (Layout::NeoxInterleaved, _) => 2 * d * inter,
            _ => 3 * d * inter,
        };
        parts.push(("mlp".into(), l * per_layer));
    }
    if params == "all-2d" {
        let vocab = get(cfg, &["vocab_size"])
            .context("config.json has no vocab_size (needed for all-2d)")?;
        let tied = cfg
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(g.layout == Layout::Gpt2Conv1d);
        let mut emb = vocab * d * if tied { 1 } else { 2 };
        if let Some(pos) = get(cfg, &["n_positions"]).filter(|_| g.layout == Layout::Gpt2Conv1d) {
            emb += pos * d;
        }
        parts.push(("embeddings and lm_head".into(), emb));
    }
    Ok((parts.iter().map(|p| p.1).sum(), parts))
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

pub fn plan(a: PlanArgs) -> Result<ExitCode> {
    let g = Geometry::from_config_path(&a.model)?;
    let file = if a.model.is_dir() {
        a.model.join("config.json")
    } else {
        a.model.clone()
    };
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", file.display()))?;
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let (values, parts) = values_per_sample(&g, &cfg, &a.params)?;
    let ratio = a.ratio.unwrap_or(match a.dtype {
        DType::Bf16 => 1.46,
        DType::F32 => 1.10,
    });
    if !(ratio.is_finite() && ratio > 0.0) {
        bail!("--ratio must be a positive number");
    }
    let per_sample = values * a.dtype.size() as u64;
    let raw = per_sample * a.samples;
    // Frame headers and sample tables: 48 bytes per head slice at most, negligible.
    let estimate = (raw as f64 / ratio) as u64;
    let free = free_bytes(&a.dir)?;
    let fits = estimate <= free;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "values_per_sample": values, "bytes_per_sample_raw": per_sample, "samples": a.samples,
                "raw_bytes": raw, "ratio_assumed": ratio, "estimated_bytes": estimate,
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
        println!("per sample   {} raw", human(per_sample));
        println!(
            "{} samples {} raw; at {ratio:.2}x compression about {}",
            a.samples,
            human(raw),
            human(estimate)
        );
        println!(
            "free space   {} on {}: {}",
            human(free),
            a.dir.display(),
            if fits {
                "fits".to_string()
            } else {
                format!("DOES NOT FIT (short by {})", human(estimate - free))
            }
        );
    }
    Ok(if fits {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn llama2_7b_is_4_3_gb_per_sample_in_bf16() {
        let cfg = json!({"model_type":"llama","num_hidden_layers":32,"hidden_size":4096,
            "num_attention_heads":32,"num_key_value_heads":32,"intermediate_size":11008,"vocab_size":32000});
        let g = Geometry::from_config(&cfg).unwrap();
        let (v, _) = values_per_sample(&g, &cfg, "attn").unwrap();
        assert_eq!(v, 32 * 4 * 4096 * 4096);
        // DESIGN §1: 4.3 GB per sample in bf16.
        assert!(((v * 2) as f64 / 1e9 - 4.3).abs() < 0.05);
        let (v2, _) = values_per_sample(&g, &cfg, "attn,mlp").unwrap();
        assert_eq!(v2 - v, 32 * 3 * 4096 * 11008);
        assert!(values_per_sample(&g, &cfg, "bogus").is_err());
    }
}
