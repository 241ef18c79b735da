//! Device selection and the backend-erased [`GradModel`].
//!
//! `Device::Cpu` runs on `Autodiff<Flex>` (burn's flex CPU backend, f32, gemm
//! with AVX-512 kernels where the CPU has them); `Device::Cuda(n)` runs on
//! `Autodiff<Cuda<f32>>` and is only usable when the crate is built with the
//! `cuda` feature (otherwise loading returns [`Error::Device`]). The same
//! generic [`Engine`] code runs on both.
//!
//! Precision: on CPU everything is IEEE f32 (gradients agree with the float64
//! fixtures to ~1e-6). On CUDA, burn 0.21's matmul (cubek-matmul) stages f32
//! operands as TF32 on tensor cores, so losses differ by ~2e-4 and gradients
//! by ~3e-3 (relative, measured on an H100 with the fixtures); use the CPU
//! when reference-level agreement matters.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::data::TokenSample;
use crate::error::{Error, Result};
use crate::grads::{Engine, SampleFactors, SampleGrads, SampleLoss};
use crate::layers::{ParamInfo, ParamSet};
use gradshard_core::model::ModelConfig;

/// CPU backend with autodiff (burn flex, f32).
pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;

/// CUDA backend with autodiff (f32 floats).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda<f32>>;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// burn flex on the host CPU.
    #[default]
    Cpu,
    /// CUDA GPU with this ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "unknown device {s:?} (use cpu, cuda or cuda:N)"
                    ))
                }),
        }
    }
}

impl Device {
    /// Whether this build can use the device at all (not whether a GPU is present).
    pub fn compiled_in(self) -> bool {
        match self {
            Device::Cpu => true,
            Device::Cuda(_) => cfg!(feature = "cuda"),
        }
    }
}

/// Returns true when CUDA device `n` can run a tiny computation. Always false
/// without the `cuda` feature. Backend initialisation failures (no driver, no
/// GPU) surface as panics inside cubecl; they are caught here.
pub fn cuda_available(n: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        use burn::tensor::Tensor;
        let r = std::panic::catch_unwind(|| {
            let dev = burn::backend::cuda::CudaDevice::new(n);
            let t = Tensor::<burn::backend::Cuda<f32>, 1>::from_floats([1.0f32, 2.0], &dev);
            t.sum().into_scalar()
        });
        matches!(r, Ok(v) if v == 3.0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = n;
        false
    }
}

/// Which engine runs a model on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CpuEngine {
    /// The native engine when it runs the model (LLaMA-style decoders with
    /// the `attn` or `attn,mlp` sets, see `native.rs`), burn otherwise.
    #[default]
    Auto,
    /// The native engine; loading fails when it does not run the model.
    Native,
    /// burn's autodiff on the flex backend (every architecture).
    Burn,
}

impl fmt::Display for CpuEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuEngine::Auto => "auto",
            CpuEngine::Native => "native",
            CpuEngine::Burn => "burn",
        })
    }
}

impl FromStr for CpuEngine {
    type Err = Error;
    /// `auto`, `native` or `burn`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(CpuEngine::Auto),
            "native" => Ok(CpuEngine::Native),
            "burn" => Ok(CpuEngine::Burn),
            _ => Err(Error::InvalidArgument(format!(
                "unknown CPU engine {s:?} (use auto, native or burn)"
            ))),
        }
    }
}

/// Boxed: engines are large (a few KB of tensor handles) and live long.
enum AnyEngine {
    Native(Box<crate::native::NativeEngine>),
    Cpu(Box<Engine<CpuBackend>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Engine<CudaBackend>>),
}

/// Runs `$body` with `$e` bound to the concrete engine.
macro_rules! dispatch {
    ($self:expr, $e:ident => $body:expr) => {
        match &$self.engine {
            AnyEngine::Native($e) => $body,
            AnyEngine::Cpu($e) => $body,
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda($e) => $body,
        }
    };
}

/// Runs `$body` with `$e` bound to a burn engine (never called for the native one).
macro_rules! dispatch_burn {
    ($self:expr, $e:ident => $body:expr) => {
        match &$self.engine {
            AnyEngine::Native(_) => unreachable!("handled by the caller"),
            AnyEngine::Cpu($e) => $body,
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda($e) => $body,
        }
    };
}

/// A loaded model on some device, computing per-sample gradients of the
/// tracked weights. Not `Sync`-shared across threads: use one per worker.
pub struct GradModel {
    engine: AnyEngine,
    device: Device,
    params: ParamSet,
}

impl GradModel {
    /// Load `dir` (config.json + model.safetensors or a sharded index) onto
    /// `device`; on the CPU with the engine [`CpuEngine::Auto`] picks.
    pub fn load(dir: &Path, device: Device, params: ParamSet) -> Result<Self> {
        Self::load_with(dir, device, params, CpuEngine::Auto)
    }

    /// [`GradModel::load`] with the CPU engine chosen (ignored on CUDA).
    pub fn load_with(
        dir: &Path,
        device: Device,
        params: ParamSet,
        cpu_engine: CpuEngine,
    ) -> Result<Self> {
        let engine = match device {
            Device::Cpu => {
                let native = match cpu_engine {
                    CpuEngine::Burn => false,
                    CpuEngine::Native => true,
                    CpuEngine::Auto => {
                        let config = ModelConfig::from_file(&dir.join("config.json"))?;
                        crate::native::NativeEngine::unsupported(&config, params).is_none()
                    }
                };
                if native {
                    AnyEngine::Native(Box::new(crate::native::NativeEngine::load(dir, params)?))
                } else {
                    AnyEngine::Cpu(Box::new(Engine::load(
                        dir,
                        &burn::backend::flex::FlexDevice,
                        params,
                    )?))
                }
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                if !cuda_available(n) {
                    return Err(Error::Device {
                        device: device.to_string(),
                        msg: "no usable CUDA device".into(),
                    });
                }
                AnyEngine::Cuda(Box::new(Engine::load(
                    dir,
                    &burn::backend::cuda::CudaDevice::new(n),
                    params,
                )?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                return Err(Error::Device {
                    device: device.to_string(),
                    msg: "this build has no CUDA support (rebuild with --features cuda)".into(),
                })
            }
        };
        Ok(GradModel {
            engine,
            device,
            params,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Which engine computes: `native`, `burn` (CPU) or `burn-cuda`.
    pub fn engine_name(&self) -> &'static str {
        match &self.engine {
            AnyEngine::Native(_) => "native",
            AnyEngine::Cpu(_) => "burn",
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(_) => "burn-cuda",
        }
    }

    pub fn param_set(&self) -> ParamSet {
        self.params
    }

    pub fn config(&self) -> &ModelConfig {
        dispatch!(self, e => e.config())
    }

    /// Every stored weight (names, shapes, kinds) in checkpoint order.
    pub fn params(&self) -> &[ParamInfo] {
        dispatch!(self, e => e.params())
    }

    /// The weights whose gradients are returned, in the order returned.
    pub fn tracked_params(&self) -> Vec<ParamInfo> {
        dispatch!(self, e => e.tracked_params())
    }

    /// Loss sums (no gradients) of `samples`, one per sample.
    pub fn loss(&self, samples: &[TokenSample]) -> Result<Vec<SampleLoss>> {
        dispatch!(self, e => e.loss(samples))
    }

    /// Per-sample gradients, one backward per sample (reference path).
    pub fn grads_loop(&self, sample: &TokenSample) -> Result<SampleGrads> {
        match &self.engine {
            AnyEngine::Native(e) => Ok(e
                .grads(std::slice::from_ref(sample), true)?
                .pop()
                .expect("one sample in, one out")),
            _ => dispatch_burn!(self, e => e.grads_loop(sample)),
        }
    }

    /// Per-sample gradients of all `samples` from one backward pass.
    pub fn grads_batched(&self, samples: &[TokenSample]) -> Result<Vec<SampleGrads>> {
        match &self.engine {
            AnyEngine::Native(e) => e.grads(samples, false),
            _ => dispatch_burn!(self, e => e.grads_batched(samples)),
        }
    }

    /// Per-sample gradients for a chunk: the loop path when it holds one
    /// sample, the batched path otherwise.
    pub fn grads(&self, samples: &[TokenSample]) -> Result<Vec<SampleGrads>> {
        match samples {
            [one] => Ok(vec![self.grads_loop(one)?]),
            _ => self.grads_batched(samples),
        }
    }

    /// Per-sample gradient factors (G = AᵀB per tracked weight, see
    /// [`crate::TensorFactors`]) of all `samples` from one backward pass.
    pub fn factors(&self, samples: &[TokenSample]) -> Result<Vec<SampleFactors>> {
        match &self.engine {
            AnyEngine::Native(e) => e.factors(samples, false),
            _ => dispatch_burn!(self, e => e.factors_batched(samples)),
        }
    }

    /// Streams per-sample gradients: reads `samples` in chunks of `batch`,
    /// computes each chunk and hands every sample's result to `sink` before
    /// reading the next chunk, so at most `batch` samples are in memory.
    /// Stops at the first error (from the input, the model or `sink`).
    /// Returns the number of samples processed.
    pub fn for_each_grads<I, F>(&self, samples: I, batch: usize, sink: F) -> Result<usize>
    where
        I: IntoIterator<Item = Result<TokenSample>>,
        F: FnMut(SampleGrads) -> Result<()>,
    {
        if let (AnyEngine::Native(e), 1) = (&self.engine, batch) {
            // One forward and backward per sample, several samples in flight
            // (one per thread) where the engine runs them side by side.
            return for_each_chunk(samples, e.in_flight(), |c| e.grads(c, true), sink);
        }
        for_each_chunk(samples, batch, |chunk| self.grads(chunk), sink)
    }

    /// [`GradModel::for_each_grads`] yielding factors ([`GradModel::factors`])
    /// instead of gradients: same chunking by `batch`, same error handling.
    /// Every chunk, a single sample included, takes the batched (tap) path.
    pub fn for_each_factors<I, F>(&self, samples: I, batch: usize, sink: F) -> Result<usize>
    where
        I: IntoIterator<Item = Result<TokenSample>>,
        F: FnMut(SampleFactors) -> Result<()>,
    {
        if let (AnyEngine::Native(e), 1) = (&self.engine, batch) {
            return for_each_chunk(samples, e.in_flight(), |c| e.factors(c, true), sink);
        }
        for_each_chunk(samples, batch, |chunk| self.factors(chunk), sink)
    }
}

/// Reads `samples` in chunks of `batch`, runs `compute` on each chunk and
/// hands every result to `sink` before reading the next chunk; stops at the
/// first error; returns the number of results handed over.
fn for_each_chunk<I, T, C, F>(
    samples: I,
    batch: usize,
    mut compute: C,
    mut sink: F,
) -> Result<usize>
where
    I: IntoIterator<Item = Result<TokenSample>>,
    C: FnMut(&[TokenSample]) -> Result<Vec<T>>,
    F: FnMut(T) -> Result<()>,
{
    if batch == 0 {
        return Err(Error::InvalidArgument("batch size must be >= 1".into()));
    }
    let mut it = samples.into_iter();
    let mut done = 0;
    loop {
        let mut chunk = Vec::with_capacity(batch);
        for s in it.by_ref() {
            chunk.push(s?);
            if chunk.len() == batch {
                break;
            }
        }
        if chunk.is_empty() {
            return Ok(done);
        }
        for g in compute(&chunk)? {
            sink(g)?;
            done += 1;
        }
    }
}
