//! GGUF writer: the same bytes ggml's `gguf_write_to_file` and gguf-py's `GGUFWriter`
//! produce for the same content (KVs and tensor infos in insertion order, zero
//! padding to the alignment after the infos and after every tensor, offsets packed).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use graft_quant::GgmlType;

use super::error::{tensor_n_bytes, GgufError, GgufErrorKind};
use super::value::{GgufArray, GgufValue};
use super::{GgufFile, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, KEY_ALIGNMENT, MAX_NAME_LEN};

const WRITER_NAME: &str = "<gguf writer>";

struct PendingTensor<'a> {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF file. Tensor data may be borrowed (e.g. from a [`GgufFile`]) or owned.
///
/// The alignment is `general.alignment` when that key is added (it must be a u32
/// power of two), else 32; [`set_alignment`](Self::set_alignment) sets the key.
pub struct GgufWriter<'a> {
    version: u32,
    alignment: u64,
    kvs: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor<'a>>,
    tensor_index: HashMap<String, usize>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

fn werr(kind: GgufErrorKind) -> GgufError {
    GgufError::new(WRITER_NAME, kind)
}

fn check_alignment(value: &GgufValue) -> Result<u64, GgufError> {
    match *value {
        GgufValue::U32(a) if a != 0 && a.is_power_of_two() => Ok(u64::from(a)),
        GgufValue::U32(a) => Err(werr(GgufErrorKind::AlignmentValue { found: a.into() })),
        ref other => Err(werr(GgufErrorKind::AlignmentType {
            found: other.type_description(),
        })),
    }
}

fn padding(len: u64, alignment: u64) -> u64 {
    (alignment - len % alignment) % alignment
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        GgufWriter {
            version: GGUF_VERSION,
            alignment: DEFAULT_ALIGNMENT,
            kvs: Vec::new(),
            key_index: HashMap::new(),
            tensors: Vec::new(),
            tensor_index: HashMap::new(),
        }
    }

    /// A writer holding `file`'s metadata and tensors (data borrowed), in file order:
    /// `GgufWriter::from_file(&f)?.to_bytes()?` reproduces a ggml/gguf-py file exactly.
    pub fn from_file(file: &'a GgufFile) -> Result<Self, GgufError> {
        let mut w = GgufWriter::new();
        w.set_version(file.version())?;
        for (k, v) in file.metadata() {
            w.add_kv(k.clone(), v.clone())?;
        }
        for t in file.tensors() {
            w.add_tensor(t.name.clone(), t.ty, &t.dims, file.tensor_data(t))?;
        }
        Ok(w)
    }

    /// 3 (default) or 2: the two share one layout.
    pub fn set_version(&mut self, version: u32) -> Result<&mut Self, GgufError> {
        if !(2..=3).contains(&version) {
            return Err(werr(GgufErrorKind::WriterVersion { found: version }));
        }
        self.version = version;
        Ok(self)
    }

    /// Sets `general.alignment` (replacing its value in place if present, else
    /// appending the key), as gguf-py's `add_custom_alignment` does.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<&mut Self, GgufError> {
        let value = GgufValue::U32(alignment);
        self.alignment = check_alignment(&value)?;
        match self.key_index.get(KEY_ALIGNMENT).copied() {
            Some(i) => {
                if let Some(slot) = self.kvs.get_mut(i) {
                    slot.1 = value;
                }
            }
            None => {
                self.key_index
                    .insert(KEY_ALIGNMENT.to_owned(), self.kvs.len());
                self.kvs.push((KEY_ALIGNMENT.to_owned(), value));
            }
        }
        Ok(self)
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Appends a key/value pair. Keys must be unique; `general.alignment` must be a
    /// u32 power of two and sets the alignment.
    pub fn add_kv(
        &mut self,
        key: impl Into<String>,
        value: impl Into<GgufValue>,
    ) -> Result<&mut Self, GgufError> {
        let key = key.into();
        let value = value.into();
        if let Some(&first) = self.key_index.get(&key) {
            return Err(werr(GgufErrorKind::DuplicateKey {
                key,
                first,
                second: self.kvs.len(),
            }));
        }
        if key == KEY_ALIGNMENT {
            self.alignment = check_alignment(&value)?;
        }
        self.key_index.insert(key.clone(), self.kvs.len());
        self.kvs.push((key, value));
        Ok(self)
    }

    /// Appends a tensor. `dims` is ggml `ne` (innermost first); `data` must be exactly
    /// the tensor's byte size.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: &[u64],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let data = data.into();
        if name.len() >= MAX_NAME_LEN {
            return Err(werr(GgufErrorKind::TensorNameTooLong {
                index: self.tensors.len(),
                len: name.len() as u64,
            }));
        }
        if let Some(&first) = self.tensor_index.get(&name) {
            return Err(werr(GgufErrorKind::DuplicateTensor {
                name,
                first,
                second: self.tensors.len(),
            }));
        }
        let expected = tensor_n_bytes(&name, ty, dims).map_err(werr)?;
        if data.len() != expected {
            return Err(werr(GgufErrorKind::TensorDataSize {
                tensor: name,
                found: data.len(),
                expected,
            }));
        }
        self.tensor_index.insert(name.clone(), self.tensors.len());
        self.tensors.push(PendingTensor {
            name,
            ty,
            dims: dims.to_vec(),
            data,
        });
        Ok(self)
    }

    /// Header, KVs, tensor infos and the padding after them.
    fn metadata_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset: u64 = 0;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (t.data.len() as u64)
                .checked_add(padding(t.data.len() as u64, self.alignment))
                .and_then(|n| offset.checked_add(n))
                .ok_or_else(|| {
                    werr(GgufErrorKind::SizeOverflow {
                        field: format!("tensor {:?} offset", t.name),
                    })
                })?;
        }
        let pad = padding(out.len() as u64, self.alignment) as usize;
        out.resize(out.len() + pad, 0);
        Ok(out)
    }

    /// Total size of the file `write_to` produces.
    pub fn file_size(&self) -> Result<u64, GgufError> {
        let mut n = self.metadata_bytes()?.len() as u64;
        for t in &self.tensors {
            let len = t.data.len() as u64;
            n = n.saturating_add(len + padding(len, self.alignment));
        }
        Ok(n)
    }

    /// Writes the file to `w`; returns the number of bytes written.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<u64, GgufError> {
        let io = |e| {
            werr(GgufErrorKind::Io {
                op: "write",
                source: e,
            })
        };
        let meta = self.metadata_bytes()?;
        w.write_all(&meta).map_err(io)?;
        let mut written = meta.len() as u64;
        for t in &self.tensors {
            w.write_all(&t.data).map_err(io)?;
            let pad = padding(t.data.len() as u64, self.alignment);
            write_zeros(&mut w, pad).map_err(io)?;
            written += t.data.len() as u64 + pad;
        }
        w.flush().map_err(io)?;
        Ok(written)
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let size = usize::try_from(self.file_size()?).unwrap_or(0);
        let mut out = Vec::with_capacity(size);
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Writes the file to `path` (created or truncated).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = std::fs::File::create(path).map_err(|e| {
            GgufError::new(
                &name,
                GgufErrorKind::Io {
                    op: "create",
                    source: e,
                },
            )
        })?;
        self.write_to(std::io::BufWriter::with_capacity(1 << 20, file))
            .map_err(|e| GgufError::new(&name, e.into_kind()))?;
        Ok(())
    }
}

/// Zero padding, from a fixed block (alignments can be up to 2^31).
fn write_zeros<W: Write>(w: &mut W, mut n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(ZEROS.get(..k).unwrap_or(&[]))?;
        n -= k as u64;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! nums {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => nums!(v),
        GgufArray::U16(v) => nums!(v),
        GgufArray::I16(v) => nums!(v),
        GgufArray::U32(v) => nums!(v),
        GgufArray::I32(v) => nums!(v),
        GgufArray::F32(v) => nums!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        GgufArray::String(v) => {
            for s in v {
                put_str(out, s);
            }
        }
        GgufArray::U64(v) => nums!(v),
        GgufArray::I64(v) => nums!(v),
        GgufArray::F64(v) => nums!(v),
    }
}
