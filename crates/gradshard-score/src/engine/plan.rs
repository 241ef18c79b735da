//! Validation and planning: which slices a run scores, in which order, and which
//! stored rows of each task it reads.

use std::collections::{BTreeSet, HashMap, HashSet};

use gradshard_core::{Block, Geometry, SampleId, TaskName};

use crate::conflicts::Analysed;
use crate::error::{Error, Result};
use crate::options::ScoreOptions;
use crate::slice::SliceId;
use crate::source::{TileForm, TileSource};

/// The slices of a run, validated against the source.
pub(super) struct Selection {
    pub g: Geometry,
    /// Values per slice (`d · D`).
    pub s_len: usize,
    pub blocks: BTreeSet<Block>,
    /// In visiting order (layer-major for a factored store, else block-major).
    pub slices: Vec<SliceId>,
    /// Block-major rank of each slice: the order of the outputs.
    pub slice_rank: HashMap<(Block, usize, usize), usize>,
    pub layer_major: bool,
    /// Slices whose full pair matrix is returned.
    pub pairs_for: HashSet<(Block, usize, usize)>,
}

impl Selection {
    /// Checks the options against the source's geometry and lists the slices to score.
    pub fn new(source: &dyn TileSource, opts: &ScoreOptions) -> Result<Selection> {
        opts.validate()?;
        let g: Geometry = source.geometry().clone();
        if let Some(expected) = &opts.expected_geometry {
            if *expected != g {
                return Err(Error::GeometryMismatch {
                    what: "source geometry vs expected".into(),
                    expected: format!("{expected:?}"),
                    found: format!("{g:?}"),
                });
            }
        }
        let s_len = g.slice_numel();
        if s_len == 0 {
            return Err(Error::GeometryMismatch {
                what: "slice size".into(),
                expected: "> 0".into(),
                found: "0".into(),
            });
        }

        // Which layers / heads / blocks.
        let layers: Vec<usize> = match &opts.layers {
            None => (0..g.layers).collect(),
            Some(ls) => {
                let set: BTreeSet<usize> = ls.iter().copied().collect();
                if let Some(&bad) = set.iter().find(|&&l| l >= g.layers) {
                    return Err(Error::InvalidOption {
                        name: "layers",
                        why: format!("layer {bad} does not exist (the model has {})", g.layers),
                    });
                }
                set.into_iter().collect()
            }
        };
        if let Some(hs) = &opts.heads {
            if let Some(&bad) = hs.iter().find(|&&h| h >= g.heads) {
                return Err(Error::InvalidOption {
                    name: "heads",
                    why: format!(
                        "query head {bad} does not exist (the model has {})",
                        g.heads
                    ),
                });
            }
        }
        for &(l, h) in &opts.pairs_for {
            if l >= g.layers || h >= g.heads {
                return Err(Error::InvalidOption {
                    name: "pairs_for",
                    why: format!("(layer {l}, head {h}) is outside the model"),
                });
            }
        }
        let q_selected = |h: usize| opts.heads.as_ref().is_none_or(|hs| hs.contains(&h));
        let blocks: BTreeSet<Block> = opts.blocks.iter().copied().collect();
        for &b in &blocks {
            if !source.has_block(b) {
                return Err(Error::MissingBlock { block: b });
            }
        }
        let mut slices = Vec::new();
        for &block in &blocks {
            for &layer in &layers {
                for head in 0..g.heads_of(block) {
                    let wanted = if block.is_kv() {
                        (0..g.heads).any(|h| g.kv_head_of(h) == head && q_selected(h))
                    } else {
                        q_selected(head)
                    };
                    if wanted {
                        slices.push(SliceId { block, layer, head });
                    }
                }
            }
        }
        // A factored store's Q, K and V slices of one layer share a factor S per sample (and
        // its O slices another): visiting the slices layer by layer decodes (and, on a
        // device, uploads) each S once. Outputs keep the block-major order.
        let slice_rank: HashMap<(Block, usize, usize), usize> = slices
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.block, s.layer, s.head), i))
            .collect();
        let layer_major = source.form() == TileForm::Factors;
        if layer_major {
            slices.sort_by_key(|s| (s.layer, s.block, s.head));
        }
        if slices.is_empty() {
            return Err(Error::InvalidOption {
                name: "heads",
                why: "the selection contains no slice".into(),
            });
        }
        for &(l, h) in &opts.pairs_for {
            if !layers.contains(&l) || !q_selected(h) {
                return Err(Error::InvalidOption {
                    name: "pairs_for",
                    why: format!("(layer {l}, head {h}) is not among the scored layers and heads"),
                });
            }
        }
        let gr = &g;
        let pairs_for: HashSet<(Block, usize, usize)> = blocks
            .iter()
            .flat_map(|&b| {
                opts.pairs_for
                    .iter()
                    .map(move |&(l, h)| (b, l, if b.is_kv() { gr.kv_head_of(h) } else { h }))
            })
            .collect();

        Ok(Selection {
            g,
            s_len,
            blocks,
            slices,
            slice_rank,
            layer_major,
            pairs_for,
        })
    }
}

/// One task's part of the plan.
pub(super) struct TaskPlan {
    pub(super) name: TaskName,
    pub(super) all: Vec<(SampleId, u32)>,
    /// Stored indices read for every slice (ascending).
    pub(super) rows: Vec<usize>,
    /// 1/T of `rows`.
    pub(super) rows_inv_t: Vec<f64>,
    /// Positions within `rows` of the scored samples (ascending).
    pub(super) sel_pos: Vec<usize>,
    /// 1/T of the scored samples.
    pub(super) sel_inv_t: Vec<f64>,
}

impl TaskPlan {
    pub(super) fn new(
        source: &dyn TileSource,
        name: &TaskName,
        subset: Option<&Vec<SampleId>>,
        need_fisher: bool,
    ) -> Result<TaskPlan> {
        let all = source.samples(name)?;
        if all.is_empty() {
            return Err(Error::EmptyTask {
                task: name.to_string(),
            });
        }
        for (id, t) in &all {
            if *t == 0 {
                return Err(Error::ZeroTokens {
                    task: name.to_string(),
                    id: id.clone(),
                });
            }
        }
        let selected: Vec<usize> = match subset {
            None => (0..all.len()).collect(),
            Some(ids) => {
                let index: HashMap<&SampleId, usize> =
                    all.iter().enumerate().map(|(i, (id, _))| (id, i)).collect();
                let mut set = BTreeSet::new();
                for id in ids {
                    let i = index.get(id).ok_or_else(|| Error::UnknownSample {
                        task: name.to_string(),
                        id: id.clone(),
                    })?;
                    set.insert(*i);
                }
                if set.is_empty() {
                    return Err(Error::EmptyTask {
                        task: name.to_string(),
                    });
                }
                set.into_iter().collect()
            }
        };
        let rows: Vec<usize> = if need_fisher {
            (0..all.len()).collect()
        } else {
            selected.clone()
        };
        let pos: HashMap<usize, usize> = rows.iter().enumerate().map(|(p, r)| (*r, p)).collect();
        let sel_pos: Vec<usize> = selected.iter().map(|s| pos[s]).collect();
        let inv = |i: usize| 1.0 / all[i].1 as f64;
        Ok(TaskPlan {
            name: name.clone(),
            rows_inv_t: rows.iter().map(|&r| inv(r)).collect(),
            sel_inv_t: selected.iter().map(|&r| inv(r)).collect(),
            rows,
            sel_pos,
            all,
        })
    }

    pub(super) fn scored(&self) -> Vec<(SampleId, u32)> {
        self.sel_pos
            .iter()
            .map(|&p| self.all[self.rows[p]].clone())
            .collect()
    }

    /// The scored samples as phase 5 names them.
    pub(super) fn analysed(&self) -> Analysed<'_> {
        Analysed {
            task: &self.name,
            ids: self.scored().into_iter().map(|(id, _)| id).collect(),
            index: (0..self.sel_pos.len())
                .map(|q| self.stored_index_of_selected(q))
                .collect(),
        }
    }

    pub(super) fn stored_index_of_selected(&self, q: usize) -> usize {
        self.rows[self.sel_pos[q]]
    }
}
