//! Phase 5 outputs (written only when the run computed sample conflicts):
//! `conflicts.parquet`, `conflict_pairs.parquet`, `sample_conflicts.parquet` (schemas in
//! `schemas/`), and the `conflicts` section of `summary.json`.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int32Array, StringArray};
use arrow::datatypes::{DataType, Field};
use gradshard_core::Block;
use gradshard_score::{Conflicts, ScoreResult};
use serde_json::json;

use crate::tables::id_text;

/// Parquet tables of phase 5, written next to [`crate::TABLES`] when
/// `ScoreResult::conflicts` is present.
pub const CONFLICT_TABLES: &[&str] = &["conflicts", "conflict_pairs", "sample_conflicts"];

fn f(name: &str, t: DataType, nullable: bool) -> Field {
    Field::new(name, t, nullable)
}

/// The fields of a phase 5 table (None for any other name).
pub(crate) fn fields(table: &str) -> Option<Vec<Field>> {
    let s = |n: &str| f(n, DataType::Utf8, false);
    let sn = |n: &str| f(n, DataType::Utf8, true);
    let i = |n: &str| f(n, DataType::Int32, false);
    let inull = |n: &str| f(n, DataType::Int32, true);
    let d = |n: &str| f(n, DataType::Float64, false);
    let dn = |n: &str| f(n, DataType::Float64, true);
    Some(match table {
        "conflicts" => vec![
            s("granularity"),
            s("block"),
            i("layer"),
            inull("head"),
            sn("head_kind"),
            i("n_a"),
            i("n_b"),
            d("cross_mean"),
            d("within_a"),
            d("within_b"),
            d("delta"),
            d("frac_negative"),
            dn("ci_low"),
            dn("ci_high"),
            dn("p_value"),
            f("exact", DataType::Boolean, false),
            dn("q_value"),
        ],
        "conflict_pairs" => vec![
            s("granularity"),
            s("block"),
            i("layer"),
            inull("head"),
            sn("head_kind"),
            s("sample_a"),
            s("sample_a_kind"),
            s("sample_b"),
            s("sample_b_kind"),
            d("cosine"),
            i("rank"),
        ],
        "sample_conflicts" => vec![
            s("task"),
            s("sample"),
            s("sample_kind"),
            s("block"),
            i("layer"),
            d("mean_cosine"),
        ],
        _ => return None,
    })
}

fn head_kind(b: Block, head: Option<usize>) -> Option<&'static str> {
    head.map(|_| if b.is_kv() { "kv" } else { "query" })
}

fn strs<I: IntoIterator<Item = S>, S: AsRef<str>>(v: I) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v))
}
fn opt_strs<I: IntoIterator<Item = Option<&'static str>>>(v: I) -> ArrayRef {
    Arc::new(v.into_iter().collect::<StringArray>())
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
fn f64s(v: impl IntoIterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(v))
}
fn opt_f64s(v: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(v.into_iter().collect::<Float64Array>())
}

/// The columns of a phase 5 table (None for any other name, or a run without phase 5).
pub(crate) fn columns(result: &ScoreResult, table: &str) -> Option<Vec<ArrayRef>> {
    let c: &Conflicts = result.conflicts.as_ref()?;
    Some(match table {
        "conflicts" => {
            let r = &c.rows;
            vec![
                strs(r.iter().map(|x| x.granularity.as_str())),
                strs(r.iter().map(|x| x.block.as_str())),
                i32s(r.iter().map(|x| x.layer)),
                opt_i32s(r.iter().map(|x| x.head)),
                opt_strs(r.iter().map(|x| head_kind(x.block, x.head))),
                i32s(r.iter().map(|x| x.n_a)),
                i32s(r.iter().map(|x| x.n_b)),
                f64s(r.iter().map(|x| x.cross_mean)),
                f64s(r.iter().map(|x| x.within_a)),
                f64s(r.iter().map(|x| x.within_b)),
                f64s(r.iter().map(|x| x.delta)),
                f64s(r.iter().map(|x| x.frac_negative)),
                opt_f64s(r.iter().map(|x| x.ci_low)),
                opt_f64s(r.iter().map(|x| x.ci_high)),
                opt_f64s(r.iter().map(|x| x.p_value)),
                Arc::new(BooleanArray::from(
                    r.iter().map(|x| x.exact).collect::<Vec<bool>>(),
                )),
                opt_f64s(r.iter().map(|x| x.q_value)),
            ]
        }
        "conflict_pairs" => {
            let p = &c.pairs;
            let a: Vec<(String, &str)> = p.iter().map(|x| id_text(&x.sample_a)).collect();
            let b: Vec<(String, &str)> = p.iter().map(|x| id_text(&x.sample_b)).collect();
            vec![
                strs(p.iter().map(|x| x.granularity.as_str())),
                strs(p.iter().map(|x| x.block.as_str())),
                i32s(p.iter().map(|x| x.layer)),
                opt_i32s(p.iter().map(|x| x.head)),
                opt_strs(p.iter().map(|x| head_kind(x.block, x.head))),
                strs(a.iter().map(|x| x.0.as_str())),
                strs(a.iter().map(|x| x.1)),
                strs(b.iter().map(|x| x.0.as_str())),
                strs(b.iter().map(|x| x.1)),
                f64s(p.iter().map(|x| x.cosine)),
                i32s(p.iter().map(|x| x.rank)),
            ]
        }
        "sample_conflicts" => {
            let s = &c.samples;
            let ids: Vec<(String, &str)> = s.iter().map(|x| id_text(&x.sample)).collect();
            vec![
                strs(s.iter().map(|x| x.task.as_str())),
                strs(ids.iter().map(|x| x.0.as_str())),
                strs(ids.iter().map(|x| x.1)),
                strs(s.iter().map(|x| x.block.as_str())),
                i32s(s.iter().map(|x| x.layer)),
                f64s(s.iter().map(|x| x.mean_cosine)),
            ]
        }
        _ => return None,
    })
}

/// The `conflicts` section of `summary.json`: the most conflicted rows and the three
/// samples of each task with the lowest mean cosine to the other task.
pub(crate) fn summary(result: &ScoreResult) -> Option<serde_json::Value> {
    let c = result.conflicts.as_ref()?;
    let rows: Vec<serde_json::Value> = c
        .most_conflicted(5)
        .into_iter()
        .map(|r| {
            json!({"granularity": r.granularity, "block": r.block, "layer": r.layer,
                   "head": r.head, "cross_mean": r.cross_mean, "within_a": r.within_a,
                   "within_b": r.within_b, "delta": r.delta, "p_value": r.p_value,
                   "exact": r.exact, "q_value": r.q_value})
        })
        .collect();
    let samples = |task| -> Vec<serde_json::Value> {
        c.lowest_samples(task, 3)
            .into_iter()
            .map(|(id, m)| {
                let (text, kind) = id_text(&id);
                json!({"sample": text, "sample_kind": kind, "mean_cosine": m})
            })
            .collect()
    };
    let o = &result.options;
    Some(json!({
        "definition": "whitened per-sample cosines (u = g / sqrt(max(I_all, eps) + lam*), I_all the mean of g^2/T over every stored sample of both tasks); delta = (within_a + within_b)/2 - cross_mean; one-sided label-permutation p of delta; BH q per granularity",
        "rows": c.rows.len(),
        "significant_q_0_05": c.rows.iter().filter(|r| r.q_value.is_some_and(|q| q <= 0.05)).count(),
        "most_conflicted": rows,
        "lowest_mean_cosine": {
            o.task_a.as_str(): samples(&o.task_a),
            o.task_b.as_str(): samples(&o.task_b),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed `schemas/<table>.arrow.json` of every phase 5 table is the code's.
    #[test]
    fn committed_schemas_match_the_code() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        for table in CONFLICT_TABLES {
            let s = crate::schema::schema(table).expect("a phase 5 schema");
            let want = crate::schema::schema_json(table, &s);
            let p = dir.join(format!("{table}.arrow.json"));
            let got: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            assert_eq!(got, want, "{table}");
        }
    }
}
