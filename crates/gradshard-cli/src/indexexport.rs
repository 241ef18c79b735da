//! `inspect --index-parquet`: the whole index as a Parquet table
//! (schema: schemas/store/index.arrow.json).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, Int32Builder, Int64Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema};
use gradshard_core::SampleId;
use gradshard_store::Store;
use parquet::arrow::ArrowWriter;

pub fn index_schema() -> Schema {
    let f = |n: &str, t: DataType, null: bool| Field::new(n, t, null);
    Schema::new(vec![
        f("task", DataType::Utf8, false),
        f("sample_id", DataType::Utf8, false),
        f("sample_id_kind", DataType::Utf8, false),
        f("tokens", DataType::Int64, false),
        f("frame", DataType::Int32, false),
        f("kind", DataType::Utf8, false),
        f("layer", DataType::Int32, true),
        f("block", DataType::Utf8, true),
        f("head", DataType::Int32, true),
        f("tensor", DataType::Utf8, true),
        f("row_start", DataType::Int32, true),
        f("row_end", DataType::Int32, true),
        f("shard", DataType::Int32, false),
        f("offset", DataType::Int64, false),
        f("length", DataType::Int64, false),
        f("raw_length", DataType::Int64, false),
        f("checksum", DataType::Utf8, false),
        f("frame_kind", DataType::Utf8, false),
        f("shared_factor", DataType::Int32, true),
    ])
}

/// Writes one row per frame of every sample, shared factors included
/// ([`Store::frame_rows`]); returns the row count.
pub fn write_index(store: &Store, path: &Path) -> Result<u64> {
    gradshard_store::guard::check_output("--index-parquet", path)?;
    let schema = Arc::new(index_schema());
    let tmp = path.with_extension("parquet.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = ArrowWriter::try_new(file, schema.clone(), None)?;
    let mut rows = 0u64;
    store.prefetch_tables();
    let records: Vec<_> = store.index().records().collect();
    for chunk in records.chunks(64) {
        let (mut task, mut sid, mut kind_id) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let (mut tokens, mut frame, mut kind) = (
            Int64Builder::new(),
            Int32Builder::new(),
            StringBuilder::new(),
        );
        let (mut layer, mut block, mut head) = (
            Int32Builder::new(),
            StringBuilder::new(),
            Int32Builder::new(),
        );
        let (mut tensor, mut r0, mut r1) = (
            StringBuilder::new(),
            Int32Builder::new(),
            Int32Builder::new(),
        );
        let (mut shard, mut off, mut len, mut raw) = (
            Int32Builder::new(),
            Int64Builder::new(),
            Int64Builder::new(),
            Int64Builder::new(),
        );
        let (mut sum, mut frame_kind, mut shared) = (
            StringBuilder::new(),
            StringBuilder::new(),
            Int32Builder::new(),
        );
        for r in chunk {
            for row in store.frame_rows(r)? {
                task.append_value(r.task.as_str());
                match &r.id {
                    SampleId::Int(v) => {
                        sid.append_value(v.to_string());
                        kind_id.append_value("int");
                    }
                    SampleId::Str(s) => {
                        sid.append_value(s);
                        kind_id.append_value("str");
                    }
                }
                tokens.append_value(r.tokens as i64);
                frame.append_value(row.frame as i32);
                kind.append_value(row.kind);
                layer.append_option(row.layer.map(|v| v as i32));
                block.append_option(row.block.map(|b| b.as_str()));
                head.append_option(row.head.map(|v| v as i32));
                tensor.append_option(row.tensor.as_deref());
                r0.append_option(row.rows.map(|(a, _)| a as i32));
                r1.append_option(row.rows.map(|(_, b)| b as i32));
                shard.append_value(row.shard as i32);
                off.append_value(row.entry.offset as i64);
                len.append_value(row.entry.frame_len as i64);
                raw.append_value(row.entry.raw_len as i64);
                sum.append_value(format!("{:016x}", row.entry.checksum));
                frame_kind.append_value(row.frame_kind.as_str());
                shared.append_option(row.shared_factor.map(|j| j as i32));
                rows += 1;
            }
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(task.finish()),
            Arc::new(sid.finish()),
            Arc::new(kind_id.finish()),
            Arc::new(tokens.finish()),
            Arc::new(frame.finish()),
            Arc::new(kind.finish()),
            Arc::new(layer.finish()),
            Arc::new(block.finish()),
            Arc::new(head.finish()),
            Arc::new(tensor.finish()),
            Arc::new(r0.finish()),
            Arc::new(r1.finish()),
            Arc::new(shard.finish()),
            Arc::new(off.finish()),
            Arc::new(len.finish()),
            Arc::new(raw.finish()),
            Arc::new(sum.finish()),
            Arc::new(frame_kind.finish()),
            Arc::new(shared.finish()),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
    }
    w.close()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(rows)
}
