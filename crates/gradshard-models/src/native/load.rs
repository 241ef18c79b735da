//! Loading a checkpoint into the native engine: which models it runs, and the
//! weights as host f32 buffers (with the transposes small models keep).

use super::*;

impl NativeEngine {
    /// Loads `dir` on the host, tracking `set`. Fails with
    /// [`Error::InvalidArgument`] when the model is not one this engine runs.
    pub(crate) fn load(dir: &std::path::Path, set: ParamSet) -> Result<Self> {
        let opened = open_checked(dir)?;
        if let Some(why) = Self::unsupported(&opened.config, set) {
            return Err(Error::InvalidArgument(format!(
                "the native CPU engine does not run this model ({why})"
            )));
        }
        let c = match &opened.config {
            ModelConfig::Decoder(c) => c.clone(),
            ModelConfig::Gpt2(_) => unreachable!("checked by unsupported"),
        };
        let spec = &opened.spec.entries;
        let find = |name: &str| -> Result<(usize, Vec<f32>)> {
            let i = spec
                .iter()
                .position(|e| e.name == name)
                .ok_or_else(|| Error::InvalidArgument(format!("internal: {name} not in spec")))?;
            Ok((i, opened.ckpt.read_f32(&spec[i].stored)?))
        };
        let r = gradshard_core::model::roles(c.arch);
        let small = Self::small(&c);
        let nm = |t: &str, i: usize| format!("{}.weight", crate::decoder::name(t, i, "model."));
        let scale = |w: Vec<f32>| -> Vec<f32> {
            if c.norm == NormKind::RmsOffset {
                w.into_iter().map(|w| w + 1.0).collect()
            } else {
                w
            }
        };
        let lin = |t: &str, i: usize, bias: bool| -> Result<Lin> {
            let (idx, w) = find(&nm(t, i))?;
            let shape = &spec[idx].shape;
            let b = if bias {
                let name = format!("{}.bias", crate::decoder::name(t, i, "model."));
                Some(find(&name)?.1)
            } else {
                None
            };
            let (out, inp) = (shape[0], shape[1]);
            Ok(Lin {
                idx,
                wt: small.then(|| transpose(&w, out, inp)),
                w,
                b,
                out,
                inp,
            })
        };
        let (ropes, layer_rope) = crate::decoder::rope_tables(&c);
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, &rope) in layer_rope.iter().enumerate() {
            let kind = &c.layer_kinds[i];
            let norm = |slot: usize| -> Result<Vec<f32>> {
                Ok(scale(
                    find(&nm(r.norms[slot].expect("pre-norm role"), i))?.1,
                ))
            };
            layers.push(Layer {
                n_attn: norm(0)?,
                n_mlp: norm(2)?,
                q: lin(r.qkv[0], i, c.qkv_bias)?,
                k: lin(r.qkv[1], i, c.qkv_bias)?,
                v: lin(r.qkv[2], i, c.qkv_bias)?,
                o: lin(r.o, i, c.o_bias)?,
                gate: lin(r.mlp_in, i, c.mlp_bias)?,
                up: lin(r.mlp_up.expect("gated MLP role"), i, c.mlp_bias)?,
                down: lin(r.mlp_down, i, c.mlp_bias)?,
                rope,
                window: kind.sliding_window,
            });
        }
        let embed = find(&nm(r.embed, 0))?.1;
        let final_norm = scale(find(&nm(r.final_norm.expect("final norm role"), 0))?.1);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(find(&format!("{}.weight", r.lm_head))?.1)
        };
        let lm_head_t = small.then(|| {
            transpose(
                lm_head.as_deref().unwrap_or(&embed),
                c.vocab_size,
                c.hidden_size,
            )
        });
        let params: Vec<ParamInfo> = spec
            .iter()
            .map(|e| ParamInfo {
                name: e.name.clone(),
                shape: e.shape.clone(),
                kind: e.kind,
            })
            .collect();
        let tracked: Vec<bool> = params
            .iter()
            .map(|p| p.shape.len() == 2 && set.contains(p.kind))
            .collect();
        // Every tracked weight must be one of the projections this engine taps.
        let tapped: Vec<usize> = layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .map(|l| l.idx)
            .collect();
        if let Some(p) = params
            .iter()
            .enumerate()
            .find(|(i, _)| tracked[*i] && !tapped.contains(i))
        {
            return Err(Error::InvalidArgument(format!(
                "the native CPU engine cannot track {}",
                p.1.name
            )));
        }
        let pools = (0..rayon::current_num_threads())
            .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Backend {
                context: "native CPU engine".into(),
                msg: format!("starting worker threads: {e}"),
            })?;
        Ok(NativeEngine {
            pools,
            config: opened.config.clone(),
            c,
            params,
            tracked,
            embed,
            layers,
            final_norm,
            lm_head,
            lm_head_t,
            ropes,
        })
    }
}
