//! One decoder for every family described by a [`DecoderConfig`]
//! (`families.rs`): GPT-NeoX, Phi-3, causal BERT, Qwen3, Gemma 2 and 3,
//! OLMo-2. The forward pass reads the description — norm kind and placement,
//! q/k norm scope, RoPE width and per-layer parameters, soft-caps, sliding
//! windows, residual form, MLP kind — and the weights by role ([`Roles`]).
//!
//! Fused weights (Phi-3 `qkv_proj` and `gate_up_proj`, GPT-NeoX
//! `query_key_value`) stay one Linear: their *output* is split. The tap on
//! the fused output therefore yields the gradient of the stored tensor in
//! its Hugging Face layout, and its factors (δ of the whole fused output,
//! the shared input), exactly what `ingest`, `collect` and the geometry
//! expect.

use burn::tensor::activation;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::layers::{
    act, add_mask, attn_mask, lift, repeat_kv, rope, rope_freqs, split_heads, Ctx, Ignorable,
    Inner, Layout, Lin, Loader, Norm, ParamKind, SpecBuilder,
};
use crate::weights::Checkpoint;
use gradshard_core::model::{
    roles, DecoderConfig, HeadKind, MlpKind, NormKind, Positions, QkNorm, QkvLayout, Roles,
};

/// One layer's weights.
struct DecLayer<B: Backend> {
    /// Norm slots: attention input, attention output, MLP input, MLP output.
    norms: [Option<Norm<B>>; 4],
    /// Q, K, V (split) or the one fused weight.
    qkv: Vec<Lin<B>>,
    o: Lin<B>,
    q_norm: Option<Norm<B>>,
    k_norm: Option<Norm<B>>,
    mlp_in: Lin<B>,
    mlp_up: Option<Lin<B>>,
    down: Lin<B>,
    /// Index into [`DecoderNet::ropes`].
    rope: Option<usize>,
}

/// A loaded decoder.
pub(crate) struct DecoderNet<B: Backend> {
    cfg: DecoderConfig,
    embed_idx: usize,
    embed: Tensor<B, 2>,
    positions: Option<(usize, Tensor<B, 2>)>,
    token_types: Option<(usize, Tensor<B, 2>)>,
    embed_norm: Option<Norm<B>>,
    layers: Vec<DecLayer<B>>,
    final_norm: Option<Norm<B>>,
    head_dense: Option<Lin<B>>,
    head_norm: Option<Norm<B>>,
    lm_head: Lin<B>,
    /// Distinct RoPE tables: (inverse frequencies, position divisor).
    ropes: Vec<(Vec<f64>, f64)>,
}

/// A role's name for layer `i` under `root` (which replaces a leading `model.`).
pub(crate) fn name(template: &str, i: usize, root: &str) -> String {
    let n = template.replace("{i}", &i.to_string());
    match n.strip_prefix("model.") {
        Some(rest) if root != "model." => format!("{root}{rest}"),
        _ => n,
    }
}

/// One RoPE table per distinct RoPE of the model (Gemma 3 has two): the inverse
/// frequencies with the position divisor, and for each layer the index of its
/// table (None without rotary positions). Shared by the burn decoder and the
/// native engine.
pub(crate) type RopeTables = (Vec<(Vec<f64>, f64)>, Vec<Option<usize>>);

pub(crate) fn rope_tables(c: &DecoderConfig) -> RopeTables {
    let rotary_dim = match c.positions {
        Positions::Rotary { rotary_dim } => rotary_dim,
        Positions::Learned { .. } => 0,
    };
    let mut cfgs: Vec<&gradshard_core::model::RopeConfig> = vec![];
    let mut ropes = vec![];
    let per_layer = c
        .layer_kinds
        .iter()
        .map(|kind| match &kind.rope {
            Some(rc) if rotary_dim > 0 => Some(match cfgs.iter().position(|x| *x == rc) {
                Some(k) => k,
                None => {
                    cfgs.push(rc);
                    ropes.push(rope_freqs(rc, rotary_dim));
                    ropes.len() - 1
                }
            }),
            _ => None,
        })
        .collect();
    (ropes, per_layer)
}

/// Where a non-nested model's weights start.
pub(crate) fn default_root(c: &DecoderConfig) -> String {
    if c.nested {
        // transformers 5 layout of a Gemma 3 checkpoint
        "model.language_model.".into()
    } else {
        "model.".into()
    }
}

/// Rows of the fused/split attention weights: (name template, rows).
fn qkv_shapes(c: &DecoderConfig, r: &Roles) -> Vec<(&'static str, usize)> {
    let (h, kv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
    match c.qkv {
        QkvLayout::Split => vec![(r.qkv[0], h * d), (r.qkv[1], kv * d), (r.qkv[2], kv * d)],
        QkvLayout::Fused => vec![(r.qkv[0], (h + 2 * kv) * d)],
        QkvLayout::NeoxInterleaved => vec![(r.qkv[0], 3 * h * d)],
    }
}

/// Every tensor of a checkpoint of `c`, with its role, in load order.
pub(crate) fn spec(c: &DecoderConfig, root: &str) -> SpecBuilder {
    use ParamKind::*;
    let r = roles(c.arch);
    let mut s = SpecBuilder {
        entries: vec![],
        strip: None,
    };
    let (dm, hd, v, ff) = (c.hidden_size, c.head_dim, c.vocab_size, c.intermediate_size);
    let layer_norm = c.norm == NormKind::Layer;
    let norm = |s: &mut SpecBuilder, n: String, width: usize| {
        s.add(format!("{n}.weight"), vec![width], Vector);
        if layer_norm {
            s.add(format!("{n}.bias"), vec![width], Vector);
        }
    };
    let lin =
        |s: &mut SpecBuilder, n: String, out: usize, inp: usize, kind: ParamKind, bias: bool| {
            s.add(format!("{n}.weight"), vec![out, inp], kind);
            if bias {
                s.add(format!("{n}.bias"), vec![out], Vector);
            }
        };
    s.add(
        format!("{}.weight", name(r.embed, 0, root)),
        vec![v, dm],
        Embedding,
    );
    if let Positions::Learned { max, token_types } = c.positions {
        let pos = r.positions.expect("learned positions have a table");
        let types = r.token_types.expect("learned positions have token types");
        s.add(
            format!("{}.weight", name(pos, 0, root)),
            vec![max, dm],
            Embedding,
        );
        s.add(
            format!("{}.weight", name(types, 0, root)),
            vec![token_types, dm],
            Embedding,
        );
    }
    if c.embed_norm {
        norm(
            &mut s,
            name(r.embed_norm.expect("embed norm role"), 0, root),
            dm,
        );
    }
    let q_out = c.num_heads * hd;
    for i in 0..c.num_layers {
        // In forward order (the LLaMA family's historic checkpoint order).
        let slots = c.placement.slots();
        let slot_norm = |s: &mut SpecBuilder, slot: usize| {
            if slots[slot] {
                let n = r.norms[slot].expect("role table matches placement");
                norm(s, name(n, i, root), dm);
            }
        };
        slot_norm(&mut s, 0);
        for (n, rows) in qkv_shapes(c, &r) {
            lin(&mut s, name(n, i, root), rows, dm, Attn, c.qkv_bias);
        }
        if let (Some(qn), Some(kn)) = (r.q_norm, r.k_norm) {
            let (qw, kw) = match c.qk_norm {
                QkNorm::PerHead => (hd, hd),
                QkNorm::AllHeads => (q_out, c.num_kv_heads * hd),
                QkNorm::None => unreachable!("q/k norm roles without a q/k norm"),
            };
            norm(&mut s, name(qn, i, root), qw);
            norm(&mut s, name(kn, i, root), kw);
        }
        lin(&mut s, name(r.o, i, root), dm, q_out, Attn, c.o_bias);
        slot_norm(&mut s, 1);
        slot_norm(&mut s, 2);
        match c.mlp {
            MlpKind::Gated => {
                lin(&mut s, name(r.mlp_in, i, root), ff, dm, Mlp, c.mlp_bias);
                let up = r.mlp_up.expect("gated MLP has an up role");
                lin(&mut s, name(up, i, root), ff, dm, Mlp, c.mlp_bias);
            }
            MlpKind::GatedFused => {
                lin(&mut s, name(r.mlp_in, i, root), 2 * ff, dm, Mlp, c.mlp_bias)
            }
            MlpKind::Plain => lin(&mut s, name(r.mlp_in, i, root), ff, dm, Mlp, c.mlp_bias),
        }
        lin(&mut s, name(r.mlp_down, i, root), dm, ff, Mlp, c.mlp_bias);
        slot_norm(&mut s, 3);
    }
    if let Some(n) = r.final_norm {
        norm(&mut s, name(n, 0, root), dm);
    }
    if c.head == HeadKind::BertTransform {
        let dense = r.head_dense.expect("head transform role");
        lin(&mut s, name(dense, 0, root), dm, dm, Mlp, true);
        norm(
            &mut s,
            name(r.head_norm.expect("head norm role"), 0, root),
            dm,
        );
    }
    if !c.tie_word_embeddings {
        s.add(format!("{}.weight", r.lm_head), vec![v, dm], LmHead);
    }
    if let Some(b) = r.lm_head_bias.filter(|_| c.lm_head_bias) {
        s.add(b.to_string(), vec![v], Vector);
    }
    s
}

/// The spec of `c` against an open checkpoint (finding where a nested
/// model's weights start) and the stored names that are not weights.
pub(crate) fn spec_for_checkpoint(
    c: &DecoderConfig,
    ckpt: &Checkpoint,
) -> (SpecBuilder, Ignorable) {
    let r = roles(c.arch);
    let root = if c.nested {
        ["model.language_model.", "language_model.model.", "model."]
            .into_iter()
            .find(|root| {
                ckpt.shape(&format!("{}.weight", name(r.embed, 0, root)))
                    .is_some()
            })
            .unwrap_or("model.language_model.")
            .to_string()
    } else {
        "model.".to_string()
    };
    let tied = c.tie_word_embeddings;
    let nested = c.nested;
    let arch = c.arch;
    let lm_head = format!("{}.weight", r.lm_head);
    let ignorable: Ignorable = Box::new(move |n: &str| {
        let buffer = n.ends_with(".rotary_emb.inv_freq")
            || n.ends_with("embeddings.position_ids")
            || (arch == gradshard_core::model::Arch::GptNeox
                && (n.ends_with(".attention.bias") || n.ends_with(".attention.masked_bias")));
        let tied_copy = tied
            && (n == lm_head
                || (nested && n == "language_model.lm_head.weight")
                || (arch == gradshard_core::model::Arch::Bert
                    && n == "cls.predictions.decoder.bias"));
        // BERT checkpoints often carry a pooler (unused by the LM head); a
        // Gemma 3 checkpoint carries its vision tower.
        let other_model = (arch == gradshard_core::model::Arch::Bert
            && n.starts_with("bert.pooler."))
            || (nested
                && [
                    "vision_tower.",
                    "multi_modal_projector.",
                    "model.vision_tower.",
                    "model.multi_modal_projector.",
                ]
                .iter()
                .any(|p| n.starts_with(p)));
        buffer || tied_copy || other_model
    });
    (spec(c, &root), ignorable)
}

/// Load every weight of `c` (the spec in `ld` came from [`spec_for_checkpoint`]).
pub(crate) fn load<B: Backend>(ld: &Loader<'_, B>, c: &DecoderConfig) -> Result<DecoderNet<B>> {
    let r = roles(c.arch);
    // The root is whatever the spec used: find it from the embedding's stored name.
    let embed_name = ld
        .spec
        .iter()
        .find(|e| e.kind == ParamKind::Embedding)
        .map(|e| e.name.clone())
        .expect("a decoder has token embeddings");
    let tail = name(r.embed, 0, "model.");
    let root = match tail.strip_prefix("model.") {
        Some(rest) => embed_name
            .strip_suffix(&format!("{rest}.weight"))
            .unwrap_or("model.")
            .to_string(),
        None => "model.".to_string(),
    };
    let layer_norm = c.norm == NormKind::Layer;
    let norm = |n: String| -> Result<Norm<B>> {
        Ok(Norm {
            w: ld.w1(&format!("{n}.weight"))?,
            b: if layer_norm {
                Some(ld.w1(&format!("{n}.bias"))?)
            } else {
                None
            },
        })
    };
    let lin = |n: String, bias: bool| ld.lin(&n, bias, Layout::OutIn);
    let (embed_idx, embed) = ld.w2(&embed_name)?;
    let (positions, token_types) = match c.positions {
        Positions::Learned { .. } => (
            Some(ld.w2(&format!(
                "{}.weight",
                name(r.positions.expect("role"), 0, &root)
            ))?),
            Some(ld.w2(&format!(
                "{}.weight",
                name(r.token_types.expect("role"), 0, &root)
            ))?),
        ),
        Positions::Rotary { .. } => (None, None),
    };
    let embed_norm = match (c.embed_norm, r.embed_norm) {
        (true, Some(n)) => Some(norm(name(n, 0, &root))?),
        _ => None,
    };
    let (ropes, layer_rope) = rope_tables(c);
    let mut layers = Vec::with_capacity(c.num_layers);
    for (i, &rope) in layer_rope.iter().enumerate() {
        let mut norms: [Option<Norm<B>>; 4] = [None, None, None, None];
        for (slot, has) in c.placement.slots().iter().enumerate() {
            if *has {
                norms[slot] = Some(norm(name(r.norms[slot].expect("role"), i, &root))?);
            }
        }
        let qkv = qkv_shapes(c, &r)
            .into_iter()
            .map(|(n, _)| lin(name(n, i, &root), c.qkv_bias))
            .collect::<Result<Vec<_>>>()?;
        let (q_norm, k_norm) = match (c.qk_norm, r.q_norm, r.k_norm) {
            (QkNorm::None, _, _) => (None, None),
            (_, Some(q), Some(k)) => (
                Some(norm(name(q, i, &root))?),
                Some(norm(name(k, i, &root))?),
            ),
            _ => unreachable!("a q/k norm needs its roles"),
        };
        layers.push(DecLayer {
            norms,
            qkv,
            o: lin(name(r.o, i, &root), c.o_bias)?,
            q_norm,
            k_norm,
            mlp_in: lin(name(r.mlp_in, i, &root), c.mlp_bias)?,
            mlp_up: match (c.mlp, r.mlp_up) {
                (MlpKind::Gated, Some(up)) => Some(lin(name(up, i, &root), c.mlp_bias)?),
                _ => None,
            },
            down: lin(name(r.mlp_down, i, &root), c.mlp_bias)?,
            rope,
        });
    }
    let final_norm = match r.final_norm {
        Some(n) => Some(norm(name(n, 0, &root))?),
        None => None,
    };
    let (head_dense, head_norm) = match c.head {
        HeadKind::BertTransform => (
            Some(lin(name(r.head_dense.expect("role"), 0, &root), true)?),
            Some(norm(name(r.head_norm.expect("role"), 0, &root))?),
        ),
        HeadKind::Linear => (None, None),
    };
    let head_bias = match r.lm_head_bias.filter(|_| c.lm_head_bias) {
        Some(b) => Some(ld.w1(b)?),
        None => None,
    };
    let lm_head = if c.tie_word_embeddings {
        Lin {
            idx: embed_idx,
            w: embed.clone(),
            b: head_bias,
            layout: Layout::OutIn,
        }
    } else {
        let mut l = ld.lin(r.lm_head, false, Layout::OutIn)?;
        l.b = head_bias;
        l
    };
    Ok(DecoderNet {
        cfg: c.clone(),
        embed_idx,
        embed,
        positions,
        token_types,
        embed_norm,
        layers,
        final_norm,
        head_dense,
        head_norm,
        lm_head,
        ropes,
    })
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

/// `w` reshaped to broadcast over the last axis of a rank-`D` tensor.
fn bcast<A: AutodiffBackend, const D: usize>(w: &Tensor<Inner<A>, 1>) -> Tensor<A, D> {
    let mut shape = [1usize; D];
    shape[D - 1] = w.dims()[0];
    lift::<A, 1>(w).reshape(shape)
}

/// The configured norm over the last axis.
fn norm<A: AutodiffBackend, const D: usize>(
    c: &DecoderConfig,
    x: Tensor<A, D>,
    n: &Norm<Inner<A>>,
) -> Tensor<A, D> {
    let eps = c.norm_eps;
    match c.norm {
        NormKind::Rms | NormKind::RmsOffset => {
            let ms = x.clone().square().mean_dim(D - 1);
            let y = x * (ms + eps).sqrt().recip();
            let w = bcast::<A, D>(&n.w);
            if c.norm == NormKind::RmsOffset {
                y * (w + 1.0)
            } else {
                y * w
            }
        }
        NormKind::Layer => {
            let mean = x.clone().mean_dim(D - 1);
            let xc = x - mean;
            let var = xc.clone().square().mean_dim(D - 1); // biased, as torch
            let y = xc * (var + eps).sqrt().recip() * bcast::<A, D>(&n.w);
            match &n.b {
                Some(b) => y + bcast::<A, D>(b),
                None => y,
            }
        }
    }
}

fn opt_norm<A: AutodiffBackend, const D: usize>(
    c: &DecoderConfig,
    x: Tensor<A, D>,
    n: &Option<Norm<Inner<A>>>,
) -> Tensor<A, D> {
    match n {
        Some(n) => norm(c, x, n),
        None => x,
    }
}

/// c·tanh(x / c).
fn softcap<B: Backend, const D: usize>(x: Tensor<B, D>, cap: Option<f64>) -> Tensor<B, D> {
    match cap {
        Some(c) => (x / c).tanh() * c,
        None => x,
    }
}

/// cos and sin [1, 1, t, r] of one RoPE table (rotate-half layout).
fn rope_table<A: AutodiffBackend>(
    freqs: &(Vec<f64>, f64),
    t: usize,
    device: &A::Device,
) -> (Tensor<A, 4>, Tensor<A, 4>) {
    let (inv_freq, pos_scale) = freqs;
    let half = inv_freq.len();
    let r = 2 * half;
    let mut cos = vec![0f32; t * r];
    let mut sin = vec![0f32; t * r];
    for p in 0..t {
        for (i, f) in inv_freq.iter().enumerate() {
            let (s, co) = ((p as f64 / pos_scale) * f).sin_cos();
            for j in [i, i + half] {
                cos[p * r + j] = co as f32;
                sin[p * r + j] = s as f32;
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [1, 1, t, r]), device),
        Tensor::from_data(TensorData::new(sin, [1, 1, t, r]), device),
    )
}

/// RoPE on the first r values of each head (r = the table's width), the rest unchanged.
fn rope_partial<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let r = cos.dims()[3];
    if r == d {
        return rope(x, cos, sin);
    }
    let rot = rope(x.clone().narrow(3, 0, r), cos, sin);
    Tensor::cat(vec![rot, x.narrow(3, r, d - r)], 3)
}

/// Logits [b, t, V] for input ids [b, t].
pub(crate) fn forward<A: AutodiffBackend>(
    n: &DecoderNet<Inner<A>>,
    ids: Tensor<A, 2, Int>,
    ctx: &mut Ctx<'_, A>,
    device: &A::Device,
) -> Result<Tensor<A, 3>> {
    let c = &n.cfg;
    let [b, t] = ids.dims();
    let mut x = ctx.rows(n.embed_idx, &n.embed, &ids);
    if let Some(s) = c.embed_scale {
        // transformers rounds √D to the activation dtype (f32 here) first.
        x = x * (s as f32) as f64;
    }
    if let Positions::Learned { max, .. } = c.positions {
        if t > max {
            return Err(Error::InvalidArgument(format!(
                "sequence of {t} input positions exceeds {} max_position_embeddings = {max}",
                c.arch.as_str()
            )));
        }
        let pos: Tensor<A, 2, Int> = Tensor::<A, 1, Int>::arange(0..t as i64, device)
            .reshape([1, t])
            .repeat_dim(0, b);
        if let Some((idx, w)) = &n.positions {
            x = x + ctx.rows(*idx, w, &pos);
        }
        if let Some((idx, w)) = &n.token_types {
            let zeros = Tensor::<A, 2, Int>::zeros([b, t], device);
            x = x + ctx.rows(*idx, w, &zeros);
        }
    }
    x = opt_norm(c, x, &n.embed_norm);

    let tables: Vec<(Tensor<A, 4>, Tensor<A, 4>)> = n
        .ropes
        .iter()
        .map(|f| rope_table::<A>(f, t, device))
        .collect();
    let mut masks: Vec<(Option<usize>, Tensor<A, 4>)> = vec![];
    for (li, l) in n.layers.iter().enumerate() {
        let window = c.layer_kinds[li].sliding_window;
        let mask = match masks.iter().find(|(w, _)| *w == window) {
            Some((_, m)) => m.clone(),
            None => {
                let m = attn_mask::<A>(t, window, device);
                masks.push((window, m.clone()));
                m
            }
        };
        let rope = l.rope.map(|k| &tables[k]);
        let [n_ai, n_ao, n_mi, n_mo] = &l.norms;
        if c.placement == gradshard_core::model::NormPlacement::PostAdd {
            let a = attention(c, l, x.clone(), ctx, &mask, rope);
            x = opt_norm(c, x + a, n_ao);
            let m = mlp(c, l, x.clone(), ctx);
            x = opt_norm(c, x + m, n_mo);
        } else if c.parallel_residual {
            let a = opt_norm(
                c,
                attention(c, l, opt_norm(c, x.clone(), n_ai), ctx, &mask, rope),
                n_ao,
            );
            let m = opt_norm(c, mlp(c, l, opt_norm(c, x.clone(), n_mi), ctx), n_mo);
            x = x + a + m;
        } else {
            let a = attention(c, l, opt_norm(c, x.clone(), n_ai), ctx, &mask, rope);
            x = x + opt_norm(c, a, n_ao);
            let m = mlp(c, l, opt_norm(c, x.clone(), n_mi), ctx);
            x = x + opt_norm(c, m, n_mo);
        }
    }
    x = opt_norm(c, x, &n.final_norm);
    if let (Some(dense), Some(hn)) = (&n.head_dense, &n.head_norm) {
        x = norm(c, act(c.act, ctx.linear(x, dense)), hn);
    }
    Ok(softcap(ctx.linear(x, &n.lm_head), c.final_softcap))
}

/// The attention sublayer on its (normalised) input h [b, t, D].
fn attention<A: AutodiffBackend>(
    c: &DecoderConfig,
    l: &DecLayer<Inner<A>>,
    h: Tensor<A, 3>,
    ctx: &mut Ctx<'_, A>,
    mask: &Tensor<A, 4>,
    rope: Option<&(Tensor<A, 4>, Tensor<A, 4>)>,
) -> Tensor<A, 3> {
    let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let [b, t, _] = h.dims();
    let (q, k, v) = match c.qkv {
        QkvLayout::Split => (
            ctx.linear(h.clone(), &l.qkv[0]),
            ctx.linear(h.clone(), &l.qkv[1]),
            ctx.linear(h, &l.qkv[2]),
        ),
        QkvLayout::Fused => {
            let y = ctx.linear(h, &l.qkv[0]);
            (
                y.clone().narrow(2, 0, hq * d),
                y.clone().narrow(2, hq * d, hkv * d),
                y.narrow(2, (hq + hkv) * d, hkv * d),
            )
        }
        QkvLayout::NeoxInterleaved => {
            // [b, t, H, (q | k | v) of d each]
            let y = ctx.linear(h, &l.qkv[0]).reshape([b, t, hq, 3 * d]);
            let part = |j: usize| y.clone().narrow(3, j * d, d).reshape([b, t, hq * d]);
            (part(0), part(1), part(2))
        }
    };
    let (q, k) = match c.qk_norm {
        QkNorm::AllHeads => (opt_norm(c, q, &l.q_norm), opt_norm(c, k, &l.k_norm)),
        _ => (q, k),
    };
    let mut q = split_heads(q, hq, d);
    let mut k = split_heads(k, hkv, d);
    let v = split_heads(v, hkv, d);
    if c.qk_norm == QkNorm::PerHead {
        q = opt_norm(c, q, &l.q_norm);
        k = opt_norm(c, k, &l.k_norm);
    }
    if let Some((cos, sin)) = rope {
        q = rope_partial(q, cos, sin);
        k = rope_partial(k, cos, sin);
    }
    let k = repeat_kv(k, hq / hkv);
    let v = repeat_kv(v, hq / hkv);
    let scores = q.matmul(k.swap_dims(2, 3)) * c.attn_scale;
    let scores = add_mask(softcap(scores, c.attn_softcap), mask);
    let p = activation::softmax(scores, 3);
    let a = p.matmul(v).swap_dims(1, 2).reshape([b, t, hq * d]);
    ctx.linear(a, &l.o)
}

/// The MLP sublayer on its (normalised) input h [b, t, D].
fn mlp<A: AutodiffBackend>(
    c: &DecoderConfig,
    l: &DecLayer<Inner<A>>,
    h: Tensor<A, 3>,
    ctx: &mut Ctx<'_, A>,
) -> Tensor<A, 3> {
    let ff = c.intermediate_size;
    let inner = match (c.mlp, &l.mlp_up) {
        (MlpKind::Gated, Some(up)) => {
            let g = act(c.act, ctx.linear(h.clone(), &l.mlp_in));
            g * ctx.linear(h, up)
        }
        (MlpKind::GatedFused, _) => {
            let y = ctx.linear(h, &l.mlp_in);
            act(c.act, y.clone().narrow(2, 0, ff)) * y.narrow(2, ff, ff)
        }
        _ => act(c.act, ctx.linear(h, &l.mlp_in)),
    };
    ctx.linear(inner, &l.down)
}
