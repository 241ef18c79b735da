//! Slices and tiles (one slice of many samples): f32 rows, bf16 byte planes, or the
//! factors of factored samples.

use super::*;

impl Store {
    pub(super) fn attn_frame(&self, layer: usize, block: Block, head: usize) -> Result<usize> {
        self.order.attn(layer, block, head).ok_or_else(|| {
            Error::Invalid(format!(
                "store {} holds no slice layer {layer} block {block} head {head} (blocks stored: {:?}, {} layers, {} heads of {block})",
                self.dir.display(),
                self.order.blocks(),
                self.order.geometry().layers,
                self.order.geometry().heads_of(block)
            ))
        })
    }

    /// One (layer, block, head) slice of one sample, `d × D` f32 (one frame read).
    pub fn read_slice(
        &self,
        task: &str,
        id: &SampleId,
        layer: usize,
        block: Block,
        head: usize,
    ) -> Result<Vec<f32>> {
        let frame = self.attn_frame(layer, block, head)?;
        let r = self.sample(task, id)?;
        self.read_frame(r, frame)
    }

    /// A tile: slice (layer, block, head) of the samples at `positions` (into
    /// [`samples`](Self::samples) of `task`), row-major `[positions.len() × d·D]` into `out`.
    /// Frames are decoded in parallel; exactly one frame read per sample.
    pub fn read_tile(
        &self,
        task: &str,
        positions: &[usize],
        layer: usize,
        block: Block,
        head: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.tile_rows(
            task,
            positions,
            (layer, block, head),
            out,
            1,
            |r, p, row| self.read_planned(r, p, row),
        )
    }

    /// The frame of slice `(layer, block, head)` of each sample at `positions`, one
    /// `per_value · d·D`-element row of `out` each, filled by `read` in parallel (each
    /// frame decodes straight into its row).
    pub(super) fn tile_rows<T: Send>(
        &self,
        task: &str,
        positions: &[usize],
        (layer, block, head): (usize, Block, usize),
        out: &mut [T],
        per_value: usize,
        read: impl Fn(&LogRecord, &PlannedRead, &mut [T]) -> Result<()> + Sync,
    ) -> Result<()> {
        let frame = self.attn_frame(layer, block, head)?;
        let chosen = self.chosen(task, positions)?;
        let numel = self.order.geometry().slice_numel();
        if out.len() != chosen.len() * per_value * numel {
            return Err(Error::Invalid(format!(
                "tile buffer holds {} elements, {} samples × {numel} values × {per_value} needed",
                out.len(),
                chosen.len()
            )));
        }
        let plan = self.plan(&chosen, &[frame])?;
        let mut reads = plan.reads;
        reads.sort_by_key(|p| p.slot);
        out.par_chunks_mut(per_value * numel)
            .zip(reads.par_iter())
            .try_for_each(|(row, p)| read(chosen[p.slot], p, row))
    }

    /// [`read_tile`](Self::read_tile) of a bf16 store with each value kept as the two
    /// bytes the frames store: row i of `out` (`2 · d·D` bytes) holds the low bytes of
    /// sample `positions[i]`'s slice, then their high bytes (see
    /// `gradshard_format::widen_bf16`). Half the bytes of the f32 tile and no per-value
    /// work for shuffled frames (zstd decompresses straight into the row). An error for
    /// an f32 store and for samples stored as factors (whose slices are f32 products);
    /// [`bf16_planes`](Self::bf16_planes) says whether every slice can be read this way.
    pub fn read_tile_bf16_planes(
        &self,
        task: &str,
        positions: &[usize],
        layer: usize,
        block: Block,
        head: usize,
        out: &mut [u8],
    ) -> Result<()> {
        if self.manifest.spec.dtype != DType::Bf16 {
            return Err(Error::Invalid(format!(
                "bf16 byte planes asked of a store of {}",
                self.manifest.spec.dtype
            )));
        }
        let numel = self.order.geometry().slice_numel();
        self.tile_rows(task, positions, (layer, block, head), out, 2, |r, p, row| {
            if p.shared.is_some() {
                return Err(Error::Invalid(format!(
                    "task `{}` sample {} is stored as factors: its slices are f32 products, not bf16 frames",
                    r.task, r.id
                )));
            }
            let what = || format!("{} (frame {})", self.order.describe(p.frame), p.frame);
            self.decode_entry(r, &what, p.entry, FrameKind::Full, numel, Dest::Planes(row))
                .map(|_| ())
        })
    }

    /// Whether [`read_tile_bf16_planes`](Self::read_tile_bf16_planes) serves every
    /// slice: a bf16 store with no factored sample.
    pub fn bf16_planes(&self) -> bool {
        self.manifest.spec.dtype == DType::Bf16 && !self.any_factored()
    }

    /// The samples at `positions` of a task (records, checked).
    pub(super) fn chosen(&self, task: &str, positions: &[usize]) -> Result<Vec<&LogRecord>> {
        let recs = self.samples(task)?;
        positions
            .iter()
            .map(|p| {
                recs.get(*p).ok_or_else(|| {
                    Error::Invalid(format!(
                        "task `{task}` has {} samples, asked for #{p}",
                        recs.len()
                    ))
                })
            })
            .collect()
    }

    /// Like [`read_tile`](Self::read_tile), but as factors, for a backend that multiplies
    /// them out on its device: factored samples give their stored P and S (S decoded once
    /// per sample and layer while the shared-factor cache holds it); full samples are
    /// given as `I · slice` (see [`SliceFactors`]). Frames are decoded in parallel.
    pub fn read_factor_tile(
        &self,
        task: &str,
        positions: &[usize],
        layer: usize,
        block: Block,
        head: usize,
    ) -> Result<FactorTile> {
        let frame = self.attn_frame(layer, block, head)?;
        let chosen = self.chosen(task, positions)?;
        let plan = self.plan(&chosen, &[frame])?;
        let mut reads = plan.reads;
        reads.sort_by_key(|p| p.slot);
        let g = self.order.geometry();
        let (r, c) = (g.head_dim, g.hidden);
        let samples = reads
            .par_iter()
            .map(|p| -> Result<SliceFactors> {
                let rec = chosen[p.slot];
                if p.shared.is_some() {
                    let (pf, sf) = self.planned_factors(rec, p)?;
                    return Ok(SliceFactors {
                        n: pf.rows,
                        p: Arc::try_unwrap(pf.values).unwrap_or_else(|a| (*a).clone()),
                        s: sf.values,
                    });
                }
                let numel = self.order.frame_numel(p.frame).expect("planned frame");
                let mut vals = vec![0f32; numel];
                self.read_planned(rec, p, &mut vals)?;
                let mut eye = vec![0f32; r * r];
                for i in 0..r {
                    eye[i * r + i] = 1.0;
                }
                Ok(SliceFactors {
                    n: r,
                    p: eye,
                    s: Arc::new(vals),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FactorTile { r, c, samples })
    }
}
