//! Model quantization: a GGUF (any tensor type) or an HF safetensors checkpoint in, a
//! GGUF quantized with a llama.cpp recipe out.

mod recipe;

pub use recipe::{is_quantizable, tensor_type, FileType, ModelShape};

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use graft_quant::{dequantize_matrix, quantize_matrix, GgmlType, QuantError};

use crate::gguf::{GgufError, GgufFile, GgufValue, GgufWriter};
use crate::hf_config::{self, HfConfig, HfConfigError};
use crate::safetensors::{SafetensorsError, SafetensorsModel};

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    HfConfig(#[from] HfConfigError),
    #[error("{file}: tensor {tensor}: {source}")]
    Quant {
        file: String,
        tensor: String,
        source: QuantError,
    },
    #[error("{file}: {what}")]
    Input { file: String, what: String },
    #[error("{file}: cannot write: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct QuantizeOptions {
    pub ftype: FileType,
    /// Every weight matrix gets the recipe's base type (llama-quantize `--pure`).
    pub pure: bool,
}

/// Reported once per tensor, in file order.
#[derive(Debug, Clone)]
pub struct TensorDone {
    pub index: usize,
    pub count: usize,
    pub name: String,
    pub from: GgmlType,
    pub to: GgmlType,
    pub bytes_in: usize,
    pub bytes_out: usize,
}

#[derive(Debug, Clone, Default)]
pub struct QuantizeReport {
    pub tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One input tensor, whatever the source format.
struct SourceTensor<'a> {
    name: String,
    ty: GgmlType,
    /// ggml order: innermost first.
    dims: Vec<u64>,
    data: Cow<'a, [u8]>,
}

/// Quantizes `input` (a GGUF file or an HF checkpoint directory / .safetensors file with
/// its config.json) into the GGUF file `output`. The output is written to a temporary
/// file beside it and renamed, so a failure never leaves a half-written model.
pub fn quantize_model(
    input: &Path,
    output: &Path,
    opts: QuantizeOptions,
    mut on_tensor: impl FnMut(&TensorDone),
) -> Result<QuantizeReport, QuantizeError> {
    let gguf;
    let hf;
    let (metadata, shape, tensors) = if crate::gguf::has_gguf_magic(input) {
        gguf = GgufFile::open(input)?;
        gguf_source(&gguf)?
    } else {
        hf = HfSource::open(input)?;
        hf.source()?
    };

    let file_name = input.display().to_string();
    let mut writer = GgufWriter::new();
    let mut file_type_set = false;
    let mut qv_set = false;
    for (key, value) in metadata {
        let value = match key.as_str() {
            "general.file_type" => {
                file_type_set = true;
                GgufValue::U32(opts.ftype.id())
            }
            "general.quantization_version" => {
                qv_set = true;
                GgufValue::U32(2)
            }
            _ => value,
        };
        writer.add_kv(key, value)?;
    }
    // llama.cpp sets these two after copying the source's keys.
    if !qv_set {
        writer.add_kv("general.quantization_version", GgufValue::U32(2))?;
    }
    if !file_type_set {
        writer.add_kv("general.file_type", GgufValue::U32(opts.ftype.id()))?;
    }

    let mut report = QuantizeReport::default();
    let count = tensors.len();
    for (index, t) in tensors.into_iter().enumerate() {
        let ne0 = t.dims.first().copied().unwrap_or(1);
        let target =
            tensor_type(opts.ftype, &shape, &t.name, t.dims.len(), ne0, opts.pure).unwrap_or(t.ty);
        let bytes_in = t.data.len();
        let data: Cow<[u8]> = if target == t.ty {
            t.data
        } else {
            let quant_err = |source| QuantizeError::Quant {
                file: file_name.clone(),
                tensor: t.name.clone(),
                source,
            };
            let row = usize::try_from(ne0).map_err(|_| QuantizeError::Input {
                file: file_name.clone(),
                what: format!("tensor {}: row length {ne0} too large", t.name),
            })?;
            let values = dequantize_matrix(t.ty, &t.data, row).map_err(quant_err)?;
            Cow::Owned(quantize_matrix(target, &values, row).map_err(quant_err)?)
        };
        report.tensors += 1;
        report.bytes_in += bytes_in as u64;
        report.bytes_out += data.len() as u64;
        on_tensor(&TensorDone {
            index,
            count,
            name: t.name.clone(),
            from: t.ty,
            to: target,
            bytes_in,
            bytes_out: data.len(),
        });
        writer.add_tensor(t.name, target, &t.dims, data)?;
    }

    let tmp = output.with_extension("gguf.partial");
    writer.write_file(&tmp)?;
    std::fs::rename(&tmp, output).map_err(|source| QuantizeError::Io {
        file: output.to_path_buf(),
        source,
    })?;
    Ok(report)
}

type Source<'a> = (Vec<(String, GgufValue)>, ModelShape, Vec<SourceTensor<'a>>);

fn gguf_source(file: &GgufFile) -> Result<Source<'_>, QuantizeError> {
    let arch = file.architecture()?;
    let n_layer = file.get_u32(&format!("{arch}.block_count"))? as usize;
    let n_head = file.get_u32(&format!("{arch}.attention.head_count"))? as usize;
    let n_head_kv = file
        .get_u32_opt(&format!("{arch}.attention.head_count_kv"))?
        .map_or(n_head, |v| v as usize);
    let shape = ModelShape {
        n_layer,
        n_head,
        n_head_kv,
        has_output: file.tensor("output.weight").is_some(),
    };
    let tensors = file
        .tensors()
        .iter()
        .map(|t| SourceTensor {
            name: t.name.clone(),
            ty: t.ty,
            dims: t.dims.clone(),
            data: Cow::Borrowed(file.tensor_data(t)),
        })
        .collect();
    Ok((file.metadata().to_vec(), shape, tensors))
}

/// An HF checkpoint: config.json plus safetensors weights.
struct HfSource {
    dir: PathBuf,
    config: HfConfig,
    weights: SafetensorsModel,
}

impl HfSource {
    fn open(path: &Path) -> Result<HfSource, QuantizeError> {
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let config = HfConfig::load(&dir.join("config.json"))?;
        let weights = SafetensorsModel::open(path)?;
        Ok(HfSource {
            dir,
            config,
            weights,
        })
    }

    fn source(&self) -> Result<Source<'_>, QuantizeError> {
        let c = &self.config;
        let arch = c.model_type.name();
        let file = self.dir.display().to_string();
        let mut metadata: Vec<(String, GgufValue)> = vec![
            (
                "general.architecture".into(),
                GgufValue::String(arch.into()),
            ),
            (
                "general.name".into(),
                GgufValue::String(
                    self.dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| arch.into()),
                ),
            ),
        ];
        let u32v = |v: usize| GgufValue::U32(u32::try_from(v).unwrap_or(u32::MAX));
        let mut kv = |k: &str, v: GgufValue| metadata.push((format!("{arch}.{k}"), v));
        kv("context_length", u32v(c.max_position_embeddings));
        kv("embedding_length", u32v(c.hidden_size));
        kv("block_count", u32v(c.num_hidden_layers));
        kv("feed_forward_length", u32v(c.intermediate_size));
        kv("attention.head_count", u32v(c.num_attention_heads));
        kv("attention.head_count_kv", u32v(c.num_key_value_heads));
        kv("rope.dimension_count", u32v(c.head_dim));
        kv("rope.freq_base", GgufValue::F32(c.rope_theta as f32));
        kv(
            "attention.layer_norm_rms_epsilon",
            GgufValue::F32(c.rms_norm_eps as f32),
        );
        kv("vocab_size", u32v(c.vocab_size));
        tracing::warn!(
            "{file}: HF checkpoint: no tokenizer is written into the GGUF (tokenizer import comes with the inference engine)"
        );

        let mut tensors = Vec::new();
        let mut has_output = false;
        for hf_name in self.weights.tensor_names() {
            let Some(name) = hf_config::hf_to_gguf_name(hf_name) else {
                return Err(QuantizeError::Input {
                    file: file.clone(),
                    what: format!("tensor {hf_name}: no GGUF name for it (unsupported module)"),
                });
            };
            if name == "output.weight" {
                has_output = true;
            }
            let view = self.weights.tensor(hf_name)?;
            let mut values = view.to_f32();
            if let Some(heads) = c.qk_permute_heads(hf_name) {
                let row_len = view.shape.iter().skip(1).product::<usize>();
                values = hf_config::permute_qk_rows(&values, heads, row_len).map_err(|e| {
                    QuantizeError::Input {
                        file: file.clone(),
                        what: format!("tensor {hf_name}: {e}"),
                    }
                })?;
            }
            let dims: Vec<u64> = view.shape.iter().rev().map(|&d| d as u64).collect();
            let mut bytes = vec![0u8; values.len() * 4];
            graft_quant::quantize_row(GgmlType::F32, &values, &mut bytes).map_err(|source| {
                QuantizeError::Quant {
                    file: file.clone(),
                    tensor: name.clone(),
                    source,
                }
            })?;
            tensors.push(SourceTensor {
                name,
                ty: GgmlType::F32,
                dims,
                data: Cow::Owned(bytes),
            });
        }
        let shape = ModelShape {
            n_layer: c.num_hidden_layers,
            n_head: c.num_attention_heads,
            n_head_kv: c.num_key_value_heads,
            has_output,
        };
        Ok((metadata, shape, tensors))
    }
}
