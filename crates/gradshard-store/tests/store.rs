//! Store round trips, fixture ingest, read counting, rejections and corruption.

use std::path::{Path, PathBuf};

use gradshard_core::{
    bf16_bits_to_f32, f32_to_bf16_bits, Block, DType, Geometry, SampleId, TaskName,
};
use gradshard_store::ingest::{ingest, IngestOptions};
use gradshard_store::synth::{synth, SynthOptions};
use gradshard_store::{
    shard_path, verify, CodecSpec, SampleMeta, Store, StoreSpec, StoreWriter, WriterOptions,
};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn small_opts() -> WriterOptions {
    WriterOptions {
        workers: 2,
        memory_budget: 8 << 20,
        ..WriterOptions::default()
    }
}

fn task(s: &str) -> TaskName {
    TaskName::new(s).unwrap()
}

/// Every layout of docs/design.md §3, small but with GQA where the layout allows it.
fn layouts() -> Vec<Geometry> {
    [
        json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":12}),
        json!({"model_type":"mistral","num_hidden_layers":1,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":1}),
        json!({"model_type":"qwen2","num_hidden_layers":1,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2}),
        json!({"model_type":"qwen3","num_hidden_layers":1,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16}),
        json!({"model_type":"gemma","num_hidden_layers":1,"hidden_size":32,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":24}),
        json!({"model_type":"phi3","num_hidden_layers":2,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2}),
        json!({"model_type":"gpt2","n_layer":2,"n_embd":32,"n_head":4}),
        json!({"model_type":"gpt_neox","num_hidden_layers":2,"hidden_size":32,"num_attention_heads":4}),
        json!({"model_type":"bert","num_hidden_layers":1,"hidden_size":32,"num_attention_heads":2}),
    ]
    .iter()
    .map(|c| gradshard_core::ModelShape::geometry_of(c).unwrap())
    .collect()
}

fn spec(g: &Geometry, dtype: DType) -> StoreSpec {
    StoreSpec {
        geometry: g.clone(),
        dtype,
        codec: CodecSpec::DEFAULT,
        blocks: Block::ALL.to_vec(),
        other_tensors: vec![],
    }
}

#[test]
fn every_layout_round_trips_f32_exact_and_bf16_rne() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for g in layouts() {
        for dtype in [DType::F32, DType::Bf16] {
            let dir = tempfile::tempdir().unwrap();
            let mut w =
                StoreWriter::open_or_create(dir.path(), &spec(&g, dtype), small_opts()).unwrap();
            let order = w.order().clone();
            // Full HF tensors per sample, with values spanning many binades.
            let mut truth = Vec::new();
            for s in 0..3 {
                let tensors: Vec<(String, [usize; 2], Vec<f32>)> = g
                    .all_attn_tensors()
                    .into_iter()
                    .map(|t| {
                        let n = t.shape[0] * t.shape[1];
                        let v = (0..n)
                            .map(|_| {
                                rng.random_range(-1.0f32..1.0)
                                    * 10f32.powi(rng.random_range(-12..3))
                            })
                            .collect();
                        (t.name, t.shape, v)
                    })
                    .collect();
                let mut h = w
                    .begin_sample(SampleMeta {
                        task: task("t"),
                        id: SampleId::Int(s),
                        tokens: 5,
                        loss_sum: 1.0,
                    })
                    .unwrap();
                for t in g.all_attn_tensors() {
                    let full = &tensors.iter().find(|x| x.0 == t.name).unwrap().2;
                    for b in &t.blocks {
                        for head in 0..g.heads_of(*b) {
                            let slice = g.slice_spec(t.layer, *b, head).unwrap().cut(full).unwrap();
                            w.put_frame(&mut h, order.attn(t.layer, *b, head).unwrap(), slice)
                                .unwrap();
                        }
                    }
                }
                w.end_sample(h).unwrap();
                truth.push(tensors);
            }
            w.finish().unwrap();
            let store = Store::open(dir.path()).unwrap();
            for (s, tensors) in truth.iter().enumerate() {
                for t in g.all_attn_tensors() {
                    let full = &tensors.iter().find(|x| x.0 == t.name).unwrap().2;
                    for b in &t.blocks {
                        for head in 0..g.heads_of(*b) {
                            let spec = g.slice_spec(t.layer, *b, head).unwrap();
                            let want = spec.cut(full).unwrap();
                            let got = store
                                .read_slice("t", &SampleId::Int(s as i64), t.layer, *b, head)
                                .unwrap();
                            assert_eq!(got.len(), g.head_dim * g.hidden);
                            for (a, b2) in want.iter().zip(&got) {
                                let expect = match dtype {
                                    DType::F32 => *a,
                                    DType::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(*a)),
                                };
                                assert_eq!(
                                    expect.to_bits(),
                                    b2.to_bits(),
                                    "{} {:?} {b} head {head}",
                                    g.model_type,
                                    dtype
                                );
                            }
                        }
                    }
                    // Whole tensors reassemble exactly (f32).
                    if dtype == DType::F32 {
                        let (shape, back) = store
                            .read_tensor("t", &SampleId::Int(s as i64), &t.name)
                            .unwrap();
                        assert_eq!(shape, t.shape.to_vec());
                        assert!(
                            back.iter()
                                .zip(full)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{}",
                            t.name
                        );
                    }
                }
            }
            assert!(verify(dir.path(), &|_, _| {}).unwrap().ok());
        }
    }
}

fn ingest_fixture(
    model: &str,
    dtype: DType,
    store: &Path,
) -> gradshard_store::ingest::IngestReport {
    ingest_fixture_with(model, dtype, CodecSpec::DEFAULT, store)
}

fn ingest_fixture_with(
    model: &str,
    dtype: DType,
    codec: CodecSpec,
    store: &Path,
) -> gradshard_store::ingest::IngestReport {
    let root = fixtures().join(model);
    ingest(
        &IngestOptions {
            model_dir: root.join("model"),
            tasks: vec![
                (task("math"), root.join("grads/math")),
                (task("general"), root.join("grads/general")),
            ],
            store: store.to_path_buf(),
            dtype,
            codec,
            writer: small_opts(),
        },
        &mut |_, _| {},
    )
    .unwrap()
}

fn read_st(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
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
            (n, v.shape().to_vec(), d)
        })
        .collect()
}

#[test]
fn fixtures_ingest_bit_exact_in_f32() {
    // llama-gqa with the default codec (zstd-exp), gpt2 with whole-payload zstd.
    let zstd = CodecSpec {
        name: gradshard_store::CodecName::Zstd,
        ..CodecSpec::DEFAULT
    };
    for (model, codec) in [("llama-gqa", CodecSpec::DEFAULT), ("gpt2", zstd)] {
        let dir = tempfile::tempdir().unwrap();
        let rep = ingest_fixture_with(model, DType::F32, codec, dir.path());
        assert_eq!(
            Store::open(dir.path()).unwrap().manifest().spec.codec,
            codec
        );
        assert_eq!(rep.write.samples_committed, 16);
        let store = Store::open(dir.path()).unwrap();
        for t in ["math", "general"] {
            for i in 0..8i64 {
                let path = fixtures()
                    .join(model)
                    .join(format!("grads/{t}/{i}.safetensors"));
                let rec = store.sample(t, &SampleId::Int(i)).unwrap();
                let (tokens, loss) = {
                    let bytes = std::fs::read(&path).unwrap();
                    gradshard_store::ingest::read_meta(&path, &bytes).unwrap()
                };
                assert_eq!((rec.tokens, rec.loss_sum), (tokens, loss));
                for (name, shape, data) in read_st(&path) {
                    let (s2, back) = store.read_tensor(t, &SampleId::Int(i), &name).unwrap();
                    assert_eq!(s2, shape, "{name}");
                    assert!(
                        back.iter()
                            .zip(&data)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{model} {t} {i} {name} differs"
                    );
                }
            }
        }
        assert!(verify(dir.path(), &|_, _| {}).unwrap().ok());
    }
}

#[test]
fn gpt2_c_proj_heads_are_rows_and_c_attn_heads_are_columns() {
    let dir = tempfile::tempdir().unwrap();
    ingest_fixture("gpt2", DType::F32, dir.path());
    let store = Store::open(dir.path()).unwrap();
    let file = read_st(&fixtures().join("gpt2/grads/math/3.safetensors"));
    let get = |n: &str| file.iter().find(|x| x.0 == n).unwrap().2.clone();
    let c_proj = get("transformer.h.1.attn.c_proj.weight"); // [64 in, 64 out]
    let c_attn = get("transformer.h.1.attn.c_attn.weight"); // [64 in, 192 out]
    let (d, dm) = (16, 64);
    for h in 0..4 {
        let o = store
            .read_slice("math", &SampleId::Int(3), 1, Block::O, h)
            .unwrap();
        // O head h = rows h*d..(h+1)*d of c_proj, unchanged.
        assert_eq!(o, c_proj[h * d * dm..(h + 1) * d * dm].to_vec());
        for (bi, b) in [Block::Q, Block::K, Block::V].into_iter().enumerate() {
            let s = store
                .read_slice("math", &SampleId::Int(3), 1, b, h)
                .unwrap();
            // Canonical [j, k] = c_attn[k, bi*D + h*d + j]: a column of c_attn.
            for j in 0..d {
                for k in 0..dm {
                    assert_eq!(s[j * dm + k], c_attn[k * 3 * dm + bi * dm + h * d + j]);
                }
            }
        }
    }
}

#[test]
fn one_slice_is_one_frame_read_and_a_tile_touches_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    ingest_fixture("llama-gqa", DType::Bf16, dir.path());
    let store = Store::open(dir.path()).unwrap();
    let frame = store.order().attn(1, Block::K, 1).unwrap();
    let rec = store.sample("general", &SampleId::Int(5)).unwrap().clone();
    let plan = store.plan(&[&rec], &[frame]).unwrap();
    store.stats().reset();
    let s = store
        .read_slice("general", &SampleId::Int(5), 1, Block::K, 1)
        .unwrap();
    assert_eq!(s.len(), 16 * 64);
    assert_eq!(store.stats().frames(), 1);
    assert_eq!(store.stats().bytes(), plan.bytes());
    assert_eq!(store.stats().bytes(), plan.reads[0].entry.frame_len as u64);

    store.stats().reset();
    let n = store.samples("math").unwrap().len();
    let mut tile = vec![0f32; n * 16 * 64];
    let all: Vec<usize> = (0..n).collect();
    store
        .read_tile("math", &all, 0, Block::V, 0, &mut tile)
        .unwrap();
    let recs: Vec<_> = store.samples("math").unwrap().iter().collect();
    let f = store.order().attn(0, Block::V, 0).unwrap();
    let expected: u64 = store.plan(&recs, &[f]).unwrap().bytes();
    assert_eq!(store.stats().frames(), n as u64);
    assert_eq!(
        store.stats().bytes(),
        expected,
        "tile read touched bytes beyond its frames"
    );
    // Rows of the tile equal single-slice reads.
    for (i, r) in recs.iter().enumerate() {
        let one = store.read_slice("math", &r.id, 0, Block::V, 0).unwrap();
        assert_eq!(&tile[i * 1024..(i + 1) * 1024], &one[..]);
    }
}

#[test]
fn row_ranges_of_mlp_tensors_read_only_their_groups() {
    let dir = tempfile::tempdir().unwrap();
    let g = layouts().remove(0);
    let opts = SynthOptions {
        geometry: g,
        mlp: Some(40_000),
        tasks: vec![task("a")],
        samples_per_task: 2,
        seed: 1,
        dtype: DType::F32,
        codec: CodecSpec::DEFAULT,
        writer: small_opts(),
        pool: 0,
    };
    synth(dir.path(), &opts, &mut |_, _| {}).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let t = store.order().others()[0].clone(); // gate_proj [40000, 32]: 32768 rows per group
    assert!(t.rows_per_group < t.shape[0], "needs several row groups");
    let full = store
        .read_rows("a", &SampleId::Int(1), &t.name, 0, t.shape[0])
        .unwrap();
    assert_eq!(full.len(), t.shape[0] * t.shape[1]);
    store.stats().reset();
    let part = store
        .read_rows("a", &SampleId::Int(1), &t.name, 33_000, 33_005)
        .unwrap();
    assert_eq!(
        part,
        full[33_000 * t.shape[1]..33_005 * t.shape[1]].to_vec()
    );
    assert_eq!(
        store.stats().frames(),
        1,
        "rows inside one group read one frame"
    );
    store.stats().reset();
    let across = store
        .read_rows("a", &SampleId::Int(1), &t.name, 32_760, 32_770)
        .unwrap();
    assert_eq!(
        across,
        full[32_760 * t.shape[1]..32_770 * t.shape[1]].to_vec()
    );
    assert_eq!(store.stats().frames(), 2);
}

// ---- rejections -------------------------------------------------------------

/// Advising the sample tables (`prefetch_tables`, and the advice `plan` gives for its
/// own samples) reads nothing through the store: no frame, no table lookup counted,
/// and every tile reads the same values as from a store that was never advised.
#[test]
fn advising_the_tables_changes_no_read() {
    let dir = tempfile::tempdir().unwrap();
    ingest_fixture("llama-gqa", DType::Bf16, dir.path());
    let plain = Store::open(dir.path()).unwrap();
    let advised = Store::open(dir.path()).unwrap();
    advised.stats().reset();
    advised.prefetch_tables();
    advised.prefetch_tables();
    assert_eq!(advised.stats().frames(), 0);
    assert_eq!(advised.stats().bytes(), 0);
    assert_eq!(
        advised
            .stats()
            .table_lookups
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    for task in ["math", "general"] {
        let n = plain.samples(task).unwrap().len();
        let all: Vec<usize> = (0..n).collect();
        for (layer, block, head) in [(0, Block::Q, 3), (1, Block::V, 1), (1, Block::O, 0)] {
            let mut a = vec![0f32; n * 16 * 64];
            let mut b = vec![0f32; n * 16 * 64];
            plain
                .read_tile(task, &all, layer, block, head, &mut a)
                .unwrap();
            advised
                .read_tile(task, &all, layer, block, head, &mut b)
                .unwrap();
            assert_eq!(a, b, "{task} layer {layer} {block} head {head}");
        }
    }
    assert_eq!(advised.stats().frames(), plain.stats().frames());
    assert_eq!(advised.any_factored(), plain.any_factored());
}

fn small_store(dtype: DType) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ingest_fixture("llama-gqa", dtype, dir.path());
    dir
}

fn first_frame(store: &Path) -> (PathBuf, u64, u32) {
    let s = Store::open(store).unwrap();
    let rec = s.sample("math", &SampleId::Int(0)).unwrap().clone();
    let plan = s.plan(&[&rec], &[0]).unwrap();
    (
        shard_path(store, rec.shard),
        plan.reads[0].entry.offset,
        plan.reads[0].entry.frame_len,
    )
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let mut d = std::fs::read(path).unwrap();
    d[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, d).unwrap();
}

#[test]
fn rejects_bad_magic() {
    let dir = small_store(DType::Bf16);
    let (shard, _, _) = first_frame(dir.path());
    patch(&shard, 0, b"NOTSHARD");
    let rep = verify(dir.path(), &|_, _| {}).unwrap();
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("bad magic") && p.contains("shard-000000")),
        "{:?}",
        rep.problems
    );
    // A reader refuses it at open, and a writer refuses to append to it.
    let e = Store::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("bad magic") && e.contains("shard-000000"), "{e}");
    let spec = gradshard_store::Manifest::load(dir.path()).unwrap().spec;
    let e = StoreWriter::open_or_create(dir.path(), &spec, small_opts())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn rejects_unknown_version() {
    let dir = small_store(DType::Bf16);
    let m = dir.path().join("manifest.json");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("\"format_version\": 3", "\"format_version\": 7");
    std::fs::write(&m, text).unwrap();
    let e = Store::open(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("format version 7") && e.contains("manifest.json"),
        "{e}"
    );
    // The log header's version is checked as well.
    let dir = small_store(DType::Bf16);
    patch(&dir.path().join("samples.log"), 8, &[9, 0]);
    let e = Store::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("version 9") && e.contains("samples.log"), "{e}");
}

#[test]
fn rejects_truncated_frame() {
    let dir = small_store(DType::Bf16);
    let (shard, off, len) = first_frame(dir.path());
    // Claim a shorter payload: the frame no longer matches its table entry.
    let mut d = std::fs::read(&shard).unwrap();
    let stored = u32::from_le_bytes(d[off as usize + 8..off as usize + 12].try_into().unwrap());
    d[off as usize + 8..off as usize + 12].copy_from_slice(&(stored + 1).to_le_bytes());
    std::fs::write(&shard, d).unwrap();
    let s = Store::open(dir.path()).unwrap();
    let e = s
        .read_slice("math", &SampleId::Int(0), 0, Block::Q, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("truncated frame payload")
            && e.contains("math")
            && e.contains("layer 0 block Q head 0"),
        "{e}"
    );
    assert!(len > 24);
}

#[test]
fn rejects_checksum_mismatch() {
    let dir = small_store(DType::Bf16);
    let (shard, off, len) = first_frame(dir.path());
    let d = std::fs::read(&shard).unwrap();
    patch(
        &shard,
        off + len as u64 - 1,
        &[d[(off + len as u64 - 1) as usize] ^ 0xFF],
    );
    let s = Store::open(dir.path()).unwrap();
    let e = s
        .read_slice("math", &SampleId::Int(0), 0, Block::Q, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("checksum mismatch") && e.contains("sample 0") && e.contains("shard-000000.gss"),
        "{e}"
    );
    assert!(!verify(dir.path(), &|_, _| {}).unwrap().ok());
}

#[test]
fn rejects_index_entry_past_end_of_file() {
    let dir = small_store(DType::Bf16);
    let (shard, _, _) = first_frame(dir.path());
    let s = Store::open(dir.path()).unwrap();
    let rec = s.sample("math", &SampleId::Int(0)).unwrap().clone();
    drop(s);
    // Point frame 0's table entry far past the end, and fix the table checksum so only the bound check can catch it.
    let mut d = std::fs::read(&shard).unwrap();
    let t0 = rec.table_offset as usize;
    d[t0 + 24..t0 + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let tl = rec.table_len as usize;
    let sum = gradshard_format::checksum(&[&d[t0..t0 + tl - 8]]);
    d[t0 + tl - 8..t0 + tl].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&shard, d).unwrap();
    let s = Store::open(dir.path()).unwrap();
    let e = s
        .read_slice("math", &SampleId::Int(0), 0, Block::Q, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("index entry past end of file"), "{e}");
    let rep = verify(dir.path(), &|_, _| {}).unwrap();
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("index entry past end of file")),
        "{:?}",
        rep.problems
    );
}

#[test]
fn rejects_duplicate_task_sample() {
    let dir = small_store(DType::Bf16);
    let spec = Store::open(dir.path()).unwrap().manifest().spec.clone();
    let mut w = StoreWriter::open_or_create(dir.path(), &spec, small_opts()).unwrap();
    let e = w
        .begin_sample(SampleMeta {
            task: task("math"),
            id: SampleId::Int(3),
            tokens: 4,
            loss_sum: 1.0,
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("math") && e.contains("sample 3") && e.contains("duplicate"),
        "{e}"
    );
    w.finish().unwrap();
    // A log that commits the same sample twice is refused on open.
    let log = dir.path().join("samples.log");
    let bytes = std::fs::read(&log).unwrap();
    let scan = gradshard_format::decode_log(&bytes).unwrap();
    let mut dup = bytes.clone();
    let mut r = scan.records[0].clone();
    r.seq = 999;
    dup.extend(gradshard_format::encode_log_record(&r));
    std::fs::write(&log, dup).unwrap();
    let e = Store::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("committed twice"), "{e}");
}

#[test]
fn rejects_geometry_mismatch_between_store_and_input() {
    let dir = small_store(DType::F32);
    let before = std::fs::read(dir.path().join("samples.log")).unwrap();
    let root = fixtures().join("gpt2");
    let e = ingest(
        &IngestOptions {
            model_dir: root.join("model"),
            tasks: vec![(task("math"), root.join("grads/math"))],
            store: dir.path().to_path_buf(),
            dtype: DType::F32,
            codec: CodecSpec::DEFAULT,
            writer: small_opts(),
        },
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model_type") && e.contains("llama") && e.contains("gpt2"),
        "{e}"
    );
    // Same model, other dtype.
    let root = fixtures().join("llama-gqa");
    let e = ingest(
        &IngestOptions {
            model_dir: root.join("model"),
            tasks: vec![(task("extra"), root.join("grads/math"))],
            store: dir.path().to_path_buf(),
            dtype: DType::Bf16,
            codec: CodecSpec::DEFAULT,
            writer: small_opts(),
        },
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dtype"), "{e}");
    // Existing data intact.
    assert_eq!(
        std::fs::read(dir.path().join("samples.log")).unwrap(),
        before
    );
    assert!(verify(dir.path(), &|_, _| {}).unwrap().ok());
}

#[test]
fn ingest_rejects_a_bad_file_naming_it_and_keeps_earlier_samples() {
    let src = tempfile::tempdir().unwrap();
    let root = fixtures().join("llama-gqa");
    for i in 0..3 {
        std::fs::copy(
            root.join(format!("grads/math/{i}.safetensors")),
            src.path().join(format!("{i}.safetensors")),
        )
        .unwrap();
    }
    std::fs::write(
        src.path().join("3.safetensors"),
        b"definitely not safetensors",
    )
    .unwrap();
    let store = tempfile::tempdir().unwrap();
    let e = ingest(
        &IngestOptions {
            model_dir: root.join("model"),
            tasks: vec![(task("math"), src.path().to_path_buf())],
            store: store.path().to_path_buf(),
            dtype: DType::F32,
            codec: CodecSpec::DEFAULT,
            writer: small_opts(),
        },
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("3.safetensors"), "{e}");
}

#[test]
fn random_single_byte_flips_inside_frames_are_all_detected() {
    let dir = small_store(DType::Bf16);
    let s = Store::open(dir.path()).unwrap();
    // Every frame's byte range, with its key.
    let mut frames = Vec::new();
    for t in ["math", "general"] {
        for r in s.samples(t).unwrap() {
            let all: Vec<usize> = (0..s.order().n_frames()).collect();
            for p in s.plan(&[r], &all).unwrap().reads {
                frames.push((r.clone(), p.frame, p.entry.offset, p.entry.frame_len));
            }
        }
    }
    drop(s);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    for _ in 0..100 {
        let (rec, frame, off, len) = frames[rng.random_range(0..frames.len())].clone();
        let pos = off + rng.random_range(0..len as u64);
        let shard = shard_path(dir.path(), rec.shard);
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
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let g = layouts().remove(0);
    let w = StoreWriter::open_or_create(dir.path(), &spec(&g, DType::Bf16), small_opts()).unwrap();
    let e = StoreWriter::open_or_create(dir.path(), &spec(&g, DType::Bf16), small_opts())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("being written by another process"), "{e}");
    assert!(
        e.contains("Do not delete the lock file") && !e.contains("remove"),
        "the message must not invite deleting the lock: {e}"
    );
    w.finish().unwrap();
    StoreWriter::open_or_create(dir.path(), &spec(&g, DType::Bf16), small_opts())
        .unwrap()
        .finish()
        .unwrap();
}

#[test]
fn shards_roll_over_and_samples_stay_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = gradshard_store::synth::preset("tiny").unwrap();
    let mut writer = small_opts();
    writer.shard_target_bytes = 64 << 10;
    let opts = SynthOptions {
        geometry: g,
        mlp: None,
        tasks: vec![task("a"), task("b")],
        samples_per_task: 12,
        seed: 3,
        dtype: DType::Bf16,
        codec: CodecSpec::DEFAULT,
        writer,
        pool: 0,
    };
    synth(dir.path(), &opts, &mut |_, _| {}).unwrap();
    let rep = verify(dir.path(), &|_, _| {}).unwrap();
    assert!(rep.ok(), "{:?}", rep.problems);
    assert!(rep.shards >= 3, "only {} shards", rep.shards);
    assert_eq!(rep.samples, 24);
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
}

#[test]
fn manifest_conforms_to_its_json_schema() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/manifest.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for model in ["llama-gqa", "gpt2"] {
        let dir = tempfile::tempdir().unwrap();
        ingest_fixture(model, DType::Bf16, dir.path());
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("manifest.json")).unwrap(),
        )
        .unwrap();
        // Required keys present, no key outside `properties`, enums respected, one level down too.
        fn check(value: &serde_json::Value, schema: &serde_json::Value, at: &str) {
            if let Some(req) = schema["required"].as_array() {
                for k in req {
                    assert!(
                        value.get(k.as_str().unwrap()).is_some(),
                        "{at}: missing {k}"
                    );
                }
            }
            if let (Some(obj), Some(props)) = (value.as_object(), schema["properties"].as_object())
            {
                for (k, v) in obj {
                    let p = props
                        .get(k)
                        .unwrap_or_else(|| panic!("{at}: `{k}` is not in the schema"));
                    if let Some(e) = p["enum"].as_array() {
                        assert!(e.contains(v), "{at}.{k} = {v} not in {e:?}");
                    }
                    if p["type"] == "object" {
                        check(v, p, &format!("{at}.{k}"));
                    }
                    if let Some(items) = p.get("items").filter(|_| v.is_array()) {
                        for x in v.as_array().unwrap() {
                            if let Some(e) = items["enum"].as_array() {
                                assert!(e.contains(x), "{at}.{k}: {x} not in {e:?}");
                            }
                            if items["type"] == "object" {
                                check(x, items, &format!("{at}.{k}[]"));
                            }
                        }
                    }
                }
            }
        }
        check(&m, &schema, "manifest");
        assert!(
            m["other_tensors"].as_array().unwrap().len() >= 4,
            "MLP tensors recorded"
        );
    }
}

/// A shard copied from another store of the same layout is refused at open, naming the
/// shard (it used to be read silently, with other numbers).
#[test]
fn a_shard_from_another_store_is_refused_at_open() {
    let a = small_store(DType::Bf16);
    let b = small_store(DType::Bf16);
    let sa = shard_path(a.path(), 0);
    std::fs::copy(shard_path(b.path(), 0), &sa).unwrap();
    let e = Store::open(a.path()).err().unwrap().to_string();
    assert!(
        e.contains("shard-000000.gss") && e.contains("belongs to another store"),
        "{e}"
    );
}

/// A commit log cut short (at a record boundary or inside a record) while the shards'
/// footers still list the lost samples: open fails, naming the log and the shard,
/// instead of scoring fewer samples without a word.
#[test]
fn a_truncated_commit_log_is_refused_when_sealed_footers_list_more() {
    let dir = small_store(DType::Bf16);
    let log = dir.path().join("samples.log");
    let full = std::fs::read(&log).unwrap();
    let n = Store::open(dir.path()).unwrap().index().n_samples();
    assert_eq!(n, 16);
    // Cut inside the last record, then at the boundary before it.
    for cut in [full.len() - 5, record_starts(&full)[15]] {
        std::fs::write(&log, &full[..cut]).unwrap();
        let e = Store::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("samples.log")
                && e.contains("lacks 1 committed sample")
                && e.contains("shard-000000.gss"),
            "{e}"
        );
    }
    std::fs::write(&log, &full).unwrap();
    assert_eq!(Store::open(dir.path()).unwrap().index().n_samples(), 16);
}

/// Byte offsets at which each log record starts (after the 16-byte header).
fn record_starts(log: &[u8]) -> Vec<usize> {
    let mut at = 16;
    let mut out = Vec::new();
    while at + 12 <= log.len() {
        out.push(at);
        let len = u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
        at += 12 + len;
    }
    out
}

/// A finite f32 past bf16's range (f32::MAX) would be stored as infinity: ingest
/// refuses it, naming the file, the tensor and the element, and keeps the store as it was.
#[test]
fn ingest_refuses_values_that_overflow_bf16() {
    let root = fixtures().join("llama-gqa");
    let src = tempfile::tempdir().unwrap();
    for t in ["math", "general"] {
        std::fs::create_dir_all(src.path().join(t)).unwrap();
        std::fs::copy(
            root.join(format!("grads/{t}/0.safetensors")),
            src.path().join(format!("{t}/0.safetensors")),
        )
        .unwrap();
    }
    // Overwrite one f32 of the first tensor of general/0 with f32::MAX.
    let f = src.path().join("general/0.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut d = bytes.clone();
    let at = 8 + header_len + 4 * 7;
    d[at..at + 4].copy_from_slice(&f32::MAX.to_le_bytes());
    std::fs::write(&f, d).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = |dtype| IngestOptions {
        model_dir: root.join("model"),
        tasks: vec![
            (task("math"), src.path().join("math")),
            (task("general"), src.path().join("general")),
        ],
        store: dir.path().join(format!("{dtype}")),
        dtype,
        codec: CodecSpec::DEFAULT,
        writer: small_opts(),
    };
    let e = ingest(&opts(DType::Bf16), &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("general") && e.contains("0.safetensors") && e.contains("overflows bf16"),
        "{e}"
    );
    // The sample before it is kept and the store verifies.
    let s = Store::open(&dir.path().join("bf16")).unwrap();
    assert_eq!(s.samples("math").unwrap().len(), 1);
    assert!(verify(&dir.path().join("bf16"), &|_, _| {}).unwrap().ok());
    // f32 holds it.
    ingest(&opts(DType::F32), &mut |_, _| {}).unwrap();
}

/// Case 6 of the robustness issue: `verify` during writes used to read the log, then
/// list the shards, so a shard sealed in between looked inconsistent. Many rounds of
/// verify against a writer that seals a shard every few samples: never a problem.
#[test]
fn verify_during_writes_never_reports_a_healthy_store_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = gradshard_store::synth::preset("tiny").unwrap();
    let mut writer = small_opts();
    writer.shard_target_bytes = 16 << 10;
    let opts = SynthOptions {
        geometry: g,
        mlp: None,
        tasks: vec![task("a"), task("b")],
        samples_per_task: 150,
        seed: 5,
        dtype: DType::Bf16,
        codec: CodecSpec::DEFAULT,
        writer,
        pool: 0,
    };
    // A first sample, so that the store exists before the readers start.
    let first = SynthOptions {
        samples_per_task: 1,
        tasks: vec![task("a")],
        ..opts.clone()
    };
    synth(dir.path(), &first, &mut |_, _| {}).unwrap();
    let store = dir.path().to_path_buf();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let w = std::thread::spawn(move || {
        let r = synth(&store, &opts, &mut |_, _| {});
        d2.store(true, std::sync::atomic::Ordering::SeqCst);
        r.unwrap()
    });
    let mut rounds = 0;
    let mut saw_live = false;
    while !done.load(std::sync::atomic::Ordering::SeqCst) || rounds < 3 {
        let rep = verify(dir.path(), &|_, _| {}).unwrap();
        assert!(rep.ok(), "round {rounds}: {:?}", rep.problems);
        saw_live |= rep.samples < 300;
        // Readers see a consistent store too.
        Store::open(dir.path()).unwrap();
        rounds += 1;
    }
    w.join().unwrap();
    assert!(
        saw_live && rounds >= 5,
        "only {rounds} rounds overlapped the writer"
    );
    let rep = verify(dir.path(), &|_, _| {}).unwrap();
    assert!(
        rep.ok() && rep.samples == 300 && rep.shards >= 10,
        "{rep:?}"
    );
}

/// A 0-byte shard (what ENOSPC at shard creation leaves) is a warning, not damage;
/// readers ignore it and the next writer removes it.
#[test]
fn an_empty_shard_left_by_a_failed_creation_is_a_warning_not_damage() {
    let dir = small_store(DType::Bf16);
    let empty = shard_path(dir.path(), 7);
    std::fs::write(&empty, b"").unwrap();
    let rep = verify(dir.path(), &|_, _| {}).unwrap();
    assert!(rep.ok(), "{:?}", rep.problems);
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("shard-000007.gss") && w.contains("shorter than a shard header")),
        "{:?}",
        rep.warnings
    );
    assert_eq!(Store::open(dir.path()).unwrap().index().n_samples(), 16);
    let spec = Store::open(dir.path()).unwrap().manifest().spec.clone();
    StoreWriter::open_or_create(dir.path(), &spec, small_opts())
        .unwrap()
        .finish()
        .unwrap();
    assert!(!empty.exists(), "the next writer removes the empty shard");
    let rep = verify(dir.path(), &|_, _| {}).unwrap();
    assert!(rep.ok() && rep.warnings.is_empty(), "{rep:?}");
}
