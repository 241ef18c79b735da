//! `synth`: a seeded synthetic store for any geometry, with values shaped like real
//! gradients so that compression ratios and scoring costs mean something:
//! heavy-tailed (a Gaussian times a log-normal multiplier per element), signed,
//! with per-layer, per-head, per-row and per-sample scales.
//!
//! Every value is a pure function of (seed, task, sample, frame, element), so a
//! resumed run writes exactly the bytes an uninterrupted one would.

use gradshard_core::{Block, DType, Geometry, Layout, OtherTensor, SampleId, TaskName};

use crate::error::{Error, Result};
use crate::manifest::{CodecSpec, StoreSpec};
use crate::writer::{SampleMeta, StoreWriter, WriteReport, WriterOptions};

/// Named shapes for `synth --preset`: the model description's presets.
pub use gradshard_core::model::{Preset, PRESETS};

/// Looks up a preset: (geometry, intermediate size).
pub fn preset(name: &str) -> Result<(Geometry, usize)> {
    let shape = gradshard_core::model::preset_shape(name)?;
    let ff = shape
        .intermediate
        .ok_or_else(|| Error::Invalid(format!("preset `{name}` declares no MLP width")))?;
    Ok((shape.geometry()?, ff))
}

/// MLP tensors of a geometry (LLaMA-family SwiGLU or GPT-2 Conv1D) for `--mlp`.
pub fn mlp_tensors(g: &Geometry, intermediate: usize) -> Result<Vec<OtherTensor>> {
    let mut out = Vec::new();
    for l in 0..g.layers {
        match g.layout {
            Layout::SplitLinear if g.model_type != "bert" => {
                let p = format!("{}layers.{l}.mlp.", g.root);
                out.push(OtherTensor::new(
                    format!("{p}gate_proj.weight"),
                    [intermediate, g.hidden],
                    0,
                ));
                out.push(OtherTensor::new(
                    format!("{p}up_proj.weight"),
                    [intermediate, g.hidden],
                    0,
                ));
                out.push(OtherTensor::new(
                    format!("{p}down_proj.weight"),
                    [g.hidden, intermediate],
                    0,
                ));
            }
            Layout::Gpt2Conv1d => {
                let p = format!("{}h.{l}.mlp.", g.root);
                out.push(OtherTensor::new(
                    format!("{p}c_fc.weight"),
                    [g.hidden, intermediate],
                    1,
                ));
                out.push(OtherTensor::new(
                    format!("{p}c_proj.weight"),
                    [intermediate, g.hidden],
                    1,
                ));
            }
            _ => {
                return Err(Error::Invalid(format!(
                "synthetic MLP tensors are defined for LLaMA-family and GPT-2 geometries, not {}",
                g.model_type
            )))
            }
        }
    }
    Ok(out)
}

/// Settings of a synthetic store.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub geometry: Geometry,
    /// MLP intermediate size; `Some` stores MLP tensors too.
    pub mlp: Option<usize>,
    pub tasks: Vec<TaskName>,
    pub samples_per_task: usize,
    pub seed: u64,
    pub dtype: DType,
    pub codec: CodecSpec,
    pub writer: WriterOptions,
    /// 0: every frame is generated afresh. N > 0: attention frames are drawn from a pool of
    /// N pre-generated unit-scale frames (then scaled), so that benchmarks measure the
    /// writer rather than the random number generator. Values keep the same distribution.
    pub pool: usize,
}

impl SynthOptions {
    pub fn spec(&self) -> Result<StoreSpec> {
        Ok(StoreSpec {
            geometry: self.geometry.clone(),
            dtype: self.dtype,
            codec: self.codec,
            blocks: Block::ALL.to_vec(),
            other_tensors: match self.mlp {
                Some(i) => mlp_tensors(&self.geometry, i)?,
                None => Vec::new(),
            },
        })
    }

    /// Raw (decoded) bytes the store will hold.
    pub fn raw_bytes(&self) -> Result<u64> {
        let order = self.spec()?.frame_order();
        let per_sample: usize = (0..order.n_frames())
            .map(|f| order.frame_numel(f).unwrap_or(0))
            .sum();
        Ok(per_sample as u64
            * self.dtype.size() as u64
            * (self.samples_per_task * self.tasks.len()) as u64)
    }
}

/// SplitMix64: a bijective 64-bit mixer used to derive independent streams.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn key(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5EED_u64, |h, p| mix(h ^ p))
}

fn task_key(t: &TaskName) -> u64 {
    t.as_str().bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

/// Uniform in [0, 1) from the top 53 bits.
#[inline]
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Approximately standard normal from 64 random bits (sum of four 16-bit uniforms,
/// Irwin–Hall, rescaled to unit variance).
#[inline]
fn approx_normal(x: u64) -> f32 {
    let s = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
    // Mean 4 × 32767.5, variance 4 × (65536² − 1) / 12.
    ((s as f32) - 131_070.0) * (1.0 / 37_837.23)
}

/// Log-normal multipliers exp(σ·z) for σ = 1, at 256 evenly spaced normal quantiles.
fn lognormal_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        let p = (i as f64 + 0.5) / 256.0;
        *v = normal_quantile(p).exp() as f32;
    }
    t
}

/// Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9).
/// The published coefficients are kept digit for digit.
#[allow(clippy::excessive_precision)]
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let pl = 0.02425;
    if p < pl {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - pl {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// Fills one frame's values. `rows` × `cols` canonical layout; `scale` is the frame's scale.
fn fill_frame(out: &mut [f32], cols: usize, stream: u64, scale: f32, table: &[f32; 256]) {
    let mut s = stream;
    for (r, row) in out.chunks_mut(cols).enumerate() {
        // Per-row scale: log-normal with σ = 0.5.
        let row_scale = scale
            * (0.5 * normal_quantile(unit(mix(stream ^ ((r as u64) << 1))).clamp(1e-9, 1.0 - 1e-9)))
                .exp() as f32;
        let mut i = 0;
        while i < row.len() {
            s = mix(s);
            let idx = s;
            for k in 0..8 {
                if i >= row.len() {
                    break;
                }
                s = mix(s);
                let m = table[((idx >> (8 * k)) & 0xFF) as usize];
                row[i] = approx_normal(s) * m * row_scale;
                i += 1;
            }
        }
    }
}

fn sample_meta(seed: u64, task: &TaskName, i: usize) -> SampleMeta {
    let h = key(&[seed, task_key(task), i as u64, 0x7E57]);
    let tokens = 16 + (h % 497) as u32;
    SampleMeta {
        task: task.clone(),
        id: SampleId::Int(i as i64),
        tokens,
        loss_sum: tokens as f64 * (1.5 + unit(mix(h))),
    }
}

/// Writes (or resumes) a synthetic store. `progress(done, total)` after each sample.
pub fn synth(
    store: &std::path::Path,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WriteReport> {
    if opts.tasks.is_empty() || opts.samples_per_task == 0 {
        return Err(Error::Invalid(
            "synth needs at least one task and one sample".into(),
        ));
    }
    let spec = opts.spec()?;
    let mut wopts = opts.writer.clone();
    if wopts.source.is_null() {
        wopts.source = serde_json::json!({"kind": "synth", "seed": opts.seed, "samples_per_task": opts.samples_per_task});
    }
    let mut w = StoreWriter::open_or_create(store, &spec, wopts)?;
    let order = w.order().clone();
    let g = order.geometry().clone();
    let table = std::sync::Arc::new(lognormal_table());
    let total = (opts.tasks.len() * opts.samples_per_task) as u64;
    let pool: std::sync::Arc<Vec<Vec<f32>>> = std::sync::Arc::new(
        (0..opts.pool)
            .map(|k| {
                let mut v = vec![0f32; g.slice_numel()];
                fill_frame(
                    &mut v,
                    g.hidden,
                    key(&[opts.seed, 0x9001, k as u64]),
                    1.0,
                    &table,
                );
                v
            })
            .collect(),
    );
    let mut done = 0;
    for (ti, task) in opts.tasks.iter().enumerate() {
        for i in 0..opts.samples_per_task {
            done += 1;
            let meta = sample_meta(opts.seed, task, i);
            if w.is_committed(task, &meta.id) {
                progress(done, total);
                continue;
            }
            // Per-sample scale: log-normal, σ = 0.7; tasks differ slightly in level.
            let hs = key(&[opts.seed, task_key(task), i as u64]);
            let s_sample = (0.7 * normal_quantile(unit(hs).clamp(1e-9, 1.0 - 1e-9))).exp() as f32
                * (1.0 + 0.25 * ti as f32);
            let mut h = w.begin_sample(meta)?;
            for f in 0..order.n_frames() {
                let (cols, s_frame) = match order.key(f).expect("frame in range") {
                    gradshard_index::FrameKey::Attn { layer, block, head } => {
                        let kl = key(&[opts.seed, layer as u64]);
                        let kh = key(&[opts.seed, layer as u64, block as u64, head as u64]);
                        let s_layer =
                            (0.5 * normal_quantile(unit(kl).clamp(1e-9, 1.0 - 1e-9))).exp();
                        let s_head =
                            (0.8 * normal_quantile(unit(kh).clamp(1e-9, 1.0 - 1e-9))).exp();
                        (g.hidden, (1e-3 * s_layer * s_head) as f32)
                    }
                    gradshard_index::FrameKey::Other { tensor, .. } => {
                        let kt = key(&[opts.seed, 0xAB, tensor as u64]);
                        (
                            order.others()[tensor].shape[1],
                            (5e-4 * (0.5 * normal_quantile(unit(kt).clamp(1e-9, 1.0 - 1e-9))).exp())
                                as f32,
                        )
                    }
                };
                let stream = key(&[opts.seed, task_key(task), i as u64, f as u64]);
                let scale = s_frame * s_sample;
                let table = table.clone();
                let pool = pool.clone();
                let pooled = !pool.is_empty() && f < order.n_attn_frames();
                w.put_frame_with(&mut h, f, move |out| {
                    if pooled {
                        let src = &pool[(stream % pool.len() as u64) as usize];
                        for (o, v) in out.iter_mut().zip(src) {
                            *o = v * scale;
                        }
                    } else {
                        fill_frame(out, cols, stream, scale, &table)
                    }
                })?;
            }
            w.end_sample(h)?;
            progress(done, total);
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_approximations_are_sane() {
        let n = 200_000;
        let (mut m, mut v) = (0f64, 0f64);
        let mut s = 1u64;
        for _ in 0..n {
            s = mix(s);
            let z = approx_normal(s) as f64;
            m += z;
            v += z * z;
        }
        m /= n as f64;
        v = v / n as f64 - m * m;
        assert!(m.abs() < 0.01 && (v - 1.0).abs() < 0.02, "mean {m} var {v}");
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-5);
        assert!((normal_quantile(0.5)).abs() < 1e-12);
    }

    #[test]
    fn frames_are_deterministic_and_heavy_tailed() {
        let t = lognormal_table();
        let mut a = vec![0f32; 64 * 64];
        let mut b = vec![0f32; 64 * 64];
        fill_frame(&mut a, 64, 42, 1.0, &t);
        fill_frame(&mut b, 64, 42, 1.0, &t);
        assert_eq!(a, b);
        let n = a.len() as f64;
        let m2 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n;
        let m4 = a.iter().map(|x| (*x as f64).powi(4)).sum::<f64>() / n;
        assert!(
            m4 / (m2 * m2) > 5.0,
            "kurtosis {} not heavy-tailed",
            m4 / (m2 * m2)
        );
        assert!(a.iter().any(|x| *x < 0.0) && a.iter().any(|x| *x > 0.0));
    }
}
