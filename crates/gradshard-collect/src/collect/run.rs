//! `gradshard collect`: model → per-sample gradients → frames → the store's
//! writer pipeline (bounded queue → compression workers → appender), with the
//! per-sample Fisher sums logged for the statistics.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use gradshard_core::{Block, DType, Geometry, OtherTensor, SampleId, TaskName};
use gradshard_models::{
    load_tokenizer, GradModel, ParamInfo, ReaderOptions, SampleFactors, SampleGrads, SampleReader,
};
use gradshard_store::sink::{FactorSample, Factors, GradSample, Gradient};
use gradshard_store::{
    stats, CodecSpec, RepresentationChoice, SampleSink, SinkOptions, SkippedSample, StoreSpec,
    StoreWriter,
};

use super::{CollectEvent, CollectOptions, CollectReport};
use crate::error::{Error, Result};

fn to_core_id(task: &TaskName, id: &gradshard_models::SampleId, line: usize) -> Result<SampleId> {
    Ok(match id {
        gradshard_models::SampleId::Int(v) => SampleId::Int(*v),
        gradshard_models::SampleId::Str(v) => SampleId::string(v.clone())
            .map_err(|e| Error::InvalidArgument(format!("task `{task}` line {line}: {e}")))?,
    })
}

/// The store spec of a model's tracked parameters: every attention tensor of the
/// geometry (all must be tracked), plus every other tracked 2-D tensor as row
/// groups, sorted by name (the order `ingest` uses).
pub fn spec_from_params(
    model_dir: &Path,
    tracked: &[ParamInfo],
    dtype: DType,
    codec: CodecSpec,
) -> Result<StoreSpec> {
    let mut g = Geometry::from_config_path(model_dir)?;
    g.detect_root(tracked.iter().map(|p| p.name.as_str()));
    let attn = g.all_attn_tensors();
    for t in &attn {
        let p = tracked.iter().find(|p| p.name == t.name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: attention tensor `{}` is not among the model's tracked parameters",
                model_dir.display(),
                t.name
            ))
        })?;
        g.check_shape(t, &p.shape)?;
    }
    let mut others: Vec<OtherTensor> = tracked
        .iter()
        .filter(|p| !attn.iter().any(|t| t.name == p.name))
        .filter_map(|p| match p.shape.as_slice() {
            [r, c] if *r > 0 && *c > 0 => Some(OtherTensor::new(
                p.name.clone(),
                [*r, *c],
                g.out_axis_of(&p.name),
            )),
            _ => None,
        })
        .collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(StoreSpec {
        geometry: g,
        dtype,
        codec,
        blocks: Block::ALL.to_vec(),
        other_tensors: others,
    })
}

/// Non-empty lines of a JSONL file (an upper bound of its samples, for ETA).
fn count_lines(path: &Path) -> Result<u64> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).map_err(crate::error::io(path))?;
    let mut n = 0;
    for l in std::io::BufReader::new(f).lines() {
        if !l.map_err(crate::error::io(path))?.trim().is_empty() {
            n += 1;
        }
    }
    Ok(n)
}


/// Bytes of memory available to this process (MemAvailable), where /proc says.
fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses a sample whose forward and backward would need more memory than the
/// machine has, before anything is allocated for it (one line of 10⁶ tokens used to
/// abort the process inside the allocator). The estimate is deliberately rough but
/// on the low side: per layer, the attention scores, probabilities and their
/// gradient (3 · heads · T² f32), and about 16 · D f32 of activations per token
/// (residual, norms, q/k/v/o, the MLP at 4·D, and their gradients), times the batch.
pub struct MemoryGuard {
    layers: u64,
    heads: u64,
    hidden: u64,
    batch: u64,
    available: Option<u64>,
}

impl MemoryGuard {
    pub fn new(g: &gradshard_core::Geometry, batch: usize, available: Option<u64>) -> MemoryGuard {
        MemoryGuard {
            layers: g.layers as u64,
            heads: g.heads as u64,
            hidden: g.hidden as u64,
            batch: batch.max(1) as u64,
            available,
        }
    }

    /// Estimated bytes to compute one batch of sequences of `tokens` tokens.
    pub fn estimate(&self, tokens: u64) -> u64 {
        let t = tokens.saturating_sub(1);
        let attn = 3u64
            .saturating_mul(self.heads)
            .saturating_mul(t.saturating_mul(t));
        let act = 16u64.saturating_mul(self.hidden).saturating_mul(t);
        attn.saturating_add(act)
            .saturating_mul(4)
            .saturating_mul(self.layers)
            .saturating_mul(self.batch)
    }

    /// The longest sample whose estimate fits in `budget` bytes.
    pub fn longest_fitting(&self, budget: u64) -> u64 {
        let (mut lo, mut hi) = (2u64, 1u64 << 32);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.estimate(mid) <= budget {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    pub fn check(&self, task: &TaskName, id: &SampleId, tokens: usize) -> Result<()> {
        let Some(avail) = self.available else {
            return Ok(());
        };
        let need = self.estimate(tokens as u64);
        if need <= avail {
            return Ok(());
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        Err(Error::Sample {
            task: task.clone(),
            id: id.clone(),
            what: format!(
                "{tokens} tokens would need about {:.1} GiB to compute (estimate: attention 3·heads·T² and 16·D·T activations per layer, f32, x batch {}), more than the {:.1} GiB available; truncate with --max-tokens {} (or a smaller --batch)",
                gib(need),
                self.batch,
                gib(avail),
                self.longest_fitting(avail)
            ),
        })
    }
}

/// Runs a collection; see the module docs. Rerunning the same options after a
/// crash continues: committed (task, id) pairs are not recomputed.
pub fn collect(
    opts: &CollectOptions,
    progress: &mut dyn FnMut(CollectEvent),
) -> Result<CollectReport> {
    let start = Instant::now();
    if opts.tasks.is_empty() {
        return Err(Error::InvalidArgument(
            "at least one --task is needed".into(),
        ));
    }
    for (i, (t, _)) in opts.tasks.iter().enumerate() {
        if opts.tasks[..i].iter().any(|(u, _)| u == t) {
            return Err(Error::InvalidArgument(format!("task `{t}` is given twice")));
        }
    }
    if opts.batch == 0 {
        return Err(Error::InvalidArgument("--batch must be >= 1".into()));
    }
    if matches!(opts.max_tokens, Some(0 | 1)) {
        return Err(Error::InvalidArgument(
            "--max-tokens must be >= 2 (one input and one label)".into(),
        ));
    }
    for (t, f) in &opts.tasks {
        if !f.is_file() {
            return Err(Error::InvalidArgument(format!(
                "task `{t}`: {} is not a file",
                f.display()
            )));
        }
    }
    let model = GradModel::load_with(&opts.model_dir, opts.device, opts.params, opts.cpu_engine)?;
    let engine = model.engine_name();
    let tracked = model.tracked_params();
    let spec = spec_from_params(&opts.model_dir, &tracked, opts.dtype, opts.codec)?;
    let mut wopts = opts.writer.clone();
    if wopts.source.is_null() {
        wopts.source = serde_json::json!({
            "kind": "collect",
            "model": opts.model_dir.display().to_string(),
            "params": format!("{:?}", opts.params),
            "tasks": opts.tasks.iter().map(|(t, f)| (t.to_string(), f.display().to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            "max_tokens": opts.max_tokens,
            "max_samples": opts.max_samples,
        });
    }
    let sink_opts = SinkOptions {
        nan_policy: opts.nan_policy,
        representation: opts.representation,
    };
    // The sink refuses `factored` for a format-1 store before any compute, and opens
    // the side log while this process holds the store's LOCK.
    let sink = if opts.model_only {
        SampleSink::without_store(&spec, sink_opts)
    } else {
        SampleSink::new(
            StoreWriter::open_or_create(&opts.store, &spec, wopts)?,
            sink_opts,
        )?
    };
    let representation = sink.representation();
    let dtype = sink.dtype();
    let memory_guard = MemoryGuard::new(sink.order().geometry(), opts.batch, available_memory());
    let sink = RefCell::new(sink);

    // Plan for the progress display: lines per task after split and cap.
    let mut planned = 0u64;
    for (_, f) in &opts.tasks {
        let lines = count_lines(f)?;
        let lines = opts.max_samples.map_or(lines, |m| lines.min(m as u64));
        let (k, n) = (opts.worker.k as u64, opts.worker.n as u64);
        planned += lines / n + u64::from(lines % n > k);
    }
    let tok_path = opts.model_dir.join("tokenizer.json");
    let values_per_sample: u64 = tracked
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();

    let mut resumed = 0u64;
    let mut started = false;
    let mut compute_total = Duration::ZERO;
    for (task, file) in &opts.tasks {
        let tokenizer = if tok_path.exists() {
            Some((load_tokenizer(&tok_path)?, tok_path.clone()))
        } else {
            None
        };
        let mut reader = SampleReader::open(
            file,
            tokenizer,
            ReaderOptions {
                max_tokens: opts.max_tokens,
                vocab_size: Some(model.config().vocab_size()),
                max_positions: model.config().max_positions(),
            },
        )?;
        // Decide which samples this run computes: index cap, worker share, resume.
        let mut idx = 0usize;
        let mut id_err: Option<Error> = None;
        {
            let mut resumed_here = 0u64;
            let iter = std::iter::from_fn(|| loop {
                let item = reader.next()?;
                let s = match item {
                    Err(e) => return Some(Err(e)),
                    Ok(s) => s,
                };
                let i = idx;
                idx += 1;
                if opts.max_samples.is_some_and(|m| i >= m) {
                    return None;
                }
                if i % opts.worker.n != opts.worker.k {
                    continue;
                }
                let id = match to_core_id(task, &s.id, s.line) {
                    Ok(id) => id,
                    Err(e) => {
                        id_err = Some(e);
                        return None;
                    }
                };
                if let Err(e) = memory_guard.check(task, &id, s.ids.len()) {
                    id_err = Some(e);
                    return None;
                }
                if sink.borrow().is_committed(task, &id) {
                    resumed_here += 1;
                    continue;
                }
                return Some(Ok(s));
            });
            if !started {
                started = true;
                progress(CollectEvent::Started {
                    planned,
                    values_per_sample,
                });
            }
            let mut sink_err: Option<Error> = None;
            let t_task = Instant::now();
            let mut in_sink = Duration::ZERO;
            let mut handle = |got: Got| {
                let ts = Instant::now();
                let res = (|| -> Result<()> {
                    let raw_id = match &got {
                        Got::Grads(g) => &g.id,
                        Got::Factors(f) => &f.id,
                    };
                    let id = to_core_id(task, raw_id, 0)?;
                    let done_id = id.clone();
                    let mut sink = sink.borrow_mut();
                    let kept = match got {
                        Got::Grads(g) => sink.put(task, id, grad_sample(g))?,
                        Got::Factors(f) => sink.put_factors(task, id, factor_sample(f))?,
                    };
                    if kept {
                        progress(CollectEvent::Sample {
                            task: task.clone(),
                            id: done_id,
                            done: sink.stored(),
                        });
                    } else if let Some(s) = sink.skipped().last() {
                        progress(CollectEvent::Skipped {
                            task: s.task.clone(),
                            id: s.id.clone(),
                            why: s.why.clone(),
                        });
                    }
                    Ok(())
                })();
                in_sink += ts.elapsed();
                res.map_err(|e| {
                    let msg = e.to_string();
                    sink_err = Some(e);
                    gradshard_models::Error::InvalidArgument(msg)
                })
            };
            let r = if representation == RepresentationChoice::Full {
                model.for_each_grads(iter, opts.batch, |g| handle(Got::Grads(g)))
            } else {
                model.for_each_factors(iter, opts.batch, |f| handle(Got::Factors(f)))
            };
            compute_total += t_task.elapsed().saturating_sub(in_sink);
            if let Some(e) = sink_err {
                return Err(e);
            }
            if let Some(e) = id_err.take() {
                return Err(e);
            }
            r?;
            resumed += resumed_here;
        }
        if reader.samples_read() == 0 && reader.skipped().is_empty() {
            progress(CollectEvent::Warning(format!(
                "task `{task}`: {} holds no sample",
                file.display()
            )));
        }
        if reader.ids_from_lines() > 0 {
            progress(CollectEvent::Warning(format!(
                "task `{task}`: {} of {} samples in {} have no \"id\"; their 0-based line index is used as their id",
                reader.ids_from_lines(),
                reader.samples_read(),
                file.display()
            )));
        }
        for s in reader.skipped() {
            let id = match &s.id {
                gradshard_models::SampleId::Int(v) => SampleId::Int(*v),
                gradshard_models::SampleId::Str(v) => SampleId::Str(v.clone()),
            };
            let why = format!(
                "{} token(s) at line {}: needs at least 2 (one input, one label)",
                s.tokens, s.line
            );
            progress(CollectEvent::Skipped {
                task: task.clone(),
                id: id.clone(),
                why: why.clone(),
            });
            sink.borrow_mut().skip(SkippedSample {
                task: task.clone(),
                id,
                why,
            });
        }
    }
    progress(CollectEvent::Finishing);
    let done = sink.into_inner().finish()?;
    let mut full_fisher = Vec::new();
    if opts.full_fisher && !opts.model_only {
        let store = gradshard_store::Store::open(&opts.store)?;
        for t in store.tasks() {
            full_fisher.push(stats::write_full_fisher(&store, &t)?);
        }
    }
    Ok(CollectReport {
        engine,
        write: done.write,
        stored: done.stored,
        resumed,
        skipped: done.skipped,
        compute_time: compute_total,
        prepare_time: done.prepare_time.saturating_sub(done.blocked_time),
        blocked_time: done.blocked_time,
        elapsed: start.elapsed(),
        stats: done.stats,
        full_fisher,
        values_per_sample,
        dtype_bytes: dtype.size() as u64,
        full_samples: done.full_samples,
        factored_samples: done.factored_samples,
        values_stored: done.values_stored,
    })
}

/// The model's gradients of one sample as the sink takes them (the vectors move).
fn grad_sample(g: SampleGrads) -> GradSample {
    GradSample {
        tokens: g.tokens,
        loss_sum: g.loss_sum,
        grads: g
            .grads
            .into_iter()
            .map(|t| Gradient {
                name: t.name,
                shape: t.shape,
                data: t.data,
            })
            .collect(),
    }
}

/// The model's factors of one sample as the sink takes them (the vectors move).
fn factor_sample(f: SampleFactors) -> FactorSample {
    FactorSample {
        tokens: f.tokens,
        loss_sum: f.loss_sum,
        factors: f
            .factors
            .into_iter()
            .map(|t| Factors {
                name: t.name,
                shape: t.shape,
                n: t.n,
                a: t.a,
                b: t.b,
            })
            .collect(),
    }
}

/// What the model hands the sink: gradients (`--representation full`) or factors.
enum Got {
    Grads(SampleGrads),
    Factors(SampleFactors),
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn a_sample_too_long_for_memory_is_refused_naming_the_longest_that_fits() {
        let cfg = serde_json::json!({"model_type":"llama","num_hidden_layers":32,"hidden_size":4096,
            "num_attention_heads":32,"num_key_value_heads":8});
        let g = Geometry::from_config(&cfg).unwrap();
        let avail = 24u64 << 30;
        let guard = MemoryGuard::new(&g, 1, Some(avail));
        let t = TaskName::new("math").unwrap();
        guard.check(&t, &SampleId::Int(1), 512).unwrap();
        let e = guard
            .check(&t, &SampleId::Int(7), 1_000_000)
            .unwrap_err()
            .to_string();
        let n = guard.longest_fitting(avail);
        assert!(guard.estimate(n) <= avail && guard.estimate(n + 1) > avail);
        assert!(
            e.contains("task `math` sample 7")
                && e.contains("1000000 tokens")
                && e.contains(&format!("--max-tokens {n}")),
            "{e}"
        );
        // A batch of 8 needs 8 times the memory: the longest sample shrinks.
        let b8 = MemoryGuard::new(&g, 8, Some(avail));
        assert!(b8.longest_fitting(avail) < n);
        // Without a memory figure nothing is refused.
        MemoryGuard::new(&g, 1, None)
            .check(&t, &SampleId::Int(7), 1_000_000)
            .unwrap();
    }

}
