//! The gradshard byte format (see `docs/format.md`): frames, shard headers and
//! footers, sample tables and commit-log records. Bytes only: no files, no
//! threads, no model knowledge. Every length read from bytes is untrusted and
//! checked against a named limit.

mod error;
mod frame;
mod log;
mod shard;
mod shuffle;

pub use error::{Error, Result};
pub use frame::{
    decode_frame, decode_payload, decode_payload_bf16_planes, decode_payload_f32, encode_frame,
    parse_frame_header, verify_frame, widen_bf16, Codec, Encoder, FrameHeader, FrameKind,
    FRAME_HEADER_LEN, MAX_FACTOR_ROWS, MAX_FRAME_BYTES,
};
pub use log::{
    decode_log, decode_log_record, encode_log_record, LogRecord, LogScan, LOG_HEADER,
    LOG_HEADER_LEN, MAX_RECORD_BODY,
};
pub use shard::{
    encode_footer, encode_sample_table, parse_footer, Footer, ShardHeader, TableEntry, TableView,
    FOOTER_ENTRY_LEN, MAX_FRAMES_PER_SAMPLE, SHARD_HEADER_LEN, SHARD_MAGIC, TABLE_ENTRY_LEN,
    TRAILER_LEN,
};
pub use shuffle::{shuffle, unshuffle};

/// Format version written by this crate. Readers accept versions in
/// `OLDEST_READABLE..=FORMAT_VERSION`.
pub const FORMAT_VERSION: u16 = 3;
pub const OLDEST_READABLE: u16 = 1;

/// XXH3-64 with seed 0 over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(p);
    }
    h.digest()
}

/// Checks the start of a file that opens with an 8-byte magic and a u16 version
/// (shard files, the commit log): length at least `header_len`, the magic, a readable
/// version. Returns the version.
pub(crate) fn check_file_prefix(
    bytes: &[u8],
    what: &'static str,
    header_len: usize,
    magic: &[u8; 8],
) -> Result<u16> {
    if bytes.len() < header_len {
        return Err(Error::Truncated {
            what,
            need: header_len as u64,
            have: bytes.len() as u64,
        });
    }
    if &bytes[..8] != magic {
        return Err(Error::BadMagic {
            expected: String::from_utf8_lossy(magic).into_owned(),
            found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
        });
    }
    let version = u16_at(bytes, 8);
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            found: version,
            oldest: OLDEST_READABLE,
            newest: FORMAT_VERSION,
        });
    }
    Ok(version)
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
