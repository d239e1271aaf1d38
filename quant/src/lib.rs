//! graft-quant: GGML-compatible block quantization formats and the kernels that
//! compute on them.
//!
//! Byte layouts and reference quantizers follow ggml (ggml-common.h, ggml-quants.c)
//! so files written by llama.cpp and by graft are interchangeable bit for bit.

pub mod blocks;
mod float;
pub mod kernels;
pub mod kquants;
pub mod legacy;
pub mod pool;
mod types;

pub use types::{GgmlType, QK, QK_K};

use rayon::prelude::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{ty}: row length {len} is not a multiple of the block size {block}")]
    NotBlockMultiple {
        ty: GgmlType,
        len: usize,
        block: usize,
    },
    #[error("{ty}: byte size of {len} elements overflows")]
    Overflow { ty: GgmlType, len: usize },
    #[error("{ty}: buffer of {found} bytes, expected {expected} bytes for {len} elements")]
    ByteSize {
        ty: GgmlType,
        len: usize,
        found: usize,
        expected: usize,
    },
    #[error("{ty}: {what}")]
    Unsupported { ty: GgmlType, what: &'static str },
}

/// ggml's `nearest_int`: round half to even via the 1.5 * 2^23 trick (exact for |x| < 2^22).
/// Out-of-range, infinite or NaN input yields the same meaningless bits as ggml's release
/// build instead of panicking: ggml's k-quant searches do evaluate it there (tiny `slx` in
/// `make_q3_quants`, NaN scales after f16 overflow) and clamp the result, and so must we.
#[inline(always)]
pub(crate) fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12582912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn check_bytes(ty: GgmlType, n: usize, bytes: usize) -> Result<(), QuantError> {
    let expected = ty.row_size(n)?;
    if bytes != expected {
        return Err(QuantError::ByteSize {
            ty,
            len: n,
            found: bytes,
            expected,
        });
    }
    Ok(())
}

/// Dequantizes `dst.len()` elements of type `ty` from `src`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_bytes(ty, dst.len(), src.len())?;
    use bytemuck::cast_slice as c;
    match ty {
        GgmlType::F32 => float::f32_from_le(src, dst),
        GgmlType::F16 => float::f16_to_f32_row(src, dst),
        GgmlType::BF16 => float::bf16_to_f32_row(src, dst),
        GgmlType::Q4_0 => legacy::dequantize_q4_0(c(src), dst),
        GgmlType::Q4_1 => legacy::dequantize_q4_1(c(src), dst),
        GgmlType::Q5_0 => legacy::dequantize_q5_0(c(src), dst),
        GgmlType::Q5_1 => legacy::dequantize_q5_1(c(src), dst),
        GgmlType::Q8_0 => legacy::dequantize_q8_0(c(src), dst),
        GgmlType::Q8_1 => legacy::dequantize_q8_1(c(src), dst),
        GgmlType::Q2_K => kquants::dequantize_q2_k(c(src), dst),
        GgmlType::Q3_K => kquants::dequantize_q3_k(c(src), dst),
        GgmlType::Q4_K => kquants::dequantize_q4_k(c(src), dst),
        GgmlType::Q5_K => kquants::dequantize_q5_k(c(src), dst),
        GgmlType::Q6_K => kquants::dequantize_q6_k(c(src), dst),
        GgmlType::Q8_K => {
            // Q8_K is an in-memory activation type (alignment 4); copy when the bytes
            // are not aligned for it.
            let blocks: Vec<blocks::BlockQ8_K> = src
                .chunks_exact(ty.type_size())
                .map(bytemuck::pod_read_unaligned)
                .collect();
            kquants::dequantize_q8_k(&blocks, dst)
        }
    }
    Ok(())
}

/// Quantizes `src` into `dst` with llama.cpp's reference algorithm for `ty`
/// (no importance matrix).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_bytes(ty, src.len(), dst.len())?;
    use bytemuck::cast_slice_mut as c;
    match ty {
        GgmlType::F32 => float::f32_to_le(src, dst),
        GgmlType::F16 => float::f32_to_f16_row(src, dst),
        GgmlType::BF16 => float::f32_to_bf16_row(src, dst),
        GgmlType::Q4_0 => legacy::quantize_q4_0(src, c(dst)),
        GgmlType::Q4_1 => legacy::quantize_q4_1(src, c(dst)),
        GgmlType::Q5_0 => legacy::quantize_q5_0(src, c(dst)),
        GgmlType::Q5_1 => legacy::quantize_q5_1(src, c(dst)),
        GgmlType::Q8_0 => legacy::quantize_q8_0(src, c(dst)),
        GgmlType::Q8_1 => legacy::quantize_q8_1(src, c(dst)),
        GgmlType::Q2_K => kquants::quantize_q2_k(src, c(dst)),
        GgmlType::Q3_K => kquants::quantize_q3_k(src, c(dst)),
        GgmlType::Q4_K => kquants::quantize_q4_k(src, c(dst)),
        GgmlType::Q5_K => kquants::quantize_q5_k(src, c(dst)),
        GgmlType::Q6_K => kquants::quantize_q6_k(src, c(dst)),
        GgmlType::Q8_K => {
            let mut blocks = vec![blocks::BlockQ8_K::default(); src.len() / QK_K];
            kquants::quantize_q8_k(src, &mut blocks);
            dst.copy_from_slice(bytemuck::cast_slice(&blocks));
        }
    }
    Ok(())
}

/// Quantizes a row-major matrix of rows of `n_per_row` elements, rows in parallel.
pub fn quantize_matrix(ty: GgmlType, src: &[f32], n_per_row: usize) -> Result<Vec<u8>, QuantError> {
    let row_bytes = ty.row_size(n_per_row)?;
    if n_per_row == 0 {
        return Ok(Vec::new());
    }
    if !src.len().is_multiple_of(n_per_row) {
        return Err(QuantError::NotBlockMultiple {
            ty,
            len: src.len(),
            block: n_per_row,
        });
    }
    let rows = src.len() / n_per_row;
    let total = rows
        .checked_mul(row_bytes)
        .ok_or(QuantError::Overflow { ty, len: src.len() })?;
    let mut out = vec![0u8; total];
    out.par_chunks_mut(row_bytes.max(1))
        .zip(src.par_chunks(n_per_row))
        .try_for_each(|(dst, row)| quantize_row(ty, row, dst))?;
    Ok(out)
}

/// Dequantizes a row-major matrix of rows of `n_per_row` elements, rows in parallel.
pub fn dequantize_matrix(
    ty: GgmlType,
    src: &[u8],
    n_per_row: usize,
) -> Result<Vec<f32>, QuantError> {
    let row_bytes = ty.row_size(n_per_row)?;
    if n_per_row == 0 || row_bytes == 0 {
        return Ok(Vec::new());
    }
    if !src.len().is_multiple_of(row_bytes) {
        return Err(QuantError::ByteSize {
            ty,
            len: n_per_row,
            found: src.len() % row_bytes,
            expected: row_bytes,
        });
    }
    let rows = src.len() / row_bytes;
    let mut out = vec![0f32; rows * n_per_row];
    out.par_chunks_mut(n_per_row)
        .zip(src.par_chunks(row_bytes))
        .try_for_each(|(dst, row)| dequantize_row(ty, row, dst))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-7.49), -7);
        assert_eq!(nearest_int(126.6), 127);
    }

    #[test]
    fn wrong_buffer_sizes_are_errors() {
        let src = vec![0f32; 64];
        let mut dst = vec![0u8; 10];
        assert!(matches!(
            quantize_row(GgmlType::Q4_0, &src, &mut dst),
            Err(QuantError::ByteSize { expected: 36, .. })
        ));
        let mut out = vec![0f32; 33];
        assert!(matches!(
            dequantize_row(GgmlType::Q4_0, &[0u8; 36], &mut out),
            Err(QuantError::NotBlockMultiple { .. })
        ));
    }
}
