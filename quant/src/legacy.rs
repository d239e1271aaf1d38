//! Legacy 32-element block quants: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
//!
//! Quantizers reproduce ggml's `quantize_row_*_ref` bit for bit: all arithmetic is
//! f32, with the same operation order, so files match llama.cpp's byte for byte.
//! Dequantizers follow ggml's `dequantize_row_*`.

use crate::blocks::*;
use crate::types::QK;

const HALF: usize = QK / 2;

/// Signed value with the largest magnitude; the first one wins a tie, as in ggml
/// (strict `<` on the running |max|).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Largest |v|, using ggml's `MAX(a, b) = a > b ? a : b` so NaN handling matches too.
#[inline(always)]
fn absmax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0f32, |m, &v| if m > v.abs() { m } else { v.abs() })
}

/// (min, max) with ggml's starting values of +/-FLT_MAX.
#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// ggml's `d ? 1.0f/d : 0.0f`.
#[inline(always)]
fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q4_0(src: &[f32], dst: &mut [BlockQ4_0]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let d = signed_absmax(x) / -8.0;
        let id = inv(d);
        y.d = f32_to_f16(d);
        let (lo, hi) = x.split_at(HALF);
        for ((q, &a), &b) in y.qs.iter_mut().zip(lo).zip(hi) {
            // `as i32` truncates toward zero like C's cast; the sum is >= ~0.5, so this
            // is floor(v*id + 8.5). Plain mul+add: llama.cpp's files show no FMA.
            let qa = ((a * id + 8.5) as i32).min(15) as u8;
            let qb = ((b * id + 8.5) as i32).min(15) as u8;
            *q = qa | (qb << 4);
        }
    }
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q4_0(src: &[BlockQ4_0], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        let (lo, hi) = y.split_at_mut(HALF);
        for ((&q, a), c) in b.qs.iter().zip(lo).zip(hi) {
            *a = ((q & 0x0F) as i32 - 8) as f32 * d;
            *c = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q4_1(src: &[f32], dst: &mut [BlockQ4_1]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inv(d);
        y.d = f32_to_f16(d);
        y.m = f32_to_f16(min);
        let (lo, hi) = x.split_at(HALF);
        for ((q, &a), &b) in y.qs.iter_mut().zip(lo).zip(hi) {
            let qa = (((a - min) * id + 0.5) as i32).min(15) as u8;
            let qb = (((b - min) * id + 0.5) as i32).min(15) as u8;
            *q = qa | (qb << 4);
        }
    }
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q4_1(src: &[BlockQ4_1], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        let m = f16_to_f32(b.m);
        let (lo, hi) = y.split_at_mut(HALF);
        for ((&q, a), c) in b.qs.iter().zip(lo).zip(hi) {
            *a = (q & 0x0F) as f32 * d + m;
            *c = (q >> 4) as f32 * d + m;
        }
    }
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q5_0(src: &[f32], dst: &mut [BlockQ5_0]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let d = signed_absmax(x) / -16.0;
        let id = inv(d);
        y.d = f32_to_f16(d);
        let (lo, hi) = x.split_at(HALF);
        let mut qh = 0u32;
        for (j, ((q, &a), &b)) in y.qs.iter_mut().zip(lo).zip(hi).enumerate() {
            let qa = ((a * id + 16.5) as i32).min(31) as u32;
            let qb = ((b * id + 16.5) as i32).min(31) as u32;
            *q = ((qa & 0x0F) | ((qb & 0x0F) << 4)) as u8;
            qh |= ((qa >> 4) & 1) << j;
            qh |= ((qb >> 4) & 1) << (j + HALF);
        }
        y.qh = qh.to_le_bytes();
    }
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q5_0(src: &[BlockQ5_0], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        let qh = u32::from_le_bytes(b.qh);
        let (lo, hi) = y.split_at_mut(HALF);
        for (j, ((&q, a), c)) in b.qs.iter().zip(lo).zip(hi).enumerate() {
            let ha = ((qh >> j) & 1) << 4;
            let hb = ((qh >> (j + HALF)) & 1) << 4;
            *a = (((q & 0x0F) as u32 | ha) as i32 - 16) as f32 * d;
            *c = (((q >> 4) as u32 | hb) as i32 - 16) as f32 * d;
        }
    }
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q5_1(src: &[f32], dst: &mut [BlockQ5_1]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inv(d);
        y.d = f32_to_f16(d);
        y.m = f32_to_f16(min);
        let (lo, hi) = x.split_at(HALF);
        let mut qh = 0u32;
        for (j, ((q, &a), &b)) in y.qs.iter_mut().zip(lo).zip(hi).enumerate() {
            // ggml has no clamp here ((v-min)*id <= 31 up to rounding); the min(31)
            // only guards the bit packing and never changes a valid result.
            let qa = (((a - min) * id + 0.5) as i32).min(31) as u32;
            let qb = (((b - min) * id + 0.5) as i32).min(31) as u32;
            *q = ((qa & 0x0F) | ((qb & 0x0F) << 4)) as u8;
            qh |= ((qa >> 4) & 1) << j;
            qh |= ((qb >> 4) & 1) << (j + HALF);
        }
        y.qh = qh.to_le_bytes();
    }
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q5_1(src: &[BlockQ5_1], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        let m = f16_to_f32(b.m);
        let qh = u32::from_le_bytes(b.qh);
        let (lo, hi) = y.split_at_mut(HALF);
        for (j, ((&q, a), c)) in b.qs.iter().zip(lo).zip(hi).enumerate() {
            let ha = ((qh >> j) & 1) << 4;
            let hb = ((qh >> (j + HALF)) & 1) << 4;
            *a = ((q & 0x0F) as u32 | ha) as f32 * d + m;
            *c = ((q >> 4) as u32 | hb) as f32 * d + m;
        }
    }
}

/// Shared by Q8_0 and Q8_1: fills `qs`, returns (unrounded d, sum of qs).
#[inline(always)]
fn quantize_q8_block(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    let d = absmax(x) / 127.0;
    let id = inv(d);
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        // f32::round is C's roundf (half away from zero); |v*id| <= 127 + rounding,
        // and `as i8` saturates anyway.
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q8_0(src: &[f32], dst: &mut [BlockQ8_0]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (d, _) = quantize_q8_block(x, &mut y.qs);
        y.d = f32_to_f16(d);
    }
}

/// `dst.len() == src.len() * 32`, checked by the caller.
pub fn dequantize_q8_0(src: &[BlockQ8_0], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        for (o, &q) in y.iter_mut().zip(b.qs.iter()) {
            *o = q as f32 * d;
        }
    }
}

/// `src.len() == dst.len() * 32`, checked by the caller.
pub fn quantize_q8_1(src: &[f32], dst: &mut [BlockQ8_1]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let (d, sum) = quantize_q8_block(x, &mut y.qs);
        y.d = f32_to_f16(d);
        // Current ggml: s = f16(sum(qs) * d) with the integer sum of the stored
        // quants and the f32 d before its f16 rounding.
        y.s = f32_to_f16(sum as f32 * d);
    }
}

/// `dst.len() == src.len() * 32`, checked by the caller. (`s` is redundant for
/// dequantization.)
pub fn dequantize_q8_1(src: &[BlockQ8_1], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        for (o, &q) in y.iter_mut().zip(b.qs.iter()) {
            *o = q as f32 * d;
        }
    }
}
