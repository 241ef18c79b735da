//! Byte-shuffle filter: element bytes regrouped into planes (byte 0 of every
//! element, then byte 1, …). Exponent bytes of gradients cluster; mantissa
//! bytes do not — separating them lets zstd find the redundancy.

/// Shuffles `src` (elements of `elem` bytes) into `dst`. `src.len()` must be a
/// multiple of `elem`; `dst` is cleared first.
pub fn shuffle(src: &[u8], elem: usize, dst: &mut Vec<u8>) {
    debug_assert_eq!(src.len() % elem, 0);
    let n = src.len() / elem;
    dst.clear();
    dst.resize(src.len(), 0);
    match elem {
        2 => {
            let (lo, hi) = dst.split_at_mut(n);
            for (i, c) in src.chunks_exact(2).enumerate() {
                lo[i] = c[0];
                hi[i] = c[1];
            }
        }
        _ => {
            for (i, c) in src.chunks_exact(elem).enumerate() {
                for (b, v) in c.iter().enumerate() {
                    dst[b * n + i] = *v;
                }
            }
        }
    }
}

/// Inverse of [`shuffle`].
pub fn unshuffle(src: &[u8], elem: usize, dst: &mut Vec<u8>) {
    debug_assert_eq!(src.len() % elem, 0);
    let n = src.len() / elem;
    dst.clear();
    dst.resize(src.len(), 0);
    match elem {
        2 => {
            let (lo, hi) = src.split_at(n);
            for (i, c) in dst.chunks_exact_mut(2).enumerate() {
                c[0] = lo[i];
                c[1] = hi[i];
            }
        }
        _ => {
            for (i, c) in dst.chunks_exact_mut(elem).enumerate() {
                for (b, v) in c.iter_mut().enumerate() {
                    *v = src[b * n + i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_layout() {
        let src = [1u8, 2, 3, 4, 5, 6];
        let mut d = Vec::new();
        shuffle(&src, 2, &mut d);
        assert_eq!(d, [1, 3, 5, 2, 4, 6]);
        let mut back = Vec::new();
        unshuffle(&d, 2, &mut back);
        assert_eq!(back, src);
        let src4 = [1u8, 2, 3, 4, 5, 6, 7, 8];
        shuffle(&src4, 4, &mut d);
        assert_eq!(d, [1, 5, 2, 6, 3, 7, 4, 8]);
        unshuffle(&d, 4, &mut back);
        assert_eq!(back, src4);
    }
}
