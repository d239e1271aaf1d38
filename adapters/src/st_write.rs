//! Writing safetensors files (SaRA deltas, PEFT checkpoints, training checkpoints):
//! tensors sorted by name, so the same content always gives the same bytes, and an
//! atomic write (temporary file + rename) so a reader never sees half a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{AdapterError, Result};

/// One tensor: safetensors dtype name (`F32`, `U32`, ...), shape, little-endian bytes.
pub struct StTensor {
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StTensor {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        StTensor {
            dtype: "F32",
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn u32(shape: Vec<usize>, values: &[u32]) -> Self {
        StTensor {
            dtype: "U32",
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// The file's bytes: u64 header length, JSON header (padded with spaces to a multiple
/// of 8 so the data stays aligned), then the tensors back to back. `name` stands for
/// the file in errors.
pub fn to_bytes(
    metadata: &BTreeMap<String, String>,
    tensors: &BTreeMap<String, StTensor>,
    name: &str,
) -> Result<Vec<u8>> {
    let mut header: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".to_owned(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (tname, t) in tensors {
        let end = offset + t.bytes.len();
        header.insert(
            tname.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_string(&header)
        .map_err(|e| AdapterError::invalid(name, format!("serializing the header: {e}")))?
        .into_bytes();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for t in tensors.values() {
        out.extend_from_slice(&t.bytes);
    }
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file = path.display().to_string();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io = |source| AdapterError::Io {
        file: file.clone(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
