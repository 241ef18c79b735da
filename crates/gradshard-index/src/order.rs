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

/// What one shared factor S of a factored sample is (docs/format.md, "Factored samples").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SharedKey {
    /// The attention input of a layer (after its norm): S of every Q, K and V slice.
    AttnIn { layer: usize },
    /// The gradient of a layer's attention output projection (n × D): S of every O slice.
    OGrad { layer: usize },
    /// S of the row groups of `other_tensors` whose `factor_group` (else name) is this.
    Other { group: String },
}

/// One shared factor: what it is and its columns (its rows are the sample's n).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFactor {
    pub key: SharedKey,
    pub cols: usize,
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
    /// Shared factors of a factored sample, in table order.
    shared: Vec<SharedFactor>,
    /// Shared-factor index of the attention blocks of layer 0 (Q K V O), per layer + stride.
    attn_shared: [Option<usize>; 4],
    shared_per_layer: usize,
    /// Shared-factor index of each other tensor.
    other_shared: Vec<usize>,
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
        // Shared factors: per layer the attention input (if Q, K or V is stored) and the
        // O output gradient (if O is stored); then one per factor group of other tensors.
        let mut attn_shared = [None; 4];
        let mut shared_per_layer = 0;
        if bl.iter().any(|b| *b != Block::O) {
            for b in bl.iter().filter(|b| **b != Block::O) {
                attn_shared[b.index()] = Some(0);
            }
            shared_per_layer += 1;
        }
        if bl.contains(&Block::O) {
            attn_shared[Block::O.index()] = Some(shared_per_layer);
            shared_per_layer += 1;
        }
        let mut shared = Vec::new();
        for layer in 0..geometry.layers {
            if attn_shared[Block::Q.index()].is_some()
                || attn_shared[Block::K.index()].is_some()
                || attn_shared[Block::V.index()].is_some()
            {
                shared.push(SharedFactor {
                    key: SharedKey::AttnIn { layer },
                    cols: geometry.hidden,
                });
            }
            if attn_shared[Block::O.index()].is_some() {
                shared.push(SharedFactor {
                    key: SharedKey::OGrad { layer },
                    cols: geometry.hidden,
                });
            }
        }
        let mut other_shared = Vec::with_capacity(others.len());
        for t in others {
            let key = SharedKey::Other {
                group: t.factor_group.clone().unwrap_or_else(|| t.name.clone()),
            };
            let j = match shared.iter().position(|s| s.key == key) {
                Some(j) => j,
                None => {
                    shared.push(SharedFactor {
                        key,
                        cols: t.shape[1],
                    });
                    shared.len() - 1
                }
            };
            other_shared.push(j);
        }
        FrameOrder {
            geometry: geometry.clone(),
            blocks: bl,
            others: others.to_vec(),
            block_base,
            per_layer,
            other_base,
            shared,
            attn_shared,
            shared_per_layer,
            other_shared,
        }
    }

    /// Shared factors of a factored sample, in table order.
    pub fn shared(&self) -> &[SharedFactor] {
        &self.shared
    }

    /// Shared factors per sample (the `n_shared` of a factored sample's table).
    pub fn n_shared(&self) -> usize {
        self.shared.len()
    }

    /// For a factored sample, frame `frame` is `P_fᵀ S_j` with P_f `n × rows` and S_j
    /// `n × cols`: returns `(j, rows, cols)`.
    pub fn factor_of(&self, frame: usize) -> Option<(usize, usize, usize)> {
        match self.key(frame)? {
            FrameKey::Attn { layer, block, .. } => {
                let j = layer * self.shared_per_layer + self.attn_shared[block.index()]?;
                Some((j, self.geometry.head_dim, self.geometry.hidden))
            }
            FrameKey::Other { tensor, group } => {
                let t = &self.others[tensor];
                let (a, b) = t.group_rows(group);
                Some((self.other_shared[tensor], b - a, t.shape[1]))
            }
        }
    }

    /// Human-readable name of a shared factor, for error messages.
    pub fn describe_shared(&self, j: usize) -> String {
        match self.shared.get(j).map(|s| &s.key) {
            Some(SharedKey::AttnIn { layer }) => format!("layer {layer} attention input factor"),
            Some(SharedKey::OGrad { layer }) => format!("layer {layer} O output-gradient factor"),
            Some(SharedKey::Other { group }) => format!("shared factor of `{group}`"),
            None => format!("shared factor {j} (out of range)"),
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
            factor_group: None,
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
