//! llama.cpp's quantization recipes ("file types"): which ggml type each tensor of a
//! model gets when a model is quantized to, say, Q4_K_M.
//!
//! The choices mirror llama.cpp's `llama_tensor_get_type` (no importance matrix) for the
//! dense architectures graft runs, so a model quantized by graft has the same tensor
//! types as one quantized by `llama-quantize`.

use graft_quant::GgmlType;

/// A llama.cpp file type (`general.file_type`), i.e. a quantization recipe.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q2_K_S,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl FileType {
    pub const ALL: [FileType; 18] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q8_0,
        FileType::Q2_K,
        FileType::Q2_K_S,
        FileType::Q3_K_S,
        FileType::Q3_K_M,
        FileType::Q3_K_L,
        FileType::Q4_K_S,
        FileType::Q4_K_M,
        FileType::Q5_K_S,
        FileType::Q5_K_M,
        FileType::Q6_K,
    ];

    /// The `general.file_type` id llama.cpp writes (enum llama_ftype).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q2_K => 10,
            FileType::Q3_K_S => 11,
            FileType::Q3_K_M => 12,
            FileType::Q3_K_L => 13,
            FileType::Q4_K_S => 14,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_S => 16,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::Q2_K_S => 21,
            FileType::BF16 => 32,
        }
    }

    pub fn from_id(id: u32) -> Option<FileType> {
        FileType::ALL.iter().copied().find(|f| f.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_1 => "Q4_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q5_1 => "Q5_1",
            FileType::Q8_0 => "Q8_0",
            FileType::Q2_K => "Q2_K",
            FileType::Q2_K_S => "Q2_K_S",
            FileType::Q3_K_S => "Q3_K_S",
            FileType::Q3_K_M => "Q3_K_M",
            FileType::Q3_K_L => "Q3_K_L",
            FileType::Q4_K_S => "Q4_K_S",
            FileType::Q4_K_M => "Q4_K_M",
            FileType::Q5_K_S => "Q5_K_S",
            FileType::Q5_K_M => "Q5_K_M",
            FileType::Q6_K => "Q6_K",
        }
    }

    /// Parses a recipe name. `Q3_K`, `Q4_K` and `Q5_K` are aliases of the `_M` recipes,
    /// as in `llama-quantize`.
    pub fn from_name(name: &str) -> Option<FileType> {
        let upper = name.to_ascii_uppercase();
        let canonical = match upper.as_str() {
            "Q3_K" => "Q3_K_M",
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            other => other,
        };
        FileType::ALL
            .iter()
            .copied()
            .find(|f| f.name() == canonical)
    }

    /// The type most tensors get.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q2_K | FileType::Q2_K_S => GgmlType::Q2_K,
            FileType::Q3_K_S | FileType::Q3_K_M | FileType::Q3_K_L => GgmlType::Q3_K,
            FileType::Q4_K_S | FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q5_K_S | FileType::Q5_K_M => GgmlType::Q5_K,
            FileType::Q6_K => GgmlType::Q6_K,
        }
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the recipe needs to know about the model as a whole.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// False when the model ties its output projection to `token_embd.weight`.
    pub has_output: bool,
}

impl ModelShape {
    fn n_gqa(&self) -> usize {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(1)
    }
}

/// Whether llama.cpp quantizes this tensor at all: 2-D (or more) weights only.
pub fn is_quantizable(name: &str, n_dims: usize) -> bool {
    n_dims >= 2 && name.ends_with(".weight") && !name.contains("_norm")
}

/// llama.cpp's layer-spread heuristic: the first and last eighth of the layers, and
/// every third layer in between, get more bits.
fn use_more_bits(i_layer: usize, n_layer: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layer as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    rest.split('.').next()?.parse().ok()
}

/// The type llama.cpp gives tensor `name` (row length `ne0`) under `ftype`, or `None`
/// when the tensor is kept as it is (1-D tensors, norms).
///
/// `pure` quantizes every eligible tensor to the recipe's default type (llama-quantize
/// `--pure`).
pub fn tensor_type(
    ftype: FileType,
    model: &ModelShape,
    name: &str,
    n_dims: usize,
    ne0: u64,
    pure: bool,
) -> Option<GgmlType> {
    if !is_quantizable(name, n_dims) {
        return None;
    }
    let default = ftype.default_type();
    let mut ty = default;
    if !pure && default.is_quantized() {
        ty = recipe_type(ftype, model, name, ne0);
    }
    Some(compatible_type(ty, ne0))
}

fn recipe_type(ftype: FileType, model: &ModelShape, name: &str, ne0: u64) -> GgmlType {
    use FileType as F;
    use GgmlType as T;
    let default = ftype.default_type();
    let layer = layer_index(name).unwrap_or(0);
    let n_layer = model.n_layer.max(1);
    // llama.cpp's LLM_TYPE_70B: the 80-layer Llama 2/3 70B models.
    let is_70b = model.n_layer == 80;

    if name == "output.weight" || (!model.has_output && name == "token_embd.weight") {
        if !ne0.is_multiple_of(default.block_size() as u64) {
            return T::Q8_0;
        }
        return if default != T::Q8_0 { T::Q6_K } else { default };
    }
    if name == "token_embd.weight" {
        return default;
    }
    if name.contains("attn_v.weight") {
        let mut ty = match ftype {
            F::Q2_K => {
                if model.n_gqa() >= 4 {
                    T::Q4_K
                } else {
                    T::Q3_K
                }
            }
            F::Q2_K_S if model.n_gqa() >= 4 => T::Q4_K,
            F::Q3_K_M => {
                if layer < 2 {
                    T::Q5_K
                } else {
                    T::Q4_K
                }
            }
            F::Q3_K_L => T::Q5_K,
            F::Q4_K_M | F::Q5_K_M if use_more_bits(layer, n_layer) => T::Q6_K,
            F::Q4_K_S if layer < 4 => T::Q5_K,
            _ => default,
        };
        if is_70b && matches!(ty, T::Q3_K | T::Q4_K) {
            ty = T::Q5_K;
        }
        return ty;
    }
    if name.contains("ffn_down") {
        return match ftype {
            F::Q2_K => T::Q3_K,
            F::Q2_K_S if layer < n_layer / 8 => T::Q4_K,
            F::Q3_K_M => {
                if layer < n_layer / 16 {
                    T::Q5_K
                } else {
                    T::Q4_K
                }
            }
            F::Q3_K_L => T::Q5_K,
            F::Q4_K_M | F::Q5_K_M if use_more_bits(layer, n_layer) => T::Q6_K,
            F::Q4_K_S if layer < n_layer / 8 => T::Q5_K,
            _ => default,
        };
    }
    if name.contains("attn_output.weight") {
        return match ftype {
            F::Q2_K => T::Q3_K,
            F::Q3_K_M => T::Q4_K,
            F::Q3_K_L => T::Q5_K,
            _ => default,
        };
    }
    if name.contains("attn_qkv.weight") {
        return match ftype {
            F::Q3_K_M | F::Q3_K_L => T::Q4_K,
            F::Q4_K_M => T::Q5_K,
            F::Q5_K_M => T::Q6_K,
            _ => default,
        };
    }
    default
}

/// llama.cpp's fallback when a row length is not a multiple of the chosen block size.
/// llama.cpp sends Q2_K/Q3_K to IQ4_NL, which graft does not implement; graft uses
/// Q4_0, the 32-block 4-bit type that llama.cpp used before IQ4_NL existed.
fn compatible_type(ty: GgmlType, ne0: u64) -> GgmlType {
    let fits = |t: GgmlType| ne0.is_multiple_of(t.block_size() as u64);
    if fits(ty) {
        return ty;
    }
    let fallback = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if fits(fallback) {
        fallback
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GQA: ModelShape = ModelShape {
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        has_output: true,
    };

    #[test]
    fn names_and_ids_round_trip() {
        for f in FileType::ALL {
            assert_eq!(FileType::from_name(f.name()), Some(f));
            assert_eq!(FileType::from_id(f.id()), Some(f));
        }
        assert_eq!(FileType::from_name("q4_k"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::from_name("Q9_9"), None);
    }

    #[test]
    fn use_more_bits_matches_llama_cpp_spread() {
        // 32 layers: 0..4, 28..32, and every third layer from 6.
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert!(!use_more_bits(0, 2));
        assert!(use_more_bits(1, 2));
    }

    #[test]
    fn norms_and_vectors_are_kept() {
        assert_eq!(
            tensor_type(
                FileType::Q4_0,
                &GQA,
                "blk.0.attn_norm.weight",
                1,
                256,
                false
            ),
            None
        );
        assert_eq!(
            tensor_type(FileType::Q4_0, &GQA, "blk.0.attn_q.bias", 1, 256, false),
            None
        );
    }

    #[test]
    fn q4_k_m_bumps_output_v_and_down() {
        let t = |name: &str, ne0| tensor_type(FileType::Q4_K_M, &GQA, name, 2, ne0, false);
        assert_eq!(t("output.weight", 256), Some(GgmlType::Q6_K));
        assert_eq!(t("token_embd.weight", 256), Some(GgmlType::Q4_K));
        assert_eq!(t("blk.0.attn_v.weight", 256), Some(GgmlType::Q4_K));
        assert_eq!(t("blk.1.attn_v.weight", 256), Some(GgmlType::Q6_K));
        assert_eq!(t("blk.1.ffn_down.weight", 512), Some(GgmlType::Q6_K));
        assert_eq!(t("blk.1.ffn_up.weight", 256), Some(GgmlType::Q4_K));
        // a 576-wide row cannot hold 256-blocks: llama.cpp falls back to Q5_0
        assert_eq!(t("blk.0.attn_q.weight", 576), Some(GgmlType::Q5_0));
        assert_eq!(t("output.weight", 576), Some(GgmlType::Q8_0));
    }

    #[test]
    fn tied_embedding_takes_the_output_rule() {
        let tied = ModelShape {
            has_output: false,
            ..GQA
        };
        let t = |f| tensor_type(f, &tied, "token_embd.weight", 2, 256, false);
        assert_eq!(t(FileType::Q4_0), Some(GgmlType::Q6_K));
        assert_eq!(t(FileType::Q8_0), Some(GgmlType::Q8_0));
        assert_eq!(t(FileType::F16), Some(GgmlType::F16));
    }

    #[test]
    fn pure_uses_the_default_everywhere() {
        let t = tensor_type(FileType::Q4_0, &GQA, "output.weight", 2, 256, true);
        assert_eq!(t, Some(GgmlType::Q4_0));
    }
}
