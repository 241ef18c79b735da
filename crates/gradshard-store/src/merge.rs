//! `gradshard merge`: combine stores of one model (e.g. the `--worker k/N`
//! shares of a job array) into one.
//!
//! Every frame is decoded, checksum-verified and handed to a fresh writer in its
//! own representation (full frames, or a factored sample's factors) (so
//! the output is a normal store with its own shards, log and manifest; bf16
//! values round-trip exactly). The statistics of the output are the inputs'
//! per-task statistics combined with Chan's parallel Welford formula. A
//! (task, id) held by two inputs, or inputs of different geometry, dtype,
//! blocks or tensor sets, are refused before anything is written. An
//! interrupted merge is resumed by rerunning it: samples already committed to
//! the output are skipped. Until a merge finishes, its output carries an
//! `UNFINISHED` marker that readers and `verify` refuse.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use gradshard_core::{SampleId, TaskName};

use crate::{Representation, SampleMeta, Store, StoreWriter, WriteReport, WriterOptions};
// `gradshard_store::` in the code below names this crate.
use crate as gradshard_store;

use crate::error::{Error, Result};
use crate::stats::{self, SideLog, StatsLayout, TaskStats, Welford};

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub write: WriteReport,
    pub inputs: usize,
    /// Samples copied by this run.
    pub copied: u64,
    /// Samples already in the output (resumed merge).
    pub already: u64,
    pub stats_files: Vec<PathBuf>,
    pub tasks: Vec<TaskStats>,
}

#[derive(Debug, Clone)]
pub enum MergeEvent {
    Started { total: u64 },
    Sample { done: u64 },
}

fn same_canonical(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Merges `inputs` into the store at `out` (created if absent).
pub fn merge(
    out: &Path,
    inputs: &[PathBuf],
    wopts: WriterOptions,
    progress: &mut dyn FnMut(MergeEvent),
) -> Result<MergeReport> {
    if inputs.is_empty() {
        return Err(Error::Merge("no input stores".into()));
    }
    for (i, p) in inputs.iter().enumerate() {
        if same_canonical(p, out) {
            return Err(Error::Merge(format!(
                "input {} is the output store",
                p.display()
            )));
        }
        if inputs[..i].iter().any(|q| same_canonical(p, q)) {
            return Err(Error::Merge(format!(
                "input {} is given twice",
                p.display()
            )));
        }
    }
    let stores = inputs
        .iter()
        .map(|p| Store::open(p).map_err(Error::from))
        .collect::<Result<Vec<_>>>()?;
    let spec0 = stores[0].manifest().spec.clone();
    for (s, p) in stores.iter().zip(inputs).skip(1) {
        let sp = &s.manifest().spec;
        let what = if sp.geometry != spec0.geometry {
            let show = |g: &gradshard_core::Geometry| {
                format!(
                    "{} ({:?}), {} layers, D {}, {} heads / {} kv heads, head_dim {}",
                    g.model_type, g.layout, g.layers, g.hidden, g.heads, g.kv_heads, g.head_dim
                )
            };
            Some(format!(
                "geometry {} vs {}",
                show(&sp.geometry),
                show(&spec0.geometry)
            ))
        } else if sp.dtype != spec0.dtype {
            Some(format!(
                "dtype {} vs {}",
                sp.dtype.name(),
                spec0.dtype.name()
            ))
        } else if sp.blocks != spec0.blocks {
            Some(format!("blocks {:?} vs {:?}", sp.blocks, spec0.blocks))
        } else if sp.other_tensors != spec0.other_tensors {
            let a: Vec<_> = sp.other_tensors.iter().map(|t| &t.name).collect();
            let b: Vec<_> = spec0.other_tensors.iter().map(|t| &t.name).collect();
            Some(format!("other tensors {a:?} vs {b:?}"))
        } else {
            None
        };
        if let Some(w) = what {
            return Err(Error::Merge(format!(
                "{} and {} hold different models or settings and cannot be merged: {w}",
                p.display(),
                inputs[0].display()
            )));
        }
    }
    // Duplicates across inputs.
    let mut owner: HashMap<(TaskName, SampleId), usize> = HashMap::new();
    let mut total = 0u64;
    for (i, s) in stores.iter().enumerate() {
        for r in s.index().records() {
            if let Some(j) = owner.insert((r.task.clone(), r.id.clone()), i) {
                return Err(Error::Merge(format!(
                    "task `{}` sample {} is in both {} and {}",
                    r.task,
                    r.id,
                    inputs[j].display(),
                    inputs[i].display()
                )));
            }
            total += 1;
        }
    }
    let layout = StatsLayout::new(stores[0].order(), spec0.dtype);
    // Per-task statistics of every input (its file when current, else recomputed).
    let mut per_task: BTreeMap<TaskName, (Welford, u64)> = BTreeMap::new();
    for (s, p) in stores.iter().zip(inputs) {
        for t in s.tasks() {
            let ts = stats::load_or_compute(s, &t)?;
            let w = ts.to_welford(&layout, &stats::task_stats_path(p, &t))?;
            let e = per_task
                .entry(t.clone())
                .or_insert_with(|| (Welford::new(layout.len()), 0));
            e.0.merge(&w);
            e.1 += ts.tokens_total;
        }
    }

    let mut wopts = wopts;
    if wopts.source.is_null() {
        wopts.source = serde_json::json!({
            "kind": "merge",
            "inputs": inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        });
    }
    // The output is marked unfinished before anything goes into it, and the mark goes
    // only once the statistics are written: a killed merge leaves a store that readers
    // refuse (naming the command that finishes it), never one that looks complete.
    let marker = gradshard_store::unfinished_path(out);
    let note = format!(
        "a `gradshard merge` of {} into it started (pid {}) and has not finished; rerun the same merge command to finish it. Inputs: {}",
        inputs.len(),
        std::process::id(),
        inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut w = StoreWriter::open_or_create(out, &spec0, wopts)?;
    {
        // The output may only hold samples of the inputs (an interrupted merge).
        let existing = Store::open_unfinished(out)?;
        let stray = existing
            .index()
            .records()
            .find(|r| !owner.contains_key(&(r.task.clone(), r.id.clone())))
            .map(|r| (r.task.clone(), r.id.clone()));
        if let Some((task, id)) = stray {
            return Err(Error::Merge(format!(
                "output {} already holds task `{task}` sample {id}, which is in none of the inputs",
                out.display()
            )));
        }
    }
    // Marked only once the output is known to be this merge's (a foreign store given as
    // the output was refused above, unmarked); nothing was committed before this point.
    gradshard_store::fsutil::write_atomic(&marker, note.as_bytes())?;
    let mut side = SideLog::open(out, layout.len(), true)?;
    progress(MergeEvent::Started { total });
    let (mut copied, mut already) = (0u64, 0u64);
    let n_frames = w.order().n_frames();
    for s in &stores {
        for t in s.tasks() {
            for rec in s.samples(t.as_str())? {
                if w.is_committed(&rec.task, &rec.id) {
                    already += 1;
                    continue;
                }
                let mut sums = vec![0f64; layout.len()];
                let factored = s.is_factored(rec)?;
                let meta = SampleMeta {
                    task: rec.task.clone(),
                    id: rec.id.clone(),
                    tokens: rec.tokens,
                    loss_sum: rec.loss_sum,
                };
                let repr = if factored {
                    Representation::Factored
                } else {
                    Representation::Full
                };
                let mut h = w.begin_sample_as(meta, repr)?;
                // Shared factors are copied once each, with their Gram for the sums.
                let mut grams: Vec<Option<Vec<f64>>> = vec![None; w.order().n_shared()];
                for f in 0..n_frames {
                    if factored {
                        let (j, pf, sf) = s.read_frame_factors(rec, f)?;
                        if grams[j].is_none() {
                            let c = w.order().shared()[j].cols;
                            grams[j] = Some(gradshard_core::factor::gram(&sf.values, sf.rows, c));
                            w.put_shared(&mut h, j, sf.rows, sf.values.to_vec())?;
                        }
                        let gs = grams[j].as_ref().expect("formed above");
                        layout
                            .accumulate_factored(f, &pf.values, &sf.values, pf.rows, gs, &mut sums);
                        w.put_factor(&mut h, f, pf.rows, pf.values.to_vec())?;
                    } else {
                        let v = s.read_frame(rec, f)?;
                        layout.accumulate(f, &v, &mut sums);
                        w.put_frame(&mut h, f, v)?;
                    }
                }
                layout.finish_sample(&mut sums, rec.tokens);
                side.append(&rec.task, &rec.id, rec.tokens, &sums)?;
                w.end_sample(h)?;
                copied += 1;
                progress(MergeEvent::Sample {
                    done: copied + already,
                });
            }
        }
    }
    side.sync()?;
    let write = w.finish()?;
    let merged = Store::open_unfinished(out)?;
    let mut files = Vec::new();
    let mut tasks = Vec::new();
    for (t, (wf, tokens)) in &per_task {
        let recs = merged.samples(t.as_str())?;
        if recs.len() as u64 != wf.n {
            return Err(Error::Merge(format!(
                "task `{t}`: the output holds {} samples, the inputs' statistics count {}",
                recs.len(),
                wf.n
            )));
        }
        let ts = TaskStats::from_welford(
            &layout,
            t,
            wf,
            *tokens,
            stats::ids_digest(recs),
            "chan-merge",
        );
        files.push(ts.save(out)?);
        tasks.push(ts);
    }
    std::fs::remove_file(&marker).map_err(crate::error::io(&marker))?;
    gradshard_store::fsutil::sync_dir(out)?;
    Ok(MergeReport {
        write,
        inputs: inputs.len(),
        copied,
        already,
        stats_files: files,
        tasks,
    })
}
