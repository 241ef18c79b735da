//! Shared helpers for the integration tests: fixture paths, reading reference
//! gradient files, and the normwise relative error used by the acceptance
//! criteria.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gradshard_models::{SampleGrads, SampleId, TokenSample};
use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures` at the workspace root (a fresh clone tests itself);
/// `GRADSHARD_FIXTURES` overrides it (for test binaries run on another machine).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("GRADSHARD_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

pub fn model_dir(model: &str) -> PathBuf {
    fixtures().join(model).join("model")
}

pub fn task_file(model: &str, task: &str) -> PathBuf {
    fixtures()
        .join(model)
        .join("tasks")
        .join(format!("{task}.jsonl"))
}

pub const MODELS: [&str; 2] = ["llama-gqa", "gpt2"];
pub const TASKS: [&str; 2] = ["math", "general"];

/// A fixture line: id, text and the reference input_ids.
pub struct FixtureSample {
    pub id: i64,
    pub text: String,
    pub input_ids: Vec<u32>,
}

pub fn read_task(model: &str, task: &str) -> Vec<FixtureSample> {
    let text = std::fs::read_to_string(task_file(model, task)).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            FixtureSample {
                id: v["id"].as_i64().unwrap(),
                text: v["text"].as_str().unwrap().to_string(),
                input_ids: v["input_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect(),
            }
        })
        .collect()
}

pub fn token_samples(model: &str, task: &str) -> Vec<TokenSample> {
    read_task(model, task)
        .into_iter()
        .map(|s| TokenSample {
            id: SampleId::Int(s.id),
            ids: s.input_ids,
            line: 0,
        })
        .collect()
}

/// A reference gradient file: tensors (name -> (shape, values)) and metadata.
pub struct RefGrads {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub tokens: usize,
    pub loss_sum: f64,
}

pub fn read_grads_file(path: &Path) -> RefGrads {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().expect("metadata");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F32, "{name} in {}", path.display());
        let vals = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.insert(name, (view.shape().to_vec(), vals));
    }
    RefGrads {
        tensors,
        tokens: md["tokens"].parse().unwrap(),
        loss_sum: md["loss_sum"].parse().unwrap(),
    }
}

pub fn ref_grads(model: &str, task: &str, id: &SampleId) -> RefGrads {
    read_grads_file(
        &fixtures()
            .join(model)
            .join("grads")
            .join(task)
            .join(format!("{id}.safetensors")),
    )
}

/// ‖ours − ref‖ / ‖ref‖ (f64 accumulation).
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&a, &b) in ours.iter().zip(reference) {
        let (a, b) = (a as f64, b as f64);
        num += (a - b) * (a - b);
        den += b * b;
    }
    assert!(den > 0.0, "reference gradient is all zeros");
    (num / den).sqrt()
}

/// The fixture checkpoint's tensors as (name, shape, f32 values).
pub fn read_checkpoint(model: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(model_dir(model).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, v.shape().to_vec(), vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Write `tensors` as a checkpoint in `dir` in `dtype` (F32, BF16 or F16),
/// split over `shards` files with a `model.safetensors.index.json` when
/// shards > 1; copies config.json and tokenizer.json of fixture `model`.
pub fn write_checkpoint(
    model: &str,
    dir: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: Dtype,
    shards: usize,
) {
    use safetensors::tensor::TensorView;
    let src = model_dir(model);
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let encoded: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
            Dtype::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
            other => panic!("unsupported test dtype {other:?}"),
        })
        .collect();
    let mut weight_map = serde_json::Map::new();
    for shard in 0..shards {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", shard + 1, shards)
        };
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&encoded)
            .enumerate()
            .filter(|(i, _)| i % shards == shard)
            .map(|(_, ((n, s, _), b))| {
                weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
                (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// `got` is `reference` (same sample, T, tensor names and shapes), its loss within
/// 1e-6 and every tensor within `tol` (relative Frobenius); `what` names the case
/// in failure messages.
pub fn assert_same_grads(reference: &SampleGrads, got: &SampleGrads, tol: f64, what: &str) {
    let (a, b) = (reference, got);
    assert_eq!(a.id, b.id, "{what}");
    assert_eq!(a.tokens, b.tokens, "{what}: T");
    let lr = (a.loss_sum - b.loss_sum).abs() / a.loss_sum.abs();
    assert!(
        lr <= 1e-6,
        "{what}/{}: loss {} vs {}",
        a.id,
        a.loss_sum,
        b.loss_sum
    );
    assert_eq!(a.grads.len(), b.grads.len(), "{what}");
    for (x, y) in a.grads.iter().zip(&b.grads) {
        assert_eq!(x.name, y.name, "{what}");
        assert_eq!(x.shape, y.shape, "{what}: {}", x.name);
        let e = rel_err(&y.data, &x.data);
        assert!(e <= tol, "{what}/{}: {} rel err {e:e}", a.id, x.name);
    }
}
