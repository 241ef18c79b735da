use gradshard_core::{Block, Geometry, SampleId, TaskName};
use serde::{Deserialize, Serialize};

use crate::options::ScoreOptions;

/// One heatmap cell at stored resolution: (block, layer, stored head), where the
/// stored head is a kv head for K and V.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub block: Block,
    pub layer: usize,
    /// Query head for Q/O, kv head for K/V.
    pub head: usize,
    /// Mean of M over all scored pairs (units of the aggregate: a sum over the
    /// slice, or a per-element mean).
    pub score_mean: f64,
    /// Percentile bootstrap interval of `score_mean` (None when `n_boot = 0`).
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub n_pairs: u64,
}

/// A heatmap row at query-head resolution (the view the tables and pictures use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeatmapRow {
    pub block: Block,
    pub layer: usize,
    /// Query head.
    pub head: usize,
    /// kv(head) = head / (H / H_kv).
    pub kv_head: usize,
    /// True when this K/V value is the kv head's value repeated for each of the
    /// query heads that share it (GQA/MQA): the cells are not independent.
    pub kv_shared: bool,
    pub score_mean: f64,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub n_pairs: u64,
}

/// One of the top pairs of a block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopPair {
    pub block: Block,
    /// 1-based rank within its block (score descending; ties by
    /// (index_a, index_b, layer, head) ascending).
    pub rank: usize,
    pub layer: usize,
    /// Stored head: query head for Q/O, kv head for K/V.
    pub head: usize,
    /// Stored ids and stored-order indices of the two samples.
    pub sample_a: SampleId,
    pub sample_b: SampleId,
    pub index_a: usize,
    pub index_b: usize,
    pub score: f64,
    /// Permutation p-value (None when `n_perm = 0`).
    pub p_value: Option<f64>,
    /// Benjamini–Hochberg q-value over every p-value of the run.
    pub q_value: Option<f64>,
}

/// Numerical diagnostics of the denominator Fisher of one slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceDiagnostics {
    pub block: Block,
    pub layer: usize,
    pub head: usize,
    pub fisher_min: f64,
    /// Lower median: element `(n-1)/2` of the sorted values.
    pub fisher_median: f64,
    pub fisher_max: f64,
    /// Fraction of elements with I < eps.
    pub frac_below_eps: f64,
    /// lam* actually added to the denominator.
    pub lam_applied: f64,
    /// Scored samples of A and B, and samples in the denominator Fisher.
    pub n_a: usize,
    pub n_b: usize,
    pub n_fisher: usize,
    /// Column chunks the slice was processed in (1 = whole tile in memory).
    pub chunks: usize,
}

/// The full pair matrix M of one slice, row-major `[n_a × n_b]` (A samples in
/// scored order, B samples in scored order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairMatrix {
    pub block: Block,
    pub layer: usize,
    pub head: usize,
    pub n_a: usize,
    pub n_b: usize,
    pub values: Vec<f64>,
}

impl PairMatrix {
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.values[i * self.n_b + j]
    }
}

/// What a group-Fisher row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupKind {
    /// An attention head slice (layer, block, stored head).
    Attention,
    /// One output channel of a non-attention (MLP) tensor.
    Mlp,
}

/// Phases 2-4 group Fisher of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupFisherRow {
    pub task: TaskName,
    pub kind: GroupKind,
    pub block: Option<Block>,
    /// Tensor name (MLP rows).
    pub tensor: Option<String>,
    /// Layer (attention rows).
    pub layer: Option<usize>,
    /// Stored head (attention rows).
    pub head: Option<usize>,
    /// Output channel (MLP rows).
    pub channel: Option<usize>,
    pub numel: u64,
    /// Σ I over the group's elements.
    pub fisher_sum: f64,
    pub fisher_mean: f64,
    /// fisher_sum / Σ fisher_sum over every group of the same kind and task.
    pub importance: f64,
}

/// Group-level keep mask entry of one task at one sparsity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskRow {
    pub task: TaskName,
    pub sparsity: f64,
    pub block: Block,
    pub layer: usize,
    pub head: usize,
    /// Whether the group is among the top `round((1 - s)·G)` groups by Fisher sum.
    pub keep: bool,
}

/// Mask level of an overlap row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskLevel {
    Group,
    Element,
}

/// Overlap of task A's and task B's keep masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlapRow {
    pub level: MaskLevel,
    pub sparsity: f64,
    /// The slice for per-slice element rows; None for the totals.
    pub block: Option<Block>,
    pub layer: Option<usize>,
    pub head: Option<usize>,
    /// Units masked: groups (group level) or elements.
    pub numel: u64,
    pub kept_a: u64,
    pub kept_b: u64,
    pub intersection: u64,
    pub union: u64,
    /// intersection / union (None when the union is empty).
    pub iou: Option<f64>,
    /// intersection / numel.
    pub intersection_frac: f64,
    /// Cosine of I_A and I_B over the same units (None when either is all zero).
    pub fisher_cosine: Option<f64>,
}

/// Reads done by the run, for checking the one-pass property.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadStats {
    /// `read_tile` calls.
    pub tile_reads: u64,
    /// Sample-slices read (a frame read in k column chunks counts k times).
    pub frame_reads: u64,
    /// Of those, re-reads caused by column chunking (0 when every tile fit the budget).
    pub frame_rereads: u64,
    /// `read_other` calls (MLP Fisher).
    pub other_reads: u64,
}

/// Everything a score run produces; the exporter writes it out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreResult {
    pub options: ScoreOptions,
    pub geometry: Geometry,
    pub backend: String,
    /// Scored samples (id, T) in stored order.
    pub samples_a: Vec<(SampleId, u32)>,
    pub samples_b: Vec<(SampleId, u32)>,
    /// Samples stored per task (the Fisher's n).
    pub stored_a: usize,
    pub stored_b: usize,
    /// Heatmap cells at stored (kv-head) resolution, slice order (block, layer, head).
    pub cells: Vec<Cell>,
    /// Top pairs, block order then rank.
    pub top: Vec<TopPair>,
    pub diagnostics: Vec<SliceDiagnostics>,
    pub pairs: Vec<PairMatrix>,
    pub group_fisher: Vec<GroupFisherRow>,
    pub masks: Vec<MaskRow>,
    pub overlap: Vec<OverlapRow>,
    pub warnings: Vec<String>,
    pub reads: ReadStats,
    /// Phase 5 sample conflicts (with `options.conflicts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<crate::conflicts::Conflicts>,
}

impl ScoreResult {
    /// The heatmap at query-head resolution: Q/O cells as stored; each K/V kv-head
    /// cell repeated for every selected query head that reads it (`kv_shared`
    /// says so when H ≠ H_kv).
    pub fn heatmap_rows(&self) -> Vec<HeatmapRow> {
        let g = &self.geometry;
        let selected = |h: usize| self.options.heads.as_ref().is_none_or(|hs| hs.contains(&h));
        let mut rows = Vec::new();
        for c in &self.cells {
            let heads: Vec<usize> = if c.block.is_kv() {
                (0..g.heads)
                    .filter(|&h| g.kv_head_of(h) == c.head && selected(h))
                    .collect()
            } else {
                vec![c.head]
            };
            for h in heads {
                rows.push(HeatmapRow {
                    block: c.block,
                    layer: c.layer,
                    head: h,
                    kv_head: g.kv_head_of(h),
                    kv_shared: c.block.is_kv() && g.kv_heads != g.heads,
                    score_mean: c.score_mean,
                    ci_low: c.ci_low,
                    ci_high: c.ci_high,
                    n_pairs: c.n_pairs,
                });
            }
        }
        rows.sort_by_key(|r| (r.block, r.layer, r.head));
        rows
    }

    /// Mean of the heatmap cells of a block at query-head resolution (None if
    /// the block was not scored).
    pub fn block_mean(&self, block: Block) -> Option<f64> {
        let rows: Vec<f64> = self
            .heatmap_rows()
            .into_iter()
            .filter(|r| r.block == block)
            .map(|r| r.score_mean)
            .collect();
        (!rows.is_empty()).then(|| rows.iter().sum::<f64>() / rows.len() as f64)
    }
}
