//! Shard file header, sample tables and the sealed-shard footer.

use crate::error::{Error, Result};
use crate::{check_file_prefix, checksum, u16_at, u32_at, u64_at, FORMAT_VERSION};

pub const SHARD_MAGIC: &[u8; 8] = b"GRADSHRD";
pub const SHARD_HEADER_LEN: usize = 64;
const TABLE_MAGIC: &[u8; 8] = b"GSSAMPLE";
const FOOTER_MAGIC: &[u8; 8] = b"GSFOOTER";
/// Bytes of one sample-table entry.
pub const TABLE_ENTRY_LEN: usize = 24;
const TABLE_HEAD_LEN: usize = 24;
/// Bytes of one footer entry.
pub const FOOTER_ENTRY_LEN: usize = 16;
/// Bytes of the trailer at the end of a sealed shard.
pub const TRAILER_LEN: usize = 32;
/// Limit on frames per sample (LLaMA-2-7B attention has 4096; MLP row groups add a few thousand).
pub const MAX_FRAMES_PER_SAMPLE: u32 = 1 << 24;

/// The 64-byte header at the start of every shard file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub version: u16,
    pub shard_no: u32,
    pub store_id: [u8; 16],
}

impl ShardHeader {
    pub fn new(shard_no: u32, store_id: [u8; 16]) -> ShardHeader {
        Self::with_version(FORMAT_VERSION, shard_no, store_id)
    }

    /// A header of an older format version (a writer appending to a v1 store writes v1 shards).
    pub fn with_version(version: u16, shard_no: u32, store_id: [u8; 16]) -> ShardHeader {
        ShardHeader {
            version,
            shard_no,
            store_id,
        }
    }

    pub fn encode(&self) -> [u8; SHARD_HEADER_LEN] {
        let mut b = [0u8; SHARD_HEADER_LEN];
        b[..8].copy_from_slice(SHARD_MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&(SHARD_HEADER_LEN as u16).to_le_bytes());
        b[12..16].copy_from_slice(&self.shard_no.to_le_bytes());
        b[16..32].copy_from_slice(&self.store_id);
        let sum = checksum(&[&b[..56]]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn parse(bytes: &[u8]) -> Result<ShardHeader> {
        let version = check_file_prefix(bytes, "shard header", SHARD_HEADER_LEN, SHARD_MAGIC)?;
        let stored = u64_at(bytes, 56);
        let computed = checksum(&[&bytes[..56]]);
        if stored != computed {
            return Err(Error::Checksum {
                what: "shard header",
                stored,
                computed,
            });
        }
        if u16_at(bytes, 10) as usize != SHARD_HEADER_LEN || bytes[32..56].iter().any(|b| *b != 0) {
            return Err(Error::Invalid {
                what: "shard header",
                detail: "header_len or reserved bytes wrong".into(),
            });
        }
        Ok(ShardHeader {
            version,
            shard_no: u32_at(bytes, 12),
            store_id: bytes[16..32].try_into().expect("16 bytes"),
        })
    }
}

/// Location of one frame, as recorded in a sample table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    /// Absolute offset of the frame in its shard.
    pub offset: u64,
    /// Header + payload bytes.
    pub frame_len: u32,
    /// Decoded bytes.
    pub raw_len: u32,
    /// Copy of the frame's checksum.
    pub checksum: u64,
}

/// Encodes a sample table: `frames` (one entry per manifest frame, in frame order), then
/// `shared` (the shared factors of a factored sample; empty for a full sample).
pub fn encode_sample_table(seq: u64, frames: &[TableEntry], shared: &[TableEntry]) -> Vec<u8> {
    let n = frames.len() + shared.len();
    let mut b = Vec::with_capacity(TABLE_HEAD_LEN + n * TABLE_ENTRY_LEN + 8);
    b.extend_from_slice(TABLE_MAGIC);
    b.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    b.extend_from_slice(&(shared.len() as u32).to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    for e in frames.iter().chain(shared) {
        b.extend_from_slice(&e.offset.to_le_bytes());
        b.extend_from_slice(&e.frame_len.to_le_bytes());
        b.extend_from_slice(&e.raw_len.to_le_bytes());
        b.extend_from_slice(&e.checksum.to_le_bytes());
    }
    let sum = checksum(&[&b]);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

/// A validated view of a sample table inside a shard. Entries are decoded on demand,
/// so looking up one frame costs one 24-byte read.
#[derive(Debug, Clone, Copy)]
pub struct TableView<'a> {
    bytes: &'a [u8],
    pub n_frames: u32,
    /// Shared-factor entries after the frame entries (format v2): 0 for a sample stored
    /// as full slices, the manifest's shared-factor count for a factored sample.
    pub n_shared: u32,
    pub seq: u64,
}

impl<'a> TableView<'a> {
    /// Total table bytes for `n` entries (frames plus shared factors).
    pub const fn table_len(n: usize) -> usize {
        TABLE_HEAD_LEN + n * TABLE_ENTRY_LEN + 8
    }

    /// Whether the sample is stored as factors.
    pub fn is_factored(&self) -> bool {
        self.n_shared > 0
    }

    /// Parses the table occupying exactly `bytes`, verifying magic, length and checksum.
    pub fn parse(bytes: &'a [u8]) -> Result<TableView<'a>> {
        Self::parse_inner(bytes, true)
    }

    /// Like [`parse`](Self::parse) but skips the whole-table checksum (the hot read path
    /// checks each frame's checksum instead; `verify` uses `parse`).
    pub fn parse_unverified(bytes: &'a [u8]) -> Result<TableView<'a>> {
        Self::parse_inner(bytes, false)
    }

    fn parse_inner(bytes: &'a [u8], verify: bool) -> Result<TableView<'a>> {
        if bytes.len() < TABLE_HEAD_LEN + 8 {
            return Err(Error::Truncated {
                what: "sample table",
                need: (TABLE_HEAD_LEN + 8) as u64,
                have: bytes.len() as u64,
            });
        }
        if &bytes[..8] != TABLE_MAGIC {
            return Err(Error::BadMagic {
                expected: String::from_utf8_lossy(TABLE_MAGIC).into_owned(),
                found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
            });
        }
        let n = u32_at(bytes, 8);
        let n_shared = u32_at(bytes, 12);
        for (what, v) in [
            ("sample table n_frames", n),
            ("sample table n_shared", n_shared),
        ] {
            if v > MAX_FRAMES_PER_SAMPLE {
                return Err(Error::TooLarge {
                    what,
                    value: v as u64,
                    limit: MAX_FRAMES_PER_SAMPLE as u64,
                });
            }
        }
        let need = Self::table_len(n as usize + n_shared as usize);
        if bytes.len() != need {
            return Err(if bytes.len() < need {
                Error::Truncated {
                    what: "sample table",
                    need: need as u64,
                    have: bytes.len() as u64,
                }
            } else {
                Error::TrailingBytes {
                    what: "sample table",
                    extra: (bytes.len() - need) as u64,
                }
            });
        }
        if verify {
            let stored = u64_at(bytes, need - 8);
            let computed = checksum(&[&bytes[..need - 8]]);
            if stored != computed {
                return Err(Error::Checksum {
                    what: "sample table",
                    stored,
                    computed,
                });
            }
        }
        Ok(TableView {
            bytes,
            n_frames: n,
            n_shared,
            seq: u64_at(bytes, 16),
        })
    }

    /// Entry of frame `i` (panics if `i >= n_frames`; callers check against the manifest).
    pub fn entry(&self, i: usize) -> TableEntry {
        assert!(i < self.n_frames as usize, "frame {i} of {}", self.n_frames);
        self.raw_entry(i)
    }

    /// Entry of shared factor `j` (panics if `j >= n_shared`).
    pub fn shared_entry(&self, j: usize) -> TableEntry {
        assert!(
            j < self.n_shared as usize,
            "shared factor {j} of {}",
            self.n_shared
        );
        self.raw_entry(self.n_frames as usize + j)
    }

    /// Every entry: frames, then shared factors.
    pub fn all_entries(&self) -> impl Iterator<Item = TableEntry> + '_ {
        (0..(self.n_frames + self.n_shared) as usize).map(|i| self.raw_entry(i))
    }

    fn raw_entry(&self, i: usize) -> TableEntry {
        let o = TABLE_HEAD_LEN + i * TABLE_ENTRY_LEN;
        TableEntry {
            offset: u64_at(self.bytes, o),
            frame_len: u32_at(self.bytes, o + 8),
            raw_len: u32_at(self.bytes, o + 12),
            checksum: u64_at(self.bytes, o + 16),
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = TableEntry> + '_ {
        (0..self.n_frames as usize).map(|i| self.entry(i))
    }
}

/// Encodes footer body + trailer for a shard whose footer starts at `footer_offset`.
/// `tables` are (table_offset, table_len).
pub fn encode_footer(footer_offset: u64, tables: &[(u64, u32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(tables.len() * FOOTER_ENTRY_LEN + TRAILER_LEN);
    for (off, len) in tables {
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    let sum = checksum(&[&b]);
    b.extend_from_slice(&footer_offset.to_le_bytes());
    b.extend_from_slice(&(tables.len() as u64).to_le_bytes());
    b.extend_from_slice(&sum.to_le_bytes());
    b.extend_from_slice(FOOTER_MAGIC);
    b
}

/// The footer of a sealed shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Where the footer body starts (= the end of the last sample table).
    pub offset: u64,
    /// (table_offset, table_len) of every sample table in the shard.
    pub tables: Vec<(u64, u32)>,
}

/// Parses the footer of a whole shard file. `Ok(None)`: the shard is not sealed
/// (no trailer magic at the end).
pub fn parse_footer(file: &[u8]) -> Result<Option<Footer>> {
    let len = file.len();
    if len < SHARD_HEADER_LEN + TRAILER_LEN || &file[len - 8..] != FOOTER_MAGIC {
        return Ok(None);
    }
    let t = len - TRAILER_LEN;
    let footer_offset = u64_at(file, t);
    let n = u64_at(file, t + 8);
    let stored = u64_at(file, t + 16);
    let body_len = n
        .checked_mul(FOOTER_ENTRY_LEN as u64)
        .ok_or(Error::TooLarge {
            what: "footer n_tables",
            value: n,
            limit: (t / FOOTER_ENTRY_LEN) as u64,
        })?;
    if footer_offset < SHARD_HEADER_LEN as u64
        || footer_offset.checked_add(body_len) != Some(t as u64)
    {
        return Err(Error::Invalid {
            what: "shard footer",
            detail: format!(
                "footer at {footer_offset} with {n} entries does not end at the trailer ({t})"
            ),
        });
    }
    let body = &file[footer_offset as usize..t];
    let computed = checksum(&[body]);
    if computed != stored {
        return Err(Error::Checksum {
            what: "shard footer",
            stored,
            computed,
        });
    }
    let tables = body
        .chunks_exact(FOOTER_ENTRY_LEN)
        .map(|c| (u64_at(c, 0), u32_at(c, 8)))
        .collect();
    Ok(Some(Footer {
        offset: footer_offset,
        tables,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_bytes() {
        let h = ShardHeader::new(7, [0xAB; 16]);
        let b = h.encode();
        assert_eq!(&b[..8], b"GRADSHRD"); // magic
        assert_eq!(&b[8..10], &[0x03, 0x00]); // version 3
        assert_eq!(&b[10..12], &[0x40, 0x00]); // header_len 64
        assert_eq!(&b[12..16], &[0x07, 0x00, 0x00, 0x00]); // shard_no 7
        assert_eq!(&b[16..32], &[0xAB; 16]); // store id
        assert_eq!(ShardHeader::parse(&b).unwrap(), h);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = ShardHeader::new(0, [0; 16]).encode();
        b[0] = b'X';
        assert!(matches!(
            ShardHeader::parse(&b),
            Err(Error::BadMagic { .. })
        ));
    }

    #[test]
    fn rejects_unknown_version() {
        let mut b = ShardHeader::new(0, [0; 16]).encode();
        b[8] = 9;
        let sum = checksum(&[&b[..56]]);
        b[56..].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(
            ShardHeader::parse(&b),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
    }

    #[test]
    fn table_round_trip_and_corruption() {
        let entries: Vec<TableEntry> = (0..5)
            .map(|i| TableEntry {
                offset: 64 + i * 100,
                frame_len: 100,
                raw_len: 200,
                checksum: i * 31,
            })
            .collect();
        let t = encode_sample_table(42, &entries, &[]);
        assert_eq!(t.len(), TableView::table_len(5));
        let v = TableView::parse(&t).unwrap();
        assert_eq!(v.seq, 42);
        assert_eq!(v.entries().collect::<Vec<_>>(), entries);
        assert!(!v.is_factored());
        // A factored sample: 3 frame entries, then 2 shared factors.
        let f = encode_sample_table(7, &entries[..3], &entries[3..]);
        let v = TableView::parse(&f).unwrap();
        assert_eq!((v.n_frames, v.n_shared, v.is_factored()), (3, 2, true));
        assert_eq!(v.entries().collect::<Vec<_>>(), entries[..3]);
        assert_eq!(v.shared_entry(1), entries[4]);
        assert_eq!(v.all_entries().collect::<Vec<_>>(), entries);
        let mut bad = t.clone();
        bad[30] ^= 1;
        assert!(matches!(
            TableView::parse(&bad),
            Err(Error::Checksum { .. })
        ));
        assert!(matches!(
            TableView::parse(&t[..t.len() - 1]),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn footer_round_trip() {
        let mut file = ShardHeader::new(0, [1; 16]).encode().to_vec();
        file.extend_from_slice(&[0u8; 100]);
        let off = file.len() as u64;
        file.extend(encode_footer(off, &[(64, 10), (74, 90)]));
        let f = parse_footer(&file).unwrap().unwrap();
        assert_eq!(f.offset, off);
        assert_eq!(f.tables, vec![(64, 10), (74, 90)]);
        // An unsealed shard has no footer.
        assert_eq!(parse_footer(&file[..164]).unwrap(), None);
        // A footer whose offset points past its trailer is rejected.
        let mut bad = file.clone();
        let t0 = bad.len() - TRAILER_LEN;
        bad[t0..t0 + 8].copy_from_slice(&(off + 1).to_le_bytes());
        assert!(parse_footer(&bad).is_err());
    }
}
