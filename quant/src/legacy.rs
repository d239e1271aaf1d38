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

/// Largest |v|, with the same comparison as ggml's `MAX(a, b) = a > b ? a : b`.
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
            // `as i32` truncates toward zero like C's cast. f32 mul then add, no FMA:
            // ggml-quants.c is in ggml-base, built without -march flags (the conformance
            // files match either way: no element in them where FMA changes q).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dequantize_row, quantize_row, GgmlType};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const F16_ONE: [u8; 2] = [0x00, 0x3c];
    const F16_HALF: [u8; 2] = [0x00, 0x38];
    const F16_QUARTER: [u8; 2] = [0x00, 0x34];
    const F16_EIGHTH: [u8; 2] = [0x00, 0x30];
    const F16_TWO: [u8; 2] = [0x00, 0x40];
    const F16_MINUS_ONE: [u8; 2] = [0x00, 0xbc];

    fn deq<B: bytemuck::Pod>(ty: GgmlType, blocks: &[B]) -> Vec<f32> {
        let mut out = vec![0f32; blocks.len() * QK];
        dequantize_row(ty, bytemuck::cast_slice(blocks), &mut out).unwrap();
        out
    }

    fn quant<B: bytemuck::Pod + Default + Clone>(ty: GgmlType, x: &[f32]) -> Vec<B> {
        let mut blocks = vec![B::default(); x.len() / QK];
        quantize_row(ty, x, bytemuck::cast_slice_mut(&mut blocks)).unwrap();
        blocks
    }

    #[test]
    fn dequantize_q4_0_known_block() {
        let mut b = BlockQ4_0 {
            d: F16_HALF,
            ..Default::default()
        };
        for (j, q) in b.qs.iter_mut().enumerate() {
            *q = j as u8 | ((15 - j as u8) << 4);
        }
        let y = deq(GgmlType::Q4_0, &[b]);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
        assert_eq!(y[0], -4.0);
        assert_eq!(y[16], 3.5);
    }

    #[test]
    fn dequantize_q4_1_known_block() {
        let mut b = BlockQ4_1 {
            d: F16_QUARTER,
            m: F16_MINUS_ONE,
            ..Default::default()
        };
        for (j, q) in b.qs.iter_mut().enumerate() {
            *q = j as u8 | ((15 - j as u8) << 4);
        }
        let y = deq(GgmlType::Q4_1, &[b]);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
        assert_eq!(y[15], 2.75);
    }

    #[test]
    fn dequantize_q5_0_known_block() {
        // qh: even values 0..16 and every value 16..32 get the 5th bit.
        let qh: u32 = 0xFFFF_5555;
        let mut b = BlockQ5_0 {
            d: F16_HALF,
            qh: qh.to_le_bytes(),
            ..Default::default()
        };
        for (j, q) in b.qs.iter_mut().enumerate() {
            *q = j as u8 | ((15 - j as u8) << 4);
        }
        let y = deq(GgmlType::Q5_0, &[b]);
        for j in 0..16 {
            let lo = j as i32 + if j % 2 == 0 { 16 } else { 0 };
            let hi = 15 - j as i32 + 16;
            assert_eq!(y[j], (lo - 16) as f32 * 0.5, "value {j}");
            assert_eq!(y[j + 16], (hi - 16) as f32 * 0.5, "value {}", j + 16);
        }
        assert_eq!(y[0], 0.0); // q = 16
        assert_eq!(y[1], -7.5); // q = 1
        assert_eq!(y[16], 7.5); // q = 31
        assert_eq!(y[31], 0.0); // q = 16
    }

    #[test]
    fn dequantize_q5_1_known_block() {
        let qh: u32 = 0x8000_0001; // only values 0 and 31 have the 5th bit
        let mut b = BlockQ5_1 {
            d: F16_EIGHTH,
            m: F16_TWO,
            qh: qh.to_le_bytes(),
            ..Default::default()
        };
        for (j, q) in b.qs.iter_mut().enumerate() {
            *q = j as u8 | ((15 - j as u8) << 4);
        }
        let y = deq(GgmlType::Q5_1, &[b]);
        assert_eq!(y[0], 16.0 * 0.125 + 2.0);
        assert_eq!(y[31], 16.0 * 0.125 + 2.0); // low nibble 0 | 16
        assert_eq!(y[16], 15.0 * 0.125 + 2.0);
        for j in 1..16 {
            assert_eq!(y[j], j as f32 * 0.125 + 2.0);
            assert_eq!(y[j + 15], (16 - j) as f32 * 0.125 + 2.0);
        }
    }

    #[test]
    fn dequantize_q8_known_blocks() {
        let mut b0 = BlockQ8_0 {
            d: F16_QUARTER,
            ..Default::default()
        };
        let mut b1 = BlockQ8_1 {
            d: F16_TWO,
            s: F16_ONE, // not used by dequantization
            ..Default::default()
        };
        for (j, (q0, q1)) in b0.qs.iter_mut().zip(b1.qs.iter_mut()).enumerate() {
            *q0 = (j as i32 * 8 - 128) as i8;
            *q1 = (127 - j as i32 * 8) as i8;
        }
        let y0 = deq(GgmlType::Q8_0, &[b0]);
        let y1 = deq(GgmlType::Q8_1, &[b1]);
        for j in 0..QK {
            assert_eq!(y0[j], (j as f32 * 8.0 - 128.0) * 0.25);
            assert_eq!(y1[j], (127.0 - j as f32 * 8.0) * 2.0);
        }
        assert_eq!(y0[0], -32.0);
        assert_eq!(y1[0], 254.0);
    }

    #[test]
    fn q4_1_and_q5_1_exact_integer_ramps() {
        // 0..15 twice: min 0, max 15, d = 1, every value lands exactly on its level.
        let x: Vec<f32> = (0..QK).map(|j| (j % 16) as f32).collect();
        let b: Vec<BlockQ4_1> = quant(GgmlType::Q4_1, &x);
        assert_eq!(b[0].d, F16_ONE);
        assert_eq!(b[0].m, [0, 0]);
        for (j, &q) in b[0].qs.iter().enumerate() {
            assert_eq!(q, j as u8 | ((j as u8) << 4));
        }
        assert_eq!(deq(GgmlType::Q4_1, &b), x);

        // 0..31: values 16..31 carry the 5th bit, so qh = bits 16..31.
        let x: Vec<f32> = (0..QK).map(|j| j as f32).collect();
        let b: Vec<BlockQ5_1> = quant(GgmlType::Q5_1, &x);
        assert_eq!(b[0].d, F16_ONE);
        assert_eq!(b[0].qh, 0xFFFF_0000u32.to_le_bytes());
        for (j, &q) in b[0].qs.iter().enumerate() {
            assert_eq!(q, j as u8 | ((j as u8) << 4));
        }
        assert_eq!(deq(GgmlType::Q5_1, &b), x);
    }

    #[test]
    fn q4_0_q5_0_negative_max_sets_positive_scale() {
        let mut x = vec![0.25f32; QK];
        x[5] = -1.0;
        x[20] = 0.5;
        let b: Vec<BlockQ4_0> = quant(GgmlType::Q4_0, &x);
        assert_eq!(b[0].d, f32_to_f16(0.125)); // -1 / -8
        assert_eq!(b[0].qs[5] & 0x0F, 0); // -1 * 8 + 8.5 = 0.5 -> 0
        assert_eq!(b[0].qs[4] >> 4, 12); // x[20] = 0.5: 4 + 8.5 -> 12
        assert_eq!(b[0].qs[0] & 0x0F, 10); // 0.25: 2 + 8.5 -> 10
        let y = deq(GgmlType::Q4_0, &b);
        assert_eq!((y[5], y[20], y[0]), (-1.0, 0.5, 0.25));

        let b: Vec<BlockQ5_0> = quant(GgmlType::Q5_0, &x);
        assert_eq!(b[0].d, f32_to_f16(0.0625)); // -1 / -16
        let y = deq(GgmlType::Q5_0, &b);
        assert_eq!((y[5], y[20], y[0]), (-1.0, 0.5, 0.25));
    }

    #[test]
    fn q4_0_q5_0_equal_magnitudes_first_wins() {
        // +2 before -2: max = +2, d = -0.25; -2 maps past the top level and clamps.
        let mut x = vec![0.0f32; QK];
        x[3] = 2.0;
        x[10] = -2.0;
        let b: Vec<BlockQ4_0> = quant(GgmlType::Q4_0, &x);
        assert_eq!(b[0].d, f32_to_f16(-0.25));
        let y = deq(GgmlType::Q4_0, &b);
        assert_eq!((y[3], y[10], y[0]), (2.0, -1.75, 0.0));
        let b: Vec<BlockQ5_0> = quant(GgmlType::Q5_0, &x);
        assert_eq!(b[0].d, f32_to_f16(-0.125));
        let y = deq(GgmlType::Q5_0, &b);
        assert_eq!((y[3], y[10], y[0]), (2.0, -1.875, 0.0));

        // -2 first: the sign flips, so now +2 is the clamped one.
        x[3] = -2.0;
        x[10] = 2.0;
        let y = deq(GgmlType::Q4_0, &quant::<BlockQ4_0>(GgmlType::Q4_0, &x));
        assert_eq!((y[3], y[10]), (-2.0, 1.75));
        let y = deq(GgmlType::Q5_0, &quant::<BlockQ5_0>(GgmlType::Q5_0, &x));
        assert_eq!((y[3], y[10]), (-2.0, 1.875));
    }

    #[test]
    fn q4_1_q5_1_equal_min_and_max_magnitude() {
        let mut x = vec![0.0f32; QK];
        x[0] = -3.0;
        x[31] = 3.0;
        let b: Vec<BlockQ4_1> = quant(GgmlType::Q4_1, &x);
        assert_eq!(b[0].d, f32_to_f16(0.4));
        assert_eq!(b[0].m, f32_to_f16(-3.0));
        // id = 2.5 in f32, so a zero gives 3 * 2.5 + 0.5 = 8 -> q = 8
        assert_eq!(b[0].qs[1] & 0x0F, 8);
        assert_eq!(b[0].qs[0], 8 << 4);
        assert_eq!(b[0].qs[15] >> 4, 15);
        let b: Vec<BlockQ5_1> = quant(GgmlType::Q5_1, &x);
        assert_eq!(b[0].m, f32_to_f16(-3.0));
        assert_eq!(u32::from_le_bytes(b[0].qh) >> 31, 1); // x[31] -> q = 31
    }

    #[test]
    fn q8_rounds_half_away_from_zero() {
        // amax = 127 gives d = 1, id = 1, so v * id is v exactly.
        let mut x = vec![0.0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.5;
        x[4] = -0.5;
        x[5] = -127.0;
        let b: Vec<BlockQ8_0> = quant(GgmlType::Q8_0, &x);
        assert_eq!(b[0].d, F16_ONE);
        assert_eq!(&b[0].qs[..6], &[127, 3, -3, 1, -1, -127]);
        let b: Vec<BlockQ8_1> = quant(GgmlType::Q8_1, &x);
        assert_eq!(&b[0].qs[..6], &[127, 3, -3, 1, -1, -127]);
        // sum = 0, so s = 0
        assert_eq!(b[0].s, [0, 0]);
    }

    #[test]
    fn q8_1_stores_scaled_sum() {
        let x: Vec<f32> = (0..QK).map(|j| j as f32 - 10.0).collect();
        let b: Vec<BlockQ8_1> = quant(GgmlType::Q8_1, &x);
        let sum: i32 = b[0].qs.iter().map(|&q| q as i32).sum();
        assert!(sum > 0);
        let d = 21.0f32 / 127.0;
        assert_eq!(b[0].d, f32_to_f16(d));
        // ggml multiplies by the f32 d, before its f16 rounding.
        assert_eq!(b[0].s, f32_to_f16(sum as f32 * d));
        let q0: Vec<BlockQ8_0> = quant(GgmlType::Q8_0, &x);
        assert_eq!(q0[0].qs, b[0].qs);
        assert_eq!(q0[0].d, b[0].d);
    }

    #[test]
    fn zero_and_constant_blocks() {
        let zeros = vec![0.0f32; QK];
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q8_1,
        ] {
            let mut bytes = vec![0xAAu8; ty.type_size()];
            quantize_row(ty, &zeros, &mut bytes).unwrap();
            let mut y = vec![1.0f32; QK];
            dequantize_row(ty, &bytes, &mut y).unwrap();
            assert_eq!(y, zeros, "{ty}");
        }
        // min == max: d = 0, everything comes back from m exactly.
        let threes = vec![3.0f32; QK];
        let y = deq(GgmlType::Q4_1, &quant::<BlockQ4_1>(GgmlType::Q4_1, &threes));
        assert_eq!(y, threes);
        let y = deq(GgmlType::Q5_1, &quant::<BlockQ5_1>(GgmlType::Q5_1, &threes));
        assert_eq!(y, threes);
    }

    #[test]
    fn non_finite_input_does_not_panic() {
        let mut x = vec![1.0f32; 2 * QK];
        x[1] = f32::NAN;
        x[40] = f32::INFINITY;
        x[41] = f32::NEG_INFINITY;
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q8_1,
        ] {
            let mut bytes = vec![0u8; ty.row_size(x.len()).unwrap()];
            quantize_row(ty, &x, &mut bytes).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &bytes, &mut y).unwrap();
        }
    }

    /// Random blocks at assorted scales, plus an all-zero block and outlier blocks.
    fn test_data() -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(0x0067_7261_6674);
        let mut x = Vec::new();
        for i in 0..512 {
            let scale = 10f32.powf(rng.gen_range(-3.0..3.0));
            let shift = if i % 3 == 0 {
                rng.gen_range(-1.0..1.0)
            } else {
                0.0
            };
            x.extend((0..QK).map(|_| (rng.gen_range(-1.0f32..1.0) + shift) * scale));
        }
        x.extend([0.0f32; QK]);
        for pos in [0, 17, 31] {
            for sign in [1.0f32, -1.0] {
                let mut b: Vec<f32> = (0..QK).map(|_| rng.gen_range(-0.01..0.01)).collect();
                b[pos] = 50.0 * sign;
                x.extend(b);
            }
        }
        x
    }

    /// Quantizes and dequantizes `x`, checking each block's error against `bound`,
    /// which gets the block's values and its stored (d, m).
    fn check_round_trip(ty: GgmlType, bound: impl Fn(&[f32], f32, f32) -> f32) {
        let x = test_data();
        let mut bytes = vec![0u8; ty.row_size(x.len()).unwrap()];
        quantize_row(ty, &x, &mut bytes).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(ty, &bytes, &mut y).unwrap();
        let blocks = bytes.chunks_exact(ty.type_size());
        for (i, ((xb, yb), raw)) in x.chunks(QK).zip(y.chunks(QK)).zip(blocks).enumerate() {
            let d = f16_to_f32([raw[0], raw[1]]).abs();
            let has_m = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
            let m = if has_m {
                f16_to_f32([raw[2], raw[3]])
            } else {
                0.0
            };
            let bound = bound(xb, d, m);
            for (j, (&a, &b)) in xb.iter().zip(yb).enumerate() {
                assert!(
                    (a - b).abs() <= bound,
                    "{ty} block {i} value {j}: {a} -> {b}, bound {bound}"
                );
            }
        }
    }

    // f16 keeps 11 significant bits: stored d (and m) are off by at most 2^-11 relative.
    const F16_REL: f32 = 1.0 / 2048.0;

    /// Largest error of storing `v` as f16 (half an ulp; subnormals below 2^-14).
    fn f16_err(v: f32) -> f32 {
        (v.abs() * F16_REL).max(2f32.powi(-25))
    }

    #[test]
    fn round_trip_q4_0() {
        // Levels -8..7: the side opposite the max can be a whole step short.
        check_round_trip(GgmlType::Q4_0, |_, d, _| (d + 8.0 * f16_err(d)) * 1.0001);
        // Without that side, error is half a step.
        let x: Vec<f32> = (0..QK).map(|j| -(j as f32) / 7.0).collect();
        let y = deq(GgmlType::Q4_0, &quant::<BlockQ4_0>(GgmlType::Q4_0, &x));
        let d = 31.0 / 7.0 / 8.0;
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= d * (0.5 + 8.0 * F16_REL));
        }
    }

    #[test]
    fn round_trip_q5_0() {
        check_round_trip(GgmlType::Q5_0, |_, d, _| (d + 16.0 * f16_err(d)) * 1.0001);
    }

    #[test]
    fn round_trip_q4_1() {
        check_round_trip(GgmlType::Q4_1, |x, d, m| {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            0.5 * d + 15.0 * f16_err(d) + f16_err(m) + amax * 1e-6
        });
    }

    #[test]
    fn round_trip_q5_1() {
        check_round_trip(GgmlType::Q5_1, |x, d, m| {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            0.5 * d + 31.0 * f16_err(d) + f16_err(m) + amax * 1e-6
        });
    }

    #[test]
    fn round_trip_q8_0_and_q8_1() {
        for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
            check_round_trip(ty, |_, d, _| (0.5 * d + 127.0 * f16_err(d)) * 1.0001);
        }
        // Outliers come back to within f16 precision of themselves.
        let x = test_data();
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0] {
            let mut bytes = vec![0u8; ty.row_size(x.len()).unwrap()];
            quantize_row(ty, &x, &mut bytes).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &bytes, &mut y).unwrap();
            for (a, b) in x.iter().zip(&y).filter(|(a, _)| a.abs() == 50.0) {
                assert!((a - b).abs() <= 50.0 * F16_REL, "{ty}: {a} -> {b}");
            }
        }
    }
}
