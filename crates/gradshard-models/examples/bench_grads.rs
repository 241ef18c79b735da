//! Throughput of per-sample gradients: one backward per sample (loop) vs
//! several samples per backward (batched), on a random LLaMA-shaped model.
//!
//! ```text
//! cargo run --release -p gradshard-models --example bench_grads -- [--shape small|large]
//!     [--device cpu|cuda:N] [--samples N] [--seq L] [--batch B] [--params attn|attn,mlp|all-2d] [--reps R]
//! ```
//! `--device cuda:N` needs `--features cuda`. Prints samples/s for both modes.
//! Sample lengths vary in [L/2, L] so the batched mode pays for its padding.

use std::path::Path;
use std::time::Instant;

use gradshard_models::{Device, GradModel, ParamSet, SampleId, TokenSample};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

struct Shape {
    d: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ff: usize,
    vocab: usize,
}

/// xorshift64* in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 40; // 24 bits
        x as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn write_model(dir: &Path, s: &Shape) {
    let hd = s.d / s.heads;
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": s.d, "intermediate_size": s.ff,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "head_dim": hd, "vocab_size": s.vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![s.vocab, s.d]),
        ("model.norm.weight".into(), vec![s.d]),
        ("lm_head.weight".into(), vec![s.vocab, s.d]),
    ];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![s.d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![s.d]),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![s.heads * hd, s.d],
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![s.kv_heads * hd, s.d],
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![s.kv_heads * hd, s.d],
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![s.d, s.heads * hd],
            ),
            (format!("{p}.mlp.gate_proj.weight"), vec![s.ff, s.d]),
            (format!("{p}.mlp.up_proj.weight"), vec![s.ff, s.d]),
            (format!("{p}.mlp.down_proj.weight"), vec![s.d, s.ff]),
        ]);
    }
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let bytes: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            (0..n)
                .flat_map(|_| {
                    let v = if norm { 1.0 } else { 0.05 * rng.next() };
                    half::bf16::from_f32(v).to_bits().to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = shapes
        .iter()
        .zip(&bytes)
        .map(|((n, s), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn arg<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad value for {flag}")),
        None => default,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let shape_name: String = arg(&args, "--shape", "small".to_string());
    let device: Device = arg(&args, "--device", "cpu".to_string()).parse().unwrap();
    let params: ParamSet = arg(&args, "--params", "attn".to_string()).parse().unwrap();
    let (shape, def_seq, def_n, def_b) = match shape_name.as_str() {
        "small" => (
            Shape {
                d: 256,
                layers: 4,
                heads: 8,
                kv_heads: 4,
                ff: 688,
                vocab: 2048,
            },
            64,
            32,
            8,
        ),
        "large" => (
            Shape {
                d: 1024,
                layers: 8,
                heads: 16,
                kv_heads: 8,
                ff: 2816,
                vocab: 32000,
            },
            256,
            64,
            8,
        ),
        other => panic!("unknown --shape {other}"),
    };
    let seq: usize = arg(&args, "--seq", def_seq);
    let n: usize = arg(&args, "--samples", def_n);
    let batch: usize = arg(&args, "--batch", def_b);

    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &shape);
    let model = GradModel::load(dir.path(), device, params).unwrap();
    let tracked: usize = model
        .tracked_params()
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let mut rng = Rng(42);
    let samples: Vec<TokenSample> = (0..n)
        .map(|i| {
            let len = seq / 2 + ((rng.next() + 1.0) * 0.5 * (seq / 2) as f32) as usize;
            TokenSample {
                id: SampleId::Int(i as i64),
                ids: (0..len.clamp(2, seq))
                    .map(|_| ((rng.next() + 1.0) * 0.5 * (shape.vocab - 1) as f32) as u32)
                    .collect(),
                line: 0,
            }
        })
        .collect();
    let tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    println!(
        "shape {shape_name}: D={} L={} H={}/{} ff={} V={}, {n} samples, seq <= {seq} ({tokens} tokens), \
         params {params:?} ({:.1} M values/sample), device {device}",
        shape.d, shape.layers, shape.heads, shape.kv_heads, shape.ff, shape.vocab,
        tracked as f64 / 1e6
    );

    // Each mode runs `reps` passes over all samples; the first pass includes
    // one-time costs (CUDA kernel compilation for every new sequence length,
    // allocator growth), the last pass is reported as steady state.
    let reps: usize = arg(&args, "--reps", 2);
    // Checksums keep the work observable and let the two modes be compared.
    let mut sum_loop = 0.0f64;
    let mut sum_batch = 0.0f64;
    let (mut loop_s, mut batch_s) = (0.0, 0.0);
    for rep in 0..reps {
        let t0 = Instant::now();
        sum_loop = 0.0;
        for s in &samples {
            let g = model.grads_loop(s).unwrap();
            sum_loop += g.grads.iter().map(|t| t.data[0] as f64).sum::<f64>();
        }
        loop_s = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        sum_batch = 0.0;
        for chunk in samples.chunks(batch) {
            for g in model.grads_batched(chunk).unwrap() {
                sum_batch += g.grads.iter().map(|t| t.data[0] as f64).sum::<f64>();
            }
        }
        batch_s = t0.elapsed().as_secs_f64();
        if rep + 1 < reps {
            println!(
                "pass {}: loop {:.2} samples/s, batched/{batch} {:.2} samples/s (includes warm-up)",
                rep + 1,
                n as f64 / loop_s,
                n as f64 / batch_s
            );
        }
    }
    println!(
        "loop:      {:8.2} samples/s ({loop_s:.2} s)",
        n as f64 / loop_s
    );
    println!(
        "batched/{batch}: {:8.2} samples/s ({batch_s:.2} s), speedup {:.2}x",
        n as f64 / batch_s,
        loop_s / batch_s
    );
    println!("checksums: loop {sum_loop:.6e}, batched {sum_batch:.6e}");
}
