//! Seeded random checkpoints and token tasks, for benchmarks on machines that
//! cannot reach a model hub (`gradshard make-model`): any config the loader
//! accepts, at real shapes (e.g. the 0.89 B LLaMA shape of docs/design.md §6's PyTorch
//! figure), written as one `model.safetensors` the loader then reads like any
//! Hugging Face checkpoint.
//!
//! Values: 2-D weights uniform with standard deviation `std` (default 0.02, the
//! usual transformer initialisation), 1-D weights 1 (norm scales) or 0 (biases).
//! Each tensor has its own SplitMix64 stream keyed by (seed, tensor index), so a
//! checkpoint is a pure function of its config and seed. Files are written to a
//! temporary name, synced and renamed: no partial `model.safetensors` on a crash.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::model::checkpoint_spec;
use crate::weights::SINGLE_FILE;
use gradshard_core::model::ModelConfig;

/// Element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    Bf16,
    F32,
}

impl WeightDtype {
    fn bytes(self) -> usize {
        match self {
            WeightDtype::Bf16 => 2,
            WeightDtype::F32 => 4,
        }
    }
    fn name(self) -> &'static str {
        match self {
            WeightDtype::Bf16 => "BF16",
            WeightDtype::F32 => "F32",
        }
    }
}

/// What [`write_random_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomCheckpoint {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

/// SplitMix64: a tiny seeded generator, enough for weights nobody trains.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64, stream: u64) -> SplitMix {
        let mut s = SplitMix(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next();
        s
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn out_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Bytes of the `model.safetensors` that [`write_random_checkpoint`] writes for
/// `config` (tensor bytes plus an upper bound of the header), computed without
/// allocating or writing anything.
pub fn checkpoint_bytes(config: &ModelConfig, dtype: WeightDtype) -> u64 {
    let spec = checkpoint_spec(config);
    let data: u64 = spec
        .iter()
        .map(|w| w.shape.iter().map(|&d| d as u64).product::<u64>() * dtype.bytes() as u64)
        .sum();
    // Each header entry is its name plus well under 200 bytes of dtype, shape and offsets.
    let header: u64 = spec.iter().map(|w| w.name.len() as u64 + 200).sum::<u64>() + 256;
    8 + header + data
}

/// Writes `dir/config.json` (`config` as given) and `dir/model.safetensors` with
/// random weights for every tensor the loader expects from that config. `dir` is
/// created if absent; an existing `model.safetensors` is an error (nothing is
/// overwritten).
pub fn write_random_checkpoint(
    dir: &Path,
    config: &Value,
    seed: u64,
    dtype: WeightDtype,
    std: f32,
) -> Result<RandomCheckpoint> {
    let cfg_path = dir.join("config.json");
    let parsed = ModelConfig::from_value(&cfg_path, config)?;
    let st_path = dir.join(SINGLE_FILE);
    if st_path.exists() || cfg_path.exists() {
        return Err(out_err(
            dir,
            "already holds a config.json or model.safetensors; choose an empty directory",
        ));
    }
    if !(std.is_finite() && std >= 0.0) {
        return Err(out_err(dir, format!("std {std} must be finite and >= 0")));
    }
    let created = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let result = write_files(dir, config, &parsed, seed, dtype, std);
    if result.is_err() && created {
        // Every file of this call is removed on its failure paths; the directory
        // it created goes too (remove_dir only removes an empty one).
        let _ = std::fs::remove_dir(dir);
    }
    result
}

fn write_files(
    dir: &Path,
    config: &Value,
    parsed: &ModelConfig,
    seed: u64,
    dtype: WeightDtype,
    std: f32,
) -> Result<RandomCheckpoint> {
    let cfg_path = dir.join("config.json");
    let st_path = dir.join(SINGLE_FILE);
    let spec = checkpoint_spec(parsed);

    // Header: every tensor's dtype, shape and byte range, in spec order.
    let mut header = Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": "pt", "generator": "gradshard make-model", "seed": seed.to_string()}),
    );
    let mut off = 0u64;
    let mut params = 0u64;
    for w in &spec {
        let n: u64 = w.shape.iter().map(|&d| d as u64).product();
        let len = n * dtype.bytes() as u64;
        header.insert(
            w.name.clone(),
            json!({"dtype": dtype.name(), "shape": w.shape, "data_offsets": [off, off + len]}),
        );
        off += len;
        params += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).expect("a JSON map serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }

    let tmp = dir.join(format!(".{SINGLE_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut out = BufWriter::with_capacity(8 << 20, f);
        out.write_all(&(h.len() as u64).to_le_bytes())?;
        out.write_all(&h)?;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        for (i, w) in spec.iter().enumerate() {
            let n: usize = w.shape.iter().product();
            let mut rng = SplitMix::new(seed, i as u64);
            let constant = (w.shape.len() == 1).then(|| {
                if w.name.ends_with("bias") {
                    0.0f32
                } else {
                    1.0
                }
            });
            // Uniform on [-a, a] has standard deviation a/√3.
            let a = std * 3f32.sqrt();
            let mut left = n;
            while left > 0 {
                let k = left.min(1 << 18);
                buf.clear();
                for _ in 0..k {
                    let v = constant.unwrap_or_else(|| a * rng.unit());
                    match dtype {
                        WeightDtype::Bf16 => {
                            buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())
                        }
                        WeightDtype::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                    }
                }
                out.write_all(&buf)?;
                left -= k;
            }
        }
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&st_path, e));
    }
    if let Err(e) = write_atomically(
        &cfg_path,
        serde_json::to_vec_pretty(config).expect("a JSON value serialises"),
    ) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, &st_path) {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&cfg_path);
        return Err(Error::io(&st_path, e));
    }
    Ok(RandomCheckpoint {
        tensors: spec.len(),
        params,
        bytes: 8 + h.len() as u64 + off,
    })
}

fn write_atomically(path: &Path, bytes: Vec<u8>) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let done = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Writes `dir/<task>.jsonl` for each task: `samples` lines
/// `{"id": i, "input_ids": [...]}` of `seq` token ids below `vocab`, seeded.
/// Returns the files written.
pub fn write_random_tasks(
    dir: &Path,
    tasks: &[String],
    samples: usize,
    seq: usize,
    vocab: usize,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    if seq < 2 || vocab == 0 {
        return Err(out_err(
            dir,
            format!("need seq >= 2 (got {seq}) and vocab > 0 (got {vocab})"),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for (t, task) in tasks.iter().enumerate() {
        let path = dir.join(format!("{task}.jsonl"));
        let mut rng = SplitMix::new(seed ^ 0x7461_736B, t as u64);
        let mut text = String::new();
        for i in 0..samples {
            let ids: Vec<u64> = (0..seq).map(|_| rng.next() % vocab as u64).collect();
            text.push_str(&json!({"id": i, "input_ids": ids}).to_string());
            text.push('\n');
        }
        write_atomically(&path, text.into_bytes())?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_values_stay_in_range_and_differ_between_streams() {
        let mut a = SplitMix::new(0, 0);
        let mut b = SplitMix::new(0, 1);
        let va: Vec<f32> = (0..1000).map(|_| a.unit()).collect();
        let vb: Vec<f32> = (0..1000).map(|_| b.unit()).collect();
        assert!(va.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(va, vb);
        let mean = va.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1, "{mean}");
    }
}
