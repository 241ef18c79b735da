//! The commit log `samples.log`: one checksummed record per committed sample.

use gradshard_core::{SampleId, TaskName};

use crate::error::{Error, Result};
use crate::{check_file_prefix, checksum, u16_at, u32_at, u64_at, FORMAT_VERSION};

/// File header: magic + version + 6 reserved bytes.
pub const LOG_HEADER_LEN: usize = 16;
const LOG_MAGIC: &[u8; 8] = b"GSLOG001";
/// Limit on one record body.
pub const MAX_RECORD_BODY: u32 = 64 * 1024;
const RECORD_HEAD: usize = 12;

/// The encoded file header of a new log.
pub const LOG_HEADER: [u8; LOG_HEADER_LEN] = {
    let mut b = [0u8; LOG_HEADER_LEN];
    let mut i = 0;
    while i < 8 {
        b[i] = LOG_MAGIC[i];
        i += 1;
    }
    let v = FORMAT_VERSION.to_le_bytes();
    b[8] = v[0];
    b[9] = v[1];
    b
};

/// One committed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub seq: u64,
    pub shard: u32,
    pub table_offset: u64,
    pub table_len: u32,
    /// T: predicted positions that count.
    pub tokens: u32,
    /// Sum of the token cross-entropies (nats).
    pub loss_sum: f64,
    pub task: TaskName,
    pub id: SampleId,
}

/// Encodes one record (length, checksum, body).
pub fn encode_log_record(r: &LogRecord) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&r.seq.to_le_bytes());
    body.extend_from_slice(&r.shard.to_le_bytes());
    body.extend_from_slice(&r.table_offset.to_le_bytes());
    body.extend_from_slice(&r.table_len.to_le_bytes());
    body.extend_from_slice(&r.tokens.to_le_bytes());
    body.extend_from_slice(&r.loss_sum.to_le_bytes());
    let task = r.task.as_str().as_bytes();
    body.extend_from_slice(&(task.len() as u16).to_le_bytes());
    body.extend_from_slice(task);
    match &r.id {
        SampleId::Int(v) => {
            body.push(0);
            body.extend_from_slice(&v.to_le_bytes());
        }
        SampleId::Str(s) => {
            body.push(1);
            body.extend_from_slice(&(s.len() as u16).to_le_bytes());
            body.extend_from_slice(s.as_bytes());
        }
    }
    let mut out = Vec::with_capacity(RECORD_HEAD + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&[&body]).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn invalid(detail: String) -> Error {
    Error::Invalid {
        what: "log record",
        detail,
    }
}

fn decode_body(b: &[u8]) -> Result<LogRecord> {
    let need = |n: usize| -> Result<()> {
        if b.len() < n {
            Err(Error::Truncated {
                what: "log record body",
                need: n as u64,
                have: b.len() as u64,
            })
        } else {
            Ok(())
        }
    };
    need(38)?;
    let task_len = u16_at(b, 36) as usize;
    need(38 + task_len + 1)?;
    let task_str = std::str::from_utf8(&b[38..38 + task_len])
        .map_err(|_| invalid("task name is not UTF-8".into()))?;
    let task = TaskName::new(task_str).map_err(|e| invalid(e.to_string()))?;
    let mut p = 38 + task_len;
    let kind = b[p];
    p += 1;
    let id = match kind {
        0 => {
            need(p + 8)?;
            p += 8;
            SampleId::Int(i64::from_le_bytes(b[p - 8..p].try_into().expect("8")))
        }
        1 => {
            need(p + 2)?;
            let l = u16_at(b, p) as usize;
            p += 2;
            need(p + l)?;
            let s = std::str::from_utf8(&b[p..p + l])
                .map_err(|_| invalid("sample id is not UTF-8".into()))?;
            p += l;
            SampleId::string(s).map_err(|e| invalid(e.to_string()))?
        }
        k => return Err(invalid(format!("unknown sample id kind {k}"))),
    };
    if p != b.len() {
        return Err(Error::TrailingBytes {
            what: "log record body",
            extra: (b.len() - p) as u64,
        });
    }
    Ok(LogRecord {
        seq: u64_at(b, 0),
        shard: u32_at(b, 8),
        table_offset: u64_at(b, 12),
        table_len: u32_at(b, 20),
        tokens: u32_at(b, 24),
        loss_sum: f64::from_le_bytes(b[28..36].try_into().expect("8")),
        task,
        id,
    })
}

/// Decodes the one record at the start of `bytes` (length, checksum, body); returns it
/// and its encoded length. Used for the copy of each sample's record that the writer
/// puts right after the sample's table in its shard (docs/format.md), which lets
/// `salvage` re-admit samples whose log records were lost.
pub fn decode_log_record(bytes: &[u8]) -> Result<(LogRecord, usize)> {
    if bytes.len() < RECORD_HEAD {
        return Err(Error::Truncated {
            what: "log record",
            need: RECORD_HEAD as u64,
            have: bytes.len() as u64,
        });
    }
    let len = u32_at(bytes, 0);
    if len > MAX_RECORD_BODY {
        return Err(Error::TooLarge {
            what: "log record body",
            value: len as u64,
            limit: MAX_RECORD_BODY as u64,
        });
    }
    let end = RECORD_HEAD + len as usize;
    if end > bytes.len() {
        return Err(Error::Truncated {
            what: "log record",
            need: end as u64,
            have: bytes.len() as u64,
        });
    }
    let body = &bytes[RECORD_HEAD..end];
    let stored = u64_at(bytes, 4);
    let computed = checksum(&[body]);
    if stored != computed {
        return Err(Error::Checksum {
            what: "log record",
            stored,
            computed,
        });
    }
    Ok((decode_body(body)?, end))
}

/// Result of scanning a whole log file.
#[derive(Debug)]
pub struct LogScan {
    pub records: Vec<LogRecord>,
    /// Byte length of the valid prefix (header + whole good records).
    pub valid_len: u64,
    /// Bytes after the valid prefix that form a torn (incomplete or unchecksummed) last record.
    pub torn_tail: u64,
}

/// Decodes a whole log. A bad record that reaches the end of the file is a torn
/// tail (reported in [`LogScan::torn_tail`], not an error); a bad record followed
/// by more bytes is corruption (an error naming its offset).
pub fn decode_log(bytes: &[u8]) -> Result<LogScan> {
    check_file_prefix(bytes, "log header", LOG_HEADER_LEN, LOG_MAGIC)?;
    let mut records = Vec::new();
    let mut p = LOG_HEADER_LEN;
    while p < bytes.len() {
        let rest = &bytes[p..];
        let torn = |records| {
            Ok(LogScan {
                records,
                valid_len: p as u64,
                torn_tail: rest.len() as u64,
            })
        };
        // A short remainder, or an all-zero one (a file extended before its data reached
        // the disk), is what a crash during the last append leaves behind.
        if rest.len() < RECORD_HEAD || rest.iter().all(|b| *b == 0) {
            return torn(records);
        }
        // A record that fails and reaches the end of the file is a torn write; one that
        // fails with more bytes after it is corruption.
        let ends_file = RECORD_HEAD as u64 + u32_at(rest, 0) as u64 >= rest.len() as u64;
        match decode_log_record(rest) {
            Ok((r, n)) => {
                records.push(r);
                p += n;
            }
            // (A body that passed its checksum but does not parse is corruption, below.)
            Err(Error::Truncated {
                what: "log record", ..
            }) => return torn(records),
            Err(Error::TooLarge { value, .. }) => {
                return Err(Error::Invalid {
                    what: "log record",
                    detail: format!(
                        "record at offset {p} claims {value} bytes; file has {} left",
                        rest.len()
                    ),
                })
            }
            Err(Error::Checksum { .. }) if ends_file => return torn(records),
            Err(Error::Checksum {
                stored, computed, ..
            }) => {
                return Err(Error::Checksum {
                    what: "log record (not at the tail: corruption, not a torn write)",
                    stored,
                    computed,
                })
            }
            Err(e) => {
                return Err(Error::Invalid {
                    what: "log record",
                    detail: format!("at offset {p}: {e}"),
                })
            }
        }
    }
    Ok(LogScan {
        records,
        valid_len: p as u64,
        torn_tail: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, id: SampleId) -> LogRecord {
        LogRecord {
            seq,
            shard: 3,
            table_offset: 1000 + seq,
            table_len: 56,
            tokens: 11,
            loss_sum: 44.5,
            task: TaskName::new("math_v2").unwrap(),
            id,
        }
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let mut log = LOG_HEADER.to_vec();
        let a = rec(0, SampleId::Int(-5));
        let b = rec(1, SampleId::Str("q_17".into()));
        log.extend(encode_log_record(&a));
        log.extend(encode_log_record(&b));
        let s = decode_log(&log).unwrap();
        assert_eq!(s.records, vec![a.clone(), b.clone()]);
        assert_eq!(s.torn_tail, 0);
        // Any cut inside the last record is a torn tail.
        let full = log.len();
        let last_len = encode_log_record(&b).len();
        for cut in (full - last_len + 1)..full {
            let s = decode_log(&log[..cut]).unwrap();
            assert_eq!(s.records, vec![a.clone()]);
            assert_eq!(s.valid_len as usize, full - last_len);
        }
    }

    #[test]
    fn corruption_before_the_tail_is_an_error() {
        let mut log = LOG_HEADER.to_vec();
        log.extend(encode_log_record(&rec(0, SampleId::Int(1))));
        log.extend(encode_log_record(&rec(1, SampleId::Int(2))));
        log[LOG_HEADER_LEN + 14] ^= 0x40;
        assert!(decode_log(&log).is_err());
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let mut log = LOG_HEADER.to_vec();
        log.extend(encode_log_record(&rec(0, SampleId::Int(1))));
        let good = log.len();
        log.extend([0u8; 100]);
        let s = decode_log(&log).unwrap();
        assert_eq!(
            (s.records.len(), s.valid_len as usize, s.torn_tail),
            (1, good, 100)
        );
    }

    #[test]
    fn rejects_bad_magic() {
        let mut log = LOG_HEADER.to_vec();
        log[0] = b'X';
        assert!(matches!(decode_log(&log), Err(Error::BadMagic { .. })));
    }
}
