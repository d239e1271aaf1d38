//! GGUF v3 reader (zero-copy over memmap2) and writer.
//!
//! Layout (little-endian; see `shared/specs/formats.md` §1 and ggml's `gguf.cpp`):
//! magic `GGUF`, u32 version, u64 tensor_count, u64 kv_count, the key/value pairs,
//! the tensor infos, zero padding to the alignment, then the tensor data, each tensor
//! at an offset (relative to the data section) equal to the packed, aligned sum of the
//! previous ones in info order.
//!
//! [`GgufFile::open`] validates the whole container (header, every KV, every tensor
//! info and the data layout) before it returns; it never returns a half-loaded file.
//! [`GgufWriter`] writes files byte-identical to ggml / gguf-py for the same content.

mod error;
mod reader;
mod value;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use graft_quant::GgmlType;

pub use error::{GgufError, GgufErrorKind};
pub use value::{GgufArray, GgufValue, GgufValueType};
pub use writer::GgufWriter;

/// `GGUF` in file byte order.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Whether `path` is a readable file that starts with the GGUF magic (cheap format
/// sniffing before choosing a loader; says nothing about validity).
pub fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == GGUF_MAGIC
}

/// The version the writer produces by default.
pub const GGUF_VERSION: u32 = 3;
/// Alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment (must be a u32 power of two).
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// The metadata key naming the model architecture.
pub const KEY_ARCHITECTURE: &str = "general.architecture";
/// ggml's GGML_MAX_NAME: tensor names must be shorter than this (in bytes).
pub const MAX_NAME_LEN: usize = 64;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// Smallest encoding of one KV pair: u64 key length, u32 type, 1-byte value.
pub(crate) const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor info: u64 name length, u32 n_dims, u32 type, u64 offset.
pub(crate) const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

/// One tensor's description, as stored in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// ggml `ne`: innermost (contiguous) dimension first. A PyTorch `[out, in]`
    /// weight is stored as `[in, out]`.
    pub dims: Vec<u64>,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Byte size of the data (without padding).
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Total number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (the product of `ne[1..]`).
    pub fn n_rows(&self) -> u64 {
        self.dims
            .get(1..)
            .unwrap_or(&[])
            .iter()
            .fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Bytes per row (`ne[0]` elements of `ty`).
    pub fn row_bytes(&self) -> usize {
        usize::try_from(self.row_len())
            .ok()
            .and_then(|n| self.ty.row_size(n).ok())
            .unwrap_or(0)
    }
}

enum Backing {
    /// Read-only private map of the file.
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A validated GGUF file. Metadata is parsed into owned values; tensor data stays in
/// the (memory-mapped or owned) buffer and is handed out as zero-copy slices.
pub struct GgufFile {
    name: String,
    backing: Backing,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("name", &self.name)
            .field("len", &self.backing.bytes().len())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` read-only and validates it.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io = |op, source| GgufError::new(&name, GgufErrorKind::Io { op, source });
        let file = File::open(path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        let backing = if len == 0 {
            // Mapping an empty file fails on some platforms; the parser reports it.
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only (PROT_READ, private) and owned by the
            // GgufFile, so nothing in this process writes through it and the slices we
            // hand out borrow the GgufFile. The usual mmap caveat remains: if another
            // process truncates or rewrites the file while it is mapped, reads may see
            // the new bytes or fault (SIGBUS). That is inherent to mmap-based model
            // loading (llama.cpp does the same); callers must not modify model files in
            // place while they are loaded. All validation runs on the bytes as mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("mmap", e))?;
            Backing::Mmap(map)
        };
        Self::from_backing(backing, name)
    }

    /// Parses an in-memory file (tests, fuzzing, downloads). `name` is used in errors.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<String>) -> Result<GgufFile, GgufError> {
        Self::from_backing(Backing::Owned(bytes), name.into())
    }

    fn from_backing(backing: Backing, name: String) -> Result<GgufFile, GgufError> {
        let p = reader::parse(backing.bytes(), &name)?;
        Ok(GgufFile {
            name,
            backing,
            version: p.version,
            alignment: p.alignment,
            data_offset: p.data_offset,
            metadata: p.metadata,
            key_index: p.key_index,
            tensors: p.tensors,
            tensor_index: p.tensor_index,
        })
    }

    /// The path (or name) errors refer to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment: `general.alignment`, or 32.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All key/value pairs, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        let i = *self.key_index.get(key)?;
        self.metadata.get(i).map(|(_, v)| v)
    }

    fn err(&self, kind: GgufErrorKind) -> GgufError {
        GgufError::new(&self.name, kind)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| {
            self.err(GgufErrorKind::MissingKey {
                key: key.to_owned(),
            })
        })
    }

    fn wrong_type(&self, key: &str, v: &GgufValue, expected: &'static str) -> GgufError {
        self.err(GgufErrorKind::WrongType {
            key: key.to_owned(),
            found: v.type_description(),
            expected,
        })
    }

    fn int_in_range<T: TryFrom<i128>>(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<T, GgufError> {
        let v = self.require(key)?;
        let n = v
            .as_int()
            .ok_or_else(|| self.wrong_type(key, v, "an integer type"))?;
        T::try_from(n).map_err(|_| {
            self.err(GgufErrorKind::ValueOutOfRange {
                key: key.to_owned(),
                found: v.to_string(),
                expected,
            })
        })
    }

    /// Any integer type whose value fits a u32 (gguf-py writes u32; some writers use
    /// i32 or u64).
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.int_in_range(key, "a value in 0..=4294967295")
    }

    /// Any integer type whose value fits a u64.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.int_in_range(key, "a non-negative value that fits u64")
    }

    /// Any integer type whose value fits an i32.
    pub fn get_i32(&self, key: &str) -> Result<i32, GgufError> {
        self.int_in_range(key, "a value that fits i32")
    }

    /// Any integer type whose value fits an i64.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.int_in_range(key, "a value that fits i64")
    }

    /// F32 (or F64, narrowed).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        match *v {
            GgufValue::F32(x) => Ok(x),
            GgufValue::F64(x) => Ok(x as f32),
            _ => Err(self.wrong_type(key, v, "float32")),
        }
    }

    /// F64 or F32.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, v, "float64 or float32"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, v, "string"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, v, "bool"))
    }

    pub fn get_array(&self, key: &str) -> Result<&GgufArray, GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| self.wrong_type(key, v, "array"))
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .and_then(GgufArray::as_strings)
            .ok_or_else(|| self.wrong_type(key, v, "array<string>"))
    }

    pub fn get_f32_array(&self, key: &str) -> Result<&[f32], GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .and_then(GgufArray::as_f32)
            .ok_or_else(|| self.wrong_type(key, v, "array<float32>"))
    }

    /// An integer array of any element type, as i64.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .and_then(GgufArray::to_i64_vec)
            .ok_or_else(|| self.wrong_type(key, v, "array of an integer type (values fitting i64)"))
    }

    /// Like [`get_u32`](Self::get_u32) but `Ok(None)` when the key is absent.
    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.opt(key, Self::get_u32)
    }

    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.opt(key, Self::get_u64)
    }

    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.opt(key, Self::get_f32)
    }

    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.opt(key, Self::get_bool)
    }

    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.opt(key, Self::get_str)
    }

    fn opt<'s, T>(
        &'s self,
        key: &str,
        f: impl FnOnce(&'s Self, &str) -> Result<T, GgufError>,
    ) -> Result<Option<T>, GgufError> {
        if self.key_index.contains_key(key) {
            f(self, key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `general.architecture` ("llama", "qwen2", ...).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str(KEY_ARCHITECTURE)
    }

    /// Tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(*self.tensor_index.get(name)?)
    }

    /// The tensor's bytes: a zero-copy slice of the file. Infos from this file are
    /// always in bounds (validated by `open`); for an info that does not belong to
    /// this file and lies outside it, the slice is empty.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let bytes = self.backing.bytes();
        usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_offset))
            .and_then(|start| Some(start..start.checked_add(info.n_bytes)?))
            .and_then(|r| bytes.get(r))
            .unwrap_or(&[])
    }

    /// The bytes of the tensor called `name`.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.tensor_data(t))
    }
}
