//! `--full-fisher`: the full-resolution Fisher mean I = (1/n) Σ_i g_i²/T_i of a
//! task, per stored tensor in its Hugging Face name and shape, written as
//! `stats/<task>.fisher.safetensors` (F32, accumulated in f64).
//!
//! Computed in one pass over the committed samples of the store after a run, so
//! it is exact under resume; memory is one tensor's accumulator at a time, and
//! the file is streamed (header first, then tensor by tensor).

use std::io::Write;
use std::path::{Path, PathBuf};

use gradshard_core::TaskName;

use crate::error::{io, Error, Result};
use crate::stats::{full_fisher_path, stats_dir};
use crate::{fsutil, Store};

/// Writes the full Fisher of `task`; returns its path.
pub fn write_full_fisher(store: &Store, task: &TaskName) -> Result<PathBuf> {
    let recs = store.samples(task.as_str())?;
    if recs.is_empty() {
        return Err(Error::Invalid(format!(
            "invalid argument: task `{task}` has no samples; no Fisher to write"
        )));
    }
    let g = store.order().geometry();
    let mut tensors: Vec<(String, [usize; 2])> = g
        .all_attn_tensors()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    tensors.extend(
        store
            .order()
            .others()
            .iter()
            .map(|t| (t.name.clone(), t.shape)),
    );
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({
            "format": "gradshard-full-fisher",
            "task": task.as_str(),
            "n_samples": recs.len().to_string(),
            "quantity": "mean over the task's samples of g^2/T (g as stored), accumulated in f64",
            "store_id": store.manifest().store_id,
        }),
    );
    let mut off = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape[0] * shape[1] * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let mut hjson = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| {
            Error::Invalid(format!(
                "invalid argument: full Fisher header of task `{task}`: {e}"
            ))
        })?;
    while hjson.len() % 8 != 0 {
        hjson.push(b' ');
    }
    let dir = stats_dir(store.dir());
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = full_fisher_path(store.dir(), task);
    let tmp = path.with_extension("tmp");
    {
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(hjson.len() as u64).to_le_bytes())
            .map_err(io(&tmp))?;
        w.write_all(&hjson).map_err(io(&tmp))?;
        let n = recs.len() as f64;
        for (name, shape) in &tensors {
            let mut acc = vec![0f64; shape[0] * shape[1]];
            for r in recs {
                let (_, v) = store.read_tensor(task.as_str(), &r.id, name)?;
                let t = f64::from(r.tokens);
                for (a, x) in acc.iter_mut().zip(&v) {
                    let x = f64::from(*x);
                    *a += x * x / t;
                }
            }
            let mut buf = Vec::with_capacity(acc.len() * 4);
            for a in acc {
                buf.extend_from_slice(&((a / n) as f32).to_le_bytes());
            }
            w.write_all(&buf).map_err(io(&tmp))?;
        }
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    fsutil::sync_dir(&dir)?;
    Ok(path)
}

/// Path helper re-exported for callers that only need the location.
pub fn fisher_file(store: &Path, task: &TaskName) -> PathBuf {
    full_fisher_path(store, task)
}
