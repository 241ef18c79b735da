use super::*;

fn sample_bytes(n: usize) -> Vec<u8> {
    let vals: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-3).collect();
    let mut b = Vec::new();
    DType::Bf16.encode_into(&vals, &mut b);
    b
}

#[test]
fn header_bytes_spelled_out() {
    let raw = [0x01u8, 0x02, 0x03, 0x04];
    let f = encode_frame(Codec::None, false, DType::Bf16, &raw).unwrap();
    assert_eq!(
        &f[..16],
        &[
            0x00, // codec none
            0x00, // filter none
            0x01, // dtype bf16
            0x00, // reserved
            0x04, 0x00, 0x00, 0x00, // raw_len 4
            0x04, 0x00, 0x00, 0x00, // stored_len 4
            0x00, 0x00, 0x00, 0x00, // reserved
        ]
    );
    assert_eq!(&f[24..], &raw);
    assert_eq!(u64_at(&f, 16), checksum(&[&f[..16], &raw]));
}

#[test]
fn round_trips_every_mode() {
    let raw = sample_bytes(4096);
    for codec in [
        Codec::None,
        Codec::Zstd(1),
        Codec::Zstd(3),
        Codec::ZstdExp(1),
    ] {
        for sh in [false, true] {
            if matches!(codec, Codec::ZstdExp(_)) && !sh {
                assert!(Encoder::new(codec, sh).is_err());
                continue;
            }
            let f = encode_frame(codec, sh, DType::Bf16, &raw).unwrap();
            let mut out = Vec::new();
            let h = decode_frame(&f, None, &mut out).unwrap();
            assert_eq!(out, raw);
            assert_eq!(h.frame_len(), f.len());
        }
    }
}

#[test]
fn codec_2_keeps_the_mantissa_plane_raw_and_checks_its_lengths() {
    let raw = sample_bytes(4096);
    let f = encode_frame(Codec::ZstdExp(1), true, DType::Bf16, &raw).unwrap();
    assert_eq!((f[0], f[1]), (2, 1));
    let payload = &f[FRAME_HEADER_LEN..];
    let zlen = u32_at(payload, 0) as usize;
    // After the zstd part: the low bytes of every element, in order.
    let low: Vec<u8> = raw.chunks_exact(2).map(|c| c[0]).collect();
    assert_eq!(&payload[4 + zlen..], &low[..]);
    // Smaller than whole-payload zstd on noise-like values (random mantissas,
    // exponents spread over a few binades, as gradients are).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noisy: Vec<f32> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-3
        })
        .collect();
    let mut nraw = Vec::new();
    DType::Bf16.encode_into(&noisy, &mut nraw);
    let split = encode_frame(Codec::ZstdExp(1), true, DType::Bf16, &nraw).unwrap();
    let whole = encode_frame(Codec::Zstd(1), true, DType::Bf16, &nraw).unwrap();
    assert!(
        split.len() < whole.len(),
        "{} vs {}",
        split.len(),
        whole.len()
    );
    // A length field that disagrees with the payload is an error, never a panic,
    // also when the checksum was recomputed to match.
    for bad in [0u32, zlen as u32 - 1, zlen as u32 + 1, u32::MAX] {
        let mut g = f.clone();
        g[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4].copy_from_slice(&bad.to_le_bytes());
        let sum = checksum(&[&g[..16], &g[FRAME_HEADER_LEN..]]);
        g[16..24].copy_from_slice(&sum.to_le_bytes());
        let (h, payload) = verify_frame(&g, None).unwrap();
        let mut out = vec![0f32; 4096];
        assert!(
            decode_payload_f32(&h, payload, &mut Vec::new(), &mut out).is_err(),
            "{bad}"
        );
        assert!(decode_frame(&g, None, &mut Vec::new()).is_err(), "{bad}");
    }
    // Codec 2 without the shuffle filter is refused at the header.
    let mut g = f.clone();
    g[1] = 0;
    assert!(parse_frame_header(&g).is_err());
}

#[test]
fn f32_decode_matches_byte_decode_in_every_mode() {
    let vals: Vec<f32> = (0..777)
        .map(|i| ((i as f32) * 0.37).sin() * 1e-3 - (i % 5) as f32)
        .collect();
    for dtype in [DType::Bf16, DType::F32] {
        let mut raw = Vec::new();
        dtype.encode_into(&vals, &mut raw);
        let mut want = Vec::new();
        dtype.decode_into(&raw, &mut want);
        for codec in [Codec::None, Codec::Zstd(1), Codec::ZstdExp(1)] {
            for sh in [false, true] {
                if matches!(codec, Codec::ZstdExp(_)) && !sh {
                    continue;
                }
                let f = encode_frame(codec, sh, dtype, &raw).unwrap();
                let (h, payload) = verify_frame(&f, None).unwrap();
                let mut buf = Vec::new();
                let mut out = vec![f32::NAN; vals.len()];
                decode_payload_f32(&h, payload, &mut buf, &mut out).unwrap();
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{dtype} {codec:?} shuffled={sh}"
                );
                // A destination of the wrong length is refused, not partly filled.
                let mut short = vec![0f32; vals.len() - 1];
                assert!(decode_payload_f32(&h, payload, &mut buf, &mut short).is_err());
            }
        }
    }
}

#[test]
fn bf16_planes_are_the_value_bytes_in_every_mode() {
    let vals: Vec<f32> = (0..777)
        .map(|i| ((i as f32) * 0.37).sin() * 1e-3 - (i % 5) as f32)
        .collect();
    let mut raw = Vec::new();
    DType::Bf16.encode_into(&vals, &mut raw);
    let n = vals.len();
    // Low bytes of every value, then high bytes: the little-endian pairs split.
    let want: Vec<u8> = raw
        .iter()
        .step_by(2)
        .chain(raw.iter().skip(1).step_by(2))
        .copied()
        .collect();
    let mut f32s = Vec::new();
    DType::Bf16.decode_into(&raw, &mut f32s);
    for codec in [Codec::None, Codec::Zstd(1), Codec::ZstdExp(1)] {
        for sh in [false, true] {
            if matches!(codec, Codec::ZstdExp(_)) && !sh {
                continue;
            }
            let f = encode_frame(codec, sh, DType::Bf16, &raw).unwrap();
            let (h, payload) = verify_frame(&f, None).unwrap();
            let mut buf = Vec::new();
            let mut out = vec![0xAAu8; 2 * n];
            decode_payload_bf16_planes(&h, payload, &mut buf, &mut out).unwrap();
            assert_eq!(out, want, "{codec:?} shuffled={sh}");
            // Widened, the planes are the f32 decode bit for bit.
            let mut wide = vec![f32::NAN; n];
            widen_bf16(&out[..n], &out[n..], &mut wide);
            assert!(wide
                .iter()
                .zip(&f32s)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            // A destination of the wrong length is refused.
            let mut short = vec![0u8; 2 * n - 2];
            assert!(decode_payload_bf16_planes(&h, payload, &mut buf, &mut short).is_err());
        }
    }
    // An f32 frame has no bf16 planes.
    let mut raw32 = Vec::new();
    DType::F32.encode_into(&vals, &mut raw32);
    let f = encode_frame(Codec::Zstd(1), true, DType::F32, &raw32).unwrap();
    let (h, payload) = verify_frame(&f, None).unwrap();
    let err = decode_payload_bf16_planes(&h, payload, &mut Vec::new(), &mut vec![0u8; 2 * n])
        .unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
}

#[test]
fn factor_frames_record_kind_and_rows() {
    let raw = sample_bytes(6 * 16);
    let mut enc = Encoder::new(Codec::Zstd(1), true).unwrap();
    let mut f = Vec::new();
    let h = enc
        .encode_kind(DType::Bf16, FrameKind::Factor, 6, &raw, &mut f)
        .unwrap();
    assert_eq!((f[3], u32_at(&f, 12)), (1, 6));
    let mut out = Vec::new();
    let back = decode_frame(&f, Some(h.checksum), &mut out).unwrap();
    assert_eq!((back.kind, back.rows), (FrameKind::Factor, 6));
    assert_eq!(out, raw);
    // Rows that do not divide the values, zero rows, and rows on a full frame are refused.
    for (kind, rows) in [
        (FrameKind::Shared, 7),
        (FrameKind::Factor, 0),
        (FrameKind::Full, 6),
    ] {
        assert!(enc
            .encode_kind(DType::Bf16, kind, rows, &raw, &mut f)
            .is_err());
    }
    // An unknown kind code in a stored header is refused.
    let mut g = encode_frame(Codec::None, false, DType::F32, &[0u8; 8]).unwrap();
    g[3] = 3;
    assert!(parse_frame_header(&g).is_err());
}

#[test]
fn rejects_checksum_mismatch() {
    let raw = sample_bytes(256);
    let mut f = encode_frame(Codec::Zstd(1), true, DType::Bf16, &raw).unwrap();
    let last = f.len() - 1;
    f[last] ^= 0x10;
    let e = decode_frame(&f, None, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, Error::Checksum { .. }), "{e}");
}

#[test]
fn rejects_truncated_frame() {
    let raw = sample_bytes(256);
    let f = encode_frame(Codec::Zstd(1), true, DType::Bf16, &raw).unwrap();
    let e = decode_frame(&f[..f.len() - 3], None, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Truncated {
                what: "frame payload",
                ..
            }
        ),
        "{e}"
    );
    let e = decode_frame(&f[..10], None, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Truncated {
                what: "frame header",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn rejects_oversized_lengths() {
    let mut f = encode_frame(Codec::None, false, DType::F32, &[0u8; 8]).unwrap();
    f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = parse_frame_header(&f).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

#[test]
fn every_single_byte_flip_is_detected() {
    let raw = sample_bytes(512);
    let f = encode_frame(Codec::Zstd(1), true, DType::Bf16, &raw).unwrap();
    let sum = u64_at(&f, 16);
    for i in 0..f.len() {
        for bit in [0x01u8, 0x80] {
            let mut g = f.clone();
            g[i] ^= bit;
            assert!(
                decode_frame(&g, Some(sum), &mut Vec::new()).is_err(),
                "flip at byte {i} undetected"
            );
        }
    }
}
