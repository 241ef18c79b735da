//! Arrow schemas of the Parquet outputs, and their JSON form (`schemas/<table>.arrow.json`).
//!
//! JSON: `{"table": ..., "file": ..., "fields": [{"name", "type", "nullable"}]}` with
//! pyarrow's type names (`string`, `int32`, `int64`, `double`, `bool`), so the
//! Python check script compares `str(field.type)` directly.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Parquet tables written by [`write_outputs`](crate::write_outputs).
pub const TABLES: &[&str] = &[
    "heatmap",
    "top_pairs",
    "pairs",
    "diagnostics",
    "group_fisher",
    "masks",
    "overlap",
];

fn f(name: &str, t: DataType, nullable: bool) -> Field {
    Field::new(name, t, nullable)
}

fn s(name: &str) -> Field {
    f(name, DataType::Utf8, false)
}
fn i32f(name: &str) -> Field {
    f(name, DataType::Int32, false)
}
fn i64f(name: &str) -> Field {
    f(name, DataType::Int64, false)
}
fn f64f(name: &str) -> Field {
    f(name, DataType::Float64, false)
}
fn f64n(name: &str) -> Field {
    f(name, DataType::Float64, true)
}

/// The schema of one table.
pub fn schema(table: &str) -> Option<SchemaRef> {
    let fields = match table {
        "heatmap" => vec![
            s("block"),
            i32f("layer"),
            i32f("head"),
            i32f("kv_head"),
            f("kv_shared", DataType::Boolean, false),
            f64f("score_mean"),
            f64n("ci_low"),
            f64n("ci_high"),
            i64f("n_pairs"),
        ],
        "top_pairs" => vec![
            s("block"),
            i32f("rank"),
            i32f("layer"),
            i32f("head"),
            s("head_kind"),
            s("sample_a"),
            s("sample_a_kind"),
            s("sample_b"),
            s("sample_b_kind"),
            i64f("index_a"),
            i64f("index_b"),
            f64f("score"),
            f64n("p_value"),
            f64n("q_value"),
        ],
        "pairs" => vec![
            s("block"),
            i32f("layer"),
            i32f("head"),
            s("head_kind"),
            s("sample_a"),
            s("sample_a_kind"),
            s("sample_b"),
            s("sample_b_kind"),
            f64f("score"),
        ],
        "diagnostics" => vec![
            s("block"),
            i32f("layer"),
            i32f("head"),
            s("head_kind"),
            f64f("fisher_min"),
            f64f("fisher_median"),
            f64f("fisher_max"),
            f64f("frac_below_eps"),
            f64f("lam_applied"),
            i64f("n_a"),
            i64f("n_b"),
            i64f("n_fisher"),
            i32f("chunks"),
        ],
        "group_fisher" => vec![
            s("task"),
            s("kind"),
            f("block", DataType::Utf8, true),
            f("tensor", DataType::Utf8, true),
            f("layer", DataType::Int32, true),
            f("head", DataType::Int32, true),
            f("channel", DataType::Int32, true),
            i64f("numel"),
            f64f("fisher_sum"),
            f64f("fisher_mean"),
            f64f("importance"),
        ],
        "masks" => vec![
            s("task"),
            f64f("sparsity"),
            s("block"),
            i32f("layer"),
            i32f("head"),
            f("keep", DataType::Boolean, false),
        ],
        "overlap" => vec![
            s("level"),
            f64f("sparsity"),
            f("block", DataType::Utf8, true),
            f("layer", DataType::Int32, true),
            f("head", DataType::Int32, true),
            i64f("numel"),
            i64f("kept_a"),
            i64f("kept_b"),
            i64f("intersection"),
            i64f("union"),
            f64n("iou"),
            f64f("intersection_frac"),
            f64n("fisher_cosine"),
        ],
        other => return crate::conflict_tables::fields(other).map(|f| Arc::new(Schema::new(f))),
    };
    Some(Arc::new(Schema::new(fields)))
}

/// pyarrow's name of an Arrow type (the types used here).
pub fn type_name(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "string".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::Float64 => "double".into(),
        DataType::Boolean => "bool".into(),
        other => format!("{other}"),
    }
}

/// The JSON document of a schema.
pub fn schema_json(table: &str, schema: &Schema) -> Value {
    json!({
        "table": table,
        "file": format!("{table}.parquet"),
        "fields": schema.fields().iter().map(|f| json!({
            "name": f.name(),
            "type": type_name(f.data_type()),
            "nullable": f.is_nullable(),
        })).collect::<Vec<_>>(),
    })
}

/// Checks an Arrow schema (e.g. read back from a Parquet file) against a JSON
/// schema document: same field names in the same order, types and nullability.
pub fn check_against_json(table: &str, schema: &Schema, doc: &Value) -> Result<()> {
    let err = |message: String| Error::Schema {
        table: table.to_string(),
        message,
    };
    let fields = doc["fields"]
        .as_array()
        .ok_or_else(|| err("JSON has no `fields` array".into()))?;
    if fields.len() != schema.fields().len() {
        return Err(err(format!(
            "{} fields in the file, {} in the JSON schema",
            schema.fields().len(),
            fields.len()
        )));
    }
    for (got, want) in schema.fields().iter().zip(fields) {
        let name = want["name"].as_str().unwrap_or_default();
        let ty = want["type"].as_str().unwrap_or_default();
        let nullable = want["nullable"].as_bool();
        if got.name() != name
            || type_name(got.data_type()) != ty
            || Some(got.is_nullable()) != nullable
        {
            return Err(err(format!(
                "field `{}` {} nullable={} does not match JSON `{name}` {ty} nullable={nullable:?}",
                got.name(),
                type_name(got.data_type()),
                got.is_nullable()
            )));
        }
    }
    Ok(())
}
