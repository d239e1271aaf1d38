//! Shared helpers for graft's benchmarks: synthetic weights, a memory read-bandwidth
//! probe, and the f32-activation kernels used only to measure the activation-format
//! decision (graft's kernels quantize activations to 8 bits; see BENCHMARKS.md).

use graft_quant::{blocks::f32_to_f16, GgmlType};
use rayon::prelude::*;

/// Byte offsets of the f16 scale fields inside one block of `t`.
fn f16_fields(t: GgmlType) -> &'static [usize] {
    match t {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// A small deterministic PRNG (xorshift64*): benches need bytes, not statistics.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `rows` x `cols` weights of type `t`: random quant bits with small finite scales
/// (kernel speed does not depend on the values; this is much faster than quantizing).
pub fn random_weights(t: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let rb = t
        .row_size(cols)
        .expect("cols must be a whole number of blocks");
    let mut rng = XorShift::new(seed);
    let mut w = vec![0u8; rows * rb];
    for c in w.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    match t {
        GgmlType::F32 => w
            .chunks_exact_mut(4)
            .for_each(|c| c.copy_from_slice(&rng.next_f32().to_le_bytes())),
        GgmlType::F16 | GgmlType::BF16 => w.chunks_exact_mut(2).for_each(|c| {
            let v = rng.next_f32();
            let bits = if t == GgmlType::F16 {
                u16::from_le_bytes(f32_to_f16(v))
            } else {
                (v.to_bits() >> 16) as u16
            };
            c.copy_from_slice(&bits.to_le_bytes())
        }),
        _ => {
            for blk in w.chunks_exact_mut(t.type_size()) {
                for &o in f16_fields(t) {
                    blk[o..o + 2].copy_from_slice(&f32_to_f16(rng.next_f32() * 0.05));
                }
            }
        }
    }
    w
}

pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    (0..n).map(|_| rng.next_f32()).collect()
}

/// Sums `buf` as u64 lanes with 4 independent 256-bit (or 512-bit) accumulators: a
/// pure sequential read stream, the ceiling for any kernel that reads weights once.
pub fn sum_bytes(buf: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f detected just above.
        return unsafe { x86::sum_avx512(buf) };
    } else if is_x86_feature_detected!("avx2") {
        // SAFETY: avx2 detected just above.
        return unsafe { x86::sum_avx2(buf) };
    }
    sum_bytes_scalar(buf)
}

/// The sum [`sum_bytes`] computes: little-endian u64 words, the last zero-padded.
pub fn sum_bytes_scalar(buf: &[u8]) -> u64 {
    buf.chunks(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .fold(0u64, u64::wrapping_add)
}

/// [`sum_bytes`] split into one contiguous part per thread of the current rayon pool.
pub fn sum_bytes_par(buf: &[u8]) -> u64 {
    let parts = rayon::current_num_threads().max(1);
    let chunk = buf.len().div_ceil(parts).div_ceil(64) * 64;
    buf.par_chunks(chunk.max(64))
        .map(sum_bytes)
        .reduce(|| 0, u64::wrapping_add)
}

/// Matvec with f32 activations (the alternative to 8-bit activations), for Q4_0 and
/// Q8_0 weights, AVX2, one row at a time like graft's int8 kernels. Measurement only.
/// Returns false if the CPU lacks AVX2/FMA/F16C or the type is not Q4_0/Q8_0.
pub fn matvec_f32_act(
    t: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let rb = match t.row_size(cols) {
            Ok(rb) => rb,
            Err(_) => return false,
        };
        if !ok
            || !matches!(t, GgmlType::Q4_0 | GgmlType::Q8_0)
            || w.len() != rows * rb
            || x.len() != cols
            || y.len() != rows
            || cols == 0
        {
            return false;
        }
        // per-block sums of x, for Q4_0's -8 offset
        let xsum: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
        let threads = rayon::current_num_threads().max(1);
        let chunk = rows.div_ceil(threads * 4).div_ceil(4) * 4;
        y.par_chunks_mut(chunk)
            .zip(w.par_chunks(chunk * rb))
            .for_each(|(yc, wc)| {
                // SAFETY: avx2/fma/f16c detected above; sizes checked above.
                unsafe { x86::f32_act_rows(t, wc, rb, x, &xsum, yc) }
            });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (t, w, rows, cols, x, y);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use graft_quant::GgmlType;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn sum_avx2(buf: &[u8]) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 4];
        let main = buf.len() / 128 * 128;
        let p = buf.as_ptr();
        let mut i = 0;
        while i < main {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(i + 32 * k) as *const __m256i));
            }
            i += 128;
        }
        let s = _mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        );
        let mut lanes = [0u64; 4];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s);
        let tail = super::sum_bytes_scalar(&buf[main..]);
        lanes.iter().fold(tail, |a, &b| a.wrapping_add(b))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_avx512(buf: &[u8]) -> u64 {
        let mut acc = [_mm512_setzero_si512(); 4];
        let main = buf.len() / 256 * 256;
        let p = buf.as_ptr();
        let mut i = 0;
        while i < main {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_add_epi64(*a, _mm512_loadu_si512(p.add(i + 64 * k) as *const _));
            }
            i += 256;
        }
        let s = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        let tail = super::sum_bytes_scalar(&buf[main..]);
        tail.wrapping_add(_mm512_reduce_add_epi64(s) as u64)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // broadcast, not an insert (an insert gets a false dependency, see graft-quant)
        let h = (p as *const i16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f32_act_rows(
        t: GgmlType,
        w: &[u8],
        rb: usize,
        x: &[f32],
        xsum: &[f32],
        y: &mut [f32],
    ) {
        // one row at a time, like graft's kernels (one DRAM stream per thread)
        for (o, row) in y.iter_mut().zip(w.chunks_exact(rb)) {
            *o = if t == GgmlType::Q4_0 {
                q4_0_f32(row.as_ptr(), rb, x, xsum)
            } else {
                q8_0_f32(row.as_ptr(), rb, x)
            };
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_u8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_i8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// Q4_0 x f32: widen nibbles to f32, FMA with x; d * (sum q*x - 8 * sum x).
    /// Even/odd blocks use separate accumulators, as graft's int8 kernels do.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_f32(w: *const u8, rb: usize, x: &[f32], xsum: &[f32]) -> f32 {
        let nb = rb / 18;
        let m4 = _mm_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut corr = 0f32;
        for b in 0..nb {
            let xp = x.as_ptr().add(32 * b);
            let blk = w.add(18 * b);
            let q = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let lo = _mm_and_si128(q, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            let mut t = _mm256_mul_ps(widen_u8(lo), _mm256_loadu_ps(xp));
            t = _mm256_fmadd_ps(
                widen_u8(_mm_srli_si128(lo, 8)),
                _mm256_loadu_ps(xp.add(8)),
                t,
            );
            t = _mm256_fmadd_ps(widen_u8(hi), _mm256_loadu_ps(xp.add(16)), t);
            t = _mm256_fmadd_ps(
                widen_u8(_mm_srli_si128(hi, 8)),
                _mm256_loadu_ps(xp.add(24)),
                t,
            );
            let d = f16_at(blk);
            acc[b & 1] = _mm256_fmadd_ps(t, _mm256_set1_ps(d), acc[b & 1]);
            corr += d * xsum[b];
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) - 8.0 * corr
    }

    /// Q8_0 x f32: widen i8 to f32, FMA with x, scale per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_f32(w: *const u8, rb: usize, x: &[f32]) -> f32 {
        let nb = rb / 34;
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            let xp = x.as_ptr().add(32 * b);
            let blk = w.add(34 * b);
            let mut t = _mm256_mul_ps(widen_i8(blk.add(2)), _mm256_loadu_ps(xp));
            t = _mm256_fmadd_ps(widen_i8(blk.add(10)), _mm256_loadu_ps(xp.add(8)), t);
            t = _mm256_fmadd_ps(widen_i8(blk.add(18)), _mm256_loadu_ps(xp.add(16)), t);
            t = _mm256_fmadd_ps(widen_i8(blk.add(26)), _mm256_loadu_ps(xp.add(24)), t);
            acc[b & 1] = _mm256_fmadd_ps(t, _mm256_set1_ps(f16_at(blk)), acc[b & 1]);
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_sum_is_correct() {
        let buf: Vec<u8> = (0..100_003u32).map(|i| (i % 251) as u8).collect();
        let want = sum_bytes_scalar(&buf);
        assert_eq!(sum_bytes(&buf), want);
        assert_eq!(sum_bytes_par(&buf), want);
    }

    #[test]
    fn f32_activation_kernels_match_graft() {
        for t in [GgmlType::Q4_0, GgmlType::Q8_0] {
            let (rows, cols) = (7, 256);
            let w = random_weights(t, rows, cols, 3);
            let x = random_f32(cols, 4);
            let mut y = vec![0f32; rows];
            if !matvec_f32_act(t, &w, rows, cols, &x, &mut y) {
                return;
            }
            let deq = graft_quant::dequantize_matrix(t, &w, cols).unwrap();
            for r in 0..rows {
                let want: f32 = deq[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| a * b)
                    .sum();
                let scale: f32 = deq[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                assert!(
                    (y[r] - want).abs() <= 1e-4 * scale,
                    "{t} row {r}: {} vs {want}",
                    y[r]
                );
            }
        }
    }
}
