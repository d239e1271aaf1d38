//! STABLE-RPS: the RandomFold map (permutation at m = n, balanced loads, seeded),
//! expand / scatter_grad (adjoint, finite differences, SGD with the scaler), zero
//! initial deltas through the forward pass, RPS-LoRA at rho = 1 equal to LoRA, and
//! `.rps` files (round trip, truncation, corruption).

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use graft_adapters::delta::f32_weight;
use graft_adapters::rps::{
    self, expand, scatter_grad, Budget, RandomFold, Role, RpsConfig, RpsLayout, RpsMode, Scaler,
    VirtualTensor,
};
use graft_adapters::{load_adapter, Adapter, AdapterFormat, LoraDelta, TensorDelta};
use graft_runtime::model::{Arch, Model, ModelConfig, Proj, RopeScaling, RopeStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

// ---- Helpers ------------------------------------------------------------------------

/// A small llama: Q 8x8, K/V 4x8, O 8x8, gate/up 16x8, down 8x16, two layers.
fn small_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        n_vocab: 32,
        n_embd: 8,
        n_layer: 2,
        n_ff: 16,
        n_head: 2,
        n_head_kv: 1,
        head_dim: 4,
        n_rot: 4,
        rope_base: 1e4,
        rope_scaling: RopeScaling::None,
        rope_style: RopeStyle::Normal,
        rms_eps: 1e-5,
        n_ctx_train: 64,
    }
}

fn load_model() -> Model {
    Model::load_gguf(&common::conformance().join("models/llama-gqa-F32.gguf"))
        .expect("load llama-gqa-F32")
}

/// A fresh file path in a directory of its own (common::temp_dir clears it).
fn tmp_path(name: &str) -> PathBuf {
    common::temp_dir(&format!("rps-{name}")).join(name)
}

const TOKENS: [u32; 12] = [
    1, 15043, 29892, 920, 526, 366, 29973, 306, 626, 2691, 29889, 13,
];

fn tokens(model: &Model) -> Vec<u32> {
    TOKENS
        .iter()
        .map(|&t| t % model.config.n_vocab as u32)
        .collect()
}

fn random_vec(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

fn random_pools(layout: &RpsLayout, rng: &mut StdRng) -> Vec<Vec<f32>> {
    layout
        .pools()
        .iter()
        .map(|p| random_vec(rng, p.m() as usize, -1.0, 1.0))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every layout the math tests run on: both modes, several budgets (tiny ones share
/// each slot among many positions), all scalers.
fn layouts(c: &ModelConfig) -> Vec<(String, RpsLayout)> {
    let mut out = Vec::new();
    let all = Proj::ALL;
    for (budget, scaler) in [
        (Budget::Ratio(1.0), Scaler::V1),
        (Budget::Ratio(0.3), Scaler::V5),
        (Budget::Slots(7), Scaler::V1),
        (Budget::Slots(2), Scaler::None),
    ] {
        let mut lora = RpsConfig::lora(2, 4.0, budget);
        lora.scaler = scaler;
        lora.seed = 42;
        out.push((
            format!("lora {budget:?} {scaler:?}"),
            RpsLayout::new(c, &all, &lora).unwrap(),
        ));
        let mut delta = RpsConfig::delta(budget);
        delta.scaler = scaler;
        delta.seed = 7;
        out.push((
            format!("delta {budget:?} {scaler:?}"),
            RpsLayout::new(c, &[Proj::Q, Proj::Down], &delta).unwrap(),
        ));
    }
    out
}

// ---- The map -------------------------------------------------------------------------

#[test]
fn map_is_a_permutation_at_m_equals_n() {
    for n in [1u64, 2, 3, 7, 64, 1000, 4099, 65536] {
        for seed in [0u64, 1, 123321, u64::MAX] {
            let f = RandomFold::new(n, seed).unwrap();
            let mut hit = vec![false; n as usize];
            for run in f.runs(0, n) {
                for t in 0..run.len {
                    assert!(
                        !hit[run.j + t],
                        "n {n} seed {seed}: slot {} hit twice",
                        run.j + t
                    );
                    hit[run.j + t] = true;
                }
            }
            assert!(
                hit.iter().all(|&h| h),
                "n {n} seed {seed}: a slot is never used"
            );
        }
    }
    // Through a layout: at rho = 1 the expanded tensors hold every pool value exactly
    // once (lambda 1, signs +-1).
    let c = small_config();
    let layout = RpsLayout::new(&c, &Proj::ALL, &RpsConfig::delta(Budget::Ratio(1.0))).unwrap();
    assert_eq!(layout.n_slots(), layout.n_virtual());
    let m = layout.n_slots() as usize;
    let z: Vec<f32> = (1..=m).map(|v| v as f32).collect();
    let mut got: Vec<f32> = expand(&layout, &[&z])
        .unwrap()
        .concat()
        .iter()
        .map(|v| v.abs())
        .collect();
    got.sort_by(f32::total_cmp);
    assert_eq!(got, z);
}

#[test]
fn loads_are_floor_or_ceil_of_n_over_m() {
    for (m, n) in [
        (1u64, 17u64),
        (3, 10),
        (7, 100),
        (64, 1000),
        (999, 1000),
        (1000, 4099),
        (4096, 65537),
    ] {
        for seed in [5u64, 123321] {
            let f = RandomFold::new(m, seed).unwrap();
            // Per position, through the hash itself (not the runs).
            let mut load = vec![0u64; m as usize];
            for p in 0..n {
                load[f.slot(p) as usize] += 1;
            }
            let (lo, hi) = (n / m, n.div_ceil(m));
            assert!(
                load.iter().all(|&l| l == lo || l == hi),
                "m {m} n {n} seed {seed}: loads {:?}..{:?}, expected {lo} or {hi}",
                load.iter().min(),
                load.iter().max()
            );
            assert_eq!(load.iter().sum::<u64>(), n);
        }
    }
    // The layout's v1 scaler with lambda 1 is the load: S_j = c_j^2 / c_j.
    let c = small_config();
    let mut cfg = RpsConfig::delta(Budget::Slots(100));
    cfg.seed = 3;
    let layout = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
    let n = layout.n_virtual();
    let (lo, hi) = ((n / 100) as f32, n.div_ceil(100) as f32);
    let s = &layout.scaler_values()[0];
    assert_eq!(s.len(), 100);
    assert!(s.iter().all(|&v| v == lo || v == hi), "{s:?}");
    assert_eq!(s.iter().sum::<f32>() as u64, n);
}

#[test]
fn same_seed_same_map_other_seed_other_map() {
    let map = |seed: u64| -> Vec<(u64, f32)> {
        let f = RandomFold::new(97, seed).unwrap();
        (0..2000).map(|p| (f.slot(p), f.sign(p))).collect()
    };
    assert_eq!(map(11), map(11));
    assert_ne!(map(11), map(12));
    let slots = |seed: u64| -> Vec<u64> { map(seed).into_iter().map(|(s, _)| s).collect() };
    let signs = |seed: u64| -> Vec<f32> { map(seed).into_iter().map(|(_, s)| s).collect() };
    assert_ne!(slots(11), slots(12), "slots do not depend on the seed");
    assert_ne!(signs(11), signs(12), "signs do not depend on the seed");
    // Signs are balanced-ish (a stuck sign hash would make this 0 or 2000).
    let neg = signs(11).iter().filter(|&&s| s < 0.0).count();
    assert!((800..1200).contains(&neg), "{neg} negative signs of 2000");

    // Layouts: same seed, same expanded tensors; another seed, other tensors.
    let c = small_config();
    let mut cfg = RpsConfig::lora(2, 2.0, Budget::Ratio(0.25));
    let a = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
    let b = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
    cfg.seed += 1;
    let other = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let pools = random_pools(&a, &mut rng);
    assert_eq!(a, b);
    assert_eq!(expand(&a, &pools).unwrap(), expand(&b, &pools).unwrap());
    assert_ne!(expand(&a, &pools).unwrap(), expand(&other, &pools).unwrap());
}

#[test]
fn expand_matches_the_per_position_formula() {
    let c = small_config();
    let mut rng = StdRng::seed_from_u64(2);
    for (name, layout) in layouts(&c) {
        let pools = random_pools(&layout, &mut rng);
        let w = expand(&layout, &pools).unwrap();
        for (t, vals) in layout.tensors().iter().zip(&w) {
            let q = t.pool();
            let f = layout.pools()[q].fold();
            for (i, &v) in vals.iter().enumerate() {
                let p = t.offset + i as u64;
                let want = t.lambda * f.sign(p) * pools[q][f.slot(p) as usize];
                assert_eq!(v.to_bits(), want.to_bits(), "{name}: {} [{i}]", t.name());
            }
        }
    }
}

// ---- Gradients -----------------------------------------------------------------------

#[test]
fn scatter_is_the_adjoint_of_expand() {
    let c = small_config();
    let mut rng = StdRng::seed_from_u64(3);
    for (name, layout) in layouts(&c) {
        let z = random_pools(&layout, &mut rng);
        let g: Vec<Vec<f32>> = layout
            .tensors()
            .iter()
            .map(|t| random_vec(&mut rng, t.len(), -1.0, 1.0))
            .collect();
        let w = expand(&layout, &z).unwrap();
        let sg = scatter_grad(&layout, &g).unwrap();
        let (mut lhs, mut rhs, mut mag) = (0f64, 0f64, 0f64);
        for (wt, gt) in w.iter().zip(&g) {
            for (&a, &b) in wt.iter().zip(gt) {
                lhs += a as f64 * b as f64;
                mag += (a as f64 * b as f64).abs();
            }
        }
        for (zq, gq) in z.iter().zip(&sg) {
            for (&a, &b) in zq.iter().zip(gq) {
                rhs += a as f64 * b as f64;
            }
        }
        assert!(
            (lhs - rhs).abs() <= 1e-6 * mag,
            "{name}: <expand(z), G> = {lhs}, <z, scatter(G)> = {rhs}"
        );
    }
}

/// `L = sum_i c_i W_i^2 / 2 + d_i W_i` over every virtual tensor, in f64.
fn loss(w: &[Vec<f32>], c: &[Vec<f64>], d: &[Vec<f64>]) -> f64 {
    let mut l = 0f64;
    for ((wt, ct), dt) in w.iter().zip(c).zip(d) {
        for ((&wv, &cv), &dv) in wt.iter().zip(ct).zip(dt) {
            let wv = wv as f64;
            l += cv * wv * wv / 2.0 + dv * wv;
        }
    }
    l
}

#[test]
fn gradient_matches_finite_differences() {
    let cfg = small_config();
    let mut rng = StdRng::seed_from_u64(4);
    for (name, layout) in layouts(&cfg) {
        // Pool values on a 2^-10 grid and a power-of-two step keep z +- eps exact.
        let z: Vec<Vec<f32>> = layout
            .pools()
            .iter()
            .map(|p| {
                (0..p.m())
                    .map(|_| rng.gen_range(-1024i32..1024) as f32 / 1024.0)
                    .collect()
            })
            .collect();
        let cs: Vec<Vec<f64>> = layout
            .tensors()
            .iter()
            .map(|t| (0..t.len()).map(|_| rng.gen_range(0.5..1.5)).collect())
            .collect();
        let ds: Vec<Vec<f64>> = layout
            .tensors()
            .iter()
            .map(|t| (0..t.len()).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let w = expand(&layout, &z).unwrap();
        // dL/dW = c W + d, then the adjoint.
        let dw: Vec<Vec<f32>> = w
            .iter()
            .zip(cs.iter().zip(&ds))
            .map(|(wt, (ct, dt))| {
                wt.iter()
                    .zip(ct.iter().zip(dt))
                    .map(|(&wv, (&cv, &dv))| (cv * wv as f64 + dv) as f32)
                    .collect()
            })
            .collect();
        let grad = scatter_grad(&layout, &dw).unwrap();
        let eps = 1.0 / 16.0;
        let mut checked = 0;
        for q in 0..z.len() {
            let m = z[q].len();
            // Every slot of small pools, a spread of them otherwise.
            let step = (m / 40).max(1);
            for j in (0..m).step_by(step) {
                let mut zp = z.clone();
                zp[q][j] += eps;
                let mut zm = z.clone();
                zm[q][j] -= eps;
                let lp = loss(&expand(&layout, &zp).unwrap(), &cs, &ds);
                let lm = loss(&expand(&layout, &zm).unwrap(), &cs, &ds);
                // L is quadratic in z: the central difference is exact but for rounding.
                let fd = (lp - lm) / (2.0 * eps as f64);
                let g = grad[q][j] as f64;
                assert!(
                    (fd - g).abs() <= 1e-4 * (1.0 + g.abs()),
                    "{name}: pool {q} slot {j}: finite difference {fd}, scatter_grad {g}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 2, "{name}");
    }
}

/// `steps` SGD steps on the loss above, dense on the tensors and through the pools
/// with the scaler; returns (dense tensors, expanded pools).
fn sgd_both_ways(layout: &RpsLayout, seed: u64, steps: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut z = random_pools(layout, &mut rng);
    let cs: Vec<Vec<f32>> = layout
        .tensors()
        .iter()
        .map(|t| random_vec(&mut rng, t.len(), 0.5, 1.5))
        .collect();
    let ds: Vec<Vec<f32>> = layout
        .tensors()
        .iter()
        .map(|t| random_vec(&mut rng, t.len(), -1.0, 1.0))
        .collect();
    let grad = |w: &[Vec<f32>]| -> Vec<Vec<f32>> {
        w.iter()
            .zip(cs.iter().zip(&ds))
            .map(|(wt, (ct, dt))| {
                wt.iter()
                    .zip(ct.iter().zip(dt))
                    .map(|(&wv, (&cv, &dv))| cv * wv + dv)
                    .collect()
            })
            .collect()
    };
    let lr = 0.1f32;
    let mut dense = expand(layout, &z).unwrap();
    for _ in 0..steps {
        let g = grad(&dense);
        for (wt, gt) in dense.iter_mut().zip(&g) {
            for (wv, &gv) in wt.iter_mut().zip(gt) {
                *wv -= lr * gv;
            }
        }
        let g = grad(&expand(layout, &z).unwrap());
        let mut gz = scatter_grad(layout, &g).unwrap();
        layout.apply_scaler(&mut gz).unwrap();
        for (zq, gq) in z.iter_mut().zip(&gz) {
            for (zv, &gv) in zq.iter_mut().zip(gq) {
                *zv -= lr * gv;
            }
        }
    }
    (dense, expand(layout, &z).unwrap())
}

#[test]
fn sgd_with_the_scaler_follows_dense_sgd_at_m_equals_n() {
    let c = small_config();
    // Lambda 1 (RPS-Delta): bit for bit.
    for scaler in [Scaler::V1, Scaler::V5] {
        let mut cfg = RpsConfig::delta(Budget::Ratio(1.0));
        cfg.scaler = scaler;
        let layout = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
        let (dense, rps) = sgd_both_ways(&layout, 5, 6);
        for (t, (a, b)) in layout.tensors().iter().zip(dense.iter().zip(&rps)) {
            assert_eq!(bits(a), bits(b), "{scaler:?}: {}", t.name());
        }
    }
    // RPS-LoRA: down's A has lambda sqrt(8/16), so equal up to rounding.
    for scaler in [Scaler::V1, Scaler::V5] {
        let mut cfg = RpsConfig::lora(3, 3.0, Budget::Ratio(1.0));
        cfg.scaler = scaler;
        let layout = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
        assert!(layout.tensors().iter().any(|t| t.lambda != 1.0));
        let (dense, rps) = sgd_both_ways(&layout, 6, 6);
        for (t, (a, b)) in layout.tensors().iter().zip(dense.iter().zip(&rps)) {
            for (&x, &y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                    "{scaler:?}: {}: dense {x}, rps {y}",
                    t.name()
                );
            }
        }
    }
    // Without the scaler it does not (lambda != 1 changes the step).
    let mut cfg = RpsConfig::lora(3, 3.0, Budget::Ratio(1.0));
    cfg.scaler = Scaler::None;
    let layout = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
    let (dense, rps) = sgd_both_ways(&layout, 6, 6);
    assert_ne!(dense, rps);
}

#[test]
fn scaler_values_match_brute_force() {
    let c = small_config();
    for (name, layout) in layouts(&c) {
        let s = layout.scaler_values();
        for (q, pool) in layout.pools().iter().enumerate() {
            let f = pool.fold();
            let m = pool.m() as usize;
            let (mut cnt, mut a, mut qs) = (vec![0f64; m], vec![0f64; m], vec![0f64; m]);
            for t in layout.tensors().iter().filter(|t| t.pool() == q) {
                for i in 0..t.len() as u64 {
                    let j = f.slot(t.offset + i) as usize;
                    let l = t.lambda as f64;
                    cnt[j] += 1.0;
                    a[j] += l;
                    qs[j] += l * l;
                }
            }
            for j in 0..m {
                let want = match layout.scaler() {
                    Scaler::V1 => a[j] * a[j] / cnt[j],
                    Scaler::V5 => qs[j],
                    Scaler::None => 1.0,
                } as f32;
                let got = s[q][j];
                assert!(
                    (got - want).abs() <= 1e-6 * want,
                    "{name}: pool {q} slot {j}: S {got}, expected {want}"
                );
            }
        }
    }
}

#[test]
fn scaled_step_is_the_mean_of_the_colliding_dense_steps() {
    // Lambda 1, scaler v1 (S_j = c_j): after one step from z, each position moves by
    // xi(p) times the mean over its slot of xi(p') * (dense step at p').
    let c = small_config();
    let layout = RpsLayout::new(&c, &Proj::ALL, &RpsConfig::delta(Budget::Slots(37))).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    let g: Vec<Vec<f32>> = layout
        .tensors()
        .iter()
        .map(|t| random_vec(&mut rng, t.len(), -1.0, 1.0))
        .collect();
    let mut gz = scatter_grad(&layout, &g).unwrap();
    layout.apply_scaler(&mut gz).unwrap();
    let f = layout.pools()[0].fold();
    let mut sum = vec![0f64; 37];
    let mut count = vec![0f64; 37];
    for (t, gt) in layout.tensors().iter().zip(&g) {
        for (i, &gv) in gt.iter().enumerate() {
            let p = t.offset + i as u64;
            sum[f.slot(p) as usize] += f.sign(p) as f64 * gv as f64;
            count[f.slot(p) as usize] += 1.0;
        }
    }
    for j in 0..37 {
        let mean = sum[j] / count[j];
        assert!(
            (gz[0][j] as f64 - mean).abs() <= 1e-5,
            "slot {j}: {} vs {mean}",
            gz[0][j]
        );
    }
}

// ---- Layouts -------------------------------------------------------------------------

#[test]
fn budgets_and_pool_split() {
    let c = small_config();
    // sum d_in : sum d_out over Q,K,V,O,gate,up,down = (8*6+16) : (8+4+4+8+16+16+8).
    let layout =
        RpsLayout::new(&c, &Proj::ALL, &RpsConfig::lora(2, 4.0, Budget::Slots(100))).unwrap();
    let (sum_in, sum_out) = (64u64, 64u64);
    let p = layout.pools();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].m() + p[1].m(), 100);
    assert_eq!(p[0].m() * (sum_in + sum_out), 100 * sum_in);
    assert_eq!(p[0].n(), 2 * 2 * sum_in);
    assert_eq!(p[1].n(), 2 * 2 * sum_out);
    let mut cfg = RpsConfig::lora(2, 4.0, Budget::Slots(100));
    cfg.split_a = Some(0.25);
    let layout = RpsLayout::new(&c, &Proj::ALL, &cfg).unwrap();
    assert_eq!((layout.pools()[0].m(), layout.pools()[1].m()), (25, 75));
    // Ratio: both pools at the same rho; rho = 1 is m = n in each pool.
    let layout =
        RpsLayout::new(&c, &Proj::ALL, &RpsConfig::lora(2, 4.0, Budget::Ratio(1.0))).unwrap();
    for p in layout.pools() {
        assert_eq!(p.m(), p.n());
    }
    // Lambdas: B 1, A sqrt(d_min / d_in); init bound s0 = 1 / sqrt(d_min).
    for t in layout.tensors() {
        let want = match t.role {
            Role::A => (8f64 / t.cols as f64).sqrt() as f32,
            _ => 1.0,
        };
        assert_eq!(t.lambda, want, "{}", t.name());
    }
    assert_eq!(layout.init_scale(), (1.0 / 8f64.sqrt()) as f32);
    assert_eq!(layout.lora_scale(), 2.0);
    // Refusals.
    for bad in [
        RpsConfig::lora(2, 4.0, Budget::Ratio(0.0)),
        RpsConfig::lora(2, 4.0, Budget::Ratio(1.5)),
        RpsConfig::lora(2, 4.0, Budget::Slots(1)),
        RpsConfig::lora(2, 4.0, Budget::Slots(1 << 40)),
        RpsConfig::lora(0, 4.0, Budget::Slots(10)),
        RpsConfig::lora(9, 4.0, Budget::Slots(10)),
        RpsConfig::lora(2, f32::NAN, Budget::Slots(10)),
        RpsConfig::delta(Budget::Slots(0)),
    ] {
        assert!(RpsLayout::new(&c, &Proj::ALL, &bad).is_err(), "{bad:?}");
    }
    assert!(RpsLayout::new(&c, &[], &RpsConfig::delta(Budget::Slots(3))).is_err());
}

#[test]
fn init_pools_start_at_a_zero_delta_with_lora_like_a() {
    let c = small_config();
    let layout =
        RpsLayout::new(&c, &Proj::ALL, &RpsConfig::lora(2, 4.0, Budget::Ratio(0.5))).unwrap();
    let pools = layout.init_pools(9);
    assert_eq!(pools, layout.init_pools(9));
    assert_ne!(pools, layout.init_pools(10));
    assert!(pools[1].iter().all(|&v| v == 0.0));
    let s0 = layout.init_scale();
    assert!(pools[0].iter().all(|&v| v.abs() <= s0));
    assert!(pools[0].iter().any(|&v| v.abs() > s0 / 2.0));
    let w = expand(&layout, &pools).unwrap();
    for (t, v) in layout.tensors().iter().zip(&w) {
        match t.role {
            Role::B => assert!(v.iter().all(|&x| x == 0.0)),
            _ => {
                let bound = 1.0 / (t.cols as f32).sqrt();
                assert!(
                    v.iter().all(|&x| x.abs() <= bound * 1.000001),
                    "{}",
                    t.name()
                );
                assert!(v.iter().any(|&x| x != 0.0));
            }
        }
    }
    let adapter = layout.to_adapter(&c, &pools, PathBuf::new()).unwrap();
    assert_eq!(adapter.len(), 2 * 7);
    for (_, _, d) in adapter.iter() {
        assert!(d.dense().unwrap().iter().all(|&x| x == 0.0));
    }
    let delta = RpsLayout::new(&c, &Proj::ALL, &RpsConfig::delta(Budget::Ratio(0.5))).unwrap();
    assert!(delta.init_pools(1).concat().iter().all(|&v| v == 0.0));
}

// ---- Through the forward pass ---------------------------------------------------------

#[test]
fn initial_adapter_outputs_equal_the_base_bit_for_bit() {
    let model = load_model();
    let toks = tokens(&model);
    let base = common::logits_all(&model, &toks);
    for (name, cfg) in [
        ("lora", RpsConfig::lora(4, 8.0, Budget::Ratio(0.1))),
        ("delta", RpsConfig::delta(Budget::Ratio(0.05))),
    ] {
        let layout = RpsLayout::new(&model.config, &Proj::ALL, &cfg).unwrap();
        let pools = layout.init_pools(1234);
        let path = tmp_path(&format!("init-{name}.rps"));
        rps::save(&path, &layout, &pools).unwrap();
        let adapter = load_adapter(&path, &model).unwrap();
        assert_eq!(adapter.format, AdapterFormat::Rps);
        assert_eq!(adapter.len(), model.config.n_layer * Proj::ALL.len());
        let with = common::logits_all_with(&model, &toks, Some(&adapter));
        assert_eq!(
            bits(&base),
            bits(&with),
            "{name}: step-0 logits differ from the base"
        );
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn rps_lora_at_rho_one_equals_lora() {
    let model = load_model();
    let c = &model.config;
    let (rank, alpha) = (4usize, 8.0f32);
    let layout = RpsLayout::new(
        c,
        &Proj::ALL,
        &RpsConfig::lora(rank, alpha, Budget::Ratio(1.0)),
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(21);

    // The expanded tensors are the pools, signed and permuted (times lambda).
    let z = random_pools(&layout, &mut rng);
    let w = expand(&layout, &z).unwrap();
    for (q, zq) in z.iter().enumerate() {
        let f = layout.pools()[q].fold();
        let mut hit = vec![false; zq.len()];
        for (t, v) in layout
            .tensors()
            .iter()
            .zip(&w)
            .filter(|(t, _)| t.pool() == q)
        {
            for (i, &x) in v.iter().enumerate() {
                let p = t.offset + i as u64;
                let j = f.slot(p) as usize;
                assert!(!hit[j], "slot {j} of pool {q} used twice");
                hit[j] = true;
                assert_eq!(x, t.lambda * f.sign(p) * zq[j]);
            }
        }
        assert!(hit.iter().all(|&h| h));
    }

    // A random LoRA, written into the pools through the adjoint and the v5 scaler
    // (at m = n: z_j = lambda xi W / lambda^2, the inverse of expand).
    let mut lora = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let mut dense: Vec<Vec<f32>> = Vec::new();
    for t in layout.tensors() {
        let v = match t.role {
            Role::A => random_vec(&mut rng, t.len(), -0.06, 0.06),
            _ => random_vec(&mut rng, t.len(), -0.05, 0.05),
        };
        dense.push(v);
    }
    for (t, v) in layout.tensors().iter().zip(&dense) {
        if t.role == Role::A {
            let b = layout.find(t.layer, t.proj, Role::B).unwrap();
            let tb = &layout.tensors()[b];
            let delta = LoraDelta {
                a: f32_weight(t.rows, t.cols, v).unwrap(),
                b: f32_weight(tb.rows, tb.cols, &dense[b]).unwrap(),
                scale: alpha / rank as f32,
                dora_factor: None,
            };
            lora.insert(c, t.layer, t.proj, TensorDelta::Lora(delta))
                .unwrap();
        }
    }
    let mut v5 = RpsConfig::lora(rank, alpha, Budget::Ratio(1.0));
    v5.scaler = Scaler::V5;
    let v5 = RpsLayout::new(c, &Proj::ALL, &v5).unwrap();
    let mut pools = scatter_grad(&v5, &dense).unwrap();
    v5.apply_scaler(&mut pools).unwrap();
    let back = expand(&layout, &pools).unwrap();
    for ((t, a), b) in layout.tensors().iter().zip(&dense).zip(&back) {
        for (&x, &y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-7 * (1.0 + x.abs()) * 4.0,
                "{}: {x} vs {y}",
                t.name()
            );
        }
    }

    let path = tmp_path("rho1.rps");
    rps::save(&path, &layout, &pools).unwrap();
    let loaded = rps::load(&path, &model).unwrap();
    let toks = tokens(&model);
    let with_rps = common::logits_all_with(&model, &toks, Some(&loaded));
    let with_lora = common::logits_all_with(&model, &toks, Some(&lora));
    let base = common::logits_all(&model, &toks);
    let max_abs = |v: &[f32]| v.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let rel = diff(&with_lora, &with_rps) / max_abs(&with_lora);
    let moved = diff(&base, &with_lora) / max_abs(&base);
    eprintln!("RPS-LoRA rho=1 vs LoRA: rel err {rel:.2e}; LoRA moves logits by {moved:.2e}");
    assert!(rel <= 1e-5, "RPS-LoRA at rho = 1 vs LoRA: rel err {rel:e}");
    assert!(
        moved > 1e-3,
        "the LoRA barely changes the logits ({moved:e})"
    );

    // And exactly the LoRA whose A and B are the expanded tensors.
    let mut exact = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    for (t, v) in layout.tensors().iter().zip(&back) {
        if t.role == Role::A {
            let b = layout.find(t.layer, t.proj, Role::B).unwrap();
            let tb = &layout.tensors()[b];
            let delta = LoraDelta {
                a: f32_weight(t.rows, t.cols, v).unwrap(),
                b: f32_weight(tb.rows, tb.cols, &back[b]).unwrap(),
                scale: alpha / rank as f32,
                dora_factor: None,
            };
            exact
                .insert(c, t.layer, t.proj, TensorDelta::Lora(delta))
                .unwrap();
        }
    }
    let with_exact = common::logits_all_with(&model, &toks, Some(&exact));
    assert_eq!(bits(&with_exact), bits(&with_rps));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn rps_delta_applies_like_its_merged_dense_delta() {
    let mut model = load_model();
    let c = model.config.clone();
    let layout = RpsLayout::new(
        &c,
        &[Proj::Q, Proj::V, Proj::Down],
        &RpsConfig::delta(Budget::Ratio(0.2)),
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(31);
    let pools: Vec<Vec<f32>> = layout
        .pools()
        .iter()
        .map(|p| random_vec(&mut rng, p.m() as usize, -0.02, 0.02))
        .collect();
    let bytes = rps::to_bytes(&layout, &pools, "d.rps").unwrap();
    let adapter = rps::adapter_from_bytes(&bytes, "d.rps", &c).unwrap();
    let w = expand(&layout, &pools).unwrap();
    for (t, v) in layout.tensors().iter().zip(&w) {
        let Some(TensorDelta::Dense(d)) = adapter.get(t.layer, t.proj) else {
            panic!("{} is not dense", t.name())
        };
        assert_eq!(bits(&d.dense().unwrap()), bits(v));
    }
    let toks = tokens(&model);
    let base = common::logits_all(&model, &toks);
    let with = common::logits_all_with(&model, &toks, Some(&adapter));
    let record = graft_adapters::merge_into(
        &mut model,
        &graft_adapters::AdapterStack::single(std::sync::Arc::new(adapter), 1.0),
    )
    .unwrap();
    let merged = common::logits_all(&model, &toks);
    let max_abs = |v: &[f32]| v.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let rel = diff(&merged, &with) / max_abs(&merged);
    assert!(
        rel <= 1e-5,
        "dense delta vs merged weights: rel err {rel:e}"
    );
    assert!(
        diff(&base, &with) / max_abs(&base) > 1e-3,
        "the delta is a no-op"
    );
    graft_adapters::unmerge(&mut model, record).unwrap();
}

// ---- Files ---------------------------------------------------------------------------

#[test]
fn save_load_round_trip_is_exact() {
    let model = load_model();
    let c = &model.config;
    let mut rng = StdRng::seed_from_u64(41);
    let mut cfg = RpsConfig::lora(3, 5.5, Budget::Slots(5000));
    cfg.seed = u64::MAX - 3;
    cfg.scaler = Scaler::V5;
    cfg.split_a = Some(0.4);
    let targets = [(0, Proj::K), (1, Proj::O), (1, Proj::Gate), (0, Proj::Down)];
    let lora = RpsLayout::with_targets(c, &targets, &cfg).unwrap();
    let delta = RpsLayout::new(c, &[Proj::Up], &RpsConfig::delta(Budget::Ratio(0.01))).unwrap();
    for layout in [lora, delta] {
        let pools = random_pools(&layout, &mut rng);
        let path = tmp_path("roundtrip.rps");
        rps::save(&path, &layout, &pools).unwrap();
        let (l2, p2) = rps::read(&path, c).unwrap();
        assert_eq!(l2, layout);
        assert_eq!(p2.len(), pools.len());
        for (a, b) in pools.iter().zip(&p2) {
            assert_eq!(bits(a), bits(b));
        }
        let again = rps::to_bytes(&l2, &p2, "again").unwrap();
        assert_eq!(again, std::fs::read(&path).unwrap());
        // The loaded adapter is the expansion of the saved pools.
        let adapter = rps::load(&path, &model).unwrap();
        let direct = layout.to_adapter(c, &pools, PathBuf::new()).unwrap();
        assert_eq!(adapter.len(), direct.len());
        for (l, p, d) in direct.iter() {
            let e = adapter.get(l, p).unwrap();
            assert_eq!(bits(&d.dense().unwrap()), bits(&e.dense().unwrap()));
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// A small valid file: RPS-LoRA rank 2 on layer 0 Q and layer 1 V of the
/// conformance model, 40 slots.
fn small_file(c: &ModelConfig) -> (RpsLayout, Vec<u8>) {
    let mut cfg = RpsConfig::lora(2, 4.0, Budget::Slots(40));
    cfg.seed = 99;
    let layout = RpsLayout::with_targets(c, &[(0, Proj::Q), (1, Proj::V)], &cfg).unwrap();
    let mut rng = StdRng::seed_from_u64(51);
    let pools = random_pools(&layout, &mut rng);
    let bytes = rps::to_bytes(&layout, &pools, "small").unwrap();
    (layout, bytes)
}

#[test]
fn every_truncation_is_an_error() {
    let c = load_model().config;
    let (_, bytes) = small_file(&c);
    rps::from_bytes(&bytes, "full", &c).unwrap();
    for len in 0..bytes.len() {
        let e = rps::from_bytes(&bytes[..len], "cut", &c)
            .err()
            .unwrap_or_else(|| panic!("truncated to {len} bytes loaded"));
        assert!(e.to_string().starts_with("cut: "), "{e}");
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    assert!(rps::from_bytes(&longer, "long", &c).is_err());
}

#[test]
fn flipped_bytes_never_panic() {
    let c = load_model().config;
    let (_, bytes) = small_file(&c);
    let mut accepted = 0;
    for i in 0..bytes.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= x;
            if let Ok((l, p)) = rps::from_bytes(&b, "flip", &c) {
                // Whatever loads must expand and save again.
                l.to_adapter(&c, &p, PathBuf::new()).unwrap();
                rps::to_bytes(&l, &p, "flip").unwrap();
                accepted += 1;
            }
        }
    }
    eprintln!(
        "{accepted} of {} single-byte corruptions still load (pool values, padding)",
        bytes.len() * 3
    );
}

/// The metadata and tensors of a file, to rebuild it with one part corrupted.
struct Parts {
    meta: HashMap<String, String>,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl Parts {
    fn of(bytes: &[u8]) -> Parts {
        let st = SafeTensors::deserialize(bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let mut tensors: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Parts { meta, tensors }
    }

    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, &Some(self.meta.clone())).unwrap()
    }

    fn json(&self, key: &str) -> serde_json::Value {
        serde_json::from_str(&self.meta[key]).unwrap()
    }

    fn set_json(&mut self, key: &str, v: serde_json::Value) {
        self.meta.insert(key.into(), v.to_string());
    }
}

#[test]
fn corrupted_files_name_the_problem() {
    let c = load_model().config;
    let (layout, bytes) = small_file(&c);
    let good = Parts::of(&bytes);
    // The rebuilt file (safetensors' own writer) still loads.
    rps::from_bytes(&good.bytes(), "rebuilt", &c).unwrap();
    let m_a = layout.pools()[0].m() as usize;
    let m_shape = format!("expected [{}]", m_a + 1);

    type Corrupt = Box<dyn Fn(&mut Parts)>;
    let meta = |k: &'static str, v: &'static str| -> Corrupt {
        Box::new(move |p: &mut Parts| {
            p.meta.insert(k.into(), v.into());
        })
    };
    let drop_meta = |k: &'static str| -> Corrupt {
        Box::new(move |p: &mut Parts| {
            p.meta.remove(k);
        })
    };
    let pool = |f: &'static str, v: serde_json::Value| -> Corrupt {
        Box::new(move |p: &mut Parts| {
            let mut j = p.json("pools");
            j[0][f] = v.clone();
            p.set_json("pools", j);
        })
    };
    let tensor = |i: usize, f: &'static str, v: serde_json::Value| -> Corrupt {
        Box::new(move |p: &mut Parts| {
            let mut j = p.json("tensors");
            j[i][f] = v.clone();
            p.set_json("tensors", j);
        })
    };
    use serde_json::json;
    let cases: Vec<(&str, Corrupt, Vec<&str>)> = vec![
        (
            "format",
            meta("format", "graft-sara"),
            vec!["format", "graft-rps"],
        ),
        ("version", meta("version", "2"), vec!["version", "\"1\""]),
        (
            "arch",
            meta("architecture", "qwen2"),
            vec!["architecture", "llama"],
        ),
        (
            "no arch",
            drop_meta("architecture"),
            vec!["architecture", "(missing)"],
        ),
        (
            "mapper",
            meta("mapper", "roast"),
            vec!["mapper", "random-fold"],
        ),
        ("seed text", meta("seed", "-1"), vec!["seed", "u64"]),
        (
            "seed changed",
            meta("seed", "100"),
            vec!["pools[0]", "regenerated from seed 100"],
        ),
        ("no seed", drop_meta("seed"), vec!["seed", "missing"]),
        ("mode", meta("mode", "sparse"), vec!["mode", "lora"]),
        ("rank 0", meta("rank", "0"), vec!["rank", "positive"]),
        (
            "rank vs shapes",
            meta("rank", "3"),
            vec!["lora_a", "shape [2, 256]", "[3, 256]"],
        ),
        ("no rank", drop_meta("rank"), vec!["rank", "missing"]),
        ("alpha", meta("alpha", "NaN"), vec!["alpha", "finite"]),
        ("scaler", meta("scaler", "v3"), vec!["scaler", "v5"]),
        (
            "pools json",
            meta("pools", "[{"),
            vec!["pools", "valid pool list"],
        ),
        (
            "pools count",
            Box::new(|p: &mut Parts| {
                let mut j = p.json("pools");
                j.as_array_mut().unwrap().pop();
                p.set_json("pools", j);
            }),
            vec!["1 pools", "expected 2"],
        ),
        (
            "pool name",
            pool("name", json!("z_b")),
            vec!["pools[0].name", "z_a"],
        ),
        (
            "pool a",
            pool("a", json!(3)),
            vec!["pools[0] (z_a).a = 3", "expected"],
        ),
        ("pool key", pool("key_k", json!(0)), vec!["key_k = 0"]),
        (
            "pool seed",
            pool("seed", json!(5)),
            vec!["seed = 5", "expected 99"],
        ),
        (
            "pool unknown field",
            pool("extra", json!(1)),
            vec!["pools", "extra"],
        ),
        (
            "pool m vs tensor",
            pool("m", json!(m_a + 1)),
            vec!["z_a", "shape", &m_shape],
        ),
        (
            "pool n",
            pool("n", json!(12345)),
            vec!["pools[0] (z_a).n = 12345", "expected 1024"],
        ),
        (
            "tensors json",
            meta("tensors", "{}"),
            vec!["tensors", "valid tensor list"],
        ),
        (
            "proj",
            tensor(0, "proj", json!("attn_x")),
            vec!["tensors[0].proj", "attn_x"],
        ),
        (
            "role",
            tensor(0, "role", json!("c")),
            vec!["tensors[0].role", "\"c\""],
        ),
        (
            "name",
            tensor(0, "name", json!("blk.0.attn_q.weight")),
            vec!["tensors[0].name", "blk.0.attn_q.weight.lora_a"],
        ),
        (
            "layer",
            Box::new(|p: &mut Parts| {
                let mut j = p.json("tensors");
                j[2]["layer"] = json!(7);
                j[2]["name"] = json!("blk.7.attn_v.weight.lora_a");
                p.set_json("tensors", j);
            }),
            vec!["layer 7", "below the base's 2 layers"],
        ),
        (
            "shape",
            tensor(0, "shape", json!([2, 128])),
            vec!["shape [2, 128]", "expected [2, 256]"],
        ),
        (
            "offset gap",
            tensor(2, "offset", json!(513)),
            vec!["offset 513", "expected 512"],
        ),
        (
            "offset overlap",
            tensor(2, "offset", json!(0)),
            vec!["offset 0", "expected 512"],
        ),
        (
            "lambda zero",
            tensor(1, "lambda", json!(0.0)),
            vec!["lambda 0", "> 0"],
        ),
        (
            "lambda negative",
            tensor(1, "lambda", json!(-1.5)),
            vec!["lambda -1.5"],
        ),
        (
            "tensor unknown field",
            tensor(1, "bias", json!(true)),
            vec!["tensors", "bias"],
        ),
        (
            "negative offset",
            tensor(1, "offset", json!(-4)),
            vec!["tensors", "valid tensor list"],
        ),
        (
            "missing partner",
            Box::new(|p: &mut Parts| {
                let mut j = p.json("tensors");
                j.as_array_mut().unwrap().remove(3);
                p.set_json("tensors", j);
                let mut q = p.json("pools");
                q[1]["n"] = json!(256 * 2);
                p.set_json("pools", q);
            }),
            vec!["blk.1.attn_v.weight", "only one of lora_a / lora_b"],
        ),
        (
            "duplicate",
            Box::new(|p: &mut Parts| {
                let mut j = p.json("tensors");
                let t = j[0].clone();
                let mut t2 = t.clone();
                t2["offset"] = json!(1024);
                j.as_array_mut().unwrap().push(t2);
                p.set_json("tensors", j);
            }),
            vec!["blk.0.attn_q.weight.lora_a appears twice"],
        ),
        (
            "delta role in lora",
            Box::new(|p: &mut Parts| {
                let mut j = p.json("tensors");
                j[0]["role"] = json!("delta");
                j[0]["name"] = json!("blk.0.attn_q.weight.delta");
                p.set_json("tensors", j);
            }),
            vec!["role delta", "a or b"],
        ),
        (
            "extra tensor",
            Box::new(|p: &mut Parts| {
                p.tensors
                    .push(("z_c".into(), Dtype::F32, vec![1], vec![0; 4]));
            }),
            vec!["z_c", "unexpected tensor"],
        ),
        (
            "missing pool tensor",
            Box::new(|p: &mut Parts| {
                p.tensors.retain(|t| t.0 != "z_b");
            }),
            vec!["z_b", "is missing"],
        ),
        (
            "pool dtype",
            Box::new(|p: &mut Parts| {
                let t = &mut p.tensors[0];
                t.1 = Dtype::F16;
                t.2 = vec![t.3.len() / 2];
            }),
            vec!["z_a", "dtype F16"],
        ),
        (
            "pool 2-D",
            Box::new(|p: &mut Parts| {
                let t = &mut p.tensors[0];
                t.2 = vec![1, t.2[0]];
            }),
            vec!["z_a", "shape [1,"],
        ),
        (
            "pool NaN",
            Box::new(|p: &mut Parts| {
                p.tensors[1].3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
            }),
            vec!["z_b", "value 2 is NaN"],
        ),
        (
            "m above n",
            Box::new(|p: &mut Parts| {
                let n = 1024 + 1;
                let mut q = p.json("pools");
                q[0]["m"] = json!(n);
                p.set_json("pools", q);
                let t = &mut p.tensors[0];
                t.2 = vec![n];
                t.3 = vec![0; 4 * n];
            }),
            vec!["pool z_a", "1025 slots", "1..=1024"],
        ),
    ];
    for (name, corrupt, needles) in cases {
        let mut p = Parts::of(&bytes);
        corrupt(&mut p);
        let e = match rps::from_bytes(&p.bytes(), "bad.rps", &c) {
            Ok(_) => panic!("{name}: corrupted file loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with("bad.rps: "), "{name}: {e}");
        for n in needles {
            assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
        }
    }
}

#[test]
fn layouts_from_parts_are_checked() {
    let c = small_config();
    let t = |role, rows, cols, offset, lambda| VirtualTensor {
        layer: 0,
        proj: Proj::Q,
        role,
        rows,
        cols,
        offset,
        lambda,
    };
    let lora = RpsMode::Lora {
        rank: 2,
        alpha: 1.0,
    };
    let ok = vec![t(Role::A, 2, 8, 0, 1.0), t(Role::B, 8, 2, 0, 0.5)];
    RpsLayout::from_parts(&c, lora, 1, Scaler::V1, &[4, 4], ok.clone()).unwrap();
    for (name, slots, tensors) in [
        ("pool count", vec![4], ok.clone()),
        ("m > n", vec![17, 4], ok.clone()),
        ("m 0", vec![0, 4], ok.clone()),
        ("no tensors", vec![4, 4], vec![]),
        (
            "nan lambda",
            vec![4, 4],
            vec![t(Role::A, 2, 8, 0, f32::NAN), t(Role::B, 8, 2, 0, 1.0)],
        ),
        (
            "offset",
            vec![4, 4],
            vec![t(Role::A, 2, 8, 1, 1.0), t(Role::B, 8, 2, 0, 1.0)],
        ),
        ("unpaired", vec![4], vec![t(Role::A, 2, 8, 0, 1.0)]),
    ] {
        assert!(
            RpsLayout::from_parts(&c, lora, 1, Scaler::V1, &slots, tensors).is_err(),
            "{name}"
        );
    }
    let e = RpsLayout::from_parts(&c, RpsMode::Delta, 1, Scaler::V1, &[4], ok)
        .unwrap_err()
        .to_string();
    assert!(e.contains("role a") && e.contains("delta"), "{e}");
}

#[test]
fn wrong_sizes_are_errors_not_panics() {
    let c = small_config();
    let layout =
        RpsLayout::new(&c, &Proj::ALL, &RpsConfig::lora(2, 4.0, Budget::Ratio(0.5))).unwrap();
    let pools = layout.init_pools(1);
    assert!(expand(&layout, &pools[..1]).is_err());
    let mut short = pools.clone();
    short[1].pop();
    assert!(expand(&layout, &short).is_err());
    assert!(rps::to_bytes(&layout, &short, "x").is_err());
    let mut nan = pools.clone();
    nan[0][0] = f32::INFINITY;
    assert!(rps::to_bytes(&layout, &nan, "x").is_err());
    let w = expand(&layout, &pools).unwrap();
    assert!(scatter_grad(&layout, &w[1..]).is_err());
    let mut bad = w.clone();
    bad[0].push(0.0);
    assert!(scatter_grad(&layout, &bad).is_err());
    let mut g = scatter_grad(&layout, &w).unwrap();
    g[0].pop();
    assert!(layout.apply_scaler(&mut g).is_err());
    // A file for one model does not load on another.
    let bytes = rps::to_bytes(&layout, &pools, "small.rps").unwrap();
    let big = load_model().config;
    assert!(rps::from_bytes(&bytes, "small.rps", &big).is_err());
}
