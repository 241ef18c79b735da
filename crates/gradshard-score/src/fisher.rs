//! Phases 2-4 (docs/design.md §5): group Fisher, importance, keep-masks at a sparsity,
//! overlap of the two tasks' masks, Fisher cosine.
//!
//! Attention groups are head slices (layer, block, stored head): every group has
//! the same number of elements `d·D`. The engine feeds each slice's task Fishers
//! (over all stored samples) to [`SlicePhase::new`] during its single pass, filed by
//! [`PhaseAcc::add`].
//!
//! Masks keep the `round((1 - s)·n)` units of largest Fisher (ties: lower index
//! first). Group masks rank all scored groups of a task; element masks rank the
//! elements *within each slice* (an exact per-slice quantile, so the pass stays
//! bounded in memory; a global element threshold over a 7B model would need all
//! 2 G Fisher values at once). Element totals add the per-slice counts.

use gradshard_core::{Block, TaskName};

use crate::error::{Error, Result};
use crate::result::{GroupFisherRow, GroupKind, MaskLevel, MaskRow, OverlapRow};
use crate::select::{self, Threshold};
use crate::source::TileSource;

struct GroupStat {
    block: Block,
    layer: usize,
    head: usize,
    numel: u64,
    sum_a: f64,
    sum_b: f64,
}

struct Counts {
    numel: u64,
    kept_a: u64,
    kept_b: u64,
    inter: u64,
}

impl Counts {
    fn row(
        &self,
        level: MaskLevel,
        sparsity: f64,
        at: Option<(Block, usize, usize)>,
        cosine: Option<f64>,
    ) -> OverlapRow {
        let union = self.kept_a + self.kept_b - self.inter;
        OverlapRow {
            level,
            sparsity,
            block: at.map(|a| a.0),
            layer: at.map(|a| a.1),
            head: at.map(|a| a.2),
            numel: self.numel,
            kept_a: self.kept_a,
            kept_b: self.kept_b,
            intersection: self.inter,
            union,
            iou: (union > 0).then(|| self.inter as f64 / union as f64),
            intersection_frac: if self.numel > 0 {
                self.inter as f64 / self.numel as f64
            } else {
                0.0
            },
            fisher_cosine: cosine,
        }
    }
}

/// One slice's part of phases 2-4, from its Fishers of task A and task B (each over all
/// its stored samples) and each task's element keep-mask threshold per sparsity
/// (`None`: the mask keeps nothing; see [`crate::select`]; masks are counted, never
/// stored). Computed on any thread, filed in slice order by [`PhaseAcc::add`].
pub(crate) struct SlicePhase {
    slice: (Block, usize, usize),
    numel: u64,
    dot: f64,
    norm_a: f64,
    norm_b: f64,
    sum_a: f64,
    sum_b: f64,
    /// |mask_A ∩ mask_B| per sparsity.
    inter: Vec<u64>,
}

impl SlicePhase {
    pub(crate) fn new(
        slice: (Block, usize, usize),
        sparsities: &[f64],
        fa: &[f64],
        fb: &[f64],
        ta: &[Option<Threshold>],
        tb: &[Option<Threshold>],
    ) -> SlicePhase {
        let (mut dot, mut na, mut nb, mut sum_a, mut sum_b) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (a, b) in fa.iter().zip(fb) {
            dot += a * b;
            na += a * a;
            nb += b * b;
            sum_a += a;
            sum_b += b;
        }
        SlicePhase {
            slice,
            numel: fa.len() as u64,
            dot,
            norm_a: na,
            norm_b: nb,
            sum_a,
            sum_b,
            inter: (0..sparsities.len())
                .map(|si| select::intersection(fa, ta[si], fb, tb[si]))
                .collect(),
        }
    }
}

/// Accumulates phases 2-4 over the slices of a run.
pub(crate) struct PhaseAcc {
    sparsities: Vec<f64>,
    groups: Vec<GroupStat>,
    element_rows: Vec<OverlapRow>,
    totals: Vec<Counts>,
    dot: f64,
    norm_a: f64,
    norm_b: f64,
}

/// Number of units a mask keeps at sparsity `s`.
pub fn kept_count(n: usize, s: f64) -> usize {
    (((1.0 - s) * n as f64).round() as usize).min(n)
}

/// Keep-mask of the `kept_count(v.len(), s)` largest values (ties: lower index first).
pub fn keep_mask(v: &[f64], s: f64) -> Vec<bool> {
    let keep = kept_count(v.len(), s);
    let mut mask = vec![false; v.len()];
    if keep == 0 {
        return mask;
    }
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let by = |a: &u32, b: &u32| v[*b as usize].total_cmp(&v[*a as usize]).then(a.cmp(b));
    if keep < v.len() {
        idx.select_nth_unstable_by(keep - 1, by);
    }
    for &i in &idx[..keep] {
        mask[i as usize] = true;
    }
    mask
}

fn cosine(dot: f64, na: f64, nb: f64) -> Option<f64> {
    (na > 0.0 && nb > 0.0).then(|| dot / (na.sqrt() * nb.sqrt()))
}

impl PhaseAcc {
    pub(crate) fn new(sparsities: &[f64]) -> PhaseAcc {
        PhaseAcc {
            sparsities: sparsities.to_vec(),
            groups: Vec::new(),
            element_rows: Vec::new(),
            totals: sparsities
                .iter()
                .map(|_| Counts {
                    numel: 0,
                    kept_a: 0,
                    kept_b: 0,
                    inter: 0,
                })
                .collect(),
            dot: 0.0,
            norm_a: 0.0,
            norm_b: 0.0,
        }
    }

    /// Files one slice's part (slices in their order: the sums keep their bits).
    pub(crate) fn add(&mut self, p: SlicePhase) {
        let (block, layer, head) = p.slice;
        self.dot += p.dot;
        self.norm_a += p.norm_a;
        self.norm_b += p.norm_b;
        let cos = cosine(p.dot, p.norm_a, p.norm_b);
        self.groups.push(GroupStat {
            block,
            layer,
            head,
            numel: p.numel,
            sum_a: p.sum_a,
            sum_b: p.sum_b,
        });
        let n = p.numel as usize;
        for (si, (&inter, &s)) in p.inter.iter().zip(&self.sparsities).enumerate() {
            let keep = kept_count(n, s) as u64;
            let c = Counts {
                numel: n as u64,
                kept_a: keep,
                kept_b: keep,
                inter,
            };
            let t = &mut self.totals[si];
            t.numel += c.numel;
            t.kept_a += c.kept_a;
            t.kept_b += c.kept_b;
            t.inter += c.inter;
            self.element_rows
                .push(c.row(MaskLevel::Element, s, Some((block, layer, head)), cos));
        }
    }

    /// Group Fisher rows of both tasks, group masks, and overlap rows.
    pub(crate) fn finish(
        self,
        task_a: &TaskName,
        task_b: &TaskName,
    ) -> (Vec<GroupFisherRow>, Vec<MaskRow>, Vec<OverlapRow>) {
        let mut rows = Vec::new();
        let mut masks = Vec::new();
        let mut overlap = Vec::new();
        let tot_a: f64 = self.groups.iter().map(|g| g.sum_a).sum();
        let tot_b: f64 = self.groups.iter().map(|g| g.sum_b).sum();
        for (task, tot, pick) in [(task_a, tot_a, true), (task_b, tot_b, false)] {
            for g in &self.groups {
                let sum = if pick { g.sum_a } else { g.sum_b };
                rows.push(GroupFisherRow {
                    task: task.clone(),
                    kind: GroupKind::Attention,
                    block: Some(g.block),
                    tensor: None,
                    layer: Some(g.layer),
                    head: Some(g.head),
                    channel: None,
                    numel: g.numel,
                    fisher_sum: sum,
                    fisher_mean: sum / g.numel as f64,
                    importance: if tot > 0.0 { sum / tot } else { 0.0 },
                });
            }
        }
        let va: Vec<f64> = self.groups.iter().map(|g| g.sum_a).collect();
        let vb: Vec<f64> = self.groups.iter().map(|g| g.sum_b).collect();
        let gdot: f64 = va.iter().zip(&vb).map(|(a, b)| a * b).sum();
        let gcos = cosine(
            gdot,
            va.iter().map(|a| a * a).sum(),
            vb.iter().map(|b| b * b).sum(),
        );
        for &s in &self.sparsities {
            let ma = keep_mask(&va, s);
            let mb = keep_mask(&vb, s);
            for (task, m) in [(task_a, &ma), (task_b, &mb)] {
                for (g, keep) in self.groups.iter().zip(m.iter()) {
                    masks.push(MaskRow {
                        task: task.clone(),
                        sparsity: s,
                        block: g.block,
                        layer: g.layer,
                        head: g.head,
                        keep: *keep,
                    });
                }
            }
            let c = Counts {
                numel: va.len() as u64,
                kept_a: ma.iter().filter(|x| **x).count() as u64,
                kept_b: mb.iter().filter(|x| **x).count() as u64,
                inter: ma.iter().zip(&mb).filter(|(x, y)| **x && **y).count() as u64,
            };
            overlap.push(c.row(MaskLevel::Group, s, None, gcos));
        }
        let ecos = cosine(self.dot, self.norm_a, self.norm_b);
        for (si, &s) in self.sparsities.iter().enumerate() {
            overlap.push(self.totals[si].row(MaskLevel::Element, s, None, ecos));
        }
        overlap.extend(self.element_rows);
        (rows, masks, overlap)
    }
}

/// MLP (non-attention) Fisher per output channel of one task, from every stored
/// non-attention tensor: `fisher_sum[c] = (1/n) Σ_i Σ_{elements of channel c} g²/T_i`
/// (channels along the tensor's `out_axis`). Importance is normalised over all
/// channels of all such tensors of the task. Returns the rows and the number of
/// `read_other` calls.
pub fn mlp_channel_fisher(
    source: &dyn TileSource,
    task: &TaskName,
) -> Result<(Vec<GroupFisherRow>, u64)> {
    let samples = source.samples(task)?;
    if samples.is_empty() {
        return Err(Error::EmptyTask {
            task: task.to_string(),
        });
    }
    let mut rows = Vec::new();
    let mut reads = 0u64;
    let mut buf = Vec::new();
    for t in source.other_tensors() {
        let [r, c] = t.shape;
        let out_axis = t.out_axis as usize;
        let channels = t.shape[out_axis.min(1)];
        let mut acc = vec![0f64; channels];
        for (si, (id, tokens)) in samples.iter().enumerate() {
            if *tokens == 0 {
                return Err(Error::ZeroTokens {
                    task: task.to_string(),
                    id: id.clone(),
                });
            }
            source.read_other(task, si, &t.name, &mut buf)?;
            reads += 1;
            if buf.len() != r * c {
                return Err(Error::GeometryMismatch {
                    what: format!("values of tensor `{}`", t.name),
                    expected: format!("{}", r * c),
                    found: format!("{}", buf.len()),
                });
            }
            let inv_t = 1.0 / *tokens as f64;
            for (e, &g) in buf.iter().enumerate() {
                if !g.is_finite() {
                    return Err(Error::NonFiniteOther {
                        task: task.to_string(),
                        id: id.clone(),
                        tensor: t.name.clone(),
                        element: e,
                        value: g,
                    });
                }
                let ch = if out_axis == 0 { e / c } else { e % c };
                let g = g as f64;
                acc[ch] += g * g * inv_t;
            }
        }
        let per = (r * c / channels) as u64;
        let inv_n = 1.0 / samples.len() as f64;
        for (ch, a) in acc.into_iter().enumerate() {
            let sum = a * inv_n;
            rows.push(GroupFisherRow {
                task: task.clone(),
                kind: GroupKind::Mlp,
                block: None,
                tensor: Some(t.name.clone()),
                layer: None,
                head: None,
                channel: Some(ch),
                numel: per,
                fisher_sum: sum,
                fisher_mean: sum / per as f64,
                importance: 0.0,
            });
        }
    }
    let tot: f64 = rows.iter().map(|r| r.fisher_sum).sum();
    if tot > 0.0 {
        for r in &mut rows {
            r.importance = r.fisher_sum / tot;
        }
    }
    Ok((rows, reads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_largest_with_index_ties() {
        let v = [0.1, 0.5, 0.5, 0.2];
        assert_eq!(keep_mask(&v, 0.5), vec![false, true, true, false]);
        assert_eq!(keep_mask(&v, 0.75), vec![false, true, false, false]);
        assert_eq!(keep_mask(&v, 1.0), vec![false; 4]);
        assert_eq!(keep_mask(&v, 0.0), vec![true; 4]);
    }

    #[test]
    fn overlap_counts() {
        let sp = [0.5];
        let mut acc = PhaseAcc::new(&sp);
        let add = |acc: &mut PhaseAcc, head, fa: &[f64], fb: &[f64]| {
            let th = |v: &[f64]| {
                let keep = kept_count(v.len(), 0.5);
                let at = select::Ranker::new(v).at_ranks(&[select::keep_rank(v.len(), keep)]);
                vec![Some(Threshold::new(keep, at[0]))]
            };
            acc.add(SlicePhase::new(
                (Block::Q, 0, head),
                &sp,
                fa,
                fb,
                &th(fa),
                &th(fb),
            ));
        };
        add(&mut acc, 0, &[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]);
        add(&mut acc, 1, &[1.0, 1.0, 1.0, 1.0], &[2.0, 2.0, 2.0, 2.0]);
        let a = TaskName::new("a").unwrap();
        let b = TaskName::new("b").unwrap();
        let (rows, masks, overlap) = acc.finish(&a, &b);
        assert_eq!(rows.len(), 4);
        assert!((rows[0].importance - 10.0 / 14.0).abs() < 1e-12);
        assert_eq!(masks.len(), 4);
        // Slice 0: A keeps {2,3}, B keeps {0,1}: disjoint.
        let s0 = overlap
            .iter()
            .find(|o| o.level == MaskLevel::Element && o.head == Some(0))
            .unwrap();
        assert_eq!((s0.intersection, s0.union, s0.iou), (0, 4, Some(0.0)));
        // Slice 1: both keep {0,1}.
        let s1 = overlap
            .iter()
            .find(|o| o.level == MaskLevel::Element && o.head == Some(1))
            .unwrap();
        assert_eq!((s1.intersection, s1.iou), (2, Some(1.0)));
        assert!((s1.fisher_cosine.unwrap() - 1.0).abs() < 1e-12);
        let tot = overlap
            .iter()
            .find(|o| o.level == MaskLevel::Element && o.block.is_none())
            .unwrap();
        assert_eq!((tot.numel, tot.intersection, tot.union), (8, 2, 6));
        // Group level: A sums (10, 4) keeps group 0; B sums (10, 8) keeps group 0.
        let g = overlap
            .iter()
            .find(|o| o.level == MaskLevel::Group)
            .unwrap();
        assert_eq!((g.numel, g.intersection, g.iou), (2, 1, Some(1.0)));
    }
}
