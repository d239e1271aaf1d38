//! K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and the Q8_K activation type.
//! PLACEHOLDER: being written (owned by the k-quants helper).

use crate::blocks::*;

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q2_k(src: &[f32], dst: &mut [BlockQ2_K]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q2_k(src: &[BlockQ2_K], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q3_k(src: &[f32], dst: &mut [BlockQ3_K]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q3_k(src: &[BlockQ3_K], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q4_k(src: &[f32], dst: &mut [BlockQ4_K]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q4_k(src: &[BlockQ4_K], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q5_k(src: &[f32], dst: &mut [BlockQ5_K]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q5_k(src: &[BlockQ5_K], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q6_k(src: &[f32], dst: &mut [BlockQ6_K]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q6_k(src: &[BlockQ6_K], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q8_k(src: &[f32], dst: &mut [BlockQ8_K]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q8_k(src: &[BlockQ8_K], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}
