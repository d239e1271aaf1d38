//! SaRA training math (`graft_adapters::train::{sara, linalg}`) against dense
//! references: mask selection over float and quantized weights, the SDDMM gradient,
//! the sparse delta's forward/backward, the SVD and the nuclear-norm subgradient,
//! progressive adjustment, and the step-0 adapter leaving a conformance model's
//! logits bit-for-bit unchanged.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use graft_adapters::delta::projection_shape;
use graft_adapters::sara::{self, SaraMeta};
use graft_adapters::train::linalg::{nuclear_norm_subgradient, svd};
use graft_adapters::train::sara::{
    progressive_adjust, rank_regulariser, sddmm, select_mask, sparse_backward_input, sparse_delta,
    sparse_forward, SaraEntries,
};
use graft_adapters::{Adapter, AdapterFormat, SparseDelta, TensorDelta};
use graft_quant::{dequantize_matrix, quantize_matrix, GgmlType};
use graft_runtime::model::{Model, Proj, Weight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn uniform(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-scale..scale)).collect()
}

/// Flat indices drawn with probability `density`, ascending.
fn random_mask(r: &mut StdRng, total: usize, density: f64) -> Vec<u32> {
    (0..total as u32).filter(|_| r.gen_bool(density)).collect()
}

#[test]
fn mask_equals_brute_force_on_random_matrices() {
    let mut r = rng(1);
    for &(n, theta) in &[
        (0usize, 0.1f32),
        (1, 0.5),
        (1000, 0.1),
        (4096, 0.002),
        (777, 2.0),
    ] {
        let v = uniform(&mut r, n, 1.0);
        let m = select_mask(&v, theta).unwrap();
        let brute = v.iter().filter(|w| w.abs() < theta).count();
        assert_eq!(m.len(), brute, "n {n} theta {theta}");
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert!(m.iter().all(|&i| v[i as usize].abs() < theta));
    }
    // Values exactly at theta are out (strict).
    assert_eq!(select_mask(&[0.25, -0.25, 0.2499], 0.25).unwrap(), vec![2]);
}

#[test]
fn mask_over_quantized_weights_equals_brute_force() {
    let mut r = rng(2);
    let (rows, cols) = (37, 512);
    let src = uniform(&mut r, rows * cols, 0.05);
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let bytes = quantize_matrix(ty, &src, cols).unwrap();
        let dense = dequantize_matrix(ty, &bytes, cols).unwrap();
        let w = Weight::owned(ty, rows, cols, bytes).unwrap();
        let theta = 0.01;
        let e = SaraEntries::from_weight(&w, theta).unwrap();
        let brute: Vec<u32> = (0..dense.len() as u32)
            .filter(|&i| dense[i as usize].abs() < theta)
            .collect();
        assert!(!brute.is_empty() && brute.len() < dense.len(), "{ty}");
        assert_eq!(e.indices, brute, "{ty}");
        assert_eq!(e.indices, select_mask(&dense, theta).unwrap(), "{ty}");
        let gathered: Vec<u32> = brute.iter().map(|&i| dense[i as usize].to_bits()).collect();
        // P0[M] keeps the base's signed values bit for bit.
        assert_eq!(
            e.init.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            gathered,
            "{ty}"
        );
        assert_eq!(e.values, e.init);
        assert!(e.delta_values().iter().all(|&d| d == 0.0));
    }
}

#[test]
fn mask_over_a_conformance_weight() {
    // A real mixed-type file: each projection in whatever type llama.cpp gave it.
    let model = Model::load_gguf(&common::conformance().join("models/llama-gqa-Q4_K_M.gguf"))
        .expect("load llama-gqa-Q4_K_M");
    for proj in Proj::ALL {
        let w = model.layers[1].proj(proj);
        let dense = w.to_f32().unwrap();
        let e = SaraEntries::from_weight(w, 0.01).unwrap();
        let brute = dense.iter().filter(|v| v.abs() < 0.01).count();
        assert_eq!(e.len(), brute, "{proj} ({})", w.ty);
        assert_eq!((e.rows, e.cols), (w.rows, w.cols));
    }
}

#[test]
fn sddmm_equals_dense_gradient_gathered() {
    let mut r = rng(3);
    for &(n, out, inp, density) in &[
        (1usize, 1usize, 1usize, 1.0f64),
        (5, 7, 3, 0.0),
        (5, 7, 3, 1.0),
        (64, 33, 17, 0.2),
        (300, 40, 300, 0.15),
        (2, 260, 1100, 0.5),
        (600, 30, 1100, 0.1),
        (0, 4, 4, 1.0),
    ] {
        let dy = uniform(&mut r, n * out, 1.0);
        let x = uniform(&mut r, n * inp, 1.0);
        let idx = random_mask(&mut r, out * inp, density);
        // Dense dW = dY^T X in f64.
        let mut dw = vec![0f64; out * inp];
        for b in 0..n {
            for o in 0..out {
                for i in 0..inp {
                    dw[o * inp + i] += dy[b * out + o] as f64 * x[b * inp + i] as f64;
                }
            }
        }
        let mut g = vec![f32::NAN; idx.len()];
        sddmm(&dy, &x, n, out, inp, &idx, &mut g).unwrap();
        let bound = 1e-5 * (n.max(1) as f64);
        for (&i, &gk) in idx.iter().zip(&g) {
            let want = dw[i as usize];
            assert!(
                (gk as f64 - want).abs() <= bound,
                "{n}x{out}x{inp} index {i}: {gk} vs {want}"
            );
        }
    }
}

/// Dense `[n, out] x [out, in]` product `a D` accumulated into `acc` (`[n, in]`).
fn dense_times(acc: &mut [f32], a: &[f32], d: &[f32], n: usize, out: usize, inp: usize) {
    for b in 0..n {
        for o in 0..out {
            for i in 0..inp {
                acc[b * inp + i] += a[b * out + o] * d[o * inp + i];
            }
        }
    }
}

/// Dense `x D^T` accumulated into `acc` (`[n, out]`), `x` `[n, in]`.
fn dense_times_t(acc: &mut [f32], x: &[f32], d: &[f32], n: usize, out: usize, inp: usize) {
    for b in 0..n {
        for o in 0..out {
            for i in 0..inp {
                acc[b * out + o] += x[b * inp + i] * d[o * inp + i];
            }
        }
    }
}

#[test]
fn sparse_forward_and_backward_equal_dense() {
    let mut r = rng(4);
    for &(n, out, inp, density, scale) in &[
        (1usize, 3usize, 5usize, 0.5f64, 1.0f32),
        (9, 16, 24, 0.2, 0.5),
        (33, 48, 20, 1.0, -2.0),
        (7, 12, 12, 0.0, 1.0),
        (0, 5, 5, 0.5, 1.0),
        // Several token blocks (blocks hold about 1 MiB of transposed activations).
        (300, 1100, 1030, 0.02, 0.7),
    ] {
        let idx = random_mask(&mut r, out * inp, density);
        let vals = uniform(&mut r, idx.len(), 0.1);
        let d = SparseDelta::from_flat(out, inp, &idx, &vals, scale).unwrap();
        let dense = d.dense();
        let x = uniform(&mut r, n * inp, 1.0);
        let dy = uniform(&mut r, n * out, 1.0);
        let y0 = uniform(&mut r, n * out, 1.0);
        let dx0 = uniform(&mut r, n * inp, 1.0);
        let (mut y_ref, mut dx_ref) = (y0.clone(), dx0.clone());
        dense_times_t(&mut y_ref, &x, &dense, n, out, inp);
        dense_times(&mut dx_ref, &dy, &dense, n, out, inp);
        let (mut y, mut dx) = (y0, dx0);
        sparse_forward(&d, &x, n, &mut y).unwrap();
        sparse_backward_input(&d, &dy, n, &mut dx).unwrap();
        for (a, b) in y.iter().zip(&y_ref).chain(dx.iter().zip(&dx_ref)) {
            assert!((a - b).abs() < 1e-5, "{n}x{out}x{inp}: {a} vs {b}");
        }
    }
    // A malformed delta or wrong lengths are errors, not panics.
    let mut d = SparseDelta::from_flat(2, 2, &[0, 3], &[1.0, 1.0], 1.0).unwrap();
    let mut y = vec![0.0; 2];
    assert!(sparse_forward(&d, &[1.0; 3], 1, &mut y).is_err());
    d.col_idx[1] = 5;
    assert!(sparse_forward(&d, &[1.0; 2], 1, &mut y).is_err());
    assert!(sparse_backward_input(&d, &[1.0; 2], 1, &mut y).is_err());
}

/// A random `n x n` orthogonal matrix (Gram-Schmidt on Gaussian-ish columns), row-major.
fn orthogonal(r: &mut StdRng, n: usize) -> Vec<f64> {
    let mut q = vec![0f64; n * n];
    for j in 0..n {
        let mut c: Vec<f64> = (0..n).map(|_| r.gen_range(-1.0..1.0)).collect();
        for _ in 0..2 {
            for k in 0..j {
                let d: f64 = (0..n).map(|i| c[i] * q[i * n + k]).sum();
                for i in 0..n {
                    c[i] -= d * q[i * n + k];
                }
            }
        }
        let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt();
        for i in 0..n {
            q[i * n + j] = c[i] / norm;
        }
    }
    q
}

/// `U diag(s) V^T` (`rows x cols`) with random orthogonal `U`, `V` and the given
/// singular values (`min(rows, cols)` of them).
fn with_singular_values(r: &mut StdRng, rows: usize, cols: usize, s: &[f64]) -> Vec<f64> {
    let (u, v) = (orthogonal(r, rows), orthogonal(r, cols));
    let mut a = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            a[i * cols + j] = s
                .iter()
                .enumerate()
                .map(|(k, sk)| u[i * rows + k] * sk * v[j * cols + k])
                .sum();
        }
    }
    a
}

#[test]
fn svd_reconstructs_and_finds_the_singular_values() {
    let mut r = rng(5);
    for &(rows, cols, rank) in &[
        (12usize, 5usize, 5usize),
        (5, 12, 5),
        (9, 9, 9),
        (20, 8, 3),
        (8, 20, 2),
        (10, 10, 0),
        (70, 66, 66),
        (1, 7, 1),
    ] {
        let k = rows.min(cols);
        let mut s: Vec<f64> = (0..k)
            .map(|j| {
                if j < rank {
                    r.gen_range(0.1..10.0)
                } else {
                    0.0
                }
            })
            .collect();
        let a = with_singular_values(&mut r, rows, cols, &s);
        let d = svd(&a, rows, cols).unwrap();
        s.sort_by(|x, y| y.total_cmp(x));
        let scale = s.first().copied().unwrap_or(0.0).max(1.0);
        for (got, want) in d.s.iter().zip(&s) {
            assert!(
                (got - want).abs() <= 1e-10 * scale,
                "{rows}x{cols} rank {rank}: singular value {got} vs {want}"
            );
        }
        for (x, y) in d.reconstruct().iter().zip(&a) {
            assert!((x - y).abs() <= 1e-10 * scale, "{rows}x{cols}: {x} vs {y}");
        }
        // Orthonormal singular vectors where the singular value is nonzero.
        let live: Vec<usize> = (0..k).filter(|&j| d.s[j] > d.default_tol()).collect();
        assert_eq!(live.len(), rank, "{rows}x{cols} numerical rank");
        for &p in &live {
            for &q in &live {
                let uu: f64 = (0..rows).map(|i| d.u[i * k + p] * d.u[i * k + q]).sum();
                let vv: f64 = (0..cols).map(|i| d.v[i * k + p] * d.v[i * k + q]).sum();
                let want = if p == q { 1.0 } else { 0.0 };
                assert!((uu - want).abs() < 1e-10 && (vv - want).abs() < 1e-10);
            }
        }
    }
}

#[test]
fn svd_of_random_matrices_reconstructs() {
    let mut r = rng(6);
    for &(rows, cols) in &[(50usize, 30usize), (30, 50), (64, 64), (3, 100)] {
        let a: Vec<f64> = (0..rows * cols).map(|_| r.gen_range(-1.0..1.0)).collect();
        let d = svd(&a, rows, cols).unwrap();
        for (x, y) in d.reconstruct().iter().zip(&a) {
            assert!((x - y).abs() <= 1e-10, "{rows}x{cols}: {x} vs {y}");
        }
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
        // Sum of squared singular values = squared Frobenius norm.
        let fro: f64 = a.iter().map(|v| v * v).sum();
        let ss: f64 = d.s.iter().map(|v| v * v).sum();
        assert!((fro - ss).abs() <= 1e-10 * fro);
    }
}

#[test]
fn nuclear_norm_subgradient_matches_finite_differences() {
    let mut r = rng(7);
    for &(rows, cols) in &[(6usize, 4usize), (4, 6), (5, 5)] {
        let k = rows.min(cols);
        // Distinct, well separated, nonzero singular values: the norm is smooth here.
        let s: Vec<f64> = (0..k).map(|j| 1.0 + j as f64 * 0.7).collect();
        let a = with_singular_values(&mut r, rows, cols, &s);
        let (norm, g) = nuclear_norm_subgradient(&a, rows, cols, None).unwrap();
        assert!((norm - s.iter().sum::<f64>()).abs() < 1e-10);
        let h = 1e-6;
        for e in 0..rows * cols {
            let mut p = a.clone();
            p[e] += h;
            let mut m = a.clone();
            m[e] -= h;
            let fp = nuclear_norm_subgradient(&p, rows, cols, None).unwrap().0;
            let fm = nuclear_norm_subgradient(&m, rows, cols, None).unwrap().0;
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[e]).abs() < 1e-6,
                "{rows}x{cols} entry {e}: fd {fd} vs subgradient {}",
                g[e]
            );
        }
    }
}

#[test]
fn rank_regulariser_is_the_subgradient_at_the_mask() {
    let mut r = rng(8);
    let (rows, cols) = (12, 9);
    let idx = random_mask(&mut r, rows * cols, 0.4);
    let vals = uniform(&mut r, idx.len(), 0.01);
    let lambda = 5e-3;
    let (loss, grad) = rank_regulariser(rows, cols, &idx, &vals, lambda, None).unwrap();
    let mut dense = vec![0f64; rows * cols];
    for (&i, &v) in idx.iter().zip(&vals) {
        dense[i as usize] = v as f64;
    }
    let (norm, g) = nuclear_norm_subgradient(&dense, rows, cols, None).unwrap();
    assert!(((loss as f64) - lambda as f64 * norm).abs() <= 1e-6 * loss as f64);
    assert_eq!(grad.len(), idx.len());
    for (&i, &gk) in idx.iter().zip(&grad) {
        let want = lambda as f64 * g[i as usize];
        assert!(
            (gk as f64 - want).abs() <= 1e-6 * lambda as f64,
            "{gk} vs {want}"
        );
    }
    // Empty mask: zero loss, no gradient.
    let (loss, grad) = rank_regulariser(rows, cols, &[], &[], lambda, None).unwrap();
    assert_eq!((loss, grad.len()), (0.0, 0));
    assert!(rank_regulariser(rows, cols, &[3, 2], &[0.1, 0.2], lambda, None).is_err());
}

#[test]
fn progressive_adjustment_shrinks_the_mask_and_freezes_values() {
    let mut r = rng(9);
    let (rows, cols, theta) = (40, 30, 0.05f32);
    let base = uniform(&mut r, rows * cols, 0.2);
    let w = Weight::from_f32(rows, cols, &base).unwrap();
    let mut state = SaraEntries::from_weight(&w, theta).unwrap();
    // "Training": every value moves; some leave (-theta, theta).
    for v in &mut state.values {
        *v += r.gen_range(-0.06f32..0.06);
    }
    let before = sparse_delta(&[&state], 1.0).unwrap();
    let a = progressive_adjust(&state, theta).unwrap();
    assert!(!a.live.is_empty() && !a.frozen.is_empty());
    assert_eq!(a.live.len() + a.frozen.len(), state.len());
    // M2 = M1 AND |P| < theta, a subset of M1.
    for (j, &k) in a.kept.iter().enumerate() {
        let k = k as usize;
        assert_eq!(a.live.indices[j], state.indices[k]);
        assert_eq!(a.live.values[j].to_bits(), state.values[k].to_bits());
        assert_eq!(a.live.init[j].to_bits(), state.init[k].to_bits());
        assert!(a.live.values[j].abs() < theta);
    }
    assert!(a.live.indices.windows(2).all(|w| w[0] < w[1]));
    // Frozen entries keep their trained values bit for bit.
    let pos = |i: u32| state.indices.binary_search(&i).unwrap();
    for ((&i, &v), &p0) in a
        .frozen
        .indices
        .iter()
        .zip(&a.frozen.values)
        .zip(&a.frozen.init)
    {
        assert_eq!(v.to_bits(), state.values[pos(i)].to_bits());
        assert_eq!(p0.to_bits(), state.init[pos(i)].to_bits());
        assert!(v.abs() >= theta);
    }
    // Live and frozen together give back the same delta, structure and values.
    assert_eq!(sparse_delta(&[&a.live, &a.frozen], 1.0).unwrap(), before);
    // Overlapping parts are refused.
    assert!(sparse_delta(&[&a.live, &a.live], 1.0).is_err());
    // Adjusting again at the same theta changes nothing.
    let again = progressive_adjust(&a.live, theta).unwrap();
    assert_eq!(again.live, a.live);
    assert!(again.frozen.is_empty());
}

/// Step 0 (`P_learn == P0[M]`) on every projection of `model`, through both delta
/// constructions and the file format: the logits equal the base's bit for bit.
fn step0_is_the_base(file: &str) {
    let path = common::conformance().join("models").join(file);
    let model = Model::load_gguf(&path).unwrap_or_else(|e| panic!("load {file}: {e}"));
    let c = &model.config;
    let theta = 0.01;
    let mut via_dense = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let mut explicit = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let mut nudged = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let mut nnz = 0;
    for layer in 0..c.n_layer {
        for proj in Proj::ALL {
            let w = model.layers[layer].proj(proj);
            let state = SaraEntries::from_weight(w, theta).unwrap();
            assert!(!state.is_empty(), "{file}: nothing selected in {proj}");
            nnz += state.len();
            let (rows, cols) = projection_shape(c, proj);
            // The existing dense path: scatter(P_learn - P0[M]) -> from_dense.
            let mut dense = vec![0f32; rows * cols];
            for (&i, d) in state.indices.iter().zip(state.delta_values()) {
                dense[i as usize] = d;
            }
            let d = sara::from_dense(rows, cols, &dense, 1.0).unwrap();
            assert!(d.values.is_empty(), "step-0 delta has nonzeros");
            via_dense
                .insert(c, layer, proj, TensorDelta::Sparse(d))
                .unwrap();
            // The training structure: every masked entry present, all zero.
            let d = sparse_delta(&[&state], 1.0).unwrap();
            assert_eq!(d.values.len(), state.len());
            explicit
                .insert(c, layer, proj, TensorDelta::Sparse(d))
                .unwrap();
            let mut moved = state.clone();
            for v in &mut moved.values {
                *v += 0.05;
            }
            nudged
                .insert(
                    c,
                    layer,
                    proj,
                    TensorDelta::Sparse(sparse_delta(&[&moved], 1.0).unwrap()),
                )
                .unwrap();
        }
    }
    let meta = SaraMeta {
        theta: Some(theta),
        ..SaraMeta::new(c.arch)
    };
    let toks: Vec<u32> = [1u32, 15043, 29892, 920, 526, 366, 29973, 306]
        .iter()
        .map(|t| t % c.n_vocab as u32)
        .collect();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let base = common::logits_all(&model, &toks);
    for (name, a) in [("from_dense", &via_dense), ("explicit zeros", &explicit)] {
        let tmp = std::env::temp_dir().join(format!(
            "graft-sara-train-{}-{file}-{}.safetensors",
            std::process::id(),
            name.replace(' ', "_")
        ));
        sara::save(a, &meta, &tmp).unwrap();
        let loaded = sara::load(&tmp, &model).unwrap();
        std::fs::remove_file(&tmp).unwrap();
        let with = common::logits_all_with(&model, &toks, Some(&loaded));
        assert_eq!(
            bits(with),
            bits(base.clone()),
            "{file}: {name} step-0 adapter"
        );
    }
    // The same path with moved values does change the output (the adapter is live).
    let with = common::logits_all_with(&model, &toks, Some(&nudged));
    assert_ne!(
        with, base,
        "{file}: a nonzero delta left the logits unchanged"
    );
    eprintln!("{file}: step-0 adapter over {nnz} masked entries equals the base");
}

#[test]
fn step0_delta_is_the_base_f32() {
    step0_is_the_base("llama-gqa-F32.gguf");
}

#[test]
fn step0_delta_is_the_base_quantized() {
    step0_is_the_base("qwen2-Q4_K_M.gguf");
}
