//! The CPU backend's fused slice path: one pass over a slice's tiles, a column group
//! at a time: both column Fishers of the group (a row at a time), then per 128-column
//! block the denominator, X, Y and `M += X·Yᵀ` while the block's values are in L1/L2.
//! bf16 byte-plane tiles are widened to f32 a 256 KiB panel at a time first.
//!
//! The per-step path ([`Backend::column_fisher`], then [`Backend::interference`])
//! reads every tile twice from memory (a slice's two tiles are 4 MiB at 2 × 16 samples
//! of D 512 × d 64, more than L2), forms X and Y in 512-column blocks and multiplies
//! them with `gemm`, whose packing dominates at these 16 × 16 outputs. Here every
//! value is the same f64 as on the per-step path (the same Fisher sums in the same
//! row order, the same X and Y values); only the order in which M's products are
//! added differs (≈ 1e-16 relative). The column groups are a function of the shape
//! only, so results do not depend on the thread count.
//!
//! [`Backend::column_fisher`]: crate::Backend::column_fisher
//! [`Backend::interference`]: crate::Backend::interference

use rayon::prelude::*;

use crate::error::Result;
use crate::options::FisherPool;
use crate::tile::{
    fill_x, fill_y, fisher_columns, FusedOut, FusedSlice, Tile, MAX_GROUPS, PARTIALS_BYTES,
};

/// Columns per block: X and Y of 16 + 16 scored rows are 2 × 16 KiB of f64 (L1/L2).
const KB: usize = 128;

/// Columns of a byte-plane tile widened to f32 at a time: 32 rows of both tasks are
/// 256 KiB of f32, which stays in L2 for the Fisher and the blocks that read it.
const PANEL: usize = 16 * KB;

/// What one column group produces: its columns of both Fishers and its part of M.
struct Part {
    fa: Vec<f64>,
    fb: Vec<f64>,
    m: Vec<f64>,
}

pub(crate) fn fused_slice(g: &FusedSlice<'_>) -> Result<FusedOut> {
    g.check("cpu")?;
    let w = g.width;
    let (na, nb) = (g.a_sel.len(), g.b_sel.len());
    let blocks = w.div_ceil(KB).max(1);
    let groups = blocks
        .min(MAX_GROUPS)
        .min((PARTIALS_BYTES / (na * nb * 8).max(1)).max(1));
    let parts: Vec<Part> = (0..groups)
        .into_par_iter()
        .map(|gi| {
            // The worker thread's scratch, kept between calls: a fresh 2 × 256 KiB of
            // widened panels per call went to mmap and back, a page fault per 4 KiB.
            // Nothing in a group calls into rayon, so the borrow is never re-entered.
            SCRATCH.with(|cell| match cell.try_borrow_mut() {
                Ok(mut scratch) => run_group(g, gi, groups, blocks, &mut scratch),
                Err(_) => run_group(g, gi, groups, blocks, &mut Scratch::default()),
            })
        })
        .collect();
    let mut fa = Vec::with_capacity(w);
    let mut fb = Vec::with_capacity(w);
    let mut m = vec![0f64; na * nb];
    for p in parts {
        fa.extend_from_slice(&p.fa);
        fb.extend_from_slice(&p.fb);
        for (o, v) in m.iter_mut().zip(&p.m) {
            *o += v;
        }
    }
    let fisher_finite = fa.iter().chain(&fb).all(|v| v.is_finite());
    Ok(FusedOut {
        m,
        fisher_finite,
        fa: Box::new(move || Ok(fa)),
        fb: Box::new(move || Ok(fb)),
    })
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Column group `gi` of `groups` (whole [`KB`] blocks of `blocks`) of the slice.
fn run_group(
    g: &FusedSlice<'_>,
    gi: usize,
    groups: usize,
    blocks: usize,
    scratch: &mut Scratch,
) -> Part {
    let w = g.width;
    let (na, nb) = (g.a_sel.len(), g.b_sel.len());
    let c0 = (gi * blocks / groups * KB).min(w);
    let c1 = ((gi + 1) * blocks / groups * KB).min(w);
    let mut part = Part {
        fa: vec![0.0; c1 - c0],
        fb: vec![0.0; c1 - c0],
        m: vec![0.0; na * nb],
    };
    match (g.a, g.b) {
        (Tile::F32(a), Tile::F32(b)) => group(
            g,
            Cols { a, b, w, c0 },
            c1 - c0,
            &mut scratch.blocks,
            &mut part,
            0,
        ),
        (a, b) => {
            // Panels of the group's columns widened to f32 (exact), then the
            // same arithmetic on them as on an f32 tile.
            let (ra, rb) = (g.a_inv_t.len(), g.b_inv_t.len());
            let mut p0 = c0;
            while p0 < c1 {
                let pw = PANEL.min(c1 - p0);
                widen_panel(a, ra, w, p0, pw, &mut scratch.wa);
                widen_panel(b, rb, w, p0, pw, &mut scratch.wb);
                let cols = Cols {
                    a: &scratch.wa,
                    b: &scratch.wb,
                    w: pw,
                    c0: 0,
                };
                group(g, cols, pw, &mut scratch.blocks, &mut part, p0 - c0);
                p0 += pw;
            }
        }
    }
    part
}

/// `out[k] = 1 / den_k` with `den_k = pool.den(fa[k], fb[k], eps, lam)`, one loop per
/// pool: with the pool matched inside the loop it compiled to one scalar division per
/// column (`vdivsd`), this way to four at a time (`vdivpd`).
#[inline(always)]
fn reciprocal_dens(pool: FisherPool, fa: &[f64], fb: &[f64], eps: f64, lam: f64, out: &mut [f64]) {
    #[inline(always)]
    fn each(fa: &[f64], fb: &[f64], out: &mut [f64], den: impl Fn(f64, f64) -> f64) {
        for ((o, &a), &b) in out.iter_mut().zip(fa).zip(fb) {
            *o = 1.0 / den(a, b);
        }
    }
    match pool {
        FisherPool::A => each(fa, fb, out, |a, b| FisherPool::A.den(a, b, eps, lam)),
        FisherPool::B => each(fa, fb, out, |a, b| FisherPool::B.den(a, b, eps, lam)),
        FisherPool::Pooled => each(fa, fb, out, |a, b| FisherPool::Pooled.den(a, b, eps, lam)),
    }
}

/// Columns `p0..p0 + pw` of every row of a tile as f32, row-major `rows × pw`, in `out`.
fn widen_panel(t: Tile<'_>, rows: usize, w: usize, p0: usize, pw: usize, out: &mut Vec<f32>) {
    out.resize(rows * pw, 0.0);
    for (r, o) in out.chunks_exact_mut(pw).enumerate() {
        t.row_cols_f32(r, w, p0, o);
    }
}

/// The f32 rows a group reads: columns `c0..` of rows `w` values long.
#[derive(Clone, Copy)]
struct Cols<'a> {
    a: &'a [f32],
    b: &'a [f32],
    w: usize,
    c0: usize,
}

/// Per-thread scratch: the blocks of X, Y and 1/den, and widened panels of byte-plane
/// tiles.
#[derive(Default)]
struct Scratch {
    blocks: Blocks,
    wa: Vec<f32>,
    wb: Vec<f32>,
}

/// One [`KB`]-column block of X, Y and 1/den.
#[derive(Default)]
struct Blocks {
    xb: Vec<f64>,
    yb: Vec<f64>,
    rden: Vec<f64>,
}

/// `n` columns from `t.c0` of the slice into `part` from offset `o`, on the AVX2 + FMA
/// build of [`group_body`] where the CPU has it.
fn group(g: &FusedSlice<'_>, t: Cols<'_>, n: usize, sc: &mut Blocks, part: &mut Part, o: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { group_avx2(g, t, n, sc, part, o) };
        }
    }
    group_body::<false>(g, t, n, sc, part, o)
}

/// [`group_body`] compiled for AVX2 and FMA: the Fisher, X and Y loops vectorise four
/// f64 wide (the values stay the same: Rust never contracts `a * b + c` into an FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2(
    g: &FusedSlice<'_>,
    t: Cols<'_>,
    n: usize,
    sc: &mut Blocks,
    part: &mut Part,
    o: usize,
) {
    group_body::<true>(g, t, n, sc, part, o)
}

/// Columns `t.c0..t.c0 + n` of the slice, a block of [`KB`] columns at a time; their
/// Fishers go to `part.fa[o..o + n]` / `part.fb[..]` and their products into `part.m`.
#[inline(always)]
fn group_body<const AVX: bool>(
    g: &FusedSlice<'_>,
    t: Cols<'_>,
    n: usize,
    sc: &mut Blocks,
    part: &mut Part,
    o: usize,
) {
    let (na, nb) = (g.a_sel.len(), g.b_sel.len());
    let w = t.w;
    sc.xb.resize(na * KB, 0.0);
    sc.yb.resize(nb * KB, 0.0);
    sc.rden.resize(KB, 0.0);
    // Both Fishers of all n columns first, a row at a time: each row's columns are one
    // sequential run that the hardware prefetcher streams, where 128-column blocks
    // hopped between 32 rows far apart and stalled on memory. The rows then stay in
    // L2 for the blocks below. Same sums in the same row order as per block.
    fisher_columns(t.a, g.a_inv_t, w, t.c0, &mut part.fa[o..o + n]);
    fisher_columns(t.b, g.b_inv_t, w, t.c0, &mut part.fb[o..o + n]);
    let mut k = 0;
    while k < n {
        let kb = KB.min(n - k);
        let (k0, f) = (t.c0 + k, o + k);
        reciprocal_dens(
            g.pool,
            &part.fa[f..f + kb],
            &part.fb[f..f + kb],
            g.eps,
            g.lam,
            &mut sc.rden[..kb],
        );
        for ((&p, &it), d) in g
            .a_sel
            .iter()
            .zip(g.a_sel_inv_t)
            .zip(sc.xb.chunks_exact_mut(kb))
        {
            fill_x(
                g.variant,
                &t.a[p * w + k0..p * w + k0 + kb],
                it,
                &sc.rden[..kb],
                d,
            );
        }
        for ((&p, &it), d) in g
            .b_sel
            .iter()
            .zip(g.b_sel_inv_t)
            .zip(sc.yb.chunks_exact_mut(kb))
        {
            fill_y(g.variant, &t.b[p * w + k0..p * w + k0 + kb], it, d);
        }
        let (x, y) = (&sc.xb[..na * kb], &sc.yb[..nb * kb]);
        k += kb;
        #[cfg(target_arch = "x86_64")]
        if AVX {
            // SAFETY: only instantiated with AVX = true inside `group_avx2`, whose
            // caller checked AVX2 and FMA.
            unsafe { dots_avx2(x, y, na, nb, kb, &mut part.m) };
            continue;
        }
        dots_body::<false>(x, y, na, nb, kb, &mut part.m);
    }
}

/// `m[i·nb + j] += Σ_k x[i·kb + k] · y[j·kb + k]` for row-major `x` (`na × kb`) and
/// `y` (`nb × kb`): the 4 × 2 tiles of [`dots_body`] with the eight accumulators held in
/// AVX registers (the same four-lane partial sums, added up in the same order); edge
/// tiles go to [`dots_body`]'s scalar code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(x: &[f64], y: &[f64], na: usize, nb: usize, kb: usize, m: &mut [f64]) {
    use std::arch::x86_64::*;
    assert!(x.len() >= na * kb && y.len() >= nb * kb && m.len() >= na * nb);
    let k4 = kb / 4 * 4;
    let (na4, nb2) = (na / 4 * 4, nb / 2 * 2);
    for i0 in (0..na4).step_by(4) {
        for j0 in (0..nb2).step_by(2) {
            let mut acc = [_mm256_setzero_pd(); 8];
            // SAFETY: rows i0..i0+4 of x and j0..j0+2 of y exist (asserted above) and
            // every load reads 4 values at k < k4 ≤ kb inside its row.
            unsafe {
                let xp = x.as_ptr().add(i0 * kb);
                let yp = y.as_ptr().add(j0 * kb);
                let mut k = 0;
                while k < k4 {
                    let y0 = _mm256_loadu_pd(yp.add(k));
                    let y1 = _mm256_loadu_pd(yp.add(kb + k));
                    for t in 0..4 {
                        let xv = _mm256_loadu_pd(xp.add(t * kb + k));
                        acc[2 * t] = _mm256_fmadd_pd(xv, y0, acc[2 * t]);
                        acc[2 * t + 1] = _mm256_fmadd_pd(xv, y1, acc[2 * t + 1]);
                    }
                    k += 4;
                }
            }
            for t in 0..4 {
                for u in 0..2 {
                    let mut l = [0f64; 4];
                    // SAFETY: `l` holds 4 f64.
                    unsafe { _mm256_storeu_pd(l.as_mut_ptr(), acc[2 * t + u]) };
                    let mut s = (l[0] + l[1]) + (l[2] + l[3]);
                    let (xi, yj) = ((i0 + t) * kb, (j0 + u) * kb);
                    for k in k4..kb {
                        s = x[xi + k].mul_add(y[yj + k], s);
                    }
                    m[(i0 + t) * nb + j0 + u] += s;
                }
            }
        }
    }
    // The edges: rows past na4 against every j, and rows below na4 against j ≥ nb2.
    if na4 < na {
        dots_body::<true>(&x[na4 * kb..], y, na - na4, nb, kb, &mut m[na4 * nb..]);
    }
    if nb2 < nb {
        for i in 0..na4 {
            for j in nb2..nb {
                let mut s = 0f64;
                for k in 0..kb {
                    s = x[i * kb + k].mul_add(y[j * kb + k], s);
                }
                m[i * nb + j] += s;
            }
        }
    }
}

/// Four lanes of partial sums per (i, j) pair, a 4 × 2 tile of pairs at a time (eight
/// independent accumulators: the vector registers hold them and the loaded rows).
#[inline(always)]
fn dots_body<const FMA: bool>(
    x: &[f64],
    y: &[f64],
    na: usize,
    nb: usize,
    kb: usize,
    m: &mut [f64],
) {
    #[inline(always)]
    fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    const L: usize = 4;
    let k4 = kb / L * L;
    let mut i0 = 0;
    while i0 < na {
        let ti = (na - i0).min(4);
        let mut j0 = 0;
        while j0 < nb {
            let tj = (nb - j0).min(2);
            let mut acc = [[[0f64; L]; 2]; 4];
            if ti == 4 && tj == 2 {
                let xr: [&[f64]; 4] =
                    std::array::from_fn(|t| &x[(i0 + t) * kb..(i0 + t) * kb + k4]);
                let yr: [&[f64]; 2] =
                    std::array::from_fn(|t| &y[(j0 + t) * kb..(j0 + t) * kb + k4]);
                let mut k = 0;
                while k < k4 {
                    let yv: [[f64; L]; 2] =
                        std::array::from_fn(|t| yr[t][k..k + L].try_into().expect("4 lanes"));
                    for (ii, row) in xr.iter().enumerate() {
                        let xv: [f64; L] = row[k..k + L].try_into().expect("4 lanes");
                        for (jj, yv) in yv.iter().enumerate() {
                            for l in 0..L {
                                acc[ii][jj][l] = madd::<FMA>(xv[l], yv[l], acc[ii][jj][l]);
                            }
                        }
                    }
                    k += L;
                }
            } else {
                for ii in 0..ti {
                    for jj in 0..tj {
                        let xr = &x[(i0 + ii) * kb..(i0 + ii) * kb + k4];
                        let yr = &y[(j0 + jj) * kb..(j0 + jj) * kb + k4];
                        for (xc, yc) in xr.chunks_exact(L).zip(yr.chunks_exact(L)) {
                            for l in 0..L {
                                acc[ii][jj][l] = madd::<FMA>(xc[l], yc[l], acc[ii][jj][l]);
                            }
                        }
                    }
                }
            }
            for ii in 0..ti {
                for jj in 0..tj {
                    let a = &acc[ii][jj];
                    let mut s = (a[0] + a[1]) + (a[2] + a[3]);
                    let (xi, yj) = ((i0 + ii) * kb, (j0 + jj) * kb);
                    for k in k4..kb {
                        s = madd::<FMA>(x[xi + k], y[yj + k], s);
                    }
                    m[(i0 + ii) * nb + j0 + jj] += s;
                }
            }
            j0 += tj;
        }
        i0 += ti;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, CpuBackend};
    use crate::options::{FisherPool, Variant};

    fn tile(rows: usize, w: usize, seed: u64) -> Vec<f32> {
        let mut x = seed | 1;
        (0..rows * w)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2
            })
            .collect()
    }

    /// The fused path against the per-step path (column_fisher + interference) on
    /// shapes with partial blocks, partial 4 × 2 tiles and row selections.
    #[test]
    fn fused_equals_per_step_in_every_variant_and_pool() {
        let be = CpuBackend::default();
        for (ra, rb, w) in [
            (5usize, 3usize, 300usize),
            (16, 16, 1000),
            (1, 7, 129),
            (9, 2, 5),
        ] {
            let a = tile(ra, w, 3);
            let b = tile(rb, w, 5);
            let a_inv_t: Vec<f64> = (0..ra).map(|r| 1.0 / (10 + r) as f64).collect();
            let b_inv_t: Vec<f64> = (0..rb).map(|r| 1.0 / (7 + 2 * r) as f64).collect();
            let a_sel: Vec<usize> = (0..ra).filter(|r| r % 3 != 1).collect();
            let b_sel: Vec<usize> = (0..rb).collect();
            let a_sel_inv_t: Vec<f64> = a_sel.iter().map(|&r| a_inv_t[r]).collect();
            let b_sel_inv_t: Vec<f64> = b_sel.iter().map(|&r| b_inv_t[r]).collect();
            for variant in [Variant::Unsigned, Variant::Signed, Variant::Symmetric] {
                for pool in [FisherPool::A, FisherPool::B, FisherPool::Pooled] {
                    let (eps, lam) = (1e-9, 1e-7);
                    let out = fused_slice(&FusedSlice {
                        a: Tile::F32(&a),
                        a_inv_t: &a_inv_t,
                        a_sel: &a_sel,
                        a_sel_inv_t: &a_sel_inv_t,
                        b: Tile::F32(&b),
                        b_inv_t: &b_inv_t,
                        b_sel: &b_sel,
                        b_sel_inv_t: &b_sel_inv_t,
                        width: w,
                        variant,
                        pool,
                        eps,
                        lam,
                    })
                    .unwrap();
                    assert!(out.fisher_finite);
                    let mut fa = vec![0f64; w];
                    let mut fb = vec![0f64; w];
                    be.column_fisher(&a, &a_inv_t, w, &mut fa).unwrap();
                    be.column_fisher(&b, &b_inv_t, w, &mut fb).unwrap();
                    // The Fishers are the same sums in the same order: bit for bit.
                    assert_eq!((out.fa)().unwrap(), fa);
                    assert_eq!((out.fb)().unwrap(), fb);
                    let den: Vec<f64> = (0..w).map(|k| pool.den(fa[k], fb[k], eps, lam)).collect();
                    let pick = |t: &[f32], sel: &[usize]| -> Vec<f32> {
                        sel.iter()
                            .flat_map(|&r| t[r * w..(r + 1) * w].to_vec())
                            .collect()
                    };
                    let mut m = vec![0f64; a_sel.len() * b_sel.len()];
                    be.interference(
                        &pick(&a, &a_sel),
                        &a_sel_inv_t,
                        &pick(&b, &b_sel),
                        &b_sel_inv_t,
                        &den,
                        variant,
                        &mut m,
                    )
                    .unwrap();
                    // Same products, added in another order (the signed variant's
                    // sums cancel, so the bound is relative to the largest entry).
                    let scale = m.iter().fold(0f64, |s, v| s.max(v.abs()));
                    for (k, (x, y)) in out.m.iter().zip(&m).enumerate() {
                        assert!(
                            (x - y).abs() <= 1e-13 * scale,
                            "{variant:?} {pool:?} {ra}x{rb}x{w} pair {k}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    /// bf16 byte planes of a tile whose values are bf16 numbers.
    fn planes(t: &[f32], w: usize) -> Vec<u8> {
        let mut out = vec![0u8; 2 * t.len()];
        for (r, row) in t.chunks_exact(w).enumerate() {
            for (k, v) in row.iter().enumerate() {
                let bits = v.to_bits() >> 16;
                out[2 * r * w + k] = bits as u8;
                out[2 * r * w + w + k] = (bits >> 8) as u8;
            }
        }
        out
    }

    /// Byte-plane tiles (widened a panel at a time; several panels per column group at
    /// this width) give the f32 tiles' results bit for bit.
    #[test]
    fn byte_plane_tiles_equal_f32_tiles_bit_for_bit() {
        let (ra, rb, w) = (3usize, 4usize, 40_000usize);
        assert!(w / MAX_GROUPS > PANEL, "more than one panel per group");
        let bf = |t: Vec<f32>| -> Vec<f32> {
            t.into_iter()
                .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
                .collect()
        };
        let (a, b) = (bf(tile(ra, w, 13)), bf(tile(rb, w, 17)));
        let (pa, pb) = (planes(&a, w), planes(&b, w));
        let a_inv_t = [0.5, 0.25, 0.125];
        let b_inv_t = [1.0, 0.5, 0.2, 0.1];
        for variant in [Variant::Unsigned, Variant::Signed] {
            let run = |ta: Tile<'_>, tb: Tile<'_>| {
                fused_slice(&FusedSlice {
                    a: ta,
                    a_inv_t: &a_inv_t,
                    a_sel: &[0, 2],
                    a_sel_inv_t: &[0.5, 0.125],
                    b: tb,
                    b_inv_t: &b_inv_t,
                    b_sel: &[1, 2, 3],
                    b_sel_inv_t: &[0.5, 0.2, 0.1],
                    width: w,
                    variant,
                    pool: FisherPool::Pooled,
                    eps: 1e-12,
                    lam: 1e-9,
                })
                .unwrap()
            };
            let f = run(Tile::F32(&a), Tile::F32(&b));
            let p = run(Tile::Bf16Planes(&pa), Tile::Bf16Planes(&pb));
            assert_eq!(f.m, p.m, "{variant:?}");
            assert_eq!((f.fa)().unwrap(), (p.fa)().unwrap());
            assert_eq!((f.fb)().unwrap(), (p.fb)().unwrap());
        }
        // Odd-length planes are refused.
        let err = fused_slice(&FusedSlice {
            a: Tile::Bf16Planes(&pa[..pa.len() - 1]),
            a_inv_t: &a_inv_t,
            a_sel: &[0],
            a_sel_inv_t: &[0.5],
            b: Tile::Bf16Planes(&pb),
            b_inv_t: &b_inv_t,
            b_sel: &[0],
            b_sel_inv_t: &[1.0],
            width: w,
            variant: Variant::Unsigned,
            pool: FisherPool::A,
            eps: 1e-12,
            lam: 0.0,
        });
        assert!(err.is_err());
    }

    #[test]
    fn a_non_finite_value_makes_the_fisher_not_finite() {
        let w = 200;
        let mut a = tile(3, w, 9);
        a[w + 150] = f32::NAN;
        let b = tile(2, w, 11);
        let out = fused_slice(&FusedSlice {
            a: Tile::F32(&a),
            a_inv_t: &[1.0, 0.5, 0.25],
            a_sel: &[0, 2],
            a_sel_inv_t: &[1.0, 0.25],
            b: Tile::F32(&b),
            b_inv_t: &[1.0, 1.0],
            b_sel: &[0, 1],
            b_sel_inv_t: &[1.0, 1.0],
            width: w,
            variant: Variant::Unsigned,
            pool: FisherPool::A,
            eps: 1e-10,
            lam: 0.0,
        })
        .unwrap();
        assert!(!out.fisher_finite);
        assert!((out.fa)().unwrap()[150].is_nan());
    }
}
