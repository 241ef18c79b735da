//! The compute seam: everything the engine does to a loaded tile goes through
//! [`Backend`], so a GPU implementation can replace the CPU one without touching I/O.
//!
//! Tiles are host buffers, row-major `[rows × width]` f32 (one row per sample,
//! `width` flattened slice columns). Fisher values and denominators are f64.

use crate::error::{Error, Result};
use crate::options::Variant;
pub(crate) use crate::tile::check_len;
use crate::tile::{fill_x, fill_y, fisher_columns, MAX_GROUPS, PARTIALS_BYTES};
pub use crate::tile::{Download, FusedOut, FusedSlice, Tile};

/// Which side of `M = X·Yᵀ` a tile becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Task-A rows → X.
    X,
    /// Task-B rows → Y.
    Y,
}

/// Per-tile compute primitives.
pub trait Backend: Sync {
    fn name(&self) -> &'static str;

    /// Column Fisher of a tile: `out[k] = (1/rows) Σ_r tile[r,k]² · inv_t[r]`
    /// (`inv_t[r] = 1/T_r`, so the summand is C = g²/T). `rows = inv_t.len()`.
    /// Returns the first non-finite value as `Some((row, column))` (and leaves
    /// `out` unspecified), `None` when every value is finite.
    fn column_fisher(
        &self,
        tile: &[f32],
        inv_t: &[f64],
        width: usize,
        out: &mut [f64],
    ) -> Result<Option<(usize, usize)>>;

    /// Called by the engine's reader thread with each whole-slice tile it read ahead
    /// (`rows × width`), before that same buffer, unchanged, reaches
    /// [`column_fisher`](Self::column_fisher): a device backend starts moving it to
    /// the device here, off the compute thread. The default does nothing.
    fn prefetch(&self, tile: &[f32], rows: usize, width: usize) -> Result<()> {
        let _ = (tile, rows, width);
        Ok(())
    }

    /// Whether [`prefetch_factors`](Self::prefetch_factors) is implemented: a device
    /// backend multiplies a factored store's factors out on the device, so the reader
    /// uploads the factors (a fraction of the slice's bytes) instead of the slice.
    fn wants_factors(&self) -> bool {
        false
    }

    /// Like [`prefetch`](Self::prefetch), but from the tile's factors: the device tile
    /// (`rows × width`) is formed as `pᵀ s` per sample on the device and filed under the
    /// host buffer `key` (`rows × width` long; its values are not read) for the
    /// [`fused_slice`](Self::fused_slice) call that follows.
    fn prefetch_factors(
        &self,
        key: &[f32],
        tile: &crate::source::FactorTile,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let _ = (key, tile, rows, width);
        Err(Error::Backend {
            backend: "engine",
            message: format!("backend {} takes no factor tiles", self.name()),
        })
    }

    /// Scores a whole slice in one go and leaves both Fishers on the device (a device
    /// backend's fast path: the only blocking transfer is M). `None`: not supported,
    /// the engine uses the per-step methods. The engine calls it only for slices that
    /// fit in one chunk with `lam_rel = 0` (no median needed before X).
    fn fused_slice(&self, args: &FusedSlice<'_>) -> Result<FusedOut> {
        let _ = args;
        Err(Error::Backend {
            backend: "engine",
            message: format!("backend {} has no fused slice path", self.name()),
        })
    }

    /// Whether [`fused_slice`](Self::fused_slice) is implemented.
    fn supports_fused(&self) -> bool {
        false
    }

    /// Whether the engine may run [`fused_slice`](Self::fused_slice) on several slices
    /// at once from different threads: a host backend that keeps no state between
    /// calls (a device backend files tiles under their host buffers and may not).
    fn concurrent_slices(&self) -> bool {
        false
    }

    /// Whether [`fused_slice`](Self::fused_slice) takes [`Tile::Bf16Planes`] tiles (the
    /// engine then reads a bf16 store's slices as byte planes, half the bytes of f32).
    fn takes_bf16_planes(&self) -> bool {
        false
    }

    /// Transforms tile rows in place into X (role X) or Y (role Y) of `variant`
    /// (docs/design.md §4), `den[k] = max(I[k], eps) + lam*` over the tile's columns.
    fn transform(
        &self,
        tile: &mut [f32],
        inv_t: &[f64],
        den: &[f64],
        variant: Variant,
        role: Role,
    ) -> Result<()>;

    /// The fused scoring step on raw tiles: `out[i·ny + j] += Σ_k X_i[k]·Y_j[k]`
    /// where X is [`transform`](Self::transform) of `a` (role X) and Y of `b`
    /// (role Y), `width = den.len()`, `nx = a_inv_t.len()`, `ny = b_inv_t.len()`.
    /// The tiles are left unchanged. Implementations form X and Y in at least the
    /// precision of the accumulator (f64 on the CPU).
    #[allow(clippy::too_many_arguments)]
    fn interference(
        &self,
        a: &[f32],
        a_inv_t: &[f64],
        b: &[f32],
        b_inv_t: &[f64],
        den: &[f64],
        variant: Variant,
        out: &mut [f64],
    ) -> Result<()>;

    /// Phase 5's whitened Gram: `out[i·n + j] += Σ_k (g_i[k]·scale[k]) · (g_j[k]·scale[k])`
    /// over the `n = tile.len() / scale.len()` rows g of `tile` (`out` is `n × n`),
    /// formed and accumulated in (at least) f64.
    fn whitened_gram(&self, tile: &[f32], scale: &[f64], out: &mut [f64]) -> Result<()>;

    /// `out[i·ny + j] += Σ_{k<width} x[i·width + k] · y[j·width + k]`, with
    /// `nx = x.len()/width`, `ny = y.len()/width`: a real GEMM, accumulated in f64.
    fn gram_accumulate(&self, x: &[f32], y: &[f32], width: usize, out: &mut [f64]) -> Result<()>;
}

/// The CPU backend: rayon for elementwise work, the `gemm` crate for X·Yᵀ.
///
/// X and Y are formed in f64 straight from the raw f32 tile, a cache-sized block of
/// columns (at most `k_block`) at a time, and multiplied in f64: the signed variant's sums cancel by up to
/// 10⁴ on the fixtures, where f32 X/Y or f32 accumulation lost ~2e-5 relative.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    /// Most columns per GEMM call (capped at a cache-sized block; bounds the f64 scratch
    /// of each column group to `(nx + ny)·k_block` values).
    pub k_block: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend { k_block: 1 << 14 }
    }
}

/// `X` or `Y` value of one element (`g` the stored gradient, `inv_t = 1/T`,
/// `den` the denominator) — the definitions of docs/design.md §4, in f64.
#[inline]
pub fn transform_value(g: f32, inv_t: f64, den: f64, variant: Variant, role: Role) -> f32 {
    transform_value_f64(g, inv_t, den, variant, role) as f32
}

/// [`transform_value`] without the final rounding to f32.
#[inline]
pub fn transform_value_f64(g: f32, inv_t: f64, den: f64, variant: Variant, role: Role) -> f64 {
    let g = g as f64;
    match (variant, role) {
        (Variant::Unsigned, Role::X) => g * g * inv_t / den,
        (Variant::Unsigned, Role::Y) => g.abs(),
        (Variant::Signed, Role::X) => g / den,
        (Variant::Signed, Role::Y) => g,
        (Variant::Symmetric, Role::X) => (g * g * inv_t).sqrt() / den,
        (Variant::Symmetric, Role::Y) => (g * g * inv_t).sqrt(),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn column_fisher(
        &self,
        tile: &[f32],
        inv_t: &[f64],
        width: usize,
        out: &mut [f64],
    ) -> Result<Option<(usize, usize)>> {
        use rayon::prelude::*;
        let rows = inv_t.len();
        check_len("cpu", "column_fisher tile", tile.len(), rows * width)?;
        check_len("cpu", "column_fisher out", out.len(), width)?;
        // Column blocks in parallel; rows summed in order inside each block (deterministic).
        // One pass: a non-finite value makes its column's sum non-finite (finite values
        // cannot overflow it: g² ≤ 1.2e77 and 1/T ≤ 1), so the tile is scanned for the
        // first one only when some sum is not finite.
        const CB: usize = 4096;
        out.par_chunks_mut(CB)
            .enumerate()
            .for_each(|(cb, acc)| fisher_columns(tile, inv_t, width, cb * CB, acc));
        if out.iter().all(|v| v.is_finite()) {
            return Ok(None);
        }
        for (r, row) in tile.chunks_exact(width.max(1)).enumerate() {
            if let Some(k) = row.iter().position(|v| !v.is_finite()) {
                return Ok(Some((r, k)));
            }
        }
        Ok(None)
    }

    fn transform(
        &self,
        tile: &mut [f32],
        inv_t: &[f64],
        den: &[f64],
        variant: Variant,
        role: Role,
    ) -> Result<()> {
        use rayon::prelude::*;
        let width = den.len();
        check_len("cpu", "transform tile", tile.len(), inv_t.len() * width)?;
        tile.par_chunks_mut(width.max(1))
            .zip(inv_t.par_iter())
            .for_each(|(row, &it)| {
                for (v, &d) in row.iter_mut().zip(den) {
                    *v = transform_value(*v, it, d, variant, role);
                }
            });
        Ok(())
    }

    fn interference(
        &self,
        a: &[f32],
        a_inv_t: &[f64],
        b: &[f32],
        b_inv_t: &[f64],
        den: &[f64],
        variant: Variant,
        out: &mut [f64],
    ) -> Result<()> {
        let width = den.len();
        check_len("cpu", "interference a", a.len(), a_inv_t.len() * width)?;
        check_len("cpu", "interference b", b.len(), b_inv_t.len() * width)?;
        // 1/den once per slice: X is then a product, not an f64 division per element
        // (differs from g/den by at most one rounding, ~1e-16 relative).
        let rden: Vec<f64> = den.iter().map(|d| 1.0 / d).collect();
        let rden = &rden[..];
        self.blocked_gemm(
            a_inv_t.len(),
            b_inv_t.len(),
            width,
            |i, k0, dst| {
                let row = &a[i * width + k0..i * width + k0 + dst.len()];
                fill_x(variant, row, a_inv_t[i], &rden[k0..k0 + dst.len()], dst);
            },
            |j, k0, dst| {
                let row = &b[j * width + k0..j * width + k0 + dst.len()];
                fill_y(variant, row, b_inv_t[j], dst);
            },
            out,
        )
    }

    fn supports_fused(&self) -> bool {
        true
    }

    fn fused_slice(&self, args: &FusedSlice<'_>) -> Result<FusedOut> {
        crate::fused_cpu::fused_slice(args)
    }

    fn concurrent_slices(&self) -> bool {
        true
    }

    fn takes_bf16_planes(&self) -> bool {
        true
    }

    fn whitened_gram(&self, tile: &[f32], scale: &[f64], out: &mut [f64]) -> Result<()> {
        let width = scale.len();
        if width == 0 {
            return Ok(());
        }
        let n = tile.len() / width;
        check_len("cpu", "whitened_gram tile", tile.len(), n * width)?;
        check_len("cpu", "whitened_gram out", out.len(), n * n)?;
        let fill = |i: usize, k0: usize, dst: &mut [f64]| {
            let row = &tile[i * width + k0..];
            for ((d, v), s) in dst.iter_mut().zip(row).zip(&scale[k0..]) {
                *d = *v as f64 * s;
            }
        };
        self.blocked_gemm(n, n, width, fill, fill, out)
    }

    fn gram_accumulate(&self, x: &[f32], y: &[f32], width: usize, out: &mut [f64]) -> Result<()> {
        if width == 0 {
            return Ok(());
        }
        let nx = x.len() / width;
        let ny = y.len() / width;
        check_len("cpu", "gram x", x.len(), nx * width)?;
        check_len("cpu", "gram y", y.len(), ny * width)?;
        self.blocked_gemm(
            nx,
            ny,
            width,
            |i, k0, dst| {
                for (d, v) in dst.iter_mut().zip(&x[i * width + k0..]) {
                    *d = *v as f64;
                }
            },
            |j, k0, dst| {
                for (d, v) in dst.iter_mut().zip(&y[j * width + k0..]) {
                    *d = *v as f64;
                }
            },
            out,
        )
    }
}

/// Columns of X and Y formed per `gemm` call in [`CpuBackend::blocked_gemm`]: 16 rows
/// of both sides are 128 KiB of f64, which stays in L2 between forming and multiplying.
const CACHE_BLOCK: usize = 512;

impl CpuBackend {
    /// `out += X·Yᵀ` in f64, where row i of X over columns `k0..k0+kb` is produced by
    /// `fill_x(i, k0, &mut [f64; kb])` (same for Y).
    ///
    /// The columns are cut into a fixed number of contiguous groups (a function of the
    /// shape only, never of the thread count, so results are the same on any machine);
    /// the groups run in parallel, each forming X and Y a cache-sized block of columns
    /// at a time (at most `k_block`) and multiplying them into its own partial product
    /// with a single-threaded `gemm`; the partials are then added to `out` in group order.
    fn blocked_gemm(
        &self,
        nx: usize,
        ny: usize,
        width: usize,
        fill_x: impl Fn(usize, usize, &mut [f64]) + Sync,
        fill_y: impl Fn(usize, usize, &mut [f64]) + Sync,
        out: &mut [f64],
    ) -> Result<()> {
        use rayon::prelude::*;
        check_len("cpu", "gemm out", out.len(), nx * ny)?;
        if nx == 0 || ny == 0 || width == 0 {
            return Ok(());
        }
        let kb_max = self.k_block.clamp(1, CACHE_BLOCK).min(width);
        let blocks = width.div_ceil(kb_max);
        let groups = blocks
            .min(MAX_GROUPS)
            .min((PARTIALS_BYTES / (nx * ny * 8)).max(1));
        // One group (huge nx·ny): let gemm split the product over the threads instead.
        let threads = rayon::current_num_threads();
        let par = if groups == 1 && threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let partials: Vec<Vec<f64>> = (0..groups)
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(xb, yb): &mut (Vec<f64>, Vec<f64>), g| {
                    xb.resize(nx * kb_max, 0.0);
                    yb.resize(ny * kb_max, 0.0);
                    let mut part = vec![0f64; nx * ny];
                    for blk in g * blocks / groups..(g + 1) * blocks / groups {
                        let k0 = blk * kb_max;
                        let kb = kb_max.min(width - k0);
                        for (i, d) in xb[..nx * kb].chunks_exact_mut(kb).enumerate() {
                            fill_x(i, k0, d);
                        }
                        for (j, d) in yb[..ny * kb].chunks_exact_mut(kb).enumerate() {
                            fill_y(j, k0, d);
                        }
                        // SAFETY: lhs is `xb` viewed as [nx × kb] row-major (row stride
                        // kb), rhs is `yb` viewed transposed as [kb × ny] (element (k, j)
                        // at j·kb + k), dst is `part` [nx × ny] row-major; `xb`/`yb` hold
                        // at least nx·kb / ny·kb values and `part` nx·ny. `read_dst =
                        // true` with alpha = beta = 1 accumulates: part += xb·ybᵀ.
                        unsafe {
                            gemm::gemm(
                                nx,
                                ny,
                                kb,
                                part.as_mut_ptr(),
                                1,
                                ny as isize,
                                true,
                                xb.as_ptr(),
                                1,
                                kb as isize,
                                yb.as_ptr(),
                                kb as isize,
                                1,
                                1.0f64,
                                1.0f64,
                                false,
                                false,
                                false,
                                par,
                            );
                        }
                    }
                    part
                },
            )
            .collect();
        for part in &partials {
            for (o, p) in out.iter_mut().zip(part) {
                *o += p;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_matches_naive_including_k_blocks() {
        let (nx, ny, w) = (5, 7, 37);
        let x: Vec<f32> = (0..nx * w)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let y: Vec<f32> = (0..ny * w)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2)
            .collect();
        for kb in [1, 8, 37, 1000] {
            let be = CpuBackend { k_block: kb };
            let mut out = vec![0f64; nx * ny];
            be.gram_accumulate(&x, &y, w, &mut out).unwrap();
            for i in 0..nx {
                for j in 0..ny {
                    let want: f64 = (0..w)
                        .map(|k| x[i * w + k] as f64 * y[j * w + k] as f64)
                        .sum();
                    assert!((out[i * ny + j] - want).abs() < 1e-4, "kb={kb} {i},{j}");
                }
            }
        }
    }

    #[test]
    fn fisher_is_mean_of_squares_over_t_and_finds_nan() {
        let be = CpuBackend::default();
        let tile = [1.0f32, -2.0, 3.0, 4.0];
        let mut out = [0.0; 2];
        assert_eq!(
            be.column_fisher(&tile, &[1.0, 0.5], 2, &mut out).unwrap(),
            None
        );
        assert_eq!(out, [(1.0 + 9.0 * 0.5) / 2.0, (4.0 + 16.0 * 0.5) / 2.0]);
        let bad = [1.0f32, -2.0, f32::INFINITY, 4.0];
        assert_eq!(
            be.column_fisher(&bad, &[1.0, 0.5], 2, &mut out).unwrap(),
            Some((1, 0))
        );
    }
}
