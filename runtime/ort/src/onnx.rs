//! The few ONNX protobuf messages graft writes (onnx.proto3 field numbers), with a
//! write-only protobuf encoder.
//!
//! graft only ever *writes* ONNX (ONNX Runtime and onnx tooling read it), so a
//! hand-written encoder of ~10 message types is all it takes: no protoc, no generated
//! code, no new dependency, and no file reader that would need hardening.

/// `TensorProto.DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Int32 = 6,
    Int64 = 7,
    Bool = 9,
    Float16 = 10,
    BFloat16 = 16,
}

impl DataType {
    pub fn size(self) -> usize {
        match self {
            DataType::Uint8 | DataType::Int8 | DataType::Bool => 1,
            DataType::Float16 | DataType::BFloat16 => 2,
            DataType::Float | DataType::Int32 => 4,
            DataType::Int64 => 8,
        }
    }
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// In the protobuf (`raw_data`, little-endian).
    Raw(Vec<u8>),
    /// In the external data file `location` beside the model.
    External {
        location: String,
        offset: usize,
        length: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    pub data: TensorData,
}

impl Tensor {
    pub fn raw(name: impl Into<String>, dtype: DataType, dims: &[i64], data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            dtype,
            dims: dims.to_vec(),
            data: TensorData::Raw(data),
        }
    }

    pub fn i64s(name: impl Into<String>, dims: &[i64], values: &[i64]) -> Tensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::raw(name, DataType::Int64, dims, data)
    }

    pub fn f32s(name: impl Into<String>, dims: &[i64], values: &[f32]) -> Tensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::raw(name, DataType::Float, dims, data)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Float(f32),
    Int(i64),
    Ints(Vec<i64>),
    Str(String),
    Tensor(Tensor),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// "" for the ONNX domain, "com.microsoft" for ONNX Runtime's contrib ops.
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(String, Attr)>,
}

/// A dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(i64),
    /// Symbolic, set per run.
    Param(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<Dim>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    /// (domain, version) of every operator set the graph uses.
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub graph: Graph,
    /// `metadata_props` (key, value).
    pub metadata: Vec<(String, String)>,
}

// --- protobuf wire format -------------------------------------------------------

const VARINT: u32 = 0;
const FIXED32: u32 = 5;
const LEN: u32 = 2;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from(field << 3 | wire));
}

/// int32/int64/enum fields: negative values are sign-extended to 64 bits, as protobuf
/// requires.
fn int(buf: &mut Vec<u8>, field: u32, v: i64) {
    key(buf, field, VARINT);
    varint(buf, v as u64);
}

fn bytes(buf: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(buf, field, LEN);
    varint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

fn string(buf: &mut Vec<u8>, field: u32, s: &str) {
    bytes(buf, field, s.as_bytes());
}

fn message(buf: &mut Vec<u8>, field: u32, encode: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    encode(&mut inner);
    bytes(buf, field, &inner);
}

fn packed_ints(buf: &mut Vec<u8>, field: u32, values: &[i64]) {
    let mut inner = Vec::with_capacity(values.len() * 2);
    for &v in values {
        varint(&mut inner, v as u64);
    }
    bytes(buf, field, &inner);
}

// --- messages ---------------------------------------------------------------------

impl Tensor {
    fn encode(&self, buf: &mut Vec<u8>) {
        // TensorProto: dims=1, data_type=2, name=8, raw_data=9, external_data=13,
        // data_location=14.
        if !self.dims.is_empty() {
            packed_ints(buf, 1, &self.dims);
        }
        int(buf, 2, self.dtype as i64);
        string(buf, 8, &self.name);
        match &self.data {
            TensorData::Raw(data) => bytes(buf, 9, data),
            TensorData::External {
                location,
                offset,
                length,
            } => {
                for (k, v) in [
                    ("location", location.clone()),
                    ("offset", offset.to_string()),
                    ("length", length.to_string()),
                ] {
                    // StringStringEntryProto: key=1, value=2.
                    message(buf, 13, |m| {
                        string(m, 1, k);
                        string(m, 2, &v);
                    });
                }
                int(buf, 14, 1);
            }
        }
    }
}

impl Attr {
    fn encode(&self, name: &str, buf: &mut Vec<u8>) {
        // AttributeProto: name=1, f=2, i=3, s=4, t=5, ints=8, type=20
        // (AttributeType FLOAT=1, INT=2, STRING=3, TENSOR=4, INTS=7).
        string(buf, 1, name);
        match self {
            Attr::Float(f) => {
                key(buf, 2, FIXED32);
                buf.extend_from_slice(&f.to_le_bytes());
                int(buf, 20, 1);
            }
            Attr::Int(i) => {
                int(buf, 3, *i);
                int(buf, 20, 2);
            }
            Attr::Str(s) => {
                string(buf, 4, s);
                int(buf, 20, 3);
            }
            Attr::Tensor(t) => {
                message(buf, 5, |m| t.encode(m));
                int(buf, 20, 4);
            }
            Attr::Ints(v) => {
                packed_ints(buf, 8, v);
                int(buf, 20, 7);
            }
        }
    }
}

impl Node {
    fn encode(&self, buf: &mut Vec<u8>) {
        // NodeProto: input=1, output=2, name=3, op_type=4, attribute=5, domain=7.
        for i in &self.inputs {
            string(buf, 1, i);
        }
        for o in &self.outputs {
            string(buf, 2, o);
        }
        string(buf, 3, &self.name);
        string(buf, 4, &self.op_type);
        for (name, a) in &self.attrs {
            message(buf, 5, |m| a.encode(name, m));
        }
        if !self.domain.is_empty() {
            string(buf, 7, &self.domain);
        }
    }
}

impl ValueInfo {
    fn encode(&self, buf: &mut Vec<u8>) {
        // ValueInfoProto: name=1, type=2; TypeProto: tensor_type=1; Tensor:
        // elem_type=1, shape=2; TensorShapeProto: dim=1; Dimension: dim_value=1,
        // dim_param=2.
        string(buf, 1, &self.name);
        message(buf, 2, |ty| {
            message(ty, 1, |t| {
                int(t, 1, self.dtype as i64);
                message(t, 2, |shape| {
                    for d in &self.shape {
                        message(shape, 1, |dim| match d {
                            Dim::Fixed(v) => int(dim, 1, *v),
                            Dim::Param(p) => string(dim, 2, p),
                        });
                    }
                });
            });
        });
    }
}

impl Graph {
    fn encode(&self, buf: &mut Vec<u8>) {
        // GraphProto: node=1, name=2, initializer=5, input=11, output=12.
        for n in &self.nodes {
            message(buf, 1, |m| n.encode(m));
        }
        string(buf, 2, &self.name);
        for t in &self.initializers {
            message(buf, 5, |m| t.encode(m));
        }
        for i in &self.inputs {
            message(buf, 11, |m| i.encode(m));
        }
        for o in &self.outputs {
            message(buf, 12, |m| o.encode(m));
        }
    }
}

impl Model {
    /// The serialized `ModelProto`.
    pub fn encode(&self) -> Vec<u8> {
        // ModelProto: ir_version=1, producer_name=2, graph=7, opset_import=8,
        // metadata_props=14; OperatorSetIdProto: domain=1, version=2.
        let mut buf = Vec::new();
        int(&mut buf, 1, self.ir_version);
        string(&mut buf, 2, &self.producer);
        message(&mut buf, 7, |m| self.graph.encode(m));
        for (domain, version) in &self.opsets {
            message(&mut buf, 8, |m| {
                string(m, 1, domain);
                int(m, 2, *version);
            });
        }
        for (k, v) in &self.metadata {
            message(&mut buf, 14, |m| {
                string(m, 1, k);
                string(m, 2, v);
            });
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let enc = |v: u64| {
            let mut b = Vec::new();
            varint(&mut b, v);
            b
        };
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(150), [0x96, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        // -1 as int64 is ten bytes.
        assert_eq!(enc(-1i64 as u64).len(), 10);
    }

    #[test]
    fn nested_messages_are_length_prefixed() {
        let t = Tensor::i64s("s", &[2], &[3, -1]);
        let mut buf = Vec::new();
        t.encode(&mut buf);
        // dims: key (1<<3|2)=0x0a, length 1, value 2.
        assert_eq!(&buf[..3], &[0x0a, 1, 2]);
        // data_type: key 0x10, INT64 = 7.
        assert_eq!(&buf[3..5], &[0x10, 7]);
        // name: key 0x42, length 1, "s".
        assert_eq!(&buf[5..8], &[0x42, 1, b's']);
        // raw_data: key 0x4a, 16 bytes.
        assert_eq!(&buf[8..10], &[0x4a, 16]);
        assert_eq!(buf.len(), 10 + 16);
    }
}
