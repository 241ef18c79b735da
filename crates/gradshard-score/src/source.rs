use std::ops::Range;

use gradshard_core::{Block, Geometry, OtherTensor, SampleId, TaskName};

use crate::error::Result;

/// The read seam of the scorer: the engine never touches files itself.
///
/// Implemented by the store reader (`gradshard_store::Store`) and, for tests,
/// by [`FixtureSource`](crate::fixture::FixtureSource).
///
/// Every slice is `d × D` values (`d = head_dim`, `D = hidden`) in the
/// canonical orientation of `gradshard_core::SliceSpec::cut`, flattened
/// row-major; `cols` ranges over that flattened index `0..d·D`.
pub trait TileSource: Sync {
    fn geometry(&self) -> &Geometry;

    /// Samples of a task in stored order: `(id, T)` with T the number of
    /// predicted positions that count. An unknown task is an error naming it.
    fn samples(&self, task: &TaskName) -> Result<Vec<(SampleId, u32)>>;

    /// Whether the store holds this block's slices at all (a block absent
    /// from the store is an error for the scorer, never zeros).
    fn has_block(&self, block: Block) -> bool;

    /// Reads flattened columns `cols` of slice `(layer, block, head)` — `head`
    /// is a kv head for K and V — of the chosen samples (`samples` are indices
    /// into [`samples(task)`](Self::samples), in any order), into `out`,
    /// row-major `[samples.len() × cols.len()]`, as f32: the signed g as
    /// stored. The scorer passes the whole range `0..d·D` unless the tile does
    /// not fit its memory budget. Implementations are expected to decompress
    /// frames in parallel.
    #[allow(clippy::too_many_arguments)]
    fn read_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        layer: usize,
        block: Block,
        head: usize,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> Result<()>;

    /// Whether [`read_tile_bf16_planes`](Self::read_tile_bf16_planes) serves every
    /// slice (a store of bf16 full slices).
    fn bf16_planes(&self) -> bool {
        false
    }

    /// A whole-slice tile (`cols` = all of `0..d·D`) as bf16 byte planes: row i of `out`
    /// (`2·d·D` bytes) holds the low bytes of sample `samples[i]`'s values, then their
    /// high bytes. Only when [`bf16_planes`](Self::bf16_planes) says so.
    #[allow(clippy::too_many_arguments)]
    fn read_tile_bf16_planes(
        &self,
        task: &TaskName,
        samples: &[usize],
        layer: usize,
        block: Block,
        head: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let _ = (samples, layer, block, head, out);
        Err(crate::Error::Backend {
            backend: "engine",
            message: format!("task `{task}`: the tile source has no bf16 byte planes"),
        })
    }

    /// Whether any sample is stored as factors (then a device backend may take
    /// [`read_factor_tile`](Self::read_factor_tile) instead of the slice).
    fn has_factors(&self) -> bool {
        false
    }

    /// The whole slice `(layer, block, head)` of the chosen samples as factors (see
    /// `gradshard_store::FactorTile`); `None` when the source has none.
    fn read_factor_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        layer: usize,
        block: Block,
        head: usize,
    ) -> Result<Option<gradshard_store::FactorTile>> {
        let _ = (task, samples, layer, block, head);
        Ok(None)
    }

    /// Non-attention 2-D tensors stored (name, shape, out_axis), for the MLP
    /// per-channel Fisher of phases 2-4. Empty when none are stored.
    fn other_tensors(&self) -> Vec<OtherTensor>;

    /// Reads one whole non-attention tensor of one sample (an index into
    /// `samples(task)`), row-major in its stored shape, replacing `out`'s contents.
    fn read_other(
        &self,
        task: &TaskName,
        sample: usize,
        tensor: &str,
        out: &mut Vec<f32>,
    ) -> Result<()>;
}
