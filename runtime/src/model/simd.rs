//! Small f32 vector primitives for attention (q·k scores and weighted sums of
//! values). The kernels in graft-quant work on weight rows; these work on activations.
//!
//! Scores run across keys, not along the head: keys are stored dimension-major
//! (`kt[d * stride + k]`), so one query dimension broadcast against 8 consecutive
//! keys is one FMA with no horizontal reduction, and each score is one FMA chain
//! over the dimensions in order whatever block it falls in. Weighted value sums keep
//! the output in registers across keys. Every output element is a fixed chain of
//! operations that depends only on its own query and keys, so a token's attention
//! does not depend on the batch around it. x86_64 gets an AVX2+FMA version chosen at
//! run time.

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Σ a[i]·b[i] over the shorter length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

/// y[i] += w·x[i] over the shorter length.
pub fn axpy(y: &mut [f32], w: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { axpy_avx2(y, w, x) };
    }
    for (a, &b) in y.iter_mut().zip(x) {
        *a += w * b;
    }
}

/// `scores[k] = scale * Σ_d q[d]·kt[d * stride + k]` for every `k < scores.len()`:
/// one query against keys stored dimension-major (row `d` of `kt` holds dimension `d`
/// of every key, `stride` apart). Keys past `stride` and dimensions past the rows
/// `kt` holds are not read (their scores stay 0).
pub fn scores_t(q: &[f32], kt: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    let len = scores.len().min(stride);
    let hd = q.len().min(kt.len().checked_div(stride).unwrap_or(0));
    let (q, scores) = (&q[..hd], &mut scores[..len]);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU; kt holds hd rows of
        // stride >= len floats (checked above).
        return unsafe { scores_t_avx2(q, kt, stride, scale, scores) };
    }
    scores_t_portable(q, kt, stride, scale, scores)
}

/// Replaces every `s` in `scores` by `exp(s - max)` and returns their sum: the
/// softmax numerators. The vector version's exp is a polynomial within a few ulp of
/// libm's (0 below e^-87, where f32 leaves the normal range).
pub fn exp_sub_sum(scores: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { exp_sub_sum_avx2(scores, max) };
    }
    exp_sub_sum_portable(scores, max)
}

fn exp_sub_sum_portable(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// `gate[i] = silu(gate[i]) * up[i]`, silu(g) = g / (1 + e^-g): SwiGLU's product,
/// over the shorter length. The vector version uses the same exp as
/// [`exp_sub_sum`] (libm's scalar expf was 2% of prefill).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gate, up) = (&mut gate[..n], &up[..n]);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU; both slices hold n floats.
        return unsafe { silu_mul_avx2(gate, up) };
    }
    silu_mul_portable(gate, up)
}

fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    let (n, pg, pu) = (gate.len(), gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let silu_mul = |g: __m256, u: __m256| {
        // e^-g overflows to 2^127-ish for g < -88 (exp_avx2 clamps): g / huge ~ -0
        let e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
    };
    let mut i = 0;
    while i + 8 <= n {
        let r = silu_mul(_mm256_loadu_ps(pg.add(i)), _mm256_loadu_ps(pu.add(i)));
        _mm256_storeu_ps(pg.add(i), r);
        i += 8;
    }
    if i < n {
        let m = lane_mask(n - i);
        let r = silu_mul(
            _mm256_maskload_ps(pg.add(i), m),
            _mm256_maskload_ps(pu.add(i), m),
        );
        _mm256_maskstore_ps(pg.add(i), m, r);
    }
}

/// exp(x) for x <= 88: Cephes' expf (range reduction by ln 2 in two parts, degree-5
/// polynomial for e^r - 1 - r), 0 below -87.33.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let lo = _mm256_set1_ps(-87.33);
    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
    let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_andnot_ps(tiny, _mm256_mul_ps(e, pow2))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(scores: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let (n, p) = (scores.len(), scores.as_mut_ptr());
    let mx = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        let m = lane_mask(n - i);
        // masked-off lanes load 0 and are zeroed again before the sum
        let e = exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(p.add(i), m), mx));
        let e = _mm256_and_ps(e, _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(p.add(i), m, e);
        sum = _mm256_add_ps(sum, e);
        i += 8;
    }
    let q = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    _mm_cvtss_f32(q)
}

fn scores_t_portable(q: &[f32], kt: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    scores.fill(0.0);
    for (d, &qd) in q.iter().enumerate() {
        for (s, &k) in scores.iter_mut().zip(&kt[d * stride..]) {
            *s += qd * k;
        }
    }
    for s in scores.iter_mut() {
        *s *= scale;
    }
}

/// `o[j] = Σ_k (p[k]·inv)·v[k * o.len() + j]` over `k < p.len()`, accumulated in key
/// order from zero (values position-major, `o.len()` wide). Keys past those `v`
/// holds are not read.
pub fn weighted_sum(o: &mut [f32], p: &[f32], inv: f32, v: &[f32]) {
    let hd = o.len();
    let len = p.len().min(v.len().checked_div(hd).unwrap_or(0));
    let p = &p[..len];
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU; v holds len rows of hd.
        return unsafe { weighted_sum_avx2(o, p, inv, v) };
    }
    weighted_sum_portable(o, p, inv, v)
}

fn weighted_sum_portable(o: &mut [f32], p: &[f32], inv: f32, v: &[f32]) {
    let hd = o.len();
    o.fill(0.0);
    for (&pk, vr) in p.iter().zip(v.chunks_exact(hd)) {
        let w = pk * inv;
        for (a, &b) in o.iter_mut().zip(vr) {
            *a += w * b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_t_avx2(q: &[f32], kt: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let len = out.len();
    let mut k = 0;
    // 64 keys per pass: eight independent FMA chains (two FMA pipes x 4 cycles).
    while k + 64 <= len {
        scores_block::<8>(q, kt, stride, scale, out, k, 8);
        k += 64;
    }
    // The rest in one pass of up to 8 vectors, the last masked past len.
    let rest = len - k;
    match rest.div_ceil(8) {
        0 => {}
        1 => scores_block::<1>(q, kt, stride, scale, out, k, rest),
        2 => scores_block::<2>(q, kt, stride, scale, out, k, rest - 8),
        3 => scores_block::<3>(q, kt, stride, scale, out, k, rest - 16),
        4 => scores_block::<4>(q, kt, stride, scale, out, k, rest - 24),
        5 => scores_block::<5>(q, kt, stride, scale, out, k, rest - 32),
        6 => scores_block::<6>(q, kt, stride, scale, out, k, rest - 40),
        7 => scores_block::<7>(q, kt, stride, scale, out, k, rest - 48),
        _ => scores_block::<8>(q, kt, stride, scale, out, k, rest - 56),
    }
}

/// Scores of keys `k..k + 8 * (V - 1) + last` (`last` in 1..=8 lanes of the last
/// vector); each key is the same FMA chain over the dimensions in any block.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_block<const V: usize>(
    q: &[f32],
    kt: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
    k: usize,
    last: usize,
) {
    use std::arch::x86_64::*;
    let (pq, pk, po) = (q.as_ptr(), kt.as_ptr(), out.as_mut_ptr());
    let m = lane_mask(last);
    let mut acc = [_mm256_setzero_ps(); V];
    for d in 0..q.len() {
        let qd = _mm256_set1_ps(*pq.add(d));
        let row = pk.add(d * stride + k);
        for (j, a) in acc.iter_mut().enumerate() {
            let kv = if j + 1 < V || last == 8 {
                _mm256_loadu_ps(row.add(8 * j))
            } else {
                _mm256_maskload_ps(row.add(8 * j), m)
            };
            *a = _mm256_fmadd_ps(qd, kv, *a);
        }
    }
    let sc = _mm256_set1_ps(scale);
    for (j, a) in acc.iter().enumerate() {
        let r = _mm256_mul_ps(*a, sc);
        if j + 1 < V || last == 8 {
            _mm256_storeu_ps(po.add(k + 8 * j), r);
        } else {
            _mm256_maskstore_ps(po.add(k + 8 * j), m, r);
        }
    }
}

/// Lanes `0..n.min(8)` set.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lane_mask(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let n = n.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(o: &mut [f32], p: &[f32], inv: f32, v: &[f32]) {
    use std::arch::x86_64::*;
    let hd = o.len();
    let (pv, po) = (v.as_ptr(), o.as_mut_ptr());
    let mut c = 0;
    // 64 dimensions per pass over the keys, held in 8 registers.
    while c + 64 <= hd {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (k, &pk) in p.iter().enumerate() {
            let w = _mm256_set1_ps(pk * inv);
            let row = pv.add(k * hd + c);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * j)), *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(po.add(c + 8 * j), *a);
        }
        c += 64;
    }
    // Narrower heads or a remainder: 8 dimensions per pass, masked past hd.
    while c < hd {
        let m = lane_mask(hd - c);
        let mut acc = _mm256_setzero_ps();
        for (k, &pk) in p.iter().enumerate() {
            let w = _mm256_set1_ps(pk * inv);
            acc = _mm256_fmadd_ps(w, _mm256_maskload_ps(pv.add(k * hd + c), m), acc);
        }
        _mm256_maskstore_ps(po.add(c), m, acc);
        c += 8;
    }
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            acc1,
        );
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let s = _mm256_add_ps(acc0, acc1);
    let hi = _mm256_extractf128_ps(s, 1);
    let q = _mm_add_ps(_mm256_castps256_ps128(s), hi);
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    let mut sum = _mm_cvtss_f32(q);
    while i < n {
        sum += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], w: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let n = y.len().min(x.len());
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        let r = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
        _mm256_storeu_ps(py.add(i), r);
        i += 8;
    }
    while i < n {
        *py.add(i) += w * *px.add(i);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_matches_portable() {
        for n in [0usize, 1, 7, 8, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 * *y as f64).abs())
                .sum::<f64>()
                + 1e-30;
            assert!(
                (dot(&a, &b) as f64 - exact).abs() <= 1e-6 * scale,
                "dot n={n}"
            );
            assert!(
                (dot_portable(&a, &b) as f64 - exact).abs() <= 1e-6 * scale,
                "portable n={n}"
            );
            let mut y = vec![1.0f32; n];
            axpy(&mut y, 0.5, &a);
            for (yi, ai) in y.iter().zip(&a) {
                assert!((yi - (1.0 + 0.5 * ai)).abs() < 1e-6);
            }
        }
    }

    /// Scores and weighted sums against an f64 reference, for head sizes with and
    /// without a multiple of 8 or 64 and key counts around the 8/32 blocks; a key's
    /// score is the same bits whatever the number of keys scored with it (the prefix
    /// property causal attention relies on for batch invariance).
    #[test]
    fn attention_primitives_match_reference() {
        let val = |i: usize, f: f32| ((i as f32 * f).sin() * 1.3).clamp(-1.0, 1.0);
        for hd in [1usize, 7, 8, 12, 64, 80, 128] {
            for stride in [1usize, 5, 8, 31, 32, 33, 70] {
                let q: Vec<f32> = (0..hd).map(|i| val(i, 0.71)).collect();
                let kt: Vec<f32> = (0..hd * stride).map(|i| val(i, 0.37)).collect();
                let v: Vec<f32> = (0..hd * stride).map(|i| val(i, 0.13)).collect();
                type Scores = fn(&[f32], &[f32], usize, f32, &mut [f32]);
                type Sum = fn(&mut [f32], &[f32], f32, &[f32]);
                let variants: [(Scores, Sum); 2] = [
                    (scores_t, weighted_sum),
                    (scores_t_portable, weighted_sum_portable),
                ];
                for (scores_t, weighted_sum) in variants {
                    let mut full = vec![0f32; stride];
                    scores_t(&q, &kt, stride, 0.125, &mut full);
                    for len in [1, stride / 2 + 1, stride] {
                        let mut s = vec![f32::NAN; len];
                        scores_t(&q, &kt, stride, 0.125, &mut s);
                        assert_eq!(
                            s[..],
                            full[..len],
                            "prefix hd={hd} stride={stride} len={len}"
                        );
                        for (k, &got) in s.iter().enumerate() {
                            let want: f64 = (0..hd)
                                .map(|d| q[d] as f64 * kt[d * stride + k] as f64)
                                .sum::<f64>()
                                * 0.125;
                            let mag: f64 = (0..hd)
                                .map(|d| (q[d] as f64 * kt[d * stride + k] as f64).abs())
                                .sum();
                            assert!(
                                (got as f64 - want).abs() <= 1e-6 * mag + 1e-30,
                                "score hd={hd} stride={stride} k={k}: {got} vs {want}"
                            );
                        }
                        let p: Vec<f32> = (0..len).map(|k| val(k, 0.9).abs()).collect();
                        let mut o = vec![f32::NAN; hd];
                        weighted_sum(&mut o, &p, 0.5, &v);
                        for (j, &got) in o.iter().enumerate() {
                            let terms =
                                (0..len).map(|k| (p[k] * 0.5) as f64 * v[k * hd + j] as f64);
                            let want: f64 = terms.clone().sum();
                            let mag: f64 = terms.map(f64::abs).sum();
                            assert!(
                                (got as f64 - want).abs() <= 1e-6 * mag + 1e-30,
                                "sum hd={hd} len={len} j={j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_libm() {
        type F = fn(&mut [f32], &[f32]);
        for f in [silu_mul as F, silu_mul_portable as F] {
            for n in [0usize, 1, 7, 8, 9, 100] {
                let g: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) * 2.1).collect();
                let u: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
                let mut got = g.clone();
                f(&mut got, &u);
                for i in 0..n {
                    let (gi, ui) = (g[i] as f64, u[i] as f64);
                    let want = gi / (1.0 + (-gi).exp()) * ui;
                    assert!(
                        (got[i] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                        "silu({gi}) * {ui}: {} vs {want}",
                        got[i]
                    );
                }
            }
        }
    }

    #[test]
    fn exp_sub_sum_matches_libm() {
        type F = fn(&mut [f32], f32) -> f32;
        for f in [exp_sub_sum as F, exp_sub_sum_portable as F] {
            for n in [0usize, 1, 7, 8, 9, 100] {
                let x: Vec<f32> = (0..n).map(|i| -(i as f32) * 0.97 + 3.0).collect();
                let mut e = x.clone();
                let sum = f(&mut e, 3.0);
                let mut want_sum = 0f64;
                for (&xi, &ei) in x.iter().zip(&e) {
                    let want = ((xi - 3.0) as f64).exp();
                    want_sum += want;
                    if want < 1.2e-38 {
                        assert!(ei.abs() < 1.2e-38, "exp({xi}): {ei}");
                    } else {
                        assert!((ei as f64 - want).abs() <= 4e-7 * want, "exp({xi}): {ei}");
                    }
                }
                assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1e-30));
            }
        }
    }
}
