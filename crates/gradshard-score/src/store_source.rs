//! The scorer's read seam implemented for a gradshard store.

use std::ops::Range;

use crate::slice::SliceId;
use crate::source::{FactorTile, SliceFactors, TileForm};
use crate::{Error, Result, TileSource};
use gradshard_core::{Block, Geometry, OtherTensor, SampleId, TaskName};
use gradshard_store::Store;

/// A [`Store`] seen by the scorer.
pub struct StoreSource<'a> {
    pub store: &'a Store,
}

impl StoreSource<'_> {
    /// What an error reading one slice of a task names.
    fn slice_ctx(&self, task: &TaskName, s: SliceId) -> String {
        format!(
            "store {}: task `{task}` layer {} block {} head {}",
            self.store.dir().display(),
            s.layer,
            s.block,
            s.head
        )
    }
}

impl TileSource for StoreSource<'_> {
    fn geometry(&self) -> &Geometry {
        self.store.order().geometry()
    }

    fn samples(&self, task: &TaskName) -> Result<Vec<(SampleId, u32)>> {
        let recs = self
            .store
            .samples(task.as_str())
            .map_err(|e| Error::source(format!("store {}", self.store.dir().display()), e))?;
        Ok(recs.iter().map(|r| (r.id.clone(), r.tokens)).collect())
    }

    fn has_block(&self, block: Block) -> bool {
        self.store.order().has_block(block)
    }

    fn read_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        let SliceId { layer, block, head } = slice;
        let ctx = || self.slice_ctx(task, slice);
        let numel = self.geometry().slice_numel();
        if cols == (0..numel) {
            return self
                .store
                .read_tile(task.as_str(), samples, layer, block, head, out)
                .map_err(|e| Error::source(ctx(), e));
        }
        // A column chunk (the scorer's memory budget): decode whole frames, keep the columns.
        let w = cols.len();
        let mut full = vec![0f32; numel];
        for (i, s) in samples.iter().enumerate() {
            self.store
                .read_tile(task.as_str(), &[*s], layer, block, head, &mut full)
                .map_err(|e| Error::source(ctx(), e))?;
            out[i * w..(i + 1) * w].copy_from_slice(&full[cols.clone()]);
        }
        Ok(())
    }

    fn form(&self) -> TileForm {
        if self.store.any_factored() {
            TileForm::Factors
        } else if self.store.bf16_planes() {
            TileForm::Bf16Planes
        } else {
            TileForm::F32
        }
    }

    fn read_tile_bf16_planes(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
        out: &mut [u8],
    ) -> Result<()> {
        let SliceId { layer, block, head } = slice;
        self.store
            .read_tile_bf16_planes(task.as_str(), samples, layer, block, head, out)
            .map_err(|e| Error::source(self.slice_ctx(task, slice), e))
    }

    fn read_factor_tile(
        &self,
        task: &TaskName,
        samples: &[usize],
        slice: SliceId,
    ) -> Result<FactorTile> {
        let SliceId { layer, block, head } = slice;
        let t = self
            .store
            .read_factor_tile(task.as_str(), samples, layer, block, head)
            .map_err(|e| Error::source(self.slice_ctx(task, slice), e))?;
        // The store's factors, moved into the scorer's own type (no values copied).
        Ok(FactorTile {
            r: t.r,
            c: t.c,
            samples: t
                .samples
                .into_iter()
                .map(|f| SliceFactors {
                    n: f.n,
                    p: f.p,
                    s: f.s,
                })
                .collect(),
        })
    }

    fn other_tensors(&self) -> Vec<OtherTensor> {
        self.store.order().others().to_vec()
    }

    fn read_other(
        &self,
        task: &TaskName,
        sample: usize,
        tensor: &str,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let recs = self
            .store
            .samples(task.as_str())
            .map_err(|e| Error::source(format!("store {}", self.store.dir().display()), e))?;
        let id = &recs
            .get(sample)
            .ok_or_else(|| {
                Error::source(
                    format!("task `{task}`"),
                    std::io::Error::other(format!("no sample #{sample}")),
                )
            })?
            .id;
        let (_, v) = self
            .store
            .read_tensor(task.as_str(), id, tensor)
            .map_err(|e| {
                Error::source(format!("task `{task}` sample {id} tensor `{tensor}`"), e)
            })?;
        *out = v;
        Ok(())
    }
}
