/// Errors decoding or encoding gradshard bytes. Positions are byte offsets in
/// the buffer the caller passed (the caller adds the file name and key).
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum Error {
    #[error("bad magic {found:?} (expected {expected:?})")]
    BadMagic { expected: String, found: String },
    #[error("unsupported format version {found} (this build reads {oldest}..={newest})")]
    UnsupportedVersion {
        found: u16,
        oldest: u16,
        newest: u16,
    },
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("checksum mismatch in {what}: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum {
        what: &'static str,
        stored: u64,
        computed: u64,
    },
    #[error("{what} = {value} exceeds the limit {limit}")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: u64 },
    #[error("zstd: {0}")]
    Zstd(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
