//! What every burn model shares, generic over the backend: the weight
//! registry ([`ParamKind`], [`ParamSet`], [`ParamInfo`]), projections and
//! norms, the loader, and the forward pass's gradient bookkeeping ([`Ctx`]:
//! leaves or taps), with the attention helpers both GPT-2 and the generic
//! decoder use.
//!
//! Weights are held on the *inner* (non-autodiff) backend and lifted into the
//! autodiff graph at every forward pass (`Tensor::from_inner`), so each pass
//! builds fresh leaves and nothing from an earlier backward lingers.
//!
//! Gradients are obtained in one of two ways, chosen by [`GradMode`]:
//! - `Leaf`: each tracked weight becomes a `require_grad` leaf; its gradient
//!   after backward is the gradient of the *whole batch's* loss, so this mode
//!   is only per-sample with batch size 1 (the reference loop).
//! - `Tap`: each tracked weight's output y gets a zero-valued leaf z added
//!   (y + z); dL/dz = δ is the output gradient, and the per-sample weight
//!   gradient is formed afterwards from δ and the saved input x
//!   (δ_bᵀ·x_b for [out,in] weights, x_bᵀ·δ_b for Conv1D [in,out] weights,
//!   a scatter-add of δ rows for embeddings).
//!
//! All activations are f32. Shapes use b = batch, t = positions fed
//! (= predicted positions T for the longest sample), D = hidden size.

use burn::tensor::activation;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::weights::Checkpoint;
use gradshard_core::model::{Activation, RopeScaling};

/// The inner (non-autodiff) backend of an autodiff backend.
pub(crate) type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// What role a stored weight plays; decides membership in a [`ParamSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Attention projections (q/k/v/o, c_attn, attn.c_proj).
    Attn,
    /// MLP projections (gate/up/down, c_fc, mlp.c_proj).
    Mlp,
    /// Token or position embedding tables.
    Embedding,
    /// Untied output projection.
    LmHead,
    /// 1-D weights: norms and biases (never tracked).
    Vector,
}

/// Which weights get per-sample gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ParamSet {
    /// Attention projection weights only (the default).
    #[default]
    Attn,
    /// Attention and MLP projection weights (what the fixtures store).
    AttnMlp,
    /// Every 2-D weight, including embeddings and an untied lm_head.
    All2d,
}

impl ParamSet {
    /// Whether weights of `kind` belong to this set.
    pub fn contains(self, kind: ParamKind) -> bool {
        match self {
            ParamSet::Attn => kind == ParamKind::Attn,
            ParamSet::AttnMlp => matches!(kind, ParamKind::Attn | ParamKind::Mlp),
            ParamSet::All2d => kind != ParamKind::Vector,
        }
    }
}

impl std::str::FromStr for ParamSet {
    type Err = Error;
    /// Accepts the CLI spellings `attn`, `attn,mlp` (or `mlp,attn`) and `all-2d`.
    fn from_str(s: &str) -> Result<Self> {
        let mut parts: Vec<&str> = s.split(',').map(str::trim).collect();
        parts.sort_unstable();
        match parts.as_slice() {
            ["attn"] => Ok(ParamSet::Attn),
            ["attn", "mlp"] => Ok(ParamSet::AttnMlp),
            ["all-2d"] | ["all2d"] => Ok(ParamSet::All2d),
            _ => Err(Error::InvalidArgument(format!(
                "unknown parameter set {s:?} (use attn, attn,mlp or all-2d)"
            ))),
        }
    }
}

/// A stored weight: its Hugging Face name, shape and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Canonical HF parameter name (e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Shape as stored in the checkpoint ([out,in] for Linear, [in,out] for Conv1D).
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

/// Orientation of a projection weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// torch Linear: W is [out, in], y = x·Wᵀ.
    OutIn,
    /// GPT-2 Conv1D: W is [in, out], y = x·W.
    InOut,
}

/// A projection: weight, optional bias, layout, and its index in the param registry.
pub(crate) struct Lin<B: Backend> {
    pub(crate) idx: usize,
    pub(crate) w: Tensor<B, 2>,
    pub(crate) b: Option<Tensor<B, 1>>,
    pub(crate) layout: Layout,
}

pub(crate) struct Norm<B: Backend> {
    pub(crate) w: Tensor<B, 1>,
    /// LayerNorm bias; None for RMSNorm.
    pub(crate) b: Option<Tensor<B, 1>>,
}

/// Predicate for checkpoint entries that are not weights (buffers, tied copies).
pub(crate) type Ignorable = Box<dyn Fn(&str) -> bool>;

/// Spec entry: canonical name, name in the checkpoint, shape, kind.
pub(crate) struct SpecEntry {
    pub(crate) name: String,
    pub(crate) stored: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) kind: ParamKind,
}

pub(crate) struct SpecBuilder {
    pub(crate) entries: Vec<SpecEntry>,
    /// Prefix replaced in stored names (GPT-2 checkpoints without `transformer.`).
    pub(crate) strip: Option<(&'static str, &'static str)>,
}

impl SpecBuilder {
    pub(crate) fn add(&mut self, name: String, shape: Vec<usize>, kind: ParamKind) -> usize {
        let stored = match self.strip {
            Some((canon, stored)) if name.starts_with(canon) => {
                format!("{stored}{}", &name[canon.len()..])
            }
            _ => name.clone(),
        };
        self.entries.push(SpecEntry {
            name,
            stored,
            shape,
            kind,
        });
        self.entries.len() - 1
    }
}

/// Reads weights from the checkpoint and uploads them to the device one at a
/// time, so host memory holds at most one converted tensor.
pub(crate) struct Loader<'a, B: Backend> {
    pub(crate) ckpt: &'a Checkpoint,
    pub(crate) spec: &'a [SpecEntry],
    pub(crate) device: &'a B::Device,
}

impl<B: Backend> Loader<'_, B> {
    fn idx(&self, name: &str) -> usize {
        self.spec
            .iter()
            .position(|e| e.name == name)
            .unwrap_or_else(|| panic!("internal: weight {name} not in spec"))
    }

    pub(crate) fn w2(&self, name: &str) -> Result<(usize, Tensor<B, 2>)> {
        let i = self.idx(name);
        let e = &self.spec[i];
        let data = self.ckpt.read_f32(&e.stored)?;
        let t = Tensor::from_data(TensorData::new(data, [e.shape[0], e.shape[1]]), self.device);
        Ok((i, t))
    }

    pub(crate) fn w1(&self, name: &str) -> Result<Tensor<B, 1>> {
        let e = &self.spec[self.idx(name)];
        let data = self.ckpt.read_f32(&e.stored)?;
        Ok(Tensor::from_data(
            TensorData::new(data, [e.shape[0]]),
            self.device,
        ))
    }

    pub(crate) fn lin(&self, prefix: &str, bias: bool, layout: Layout) -> Result<Lin<B>> {
        let (idx, w) = self.w2(&format!("{prefix}.weight"))?;
        let b = if bias {
            Some(self.w1(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Lin { idx, w, b, layout })
    }
}

/// RoPE inverse frequencies for `dim` rotated values of a head (per `rope`),
/// and the position divisor of linear scaling.
pub(crate) fn rope_freqs(rope: &gradshard_core::model::RopeConfig, dim: usize) -> (Vec<f64>, f64) {
    let d = dim as f64;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / rope.theta.powf(2.0 * i as f64 / d))
        .collect();
    match rope.scaling {
        RopeScaling::None => (base, 1.0),
        RopeScaling::Linear { factor } => (base, factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            let f = base
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (f, 1.0)
        }
    }
}

// ---------------------------------------------------------------------------
// Forward pass with gradient bookkeeping
// ---------------------------------------------------------------------------

/// How gradients are collected during a forward pass (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GradMode {
    /// Tracked weights are leaves; valid per-sample only for batch size 1.
    Leaf,
    /// Zero-valued taps on tracked weights' outputs; per-sample for any batch.
    Tap,
    /// No gradients (loss only).
    None,
}

/// What a tap needs, besides δ, to form the per-sample weight gradient.
pub(crate) enum TapInput<B: Backend> {
    /// A projection: its input x [b, t, in] and the weight layout.
    Linear { x: Tensor<B, 3>, layout: Layout },
    /// A row lookup (embedding): the looked-up row ids [b, t].
    Rows { ids: Tensor<B, 2, Int>, rows: usize },
}

/// A zero-valued leaf added to a tracked weight's output.
pub(crate) struct Tap<B: AutodiffBackend> {
    pub(crate) idx: usize,
    pub(crate) input: TapInput<Inner<B>>,
    /// Zero leaf of the output's shape; its gradient is δ = dL/d(output).
    pub(crate) z: Tensor<B, 3>,
}

/// Per-pass bookkeeping: mode, tracked flags, and the leaves/taps created.
pub(crate) struct Ctx<'a, B: AutodiffBackend> {
    mode: GradMode,
    /// tracked[idx]: whether param `idx` gets gradients.
    tracked: &'a [bool],
    /// Leaf mode: (param idx, leaf) pairs, one per param even if used twice (tied).
    pub(crate) leaves: Vec<(usize, Tensor<B, 2>)>,
    pub(crate) taps: Vec<Tap<B>>,
}

impl<'a, B: AutodiffBackend> Ctx<'a, B> {
    pub(crate) fn new(mode: GradMode, tracked: &'a [bool]) -> Self {
        Ctx {
            mode,
            tracked,
            leaves: vec![],
            taps: vec![],
        }
    }

    pub(crate) fn weight(&mut self, idx: usize, w: &Tensor<Inner<B>, 2>) -> Tensor<B, 2> {
        if self.mode == GradMode::Leaf && self.tracked[idx] {
            if let Some((_, leaf)) = self.leaves.iter().find(|(i, _)| *i == idx) {
                return leaf.clone();
            }
            let leaf = Tensor::<B, 2>::from_inner(w.clone()).require_grad();
            self.leaves.push((idx, leaf.clone()));
            leaf
        } else {
            Tensor::from_inner(w.clone())
        }
    }

    pub(crate) fn tapping(&self, idx: usize) -> bool {
        self.mode == GradMode::Tap && self.tracked[idx]
    }

    /// Add a zero leaf to `y` and remember it with the input that produced y.
    pub(crate) fn tap(
        &mut self,
        idx: usize,
        y: Tensor<B, 3>,
        input: TapInput<Inner<B>>,
    ) -> Tensor<B, 3> {
        let z = Tensor::<B, 3>::zeros(y.dims(), &y.device()).require_grad();
        self.taps.push(Tap {
            idx,
            input,
            z: z.clone(),
        });
        y + z
    }

    /// y = x·Wᵀ (+ b) for [out,in] weights, y = x·W (+ b) for Conv1D [in,out].
    pub(crate) fn linear(&mut self, x: Tensor<B, 3>, lin: &Lin<Inner<B>>) -> Tensor<B, 3> {
        let [b, t, din] = x.dims();
        let w = self.weight(lin.idx, &lin.w);
        let x2 = x.clone().reshape([b * t, din]);
        let y2 = match lin.layout {
            Layout::OutIn => x2.matmul(w.transpose()),
            Layout::InOut => x2.matmul(w),
        };
        let dout = y2.dims()[1];
        let mut y = y2.reshape([b, t, dout]);
        if let Some(bias) = &lin.b {
            y = y + Tensor::<B, 1>::from_inner(bias.clone()).reshape([1, 1, dout]);
        }
        if self.tapping(lin.idx) {
            let input = TapInput::Linear {
                x: x.inner(),
                layout: lin.layout,
            };
            y = self.tap(lin.idx, y, input);
        }
        y
    }

    /// Row lookup out[b, t] = W[ids[b, t]] for an embedding table W [rows, D].
    pub(crate) fn rows(
        &mut self,
        idx: usize,
        w: &Tensor<Inner<B>, 2>,
        ids: &Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let [rows, d] = w.dims();
        let w = self.weight(idx, w);
        let y = w.select(0, ids.clone().reshape([b * t])).reshape([b, t, d]);
        if self.tapping(idx) {
            let input = TapInput::Rows {
                ids: ids.clone().inner(),
                rows,
            };
            self.tap(idx, y, input)
        } else {
            y
        }
    }
}

pub(crate) fn lift<B: AutodiffBackend, const D: usize>(t: &Tensor<Inner<B>, D>) -> Tensor<B, D> {
    Tensor::from_inner(t.clone())
}

pub(crate) fn act<B: Backend, const D: usize>(a: Activation, x: Tensor<B, D>) -> Tensor<B, D> {
    match a {
        Activation::Silu => activation::silu(x),
        // x·Φ(x) = 0.5·x·(1 + erf(x/√2)), written out: burn's fused gelu is
        // ~3e-4 off torch's exact GELU in its gradient (seen on the GPT-NeoX
        // and BERT fixtures); composed from erf the gradient follows torch's.
        Activation::Gelu => {
            let phi = (x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0;
            x * phi * 0.5
        }
        Activation::GeluTanh => {
            // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))); x³ as a product
            // (powf of a negative base is not safe on every backend).
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let x3 = x.clone() * x.clone() * x.clone();
            let inner = (x.clone() + x3 * 0.044715) * c;
            x * (inner.tanh() + 1.0) * 0.5
        }
        Activation::Relu => activation::relu(x),
    }
}

/// Additive attention mask [1, 1, t, t]: 0 where query i may see key j
/// (j <= i, and i - j < window if a window is set), -1e30 elsewhere. After
/// softmax the masked probabilities are exactly 0 in f32, so masked keys
/// (including right padding) receive exactly zero gradient.
pub(crate) fn attn_mask<B: Backend>(
    t: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            let visible = j <= i && window.is_none_or(|w| i - j < w);
            if !visible {
                m[i * t + j] = -1e30;
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [1, 1, t, t]), device)
}

/// [b, t, h·d] → [b, h, t, d].
pub(crate) fn split_heads<B: Backend>(x: Tensor<B, 3>, h: usize, d: usize) -> Tensor<B, 4> {
    let [b, t, _] = x.dims();
    x.reshape([b, t, h, d]).swap_dims(1, 2)
}

/// HF rotate-half RoPE: out = x·cos + rotate_half(x)·sin, where
/// rotate_half(x) = [-x2, x1] for x = [x1, x2] split at d/2. cos and sin are
/// [1, 1, t, d] with the frequency table repeated over both halves.
pub(crate) fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let [cb, ch, ct, cd] = cos.dims();
    if (cb, ch, ct, cd) != (1, 1, t, d) {
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rot = Tensor::cat(vec![x2.neg(), x1], 3);
        return x * cos.clone() + rot * sin.clone();
    }
    // The same arithmetic on flat views: x as [b·h, t·d] against cos/sin as one shared
    // [1, t·d] row, and the halves as [b·h·t, 2, d/2]. A CPU backend then runs every
    // product as a contiguous row broadcast instead of walking the head-split strides
    // element by element (burn-flex: ~10 % of collect at LLaMA-small shapes).
    let x = x.reshape([b * h, t * d]);
    let halves = x.clone().reshape([b * h * t, 2, d / 2]);
    let x1 = halves.clone().narrow(1, 0, 1);
    let x2 = halves.narrow(1, 1, 1);
    let rot = Tensor::cat(vec![x2.neg(), x1], 1).reshape([b * h, t * d]);
    let (cos, sin) = (
        cos.clone().reshape([1, t * d]),
        sin.clone().reshape([1, t * d]),
    );
    (x * cos + rot * sin).reshape([b, h, t, d])
}

/// `scores + mask` for scores [b, h, t, s] and a mask [1, 1, t, s] shared by every
/// batch row and head, added on flat views ([b·h, t·s] + [1, t·s]) so that a CPU
/// backend runs it as one contiguous row broadcast; any other mask shape is added
/// as it is. Same values either way.
pub(crate) fn add_mask<B: Backend>(scores: Tensor<B, 4>, mask: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, s] = scores.dims();
    if mask.dims() != [1, 1, t, s] {
        return scores + mask.clone();
    }
    (scores.reshape([b * h, t * s]) + mask.clone().reshape([1, t * s])).reshape([b, h, t, s])
}

/// Repeat each of h_kv heads n_rep times: [b, h_kv, t, d] → [b, h_kv·n_rep, t, d]
/// with query head h reading kv head h / n_rep (HF `repeat_kv`).
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, hkv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, n_rep)
        .reshape([b, hkv * n_rep, t, d])
}
