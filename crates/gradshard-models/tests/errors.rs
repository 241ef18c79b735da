//! Broken inputs give clear errors that name the tensor / line.

mod common;

use std::path::Path;

use common::*;
use gradshard_models::{Device, Error, GradModel, ParamSet, ReaderOptions, SampleReader};
use safetensors::Dtype;

/// Write fixture `model`'s checkpoint into `dir` after `edit` changed its
/// tensor list (name, shape, f32 values).
fn copy_model(
    model: &str,
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) {
    let mut ts = read_checkpoint(model);
    edit(&mut ts);
    write_checkpoint(model, dir, &ts, Dtype::F32, 1);
}

fn load_err(dir: &Path) -> Error {
    match GradModel::load(dir, Device::Cpu, ParamSet::Attn) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.1.self_attn.k_proj.weight";
    copy_model("llama-gqa", tmp.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
        t.1 = vec![64, 32]; // transposed: 32x64 values reinterpreted
    });
    let e = load_err(tmp.path());
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(name), "{msg}");
    assert!(
        msg.contains("[64, 32]") && msg.contains("[32, 64]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "transformer.h.0.mlp.c_fc.bias";
    copy_model("gpt2", tmp.path(), |ts| ts.retain(|t| t.0 != name));
    let msg = load_err(tmp.path()).to_string();
    assert!(msg.contains("missing") && msg.contains(name), "{msg}");
}

#[test]
fn unexpected_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama-gqa", tmp.path(), |ts| {
        ts.push((
            "model.layers.0.self_attn.extra.weight".into(),
            vec![2, 2],
            vec![0.0; 4],
        ))
    });
    let msg = load_err(tmp.path()).to_string();
    assert!(
        msg.contains("unexpected") && msg.contains("model.layers.0.self_attn.extra.weight"),
        "{msg}"
    );
}

#[test]
fn unsupported_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama-gqa", tmp.path(), |_| {});
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"mamba\""),
    )
    .unwrap();
    let e = load_err(tmp.path());
    assert!(matches!(e, Error::UnsupportedModel { .. }), "{e:?}");
    assert!(e.to_string().contains("\"mamba\""), "{e}");
}

#[test]
fn unsupported_rope_scaling_is_clear() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama-gqa", tmp.path(), |_| {});
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace(
            "\"rope_type\": \"default\"",
            "\"rope_type\": \"yarn\", \"factor\": 4.0",
        ),
    )
    .unwrap();
    let msg = load_err(tmp.path()).to_string();
    assert!(msg.contains("unsupported") && msg.contains("yarn"), "{msg}");
}

#[test]
fn bad_jsonl_line_reports_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("task.jsonl");
    std::fs::write(
        &p,
        "{\"id\": 0, \"input_ids\": [1, 2, 3]}\n\n{\"id\": 1, \"input_ids\": [1, 2}\n",
    )
    .unwrap();
    let mut r = SampleReader::open(&p, None, ReaderOptions::default()).unwrap();
    assert!(r.next().unwrap().is_ok());
    let e = r.next().unwrap().unwrap_err();
    assert!(matches!(e, Error::Input { line: 3, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("task.jsonl:3"), "{msg}");
    assert!(r.next().is_none(), "reader stops after an error");
}

#[test]
fn reader_rules_ids_skips_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.jsonl");
    std::fs::write(
        &p,
        concat!(
            "{\"id\": \"a_1\", \"input_ids\": [1, 2, 3, 4]}\n",
            "{\"id\": 7, \"input_ids\": [5]}\n",
            "{\"input_ids\": [2, 3]}\n",
            "{\"id\": 9, \"text\": \"one two three\"}\n",
        ),
    )
    .unwrap();
    let tok_path = model_dir("llama-gqa").join("tokenizer.json");
    let tok = gradshard_models::load_tokenizer(&tok_path).unwrap();
    let mut r = SampleReader::open(
        &p,
        Some((tok, tok_path)),
        ReaderOptions {
            max_tokens: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    let got: Vec<_> = r.by_ref().map(|s| s.unwrap()).collect();
    use gradshard_models::SampleId::*;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].id, Str("a_1".into()));
    assert_eq!(got[0].ids, vec![1, 2, 3]);
    assert_eq!(got[1].id, Int(2), "missing id = 0-based line index");
    assert_eq!(got[2].id, Int(9));
    assert_eq!(got[2].ids, vec![2, 3, 4]);
    assert_eq!(r.skipped().len(), 1);
    assert_eq!(r.skipped()[0].id, Int(7));
    assert_eq!(r.skipped()[0].line, 2);
}

#[test]
fn duplicate_and_out_of_vocab_ids_are_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.jsonl");
    std::fs::write(
        &p,
        "{\"id\": 1, \"input_ids\": [1, 2]}\n{\"id\": 1, \"input_ids\": [1, 2]}\n",
    )
    .unwrap();
    let e = SampleReader::open(&p, None, ReaderOptions::default())
        .unwrap()
        .find_map(|r| r.err())
        .unwrap();
    assert!(
        e.to_string().contains("t.jsonl:2") && e.to_string().contains("duplicate"),
        "{e}"
    );
    std::fs::write(&p, "{\"id\": 1, \"input_ids\": [1, 64]}\n").unwrap();
    let opts = ReaderOptions {
        vocab_size: Some(64),
        ..Default::default()
    };
    let e = SampleReader::open(&p, None, opts)
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err();
    assert!(
        e.to_string().contains("t.jsonl:1") && e.to_string().contains("vocab_size"),
        "{e}"
    );
}
