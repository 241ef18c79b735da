//! The tile engine: one pass over the needed slices, slice-major.
//!
//! For each slice S = (layer, block, stored head) the engine reads the tile of
//! every needed sample of task A and of task B (one `read_tile` call per task),
//! forms the task Fishers from those same tiles, the denominator, X and Y, and
//! accumulates `M = X·Yᵀ` on the [`Backend`]. From M it takes the heatmap cell
//! (mean over pairs), its bootstrap interval, the streaming top-k, and the full
//! matrix when asked. Phases 2-4 (group Fisher, masks, overlap, cosine) use the
//! Fisher vectors of the same pass.
//!
//! Memory: a tile of both tasks takes `(rows_A + rows_B) · |S| · 4` bytes. When
//! that exceeds `memory_budget` the slice is split into column chunks: I, X and
//! Y are columnwise, M accumulates over chunks. Each chunk is a separate
//! `read_tile` call (the source decompresses the frame again per chunk, and
//! `ReadStats::frame_rereads` counts it). `lam_rel > 0` needs the lower median
//! of I over the *whole* slice before any X can be formed, so a chunked slice
//! with `lam_rel > 0` first reads all chunks to complete I (a Fisher-only pass)
//! and then reads them again to score: exact, at twice the reads of that slice.
//! A slice that fits the budget (the normal case) is read exactly once.

mod finish;
mod pass;
mod plan;

use gradshard_core::Block;

use crate::backend::{Backend, CpuBackend};
use crate::conflicts::{self, GramAcc};
use crate::error::{Error, Result};
use crate::fisher::{self, PhaseAcc};
use crate::options::{FisherPool, ScoreOptions};
use crate::post::{Post, PostCtx, PostItem, PostJob, Sink, POST_DEPTH};
use crate::result::{ReadStats, ScoreResult};
use crate::source::TileSource;
use finish::TopK;
use pass::{run_pass, run_pass_concurrent};
use plan::{Selection, TaskPlan};

/// Progress events of a run.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ScoreProgress {
    /// The plan: slices to score, bytes per slice tile (both tasks), column chunks per slice.
    Plan {
        slices: usize,
        tile_bytes: usize,
        chunks_per_slice: usize,
    },
    /// One slice finished.
    Slice {
        done: usize,
        total: usize,
        block: Block,
        layer: usize,
        head: usize,
    },
    /// Statistics after the pass (`"permutation"`, `"mlp_fisher"`).
    Stage(&'static str),
    /// Something the user should know that is not an error (e.g. few samples).
    Warning(String),
    /// After the pass over the slices: seconds spent reading tiles (`read_tile`:
    /// I/O, checksum, decompression), computing on them (backend and bookkeeping),
    /// and waiting for a read that the computation could not hide. `overlapped`:
    /// tile t+1 was read on a second thread while tile t was computed.
    ///
    /// `compute_s` is the critical path only (Fisher, denominator, X, Y, M, top-k).
    /// `post_s`: seconds of after-slice statistics (cell and bootstrap, diagnostics,
    /// masks; see `post.rs`), on a second thread when `post_threaded`, where
    /// `post_wait_s` is how long the engine waited for that thread's queue.
    /// `prefetch_s`: seconds the reader thread spent handing tiles to the backend's
    /// `prefetch` (a device backend's host → device copies; 0 on the CPU).
    ///
    /// `slices_at_once > 1`: a host backend read and scored that many slices at a time,
    /// one per worker thread (see `run_pass_concurrent`); `read_s`, `compute_s` and
    /// `post_s` are then summed over the workers (which compute each slice's statistics;
    /// the second thread only files them in order), and `wait_s` is 0.
    Timing {
        read_s: f64,
        prefetch_s: f64,
        compute_s: f64,
        wait_s: f64,
        overlapped: bool,
        slices_at_once: usize,
        post_s: f64,
        post_wait_s: f64,
        post_threaded: bool,
    },
}

/// Scores `opts.task_a` against `opts.task_b` on the CPU backend.
pub fn score(
    source: &dyn TileSource,
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(ScoreProgress),
) -> Result<ScoreResult> {
    score_with_backend(source, opts, &CpuBackend::default(), progress)
}

/// Scores with an explicit backend.
pub fn score_with_backend(
    source: &dyn TileSource,
    opts: &ScoreOptions,
    backend: &dyn Backend,
    progress: &mut dyn FnMut(ScoreProgress),
) -> Result<ScoreResult> {
    score_impl(source, opts, backend, progress, true)
}

/// [`score_with_backend`]; `post_thread = false` keeps the after-slice statistics
/// inline whatever the budget (tests compare the two).
fn score_impl(
    source: &dyn TileSource,
    opts: &ScoreOptions,
    backend: &dyn Backend,
    progress: &mut dyn FnMut(ScoreProgress),
    post_thread: bool,
) -> Result<ScoreResult> {
    let Selection {
        g,
        s_len,
        blocks,
        slices,
        slice_rank,
        layer_major,
        pairs_for,
    } = Selection::new(source, opts)?;
    // Samples.
    // Phase 5 whitens with the Fisher of every stored sample of both tasks.
    let need_fa = opts.group_fisher || opts.conflicts || opts.fisher_pool != FisherPool::B;
    let need_fb = opts.group_fisher || opts.conflicts || opts.fisher_pool != FisherPool::A;
    let pa = TaskPlan::new(source, &opts.task_a, opts.samples_a.as_ref(), need_fa)?;
    let pb = TaskPlan::new(source, &opts.task_b, opts.samples_b.as_ref(), need_fb)?;
    let (na, nb) = (pa.sel_pos.len(), pb.sel_pos.len());
    if opts.conflicts {
        for (p, n) in [(&pa, na), (&pb, nb)] {
            if n < 2 {
                return Err(Error::InvalidOption {
                    name: "conflicts",
                    why: format!(
                        "task `{}` has {n} analysed sample(s); sample conflicts need at least 2 per task (a within-task mean)",
                        p.name
                    ),
                });
            }
        }
    }
    let mut warnings = Vec::new();
    for (p, n) in [(&pa, na), (&pb, nb)] {
        if n < opts.min_samples {
            let w = format!(
                "task `{}`: only {n} samples scored (minimum {}); statistics are unreliable",
                p.name, opts.min_samples
            );
            progress(ScoreProgress::Warning(w.clone()));
            warnings.push(w);
        }
    }

    // Memory plan: bytes per flattened column of the slice tile (both tasks, f32),
    // plus the f64 Fisher/denominator vectors kept for the whole slice (4 × 8 bytes).
    let per_col = (pa.rows.len() + pb.rows.len()) * 4;
    let fixed = s_len * 8 * 4;
    let avail = opts.memory_budget.saturating_sub(fixed);
    let width = (avail / per_col).min(s_len);
    if width == 0 {
        return Err(Error::BudgetTooSmall {
            budget: opts.memory_budget,
            needed: fixed + per_col,
        });
    }
    let nchunks = s_len.div_ceil(width);
    progress(ScoreProgress::Plan {
        slices: slices.len(),
        tile_bytes: per_col * s_len,
        chunks_per_slice: nchunks,
    });

    let mut eng = Engine {
        source,
        opts,
        backend,
        s_len,
        width,
        nchunks,
        pa,
        pb,
        buf_a: Vec::new(),
        buf_b: Vec::new(),
        reads: ReadStats::default(),
        tops: blocks
            .iter()
            .map(|&b| {
                (
                    b,
                    TopK {
                        k: opts.top_k,
                        entries: Vec::new(),
                    },
                )
            })
            .collect(),
        sink: Sink::Done,
        read_s: 0.0,
        prefetch_s: 0.0,
        stats_s: 0.0,
        preloaded: None,
        host_valid: true,
        planar: false,
        planes_a: Vec::new(),
        planes_b: Vec::new(),
        conf: opts.conflicts.then(|| GramAcc {
            n: na + nb,
            grams: Vec::new(),
        }),
    };
    let n_fisher = match opts.fisher_pool {
        FisherPool::A => eng.pa.all.len(),
        FisherPool::B => eng.pb.all.len(),
        FisherPool::Pooled => eng.pa.all.len() + eng.pb.all.len(),
    };
    let ctx = PostCtx {
        opts,
        backend,
        na,
        nb,
        n_fisher,
        chunks: nchunks,
        pairs_for: &pairs_for,
    };
    let post = Post {
        ctx,
        cells: Vec::new(),
        diagnostics: Vec::new(),
        pairs: Vec::new(),
        phase: PhaseAcc::new(&opts.sparsities),
        secs: 0.0,
    };
    // A host backend whose fused path keeps no state between calls reads and scores
    // several whole slices at once, one per worker thread, when their tiles and Fishers
    // fit the budget: no slice is split over the threads, each tile is decoded and
    // scored on the same core, and no thread waits for another's half of a slice.
    let tile_bytes = per_col.saturating_mul(s_len);
    let threads = rayon::current_num_threads();
    let per_set = tile_bytes.saturating_add(2 * s_len * 8);
    let at_once = if backend.concurrent_slices()
        && backend.supports_fused()
        && !opts.conflicts
        && nchunks == 1
        && opts.lam_rel == 0.0
        && threads > 1
    {
        (2 * threads)
            .min(opts.memory_budget.saturating_sub(fixed) / per_set.max(1))
            .min(slices.len())
    } else {
        1
    };
    let concurrent = at_once >= 2;
    // Otherwise double buffering: when a slice is one chunk and two slice tiles fit the
    // budget, a reader thread reads tile t+1 while tile t is computed (two buffer sets).
    let overlap = !concurrent
        && nchunks == 1
        && slices.len() > 1
        && fixed.saturating_add(tile_bytes.saturating_mul(2)) <= opts.memory_budget;
    // The after-slice statistics move to a second thread when its queue fits too.
    let in_use = if concurrent {
        fixed.saturating_add(per_set.saturating_mul(at_once))
    } else {
        fixed.saturating_add(
            per_col
                .saturating_mul(width)
                .saturating_mul(1 + overlap as usize),
        )
    };
    // The concurrent pass hands over a window of slices at once: a queue shorter than
    // two windows kept the engine (and so every worker) waiting for the statistics.
    let post_depth = if concurrent {
        POST_DEPTH.max(2 * at_once)
    } else {
        POST_DEPTH
    };
    let post_bytes = (post_depth + 1) * PostJob::bytes(s_len, na, nb) + Post::scratch_bytes(s_len);
    let threaded =
        post_thread && slices.len() > 1 && in_use.saturating_add(post_bytes) <= opts.memory_budget;

    let (post, compute_s, wait_s, post_wait_s) = std::thread::scope(|sc| -> Result<_> {
        let handle = if threaded {
            let (tx, rx) = std::sync::mpsc::sync_channel::<PostItem>(post_depth);
            let mut p = post;
            eng.sink = Sink::Thread { tx, wait_s: 0.0 };
            Some(sc.spawn(move || -> Result<Post<'_>> {
                for job in rx {
                    p.run(job)?;
                }
                Ok(p)
            }))
        } else {
            eng.sink = Sink::Inline(Box::new(post));
            None
        };
        let pass = if concurrent {
            run_pass_concurrent(&mut eng, &slices, at_once, &ctx, progress)
        } else {
            run_pass(&mut eng, &slices, overlap, progress)
        };
        match (std::mem::replace(&mut eng.sink, Sink::Done), handle) {
            (Sink::Inline(p), _) => {
                let (compute_s, wait_s) = pass?;
                // Inline statistics ran inside `slice`: not tile compute.
                let secs = p.secs;
                Ok((*p, compute_s - secs, wait_s, 0.0))
            }
            (Sink::Thread { tx, wait_s: pw }, Some(h)) => {
                drop(tx);
                let joined = h.join().map_err(|_| Error::Backend {
                    backend: "engine",
                    message: "the after-slice statistics thread panicked".into(),
                })?;
                // A failed statistics thread holds the real error; the engine only saw
                // the queue close.
                let p = joined?;
                let (compute_s, wait_s) = pass?;
                Ok((p, compute_s - pw, wait_s, pw))
            }
            _ => unreachable!("the sink is set before the pass"),
        }
    })?;
    progress(ScoreProgress::Timing {
        read_s: eng.read_s,
        prefetch_s: eng.prefetch_s,
        compute_s,
        wait_s,
        overlapped: overlap || concurrent,
        slices_at_once: at_once,
        post_s: post.secs + eng.stats_s,
        post_wait_s,
        post_threaded: threaded,
    });

    progress(ScoreProgress::Stage("permutation"));
    let top = eng.top_pairs();
    let conflicts = match eng.conf.take() {
        Some(acc) => {
            progress(ScoreProgress::Stage("conflicts"));
            Some(conflicts::finish(
                acc,
                &eng.pa.analysed(),
                &eng.pb.analysed(),
                opts,
                backend,
            )?)
        }
        None => None,
    };

    let Post {
        mut cells,
        mut diagnostics,
        mut pairs,
        phase,
        ..
    } = post;
    if layer_major {
        cells.sort_by_key(|c| slice_rank[&(c.block, c.layer, c.head)]);
        diagnostics.sort_by_key(|d| slice_rank[&(d.block, d.layer, d.head)]);
        pairs.sort_by_key(|p| slice_rank[&(p.block, p.layer, p.head)]);
    }
    let (mut group_fisher, masks, overlap) = if opts.group_fisher {
        phase.finish(&eng.pa.name, &eng.pb.name)
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    if opts.mlp_fisher {
        progress(ScoreProgress::Stage("mlp_fisher"));
        for t in [&opts.task_a, &opts.task_b] {
            let (rows, reads) = fisher::mlp_channel_fisher(source, t)?;
            eng.reads.other_reads += reads;
            group_fisher.extend(rows);
        }
    }

    Ok(ScoreResult {
        options: opts.clone(),
        geometry: g,
        backend: backend.name().to_string(),
        samples_a: eng.pa.scored(),
        samples_b: eng.pb.scored(),
        stored_a: eng.pa.all.len(),
        stored_b: eng.pb.all.len(),
        cells,
        top,
        diagnostics,
        pairs,
        group_fisher,
        masks,
        overlap,
        warnings,
        reads: eng.reads,
        conflicts,
    })
}

/// The state of one run's pass: its plan, tile buffers, top-k lists and read counts.
struct Engine<'a> {
    source: &'a dyn TileSource,
    opts: &'a ScoreOptions,
    backend: &'a dyn Backend,
    s_len: usize,
    width: usize,
    nchunks: usize,
    pa: TaskPlan,
    pb: TaskPlan,
    buf_a: Vec<f32>,
    buf_b: Vec<f32>,
    reads: ReadStats,
    tops: Vec<(Block, TopK)>,
    /// Where finished slices go for their statistics.
    sink: Sink<'a>,
    /// Seconds inside `read_tile` (this thread, or the reader thread when overlapped).
    read_s: f64,
    /// Seconds in `Backend::prefetch` on the reader thread.
    prefetch_s: f64,
    /// Seconds the concurrent pass's workers spent on slice statistics.
    stats_s: f64,
    /// Whole-slice tiles of both tasks already read by the reader thread, and whether
    /// the host buffers hold their values (false: formed on the device from factors).
    preloaded: Option<(Vec<f32>, Vec<f32>, bool)>,
    /// Whether `buf_a`/`buf_b` hold the slice's values (see `preloaded`).
    host_valid: bool,
    /// Whether `planes_a`/`planes_b` hold the slice's values as bf16 byte planes (all
    /// stored rows; the concurrent pass of a bf16 store). `buf_a`/`buf_b` do not then.
    planar: bool,
    planes_a: Vec<u8>,
    planes_b: Vec<u8>,
    /// Phase 5: the whitened Gram of every slice (None without `conflicts`).
    conf: Option<GramAcc>,
}

/// Lower median: the element at index `(n-1)/2` of the values sorted by
/// `total_cmp` (`v` non-empty). O(n); see [`crate::select`].
pub fn lower_median(v: &[f64]) -> f64 {
    crate::select::lower_median(v)
}

#[cfg(test)]
mod tests {
    use super::finish::Entry;
    use super::pass::compact_rows;
    use super::*;
    use gradshard_core::TaskName;

    /// The statistics thread changes where the work runs, not what it computes:
    /// every output equal, bit for bit, with bootstrap, masks, pooled Fisher, lam_rel.
    #[test]
    fn statistics_thread_and_inline_give_identical_results() {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-gqa");
        let src = crate::fixture::FixtureSource::open(&root, false).unwrap();
        let task = |t| TaskName::new(t).unwrap();
        let mut o = ScoreOptions::new(task("math"), task("general"));
        o.n_boot = 50;
        o.n_perm = 20;
        o.min_samples = 0;
        o.lam_rel = 0.1;
        o.fisher_pool = FisherPool::Pooled;
        o.pairs_for = vec![(0, 0), (1, 1)];
        let mut timings = Vec::new();
        let mut runs = Vec::new();
        for threaded in [true, false] {
            let r = score_impl(
                &src,
                &o,
                &CpuBackend::default(),
                &mut |p| {
                    if let ScoreProgress::Timing { post_threaded, .. } = p {
                        timings.push(post_threaded)
                    }
                },
                threaded,
            )
            .unwrap();
            runs.push(r);
        }
        assert_eq!(timings, vec![true, false], "both paths were taken");
        assert!(!runs[0].masks.is_empty() && !runs[0].pairs.is_empty());
        assert_eq!(runs[0], runs[1]);
    }

    #[test]
    fn lower_median_of_even_length_takes_lower() {
        assert_eq!(lower_median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(lower_median(&[5.0, 1.0, 3.0]), 3.0);
    }

    #[test]
    fn compaction_keeps_selected_rows_in_order() {
        let mut b: Vec<f32> = (0..12).map(|v| v as f32).collect();
        compact_rows(&mut b, &[1, 3, 5], 2);
        assert_eq!(b, vec![2.0, 3.0, 6.0, 7.0, 10.0, 11.0]);
    }

    #[test]
    fn top_k_orders_by_score_then_index() {
        let mut t = TopK {
            k: 3,
            entries: Vec::new(),
        };
        let e = |score, i, j| Entry {
            score,
            i,
            j,
            layer: 0,
            head: 0,
            rows: None,
        };
        assert!(t.push(e(1.0, 0, 0)));
        assert!(t.push(e(3.0, 0, 1)));
        assert!(t.push(e(3.0, 0, 0)));
        assert!(t.push(e(2.0, 1, 1)));
        assert!(!t.push(e(0.5, 2, 2)));
        let got: Vec<(f64, usize, usize)> = t.entries.iter().map(|e| (e.score, e.i, e.j)).collect();
        assert_eq!(got, vec![(3.0, 0, 0), (3.0, 0, 1), (2.0, 1, 1)]);
    }
}
