//! Legacy 32-element block quants: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
//! PLACEHOLDER: being written (owned by the legacy-quants helper).

use crate::blocks::*;

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q4_0(src: &[f32], dst: &mut [BlockQ4_0]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q4_0(src: &[BlockQ4_0], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q4_1(src: &[f32], dst: &mut [BlockQ4_1]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q4_1(src: &[BlockQ4_1], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q5_0(src: &[f32], dst: &mut [BlockQ5_0]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q5_0(src: &[BlockQ5_0], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q5_1(src: &[f32], dst: &mut [BlockQ5_1]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q5_1(src: &[BlockQ5_1], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q8_0(src: &[f32], dst: &mut [BlockQ8_0]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q8_0(src: &[BlockQ8_0], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q8_1(src: &[f32], dst: &mut [BlockQ8_1]) {
    let _ = (src, dst);
    unimplemented!()
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q8_1(src: &[BlockQ8_1], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!()
}
