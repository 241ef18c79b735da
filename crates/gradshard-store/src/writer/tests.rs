use super::*;
use crate::manifest::CodecSpec;
use gradshard_core::Block;

fn spec() -> StoreSpec {
    let cfg = serde_json::json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
        "num_attention_heads":4,"num_key_value_heads":2});
    StoreSpec {
        geometry: gradshard_core::ModelShape::geometry_of(&cfg).unwrap(),
        dtype: DType::F32,
        codec: CodecSpec::DEFAULT,
        blocks: Block::ALL.to_vec(),
        other_tensors: Vec::new(),
    }
}

/// Writes samples until the injected full disk stops the writer; returns its error.
fn write_until_full(dir: &Path, allowance: u64, workers: usize) -> String {
    let spec = spec();
    fault::set(dir, allowance);
    let opts = WriterOptions {
        workers,
        memory_budget: 1 << 20,
        ..Default::default()
    };
    let mut w = StoreWriter::open_or_create(dir, &spec, opts).unwrap();
    let order = w.order().clone();
    let mut err = None;
    'samples: for i in 0..200i64 {
        let meta = SampleMeta {
            task: TaskName::new("t").unwrap(),
            id: SampleId::Int(i),
            tokens: 3,
            loss_sum: 1.0,
        };
        let mut h = match w.begin_sample(meta) {
            Ok(h) => h,
            Err(e) => {
                err = Some(e);
                break;
            }
        };
        for f in 0..order.n_frames() {
            let n = order.frame_numel(f).unwrap();
            let v: Vec<f32> = (0..n).map(|k| ((k * 7 + f) as f32).sin()).collect();
            if let Err(e) = w.put_frame(&mut h, f, v) {
                err = Some(e);
                break 'samples;
            }
        }
        if let Err(e) = w.end_sample(h) {
            err = Some(e);
            break;
        }
    }
    let fin = w.finish();
    err.map(|e| e.to_string())
        .or_else(|| fin.err().map(|e| e.to_string()))
        .expect("the full disk stopped the writer")
}

#[test]
fn a_full_disk_is_reported_as_such_never_as_a_thread_exit() {
    for round in 0..12u64 {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        std::fs::create_dir_all(&store).unwrap();
        let store = store.canonicalize().unwrap();
        let msg = write_until_full(&store, 40_000 + round * 9_973, 1 + (round % 3) as usize);
        assert!(
            msg.contains("No space left on device") && msg.contains("shard-"),
            "round {round}: {msg}"
        );
        assert!(!msg.contains("thread exited"), "round {round}: {msg}");
        // What committed is intact.
        let rep = crate::verify(&store, &|_, _| {}).unwrap();
        assert!(rep.ok(), "round {round}: {:?}", rep.problems);
    }
}
