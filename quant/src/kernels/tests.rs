//! Every SIMD level against the scalar reference, matmul against vec_dot, and
//! vec_dot against a float dot of the dequantized operands.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::blocks::f32_to_f16;

const WEIGHT_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Byte offsets of the f16 scale fields in one block.
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

#[derive(Clone, Copy, PartialEq)]
enum Scales {
    /// Random scales: the general case.
    Random,
    /// All scales 1: every float in the kernels holds an integer, so SIMD and
    /// scalar must agree exactly (the integer block sums are compared bit for bit).
    Unit,
}

/// `rows` random weight rows of `n` elements: random quant bits, scales per `sc`.
fn random_weights(rng: &mut StdRng, t: GgmlType, rows: usize, n: usize, sc: Scales) -> Vec<u8> {
    let rb = t.row_size(n).unwrap();
    let mut w: Vec<u8> = (0..rows * rb).map(|_| rng.gen()).collect();
    let scale = |rng: &mut StdRng| match sc {
        Scales::Random => rng.gen_range(-0.05f32..0.05),
        Scales::Unit => 1.0,
    };
    match t {
        GgmlType::F32 => {
            for c in w.chunks_exact_mut(4) {
                let v = match sc {
                    Scales::Random => rng.gen_range(-1f32..1.0),
                    Scales::Unit => rng.gen_range(-64i32..64) as f32,
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            for c in w.chunks_exact_mut(2) {
                let v = match sc {
                    Scales::Random => rng.gen_range(-1f32..1.0),
                    Scales::Unit => rng.gen_range(-64i32..64) as f32,
                };
                let b = if t == GgmlType::F16 {
                    half::f16::from_f32(v).to_bits()
                } else {
                    half::bf16::from_f32(v).to_bits()
                };
                c.copy_from_slice(&b.to_le_bytes());
            }
        }
        _ => {
            for blk in w.chunks_exact_mut(t.type_size()) {
                for &o in f16_fields(t) {
                    let v = scale(rng);
                    blk[o..o + 2].copy_from_slice(&f32_to_f16(v));
                }
            }
        }
    }
    w
}

/// Random activations of type `vec_dot_type(t)`, quants in [-127, 127]
/// (`extreme`: only -127 and 127), built directly so this does not depend on the
/// activation quantizers.
fn random_acts(rng: &mut StdRng, t: GgmlType, n: usize, sc: Scales, extreme: bool) -> Activations {
    let q = |rng: &mut StdRng| -> i8 {
        if extreme {
            if rng.gen::<bool>() {
                127
            } else {
                -127
            }
        } else {
            rng.gen_range(-127i8..=127)
        }
    };
    let d = |rng: &mut StdRng| match sc {
        Scales::Random => rng.gen_range(0.001f32..0.02),
        Scales::Unit => 1.0,
    };
    match vec_dot_type(t) {
        GgmlType::Q8_0 => Activations::from_q8_0(
            (0..n / QK)
                .map(|_| {
                    let mut b = BlockQ8_0 {
                        d: f32_to_f16(d(rng)),
                        ..Default::default()
                    };
                    b.qs.iter_mut().for_each(|v| *v = q(rng));
                    b
                })
                .collect(),
        ),
        GgmlType::Q8_1 => Activations::from_q8_1(
            (0..n / QK)
                .map(|_| {
                    let dd = d(rng);
                    let mut b = BlockQ8_1 {
                        d: f32_to_f16(dd),
                        ..Default::default()
                    };
                    b.qs.iter_mut().for_each(|v| *v = q(rng));
                    let s: i32 = b.qs.iter().map(|&v| v as i32).sum();
                    b.s = f32_to_f16(match sc {
                        Scales::Random => dd * s as f32,
                        Scales::Unit => 1.0,
                    });
                    b
                })
                .collect(),
        ),
        GgmlType::Q8_K => Activations::from_q8_k(
            (0..n / QK_K)
                .map(|_| {
                    let mut b = BlockQ8_K {
                        d: d(rng),
                        ..Default::default()
                    };
                    b.qs.iter_mut().for_each(|v| *v = q(rng));
                    for (g, s) in b.bsums.iter_mut().enumerate() {
                        *s = b.qs[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum();
                    }
                    b
                })
                .collect(),
        ),
        _ => Activations::from_f32(
            (0..n)
                .map(|_| match sc {
                    Scales::Random => rng.gen_range(-1f32..1.0),
                    Scales::Unit => rng.gen_range(-64i32..64) as f32,
                })
                .collect(),
        ),
    }
}

fn dequant(t: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    crate::dequantize_row(t, bytes, &mut out).unwrap();
    out
}

/// Σ|w·x| of one row with the activations, from the dequantized operands.
fn abs_dot(t: GgmlType, row: &[u8], act: &Activations) -> f64 {
    let w = dequant(t, row, act.len());
    let x = dequant(act.ty(), act.as_bytes(), act.len());
    w.iter()
        .zip(&x)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum()
}

fn run_rows(lvl: Level, t: GgmlType, w: &[u8], rb: usize, act: &Activations) -> Vec<f32> {
    let f = rows_fn(lvl, t).unwrap();
    let mut out = vec![0f32; w.len() / rb];
    f(w, rb, act, &mut out);
    out
}

/// Lengths in blocks: 1, 3, 7, 33 (not multiples of any SIMD width or row tile).
const BLOCK_COUNTS: [usize; 4] = [1, 3, 7, 33];

#[test]
fn simd_levels_match_scalar() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for &lvl in available_levels() {
        if lvl == Level::Scalar {
            continue;
        }
        for t in WEIGHT_TYPES {
            for nb in BLOCK_COUNTS {
                // float types: odd element counts too (tails)
                let n = if t.is_quantized() {
                    nb * t.block_size()
                } else {
                    nb * 8 + nb % 5
                };
                let rows = 6; // one 4-row tile plus a 2-row remainder
                for extreme in [false, true] {
                    let w = random_weights(&mut rng, t, rows, n, Scales::Random);
                    let act = random_acts(&mut rng, t, n, Scales::Random, extreme);
                    let rb = t.row_size(n).unwrap();
                    let want = run_rows(Level::Scalar, t, &w, rb, &act);
                    let got = run_rows(lvl, t, &w, rb, &act);
                    for r in 0..rows {
                        let scale = abs_dot(t, &w[r * rb..(r + 1) * rb], &act);
                        let err = (got[r] as f64 - want[r] as f64).abs();
                        assert!(
                            err <= 1e-6 * scale + 1e-30,
                            "{t} {lvl:?} n={n} row {r} extreme={extreme}: {} vs scalar {} (Σ|wx| {scale})",
                            got[r],
                            want[r]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn simd_integer_sums_are_exact() {
    let mut rng = StdRng::seed_from_u64(0x1a7e);
    for &lvl in available_levels() {
        if lvl == Level::Scalar {
            continue;
        }
        for t in WEIGHT_TYPES {
            for nb in [1usize, 3, 7] {
                let n = if t.is_quantized() {
                    nb * t.block_size()
                } else {
                    nb * 8 + 3
                };
                let rows = 5;
                for extreme in [false, true] {
                    let w = random_weights(&mut rng, t, rows, n, Scales::Unit);
                    let act = random_acts(&mut rng, t, n, Scales::Unit, extreme);
                    let rb = t.row_size(n).unwrap();
                    let want = run_rows(Level::Scalar, t, &w, rb, &act);
                    let got = run_rows(lvl, t, &w, rb, &act);
                    for r in 0..rows {
                        // sums beyond 2^24 are not exact in f32 for either side
                        if want[r].abs() < (1 << 24) as f32 {
                            assert_eq!(
                                got[r], want[r],
                                "{t} {lvl:?} n={n} row {r} extreme={extreme}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn vec_dot_matches_dequantized_float_dot() {
    let mut rng = StdRng::seed_from_u64(0xd07);
    for &lvl in available_levels() {
        for t in WEIGHT_TYPES {
            let n = 4 * QK_K;
            let xf: Vec<f32> = (0..n).map(|_| rng.gen_range(-1f32..1.0)).collect();
            let wf: Vec<f32> = (0..n).map(|_| rng.gen_range(-1f32..1.0)).collect();
            let mut row = vec![0u8; t.row_size(n).unwrap()];
            crate::quantize_row(t, &wf, &mut row).unwrap();
            let act = quantize_activations(t, &xf).unwrap();
            let got = vec_dot_with(lvl, t, &row, &act).unwrap() as f64;
            let wq = dequant(t, &row, n);
            let xq = dequant(act.ty(), act.as_bytes(), n);
            // exact semantics: the dot of the dequantized operands
            let exact: f64 = wq.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
            let abs: f64 = wq
                .iter()
                .zip(&xq)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            // Q8_1's stored s = f16(d * sum) rounds: allow 2^-11 of the min term
            let tol = if vec_dot_type(t) == GgmlType::Q8_1 {
                2e-3
            } else {
                1e-5
            };
            assert!(
                (got - exact).abs() <= tol * abs,
                "{t} {lvl:?}: {got} vs dequantized dot {exact}"
            );
            // against the f32 activations: within the activation rounding error
            let vs_f32: f64 = wq.iter().zip(&xf).map(|(a, b)| *a as f64 * *b as f64).sum();
            let act_err: f64 = wq
                .iter()
                .zip(xf.iter().zip(&xq))
                .map(|(a, (x, q))| (*a as f64 * (*x as f64 - *q as f64)).abs())
                .sum();
            assert!(
                (got - vs_f32).abs() <= act_err + tol * abs + 1e-6,
                "{t} {lvl:?}: {got} vs f32 dot {vs_f32} (activation error bound {act_err})"
            );
        }
    }
}

#[test]
fn matmul_matches_vec_dot() {
    let mut rng = StdRng::seed_from_u64(0x3a7);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for &lvl in available_levels() {
        for t in WEIGHT_TYPES {
            let cols = 2 * QK_K;
            // 37 rows: not a multiple of the row tile nor of any chunk size
            let rows = 37;
            let w = random_weights(&mut rng, t, rows, cols, Scales::Random);
            let rb = t.row_size(cols).unwrap();
            for n_tokens in [1usize, 2, 5] {
                let x: Vec<f32> = (0..n_tokens * cols)
                    .map(|_| rng.gen_range(-1f32..1.0))
                    .collect();
                let mut y = vec![f32::NAN; n_tokens * rows];
                pool.install(|| matmul_with(lvl, t, &w, rows, cols, &x, n_tokens, &mut y))
                    .unwrap();
                for tk in 0..n_tokens {
                    let act = quantize_activations(t, &x[tk * cols..(tk + 1) * cols]).unwrap();
                    for r in 0..rows {
                        let want = vec_dot_with(lvl, t, &w[r * rb..(r + 1) * rb], &act).unwrap();
                        assert_eq!(y[tk * rows + r], want, "{t} {lvl:?} token {tk} row {r}");
                    }
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let t = GgmlType::Q4_0;
    let x = vec![0f32; 64];
    let act = quantize_activations(t, &x).unwrap();
    assert!(vec_dot(t, &[0u8; 35], &act).is_err());
    assert!(vec_dot(GgmlType::Q4_K, &[0u8; 36], &act).is_err());
    assert!(vec_dot(GgmlType::Q8_K, &[0u8; 292], &act).is_err());
    assert!(quantize_activations(t, &x[..33]).is_err());
    assert!(quantize_activations(GgmlType::Q8_1, &x).is_err());
    let w = vec![0u8; 3 * 36];
    let mut y = vec![0f32; 3];
    assert!(matmul(t, &w, 3, 64, &x, 1, &mut y).is_ok());
    assert!(matmul(t, &w[1..], 3, 64, &x, 1, &mut y).is_err());
    assert!(matmul(t, &w, 3, 64, &x[1..], 1, &mut y).is_err());
    assert!(matmul(t, &w, 3, 64, &x, 1, &mut y[1..]).is_err());
    assert!(matmul(t, &w, 3, 64, &x, 2, &mut y).is_err());
    assert!(matmul(t, &w, 3, 63, &x, 1, &mut y).is_err());
    assert!(matmul(t, &w, usize::MAX, 64, &x, 1, &mut y).is_err());
    assert!(matmul(t, &[], 0, 64, &x, 1, &mut []).is_ok());
    let mut y0 = vec![1f32; 2];
    assert!(matmul(GgmlType::F32, &[], 2, 0, &[], 1, &mut y0).is_ok());
    assert_eq!(y0, [0.0, 0.0]);
}

#[test]
fn level_names_round_trip() {
    for l in [Level::Scalar, Level::Neon, Level::Avx2, Level::Avx512] {
        assert_eq!(Level::from_name(l.name()), Some(l));
    }
    assert!(Level::Scalar.is_available());
    assert!(level().is_available());
}

#[test]
fn k4_scale_unpack_matches_format_spec() {
    let mut rng = StdRng::seed_from_u64(0x4c);
    for _ in 0..1000 {
        let s: [u8; 12] = rng.gen();
        let (sc, m) = scalar::k4_scales_mins(&s);
        for j in 0..8 {
            let (want_sc, want_m) = if j < 4 {
                (s[j] & 63, s[j + 4] & 63)
            } else {
                (
                    (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
                    (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                )
            };
            assert_eq!((sc[j], m[j]), (want_sc, want_m), "{s:?} j={j}");
        }
    }
}

#[test]
fn activation_quantizers_are_bit_exact_at_every_level() {
    let mut rng = StdRng::seed_from_u64(0xac7);
    let n = 2 * QK_K;
    let mut inputs: Vec<Vec<f32>> = Vec::new();
    for scale in [1e-3f32, 1.0, 300.0] {
        inputs.push((0..n).map(|_| rng.gen_range(-scale..scale)).collect());
    }
    // exact .5 ties after scaling (amax 127 -> id 1), zeros, a lone negative max
    inputs.push(
        (0..n)
            .map(|i| {
                if i % 32 == 0 {
                    127.0
                } else {
                    (i % 64) as f32 * 0.5 - 16.0
                }
            })
            .collect(),
    );
    inputs.push(
        (0..n)
            .map(|i| {
                if i % 32 == 5 {
                    -127.0
                } else {
                    -((i % 9) as f32) - 0.5
                }
            })
            .collect(),
    );
    inputs.push(vec![0.0; n]);
    inputs.push((0..n).map(|i| if i == 77 { -3.0 } else { 0.0 }).collect());
    // ties in |x| with opposite signs: the first one wins
    inputs.push(
        (0..n)
            .map(|i| {
                if i % 7 == 0 {
                    2.0
                } else if i % 7 == 3 {
                    -2.0
                } else {
                    0.3
                }
            })
            .collect(),
    );
    for x in &inputs {
        for t in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_K] {
            let want = quantize_activations_with(Level::Scalar, t, x).unwrap();
            for &lvl in available_levels() {
                let got = quantize_activations_with(lvl, t, x).unwrap();
                assert_eq!(got.as_bytes(), want.as_bytes(), "{t} {lvl:?}");
                // and the kernels' side arrays, whichever path filled them
                assert_eq!(got.qs.as_slice(), want.qs.as_slice(), "{t} {lvl:?} qs");
                assert_eq!(got.d, want.d, "{t} {lvl:?} d");
                assert_eq!(got.s, want.s, "{t} {lvl:?} s");
                assert_eq!(got.sum, want.sum, "{t} {lvl:?} sum");
            }
        }
    }
}

/// The multi-token kernels (matmul with n_tokens > 1) against the single-token row
/// kernel of the same level, per (row, token): equal bit for bit (so within any
/// relative tolerance, and the integer sums are identical), for token counts that
/// do and do not fill the token tile and odd row counts, with random and unit
/// scales, and called directly with activations built by hand (no prepared terms).
#[test]
fn multi_token_kernels_match_single_token() {
    let mut rng = StdRng::seed_from_u64(0x70c5);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for &lvl in available_levels() {
        for t in WEIGHT_TYPES {
            let Some(multi) = tokens_fn(lvl, t) else {
                continue;
            };
            let single = rows_fn(lvl, t).unwrap();
            // the last shape (float types only) leaves a 16 + 1 column tail
            let shapes = [
                (1usize, QK_K),
                (7, 3 * QK_K),
                (13, 2 * QK_K + 3 * QK),
                (5, 2 * QK_K + 3 * QK + 17),
                // 4-block types: groups ending 2 and 1 blocks short (576 = 18 blocks)
                (8, 18 * QK),
                (3, 17 * QK),
            ];
            for (rows, cols) in shapes {
                let Ok(rb) = t.row_size(cols) else { continue };
                for sc in [Scales::Random, Scales::Unit] {
                    let w = random_weights(&mut rng, t, rows, cols, sc);
                    for n_tokens in [2usize, 3, 4, 5, 8, 13] {
                        let x: Vec<f32> = (0..n_tokens * cols)
                            .map(|_| rng.gen_range(-1f32..1.0))
                            .collect();
                        let acts: Vec<Activations> = x
                            .chunks(cols)
                            .map(|xt| quantize_activations_with(lvl, t, xt).unwrap())
                            .collect();
                        let mut want = vec![0f32; n_tokens * rows];
                        for (a, o) in acts.iter().zip(want.chunks_mut(rows)) {
                            single(&w, rb, a, o);
                        }
                        let mut got = vec![f32::NAN; n_tokens * rows];
                        multi(&w, rb, &acts, &mut got);
                        assert_eq!(got, want, "{t} {lvl:?} {rows}x{cols} tokens {n_tokens}");
                        // hand-built activations (no prepared terms)
                        let hand: Vec<Activations> = (0..n_tokens)
                            .map(|_| random_acts(&mut rng, t, cols, sc, false))
                            .collect();
                        for (a, o) in hand.iter().zip(want.chunks_mut(rows)) {
                            single(&w, rb, a, o);
                        }
                        multi(&w, rb, &hand, &mut got);
                        assert_eq!(got, want, "{t} {lvl:?} hand-built, tokens {n_tokens}");
                        // through matmul (row chunks split across threads)
                        let mut y = vec![f32::NAN; n_tokens * rows];
                        pool.install(|| matmul_with(lvl, t, &w, rows, cols, &x, n_tokens, &mut y))
                            .unwrap();
                        for tk in 0..n_tokens {
                            for r in 0..rows {
                                let a = &acts[tk];
                                let want =
                                    vec_dot_with(lvl, t, &w[r * rb..(r + 1) * rb], a).unwrap();
                                let g = y[tk * rows + r];
                                assert!(
                                    g == want || (g - want).abs() <= 1e-6 * want.abs(),
                                    "{t} {lvl:?} matmul token {tk} row {r}: {g} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
