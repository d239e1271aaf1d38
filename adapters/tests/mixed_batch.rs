//! Mixed-adapter batches: one forward step over sequences that each name a different
//! adapter, a stack, or none equals running each sequence alone.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use common::*;
use graft_adapters::delta::{f32_weight, projection_shape};
use graft_adapters::{Adapter, AdapterFormat, AdapterStack, LinearDelta, LoraDelta, TensorDelta};
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::model::{BatchDeltas, BatchToken, Model, Proj, Scratch};
use rand::{Rng, SeedableRng};

/// A random rank-`rank` LoRA on every projection, large enough to move the logits.
fn random_lora(model: &Model, rank: usize, seed: u64) -> Adapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = &model.config;
    let mut adapter = Adapter::new(AdapterFormat::Memory, "random".into(), c.n_layer);
    for layer in 0..c.n_layer {
        for proj in Proj::ALL {
            let (out, inp) = projection_shape(c, proj);
            let a: Vec<f32> = (0..rank * inp).map(|_| rng.gen_range(-0.2..0.2)).collect();
            let b: Vec<f32> = (0..out * rank).map(|_| rng.gen_range(-0.2..0.2)).collect();
            let delta = TensorDelta::Lora(LoraDelta {
                a: f32_weight(rank, inp, &a).unwrap(),
                b: f32_weight(out, rank, &b).unwrap(),
                scale: 2.0,
                dora_factor: None,
            });
            adapter.insert(c, layer, proj, delta).unwrap();
        }
    }
    adapter
}

fn tokens(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (seed * 7919 + i * 104729) % vocab)
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    err / max
}

#[test]
fn six_sequences_on_different_adapters_equal_their_single_runs() {
    let models = conformance().join("models");
    for file in [
        "llama-gqa-F32.gguf",
        "llama-gqa-Q4_0.gguf",
        "qwen2-Q8_0.gguf",
    ] {
        let model = Model::load(&models.join(file), None).unwrap();
        let c = &model.config;
        let a = Arc::new(random_lora(&model, 8, 1));
        let b = Arc::new(random_lora(&model, 4, 2));
        let stacks: Vec<Option<AdapterStack>> = vec![
            None,
            Some(AdapterStack::single(a.clone(), 1.0)),
            Some(AdapterStack::single(b.clone(), 1.0)),
            Some(AdapterStack::single(a.clone(), 0.5)),
            Some(AdapterStack::new(vec![(a.clone(), 1.0), (b.clone(), 1.0)])),
            Some(AdapterStack::single(b.clone(), 1.0)),
        ];
        let delta_of = |s: usize| stacks[s].as_ref().map(|d| d as &dyn LinearDelta);
        let vocab = c.n_vocab as u32;
        let prompts: Vec<Vec<u32>> = [5usize, 9, 3, 7, 1, 6]
            .iter()
            .enumerate()
            .map(|(i, &n)| tokens(i as u32 + 1, n, vocab))
            .collect();
        let next: Vec<u32> = (0..6).map(|i| (i * 37 + 5) % vocab).collect();

        // Alone: prefill logits at every position, then the logits after one more token.
        let mut alone_prefill = Vec::new();
        let mut alone_decode = Vec::new();
        for (s, (p, &nx)) in prompts.iter().zip(&next).enumerate() {
            alone_prefill.push(logits_all_with(&model, p, delta_of(s)));
            let mut with_next = p.clone();
            with_next.push(nx);
            let all = logits_all_with(&model, &with_next, delta_of(s));
            alone_decode.push(all[p.len() * c.n_vocab..].to_vec());
        }
        // The adapters really change the output (else the test proves nothing).
        let base1 = logits_all(&model, &prompts[1]);
        assert!(rel_err(&alone_prefill[1], &base1) > 1e-2);
        let half1 = logits_all_with(&model, &prompts[1], delta_of(3));
        assert!(rel_err(&half1, &alone_prefill[1]) > 1e-3);

        // Together: one interleaved prefill step, then one decode step in reverse order.
        let mut cache = KvCache::new(c.n_layer, c.kv_dim(), 16, 6, KvType::F16);
        let mut scratch = Scratch::default();
        let mut batch = Vec::new();
        for pos in 0..prompts.iter().map(Vec::len).max().unwrap() {
            for (s, p) in prompts.iter().enumerate() {
                if let Some(&token) = p.get(pos) {
                    batch.push(BatchToken {
                        token,
                        pos,
                        seq: s as u32,
                        logits: true,
                    });
                }
            }
        }
        let per_token: Vec<_> = batch.iter().map(|t| delta_of(t.seq as usize)).collect();
        let deltas = BatchDeltas::per_token(&per_token);
        let out = model
            .forward_adapted(&batch, &mut cache, &mut scratch, Some(&deltas))
            .unwrap();
        for (s, want) in alone_prefill.iter().enumerate() {
            let got: Vec<f32> = batch
                .iter()
                .enumerate()
                .filter(|(_, t)| t.seq == s as u32)
                .flat_map(|(i, _)| out.for_batch_index(i).unwrap().to_vec())
                .collect();
            let e = rel_err(&got, want);
            assert!(e <= 1e-5, "{file}: prefill of sequence {s}: rel err {e}");
        }

        let decode: Vec<BatchToken> = (0..6)
            .rev()
            .map(|s| BatchToken {
                token: next[s],
                pos: prompts[s].len(),
                seq: s as u32,
                logits: true,
            })
            .collect();
        let per_token: Vec<_> = decode.iter().map(|t| delta_of(t.seq as usize)).collect();
        let out = model
            .forward_adapted(
                &decode,
                &mut cache,
                &mut scratch,
                Some(&BatchDeltas::per_token(&per_token)),
            )
            .unwrap();
        for (i, t) in decode.iter().enumerate() {
            let s = t.seq as usize;
            let e = rel_err(out.row(i), &alone_decode[s]);
            assert!(e <= 1e-5, "{file}: decode of sequence {s}: rel err {e}");
        }
    }
}

#[test]
fn scale_zero_is_the_base_bit_for_bit() {
    let model = Model::load(&conformance().join("models/llama-gqa-Q8_0.gguf"), None).unwrap();
    let a = Arc::new(random_lora(&model, 8, 3));
    let prompt = tokens(4, 12, model.config.n_vocab as u32);
    let base = logits_all(&model, &prompt);
    let zero = AdapterStack::single(a.clone(), 0.0);
    assert_eq!(logits_all_with(&model, &prompt, Some(&zero)), base);
    let on = AdapterStack::single(a, 1.0);
    assert_ne!(logits_all_with(&model, &prompt, Some(&on)), base);
}
