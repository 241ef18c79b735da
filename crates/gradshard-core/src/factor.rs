//! Factored per-sample gradients (docs/format.md, "Factored samples").
//!
//! The gradient of a linear map over the n token positions of one sample is a
//! sum of outer products: G = Σ_t p_t s_tᵀ = Pᵀ S with P (n × r) and S (n × c)
//! stored position-major. A factored store keeps P and S instead of G; these
//! helpers turn them back into G and compute G's squared sums without forming it.

/// `out = Pᵀ S` (`r × c`, row-major) for `p` (`n × r`) and `s` (`n × c`), both row-major,
/// accumulated in f32 by the `gemm` crate on the calling thread (readers call it from
/// their own parallel loops).
///
/// Panics when a length does not match (callers check shapes against the manifest).
pub fn pt_s(p: &[f32], s: &[f32], n: usize, r: usize, c: usize, out: &mut [f32]) {
    pt_s_with(p, s, n, r, c, out, gemm::Parallelism::None)
}

/// The gradient G = AᵀB (shape[0] × shape[1], row-major) of the tensor `name` from
/// its factors over `n` stacked positions: A is n × shape[0], B is n × shape[1]. One
/// large product, so gemm runs on rayon's pool ([`pt_s_parallel`]).
///
/// # Panics
/// When `shape` is not 2-D or `a`/`b` do not hold n × shape[0] / n × shape[1] values.
pub fn factors_gradient(name: &str, shape: &[usize], n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(shape.len(), 2, "{name}: factors need a 2-D shape");
    let (r, c) = (shape[0], shape[1]);
    assert_eq!(a.len(), n * r, "{name}: A must be n × shape[0]");
    assert_eq!(b.len(), n * c, "{name}: B must be n × shape[1]");
    let mut g = vec![0f32; r * c];
    pt_s_parallel(a, b, n, r, c, &mut g);
    g
}

/// [`pt_s`] with gemm's own rayon threads, for one large product (a whole tensor).
pub fn pt_s_parallel(p: &[f32], s: &[f32], n: usize, r: usize, c: usize, out: &mut [f32]) {
    pt_s_with(p, s, n, r, c, out, gemm::Parallelism::Rayon(0))
}

fn pt_s_with(
    p: &[f32],
    s: &[f32],
    n: usize,
    r: usize,
    c: usize,
    out: &mut [f32],
    par: gemm::Parallelism,
) {
    assert_eq!(p.len(), n * r, "P is not n × r");
    assert_eq!(s.len(), n * c, "S is not n × c");
    assert_eq!(out.len(), r * c, "out is not r × c");
    if r == 0 || c == 0 {
        return;
    }
    if n == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: lhs is Pᵀ viewed as [r × n] (element (i, t) at t·r + i: column stride r,
    // row stride 1), rhs is S [n × c] row-major (column stride 1, row stride c), dst is
    // `out` [r × c] row-major; the lengths were asserted above. read_dst = false with
    // alpha = 0, beta = 1 overwrites: out = Pᵀ·S.
    unsafe {
        gemm::gemm(
            r,
            c,
            n,
            out.as_mut_ptr(),
            1,
            c as isize,
            false,
            p.as_ptr(),
            r as isize,
            1,
            s.as_ptr(),
            1,
            c as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// `dst = L · R` in f64 (`m × k` times `k × n`, all row-major, strides given as
/// (column stride, row stride) of each operand), rayon-parallel inside gemm.
#[allow(clippy::too_many_arguments)]
fn gemm_f64(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f64],
    lhs: &[f64],
    l_strides: (isize, isize),
    rhs: &[f64],
    r_strides: (isize, isize),
) {
    assert_eq!(dst.len(), m * n);
    gemm_f64_rows(m, n, k, dst, n, lhs, l_strides, rhs, r_strides);
}

/// [`gemm_f64`] into the first `n` columns of `m` rows of a row-major `dst` whose rows
/// are `dst_rs` apart (a block of a larger matrix).
#[allow(clippy::too_many_arguments)]
fn gemm_f64_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f64],
    dst_rs: usize,
    lhs: &[f64],
    (l_cs, l_rs): (isize, isize),
    rhs: &[f64],
    (r_cs, r_rs): (isize, isize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_rs && dst.len() >= (m - 1) * dst_rs + n);
    if k == 0 {
        for row in dst.chunks_mut(dst_rs).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    // Parallel inside gemm only when called from outside the rayon pool: callers that
    // already run many small products in parallel (one per pool task) get one
    // single-threaded product each.
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && rayon::current_thread_index().is_none() {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the callers pass lhs/rhs holding m·k / k·n values laid out by the given
    // strides (checked by their asserts) and dst holds m rows of n values dst_rs apart
    // (asserted); read_dst = false with alpha = 0, beta = 1 overwrites dst with lhs·rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs.as_ptr(),
            l_cs,
            l_rs,
            rhs.as_ptr(),
            r_cs,
            r_rs,
            0.0f64,
            1.0f64,
            false,
            false,
            false,
            par,
        );
    }
}

/// The Gram matrix `M Mᵀ` (`n × n`, f64) of `m` (`n × w`, row-major).
pub fn gram(m: &[f32], n: usize, w: usize) -> Vec<f64> {
    assert_eq!(m.len(), n * w, "matrix is not n × w");
    let m64: Vec<f64> = m.iter().map(|v| *v as f64).collect();
    let mut g = vec![0f64; n * n];
    // The lower block triangle only, one block row at a time (rows a0..a1 against rows
    // 0..a1): with four blocks 10/16 of the products of the whole square. lhs = rows
    // a0..a1 of M (cs 1, rs w); rhs = Mᵀ [w × a1]: element (k, j) at j·w + k.
    let blocks = if n >= 64 { 4 } else { 1 };
    for bi in 0..blocks {
        let (a0, a1) = (n * bi / blocks, n * (bi + 1) / blocks);
        gemm_f64_rows(
            a1 - a0,
            a1,
            w,
            &mut g[a0 * n..],
            n,
            &m64[a0 * w..],
            (1, w as isize),
            &m64,
            (w as isize, 1),
        );
    }
    // The upper triangle is the lower one mirrored, so the matrix is exactly symmetric.
    for a in 0..n {
        for b in a + 1..n {
            g[a * n + b] = g[b * n + a];
        }
    }
    g
}

/// `Σ_{j,k} (Pᵀ S)[j,k]²` = `Σ_{a,b} (P Pᵀ)[a,b] · (S Sᵀ)[a,b]`, from the two Gram
/// matrices (`n × n`): the squared norm of a factored slice without forming it.
pub fn frob2_from_grams(gp: &[f64], gs: &[f64]) -> f64 {
    assert_eq!(gp.len(), gs.len(), "Gram matrices differ in size");
    gp.iter().zip(gs).map(|(a, b)| a * b).sum()
}

/// Row sums of squares of `Pᵀ S` (one per column of P, i.e. per row of the slice):
/// `out[i] = p_iᵀ (S Sᵀ) p_i` with `p_i` column i of `p` (`n × r`) and `gs` = S Sᵀ.
/// One GEMM (`W = (S Sᵀ) P`), then `out[i] = Σ_a P[a,i] W[a,i]`.
pub fn row_sums_sq(p: &[f32], n: usize, r: usize, gs: &[f64], out: &mut [f64]) {
    assert_eq!(p.len(), n * r, "P is not n × r");
    assert_eq!(gs.len(), n * n, "Gram is not n × n");
    assert_eq!(out.len(), r, "out is not r long");
    let p64: Vec<f64> = p.iter().map(|v| *v as f64).collect();
    let mut w = vec![0f64; n * r];
    gemm_f64(n, r, n, &mut w, gs, (1, n as isize), &p64, (1, r as isize));
    out.fill(0.0);
    for a in 0..n {
        for (i, o) in out.iter_mut().enumerate() {
            *o += p64[a * r + i] * w[a * r + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(n: usize, w: usize, seed: u32) -> Vec<f32> {
        (0..n * w)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
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

    #[test]
    fn pt_s_matches_the_definition() {
        for (n, r, c) in [(1, 1, 1), (7, 3, 5), (33, 16, 64), (5, 40, 2)] {
            let (p, s) = (mat(n, r, 1), mat(n, c, 2));
            let mut out = vec![f32::NAN; r * c];
            pt_s(&p, &s, n, r, c, &mut out);
            for (a, b) in out.iter().zip(naive(&p, &s, n, r, c)) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn gram_by_lower_blocks_is_the_whole_product_and_symmetric() {
        for (n, w) in [(64, 3), (70, 5), (129, 17)] {
            let m = mat(n, w, 7);
            let g = gram(&m, n, w);
            for a in 0..n {
                for b in 0..n {
                    let want: f64 = (0..w)
                        .map(|k| m[a * w + k] as f64 * m[b * w + k] as f64)
                        .sum();
                    let got = g[a * n + b];
                    assert!(
                        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "{n} {a} {b}"
                    );
                    assert_eq!(got.to_bits(), g[b * n + a].to_bits());
                }
            }
        }
    }

    #[test]
    fn squared_sums_from_grams_match_the_formed_slice() {
        let (n, r, c) = (9, 4, 6);
        let (p, s) = (mat(n, r, 3), mat(n, c, 4));
        let g = naive(&p, &s, n, r, c);
        let (gp, gs) = (gram(&p, n, r), gram(&s, n, c));
        let total: f64 = g.iter().map(|v| v * v).sum();
        assert!((frob2_from_grams(&gp, &gs) - total).abs() < 1e-9 * total);
        let mut rows = vec![0f64; r];
        row_sums_sq(&p, n, r, &gs, &mut rows);
        for (i, v) in rows.iter().enumerate() {
            let want: f64 = g[i * c..(i + 1) * c].iter().map(|x| x * x).sum();
            assert!((v - want).abs() < 1e-9 * want.max(1.0), "{v} vs {want}");
        }
    }
}
