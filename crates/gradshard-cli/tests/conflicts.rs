//! `gradshard score --conflicts` (phase 5) against a float64 reference written from the
//! definition in docs/scoring.md: the fixture's per-sample f32 gradients are read from
//! their safetensors files, cut into head slices, whitened with the Fisher of every
//! stored sample of both tasks, and the cosines, statistics, exact permutation
//! p-values, BH q-values, top pairs and per-sample means recomputed here.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use arrow::array::{Array, BooleanArray, Float64Array, Int32Array, RecordBatch, StringArray};
use common::{fixtures, ok, p, run};

const EPS: f64 = 1e-10;
const LAM: f64 = 1e-8;

fn batches(path: &Path) -> Vec<RecordBatch> {
    let f = File::open(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// One table's rows as column name → values (numbers as f64, null as None).
#[derive(Debug, Clone, PartialEq)]
enum V {
    S(Option<String>),
    N(Option<f64>),
}

fn rows(path: &Path) -> Vec<HashMap<String, V>> {
    let mut out = Vec::new();
    for b in batches(path) {
        for r in 0..b.num_rows() {
            let mut row = HashMap::new();
            for (field, col) in b.schema().fields().iter().zip(b.columns()) {
                let null = col.is_null(r);
                let v = if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
                    V::S((!null).then(|| a.value(r).to_string()))
                } else if let Some(a) = col.as_any().downcast_ref::<Float64Array>() {
                    V::N((!null).then(|| a.value(r)))
                } else if let Some(a) = col.as_any().downcast_ref::<Int32Array>() {
                    V::N((!null).then(|| a.value(r) as f64))
                } else if let Some(a) = col.as_any().downcast_ref::<BooleanArray>() {
                    V::N((!null).then(|| a.value(r) as u8 as f64))
                } else {
                    panic!("column {} of {path:?}: unexpected type", field.name())
                };
                row.insert(field.name().clone(), v);
            }
            out.push(row);
        }
    }
    out
}

fn num(r: &HashMap<String, V>, k: &str) -> Option<f64> {
    match &r[k] {
        V::N(v) => *v,
        V::S(_) => panic!("{k} is text"),
    }
}
fn text(r: &HashMap<String, V>, k: &str) -> Option<String> {
    match &r[k] {
        V::S(v) => v.clone(),
        V::N(_) => panic!("{k} is a number"),
    }
}

/// The fixture's gradients: per task, per stored id (0..8), tensor name → (shape, f32).
type Grads = HashMap<String, Vec<HashMap<String, (Vec<usize>, Vec<f32>)>>>;

fn load(model: &str) -> (Grads, HashMap<String, Vec<f64>>) {
    let root = fixtures().join(model);
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("oracle.json")).unwrap()).unwrap();
    let mut grads = Grads::new();
    let mut tokens = HashMap::new();
    for t in ["math", "general"] {
        let mut v = Vec::new();
        let mut tk = Vec::new();
        for id in 0..8 {
            let bytes = std::fs::read(root.join(format!("grads/{t}/{id}.safetensors"))).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut m = HashMap::new();
            for (name, view) in st.tensors() {
                let vals: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                m.insert(name.to_string(), (view.shape().to_vec(), vals));
            }
            v.push(m);
            tk.push(oracle["tokens"][t][id.to_string()].as_f64().unwrap());
        }
        grads.insert(t.to_string(), v);
        tokens.insert(t.to_string(), tk);
    }
    (grads, tokens)
}

/// Head slice `h` of block `blk` at layer `l` of one sample of the LLaMA fixture
/// (d = 16; Q/K/V: rows of q/k/v_proj, O: columns of o_proj), flattened.
fn cut(s: &HashMap<String, (Vec<usize>, Vec<f32>)>, blk: &str, l: usize, h: usize) -> Vec<f64> {
    let d = 16;
    let proj = blk.to_lowercase();
    let (shape, v) = &s[&format!("model.layers.{l}.self_attn.{proj}_proj.weight")];
    let (rows, cols) = (shape[0], shape[1]);
    let mut out = Vec::new();
    if blk == "O" {
        for r in 0..rows {
            for c in h * d..(h + 1) * d {
                out.push(v[r * cols + c] as f64);
            }
        }
    } else {
        for r in h * d..(h + 1) * d {
            for c in 0..cols {
                out.push(v[r * cols + c] as f64);
            }
        }
    }
    out
}

fn cosines(g: &[f64], n: usize) -> Vec<f64> {
    let mut s = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let d = (g[i * n + i] * g[j * n + j]).sqrt();
            s[i * n + j] = if d > 0.0 { g[i * n + j] / d } else { 0.0 };
        }
    }
    s
}

/// (delta, within_a, within_b, cross) of a labelling.
fn delta(s: &[f64], n: usize, in_a: &[bool]) -> (f64, f64, f64, f64) {
    let (mut aa, mut bb, mut ab, mut na) = (0.0, 0.0, 0.0, 0);
    for i in 0..n {
        na += in_a[i] as usize;
        for j in i + 1..n {
            match (in_a[i], in_a[j]) {
                (true, true) => aa += s[i * n + j],
                (false, false) => bb += s[i * n + j],
                _ => ab += s[i * n + j],
            }
        }
    }
    let nb = n - na;
    let wa = aa / (na * (na - 1) / 2) as f64;
    let wb = bb / (nb * (nb - 1) / 2) as f64;
    let cr = ab / (na * nb) as f64;
    ((wa + wb) / 2.0 - cr, wa, wb, cr)
}

/// Exact one-sided permutation p of delta over every relabelling into sets of n_a.
fn exact_p(s: &[f64], n: usize, na: usize) -> f64 {
    let obs = delta(s, n, &(0..n).map(|i| i < na).collect::<Vec<_>>()).0;
    let tol = 1e-12 + 1e-9 * obs.abs();
    let (mut hits, mut total) = (0u64, 0u64);
    for mask in 0u32..(1 << n) {
        if mask.count_ones() as usize != na {
            continue;
        }
        let in_a: Vec<bool> = (0..n).map(|i| mask >> i & 1 == 1).collect();
        total += 1;
        hits += (delta(s, n, &in_a).0 >= obs - tol) as u64;
    }
    hits as f64 / total as f64
}

fn bh(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut idx: Vec<usize> = (0..m).collect();
    idx.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut q = vec![0.0; m];
    let mut run = 1.0f64;
    for r in (1..=m).rev() {
        run = run.min(p[idx[r - 1]] * m as f64 / r as f64).min(1.0);
        q[idx[r - 1]] = run;
    }
    q
}

/// One reference row: (granularity, block, layer, head, cosine matrix).
type Row = (String, String, usize, Option<usize>, Vec<f64>);

fn ingest(dir: &Path) -> std::path::PathBuf {
    let f = fixtures().join("llama-gqa");
    let store = dir.join("store");
    ok(&[
        "ingest",
        "--model",
        p(&f.join("model")),
        "--task",
        &format!("math={}", p(&f.join("grads/math"))),
        "--task",
        &format!("general={}", p(&f.join("grads/general"))),
        "--store",
        p(&store),
        "--dtype",
        "f32",
    ]);
    store
}

#[test]
fn conflicts_match_a_float64_reference_on_llama_gqa() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ingest(tmp.path());
    let out = tmp.path().join("scores");
    let (sel_a, sel_b) = ([0usize, 2, 5], [1usize, 3, 4, 7]);
    let list = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let stdout = ok(&[
        "score",
        "--store",
        p(&store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(&out),
        "--conflicts",
        "--samples-a",
        &list(&sel_a),
        "--samples-b",
        &list(&sel_b),
        "--n-perm",
        "100",
        "--n-boot",
        "20",
        "--top-k",
        "7",
        "--min-samples",
        "0",
    ]);
    assert!(stdout.contains("sample conflicts"), "{stdout}");
    assert!(
        stdout.contains("math samples most opposed to general"),
        "{stdout}"
    );

    // The reference. C(7, 3) = 35 ≤ 100: every p is exact.
    let (grads, tokens) = load("llama-gqa");
    let (na, nb) = (sel_a.len(), sel_b.len());
    let n = na + nb;
    let mut want: Vec<Row> = Vec::new();
    for blk in ["Q", "K", "V", "O"] {
        let heads = if blk == "K" || blk == "V" { 2 } else { 4 };
        for l in 0..2 {
            let mut gblock = vec![0.0; n * n];
            for h in 0..heads {
                let mut fisher: Vec<f64> = Vec::new();
                let mut count = 0.0;
                for t in ["math", "general"] {
                    for (id, s) in grads[t].iter().enumerate() {
                        let g = cut(s, blk, l, h);
                        fisher.resize(g.len(), 0.0);
                        for (f, v) in fisher.iter_mut().zip(&g) {
                            *f += v * v / tokens[t][id];
                        }
                        count += 1.0;
                    }
                }
                let den: Vec<f64> = fisher.iter().map(|f| (f / count).max(EPS) + LAM).collect();
                let u: Vec<Vec<f64>> = sel_a
                    .iter()
                    .map(|&i| ("math", i))
                    .chain(sel_b.iter().map(|&j| ("general", j)))
                    .map(|(t, i)| {
                        cut(&grads[t][i], blk, l, h)
                            .iter()
                            .zip(&den)
                            .map(|(g, d)| g / d.sqrt())
                            .collect()
                    })
                    .collect();
                let mut gram = vec![0.0; n * n];
                for i in 0..n {
                    for j in 0..n {
                        gram[i * n + j] = u[i].iter().zip(&u[j]).map(|(x, y)| x * y).sum();
                    }
                }
                for (b, g) in gblock.iter_mut().zip(&gram) {
                    *b += g;
                }
                want.push(("head".into(), blk.into(), l, Some(h), cosines(&gram, n)));
            }
            want.push(("block".into(), blk.into(), l, None, cosines(&gblock, n)));
        }
    }
    let ps: Vec<f64> = want.iter().map(|w| exact_p(&w.4, n, na)).collect();
    let mut qs = vec![0.0; want.len()];
    for gran in ["head", "block"] {
        let idx: Vec<usize> = (0..want.len()).filter(|&i| want[i].0 == gran).collect();
        let q = bh(&idx.iter().map(|&i| ps[i]).collect::<Vec<_>>());
        for (i, q) in idx.into_iter().zip(q) {
            qs[i] = q;
        }
    }

    let got = rows(&out.join("conflicts.parquet"));
    assert_eq!(got.len(), want.len());
    let labels: Vec<bool> = (0..n).map(|i| i < na).collect();
    for (w, (p_want, q_want)) in want.iter().zip(ps.iter().zip(&qs)) {
        let r = got
            .iter()
            .find(|r| {
                text(r, "granularity").as_deref() == Some(&w.0)
                    && text(r, "block").as_deref() == Some(&w.1)
                    && num(r, "layer") == Some(w.2 as f64)
                    && num(r, "head") == w.3.map(|h| h as f64)
            })
            .unwrap_or_else(|| panic!("no row {:?}", (&w.0, &w.1, w.2, w.3)));
        let s = &w.4;
        let (d, wa, wb, cr) = delta(s, n, &labels);
        let neg = (0..na)
            .flat_map(|i| (na..n).map(move |j| (i, j)))
            .filter(|&(i, j)| s[i * n + j] < 0.0)
            .count() as f64
            / (na * nb) as f64;
        let key = (&w.0, &w.1, w.2, w.3);
        for (c, v) in [
            ("cross_mean", cr),
            ("within_a", wa),
            ("within_b", wb),
            ("delta", d),
            ("frac_negative", neg),
        ] {
            let g = num(r, c).unwrap();
            assert!((g - v).abs() <= 1e-6, "{key:?} {c}: {g} vs {v}");
        }
        assert_eq!(num(r, "n_a"), Some(na as f64));
        assert_eq!(num(r, "n_b"), Some(nb as f64));
        assert_eq!(num(r, "exact"), Some(1.0), "{key:?}");
        let pv = num(r, "p_value").unwrap();
        assert!((pv - p_want).abs() <= 1e-12, "{key:?} p {pv} vs {p_want}");
        let qv = num(r, "q_value").unwrap();
        assert!((qv - q_want).abs() <= 1e-12, "{key:?} q {qv} vs {q_want}");
        let (lo, hi) = (num(r, "ci_low").unwrap(), num(r, "ci_high").unwrap());
        assert!(lo <= hi, "{key:?}");
        assert_eq!(text(r, "head_kind").is_some(), w.3.is_some());
    }

    // Pairs: per (granularity, block) the 7 most negative cross cosines, each pair named
    // with its own cosine.
    let pairs = rows(&out.join("conflict_pairs.parquet"));
    for gran in ["head", "block"] {
        for blk in ["Q", "K", "V", "O"] {
            let mut all: Vec<f64> = want
                .iter()
                .filter(|w| w.0 == gran && w.1 == blk)
                .flat_map(|w| (0..na).flat_map(move |i| (na..n).map(move |j| w.4[i * n + j])))
                .collect();
            all.sort_by(f64::total_cmp);
            let mut got: Vec<&HashMap<String, V>> = pairs
                .iter()
                .filter(|r| {
                    text(r, "granularity").as_deref() == Some(gran)
                        && text(r, "block").as_deref() == Some(blk)
                })
                .collect();
            got.sort_by(|a, b| num(a, "rank").unwrap().total_cmp(&num(b, "rank").unwrap()));
            assert_eq!(got.len(), 7, "{gran} {blk}");
            for (k, r) in got.iter().enumerate() {
                assert_eq!(num(r, "rank"), Some(k as f64 + 1.0));
                let c = num(r, "cosine").unwrap();
                assert!(
                    (c - all[k]).abs() <= 1e-6,
                    "{gran} {blk} rank {k}: {c} vs {}",
                    all[k]
                );
                let ia: usize = text(r, "sample_a").unwrap().parse().unwrap();
                let ib: usize = text(r, "sample_b").unwrap().parse().unwrap();
                let (i, j) = (
                    sel_a.iter().position(|&x| x == ia).unwrap(),
                    na + sel_b.iter().position(|&x| x == ib).unwrap(),
                );
                let layer = num(r, "layer").unwrap() as usize;
                let head = num(r, "head").map(|h| h as usize);
                let w = want
                    .iter()
                    .find(|w| w.0 == gran && w.1 == blk && w.2 == layer && w.3 == head)
                    .unwrap();
                assert!((w.4[i * n + j] - c).abs() <= 1e-6, "named pair's cosine");
            }
        }
    }

    // Each sample's mean cosine to the other task at block granularity.
    let samples = rows(&out.join("sample_conflicts.parquet"));
    assert_eq!(samples.len(), n * 4 * 2);
    for w in want.iter().filter(|w| w.0 == "block") {
        for q in 0..n {
            let (t, id, mean) = if q < na {
                let m = (na..n).map(|j| w.4[q * n + j]).sum::<f64>() / nb as f64;
                ("math", sel_a[q], m)
            } else {
                let m = (0..na).map(|i| w.4[i * n + q]).sum::<f64>() / na as f64;
                ("general", sel_b[q - na], m)
            };
            let r = samples
                .iter()
                .find(|r| {
                    text(r, "task").as_deref() == Some(t)
                        && text(r, "sample") == Some(id.to_string())
                        && text(r, "block").as_deref() == Some(&w.1)
                        && num(r, "layer") == Some(w.2 as f64)
                })
                .unwrap();
            let g = num(r, "mean_cosine").unwrap();
            assert!(
                (g - mean).abs() <= 1e-6,
                "{t} {id} {} {}: {g} vs {mean}",
                w.1,
                w.2
            );
        }
    }

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["conflicts"]["rows"], want.len());
    assert_eq!(
        summary["conflicts"]["lowest_mean_cosine"]["math"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    for f in ["conflicts_Q.png", "conflicts_K.svg", "conflicts.parquet"] {
        assert!(out.join(f).exists(), "{f}");
        assert!(
            summary["files"].as_array().unwrap().iter().any(|x| x == f),
            "{f}"
        );
    }
}

#[test]
fn one_analysed_sample_and_plain_score() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ingest(tmp.path());
    let out = tmp.path().join("one");
    let o = run(&[
        "score",
        "--store",
        p(&store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(&out),
        "--conflicts",
        "--samples-a",
        "4",
        "--n-perm",
        "10",
        "--n-boot",
        "0",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`math`") && err.contains("at least 2"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");

    // Without the flag: no phase 5 output at all.
    let plain = tmp.path().join("plain");
    ok(&[
        "score",
        "--store",
        p(&store),
        "--task-a",
        "math",
        "--task-b",
        "general",
        "--out",
        p(&plain),
        "--n-perm",
        "10",
        "--n-boot",
        "0",
        "--no-pictures",
    ]);
    for f in [
        "conflicts.parquet",
        "conflict_pairs.parquet",
        "sample_conflicts.parquet",
    ] {
        assert!(!plain.join(f).exists(), "{f}");
    }
    let summary = std::fs::read_to_string(plain.join("summary.json")).unwrap();
    assert!(!summary.contains("conflicts"), "{summary}");
}
