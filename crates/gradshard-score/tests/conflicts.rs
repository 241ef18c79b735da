//! Phase 5 (sample conflicts) through the library: column-chunked slices and the device
//! backend (burn's ndarray) give the CPU's numbers, a zero slice gives cosines 0 without
//! NaN, a task with one analysed sample is an error naming it, and a run without
//! `conflicts` computes none. The numbers themselves are checked against a float64
//! reference in the CLI's `tests/conflicts.rs`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use gradshard_core::{Block, Geometry, OtherTensor, SampleId, TaskName};
use gradshard_score::fixture::FixtureSource;
use gradshard_score::{
    score, score_with_backend, ConflictRow, Error, GpuPrecision, Granularity, NdArrayBackend,
    Result, ScoreOptions, ScoreResult, SliceId, TileSource,
};

fn dir(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(model)
}

fn task(t: &str) -> TaskName {
    TaskName::new(t).unwrap()
}

fn opts() -> ScoreOptions {
    let mut o = ScoreOptions::new(task("math"), task("general"));
    o.conflicts = true;
    o.n_boot = 50;
    o.n_perm = 100;
    o.min_samples = 0;
    o.group_fisher = false;
    o
}

fn rows(r: &ScoreResult) -> &[ConflictRow] {
    &r.conflicts.as_ref().expect("conflicts computed").rows
}

/// Every cosine statistic of two runs' rows equal within `tol`; with `same_p`, the
/// p-values too (to 1e-12).
fn assert_rows_close(a: &ScoreResult, b: &ScoreResult, tol: f64, same_p: bool, what: &str) {
    let (ra, rb) = (rows(a), rows(b));
    assert_eq!(ra.len(), rb.len(), "{what}: row count");
    assert!(!ra.is_empty());
    for (x, y) in ra.iter().zip(rb) {
        let key = (x.granularity, x.block, x.layer, x.head);
        assert_eq!(key, (y.granularity, y.block, y.layer, y.head), "{what}");
        for (n, u, v) in [
            ("cross_mean", x.cross_mean, y.cross_mean),
            ("within_a", x.within_a, y.within_a),
            ("within_b", x.within_b, y.within_b),
            ("delta", x.delta, y.delta),
            ("frac_negative", x.frac_negative, y.frac_negative),
        ] {
            assert!((u - v).abs() <= tol, "{what} {key:?} {n}: {u} vs {v}");
        }
        assert_eq!(x.exact, y.exact, "{what} {key:?}");
        let (p, q) = (x.p_value.unwrap(), y.p_value.unwrap());
        assert!(
            !same_p || (p - q).abs() <= 1e-12,
            "{what} {key:?} p: {p} vs {q}"
        );
    }
}

#[test]
fn column_chunks_give_the_same_conflicts() {
    let src = FixtureSource::open(&dir("llama-gqa"), false).unwrap();
    let g = src.geometry().clone();
    for lam_rel in [0.0, 0.2] {
        let mut o = opts();
        o.lam_rel = lam_rel;
        o.samples_a = Some((0..3).map(SampleId::Int).collect());
        o.samples_b = Some((2..5).map(SampleId::Int).collect());
        let whole = score(&src, &o, &mut |_| {}).unwrap();
        assert!(whole.diagnostics.iter().all(|d| d.chunks == 1));
        // Room for a quarter of a slice's columns of both tasks (8 + 8 rows).
        let s_len = g.slice_numel();
        o.memory_budget = s_len * 32 + 16 * 4 * (s_len / 4);
        let chunked = score(&src, &o, &mut |_| {}).unwrap();
        assert!(chunked.diagnostics.iter().all(|d| d.chunks == 4));
        assert_rows_close(
            &whole,
            &chunked,
            1e-12,
            true,
            &format!("chunked, lam_rel {lam_rel}"),
        );
        // C(6, 3) = 20 ≤ n_perm: every p is exact.
        assert!(rows(&whole).iter().all(|r| r.exact));
        assert_eq!(
            whole.conflicts.as_ref().unwrap().pairs.len(),
            chunked.conflicts.as_ref().unwrap().pairs.len()
        );
    }
}

#[test]
fn device_backend_gives_the_cpu_conflicts() {
    let src = FixtureSource::open(&dir("gpt2"), false).unwrap();
    let mut o = opts();
    o.samples_a = Some((0..4).map(SampleId::Int).collect());
    o.samples_b = Some((0..4).map(SampleId::Int).collect());
    let cpu = score(&src, &o, &mut |_| {}).unwrap();
    let dev = NdArrayBackend::ndarray(GpuPrecision::F64);
    let gpu = score_with_backend(&src, &o, &dev, &mut |_| {}).unwrap();
    assert_eq!(gpu.backend, gradshard_score::Backend::name(&dev));
    assert_rows_close(&cpu, &gpu, 1e-9, true, "ndarray f64");
    let dev32 = NdArrayBackend::ndarray(GpuPrecision::F32);
    let gpu32 = score_with_backend(&src, &o, &dev32, &mut |_| {}).unwrap();
    // f32 products: the cosines to ~1e-6, so a relabelling within that of the observed
    // delta may count differently; the p-values are not compared.
    assert_rows_close(&cpu, &gpu32, 1e-4, false, "ndarray f32");
}

/// A source whose slice (layer 0, block Q, head 0) is zero in every sample.
struct ZeroSlice(FixtureSource);

impl TileSource for ZeroSlice {
    fn geometry(&self) -> &Geometry {
        self.0.geometry()
    }
    fn samples(&self, task: &TaskName) -> Result<Vec<(SampleId, u32)>> {
        self.0.samples(task)
    }
    fn has_block(&self, block: Block) -> bool {
        self.0.has_block(block)
    }
    fn read_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        self.0.read_tile(task, samples, slice, cols, out)?;
        if slice == SliceId::new(0, Block::Q, 0) {
            out.iter_mut().for_each(|v| *v = 0.0);
        }
        Ok(())
    }
    fn other_tensors(&self) -> Vec<OtherTensor> {
        self.0.other_tensors()
    }
    fn read_other(&self, task: &TaskName, s: usize, t: &str, out: &mut Vec<f32>) -> Result<()> {
        self.0.read_other(task, s, t, out)
    }
}

#[test]
fn a_zero_slice_has_cosines_zero_and_no_nan() {
    let src = ZeroSlice(FixtureSource::open(&dir("llama-gqa"), false).unwrap());
    let mut o = opts();
    o.blocks = vec![Block::Q];
    o.samples_a = Some((0..3).map(SampleId::Int).collect());
    o.samples_b = Some((0..3).map(SampleId::Int).collect());
    let r = score(&src, &o, &mut |_| {}).unwrap();
    let c = r.conflicts.as_ref().unwrap();
    let zero = c
        .rows
        .iter()
        .find(|r| r.granularity == Granularity::Head && r.layer == 0 && r.head == Some(0))
        .unwrap();
    assert_eq!(
        (zero.cross_mean, zero.within_a, zero.within_b, zero.delta),
        (0.0, 0.0, 0.0, 0.0)
    );
    assert_eq!(zero.frac_negative, 0.0);
    // Every relabelling ties with delta = 0.
    assert_eq!(zero.p_value, Some(1.0));
    assert_eq!((zero.ci_low, zero.ci_high), (Some(0.0), Some(0.0)));
    for row in &c.rows {
        for v in [row.cross_mean, row.within_a, row.within_b, row.delta] {
            assert!(v.is_finite(), "{row:?}");
        }
    }
    assert!(c.pairs.iter().all(|p| p.cosine.is_finite()));
    assert!(c.samples.iter().all(|s| s.mean_cosine.is_finite()));
    // The other heads are not zero.
    assert!(c
        .rows
        .iter()
        .any(|r| r.granularity == Granularity::Head && r.cross_mean != 0.0));
}

#[test]
fn one_analysed_sample_is_an_error_naming_the_task() {
    let src = FixtureSource::open(&dir("llama-gqa"), false).unwrap();
    let mut o = opts();
    o.samples_b = Some(vec![SampleId::Int(3)]);
    let e = score(&src, &o, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                name: "conflicts",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("`general`"), "{e}");
    // Without conflicts the same selection scores.
    o.conflicts = false;
    assert!(score(&src, &o, &mut |_| {}).unwrap().conflicts.is_none());
}
