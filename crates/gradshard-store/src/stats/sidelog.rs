//! The side log `stats/samples.bin`: each sample's sums, appended before the sample
//! commits, read back (up to its first torn or damaged record) when statistics are
//! rebuilt.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gradshard_core::{SampleId, TaskName};
use gradshard_format::LogRecord;

use super::{stats_dir, SIDE_HEADER_LEN, SIDE_LOG, SIDE_MAGIC};
use crate::error::{io, Error, Result};
use crate::fsutil;

fn encode_id(id: &SampleId, out: &mut Vec<u8>) {
    match id {
        SampleId::Int(v) => {
            out.push(0);
            out.extend_from_slice(&v.to_le_bytes());
        }
        SampleId::Str(s) => {
            out.push(1);
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// XXH3-64 (hex) of the ids of `recs`, in order.
pub fn ids_digest(recs: &[LogRecord]) -> String {
    let mut b = Vec::new();
    for r in recs {
        encode_id(&r.id, &mut b);
    }
    format!("{:016x}", gradshard_format::checksum(&[&b]))
}

/// The side log `stats/samples.bin` (format in docs/format.md).
pub struct SideLog {
    path: PathBuf,
    file: File,
    n_values: usize,
    /// Last valid record of each sample: (offset of its values, tokens).
    records: HashMap<(TaskName, SampleId), (u64, u32)>,
    end: u64,
    tail: SideLogTail,
}

/// What followed the side log's last good record when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideLogTail {
    /// Nothing: every record read.
    Whole,
    /// A record cut short by the end of the file (a writer killed mid-append):
    /// `bytes` bytes from offset `at`.
    Torn { at: u64, bytes: u64 },
    /// A whole record that fails its checksum or does not parse (the file was edited
    /// or damaged): it and everything after it, `bytes` bytes from offset `at`, are
    /// not used.
    Damaged { at: u64, bytes: u64 },
}

fn parse_body(b: &[u8]) -> Option<(TaskName, SampleId, u32, u32, usize)> {
    let mut p = 0usize;
    let take = |p: &mut usize, n: usize| -> Option<&[u8]> {
        let s = b.get(*p..*p + n)?;
        *p += n;
        Some(s)
    };
    let tl = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?) as usize;
    let task = TaskName::new(std::str::from_utf8(take(&mut p, tl)?).ok()?).ok()?;
    let id = match take(&mut p, 1)?[0] {
        0 => SampleId::Int(i64::from_le_bytes(take(&mut p, 8)?.try_into().ok()?)),
        1 => {
            let l = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?) as usize;
            SampleId::Str(std::str::from_utf8(take(&mut p, l)?).ok()?.to_string())
        }
        _ => return None,
    };
    let tokens = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?);
    let n = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?);
    if b.len() != p + 8 * n as usize {
        return None;
    }
    Some((task, id, tokens, n, p))
}

impl SideLog {
    /// Opens (creating it when `writable`) the side log of `store`. Records are
    /// read up to the first one that is torn or fails its checksum; with
    /// `writable` the file is cut there, so appends continue after the last good
    /// record (what follows it is recomputed from the store when needed).
    pub fn open(store: &Path, n_values: usize, writable: bool) -> Result<SideLog> {
        let dir = stats_dir(store);
        let path = dir.join(SIDE_LOG);
        if writable && !path.exists() {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let mut h = SIDE_MAGIC.to_vec();
            h.extend_from_slice(&(n_values as u64).to_le_bytes());
            fsutil::write_atomic(&path, &h)?;
        }
        let file = match OpenOptions::new().read(true).write(writable).open(&path) {
            Ok(f) => f,
            Err(e) if !writable && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SideLog {
                    path,
                    file: File::open("/dev/null").map_err(io("/dev/null"))?,
                    n_values,
                    records: HashMap::new(),
                    end: 0,
                    tail: SideLogTail::Whole,
                })
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let bad = |what: String| Error::Stats {
            path: path.clone(),
            what,
        };
        let len = file.metadata().map_err(io(&path))?.len();
        let mut r = BufReader::with_capacity(1 << 20, &file);
        let mut head = [0u8; 16];
        r.read_exact(&mut head)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        if &head[..8] != SIDE_MAGIC {
            return Err(bad("not a gradshard statistics side log".into()));
        }
        let nv = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")) as usize;
        if nv != n_values {
            return Err(bad(format!(
                "records hold {nv} values, the store's statistics layout has {n_values}"
            )));
        }
        let mut records = HashMap::new();
        let mut pos = SIDE_HEADER_LEN;
        let mut body = Vec::new();
        // A record whose bytes run past the end of the file was torn by a killed
        // writer; one that is whole but fails its checksum or does not parse is damage.
        let mut damaged = false;
        loop {
            let mut h = [0u8; 12];
            if pos + 12 > len || r.read_exact(&mut h).is_err() {
                break;
            }
            let blen = u32::from_le_bytes(h[..4].try_into().expect("4")) as u64;
            let sum = u64::from_le_bytes(h[4..].try_into().expect("8"));
            if pos + 12 + blen > len {
                break;
            }
            body.resize(blen as usize, 0);
            if r.read_exact(&mut body).is_err() || gradshard_format::checksum(&[&body]) != sum {
                damaged = true;
                break;
            }
            let Some((task, id, tokens, n, voff)) = parse_body(&body) else {
                damaged = true;
                break;
            };
            if n as usize != n_values {
                return Err(bad(format!(
                    "a record of task `{task}` sample {id} holds {n} values, expected {n_values}"
                )));
            }
            records.insert((task, id), (pos + 12 + voff as u64, tokens));
            pos += 12 + blen;
        }
        let tail = match (pos < len, damaged) {
            (false, _) => SideLogTail::Whole,
            (true, false) => SideLogTail::Torn {
                at: pos,
                bytes: len - pos,
            },
            (true, true) => SideLogTail::Damaged {
                at: pos,
                bytes: len - pos,
            },
        };
        if writable && pos < len {
            tracing::warn!(
                "{}: cutting {} bytes of torn or damaged records",
                path.display(),
                len - pos
            );
            file.set_len(pos).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        drop(r);
        Ok(SideLog {
            path,
            file,
            n_values,
            records,
            end: pos,
            tail,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What followed the last good record at open (with `writable`, what was cut).
    pub fn tail(&self) -> SideLogTail {
        self.tail
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends one sample's sums (not fsynced: a lost record is recomputed from the store).
    pub fn append(
        &mut self,
        task: &TaskName,
        id: &SampleId,
        tokens: u32,
        sums: &[f64],
    ) -> Result<()> {
        debug_assert_eq!(sums.len(), self.n_values);
        let mut body = Vec::with_capacity(32 + 8 * sums.len());
        body.extend_from_slice(&(task.as_str().len() as u16).to_le_bytes());
        body.extend_from_slice(task.as_str().as_bytes());
        encode_id(id, &mut body);
        body.extend_from_slice(&tokens.to_le_bytes());
        body.extend_from_slice(&(sums.len() as u32).to_le_bytes());
        let voff = body.len() as u64;
        for s in sums {
            body.extend_from_slice(&s.to_le_bytes());
        }
        let mut rec = Vec::with_capacity(12 + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(&gradshard_format::checksum(&[&body]).to_le_bytes());
        rec.extend_from_slice(&body);
        self.file
            .seek(SeekFrom::Start(self.end))
            .map_err(io(&self.path))?;
        self.file.write_all(&rec).map_err(io(&self.path))?;
        self.records
            .insert((task.clone(), id.clone()), (self.end + 12 + voff, tokens));
        self.end += rec.len() as u64;
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io(&self.path))
    }

    /// The recorded sums of a sample whose T matches, if any.
    pub fn get(&self, task: &TaskName, id: &SampleId, tokens: u32) -> Result<Option<Vec<f64>>> {
        let Some(&(off, t)) = self.records.get(&(task.clone(), id.clone())) else {
            return Ok(None);
        };
        if t != tokens {
            return Ok(None);
        }
        let mut b = vec![0u8; 8 * self.n_values];
        let mut f = &self.file;
        f.seek(SeekFrom::Start(off)).map_err(io(&self.path))?;
        f.read_exact(&mut b).map_err(io(&self.path))?;
        Ok(Some(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ))
    }
}

