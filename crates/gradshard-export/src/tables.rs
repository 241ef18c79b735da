//! ScoreResult → Arrow record batches, one per table of [`crate::schema::TABLES`].

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use gradshard_core::{Block, SampleId};
use gradshard_score::{MaskLevel, ScoreResult};

use crate::error::{Error, Result};
use crate::schema::schema;

/// Sample ids are stored as text plus a kind: `"int"` ids are canonical
/// decimal integers (parse back with `int()`), `"str"` ids are the exact string.
/// One text column keeps a single join key for both kinds; the kind column
/// keeps `3` and `"3"` apart.
pub fn id_text(id: &SampleId) -> (String, &'static str) {
    match id {
        SampleId::Int(v) => (v.to_string(), "int"),
        SampleId::Str(s) => (s.clone(), "str"),
    }
}

fn head_kind(b: Block) -> &'static str {
    if b.is_kv() {
        "kv"
    } else {
        "query"
    }
}

fn strs<I: IntoIterator<Item = S>, S: AsRef<str>>(v: I) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v))
}
fn opt_strs(v: Vec<Option<String>>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}
fn i32s(v: impl IntoIterator<Item = usize>) -> ArrayRef {
    Arc::new(Int32Array::from_iter_values(
        v.into_iter().map(|x| x as i32),
    ))
}
fn opt_i32s(v: impl IntoIterator<Item = Option<usize>>) -> ArrayRef {
    Arc::new(
        v.into_iter()
            .map(|x| x.map(|x| x as i32))
            .collect::<Int32Array>(),
    )
}
fn i64s(v: impl IntoIterator<Item = u64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(
        v.into_iter().map(|x| x as i64),
    ))
}
fn f64s(v: impl IntoIterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(v))
}
fn opt_f64s(v: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(v.into_iter().collect::<Float64Array>())
}
fn bools(v: impl IntoIterator<Item = bool>) -> ArrayRef {
    Arc::new(BooleanArray::from(v.into_iter().collect::<Vec<bool>>()))
}

/// Builds the record batch of `table`.
pub fn batch(result: &ScoreResult, table: &'static str) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = match table {
        "heatmap" => {
            let r = result.heatmap_rows();
            vec![
                strs(r.iter().map(|x| x.block.as_str())),
                i32s(r.iter().map(|x| x.layer)),
                i32s(r.iter().map(|x| x.head)),
                i32s(r.iter().map(|x| x.kv_head)),
                bools(r.iter().map(|x| x.kv_shared)),
                f64s(r.iter().map(|x| x.score_mean)),
                opt_f64s(r.iter().map(|x| x.ci_low)),
                opt_f64s(r.iter().map(|x| x.ci_high)),
                i64s(r.iter().map(|x| x.n_pairs)),
            ]
        }
        "top_pairs" => {
            let r = &result.top;
            let a: Vec<_> = r.iter().map(|x| id_text(&x.sample_a)).collect();
            let b: Vec<_> = r.iter().map(|x| id_text(&x.sample_b)).collect();
            vec![
                strs(r.iter().map(|x| x.block.as_str())),
                i32s(r.iter().map(|x| x.rank)),
                i32s(r.iter().map(|x| x.layer)),
                i32s(r.iter().map(|x| x.head)),
                strs(r.iter().map(|x| head_kind(x.block))),
                strs(a.iter().map(|x| &x.0)),
                strs(a.iter().map(|x| x.1)),
                strs(b.iter().map(|x| &x.0)),
                strs(b.iter().map(|x| x.1)),
                i64s(r.iter().map(|x| x.index_a as u64)),
                i64s(r.iter().map(|x| x.index_b as u64)),
                f64s(r.iter().map(|x| x.score)),
                opt_f64s(r.iter().map(|x| x.p_value)),
                opt_f64s(r.iter().map(|x| x.q_value)),
            ]
        }
        "pairs" => {
            let ids_a: Vec<_> = result.samples_a.iter().map(|s| id_text(&s.0)).collect();
            let ids_b: Vec<_> = result.samples_b.iter().map(|s| id_text(&s.0)).collect();
            let mut rows: Vec<(Block, usize, usize, usize, usize, f64)> = Vec::new();
            for p in &result.pairs {
                for i in 0..p.n_a {
                    for j in 0..p.n_b {
                        rows.push((p.block, p.layer, p.head, i, j, p.get(i, j)));
                    }
                }
            }
            vec![
                strs(rows.iter().map(|x| x.0.as_str())),
                i32s(rows.iter().map(|x| x.1)),
                i32s(rows.iter().map(|x| x.2)),
                strs(rows.iter().map(|x| head_kind(x.0))),
                strs(rows.iter().map(|x| &ids_a[x.3].0)),
                strs(rows.iter().map(|x| ids_a[x.3].1)),
                strs(rows.iter().map(|x| &ids_b[x.4].0)),
                strs(rows.iter().map(|x| ids_b[x.4].1)),
                f64s(rows.iter().map(|x| x.5)),
            ]
        }
        "diagnostics" => {
            let r = &result.diagnostics;
            vec![
                strs(r.iter().map(|x| x.block.as_str())),
                i32s(r.iter().map(|x| x.layer)),
                i32s(r.iter().map(|x| x.head)),
                strs(r.iter().map(|x| head_kind(x.block))),
                f64s(r.iter().map(|x| x.fisher_min)),
                f64s(r.iter().map(|x| x.fisher_median)),
                f64s(r.iter().map(|x| x.fisher_max)),
                f64s(r.iter().map(|x| x.frac_below_eps)),
                f64s(r.iter().map(|x| x.lam_applied)),
                i64s(r.iter().map(|x| x.n_a as u64)),
                i64s(r.iter().map(|x| x.n_b as u64)),
                i64s(r.iter().map(|x| x.n_fisher as u64)),
                i32s(r.iter().map(|x| x.chunks)),
            ]
        }
        "group_fisher" => {
            let r = &result.group_fisher;
            vec![
                strs(r.iter().map(|x| x.task.as_str())),
                strs(r.iter().map(|x| match x.kind {
                    gradshard_score::GroupKind::Attention => "attention",
                    gradshard_score::GroupKind::Mlp => "mlp",
                })),
                opt_strs(r.iter().map(|x| x.block.map(|b| b.to_string())).collect()),
                opt_strs(r.iter().map(|x| x.tensor.clone()).collect()),
                opt_i32s(r.iter().map(|x| x.layer)),
                opt_i32s(r.iter().map(|x| x.head)),
                opt_i32s(r.iter().map(|x| x.channel)),
                i64s(r.iter().map(|x| x.numel)),
                f64s(r.iter().map(|x| x.fisher_sum)),
                f64s(r.iter().map(|x| x.fisher_mean)),
                f64s(r.iter().map(|x| x.importance)),
            ]
        }
        "masks" => {
            let r = &result.masks;
            vec![
                strs(r.iter().map(|x| x.task.as_str())),
                f64s(r.iter().map(|x| x.sparsity)),
                strs(r.iter().map(|x| x.block.as_str())),
                i32s(r.iter().map(|x| x.layer)),
                i32s(r.iter().map(|x| x.head)),
                bools(r.iter().map(|x| x.keep)),
            ]
        }
        "overlap" => {
            let r = &result.overlap;
            vec![
                strs(r.iter().map(|x| match x.level {
                    MaskLevel::Group => "group",
                    MaskLevel::Element => "element",
                })),
                f64s(r.iter().map(|x| x.sparsity)),
                opt_strs(r.iter().map(|x| x.block.map(|b| b.to_string())).collect()),
                opt_i32s(r.iter().map(|x| x.layer)),
                opt_i32s(r.iter().map(|x| x.head)),
                i64s(r.iter().map(|x| x.numel)),
                i64s(r.iter().map(|x| x.kept_a)),
                i64s(r.iter().map(|x| x.kept_b)),
                i64s(r.iter().map(|x| x.intersection)),
                i64s(r.iter().map(|x| x.union)),
                opt_f64s(r.iter().map(|x| x.iou)),
                f64s(r.iter().map(|x| x.intersection_frac)),
                opt_f64s(r.iter().map(|x| x.fisher_cosine)),
            ]
        }
        other if crate::conflict_tables::fields(other).is_some() => {
            crate::conflict_tables::columns(result, other).ok_or_else(|| Error::Schema {
                table: other.to_string(),
                message: "the run computed no sample conflicts (score --conflicts)".into(),
            })?
        }
        other => {
            return Err(Error::Schema {
                table: other.to_string(),
                message: "unknown table".into(),
            })
        }
    };
    let schema = schema(table).expect("every table of TABLES and CONFLICT_TABLES has a schema");
    RecordBatch::try_new(schema, columns).map_err(|source| Error::Arrow { table, source })
}
