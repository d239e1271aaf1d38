//! Dense linear algebra for training regularisers: a thin SVD by one-sided Jacobi and
//! the nuclear norm with its subgradient.
//!
//! One-sided (Hestenes) Jacobi orthogonalises the columns of `A` (`m x n`, `m >= n`;
//! a wide matrix is transposed first) by plane rotations until every pair of columns
//! is orthogonal to working precision; the column norms are then the singular values,
//! the normalised columns the left vectors, and the accumulated rotations the right
//! vectors. It is slower than bidiagonalisation but short, needs no pivoting
//! decisions, and gives singular values to high relative accuracy.
//!
//! Cost: one sweep visits all `k(k-1)/2` column pairs (`k = min(m, n)`, `l = max(m,
//! n)`) at `O(l + k)` each, so `O(k^2 (l + k))` flops per sweep and usually 6 to 12
//! sweeps; memory `k (l + k)` f64. The pairs of one sweep are ordered as a round-robin
//! tournament, so each of the `k - 1` rounds holds `k / 2` disjoint pairs that run in
//! parallel (rayon). A 896 x 896 matrix takes well under a second on a few cores; a
//! 4096 x 4096 one about 10^12 flops (minutes), which is why SaRA's rank regulariser
//! touches one tensor per step.

use rayon::prelude::*;

use crate::error::{AdapterError, Result};

/// Sweeps after which [`svd`] gives up (Jacobi converges quadratically; random
/// matrices take about 10).
const MAX_SWEEPS: usize = 60;

/// Pair work (elements touched per round) below which a round runs on the calling
/// thread: a rayon fork-join costs a few microseconds.
const SERIAL_MAX_ELEMS: usize = 1 << 15;

/// A thin singular value decomposition `A = U diag(s) V^T` of a `rows x cols` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    pub rows: usize,
    pub cols: usize,
    /// `rows x k` row-major (`k = min(rows, cols)`): column `j` is the left singular
    /// vector of `s[j]`, or zero where `s[j] == 0` (not completed to a basis).
    pub u: Vec<f64>,
    /// The `k` singular values, descending.
    pub s: Vec<f64>,
    /// `cols x k` row-major: column `j` is the right singular vector of `s[j]`.
    pub v: Vec<f64>,
    /// Jacobi sweeps it took (the last one rotated nothing).
    pub sweeps: usize,
}

impl Svd {
    /// `min(rows, cols)`.
    pub fn k(&self) -> usize {
        self.s.len()
    }

    /// The numerical-rank tolerance `max(rows, cols) * eps * s_max` (NumPy's
    /// `matrix_rank` convention): singular values at or below it are rounding noise.
    pub fn default_tol(&self) -> f64 {
        let s_max = self.s.first().copied().unwrap_or(0.0);
        self.rows.max(self.cols) as f64 * f64::EPSILON * s_max
    }

    /// `U diag(s) V^T`, `rows x cols` row-major.
    pub fn reconstruct(&self) -> Vec<f64> {
        self.outer_sum(|j| self.s[j])
    }

    /// `sum_j w(j) u_j v_j^T` over all `j`, `rows x cols` row-major.
    fn outer_sum(&self, w: impl Fn(usize) -> f64 + Sync) -> Vec<f64> {
        let k = self.k();
        let weights: Vec<f64> = (0..k).map(w).collect();
        let mut out = vec![0f64; self.rows * self.cols];
        if self.cols == 0 {
            return out;
        }
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| {
                let ur = &self.u[r * k..(r + 1) * k];
                for (c, o) in row.iter_mut().enumerate() {
                    let vc = &self.v[c * k..(c + 1) * k];
                    *o = (0..k).map(|j| ur[j] * weights[j] * vc[j]).sum();
                }
            });
        out
    }
}

/// Thin SVD of the `rows x cols` row-major matrix `a` by one-sided Jacobi (see the
/// module docs for the cost). Errors on a length mismatch, a non-finite entry, or no
/// convergence within 60 sweeps.
pub fn svd(a: &[f64], rows: usize, cols: usize) -> Result<Svd> {
    let total = rows
        .checked_mul(cols)
        .ok_or_else(|| AdapterError::invalid("svd", format!("shape {rows}x{cols} overflows")))?;
    if a.len() != total {
        return Err(AdapterError::invalid(
            "svd",
            format!("{} values, expected {rows}x{cols} = {total}", a.len()),
        ));
    }
    if let Some(i) = a.iter().position(|v| !v.is_finite()) {
        return Err(AdapterError::invalid(
            "svd",
            format!("entry {i} is {}, expected a finite number", a[i]),
        ));
    }
    if rows >= cols {
        return tall_svd(a, rows, cols);
    }
    // A^T = U' S V'^T, so A = V' S U'^T.
    let mut at = vec![0f64; total];
    for r in 0..rows {
        for c in 0..cols {
            at[c * rows + r] = a[r * cols + c];
        }
    }
    let t = tall_svd(&at, cols, rows)?;
    Ok(Svd {
        rows,
        cols,
        u: t.v,
        s: t.s,
        v: t.u,
        sweeps: t.sweeps,
    })
}

/// One-sided Jacobi for `m >= n`.
fn tall_svd(a: &[f64], m: usize, n: usize) -> Result<Svd> {
    // Column j of A followed by column j of V (starting as e_j): one rotation updates
    // both, and only the first m entries enter the dot products.
    let mut colv: Vec<Vec<f64>> = (0..n)
        .map(|j| {
            let mut c = vec![0f64; m + n];
            for r in 0..m {
                c[r] = a[r * n + j];
            }
            c[m + j] = 1.0;
            c
        })
        .collect();
    // Columns that are orthogonal to this relative precision count as converged.
    let tol = f64::EPSILON * (m as f64).sqrt();
    // Columns below rounding noise of the whole matrix are numerically zero: rotating
    // them against each other only chases noise (rank-deficient inputs never settle).
    let floor = {
        let fro2: f64 = colv.iter().map(|c| norm2(&c[..m])).sum();
        fro2 * f64::EPSILON * f64::EPSILON
    };
    // Round-robin tournament over an even number of players (a dummy one when n is
    // odd): player 0 stays, the others rotate, and each round pairs i with p-1-i.
    let players = n + n % 2;
    let mut order: Vec<usize> = (0..players).collect();
    let mut sweeps = 0;
    let mut converged = n < 2;
    while !converged {
        if sweeps == MAX_SWEEPS {
            return Err(AdapterError::invalid(
                "svd",
                format!("one-sided Jacobi did not converge in {MAX_SWEEPS} sweeps ({m}x{n})"),
            ));
        }
        sweeps += 1;
        let mut rotated = 0usize;
        for _ in 0..players - 1 {
            let mut work: Vec<(usize, Vec<f64>, usize, Vec<f64>)> = (0..players / 2)
                .map(|i| (order[i], order[players - 1 - i]))
                .filter(|&(p, q)| p < n && q < n)
                .map(|(p, q)| {
                    let (cp, cq) = (std::mem::take(&mut colv[p]), std::mem::take(&mut colv[q]));
                    (p, cp, q, cq)
                })
                .collect();
            let rotate = |w: &mut (usize, Vec<f64>, usize, Vec<f64>)| {
                rotate_pair(&mut w.1, &mut w.3, m, tol, floor)
            };
            rotated += if work.len() * (m + n) < SERIAL_MAX_ELEMS {
                work.iter_mut().map(rotate).filter(|&r| r).count()
            } else {
                work.par_iter_mut().map(rotate).filter(|&r| r).count()
            };
            for (p, cp, q, cq) in work {
                colv[p] = cp;
                colv[q] = cq;
            }
            order[1..].rotate_right(1);
        }
        converged = rotated == 0;
    }
    let norms: Vec<f64> = colv.iter().map(|c| norm2(&c[..m]).sqrt()).collect();
    let mut rank: Vec<usize> = (0..n).collect();
    rank.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]));
    let mut u = vec![0f64; m * n];
    let mut v = vec![0f64; n * n];
    let mut s = Vec::with_capacity(n);
    for (jj, &j) in rank.iter().enumerate() {
        let sigma = norms[j];
        s.push(sigma);
        let col = &colv[j];
        if sigma > 0.0 {
            for r in 0..m {
                u[r * n + jj] = col[r] / sigma;
            }
        }
        for r in 0..n {
            v[r * n + jj] = col[m + r];
        }
    }
    Ok(Svd {
        rows: m,
        cols: n,
        u,
        s,
        v,
        sweeps,
    })
}

fn norm2(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum()
}

/// Rotates columns `p` and `q` (each `m` entries of A then the V part) so their A
/// parts become orthogonal; false when they already are (to `tol`).
fn rotate_pair(p: &mut [f64], q: &mut [f64], m: usize, tol: f64, floor: f64) -> bool {
    let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
    for (x, y) in p[..m].iter().zip(&q[..m]) {
        alpha += x * x;
        beta += y * y;
        gamma += x * y;
    }
    if gamma == 0.0 || alpha <= floor || beta <= floor || gamma.abs() <= tol * (alpha * beta).sqrt()
    {
        return false;
    }
    // The rotation angle that zeroes the (p, q) entry of A^T A (Rutishauser's
    // formulas: the smaller root t = tan(angle) keeps the rotation stable).
    let zeta = (beta - alpha) / (2.0 * gamma);
    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
    let c = 1.0 / (1.0 + t * t).sqrt();
    let s = c * t;
    for (x, y) in p.iter_mut().zip(q.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
    true
}

/// The nuclear norm of the `rows x cols` row-major matrix `a` (the sum of its
/// singular values) and a subgradient `U_r V_r^T` over the singular values above
/// `tol` (`rows x cols` row-major; it is the gradient where the kept singular values
/// are distinct from zero and nothing lies near `tol`). `tol = None` uses
/// [`Svd::default_tol`].
pub fn nuclear_norm_subgradient(
    a: &[f64],
    rows: usize,
    cols: usize,
    tol: Option<f64>,
) -> Result<(f64, Vec<f64>)> {
    let d = svd(a, rows, cols)?;
    let tol = tol.unwrap_or_else(|| d.default_tol());
    let norm = d.s.iter().sum();
    let g = d.outer_sum(|j| if d.s[j] > tol { 1.0 } else { 0.0 });
    Ok((norm, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (tests only need variety, not quality).
    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    #[test]
    fn reconstructs_and_orders() {
        for &(m, n) in &[
            (1, 1),
            (5, 3),
            (3, 5),
            (8, 8),
            (7, 1),
            (1, 6),
            (0, 4),
            (4, 0),
        ] {
            let mut g = lcg((m * 31 + n) as u64);
            let a: Vec<f64> = (0..m * n).map(|_| g()).collect();
            let d = svd(&a, m, n).unwrap();
            assert_eq!(d.k(), m.min(n));
            let r = d.reconstruct();
            for (x, y) in a.iter().zip(&r) {
                assert!((x - y).abs() < 1e-12, "{m}x{n}: {x} vs {y}");
            }
            assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert!(svd(&[1.0, 2.0], 2, 2).is_err());
        assert!(svd(&[1.0, f64::NAN, 0.0, 1.0], 2, 2).is_err());
        assert!(svd(&[], usize::MAX, 2).is_err());
    }

    #[test]
    fn zero_matrix_has_zero_norm_and_zero_subgradient() {
        let (norm, g) = nuclear_norm_subgradient(&[0.0; 12], 3, 4, None).unwrap();
        assert_eq!(norm, 0.0);
        assert!(g.iter().all(|&x| x == 0.0));
    }
}
