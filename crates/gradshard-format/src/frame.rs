//! Frames: one slice (or row group) each, independently decodable.

use gradshard_core::DType;

use crate::error::{Error, Result};
use crate::shuffle::{shuffle, unshuffle_planes};
use crate::{checksum, u32_at, u64_at};

/// Bytes of the frame header.
pub const FRAME_HEADER_LEN: usize = 24;
/// Limit on `raw_len` and `stored_len` of one frame.
pub const MAX_FRAME_BYTES: u64 = 1 << 30;

/// How a frame's payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    /// zstd at a level over the whole (shuffled) payload (docs/design.md §6 measured no
    /// gain above level 1 on gradients).
    Zstd(i32),
    /// Format v3: zstd at a level over the most significant byte plane only (sign and
    /// seven exponent bits); the lower planes (mantissa, near 8 bits of entropy per
    /// byte) are stored as they are. Needs the byte shuffle. Payload: `u32` LE length L
    /// of the zstd frame, the zstd frame (L bytes), then planes `0..size-1`
    /// (`(size-1)·n` bytes). Smaller than `Zstd` on gradients (one entropy table per
    /// plane instead of one for both) and about twice as fast to decode (no Huffman
    /// decoding of the mantissa bytes).
    ZstdExp(i32),
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd(_) => 1,
            Codec::ZstdExp(_) => 2,
        }
    }
}

/// Frame codec code of [`Codec::ZstdExp`].
pub const CODEC_ZSTD_EXP: u8 = 2;

/// What a frame's values are (header byte 3; format v2, always `Full` in v1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A whole slice or row group, `r × c` values in canonical orientation.
    Full,
    /// The per-frame factor P (`n × r`, position-major) of a factored slice: the slice is Pᵀ S.
    Factor,
    /// A shared factor S (`n × c`, position-major), used by several factored slices of a sample.
    Shared,
}

impl FrameKind {
    pub fn code(self) -> u8 {
        match self {
            FrameKind::Full => 0,
            FrameKind::Factor => 1,
            FrameKind::Shared => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<FrameKind> {
        Some(match c {
            0 => FrameKind::Full,
            1 => FrameKind::Factor,
            2 => FrameKind::Shared,
            _ => return None,
        })
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameKind::Full => "full slice",
            FrameKind::Factor => "per-slice factor",
            FrameKind::Shared => "shared factor",
        })
    }
}

/// Limit on a factor's row count n (token positions, stacked over a weight's uses).
pub const MAX_FACTOR_ROWS: u32 = 1 << 24;

/// A parsed, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub codec: u8,
    pub shuffled: bool,
    pub dtype: DType,
    pub raw_len: u32,
    pub stored_len: u32,
    pub checksum: u64,
    pub kind: FrameKind,
    /// Row count n of a factor (`Factor`, `Shared`); 0 for `Full`.
    pub rows: u32,
}

impl FrameHeader {
    /// Total bytes of the frame (header + payload).
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.stored_len as usize
    }
}

/// Parses and validates the 24-byte header at the start of `bytes`.
pub fn parse_frame_header(bytes: &[u8]) -> Result<FrameHeader> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(Error::Truncated {
            what: "frame header",
            need: FRAME_HEADER_LEN as u64,
            have: bytes.len() as u64,
        });
    }
    let codec = bytes[0];
    if codec > CODEC_ZSTD_EXP {
        return Err(Error::Invalid {
            what: "frame codec",
            detail: format!("unknown code {codec}"),
        });
    }
    let filter = bytes[1];
    if filter > 1 {
        return Err(Error::Invalid {
            what: "frame filter",
            detail: format!("unknown code {filter}"),
        });
    }
    if codec == CODEC_ZSTD_EXP && filter != 1 {
        return Err(Error::Invalid {
            what: "frame filter",
            detail: "codec 2 (zstd on the exponent plane) needs filter 1 (byte-shuffle)".into(),
        });
    }
    let dtype = DType::from_code(bytes[2]).ok_or_else(|| Error::Invalid {
        what: "frame dtype",
        detail: format!("unknown code {}", bytes[2]),
    })?;
    let kind = FrameKind::from_code(bytes[3]).ok_or_else(|| Error::Invalid {
        what: "frame kind",
        detail: format!("unknown code {}", bytes[3]),
    })?;
    let rows = u32_at(bytes, 12);
    match kind {
        FrameKind::Full if rows != 0 => {
            return Err(Error::Invalid {
                what: "frame header",
                detail: format!("a full frame records {rows} factor rows (must be 0)"),
            })
        }
        FrameKind::Factor | FrameKind::Shared if rows == 0 || rows > MAX_FACTOR_ROWS => {
            return Err(Error::Invalid {
                what: "frame header",
                detail: format!("{kind} with {rows} rows (1..={MAX_FACTOR_ROWS} allowed)"),
            })
        }
        _ => {}
    }
    let raw_len = u32_at(bytes, 4);
    let stored_len = u32_at(bytes, 8);
    for (what, v) in [("frame raw_len", raw_len), ("frame stored_len", stored_len)] {
        if v as u64 > MAX_FRAME_BYTES {
            return Err(Error::TooLarge {
                what,
                value: v as u64,
                limit: MAX_FRAME_BYTES,
            });
        }
    }
    if !(raw_len as usize).is_multiple_of(dtype.size()) {
        return Err(Error::Invalid {
            what: "frame raw_len",
            detail: format!("{raw_len} is not a multiple of the {dtype} size"),
        });
    }
    if rows > 0 && !(raw_len as usize).is_multiple_of(rows as usize * dtype.size()) {
        return Err(Error::Invalid {
            what: "frame raw_len",
            detail: format!("{raw_len} bytes do not hold {rows} whole rows of {dtype}"),
        });
    }
    if codec == 0 && stored_len != raw_len {
        return Err(Error::Invalid {
            what: "frame stored_len",
            detail: format!("uncompressed frame has stored_len {stored_len} ≠ raw_len {raw_len}"),
        });
    }
    Ok(FrameHeader {
        codec,
        shuffled: filter == 1,
        dtype,
        raw_len,
        stored_len,
        checksum: u64_at(bytes, 16),
        kind,
        rows,
    })
}

/// Reusable frame encoder: owns the zstd context and scratch buffers (one per worker thread).
pub struct Encoder {
    codec: Codec,
    shuffle: bool,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new(codec: Codec, shuffle: bool) -> Result<Encoder> {
        if matches!(codec, Codec::ZstdExp(_)) && !shuffle {
            return Err(Error::Invalid {
                what: "codec",
                detail: "zstd-exp (zstd on the exponent plane) needs the byte shuffle".into(),
            });
        }
        let zerr = |e: std::io::Error| Error::Zstd(e.to_string());
        let zstd = match codec {
            Codec::Zstd(level) => Some(zstd::bulk::Compressor::new(level).map_err(zerr)?),
            Codec::ZstdExp(level) => {
                // An exponent plane has few repeats worth a match: with matches of at
                // least 7 bytes and a 64-entry hash table zstd codes it almost entirely
                // as Huffman literals, which is both smaller and faster to decode than
                // level 1's short matches (docs/format.md, "Codecs": 2.79× → 2.99× and
                // 0.68 → 1.07 GB/s decoding on a LLaMA's exponent planes).
                let mut c = zstd::bulk::Compressor::new(level).map_err(zerr)?;
                c.set_parameter(zstd::zstd_safe::CParameter::MinMatch(7))
                    .map_err(zerr)?;
                c.set_parameter(zstd::zstd_safe::CParameter::HashLog(6))
                    .map_err(zerr)?;
                Some(c)
            }
            Codec::None => None,
        };
        Ok(Encoder {
            codec,
            shuffle,
            zstd,
            scratch: Vec::new(),
        })
    }

    /// Encodes `raw` (little-endian elements of `dtype`) into a complete full-slice frame
    /// written to `out` (cleared first). Returns the frame header.
    pub fn encode(&mut self, dtype: DType, raw: &[u8], out: &mut Vec<u8>) -> Result<FrameHeader> {
        self.encode_kind(dtype, FrameKind::Full, 0, raw, out)
    }

    /// Like [`encode`](Self::encode) for any [`FrameKind`]; `rows` is the factor's row
    /// count n (0 for a full frame).
    pub fn encode_kind(
        &mut self,
        dtype: DType,
        kind: FrameKind,
        rows: u32,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<FrameHeader> {
        let rows_ok = match kind {
            FrameKind::Full => rows == 0,
            _ => {
                rows > 0
                    && rows <= MAX_FACTOR_ROWS
                    && raw.len().is_multiple_of(rows as usize * dtype.size())
            }
        };
        if !rows_ok {
            return Err(Error::Invalid {
                what: "frame rows",
                detail: format!("{kind} with {rows} rows and {} bytes", raw.len()),
            });
        }
        if raw.len() as u64 > MAX_FRAME_BYTES {
            return Err(Error::TooLarge {
                what: "frame raw_len",
                value: raw.len() as u64,
                limit: MAX_FRAME_BYTES,
            });
        }
        if !raw.len().is_multiple_of(dtype.size()) {
            return Err(Error::Invalid {
                what: "frame raw_len",
                detail: format!("{} is not a multiple of the {dtype} size", raw.len()),
            });
        }
        let payload_src: &[u8] = if self.shuffle {
            shuffle(raw, dtype.size(), &mut self.scratch);
            &self.scratch
        } else {
            raw
        };
        out.clear();
        out.resize(FRAME_HEADER_LEN, 0);
        match (&mut self.zstd, self.codec) {
            (Some(c), Codec::Zstd(_)) => compress_into(c, payload_src, out)?,
            (Some(c), Codec::ZstdExp(_)) => {
                // The shuffle put the most significant byte of every element last.
                let low = payload_src.len() - payload_src.len() / dtype.size();
                let (mantissa, top) = payload_src.split_at(low);
                out.extend_from_slice(&[0; 4]);
                compress_into(c, top, out)?;
                let zlen = (out.len() - FRAME_HEADER_LEN - 4) as u32;
                out[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4].copy_from_slice(&zlen.to_le_bytes());
                out.extend_from_slice(mantissa);
            }
            _ => out.extend_from_slice(payload_src),
        }
        let stored_len = (out.len() - FRAME_HEADER_LEN) as u32;
        out[0] = self.codec.code();
        out[1] = u8::from(self.shuffle);
        out[2] = dtype.code();
        out[3] = kind.code();
        out[4..8].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        out[8..12].copy_from_slice(&stored_len.to_le_bytes());
        out[12..16].copy_from_slice(&rows.to_le_bytes());
        let sum = checksum(&[&out[..16], &out[FRAME_HEADER_LEN..]]);
        out[16..24].copy_from_slice(&sum.to_le_bytes());
        Ok(FrameHeader {
            codec: self.codec.code(),
            shuffled: self.shuffle,
            dtype,
            raw_len: raw.len() as u32,
            stored_len,
            checksum: sum,
            kind,
            rows,
        })
    }
}

/// Appends the zstd frame of `src` to `out`.
fn compress_into(
    c: &mut zstd::bulk::Compressor<'static>,
    src: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let bound = zstd::zstd_safe::compress_bound(src.len());
    let start = out.len();
    out.resize(start + bound, 0);
    let n = c
        .compress_to_buffer(src, &mut out[start..])
        .map_err(|e| Error::Zstd(e.to_string()))?;
    out.truncate(start + n);
    Ok(())
}

/// One-shot encode (allocates a fresh context).
pub fn encode_frame(codec: Codec, shuffle: bool, dtype: DType, raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    Encoder::new(codec, shuffle)?.encode(dtype, raw, &mut out)?;
    Ok(out)
}

/// Verifies one whole frame (`bytes` must be exactly the frame): header, length and
/// checksum (and the sample table's copy of it, `expected_checksum`, if the caller has
/// one). Returns the header and the still-encoded payload for [`decode_payload`] or
/// [`decode_payload_f32`]; nothing is allocated.
pub fn verify_frame(bytes: &[u8], expected_checksum: Option<u64>) -> Result<(FrameHeader, &[u8])> {
    let h = parse_frame_header(bytes)?;
    let need = h.frame_len();
    if bytes.len() < need {
        return Err(Error::Truncated {
            what: "frame payload",
            need: need as u64,
            have: bytes.len() as u64,
        });
    }
    if bytes.len() > need {
        return Err(Error::TrailingBytes {
            what: "frame",
            extra: (bytes.len() - need) as u64,
        });
    }
    let payload = &bytes[FRAME_HEADER_LEN..];
    let computed = checksum(&[&bytes[..16], payload]);
    if computed != h.checksum {
        return Err(Error::Checksum {
            what: "frame",
            stored: h.checksum,
            computed,
        });
    }
    if let Some(e) = expected_checksum {
        if e != h.checksum {
            return Err(Error::Checksum {
                what: "frame (against its sample-table entry)",
                stored: e,
                computed: h.checksum,
            });
        }
    }
    Ok((h, payload))
}

/// Checks that the zstd frame `src` states `raw_len` as its content size, before any
/// buffer of that size exists (a crafted header could otherwise ask for 1 GiB behind a
/// few bytes of payload).
fn check_zstd_size(src: &[u8], raw_len: usize) -> Result<()> {
    match zstd::zstd_safe::get_frame_content_size(src) {
        Ok(Some(n)) if n == raw_len as u64 => Ok(()),
        Ok(found) => Err(Error::Invalid {
            what: "frame payload",
            detail: format!(
                "zstd frame states {} bytes, header says {raw_len}",
                found.map_or("no content size".into(), |n| n.to_string())
            ),
        }),
        Err(_) => Err(Error::Invalid {
            what: "frame payload",
            detail: "not a zstd frame".into(),
        }),
    }
}

/// Runs `f` with this thread's zstd decompression context: a factored sample is many
/// small frames, and creating a context per frame cost more than decoding some of them.
fn with_dctx(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<usize>,
) -> Result<usize> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Decompressor::new()?);
        }
        f(c.as_mut().expect("set above"))
    })
    .map_err(|e| Error::Zstd(e.to_string()))
}

/// The error of a zstd frame that decompressed to another size than its header says.
fn zstd_size_error(n: usize, raw_len: usize) -> Error {
    Error::Invalid {
        what: "frame payload",
        detail: format!("decompressed to {n} bytes, header says {raw_len}"),
    }
}

/// zstd-decompresses `src` into `buf` (cleared and reused), which must come to exactly
/// `raw_len` bytes (checked before `raw_len` is allocated, see [`check_zstd_size`]).
fn unzstd<'a>(src: &[u8], raw_len: usize, buf: &'a mut Vec<u8>) -> Result<&'a [u8]> {
    check_zstd_size(src, raw_len)?;
    buf.clear();
    buf.reserve(raw_len);
    let n = with_dctx(|d| d.decompress_to_buffer(src, &mut *buf))?;
    if n != raw_len || buf.len() != raw_len {
        return Err(zstd_size_error(n, raw_len));
    }
    Ok(&buf[..])
}

/// zstd-decompresses `src` straight into `dst`, which it must fill exactly.
fn unzstd_into(src: &[u8], dst: &mut [u8]) -> Result<()> {
    check_zstd_size(src, dst.len())?;
    let n = with_dctx(|d| d.decompress_to_buffer(src, dst))?;
    if n != dst.len() {
        return Err(zstd_size_error(n, dst.len()));
    }
    Ok(())
}

/// The byte planes of a verified, shuffled frame with its codec undone: the lower
/// planes `0..size-1` (concatenated) and the most significant plane. `buf` is scratch
/// for decompressed bytes (reused across calls).
fn planes<'a>(
    h: &FrameHeader,
    payload: &'a [u8],
    buf: &'a mut Vec<u8>,
) -> Result<(&'a [u8], &'a [u8])> {
    debug_assert!(h.shuffled);
    let raw_len = h.raw_len as usize;
    let n = raw_len / h.dtype.size();
    if h.codec != CODEC_ZSTD_EXP {
        return Ok(decompressed(h, payload, buf)?.split_at(raw_len - n));
    }
    let (z, low) = exp_parts(h, payload)?;
    let top = unzstd(z, n, buf)?;
    Ok((low, top))
}

/// A codec-2 payload's two parts: the zstd frame of the most significant plane and the
/// lower planes stored raw (lengths checked against the header).
fn exp_parts<'a>(h: &FrameHeader, payload: &'a [u8]) -> Result<(&'a [u8], &'a [u8])> {
    let raw_len = h.raw_len as usize;
    let n = raw_len / h.dtype.size();
    let bad = |detail: String| Error::Invalid {
        what: "frame payload",
        detail,
    };
    if payload.len() < 4 {
        return Err(bad(format!(
            "{} bytes, too short for codec 2",
            payload.len()
        )));
    }
    let zlen = u32_at(payload, 0) as usize;
    let rest = &payload[4..];
    if zlen > rest.len() || rest.len() - zlen != raw_len - n {
        return Err(bad(format!(
            "codec 2: zstd part of {zlen} bytes and {} bytes after it, expected {} raw mantissa bytes",
            rest.len().saturating_sub(zlen),
            raw_len - n
        )));
    }
    Ok(rest.split_at(zlen))
}

/// The payload of a verified frame of codec 0 or 1 with its codec undone (its filter
/// not): the payload itself when stored uncompressed, otherwise zstd-decompressed into
/// `buf` (cleared and reused; grown to `raw_len` only after the zstd frame confirmed
/// that size).
fn decompressed<'a>(h: &FrameHeader, payload: &'a [u8], buf: &'a mut Vec<u8>) -> Result<&'a [u8]> {
    match h.codec {
        0 => Ok(payload),
        1 => unzstd(payload, h.raw_len as usize, buf),
        c => Err(Error::Invalid {
            what: "frame codec",
            detail: format!("code {c} is not a whole-payload codec"),
        }),
    }
}

/// Decodes the payload of a frame checked by [`verify_frame`] into its raw
/// little-endian element bytes in `out` (cleared first). `buf` is scratch for the
/// decompressed bytes (reused across calls).
pub fn decode_payload(
    h: &FrameHeader,
    payload: &[u8],
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<()> {
    if h.shuffled {
        let (low, top) = planes(h, payload, buf)?;
        unshuffle_planes(low, top, h.dtype.size(), out);
    } else {
        let decoded = decompressed(h, payload, buf)?;
        out.clear();
        out.extend_from_slice(decoded);
    }
    Ok(())
}

/// Decodes the payload of a frame checked by [`verify_frame`] straight into f32 values:
/// `out.len()` must be the frame's element count (`raw_len / dtype size`). zstd
/// decompresses into `buf` (scratch, reused across calls); undoing the byte shuffle and
/// widening bf16 to f32 is then one pass writing `out`, with no other buffer.
pub fn decode_payload_f32(
    h: &FrameHeader,
    payload: &[u8],
    buf: &mut Vec<u8>,
    out: &mut [f32],
) -> Result<()> {
    let size = h.dtype.size();
    let n = h.raw_len as usize / size;
    if out.len() != n {
        return Err(Error::Invalid {
            what: "frame",
            detail: format!(
                "holds {n} values of {}, the destination {}",
                h.dtype,
                out.len()
            ),
        });
    }
    if h.shuffled {
        let (low, top) = planes(h, payload, buf)?;
        debug_assert_eq!(low.len() + top.len(), n * size);
        match h.dtype {
            DType::Bf16 => widen_bf16(low, top, out),
            DType::F32 => {
                let (b0, rest) = low.split_at(n);
                let (b1, b2) = rest.split_at(n);
                for ((((o, &a), &b), &c), &d) in out.iter_mut().zip(b0).zip(b1).zip(b2).zip(top) {
                    *o = f32::from_le_bytes([a, b, c, d]);
                }
            }
        }
        return Ok(());
    }
    let src = decompressed(h, payload, buf)?;
    debug_assert_eq!(src.len(), n * size);
    match h.dtype {
        DType::Bf16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    Ok(())
}

/// Decodes the payload of a bf16 frame checked by [`verify_frame`] into the two byte
/// planes of its values: `out[..n]` the low bytes, `out[n..]` the high bytes (sign,
/// exponent, top mantissa bit) of the n values, `out.len() == 2n`. For a shuffled frame
/// (the default) the planes are what the frame stores: zstd decompresses straight into
/// `out` (codec 2 adds one copy of its raw low plane), with no per-value work;
/// [`widen_bf16`] turns any range of them into f32.
pub fn decode_payload_bf16_planes(
    h: &FrameHeader,
    payload: &[u8],
    buf: &mut Vec<u8>,
    out: &mut [u8],
) -> Result<()> {
    let n = h.raw_len as usize / 2;
    if h.dtype != DType::Bf16 || out.len() != 2 * n {
        return Err(Error::Invalid {
            what: "frame",
            detail: format!(
                "holds {} bytes of {}; bf16 byte planes of {} bytes were asked for",
                h.raw_len,
                h.dtype,
                out.len()
            ),
        });
    }
    if h.shuffled {
        // The planes are decompressed (or copied) straight into `out`.
        match h.codec {
            CODEC_ZSTD_EXP => {
                let (z, low) = exp_parts(h, payload)?;
                let (lo, hi) = out.split_at_mut(n);
                lo.copy_from_slice(low);
                unzstd_into(z, hi)?;
            }
            1 => unzstd_into(payload, out)?,
            _ => {
                let src = decompressed(h, payload, buf)?;
                if src.len() != out.len() {
                    return Err(Error::Invalid {
                        what: "frame payload",
                        detail: format!("{} bytes, header says {}", src.len(), out.len()),
                    });
                }
                out.copy_from_slice(src);
            }
        }
    } else {
        let (lo, hi) = out.split_at_mut(n);
        let src = decompressed(h, payload, buf)?;
        for ((l, t), c) in lo.iter_mut().zip(hi.iter_mut()).zip(src.chunks_exact(2)) {
            *l = c[0];
            *t = c[1];
        }
    }
    Ok(())
}

/// `out[i]` = the bf16 value with low byte `low[i]` and high byte `top[i]`, as f32
/// (exact); 8 values per AVX2 instruction where the CPU has it.
pub fn widen_bf16(low: &[u8], top: &[u8], out: &mut [f32]) {
    #[inline(always)]
    fn body(low: &[u8], top: &[u8], out: &mut [f32]) {
        for ((o, &l), &h) in out.iter_mut().zip(low).zip(top) {
            *o = f32::from_bits(((h as u32) << 24) | ((l as u32) << 16));
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(low: &[u8], top: &[u8], out: &mut [f32]) {
            body(low, top, out)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { avx2(low, top, out) };
        }
    }
    body(low, top, out)
}

/// Verifies and decodes one whole frame (`bytes` must be exactly the frame) into its
/// raw little-endian element bytes in `out` (cleared first). `expected_checksum` is the
/// copy from the sample table, if the caller has one.
pub fn decode_frame(
    bytes: &[u8],
    expected_checksum: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<FrameHeader> {
    let (h, payload) = verify_frame(bytes, expected_checksum)?;
    decode_payload(&h, payload, &mut Vec::new(), out)?;
    Ok(h)
}

#[cfg(test)]
mod tests;
