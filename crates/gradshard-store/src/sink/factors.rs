//! A sample given as factors: cut into per-frame P and shared S, summed from Gram
//! matrices, stored as factors or (past the break-even n) multiplied out.

use rayon::prelude::*;
use std::time::Instant;

use gradshard_core::{Axis, DType, SampleId, TaskName};

use super::{cut_cols, factored_values, full_values, same_bits, FactorSample, RepresentationChoice, SampleSink, Target};
use crate::error::{Error, Result};
use crate::{Representation, SampleMeta};

impl SampleSink {
    /// A sample from the model's factors: stored as factors, or (auto, past the
    /// break-even n) multiplied out and stored as full slices.
    /// Stores one sample from its factors (see [`Factors`]): as factors, or (`Auto`
    /// past the break-even n, or `Full`) multiplied out and stored as full slices.
    /// Returns and fails as [`Self::put`]; factors of the wrong size, or tensors that
    /// should share a factor but give different ones, are errors too.
    pub fn put_factors(&mut self, task: &TaskName, id: SampleId, f: FactorSample) -> Result<bool> {
        let t0 = Instant::now();
        for t in &f.factors {
            for (which, v) in [("output-side factor", &t.a), ("input-side factor", &t.b)] {
                let name = format!("{} ({which})", t.name);
                if !self.finite_or_skip(task, &id, &name, v)? {
                    return Ok(false);
                }
            }
        }
        let order = self.layout.order().clone();
        self.check_count(task, &id, f.factors.len())?;
        // Cut each frame's P; take each shared S from the first tensor that has it and
        // check every other tensor of the group gives the same values.
        let mut p_of: Vec<Option<(usize, Vec<f32>)>> = vec![None; order.n_frames()];
        let mut s_of: Vec<Option<(usize, Vec<f32>, String)>> = vec![None; order.n_shared()];
        for t in &f.factors {
            let target = self.target(task, &id, &t.name, &t.shape)?;
            let (rows, cols, n) = (t.shape[0], t.shape[1], t.n);
            if t.a.len() != n * rows || t.b.len() != n * cols {
                return Err(Error::SampleInput {
                    task: task.clone(),
                    id: id.clone(),
                    what: format!(
                        "tensor `{}`: factors of {} and {} values, expected {n} × {rows} and {n} × {cols}",
                        t.name,
                        t.a.len(),
                        t.b.len()
                    ),
                });
            }
            let mut frames: Vec<(usize, Vec<f32>, &[f32])> = Vec::new();
            match target {
                Target::Attn(at) => {
                    for b in &at.blocks {
                        for head in 0..self.geometry.heads_of(*b) {
                            let frame = order.attn(at.layer, *b, head).expect("all blocks stored");
                            let spec = self.geometry.slice_spec(at.layer, *b, head)?;
                            let (src_p, wp, src_s) = match spec.axis {
                                Axis::Rows => (&t.a, rows, &t.b[..]),
                                Axis::Cols => (&t.b, cols, &t.a[..]),
                            };
                            frames.push((
                                frame,
                                cut_cols(src_p, n, wp, spec.start, spec.len),
                                src_s,
                            ));
                        }
                    }
                }
                Target::Other(ti) => {
                    let o = &order.others()[ti];
                    for gi in 0..o.groups() {
                        let (a, b) = o.group_rows(gi);
                        let frame = order.other(ti, gi).expect("group in range");
                        frames.push((frame, cut_cols(&t.a, n, rows, a, b - a), &t.b[..]));
                    }
                }
            }
            // The frames of one tensor share its S: each shared factor is taken or
            // checked once per tensor, not once per head.
            let mut seen: Vec<usize> = Vec::new();
            for (frame, p, s) in frames {
                let (j, _, c) = order.factor_of(frame).expect("frame in range");
                p_of[frame] = Some((n, p));
                if seen.contains(&j) {
                    continue;
                }
                seen.push(j);
                match &s_of[j] {
                    None => s_of[j] = Some((n, s.to_vec(), t.name.clone())),
                    Some((sn, sv, from)) => {
                        if *sn != n || !same_bits(sv, s) {
                            return Err(Error::SampleInput {
                                task: task.clone(),
                                id: id.clone(),
                                what: format!(
                                    "tensors `{from}` and `{}` should share the {} ({n} × {c}) but their factors differ",
                                    t.name,
                                    order.describe_shared(j)
                                ),
                            });
                        }
                    }
                }
            }
        }
        let p_of: Vec<(usize, Vec<f32>)> = p_of
            .into_iter()
            .enumerate()
            .map(|(fr, p)| {
                p.ok_or_else(|| Error::SampleInput {
                    task: task.clone(),
                    id: id.clone(),
                    what: format!("the model gave no factor for {}", order.describe(fr)),
                })
            })
            .collect::<Result<_>>()?;
        let s_of: Vec<(usize, Vec<f32>, String)> = s_of
            .into_iter()
            .enumerate()
            .map(|(j, s)| {
                s.ok_or_else(|| Error::SampleInput {
                    task: task.clone(),
                    id: id.clone(),
                    what: format!("the model gave no {}", order.describe_shared(j)),
                })
            })
            .collect::<Result<_>>()?;
        let n_frame: Vec<usize> = p_of.iter().map(|p| p.0).collect();
        let n_shared: Vec<usize> = s_of.iter().map(|s| s.0).collect();
        let fv = factored_values(&order, &n_frame, &n_shared);
        let factored = match self.representation {
            RepresentationChoice::Factored => true,
            RepresentationChoice::Auto => fv < full_values(&order),
            RepresentationChoice::Full => false,
        };
        if !factored {
            drop((p_of, s_of));
            self.prepare += t0.elapsed();
            return self.put(task, id, f.into_grads());
        }
        let tokens = Self::tokens_u32(task, &id, f.tokens)?;
        // Round to the store's dtype now: the sums describe the factors as stored, and
        // the writer's own rounding of a rounded value changes nothing.
        let dtype = self.dtype;
        let round = |v: &mut Vec<f32>| {
            if dtype == DType::Bf16 {
                for x in v.iter_mut() {
                    *x = gradshard_core::bf16_bits_to_f32(gradshard_core::f32_to_bf16_bits(*x));
                }
            }
        };
        let mut p_of = p_of;
        let mut s_of = s_of;
        p_of.iter_mut().for_each(|p| round(&mut p.1));
        s_of.iter_mut().for_each(|s| round(&mut s.1));
        // The Gram matrices and the frames' squared sums are many small products:
        // computed in parallel, one product per task (gemm runs single-threaded
        // inside the pool), then added in frame order, as one by one.
        let shared: Vec<_> = s_of.iter().zip(order.shared()).collect();
        let grams: Vec<Vec<f64>> = shared
            .par_iter()
            .map(|((n, v, _), sf)| gradshard_core::factor::gram(v, *n, sf.cols))
            .collect();
        let layout = &self.layout;
        let terms: Vec<_> = p_of
            .par_iter()
            .enumerate()
            .map(|(frame, (n, p))| {
                let (j, _, _) = order.factor_of(frame).expect("frame in range");
                layout.factored_terms(frame, p, &s_of[j].1, *n, &grams[j])
            })
            .collect();
        let mut sums = vec![0f64; self.layout.len()];
        for t in &terms {
            t.add_to(&mut sums);
        }
        let mut h = None;
        if let Some(w) = self.w.as_mut() {
            let tb = Instant::now();
            let mut hh = w.begin_sample_as(
                SampleMeta {
                    task: task.clone(),
                    id: id.clone(),
                    tokens,
                    loss_sum: f.loss_sum,
                },
                Representation::Factored,
            )?;
            for (frame, (n, p)) in p_of.into_iter().enumerate() {
                w.put_factor(&mut hh, frame, n, p)?;
            }
            for (j, (n, s, _)) in s_of.into_iter().enumerate() {
                w.put_shared(&mut hh, j, n, s)?;
            }
            h = Some(hh);
            self.blocked += tb.elapsed();
        }
        self.commit_sample(task, &id, tokens, sums, h)?;
        self.factored_samples += 1;
        self.values_stored += fv;
        self.prepare += t0.elapsed();
        Ok(true)
    }
}
