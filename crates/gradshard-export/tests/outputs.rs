//! Written outputs read back: Parquet against schemas/*.arrow.json, PNG header,
//! SVG, summary.json, atomic directory handling.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Float64Array, Int32Array, StringArray};
use gradshard_core::{Block, TaskName};
use gradshard_export::{
    check_against_json, picture_size, schema, schema_json, write_outputs, write_outputs_with,
    Error, ExportOptions, SCORE_MARKER, TABLES,
};
use gradshard_score::fixture::FixtureSource;
use gradshard_score::{score, ScoreOptions, ScoreResult};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn result(model: &str) -> ScoreResult {
    let src = FixtureSource::open(&repo().join("tests/fixtures").join(model), false).unwrap();
    let mut o = ScoreOptions::new(
        TaskName::new("math").unwrap(),
        TaskName::new("general").unwrap(),
    );
    o.n_boot = 100;
    o.n_perm = 49;
    o.pairs_for = vec![(0, 1), (1, 3)];
    o.mlp_fisher = true;
    score(&src, &o, &mut |_| {}).unwrap()
}

fn schema_doc(table: &str) -> serde_json::Value {
    let p = repo().join("schemas").join(format!("{table}.arrow.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}")))
        .unwrap()
}

/// The committed JSON schemas are the code's schemas. `GRADSHARD_WRITE_SCHEMAS=1`
/// rewrites them (after a deliberate schema change).
#[test]
fn committed_schemas_match_the_code() {
    for table in TABLES {
        let s = schema(table).unwrap();
        let want = schema_json(table, &s);
        let p = repo().join("schemas").join(format!("{table}.arrow.json"));
        if std::env::var_os("GRADSHARD_WRITE_SCHEMAS").is_some() {
            std::fs::write(&p, serde_json::to_string_pretty(&want).unwrap() + "\n").unwrap();
        }
        assert_eq!(schema_doc(table), want, "{table}");
    }
}

fn read_back(path: &Path) -> (arrow::datatypes::SchemaRef, Vec<arrow::array::RecordBatch>) {
    let b = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let schema = b.schema().clone();
    let batches = b.build().unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    (schema, batches)
}

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&b[12..16], b"IHDR", "first chunk is IHDR");
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn outputs_read_back_and_match_the_schemas() {
    for model in ["llama-gqa", "gpt2"] {
        let res = result(model);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run1");
        let w = write_outputs(&res, &out, "store-xyz").unwrap();
        assert_eq!(w.dir, out);
        let g = &res.geometry;
        for table in TABLES {
            let (schema, batches) = read_back(&out.join(format!("{table}.parquet")));
            check_against_json(table, &schema, &schema_doc(table))
                .unwrap_or_else(|e| panic!("{model}: {e}"));
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            let want = match *table {
                "heatmap" => 4 * g.layers * g.heads,
                "top_pairs" => 4 * 20,
                "pairs" => 4 * 2 * 8 * 8,
                "diagnostics" => g.layers * (2 * g.heads + 2 * g.kv_heads),
                "group_fisher" => res.group_fisher.len(),
                "masks" => res.masks.len(),
                "overlap" => res.overlap.len(),
                _ => unreachable!(),
            };
            assert_eq!(rows, want, "{model} {table}");
            assert!(rows > 0);
        }
        // Values survive the round trip: heatmap means and top-pair ids.
        let (_, hb) = read_back(&out.join("heatmap.parquet"));
        let b = &hb[0];
        let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
        let block = col("block");
        let block = block.as_any().downcast_ref::<StringArray>().unwrap();
        let layer = col("layer");
        let layer = layer.as_any().downcast_ref::<Int32Array>().unwrap();
        let head = col("head");
        let head = head.as_any().downcast_ref::<Int32Array>().unwrap();
        let mean = col("score_mean");
        let mean = mean.as_any().downcast_ref::<Float64Array>().unwrap();
        let lo = col("ci_low");
        assert_eq!(lo.null_count(), 0);
        for (i, r) in res.heatmap_rows().iter().enumerate() {
            assert_eq!(block.value(i), r.block.as_str());
            assert_eq!(
                (layer.value(i), head.value(i)),
                (r.layer as i32, r.head as i32)
            );
            assert_eq!(mean.value(i), r.score_mean);
        }
        let (_, tb) = read_back(&out.join("top_pairs.parquet"));
        let b = &tb[0];
        let sa = b.column(b.schema().index_of("sample_a").unwrap());
        let sa = sa.as_any().downcast_ref::<StringArray>().unwrap();
        let kind = b.column(b.schema().index_of("sample_a_kind").unwrap());
        let kind = kind.as_any().downcast_ref::<StringArray>().unwrap();
        for (i, t) in res.top.iter().enumerate() {
            assert_eq!(sa.value(i), format!("{}", t.sample_a));
            assert_eq!(kind.value(i), "int");
        }
        // Pictures: a real PNG of the documented size, and an SVG.
        let (pw, ph) = picture_size(g.layers, g.heads);
        for blk in Block::ALL {
            let png = out.join(format!("heatmap_{blk}.png"));
            assert_eq!(png_size(&png), (pw, ph), "{model} {blk}");
            assert!(std::fs::metadata(&png).unwrap().len() > 2000);
            let svg = std::fs::read_to_string(out.join(format!("heatmap_{blk}.svg"))).unwrap();
            assert!(svg.contains("<svg") && svg.contains("query head") && svg.contains("layer"));
            assert!(svg.contains(&format!("{blk} interference: math vs general")));
        }
        // summary.json
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(s["store_id"], "store-xyz");
        assert_eq!(s["task_a"], "math");
        assert_eq!(s["block_means"].as_object().unwrap().len(), 4);
        let best = s["most_conflicted_head"]["score_mean"].as_f64().unwrap();
        assert!(res.heatmap_rows().iter().all(|r| r.score_mean <= best));
        assert_eq!(s["settings"]["eps"], 1e-10);
        // No temporary directories are left next to the output.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(leftovers, vec!["run1".to_string()]);
    }
}

#[test]
fn existing_output_is_kept_unless_overwrite() {
    let res = result("gpt2");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = write_outputs(&res, &out, "s").unwrap_err();
    assert!(matches!(e, Error::OutputExists(_)), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    let mut o = ExportOptions::new("s2");
    o.overwrite = true;
    o.pictures = false;
    // overwrite replaces only a previous output: a directory of anything else stays.
    let e = write_outputs_with(&res, &out, &o).unwrap_err();
    assert!(matches!(e, Error::NotAScoreOutput { .. }), "{e}");
    assert!(e.to_string().contains(".gradshard-score"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    // A previous output is replaced.
    let prev = tmp.path().join("prev");
    write_outputs(&res, &prev, "s").unwrap();
    assert!(prev.join(SCORE_MARKER).is_file());
    let w = write_outputs_with(&res, &prev, &o).unwrap();
    assert!(!w.files.iter().any(|f| f.ends_with(".png")));
    assert!(!std::fs::read_dir(&prev).unwrap().any(|e| e
        .unwrap()
        .path()
        .extension()
        .is_some_and(|x| x == "png")));
    assert!(prev.join("heatmap.parquet").exists());
    assert!(prev.join(SCORE_MARKER).is_file());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    // ... but not one to which something else was added.
    std::fs::write(prev.join("notes.txt"), "mine").unwrap();
    let e = write_outputs_with(&res, &prev, &o).unwrap_err();
    assert!(e.to_string().contains("notes.txt"), "{e}");
    assert!(prev.join("notes.txt").exists() && prev.join("heatmap.parquet").exists());
}

#[test]
fn a_failed_export_leaves_nothing() {
    let res = result("gpt2");
    let tmp = tempfile::tempdir().unwrap();
    // The parent of the output is a regular file: nothing can be created.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let e = write_outputs(&res, &blocker.join("run"), "s").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// A signed run over a `--layers/--heads` subset: pictures are written, with a
/// diverging scale explained in the footer and a legend for the grey cells.
/// `GRADSHARD_PICTURE_DIR` keeps the PNGs there for a look.
#[test]
fn signed_subset_pictures_explain_colour_and_unscored_cells() {
    let src = FixtureSource::open(&repo().join("tests/fixtures/llama-gqa"), false).unwrap();
    let mut o = ScoreOptions::new(
        TaskName::new("math").unwrap(),
        TaskName::new("general").unwrap(),
    );
    o.variant = gradshard_score::Variant::Signed;
    o.layers = Some(vec![1]);
    o.heads = Some(vec![0, 1, 3]);
    o.n_boot = 0;
    o.n_perm = 0;
    let res = score(&src, &o, &mut |_| {}).unwrap();
    assert!(
        res.heatmap_rows().iter().any(|r| r.score_mean < 0.0),
        "the fixture gives negative signed scores"
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("signed");
    let w = write_outputs(&res, &out, "s").unwrap();
    let g = &res.geometry;
    let (pw, ph) = picture_size(g.layers, g.heads);
    for blk in Block::ALL {
        let png = out.join(format!("heatmap_{blk}.png"));
        assert!(w.files.contains(&format!("heatmap_{blk}.png")));
        assert_eq!(png_size(&png), (pw, ph), "{blk}");
        let svg = std::fs::read_to_string(out.join(format!("heatmap_{blk}.svg"))).unwrap();
        assert!(svg.contains(&format!("{blk} interference: math vs general")));
        assert!(
            svg.contains("not scored (outside --layers/--heads)"),
            "{blk}"
        );
        assert!(
            svg.contains("mean M: mean over all 8 × 8 sample pairs"),
            "{blk}"
        );
        assert!(svg.contains("M = Σ_S g_A/den · g_B"), "{blk}");
        assert!(svg.contains("signed variant"), "{blk}");
        if let Some(keep) = std::env::var_os("GRADSHARD_PICTURE_DIR") {
            std::fs::copy(
                &png,
                Path::new(&keep).join(format!("signed_subset_{blk}.png")),
            )
            .unwrap();
        }
    }
    // A full unsigned run has no grey cells, hence no legend.
    let res = result("gpt2");
    let out = tmp.path().join("full");
    write_outputs(&res, &out, "s").unwrap();
    let svg = std::fs::read_to_string(out.join("heatmap_Q.svg")).unwrap();
    assert!(!svg.contains("not scored"));
    assert!(svg.contains("M = Σ_S C_A/den · |g_B|"));
    if let Some(keep) = std::env::var_os("GRADSHARD_PICTURE_DIR") {
        std::fs::copy(
            out.join("heatmap_Q.png"),
            Path::new(&keep).join("unsigned_full_Q.png"),
        )
        .unwrap();
    }
}
