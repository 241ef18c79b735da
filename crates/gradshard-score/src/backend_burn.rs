//! The device backend: the tile compute of the scorer through burn 0.21, generic over
//! burn backends. [`CudaBackend`] (feature `cuda`) runs it on an NVIDIA GPU through
//! burn's CUDA backend (cubecl); [`BurnBackend::ndarray`] runs the very same code on
//! burn's CPU ndarray backend, so CI tests the GPU code path without a GPU.
//!
//! Per slice (or column chunk) the engine hands the raw f32 tile of each task to
//! [`Backend::column_fisher`]; this backend uploads it once, forms the column Fisher
//! `I[k] = (1/n) Σ_r g² / T_r` on the device in f64, downloads only I (|S| values), and
//! keeps the device copy. [`Backend::interference`] then forms X and Y on the device
//! from that copy (or uploads the compacted tile when a sample subset changed it),
//! multiplies `M = X·Yᵀ` on the device and downloads the `nx × ny` result.
//!
//! Precision ([`GpuPrecision`]):
//! - `F64` (default): X, Y, products and sums in f64 as a broadcast multiply and a
//!   reduction over column blocks (cubecl 0.10 refuses f64 matmul on CUDA: "types
//!   not supported"). CPU-identical to rounding; memory-bound in `nx·ny·|S|`.
//! - `F32`: X and Y formed in f64, rounded to f32 operands, multiplied by burn's f32
//!   matmul — on Hopper that runs on the tensor cores as **TF32** (10-bit mantissa),
//!   about 1e-3 relative per product. Column blocks of [`BurnBackend::k_block`] are
//!   summed in f64 on the device. Fast, not CPU-identical; measure before trusting.
//!
//! `transform` and `gram_accumulate` (top-k rows for the permutation test, bootstrap
//! replicates: both tiny) run on the CPU backend.
//!
//! Uploads: a tile whose f32 values are all exactly bf16 (any bf16 store) travels as
//! bf16 and is widened on the device (exact; half the bytes) when the backend has
//! bf16 tensors (CUDA does, ndarray does not). Each piece goes up as a rank-1 tensor
//! (one contiguous copy) and is reshaped on the device. What cubecl 0.10 does with it
//! (read in its source; see README "GPU"): `from_data` copies the host bytes into a
//! new pageable `Vec` and the device thread issues `cuMemcpy*Async` from that pageable
//! memory — cubecl's pinned staging pool serves downloads and file-backed bytes, not
//! uploads, and burn 0.21 offers no upload from caller-pinned memory.

use std::sync::Mutex;

use rayon::prelude::*;

use burn::tensor::backend::Backend as BurnB;
use burn::tensor::{DType, Tensor, TensorData};

use crate::backend::{check_len, Backend, CpuBackend, Download, FusedOut, FusedSlice, Role};
use crate::error::{Error, Result};
use crate::options::{FisherPool, Variant};

/// The scorer's tile compute on one CUDA device (feature `cuda`).
#[cfg(feature = "cuda")]
pub type CudaBackend = BurnBackend<burn::backend::Cuda<f32>>;

/// The device code path on burn's CPU ndarray backend (tests, CI).
pub type NdArrayBackend = BurnBackend<burn::backend::NdArray<f32>>;

/// Bytes of f64 products per column block of the exact (`F64`) product.
const EXACT_BLOCK_BYTES: usize = 256 << 20;

/// Largest host → device copy in one piece (cubecl stages each one in pinned memory).
const UPLOAD_PIECE_BYTES: usize = 64 << 20;

/// Operand precision of the GPU GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuPrecision {
    /// X, Y, products and sums in f64, as a broadcast multiply and a reduction (cubecl
    /// 0.10 has no f64 matmul on CUDA): CPU-identical to rounding, memory-bound,
    /// `nx·ny·|S|·16` bytes of device traffic per slice — fine for tens of samples
    /// per task, slow for hundreds.
    F64,
    /// f32 operands (TF32 tensor cores on Hopper), f64 sum over column blocks.
    F32,
}

impl std::str::FromStr for GpuPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f64" => Ok(GpuPrecision::F64),
            "f32" | "tf32" => Ok(GpuPrecision::F32),
            _ => Err(format!("unknown GPU precision {s:?} (use f64 or f32)")),
        }
    }
}

/// One device copy of a host tile, keyed by the host buffer's address and length.
struct Cached<B: BurnB> {
    ptr: usize,
    len: usize,
    rows: usize,
    tile: Tensor<B, 2>,
    /// Uploaded by [`Backend::prefetch`] and not yet taken by `column_fisher`.
    prefetched: bool,
}

/// Device tiles kept: the two of the slice being computed and the two prefetched for
/// the next one, with room to spare.
const CACHE_TILES: usize = 6;

/// The scorer's tile compute on one burn device.
pub struct BurnBackend<B: BurnB> {
    device: B::Device,
    /// `cuda:0`, `ndarray`, ...
    label: String,
    /// [`Backend::name`].
    name: &'static str,
    precision: GpuPrecision,
    /// Whether bf16-exact tiles travel as bf16 (the device has bf16 tensors).
    bf16_uploads: bool,
    /// Columns per f32 GEMM (their products are summed in f64).
    pub k_block: usize,
    /// Whether the engine may use the fused slice path (default on; off runs the
    /// per-step path, for comparisons).
    pub fused_enabled: bool,
    /// Device copies of the last two tiles given to `column_fisher` (task A, task B).
    cache: Mutex<Vec<Cached<B>>>,
    cpu: CpuBackend,
    stats: Mutex<GpuStats>,
    /// Device copies of the last shared-factor batches `[rows, n_max, c]`, keyed by the
    /// host factors' addresses: the slices of one layer of a factored store share S, so
    /// S goes up once per layer and task, and only P per slice.
    shared: Mutex<Vec<SharedBatch<B>>>,
}

/// A device batch `[rows, n_max, c]` of shared factors, keyed by the host factors it
/// was made from. The entry holds those `Arc`s, so their memory cannot be freed and
/// reused by other factors while the entry exists: pointer equality is identity.
struct SharedBatch<B: BurnB> {
    key: Vec<std::sync::Arc<Vec<f32>>>,
    n_max: usize,
    dev: Tensor<B, 3>,
}

/// Shared-factor batches kept on the device (one per task, with room to spare).
const CACHE_SHARED: usize = 4;

/// Counters of the GPU work (for benchmarks).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuStats {
    /// Bytes copied host → device (bf16-exact tiles travel as bf16: 2 bytes a value).
    pub upload_bytes: u64,
    /// Seconds spent in those copies (synchronised).
    pub upload_s: f64,
    /// Tiles reused from `column_fisher` by `interference` (no second upload).
    pub reused_tiles: u64,
    /// Tiles uploaded by the engine's reader thread ahead of their slice
    /// ([`Backend::prefetch`]); their upload time is in `upload_s` but off the
    /// compute thread.
    pub prefetched_tiles: u64,
    /// Slices scored on the fused path ([`Backend::fused_slice`]).
    pub fused_slices: u64,
    /// GEMMs run.
    pub gemms: u64,
    /// Tiles formed on the device from a factored store's factors
    /// ([`Backend::prefetch_factors`]).
    pub factor_tiles: u64,
    /// Shared-factor batches reused on the device (not uploaded again).
    pub shared_reused: u64,
}

impl<B: BurnB> std::fmt::Debug for BurnBackend<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnBackend")
            .field("device", &self.label)
            .field("precision", &self.precision)
            .finish()
    }
}

fn gpu_err(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: "burn",
        message: message.into(),
    }
}

#[cfg(feature = "cuda")]
impl CudaBackend {
    /// Opens CUDA device `ordinal`, checking that a small upload and download work
    /// (no driver or no such device is an error, not a panic).
    pub fn new(ordinal: usize, precision: GpuPrecision) -> Result<CudaBackend> {
        use burn::backend::cuda::CudaDevice;
        type C = burn::backend::Cuda<f32>;
        let probe = std::panic::catch_unwind(|| {
            let dev = CudaDevice::new(ordinal);
            let t = Tensor::<C, 1>::from_data(
                TensorData::new(vec![1.0f64, 2.0], [2]),
                (&dev, DType::F64),
            );
            t.sum().into_data().to_vec::<f64>().ok()
        });
        match probe {
            Ok(Some(v)) if v == [3.0] => {}
            Ok(other) => return Err(gpu_err(format!("cuda:{ordinal}: probe returned {other:?}"))),
            Err(_) => {
                return Err(gpu_err(format!(
                    "cuda:{ordinal} is not usable (no NVIDIA driver, no such device, or CUDA failed to start)"
                )))
            }
        }
        let name = match precision {
            GpuPrecision::F64 => "cuda-f64",
            GpuPrecision::F32 => "cuda-f32",
        };
        Ok(BurnBackend::on_device(
            CudaDevice::new(ordinal),
            format!("cuda:{ordinal}"),
            name,
            precision,
        ))
    }

    /// Whether CUDA device `ordinal` can be opened.
    pub fn available(ordinal: usize) -> bool {
        CudaBackend::new(ordinal, GpuPrecision::F64).is_ok()
    }
}

impl NdArrayBackend {
    /// The device code path on the CPU (burn ndarray): for tests of that path.
    pub fn ndarray(precision: GpuPrecision) -> NdArrayBackend {
        let name = match precision {
            GpuPrecision::F64 => "burn-ndarray-f64",
            GpuPrecision::F32 => "burn-ndarray-f32",
        };
        BurnBackend::on_device(Default::default(), "ndarray".into(), name, precision)
    }
}

impl<B: BurnB> BurnBackend<B> {
    /// The backend on an opened burn device.
    pub fn on_device(
        device: B::Device,
        label: String,
        name: &'static str,
        precision: GpuPrecision,
    ) -> BurnBackend<B> {
        BurnBackend {
            bf16_uploads: B::supports_dtype(&device, DType::BF16),
            device,
            label,
            name,
            precision,
            k_block: 1 << 15,
            fused_enabled: true,
            cache: Mutex::new(Vec::new()),
            shared: Mutex::new(Vec::new()),
            cpu: CpuBackend::default(),
            stats: Mutex::new(GpuStats::default()),
        }
    }

    /// The device, as given (`cuda:0`, `ndarray`).
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn precision(&self) -> GpuPrecision {
        self.precision
    }

    pub fn stats(&self) -> GpuStats {
        self.stats.lock().unwrap().clone()
    }

    /// Uploads a row-major `[rows × width]` f32 host tile (in pieces of at most
    /// [`UPLOAD_PIECE_BYTES`]) and waits for the copy, timing it.
    fn upload(&self, tile: &[f32], rows: usize, width: usize) -> Tensor<B, 2> {
        let t0 = std::time::Instant::now();
        let rows_per_piece = (UPLOAD_PIECE_BYTES / (4 * width.max(1))).max(1);
        let mut pieces = Vec::new();
        let mut sent = 0usize;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + rows_per_piece).min(rows);
            let part = &tile[r0 * width..r1 * width];
            // A bf16 store's values widened to f32 have 16 zero low bits: send them as
            // bf16 (exact, half the bytes) and widen on the device.
            // Rank 1: one contiguous host → device copy (a rank-2 tensor may get
            // padded rows and a pitched copy), reshaped on the device.
            let n = part.len();
            let t = if self.bf16_uploads && part.par_iter().all(|v| v.to_bits() & 0xFFFF == 0) {
                let packed: Vec<burn::tensor::bf16> = part
                    .par_iter()
                    .map(|v| burn::tensor::bf16::from_bits((v.to_bits() >> 16) as u16))
                    .collect();
                sent += n * 2;
                let data = TensorData::new(packed, [n]);
                Tensor::<B, 1>::from_data(data, (&self.device, DType::BF16)).cast(DType::F32)
            } else {
                sent += n * 4;
                let data = TensorData::new(part.to_vec(), [n]);
                Tensor::<B, 1>::from_data(data, (&self.device, DType::F32))
            };
            let t = t.reshape([r1 - r0, width]);
            pieces.push(t);
            r0 = r1;
        }
        let t = if pieces.len() == 1 {
            pieces.pop().unwrap()
        } else {
            Tensor::cat(pieces, 0)
        };
        // Wait for the copies so the timing means something.
        let _ = B::sync(&self.device);
        let mut st = self.stats.lock().unwrap();
        st.upload_bytes += sent as u64;
        st.upload_s += t0.elapsed().as_secs_f64();
        t
    }

    /// `M = X·Yᵀ` (`[nx × ny]`, f64) of X `[nx × width]` and Y `[ny × width]` (f64), in
    /// the backend's [`GpuPrecision`].
    fn product(
        &self,
        x: Tensor<B, 2>,
        y: Tensor<B, 2>,
        nx: usize,
        ny: usize,
        width: usize,
    ) -> Tensor<B, 2> {
        match self.precision {
            GpuPrecision::F64 => {
                // f64 products and sums, elementwise: x[i,1,k] · y[1,j,k] summed over k,
                // in column blocks of at most EXACT_BLOCK_BYTES of products.
                let kb = (EXACT_BLOCK_BYTES / (8 * nx * ny)).clamp(1, width);
                self.sum_over_blocks(width, kb, |k0, w| {
                    let xb = x.clone().narrow(1, k0, w).unsqueeze_dim::<3>(1);
                    let yb = y.clone().narrow(1, k0, w).unsqueeze_dim::<3>(0);
                    xb.mul(yb).sum_dim(2).reshape([nx, ny])
                })
            }
            GpuPrecision::F32 => {
                // f32 GEMMs over column blocks of `k_block`, each block's product
                // widened to f64 and summed in f64 on the device.
                let (x, y) = (x.cast(DType::F32), y.cast(DType::F32));
                self.sum_over_blocks(width, self.k_block.max(1), |k0, w| {
                    x.clone()
                        .narrow(1, k0, w)
                        .matmul(y.clone().narrow(1, k0, w).transpose())
                        .cast(DType::F64)
                })
            }
        }
    }

    /// `Σ part(k0, w)` over the column blocks `[k0, k0 + w)` of at most `kb` columns
    /// (each block counted as one GEMM in [`GpuStats`]); `width > 0`.
    fn sum_over_blocks(
        &self,
        width: usize,
        kb: usize,
        part: impl Fn(usize, usize) -> Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let mut acc: Option<Tensor<B, 2>> = None;
        let mut k0 = 0;
        while k0 < width {
            let w = kb.min(width - k0);
            let p = part(k0, w);
            acc = Some(match acc {
                None => p,
                Some(a) => a.add(p),
            });
            self.stats.lock().unwrap().gemms += 1;
            k0 += w;
        }
        acc.expect("width > 0")
    }

    /// Column Fisher `[1 × w]` (f64) of a device tile `[rows × w]`.
    fn fisher_of(&self, tile: Tensor<B, 2>, inv_t: &[f64]) -> Tensor<B, 2> {
        tile.cast(DType::F64)
            .square()
            .mul(self.column_f64(inv_t))
            .sum_dim(0)
            .div_scalar(inv_t.len() as f64)
    }

    /// The rows `sel` (ascending positions) of a device tile of `rows` rows.
    fn rows_of(&self, tile: Tensor<B, 2>, rows: usize, sel: &[usize]) -> Tensor<B, 2> {
        if sel.len() == rows {
            return tile; // ascending and distinct: every row, in order
        }
        let idx: Vec<i64> = sel.iter().map(|&p| p as i64).collect();
        let n = idx.len();
        let idx =
            Tensor::<B, 1, burn::tensor::Int>::from_data(TensorData::new(idx, [n]), &self.device);
        tile.select(0, idx)
    }

    /// The device tile for a whole-slice host tile: prefetched, or uploaded now.
    fn slice_tile(&self, tile: &[f32], rows: usize, width: usize) -> Tensor<B, 2> {
        let t = match self.take_prefetched(tile, rows) {
            Some(t) => t,
            None => self.upload(tile, rows, width),
        };
        self.remember(tile, rows, t.clone(), false);
        t
    }

    /// Keeps `dev` as the device copy of host `tile` (replacing an older copy of the
    /// same buffer), evicting the oldest entries beyond [`CACHE_TILES`], prefetched
    /// ones last.
    fn remember(&self, tile: &[f32], rows: usize, dev: Tensor<B, 2>, prefetched: bool) {
        let mut cache = self.cache.lock().unwrap();
        cache.retain(|c| c.ptr != tile.as_ptr() as usize);
        cache.push(Cached {
            ptr: tile.as_ptr() as usize,
            len: tile.len(),
            rows,
            tile: dev,
            prefetched,
        });
        while cache.len() > CACHE_TILES {
            let i = cache.iter().position(|c| !c.prefetched).unwrap_or(0);
            cache.remove(i);
        }
    }

    /// The tile [`Backend::prefetch`] uploaded from this very buffer, taken once.
    fn take_prefetched(&self, tile: &[f32], rows: usize) -> Option<Tensor<B, 2>> {
        let mut cache = self.cache.lock().unwrap();
        let c = cache.iter_mut().find(|c| {
            c.prefetched && c.ptr == tile.as_ptr() as usize && c.len == tile.len() && c.rows == rows
        })?;
        c.prefetched = false;
        Some(c.tile.clone())
    }

    /// The device copy of `tile` cached by `column_fisher`, or a fresh upload.
    fn device_tile(&self, tile: &[f32], rows: usize, width: usize) -> Tensor<B, 2> {
        {
            let cache = self.cache.lock().unwrap();
            if let Some(c) = cache
                .iter()
                .find(|c| c.ptr == tile.as_ptr() as usize && c.len == tile.len() && c.rows == rows)
            {
                self.stats.lock().unwrap().reused_tiles += 1;
                return c.tile.clone();
            }
        }
        self.upload(tile, rows, width)
    }

    fn column_f64(&self, v: &[f64]) -> Tensor<B, 2> {
        Tensor::<B, 2>::from_data(
            TensorData::new(v.to_vec(), [v.len(), 1]),
            (&self.device, DType::F64),
        )
    }

    fn row_f64(&self, v: &[f64]) -> Tensor<B, 2> {
        Tensor::<B, 2>::from_data(
            TensorData::new(v.to_vec(), [1, v.len()]),
            (&self.device, DType::F64),
        )
    }

    /// X (role X) or Y rows in f64 on the device, from the raw tile `g` (`[n × w]` f32).
    fn form(
        &self,
        g: Tensor<B, 2>,
        inv_t: &[f64],
        den: &Tensor<B, 2>,
        variant: Variant,
        role: Role,
    ) -> Tensor<B, 2> {
        let g = g.cast(DType::F64);
        let it = || self.column_f64(inv_t);
        match (variant, role) {
            (Variant::Unsigned, Role::X) => g.square().mul(it()).div(den.clone()),
            (Variant::Unsigned, Role::Y) => g.abs(),
            (Variant::Signed, Role::X) => g.div(den.clone()),
            (Variant::Signed, Role::Y) => g,
            (Variant::Symmetric, Role::X) => g.abs().mul(it().sqrt()).div(den.clone()),
            (Variant::Symmetric, Role::Y) => g.abs().mul(it().sqrt()),
        }
    }
}

impl<B: BurnB> BurnBackend<B> {
    /// [`Backend::fused_slice`]: Fisher, denominator, X, Y and M on the device; one
    /// blocking download (M and a finiteness check), the Fishers left for later.
    fn fused(&self, g: &FusedSlice<'_>) -> Result<FusedOut> {
        let w = g.width;
        let (ra, rb) = (g.a_inv_t.len(), g.b_inv_t.len());
        let (nx, ny) = (g.a_sel.len(), g.b_sel.len());
        g.check("burn")?;
        if ra == 0 || rb == 0 || nx == 0 || ny == 0 || w == 0 {
            return Err(gpu_err("fused_slice: empty tile"));
        }
        let ta = self.slice_tile(g.a.f32("burn")?, ra, w);
        let tb = self.slice_tile(g.b.f32("burn")?, rb, w);
        let fa = self.fisher_of(ta.clone(), g.a_inv_t);
        let fb = self.fisher_of(tb.clone(), g.b_inv_t);
        let pool = match g.pool {
            FisherPool::A => fa.clone(),
            FisherPool::B => fb.clone(),
            FisherPool::Pooled => fa.clone().add(fb.clone()).mul_scalar(0.5),
        };
        let den = pool.clamp_min(g.eps).add_scalar(g.lam);
        let x = self.form(
            self.rows_of(ta, ra, g.a_sel),
            g.a_sel_inv_t,
            &den,
            g.variant,
            Role::X,
        );
        let y = self.form(
            self.rows_of(tb, rb, g.b_sel),
            g.b_sel_inv_t,
            &den,
            g.variant,
            Role::Y,
        );
        let m = self.product(x, y, nx, ny, w);
        // I is a sum of non-negative terms: ΣI_A + ΣI_B is finite iff every value is.
        let check = fa.clone().sum().add(fb.clone().sum());
        let host = Tensor::cat(vec![m.reshape([nx * ny]), check], 0)
            .into_data()
            .to_vec::<f64>()
            .map_err(|e| gpu_err(format!("download of M: {e:?}")))?;
        let fisher_finite = host[nx * ny].is_finite();
        self.stats.lock().unwrap().fused_slices += 1;
        let later = |f: Tensor<B, 2>| -> Download {
            Box::new(move || {
                f.into_data()
                    .to_vec::<f64>()
                    .map_err(|e| gpu_err(format!("download of the Fisher: {e:?}")))
            })
        };
        Ok(FusedOut {
            m: host[..nx * ny].to_vec(),
            fisher_finite,
            fa: later(fa),
            fb: later(fb),
        })
    }
}

impl<B: BurnB> BurnBackend<B> {
    /// The device batch `[rows, n_max, c]` of the tile's shared factors (zero rows past
    /// each sample's n), reused when the same host factors were uploaded before.
    fn shared_batch(&self, t: &crate::source::FactorTile, n_max: usize) -> Tensor<B, 3> {
        let key: Vec<std::sync::Arc<Vec<f32>>> = t.samples.iter().map(|f| f.s.clone()).collect();
        {
            let cache = self.shared.lock().unwrap();
            let same = |b: &SharedBatch<B>| {
                b.n_max == n_max
                    && b.key.len() == key.len()
                    && b.key
                        .iter()
                        .zip(&key)
                        .all(|(x, y)| std::sync::Arc::ptr_eq(x, y))
            };
            if let Some(b) = cache.iter().find(|b| same(b)) {
                self.stats.lock().unwrap().shared_reused += 1;
                return b.dev.clone();
            }
        }
        let rows = t.samples.len();
        let mut host = vec![0f32; rows * n_max * t.c];
        host.par_chunks_mut(n_max * t.c)
            .zip(&t.samples)
            .for_each(|(dst, f)| dst[..f.s.len()].copy_from_slice(&f.s));
        let dev = self
            .upload(&host, rows * n_max, t.c)
            .reshape([rows, n_max, t.c]);
        let mut cache = self.shared.lock().unwrap();
        cache.push(SharedBatch {
            key,
            n_max,
            dev: dev.clone(),
        });
        if cache.len() > CACHE_SHARED {
            cache.remove(0);
        }
        dev
    }
}

impl<B: BurnB> Backend for BurnBackend<B> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn column_fisher(
        &self,
        tile: &[f32],
        inv_t: &[f64],
        width: usize,
        out: &mut [f64],
    ) -> Result<Option<(usize, usize)>> {
        let rows = inv_t.len();
        check_len("burn", "column_fisher tile", tile.len(), rows * width)?;
        check_len("burn", "column_fisher out", out.len(), width)?;
        if rows == 0 || width == 0 {
            out.iter_mut().for_each(|v| *v = 0.0);
            return Ok(None);
        }
        let f = self.fisher_of(self.slice_tile(tile, rows, width), inv_t);
        let host = f
            .into_data()
            .to_vec::<f64>()
            .map_err(|e| gpu_err(format!("download of the Fisher: {e:?}")))?;
        out.copy_from_slice(&host);
        // Σ of non-negative terms: I[k] is non-finite exactly when a value of column k is.
        if out.iter().any(|v| !v.is_finite()) {
            for (r, row) in tile.chunks_exact(width).enumerate() {
                if let Some(k) = row.iter().position(|v| !v.is_finite()) {
                    return Ok(Some((r, k)));
                }
            }
        }
        Ok(None)
    }

    fn fused_slice(&self, g: &FusedSlice<'_>) -> Result<FusedOut> {
        self.fused(g)
    }

    fn supports_fused(&self) -> bool {
        self.fused_enabled
    }

    fn wants_factors(&self) -> bool {
        true
    }

    fn prefetch_factors(
        &self,
        key: &[f32],
        t: &crate::source::FactorTile,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        check_len("burn", "factor tile key", key.len(), rows * width)?;
        check_len("burn", "factor tile samples", t.samples.len(), rows)?;
        check_len("burn", "factor tile width", t.r * t.c, width)?;
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let n_max = t.samples.iter().map(|f| f.n).max().unwrap_or(0).max(1);
        let mut p = vec![0f32; rows * n_max * t.r];
        p.par_chunks_mut(n_max * t.r)
            .zip(&t.samples)
            .for_each(|(dst, f)| dst[..f.p.len()].copy_from_slice(&f.p));
        let pd = self
            .upload(&p, rows * n_max, t.r)
            .reshape([rows, n_max, t.r]);
        let sd = self.shared_batch(t, n_max);
        // G_i = P_iᵀ S_i for every sample at once; zero rows past n_i add nothing. In the
        // exact precision the product is formed in f64 (CPU-identical to rounding).
        let pt = pd.swap_dims(1, 2);
        let g = match self.precision {
            // f32 matmul runs as TF32 on Hopper's tensor cores (10-bit mantissa). Split
            // each operand into a bf16 head and its remainder (a = a_hi + a_lo exactly):
            // a_hi·b_hi is exact in TF32, the cross terms lose ~2⁻²⁰, and a_lo·b_lo
            // (≤ 2⁻¹⁸ relative) is kept too, so the product is f32-accurate to ~1e-6.
            // A bf16 store's factors have no remainder, and their product is exact.
            // (A device without bf16 tensors — burn ndarray — multiplies in true f32.)
            GpuPrecision::F64 if self.bf16_uploads => {
                let split = |t: Tensor<B, 3>| {
                    let hi = t.clone().cast(DType::BF16).cast(DType::F32);
                    let lo = t.sub(hi.clone());
                    (hi, lo)
                };
                let (ph, pl) = split(pt);
                let (sh, sl) = split(sd);
                ph.clone()
                    .matmul(sh.clone())
                    .add(ph.matmul(sl.clone()))
                    .add(pl.clone().matmul(sh))
                    .add(pl.matmul(sl))
            }
            _ => pt.matmul(sd),
        };
        let dev = g.reshape([rows, width]);
        let _ = B::sync(&self.device);
        self.remember(key, rows, dev, true);
        let mut st = self.stats.lock().unwrap();
        st.prefetched_tiles += 1;
        st.factor_tiles += 1;
        Ok(())
    }

    fn prefetch(&self, tile: &[f32], rows: usize, width: usize) -> Result<()> {
        check_len("burn", "prefetch tile", tile.len(), rows * width)?;
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let dev = self.upload(tile, rows, width);
        self.remember(tile, rows, dev, true);
        self.stats.lock().unwrap().prefetched_tiles += 1;
        Ok(())
    }

    fn transform(
        &self,
        tile: &mut [f32],
        inv_t: &[f64],
        den: &[f64],
        variant: Variant,
        role: Role,
    ) -> Result<()> {
        self.cpu.transform(tile, inv_t, den, variant, role)
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
        let (nx, ny) = (a_inv_t.len(), b_inv_t.len());
        check_len("burn", "interference a", a.len(), nx * width)?;
        check_len("burn", "interference b", b.len(), ny * width)?;
        check_len("burn", "interference out", out.len(), nx * ny)?;
        if nx == 0 || ny == 0 || width == 0 {
            return Ok(());
        }
        let ga = self.device_tile(a, nx, width);
        let gb = self.device_tile(b, ny, width);
        let den_t = self.row_f64(den);
        let x = self.form(ga, a_inv_t, &den_t, variant, Role::X);
        let y = self.form(gb, b_inv_t, &den_t, variant, Role::Y);
        let m = self.product(x, y, nx, ny, width);
        let host = m
            .into_data()
            .to_vec::<f64>()
            .map_err(|e| gpu_err(format!("download of M: {e:?}")))?;
        for (o, v) in out.iter_mut().zip(&host) {
            *o += v;
        }
        Ok(())
    }

    fn whitened_gram(&self, tile: &[f32], scale: &[f64], out: &mut [f64]) -> Result<()> {
        let width = scale.len();
        if width == 0 {
            return Ok(());
        }
        let n = tile.len() / width;
        check_len("burn", "whitened_gram tile", tile.len(), n * width)?;
        check_len("burn", "whitened_gram out", out.len(), n * n)?;
        if n == 0 {
            return Ok(());
        }
        // U = G · diag(scale) on the device in f64, then U·Uᵀ in the backend's precision.
        let u = self
            .upload(tile, n, width)
            .cast(DType::F64)
            .mul(self.row_f64(scale));
        let g = self.product(u.clone(), u, n, n, width);
        let host = g
            .into_data()
            .to_vec::<f64>()
            .map_err(|e| gpu_err(format!("download of the Gram: {e:?}")))?;
        for (o, v) in out.iter_mut().zip(&host) {
            *o += v;
        }
        Ok(())
    }

    fn gram_accumulate(&self, x: &[f32], y: &[f32], width: usize, out: &mut [f64]) -> Result<()> {
        self.cpu.gram_accumulate(x, y, width, out)
    }
}
