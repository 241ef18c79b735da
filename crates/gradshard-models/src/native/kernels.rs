//! The native engine's kernels: matrix products on `gemm` (strided operands,
//! split over rayon), the exponent and element-wise loops compiled for AVX2 where
//! the CPU has it, RMSNorm, RoPE and the projection type [`Lin`].

use rayon::prelude::*;

// ---------------------------------------------------------------------------
// Matrix products
// ---------------------------------------------------------------------------

/// A matrix operand: a slice with its row and column strides (in elements).
#[derive(Clone, Copy)]
pub(super) struct Op<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

/// Row-major operand with `cols` columns (row stride `cols`).
pub(super) fn rm(data: &[f32], cols: usize) -> Op<'_> {
    Op {
        data,
        rs: cols,
        cs: 1,
    }
}

/// The transpose of a row-major matrix with `cols` columns.
pub(super) fn tr(data: &[f32], cols: usize) -> Op<'_> {
    Op {
        data,
        rs: 1,
        cs: cols,
    }
}

/// Number of elements a rows × cols view with these strides spans.
pub(super) fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Products at least this large (multiply-adds) use the rayon pool.
pub(super) const PAR_MACS: usize = 1 << 18;

/// `dst = scale · L·R` (or `dst += scale · L·R` when `acc`) for L m × k and
/// R k × n; `dst` is row-major with row stride `dst_rs`. `par`: whether the
/// product may use the rayon pool (false inside an already parallel loop).
#[allow(clippy::too_many_arguments)]
pub(super) fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    l: Op<'_>,
    r: Op<'_>,
    scale: f32,
    par: bool,
) {
    assert!(extent(m, n, dst_rs, 1) <= dst.len(), "mm: dst too short");
    // SAFETY: dst spans the m × n view (asserted) and is an exclusive borrow.
    unsafe { mm_raw(m, n, k, dst.as_mut_ptr(), dst_rs, acc, l, r, scale, par) }
}

/// [`mm`] into a raw destination.
///
/// # Safety
/// `dst` must be valid for writes over the m × n view with row stride
/// `dst_rs`, and nothing else may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn mm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    l: Op<'_>,
    r: Op<'_>,
    scale: f32,
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                // SAFETY: row i of the view lies inside dst (caller's contract).
                unsafe { std::ptr::write_bytes(dst.add(i * dst_rs), 0, n) };
            }
        }
        return;
    }
    assert!(
        extent(m, k, l.rs, l.cs) <= l.data.len(),
        "mm: lhs too short"
    );
    assert!(
        extent(k, n, r.rs, r.cs) <= r.data.len(),
        "mm: rhs too short"
    );
    let threads = rayon::current_num_threads();
    let parallelism = if par && threads > 1 && m * n * k >= PAR_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the operands' extents were asserted against their slices just
    // above and dst's view is the caller's contract; dst does not alias the
    // operands (they are shared borrows of other buffers). With read_dst gemm
    // computes dst = 1·dst + scale·L·R, without it dst = scale·L·R.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            acc,
            l.data.as_ptr(),
            l.cs as isize,
            l.rs as isize,
            r.data.as_ptr(),
            r.cs as isize,
            r.rs as isize,
            1.0f32,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A buffer that parallel tasks write disjoint parts of (each use says why
/// the parts are disjoint). Only raw pointers and non-overlapping blocks are
/// handed out, never a slice of the whole buffer.
#[derive(Clone, Copy)]
pub(super) struct Shared(*mut f32, usize);
// SAFETY: a `Shared` is only read through `block`/`view`, whose callers
// guarantee that concurrent tasks touch disjoint elements; the buffer outlives
// the tasks (it is a local of the function that spawns them).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    pub(super) fn new(v: &mut [f32]) -> Self {
        Shared(v.as_mut_ptr(), v.len())
    }

    /// Elements off..off + len as a slice.
    ///
    /// # Safety
    /// No other task may access these elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn block(&self, off: usize, len: usize) -> &mut [f32] {
        assert!(off + len <= self.1, "block outside the buffer");
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }

    /// A pointer to element `off` for an m × n view with row stride `rs`
    /// (asserted to lie inside the buffer), for [`mm_raw`].
    pub(super) fn view(&self, off: usize, m: usize, n: usize, rs: usize) -> *mut f32 {
        assert!(
            off + extent(m, n, rs, 1) <= self.1,
            "view outside the buffer"
        );
        // SAFETY: off is inside the allocation (asserted above).
        unsafe { self.0.add(off) }
    }
}

// ---------------------------------------------------------------------------
// Element-wise pieces
// ---------------------------------------------------------------------------

/// e^x in f32 without a library call (so loops over it vectorise): 2^k·p(r)
/// with r = x − k·ln 2, |r| ≤ ln 2 / 2, p the degree-6 Taylor polynomial
/// (relative error < 3e-7, about 2 ulp). Inputs below −87.3 give ~1e-38, not 0.
/// k is read from the bits of the rounding sum, not converted with `as`, so
/// that every step is a plain vector instruction.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
                                     // max/min, not clamp: the same bounds, lowered to plain vector min/max.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(88.7);
    let t = x * LOG2E + ROUND;
    let k = t - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // t = 1.5 · 2^23 + k exactly, so its low mantissa bits hold k.
    let ki = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits((ki.wrapping_add(127) as u32) << 23)
}

/// Lanes of the element-wise reductions below: independent partial results that
/// the compiler keeps in one vector register.
pub(super) const LANES: usize = 16;

/// Runs `$body` (an expression over the function's arguments) through a copy of
/// the function compiled for AVX2 + FMA when the CPU has them, else the baseline
/// copy: the element-wise loops of the engine then run 8 (not 4) lanes wide.
/// Both copies compute the same values (Rust never fuses a·b + c on its own).
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        pub(super) fn $name($($a: $t),*) -> $r {
            #[inline(always)]
            fn imp($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($a: $t),*) -> $r {
                    imp($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `wide` was compiled for.
                    return unsafe { wide($($a),*) };
                }
            }
            imp($($a),*)
        }
    };
}

simd_fn! {
    /// Replaces `row` by exp(row − max row) and returns (max, Σ exp).
    fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
        let mut m = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &x) in m.iter_mut().zip(c) {
                *m = m.max(x);
            }
        }
        let mut max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in chunks.remainder() {
            max = max.max(x);
        }
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = exp_f32(*x - max);
                *a += *x;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp_f32(*x - max);
            sum += *x;
        }
        (max, sum)
    }
}

simd_fn! {
    /// row *= s.
    fn scale_row(row: &mut [f32], s: f32) -> () {
        row.iter_mut().for_each(|x| *x *= s);
    }
}

simd_fn! {
    /// m = silu(gate) · up.
    fn silu_mul(gate: &[f32], up: &[f32], m: &mut [f32]) -> () {
        for ((m, &g), &u) in m.iter_mut().zip(gate).zip(up) {
            *m = g * sigmoid(g) * u;
        }
    }
}

simd_fn! {
    /// The backward of m = silu(gate) · up: dgate and dup from dm.
    fn silu_mul_back(dm: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) -> () {
        for ((((dg, du), &dm), &g), &u) in dgate.iter_mut().zip(dup.iter_mut()).zip(dm).zip(gate).zip(up) {
            let sg = sigmoid(g);
            *dg = dm * u * sg * (1.0 + g * (1.0 - sg));
            *du = dm * (g * sg);
        }
    }
}

/// Splits `n` elements into per-thread blocks of whole rows of `w` for the
/// element-wise kernels (at least 16 K elements each).
pub(super) fn row_block(w: usize) -> usize {
    w * (16384 / w.max(1)).max(1)
}

/// RMSNorm of each row of x (n × d): y = x · r · w with r = (mean x² + ε)^-½;
/// returns y and r per row.
pub(super) fn rms_norm(x: &[f32], d: usize, w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / d;
    let mut y = vec![0f32; x.len()];
    let mut r = vec![0f32; n];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(r.par_iter_mut())
        .for_each(|((y, x), r)| {
            let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
            let ri = ((ms + eps).sqrt() as f32).recip();
            *r = ri;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = (x * ri) * w;
            }
        });
    (y, r)
}

/// dx += RMSNorm backward: with g = dy ⊙ w, dx = r·g − x·r³·mean(g ⊙ x).
pub(super) fn rms_norm_back(dy: &[f32], x: &[f32], r: &[f32], w: &[f32], dx: &mut [f32]) {
    let d = w.len();
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d).zip(x.par_chunks(d)))
        .zip(r.par_iter())
        .for_each(|((dx, (dy, x)), &r)| {
            let dot = dy
                .iter()
                .zip(x)
                .zip(w)
                .map(|((&g, &x), &w)| (g * w) as f64 * x as f64)
                .sum::<f64>();
            let c = (dot / d as f64) as f32 * r * r * r;
            for (((dx, &g), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                *dx += r * (g * w) - x * c;
            }
        });
}

/// cos and sin of one RoPE table for positions 0..t: [t × half] each.
pub(super) struct RopeTab {
    pub(super) half: usize,
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

pub(super) fn rope_tab(freqs: &(Vec<f64>, f64), t: usize) -> RopeTab {
    let (inv, pos_scale) = freqs;
    let half = inv.len();
    let mut cos = vec![0f32; t * half];
    let mut sin = vec![0f32; t * half];
    for p in 0..t {
        for (i, f) in inv.iter().enumerate() {
            // The burn engine's table: angle in f64, then rounded to f32.
            let (s, c) = ((p as f64 / pos_scale) * f).sin_cos();
            cos[p * half + i] = c as f32;
            sin[p * half + i] = s as f32;
        }
    }
    RopeTab { half, cos, sin }
}

/// HF rotate-half RoPE on the first 2·half values of every head of x (rows
/// × heads·d), in place; `inverse` applies the transposed rotation (the
/// backward). Row i sits at position pos[i].
pub(super) fn rope_rows(
    x: &mut [f32],
    heads: usize,
    d: usize,
    pos: &[usize],
    tab: &RopeTab,
    inverse: bool,
) {
    let half = tab.half;
    let sign = if inverse { -1.0f32 } else { 1.0 };
    x.par_chunks_mut(heads * d)
        .zip(pos.par_iter())
        .for_each(|(row, &p)| {
            let cos = &tab.cos[p * half..(p + 1) * half];
            let sin = &tab.sin[p * half..(p + 1) * half];
            for head in row.chunks_exact_mut(d) {
                let (x1, rest) = head.split_at_mut(half);
                let x2 = &mut rest[..half];
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    let s = sign * sin[i];
                    // forward: [a, b] -> [a·cos − b·sin, b·cos + a·sin]
                    x1[i] = a * cos[i] - b * s;
                    x2[i] = b * cos[i] + a * s;
                }
            }
        });
}

/// σ(x) and SiLU's derivative.
#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// A projection y = x·Wᵀ (+ b), W stored [out, in] as in the checkpoint.
pub(super) struct Lin {
    /// Index in [`NativeEngine::params`].
    pub(super) idx: usize,
    pub(super) w: Vec<f32>,
    /// Wᵀ ([in, out]) for the forward product, kept for small models: gemm runs
    /// x·Wᵀ ~1.3× faster from a row-major Wᵀ than from W read transposed
    /// (measured 65–75 vs 77–99 GFLOP/s on one thread at 127 × 512 × 512 … 1376).
    pub(super) wt: Option<Vec<f32>>,
    pub(super) b: Option<Vec<f32>>,
    pub(super) out: usize,
    pub(super) inp: usize,
}

/// The transpose of a row-major rows × cols matrix.
pub(super) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for (r, row) in w.chunks_exact(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            t[c * rows + r] = *v;
        }
    }
    t
}

/// The right operand Wᵀ of x·Wᵀ for W [out, in]: the stored transpose when there
/// is one, else W read transposed.
pub(super) fn wt_op<'a>(w: &'a [f32], wt: Option<&'a [f32]>, out: usize, inp: usize) -> Op<'a> {
    match wt {
        Some(t) => rm(t, out),
        None => tr(w, inp),
    }
}

impl Lin {
    /// y (n × out) = x (n × in) · Wᵀ + b.
    pub(super) fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.out];
        mm(
            n,
            self.out,
            self.inp,
            &mut y,
            self.out,
            false,
            rm(x, self.inp),
            wt_op(&self.w, self.wt.as_deref(), self.out, self.inp),
            1.0,
            true,
        );
        if let Some(b) = &self.b {
            y.par_chunks_mut(self.out).for_each(|row| {
                for (y, b) in row.iter_mut().zip(b) {
                    *y += b;
                }
            });
        }
        y
    }

    /// dx (n × in) (+)= dy (n × out) · W.
    pub(super) fn backward(&self, dy: &[f32], n: usize, dx: &mut [f32], acc: bool) {
        mm(
            n,
            self.inp,
            self.out,
            dx,
            self.inp,
            acc,
            rm(dy, self.out),
            rm(&self.w, self.inp),
            1.0,
            true,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_3e7_of_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp_f32(-1e9) < 1e-37 && exp_f32(-1e9) >= 0.0);
    }

    #[test]
    fn mm_matches_a_naive_product_for_every_stride_form() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive = |i: usize, j: usize| (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
        // row-major operands
        let mut c = vec![1f32; m * n];
        mm(m, n, k, &mut c, n, false, rm(&a, k), rm(&b, n), 2.0, false);
        // transposed forms: aᵀ stored as k × m, bᵀ stored as n × k
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut c2 = vec![1f32; m * n];
        mm(m, n, k, &mut c2, n, true, tr(&at, m), tr(&bt, k), 1.0, true);
        for i in 0..m {
            for j in 0..n {
                assert!((c[i * n + j] - 2.0 * naive(i, j)).abs() < 1e-5);
                assert!((c2[i * n + j] - 1.0 - naive(i, j)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn exp_shifted_matches_the_scalar_softmax_for_every_remainder() {
        for len in [1usize, 7, 16, 17, 33, 100] {
            let orig: Vec<f32> = (0..len).map(|i| (i as f32 * 1.3).sin() * 20.0).collect();
            let mut row = orig.clone();
            let (max, sum) = exp_shifted(&mut row);
            let m = orig.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max, m);
            let want: Vec<f64> = orig.iter().map(|&x| ((x - m) as f64).exp()).collect();
            let ws: f64 = want.iter().sum();
            assert!(
                ((sum as f64) - ws).abs() <= 1e-6 * ws,
                "{len}: {sum} vs {ws}"
            );
            for (a, b) in row.iter().zip(&want) {
                assert!(((*a as f64) - b).abs() <= 3e-7 * b.max(1e-30), "{len}");
            }
        }
    }

    #[test]
    fn rope_inverse_undoes_rope() {
        let tab = rope_tab(&(vec![1.0, 0.1, 0.01], 1.0), 4);
        let orig: Vec<f32> = (0..4 * 2 * 8).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut x = orig.clone();
        rope_rows(&mut x, 2, 8, &[0, 1, 2, 3], &tab, false);
        assert!(x.iter().zip(&orig).any(|(a, b)| (a - b).abs() > 1e-3));
        rope_rows(&mut x, 2, 8, &[0, 1, 2, 3], &tab, true);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
