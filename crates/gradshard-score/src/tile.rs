//! The tile types the engine hands a backend, and the column kernels that the CPU
//! backend's per-step path and its fused path ([`crate::fused_cpu`]) share, so the two
//! agree bit for bit.

use crate::error::{Error, Result};
use crate::options::{FisherPool, Variant};

/// A value still on a device: calling it downloads it (blocking). The engine
/// calls it on its statistics thread, off the critical path.
pub type Download = Box<dyn FnOnce() -> Result<Vec<f64>> + Send>;

/// One whole slice for [`Backend::fused_slice`](crate::Backend::fused_slice): both tasks' raw tiles (all rows read
/// for the Fisher), which of those rows are scored, and the denominator settings
/// (`den[k] = max(pool(I_A, I_B)[k], eps) + lam`).
pub struct FusedSlice<'a> {
    pub a: Tile<'a>,
    /// 1/T of every row of `a`.
    pub a_inv_t: &'a [f64],
    /// Scored rows of `a` (ascending positions) and their 1/T.
    pub a_sel: &'a [usize],
    pub a_sel_inv_t: &'a [f64],
    pub b: Tile<'a>,
    pub b_inv_t: &'a [f64],
    pub b_sel: &'a [usize],
    pub b_sel_inv_t: &'a [f64],
    pub width: usize,
    pub variant: Variant,
    pub pool: FisherPool,
    pub eps: f64,
    pub lam: f64,
}

/// A task's tile for [`Backend::fused_slice`](crate::Backend::fused_slice), `rows × width` values row-major.
#[derive(Debug, Clone, Copy)]
pub enum Tile<'a> {
    F32(&'a [f32]),
    /// bf16 values as byte planes, `2 · width` bytes per row: the row's low bytes, then
    /// its high bytes (`gradshard_store::Store::read_tile_bf16_planes`). Only backends
    /// that say [`Backend::takes_bf16_planes`](crate::Backend::takes_bf16_planes) are given these.
    Bf16Planes(&'a [u8]),
}

impl<'a> Tile<'a> {
    /// Values held.
    pub fn values(&self) -> usize {
        match self {
            Tile::F32(v) => v.len(),
            Tile::Bf16Planes(p) => p.len() / 2,
        }
    }

    /// The f32 values, or the error of a backend that takes no byte planes.
    pub fn f32(&self, backend: &'static str) -> Result<&'a [f32]> {
        match *self {
            Tile::F32(v) => Ok(v),
            Tile::Bf16Planes(_) => Err(Error::Backend {
                backend,
                message: "bf16 byte-plane tiles are for host backends only".into(),
            }),
        }
    }

    /// Row `r` of a `width`-column tile as f32 into `out` (`width` long).
    pub fn row_f32(&self, r: usize, width: usize, out: &mut [f32]) {
        self.row_cols_f32(r, width, 0, out);
    }

    /// Columns `c0..c0 + out.len()` of row `r` of a `width`-column tile as f32 into
    /// `out` (byte planes widened, exactly).
    pub fn row_cols_f32(&self, r: usize, width: usize, c0: usize, out: &mut [f32]) {
        let c1 = c0 + out.len();
        match self {
            Tile::F32(v) => out.copy_from_slice(&v[r * width + c0..r * width + c1]),
            Tile::Bf16Planes(p) => {
                let row = &p[2 * r * width..2 * (r + 1) * width];
                gradshard_format::widen_bf16(&row[c0..c1], &row[width + c0..width + c1], out);
            }
        }
    }
}

impl FusedSlice<'_> {
    /// The arguments' consistency, as `backend`'s error: tile lengths against their
    /// rows and width, one 1/T per scored row, scored rows inside their tiles.
    pub fn check(&self, backend: &'static str) -> Result<()> {
        let w = self.width;
        let (ra, rb) = (self.a_inv_t.len(), self.b_inv_t.len());
        check_len(backend, "fused_slice a", self.a.values(), ra * w)?;
        check_len(backend, "fused_slice b", self.b.values(), rb * w)?;
        if let (Tile::Bf16Planes(p), _) | (_, Tile::Bf16Planes(p)) = (self.a, self.b) {
            check_len(backend, "fused_slice byte planes", p.len() % 2, 0)?;
        }
        check_len(
            backend,
            "fused_slice a_sel",
            self.a_sel_inv_t.len(),
            self.a_sel.len(),
        )?;
        check_len(
            backend,
            "fused_slice b_sel",
            self.b_sel_inv_t.len(),
            self.b_sel.len(),
        )?;
        for (sel, rows, what) in [(self.a_sel, ra, "a_sel"), (self.b_sel, rb, "b_sel")] {
            if let Some(&p) = sel.iter().find(|&&p| p >= rows) {
                return Err(Error::Backend {
                    backend,
                    message: format!("fused_slice {what}: row {p} of a tile of {rows} rows"),
                });
            }
        }
        Ok(())
    }
}

/// What [`Backend::fused_slice`](crate::Backend::fused_slice) returns: M (`a_sel.len() × b_sel.len()`, summed over
/// columns), whether both Fishers are finite, and the Fishers still on the device.
pub struct FusedOut {
    pub m: Vec<f64>,
    pub fisher_finite: bool,
    pub fa: Download,
    pub fb: Download,
}

/// Columns `k0..k0 + out.len()` of a tile's column Fisher (`width` columns, one row per
/// `inv_t` entry): `out[k] = (1/rows) Σ_r tile[r, k0+k]² · inv_t[r]`, rows summed in
/// order. The per-step and fused paths both use it, so their Fishers agree bit for bit.
#[inline(always)]
pub(crate) fn fisher_columns(
    tile: &[f32],
    inv_t: &[f64],
    width: usize,
    k0: usize,
    out: &mut [f64],
) {
    // Columns per register block: the partial sums of FC columns stay in registers
    // (8 AVX2 vectors) while the rows go by, instead of a load and a store of `out`
    // per row and column. Each column's rows are still added in order from 0.0.
    const FC: usize = 32;
    let inv_n = 1.0 / inv_t.len() as f64;
    let n = out.len();
    let mut k = 0;
    while k + FC <= n {
        let mut acc = [0f64; FC];
        for (r, &it) in inv_t.iter().enumerate() {
            let at = r * width + k0 + k;
            let row: &[f32; FC] = tile[at..at + FC].try_into().expect("FC values");
            for (a, &g) in acc.iter_mut().zip(row) {
                let g = g as f64;
                *a += g * g * it;
            }
        }
        for (o, a) in out[k..k + FC].iter_mut().zip(acc) {
            *o = a * inv_n;
        }
        k += FC;
    }
    for (c, o) in out.iter_mut().enumerate().skip(k) {
        let mut a = 0.0;
        for (r, &it) in inv_t.iter().enumerate() {
            let g = tile[r * width + k0 + c] as f64;
            a += g * g * it;
        }
        *o = a * inv_n;
    }
}

/// Row `dst` of X (f64) from a raw tile row, `rd[k] = 1/den[k]`: the definitions of
/// docs/design.md §4 ([`transform_value_f64`](crate::backend::transform_value_f64), with the division by `den` as a product).
#[inline(always)]
pub(crate) fn fill_x(variant: Variant, row: &[f32], it: f64, rd: &[f64], dst: &mut [f64]) {
    match variant {
        Variant::Unsigned => {
            for ((d, &g), &r) in dst.iter_mut().zip(row).zip(rd) {
                let g = g as f64;
                *d = g * g * it * r;
            }
        }
        Variant::Signed => {
            for ((d, &g), &r) in dst.iter_mut().zip(row).zip(rd) {
                *d = g as f64 * r;
            }
        }
        Variant::Symmetric => {
            for ((d, &g), &r) in dst.iter_mut().zip(row).zip(rd) {
                let g = g as f64;
                *d = (g * g * it).sqrt() * r;
            }
        }
    }
}

/// Row `dst` of Y (f64) from a raw tile row (docs/design.md §4).
#[inline(always)]
pub(crate) fn fill_y(variant: Variant, row: &[f32], it: f64, dst: &mut [f64]) {
    match variant {
        Variant::Unsigned => {
            for (d, &g) in dst.iter_mut().zip(row) {
                *d = (g as f64).abs();
            }
        }
        Variant::Signed => {
            for (d, &g) in dst.iter_mut().zip(row) {
                *d = g as f64;
            }
        }
        Variant::Symmetric => {
            for (d, &g) in dst.iter_mut().zip(row) {
                let g = g as f64;
                *d = (g * g * it).sqrt();
            }
        }
    }
}

/// Most column groups (partial products) of one `CpuBackend::blocked_gemm` call.
pub(crate) const MAX_GROUPS: usize = 16;

/// Bytes of f64 partial products one `CpuBackend::blocked_gemm` call may hold.
pub(crate) const PARTIALS_BYTES: usize = 32 << 20;

/// A length mismatch as an error of `backend` (`cpu`, `burn`, `engine`).
pub(crate) fn check_len(
    backend: &'static str,
    what: &str,
    found: usize,
    expected: usize,
) -> Result<()> {
    if found != expected {
        return Err(Error::Backend {
            backend,
            message: format!("{what}: {found} values, expected {expected}"),
        });
    }
    Ok(())
}
