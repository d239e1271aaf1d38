//! SaRA training math (see `shared/specs/adaptation.md`): the trainable mask, the
//! sparse gradient, the sparse delta's forward and backward, the low-rank
//! regulariser, progressive adjustment and the learning-rate default.
//!
//! One adapted weight `W` (`[out, in]`, frozen base `P0`) trains the entries of the
//! mask `M = |P0| < theta` as a vector `P_learn` (initially `P0[M]`, signs kept so the
//! step-0 model is the base). The forward pass uses `W0 x + dW x` with the sparse
//! delta `dW = scatter(P_learn - P0[M])` ([`sparse_delta`], [`sparse_forward`]), the
//! input gradient adds `dY dW` ([`sparse_backward_input`]), and the gradient of
//! `P_learn` is `dY^T X` at `M` only ([`sddmm`]); nothing dense of weight size is
//! ever built.
//!
//! All index lists are flat row-major indices into `[out, in]`, strictly ascending
//! (so the entries of one output row are one contiguous run).

use graft_runtime::model::simd;
use graft_runtime::model::Weight;
use rayon::prelude::*;

use crate::delta::SparseDelta;
use crate::error::{AdapterError, Result};
use crate::sara::checked_flat_indices;

use super::linalg;

/// The paper's default magnitude threshold.
pub const DEFAULT_THETA: f32 = 2e-3;

/// The rank regulariser only considers 2-D tensors whose smaller side exceeds this.
pub const RANK_MIN_DIM: usize = 64;

/// Rows dequantized per task when selecting a mask over a [`Weight`].
const MASK_ROWS_PER_TASK: usize = 16;

/// Bytes of transposed activations per token block in [`sddmm`], [`sparse_forward`]
/// and [`sparse_backward_input`]: the block is read once per output row (or input
/// column), so it should stay in L2.
const BLOCK_BYTES: usize = 1 << 20;

/// The paper's learning-rate default for a threshold: `1e-3 * exp(-350 theta)` (about
/// 4.97e-4 at theta = 2e-3).
pub fn default_lr(theta: f32) -> f32 {
    1e-3 * (-350.0 * theta).exp()
}

fn err(context: &str, what: impl Into<String>) -> AdapterError {
    AdapterError::invalid(context, what)
}

/// The flat indices of `values` (a row-major matrix) with `|w| < theta` (strict; NaN
/// is never selected), ascending. Errors when there are more values than u32 indices
/// address.
pub fn select_mask(values: &[f32], theta: f32) -> Result<Vec<u32>> {
    check_addressable("select_mask", values.len())?;
    Ok(values
        .iter()
        .enumerate()
        // len <= u32::MAX, checked above.
        .filter(|(_, w)| w.abs() < theta)
        .map(|(i, _)| i as u32)
        .collect())
}

fn check_addressable(context: &str, total: usize) -> Result<()> {
    if total > u32::MAX as usize {
        return Err(err(
            context,
            format!("{total} elements, more than u32 indices address"),
        ));
    }
    Ok(())
}

/// The SaRA state of one weight: the trainable positions, their current values and
/// their initial (base) values. All three vectors have the same length.
#[derive(Debug, Clone, PartialEq)]
pub struct SaraEntries {
    pub rows: usize,
    pub cols: usize,
    /// Flat row-major indices into `[rows, cols]`, strictly ascending.
    pub indices: Vec<u32>,
    /// Current values `P_learn` at `indices`.
    pub values: Vec<f32>,
    /// Initial values `P0` at `indices` (the base weight, dequantized).
    pub init: Vec<f32>,
}

impl SaraEntries {
    /// The mask `|P0| < theta` of a frozen base weight of any type, dequantized row by
    /// row (no dense copy of the weight), with `values == init == P0[M]`.
    pub fn from_weight(w: &Weight, theta: f32) -> Result<SaraEntries> {
        let context = "sara mask";
        let total = w
            .rows
            .checked_mul(w.cols)
            .ok_or_else(|| err(context, format!("shape {}x{} overflows", w.rows, w.cols)))?;
        check_addressable(context, total)?;
        let cols = w.cols;
        let starts: Vec<usize> = (0..w.rows).step_by(MASK_ROWS_PER_TASK).collect();
        let parts = starts
            .par_iter()
            .map_init(
                || vec![0f32; cols],
                |buf, &r0| -> Result<(Vec<u32>, Vec<f32>)> {
                    let (mut idx, mut val) = (Vec::new(), Vec::new());
                    for r in r0..(r0 + MASK_ROWS_PER_TASK).min(w.rows) {
                        w.row_into(r, buf)
                            .map_err(|e| AdapterError::quant(format!("{context}: row {r}"), e))?;
                        for (c, &x) in buf.iter().enumerate() {
                            if x.abs() < theta {
                                // r * cols + c < total <= u32::MAX.
                                idx.push((r * cols + c) as u32);
                                val.push(x);
                            }
                        }
                    }
                    Ok((idx, val))
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let nnz = parts.iter().map(|p| p.0.len()).sum();
        let (mut indices, mut init) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
        for (i, v) in parts {
            indices.extend_from_slice(&i);
            init.extend_from_slice(&v);
        }
        Ok(SaraEntries {
            rows: w.rows,
            cols,
            values: init.clone(),
            indices,
            init,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// `values - init`: the delta this state adds to the base at `indices`.
    pub fn delta_values(&self) -> Vec<f32> {
        self.values
            .iter()
            .zip(&self.init)
            .map(|(v, i)| v - i)
            .collect()
    }

    fn check(&self, context: &str) -> Result<()> {
        let n = self.indices.len();
        if self.values.len() != n || self.init.len() != n {
            return Err(err(
                context,
                format!(
                    "{n} indices, {} values, {} initial values: expected equal lengths",
                    self.values.len(),
                    self.init.len()
                ),
            ));
        }
        Ok(())
    }
}

/// The sparse delta `scatter(values - init)` of the union of `parts` (disjoint
/// states of one weight, e.g. the live and frozen halves after
/// [`progressive_adjust`]) with merge scale `scale`. Every entry is kept, zero deltas
/// included, so the structure is the same at every step and a training loop can
/// update `values` in place; an all-zero delta leaves the base output unchanged.
pub fn sparse_delta(parts: &[&SaraEntries], scale: f32) -> Result<SparseDelta> {
    let context = "sara delta";
    let (rows, cols) = parts.first().map_or((0, 0), |p| (p.rows, p.cols));
    let mut pairs: Vec<(u32, f32)> = Vec::new();
    for p in parts {
        p.check(context)?;
        if (p.rows, p.cols) != (rows, cols) {
            return Err(err(
                context,
                format!(
                    "parts of shapes {rows}x{cols} and {}x{}, expected one weight's",
                    p.rows, p.cols
                ),
            ));
        }
        pairs.extend(p.indices.iter().copied().zip(p.delta_values()));
    }
    // Parts are each ascending; a stable sort merges them, and from_flat rejects the
    // overlap of non-disjoint parts.
    pairs.sort_by_key(|&(i, _)| i);
    let (indices, values): (Vec<u32>, Vec<f32>) = pairs.into_iter().unzip();
    SparseDelta::from_flat(rows, cols, &indices, &values, scale).map_err(|e| err(context, e))
}

/// What [`progressive_adjust`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Adjusted {
    /// `M2 = M1 AND |P_current| < theta`, with their current values (training
    /// continues from them) and initial values.
    pub live: SaraEntries,
    /// `M1 \ M2` at their trained values: fixed from now on, part of the delta
    /// (`sparse_delta(&[&live, &frozen], ..)` has the same structure as before).
    pub frozen: SaraEntries,
    /// For each live entry, its position in the input state (so per-entry buffers of
    /// the old mask, such as the delta values of [`sparse_delta`] built from it, can
    /// be updated at `kept[j]` from `live`'s entry `j`).
    pub kept: Vec<u32>,
}

/// SaRA's progressive parameter adjustment (at half the steps): entries whose trained
/// value reached `|P| >= theta` (or is NaN) leave the trainable set and freeze at
/// their trained value; the rest continue. The optimizer state must restart: the
/// caller allocates fresh zeroed Adam moments of `live.len()` (the spec resets them
/// rather than carrying the kept entries' moments over).
pub fn progressive_adjust(state: &SaraEntries, theta: f32) -> Result<Adjusted> {
    state.check("progressive adjust")?;
    let empty = || SaraEntries {
        rows: state.rows,
        cols: state.cols,
        indices: Vec::new(),
        values: Vec::new(),
        init: Vec::new(),
    };
    let (mut live, mut frozen, mut kept) = (empty(), empty(), Vec::new());
    for (k, ((&i, &v), &p0)) in state
        .indices
        .iter()
        .zip(&state.values)
        .zip(&state.init)
        .enumerate()
    {
        let dst = if v.abs() < theta {
            // k < len <= u32::MAX + 1 entries of distinct u32 indices.
            kept.push(k as u32);
            &mut live
        } else {
            &mut frozen
        };
        dst.indices.push(i);
        dst.values.push(v);
        dst.init.push(p0);
    }
    Ok(Adjusted { live, frozen, kept })
}

/// Strictly ascending and below `total`, or an error naming the first bad index.
fn check_indices(context: &str, indices: &[u32], total: usize) -> Result<()> {
    let mut prev: Option<u32> = None;
    for (k, &i) in indices.iter().enumerate() {
        if i as usize >= total || prev.is_some_and(|p| i <= p) {
            return Err(err(
                context,
                format!("index {k} is {i}, expected ascending indices below {total}"),
            ));
        }
        prev = Some(i);
    }
    Ok(())
}

fn check_len(context: &str, what: &str, found: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == found => Ok(()),
        _ => Err(err(
            context,
            format!("{what} has {found} values, expected {rows}x{cols}"),
        )),
    }
}

/// The sparse weight gradient: `grad[k] = sum_b dY[b, o_k] X[b, i_k]` for the flat
/// indices `indices` (ascending, into `[out, in]`), i.e. `dY^T X` gathered at the
/// mask without forming it. `dy` is `[n_tok, out]`, `x` is `[n_tok, in]`, both
/// row-major; `grad` (`indices.len()`) is overwritten.
///
/// Tokens go in blocks whose transposed activations fit in L2; within a block `dY`
/// and `X` are transposed so each gradient entry is one contiguous dot product over
/// the block's tokens, and output rows (contiguous runs of `indices`) run in
/// parallel. Cost `nnz * n_tok` multiply-adds plus `n_tok * (in + out)` to transpose.
pub fn sddmm(
    dy: &[f32],
    x: &[f32],
    n_tok: usize,
    out: usize,
    inp: usize,
    indices: &[u32],
    grad: &mut [f32],
) -> Result<()> {
    let context = "sara sddmm";
    check_len(context, "dY", dy.len(), n_tok, out)?;
    check_len(context, "X", x.len(), n_tok, inp)?;
    let total = out
        .checked_mul(inp)
        .ok_or_else(|| err(context, format!("shape {out}x{inp} overflows")))?;
    check_indices(context, indices, total)?;
    if grad.len() != indices.len() {
        return Err(err(
            context,
            format!(
                "gradient has {} slots, expected one per index ({})",
                grad.len(),
                indices.len()
            ),
        ));
    }
    grad.fill(0.0);
    if indices.is_empty() || n_tok == 0 {
        return Ok(());
    }
    // One (row, index run, gradient run) per output row that has masked entries.
    let mut runs: Vec<(usize, &[u32], &mut [f32])> = Vec::new();
    let (mut idx, mut g) = (indices, grad);
    while let Some(&first) = idx.first() {
        let o = first as usize / inp;
        let end = idx.partition_point(|&i| (i as usize) / inp == o);
        let (ri, rest_i) = idx.split_at(end);
        let (rg, rest_g) = std::mem::take(&mut g).split_at_mut(end);
        runs.push((o, ri, rg));
        idx = rest_i;
        g = rest_g;
    }
    let block = token_block(inp, n_tok);
    let mut xt = vec![0f32; inp * block];
    let mut dyt = vec![0f32; out * block];
    for t0 in (0..n_tok).step_by(block) {
        let tb = block.min(n_tok - t0);
        transpose(&x[t0 * inp..(t0 + tb) * inp], tb, inp, &mut xt[..inp * tb]);
        transpose(
            &dy[t0 * out..(t0 + tb) * out],
            tb,
            out,
            &mut dyt[..out * tb],
        );
        let (xt, dyt) = (&xt[..inp * tb], &dyt[..out * tb]);
        runs.par_iter_mut().for_each(|(o, ri, rg)| {
            let d = &dyt[*o * tb..(*o + 1) * tb];
            for (&i, gk) in ri.iter().zip(rg.iter_mut()) {
                let c = i as usize % inp;
                *gk += simd::dot(d, &xt[c * tb..(c + 1) * tb]);
            }
        });
    }
    Ok(())
}

/// `dst[c * rows + r] = src[r * cols + c]` (`src` is `rows x cols`).
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    // Tiles keep both sides' cache lines live.
    const T: usize = 16;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// Below this many tokens the sparse forward/backward work token by token (gather /
/// scatter); from it on they transpose token blocks so every masked entry becomes one
/// contiguous multiply-add over the block's tokens (several times faster).
const BLOCKED_MIN_TOKENS: usize = 8;

/// Tokens per rayon task on the token-by-token path.
const TOKENS_PER_TASK: usize = 4;

/// Tokens per block when `width` floats of each token are transposed (see
/// [`BLOCK_BYTES`]).
fn token_block(width: usize, n_tok: usize) -> usize {
    (BLOCK_BYTES / (4 * width.max(1)))
        .clamp(16, 1024)
        .min(n_tok)
}

/// `dst[b * width + j] += src[j * tb + b]`: adds a transposed block back.
fn add_transposed(src: &[f32], tb: usize, width: usize, dst: &mut [f32]) {
    for (b, row) in dst.chunks_exact_mut(width).enumerate().take(tb) {
        for (j, v) in row.iter_mut().enumerate() {
            *v += src[j * tb + b];
        }
    }
}

/// Checks a sparse delta's structure (its fields are public) and the activation
/// lengths for `n_tok` tokens: `a` has `a_width` per token, `b` has `b_width`.
fn check_delta(
    context: &str,
    d: &SparseDelta,
    n_tok: usize,
    (a, a_width): (usize, usize),
    (b, b_width): (usize, usize),
) -> Result<()> {
    checked_flat_indices(d).map_err(|e| err(context, e))?;
    check_len(context, "input", a, n_tok, a_width)?;
    check_len(context, "output", b, n_tok, b_width)
}

/// `y += x dW^T` for the sparse delta `d` (`[out, in]`, times its `scale`): `x` is
/// `[n_tok, in]`, `y` `[n_tok, out]`. Per token block, `X` is transposed and each
/// output row is the sum of its entries' scaled `X` columns (contiguous over tokens);
/// rows run in parallel. A few tokens go through the delta's inference kernel.
pub fn sparse_forward(d: &SparseDelta, x: &[f32], n_tok: usize, y: &mut [f32]) -> Result<()> {
    check_delta(
        "sara forward",
        d,
        n_tok,
        (x.len(), d.cols),
        (y.len(), d.rows),
    )?;
    let (out, inp) = (d.rows, d.cols);
    if out == 0 || inp == 0 || n_tok == 0 {
        return Ok(());
    }
    if n_tok < BLOCKED_MIN_TOKENS {
        d.apply(1.0, x, n_tok, y);
        return Ok(());
    }
    let block = token_block(inp, n_tok);
    let mut xt = vec![0f32; inp * block];
    let mut yt = vec![0f32; out * block];
    for t0 in (0..n_tok).step_by(block) {
        let tb = block.min(n_tok - t0);
        let (xt, yt) = (&mut xt[..inp * tb], &mut yt[..out * tb]);
        transpose(&x[t0 * inp..(t0 + tb) * inp], tb, inp, xt);
        let xt = &*xt;
        yt.par_chunks_mut(tb).enumerate().for_each(|(o, acc)| {
            acc.fill(0.0);
            let (lo, hi) = (d.row_ptr[o] as usize, d.row_ptr[o + 1] as usize);
            for (&c, &v) in d.col_idx[lo..hi].iter().zip(&d.values[lo..hi]) {
                let c = c as usize;
                simd::axpy(acc, v * d.scale, &xt[c * tb..(c + 1) * tb]);
            }
        });
        add_transposed(yt, tb, out, &mut y[t0 * out..(t0 + tb) * out]);
    }
    Ok(())
}

/// `dx += dy dW` (the input gradient through the sparse delta, times its `scale`):
/// `dy` is `[n_tok, out]`, `dx` `[n_tok, in]`. The delta's entries are regrouped by
/// input column (CSC, `O(nnz)` per call); per token block, `dY` is transposed and
/// each input column's gradient is the sum of its entries' scaled `dY` rows; columns
/// run in parallel. A few tokens scatter token by token instead.
pub fn sparse_backward_input(
    d: &SparseDelta,
    dy: &[f32],
    n_tok: usize,
    dx: &mut [f32],
) -> Result<()> {
    check_delta(
        "sara backward",
        d,
        n_tok,
        (dy.len(), d.rows),
        (dx.len(), d.cols),
    )?;
    let (out, inp) = (d.rows, d.cols);
    if out == 0 || inp == 0 || n_tok == 0 {
        return Ok(());
    }
    if n_tok < BLOCKED_MIN_TOKENS {
        dx.par_chunks_mut(inp)
            .zip(dy.par_chunks(out))
            .with_min_len(TOKENS_PER_TASK)
            .for_each(|(dxr, dyr)| {
                for (o, &g) in dyr.iter().enumerate() {
                    let g = g * d.scale;
                    let (lo, hi) = (d.row_ptr[o] as usize, d.row_ptr[o + 1] as usize);
                    for (&c, &v) in d.col_idx[lo..hi].iter().zip(&d.values[lo..hi]) {
                        dxr[c as usize] += g * v;
                    }
                }
            });
        return Ok(());
    }
    // CSC of the delta by a counting sort on the column (rows stay ascending).
    let nnz = d.values.len();
    let mut col_ptr = vec![0usize; inp + 1];
    for &c in &d.col_idx {
        col_ptr[c as usize + 1] += 1;
    }
    for i in 0..inp {
        col_ptr[i + 1] += col_ptr[i];
    }
    let mut fill = col_ptr.clone();
    let (mut row_of, mut val_of) = (vec![0u32; nnz], vec![0f32; nnz]);
    for o in 0..out {
        let (lo, hi) = (d.row_ptr[o] as usize, d.row_ptr[o + 1] as usize);
        for (&c, &v) in d.col_idx[lo..hi].iter().zip(&d.values[lo..hi]) {
            let slot = &mut fill[c as usize];
            // o < rows, and rows fit u32 flat indices (checked above).
            row_of[*slot] = o as u32;
            val_of[*slot] = v * d.scale;
            *slot += 1;
        }
    }
    let block = token_block(out, n_tok);
    let mut dyt = vec![0f32; out * block];
    let mut dxt = vec![0f32; inp * block];
    for t0 in (0..n_tok).step_by(block) {
        let tb = block.min(n_tok - t0);
        let (dyt, dxt) = (&mut dyt[..out * tb], &mut dxt[..inp * tb]);
        transpose(&dy[t0 * out..(t0 + tb) * out], tb, out, dyt);
        let dyt = &*dyt;
        dxt.par_chunks_mut(tb).enumerate().for_each(|(i, acc)| {
            acc.fill(0.0);
            let (lo, hi) = (col_ptr[i], col_ptr[i + 1]);
            for (&o, &v) in row_of[lo..hi].iter().zip(&val_of[lo..hi]) {
                let o = o as usize;
                simd::axpy(acc, v, &dyt[o * tb..(o + 1) * tb]);
            }
        });
        add_transposed(dxt, tb, inp, &mut dx[t0 * inp..(t0 + tb) * inp]);
    }
    Ok(())
}

/// SaRA's low-rank regulariser on one weight: `lambda * ||P o M||_*` (the nuclear
/// norm of the `rows x cols` matrix holding `values` at `indices` and zero elsewhere)
/// and its subgradient with respect to `values`, `lambda * (U V^T)[M]` over the
/// singular values above `tol` (`None`: [`linalg::Svd::default_tol`]). Computed in
/// f64 through [`linalg::svd`], whose cost bounds how large a weight this suits.
pub fn rank_regulariser(
    rows: usize,
    cols: usize,
    indices: &[u32],
    values: &[f32],
    lambda: f32,
    tol: Option<f64>,
) -> Result<(f32, Vec<f32>)> {
    let context = "sara rank regulariser";
    let total = rows
        .checked_mul(cols)
        .ok_or_else(|| err(context, format!("shape {rows}x{cols} overflows")))?;
    check_indices(context, indices, total)?;
    if values.len() != indices.len() {
        return Err(err(
            context,
            format!(
                "{} values, expected one per index ({})",
                values.len(),
                indices.len()
            ),
        ));
    }
    let mut dense = vec![0f64; total];
    for (&i, &v) in indices.iter().zip(values) {
        dense[i as usize] = v as f64;
    }
    let d = linalg::svd(&dense, rows, cols)?;
    drop(dense);
    let tol = tol.unwrap_or_else(|| d.default_tol());
    let keep: Vec<usize> = (0..d.k()).filter(|&j| d.s[j] > tol).collect();
    let norm: f64 = d.s.iter().sum();
    let k = d.k();
    // (U_r V_r^T)[o, i] for each masked (o, i) only: nnz * r, no rows x cols matrix.
    let grad = indices
        .par_iter()
        .map(|&i| {
            let (o, c) = (i as usize / cols, i as usize % cols);
            let (u, v) = (&d.u[o * k..(o + 1) * k], &d.v[c * k..(c + 1) * k]);
            let g: f64 = keep.iter().map(|&j| u[j] * v[j]).sum();
            (lambda as f64 * g) as f32
        })
        .collect();
    Ok(((lambda as f64 * norm) as f32, grad))
}

/// The tensor the rank regulariser applies to this step: uniformly one of the
/// `shapes` (`(rows, cols)` of the trained tensors) whose smaller side exceeds
/// [`RANK_MIN_DIM`], chosen by `draw` (one `next_u64()` of the caller's seeded
/// generator, so runs repeat). `None` when no tensor is eligible.
pub fn pick_rank_tensor(shapes: &[(usize, usize)], draw: u64) -> Option<usize> {
    let eligible: Vec<usize> = shapes
        .iter()
        .enumerate()
        .filter(|(_, &(r, c))| r.min(c) > RANK_MIN_DIM)
        .map(|(i, _)| i)
        .collect();
    // Multiply-shift maps the draw to [0, len) (bias below len / 2^64).
    let pick = ((draw as u128 * eligible.len() as u128) >> 64) as usize;
    eligible.get(pick).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    fn random(r: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn lr_default_matches_the_paper() {
        assert!((default_lr(2e-3) - 4.966e-4).abs() < 1e-7);
        assert_eq!(default_lr(0.0), 1e-3);
    }

    #[test]
    fn mask_is_strict_and_skips_nan() {
        let v = [0.5, -0.1, 0.1, 0.0, f32::NAN, -0.09, 0.2];
        assert_eq!(select_mask(&v, 0.1).unwrap(), vec![3, 5]);
        assert!(select_mask(&v, 0.0).unwrap().is_empty());
        assert!(select_mask(&v, f32::NAN).unwrap().is_empty());
    }

    #[test]
    fn sddmm_matches_dense_gather() {
        let mut r = rng(5);
        // Token counts around the block size of a narrow input (1 MiB / 4 / 8 -> 1024).
        for &(n, out, inp, density) in &[
            (3, 4, 5, 0.5),
            (1, 1, 1, 1.0),
            (70, 9, 8, 0.3),
            (1500, 5, 8, 0.6),
            (17, 6, 3, 0.0),
        ] {
            let dy = random(&mut r, n * out);
            let x = random(&mut r, n * inp);
            let idx: Vec<u32> = (0..(out * inp) as u32)
                .filter(|_| r.gen_bool(density))
                .collect();
            let mut g = vec![f32::NAN; idx.len()];
            sddmm(&dy, &x, n, out, inp, &idx, &mut g).unwrap();
            for (&i, &gk) in idx.iter().zip(&g) {
                let (o, c) = (i as usize / inp, i as usize % inp);
                let want: f64 = (0..n)
                    .map(|b| dy[b * out + o] as f64 * x[b * inp + c] as f64)
                    .sum();
                assert!((gk as f64 - want).abs() < 1e-4 * (n as f64).sqrt());
            }
        }
    }

    #[test]
    fn sddmm_rejects_bad_indices_and_lengths() {
        let (dy, x) = (vec![1.0; 6], vec![1.0; 6]);
        let mut g = vec![0.0; 2];
        assert!(sddmm(&dy, &x, 2, 3, 3, &[1, 9], &mut g).is_err());
        assert!(sddmm(&dy, &x, 2, 3, 3, &[4, 4], &mut g).is_err());
        assert!(sddmm(&dy, &x, 2, 3, 3, &[5, 4], &mut g).is_err());
        assert!(sddmm(&dy, &x[..5], 2, 3, 3, &[1, 4], &mut g).is_err());
        assert!(sddmm(&dy, &x, 2, 3, 3, &[1], &mut g).is_err());
        assert!(sddmm(&dy, &x, 2, 3, 3, &[1, 4], &mut g).is_ok());
        assert_eq!(g, vec![2.0, 2.0]);
    }

    #[test]
    fn progressive_splits_the_mask() {
        let s = SaraEntries {
            rows: 2,
            cols: 3,
            indices: vec![0, 2, 3, 5],
            values: vec![0.05, -0.2, f32::NAN, -0.01],
            init: vec![0.01, -0.02, 0.03, -0.04],
        };
        let a = progressive_adjust(&s, 0.1).unwrap();
        assert_eq!(a.live.indices, vec![0, 5]);
        assert_eq!(a.live.values, vec![0.05, -0.01]);
        assert_eq!(a.live.init, vec![0.01, -0.04]);
        assert_eq!(a.kept, vec![0, 3]);
        assert_eq!(a.frozen.indices, vec![2, 3]);
        assert_eq!(a.frozen.values[0], -0.2);
        assert!(a.frozen.values[1].is_nan());
        let mut bad = s.clone();
        bad.init.pop();
        assert!(progressive_adjust(&bad, 0.1).is_err());
    }

    #[test]
    fn pick_only_eligible_and_covers_all() {
        let shapes = [(64, 4096), (65, 65), (10, 10), (128, 300)];
        let mut r = rng(9);
        let mut seen = [0usize; 4];
        for _ in 0..1000 {
            seen[pick_rank_tensor(&shapes, r.gen()).unwrap()] += 1;
        }
        assert_eq!((seen[0], seen[2]), (0, 0));
        assert!(seen[1] > 400 && seen[3] > 400, "{seen:?}");
        assert_eq!(pick_rank_tensor(&shapes[..1], 7), None);
        assert_eq!(pick_rank_tensor(&[], 7), None);
        assert_eq!(pick_rank_tensor(&shapes, u64::MAX), Some(3));
        assert_eq!(pick_rank_tensor(&shapes, 0), Some(1));
    }
}
