//! Seeded statistics: bootstrap intervals of heatmap cells, permutation p-values
//! of top pairs, Benjamini–Hochberg q-values.
//!
//! Every random stream is derived from `(seed, purpose, block, layer, head, draw)`
//! through SplitMix64, so results do not depend on thread count or on the order
//! in which slices are processed.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;

use crate::backend::Backend;
use crate::error::Result;
use crate::options::Variant;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An RNG for one purpose, keyed by a list of integers.
pub(crate) fn rng_for(seed: u64, key: &[u64]) -> Xoshiro256PlusPlus {
    let mut h = splitmix(seed);
    for k in key {
        h = splitmix(h ^ splitmix(*k));
    }
    Xoshiro256PlusPlus::seed_from_u64(h)
}

pub(crate) const PURPOSE_BOOT: u64 = 1;
pub(crate) const PURPOSE_PERM: u64 = 2;

/// Percentile at `p ∈ [0,1]` of sorted values, linear interpolation between
/// order statistics at position `p·(n-1)` (Hyndman–Fan type 7).
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 1 {
        return sorted[0];
    }
    let pos = p.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Percentile bootstrap interval of the mean of `m` (`[na × nb]` row-major),
/// resampling rows (A samples) and columns (B samples) independently with
/// replacement: a replicate is `(1/(na·nb)) Σ_ij w_i v_j M_ij` with multinomial
/// counts w, v. Computed as `R = M·Vᵀ` on the backend (one GEMM for all
/// replicates), then `wᵀ R[:, b]`.
pub fn bootstrap_ci(
    backend: &dyn Backend,
    m: &[f64],
    na: usize,
    nb: usize,
    n_boot: usize,
    level: f64,
    mut rng: Xoshiro256PlusPlus,
) -> Result<(f64, f64)> {
    let m32: Vec<f32> = m.iter().map(|v| *v as f32).collect();
    let mut v = vec![0f32; n_boot * nb];
    let mut w = vec![0f32; n_boot * na];
    for b in 0..n_boot {
        for _ in 0..nb {
            v[b * nb + rng.random_range(0..nb)] += 1.0;
        }
        for _ in 0..na {
            w[b * na + rng.random_range(0..na)] += 1.0;
        }
    }
    let mut r = vec![0f64; na * n_boot];
    backend.gram_accumulate(&m32, &v, nb, &mut r)?;
    let scale = 1.0 / (na as f64 * nb as f64);
    let mut reps: Vec<f64> = (0..n_boot)
        .map(|b| {
            (0..na)
                .map(|i| w[b * na + i] as f64 * r[i * n_boot + b])
                .sum::<f64>()
                * scale
        })
        .collect();
    reps.sort_by(f64::total_cmp);
    let alpha = 1.0 - level;
    Ok((
        percentile_sorted(&reps, alpha / 2.0),
        percentile_sorted(&reps, 1.0 - alpha / 2.0),
    ))
}

/// One pair tested by [`permutation_p_values`]: its X_i and Y_j rows over the whole slice.
pub struct PairRows<'a> {
    pub x: &'a [f32],
    pub y: &'a [f32],
}

/// `Σ_k x_k · y_k` in f64 (the observed statistic, same arithmetic as the null).
fn dot(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Permutation p-values `(1 + #{null ≥ obs}) / (1 + n_perm)` of pairs that all
/// live on slices of the same length.
///
/// The null: the pair's score is `Σ_k X_i[k]·Y_j[k]`; under "no coordinate-level
/// alignment between the two samples", the positions of Y_j's values within
/// the slice are exchangeable. Unsigned and symmetric variants permute the
/// coordinates of Y_j (`Σ_k X_i[k]·Y_j[π(k)]`); the signed variant flips the sign
/// of each coordinate product at random (`Σ_k ε_k X_i[k]·Y_j[k]`, testing "the
/// signed agreement is no more than chance"). Neither statistic is invariant
/// under its transformation unless X or Y is constant, so the p-values carry
/// information. Draw `b` uses permutation/signs number `b` of `key`, shared by
/// all pairs in the call (each test is valid marginally).
pub fn permutation_p_values(
    pairs: &[PairRows<'_>],
    variant: Variant,
    n_perm: usize,
    seed: u64,
    key: &[u64],
) -> Vec<f64> {
    if pairs.is_empty() {
        return Vec::new();
    }
    let len = pairs[0].x.len();
    let obs: Vec<f64> = pairs.iter().map(|p| dot(p.x, p.y)).collect();
    let counts: Vec<u64> = (0..n_perm)
        .into_par_iter()
        .map(|b| {
            let mut k = key.to_vec();
            k.push(b as u64);
            let mut rng = rng_for(seed, &k);
            let mut hits = vec![0u64; pairs.len()];
            match variant {
                Variant::Signed => {
                    let signs: Vec<bool> = (0..len).map(|_| rng.random::<bool>()).collect();
                    for (e, p) in pairs.iter().enumerate() {
                        let null: f64 =
                            p.x.iter()
                                .zip(p.y)
                                .zip(&signs)
                                .map(|((a, b), s)| {
                                    let v = *a as f64 * *b as f64;
                                    if *s {
                                        v
                                    } else {
                                        -v
                                    }
                                })
                                .sum();
                        hits[e] += u64::from(null >= obs[e]);
                    }
                }
                Variant::Unsigned | Variant::Symmetric => {
                    let mut perm: Vec<u32> = (0..len as u32).collect();
                    // Fisher–Yates.
                    for i in (1..len).rev() {
                        let j = rng.random_range(0..=i);
                        perm.swap(i, j);
                    }
                    for (e, p) in pairs.iter().enumerate() {
                        let null: f64 =
                            p.x.iter()
                                .zip(&perm)
                                .map(|(a, &k)| *a as f64 * p.y[k as usize] as f64)
                                .sum();
                        hits[e] += u64::from(null >= obs[e]);
                    }
                }
            }
            hits
        })
        .reduce(
            || vec![0u64; pairs.len()],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        );
    counts
        .iter()
        .map(|c| (1 + c) as f64 / (1 + n_perm) as f64)
        .collect()
}

/// Benjamini–Hochberg q-values, in the input order:
/// `q_(k) = min_{m ≥ k} min(1, p_(m) · n / m)` over ascending p. Always `q ≥ p`.
pub fn bh_q_values(p: &[f64]) -> Vec<f64> {
    let n = p.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
    let mut q = vec![0.0; n];
    let mut running = 1.0f64;
    for rank in (1..=n).rev() {
        let idx = order[rank - 1];
        running = running.min((p[idx] * n as f64 / rank as f64).min(1.0));
        q[idx] = running;
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    #[test]
    fn bh_matches_hand_computation() {
        let p = [0.01, 0.04, 0.03, 0.5];
        let q = bh_q_values(&p);
        // sorted: 0.01 (1), 0.03 (2), 0.04 (3), 0.5 (4); raw p·n/m: 0.04, 0.06, 0.0533, 0.5
        let want = [
            0.04,
            0.053_333_333_333_333_33,
            0.053_333_333_333_333_33,
            0.5,
        ];
        for (a, b) in q.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{q:?}");
        }
        for (qi, pi) in q.iter().zip(p) {
            assert!(*qi >= pi);
        }
        assert!(bh_q_values(&[]).is_empty());
    }

    #[test]
    fn percentile_interpolates() {
        let s = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile_sorted(&s, 0.0), 1.0);
        assert_eq!(percentile_sorted(&s, 0.5), 3.0);
        assert_eq!(percentile_sorted(&s, 0.125), 1.5);
        assert_eq!(percentile_sorted(&s, 1.0), 5.0);
    }

    #[test]
    fn bootstrap_of_constant_matrix_is_degenerate_and_brackets_mean() {
        let be = CpuBackend::default();
        let m = vec![2.5; 12];
        let (lo, hi) = bootstrap_ci(&be, &m, 3, 4, 200, 0.95, rng_for(1, &[1])).unwrap();
        assert!((lo - 2.5).abs() < 1e-6 && (hi - 2.5).abs() < 1e-6);
        let m: Vec<f64> = (0..30).map(|v| v as f64).collect();
        let mean = m.iter().sum::<f64>() / 30.0;
        let (lo, hi) = bootstrap_ci(&be, &m, 5, 6, 500, 0.9, rng_for(1, &[2])).unwrap();
        assert!(
            lo < mean && mean < hi && lo >= 0.0 && hi <= 29.0,
            "{lo} {hi}"
        );
        // Reproducible.
        let again = bootstrap_ci(&be, &m, 5, 6, 500, 0.9, rng_for(1, &[2])).unwrap();
        assert_eq!((lo, hi), again);
    }

    #[test]
    fn permutation_null_separates_aligned_from_unaligned_pairs() {
        let n = 400;
        // Aligned: x and y both large on the same 20 coordinates.
        let x: Vec<f32> = (0..n)
            .map(|k| if k % 20 == 0 { 5.0 } else { 0.1 })
            .collect();
        let y_aligned = x.clone();
        // Anti-aligned: y large exactly where x is small.
        let y_anti: Vec<f32> = (0..n)
            .map(|k| if k % 20 == 0 { 0.1 } else { 5.0 })
            .collect();
        let pairs = [
            PairRows {
                x: &x,
                y: &y_aligned,
            },
            PairRows { x: &x, y: &y_anti },
        ];
        for variant in [Variant::Unsigned, Variant::Signed] {
            let p = permutation_p_values(&pairs, variant, 199, 7, &[0]);
            assert!(p[0] <= 2.0 / 200.0, "{variant:?} {p:?}");
            assert!(p[0] > 0.0);
            if variant == Variant::Unsigned {
                assert!(p[1] > 0.9, "{p:?}");
            }
            assert_eq!(p, permutation_p_values(&pairs, variant, 199, 7, &[0]));
        }
    }
}
