//! `gradshard._native`: the Rust half of the `gradshard` Python package (see
//! `python/gradshard/__init__.py` for the other half and docs/python.md for the guide).
//!
//! Everything here is a thin layer over `gradshard_store::Store`: the same reader the
//! CLI uses, so a slice read from Python is the slice the scorer reads, checksums and
//! all. Reads run with the GIL released (`Python::detach`); a tile is decoded in
//! parallel by the reader's rayon pool. Errors become `gradshard.StoreError` with the
//! message the CLI prints for the same error.

mod dlpack;
mod writer;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use gradshard_core::{f32_to_bf16_bits, Block, SampleId, TaskName};
use gradshard_store::Store;
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};

create_exception!(
    _native,
    StoreError,
    PyException,
    "An error reading a gradshard store: a missing or corrupt file, an unknown task, sample, tensor or slice. The message is the one the `gradshard` CLI prints (it names the file, task, sample and slice)."
);

/// The error and its causes, each said once — the same rendering as the CLI's
/// `render_error` (library errors already carry their cause in their own message, so a
/// cause whose text is already there is not repeated).
fn render(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.is_empty() && !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

fn store_err(e: gradshard_store::Error) -> PyErr {
    StoreError::new_err(render(&e))
}

trait OrStoreErr<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> OrStoreErr<T> for gradshard_store::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(store_err)
    }
}

/// The value type of returned arrays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OutType {
    /// numpy float32.
    F32,
    /// torch bfloat16 (through DLPack), rounded to nearest even from the f32 values.
    Bf16,
}

fn out_type(dtype: &str) -> PyResult<OutType> {
    match dtype {
        "f32" | "float32" => Ok(OutType::F32),
        "bf16" | "bfloat16" => Ok(OutType::Bf16),
        other => Err(PyValueError::new_err(format!(
            "dtype `{other}`: expected \"f32\" (a numpy float32 array) or \"bf16\" (a torch bfloat16 tensor)"
        ))),
    }
}

/// A sample id as Python gives it: an int stays an integer id, a str a string id
/// (ids are matched as stored: the string "3" is not the integer 3).
fn sample_id(obj: &Bound<'_, PyAny>) -> PyResult<SampleId> {
    if obj.is_instance_of::<PyString>() {
        return Ok(SampleId::Str(obj.extract::<String>()?));
    }
    if !obj.is_instance_of::<PyBool>() {
        if let Ok(v) = obj.extract::<i64>() {
            return Ok(SampleId::Int(v));
        }
    }
    Err(PyTypeError::new_err(format!(
        "a sample id is an int or a str, not {}",
        obj.get_type().name()?
    )))
}

fn id_to_py<'py>(py: Python<'py>, id: &SampleId) -> PyResult<Bound<'py, PyAny>> {
    Ok(match id {
        SampleId::Int(v) => v.into_pyobject(py)?.into_any(),
        SampleId::Str(s) => PyString::new(py, s).into_any(),
    })
}

fn block_of(block: &str) -> PyResult<Block> {
    block.parse::<Block>().map_err(PyValueError::new_err)
}

/// Values of `shape` as the requested array type: numpy f32 (no copy), or torch bf16.
fn to_array<'py>(
    py: Python<'py>,
    shape: Vec<usize>,
    values: Vec<f32>,
    ty: OutType,
) -> PyResult<Bound<'py, PyAny>> {
    match ty {
        OutType::F32 => {
            let a = ArrayD::from_shape_vec(IxDyn(&shape), values)
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            Ok(a.into_pyarray(py).into_any())
        }
        OutType::Bf16 => {
            let bits: Vec<u16> =
                py.detach(|| values.iter().map(|v| f32_to_bf16_bits(*v)).collect());
            let arr = Bound::new(py, dlpack::Bf16Array::new(bits, shape))?;
            let torch = py.import("torch").map_err(|e| {
                PyErr::new::<pyo3::exceptions::PyImportError, _>(format!(
                    "dtype=\"bf16\" returns a torch tensor and needs torch ({e}); numpy has no bfloat16: use dtype=\"f32\""
                ))
            })?;
            torch.call_method1("from_dlpack", (arr,))
        }
    }
}

/// An open store, read-only. Sees the samples committed when it was opened (or last
/// refreshed); any number of readers may have a store open, also while a writer adds
/// samples to it.
#[pyclass(frozen, subclass, module = "gradshard._native", name = "_Store")]
struct PyStore {
    path: PathBuf,
    inner: RwLock<Arc<Store>>,
}

impl PyStore {
    fn store(&self) -> Arc<Store> {
        self.inner.read().expect("store lock").clone()
    }
}

/// Positions (into the task's samples in store order) of the given ids.
fn positions(store: &Store, task: &str, ids: &[SampleId]) -> gradshard_store::Result<Vec<usize>> {
    let recs = store.samples(task)?;
    let t = TaskName::new(task)?;
    ids.iter()
        .map(|id| {
            store.index().position(&t, id).ok_or_else(|| {
                gradshard_store::Error::Index(gradshard_index::Error::UnknownSample {
                    task: recs[0].task.clone(),
                    id: id.clone(),
                })
            })
        })
        .collect()
}

#[pymethods]
impl PyStore {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let p = path.clone();
        let store = py.detach(move || Store::open(&p)).py()?;
        Ok(PyStore {
            path,
            inner: RwLock::new(Arc::new(store)),
        })
    }

    /// Re-reads the commit log: samples a writer committed since the store was opened
    /// become visible.
    fn refresh(&self, py: Python<'_>) -> PyResult<()> {
        let p = self.path.clone();
        let store = py.detach(move || Store::open(&p)).py()?;
        *self.inner.write().expect("store lock") = Arc::new(store);
        Ok(())
    }

    /// The store directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Task names, sorted.
    #[getter]
    fn tasks(&self) -> Vec<String> {
        self.store().tasks().iter().map(|t| t.to_string()).collect()
    }

    /// The model geometry: model_type, layers, heads, kv_heads, head_dim, hidden, layout, root.
    #[getter]
    fn geometry<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.store();
        let g = s.order().geometry();
        let d = PyDict::new(py);
        d.set_item("model_type", &g.model_type)?;
        d.set_item("layers", g.layers)?;
        d.set_item("heads", g.heads)?;
        d.set_item("kv_heads", g.kv_heads)?;
        d.set_item("head_dim", g.head_dim)?;
        d.set_item("hidden", g.hidden)?;
        let layout = gradshard_core_layout(g.layout);
        d.set_item("layout", layout)?;
        d.set_item("root", &g.root)?;
        Ok(d)
    }

    /// How values are stored: "bf16" or "f32".
    #[getter]
    fn dtype(&self) -> String {
        self.store().manifest().spec.dtype.to_string()
    }

    /// The on-disk format version (1 or 2).
    #[getter]
    fn format_version(&self) -> u16 {
        self.store().manifest().format_version
    }

    /// Stored attention blocks, in Q K V O order.
    #[getter]
    fn blocks(&self) -> Vec<String> {
        self.store()
            .order()
            .blocks()
            .iter()
            .map(|b| b.as_str().to_string())
            .collect()
    }

    /// Hugging Face names of the tensors `tensor()` can rebuild (attention tensors with
    /// at least one stored block, then the other 2-D tensors stored as row groups).
    #[getter]
    fn tensors(&self) -> Vec<String> {
        let s = self.store();
        let o = s.order();
        let mut out: Vec<String> = o
            .geometry()
            .all_attn_tensors()
            .into_iter()
            .filter(|t| t.blocks.iter().any(|b| o.has_block(*b)))
            .map(|t| t.name)
            .collect();
        out.extend(o.others().iter().map(|t| t.name.clone()));
        out
    }

    /// `[(id, tokens, loss_sum), …]` of a task in store order (ids ascending); ids as
    /// stored: int or str.
    fn samples<'py>(&self, py: Python<'py>, task: &str) -> PyResult<Bound<'py, PyList>> {
        let s = self.store();
        let recs = s.samples(task).py()?;
        let items = recs
            .iter()
            .map(|r| {
                PyTuple::new(
                    py,
                    [
                        id_to_py(py, &r.id)?,
                        r.tokens.into_pyobject(py)?.into_any(),
                        r.loss_sum.into_pyobject(py)?.into_any(),
                    ],
                )
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// Checks the whole store as `gradshard verify` does: every checksum, index entry,
    /// shard header and footer, and the statistics in `stats/` (each task file's
    /// checksum, layout and currency; the side log's records). Returns a dict: `ok`
    /// (no problems), `problems` and `warnings` (lists of messages naming the file,
    /// task, sample or slice), `samples`, `frames`, `frame_bytes`, `shards`,
    /// `unreferenced_bytes`. Damage is reported in the dict; a store that cannot be
    /// read at all (no manifest) raises StoreError. Runs with the GIL released.
    fn verify<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.path.clone();
        let rep = py
            .detach(move || gradshard_store::verify(&p, &|_, _| {}))
            .py()?;
        let d = PyDict::new(py);
        d.set_item("ok", rep.ok())?;
        d.set_item("problems", &rep.problems)?;
        d.set_item("warnings", &rep.warnings)?;
        d.set_item("samples", rep.samples)?;
        d.set_item("frames", rep.frames)?;
        d.set_item("frame_bytes", rep.frame_bytes)?;
        d.set_item("shards", rep.shards)?;
        d.set_item("unreferenced_bytes", rep.unreferenced_bytes)?;
        Ok(d)
    }

    /// "full" or "factored": how one sample is stored (reads return full slices either way).
    fn representation(&self, task: &str, id: &Bound<'_, PyAny>) -> PyResult<&'static str> {
        let id = sample_id(id)?;
        let s = self.store();
        let r = s.sample(task, &id).py()?;
        Ok(if s.is_factored(r).py()? {
            "factored"
        } else {
            "full"
        })
    }

    /// One (layer, block, head) slice of one sample, `(d, D)` in canonical orientation
    /// (element [j, k]: head dimension j, model dimension k). `head` is a kv head for K
    /// and V.
    #[pyo3(signature = (task, id, layer, block, head, dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn slice<'py>(
        &self,
        py: Python<'py>,
        task: &str,
        id: &Bound<'py, PyAny>,
        layer: usize,
        block: &str,
        head: usize,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ty = out_type(dtype)?;
        let id = sample_id(id)?;
        let b = block_of(block)?;
        let s = self.store();
        let g = s.order().geometry();
        let shape = vec![g.head_dim, g.hidden];
        let task = task.to_string();
        let v = py
            .detach(move || s.read_slice(&task, &id, layer, b, head))
            .py()?;
        to_array(py, shape, v, ty)
    }

    /// The (layer, block, head) slice of many samples, `(n, d, D)`: every sample of the
    /// task in store order, or those of `ids` in that order. Decoded in parallel with the
    /// GIL released. `out`: a C-contiguous float32 numpy array of shape (n, d, D) to
    /// read into (and return) instead of a new one, e.g. one buffer reused over heads.
    #[pyo3(signature = (task, layer, block, head, ids = None, dtype = "f32", out = None))]
    #[allow(clippy::too_many_arguments)]
    fn tile<'py>(
        &self,
        py: Python<'py>,
        task: &str,
        layer: usize,
        block: &str,
        head: usize,
        ids: Option<&Bound<'py, PyAny>>,
        dtype: &str,
        out: Option<Bound<'py, numpy::PyArrayDyn<f32>>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ty = out_type(dtype)?;
        let b = block_of(block)?;
        let ids: Option<Vec<SampleId>> = match ids {
            None => None,
            Some(o) => Some(
                o.try_iter()?
                    .map(|x| sample_id(&x?))
                    .collect::<PyResult<_>>()?,
            ),
        };
        let s = self.store();
        let g = s.order().geometry();
        let (d, dd) = (g.head_dim, g.hidden);
        let task = task.to_string();
        let pos = {
            let s = s.clone();
            let task = task.clone();
            py.detach(move || -> gradshard_store::Result<Vec<usize>> {
                match ids {
                    None => Ok((0..s.samples(&task)?.len()).collect()),
                    Some(ids) => positions(&s, &task, &ids),
                }
            })
            .py()?
        };
        let n = pos.len();
        if let Some(arr) = out {
            if ty != OutType::F32 {
                return Err(PyValueError::new_err(
                    "out= takes a float32 array: use dtype=\"f32\"",
                ));
            }
            if !arr.is_c_contiguous() {
                return Err(PyValueError::new_err("out must be C-contiguous"));
            }
            let mut rw = arr
                .try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
            if rw.shape() != [n, d, dd] {
                return Err(PyValueError::new_err(format!(
                    "out has shape {:?}, the tile is ({n}, {d}, {dd})",
                    rw.shape()
                )));
            }
            let buf = rw
                .as_slice_mut()
                .map_err(|_| PyValueError::new_err("out must be C-contiguous"))?;
            py.detach(|| s.read_tile(&task, &pos, layer, b, head, buf))
                .py()?;
            drop(rw);
            return Ok(arr.into_any());
        }
        let v = py
            .detach(move || -> gradshard_store::Result<Vec<f32>> {
                let mut out = vec![0f32; n * d * dd];
                s.read_tile(&task, &pos, layer, b, head, &mut out)?;
                Ok(out)
            })
            .py()?;
        to_array(py, vec![n, d, dd], v, ty)
    }

    /// The gradient of one Hugging Face tensor of one sample, in the tensor's own shape
    /// and orientation (what `gradshard grads` writes), reassembled from the stored head
    /// slices or row groups. Elements of attention blocks the store does not hold are NaN.
    #[pyo3(signature = (task, id, name, dtype = "f32"))]
    fn tensor<'py>(
        &self,
        py: Python<'py>,
        task: &str,
        id: &Bound<'py, PyAny>,
        name: &str,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ty = out_type(dtype)?;
        let id = sample_id(id)?;
        let s = self.store();
        let (task, name) = (task.to_string(), name.to_string());
        let (shape, v) = py.detach(move || s.read_tensor(&task, &id, &name)).py()?;
        to_array(py, shape, v, ty)
    }

    /// The stored factors of one slice of a factored sample: `(P, S)`, `P` of shape
    /// `(n, d)` and `S` of shape `(n, D)`, so that the slice is `P.T @ S` (n: the
    /// sample's positions). A StoreError for a sample stored as full slices.
    fn factors<'py>(
        &self,
        py: Python<'py>,
        task: &str,
        id: &Bound<'py, PyAny>,
        layer: usize,
        block: &str,
        head: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let id = sample_id(id)?;
        let b = block_of(block)?;
        let s = self.store();
        let task = task.to_string();
        let (p, sf) = py
            .detach(move || -> gradshard_store::Result<_> {
                let frame = s.order().attn(layer, b, head).ok_or_else(|| {
                    gradshard_store::Error::Invalid(format!(
                        "store {} holds no slice layer {layer} block {b} head {head}",
                        s.dir().display()
                    ))
                })?;
                let r = s.sample(&task, &id)?;
                let (_, p, sf) = s.read_frame_factors(r, frame)?;
                Ok((p, sf))
            })
            .py()?;
        let unwrap = |f: gradshard_store::Factor| -> (usize, Vec<f32>) {
            (
                f.rows,
                Arc::try_unwrap(f.values).unwrap_or_else(|a| (*a).clone()),
            )
        };
        let (pn, pv) = unwrap(p);
        let (sn, sv) = unwrap(sf);
        let pc = pv.len() / pn.max(1);
        let sc = sv.len() / sn.max(1);
        let pa = to_array(py, vec![pn, pc], pv, OutType::F32)?;
        let sa = to_array(py, vec![sn, sc], sv, OutType::F32)?;
        PyTuple::new(py, [pa, sa])
    }

    /// The columns of the index table (one row per frame of every sample; the schema of
    /// `schemas/store/index.arrow.json`), for `Store.index()` to build a pyarrow.Table:
    /// a dict of name → list (strings) or (numpy values, numpy null mask or None).
    fn _index_columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.store();
        let cols = py.detach(move || index_columns(&s)).py()?;
        let d = PyDict::new(py);
        d.set_item("task", cols.task)?;
        d.set_item("sample_id", cols.sample_id)?;
        d.set_item("sample_id_kind", cols.sample_id_kind)?;
        d.set_item("tokens", (cols.tokens.into_pyarray(py), py.None()))?;
        d.set_item("frame", (cols.frame.into_pyarray(py), py.None()))?;
        d.set_item("kind", cols.kind)?;
        let (v, m) = split(cols.layer);
        d.set_item("layer", (v.into_pyarray(py), m.into_pyarray(py)))?;
        d.set_item("block", cols.block)?;
        let (v, m) = split(cols.head);
        d.set_item("head", (v.into_pyarray(py), m.into_pyarray(py)))?;
        d.set_item("tensor", cols.tensor)?;
        let (v, m) = split(cols.row_start);
        d.set_item("row_start", (v.into_pyarray(py), m.into_pyarray(py)))?;
        let (v, m) = split(cols.row_end);
        d.set_item("row_end", (v.into_pyarray(py), m.into_pyarray(py)))?;
        d.set_item("shard", (cols.shard.into_pyarray(py), py.None()))?;
        d.set_item("offset", (cols.offset.into_pyarray(py), py.None()))?;
        d.set_item("length", (cols.length.into_pyarray(py), py.None()))?;
        d.set_item("raw_length", (cols.raw_length.into_pyarray(py), py.None()))?;
        d.set_item("checksum", cols.checksum)?;
        d.set_item("frame_kind", cols.frame_kind)?;
        let (v, m) = split(cols.shared_factor);
        d.set_item("shared_factor", (v.into_pyarray(py), m.into_pyarray(py)))?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let s = self.store();
        let n = s.index().n_samples();
        format!(
            "gradshard.Store({:?}: {} samples in {} tasks, {}, format v{})",
            self.path.display().to_string(),
            n,
            s.tasks().len(),
            s.manifest().spec.dtype,
            s.manifest().format_version
        )
    }
}

fn gradshard_core_layout(l: gradshard_core::Layout) -> String {
    // The manifest's spelling (serde), e.g. "split_linear".
    serde_json::to_value(l)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{l:?}"))
}

/// A nullable column as (values, null mask).
fn split(v: Vec<Option<i32>>) -> (Vec<i32>, Vec<bool>) {
    v.into_iter().map(|x| (x.unwrap_or(0), x.is_none())).unzip()
}

#[derive(Default)]
struct IndexColumns {
    task: Vec<String>,
    sample_id: Vec<String>,
    sample_id_kind: Vec<&'static str>,
    tokens: Vec<i64>,
    frame: Vec<i32>,
    kind: Vec<&'static str>,
    layer: Vec<Option<i32>>,
    block: Vec<Option<&'static str>>,
    head: Vec<Option<i32>>,
    tensor: Vec<Option<String>>,
    row_start: Vec<Option<i32>>,
    row_end: Vec<Option<i32>>,
    shard: Vec<i32>,
    offset: Vec<i64>,
    length: Vec<i64>,
    raw_length: Vec<i64>,
    checksum: Vec<String>,
    frame_kind: Vec<&'static str>,
    shared_factor: Vec<Option<i32>>,
}

/// One row per frame of every committed sample, shared factors included, as
/// `gradshard inspect --index-parquet` writes them (both from `Store::frame_rows`):
/// samples in index order, frames in table order.
fn index_columns(store: &Store) -> gradshard_store::Result<IndexColumns> {
    let mut c = IndexColumns::default();
    store.prefetch_tables();
    for r in store.index().records() {
        let (sid, kind) = match &r.id {
            SampleId::Int(v) => (v.to_string(), "int"),
            SampleId::Str(s) => (s.clone(), "str"),
        };
        for row in store.frame_rows(r)? {
            c.task.push(r.task.to_string());
            c.sample_id.push(sid.clone());
            c.sample_id_kind.push(kind);
            c.tokens.push(r.tokens as i64);
            c.frame.push(row.frame as i32);
            c.kind.push(row.kind);
            c.layer.push(row.layer.map(|v| v as i32));
            c.block.push(row.block.map(|b| b.as_str()));
            c.head.push(row.head.map(|v| v as i32));
            c.row_start.push(row.rows.map(|(a, _)| a as i32));
            c.row_end.push(row.rows.map(|(_, b)| b as i32));
            c.tensor.push(row.tensor);
            c.shard.push(row.shard as i32);
            c.offset.push(row.entry.offset as i64);
            c.length.push(row.entry.frame_len as i64);
            c.raw_length.push(row.entry.raw_len as i64);
            c.checksum.push(format!("{:016x}", row.entry.checksum));
            c.frame_kind.push(row.frame_kind.as_str());
            c.shared_factor.push(row.shared_factor.map(|j| j as i32));
        }
    }
    Ok(c)
}

/// Rounds a float32 numpy array to bfloat16 (nearest, ties to even) and wraps it for
/// DLPack: `torch.from_dlpack(gradshard.bf16_dlpack(a))`, or any other DLPack consumer.
/// This is what `dtype="bf16"` does before handing the result to torch.
#[pyfunction]
fn bf16_dlpack(a: numpy::PyReadonlyArrayDyn<'_, f32>) -> dlpack::Bf16Array {
    let v = a.as_array();
    let shape = v.shape().to_vec();
    let bits = v.iter().map(|x| f32_to_bf16_bits(*x)).collect();
    dlpack::Bf16Array::new(bits, shape)
}

/// `gradshard._native`: `_Store` (the base class of the Python `gradshard.Store` that
/// `gradshard.open` returns), `StoreError`, `Bf16Array` and `bf16_dlpack`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("StoreError", m.py().get_type::<StoreError>())?;
    m.add_class::<PyStore>()?;
    m.add_class::<dlpack::Bf16Array>()?;
    m.add_class::<writer::PyWriter>()?;
    m.add_function(wrap_pyfunction!(bf16_dlpack, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
