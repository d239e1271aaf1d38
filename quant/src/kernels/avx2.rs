//! x86_64 AVX2 + FMA + F16C kernels for every weight type.
//!
//! One weight row per pass: on the target (Zen 4 VM) several rows walked in lockstep
//! (4-row tiles sharing activation loads) streamed from DRAM at about half the speed
//! of one row at a time, so each thread reads exactly one sequential stream (numbers in
//! BENCHMARKS.md). Two accumulators per row (even/odd blocks) keep the FMA latency
//! chain off the critical path.

// Block formats index several tables with one position; explicit indices read better.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{Activations, RowsFn};
use crate::blocks::*;
use crate::kernels::scalar::{k4_scales_mins, q3_k_scales};
use crate::{GgmlType, QK, QK_K};

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
        _ => return None,
    })
}

/// Checks the invariants the raw-pointer kernels rely on (guaranteed by the
/// public entry points; a failure here is a bug in this module, not bad input).
fn check(t: GgmlType, w: &[u8], rb: usize, a: &Activations, out: &[f32]) -> usize {
    let n = rb / t.type_size() * t.block_size();
    let ok = w.len() == out.len() * rb
        && rb == n / t.block_size() * t.type_size()
        && match super::vec_dot_type(t) {
            GgmlType::Q8_0 => a.qs.len() >= n && a.d.len() * QK >= n && a.sum.len() * QK >= n,
            GgmlType::Q8_1 => a.qs.len() >= n && a.d.len() * QK >= n && a.s.len() * QK >= n,
            GgmlType::Q8_K => a.q8_k.len() * QK_K >= n,
            _ => a.f.len() >= n,
        };
    assert!(ok, "kernel invariant violated for {t}");
    n / t.block_size()
}

/// One row per call of `$k` (an `unsafe fn(row, nb, &Activations) -> f32`).
macro_rules! rows {
    ($name:ident, $t:expr, $k:ident) => {
        fn $name(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
            let nb = check($t, w, rb, a, out);
            for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                // SAFETY: rows_fn hands this kernel out only at Level::Avx2 or above,
                // which requires runtime detection of avx2, fma and f16c; sizes checked above.
                *o = unsafe { $k(row.as_ptr(), nb, a) };
            }
        }
    };
}

rows!(rows_f32, GgmlType::F32, k_f32);
rows!(rows_f16, GgmlType::F16, k_f16);
rows!(rows_bf16, GgmlType::BF16, k_bf16);
rows!(rows_q4_0, GgmlType::Q4_0, k_q4_0);
rows!(rows_q4_1, GgmlType::Q4_1, k_q4_1);
rows!(rows_q5_0, GgmlType::Q5_0, k_q5_0);
rows!(rows_q5_1, GgmlType::Q5_1, k_q5_1);
rows!(rows_q8_0, GgmlType::Q8_0, k_q8_0);
rows!(rows_q2_k, GgmlType::Q2_K, k_q2_k);
rows!(rows_q3_k, GgmlType::Q3_K, k_q3_k);
rows!(rows_q4_k, GgmlType::Q4_K, k_q4_k);
rows!(rows_q5_k, GgmlType::Q5_K, k_q5_k);
rows!(rows_q6_k, GgmlType::Q6_K, k_q6_k);

// ---- helpers ----------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_ps128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One little-endian f16 at `p` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // A broadcast, not a lane insert: LLVM lowers an insert to `vpinsrw` merging into
    // whatever register it likes (often an accumulator), a false dependency that
    // serialized the whole block loop behind the previous FMA.
    let h = (p as *const i16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h)))
}

/// 16 packed nibbles -> 32 bytes: low nibbles (values 0..16) then high (16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(q, 4), q),
        _mm256_set1_epi8(0x0F),
    )
}

/// Byte j = 0xFF where bit j of `x` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bytes_from_bits(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bit = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, bit), _mm256_set1_epi64x(-1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn loadu(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

// ---- float weights ------------------------------------------------------------------

/// Shared body of the float kernels: `$load(ptr, i)` widens 8 weights at element i.
/// Four accumulators (32 elements per step) hide the FMA latency.
macro_rules! float_kernel {
    ($name:ident, $esize:literal, $load:ident, $one:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(p: *const u8, n: usize, a: &Activations) -> f32 {
            let x = a.f.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, ak) in acc.iter_mut().enumerate() {
                    let j = i + 8 * k;
                    *ak = _mm256_fmadd_ps($load(p, j), _mm256_loadu_ps(x.add(j)), *ak);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(p, i), _mm256_loadu_ps(x.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum_ps(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            for j in i..n {
                s += $one(p.add(j * $esize)) * *x.add(j);
            }
            s
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f32(p: *const u8, i: usize) -> __m256 {
    _mm256_loadu_ps((p as *const f32).add(i))
}
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_f32(p: *const u8) -> f32 {
    (p as *const f32).read_unaligned()
}
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f16(p: *const u8, i: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i))
}
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_bf16(p: *const u8, i: usize) -> __m256 {
    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
    _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
}
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_bf16(p: *const u8) -> f32 {
    f32::from_bits(((p as *const u16).read_unaligned() as u32) << 16)
}

float_kernel!(k_f32, 4, ld_f32, one_f32);
float_kernel!(k_f16, 2, ld_f16, f16_at);
float_kernel!(k_bf16, 2, ld_bf16, one_bf16);

// ---- legacy quants ------------------------------------------------------------------

/// Drives a legacy-quant block kernel over one row: `$blk(b, acc)` adds block b's
/// scaled dot into `acc`; even and odd blocks use separate accumulators.
macro_rules! legacy_loop {
    ($nb:expr, |$b:ident, $acc:ident| $body:block) => {{
        let mut accs = [_mm256_setzero_ps(); 2];
        for $b in 0..$nb {
            let $acc = &mut accs[$b & 1];
            $body
        }
        hsum_ps(_mm256_add_ps(accs[0], accs[1]))
    }};
}

/// Q4_0: sum((q - 8) * y) = maddubs(q, y) - maddubs(8, y).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q4_0(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let off = _mm256_set1_epi8(8);
    legacy_loop!(nb, |b, acc| {
        let blk = w.add(18 * b);
        let y = loadu(a.qs.as_ptr().add(QK * b));
        let q = nibbles(blk.add(2));
        let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), _mm256_maddubs_epi16(off, y));
        let p = _mm256_madd_epi16(p16, ones);
        let d = _mm256_set1_ps(f16_at(blk) * *a.d.get_unchecked(b));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, *acc);
    })
}

/// Q4_1: unsigned nibbles times y, plus m * s per block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q4_1(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut ms = 0f32;
    let s = legacy_loop!(nb, |b, acc| {
        let blk = w.add(20 * b);
        let y = loadu(a.qs.as_ptr().add(QK * b));
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(blk.add(4)), y), ones);
        let d = _mm256_set1_ps(f16_at(blk) * *a.d.get_unchecked(b));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, *acc);
        ms += f16_at(blk.add(2)) * *a.s.get_unchecked(b);
    });
    s + ms
}

/// Q5_0: 5-bit unsigned q = nibble | bit << 4; offset 16 handled like Q4_0's 8.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q5_0(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let off = _mm256_set1_epi8(16);
    let b4 = _mm256_set1_epi8(0x10);
    legacy_loop!(nb, |b, acc| {
        let blk = w.add(22 * b);
        let y = loadu(a.qs.as_ptr().add(QK * b));
        let qh = (blk.add(2) as *const u32).read_unaligned();
        let q = _mm256_or_si256(
            nibbles(blk.add(6)),
            _mm256_and_si256(bytes_from_bits(qh), b4),
        );
        let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), _mm256_maddubs_epi16(off, y));
        let p = _mm256_madd_epi16(p16, ones);
        let d = _mm256_set1_ps(f16_at(blk) * *a.d.get_unchecked(b));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, *acc);
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q5_1(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let b4 = _mm256_set1_epi8(0x10);
    let mut ms = 0f32;
    let s = legacy_loop!(nb, |b, acc| {
        let blk = w.add(24 * b);
        let y = loadu(a.qs.as_ptr().add(QK * b));
        let qh = (blk.add(4) as *const u32).read_unaligned();
        let q = _mm256_or_si256(
            nibbles(blk.add(8)),
            _mm256_and_si256(bytes_from_bits(qh), b4),
        );
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones);
        let d = _mm256_set1_ps(f16_at(blk) * *a.d.get_unchecked(b));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, *acc);
        ms += f16_at(blk.add(2)) * *a.s.get_unchecked(b);
    });
    s + ms
}

/// Q8_0: signed x signed via |w| * (y with w's sign) (|w| <= 128 fits maddubs).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q8_0(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let ones = _mm256_set1_epi16(1);
    legacy_loop!(nb, |b, acc| {
        let blk = w.add(34 * b);
        let y = loadu(a.qs.as_ptr().add(QK * b));
        let q = loadu(blk.add(2) as *const i8);
        let p = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q)),
            ones,
        );
        let d = _mm256_set1_ps(f16_at(blk) * *a.d.get_unchecked(b));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, *acc);
    })
}

// ---- k-quants -----------------------------------------------------------------------

/// `_mm256_shuffle_epi8` masks over 8 i16 scales (same in both 128-bit lanes):
/// mask j puts scale 2j in the low 16 bytes and scale 2j+1 in the high 16 bytes.
const fn pair_shuffles() -> [[u8; 32]; 4] {
    let mut m = [[0u8; 32]; 4];
    let mut j = 0;
    while j < 4 {
        let mut b = 0;
        while b < 32 {
            let s = if b < 16 { 2 * j } else { 2 * j + 1 };
            m[j][b] = (2 * s + (b & 1)) as u8;
            b += 1;
        }
        j += 1;
    }
    m
}
static PAIR_SHUF: [[u8; 32]; 4] = pair_shuffles();

/// Mask i broadcasts i16 scale i over all 16 lanes.
const fn splat_shuffles() -> [[u8; 32]; 8] {
    let mut m = [[0u8; 32]; 8];
    let mut i = 0;
    while i < 8 {
        let mut b = 0;
        while b < 32 {
            m[i][b] = (2 * i + (b & 1)) as u8;
            b += 1;
        }
        i += 1;
    }
    m
}
static SPLAT_SHUF: [[u8; 32]; 8] = splat_shuffles();

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn shuf(v: __m256i, m: &[u8; 32]) -> __m256i {
    _mm256_shuffle_epi8(v, _mm256_loadu_si256(m.as_ptr() as *const __m256i))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q2_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    for b in 0..nb {
        let x = &*(w.add(84 * b) as *const BlockQ2_K);
        let y = a.q8_k.get_unchecked(b);
        let dall = y.d * f16_at(x.d.as_ptr());
        let dmin = y.d * f16_at(x.dmin.as_ptr());
        let sc = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), m4));
        let prod = _mm256_madd_epi16(mins, _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i));
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(prod), accm);
        let scales = _mm256_cvtepu8_epi16(_mm_and_si128(sc, m4));
        let halves = [
            _mm256_permute2x128_si256(scales, scales, 0x00),
            _mm256_permute2x128_si256(scales, scales, 0x11),
        ];
        let mut sumi = _mm256_setzero_si256();
        for (n, scs) in halves.iter().enumerate() {
            let q2 = _mm256_loadu_si256(x.qs.as_ptr().add(32 * n) as *const __m256i);
            for j in 0..4 {
                let q = _mm256_and_si256(_mm256_srl_epi16(q2, _mm_cvtsi32_si128(2 * j as i32)), m3);
                let yv = loadu(y.qs.as_ptr().add(128 * n + 32 * j));
                let p = _mm256_maddubs_epi16(q, yv);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(shuf(*scs, &PAIR_SHUF[j]), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dall), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - hsum_ps(accm)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q3_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let x = &*(w.add(110 * b) as *const BlockQ3_K);
        let y = a.q8_k.get_unchecked(b);
        let d = y.d * f16_at(x.d.as_ptr());
        let s8 = q3_k_scales(&x.scales);
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(s8.as_ptr() as *const __m128i));
        let halves = [
            _mm256_permute2x128_si256(scales, scales, 0x00),
            _mm256_permute2x128_si256(scales, scales, 0x11),
        ];
        let hbits = _mm256_loadu_si256(x.hmask.as_ptr() as *const __m256i);
        let mut sumi = _mm256_setzero_si256();
        for (n, scs) in halves.iter().enumerate() {
            let q3 = _mm256_loadu_si256(x.qs.as_ptr().add(32 * n) as *const __m256i);
            for j in 0..4 {
                let ql =
                    _mm256_and_si256(_mm256_srl_epi16(q3, _mm_cvtsi32_si128(2 * j as i32)), m3);
                let bit = _mm256_set1_epi8((1u8 << (4 * n + j)) as i8);
                // 4 where the high bit is clear: value = ql - 4 * !h
                let h4 = _mm256_and_si256(
                    _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bit), _mm256_setzero_si256()),
                    four,
                );
                let yv = loadu(y.qs.as_ptr().add(128 * n + 32 * j));
                let p =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(ql, yv), _mm256_maddubs_epi16(h4, yv));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(shuf(*scs, &PAIR_SHUF[j]), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// Q4_K/Q5_K shared part: scales as i16 broadcast over both lanes, and the min
/// correction sum_j m_j * (bsum_2j + bsum_2j+1) accumulated (times dmin) into `accm`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_prep(scales: &[u8; 12], y: &BlockQ8_K, dmin: f32, accm: &mut __m128) -> __m256i {
    let (sc, m) = k4_scales_mins(scales);
    let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr() as *const __m128i));
    let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
    let pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    let prod = _mm_madd_epi16(mins, pairs);
    *accm = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), *accm);
    _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(
        sc.as_ptr() as *const __m128i
    )))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q4_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm_setzero_ps();
    for b in 0..nb {
        let x = &*(w.add(144 * b) as *const BlockQ4_K);
        let y = a.q8_k.get_unchecked(b);
        let d = y.d * f16_at(x.d.as_ptr());
        let dmin = y.d * f16_at(x.dmin.as_ptr());
        let scs = k4_prep(&x.scales, y, dmin, &mut accm);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q4 = _mm256_loadu_si256(x.qs.as_ptr().add(32 * c) as *const __m256i);
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            let plo = _mm256_maddubs_epi16(lo, loadu(y.qs.as_ptr().add(64 * c)));
            let phi = _mm256_maddubs_epi16(hi, loadu(y.qs.as_ptr().add(64 * c + 32)));
            let plo = _mm256_madd_epi16(shuf(scs, &SPLAT_SHUF[2 * c]), plo);
            let phi = _mm256_madd_epi16(shuf(scs, &SPLAT_SHUF[2 * c + 1]), phi);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - hsum_ps128(accm)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q5_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let m1 = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm_setzero_ps();
    for b in 0..nb {
        let x = &*(w.add(176 * b) as *const BlockQ5_K);
        let y = a.q8_k.get_unchecked(b);
        let d = y.d * f16_at(x.d.as_ptr());
        let dmin = y.d * f16_at(x.dmin.as_ptr());
        let scs = k4_prep(&x.scales, y, dmin, &mut accm);
        let hbits = _mm256_loadu_si256(x.qh.as_ptr() as *const __m256i);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q4 = _mm256_loadu_si256(x.qs.as_ptr().add(32 * c) as *const __m256i);
            let h0 = _mm256_and_si256(_mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * c as i32)), m1);
            let h1 = _mm256_and_si256(
                _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * c as i32 + 1)),
                m1,
            );
            let lo = _mm256_or_si256(_mm256_and_si256(q4, m4), _mm256_slli_epi16(h0, 4));
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4),
                _mm256_slli_epi16(h1, 4),
            );
            let plo = _mm256_maddubs_epi16(lo, loadu(y.qs.as_ptr().add(64 * c)));
            let phi = _mm256_maddubs_epi16(hi, loadu(y.qs.as_ptr().add(64 * c + 32)));
            let plo = _mm256_madd_epi16(shuf(scs, &SPLAT_SHUF[2 * c]), plo);
            let phi = _mm256_madd_epi16(shuf(scs, &SPLAT_SHUF[2 * c + 1]), phi);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - hsum_ps128(accm)
}

/// `_mm_shuffle_epi8` masks over Q6_K's 16 i8 scales: mask i = [2i x8, 2i+1 x8].
const fn q6_shuffles() -> [[u8; 16]; 8] {
    let mut m = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let mut b = 0;
        while b < 16 {
            m[i][b] = (2 * i + b / 8) as u8;
            b += 1;
        }
        i += 1;
    }
    m
}
static Q6_SHUF: [[u8; 16]; 8] = q6_shuffles();

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_q6_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let x = &*(w.add(210 * b) as *const BlockQ6_K);
        let y = a.q8_k.get_unchecked(b);
        let d = y.d * f16_at(x.d.as_ptr());
        let scales = _mm_loadu_si128(x.scales.as_ptr() as *const __m128i);
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            let ql1 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * n) as *const __m256i);
            let ql2 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * n + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(x.qh.as_ptr().add(32 * n) as *const __m256i);
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql2, m4),
                    _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_slli_epi16(m2, 2)), 2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_and_si256(qh, _mm256_slli_epi16(m2, 4)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql2, 4), m4),
                    _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_slli_epi16(m2, 6)), 2),
                ),
            ];
            for (k, qk) in q.iter().enumerate() {
                let yv = loadu(y.qs.as_ptr().add(128 * n + 32 * k));
                let p =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(*qk, yv), _mm256_maddubs_epi16(m32, yv));
                let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
                    scales,
                    _mm_loadu_si128(Q6_SHUF[4 * n + k].as_ptr() as *const __m128i),
                ));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s, p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

// ---- activation quantization ---------------------------------------------------------
//
// Bit-exact SIMD versions of the reference activation quantizers in `legacy` and
// `kquants` (tested byte for byte): activation quantization runs once per matvec on
// one thread, so at 2 threads its serial time matters.

/// Q8_0 (`q8_1 == false`) or Q8_1 activations of `x` (a whole number of blocks) into
/// `a`, reusing its buffers: byte-identical to `legacy::quantize_q8_0`/
/// `quantize_q8_1`, with the SIMD-side arrays (contiguous quants, f32 scales, sums)
/// filled in the same pass. Leaves `a.prep` alone.
pub(super) fn activations_q8_into(x: &[f32], q8_1: bool, a: &mut Activations) {
    let nb = x.len() / QK;
    assert_eq!(x.len(), nb * QK);
    a.ty = Some(if q8_1 { GgmlType::Q8_1 } else { GgmlType::Q8_0 });
    a.n = x.len();
    a.qs.resize(x.len());
    for v in [&mut a.f, &mut a.d, &mut a.s] {
        v.clear();
    }
    a.sum.clear();
    a.q8_0.clear();
    a.q8_1.clear();
    a.q8_k.clear();
    if q8_1 {
        a.q8_1.resize(nb, BlockQ8_1::default());
    } else {
        a.q8_0.resize(nb, BlockQ8_0::default());
    }
    let planar = a.qs.as_mut_ptr();
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        // SAFETY: only called at a detected Level::Avx2 or above; 32 floats in, 32
        // bytes out at offset 32 * b < x.len() of the planar buffer.
        let (sum, dh, dr, sh, sr) = unsafe {
            let (d, sum) = q8_block(xb.as_ptr(), planar.add(QK * b));
            let (dh, dr) = to_f16(d);
            let (sh, sr) = if q8_1 {
                to_f16(sum as f32 * d)
            } else {
                (0, 0.0)
            };
            (sum, dh, dr, sh, sr)
        };
        let qs = &a.qs.as_mut_slice()[QK * b..QK * b + QK];
        if q8_1 {
            let y = &mut a.q8_1[b];
            y.qs.copy_from_slice(qs);
            y.d = dh.to_le_bytes();
            y.s = sh.to_le_bytes();
            a.s.push(sr);
        } else {
            let y = &mut a.q8_0[b];
            y.qs.copy_from_slice(qs);
            y.d = dh.to_le_bytes();
            a.sum.push(sum);
        }
        a.d.push(dr);
    }
}

/// f32 -> f16 bits (round to nearest even, as `blocks::f32_to_f16`) and back to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn to_f16(v: f32) -> (u16, f32) {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
    (
        _mm_extract_epi16::<0>(h) as u16,
        _mm_cvtss_f32(_mm_cvtph_ps(h)),
    )
}

/// Q8_K blocks of `x`, as `kquants::quantize_q8_k`.
pub(super) fn quantize_q8_k(x: &[f32], dst: &mut [BlockQ8_K]) {
    assert_eq!(x.len(), dst.len() * QK_K);
    for (xb, y) in x.chunks_exact(QK_K).zip(dst.iter_mut()) {
        // SAFETY: as above; 256 floats.
        unsafe { q8_k_block(xb.as_ptr(), y) };
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax_ps(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// Four vectors of 8 i32 (values within i8 range) -> 32 i8 in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_i32x32(i: &[__m256i; 4], out: *mut i8) {
    let a = _mm256_packs_epi32(i[0], i[1]);
    let b = _mm256_packs_epi32(i[2], i[3]);
    let c = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(a, b),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    );
    _mm256_storeu_si256(out as *mut __m256i, c);
}

/// One Q8_0/Q8_1 block: d = amax / 127, q = round-half-away(x / d). Returns (d, sum q).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_block(x: *const f32, qs: *mut i8) -> (f32, i32) {
    let sign = _mm256_set1_ps(-0.0);
    let v = [
        _mm256_loadu_ps(x),
        _mm256_loadu_ps(x.add(8)),
        _mm256_loadu_ps(x.add(16)),
        _mm256_loadu_ps(x.add(24)),
    ];
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
    );
    let d = hmax_ps(m) / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let mut q = [_mm256_setzero_si256(); 4];
    for k in 0..4 {
        let p = _mm256_mul_ps(v[k], id);
        // roundf: truncate, then step away from zero when |fraction| >= 0.5 (exact ops)
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
        let step = _mm256_or_ps(_mm256_and_ps(p, sign), one);
        let adj = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), step);
        q[k] = _mm256_cvttps_epi32(_mm256_add_ps(t, adj));
    }
    pack_i32x32(&q, qs);
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
    (d, _mm_cvtsi128_si32(s))
}

/// One Q8_K block: iscale = -127 / (signed value of the first largest |x|),
/// q = min(127, round-half-even(iscale * x)), d = 1 / iscale, bsums of 16.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_k_block(x: *const f32, y: &mut BlockQ8_K) {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for k in 0..32 {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x.add(8 * k))));
    }
    let amax = hmax_ps(m);
    *y = BlockQ8_K::default();
    if amax == 0.0 {
        return;
    }
    let am = _mm256_set1_ps(amax);
    let mut max = amax;
    for k in 0..32 {
        let v = _mm256_loadu_ps(x.add(8 * k));
        let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), am));
        if hit != 0 {
            max = *x.add(8 * k + hit.trailing_zeros() as usize);
            break;
        }
    }
    let iscale = -127.0 / max;
    let is = _mm256_set1_ps(iscale);
    let lim = _mm256_set1_epi32(127);
    for c in 0..8 {
        let mut q = [_mm256_setzero_si256(); 4];
        for (k, qk) in q.iter_mut().enumerate() {
            let p = _mm256_mul_ps(is, _mm256_loadu_ps(x.add(32 * c + 8 * k)));
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
            *qk = _mm256_min_epi32(_mm256_cvtps_epi32(r), lim);
        }
        pack_i32x32(&q, y.qs.as_mut_ptr().add(32 * c));
    }
    for (s, g) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    y.d = 1.0 / iscale;
}
