//! The native engine's backward pass: layer by layer from the loss, handing out
//! each tracked weight's per-sample gradient (or its factors δ and x) as soon as
//! its δ is known.

use super::*;

impl NativeEngine {
    /// Backward of [`NativeEngine::attention`]: from da (n × H·d) to dq, dk, dv.
    pub(super) fn attention_back(
        &self,
        pk: &Packed,
        s: &Saved,
        da: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = &self.c;
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw) = (hq * d, hkv * d);
        let group = hq / hkv;
        let scale = c.attn_scale as f32;
        let (p_offs, _) = self.p_offsets(pk);
        let mut dq = vec![0f32; pk.n * qw];
        let mut dk = vec![0f32; pk.n * kw];
        let mut dv = vec![0f32; pk.n * kw];
        let (dq_sh, dk_sh, dv_sh) = (
            Shared::new(&mut dq),
            Shared::new(&mut dk),
            Shared::new(&mut dv),
        );
        let tasks: Vec<(usize, usize)> = (0..pk.lens.len())
            .flat_map(|s| (0..hkv).map(move |g| (s, g)))
            .collect();
        tasks.par_iter().for_each(|&(si, g)| {
            let (t, off) = (pk.lens[si], pk.offs[si]);
            let mut ds = vec![0f32; t * t];
            let kg = &s.k[off * kw + g * d..];
            let vg = &s.v[off * kw + g * d..];
            // Task (s, g) alone writes sample s's rows, and within them the
            // columns of kv head g in dk and dv and of its query heads
            // g·group..(g+1)·group in dq: every view below is disjoint from
            // every other task's.
            let dk_g = dk_sh.view(off * kw + g * d, t, d, kw);
            let dv_g = dv_sh.view(off * kw + g * d, t, d, kw);
            for h in g * group..(g + 1) * group {
                let pb = &s.p[p_offs[si] + h * t * t..p_offs[si] + (h + 1) * t * t];
                let dah = Op {
                    data: &da[off * qw + h * d..],
                    rs: qw,
                    cs: 1,
                };
                // dP = da_h v_gᵀ
                mm(
                    t,
                    t,
                    d,
                    &mut ds,
                    t,
                    false,
                    dah,
                    Op {
                        data: vg,
                        rs: 1,
                        cs: kw,
                    },
                    1.0,
                    false,
                );
                // SAFETY: dv_g is this task's own view (see above).
                // dv_g += P_hᵀ da_h
                unsafe { mm_raw(t, d, t, dv_g, kw, true, tr(pb, t), dah, 1.0, false) };
                // dS = P ⊙ (dP − rowsum(P ⊙ dP))
                for i in 0..t {
                    let pr = &pb[i * t..(i + 1) * t];
                    let dr = &mut ds[i * t..(i + 1) * t];
                    let dot: f32 = pr[..=i].iter().zip(&dr[..=i]).map(|(p, g)| p * g).sum();
                    for (g, p) in dr.iter_mut().zip(pr) {
                        *g = p * (*g - dot);
                    }
                }
                let kop = Op {
                    data: kg,
                    rs: kw,
                    cs: 1,
                };
                let qop = Op {
                    data: &s.q[off * qw + h * d..],
                    rs: qw,
                    cs: 1,
                };
                let dq_h = dq_sh.view(off * qw + h * d, t, d, qw);
                // SAFETY: dq_h, dk_g are this task's own views (see above).
                // dq_h = scale · dS k_g ; dk_g += scale · dSᵀ q_h
                unsafe {
                    mm_raw(t, d, t, dq_h, qw, false, rm(&ds, t), kop, scale, false);
                    mm_raw(t, d, t, dk_g, kw, true, tr(&ds, t), qop, scale, false);
                }
            }
        });
        (dq, dk, dv)
    }

    /// Hands the gradient (or factors) of one tracked projection to `out`,
    /// per sample: δ (n × out) and x (n × in) of all packed rows.
    pub(super) fn emit(&self, pk: &Packed, lin: &Lin, delta: &[f32], x: &[f32], out: &mut Out<'_>) {
        if !self.tracked[lin.idx] {
            return;
        }
        let slot = self.tracked[..lin.idx].iter().filter(|&&t| t).count();
        let p = &self.params[lin.idx];
        for (si, (&off, &t)) in pk.offs.iter().zip(&pk.lens).enumerate() {
            let dr = &delta[off * lin.out..(off + t) * lin.out];
            let xr = &x[off * lin.inp..(off + t) * lin.inp];
            match out {
                Out::Grads(g) => {
                    let mut data = vec![0f32; lin.out * lin.inp];
                    // G = δᵀ x
                    mm(
                        lin.out,
                        lin.inp,
                        t,
                        &mut data,
                        lin.inp,
                        false,
                        tr(dr, lin.out),
                        rm(xr, lin.inp),
                        1.0,
                        true,
                    );
                    g[si][slot] = Some(TensorGrad {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        data,
                    });
                }
                Out::Factors(f) => {
                    f[si][slot] = Some(TensorFactors {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        n: t,
                        a: dr.to_vec(),
                        b: xr.to_vec(),
                    });
                }
            }
        }
    }

    /// Forward, loss and backward of one chunk; tracked results go to `out`.
    pub(super) fn run(&self, pk: &Packed, out: &mut Out<'_>) -> Vec<f64> {
        let c = &self.c;
        let (dm, n) = (c.hidden_size, pk.n);
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (h, saved) = self.forward(pk, true);
        let (losses, dh) = self.head(pk, &h, true);
        let mut dh = dh.expect("head returns the gradient when asked");
        for (li, (l, s)) in self.layers.iter().zip(&saved).enumerate().rev() {
            // MLP: h2 = h1 + down(silu(gate(xn2)) · up(xn2)); dh is d/dh2.
            self.emit(pk, &l.down, &dh, &s.m, out);
            let mut dm_ = vec![0f32; n * c.intermediate_size];
            l.down.backward(&dh, n, &mut dm_, false);
            let mut dgate = vec![0f32; dm_.len()];
            let mut dup = vec![0f32; dm_.len()];
            let blk = row_block(c.intermediate_size);
            dgate
                .par_chunks_mut(blk)
                .zip(dup.par_chunks_mut(blk))
                .zip(dm_.par_chunks(blk))
                .zip(s.gate.par_chunks(blk).zip(s.up.par_chunks(blk)))
                .for_each(|(((dg, du), dm), (g, u))| silu_mul_back(dm, g, u, dg, du));
            drop(dm_);
            self.emit(pk, &l.gate, &dgate, &s.xn2, out);
            self.emit(pk, &l.up, &dup, &s.xn2, out);
            let mut dxn2 = vec![0f32; n * dm];
            l.gate.backward(&dgate, n, &mut dxn2, false);
            l.up.backward(&dup, n, &mut dxn2, true);
            // dh1 = dh + norm backward
            let mut dh1 = dh;
            rms_norm_back(&dxn2, &s.h1, &s.r2, &l.n_mlp, &mut dh1);
            drop(dxn2);
            // Attention: h1 = h + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
            self.emit(pk, &l.o, &dh1, &s.a, out);
            let mut da = vec![0f32; n * hq * d];
            l.o.backward(&dh1, n, &mut da, false);
            let (mut dq, mut dk, dv) = self.attention_back(pk, s, &da);
            drop(da);
            if let Some(ri) = l.rope {
                rope_rows(&mut dq, hq, d, &pk.pos, &pk.tabs[ri], true);
                rope_rows(&mut dk, hkv, d, &pk.pos, &pk.tabs[ri], true);
            }
            self.emit(pk, &l.q, &dq, &s.xn1, out);
            self.emit(pk, &l.k, &dk, &s.xn1, out);
            self.emit(pk, &l.v, &dv, &s.xn1, out);
            if li == 0 {
                // Nothing below the first layer is tracked.
                break;
            }
            let mut dxn1 = vec![0f32; n * dm];
            l.q.backward(&dq, n, &mut dxn1, false);
            l.k.backward(&dk, n, &mut dxn1, true);
            l.v.backward(&dv, n, &mut dxn1, true);
            let mut dh0 = dh1;
            rms_norm_back(&dxn1, &s.h, &s.r1, &l.n_attn, &mut dh0);
            dh = dh0;
        }
        losses
    }
}
