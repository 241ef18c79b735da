//! Attention head-slice geometry (docs/design.md §3).
//!
//! Every (layer, block, head) slice is `d × D` values in one canonical
//! orientation: element `[j, k]` is the weight between head dimension `j` and
//! model dimension `k`. Slices taken from columns of the stored tensor (O of
//! split Linear layouts, every GPT-2 `c_attn` slice) are transposed into it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::Block;

/// How the attention weights of one layer are laid out in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Separate `[out, in]` Linear weights for Q, K, V and O (LLaMA, Mistral, Qwen, Gemma, BERT).
    SplitLinear,
    /// One `qkv_proj` `[(H + 2 H_kv)·d, D]` Linear, Q rows then K rows then V rows (Phi-3).
    FusedQkv,
    /// GPT-NeoX `query_key_value` `[3·H·d, D]`, interleaved per head: q, k, v rows of head 0, then head 1 …
    NeoxInterleaved,
    /// GPT-2 Conv1D, stored `[in, out]`: `c_attn` `[D, 3D]` (heads own columns), `c_proj` `[D, D]` (heads own rows).
    Gpt2Conv1d,
}

/// Which dimension of the stored 2-D tensor a slice takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// Rows `start..start+len` of a row-major `[rows, cols]` tensor: already `d × D`.
    Rows,
    /// Columns `start..start+len`: transposed into `d × D` on write.
    Cols,
}

/// Where one head slice lives inside a Hugging Face tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    pub tensor: String,
    pub tensor_shape: [usize; 2],
    pub axis: Axis,
    pub start: usize,
    pub len: usize,
}

impl SliceSpec {
    /// Number of values in the slice (`d × D`).
    pub fn numel(&self) -> usize {
        match self.axis {
            Axis::Rows => self.len * self.tensor_shape[1],
            Axis::Cols => self.len * self.tensor_shape[0],
        }
    }

    /// `(d, D)` of the canonical slice.
    pub fn canonical_shape(&self) -> [usize; 2] {
        match self.axis {
            Axis::Rows => [self.len, self.tensor_shape[1]],
            Axis::Cols => [self.len, self.tensor_shape[0]],
        }
    }

    /// Cuts this slice out of the full row-major tensor, in canonical `d × D` orientation.
    pub fn cut<T: Copy>(&self, full: &[T]) -> Result<Vec<T>> {
        let [rows, cols] = self.tensor_shape;
        if full.len() != rows * cols {
            return Err(Error::LengthMismatch {
                tensor: self.tensor.clone(),
                shape: vec![rows, cols],
                len: full.len(),
            });
        }
        let mut out = Vec::with_capacity(self.numel());
        match self.axis {
            Axis::Rows => {
                out.extend_from_slice(&full[self.start * cols..(self.start + self.len) * cols])
            }
            Axis::Cols => {
                for j in 0..self.len {
                    let c = self.start + j;
                    out.extend((0..rows).map(|k| full[k * cols + c]));
                }
            }
        }
        Ok(out)
    }

    /// Writes a canonical slice back into its place in a full row-major tensor (the inverse of [`cut`](Self::cut)).
    pub fn paste<T: Copy>(&self, slice: &[T], full: &mut [T]) -> Result<()> {
        let [rows, cols] = self.tensor_shape;
        if full.len() != rows * cols || slice.len() != self.numel() {
            return Err(Error::LengthMismatch {
                tensor: self.tensor.clone(),
                shape: vec![rows, cols],
                len: full.len(),
            });
        }
        match self.axis {
            Axis::Rows => {
                full[self.start * cols..(self.start + self.len) * cols].copy_from_slice(slice)
            }
            Axis::Cols => {
                for j in 0..self.len {
                    for k in 0..rows {
                        full[k * cols + self.start + j] = slice[j * rows + k];
                    }
                }
            }
        }
        Ok(())
    }
}

/// A stored attention tensor of one layer and the blocks it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnTensor {
    pub name: String,
    pub shape: [usize; 2],
    pub layer: usize,
    pub blocks: Vec<Block>,
}

/// A non-attention 2-D tensor (MLP and others), stored as row-group frames so
/// that a row range can be read alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtherTensor {
    pub name: String,
    pub shape: [usize; 2],
    /// Rows per frame; the last group may be shorter.
    pub rows_per_group: usize,
    /// Dimension that indexes output channels: 0 for `[out, in]` Linear, 1 for Conv1D `[in, out]`.
    pub out_axis: u8,
    /// Factored stores (format v2): tensors naming the same group share one shared
    /// factor S per sample (e.g. `gate_proj` and `up_proj` read the same MLP input);
    /// `None`: the tensor has a shared factor of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor_group: Option<String>,
}

impl OtherTensor {
    /// Target values per row-group frame (about 1 Mi values, like a 7B head slice of 128 × 4096 … 8192).
    pub const DEFAULT_GROUP_VALUES: usize = 1 << 20;

    pub fn new(name: String, shape: [usize; 2], out_axis: u8) -> OtherTensor {
        let rows_per_group =
            (Self::DEFAULT_GROUP_VALUES / shape[1].max(1)).clamp(1, shape[0].max(1));
        let factor_group = Self::input_group(&name);
        OtherTensor {
            name,
            shape,
            rows_per_group,
            out_axis,
            factor_group,
        }
    }

    /// The factor group of a tensor that shares its input with others: LLaMA-style
    /// `…mlp.gate_proj.weight` and `…mlp.up_proj.weight` both read the MLP input, so
    /// a factored sample stores that input once (`…mlp.input`).
    pub fn input_group(name: &str) -> Option<String> {
        ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .map(|prefix| format!("{prefix}mlp.input"))
    }

    pub fn groups(&self) -> usize {
        self.shape[0].div_ceil(self.rows_per_group)
    }

    /// Rows `[start, end)` of group `g`.
    pub fn group_rows(&self, g: usize) -> (usize, usize) {
        let start = g * self.rows_per_group;
        (start, (start + self.rows_per_group).min(self.shape[0]))
    }
}

/// The attention geometry of one model, derived from its `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub model_type: String,
    pub layout: Layout,
    /// Number of transformer layers L.
    pub layers: usize,
    /// Model (hidden) size D.
    pub hidden: usize,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads H_kv (H for MHA, 1 for MQA).
    pub kv_heads: usize,
    /// Head size d (= d_k = d_v for every supported architecture).
    pub head_dim: usize,
    /// Name prefix in front of the per-layer names, e.g. `model.` or `transformer.`.
    pub root: String,
}

impl Geometry {
    /// Upper bounds that keep every derived size far from overflow.
    pub const MAX_LAYERS: usize = crate::model::limits::LAYERS;
    pub const MAX_HEADS: usize = crate::model::limits::HEADS;
    pub const MAX_HIDDEN: usize = crate::model::limits::HIDDEN;

    /// The geometry of the model whose `config.json` is at `path` (or in the
    /// directory `path`), read through the model description
    /// ([`ModelShape`](crate::model::ModelShape)).
    pub fn from_config_path(path: &Path) -> Result<Geometry> {
        crate::model::ModelShape::from_path(path)?.geometry()
    }

    /// Builds and validates a geometry directly.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model_type: &str,
        layout: Layout,
        root: &str,
        layers: usize,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Geometry> {
        for (what, value, limit) in [
            ("layers", layers, Self::MAX_LAYERS),
            ("heads", heads, Self::MAX_HEADS),
            ("kv heads", kv_heads, Self::MAX_HEADS),
            ("hidden size", hidden, Self::MAX_HIDDEN),
            ("head_dim", head_dim, Self::MAX_HIDDEN),
        ] {
            if value == 0 || value > limit {
                return Err(Error::OutOfRange { what, value, limit });
            }
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(Error::ConfigField {
                field: "num_key_value_heads".into(),
                problem: format!("{kv_heads} does not divide num_attention_heads {heads}"),
            });
        }
        if matches!(layout, Layout::Gpt2Conv1d | Layout::NeoxInterleaved) && kv_heads != heads {
            return Err(Error::ConfigField {
                field: "num_key_value_heads".into(),
                problem: format!("{model_type} has no grouped-query attention"),
            });
        }
        if layout == Layout::Gpt2Conv1d && heads * head_dim != hidden {
            return Err(Error::ConfigField {
                field: "n_embd".into(),
                problem: format!(
                    "GPT-2 needs n_head × head_dim = n_embd, got {heads} × {head_dim} ≠ {hidden}"
                ),
            });
        }
        Ok(Geometry {
            model_type: model_type.to_string(),
            layout,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            root: root.to_string(),
        })
    }

    /// Number of stored heads of a block: H for Q and O, H_kv for K and V.
    pub fn heads_of(&self, block: Block) -> usize {
        if block.is_kv() {
            self.kv_heads
        } else {
            self.heads
        }
    }

    /// The key/value head a query head reads: `kv(h) = h / (H / H_kv)`.
    pub fn kv_head_of(&self, query_head: usize) -> usize {
        query_head / (self.heads / self.kv_heads)
    }

    /// Values in one head slice (`d × D`).
    pub fn slice_numel(&self) -> usize {
        self.head_dim * self.hidden
    }

    fn layer_name(&self, layer: usize, tail: &str) -> String {
        match self.model_type.as_str() {
            "gpt2" => format!("{}h.{layer}.attn.{tail}.weight", self.root),
            "gpt_neox" => format!("{}layers.{layer}.attention.{tail}.weight", self.root),
            "bert" => format!("{}encoder.layer.{layer}.attention.{tail}.weight", self.root),
            _ => format!("{}layers.{layer}.self_attn.{tail}.weight", self.root),
        }
    }

    /// The stored attention tensors of one layer with their expected shapes.
    pub fn attn_tensors(&self, layer: usize) -> Vec<AttnTensor> {
        let (h, kv, d, dm) = (self.heads, self.kv_heads, self.head_dim, self.hidden);
        let t = |tail: &str, shape: [usize; 2], blocks: &[Block]| AttnTensor {
            name: self.layer_name(layer, tail),
            shape,
            layer,
            blocks: blocks.to_vec(),
        };
        let bert = self.model_type == "bert";
        match self.layout {
            Layout::SplitLinear => vec![
                t(
                    if bert { "self.query" } else { "q_proj" },
                    [h * d, dm],
                    &[Block::Q],
                ),
                t(
                    if bert { "self.key" } else { "k_proj" },
                    [kv * d, dm],
                    &[Block::K],
                ),
                t(
                    if bert { "self.value" } else { "v_proj" },
                    [kv * d, dm],
                    &[Block::V],
                ),
                t(
                    if bert { "output.dense" } else { "o_proj" },
                    [dm, h * d],
                    &[Block::O],
                ),
            ],
            Layout::FusedQkv => vec![
                t(
                    "qkv_proj",
                    [(h + 2 * kv) * d, dm],
                    &[Block::Q, Block::K, Block::V],
                ),
                t("o_proj", [dm, h * d], &[Block::O]),
            ],
            Layout::NeoxInterleaved => vec![
                t(
                    "query_key_value",
                    [3 * h * d, dm],
                    &[Block::Q, Block::K, Block::V],
                ),
                t("dense", [dm, h * d], &[Block::O]),
            ],
            Layout::Gpt2Conv1d => vec![
                t("c_attn", [dm, 3 * h * d], &[Block::Q, Block::K, Block::V]),
                t("c_proj", [h * d, dm], &[Block::O]),
            ],
        }
    }

    /// Every stored attention tensor of the model, layer by layer.
    pub fn all_attn_tensors(&self) -> Vec<AttnTensor> {
        (0..self.layers)
            .flat_map(|l| self.attn_tensors(l))
            .collect()
    }

    /// Finds the attention tensor named `name`, if it is one.
    pub fn find_attn_tensor(&self, name: &str) -> Option<AttnTensor> {
        self.all_attn_tensors().into_iter().find(|t| t.name == name)
    }

    /// The location of slice (layer, block, head); `head` is a kv head for K and V.
    pub fn slice_spec(&self, layer: usize, block: Block, head: usize) -> Result<SliceSpec> {
        if layer >= self.layers {
            return Err(Error::OutOfRange {
                what: "layer",
                value: layer,
                limit: self.layers,
            });
        }
        let n = self.heads_of(block);
        if head >= n {
            return Err(Error::OutOfRange {
                what: "head",
                value: head,
                limit: n,
            });
        }
        let (h, d, dm) = (self.heads, self.head_dim, self.hidden);
        let tensors = self.attn_tensors(layer);
        let tensor = tensors
            .iter()
            .find(|t| t.blocks.contains(&block))
            .expect("every layout stores every block");
        let (axis, start) = match (self.layout, block) {
            (Layout::SplitLinear, Block::O)
            | (Layout::FusedQkv, Block::O)
            | (Layout::NeoxInterleaved, Block::O) => (Axis::Cols, head * d),
            (Layout::SplitLinear, _) => (Axis::Rows, head * d),
            (Layout::FusedQkv, Block::Q) => (Axis::Rows, head * d),
            (Layout::FusedQkv, Block::K) => (Axis::Rows, h * d + head * d),
            (Layout::FusedQkv, Block::V) => (Axis::Rows, (h + self.kv_heads) * d + head * d),
            (Layout::NeoxInterleaved, b) => (Axis::Rows, 3 * head * d + b.index() * d),
            (Layout::Gpt2Conv1d, Block::O) => (Axis::Rows, head * d),
            (Layout::Gpt2Conv1d, b) => (Axis::Cols, b.index() * dm + head * d),
        };
        Ok(SliceSpec {
            tensor: tensor.name.clone(),
            tensor_shape: tensor.shape,
            axis,
            start,
            len: d,
        })
    }

    /// Output-channel axis of a non-attention 2-D tensor of this architecture
    /// (GPT-2 Conv1D stores `[in, out]`).
    pub fn out_axis_of(&self, _name: &str) -> u8 {
        u8::from(self.layout == Layout::Gpt2Conv1d)
    }

    /// Re-roots the names when a checkpoint uses another prefix (e.g. `encoder.` without `bert.`):
    /// finds the layer-0 Q tensor among `names` by its suffix and keeps what precedes it.
    pub fn detect_root<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let probe = {
            let mut g = self.clone();
            g.root.clear();
            g.attn_tensors(0)[0].name.clone()
        };
        for n in names {
            if let Some(prefix) = n.strip_suffix(probe.as_str()) {
                if prefix.is_empty() || prefix.ends_with('.') {
                    self.root = prefix.to_string();
                    return;
                }
            }
        }
    }

    /// Checks that a tensor has the shape this geometry expects.
    pub fn check_shape(&self, tensor: &AttnTensor, actual: &[usize]) -> Result<()> {
        if actual != tensor.shape {
            return Err(Error::ShapeMismatch {
                tensor: tensor.name.clone(),
                expected: tensor.shape.to_vec(),
                actual: actual.to_vec(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelShape;
    use serde_json::{json, Value};

    fn from_config(cfg: &Value) -> Result<Geometry> {
        ModelShape::from_value(Path::new("config.json"), cfg)?.geometry()
    }

    fn geom(cfg: Value) -> Geometry {
        from_config(&cfg).unwrap()
    }

    #[test]
    fn llama_gqa_with_head_dim() {
        let g = geom(
            json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":24}),
        );
        assert_eq!((g.heads, g.kv_heads, g.head_dim), (4, 2, 24));
        assert_eq!(g.kv_head_of(3), 1);
        let t = g.attn_tensors(1);
        assert_eq!(t[0].name, "model.layers.1.self_attn.q_proj.weight");
        assert_eq!(t[0].shape, [96, 64]);
        assert_eq!(t[1].shape, [48, 64]);
        assert_eq!(t[3].shape, [64, 96]);
        let o = g.slice_spec(1, Block::O, 2).unwrap();
        assert_eq!(
            (o.axis, o.start, o.canonical_shape()),
            (Axis::Cols, 48, [24, 64])
        );
    }

    #[test]
    fn gpt2_conv1d_slices() {
        let g = geom(json!({"model_type":"gpt2","n_layer":2,"n_embd":64,"n_head":4}));
        let k = g.slice_spec(0, Block::K, 1).unwrap();
        assert_eq!(k.tensor, "transformer.h.0.attn.c_attn.weight");
        assert_eq!((k.axis, k.start), (Axis::Cols, 64 + 16));
        let o = g.slice_spec(0, Block::O, 3).unwrap();
        assert_eq!(o.tensor, "transformer.h.0.attn.c_proj.weight");
        assert_eq!((o.axis, o.start), (Axis::Rows, 48));
    }

    #[test]
    fn fused_qkv_offsets_under_gqa() {
        let g = geom(
            json!({"model_type":"phi3","num_hidden_layers":1,"hidden_size":32,
            "num_attention_heads":4,"num_key_value_heads":2}),
        );
        assert_eq!(g.attn_tensors(0)[0].shape, [(4 + 4) * 8, 32]);
        assert_eq!(g.slice_spec(0, Block::K, 1).unwrap().start, 4 * 8 + 8);
        assert_eq!(g.slice_spec(0, Block::V, 0).unwrap().start, 6 * 8);
    }

    #[test]
    fn neox_interleaved() {
        let g = geom(
            json!({"model_type":"gpt_neox","num_hidden_layers":1,"hidden_size":32,"num_attention_heads":4}),
        );
        assert_eq!(
            g.slice_spec(0, Block::V, 2).unwrap().start,
            3 * 2 * 8 + 2 * 8
        );
    }

    #[test]
    fn cut_and_paste_are_inverse() {
        let g = geom(json!({"model_type":"gpt2","n_layer":1,"n_embd":8,"n_head":2}));
        for block in Block::ALL {
            for head in 0..2 {
                let s = g.slice_spec(0, block, head).unwrap();
                let n = s.tensor_shape[0] * s.tensor_shape[1];
                let full: Vec<u32> = (0..n as u32).collect();
                let cut = s.cut(&full).unwrap();
                assert_eq!(cut.len(), s.numel());
                let mut back = vec![u32::MAX; n];
                s.paste(&cut, &mut back).unwrap();
                for (i, v) in back.iter().enumerate() {
                    if *v != u32::MAX {
                        assert_eq!(*v, full[i]);
                    }
                }
                assert_eq!(back.iter().filter(|v| **v != u32::MAX).count(), s.numel());
            }
        }
    }

    #[test]
    fn gemma_olmo_and_nested_gemma3() {
        for mt in ["gemma2", "gemma3_text", "olmo2"] {
            let g = geom(
                json!({"model_type":mt,"num_hidden_layers":3,"hidden_size":64,
                "num_attention_heads":2,"num_key_value_heads":1,"head_dim":40}),
            );
            assert_eq!(
                (g.layout, g.head_dim, g.kv_heads),
                (Layout::SplitLinear, 40, 1)
            );
            assert_eq!(g.slice_spec(2, Block::O, 1).unwrap().start, 40);
        }
        // A nested text_config omits what equals Gemma3TextConfig's defaults.
        let mut g = geom(json!({"model_type":"gemma3",
            "text_config":{"hidden_size":2560,"num_hidden_layers":34}}));
        assert_eq!(
            (g.heads, g.kv_heads, g.head_dim, g.hidden),
            (8, 4, 256, 2560)
        );
        assert_eq!(
            g.attn_tensors(0)[0].name,
            "model.language_model.layers.0.self_attn.q_proj.weight"
        );
        g.detect_root(["language_model.model.layers.0.self_attn.q_proj.weight"]);
        assert_eq!(g.root, "language_model.model.");
        let e = from_config(&json!({"model_type":"gemma3"})).unwrap_err();
        assert!(e.to_string().contains("text_config"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = from_config(&json!({"model_type":"t5"})).unwrap_err();
        assert!(e.to_string().contains("t5"), "{e}");
        let e = from_config(
            &json!({"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
            "num_attention_heads":4,"num_key_value_heads":3}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let e = from_config(&json!({"model_type":"llama","hidden_size":64})).unwrap_err();
        assert!(e.to_string().contains("num_hidden_layers"), "{e}");
    }

    #[test]
    fn detect_root_for_bare_bert() {
        let mut g = geom(
            json!({"model_type":"bert","num_hidden_layers":1,"hidden_size":8,"num_attention_heads":2}),
        );
        g.detect_root(["encoder.layer.0.attention.self.query.weight"]);
        assert_eq!(g.root, "");
        assert_eq!(
            g.attn_tensors(0)[3].name,
            "encoder.layer.0.attention.output.dense.weight"
        );
    }
}
