//! The unit the scorer reads and scores: one head slice of one attention block.

use gradshard_core::Block;
use serde::{Deserialize, Serialize};

/// One head slice: (layer, block, stored head), where the stored head is a query head
/// for Q and O and a kv head for K and V. A slice is `d × D` values (`d = head_dim`,
/// `D = hidden`) in the canonical orientation of `gradshard_core::SliceSpec::cut`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SliceId {
    pub layer: usize,
    pub block: Block,
    pub head: usize,
}

impl SliceId {
    pub fn new(layer: usize, block: Block, head: usize) -> SliceId {
        SliceId { layer, block, head }
    }

    /// The block-major key `(block, layer, head)`: the order of every per-slice output.
    pub fn block_major(&self) -> (Block, usize, usize) {
        (self.block, self.layer, self.head)
    }

    /// The layer-major key `(layer, block, head)`.
    pub fn layer_major(&self) -> (usize, Block, usize) {
        (self.layer, self.block, self.head)
    }
}
