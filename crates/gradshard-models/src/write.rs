//! `gradshard grads`: write each sample's gradients as `<id>.safetensors`
//! (HF tensor names, F32, metadata `tokens` = T and `loss_sum` in nats, both
//! as decimal strings), the layout of the reference fixtures' `grads/<task>/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::data::{load_tokenizer, ReaderOptions, SampleId, SampleReader};
use crate::device::{Device, GradModel};
use crate::error::{Error, Result};
use crate::grads::SampleGrads;
use crate::layers::ParamSet;

/// Options of [`write_grads`]; mirrors the CLI flags.
#[derive(Debug, Clone)]
pub struct GradsOptions {
    /// Model directory: config.json, model.safetensors (or sharded), tokenizer.json.
    pub model_dir: PathBuf,
    /// JSONL task file.
    pub input: PathBuf,
    /// Output directory (created if missing).
    pub out_dir: PathBuf,
    pub params: ParamSet,
    /// Truncate each sample to this many tokens.
    pub max_tokens: Option<usize>,
    /// Samples per backward pass (1 = reference loop).
    pub batch: usize,
    pub device: Device,
    /// Which engine runs the model on the CPU.
    pub cpu_engine: crate::device::CpuEngine,
}

impl GradsOptions {
    /// Defaults: attention weights, no truncation, batch 1, CPU.
    pub fn new(
        model_dir: impl Into<PathBuf>,
        input: impl Into<PathBuf>,
        out_dir: impl Into<PathBuf>,
    ) -> Self {
        GradsOptions {
            model_dir: model_dir.into(),
            input: input.into(),
            out_dir: out_dir.into(),
            params: ParamSet::Attn,
            max_tokens: None,
            batch: 1,
            device: Device::Cpu,
            cpu_engine: crate::device::CpuEngine::Auto,
        }
    }
}

/// Progress events for a UI.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The model is loaded; `tracked` tensors (of `values` f32 each sample) will be written.
    Loaded {
        tracked: usize,
        values_per_sample: usize,
    },
    /// A sample's file was written.
    Sample {
        /// Samples written so far, this one included.
        done: usize,
        id: SampleId,
        tokens: usize,
        loss_sum: f64,
        path: PathBuf,
    },
    /// A sample was skipped (fewer than 2 tokens).
    Skipped {
        id: SampleId,
        line: usize,
        tokens: usize,
    },
}

/// Summary of a [`write_grads`] run.
#[derive(Debug, Clone, PartialEq)]
pub struct GradsReport {
    pub written: usize,
    pub skipped: usize,
    /// Σ T over written samples.
    pub tokens: usize,
    /// Σ loss_sum over written samples (nats).
    pub loss_sum: f64,
    pub elapsed: Duration,
}

/// Writes one sample's gradients to `dir/<id>.safetensors` through a temp
/// file and a rename, so a crash never leaves a partial `<id>.safetensors`.
pub fn write_sample(dir: &Path, g: &SampleGrads) -> Result<PathBuf> {
    let stem = g.id.file_stem().ok_or_else(|| Error::Output {
        path: dir.to_path_buf(),
        msg: format!(
            "sample id {:?} cannot be used as a file name",
            g.id.to_string()
        ),
    })?;
    let path = dir.join(format!("{stem}.safetensors"));
    let tmp = dir.join(format!(".{stem}.safetensors.tmp"));
    let bytes: Vec<Vec<u8>> = g
        .grads
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(g.grads.len());
    for (t, b) in g.grads.iter().zip(&bytes) {
        let v = TensorView::new(Dtype::F32, t.shape.clone(), b).map_err(|e| Error::Output {
            path: path.clone(),
            msg: format!("tensor {}: {e}", t.name),
        })?;
        views.push((t.name.clone(), v));
    }
    let meta = HashMap::from([
        ("tokens".to_string(), g.tokens.to_string()),
        ("loss_sum".to_string(), g.loss_sum.to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| Error::Output {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Implements `gradshard grads`: stream samples from `opts.input`, compute
/// per-sample gradients `opts.batch` at a time, write one file per sample.
pub fn write_grads(opts: &GradsOptions, progress: &mut dyn FnMut(Progress)) -> Result<GradsReport> {
    let start = Instant::now();
    if opts.batch == 0 {
        return Err(Error::InvalidArgument("batch size must be >= 1".into()));
    }
    if opts.max_tokens == Some(0) || opts.max_tokens == Some(1) {
        return Err(Error::InvalidArgument(
            "max_tokens must be >= 2 (one input and one label)".into(),
        ));
    }
    let model = GradModel::load_with(&opts.model_dir, opts.device, opts.params, opts.cpu_engine)?;
    let tracked = model.tracked_params();
    progress(Progress::Loaded {
        tracked: tracked.len(),
        values_per_sample: tracked
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum(),
    });
    let tok_path = opts.model_dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some((load_tokenizer(&tok_path)?, tok_path))
    } else {
        None
    };
    let mut reader = SampleReader::open(
        &opts.input,
        tokenizer,
        ReaderOptions {
            max_tokens: opts.max_tokens,
            vocab_size: Some(model.config().vocab_size()),
            max_positions: model.config().max_positions(),
        },
    )?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;

    let mut report = GradsReport {
        written: 0,
        skipped: 0,
        tokens: 0,
        loss_sum: 0.0,
        elapsed: Duration::ZERO,
    };
    let mut reported_skips = 0;
    loop {
        // Read one chunk, reporting skips as they happen.
        let mut chunk = Vec::with_capacity(opts.batch);
        for s in reader.by_ref() {
            chunk.push(s?);
            if chunk.len() == opts.batch {
                break;
            }
        }
        for s in &reader.skipped()[reported_skips..] {
            progress(Progress::Skipped {
                id: s.id.clone(),
                line: s.line,
                tokens: s.tokens,
            });
        }
        reported_skips = reader.skipped().len();
        if chunk.is_empty() {
            break;
        }
        for g in model.grads(&chunk)? {
            let path = write_sample(&opts.out_dir, &g)?;
            report.written += 1;
            report.tokens += g.tokens;
            report.loss_sum += g.loss_sum;
            progress(Progress::Sample {
                done: report.written,
                id: g.id,
                tokens: g.tokens,
                loss_sum: g.loss_sum,
                path,
            });
        }
    }
    report.skipped = reader.skipped().len();
    report.elapsed = start.elapsed();
    Ok(report)
}
