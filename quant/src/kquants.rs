//! K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and the Q8_K activation type.
//!
//! Layouts and reference encoders follow ggml's `ggml-quants.c` (the `*_ref` functions
//! that `llama-quantize` uses when no importance matrix is given), so the bytes we write
//! are identical to llama.cpp's. Float expressions keep ggml's evaluation order and f32
//! precision on purpose: any reordering changes rounding and therefore the output bytes.
//! No `mul_add` anywhere: llama.cpp builds ggml-quants.c into ggml-base without
//! `-march=native`, so nothing is contracted to FMA (checked: adding FMA breaks the match).

use crate::blocks::*;
use crate::{nearest_int, QK_K};

/// Dequantizes the 8-bit super-block activation type: `x = d * q`.
/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q8_k(src: &[BlockQ8_K], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        for (o, &q) in y.iter_mut().zip(b.qs.iter()) {
            *o = b.d * f32::from(q);
        }
    }
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q8_k(src: &[f32], dst: &mut [BlockQ8_K]) {
    for (x, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        *y = BlockQ8_K::default();
        // Signed value of the largest magnitude; the first one wins on ties.
        let mut max = 0f32;
        let mut amax = 0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            continue;
        }
        // ggml uses -127 (not -128) so that |q| <= 127 and SIMD kernels can negate freely.
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, g) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| i16::from(q)).sum();
        }
        y.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q2_k(src: &[BlockQ2_K], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(b.d);
        let min = f16_to_f32(b.dmin);
        // Each 128-value half uses 32 bytes of qs; 2-bit field `shift` of byte l (or l+16)
        // holds the values of one 16-value group.
        for (half, (yh, q)) in y
            .chunks_exact_mut(128)
            .zip(b.qs.chunks_exact(32))
            .enumerate()
        {
            for (g, yg) in yh.chunks_exact_mut(16).enumerate() {
                let sc = b.scales[8 * half + g];
                let dl = d * f32::from(sc & 0xF);
                let ml = min * f32::from(sc >> 4);
                let shift = 2 * (g / 2);
                let qg = &q[16 * (g % 2)..16 * (g % 2) + 16];
                for (o, &qb) in yg.iter_mut().zip(qg) {
                    *o = dl * f32::from((qb >> shift) & 3) - ml;
                }
            }
        }
    }
}

/// Unpacks Q3_K's sixteen 6-bit scales (stored with a +32 offset).
fn q3k_scales(s: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q3_k(src: &[BlockQ3_K], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d_all = f16_to_f32(b.d);
        let scales = q3k_scales(&b.scales);
        for (half, (yh, q)) in y
            .chunks_exact_mut(128)
            .zip(b.qs.chunks_exact(32))
            .enumerate()
        {
            for (g, yg) in yh.chunks_exact_mut(16).enumerate() {
                let dl = d_all * f32::from(scales[8 * half + g]);
                let shift = 2 * (g / 2);
                // hmask bit (4*half + g/2) of byte l is the high bit; a clear bit means -4.
                let m = 1u8 << (4 * half + g / 2);
                let off = 16 * (g % 2);
                let qg = &q[off..off + 16];
                let hg = &b.hmask[off..off + 16];
                for ((o, &qb), &hb) in yg.iter_mut().zip(qg).zip(hg) {
                    let v = ((qb >> shift) & 3) as i8 - if hb & m != 0 { 0 } else { 4 };
                    *o = dl * f32::from(v);
                }
            }
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12-byte packed 6-bit table of Q4_K/Q5_K.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q4_k(src: &[BlockQ4_K], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(b.d);
        let min = f16_to_f32(b.dmin);
        for (c, (yc, q)) in y
            .chunks_exact_mut(64)
            .zip(b.qs.chunks_exact(32))
            .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * c, &b.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &b.scales);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            let (lo, hi) = yc.split_at_mut(32);
            for ((a, h), &qb) in lo.iter_mut().zip(hi.iter_mut()).zip(q) {
                *a = d1 * f32::from(qb & 0xF) - m1;
                *h = d2 * f32::from(qb >> 4) - m2;
            }
        }
    }
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q5_k(src: &[BlockQ5_K], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(b.d);
        let min = f16_to_f32(b.dmin);
        for (c, (yc, ql)) in y
            .chunks_exact_mut(64)
            .zip(b.qs.chunks_exact(32))
            .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * c, &b.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &b.scales);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            let (lo, hi) = yc.split_at_mut(32);
            for (((a, h), &qb), &hb) in lo.iter_mut().zip(hi.iter_mut()).zip(ql).zip(&b.qh) {
                let q1 = (qb & 0xF) + if hb & u1 != 0 { 16 } else { 0 };
                let q2 = (qb >> 4) + if hb & u2 != 0 { 16 } else { 0 };
                *a = d1 * f32::from(q1) - m1;
                *h = d2 * f32::from(q2) - m2;
            }
        }
    }
}

/// `dst.len() == src.len() * 256`, checked by the caller.
pub fn dequantize_q6_k(src: &[BlockQ6_K], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(b.d);
        let halves = y
            .chunks_exact_mut(128)
            .zip(b.ql.chunks_exact(64))
            .zip(b.qh.chunks_exact(32))
            .zip(b.scales.chunks_exact(8));
        for (((yh, ql), qh), sc) in halves {
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                // ggml evaluates (d * sc) * q, left to right.
                yh[l] = d * f32::from(sc[is]) * f32::from(q1);
                yh[l + 32] = d * f32::from(sc[is + 2]) * f32::from(q2);
                yh[l + 64] = d * f32::from(sc[is + 4]) * f32::from(q3);
                yh[l + 96] = d * f32::from(sc[is + 6]) * f32::from(q4);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reference quantizers
// ---------------------------------------------------------------------------------------

/// Copies one super-block of input into a fixed array (lets the rest index freely).
#[inline]
fn load_block(xb: &[f32]) -> [f32; QK_K] {
    let mut x = [0f32; QK_K];
    for (d, &s) in x.iter_mut().zip(xb) {
        *d = s;
    }
    x
}

/// Packs 2-bit values the way Q2_K/Q3_K store them: byte l of each 32-byte chunk holds
/// values l, l+32, l+64, l+96 of its 128-value half.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8; QK_K / 4]) {
    for (qc, lc) in qs.chunks_exact_mut(32).zip(l.chunks_exact(128)) {
        for (i, q) in qc.iter_mut().enumerate() {
            *q = lc[i] | (lc[i + 32] << 2) | (lc[i + 64] << 4) | (lc[i + 96] << 6);
        }
    }
}

/// ggml's `make_qkx2_quants`: asymmetric quantization of `x` to `0..=nmax` with a
/// weighted grid search over the scale, refitting scale and min by weighted least
/// squares at each step. Returns `(scale, the_min)` with `x ~ scale * L - the_min`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    l_aux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        // `min` may have been replaced by a better fit in an earlier step: ggml keeps
        // searching from the current best, not from the initial min.
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            l_aux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * l_aux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&l_aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (w = x²):
/// symmetric quantization to `-nmax..nmax-1` (stored with +nmax) with a search over 18
/// perturbed scales. Returns the scale.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            let lf = l as f32;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &v) in l_out.iter_mut().zip(x) {
                *o = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `GROUP_MAX_EPS`: groups whose largest magnitude is below it count as zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_q3_quants` with `do_rmse = true`: symmetric quantization to `-nmax..nmax-1`
/// followed by up to 5 rounds of coordinate-wise improvement of the x²-weighted fit.
/// Leaves `L + nmax` in `l_out` and returns the scale.
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = l as i8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = x[i] * x[i];
            let li = f32::from(l_out[i]);
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != i32::from(l_out[i]) {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for l in l_out.iter_mut() {
        *l += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q2_k(src: &[f32], dst: &mut [BlockQ2_K]) {
    const Q4SCALE: f32 = 15.0;
    for (xb, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        let x = load_block(xb);
        let mut l = [0u8; QK_K];
        let mut l_aux = [0u8; 16];
        let mut scales = [0f32; QK_K / 16];
        let mut mins = [0f32; QK_K / 16];
        // Both are >= 0 after deducting the min.
        let mut max_scale = 0f32;
        let mut max_min = 0f32;
        for (j, (xg, lg)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let mut weights = [0f32; 16];
            for (w, &v) in weights.iter_mut().zip(xg) {
                *w = v.abs();
            }
            let (s, m) = make_qkx2_quants(3, xg, &weights, lg, &mut l_aux, -0.5, 0.1, 15, true);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }

        let mut sc = [0u8; QK_K / 16];
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for (o, &s) in sc.iter_mut().zip(&scales) {
                // Truncating store into a byte, as ggml's `uint8_t = int`.
                *o = nearest_int(iscale * s) as u8;
            }
            y.d = f32_to_f16(max_scale / Q4SCALE);
        } else {
            y.d = f32_to_f16(0.0);
        }
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for (o, &m) in sc.iter_mut().zip(&mins) {
                *o |= (nearest_int(iscale * m) << 4) as u8;
            }
            y.dmin = f32_to_f16(max_min / Q4SCALE);
        } else {
            y.dmin = f32_to_f16(0.0);
        }
        y.scales = sc;

        // Requantize against the scales as they will really be decoded.
        let d_all = f16_to_f32(y.d);
        let m_all = f16_to_f32(y.dmin);
        for ((xg, lg), &s) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).zip(&sc) {
            let d = d_all * f32::from(s & 0xF);
            if d == 0.0 {
                continue;
            }
            let dm = m_all * f32::from(s >> 4);
            for (o, &v) in lg.iter_mut().zip(xg) {
                *o = nearest_int((v + dm) / d).clamp(0, 3) as u8;
            }
        }
        pack_2bit(&l, &mut y.qs);
    }
}

/// Reads Q3_K scale `j` back from the packed table (the value ggml requantizes with).
fn q3k_scale(s: &[u8; 12], j: usize) -> i8 {
    let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
    (lo | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q3_k(src: &[f32], dst: &mut [BlockQ3_K]) {
    for (xb, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        let x = load_block(xb);
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let mut max_scale = 0f32;
        let mut amax = 0f32;
        for (j, (xg, lg)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            scales[j] = make_q3_quants(4, xg, lg);
            if scales[j].abs() > amax {
                amax = scales[j].abs();
                max_scale = scales[j];
            }
        }

        let mut packed = [0u8; 12];
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &s) in scales.iter().enumerate() {
                // ggml stores nearest_int into an int8_t before clamping.
                let q = (nearest_int(iscale * s) as i8).clamp(-32, 31) + 32;
                let q = q as u8;
                if j < 8 {
                    packed[j] = q & 0xF;
                } else {
                    packed[j - 8] |= (q & 0xF) << 4;
                }
                packed[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
            }
            y.d = f32_to_f16(1.0 / iscale);
        } else {
            y.d = f32_to_f16(0.0);
        }
        y.scales = packed;

        let d_all = f16_to_f32(y.d);
        for (j, (xg, lg)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let d = d_all * f32::from(q3k_scale(&packed, j));
            if d == 0.0 {
                continue;
            }
            for (o, &v) in lg.iter_mut().zip(xg) {
                *o = (nearest_int(v / d).clamp(-4, 3) + 4) as i8;
            }
        }

        // Value j's high bit goes to bit j/32 of hmask[j % 32].
        y.hmask = [0; QK_K / 8];
        let mut low = [0u8; QK_K];
        for (j, (o, &q)) in low.iter_mut().zip(&l).enumerate() {
            let mut q = q as u8;
            if q > 3 {
                y.hmask[j % 32] |= 1 << (j / 32);
                q -= 4;
            }
            *o = q;
        }
        pack_2bit(&low, &mut y.qs);
    }
}

/// Shared part of Q4_K and Q5_K: per 32-value sub-block asymmetric fit, 6-bit scales and
/// mins against the super-block maxima, and requantization with the f16-rounded values.
/// Returns `(scales, d, dmin, L)` with L in `0..=nmax`.
fn quantize_k4_like(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ([u8; 12], [u8; 2], [u8; 2], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut l_aux = [0u8; 32];
    let mut scales = [0f32; QK_K / 32];
    let mut mins = [0f32; QK_K / 32];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for (j, (xs, ls)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(nmax, xs, &weights, ls, &mut l_aux, rmin, 0.1, nstep, false);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for (j, (&s, &m)) in scales.iter().zip(&mins).enumerate() {
        // ggml stores into uint8_t first (truncating), then clamps to 63.
        let ls = (nearest_int(inv_scale * s) as u8).min(63);
        let lm = (nearest_int(inv_min * m) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f32_to_f16(max_scale / 63.0);
    let dmin = f32_to_f16(max_min / 63.0);

    let d_all = f16_to_f32(d);
    let m_all = f16_to_f32(dmin);
    for (j, (xs, ls)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = m_all * f32::from(m);
        for (o, &v) in ls.iter_mut().zip(xs) {
            *o = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
        }
    }
    (packed, d, dmin, l)
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q4_k(src: &[f32], dst: &mut [BlockQ4_K]) {
    for (xb, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        let x = load_block(xb);
        let (scales, d, dmin, l) = quantize_k4_like(&x, 15, -1.0, 20);
        y.d = d;
        y.dmin = dmin;
        y.scales = scales;
        for (qc, lc) in y.qs.chunks_exact_mut(32).zip(l.chunks_exact(64)) {
            let (lo, hi) = lc.split_at(32);
            for ((q, &a), &b) in qc.iter_mut().zip(lo).zip(hi) {
                *q = a | (b << 4);
            }
        }
    }
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q5_k(src: &[f32], dst: &mut [BlockQ5_K]) {
    for (xb, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        let x = load_block(xb);
        let (scales, d, dmin, l) = quantize_k4_like(&x, 31, -0.5, 15);
        y.d = d;
        y.dmin = dmin;
        y.scales = scales;
        y.qh = [0; QK_K / 8];
        for (c, (qc, lc)) in
            y.qs.chunks_exact_mut(32)
                .zip(l.chunks_exact(64))
                .enumerate()
        {
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            let (lo, hi) = lc.split_at(32);
            for (((q, h), &a), &b) in qc.iter_mut().zip(y.qh.iter_mut()).zip(lo).zip(hi) {
                let (mut a, mut b) = (a, b);
                if a > 15 {
                    a -= 16;
                    *h |= m1;
                }
                if b > 15 {
                    b -= 16;
                    *h |= m2;
                }
                *q = a | (b << 4);
            }
        }
    }
}

/// `src.len() == dst.len() * 256`, checked by the caller.
pub fn quantize_q6_k(src: &[f32], dst: &mut [BlockQ6_K]) {
    for (xb, y) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        let x = load_block(xb);
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let mut max_scale = 0f32;
        let mut max_abs_scale = 0f32;
        for (j, (xg, lg)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let s = make_qx_quants_rmse1(32, xg, lg);
            scales[j] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            *y = bytemuck::Zeroable::zeroed();
            continue;
        }

        let iscale = -128.0 / max_scale;
        y.d = f32_to_f16(1.0 / iscale);
        for (o, &s) in y.scales.iter_mut().zip(&scales) {
            *o = nearest_int(iscale * s).min(127) as i8;
        }

        let d_all = f16_to_f32(y.d);
        for ((xg, lg), &s) in x
            .chunks_exact(16)
            .zip(l.chunks_exact_mut(16))
            .zip(&y.scales)
        {
            let d = d_all * f32::from(s);
            if d == 0.0 {
                continue;
            }
            for (o, &v) in lg.iter_mut().zip(xg) {
                *o = (nearest_int(v / d).clamp(-32, 31) + 32) as i8;
            }
        }

        let halves =
            y.ql.chunks_exact_mut(64)
                .zip(y.qh.chunks_exact_mut(32))
                .zip(l.chunks_exact(128));
        for ((ql, qh), lh) in halves {
            for i in 0..32 {
                let q = [
                    lh[i] as u8,
                    lh[i + 32] as u8,
                    lh[i + 64] as u8,
                    lh[i + 96] as u8,
                ];
                ql[i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4);
                ql[i + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4);
                qh[i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn h(x: f32) -> [u8; 2] {
        f32_to_f16(x)
    }

    /// Gaussian samples via Box-Muller (rand's core crate has no normal distribution).
    fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
                let u2: f64 = rng.gen();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }

    /// Test inputs: several distributions, an all-zero block, tiny values, outliers.
    fn test_rows() -> Vec<(&'static str, Vec<f32>)> {
        let mut rng = StdRng::seed_from_u64(0x6b71_7561_6e74);
        let n = 16 * QK_K;
        let uniform: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let gauss = gaussian(&mut rng, n);
        let positive: Vec<f32> = (0..n).map(|_| rng.gen_range(0.5f32..3.0)).collect();
        let mut outliers = gaussian(&mut rng, n);
        for v in outliers.iter_mut().step_by(97) {
            *v *= 40.0;
        }
        let mut mixed = gaussian(&mut rng, n);
        // Block 1 all zero, block 2 tiny, block 3 one huge spike, block 4 constant.
        mixed[QK_K..2 * QK_K].fill(0.0);
        mixed[2 * QK_K..3 * QK_K]
            .iter_mut()
            .for_each(|v| *v *= 1e-3);
        mixed[3 * QK_K + 77] = 1000.0;
        mixed[4 * QK_K..5 * QK_K].fill(-0.75);
        vec![
            ("uniform", uniform),
            ("gaussian", gauss),
            ("positive", positive),
            ("outliers", outliers),
            ("mixed", mixed),
        ]
    }

    /// Root mean square error relative to the root mean square of the input, per block.
    fn block_rel_rmse(x: &[f32], y: &[f32]) -> Vec<f64> {
        x.chunks_exact(QK_K)
            .zip(y.chunks_exact(QK_K))
            .map(|(a, b)| {
                let err: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(&p, &q)| (p as f64 - q as f64).powi(2))
                    .sum();
                let sig: f64 = a.iter().map(|&p| (p as f64).powi(2)).sum();
                if sig == 0.0 {
                    err
                } else {
                    (err / sig).sqrt()
                }
            })
            .collect()
    }

    macro_rules! roundtrip {
        ($q:ident, $dq:ident, $blk:ty, $x:expr) => {{
            let x: &[f32] = $x;
            let mut b: Vec<$blk> = vec![bytemuck::Zeroable::zeroed(); x.len() / QK_K];
            $q(x, &mut b);
            let mut y = vec![f32::NAN; x.len()];
            $dq(&b, &mut y);
            y
        }};
    }

    /// Per-block relative RMSE bounds (quantize -> dequantize) for Gaussian, uniform,
    /// shifted and outlier-laden data, about 1.2x what ggml's encoders reach on them.
    #[test]
    fn roundtrip_error_within_bounds() {
        for (name, x) in test_rows() {
            let check = |ty: &str, y: Vec<f32>, bound: f64| {
                for (b, e) in block_rel_rmse(&x, &y).into_iter().enumerate() {
                    assert!(
                        e <= bound,
                        "{ty} {name} block {b}: relative rmse {e} > {bound}"
                    );
                }
                // All-zero input blocks come back exactly zero.
                for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact(QK_K)) {
                    if xb.iter().all(|&v| v == 0.0) {
                        assert!(yb.iter().all(|&v| v == 0.0), "{ty} {name}: zero block");
                    }
                }
            };
            check(
                "Q2_K",
                roundtrip!(quantize_q2_k, dequantize_q2_k, BlockQ2_K, &x),
                0.42,
            );
            check(
                "Q3_K",
                roundtrip!(quantize_q3_k, dequantize_q3_k, BlockQ3_K, &x),
                0.26,
            );
            check(
                "Q4_K",
                roundtrip!(quantize_q4_k, dequantize_q4_k, BlockQ4_K, &x),
                0.14,
            );
            check(
                "Q5_K",
                roundtrip!(quantize_q5_k, dequantize_q5_k, BlockQ5_K, &x),
                0.07,
            );
            check(
                "Q6_K",
                roundtrip!(quantize_q6_k, dequantize_q6_k, BlockQ6_K, &x),
                0.05,
            );
            check(
                "Q8_K",
                roundtrip!(quantize_q8_k, dequantize_q8_k, BlockQ8_K, &x),
                0.045,
            );
        }
    }

    /// Averages on Gaussian data: each extra bit should roughly halve the error.
    #[test]
    fn gaussian_mean_error_by_type() {
        let mut rng = StdRng::seed_from_u64(7);
        let x = gaussian(&mut rng, 32 * QK_K);
        let mean = |y: Vec<f32>| {
            let v = block_rel_rmse(&x, &y);
            v.iter().sum::<f64>() / v.len() as f64
        };
        let e = [
            mean(roundtrip!(quantize_q2_k, dequantize_q2_k, BlockQ2_K, &x)),
            mean(roundtrip!(quantize_q3_k, dequantize_q3_k, BlockQ3_K, &x)),
            mean(roundtrip!(quantize_q4_k, dequantize_q4_k, BlockQ4_K, &x)),
            mean(roundtrip!(quantize_q5_k, dequantize_q5_k, BlockQ5_K, &x)),
            mean(roundtrip!(quantize_q6_k, dequantize_q6_k, BlockQ6_K, &x)),
            mean(roundtrip!(quantize_q8_k, dequantize_q8_k, BlockQ8_K, &x)),
        ];
        let bounds = [0.32, 0.17, 0.08, 0.04, 0.02, 0.01];
        for (i, (&e, &b)) in e.iter().zip(&bounds).enumerate() {
            assert!(e < b, "type #{i}: mean relative rmse {e} >= {b}");
        }
        assert!(
            e.windows(2).all(|w| w[1] < w[0]),
            "errors not decreasing: {e:?}"
        );
    }

    /// Magnitudes that underflow or overflow the f16 scales, or make ggml's searches
    /// evaluate `nearest_int` out of range, must not panic (debug build) and must give
    /// the same bytes twice.
    #[test]
    fn extreme_inputs_do_not_panic() {
        let mut rng = StdRng::seed_from_u64(99);
        let mut x = gaussian(&mut rng, 4 * QK_K);
        x[..QK_K].iter_mut().for_each(|v| *v *= 1e-7);
        x[QK_K + 3] = 1e30;
        x[2 * QK_K + 5] = -3e38;
        x[3 * QK_K..].iter_mut().for_each(|v| *v *= 1e5);
        let y = roundtrip!(quantize_q2_k, dequantize_q2_k, BlockQ2_K, &x);
        assert_eq!(y.len(), x.len());
        let _ = roundtrip!(quantize_q3_k, dequantize_q3_k, BlockQ3_K, &x);
        let _ = roundtrip!(quantize_q4_k, dequantize_q4_k, BlockQ4_K, &x);
        let _ = roundtrip!(quantize_q5_k, dequantize_q5_k, BlockQ5_K, &x);
        let _ = roundtrip!(quantize_q6_k, dequantize_q6_k, BlockQ6_K, &x);
        let _ = roundtrip!(quantize_q8_k, dequantize_q8_k, BlockQ8_K, &x);
        let mut a = vec![bytemuck::Zeroable::zeroed(); 4];
        let mut b = vec![bytemuck::Zeroable::zeroed(); 4];
        quantize_q4_k(&x, &mut a);
        quantize_q4_k(&x, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn q8_k_bsums_and_roundtrip() {
        for (name, x) in test_rows() {
            let mut b = vec![BlockQ8_K::default(); x.len() / QK_K];
            quantize_q8_k(&x, &mut b);
            let mut y = vec![0f32; x.len()];
            dequantize_q8_k(&b, &mut y);
            for (blk, (xb, yb)) in b.iter().zip(x.chunks_exact(QK_K).zip(y.chunks_exact(QK_K))) {
                for (g, &s) in blk.bsums.iter().enumerate() {
                    let sum: i32 = blk.qs[16 * g..16 * g + 16]
                        .iter()
                        .map(|&q| i32::from(q))
                        .sum();
                    assert_eq!(i32::from(s), sum, "{name}: bsums[{g}]");
                }
                // Quants stay in -127..=127 and each value is within half a step.
                assert!(blk.qs.iter().all(|&q| q != -128), "{name}: -128 used");
                for (&v, &r) in xb.iter().zip(yb) {
                    assert!((v - r).abs() <= blk.d.abs() * 0.5001, "{name}: {v} -> {r}");
                }
            }
        }
        // The largest magnitude maps to -127 (ggml's iscale = -127/max), so d < 0 here.
        let mut x = vec![0.5f32; QK_K];
        x[10] = 2.0;
        x[11] = -2.0;
        let mut b = [BlockQ8_K::default()];
        quantize_q8_k(&x, &mut b);
        assert_eq!(b[0].qs[10], -127);
        assert_eq!(b[0].qs[11], 127);
        assert_eq!(b[0].qs[0], -32); // nearest_int(-31.75)
        assert_eq!(b[0].d, -2.0 / 127.0);
        assert_eq!(b[0].bsums[0], -32 * 14 - 127 + 127);
        // All-zero input: zero block.
        quantize_q8_k(&[0.0; QK_K], &mut b);
        assert_eq!(b[0], BlockQ8_K::default());
    }

    #[test]
    fn dequantize_q8_k_hand_built() {
        let mut b = BlockQ8_K {
            d: 0.25,
            ..Default::default()
        };
        b.qs[0] = -128;
        b.qs[255] = 127;
        b.qs[7] = 3;
        let mut y = [1f32; QK_K];
        dequantize_q8_k(&[b], &mut y);
        assert_eq!(y[0], -32.0);
        assert_eq!(y[255], 31.75);
        assert_eq!(y[7], 0.75);
        assert_eq!(y[1], 0.0);
    }

    #[test]
    fn dequantize_q2_k_hand_built() {
        let mut b: BlockQ2_K = bytemuck::Zeroable::zeroed();
        b.d = h(0.5);
        b.dmin = h(0.25);
        // Low nibble scale, high nibble min, per 16-value group.
        b.scales[0] = 0x21; // sc 1, m 2
        b.scales[2] = 0x13; // sc 3, m 1
        b.scales[4] = 0x05; // sc 5, m 0
        b.scales[6] = 0xF2; // sc 2, m 15
        b.scales[8] = 0x11; // second half, group 0
        b.qs[0] = 0b11_10_01_00; // values 0, 32, 64, 96 = 0, 1, 2, 3
        b.qs[32] = 0x03; // value 128 = 3
        let mut y = [f32::NAN; QK_K];
        dequantize_q2_k(&[b], &mut y);
        assert_eq!(y[0], -0.5);
        assert_eq!(y[1], -0.5);
        assert_eq!(y[32], 1.25);
        assert_eq!(y[64], 5.0);
        assert_eq!(y[96], -0.75);
        assert_eq!(y[128], 1.25);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[255], 0.0);
    }

    #[test]
    fn dequantize_q3_k_hand_built() {
        let mut b: BlockQ3_K = bytemuck::Zeroable::zeroed();
        b.d = h(0.5);
        // Scales (stored +32): j0 = 1, j5 = -3, j10 = 31, j15 = -32, all others 0.
        b.scales = [0x01, 0, 0xF0, 0, 0, 0x0D, 0, 0, 0xAA, 0xA6, 0xBA, 0x2A];
        let mut want_sc = [0i8; 16];
        want_sc[0] = 1;
        want_sc[5] = -3;
        want_sc[10] = 31;
        want_sc[15] = -32;
        assert_eq!(q3k_scales(&b.scales), want_sc);
        for (j, &s) in want_sc.iter().enumerate() {
            assert_eq!(q3k_scale(&b.scales, j), s);
        }
        b.hmask = [0xFF; 32]; // high bit set: no -4 offset
        b.qs[0] = 0x03; // value 0: q 3
        b.qs[16] = 0b01_0000; // value 80 (group 5): q 1 ...
        b.hmask[16] &= !(1 << 2); // ... high bit clear: 1 - 4
        b.qs[37] = 0b10_00; // value 165 (scale 10): q 2
        b.hmask[31] &= !(1 << 7); // value 255 (scale 15): 0 - 4
        let mut y = [f32::NAN; QK_K];
        dequantize_q3_k(&[b], &mut y);
        assert_eq!(y[0], 1.5);
        assert_eq!(y[80], 4.5);
        assert_eq!(y[165], 31.0);
        assert_eq!(y[255], 64.0);
        for (i, &v) in y.iter().enumerate() {
            if ![0, 80, 165, 255].contains(&i) {
                assert_eq!(v, 0.0, "value {i}");
            }
        }
    }

    /// 6-bit scales [1, 2, 3, 63, 5, 40, 7, 8] and mins [0, 1, 2, 3, 63, 5, 6, 33], packed.
    const K4_SCALES: [u8; 12] = [1, 130, 3, 63, 192, 1, 2, 131, 0xF5, 0x58, 0x67, 0x18];
    const K4_SC: [u8; 8] = [1, 2, 3, 63, 5, 40, 7, 8];
    const K4_M: [u8; 8] = [0, 1, 2, 3, 63, 5, 6, 33];

    #[test]
    fn scale_min_k4_unpacking() {
        for j in 0..8 {
            assert_eq!(
                get_scale_min_k4(j, &K4_SCALES),
                (K4_SC[j], K4_M[j]),
                "sub-block {j}"
            );
        }
    }

    #[test]
    fn dequantize_q4_k_hand_built() {
        let mut b: BlockQ4_K = bytemuck::Zeroable::zeroed();
        b.d = h(0.5);
        b.dmin = h(0.25);
        b.scales = K4_SCALES;
        b.qs[0] = 0xF3; // value 0 = 3 (sub-block 0), value 32 = 15 (sub-block 1)
        b.qs[71] = 0x9A; // value 135 = 10 (sub-block 4), value 167 = 9 (sub-block 5)
        b.qs[127] = 0x40; // value 255 = 4 (sub-block 7)
        let mut y = [f32::NAN; QK_K];
        dequantize_q4_k(&[b], &mut y);
        assert_eq!(y[0], 1.5);
        assert_eq!(y[32], 14.75);
        assert_eq!(y[135], 9.25);
        assert_eq!(y[167], 178.75);
        assert_eq!(y[255], 7.75);
        assert_eq!(y[1], 0.0);
        assert_eq!(y[64 * 3 + 1], -0.25 * 6.0); // sub-block 6, q 0
    }

    #[test]
    fn dequantize_q5_k_hand_built() {
        let mut b: BlockQ5_K = bytemuck::Zeroable::zeroed();
        b.d = h(0.5);
        b.dmin = h(0.25);
        b.scales = K4_SCALES;
        b.qs[0] = 0xF3;
        b.qh[0] = 0b01; // value 0 gets +16, value 32 does not
        b.qs[71] = 0x9A;
        b.qh[7] = 1 << 5; // value 167 (chunk 2, high half) gets +16
        b.qh[31] = 1 << 7; // value 255 = 0 + 16
        let mut y = [f32::NAN; QK_K];
        dequantize_q5_k(&[b], &mut y);
        assert_eq!(y[0], 9.5);
        assert_eq!(y[32], 14.75);
        assert_eq!(y[135], 9.25);
        assert_eq!(y[167], 498.75);
        assert_eq!(y[255], 55.75);
        assert_eq!(y[224], -8.25); // sub-block 7, q 0
    }

    #[test]
    fn dequantize_q6_k_hand_built() {
        let mut b: BlockQ6_K = bytemuck::Zeroable::zeroed();
        b.d = h(0.5);
        b.scales[0] = 1;
        b.scales[2] = -2;
        b.scales[4] = 3;
        b.scales[6] = 127;
        b.scales[9] = -128;
        b.ql[0] = 0xF5; // value 0 low 5, value 64 low 15
        b.ql[32] = 0x10; // value 32 low 0, value 96 low 1
        b.qh[0] = 0x72; // high bits: value 0 = 2, 32 = 0, 64 = 3, 96 = 1
        b.ql[80] = 0x0F; // second half, l = 16: value 144 low 15
        b.qh[48] = 3; // value 144 high 3
        let mut y = [f32::NAN; QK_K];
        dequantize_q6_k(&[b], &mut y);
        assert_eq!(y[0], 2.5); // 0.5 * 1 * (37 - 32)
        assert_eq!(y[32], 32.0); // 0.5 * -2 * (0 - 32)
        assert_eq!(y[64], 46.5); // 0.5 * 3 * (63 - 32)
        assert_eq!(y[96], -952.5); // 0.5 * 127 * (17 - 32)
        assert_eq!(y[144], -1984.0); // 0.5 * -128 * (63 - 32)
        assert_eq!(y[1], -16.0); // 0.5 * 1 * (0 - 32)
        assert_eq!(y[16], 0.0); // scale 1 is 0
    }

    /// Quantizing what a block decodes to must find a block that decodes to the same
    /// values for exactly representable inputs (scales are fitted, so only check error).
    #[test]
    fn exactly_representable_input_roundtrips_closely() {
        let mut b: BlockQ4_K = bytemuck::Zeroable::zeroed();
        b.d = h(0.5);
        b.dmin = h(0.25);
        b.scales = K4_SCALES;
        for (i, q) in b.qs.iter_mut().enumerate() {
            *q = (i * 37 % 256) as u8;
        }
        let mut x = [0f32; QK_K];
        dequantize_q4_k(&[b], &mut x);
        let y = roundtrip!(quantize_q4_k, dequantize_q4_k, BlockQ4_K, &x);
        let e = block_rel_rmse(&x, &y)[0];
        assert!(e < 0.02, "relative rmse {e}");
    }
}
