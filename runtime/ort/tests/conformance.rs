//! The conformance suite (../shared/conformance) on ONNX Runtime's CPU provider: every
//! non-adapter case of types F32, F16, Q8_0 and Q4_0 within the README's tolerances
//! (logits at every position, and greedy continuations through the KV cache), and every
//! adapter case of those types with adapters switched between runs of one session; the
//! other base types (BF16, Q4_1, K-quants, Q5_x) too.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{compare_greedy, compare_logits, load_cases, Case};
use graft_adapters::load_adapter;
use graft_ort::{LoraSpec, OrtAdapter, OrtSession, Provider, SessionOptions};
use graft_runtime::model::Model;

const TYPES: [&str; 4] = ["F32", "F16", "Q8_0", "Q4_0"];

/// ort-cpu, or the provider GRAFT_ORT_PROVIDER names (scripts/gpu-check.sh: ort-cuda).
fn provider() -> Provider {
    match std::env::var("GRAFT_ORT_PROVIDER") {
        Ok(name) => Provider::parse(&name).unwrap_or_else(|e| panic!("GRAFT_ORT_PROVIDER: {e}")),
        Err(_) => Provider::OrtCpu,
    }
}

fn session(model: &Model, lora: Option<LoraSpec>) -> OrtSession {
    let mut opts = SessionOptions::new(model, provider());
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
            Ok(summary) => eprintln!("{} [{}] seq{i}: {summary}", case.name, s.provider()),
            Err(e) => failures.push(format!("{} [{}] seq{i}: {e}", case.name, s.provider())),
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
            failures.push(format!("{} [{}]: {e}", case.name, s.provider()));
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

/// The other types: Q4_1 and Q4_K through MatMulNBits with float zero points, BF16
/// behind a Cast, the rest dequantized to F32.
#[test]
fn other_type_cases_match_llama_cpp_on_ort_cpu() {
    let cases: Vec<Case> = load_cases()
        .into_iter()
        .filter(|c| c.adapters.is_empty() && !TYPES.contains(&c.ty.as_str()))
        .collect();
    assert!(cases.len() >= 12, "only {} other base cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let model = Model::load(&case.model, None).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let mut s = session(&model, None);
        check(case, &mut s, None, &mut failures);
    }
    report(failures);
}

/// Every adapter case of the four types, one session per base model: the adapters of
/// all its cases are built once as ONNX Runtime adapters and switched between runs
/// (each sequence of each case, then the base model with none active), never
/// rebuilding the session. One adapter per base also goes through an `.onnx_adapter`
/// file.
#[test]
fn adapter_cases_switch_within_one_session() {
    let all = load_cases();
    let root = common::conformance();
    let cases: Vec<&Case> = all
        .iter()
        .filter(|c| !c.adapters.is_empty() && TYPES.contains(&c.ty.as_str()))
        .collect();
    assert!(cases.len() >= 24, "only {} adapter cases", cases.len());
    let mut bases: Vec<&std::path::Path> = cases.iter().map(|c| c.model.as_path()).collect();
    bases.dedup();
    let tmp = std::env::temp_dir().join(format!("graft-ort-adapters-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut failures = Vec::new();
    for base in bases {
        let group: Vec<&Case> = cases.iter().copied().filter(|c| c.model == base).collect();
        let model = Model::load(base, None).unwrap();
        let mut s = session(&model, Some(LoraSpec::all(8)));
        let adapters: Vec<OrtAdapter> = group
            .iter()
            .enumerate()
            .map(|(k, case)| {
                let loaded: Vec<_> = case
                    .adapters
                    .iter()
                    .map(|a| {
                        let path = root.join(a["gguf"].as_str().unwrap());
                        let adapter = load_adapter(&path, &model)
                            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        (adapter, a["scale"].as_f64().unwrap() as f32)
                    })
                    .collect();
                let refs: Vec<_> = loaded.iter().map(|(a, s)| (a, *s)).collect();
                if k == 0 {
                    let file = tmp.join(format!("{}.onnx_adapter", case.name));
                    graft_ort::write_onnx_adapter(&file, &refs, s.info()).unwrap();
                    OrtAdapter::from_file(&file).unwrap()
                } else {
                    OrtAdapter::from_graft(&refs, s.info()).unwrap()
                }
            })
            .collect();
        let n_vocab = s.info().n_vocab;
        // Sequence-major, so consecutive runs use different adapters.
        let n_seqs = group.iter().map(|c| c.seqs.len()).max().unwrap_or(0);
        for i in 0..n_seqs {
            for (case, adapter) in group.iter().zip(&adapters) {
                let Some((tokens, reference)) = case.seqs.get(i) else {
                    continue;
                };
                let mut state = s.new_state();
                let ours = s.run(&mut state, tokens, true, Some(adapter)).unwrap();
                match compare_logits(&case.ty, reference, &ours, n_vocab) {
                    Ok(summary) => eprintln!("{} [{}] seq{i}: {summary}", case.name, s.provider()),
                    Err(e) => {
                        failures.push(format!("{} [{}] seq{i}: {e}", case.name, s.provider()))
                    }
                }
            }
        }
        for (case, adapter) in group.iter().zip(&adapters) {
            for g in &case.greedy {
                let mut state = s.new_state();
                let mut logits = s
                    .run(&mut state, &g.prompt_ids, false, Some(adapter))
                    .unwrap();
                let mut out = Vec::new();
                for _ in 0..g.continuation.len() {
                    let next = argmax(&logits);
                    out.push(next);
                    logits = s.run(&mut state, &[next], false, Some(adapter)).unwrap();
                }
                if let Err(e) = compare_greedy(&case.ty, g, &out) {
                    failures.push(format!("{} [{}]: {e}", case.name, s.provider()));
                }
            }
        }
        // The same session with no adapter active is the base model again.
        let base_case = all
            .iter()
            .find(|c| c.adapters.is_empty() && c.model == base)
            .expect("base case of an adapter case");
        check(base_case, &mut s, None, &mut failures);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    report(failures);
}
