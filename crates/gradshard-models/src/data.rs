//! Task files: JSONL with one sample a line, `{"id"?, "text"? , "input_ids"?}`,
//! tokenized with `tokenizer.json` (no special tokens added), streamed one
//! sample at a time.

use std::collections::HashSet;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// A sample's stored id, kept exactly as the input gave it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SampleId {
    Int(i64),
    Str(String),
}

impl fmt::Display for SampleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SampleId::Int(i) => write!(f, "{i}"),
            SampleId::Str(s) => f.write_str(s),
        }
    }
}

impl SampleId {
    /// The id as a file stem, or None if it cannot be one safely (empty,
    /// `.`/`..`, a path separator, a NUL or other control character).
    pub fn file_stem(&self) -> Option<String> {
        let s = self.to_string();
        let bad = s.is_empty()
            || s == "."
            || s == ".."
            || s.starts_with('.')
            || s.chars().any(|c| c == '/' || c == '\\' || c.is_control());
        (!bad).then_some(s)
    }
}

/// A tokenized sample ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSample {
    pub id: SampleId,
    /// Token ids x_0..x_{n-1}; n >= 2 (shorter samples are skipped by the reader).
    pub ids: Vec<u32>,
    /// 1-based line of the input file it came from (0 if not from a file).
    pub line: usize,
}

impl TokenSample {
    /// Predicted positions T = n - 1 (HF shift: position p predicts x_{p+1}).
    pub fn predicted(&self) -> usize {
        self.ids.len().saturating_sub(1)
    }
}

/// A sample that was dropped because it had fewer than 2 tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub id: SampleId,
    pub line: usize,
    /// Number of tokens it had (0 or 1).
    pub tokens: usize,
}

/// Loads `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Encodes `text` without special tokens.
pub fn encode(tok: &Tokenizer, text: &str, tok_path: &Path) -> Result<Vec<u32>> {
    tok.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| Error::Tokenizer {
            path: tok_path.to_path_buf(),
            msg: e.to_string(),
        })
}

/// Options of a [`SampleReader`].
#[derive(Debug, Clone, Default)]
pub struct ReaderOptions {
    /// Keep only the first `max_tokens` tokens of each sample.
    pub max_tokens: Option<usize>,
    /// Token ids must be < vocab_size (checked so the error names the line).
    pub vocab_size: Option<usize>,
    /// Longest sequence the model accepts (GPT-2 n_positions); longer is an error.
    pub max_positions: Option<usize>,
}

/// Streams samples from a JSONL file. Each item is a sample or the first error
/// (iteration should stop at an error). Samples with fewer than 2 tokens are
/// not yielded but recorded in [`SampleReader::skipped`].
///
/// When a line has both `input_ids` and `text`, `input_ids` is used (it is
/// exact); `text` is tokenized only when `input_ids` is absent. A missing `id`
/// becomes the 0-based line index.
pub struct SampleReader {
    path: PathBuf,
    lines: std::io::Lines<BufReader<std::fs::File>>,
    line_no: usize,
    tokenizer: Option<(Tokenizer, PathBuf)>,
    opts: ReaderOptions,
    seen: HashSet<SampleId>,
    skipped: Vec<Skipped>,
    failed: bool,
    /// Samples read so far, and how many of them had no `id` (their line index is used).
    read: usize,
    ids_from_lines: usize,
}

impl SampleReader {
    /// Open `path`; `tokenizer` is (tokenizer, its path for messages), needed for `text` lines.
    pub fn open(
        path: &Path,
        tokenizer: Option<(Tokenizer, PathBuf)>,
        opts: ReaderOptions,
    ) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(SampleReader {
            path: path.to_path_buf(),
            lines: BufReader::new(f).lines(),
            line_no: 0,
            tokenizer,
            opts,
            seen: HashSet::new(),
            skipped: vec![],
            failed: false,
            read: 0,
            ids_from_lines: 0,
        })
    }

    /// Samples dropped so far for having fewer than 2 tokens.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Samples yielded so far (too-short ones not counted).
    pub fn samples_read(&self) -> usize {
        self.read
    }

    /// Samples read so far that had no `id` (the 0-based line index stands in).
    pub fn ids_from_lines(&self) -> usize {
        self.ids_from_lines
    }

    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::Input {
            path: self.path.clone(),
            line: self.line_no,
            msg: msg.into(),
        }
    }

    /// Parse one non-empty line into a sample (None = skipped, too short).
    fn parse(&mut self, line: &str) -> Result<Option<TokenSample>> {
        let v: Value =
            serde_json::from_str(line).map_err(|e| self.bad(format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| self.bad("expected a JSON object"))?;
        let id = match obj.get("id") {
            None | Some(Value::Null) => {
                self.ids_from_lines += 1;
                SampleId::Int(self.line_no as i64 - 1)
            }
            Some(Value::String(s)) => SampleId::Str(s.clone()),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => SampleId::Int(i),
                None if n.as_u64().is_some() || n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                    // An integer beyond i64 (JSON numbers past u64 arrive as floats, so
                    // the digits are taken from the line as written).
                    let shown = n
                        .as_u64()
                        .map(|u| u.to_string())
                        .or_else(|| raw_id_digits(line))
                        .unwrap_or_else(|| n.to_string());
                    return Err(self.bad(format!(
                        "`id` {shown} is out of range: integer ids must lie in {}..={} (write a larger id as a string, e.g. \"{shown}\")",
                        i64::MIN,
                        i64::MAX
                    )));
                }
                None => {
                    return Err(self.bad(format!("`id` must be an integer or a string, got {n}")))
                }
            },
            Some(other) => {
                return Err(self.bad(format!("`id` must be an integer or a string, got {other}")))
            }
        };
        if !self.seen.insert(id.clone()) {
            return Err(self.bad(format!("duplicate id {id}")));
        }
        let mut ids: Vec<u32> = match (obj.get("input_ids"), obj.get("text")) {
            (Some(Value::Array(arr)), _) => {
                let mut out = Vec::with_capacity(arr.len());
                for (k, x) in arr.iter().enumerate() {
                    let t = x
                        .as_u64()
                        .filter(|&t| t <= u32::MAX as u64)
                        .ok_or_else(|| {
                            self.bad(format!("input_ids[{k}] = {x} is not a token id"))
                        })?;
                    out.push(t as u32);
                }
                out
            }
            (Some(other), _) => {
                return Err(self.bad(format!("`input_ids` must be an array, got {other}")))
            }
            (None, Some(Value::String(text))) => match &self.tokenizer {
                Some((tok, tpath)) => encode(tok, text, tpath)
                    .map_err(|e| self.bad(format!("cannot tokenize `text`: {e}")))?,
                None => return Err(self.bad("`text` given but no tokenizer.json was loaded")),
            },
            (None, Some(other)) => {
                return Err(self.bad(format!("`text` must be a string, got {other}")))
            }
            (None, None) => return Err(self.bad("needs `text` or `input_ids`")),
        };
        if let Some(m) = self.opts.max_tokens {
            ids.truncate(m);
        }
        if let Some(v) = self.opts.vocab_size {
            if let Some((k, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= v) {
                return Err(self.bad(format!("token {k} has id {t} >= vocab_size {v}")));
            }
        }
        if ids.len() < 2 {
            self.skipped.push(Skipped {
                id,
                line: self.line_no,
                tokens: ids.len(),
            });
            return Ok(None);
        }
        if let Some(p) = self.opts.max_positions {
            // The last token is only a label, so n - 1 positions are fed.
            if ids.len() - 1 > p {
                return Err(self.bad(format!(
                    "{} tokens exceed the model's {p} positions (+1 label); truncate with --max-tokens {}",
                    ids.len(),
                    p + 1
                )));
            }
        }
        self.read += 1;
        Ok(Some(TokenSample {
            id,
            ids,
            line: self.line_no,
        }))
    }
}

impl Iterator for SampleReader {
    type Item = Result<TokenSample>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let next = self.lines.next()?;
            self.line_no += 1;
            let line = match next {
                Ok(l) => l,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(self.bad(format!("read error: {e}"))));
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            match self.parse(&line) {
                Ok(Some(s)) => return Some(Ok(s)),
                Ok(None) => continue,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// The digits of the `"id"` value as written on a JSONL line (for messages about ids
/// that do not fit a number type), when the line holds exactly one `"id"` key.
fn raw_id_digits(line: &str) -> Option<String> {
    let mut it = line.match_indices("\"id\"");
    let (at, _) = it.next()?;
    if it.next().is_some() {
        return None;
    }
    let rest = line[at + 4..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || "-+eE.".contains(c)))
        .unwrap_or(rest.len());
    let d = &rest[..end];
    (!d.is_empty()).then(|| d.to_string())
}
