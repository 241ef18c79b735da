//! Writes a [`ScoreResult`] for analysts: Parquet tables (schemas in
//! `schemas/*.arrow.json`), `summary.json`, and PNG/SVG heatmaps per block.
//!
//! Everything is written into a temporary directory next to the target and
//! renamed into place at the end: a failed export leaves no half-written
//! results (and, without `overwrite`, never touches an existing directory).
//!
//! Every output directory holds an empty marker file, [`SCORE_MARKER`]; `overwrite`
//! replaces only a directory that holds it and nothing but files an export writes
//! ([`check_replaceable`]), so it never deletes anything else.

mod conflict_picture;
pub mod conflict_tables;
mod error;
pub mod picture;
pub mod schema;
pub mod tables;

use std::fs::File;
use std::path::{Path, PathBuf};

use gradshard_core::Block;
use gradshard_score::ScoreResult;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::json;

pub use conflict_tables::CONFLICT_TABLES;
pub use error::{Error, Result};
pub use picture::picture_size;
pub use schema::{check_against_json, schema, schema_json, TABLES};

/// The marker file in every output directory (empty; not listed in `summary.json`).
pub const SCORE_MARKER: &str = ".gradshard-score";

/// Whether `name` is a file an export writes.
fn is_output_file(name: &str) -> bool {
    name == SCORE_MARKER
        || name == "summary.json"
        || [".parquet", ".png", ".svg"]
            .iter()
            .any(|e| name.ends_with(e))
}

/// Checks that the existing directory `dir` may be replaced by `overwrite`: it is a
/// previous output (it holds [`SCORE_MARKER`]) and holds nothing but files an export
/// writes (Parquet, PNG, SVG, `summary.json`). Says why not, naming the entry, otherwise.
pub fn check_replaceable(dir: &Path) -> Result<()> {
    let refuse = |why: String| Error::NotAScoreOutput {
        path: dir.to_path_buf(),
        why,
    };
    if !dir.join(SCORE_MARKER).is_file() {
        return Err(refuse(format!(
            "it has no {SCORE_MARKER} marker, so it is not an output of `gradshard score` (only a previous score output is replaced; remove the directory yourself or choose another output directory)"
        )));
    }
    for e in std::fs::read_dir(dir).map_err(error::io(dir))? {
        let e = e.map_err(error::io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file || !is_output_file(&name) {
            return Err(refuse(format!(
                "it holds {}, which is not a file that score writes (remove it yourself or choose another output directory)",
                e.path().display()
            )));
        }
    }
    Ok(())
}

/// How to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Identifies the store the scores came from (recorded in summary.json).
    pub store_id: String,
    /// Replace an existing non-empty output directory (atomically, by rename).
    pub overwrite: bool,
    /// Draw PNG and SVG heatmaps.
    pub pictures: bool,
    /// Give each block's picture its own colour range (default: one range shared by
    /// the blocks of the run).
    pub per_block_colour_range: bool,
}

impl ExportOptions {
    pub fn new(store_id: impl Into<String>) -> ExportOptions {
        ExportOptions {
            store_id: store_id.into(),
            overwrite: false,
            pictures: true,
            per_block_colour_range: false,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub dir: PathBuf,
    /// File names inside `dir`.
    pub files: Vec<String>,
}

/// Writes every output into `out_dir` (which must not exist or be empty).
pub fn write_outputs(result: &ScoreResult, out_dir: &Path, store_id: &str) -> Result<Written> {
    write_outputs_with(result, out_dir, &ExportOptions::new(store_id))
}

/// The final component of `out_dir` and its parent directory (`.` when it has none).
fn split_out(out_dir: &Path) -> Result<(String, PathBuf)> {
    let name = out_dir
        .file_name()
        .ok_or_else(|| Error::Io {
            path: out_dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "output path has no final component",
            ),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((name, parent))
}

/// Checks, before any computation, that outputs can be written at `out_dir`: its
/// parent is created if needed and a probe directory is made and removed there. Also
/// removes the temporary directories (`.<name>.tmp-<pid>-…`) that earlier runs killed
/// before they could publish left behind (only those whose process is gone; on Linux,
/// where `/proc` says so). Returns how many it removed.
pub fn prepare_output_dir(out_dir: &Path) -> Result<usize> {
    let (name, parent) = split_out(out_dir)?;
    std::fs::create_dir_all(&parent).map_err(error::io(&parent))?;
    let probe = parent.join(format!(".{name}.probe-{}", std::process::id()));
    std::fs::create_dir(&probe).map_err(error::io(&probe))?;
    std::fs::remove_dir(&probe).map_err(error::io(&probe))?;
    let mut removed = 0;
    if !Path::new("/proc/self").exists() {
        return Ok(removed);
    }
    let prefix = format!(".{name}.tmp-");
    for e in std::fs::read_dir(&parent)
        .map_err(error::io(&parent))?
        .flatten()
    {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            std::fs::remove_dir_all(e.path()).map_err(error::io(&e.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes every output into `out_dir` with explicit options.
pub fn write_outputs_with(
    result: &ScoreResult,
    out_dir: &Path,
    opts: &ExportOptions,
) -> Result<Written> {
    let (name, parent) = split_out(out_dir)?;
    let exists_nonempty = match std::fs::read_dir(out_dir) {
        Ok(mut rd) => rd.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Error::Io {
                path: out_dir.to_path_buf(),
                source: e,
            })
        }
    };
    if exists_nonempty && !opts.overwrite {
        return Err(Error::OutputExists(out_dir.to_path_buf()));
    }
    if exists_nonempty {
        check_replaceable(out_dir)?;
    }
    std::fs::create_dir_all(&parent).map_err(error::io(&parent))?;
    let stamp = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tmp = parent.join(format!(".{name}.tmp-{stamp}"));
    std::fs::create_dir(&tmp).map_err(error::io(&tmp))?;
    let files = match write_all(result, &tmp, opts) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // Move into place. An existing directory (empty, or replaced with overwrite)
    // is first renamed aside, then removed once the new one is in place.
    let old = parent.join(format!(".{name}.old-{stamp}"));
    let had_old = out_dir.exists();
    if had_old {
        if let Err(e) = std::fs::rename(out_dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::Io {
                path: out_dir.to_path_buf(),
                source: e,
            });
        }
    }
    if let Err(e) = std::fs::rename(&tmp, out_dir) {
        if had_old {
            let _ = std::fs::rename(&old, out_dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::Io {
            path: out_dir.to_path_buf(),
            source: e,
        });
    }
    if had_old {
        std::fs::remove_dir_all(&old).map_err(error::io(&old))?;
    }
    Ok(Written {
        dir: out_dir.to_path_buf(),
        files,
    })
}

fn write_all(result: &ScoreResult, dir: &Path, opts: &ExportOptions) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let conflict_tables: &[&'static str] = if result.conflicts.is_some() {
        CONFLICT_TABLES
    } else {
        &[]
    };
    for &table in TABLES.iter().chain(conflict_tables) {
        let batch = tables::batch(result, table)?;
        let fname = format!("{table}.parquet");
        let path = dir.join(&fname);
        let file = File::create(&path).map_err(error::io(&path))?;
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props.clone()))
            .map_err(|source| Error::Parquet { table, source })?;
        w.write(&batch)
            .map_err(|source| Error::Parquet { table, source })?;
        w.close()
            .map_err(|source| Error::Parquet { table, source })?;
        files.push(fname);
    }
    if opts.pictures {
        for block in scored_blocks(result) {
            files.extend(picture::write_pictures_with(
                result,
                block,
                dir,
                opts.per_block_colour_range,
            )?);
        }
        if result.conflicts.is_some() {
            for block in scored_blocks(result) {
                files.extend(conflict_picture::write_pictures(result, block, dir)?);
            }
        }
    }
    let path = dir.join("summary.json");
    let mut all_files = files.clone();
    all_files.push("summary.json".into());
    let summary = summary(result, &opts.store_id, &all_files);
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?).map_err(error::io(&path))?;
    let marker = dir.join(SCORE_MARKER);
    std::fs::write(&marker, b"").map_err(error::io(&marker))?;
    // Make the data durable before the rename publishes it.
    for f in all_files.iter().chain([&SCORE_MARKER.to_string()]) {
        let p = dir.join(f);
        File::open(&p)
            .and_then(|h| h.sync_all())
            .map_err(error::io(&p))?;
    }
    Ok(all_files)
}

fn scored_blocks(result: &ScoreResult) -> Vec<Block> {
    let mut b: Vec<Block> = result.cells.iter().map(|c| c.block).collect();
    b.sort();
    b.dedup();
    b
}

/// The `summary.json` document.
pub fn summary(result: &ScoreResult, store_id: &str, files: &[String]) -> serde_json::Value {
    let rows = result.heatmap_rows();
    let block_means: serde_json::Map<String, serde_json::Value> = scored_blocks(result)
        .into_iter()
        .filter_map(|b| result.block_mean(b).map(|m| (b.to_string(), json!(m))))
        .collect();
    let most_block = block_means
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, v)| json!({"block": k, "mean_score": v}));
    let most_head = rows
        .iter()
        .max_by(|a, b| a.score_mean.total_cmp(&b.score_mean))
        .map(|r| {
            json!({"block": r.block, "layer": r.layer, "head": r.head, "kv_head": r.kv_head,
                   "kv_shared": r.kv_shared, "score_mean": r.score_mean})
        });
    let o = &result.options;
    let mut doc = json!({
        "format": "gradshard-score-summary/1",
        "store_id": store_id,
        "task_a": o.task_a,
        "task_b": o.task_b,
        "backend": result.backend,
        "samples": {
            "scored_a": result.samples_a.len(),
            "scored_b": result.samples_b.len(),
            "stored_a": result.stored_a,
            "stored_b": result.stored_b,
        },
        "settings": o,
        "geometry": result.geometry,
        "block_means": block_means,
        "most_conflicted_block": most_block,
        "most_conflicted_head": most_head,
        "kv_note": "K and V are scored per kv head; heatmap rows repeat a kv head's value for each query head sharing it (kv_shared = true).",
        "sample_id_encoding": "sample_* columns hold the id as text; sample_*_kind is \"int\" (canonical decimal integer) or \"str\" (exact string)",
        "warnings": result.warnings,
        "reads": result.reads,
        "files": files,
    });
    if let Some(c) = conflict_tables::summary(result) {
        doc["conflicts"] = c;
    }
    doc
}
