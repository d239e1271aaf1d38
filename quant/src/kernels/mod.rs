//! Dot-product and mat-vec/mat-mat kernels that compute directly on quantized
//! weight blocks, as ggml does: the activations are quantized once per call to the
//! weight type's companion ("vec_dot type") and every block dot product is an
//! integer dot product scaled once per block.
//!
//! | weights                     | activations        |
//! |-----------------------------|--------------------|
//! | Q4_0, Q5_0, Q8_0            | Q8_0               |
//! | Q4_1, Q5_1                  | Q8_1               |
//! | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K| Q8_K               |
//! | F32, F16, BF16              | F32                |
//!
//! Implementation levels, chosen once at run time ([`level`]):
//! - `scalar` (always compiled): the ground truth the SIMD levels are tested against.
//! - `avx2` (x86_64, AVX2 + FMA + F16C): every type.
//! - `avx512` (x86_64, AVX-512 F/BW/VL + VNNI): Q4_0, Q8_0, Q4_K, Q5_K, Q6_K and the
//!   float types; other types use their AVX2 kernel at this level.
//! - `neon` (aarch64): Q4_0 and Q8_0; other types use the scalar kernel there.
//!
//! `GRAFT_KERNEL=scalar|avx2|avx512` caps the level (benches and tests); a level the
//! CPU lacks falls back to the best one it has.
//!
//! ## Why 8-bit activations (measured; BENCHMARKS.md, "Kernels")
//! Keeping activations in f32 avoids their rounding error but means widening every
//! weight to f32 and one FMA lane per weight, where 8-bit activations take one
//! `vpmaddubsw` (AVX2) or `vpdpbusd` (VNNI) per 32-64 weights. Measured on the AMD
//! EPYC (Zen 4) dev box, 2048x8192, 1 thread, both paths AVX2 and one row at a time
//! (`act_format` bench): Q4_0 8.3 vs 5.7 GB/s hot and 8.4 vs 5.5 GB/s streamed from
//! DRAM; Q8_0 16.1 vs 9.9 hot and 16.2 vs 8.3 streamed: int8 is 1.5-2x faster in
//! both regimes (one core cannot keep up with DRAM, ~19 GB/s, with either at the AVX2
//! level; the VNNI int8 kernels reach 19 GB/s hot for Q4_0, 27 for Q8_0). The price is the activation rounding (|error| <= d/2 per element, d =
//! amax/127 per 32 or 256 values), the same as llama.cpp; `tests.rs` bounds vec_dot
//! against the f32 dot by exactly that error. So activations are quantized like ggml.
//!
//! ## One row at a time
//! Every kernel walks one weight row per pass, so each thread reads one sequential
//! stream. 4-row (and 2-row) tiles that share activation loads were faster in cache
//! but streamed from DRAM at about half the rate on the target (Q8_0 2048x8192,
//! 1 thread: ~12 vs ~21 GB/s; software prefetch did not help), and extra per-call
//! activation arrays read alongside the weights hurt the same way. Activation-side
//! work is therefore recomputed in registers per row, except Q4_0's AVX-512 nibble
//! ordering, which replaces the activation quants rather than adding a stream.
//!
//! ## Several tokens (prefill)
//! `matmul` with n_tokens > 1 dots each L2-sized chunk of rows with every token.
//! Where a level has a multi-token kernel ([`TokensFn`]; AVX-512: F32, F16, BF16, Q4_0,
//! Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) each decoded weight block is reused for up to 4 tokens
//! (Q4_0/Q5_0/Q8_0: 2 rows x 4 tokens; floats: 3 rows x 4 tokens, which turns two loads
//! per FMA into 7 per 12) instead of being decoded again per token; per (row, token)
//! it runs the single-token kernel's operations in the same order, so results are
//! identical.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::blocks::{f16_to_f32, BlockQ8_0, BlockQ8_1, BlockQ8_K};
use crate::{GgmlType, QuantError, QK, QK_K};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(test)]
mod tests;

/// A kernel implementation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Scalar,
    Neon,
    Avx2,
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    pub fn from_name(s: &str) -> Option<Level> {
        [Level::Scalar, Level::Neon, Level::Avx2, Level::Avx512]
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the level (cached feature detection).
    pub fn is_available(self) -> bool {
        available_levels().contains(&self)
    }
}

/// Every level this CPU can run, lowest first. Detected once.
pub fn available_levels() -> &'static [Level] {
    static LEVELS: OnceLock<Vec<Level>> = OnceLock::new();
    LEVELS.get_or_init(|| {
        let mut v = vec![Level::Scalar];
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Level::Neon);
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Level::Avx2);
            }
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Level::Avx512);
            }
        }
        v
    })
}

/// The level the public entry points use: the best available one, capped by
/// `GRAFT_KERNEL` when set. Read once per process.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = *available_levels().last().unwrap_or(&Level::Scalar);
        match std::env::var("GRAFT_KERNEL")
            .ok()
            .and_then(|s| Level::from_name(&s))
        {
            Some(want) => available_levels()
                .iter()
                .copied()
                .rfind(|l| *l <= want)
                .unwrap_or(Level::Scalar),
            None => best,
        }
    })
}

/// Dots `out.len()` consecutive weight rows of `row_bytes` bytes each (in `w`)
/// with one token's activations. Callers guarantee
/// `w.len() == out.len() * row_bytes` and `row_bytes == ty.row_size(act.len())`.
pub(crate) type RowsFn = fn(w: &[u8], row_bytes: usize, act: &Activations, out: &mut [f32]);

/// Dots `out.len() / acts.len()` consecutive weight rows with every token in
/// `acts`, reusing each decoded weight block for several tokens. `out` is
/// token-major (`out[t * rows + r]`). Callers guarantee `acts` is non-empty,
/// `out.len() == acts.len() * rows`, `w.len() == rows * row_bytes`, and every
/// activation matches `row_bytes` as for [`RowsFn`]. Results equal [`RowsFn`]'s
/// bit for bit.
pub(crate) type TokensFn = fn(w: &[u8], row_bytes: usize, acts: &[Activations], out: &mut [f32]);

/// The multi-token kernel for `w` at `lvl`, if that level has one.
fn tokens_fn(lvl: Level, w: GgmlType) -> Option<TokensFn> {
    #[cfg(target_arch = "x86_64")]
    if lvl >= Level::Avx512 && lvl.is_available() {
        return avx512::tokens_fn(w);
    }
    let _ = (lvl, w);
    None
}

/// The kernel for `w` at `lvl`, falling back to the next lower level that has one.
fn rows_fn(lvl: Level, w: GgmlType) -> Result<RowsFn, QuantError> {
    if !lvl.is_available() {
        return Err(QuantError::Unsupported {
            ty: w,
            what: "kernel level not available on this CPU",
        });
    }
    #[cfg(target_arch = "x86_64")]
    {
        if lvl >= Level::Avx512 {
            if let Some(f) = avx512::rows_fn(w) {
                return Ok(f);
            }
        }
        if lvl >= Level::Avx2 {
            if let Some(f) = avx2::rows_fn(w) {
                return Ok(f);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    if lvl >= Level::Neon {
        if let Some(f) = neon::rows_fn(w) {
            return Ok(f);
        }
    }
    scalar::rows_fn(w).ok_or(QuantError::Unsupported {
        ty: w,
        what: "no dot-product kernel for this weight type",
    })
}

/// The activation type a weight type's dot product consumes (ggml's `vec_dot_type`,
/// except that F16/BF16 weights take F32 activations).
pub fn vec_dot_type(w: GgmlType) -> GgmlType {
    match w {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => GgmlType::F32,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::Q8_K => GgmlType::Q8_K,
    }
}

/// Whether [`vec_dot`]/[`matmul`] accept weights of this type.
pub fn supports(w: GgmlType) -> bool {
    scalar::rows_fn(w).is_some()
}

/// One token's activations, quantized for the dot products of one weight type.
///
/// Holds the ggml blocks ([`Activations::as_bytes`]) plus side data derived from
/// them once (f32 scales, contiguous quants, per-block sums) for the SIMD kernels.
#[derive(Clone, Debug, Default)]
pub struct Activations {
    ty: Option<GgmlType>,
    n: usize,
    /// F32 activations.
    pub(crate) f: Vec<f32>,
    pub(crate) q8_0: Vec<BlockQ8_0>,
    pub(crate) q8_1: Vec<BlockQ8_1>,
    pub(crate) q8_k: Vec<BlockQ8_K>,
    /// Q8_0/Q8_1: all quants, contiguous (n bytes), cache-line aligned.
    pub(crate) qs: AlignedI8,
    /// Q8_0/Q8_1: per 32-block scale d as f32.
    pub(crate) d: Vec<f32>,
    /// Q8_1: per 32-block `s` (d * sum of quants, as stored) as f32.
    pub(crate) s: Vec<f32>,
    /// Q8_0: per 32-block sum of the quants (offset corrections for Q4_0/Q5_0).
    pub(crate) sum: Vec<i32>,
    /// Activation-side terms prepared once per call for one weight type's kernel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) prep: Prep,
}

/// Activation-side terms a kernel would otherwise recompute for every weight row
/// (layouts are the kernel's business; see avx512.rs).
#[derive(Clone, Debug, Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Prep {
    /// The weight type these were prepared for.
    pub(crate) for_ty: Option<GgmlType>,
    /// Permuted activation quants.
    pub(crate) y: AlignedI8,
}

/// One cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([i8; 64]);

/// An i8 buffer starting on a cache line: the kernels load activations 64 bytes at a
/// time, and from a plain `Vec<i8>` (16-byte aligned) every such load splits across
/// two lines. (No measurable difference on the Zen 4 target; split loads cost more
/// on other cores, and this costs nothing.)
#[derive(Clone, Default)]
pub(crate) struct AlignedI8 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedI8 {
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedI8 {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }
    /// Makes this `len` bytes, reusing the allocation; bytes `..len` keep whatever
    /// they held (callers overwrite them), bytes past `len` in the last line are 0.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
        let bytes = bytemuck::cast_slice_mut::<Line, i8>(&mut self.lines);
        bytes[len..].fill(0);
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn as_ptr(&self) -> *const i8 {
        self.lines.as_ptr() as *const i8
    }
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn as_mut_ptr(&mut self) -> *mut i8 {
        self.lines.as_mut_ptr() as *mut i8
    }
    #[cfg(test)]
    pub(crate) fn as_slice(&self) -> &[i8] {
        &bytemuck::cast_slice::<Line, i8>(&self.lines)[..self.len]
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [i8] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut::<Line, i8>(&mut self.lines)[..len]
    }
}

// SAFETY (bytemuck): Line is 64 plain i8 with no padding (size 64 = align 64).
unsafe impl bytemuck::Zeroable for Line {}
unsafe impl bytemuck::Pod for Line {}

impl std::fmt::Debug for AlignedI8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedI8({} bytes)", self.len)
    }
}

impl Activations {
    /// The activation type (Q8_0, Q8_1, Q8_K or F32).
    pub fn ty(&self) -> GgmlType {
        self.ty.unwrap_or(GgmlType::F32)
    }

    /// Number of activation elements.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The activations in ggml's layout for [`Activations::ty`] (Q8_K blocks in
    /// their native in-memory layout, F32 little-endian).
    pub fn as_bytes(&self) -> &[u8] {
        match self.ty() {
            GgmlType::Q8_0 => bytemuck::cast_slice(&self.q8_0),
            GgmlType::Q8_1 => bytemuck::cast_slice(&self.q8_1),
            GgmlType::Q8_K => bytemuck::cast_slice(&self.q8_k),
            _ => bytemuck::cast_slice(&self.f),
        }
    }

    /// Wraps already-quantized Q8_0 blocks (e.g. from [`crate::quantize_row`]).
    pub fn from_q8_0(blocks: Vec<BlockQ8_0>) -> Self {
        let n = blocks.len() * QK;
        let mut a = Activations {
            ty: Some(GgmlType::Q8_0),
            n,
            qs: AlignedI8::zeroed(n),
            d: Vec::with_capacity(blocks.len()),
            sum: Vec::with_capacity(blocks.len()),
            ..Default::default()
        };
        for (b, q) in blocks.iter().zip(a.qs.as_mut_slice().chunks_exact_mut(QK)) {
            q.copy_from_slice(&b.qs);
            a.d.push(f16_to_f32(b.d));
            a.sum.push(b.qs.iter().map(|&q| q as i32).sum());
        }
        a.q8_0 = blocks;
        a
    }

    /// Wraps already-quantized Q8_1 blocks.
    pub fn from_q8_1(blocks: Vec<BlockQ8_1>) -> Self {
        let n = blocks.len() * QK;
        let mut a = Activations {
            ty: Some(GgmlType::Q8_1),
            n,
            qs: AlignedI8::zeroed(n),
            d: Vec::with_capacity(blocks.len()),
            s: Vec::with_capacity(blocks.len()),
            ..Default::default()
        };
        for (b, q) in blocks.iter().zip(a.qs.as_mut_slice().chunks_exact_mut(QK)) {
            q.copy_from_slice(&b.qs);
            a.d.push(f16_to_f32(b.d));
            a.s.push(f16_to_f32(b.s));
        }
        a.q8_1 = blocks;
        a
    }

    /// Wraps already-quantized Q8_K blocks.
    pub fn from_q8_k(blocks: Vec<BlockQ8_K>) -> Self {
        Activations {
            ty: Some(GgmlType::Q8_K),
            n: blocks.len() * QK_K,
            q8_k: blocks,
            ..Default::default()
        }
    }

    /// Wraps f32 activations.
    pub fn from_f32(x: Vec<f32>) -> Self {
        Activations {
            ty: Some(GgmlType::F32),
            n: x.len(),
            f: x,
            ..Default::default()
        }
    }
}

/// Quantizes one token's activations `x` for dot products with weights of type `w`.
pub fn quantize_activations(w: GgmlType, x: &[f32]) -> Result<Activations, QuantError> {
    quantize_activations_with(level(), w, x)
}

/// [`quantize_activations`] at an explicit level. Every level produces the same
/// bytes as the reference quantizers in `legacy`/`kquants`.
pub fn quantize_activations_with(
    lvl: Level,
    w: GgmlType,
    x: &[f32],
) -> Result<Activations, QuantError> {
    if !supports(w) {
        return Err(QuantError::Unsupported {
            ty: w,
            what: "no dot-product kernel for this weight type",
        });
    }
    let at = vec_dot_type(w);
    at.row_size(x.len())?;
    #[cfg(target_arch = "x86_64")]
    let simd = lvl >= Level::Avx2 && lvl.is_available();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = {
        let _ = lvl;
        false
    };
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut act = match at {
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q8_0 | GgmlType::Q8_1 if simd => {
            let mut a = Activations::default();
            avx2::activations_q8_into(x, at == GgmlType::Q8_1, &mut a);
            a
        }
        GgmlType::Q8_0 => {
            let mut b = vec![BlockQ8_0::default(); x.len() / QK];
            crate::legacy::quantize_q8_0(x, &mut b);
            Activations::from_q8_0(b)
        }
        GgmlType::Q8_1 => {
            let mut b = vec![BlockQ8_1::default(); x.len() / QK];
            crate::legacy::quantize_q8_1(x, &mut b);
            Activations::from_q8_1(b)
        }
        GgmlType::Q8_K => {
            let mut b = vec![BlockQ8_K::default(); x.len() / QK_K];
            #[cfg(target_arch = "x86_64")]
            if simd {
                avx2::quantize_q8_k(x, &mut b);
            }
            if !simd {
                crate::kquants::quantize_q8_k(x, &mut b);
            }
            Activations::from_q8_k(b)
        }
        _ => Activations::from_f32(x.to_vec()),
    };
    #[cfg(target_arch = "x86_64")]
    if lvl >= Level::Avx512 && lvl.is_available() {
        avx512::prepare(w, &mut act);
    }
    Ok(act)
}

/// [`quantize_activations_with`] into `a`, reusing its buffers (prefill quantizes
/// hundreds of tokens per product: their allocations were ~8% of prefill time).
fn quantize_activations_into(
    lvl: Level,
    w: GgmlType,
    x: &[f32],
    a: &mut Activations,
) -> Result<(), QuantError> {
    #[cfg(target_arch = "x86_64")]
    if lvl >= Level::Avx2 && lvl.is_available() && vec_dot_type(w) == GgmlType::Q8_0 {
        GgmlType::Q8_0.row_size(x.len())?;
        avx2::activations_q8_into(x, false, a);
        a.prep.for_ty = None;
        if lvl >= Level::Avx512 {
            avx512::prepare(w, a);
        }
        return Ok(());
    }
    *a = quantize_activations_with(lvl, w, x)?;
    Ok(())
}

thread_local! {
    /// Per-token activation buffers of this thread's last multi-token product.
    static ACT_CACHE: std::cell::RefCell<Vec<Activations>> = const {
        std::cell::RefCell::new(Vec::new())
    };
}

fn check_act(w: GgmlType, act: &Activations) -> Result<usize, QuantError> {
    if act.ty() != vec_dot_type(w) {
        return Err(QuantError::Unsupported {
            ty: w,
            what: "activations were quantized for another weight type",
        });
    }
    w.row_size(act.len())
}

/// Dot product of one weight row (`row`, type `w`) with activations from
/// [`quantize_activations`] for the same type, at the process-wide [`level`].
pub fn vec_dot(w: GgmlType, row: &[u8], act: &Activations) -> Result<f32, QuantError> {
    vec_dot_with(level(), w, row, act)
}

/// [`vec_dot`] at an explicit level (tests and benches).
pub fn vec_dot_with(
    lvl: Level,
    w: GgmlType,
    row: &[u8],
    act: &Activations,
) -> Result<f32, QuantError> {
    let f = rows_fn(lvl, w)?;
    let rb = check_act(w, act)?;
    if row.len() != rb {
        return Err(QuantError::ByteSize {
            ty: w,
            len: act.len(),
            found: row.len(),
            expected: rb,
        });
    }
    let mut out = [0f32];
    if rb > 0 {
        f(row, rb, act, &mut out);
    }
    Ok(out[0])
}

/// `y[t, r] = sum_c W[r, c] * x[t, c]`: W is `rows` x `cols` row-major in type `w`,
/// `x` is `n_tokens` x `cols`, `y` is `n_tokens` x `rows`. Rows are split across the
/// current rayon pool, or for one token called from outside it, across the persistent
/// team of [`crate::pool`]; activations are quantized once per call.
pub fn matmul(
    w: GgmlType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), QuantError> {
    matmul_with(level(), w, weights, rows, cols, x, n_tokens, y)
}

/// [`matmul`] with one token.
pub fn matvec(
    w: GgmlType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), QuantError> {
    matmul(w, weights, rows, cols, x, 1, y)
}

fn f32_len_check(len: usize, found: usize) -> Result<(), QuantError> {
    if len != found {
        return Err(QuantError::ByteSize {
            ty: GgmlType::F32,
            len,
            found: found.saturating_mul(4),
            expected: len.saturating_mul(4),
        });
    }
    Ok(())
}

/// Weight bytes per chunk when several tokens reuse it: well inside L2 (1 MiB on
/// the target) so the chunk is read from DRAM once and from L2 n_tokens - 1 times.
const TOKEN_TILE_BYTES: usize = 256 << 10;

/// Weight bytes times tokens up to which a product runs on the calling thread: about
/// the work of the few microseconds a rayon fork-join costs.
const SERIAL_MAX_BYTES: usize = 64 << 10;

/// [`SERIAL_MAX_BYTES`] for one token on the persistent team (`pool`), whose
/// hand-off costs a cache-line transfer rather than a wake-up.
const TEAM_SERIAL_MAX_BYTES: usize = 16 << 10;

/// Weight bytes per task of a one-token product at most: the output projection
/// (tens of MB) in a few tasks per thread left one thread waiting up to a whole
/// task (~0.2 ms) for the other at its end.
const TASK_MAX_BYTES: usize = 256 << 10;

/// [`matmul`] at an explicit level (tests and benches).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    lvl: Level,
    w: GgmlType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), QuantError> {
    let f = rows_fn(lvl, w)?;
    let rb = w.row_size(cols)?;
    let wbytes = rows
        .checked_mul(rb)
        .ok_or(QuantError::Overflow { ty: w, len: cols })?;
    if weights.len() != wbytes {
        return Err(QuantError::ByteSize {
            ty: w,
            len: rows.saturating_mul(cols),
            found: weights.len(),
            expected: wbytes,
        });
    }
    let xl = n_tokens.checked_mul(cols).ok_or(QuantError::Overflow {
        ty: GgmlType::F32,
        len: cols,
    })?;
    f32_len_check(xl, x.len())?;
    let yl = n_tokens.checked_mul(rows).ok_or(QuantError::Overflow {
        ty: GgmlType::F32,
        len: rows,
    })?;
    f32_len_check(yl, y.len())?;
    vec_dot_type(w).row_size(cols)?;
    if rows == 0 || n_tokens == 0 {
        return Ok(());
    }
    if cols == 0 {
        y.fill(0.0);
        return Ok(());
    }

    // Small products (LoRA factors, tiny models) cost less than waking the pool.
    let serial_max = if n_tokens == 1 && crate::pool::prefers_team() {
        TEAM_SERIAL_MAX_BYTES
    } else {
        SERIAL_MAX_BYTES
    };
    let serial = wbytes.saturating_mul(n_tokens) <= serial_max;
    // Taken, not borrowed: a rayon wait inside may run another product on this thread
    // (it then finds the cache empty and allocates).
    let mut cache = ACT_CACHE.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if cache.len() < n_tokens {
        cache.resize_with(n_tokens, Activations::default);
    }
    let acts = &mut cache[..n_tokens];
    if serial || n_tokens == 1 {
        for (a, xt) in acts.iter_mut().zip(x.chunks(cols)) {
            quantize_activations_into(lvl, w, xt, a)?;
        }
    } else {
        acts.par_iter_mut()
            .zip(x.par_chunks(cols))
            .try_for_each(|(a, xt)| quantize_activations_into(lvl, w, xt, a))?;
    }
    let result = products(lvl, w, f, weights, (rows, rb), acts, serial, y);
    ACT_CACHE.with(|c| *c.borrow_mut() = cache);
    result
}

/// The products of [`matmul_with`] once its activations are quantized.
/// `f` is the row kernel of `w` at `lvl`.
#[allow(clippy::too_many_arguments)]
fn products(
    lvl: Level,
    w: GgmlType,
    f: RowsFn,
    weights: &[u8],
    (rows, rb): (usize, usize),
    acts: &[Activations],
    serial: bool,
    y: &mut [f32],
) -> Result<(), QuantError> {
    let n_tokens = acts.len();
    let yl = y.len();

    if serial {
        match (n_tokens, tokens_fn(lvl, w)) {
            // Chunk-major output of one chunk holding every row is y's own layout.
            (2.., Some(m)) => m(weights, rb, acts, y),
            _ => {
                for (act, yt) in acts.iter().zip(y.chunks_mut(rows)) {
                    f(weights, rb, act, yt);
                }
            }
        }
        return Ok(());
    }

    if n_tokens == 1 {
        // A few large tasks per thread: enough to even out a slow thread, few enough
        // that each task streams a long run of consecutive rows. From outside rayon's
        // pool (decode) this runs on the persistent team, see `pool`.
        let threads = crate::pool::current_num_threads().max(1);
        let chunk = rows.div_ceil(threads * 4).min((TASK_MAX_BYTES / rb).max(1));
        let act = &acts[0];
        crate::pool::for_each_chunk_mut(y, chunk, |i, yc| {
            let start = i * chunk * rb;
            if let Some(wc) = weights.get(start..start + yc.len() * rb) {
                f(wc, rb, act, yc);
            }
        });
        return Ok(());
    }

    let threads = rayon::current_num_threads().max(1);

    // Several tokens: a chunk of rows small enough to stay in L2 is dotted with every
    // token before moving on. Results land chunk-major ([chunk][token][row]) so each
    // task owns one contiguous slice; they are scattered into y afterwards.
    let by_cache = (TOKEN_TILE_BYTES / rb).max(1);
    let by_threads = rows.div_ceil(threads * 2);
    let chunk = by_cache.min(by_threads).max(1);
    let multi = tokens_fn(lvl, w);
    let mut tmp = vec![0f32; yl];
    tmp.par_chunks_mut(chunk * n_tokens)
        .zip(weights.par_chunks(chunk * rb))
        .for_each(|(tc, wc)| {
            let cr = wc.len() / rb;
            if let Some(m) = multi {
                m(wc, rb, acts, tc);
                return;
            }
            for (act, out) in acts.iter().zip(tc.chunks_mut(cr)) {
                f(wc, rb, act, out);
            }
        });
    for (ci, tc) in tmp.chunks(chunk * n_tokens).enumerate() {
        let r0 = ci * chunk;
        let cr = tc.len() / n_tokens;
        for (t, src) in tc.chunks(cr).enumerate() {
            y[t * rows + r0..t * rows + r0 + cr].copy_from_slice(src);
        }
    }
    Ok(())
}
