use gradshard_core::{Block, Geometry, OtherTensor};

/// What one frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKey {
    /// Head slice; `head` is a kv head for K and V.
    Attn {
        layer: usize,
        block: Block,
        head: usize,
    },
    /// Row group `group` of `other_tensors[tensor]`.
    Other { tensor: usize, group: usize },
}

/// The frame order of every sample of a store (docs/format.md, "Frame order"):
/// attention frames layer by layer, stored blocks in Q K V O order, heads in
/// order; then the row groups of each other tensor.
#[derive(Debug, Clone)]
pub struct FrameOrder {
    geometry: Geometry,
    blocks: Vec<Block>,
    others: Vec<OtherTensor>,
    /// Frame number of head 0 of each block within a layer (None when not stored).
    block_base: [Option<usize>; 4],
    per_layer: usize,
    /// First frame number of each other tensor, plus the total at the end.
    other_base: Vec<usize>,
}

impl FrameOrder {
    /// `blocks` are deduplicated and put in Q K V O order.
    pub fn new(geometry: &Geometry, blocks: &[Block], others: &[OtherTensor]) -> FrameOrder {
        let mut bl: Vec<Block> = Block::ALL
            .into_iter()
            .filter(|b| blocks.contains(b))
            .collect();
        bl.dedup();
        let mut block_base = [None; 4];
        let mut per_layer = 0;
        for b in &bl {
            block_base[b.index()] = Some(per_layer);
            per_layer += geometry.heads_of(*b);
        }
        let mut other_base = Vec::with_capacity(others.len() + 1);
        let mut n = per_layer * geometry.layers;
        for t in others {
            other_base.push(n);
            n += t.groups();
        }
        other_base.push(n);
        FrameOrder {
            geometry: geometry.clone(),
            blocks: bl,
            others: others.to_vec(),
            block_base,
            per_layer,
            other_base,
        }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub fn others(&self) -> &[OtherTensor] {
        &self.others
    }

    /// Frames per sample.
    pub fn n_frames(&self) -> usize {
        *self.other_base.last().expect("non-empty")
    }

    /// Number of attention frames per sample (they come first).
    pub fn n_attn_frames(&self) -> usize {
        self.per_layer * self.geometry.layers
    }

    pub fn has_block(&self, block: Block) -> bool {
        self.block_base[block.index()].is_some()
    }

    /// Frame number of slice (layer, block, head), if stored.
    pub fn attn(&self, layer: usize, block: Block, head: usize) -> Option<usize> {
        let base = self.block_base[block.index()]?;
        (layer < self.geometry.layers && head < self.geometry.heads_of(block))
            .then(|| layer * self.per_layer + base + head)
    }

    /// Index of the other tensor named `name`.
    pub fn other_index(&self, name: &str) -> Option<usize> {
        self.others.iter().position(|t| t.name == name)
    }

    /// Frame number of row group `group` of other tensor `tensor`.
    pub fn other(&self, tensor: usize, group: usize) -> Option<usize> {
        let t = self.others.get(tensor)?;
        (group < t.groups()).then(|| self.other_base[tensor] + group)
    }

    /// Frames holding rows `[start, end)` of other tensor `tensor`.
    pub fn other_rows(
        &self,
        tensor: usize,
        start: usize,
        end: usize,
    ) -> Option<std::ops::Range<usize>> {
        let t = self.others.get(tensor)?;
        if start >= end || end > t.shape[0] {
            return None;
        }
        let g0 = start / t.rows_per_group;
        let g1 = (end - 1) / t.rows_per_group;
        Some(self.other_base[tensor] + g0..self.other_base[tensor] + g1 + 1)
    }

    /// What frame `frame` holds.
    pub fn key(&self, frame: usize) -> Option<FrameKey> {
        if frame < self.n_attn_frames() {
            let layer = frame / self.per_layer;
            let within = frame % self.per_layer;
            for b in self.blocks.iter().rev() {
                let base = self.block_base[b.index()].expect("stored block");
                if within >= base {
                    return Some(FrameKey::Attn {
                        layer,
                        block: *b,
                        head: within - base,
                    });
                }
            }
            unreachable!("within < per_layer");
        }
        let t = self.other_base.partition_point(|b| *b <= frame);
        if t == 0 || t >= self.other_base.len() {
            return None;
        }
        Some(FrameKey::Other {
            tensor: t - 1,
            group: frame - self.other_base[t - 1],
        })
    }

    /// Values (elements) in frame `frame`.
    pub fn frame_numel(&self, frame: usize) -> Option<usize> {
        Some(match self.key(frame)? {
            FrameKey::Attn { .. } => self.geometry.slice_numel(),
            FrameKey::Other { tensor, group } => {
                let t = &self.others[tensor];
                let (a, b) = t.group_rows(group);
                (b - a) * t.shape[1]
            }
        })
    }

    /// Human-readable name of a frame, for error messages.
    pub fn describe(&self, frame: usize) -> String {
        match self.key(frame) {
            Some(FrameKey::Attn { layer, block, head }) => {
                let kind = if block.is_kv() { "kv head" } else { "head" };
                format!("layer {layer} block {block} {kind} {head}")
            }
            Some(FrameKey::Other { tensor, group }) => {
                let t = &self.others[tensor];
                let (a, b) = t.group_rows(group);
                format!("tensor `{}` rows {a}..{b}", t.name)
            }
            None => format!("frame {frame} (out of range)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gradshard_core::Layout;

    #[test]
    fn keys_round_trip() {
        let g = Geometry::new("llama", Layout::SplitLinear, "model.", 3, 64, 4, 2, 16).unwrap();
        let others = vec![OtherTensor {
            name: "mlp".into(),
            shape: [10, 64],
            rows_per_group: 4,
            out_axis: 0,
        }];
        for blocks in [Block::ALL.to_vec(), vec![Block::O, Block::K]] {
            let o = FrameOrder::new(&g, &blocks, &others);
            let per_layer: usize = blocks.iter().map(|b| g.heads_of(*b)).sum();
            assert_eq!(o.n_frames(), 3 * per_layer + 3);
            for f in 0..o.n_frames() {
                let k = o.key(f).unwrap();
                let back = match k {
                    FrameKey::Attn { layer, block, head } => o.attn(layer, block, head),
                    FrameKey::Other { tensor, group } => o.other(tensor, group),
                };
                assert_eq!(back, Some(f));
            }
            assert_eq!(o.key(o.n_frames()), None);
        }
        let o = FrameOrder::new(&g, &[Block::Q], &others);
        assert_eq!(o.attn(0, Block::K, 0), None);
        assert_eq!(
            o.other_rows(0, 3, 9),
            Some(o.other(0, 0).unwrap()..o.other(0, 2).unwrap() + 1)
        );
        assert_eq!(o.frame_numel(o.other(0, 2).unwrap()), Some(2 * 64));
    }
}
