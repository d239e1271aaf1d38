//! Errors from reading, validating and writing GGUF files.

use std::fmt;

use graft_quant::GgmlType;

/// An error from the GGUF reader or writer: the file it concerns and what went wrong.
///
/// Displays as one line: `<file>: <field>: found <value>, expected <what>`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {kind}")]
pub struct GgufError {
    file: String,
    kind: Box<GgufErrorKind>,
}

impl GgufError {
    pub(crate) fn new(file: &str, kind: GgufErrorKind) -> GgufError {
        GgufError {
            file: file.to_owned(),
            kind: Box::new(kind),
        }
    }

    /// The file (path or name given to the reader/writer) the error concerns.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// What went wrong.
    pub fn kind(&self) -> &GgufErrorKind {
        &self.kind
    }

    pub fn into_kind(self) -> GgufErrorKind {
        *self.kind
    }
}

/// What went wrong. Every variant names the field, the value found and what was expected.
/// Byte offsets are from the start of the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum GgufErrorKind {
    /// Opening, mapping or writing the file failed.
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    /// A fixed-size field runs past the end of the file.
    Truncated {
        field: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    BadMagic {
        found: [u8; 4],
    },
    UnsupportedVersion {
        found: u32,
    },
    /// tensor_count / kv_count larger than the rest of the file could possibly hold.
    ImplausibleCount {
        field: &'static str,
        found: u64,
        max: u64,
    },
    /// A string length or array count larger than the bytes left in the file.
    LengthOutOfBounds {
        field: String,
        offset: u64,
        found: u64,
        available: u64,
    },
    InvalidUtf8 {
        field: String,
        offset: u64,
    },
    UnknownValueType {
        field: String,
        found: u32,
    },
    /// An array whose element type is array (ggml rejects these).
    NestedArray {
        field: String,
    },
    BadBool {
        field: String,
        found: u8,
    },
    DuplicateKey {
        key: String,
        first: usize,
        second: usize,
    },
    /// `general.alignment` is not a u32.
    AlignmentType {
        found: String,
    },
    /// `general.alignment` (or a writer alignment) is 0 or not a power of two.
    AlignmentValue {
        found: u64,
    },
    TensorNameTooLong {
        index: usize,
        len: u64,
    },
    DuplicateTensor {
        name: String,
        first: usize,
        second: usize,
    },
    BadDimCount {
        tensor: String,
        found: u32,
    },
    /// A dimension above i64::MAX (ggml stores ne as int64).
    DimTooLarge {
        tensor: String,
        dim: usize,
        found: u64,
    },
    /// The element count or byte size of a tensor overflows.
    ElementCountOverflow {
        tensor: String,
        dims: Vec<u64>,
    },
    UnknownTensorType {
        tensor: String,
        found: u32,
    },
    NotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block: usize,
    },
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    /// Tensor data (data_offset + offset + n_bytes) extends past the end of the file.
    OffsetOutOfBounds {
        tensor: String,
        offset: u64,
        n_bytes: u64,
        data_len: u64,
    },
    TensorOverlap {
        tensor: String,
        offset: u64,
        previous: String,
        previous_end: u64,
    },
    /// The offset is not the packed, aligned layout in info order that ggml requires.
    OffsetNotPacked {
        tensor: String,
        found: u64,
        expected: u64,
    },
    MissingKey {
        key: String,
    },
    WrongType {
        key: String,
        found: String,
        expected: &'static str,
    },
    ValueOutOfRange {
        key: String,
        found: String,
        expected: &'static str,
    },
    /// Writer: tensor data of the wrong length for its type and shape.
    TensorDataSize {
        tensor: String,
        found: usize,
        expected: usize,
    },
    /// Writer: `set_version` with a version it cannot write.
    WriterVersion {
        found: u32,
    },
    /// A size computation overflowed (file layout too large).
    SizeOverflow {
        field: String,
    },
}

impl fmt::Display for GgufErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgufErrorKind::*;
        match self {
            Io { op, source } => write!(f, "{op} failed: {source}"),
            Truncated {
                field,
                offset,
                needed,
                available,
            } => write!(
                f,
                "{field} at byte {offset}: found {available} bytes left, expected {needed} (file truncated)"
            ),
            BadMagic { found } => write!(
                f,
                "magic: found {:02x} {:02x} {:02x} {:02x} ({:?}), expected 47 47 55 46 (\"GGUF\")",
                found[0],
                found[1],
                found[2],
                found[3],
                String::from_utf8_lossy(found)
            ),
            UnsupportedVersion { found } => {
                write!(f, "version: found {found}, expected 2 or 3")?;
                if *found == 1 {
                    write!(f, " (GGUF v1 used 32-bit counts and is no longer supported)")?;
                } else if *found != 0 && found & 0xFFFF == 0 {
                    write!(f, " (byte-swapped: a big-endian file?)")?;
                }
                Ok(())
            }
            ImplausibleCount { field, found, max } => write!(
                f,
                "{field}: found {found}, expected at most {max} (what the rest of the file can hold)"
            ),
            LengthOutOfBounds {
                field,
                offset,
                found,
                available,
            } => write!(
                f,
                "{field} at byte {offset}: found {found}, expected a length that fits the {available} bytes left"
            ),
            InvalidUtf8 { field, offset } => {
                write!(f, "{field} at byte {offset}: found invalid UTF-8, expected UTF-8 text")
            }
            UnknownValueType { field, found } => {
                write!(f, "{field}: found value type {found}, expected 0..=12")
            }
            NestedArray { field } => write!(
                f,
                "{field}: found element type array, expected a scalar or string element type (nested arrays are not allowed)"
            ),
            BadBool { field, found } => write!(f, "{field}: found bool byte {found}, expected 0 or 1"),
            DuplicateKey { key, first, second } => write!(
                f,
                "kv[{second}] key {key:?}: found a duplicate of kv[{first}], expected unique keys"
            ),
            AlignmentType { found } => {
                write!(f, "general.alignment: found type {found}, expected uint32")
            }
            AlignmentValue { found } => write!(
                f,
                "general.alignment: found {found}, expected a non-zero power of two"
            ),
            TensorNameTooLong { index, len } => write!(
                f,
                "tensor_info[{index}] name: found length {len}, expected at most 63 bytes (GGML_MAX_NAME)"
            ),
            DuplicateTensor {
                name,
                first,
                second,
            } => write!(
                f,
                "tensor_info[{second}] name {name:?}: found a duplicate of tensor_info[{first}], expected unique names"
            ),
            BadDimCount { tensor, found } => {
                write!(f, "tensor {tensor:?} n_dims: found {found}, expected 1..=4")
            }
            DimTooLarge { tensor, dim, found } => write!(
                f,
                "tensor {tensor:?} ne[{dim}]: found {found}, expected at most {}",
                i64::MAX
            ),
            ElementCountOverflow { tensor, dims } => write!(
                f,
                "tensor {tensor:?} dims: found {dims:?}, expected an element count and byte size that fit in int64"
            ),
            UnknownTensorType { tensor, found } => write!(
                f,
                "tensor {tensor:?} type: found ggml type id {found} ({}), expected a type graft supports (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K)",
                ggml_type_name(*found)
            ),
            NotBlockMultiple {
                tensor,
                ty,
                ne0,
                block,
            } => write!(
                f,
                "tensor {tensor:?} ne[0]: found {ne0}, expected a multiple of the {ty} block size {block}"
            ),
            MisalignedOffset {
                tensor,
                offset,
                alignment,
            } => write!(
                f,
                "tensor {tensor:?} offset: found {offset}, expected a multiple of the alignment {alignment}"
            ),
            OffsetOutOfBounds {
                tensor,
                offset,
                n_bytes,
                data_len,
            } => write!(
                f,
                "tensor {tensor:?} offset: found {offset} (+{n_bytes} bytes), expected data within the {data_len}-byte data section"
            ),
            TensorOverlap {
                tensor,
                offset,
                previous,
                previous_end,
            } => write!(
                f,
                "tensor {tensor:?} offset: found {offset}, expected at least {previous_end} (overlaps tensor {previous:?})"
            ),
            OffsetNotPacked {
                tensor,
                found,
                expected,
            } => write!(
                f,
                "tensor {tensor:?} offset: found {found}, expected {expected} (ggml requires tensors packed in info order)"
            ),
            MissingKey { key } => write!(f, "{key}: found nothing, expected the key to be present"),
            WrongType {
                key,
                found,
                expected,
            } => write!(f, "{key}: found type {found}, expected {expected}"),
            ValueOutOfRange {
                key,
                found,
                expected,
            } => write!(f, "{key}: found {found}, expected {expected}"),
            TensorDataSize {
                tensor,
                found,
                expected,
            } => write!(
                f,
                "tensor {tensor:?} data: found {found} bytes, expected {expected}"
            ),
            WriterVersion { found } => {
                write!(f, "version: found {found}, expected 2 or 3 (the versions the writer can write)")
            }
            SizeOverflow { field } => {
                write!(f, "{field}: found a size that overflows, expected one that fits in u64/usize")
            }
        }
    }
}

/// What ggml calls the type ids graft does not support, for error messages.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        4 | 5 => "Q4_2/Q4_3, removed from ggml",
        16 => "IQ2_XXS, unsupported",
        17 => "IQ2_XS, unsupported",
        18 => "IQ3_XXS, unsupported",
        19 => "IQ1_S, unsupported",
        20 => "IQ4_NL, unsupported",
        21 => "IQ3_S, unsupported",
        22 => "IQ2_S, unsupported",
        23 => "IQ4_XS, unsupported",
        24 => "I8, unsupported",
        25 => "I16, unsupported",
        26 => "I32, unsupported",
        27 => "I64, unsupported",
        28 => "F64, unsupported",
        29 => "IQ1_M, unsupported",
        31..=33 | 36..=38 => "repacked Q4_0/IQ4_NL, removed from ggml",
        34 => "TQ1_0, unsupported",
        35 => "TQ2_0, unsupported",
        39 => "MXFP4, unsupported",
        _ => "unknown to ggml",
    }
}

/// Version-independent shape validation shared by the reader and the writer.
/// Returns the tensor's byte size.
pub(crate) fn tensor_n_bytes(
    name: &str,
    ty: GgmlType,
    dims: &[u64],
) -> Result<usize, GgufErrorKind> {
    let n_dims = dims.len();
    if !(1..=super::MAX_DIMS).contains(&n_dims) {
        return Err(GgufErrorKind::BadDimCount {
            tensor: name.to_owned(),
            found: u32::try_from(n_dims).unwrap_or(u32::MAX),
        });
    }
    let overflow = || GgufErrorKind::ElementCountOverflow {
        tensor: name.to_owned(),
        dims: dims.to_vec(),
    };
    let mut n_elements: u64 = 1;
    for (dim, &ne) in dims.iter().enumerate() {
        if ne > i64::MAX as u64 {
            return Err(GgufErrorKind::DimTooLarge {
                tensor: name.to_owned(),
                dim,
                found: ne,
            });
        }
        n_elements = n_elements.checked_mul(ne).ok_or_else(overflow)?;
    }
    if n_elements >= i64::MAX as u64 {
        return Err(overflow());
    }
    let ne0 = dims.first().copied().unwrap_or(1);
    let block = ty.block_size() as u64;
    if ne0 % block != 0 {
        return Err(GgufErrorKind::NotBlockMultiple {
            tensor: name.to_owned(),
            ty,
            ne0,
            block: ty.block_size(),
        });
    }
    // n_elements is a multiple of ne0 and so of the block size.
    let n_bytes = (n_elements / block)
        .checked_mul(ty.type_size() as u64)
        .ok_or_else(overflow)?;
    usize::try_from(n_bytes).map_err(|_| overflow())
}
