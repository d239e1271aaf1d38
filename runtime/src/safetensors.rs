//! Hugging Face safetensors checkpoints: a single `model.safetensors` file or a
//! sharded checkpoint described by `model.safetensors.index.json`.
//!
//! Files are memory-mapped and tensors are handed out as zero-copy byte views.
//! Parsing is done by the `safetensors` crate (the parser of record); before it
//! runs, every header is checked here field by field so that a corrupt file is
//! reported with one precise line (file, tensor, field, found vs expected)
//! instead of the crate's terse error kinds. Anything the crate rejects that
//! these checks did not catch is still reported, wrapped in
//! [`SafetensorsError::Format`].
//!
//! Checks done here, per file:
//! - the file holds at least the 8-byte header-length prefix;
//! - the header length is within the crate's limit and within the file
//!   (checked before anything is parsed);
//! - the header is UTF-8 JSON, an object, with no duplicate keys;
//! - `__metadata__`, if present, maps strings to strings;
//! - each tensor entry has a known `dtype`, a `shape` of non-negative integers
//!   whose product (times the dtype size) does not overflow, and
//!   `data_offsets` `[begin, end]` with `begin <= end`, `end` inside the data
//!   section and `end - begin == elements * dtype size`;
//! - the tensors tile the data section exactly (no gap, overlap or trailing
//!   bytes), as the format requires.
//!
//! And across a sharded checkpoint: the index has a `weight_map` of tensor name
//! to plain shard file name, every shard exists, every mapped tensor is in its
//! shard, no tensor appears in two shards and no shard holds a tensor the index
//! does not map.
//!
//! Only F32, F16 and BF16 tensors can be viewed ([`SafetensorsModel::tensor`]);
//! files holding other dtypes open fine, and asking for such a tensor is an
//! [`SafetensorsError::UnsupportedDtype`] error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Name of a single-file checkpoint inside a model directory.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
/// Name of the shard index inside a model directory.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";
/// Largest header accepted (the `safetensors` crate's own limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Largest `model.safetensors.index.json` accepted.
pub const MAX_INDEX_LEN: u64 = 64 << 20;

/// Errors reading a safetensors checkpoint. Each displays as one line naming
/// the file and, where there is one, the tensor and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{file}: {source}", file = .file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir}: no checkpoint found (expected {SINGLE_FILE_NAME} or {INDEX_FILE_NAME})",
        dir = .dir.display()
    )]
    NoCheckpoint { dir: PathBuf },
    #[error(
        "{file}: file is {len} bytes, expected at least 8 (the header-length prefix)",
        file = .file.display()
    )]
    FileTooSmall { file: PathBuf, len: u64 },
    #[error(
        "{file}: header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes",
        file = .file.display()
    )]
    HeaderTooLarge { file: PathBuf, header_len: u64 },
    #[error(
        "{file}: header length {header_len} exceeds the {available} bytes after the length prefix",
        file = .file.display()
    )]
    HeaderPastEnd {
        file: PathBuf,
        header_len: u64,
        available: u64,
    },
    #[error(
        "{file}: header is not valid UTF-8 (invalid byte at header offset {valid_up_to})",
        file = .file.display()
    )]
    HeaderNotUtf8 { file: PathBuf, valid_up_to: usize },
    #[error("{file}: header is not a valid JSON object: {message}", file = .file.display())]
    HeaderJson { file: PathBuf, message: String },
    #[error("{file}: header has key `{key}` more than once", file = .file.display())]
    DuplicateHeaderKey { file: PathBuf, key: String },
    #[error(
        "{file}: `__metadata__`: found {found}, expected an object of string values",
        file = .file.display()
    )]
    BadMetadata { file: PathBuf, found: String },
    #[error(
        "{file}: tensor `{tensor}`: field `{field}`: found {found}, expected {expected}",
        file = .file.display()
    )]
    BadField {
        file: PathBuf,
        tensor: String,
        field: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error(
        "{file}: tensor `{tensor}`: unknown dtype {dtype:?}, expected one of {known}",
        file = .file.display(),
        known = RawDtype::ALL_NAMES
    )]
    UnknownDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error(
        "{file}: tensor `{tensor}`: shape {shape:?} of {dtype} has more bytes than fit in usize",
        file = .file.display()
    )]
    ShapeOverflow {
        file: PathBuf,
        tensor: String,
        dtype: &'static str,
        shape: Vec<usize>,
    },
    #[error(
        "{file}: tensor `{tensor}`: data_offsets [{begin}, {end}] are reversed (begin > end)",
        file = .file.display()
    )]
    ReversedOffsets {
        file: PathBuf,
        tensor: String,
        begin: usize,
        end: usize,
    },
    #[error(
        "{file}: tensor `{tensor}`: data_offsets end {end} is past the {data_len}-byte data section",
        file = .file.display()
    )]
    OffsetsOutOfBounds {
        file: PathBuf,
        tensor: String,
        end: usize,
        data_len: usize,
    },
    #[error(
        "{file}: tensor `{tensor}`: {dtype} {shape:?} needs {expected} bytes, found data_offsets spanning {found}",
        file = .file.display()
    )]
    SizeMismatch {
        file: PathBuf,
        tensor: String,
        dtype: &'static str,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error(
        "{file}: tensor `{tensor}`: data starts at offset {found}, expected {expected} (tensors must tile the data section with no gap or overlap)",
        file = .file.display()
    )]
    NonContiguous {
        file: PathBuf,
        tensor: String,
        found: usize,
        expected: usize,
    },
    #[error(
        "{file}: tensors cover {covered} bytes, expected the whole {data_len}-byte data section",
        file = .file.display()
    )]
    TrailingData {
        file: PathBuf,
        covered: usize,
        data_len: usize,
    },
    #[error("{file}: rejected by the safetensors parser: {source}", file = .file.display())]
    Format {
        file: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error(
        "{file}: tensor `{tensor}`: the safetensors parser and graft's header checks disagree",
        file = .file.display()
    )]
    ParserDisagreement { file: PathBuf, tensor: String },
    #[error(
        "{file}: index is {len} bytes, expected at most {MAX_INDEX_LEN}",
        file = .file.display()
    )]
    IndexTooLarge { file: PathBuf, len: u64 },
    #[error("{file}: not a valid index: {message}", file = .file.display())]
    IndexJson { file: PathBuf, message: String },
    #[error("{file}: index has no `weight_map` object", file = .file.display())]
    IndexNoWeightMap { file: PathBuf },
    #[error("{file}: `weight_map` lists tensor `{tensor}` more than once", file = .file.display())]
    IndexDuplicateTensor { file: PathBuf, tensor: String },
    #[error(
        "{file}: `weight_map`[`{tensor}`]: found {found}, expected a plain shard file name",
        file = .file.display()
    )]
    IndexBadShard {
        file: PathBuf,
        tensor: String,
        found: String,
    },
    #[error(
        "{file}: shard `{shard}` (holding {count} mapped tensors, e.g. `{tensor}`) does not exist",
        file = .file.display()
    )]
    ShardMissing {
        file: PathBuf,
        shard: String,
        tensor: String,
        count: usize,
    },
    #[error(
        "{file}: tensor `{tensor}` is mapped to shard `{shard}`, but that shard does not contain it{found}",
        file = .file.display(),
        found = match .found_in { Some(s) => format!(" (found in `{s}`)"), None => String::new() }
    )]
    TensorMissingFromShard {
        file: PathBuf,
        tensor: String,
        shard: String,
        found_in: Option<String>,
    },
    #[error(
        "{file}: tensor `{tensor}` appears in two shards: `{first}` and `{second}`",
        file = .file.display()
    )]
    DuplicateAcrossShards {
        file: PathBuf,
        tensor: String,
        first: String,
        second: String,
    },
    #[error(
        "{file}: shard `{shard}` holds tensor `{tensor}`, which `weight_map` does not list",
        file = .file.display()
    )]
    UnmappedTensor {
        file: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("{file}: no tensor named `{tensor}`", file = .file.display())]
    TensorNotFound { file: PathBuf, tensor: String },
    #[error(
        "{file}: tensor `{tensor}` has dtype {dtype}, expected F32, F16 or BF16",
        file = .file.display()
    )]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: &'static str,
    },
    #[error("tensor `{tensor}`: output buffer holds {found} f32 values, expected {expected}")]
    OutputSize {
        tensor: String,
        found: usize,
        expected: usize,
    },
}

type Result<T> = std::result::Result<T, SafetensorsError>;

/// The dtypes graft computes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StDtype {
    F32,
    F16,
    BF16,
}

impl StDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StDtype::F32 => 4,
            StDtype::F16 | StDtype::BF16 => 2,
        }
    }

    /// The dtype's name as written in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
        }
    }
}

impl fmt::Display for StDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every dtype the safetensors format (as of crate 0.4) defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawDtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl RawDtype {
    const ALL: [RawDtype; 15] = [
        RawDtype::Bool,
        RawDtype::U8,
        RawDtype::I8,
        RawDtype::F8E5M2,
        RawDtype::F8E4M3,
        RawDtype::I16,
        RawDtype::U16,
        RawDtype::F16,
        RawDtype::BF16,
        RawDtype::I32,
        RawDtype::U32,
        RawDtype::F32,
        RawDtype::F64,
        RawDtype::I64,
        RawDtype::U64,
    ];
    const ALL_NAMES: &'static str =
        "BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64";

    fn name(self) -> &'static str {
        match self {
            RawDtype::Bool => "BOOL",
            RawDtype::U8 => "U8",
            RawDtype::I8 => "I8",
            RawDtype::F8E5M2 => "F8_E5M2",
            RawDtype::F8E4M3 => "F8_E4M3",
            RawDtype::I16 => "I16",
            RawDtype::U16 => "U16",
            RawDtype::F16 => "F16",
            RawDtype::BF16 => "BF16",
            RawDtype::I32 => "I32",
            RawDtype::U32 => "U32",
            RawDtype::F32 => "F32",
            RawDtype::F64 => "F64",
            RawDtype::I64 => "I64",
            RawDtype::U64 => "U64",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        RawDtype::ALL.into_iter().find(|d| d.name() == s)
    }

    fn size(self) -> usize {
        match self {
            RawDtype::Bool | RawDtype::U8 | RawDtype::I8 | RawDtype::F8E5M2 | RawDtype::F8E4M3 => 1,
            RawDtype::I16 | RawDtype::U16 | RawDtype::F16 | RawDtype::BF16 => 2,
            RawDtype::I32 | RawDtype::U32 | RawDtype::F32 => 4,
            RawDtype::F64 | RawDtype::I64 | RawDtype::U64 => 8,
        }
    }

    fn supported(self) -> Option<StDtype> {
        match self {
            RawDtype::F32 => Some(StDtype::F32),
            RawDtype::F16 => Some(StDtype::F16),
            RawDtype::BF16 => Some(StDtype::BF16),
            _ => None,
        }
    }

    fn matches_crate(self, d: safetensors::Dtype) -> bool {
        use safetensors::Dtype as D;
        matches!(
            (self, d),
            (RawDtype::Bool, D::BOOL)
                | (RawDtype::U8, D::U8)
                | (RawDtype::I8, D::I8)
                | (RawDtype::F8E5M2, D::F8_E5M2)
                | (RawDtype::F8E4M3, D::F8_E4M3)
                | (RawDtype::I16, D::I16)
                | (RawDtype::U16, D::U16)
                | (RawDtype::F16, D::F16)
                | (RawDtype::BF16, D::BF16)
                | (RawDtype::I32, D::I32)
                | (RawDtype::U32, D::U32)
                | (RawDtype::F32, D::F32)
                | (RawDtype::F64, D::F64)
                | (RawDtype::I64, D::I64)
                | (RawDtype::U64, D::U64)
        )
    }
}

/// A zero-copy view of one F32, F16 or BF16 tensor: `data` is the tensor's
/// little-endian bytes in row-major (C) order, exactly `shape.product() *
/// dtype.size()` long. The data is not necessarily aligned to the element size.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// The tensor converted to f32 (see [`to_f32`]).
    pub fn to_f32(&self) -> Vec<f32> {
        to_f32(self)
    }
}

/// Metadata of any tensor in the checkpoint, whatever its dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo<'a> {
    pub name: &'a str,
    /// The dtype as written in the header (`F32`, `I8`, ...).
    pub dtype: &'static str,
    pub shape: &'a [usize],
    /// The file holding the tensor.
    pub file: &'a Path,
}

/// Converts a tensor view to f32 values (F16 and BF16 widen exactly).
pub fn to_f32(view: &TensorView) -> Vec<f32> {
    let mut out = vec![0.0f32; view.numel()];
    convert(view, &mut out);
    out
}

/// Converts a tensor view into `out`, which must hold exactly
/// [`TensorView::numel`] values.
pub fn to_f32_into(view: &TensorView, out: &mut [f32]) -> Result<()> {
    if out.len() != view.numel() {
        return Err(SafetensorsError::OutputSize {
            tensor: view.name.to_string(),
            found: out.len(),
            expected: view.numel(),
        });
    }
    convert(view, out);
    Ok(())
}

fn convert(view: &TensorView, out: &mut [f32]) {
    match view.dtype {
        StDtype::F32 => {
            for (o, b) in out.iter_mut().zip(view.data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        StDtype::F16 => {
            for (o, b) in out.iter_mut().zip(view.data.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        StDtype::BF16 => {
            for (o, b) in out.iter_mut().zip(view.data.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
    }
}

enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

impl AsRef<[u8]> for Backing {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

struct Shard {
    path: PathBuf,
    /// Shared so zero-copy weights can outlive the checkpoint ([`SafetensorsModel::tensor_shared`]).
    backing: std::sync::Arc<Backing>,
}

struct Entry {
    shard: usize,
    dtype: RawDtype,
    shape: Vec<usize>,
    /// Absolute byte range within the shard file.
    start: usize,
    end: usize,
}

/// An opened safetensors checkpoint (one file or several shards).
pub struct SafetensorsModel {
    /// The file or index the checkpoint was opened from.
    source: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
    /// Tensor names, sorted.
    names: Vec<String>,
}

impl fmt::Debug for SafetensorsModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsModel")
            .field("source", &self.source)
            .field("shards", &self.shards.len())
            .field("tensors", &self.names.len())
            .finish()
    }
}

impl SafetensorsModel {
    /// Opens a checkpoint. `path` is a model directory (holding
    /// `model.safetensors`, or else `model.safetensors.index.json`), a
    /// `.safetensors` file, or a shard index (`*.json`).
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| SafetensorsError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            let single = path.join(SINGLE_FILE_NAME);
            if single.is_file() {
                return Self::open_file(&single);
            }
            let index = path.join(INDEX_FILE_NAME);
            if index.is_file() {
                return Self::open_index(&index);
            }
            return Err(SafetensorsError::NoCheckpoint {
                dir: path.to_path_buf(),
            });
        }
        if path.extension().is_some_and(|e| e == "json") {
            Self::open_index(path)
        } else {
            Self::open_file(path)
        }
    }

    /// Parses an in-memory safetensors file (used by the fuzz target and
    /// tests). Errors name the file as `<memory>`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let source = PathBuf::from("<memory>");
        let parsed = parse_file(&bytes, &source)?;
        let shard = Shard {
            path: source.clone(),
            backing: std::sync::Arc::new(Backing::Owned(bytes)),
        };
        Ok(Self::assemble(source, vec![(shard, parsed)]))
    }

    /// Opens a single `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let shard = map_file(path)?;
        let parsed = parse_file(shard.backing.bytes(), path)?;
        Ok(Self::assemble(path.to_path_buf(), vec![(shard, parsed)]))
    }

    /// Opens a sharded checkpoint from its `model.safetensors.index.json`.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let io_err = |source| SafetensorsError::Io {
            file: index_path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(index_path).map_err(io_err)?.len();
        if len > MAX_INDEX_LEN {
            return Err(SafetensorsError::IndexTooLarge {
                file: index_path.to_path_buf(),
                len,
            });
        }
        let text = std::fs::read_to_string(index_path).map_err(io_err)?;
        let weight_map = parse_index(&text, index_path)?;
        let dir = index_path.parent().unwrap_or_else(|| Path::new("."));

        // Shard file name -> tensors the index maps to it.
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in &weight_map {
            by_shard
                .entry(shard.as_str())
                .or_default()
                .push(tensor.as_str());
        }

        let mut shards = Vec::with_capacity(by_shard.len());
        // Tensor name -> index into `shards` of the first shard holding it.
        let mut holder: HashMap<String, usize> = HashMap::new();
        for (shard_name, mapped) in &by_shard {
            let shard_path = dir.join(shard_name);
            if !shard_path.is_file() {
                return Err(SafetensorsError::ShardMissing {
                    file: index_path.to_path_buf(),
                    shard: shard_name.to_string(),
                    tensor: mapped.first().map(|t| t.to_string()).unwrap_or_default(),
                    count: mapped.len(),
                });
            }
            let shard = map_file(&shard_path)?;
            let parsed = parse_file(shard.backing.bytes(), &shard_path)?;
            let shard_idx = shards.len();
            for (name, _) in &parsed {
                if let Some(&first) = holder.get(name) {
                    let first_name = by_shard.keys().nth(first).copied().unwrap_or_default();
                    return Err(SafetensorsError::DuplicateAcrossShards {
                        file: index_path.to_path_buf(),
                        tensor: name.clone(),
                        first: first_name.to_string(),
                        second: shard_name.to_string(),
                    });
                }
                holder.insert(name.clone(), shard_idx);
            }
            shards.push((shard, parsed));
        }

        let shard_names: Vec<&str> = by_shard.keys().copied().collect();
        for (tensor, shard) in &weight_map {
            let in_shard = holder
                .get(tensor)
                .and_then(|&i| shard_names.get(i))
                .copied();
            if in_shard != Some(shard.as_str()) {
                return Err(SafetensorsError::TensorMissingFromShard {
                    file: index_path.to_path_buf(),
                    tensor: tensor.clone(),
                    shard: shard.clone(),
                    found_in: in_shard.map(str::to_string),
                });
            }
        }
        for (tensor, &i) in &holder {
            if !weight_map.contains_key(tensor) {
                return Err(SafetensorsError::UnmappedTensor {
                    file: index_path.to_path_buf(),
                    tensor: tensor.clone(),
                    shard: shard_names.get(i).copied().unwrap_or_default().to_string(),
                });
            }
        }
        Ok(Self::assemble(index_path.to_path_buf(), shards))
    }

    fn assemble(source: PathBuf, parts: Vec<(Shard, Vec<(String, ParsedTensor)>)>) -> Self {
        let mut shards = Vec::with_capacity(parts.len());
        let mut tensors = HashMap::new();
        for (shard_idx, (shard, parsed)) in parts.into_iter().enumerate() {
            for (name, t) in parsed {
                tensors.insert(
                    name,
                    Entry {
                        shard: shard_idx,
                        dtype: t.dtype,
                        shape: t.shape,
                        start: t.start,
                        end: t.end,
                    },
                );
            }
            shards.push(shard);
        }
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        Self {
            source,
            shards,
            tensors,
            names,
        }
    }

    /// The file or index this checkpoint was opened from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The files backing this checkpoint (one per shard).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> &[String] {
        &self.names
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether a tensor of this name exists (whatever its dtype).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<(&str, &Entry, &Shard)> {
        let found = self
            .tensors
            .get_key_value(name)
            .and_then(|(k, e)| self.shards.get(e.shard).map(|s| (k.as_str(), e, s)));
        found.ok_or_else(|| SafetensorsError::TensorNotFound {
            file: self.source.clone(),
            tensor: name.to_string(),
        })
    }

    /// Dtype, shape and file of any tensor, including unsupported dtypes.
    pub fn tensor_info(&self, name: &str) -> Result<TensorInfo<'_>> {
        let (key, entry, shard) = self.entry(name)?;
        Ok(TensorInfo {
            name: key,
            dtype: entry.dtype.name(),
            shape: &entry.shape,
            file: &shard.path,
        })
    }

    /// A zero-copy view of an F32, F16 or BF16 tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, entry, shard) = self.entry(name)?;
        let dtype = entry
            .dtype
            .supported()
            .ok_or_else(|| SafetensorsError::UnsupportedDtype {
                file: shard.path.clone(),
                tensor: name.to_string(),
                dtype: entry.dtype.name(),
            })?;
        let data = shard
            .backing
            .bytes()
            .get(entry.start..entry.end)
            .ok_or_else(|| SafetensorsError::OffsetsOutOfBounds {
                file: shard.path.clone(),
                tensor: name.to_string(),
                end: entry.end,
                data_len: shard.backing.bytes().len(),
            })?;
        Ok(TensorView {
            name: key,
            dtype,
            shape: entry.shape.clone(),
            data,
        })
    }

    /// The shared buffer (memory map) of the file holding `name`, with the tensor's
    /// byte range in it: for zero-copy weights that outlive this checkpoint. Any dtype;
    /// [`tensor_info`](Self::tensor_info) gives dtype and shape.
    #[allow(clippy::type_complexity)]
    pub fn tensor_shared(
        &self,
        name: &str,
    ) -> Result<(
        std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>,
        std::ops::Range<usize>,
    )> {
        let (_, entry, shard) = self.entry(name)?;
        if entry.start > entry.end || entry.end > shard.backing.bytes().len() {
            return Err(SafetensorsError::OffsetsOutOfBounds {
                file: shard.path.clone(),
                tensor: name.to_string(),
                end: entry.end,
                data_len: shard.backing.bytes().len(),
            });
        }
        let buf: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = shard.backing.clone();
        Ok((buf, entry.start..entry.end))
    }

    /// Convenience: a tensor converted to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(to_f32(&self.tensor(name)?))
    }
}

fn map_file(path: &Path) -> Result<Shard> {
    let io_err = |source| SafetensorsError::Io {
        file: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len < 8 {
        return Err(SafetensorsError::FileTooSmall {
            file: path.to_path_buf(),
            len,
        });
    }
    // SAFETY: the map is read-only and lives as long as the `Shard` that owns
    // it; every view borrows from that `Shard`. As with any memory-mapped file,
    // another process truncating or rewriting the file while it is mapped is
    // outside what this can guard against (checkpoints are treated as
    // immutable while open).
    let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
    Ok(Shard {
        path: path.to_path_buf(),
        backing: std::sync::Arc::new(Backing::Mapped(map)),
    })
}

struct ParsedTensor {
    dtype: RawDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A JSON object read as an ordered list of entries, keeping duplicates so
/// they can be reported (serde_json's own maps silently keep the last one).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

fn first_duplicate(entries: &[(String, Value)]) -> Option<&str> {
    let mut seen = HashSet::with_capacity(entries.len());
    entries
        .iter()
        .map(|(k, _)| k.as_str())
        .find(|k| !seen.insert(*k))
}

/// Short rendering of a JSON value for error messages.
fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(57).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

/// Validates one safetensors file image and returns its tensors with
/// absolute byte ranges. Runs graft's own checks, then the crate's parser,
/// and checks both agree.
fn parse_file(bytes: &[u8], file: &Path) -> Result<Vec<(String, ParsedTensor)>> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(SafetensorsError::FileTooSmall {
            file: file.to_path_buf(),
            len: file_len,
        });
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(SafetensorsError::HeaderTooLarge {
            file: file.to_path_buf(),
            header_len,
        });
    }
    let available = file_len - 8;
    if header_len > available {
        return Err(SafetensorsError::HeaderPastEnd {
            file: file.to_path_buf(),
            header_len,
            available,
        });
    }
    // header_len <= available < bytes.len(), so these conversions are lossless.
    let data_start = 8 + header_len as usize;
    let header = bytes.get(8..data_start).unwrap_or_default();
    let data_len = bytes.len() - data_start;
    let header = std::str::from_utf8(header).map_err(|e| SafetensorsError::HeaderNotUtf8 {
        file: file.to_path_buf(),
        valid_up_to: e.valid_up_to(),
    })?;
    let Entries(entries) =
        serde_json::from_str(header).map_err(|e| SafetensorsError::HeaderJson {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
    if let Some(key) = first_duplicate(&entries) {
        return Err(SafetensorsError::DuplicateHeaderKey {
            file: file.to_path_buf(),
            key: key.to_string(),
        });
    }

    let mut tensors: Vec<(String, ParsedTensor)> = Vec::with_capacity(entries.len());
    for (name, value) in &entries {
        if name == "__metadata__" {
            let ok = value
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(SafetensorsError::BadMetadata {
                    file: file.to_path_buf(),
                    found: describe(value),
                });
            }
            continue;
        }
        tensors.push((name.clone(), check_entry(file, name, value, data_len)?));
    }

    // The tensors must tile the data section exactly (the crate's rule).
    let mut order: Vec<&(String, ParsedTensor)> = tensors.iter().collect();
    order.sort_by_key(|(_, t)| (t.start, t.end));
    let mut cursor = 0usize;
    for (name, t) in order {
        if t.start != cursor {
            return Err(SafetensorsError::NonContiguous {
                file: file.to_path_buf(),
                tensor: name.clone(),
                found: t.start,
                expected: cursor,
            });
        }
        cursor = t.end;
    }
    if cursor != data_len {
        return Err(SafetensorsError::TrailingData {
            file: file.to_path_buf(),
            covered: cursor,
            data_len,
        });
    }

    // The crate is the parser of record: it must accept the file too, and
    // agree on every tensor.
    let (crate_header_len, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|source| {
            SafetensorsError::Format {
                file: file.to_path_buf(),
                source,
            }
        })?;
    let crate_tensors = metadata.tensors();
    if crate_header_len as u64 != header_len || crate_tensors.len() != tensors.len() {
        return Err(SafetensorsError::ParserDisagreement {
            file: file.to_path_buf(),
            tensor: String::from("(tensor count)"),
        });
    }
    for (name, t) in &mut tensors {
        let agrees = crate_tensors.get(name.as_str()).is_some_and(|info| {
            t.dtype.matches_crate(info.dtype)
                && info.shape == t.shape
                && info.data_offsets == (t.start, t.end)
        });
        if !agrees {
            return Err(SafetensorsError::ParserDisagreement {
                file: file.to_path_buf(),
                tensor: name.clone(),
            });
        }
        // Make the ranges absolute within the file (cannot overflow: both are
        // bounded by the file length, checked above).
        t.start += data_start;
        t.end += data_start;
    }
    Ok(tensors)
}

/// Checks one tensor entry of a header; offsets are relative to the data
/// section.
fn check_entry(file: &Path, name: &str, value: &Value, data_len: usize) -> Result<ParsedTensor> {
    let bad =
        |field: &'static str, found: String, expected: &'static str| SafetensorsError::BadField {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            field,
            found,
            expected,
        };
    let Some(obj) = value.as_object() else {
        return Err(bad(
            "(entry)",
            describe(value),
            "an object with dtype, shape and data_offsets",
        ));
    };
    let dtype_name = match obj.get("dtype") {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => return Err(bad("dtype", describe(v), "a string")),
        None => return Err(bad("dtype", "nothing".into(), "a string")),
    };
    let dtype = RawDtype::parse(dtype_name).ok_or_else(|| SafetensorsError::UnknownDtype {
        file: file.to_path_buf(),
        tensor: name.to_string(),
        dtype: dtype_name.to_string(),
    })?;
    const SHAPE: &str = "an array of non-negative integers";
    let shape: Vec<usize> = match obj.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| {
                as_usize(d).ok_or_else(|| bad("shape", describe(value_of(obj, "shape")), SHAPE))
            })
            .collect::<Result<_>>()?,
        Some(v) => return Err(bad("shape", describe(v), SHAPE)),
        None => return Err(bad("shape", "nothing".into(), SHAPE)),
    };
    const OFFSETS: &str = "[begin, end] (two non-negative integers)";
    let (begin, end) = match obj.get("data_offsets") {
        Some(Value::Array(o)) => match o.as_slice() {
            [b, e] => match (as_usize(b), as_usize(e)) {
                (Some(b), Some(e)) => (b, e),
                _ => {
                    return Err(bad(
                        "data_offsets",
                        describe(value_of(obj, "data_offsets")),
                        OFFSETS,
                    ))
                }
            },
            _ => {
                return Err(bad(
                    "data_offsets",
                    describe(value_of(obj, "data_offsets")),
                    OFFSETS,
                ))
            }
        },
        Some(v) => return Err(bad("data_offsets", describe(v), OFFSETS)),
        None => return Err(bad("data_offsets", "nothing".into(), OFFSETS)),
    };
    let nbytes = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| SafetensorsError::ShapeOverflow {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            dtype: dtype.name(),
            shape: shape.clone(),
        })?;
    if begin > end {
        return Err(SafetensorsError::ReversedOffsets {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            begin,
            end,
        });
    }
    if end > data_len {
        return Err(SafetensorsError::OffsetsOutOfBounds {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            end,
            data_len,
        });
    }
    if end - begin != nbytes {
        return Err(SafetensorsError::SizeMismatch {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            dtype: dtype.name(),
            shape,
            expected: nbytes,
            found: end - begin,
        });
    }
    Ok(ParsedTensor {
        dtype,
        shape,
        start: begin,
        end,
    })
}

fn value_of<'v>(obj: &'v serde_json::Map<String, Value>, key: &str) -> &'v Value {
    obj.get(key).unwrap_or(&Value::Null)
}

/// Parses `model.safetensors.index.json` into tensor name -> shard file name.
fn parse_index(text: &str, file: &Path) -> Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct RawIndex {
        weight_map: Option<Entries>,
    }
    let raw: RawIndex = serde_json::from_str(text).map_err(|e| SafetensorsError::IndexJson {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    let Some(Entries(wm)) = raw.weight_map else {
        return Err(SafetensorsError::IndexNoWeightMap {
            file: file.to_path_buf(),
        });
    };
    let mut out = BTreeMap::new();
    for (tensor, shard) in wm {
        let Some(shard_name) = shard.as_str() else {
            return Err(SafetensorsError::IndexBadShard {
                file: file.to_path_buf(),
                tensor,
                found: describe(&shard),
            });
        };
        let mut comps = Path::new(shard_name).components();
        let plain = matches!(
            (comps.next(), comps.next()),
            (Some(Component::Normal(_)), None)
        );
        if !plain {
            return Err(SafetensorsError::IndexBadShard {
                file: file.to_path_buf(),
                tensor,
                found: describe(&shard),
            });
        }
        let shard_name = shard_name.to_string();
        if out.insert(tensor.clone(), shard_name).is_some() {
            return Err(SafetensorsError::IndexDuplicateTensor {
                file: file.to_path_buf(),
                tensor,
            });
        }
    }
    Ok(out)
}
