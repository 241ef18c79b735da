//! `write_grads` (the `gradshard grads` command) reproduces the fixtures'
//! `grads/<task>/<id>.safetensors` layout and values.

mod common;

use common::*;
use gradshard_models::{write_grads, Device, GradsOptions, ParamSet, Progress};

fn run(model: &str, task: &str, batch: usize) {
    let out = tempfile::tempdir().unwrap();
    let mut opts = GradsOptions::new(model_dir(model), task_file(model, task), out.path());
    opts.params = ParamSet::AttnMlp;
    opts.batch = batch;
    opts.device = Device::Cpu;
    let mut events = Vec::new();
    let report = write_grads(&opts, &mut |p| events.push(p)).unwrap();
    assert_eq!(report.written, 8);
    assert_eq!(report.skipped, 0);
    assert!(matches!(events[0], Progress::Loaded { .. }));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Progress::Sample { .. }))
            .count(),
        8
    );
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = read_task(model, task)
        .iter()
        .map(|s| format!("{}.safetensors", s.id))
        .collect();
    want.sort();
    assert_eq!(
        names, want,
        "exactly one file per sample, no temp files left"
    );
    for s in read_task(model, task) {
        let f = format!("{}.safetensors", s.id);
        let ours = read_grads_file(&out.path().join(&f));
        let theirs = read_grads_file(&fixtures().join(model).join("grads").join(task).join(&f));
        assert_eq!(ours.tokens, theirs.tokens, "{f}");
        assert!(
            (ours.loss_sum - theirs.loss_sum).abs() / theirs.loss_sum <= 1e-5,
            "{f}"
        );
        assert_eq!(
            ours.tensors.keys().collect::<Vec<_>>(),
            theirs.tensors.keys().collect::<Vec<_>>(),
            "{f}"
        );
        for (name, (shape, vals)) in &ours.tensors {
            let (rshape, rvals) = &theirs.tensors[name];
            assert_eq!(shape, rshape, "{f} {name}");
            let e = rel_err(vals, rvals);
            assert!(e <= 1e-4, "{f} {name}: {e:e}");
        }
    }
}

#[test]
fn write_grads_matches_fixture_files_loop() {
    run("llama-gqa", "math", 1);
    run("gpt2", "general", 1);
}

#[test]
fn write_grads_matches_fixture_files_batched() {
    run("llama-gqa", "general", 4);
    run("gpt2", "math", 3);
}

#[test]
fn write_grads_counts_skips_and_uses_text() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    // text only (tokenized), a one-token sample (skipped), a string id.
    std::fs::write(
        &input,
        "{\"id\": \"x\", \"text\": \"one two three four\"}\n{\"id\": 5, \"text\": \"one\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let opts = GradsOptions::new(model_dir("llama-gqa"), &input, &out);
    let mut skipped = vec![];
    let r = write_grads(&opts, &mut |p| {
        if let Progress::Skipped { line, .. } = p {
            skipped.push(line)
        }
    })
    .unwrap();
    assert_eq!((r.written, r.skipped, r.tokens), (1, 1, 3));
    assert_eq!(skipped, vec![2]);
    let g = read_grads_file(&out.join("x.safetensors"));
    assert_eq!(g.tokens, 3);
    // default ParamSet::Attn: 4 projections x 2 layers
    assert_eq!(g.tensors.len(), 8);
}
