use std::ops::Range;

use std::sync::Arc;

use gradshard_core::{Block, Geometry, OtherTensor, SampleId, TaskName};

use crate::error::{Error, Result};
use crate::slice::SliceId;

/// What a [`TileSource`] can hand out besides f32 tiles (every source reads f32 tiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileForm {
    /// f32 tiles only.
    F32,
    /// Every slice also as bf16 byte planes (a store of bf16 full slices): half the
    /// bytes of f32, for a backend that takes them.
    Bf16Planes,
    /// Some samples are stored as factors: a device backend may take the factors of a
    /// slice and multiply them out itself.
    Factors,
}

/// One slice of one sample as factors: the slice is `pᵀ s` (`p` is `n × r`, `s` is
/// `n × c`, `r × c` the slice shape). A sample stored as a full slice is given as
/// `p = I_r` (`n = r`) and `s` = the slice, so every sample of a tile has this form.
/// `s` is shared (the Q, K and V slices of a layer share one per sample), and a backend
/// may key its device copies on the `Arc`.
#[derive(Debug, Clone)]
pub struct SliceFactors {
    pub n: usize,
    pub p: Vec<f32>,
    pub s: Arc<Vec<f32>>,
}

/// One slice of several samples as factors, `r × c` the slice shape (`d × D`).
#[derive(Debug, Clone)]
pub struct FactorTile {
    pub r: usize,
    pub c: usize,
    pub samples: Vec<SliceFactors>,
}

impl FactorTile {
    /// f32 values the tile holds (what a device upload moves).
    pub fn values(&self) -> usize {
        self.samples.iter().map(|f| f.p.len() + f.s.len()).sum()
    }
}

fn not_this_form(task: &TaskName, what: &str) -> Error {
    Error::Backend {
        backend: "engine",
        message: format!("task `{task}`: the tile source has no {what}"),
    }
}

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

    /// Reads flattened columns `cols` of `slice` (its head is a kv head for K and V)
    /// of the chosen samples (`samples` are indices into
    /// [`samples(task)`](Self::samples), in any order), into `out`, row-major
    /// `[samples.len() × cols.len()]`, as f32: the signed g as stored. The scorer passes
    /// the whole range `0..d·D` unless the tile does not fit its memory budget.
    /// Implementations are expected to decompress frames in parallel.
    fn read_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> Result<()>;

    /// What the source can hand out besides f32 tiles ([`TileForm`]); the reads of
    /// that form ([`read_tile_bf16_planes`](Self::read_tile_bf16_planes),
    /// [`read_factor_tile`](Self::read_factor_tile)) are only called when it says so.
    fn form(&self) -> TileForm {
        TileForm::F32
    }

    /// A whole-slice tile (`cols` = all of `0..d·D`) as bf16 byte planes: row i of `out`
    /// (`2·d·D` bytes) holds the low bytes of sample `samples[i]`'s values, then their
    /// high bytes. Only when [`form`](Self::form) is [`TileForm::Bf16Planes`].
    fn read_tile_bf16_planes(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        out: &mut [u8],
    ) -> Result<()> {
        let _ = (samples, slice, out);
        Err(not_this_form(task, "bf16 byte planes"))
    }

    /// The whole slice of the chosen samples as factors ([`FactorTile`]). Only when
    /// [`form`](Self::form) is [`TileForm::Factors`].
    fn read_factor_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
    ) -> Result<FactorTile> {
        let _ = (samples, slice);
        Err(not_this_form(task, "factors"))
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
