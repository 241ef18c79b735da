//! The store index as rows: one per frame of a committed sample, shared factors
//! included, as `gradshard inspect --index-parquet` and Python's `Store.index()` list
//! them (schemas/store/index.arrow.json). The frame bytes of every row of a store sum
//! to the bytes of its samples' frames on disk; `verify` counts the same frames.

use gradshard_core::Block;
use gradshard_format::{TableEntry, TableView};
use gradshard_index::{FrameKey, SharedKey};

use crate::{Error, Result, Store};
use gradshard_format::LogRecord;

/// What a frame holds, by representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A full slice or row group (a sample stored as full slices).
    Full,
    /// The per-slice factor P of a factored sample.
    Factor,
    /// A shared factor S of a factored sample (used by several P frames).
    Shared,
}

impl FrameKind {
    /// The index table's spelling: `full`, `factor` or `shared`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FrameKind::Full => "full",
            FrameKind::Factor => "factor",
            FrameKind::Shared => "shared",
        }
    }
}

/// One row of the index: one frame of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameRow {
    /// Position in the sample table: the frame number for full and factor frames,
    /// `frames per sample + j` for shared factor j.
    pub frame: usize,
    pub frame_kind: FrameKind,
    /// `attn` (a head slice, or a layer's attention factor) or `other` (row groups of
    /// another 2-D tensor, or their shared factor).
    pub kind: &'static str,
    pub layer: Option<usize>,
    /// The block of a head slice; `O` for a layer's O output-gradient factor; none for
    /// the attention input factor (shared by Q, K and V).
    pub block: Option<Block>,
    /// Query head for Q/O, kv head for K/V.
    pub head: Option<usize>,
    /// The other tensor's name, or the factor group of its shared factor.
    pub tensor: Option<String>,
    /// Row range of an other tensor's row group.
    pub rows: Option<(usize, usize)>,
    /// Factored samples: the shared factor a factor frame multiplies, or that a shared
    /// frame is (its index in the manifest's shared-factor order).
    pub shared_factor: Option<usize>,
    pub shard: u32,
    pub entry: TableEntry,
}

impl Store {
    /// The index rows of sample `r`: its frames in frame order, then (a factored
    /// sample) its shared factors in table order. Nothing is decoded.
    pub fn frame_rows(&self, r: &LogRecord) -> Result<Vec<FrameRow>> {
        let order = self.order();
        let bad = |detail: String| Error::Sample {
            task: r.task.clone(),
            id: r.id.clone(),
            what: "sample table".into(),
            detail,
        };
        let view =
            TableView::parse_unverified(self.table_bytes(r)?).map_err(|e| bad(e.to_string()))?;
        let n = order.n_frames();
        if view.n_frames as usize != n {
            return Err(bad(format!(
                "lists {} frames, the store has {n} per sample",
                view.n_frames
            )));
        }
        let factored = view.is_factored();
        if factored && view.n_shared as usize != order.n_shared() {
            return Err(bad(format!(
                "lists {} shared factors, the store has {} per factored sample",
                view.n_shared,
                order.n_shared()
            )));
        }
        let mut rows = Vec::with_capacity(n + view.n_shared as usize);
        for f in 0..n {
            let key = order.key(f).expect("frame in range");
            let shared_factor = if factored {
                order.factor_of(f).map(|(j, _, _)| j)
            } else {
                None
            };
            let mut row = FrameRow {
                frame: f,
                frame_kind: if factored {
                    FrameKind::Factor
                } else {
                    FrameKind::Full
                },
                kind: "attn",
                layer: None,
                block: None,
                head: None,
                tensor: None,
                rows: None,
                shared_factor,
                shard: r.shard,
                entry: view.entry(f),
            };
            match key {
                FrameKey::Attn { layer, block, head } => {
                    row.layer = Some(layer);
                    row.block = Some(block);
                    row.head = Some(head);
                }
                FrameKey::Other { tensor, group } => {
                    let ot = &order.others()[tensor];
                    row.kind = "other";
                    row.tensor = Some(ot.name.clone());
                    row.rows = Some(ot.group_rows(group));
                }
            }
            rows.push(row);
        }
        for (j, sf) in order
            .shared()
            .iter()
            .enumerate()
            .take(view.n_shared as usize)
        {
            let mut row = FrameRow {
                frame: n + j,
                frame_kind: FrameKind::Shared,
                kind: "attn",
                layer: None,
                block: None,
                head: None,
                tensor: None,
                rows: None,
                shared_factor: Some(j),
                shard: r.shard,
                entry: view.shared_entry(j),
            };
            match &sf.key {
                SharedKey::AttnIn { layer } => row.layer = Some(*layer),
                SharedKey::OGrad { layer } => {
                    row.layer = Some(*layer);
                    row.block = Some(Block::O);
                }
                SharedKey::Other { group } => {
                    row.kind = "other";
                    row.tensor = Some(group.clone());
                }
            }
            rows.push(row);
        }
        Ok(rows)
    }
}
