//! Scoring a factored store (format v2): the CPU backend (factors multiplied out by the
//! reader) and the device code path (factors uploaded and multiplied out on the device,
//! here burn's ndarray backend) agree with each other and with a store holding the same
//! gradients as full slices; a store mixing both representations scores the same.

use gradshard_core::{Block, DType, Geometry, SampleId, TaskName};
use gradshard_score::{
    score_with_backend, CpuBackend, GpuPrecision, NdArrayBackend, ScoreOptions, ScoreResult,
    StoreSource,
};
use gradshard_store::{
    CodecSpec, Representation, SampleMeta, Store, StoreSpec, StoreWriter, WriterOptions,
};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn geometry() -> Geometry {
    gradshard_core::ModelShape::geometry_of(
        &json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":32,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":8}),
    )
    .unwrap()
}

/// Writes 6 samples per task with random factors; `repr(task, i)` decides whether
/// sample i is stored factored or multiplied out as full slices.
fn write_store(dir: &std::path::Path, repr: impl Fn(usize, usize) -> Representation) {
    let g = geometry();
    let spec = StoreSpec {
        geometry: g,
        dtype: DType::F32,
        codec: CodecSpec::DEFAULT,
        blocks: Block::ALL.to_vec(),
        other_tensors: vec![],
    };
    let mut w = StoreWriter::open_or_create(dir, &spec, WriterOptions::default()).unwrap();
    let order = w.order().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for (ti, task) in ["math", "general"].into_iter().enumerate() {
        for i in 0..6 {
            let n = 3 + (i * 5 + ti) % 7;
            let shared: Vec<Vec<f32>> = order
                .shared()
                .iter()
                .map(|s| {
                    (0..n * s.cols)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect()
                })
                .collect();
            let ps: Vec<Vec<f32>> = (0..order.n_frames())
                .map(|f| {
                    let (_, r, _) = order.factor_of(f).unwrap();
                    (0..n * r).map(|_| rng.random_range(-1.0..1.0)).collect()
                })
                .collect();
            let meta = SampleMeta {
                task: TaskName::new(task).unwrap(),
                id: SampleId::Int(i as i64),
                tokens: n as u32,
                loss_sum: 1.0,
            };
            let rp = repr(ti, i);
            let mut h = w.begin_sample_as(meta, rp).unwrap();
            for (f, p) in ps.iter().enumerate() {
                let (j, r, c) = order.factor_of(f).unwrap();
                if rp == Representation::Factored {
                    w.put_factor(&mut h, f, n, p.clone()).unwrap();
                } else {
                    let mut full = vec![0f32; r * c];
                    gradshard_core::factor::pt_s(p, &shared[j], n, r, c, &mut full);
                    w.put_frame(&mut h, f, full).unwrap();
                }
            }
            if rp == Representation::Factored {
                for (j, s) in shared.into_iter().enumerate() {
                    w.put_shared(&mut h, j, n, s).unwrap();
                }
            }
            w.end_sample(h).unwrap();
        }
    }
    w.finish().unwrap();
}

fn opts() -> ScoreOptions {
    let mut o = ScoreOptions::new(
        TaskName::new("math").unwrap(),
        TaskName::new("general").unwrap(),
    );
    o.n_boot = 20;
    o.n_perm = 20;
    o.min_samples = 0;
    o.pairs_for = vec![(0, 1), (1, 3)];
    o
}

fn worst(a: &ScoreResult, b: &ScoreResult) -> f64 {
    let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-12);
    let mut w = 0f64;
    assert_eq!(a.cells.len(), b.cells.len());
    for (x, y) in a.cells.iter().zip(&b.cells) {
        assert_eq!((x.block, x.layer, x.head), (y.block, y.layer, y.head));
        w = w.max(rel(x.score_mean, y.score_mean));
    }
    for (x, y) in a.pairs.iter().zip(&b.pairs) {
        assert_eq!((x.block, x.layer, x.head), (y.block, y.layer, y.head));
        for (u, v) in x.values.iter().zip(&y.values) {
            w = w.max(rel(*u, *v));
        }
    }
    for (x, y) in a.diagnostics.iter().zip(&b.diagnostics) {
        w = w.max(rel(x.fisher_max, y.fisher_max));
        w = w.max(rel(x.fisher_median, y.fisher_median));
    }
    assert_eq!(a.top.len(), b.top.len());
    w
}

#[test]
fn factored_store_scores_like_full_slices_on_the_cpu_and_the_device_path() {
    let full = tempfile::tempdir().unwrap();
    let fact = tempfile::tempdir().unwrap();
    let mixed = tempfile::tempdir().unwrap();
    write_store(full.path(), |_, _| Representation::Full);
    write_store(fact.path(), |_, _| Representation::Factored);
    write_store(mixed.path(), |t, i| {
        if (t + i) % 2 == 0 {
            Representation::Factored
        } else {
            Representation::Full
        }
    });
    let o = opts();
    let run = |dir: &std::path::Path, b: &dyn gradshard_score::Backend| {
        let store = Store::open(dir).unwrap();
        score_with_backend(&StoreSource { store: &store }, &o, b, &mut |_| {}).unwrap()
    };
    let cpu = CpuBackend::default();
    let base = run(full.path(), &cpu);
    let on_cpu = run(fact.path(), &cpu);
    let w = worst(&on_cpu, &base);
    assert!(w <= 1e-5, "factored on the CPU vs full slices: {w:.2e}");
    for (name, dir) in [("factored", fact.path()), ("mixed", mixed.path())] {
        let dev = NdArrayBackend::ndarray(GpuPrecision::F64);
        let r = run(dir, &dev);
        let w = worst(&r, &base);
        eprintln!("{name} store on the device path: worst relative difference {w:.2e}");
        assert!(
            w <= 1e-5,
            "{name} on the device path vs full slices: {w:.2e}"
        );
        let st = dev.stats();
        let slices = 2 * (4 + 2 + 2 + 4) as u64;
        assert_eq!(
            st.factor_tiles,
            2 * slices,
            "{name}: every tile formed from factors"
        );
        // S goes up once per (layer, role, task): 2 layers × 2 roles × 2 tasks.
        assert_eq!(
            st.factor_tiles - st.shared_reused,
            2 * 2 * 2 + if name == "mixed" { 2 * slices - 8 } else { 0 },
            "{name}: shared-factor uploads"
        );
    }
    // Same top pairs (ids and order) from every representation.
    let ids = |r: &ScoreResult| -> Vec<(String, String)> {
        r.top
            .iter()
            .map(|t| (t.sample_a.to_string(), t.sample_b.to_string()))
            .collect()
    };
    assert_eq!(ids(&on_cpu), ids(&base));
}

/// On a CUDA device (ignored unless asked for: `cargo test -p gradshard-score
/// --features cuda --test factored -- --ignored`; fails without a device): the
/// factored store's tiles formed on the GPU score like the full-slice store on the CPU.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test -p gradshard-score --features cuda --test factored -- --ignored"]
fn factored_store_on_cuda_scores_like_full_slices() {
    use gradshard_score::CudaBackend;
    let dev = CudaBackend::new(0, GpuPrecision::F64)
        .unwrap_or_else(|e| panic!("no usable CUDA device 0 ({e})"));
    let full = tempfile::tempdir().unwrap();
    let fact = tempfile::tempdir().unwrap();
    write_store(full.path(), |_, _| Representation::Full);
    write_store(fact.path(), |_, _| Representation::Factored);
    let o = opts();
    let s_full = Store::open(full.path()).unwrap();
    let s_fact = Store::open(fact.path()).unwrap();
    let base = score_with_backend(
        &StoreSource { store: &s_full },
        &o,
        &CpuBackend::default(),
        &mut |_| {},
    )
    .unwrap();
    let r = score_with_backend(&StoreSource { store: &s_fact }, &o, &dev, &mut |_| {}).unwrap();
    let w = worst(&r, &base);
    eprintln!("factored store on CUDA (3x split TF32 products): worst relative difference {w:.2e}");
    assert!(dev.stats().factor_tiles > 0);
    assert!(w <= 1e-4, "{w:.2e}");
}
