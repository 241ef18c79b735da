//! Factored per-sample gradients (G = AᵀB) from the batched tap path agree
//! with the one-sample-per-backward loop, under padding, for Linear, Conv1D,
//! embedding (Rows) and tied (Rows + Linear) weights.

mod common;

use common::*;
use gradshard_models::{
    Device, GradModel, ParamSet, SampleFactors, SampleGrads, SampleId, TensorFactors, TokenSample,
};

/// Uses of a weight in one forward pass: GPT-2's wte is the embedding and
/// the (tied) lm_head.
fn uses(model: &str, name: &str) -> usize {
    if model == "gpt2" && name == "transformer.wte.weight" {
        2
    } else {
        1
    }
}

/// Shapes, n and the factor lengths of every tensor, and every formed
/// gradient against the loop's within `tol` (normwise relative).
fn assert_factors_match(model: &str, f: &SampleFactors, l: &SampleGrads, tol: f64, what: &str) {
    assert_eq!(f.id, l.id, "{what}");
    assert_eq!(f.tokens, l.tokens, "{what}/{}: T", f.id);
    let lr = (f.loss_sum - l.loss_sum).abs() / l.loss_sum.abs();
    assert!(
        lr <= 1e-6,
        "{what}/{}: loss {} vs {}",
        f.id,
        f.loss_sum,
        l.loss_sum
    );
    assert_eq!(f.factors.len(), l.grads.len(), "{what}/{}", f.id);
    for (x, g) in f.factors.iter().zip(&l.grads) {
        assert_eq!(x.name, g.name, "{what}/{}", f.id);
        assert_eq!(x.shape, g.shape, "{what}/{}: {}", f.id, x.name);
        assert_eq!(
            x.n,
            uses(model, &x.name) * f.tokens,
            "{what}/{}: n of {}",
            f.id,
            x.name
        );
        assert_eq!(
            x.a.len(),
            x.n * x.shape[0],
            "{what}/{}: |A| of {}",
            f.id,
            x.name
        );
        assert_eq!(
            x.b.len(),
            x.n * x.shape[1],
            "{what}/{}: |B| of {}",
            f.id,
            x.name
        );
        let e = rel_err(&x.gradient(), &g.data);
        assert!(
            e <= tol,
            "{what}/{}: {} factors vs loop rel err {e:e}",
            f.id,
            x.name
        );
    }
}

fn check(model: &str, set: ParamSet) {
    let m = GradModel::load(&model_dir(model), Device::Cpu, set).unwrap();
    for task in TASKS {
        let samples = token_samples(model, task);
        let lens: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
        assert!(
            lens.iter().min() != lens.iter().max(),
            "fixture lengths should vary so padding is exercised"
        );
        let factors = m.factors(&samples).unwrap();
        assert_eq!(factors.len(), samples.len());
        for (f, s) in factors.iter().zip(&samples) {
            let l = m.grads_loop(s).unwrap();
            assert_factors_match(model, f, &l, 1e-5, &format!("{model}/{task}/{set:?}"));
        }
    }
}

#[test]
fn factors_match_loop_attn_mlp() {
    for model in MODELS {
        check(model, ParamSet::AttnMlp);
    }
}

#[test]
fn factors_match_loop_all_2d() {
    for model in MODELS {
        check(model, ParamSet::All2d);
    }
}

/// Embedding uses put one-hot rows of the looked-up ids in A: token ids for
/// wte (first T rows; the tied lm_head use follows), positions for wpe.
#[test]
fn embedding_factors_are_one_hot_of_the_ids() {
    let m = GradModel::load(&model_dir("gpt2"), Device::Cpu, ParamSet::All2d).unwrap();
    let samples = token_samples("gpt2", "math");
    for (f, s) in m.factors(&samples).unwrap().iter().zip(&samples) {
        let t = s.ids.len() - 1;
        for (name, expect) in [
            ("transformer.wte.weight", s.ids[..t].to_vec()),
            ("transformer.wpe.weight", (0..t as u32).collect()),
        ] {
            let x = f.factors.iter().find(|x| x.name == name).unwrap();
            let rows = x.shape[0];
            for (p, &id) in expect.iter().enumerate() {
                let row = &x.a[p * rows..(p + 1) * rows];
                assert_eq!(row[id as usize], 1.0, "{name} position {p}");
                assert_eq!(row.iter().sum::<f32>(), 1.0, "{name} position {p}");
            }
        }
    }
}

/// A long padded neighbour changes neither sample's factors, and padding
/// positions never enter them (n = T for each sample).
#[test]
fn padding_does_not_enter_factors() {
    let m = GradModel::load(&model_dir("llama-gqa"), Device::Cpu, ParamSet::All2d).unwrap();
    let short = TokenSample {
        id: SampleId::Str("short".into()),
        ids: vec![5, 9, 12],
        line: 0,
    };
    let long = TokenSample {
        id: SampleId::Str("long".into()),
        ids: (0..40).map(|i| (i * 7 % 60 + 2) as u32).collect(),
        line: 0,
    };
    let alone = m.factors(std::slice::from_ref(&short)).unwrap();
    let both = m.factors(&[short.clone(), long.clone()]).unwrap();
    assert_eq!(both[0].tokens, 2);
    assert_eq!(both[1].tokens, 39);
    for (a, b) in alone[0].factors.iter().zip(&both[0].factors) {
        assert_eq!(b.n, 2, "{}", b.name);
        assert!(rel_err(&b.a, &a.a) <= 1e-5, "{}: A", a.name);
        assert!(rel_err(&b.b, &a.b) <= 1e-5, "{}: B", a.name);
    }
    assert_factors_match(
        "llama-gqa",
        &both[0],
        &m.grads_loop(&short).unwrap(),
        1e-5,
        "short",
    );
    assert_factors_match(
        "llama-gqa",
        &both[1],
        &m.grads_loop(&long).unwrap(),
        1e-5,
        "long",
    );
}

/// Streaming mirrors for_each_grads: chunks of `batch`, every sample once in
/// order, into_grads equal to the batched gradients, errors stop the run.
#[test]
fn for_each_factors_streams_in_chunks() {
    let m = GradModel::load(&model_dir("gpt2"), Device::Cpu, ParamSet::All2d).unwrap();
    let samples = token_samples("gpt2", "general");
    let batched = m.grads_batched(&samples).unwrap();
    let mut got = Vec::new();
    let n = m
        .for_each_factors(samples.iter().cloned().map(Ok), 3, |f| {
            got.push(f.into_grads());
            Ok(())
        })
        .unwrap();
    assert_eq!(n, samples.len());
    assert_eq!(got.len(), samples.len());
    for (g, b) in got.iter().zip(&batched) {
        assert_eq!(g.id, b.id);
        assert_eq!(g.tokens, b.tokens);
        for (x, y) in g.grads.iter().zip(&b.grads) {
            assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
            assert!(rel_err(&x.data, &y.data) <= 1e-5, "{}/{}", g.id, x.name);
        }
    }

    assert!(m
        .for_each_factors(samples.iter().cloned().map(Ok), 0, |_| Ok(()))
        .is_err());
    let mut seen = 0;
    let err = m.for_each_factors(samples.iter().cloned().map(Ok), 2, |_| {
        seen += 1;
        if seen == 3 {
            Err(gradshard_models::Error::InvalidArgument("stop".into()))
        } else {
            Ok(())
        }
    });
    assert!(err.is_err());
    assert_eq!(seen, 3);
}

/// G = AᵀB against a naive triple loop (f64 accumulation), including
/// shapes that are not multiples of any kernel tile and n = 0.
#[test]
fn gradient_matches_naive_triple_loop() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for &(n, r, c) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (40, 64, 96),
        (130, 70, 257),
        (0, 4, 6),
    ] {
        let f = TensorFactors {
            name: format!("{n}x{r}x{c}"),
            shape: vec![r, c],
            n,
            a: (0..n * r).map(|_| next()).collect(),
            b: (0..n * c).map(|_| next()).collect(),
        };
        let g = f.gradient();
        assert_eq!(g.len(), r * c);
        let mut naive = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                let mut s = 0f64;
                for k in 0..n {
                    s += f.a[k * r + i] as f64 * f.b[k * c + j] as f64;
                }
                naive[i * c + j] = s as f32;
            }
        }
        if n == 0 {
            assert!(g.iter().all(|&v| v == 0.0));
        } else {
            let e = rel_err(&g, &naive);
            assert!(e <= 1e-6, "{}: rel err {e:e}", f.name);
        }
    }
}

#[test]
#[should_panic(expected = "A must be n × shape[0]")]
fn gradient_rejects_inconsistent_factors() {
    TensorFactors {
        name: "bad".into(),
        shape: vec![2, 3],
        n: 2,
        a: vec![0.0; 3],
        b: vec![0.0; 6],
    }
    .gradient();
}
