//! `manifest.json`: what a store holds and how (JSON Schema: schemas/manifest.schema.json).

use std::path::Path;

use gradshard_core::{Block, DType, Geometry, OtherTensor};
use gradshard_format::{Codec, FORMAT_VERSION, OLDEST_READABLE};
use gradshard_index::FrameOrder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

pub const MANIFEST_FILE: &str = "manifest.json";

/// A second copy of the manifest, written beside it whenever it is written: what
/// `salvage` rebuilds a deleted or damaged `manifest.json` from (checked against the
/// shard headers' store id and version, and every sample read whole under it).
pub const MANIFEST_COPY_FILE: &str = "manifest.copy.json";

/// Compression settings of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecSpec {
    /// "zstd-exp" (format v3), "zstd" or "none".
    pub name: CodecName,
    /// zstd level (ignored for "none").
    pub level: i32,
    /// Byte-shuffle before compression.
    pub shuffle: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecName {
    /// zstd over the exponent byte plane only, mantissa planes raw (frame codec 2,
    /// format v3; needs the byte shuffle).
    #[serde(rename = "zstd-exp")]
    ZstdExp,
    /// zstd over the whole payload (frame codec 1).
    Zstd,
    None,
}

impl CodecName {
    pub fn as_str(self) -> &'static str {
        match self {
            CodecName::ZstdExp => "zstd-exp",
            CodecName::Zstd => "zstd",
            CodecName::None => "none",
        }
    }
}

impl CodecSpec {
    /// zstd level 1 on the exponent plane of the byte-shuffled values: docs/design.md §6
    /// measured no gain above level 1 on gradients, and docs/format.md ("Codecs") why the
    /// mantissa planes are stored raw; `scripts/bench_write.sh` re-measures it.
    pub const DEFAULT: CodecSpec = CodecSpec {
        name: CodecName::ZstdExp,
        level: 1,
        shuffle: true,
    };

    pub fn codec(&self) -> Codec {
        match self.name {
            CodecName::ZstdExp => Codec::ZstdExp(self.level),
            CodecName::Zstd => Codec::Zstd(self.level),
            CodecName::None => Codec::None,
        }
    }
}

impl Default for CodecSpec {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What is stored: the part of the manifest that input must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSpec {
    pub geometry: Geometry,
    pub dtype: DType,
    pub codec: CodecSpec,
    /// Stored attention blocks, in Q K V O order.
    pub blocks: Vec<Block>,
    /// Non-attention 2-D tensors, stored as row groups.
    pub other_tensors: Vec<OtherTensor>,
}

impl StoreSpec {
    pub fn frame_order(&self) -> FrameOrder {
        FrameOrder::new(&self.geometry, &self.blocks, &self.other_tensors)
    }
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u16,
    /// 32 hex digits; also in every shard header.
    pub store_id: String,
    pub created_by: String,
    #[serde(flatten)]
    pub spec: StoreSpec,
    /// Frames per sample (derived; checked on open).
    pub n_frames: usize,
    /// A shard is closed for new samples once it reaches this size.
    pub shard_target_bytes: u64,
    /// Free-form description of where the data came from (ingest, synth, collect).
    #[serde(default)]
    pub source: serde_json::Value,
}

impl Manifest {
    pub fn store_id_bytes(&self) -> Result<[u8; 16]> {
        let s = &self.store_id;
        let bad = || Error::Manifest {
            path: MANIFEST_FILE.into(),
            detail: format!("store_id `{s}` is not 32 hex digits"),
        };
        if s.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }

    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            // Say what the path is: missing, a file, a directory without a store, or a
            // store whose manifest is gone (damage that salvage mends).
            crate::guard::require_store_dir(dir)?;
            return Err(Error::Manifest {
                path,
                detail: format!(
                    "missing, though the store's other files are there; {}",
                    mend_hint(dir)
                ),
            });
        }
        Self::load_file(&path, dir)
    }

    /// Reads and checks the manifest file `path` of the store at `dir` (`dir` is named
    /// in the advice a damaged manifest gets).
    pub fn load_file(path: &Path, dir: &Path) -> Result<Manifest> {
        let path = path.to_path_buf();
        let bytes = std::fs::read(&path).at(&path)?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Manifest {
            path: path.clone(),
            detail: format!(
                "not a manifest (not UTF-8 text: {e}); the file is damaged. {}",
                mend_hint(dir)
            ),
        })?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Manifest {
            path: path.clone(),
            detail: format!(
                "not a manifest (not valid JSON: {e}); the file is damaged. {}",
                mend_hint(dir)
            ),
        })?;
        let version = raw
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::Manifest {
                path: path.clone(),
                detail: "missing format_version".into(),
            })?;
        if !(OLDEST_READABLE as u64..=FORMAT_VERSION as u64).contains(&version) {
            return Err(Error::UnsupportedVersion {
                path,
                found: version.min(u16::MAX as u64) as u16,
                oldest: OLDEST_READABLE,
                newest: FORMAT_VERSION,
            });
        }
        let m: Manifest = serde_json::from_value(raw).map_err(|e| Error::Manifest {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if m.spec.codec.name == CodecName::ZstdExp && (version < 3 || !m.spec.codec.shuffle) {
            return Err(Error::Manifest {
                path: path.clone(),
                detail: format!(
                    "codec zstd-exp needs format_version 3 or later and shuffle true \
                     (found version {version}, shuffle {})",
                    m.spec.codec.shuffle
                ),
            });
        }
        m.store_id_bytes().map_err(|_| Error::Manifest {
            path: path.clone(),
            detail: format!("store_id `{}` is not 32 hex digits", m.store_id),
        })?;
        // Re-validate the geometry through the checked constructor.
        let g = &m.spec.geometry;
        Geometry::new(
            &g.model_type,
            g.layout,
            &g.root,
            g.layers,
            g.hidden,
            g.heads,
            g.kv_heads,
            g.head_dim,
        )
        .map_err(|e| Error::Manifest {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let n = m.spec.frame_order().n_frames();
        if n != m.n_frames {
            return Err(Error::Manifest {
                path,
                detail: format!(
                    "n_frames is {} but the geometry and tensors give {n}",
                    m.n_frames
                ),
            });
        }
        Ok(m)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        // The copy first: a crash between the two leaves the manifest as it was and a
        // copy that salvage checks against the shards before it uses it.
        crate::fsutil::write_atomic(&dir.join(MANIFEST_COPY_FILE), text.as_bytes())?;
        crate::fsutil::write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())
    }

    /// Checks that `input` describes the same stored data as this manifest.
    pub fn check_matches(&self, dir: &Path, input: &StoreSpec) -> Result<()> {
        let s = &self.spec;
        let g = (&s.geometry, &input.geometry);
        let fields: [(&str, String, String); 9] = [
            ("model_type", g.0.model_type.clone(), g.1.model_type.clone()),
            ("layers", g.0.layers.to_string(), g.1.layers.to_string()),
            (
                "hidden size",
                g.0.hidden.to_string(),
                g.1.hidden.to_string(),
            ),
            ("heads", g.0.heads.to_string(), g.1.heads.to_string()),
            (
                "kv heads",
                g.0.kv_heads.to_string(),
                g.1.kv_heads.to_string(),
            ),
            (
                "head_dim",
                g.0.head_dim.to_string(),
                g.1.head_dim.to_string(),
            ),
            ("dtype", s.dtype.to_string(), input.dtype.to_string()),
            (
                "blocks",
                format!("{:?}", s.blocks),
                format!("{:?}", input.blocks),
            ),
            (
                "other tensors",
                describe_others(&s.other_tensors),
                describe_others(&input.other_tensors),
            ),
        ];
        for (field, a, b) in fields {
            if a != b {
                return Err(Error::Mismatch {
                    store: dir.to_path_buf(),
                    field: field.to_string(),
                    store_value: a,
                    input_value: b,
                });
            }
        }
        Ok(())
    }
}

fn describe_others(t: &[OtherTensor]) -> String {
    if t.is_empty() {
        return "none".into();
    }
    t.iter()
        .map(|t| format!("{} {:?}", t.name, t.shape))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What to run when the manifest of `dir` is missing or damaged.
pub(crate) fn mend_hint(dir: &Path) -> String {
    format!(
        "`gradshard salvage --store {} --spec-from <a store of the same model, or its manifest.json>` rebuilds it from the shard headers (store id, format version) and that store's geometry, dtype and tensors, after checking every sample against them",
        dir.display()
    )
}

/// 16 random bytes from the OS, rendered as 32 hex digits.
pub fn new_store_id() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
