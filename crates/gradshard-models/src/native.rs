//! The native CPU engine: forward and backward of the LLaMA-style decoder
//! written out by hand over f32 buffers, with every matrix product on the
//! `gemm` crate (AVX-512 kernels where the CPU has them).
//!
//! Why it exists (issue 12, docs/perf-plan.md §C6): on the CPU, burn's
//! autodiff graph spends as much time building nodes, gathering strided
//! views and copying layouts as it spends multiplying. Per-sample gradients
//! of a few weight matrices need none of that: the backward of a decoder is a
//! fixed sequence of products, and the two factors of every tracked weight's
//! gradient (δ, the gradient of the weight's output, and x, its input) fall
//! out of it. This engine runs exactly that sequence:
//!
//! - samples of a chunk are *packed*, not padded: the token rows of all
//!   samples form one [N, ·] matrix (N = Σ T), so every projection is one
//!   product over all of them and no padding is computed; only attention and
//!   the loss look at sample boundaries;
//! - the logits never exist whole: the LM head, softmax, loss and its
//!   gradient run on blocks of rows (≤ 16 MB of logits at a time);
//! - the backward goes layer by layer, and each layer's tracked weights are
//!   handed out (as G = δᵀx per sample, or as the factors δ and x) as soon as
//!   their δ is known.
//!
//! It covers what the LLaMA family needs — `llama`, `mistral`, `qwen2` and any
//! [`DecoderConfig`] of the same form: pre-norm RMSNorm (w or 1 + w),
//! sequential residual, separate Q/K/V (with or without biases), RoPE on all
//! or part of each head, grouped-query attention, optional sliding windows,
//! a gated SiLU MLP, an untied or tied LM head without soft-caps — and the
//! tracked sets `attn` and `attn,mlp`. Anything else runs on the burn engine
//! ([`NativeEngine::supports`] says why not). The numbers are the burn
//! engine's up to f32 rounding (tests/native.rs compares them; both are
//! checked against the float64 fixtures).

use rayon::prelude::*;

use crate::data::TokenSample;
use crate::error::{Error, Result};
use crate::grads::{SampleFactors, SampleGrads, SampleLoss, TensorFactors, TensorGrad};
use crate::model::{open_checked, ParamInfo, ParamSet};
use gradshard_core::model::{Activation, ModelConfig};
use gradshard_core::model::{DecoderConfig, HeadKind, MlpKind, NormKind, NormPlacement, Positions};
use gradshard_core::model::{QkNorm, QkvLayout};

// ---------------------------------------------------------------------------
// Matrix products
// ---------------------------------------------------------------------------

/// A matrix operand: a slice with its row and column strides (in elements).
#[derive(Clone, Copy)]
struct Op<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// Row-major operand with `cols` columns (row stride `cols`).
fn rm(data: &[f32], cols: usize) -> Op<'_> {
    Op {
        data,
        rs: cols,
        cs: 1,
    }
}

/// The transpose of a row-major matrix with `cols` columns.
fn tr(data: &[f32], cols: usize) -> Op<'_> {
    Op {
        data,
        rs: 1,
        cs: cols,
    }
}

/// Number of elements a rows × cols view with these strides spans.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Products at least this large (multiply-adds) use the rayon pool.
const PAR_MACS: usize = 1 << 18;

/// `dst = scale · L·R` (or `dst += scale · L·R` when `acc`) for L m × k and
/// R k × n; `dst` is row-major with row stride `dst_rs`. `par`: whether the
/// product may use the rayon pool (false inside an already parallel loop).
#[allow(clippy::too_many_arguments)]
fn mm(
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
unsafe fn mm_raw(
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
struct Shared(*mut f32, usize);
// SAFETY: a `Shared` is only read through `block`/`view`, whose callers
// guarantee that concurrent tasks touch disjoint elements; the buffer outlives
// the tasks (it is a local of the function that spawns them).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn new(v: &mut [f32]) -> Self {
        Shared(v.as_mut_ptr(), v.len())
    }

    /// Elements off..off + len as a slice.
    ///
    /// # Safety
    /// No other task may access these elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn block(&self, off: usize, len: usize) -> &mut [f32] {
        assert!(off + len <= self.1, "block outside the buffer");
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }

    /// A pointer to element `off` for an m × n view with row stride `rs`
    /// (asserted to lie inside the buffer), for [`mm_raw`].
    fn view(&self, off: usize, m: usize, n: usize, rs: usize) -> *mut f32 {
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
fn exp_f32(x: f32) -> f32 {
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
const LANES: usize = 16;

/// Runs `$body` (an expression over the function's arguments) through a copy of
/// the function compiled for AVX2 + FMA when the CPU has them, else the baseline
/// copy: the element-wise loops of the engine then run 8 (not 4) lanes wide.
/// Both copies compute the same values (Rust never fuses a·b + c on its own).
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) -> $r {
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
fn row_block(w: usize) -> usize {
    w * (16384 / w.max(1)).max(1)
}

/// RMSNorm of each row of x (n × d): y = x · r · w with r = (mean x² + ε)^-½;
/// returns y and r per row.
fn rms_norm(x: &[f32], d: usize, w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
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
fn rms_norm_back(dy: &[f32], x: &[f32], r: &[f32], w: &[f32], dx: &mut [f32]) {
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
struct RopeTab {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn rope_tab(freqs: &(Vec<f64>, f64), t: usize) -> RopeTab {
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
fn rope_rows(x: &mut [f32], heads: usize, d: usize, pos: &[usize], tab: &RopeTab, inverse: bool) {
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
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// A projection y = x·Wᵀ (+ b), W stored [out, in] as in the checkpoint.
struct Lin {
    /// Index in [`NativeEngine::params`].
    idx: usize,
    w: Vec<f32>,
    /// Wᵀ ([in, out]) for the forward product, kept for small models: gemm runs
    /// x·Wᵀ ~1.3× faster from a row-major Wᵀ than from W read transposed
    /// (measured 65–75 vs 77–99 GFLOP/s on one thread at 127 × 512 × 512 … 1376).
    wt: Option<Vec<f32>>,
    b: Option<Vec<f32>>,
    out: usize,
    inp: usize,
}

/// The transpose of a row-major rows × cols matrix.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
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
fn wt_op<'a>(w: &'a [f32], wt: Option<&'a [f32]>, out: usize, inp: usize) -> Op<'a> {
    match wt {
        Some(t) => rm(t, out),
        None => tr(w, inp),
    }
}

impl Lin {
    /// y (n × out) = x (n × in) · Wᵀ + b.
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
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
    fn backward(&self, dy: &[f32], n: usize, dx: &mut [f32], acc: bool) {
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

struct Layer {
    /// Effective scales of the two RMSNorms (w, or 1 + w for Gemma-style).
    n_attn: Vec<f32>,
    n_mlp: Vec<f32>,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    gate: Lin,
    up: Lin,
    down: Lin,
    /// Index into [`NativeEngine::ropes`].
    rope: Option<usize>,
    window: Option<usize>,
}

/// The loaded model on the host.
pub(crate) struct NativeEngine {
    config: ModelConfig,
    c: DecoderConfig,
    params: Vec<ParamInfo>,
    tracked: Vec<bool>,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    /// None: tied to the embeddings.
    lm_head: Option<Vec<f32>>,
    /// The LM head's transpose [D, V] for small models (see [`Lin::wt`]).
    lm_head_t: Option<Vec<f32>>,
    ropes: Vec<(Vec<f64>, f64)>,
    /// One single-threaded rayon pool per thread of the global pool, for
    /// running samples side by side ([`NativeEngine::spread`]).
    pools: Vec<rayon::ThreadPool>,
}

/// The packed rows of one chunk of samples.
struct Packed {
    /// T of each sample and its first row.
    lens: Vec<usize>,
    offs: Vec<usize>,
    /// N = Σ T.
    n: usize,
    ids: Vec<usize>,
    labels: Vec<usize>,
    /// Position of each row within its sample.
    pos: Vec<usize>,
    /// cos/sin of each of the model's RoPE tables for positions 0..max T,
    /// shared by the forward and the backward.
    tabs: Vec<RopeTab>,
}

/// What the backward needs from one layer's forward.
struct Saved {
    h: Vec<f32>,
    r1: Vec<f32>,
    xn1: Vec<f32>,
    /// Queries and keys after RoPE; values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities, per sample then head, T × T each.
    p: Vec<f32>,
    a: Vec<f32>,
    h1: Vec<f32>,
    r2: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    m: Vec<f32>,
}

/// Where the tracked weights' per-sample results go.
enum Out<'a> {
    Grads(&'a mut [Vec<Option<TensorGrad>>]),
    Factors(&'a mut [Vec<Option<TensorFactors>>]),
}

impl NativeEngine {
    /// Why `config` with tracked set `set` cannot run natively, or None when it can.
    pub(crate) fn unsupported(config: &ModelConfig, set: ParamSet) -> Option<String> {
        let c = match config {
            ModelConfig::Decoder(c) => c,
            ModelConfig::Gpt2(_) => return Some("gpt2 runs on the burn engine".into()),
        };
        let why = |what: &str| Some(format!("{}: {what}", c.arch.as_str()));
        if set == ParamSet::All2d {
            return why("embedding and LM-head gradients (all-2d) need the burn engine");
        }
        if !matches!(c.norm, NormKind::Rms | NormKind::RmsOffset) {
            return why("LayerNorm");
        }
        if c.placement != NormPlacement::Pre || c.parallel_residual {
            return why("norm placement or residual form other than LLaMA's");
        }
        if c.qk_norm != QkNorm::None {
            return why("q/k norms");
        }
        if c.qkv != QkvLayout::Split {
            return why("fused Q/K/V");
        }
        if c.mlp != MlpKind::Gated || c.act != Activation::Silu {
            return why("an MLP other than gated SiLU");
        }
        if !matches!(c.positions, Positions::Rotary { rotary_dim } if rotary_dim % 2 == 0 && rotary_dim <= c.head_dim)
        {
            return why("positions other than RoPE");
        }
        if c.attn_softcap.is_some() || c.final_softcap.is_some() {
            return why("soft-capping");
        }
        if c.embed_norm || c.head != HeadKind::Linear || c.lm_head_bias || c.nested {
            return why("embedding norm, head transform, LM-head bias or a nested checkpoint");
        }
        if c.num_kv_heads == 0 || c.num_heads % c.num_kv_heads != 0 {
            return why("H not a multiple of H_kv");
        }
        None
    }

    /// Loads `dir` on the host, tracking `set`. Fails with
    /// [`Error::InvalidArgument`] when the model is not one this engine runs.
    pub(crate) fn load(dir: &std::path::Path, set: ParamSet) -> Result<Self> {
        let opened = open_checked(dir)?;
        if let Some(why) = Self::unsupported(&opened.config, set) {
            return Err(Error::InvalidArgument(format!(
                "the native CPU engine does not run this model ({why})"
            )));
        }
        let c = match &opened.config {
            ModelConfig::Decoder(c) => c.clone(),
            ModelConfig::Gpt2(_) => unreachable!("checked by unsupported"),
        };
        let spec = &opened.spec.entries;
        let find = |name: &str| -> Result<(usize, Vec<f32>)> {
            let i = spec
                .iter()
                .position(|e| e.name == name)
                .ok_or_else(|| Error::InvalidArgument(format!("internal: {name} not in spec")))?;
            Ok((i, opened.ckpt.read_f32(&spec[i].stored)?))
        };
        let r = gradshard_core::model::roles(c.arch);
        let small = Self::small(&c);
        let nm = |t: &str, i: usize| format!("{}.weight", crate::decoder::name(t, i, "model."));
        let scale = |w: Vec<f32>| -> Vec<f32> {
            if c.norm == NormKind::RmsOffset {
                w.into_iter().map(|w| w + 1.0).collect()
            } else {
                w
            }
        };
        let lin = |t: &str, i: usize, bias: bool| -> Result<Lin> {
            let (idx, w) = find(&nm(t, i))?;
            let shape = &spec[idx].shape;
            let b = if bias {
                let name = format!("{}.bias", crate::decoder::name(t, i, "model."));
                Some(find(&name)?.1)
            } else {
                None
            };
            let (out, inp) = (shape[0], shape[1]);
            Ok(Lin {
                idx,
                wt: small.then(|| transpose(&w, out, inp)),
                w,
                b,
                out,
                inp,
            })
        };
        let (ropes, layer_rope) = crate::decoder::rope_tables(&c);
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, &rope) in layer_rope.iter().enumerate() {
            let kind = &c.layer_kinds[i];
            let norm = |slot: usize| -> Result<Vec<f32>> {
                Ok(scale(
                    find(&nm(r.norms[slot].expect("pre-norm role"), i))?.1,
                ))
            };
            layers.push(Layer {
                n_attn: norm(0)?,
                n_mlp: norm(2)?,
                q: lin(r.qkv[0], i, c.qkv_bias)?,
                k: lin(r.qkv[1], i, c.qkv_bias)?,
                v: lin(r.qkv[2], i, c.qkv_bias)?,
                o: lin(r.o, i, c.o_bias)?,
                gate: lin(r.mlp_in, i, c.mlp_bias)?,
                up: lin(r.mlp_up.expect("gated MLP role"), i, c.mlp_bias)?,
                down: lin(r.mlp_down, i, c.mlp_bias)?,
                rope,
                window: kind.sliding_window,
            });
        }
        let embed = find(&nm(r.embed, 0))?.1;
        let final_norm = scale(find(&nm(r.final_norm.expect("final norm role"), 0))?.1);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(find(&format!("{}.weight", r.lm_head))?.1)
        };
        let lm_head_t = small.then(|| {
            transpose(
                lm_head.as_deref().unwrap_or(&embed),
                c.vocab_size,
                c.hidden_size,
            )
        });
        let params: Vec<ParamInfo> = spec
            .iter()
            .map(|e| ParamInfo {
                name: e.name.clone(),
                shape: e.shape.clone(),
                kind: e.kind,
            })
            .collect();
        let tracked: Vec<bool> = params
            .iter()
            .map(|p| p.shape.len() == 2 && set.contains(p.kind))
            .collect();
        // Every tracked weight must be one of the projections this engine taps.
        let tapped: Vec<usize> = layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .map(|l| l.idx)
            .collect();
        if let Some(p) = params
            .iter()
            .enumerate()
            .find(|(i, _)| tracked[*i] && !tapped.contains(i))
        {
            return Err(Error::InvalidArgument(format!(
                "the native CPU engine cannot track {}",
                p.1.name
            )));
        }
        let pools = (0..rayon::current_num_threads())
            .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Backend {
                context: "native CPU engine".into(),
                msg: format!("starting worker threads: {e}"),
            })?;
        Ok(NativeEngine {
            pools,
            config: opened.config.clone(),
            c,
            params,
            tracked,
            embed,
            layers,
            final_norm,
            lm_head,
            lm_head_t,
            ropes,
        })
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub(crate) fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    pub(crate) fn tracked_params(&self) -> Vec<ParamInfo> {
        self.params
            .iter()
            .zip(&self.tracked)
            .filter(|(_, &t)| t)
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn pack(&self, samples: &[TokenSample]) -> Result<Packed> {
        crate::grads::check_samples(samples, self.c.vocab_size)?;
        let mut p = Packed {
            lens: vec![],
            offs: vec![],
            n: 0,
            ids: vec![],
            labels: vec![],
            pos: vec![],
            tabs: vec![],
        };
        let mut t_max = 0;
        for s in samples {
            let t = s.ids.len() - 1;
            p.offs.push(p.n);
            p.lens.push(t);
            p.n += t;
            t_max = t_max.max(t);
            for i in 0..t {
                p.ids.push(s.ids[i] as usize);
                p.labels.push(s.ids[i + 1] as usize);
                p.pos.push(i);
            }
        }
        p.tabs = self.ropes.iter().map(|f| rope_tab(f, t_max)).collect();
        Ok(p)
    }

    /// Forward through the layers; returns the last residual stream and, when
    /// `save`, what the backward needs per layer.
    fn forward(&self, pk: &Packed, save: bool) -> (Vec<f32>, Vec<Saved>) {
        let c = &self.c;
        let (d_model, n) = (c.hidden_size, pk.n);
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let mut h = vec![0f32; n * d_model];
        let es = c.embed_scale.map(|s| s as f32);
        h.par_chunks_mut(d_model)
            .zip(pk.ids.par_iter())
            .for_each(|(row, &id)| {
                row.copy_from_slice(&self.embed[id * d_model..(id + 1) * d_model]);
                if let Some(s) = es {
                    row.iter_mut().for_each(|v| *v *= s);
                }
            });
        let mut saved = Vec::with_capacity(if save { self.layers.len() } else { 0 });
        for l in &self.layers {
            let (xn1, r1) = rms_norm(&h, d_model, &l.n_attn, c.norm_eps);
            let mut q = l.q.forward(&xn1, n);
            let mut k = l.k.forward(&xn1, n);
            let v = l.v.forward(&xn1, n);
            if let Some(ri) = l.rope {
                rope_rows(&mut q, hq, d, &pk.pos, &pk.tabs[ri], false);
                rope_rows(&mut k, hkv, d, &pk.pos, &pk.tabs[ri], false);
            }
            let (a, p) = self.attention(pk, &q, &k, &v, l.window);
            let attn = l.o.forward(&a, n);
            let mut h1 = h.clone();
            h1.par_iter_mut().zip(&attn).for_each(|(x, y)| *x += y);
            drop(attn);
            let (xn2, r2) = rms_norm(&h1, d_model, &l.n_mlp, c.norm_eps);
            let gate = l.gate.forward(&xn2, n);
            let up = l.up.forward(&xn2, n);
            let mut m = vec![0f32; gate.len()];
            let blk = row_block(c.intermediate_size);
            m.par_chunks_mut(blk)
                .zip(gate.par_chunks(blk).zip(up.par_chunks(blk)))
                .for_each(|(m, (g, u))| silu_mul(g, u, m));
            let out = l.down.forward(&m, n);
            let mut h2 = h1.clone();
            h2.par_iter_mut().zip(&out).for_each(|(x, y)| *x += y);
            if save {
                saved.push(Saved {
                    h,
                    r1,
                    xn1,
                    q,
                    k,
                    v,
                    p,
                    a,
                    h1,
                    r2,
                    xn2,
                    gate,
                    up,
                    m,
                });
            }
            h = h2;
        }
        (h, saved)
    }

    /// Offsets of each sample's probability block (H · T² values each).
    fn p_offsets(&self, pk: &Packed) -> (Vec<usize>, usize) {
        let hq = self.c.num_heads;
        let mut offs = Vec::with_capacity(pk.lens.len());
        let mut total = 0;
        for &t in &pk.lens {
            offs.push(total);
            total += hq * t * t;
        }
        (offs, total)
    }

    /// Causal (optionally windowed) softmax attention of every sample:
    /// returns a (n × H·d) and the probabilities.
    fn attention(
        &self,
        pk: &Packed,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        window: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let c = &self.c;
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw) = (hq * d, hkv * d);
        let group = hq / hkv;
        let scale = c.attn_scale as f32;
        let (p_offs, p_total) = self.p_offsets(pk);
        let mut a = vec![0f32; pk.n * qw];
        let mut p = vec![0f32; p_total];
        let (a_sh, p_sh) = (Shared::new(&mut a), Shared::new(&mut p));
        let tasks: Vec<(usize, usize)> = (0..pk.lens.len())
            .flat_map(|s| (0..hq).map(move |h| (s, h)))
            .collect();
        tasks.par_iter().for_each(|&(s, h)| {
            let (t, off) = (pk.lens[s], pk.offs[s]);
            let g = h / group;
            let qh = &q[off * qw + h * d..];
            let kg = &k[off * kw + g * d..];
            let vg = &v[off * kw + g * d..];
            // SAFETY: task (s, h) is the only one to touch sample s's probability
            // block of head h.
            let pb = unsafe { p_sh.block(p_offs[s] + h * t * t, t * t) };
            // scores = scale · q_h k_gᵀ
            mm(
                t,
                t,
                d,
                pb,
                t,
                false,
                Op {
                    data: qh,
                    rs: qw,
                    cs: 1,
                },
                Op {
                    data: kg,
                    rs: 1,
                    cs: kw,
                },
                scale,
                false,
            );
            for i in 0..t {
                let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                let row = &mut pb[i * t..(i + 1) * t];
                let vis = &mut row[lo..=i];
                let (_, sum) = exp_shifted(vis);
                scale_row(vis, 1.0 / sum);
                row[..lo].fill(0.0);
                row[i + 1..].fill(0.0);
            }
            let dst = a_sh.view(off * qw + h * d, t, d, qw);
            // SAFETY: task (s, h) alone writes columns h·d..(h+1)·d of sample s's
            // rows of `a` (the view above).
            unsafe {
                mm_raw(
                    t,
                    d,
                    t,
                    dst,
                    qw,
                    false,
                    rm(pb, t),
                    Op {
                        data: vg,
                        rs: kw,
                        cs: 1,
                    },
                    1.0,
                    false,
                )
            };
        });
        (a, p)
    }

    /// Backward of [`NativeEngine::attention`]: from da (n × H·d) to dq, dk, dv.
    fn attention_back(&self, pk: &Packed, s: &Saved, da: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = &self.c;
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw) = (hq * d, hkv * d);
        let group = hq / hkv;
        let scale = c.attn_scale as f32;
        let (p_offs, _) = self.p_offsets(pk);
        let mut dq = vec![0f32; pk.n * qw];
        let mut dk = vec![0f32; pk.n * kw];
        let mut dv = vec![0f32; pk.n * kw];
        let (dq_sh, dk_sh, dv_sh) = (
            Shared::new(&mut dq),
            Shared::new(&mut dk),
            Shared::new(&mut dv),
        );
        let tasks: Vec<(usize, usize)> = (0..pk.lens.len())
            .flat_map(|s| (0..hkv).map(move |g| (s, g)))
            .collect();
        tasks.par_iter().for_each(|&(si, g)| {
            let (t, off) = (pk.lens[si], pk.offs[si]);
            let mut ds = vec![0f32; t * t];
            let kg = &s.k[off * kw + g * d..];
            let vg = &s.v[off * kw + g * d..];
            // Task (s, g) alone writes sample s's rows, and within them the
            // columns of kv head g in dk and dv and of its query heads
            // g·group..(g+1)·group in dq: every view below is disjoint from
            // every other task's.
            let dk_g = dk_sh.view(off * kw + g * d, t, d, kw);
            let dv_g = dv_sh.view(off * kw + g * d, t, d, kw);
            for h in g * group..(g + 1) * group {
                let pb = &s.p[p_offs[si] + h * t * t..p_offs[si] + (h + 1) * t * t];
                let dah = Op {
                    data: &da[off * qw + h * d..],
                    rs: qw,
                    cs: 1,
                };
                // dP = da_h v_gᵀ
                mm(
                    t,
                    t,
                    d,
                    &mut ds,
                    t,
                    false,
                    dah,
                    Op {
                        data: vg,
                        rs: 1,
                        cs: kw,
                    },
                    1.0,
                    false,
                );
                // SAFETY: dv_g is this task's own view (see above).
                // dv_g += P_hᵀ da_h
                unsafe { mm_raw(t, d, t, dv_g, kw, true, tr(pb, t), dah, 1.0, false) };
                // dS = P ⊙ (dP − rowsum(P ⊙ dP))
                for i in 0..t {
                    let pr = &pb[i * t..(i + 1) * t];
                    let dr = &mut ds[i * t..(i + 1) * t];
                    let dot: f32 = pr[..=i].iter().zip(&dr[..=i]).map(|(p, g)| p * g).sum();
                    for (g, p) in dr.iter_mut().zip(pr) {
                        *g = p * (*g - dot);
                    }
                }
                let kop = Op {
                    data: kg,
                    rs: kw,
                    cs: 1,
                };
                let qop = Op {
                    data: &s.q[off * qw + h * d..],
                    rs: qw,
                    cs: 1,
                };
                let dq_h = dq_sh.view(off * qw + h * d, t, d, qw);
                // SAFETY: dq_h, dk_g are this task's own views (see above).
                // dq_h = scale · dS k_g ; dk_g += scale · dSᵀ q_h
                unsafe {
                    mm_raw(t, d, t, dq_h, qw, false, rm(&ds, t), kop, scale, false);
                    mm_raw(t, d, t, dk_g, kw, true, tr(&ds, t), qop, scale, false);
                }
            }
        });
        (dq, dk, dv)
    }

    /// Final norm, LM head and token-summed cross-entropy on blocks of rows.
    /// Returns the per-sample loss sums and, when `grad`, d loss / d h (n × D).
    fn head(&self, pk: &Packed, h: &[f32], grad: bool) -> (Vec<f64>, Option<Vec<f32>>) {
        let c = &self.c;
        let (dm, vocab, n) = (c.hidden_size, c.vocab_size, pk.n);
        let w = self.lm_head.as_deref().unwrap_or(&self.embed);
        let (hf, rf) = rms_norm(h, dm, &self.final_norm, c.norm_eps);
        let mut dhf = if grad { vec![0f32; n * dm] } else { vec![] };
        let mut row_loss = vec![0f64; n];
        let block = (((1usize << 22) / vocab.max(1)).max(1)).min(n);
        let mut z = vec![0f32; block * vocab];
        let mut r0 = 0;
        while r0 < n {
            let rows = block.min(n - r0);
            let z = &mut z[..rows * vocab];
            mm(
                rows,
                vocab,
                dm,
                z,
                vocab,
                false,
                rm(&hf[r0 * dm..], dm),
                wt_op(w, self.lm_head_t.as_deref(), vocab, dm),
                1.0,
                true,
            );
            z.par_chunks_mut(vocab)
                .zip(row_loss[r0..r0 + rows].par_iter_mut())
                .zip(pk.labels[r0..r0 + rows].par_iter())
                .for_each(|((zr, loss), &label)| {
                    let picked = zr[label];
                    let (max, sum) = exp_shifted(zr);
                    let lse = sum.ln() + max;
                    *loss = (lse - picked) as f64;
                    if grad {
                        // d/dz (lse − z_label) = softmax − onehot
                        scale_row(zr, 1.0 / sum);
                        zr[label] -= 1.0;
                    }
                });
            if grad {
                mm(
                    rows,
                    dm,
                    vocab,
                    &mut dhf[r0 * dm..],
                    dm,
                    false,
                    rm(z, vocab),
                    rm(w, dm),
                    1.0,
                    true,
                );
            }
            r0 += rows;
        }
        let losses = pk
            .offs
            .iter()
            .zip(&pk.lens)
            .map(|(&o, &t)| row_loss[o..o + t].iter().sum())
            .collect();
        if !grad {
            return (losses, None);
        }
        let mut dh = vec![0f32; n * dm];
        rms_norm_back(&dhf, h, &rf, &self.final_norm, &mut dh);
        (losses, Some(dh))
    }

    /// Hands the gradient (or factors) of one tracked projection to `out`,
    /// per sample: δ (n × out) and x (n × in) of all packed rows.
    fn emit(&self, pk: &Packed, lin: &Lin, delta: &[f32], x: &[f32], out: &mut Out<'_>) {
        if !self.tracked[lin.idx] {
            return;
        }
        let slot = self.tracked[..lin.idx].iter().filter(|&&t| t).count();
        let p = &self.params[lin.idx];
        for (si, (&off, &t)) in pk.offs.iter().zip(&pk.lens).enumerate() {
            let dr = &delta[off * lin.out..(off + t) * lin.out];
            let xr = &x[off * lin.inp..(off + t) * lin.inp];
            match out {
                Out::Grads(g) => {
                    let mut data = vec![0f32; lin.out * lin.inp];
                    // G = δᵀ x
                    mm(
                        lin.out,
                        lin.inp,
                        t,
                        &mut data,
                        lin.inp,
                        false,
                        tr(dr, lin.out),
                        rm(xr, lin.inp),
                        1.0,
                        true,
                    );
                    g[si][slot] = Some(TensorGrad {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        data,
                    });
                }
                Out::Factors(f) => {
                    f[si][slot] = Some(TensorFactors {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        n: t,
                        a: dr.to_vec(),
                        b: xr.to_vec(),
                    });
                }
            }
        }
    }

    /// Forward, loss and backward of one chunk; tracked results go to `out`.
    fn run(&self, pk: &Packed, out: &mut Out<'_>) -> Vec<f64> {
        let c = &self.c;
        let (dm, n) = (c.hidden_size, pk.n);
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (h, saved) = self.forward(pk, true);
        let (losses, dh) = self.head(pk, &h, true);
        let mut dh = dh.expect("head returns the gradient when asked");
        for (li, (l, s)) in self.layers.iter().zip(&saved).enumerate().rev() {
            // MLP: h2 = h1 + down(silu(gate(xn2)) · up(xn2)); dh is d/dh2.
            self.emit(pk, &l.down, &dh, &s.m, out);
            let mut dm_ = vec![0f32; n * c.intermediate_size];
            l.down.backward(&dh, n, &mut dm_, false);
            let mut dgate = vec![0f32; dm_.len()];
            let mut dup = vec![0f32; dm_.len()];
            let blk = row_block(c.intermediate_size);
            dgate
                .par_chunks_mut(blk)
                .zip(dup.par_chunks_mut(blk))
                .zip(dm_.par_chunks(blk))
                .zip(s.gate.par_chunks(blk).zip(s.up.par_chunks(blk)))
                .for_each(|(((dg, du), dm), (g, u))| silu_mul_back(dm, g, u, dg, du));
            drop(dm_);
            self.emit(pk, &l.gate, &dgate, &s.xn2, out);
            self.emit(pk, &l.up, &dup, &s.xn2, out);
            let mut dxn2 = vec![0f32; n * dm];
            l.gate.backward(&dgate, n, &mut dxn2, false);
            l.up.backward(&dup, n, &mut dxn2, true);
            // dh1 = dh + norm backward
            let mut dh1 = dh;
            rms_norm_back(&dxn2, &s.h1, &s.r2, &l.n_mlp, &mut dh1);
            drop(dxn2);
            // Attention: h1 = h + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
            self.emit(pk, &l.o, &dh1, &s.a, out);
            let mut da = vec![0f32; n * hq * d];
            l.o.backward(&dh1, n, &mut da, false);
            let (mut dq, mut dk, dv) = self.attention_back(pk, s, &da);
            drop(da);
            if let Some(ri) = l.rope {
                rope_rows(&mut dq, hq, d, &pk.pos, &pk.tabs[ri], true);
                rope_rows(&mut dk, hkv, d, &pk.pos, &pk.tabs[ri], true);
            }
            self.emit(pk, &l.q, &dq, &s.xn1, out);
            self.emit(pk, &l.k, &dk, &s.xn1, out);
            self.emit(pk, &l.v, &dv, &s.xn1, out);
            if li == 0 {
                // Nothing below the first layer is tracked.
                break;
            }
            let mut dxn1 = vec![0f32; n * dm];
            l.q.backward(&dq, n, &mut dxn1, false);
            l.k.backward(&dk, n, &mut dxn1, true);
            l.v.backward(&dv, n, &mut dxn1, true);
            let mut dh0 = dh1;
            rms_norm_back(&dxn1, &s.h, &s.r1, &l.n_attn, &mut dh0);
            dh = dh0;
        }
        losses
    }

    /// Loss sums without gradients.
    pub(crate) fn loss(&self, samples: &[TokenSample]) -> Result<Vec<SampleLoss>> {
        let pk = self.pack(samples)?;
        let (h, _) = self.forward(&pk, false);
        let (losses, _) = self.head(&pk, &h, false);
        Ok(pk
            .lens
            .iter()
            .zip(losses)
            .map(|(&t, l)| SampleLoss {
                tokens: t,
                loss_sum: l,
            })
            .collect())
    }

    fn n_tracked(&self) -> usize {
        self.tracked.iter().filter(|&&t| t).count()
    }

    /// How many samples the caller should hand over at once when it wants one
    /// forward and backward per sample: one per thread for small models
    /// (see [`NativeEngine::spreads`]), else 1.
    pub(crate) fn in_flight(&self) -> usize {
        if self.spreads() {
            self.pools.len()
        } else {
            1
        }
    }

    /// Whether several samples run side by side, one thread each, instead of
    /// one after another with every product split over the threads. At small
    /// widths gemm gains little from a second thread on one product (measured:
    /// 127 × 512 × 512 runs at 60–90 GFLOP/s on one thread and no faster on
    /// two), while two independent single-threaded products run at full speed
    /// each; wide models (D·F > 4 M) keep the split products.
    fn spreads(&self) -> bool {
        self.pools.len() > 1 && Self::small(&self.c)
    }

    /// Models with D·F ≤ 4 M: samples side by side, transposed weight copies.
    fn small(c: &DecoderConfig) -> bool {
        c.hidden_size * c.intermediate_size <= 1 << 22
    }

    /// Runs `f` on groups of `samples` and concatenates the results in order.
    /// `each`: every sample is its own group (one forward and backward per
    /// sample); otherwise the samples are packed into one group per thread
    /// (balanced by tokens). Groups run side by side on the engine's
    /// single-threaded pools when [`NativeEngine::spreads`], else in turn.
    fn spread<T: Send>(
        &self,
        samples: &[TokenSample],
        each: bool,
        f: impl Fn(&[TokenSample]) -> Result<Vec<T>> + Sync,
    ) -> Result<Vec<T>> {
        let parallel = self.spreads() && samples.len() > 1;
        let p = self.pools.len();
        let groups: Vec<std::ops::Range<usize>> = if each {
            (0..samples.len()).map(|i| i..i + 1).collect()
        } else if parallel {
            let total: usize = samples.iter().map(TokenSample::predicted).sum();
            let mut groups = vec![];
            let (mut start, mut acc) = (0, 0);
            for (i, s) in samples.iter().enumerate() {
                acc += s.predicted();
                let left = samples.len() - i - 1;
                if acc * p >= total * (groups.len() + 1) && groups.len() + 1 < p && left > 0 {
                    groups.push(start..i + 1);
                    start = i + 1;
                }
            }
            groups.push(start..samples.len());
            groups
        } else {
            std::iter::once(0..samples.len()).collect()
        };
        let mut results: Vec<Option<Result<Vec<T>>>> = (0..groups.len()).map(|_| None).collect();
        if parallel {
            let slots: Vec<std::sync::Mutex<Option<Result<Vec<T>>>>> = (0..groups.len())
                .map(|_| std::sync::Mutex::new(None))
                .collect();
            std::thread::scope(|scope| {
                for (pi, pool) in self.pools.iter().enumerate() {
                    let (groups, slots, f) = (&groups, &slots, &f);
                    scope.spawn(move || {
                        pool.install(|| {
                            for gi in (pi..groups.len()).step_by(p) {
                                let r = f(&samples[groups[gi].clone()]);
                                *slots[gi].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                            }
                        })
                    });
                }
            });
            for (r, slot) in results.iter_mut().zip(slots) {
                *r = slot.into_inner().unwrap_or_else(|e| e.into_inner());
            }
        } else {
            for (r, g) in results.iter_mut().zip(&groups) {
                *r = Some(f(&samples[g.clone()]));
            }
        }
        let mut out = Vec::with_capacity(samples.len());
        for r in results {
            out.extend(r.expect("every group ran")?);
        }
        Ok(out)
    }

    /// Per-sample gradients of the tracked weights. Each sample's numbers do
    /// not depend on the others in the call; `each` runs one forward and
    /// backward per sample, otherwise samples are packed.
    pub(crate) fn grads(&self, samples: &[TokenSample], each: bool) -> Result<Vec<SampleGrads>> {
        self.spread(samples, each, |group| self.grads_packed(group))
    }

    /// Per-sample factors of the tracked weights (see [`TensorFactors`]).
    pub(crate) fn factors(
        &self,
        samples: &[TokenSample],
        each: bool,
    ) -> Result<Vec<SampleFactors>> {
        self.spread(samples, each, |group| self.factors_packed(group))
    }

    fn grads_packed(&self, samples: &[TokenSample]) -> Result<Vec<SampleGrads>> {
        let pk = self.pack(samples)?;
        let mut slots = self.empty_slots(samples.len());
        let losses = self.run(&pk, &mut Out::Grads(&mut slots));
        per_sample(
            samples,
            losses,
            slots,
            "gradient",
            |id, tokens, loss_sum, grads| SampleGrads {
                id,
                tokens,
                loss_sum,
                grads,
            },
        )
    }

    fn factors_packed(&self, samples: &[TokenSample]) -> Result<Vec<SampleFactors>> {
        let pk = self.pack(samples)?;
        let mut slots = self.empty_slots(samples.len());
        let losses = self.run(&pk, &mut Out::Factors(&mut slots));
        per_sample(
            samples,
            losses,
            slots,
            "factor",
            |id, tokens, loss_sum, factors| SampleFactors {
                id,
                tokens,
                loss_sum,
                factors,
            },
        )
    }

    /// One empty result slot per tracked weight, per sample.
    fn empty_slots<T: Clone>(&self, samples: usize) -> Vec<Vec<Option<T>>> {
        vec![vec![None; self.n_tracked()]; samples]
    }
}

/// Each sample's result from its loss and its filled slots (in checkpoint
/// order); a slot left empty is an error naming `what` was missing.
fn per_sample<T, R>(
    samples: &[TokenSample],
    losses: Vec<f64>,
    slots: Vec<Vec<Option<T>>>,
    what: &str,
    make: impl Fn(crate::data::SampleId, usize, f64, Vec<T>) -> R,
) -> Result<Vec<R>> {
    samples
        .iter()
        .zip(losses)
        .zip(slots)
        .map(|((s, l), slots)| {
            let got = slots
                .into_iter()
                .map(|v| v.ok_or_else(|| missing(what)))
                .collect::<Result<_>>()?;
            Ok(make(s.id.clone(), s.predicted(), l, got))
        })
        .collect()
}

fn missing(what: &str) -> Error {
    Error::Backend {
        context: "native CPU engine".into(),
        msg: format!("a tracked weight got no {what}"),
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
