//! Shared helpers for tests that read ../shared/conformance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use graft_runtime::kv_cache::KvType;
use graft_runtime::model::{sequence_batch, BatchDeltas, BatchToken, LinearDelta, Model, Scratch};

/// A fresh, empty directory under the system temp dir, unique to this test process.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn conformance() -> PathBuf {
    // ../shared beside the repository (the workspace root holds Cargo.lock), so crates
    // nested deeper (runtime/ort) can share this file.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .ancestors()
        .find(|a| a.join("Cargo.lock").is_file())
        .unwrap_or(manifest);
    let dir = root.join("../shared/conformance");
    assert!(
        dir.join("index.json").is_file(),
        "conformance suite missing: expected {} (clone graft next to shared/)",
        dir.display()
    );
    dir
}

#[derive(Debug)]
pub struct GreedyCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub continuation: Vec<u32>,
    pub margins: Vec<f32>,
}

#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub model: PathBuf,
    pub ty: String,
    pub adapters: Vec<serde_json::Value>,
    pub greedy: Vec<GreedyCase>,
    /// (tokens, logits [n, vocab]) per sequence.
    pub seqs: Vec<(Vec<u32>, Vec<f32>)>,
}

pub fn load_cases() -> Vec<Case> {
    let root = conformance();
    let mut names: Vec<String> = std::fs::read_dir(root.join("cases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().map(|n| load_case(&root, &n)).collect()
}

fn load_case(root: &Path, name: &str) -> Case {
    let dir = root.join("cases").join(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let greedy = json["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| GreedyCase {
            prompt: g["prompt"].as_str().unwrap().to_owned(),
            prompt_ids: ids(&g["prompt_ids"]),
            continuation: ids(&g["continuation"]),
            margins: g["margins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut seqs = Vec::new();
    for i in 0.. {
        let Ok(tokens) = st.tensor(&format!("seq{i}.tokens")) else {
            break;
        };
        let logits = st.tensor(&format!("seq{i}.logits")).unwrap();
        let toks = tokens
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
            .collect();
        let lg = logits
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        seqs.push((toks, lg));
    }
    Case {
        name: name.to_owned(),
        model: root.join(json["model"].as_str().unwrap()),
        ty: json["type"].as_str().unwrap().to_owned(),
        adapters: json["adapters"].as_array().cloned().unwrap_or_default(),
        greedy,
        seqs,
        dir,
    }
}

/// README tolerance table: (max abs err / max abs ref, mean KL, top-1 margin threshold).
pub fn tolerance(ty: &str) -> (f32, f64, f32) {
    match ty {
        "F32" | "F16" => (2e-3, 1e-5, 0.05),
        "BF16" => (1e-2, 1e-4, 0.2),
        _ => (5e-2, 5e-3, 1.0),
    }
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Compares logits of one sequence; returns a description of the failure, if any.
pub fn compare_logits(
    ty: &str,
    reference: &[f32],
    ours: &[f32],
    n_vocab: usize,
) -> Result<String, String> {
    let (rel_tol, kl_tol, margin_thr) = tolerance(ty);
    if reference.len() != ours.len() {
        return Err(format!(
            "{} logits, expected {}",
            ours.len(),
            reference.len()
        ));
    }
    let max_ref = reference.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let max_err = reference
        .iter()
        .zip(ours)
        .fold(0f32, |a, (&r, &o)| a.max((r - o).abs()));
    let rel = max_err / max_ref;
    let mut kl_sum = 0.0;
    let mut n = 0;
    let mut top1_bad = Vec::new();
    for (pos, (r, o)) in reference
        .chunks_exact(n_vocab)
        .zip(ours.chunks_exact(n_vocab))
        .enumerate()
    {
        let (lr, lo) = (log_softmax(r), log_softmax(o));
        kl_sum += lr
            .iter()
            .zip(&lo)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        n += 1;
        let best = argmax(r);
        let mut sorted = r.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        if margin >= margin_thr && argmax(o) != best {
            top1_bad.push(pos);
        }
    }
    let kl = kl_sum / n as f64;
    let summary =
        format!("rel err {rel:.2e} (tol {rel_tol:.0e}), mean KL {kl:.2e} (tol {kl_tol:.0e})");
    if rel > rel_tol || kl > kl_tol || !top1_bad.is_empty() {
        return Err(format!("{summary}, top-1 differs at {top1_bad:?}"));
    }
    Ok(summary)
}

/// Logits at every position of `tokens` for one fresh sequence.
pub fn logits_all(model: &Model, tokens: &[u32]) -> Vec<f32> {
    logits_all_with(model, tokens, None)
}

/// [`logits_all`] with every token going through `delta` (an adapter or stack).
pub fn logits_all_with(model: &Model, tokens: &[u32], delta: Option<&dyn LinearDelta>) -> Vec<f32> {
    let mut cache = model.new_cache(tokens.len() + 1, KvType::F16);
    let batch = sequence_batch(tokens, 0, 0, true);
    forward_one(model, &batch, &mut cache, delta).data
}

fn forward_one(
    model: &Model,
    batch: &[BatchToken],
    cache: &mut graft_runtime::kv_cache::KvCache,
    delta: Option<&dyn LinearDelta>,
) -> graft_runtime::model::Logits {
    let deltas = delta.map(|d| BatchDeltas::uniform(d, batch.len()));
    model
        .forward_adapted(batch, cache, &mut Scratch::default(), deltas.as_ref())
        .unwrap()
}

/// Greedy continuation of `n` tokens.
pub fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    greedy_with(model, prompt, n, None)
}

/// [`greedy`] with every token going through `delta`.
pub fn greedy_with(
    model: &Model,
    prompt: &[u32],
    n: usize,
    delta: Option<&dyn LinearDelta>,
) -> Vec<u32> {
    let mut cache = model.new_cache(prompt.len() + n + 1, KvType::F16);
    let mut logits = forward_one(
        model,
        &sequence_batch(prompt, 0, 0, false),
        &mut cache,
        delta,
    );
    let mut out = Vec::new();
    for pos in prompt.len()..prompt.len() + n {
        let next = argmax(logits.row(0)) as u32;
        out.push(next);
        let token = [BatchToken {
            token: next,
            pos,
            seq: 0,
            logits: true,
        }];
        logits = forward_one(model, &token, &mut cache, delta);
    }
    out
}

/// Checks a greedy continuation against llama.cpp's up to its first low-margin step.
pub fn compare_greedy(ty: &str, g: &GreedyCase, ours: &[u32]) -> Result<(), String> {
    let (_, _, thr) = tolerance(ty);
    for (step, (&want, &got)) in g.continuation.iter().zip(ours).enumerate() {
        if g.margins.get(step).is_some_and(|&m| m < thr) {
            return Ok(());
        }
        if want != got {
            return Err(format!(
                "greedy step {step}: {got}, llama.cpp {want} (prompt {:?})",
                g.prompt
            ));
        }
    }
    Ok(())
}
