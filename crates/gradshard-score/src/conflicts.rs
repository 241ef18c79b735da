//! Phase 5: which samples of one task pull against the other (docs/scoring.md,
//! "Phase 5: sample conflicts").
//!
//! During the pass the engine adds, per slice, the whitened Gram of every analysed
//! sample (`u_i = g_i / sqrt(den)`, `den` from the Fisher of all stored samples of
//! both tasks) into a [`GramAcc`]. After the pass [`finish`] turns each slice's Gram
//! ("head" rows) and each (layer, block)'s sum of them ("block" rows) into cosines and
//! their statistics: cross- and within-task means, an exact or Monte Carlo
//! label-permutation p-value of `delta`, Benjamini–Hochberg q-values per granularity,
//! a bootstrap interval of the cross mean, the most negative cross pairs and each
//! sample's mean cosine to the other task.

use std::collections::BTreeMap;

use gradshard_core::{Block, SampleId, TaskName};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::Result;
use crate::options::ScoreOptions;
use crate::slice::SliceId;
use crate::stats;

/// The level of a conflict row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One stored head slice (layer, block, stored head).
    Head,
    /// One (layer, block): all its scored head slices together.
    Block,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Head => "head",
            Granularity::Block => "block",
        }
    }
}

/// One row of `conflicts.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRow {
    pub granularity: Granularity,
    pub block: Block,
    pub layer: usize,
    /// Stored head (query head for Q/O, kv head for K/V); None on block rows.
    pub head: Option<usize>,
    pub n_a: usize,
    pub n_b: usize,
    /// Mean cosine over the A×B pairs.
    pub cross_mean: f64,
    /// Mean cosine over the unordered pairs of distinct A samples (B likewise).
    pub within_a: f64,
    pub within_b: f64,
    /// `(within_a + within_b)/2 − cross_mean`.
    pub delta: f64,
    /// Share of A×B pairs with a negative cosine.
    pub frac_negative: f64,
    /// Percentile bootstrap interval of `cross_mean` (None when `n_boot = 0`).
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// One-sided label-permutation p-value of `delta` (None when `n_perm = 0`).
    pub p_value: Option<f64>,
    /// Whether every relabelling was enumerated (`C(n, n_a) ≤ n_perm`).
    pub exact: bool,
    /// Benjamini–Hochberg q-value within the rows of the same granularity.
    pub q_value: Option<f64>,
}

/// One of the most negative cross-task pairs of a (granularity, block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictPair {
    pub granularity: Granularity,
    pub block: Block,
    /// 1 = most negative; ties by (index_a, index_b, layer, head).
    pub rank: usize,
    pub layer: usize,
    /// Stored head; None on block rows.
    pub head: Option<usize>,
    pub sample_a: SampleId,
    pub sample_b: SampleId,
    /// Stored-order indices of the two samples.
    pub index_a: usize,
    pub index_b: usize,
    pub cosine: f64,
}

/// A sample's mean cosine to the other task's analysed samples at one (layer, block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleConflict {
    pub task: TaskName,
    pub sample: SampleId,
    /// Stored-order index of the sample in its task.
    pub index: usize,
    pub block: Block,
    pub layer: usize,
    pub mean_cosine: f64,
}

/// Everything phase 5 produces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conflicts {
    /// Head rows (block, layer, head order), then block rows (block, layer order).
    pub rows: Vec<ConflictRow>,
    /// Per (granularity, block) the `top_k` most negative cross pairs, by rank.
    pub pairs: Vec<ConflictPair>,
    /// Task A's samples, then task B's, each in analysed order; per sample its
    /// (block, layer) rows.
    pub samples: Vec<SampleConflict>,
}

impl Conflicts {
    /// The `k` most conflicted rows: lowest q (rows without a q last), then lowest
    /// cross_mean, then (granularity, block, layer, head).
    pub fn most_conflicted(&self, k: usize) -> Vec<&ConflictRow> {
        let mut v: Vec<&ConflictRow> = self.rows.iter().collect();
        v.sort_by(|a, b| {
            let q = |r: &ConflictRow| r.q_value.unwrap_or(f64::INFINITY);
            q(a).total_cmp(&q(b))
                .then(a.cross_mean.total_cmp(&b.cross_mean))
                .then((a.granularity, a.block, a.layer, a.head).cmp(&(
                    b.granularity,
                    b.block,
                    b.layer,
                    b.head,
                )))
        });
        v.truncate(k);
        v
    }

    /// The `k` samples of `task` whose mean cosine to the other task, averaged over
    /// their (block, layer) rows, is lowest: `(id, mean)`, lowest first (ties by
    /// stored index).
    pub fn lowest_samples(&self, task: &TaskName, k: usize) -> Vec<(SampleId, f64)> {
        let mut by: BTreeMap<usize, (SampleId, f64, usize)> = BTreeMap::new();
        for s in self.samples.iter().filter(|s| &s.task == task) {
            let e = by
                .entry(s.index)
                .or_insert_with(|| (s.sample.clone(), 0.0, 0));
            e.1 += s.mean_cosine;
            e.2 += 1;
        }
        let mut v: Vec<(usize, SampleId, f64)> = by
            .into_iter()
            .map(|(i, (id, sum, n))| (i, id, sum / n as f64))
            .collect();
        v.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
        v.into_iter().take(k).map(|(_, id, m)| (id, m)).collect()
    }
}

/// The whitened Grams of the pass, one per slice (`n × n`, A's analysed samples
/// first, then B's).
pub(crate) struct GramAcc {
    pub n: usize,
    pub grams: Vec<(SliceId, Vec<f64>)>,
}

/// The analysed samples of one task: ids and stored-order indices.
pub(crate) struct Analysed<'a> {
    pub task: &'a TaskName,
    pub ids: Vec<SampleId>,
    pub index: Vec<usize>,
}

const PURPOSE_CONFLICT_PERM: u64 = 3;
const PURPOSE_CONFLICT_BOOT: u64 = 4;

/// The cosine matrix of a whitened Gram: `s_ij = G_ij / sqrt(G_ii G_jj)`, 0 where a
/// sample's norm is 0.
pub fn cosines(gram: &[f64], n: usize) -> Vec<f64> {
    let norm: Vec<f64> = (0..n).map(|i| gram[i * n + i].max(0.0).sqrt()).collect();
    let mut s = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            let d = norm[i] * norm[j];
            s[i * n + j] = if d > 0.0 { gram[i * n + j] / d } else { 0.0 };
        }
    }
    s
}

/// `(delta, within_a, within_b, cross_mean)` of the labelling `in_a` (`n_a` true) on the
/// cosine matrix `s`. Every pair i < j is visited in the same order whatever the labels,
/// so labellings that give the same sets of pairs give bit-identical values.
fn delta_of(s: &[f64], n: usize, in_a: &[bool], na: usize) -> (f64, f64, f64, f64) {
    let nb = n - na;
    let (mut aa, mut bb, mut ab) = (0f64, 0f64, 0f64);
    for i in 0..n {
        let row = &s[i * n..(i + 1) * n];
        let ai = in_a[i];
        for j in i + 1..n {
            match (ai, in_a[j]) {
                (true, true) => aa += row[j],
                (false, false) => bb += row[j],
                _ => ab += row[j],
            }
        }
    }
    let wa = aa / (na * (na - 1) / 2) as f64;
    let wb = bb / (nb * (nb - 1) / 2) as f64;
    let cross = ab / (na * nb) as f64;
    ((wa + wb) / 2.0 - cross, wa, wb, cross)
}

/// `C(n, k)`, or None when it exceeds `limit`.
fn binomial_up_to(n: usize, k: usize, limit: usize) -> Option<usize> {
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 0..k {
        c = c * (n - i) as u128 / (i + 1) as u128;
        if c > limit as u128 {
            return None;
        }
    }
    Some(c as usize)
}

/// Statistics of one row from its cosine matrix (`na + nb` samples, A first).
fn row_stats(
    s: &[f64],
    na: usize,
    nb: usize,
    opts: &ScoreOptions,
    key: [u64; 4],
    backend: &dyn Backend,
) -> Result<ConflictRow> {
    let n = na + nb;
    let observed: Vec<bool> = (0..n).map(|i| i < na).collect();
    let (delta, within_a, within_b, cross_mean) = delta_of(s, n, &observed, na);
    let mut cross = Vec::with_capacity(na * nb);
    for i in 0..na {
        cross.extend_from_slice(&s[i * n + na..i * n + n]);
    }
    let frac_negative = cross.iter().filter(|v| **v < 0.0).count() as f64 / (na * nb) as f64;
    let tol = 1e-12 + 1e-9 * delta.abs();
    let (p_value, exact) = if opts.n_perm == 0 {
        (None, false)
    } else if let Some(total) = binomial_up_to(n, na, opts.n_perm) {
        // Every relabelling, the observed one included, in lexicographic order.
        let mut idx: Vec<usize> = (0..na).collect();
        let mut in_a = vec![false; n];
        let mut hits = 0usize;
        loop {
            in_a.iter_mut().for_each(|v| *v = false);
            idx.iter().for_each(|&i| in_a[i] = true);
            if delta_of(s, n, &in_a, na).0 >= delta - tol {
                hits += 1;
            }
            // Next combination.
            let mut i = na;
            while i > 0 && idx[i - 1] == n - na + i - 1 {
                i -= 1;
            }
            if i == 0 {
                break;
            }
            idx[i - 1] += 1;
            for j in i..na {
                idx[j] = idx[j - 1] + 1;
            }
        }
        (Some(hits as f64 / total as f64), true)
    } else {
        let hits: usize = (0..opts.n_perm)
            .into_par_iter()
            .map(|b| {
                let mut rng = stats::rng_for(
                    opts.seed,
                    &[
                        PURPOSE_CONFLICT_PERM,
                        key[0],
                        key[1],
                        key[2],
                        key[3],
                        b as u64,
                    ],
                );
                let mut perm: Vec<usize> = (0..n).collect();
                // The first n_a places of a partial Fisher–Yates shuffle: a uniform set.
                for i in 0..na {
                    let j = rng.random_range(i..n);
                    perm.swap(i, j);
                }
                let mut in_a = vec![false; n];
                perm[..na].iter().for_each(|&i| in_a[i] = true);
                usize::from(delta_of(s, n, &in_a, na).0 >= delta - tol)
            })
            .sum();
        (Some((1 + hits) as f64 / (1 + opts.n_perm) as f64), false)
    };
    let (ci_low, ci_high) = if opts.n_boot > 0 {
        let rng = stats::rng_for(
            opts.seed,
            &[PURPOSE_CONFLICT_BOOT, key[0], key[1], key[2], key[3]],
        );
        let (lo, hi) =
            stats::bootstrap_ci(backend, &cross, na, nb, opts.n_boot, opts.ci_level, rng)?;
        (Some(lo), Some(hi))
    } else {
        (None, None)
    };
    Ok(ConflictRow {
        granularity: Granularity::Head,
        block: Block::Q,
        layer: 0,
        head: None,
        n_a: na,
        n_b: nb,
        cross_mean,
        within_a,
        within_b,
        delta,
        frac_negative,
        ci_low,
        ci_high,
        p_value,
        exact,
        q_value: None,
    })
}

/// One row's Gram before its statistics: (granularity, block, layer, head, Gram).
type Unit = (Granularity, Block, usize, Option<usize>, Vec<f64>);

/// A cross pair candidate: (cosine, index_a, index_b, layer, head).
type Candidate = (f64, usize, usize, usize, Option<usize>);

/// Everything of phase 5 from the pass's Grams.
pub(crate) fn finish(
    acc: GramAcc,
    a: &Analysed<'_>,
    b: &Analysed<'_>,
    opts: &ScoreOptions,
    backend: &dyn Backend,
) -> Result<Conflicts> {
    let (na, nb) = (a.ids.len(), b.ids.len());
    let n = acc.n;
    let mut grams = acc.grams;
    grams.sort_by_key(|(s, _)| s.block_major());
    // Block Grams: the sum of the block's head Grams, heads in ascending order.
    let mut blocks: BTreeMap<(Block, usize), Vec<f64>> = BTreeMap::new();
    for (s, g) in &grams {
        let e = blocks
            .entry((s.block, s.layer))
            .or_insert_with(|| vec![0f64; n * n]);
        for (x, y) in e.iter_mut().zip(g) {
            *x += y;
        }
    }
    let mut units: Vec<Unit> = grams
        .into_iter()
        .map(|(s, g)| (Granularity::Head, s.block, s.layer, Some(s.head), g))
        .collect();
    units.extend(
        blocks
            .into_iter()
            .map(|((blk, l), g)| (Granularity::Block, blk, l, None, g)),
    );
    let cos: Vec<Vec<f64>> = units.par_iter().map(|u| cosines(&u.4, n)).collect();
    let mut rows: Vec<ConflictRow> = units
        .iter()
        .zip(&cos)
        .map(|((gran, blk, l, h, _), s)| {
            let key = [
                *gran as u64,
                blk.index() as u64,
                *l as u64,
                h.map_or(u64::MAX, |h| h as u64),
            ];
            let mut r = row_stats(s, na, nb, opts, key, backend)?;
            (r.granularity, r.block, r.layer, r.head) = (*gran, *blk, *l, *h);
            Ok(r)
        })
        .collect::<Result<_>>()?;
    for gran in [Granularity::Head, Granularity::Block] {
        let idx: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].granularity == gran && rows[i].p_value.is_some())
            .collect();
        let p: Vec<f64> = idx.iter().map(|&i| rows[i].p_value.unwrap()).collect();
        for (i, q) in idx.into_iter().zip(stats::bh_q_values(&p)) {
            rows[i].q_value = Some(q);
        }
    }

    // Most negative cross pairs per (granularity, block).
    let mut cands: BTreeMap<(Granularity, Block), Vec<Candidate>> = BTreeMap::new();
    for ((gran, blk, l, h, _), s) in units.iter().zip(&cos) {
        let list = cands.entry((*gran, *blk)).or_default();
        for i in 0..na {
            for j in 0..nb {
                list.push((s[i * n + na + j], a.index[i], b.index[j], *l, *h));
            }
        }
    }
    let order = |x: &Candidate, y: &Candidate| {
        x.0.total_cmp(&y.0)
            .then((x.1, x.2, x.3, x.4).cmp(&(y.1, y.2, y.3, y.4)))
    };
    let pos_a = |index: usize| a.index.iter().position(|&i| i == index).expect("analysed");
    let pos_b = |index: usize| b.index.iter().position(|&i| i == index).expect("analysed");
    let mut pairs = Vec::new();
    for ((gran, blk), mut list) in cands {
        let k = opts.top_k.min(list.len());
        if k == 0 {
            continue;
        }
        if k < list.len() {
            list.select_nth_unstable_by(k - 1, order);
            list.truncate(k);
        }
        list.sort_by(order);
        for (rank, (c, ia, ib, l, h)) in list.into_iter().enumerate() {
            pairs.push(ConflictPair {
                granularity: gran,
                block: blk,
                rank: rank + 1,
                layer: l,
                head: h,
                sample_a: a.ids[pos_a(ia)].clone(),
                sample_b: b.ids[pos_b(ib)].clone(),
                index_a: ia,
                index_b: ib,
                cosine: c,
            });
        }
    }

    // Each sample's mean cosine to the other task, per block row.
    let mut samples = Vec::new();
    let block_units: Vec<(&Unit, &Vec<f64>)> = units
        .iter()
        .zip(&cos)
        .filter(|(u, _)| u.0 == Granularity::Block)
        .collect();
    for (task, count) in [(a, na), (b, nb)] {
        let is_a = std::ptr::eq(task, a);
        for q in 0..count {
            for ((_, blk, l, _, _), s) in &block_units {
                let mean = if is_a {
                    (0..nb).map(|j| s[q * n + na + j]).sum::<f64>() / nb as f64
                } else {
                    (0..na).map(|i| s[i * n + na + q]).sum::<f64>() / na as f64
                };
                samples.push(SampleConflict {
                    task: task.task.clone(),
                    sample: task.ids[q].clone(),
                    index: task.index[q],
                    block: *blk,
                    layer: *l,
                    mean_cosine: mean,
                });
            }
        }
    }
    Ok(Conflicts {
        rows,
        pairs,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_norm_samples_have_cosine_zero() {
        // Sample 1 is zero: its row and column are 0, no NaN.
        let g = [4.0, 0.0, 2.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0];
        let s = cosines(&g, 3);
        assert!(s.iter().all(|v| v.is_finite()));
        assert_eq!(&s[3..6], &[0.0, 0.0, 0.0]);
        assert_eq!(s[1], 0.0);
        assert!((s[2] - 1.0).abs() < 1e-15);
    }

    #[test]
    fn binomial_stops_at_the_limit() {
        assert_eq!(binomial_up_to(6, 3, 1000), Some(20));
        assert_eq!(binomial_up_to(10, 5, 251), None);
        assert_eq!(binomial_up_to(10, 5, 252), Some(252));
        assert_eq!(binomial_up_to(4, 4, 10), Some(1));
    }

    #[test]
    fn swapped_labels_tie_exactly() {
        // n_a = n_b: the swapped labelling has the same delta bit for bit.
        let n = 4;
        let s: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                if i == j {
                    1.0
                } else {
                    ((i + j) as f64 * 0.37).sin()
                }
            })
            .collect();
        let d1 = delta_of(&s, n, &[true, true, false, false], 2).0;
        let d2 = delta_of(&s, n, &[false, false, true, true], 2).0;
        assert_eq!(d1.to_bits(), d2.to_bits());
    }
}
