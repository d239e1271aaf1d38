//! x86_64 AVX-512 (F/BW/VL) + VNNI kernels: Q4_0, Q8_0, Q4_K, Q5_K, Q6_K and the float
//! types. Other types run their AVX2 kernel at this level.
//!
//! Q4_0/Q8_0 take 4 blocks (a group) per step: every field of these blocks starts at
//! an even byte (blocks are 18 and 34 bytes), so word permutes (`vpermt2w`) gather
//! the group's values 0..16 of each block into one register and values 16..32 into
//! another, and its 4 f16 scales already replicated across the lanes they scale. The
//! activations are reordered the same way once per call ([`prepare`]), so a (row,
//! token) pair costs two `vpdpbusd`, one conversion and one scale FMA per 128 values.
//! Unsigned x signed products: the offsets (Q4_0's 8, Q8_0's +128 bias that makes
//! its weights unsigned) are subtracted through per-lane activation sums computed in
//! registers. A last partial group is read with masked loads. Rows are dotted one at
//! a time (one DRAM stream per thread; see avx2.rs), except by the multi-token
//! kernels (`tokens_fn`), which read L2-resident chunks in tiles of 3 rows x 4 tokens
//! and reduce all 12 sums together ([`hsums`]). Extra per-call arrays (precomputed
//! corrections, replicated scales) were measured to halve the streamed rate,
//! presumably by competing with the weight stream in L1 and in the prefetchers.
//! k-quants apply their sub-block scales with `vpackssdw` + `vpdpwssd` instead of
//! AVX2's shuffle + `vpmaddwd` per 16 values.

// Block formats index several tables with one position; explicit indices read better.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::f16_at;
use super::{Activations, Prep, RowsFn, TokensFn};
use crate::blocks::*;
use crate::kernels::scalar::k4_scales_mins;
use crate::{GgmlType, QK, QK_K};

pub(super) fn rows_fn(w: GgmlType) -> Option<RowsFn> {
    Some(match w {
        GgmlType::F32 => rows_f32,
        GgmlType::F16 => rows_f16,
        GgmlType::BF16 => rows_bf16,
        GgmlType::Q4_0 => rows_q4_0,
        GgmlType::Q5_0 => rows_q5_0,
        GgmlType::Q8_0 => rows_q8_0,
        GgmlType::Q4_K => rows_q4_k,
        GgmlType::Q5_K => rows_q5_k,
        GgmlType::Q6_K => rows_q6_k,
        _ => return None,
    })
}

pub(super) fn tokens_fn(w: GgmlType) -> Option<TokensFn> {
    Some(match w {
        GgmlType::F32 => toks_f32,
        GgmlType::F16 => toks_f16,
        GgmlType::BF16 => toks_bf16,
        GgmlType::Q4_0 => toks_q4_0,
        GgmlType::Q5_0 => toks_q5_0,
        GgmlType::Q8_0 => toks_q8_0,
        GgmlType::Q4_K => toks_q4_k,
        GgmlType::Q5_K => toks_q5_k,
        GgmlType::Q6_K => toks_q6_k,
        _ => return None,
    })
}

/// Tokens per pass of the multi-token kernels: each decoded weight block (quants
/// permuted and unbiased, f16 scales widened) is dotted with this many tokens.
const NT: usize = 4;

/// [`check`] for every token of a multi-token call; returns (rows, blocks per row).
fn check_tokens(
    t: GgmlType,
    w: &[u8],
    rb: usize,
    acts: &[Activations],
    out: &[f32],
) -> (usize, usize) {
    assert!(
        !acts.is_empty() && out.len().is_multiple_of(acts.len()),
        "kernel invariant violated for {t}"
    );
    let rows = out.len() / acts.len();
    let mut nb = 0;
    for a in acts {
        nb = check(t, w, rb, a, &out[..rows]);
    }
    (rows, nb)
}

/// Per-token pointers for one tile of up to [`NT`] tokens (unused slots repeat the
/// last token; the kernels read only the first `tile.len()`).
fn tile_ptrs<const K: usize>(
    tile: &[Activations],
    f: impl Fn(&Activations) -> *const u8,
) -> [*const u8; K] {
    std::array::from_fn(|i| f(&tile[i.min(tile.len() - 1)]))
}

/// Runs `k::<N>` for every row and every tile of tokens, N = tile size (1..=NT),
/// storing token-major.
macro_rules! tokens_driver {
    ($w:expr, $rb:expr, $acts:expr, $out:expr, $rows:expr, $nb:expr, $k:ident, |$tile:ident| $ptrs:expr) => {{
        for (ti, $tile) in $acts.chunks(NT).enumerate() {
            let ptrs = $ptrs;
            for (r, row) in $w.chunks_exact($rb).enumerate() {
                let mut res = [0f32; NT];
                // SAFETY: tokens_fn hands these kernels out only at Level::Avx512
                // (runtime-detected avx512f/bw/vl/vnni + the AVX2 set); every
                // activation was checked against the row size above, and the
                // kernel reads only the first N pointers of each array.
                unsafe {
                    match $tile.len() {
                        4 => $k::<4>(row.as_ptr(), $nb, &ptrs, &mut res),
                        3 => $k::<3>(row.as_ptr(), $nb, &ptrs, &mut res),
                        2 => $k::<2>(row.as_ptr(), $nb, &ptrs, &mut res),
                        _ => $k::<1>(row.as_ptr(), $nb, &ptrs, &mut res),
                    }
                }
                for (i, v) in res[..$tile.len()].iter().enumerate() {
                    $out[(ti * NT + i) * $rows + r] = *v;
                }
            }
        }
    }};
}

/// Rows per pass of the multi-token kernels at most (the length of their row
/// pointer and result arrays).
const TR: usize = 3;

/// Runs a kernel taking R rows x N tokens per pass (`k::<R, N>(rows, len, &ptrs,
/// &mut res)`, R <= `rmax` <= [`TR`], N <= [`NT`]) over every tile, storing
/// token-major. Row pointers past the tile's last row repeat it; the kernel reads
/// only the first R rows and N tokens.
macro_rules! tile_driver {
    ($w:expr, $rb:expr, $acts:expr, $out:expr, $rows:expr, $len:expr, $rmax:expr, $k:ident, |$tile:ident| $ptrs:expr) => {{
        let (w, rb, rows, len): (&[u8], usize, usize, usize) = ($w, $rb, $rows, $len);
        for (ti, $tile) in $acts.chunks(NT).enumerate() {
            let pt = $ptrs;
            let nt = $tile.len();
            let mut r = 0;
            while r < rows {
                let nr = (rows - r).min($rmax);
                let rp: [*const u8; TR] =
                    std::array::from_fn(|i| w[(r + i.min(nr - 1)) * rb..].as_ptr());
                let mut res = [[0f32; NT]; TR];
                // SAFETY: tokens_fn hands these kernels out only at Level::Avx512
                // (runtime-detected avx512f/bw/vl/vnni + the AVX2 set); every row
                // pointer starts a whole row of `w` (r + nr <= rows), every activation
                // was checked against the row size above, and the kernel reads only
                // the first nr rows and nt tokens.
                unsafe {
                    match (nr, nt) {
                        (3, 4) => $k::<3, 4>(rp, len, &pt, &mut res),
                        (3, 3) => $k::<3, 3>(rp, len, &pt, &mut res),
                        (3, 2) => $k::<3, 2>(rp, len, &pt, &mut res),
                        (3, _) => $k::<3, 1>(rp, len, &pt, &mut res),
                        (2, 4) => $k::<2, 4>(rp, len, &pt, &mut res),
                        (2, 3) => $k::<2, 3>(rp, len, &pt, &mut res),
                        (2, 2) => $k::<2, 2>(rp, len, &pt, &mut res),
                        (2, _) => $k::<2, 1>(rp, len, &pt, &mut res),
                        (_, 4) => $k::<1, 4>(rp, len, &pt, &mut res),
                        (_, 3) => $k::<1, 3>(rp, len, &pt, &mut res),
                        (_, 2) => $k::<1, 2>(rp, len, &pt, &mut res),
                        _ => $k::<1, 1>(rp, len, &pt, &mut res),
                    }
                }
                for (dr, rr) in res[..nr].iter().enumerate() {
                    for (i, v) in rr[..nt].iter().enumerate() {
                        $out[(ti * NT + i) * rows + r + dr] = *v;
                    }
                }
                r += nr;
            }
        }
    }};
}

/// Pointers a multi-token group kernel reads per token: prepared quants, f32 scales.
type GroupPtrs = ([*const u8; NT], [*const u8; NT]);

/// The 4-block group formats (Q4_0, Q5_0, Q8_0): same prepared activations, same
/// kernel shape.
macro_rules! toks_prepared {
    ($name:ident, $t:expr, $k:ident, $rows:ident, $tile_rows:expr) => {
        fn $name(w: &[u8], rb: usize, acts: &[Activations], out: &mut [f32]) {
            let (rows, nb) = check_tokens($t, w, rb, acts, out);
            let prepared = acts
                .iter()
                .all(|a| a.prep.for_ty == Some($t) && a.prep.y.len() >= nb.div_ceil(4) * 4 * QK);
            if !prepared {
                // activations built by hand: one token at a time (prepares its own terms)
                for (a, o) in acts.iter().zip(out.chunks_mut(rows)) {
                    $rows(w, rb, a, o);
                }
                return;
            }
            tile_driver!(w, rb, acts, out, rows, nb, $tile_rows, $k, |tile| {
                let p: GroupPtrs = (
                    tile_ptrs(tile, |a| a.prep.y.as_ptr() as *const u8),
                    tile_ptrs(tile, |a| a.d.as_ptr() as *const u8),
                );
                p
            });
        }
    };
}
toks_prepared!(toks_q4_0, GgmlType::Q4_0, k_q4_0_rn, rows_q4_0, 3);
// (Q5_0's 3-row tiles spill: 2 rows measured 5-10% faster)
toks_prepared!(toks_q5_0, GgmlType::Q5_0, k_q5_0_rn, rows_q5_0, 2);
toks_prepared!(toks_q8_0, GgmlType::Q8_0, k_q8_0_rn, rows_q8_0, 3);

/// k-quant kernels read one pointer per token: its Q8_K blocks.
type KPtrs = [*const u8; NT];

macro_rules! toks_k {
    ($name:ident, $t:expr, $k:ident) => {
        fn $name(w: &[u8], rb: usize, acts: &[Activations], out: &mut [f32]) {
            let (rows, nb) = check_tokens($t, w, rb, acts, out);
            tokens_driver!(w, rb, acts, out, rows, nb, $k, |tile| {
                let p: KPtrs = tile_ptrs(tile, |a| a.q8_k.as_ptr() as *const u8);
                p
            });
        }
    };
}
toks_k!(toks_q4_k, GgmlType::Q4_K, k_q4_k_n);
toks_k!(toks_q5_k, GgmlType::Q5_K, k_q5_k_n);
toks_k!(toks_q6_k, GgmlType::Q6_K, k_q6_k_n);

/// Same invariant check as the AVX2 level, plus the prepared terms for Q4_0/Q8_0.
fn check(t: GgmlType, w: &[u8], rb: usize, a: &Activations, out: &[f32]) -> usize {
    let n = rb / t.type_size() * t.block_size();
    let ok = w.len() == out.len() * rb
        && rb == n / t.block_size() * t.type_size()
        && match super::vec_dot_type(t) {
            GgmlType::Q8_0 => a.qs.len() >= n && a.d.len() * QK >= n,
            GgmlType::Q8_K => a.q8_k.len() * QK_K >= n,
            _ => a.f.len() >= n,
        };
    assert!(ok, "kernel invariant violated for {t}");
    n / t.block_size()
}

/// The prepared activation terms for `t` (Q4_0 or Q8_0): those made by
/// `quantize_activations` when they match, else made here (activations built by hand).
fn prep_for<'a>(t: GgmlType, a: &'a Activations, local: &'a mut Option<Prep>) -> &'a Prep {
    if a.prep.for_ty == Some(t) {
        return &a.prep;
    }
    let mut p = Prep::default();
    prepare_into(t, a, &mut p);
    local.insert(p)
}

/// Fills `a.prep` for weights of type `t` (a no-op for types without prepared terms).
pub(super) fn prepare(t: GgmlType, a: &mut Activations) {
    let mut p = std::mem::take(&mut a.prep);
    prepare_into(t, a, &mut p);
    a.prep = p;
}

fn prepare_into(t: GgmlType, a: &Activations, p: &mut Prep) {
    if !matches!(t, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0) {
        return;
    }
    // a last partial group is padded with zeros (the kernels read whole groups)
    let groups = a.qs.len().div_ceil(4 * QK);
    p.for_ty = Some(t);
    // every byte is written below (a partial group's padding with zeros)
    p.y.resize(groups * 4 * QK);
    // SAFETY: only reachable from this module's kernels or from quantize_activations
    // at a detected Level::Avx512; the buffer was sized for `groups` just above.
    unsafe { prepare_nibble_order(a, p, groups) }
}

/// Activations reordered per 4 blocks to the order of Q4_0's nibbles (and of the
/// Q8_0 kernel's gathers): values 0..16 of the 4 blocks, then values 16..32; the
/// same size as the quants they replace, so the row loop still reads one
/// activation array besides the scales.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn prepare_nibble_order(a: &Activations, p: &mut Prep, groups: usize) {
    let n = a.qs.len();
    for g in 0..groups {
        let q = a.qs.as_ptr().wrapping_add(128 * g);
        let left = n - 128 * g;
        let y0 = _mm512_maskz_loadu_epi8(first_bytes(left), q);
        let y1 = _mm512_maskz_loadu_epi8(first_bytes(left.saturating_sub(64)), q.wrapping_add(64));
        let ylo = _mm512_permutex2var_epi64(y0, ld_q8(&Y_LO), y1);
        let yhi = _mm512_permutex2var_epi64(y0, ld_q8(&Y_HI), y1);
        _mm512_storeu_si512(p.y.as_mut_ptr().add(128 * g) as *mut _, ylo);
        _mm512_storeu_si512(p.y.as_mut_ptr().add(128 * g + 64) as *mut _, yhi);
    }
}

macro_rules! rows {
    ($name:ident, $t:expr, $k:ident, prep) => {
        fn $name(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
            let nb = check($t, w, rb, a, out);
            let mut local = None;
            let p = prep_for($t, a, &mut local);
            assert!(p.y.len() >= nb.div_ceil(4) * 4 * QK);
            for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                // SAFETY: rows_fn hands this kernel out only at Level::Avx512, which
                // requires runtime detection of avx512f/bw/vl/vnni (and the AVX2 set);
                // sizes checked above.
                *o = unsafe { $k(row.as_ptr(), nb, a, p) };
            }
        }
    };
    ($name:ident, $t:expr, $k:ident) => {
        fn $name(w: &[u8], rb: usize, a: &Activations, out: &mut [f32]) {
            let nb = check($t, w, rb, a, out);
            for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                // SAFETY: as above: only reachable at a detected Level::Avx512.
                *o = unsafe { $k(row.as_ptr(), nb, a) };
            }
        }
    };
}

rows!(rows_f32, GgmlType::F32, k_f32);
rows!(rows_f16, GgmlType::F16, k_f16);
rows!(rows_bf16, GgmlType::BF16, k_bf16);
rows!(rows_q4_0, GgmlType::Q4_0, k_q4_0, prep);
rows!(rows_q5_0, GgmlType::Q5_0, k_q5_0, prep);
rows!(rows_q8_0, GgmlType::Q8_0, k_q8_0, prep);
rows!(rows_q4_k, GgmlType::Q4_K, k_q4_k);
rows!(rows_q5_k, GgmlType::Q5_K, k_q5_k);
rows!(rows_q6_k, GgmlType::Q6_K, k_q6_k);

// ---- permutation tables ------------------------------------------------------------

/// Word indices (into the 64 words of two registers) gathering, for 4 consecutive
/// blocks of `bw` words whose quants start at word 1, `qw` quant words per block:
/// block j's quants land at words j*qw .. (j+1)*qw. `base` is subtracted (second
/// half of Q8_0's 4-block group, read from registers starting at word 32).
/// Word indices (into the 64 words of two registers) gathering, for 4 consecutive
/// blocks of `bw` words whose quants start at word `first`, `qw` quant words per
/// block: block j's quants land at words j*qw .. (j+1)*qw.
const fn gather_qs(bw: u16, qw: u16, first: u16) -> [u16; 32] {
    let mut m = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        m[i] = i as u16 / qw * bw + first + i as u16 % qw;
        i += 1;
    }
    m
}

/// Words 0 and 1 of 128-bit lane j = words `first`, `first` + 1 of block j (blocks of
/// `bw` words; the lane's other words repeat them).
const fn gather_pair(bw: u16, first: u16) -> [u16; 32] {
    let mut m = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        m[i] = i as u16 / 8 * bw + first + i as u16 % 2;
        i += 1;
    }
    m
}

/// Per 128-bit lane: byte i = `base` + i / 8 (spreads a 16-bit half of a u32).
const fn spread_bytes(base: u8) -> [u8; 64] {
    let mut m = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        m[i] = base + (i % 16) as u8 / 8;
        i += 1;
    }
    m
}

/// Byte i = 1 << (i % 8).
const fn bit_of_byte() -> [u8; 64] {
    let mut m = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        m[i] = 1 << (i % 8);
        i += 1;
    }
    m
}

/// Word i = the f16 scale word of block i / per (blocks of `bw` words).
const fn gather_d(bw: u16, per: u16) -> [u16; 32] {
    let mut m = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        let j = (i as u16 / per) % 4;
        m[i] = j * bw;
        i += 1;
    }
    m
}

/// Lane i = `v[i / per]` (dword permute indices).
const fn spread(per: u32, first: u32) -> [u32; 16] {
    let mut m = [0u32; 16];
    let mut i = 0;
    while i < 16 {
        m[i] = first + i as u32 / per;
        i += 1;
    }
    m
}

static Q4_0_QS: [u16; 32] = gather_qs(9, 8, 1);
static Q4_0_D: [u16; 32] = gather_d(9, 4);
static Q5_0_QS: [u16; 32] = gather_qs(11, 8, 3);
static Q5_0_QH: [u16; 32] = gather_pair(11, 1);
static Q5_0_D: [u16; 32] = gather_d(11, 4);
static QH_LO_SEL: [u8; 64] = spread_bytes(0);
static QH_HI_SEL: [u8; 64] = spread_bytes(2);
static BIT_OF_BYTE: [u8; 64] = bit_of_byte();
static Q8_0_LO: [u16; 32] = gather_qs(17, 8, 1);
/// (from a window starting at byte 18 of the group: word 17j = block j's value 16)
static Q8_0_HI: [u16; 32] = gather_qs(17, 8, 0);
static Q8_0_D: [u16; 32] = gather_d(17, 4);
static BY4: [u32; 16] = spread(4, 0);
/// Q4_0 activation halves of 4 blocks: values 0..16 of each block, then 16..32.
static Y_LO: [u64; 8] = [0, 1, 4, 5, 8, 9, 12, 13];
static Y_HI: [u64; 8] = [2, 3, 6, 7, 10, 11, 14, 15];

/// Word permutes spreading i16 scales to match `vpackssdw(p_a, p_b)`: 128-bit lane k
/// holds 4 dwords of p_a then 4 of p_b; `f(k, second)` is the scale index for them.
const fn pack_scales(off: u16, kind: u8) -> [u16; 32] {
    let mut m = [0u16; 32];
    let mut w = 0;
    while w < 32 {
        let k = (w / 8) as u16;
        let second = (w % 8) >= 4;
        m[w] = off
            + match kind {
                // Q4_K: p_a lanes 0-7 = sub-block 0, 8-15 = 1; p_b = 2, 3
                0 => (if k < 2 { 0 } else { 1 }) + if second { 2 } else { 0 },
                // Q6_K: lane k of p_a = group k, of p_b = group 4 + k
                _ => k + if second { 4 } else { 0 },
            };
        w += 1;
    }
    m
}
static Q4_K_S01: [u16; 32] = pack_scales(0, 0);
static Q4_K_S23: [u16; 32] = pack_scales(4, 0);
static Q6_K_S0: [u16; 32] = pack_scales(0, 1);
static Q6_K_S1: [u16; 32] = pack_scales(8, 1);

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_w16(t: &[u16; 32]) -> __m512i {
    _mm512_loadu_si512(t.as_ptr() as *const _)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_d16(t: &[u32; 16]) -> __m512i {
    _mm512_loadu_si512(t.as_ptr() as *const _)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_b64(t: &[u8; 64]) -> __m512i {
    _mm512_loadu_si512(t.as_ptr() as *const _)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_q8(t: &[u64; 8]) -> __m512i {
    _mm512_loadu_si512(t.as_ptr() as *const _)
}

// ---- float weights -------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_f32(p: *const u8, i: usize, m: __mmask16) -> __m512 {
    _mm512_maskz_loadu_ps(m, (p as *const f32).add(i))
}
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_f16(p: *const u8, i: usize, m: __mmask16) -> __m512 {
    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.add(2 * i) as *const i16))
}
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_bf16(p: *const u8, i: usize, m: __mmask16) -> __m512 {
    let h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p.add(2 * i) as *const i16));
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
}

/// Float kernels: 2 x 16 lanes per step, masked loads for the tail (no scalar
/// remainder; masked-off lanes are not read).
macro_rules! float_kernel {
    ($name:ident, $load:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $name(p: *const u8, n: usize, a: &Activations) -> f32 {
            let x = a.f.as_ptr();
            let all: __mmask16 = 0xFFFF;
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            let mut i = 0;
            while i + 32 <= n {
                acc0 = _mm512_fmadd_ps($load(p, i, all), _mm512_loadu_ps(x.add(i)), acc0);
                acc1 = _mm512_fmadd_ps($load(p, i + 16, all), _mm512_loadu_ps(x.add(i + 16)), acc1);
                i += 32;
            }
            while i < n {
                let m: __mmask16 = if n - i >= 16 {
                    all
                } else {
                    (1u16 << (n - i)) - 1
                };
                acc0 = _mm512_fmadd_ps($load(p, i, m), _mm512_maskz_loadu_ps(m, x.add(i)), acc0);
                i += 16;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }
    };
}

float_kernel!(k_f32, ld_f32);
float_kernel!(k_f16, ld_f16);
float_kernel!(k_bf16, ld_bf16);

/// The float kernel for R rows (1..=TR) x N tokens (1..=NT) at once: each weight
/// vector is loaded (and widened, for F16/BF16) once for N tokens and each token's
/// vector once for R rows, so a step issues R + N loads for R x N FMAs instead of
/// two loads per FMA. Per (row, token) exactly the single-row kernel's operations in
/// its order (two accumulators over alternate 16-lane steps, masked tail into the
/// first, one reduction), so results are equal bit for bit. R x N x 2 accumulators
/// (24 at 3 x 4) plus R weight vectors and one token vector fit in the 32 registers.
macro_rules! float_tokens_kernel {
    ($name:ident, $load:ident) => {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $name<const R: usize, const N: usize>(
            w: [*const u8; TR],
            n: usize,
            xs: &[*const f32; NT],
            res: &mut [[f32; NT]; TR],
        ) {
            let all: __mmask16 = 0xFFFF;
            let mut acc0 = [[_mm512_setzero_ps(); N]; R];
            let mut acc1 = [[_mm512_setzero_ps(); N]; R];
            let mut i = 0;
            while i + 32 <= n {
                let wv: [__m512; R] = std::array::from_fn(|r| $load(w[r], i, all));
                for t in 0..N {
                    let xv = _mm512_loadu_ps(xs[t].add(i));
                    for r in 0..R {
                        acc0[r][t] = _mm512_fmadd_ps(wv[r], xv, acc0[r][t]);
                    }
                }
                let wv: [__m512; R] = std::array::from_fn(|r| $load(w[r], i + 16, all));
                for t in 0..N {
                    let xv = _mm512_loadu_ps(xs[t].add(i + 16));
                    for r in 0..R {
                        acc1[r][t] = _mm512_fmadd_ps(wv[r], xv, acc1[r][t]);
                    }
                }
                i += 32;
            }
            while i < n {
                let m: __mmask16 = if n - i >= 16 {
                    all
                } else {
                    (1u16 << (n - i)) - 1
                };
                let wv: [__m512; R] = std::array::from_fn(|r| $load(w[r], i, m));
                for t in 0..N {
                    let xv = _mm512_maskz_loadu_ps(m, xs[t].add(i));
                    for r in 0..R {
                        acc0[r][t] = _mm512_fmadd_ps(wv[r], xv, acc0[r][t]);
                    }
                }
                i += 16;
            }
            for r in 0..R {
                for t in 0..N {
                    res[r][t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][t], acc1[r][t]));
                }
            }
        }
    };
}

float_tokens_kernel!(k_f32_rn, ld_f32);
float_tokens_kernel!(k_f16_rn, ld_f16);
float_tokens_kernel!(k_bf16_rn, ld_bf16);

/// Multi-token driver for the float kernels: [`TR`] rows x [`NT`] tokens per pass
/// (smaller for the last rows and tokens), storing token-major.
macro_rules! toks_float {
    ($name:ident, $t:expr, $k:ident) => {
        fn $name(w: &[u8], rb: usize, acts: &[Activations], out: &mut [f32]) {
            let (rows, n) = check_tokens($t, w, rb, acts, out);
            tile_driver!(w, rb, acts, out, rows, n, TR, $k, |tile| {
                let xs: [*const f32; NT] =
                    std::array::from_fn(|i| tile[i.min(tile.len() - 1)].f.as_ptr());
                xs
            });
        }
    };
}

toks_float!(toks_f32, GgmlType::F32, k_f32_rn);
toks_float!(toks_f16, GgmlType::F16, k_f16_rn);
toks_float!(toks_bf16, GgmlType::BF16, k_bf16_rn);

// ---- horizontal sums ------------------------------------------------------------------

/// The sum of a register's 16 lanes in a fixed order: lane i + lane i^8, then i^4,
/// i^2, i^1 ([`hsums`] adds every register in this same order).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn hsum16(v: __m512) -> f32 {
    let a = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v));
    let b = _mm512_add_ps(a, _mm512_shuffle_f32x4::<0b10_11_00_01>(a, a));
    let c = _mm512_add_ps(b, _mm512_permute_ps::<0b01_00_11_10>(b));
    let d = _mm512_add_ps(c, _mm512_permute_ps::<0b10_11_00_01>(c));
    _mm_cvtss_f32(_mm512_castps512_ps128(d))
}

/// Horizontal sums of the first `k` (<= 16) of `v`, each added in [`hsum16`]'s order
/// (so a sum does not depend on which others it was computed with), transposing as
/// it goes: 15 shuffle pairs for 16 registers instead of 4 per register. Sum `i` is
/// lane [`hsum_lane`]`(i)` of the result.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn hsums(v: &[__m512; 16], k: usize) -> [f32; 16] {
    let z = _mm512_setzero_ps();
    let at = |s: &[__m512; 16], i: usize, n: usize| if i < n { s[i] } else { z };
    // lanes i and i + 8: register m = [v[2m] (8 lanes), v[2m + 1] (8 lanes)]
    let mut a = [z; 16];
    let na = k.div_ceil(2);
    for m in 0..na {
        let (x, y) = (v[2 * m], at(v, 2 * m + 1, k));
        a[m] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
        );
    }
    // lanes i and i + 4: 128-bit lane j of register m = v[4m + j] (4 lanes)
    let nb = na.div_ceil(2);
    for m in 0..nb {
        let (x, y) = (a[2 * m], at(&a, 2 * m + 1, na));
        a[m] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        );
    }
    // lanes i and i + 2: 128-bit lane j of register m = [v[8m + j] x2, v[8m + 4 + j] x2]
    let nc = nb.div_ceil(2);
    for m in 0..nc {
        let (x, y) = (a[2 * m], at(&a, 2 * m + 1, nb));
        a[m] = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
        );
    }
    // lanes i and i + 1: lane 4j + e = v[4e + j]
    let (x, y) = (a[0], at(&a, 1, nc));
    let d = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(x, y),
        _mm512_shuffle_ps::<0b11_01_11_01>(x, y),
    );
    let mut out = [0f32; 16];
    _mm512_storeu_ps(out.as_mut_ptr(), d);
    out
}

/// The lane of [`hsums`]'s result holding sum `i`.
const fn hsum_lane(i: usize) -> usize {
    4 * (i % 4) + i / 4
}

/// Mask of the first `n` bytes of a 64-byte load (all of them from 64 on).
#[inline]
fn first_bytes(n: usize) -> __mmask64 {
    if n >= 64 {
        !0
    } else {
        (1u64 << n) - 1
    }
}

// ---- 4-block group kernels: Q4_0, Q5_0, Q8_0 ---------------------------------------
//
// A row is taken 4 blocks (one group) at a time: one register holds values 0..16 of
// the group's blocks (block j in 128-bit lane j), another values 16..32, unsigned
// (Q4_0/Q5_0 as stored, Q8_0 biased by +128); the prepared activations are in the
// same order. A (row, token) pair then costs two `vpdpbusd` from -offset * sum(y),
// one conversion and one scale FMA per 128 values. A last group of k < 4 blocks is
// read with masked loads, its missing blocks' quants, scales and activations zero
// (so they add exactly 0). The row kernel and the multi-token kernel run the same
// group helpers and accumulate one register per (row, token) in the same order, so
// they agree bit for bit.

/// A token's terms for group `g` (`k` blocks): its prepared quants (zero-padded),
/// -offset * their per-lane sums (so `vpdpbusd(q, y)` from there sums
/// (q - offset) * y), its block scales spread per lane (missing blocks 0).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn group_token(
    off: __m512i,
    by4: __m512i,
    y: *const i8,
    d: *const f32,
    g: usize,
    k: usize,
) -> (__m512i, __m512i, __m512i, __m512) {
    let zero = _mm512_setzero_si512();
    let ylo = _mm512_loadu_si512(y.add(128 * g) as *const _);
    let yhi = _mm512_loadu_si512(y.add(128 * g + 64) as *const _);
    let c = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, off, ylo), off, yhi);
    let neg = _mm512_sub_epi32(zero, c);
    let d4 = if k == 4 {
        _mm_loadu_ps(d.add(4 * g))
    } else {
        _mm_maskz_loadu_ps((1u8 << k) - 1, d.add(4 * g))
    };
    let dy = _mm512_permutexvar_ps(by4, _mm512_castps128_ps512(d4));
    (ylo, yhi, neg, dy)
}

/// One (row, token) step of a group.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn group_step(
    (lo, hi, dw): (__m512i, __m512i, __m512),
    (ylo, yhi, neg, dy): (__m512i, __m512i, __m512i, __m512),
    acc: __m512,
) -> __m512 {
    let s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(neg, lo, ylo), hi, yhi);
    _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, dy), acc)
}

/// Q4_0 kernel constants.
#[derive(Clone, Copy)]
struct Q4c {
    m4: __m512i,
    off: __m512i,
    qidx: __m512i,
    didx: __m512i,
    by4: __m512i,
}

impl Q4c {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn new() -> Self {
        Q4c {
            m4: _mm512_set1_epi8(0x0F),
            off: _mm512_set1_epi8(8),
            qidx: ld_w16(&Q4_0_QS),
            didx: ld_w16(&Q4_0_D),
            by4: ld_d16(&BY4),
        }
    }

    /// Group `g` of the row at `w` (`k` blocks present): low nibbles, high nibbles,
    /// the f16 scales widened per lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn weights(&self, w: *const u8, g: usize, k: usize) -> (__m512i, __m512i, __m512) {
        let p = w.wrapping_add(72 * g);
        let (lo_bytes, hi_bytes) = if k == 4 {
            let hi = _mm512_maskz_loadu_epi8(0xFF, p.add(64) as *const i8);
            (_mm512_loadu_si512(p as *const _), hi)
        } else {
            // at most 3 blocks: 54 bytes
            let lo = _mm512_maskz_loadu_epi8(first_bytes(18 * k), p as *const i8);
            (lo, _mm512_setzero_si512())
        };
        let q = _mm512_permutex2var_epi16(lo_bytes, self.qidx, hi_bytes);
        let lo = _mm512_and_si512(q, self.m4);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), self.m4);
        let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(
            self.didx, lo_bytes,
        )));
        (lo, hi, dw)
    }
}

/// Q5_0 kernel constants.
#[derive(Clone, Copy)]
struct Q5c {
    m4: __m512i,
    b4: __m512i,
    off: __m512i,
    qidx: __m512i,
    qhidx: __m512i,
    didx: __m512i,
    lo_sel: __m512i,
    hi_sel: __m512i,
    bits: __m512i,
    by4: __m512i,
}

impl Q5c {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn new() -> Self {
        Q5c {
            m4: _mm512_set1_epi8(0x0F),
            b4: _mm512_set1_epi8(0x10),
            off: _mm512_set1_epi8(16),
            qidx: ld_w16(&Q5_0_QS),
            qhidx: ld_w16(&Q5_0_QH),
            didx: ld_w16(&Q5_0_D),
            lo_sel: ld_b64(&QH_LO_SEL),
            hi_sel: ld_b64(&QH_HI_SEL),
            bits: ld_b64(&BIT_OF_BYTE),
            by4: ld_d16(&BY4),
        }
    }

    /// Group `g` of the row at `w` (`k` blocks present): 5-bit values 0..16 and
    /// 16..32 of each block, the f16 scales widened per lane. Bit i of block j's qh
    /// lands in byte i of lane j: a byte shuffle spreads qh's bytes 8 lanes each and
    /// `vptestmb` against 1 << (i % 8) picks the bit. (Building the two 64-bit byte
    /// masks from qh in scalar registers instead measured 10-30% slower.)
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn weights(&self, w: *const u8, g: usize, k: usize) -> (__m512i, __m512i, __m512) {
        let p = w.wrapping_add(88 * g);
        let n = 22 * k;
        let v0 = if k == 4 {
            _mm512_loadu_si512(p as *const _)
        } else {
            _mm512_maskz_loadu_epi8(first_bytes(n), p as *const i8)
        };
        // bytes 64..88 (the group's end)
        let v1 = _mm512_maskz_loadu_epi8(
            first_bytes(n.saturating_sub(64)),
            p.wrapping_add(64) as *const i8,
        );
        let q = _mm512_permutex2var_epi16(v0, self.qidx, v1);
        let qh = _mm512_permutex2var_epi16(v0, self.qhidx, v1);
        let lo_high = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, self.lo_sel), self.bits);
        let hi_high = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, self.hi_sel), self.bits);
        let lo = _mm512_and_si512(q, self.m4);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), self.m4);
        let lo = _mm512_mask_add_epi8(lo, lo_high, lo, self.b4);
        let hi = _mm512_mask_add_epi8(hi, hi_high, hi, self.b4);
        let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(
            v0, self.didx, v1,
        )));
        (lo, hi, dw)
    }
}

/// Q8_0 kernel constants.
#[derive(Clone, Copy)]
struct Q8c {
    /// -128: the weights' bias (xor) and, as an unsigned byte, the offset.
    off: __m512i,
    lo_idx: __m512i,
    hi_idx: __m512i,
    didx: __m512i,
    by4: __m512i,
}

impl Q8c {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn new() -> Self {
        Q8c {
            off: _mm512_set1_epi8(-128),
            lo_idx: ld_w16(&Q8_0_LO),
            hi_idx: ld_w16(&Q8_0_HI),
            didx: ld_w16(&Q8_0_D),
            by4: ld_d16(&BY4),
        }
    }

    /// Group `g` of the row at `w` (`k` blocks present): values 0..16 and 16..32 of
    /// each block biased by +128 (xor 0x80) to be unsigned, f16 scales widened per
    /// lane. The first half comes from bytes 0..128 of the group, the second from
    /// 18..136.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn weights(&self, w: *const u8, g: usize, k: usize) -> (__m512i, __m512i, __m512) {
        let p = w.wrapping_add(136 * g);
        let at = |o: usize| p.wrapping_add(o) as *const i8;
        let (v0, v1, h0) = if k == 4 {
            (
                _mm512_loadu_si512(p as *const _),
                _mm512_loadu_si512(p.add(64) as *const _),
                _mm512_loadu_si512(p.add(18) as *const _),
            )
        } else {
            let n = 34 * k;
            (
                _mm512_maskz_loadu_epi8(first_bytes(n), at(0)),
                _mm512_maskz_loadu_epi8(first_bytes(n.saturating_sub(64)), at(64)),
                _mm512_maskz_loadu_epi8(first_bytes(n - 18), at(18)),
            )
        };
        // bytes 82..136 (the group's end: a full load would cross into the next row)
        let h1 = _mm512_maskz_loadu_epi8(first_bytes((34 * k).saturating_sub(82)), at(82));
        let lo = _mm512_xor_si512(_mm512_permutex2var_epi16(v0, self.lo_idx, v1), self.off);
        let hi = _mm512_xor_si512(_mm512_permutex2var_epi16(h0, self.hi_idx, h1), self.off);
        let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(
            v0, self.didx, v1,
        )));
        (lo, hi, dw)
    }
}

/// The row kernel `$row`, the R x N multi-token kernel `$rn` and their group step
/// `$group` for the format with constants `$c`.
macro_rules! group_kernels {
    ($c:ident, $row:ident, $rn:ident, $group:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $row(w: *const u8, nb: usize, a: &Activations, pr: &Prep) -> f32 {
            let c = $c::new();
            let (y, d) = (pr.y.as_ptr(), a.d.as_ptr());
            let mut acc = _mm512_setzero_ps();
            for g in 0..nb / 4 {
                let t = group_token(c.off, c.by4, y, d, g, 4);
                acc = group_step(c.weights(w, g, 4), t, acc);
            }
            if !nb.is_multiple_of(4) {
                let (g, k) = (nb / 4, nb % 4);
                let t = group_token(c.off, c.by4, y, d, g, k);
                acc = group_step(c.weights(w, g, k), t, acc);
            }
            hsum16(acc)
        }

        /// Group `g` (`k` blocks) of R rows x N tokens into `acc`. (A function, not
        /// a closure or `array::from_fn`: closures have no target features, and one
        /// kept the weights helper out of line, 20% of prefill time in the call.)
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $group<const R: usize, const N: usize>(
            c: &$c,
            w: &[*const u8; TR],
            pt: &GroupPtrs,
            g: usize,
            k: usize,
            acc: &mut [[__m512; N]; R],
        ) {
            let zi = _mm512_setzero_si512();
            let mut wv = [(zi, zi, _mm512_setzero_ps()); R];
            for r in 0..R {
                wv[r] = c.weights(w[r], g, k);
            }
            for t in 0..N {
                let yv = group_token(
                    c.off,
                    c.by4,
                    pt.0[t] as *const i8,
                    pt.1[t] as *const f32,
                    g,
                    k,
                );
                for r in 0..R {
                    acc[r][t] = group_step(wv[r], yv, acc[r][t]);
                }
            }
        }

        /// The row kernel for R rows (1..=3) x N tokens at once: each group's weights
        /// are decoded once per row, each token's terms once for all rows; per (row,
        /// token) exactly the row kernel's operations in its order. 3 x 4: 12
        /// accumulators + 9 row + 4 token registers.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $rn<const R: usize, const N: usize>(
            w: [*const u8; TR],
            nb: usize,
            pt: &GroupPtrs,
            res: &mut [[f32; NT]; TR],
        ) {
            let c = $c::new();
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            for g in 0..nb / 4 {
                $group(&c, &w, pt, g, 4, &mut acc);
            }
            if !nb.is_multiple_of(4) {
                $group(&c, &w, pt, nb / 4, nb % 4, &mut acc);
            }
            store_sums(&acc, res);
        }
    };
}

group_kernels!(Q4c, k_q4_0, k_q4_0_rn, q4_0_group);
group_kernels!(Q5c, k_q5_0, k_q5_0_rn, q5_0_group);
group_kernels!(Q8c, k_q8_0, k_q8_0_rn, q8_0_group);

/// `res[r][t] = hsum16(acc[r][t])`, through [`hsums`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn store_sums<const R: usize, const N: usize>(
    acc: &[[__m512; N]; R],
    res: &mut [[f32; NT]; TR],
) {
    let mut flat = [_mm512_setzero_ps(); 16];
    for r in 0..R {
        for t in 0..N {
            flat[r * N + t] = acc[r][t];
        }
    }
    let sums = hsums(&flat, R * N);
    for r in 0..R {
        for t in 0..N {
            res[r][t] = sums[hsum_lane(r * N + t)];
        }
    }
}

// ---- k-quants --------------------------------------------------------------------------

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_q4_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    k4::<false>(w, nb, a)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_q5_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    k4::<true>(w, nb, a)
}

/// Q4_K (`Q5 == false`, 144-byte blocks) and Q5_K (176-byte blocks: qh's bit 2c / 2c+1
/// of byte l adds 16 to value 64c+l / 64c+32+l).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k4<const Q5: bool>(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let m4 = _mm512_set1_epi8(0x0F);
    let b4 = _mm512_set1_epi8(0x10);
    let (s01_i, s23_i) = (ld_w16(&Q4_K_S01), ld_w16(&Q4_K_S23));
    let zero = _mm512_setzero_si512();
    let mut acc = _mm512_setzero_ps();
    let mut accm = _mm_setzero_ps();
    for b in 0..nb {
        // the two layouts share d, dmin, scales; Q5_K has qh[32] before qs
        let (x, qh) = if Q5 {
            let x = &*(w.add(176 * b) as *const BlockQ5_K);
            (x.qs.as_ptr(), x.qh.as_ptr())
        } else {
            let x = &*(w.add(144 * b) as *const BlockQ4_K);
            (x.qs.as_ptr(), x.qs.as_ptr())
        };
        let head = &*(w.add(if Q5 { 176 } else { 144 } * b) as *const [u8; 16]);
        let y = a.q8_k.get_unchecked(b);
        let d = y.d * f16_at(head.as_ptr());
        let dmin = y.d * f16_at(head.as_ptr().add(2));
        let scales: &[u8; 12] = &*(head.as_ptr().add(4) as *const [u8; 12]);
        let (sc, m) = k4_scales_mins(scales);
        // mins: sum_j m_j * (bsum_2j + bsum_2j+1)
        let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr() as *const __m128i));
        let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
        let pairs = _mm_hadd_epi16(
            _mm256_castsi256_si128(bs),
            _mm256_extracti128_si256::<1>(bs),
        );
        accm = _mm_fmadd_ps(
            _mm_set1_ps(dmin),
            _mm_cvtepi32_ps(_mm_madd_epi16(mins, pairs)),
            accm,
        );
        let sc16 = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(
            sc.as_ptr() as *const __m128i
        )));
        let h = if Q5 {
            _mm512_broadcast_i64x4(_mm256_loadu_si256(qh as *const __m256i))
        } else {
            zero
        };
        // p_c: lanes 0-7 sum sub-block 2c, lanes 8-15 sub-block 2c+1 (|lane| <= 4*31*128)
        let mut p = [zero; 4];
        for (c, pc) in p.iter_mut().enumerate() {
            let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(x.add(32 * c) as *const __m256i));
            let mut q = _mm512_and_si512(_mm512_mask_srli_epi16::<4>(q, 0xFFFF_0000, q), m4);
            if Q5 {
                let bits = _mm512_inserti64x4::<1>(
                    _mm512_set1_epi8(1 << (2 * c)),
                    _mm256_set1_epi8(1 << (2 * c + 1)),
                );
                q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(h, bits), q, b4);
            }
            let yv = _mm512_loadu_si512(y.qs.as_ptr().add(64 * c) as *const _);
            *pc = _mm512_dpbusd_epi32(zero, q, yv);
        }
        let s01 = _mm512_permutexvar_epi16(s01_i, sc16);
        let s23 = _mm512_permutexvar_epi16(s23_i, sc16);
        let isum = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(p[0], p[1]), s01);
        let isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(p[2], p[3]), s23);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum), acc);
    }
    let m = _mm_add_ps(accm, _mm_movehl_ps(accm, accm));
    let m = _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
    _mm512_reduce_add_ps(acc) - m
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_q4_k_n<const N: usize>(w: *const u8, nb: usize, pt: &KPtrs, res: &mut [f32; NT]) {
    k4_n::<N, false>(w, nb, pt, res)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_q5_k_n<const N: usize>(w: *const u8, nb: usize, pt: &KPtrs, res: &mut [f32; NT]) {
    k4_n::<N, true>(w, nb, pt, res)
}

/// [`k4`] for N tokens at once: scales/mins unpacked, quants (and Q5_K's high
/// bits) decoded and scale permutes done once per block; per token exactly `k4`'s
/// operations in its order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k4_n<const N: usize, const Q5: bool>(
    w: *const u8,
    nb: usize,
    pt: &KPtrs,
    res: &mut [f32; NT],
) {
    let m4 = _mm512_set1_epi8(0x0F);
    let b4 = _mm512_set1_epi8(0x10);
    let (s01_i, s23_i) = (ld_w16(&Q4_K_S01), ld_w16(&Q4_K_S23));
    let zero = _mm512_setzero_si512();
    let ys: [*const BlockQ8_K; N] = std::array::from_fn(|t| pt[t] as *const BlockQ8_K);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut accm = [_mm_setzero_ps(); N];
    for b in 0..nb {
        let (x, qh) = if Q5 {
            let x = &*(w.add(176 * b) as *const BlockQ5_K);
            (x.qs.as_ptr(), x.qh.as_ptr())
        } else {
            let x = &*(w.add(144 * b) as *const BlockQ4_K);
            (x.qs.as_ptr(), x.qs.as_ptr())
        };
        let head = &*(w.add(if Q5 { 176 } else { 144 } * b) as *const [u8; 16]);
        let dw = f16_at(head.as_ptr());
        let dminw = f16_at(head.as_ptr().add(2));
        let scales: &[u8; 12] = &*(head.as_ptr().add(4) as *const [u8; 12]);
        let (sc, m) = k4_scales_mins(scales);
        let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr() as *const __m128i));
        let sc16 = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(
            sc.as_ptr() as *const __m128i
        )));
        let h = if Q5 {
            _mm512_broadcast_i64x4(_mm256_loadu_si256(qh as *const __m256i))
        } else {
            zero
        };
        let mut q = [zero; 4];
        for (c, qc) in q.iter_mut().enumerate() {
            let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(x.add(32 * c) as *const __m256i));
            let mut v = _mm512_and_si512(_mm512_mask_srli_epi16::<4>(v, 0xFFFF_0000, v), m4);
            if Q5 {
                let bits = _mm512_inserti64x4::<1>(
                    _mm512_set1_epi8(1 << (2 * c)),
                    _mm256_set1_epi8(1 << (2 * c + 1)),
                );
                v = _mm512_mask_add_epi8(v, _mm512_test_epi8_mask(h, bits), v, b4);
            }
            *qc = v;
        }
        let s01 = _mm512_permutexvar_epi16(s01_i, sc16);
        let s23 = _mm512_permutexvar_epi16(s23_i, sc16);
        for t in 0..N {
            let y = &*ys[t].add(b);
            let d = y.d * dw;
            let dmin = y.d * dminw;
            let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let pairs = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            accm[t] = _mm_fmadd_ps(
                _mm_set1_ps(dmin),
                _mm_cvtepi32_ps(_mm_madd_epi16(mins, pairs)),
                accm[t],
            );
            let mut p = [zero; 4];
            for c in 0..4 {
                let yv = _mm512_loadu_si512(y.qs.as_ptr().add(64 * c) as *const _);
                p[c] = _mm512_dpbusd_epi32(zero, q[c], yv);
            }
            let isum = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(p[0], p[1]), s01);
            let isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(p[2], p[3]), s23);
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum), acc[t]);
        }
    }
    for t in 0..N {
        let m = _mm_add_ps(accm[t], _mm_movehl_ps(accm[t], accm[t]));
        let m = _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
        res[t] = _mm512_reduce_add_ps(acc[t]) - m;
    }
}

/// [`k_q6_k`] for N tokens at once: the 6-bit values and scale permutes are built
/// once per block; per token exactly `k_q6_k`'s operations in its order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_q6_k_n<const N: usize>(w: *const u8, nb: usize, pt: &KPtrs, res: &mut [f32; NT]) {
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    let s_i = [ld_w16(&Q6_K_S0), ld_w16(&Q6_K_S1)];
    let zero = _mm512_setzero_si512();
    let upper: __mmask32 = 0xFFFF_0000;
    let ys: [*const BlockQ8_K; N] = std::array::from_fn(|t| pt[t] as *const BlockQ8_K);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        let x = &*(w.add(210 * b) as *const BlockQ6_K);
        let dw = f16_at(x.d.as_ptr());
        let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr() as *const __m128i));
        let sc16 = _mm512_zextsi256_si512(sc);
        let mut q = [[zero; 2]; 2];
        let mut s = [zero; 2];
        for n in 0..2 {
            let l = _mm512_loadu_si512(x.ql.as_ptr().add(64 * n) as *const _);
            let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                x.qh.as_ptr().add(32 * n) as *const __m256i
            ));
            let h_lo = _mm512_mask_slli_epi16::<2>(_mm512_slli_epi16::<4>(h), upper, h);
            q[n][0] = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_and_si512(h_lo, m30));
            let h_hi = _mm512_mask_srli_epi16::<2>(h, upper, h);
            q[n][1] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(l), m4),
                _mm512_and_si512(h_hi, m30),
            );
            s[n] = _mm512_permutexvar_epi16(s_i[n], sc16);
        }
        for t in 0..N {
            let y = &*ys[t].add(b);
            let d = y.d * dw;
            let corr = _mm256_slli_epi32::<5>(_mm256_madd_epi16(
                sc,
                _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i),
            ));
            let mut isum = _mm512_sub_epi32(zero, _mm512_zextsi256_si512(corr));
            for n in 0..2 {
                let ylo = _mm512_loadu_si512(y.qs.as_ptr().add(128 * n) as *const _);
                let yhi = _mm512_loadu_si512(y.qs.as_ptr().add(128 * n + 64) as *const _);
                let pa = _mm512_dpbusd_epi32(zero, q[n][0], ylo);
                let pb = _mm512_dpbusd_epi32(zero, q[n][1], yhi);
                isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(pa, pb), s[n]);
            }
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum), acc[t]);
        }
    }
    for t in 0..N {
        res[t] = _mm512_reduce_add_ps(acc[t]);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_q6_k(w: *const u8, nb: usize, a: &Activations) -> f32 {
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    let s_i = [ld_w16(&Q6_K_S0), ld_w16(&Q6_K_S1)];
    let zero = _mm512_setzero_si512();
    let upper: __mmask32 = 0xFFFF_0000;
    let mut acc = _mm512_setzero_ps();
    for b in 0..nb {
        let x = &*(w.add(210 * b) as *const BlockQ6_K);
        let y = a.q8_k.get_unchecked(b);
        let d = y.d * f16_at(x.d.as_ptr());
        let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr() as *const __m128i));
        // sum_g sc_g * 32 * bsum_g: the -32 offset of every 6-bit value
        let corr = _mm256_slli_epi32::<5>(_mm256_madd_epi16(
            sc,
            _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i),
        ));
        let sc16 = _mm512_zextsi256_si512(sc);
        let mut isum = _mm512_sub_epi32(zero, _mm512_zextsi256_si512(corr));
        for n in 0..2 {
            let l = _mm512_loadu_si512(x.ql.as_ptr().add(64 * n) as *const _);
            let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                x.qh.as_ptr().add(32 * n) as *const __m256i
            ));
            // values e..e+64: low nibbles, qh bits 0-1 (first 32) / 2-3 (next 32) to bits 4-5
            let h_lo = _mm512_mask_slli_epi16::<2>(_mm512_slli_epi16::<4>(h), upper, h);
            let q_lo = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_and_si512(h_lo, m30));
            // values e+64..e+128: high nibbles, qh bits 4-5 / 6-7
            let h_hi = _mm512_mask_srli_epi16::<2>(h, upper, h);
            let q_hi = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(l), m4),
                _mm512_and_si512(h_hi, m30),
            );
            let ylo = _mm512_loadu_si512(y.qs.as_ptr().add(128 * n) as *const _);
            let yhi = _mm512_loadu_si512(y.qs.as_ptr().add(128 * n + 64) as *const _);
            // 128-bit lane k of p_a sums group 8n+k, of p_b group 8n+4+k (|lane| <= 4*63*128)
            let pa = _mm512_dpbusd_epi32(zero, q_lo, ylo);
            let pb = _mm512_dpbusd_epi32(zero, q_hi, yhi);
            let s = _mm512_permutexvar_epi16(s_i[n], sc16);
            isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(pa, pb), s);
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum), acc);
    }
    _mm512_reduce_add_ps(acc)
}
