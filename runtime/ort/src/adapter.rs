//! graft adapters as ONNX Runtime adapter objects.
//!
//! An adapter becomes one value per LoRA graph input (see [`crate::graph`]): for each
//! targeted projection `A_cat [in, max_rank]` (the members' `A^T` side by side, zero
//! padded) and `B_cat [max_rank, out]` (their `scale * B^T`). A stack of adapters is
//! therefore one ONNX Runtime adapter whose rank is the sum of its members'. The
//! values are written in ONNX Runtime's `.onnx_adapter` format (a flatbuffer) and
//! loaded with `OrtApi::CreateLoraAdapterFromArray`, so activating an adapter is a
//! run option and never touches the session.

use std::path::Path;

use graft_adapters::{Adapter, LoraDelta, TensorDelta};
use graft_runtime::model::Proj;

use crate::graph::{lora_input_names, GraphInfo, LoraSpec};
use crate::onnx::DataType;
use crate::OrtError;

/// One named f32 tensor of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub dims: Vec<i64>,
    pub values: Vec<f32>,
}

/// The LoRA input values of `adapters` (each with its user scale) for a graph with
/// `spec` LoRA inputs on a model whose projections have `shapes`.
pub fn lora_params(adapters: &[(&Adapter, f32)], info: &GraphInfo) -> Result<Vec<Param>, OrtError> {
    let spec: &LoraSpec = info.lora.as_ref().ok_or_else(|| {
        OrtError::Adapter("the session was built without LoRA inputs (no --lora-rank)".into())
    })?;
    let r_max = spec.max_rank;
    let mut params = Vec::new();
    for layer in 0..info.n_layer {
        for proj in Proj::ALL {
            let members: Vec<(&LoraDelta, f32)> = adapters
                .iter()
                .filter(|(_, s)| *s != 0.0)
                .filter_map(|(a, s)| a.get(layer, proj).map(|d| (d, *s)))
                .map(|(d, s)| match d {
                    TensorDelta::Lora(l) if l.dora_factor.is_none() => Ok((l, s)),
                    TensorDelta::Lora(_) => Err(OrtError::Adapter(format!(
                        "{}: DoRA scales the base output, which LoRA inputs cannot express",
                        proj.gguf_weight(layer)
                    ))),
                    TensorDelta::Sparse(_) => Err(OrtError::Adapter(format!(
                        "{}: sparse deltas have no low-rank form for LoRA inputs",
                        proj.gguf_weight(layer)
                    ))),
                    TensorDelta::Dense(_) => Err(OrtError::Adapter(format!(
                        "{}: dense deltas (RPS-Delta) have no low-rank form for LoRA inputs; merge them with `graft merge` first",
                        proj.gguf_weight(layer)
                    ))),
                })
                .collect::<Result<_, _>>()?;
            if members.is_empty() {
                continue;
            }
            if !spec.targets.contains(&proj) {
                return Err(OrtError::Adapter(format!(
                    "{}: the session has no LoRA inputs for {} (targets: {})",
                    proj.gguf_weight(layer),
                    proj.gguf_stem(),
                    spec.targets
                        .iter()
                        .map(|p| p.gguf_stem())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let (n_in, n_out) = info.proj_shape(proj);
            let rank: usize = members.iter().map(|(l, _)| l.rank()).sum();
            if rank > r_max {
                return Err(OrtError::Adapter(format!(
                    "{}: rank {rank} exceeds the session's maximum LoRA rank {r_max}",
                    proj.gguf_weight(layer)
                )));
            }
            let mut a_cat = vec![0f32; n_in * r_max];
            let mut b_cat = vec![0f32; r_max * n_out];
            let mut off = 0;
            for (l, user_scale) in members {
                let r = l.rank();
                if l.a.cols != n_in || l.b.rows != n_out || l.b.cols != r {
                    return Err(OrtError::Adapter(format!(
                        "{}: lora_a {}x{}, lora_b {}x{}, expected A rx{n_in} and B {n_out}xr",
                        proj.gguf_weight(layer),
                        l.a.rows,
                        l.a.cols,
                        l.b.rows,
                        l.b.cols
                    )));
                }
                let name = proj.gguf_weight(layer);
                let a =
                    l.a.to_f32()
                        .map_err(|e| OrtError::Adapter(format!("{name} lora_a: {e}")))?;
                let b =
                    l.b.to_f32()
                        .map_err(|e| OrtError::Adapter(format!("{name} lora_b: {e}")))?;
                let s = l.scale * user_scale;
                // a is [r, in]: A_cat[i][off + j] = a[j][i].
                for j in 0..r {
                    for i in 0..n_in {
                        a_cat[i * r_max + off + j] = a[j * n_in + i];
                    }
                }
                // b is [out, r]: B_cat[off + j][o] = s * b[o][j].
                for o in 0..n_out {
                    for j in 0..r {
                        b_cat[(off + j) * n_out + o] = s * b[o * r + j];
                    }
                }
                off += r;
            }
            let (an, bn) = lora_input_names(layer, proj);
            params.push(Param {
                name: an,
                dims: vec![n_in as i64, r_max as i64],
                values: a_cat,
            });
            params.push(Param {
                name: bn,
                dims: vec![r_max as i64, n_out as i64],
                values: b_cat,
            });
        }
    }
    Ok(params)
}

/// The smallest LoRA rank that holds `adapters` (their ranks summed per projection),
/// or `None` when nothing would be active.
pub fn required_rank(adapters: &[(&Adapter, f32)]) -> Option<usize> {
    let mut sums = std::collections::HashMap::new();
    for (a, _) in adapters.iter().filter(|(_, s)| *s != 0.0) {
        for (layer, proj, d) in a.iter() {
            if let TensorDelta::Lora(l) = d {
                *sums.entry((layer, proj)).or_insert(0) += l.rank();
            }
        }
    }
    sums.into_values().max()
}

// --- the .onnx_adapter flatbuffer (onnxruntime/lora/adapter_format/adapter_schema.fbs)

/// Format version ONNX Runtime accepts (`kAdapterFormatVersion`).
const ADAPTER_FORMAT_VERSION: i32 = 1;

/// A front-to-back flatbuffer writer: every offset points forward, so each is written
/// as a placeholder and patched once its target is placed.
struct Fb {
    buf: Vec<u8>,
}

impl Fb {
    fn pad_to(&mut self, align: usize) {
        let n = self.buf.len().next_multiple_of(align);
        self.buf.resize(n, 0);
    }

    /// Pads so that a `u32` length written next is directly followed by data aligned
    /// to `align`.
    fn pad_for_vector(&mut self, align: usize) {
        while !(self.buf.len() + 4).is_multiple_of(align) {
            self.buf.push(0);
        }
    }

    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn placeholder(&mut self) -> usize {
        let at = self.buf.len();
        self.u32(0);
        at
    }

    /// Points the offset slot at `slot` to the current end.
    fn patch_here(&mut self, slot: usize) {
        let rel = (self.buf.len() - slot) as u32;
        self.buf[slot..slot + 4].copy_from_slice(&rel.to_le_bytes());
    }

    /// A vtable for a table of `field_count` 4-byte fields laid out in order after the
    /// table's soffset, then the table's soffset; returns the table's position.
    fn table_start(&mut self, field_count: u16) -> usize {
        self.pad_to(4);
        let vtable = self.buf.len();
        self.u16(4 + 2 * field_count);
        self.u16(4 + 4 * field_count);
        for i in 0..field_count {
            self.u16(4 + 4 * i);
        }
        self.pad_to(4);
        let table = self.buf.len();
        self.buf
            .extend_from_slice(&((table - vtable) as i32).to_le_bytes());
        table
    }

    fn string(&mut self, s: &str) {
        self.pad_to(4);
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    fn bytes_vector(&mut self, data: &[u8], align: usize) {
        self.pad_for_vector(align);
        self.u32(data.len() as u32);
        self.buf.extend_from_slice(data);
    }
}

/// `params` as an `.onnx_adapter` file.
pub fn encode_onnx_adapter(params: &[Param]) -> Result<Vec<u8>, OrtError> {
    let total: usize = params.iter().map(|p| p.values.len() * 4 + 64).sum();
    if total > i32::MAX as usize {
        return Err(OrtError::Adapter(format!(
            "{total} bytes of adapter values exceed the flatbuffer limit of 2 GiB"
        )));
    }
    let mut fb = Fb {
        buf: Vec::with_capacity(total + 64),
    };
    let root = fb.placeholder();
    fb.buf.extend_from_slice(b"TORT");
    // table Adapter { format_version, adapter_version, model_version, parameters }
    let adapter = fb.table_start(4);
    fb.buf
        .extend_from_slice(&ADAPTER_FORMAT_VERSION.to_le_bytes());
    fb.buf.extend_from_slice(&1i32.to_le_bytes());
    fb.buf.extend_from_slice(&1i32.to_le_bytes());
    let params_slot = fb.placeholder();
    let rel = (adapter - root) as u32;
    fb.buf[root..root + 4].copy_from_slice(&rel.to_le_bytes());
    // [Parameter]
    fb.pad_to(4);
    fb.patch_here(params_slot);
    fb.u32(params.len() as u32);
    let slots: Vec<usize> = params.iter().map(|_| fb.placeholder()).collect();
    for (p, slot) in params.iter().zip(slots) {
        // table Parameter { name, dims, data_type, raw_data }
        let table = fb.table_start(4);
        let rel = (table - slot) as u32;
        fb.buf[slot..slot + 4].copy_from_slice(&rel.to_le_bytes());
        let name_slot = fb.placeholder();
        let dims_slot = fb.placeholder();
        fb.buf
            .extend_from_slice(&(DataType::Float as i32).to_le_bytes());
        let data_slot = fb.placeholder();
        fb.pad_to(4);
        fb.patch_here(name_slot);
        fb.string(&p.name);
        fb.pad_for_vector(8);
        fb.patch_here(dims_slot);
        fb.u32(p.dims.len() as u32);
        for d in &p.dims {
            fb.buf.extend_from_slice(&d.to_le_bytes());
        }
        fb.pad_for_vector(8);
        fb.patch_here(data_slot);
        let raw: &[u8] = bytemuck::cast_slice(&p.values);
        fb.bytes_vector(raw, 8);
    }
    Ok(fb.buf)
}

/// An adapter ONNX Runtime holds, activated per run.
#[derive(Debug, Clone)]
pub struct OrtAdapter {
    pub(crate) inner: ort::session::Adapter,
    /// Names of the inputs it sets.
    pub params: Vec<String>,
}

impl OrtAdapter {
    /// From graft adapters (a stack when several), for a session built with `info`.
    pub fn from_graft(adapters: &[(&Adapter, f32)], info: &GraphInfo) -> Result<Self, OrtError> {
        let params = lora_params(adapters, info)?;
        let bytes = encode_onnx_adapter(&params)?;
        Self::from_bytes(&bytes, params.into_iter().map(|p| p.name).collect())
    }

    /// From an `.onnx_adapter` file.
    pub fn from_file(path: &Path) -> Result<Self, OrtError> {
        crate::session::ensure_runtime(None)?;
        let bytes = std::fs::read(path).map_err(|source| OrtError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes, Vec::new())
            .map_err(|e| OrtError::Adapter(format!("{}: {e}", path.display())))
    }

    fn from_bytes(bytes: &[u8], params: Vec<String>) -> Result<Self, OrtError> {
        crate::session::ensure_runtime(None)?;
        // The flatbuffer verifier checks 8-byte alignment of the int64 dims by
        // address, so hand it an 8-aligned copy.
        let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
        let view: &mut [u8] = bytemuck::cast_slice_mut(&mut aligned);
        view[..bytes.len()].copy_from_slice(bytes);
        let inner = ort::session::Adapter::from_memory(&view[..bytes.len()], None)?;
        Ok(OrtAdapter { inner, params })
    }
}

/// Writes the adapter values of `adapters` for a graph with `info` to `path`
/// (`.onnx_adapter`).
pub fn write_onnx_adapter(
    path: &Path,
    adapters: &[(&Adapter, f32)],
    info: &GraphInfo,
) -> Result<usize, OrtError> {
    let params = lora_params(adapters, info)?;
    let bytes = encode_onnx_adapter(&params)?;
    std::fs::write(path, &bytes).map_err(|source| OrtError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    use graft_adapters::delta::f32_weight;
    use graft_adapters::AdapterFormat;
    use graft_runtime::model::{Arch, ModelConfig, RopeScaling, RopeStyle};

    fn config() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            n_vocab: 8,
            n_embd: 4,
            n_layer: 1,
            n_ff: 6,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 2,
            n_rot: 2,
            rope_base: 1e4,
            rope_scaling: RopeScaling::None,
            rope_style: RopeStyle::Normal,
            rms_eps: 1e-5,
            n_ctx_train: 16,
        }
    }

    fn info(spec: Option<LoraSpec>) -> GraphInfo {
        let c = config();
        GraphInfo {
            n_layer: 1,
            n_head_kv: 1,
            head_dim: 2,
            n_vocab: 8,
            max_context: 16,
            lora: spec,
            proj_shapes: Proj::ALL
                .iter()
                .map(|&p| {
                    let (o, i) = graft_adapters::delta::projection_shape(&c, p);
                    (p, i, o)
                })
                .collect(),
        }
    }

    /// A rank-`r` LoRA on q (out 4, in 4) with A[j][i] = j + i/10, B[o][j] = o - j.
    fn adapter(r: usize, scale: f32) -> Adapter {
        let a: Vec<f32> = (0..r * 4)
            .map(|k| (k / 4) as f32 + (k % 4) as f32 / 10.0)
            .collect();
        let b: Vec<f32> = (0..4 * r)
            .map(|k| (k / r) as f32 - (k % r) as f32)
            .collect();
        let mut ad = Adapter::new(AdapterFormat::Memory, "t".into(), 1);
        let delta = TensorDelta::Lora(LoraDelta {
            a: f32_weight(r, 4, &a).unwrap(),
            b: f32_weight(4, r, &b).unwrap(),
            scale,
            dora_factor: None,
        });
        ad.insert(&config(), 0, Proj::Q, delta).unwrap();
        ad
    }

    #[test]
    fn lora_params_give_the_dense_delta() {
        let (a1, a2) = (adapter(2, 0.5), adapter(1, 2.0));
        let info = info(Some(LoraSpec::all(4)));
        let params = lora_params(&[(&a1, 1.0), (&a2, 0.25)], &info).unwrap();
        assert_eq!(params.len(), 2);
        let (pa, pb) = (&params[0], &params[1]);
        assert_eq!(pa.name, "blk.0.attn_q.lora_a");
        assert_eq!(pa.dims, [4, 4]);
        assert_eq!(pb.dims, [4, 4]);
        // A_cat B_cat (x row-vector convention) equals the transposed sum of deltas.
        let mut want = [0f32; 16];
        for (ad, s) in [(&a1, 1.0f32), (&a2, 0.25)] {
            let TensorDelta::Lora(l) = ad.get(0, Proj::Q).unwrap() else {
                unreachable!()
            };
            for (k, v) in l.dense().unwrap().iter().enumerate() {
                want[k] += s * v;
            }
        }
        for o in 0..4 {
            for i in 0..4 {
                let got: f32 = (0..4)
                    .map(|j| pa.values[i * 4 + j] * pb.values[j * 4 + o])
                    .sum();
                assert!(
                    (got - want[o * 4 + i]).abs() < 1e-5,
                    "({o},{i}) {got} {}",
                    want[o * 4 + i]
                );
            }
        }
    }

    #[test]
    fn lora_params_reject_what_the_graph_cannot_hold() {
        let a = adapter(2, 1.0);
        let e = lora_params(&[(&a, 1.0), (&a, 1.0)], &info(Some(LoraSpec::all(3)))).unwrap_err();
        assert!(e.to_string().contains("rank 4 exceeds"), "{e}");
        let only_v = LoraSpec {
            targets: vec![Proj::V],
            max_rank: 8,
        };
        let e = lora_params(&[(&a, 1.0)], &info(Some(only_v))).unwrap_err();
        assert!(e.to_string().contains("no LoRA inputs for attn_q"), "{e}");
        let e = lora_params(&[(&a, 1.0)], &info(None)).unwrap_err();
        assert!(e.to_string().contains("without LoRA inputs"), "{e}");
        // A zero scale drops the adapter.
        assert!(lora_params(&[(&a, 0.0)], &info(Some(LoraSpec::all(1))))
            .unwrap()
            .is_empty());
        assert_eq!(required_rank(&[(&a, 1.0), (&a, 0.5)]), Some(4));
        assert_eq!(required_rank(&[(&a, 0.0)]), None);
    }

    fn u32_at(b: &[u8], at: usize) -> usize {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
    }

    #[test]
    fn flatbuffer_offsets_reach_the_values() {
        let params = vec![Param {
            name: "x.lora_a".into(),
            dims: vec![2, 3],
            values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        }];
        let b = encode_onnx_adapter(&params).unwrap();
        assert_eq!(&b[4..8], b"TORT");
        let root = u32_at(&b, 0);
        let vt = root - i32::from_le_bytes(b[root..root + 4].try_into().unwrap()) as usize;
        assert_eq!(u16::from_le_bytes([b[vt], b[vt + 1]]), 12);
        assert_eq!(u32_at(&b, root + 4), 1, "format version");
        let pslot = root + 16;
        let pvec = pslot + u32_at(&b, pslot);
        assert_eq!(u32_at(&b, pvec), 1);
        let t = pvec + 4 + u32_at(&b, pvec + 4);
        let name = t + 4 + u32_at(&b, t + 4);
        assert_eq!(&b[name + 4..name + 4 + 8], b"x.lora_a");
        let dims = t + 8 + u32_at(&b, t + 8);
        assert_eq!(u32_at(&b, dims), 2);
        assert_eq!((dims + 4) % 8, 0);
        assert_eq!(u32_at(&b, t + 12), 1, "FLOAT");
        let data = t + 16 + u32_at(&b, t + 16);
        assert_eq!(u32_at(&b, data), 24);
        assert_eq!((data + 4) % 8, 0);
        let v: &[u8] = &b[data + 4..data + 28];
        assert_eq!(f32::from_le_bytes(v[20..24].try_into().unwrap()), 6.0);
    }
}
