//! The ONNX graph of a loaded graft model (llama, qwen2): one graph serves prefill and
//! decode, with the KV cache as inputs (`past_*`) and outputs (`present_*`) and the
//! LoRA A/B matrices of every targeted projection as inputs.
//!
//! Graph interface (batch 1):
//! - `input_ids` int64 `[1, seq]`
//! - `past_key.{i}`, `past_value.{i}` float `[1, n_head_kv, past, head_dim]`; default:
//!   empty (`past` = 0), so a prefill may leave them out
//! - `num_logits` int64 `[1]`: logits for the last that many positions, 0 (default)
//!   for all of them
//! - `blk.{i}.{proj}.lora_a` float `[in, max_rank]`, `blk.{i}.{proj}.lora_b` float
//!   `[max_rank, out]` for each targeted projection; default: zeros (no adapter).
//!   The adapter's scale is folded into B.
//! - outputs `logits` float `[1, n, n_vocab]`, `present_key.{i}`, `present_value.{i}`
//!   `[1, n_head_kv, past + seq, head_dim]`
//!
//! Positions are `past .. past + seq`. Weights: F32 stays F32 and F16/BF16 keep their
//! type behind a Cast (both multiplied through `Gemm` with `transB`, which keeps GGUF's
//! `[out, in]` layout and lets a tied output head share the embedding table); Q4_0 and
//! Q8_0 are repacked bit-exactly into `com.microsoft.MatMulNBits` (block 32, implicit
//! zero point); Q4_1 and Q4_K keep their 4-bit codes in MatMulNBits blocks of 32 with
//! float scales and zero points resolved from their block headers; other quantized
//! types are dequantized to F32 (exact, larger). RMSNorm, RoPE and attention are plain
//! ONNX ops, so the model stays valid ONNX.

use std::collections::HashMap;

use graft_quant::blocks::{f16_to_f32, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ8_0};
use graft_quant::kquants::get_scale_min_k4;
use graft_quant::{GgmlType, QK};
use graft_runtime::model::{Model, ModelConfig, Proj, RopeScaling, RopeStyle, Weight};

use crate::onnx::{self, Attr, DataType, Dim, Node, Tensor, TensorData, ValueInfo};
use crate::OrtError;

/// Name of the external data file weights are stored in, beside `model.onnx`.
pub const DATA_FILE: &str = "model.onnx.data";
/// Tensors at least this large go to the external data file.
const EXTERNAL_MIN_BYTES: usize = 1024;
/// Alignment of each tensor in the external data.
const DATA_ALIGN: usize = 64;
const MS_DOMAIN: &str = "com.microsoft";
/// ONNX operator set the graph is written against (ONNX Runtime >= 1.17).
pub const ONNX_OPSET: i64 = 18;

/// The LoRA inputs a graph gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraSpec {
    /// Projections that get A/B inputs, in every layer.
    pub targets: Vec<Proj>,
    /// Rank every adapter is padded to.
    pub max_rank: usize,
}

impl LoraSpec {
    /// All seven projections at `max_rank`.
    pub fn all(max_rank: usize) -> LoraSpec {
        LoraSpec {
            targets: Proj::ALL.to_vec(),
            max_rank,
        }
    }
}

/// How the graph is built.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphOptions {
    /// Positions the RoPE tables cover (the longest sequence a session can hold).
    pub max_context: usize,
    /// LoRA inputs, or none.
    pub lora: Option<LoraSpec>,
    /// `MatMulNBits` accuracy level: 4 (default) quantizes activations to int8 like
    /// llama.cpp does (on CPU the 8-bit kernels have no fast float path: the 49152-row
    /// Q8_0 head of smollm2-135m took 550 ms per token at level 0, 7-9 ms at 4); 0
    /// computes in float.
    pub accuracy_level: i64,
}

impl GraphOptions {
    pub fn for_model(model: &Model) -> GraphOptions {
        GraphOptions {
            max_context: model.config.n_ctx_train.max(1),
            lora: None,
            accuracy_level: 4,
        }
    }
}

/// What a session needs to know about a built graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphInfo {
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub max_context: usize,
    pub lora: Option<LoraSpec>,
    /// (in, out) of each projection, for LoRA inputs.
    pub proj_shapes: Vec<(Proj, usize, usize)>,
}

impl GraphInfo {
    pub fn proj_shape(&self, p: Proj) -> (usize, usize) {
        self.proj_shapes
            .iter()
            .find(|(q, _, _)| *q == p)
            .map_or((0, 0), |&(_, i, o)| (i, o))
    }
}

/// Names of the graph inputs of the LoRA matrices of `proj` in `layer`.
pub fn lora_input_names(layer: usize, proj: Proj) -> (String, String) {
    let stem = format!("blk.{layer}.{}", proj.gguf_stem());
    (format!("{stem}.lora_a"), format!("{stem}.lora_b"))
}

pub fn past_names(layer: usize) -> (String, String) {
    (format!("past_key.{layer}"), format!("past_value.{layer}"))
}

pub fn present_names(layer: usize) -> (String, String) {
    (
        format!("present_key.{layer}"),
        format!("present_value.{layer}"),
    )
}

/// A built graph: the ONNX model (large tensors referring to [`DATA_FILE`]) and the
/// bytes of that file.
pub struct OnnxModel {
    pub model: onnx::Model,
    pub data: Vec<u8>,
    pub info: GraphInfo,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("info", &self.info)
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

/// (in, out) of every projection of `c`.
fn proj_shapes(c: &ModelConfig) -> Vec<(Proj, usize, usize)> {
    Proj::ALL
        .iter()
        .map(|&p| {
            let (out, inp) = graft_adapters::delta::projection_shape(c, p);
            (p, inp, out)
        })
        .collect()
}

/// The interface the graph of `model` built with `opts` has (no weights touched).
pub fn graph_info(model: &Model, opts: &GraphOptions) -> GraphInfo {
    let c = &model.config;
    GraphInfo {
        n_layer: c.n_layer,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        n_vocab: c.n_vocab,
        max_context: opts.max_context.max(1),
        lora: opts.lora.clone(),
        proj_shapes: proj_shapes(c),
    }
}

/// RoPE cos/sin tables `[max_context, n_rot/2]`, computed exactly like graft's
/// forward pass (ggml's rope cache: theta advanced by repeated f32 multiplication,
/// linear scaling and Llama 3 frequency divisors applied per pair).
pub fn rope_tables(model: &Model, max_context: usize) -> (Vec<f32>, Vec<f32>) {
    let c = &model.config;
    let half = c.n_rot / 2;
    let theta_scale = c.rope_base.powf(-2.0 / c.n_rot as f32);
    let freq_scale = match c.rope_scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear { factor } => 1.0 / factor,
    };
    let mut cos = vec![0f32; max_context * half];
    let mut sin = vec![0f32; max_context * half];
    for pos in 0..max_context {
        let mut theta = pos as f32;
        for i in 0..half {
            let ff = model
                .rope_freqs
                .as_ref()
                .and_then(|f| f.get(i))
                .copied()
                .unwrap_or(1.0);
            let t = freq_scale * (theta / ff);
            cos[pos * half + i] = t.cos();
            sin[pos * half + i] = t.sin();
            theta *= theta_scale;
        }
    }
    (cos, sin)
}

/// Q4_0 blocks repacked for `MatMulNBits` (4 bits, block 32): `(B, scales)`, B being
/// `[rows, blocks, 16]` bytes. GGML keeps elements 0..15 of a block in the low nibbles
/// and 16..31 in the high nibbles; MatMulNBits wants element 2i in the low and 2i+1 in
/// the high nibble of byte i. Both store `q` with an implicit zero point of 8.
pub fn repack_q4_0(w: &Weight) -> Result<(Vec<u8>, Vec<f32>), OrtError> {
    let blocks: &[BlockQ4_0] = cast_blocks(w, GgmlType::Q4_0)?;
    let mut packed = Vec::with_capacity(blocks.len() * QK / 2);
    let mut scales = Vec::with_capacity(blocks.len());
    for b in blocks {
        let nib = |e: usize| {
            if e < QK / 2 {
                b.qs[e] & 0x0f
            } else {
                b.qs[e - QK / 2] >> 4
            }
        };
        for i in 0..QK / 2 {
            packed.push(nib(2 * i) | (nib(2 * i + 1) << 4));
        }
        scales.push(f16_to_f32(b.d));
    }
    Ok((packed, scales))
}

/// Q8_0 blocks for `MatMulNBits` (8 bits, block 32): `q + 128` as unsigned bytes (the
/// implicit zero point is 128) and the block scales.
pub fn repack_q8_0(w: &Weight) -> Result<(Vec<u8>, Vec<f32>), OrtError> {
    let blocks: &[BlockQ8_0] = cast_blocks(w, GgmlType::Q8_0)?;
    let mut packed = Vec::with_capacity(blocks.len() * QK);
    let mut scales = Vec::with_capacity(blocks.len());
    for b in blocks {
        packed.extend(b.qs.iter().map(|&q| (q as u8) ^ 0x80));
        scales.push(f16_to_f32(b.d));
    }
    Ok((packed, scales))
}

/// 4-bit `MatMulNBits` operands with float zero points: `(B, scales, zero_points)`.
pub type NBitsWithZp = (Vec<u8>, Vec<f32>, Vec<f32>);

/// Appends one 32-value block of 4-bit codes `q` whose values are `s * q - min` as
/// MatMulNBits' `(q - zp) * scale` with a float zero point `zp = min / s`. A zero `s`
/// makes the codes irrelevant: they become 0 with scale `min` and zero point 1.
fn push_affine_block(out: &mut NBitsWithZp, q: &[u8; QK], s: f32, min: f32) {
    let (packed, scales, zps) = out;
    if s == 0.0 {
        packed.extend(std::iter::repeat_n(0u8, QK / 2));
        scales.push(min);
        zps.push(if min == 0.0 { 0.0 } else { 1.0 });
        return;
    }
    for i in 0..QK / 2 {
        packed.push(q[2 * i] | (q[2 * i + 1] << 4));
    }
    scales.push(s);
    zps.push(min / s);
}

/// Q4_1 blocks (`d * q + m`) as 4-bit MatMulNBits blocks with float zero points.
pub fn repack_q4_1(w: &Weight) -> Result<NBitsWithZp, OrtError> {
    let blocks: &[BlockQ4_1] = cast_blocks(w, GgmlType::Q4_1)?;
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for b in blocks {
        let mut q = [0u8; QK];
        for (j, &byte) in b.qs.iter().enumerate() {
            q[j] = byte & 0x0f;
            q[j + QK / 2] = byte >> 4;
        }
        push_affine_block(&mut out, &q, f16_to_f32(b.d), -f16_to_f32(b.m));
    }
    Ok(out)
}

/// Q4_K super-blocks (8 sub-blocks of 32 values `d * sc * q - dmin * m`) as 4-bit
/// MatMulNBits blocks of 32 with float zero points: the same codes, the sub-block
/// scales and mins resolved to floats.
pub fn repack_q4_k(w: &Weight) -> Result<NBitsWithZp, OrtError> {
    let blocks: &[BlockQ4_K] = cast_blocks(w, GgmlType::Q4_K)?;
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for b in blocks {
        let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
        // 64 values per 32 bytes: low nibbles are sub-block 2c, high nibbles 2c+1.
        for (c, qs) in b.qs.chunks_exact(QK).enumerate() {
            for (half, shift) in [(0, 0), (1, 4)] {
                let (sc, m) = get_scale_min_k4(2 * c + half, &b.scales);
                let mut q = [0u8; QK];
                for (qv, &byte) in q.iter_mut().zip(qs) {
                    *qv = (byte >> shift) & 0x0f;
                }
                push_affine_block(&mut out, &q, d * f32::from(sc), dmin * f32::from(m));
            }
        }
    }
    Ok(out)
}

fn cast_blocks<T: bytemuck::Pod>(w: &Weight, ty: GgmlType) -> Result<&[T], OrtError> {
    let expected = ty.row_size(w.cols).ok().and_then(|r| r.checked_mul(w.rows));
    if w.ty != ty || expected != Some(w.data().len()) {
        return Err(OrtError::Graph(format!(
            "{w:?}: expected {ty} data of {expected:?} bytes, found {} {} bytes",
            w.ty,
            w.data().len()
        )));
    }
    bytemuck::try_cast_slice(w.data()).map_err(|e| OrtError::Graph(format!("{w:?}: {e}")))
}

/// Types that become `MatMulNBits` blocks of 32.
fn is_nbits(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q8_0
    )
}

fn dims(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&d| d as i64).collect()
}

struct Builder {
    nodes: Vec<Node>,
    inits: Vec<Tensor>,
    data: Vec<u8>,
    consts: HashMap<Vec<u8>, String>,
    counter: usize,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            nodes: Vec::new(),
            inits: Vec::new(),
            data: Vec::new(),
            consts: HashMap::new(),
            counter: 0,
        }
    }

    /// An initializer; large ones go to the external data.
    fn init(&mut self, name: &str, dtype: DataType, shape: &[usize], bytes: &[u8]) -> String {
        let data = if bytes.len() >= EXTERNAL_MIN_BYTES {
            let offset = self.data.len().next_multiple_of(DATA_ALIGN);
            self.data.resize(offset, 0);
            self.data.extend_from_slice(bytes);
            TensorData::External {
                location: DATA_FILE.to_owned(),
                offset,
                length: bytes.len(),
            }
        } else {
            TensorData::Raw(bytes.to_vec())
        };
        self.inits.push(Tensor {
            name: name.to_owned(),
            dtype,
            dims: dims(shape),
            data,
        });
        name.to_owned()
    }

    fn init_f32(&mut self, name: &str, shape: &[usize], v: &[f32]) -> String {
        self.init(name, DataType::Float, shape, bytemuck::cast_slice(v))
    }

    /// A small constant, shared between uses of the same value.
    fn konst(&mut self, dtype: DataType, shape: &[i64], bytes: Vec<u8>) -> String {
        let mut key = vec![dtype as u8];
        key.extend(shape.iter().flat_map(|d| d.to_le_bytes()));
        key.extend_from_slice(&bytes);
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = format!("const.{}", self.consts.len());
        self.inits.push(Tensor::raw(&name, dtype, shape, bytes));
        self.consts.insert(key, name.clone());
        name
    }

    fn i64s(&mut self, v: &[i64]) -> String {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.konst(DataType::Int64, &[v.len() as i64], bytes)
    }

    fn i64_scalar(&mut self, v: i64) -> String {
        self.konst(DataType::Int64, &[], v.to_le_bytes().to_vec())
    }

    fn f32_scalar(&mut self, v: f32) -> String {
        self.konst(DataType::Float, &[], v.to_le_bytes().to_vec())
    }

    fn node(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        n_out: usize,
        attrs: Vec<(&str, Attr)>,
        hint: &str,
    ) -> Vec<String> {
        self.counter += 1;
        let name = format!("{hint}/{op}_{}", self.counter);
        let outputs: Vec<String> = (0..n_out).map(|i| format!("{name}:{i}")).collect();
        self.nodes.push(Node {
            name,
            op_type: op.to_owned(),
            domain: domain.to_owned(),
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            outputs: outputs.clone(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        });
        outputs
    }

    /// A one-output ONNX-domain node.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, hint: &str) -> String {
        let mut out = self.node("", op, inputs, 1, attrs, hint);
        out.pop().unwrap_or_default()
    }

    /// A node whose single output gets a fixed name (graph outputs).
    fn op_named(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, output: &str) {
        self.counter += 1;
        self.nodes.push(Node {
            name: format!("{output}/{op}_{}", self.counter),
            op_type: op.to_owned(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            outputs: vec![output.to_owned()],
            attrs: attrs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        });
    }

    fn reshape(&mut self, x: &str, shape: &[i64], hint: &str) -> String {
        let s = self.i64s(shape);
        self.op("Reshape", &[x, &s], vec![], hint)
    }

    fn transpose(&mut self, x: &str, perm: &[i64], hint: &str) -> String {
        self.op(
            "Transpose",
            &[x],
            vec![("perm", Attr::Ints(perm.to_vec()))],
            hint,
        )
    }

    fn binary(&mut self, op: &str, a: &str, b: &str, hint: &str) -> String {
        self.op(op, &[a, b], vec![], hint)
    }

    fn slice(&mut self, x: &str, start: i64, end: i64, axis: i64, hint: &str) -> String {
        let (s, e, a) = (self.i64s(&[start]), self.i64s(&[end]), self.i64s(&[axis]));
        self.op("Slice", &[x, &s, &e, &a], vec![], hint)
    }

    /// RMSNorm from standard ONNX ops (`x / sqrt(mean(x^2) + eps) * w`), which ONNX
    /// Runtime fuses into its SimplifiedLayerNormalization kernel; plain ops keep the
    /// model valid ONNX for other tools and providers.
    fn rms_norm(&mut self, x: &str, weight: &str, eps: f32, hint: &str) -> String {
        let two = self.f32_scalar(2.0);
        let eps = self.f32_scalar(eps);
        let one = self.f32_scalar(1.0);
        let axes = self.i64s(&[-1]);
        let sq = self.binary("Pow", x, &two, hint);
        let mean = self.op(
            "ReduceMean",
            &[&sq, &axes],
            vec![("keepdims", Attr::Int(1))],
            hint,
        );
        let var = self.binary("Add", &mean, &eps, hint);
        let rms = self.op("Sqrt", &[&var], vec![], hint);
        let inv = self.binary("Div", &one, &rms, hint);
        let normed = self.binary("Mul", x, &inv, hint);
        self.binary("Mul", &normed, weight, hint)
    }
}

/// How a weight matrix enters the graph.
enum Linear {
    /// `[out, in]` float initializer (after a Cast for F16/BF16), used with Gemm transB.
    Float(String),
    /// MatMulNBits operands.
    NBits {
        b: String,
        scales: String,
        /// Float zero points (Q4_1, Q4_K); none: the implicit 2^(bits-1).
        zero_points: Option<String>,
        bits: i64,
        rows: usize,
        cols: usize,
    },
}

struct GraphBuilder<'m> {
    model: &'m Model,
    opts: &'m GraphOptions,
    b: Builder,
}

impl GraphBuilder<'_> {
    /// The float `[rows, cols]` initializer of `w` (F32, F16, BF16 kept; any other
    /// type dequantized to F32); returns its name in f32 (after a Cast if needed).
    fn float_weight(&mut self, name: &str, w: &Weight) -> Result<String, OrtError> {
        let shape = [w.rows, w.cols];
        match w.ty {
            GgmlType::F32 => Ok(self.b.init(name, DataType::Float, &shape, w.data())),
            GgmlType::F16 | GgmlType::BF16 => {
                let dt = if w.ty == GgmlType::F16 {
                    DataType::Float16
                } else {
                    DataType::BFloat16
                };
                let raw = self.b.init(name, dt, &shape, w.data());
                Ok(self.cast_f32(&raw, name))
            }
            _ => {
                let v = w
                    .to_f32()
                    .map_err(|e| OrtError::Graph(format!("{name}: {e}")))?;
                Ok(self.b.init_f32(name, &shape, &v))
            }
        }
    }

    fn cast_f32(&mut self, x: &str, hint: &str) -> String {
        self.b.op(
            "Cast",
            &[x],
            vec![("to", Attr::Int(DataType::Float as i64))],
            hint,
        )
    }

    fn linear_weight(&mut self, name: &str, w: &Weight) -> Result<Linear, OrtError> {
        let blocks = w.cols / QK;
        match w.ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => {
                let (packed, scales, bits, blob) = if w.ty == GgmlType::Q4_0 {
                    let (p, s) = repack_q4_0(w)?;
                    (p, s, 4, QK / 2)
                } else {
                    let (p, s) = repack_q8_0(w)?;
                    (p, s, 8, QK)
                };
                let b = self
                    .b
                    .init(name, DataType::Uint8, &[w.rows, blocks, blob], &packed);
                let scales =
                    self.b
                        .init_f32(&format!("{name}.scales"), &[w.rows * blocks], &scales);
                Ok(Linear::NBits {
                    b,
                    scales,
                    zero_points: None,
                    bits,
                    rows: w.rows,
                    cols: w.cols,
                })
            }
            GgmlType::Q4_1 | GgmlType::Q4_K => {
                let (packed, scales, zps) = if w.ty == GgmlType::Q4_1 {
                    repack_q4_1(w)?
                } else {
                    repack_q4_k(w)?
                };
                let b = self
                    .b
                    .init(name, DataType::Uint8, &[w.rows, blocks, QK / 2], &packed);
                let n = w.rows * blocks;
                let scales = self.b.init_f32(&format!("{name}.scales"), &[n], &scales);
                let zp = self.b.init_f32(&format!("{name}.zero_points"), &[n], &zps);
                Ok(Linear::NBits {
                    b,
                    scales,
                    zero_points: Some(zp),
                    bits: 4,
                    rows: w.rows,
                    cols: w.cols,
                })
            }
            _ => Ok(Linear::Float(self.float_weight(name, w)?)),
        }
    }

    /// `x [n, in] -> [n, out]`.
    fn linear(&mut self, x: &str, w: &Linear, hint: &str) -> String {
        match w {
            Linear::Float(name) => {
                self.b
                    .op("Gemm", &[x, name], vec![("transB", Attr::Int(1))], hint)
            }
            Linear::NBits {
                b,
                scales,
                zero_points,
                bits,
                rows,
                cols,
            } => {
                let mut inputs = vec![x, b.as_str(), scales.as_str()];
                inputs.extend(zero_points.as_deref());
                let mut out = self.b.node(
                    MS_DOMAIN,
                    "MatMulNBits",
                    &inputs,
                    1,
                    vec![
                        ("K", Attr::Int(*cols as i64)),
                        ("N", Attr::Int(*rows as i64)),
                        ("bits", Attr::Int(*bits)),
                        ("block_size", Attr::Int(QK as i64)),
                        ("accuracy_level", Attr::Int(self.opts.accuracy_level)),
                    ],
                    hint,
                );
                out.pop().unwrap_or_default()
            }
        }
    }

    /// A projection of layer `li` with its bias and LoRA term.
    fn project(
        &mut self,
        li: usize,
        proj: Proj,
        x: &str,
        bias: Option<&Vec<f32>>,
    ) -> Result<String, OrtError> {
        let model = self.model;
        let layer = model
            .layers
            .get(li)
            .ok_or_else(|| OrtError::Graph(format!("layer {li} is missing")))?;
        let w = layer.proj(proj);
        let wname = proj.gguf_weight(li);
        let lw = self.linear_weight(&wname, w)?;
        let hint = format!("blk.{li}/{}", proj.gguf_stem());
        let mut y = self.linear(x, &lw, &hint);
        if let Some(spec) = self
            .opts
            .lora
            .as_ref()
            .filter(|s| s.targets.contains(&proj))
        {
            let (a, b) = lora_input_names(li, proj);
            let r = spec.max_rank;
            let t = self.b.binary("MatMul", x, &a, &hint);
            let d = self.b.binary("MatMul", &t, &b, &hint);
            y = self.b.binary("Add", &y, &d, &hint);
            // Zero defaults: inputs with an initializer of the same name may be left
            // out of a run (no adapter active).
            self.b.init_f32(&a, &[w.cols, r], &vec![0.0; w.cols * r]);
            self.b.init_f32(&b, &[r, w.rows], &vec![0.0; r * w.rows]);
        }
        if let Some(bias) = bias {
            let bn = self.b.init_f32(
                &format!("blk.{li}.{}.bias", proj.gguf_stem()),
                &[bias.len()],
                bias,
            );
            y = self.b.binary("Add", &y, &bn, &hint);
        }
        Ok(y)
    }

    /// RoPE on `x [heads, seq, head_dim]`; `cos`/`sin` are `[seq, n_rot/2]`
    /// (NEOX) or `[seq, n_rot/2, 1]` (adjacent pairs).
    fn rope(&mut self, x: &str, heads: usize, cs: &RopeInputs, hint: &str) -> String {
        let c = &self.model.config;
        let (hd, n_rot) = (c.head_dim as i64, c.n_rot as i64);
        let half = n_rot / 2;
        let b = &mut self.b;
        let (rot, pass) = if n_rot < hd {
            (
                b.slice(x, 0, n_rot, 2, hint),
                Some(b.slice(x, n_rot, hd, 2, hint)),
            )
        } else {
            (x.to_owned(), None)
        };
        let rotated = match c.rope_style {
            RopeStyle::Normal => {
                let pairs = b.reshape(&rot, &[heads as i64, -1, half, 2], hint);
                let parts = b.node(
                    "",
                    "Split",
                    &[&pairs],
                    2,
                    vec![("axis", Attr::Int(3)), ("num_outputs", Attr::Int(2))],
                    hint,
                );
                let (x0, x1) = (&parts[0], &parts[1]);
                let (o0, o1) = rotate(b, x0, x1, &cs.cos_pairs, &cs.sin_pairs, hint);
                let cat = b.op("Concat", &[&o0, &o1], vec![("axis", Attr::Int(3))], hint);
                b.reshape(&cat, &[heads as i64, -1, n_rot], hint)
            }
            RopeStyle::Neox => {
                let parts = b.node(
                    "",
                    "Split",
                    &[&rot],
                    2,
                    vec![("axis", Attr::Int(2)), ("num_outputs", Attr::Int(2))],
                    hint,
                );
                let (x0, x1) = (&parts[0], &parts[1]);
                let (o0, o1) = rotate(b, x0, x1, &cs.cos, &cs.sin, hint);
                b.op("Concat", &[&o0, &o1], vec![("axis", Attr::Int(2))], hint)
            }
        };
        match pass {
            Some(p) => b.op(
                "Concat",
                &[&rotated, &p],
                vec![("axis", Attr::Int(2))],
                hint,
            ),
            None => rotated,
        }
    }

    fn build(mut self) -> Result<OnnxModel, OrtError> {
        let model = self.model;
        let c = &model.config;
        let (d, hd, nh, nkv) = (c.n_embd, c.head_dim, c.n_head, c.n_head_kv);
        if nkv == 0 || !nh.is_multiple_of(nkv) || c.n_rot > hd || !c.n_rot.is_multiple_of(2) {
            return Err(OrtError::Graph(format!(
                "unsupported head layout: {nh} heads, {nkv} kv heads, head dim {hd}, n_rot {}",
                c.n_rot
            )));
        }
        if let Some(spec) = &self.opts.lora {
            if spec.max_rank == 0 || spec.targets.is_empty() {
                return Err(OrtError::Graph(
                    "LoRA inputs need a rank above 0 and at least one target".into(),
                ));
            }
        }
        for w in [&model.token_embd, &model.output].into_iter().chain(
            model
                .layers
                .iter()
                .flat_map(|l| Proj::ALL.map(|p| l.proj(p))),
        ) {
            if is_nbits(w.ty) && !w.cols.is_multiple_of(QK) {
                return Err(OrtError::Graph(format!(
                    "{w:?}: rows of {} values are not whole blocks of {QK}",
                    w.cols
                )));
            }
        }
        let group = nh / nkv;
        let max_ctx = self.opts.max_context.max(1);
        let mut inputs = vec![ValueInfo {
            name: "input_ids".into(),
            dtype: DataType::Int64,
            shape: vec![Dim::Fixed(1), Dim::Param("seq".into())],
        }];
        let mut outputs = vec![ValueInfo {
            name: "logits".into(),
            dtype: DataType::Float,
            shape: vec![
                Dim::Fixed(1),
                Dim::Param("n_logits".into()),
                Dim::Fixed(c.n_vocab as i64),
            ],
        }];
        let kv_shape = |len: &str| {
            vec![
                Dim::Fixed(1),
                Dim::Fixed(nkv as i64),
                Dim::Param(len.into()),
                Dim::Fixed(hd as i64),
            ]
        };
        for li in 0..c.n_layer {
            let (pk, pv) = past_names(li);
            let (ok, ov) = present_names(li);
            for (p, o) in [(pk, ok), (pv, ov)] {
                inputs.push(ValueInfo {
                    name: p.clone(),
                    dtype: DataType::Float,
                    shape: kv_shape("past"),
                });
                // Empty default: a prefill need not pass the cache.
                self.b.init(&p, DataType::Float, &[1, nkv, 0, hd], &[]);
                outputs.push(ValueInfo {
                    name: o,
                    dtype: DataType::Float,
                    shape: kv_shape("total"),
                });
            }
        }
        inputs.push(ValueInfo {
            name: "num_logits".into(),
            dtype: DataType::Int64,
            shape: vec![Dim::Fixed(1)],
        });
        self.b
            .init("num_logits", DataType::Int64, &[1], &0i64.to_le_bytes());
        let mut proj_inputs = Vec::new();
        if let Some(spec) = &self.opts.lora {
            for li in 0..c.n_layer {
                for &p in &spec.targets {
                    let (a, b) = lora_input_names(li, p);
                    let (i, o) = proj_shapes(c)
                        .into_iter()
                        .find(|(q, _, _)| *q == p)
                        .map_or((0, 0), |(_, i, o)| (i, o));
                    proj_inputs.push(ValueInfo {
                        name: a,
                        dtype: DataType::Float,
                        shape: vec![Dim::Fixed(i as i64), Dim::Fixed(spec.max_rank as i64)],
                    });
                    proj_inputs.push(ValueInfo {
                        name: b,
                        dtype: DataType::Float,
                        shape: vec![Dim::Fixed(spec.max_rank as i64), Dim::Fixed(o as i64)],
                    });
                }
            }
        }
        inputs.extend(proj_inputs);

        // Positions past..past+seq and the causal mask [seq, total].
        let b = &mut self.b;
        let (pk0, _) = past_names(0);
        let past_shape = b.op("Shape", &[&pk0], vec![], "pos");
        let two = b.i64_scalar(2);
        let one = b.i64_scalar(1);
        let zero = b.i64_scalar(0);
        let past = b.op(
            "Gather",
            &[&past_shape, &two],
            vec![("axis", Attr::Int(0))],
            "pos",
        );
        let ids_shape = b.op("Shape", &["input_ids"], vec![], "pos");
        let seq = b.op(
            "Gather",
            &[&ids_shape, &one],
            vec![("axis", Attr::Int(0))],
            "pos",
        );
        let total = b.binary("Add", &past, &seq, "pos");
        let positions = b.op("Range", &[&past, &total, &one], vec![], "pos");
        let key_pos = b.op("Range", &[&zero, &total, &one], vec![], "mask");
        let axes1 = b.i64s(&[1]);
        let q_pos = b.op("Unsqueeze", &[&positions, &axes1], vec![], "mask");
        let future = b.binary("Greater", &key_pos, &q_pos, "mask");
        let neg_inf = b.f32_scalar(f32::NEG_INFINITY);
        let fzero = b.f32_scalar(0.0);
        let mask = b.op("Where", &[&future, &neg_inf, &fzero], vec![], "mask");

        // RoPE tables gathered at the positions.
        let (cos_t, sin_t) = rope_tables(model, max_ctx);
        let half = c.n_rot / 2;
        let cos_t = b.init_f32("rope.cos", &[max_ctx, half], &cos_t);
        let sin_t = b.init_f32("rope.sin", &[max_ctx, half], &sin_t);
        let cos = b.op(
            "Gather",
            &[&cos_t, &positions],
            vec![("axis", Attr::Int(0))],
            "rope",
        );
        let sin = b.op(
            "Gather",
            &[&sin_t, &positions],
            vec![("axis", Attr::Int(0))],
            "rope",
        );
        let axes_last = b.i64s(&[-1]);
        let cos_pairs = b.op("Unsqueeze", &[&cos, &axes_last], vec![], "rope");
        let sin_pairs = b.op("Unsqueeze", &[&sin, &axes_last], vec![], "rope");
        let cs = RopeInputs {
            cos,
            sin,
            cos_pairs,
            sin_pairs,
        };

        // Token embeddings: [seq, d].
        let ids = self.b.reshape("input_ids", &[-1], "embd");
        let tied = model.output.ty == model.token_embd.ty
            && model.output.data().as_ptr() == model.token_embd.data().as_ptr()
            && model.output.data().len() == model.token_embd.data().len();
        let embd_name = "token_embd.weight";
        let mut x = match model.token_embd.ty {
            GgmlType::F32 => {
                let t = self.b.init(
                    embd_name,
                    DataType::Float,
                    &[c.n_vocab, d],
                    model.token_embd.data(),
                );
                self.b
                    .op("Gather", &[&t, &ids], vec![("axis", Attr::Int(0))], "embd")
            }
            GgmlType::F16 | GgmlType::BF16 => {
                let dt = if model.token_embd.ty == GgmlType::F16 {
                    DataType::Float16
                } else {
                    DataType::BFloat16
                };
                let t = self
                    .b
                    .init(embd_name, dt, &[c.n_vocab, d], model.token_embd.data());
                let g = self
                    .b
                    .op("Gather", &[&t, &ids], vec![("axis", Attr::Int(0))], "embd");
                self.cast_f32(&g, "embd")
            }
            _ => {
                let v = model
                    .token_embd
                    .to_f32()
                    .map_err(|e| OrtError::Graph(format!("{embd_name}: {e}")))?;
                let t = self.b.init_f32(embd_name, &[c.n_vocab, d], &v);
                self.b
                    .op("Gather", &[&t, &ids], vec![("axis", Attr::Int(0))], "embd")
            }
        };

        let scale = self.b.f32_scalar(1.0 / (hd as f32).sqrt());
        for (li, layer) in model.layers.iter().enumerate() {
            let hint = format!("blk.{li}");
            let h = &hint;
            let an = self.b.init_f32(
                &format!("blk.{li}.attn_norm.weight"),
                &[d],
                &layer.attn_norm,
            );
            let hn = self.b.rms_norm(&x, &an, c.rms_eps, h);
            let q = self.project(li, Proj::Q, &hn, layer.bq.as_ref())?;
            let k = self.project(li, Proj::K, &hn, layer.bk.as_ref())?;
            let v = self.project(li, Proj::V, &hn, layer.bv.as_ref())?;
            // [seq, heads*hd] -> [heads, seq, hd]
            let q = self.b.reshape(&q, &[-1, nh as i64, hd as i64], h);
            let q = self.b.transpose(&q, &[1, 0, 2], h);
            let k = self.b.reshape(&k, &[-1, nkv as i64, hd as i64], h);
            let k = self.b.transpose(&k, &[1, 0, 2], h);
            let v = self.b.reshape(&v, &[-1, nkv as i64, hd as i64], h);
            let v = self.b.transpose(&v, &[1, 0, 2], h);
            let q = self.rope(&q, nh, &cs, h);
            let k = self.rope(&k, nkv, &cs, h);
            let b = &mut self.b;
            let axes0 = b.i64s(&[0]);
            let k4 = b.op("Unsqueeze", &[&k, &axes0], vec![], h);
            let v4 = b.op("Unsqueeze", &[&v, &axes0], vec![], h);
            let (pk, pv) = past_names(li);
            let (ok, ov) = present_names(li);
            b.op_named("Concat", &[&pk, &k4], vec![("axis", Attr::Int(2))], &ok);
            b.op_named("Concat", &[&pv, &v4], vec![("axis", Attr::Int(2))], &ov);
            // GQA: query heads g*group..(g+1)*group read kv head g.
            let qg = b.reshape(&q, &[nkv as i64, group as i64, -1, hd as i64], h);
            let kg = b.reshape(&ok, &[nkv as i64, 1, -1, hd as i64], h);
            let vg = b.reshape(&ov, &[nkv as i64, 1, -1, hd as i64], h);
            let kt = b.transpose(&kg, &[0, 1, 3, 2], h);
            let scores = b.binary("MatMul", &qg, &kt, h);
            let scores = b.binary("Mul", &scores, &scale, h);
            let scores = b.binary("Add", &scores, &mask, h);
            let probs = b.op("Softmax", &[&scores], vec![("axis", Attr::Int(-1))], h);
            let attn = b.binary("MatMul", &probs, &vg, h);
            let attn = b.reshape(&attn, &[nh as i64, -1, hd as i64], h);
            let attn = b.transpose(&attn, &[1, 0, 2], h);
            let attn = b.reshape(&attn, &[-1, (nh * hd) as i64], h);
            let o = self.project(li, Proj::O, &attn, None)?;
            x = self.b.binary("Add", &x, &o, h);

            let fname = format!("blk.{li}.ffn_norm.weight");
            let fnw = self.b.init_f32(&fname, &[d], &layer.ffn_norm);
            let hn = self.b.rms_norm(&x, &fnw, c.rms_eps, h);
            let g = self.project(li, Proj::Gate, &hn, None)?;
            let u = self.project(li, Proj::Up, &hn, None)?;
            let sg = self.b.op("Sigmoid", &[&g], vec![], h);
            let silu = self.b.binary("Mul", &g, &sg, h);
            let act = self.b.binary("Mul", &silu, &u, h);
            let down = self.project(li, Proj::Down, &act, None)?;
            x = self.b.binary("Add", &x, &down, h);
        }

        // Logits for the last `num_logits` positions (all when 0).
        let b = &mut self.b;
        let starts = b.op("Neg", &["num_logits"], vec![], "head");
        let ends = b.i64s(&[i64::MAX]);
        let axes0 = b.i64s(&[0]);
        let xs = b.op("Slice", &[&x, &starts, &ends, &axes0], vec![], "head");
        let on = b.init_f32("output_norm.weight", &[d], &model.output_norm);
        let xn = b.rms_norm(&xs, &on, c.rms_eps, "head");
        // A tied head shares the embedding table unless MatMulNBits can take it.
        let head = match (tied, model.output.ty) {
            (true, GgmlType::F16 | GgmlType::BF16) => {
                Linear::Float(self.cast_f32(embd_name, "head"))
            }
            (true, ty) if !is_nbits(ty) => Linear::Float(embd_name.to_owned()),
            _ => self.linear_weight("output.weight", &model.output)?,
        };
        let logits = self.linear(&xn, &head, "head");
        let b = &mut self.b;
        let axes0 = b.i64s(&[0]);
        b.op_named("Unsqueeze", &[&logits, &axes0], vec![], "logits");

        let info = graph_info(model, self.opts);
        let Builder {
            nodes, inits, data, ..
        } = self.b;
        let graph = onnx::Graph {
            name: format!("graft-{}", c.arch.name()),
            nodes,
            initializers: inits,
            inputs,
            outputs,
        };
        Ok(OnnxModel {
            model: onnx::Model {
                ir_version: 8,
                opsets: vec![(String::new(), ONNX_OPSET), (MS_DOMAIN.to_owned(), 1)],
                producer: format!("graft {}", env!("CARGO_PKG_VERSION")),
                graph,
                metadata: vec![
                    ("graft.arch".into(), c.arch.name().into()),
                    ("graft.max_context".into(), max_ctx.to_string()),
                    (
                        "graft.lora_max_rank".into(),
                        self.opts
                            .lora
                            .as_ref()
                            .map_or(0, |l| l.max_rank)
                            .to_string(),
                    ),
                ],
            },
            data,
            info,
        })
    }
}

struct RopeInputs {
    cos: String,
    sin: String,
    cos_pairs: String,
    sin_pairs: String,
}

/// `(x0 cos - x1 sin, x0 sin + x1 cos)`, graft's rotation.
fn rotate(
    b: &mut Builder,
    x0: &str,
    x1: &str,
    cos: &str,
    sin: &str,
    hint: &str,
) -> (String, String) {
    let a = b.binary("Mul", x0, cos, hint);
    let bb = b.binary("Mul", x1, sin, hint);
    let o0 = b.binary("Sub", &a, &bb, hint);
    let c = b.binary("Mul", x0, sin, hint);
    let d = b.binary("Mul", x1, cos, hint);
    let o1 = b.binary("Add", &c, &d, hint);
    (o0, o1)
}

/// The ONNX graph of `model`.
pub fn build_graph(model: &Model, opts: &GraphOptions) -> Result<OnnxModel, OrtError> {
    GraphBuilder {
        model,
        opts,
        b: Builder::new(),
    }
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_quant::quantize_matrix;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    /// Dequantizes MatMulNBits operands the way ONNX Runtime defines them.
    fn nbits_dequant(packed: &[u8], scales: &[f32], bits: u32, cols: usize) -> Vec<f32> {
        let blocks = cols / QK;
        let zp = 1i32 << (bits - 1);
        let mut out = Vec::new();
        for (bi, s) in scales.iter().enumerate() {
            let _row = bi / blocks;
            for e in 0..QK {
                let q = if bits == 4 {
                    let byte = packed[bi * QK / 2 + e / 2];
                    i32::from(if e % 2 == 0 { byte & 0x0f } else { byte >> 4 })
                } else {
                    i32::from(packed[bi * QK + e])
                };
                out.push((q - zp) as f32 * s);
            }
        }
        out
    }

    #[test]
    fn q4_0_and_q8_0_repack_bit_exactly() {
        let (rows, cols) = (3, 64);
        let x = values(rows * cols);
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            let bytes = quantize_matrix(ty, &x, cols).unwrap();
            let w = Weight::owned(ty, rows, cols, bytes).unwrap();
            let reference = w.to_f32().unwrap();
            let (packed, scales, bits) = if ty == GgmlType::Q4_0 {
                let (p, s) = repack_q4_0(&w).unwrap();
                (p, s, 4)
            } else {
                let (p, s) = repack_q8_0(&w).unwrap();
                (p, s, 8)
            };
            assert_eq!(scales.len(), rows * cols / QK);
            assert_eq!(
                nbits_dequant(&packed, &scales, bits, cols),
                reference,
                "{ty}"
            );
        }
    }

    #[test]
    fn q4_1_and_q4_k_repack_with_float_zero_points() {
        let (rows, cols) = (2, 512);
        let mut x = values(rows * cols);
        // A zero sub-block gives Q4_K a zero sub-block scale.
        x[256..288].fill(0.0);
        for ty in [GgmlType::Q4_1, GgmlType::Q4_K] {
            let bytes = quantize_matrix(ty, &x, cols).unwrap();
            let w = Weight::owned(ty, rows, cols, bytes).unwrap();
            let reference = w.to_f32().unwrap();
            let (packed, scales, zps) = if ty == GgmlType::Q4_1 {
                repack_q4_1(&w).unwrap()
            } else {
                repack_q4_k(&w).unwrap()
            };
            let got = nbits_dequant_zp(&packed, &scales, &zps);
            let max = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
                assert!((a - b).abs() <= 1e-6 * max, "{ty} value {i}: {a} vs {b}");
            }
        }
    }

    /// 4-bit MatMulNBits dequantization with float zero points: `(q - zp) * s`.
    fn nbits_dequant_zp(packed: &[u8], scales: &[f32], zps: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for (bi, (s, zp)) in scales.iter().zip(zps).enumerate() {
            for e in 0..QK {
                let byte = packed[bi * QK / 2 + e / 2];
                let q = if e % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                out.push((f32::from(q) - zp) * s);
            }
        }
        out
    }

    #[test]
    fn repack_rejects_the_wrong_type() {
        let w = Weight::from_f32(1, 32, &values(32)).unwrap();
        assert!(repack_q4_0(&w).is_err());
        assert!(repack_q8_0(&w).is_err());
    }
}
