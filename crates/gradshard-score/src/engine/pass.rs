//! The pass over the slices: reading tiles (on a reader thread ahead of the compute, or
//! several whole slices at once on the worker pool), the Fisher, denominator and M of
//! each slice on the backend, and handing each finished slice to the statistics.

use gradshard_core::TaskName;

use super::plan::TaskPlan;
use super::{Engine, ScoreProgress};
use crate::backend::{check_len, Backend, FusedOut, FusedSlice, Tile};
use crate::error::{Error, Result};
use crate::options::{Aggregate, ScoreOptions};
use crate::post::{FisherVec, PostCtx, PostItem, PostJob, SliceStats};
use crate::select::lower_median;
use crate::slice::SliceId;
use crate::source::{TileForm, TileSource};

/// The pass over the slices; returns (tile compute seconds, seconds waiting for reads).
/// With `overlap`, a reader thread reads tile t+1 while tile t is computed.
pub(super) fn run_pass(
    eng: &mut Engine<'_>,
    slices: &[SliceId],
    overlap: bool,
    progress: &mut dyn FnMut(ScoreProgress),
) -> Result<(f64, f64)> {
    let total = slices.len();
    let (source, s_len, backend) = (eng.source, eng.s_len, eng.backend);
    // A device backend builds a factored store's tiles from their factors on the device
    // (the fused path, whole slices): the host buffers then only key the device tiles.
    let factors = backend.wants_factors()
        && source.form() == TileForm::Factors
        && eng.nchunks == 1
        && eng.opts.lam_rel == 0.0
        && !eng.opts.conflicts
        && backend.supports_fused();
    let (mut compute_s, mut wait_s) = (0.0, 0.0);
    if overlap {
        let (ra, rb) = (
            (eng.pa.name.clone(), eng.pa.rows.clone()),
            (eng.pb.name.clone(), eng.pb.rows.clone()),
        );
        std::thread::scope(|sc| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Prefetched>>(0);
            let (ret_tx, ret_rx) = std::sync::mpsc::channel::<(Vec<f32>, Vec<f32>)>();
            sc.spawn(move || {
                for (i, s) in slices.iter().enumerate() {
                    // Two buffer sets in all: the third tile reuses the first one's.
                    let (mut a, mut b) = if i < 2 {
                        (Vec::new(), Vec::new())
                    } else {
                        match ret_rx.recv() {
                            Ok(v) => v,
                            Err(_) => return,
                        }
                    };
                    let t0 = std::time::Instant::now();
                    let (r, t1) = if factors {
                        read_factor_tiles(source, backend, [(&ra, &mut a), (&rb, &mut b)], s, s_len)
                    } else {
                        let r = read_whole_tile(source, (&ra.0, &ra.1), s, s_len, &mut a).and_then(
                            |()| read_whole_tile(source, (&rb.0, &rb.1), s, s_len, &mut b),
                        );
                        let t1 = std::time::Instant::now();
                        // A device backend starts the host → device copies here.
                        let r = r
                            .and_then(|()| backend.prefetch(&a, ra.1.len(), s_len))
                            .and_then(|()| backend.prefetch(&b, rb.1.len(), s_len));
                        (r, t1)
                    };
                    let failed = r.is_err();
                    let msg = r.map(|()| Prefetched {
                        a,
                        b,
                        host_valid: !factors,
                        read_s: (t1 - t0).as_secs_f64(),
                        prefetch_s: t1.elapsed().as_secs_f64(),
                    });
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            });
            for (done, s) in slices.iter().enumerate() {
                let t0 = std::time::Instant::now();
                let got = rx.recv().map_err(|_| Error::Backend {
                    backend: "engine",
                    message: "the tile reader thread stopped".into(),
                })??;
                wait_s += t0.elapsed().as_secs_f64();
                eng.read_s += got.read_s;
                eng.prefetch_s += got.prefetch_s;
                eng.preloaded = Some((got.a, got.b, got.host_valid));
                let t1 = std::time::Instant::now();
                eng.slice(s)?;
                compute_s += t1.elapsed().as_secs_f64();
                progress(ScoreProgress::Slice {
                    done: done + 1,
                    total,
                    block: s.block,
                    layer: s.layer,
                    head: s.head,
                });
                let _ = ret_tx.send((
                    std::mem::take(&mut eng.buf_a),
                    std::mem::take(&mut eng.buf_b),
                ));
            }
            Ok(())
        })?;
    } else {
        for (done, s) in slices.iter().enumerate() {
            let (t0, r0) = (std::time::Instant::now(), eng.read_s);
            eng.slice(s)?;
            let dt = t0.elapsed().as_secs_f64();
            wait_s += eng.read_s - r0;
            compute_s += dt - (eng.read_s - r0);
            progress(ScoreProgress::Slice {
                done: done + 1,
                total,
                block: s.block,
                layer: s.layer,
                head: s.head,
            });
        }
    }
    Ok((compute_s, wait_s))
}

/// The pass with `at_once` whole slices read and scored at a time on the rayon pool,
/// one slice per task (see `score_impl`). Slices are finished (top-k, statistics
/// queue) on this thread in their order, so results are those of [`run_pass`].
pub(super) fn run_pass_concurrent(
    eng: &mut Engine<'_>,
    slices: &[SliceId],
    at_once: usize,
    ctx: &PostCtx<'_>,
    progress: &mut dyn FnMut(ScoreProgress),
) -> Result<(f64, f64)> {
    use rayon::prelude::*;
    let total = slices.len();
    // A bf16 store's slices are read as byte planes when the backend takes them.
    let planar = eng.source.form() == TileForm::Bf16Planes && eng.backend.takes_bf16_planes();
    let fresh = || {
        if planar {
            HostTile::Planes(Vec::new())
        } else {
            HostTile::F32(Vec::new())
        }
    };
    // Tile buffers come back here after each slice is finished and are reused.
    let mut spare: Vec<(HostTile, HostTile)> = Vec::with_capacity(at_once);
    let mut compute_s = 0.0;
    let mut done = 0;
    for win in slices.chunks(at_once) {
        let bufs: Vec<(HostTile, HostTile)> = (0..win.len())
            .map(|_| spare.pop().unwrap_or_else(|| (fresh(), fresh())))
            .collect();
        let (source, backend, opts, s_len) = (eng.source, eng.backend, eng.opts, eng.s_len);
        let (pa, pb) = (&eng.pa, &eng.pb);
        let scored: Vec<Result<Scored>> = win
            .par_iter()
            .zip(bufs.into_par_iter())
            .map(|(s, ab)| read_and_score(source, backend, opts, [pa, pb], s, s_len, ab, ctx))
            .collect();
        for (s, r) in win.iter().zip(scored) {
            let sc = r?;
            let t = std::time::Instant::now();
            eng.read_s += sc.read_s;
            eng.stats_s += sc.stats_s;
            match (sc.a, sc.b) {
                (HostTile::F32(a), HostTile::F32(b)) => {
                    (eng.buf_a, eng.buf_b) = (a, b);
                    (eng.planar, eng.host_valid) = (false, true);
                }
                (HostTile::Planes(a), HostTile::Planes(b)) => {
                    (eng.planes_a, eng.planes_b) = (a, b);
                    (eng.planar, eng.host_valid) = (true, false);
                }
                _ => unreachable!("both tasks' tiles are read alike"),
            }
            for rows in [eng.pa.rows.len(), eng.pb.rows.len()] {
                eng.reads.tile_reads += 1;
                eng.reads.frame_reads += rows as u64;
            }
            eng.finish_fused(s, sc.out, sc.stats)?;
            compute_s += sc.compute_s + t.elapsed().as_secs_f64();
            done += 1;
            progress(ScoreProgress::Slice {
                done,
                total,
                block: s.block,
                layer: s.layer,
                head: s.head,
            });
            spare.push(if eng.planar {
                (
                    HostTile::Planes(std::mem::take(&mut eng.planes_a)),
                    HostTile::Planes(std::mem::take(&mut eng.planes_b)),
                )
            } else {
                (
                    HostTile::F32(std::mem::take(&mut eng.buf_a)),
                    HostTile::F32(std::mem::take(&mut eng.buf_b)),
                )
            });
        }
    }
    Ok((compute_s, 0.0))
}

/// A slice read and scored by a worker of [`run_pass_concurrent`]: its tiles (for the
/// finishing steps on the engine's thread), the fused result and the seconds of each.
pub(super) struct Scored {
    pub(super) a: HostTile,
    pub(super) b: HostTile,
    pub(super) out: FusedOut,
    /// The slice's statistics, computed while its Fishers were in this worker's caches
    /// (`None` when a non-finite Fisher or M leaves the error to the engine thread).
    pub(super) stats: Option<SliceStats>,
    pub(super) read_s: f64,
    /// Seconds of the fused path, and of the statistics.
    pub(super) compute_s: f64,
    pub(super) stats_s: f64,
}

/// A worker's tile buffer: f32 values, or a bf16 store's byte planes.
pub(super) enum HostTile {
    F32(Vec<f32>),
    Planes(Vec<u8>),
}

impl HostTile {
    pub(super) fn tile(&self) -> Tile<'_> {
        match self {
            HostTile::F32(v) => Tile::F32(v),
            HostTile::Planes(p) => Tile::Bf16Planes(p),
        }
    }
}

/// Reads both tasks' whole tiles of slice `s` into the given buffers, scores them on
/// the backend's fused path and computes the slice's statistics.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_and_score(
    source: &dyn TileSource,
    backend: &dyn Backend,
    opts: &ScoreOptions,
    [pa, pb]: [&TaskPlan; 2],
    s: &SliceId,
    s_len: usize,
    (mut a, mut b): (HostTile, HostTile),
    ctx: &PostCtx<'_>,
) -> Result<Scored> {
    let t0 = std::time::Instant::now();
    for (plan, buf) in [(pa, &mut a), (pb, &mut b)] {
        let rows = plan.rows.len();
        match buf {
            HostTile::F32(v) => read_whole_tile(source, (&plan.name, &plan.rows), s, s_len, v)?,
            HostTile::Planes(p) => {
                p.resize(rows * 2 * s_len, 0);
                source.read_tile_bf16_planes(&plan.name, &plan.rows, *s, p)?;
            }
        }
    }
    let t1 = std::time::Instant::now();
    let mut out = backend.fused_slice(&fused_args(opts, [pa, pb], a.tile(), b.tile(), s_len))?;
    scale_m(opts.aggregate, s_len, &mut out.m);
    let t2 = std::time::Instant::now();
    let mut stats = None;
    // A non-finite Fisher or M is left to the engine thread, which names it.
    if out.fisher_finite && out.m.iter().all(|v| v.is_finite()) {
        let (fa, fb) = ((out.fa)()?, (out.fb)()?);
        stats = Some(ctx.stats(s, &fa, &fb, &out.m, opts.lam)?);
        out.fa = Box::new(move || Ok(fa));
        out.fb = Box::new(move || Ok(fb));
    }
    Ok(Scored {
        a,
        b,
        out,
        stats,
        read_s: (t1 - t0).as_secs_f64(),
        compute_s: (t2 - t1).as_secs_f64(),
        stats_s: t2.elapsed().as_secs_f64(),
    })
}

/// `Aggregate::Mean` divides each pair's sum by the slice's size.
pub(super) fn scale_m(aggregate: Aggregate, s_len: usize, m: &mut [f64]) {
    if aggregate == Aggregate::Mean {
        let inv = 1.0 / s_len as f64;
        m.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The arguments of [`Backend::fused_slice`] for whole-slice tiles `a` and `b`.
pub(super) fn fused_args<'a>(
    opts: &ScoreOptions,
    [pa, pb]: [&'a TaskPlan; 2],
    a: Tile<'a>,
    b: Tile<'a>,
    s_len: usize,
) -> FusedSlice<'a> {
    FusedSlice {
        a,
        a_inv_t: &pa.rows_inv_t,
        a_sel: &pa.sel_pos,
        a_sel_inv_t: &pa.sel_inv_t,
        b,
        b_inv_t: &pb.rows_inv_t,
        b_sel: &pb.sel_pos,
        b_sel_inv_t: &pb.sel_inv_t,
        width: s_len,
        variant: opts.variant,
        pool: opts.fisher_pool,
        eps: opts.eps,
        lam: opts.lam,
    }
}
/// Whole-slice tiles of both tasks read ahead by the reader thread.
pub(super) struct Prefetched {
    pub(super) a: Vec<f32>,
    pub(super) b: Vec<f32>,
    /// False when the tiles were formed on the device from factors (see `Engine::preloaded`).
    pub(super) host_valid: bool,
    pub(super) read_s: f64,
    /// Seconds in [`Backend::prefetch`] (host → device copies of a device backend).
    pub(super) prefetch_s: f64,
}

/// A task and the stored-order indices of the rows it reads.
pub(super) type TaskRows = (TaskName, Vec<usize>);

/// Reads slice `s` of both tasks as factors and has the backend form the tiles on its
/// device, filed under the host buffers (sized `rows × s_len`, left unread: a fresh
/// zeroed allocation costs no memory until touched). Returns when the reads ended.
pub(super) fn read_factor_tiles(
    source: &dyn TileSource,
    backend: &dyn Backend,
    tasks: [(&TaskRows, &mut Vec<f32>); 2],
    s: &SliceId,
    s_len: usize,
) -> (Result<()>, std::time::Instant) {
    let mut tiles = Vec::with_capacity(2);
    for ((name, rows), _) in &tasks {
        match source.read_factor_tile(name, rows, *s) {
            Ok(t) => tiles.push(t),
            Err(e) => return (Err(e), std::time::Instant::now()),
        }
    }
    let t1 = std::time::Instant::now();
    let r = tasks
        .into_iter()
        .zip(&tiles)
        .try_for_each(|(((_, rows), buf), t)| {
            if buf.len() != rows.len() * s_len {
                *buf = vec![0f32; rows.len() * s_len];
            }
            backend.prefetch_factors(buf, t, rows.len(), s_len)
        });
    (r, t1)
}

/// Reads all columns of slice `s` for the rows of one task into `buf`.
pub(super) fn read_whole_tile(
    source: &dyn TileSource,
    (name, rows): (&TaskName, &[usize]),
    s: &SliceId,
    s_len: usize,
    buf: &mut Vec<f32>,
) -> Result<()> {
    buf.resize(rows.len() * s_len, 0.0);
    source.read_tile(name, rows, *s, 0..s_len, buf)
}

impl Engine<'_> {
    /// Reads columns `c0..c1` of the slice for both tasks into the buffers (or takes
    /// the reader thread's tiles), counting the reads.
    pub(super) fn fetch_chunk(
        &mut self,
        s: &SliceId,
        c0: usize,
        c1: usize,
        reread: bool,
    ) -> Result<()> {
        let w = c1 - c0;
        // The reader thread's tiles, when it read this (whole) slice ahead.
        let pre = if c0 == 0 && c1 == self.s_len {
            self.preloaded.take()
        } else {
            None
        };
        self.host_valid = pre.as_ref().is_none_or(|p| p.2);
        let (mut pre_a, mut pre_b) = match pre {
            Some((a, b, _)) => (Some(a), Some(b)),
            None => (None, None),
        };
        for (plan, buf, pre) in [
            (&self.pa, &mut self.buf_a, &mut pre_a),
            (&self.pb, &mut self.buf_b, &mut pre_b),
        ] {
            if let Some(p) = pre.take() {
                *buf = p;
            } else {
                buf.resize(plan.rows.len() * w, 0.0);
                let t0 = std::time::Instant::now();
                self.source
                    .read_tile(&plan.name, &plan.rows, *s, c0..c1, buf)?;
                self.read_s += t0.elapsed().as_secs_f64();
            }
            self.reads.tile_reads += 1;
            self.reads.frame_reads += plan.rows.len() as u64;
            if reread {
                self.reads.frame_rereads += plan.rows.len() as u64;
            }
        }
        Ok(())
    }

    /// Reads columns `c0..c1` of the slice for both tasks into the buffers and
    /// completes those columns of the Fisher vectors (checking every value is finite).
    pub(super) fn load_chunk(
        &mut self,
        s: &SliceId,
        c0: usize,
        c1: usize,
        reread: bool,
        fa: &mut [f64],
        fb: &mut [f64],
    ) -> Result<()> {
        let w = c1 - c0;
        self.fetch_chunk(s, c0, c1, reread)?;
        for (plan, buf, f) in [
            (&self.pa, &self.buf_a, &mut fa[c0..c1]),
            (&self.pb, &self.buf_b, &mut fb[c0..c1]),
        ] {
            if let Some((r, k)) = self.backend.column_fisher(buf, &plan.rows_inv_t, w, f)? {
                return Err(Error::NonFinite {
                    task: plan.name.to_string(),
                    id: plan.all[plan.rows[r]].0.clone(),
                    layer: s.layer,
                    block: s.block,
                    head: s.head,
                    element: c0 + k,
                    value: buf[r * w + k],
                });
            }
        }
        Ok(())
    }

    /// `den[k] = max(I_pool[k], eps) + lam` (docs/design.md §4).
    pub(super) fn den_value(&self, fa: &[f64], fb: &[f64], k: usize, lam: f64) -> f64 {
        self.opts.fisher_pool.den(fa[k], fb[k], self.opts.eps, lam)
    }

    pub(super) fn slice(&mut self, s: &SliceId) -> Result<()> {
        if self.nchunks == 1
            && self.opts.lam_rel == 0.0
            && !self.opts.conflicts
            && self.backend.supports_fused()
        {
            return self.slice_fused(s);
        }
        let (s_len, width, nchunks) = (self.s_len, self.width, self.nchunks);
        let opts = self.opts;
        let (na, nb) = (self.pa.sel_pos.len(), self.pb.sel_pos.len());
        let mut fa = vec![0f64; s_len];
        let mut fb = vec![0f64; s_len];
        let mut den = vec![0f64; s_len];
        let mut m = vec![0f64; na * nb];
        let chunk = |c: usize| (c * width, ((c + 1) * width).min(s_len));

        // lam* needs the median of the pool Fisher over the whole slice.
        let needs_median = opts.lam_rel > 0.0;
        let mut lam_star: Option<f64> = (!needs_median).then_some(opts.lam);
        // Phase 5: the slice's whitened Gram, its lam* from the Fisher of all samples.
        let mut lam_conf: Option<f64> = (!needs_median).then_some(opts.lam);
        let n_conf = na + nb;
        let mut gram = self.conf.is_some().then(|| vec![0f64; n_conf * n_conf]);
        if needs_median && nchunks > 1 {
            for c in 0..nchunks {
                let (c0, c1) = chunk(c);
                self.load_chunk(s, c0, c1, false, &mut fa, &mut fb)?;
            }
            lam_star = Some(self.lam_star(&fa, &fb));
            lam_conf = Some(self.conflict_lam(&fa, &fb));
        }
        let fisher_pass_done = needs_median && nchunks > 1;
        for c in 0..nchunks {
            let (c0, c1) = chunk(c);
            let w = c1 - c0;
            self.load_chunk(s, c0, c1, fisher_pass_done || c > 0, &mut fa, &mut fb)?;
            let lam = match lam_star {
                Some(l) => l,
                None => {
                    // Single chunk: the Fisher of the whole slice is complete now.
                    let l = self.lam_star(&fa, &fb);
                    lam_star = Some(l);
                    l
                }
            };
            for (k, d) in den.iter_mut().enumerate().take(c1).skip(c0) {
                *d = self.den_value(&fa, &fb, k, lam);
            }
            if let Some(gram) = gram.as_mut() {
                let lc = match lam_conf {
                    Some(l) => l,
                    None => {
                        let l = self.conflict_lam(&fa, &fb);
                        lam_conf = Some(l);
                        l
                    }
                };
                self.gram_chunk(c0, c1, &fa, &fb, lc, gram)?;
            }
            // Keep only the scored rows, in place (sel_pos is ascending, sel_pos[q] ≥ q).
            compact_rows(&mut self.buf_a, &self.pa.sel_pos, w);
            compact_rows(&mut self.buf_b, &self.pb.sel_pos, w);
            self.backend.interference(
                &self.buf_a,
                &self.pa.sel_inv_t,
                &self.buf_b,
                &self.pb.sel_inv_t,
                &den[c0..c1],
                opts.variant,
                &mut m,
            )?;
        }
        let lam = lam_star.expect("set by the first chunk");
        self.finish_m(s, &mut m)?;
        if let (Some(acc), Some(g)) = (self.conf.as_mut(), gram) {
            acc.grams.push((*s, g));
        }

        // Streaming top-k, keeping X_i / Y_j rows of admitted pairs for the permutation
        // test (needs the tiles, so it stays here); the rest needs only I and M.
        self.update_top(s, &m, &den)?;
        self.sink.send(PostItem::Job(PostJob {
            s: *s,
            fa: FisherVec::Ready(fa),
            fb: FisherVec::Ready(fb),
            m,
            lam,
        }))
    }

    /// A whole slice on a backend's fused path: tiles → M with one blocking transfer;
    /// the Fishers stay on the device until the statistics thread (or, for the rows of
    /// newly admitted top pairs, this thread) needs them.
    pub(super) fn slice_fused(&mut self, s: &SliceId) -> Result<()> {
        self.fetch_chunk(s, 0, self.s_len, false)?;
        let mut out = self.backend.fused_slice(&fused_args(
            self.opts,
            [&self.pa, &self.pb],
            Tile::F32(&self.buf_a),
            Tile::F32(&self.buf_b),
            self.s_len,
        ))?;
        scale_m(self.opts.aggregate, self.s_len, &mut out.m);
        self.finish_fused(s, out, None)
    }

    /// The rest of a fused slice once `out` is known (its M already scaled by
    /// [`scale_m`]) and the buffers hold the slice's tiles (or key device tiles when
    /// `host_valid` is false): names a non-finite value, checks M, offers the pairs to the top-k (attaching the rows of
    /// admitted pairs) and queues the slice's statistics.
    pub(super) fn finish_fused(
        &mut self,
        s: &SliceId,
        out: FusedOut,
        stats: Option<SliceStats>,
    ) -> Result<()> {
        let (s_len, opts) = (self.s_len, self.opts);
        let (na, nb) = (self.pa.sel_pos.len(), self.pb.sel_pos.len());
        if !out.fisher_finite {
            // Name the first non-finite value (a Fisher sum that overflowed with finite
            // values has none, and goes on).
            if !self.host_valid {
                for (plan, buf) in [(&self.pa, &mut self.buf_a), (&self.pb, &mut self.buf_b)] {
                    read_whole_tile(self.source, (&plan.name, &plan.rows), s, s_len, buf)?;
                }
                self.host_valid = true;
            }
            for (plan, buf) in [(&self.pa, &self.buf_a), (&self.pb, &self.buf_b)] {
                if let Some(pos) = buf.iter().position(|v| !v.is_finite()) {
                    let (r, k) = (pos / s_len, pos % s_len);
                    return Err(Error::NonFinite {
                        task: plan.name.to_string(),
                        id: plan.all[plan.rows[r]].0.clone(),
                        layer: s.layer,
                        block: s.block,
                        head: s.head,
                        element: k,
                        value: buf[pos],
                    });
                }
            }
        }
        let m = out.m;
        check_len("engine", "fused M", m.len(), na * nb)?;
        let (mut fa, mut fb) = (FisherVec::OnDevice(out.fa), FisherVec::OnDevice(out.fb));
        self.check_m(s, &m)?;
        // The buffers keep the scored rows only, as on the per-step path.
        if self.host_valid {
            compact_rows(&mut self.buf_a, &self.pa.sel_pos, s_len);
            compact_rows(&mut self.buf_b, &self.pb.sel_pos, s_len);
        }
        if self.admit(s, &m) {
            let (va, vb) = (fa.get()?, fb.get()?);
            let den: Vec<f64> = (0..s_len)
                .map(|k| self.den_value(&va, &vb, k, opts.lam))
                .collect();
            self.attach_rows(s, &den)?;
            (fa, fb) = (FisherVec::Ready(va), FisherVec::Ready(vb));
        }
        if let Some(st) = stats {
            return self.sink.send(PostItem::Stats(Box::new(st)));
        }
        self.sink.send(PostItem::Job(PostJob {
            s: *s,
            fa,
            fb,
            m,
            lam: opts.lam,
        }))
    }

    /// Applies `Aggregate::Mean` to a slice's M and checks it is finite.
    pub(super) fn finish_m(&self, s: &SliceId, m: &mut [f64]) -> Result<()> {
        scale_m(self.opts.aggregate, self.s_len, m);
        self.check_m(s, m)
    }

    /// A slice's (scaled) M must be finite.
    pub(super) fn check_m(&self, s: &SliceId, m: &[f64]) -> Result<()> {
        if m.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFiniteScore {
                layer: s.layer,
                block: s.block,
                head: s.head,
            });
        }
        Ok(())
    }

    /// Phase 5's Fisher of column k: the mean of g²/T over every stored sample of both
    /// tasks (weighted by sample), from the two tasks' column Fishers.
    fn fisher_all(&self, fa: &[f64], fb: &[f64], k: usize) -> f64 {
        let (ra, rb) = (self.pa.rows.len() as f64, self.pb.rows.len() as f64);
        (ra * fa[k] + rb * fb[k]) / (ra + rb)
    }

    /// Phase 5's lam*: `max(lam, lam_rel · lower_median(I_all over the slice))` when
    /// `lam_rel > 0`, else `lam` (`fa`, `fb` complete over the slice).
    pub(super) fn conflict_lam(&self, fa: &[f64], fb: &[f64]) -> f64 {
        if self.opts.lam_rel > 0.0 {
            let all: Vec<f64> = (0..self.s_len)
                .map(|k| self.fisher_all(fa, fb, k))
                .collect();
            self.opts.lam.max(self.opts.lam_rel * lower_median(&all))
        } else {
            self.opts.lam
        }
    }

    /// Adds columns `c0..c1` of the slice's whitened Gram of the analysed samples (A's,
    /// then B's) to `gram`: `u_i[k] = g_i[k] / sqrt(max(I_all[k], eps) + lam)`. The
    /// buffers hold every stored row of both tasks for those columns.
    fn gram_chunk(
        &self,
        c0: usize,
        c1: usize,
        fa: &[f64],
        fb: &[f64],
        lam: f64,
        gram: &mut [f64],
    ) -> Result<()> {
        let w = c1 - c0;
        let scale: Vec<f64> = (c0..c1)
            .map(|k| 1.0 / (self.fisher_all(fa, fb, k).max(self.opts.eps) + lam).sqrt())
            .collect();
        let n = self.pa.sel_pos.len() + self.pb.sel_pos.len();
        let mut rows = Vec::with_capacity(n * w);
        for (plan, buf) in [(&self.pa, &self.buf_a), (&self.pb, &self.buf_b)] {
            for &p in &plan.sel_pos {
                rows.extend_from_slice(&buf[p * w..(p + 1) * w]);
            }
        }
        self.backend.whitened_gram(&rows, &scale, gram)
    }

    pub(super) fn lam_star(&self, fa: &[f64], fb: &[f64]) -> f64 {
        if self.opts.lam_rel > 0.0 {
            let pool: Vec<f64> = (0..self.s_len)
                .map(|k| self.opts.fisher_pool.of(fa[k], fb[k]))
                .collect();
            self.opts.lam.max(self.opts.lam_rel * lower_median(&pool))
        } else {
            self.opts.lam
        }
    }
}

/// Moves rows `sel_pos[q]` to position q and truncates (requires ascending `sel_pos`).
pub(super) fn compact_rows(buf: &mut Vec<f32>, sel_pos: &[usize], w: usize) {
    for (q, &p) in sel_pos.iter().enumerate() {
        if p != q {
            buf.copy_within(p * w..(p + 1) * w, q * w);
        }
    }
    buf.truncate(sel_pos.len() * w);
}
