//! Loading of safetensors checkpoints (single file or sharded with
//! `model.safetensors.index.json`) through the `safetensors` crate over
//! memory maps. Weights are converted to f32 on load: bf16 and f16 are
//! widened exactly, so the model always computes in f32.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Name of the single-file checkpoint inside a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index inside a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One weight the architecture expects: HF name and shape.
#[derive(Debug, Clone)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Where a tensor lives: which mapped file, its dtype and shape.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// The memory-mapped files of one checkpoint and a name -> location table.
pub(crate) struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, Entry>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives as long as `Checkpoint`; a
    // checkpoint file modified by another process while we read it would give
    // garbage values but cannot violate memory safety of this process beyond
    // what any mmap reader accepts (this is how HF and safetensors load too).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl Checkpoint {
    /// Open `dir/model.safetensors.index.json` if present, else `dir/model.safetensors`.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let shard_names: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&index_path, e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index_path, "missing object `weight_map`"))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::config(
                        &index_path,
                        format!("weight_map[{tensor:?}] is not a string"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::config(
                        &index_path,
                        format!("weight_map[{tensor:?}] = {file:?} is not a plain file name"),
                    ));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            names
        } else {
            vec![SINGLE_FILE.to_string()]
        };

        let mut files = Vec::with_capacity(shard_names.len());
        let mut entries = BTreeMap::new();
        for (fi, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let mmap = map_file(&path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| match &e {
                safetensors::SafeTensorError::InvalidOffset(_) => match bad_ranges(&mmap) {
                    Some(d) => st_err(&path, d),
                    None => st_err(&path, e),
                },
                _ => st_err(&path, e),
            })?;
            for (tname, view) in st.tensors() {
                if let Some(prev) = entries.insert(
                    tname.clone(),
                    Entry {
                        file: fi,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                    },
                ) {
                    // Within one file names are unique, so `prev` is an earlier shard.
                    let prev_path = files
                        .get(prev.file)
                        .map(|(p, _): &(PathBuf, Mmap)| p.display().to_string())
                        .unwrap_or_default();
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor `{tname}` is stored twice (also in {prev_path})"),
                    });
                }
            }
            files.push((path, mmap));
        }
        Ok(Checkpoint { files, entries })
    }

    /// Path used in error messages: the file holding `name`, or the directory's
    /// main file when the tensor is missing altogether.
    fn path_of(&self, name: &str) -> PathBuf {
        match self.entries.get(name) {
            Some(e) => self.files[e.file].0.clone(),
            None => self.files[0].0.clone(),
        }
    }

    /// Check the checkpoint against `spec`: every expected tensor present with
    /// the expected shape, and nothing else except names for which
    /// `ignorable` returns true (buffers such as `rotary_emb.inv_freq`).
    pub(crate) fn validate(
        &self,
        spec: &[WeightSpec],
        ignorable: &dyn Fn(&str) -> bool,
        arch: &str,
    ) -> Result<()> {
        let mut expected: HashMap<&str, &[usize]> = HashMap::new();
        for w in spec {
            expected.insert(&w.name, &w.shape);
            match self.entries.get(&w.name) {
                None => {
                    return Err(Error::MissingTensor {
                        path: self.path_of(&w.name),
                        tensor: w.name.clone(),
                        expected: w.shape.clone(),
                    })
                }
                Some(e) if e.shape != w.shape => {
                    return Err(Error::ShapeMismatch {
                        path: self.path_of(&w.name),
                        tensor: w.name.clone(),
                        expected: w.shape.clone(),
                        found: e.shape.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        for (name, e) in &self.entries {
            if !expected.contains_key(name.as_str()) && !ignorable(name) {
                return Err(Error::UnexpectedTensor {
                    path: self.path_of(name),
                    tensor: name.clone(),
                    shape: e.shape.clone(),
                    arch: arch.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Shape of a stored tensor, if present.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Read tensor `name` as f32 values in row-major order of its stored shape.
    pub(crate) fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path_of(name),
            tensor: name.to_string(),
            expected: vec![],
        })?;
        let (path, mmap) = &self.files[entry.file];
        let st = SafeTensors::deserialize(mmap).map_err(|e| st_err(path, e))?;
        let view = st.tensor(name).map_err(|e| st_err(path, e))?;
        let bytes = view.data();
        let n: usize = entry.shape.iter().product();
        let out: Vec<f32> = match entry.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(Error::Dtype {
                    path: path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        if out.len() != n {
            return Err(st_err(
                path,
                format!("tensor `{name}` holds {} values, shape says {n}", out.len()),
            ));
        }
        Ok(out)
    }
}

/// Where the tensors' byte ranges in a safetensors header first fail to tile the data
/// section, said with the tensor at fault (a tensor missing from the header leaves a
/// gap, reported between its neighbours) rather than the tensor after it.
fn bad_ranges(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let mut ranges = Vec::new();
    for (name, v) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let o = v.get("data_offsets")?.as_array()?;
        ranges.push((name.as_str(), o.first()?.as_u64()?, o.get(1)?.as_u64()?));
    }
    ranges.sort_by_key(|r| (r.1, r.2));
    let mut end = 0u64;
    let mut prev: Option<&str> = None;
    for (name, s, e) in ranges {
        if e < s {
            return Some(format!(
                "tensor `{name}` has data_offsets [{s}, {e}]: its end lies before its start"
            ));
        }
        if s > end {
            let place = match prev {
                Some(p) => format!("between tensors `{p}` and `{name}`"),
                None => format!("before tensor `{name}`"),
            };
            return Some(format!(
                "data bytes {end}..{s} ({place}) belong to no tensor in the header: a tensor is missing from the header, or its offsets are wrong"
            ));
        }
        if s < end {
            return Some(format!(
                "tensor `{name}` has data_offsets [{s}, {e}], overlapping the bytes ..{end} of tensor `{}`",
                prev.unwrap_or("?")
            ));
        }
        end = e;
        prev = Some(name);
    }
    None
}
