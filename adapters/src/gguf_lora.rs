//! llama.cpp's GGUF LoRA adapters (`shared/specs/formats.md` §3): reading them
//! zero-copy over the file's memory map, and writing them.
//!
//! A file holds `general.type = adapter`, `adapter.type = lora`, the base's
//! `general.architecture`, `adapter.lora.alpha`, and for each adapted projection the
//! pair `<base weight>.lora_a` (ggml ne `[in, r]`, a `[r, in]` matrix) and
//! `<base weight>.lora_b` (ne `[r, out]`, a `[out, r]` matrix). The delta is
//! `alpha / r * B A` (alpha 0 means a scale of 1). llama.cpp's converter already put
//! lora_b rows of llama q/k into GGUF order, so nothing is permuted here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use graft_quant::GgmlType;
use graft_runtime::gguf::{GgufFile, GgufValue, GgufWriter, TensorInfo};
use graft_runtime::model::{Model, ModelConfig, Proj, Weight};

use crate::delta::{Adapter, AdapterFormat, LoraDelta, TensorDelta};
use crate::error::{AdapterError, Result};

pub const KEY_GENERAL_TYPE: &str = "general.type";
pub const KEY_ADAPTER_TYPE: &str = "adapter.type";
pub const KEY_LORA_ALPHA: &str = "adapter.lora.alpha";
pub const KEY_ALORA_INVOCATION: &str = "adapter.alora.invocation_tokens";

const SUFFIX_A: &str = ".lora_a";
const SUFFIX_B: &str = ".lora_b";

/// Loads a GGUF LoRA adapter for `model` (zero-copy: the adapter's weights view the
/// file's memory map).
pub fn load(path: &Path, model: &Model) -> Result<Adapter> {
    let file = Arc::new(GgufFile::open(path)?);
    from_file(&file, &model.config)
}

/// Parses an in-memory GGUF LoRA file against a base of `config` (tests, fuzzing).
pub fn from_bytes(bytes: Vec<u8>, name: &str, config: &ModelConfig) -> Result<Adapter> {
    let file = Arc::new(GgufFile::from_bytes(bytes, name)?);
    from_file(&file, config)
}

/// The adapter held by an opened GGUF file, checked against a base of `config`.
pub fn from_file(file: &Arc<GgufFile>, config: &ModelConfig) -> Result<Adapter> {
    let fname = file.name().to_owned();
    let invalid = |what: String| AdapterError::invalid(&fname, what);

    let general_type = file.get_str_opt(KEY_GENERAL_TYPE)?;
    if general_type != Some("adapter") {
        return Err(invalid(format!(
            "{KEY_GENERAL_TYPE} is {}, expected \"adapter\" (is this a base model rather than a LoRA?)",
            general_type.map_or("missing".to_owned(), |t| format!("{t:?}"))
        )));
    }
    let adapter_type = file.get_str_opt(KEY_ADAPTER_TYPE)?;
    if adapter_type != Some("lora") {
        return Err(invalid(format!(
            "{KEY_ADAPTER_TYPE} is {}, expected \"lora\"",
            adapter_type.map_or("missing".to_owned(), |t| format!("{t:?}"))
        )));
    }
    let arch = file.architecture()?;
    if arch != config.arch.name() {
        return Err(invalid(format!(
            "adapter is for architecture {arch:?}, but the base model is {:?}",
            config.arch.name()
        )));
    }
    // An activated LoRA applies only after its invocation tokens; applying it to every
    // token would silently give other outputs.
    if file.get(KEY_ALORA_INVOCATION).is_some() {
        return Err(invalid(format!(
            "{KEY_ALORA_INVOCATION} is set: activated LoRAs (aLoRA) are not supported"
        )));
    }
    // llama.cpp reads a missing alpha as 0, which means "scale 1".
    let alpha = file.get_f32_opt(KEY_LORA_ALPHA)?.unwrap_or(0.0);
    if !alpha.is_finite() || alpha < 0.0 {
        return Err(invalid(format!(
            "{KEY_LORA_ALPHA} is {alpha}, expected a finite value >= 0"
        )));
    }

    // (layer, proj) -> (lora_a, lora_b).
    type Pair<'f> = (Option<&'f TensorInfo>, Option<&'f TensorInfo>);
    let mut pairs: BTreeMap<(usize, Proj), Pair> = BTreeMap::new();
    for t in file.tensors() {
        let (base, is_a) = if let Some(b) = t.name.strip_suffix(SUFFIX_A) {
            (b, true)
        } else if let Some(b) = t.name.strip_suffix(SUFFIX_B) {
            (b, false)
        } else {
            return Err(AdapterError::tensor(
                &fname,
                &t.name,
                "not a LoRA tensor: expected a name ending in .lora_a or .lora_b",
            ));
        };
        let (layer, proj) = Proj::parse_gguf_weight(base).ok_or_else(|| {
            AdapterError::tensor(
                &fname,
                &t.name,
                format!(
                    "base tensor {base} is not a supported projection (LoRA can adapt \
                     blk.N.{{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}}.weight)"
                ),
            )
        })?;
        if layer >= config.n_layer {
            return Err(AdapterError::tensor(
                &fname,
                &t.name,
                format!(
                    "layer {layer}, but the base model has {} layers",
                    config.n_layer
                ),
            ));
        }
        let slot = pairs.entry((layer, proj)).or_default();
        let target = if is_a { &mut slot.0 } else { &mut slot.1 };
        if target.is_some() {
            return Err(AdapterError::tensor(&fname, &t.name, "appears twice"));
        }
        *target = Some(t);
    }
    if pairs.is_empty() {
        return Err(invalid("holds no LoRA tensors".to_owned()));
    }

    let mut adapter = Adapter::new(AdapterFormat::GgufLora, file.name().into(), config.n_layer);
    for ((layer, proj), pair) in pairs {
        let base = proj.gguf_weight(layer);
        let (a, b) = match pair {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => {
                return Err(AdapterError::tensor(
                    &fname,
                    format!("{base}{SUFFIX_A}"),
                    format!("has no matching {base}{SUFFIX_B}"),
                ))
            }
            (None, _) => {
                return Err(AdapterError::tensor(
                    &fname,
                    format!("{base}{SUFFIX_B}"),
                    format!("has no matching {base}{SUFFIX_A}"),
                ))
            }
        };
        let (out, inp) = crate::delta::projection_shape(config, proj);
        let rank = b.dims.first().copied().unwrap_or(0);
        check_dims(&fname, a, &[inp as u64, rank])?;
        check_dims(&fname, b, &[rank, out as u64])?;
        if rank == 0 {
            return Err(AdapterError::tensor(&fname, &b.name, "rank is 0"));
        }
        for t in [a, b] {
            if !graft_quant::kernels::supports(t.ty) {
                return Err(AdapterError::tensor(
                    &fname,
                    &t.name,
                    format!("no compute kernel for type {}", t.ty),
                ));
            }
        }
        let scale = if alpha == 0.0 {
            1.0
        } else {
            alpha / rank as f32
        };
        let delta = LoraDelta {
            a: Weight::from_gguf(file, a),
            b: Weight::from_gguf(file, b),
            scale,
            dora_factor: None,
        };
        adapter.insert(config, layer, proj, TensorDelta::Lora(delta))?;
    }
    Ok(adapter)
}

fn check_dims(file: &str, t: &TensorInfo, expected: &[u64]) -> Result<()> {
    if t.dims != expected {
        let to_usize = |d: &[u64]| d.iter().map(|&x| x as usize).collect();
        return Err(AdapterError::Shape {
            file: file.to_owned(),
            tensor: format!("{} (ggml ne)", t.name),
            found: to_usize(&t.dims),
            expected: to_usize(expected),
        });
    }
    Ok(())
}

/// How [`save`] encoded the adapter's scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SavedAlpha {
    /// Every tensor's scale is `alpha / rank` for this one alpha; A and B written as is.
    Alpha(f32),
    /// Scales differ in a way one alpha cannot express: each B was multiplied by its
    /// scale and alpha written as 0 (scale 1).
    Folded,
}

/// Writes `adapter` (LoRA deltas without DoRA, in the base's GGUF row order) as a
/// llama.cpp GGUF LoRA file for a base of architecture `arch`, tensors in F32.
///
/// llama.cpp carries one alpha per file: when `scale * rank` is the same for every
/// tensor that alpha is written and A, B are kept exact; otherwise each scale is
/// folded into its B and alpha is 0.
pub fn save(adapter: &Adapter, arch: &str, path: &Path) -> Result<SavedAlpha> {
    let fname = path.display().to_string();
    let mut loras = Vec::new();
    for (layer, proj, d) in adapter.iter() {
        let name = proj.gguf_weight(layer);
        match d {
            TensorDelta::Lora(l) if l.dora_factor.is_none() => loras.push((name, l)),
            TensorDelta::Lora(_) => {
                return Err(AdapterError::tensor(
                    &fname,
                    name,
                    "DoRA cannot be stored in a GGUF LoRA (llama.cpp has no magnitude vector)",
                ))
            }
            TensorDelta::Sparse(_) => {
                return Err(AdapterError::tensor(
                    &fname,
                    name,
                    "a sparse delta cannot be stored in a GGUF LoRA",
                ))
            }
            TensorDelta::Dense(_) => {
                return Err(AdapterError::tensor(
                    &fname,
                    name,
                    "a dense delta cannot be stored in a GGUF LoRA",
                ))
            }
        }
    }
    if loras.is_empty() {
        return Err(AdapterError::invalid(&fname, "adapter has no LoRA deltas"));
    }
    let alpha = common_alpha(loras.iter().map(|(_, l)| (l.scale, l.rank())));

    let mut tensors: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
    for (name, l) in &loras {
        let a = l.a.to_f32().map_err(|e| AdapterError::quant(name, e))?;
        let mut b = l.b.to_f32().map_err(|e| AdapterError::quant(name, e))?;
        if alpha.is_none() {
            for v in &mut b {
                *v *= l.scale;
            }
        }
        let r = l.rank() as u64;
        tensors.push((
            format!("{name}{SUFFIX_A}"),
            vec![l.a.cols as u64, r],
            bytemuck::cast_slice(&a).to_vec(),
        ));
        tensors.push((
            format!("{name}{SUFFIX_B}"),
            vec![r, l.b.rows as u64],
            bytemuck::cast_slice(&b).to_vec(),
        ));
    }

    let mut w = GgufWriter::new();
    w.add_kv(graft_runtime::gguf::KEY_ARCHITECTURE, arch)?;
    w.add_kv(KEY_GENERAL_TYPE, "adapter")?;
    w.add_kv(KEY_ADAPTER_TYPE, "lora")?;
    w.add_kv(KEY_LORA_ALPHA, GgufValue::F32(alpha.unwrap_or(0.0)))?;
    for (name, dims, data) in tensors {
        w.add_tensor(name, GgmlType::F32, &dims, data)?;
    }
    w.write_file(path)?;
    Ok(alpha.map_or(SavedAlpha::Folded, SavedAlpha::Alpha))
}

/// The one alpha (> 0) with `alpha / rank == scale` exactly (in f32, as loaders
/// compute it) for every (scale, rank), if there is one.
fn common_alpha(mut it: impl Iterator<Item = (f32, usize)>) -> Option<f32> {
    let (s0, r0) = it.next()?;
    let alpha = s0 * r0 as f32;
    let reproduces = |s: f32, r: usize| alpha / r as f32 == s;
    (alpha.is_finite() && alpha > 0.0 && reproduces(s0, r0) && it.all(|(s, r)| reproduces(s, r)))
        .then_some(alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_alpha_needs_one_value() {
        assert_eq!(common_alpha([(2.0, 8), (4.0, 4)].into_iter()), Some(16.0));
        assert_eq!(common_alpha([(2.0, 8), (2.0, 4)].into_iter()), None);
        assert_eq!(common_alpha([(0.0, 8)].into_iter()), None);
        assert_eq!(common_alpha(std::iter::empty()), None);
    }
}
