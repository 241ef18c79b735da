//! `stats/<task>.json`: a task's Welford statistics per attention group and MLP
//! channel, with a checksum of the file's own text.

use std::path::{Path, PathBuf};

use gradshard_core::TaskName;
use gradshard_index::FrameKey;
use serde::{Deserialize, Serialize};

use super::{channels, stats_dir, task_stats_path, StatsLayout, Welford, STATS_VERSION};
use crate::error::{io, Error, Result};
use crate::fsutil;

/// One attention group of `stats/<task>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStat {
    pub layer: usize,
    pub block: String,
    /// A query head for Q/O, a kv head for K/V.
    pub head: usize,
    pub numel: usize,
    /// Mean over samples of Σ_slice C: the group Fisher (sum over the group of E[C]).
    pub mean: f64,
    /// Welford M2 of the same per-sample sums (sample variance = m2 / (n - 1)).
    pub m2: f64,
}

/// Per-output-channel statistics of one other (MLP) tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelStat {
    pub tensor: String,
    pub shape: [usize; 2],
    pub out_axis: u8,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// `stats/<task>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub format: String,
    pub version: u32,
    pub task: TaskName,
    pub n_samples: u64,
    pub tokens_total: u64,
    /// XXH3-64 (hex) of the task's committed sample ids in store order: a reader
    /// can check that the file describes exactly the samples the store holds.
    pub ids_xxh3: String,
    /// How the file was made: "rebuilt" (collect) or "chan-merge" (merge).
    pub method: String,
    pub quantity: String,
    pub groups: Vec<GroupStat>,
    pub channels: Vec<ChannelStat>,
    /// XXH3-64 (hex) of the file's text with this value replaced by 16 zeros. A value
    /// edited by hand, or damaged, no longer matches: `verify` reports it, `merge`
    /// refuses it, `score` warns.
    #[serde(default)]
    pub checksum: String,
}

pub const QUANTITY: &str = "per-sample sums over each group of C = g^2/T (g as stored, f64); mean = group Fisher = sum over the group of E[C]; m2 = Welford M2 of the per-sample sums";

impl TaskStats {
    pub fn from_welford(
        layout: &StatsLayout,
        task: &TaskName,
        w: &Welford,
        tokens_total: u64,
        ids_xxh3: String,
        method: &str,
    ) -> TaskStats {
        let order = &layout.order;
        let g = order.geometry();
        let mut groups = Vec::with_capacity(layout.n_attn);
        for f in 0..layout.n_attn {
            if let Some(FrameKey::Attn { layer, block, head }) = order.key(f) {
                groups.push(GroupStat {
                    layer,
                    block: block.as_str().to_string(),
                    head,
                    numel: g.slice_numel(),
                    mean: w.mean[f],
                    m2: w.m2[f],
                });
            }
        }
        let channels = order
            .others()
            .iter()
            .zip(&layout.chan_base)
            .map(|(t, &b)| {
                let n = self::channels(t);
                ChannelStat {
                    tensor: t.name.clone(),
                    shape: t.shape,
                    out_axis: t.out_axis,
                    mean: w.mean[b..b + n].to_vec(),
                    m2: w.m2[b..b + n].to_vec(),
                }
            })
            .collect();
        TaskStats {
            format: "gradshard-task-stats".into(),
            version: STATS_VERSION,
            task: task.clone(),
            n_samples: w.n,
            tokens_total,
            ids_xxh3,
            method: method.into(),
            quantity: QUANTITY.into(),
            groups,
            channels,
            checksum: String::new(),
        }
    }

    /// Back to the flat accumulator (for Chan merges).
    pub fn to_welford(&self, layout: &StatsLayout, path: &Path) -> Result<Welford> {
        let bad = |what: String| Error::Stats {
            path: path.to_path_buf(),
            what,
        };
        if self.groups.len() != layout.n_attn || self.channels.len() != layout.chan_base.len() {
            return Err(bad(format!(
                "{} groups and {} channel tensors, the store's layout has {} and {}",
                self.groups.len(),
                self.channels.len(),
                layout.n_attn,
                layout.chan_base.len()
            )));
        }
        let mut w = Welford::new(layout.len);
        w.n = self.n_samples;
        for (i, gs) in self.groups.iter().enumerate() {
            w.mean[i] = gs.mean;
            w.m2[i] = gs.m2;
        }
        for ((c, t), &b) in self
            .channels
            .iter()
            .zip(layout.order.others())
            .zip(&layout.chan_base)
        {
            let n = channels(t);
            if c.tensor != t.name || c.mean.len() != n || c.m2.len() != n {
                return Err(bad(format!(
                    "channel statistics of `{}` do not match the store's tensor `{}` ({n} channels)",
                    c.tensor, t.name
                )));
            }
            w.mean[b..b + n].copy_from_slice(&c.mean);
            w.m2[b..b + n].copy_from_slice(&c.m2);
        }
        Ok(w)
    }

    /// The file's text with its checksum value zeroed, and where that value sits.
    /// `checksum` is the struct's last field, so its key is the last one in the text.
    fn checksum_slot(text: &str) -> Option<(String, std::ops::Range<usize>)> {
        const KEY: &str = "\"checksum\": \"";
        let at = text.rfind(KEY)? + KEY.len();
        let end = at + text[at..].find('"')?;
        let mut zeroed = text.to_string();
        zeroed.replace_range(at..end, &"0".repeat(16));
        Some((zeroed, at..end))
    }

    /// XXH3-64 (hex) of `text` with its checksum value replaced by 16 zeros.
    fn text_checksum(text: &str) -> Option<String> {
        let (zeroed, _) = Self::checksum_slot(text)?;
        Some(format!(
            "{:016x}",
            gradshard_format::checksum(&[zeroed.as_bytes()])
        ))
    }

    /// Reads and checks a statistics file: format, version and content checksum.
    pub fn load(path: &Path) -> Result<TaskStats> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let s: TaskStats = serde_json::from_str(&text).map_err(|e| Error::Stats {
            path: path.to_path_buf(),
            what: format!("not a statistics file: {e}"),
        })?;
        if s.version == 1 {
            return Err(Error::StatsWithoutChecksum {
                path: path.to_path_buf(),
                store: store_of(path),
            });
        }
        if s.version != STATS_VERSION {
            return Err(Error::Stats {
                path: path.to_path_buf(),
                what: format!(
                    "statistics version {} (this gradshard reads {STATS_VERSION})",
                    s.version
                ),
            });
        }
        let want = Self::text_checksum(&text).unwrap_or_default();
        if s.checksum != want {
            return Err(Error::Stats {
                path: path.to_path_buf(),
                what: format!(
                    "checksum mismatch (stored {:?}, content gives {want}): the file was edited or damaged, so its numbers cannot be trusted; `gradshard salvage --store {}` rebuilds it from the samples",
                    s.checksum,
                    store_of(path).display()
                ),
            });
        }
        Ok(s)
    }

    /// Written atomically (temp file, fsync, rename), with its content checksum.
    pub fn save(&self, store: &Path) -> Result<PathBuf> {
        let dir = stats_dir(store);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = task_stats_path(store, &self.task);
        let mut me = self.clone();
        me.checksum = "0".repeat(16);
        let mut text = serde_json::to_string_pretty(&me).map_err(|e| Error::Stats {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let (_, slot) = Self::checksum_slot(&text).expect("the checksum field is written");
        let sum = Self::text_checksum(&text).expect("the checksum field is written");
        text.replace_range(slot, &sum);
        fsutil::write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// The store directory of a file in its `stats/` folder.
fn store_of(path: &Path) -> PathBuf {
    path.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}
