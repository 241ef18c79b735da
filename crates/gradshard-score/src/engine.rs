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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use gradshard_core::{Block, Geometry, SampleId, TaskName};

use crate::backend::{check_len, FusedOut, FusedSlice, Tile};
use crate::backend::{Backend, CpuBackend, Role};
use crate::error::{Error, Result};
use crate::fisher::{self, PhaseAcc};
use crate::options::{Aggregate, FisherPool, ScoreOptions};
use crate::post::{FisherVec, Post, PostCtx, PostItem, PostJob, Sink, SliceStats, POST_DEPTH};
use crate::result::{ReadStats, ScoreResult, TopPair};
use crate::source::TileSource;
use crate::stats;

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

/// One task's part of the plan.
struct TaskPlan {
    name: TaskName,
    all: Vec<(SampleId, u32)>,
    /// Stored indices read for every slice (ascending).
    rows: Vec<usize>,
    /// 1/T of `rows`.
    rows_inv_t: Vec<f64>,
    /// Positions within `rows` of the scored samples (ascending).
    sel_pos: Vec<usize>,
    /// 1/T of the scored samples.
    sel_inv_t: Vec<f64>,
}

impl TaskPlan {
    fn new(
        source: &dyn TileSource,
        name: &TaskName,
        subset: Option<&Vec<SampleId>>,
        need_fisher: bool,
    ) -> Result<TaskPlan> {
        let all = source.samples(name)?;
        if all.is_empty() {
            return Err(Error::EmptyTask {
                task: name.to_string(),
            });
        }
        for (id, t) in &all {
            if *t == 0 {
                return Err(Error::ZeroTokens {
                    task: name.to_string(),
                    id: id.clone(),
                });
            }
        }
        let selected: Vec<usize> = match subset {
            None => (0..all.len()).collect(),
            Some(ids) => {
                let index: HashMap<&SampleId, usize> =
                    all.iter().enumerate().map(|(i, (id, _))| (id, i)).collect();
                let mut set = BTreeSet::new();
                for id in ids {
                    let i = index.get(id).ok_or_else(|| Error::UnknownSample {
                        task: name.to_string(),
                        id: id.clone(),
                    })?;
                    set.insert(*i);
                }
                if set.is_empty() {
                    return Err(Error::EmptyTask {
                        task: name.to_string(),
                    });
                }
                set.into_iter().collect()
            }
        };
        let rows: Vec<usize> = if need_fisher {
            (0..all.len()).collect()
        } else {
            selected.clone()
        };
        let pos: HashMap<usize, usize> = rows.iter().enumerate().map(|(p, r)| (*r, p)).collect();
        let sel_pos: Vec<usize> = selected.iter().map(|s| pos[s]).collect();
        let inv = |i: usize| 1.0 / all[i].1 as f64;
        Ok(TaskPlan {
            name: name.clone(),
            rows_inv_t: rows.iter().map(|&r| inv(r)).collect(),
            sel_inv_t: selected.iter().map(|&r| inv(r)).collect(),
            rows,
            sel_pos,
            all,
        })
    }

    fn scored(&self) -> Vec<(SampleId, u32)> {
        self.sel_pos
            .iter()
            .map(|&p| self.all[self.rows[p]].clone())
            .collect()
    }

    fn stored_index_of_selected(&self, q: usize) -> usize {
        self.rows[self.sel_pos[q]]
    }
}

/// X_i and Y_j rows of one pair over the whole slice (shared between pairs).
type RowPair = (Arc<[f32]>, Arc<[f32]>);
/// Rows by scored-sample position.
type RowMap = HashMap<usize, Arc<[f32]>>;

/// A top-pair candidate with the X/Y rows kept for its permutation test.
struct Entry {
    score: f64,
    i: usize,
    j: usize,
    layer: usize,
    head: usize,
    rows: Option<RowPair>,
}

impl Entry {
    /// Total order: better = larger score, then smaller (i, j, layer, head).
    fn better_than(&self, o: &Entry) -> bool {
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
struct TopK {
    k: usize,
    entries: Vec<Entry>,
}

impl TopK {
    fn admits(&self, e: &Entry) -> bool {
        self.k > 0 && (self.entries.len() < self.k || e.better_than(self.entries.last().unwrap()))
    }
    /// Inserts; returns whether it was kept.
    fn push(&mut self, e: Entry) -> bool {
        if !self.admits(&e) {
            return false;
        }
        let pos = self.entries.partition_point(|x| x.better_than(&e));
        self.entries.insert(pos, e);
        self.entries.truncate(self.k);
        true
    }
}

/// One head slice of the pass.
pub(crate) struct Slice {
    pub block: Block,
    pub layer: usize,
    pub head: usize,
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
    opts.validate()?;
    let g: Geometry = source.geometry().clone();
    if let Some(expected) = &opts.expected_geometry {
        if *expected != g {
            return Err(Error::GeometryMismatch {
                what: "source geometry vs expected".into(),
                expected: format!("{expected:?}"),
                found: format!("{g:?}"),
            });
        }
    }
    let s_len = g.slice_numel();
    if s_len == 0 {
        return Err(Error::GeometryMismatch {
            what: "slice size".into(),
            expected: "> 0".into(),
            found: "0".into(),
        });
    }

    // Which layers / heads / blocks.
    let layers: Vec<usize> = match &opts.layers {
        None => (0..g.layers).collect(),
        Some(ls) => {
            let set: BTreeSet<usize> = ls.iter().copied().collect();
            if let Some(&bad) = set.iter().find(|&&l| l >= g.layers) {
                return Err(Error::InvalidOption {
                    name: "layers",
                    why: format!("layer {bad} does not exist (the model has {})", g.layers),
                });
            }
            set.into_iter().collect()
        }
    };
    if let Some(hs) = &opts.heads {
        if let Some(&bad) = hs.iter().find(|&&h| h >= g.heads) {
            return Err(Error::InvalidOption {
                name: "heads",
                why: format!(
                    "query head {bad} does not exist (the model has {})",
                    g.heads
                ),
            });
        }
    }
    for &(l, h) in &opts.pairs_for {
        if l >= g.layers || h >= g.heads {
            return Err(Error::InvalidOption {
                name: "pairs_for",
                why: format!("(layer {l}, head {h}) is outside the model"),
            });
        }
    }
    let q_selected = |h: usize| opts.heads.as_ref().is_none_or(|hs| hs.contains(&h));
    let blocks: BTreeSet<Block> = opts.blocks.iter().copied().collect();
    for &b in &blocks {
        if !source.has_block(b) {
            return Err(Error::MissingBlock { block: b });
        }
    }
    let mut slices = Vec::new();
    for &block in &blocks {
        for &layer in &layers {
            for head in 0..g.heads_of(block) {
                let wanted = if block.is_kv() {
                    (0..g.heads).any(|h| g.kv_head_of(h) == head && q_selected(h))
                } else {
                    q_selected(head)
                };
                if wanted {
                    slices.push(Slice { block, layer, head });
                }
            }
        }
    }
    // A factored store's Q, K and V slices of one layer share a factor S per sample (and
    // its O slices another): visiting the slices layer by layer decodes (and, on a
    // device, uploads) each S once. Outputs keep the block-major order.
    let slice_rank: HashMap<(Block, usize, usize), usize> = slices
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.block, s.layer, s.head), i))
        .collect();
    let layer_major = source.has_factors();
    if layer_major {
        slices.sort_by_key(|s| (s.layer, s.block, s.head));
    }
    if slices.is_empty() {
        return Err(Error::InvalidOption {
            name: "heads",
            why: "the selection contains no slice".into(),
        });
    }
    for &(l, h) in &opts.pairs_for {
        if !layers.contains(&l) || !q_selected(h) {
            return Err(Error::InvalidOption {
                name: "pairs_for",
                why: format!("(layer {l}, head {h}) is not among the scored layers and heads"),
            });
        }
    }
    let gr = &g;
    let pairs_for: HashSet<(Block, usize, usize)> = blocks
        .iter()
        .flat_map(|&b| {
            opts.pairs_for
                .iter()
                .map(move |&(l, h)| (b, l, if b.is_kv() { gr.kv_head_of(h) } else { h }))
        })
        .collect();

    // Samples.
    let need_fa = opts.group_fisher || opts.fisher_pool != FisherPool::B;
    let need_fb = opts.group_fisher || opts.fisher_pool != FisherPool::A;
    let pa = TaskPlan::new(source, &opts.task_a, opts.samples_a.as_ref(), need_fa)?;
    let pb = TaskPlan::new(source, &opts.task_b, opts.samples_b.as_ref(), need_fb)?;
    let (na, nb) = (pa.sel_pos.len(), pb.sel_pos.len());
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

    // Permutation p-values of each block's top pairs, then BH over all of them.
    progress(ScoreProgress::Stage("permutation"));
    let mut top = Vec::new();
    let mut p_all = Vec::new();
    for (block, tk) in &eng.tops {
        let mut ps = vec![None; tk.entries.len()];
        if opts.n_perm > 0 && !tk.entries.is_empty() {
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
                opts.variant,
                opts.n_perm,
                opts.seed,
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
                sample_a: eng.pa.all[eng.pa.stored_index_of_selected(e.i)].0.clone(),
                sample_b: eng.pb.all[eng.pb.stored_index_of_selected(e.j)].0.clone(),
                index_a: eng.pa.stored_index_of_selected(e.i),
                index_b: eng.pb.stored_index_of_selected(e.j),
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
    })
}

/// The pass over the slices; returns (tile compute seconds, seconds waiting for reads).
/// With `overlap`, a reader thread reads tile t+1 while tile t is computed.
fn run_pass(
    eng: &mut Engine<'_>,
    slices: &[Slice],
    overlap: bool,
    progress: &mut dyn FnMut(ScoreProgress),
) -> Result<(f64, f64)> {
    let total = slices.len();
    let (source, s_len, backend) = (eng.source, eng.s_len, eng.backend);
    // A device backend builds a factored store's tiles from their factors on the device
    // (the fused path, whole slices): the host buffers then only key the device tiles.
    let factors = backend.wants_factors()
        && source.has_factors()
        && eng.nchunks == 1
        && eng.opts.lam_rel == 0.0
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
fn run_pass_concurrent(
    eng: &mut Engine<'_>,
    slices: &[Slice],
    at_once: usize,
    ctx: &PostCtx<'_>,
    progress: &mut dyn FnMut(ScoreProgress),
) -> Result<(f64, f64)> {
    use rayon::prelude::*;
    let total = slices.len();
    // A bf16 store's slices are read as byte planes when the backend takes them.
    let planar = eng.source.bf16_planes() && eng.backend.takes_bf16_planes();
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
struct Scored {
    a: HostTile,
    b: HostTile,
    out: FusedOut,
    /// The slice's statistics, computed while its Fishers were in this worker's caches
    /// (`None` when a non-finite Fisher or M leaves the error to the engine thread).
    stats: Option<SliceStats>,
    read_s: f64,
    /// Seconds of the fused path, and of the statistics.
    compute_s: f64,
    stats_s: f64,
}

/// A worker's tile buffer: f32 values, or a bf16 store's byte planes.
enum HostTile {
    F32(Vec<f32>),
    Planes(Vec<u8>),
}

impl HostTile {
    fn tile(&self) -> Tile<'_> {
        match self {
            HostTile::F32(v) => Tile::F32(v),
            HostTile::Planes(p) => Tile::Bf16Planes(p),
        }
    }
}

/// Reads both tasks' whole tiles of slice `s` into the given buffers, scores them on
/// the backend's fused path and computes the slice's statistics.
#[allow(clippy::too_many_arguments)]
fn read_and_score(
    source: &dyn TileSource,
    backend: &dyn Backend,
    opts: &ScoreOptions,
    [pa, pb]: [&TaskPlan; 2],
    s: &Slice,
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
                source
                    .read_tile_bf16_planes(&plan.name, &plan.rows, s.layer, s.block, s.head, p)?;
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
fn scale_m(aggregate: Aggregate, s_len: usize, m: &mut [f64]) {
    if aggregate == Aggregate::Mean {
        let inv = 1.0 / s_len as f64;
        m.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The arguments of [`Backend::fused_slice`] for whole-slice tiles `a` and `b`.
fn fused_args<'a>(
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
}

/// Whole-slice tiles of both tasks read ahead by the reader thread.
struct Prefetched {
    a: Vec<f32>,
    b: Vec<f32>,
    /// False when the tiles were formed on the device from factors (see `Engine::preloaded`).
    host_valid: bool,
    read_s: f64,
    /// Seconds in [`Backend::prefetch`] (host → device copies of a device backend).
    prefetch_s: f64,
}

/// A task and the stored-order indices of the rows it reads.
type TaskRows = (TaskName, Vec<usize>);

/// Reads slice `s` of both tasks as factors and has the backend form the tiles on its
/// device, filed under the host buffers (sized `rows × s_len`, left unread: a fresh
/// zeroed allocation costs no memory until touched). Returns when the reads ended.
fn read_factor_tiles(
    source: &dyn TileSource,
    backend: &dyn Backend,
    tasks: [(&TaskRows, &mut Vec<f32>); 2],
    s: &Slice,
    s_len: usize,
) -> (Result<()>, std::time::Instant) {
    let mut tiles = Vec::with_capacity(2);
    for ((name, rows), _) in &tasks {
        match source.read_factor_tile(name, rows, s.layer, s.block, s.head) {
            Ok(Some(t)) => tiles.push(t),
            Ok(None) => {
                return (
                    Err(Error::Backend {
                        backend: "engine",
                        message: "the tile source has no factors for this slice".into(),
                    }),
                    std::time::Instant::now(),
                )
            }
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
fn read_whole_tile(
    source: &dyn TileSource,
    (name, rows): (&TaskName, &[usize]),
    s: &Slice,
    s_len: usize,
    buf: &mut Vec<f32>,
) -> Result<()> {
    buf.resize(rows.len() * s_len, 0.0);
    source.read_tile(name, rows, s.layer, s.block, s.head, 0..s_len, buf)
}

impl Engine<'_> {
    /// Reads columns `c0..c1` of the slice for both tasks into the buffers (or takes
    /// the reader thread's tiles), counting the reads.
    fn fetch_chunk(&mut self, s: &Slice, c0: usize, c1: usize, reread: bool) -> Result<()> {
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
                self.source.read_tile(
                    &plan.name,
                    &plan.rows,
                    s.layer,
                    s.block,
                    s.head,
                    c0..c1,
                    buf,
                )?;
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
    fn load_chunk(
        &mut self,
        s: &Slice,
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
    fn den_value(&self, fa: &[f64], fb: &[f64], k: usize, lam: f64) -> f64 {
        self.opts.fisher_pool.den(fa[k], fb[k], self.opts.eps, lam)
    }

    fn slice(&mut self, s: &Slice) -> Result<()> {
        if self.nchunks == 1 && self.opts.lam_rel == 0.0 && self.backend.supports_fused() {
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
        if needs_median && nchunks > 1 {
            for c in 0..nchunks {
                let (c0, c1) = chunk(c);
                self.load_chunk(s, c0, c1, false, &mut fa, &mut fb)?;
            }
            lam_star = Some(self.lam_star(&fa, &fb));
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

        // Streaming top-k, keeping X_i / Y_j rows of admitted pairs for the permutation
        // test (needs the tiles, so it stays here); the rest needs only I and M.
        self.update_top(s, &m, &den)?;
        self.sink.send(PostItem::Job(PostJob {
            s: Slice {
                block: s.block,
                layer: s.layer,
                head: s.head,
            },
            fa: FisherVec::Ready(fa),
            fb: FisherVec::Ready(fb),
            m,
            lam,
        }))
    }

    /// A whole slice on a backend's fused path: tiles → M with one blocking transfer;
    /// the Fishers stay on the device until the statistics thread (or, for the rows of
    /// newly admitted top pairs, this thread) needs them.
    fn slice_fused(&mut self, s: &Slice) -> Result<()> {
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
    fn finish_fused(&mut self, s: &Slice, out: FusedOut, stats: Option<SliceStats>) -> Result<()> {
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
            s: Slice {
                block: s.block,
                layer: s.layer,
                head: s.head,
            },
            fa,
            fb,
            m,
            lam: opts.lam,
        }))
    }

    /// Applies `Aggregate::Mean` to a slice's M and checks it is finite.
    fn finish_m(&self, s: &Slice, m: &mut [f64]) -> Result<()> {
        scale_m(self.opts.aggregate, self.s_len, m);
        self.check_m(s, m)
    }

    /// A slice's (scaled) M must be finite.
    fn check_m(&self, s: &Slice, m: &[f64]) -> Result<()> {
        if m.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFiniteScore {
                layer: s.layer,
                block: s.block,
                head: s.head,
            });
        }
        Ok(())
    }

    fn lam_star(&self, fa: &[f64], fb: &[f64]) -> f64 {
        if self.opts.lam_rel > 0.0 {
            let pool: Vec<f64> = (0..self.s_len)
                .map(|k| self.opts.fisher_pool.of(fa[k], fb[k]))
                .collect();
            self.opts.lam.max(self.opts.lam_rel * lower_median(&pool))
        } else {
            self.opts.lam
        }
    }

    fn update_top(&mut self, s: &Slice, m: &[f64], den: &[f64]) -> Result<()> {
        if self.admit(s, m) {
            self.attach_rows(s, den)?;
        }
        Ok(())
    }

    /// Offers every pair of the slice to its block's top-k; returns whether pairs were
    /// admitted whose X/Y rows the permutation test needs ([`Self::attach_rows`]).
    fn admit(&mut self, s: &Slice, m: &[f64]) -> bool {
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
    fn attach_rows(&mut self, s: &Slice, den: &[f64]) -> Result<()> {
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
    fn rows_from_buffer(
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
    fn reread_rows(
        &mut self,
        s: &Slice,
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
        self.source.read_tile(
            &plan.name,
            &idx,
            s.layer,
            s.block,
            s.head,
            0..self.s_len,
            &mut buf,
        )?;
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
}

/// Moves rows `sel_pos[q]` to position q and truncates (requires ascending `sel_pos`).
fn compact_rows(buf: &mut Vec<f32>, sel_pos: &[usize], w: usize) {
    for (q, &p) in sel_pos.iter().enumerate() {
        if p != q {
            buf.copy_within(p * w..(p + 1) * w, q * w);
        }
    }
    buf.truncate(sel_pos.len() * w);
}

/// Lower median: the element at index `(n-1)/2` of the values sorted by
/// `total_cmp` (`v` non-empty). O(n); see [`crate::select`].
pub fn lower_median(v: &[f64]) -> f64 {
    crate::select::lower_median(v)
}

#[cfg(test)]
mod tests {
    use super::*;

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
