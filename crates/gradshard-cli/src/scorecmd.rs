//! `score`: QK-OV interference from a saved store, exported as Parquet, JSON and heatmaps.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gradshard_core::{Block, SampleId, TaskName};
use gradshard_score::{Aggregate, FisherPool, ScoreOptions, ScoreProgress, Variant};
use gradshard_store::Store;

use crate::progress::counter;
use gradshard_score::StoreSource;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// Task A (its Fisher whitens X by default).
    #[arg(long)]
    pub task_a: String,
    /// Task B.
    #[arg(long)]
    pub task_b: String,
    /// Output directory (written to a temporary sibling, then renamed).
    #[arg(long, default_value = "gradshard-out")]
    pub out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// Layers to score: comma-separated numbers and ranges, e.g. 0,1,4-7 (default: all).
    #[arg(long, value_parser = parse_index_list)]
    pub layers: Option<IndexList>,
    /// Query heads to score: comma-separated numbers and ranges, e.g. 0,2-3 (default:
    /// all). K and V are scored per kv head: the kv heads these query heads read.
    #[arg(long, value_parser = parse_index_list)]
    pub heads: Option<IndexList>,
    /// Blocks to score, comma-separated: any of Q, K, V, O.
    #[arg(long, value_delimiter = ',', default_value = "Q,K,V,O")]
    pub blocks: Vec<Block>,
    /// X and Y of M = X·Yᵀ (docs/design.md §4): unsigned (C_A/den, |g_B|), signed
    /// (g_A/den, g_B) or symmetric (√C_A/den, √C_B).
    #[arg(long, value_enum, default_value_t = VariantArg::Unsigned)]
    pub variant: VariantArg,
    /// Fisher used in den: A (task A's), B (task B's) or pooled ((I_A + I_B) / 2).
    #[arg(long, value_enum, default_value_t = FisherPoolArg::A)]
    pub fisher_pool: FisherPoolArg,
    /// M summed over the slice's elements (sum) or averaged over them (mean).
    #[arg(long, value_enum, default_value_t = AggregateArg::Sum)]
    pub aggregate: AggregateArg,
    /// Floor of the Fisher in the denominator: den = max(I, eps) + lam*.
    #[arg(long, default_value_t = gradshard_score::DEFAULT_EPS)]
    pub eps: f64,
    /// Damping added to the denominator (lam* = lam, or the larger of lam and
    /// lam-rel × the slice's lower-median Fisher when --lam-rel > 0).
    #[arg(long, default_value_t = gradshard_score::DEFAULT_LAM)]
    pub lam: f64,
    /// Relative damping: lam* = max(lam, lam-rel × lower median of the slice's Fisher);
    /// 0 turns it off.
    #[arg(long, default_value_t = gradshard_score::DEFAULT_LAM_REL)]
    pub lam_rel: f64,
    /// Sample pairs kept per block in top_pairs.parquet (highest M first), with
    /// permutation p- and q-values.
    #[arg(long, default_value_t = gradshard_score::DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Score only these task-A sample ids (integers or strings), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub samples_a: Option<Vec<String>>,
    /// Score only these task-B sample ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub samples_b: Option<Vec<String>>,
    /// LAYER:HEAD pairs whose full n_A × n_B matrix is exported (pairs.parquet).
    #[arg(long, value_delimiter = ',', value_parser = parse_layer_head)]
    pub pairs_for: Vec<(usize, usize)>,
    /// Seed of the bootstrap and permutation draws (same seed, same intervals and p-values).
    #[arg(long, default_value_t = gradshard_score::DEFAULT_SEED)]
    pub seed: u64,
    /// Bootstrap resamples per heatmap cell.
    #[arg(long, default_value_t = gradshard_score::DEFAULT_N_BOOT)]
    pub n_boot: usize,
    /// Permutations for the top-pair p-values.
    #[arg(long, default_value_t = gradshard_score::DEFAULT_N_PERM)]
    pub n_perm: usize,
    /// Fewer samples than this in a task warns.
    #[arg(long, default_value_t = gradshard_score::DEFAULT_MIN_SAMPLES)]
    pub min_samples: usize,
    /// Bytes of tiles in memory at once, e.g. 4GiB.
    #[arg(long, default_value = "4GiB", value_parser = crate::parse_bytes)]
    pub memory_budget: u64,
    /// Factored stores: bytes of decoded shared factors kept in memory. When one
    /// layer's factors of every scored sample fit (samples × n × D × 4 bytes, both
    /// tasks), each is decoded once per layer; else again for each slice.
    #[arg(long, default_value = "2GiB", value_parser = crate::parse_bytes)]
    pub factor_cache: u64,
    /// Also compute per-channel Fisher of stored MLP tensors.
    #[arg(long)]
    pub mlp_fisher: bool,
    /// Phase 5, in the same pass: whitened per-sample cosines between the tasks per head
    /// and per block, a label-permutation p-value (--n-perm) and BH q-value per row, a
    /// bootstrap interval (--n-boot), the most negative pairs (--top-k) and each
    /// sample's mean cosine to the other task (conflicts*.parquet, conflicts_<block>.png).
    #[arg(long)]
    pub conflicts: bool,
    /// Skip the PNG/SVG pictures.
    #[arg(long)]
    pub no_pictures: bool,
    /// Give each block's heatmap its own colour range (default: one range shared by
    /// the Q, K, V and O pictures, so a colour means the same value in each).
    #[arg(long)]
    pub per_block_colour_range: bool,
    /// Where the tile compute (Fisher, X, Y, M = X·Yᵀ) runs: cpu, cuda or cuda:N
    /// (CUDA needs a binary built with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// GPU precision of M = X·Yᵀ: f64 (CPU-identical; elementwise products, memory-bound:
    /// for tens of samples per task) or f32 (TF32 tensor-core GEMM on Hopper, ~1e-3).
    #[arg(long, value_enum, default_value_t = GpuPrecisionArg::F64)]
    pub gpu_precision: GpuPrecisionArg,
    /// GPU slice path: fused (Fisher, denominator, X, Y and M on the device, one
    /// blocking transfer per slice) or per-step (each step its own round trip; for
    /// comparisons). Slices split into column chunks or with --lam-rel > 0 always
    /// take the per-step path.
    #[arg(long, value_enum, default_value_t = GpuPathArg::Fused)]
    pub gpu_path: GpuPathArg,
}

/// `--variant`: X and Y of M = X·Yᵀ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    Unsigned,
    Signed,
    Symmetric,
}

impl From<VariantArg> for Variant {
    fn from(v: VariantArg) -> Variant {
        match v {
            VariantArg::Unsigned => Variant::Unsigned,
            VariantArg::Signed => Variant::Signed,
            VariantArg::Symmetric => Variant::Symmetric,
        }
    }
}

/// `--fisher-pool`: the Fisher in the denominator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FisherPoolArg {
    #[value(name = "A")]
    A,
    #[value(name = "B")]
    B,
    Pooled,
}

impl From<FisherPoolArg> for FisherPool {
    fn from(v: FisherPoolArg) -> FisherPool {
        match v {
            FisherPoolArg::A => FisherPool::A,
            FisherPoolArg::B => FisherPool::B,
            FisherPoolArg::Pooled => FisherPool::Pooled,
        }
    }
}

/// `--aggregate`: M over a slice's elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AggregateArg {
    Sum,
    Mean,
}

impl From<AggregateArg> for Aggregate {
    fn from(v: AggregateArg) -> Aggregate {
        match v {
            AggregateArg::Sum => Aggregate::Sum,
            AggregateArg::Mean => Aggregate::Mean,
        }
    }
}

/// `--gpu-precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuPrecisionArg {
    F64,
    #[value(alias = "tf32")]
    F32,
}

/// `--gpu-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuPathArg {
    Fused,
    PerStep,
}

/// The compute backend picked by `--device`.
enum Compute {
    Cpu(gradshard_score::CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(gradshard_score::CudaBackend),
}

impl Compute {
    fn new(device: &str, precision: GpuPrecisionArg, path: GpuPathArg) -> Result<Compute> {
        if device == "cpu" {
            return Ok(Compute::Cpu(gradshard_score::CpuBackend::default()));
        }
        let ordinal: usize = match device {
            "cuda" => 0,
            d => d
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("unknown --device {d:?} (use cpu, cuda or cuda:N)"))?,
        };
        #[cfg(feature = "cuda")]
        {
            let p = match precision {
                GpuPrecisionArg::F64 => gradshard_score::GpuPrecision::F64,
                GpuPrecisionArg::F32 => gradshard_score::GpuPrecision::F32,
            };
            let mut b = gradshard_score::CudaBackend::new(ordinal, p)?;
            b.fused_enabled = path == GpuPathArg::Fused;
            Ok(Compute::Cuda(b))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (ordinal, precision, path);
            bail!(
                "--device {device}: this gradshard was built without CUDA support; rebuild with \
                 `cargo build --release -p gradshard-cli --features cuda` (or use --device cpu)"
            )
        }
    }

    fn backend(&self) -> &dyn gradshard_score::Backend {
        match self {
            Compute::Cpu(b) => b,
            #[cfg(feature = "cuda")]
            Compute::Cuda(b) => b,
        }
    }

    /// A line about the device work (uploads), if any.
    fn report(&self) -> Option<String> {
        match self {
            Compute::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            Compute::Cuda(b) => {
                let st = b.stats();
                Some(format!(
                    "gpu: {:.3} GB uploaded in {:.3} s ({:.2} GB/s host->device incl. packing and a sync), {} tiles uploaded by the reader thread, {} slices fused, {} tiles reused, {} GEMMs",
                    st.upload_bytes as f64 / 1e9,
                    st.upload_s,
                    st.upload_bytes as f64 / st.upload_s.max(1e-9) / 1e9,
                    st.prefetched_tiles,
                    st.fused_slices,
                    st.reused_tiles,
                    st.gemms
                ))
            }
        }
    }
}

/// Layer or head indices from `--layers` / `--heads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexList(pub Vec<usize>);

/// `0,1,4-7` → [0, 1, 4, 5, 6, 7].
fn parse_index_list(s: &str) -> Result<IndexList, String> {
    let bad = |part: &str| {
        format!("`{part}` in `{s}`: expected comma-separated numbers or ranges, e.g. 0,1,4-7")
    };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad(part))?,
                    b.trim().parse().map_err(|_| bad(part))?,
                );
                if a > b {
                    return Err(bad(part));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad(part))?),
        }
    }
    if out.is_empty() {
        return Err(format!("`{s}` names no index"));
    }
    Ok(IndexList(out))
}

fn parse_layer_head(s: &str) -> Result<(usize, usize), String> {
    let (l, h) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected LAYER:HEAD"))?;
    Ok((
        l.parse().map_err(|_| format!("`{s}`: bad layer"))?,
        h.parse().map_err(|_| format!("`{s}`: bad head"))?,
    ))
}

/// Resolves user-typed ids against the stored ones: an id matches a stored integer
/// id by its decimal form and a stored string id exactly.
fn resolve_ids(store: &Store, task: &str, wanted: &[String]) -> Result<Vec<SampleId>> {
    let recs = store.samples(task)?;
    wanted
        .iter()
        .map(|w| {
            recs.iter()
                .find(|r| match &r.id {
                    SampleId::Int(v) => v.to_string() == *w,
                    SampleId::Str(s) => s == w,
                })
                .map(|r| r.id.clone())
                .with_context(|| format!("task `{task}` has no sample with id {w:?}"))
        })
        .collect()
}

pub fn score(a: ScoreArgs) -> Result<ExitCode> {
    gradshard_store::guard::require_store_dir(&a.store)?;
    // The data-safety guard: --out is never a store, inside one or over one, and
    // --overwrite replaces only a previous score output (docs/errors.md).
    gradshard_store::guard::check_output("--out", &a.out)?;
    let nonempty = a.out.exists()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    if nonempty && !a.overwrite {
        return Err(crate::exit::fail(
            crate::exit::Category::Refused,
            format!(
                "output directory {} exists and is not empty (use --overwrite to replace a previous score output)",
                a.out.display()
            ),
        ));
    }
    if nonempty {
        gradshard_export::check_replaceable(&a.out)
            .with_context(|| format!("--out {} --overwrite", a.out.display()))?;
    }
    // An unusable --out fails now, not after the computation; leftovers of killed runs go.
    let stale = gradshard_export::prepare_output_dir(&a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    if stale > 0 {
        eprintln!("removed {stale} temporary output director(ies) left by killed runs");
    }
    let compute = Compute::new(&a.device, a.gpu_precision, a.gpu_path)?;
    let store = Store::open(&a.store)?;
    // score recomputes the Fisher from the gradients and does not read stats/, but a
    // damaged statistics file is said out loud (merge would refuse it).
    for p in gradshard_collect::stats::check_files(&store).problems {
        eprintln!("warning: {p}");
    }
    store.set_shared_cache_bytes(a.factor_cache);
    let mut o = ScoreOptions::new(
        TaskName::new(a.task_a.as_str())?,
        TaskName::new(a.task_b.as_str())?,
    );
    o.layers = a.layers.clone().map(|l| l.0);
    o.heads = a.heads.clone().map(|h| h.0);
    o.blocks = a.blocks.clone();
    o.variant = a.variant.into();
    o.fisher_pool = a.fisher_pool.into();
    o.aggregate = a.aggregate.into();
    o.eps = a.eps;
    o.lam = a.lam;
    o.lam_rel = a.lam_rel;
    o.top_k = a.top_k;
    o.samples_a = a
        .samples_a
        .as_ref()
        .map(|w| resolve_ids(&store, &a.task_a, w))
        .transpose()?;
    o.samples_b = a
        .samples_b
        .as_ref()
        .map(|w| resolve_ids(&store, &a.task_b, w))
        .transpose()?;
    o.pairs_for = a.pairs_for.clone();
    o.seed = a.seed;
    o.n_boot = a.n_boot;
    o.n_perm = a.n_perm;
    o.min_samples = a.min_samples;
    o.memory_budget = usize::try_from(a.memory_budget).unwrap_or(usize::MAX);
    o.mlp_fisher = a.mlp_fisher;
    o.conflicts = a.conflicts;
    let bar = counter(0, "score");
    let t = std::time::Instant::now();
    let mut timing = None;
    // Wall-clock phases: (name, when it began), closed by the next one.
    let mut phases: Vec<(&'static str, std::time::Instant)> = vec![("plan", t)];
    let result = gradshard_score::score_with_backend(
        &StoreSource { store: &store },
        &o,
        compute.backend(),
        &mut |p| match p {
            ScoreProgress::Plan { slices, .. } => {
                bar.set_length(slices as u64);
                phases.push(("slice pass", std::time::Instant::now()));
            }
            ScoreProgress::Slice { done, .. } => bar.set_position(done as u64),
            ScoreProgress::Warning(w) => bar.println(format!("warning: {w}")),
            ScoreProgress::Stage(name) => phases.push((
                match name {
                    "permutation" => "permutation test",
                    "mlp_fisher" => "MLP Fisher",
                    "conflicts" => "sample conflicts",
                    _ => "statistics",
                },
                std::time::Instant::now(),
            )),
            t @ ScoreProgress::Timing { .. } => {
                timing = Some(t);
                phases.push(("statistics drain", std::time::Instant::now()));
            }
            _ => {}
        },
    );
    bar.finish_and_clear();
    let result = result?;
    let secs = t.elapsed().as_secs_f64();
    let t_out = std::time::Instant::now();
    let mut eo = gradshard_export::ExportOptions::new(store.manifest().store_id.clone());
    eo.overwrite = a.overwrite;
    eo.pictures = !a.no_pictures;
    eo.per_block_colour_range = a.per_block_colour_range;
    let written = gradshard_export::write_outputs_with(&result, &a.out, &eo)?;
    phases.push(("writing outputs", t_out));
    let wall = t.elapsed().as_secs_f64();
    for w in &result.warnings {
        eprintln!("warning: {w}");
    }
    let read = store.stats().bytes();
    println!(
        "score: {} vs {}: {} slices in {secs:.2} s, {} frames ({:.3} GB) read, {:.3} GB/s",
        a.task_a,
        a.task_b,
        result.cells.len(),
        store.stats().frames(),
        read as f64 / 1e9,
        read as f64 / secs.max(1e-9) / 1e9
    );
    if let Some(ScoreProgress::Timing {
        read_s,
        prefetch_s,
        compute_s,
        wait_s,
        overlapped,
        slices_at_once,
        post_s,
        post_wait_s,
        post_threaded,
    }) = timing
    {
        println!(
            "timing ({}): tile read {read_s:.3} s, tile compute {compute_s:.3} s ({:.1}% of read), waiting for reads {wait_s:.3} s, {}",
            compute.backend().name(),
            100.0 * compute_s / read_s.max(1e-12),
            if slices_at_once > 1 {
                format!("{slices_at_once} slices at a time, one per thread (seconds summed over threads)")
            } else if overlapped {
                "read overlapped with compute".to_string()
            } else {
                "sequential".to_string()
            }
        );
        // The reader thread's hand-over to a device (the CPU backend has none).
        if compute.report().is_some() {
            println!(
                "host->device copies on the reader thread: {prefetch_s:.3} s (tile I/O incl. them {:.3} s; compute {:.1}% of it)",
                read_s + prefetch_s,
                100.0 * compute_s / (read_s + prefetch_s).max(1e-12)
            );
        }
        println!(
            "after-slice statistics: {post_s:.3} s {}",
            if slices_at_once > 1 {
                "on the slice threads, filed in order on a second thread".to_string()
            } else if post_threaded {
                format!("on a second thread (queue full for {post_wait_s:.3} s)")
            } else {
                "inline (the memory budget has no room for a queue)".to_string()
            }
        );
    }
    if let Some(r) = compute.report() {
        println!("{r}");
    }
    // The wall time, phase by phase (the phases add up to it).
    let end = t + std::time::Duration::from_secs_f64(wall);
    let parts: Vec<String> = phases
        .iter()
        .enumerate()
        .map(|(i, (name, at))| {
            let next = phases.get(i + 1).map_or(end, |p| p.1);
            format!("{name} {:.3} s", (next - *at).as_secs_f64())
        })
        .collect();
    println!("wall {wall:.3} s = {}", parts.join(" + "));
    print_summary(&result, &a.task_a, &a.task_b);
    print_conflicts(&result, &a.task_a, &a.task_b);
    println!("wrote {}:", written.dir.display());
    for f in &written.files {
        println!("  {f}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The answer on the console: the most conflicted (block, layer, head) with its
/// bootstrap interval, what its number means (the variant's formula in words, its ratio
/// to the median cell), and the top sample pairs with their stored ids, marked when not
/// significant and when one sample dominates them. Heads are named as in summary.json
/// (`head` a query head, `kv_head` the kv head K and V are stored per).
fn print_summary(r: &gradshard_score::ScoreResult, task_a: &str, task_b: &str) {
    // The same cell summary.json calls most_conflicted_head (query-head resolution).
    let rows = r.heatmap_rows();
    let Some(best) = rows
        .iter()
        .filter(|c| c.score_mean.is_finite())
        .max_by(|x, y| x.score_mean.total_cmp(&y.score_mean))
    else {
        return;
    };
    let head = if best.block.is_kv() {
        format!("head {} / kv_head {}", best.head, best.kv_head)
    } else {
        format!("head {}", best.head)
    };
    let ci = match (best.ci_low, best.ci_high) {
        (Some(lo), Some(hi)) => format!(
            ", {:.0}% CI [{lo:.4e}, {hi:.4e}]",
            100.0 * r.options.ci_level
        ),
        _ => String::new(),
    };
    println!(
        "most conflicted: block {} layer {} {head}: mean M {:.4e} over {} pairs{ci}",
        best.block, best.layer, best.score_mean, best.n_pairs
    );
    println!("  {}", meaning(&r.options));
    // Stored cells (a kv head counted once) against which the best one is placed.
    let mut means: Vec<f64> = r
        .cells
        .iter()
        .map(|c| c.score_mean)
        .filter(|v| v.is_finite())
        .collect();
    means.sort_by(f64::total_cmp);
    if !means.is_empty() {
        let median = means[(means.len() - 1) / 2];
        let ratio = if median > 0.0 && best.score_mean > 0.0 {
            format!("{:.2}x the median cell", best.score_mean / median)
        } else {
            "the median cell".to_string()
        };
        println!(
            "  the highest of {} scored cells: {ratio} (M {median:.4e}){}",
            means.len(),
            match (best.ci_low, best.ci_high) {
                (Some(lo), _) if lo > median => "; its CI lies above the median cell",
                (Some(lo), Some(hi)) if lo <= median && median <= hi =>
                    "; its CI includes the median cell: not distinguishable from a typical cell",
                _ => "",
            }
        );
    }
    let mut top: Vec<&gradshard_score::TopPair> = r.top.iter().collect();
    top.sort_by(|x, y| y.score.total_cmp(&x.score));
    let shown: Vec<&gradshard_score::TopPair> = top.iter().take(5).copied().collect();
    if !shown.is_empty() {
        println!("top sample pairs ({task_a} id, {task_b} id; any block; q > 0.05 marked not significant):");
        for p in &shown {
            let pv = p.p_value.map_or(String::new(), |v| format!(", p = {v:.3}"));
            let qv = p.q_value.map_or(String::new(), |v| format!(", q = {v:.3}"));
            let not_sig = match p.q_value.or(p.p_value) {
                Some(v) if v > 0.05 => "  [not significant]",
                _ => "",
            };
            let h = if p.block.is_kv() { "kv_head" } else { "head" };
            println!(
                "  {task_a} {} x {task_b} {}: M = {:.4e} (block {} layer {} {h} {}{pv}{qv}){not_sig}",
                p.sample_a, p.sample_b, p.score, p.block, p.layer, p.head
            );
        }
        // One sample in more than half of the pairs shown dominates them.
        let mut counts: Vec<(String, usize)> = Vec::new();
        for p in &shown {
            for who in [
                format!("{task_a} sample {}", p.sample_a),
                format!("{task_b} sample {}", p.sample_b),
            ] {
                match counts.iter_mut().find(|(w, _)| *w == who) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((who, 1)),
                }
            }
        }
        if let Some((who, n)) = counts.iter().max_by_key(|(_, n)| *n) {
            if shown.len() >= 3 && 2 * n > shown.len() {
                println!(
                    "  note: {n} of these {} pairs share {who}: one sample dominates the top pairs (top_pairs.parquet lists the rest)",
                    shown.len()
                );
            }
        }
    }
}

/// What M is for the run's variant, Fisher pool and aggregate, in words.
fn meaning(o: &ScoreOptions) -> String {
    let fisher = match o.fisher_pool {
        FisherPool::A => format!("task A's ({}) Fisher", o.task_a),
        FisherPool::B => format!("task B's ({}) Fisher", o.task_b),
        FisherPool::Pooled => "the two tasks' pooled Fisher".to_string(),
    };
    let formula = match o.variant {
        Variant::Unsigned => format!(
            "M = Σ (C_A / den) · |g_B|: an A sample's Fisher contribution C = g²/T divided by {fisher}, times the size of a B sample's gradient; high where B's gradient moves weights A relies on"
        ),
        Variant::Signed => format!(
            "M = Σ (g_A / den) · g_B: an A sample's gradient divided by {fisher}, dotted with a B sample's gradient; positive = aligned, negative = opposed"
        ),
        Variant::Symmetric => format!(
            "M = Σ (√C_A / den) · √C_B: the square roots of both samples' Fisher contributions C = g²/T, divided by {fisher}"
        ),
    };
    let over = match o.aggregate {
        Aggregate::Sum => "summed over the slice's elements",
        Aggregate::Mean => "averaged over the slice's elements",
    };
    format!("{formula};\n  {over}, den = max(I, eps) + lam*; mean M = its mean over all (A, B) sample pairs")
}

/// Phase 5 on the console: the most conflicted rows (lowest q, then lowest cross-task
/// mean cosine) and the three samples of each task that oppose the other task most.
fn print_conflicts(r: &gradshard_score::ScoreResult, task_a: &str, task_b: &str) {
    let Some(c) = &r.conflicts else {
        return;
    };
    println!("sample conflicts (whitened cosines; lowest q, then lowest cross mean):");
    for row in c.most_conflicted(5) {
        let at = match row.head {
            Some(h) if row.block.is_kv() => format!("layer {} kv_head {h}", row.layer),
            Some(h) => format!("layer {} head {h}", row.layer),
            None => format!("layer {} (whole block)", row.layer),
        };
        let p = match (row.p_value, row.q_value) {
            (Some(p), Some(q)) => format!(
                ", p = {p:.3}{} q = {q:.3}",
                if row.exact { " (exact)," } else { "," }
            ),
            _ => String::new(),
        };
        println!(
            "  block {} {at}: cross {:+.4}, within {task_a} {:+.4}, within {task_b} {:+.4}, delta {:+.4}{p}",
            row.block, row.cross_mean, row.within_a, row.within_b, row.delta
        );
    }
    for (task, other) in [(&r.options.task_a, task_b), (&r.options.task_b, task_a)] {
        let low = c.lowest_samples(task, 3);
        if low.is_empty() {
            continue;
        }
        let list: Vec<String> = low
            .iter()
            .map(|(id, m)| format!("{id} ({m:+.4})"))
            .collect();
        println!(
            "  {task} samples most opposed to {other} (mean cosine over blocks and layers): {}",
            list.join(", ")
        );
    }
}
