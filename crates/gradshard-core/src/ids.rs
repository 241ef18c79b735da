use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One of the four attention weight blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Block {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
}

impl Block {
    pub const ALL: [Block; 4] = [Block::Q, Block::K, Block::V, Block::O];

    pub const fn as_str(self) -> &'static str {
        match self {
            Block::Q => "Q",
            Block::K => "K",
            Block::V => "V",
            Block::O => "O",
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }

    /// K and V are stored once per key/value head; Q and O once per query head.
    pub const fn is_kv(self) -> bool {
        matches!(self, Block::K | Block::V)
    }
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Block {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Q" | "q" => Ok(Block::Q),
            "K" | "k" => Ok(Block::K),
            "V" | "v" => Ok(Block::V),
            "O" | "o" => Ok(Block::O),
            other => Err(format!("unknown block `{other}` (expected Q, K, V or O)")),
        }
    }
}

/// Transformer layer number, 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerId(pub u32);

/// Head number, 0-based: a query head for Q/O, a key/value head for K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HeadId(pub u32);

/// A sample id exactly as the user gave it: an integer or a string.
/// Never parsed out of another string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleId {
    Int(i64),
    Str(String),
}

impl SampleId {
    /// Maximum length of a string id in bytes.
    pub const MAX_STR_LEN: usize = 1024;

    /// Validates a string id: non-empty, at most [`Self::MAX_STR_LEN`] bytes, no control characters.
    pub fn string(s: impl Into<String>) -> Result<SampleId> {
        let s = s.into();
        if s.is_empty() {
            return Err(Error::InvalidId {
                what: "sample id",
                value: s,
                why: "empty",
            });
        }
        if s.len() > Self::MAX_STR_LEN {
            return Err(Error::InvalidId {
                what: "sample id",
                value: s,
                why: "longer than 1024 bytes",
            });
        }
        if s.chars().any(char::is_control) {
            return Err(Error::InvalidId {
                what: "sample id",
                value: s,
                why: "contains control characters",
            });
        }
        Ok(SampleId::Str(s))
    }

    /// The id of a sample file named `<stem>.safetensors`: a canonical decimal integer
    /// (no sign other than `-`, no leading zeros) becomes [`SampleId::Int`], anything else
    /// stays the exact string. `007` stays the string "007".
    pub fn from_file_stem(stem: &str) -> Result<SampleId> {
        let digits = stem.strip_prefix('-').unwrap_or(stem);
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'))
            && stem != "-0";
        if canonical {
            if let Ok(v) = stem.parse::<i64>() {
                return Ok(SampleId::Int(v));
            }
        }
        SampleId::string(stem)
    }

    /// A file-name-safe rendering (used for `<id>.safetensors` exports).
    pub fn file_stem(&self) -> String {
        match self {
            SampleId::Int(v) => v.to_string(),
            SampleId::Str(s) => s
                .chars()
                .map(|c| if c == '/' || c == '\\' { '_' } else { c })
                .collect(),
        }
    }
}

impl std::fmt::Display for SampleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SampleId::Int(v) => write!(f, "{v}"),
            SampleId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A task name: 1..=128 bytes of ASCII letters, digits, `_`, `-`, `.`; may contain `_`
/// freely (nothing is ever split on it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskName(String);

impl TaskName {
    pub const MAX_LEN: usize = 128;

    pub fn new(s: impl Into<String>) -> Result<TaskName> {
        let s = s.into();
        let why = if s.is_empty() {
            Some("empty")
        } else if s.len() > Self::MAX_LEN {
            Some("longer than 128 bytes")
        } else if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            Some("only ASCII letters, digits, '_', '-' and '.' are allowed")
        } else if s.starts_with('.') {
            Some("must not start with '.'")
        } else {
            None
        };
        match why {
            Some(why) => Err(Error::InvalidId {
                what: "task name",
                value: s,
                why,
            }),
            None => Ok(TaskName(s)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        TaskName::new(s)
    }
}

impl From<TaskName> for String {
    fn from(t: TaskName) -> String {
        t.0
    }
}

impl std::fmt::Display for TaskName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_ids_from_stems() {
        assert_eq!(SampleId::from_file_stem("12").unwrap(), SampleId::Int(12));
        assert_eq!(SampleId::from_file_stem("-3").unwrap(), SampleId::Int(-3));
        assert_eq!(
            SampleId::from_file_stem("007").unwrap(),
            SampleId::Str("007".into())
        );
        assert_eq!(
            SampleId::from_file_stem("task_3").unwrap(),
            SampleId::Str("task_3".into())
        );
        assert!(SampleId::from_file_stem("").is_err());
    }

    #[test]
    fn task_names() {
        assert!(TaskName::new("math_word_problems").is_ok());
        assert!(TaskName::new("a/b").is_err());
        assert!(TaskName::new("").is_err());
        assert!(TaskName::new(".hidden").is_err());
    }

    #[test]
    fn sample_id_json_keeps_kind() {
        let ids: Vec<SampleId> = serde_json::from_str(r#"[3, "3", "x"]"#).unwrap();
        assert_eq!(
            ids,
            vec![
                SampleId::Int(3),
                SampleId::Str("3".into()),
                SampleId::Str("x".into())
            ]
        );
    }
}
