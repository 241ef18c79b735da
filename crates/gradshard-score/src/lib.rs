//! Phase 6 QK-OV interference scoring (docs/design.md §4) and phases 2-4 group Fisher
//! (docs/design.md §5), over any [`TileSource`].
//!
//! Entry point: [`score`]. The engine reads each needed (task, layer, block,
//! head) tile once, computes the task Fisher from the same tile, forms X and Y,
//! and multiplies `M = X·Yᵀ` on a [`Backend`] (CPU GEMM now). Statistics are
//! seeded and reproducible; see `docs/scoring.md` for every definition.

mod backend;
mod backend_burn;
pub mod conflicts;
mod engine;
mod error;
pub mod fisher;
pub mod fixture;
mod fused_cpu;
pub mod options;
mod post;
mod result;
pub mod select;
mod slice;
mod source;
pub mod stats;
mod store_source;
mod tile;

pub use backend::{
    transform_value, Backend, CpuBackend, Download, FusedOut, FusedSlice, Role, Tile,
};
#[cfg(feature = "cuda")]
pub use backend_burn::CudaBackend;
pub use backend_burn::{BurnBackend, GpuPrecision, GpuStats, NdArrayBackend};
pub use conflicts::{ConflictPair, ConflictRow, Conflicts, Granularity, SampleConflict};
pub use engine::{lower_median, score, score_with_backend, ScoreProgress};
pub use error::{Error, Result};
pub use options::{
    Aggregate, FisherPool, ScoreOptions, Variant, DEFAULT_AGGREGATE, DEFAULT_CI_LEVEL, DEFAULT_EPS,
    DEFAULT_FISHER_POOL, DEFAULT_LAM, DEFAULT_LAM_REL, DEFAULT_MEMORY_BUDGET, DEFAULT_MIN_SAMPLES,
    DEFAULT_N_BOOT, DEFAULT_N_PERM, DEFAULT_SEED, DEFAULT_SPARSITIES, DEFAULT_TOP_K,
    DEFAULT_VARIANT,
};
pub use result::{
    Cell, GroupFisherRow, GroupKind, HeatmapRow, MaskLevel, MaskRow, OverlapRow, PairMatrix,
    ReadStats, ScoreResult, SliceDiagnostics, TopPair,
};
pub use slice::SliceId;
pub use source::{FactorTile, SliceFactors, TileForm, TileSource};
pub use store_source::StoreSource;
