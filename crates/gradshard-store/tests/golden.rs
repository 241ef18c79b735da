//! The golden version-1 store (`tests/fixtures/golden-v1`, written by the format-1
//! code with `gradshard ingest --dtype f32` from the LLaMA-GQA fixture gradients, 3
//! samples per task) reads bit-exactly forever, verifies, and takes appends as v1.
//! The golden version-2 store (`tests/fixtures/golden-v2`, factored samples written
//! by `gradshard collect` before frame codec 2) reads within the fixtures' tolerance,
//! verifies, and takes appends as v2 with its own codec.

use std::path::{Path, PathBuf};

use gradshard_core::{SampleId, TaskName};
use gradshard_store::{
    verify, CodecName, Representation, SampleMeta, Store, StoreWriter, WriterOptions,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden() -> PathBuf {
    fixtures().join("golden-v1/store")
}

/// (tensor name, values) of one fixture gradient file.
fn read_st(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n.to_string(), d)
        })
        .collect()
}

#[test]
fn golden_v1_store_reads_bit_exactly() {
    let store = Store::open(&golden()).unwrap();
    assert_eq!(store.manifest().format_version, 1);
    let mut compared = 0;
    for task in ["math", "general"] {
        let recs = store.samples(task).unwrap().to_vec();
        assert_eq!(recs.len(), 3, "{task}");
        for r in &recs {
            assert!(!store.is_factored(r).unwrap());
            let SampleId::Int(id) = r.id else {
                panic!("integer ids")
            };
            let file = fixtures().join(format!("llama-gqa/grads/{task}/{id}.safetensors"));
            for (name, want) in read_st(&file) {
                let (_, got) = store.read_tensor(task, &r.id, &name).unwrap();
                assert_eq!(got.len(), want.len(), "{task} {id} {name}");
                for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{task} sample {id} `{name}` [{k}]"
                    );
                }
                compared += 1;
            }
        }
    }
    assert!(compared >= 6 * 7, "{compared} tensors compared");
    let rep = verify(&golden(), &|_, _| {}).unwrap();
    assert!(rep.ok(), "{:?}", rep.problems);
}

#[test]
fn a_writer_appends_to_a_v1_store_as_v1_and_refuses_factored_samples() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("store");
    std::fs::create_dir_all(copy.join("shards")).unwrap();
    for e in walk(&golden()) {
        let rel = e.strip_prefix(golden()).unwrap();
        std::fs::copy(&e, copy.join(rel)).unwrap();
    }
    let spec = Store::open(&copy).unwrap().manifest().spec.clone();
    let mut w = StoreWriter::open_or_create(&copy, &spec, WriterOptions::default()).unwrap();
    let meta = |id| SampleMeta {
        task: TaskName::new("math").unwrap(),
        id: SampleId::Int(id),
        tokens: 4,
        loss_sum: 1.0,
    };
    let e = w
        .begin_sample_as(meta(100), Representation::Factored)
        .unwrap_err()
        .to_string();
    assert!(e.contains("format version 1"), "{e}");
    let mut h = w.begin_sample(meta(101)).unwrap();
    for f in 0..w.order().n_frames() {
        let n = w.order().frame_numel(f).unwrap();
        w.put_frame(&mut h, f, vec![0.5; n]).unwrap();
    }
    w.end_sample(h).unwrap();
    w.finish().unwrap();
    let store = Store::open(&copy).unwrap();
    assert_eq!(store.manifest().format_version, 1);
    let r = store.sample("math", &SampleId::Int(101)).unwrap().clone();
    let bytes = std::fs::read(gradshard_store::shard_path(&copy, r.shard)).unwrap();
    assert_eq!(&bytes[8..10], &[1, 0], "new shard written as version 1");
    assert_eq!(store.read_frame(&r, 0).unwrap()[0], 0.5);
    assert!(verify(&copy, &|_, _| {}).unwrap().ok());
}

fn golden_v2() -> PathBuf {
    fixtures().join("golden-v2/store")
}

#[test]
fn golden_v2_factored_store_reads_within_fixture_tolerance() {
    let store = Store::open(&golden_v2()).unwrap();
    assert_eq!(store.manifest().format_version, 2);
    assert_eq!(store.manifest().spec.codec.name, CodecName::Zstd);
    let mut compared = 0;
    for task in ["math", "general"] {
        let recs = store.samples(task).unwrap().to_vec();
        assert_eq!(recs.len(), 3, "{task}");
        for r in &recs {
            assert!(store.is_factored(r).unwrap());
            let SampleId::Int(id) = r.id else {
                panic!("integer ids")
            };
            let file = fixtures().join(format!("llama-gqa/grads/{task}/{id}.safetensors"));
            for (name, want) in read_st(&file) {
                let (_, got) = store.read_tensor(task, &r.id, &name).unwrap();
                assert_eq!(got.len(), want.len(), "{task} {id} {name}");
                let (mut d2, mut w2) = (0f64, 0f64);
                for (a, b) in got.iter().zip(&want) {
                    d2 += (*a as f64 - *b as f64).powi(2);
                    w2 += (*b as f64).powi(2);
                }
                let rel = (d2 / w2.max(f64::MIN_POSITIVE)).sqrt();
                assert!(rel <= 1e-4, "{task} sample {id} `{name}`: {rel:e}");
                compared += 1;
            }
        }
    }
    assert!(compared >= 6 * 7, "{compared} tensors compared");
    let rep = verify(&golden_v2(), &|_, _| {}).unwrap();
    assert!(rep.ok(), "{:?}", rep.problems);
}

#[test]
fn a_writer_appends_to_a_v2_store_as_v2_with_its_codec() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("store");
    for e in walk(&golden_v2()) {
        let rel = e.strip_prefix(golden_v2()).unwrap();
        std::fs::create_dir_all(copy.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&e, copy.join(rel)).unwrap();
    }
    let spec = Store::open(&copy).unwrap().manifest().spec.clone();
    let mut w = StoreWriter::open_or_create(&copy, &spec, WriterOptions::default()).unwrap();
    let mut h = w
        .begin_sample(SampleMeta {
            task: TaskName::new("math").unwrap(),
            id: SampleId::Int(101),
            tokens: 4,
            loss_sum: 1.0,
        })
        .unwrap();
    for f in 0..w.order().n_frames() {
        let n = w.order().frame_numel(f).unwrap();
        w.put_frame(&mut h, f, vec![0.5; n]).unwrap();
    }
    w.end_sample(h).unwrap();
    w.finish().unwrap();
    let store = Store::open(&copy).unwrap();
    assert_eq!(store.manifest().format_version, 2);
    assert_eq!(store.manifest().spec.codec.name, CodecName::Zstd);
    let r = store.sample("math", &SampleId::Int(101)).unwrap().clone();
    let shard = gradshard_store::shard_path(&copy, r.shard);
    let rel = shard.strip_prefix(&copy).unwrap();
    assert!(
        !golden_v2().join(rel).exists(),
        "the sample went to a new shard"
    );
    let bytes = std::fs::read(&shard).unwrap();
    assert_eq!(&bytes[8..10], &[2, 0], "new shard written as version 2");
    // The first frame of the new shard (right after its 64-byte header) is codec 1.
    assert_eq!(bytes[64], 1, "frames keep the store's codec");
    assert_eq!(store.read_frame(&r, 0).unwrap()[0], 0.5);
    assert!(verify(&copy, &|_, _| {}).unwrap().ok());
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().is_some_and(|n| n != "LOCK") {
            out.push(p);
        }
    }
    out
}
