//! `gradshard._native._Writer`: a store writer for Python (the Rust half of
//! `gradshard.create`, see `python/gradshard/_writer.py`).
//!
//! Each sample goes to the store crate's per-sample sink (`gradshard_store::SampleSink`),
//! the same code `gradshard collect` feeds: NaN/inf check, head slices and MLP row
//! groups cut from the Hugging Face tensors, Σ g²/T sums and the side-log record,
//! the `full | factored | auto` choice, the writer pipeline (bounded memory, crash
//! safety, resume) and, at `close`, `stats/` rebuilt from the committed samples.
//! This file only turns Python arguments into the sink's input: it checks names,
//! shapes and the factor orientation of every tensor *before* the sample is begun,
//! so a refused sample leaves nothing behind and the writer stays usable, and it
//! releases the GIL while the sink works.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

use gradshard_core::{Block, DType, Layout, OtherTensor, SampleId, TaskName};
use gradshard_store::{
    CodecSpec, FactorSample, Factors, GradSample, Gradient, NanPolicy, RepresentationChoice,
    SampleSink, SinkOptions, Store, StoreSpec, StoreWriter, WriterOptions,
};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::{id_to_py, render, sample_id, store_err, StoreError};

/// A tensor the store holds: its Hugging Face shape and how its gradient is formed
/// from factors.
#[derive(Clone, Debug)]
struct TensorInfo {
    shape: [usize; 2],
    /// GPT-2 `Conv1D`, stored `[in, out]`: grad = activationᵀ @ backprop. Otherwise
    /// `nn.Linear` `[out, in]`: grad = backpropᵀ @ activation.
    conv1d: bool,
    attention: bool,
}

impl TensorInfo {
    /// (output features, input features).
    fn out_in(&self) -> (usize, usize) {
        if self.conv1d {
            (self.shape[1], self.shape[0])
        } else {
            (self.shape[0], self.shape[1])
        }
    }
}

struct Open {
    sink: SampleSink,
    /// Every tensor the store holds, by name (sorted: messages list them in order).
    tensors: BTreeMap<String, TensorInfo>,
    /// (task, id) committed when the writer opened, plus those handed over since.
    known: HashSet<(TaskName, SampleId)>,
}

/// A writer over one store (see `gradshard.create`). Thread-safe: calls are
/// serialised, and each releases the GIL while the store works.
#[pyclass(frozen, module = "gradshard._native", name = "_Writer")]
pub(crate) struct PyWriter {
    path: PathBuf,
    inner: Mutex<Option<Open>>,
}

fn value_err(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// A sink error as Python sees it: what is wrong with the sample handed in (a
/// tensor, a shape, a NaN, T, a duplicate id) is a `ValueError`; anything else (I/O,
/// a full disk, a stopped pipeline) a `StoreError`. Both carry the CLI's message.
fn sink_err(e: gradshard_store::Error) -> PyErr {
    use gradshard_store::Error as E;
    match e {
        E::SampleInput { .. } | E::NonFinite { .. } | E::Sample { .. } => value_err(render(&e)),
        other => store_err(other),
    }
}

fn parse_dtype(s: &str) -> PyResult<DType> {
    match s {
        "bf16" | "bfloat16" => Ok(DType::Bf16),
        "f32" | "float32" => Ok(DType::F32),
        other => Err(value_err(format!(
            "dtype `{other}`: a store holds \"bf16\" or \"f32\" values"
        ))),
    }
}

/// A numpy float32 array's values (row-major) and shape.
fn host_values(a: &PyReadonlyArrayDyn<'_, f32>) -> (Vec<usize>, Vec<f32>) {
    let shape = a.shape().to_vec();
    let v = match a.as_slice() {
        Ok(s) => s.to_vec(),
        Err(_) => a.as_array().iter().copied().collect(),
    };
    (shape, v)
}

impl Open {
    fn what(task: &TaskName, id: &SampleId) -> String {
        format!("task `{task}` sample {id}")
    }

    fn info(&self, task: &TaskName, id: &SampleId, name: &str) -> PyResult<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| {
            let close: Vec<&str> = self
                .tensors
                .keys()
                .filter(|k| {
                    let tail = |s: &str| s.rsplit('.').nth(1).unwrap_or("").to_string();
                    tail(k) == tail(name)
                })
                .take(3)
                .map(String::as_str)
                .collect();
            value_err(format!(
                "{}: tensor `{name}` is not one this store holds ({} tensors{})",
                Self::what(task, id),
                self.tensors.len(),
                if close.is_empty() {
                    format!(", e.g. `{}`", self.tensors.keys().next().map_or("", |s| s))
                } else {
                    format!(", e.g. `{}`", close.join("`, `"))
                }
            ))
        })
    }

    /// Every stored tensor must be given (the names given are all known: `info`).
    fn check_complete<'a>(
        &self,
        task: &TaskName,
        id: &SampleId,
        given: impl Iterator<Item = &'a str>,
    ) -> PyResult<()> {
        let given: HashSet<&str> = given.collect();
        if let Some(missing) = self.tensors.keys().find(|k| !given.contains(k.as_str())) {
            return Err(value_err(format!(
                "{}: tensor `{missing}` is missing ({} of the store's {} tensors given)",
                Self::what(task, id),
                given.len(),
                self.tensors.len()
            )));
        }
        Ok(())
    }

    fn check_new(
        &self,
        task: &TaskName,
        id: &SampleId,
        tokens: i64,
        loss_sum: f64,
    ) -> PyResult<u32> {
        if self.known.contains(&(task.clone(), id.clone())) {
            return Err(value_err(format!(
                "{}: duplicate: already in the store (or handed to this writer)",
                Self::what(task, id)
            )));
        }
        if tokens < 1 {
            return Err(value_err(format!(
                "{}: tokens = {tokens}: T, the number of predicted positions, must be at least 1 (C = g²/T)",
                Self::what(task, id)
            )));
        }
        let t = u32::try_from(tokens).map_err(|_| {
            value_err(format!(
                "{}: tokens = {tokens} does not fit in u32",
                Self::what(task, id)
            ))
        })?;
        if !loss_sum.is_finite() {
            return Err(value_err(format!(
                "{}: loss_sum = {loss_sum} is not finite",
                Self::what(task, id)
            )));
        }
        Ok(t)
    }
}

fn task_name(task: &str) -> PyResult<TaskName> {
    TaskName::new(task).map_err(|e| value_err(format!("task `{task}`: {e}")))
}

fn key_str(k: &Bound<'_, PyAny>) -> PyResult<String> {
    k.extract::<String>().map_err(|_| {
        value_err(format!(
            "tensor names are str, not {}",
            k.repr().map_or_else(|_| "?".into(), |r| r.to_string())
        ))
    })
}

fn array<'py>(
    v: &Bound<'py, PyAny>,
    what: impl Fn() -> String,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    v.extract::<PyReadonlyArrayDyn<'py, f32>>().map_err(|_| {
        value_err(format!(
            "{}: expected a float32 array, got {}",
            what(),
            v.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })
}

impl PyWriter {
    /// The writer's state, locked with the GIL released while waiting (a call from
    /// another thread holds it, its GIL released, while the store works).
    fn lock<'a>(&'a self, py: Python<'_>) -> std::sync::MutexGuard<'a, Option<Open>> {
        self.inner
            .lock_py_attached(py)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut Open) -> PyResult<R>) -> PyResult<R> {
        let mut g = self.lock(py);
        match g.as_mut() {
            Some(o) => f(o),
            None => Err(StoreError::new_err(format!(
                "the writer of {} is closed",
                self.path.display()
            ))),
        }
    }
}

#[pymethods]
impl PyWriter {
    /// Opens (or creates) the store at `path` for `config_json` (a Hugging Face
    /// config.json's text). `names`: the model's parameter names, to find the prefix
    /// of the layer names (`model.`, `transformer.`, `model.language_model.`);
    /// `others`: the non-attention 2-D tensors to store as row groups, `(name, [rows,
    /// cols])` as the checkpoint holds the weight.
    #[new]
    #[pyo3(signature = (path, config_json, dtype = "bf16", representation = "auto", names = None, others = None, nan_policy = "error", memory_budget = None, source_json = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        config_json: &str,
        dtype: &str,
        representation: &str,
        names: Option<Vec<String>>,
        others: Option<Vec<(String, Vec<usize>)>>,
        nan_policy: &str,
        memory_budget: Option<u64>,
        source_json: Option<&str>,
    ) -> PyResult<Self> {
        let dtype = parse_dtype(dtype)?;
        let representation: RepresentationChoice = representation.parse().map_err(value_err)?;
        let nan_policy: NanPolicy = nan_policy.parse().map_err(value_err)?;
        let cfg: serde_json::Value = serde_json::from_str(config_json)
            .map_err(|e| value_err(format!("config: not JSON: {e}")))?;
        let mut g = gradshard_core::ModelShape::geometry_of(&cfg)
            .map_err(|e| value_err(format!("config: {}", render(&e))))?;
        if let Some(n) = &names {
            g.detect_root(n.iter().map(String::as_str));
        }
        let attn: Vec<String> = g.all_attn_tensors().into_iter().map(|t| t.name).collect();
        let mut other_tensors = Vec::new();
        for (name, shape) in others.unwrap_or_default() {
            if attn.contains(&name) {
                return Err(value_err(format!(
                    "tensor `{name}` is an attention tensor, always stored: list only other tensors"
                )));
            }
            let [r, c] = shape[..] else {
                return Err(value_err(format!(
                    "tensor `{name}`: shape {shape:?} is not 2-D"
                )));
            };
            if r == 0 || c == 0 {
                return Err(value_err(format!(
                    "tensor `{name}`: shape {shape:?} is empty"
                )));
            }
            if other_tensors.iter().any(|t: &OtherTensor| t.name == name) {
                return Err(value_err(format!("tensor `{name}` is listed twice")));
            }
            let axis = g.out_axis_of(&name);
            other_tensors.push(OtherTensor::new(name, [r, c], axis));
        }
        other_tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let spec = StoreSpec {
            geometry: g,
            dtype,
            codec: CodecSpec::DEFAULT,
            blocks: Block::ALL.to_vec(),
            other_tensors,
        };
        let mut wopts = WriterOptions::default();
        if let Some(b) = memory_budget {
            wopts.memory_budget = b;
        }
        wopts.source = match source_json {
            Some(s) => {
                serde_json::from_str(s).map_err(|e| value_err(format!("source: not JSON: {e}")))?
            }
            None => serde_json::json!({"kind": "python"}),
        };
        let p = path.clone();
        let open = py
            .detach(move || -> gradshard_store::Result<Open> {
                let writer = StoreWriter::open_or_create(&p, &spec, wopts)?;
                // Ids already committed (after the writer's recovery of a killed run).
                let mut known = HashSet::new();
                let store = Store::open(&p)?;
                for t in store.tasks() {
                    for r in store.samples(t.as_str())? {
                        known.insert((r.task.clone(), r.id.clone()));
                    }
                }
                drop(store);
                let order = writer.order().clone();
                let geo = order.geometry();
                let mut tensors = BTreeMap::new();
                for t in geo.all_attn_tensors() {
                    tensors.insert(
                        t.name,
                        TensorInfo {
                            shape: t.shape,
                            conv1d: geo.layout == Layout::Gpt2Conv1d,
                            attention: true,
                        },
                    );
                }
                for o in order.others() {
                    tensors.insert(
                        o.name.clone(),
                        TensorInfo {
                            shape: o.shape,
                            conv1d: o.out_axis == 1,
                            attention: false,
                        },
                    );
                }
                let sink = SampleSink::new(
                    writer,
                    SinkOptions {
                        nan_policy,
                        representation,
                    },
                )?;
                Ok(Open {
                    sink,
                    tensors,
                    known,
                })
            })
            .map_err(store_err)?;
        Ok(PyWriter {
            path,
            inner: Mutex::new(Some(open)),
        })
    }

    /// The store directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// `[(name, [rows, cols], kind, is_attention)]` of every tensor a sample must
    /// give, in name order; kind is "linear" (`[out, in]`) or "conv1d" (`[in, out]`).
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.with(py, |o| {
            let items = o
                .tensors
                .iter()
                .map(|(n, t)| {
                    (
                        n.clone(),
                        t.shape.to_vec(),
                        if t.conv1d { "conv1d" } else { "linear" },
                        t.attention,
                    )
                })
                .collect::<Vec<_>>();
            PyList::new(py, items)
        })
    }

    /// "full", "factored" or "auto": how samples are stored (a format-1 store takes
    /// full slices only, whatever was asked).
    #[getter]
    fn representation(&self, py: Python<'_>) -> PyResult<&'static str> {
        self.with(py, |o| {
            Ok(match o.sink.representation() {
                RepresentationChoice::Full => "full",
                RepresentationChoice::Factored => "factored",
                RepresentationChoice::Auto => "auto",
            })
        })
    }

    /// "bf16" or "f32", as stored.
    #[getter]
    fn dtype(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |o| Ok(o.sink.dtype().to_string()))
    }

    /// Whether (task, id) is in the store or was handed to this writer.
    fn is_committed(&self, py: Python<'_>, task: &str, id: &Bound<'_, PyAny>) -> PyResult<bool> {
        let t = task_name(task)?;
        let id = sample_id(id)?;
        self.with(py, |o| Ok(o.known.contains(&(t, id))))
    }

    /// Ids of `task` in the store or handed to this writer, sorted as the store
    /// sorts them.
    fn committed<'py>(&self, py: Python<'py>, task: &str) -> PyResult<Bound<'py, PyList>> {
        let t = task_name(task)?;
        let mut ids: Vec<SampleId> = self.with(py, |o| {
            Ok(o.known
                .iter()
                .filter(|(k, _)| *k == t)
                .map(|(_, id)| id.clone())
                .collect())
        })?;
        ids.sort();
        let items = ids
            .iter()
            .map(|id| id_to_py(py, id))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// Stores one sample from its gradients `{hf_name: float32 array in the
    /// checkpoint's shape}`. Returns False when it was left out under
    /// nan_policy="skip". A wrong name or shape, a missing tensor, NaN/inf, T < 1 or
    /// a duplicate id raises ValueError naming the task, sample and tensor, and
    /// nothing of the sample is stored.
    fn add(
        &self,
        py: Python<'_>,
        task: &str,
        id: &Bound<'_, PyAny>,
        grads: &Bound<'_, PyDict>,
        tokens: i64,
        loss_sum: f64,
    ) -> PyResult<bool> {
        let t = task_name(task)?;
        let id = sample_id(id)?;
        let mut guard = self.lock(py);
        let o = guard.as_mut().ok_or_else(|| {
            StoreError::new_err(format!("the writer of {} is closed", self.path.display()))
        })?;
        let tokens = o.check_new(&t, &id, tokens, loss_sum)?;
        let mut list = Vec::with_capacity(grads.len());
        for (k, v) in grads.iter() {
            let name = key_str(&k)?;
            let info = o.info(&t, &id, &name)?;
            let a = array(&v, || format!("{}: tensor `{name}`", Open::what(&t, &id)))?;
            if a.shape() != info.shape {
                return Err(value_err(format!(
                    "{}: tensor `{name}` has shape {:?}, the store holds {:?}",
                    Open::what(&t, &id),
                    a.shape(),
                    info.shape
                )));
            }
            let (shape, data) = host_values(&a);
            list.push(Gradient { name, shape, data });
        }
        o.check_complete(&t, &id, list.iter().map(|g| g.name.as_str()))?;
        let sample = GradSample {
            tokens: tokens as usize,
            loss_sum,
            grads: list,
        };
        let key = (t.clone(), id.clone());
        let kept = py.detach(|| o.sink.put(&t, id, sample)).map_err(sink_err)?;
        if kept {
            o.known.insert(key);
        }
        Ok(kept)
    }

    /// Stores one sample from its factors `{hf_name: (backprop, activation)}`:
    /// backprop `[n, out]`, activation `[n, in]` over the sample's n positions, the
    /// gradient being backpropᵀ @ activation for an `nn.Linear` weight `[out, in]` and
    /// activationᵀ @ backprop for a GPT-2 `Conv1D` weight `[in, out]`. Errors as `add`.
    fn add_factors(
        &self,
        py: Python<'_>,
        task: &str,
        id: &Bound<'_, PyAny>,
        factors: &Bound<'_, PyDict>,
        tokens: i64,
        loss_sum: f64,
    ) -> PyResult<bool> {
        let t = task_name(task)?;
        let id = sample_id(id)?;
        let mut guard = self.lock(py);
        let o = guard.as_mut().ok_or_else(|| {
            StoreError::new_err(format!("the writer of {} is closed", self.path.display()))
        })?;
        let tokens = o.check_new(&t, &id, tokens, loss_sum)?;
        let mut list = Vec::with_capacity(factors.len());
        for (k, v) in factors.iter() {
            let name = key_str(&k)?;
            let info = o.info(&t, &id, &name)?.clone();
            let at = || format!("{}: tensor `{name}`", Open::what(&t, &id));
            let pair = v
                .cast::<PyTuple>()
                .ok()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| {
                    value_err(format!("{}: expected a (backprop, activation) pair", at()))
                })?;
            let bp = array(&pair.get_item(0)?, || format!("{} backprop", at()))?;
            let act = array(&pair.get_item(1)?, || format!("{} activation", at()))?;
            let (out_f, in_f) = info.out_in();
            let kind = if info.conv1d {
                format!(
                    "Conv1D [in, out] = {:?}: grad = activationᵀ @ backprop",
                    info.shape
                )
            } else {
                format!(
                    "nn.Linear [out, in] = {:?}: grad = backpropᵀ @ activation",
                    info.shape
                )
            };
            let n = bp.shape().first().copied().unwrap_or(0);
            if bp.ndim() != 2 || bp.shape()[1] != out_f {
                return Err(value_err(format!(
                    "{}: backprop has shape {:?}, expected [n, {out_f}] ({kind})",
                    at(),
                    bp.shape()
                )));
            }
            if act.ndim() != 2 || act.shape()[1] != in_f {
                return Err(value_err(format!(
                    "{}: activation has shape {:?}, expected [n, {in_f}] ({kind})",
                    at(),
                    act.shape()
                )));
            }
            if act.shape()[0] != n || n == 0 {
                return Err(value_err(format!(
                    "{}: backprop has {n} rows and activation {}: both need the sample's n ≥ 1 positions",
                    at(),
                    act.shape()[0]
                )));
            }
            let (_, bv) = host_values(&bp);
            let (_, av) = host_values(&act);
            // The sink's A is n × shape[0], B is n × shape[1] (G = AᵀB).
            let (a, b) = if info.conv1d { (av, bv) } else { (bv, av) };
            list.push(Factors {
                name,
                shape: info.shape.to_vec(),
                n,
                a,
                b,
            });
        }
        o.check_complete(&t, &id, list.iter().map(|f| f.name.as_str()))?;
        let sample = FactorSample {
            tokens: tokens as usize,
            loss_sum,
            factors: list,
        };
        let key = (t.clone(), id.clone());
        let kept = py
            .detach(|| o.sink.put_factors(&t, id, sample))
            .map_err(sink_err)?;
        if kept {
            o.known.insert(key);
        }
        Ok(kept)
    }

    /// Waits until every sample handed over is committed, seals the shards, rebuilds
    /// `stats/` and returns the run's report (a dict). The writer is closed after,
    /// also when this raises.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let open = self.lock(py).take().ok_or_else(|| {
            StoreError::new_err(format!("the writer of {} is closed", self.path.display()))
        })?;
        let r = py.detach(move || open.sink.finish()).map_err(store_err)?;
        let d = PyDict::new(py);
        d.set_item("stored", r.stored)?;
        d.set_item("full_samples", r.full_samples)?;
        d.set_item("factored_samples", r.factored_samples)?;
        d.set_item("values_stored", r.values_stored)?;
        let skipped = r
            .skipped
            .iter()
            .map(|s| -> PyResult<Bound<'py, PyDict>> {
                let e = PyDict::new(py);
                e.set_item("task", s.task.as_str())?;
                e.set_item("id", id_to_py(py, &s.id)?)?;
                e.set_item("why", &s.why)?;
                Ok(e)
            })
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("skipped", skipped)?;
        d.set_item("prepare_seconds", r.prepare_time.as_secs_f64())?;
        d.set_item("blocked_on_writer_seconds", r.blocked_time.as_secs_f64())?;
        let w = &r.write;
        d.set_item("samples_committed", w.samples_committed)?;
        d.set_item("raw_bytes", w.raw_bytes)?;
        d.set_item("stored_bytes", w.stored_bytes)?;
        d.set_item("compress_seconds", w.compress_time.as_secs_f64())?;
        d.set_item("io_seconds", w.io_time.as_secs_f64())?;
        d.set_item(
            "stats_files",
            r.stats
                .files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>(),
        )?;
        d.set_item("stats_from_side_log", r.stats.from_side_log)?;
        d.set_item("stats_from_store", r.stats.from_store)?;
        Ok(d)
    }

    /// Whether `close` has run.
    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        self.lock(py).is_none()
    }
}
