//! The training network against the inference forward pass (same loss) and against
//! finite differences (f64) for every kind of trainable: low-rank, dense and sparse
//! deltas over a quantized base, and every tensor of a model in full training.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::borrow::Cow;

use graft_adapters::train::net::{
    slot, DeltaGrad, DeltaOp, Example, FullLayout, Net, StepOptions, Trainables,
};
use graft_runtime::kv_cache::KvType;
use graft_runtime::model::{sequence_batch, Model, Proj};
use rand::{Rng, SeedableRng};

fn model(name: &str) -> Model {
    Model::load(&common::conformance().join("models").join(name), None).unwrap()
}

fn examples(vocab: u32) -> Vec<Example> {
    vec![
        Example {
            tokens: vec![1, 17 % vocab, 230 % vocab, 5, 99 % vocab, 12],
            n_prompt: 2,
        },
        Example {
            tokens: vec![1, 44 % vocab, 7, 301 % vocab],
            n_prompt: 1,
        },
    ]
}

/// Mean next-token cross-entropy from the inference forward pass (F32 KV cache).
fn inference_loss(m: &Model, exs: &[Example]) -> f64 {
    let mut total = 0.0;
    let mut count = 0usize;
    for ex in exs {
        let mut cache = m.new_cache(ex.tokens.len(), KvType::F32);
        let logits = m
            .forward(&sequence_batch(&ex.tokens, 0, 0, true), &mut cache)
            .unwrap();
        for i in ex.n_prompt.max(1) - 1..ex.tokens.len() - 1 {
            let row = logits.row(i);
            let max = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let lse = row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            total += lse - row[ex.tokens[i + 1] as usize] as f64;
            count += 1;
        }
    }
    total / count as f64
}

#[test]
fn training_forward_matches_inference() {
    for name in [
        "llama-gqa-F32.gguf",
        "llama-tied-F32.gguf",
        "qwen2-F32.gguf",
    ] {
        let m = model(name);
        let exs = examples(m.config.n_vocab as u32);
        let n_targets: usize = exs.iter().map(Example::n_targets).sum();
        let want = inference_loss(&m, &exs);
        let net = Net::new(&m);
        let tr = Trainables::<f32>::none(&m.config);
        let out = net
            .step(&exs, &tr, 1.0 / n_targets as f64, StepOptions::default())
            .unwrap();
        assert_eq!(out.n_targets, n_targets);
        let rel = (out.loss - want).abs() / want;
        assert!(
            rel < 1e-5,
            "{name}: training loss {} vs inference {want}",
            out.loss
        );
        // The f64 path agrees too.
        let tr64 = Trainables::<f64>::none(&m.config);
        let out64 = net
            .step(&exs, &tr64, 1.0 / n_targets as f64, StepOptions::default())
            .unwrap();
        assert!((out64.loss - want).abs() / want < 1e-5, "{name} f64");
    }
}

fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize, s: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-s..s)).collect()
}

/// (slot, A, B, rank, scale) of a low-rank delta.
type LowRank = (usize, Vec<f64>, Vec<f64>, usize, f64);

/// Owned parameters of the deltas under test, so they can be perturbed.
#[derive(Clone)]
struct DeltaParams {
    /// (slot, a, b, rank, scale) low-rank deltas.
    low: Vec<LowRank>,
    dense: Vec<(usize, Vec<f64>)>,
    sparse: Vec<(usize, Vec<u32>, Vec<f64>)>,
}

impl DeltaParams {
    fn trainables(&self, m: &Model) -> Trainables<'_, f64> {
        let mut tr = Trainables::none(&m.config);
        for (s, a, b, r, sc) in &self.low {
            tr.deltas[*s] = Some(DeltaOp::LowRank {
                a: Cow::Borrowed(a),
                b: Cow::Borrowed(b),
                rank: *r,
                scale: *sc,
            });
        }
        for (s, w) in &self.dense {
            tr.deltas[*s] = Some(DeltaOp::Dense {
                w: Cow::Borrowed(w),
            });
        }
        for (s, idx, val) in &self.sparse {
            tr.deltas[*s] = Some(DeltaOp::Sparse {
                idx: Cow::Borrowed(idx),
                val: Cow::Borrowed(val),
            });
        }
        tr
    }

    /// Every parameter as a mutable reference, labelled.
    fn coords(&mut self) -> Vec<(String, &mut f64)> {
        let mut v = Vec::new();
        for (s, a, b, _, _) in &mut self.low {
            v.extend(a.iter_mut().map(|x| (format!("slot {s} A"), x)));
            v.extend(b.iter_mut().map(|x| (format!("slot {s} B"), x)));
        }
        for (s, w) in &mut self.dense {
            v.extend(w.iter_mut().map(|x| (format!("slot {s} dense"), x)));
        }
        for (s, _, val) in &mut self.sparse {
            v.extend(val.iter_mut().map(|x| (format!("slot {s} sparse"), x)));
        }
        v
    }
}

fn loss_of(net: &Net<'_>, exs: &[Example], tr: &Trainables<'_, f64>) -> f64 {
    net.step(exs, tr, 1.0, StepOptions::default()).unwrap().loss
}

fn assert_close(analytic: f64, numeric: f64, what: &str) {
    let err = (analytic - numeric).abs() / (1e-4 + numeric.abs().max(analytic.abs()));
    assert!(
        err < 2e-4,
        "{what}: analytic {analytic:e} numeric {numeric:e}"
    );
}

#[test]
fn delta_gradients_match_finite_differences_on_a_quantized_base() {
    let m = model("llama-gqa-Q4_0.gguf");
    let c = m.config.clone();
    let net = Net::new(&m);
    let exs = examples(c.n_vocab as u32);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let last = c.n_layer - 1;
    let mut p = DeltaParams {
        low: Vec::new(),
        dense: Vec::new(),
        sparse: Vec::new(),
    };
    let rank = 3;
    for proj in Proj::ALL {
        let (out, inp) = graft_adapters::delta::projection_shape(&c, proj);
        p.low.push((
            slot(0, proj),
            rand_vec(&mut rng, rank * inp, 0.3),
            rand_vec(&mut rng, out * rank, 0.3),
            rank,
            0.7,
        ));
    }
    let (out, inp) = graft_adapters::delta::projection_shape(&c, Proj::Up);
    p.dense
        .push((slot(last, Proj::Up), rand_vec(&mut rng, out * inp, 0.02)));
    let (out, inp) = graft_adapters::delta::projection_shape(&c, Proj::V);
    let mut idx: Vec<u32> = (0..40)
        .map(|_| rng.gen_range(0..(out * inp) as u32))
        .collect();
    idx.sort_unstable();
    idx.dedup();
    let val = rand_vec(&mut rng, idx.len(), 0.2);
    p.sparse.push((slot(last, Proj::V), idx, val));

    let tr = p.trainables(&m);
    let opts = StepOptions {
        backward: true,
        recompute: false,
    };
    let out = net.step(&exs, &tr, 1.0, opts).unwrap();
    let grads = out.grads.unwrap();
    // Recomputation gives the same gradients, bit for bit.
    let again = net
        .step(
            &exs,
            &tr,
            1.0,
            StepOptions {
                backward: true,
                recompute: true,
            },
        )
        .unwrap()
        .grads
        .unwrap();
    assert_eq!(grads.deltas, again.deltas);

    // Flatten the analytic gradient in the same order as DeltaParams::coords.
    let mut analytic = Vec::new();
    for (s, ..) in &p.low {
        match &grads.deltas[*s] {
            Some(DeltaGrad::LowRank { da, db }) => {
                analytic.extend(da);
                analytic.extend(db);
            }
            other => panic!("slot {s}: {other:?}"),
        }
    }
    for (s, _) in &p.dense {
        match &grads.deltas[*s] {
            Some(DeltaGrad::Dense { dw }) => analytic.extend(dw),
            other => panic!("slot {s}: {other:?}"),
        }
    }
    for (s, ..) in &p.sparse {
        match &grads.deltas[*s] {
            Some(DeltaGrad::Sparse { dval }) => analytic.extend(dval),
            other => panic!("slot {s}: {other:?}"),
        }
    }
    let total = p.clone().coords().len();
    assert_eq!(analytic.len(), total);
    let h = 1e-5;
    let labels: Vec<String> = p.clone().coords().into_iter().map(|(l, _)| l).collect();
    // Six coordinates of every tensor (every parameter would take minutes).
    let mut by_label = std::collections::BTreeMap::<String, Vec<usize>>::new();
    for (i, l) in labels.iter().enumerate() {
        by_label.entry(l.clone()).or_default().push(i);
    }
    let mut checked = std::collections::HashMap::<String, usize>::new();
    for (label, idx) in &by_label {
        for _ in 0..6 {
            let i = idx[rng.gen_range(0..idx.len())];
            let mut q = p.clone();
            *q.coords()[i].1 += h;
            let fp = loss_of(&net, &exs, &q.trainables(&m));
            let mut q = p.clone();
            *q.coords()[i].1 -= h;
            let fm = loss_of(&net, &exs, &q.trainables(&m));
            assert_close(
                analytic[i],
                (fp - fm) / (2.0 * h),
                &format!("{label} [{i}]"),
            );
            *checked.entry(label.clone()).or_default() += 1;
        }
    }
    assert!(checked.len() >= 15, "checked {checked:?}");
}

#[test]
fn full_training_gradients_match_finite_differences() {
    // qwen2: q/k/v biases, NEOX rope, separate output.
    for name in ["qwen2-F32.gguf", "llama-tied-F32.gguf"] {
        let m = model(name);
        let c = m.config.clone();
        let tied = m.gguf.as_ref().unwrap().tensor("output.weight").is_none();
        let has_bias = m.layers[0].bq.is_some();
        let layout = FullLayout::new(&c, tied, has_bias);
        let base: Vec<f64> = layout
            .values_of(&m)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let net = Net::new(&m);
        let exs = examples(c.n_vocab as u32);
        let tr = Trainables {
            deltas: vec![None; c.n_layer * 7],
            full: Some((&layout, &base[..])),
        };
        // The full path reproduces the frozen-base loss.
        let frozen = loss_of(&net, &exs, &Trainables::none(&c));
        assert!((loss_of(&net, &exs, &tr) - frozen).abs() < 1e-9 * frozen.abs());
        let opts = StepOptions {
            backward: true,
            recompute: false,
        };
        let g = net
            .step(&exs, &tr, 1.0, opts)
            .unwrap()
            .grads
            .unwrap()
            .full
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let h = 1e-5;
        for t in &layout.tensors {
            // Coordinates with a non-zero gradient where one exists (embedding rows of
            // unused tokens have none), plus random ones.
            let mut picks: Vec<usize> = (0..4).map(|_| rng.gen_range(t.range.clone())).collect();
            if let Some(i) = t.range.clone().find(|&i| g[i] != 0.0) {
                picks.push(i);
            }
            for i in picks {
                let mut v = base.clone();
                v[i] += h;
                let fp = loss_of(
                    &net,
                    &exs,
                    &Trainables {
                        deltas: vec![None; c.n_layer * 7],
                        full: Some((&layout, &v[..])),
                    },
                );
                v[i] -= 2.0 * h;
                let fm = loss_of(
                    &net,
                    &exs,
                    &Trainables {
                        deltas: vec![None; c.n_layer * 7],
                        full: Some((&layout, &v[..])),
                    },
                );
                assert_close(
                    g[i],
                    (fp - fm) / (2.0 * h),
                    &format!("{name} {} [{i}]", t.name),
                );
            }
        }
        assert!(layout.tensors.iter().any(|t| t.name.ends_with(".bias")) == has_bias);
    }
}
