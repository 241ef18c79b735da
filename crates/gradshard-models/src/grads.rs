//! Per-sample gradients of the token-summed cross-entropy.
//!
//! For a sample x_0..x_{n-1}, positions p = 0..T-1 (T = n - 1) predict
//! x_{p+1}; the loss is L = Σ_p −log softmax(logits_p)[x_{p+1}] (summed, not
//! averaged, in nats) and g = dL/dW for every tracked weight W, returned under
//! its HF name with its stored shape.
//!
//! Two engines produce the same numbers:
//! - [`Engine::grads_loop`]: one sample per backward, tracked weights as
//!   leaves (the reference path).
//! - [`Engine::grads_batched`]: several samples right-padded into one batch,
//!   one backward of Σ_b L_b, per-sample gradients from output taps (see
//!   `model.rs`). Padding cannot change any sample's gradient: padded
//!   positions are masked out of the loss (weight 0) and, being *after* every
//!   real position, are never attended to by real positions (causal mask), so
//!   their δ is exactly zero and they add nothing to δᵀ·x.
//!
//! [`Engine::factors_batched`] runs the same tap pass but returns, per tracked
//! weight and sample, the factors A, B with G = AᵀB ([`TensorFactors`]),
//! sliced to the sample's real positions, instead of forming G.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::IndexingUpdateOp;
use burn::tensor::{Int, Tensor, TensorData};

use crate::data::{SampleId, TokenSample};
use crate::error::{Error, Result};
use crate::layers::{Ctx, GradMode, Inner, Layout, ParamInfo, ParamSet, TapInput};
use crate::model::Model;

/// One tensor's gradient: HF name, stored shape, row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorGrad {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One sample's result.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleGrads {
    pub id: SampleId,
    /// T, the number of predicted positions (n - 1).
    pub tokens: usize,
    /// Σ over predicted positions of the cross-entropy, in nats.
    pub loss_sum: f64,
    /// Gradients of the tracked weights, in checkpoint order.
    pub grads: Vec<TensorGrad>,
}

/// Loss of one sample without gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleLoss {
    pub tokens: usize,
    pub loss_sum: f64,
}

fn backend_err(context: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend {
        context: context.to_string(),
        msg: format!("{e:?}"),
    }
}

fn to_vec<B: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<B, D>,
    context: &str,
) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| backend_err(context, e))
}

/// Refuses an empty chunk, a sample of fewer than 2 tokens and a token id
/// outside the vocabulary, naming the sample (both engines call it first).
pub(crate) fn check_samples(samples: &[TokenSample], vocab: usize) -> Result<()> {
    if samples.is_empty() {
        return Err(Error::InvalidArgument("empty batch".into()));
    }
    for s in samples {
        if s.ids.len() < 2 {
            return Err(Error::InvalidArgument(format!(
                "sample {} (line {}) has {} tokens; at least 2 are needed",
                s.id,
                s.line,
                s.ids.len()
            )));
        }
        if let Some(&bad) = s.ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "sample {} (line {}) has token id {bad} >= vocab_size {vocab}",
                s.id, s.line
            )));
        }
    }
    Ok(())
}

/// The model plus the set of tracked weights, on autodiff backend `A`.
pub struct Engine<A: AutodiffBackend> {
    pub(crate) model: Model<Inner<A>>,
    /// tracked[idx] for each entry of `model.params`; only 2-D weights.
    tracked: Vec<bool>,
}

/// Inputs of one padded batch.
struct Batch<A: AutodiffBackend> {
    /// Input ids [b, t]: x_0..x_{t-1}, right-padded with token 0.
    ids: Tensor<A, 2, Int>,
    /// Labels [b, t]: x_1..x_t, 0 where padded.
    labels: Tensor<A, 2, Int>,
    /// 1.0 where the position counts, 0.0 on padding [b, t].
    mask: Tensor<A, 2>,
    t: usize,
}

impl<A: AutodiffBackend> Engine<A> {
    /// Load the model in `dir` onto `device`, tracking the weights in `set`.
    pub fn load(dir: &std::path::Path, device: &A::Device, set: ParamSet) -> Result<Self> {
        let model = Model::<Inner<A>>::load(dir, device)?;
        let tracked = model
            .params
            .iter()
            .map(|p| p.shape.len() == 2 && set.contains(p.kind))
            .collect();
        Ok(Engine { model, tracked })
    }

    /// The loaded config.
    pub fn config(&self) -> &gradshard_core::model::ModelConfig {
        &self.model.config
    }

    /// Every stored weight of the model.
    pub fn params(&self) -> &[ParamInfo] {
        &self.model.params
    }

    /// The tracked weights, in the order their gradients are returned.
    pub fn tracked_params(&self) -> Vec<ParamInfo> {
        self.model
            .params
            .iter()
            .zip(&self.tracked)
            .filter(|(_, &t)| t)
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn batch(&self, samples: &[TokenSample]) -> Result<Batch<A>> {
        check_samples(samples, self.model.config.vocab_size())?;
        let b = samples.len();
        let t = samples.iter().map(|s| s.ids.len() - 1).max().unwrap_or(0);
        let mut ids = vec![0i64; b * t];
        let mut labels = vec![0i64; b * t];
        let mut mask = vec![0f32; b * t];
        for (i, s) in samples.iter().enumerate() {
            let n = s.ids.len();
            for p in 0..n - 1 {
                ids[i * t + p] = s.ids[p] as i64;
                labels[i * t + p] = s.ids[p + 1] as i64;
                mask[i * t + p] = 1.0;
            }
        }
        let dev = &self.model.device;
        Ok(Batch {
            ids: Tensor::from_data(TensorData::new(ids, [b, t]), dev),
            labels: Tensor::from_data(TensorData::new(labels, [b, t]), dev),
            mask: Tensor::from_data(TensorData::new(mask, [b, t]), dev),
            t,
        })
    }

    /// Forward pass; returns per-sample loss sums [b] (nats).
    fn losses(&self, batch: &Batch<A>, ctx: &mut Ctx<'_, A>) -> Result<Tensor<A, 1>> {
        let logits = self.model.forward(batch.ids.clone(), ctx)?;
        let [b, t, _] = logits.dims();
        debug_assert_eq!(t, batch.t);
        // Cross-entropy as logsumexp − picked logit: no full-width log-softmax tensor
        // (one pass over the [b, t, V] logits less forward and backward). The row max
        // is detached: logsumexp's derivative with respect to the shift is exactly 0.
        let max = logits.clone().max_dim(2).detach();
        let lse = (logits.clone() - max.clone()).exp().sum_dim(2).log() + max;
        let picked = logits.gather(2, batch.labels.clone().reshape([b, t, 1]));
        let nll = (lse - picked).reshape([b, t]);
        Ok((nll * batch.mask.clone()).sum_dim(1).reshape([b]))
    }

    /// Loss sums without gradients, one entry per sample.
    pub fn loss(&self, samples: &[TokenSample]) -> Result<Vec<SampleLoss>> {
        let batch = self.batch(samples)?;
        let mut ctx = Ctx::new(GradMode::None, &self.tracked);
        let l = to_vec(self.losses(&batch, &mut ctx)?, "reading losses")?;
        Ok(samples
            .iter()
            .zip(l)
            .map(|(s, l)| SampleLoss {
                tokens: s.predicted(),
                loss_sum: l as f64,
            })
            .collect())
    }

    /// Reference path: one sample, one backward, gradients read off leaves.
    pub fn grads_loop(&self, sample: &TokenSample) -> Result<SampleGrads> {
        let batch = self.batch(std::slice::from_ref(sample))?;
        let mut ctx = Ctx::new(GradMode::Leaf, &self.tracked);
        let loss = self.losses(&batch, &mut ctx)?;
        let grads = loss.clone().sum().backward();
        let loss_sum = to_vec(loss, "reading loss")?[0] as f64;
        let mut out = Vec::new();
        for (idx, p) in self.model.params.iter().enumerate() {
            if !self.tracked[idx] {
                continue;
            }
            let leaf = ctx
                .leaves
                .iter()
                .find(|(i, _)| *i == idx)
                .map(|(_, l)| l)
                .ok_or_else(|| {
                    backend_err(
                        "collecting gradients",
                        format!("{} was not used in the forward pass", p.name),
                    )
                })?;
            let g = leaf.grad(&grads).ok_or_else(|| {
                backend_err(
                    "collecting gradients",
                    format!("no gradient for {}", p.name),
                )
            })?;
            out.push(TensorGrad {
                name: p.name.clone(),
                shape: p.shape.clone(),
                data: to_vec(g, "reading gradients")?,
            });
        }
        Ok(SampleGrads {
            id: sample.id.clone(),
            tokens: sample.predicted(),
            loss_sum,
            grads: out,
        })
    }

    /// The Tap-mode forward and backward of one padded batch shared by
    /// [`Engine::grads_batched`] and [`Engine::factors_batched`]: per-sample
    /// losses and, for every tap in forward order, δ with the tap's input.
    /// Fails when a tracked weight was never tapped.
    fn tap_pass(&self, samples: &[TokenSample]) -> Result<TapPass<Inner<A>>> {
        let batch = self.batch(samples)?;
        let mut ctx = Ctx::new(GradMode::Tap, &self.tracked);
        let loss = self.losses(&batch, &mut ctx)?;
        // Σ_b L_b: samples do not interact, so dΣ/dz restricted to sample b is dL_b/dz.
        let grads = loss.clone().sum().backward();
        let losses = to_vec(loss, "reading losses")?;
        let mut taps = Vec::with_capacity(ctx.taps.len());
        for tap in ctx.taps {
            let delta = tap.z.grad(&grads).ok_or_else(|| {
                backend_err(
                    "collecting gradients",
                    format!("no output gradient for {}", self.model.params[tap.idx].name),
                )
            })?;
            taps.push(TapGrad {
                idx: tap.idx,
                delta,
                input: tap.input,
            });
        }
        for (idx, p) in self.model.params.iter().enumerate() {
            if self.tracked[idx] && !taps.iter().any(|t| t.idx == idx) {
                return Err(backend_err(
                    "collecting gradients",
                    format!("{} was not used in the forward pass", p.name),
                ));
            }
        }
        Ok(TapPass {
            t: batch.t,
            losses,
            taps,
        })
    }

    /// Batched path: all samples in one backward, per-sample gradients from taps.
    pub fn grads_batched(&self, samples: &[TokenSample]) -> Result<Vec<SampleGrads>> {
        let pass = self.tap_pass(samples)?;
        let b = samples.len();

        // Per-sample gradient [b, rows, cols] of every tracked param, summed over its uses.
        let mut acc: Vec<Option<Tensor<Inner<A>, 3>>> = vec![None; self.model.params.len()];
        for tap in pass.taps {
            let delta = tap.delta;
            let g = match tap.input {
                // δ [b,t,out], x [b,t,in]: g_b = δ_bᵀ x_b [out,in]
                TapInput::Linear {
                    x,
                    layout: Layout::OutIn,
                } => delta.swap_dims(1, 2).matmul(x),
                // Conv1D: g_b = x_bᵀ δ_b [in,out]
                TapInput::Linear {
                    x,
                    layout: Layout::InOut,
                } => x.swap_dims(1, 2).matmul(delta),
                // g_b[r] = Σ_{p: ids_b[p] = r} δ_b[p]  ([rows, D])
                TapInput::Rows { ids, rows } => {
                    let [bb, t, d] = delta.dims();
                    let index = ids.reshape([bb, t, 1]).repeat_dim(2, d);
                    Tensor::<Inner<A>, 3>::zeros([bb, rows, d], &delta.device()).scatter(
                        1,
                        index,
                        delta,
                        IndexingUpdateOp::Add,
                    )
                }
            };
            acc[tap.idx] = Some(match acc[tap.idx].take() {
                Some(prev) => prev + g,
                None => g,
            });
        }

        let mut out: Vec<SampleGrads> = samples
            .iter()
            .zip(&pass.losses)
            .map(|(s, &l)| SampleGrads {
                id: s.id.clone(),
                tokens: s.predicted(),
                loss_sum: l as f64,
                grads: Vec::new(),
            })
            .collect();
        for (idx, p) in self.model.params.iter().enumerate() {
            if !self.tracked[idx] {
                continue;
            }
            let g = acc[idx].take().ok_or_else(|| {
                backend_err(
                    "collecting gradients",
                    format!("{} was not used in the forward pass", p.name),
                )
            })?;
            let per = p.shape.iter().product::<usize>();
            let data = to_vec(g, "reading gradients")?;
            if data.len() != b * per {
                return Err(backend_err(
                    "collecting gradients",
                    format!(
                        "{}: got {} values, expected {}",
                        p.name,
                        data.len(),
                        b * per
                    ),
                ));
            }
            for (s, chunk) in out.iter_mut().zip(data.chunks_exact(per)) {
                s.grads.push(TensorGrad {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    data: chunk.to_vec(),
                });
            }
        }
        Ok(out)
    }

    /// Batched path returning factors instead of gradients: one backward for
    /// all samples, then, for every tracked weight of every sample, A and B
    /// with G = AᵀB (see [`TensorFactors`]). Each tap's δ and input are read
    /// to the host once per batch and sliced per sample to its T real
    /// positions (padding never enters a factor); a weight used several
    /// times (GPT-2's tied wte / lm_head) stacks its uses' rows in forward
    /// order.
    pub fn factors_batched(&self, samples: &[TokenSample]) -> Result<Vec<SampleFactors>> {
        let pass = self.tap_pass(samples)?;
        let b = samples.len();
        let t = pass.t;
        let lens: Vec<usize> = samples.iter().map(TokenSample::predicted).collect();

        // slot[idx]: position of param idx among the tracked ones.
        let mut slot = vec![usize::MAX; self.model.params.len()];
        let mut uses = vec![0usize; self.model.params.len()];
        for tap in &pass.taps {
            uses[tap.idx] += 1;
        }
        let mut out: Vec<SampleFactors> = samples
            .iter()
            .zip(&pass.losses)
            .zip(&lens)
            .map(|((s, &l), &n)| SampleFactors {
                id: s.id.clone(),
                tokens: n,
                loss_sum: l as f64,
                factors: Vec::new(),
            })
            .collect();
        for (idx, p) in self.model.params.iter().enumerate() {
            if !self.tracked[idx] {
                continue;
            }
            slot[idx] = out[0].factors.len();
            let (r, c) = (p.shape[0], p.shape[1]);
            for (s, &n) in out.iter_mut().zip(&lens) {
                let n = n * uses[idx];
                s.factors.push(TensorFactors {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    n: 0,
                    a: Vec::with_capacity(n * r),
                    b: Vec::with_capacity(n * c),
                });
            }
        }

        for tap in pass.taps {
            let p = &self.model.params[tap.idx];
            let (r, c) = (p.shape[0], p.shape[1]);
            let bad =
                |what: String| backend_err("collecting factors", format!("{}: {what}", p.name));
            let [db, dt, dw] = tap.delta.dims();
            if db != b || dt != t {
                return Err(bad(format!(
                    "output gradient is [{db}, {dt}, {dw}], batch is [{b}, {t}]"
                )));
            }
            let delta = to_vec(tap.delta, "reading output gradients")?;
            match tap.input {
                TapInput::Linear { x, layout } => {
                    let [xb, xt, xw] = x.dims();
                    // (A width, B width) = (shape[0], shape[1])
                    let widths = match layout {
                        Layout::OutIn => (dw, xw),
                        Layout::InOut => (xw, dw),
                    };
                    if xb != b || xt != t || widths != (r, c) {
                        return Err(bad(format!(
                            "tap is δ [{db}, {dt}, {dw}], x [{xb}, {xt}, {xw}] ({layout:?})"
                        )));
                    }
                    let x = to_vec(x, "reading tap inputs")?;
                    for (i, (s, &n)) in out.iter_mut().zip(&lens).enumerate() {
                        let f = &mut s.factors[slot[tap.idx]];
                        let d_rows = &delta[i * t * dw..(i * t + n) * dw];
                        let x_rows = &x[i * t * xw..(i * t + n) * xw];
                        let (a, bb) = match layout {
                            Layout::OutIn => (d_rows, x_rows),
                            Layout::InOut => (x_rows, d_rows),
                        };
                        f.a.extend_from_slice(a);
                        f.b.extend_from_slice(bb);
                        f.n += n;
                    }
                }
                TapInput::Rows { ids, rows } => {
                    let [ib, it] = ids.dims();
                    if ib != b || it != t || rows != r || dw != c {
                        return Err(bad(format!(
                            "tap is δ [{db}, {dt}, {dw}], ids [{ib}, {it}] into {rows} rows"
                        )));
                    }
                    let ids = ids
                        .into_data()
                        .convert::<i64>()
                        .into_vec::<i64>()
                        .map_err(|e| backend_err("reading tap row ids", e))?;
                    for (i, (s, &n)) in out.iter_mut().zip(&lens).enumerate() {
                        let f = &mut s.factors[slot[tap.idx]];
                        let start = f.a.len();
                        f.a.resize(start + n * r, 0.0);
                        for (pos, &id) in ids[i * t..i * t + n].iter().enumerate() {
                            let id = usize::try_from(id)
                                .ok()
                                .filter(|&id| id < r)
                                .ok_or_else(|| bad(format!("row id {id} outside 0..{r}")))?;
                            f.a[start + pos * r + id] = 1.0;
                        }
                        f.b.extend_from_slice(&delta[i * t * dw..(i * t + n) * dw]);
                        f.n += n;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The result of [`Engine::tap_pass`].
struct TapPass<B: Backend> {
    /// Padded length of the batch (positions per sample row).
    t: usize,
    /// Σ over real positions of the cross-entropy, one per sample.
    losses: Vec<f32>,
    /// One per tap, in forward order.
    taps: Vec<TapGrad<B>>,
}

/// One tap after the backward: its param, δ = dL/d(output) [b, t, out] and
/// the input it saved.
struct TapGrad<B: Backend> {
    idx: usize,
    delta: Tensor<B, 3>,
    input: TapInput<B>,
}

/// G = AᵀB for one tracked weight of one sample, in the stored orientation:
/// G has the HF shape `[shape[0], shape[1]]` and the row-major layout of
/// [`TensorGrad::data`].
///
/// Per use of the weight, with the sample's T real positions as rows:
/// - a torch Linear ([out, in]): A = δ (T × out), B = x (T × in);
/// - a GPT-2 Conv1D ([in, out]): A = x (T × in), B = δ (T × out);
/// - an embedding lookup ([rows, D]): A = one-hot of the looked-up ids
///   (T × rows, dense), B = δ (T × D).
///
/// A weight used several times stacks its uses' rows (A = vstack(A_u),
/// B = vstack(B_u)), so n = Σ_u T.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorFactors {
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

impl TensorFactors {
    /// Forms G = AᵀB (shape[0] × shape[1], row-major, f32) with `gemm`
    /// (multi-threaded on rayon's pool when large enough).
    ///
    /// # Panics
    /// When `shape` is not 2-D or `a`/`b` do not hold n × shape[0] /
    /// n × shape[1] values.
    pub fn gradient(&self) -> Vec<f32> {
        gradshard_core::factor::factors_gradient(&self.name, &self.shape, self.n, &self.a, &self.b)
    }

    /// The gradient as a [`TensorGrad`] (consumes the factors).
    pub fn into_grad(self) -> TensorGrad {
        let data = self.gradient();
        TensorGrad {
            name: self.name,
            shape: self.shape,
            data,
        }
    }
}

/// One sample's result as factors (see [`TensorFactors`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleFactors {
    pub id: SampleId,
    /// T, the number of predicted positions (n - 1).
    pub tokens: usize,
    /// Σ over predicted positions of the cross-entropy, in nats.
    pub loss_sum: f64,
    /// Factors of the tracked weights, in checkpoint order (the order of
    /// [`SampleGrads::grads`]).
    pub factors: Vec<TensorFactors>,
}

impl SampleFactors {
    /// Forms every gradient.
    pub fn into_grads(self) -> SampleGrads {
        SampleGrads {
            id: self.id,
            tokens: self.tokens,
            loss_sum: self.loss_sum,
            grads: self
                .factors
                .into_iter()
                .map(TensorFactors::into_grad)
                .collect(),
        }
    }
}
