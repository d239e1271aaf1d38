//! Adapter merging against small hand-computed examples.

use std::path::PathBuf;

use graft_adapters::combine::{
    self, combine, dare_apply, dare_keep_mask, CombineMethod, DareMerge, DareRescale,
};
use graft_adapters::delta::{f32_weight, projection_shape};
use graft_adapters::{sara, Adapter, AdapterFormat, LoraDelta, TensorDelta};
use graft_runtime::model::{Arch, ModelConfig, Proj, RopeScaling, RopeStyle};
use rand::{Rng, SeedableRng};

/// One head of `n_embd` dims: Q is `n_embd x n_embd`, Up `n_ff x n_embd`.
fn config(n_embd: usize, n_ff: usize) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        n_vocab: 16,
        n_embd,
        n_layer: 2,
        n_ff,
        n_head: 1,
        n_head_kv: 1,
        head_dim: n_embd,
        n_rot: n_embd,
        rope_base: 1e4,
        rope_scaling: RopeScaling::None,
        rope_style: RopeStyle::Normal,
        rms_eps: 1e-5,
        n_ctx_train: 64,
    }
}

/// An adapter with dense deltas given per (layer, projection), stored sparse.
fn adapter(c: &ModelConfig, deltas: &[(usize, Proj, &[f32])]) -> Adapter {
    let mut a = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    for &(layer, proj, d) in deltas {
        let (rows, cols) = projection_shape(c, proj);
        let s = sara::from_dense(rows, cols, d, 1.0).unwrap();
        a.insert(c, layer, proj, TensorDelta::Sparse(s)).unwrap();
    }
    a
}

/// The merged dense delta of (layer, proj), zeros when absent; checks it is sparse
/// with no stored zeros.
fn dense(c: &ModelConfig, a: &Adapter, layer: usize, proj: Proj) -> Vec<f32> {
    let (rows, cols) = projection_shape(c, proj);
    match a.get(layer, proj) {
        None => vec![0.0; rows * cols],
        Some(TensorDelta::Sparse(s)) => {
            assert!(s.values.iter().all(|&v| v != 0.0), "stored zeros");
            assert_eq!(s.scale, 1.0);
            s.dense()
        }
        Some(TensorDelta::Lora(_) | TensorDelta::Dense(_)) => {
            panic!("merge result holds a non-sparse delta")
        }
    }
}

fn assert_close(found: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(found.len(), expected.len());
    for (i, (&f, &e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f - e).abs() <= tol * e.abs().max(1.0),
            "entry {i}: {f}, expected {e} (all: {found:?})"
        );
    }
}

// Three task vectors of a 2x2 Q (flat row-major).
const T1: [f32; 4] = [4.0, -1.0, 2.0, 0.5];
const T2: [f32; 4] = [-3.0, 2.0, 1.0, -0.5];
const T3: [f32; 4] = [2.0, -2.0, -6.0, 0.25];

fn three_tasks(c: &ModelConfig) -> [Adapter; 3] {
    [
        adapter(c, &[(0, Proj::Q, &T1)]),
        adapter(c, &[(0, Proj::Q, &T2)]),
        adapter(c, &[(0, Proj::Q, &T3)]),
    ]
}

#[test]
fn ties_hand_example() {
    let c = config(2, 4);
    let [a, b, d] = three_tasks(&c);
    let m = combine(
        &[(&a, 1.0), (&b, 1.0), (&d, 1.0)],
        &CombineMethod::Ties { density: 0.5 },
        &c,
    )
    .unwrap();
    // density 0.5 of 4 entries: keep k = 2 largest |v| per task.
    //   T1 [4, -1, 2, .5]   -> [4, 0, 2, 0]
    //   T2 [-3, 2, 1, -.5]  -> [-3, 2, 0, 0]
    //   T3 [2, -2, -6, .25] -> [2, 0, -6, 0]  (|2| = |-2|: the lower index wins)
    // elect sgn of the sums: e0 4-3+2 = 3 (+), e1 0+2+0 = 2 (+), e2 2+0-6 = -4 (-), e3 0
    // disjoint mean: e0 (4+2)/2 = 3, e1 2/1 = 2, e2 -6/1 = -6, e3 0
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![3.0, 2.0, -6.0, 0.0]);
    assert_eq!(m.len(), 1);

    // Weights scale the task vectors first: T3 at 0.5 is [1, -1, -3, .125]
    //   trim -> [1, 0, -3, 0]; e0 4-3+1 = 2 (+): (4+1)/2 = 2.5; e1 2 (+): 2;
    //   e2 2+0-3 = -1 (-): -3/1 = -3; e3 0
    let m = combine(
        &[(&a, 1.0), (&b, 1.0), (&d, 0.5)],
        &CombineMethod::Ties { density: 0.5 },
        &c,
    )
    .unwrap();
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![2.5, 2.0, -3.0, 0.0]);

    // A sign tie elects nothing: [1, 0, 0, 0] and [-1, 0, 0, 0] give 0 there.
    let p = adapter(&c, &[(0, Proj::Q, &[1.0, 0.0, 0.0, 3.0])]);
    let n = adapter(&c, &[(0, Proj::Q, &[-1.0, 0.0, 0.0, 1.0])]);
    let m = combine(
        &[(&p, 1.0), (&n, 1.0)],
        &CombineMethod::Ties { density: 1.0 },
        &c,
    )
    .unwrap();
    // e3: (3 + 1) / 2 = 2
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![0.0, 0.0, 0.0, 2.0]);
}

#[test]
fn linear_hand_example_and_untouched_projections() {
    let c = config(2, 4);
    let [a, _, _] = three_tasks(&c);
    let up: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let b_up = adapter(&c, &[(0, Proj::Q, &T2), (1, Proj::Up, &up)]);
    let m = combine(&[(&a, 0.5), (&b_up, -2.0)], &CombineMethod::Linear, &c).unwrap();
    // Q: 0.5*T1 - 2*T2 = [2+6, -.5-4, 1-2, .25+1] = [8, -4.5, -1, 1.25]
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![8.0, -4.5, -1.0, 1.25]);
    // Up of layer 1 only in the second: -2 * [0..8) (its zero entry is not stored).
    let expected: Vec<f32> = up.iter().map(|v| -2.0 * v).collect();
    assert_eq!(dense(&c, &m, 1, Proj::Up), expected);
    let Some(TensorDelta::Sparse(s)) = m.get(1, Proj::Up) else {
        panic!()
    };
    assert_eq!(s.values.len(), 7);
    assert_eq!(m.len(), 2);
    // Inputs that cancel leave the projection out.
    let m = combine(&[(&a, 1.0), (&a, -1.0)], &CombineMethod::Linear, &c).unwrap();
    assert!(m.is_empty());
}

/// Row-major `[rows, cols]` product of `b [rows, r]` and `a [r, cols]`.
fn matmul(b: &[f32], a: &[f32], rows: usize, r: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows * cols];
    for i in 0..rows {
        for k in 0..r {
            for j in 0..cols {
                out[i * cols + j] += b[i * r + k] as f64 * a[k * cols + j] as f64;
            }
        }
    }
    out
}

#[test]
fn linear_of_two_loras_equals_the_sum_of_their_dense_deltas() {
    let c = config(16, 40);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut adapters = Vec::new();
    // (layer, proj, rank, scale) per adapter; they overlap on layer 0 Q.
    let plans = [
        vec![(0, Proj::Q, 4, 2.0f32), (1, Proj::Down, 2, 0.5)],
        vec![(0, Proj::Q, 3, 1.5f32), (0, Proj::Gate, 8, 0.25)],
    ];
    let mut raw = Vec::new();
    for plan in &plans {
        let mut a = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
        for &(layer, proj, r, scale) in plan {
            let (rows, cols) = projection_shape(&c, proj);
            let la: Vec<f32> = (0..r * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let lb: Vec<f32> = (0..rows * r).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let l = LoraDelta {
                a: f32_weight(r, cols, &la).unwrap(),
                b: f32_weight(rows, r, &lb).unwrap(),
                scale,
                dora_factor: None,
            };
            a.insert(&c, layer, proj, TensorDelta::Lora(l)).unwrap();
            raw.push((adapters.len(), layer, proj, r, scale, la, lb));
        }
        adapters.push(a);
    }
    let weights = [0.7f32, -0.3];
    let m = combine(
        &[(&adapters[0], weights[0]), (&adapters[1], weights[1])],
        &CombineMethod::Linear,
        &c,
    )
    .unwrap();
    assert_eq!(m.len(), 3);
    for (layer, proj) in [(0, Proj::Q), (1, Proj::Down), (0, Proj::Gate)] {
        let (rows, cols) = projection_shape(&c, proj);
        let mut expected = vec![0f64; rows * cols];
        for (t, l, p, r, scale, la, lb) in &raw {
            if (*l, *p) == (layer, proj) {
                let ba = matmul(lb, la, rows, *r, cols);
                for (e, v) in expected.iter_mut().zip(ba) {
                    *e += weights[*t] as f64 * *scale as f64 * v;
                }
            }
        }
        let expected: Vec<f32> = expected.into_iter().map(|v| v as f32).collect();
        assert_close(&dense(&c, &m, layer, proj), &expected, 1e-5);
    }
}

#[test]
fn dare_forced_mask_and_rescale() {
    let v = [1.0, -2.0, 3.0, 4.0];
    let keep = [true, false, true, false];
    // p = 0.5: survivors times 1 / (1 - 0.5) = 2.
    let f = DareRescale::Standard.factor(0.5);
    assert_eq!(f, 2.0);
    assert_eq!(dare_apply(&v, &keep, f).unwrap(), vec![2.0, 0.0, 6.0, 0.0]);
    // p = 0.75: times 4.
    assert_eq!(DareRescale::Standard.factor(0.75), 4.0);
    // DAREx-q at p = 0.9 with q = 0.8: times 1 / 0.8 = 1.25 (not 1 / 0.1 = 10).
    let f = DareRescale::DarexQ(0.8).factor(0.9);
    assert_eq!(f, 1.25);
    assert_eq!(
        dare_apply(&v, &keep, f).unwrap(),
        vec![1.25, 0.0, 3.75, 0.0]
    );
    assert!(dare_apply(&v, &keep[..3], 2.0).is_err());
}

// An independent splitmix64, written from its definition, to derive DARE's masks.
fn sm64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E3779B97F4A7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

fn first(x: u64) -> u64 {
    let mut s = x;
    sm64(&mut s)
}

/// DARE's documented mask: key = mix(mix(mix(seed) ^ task) ^ (7 layer + proj)),
/// entry i dropped iff (z_i >> 11) / 2^53 < p.
fn reference_mask(seed: u64, task: u64, layer: u64, proj: Proj, n: usize, p: f64) -> Vec<bool> {
    let mut s = first(first(first(seed) ^ task) ^ (7 * layer + proj.index() as u64));
    (0..n)
        .map(|_| ((sm64(&mut s) >> 11) as f64 / 9007199254740992.0) >= p)
        .collect()
}

#[test]
fn splitmix64_matches_the_reference_vectors() {
    // Outputs of the reference splitmix64.c seeded with 1234567.
    let mut s = 1234567u64;
    let mut ours = 1234567u64;
    for want in [
        6457827717110365317u64,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ] {
        assert_eq!(sm64(&mut s), want);
        assert_eq!(combine::splitmix64(&mut ours), want);
    }
}

#[test]
fn dare_tiny_example_with_its_seeded_mask() {
    let c = config(2, 4);
    let [a, b, _] = three_tasks(&c);
    let (seed, p) = (13u64, 0.5f32);
    // The masks the definition gives for seed 13 (derived once with reference_mask,
    // cross-checked with a separate script):
    let m0 = [true, false, true, false];
    let m1 = [true, true, true, false];
    assert_eq!(reference_mask(seed, 0, 0, Proj::Q, 4, 0.5), m0);
    assert_eq!(reference_mask(seed, 1, 0, Proj::Q, 4, 0.5), m1);
    assert_eq!(dare_keep_mask(seed, 0, 0, Proj::Q, 4, p), m0);
    assert_eq!(dare_keep_mask(seed, 1, 0, Proj::Q, 4, p), m1);
    // (seed 42 gives [T, F, F, T] and [F, F, T, T]: the seed matters.)
    assert_eq!(
        reference_mask(42, 0, 0, Proj::Q, 4, 0.5),
        [true, false, false, true]
    );
    assert_eq!(
        dare_keep_mask(42, 1, 0, Proj::Q, 4, p),
        [false, false, true, true]
    );

    let dare = |merge, rescale| CombineMethod::Dare {
        drop_rate: p,
        seed,
        rescale,
        merge,
    };
    // Factor 1 / (1 - .5) = 2:
    //   T1 [4, -1, 2, .5]  masked by m0, times 2 = [8, 0, 4, 0]
    //   T2 [-3, 2, 1, -.5] masked by m1, times 2 = [-6, 4, 2, 0]
    // Linear: [8-6, 0+4, 4+2, 0] = [2, 4, 6, 0]
    let m = combine(
        &[(&a, 1.0), (&b, 1.0)],
        &dare(DareMerge::Linear, DareRescale::Standard),
        &c,
    )
    .unwrap();
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![2.0, 4.0, 6.0, 0.0]);
    // TIES combination of the same: e0 8-6 = 2 (+): 8/1 = 8; e1 only 4; e2 4 and 2
    //   agree (+): (4+2)/2 = 3; e3 0.
    let m = combine(
        &[(&a, 1.0), (&b, 1.0)],
        &dare(DareMerge::Ties, DareRescale::Standard),
        &c,
    )
    .unwrap();
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![8.0, 4.0, 3.0, 0.0]);
    // DAREx-q with q = 0.8 (factor 1.25): T1 -> [5, 0, 2.5, 0],
    //   T2 -> [-3.75, 2.5, 1.25, 0]; sum [1.25, 2.5, 3.75, 0]
    let m = combine(
        &[(&a, 1.0), (&b, 1.0)],
        &dare(DareMerge::Linear, DareRescale::DarexQ(0.8)),
        &c,
    )
    .unwrap();
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![1.25, 2.5, 3.75, 0.0]);

    // Drop rate 0 keeps everything: DARE-TIES is then the untrimmed disjoint mean of
    // T1..T3: e0 4-3+2 = 3 (+): (4+2)/2 = 3; e1 -1+2-2 = -1 (-): (-1-2)/2 = -1.5;
    // e2 2+1-6 = -3 (-): -6; e3 .5-.5+.25 = .25 (+): (.5+.25)/2 = .375
    let [a, b, d] = three_tasks(&c);
    let m = combine(
        &[(&a, 1.0), (&b, 1.0), (&d, 1.0)],
        &CombineMethod::Dare {
            drop_rate: 0.0,
            seed: 1,
            rescale: DareRescale::Standard,
            merge: DareMerge::Ties,
        },
        &c,
    )
    .unwrap();
    assert_eq!(dense(&c, &m, 0, Proj::Q), vec![3.0, -1.5, -6.0, 0.375]);
}

#[test]
fn dare_drop_rate_and_rescale_on_a_large_tensor() {
    // Up is 512 x 256 = 131072 entries, all 1.5.
    let c = config(256, 512);
    let n = 512 * 256;
    let v = vec![1.5f32; n];
    let a = adapter(&c, &[(1, Proj::Up, &v)]);
    for (p, rescale) in [
        (0.3f32, DareRescale::Standard),
        (0.9, DareRescale::Standard),
        (0.9, DareRescale::DarexQ(0.25)),
    ] {
        let m = combine(
            &[(&a, 1.0)],
            &CombineMethod::Dare {
                drop_rate: p,
                seed: 2024,
                rescale,
                merge: DareMerge::Linear,
            },
            &c,
        )
        .unwrap();
        let Some(TensorDelta::Sparse(s)) = m.get(1, Proj::Up) else {
            panic!()
        };
        let want = match rescale {
            DareRescale::Standard => 1.5 * (1.0 / (1.0 - p as f64)) as f32,
            DareRescale::DarexQ(q) => 1.5 * (1.0 / q as f64) as f32,
        };
        assert!(s.values.iter().all(|&x| x == want), "survivors not {want}");
        // Survivors sit where the mask says.
        let keep = dare_keep_mask(2024, 0, 1, Proj::Up, n, p);
        let kept: Vec<u32> = (0..n as u32).filter(|&i| keep[i as usize]).collect();
        assert_eq!(s.flat_indices(), kept);
        // Drop count within 5 sigma of n p.
        let dropped = (n - kept.len()) as f64;
        let (mean, sd) = (
            n as f64 * p as f64,
            (n as f64 * p as f64 * (1.0 - p as f64)).sqrt(),
        );
        assert!(
            (dropped - mean).abs() < 5.0 * sd,
            "p {p}: dropped {dropped}, expected {mean} +- {}",
            5.0 * sd
        );
    }
    // Different tasks and projections get different masks.
    let m0 = dare_keep_mask(7, 0, 0, Proj::Q, 4096, 0.5);
    assert_ne!(m0, dare_keep_mask(7, 1, 0, Proj::Q, 4096, 0.5));
    assert_ne!(m0, dare_keep_mask(7, 0, 0, Proj::K, 4096, 0.5));
    assert_ne!(m0, dare_keep_mask(8, 0, 0, Proj::Q, 4096, 0.5));
    assert_eq!(m0, dare_keep_mask(7, 0, 0, Proj::Q, 4096, 0.5));
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let s: f64 = x.iter().map(|v| v.exp()).sum();
    x.iter().map(|v| v.exp() / s).collect()
}

#[test]
fn pcb_hand_example() {
    let c = config(2, 4);
    let v1 = [3.0f32, 1.0, 0.0, 0.0];
    let v2 = [1.0f32, 2.0, -1.0, 0.0];
    let a = adapter(&c, &[(0, Proj::Q, &v1)]);
    let b = adapter(&c, &[(0, Proj::Q, &v2)]);
    // N = 2 tasks, Norm = min-max over the 4 entries.
    // intra_1 = softmax(2 * Norm([9, 1, 0, 0]))  = softmax([2, 2/9, 0, 0])
    // intra_2 = softmax(2 * Norm([1, 4, 1, 0]))  = softmax([1/2, 2, 1/2, 0])
    // Norm(v1 v1) = [1, 1/9, 0, 0]; Norm(v1 v2) = Norm([3, 2, 0, 0]) = [1, 2/3, 0, 0];
    // Norm(v2 v2) = Norm([1, 4, 1, 0]) = [1/4, 1, 1/4, 0]
    // inter_1 = softmax(Norm(v1 v1)) + softmax(Norm(v1 v2))
    // inter_2 = softmax(Norm(v2 v1)) + softmax(Norm(v2 v2))
    let intra1 = softmax(&[2.0, 2.0 / 9.0, 0.0, 0.0]);
    let intra2 = softmax(&[0.5, 2.0, 0.5, 0.0]);
    let s11 = softmax(&[1.0, 1.0 / 9.0, 0.0, 0.0]);
    let s12 = softmax(&[1.0, 2.0 / 3.0, 0.0, 0.0]);
    let s22 = softmax(&[0.25, 1.0, 0.25, 0.0]);
    let b1: Vec<f64> = (0..4).map(|e| intra1[e] * (s11[e] + s12[e])).collect();
    let b2: Vec<f64> = (0..4).map(|e| intra2[e] * (s12[e] + s22[e])).collect();
    // Scores as the library computes them.
    let scores = combine::pcb_scores(&[&v1, &v2]).unwrap();
    for (got, want) in scores.iter().zip([&b1, &b2]) {
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w, "score {g}, expected {w}");
        }
    }
    // Ranking by hand: b1 = [big, mid, low, low (tie)], b2: e1 > e0 > e2 > e3 since
    // intra_2 is [e^.5, e^2, e^.5, 1]/S and inter_2[0] - inter_2[2] = (e - 1)/S12 > 0.
    assert!(b1[0] > b1[1] && b1[1] > b1[2] && b1[2] == b1[3]);
    assert!(b2[1] > b2[0] && b2[0] > b2[2] && b2[2] > b2[3]);

    // drop_ratio 0.5: each task drops its 2 lowest: task 1 e2, e3; task 2 e2, e3.
    //   e0 = (b1 3 + b2 1) / (b1 + b2), e1 = (b1 1 + b2 2) / (b1 + b2), e2 = e3 = 0
    let expected = [
        (b1[0] * 3.0 + b2[0] * 1.0) / (b1[0] + b2[0]),
        (b1[1] * 1.0 + b2[1] * 2.0) / (b1[1] + b2[1]),
        0.0,
        0.0,
    ];
    let m = combine(
        &[(&a, 1.0), (&b, 1.0)],
        &CombineMethod::Pcb { drop_ratio: 0.5 },
        &c,
    )
    .unwrap();
    let expected: Vec<f32> = expected.iter().map(|&v| v as f32).collect();
    assert_close(&dense(&c, &m, 0, Proj::Q), &expected, 1e-6);

    // drop_ratio 0.25 drops one per task: the tie b1[2] = b1[3] drops the higher
    // index (e3); task 2 drops e3. e2 = (b1 0 + b2 (-1)) / (b1 + b2).
    let e2 = -b2[2] / (b1[2] + b2[2]);
    let m = combine(
        &[(&a, 1.0), (&b, 1.0)],
        &CombineMethod::Pcb { drop_ratio: 0.25 },
        &c,
    )
    .unwrap();
    let mut expected = expected.clone();
    expected[2] = e2 as f32;
    assert_close(&dense(&c, &m, 0, Proj::Q), &expected, 1e-6);

    // Equal positive weights scale the result: the scores do not change.
    let m = combine(
        &[(&a, 2.0), (&b, 2.0)],
        &CombineMethod::Pcb { drop_ratio: 0.25 },
        &c,
    )
    .unwrap();
    let doubled: Vec<f32> = expected.iter().map(|v| 2.0 * v).collect();
    assert_close(&dense(&c, &m, 0, Proj::Q), &doubled, 1e-6);

    // One task alone comes back unchanged (its scores cancel).
    let m = combine(&[(&b, 1.0)], &CombineMethod::Pcb { drop_ratio: 0.0 }, &c).unwrap();
    assert_close(&dense(&c, &m, 0, Proj::Q), &v2, 1e-6);
}

#[test]
fn bad_inputs_are_refused() {
    let c = config(2, 4);
    let [a, b, _] = three_tasks(&c);
    let err = |inputs: &[(&Adapter, f32)], m: CombineMethod| {
        combine(inputs, &m, &c).unwrap_err().to_string()
    };
    assert!(err(&[], CombineMethod::Linear).contains("no adapters"));
    assert!(err(&[(&a, 1.0)], CombineMethod::Ties { density: 0.0 }).contains("density"));
    assert!(err(&[(&a, 1.0)], CombineMethod::Ties { density: 1.5 }).contains("density"));
    assert!(err(&[(&a, 1.0)], CombineMethod::Pcb { drop_ratio: 1.0 }).contains("drop ratio"));
    let dare = |p, q| CombineMethod::Dare {
        drop_rate: p,
        seed: 0,
        rescale: DareRescale::DarexQ(q),
        merge: DareMerge::Linear,
    };
    assert!(err(&[(&a, 1.0)], dare(1.0, 0.5)).contains("drop rate"));
    assert!(err(&[(&a, 1.0)], dare(0.5, 0.0)).contains("q"));
    assert!(err(&[(&a, f32::NAN), (&b, 1.0)], CombineMethod::Linear).contains("weight"));

    // An adapter for another depth.
    let other = Adapter::new(AdapterFormat::Memory, PathBuf::new(), 3);
    assert!(err(&[(&a, 1.0), (&other, 1.0)], CombineMethod::Linear).contains("layers"));

    // DoRA is not additive.
    let mut dora = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let l = LoraDelta {
        a: f32_weight(1, 2, &[1.0, 0.0]).unwrap(),
        b: f32_weight(2, 1, &[1.0, 1.0]).unwrap(),
        scale: 1.0,
        dora_factor: Some(vec![1.0, 1.0]),
    };
    dora.insert(&c, 0, Proj::Q, TensorDelta::Lora(l)).unwrap();
    let e = err(&[(&a, 1.0), (&dora, 1.0)], CombineMethod::Linear);
    assert!(
        e.contains("DoRA") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );

    // Dense helpers check lengths.
    assert!(combine::linear(&[&[1.0, 2.0], &[1.0]]).is_err());
    assert!(combine::pcb(&[], 0.1).is_err());
}

#[test]
fn merged_adapter_saves_as_sara() {
    let c = config(2, 4);
    let [a, b, d] = three_tasks(&c);
    let m = combine(
        &[(&a, 1.0), (&b, 1.0), (&d, 1.0)],
        &CombineMethod::Ties { density: 0.5 },
        &c,
    )
    .unwrap();
    let bytes = sara::to_bytes(&m, &sara::SaraMeta::new(c.arch), "merged").unwrap();
    let back = sara::from_bytes(&bytes, "merged", &c).unwrap();
    assert_eq!(dense(&c, &back, 0, Proj::Q), vec![3.0, 2.0, -6.0, 0.0]);
}
