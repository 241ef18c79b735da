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
    let (low, top) = src.split_at(src.len() - src.len() / elem);
    unshuffle_planes(low, top, elem, dst);
}

/// [`unshuffle`] of planes held in two pieces: `low` (planes `0..elem-1`, concatenated)
/// and `top` (the last plane), as frame codec 2 stores them.
pub fn unshuffle_planes(low: &[u8], top: &[u8], elem: usize, dst: &mut Vec<u8>) {
    let n = top.len();
    debug_assert_eq!(low.len(), (elem - 1) * n);
    dst.clear();
    dst.resize(n * elem, 0);
    match elem {
        2 => {
            for (i, c) in dst.chunks_exact_mut(2).enumerate() {
                c[0] = low[i];
                c[1] = top[i];
            }
        }
        _ => {
            for (i, c) in dst.chunks_exact_mut(elem).enumerate() {
                for (b, v) in c[..elem - 1].iter_mut().enumerate() {
                    *v = low[b * n + i];
                }
                c[elem - 1] = top[i];
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
