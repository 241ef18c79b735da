//! The CPU backend's concurrent pass (several whole slices at once, one per thread; a
//! bf16 store's tiles read as byte planes) gives exactly the results of the one-slice-
//! at-a-time pass, in every variant and pool, with sample subsets, permutation rows and
//! kept pair matrices.

use gradshard_core::{Block, DType, SampleId, TaskName};
use gradshard_score::{
    score_with_backend, CpuBackend, FisherPool, ScoreOptions, ScoreProgress, ScoreResult,
    StoreSource, Variant,
};
use gradshard_store::{CodecSpec, SampleMeta, Store, StoreSpec, StoreWriter, WriterOptions};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn write_store(dir: &std::path::Path, dtype: DType) {
    let g = gradshard_core::ModelShape::geometry_of(
        &json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":48,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16}),
    )
    .unwrap();
    let spec = StoreSpec {
        geometry: g,
        dtype,
        codec: CodecSpec::DEFAULT,
        blocks: Block::ALL.to_vec(),
        other_tensors: vec![],
    };
    let mut w = StoreWriter::open_or_create(dir, &spec, WriterOptions::default()).unwrap();
    let order = w.order().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (ti, task) in ["math", "general"].into_iter().enumerate() {
        for i in 0..5 + ti {
            let meta = SampleMeta {
                task: TaskName::new(task).unwrap(),
                id: SampleId::Int(i as i64),
                tokens: 3 + (i as u32 * 7) % 11,
                loss_sum: 1.0,
            };
            let mut h = w.begin_sample(meta).unwrap();
            for f in 0..order.n_frames() {
                // Heavy-tailed values over many octaves, a few exact zeros.
                let v: Vec<f32> = (0..order.frame_numel(f).unwrap())
                    .map(|_| {
                        let x: f32 = rng.random_range(-1.0..1.0);
                        if x.abs() < 0.02 {
                            0.0
                        } else {
                            x * (rng.random_range(-12.0f32..2.0)).exp2()
                        }
                    })
                    .collect();
                w.put_frame(&mut h, f, v).unwrap();
            }
            w.end_sample(h).unwrap();
        }
    }
    w.finish().unwrap();
}

/// Scores on a pool of `threads` threads; returns the result and how many slices the
/// engine scored at a time.
fn run(store: &Store, o: &ScoreOptions, threads: usize) -> (ScoreResult, usize) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut at_once = 0;
        let r = score_with_backend(
            &StoreSource { store },
            o,
            &CpuBackend::default(),
            &mut |p| {
                if let ScoreProgress::Timing { slices_at_once, .. } = p {
                    at_once = slices_at_once;
                }
            },
        )
        .unwrap();
        (r, at_once)
    })
}

#[test]
fn several_slices_at_once_give_the_one_at_a_time_results_bit_for_bit() {
    for dtype in [DType::Bf16, DType::F32] {
        let dir = tempfile::tempdir().unwrap();
        write_store(dir.path(), dtype);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.bf16_planes(), dtype == DType::Bf16);
        for (variant, pool, subset) in [
            (Variant::Unsigned, FisherPool::A, false),
            (Variant::Signed, FisherPool::Pooled, true),
            (Variant::Symmetric, FisherPool::B, true),
        ] {
            let mut o = ScoreOptions::new(
                TaskName::new("math").unwrap(),
                TaskName::new("general").unwrap(),
            );
            (o.variant, o.fisher_pool) = (variant, pool);
            o.n_boot = 10;
            o.n_perm = 30;
            o.top_k = 7;
            o.min_samples = 0;
            o.pairs_for = vec![(1, 2)];
            if subset {
                // Scored rows that are not the first stored ones (the byte-plane rows
                // of permutation-test pairs are found through the selection).
                o.samples_a = Some(vec![SampleId::Int(1), SampleId::Int(4)]);
                o.samples_b = Some(vec![SampleId::Int(0), SampleId::Int(3), SampleId::Int(5)]);
            }
            let (one, n1) = run(&store, &o, 1);
            let (many, n3) = run(&store, &o, 3);
            assert_eq!(n1, 1, "one thread scores one slice at a time");
            assert!(n3 > 1, "{dtype} {variant:?}: {n3} slices at once");
            assert!(!one.top.is_empty() && one.top.iter().all(|t| t.p_value.is_some()));
            assert_eq!(one, many, "{dtype} {variant:?} {pool:?} subset={subset}");
        }
    }
}
