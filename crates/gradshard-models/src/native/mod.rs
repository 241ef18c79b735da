//! The native CPU engine: forward and backward of the LLaMA-style decoder
//! written out by hand over f32 buffers, with every matrix product on the
//! `gemm` crate (AVX-512 kernels where the CPU has them).
//!
//! Why it exists (issue 12, docs/perf-plan.md §C6): on the CPU, burn's
//! autodiff graph spends as much time building nodes, gathering strided
//! views and copying layouts as it spends multiplying. Per-sample gradients
//! of a few weight matrices need none of that: the backward of a decoder is a
//! fixed sequence of products, and the two factors of every tracked weight's
//! gradient (δ, the gradient of the weight's output, and x, its input) fall
//! out of it. This engine runs exactly that sequence:
//!
//! - samples of a chunk are *packed*, not padded: the token rows of all
//!   samples form one [N, ·] matrix (N = Σ T), so every projection is one
//!   product over all of them and no padding is computed; only attention and
//!   the loss look at sample boundaries;
//! - the logits never exist whole: the LM head, softmax, loss and its
//!   gradient run on blocks of rows (≤ 16 MB of logits at a time);
//! - the backward goes layer by layer, and each layer's tracked weights are
//!   handed out (as G = δᵀx per sample, or as the factors δ and x) as soon as
//!   their δ is known.
//!
//! It covers what the LLaMA family needs — `llama`, `mistral`, `qwen2` and any
//! [`DecoderConfig`] of the same form: pre-norm RMSNorm (w or 1 + w),
//! sequential residual, separate Q/K/V (with or without biases), RoPE on all
//! or part of each head, grouped-query attention, optional sliding windows,
//! a gated SiLU MLP, an untied or tied LM head without soft-caps — and the
//! tracked sets `attn` and `attn,mlp`. Anything else runs on the burn engine
//! ([`NativeEngine::supports`] says why not). The numbers are the burn
//! engine's up to f32 rounding (tests/native.rs compares them; both are
//! checked against the float64 fixtures).

use rayon::prelude::*;

use crate::data::TokenSample;
use crate::error::{Error, Result};
use crate::grads::{SampleFactors, SampleGrads, SampleLoss, TensorFactors, TensorGrad};
use crate::layers::{ParamInfo, ParamSet};
use crate::model::open_checked;
use gradshard_core::model::{Activation, ModelConfig};
use gradshard_core::model::{DecoderConfig, HeadKind, MlpKind, NormKind, NormPlacement, Positions};
use gradshard_core::model::{QkNorm, QkvLayout};

mod backward;
mod forward;
mod kernels;
mod load;

use kernels::*;

struct Layer {
    /// Effective scales of the two RMSNorms (w, or 1 + w for Gemma-style).
    n_attn: Vec<f32>,
    n_mlp: Vec<f32>,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    gate: Lin,
    up: Lin,
    down: Lin,
    /// Index into [`NativeEngine::ropes`].
    rope: Option<usize>,
    window: Option<usize>,
}

/// The loaded model on the host.
pub(crate) struct NativeEngine {
    config: ModelConfig,
    c: DecoderConfig,
    params: Vec<ParamInfo>,
    tracked: Vec<bool>,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    /// None: tied to the embeddings.
    lm_head: Option<Vec<f32>>,
    /// The LM head's transpose [D, V] for small models (see [`Lin::wt`]).
    lm_head_t: Option<Vec<f32>>,
    ropes: Vec<(Vec<f64>, f64)>,
    /// One single-threaded rayon pool per thread of the global pool, for
    /// running samples side by side ([`NativeEngine::spread`]).
    pools: Vec<rayon::ThreadPool>,
}

/// The packed rows of one chunk of samples.
struct Packed {
    /// T of each sample and its first row.
    lens: Vec<usize>,
    offs: Vec<usize>,
    /// N = Σ T.
    n: usize,
    ids: Vec<usize>,
    labels: Vec<usize>,
    /// Position of each row within its sample.
    pos: Vec<usize>,
    /// cos/sin of each of the model's RoPE tables for positions 0..max T,
    /// shared by the forward and the backward.
    tabs: Vec<RopeTab>,
}

/// What the backward needs from one layer's forward.
struct Saved {
    h: Vec<f32>,
    r1: Vec<f32>,
    xn1: Vec<f32>,
    /// Queries and keys after RoPE; values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities, per sample then head, T × T each.
    p: Vec<f32>,
    a: Vec<f32>,
    h1: Vec<f32>,
    r2: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    m: Vec<f32>,
}

/// Where the tracked weights' per-sample results go.
enum Out<'a> {
    Grads(&'a mut [Vec<Option<TensorGrad>>]),
    Factors(&'a mut [Vec<Option<TensorFactors>>]),
}
impl NativeEngine {
    /// Why `config` with tracked set `set` cannot run natively, or None when it can.
    pub(crate) fn unsupported(config: &ModelConfig, set: ParamSet) -> Option<String> {
        let c = match config {
            ModelConfig::Decoder(c) => c,
            ModelConfig::Gpt2(_) => return Some("gpt2 runs on the burn engine".into()),
        };
        let why = |what: &str| Some(format!("{}: {what}", c.arch.as_str()));
        if set == ParamSet::All2d {
            return why("embedding and LM-head gradients (all-2d) need the burn engine");
        }
        if !matches!(c.norm, NormKind::Rms | NormKind::RmsOffset) {
            return why("LayerNorm");
        }
        if c.placement != NormPlacement::Pre || c.parallel_residual {
            return why("norm placement or residual form other than LLaMA's");
        }
        if c.qk_norm != QkNorm::None {
            return why("q/k norms");
        }
        if c.qkv != QkvLayout::Split {
            return why("fused Q/K/V");
        }
        if c.mlp != MlpKind::Gated || c.act != Activation::Silu {
            return why("an MLP other than gated SiLU");
        }
        if !matches!(c.positions, Positions::Rotary { rotary_dim } if rotary_dim % 2 == 0 && rotary_dim <= c.head_dim)
        {
            return why("positions other than RoPE");
        }
        if c.attn_softcap.is_some() || c.final_softcap.is_some() {
            return why("soft-capping");
        }
        if c.embed_norm || c.head != HeadKind::Linear || c.lm_head_bias || c.nested {
            return why("embedding norm, head transform, LM-head bias or a nested checkpoint");
        }
        if c.num_kv_heads == 0 || c.num_heads % c.num_kv_heads != 0 {
            return why("H not a multiple of H_kv");
        }
        None
    }
    pub(crate) fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub(crate) fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    pub(crate) fn tracked_params(&self) -> Vec<ParamInfo> {
        self.params
            .iter()
            .zip(&self.tracked)
            .filter(|(_, &t)| t)
            .map(|(p, _)| p.clone())
            .collect()
    }
    /// Loss sums without gradients.
    pub(crate) fn loss(&self, samples: &[TokenSample]) -> Result<Vec<SampleLoss>> {
        let pk = self.pack(samples)?;
        let (h, _) = self.forward(&pk, false);
        let (losses, _) = self.head(&pk, &h, false);
        Ok(pk
            .lens
            .iter()
            .zip(losses)
            .map(|(&t, l)| SampleLoss {
                tokens: t,
                loss_sum: l,
            })
            .collect())
    }

    fn n_tracked(&self) -> usize {
        self.tracked.iter().filter(|&&t| t).count()
    }

    /// How many samples the caller should hand over at once when it wants one
    /// forward and backward per sample: one per thread for small models
    /// (see [`NativeEngine::spreads`]), else 1.
    pub(crate) fn in_flight(&self) -> usize {
        if self.spreads() {
            self.pools.len()
        } else {
            1
        }
    }

    /// Whether several samples run side by side, one thread each, instead of
    /// one after another with every product split over the threads. At small
    /// widths gemm gains little from a second thread on one product (measured:
    /// 127 × 512 × 512 runs at 60–90 GFLOP/s on one thread and no faster on
    /// two), while two independent single-threaded products run at full speed
    /// each; wide models (D·F > 4 M) keep the split products.
    fn spreads(&self) -> bool {
        self.pools.len() > 1 && Self::small(&self.c)
    }

    /// Models with D·F ≤ 4 M: samples side by side, transposed weight copies.
    fn small(c: &DecoderConfig) -> bool {
        c.hidden_size * c.intermediate_size <= 1 << 22
    }

    /// Runs `f` on groups of `samples` and concatenates the results in order.
    /// `each`: every sample is its own group (one forward and backward per
    /// sample); otherwise the samples are packed into one group per thread
    /// (balanced by tokens). Groups run side by side on the engine's
    /// single-threaded pools when [`NativeEngine::spreads`], else in turn.
    fn spread<T: Send>(
        &self,
        samples: &[TokenSample],
        each: bool,
        f: impl Fn(&[TokenSample]) -> Result<Vec<T>> + Sync,
    ) -> Result<Vec<T>> {
        let parallel = self.spreads() && samples.len() > 1;
        let p = self.pools.len();
        let groups: Vec<std::ops::Range<usize>> = if each {
            (0..samples.len()).map(|i| i..i + 1).collect()
        } else if parallel {
            let total: usize = samples.iter().map(TokenSample::predicted).sum();
            let mut groups = vec![];
            let (mut start, mut acc) = (0, 0);
            for (i, s) in samples.iter().enumerate() {
                acc += s.predicted();
                let left = samples.len() - i - 1;
                if acc * p >= total * (groups.len() + 1) && groups.len() + 1 < p && left > 0 {
                    groups.push(start..i + 1);
                    start = i + 1;
                }
            }
            groups.push(start..samples.len());
            groups
        } else {
            std::iter::once(0..samples.len()).collect()
        };
        let mut results: Vec<Option<Result<Vec<T>>>> = (0..groups.len()).map(|_| None).collect();
        if parallel {
            let slots: Vec<std::sync::Mutex<Option<Result<Vec<T>>>>> = (0..groups.len())
                .map(|_| std::sync::Mutex::new(None))
                .collect();
            std::thread::scope(|scope| {
                for (pi, pool) in self.pools.iter().enumerate() {
                    let (groups, slots, f) = (&groups, &slots, &f);
                    scope.spawn(move || {
                        pool.install(|| {
                            for gi in (pi..groups.len()).step_by(p) {
                                let r = f(&samples[groups[gi].clone()]);
                                *slots[gi].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                            }
                        })
                    });
                }
            });
            for (r, slot) in results.iter_mut().zip(slots) {
                *r = slot.into_inner().unwrap_or_else(|e| e.into_inner());
            }
        } else {
            for (r, g) in results.iter_mut().zip(&groups) {
                *r = Some(f(&samples[g.clone()]));
            }
        }
        let mut out = Vec::with_capacity(samples.len());
        for r in results {
            out.extend(r.expect("every group ran")?);
        }
        Ok(out)
    }

    /// Per-sample gradients of the tracked weights. Each sample's numbers do
    /// not depend on the others in the call; `each` runs one forward and
    /// backward per sample, otherwise samples are packed.
    pub(crate) fn grads(&self, samples: &[TokenSample], each: bool) -> Result<Vec<SampleGrads>> {
        self.spread(samples, each, |group| self.grads_packed(group))
    }

    /// Per-sample factors of the tracked weights (see [`TensorFactors`]).
    pub(crate) fn factors(
        &self,
        samples: &[TokenSample],
        each: bool,
    ) -> Result<Vec<SampleFactors>> {
        self.spread(samples, each, |group| self.factors_packed(group))
    }

    fn grads_packed(&self, samples: &[TokenSample]) -> Result<Vec<SampleGrads>> {
        let pk = self.pack(samples)?;
        let mut slots = self.empty_slots(samples.len());
        let losses = self.run(&pk, &mut Out::Grads(&mut slots));
        per_sample(
            samples,
            losses,
            slots,
            "gradient",
            |id, tokens, loss_sum, grads| SampleGrads {
                id,
                tokens,
                loss_sum,
                grads,
            },
        )
    }

    fn factors_packed(&self, samples: &[TokenSample]) -> Result<Vec<SampleFactors>> {
        let pk = self.pack(samples)?;
        let mut slots = self.empty_slots(samples.len());
        let losses = self.run(&pk, &mut Out::Factors(&mut slots));
        per_sample(
            samples,
            losses,
            slots,
            "factor",
            |id, tokens, loss_sum, factors| SampleFactors {
                id,
                tokens,
                loss_sum,
                factors,
            },
        )
    }

    /// One empty result slot per tracked weight, per sample.
    fn empty_slots<T: Clone>(&self, samples: usize) -> Vec<Vec<Option<T>>> {
        vec![vec![None; self.n_tracked()]; samples]
    }
}

/// Each sample's result from its loss and its filled slots (in checkpoint
/// order); a slot left empty is an error naming `what` was missing.
fn per_sample<T, R>(
    samples: &[TokenSample],
    losses: Vec<f64>,
    slots: Vec<Vec<Option<T>>>,
    what: &str,
    make: impl Fn(crate::data::SampleId, usize, f64, Vec<T>) -> R,
) -> Result<Vec<R>> {
    samples
        .iter()
        .zip(losses)
        .zip(slots)
        .map(|((s, l), slots)| {
            let got = slots
                .into_iter()
                .map(|v| v.ok_or_else(|| missing(what)))
                .collect::<Result<_>>()?;
            Ok(make(s.id.clone(), s.predicted(), l, got))
        })
        .collect()
}

fn missing(what: &str) -> Error {
    Error::Backend {
        context: "native CPU engine".into(),
        msg: format!("a tracked weight got no {what}"),
    }
}
