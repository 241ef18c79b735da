//! CPU vs CUDA parity: the loop and batched gradients on CUDA must match the CPU
//! ones. Ignored unless asked for (it needs an NVIDIA GPU): run it with
//! `cargo test -p gradshard-models --features cuda --test cuda_parity -- --ignored`.
//! Asked for without the feature or without a usable device, it fails.

mod common;

const RUN: &str = "needs a CUDA GPU: cargo test -p gradshard-models --features cuda --test cuda_parity -- --ignored";

#[cfg(not(feature = "cuda"))]
#[test]
#[ignore = "needs a CUDA GPU: cargo test -p gradshard-models --features cuda --test cuda_parity -- --ignored"]
fn cpu_vs_cuda_parity() {
    panic!("built without the `cuda` feature; {RUN}");
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test -p gradshard-models --features cuda --test cuda_parity -- --ignored"]
fn cpu_vs_cuda_parity() {
    use common::*;
    use gradshard_models::{cuda_available, Device, GradModel, ParamSet};

    assert!(cuda_available(0), "no usable CUDA device 0; {RUN}");
    // Tolerances. burn 0.21 / cubek-matmul 0.2 runs f32 matmuls on CUDA tensor
    // cores in TF32 (10-bit mantissa; `adjust_dtypes` in cubek-matmul), with
    // no switch to disable it. Measured on an H100 (fixtures, All2d): loss
    // 2.1e-4 and gradients 2.6e-3 relative to the CPU/f64 values, the same
    // for the loop and the batched path. The CPU path meets the fixtures'
    // 1e-4; on CUDA we enforce these looser bounds and print the measured
    // worst cases.
    const LOSS_TOL: f64 = 1e-3;
    const GRAD_TOL: f64 = 1e-2;
    let mut report = String::new();
    let mut failures = Vec::new();
    for model in MODELS {
        let cpu = GradModel::load(&model_dir(model), Device::Cpu, ParamSet::All2d).unwrap();
        let gpu = GradModel::load(&model_dir(model), Device::Cuda(0), ParamSet::All2d).unwrap();
        // worst (loss rel, grad rel) for: cuda loop vs cpu loop, cuda batched vs cpu loop,
        // cpu loop vs the f64 reference (attention+MLP tensors only).
        let mut worst = [[0.0f64; 2]; 3];
        for task in TASKS {
            let samples = token_samples(model, task);
            let gb = gpu.grads_batched(&samples).unwrap();
            for (s, b) in samples.iter().zip(&gb) {
                let c = cpu.grads_loop(s).unwrap();
                let g = gpu.grads_loop(s).unwrap();
                let r = ref_grads(model, task, &s.id);
                for (k, other) in [&g, b].into_iter().enumerate() {
                    assert_eq!(c.tokens, other.tokens);
                    let lr = (c.loss_sum - other.loss_sum).abs() / c.loss_sum;
                    worst[k][0] = worst[k][0].max(lr);
                    for (x, y) in c.grads.iter().zip(&other.grads) {
                        assert_eq!(x.name, y.name);
                        let e = rel_err(&y.data, &x.data);
                        worst[k][1] = worst[k][1].max(e);
                        if e > GRAD_TOL {
                            failures
                                .push(format!("{model}/{task}/{}: {} rel err {e:e}", s.id, x.name));
                        }
                    }
                    if lr > LOSS_TOL {
                        failures.push(format!("{model}/{task}/{}: loss rel err {lr:e}", s.id));
                    }
                }
                // the CUDA loop against the float64 reference, for scale
                worst[2][0] = worst[2][0].max((g.loss_sum - r.loss_sum).abs() / r.loss_sum);
                for t in &g.grads {
                    if let Some((_, v)) = r.tensors.get(&t.name) {
                        worst[2][1] = worst[2][1].max(rel_err(&t.data, v));
                    }
                }
            }
        }
        report += &format!(
            "{model}: worst rel err loss/grad: cuda-loop vs cpu {:.2e}/{:.2e}; cuda-batched vs cpu {:.2e}/{:.2e}; cuda-loop vs f64 reference {:.2e}/{:.2e}\n",
            worst[0][0], worst[0][1], worst[1][0], worst[1][1], worst[2][0], worst[2][1]
        );
    }
    let _ = write!(std::io::stderr(), "{report}");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
