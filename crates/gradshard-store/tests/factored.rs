//! Format v2 factored samples: writer → reader round trips in every layout, mixed
//! representations in one store, the shared-factor cache, factor tiles, verify and
//! corruption of factor frames.

use gradshard_core::{Block, DType, Geometry, OtherTensor, SampleId, TaskName};
use gradshard_store::{
    verify, CodecName, CodecSpec, Representation, SampleMeta, Store, StoreSpec, StoreWriter,
    WriterOptions,
};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn geometries() -> Vec<Geometry> {
    [
        json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":12}),
        json!({"model_type":"phi3","num_hidden_layers":2,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2}),
        json!({"model_type":"gpt2","n_layer":2,"n_embd":32,"n_head":4}),
        json!({"model_type":"gpt_neox","num_hidden_layers":1,"hidden_size":32,"num_attention_heads":4}),
    ]
    .iter()
    .map(|c| gradshard_core::ModelShape::geometry_of(c).unwrap())
    .collect()
}

fn spec(g: &Geometry, dtype: DType) -> StoreSpec {
    spec_with(g, dtype, CodecSpec::DEFAULT)
}

fn spec_with(g: &Geometry, dtype: DType, codec: CodecSpec) -> StoreSpec {
    let mut up = OtherTensor::new("mlp.up".into(), [24, 32], 0);
    up.factor_group = Some("mlp.input".into());
    up.rows_per_group = 10;
    let mut gate = OtherTensor::new("mlp.gate".into(), [24, 32], 0);
    gate.factor_group = Some("mlp.input".into());
    let conv = OtherTensor::new("mlp.conv".into(), [32, 20], 1);
    StoreSpec {
        geometry: g.clone(),
        dtype,
        codec,
        blocks: Block::ALL.to_vec(),
        other_tensors: vec![gate, up, conv],
    }
}

fn opts() -> WriterOptions {
    WriterOptions {
        workers: 2,
        memory_budget: 4 << 20,
        ..WriterOptions::default()
    }
}

fn round(dtype: DType, v: &mut [f32]) {
    if dtype == DType::Bf16 {
        for x in v {
            *x = gradshard_core::bf16_bits_to_f32(gradshard_core::f32_to_bf16_bits(*x));
        }
    }
}

fn naive(p: &[f32], s: &[f32], n: usize, r: usize, c: usize) -> Vec<f64> {
    let mut g = vec![0f64; r * c];
    for t in 0..n {
        for i in 0..r {
            for j in 0..c {
                g[i * c + j] += p[t * r + i] as f64 * s[t * c + j] as f64;
            }
        }
    }
    g
}

/// Writes `factored.len()` samples of task `t`; sample i is factored (with n = 3 + i)
/// when `factored[i]`, else full. Returns each sample's expected frames (f64).
fn write_samples(
    w: &mut StoreWriter,
    rng: &mut rand::rngs::StdRng,
    factored: &[bool],
) -> Vec<Vec<Vec<f64>>> {
    let order = w.order().clone();
    let dtype = w.manifest().spec.dtype;
    let mut truth = Vec::new();
    for (i, &fac) in factored.iter().enumerate() {
        let meta = SampleMeta {
            task: TaskName::new("t").unwrap(),
            id: SampleId::Int(i as i64),
            tokens: 5,
            loss_sum: 1.0,
        };
        let repr = if fac {
            Representation::Factored
        } else {
            Representation::Full
        };
        let mut h = w.begin_sample_as(meta, repr).unwrap();
        let mut frames = Vec::new();
        if fac {
            let n = 3 + i;
            let shared: Vec<Vec<f32>> = order
                .shared()
                .iter()
                .map(|s| {
                    let mut v: Vec<f32> = (0..n * s.cols)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    round(dtype, &mut v);
                    v
                })
                .collect();
            for f in 0..order.n_frames() {
                let (j, r, c) = order.factor_of(f).unwrap();
                let mut p: Vec<f32> = (0..n * r).map(|_| rng.random_range(-1.0..1.0)).collect();
                round(dtype, &mut p);
                frames.push(naive(&p, &shared[j], n, r, c));
                w.put_factor(&mut h, f, n, p).unwrap();
            }
            for (j, s) in shared.into_iter().enumerate() {
                w.put_shared(&mut h, j, n, s).unwrap();
            }
        } else {
            for f in 0..order.n_frames() {
                let mut v: Vec<f32> = (0..order.frame_numel(f).unwrap())
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                round(dtype, &mut v);
                frames.push(v.iter().map(|x| *x as f64).collect());
                w.put_frame(&mut h, f, v).unwrap();
            }
        }
        w.end_sample(h).unwrap();
        truth.push(frames);
    }
    truth
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "{what} element {k}: {a} vs {b}"
        );
    }
}

#[test]
fn factored_and_full_samples_read_back_as_their_slices_in_every_layout() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Every codec (zstd-exp, whole-payload zstd, none) in turn over the layouts.
    let codecs = [
        CodecSpec::DEFAULT,
        CodecSpec {
            name: CodecName::Zstd,
            ..CodecSpec::DEFAULT
        },
        CodecSpec {
            name: CodecName::None,
            level: 0,
            shuffle: false,
        },
    ];
    for (gi, g) in geometries().into_iter().enumerate() {
        for (di, dtype) in [DType::F32, DType::Bf16].into_iter().enumerate() {
            let codec = codecs[(2 * gi + di) % codecs.len()];
            let dir = tempfile::tempdir().unwrap();
            let mut w =
                StoreWriter::open_or_create(dir.path(), &spec_with(&g, dtype, codec), opts())
                    .unwrap();
            let mix = [true, false, true, true];
            let truth = write_samples(&mut w, &mut rng, &mix);
            w.finish().unwrap();
            let rep = verify(dir.path(), &|_, _| {}).unwrap();
            assert!(rep.ok(), "{} {dtype}: {:?}", g.model_type, rep.problems);
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.manifest().format_version, 3);
            assert_eq!(store.manifest().spec.codec, codec);
            let recs = store.samples("t").unwrap().to_vec();
            for (i, r) in recs.iter().enumerate() {
                assert_eq!(store.is_factored(r).unwrap(), mix[i]);
                assert_eq!(truth[i].len(), store.order().n_frames());
                for (f, want) in truth[i].iter().enumerate() {
                    let v = store.read_frame(r, f).unwrap();
                    assert_close(
                        &v,
                        want,
                        &format!(
                            "{} {dtype} sample {i} {}",
                            g.model_type,
                            store.order().describe(f)
                        ),
                    );
                }
            }
            // A tile over mixed samples, and the same tile as factors.
            let (d, dd) = (g.head_dim, g.hidden);
            let all: Vec<usize> = (0..recs.len()).collect();
            for (block, head) in [(Block::Q, 1), (Block::K, 0), (Block::O, 3)] {
                let frame = store
                    .order()
                    .attn(1.min(g.layers - 1), block, head)
                    .unwrap();
                let layer = 1.min(g.layers - 1);
                let mut tile = vec![0f32; all.len() * d * dd];
                store
                    .read_tile("t", &all, layer, block, head, &mut tile)
                    .unwrap();
                let ft = store
                    .read_factor_tile("t", &all, layer, block, head)
                    .unwrap();
                assert_eq!((ft.r, ft.c, ft.samples.len()), (d, dd, all.len()));
                for (i, sf) in ft.samples.iter().enumerate() {
                    assert_close(
                        &tile[i * d * dd..(i + 1) * d * dd],
                        &truth[i][frame],
                        "tile",
                    );
                    let back = naive(&sf.p, &sf.s, sf.n, d, dd);
                    assert_close(&tile[i * d * dd..(i + 1) * d * dd], &back, "factor tile");
                    assert_eq!(sf.n, if mix[i] { 3 + i } else { d });
                }
            }
            // Whole tensors of other (row-group) tensors reassemble across groups.
            let (_, up) = store.read_tensor("t", &recs[0].id, "mlp.up").unwrap();
            assert_eq!(up.len(), 24 * 32);
        }
    }
}

#[test]
fn the_slices_of_one_layer_decode_each_shared_factor_once() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let g = geometries().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let mut w = StoreWriter::open_or_create(dir.path(), &spec(&g, DType::Bf16), opts()).unwrap();
    write_samples(&mut w, &mut rng, &[true; 5]);
    w.finish().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let all: Vec<usize> = (0..5).collect();
    let (d, dd) = (g.head_dim, g.hidden);
    let mut tile = vec![0f32; 5 * d * dd];
    // Layer 0, every Q, K and V head: one attn_in factor per sample.
    let mut tiles = 0;
    for block in [Block::Q, Block::K, Block::V] {
        for head in 0..g.heads_of(block) {
            store
                .read_tile("t", &all, 0, block, head, &mut tile)
                .unwrap();
            tiles += 1;
        }
    }
    assert_eq!(store.stats().shared_decoded(), 5);
    assert_eq!(store.stats().shared_hits(), (tiles - 1) * 5);
    assert_eq!(store.stats().frames(), tiles * 5 + 5);
    // O heads use the other shared factor: decoded once more per sample.
    for head in 0..g.heads {
        store
            .read_tile("t", &all, 0, Block::O, head, &mut tile)
            .unwrap();
    }
    assert_eq!(store.stats().shared_decoded(), 10);
    // With the cache off, every tile decodes its samples' S again.
    store.set_shared_cache_bytes(0);
    store.stats().reset();
    for head in 0..g.heads {
        store
            .read_tile("t", &all, 0, Block::Q, head, &mut tile)
            .unwrap();
    }
    assert_eq!(store.stats().shared_decoded(), g.heads as u64 * 5);
}

#[test]
fn corrupted_factor_frames_and_mismatched_rows_are_reported() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let g = geometries().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let mut w = StoreWriter::open_or_create(dir.path(), &spec(&g, DType::F32), opts()).unwrap();
    write_samples(&mut w, &mut rng, &[true, true]);
    // Handing a P whose n differs from its shape, or a full frame to a factored sample, fails.
    let meta = SampleMeta {
        task: TaskName::new("t").unwrap(),
        id: SampleId::Int(99),
        tokens: 5,
        loss_sum: 1.0,
    };
    let mut h = w.begin_sample_as(meta, Representation::Factored).unwrap();
    let (_, r, _) = w.order().factor_of(0).unwrap();
    assert!(w.put_factor(&mut h, 0, 4, vec![0.0; 3 * r]).is_err());
    assert!(w
        .put_frame(&mut h, 0, vec![0.0; w.order().frame_numel(0).unwrap()])
        .is_err());
    drop(h);
    w.finish().unwrap_err();
    let store = Store::open(dir.path()).unwrap();
    let rec = store.samples("t").unwrap()[1].clone();
    // Flip one byte inside the sample's first shared factor: every slice that uses it fails,
    // naming the task, the sample and the factor.
    let table = store.table_bytes(&rec).unwrap().to_vec();
    let view = gradshard_format::TableView::parse(&table).unwrap();
    let e = view.shared_entry(0);
    drop(store);
    let path = gradshard_store::shard_path(dir.path(), rec.shard);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[e.offset as usize + 30] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store
        .read_slice("t", &SampleId::Int(1), 0, Block::K, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`t`") && err.contains("sample 1") && err.contains("attention input factor"),
        "{err}"
    );
    let rep = verify(dir.path(), &|_, _| {}).unwrap();
    assert!(!rep.ok());
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("attention input factor")),
        "{:?}",
        rep.problems
    );
    // The other sample still reads.
    store
        .read_slice("t", &SampleId::Int(0), 0, Block::K, 1)
        .unwrap();
}

#[test]
fn random_single_byte_flips_in_factor_frames_are_all_detected() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2025);
    let g = geometries().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let mut w = StoreWriter::open_or_create(dir.path(), &spec(&g, DType::Bf16), opts()).unwrap();
    write_samples(&mut w, &mut rng, &[true, true, false]);
    w.finish().unwrap();
    let s = Store::open(dir.path()).unwrap();
    // Every P and S frame of the factored samples, with a frame that reads it.
    let mut frames = Vec::new();
    for r in s.samples("t").unwrap() {
        if !s.is_factored(r).unwrap() {
            continue;
        }
        let all: Vec<usize> = (0..s.order().n_frames()).collect();
        for p in s.plan(&[r], &all).unwrap().reads {
            frames.push((r.clone(), p.frame, p.entry.offset, p.entry.frame_len));
            let (_, e) = p.shared.unwrap();
            frames.push((r.clone(), p.frame, e.offset, e.frame_len));
        }
    }
    drop(s);
    for _ in 0..100 {
        let (rec, frame, off, len) = frames[rng.random_range(0..frames.len())].clone();
        let pos = off + rng.random_range(0..len as u64);
        let shard = gradshard_store::shard_path(dir.path(), rec.shard);
        let orig = std::fs::read(&shard).unwrap();
        let mut d = orig.clone();
        d[pos as usize] ^= rng.random_range(1..=255u8);
        std::fs::write(&shard, &d).unwrap();
        let rep = verify(dir.path(), &|_, _| {}).unwrap();
        assert!(!rep.ok(), "flip at {pos} not detected by verify");
        let s = Store::open(dir.path()).unwrap();
        assert!(
            s.read_frame(&rec, frame).is_err(),
            "flip at {pos} not detected by the reader"
        );
        drop(s);
        std::fs::write(&shard, &orig).unwrap();
    }
    assert!(verify(dir.path(), &|_, _| {}).unwrap().ok());
}

#[test]
fn bf16_byte_plane_tiles_are_read_tile_before_widening_in_every_codec() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let g = geometries().remove(0);
    let (d, dd) = (g.head_dim, g.hidden);
    let n = d * dd;
    for codec in [
        CodecSpec::DEFAULT,
        CodecSpec {
            name: CodecName::Zstd,
            ..CodecSpec::DEFAULT
        },
        CodecSpec {
            name: CodecName::Zstd,
            level: 1,
            shuffle: false,
        },
        CodecSpec {
            name: CodecName::None,
            level: 0,
            shuffle: false,
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            StoreWriter::open_or_create(dir.path(), &spec_with(&g, DType::Bf16, codec), opts())
                .unwrap();
        write_samples(&mut w, &mut rng, &[false, false, false]);
        w.finish().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.bf16_planes(), "{codec:?}");
        // Rows in a chosen order, one twice.
        let pos = [2usize, 0, 2];
        for (layer, block, head) in [(0, Block::Q, 3), (1, Block::V, 1), (1, Block::O, 0)] {
            let mut tile = vec![0f32; pos.len() * n];
            store
                .read_tile("t", &pos, layer, block, head, &mut tile)
                .unwrap();
            let mut planes = vec![0u8; pos.len() * 2 * n];
            store
                .read_tile_bf16_planes("t", &pos, layer, block, head, &mut planes)
                .unwrap();
            for (i, row) in planes.chunks_exact(2 * n).enumerate() {
                let mut wide = vec![f32::NAN; n];
                gradshard_format::widen_bf16(&row[..n], &row[n..], &mut wide);
                let want = &tile[i * n..(i + 1) * n];
                assert!(
                    wide.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{codec:?} layer {layer} {block} head {head} row {i}"
                );
            }
            let mut short = vec![0u8; pos.len() * 2 * n - 1];
            assert!(store
                .read_tile_bf16_planes("t", &pos, layer, block, head, &mut short)
                .is_err());
        }
    }
    // A store with a factored sample, and an f32 store, have no byte-plane tiles.
    for (dtype, mix, why) in [
        (DType::Bf16, [false, true], "factors"),
        (DType::F32, [false, false], "f32"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::open_or_create(dir.path(), &spec(&g, dtype), opts()).unwrap();
        write_samples(&mut w, &mut rng, &mix);
        w.finish().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.bf16_planes());
        let mut planes = vec![0u8; 2 * 2 * n];
        let err = store
            .read_tile_bf16_planes("t", &[0, 1], 0, Block::Q, 0, &mut planes)
            .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
}
