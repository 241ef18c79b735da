//! Exact order statistics of a slice's Fisher vector in O(n): the lower median of
//! the diagnostics and `lam_rel`, and the per-slice element keep-masks of phases 2-4.
//!
//! The engine needs, per slice of `d·D` values (524 288 at 7B), one median and two
//! thresholds per task and sparsity. Sorting, or `select_nth_unstable` through an
//! index array with a tie-breaking comparator, cost ~35% of the CPU scorer's time on
//! a 7B-shaped store (perf, 2-core VM). Here one pass finds the range of an
//! order-preserving integer key, one builds a histogram over that range (2⁸ to 2¹⁶
//! bins, by length; all ranks of a vector share it), and only the values of the bin
//! holding a wanted rank are copied and selected.
//! Results are bit-identical to sorting under [`f64::total_cmp`]; the tests compare
//! with the sort-based definitions on random data with ties.

use rayon::prelude::*;

/// Most bits of the key that pick a histogram bin (2¹⁶ bins for vectors of 2¹⁹ values
/// and more).
const MAX_BIN_BITS: u32 = 16;
/// Fewest bits (256 bins).
const MIN_BIN_BITS: u32 = 8;
/// Values per parallel histogram chunk.
const CHUNK: usize = 1 << 17;

/// Unsigned key with `key(a) < key(b)` iff `a.total_cmp(&b)` is `Less`.
#[inline]
pub fn key(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

/// The key range a histogram spans: bin of key `k` = `(k - base) >> shift`.
#[derive(Debug, Clone, Copy)]
struct Bins {
    base: u64,
    shift: u32,
    /// Number of bins (at most 2^bits).
    count: usize,
}

impl Bins {
    /// Bins of about equal key width over `[lo, hi]`, at most `2^bits` of them. Keys of
    /// positive floats are exponent-major, so bins taken from the top bits of the whole
    /// 64-bit key were one binade (or two) wide: a Fisher vector spanning twenty
    /// binades put thousands of values in the bin of each wanted rank, all of which were
    /// then gathered and selected. Spanning only the vector's own range spreads them
    /// over every bin.
    fn over(lo: u64, hi: u64, bits: u32) -> Bins {
        if lo > hi {
            // No values.
            return Bins {
                base: 0,
                shift: 0,
                count: 1,
            };
        }
        let span = hi - lo;
        let need = u64::BITS - span.leading_zeros();
        let shift = need.saturating_sub(bits);
        Bins {
            base: lo,
            shift,
            count: (span >> shift) as usize + 1,
        }
    }

    #[inline]
    fn of(&self, k: u64) -> usize {
        (k.wrapping_sub(self.base) >> self.shift) as usize
    }

    /// Whether key `k` falls inside the span (every key of the vector does).
    #[inline]
    fn holds(&self, k: u64) -> bool {
        k.wrapping_sub(self.base) >> self.shift < self.count as u64
    }
}

/// Histogram bits for `n` values: about sixteen values per bin, within
/// [`MIN_BIN_BITS`]..=[`MAX_BIN_BITS`]. Zeroing and summing the histogram costs
/// 2^bits steps whatever `n` is: with 2¹⁶ bins a 32 768-value slice (d 64 × D 512)
/// spent more time on its 768 KiB of histogram and prefix sums than on its values.
fn bin_bits(n: usize) -> u32 {
    let log2 = usize::BITS - n.max(1).leading_zeros();
    log2.saturating_sub(4).clamp(MIN_BIN_BITS, MAX_BIN_BITS)
}

/// A vector's histogram of key bins, from which any rank is found in one more pass
/// over a single bin.
pub struct Ranker<'a> {
    v: &'a [f64],
    /// The histogram's bins ([`bin_bits`] of the length, over the vector's key range).
    bins: Bins,
    /// `cum[b]` = number of values in bins `< b` (length `bins.count + 1`).
    cum: Vec<u64>,
}

impl<'a> Ranker<'a> {
    pub fn new(v: &'a [f64]) -> Ranker<'a> {
        let (lo, hi) = v
            .par_chunks(CHUNK)
            .map(|c| {
                c.iter().fold((u64::MAX, 0u64), |(lo, hi), &x| {
                    let k = key(x);
                    (lo.min(k), hi.max(k))
                })
            })
            .reduce(|| (u64::MAX, 0), |a, b| (a.0.min(b.0), a.1.max(b.1)));
        let bins = Bins::over(lo, hi, bin_bits(v.len()));
        let nb = bins.count;
        let hist = v
            .par_chunks(CHUNK)
            .map(|c| {
                // Four interleaved histograms: neighbouring Fisher values often share a
                // bin, and one histogram made every increment wait for the previous
                // one's store (the loop ran at ~5 cycles per value).
                let mut h4 = vec![0u32; 4 * nb];
                let mut quads = c.chunks_exact(4);
                for q in &mut quads {
                    for (l, &x) in q.iter().enumerate() {
                        h4[l * nb + bins.of(key(x))] += 1;
                    }
                }
                for &x in quads.remainder() {
                    h4[bins.of(key(x))] += 1;
                }
                let (h, rest) = h4.split_at_mut(nb);
                for part in rest.chunks_exact(nb) {
                    h.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                }
                h4.truncate(nb);
                h4
            })
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            })
            .unwrap_or_else(|| vec![0; nb]);
        let mut cum = Vec::with_capacity(nb + 1);
        let mut run = 0u64;
        cum.push(0);
        for h in hist {
            run += h as u64;
            cum.push(run);
        }
        Ranker { v, bins, cum }
    }

    /// Order statistics at ascending ranks `ranks` (0-based, each `< len`): one
    /// parallel pass gathers the values of the bins holding them.
    pub fn at_ranks(&self, ranks: &[usize]) -> Vec<OrderStat> {
        let n = self.v.len() as u64;
        let bins: Vec<usize> = ranks
            .iter()
            .map(|&r| {
                assert!((r as u64) < n, "rank {r} of {n} values");
                // The bin b with cum[b] <= r < cum[b+1].
                self.cum.partition_point(|&c| c <= r as u64) - 1
            })
            .collect();
        let mut wanted = bins.clone();
        wanted.sort_unstable();
        wanted.dedup();
        let nw = wanted.len();
        // bin -> 1 + its index in `wanted` (0: not wanted); at most 255 distinct bins
        // are wanted at once (a handful in practice), more are gathered in rounds.
        if nw > 255 {
            let mut out = Vec::with_capacity(ranks.len());
            for part in ranks.chunks(255) {
                out.extend(self.at_ranks(part));
            }
            return out;
        }
        let span = self.bins;
        let mut slot = vec![0u8; span.count];
        for (i, &b) in wanted.iter().enumerate() {
            slot[b] = i as u8 + 1;
        }
        let mut members: Vec<Vec<u64>> = self
            .v
            .par_chunks(CHUNK)
            .map(|c| {
                let mut m = vec![Vec::new(); nw];
                for &x in c {
                    let k = key(x);
                    debug_assert!(span.holds(k));
                    let i = slot[span.of(k)];
                    if i > 0 {
                        m[i as usize - 1].push(k);
                    }
                }
                m
            })
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| x.extend(y));
                a
            })
            .unwrap_or_else(|| vec![Vec::new(); nw]);
        ranks
            .iter()
            .zip(&bins)
            .map(|(&r, &b)| {
                let m = &mut members[wanted.binary_search(&b).expect("gathered")];
                let k = *m.select_nth_unstable((r as u64 - self.cum[b]) as usize).1;
                let (mut greater, mut equal) = ((n - self.cum[b + 1]) as usize, 0);
                for &x in m.iter() {
                    greater += (x > k) as usize;
                    equal += (x == k) as usize;
                }
                OrderStat {
                    key: k,
                    greater,
                    equal,
                }
            })
            .collect()
    }

    /// Value at ascending rank `r`.
    pub fn value_at(&self, r: usize) -> f64 {
        from_key(self.at_ranks(&[r])[0].key)
    }
}

/// The value at a rank (as its [`key`]) and how many values are greater or equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderStat {
    pub key: u64,
    pub greater: usize,
    pub equal: usize,
}

impl OrderStat {
    pub fn value(&self) -> f64 {
        from_key(self.key)
    }
}

/// Ascending rank whose value is the threshold of a keep-mask of the `keep` largest
/// of `n` values (`0 < keep <= n`).
pub fn keep_rank(n: usize, keep: usize) -> usize {
    n - keep
}

/// A keep-mask of the `keep` largest values (ties: lower index first), from the
/// order statistic at [`keep_rank`]: keep value k iff `key > t`, or `key == t` and
/// fewer than `eq_quota` equal values come before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    pub t: u64,
    pub eq_quota: usize,
    /// Values equal to the threshold (`eq_quota <= eq_total`).
    pub eq_total: usize,
}

impl Threshold {
    pub fn new(keep: usize, at: OrderStat) -> Threshold {
        Threshold {
            t: at.key,
            eq_quota: keep - at.greater,
            eq_total: at.equal,
        }
    }

    /// Every value equal to the threshold is kept: the mask is `key >= t`.
    fn is_closed(&self) -> bool {
        self.eq_quota == self.eq_total
    }
}

/// Inverse of [`key`].
#[inline]
pub fn from_key(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

/// Lower median (the value at ascending rank `(n-1)/2` under `total_cmp`); `n > 0`.
pub fn lower_median(v: &[f64]) -> f64 {
    Ranker::new(v).value_at((v.len() - 1) / 2)
}

/// `|mask_a ∩ mask_b|` of two keep-masks given by thresholds (`None`: keeps nothing).
/// Without a partial tie at either threshold (the normal case) this is a branch-free
/// parallel count; otherwise one sequential pass hands out the tie quotas by index.
pub fn intersection(a: &[f64], ta: Option<Threshold>, b: &[f64], tb: Option<Threshold>) -> u64 {
    let (Some(ta), Some(tb)) = (ta, tb) else {
        return 0;
    };
    if ta.is_closed() && tb.is_closed() {
        return a
            .par_chunks(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .map(|(x, y)| {
                x.iter()
                    .zip(y)
                    .map(|(&x, &y)| ((key(x) >= ta.t) & (key(y) >= tb.t)) as u64)
                    .sum::<u64>()
            })
            .sum();
    }
    let (mut qa, mut qb) = (ta.eq_quota, tb.eq_quota);
    let mut inter = 0u64;
    for (&x, &y) in a.iter().zip(b) {
        let (kx, ky) = (key(x), key(y));
        let in_a = kx > ta.t || (kx == ta.t && qa > 0);
        if kx == ta.t && qa > 0 {
            qa -= 1;
        }
        let in_b = ky > tb.t || (ky == tb.t && qb > 0);
        if ky == tb.t && qb > 0 {
            qb -= 1;
        }
        inter += (in_a && in_b) as u64;
    }
    inter
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fisher::{keep_mask, kept_count};
    use rand::{Rng, SeedableRng};

    fn sorted_median(v: &[f64]) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[(s.len() - 1) / 2]
    }

    fn data(seed: u64, n: usize, distinct: Option<u32>) -> Vec<f64> {
        let mut r = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
        (0..n)
            .map(|_| match distinct {
                // Few distinct values: many ties at every threshold.
                Some(d) => (r.random_range(0..d) as f64) * 0.25,
                // Heavy-tailed positive values over many octaves, like a Fisher.
                None => (r.random::<f64>() * 40.0 - 30.0).exp2() * r.random::<f64>(),
            })
            .collect()
    }

    #[test]
    fn keys_order_like_total_cmp() {
        let xs = [
            f64::NEG_INFINITY,
            -3.5,
            -1e-300,
            -0.0,
            0.0,
            1e-310,
            2.0,
            f64::INFINITY,
            f64::NAN,
        ];
        for a in xs {
            assert_eq!(from_key(key(a)).to_bits(), a.to_bits());
            for b in xs {
                assert_eq!(key(a).cmp(&key(b)), a.total_cmp(&b), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn histogram_bits_follow_the_length() {
        assert_eq!(bin_bits(0), MIN_BIN_BITS);
        assert_eq!(bin_bits(1000), MIN_BIN_BITS);
        assert_eq!(bin_bits(32_768), 12);
        assert_eq!(bin_bits(524_288), MAX_BIN_BITS);
        assert_eq!(bin_bits(usize::MAX), MAX_BIN_BITS);
    }

    #[test]
    fn bins_span_the_vectors_own_range() {
        // A Fisher-like vector over 40 binades: no bin holds more than 1 % of it (with
        // bins cut from the top bits of the key, one binade was one bin, ~2.5 %).
        let v = data(21, 32_768, None);
        let r = Ranker::new(&v);
        assert!(r.bins.count > 1 << 10 && r.bins.count <= 1 << bin_bits(v.len()));
        let widest = r.cum.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(widest < 328, "{widest} values in one bin");
        // Mixed signs, zeros, infinities and NaN; one value; all equal; empty.
        let mut odd = data(22, 5_000, None);
        odd.extend([
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            0.0,
            -7.5,
        ]);
        odd.extend(data(23, 3_000, Some(3)).iter().map(|x| -x));
        for v in [odd, vec![3.0], vec![2.5; 999]] {
            let mut sorted = v.clone();
            sorted.sort_by(f64::total_cmp);
            let ranks: Vec<usize> = (0..v.len()).step_by(97).chain([v.len() - 1]).collect();
            let got = Ranker::new(&v).at_ranks(&ranks);
            for (&k, g) in ranks.iter().zip(&got) {
                assert_eq!(
                    g.value().to_bits(),
                    sorted[k].to_bits(),
                    "rank {k} of {}",
                    v.len()
                );
            }
        }
        let empty: [f64; 0] = [];
        assert_eq!(Ranker::new(&empty).cum, vec![0, 0]);
    }

    #[test]
    fn medians_equal_sorting() {
        for (seed, n, d) in [
            (1, 1, None),
            (2, 2, None),
            (3, 1000, None),
            (4, 300_001, None),
            (5, 70_000, Some(3)),
            (6, 5, Some(1)),
        ] {
            let v = data(seed, n, d);
            assert_eq!(lower_median(&v).to_bits(), sorted_median(&v).to_bits());
        }
    }

    #[test]
    fn several_ranks_in_one_pass_with_greater_and_equal_counts() {
        for (seed, n, d) in [(12, 100_000, None), (13, 50_000, Some(5))] {
            let v = data(seed, n, d);
            let mut sorted = v.clone();
            sorted.sort_by(f64::total_cmp);
            let ranks = [n - 1, 0, n / 2, n / 2 + 1, n / 10, n / 2];
            let got = Ranker::new(&v).at_ranks(&ranks);
            for (&r, g) in ranks.iter().zip(&got) {
                let want = sorted[r];
                assert_eq!(g.value().to_bits(), want.to_bits(), "rank {r}");
                let greater = v.iter().filter(|x| x.total_cmp(&want).is_gt()).count();
                let equal = v.iter().filter(|x| x.total_cmp(&want).is_eq()).count();
                assert_eq!((g.greater, g.equal), (greater, equal), "rank {r}");
            }
        }
    }

    #[test]
    fn threshold_masks_equal_the_index_tie_break_masks() {
        for (seed, n, d) in [
            (7, 1000, None),
            (8, 200_000, None),
            (9, 150_000, Some(4)),
            (10, 17, Some(2)),
            (11, 1, None),
        ] {
            let a = data(seed, n, d);
            let b = data(seed + 100, n, d);
            for s in [0.0, 0.1, 0.5, 0.9, 0.999, 1.0] {
                let keep = kept_count(n, s);
                let th = |v: &[f64]| {
                    (keep > 0).then(|| {
                        let at = Ranker::new(v).at_ranks(&[keep_rank(n, keep)])[0];
                        Threshold::new(keep, at)
                    })
                };
                let (ma, mb) = (keep_mask(&a, s), keep_mask(&b, s));
                let want = ma.iter().zip(&mb).filter(|(x, y)| **x && **y).count() as u64;
                assert_eq!(intersection(&a, th(&a), &b, th(&b)), want, "n {n} s {s}");
                // A mask against itself: its own size.
                let own = ma.iter().filter(|x| **x).count() as u64;
                assert_eq!(intersection(&a, th(&a), &a, th(&a)), own);
            }
        }
    }
}
