//! After-slice statistics: what the engine derives from a finished slice's Fisher
//! vectors and pair matrix M without the tiles — the heatmap cell and its bootstrap
//! interval, the Fisher diagnostics (min, lower median, max, fraction below eps),
//! phases 2-4 (group sums, element masks, overlap, cosine), and kept pair matrices.
//!
//! None of it feeds the next slice, so when the memory budget allows the engine
//! hands each slice to a second thread (a bounded queue of [`POST_DEPTH`] slices, or
//! two windows of the concurrent pass)
//! and goes on with the next tile: the statistics leave the critical path of
//! read → Fisher → X, Y → M. Slices are processed in order either way, so the
//! result is identical inline or threaded.

use std::collections::HashSet;

use gradshard_core::Block;

use crate::backend::{Backend, Download};
use crate::error::{Error, Result};
use crate::fisher::{kept_count, PhaseAcc, SlicePhase};
use crate::options::{FisherPool, ScoreOptions};
use crate::result::{Cell, PairMatrix, SliceDiagnostics};
use crate::select::{keep_rank, lower_median, OrderStat, Ranker, Threshold};
use crate::slice::SliceId;
use crate::stats;

/// Finished slices that may wait for the statistics thread (at least; the concurrent
/// pass queues two of its windows).
pub(crate) const POST_DEPTH: usize = 2;

/// A task Fisher on the host, or still on the device (downloaded here, on the
/// statistics thread, off the critical path).
pub(crate) enum FisherVec {
    Ready(Vec<f64>),
    OnDevice(Download),
}

impl FisherVec {
    pub fn get(self) -> Result<Vec<f64>> {
        match self {
            FisherVec::Ready(v) => Ok(v),
            FisherVec::OnDevice(d) => d(),
        }
    }
}

/// One finished slice: task Fishers over all stored samples, M (already scaled
/// for `Aggregate::Mean`), and the ridge that was applied.
pub(crate) struct PostJob {
    pub s: SliceId,
    pub fa: FisherVec,
    pub fb: FisherVec,
    pub m: Vec<f64>,
    pub lam: f64,
}

impl PostJob {
    /// Bytes a job holds.
    pub fn bytes(s_len: usize, na: usize, nb: usize) -> usize {
        (2 * s_len + na * nb) * 8
    }
}

/// Accumulates the after-slice statistics of a run.
pub(crate) struct Post<'a> {
    pub ctx: PostCtx<'a>,
    pub cells: Vec<Cell>,
    pub diagnostics: Vec<SliceDiagnostics>,
    pub pairs: Vec<PairMatrix>,
    pub phase: PhaseAcc,
    /// Seconds spent in [`Post::run`].
    pub secs: f64,
}

/// What a slice's statistics need besides the slice itself: shared by every thread
/// that computes them (the statistics thread, or the concurrent pass's workers).
#[derive(Clone, Copy)]
pub(crate) struct PostCtx<'a> {
    pub opts: &'a ScoreOptions,
    pub backend: &'a dyn Backend,
    pub na: usize,
    pub nb: usize,
    /// Stored samples in the denominator Fisher.
    pub n_fisher: usize,
    pub chunks: usize,
    pub pairs_for: &'a HashSet<(Block, usize, usize)>,
}

/// One slice's statistics, computed from its Fishers and M alone (on any thread) and
/// filed in slice order by [`Post::file`].
pub(crate) struct SliceStats {
    cell: Cell,
    diagnostics: SliceDiagnostics,
    phase: Option<SlicePhase>,
    pair: Option<PairMatrix>,
}

impl PostCtx<'_> {
    /// The heatmap cell and its bootstrap interval, the Fisher diagnostics, phases 2-4
    /// and the kept pair matrix of slice `s` (M already scaled; `lam` the ridge used).
    pub fn stats(
        &self,
        s: &SliceId,
        fa: &[f64],
        fb: &[f64],
        m: &[f64],
        lam: f64,
    ) -> Result<SliceStats> {
        let opts = self.opts;
        let (na, nb) = (self.na, self.nb);
        let s_len = fa.len();

        // Heatmap cell and its bootstrap interval.
        let n_pairs = (na * nb) as u64;
        let mean = m.iter().sum::<f64>() / n_pairs as f64;
        let (ci_low, ci_high) = if opts.n_boot > 0 {
            let rng = stats::rng_for(
                opts.seed,
                &[
                    stats::PURPOSE_BOOT,
                    s.block.index() as u64,
                    s.layer as u64,
                    s.head as u64,
                ],
            );
            let (lo, hi) =
                stats::bootstrap_ci(self.backend, m, na, nb, opts.n_boot, opts.ci_level, rng)?;
            (Some(lo), Some(hi))
        } else {
            (None, None)
        };
        let cell = Cell {
            block: s.block,
            layer: s.layer,
            head: s.head,
            score_mean: mean,
            ci_low,
            ci_high,
            n_pairs,
        };

        // Order statistics: the lower median of the denominator Fisher and, for the
        // element masks, each task's threshold per sparsity — one ranking per vector.
        let mid = (s_len - 1) / 2;
        let keeps: Vec<usize> = opts
            .sparsities
            .iter()
            .map(|&sp| kept_count(s_len, sp))
            .collect();
        let ranks = |median: bool| -> Vec<usize> {
            let mut r = Vec::new();
            if opts.group_fisher {
                r.extend(
                    keeps
                        .iter()
                        .filter(|k| **k > 0)
                        .map(|&k| keep_rank(s_len, k)),
                );
            }
            if median {
                r.push(mid);
            }
            r
        };
        let rank = |v: &[f64], median: bool| -> Vec<OrderStat> {
            let r = ranks(median);
            if r.is_empty() {
                Vec::new()
            } else {
                Ranker::new(v).at_ranks(&r)
            }
        };
        let pool_kind = opts.fisher_pool;
        let (sa, sb) = rayon::join(
            || rank(fa, pool_kind == FisherPool::A),
            || rank(fb, pool_kind == FisherPool::B),
        );
        let pooled: Option<Vec<f64>> = (pool_kind == FisherPool::Pooled).then(|| {
            fa.iter()
                .zip(fb)
                .map(|(a, b)| pool_kind.of(*a, *b))
                .collect()
        });
        let (pool, median): (&[f64], f64) = match pool_kind {
            FisherPool::A => (fa, sa.last().expect("median rank").value()),
            FisherPool::B => (fb, sb.last().expect("median rank").value()),
            FisherPool::Pooled => {
                let p = pooled.as_deref().expect("set for Pooled");
                (p, lower_median(p))
            }
        };
        let (mut mn, mut mx, mut below) = (f64::INFINITY, f64::NEG_INFINITY, 0usize);
        for &v in pool {
            mn = mn.min(v);
            mx = mx.max(v);
            below += (v < opts.eps) as usize;
        }
        let diagnostics = SliceDiagnostics {
            block: s.block,
            layer: s.layer,
            head: s.head,
            fisher_min: mn,
            fisher_median: median,
            fisher_max: mx,
            frac_below_eps: below as f64 / s_len as f64,
            lam_applied: lam,
            n_a: na,
            n_b: nb,
            n_fisher: self.n_fisher,
            chunks: self.chunks,
        };

        let phase = opts.group_fisher.then(|| {
            let thresholds = |stats: &[OrderStat]| -> Vec<Option<Threshold>> {
                let mut it = stats.iter();
                keeps
                    .iter()
                    .map(|&k| (k > 0).then(|| Threshold::new(k, *it.next().expect("ranked"))))
                    .collect()
            };
            SlicePhase::new(
                (s.block, s.layer, s.head),
                &opts.sparsities,
                fa,
                fb,
                &thresholds(&sa),
                &thresholds(&sb),
            )
        });
        let pair = self
            .pairs_for
            .contains(&(s.block, s.layer, s.head))
            .then(|| PairMatrix {
                block: s.block,
                layer: s.layer,
                head: s.head,
                n_a: na,
                n_b: nb,
                values: m.to_vec(),
            });
        Ok(SliceStats {
            cell,
            diagnostics,
            phase,
            pair,
        })
    }
}

impl Post<'_> {
    /// Bytes [`Post::run`] allocates beyond its job (a pooled Fisher, key gathers).
    pub fn scratch_bytes(s_len: usize) -> usize {
        2 * s_len * 8
    }

    pub fn run(&mut self, item: PostItem) -> Result<()> {
        let t0 = std::time::Instant::now();
        let r = match item {
            PostItem::Job(job) => self.run_job(job),
            PostItem::Stats(st) => {
                self.file(*st);
                Ok(())
            }
        };
        self.secs += t0.elapsed().as_secs_f64();
        r
    }

    fn run_job(&mut self, job: PostJob) -> Result<()> {
        let PostJob { s, fa, fb, m, lam } = job;
        let (fa, fb) = (fa.get()?, fb.get()?);
        let st = self.ctx.stats(&s, &fa, &fb, &m, lam)?;
        self.file(st);
        Ok(())
    }

    /// Files one slice's statistics (slices in their order).
    pub fn file(&mut self, st: SliceStats) {
        self.cells.push(st.cell);
        self.diagnostics.push(st.diagnostics);
        if let Some(p) = st.phase {
            self.phase.add(p);
        }
        if let Some(p) = st.pair {
            self.pairs.push(p);
        }
    }
}

/// What the statistics thread is handed: a finished slice, or (from the concurrent
/// pass, whose workers compute them while the slice's Fishers are in their caches) a
/// slice's statistics ready to be filed.
pub(crate) enum PostItem {
    Job(PostJob),
    Stats(Box<SliceStats>),
}

/// Where the engine sends finished slices.
pub(crate) enum Sink<'a> {
    /// Statistics computed on the engine's thread.
    Inline(Box<Post<'a>>),
    /// Statistics computed on a second thread; `wait_s` = seconds the engine was
    /// blocked because the queue was full.
    Thread {
        tx: std::sync::mpsc::SyncSender<PostItem>,
        wait_s: f64,
    },
    /// Taken back after the pass.
    Done,
}

impl Sink<'_> {
    pub fn send(&mut self, job: PostItem) -> Result<()> {
        match self {
            Sink::Inline(p) => p.run(job),
            Sink::Thread { tx, wait_s } => {
                let t0 = std::time::Instant::now();
                let r = tx.send(job);
                *wait_s += t0.elapsed().as_secs_f64();
                r.map_err(|_| post_stopped())
            }
            Sink::Done => Err(post_stopped()),
        }
    }
}

/// The engine's error when the statistics thread has stopped (it then holds the
/// real error, which the engine reports instead).
pub(crate) fn post_stopped() -> Error {
    Error::Backend {
        backend: "engine",
        message: "the after-slice statistics thread stopped".into(),
    }
}
