use gradshard_core::{Block, Geometry, SampleId, TaskName};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Floor of the Fisher in the denominator: `den = max(I, eps) + lam*` (docs/design.md §4).
pub const DEFAULT_EPS: f64 = 1e-10;
/// Absolute ridge added to the denominator (docs/design.md §4).
pub const DEFAULT_LAM: f64 = 1e-8;
/// Relative ridge: `lam* = max(lam, lam_rel · lower_median(I over S))` when > 0 (docs/design.md §4).
pub const DEFAULT_LAM_REL: f64 = 0.0;
/// Scoring variant (docs/design.md §4).
pub const DEFAULT_VARIANT: Variant = Variant::Unsigned;
/// Whose Fisher forms the denominator (docs/design.md §4).
pub const DEFAULT_FISHER_POOL: FisherPool = FisherPool::A;
/// Aggregate over the slice (docs/design.md §4).
pub const DEFAULT_AGGREGATE: Aggregate = Aggregate::Sum;
/// Top pairs kept per block.
pub const DEFAULT_TOP_K: usize = 20;
/// Fewer scored samples than this in a task warns (never errors).
pub const DEFAULT_MIN_SAMPLES: usize = 10;
/// Seed of every random draw (bootstrap, permutations).
pub const DEFAULT_SEED: u64 = 0;
/// Bootstrap resamples per heatmap cell (0 disables the CI).
pub const DEFAULT_N_BOOT: usize = 1000;
/// Permutations per top pair (0 disables p-values).
pub const DEFAULT_N_PERM: usize = 1000;
/// Two-sided coverage of the percentile bootstrap interval.
pub const DEFAULT_CI_LEVEL: f64 = 0.95;
/// Bytes the engine may hold for one slice's tiles of both tasks (4 GiB).
pub const DEFAULT_MEMORY_BUDGET: usize = 4 << 30;
/// Sparsities of the phases 2-4 keep-masks (a mask keeps the top `1 - s`).
pub const DEFAULT_SPARSITIES: &[f64] = &[0.5, 0.9];

/// How X and Y are formed from the gradients (docs/design.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// `X_i = C_i / den`, `Y_j = |g_j|`.
    Unsigned,
    /// `X_i = g_i / den`, `Y_j = g_j`.
    Signed,
    /// `X_i = sqrt(C_i) / den`, `Y_j = sqrt(C_j)`.
    Symmetric,
}

/// Which task Fisher forms the denominator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FisherPool {
    A,
    B,
    /// `(I_A + I_B) / 2`.
    #[serde(rename = "pooled")]
    Pooled,
}

impl FisherPool {
    /// The pooled Fisher value of one column from the two tasks' values.
    #[inline(always)]
    pub fn of(self, a: f64, b: f64) -> f64 {
        match self {
            FisherPool::A => a,
            FisherPool::B => b,
            FisherPool::Pooled => 0.5 * (a + b),
        }
    }

    /// `den = max(pool(a, b), eps) + lam` (docs/design.md §4).
    #[inline(always)]
    pub fn den(self, a: f64, b: f64, eps: f64, lam: f64) -> f64 {
        self.of(a, b).max(eps) + lam
    }
}

/// Aggregate of `X_i[k]·Y_j[k]` over the slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Sum,
    /// The sum divided by |S|.
    Mean,
}

macro_rules! from_str_enum {
    ($t:ty, $what:literal, $($s:literal => $v:expr),+) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($s => Ok($v),)+
                    other => Err(format!(concat!("unknown ", $what, " `{}` (expected {})"), other,
                        [$($s),+].join(", "))),
                }
            }
        }
        impl $t {
            pub fn as_str(self) -> &'static str {
                $(if self == $v { return $s; })+
                unreachable!()
            }
        }
    };
}
from_str_enum!(Variant, "variant", "unsigned" => Variant::Unsigned, "signed" => Variant::Signed, "symmetric" => Variant::Symmetric);
from_str_enum!(FisherPool, "Fisher pool", "A" => FisherPool::A, "B" => FisherPool::B, "pooled" => FisherPool::Pooled);
from_str_enum!(Aggregate, "aggregate", "sum" => Aggregate::Sum, "mean" => Aggregate::Mean);

/// Everything a score run needs besides the source. Build with [`ScoreOptions::new`]
/// (all defaults) and change fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreOptions {
    pub task_a: TaskName,
    pub task_b: TaskName,
    /// Layers to score (`None`: all).
    pub layers: Option<Vec<usize>>,
    /// Query heads to score (`None`: all). A K/V kv head is scored when any of
    /// its query heads is selected.
    pub heads: Option<Vec<usize>>,
    /// Blocks to score (default all four).
    pub blocks: Vec<Block>,
    pub variant: Variant,
    pub fisher_pool: FisherPool,
    pub aggregate: Aggregate,
    pub eps: f64,
    pub lam: f64,
    pub lam_rel: f64,
    pub top_k: usize,
    /// Task-A samples to score, by stored id (`None`: all). The Fisher always
    /// uses every stored sample of its task.
    pub samples_a: Option<Vec<SampleId>>,
    pub samples_b: Option<Vec<SampleId>>,
    /// `(layer, query head)` whose full pair matrix M is returned, for every
    /// scored block (K/V: that query head's kv head).
    pub pairs_for: Vec<(usize, usize)>,
    pub seed: u64,
    pub n_boot: usize,
    pub n_perm: usize,
    pub ci_level: f64,
    pub min_samples: usize,
    /// Bytes of tile memory per slice; above it the slice is split into column chunks.
    pub memory_budget: usize,
    /// Compute phases 2-4 (attention group Fisher, masks, overlap, cosine) in the same pass.
    pub group_fisher: bool,
    /// Also read every stored non-attention tensor for the MLP per-channel Fisher
    /// (extra reads: off by default).
    pub mlp_fisher: bool,
    pub sparsities: Vec<f64>,
    /// Phase 5 (sample conflicts) in the same pass: the whitened Gram of the analysed
    /// samples per slice (docs/scoring.md). Left out of the settings when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflicts: bool,
    /// When set, the source's geometry must equal it (e.g. the model config the
    /// caller expects); a difference is an error.
    pub expected_geometry: Option<Geometry>,
}

impl ScoreOptions {
    /// Defaults of docs/design.md §4 for tasks A and B.
    pub fn new(task_a: TaskName, task_b: TaskName) -> ScoreOptions {
        ScoreOptions {
            task_a,
            task_b,
            layers: None,
            heads: None,
            blocks: Block::ALL.to_vec(),
            variant: DEFAULT_VARIANT,
            fisher_pool: DEFAULT_FISHER_POOL,
            aggregate: DEFAULT_AGGREGATE,
            eps: DEFAULT_EPS,
            lam: DEFAULT_LAM,
            lam_rel: DEFAULT_LAM_REL,
            top_k: DEFAULT_TOP_K,
            samples_a: None,
            samples_b: None,
            pairs_for: Vec::new(),
            seed: DEFAULT_SEED,
            n_boot: DEFAULT_N_BOOT,
            n_perm: DEFAULT_N_PERM,
            ci_level: DEFAULT_CI_LEVEL,
            min_samples: DEFAULT_MIN_SAMPLES,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            group_fisher: true,
            mlp_fisher: false,
            sparsities: DEFAULT_SPARSITIES.to_vec(),
            conflicts: false,
            expected_geometry: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |name, why: &str| {
            Err(Error::InvalidOption {
                name,
                why: why.to_string(),
            })
        };
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", "must be finite and >= 0");
        }
        if !(self.lam.is_finite() && self.lam >= 0.0) {
            return bad("lam", "must be finite and >= 0");
        }
        if !(self.lam_rel.is_finite() && self.lam_rel >= 0.0) {
            return bad("lam_rel", "must be finite and >= 0");
        }
        if self.eps == 0.0 && self.lam == 0.0 && self.lam_rel == 0.0 {
            return bad(
                "eps",
                "eps, lam and lam_rel are all 0: the denominator can vanish",
            );
        }
        if self.blocks.is_empty() {
            return bad("blocks", "no block selected");
        }
        if !(self.ci_level > 0.0 && self.ci_level < 1.0) {
            return bad("ci_level", "must lie in (0, 1)");
        }
        if self.sparsities.iter().any(|s| !(0.0..=1.0).contains(s)) {
            return bad("sparsities", "each must lie in [0, 1]");
        }
        if self.memory_budget == 0 {
            return bad("memory_budget", "must be > 0");
        }
        Ok(())
    }
}
