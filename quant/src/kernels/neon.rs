//! aarch64 NEON kernels for Q4_0 and Q8_0 (other types use the scalar kernels on
//! aarch64).
//!
//! NOT COMPILED OR TESTED on the x86_64 development machine (no aarch64 std is
//! available offline), so this is deliberately the plainest baseline-NEON form of
//! the scalar kernels: widen i8 x i8 products to i16 (`vmull_s8`, |product| <=
//! 128 * 128 fits), pairwise-add to i32, one f32 FMA per block with d_w * d_x.
//! The tests in `tests.rs` compare it with the scalar kernels when run on aarch64.

use std::arch::aarch64::*;

use super::{Activations, RowsFn};
use crate::blocks::f16_to_f32;
use crate::{GgmlType, QK};

pub(super) fn rows_fn(w: GgmlType) -> Option<RowsFn> {
    match w {
        GgmlType::Q4_0 => Some(rows_q4_0),
        GgmlType::Q8_0 => Some(rows_q8_0),
        _ => None,
    }
}

/// Invariants guaranteed by the public entry points.
fn check(bs: usize, w: &[u8], rb: usize, a: &Activations, out: &[f32]) -> usize {
    let nb = rb / bs;
    let ok = w.len() == out.len() * rb && rb == nb * bs && a.qs.len() >= nb * QK && a.d.len() >= nb;
    assert!(ok, "kernel invariant violated");
    nb
}

fn rows_q4_0(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    let nb = check(18, w, rb, a, out);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
        // SAFETY: rows_fn hands this out only at Level::Neon, which requires runtime
        // detection of neon; sizes checked above.
        *o = unsafe { dot_q4_0(row.as_ptr(), nb, a) };
    }
}

fn rows_q8_0(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
    let nb = check(34, w, rb, a, out);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
        // SAFETY: as above.
        *o = unsafe { dot_q8_0(row.as_ptr(), nb, a) };
    }
}

/// sum of x[i] * y[i] over 16 lanes, as 4 i32 partial sums.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot16(x: int8x16_t, y: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(x), vget_low_s8(y));
    let hi = vmull_high_s8(x, y);
    vaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
}

#[target_feature(enable = "neon")]
unsafe fn dot_q4_0(p: *const u8, nb: usize, a: &Activations) -> f32 {
    let m4 = vdupq_n_u8(0x0F);
    let eight = vdupq_n_s8(8);
    let mut acc = vdupq_n_f32(0.0);
    for b in 0..nb {
        let blk = p.add(18 * b);
        let q = vld1q_u8(blk.add(2));
        // byte j: low nibble = value j, high nibble = value j + 16
        let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, m4)), eight);
        let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)), eight);
        let y0 = vld1q_s8(a.qs.as_ptr().add(QK * b));
        let y1 = vld1q_s8(a.qs.as_ptr().add(QK * b + 16));
        let s = vaddq_s32(dot16(lo, y0), dot16(hi, y1));
        let d = f16_to_f32([*blk, *blk.add(1)]) * *a.d.get_unchecked(b);
        acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vdupq_n_f32(d));
    }
    vaddvq_f32(acc)
}

#[target_feature(enable = "neon")]
unsafe fn dot_q8_0(p: *const u8, nb: usize, a: &Activations) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for b in 0..nb {
        let blk = p.add(34 * b);
        let x0 = vld1q_s8(blk.add(2) as *const i8);
        let x1 = vld1q_s8(blk.add(18) as *const i8);
        let y0 = vld1q_s8(a.qs.as_ptr().add(QK * b));
        let y1 = vld1q_s8(a.qs.as_ptr().add(QK * b + 16));
        let s = vaddq_s32(dot16(x0, y0), dot16(x1, y1));
        let d = f16_to_f32([*blk, *blk.add(1)]) * *a.d.get_unchecked(b);
        acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vdupq_n_f32(d));
    }
    vaddvq_f32(acc)
}
