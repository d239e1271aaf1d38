//! A loaded model: hyperparameters plus weights, zero-copy from a GGUF memory map
//! where the file allows, and the forward pass over it.

mod config;
pub mod delta;
mod forward;
mod llama2c;
pub mod simd;

pub use config::{Arch, ConfigError, ModelConfig, RopeScaling, RopeStyle};
pub use delta::{BatchDeltas, DeltaError, LinearDelta, Proj};
pub use forward::{sequence_batch, Batch, BatchToken, Logits, Scratch};
pub use llama2c::{
    is_llama2c_path, llama2c_to_bytes, write_llama2c, Llama2cError, Llama2cHeader, Llama2cVersion,
};

use std::path::Path;
use std::sync::Arc;

use graft_quant::{dequantize_row, quantize_matrix, GgmlType, QuantError};

use crate::gguf::{GgufError, GgufFile, TensorInfo};
use crate::hf_config::{self, HfConfig, HfConfigError, RopeScalingType};
use crate::safetensors::{SafetensorsError, SafetensorsModel};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    HfConfig(#[from] HfConfigError),
    #[error("{file}: tensor {tensor} is missing")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: tensor {tensor}: shape {found:?} (ggml order), expected {expected:?}")]
    Shape {
        file: String,
        tensor: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("{file}: tensor {tensor}: {source}")]
    Quant {
        file: String,
        tensor: String,
        source: QuantError,
    },
    #[error("{file}: {what}")]
    Unsupported { file: String, what: String },
    #[error("forward: {0}")]
    Forward(String),
    #[error(transparent)]
    Llama2c(#[from] Llama2cError),
}

/// Tensor bytes: a range of the shared GGUF map, or an owned buffer (HF checkpoints,
/// tensors quantized at load).
#[derive(Clone)]
enum Bytes {
    Mapped {
        file: Arc<GgufFile>,
        start: usize,
        len: usize,
    },
    Owned(Arc<[u8]>),
    /// A range of a shared buffer (a llama2.c checkpoint's memory map).
    Shared {
        buf: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    },
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { file, start, len } => {
                file.bytes().get(*start..start + len).unwrap_or(&[])
            }
            Bytes::Owned(b) => b,
            Bytes::Shared { buf, start, len } => (**buf)
                .as_ref()
                .get(*start..start.saturating_add(*len))
                .unwrap_or(&[]),
        }
    }
}

/// A weight matrix of `rows` rows of `cols` elements (PyTorch `[out, in]`), in its
/// stored type.
#[derive(Clone)]
pub struct Weight {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    bytes: Bytes,
}

impl Weight {
    /// A `rows` x `cols` weight in owned bytes (checked against the type's row size).
    pub fn owned(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<Weight, QuantError> {
        Self::check_len(ty, rows, cols, bytes.len())?;
        Ok(Weight {
            ty,
            rows,
            cols,
            bytes: Bytes::Owned(bytes.into()),
        })
    }

    /// An F32 weight from row-major values.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Weight, QuantError> {
        Self::owned(
            GgmlType::F32,
            rows,
            cols,
            bytemuck::cast_slice(values).to_vec(),
        )
    }

    /// A weight viewing `len` bytes at `start` of a shared buffer (a memory map), so
    /// nothing is copied.
    pub fn shared(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        buf: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Result<Weight, QuantError> {
        Self::check_len(ty, rows, cols, len)?;
        let available = (*buf).as_ref().len();
        if start.checked_add(len).is_none_or(|end| end > available) {
            return Err(QuantError::ByteSize {
                ty,
                len: rows.saturating_mul(cols),
                found: available.saturating_sub(start),
                expected: len,
            });
        }
        Ok(Weight {
            ty,
            rows,
            cols,
            bytes: Bytes::Shared { buf, start, len },
        })
    }

    /// A tensor of a GGUF file, zero-copy; its ggml dims `[cols, rows...]`.
    pub fn from_gguf(file: &Arc<GgufFile>, info: &TensorInfo) -> Weight {
        gguf_weight(file, info)
    }

    fn check_len(ty: GgmlType, rows: usize, cols: usize, len: usize) -> Result<(), QuantError> {
        let expected = ty
            .row_size(cols)?
            .checked_mul(rows)
            .ok_or(QuantError::Overflow { ty, len: cols })?;
        if len != expected {
            return Err(QuantError::ByteSize {
                ty,
                len: rows.saturating_mul(cols),
                found: len,
                expected,
            });
        }
        Ok(())
    }

    /// Whether the bytes live in a file map shared with other weights (not owned).
    pub fn is_mapped(&self) -> bool {
        !matches!(self.bytes, Bytes::Owned(_))
    }

    pub fn data(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) -> Result<(), QuantError> {
        let rb = self.ty.row_size(self.cols)?;
        let row = self
            .data()
            .get(r * rb..(r + 1) * rb)
            .ok_or(QuantError::ByteSize {
                ty: self.ty,
                len: self.cols,
                found: 0,
                expected: rb,
            })?;
        dequantize_row(self.ty, row, out)
    }

    /// All values as f32, row-major.
    pub fn to_f32(&self) -> Result<Vec<f32>, QuantError> {
        graft_quant::dequantize_matrix(self.ty, self.data(), self.cols)
    }
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weight({} {}x{})", self.ty, self.rows, self.cols)
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Weight,
    pub w_up: Weight,
    pub w_down: Weight,
}

impl Layer {
    /// The weight of projection `p`.
    pub fn proj(&self, p: Proj) -> &Weight {
        match p {
            Proj::Q => &self.wq,
            Proj::K => &self.wk,
            Proj::V => &self.wv,
            Proj::O => &self.wo,
            Proj::Gate => &self.w_gate,
            Proj::Up => &self.w_up,
            Proj::Down => &self.w_down,
        }
    }

    pub fn proj_mut(&mut self, p: Proj) -> &mut Weight {
        match p {
            Proj::Q => &mut self.wq,
            Proj::K => &mut self.wk,
            Proj::V => &mut self.wv,
            Proj::O => &mut self.wo,
            Proj::Gate => &mut self.w_gate,
            Proj::Up => &mut self.w_up,
            Proj::Down => &mut self.w_down,
        }
    }
}

/// A model ready to run.
pub struct Model {
    pub config: ModelConfig,
    pub token_embd: Weight,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// `output.weight`, or `token_embd` when tied.
    pub output: Weight,
    /// Per-dimension-pair RoPE frequency divisors (Llama 3 `rope_freqs`), n_rot/2 values.
    pub rope_freqs: Option<Vec<f32>>,
    /// The GGUF file the model came from (metadata for the tokenizer and templates).
    pub gguf: Option<Arc<GgufFile>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

/// Where tensors come from while a model is assembled.
trait TensorSource {
    fn file(&self) -> &str;
    /// (ggml dims, weight) or None when absent.
    fn get(&self, name: &str) -> Result<Option<(Vec<u64>, Weight)>, ModelError>;
}

struct GgufSource {
    file: Arc<GgufFile>,
}

impl TensorSource for GgufSource {
    fn file(&self) -> &str {
        self.file.name()
    }

    fn get(&self, name: &str) -> Result<Option<(Vec<u64>, Weight)>, ModelError> {
        let Some(info) = self.file.tensor(name) else {
            return Ok(None);
        };
        Ok(Some((info.dims.clone(), gguf_weight(&self.file, info))))
    }
}

fn gguf_weight(file: &Arc<GgufFile>, info: &TensorInfo) -> Weight {
    Weight {
        ty: info.ty,
        rows: info.n_rows() as usize,
        cols: info.row_len() as usize,
        bytes: Bytes::Mapped {
            file: file.clone(),
            start: file.data_offset() + info.offset as usize,
            len: info.n_bytes,
        },
    }
}

struct HfSource {
    dir: String,
    config: HfConfig,
    weights: SafetensorsModel,
    quantize: Option<GgmlType>,
}

impl TensorSource for HfSource {
    fn file(&self) -> &str {
        &self.dir
    }

    fn get(&self, name: &str) -> Result<Option<(Vec<u64>, Weight)>, ModelError> {
        let Some(hf_name) = hf_config::gguf_to_hf_name(name) else {
            return Ok(None);
        };
        if !self.weights.contains(&hf_name) {
            return Ok(None);
        }
        let view = self.weights.tensor(&hf_name)?;
        let mut values = view.to_f32();
        if let Some(heads) = self.config.qk_permute_heads(&hf_name) {
            let row_len = view.shape.iter().skip(1).product::<usize>();
            values = hf_config::permute_qk_rows(&values, heads, row_len).map_err(|e| {
                ModelError::Unsupported {
                    file: self.dir.clone(),
                    what: format!("tensor {hf_name}: {e}"),
                }
            })?;
        }
        let dims: Vec<u64> = view.shape.iter().rev().map(|&d| d as u64).collect();
        let cols = view.shape.last().copied().unwrap_or(1);
        let rows = values.len().checked_div(cols).unwrap_or(0);
        let ty = match self.quantize {
            Some(t) if view.shape.len() >= 2 && cols % t.block_size() == 0 => t,
            _ => GgmlType::F32,
        };
        let bytes = quantize_matrix(ty, &values, cols).map_err(|source| ModelError::Quant {
            file: self.dir.clone(),
            tensor: name.to_owned(),
            source,
        })?;
        Ok(Some((
            dims,
            Weight {
                ty,
                rows,
                cols,
                bytes: Bytes::Owned(bytes.into()),
            },
        )))
    }
}

impl Model {
    /// Loads a GGUF file, an HF checkpoint directory, or a llama2.c checkpoint (a `.bin`
    /// file without the GGUF magic, see [`is_llama2c_path`]); for the latter two
    /// `quantize` picks the type weight matrices are converted to (F32 by default).
    pub fn load(path: &Path, quantize: Option<GgmlType>) -> Result<Model, ModelError> {
        if path.is_dir() {
            Self::load_hf(path, quantize)
        } else if is_llama2c_path(path) {
            Self::load_llama2c_with(path, quantize)
        } else {
            Self::load_gguf(path)
        }
    }

    pub fn load_gguf(path: &Path) -> Result<Model, ModelError> {
        let file = Arc::new(GgufFile::open(path)?);
        let n_vocab_fallback = file
            .tensor("token_embd.weight")
            .map_or(0, |t| t.n_rows() as usize);
        let config = ModelConfig::from_gguf(&file, n_vocab_fallback)?;
        let src = GgufSource { file: file.clone() };
        let mut model = Self::assemble(config, &src)?;
        model.gguf = Some(file);
        Ok(model)
    }

    pub fn load_hf(dir: &Path, quantize: Option<GgmlType>) -> Result<Model, ModelError> {
        let config = HfConfig::load(&dir.join("config.json"))?;
        let weights = SafetensorsModel::open(dir)?;
        let mc = ModelConfig::from_hf(&config);
        let rope_freqs = llama3_rope_freqs(&config, &mc);
        let src = HfSource {
            dir: dir.display().to_string(),
            config,
            weights,
            quantize,
        };
        let mut model = Self::assemble(mc, &src)?;
        if rope_freqs.is_some() {
            model.rope_freqs = rope_freqs;
        }
        Ok(model)
    }

    fn assemble(config: ModelConfig, src: &dyn TensorSource) -> Result<Model, ModelError> {
        let c = &config;
        let (d, q, kv, ff, vocab) = (
            c.n_embd as u64,
            c.q_dim() as u64,
            c.kv_dim() as u64,
            c.n_ff as u64,
            c.n_vocab as u64,
        );
        let token_embd = matrix(src, "token_embd.weight", d, vocab)?;
        let output = match src.get("output.weight")? {
            Some(_) => matrix(src, "output.weight", d, vocab)?,
            None => token_embd.clone(),
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: vector(src, &n("attn_norm.weight"), d)?,
                wq: matrix(src, &n("attn_q.weight"), d, q)?,
                wk: matrix(src, &n("attn_k.weight"), d, kv)?,
                wv: matrix(src, &n("attn_v.weight"), d, kv)?,
                wo: matrix(src, &n("attn_output.weight"), q, d)?,
                bq: optional_vector(src, &n("attn_q.bias"), q)?,
                bk: optional_vector(src, &n("attn_k.bias"), kv)?,
                bv: optional_vector(src, &n("attn_v.bias"), kv)?,
                ffn_norm: vector(src, &n("ffn_norm.weight"), d)?,
                w_gate: matrix(src, &n("ffn_gate.weight"), d, ff)?,
                w_up: matrix(src, &n("ffn_up.weight"), d, ff)?,
                w_down: matrix(src, &n("ffn_down.weight"), ff, d)?,
            });
        }
        let rope_freqs = optional_vector(src, "rope_freqs.weight", (c.n_rot / 2) as u64)?;
        Ok(Model {
            token_embd,
            layers,
            output_norm: vector(src, "output_norm.weight", d)?,
            output,
            rope_freqs,
            gguf: None,
            config,
        })
    }

    /// A KV cache for this model holding `n_ctx` tokens.
    pub fn new_cache(&self, n_ctx: usize, ty: crate::kv_cache::KvType) -> crate::kv_cache::KvCache {
        crate::kv_cache::KvCache::for_context(self.config.n_layer, self.config.kv_dim(), n_ctx, ty)
    }

    /// Bytes of all weights (for memory reports).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.token_embd.data().len();
        if !matches!((&self.output.bytes, &self.token_embd.bytes), (Bytes::Mapped { start: a, .. }, Bytes::Mapped { start: b, .. }) if a == b)
        {
            n += self.output.data().len();
        }
        for l in &self.layers {
            for w in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                n += w.data().len();
            }
        }
        n
    }
}

fn require(src: &dyn TensorSource, name: &str) -> Result<(Vec<u64>, Weight), ModelError> {
    src.get(name)?.ok_or_else(|| ModelError::MissingTensor {
        file: src.file().to_owned(),
        tensor: name.to_owned(),
    })
}

fn check_dims(
    src: &dyn TensorSource,
    name: &str,
    found: &[u64],
    expected: &[u64],
) -> Result<(), ModelError> {
    if found != expected {
        return Err(ModelError::Shape {
            file: src.file().to_owned(),
            tensor: name.to_owned(),
            found: found.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// A `[rows, cols]` weight (ggml dims `[cols, rows]`).
fn matrix(src: &dyn TensorSource, name: &str, cols: u64, rows: u64) -> Result<Weight, ModelError> {
    let (dims, w) = require(src, name)?;
    check_dims(src, name, &dims, &[cols, rows])?;
    if !graft_quant::kernels::supports(w.ty) {
        return Err(ModelError::Unsupported {
            file: src.file().to_owned(),
            what: format!("tensor {name}: no compute kernel for type {}", w.ty),
        });
    }
    Ok(w)
}

fn to_vector(src: &dyn TensorSource, name: &str, w: &Weight) -> Result<Vec<f32>, ModelError> {
    w.to_f32().map_err(|source| ModelError::Quant {
        file: src.file().to_owned(),
        tensor: name.to_owned(),
        source,
    })
}

fn vector(src: &dyn TensorSource, name: &str, len: u64) -> Result<Vec<f32>, ModelError> {
    let (dims, w) = require(src, name)?;
    check_dims(src, name, &dims, &[len])?;
    to_vector(src, name, &w)
}

fn optional_vector(
    src: &dyn TensorSource,
    name: &str,
    len: u64,
) -> Result<Option<Vec<f32>>, ModelError> {
    match src.get(name)? {
        None => Ok(None),
        Some((dims, w)) => {
            check_dims(src, name, &dims, &[len])?;
            to_vector(src, name, &w).map(Some)
        }
    }
}

/// Llama 3 RoPE frequency factors, computed from `rope_scaling` as llama.cpp's
/// converter does when it writes `rope_freqs.weight`.
fn llama3_rope_freqs(hf: &HfConfig, c: &ModelConfig) -> Option<Vec<f32>> {
    let s = hf.rope_scaling.as_ref()?;
    if s.rope_type != RopeScalingType::Llama3 {
        return None;
    }
    let factor = s.factor?;
    let low = s.low_freq_factor?;
    let high = s.high_freq_factor?;
    let old_ctx = s.original_max_position_embeddings? as f64;
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    let base = c.rope_base as f64;
    Some(
        (0..c.n_rot / 2)
            .map(|i| {
                let freq = 1.0 / base.powf(2.0 * i as f64 / c.n_rot as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let f = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                f as f32
            })
            .collect(),
    )
}
