//! Running Fisher statistics of a store, per task (docs/format.md, "Statistics").
//!
//! For every committed sample i the collector records a vector of per-sample
//! sums s_i of C_i = g_i²/T_i:
//! - one entry per attention frame (layer, block, head): the sum of C_i over the
//!   slice's d·D elements;
//! - one entry per output channel of each other stored 2-D tensor (MLP): the
//!   sum of C_i over that channel's row (out_axis 0) or column (out_axis 1).
//!
//! The group Fisher is the sum over the group's elements of E[C] = the mean of
//! s_i over the task's samples, so Welford mean and M2 of s_i give it with its
//! spread. (E[g])² is never formed.
//!
//! Crash safety: the per-sample vectors go to an append-only, checksummed side
//! log (`stats/samples.bin`), written before the sample is handed to the store
//! writer. The per-task files `stats/<task>.json` are always *rebuilt* from the
//! committed samples of the store (in store order): the side-log record of a
//! sample when there is one, else the sums recomputed from the sample's stored
//! frames. A sample that never committed is therefore never counted, and one
//! that committed is counted exactly once, whatever was killed when.
//! C is computed from g *as stored* (bf16-rounded in a bf16 store), so the
//! two sources agree bit for bit.


use std::path::{Path, PathBuf};

use gradshard_core::{DType, OtherTensor, TaskName};
use gradshard_format::LogRecord;
use gradshard_index::{FrameKey, FrameOrder};

use crate::error::Result;
use crate::Store;

mod check;
pub mod fisher;
mod rebuild;
mod salvage;
mod sidelog;
mod task;

pub use check::{check_files, check_side_log, StatsCheck};
pub(crate) use check::check_store;
pub use fisher::{fisher_file, write_full_fisher};
pub use rebuild::{
    accumulate_store, load_or_compute, rebuild, RebuildReport, StoreAccum, TaskAccum,
};
pub use salvage::salvage_stats;
pub use sidelog::{ids_digest, SideLog, SideLogTail};
pub use task::{ChannelStat, GroupStat, TaskStats, QUANTITY};

/// Folder of the statistics inside a store.
pub const STATS_DIR: &str = "stats";
/// Per-sample sums, append-only.
pub const SIDE_LOG: &str = "samples.bin";
const SIDE_MAGIC: &[u8; 8] = b"GSSTATS1";
const SIDE_HEADER_LEN: u64 = 16;
/// Version of `stats/<task>.json` (2: carries a checksum of its content).
pub const STATS_VERSION: u32 = 2;

pub fn stats_dir(store: &Path) -> PathBuf {
    store.join(STATS_DIR)
}

/// `stats/<task>.json`.
pub fn task_stats_path(store: &Path, task: &TaskName) -> PathBuf {
    stats_dir(store).join(format!("{task}.json"))
}

/// `stats/<task>.fisher.safetensors`.
pub fn full_fisher_path(store: &Path, task: &TaskName) -> PathBuf {
    stats_dir(store).join(format!("{task}.fisher.safetensors"))
}

/// `Σ v²` in f64, each `v` first rounded to bf16 when `bf16` (as a bf16 store holds
/// it). Eight interleaved partial sums (lane `l` takes the elements at `l mod 8`),
/// added pairwise at the end: a fixed order, so the collector and the recomputation
/// from stored frames get the same bits, and one the compiler vectorises (a single
/// running sum is one dependent f64 add per element: the statistics of a full sample
/// were ~10 % of a batched collect, almost all of it that chain).
pub fn sum_sq(values: &[f32], bf16: bool) -> f64 {
    #[inline(always)]
    fn body<const BF16: bool>(values: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = values.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let v = if BF16 { round_bf16(v) } else { v } as f64;
                *a += v * v;
            }
        }
        for (a, &v) in acc.iter_mut().zip(rest) {
            let v = if BF16 { round_bf16(v) } else { v } as f64;
            *a += v * v;
        }
        ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<const BF16: bool>(values: &[f32]) -> f64 {
            body::<BF16>(values)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe {
                if bf16 {
                    avx2::<true>(values)
                } else {
                    avx2::<false>(values)
                }
            };
        }
    }
    if bf16 {
        body::<true>(values)
    } else {
        body::<false>(values)
    }
}

/// `v` rounded to the nearest bf16 (ties to even), as f32: the same value as
/// `bf16_bits_to_f32(f32_to_bf16_bits(v))` for every input but NaN (which stays a
/// NaN), with no branch but one select, so that loops over it vectorise.
#[inline(always)]
fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    if v.is_nan() {
        v
    } else {
        r
    }
}

/// Where each per-sample sum lives in the stats vector of a store.
#[derive(Debug, Clone)]
pub struct StatsLayout {
    order: FrameOrder,
    dtype: DType,
    n_attn: usize,
    /// First entry of each other tensor's channels.
    chan_base: Vec<usize>,
    len: usize,
}

fn channels(t: &OtherTensor) -> usize {
    t.shape[usize::from(t.out_axis)]
}

impl StatsLayout {
    pub fn new(order: &FrameOrder, dtype: DType) -> StatsLayout {
        let n_attn = order.n_attn_frames();
        let mut chan_base = Vec::with_capacity(order.others().len());
        let mut len = n_attn;
        for t in order.others() {
            chan_base.push(len);
            len += channels(t);
        }
        StatsLayout {
            order: order.clone(),
            dtype,
            n_attn,
            chan_base,
            len,
        }
    }

    /// Entries per sample.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn order(&self) -> &FrameOrder {
        &self.order
    }

    /// The store's value type (the sums take g rounded to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Σ g² of an attention frame's values (what [`Self::accumulate`] adds for it).
    pub fn attn_sum(&self, values: &[f32]) -> f64 {
        sum_sq(values, self.dtype == DType::Bf16)
    }

    /// Adds Σ g² of frame `frame` (values in canonical order, f32) into `sums`,
    /// with g rounded to the store's dtype first. Call [`Self::finish_sample`] after
    /// the sample's last frame.
    pub fn accumulate(&self, frame: usize, values: &[f32], sums: &mut [f64]) {
        let bf16 = self.dtype == DType::Bf16;
        let sq = |v: f32| {
            let v = if bf16 { round_bf16(v) } else { v } as f64;
            v * v
        };
        match self.order.key(frame) {
            Some(FrameKey::Attn { .. }) => {
                sums[frame] += self.attn_sum(values);
            }
            Some(FrameKey::Other { tensor, group }) => {
                let t = &self.order.others()[tensor];
                let base = self.chan_base[tensor];
                let (a, _) = t.group_rows(group);
                let cols = t.shape[1];
                for (r, row) in values.chunks_exact(cols).enumerate() {
                    if t.out_axis == 0 {
                        sums[base + a + r] += sum_sq(row, bf16);
                    } else {
                        for (c, v) in row.iter().enumerate() {
                            sums[base + c] += sq(*v);
                        }
                    }
                }
            }
            None => {}
        }
    }

    /// Adds Σ g² of frame `frame` of a factored sample, g = Pᵀ S, into `sums` without
    /// forming g: `p` (`n × r`) and `s` (`n × c`) are the factors as stored (already
    /// rounded to the store's dtype), `gram_s` = S Sᵀ. Attention frames take
    /// Σ (P Pᵀ) ∘ (S Sᵀ); row groups per output channel `p_iᵀ (S Sᵀ) p_i` (`[out, in]`)
    /// or `s_cᵀ (P Pᵀ) s_c` (Conv1D `[in, out]`, channels are columns).
    pub fn accumulate_factored(
        &self,
        frame: usize,
        p: &[f32],
        s: &[f32],
        n: usize,
        gram_s: &[f64],
        sums: &mut [f64],
    ) {
        self.factored_terms(frame, p, s, n, gram_s).add_to(sums);
    }

    /// What [`StatsLayout::accumulate_factored`] adds, without adding it: the frames of
    /// one sample can be computed in parallel and added in frame order afterwards (the
    /// same sums, bit for bit, as adding them one by one).
    pub fn factored_terms(
        &self,
        frame: usize,
        p: &[f32],
        s: &[f32],
        n: usize,
        gram_s: &[f64],
    ) -> FactoredTerms {
        use gradshard_core::factor::{frob2_from_grams, gram, row_sums_sq};
        let Some((_, r, c)) = self.order.factor_of(frame) else {
            return FactoredTerms {
                start: 0,
                values: vec![],
            };
        };
        match self.order.key(frame) {
            Some(FrameKey::Attn { .. }) => FactoredTerms {
                start: frame,
                values: vec![frob2_from_grams(&gram(p, n, r), gram_s)],
            },
            Some(FrameKey::Other { tensor, group }) => {
                let t = &self.order.others()[tensor];
                let base = self.chan_base[tensor];
                if t.out_axis == 0 {
                    let (a, _) = t.group_rows(group);
                    let mut rows = vec![0f64; r];
                    row_sums_sq(p, n, r, gram_s, &mut rows);
                    FactoredTerms {
                        start: base + a,
                        values: rows,
                    }
                } else {
                    let mut cols = vec![0f64; c];
                    row_sums_sq(s, n, c, &gram(p, n, r), &mut cols);
                    FactoredTerms {
                        start: base,
                        values: cols,
                    }
                }
            }
            None => FactoredTerms {
                start: 0,
                values: vec![],
            },
        }
    }

    /// Σ g² → Σ g²/T.
    pub fn finish_sample(&self, sums: &mut [f64], tokens: u32) {
        let t = f64::from(tokens);
        for s in sums.iter_mut() {
            *s /= t;
        }
    }

    /// The sums of a committed sample, recomputed from its stored frames.
    pub fn from_store(&self, store: &Store, rec: &LogRecord) -> Result<Vec<f64>> {
        let mut sums = vec![0f64; self.len];
        let factored = store.is_factored(rec)?;
        // S Sᵀ of each shared factor, formed once per sample.
        let mut grams: Vec<Option<Vec<f64>>> = vec![None; self.order.n_shared()];
        for f in 0..self.order.n_frames() {
            if factored {
                let (j, pf, sf) = store.read_frame_factors(rec, f)?;
                let gs = grams[j].get_or_insert_with(|| {
                    let c = self.order.shared()[j].cols;
                    gradshard_core::factor::gram(&sf.values, sf.rows, c)
                });
                self.accumulate_factored(f, &pf.values, &sf.values, pf.rows, gs, &mut sums);
            } else {
                let v = store.read_frame(rec, f)?;
                self.accumulate(f, &v, &mut sums);
            }
        }
        self.finish_sample(&mut sums, rec.tokens);
        Ok(sums)
    }
}

/// Welford mean and M2 of a vector-valued sample, merged by Chan's formula.
#[derive(Debug, Clone, PartialEq)]
pub struct Welford {
    pub n: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Welford {
    pub fn new(len: usize) -> Welford {
        Welford {
            n: 0,
            mean: vec![0.0; len],
            m2: vec![0.0; len],
        }
    }

    pub fn push(&mut self, x: &[f64]) {
        self.n += 1;
        let n = self.n as f64;
        for ((m, m2), x) in self.mean.iter_mut().zip(&mut self.m2).zip(x) {
            let d = x - *m;
            *m += d / n;
            *m2 += d * (x - *m);
        }
    }

    /// Chan et al.: combines two disjoint sets of samples.
    pub fn merge(&mut self, o: &Welford) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = o.clone();
            return;
        }
        let (na, nb) = (self.n as f64, o.n as f64);
        let n = na + nb;
        for i in 0..self.mean.len() {
            let d = o.mean[i] - self.mean[i];
            self.mean[i] += d * nb / n;
            self.m2[i] += o.m2[i] + d * d * na * nb / n;
        }
        self.n += o.n;
    }
}

/// Squared sums of one factored frame, for the sums entries `start..start + len`
/// ([`StatsLayout::factored_terms`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FactoredTerms {
    start: usize,
    values: Vec<f64>,
}

impl FactoredTerms {
    /// Adds the terms into `sums`.
    pub fn add_to(&self, sums: &mut [f64]) {
        for (s, v) in sums[self.start..].iter_mut().zip(&self.values) {
            *s += v;
        }
    }
}

#[cfg(test)]
mod tests;
