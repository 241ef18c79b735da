use serde::{Deserialize, Serialize};

/// Element type of stored gradients. Computation is always f32 or wider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum DType {
    /// bfloat16, rounded to nearest even from f32. The default: half the bytes,
    /// the f32 exponent range (no underflow below 6e-8 as with fp16).
    Bf16 = 1,
    /// IEEE 754 binary32, bit-exact.
    F32 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }

    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<DType> {
        match code {
            1 => Some(DType::Bf16),
            2 => Some(DType::F32),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        }
    }

    /// Encodes f32 values into little-endian bytes of this dtype, appending to `out`.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            DType::F32 => {
                out.reserve(values.len() * 4);
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            DType::Bf16 => {
                out.reserve(values.len() * 2);
                for v in values {
                    out.extend_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
                }
            }
        }
    }

    /// Decodes little-endian bytes of this dtype into f32 values, appending to `out`.
    /// `bytes.len()` must be a multiple of [`DType::size`]; extra bytes are ignored
    /// by the caller's contract (the format layer checks lengths).
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            DType::F32 => {
                out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            DType::Bf16 => {
                out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
                );
            }
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(DType::Bf16),
            "f32" => Ok(DType::F32),
            other => Err(format!("unknown dtype `{other}` (expected bf16 or f32)")),
        }
    }
}

/// f32 -> bf16 bits, round to nearest, ties to even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// bf16 bits -> f32 (exact).
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between bf16 1.0 and 1 + 2^-7: ties go to even (1.0).
        let tie = f32::from_bits(0x3F80_8000);
        assert_eq!(f32_to_bf16_bits(tie), 0x3F80);
        // Just above the tie rounds up.
        let above = f32::from_bits(0x3F80_8001);
        assert_eq!(f32_to_bf16_bits(above), 0x3F81);
        // Odd lower neighbour with a tie rounds up to even.
        let tie_odd = f32::from_bits(0x3F81_8000);
        assert_eq!(f32_to_bf16_bits(tie_odd), 0x3F82);
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn encode_decode_round_trip() {
        let vals = [0.0f32, -1.5, 3.25e-9, f32::MAX, -7.0e-30];
        for dt in [DType::F32, DType::Bf16] {
            let mut bytes = Vec::new();
            dt.encode_into(&vals, &mut bytes);
            assert_eq!(bytes.len(), vals.len() * dt.size());
            let mut back = Vec::new();
            dt.decode_into(&bytes, &mut back);
            for (a, b) in vals.iter().zip(&back) {
                let want = match dt {
                    DType::F32 => *a,
                    DType::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(*a)),
                };
                assert_eq!(want.to_bits(), b.to_bits());
            }
        }
    }
}
