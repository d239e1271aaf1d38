//! Every base-model case of ../shared/conformance: logits at every position and greedy
//! continuations within the README's tolerances, loading the GGUF file (and, for F32,
//! also the HF checkpoint).

mod common;

use common::*;
use graft_runtime::model::Model;

fn check_model(case: &Case, model: &Model, label: &str, failures: &mut Vec<String>) {
    let n_vocab = model.config.n_vocab;
    for (i, (tokens, reference)) in case.seqs.iter().enumerate() {
        let ours = logits_all(model, tokens);
        match compare_logits(&case.ty, reference, &ours, n_vocab) {
            Ok(summary) => eprintln!("{} [{label}] seq{i}: {summary}", case.name),
            Err(e) => failures.push(format!("{} [{label}] seq{i}: {e}", case.name)),
        }
    }
    for g in &case.greedy {
        let ours = greedy(model, &g.prompt_ids, g.continuation.len());
        if let Err(e) = compare_greedy(&case.ty, g, &ours) {
            failures.push(format!("{} [{label}]: {e}", case.name));
        }
    }
}

#[test]
fn base_model_cases_match_llama_cpp() {
    let cases: Vec<Case> = load_cases()
        .into_iter()
        .filter(|c| c.adapters.is_empty())
        .collect();
    assert!(cases.len() >= 20, "only {} base cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let model = Model::load(&case.model, None).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        check_model(case, &model, "gguf", &mut failures);
        if case.ty == "F32" {
            let family = case.name.trim_end_matches("-F32");
            let hf = conformance().join(format!("models/{family}-hf"));
            let model = Model::load(&hf, None).unwrap_or_else(|e| panic!("{}: {e}", hf.display()));
            check_model(case, &model, "hf", &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
