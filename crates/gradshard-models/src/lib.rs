//! Hugging Face causal language models in burn, for per-sample gradients.
//!
//! - Architectures, all computing in f32 (f32/bf16/f16 checkpoints are
//!   widened on load): one generic decoder (`decoder.rs`) assembled from a
//!   [`DecoderConfig`] that `gradshard_core::model` derives from `config.json` — `llama`,
//!   `mistral`, `qwen2`, `gpt_neox`, `phi3`, `bert` (`is_decoder`), `qwen3`,
//!   `gemma2`, `gemma3_text` / `gemma3`, `olmo2` (docs/models.md) — and `gpt2`
//!   (learned positions, LayerNorm, Conv1D in the checkpoint's [in, out]
//!   layout, tied embeddings; `model.rs`).
//! - g = d(Σ over predicted positions of cross-entropy)/dW per sample, for a
//!   chosen [`ParamSet`], under HF parameter names and HF shapes, either one
//!   sample per backward or several per backward ([`GradModel::grads_batched`]),
//!   or as factors G = AᵀB from the batched pass ([`GradModel::factors`],
//!   [`TensorFactors`]).
//! - [`write_grads`] implements `gradshard grads` (one `<id>.safetensors` per
//!   sample).
//!
//! Entry points: [`GradModel::load`], [`SampleReader`], [`GradModel::for_each_grads`],
//! [`write_grads`].

pub mod data;
mod decoder;
pub mod device;
pub mod error;
mod gpt2;
pub mod grads;
mod layers;
pub mod model;
mod native;
pub mod random;
pub mod weights;
pub mod write;

pub use data::{
    encode, load_tokenizer, ReaderOptions, SampleId, SampleReader, Skipped, TokenSample,
};
#[cfg(feature = "cuda")]
pub use device::CudaBackend;
pub use device::{cuda_available, CpuBackend, CpuEngine, Device, GradModel};
pub use error::{Error, Result};
pub use grads::{Engine, SampleFactors, SampleGrads, SampleLoss, TensorFactors, TensorGrad};
/// The model description lives in `gradshard-core` (config.json is parsed there
/// once); re-exported here for the forward passes' users.
pub use gradshard_core::model::{
    Activation, Arch, DecoderConfig, Gpt2Config, ModelConfig, ModelShape, RopeConfig, RopeScaling,
};
pub use model::{checkpoint_spec, config_params, ParamInfo, ParamKind, ParamSet};
pub use random::{
    checkpoint_bytes, write_random_checkpoint, write_random_tasks, RandomCheckpoint, WeightDtype,
};
pub use write::{write_grads, write_sample, GradsOptions, GradsReport, Progress};
