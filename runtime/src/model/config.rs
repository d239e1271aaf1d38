//! Hyperparameters of the dense decoder-only models graft runs (llama, qwen2).

use crate::gguf::{GgufError, GgufFile};
use crate::hf_config::{HfConfig, ModelType, RopeScalingType};

/// The architectures graft implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }
}

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): ggml ROPE_TYPE_NORMAL, llama-arch GGUF files
    /// (whose converter permuted the Q/K rows accordingly).
    Normal,
    /// Halves (x[i], x[i + n_rot/2]): ggml ROPE_TYPE_NEOX, qwen2 and HF checkpoints.
    Neox,
}

/// How RoPE positions are scaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: theta is multiplied by 1/factor.
    Linear {
        factor: f32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates (the rest pass through).
    pub n_rot: usize,
    pub rope_base: f32,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    /// Training context length.
    pub n_ctx_train: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{file}: {key}: found {found}, expected {expected}")]
    Invalid {
        file: String,
        key: String,
        found: String,
        expected: String,
    },
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Reads the `{arch}.*` keys of a GGUF model.
    pub fn from_gguf(file: &GgufFile, n_vocab_fallback: usize) -> Result<ModelConfig, ConfigError> {
        let arch_name = file.architecture()?;
        let invalid = |key: &str, found: String, expected: &str| ConfigError::Invalid {
            file: file.name().to_owned(),
            key: key.to_owned(),
            found,
            expected: expected.to_owned(),
        };
        let arch = Arch::from_name(arch_name).ok_or_else(|| {
            invalid(
                "general.architecture",
                format!("{arch_name:?}"),
                "\"llama\" or \"qwen2\"",
            )
        })?;
        let k = |name: &str| format!("{arch_name}.{name}");
        let get =
            |name: &str| -> Result<usize, ConfigError> { Ok(file.get_u32(&k(name))? as usize) };
        let n_embd = get("embedding_length")?;
        let n_head = get("attention.head_count")?;
        let n_head_kv = file
            .get_u32_opt(&k("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        if n_head == 0 || n_embd == 0 {
            return Err(invalid(
                &k("attention.head_count"),
                n_head.to_string(),
                "a positive head count",
            ));
        }
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(invalid(
                &k("attention.head_count_kv"),
                n_head_kv.to_string(),
                &format!("a divisor of the head count {n_head}"),
            ));
        }
        let head_dim = match file.get_u32_opt(&k("attention.key_length"))? {
            Some(v) => v as usize,
            None => {
                if n_embd % n_head != 0 {
                    return Err(invalid(
                        &k("embedding_length"),
                        n_embd.to_string(),
                        &format!("a multiple of the head count {n_head}"),
                    ));
                }
                n_embd / n_head
            }
        };
        let n_rot = file
            .get_u32_opt(&k("rope.dimension_count"))?
            .map_or(head_dim, |v| v as usize);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(invalid(
                &k("rope.dimension_count"),
                n_rot.to_string(),
                &format!("an even number <= head size {head_dim}"),
            ));
        }
        let rope_scaling = match file.get_str_opt(&k("rope.scaling.type"))? {
            Some("linear") => {
                let factor = file.get_f32(&k("rope.scaling.factor"))?;
                if factor.is_nan() || factor <= 0.0 {
                    return Err(invalid(
                        &k("rope.scaling.factor"),
                        factor.to_string(),
                        "a positive factor",
                    ));
                }
                RopeScaling::Linear { factor }
            }
            None | Some("none") => match file.get_f32_opt(&k("rope.scale_linear"))? {
                Some(f) if f > 0.0 && f != 1.0 => RopeScaling::Linear { factor: f },
                _ => RopeScaling::None,
            },
            Some(other) => {
                return Err(invalid(
                    &k("rope.scaling.type"),
                    format!("{other:?}"),
                    "\"none\" or \"linear\"",
                ))
            }
        };
        let n_vocab = match file.get_u32_opt(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => n_vocab_fallback,
        };
        Ok(ModelConfig {
            arch,
            n_vocab,
            n_embd,
            n_layer: get("block_count")?,
            n_ff: get("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_base: file.get_f32_opt(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Normal,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            rms_eps: file
                .get_f32_opt(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            n_ctx_train: file
                .get_u32_opt(&k("context_length"))?
                .map_or(2048, |v| v as usize),
        })
    }

    /// From an HF `config.json`. Q/K rows of llama checkpoints are permuted to GGUF
    /// order at load, so both architectures use the GGUF RoPE style.
    pub fn from_hf(c: &HfConfig) -> ModelConfig {
        let arch = match c.model_type {
            ModelType::Llama => Arch::Llama,
            ModelType::Qwen2 => Arch::Qwen2,
        };
        let rope_scaling = match &c.rope_scaling {
            Some(s) if s.rope_type == RopeScalingType::Linear => RopeScaling::Linear {
                factor: s.factor.unwrap_or(1.0) as f32,
            },
            _ => RopeScaling::None,
        };
        ModelConfig {
            arch,
            n_vocab: c.vocab_size,
            n_embd: c.hidden_size,
            n_layer: c.num_hidden_layers,
            n_ff: c.intermediate_size,
            n_head: c.num_attention_heads,
            n_head_kv: c.num_key_value_heads,
            head_dim: c.head_dim,
            n_rot: c.head_dim,
            rope_base: c.rope_theta as f32,
            rope_scaling,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Normal,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            rms_eps: c.rms_norm_eps as f32,
            n_ctx_train: c.max_position_embeddings,
        }
    }
}
