//! The per-sample sink: one sample's gradients (or their factors) in, frames, Σ g²/T
//! statistics, a side-log record and the choice of representation out, into a
//! [`StoreWriter`]. What computes the gradients (a model engine, PyTorch hooks) stays
//! outside: it hands each sample over as [`GradSample`] or [`FactorSample`], tensors
//! named and shaped as in the Hugging Face checkpoint.
//!
//! For each sample: NaN/inf check (error naming task, sample and tensor, or skip and
//! count), every head slice and MLP row group cut (`SliceSpec::cut`), Σ g² per frame
//! or output channel with g rounded to the store's dtype, ÷ T; the sums are appended
//! to `stats/samples.bin` before the sample is ended in the writer (so it can commit).
//! Factors are cut into per-frame P and shared S (checked equal across the tensors that
//! share them); `auto` stores them when they hold fewer values than the full slices,
//! else multiplies them out.

use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use gradshard_core::{AttnTensor, Block, DType, Geometry, SampleId, TaskName};
use gradshard_index::FrameOrder;

use crate::error::{Error, Result};
use crate::stats::{self, SideLog, StatsLayout};
use crate::{SampleHandle, SampleMeta, StoreSpec, StoreWriter, WriteReport};

mod factors;

/// One tensor's gradient, as the checkpoint holds the weight: Hugging Face name,
/// shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One tensor's gradient as factors: G = Aᵀ B over `n` stacked positions.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub name: String,
    /// Stored (HF) shape `[rows, cols]` of the weight and of G.
    pub shape: Vec<usize>,
    /// Number of stacked positions.
    pub n: usize,
    /// n × shape[0], row-major.
    pub a: Vec<f32>,
    /// n × shape[1], row-major.
    pub b: Vec<f32>,
}

impl Factors {
    /// Forms G = AᵀB (shape[0] × shape[1], row-major, f32) with `gemm` (multi-threaded
    /// on rayon's pool when large enough).
    ///
    /// # Panics
    /// When `shape` is not 2-D or `a`/`b` do not hold n × shape[0] / n × shape[1]
    /// values (the sink checks both before it calls this).
    pub fn gradient(&self) -> Vec<f32> {
        gradshard_core::factor::factors_gradient(&self.name, &self.shape, self.n, &self.a, &self.b)
    }

    /// The gradient as a [`Gradient`] (consumes the factors).
    pub fn into_gradient(self) -> Gradient {
        let data = self.gradient();
        Gradient {
            name: self.name,
            shape: self.shape,
            data,
        }
    }
}

/// One sample's gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct GradSample {
    /// T, the number of predicted positions.
    pub tokens: usize,
    /// Σ over predicted positions of the cross-entropy, in nats.
    pub loss_sum: f64,
    /// Every tensor the store holds, in any order.
    pub grads: Vec<Gradient>,
}

/// One sample's gradients as factors.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorSample {
    /// T, the number of predicted positions.
    pub tokens: usize,
    /// Σ over predicted positions of the cross-entropy, in nats.
    pub loss_sum: f64,
    /// Every tensor the store holds, in any order.
    pub factors: Vec<Factors>,
}

impl FactorSample {
    /// Forms every gradient.
    pub fn into_grads(self) -> GradSample {
        GradSample {
            tokens: self.tokens,
            loss_sum: self.loss_sum,
            grads: self
                .factors
                .into_iter()
                .map(Factors::into_gradient)
                .collect(),
        }
    }
}

/// What to do with a sample whose gradient holds NaN or ±inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NanPolicy {
    /// Stop with an error naming the task, sample and tensor.
    #[default]
    Error,
    /// Leave the sample out of the store and count it.
    Skip,
}

impl std::str::FromStr for NanPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "error" => Ok(NanPolicy::Error),
            "skip" => Ok(NanPolicy::Skip),
            _ => Err(format!("unknown NaN policy `{s}` (use error or skip)")),
        }
    }
}

/// How `collect` stores each sample (`--representation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepresentationChoice {
    /// Every slice as a full frame (format v1's only representation).
    Full,
    /// Every sample as factors P, S (docs/format.md, "Factored samples").
    Factored,
    /// Per sample, whichever of the two holds fewer values for its n.
    #[default]
    Auto,
}

impl std::str::FromStr for RepresentationChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(RepresentationChoice::Full),
            "factored" => Ok(RepresentationChoice::Factored),
            "auto" => Ok(RepresentationChoice::Auto),
            _ => Err(format!(
                "unknown representation `{s}` (use full, factored or auto)"
            )),
        }
    }
}

/// Values a sample's factors take in a store of frame order `order`, for factor row
/// counts `n_of(frame)` per frame and `n_shared[j]` per shared factor.
pub fn factored_values(order: &FrameOrder, n_frame: &[usize], n_shared: &[usize]) -> u64 {
    let p: u64 = (0..order.n_frames())
        .map(|f| {
            let (_, r, _) = order.factor_of(f).expect("frame in range");
            (r * n_frame[f]) as u64
        })
        .sum();
    let s: u64 = order
        .shared()
        .iter()
        .zip(n_shared)
        .map(|(sf, n)| (sf.cols * n) as u64)
        .sum();
    p + s
}

/// Values of a sample stored as full slices.
pub fn full_values(order: &FrameOrder) -> u64 {
    (0..order.n_frames())
        .map(|f| order.frame_numel(f).expect("frame in range") as u64)
        .sum()
}

/// A sample that was not stored, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedSample {
    pub task: TaskName,
    pub id: SampleId,
    pub why: String,
}

/// How the sink treats samples (the collector's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SinkOptions {
    pub nan_policy: NanPolicy,
    pub representation: RepresentationChoice,
}

/// What a sink did, once finished.
#[derive(Debug, Clone)]
pub struct SinkReport {
    pub write: WriteReport,
    /// The rebuilt `stats/` (empty without a store).
    pub stats: stats::RebuildReport,
    /// Samples stored (handed to the writer).
    pub stored: u64,
    /// Samples stored as full slices and as factors.
    pub full_samples: u64,
    pub factored_samples: u64,
    /// Values handed to the writer (factors count their own size).
    pub values_stored: u64,
    /// Samples left out, in order.
    pub skipped: Vec<SkippedSample>,
    /// Time in the sink (cutting frames, sums, handing frames over), waits included.
    pub prepare_time: Duration,
    /// Time the sink waited on the writer (its memory budget full).
    pub blocked_time: Duration,
}

/// Whether `a` and `b` hold the same bits (NaN payloads and ±0 told apart), in
/// blocks of 256 without an early exit inside a block (vectorised).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.chunks(256).zip(b.chunks(256)).all(|(x, y)| {
            x.iter()
                .zip(y)
                .fold(0u32, |d, (x, y)| d | (x.to_bits() ^ y.to_bits()))
                == 0
        })
}

/// The first value that is NaN or ±inf. Blocks of 256 are tested without an early
/// exit (an exponent field of all ones, OR-ed over the block: vectorised), and only a
/// block that has one is searched.
fn first_non_finite(v: &[f32]) -> Option<(usize, f32)> {
    const B: usize = 256;
    let bad = |x: &f32| x.to_bits() & 0x7f80_0000 == 0x7f80_0000;
    v.chunks(B).enumerate().find_map(|(k, c)| {
        let any = c.iter().fold(0u32, |a, x| a | u32::from(bad(x)));
        (any != 0).then(|| {
            let i = c.iter().position(bad).expect("the block has one");
            (k * B + i, c[i])
        })
    })
}

/// The per-sample sink over one store's writer (see the module docs).
pub struct SampleSink {
    /// None: [`SampleSink::without_store`] (frames and sums are computed, then dropped).
    w: Option<StoreWriter>,
    side: Option<SideLog>,
    layout: StatsLayout,
    attn_of: HashMap<String, AttnTensor>,
    geometry: Geometry,
    nan_policy: NanPolicy,
    representation: RepresentationChoice,
    dtype: DType,
    stored: u64,
    full_samples: u64,
    factored_samples: u64,
    values_stored: u64,
    skipped: Vec<SkippedSample>,
    prepare: Duration,
    blocked: Duration,
}

/// Where a model tensor goes in the store.
enum Target {
    Attn(AttnTensor),
    Other(usize),
}

/// Columns `start..start + len` of a row-major `n × w` matrix, as an `n × len` matrix.
fn cut_cols(m: &[f32], n: usize, w: usize, start: usize, len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * len);
    for t in 0..n {
        out.extend_from_slice(&m[t * w + start..t * w + start + len]);
    }
    out
}

impl SampleSink {
    /// A sink over `writer`. Opens (creating it, a torn tail cut) the store's side log
    /// `stats/samples.bin`, under the writer's lock. A format-1 store holds full slices
    /// only: `Auto` stores full slices there and `Factored` is refused.
    pub fn new(writer: StoreWriter, opts: SinkOptions) -> Result<SampleSink> {
        let mut representation = opts.representation;
        if writer.manifest().format_version < 2 && representation != RepresentationChoice::Full {
            if representation == RepresentationChoice::Factored {
                return Err(Error::Invalid(format!(
                    "invalid argument: store {} is format version {}, which holds full slices only: collect --representation factored into a new store",
                    writer.dir().display(),
                    writer.manifest().format_version
                )));
            }
            representation = RepresentationChoice::Full;
        }
        let layout = StatsLayout::new(writer.order(), writer.manifest().spec.dtype);
        let side = SideLog::open(writer.dir(), layout.len(), true)?;
        let mut sink = Self::build(
            layout,
            SinkOptions {
                representation,
                ..opts
            },
        );
        sink.w = Some(writer);
        sink.side = Some(side);
        Ok(sink)
    }

    /// A sink that stores nothing: every sample is checked, cut and summed as
    /// [`Self::new`]'s would be, then dropped (to measure the model alone).
    pub fn without_store(spec: &StoreSpec, opts: SinkOptions) -> SampleSink {
        Self::build(StatsLayout::new(&spec.frame_order(), spec.dtype), opts)
    }

    fn build(layout: StatsLayout, opts: SinkOptions) -> SampleSink {
        let geometry = layout.order().geometry().clone();
        let attn_of = geometry
            .all_attn_tensors()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        SampleSink {
            w: None,
            side: None,
            dtype: layout.dtype(),
            layout,
            attn_of,
            geometry,
            nan_policy: opts.nan_policy,
            representation: opts.representation,
            stored: 0,
            full_samples: 0,
            factored_samples: 0,
            values_stored: 0,
            skipped: Vec::new(),
            prepare: Duration::ZERO,
            blocked: Duration::ZERO,
        }
    }

    /// The representation samples are stored in (`Auto` decides per sample; a format-1
    /// store takes `Full` only). With `Full`, hand samples over as gradients
    /// ([`Self::put`]); otherwise as factors ([`Self::put_factors`]).
    pub fn representation(&self) -> RepresentationChoice {
        self.representation
    }

    /// The frame order of the store.
    pub fn order(&self) -> &FrameOrder {
        self.layout.order()
    }

    /// The store's value type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The store directory (None without a store).
    pub fn dir(&self) -> Option<&Path> {
        self.w.as_ref().map(StoreWriter::dir)
    }

    /// Whether the store already holds (task, id) (resume: such samples are not
    /// computed again). Always false without a store.
    pub fn is_committed(&self, task: &TaskName, id: &SampleId) -> bool {
        self.w.as_ref().is_some_and(|w| w.is_committed(task, id))
    }

    /// Samples handed to the writer so far.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Samples left out so far, in order.
    pub fn skipped(&self) -> &[SkippedSample] {
        &self.skipped
    }

    /// Records a sample the caller left out (e.g. too short to have a label), so that
    /// the report lists every skipped sample in order.
    pub fn skip(&mut self, s: SkippedSample) {
        self.skipped.push(s);
    }

    /// Ends the run: the side log is synced, the writer finished (every handed sample
    /// committed) and `stats/<task>.json` rebuilt from the store's committed samples.
    pub fn finish(self) -> Result<SinkReport> {
        if let Some(side) = &self.side {
            side.sync()?;
        }
        let mut write = WriteReport::default();
        let mut stats = stats::RebuildReport::default();
        if let Some(w) = self.w {
            let dir = w.dir().to_path_buf();
            write = w.finish()?;
            stats = stats::rebuild(&dir)?;
        }
        Ok(SinkReport {
            write,
            stats,
            stored: self.stored,
            full_samples: self.full_samples,
            factored_samples: self.factored_samples,
            values_stored: self.values_stored,
            skipped: self.skipped,
            prepare_time: self.prepare,
            blocked_time: self.blocked,
        })
    }

    /// The stored place of a model tensor; the set and shapes must be the store's.
    fn target(
        &self,
        task: &TaskName,
        id: &SampleId,
        name: &str,
        shape: &[usize],
    ) -> Result<Target> {
        let order = self.layout.order();
        let (t, want) = if let Some(at) = self.attn_of.get(name) {
            (Target::Attn(at.clone()), at.shape)
        } else if let Some(ti) = order.other_index(name) {
            (Target::Other(ti), order.others()[ti].shape)
        } else {
            return Err(Error::SampleInput {
                task: task.clone(),
                id: id.clone(),
                what: format!("the model returned tensor `{name}`, which this store does not hold"),
            });
        };
        if shape != want {
            return Err(Error::SampleInput {
                task: task.clone(),
                id: id.clone(),
                what: format!("tensor `{name}` has shape {shape:?}, the store holds {want:?}"),
            });
        }
        Ok(t)
    }

    fn check_count(&self, task: &TaskName, id: &SampleId, got: usize) -> Result<()> {
        let n_expected = self.attn_of.len() + self.layout.order().others().len();
        if got != n_expected {
            return Err(Error::SampleInput {
                task: task.clone(),
                id: id.clone(),
                what: format!("the model returned {got} tensors, the store holds {n_expected}"),
            });
        }
        Ok(())
    }

    /// Applies the NaN policy to one tensor's values: `Ok(false)` when the sample is skipped.
    fn finite_or_skip(
        &mut self,
        task: &TaskName,
        id: &SampleId,
        tensor: &str,
        v: &[f32],
    ) -> Result<bool> {
        let Some((index, value)) = first_non_finite(v) else {
            return Ok(true);
        };
        match self.nan_policy {
            NanPolicy::Error => Err(Error::NonFinite {
                task: task.clone(),
                id: id.clone(),
                tensor: tensor.to_string(),
                index,
                value,
            }),
            NanPolicy::Skip => {
                let why = format!(
                    "non-finite gradient {value} in tensor `{tensor}` at flat index {index}"
                );
                self.skipped.push(SkippedSample {
                    task: task.clone(),
                    id: id.clone(),
                    why,
                });
                Ok(false)
            }
        }
    }

    fn tokens_u32(task: &TaskName, id: &SampleId, tokens: usize) -> Result<u32> {
        u32::try_from(tokens).map_err(|_| Error::SampleInput {
            task: task.clone(),
            id: id.clone(),
            what: format!("T = {tokens} does not fit in u32"),
        })
    }

    /// Logs the sums and ends the sample in the writer (the sample then commits).
    fn commit_sample(
        &mut self,
        task: &TaskName,
        id: &SampleId,
        tokens: u32,
        mut sums: Vec<f64>,
        h: Option<SampleHandle>,
    ) -> Result<()> {
        self.layout.finish_sample(&mut sums, tokens);
        // The sums are logged before the sample can commit.
        if let Some(side) = &mut self.side {
            side.append(task, id, tokens, &sums)?;
        }
        if let (Some(w), Some(h)) = (self.w.as_mut(), h) {
            w.end_sample(h)?;
        }
        self.stored += 1;
        Ok(())
    }

    /// Stores one sample from its gradients: `Ok(true)` when stored, `Ok(false)` when
    /// left out under [`NanPolicy::Skip`] (then [`Self::skipped`] ends with it). A tensor
    /// the store does not hold, a missing one, a wrong shape or T beyond u32 is an error
    /// naming the task, sample and tensor; nothing of the sample commits.
    pub fn put(&mut self, task: &TaskName, id: SampleId, g: GradSample) -> Result<bool> {
        let t0 = Instant::now();
        for t in &g.grads {
            if !self.finite_or_skip(task, &id, &t.name, &t.data)? {
                return Ok(false);
            }
        }
        let order = self.layout.order().clone();
        self.check_count(task, &id, g.grads.len())?;
        let tokens = Self::tokens_u32(task, &id, g.tokens)?;
        // Every tensor is placed (name, shape, each once) before the sample begins in the
        // writer: a bad one fails the sample with nothing handed over, and the writer
        // stays usable for the next.
        let mut targets = Vec::with_capacity(g.grads.len());
        for (i, t) in g.grads.iter().enumerate() {
            if g.grads[..i].iter().any(|u| u.name == t.name) {
                return Err(Error::SampleInput {
                    task: task.clone(),
                    id: id.clone(),
                    what: format!("tensor `{}` is given twice", t.name),
                });
            }
            targets.push(self.target(task, &id, &t.name, &t.shape)?);
        }
        let mut sums = vec![0f64; self.layout.len()];
        let mut h = match &mut self.w {
            Some(w) => Some(w.begin_sample(SampleMeta {
                task: task.clone(),
                id: id.clone(),
                tokens,
                loss_sum: g.loss_sum,
            })?),
            None => None,
        };
        for (t, target) in g.grads.into_iter().zip(targets) {
            match target {
                Target::Attn(at) => {
                    // Each head's slice is cut and its Σ g² taken in parallel; the
                    // frames then go to the writer in order. Each frame has its own
                    // sums entry, so the sums are those of one by one, bit for bit.
                    let heads: Vec<(Block, usize)> = at
                        .blocks
                        .iter()
                        .flat_map(|b| (0..self.geometry.heads_of(*b)).map(move |h| (*b, h)))
                        .collect();
                    let (geometry, layout, data) = (&self.geometry, &self.layout, &t.data);
                    let cut: Vec<(usize, Vec<f32>, f64)> = heads
                        .par_iter()
                        .map(|&(b, head)| {
                            let frame = order.attn(at.layer, b, head).expect("all blocks stored");
                            let slice = geometry.slice_spec(at.layer, b, head)?.cut(data)?;
                            let s = layout.attn_sum(&slice);
                            Ok((frame, slice, s))
                        })
                        .collect::<Result<_>>()?;
                    for (frame, slice, s) in cut {
                        sums[frame] += s;
                        if let (Some(w), Some(h)) = (self.w.as_mut(), h.as_mut()) {
                            let tb = Instant::now();
                            w.put_frame(h, frame, slice)?;
                            self.blocked += tb.elapsed();
                        }
                    }
                }
                Target::Other(ti) => {
                    let o = &order.others()[ti];
                    for gi in 0..o.groups() {
                        let (a, b) = o.group_rows(gi);
                        let frame = order.other(ti, gi).expect("group in range");
                        let part = t.data[a * o.shape[1]..b * o.shape[1]].to_vec();
                        self.layout.accumulate(frame, &part, &mut sums);
                        if let (Some(w), Some(h)) = (self.w.as_mut(), h.as_mut()) {
                            let tb = Instant::now();
                            w.put_frame(h, frame, part)?;
                            self.blocked += tb.elapsed();
                        }
                    }
                }
            }
        }
        self.commit_sample(task, &id, tokens, sums, h)?;
        self.full_samples += 1;
        self.values_stored += full_values(&order);
        self.prepare += t0.elapsed();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_finds_the_first_at_any_position() {
        let mut v = vec![1.5f32; 1000];
        assert_eq!(first_non_finite(&v), None);
        assert_eq!(first_non_finite(&[]), None);
        for (at, bad) in [
            (0, f32::NAN),
            (255, f32::INFINITY),
            (256, f32::NEG_INFINITY),
            (700, f32::NAN),
            (999, f32::INFINITY),
        ] {
            v[at] = bad;
            if at < 999 {
                v[999] = f32::NAN; // a later one must not win
            }
            let (i, x) = first_non_finite(&v).expect("has one");
            assert_eq!(i, at);
            assert_eq!(x.to_bits(), bad.to_bits());
            v.fill(1.5);
        }
        // The largest finite values and subnormals are finite.
        assert_eq!(first_non_finite(&[f32::MAX, f32::MIN, 1e-45, -0.0]), None);
    }

    #[test]
    fn same_bits_tells_every_difference() {
        let a: Vec<f32> = (0..700).map(|i| i as f32 * 0.25).collect();
        assert!(same_bits(&a, &a.clone()));
        assert!(!same_bits(&a, &a[..699]));
        for at in [0, 255, 256, 699] {
            let mut b = a.clone();
            b[at] = f32::from_bits(b[at].to_bits() ^ 1);
            assert!(!same_bits(&a, &b), "{at}");
        }
        assert!(!same_bits(&[0.0], &[-0.0]));
    }
}
