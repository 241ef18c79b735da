//! CPU vs CUDA parity. With `--features cuda` and a usable GPU, the loop and
//! batched gradients on CUDA must match the CPU ones; otherwise the test
//! prints a SKIPPED line to stderr (written directly, so the test harness does
//! not capture it) and passes.

mod common;

use std::io::Write;

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED cpu_vs_cuda_parity: {why}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cpu_vs_cuda_parity() {
    skip("built without the `cuda` feature (cargo test --features cuda)");
}

#[cfg(feature = "cuda")]
#[test]
fn cpu_vs_cuda_parity() {
    use common::*;
    use gradshard_models::{cuda_available, Device, GradModel, ParamSet};

    if !cuda_available(0) {
        skip("no usable CUDA device 0");
        return;
    }
    for model in MODELS {
        let cpu = GradModel::load(&model_dir(model), Device::Cpu, ParamSet::All2d).unwrap();
        let gpu = GradModel::load(&model_dir(model), Device::Cuda(0), ParamSet::All2d).unwrap();
        let mut worst = 0.0f64;
        for task in TASKS {
            let samples = token_samples(model, task);
            let gb = gpu.grads_batched(&samples).unwrap();
            for (s, b) in samples.iter().zip(&gb) {
                let c = cpu.grads_loop(s).unwrap();
                let g = gpu.grads_loop(s).unwrap();
                for other in [&g, b] {
                    assert_eq!(c.tokens, other.tokens);
                    let lr = (c.loss_sum - other.loss_sum).abs() / c.loss_sum;
                    assert!(
                        lr <= 1e-5,
                        "{model}/{task}/{}: loss {} vs {}",
                        s.id,
                        c.loss_sum,
                        other.loss_sum
                    );
                    for (x, y) in c.grads.iter().zip(&other.grads) {
                        assert_eq!(x.name, y.name);
                        let e = rel_err(&y.data, &x.data);
                        assert!(
                            e <= 1e-4,
                            "{model}/{task}/{}: {} cuda vs cpu rel err {e:e}",
                            s.id,
                            x.name
                        );
                        worst = worst.max(e);
                    }
                }
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "{model}: worst cuda-vs-cpu rel err {worst:e}"
        );
    }
}
