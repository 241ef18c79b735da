//! GPT-2 in burn: learned positions, LayerNorm, Conv1D weights in the
//! checkpoint's [in, out] layout, tied embeddings. Every other family runs on
//! the generic decoder (`decoder.rs`).

use burn::tensor::activation;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

use crate::error::Result;
use crate::layers::{
    act, add_mask, attn_mask, lift, split_heads, Ctx, Inner, Layout, Lin, Loader, Norm, ParamKind,
    SpecBuilder,
};
use gradshard_core::model::Gpt2Config;

pub(crate) struct Gpt2Layer<B: Backend> {
    ln1: Norm<B>,
    c_attn: Lin<B>,
    c_proj: Lin<B>,
    ln2: Norm<B>,
    c_fc: Lin<B>,
    mlp_proj: Lin<B>,
}

pub(crate) struct Gpt2Net<B: Backend> {
    pub(crate) cfg: Gpt2Config,
    wte_idx: usize,
    wte: Tensor<B, 2>,
    wpe_idx: usize,
    wpe: Tensor<B, 2>,
    layers: Vec<Gpt2Layer<B>>,
    ln_f: Norm<B>,
    lm_head: Lin<B>,
}

pub(crate) fn gpt2_spec(c: &Gpt2Config, legacy_names: bool) -> SpecBuilder {
    use ParamKind::*;
    let mut s = SpecBuilder {
        entries: vec![],
        strip: legacy_names.then_some(("transformer.", "")),
    };
    let (d, v, ff) = (c.n_embd, c.vocab_size, c.n_inner);
    s.add("transformer.wte.weight".into(), vec![v, d], Embedding);
    s.add(
        "transformer.wpe.weight".into(),
        vec![c.n_positions, d],
        Embedding,
    );
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        for ln in ["ln_1", "ln_2"] {
            s.add(format!("{p}.{ln}.weight"), vec![d], Vector);
            s.add(format!("{p}.{ln}.bias"), vec![d], Vector);
        }
        // Conv1D weights are stored [in, out].
        for (n, shape, kind) in [
            ("attn.c_attn", vec![d, 3 * d], Attn),
            ("attn.c_proj", vec![d, d], Attn),
            ("mlp.c_fc", vec![d, ff], Mlp),
            ("mlp.c_proj", vec![ff, d], Mlp),
        ] {
            let out = shape[1];
            s.add(format!("{p}.{n}.weight"), shape, kind);
            s.add(format!("{p}.{n}.bias"), vec![out], Vector);
        }
    }
    s.add("transformer.ln_f.weight".into(), vec![d], Vector);
    s.add("transformer.ln_f.bias".into(), vec![d], Vector);
    if !c.tie_word_embeddings {
        s.add("lm_head.weight".into(), vec![v, d], LmHead);
    }
    s
}

pub(crate) fn load_gpt2<B: Backend>(ld: &Loader<'_, B>, c: &Gpt2Config) -> Result<Gpt2Net<B>> {
    let (wte_idx, wte) = ld.w2("transformer.wte.weight")?;
    let (wpe_idx, wpe) = ld.w2("transformer.wpe.weight")?;
    let ln = |p: &str| -> Result<Norm<B>> {
        Ok(Norm {
            w: ld.w1(&format!("{p}.weight"))?,
            b: Some(ld.w1(&format!("{p}.bias"))?),
        })
    };
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        let conv = |n: &str| ld.lin(&format!("{p}.{n}"), true, Layout::InOut);
        layers.push(Gpt2Layer {
            ln1: ln(&format!("{p}.ln_1"))?,
            c_attn: conv("attn.c_attn")?,
            c_proj: conv("attn.c_proj")?,
            ln2: ln(&format!("{p}.ln_2"))?,
            c_fc: conv("mlp.c_fc")?,
            mlp_proj: conv("mlp.c_proj")?,
        });
    }
    let ln_f = ln("transformer.ln_f")?;
    let lm_head = if c.tie_word_embeddings {
        Lin {
            idx: wte_idx,
            w: wte.clone(),
            b: None,
            layout: Layout::OutIn,
        }
    } else {
        ld.lin("lm_head", false, Layout::OutIn)?
    };
    Ok(Gpt2Net {
        cfg: c.clone(),
        wte_idx,
        wte,
        wpe_idx,
        wpe,
        layers,
        ln_f,
        lm_head,
    })
}

fn layer_norm<B: AutodiffBackend>(x: Tensor<B, 3>, n: &Norm<Inner<B>>, eps: f64) -> Tensor<B, 3> {
    let d = x.dims()[2];
    let mean = x.clone().mean_dim(2);
    let xc = x - mean;
    let var = xc.clone().square().mean_dim(2); // biased variance, as torch
    let y = xc * (var + eps).sqrt().recip();
    let y = y * lift::<B, 1>(&n.w).reshape([1, 1, d]);
    match &n.b {
        Some(b) => y + lift::<B, 1>(b).reshape([1, 1, d]),
        None => y,
    }
}

/// Softmax attention over heads: q [b,h,t,d], k and v [b,h,t,d] → [b,t,h·d].
fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 3> {
    let [b, h, t, d] = q.dims();
    let scores = add_mask(q.matmul(k.swap_dims(2, 3)) * scale, mask);
    let p = activation::softmax(scores, 3);
    p.matmul(v).swap_dims(1, 2).reshape([b, t, h * d])
}

pub(crate) fn gpt2_forward<A: AutodiffBackend>(
    n: &Gpt2Net<Inner<A>>,
    ids: Tensor<A, 2, Int>,
    ctx: &mut Ctx<'_, A>,
    device: &A::Device,
) -> Tensor<A, 3> {
    let c = &n.cfg;
    let [b, t] = ids.dims();
    let (h, d) = (c.n_head, c.n_embd);
    let hd = d / h;
    let pos: Tensor<A, 2, Int> = Tensor::<A, 1, Int>::arange(0..t as i64, device)
        .reshape([1, t])
        .repeat_dim(0, b);
    let mask = attn_mask::<A>(t, None, device);
    let mut x = ctx.rows(n.wte_idx, &n.wte, &ids) + ctx.rows(n.wpe_idx, &n.wpe, &pos);
    for (li, l) in n.layers.iter().enumerate() {
        let xn = layer_norm(x.clone(), &l.ln1, c.layer_norm_epsilon);
        let qkv = ctx.linear(xn, &l.c_attn); // [b, t, 3D]: q | k | v
        let q = split_heads(qkv.clone().narrow(2, 0, d), h, hd);
        let k = split_heads(qkv.clone().narrow(2, d, d), h, hd);
        let v = split_heads(qkv.narrow(2, 2 * d, d), h, hd);
        let mut scale = 1.0;
        if c.scale_attn_weights {
            scale /= (hd as f64).sqrt();
        }
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (li + 1) as f64;
        }
        let a = attention(q, k, v, &mask, scale);
        x = x + ctx.linear(a, &l.c_proj);
        let xn = layer_norm(x.clone(), &l.ln2, c.layer_norm_epsilon);
        let m = act(c.act, ctx.linear(xn, &l.c_fc));
        x = x + ctx.linear(m, &l.mlp_proj);
    }
    let x = layer_norm(x, &n.ln_f, c.layer_norm_epsilon);
    ctx.linear(x, &n.lm_head)
}
