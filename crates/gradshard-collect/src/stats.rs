//! Running Fisher statistics of a store, per task (docs/format.md, "Statistics").
//!
//! For every committed sample i the collector records a vector of per-sample
//! sums s_i of C_i = g_i²/T_i:
//! - one entry per attention frame (layer, block, head): the sum of C_i over the
//!   slice's d·D elements;
//! - one entry per output channel of each other stored 2-D tensor (MLP): the
//!   sum of C_i over that channel's row (out_axis 0) or column (out_axis 1).
//!
//! The group Fisher is the sum over the group's elements of E[C] = the mean of
//! s_i over the task's samples, so Welford mean and M2 of s_i give it with its
//! spread. (E[g])² is never formed.
//!
//! Crash safety: the per-sample vectors go to an append-only, checksummed side
//! log (`stats/samples.bin`), written before the sample is handed to the store
//! writer. The per-task files `stats/<task>.json` are always *rebuilt* from the
//! committed samples of the store (in store order): the side-log record of a
//! sample when there is one, else the sums recomputed from the sample's stored
//! frames. A sample that never committed is therefore never counted, and one
//! that committed is counted exactly once, whatever was killed when.
//! C is computed from g *as stored* (bf16-rounded in a bf16 store), so the
//! two sources agree bit for bit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gradshard_core::{DType, OtherTensor, SampleId, TaskName};
use gradshard_format::LogRecord;
use gradshard_index::{FrameKey, FrameOrder};
use gradshard_store::{fsutil, Store};
use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result};

/// Folder of the statistics inside a store.
pub const STATS_DIR: &str = "stats";
/// Per-sample sums, append-only.
pub const SIDE_LOG: &str = "samples.bin";
const SIDE_MAGIC: &[u8; 8] = b"GSSTATS1";
const SIDE_HEADER_LEN: u64 = 16;
/// Version of `stats/<task>.json` (2: carries a checksum of its content).
pub const STATS_VERSION: u32 = 2;

pub fn stats_dir(store: &Path) -> PathBuf {
    store.join(STATS_DIR)
}

/// `stats/<task>.json`.
pub fn task_stats_path(store: &Path, task: &TaskName) -> PathBuf {
    stats_dir(store).join(format!("{task}.json"))
}

/// `stats/<task>.fisher.safetensors`.
pub fn full_fisher_path(store: &Path, task: &TaskName) -> PathBuf {
    stats_dir(store).join(format!("{task}.fisher.safetensors"))
}

/// `Σ v²` in f64, each `v` first rounded to bf16 when `bf16` (as a bf16 store holds
/// it). Eight interleaved partial sums (lane `l` takes the elements at `l mod 8`),
/// added pairwise at the end: a fixed order, so the collector and the recomputation
/// from stored frames get the same bits, and one the compiler vectorises (a single
/// running sum is one dependent f64 add per element: the statistics of a full sample
/// were ~10 % of a batched collect, almost all of it that chain).
pub fn sum_sq(values: &[f32], bf16: bool) -> f64 {
    #[inline(always)]
    fn body<const BF16: bool>(values: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = values.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let v = if BF16 { round_bf16(v) } else { v } as f64;
                *a += v * v;
            }
        }
        for (a, &v) in acc.iter_mut().zip(rest) {
            let v = if BF16 { round_bf16(v) } else { v } as f64;
            *a += v * v;
        }
        ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<const BF16: bool>(values: &[f32]) -> f64 {
            body::<BF16>(values)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe {
                if bf16 {
                    avx2::<true>(values)
                } else {
                    avx2::<false>(values)
                }
            };
        }
    }
    if bf16 {
        body::<true>(values)
    } else {
        body::<false>(values)
    }
}

/// `v` rounded to the nearest bf16 (ties to even), as f32: the same value as
/// `bf16_bits_to_f32(f32_to_bf16_bits(v))` for every input but NaN (which stays a
/// NaN), with no branch but one select, so that loops over it vectorise.
#[inline(always)]
fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    if v.is_nan() {
        v
    } else {
        r
    }
}

/// Where each per-sample sum lives in the stats vector of a store.
#[derive(Debug, Clone)]
pub struct StatsLayout {
    order: FrameOrder,
    dtype: DType,
    n_attn: usize,
    /// First entry of each other tensor's channels.
    chan_base: Vec<usize>,
    len: usize,
}

fn channels(t: &OtherTensor) -> usize {
    t.shape[usize::from(t.out_axis)]
}

impl StatsLayout {
    pub fn new(order: &FrameOrder, dtype: DType) -> StatsLayout {
        let n_attn = order.n_attn_frames();
        let mut chan_base = Vec::with_capacity(order.others().len());
        let mut len = n_attn;
        for t in order.others() {
            chan_base.push(len);
            len += channels(t);
        }
        StatsLayout {
            order: order.clone(),
            dtype,
            n_attn,
            chan_base,
            len,
        }
    }

    /// Entries per sample.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn order(&self) -> &FrameOrder {
        &self.order
    }

    /// Σ g² of an attention frame's values (what [`Self::accumulate`] adds for it).
    pub fn attn_sum(&self, values: &[f32]) -> f64 {
        sum_sq(values, self.dtype == DType::Bf16)
    }

    /// Adds Σ g² of frame `frame` (values in canonical order, f32) into `sums`,
    /// with g rounded to the store's dtype first. Call [`Self::finish_sample`] after
    /// the sample's last frame.
    pub fn accumulate(&self, frame: usize, values: &[f32], sums: &mut [f64]) {
        let bf16 = self.dtype == DType::Bf16;
        let sq = |v: f32| {
            let v = if bf16 { round_bf16(v) } else { v } as f64;
            v * v
        };
        match self.order.key(frame) {
            Some(FrameKey::Attn { .. }) => {
                sums[frame] += self.attn_sum(values);
            }
            Some(FrameKey::Other { tensor, group }) => {
                let t = &self.order.others()[tensor];
                let base = self.chan_base[tensor];
                let (a, _) = t.group_rows(group);
                let cols = t.shape[1];
                for (r, row) in values.chunks_exact(cols).enumerate() {
                    if t.out_axis == 0 {
                        sums[base + a + r] += sum_sq(row, bf16);
                    } else {
                        for (c, v) in row.iter().enumerate() {
                            sums[base + c] += sq(*v);
                        }
                    }
                }
            }
            None => {}
        }
    }

    /// Adds Σ g² of frame `frame` of a factored sample, g = Pᵀ S, into `sums` without
    /// forming g: `p` (`n × r`) and `s` (`n × c`) are the factors as stored (already
    /// rounded to the store's dtype), `gram_s` = S Sᵀ. Attention frames take
    /// Σ (P Pᵀ) ∘ (S Sᵀ); row groups per output channel `p_iᵀ (S Sᵀ) p_i` (`[out, in]`)
    /// or `s_cᵀ (P Pᵀ) s_c` (Conv1D `[in, out]`, channels are columns).
    pub fn accumulate_factored(
        &self,
        frame: usize,
        p: &[f32],
        s: &[f32],
        n: usize,
        gram_s: &[f64],
        sums: &mut [f64],
    ) {
        self.factored_terms(frame, p, s, n, gram_s).add_to(sums);
    }

    /// What [`TaskLayout::accumulate_factored`] adds, without adding it: the frames of
    /// one sample can be computed in parallel and added in frame order afterwards (the
    /// same sums, bit for bit, as adding them one by one).
    pub fn factored_terms(
        &self,
        frame: usize,
        p: &[f32],
        s: &[f32],
        n: usize,
        gram_s: &[f64],
    ) -> FactoredTerms {
        use gradshard_core::factor::{frob2_from_grams, gram, row_sums_sq};
        let Some((_, r, c)) = self.order.factor_of(frame) else {
            return FactoredTerms {
                start: 0,
                values: vec![],
            };
        };
        match self.order.key(frame) {
            Some(FrameKey::Attn { .. }) => FactoredTerms {
                start: frame,
                values: vec![frob2_from_grams(&gram(p, n, r), gram_s)],
            },
            Some(FrameKey::Other { tensor, group }) => {
                let t = &self.order.others()[tensor];
                let base = self.chan_base[tensor];
                if t.out_axis == 0 {
                    let (a, _) = t.group_rows(group);
                    let mut rows = vec![0f64; r];
                    row_sums_sq(p, n, r, gram_s, &mut rows);
                    FactoredTerms {
                        start: base + a,
                        values: rows,
                    }
                } else {
                    let mut cols = vec![0f64; c];
                    row_sums_sq(s, n, c, &gram(p, n, r), &mut cols);
                    FactoredTerms {
                        start: base,
                        values: cols,
                    }
                }
            }
            None => FactoredTerms {
                start: 0,
                values: vec![],
            },
        }
    }

    /// Σ g² → Σ g²/T.
    pub fn finish_sample(&self, sums: &mut [f64], tokens: u32) {
        let t = f64::from(tokens);
        for s in sums.iter_mut() {
            *s /= t;
        }
    }

    /// The sums of a committed sample, recomputed from its stored frames.
    pub fn from_store(&self, store: &Store, rec: &LogRecord) -> Result<Vec<f64>> {
        let mut sums = vec![0f64; self.len];
        let factored = store.is_factored(rec)?;
        // S Sᵀ of each shared factor, formed once per sample.
        let mut grams: Vec<Option<Vec<f64>>> = vec![None; self.order.n_shared()];
        for f in 0..self.order.n_frames() {
            if factored {
                let (j, pf, sf) = store.read_frame_factors(rec, f)?;
                let gs = grams[j].get_or_insert_with(|| {
                    let c = self.order.shared()[j].cols;
                    gradshard_core::factor::gram(&sf.values, sf.rows, c)
                });
                self.accumulate_factored(f, &pf.values, &sf.values, pf.rows, gs, &mut sums);
            } else {
                let v = store.read_frame(rec, f)?;
                self.accumulate(f, &v, &mut sums);
            }
        }
        self.finish_sample(&mut sums, rec.tokens);
        Ok(sums)
    }
}

/// Welford mean and M2 of a vector-valued sample, merged by Chan's formula.
#[derive(Debug, Clone, PartialEq)]
pub struct Welford {
    pub n: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Welford {
    pub fn new(len: usize) -> Welford {
        Welford {
            n: 0,
            mean: vec![0.0; len],
            m2: vec![0.0; len],
        }
    }

    pub fn push(&mut self, x: &[f64]) {
        self.n += 1;
        let n = self.n as f64;
        for ((m, m2), x) in self.mean.iter_mut().zip(&mut self.m2).zip(x) {
            let d = x - *m;
            *m += d / n;
            *m2 += d * (x - *m);
        }
    }

    /// Chan et al.: combines two disjoint sets of samples.
    pub fn merge(&mut self, o: &Welford) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = o.clone();
            return;
        }
        let (na, nb) = (self.n as f64, o.n as f64);
        let n = na + nb;
        for i in 0..self.mean.len() {
            let d = o.mean[i] - self.mean[i];
            self.mean[i] += d * nb / n;
            self.m2[i] += o.m2[i] + d * d * na * nb / n;
        }
        self.n += o.n;
    }
}

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

/// What [`check_files`] found in a store's `stats/`.
#[derive(Debug, Default, Clone)]
pub struct StatsCheck {
    /// Files that cannot be trusted (checksum, format, layout): damage.
    pub problems: Vec<String>,
    /// Files that are merely out of date, or old.
    pub warnings: Vec<String>,
    /// Statistics files checked.
    pub files: usize,
}

/// Checks every `stats/<task>.json` of `store`: checksum, version, that it fits the
/// store's layout, and whether it describes exactly the task's committed samples.
pub fn check_files(store: &Store) -> StatsCheck {
    let mut out = StatsCheck::default();
    let dir = stats_dir(store.dir());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for path in paths {
        out.files += 1;
        let s = match TaskStats::load(&path) {
            Ok(s) => s,
            Err(e @ Error::StatsWithoutChecksum { .. }) => {
                out.warnings.push(e.to_string());
                continue;
            }
            Err(e) => {
                out.problems.push(e.to_string());
                continue;
            }
        };
        if let Err(e) = s.to_welford(&layout, &path) {
            out.problems.push(e.to_string());
            continue;
        }
        match store.samples(s.task.as_str()) {
            Ok(recs) if ids_digest(recs) == s.ids_xxh3 && recs.len() as u64 == s.n_samples => {}
            Ok(recs) => out.warnings.push(format!(
                "{}: describes {} sample(s), the store holds {} of task `{}` (out of date; the next collect or merge rewrites it, `gradshard salvage` rebuilds it)",
                path.display(),
                s.n_samples,
                recs.len(),
                s.task
            )),
            Err(_) => out.warnings.push(format!(
                "{}: task `{}` has no committed samples in the store",
                path.display(),
                s.task
            )),
        }
    }
    out
}

fn encode_id(id: &SampleId, out: &mut Vec<u8>) {
    match id {
        SampleId::Int(v) => {
            out.push(0);
            out.extend_from_slice(&v.to_le_bytes());
        }
        SampleId::Str(s) => {
            out.push(1);
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// XXH3-64 (hex) of the ids of `recs`, in order.
pub fn ids_digest(recs: &[LogRecord]) -> String {
    let mut b = Vec::new();
    for r in recs {
        encode_id(&r.id, &mut b);
    }
    format!("{:016x}", gradshard_format::checksum(&[&b]))
}

/// The side log `stats/samples.bin` (format in docs/format.md).
pub struct SideLog {
    path: PathBuf,
    file: File,
    n_values: usize,
    /// Last valid record of each sample: (offset of its values, tokens).
    records: HashMap<(TaskName, SampleId), (u64, u32)>,
    end: u64,
}

fn parse_body(b: &[u8]) -> Option<(TaskName, SampleId, u32, u32, usize)> {
    let mut p = 0usize;
    let take = |p: &mut usize, n: usize| -> Option<&[u8]> {
        let s = b.get(*p..*p + n)?;
        *p += n;
        Some(s)
    };
    let tl = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?) as usize;
    let task = TaskName::new(std::str::from_utf8(take(&mut p, tl)?).ok()?).ok()?;
    let id = match take(&mut p, 1)?[0] {
        0 => SampleId::Int(i64::from_le_bytes(take(&mut p, 8)?.try_into().ok()?)),
        1 => {
            let l = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?) as usize;
            SampleId::Str(std::str::from_utf8(take(&mut p, l)?).ok()?.to_string())
        }
        _ => return None,
    };
    let tokens = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?);
    let n = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?);
    if b.len() != p + 8 * n as usize {
        return None;
    }
    Some((task, id, tokens, n, p))
}

impl SideLog {
    /// Opens (creating it when `writable`) the side log of `store`. Records are
    /// read up to the first one that is torn or fails its checksum; with
    /// `writable` the file is cut there, so appends continue after the last good
    /// record (what follows it is recomputed from the store when needed).
    pub fn open(store: &Path, n_values: usize, writable: bool) -> Result<SideLog> {
        let dir = stats_dir(store);
        let path = dir.join(SIDE_LOG);
        if writable && !path.exists() {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let mut h = SIDE_MAGIC.to_vec();
            h.extend_from_slice(&(n_values as u64).to_le_bytes());
            fsutil::write_atomic(&path, &h)?;
        }
        let file = match OpenOptions::new().read(true).write(writable).open(&path) {
            Ok(f) => f,
            Err(e) if !writable && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SideLog {
                    path,
                    file: File::open("/dev/null").map_err(io("/dev/null"))?,
                    n_values,
                    records: HashMap::new(),
                    end: 0,
                })
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let bad = |what: String| Error::Stats {
            path: path.clone(),
            what,
        };
        let len = file.metadata().map_err(io(&path))?.len();
        let mut r = BufReader::with_capacity(1 << 20, &file);
        let mut head = [0u8; 16];
        r.read_exact(&mut head)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        if &head[..8] != SIDE_MAGIC {
            return Err(bad("not a gradshard statistics side log".into()));
        }
        let nv = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")) as usize;
        if nv != n_values {
            return Err(bad(format!(
                "records hold {nv} values, the store's statistics layout has {n_values}"
            )));
        }
        let mut records = HashMap::new();
        let mut pos = SIDE_HEADER_LEN;
        let mut body = Vec::new();
        loop {
            let mut h = [0u8; 12];
            if pos + 12 > len || r.read_exact(&mut h).is_err() {
                break;
            }
            let blen = u32::from_le_bytes(h[..4].try_into().expect("4")) as u64;
            let sum = u64::from_le_bytes(h[4..].try_into().expect("8"));
            if pos + 12 + blen > len {
                break;
            }
            body.resize(blen as usize, 0);
            if r.read_exact(&mut body).is_err() || gradshard_format::checksum(&[&body]) != sum {
                break;
            }
            let Some((task, id, tokens, n, voff)) = parse_body(&body) else {
                break;
            };
            if n as usize != n_values {
                return Err(bad(format!(
                    "a record of task `{task}` sample {id} holds {n} values, expected {n_values}"
                )));
            }
            records.insert((task, id), (pos + 12 + voff as u64, tokens));
            pos += 12 + blen;
        }
        if writable && pos < len {
            tracing::warn!(
                "{}: cutting {} bytes of torn or damaged records",
                path.display(),
                len - pos
            );
            file.set_len(pos).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        drop(r);
        Ok(SideLog {
            path,
            file,
            n_values,
            records,
            end: pos,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends one sample's sums (not fsynced: a lost record is recomputed from the store).
    pub fn append(
        &mut self,
        task: &TaskName,
        id: &SampleId,
        tokens: u32,
        sums: &[f64],
    ) -> Result<()> {
        debug_assert_eq!(sums.len(), self.n_values);
        let mut body = Vec::with_capacity(32 + 8 * sums.len());
        body.extend_from_slice(&(task.as_str().len() as u16).to_le_bytes());
        body.extend_from_slice(task.as_str().as_bytes());
        encode_id(id, &mut body);
        body.extend_from_slice(&tokens.to_le_bytes());
        body.extend_from_slice(&(sums.len() as u32).to_le_bytes());
        let voff = body.len() as u64;
        for s in sums {
            body.extend_from_slice(&s.to_le_bytes());
        }
        let mut rec = Vec::with_capacity(12 + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(&gradshard_format::checksum(&[&body]).to_le_bytes());
        rec.extend_from_slice(&body);
        self.file
            .seek(SeekFrom::Start(self.end))
            .map_err(io(&self.path))?;
        self.file.write_all(&rec).map_err(io(&self.path))?;
        self.records
            .insert((task.clone(), id.clone()), (self.end + 12 + voff, tokens));
        self.end += rec.len() as u64;
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io(&self.path))
    }

    /// The recorded sums of a sample whose T matches, if any.
    pub fn get(&self, task: &TaskName, id: &SampleId, tokens: u32) -> Result<Option<Vec<f64>>> {
        let Some(&(off, t)) = self.records.get(&(task.clone(), id.clone())) else {
            return Ok(None);
        };
        if t != tokens {
            return Ok(None);
        }
        let mut b = vec![0u8; 8 * self.n_values];
        let mut f = &self.file;
        f.seek(SeekFrom::Start(off)).map_err(io(&self.path))?;
        f.read_exact(&mut b).map_err(io(&self.path))?;
        Ok(Some(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ))
    }
}

/// What a rebuild used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildReport {
    pub tasks: Vec<TaskStats>,
    pub files: Vec<PathBuf>,
    /// Samples whose sums came from the side log.
    pub from_side_log: u64,
    /// Samples whose sums were recomputed from their stored frames.
    pub from_store: u64,
}

/// Welford accumulator of one task.
pub struct TaskAccum {
    pub task: TaskName,
    pub welford: Welford,
    pub tokens: u64,
}

/// Per-task accumulators over a store, and where the sums came from.
pub struct StoreAccum {
    pub tasks: Vec<TaskAccum>,
    pub from_side_log: u64,
    pub from_store: u64,
}

/// Per-task Welford accumulators over the committed samples of `store`, in store order.
pub fn accumulate_store(store: &Store, side: Option<&SideLog>) -> Result<StoreAccum> {
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let mut acc = StoreAccum {
        tasks: Vec::new(),
        from_side_log: 0,
        from_store: 0,
    };
    for task in store.tasks() {
        let mut w = Welford::new(layout.len());
        let mut tokens = 0u64;
        for rec in store.samples(task.as_str())? {
            let sums = match side
                .map(|s| s.get(&task, &rec.id, rec.tokens))
                .transpose()?
            {
                Some(Some(v)) => {
                    acc.from_side_log += 1;
                    v
                }
                _ => {
                    acc.from_store += 1;
                    layout.from_store(store, rec)?
                }
            };
            w.push(&sums);
            tokens += u64::from(rec.tokens);
        }
        acc.tasks.push(TaskAccum {
            task,
            welford: w,
            tokens,
        });
    }
    Ok(acc)
}

/// Rebuilds `stats/<task>.json` of every task of the store at `dir` from its
/// committed samples (side log first, stored frames otherwise) and writes them.
pub fn rebuild(dir: &Path) -> Result<RebuildReport> {
    let store = Store::open(dir)?;
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let side = SideLog::open(dir, layout.len(), false)?;
    let acc = accumulate_store(&store, Some(&side))?;
    let mut rep = RebuildReport {
        from_side_log: acc.from_side_log,
        from_store: acc.from_store,
        ..Default::default()
    };
    for t in acc.tasks {
        let digest = ids_digest(store.samples(t.task.as_str())?);
        let s = TaskStats::from_welford(&layout, &t.task, &t.welford, t.tokens, digest, "rebuilt");
        rep.files.push(s.save(dir)?);
        rep.tasks.push(s);
    }
    Ok(rep)
}

/// Loads `stats/<task>.json` if it describes exactly the store's committed
/// samples of the task; otherwise recomputes it (without writing).
pub fn load_or_compute(store: &Store, task: &TaskName) -> Result<TaskStats> {
    let layout = StatsLayout::new(store.order(), store.manifest().spec.dtype);
    let recs = store.samples(task.as_str())?;
    let digest = ids_digest(recs);
    let path = task_stats_path(store.dir(), task);
    if path.exists() {
        let s = match TaskStats::load(&path) {
            Err(e @ Error::StatsWithoutChecksum { .. }) => {
                tracing::warn!("{e}; recomputing");
                return compute(store, task, &layout, recs, digest);
            }
            r => r?,
        };
        if s.ids_xxh3 == digest && s.n_samples == recs.len() as u64 {
            s.to_welford(&layout, &path)?;
            return Ok(s);
        }
        tracing::warn!(
            "{} does not describe the store's committed samples; recomputing",
            path.display()
        );
    }
    compute(store, task, &layout, recs, digest)
}

fn compute(
    store: &Store,
    task: &TaskName,
    layout: &StatsLayout,
    recs: &[LogRecord],
    digest: String,
) -> Result<TaskStats> {
    let side = SideLog::open(store.dir(), layout.len(), false)?;
    let mut w = Welford::new(layout.len());
    let mut tokens = 0u64;
    for rec in recs {
        let sums = match side.get(task, &rec.id, rec.tokens)? {
            Some(v) => v,
            None => layout.from_store(store, rec)?,
        };
        w.push(&sums);
        tokens += u64::from(rec.tokens);
    }
    Ok(TaskStats::from_welford(
        layout, task, &w, tokens, digest, "rebuilt",
    ))
}

/// Squared sums of one factored frame, for the sums entries `start..start + len`
/// ([`TaskLayout::factored_terms`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FactoredTerms {
    start: usize,
    values: Vec<f64>,
}

impl FactoredTerms {
    /// Adds the terms into `sums`.
    pub fn add_to(&self, sums: &mut [f64]) {
        for (s, v) in sums[self.start..].iter_mut().zip(&self.values) {
            *s += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gradshard_core::{bf16_bits_to_f32, f32_to_bf16_bits};

    #[test]
    fn round_bf16_is_the_bf16_conversion_and_sum_sq_the_plain_sum() {
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x0000_0001,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x3f80_8001,
            0x007f_ffff,
        ];
        let mut x = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bits.push(x);
        }
        for &b in &bits {
            let v = f32::from_bits(b);
            let want = bf16_bits_to_f32(f32_to_bf16_bits(v));
            let got = round_bf16(v);
            if v.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{b:#010x}");
            }
        }
        let vals: Vec<f32> = bits
            .iter()
            .map(|&b| f32::from_bits((b & 0x807f_ffff) | 0x3f00_0000))
            .collect();
        for len in [0, 1, 7, 8, 9, 63, 1000, vals.len()] {
            let v = &vals[..len];
            for bf16 in [false, true] {
                let plain: f64 = v
                    .iter()
                    .map(|&x| {
                        let x = if bf16 { round_bf16(x) } else { x } as f64;
                        x * x
                    })
                    .sum();
                let got = sum_sq(v, bf16);
                assert!((got - plain).abs() <= 1e-12 * plain, "{len} {bf16}");
                assert_eq!(got.to_bits(), sum_sq(v, bf16).to_bits());
            }
        }
        // bf16 rounding is applied: 1 + 2⁻⁹ rounds to 1.
        assert_eq!(sum_sq(&[1.0 + 1.0 / 512.0], true), 1.0);
    }

    #[test]
    fn chan_merge_equals_one_pass_and_m2_is_the_spread_not_the_squared_mean() {
        let xs: Vec<Vec<f64>> = (0..11)
            .map(|i| vec![(i as f64 * 0.37).sin() + 2.0, 1e-6 * (i * i) as f64])
            .collect();
        let mut all = Welford::new(2);
        xs.iter().for_each(|x| all.push(x));
        let (mut a, mut b) = (Welford::new(2), Welford::new(2));
        xs.iter().step_by(2).for_each(|x| a.push(x));
        xs.iter().skip(1).step_by(2).for_each(|x| b.push(x));
        a.merge(&b);
        assert_eq!(a.n, 11);
        for j in 0..2 {
            let mean = xs.iter().map(|x| x[j]).sum::<f64>() / 11.0;
            let m2: f64 = xs.iter().map(|x| (x[j] - mean).powi(2)).sum();
            assert!((all.mean[j] - mean).abs() <= 1e-14 * mean.abs());
            assert!((a.mean[j] - mean).abs() <= 1e-14 * mean.abs());
            assert!((all.m2[j] - m2).abs() <= 1e-12 * m2);
            assert!((a.m2[j] - m2).abs() <= 1e-12 * m2);
        }
        let mut e = Welford::new(2);
        e.merge(&all);
        assert_eq!(e, all);
    }

    /// The statistics decoders (task file, side log) on mutated bytes: an error naming
    /// the file or a value, never a panic; and any edited number fails the checksum.
    #[test]
    fn stats_decoders_survive_mutations_and_edits_fail_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let t = TaskName::new("math").unwrap();
        let mut w = Welford::new(3);
        w.push(&[1.0, 2.5, 1e-7]);
        w.push(&[0.5, 2.0, 3e-7]);
        let s = TaskStats {
            format: "gradshard-task-stats".into(),
            version: STATS_VERSION,
            task: t.clone(),
            n_samples: w.n,
            tokens_total: 17,
            ids_xxh3: "0123456789abcdef".into(),
            method: "rebuilt".into(),
            quantity: QUANTITY.into(),
            groups: (0..3)
                .map(|i| GroupStat {
                    layer: 0,
                    block: "Q".into(),
                    head: i,
                    numel: 64,
                    mean: w.mean[i],
                    m2: w.m2[i],
                })
                .collect(),
            channels: vec![],
            checksum: String::new(),
        };
        let path = s.save(dir.path()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let back = TaskStats::load(&path).unwrap();
        assert_eq!(back.groups, s.groups);
        {
            let mut side = SideLog::open(dir.path(), 3, true).unwrap();
            for i in 0..5i64 {
                side.append(&t, &SampleId::Int(i), 3, &[i as f64, 1.0, 2.0])
                    .unwrap();
            }
            side.sync().unwrap();
        }
        let side_path = dir.path().join(STATS_DIR).join(SIDE_LOG);
        let side_good = std::fs::read(&side_path).unwrap();
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut detected = 0;
        for round in 0..600 {
            let (src, target) = if round % 2 == 0 {
                (&good, &path)
            } else {
                (&side_good, &side_path)
            };
            let mut b = src.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % b.len();
                match next() % 3 {
                    0 => b[i] ^= 1 + (next() % 255) as u8,
                    1 if b[i].is_ascii_digit() => b[i] = b'0' + ((b[i] - b'0' + 1) % 10),
                    _ => b.truncate(i.max(1)),
                }
            }
            std::fs::write(target, &b).unwrap();
            if round % 2 == 0 {
                match TaskStats::load(&path) {
                    Ok(l) => assert_eq!(l.groups, s.groups, "an edit passed the checksum"),
                    Err(e) => {
                        assert!(e.to_string().contains("math.json"), "{e}");
                        detected += 1;
                    }
                }
            } else if let Ok(l) = SideLog::open(dir.path(), 3, false) {
                for i in 0..5i64 {
                    let _ = l.get(&t, &SampleId::Int(i), 3);
                }
            }
            std::fs::write(target, src).unwrap();
        }
        assert!(
            detected > 250,
            "only {detected} of 300 mutated files refused"
        );
    }

    #[test]
    fn side_log_keeps_the_last_record_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let t = TaskName::new("math").unwrap();
        {
            let mut s = SideLog::open(dir.path(), 3, true).unwrap();
            s.append(&t, &SampleId::Int(1), 5, &[1.0, 2.0, 3.0])
                .unwrap();
            s.append(&t, &SampleId::Str("a b".into()), 7, &[4.0, 5.0, 6.0])
                .unwrap();
            s.append(&t, &SampleId::Int(1), 5, &[7.0, 8.0, 9.0])
                .unwrap();
            s.sync().unwrap();
        }
        let path = dir.path().join(STATS_DIR).join(SIDE_LOG);
        let good = std::fs::metadata(&path).unwrap().len();
        // A torn record at the tail (as a SIGKILL mid-write leaves it).
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let ro = SideLog::open(dir.path(), 3, false).unwrap();
        assert_eq!(ro.len(), 2);
        assert_eq!(
            ro.get(&t, &SampleId::Int(1), 5).unwrap(),
            Some(vec![7.0, 8.0, 9.0])
        );
        // A different T (the sample was recomputed with other settings) is not trusted.
        assert_eq!(ro.get(&t, &SampleId::Int(1), 6).unwrap(), None);
        drop(ro);
        let mut rw = SideLog::open(dir.path(), 3, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        rw.append(&t, &SampleId::Int(2), 1, &[0.5, 0.5, 0.5])
            .unwrap();
        drop(rw);
        let ro = SideLog::open(dir.path(), 3, false).unwrap();
        assert_eq!(ro.len(), 3);
        assert_eq!(
            ro.get(&t, &SampleId::Str("a b".into()), 7).unwrap(),
            Some(vec![4.0, 5.0, 6.0])
        );
        // A layout of another size is an error naming the file.
        let e = SideLog::open(dir.path(), 4, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("samples.bin") && e.contains("3"), "{e}");
    }
}
