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

/// Every tensor of every sample of a golden store (3 per task, stored as factors or not
/// as `factored` says) against the fixture gradient it came from: `check(what, got,
/// want)`. Then the store must verify.
fn check_golden(dir: &Path, factored: bool, check: impl Fn(&str, &[f32], &[f32])) {
    let store = Store::open(dir).unwrap();
    let mut compared = 0;
    for task in ["math", "general"] {
        let recs = store.samples(task).unwrap().to_vec();
        assert_eq!(recs.len(), 3, "{task}");
        for r in &recs {
            assert_eq!(store.is_factored(r).unwrap(), factored);
            let SampleId::Int(id) = r.id else {
                panic!("integer ids")
            };
            let file = fixtures().join(format!("llama-gqa/grads/{task}/{id}.safetensors"));
            for (name, want) in read_st(&file) {
                let (_, got) = store.read_tensor(task, &r.id, &name).unwrap();
                assert_eq!(got.len(), want.len(), "{task} {id} {name}");
                check(&format!("{task} sample {id} `{name}`"), &got, &want);
                compared += 1;
            }
        }
    }
    assert!(compared >= 6 * 7, "{compared} tensors compared");
    let rep = verify(dir, &|_, _| {}).unwrap();
    assert!(rep.ok(), "{:?}", rep.problems);
}

/// A copy of a golden store (never written in place) in a temporary directory.
fn copy_store(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("store");
    for e in walk(src) {
        let dst = copy.join(e.strip_prefix(src).unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&e, dst).unwrap();
    }
    (dir, copy)
}

fn meta(id: i64) -> SampleMeta {
    SampleMeta {
        task: TaskName::new("math").unwrap(),
        id: SampleId::Int(id),
        tokens: 4,
        loss_sum: 1.0,
    }
}

/// Appends sample `math/id` as full frames of 0.5 through `w`, finishes the writer and
/// returns the bytes of the shard the sample went to, checking that the shard is new
/// (not one of `golden`'s).
fn append_full_sample(golden: &Path, store: &Path, mut w: StoreWriter, id: i64) -> Vec<u8> {
    let mut h = w.begin_sample(meta(id)).unwrap();
    for f in 0..w.order().n_frames() {
        let n = w.order().frame_numel(f).unwrap();
        w.put_frame(&mut h, f, vec![0.5; n]).unwrap();
    }
    w.end_sample(h).unwrap();
    w.finish().unwrap();
    let r = Store::open(store)
        .unwrap()
        .sample("math", &SampleId::Int(id))
        .unwrap()
        .clone();
    let shard = gradshard_store::shard_path(store, r.shard);
    let rel = shard.strip_prefix(store).unwrap();
    assert!(!golden.join(rel).exists(), "the sample went to a new shard");
    std::fs::read(&shard).unwrap()
}

#[test]
fn golden_v1_store_reads_bit_exactly() {
    let store = Store::open(&golden()).unwrap();
    assert_eq!(store.manifest().format_version, 1);
    check_golden(&golden(), false, |what, got, want| {
        for (k, (a, b)) in got.iter().zip(want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{what} [{k}]");
        }
    });
}

#[test]
fn a_writer_appends_to_a_v1_store_as_v1_and_refuses_factored_samples() {
    let (_dir, copy) = copy_store(&golden());
    let spec = Store::open(&copy).unwrap().manifest().spec.clone();
    let mut w = StoreWriter::open_or_create(&copy, &spec, WriterOptions::default()).unwrap();
    let e = w
        .begin_sample_as(meta(100), Representation::Factored)
        .unwrap_err()
        .to_string();
    assert!(e.contains("format version 1"), "{e}");
    let bytes = append_full_sample(&golden(), &copy, w, 101);
    let store = Store::open(&copy).unwrap();
    assert_eq!(store.manifest().format_version, 1);
    assert_eq!(&bytes[8..10], &[1, 0], "new shard written as version 1");
    let r = store.sample("math", &SampleId::Int(101)).unwrap().clone();
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
    check_golden(&golden_v2(), true, |what, got, want| {
        let (mut d2, mut w2) = (0f64, 0f64);
        for (a, b) in got.iter().zip(want) {
            d2 += (*a as f64 - *b as f64).powi(2);
            w2 += (*b as f64).powi(2);
        }
        let rel = (d2 / w2.max(f64::MIN_POSITIVE)).sqrt();
        assert!(rel <= 1e-4, "{what}: {rel:e}");
    });
}

#[test]
fn a_writer_appends_to_a_v2_store_as_v2_with_its_codec() {
    let (_dir, copy) = copy_store(&golden_v2());
    let spec = Store::open(&copy).unwrap().manifest().spec.clone();
    let w = StoreWriter::open_or_create(&copy, &spec, WriterOptions::default()).unwrap();
    let bytes = append_full_sample(&golden_v2(), &copy, w, 101);
    let store = Store::open(&copy).unwrap();
    assert_eq!(store.manifest().format_version, 2);
    assert_eq!(store.manifest().spec.codec.name, CodecName::Zstd);
    assert_eq!(&bytes[8..10], &[2, 0], "new shard written as version 2");
    // The first frame of the new shard (right after its 64-byte header) is codec 1.
    assert_eq!(bytes[64], 1, "frames keep the store's codec");
    let r = store.sample("math", &SampleId::Int(101)).unwrap().clone();
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
