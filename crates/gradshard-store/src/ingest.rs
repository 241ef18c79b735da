//! `ingest`: directories of per-sample safetensors files (the layout of
//! `tests/fixtures/*/grads/<task>/<id>.safetensors`) into a store. This is how
//! PyTorch users bring their gradients.

use std::path::{Path, PathBuf};

use gradshard_core::{
    bf16_bits_to_f32, f32_to_bf16_bits, Block, DType, Geometry, OtherTensor, SampleId, TaskName,
};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, IoContext, Result};
use crate::manifest::{CodecSpec, StoreSpec};
use crate::writer::{SampleMeta, StoreWriter, WriteReport, WriterOptions};

/// Settings of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Directory with the model's `config.json`.
    pub model_dir: PathBuf,
    /// (task name, directory of `<id>.safetensors` files).
    pub tasks: Vec<(TaskName, PathBuf)>,
    pub store: PathBuf,
    pub dtype: DType,
    pub codec: CodecSpec,
    pub writer: WriterOptions,
}

/// What ingest did.
#[derive(Debug, Clone)]
pub struct IngestReport {
    pub write: WriteReport,
    /// Samples skipped because the store already held them (resume).
    pub skipped: u64,
    pub files: u64,
    /// Tensors present in the input that are not stored (not 2-D).
    pub ignored_tensors: Vec<String>,
}

/// One input file.
#[derive(Debug, Clone)]
pub struct SampleFile {
    pub task: TaskName,
    pub id: SampleId,
    pub path: PathBuf,
}

fn input_err(path: &Path, what: impl Into<String>) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Lists `<id>.safetensors` files of a task directory, in id order.
pub fn list_task_dir(task: &TaskName, dir: &Path) -> Result<Vec<SampleFile>> {
    let rd = std::fs::read_dir(dir).at(dir)?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.at(dir)?;
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("safetensors") {
            continue;
        }
        let stem = p
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| input_err(&p, "file name is not UTF-8"))?;
        let id = SampleId::from_file_stem(stem).map_err(|e| input_err(&p, e.to_string()))?;
        out.push(SampleFile {
            task: task.clone(),
            id,
            path: p,
        });
    }
    if out.is_empty() {
        return Err(input_err(
            dir,
            format!("task `{task}`: no *.safetensors files"),
        ));
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn map(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).at(path)?;
    // SAFETY: input files are read-only for the duration of the ingest; a concurrent
    // writer to them would be a user error that at worst yields wrong values, which the
    // shape and metadata checks below do not hide.
    unsafe { Mmap::map(&f) }.at(path)
}

/// Parses a sample file. When the header's byte ranges do not tile the data (a tensor
/// missing from the header, or wrong offsets), the message names the tensor at fault,
/// not the next one: the gap or overlap, its neighbours, and which of the tensors
/// `geometry` expects (its attention tensors) the header lacks.
fn parse<'a>(path: &Path, bytes: &'a [u8], geometry: &Geometry) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        let detail = match (&e, header_ranges(bytes)) {
            (safetensors::SafeTensorError::InvalidOffset(_), Some(ranges)) => {
                let mut g = geometry.clone();
                g.detect_root(ranges.iter().map(|r| r.0.as_str()));
                let missing: Vec<String> = g
                    .all_attn_tensors()
                    .into_iter()
                    .map(|t| t.name)
                    .filter(|n| !ranges.iter().any(|r| &r.0 == n))
                    .collect();
                describe_bad_ranges(&ranges, &missing)
            }
            _ => None,
        };
        input_err(
            path,
            match detail {
                Some(d) => format!("not a valid safetensors file: {d}"),
                None => format!("not a valid safetensors file: {e}"),
            },
        )
    })
}

/// (name, start, end) of every tensor in a safetensors header, by start offset.
fn header_ranges(bytes: &[u8]) -> Option<Vec<(String, u64, u64)>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let mut out = Vec::new();
    for (name, v) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let o = v.get("data_offsets")?.as_array()?;
        out.push((name.clone(), o.first()?.as_u64()?, o.get(1)?.as_u64()?));
    }
    out.sort_by_key(|r| (r.1, r.2));
    Some(out)
}

/// Where the byte ranges first fail to tile the data section, said with the tensor at
/// fault: a gap (a tensor missing from the header, named when `missing` says which
/// expected tensors the header lacks), an overlap, or a range that ends before it starts.
fn describe_bad_ranges(ranges: &[(String, u64, u64)], missing: &[String]) -> Option<String> {
    let mut end = 0u64;
    let mut prev: Option<&str> = None;
    for (name, s, e) in ranges {
        if e < s {
            return Some(format!(
                "tensor `{name}` has data_offsets [{s}, {e}]: its end lies before its start"
            ));
        }
        if *s > end {
            let place = match prev {
                Some(p) => format!("between tensors `{p}` and `{name}`"),
                None => format!("before tensor `{name}`"),
            };
            let who = match missing {
                [] => "a tensor is missing from the header, or its offsets are wrong".to_string(),
                [one] => format!("tensor `{one}` is missing from the header"),
                many => format!(
                    "tensors {} are missing from the header",
                    many.iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Some(format!(
                "{who}: data bytes {end}..{s} ({place}) belong to no tensor in the header"
            ));
        }
        if *s < end {
            return Some(format!(
                "tensor `{name}` has data_offsets [{s}, {e}], overlapping the bytes ..{end} of tensor `{}`",
                prev.unwrap_or("?")
            ));
        }
        end = *e;
        prev = Some(name);
    }
    None
}

/// Reads `tokens` (T ≥ 1) and `loss_sum` from the safetensors metadata.
pub fn read_meta(path: &Path, bytes: &[u8]) -> Result<(u32, f64)> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| input_err(path, format!("not a valid safetensors file: {e}")))?;
    let md = meta.metadata().clone().unwrap_or_default();
    let tokens = md
        .get("tokens")
        .ok_or_else(|| input_err(path, "metadata field `tokens` is missing"))?;
    let tokens: u32 = tokens
        .trim()
        .parse()
        .ok()
        .filter(|t| *t > 0)
        .ok_or_else(|| {
            input_err(
                path,
                format!("metadata field `tokens` = {tokens:?} is not a positive integer"),
            )
        })?;
    let loss = md
        .get("loss_sum")
        .ok_or_else(|| input_err(path, "metadata field `loss_sum` is missing"))?;
    let loss: f64 = loss
        .trim()
        .parse()
        .ok()
        .filter(|l: &f64| l.is_finite())
        .ok_or_else(|| {
            input_err(
                path,
                format!("metadata field `loss_sum` = {loss:?} is not a finite number"),
            )
        })?;
    Ok((tokens, loss))
}

/// Decodes a tensor's data (F32, BF16 or F16, little-endian) into f32.
pub fn tensor_f32(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>> {
    let d = view.data();
    Ok(match view.dtype() {
        StDtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        StDtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => {
            return Err(input_err(
                path,
                format!("tensor `{name}` has dtype {other:?}; F32, BF16 or F16 expected"),
            ))
        }
    })
}

/// Derives what to store from the first sample file: every attention tensor of the
/// geometry (all must be present, with the right shapes) plus every other 2-D tensor.
pub fn spec_from_file(
    geometry: &Geometry,
    path: &Path,
    dtype: DType,
    codec: CodecSpec,
) -> Result<(StoreSpec, Vec<String>)> {
    let m = map(path)?;
    let st = parse(path, &m, geometry)?;
    let mut g = geometry.clone();
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    g.detect_root(names.iter().map(String::as_str));
    let attn = g.all_attn_tensors();
    for t in &attn {
        let v = st.tensor(&t.name).map_err(|_| {
            input_err(
                path,
                format!("attention tensor `{}` {:?} is missing", t.name, t.shape),
            )
        })?;
        g.check_shape(t, v.shape())
            .map_err(|e| input_err(path, e.to_string()))?;
    }
    let mut others = Vec::new();
    let mut ignored = Vec::new();
    let mut sorted = names.clone();
    sorted.sort();
    for n in sorted {
        if attn.iter().any(|t| t.name == n) {
            continue;
        }
        let v = st
            .tensor(&n)
            .map_err(|e| input_err(path, format!("tensor `{n}`: {e}")))?;
        match v.shape() {
            [r, c] if *r > 0 && *c > 0 => {
                others.push(OtherTensor::new(n.clone(), [*r, *c], g.out_axis_of(&n)))
            }
            _ => ignored.push(n),
        }
    }
    Ok((
        StoreSpec {
            geometry: g,
            dtype,
            codec,
            blocks: Block::ALL.to_vec(),
            other_tensors: others,
        },
        ignored,
    ))
}

/// Writes one sample file into the writer (all frames), checking it against the spec.
pub fn put_file(w: &mut StoreWriter, file: &SampleFile) -> Result<()> {
    let path = &file.path;
    let m = map(path)?;
    let order = w.order().clone();
    let g = order.geometry().clone();
    let st = parse(path, &m, &g)?;
    let (tokens, loss_sum) = read_meta(path, &m)?;
    // Check the full tensor set before handing in any frame.
    let dtype = w.manifest().spec.dtype;
    let attn = g.all_attn_tensors();
    for t in &attn {
        let v = st.tensor(&t.name).map_err(|_| {
            input_err(
                path,
                format!("attention tensor `{}` {:?} is missing", t.name, t.shape),
            )
        })?;
        g.check_shape(t, v.shape())
            .map_err(|e| input_err(path, format!("geometry mismatch with the store: {e}")))?;
    }
    for o in order.others() {
        let v = st.tensor(&o.name).map_err(|_| {
            input_err(
                path,
                format!(
                    "tensor `{}` {:?} (stored for every sample) is missing",
                    o.name, o.shape
                ),
            )
        })?;
        if v.shape() != o.shape {
            return Err(input_err(
                path,
                format!("geometry mismatch with the store: tensor `{}` has shape {:?}, the store holds {:?}", o.name, v.shape(), o.shape),
            ));
        }
    }
    for n in st.names() {
        let v = st
            .tensor(n)
            .map_err(|e| input_err(path, format!("tensor `{n}`: {e}")))?;
        if v.shape().len() == 2
            && !attn.iter().any(|t| t.name == *n)
            && order.other_index(n).is_none()
        {
            return Err(input_err(
                path,
                format!("tensor `{n}` {:?} is not stored in this store (its tensor set was fixed by the first sample)", v.shape()),
            ));
        }
    }
    let mut h = w.begin_sample(SampleMeta {
        task: file.task.clone(),
        id: file.id.clone(),
        tokens,
        loss_sum,
    })?;
    for t in &attn {
        let data = tensor_f32(path, &t.name, &st.tensor(&t.name).expect("checked"))?;
        check_storable(path, &t.name, &data, dtype)?;
        for b in &t.blocks {
            for head in 0..g.heads_of(*b) {
                let frame = order.attn(t.layer, *b, head).expect("all blocks stored");
                let slice = g.slice_spec(t.layer, *b, head)?.cut(&data)?;
                w.put_frame(&mut h, frame, slice)?;
            }
        }
    }
    for (ti, o) in order.others().iter().enumerate() {
        let data = tensor_f32(path, &o.name, &st.tensor(&o.name).expect("checked"))?;
        check_storable(path, &o.name, &data, dtype)?;
        for gi in 0..o.groups() {
            let (a, b) = o.group_rows(gi);
            let frame = order.other(ti, gi).expect("group in range");
            w.put_frame(&mut h, frame, data[a * o.shape[1]..b * o.shape[1]].to_vec())?;
        }
    }
    w.end_sample(h)
}

/// Runs an ingest. `progress(done, total)` is called after each file. Input is checked
/// file by file before its frames are written; a bad file stops the run with an error
/// naming it, and every sample committed before it stays valid.
pub fn ingest(opts: &IngestOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<IngestReport> {
    let geometry = Geometry::from_config_path(&opts.model_dir)?;
    let mut files = Vec::new();
    for (task, dir) in &opts.tasks {
        files.extend(list_task_dir(task, dir)?);
    }
    // Metadata of every file is checked before anything is written.
    for f in &files {
        let m = map(&f.path)?;
        parse(&f.path, &m, &geometry)?;
        read_meta(&f.path, &m)?;
    }
    let (spec, ignored) = spec_from_file(&geometry, &files[0].path, opts.dtype, opts.codec)?;
    let mut wopts = opts.writer.clone();
    if wopts.source.is_null() {
        wopts.source = serde_json::json!({
            "kind": "ingest",
            "model": opts.model_dir.display().to_string(),
            "tasks": opts.tasks.iter().map(|(t, d)| (t.to_string(), d.display().to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        });
    }
    let mut w = StoreWriter::open_or_create(&opts.store, &spec, wopts)?;
    let total = files.len() as u64;
    let mut skipped = 0;
    for (i, f) in files.iter().enumerate() {
        if w.is_committed(&f.task, &f.id) {
            skipped += 1;
        } else {
            put_file(&mut w, f)?;
        }
        progress(i as u64 + 1, total);
    }
    let write = w.finish()?;
    Ok(IngestReport {
        write,
        skipped,
        files: total,
        ignored_tensors: ignored,
    })
}

/// Every value must be finite and stay finite in the store's dtype: a value past bf16's
/// range (|v| > 3.39e38, e.g. f32::MAX) would be stored as ±inf and make its task
/// unscoreable later, so it is refused here, naming the tensor and the element.
fn check_storable(path: &Path, tensor: &str, data: &[f32], dtype: DType) -> Result<()> {
    let overflows = |v: f32| {
        !v.is_finite()
            || (dtype == DType::Bf16 && !bf16_bits_to_f32(f32_to_bf16_bits(v)).is_finite())
    };
    if let Some(bad) = data.iter().position(|v| overflows(*v)) {
        let what = if data[bad].is_finite() {
            format!("overflows {dtype} (it would be stored as infinity)")
        } else {
            "is not finite".to_string()
        };
        return Err(input_err(
            path,
            format!(
                "tensor `{tensor}` value {} at flat index {bad} {what}",
                data[bad]
            ),
        ));
    }
    Ok(())
}
