//! Forward and backward of every op of the decoder, generic over the scalar so the f64
//! path checks the f32 one. Activations are row-major `[tokens, width]`; backward
//! functions *add* into input gradients (the residual stream sums several paths).

use graft_quant::dequantize_row;
use graft_runtime::model::{RopeStyle, Weight};
use rayon::prelude::*;

use super::real::{gemm, par_gemm, Mat, Real};
use super::TrainError;

/// `y = x / rms(x) * w` per row; returns `1 / rms` per row for the backward.
pub fn rms_norm_fwd<T: Real>(x: &[T], w: &[T], eps: f64, y: &mut [T], rstd: &mut [T]) {
    let d = w.len();
    for ((xr, yr), r) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(rstd) {
        let ss: f64 = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum();
        let inv = T::from_f64(1.0 / (ss / d as f64 + eps).sqrt());
        *r = inv;
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// `dx += d(rms_norm)/dx . dy`; `dw += sum_rows dy * x * rstd` when given.
pub fn rms_norm_bwd<T: Real>(
    dy: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    dx: &mut [T],
    dw: Option<&mut [T]>,
) {
    let d = w.len();
    let inv_d = T::from_f64(1.0 / d as f64);
    for (((dyr, xr), dxr), &r) in dy
        .chunks_exact(d)
        .zip(x.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
        .zip(rstd)
    {
        // With g = dy * w: dx = r * (g - x * r^2 * <g, x> / d).
        let gx: T = dyr
            .iter()
            .zip(w)
            .zip(xr)
            .map(|((&a, &b), &c)| a * b * c)
            .sum();
        let k = r * r * gx * inv_d;
        for (((o, &g), &wv), &xv) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
            *o += r * (g * wv - xv * k);
        }
    }
    if let Some(dw) = dw {
        for ((dyr, xr), &r) in dy.chunks_exact(d).zip(x.chunks_exact(d)).zip(rstd) {
            for ((o, &g), &xv) in dw.iter_mut().zip(dyr).zip(xr) {
                *o += g * xv * r;
            }
        }
    }
}

/// Rotates every head of every token by its angles (`inverse`: by minus the angles,
/// which is the backward: a rotation's transpose is its inverse).
#[allow(clippy::too_many_arguments)]
pub fn rope<T: Real>(
    x: &mut [T],
    n_heads: usize,
    head_dim: usize,
    n_rot: usize,
    style: RopeStyle,
    cos: &[T],
    sin: &[T],
    inverse: bool,
) {
    let half = n_rot / 2;
    for (t, row) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                let sn = if inverse { -s[i] } else { s[i] };
                head[a] = x0 * c[i] - x1 * sn;
                head[b] = x0 * sn + x1 * c[i];
            }
        }
    }
}

/// Shapes of causal grouped-query attention.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    fn group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
}

/// Causal attention over sequences packed back to back (`seqs`: (start, len) in
/// tokens). Returns the output `[n, q_dim]` and the attention probabilities of every
/// (sequence, head), `len x len` row-major with zeros above the diagonal.
pub fn attention_fwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    seqs: &[(usize, usize)],
    s: AttnShape,
) -> (Vec<T>, Vec<Vec<T>>) {
    let (qd, kvd, hd) = (s.q_dim(), s.kv_dim(), s.head_dim);
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let tasks: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|si| (0..s.n_head).map(move |h| (si, h)))
        .collect();
    let results: Vec<(Vec<T>, Vec<T>)> = tasks
        .par_iter()
        .map(|&(si, h)| {
            let (start, len) = seqs[si];
            let g = h / s.group();
            let qh = Mat::view(q, qd, (start, len), (h * hd, hd));
            let kh = Mat::view(k, kvd, (start, len), (g * hd, hd));
            let vh = Mat::view(v, kvd, (start, len), (g * hd, hd));
            let mut p = vec![T::ZERO; len * len];
            gemm(qh, kh.t(), T::ZERO, &mut p, len);
            for (i, row) in p.chunks_exact_mut(len).enumerate() {
                let mut max = row[0] * scale;
                for val in &row[..=i] {
                    max = max.max(*val * scale);
                }
                let mut sum = T::ZERO;
                for val in &mut row[..=i] {
                    *val = (*val * scale - max).exp();
                    sum += *val;
                }
                let inv = T::ONE / sum;
                for val in &mut row[..=i] {
                    *val *= inv;
                }
                for val in &mut row[i + 1..] {
                    *val = T::ZERO;
                }
            }
            let mut o = vec![T::ZERO; len * hd];
            gemm(Mat::new(&p, len, len), vh, T::ZERO, &mut o, hd);
            (p, o)
        })
        .collect();
    let n: usize = seqs.iter().map(|&(_, l)| l).sum();
    let mut out = vec![T::ZERO; n * qd];
    let mut probs = Vec::with_capacity(results.len());
    for (&(si, h), (p, o)) in tasks.iter().zip(results) {
        let (start, len) = seqs[si];
        for (i, orow) in o.chunks_exact(hd).enumerate().take(len) {
            let dst = (start + i) * qd + h * hd;
            out[dst..dst + hd].copy_from_slice(orow);
        }
        probs.push(p);
    }
    (out, probs)
}

/// Gradients of [`attention_fwd`]: adds into `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    d_out: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[Vec<T>],
    seqs: &[(usize, usize)],
    s: AttnShape,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (qd, kvd, hd, group) = (s.q_dim(), s.kv_dim(), s.head_dim, s.group());
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let tasks: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|si| (0..s.n_head_kv).map(move |g| (si, g)))
        .collect();
    // Per (sequence, kv head): dQ of its query heads, dK and dV of the shared head.
    let results: Vec<(Vec<T>, Vec<T>, Vec<T>)> = tasks
        .par_iter()
        .map(|&(si, g)| {
            let (start, len) = seqs[si];
            let kh = Mat::view(k, kvd, (start, len), (g * hd, hd));
            let vh = Mat::view(v, kvd, (start, len), (g * hd, hd));
            let mut dqs = vec![T::ZERO; group * len * hd];
            let mut dkh = vec![T::ZERO; len * hd];
            let mut dvh = vec![T::ZERO; len * hd];
            let mut dp = vec![T::ZERO; len * len];
            for j in 0..group {
                let h = g * group + j;
                let p = &probs[si * s.n_head + h];
                let doh = Mat::view(d_out, qd, (start, len), (h * hd, hd));
                let qh = Mat::view(q, qd, (start, len), (h * hd, hd));
                // dV += P^T dO; dP = dO V^T.
                gemm(Mat::new(p, len, len).t(), doh, T::ONE, &mut dvh, hd);
                gemm(doh, vh.t(), T::ZERO, &mut dp, len);
                // Softmax backward, then the 1/sqrt(d) of the scores.
                for (i, (dr, pr)) in dp
                    .chunks_exact_mut(len)
                    .zip(p.chunks_exact(len))
                    .enumerate()
                {
                    let c: T = dr[..=i].iter().zip(&pr[..=i]).map(|(&a, &b)| a * b).sum();
                    for (dv_, &pv) in dr[..=i].iter_mut().zip(&pr[..=i]) {
                        *dv_ = pv * (*dv_ - c) * scale;
                    }
                    for dv_ in &mut dr[i + 1..] {
                        *dv_ = T::ZERO;
                    }
                }
                let ds = Mat::new(&dp, len, len);
                gemm(
                    ds,
                    kh,
                    T::ZERO,
                    &mut dqs[j * len * hd..(j + 1) * len * hd],
                    hd,
                );
                gemm(ds.t(), qh, T::ONE, &mut dkh, hd);
            }
            (dqs, dkh, dvh)
        })
        .collect();
    for (&(si, g), (dqs, dkh, dvh)) in tasks.iter().zip(results) {
        let (start, len) = seqs[si];
        for j in 0..group {
            let h = g * group + j;
            for i in 0..len {
                let src = &dqs[(j * len + i) * hd..(j * len + i + 1) * hd];
                let dst = &mut dq[(start + i) * qd + h * hd..(start + i) * qd + (h + 1) * hd];
                for (a, &b) in dst.iter_mut().zip(src) {
                    *a += b;
                }
            }
        }
        for i in 0..len {
            let at = (start + i) * kvd + g * hd;
            for (a, &b) in dk[at..at + hd].iter_mut().zip(&dkh[i * hd..(i + 1) * hd]) {
                *a += b;
            }
            for (a, &b) in dv[at..at + hd].iter_mut().zip(&dvh[i * hd..(i + 1) * hd]) {
                *a += b;
            }
        }
    }
}

fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// `silu(gate) * up`.
pub fn swiglu_fwd<T: Real>(gate: &[T], up: &[T], out: &mut [T]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

/// Writes `d_gate` and `d_up` from `d_out`.
pub fn swiglu_bwd<T: Real>(d_out: &[T], gate: &[T], up: &[T], d_gate: &mut [T], d_up: &mut [T]) {
    for ((((&d, &g), &u), dg), du) in d_out.iter().zip(gate).zip(up).zip(d_gate).zip(d_up) {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * s * (T::ONE + g * (T::ONE - s));
    }
}

/// Softmax cross-entropy of `logits` rows against `targets`, each row weighted by
/// `weight`; returns the weighted loss sum and overwrites `logits` with its gradient.
pub fn cross_entropy<T: Real>(logits: &mut [T], vocab: usize, targets: &[u32], weight: T) -> f64 {
    let mut loss = 0.0;
    for (row, &t) in logits.chunks_exact_mut(vocab).zip(targets) {
        let max = row.iter().fold(row[0], |m, &v| m.max(v));
        let mut sum = T::ZERO;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let t = t as usize;
        // -log softmax[t] = log(sum) - (logit_t - max); row now holds exp(logit - max).
        loss += (sum.ln() - row[t].ln()).to_f64() * weight.to_f64();
        let inv = T::ONE / sum;
        for v in row.iter_mut() {
            *v = *v * inv * weight;
        }
        row[t] -= weight;
    }
    loss
}

/// Rows of the frozen weight dequantized per block, so no dense copy of the base is
/// ever held: 64 rows at a time per thread.
const BLOCK_ROWS: usize = 64;

fn dequant_block<T: Real>(
    w: &Weight,
    r0: usize,
    rows: usize,
    f32buf: &mut [f32],
    out: &mut [T],
) -> Result<(), TrainError> {
    let row_bytes =
        w.ty.row_size(w.cols)
            .map_err(|e| TrainError::quant("weight", e))?;
    for r in 0..rows {
        let start = (r0 + r) * row_bytes;
        let src = w
            .data()
            .get(start..start + row_bytes)
            .ok_or_else(|| TrainError::Shape(format!("weight row {} out of range", r0 + r)))?;
        dequantize_row(w.ty, src, &mut f32buf[r * w.cols..(r + 1) * w.cols])
            .map_err(|e| TrainError::quant("weight", e))?;
    }
    for (o, &v) in out.iter_mut().zip(&f32buf[..rows * w.cols]) {
        *o = T::from_f32(v);
    }
    Ok(())
}

/// Splits `n` tokens into one contiguous chunk per thread.
fn token_chunks(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// Runs `f(block_rows, r0, dst_chunk, src_chunk)` for every 64-row block of the frozen
/// weight (dequantized into a per-thread buffer) and every thread's chunk of tokens;
/// `dst` and `src` are `[n, dst_width]` and `[n, src_width]`.
fn over_weight_blocks<T: Real>(
    w: &Weight,
    n: usize,
    (dst, dst_width): (&mut [T], usize),
    (src, src_width): (&[T], usize),
    f: impl Fn(Mat<'_, T>, usize, &mut [T], &[T]) + Sync,
) -> Result<(), TrainError> {
    let (out, inp) = (w.rows, w.cols);
    if n == 0 || out == 0 {
        return Ok(());
    }
    let per = token_chunks(n);
    dst.par_chunks_mut(per * dst_width)
        .zip(src.par_chunks(per * src_width))
        .try_for_each(|(dc, sc)| {
            let mut f32buf = vec![0f32; BLOCK_ROWS * inp];
            let mut wb = vec![T::ZERO; BLOCK_ROWS * inp];
            let mut r0 = 0;
            while r0 < out {
                let rows = BLOCK_ROWS.min(out - r0);
                dequant_block(w, r0, rows, &mut f32buf, &mut wb)?;
                f(Mat::new(&wb[..rows * inp], rows, inp), r0, &mut *dc, sc);
                r0 += rows;
            }
            Ok(())
        })
}

/// `y[n, out] = x[n, in] W^T` over a frozen weight of any stored type.
pub fn frozen_fwd<T: Real>(w: &Weight, x: &[T], n: usize, y: &mut [T]) -> Result<(), TrainError> {
    let (out, inp) = (w.rows, w.cols);
    over_weight_blocks(w, n, (y, out), (x, inp), |block, r0, yc, xc| {
        let tokens = xc.len() / inp;
        gemm(
            Mat::new(xc, tokens, inp),
            block.t(),
            T::ZERO,
            &mut yc[r0..],
            out,
        );
    })
}

/// `dx[n, in] += dy[n, out] W` over a frozen weight.
pub fn frozen_bwd<T: Real>(w: &Weight, dy: &[T], n: usize, dx: &mut [T]) -> Result<(), TrainError> {
    let (out, inp) = (w.rows, w.cols);
    over_weight_blocks(w, n, (dx, inp), (dy, out), |block, r0, dxc, dyc| {
        let tokens = dyc.len() / out;
        let dy_cols = Mat::view(dyc, out, (0, tokens), (r0, block.rows));
        gemm(dy_cols, block, T::ONE, dxc, inp);
    })
}

/// `y[n, out] = x[n, in] W^T` for a dense trainable `W [out, in]`.
pub fn dense_fwd<T: Real>(w: &[T], out: usize, inp: usize, x: &[T], n: usize, y: &mut [T]) {
    par_gemm(Mat::new(x, n, inp), Mat::new(w, out, inp).t(), T::ZERO, y);
}

/// `dx += dy W` and `dw += dy^T x` for a dense `W [out, in]` (dw skipped when None).
#[allow(clippy::too_many_arguments)]
pub fn dense_bwd<T: Real>(
    w: &[T],
    out: usize,
    inp: usize,
    x: &[T],
    dy: &[T],
    n: usize,
    dx: Option<&mut [T]>,
    dw: Option<&mut [T]>,
) {
    if let Some(dx) = dx {
        par_gemm(Mat::new(dy, n, out), Mat::new(w, out, inp), T::ONE, dx);
    }
    if let Some(dw) = dw {
        par_gemm(Mat::new(dy, n, out).t(), Mat::new(x, n, inp), T::ONE, dw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f64> {
        (0..n).map(|_| lcg(seed)).collect()
    }

    /// Checks `grad` against central differences of `f` at `x` (f64).
    fn check(f: &dyn Fn(&[f64]) -> f64, x: &[f64], grad: &[f64], what: &str) {
        let h = 1e-6;
        let mut xp = x.to_vec();
        for i in 0..x.len() {
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            let num = (fp - fm) / (2.0 * h);
            let err = (num - grad[i]).abs() / (1.0 + num.abs());
            assert!(
                err < 1e-6,
                "{what}[{i}]: analytic {} numeric {num}",
                grad[i]
            );
        }
    }

    #[test]
    fn rms_norm_gradients() {
        let mut s = 1;
        let (n, d) = (3, 8);
        let x = rand_vec(n * d, &mut s);
        let w = rand_vec(d, &mut s);
        let g = rand_vec(n * d, &mut s);
        let loss = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; n * d];
            let mut r = vec![0.0; n];
            rms_norm_fwd(x, w, 1e-5, &mut y, &mut r);
            y.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut y = vec![0.0; n * d];
        let mut r = vec![0.0; n];
        rms_norm_fwd(&x, &w, 1e-5, &mut y, &mut r);
        let mut dx = vec![0.0; n * d];
        let mut dw = vec![0.0; d];
        rms_norm_bwd(&g, &x, &w, &r, &mut dx, Some(&mut dw));
        check(&|x| loss(x, &w), &x, &dx, "dx");
        check(&|w| loss(&x, w), &w, &dw, "dw");
    }

    #[test]
    fn rope_inverse_is_transpose() {
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let mut s = 2;
            let (n, heads, hd, rot) = (3, 2, 8, 6);
            let cos_sin: Vec<f64> = rand_vec(n * rot / 2, &mut s);
            let cos: Vec<f64> = cos_sin.iter().map(|a| a.cos()).collect();
            let sin: Vec<f64> = cos_sin.iter().map(|a| a.sin()).collect();
            let x = rand_vec(n * heads * hd, &mut s);
            let g = rand_vec(n * heads * hd, &mut s);
            let f = |x: &[f64]| {
                let mut y = x.to_vec();
                rope(&mut y, heads, hd, rot, style, &cos, &sin, false);
                y.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
            };
            let mut dx = g.clone();
            rope(&mut dx, heads, hd, rot, style, &cos, &sin, true);
            check(&f, &x, &dx, "rope");
        }
    }

    #[test]
    fn attention_gradients() {
        let mut s = 3;
        let shape = AttnShape {
            n_head: 4,
            n_head_kv: 2,
            head_dim: 4,
        };
        let seqs = [(0, 3), (3, 2)];
        let n = 5;
        let q = rand_vec(n * 16, &mut s);
        let k = rand_vec(n * 8, &mut s);
        let v = rand_vec(n * 8, &mut s);
        let g = rand_vec(n * 16, &mut s);
        let f = |q: &[f64], k: &[f64], v: &[f64]| {
            let (o, _) = attention_fwd(q, k, v, &seqs, shape);
            o.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
        };
        let (_, probs) = attention_fwd(&q, &k, &v, &seqs, shape);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * 16], vec![0.0; n * 8], vec![0.0; n * 8]);
        attention_bwd(
            &g, &q, &k, &v, &probs, &seqs, shape, &mut dq, &mut dk, &mut dv,
        );
        check(&|x| f(x, &k, &v), &q, &dq, "dq");
        check(&|x| f(&q, x, &v), &k, &dk, "dk");
        check(&|x| f(&q, &k, x), &v, &dv, "dv");
    }

    #[test]
    fn attention_is_causal_and_per_sequence() {
        let mut s = 4;
        let shape = AttnShape {
            n_head: 2,
            n_head_kv: 1,
            head_dim: 4,
        };
        let q = rand_vec(4 * 8, &mut s);
        let k = rand_vec(4 * 4, &mut s);
        let v = rand_vec(4 * 4, &mut s);
        let (o, _) = attention_fwd(&q, &k, &v, &[(0, 2), (2, 2)], shape);
        // Changing the last token's key/value changes nothing before it.
        let mut k2 = k.clone();
        let mut v2 = v.clone();
        for i in 12..16 {
            k2[i] += 1.0;
            v2[i] -= 1.0;
        }
        let (o2, _) = attention_fwd(&q, &k2, &v2, &[(0, 2), (2, 2)], shape);
        assert_eq!(o[..3 * 8], o2[..3 * 8]);
        assert_ne!(o[3 * 8..], o2[3 * 8..]);
        // The first sequence alone gives the same rows.
        let (o3, _) = attention_fwd(&q[..16], &k[..8], &v[..8], &[(0, 2)], shape);
        assert_eq!(o[..16], o3[..]);
    }

    #[test]
    fn swiglu_and_cross_entropy_gradients() {
        let mut s = 5;
        let n = 12;
        let gate = rand_vec(n, &mut s)
            .iter()
            .map(|v| v * 3.0)
            .collect::<Vec<_>>();
        let up = rand_vec(n, &mut s);
        let g = rand_vec(n, &mut s);
        let f = |ga: &[f64], u: &[f64]| {
            let mut o = vec![0.0; n];
            swiglu_fwd(ga, u, &mut o);
            o.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_bwd(&g, &gate, &up, &mut dg, &mut du);
        check(&|x| f(x, &up), &gate, &dg, "dgate");
        check(&|x| f(&gate, x), &up, &du, "dup");

        let vocab = 5;
        let logits = rand_vec(3 * vocab, &mut s);
        let targets = [4u32, 0, 2];
        let ce = |l: &[f64]| {
            let mut l = l.to_vec();
            cross_entropy(&mut l, vocab, &targets, 0.5)
        };
        let mut grad = logits.clone();
        let loss = cross_entropy(&mut grad, vocab, &targets, 0.5);
        assert!((loss - ce(&logits)).abs() < 1e-12 && loss > 0.0);
        check(&ce, &logits, &grad, "dlogits");
    }

    #[test]
    fn frozen_matches_dense_for_quantized_weights() {
        use graft_quant::{quantize_matrix, GgmlType};
        let mut s = 6;
        let (out, inp, n) = (72, 64, 9);
        let wv: Vec<f32> = rand_vec(out * inp, &mut s)
            .iter()
            .map(|&v| v as f32)
            .collect();
        for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_K] {
            let cols = if ty == GgmlType::Q4_K { 256 } else { inp };
            let rows = out * inp / cols;
            let bytes = quantize_matrix(ty, &wv, cols).unwrap();
            let w = Weight::owned(ty, rows, cols, bytes).unwrap();
            let dense: Vec<f64> = w.to_f32().unwrap().iter().map(|&v| v as f64).collect();
            let x = rand_vec(n * cols, &mut s);
            let mut y = vec![0.0; n * rows];
            frozen_fwd(&w, &x, n, &mut y).unwrap();
            let mut want = vec![0.0; n * rows];
            dense_fwd(&dense, rows, cols, &x, n, &mut want);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{ty} forward: {a} vs {b}");
            }
            let dy = rand_vec(n * rows, &mut s);
            let mut dx = vec![1.0; n * cols];
            frozen_bwd(&w, &dy, n, &mut dx).unwrap();
            let mut want_dx = vec![1.0; n * cols];
            dense_bwd(&dense, rows, cols, &x, &dy, n, Some(&mut want_dx), None);
            for (a, b) in dx.iter().zip(&want_dx) {
                assert!((a - b).abs() < 1e-12, "{ty} backward: {a} vs {b}");
            }
        }
    }
}
