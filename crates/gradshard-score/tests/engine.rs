//! Engine properties on the fixtures: one read per tile, chunking is exact,
//! subsets keep the full-task Fisher, errors name what is wrong, statistics
//! are seeded, phases 2-4 agree with a direct computation.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;

use gradshard_core::{Block, Geometry, OtherTensor, SampleId, TaskName};
use gradshard_score::fixture::FixtureSource;
use gradshard_score::{
    score, Error, GroupKind, MaskLevel, Result, ScoreOptions, ScoreProgress, ScoreResult, SliceId,
    TileSource, Variant,
};

fn dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(model)
}

fn task(s: &str) -> TaskName {
    TaskName::new(s).unwrap()
}

fn opts() -> ScoreOptions {
    let mut o = ScoreOptions::new(task("math"), task("general"));
    o.n_boot = 200;
    o.n_perm = 99;
    o
}

type Key = (String, usize, Block, usize);

/// Counts `read_tile` calls per (task, layer, block, head) and frames per call.
struct Counting<S> {
    inner: S,
    calls: Mutex<HashMap<Key, usize>>,
}

impl<S: TileSource> TileSource for Counting<S> {
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }
    fn samples(&self, task: &TaskName) -> Result<Vec<(SampleId, u32)>> {
        self.inner.samples(task)
    }
    fn has_block(&self, block: Block) -> bool {
        self.inner.has_block(block)
    }
    fn read_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry((task.to_string(), slice.layer, slice.block, slice.head))
            .or_default() += 1;
        self.inner.read_tile(task, samples, slice, cols, out)
    }
    fn other_tensors(&self) -> Vec<OtherTensor> {
        self.inner.other_tensors()
    }
    fn read_other(
        &self,
        task: &TaskName,
        sample: usize,
        tensor: &str,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.inner.read_other(task, sample, tensor, out)
    }
}

#[test]
fn full_heatmap_reads_each_tile_exactly_once() {
    for model in ["llama-gqa", "gpt2"] {
        let src = Counting {
            inner: FixtureSource::open(&dir(model), false).unwrap(),
            calls: Mutex::new(HashMap::new()),
        };
        let g = src.geometry().clone();
        let res = score(&src, &opts(), &mut |_| {}).unwrap();
        let calls = src.calls.lock().unwrap();
        let mut expected = 0;
        for t in ["math", "general"] {
            for layer in 0..g.layers {
                for block in Block::ALL {
                    for head in 0..g.heads_of(block) {
                        expected += 1;
                        assert_eq!(
                            calls.get(&(t.to_string(), layer, block, head)),
                            Some(&1),
                            "{model} {t} l{layer} {block} h{head}"
                        );
                    }
                }
            }
        }
        assert_eq!(calls.len(), expected, "no other tile was read");
        assert_eq!(res.reads.tile_reads, expected as u64);
        assert_eq!(res.reads.frame_rereads, 0);
        assert_eq!(res.reads.frame_reads, expected as u64 * 8);
    }
}

#[test]
fn column_chunks_give_the_same_results() {
    let src = FixtureSource::open(&dir("llama-gqa"), false).unwrap();
    for lam_rel in [0.0, 1e-2] {
        let mut a = opts();
        a.lam_rel = lam_rel;
        a.pairs_for = vec![(0, 0), (1, 3)];
        let mut b = a.clone();
        // Fixed part: |S|·32 bytes; each column of both tiles: 16 rows · 4 bytes.
        b.memory_budget = 1024 * 32 + 64 * 100;
        let mut chunks = 0;
        let ra = score(&src, &a, &mut |_| {}).unwrap();
        let rb = score(&src, &b, &mut |p| {
            if let ScoreProgress::Plan {
                chunks_per_slice, ..
            } = p
            {
                chunks = chunks_per_slice
            }
        })
        .unwrap();
        assert_eq!(chunks, 11);
        assert!(rb.reads.frame_rereads > 0);
        assert!(rb.diagnostics.iter().all(|d| d.chunks == 11));
        for (x, y) in ra.cells.iter().zip(&rb.cells) {
            assert!((x.score_mean - y.score_mean).abs() <= 1e-12 * x.score_mean.abs());
        }
        for (x, y) in ra.diagnostics.iter().zip(&rb.diagnostics) {
            assert_eq!(x.fisher_median, y.fisher_median);
            assert_eq!(x.lam_applied, y.lam_applied);
        }
        for (x, y) in ra.top.iter().zip(&rb.top) {
            assert_eq!(
                (&x.sample_a, &x.sample_b, x.layer, x.head),
                (&y.sample_a, &y.sample_b, y.layer, y.head)
            );
            assert!((x.score - y.score).abs() <= 1e-12 * x.score.abs());
            // Same rows, same draws: same p-values.
            assert_eq!(x.p_value, y.p_value);
        }
        for (x, y) in ra.pairs.iter().zip(&rb.pairs) {
            for (u, v) in x.values.iter().zip(&y.values) {
                assert!((u - v).abs() <= 1e-12 * u.abs());
            }
        }
    }
}

#[test]
fn a_sample_subset_keeps_the_full_task_fisher() {
    let src = FixtureSource::open(&dir("gpt2"), false).unwrap();
    let mut full = opts();
    full.pairs_for = vec![(1, 2)];
    let mut sub = full.clone();
    sub.samples_a = Some(vec![SampleId::Int(6), SampleId::Int(2)]);
    sub.samples_b = Some(vec![SampleId::Int(7)]);
    let rf = score(&src, &full, &mut |_| {}).unwrap();
    let rs = score(&src, &sub, &mut |_| {}).unwrap();
    assert_eq!(
        rs.samples_a.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        vec![SampleId::Int(2), SampleId::Int(6)]
    );
    for block in Block::ALL {
        let f = rf.pairs.iter().find(|p| p.block == block).unwrap();
        let s = rs.pairs.iter().find(|p| p.block == block).unwrap();
        assert_eq!((s.n_a, s.n_b), (2, 1));
        assert_eq!(s.get(0, 0), f.get(2, 7));
        assert_eq!(s.get(1, 0), f.get(6, 7));
    }
    // The denominator Fisher is still over all 8 stored samples.
    assert!(rs.diagnostics.iter().all(|d| d.n_fisher == 8 && d.n_a == 2));
    assert_eq!(
        rs.diagnostics[0].fisher_median,
        rf.diagnostics[0].fisher_median
    );
    assert_eq!(rs.cells[0].n_pairs, 2);
}

#[test]
fn errors_name_what_is_wrong() {
    let src = FixtureSource::open(&dir("llama-gqa"), false).unwrap();
    let mut o = opts();
    o.task_b = task("poetry");
    let e = score(&src, &o, &mut |_| {}).unwrap_err();
    assert!(
        matches!(e, Error::UnknownTask { .. }) && e.to_string().contains("poetry"),
        "{e}"
    );

    let mut o = opts();
    o.samples_a = Some(vec![SampleId::Int(99)]);
    let e = score(&src, &o, &mut |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("99") && e.to_string().contains("math"),
        "{e}"
    );

    let dropped = FixtureSource::open(&dir("llama-gqa"), false)
        .unwrap()
        .drop_block(Block::V);
    let e = score(&dropped, &opts(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::MissingBlock { block: Block::V }), "{e}");
    // Without V selected the same source scores fine.
    let mut o = opts();
    o.blocks = vec![Block::Q, Block::K, Block::O];
    assert!(score(&dropped, &o, &mut |_| {}).is_ok());

    let mut poked = FixtureSource::open(&dir("llama-gqa"), false).unwrap();
    // k_proj of layer 1 is [32, 64]: row 20 belongs to kv head 1 (rows 16..32).
    poked.poke(
        "general",
        3,
        "model.layers.1.self_attn.k_proj.weight",
        20 * 64 + 5,
        f32::NAN,
    );
    let e = score(&poked, &opts(), &mut |_| {}).unwrap_err();
    match &e {
        Error::NonFinite {
            task,
            id,
            layer,
            block,
            head,
            element,
            ..
        } => {
            assert_eq!(
                (task.as_str(), id, *layer, *block, *head, *element),
                ("general", &SampleId::Int(3), 1, Block::K, 1, 4 * 64 + 5)
            );
        }
        other => panic!("unexpected {other}"),
    }

    let src2 = FixtureSource::open(&dir("gpt2"), false).unwrap();
    let mut o = opts();
    o.expected_geometry = Some(src.geometry().clone());
    let e = score(&src2, &o, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::GeometryMismatch { .. }), "{e}");

    let mut o = opts();
    o.layers = Some(vec![2]);
    assert!(matches!(
        score(&src, &o, &mut |_| {}).unwrap_err(),
        Error::InvalidOption { name: "layers", .. }
    ));
    let mut o = opts();
    o.heads = Some(vec![0]);
    o.pairs_for = vec![(0, 2)];
    assert!(matches!(
        score(&src, &o, &mut |_| {}).unwrap_err(),
        Error::InvalidOption {
            name: "pairs_for",
            ..
        }
    ));
    let mut o = opts();
    o.memory_budget = 1000;
    assert!(matches!(
        score(&src, &o, &mut |_| {}).unwrap_err(),
        Error::BudgetTooSmall { .. }
    ));
}

#[test]
fn few_samples_warn_but_score() {
    let src = FixtureSource::open(&dir("gpt2"), false).unwrap();
    let mut warned = Vec::new();
    let res = score(&src, &opts(), &mut |p| {
        if let ScoreProgress::Warning(w) = p {
            warned.push(w)
        }
    })
    .unwrap();
    assert_eq!(warned.len(), 2, "both tasks have 8 < 10 samples");
    assert_eq!(res.warnings, warned);
}

type Intervals = Vec<(Option<f64>, Option<f64>)>;

fn stats_of(r: &ScoreResult) -> (Intervals, Vec<Option<f64>>) {
    (
        r.cells.iter().map(|c| (c.ci_low, c.ci_high)).collect(),
        r.top.iter().map(|t| t.p_value).collect(),
    )
}

#[test]
fn statistics_are_seeded_valid_and_informative() {
    let src = FixtureSource::open(&dir("llama-gqa"), false).unwrap();
    for variant in [Variant::Unsigned, Variant::Signed] {
        let mut o = opts();
        o.variant = variant;
        let r1 = score(&src, &o, &mut |_| {}).unwrap();
        let r2 = score(&src, &o, &mut |_| {}).unwrap();
        assert_eq!(stats_of(&r1), stats_of(&r2), "same seed, same statistics");
        o.seed = 12345;
        let r3 = score(&src, &o, &mut |_| {}).unwrap();
        assert_ne!(stats_of(&r1), stats_of(&r3), "another seed, other draws");
        for c in &r1.cells {
            let (lo, hi) = (c.ci_low.unwrap(), c.ci_high.unwrap());
            assert!(lo <= hi);
            // The mean lies inside its own percentile interval for these data.
            assert!(lo <= c.score_mean && c.score_mean <= hi, "{c:?}");
        }
        let ps: Vec<f64> = r1.top.iter().map(|t| t.p_value.unwrap()).collect();
        assert_eq!(ps.len(), 4 * 20);
        for t in &r1.top {
            let (p, q) = (t.p_value.unwrap(), t.q_value.unwrap());
            assert!((1.0 / 100.0..=1.0).contains(&p), "never 0: {p}");
            assert!(q >= p && q <= 1.0);
        }
        // The null is not invariant: p-values are not all the same value.
        let min = ps.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ps.iter().cloned().fold(0.0, f64::max);
        assert!(max > min, "{variant:?}: degenerate p-values {min}..{max}");
    }
}

#[test]
fn group_fisher_matches_a_direct_computation() {
    let src = FixtureSource::open(&dir("llama-gqa"), false).unwrap();
    let mut o = opts();
    o.mlp_fisher = true;
    o.n_boot = 0;
    o.n_perm = 0;
    let res = score(&src, &o, &mut |_| {}).unwrap();
    let g = src.geometry().clone();
    let s_len = g.slice_numel();
    // Direct: I over all 8 samples of the task for (layer 1, K, kv head 1).
    for t in ["math", "general"] {
        let samples = src.samples(&task(t)).unwrap();
        let idx: Vec<usize> = (0..samples.len()).collect();
        let mut tile = vec![0f32; idx.len() * s_len];
        src.read_tile(
            &task(t),
            &idx,
            SliceId::new(1, Block::K, 1),
            0..s_len,
            &mut tile,
        )
        .unwrap();
        let mut sum = 0.0f64;
        for (r, (_, tok)) in samples.iter().enumerate() {
            for v in &tile[r * s_len..(r + 1) * s_len] {
                sum += (*v as f64).powi(2) / *tok as f64;
            }
        }
        sum /= samples.len() as f64;
        let row = res
            .group_fisher
            .iter()
            .find(|r| {
                r.task.as_str() == t
                    && r.kind == GroupKind::Attention
                    && r.block == Some(Block::K)
                    && r.layer == Some(1)
                    && r.head == Some(1)
            })
            .unwrap();
        assert!((row.fisher_sum - sum).abs() <= 1e-12 * sum, "{t}");
        assert!((row.fisher_mean - sum / s_len as f64).abs() <= 1e-12 * sum);
        let imp: f64 = res
            .group_fisher
            .iter()
            .filter(|r| r.task.as_str() == t && r.kind == GroupKind::Attention)
            .map(|r| r.importance)
            .sum();
        assert!((imp - 1.0).abs() < 1e-12);
        // MLP channels: down_proj [64, 96] has 64 output channels (rows).
        let down: Vec<_> = res
            .group_fisher
            .iter()
            .filter(|r| {
                r.task.as_str() == t
                    && r.tensor.as_deref() == Some("model.layers.0.mlp.down_proj.weight")
            })
            .collect();
        assert_eq!(down.len(), 64);
        assert!(down.iter().all(|r| r.numel == 96 && r.fisher_sum > 0.0));
    }
    assert_eq!(res.reads.other_reads, 2 * 8 * 6);
    // Element masks at s = 0.5 keep half of each slice; groups: 24 slices → 12 kept.
    for o in &res.overlap {
        if o.level == MaskLevel::Element && o.block.is_some() && o.sparsity == 0.5 {
            assert_eq!((o.numel, o.kept_a, o.kept_b), (1024, 512, 512));
            assert!(o.iou.unwrap() > 0.0 && o.iou.unwrap() <= 1.0);
            let c = o.fisher_cosine.unwrap();
            assert!(c > 0.0 && c <= 1.0 + 1e-12);
        }
        if o.level == MaskLevel::Group && o.sparsity == 0.5 {
            assert_eq!((o.numel, o.kept_a, o.kept_b), (24, 12, 12));
        }
    }
    assert_eq!(res.masks.len(), 2 * 2 * 24);
}

#[test]
fn head_filter_keeps_only_needed_kv_heads() {
    let src = Counting {
        inner: FixtureSource::open(&dir("llama-gqa"), false).unwrap(),
        calls: Mutex::new(HashMap::new()),
    };
    let mut o = opts();
    o.heads = Some(vec![3]);
    o.layers = Some(vec![1]);
    let res = score(&src, &o, &mut |_| {}).unwrap();
    // Q h3, K kv1, V kv1, O h3 of layer 1, for two tasks.
    assert_eq!(src.calls.lock().unwrap().len(), 8);
    let rows = res.heatmap_rows();
    assert_eq!(rows.len(), 4);
    let k = rows.iter().find(|r| r.block == Block::K).unwrap();
    assert_eq!((k.head, k.kv_head, k.kv_shared), (3, 1, true));
}
