//! The manifest decoder on random and mutated bytes: an error naming manifest.json, or
//! a manifest, never a panic.

use gradshard_store::Manifest;
use proptest::prelude::*;

fn valid_manifest() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = gradshard_store::synth::preset("tiny").unwrap();
    let spec = gradshard_store::StoreSpec {
        geometry: g,
        dtype: gradshard_core::DType::Bf16,
        codec: gradshard_store::CodecSpec::DEFAULT,
        blocks: gradshard_core::Block::ALL.to_vec(),
        other_tensors: vec![],
    };
    gradshard_store::StoreWriter::open_or_create(dir.path(), &spec, Default::default())
        .unwrap()
        .finish()
        .unwrap();
    std::fs::read(dir.path().join("manifest.json")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn manifest_loader_survives_mutations(
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..4),
        cut in any::<usize>(),
        digits in proptest::collection::vec((any::<usize>(), 0u8..10), 0..3),
    ) {
        let mut b = valid_manifest();
        for (i, x) in flips {
            let n = b.len();
            b[i % n] ^= x;
        }
        // Numbers changed to others (layer counts, head sizes, versions).
        for (i, d) in digits {
            let n = b.len();
            if let Some(at) = (0..n).map(|k| (i + k) % n).find(|&k| b[k].is_ascii_digit()) {
                b[at] = b'0' + d;
            }
        }
        if cut % 3 == 0 {
            let n = b.len();
            b.truncate(cut % n);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.json"), &b).unwrap();
        if let Err(e) = Manifest::load(dir.path()) {
            prop_assert!(e.to_string().contains("manifest.json"), "{}", e);
        } else if let Ok(m) = Manifest::load(dir.path()) {
            // A manifest that loads gives a frame order without panicking.
            let _ = m.spec.frame_order().n_frames();
        }
    }
}
