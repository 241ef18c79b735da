//! A [`TileSource`] over the reference fixtures' per-sample safetensors files
//! (`<root>/grads/<task>/<id>.safetensors`, geometry from `<root>/model/config.json`).
//!
//! Everything is loaded into memory at construction: the fixtures are tiny.
//! Used by tests, and usable for any small directory of that shape.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use gradshard_core::{
    bf16_bits_to_f32, f32_to_bf16_bits, Block, Geometry, OtherTensor, SampleId, TaskName,
};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::slice::SliceId;
use crate::source::TileSource;

struct Sample {
    id: SampleId,
    tokens: u32,
    /// tensor name -> (shape, row-major f32 values)
    tensors: HashMap<String, ([usize; 2], Vec<f32>)>,
}

/// Reads the fixtures' gradient files; see the module docs.
pub struct FixtureSource {
    geometry: Geometry,
    tasks: BTreeMap<String, Vec<Sample>>,
    others: Vec<OtherTensor>,
    dropped_blocks: HashSet<Block>,
}

fn fixture_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Fixture {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl FixtureSource {
    /// Opens `<root>` (e.g. `tests/fixtures/llama-gqa`). With `bf16`, every value
    /// is rounded to bfloat16 (nearest even) on load, emulating a bf16 store.
    pub fn open(root: &Path, bf16: bool) -> Result<FixtureSource> {
        let geometry = Geometry::from_config_path(&root.join("model").join("config.json"))?;
        let grads = root.join("grads");
        let rd = std::fs::read_dir(&grads).map_err(|source| Error::Io {
            path: grads.clone(),
            source,
        })?;
        let mut tasks = BTreeMap::new();
        for entry in rd {
            let entry = entry.map_err(|source| Error::Io {
                path: grads.clone(),
                source,
            })?;
            if !entry.path().is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            TaskName::new(name.clone())?;
            tasks.insert(name, load_task(&entry.path(), bf16)?);
        }
        let mut attn: HashSet<String> = HashSet::new();
        for l in 0..geometry.layers {
            for t in geometry.attn_tensors(l) {
                attn.insert(t.name);
            }
        }
        // Non-attention tensors: those of the first sample of the first task; every
        // sample is checked to hold every attention tensor with the expected shape.
        let mut others = Vec::new();
        if let Some(first) = tasks.values().next().and_then(|s| s.first()) {
            let mut names: Vec<&String> = first.tensors.keys().collect();
            names.sort();
            for name in names {
                if !attn.contains(name) {
                    let shape = first.tensors[name].0;
                    others.push(OtherTensor::new(
                        name.clone(),
                        shape,
                        geometry.out_axis_of(name),
                    ));
                }
            }
        }
        for (task, samples) in &tasks {
            for s in samples {
                for l in 0..geometry.layers {
                    for t in geometry.attn_tensors(l) {
                        if let Some((shape, _)) = s.tensors.get(&t.name) {
                            geometry.check_shape(&t, shape)?;
                        } else if s.tensors.keys().any(|k| k.contains("attn")) {
                            return Err(fixture_err(
                                &grads.join(task),
                                format!("sample {} lacks tensor `{}`", s.id, t.name),
                            ));
                        }
                    }
                }
            }
        }
        Ok(FixtureSource {
            geometry,
            tasks,
            others,
            dropped_blocks: HashSet::new(),
        })
    }

    /// Pretends the store does not hold `block` (to test the missing-block error).
    pub fn drop_block(mut self, block: Block) -> Self {
        self.dropped_blocks.insert(block);
        self
    }

    /// Overwrites one value of one sample's tensor (to test non-finite detection).
    pub fn poke(&mut self, task: &str, sample: usize, tensor: &str, index: usize, value: f32) {
        let t = self
            .tasks
            .get_mut(task)
            .and_then(|s| s.get_mut(sample))
            .and_then(|s| s.tensors.get_mut(tensor))
            .expect("poke: no such task, sample or tensor");
        t.1[index] = value;
    }

    /// Replaces the geometry reported (to test mismatch detection).
    pub fn with_geometry(mut self, g: Geometry) -> Self {
        self.geometry = g;
        self
    }

    fn task(&self, task: &TaskName) -> Result<&Vec<Sample>> {
        self.tasks
            .get(task.as_str())
            .ok_or_else(|| Error::UnknownTask {
                task: task.to_string(),
                known: self.tasks.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }
}

fn load_task(dir: &Path, bf16: bool) -> Result<Vec<Sample>> {
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for e in rd {
        let e = e.map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) == Some("safetensors") {
            files.push(p);
        }
    }
    let mut samples = Vec::with_capacity(files.len());
    for path in files {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| fixture_err(&path, "file name is not UTF-8"))?;
        let id = SampleId::from_file_stem(stem)?;
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| fixture_err(&path, format!("invalid safetensors header: {e}")))?;
        let tokens: u32 = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("tokens"))
            .ok_or_else(|| fixture_err(&path, "metadata `tokens` missing"))?
            .parse()
            .map_err(|e| fixture_err(&path, format!("metadata `tokens` is not a u32: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| fixture_err(&path, format!("invalid safetensors: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(fixture_err(
                    &path,
                    format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
                ));
            }
            let shape = view.shape();
            if shape.len() != 2 {
                continue;
            }
            let mut vals: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if bf16 {
                for v in &mut vals {
                    *v = bf16_bits_to_f32(f32_to_bf16_bits(*v));
                }
            }
            tensors.insert(name, ([shape[0], shape[1]], vals));
        }
        samples.push(Sample {
            id,
            tokens,
            tensors,
        });
    }
    samples.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(samples)
}

impl TileSource for FixtureSource {
    fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn samples(&self, task: &TaskName) -> Result<Vec<(SampleId, u32)>> {
        Ok(self
            .task(task)?
            .iter()
            .map(|s| (s.id.clone(), s.tokens))
            .collect())
    }

    fn has_block(&self, block: Block) -> bool {
        if self.dropped_blocks.contains(&block) {
            return false;
        }
        let Ok(spec) = self.geometry.slice_spec(0, block, 0) else {
            return false;
        };
        self.tasks
            .values()
            .flatten()
            .next()
            .is_some_and(|s| s.tensors.contains_key(&spec.tensor))
    }

    fn read_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        let SliceId { layer, block, head } = slice;
        if !self.has_block(block) {
            return Err(Error::MissingBlock { block });
        }
        let all = self.task(task)?;
        let spec = self.geometry.slice_spec(layer, block, head)?;
        let width = cols.len();
        if out.len() != samples.len() * width || cols.end > spec.numel() {
            return Err(Error::TileLength {
                task: task.to_string(),
                layer,
                block,
                head,
                expected: samples.len() * width,
                found: out.len(),
            });
        }
        for (row, &si) in samples.iter().enumerate() {
            let s = all.get(si).ok_or(gradshard_core::Error::OutOfRange {
                what: "sample index",
                value: si,
                limit: all.len(),
            })?;
            let (_, full) = s
                .tensors
                .get(&spec.tensor)
                .ok_or(Error::MissingBlock { block })?;
            let cut = spec.cut(full)?;
            out[row * width..(row + 1) * width].copy_from_slice(&cut[cols.clone()]);
        }
        Ok(())
    }

    fn other_tensors(&self) -> Vec<OtherTensor> {
        self.others.clone()
    }

    fn read_other(
        &self,
        task: &TaskName,
        sample: usize,
        tensor: &str,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let all = self.task(task)?;
        let s = all.get(sample).ok_or(gradshard_core::Error::OutOfRange {
            what: "sample index",
            value: sample,
            limit: all.len(),
        })?;
        let (_, v) = s.tensors.get(tensor).ok_or_else(|| Error::Fixture {
            path: PathBuf::from(tensor),
            message: format!("sample {} has no tensor `{tensor}`", s.id),
        })?;
        out.clear();
        out.extend_from_slice(v);
        Ok(())
    }
}
