//! The native engine's forward pass: samples packed into one row matrix, each
//! layer's products, causal (optionally sliding) attention per sample, and the
//! LM head with its loss over blocks of rows.

use super::*;

impl NativeEngine {
    pub(super) fn pack(&self, samples: &[TokenSample]) -> Result<Packed> {
        crate::grads::check_samples(samples, self.c.vocab_size)?;
        let mut p = Packed {
            lens: vec![],
            offs: vec![],
            n: 0,
            ids: vec![],
            labels: vec![],
            pos: vec![],
            tabs: vec![],
        };
        let mut t_max = 0;
        for s in samples {
            let t = s.ids.len() - 1;
            p.offs.push(p.n);
            p.lens.push(t);
            p.n += t;
            t_max = t_max.max(t);
            for i in 0..t {
                p.ids.push(s.ids[i] as usize);
                p.labels.push(s.ids[i + 1] as usize);
                p.pos.push(i);
            }
        }
        p.tabs = self.ropes.iter().map(|f| rope_tab(f, t_max)).collect();
        Ok(p)
    }

    /// Forward through the layers; returns the last residual stream and, when
    /// `save`, what the backward needs per layer.
    pub(super) fn forward(&self, pk: &Packed, save: bool) -> (Vec<f32>, Vec<Saved>) {
        let c = &self.c;
        let (d_model, n) = (c.hidden_size, pk.n);
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let mut h = vec![0f32; n * d_model];
        let es = c.embed_scale.map(|s| s as f32);
        h.par_chunks_mut(d_model)
            .zip(pk.ids.par_iter())
            .for_each(|(row, &id)| {
                row.copy_from_slice(&self.embed[id * d_model..(id + 1) * d_model]);
                if let Some(s) = es {
                    row.iter_mut().for_each(|v| *v *= s);
                }
            });
        let mut saved = Vec::with_capacity(if save { self.layers.len() } else { 0 });
        for l in &self.layers {
            let (xn1, r1) = rms_norm(&h, d_model, &l.n_attn, c.norm_eps);
            let mut q = l.q.forward(&xn1, n);
            let mut k = l.k.forward(&xn1, n);
            let v = l.v.forward(&xn1, n);
            if let Some(ri) = l.rope {
                rope_rows(&mut q, hq, d, &pk.pos, &pk.tabs[ri], false);
                rope_rows(&mut k, hkv, d, &pk.pos, &pk.tabs[ri], false);
            }
            let (a, p) = self.attention(pk, &q, &k, &v, l.window);
            let attn = l.o.forward(&a, n);
            let mut h1 = h.clone();
            h1.par_iter_mut().zip(&attn).for_each(|(x, y)| *x += y);
            drop(attn);
            let (xn2, r2) = rms_norm(&h1, d_model, &l.n_mlp, c.norm_eps);
            let gate = l.gate.forward(&xn2, n);
            let up = l.up.forward(&xn2, n);
            let mut m = vec![0f32; gate.len()];
            let blk = row_block(c.intermediate_size);
            m.par_chunks_mut(blk)
                .zip(gate.par_chunks(blk).zip(up.par_chunks(blk)))
                .for_each(|(m, (g, u))| silu_mul(g, u, m));
            let out = l.down.forward(&m, n);
            let mut h2 = h1.clone();
            h2.par_iter_mut().zip(&out).for_each(|(x, y)| *x += y);
            if save {
                saved.push(Saved {
                    h,
                    r1,
                    xn1,
                    q,
                    k,
                    v,
                    p,
                    a,
                    h1,
                    r2,
                    xn2,
                    gate,
                    up,
                    m,
                });
            }
            h = h2;
        }
        (h, saved)
    }

    /// Offsets of each sample's probability block (H · T² values each).
    pub(super) fn p_offsets(&self, pk: &Packed) -> (Vec<usize>, usize) {
        let hq = self.c.num_heads;
        let mut offs = Vec::with_capacity(pk.lens.len());
        let mut total = 0;
        for &t in &pk.lens {
            offs.push(total);
            total += hq * t * t;
        }
        (offs, total)
    }

    /// Causal (optionally windowed) softmax attention of every sample:
    /// returns a (n × H·d) and the probabilities.
    pub(super) fn attention(
        &self,
        pk: &Packed,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        window: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let c = &self.c;
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw) = (hq * d, hkv * d);
        let group = hq / hkv;
        let scale = c.attn_scale as f32;
        let (p_offs, p_total) = self.p_offsets(pk);
        let mut a = vec![0f32; pk.n * qw];
        let mut p = vec![0f32; p_total];
        let (a_sh, p_sh) = (Shared::new(&mut a), Shared::new(&mut p));
        let tasks: Vec<(usize, usize)> = (0..pk.lens.len())
            .flat_map(|s| (0..hq).map(move |h| (s, h)))
            .collect();
        tasks.par_iter().for_each(|&(s, h)| {
            let (t, off) = (pk.lens[s], pk.offs[s]);
            let g = h / group;
            let qh = &q[off * qw + h * d..];
            let kg = &k[off * kw + g * d..];
            let vg = &v[off * kw + g * d..];
            // SAFETY: task (s, h) is the only one to touch sample s's probability
            // block of head h.
            let pb = unsafe { p_sh.block(p_offs[s] + h * t * t, t * t) };
            // scores = scale · q_h k_gᵀ
            mm(
                t,
                t,
                d,
                pb,
                t,
                false,
                Op {
                    data: qh,
                    rs: qw,
                    cs: 1,
                },
                Op {
                    data: kg,
                    rs: 1,
                    cs: kw,
                },
                scale,
                false,
            );
            for i in 0..t {
                let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                let row = &mut pb[i * t..(i + 1) * t];
                let vis = &mut row[lo..=i];
                let (_, sum) = exp_shifted(vis);
                scale_row(vis, 1.0 / sum);
                row[..lo].fill(0.0);
                row[i + 1..].fill(0.0);
            }
            let dst = a_sh.view(off * qw + h * d, t, d, qw);
            // SAFETY: task (s, h) alone writes columns h·d..(h+1)·d of sample s's
            // rows of `a` (the view above).
            unsafe {
                mm_raw(
                    t,
                    d,
                    t,
                    dst,
                    qw,
                    false,
                    rm(pb, t),
                    Op {
                        data: vg,
                        rs: kw,
                        cs: 1,
                    },
                    1.0,
                    false,
                )
            };
        });
        (a, p)
    }

    /// Final norm, LM head and token-summed cross-entropy on blocks of rows.
    /// Returns the per-sample loss sums and, when `grad`, d loss / d h (n × D).
    pub(super) fn head(&self, pk: &Packed, h: &[f32], grad: bool) -> (Vec<f64>, Option<Vec<f32>>) {
        let c = &self.c;
        let (dm, vocab, n) = (c.hidden_size, c.vocab_size, pk.n);
        let w = self.lm_head.as_deref().unwrap_or(&self.embed);
        let (hf, rf) = rms_norm(h, dm, &self.final_norm, c.norm_eps);
        let mut dhf = if grad { vec![0f32; n * dm] } else { vec![] };
        let mut row_loss = vec![0f64; n];
        let block = (((1usize << 22) / vocab.max(1)).max(1)).min(n);
        let mut z = vec![0f32; block * vocab];
        let mut r0 = 0;
        while r0 < n {
            let rows = block.min(n - r0);
            let z = &mut z[..rows * vocab];
            mm(
                rows,
                vocab,
                dm,
                z,
                vocab,
                false,
                rm(&hf[r0 * dm..], dm),
                wt_op(w, self.lm_head_t.as_deref(), vocab, dm),
                1.0,
                true,
            );
            z.par_chunks_mut(vocab)
                .zip(row_loss[r0..r0 + rows].par_iter_mut())
                .zip(pk.labels[r0..r0 + rows].par_iter())
                .for_each(|((zr, loss), &label)| {
                    let picked = zr[label];
                    let (max, sum) = exp_shifted(zr);
                    let lse = sum.ln() + max;
                    *loss = (lse - picked) as f64;
                    if grad {
                        // d/dz (lse − z_label) = softmax − onehot
                        scale_row(zr, 1.0 / sum);
                        zr[label] -= 1.0;
                    }
                });
            if grad {
                mm(
                    rows,
                    dm,
                    vocab,
                    &mut dhf[r0 * dm..],
                    dm,
                    false,
                    rm(z, vocab),
                    rm(w, dm),
                    1.0,
                    true,
                );
            }
            r0 += rows;
        }
        let losses = pk
            .offs
            .iter()
            .zip(&pk.lens)
            .map(|(&o, &t)| row_loss[o..o + t].iter().sum())
            .collect();
        if !grad {
            return (losses, None);
        }
        let mut dh = vec![0f32; n * dm];
        rms_norm_back(&dhf, h, &rf, &self.final_norm, &mut dh);
        (losses, Some(dh))
    }
}
