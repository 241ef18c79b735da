//! Typed access to the fields of a parsed `config.json`. Every missing or
//! ill-typed field is an error naming it (Hugging Face configs vary a lot
//! between transformers versions, so fields are read from a `serde_json::Value`
//! rather than through a fixed struct).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::Error;

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// A config object and the file it came from (for error messages).
pub(crate) struct Reader<'a> {
    pub(crate) path: PathBuf,
    pub(crate) v: &'a Value,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(path: &Path, v: &'a Value) -> Reader<'a> {
        Reader {
            path: path.to_path_buf(),
            v,
        }
    }

    /// A reader over another value of the same file.
    pub(crate) fn at<'b>(&self, v: &'b Value) -> Reader<'b> {
        Reader {
            path: self.path.clone(),
            v,
        }
    }

    /// The field, treating JSON null as absent.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }

    pub(crate) fn err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg,
        }
    }

    pub(crate) fn unsupported(&self, what: String) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            what,
        }
    }

    pub(crate) fn req_str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(format!("`{key}` must be a string, got {other}"))),
            None => Err(self.err(format!("missing `{key}`"))),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.err(format!("`{key}` must be a string, got {other}"))),
            None => Ok(None),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            Some(x) => match x.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => Ok(Some(n)),
                None => Err(self.err(format!("`{key}` must be a non-negative integer, got {x}"))),
            },
            None => Ok(None),
        }
    }

    pub(crate) fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing `{key}`")))
    }

    pub(crate) fn positive(&self, key: &str) -> Result<usize> {
        let n = self.req_usize(key)?;
        if n == 0 {
            return Err(self.err(format!("`{key}` must be > 0")));
        }
        Ok(n)
    }

    /// The first of `keys` that is written, which must be > 0 (None: none is written).
    pub(crate) fn opt_positive_of(&self, keys: &[&str]) -> Result<Option<usize>> {
        for k in keys {
            if let Some(n) = self.opt_usize(k)? {
                if n == 0 {
                    return Err(self.err(format!("`{k}` must be > 0")));
                }
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// The first of `keys` that is written, which must be > 0.
    pub(crate) fn positive_of(&self, keys: &[&str]) -> Result<usize> {
        self.opt_positive_of(keys)?
            .ok_or_else(|| self.err(format!("missing `{}`", keys.join("` or `"))))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {x}"))),
            None => Ok(None),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(x) => Err(self.err(format!("`{key}` must be a boolean, got {x}"))),
            None => Ok(None),
        }
    }

    /// Whether the key is written at all (JSON null counts as written).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.v.get(key).is_some()
    }

    /// A reader over the object under `key` (absent or null: None).
    pub(crate) fn sub(&self, key: &str) -> Result<Option<Reader<'a>>> {
        match self.v.get(key).filter(|x| !x.is_null()) {
            Some(x @ Value::Object(_)) => Ok(Some(Reader {
                path: self.path.clone(),
                v: x,
            })),
            Some(other) => Err(self.err(format!("`{key}` must be an object, got {other}"))),
            None => Ok(None),
        }
    }
}
