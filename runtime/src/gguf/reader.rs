//! The GGUF parser: one pass over a byte slice with checked reads, validating
//! everything before any tensor data is touched.

use std::collections::HashMap;

use graft_quant::GgmlType;

use super::error::{tensor_n_bytes, GgufError, GgufErrorKind};
use super::value::{GgufArray, GgufValue, GgufValueType};
use super::{
    TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC, KEY_ALIGNMENT, MAX_DIMS, MAX_NAME_LEN, MIN_KV_SIZE,
    MIN_TENSOR_INFO_SIZE,
};

/// Everything a parse produces; the caller owns the bytes.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub version: u32,
    pub alignment: usize,
    pub data_offset: usize,
    pub metadata: Vec<(String, GgufValue)>,
    pub key_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
}

type Result<T> = std::result::Result<T, GgufError>;

/// Field descriptions are built lazily, only when an error is reported.
type Field<'f> = &'f dyn Fn() -> String;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn err(&self, kind: GgufErrorKind) -> GgufError {
        GgufError::new(self.file, kind)
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// `n` bytes of a fixed-size field.
    fn take(&mut self, n: usize, field: Field) -> Result<&'a [u8]> {
        let start = self.pos;
        match start
            .checked_add(n)
            .and_then(|end| self.buf.get(start..end))
        {
            Some(s) => {
                self.pos = start + n;
                Ok(s)
            }
            None => Err(self.err(GgufErrorKind::Truncated {
                field: field(),
                offset: start as u64,
                needed: n as u64,
                available: self.remaining() as u64,
            })),
        }
    }

    fn fixed<const N: usize>(&mut self, field: Field) -> Result<[u8; N]> {
        let s = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u32(&mut self, field: Field) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed(field)?))
    }

    fn u64(&mut self, field: Field) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(field)?))
    }

    /// A declared length (string bytes, array elements of `elem_size` bytes at
    /// least) checked against the bytes left, so nothing is allocated from it unchecked.
    /// `at` is where the length field itself starts (for the error message).
    fn check_len(&self, at: usize, len: u64, elem_size: u64, field: Field) -> Result<usize> {
        let avail = self.remaining() as u64;
        match len.checked_mul(elem_size) {
            Some(total) if total <= avail => usize::try_from(len)
                .map_err(|_| self.err(GgufErrorKind::SizeOverflow { field: field() })),
            _ => Err(self.err(GgufErrorKind::LengthOutOfBounds {
                field: field(),
                offset: at as u64,
                found: len,
                available: avail,
            })),
        }
    }

    /// u64 length + UTF-8 bytes, borrowed.
    fn str(&mut self, field: Field) -> Result<&'a str> {
        let at = self.pos;
        let len_raw = self.u64(&|| format!("{} length", field()))?;
        let len = self.check_len(at, len_raw, 1, &|| format!("{} length", field()))?;
        let start = self.pos;
        let bytes = self.take(len, field)?;
        std::str::from_utf8(bytes).map_err(|_| {
            self.err(GgufErrorKind::InvalidUtf8 {
                field: field(),
                offset: start as u64,
            })
        })
    }

    fn string(&mut self, field: Field) -> Result<String> {
        self.str(field).map(str::to_owned)
    }

    fn bool(&mut self, field: Field) -> Result<bool> {
        let [b] = self.fixed::<1>(field)?;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            found => Err(self.err(GgufErrorKind::BadBool {
                field: field(),
                found,
            })),
        }
    }

    fn value_type(&mut self, field: Field) -> Result<GgufValueType> {
        let id = self.u32(field)?;
        GgufValueType::from_id(id).ok_or_else(|| {
            self.err(GgufErrorKind::UnknownValueType {
                field: field(),
                found: id,
            })
        })
    }

    /// `count` fixed-size little-endian numbers, converted in one pass over one slice.
    fn numbers<const N: usize, T>(
        &mut self,
        count: usize,
        conv: fn([u8; N]) -> T,
        field: Field,
    ) -> Result<Vec<T>> {
        let n_bytes = count
            .checked_mul(N)
            .ok_or_else(|| self.err(GgufErrorKind::SizeOverflow { field: field() }))?;
        let bytes = self.take(n_bytes, field)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                conv(a)
            })
            .collect())
    }

    fn scalar(&mut self, ty: GgufValueType, field: Field) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.fixed(field)?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.fixed(field)?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.fixed(field)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.fixed(field)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.fixed(field)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.fixed(field)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.fixed(field)?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool(field)?),
            GgufValueType::String => GgufValue::String(self.string(field)?),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.fixed(field)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.fixed(field)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.fixed(field)?)),
            GgufValueType::Array => GgufValue::Array(self.array(field)?),
        })
    }

    fn array(&mut self, field: Field) -> Result<GgufArray> {
        let elem = self.value_type(&|| format!("{} array element type", field()))?;
        let at = self.pos;
        let count_raw = self.u64(&|| format!("{} array count", field()))?;
        if elem == GgufValueType::Array {
            return Err(self.err(GgufErrorKind::NestedArray { field: field() }));
        }
        let count = self.check_len(at, count_raw, elem.min_encoded_size(), &|| {
            format!("{} array count", field())
        })?;
        let elems = &|| format!("{} array<{elem}>[{count}] elements", field());
        Ok(match elem {
            GgufValueType::U8 => GgufArray::U8(self.numbers(count, u8::from_le_bytes, elems)?),
            GgufValueType::I8 => GgufArray::I8(self.numbers(count, i8::from_le_bytes, elems)?),
            GgufValueType::U16 => GgufArray::U16(self.numbers(count, u16::from_le_bytes, elems)?),
            GgufValueType::I16 => GgufArray::I16(self.numbers(count, i16::from_le_bytes, elems)?),
            GgufValueType::U32 => GgufArray::U32(self.numbers(count, u32::from_le_bytes, elems)?),
            GgufValueType::I32 => GgufArray::I32(self.numbers(count, i32::from_le_bytes, elems)?),
            GgufValueType::F32 => GgufArray::F32(self.numbers(count, f32::from_le_bytes, elems)?),
            GgufValueType::U64 => GgufArray::U64(self.numbers(count, u64::from_le_bytes, elems)?),
            GgufValueType::I64 => GgufArray::I64(self.numbers(count, i64::from_le_bytes, elems)?),
            GgufValueType::F64 => GgufArray::F64(self.numbers(count, f64::from_le_bytes, elems)?),
            GgufValueType::Bool => {
                let start = self.pos;
                let bytes = self.take(count, elems)?;
                if let Some(i) = bytes.iter().position(|&b| b > 1) {
                    let found = bytes.get(i).copied().unwrap_or(0);
                    return Err(GgufError::new(
                        self.file,
                        GgufErrorKind::BadBool {
                            field: format!("{}[{i}] (byte {})", field(), start + i),
                            found,
                        },
                    ));
                }
                GgufArray::Bool(bytes.iter().map(|&b| b == 1).collect())
            }
            GgufValueType::String => {
                let mut out = Vec::with_capacity(count);
                for i in 0..count {
                    out.push(self.string(&|| format!("{}[{i}]", field()))?);
                }
                GgufArray::String(out)
            }
            // Rejected above.
            GgufValueType::Array => {
                return Err(self.err(GgufErrorKind::NestedArray { field: field() }))
            }
        })
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    // alignment is a validated non-zero power of two
    let mask = alignment.checked_sub(1)?;
    x.checked_add(mask).map(|v| v & !mask)
}

pub(crate) fn parse(buf: &[u8], file: &str) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, file };

    // --- header ---
    let magic: [u8; 4] = c.fixed(&|| "magic".into())?;
    if magic != GGUF_MAGIC {
        return Err(c.err(GgufErrorKind::BadMagic { found: magic }));
    }
    let version = c.u32(&|| "version".into())?;
    if !(2..=3).contains(&version) {
        return Err(c.err(GgufErrorKind::UnsupportedVersion { found: version }));
    }
    let tensor_count = c.u64(&|| "tensor_count".into())?;
    let kv_count = c.u64(&|| "kv_count".into())?;

    // Plausibility: never allocate from an unchecked count.
    let rest = c.remaining() as u64;
    let max_kv = rest / MIN_KV_SIZE;
    if kv_count > max_kv {
        return Err(c.err(GgufErrorKind::ImplausibleCount {
            field: "kv_count",
            found: kv_count,
            max: max_kv,
        }));
    }
    let max_tensors = (rest - kv_count * MIN_KV_SIZE) / MIN_TENSOR_INFO_SIZE;
    if tensor_count > max_tensors {
        return Err(c.err(GgufErrorKind::ImplausibleCount {
            field: "tensor_count",
            found: tensor_count,
            max: max_tensors,
        }));
    }
    // Both fit in usize now: each is below the file length.
    let kv_count = kv_count as usize;
    let tensor_count = tensor_count as usize;

    // --- key/value pairs ---
    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(kv_count);
    let mut key_index: HashMap<String, usize> = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = c.str(&|| format!("kv[{i}] key"))?;
        if let Some(&first) = key_index.get(key) {
            return Err(c.err(GgufErrorKind::DuplicateKey {
                key: key.to_owned(),
                first,
                second: i,
            }));
        }
        let field = &|| format!("kv[{i}] {key:?}");
        let ty = c.value_type(&|| format!("kv[{i}] {key:?} value type"))?;
        let value = c.scalar(ty, field)?;
        key_index.insert(key.to_owned(), i);
        metadata.push((key.to_owned(), value));
    }

    let alignment: u64 = match key_index.get(KEY_ALIGNMENT).and_then(|&i| metadata.get(i)) {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) => u64::from(*a),
        Some((_, other)) => {
            return Err(c.err(GgufErrorKind::AlignmentType {
                found: other.type_description(),
            }))
        }
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(c.err(GgufErrorKind::AlignmentValue { found: alignment }));
    }

    // --- tensor infos ---
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count);
    let mut tensor_index: HashMap<String, usize> = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = c.str(&|| format!("tensor_info[{i}] name"))?;
        if name.len() >= MAX_NAME_LEN {
            return Err(c.err(GgufErrorKind::TensorNameTooLong {
                index: i,
                len: name.len() as u64,
            }));
        }
        if let Some(&first) = tensor_index.get(name) {
            return Err(c.err(GgufErrorKind::DuplicateTensor {
                name: name.to_owned(),
                first,
                second: i,
            }));
        }
        let n_dims = c.u32(&|| format!("tensor {name:?} n_dims"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(c.err(GgufErrorKind::BadDimCount {
                tensor: name.to_owned(),
                found: n_dims,
            }));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| format!("tensor {name:?} ne[{d}]"))?);
        }
        let type_id = c.u32(&|| format!("tensor {name:?} type"))?;
        let offset = c.u64(&|| format!("tensor {name:?} offset"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| {
            c.err(GgufErrorKind::UnknownTensorType {
                tensor: name.to_owned(),
                found: type_id,
            })
        })?;
        let n_bytes = tensor_n_bytes(name, ty, &dims).map_err(|k| c.err(k))?;
        tensor_index.insert(name.to_owned(), i);
        tensors.push(TensorInfo {
            name: name.to_owned(),
            ty,
            dims,
            offset,
            n_bytes,
        });
    }

    // --- data section layout ---
    let file_len = buf.len() as u64;
    let data_offset = align_up(c.pos as u64, alignment).ok_or_else(|| {
        c.err(GgufErrorKind::SizeOverflow {
            field: "data section offset".into(),
        })
    })?;
    let data_len = file_len.saturating_sub(data_offset);
    let mut expected: u64 = 0;
    let mut prev: Option<(&str, u64)> = None;
    for t in &tensors {
        let n_bytes = t.n_bytes as u64;
        if t.offset % alignment != 0 {
            return Err(c.err(GgufErrorKind::MisalignedOffset {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            }));
        }
        let in_bounds = matches!(t.offset.checked_add(n_bytes), Some(e) if e <= data_len);
        if n_bytes > 0 && !in_bounds {
            return Err(c.err(GgufErrorKind::OffsetOutOfBounds {
                tensor: t.name.clone(),
                offset: t.offset,
                n_bytes,
                data_len,
            }));
        }
        if let Some((prev_name, prev_end)) = prev {
            if t.offset < prev_end {
                return Err(c.err(GgufErrorKind::TensorOverlap {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    previous: prev_name.to_owned(),
                    previous_end: prev_end,
                }));
            }
        }
        if t.offset != expected {
            return Err(c.err(GgufErrorKind::OffsetNotPacked {
                tensor: t.name.clone(),
                found: t.offset,
                expected,
            }));
        }
        // In bounds (or empty) and packed, so these cannot overflow: the offset is
        // below the file length.
        let end = t.offset.saturating_add(n_bytes);
        prev = Some((&t.name, end));
        expected = align_up(end, alignment).ok_or_else(|| {
            c.err(GgufErrorKind::SizeOverflow {
                field: format!("tensor {:?} padded end", t.name),
            })
        })?;
    }

    let data_offset = usize::try_from(data_offset).map_err(|_| {
        c.err(GgufErrorKind::SizeOverflow {
            field: "data section offset".into(),
        })
    })?;
    Ok(Parsed {
        version,
        alignment: alignment as usize,
        data_offset,
        metadata,
        key_index,
        tensors,
        tensor_index,
    })
}
