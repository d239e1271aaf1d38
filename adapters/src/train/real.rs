//! The scalar types training runs in: f32 for real work, f64 as the reference path for
//! finite-difference gradient checks. Both share every op, so the checked code is the
//! code that trains.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use rayon::prelude::*;

pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + std::iter::Sum
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn abs(self) -> Self;

    /// `C = alpha * A B + beta * C` on strided views (see [`gemm`]).
    ///
    /// # Safety
    /// The views must stay inside their slices (checked by [`gemm`]).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // SAFETY: forwarded from the caller's contract.
                unsafe { $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
            }
        }
    };
}

impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);

/// A row-major matrix view, optionally read transposed.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    /// Distance between rows in `data` (>= cols).
    pub ld: usize,
    pub transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A dense `rows x cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            ld: cols,
            transposed: false,
        }
    }

    /// Rows `[r0, r0 + rows)`, columns `[c0, c0 + cols)` of a row-major matrix whose rows
    /// are `ld` apart (a head of packed attention activations, a column block).
    pub fn view(
        data: &'a [T],
        ld: usize,
        (r0, rows): (usize, usize),
        (c0, cols): (usize, usize),
    ) -> Self {
        Mat {
            data: data.get(r0 * ld + c0..).unwrap_or(&[]),
            rows,
            cols,
            ld,
            transposed: false,
        }
    }

    /// The transpose (a view: nothing moves).
    pub fn t(self) -> Self {
        Mat {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Logical shape (after transposition).
    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// (row stride, column stride) of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.ld as isize)
        } else {
            (self.ld as isize, 1)
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.cols <= self.ld
                && (self.rows - 1)
                    .checked_mul(self.ld)
                    .and_then(|v| v.checked_add(self.cols))
                    .is_some_and(|end| end <= self.data.len()))
    }
}

/// `C[m, n] (row stride ldc) = beta * C + A B` with shapes checked; panics only on a
/// programming error (shapes are fixed by the model, never by input).
pub fn gemm<T: Real>(a: Mat<'_, T>, b: Mat<'_, T>, beta: T, c: &mut [T], ldc: usize) {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    assert!(k == k2, "gemm: inner dimensions {k} and {k2}");
    assert!(a.fits() && b.fits(), "gemm: operand views out of bounds");
    assert!(
        m == 0 || n == 0 || (n <= ldc && (m - 1) * ldc + n <= c.len()),
        "gemm: output view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            for v in &mut row[..n] {
                *v *= beta;
            }
        }
        return;
    }
    let (rsa, csa) = a.strides();
    let (rsb, csb) = b.strides();
    // SAFETY: every view was bounds-checked above.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            T::ONE,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// [`gemm`] with the rows of C split across the rayon pool (C dense: ldc = n).
pub fn par_gemm<T: Real>(a: Mat<'_, T>, b: Mat<'_, T>, beta: T, c: &mut [T]) {
    let (m, _) = a.shape();
    let (_, n) = b.shape();
    let threads = rayon::current_num_threads().max(1);
    // Small products are not worth a fork; 64 rows keeps the microkernel busy.
    if m < 128 || threads == 1 || n == 0 {
        gemm(a, b, beta, c, n);
        return;
    }
    let rows_per = m.div_ceil(threads).max(64);
    c.par_chunks_mut(rows_per * n)
        .enumerate()
        .for_each(|(i, chunk)| {
            let r0 = i * rows_per;
            let rows = chunk.len() / n;
            let a_block = row_block(a, r0, rows);
            gemm(a_block, b, beta, chunk, n);
        });
}

/// Logical rows `[r0, r0 + rows)` of `a`.
fn row_block<T>(a: Mat<'_, T>, r0: usize, rows: usize) -> Mat<'_, T> {
    if a.transposed {
        // Logical rows are stored columns.
        Mat {
            data: a.data.get(r0..).unwrap_or(&[]),
            cols: rows,
            ..a
        }
    } else {
        Mat {
            data: a.data.get(r0 * a.ld..).unwrap_or(&[]),
            rows,
            ..a
        }
    }
}

pub fn to_real<T: Real>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn gemm_transposes_and_blocks_match_naive() {
        let (m, k, n) = (150, 37, 29);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64) - 5.0).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        par_gemm(Mat::new(&a, m, k), Mat::new(&b, k, n), 0.0, &mut c);
        assert_eq!(c, want);
        // (A^T)^T via a transposed copy.
        let mut at = vec![0.0; m * k];
        for i in 0..m {
            for p in 0..k {
                at[p * m + i] = a[i * k + p];
            }
        }
        let mut c2 = vec![1.0; m * n];
        par_gemm(Mat::new(&at, k, m).t(), Mat::new(&b, k, n), 0.0, &mut c2);
        assert_eq!(c2, want);
        // Accumulate (beta = 1) and a column block of a wider matrix.
        let mut wide = vec![0.0; k * (n + 3)];
        for p in 0..k {
            wide[p * (n + 3) + 2..p * (n + 3) + 2 + n].copy_from_slice(&b[p * n..(p + 1) * n]);
        }
        let bw = Mat::view(&wide, n + 3, (0, k), (2, n));
        let mut c3 = want.clone();
        gemm(Mat::new(&a, m, k), bw, 1.0, &mut c3, n);
        let doubled: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
        assert_eq!(c3, doubled);
    }
}
