//! Batch invariance: a sequence's logits computed inside a batch of several sequences
//! of different lengths and positions equal those computed alone.

mod common;

use common::*;
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::model::{BatchToken, Model};

fn tokens(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (seed * 7919 + i * 104729) % vocab)
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let max = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= 1e-5 * max,
        "{what}: max err {err} vs max |logit| {max}"
    );
}

#[test]
fn sequences_in_a_batch_equal_sequences_alone() {
    let models = conformance().join("models");
    for file in [
        "llama-gqa-F32.gguf",
        "llama-gqa-Q4_K_M.gguf",
        "qwen2-Q8_0.gguf",
        "llama-tied-Q4_K_M.gguf",
    ] {
        let model = Model::load(&models.join(file), None).unwrap();
        let c = &model.config;
        let vocab = c.n_vocab as u32;
        let prompts: Vec<Vec<u32>> = [3usize, 11, 6, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| tokens(i as u32 + 1, n, vocab))
            .collect();
        let next: Vec<u32> = (0..4).map(|i| (i * 37 + 5) % vocab).collect();

        // Alone: prefill then one decode step per sequence.
        let mut alone_prefill = Vec::new();
        let mut alone_decode = Vec::new();
        for (p, &nx) in prompts.iter().zip(&next) {
            alone_prefill.push(logits_all(&model, p));
            let mut with_next = p.clone();
            with_next.push(nx);
            let all = logits_all(&model, &with_next);
            alone_decode.push(all[p.len() * c.n_vocab..].to_vec());
        }

        // Together: one prefill batch interleaving the four sequences, then one decode
        // batch in a different order.
        let mut cache = KvCache::new(c.n_layer, c.kv_dim(), 16, 4, KvType::F16);
        let mut batch = Vec::new();
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        for pos in 0..longest {
            for (s, p) in prompts.iter().enumerate() {
                if let Some(&token) = p.get(pos) {
                    batch.push(BatchToken {
                        token,
                        pos,
                        seq: s as u32 + 10,
                        logits: true,
                    });
                }
            }
        }
        let out = model.forward(&batch, &mut cache).unwrap();
        for (s, p) in prompts.iter().enumerate() {
            let rows: Vec<f32> = batch
                .iter()
                .enumerate()
                .filter(|(_, t)| t.seq == s as u32 + 10)
                .flat_map(|(b, _)| out.for_batch_index(b).unwrap().to_vec())
                .collect();
            assert_close(
                &rows,
                &alone_prefill[s],
                &format!("{file} prefill seq {s} (len {})", p.len()),
            );
        }
        let decode: Vec<BatchToken> = (0..4)
            .rev()
            .map(|s| BatchToken {
                token: next[s],
                pos: prompts[s].len(),
                seq: s as u32 + 10,
                logits: true,
            })
            .collect();
        let out = model.forward(&decode, &mut cache).unwrap();
        for (b, t) in decode.iter().enumerate() {
            let s = (t.seq - 10) as usize;
            assert_close(
                out.for_batch_index(b).unwrap(),
                &alone_decode[s],
                &format!("{file} decode seq {s}"),
            );
        }
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let model = Model::load(&conformance().join("models/llama-gqa-Q4_0.gguf"), None).unwrap();
    let c = &model.config;
    let mut cache = KvCache::new(c.n_layer, c.kv_dim(), 2, 4, KvType::F16);
    let tok = |token, pos| BatchToken {
        token,
        pos,
        seq: 0,
        logits: true,
    };
    // out-of-vocabulary token
    assert!(model
        .forward(&[tok(c.n_vocab as u32, 0)], &mut cache)
        .is_err());
    // a gap in positions
    assert!(model.forward(&[tok(1, 3)], &mut cache).is_err());
    // more tokens than the cache holds
    let long: Vec<BatchToken> = (0..9).map(|p| tok(1, p)).collect();
    assert!(model.forward(&long, &mut cache).is_err());
    // the cache still works after the errors
    assert_eq!(
        model.forward(&[tok(1, 0)], &mut cache).unwrap().rows,
        vec![0]
    );
}

/// A decode step run alone (the single-token path: kernels and attention on the
/// thread team) gives bit for bit the logits the same step gives inside a batch
/// (the multi-token kernels and rayon), so a server's output does not depend on
/// which requests share a step.
#[test]
fn a_decode_step_alone_equals_it_in_a_batch_bit_for_bit() {
    let models = conformance().join("models");
    for file in [
        "llama-gqa-F32.gguf",
        "llama-gqa-Q8_0.gguf",
        "llama-gqa-Q4_0.gguf",
        "llama-gqa-Q4_K_M.gguf",
        "qwen2-Q8_0.gguf",
    ] {
        let model = Model::load(&models.join(file), None).unwrap();
        let c = &model.config;
        let vocab = c.n_vocab as u32;
        let (a, b) = (tokens(3, 9, vocab), tokens(4, 5, vocab));
        let prefill = |cache: &mut KvCache, seq: u32, p: &[u32]| {
            let batch: Vec<BatchToken> = p
                .iter()
                .enumerate()
                .map(|(pos, &token)| BatchToken {
                    token,
                    pos,
                    seq,
                    logits: false,
                })
                .collect();
            model.forward(&batch, cache).unwrap();
        };
        let step = |seq: u32, p: &[u32]| BatchToken {
            token: 7 % vocab,
            pos: p.len(),
            seq,
            logits: true,
        };
        let mut alone = KvCache::new(c.n_layer, c.kv_dim(), 16, 2, KvType::F16);
        prefill(&mut alone, 0, &a);
        let one = model.forward(&[step(0, &a)], &mut alone).unwrap();

        let mut shared = KvCache::new(c.n_layer, c.kv_dim(), 16, 2, KvType::F16);
        prefill(&mut shared, 0, &a);
        prefill(&mut shared, 1, &b);
        let two = model
            .forward(&[step(1, &b), step(0, &a)], &mut shared)
            .unwrap();
        assert_eq!(
            one.for_batch_index(0).unwrap(),
            two.for_batch_index(1).unwrap(),
            "{file}"
        );
    }
}
