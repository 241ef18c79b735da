//! After each slice and after the pass: the streaming top-k of each block (with the
//! X/Y rows its permutation test needs), then the top pairs' permutation p-values and
//! Benjamini–Hochberg q-values.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::Engine;
use crate::backend::{Role, Tile};
use crate::error::Result;
use crate::result::TopPair;
use crate::slice::SliceId;
use crate::stats;

/// X_i and Y_j rows of one pair over the whole slice (shared between pairs).
pub(super) type RowPair = (Arc<[f32]>, Arc<[f32]>);
/// Rows by scored-sample position.
pub(super) type RowMap = HashMap<usize, Arc<[f32]>>;

/// A top-pair candidate with the X/Y rows kept for its permutation test.
pub(super) struct Entry {
    pub(super) score: f64,
    pub(super) i: usize,
    pub(super) j: usize,
    pub(super) layer: usize,
    pub(super) head: usize,
    pub(super) rows: Option<RowPair>,
}

impl Entry {
    /// Total order: better = larger score, then smaller (i, j, layer, head).
    pub(super) fn better_than(&self, o: &Entry) -> bool {
        match self.score.total_cmp(&o.score) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                (self.i, self.j, self.layer, self.head) < (o.i, o.j, o.layer, o.head)
            }
        }
    }
}

/// Streaming top-k of one block, best first.
pub(super) struct TopK {
    pub(super) k: usize,
    pub(super) entries: Vec<Entry>,
}

impl TopK {
    pub(super) fn admits(&self, e: &Entry) -> bool {
        self.k > 0 && (self.entries.len() < self.k || e.better_than(self.entries.last().unwrap()))
    }
    /// Inserts; returns whether it was kept.
    pub(super) fn push(&mut self, e: Entry) -> bool {
        if !self.admits(&e) {
            return false;
        }
        let pos = self.entries.partition_point(|x| x.better_than(&e));
        self.entries.insert(pos, e);
        self.entries.truncate(self.k);
        true
    }
}

impl Engine<'_> {
    pub(super) fn update_top(&mut self, s: &SliceId, m: &[f64], den: &[f64]) -> Result<()> {
        if self.admit(s, m) {
            self.attach_rows(s, den)?;
        }
        Ok(())
    }

    /// Offers every pair of the slice to its block's top-k; returns whether pairs were
    /// admitted whose X/Y rows the permutation test needs ([`Self::attach_rows`]).
    pub(super) fn admit(&mut self, s: &SliceId, m: &[f64]) -> bool {
        let nb = self.pb.sel_pos.len();
        let keep_rows = self.opts.n_perm > 0;
        let ti = self
            .tops
            .iter()
            .position(|(b, _)| *b == s.block)
            .expect("a TopK per scored block");
        let mut admitted = Vec::new();
        {
            let tk = &mut self.tops[ti].1;
            for (idx, &score) in m.iter().enumerate() {
                let e = Entry {
                    score,
                    i: idx / nb,
                    j: idx % nb,
                    layer: s.layer,
                    head: s.head,
                    rows: None,
                };
                if tk.push(e) {
                    admitted.push((idx / nb, idx % nb));
                }
            }
        }
        keep_rows && !admitted.is_empty()
    }

    /// X_i / Y_j rows (over the whole slice) of this slice's pairs still in the top-k.
    pub(super) fn attach_rows(&mut self, s: &SliceId, den: &[f64]) -> Result<()> {
        let ti = self
            .tops
            .iter()
            .position(|(b, _)| *b == s.block)
            .expect("a TopK per scored block");
        // Pairs of this slice still in the list need their rows.
        let live: Vec<(usize, usize)> = self.tops[ti]
            .1
            .entries
            .iter()
            .filter(|e| e.rows.is_none())
            .map(|e| (e.i, e.j))
            .collect();
        let xs: BTreeSet<usize> = live.iter().map(|p| p.0).collect();
        let ys: BTreeSet<usize> = live.iter().map(|p| p.1).collect();
        let (xrows, yrows): (RowMap, RowMap) =
            if self.nchunks == 1 && (self.host_valid || self.planar) {
                // The buffers still hold the scored rows (compacted) of the whole slice, or
                // the byte planes all its stored rows.
                (
                    self.rows_from_buffer(true, &xs, den)?,
                    self.rows_from_buffer(false, &ys, den)?,
                )
            } else {
                (
                    self.reread_rows(s, true, &xs, den)?,
                    self.reread_rows(s, false, &ys, den)?,
                )
            };
        for e in &mut self.tops[ti].1.entries {
            if e.rows.is_none() {
                e.rows = Some((xrows[&e.i].clone(), yrows[&e.j].clone()));
            }
        }
        Ok(())
    }

    /// Single-chunk slices: X (task A) or Y rows of a few scored samples from the
    /// buffers, which still hold the compacted raw rows of the whole slice.
    pub(super) fn rows_from_buffer(
        &self,
        task_a: bool,
        which: &BTreeSet<usize>,
        den: &[f64],
    ) -> Result<RowMap> {
        let (buf, planes, plan, role) = if task_a {
            (&self.buf_a, &self.planes_a, &self.pa, Role::X)
        } else {
            (&self.buf_b, &self.planes_b, &self.pb, Role::Y)
        };
        // Byte planes hold every stored row; the f32 buffers only the scored rows.
        let (tile, stored) = if self.planar {
            (Tile::Bf16Planes(planes), true)
        } else {
            (Tile::F32(buf), false)
        };
        let s_len = self.s_len;
        let mut rows = vec![0f32; which.len() * s_len];
        for (&q, out) in which.iter().zip(rows.chunks_exact_mut(s_len)) {
            tile.row_f32(if stored { plan.sel_pos[q] } else { q }, s_len, out);
        }
        let inv_t: Vec<f64> = which.iter().map(|&q| plan.sel_inv_t[q]).collect();
        self.backend
            .transform(&mut rows, &inv_t, den, self.opts.variant, role)?;
        Ok(which
            .iter()
            .enumerate()
            .map(|(r, &q)| (q, Arc::from(&rows[r * s_len..(r + 1) * s_len])))
            .collect())
    }

    /// Chunked slices only: reads whole-slice rows of a few scored samples again
    /// and transforms them, for the permutation test of newly admitted pairs.
    pub(super) fn reread_rows(
        &mut self,
        s: &SliceId,
        task_a: bool,
        which: &BTreeSet<usize>,
        den: &[f64],
    ) -> Result<RowMap> {
        let plan = if task_a { &self.pa } else { &self.pb };
        let idx: Vec<usize> = which
            .iter()
            .map(|&q| plan.stored_index_of_selected(q))
            .collect();
        let inv_t: Vec<f64> = which.iter().map(|&q| plan.sel_inv_t[q]).collect();
        let mut buf = vec![0f32; idx.len() * self.s_len];
        self.source
            .read_tile(&plan.name, &idx, *s, 0..self.s_len, &mut buf)?;
        self.reads.tile_reads += 1;
        self.reads.frame_reads += idx.len() as u64;
        self.reads.frame_rereads += idx.len() as u64;
        let role = if task_a { Role::X } else { Role::Y };
        self.backend
            .transform(&mut buf, &inv_t, den, self.opts.variant, role)?;
        Ok(which
            .iter()
            .enumerate()
            .map(|(r, &q)| (q, Arc::from(&buf[r * self.s_len..(r + 1) * self.s_len])))
            .collect())
    }

    /// Permutation p-values of each block's top pairs, then BH over all of them: the
    /// top-pairs table in block order, then rank.
    pub(super) fn top_pairs(&self) -> Vec<TopPair> {
        let mut top = Vec::new();
        let mut p_all = Vec::new();
        for (block, tk) in &self.tops {
            let mut ps = vec![None; tk.entries.len()];
            if self.opts.n_perm > 0 && !tk.entries.is_empty() {
                let rows: Vec<stats::PairRows<'_>> = tk
                    .entries
                    .iter()
                    .map(|e| {
                        let (x, y) = e.rows.as_ref().expect("rows are kept when n_perm > 0");
                        stats::PairRows { x, y }
                    })
                    .collect();
                let p = stats::permutation_p_values(
                    &rows,
                    self.opts.variant,
                    self.opts.n_perm,
                    self.opts.seed,
                    &[stats::PURPOSE_PERM, block.index() as u64],
                );
                ps = p.into_iter().map(Some).collect();
            }
            for (rank, (e, p)) in tk.entries.iter().zip(ps).enumerate() {
                if let Some(p) = p {
                    p_all.push(p);
                }
                top.push(TopPair {
                    block: *block,
                    rank: rank + 1,
                    layer: e.layer,
                    head: e.head,
                    sample_a: self.pa.all[self.pa.stored_index_of_selected(e.i)].0.clone(),
                    sample_b: self.pb.all[self.pb.stored_index_of_selected(e.j)].0.clone(),
                    index_a: self.pa.stored_index_of_selected(e.i),
                    index_b: self.pb.stored_index_of_selected(e.j),
                    score: e.score,
                    p_value: p,
                    q_value: None,
                });
            }
        }
        let q_all = stats::bh_q_values(&p_all);
        let mut qi = q_all.into_iter();
        for t in &mut top {
            if t.p_value.is_some() {
                t.q_value = qi.next();
            }
        }
        top
    }
}
