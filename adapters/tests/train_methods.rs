//! Trainable parameterisations end to end: step 0 is the base, gradients of the flat
//! parameters match finite differences (f64), SaRA touches only its mask, checkpoints
//! resume exactly, files round-trip.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use graft_adapters::rps::{Budget, Role, RpsConfig, RpsLayout};
use graft_adapters::train::data::{pair_examples, Record};
use graft_adapters::train::method::{targets_for, Lora, Method, Rps, Sara};
use graft_adapters::train::net::{Example, Net, StepOptions};
use graft_adapters::train::tasks::{generate, Task};
use graft_adapters::train::trainer::{TrainConfig, Trainer};
use graft_adapters::{sara, Adapter, TensorDelta};
use graft_runtime::model::{Model, Proj};
use graft_runtime::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};

fn model(name: &str) -> Model {
    Model::load(&common::conformance().join("models").join(name), None).unwrap()
}

fn tokenizer(m: &Model) -> Tokenizer {
    Tokenizer::from_gguf(m.gguf.as_ref().unwrap()).unwrap()
}

fn task_examples(m: &Model, n: usize) -> (Vec<Example>, Vec<Record>) {
    let records = generate(Task::Reverse, n, 1);
    let (ex, dropped) = pair_examples(&tokenizer(m), &records, 64);
    assert_eq!(dropped, 0);
    (ex, records)
}

fn all_logits(m: &Model, tokens: &[u32], adapter: Option<&Adapter>) -> Vec<f32> {
    let d = adapter.map(|a| a as &dyn graft_adapters::LinearDelta);
    common::logits_all_with(m, tokens, d)
}

fn methods(m: &Model) -> Vec<Method> {
    let c = &m.config;
    vec![
        Method::Lora(Lora::new(c, targets_for(c, &Proj::ALL), 4, 8.0, false).unwrap()),
        Method::Lora(Lora::new(c, targets_for(c, &[Proj::Q, Proj::V]), 2, 4.0, true).unwrap()),
        Method::Sara(Sara::new(m, &targets_for(c, &Proj::ALL), 2e-3, 5e-4, true).unwrap()),
        // Heavily shared pools (rho 0.01) and a dense virtual delta.
        Method::Rps(Rps::new(
            RpsLayout::new(c, &Proj::ALL, &RpsConfig::lora(4, 8.0, Budget::Ratio(0.01))).unwrap(),
        )),
        Method::Rps(Rps::new(
            RpsLayout::new(
                c,
                &[Proj::V, Proj::Down],
                &RpsConfig::delta(Budget::Ratio(0.1)),
            )
            .unwrap(),
        )),
    ]
}

#[test]
fn rps_lora_at_rho_one_follows_lora_step_by_step() {
    let m = model("llama-gqa-Q4_0.gguf");
    let c = &m.config;
    let (ex, _) = task_examples(&m, 16);
    let layout = RpsLayout::new(
        c,
        &[Proj::Q, Proj::V],
        &RpsConfig::lora(4, 8.0, Budget::Ratio(1.0)),
    )
    .unwrap();
    let rps = Method::Rps(Rps::new(layout.clone()));
    let lora =
        Method::Lora(Lora::new(c, targets_for(c, &[Proj::Q, Proj::V]), 4, 8.0, false).unwrap());
    let mut a = Trainer::new(&m, rps, config(4)).unwrap();
    let mut b = Trainer::new(&m, lora, config(4)).unwrap();
    // Start LoRA where RPS starts: the expanded pools, in LoRA's order.
    let to_lora_order = |t: &Trainer<'_>| -> Vec<f32> {
        let Method::Rps(r) = &t.method else {
            unreachable!()
        };
        let pools: Vec<&[f32]> = r
            .tensors
            .iter()
            .map(|x| &t.params[x.range.clone()])
            .collect();
        let e = graft_adapters::rps::expand(&r.layout, &pools).unwrap();
        // LoRA's order: per target, A then B.
        let mut out = Vec::new();
        for (layer, p) in targets_for(c, &[Proj::Q, Proj::V]) {
            for role in [Role::A, Role::B] {
                out.extend_from_slice(&e[r.layout.find(layer, p, role).unwrap()]);
            }
        }
        out
    };
    b.params = to_lora_order(&a);
    for step in 0..4 {
        let la = a.train_step(&ex).unwrap().loss;
        let lb = b.train_step(&ex).unwrap().loss;
        assert!(
            (la - lb).abs() <= 1e-5 * lb.abs(),
            "step {step}: loss {la} vs {lb}"
        );
        let got = to_lora_order(&a);
        for (x, y) in got.iter().zip(&b.params) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "step {step}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn every_method_starts_at_the_base_bit_for_bit() {
    for name in ["llama-gqa-Q4_0.gguf", "qwen2-F32.gguf"] {
        let m = model(name);
        let tokens = [1u32, 20, 30, 40, 50, 60];
        let base = all_logits(&m, &tokens, None);
        for method in methods(&m) {
            let params = method.init(&m, 3).unwrap();
            let adapter = method.to_adapter(&m, &params).unwrap();
            assert_eq!(
                all_logits(&m, &tokens, Some(&adapter)),
                base,
                "{name} {}",
                method.name()
            );
        }
    }
}

#[test]
fn parameter_gradients_match_finite_differences() {
    let m = model("llama-gqa-Q8_0.gguf");
    let (ex, _) = task_examples(&m, 3);
    let net = Net::new(&m);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for method in methods(&m) {
        // Move away from the initial point so every parameter has a gradient.
        let mut p: Vec<f64> = method
            .init(&m, 1)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        for v in p.iter_mut() {
            *v += rng.gen_range(-1e-3..1e-3);
        }
        let loss = |p: &[f64]| {
            let tr = method.trainables(&m.config, p).unwrap();
            net.step(&ex, &tr, 1.0, StepOptions::default())
                .unwrap()
                .loss
        };
        let tr = method.trainables(&m.config, &p[..]).unwrap();
        let opts = StepOptions {
            backward: true,
            recompute: false,
        };
        let grads = net.step(&ex, &tr, 1.0, opts).unwrap().grads.unwrap();
        let g = method.param_grad(&grads).unwrap();
        assert_eq!(g.len(), p.len());
        let h = 1e-6;
        for t in method.tensors().iter().step_by(5) {
            for _ in 0..2 {
                let i = rng.gen_range(t.range.clone());
                let mut q = p.clone();
                q[i] += h;
                let fp = loss(&q);
                q[i] -= 2.0 * h;
                let fm = loss(&q);
                let num = (fp - fm) / (2.0 * h);
                let err = (num - g[i]).abs() / (1e-4 + num.abs().max(g[i].abs()));
                assert!(
                    err < 1e-3,
                    "{} {}: analytic {} numeric {num}",
                    method.name(),
                    t.name,
                    g[i]
                );
            }
        }
    }
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch: 4,
        lr: 1e-2,
        warmup: 2,
        ..Default::default()
    }
}

#[test]
fn checkpoints_resume_exactly_and_loss_falls() {
    let m = model("llama-gqa-Q4_0.gguf");
    let (ex, _) = task_examples(&m, 40);
    let c = &m.config;
    let lora = || Method::Lora(Lora::new(c, targets_for(c, &Proj::ALL), 4, 8.0, false).unwrap());
    let mut straight = Trainer::new(&m, lora(), config(8)).unwrap();
    let first = straight.train_step(&ex).unwrap().loss;
    for _ in 1..8 {
        straight.train_step(&ex).unwrap();
    }
    let mut a = Trainer::new(&m, lora(), config(8)).unwrap();
    for _ in 0..5 {
        a.train_step(&ex).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("graft-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("ck.safetensors");
    a.save_checkpoint(&ck).unwrap();
    let mut b = Trainer::new(&m, lora(), config(8)).unwrap();
    b.load_checkpoint(&ck).unwrap();
    for _ in 5..8 {
        b.train_step(&ex).unwrap();
    }
    assert_eq!(b.params, straight.params);
    assert_eq!(b.opt, straight.opt);
    assert!(straight.eval_loss(&ex).unwrap() < first * 0.9);
    // A checkpoint of another method is refused with a clear error.
    let sara = Method::Sara(Sara::new(&m, &targets_for(c, &Proj::ALL), 2e-3, 0.0, false).unwrap());
    let mut other = Trainer::new(&m, sara, config(8)).unwrap();
    let e = other.load_checkpoint(&ck).unwrap_err().to_string();
    assert!(e.contains("method lora, expected sara"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_checkpoints_are_refused_and_change_nothing() {
    let m = model("llama-gqa-Q4_0.gguf");
    let (ex, _) = task_examples(&m, 16);
    let c = &m.config;
    let lora = || Method::Lora(Lora::new(c, targets_for(c, &Proj::ALL), 4, 8.0, false).unwrap());
    let mut a = Trainer::new(&m, lora(), config(4)).unwrap();
    a.train_step(&ex).unwrap();
    let dir = common::temp_dir("bad-ckpt");
    let ck = dir.join("ck.safetensors");
    a.save_checkpoint(&ck).unwrap();
    let good = std::fs::read(&ck).unwrap();
    let fresh = Trainer::new(&m, lora(), config(4)).unwrap();
    let check = |bytes: &[u8], want: &str| {
        let mut t = Trainer::new(&m, lora(), config(4)).unwrap();
        let e = t
            .load_checkpoint_bytes(bytes, "ck.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ck.safetensors") && e.contains(want),
            "{want}: {e}"
        );
        assert_eq!((t.step, &t.params, &t.opt), (0, &fresh.params, &fresh.opt));
    };
    for cut in [0, 7, 8, 100, good.len() / 2, good.len() - 1] {
        check(&good[..cut], "safetensors");
    }
    // A NaN in the parameters, a negative second moment.
    let st = safetensors::SafeTensors::deserialize(&good).unwrap();
    for (name, at, value, want) in [
        ("params", 3usize, f32::NAN, "params[3] is NaN"),
        ("adam_v", 0, -1.0, "adam_v[0] is -1"),
    ] {
        let view = st.tensor(name).unwrap();
        let offset = view.data().as_ptr() as usize - good.as_ptr() as usize + 4 * at;
        let mut bad = good.clone();
        bad[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        check(&bad, want);
    }
    let mut ok = Trainer::new(&m, lora(), config(4)).unwrap();
    ok.load_checkpoint_bytes(&good, "ck.safetensors").unwrap();
    assert_eq!((ok.step, &ok.params), (1, &a.params));
}

#[test]
fn sara_resumes_exactly_across_its_progressive_step() {
    let m = model("llama-gqa-Q4_0.gguf");
    let (ex, _) = task_examples(&m, 40);
    let c = &m.config;
    let sara =
        || Method::Sara(Sara::new(&m, &targets_for(c, &Proj::ALL), 2e-3, 5e-4, true).unwrap());
    let mut straight = Trainer::new(&m, sara(), config(8)).unwrap();
    let n0 = straight.params.len();
    for _ in 0..8 {
        straight.train_step(&ex).unwrap();
    }
    assert!(
        straight.params.len() < n0,
        "the progressive step froze nothing"
    );
    // Checkpoints before and after the progressive step (at 4 of 8) both resume exactly.
    let dir = common::temp_dir("sara-resume");
    for stop in [3, 6] {
        let mut a = Trainer::new(&m, sara(), config(8)).unwrap();
        for _ in 0..stop {
            a.train_step(&ex).unwrap();
        }
        let ck = dir.join(format!("ck{stop}.safetensors"));
        a.save_checkpoint(&ck).unwrap();
        let mut b = Trainer::new(&m, sara(), config(8)).unwrap();
        b.load_checkpoint(&ck).unwrap();
        assert_eq!(b.params.len(), a.params.len());
        for _ in stop..8 {
            b.train_step(&ex).unwrap();
        }
        assert_eq!(b.params, straight.params, "resumed at {stop}");
        assert_eq!(b.opt, straight.opt, "resumed at {stop}");
        assert_eq!(
            b.method.to_adapter(&m, &b.params).unwrap().iter().count(),
            straight
                .method
                .to_adapter(&m, &straight.params)
                .unwrap()
                .iter()
                .count()
        );
        // Loading twice into the same trainer is refused rather than mis-masked.
        if stop == 6 {
            let e = b.load_checkpoint(&ck).unwrap_err().to_string();
            assert!(e.contains("fresh trainer"), "{e}");
        }
    }
}

#[test]
fn sara_trains_only_its_mask_and_round_trips() {
    let m = model("llama-gqa-Q4_0.gguf");
    let c = &m.config;
    let (ex, _) = task_examples(&m, 24);
    let theta = 2e-3;
    let method =
        Method::Sara(Sara::new(&m, &targets_for(c, &Proj::ALL), theta, 5e-4, true).unwrap());
    let mut t = Trainer::new(&m, method, config(6)).unwrap();
    let nnz0 = t.params.len();
    assert_eq!(t.opt.m.len(), nnz0, "Adam state is nnz-sized");
    for _ in 0..6 {
        t.train_step(&ex).unwrap();
    }
    // The progressive step at T/2 may only shrink the trainable set.
    assert!(t.params.len() <= nnz0);
    assert_eq!(t.opt.m.len(), t.params.len());
    let adapter = t.method.to_adapter(&m, &t.params).unwrap();
    let mut moved = 0usize;
    for (layer, proj, d) in adapter.iter() {
        let TensorDelta::Sparse(s) = d else {
            panic!("not sparse")
        };
        // Every delta position was below theta in the base: the rest is untouched.
        let base = m.layers[layer].proj(proj).to_f32().unwrap();
        for (&i, &v) in s.flat_indices().iter().zip(&s.values) {
            assert!(base[i as usize].abs() < theta);
            moved += (v != 0.0) as usize;
        }
    }
    assert!(moved > 0, "training changed nothing");
    // Save / load is exact, and the loaded file runs like the in-memory adapter.
    let dir = std::env::temp_dir().join(format!("graft-sara-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.safetensors");
    let meta = sara::SaraMeta {
        theta: Some(theta),
        ..sara::SaraMeta::new(c.arch)
    };
    sara::save(&adapter, &meta, &path).unwrap();
    let loaded = sara::load(&path, &m).unwrap();
    for (layer, proj, d) in adapter.iter() {
        let (TensorDelta::Sparse(a), Some(TensorDelta::Sparse(b))) = (d, loaded.get(layer, proj))
        else {
            panic!("missing delta")
        };
        assert_eq!((a.flat_indices(), &a.values), (b.flat_indices(), &b.values));
    }
    let tokens = [1u32, 9, 8, 7, 6];
    assert_eq!(
        all_logits(&m, &tokens, Some(&adapter)),
        all_logits(&m, &tokens, Some(&loaded))
    );
    assert_ne!(
        all_logits(&m, &tokens, Some(&loaded)),
        all_logits(&m, &tokens, None)
    );
    // alpha = 0 is the base.
    let stack = graft_adapters::AdapterStack::single(std::sync::Arc::new(loaded), 0.0);
    assert_eq!(
        common::logits_all_with(&m, &tokens, Some(&stack)),
        all_logits(&m, &tokens, None)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fast_f32_paths_match_the_reference_path() {
    let m = model("llama-gqa-Q8_0.gguf");
    let c = &m.config;
    let (ex, _) = task_examples(&m, 3);
    let net = Net::new(&m);
    let methods = [
        Method::Rps(Rps::new(
            RpsLayout::new(c, &Proj::ALL, &RpsConfig::lora(4, 8.0, Budget::Ratio(0.1))).unwrap(),
        )),
        Method::Rps(Rps::new(
            RpsLayout::new(c, &Proj::ALL, &RpsConfig::delta(Budget::Ratio(0.05))).unwrap(),
        )),
        // SaRA's f32 path runs the SIMD sparse kernels and SDDMM.
        Method::Sara(Sara::new(&m, &targets_for(c, &Proj::ALL), 2e-3, 0.0, false).unwrap()),
    ];
    for method in methods {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let p32: Vec<f32> = method
            .init(&m, 2)
            .unwrap()
            .iter()
            .map(|v| v + rng.gen_range(-1e-2..1e-2))
            .collect();
        let p64: Vec<f64> = p32.iter().map(|&v| v as f64).collect();
        let opts = StepOptions {
            backward: true,
            recompute: false,
        };
        let g32 = {
            let tr = method.trainables(c, &p32[..]).unwrap();
            method
                .param_grad(&net.step(&ex, &tr, 1.0, opts).unwrap().grads.unwrap())
                .unwrap()
        };
        let g64 = {
            let tr = method.trainables(c, &p64[..]).unwrap();
            method
                .param_grad(&net.step(&ex, &tr, 1.0, opts).unwrap().grads.unwrap())
                .unwrap()
        };
        let scale = g64.iter().fold(0f64, |a, b| a.max(b.abs()));
        for (i, (a, b)) in g32.iter().zip(&g64).enumerate() {
            assert!(
                ((*a as f64) - b).abs() <= 1e-3 * scale,
                "param {i}: f32 {a} f64 {b}"
            );
        }
    }
}
