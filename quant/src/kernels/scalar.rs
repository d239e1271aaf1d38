//! Portable reference kernels: the ground truth for the SIMD levels. Integer block
//! sums are exact; float accumulation follows ggml's generic kernels (f32 per block)
//! except the float types, which accumulate in f64 like ggml's `ggml_float`.

// Block formats index several arrays with one position; explicit indices read better.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

use super::{Activations, RowsFn};
use crate::blocks::*;
use crate::GgmlType;

pub(super) fn rows_fn(w: GgmlType) -> Option<RowsFn> {
    Some(match w {
        GgmlType::F32 => rows_f32,
        GgmlType::F16 => rows_f16,
        GgmlType::BF16 => rows_bf16,
        GgmlType::Q4_0 => rows_q4_0,
        GgmlType::Q4_1 => rows_q4_1,
        GgmlType::Q5_0 => rows_q5_0,
        GgmlType::Q5_1 => rows_q5_1,
        GgmlType::Q8_0 => rows_q8_0,
        GgmlType::Q2_K => rows_q2_k,
        GgmlType::Q3_K => rows_q3_k,
        GgmlType::Q4_K => rows_q4_k,
        GgmlType::Q5_K => rows_q5_k,
        GgmlType::Q6_K => rows_q6_k,
        GgmlType::Q8_1 | GgmlType::Q8_K => return None,
    })
}

/// Applies a one-row dot to each row.
#[inline(always)]
fn each_row<B: bytemuck::Pod>(
    w: &[u8],
    row_bytes: usize,
    out: &mut [f32],
    mut dot: impl FnMut(&[B]) -> f32,
) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        *o = dot(bytemuck::cast_slice(row));
    }
}

fn rows_f32(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
        let mut s = 0f64;
        for (c, x) in row.chunks_exact(4).zip(&a.f) {
            s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64 * *x as f64;
        }
        *o = s as f32;
    }
}

fn rows_f16(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
        let mut s = 0f64;
        for (c, x) in row.chunks_exact(2).zip(&a.f) {
            let v = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            s += v as f64 * *x as f64;
        }
        *o = s as f32;
    }
}

fn rows_bf16(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
        let mut s = 0f64;
        for (c, x) in row.chunks_exact(2).zip(&a.f) {
            let v = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            s += v as f64 * *x as f64;
        }
        *o = s as f32;
    }
}

/// Integer dot of one Q4_0 block with one Q8_0 block.
pub(crate) fn isum_q4_0(x: &BlockQ4_0, y: &BlockQ8_0) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        let v0 = (x.qs[j] & 0xF) as i32 - 8;
        let v1 = (x.qs[j] >> 4) as i32 - 8;
        s += v0 * y.qs[j] as i32 + v1 * y.qs[j + 16] as i32;
    }
    s
}

fn rows_q4_0(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ4_0]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_0) {
            sumf += isum_q4_0(x, y) as f32 * (f16_to_f32(x.d) * f16_to_f32(y.d));
        }
        sumf
    })
}

pub(crate) fn isum_q4_1(x: &BlockQ4_1, y: &BlockQ8_1) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (x.qs[j] & 0xF) as i32 * y.qs[j] as i32 + (x.qs[j] >> 4) as i32 * y.qs[j + 16] as i32;
    }
    s
}

fn rows_q4_1(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ4_1]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_1) {
            sumf += isum_q4_1(x, y) as f32 * (f16_to_f32(x.d) * f16_to_f32(y.d))
                + f16_to_f32(x.m) * f16_to_f32(y.s);
        }
        sumf
    })
}

/// The 5-bit value j (0..32) of a Q5 block, without the offset.
#[inline(always)]
fn q5(qs: &[u8; 16], qh: u32, j: usize) -> i32 {
    let lo = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
    (lo as i32) | ((((qh >> j) & 1) as i32) << 4)
}

pub(crate) fn isum_q5_0(x: &BlockQ5_0, y: &BlockQ8_0) -> i32 {
    let qh = u32::from_le_bytes(x.qh);
    (0..32)
        .map(|j| (q5(&x.qs, qh, j) - 16) * y.qs[j] as i32)
        .sum()
}

fn rows_q5_0(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ5_0]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_0) {
            sumf += isum_q5_0(x, y) as f32 * (f16_to_f32(x.d) * f16_to_f32(y.d));
        }
        sumf
    })
}

pub(crate) fn isum_q5_1(x: &BlockQ5_1, y: &BlockQ8_1) -> i32 {
    let qh = u32::from_le_bytes(x.qh);
    (0..32).map(|j| q5(&x.qs, qh, j) * y.qs[j] as i32).sum()
}

fn rows_q5_1(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ5_1]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_1) {
            sumf += isum_q5_1(x, y) as f32 * (f16_to_f32(x.d) * f16_to_f32(y.d))
                + f16_to_f32(x.m) * f16_to_f32(y.s);
        }
        sumf
    })
}

pub(crate) fn isum_q8_0(x: &BlockQ8_0, y: &BlockQ8_0) -> i32 {
    x.qs.iter()
        .zip(&y.qs)
        .map(|(&a, &b)| a as i32 * b as i32)
        .sum()
}

fn rows_q8_0(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ8_0]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_0) {
            sumf += isum_q8_0(x, y) as f32 * (f16_to_f32(x.d) * f16_to_f32(y.d));
        }
        sumf
    })
}

// ---- k-quants -------------------------------------------------------------------

/// Q2_K: (sum_j sc_j * sum q*y, sum_j m_j * bsum_j) for one super-block.
pub(crate) fn isums_q2_k(x: &BlockQ2_K, y: &BlockQ8_K) -> (i32, i32) {
    let mins: i32 = (0..16)
        .map(|j| (x.scales[j] >> 4) as i32 * y.bsums[j] as i32)
        .sum();
    let mut isum = 0i32;
    for n in 0..2 {
        let q = &x.qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = (x.scales[8 * n + 2 * j + half] & 0xF) as i32;
                let base = 128 * n + 32 * j + 16 * half;
                let s: i32 = (0..16)
                    .map(|l| ((q[16 * half + l] >> shift) & 3) as i32 * y.qs[base + l] as i32)
                    .sum();
                isum += sc * s;
            }
        }
    }
    (isum, mins)
}

fn rows_q2_k(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ2_K]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_k) {
            let (isum, mins) = isums_q2_k(x, y);
            let dall = y.d * f16_to_f32(x.d);
            let dmin = y.d * f16_to_f32(x.dmin);
            sumf += dall * isum as f32 - dmin * mins as f32;
        }
        sumf
    })
}

/// Q3_K's 16 signed 6-bit scales (already minus 32).
pub(crate) fn q3_k_scales(s: &[u8; 12]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let a0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let a1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let tmp = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, v) in aux.iter().enumerate() {
        for (k, b) in v.to_le_bytes().iter().enumerate() {
            out[4 * i + k] = *b as i8 - 32;
        }
    }
    out
}

pub(crate) fn isum_q3_k(x: &BlockQ3_K, y: &BlockQ8_K) -> i32 {
    let sc = q3_k_scales(&x.scales);
    let mut isum = 0i32;
    for n in 0..2 {
        let q = &x.qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            let m = 1u8 << (4 * n + j);
            for half in 0..2 {
                let base = 128 * n + 32 * j + 16 * half;
                let s: i32 = (0..16)
                    .map(|l| {
                        let i = 16 * half + l;
                        let v =
                            ((q[i] >> shift) & 3) as i32 - if x.hmask[i] & m != 0 { 0 } else { 4 };
                        v * y.qs[base + l] as i32
                    })
                    .sum();
                isum += sc[8 * n + 2 * j + half] as i32 * s;
            }
        }
    }
    isum
}

fn rows_q3_k(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ3_K]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_k) {
            sumf += f16_to_f32(x.d) * y.d * isum_q3_k(x, y) as f32;
        }
        sumf
    })
}

/// Q4_K/Q5_K: the 8 six-bit scales and 8 mins, unpacked 4 at a time in u32 words
/// (branch-free; this runs once per super-block per row in every kernel).
#[inline]
pub(crate) fn k4_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    // scales 0-3: low 6 bits of bytes 0-3; 4-7: low nibbles of bytes 8-11 | top bits of 0-3
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    // mins 0-3: low 6 bits of bytes 4-7; 4-7: high nibbles of bytes 8-11 | top bits of 4-7
    let m_lo = u1 & KMASK1;
    let m_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let (a, b) = (sc_lo.to_le_bytes(), sc_hi.to_le_bytes());
    let (c, d) = (m_lo.to_le_bytes(), m_hi.to_le_bytes());
    (
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]],
        [c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]],
    )
}

/// sum_j m_j * (bsum_{2j} + bsum_{2j+1}): the min correction of Q4_K/Q5_K.
fn k4_mins(m: &[u8; 8], y: &BlockQ8_K) -> i32 {
    (0..8)
        .map(|j| m[j] as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32))
        .sum()
}

pub(crate) fn isums_q4_k(x: &BlockQ4_K, y: &BlockQ8_K) -> (i32, i32) {
    let (sc, m) = k4_scales_mins(&x.scales);
    let mut isum = 0i32;
    for c in 0..4 {
        let q = &x.qs[32 * c..32 * c + 32];
        let lo: i32 = (0..32)
            .map(|l| (q[l] & 0xF) as i32 * y.qs[64 * c + l] as i32)
            .sum();
        let hi: i32 = (0..32)
            .map(|l| (q[l] >> 4) as i32 * y.qs[64 * c + 32 + l] as i32)
            .sum();
        isum += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
    }
    (isum, k4_mins(&m, y))
}

fn rows_q4_k(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ4_K]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_k) {
            let (isum, mins) = isums_q4_k(x, y);
            sumf += f16_to_f32(x.d) * y.d * isum as f32 - f16_to_f32(x.dmin) * y.d * mins as f32;
        }
        sumf
    })
}

pub(crate) fn isums_q5_k(x: &BlockQ5_K, y: &BlockQ8_K) -> (i32, i32) {
    let (sc, m) = k4_scales_mins(&x.scales);
    let mut isum = 0i32;
    for c in 0..4 {
        let q = &x.qs[32 * c..32 * c + 32];
        let (mut lo, mut hi) = (0i32, 0i32);
        for l in 0..32 {
            let h0 = ((x.qh[l] >> (2 * c)) & 1) << 4;
            let h1 = ((x.qh[l] >> (2 * c + 1)) & 1) << 4;
            lo += ((q[l] & 0xF) | h0) as i32 * y.qs[64 * c + l] as i32;
            hi += ((q[l] >> 4) | h1) as i32 * y.qs[64 * c + 32 + l] as i32;
        }
        isum += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
    }
    (isum, k4_mins(&m, y))
}

fn rows_q5_k(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ5_K]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_k) {
            let (isum, mins) = isums_q5_k(x, y);
            sumf += f16_to_f32(x.d) * y.d * isum as f32 - f16_to_f32(x.dmin) * y.d * mins as f32;
        }
        sumf
    })
}

pub(crate) fn isum_q6_k(x: &BlockQ6_K, y: &BlockQ8_K) -> i32 {
    let mut isum = 0i32;
    for n in 0..2 {
        let ql = &x.ql[64 * n..64 * n + 64];
        let qh = &x.qh[32 * n..32 * n + 32];
        let sc = &x.scales[8 * n..8 * n + 8];
        let yq = &y.qs[128 * n..128 * n + 128];
        let mut g = [0i32; 8];
        for l in 0..32 {
            let q0 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let is = l / 16;
            g[is] += q0 * yq[l] as i32;
            g[is + 2] += q1 * yq[l + 32] as i32;
            g[is + 4] += q2 * yq[l + 64] as i32;
            g[is + 6] += q3 * yq[l + 96] as i32;
        }
        isum += (0..8).map(|k| sc[k] as i32 * g[k]).sum::<i32>();
    }
    isum
}

fn rows_q6_k(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    each_row(w, rb, out, |x: &[BlockQ6_K]| {
        let mut sumf = 0f32;
        for (x, y) in x.iter().zip(&a.q8_k) {
            sumf += f16_to_f32(x.d) * y.d * isum_q6_k(x, y) as f32;
        }
        sumf
    })
}
