//! SaRA sparse-delta files: graft's own safetensors layout (see `adapters/SARA_FORMAT.md`).
//!
//! For every adapted base weight `W` (`[out, in]`, GGUF name `blk.N.<stem>.weight`) the
//! file holds `<name>.sara_idx` (U32 `[nnz]`, flat row-major indices into `W`, strictly
//! ascending) and `<name>.sara_val` (F32 `[nnz]`, the trained delta at those positions).
//! `__metadata__` carries `format = "graft-sara"`, `version = "1"`, `architecture`,
//! optional `theta` and `alpha` (the merge scale, default 1) and `<name>.shape =
//! "out,in"`, so a file describes itself and is checked against the base before
//! anything is built: the result is `TensorDelta::Sparse` with `scale = alpha`, or an
//! error naming the file, the tensor and what was expected.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use graft_runtime::model::{Arch, Model, ModelConfig, Proj};
use safetensors::tensor::{Dtype, SafeTensorError, TensorView};
use safetensors::SafeTensors;

use crate::delta::{projection_shape, Adapter, AdapterFormat, SparseDelta, TensorDelta};
use crate::error::{AdapterError, Result};
use crate::st_write::{self, StTensor};

/// `__metadata__["format"]` of a SaRA file.
pub const FORMAT: &str = "graft-sara";
/// `__metadata__["version"]` this module reads and writes.
pub const VERSION: &str = "1";
/// Suffix of the index tensor of a weight.
pub const IDX_SUFFIX: &str = ".sara_idx";
/// Suffix of the value tensor of a weight.
pub const VAL_SUFFIX: &str = ".sara_val";
/// Suffix of the metadata key holding a weight's `"out,in"` shape.
pub const SHAPE_SUFFIX: &str = ".shape";

/// The largest weight (in elements) a U32 flat index can address; one less than 2^32
/// so that `nnz` also fits the CSR row pointers.
const MAX_ELEMENTS: usize = u32::MAX as usize;

/// File-level metadata of a SaRA file.
#[derive(Debug, Clone, PartialEq)]
pub struct SaraMeta {
    /// `general.architecture` of the base (`llama`, `qwen2`).
    pub architecture: String,
    /// The magnitude threshold that selected the trainable set; informational (absent
    /// for deltas that did not come from SaRA training, e.g. merges).
    pub theta: Option<f32>,
    /// Merge scale: the base sees `W + alpha * delta`.
    pub alpha: f32,
}

impl SaraMeta {
    /// Metadata for `arch` with no theta and alpha 1.
    pub fn new(arch: Arch) -> Self {
        SaraMeta {
            architecture: arch.name().to_owned(),
            theta: None,
            alpha: 1.0,
        }
    }
}

/// Loads a SaRA file for `model`, checking it against the model's configuration.
pub fn load(path: &Path, model: &Model) -> Result<Adapter> {
    load_with_meta(path, &model.config).map(|(a, _)| a)
}

/// [`load`] against a configuration, also returning the file's metadata.
pub fn load_with_meta(path: &Path, config: &ModelConfig) -> Result<(Adapter, SaraMeta)> {
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| AdapterError::Io {
        file: file.clone(),
        source,
    })?;
    // SAFETY: the map is read-only and dropped before this function returns; every
    // value is copied out of it into owned vectors. Another process truncating the
    // file meanwhile is outside what this can guard against (adapter files are
    // treated as immutable while read).
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| AdapterError::Io {
        file: file.clone(),
        source,
    })?;
    parse(&map, &file, path.to_path_buf(), config)
}

/// Parses an in-memory SaRA file (`name` stands for the file in errors).
pub fn from_bytes(bytes: &[u8], name: &str, config: &ModelConfig) -> Result<Adapter> {
    from_bytes_with_meta(bytes, name, config).map(|(a, _)| a)
}

/// [`from_bytes`], also returning the file's metadata.
pub fn from_bytes_with_meta(
    bytes: &[u8],
    name: &str,
    config: &ModelConfig,
) -> Result<(Adapter, SaraMeta)> {
    parse(bytes, name, PathBuf::from(name), config)
}

/// Writes the sparse deltas of `adapter` as a SaRA file at `path` (through a temporary
/// file renamed into place, so a failed save leaves no partial file).
pub fn save(adapter: &Adapter, meta: &SaraMeta, path: &Path) -> Result<()> {
    let bytes = to_bytes(adapter, meta, &path.display().to_string())?;
    st_write::write_atomic(path, &bytes)
}

/// The bytes [`save`] writes (`name` stands for the file in errors). Every delta must
/// be sparse, with finite values and `scale == meta.alpha` (the file has one scale).
pub fn to_bytes(adapter: &Adapter, meta: &SaraMeta, name: &str) -> Result<Vec<u8>> {
    if Arch::from_name(&meta.architecture).is_none() {
        return Err(AdapterError::invalid(
            name,
            format!(
                "architecture {:?}, expected \"llama\" or \"qwen2\"",
                meta.architecture
            ),
        ));
    }
    if !meta.alpha.is_finite() {
        return Err(AdapterError::invalid(
            name,
            format!("alpha {}, expected a finite number", meta.alpha),
        ));
    }
    if let Some(t) = meta.theta {
        if !(t.is_finite() && t >= 0.0) {
            return Err(AdapterError::invalid(
                name,
                format!("theta {t}, expected a finite number >= 0"),
            ));
        }
    }
    let mut info: BTreeMap<String, String> = BTreeMap::new();
    info.insert("format".to_owned(), FORMAT.to_owned());
    info.insert("version".to_owned(), VERSION.to_owned());
    info.insert("architecture".to_owned(), meta.architecture.clone());
    info.insert("alpha".to_owned(), meta.alpha.to_string());
    if let Some(t) = meta.theta {
        info.insert("theta".to_owned(), t.to_string());
    }
    let mut tensors: BTreeMap<String, StTensor> = BTreeMap::new();
    for (layer, proj, delta) in adapter.iter() {
        let weight = proj.gguf_weight(layer);
        let s = match delta {
            TensorDelta::Sparse(s) => s,
            TensorDelta::Lora(_) => {
                return Err(AdapterError::tensor(
                    name,
                    &weight,
                    "is a LoRA delta, expected a sparse delta (merge it with combine first)",
                ))
            }
            TensorDelta::Dense(_) => {
                return Err(AdapterError::tensor(
                    name,
                    &weight,
                    "is a dense delta, expected a sparse delta (convert it with sara::from_dense first)",
                ))
            }
        };
        if s.scale != meta.alpha {
            return Err(AdapterError::tensor(
                name,
                &weight,
                format!(
                    "scale {}, expected the file's alpha {} (fold the scale into the values)",
                    s.scale, meta.alpha
                ),
            ));
        }
        let indices =
            checked_flat_indices(s).map_err(|e| AdapterError::tensor(name, &weight, e))?;
        if let Some(k) = s.values.iter().position(|v| !v.is_finite()) {
            return Err(AdapterError::tensor(
                name,
                &weight,
                format!("value {k} is {}, expected a finite number", s.values[k]),
            ));
        }
        info.insert(
            format!("{weight}{SHAPE_SUFFIX}"),
            format!("{},{}", s.rows, s.cols),
        );
        let nnz = indices.len();
        tensors.insert(
            format!("{weight}{IDX_SUFFIX}"),
            StTensor::u32(vec![nnz], &indices),
        );
        tensors.insert(
            format!("{weight}{VAL_SUFFIX}"),
            StTensor::f32(vec![nnz], &s.values),
        );
    }
    st_write::to_bytes(&info, &tensors, name)
}

/// A sparse delta holding the nonzero entries of a dense `rows` x `cols` delta.
pub fn from_dense(rows: usize, cols: usize, dense: &[f32], scale: f32) -> Result<SparseDelta> {
    let what = |w: String| AdapterError::invalid("dense delta", w);
    let total = rows
        .checked_mul(cols)
        .ok_or_else(|| what(format!("shape {rows}x{cols} overflows")))?;
    if dense.len() != total {
        return Err(what(format!(
            "{} values, expected {rows}x{cols} = {total}",
            dense.len()
        )));
    }
    if total > MAX_ELEMENTS {
        return Err(what(format!(
            "shape {rows}x{cols} has {total} elements, more than u32 indices address ({MAX_ELEMENTS})"
        )));
    }
    let mut indices = Vec::new();
    let mut values = Vec::new();
    for (i, &v) in dense.iter().enumerate() {
        if v != 0.0 {
            // total <= u32::MAX, checked above.
            indices.push(i as u32);
            values.push(v);
        }
    }
    SparseDelta::from_flat(rows, cols, &indices, &values, scale).map_err(what)
}

/// Flat row-major indices of `s`, checking its CSR structure first (its fields are
/// public, so a hand-built one may be inconsistent).
pub(crate) fn checked_flat_indices(s: &SparseDelta) -> std::result::Result<Vec<u32>, String> {
    let total = s
        .rows
        .checked_mul(s.cols)
        .ok_or_else(|| format!("shape {}x{} overflows", s.rows, s.cols))?;
    if total > MAX_ELEMENTS {
        return Err(format!(
            "shape {}x{} has {total} elements, more than u32 indices address ({MAX_ELEMENTS})",
            s.rows, s.cols
        ));
    }
    if s.row_ptr.len() != s.rows + 1 {
        return Err(format!(
            "{} row pointers, expected rows + 1 = {}",
            s.row_ptr.len(),
            s.rows + 1
        ));
    }
    let nnz = s.values.len();
    if s.col_idx.len() != nnz {
        return Err(format!(
            "{} column indices but {nnz} values",
            s.col_idx.len()
        ));
    }
    if s.row_ptr.first() != Some(&0) || s.row_ptr.last().map(|&p| p as usize) != Some(nnz) {
        return Err(format!(
            "row pointers run {:?}..{:?}, expected 0..{nnz}",
            s.row_ptr.first(),
            s.row_ptr.last()
        ));
    }
    let mut out = Vec::with_capacity(nnz);
    for (r, w) in s.row_ptr.windows(2).enumerate() {
        let (lo, hi) = (w[0] as usize, w[1] as usize);
        let cols = s
            .col_idx
            .get(lo..hi)
            .ok_or_else(|| format!("row {r}: row pointers {lo}..{hi} are not ascending"))?;
        let mut prev: Option<u32> = None;
        for &c in cols {
            if c as usize >= s.cols || prev.is_some_and(|p| c <= p) {
                return Err(format!(
                    "row {r}: column {c}, expected ascending columns below {}",
                    s.cols
                ));
            }
            prev = Some(c);
            // r * cols + c < total <= u32::MAX.
            out.push((r * s.cols) as u32 + c);
        }
    }
    Ok(out)
}

/// Readable text for the safetensors crate's errors (its Display is its Debug).
pub(crate) fn st_message(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            "file is shorter than the 8-byte header-length prefix".to_owned()
        }
        SafeTensorError::HeaderTooLarge => "header length exceeds the 100 MB limit".to_owned(),
        SafeTensorError::InvalidHeaderLength => {
            "header length runs past the end of the file".to_owned()
        }
        SafeTensorError::InvalidHeader => "header is not valid UTF-8".to_owned(),
        SafeTensorError::InvalidHeaderStart | SafeTensorError::InvalidHeaderDeserialization => {
            "header is not a JSON object of tensor entries and string metadata".to_owned()
        }
        SafeTensorError::InvalidOffset(t) => {
            format!("tensor {t}: data offsets are not contiguous from 0")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's byte range does not match its shape and dtype".to_owned()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not end exactly at the end of the file (truncated or trailing bytes)"
                .to_owned()
        }
        SafeTensorError::ValidationOverflow => "a tensor's size overflows".to_owned(),
        other => format!("{other:?}"),
    }
}

/// A metadata value for an error message.
pub(crate) fn shown(v: Option<&str>) -> String {
    v.map_or_else(|| "(missing)".to_owned(), |v| format!("{v:?}"))
}

fn parse_f32(file: &str, key: &str, text: &str, nonneg: bool) -> Result<f32> {
    match text.trim().parse::<f32>() {
        Ok(v) if v.is_finite() && (!nonneg || v >= 0.0) => Ok(v),
        _ => Err(AdapterError::invalid(
            file,
            format!(
                "metadata {key} = {text:?}, expected a finite number{}",
                if nonneg { " >= 0" } else { "" }
            ),
        )),
    }
}

fn parse_shape(text: &str) -> Option<(usize, usize)> {
    let (a, b) = text.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

fn decode_u32(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub(crate) fn decode_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn parse(
    bytes: &[u8],
    file: &str,
    source: PathBuf,
    config: &ModelConfig,
) -> Result<(Adapter, SaraMeta)> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        AdapterError::invalid(
            file,
            format!("not a valid safetensors file: {}", st_message(&e)),
        )
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
        AdapterError::invalid(
            file,
            format!("not a valid safetensors file: {}", st_message(&e)),
        )
    })?;
    let empty = HashMap::new();
    let md = header.metadata().as_ref().unwrap_or(&empty);
    let get = |key: &str| md.get(key).map(String::as_str);
    match get("format") {
        Some(FORMAT) => {}
        found => {
            return Err(AdapterError::invalid(
                file,
                format!("metadata format = {}, expected {FORMAT:?}", shown(found)),
            ))
        }
    }
    match get("version") {
        Some(VERSION) => {}
        found => {
            return Err(AdapterError::invalid(
                file,
                format!("metadata version = {}, expected {VERSION:?}", shown(found)),
            ))
        }
    }
    let arch = config.arch.name();
    match get("architecture") {
        Some(a) if a == arch => {}
        found => {
            return Err(AdapterError::invalid(
                file,
                format!(
                    "metadata architecture = {}, expected {arch:?} (the base model's)",
                    shown(found)
                ),
            ))
        }
    }
    let theta = get("theta")
        .map(|t| parse_f32(file, "theta", t, true))
        .transpose()?;
    let alpha = get("alpha")
        .map(|t| parse_f32(file, "alpha", t, false))
        .transpose()?
        .unwrap_or(1.0);

    // Weight name -> (layer, proj); sorted so errors come in a stable order.
    let mut weights: BTreeMap<String, (usize, Proj)> = BTreeMap::new();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for tname in &names {
        let base = tname
            .strip_suffix(IDX_SUFFIX)
            .or_else(|| tname.strip_suffix(VAL_SUFFIX))
            .ok_or_else(|| {
                AdapterError::tensor(
                    file,
                    tname,
                    format!("unexpected tensor, expected blk.N.<proj>.weight{IDX_SUFFIX} or {VAL_SUFFIX}"),
                )
            })?;
        let (layer, proj) = Proj::parse_gguf_weight(base)
            .filter(|&(l, p)| p.gguf_weight(l) == base)
            .ok_or_else(|| {
                AdapterError::tensor(
                    file,
                    tname,
                    "is not named after a base projection, expected blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight",
                )
            })?;
        if layer >= config.n_layer {
            return Err(AdapterError::tensor(
                file,
                tname,
                format!(
                    "layer {layer}, expected below the base's {} layers",
                    config.n_layer
                ),
            ));
        }
        weights.insert(base.to_owned(), (layer, proj));
    }
    for key in md.keys() {
        if let Some(w) = key.strip_suffix(SHAPE_SUFFIX) {
            if !weights.contains_key(w) {
                return Err(AdapterError::invalid(
                    file,
                    format!("metadata {key} names no tensor pair {w}{IDX_SUFFIX}/{VAL_SUFFIX} in the file"),
                ));
            }
        }
    }

    let mut adapter = Adapter::new(AdapterFormat::Sara, source, config.n_layer);
    for (weight, &(layer, proj)) in &weights {
        let expected = projection_shape(config, proj);
        let shape_key = format!("{weight}{SHAPE_SUFFIX}");
        let text = get(&shape_key).ok_or_else(|| {
            AdapterError::tensor(
                file,
                weight,
                format!(
                    "metadata {shape_key} is missing, expected \"{},{}\"",
                    expected.0, expected.1
                ),
            )
        })?;
        let (rows, cols) = parse_shape(text).ok_or_else(|| {
            AdapterError::tensor(
                file,
                weight,
                format!(
                    "metadata {shape_key} = {text:?}, expected \"{},{}\"",
                    expected.0, expected.1
                ),
            )
        })?;
        if (rows, cols) != expected {
            return Err(AdapterError::Shape {
                file: file.to_owned(),
                tensor: weight.clone(),
                found: vec![rows, cols],
                expected: vec![expected.0, expected.1],
            });
        }
        if rows.checked_mul(cols).is_none_or(|t| t > MAX_ELEMENTS) {
            return Err(AdapterError::tensor(
                file,
                weight,
                format!("shape {rows}x{cols} has more elements than u32 indices address ({MAX_ELEMENTS})"),
            ));
        }
        let view = |suffix: &str, dtype: Dtype| -> Result<(String, TensorView<'_>)> {
            let tname = format!("{weight}{suffix}");
            let v = st.tensor(&tname).map_err(|_| {
                AdapterError::tensor(
                    file,
                    &tname,
                    format!("is missing, expected a {dtype:?} [nnz] tensor next to its pair"),
                )
            })?;
            if v.dtype() != dtype {
                return Err(AdapterError::tensor(
                    file,
                    &tname,
                    format!("dtype {:?}, expected {dtype:?}", v.dtype()),
                ));
            }
            if v.shape().len() != 1 {
                return Err(AdapterError::tensor(
                    file,
                    &tname,
                    format!("shape {:?}, expected one dimension [nnz]", v.shape()),
                ));
            }
            Ok((tname, v))
        };
        let (idx_name, idx) = view(IDX_SUFFIX, Dtype::U32)?;
        let (val_name, val) = view(VAL_SUFFIX, Dtype::F32)?;
        if idx.shape() != val.shape() {
            return Err(AdapterError::tensor(
                file,
                &val_name,
                format!(
                    "{} values, expected {} (the length of {idx_name})",
                    val.shape()[0],
                    idx.shape()[0]
                ),
            ));
        }
        let indices = decode_u32(idx.data());
        let values = decode_f32(val.data());
        if let Some(k) = values.iter().position(|v| !v.is_finite()) {
            return Err(AdapterError::tensor(
                file,
                &val_name,
                format!("value {k} is {}, expected a finite number", values[k]),
            ));
        }
        let delta = SparseDelta::from_flat(rows, cols, &indices, &values, alpha)
            .map_err(|e| AdapterError::tensor(file, &idx_name, e))?;
        adapter.insert(config, layer, proj, TensorDelta::Sparse(delta))?;
    }
    let meta = SaraMeta {
        architecture: arch.to_owned(),
        theta,
        alpha,
    };
    Ok((adapter, meta))
}
