//! A loaded burn model: the checkpoint opened and checked against its
//! description, GPT-2 (`gpt2.rs`) or the generic decoder (`decoder.rs`) built
//! from it, and the forward pass that dispatches to either. What both share
//! (weights registry, loader, gradient taps) is in `layers.rs`.

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

use crate::error::{Error, Result};
use crate::gpt2::{gpt2_forward, gpt2_spec, load_gpt2, Gpt2Net};
use crate::layers::{Ctx, Ignorable, Loader, SpecBuilder};
pub use crate::layers::{ParamInfo, ParamKind, ParamSet};
use crate::weights::{Checkpoint, WeightSpec};
use gradshard_core::model::ModelConfig;

enum Net<B: Backend> {
    Gpt2(Gpt2Net<B>),
    Decoder(crate::decoder::DecoderNet<B>),
}

/// A loaded model on backend `B` (the inner, non-autodiff backend).
pub(crate) struct Model<B: Backend> {
    pub(crate) config: ModelConfig,
    /// Every stored weight, in registry order; `Lin::idx` points here.
    pub(crate) params: Vec<ParamInfo>,
    net: Net<B>,
    pub(crate) device: B::Device,
}

/// The tensors (Hugging Face names and shapes) a checkpoint of `config` holds, in
/// the order the loader lists them (GPT-2 with `transformer.` prefixes).
pub fn checkpoint_spec(config: &ModelConfig) -> Vec<WeightSpec> {
    let s = match config {
        ModelConfig::Gpt2(c) => gpt2_spec(c, false),
        ModelConfig::Decoder(c) => crate::decoder::spec(c, &crate::decoder::default_root(c)),
    };
    s.entries
        .into_iter()
        .map(|e| WeightSpec {
            name: e.stored,
            shape: e.shape,
        })
        .collect()
}

/// Every weight of a model of `config` (Hugging Face names with the default
/// prefix, shapes, roles), as a loaded model lists them in
/// [`GradModel::params`](crate::GradModel::params), without reading a checkpoint.
pub fn config_params(config: &ModelConfig) -> Vec<ParamInfo> {
    let s = match config {
        ModelConfig::Gpt2(c) => gpt2_spec(c, false),
        ModelConfig::Decoder(c) => crate::decoder::spec(c, &crate::decoder::default_root(c)),
    };
    s.entries
        .into_iter()
        .map(|e| ParamInfo {
            name: e.name,
            shape: e.shape,
            kind: e.kind,
        })
        .collect()
}

/// A checkpoint opened and checked against its config: the config, the mapped
/// files and the weight spec (canonical names, stored names, shapes, kinds).
/// Shared by the burn model and the native CPU engine (`native.rs`).
pub(crate) struct Opened {
    pub(crate) config: ModelConfig,
    pub(crate) ckpt: Checkpoint,
    pub(crate) spec: SpecBuilder,
}

/// Reads `dir/config.json`, opens the checkpoint in `dir` and validates every
/// tensor's presence and shape against the architecture's spec.
pub(crate) fn open_checked(dir: &Path) -> Result<Opened> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir)?;
    let arch = config.arch();
    let (spec, ignorable): (SpecBuilder, Ignorable) = match &config {
        ModelConfig::Decoder(c) => crate::decoder::spec_for_checkpoint(c, &ckpt),
        ModelConfig::Gpt2(c) => {
            let legacy = ckpt.shape("transformer.wte.weight").is_none()
                && ckpt.shape("wte.weight").is_some();
            let tied = c.tie_word_embeddings;
            (
                gpt2_spec(c, legacy),
                Box::new(move |n: &str| {
                    // causal-mask buffers saved by old transformers versions
                    n.ends_with(".attn.bias") && n.contains("h.")
                        || n.ends_with(".attn.masked_bias")
                        || (tied && n == "lm_head.weight")
                }),
            )
        }
    };
    let wspec: Vec<WeightSpec> = spec
        .entries
        .iter()
        .map(|e| WeightSpec {
            name: e.stored.clone(),
            shape: e.shape.clone(),
        })
        .collect();
    ckpt.validate(&wspec, &*ignorable, arch.as_str())?;
    Ok(Opened { config, ckpt, spec })
}

impl<B: Backend> Model<B> {
    /// Load `dir/config.json` and the checkpoint in `dir` onto `device`.
    pub(crate) fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let Opened { config, ckpt, spec } = open_checked(dir)?;
        let ld = Loader::<B> {
            ckpt: &ckpt,
            spec: &spec.entries,
            device,
        };
        let net = match &config {
            ModelConfig::Gpt2(c) => Net::Gpt2(load_gpt2(&ld, c)?),
            ModelConfig::Decoder(c) => Net::Decoder(crate::decoder::load(&ld, c)?),
        };
        let params = spec
            .entries
            .into_iter()
            .map(|e| ParamInfo {
                name: e.name,
                shape: e.shape,
                kind: e.kind,
            })
            .collect();
        Ok(Model {
            config,
            params,
            net,
            device: device.clone(),
        })
    }
}

impl<B: Backend> Model<B> {
    /// Logits [b, t, V] for input ids [b, t] (positions 0..t).
    pub(crate) fn forward<A>(
        &self,
        ids: Tensor<A, 2, Int>,
        ctx: &mut Ctx<'_, A>,
    ) -> Result<Tensor<A, 3>>
    where
        A: AutodiffBackend<InnerBackend = B>,
    {
        match &self.net {
            Net::Decoder(n) => {
                let device = ids.device();
                crate::decoder::forward(n, ids, ctx, &device)
            }
            Net::Gpt2(n) => {
                let t = ids.dims()[1];
                if t > n.cfg.n_positions {
                    return Err(Error::InvalidArgument(format!(
                        "sequence of {t} input positions exceeds gpt2 n_positions = {}",
                        n.cfg.n_positions
                    )));
                }
                let device = ids.device();
                Ok(gpt2_forward(n, ids, ctx, &device))
            }
        }
    }
}
