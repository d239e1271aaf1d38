//! Every adapter case of the conformance suite, against llama.cpp's logits and greedy
//! continuations at the README's tolerance for the base type: (a) the GGUF LoRA and
//! (b) the PEFT adapter on the GGUF base, (c) for F32 cases the PEFT adapter on the
//! `-hf` checkpoint.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use graft_adapters::{gguf_lora, load_adapter, peft, AdapterStack, TensorDelta};
use graft_runtime::model::{LinearDelta, Model, Proj};

use common::{
    compare_greedy, compare_logits, conformance, greedy_with, load_cases, logits_all,
    logits_all_with, Case,
};

/// How a case's adapters are loaded.
#[derive(Clone, Copy, Debug)]
enum Source {
    Gguf,
    Peft,
}

/// The `-hf` checkpoint of a GGUF model path (`models/llama-gqa-F32.gguf` ->
/// `models/llama-gqa-hf`).
fn hf_dir(gguf: &Path, ty: &str) -> PathBuf {
    let name = gguf.file_name().unwrap().to_str().unwrap();
    let family = name.strip_suffix(&format!("-{ty}.gguf")).unwrap();
    gguf.with_file_name(format!("{family}-hf"))
}

fn stack_for(case: &Case, model: &Model, source: Source) -> AdapterStack {
    let root = conformance();
    let layers = case
        .adapters
        .iter()
        .map(|a| {
            let key = match source {
                Source::Gguf => "gguf",
                Source::Peft => "peft",
            };
            let path = root.join(a[key].as_str().unwrap());
            let adapter = load_adapter(&path, model)
                .unwrap_or_else(|e| panic!("{}: loading {}: {e}", case.name, path.display()));
            (Arc::new(adapter), a["scale"].as_f64().unwrap() as f32)
        })
        .collect();
    AdapterStack::new(layers)
}

/// Logits at every position and greedy continuations of one case; failures as text.
fn check_case(case: &Case, model: &Model, delta: &dyn LinearDelta, label: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let n_vocab = model.config.n_vocab;
    for (i, (tokens, reference)) in case.seqs.iter().enumerate() {
        let ours = logits_all_with(model, tokens, Some(delta));
        match compare_logits(&case.ty, reference, &ours, n_vocab) {
            Ok(summary) => eprintln!("{label} seq{i}: {summary}"),
            Err(e) => failures.push(format!("{label} seq{i}: {e}")),
        }
    }
    for g in &case.greedy {
        let ours = greedy_with(model, &g.prompt_ids, g.continuation.len(), Some(delta));
        if let Err(e) = compare_greedy(&case.ty, g, &ours) {
            failures.push(format!("{label}: {e}"));
        }
    }
    failures
}

fn adapter_cases() -> Vec<Case> {
    let cases: Vec<Case> = load_cases()
        .into_iter()
        .filter(|c| !c.adapters.is_empty())
        .collect();
    assert!(
        cases.len() >= 24,
        "expected the suite's 24 adapter cases, found {}",
        cases.len()
    );
    cases
}

#[test]
fn every_adapter_case_matches_llama_cpp() {
    let mut models: HashMap<PathBuf, Model> = HashMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in adapter_cases() {
        let model = models
            .entry(case.model.clone())
            .or_insert_with(|| Model::load_gguf(&case.model).unwrap());
        for source in [Source::Gguf, Source::Peft] {
            let stack = stack_for(&case, model, source);
            let label = format!("{} [{source:?} adapter, GGUF base]", case.name);
            failures.extend(check_case(&case, model, &stack, &label));
            checked += 1;
        }
        if case.ty == "F32" {
            let dir = hf_dir(&case.model, &case.ty);
            let hf = models
                .entry(dir.clone())
                .or_insert_with(|| Model::load_hf(&dir, None).unwrap());
            let stack = stack_for(&case, hf, Source::Peft);
            let label = format!("{} [Peft adapter, HF base]", case.name);
            failures.extend(check_case(&case, hf, &stack, &label));
            checked += 1;
        }
    }
    // 24 cases x 2 sources + 8 F32 cases on the HF base.
    assert!(checked >= 56, "only {checked} checks ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn scale_zero_is_bit_identical_to_the_base() {
    let case = adapter_cases()
        .into_iter()
        .find(|c| c.name.contains("all-r8") && c.ty == "Q4_0")
        .expect("an all-r8 Q4_0 case");
    let model = Model::load_gguf(&case.model).unwrap();
    let tokens = &case.seqs[0].0;
    let base = logits_all(&model, tokens);
    for source in [Source::Gguf, Source::Peft] {
        let mut stack = stack_for(&case, &model, source);
        for (_, s) in &mut stack.layers {
            *s = 0.0;
        }
        let zero = logits_all_with(&model, tokens, Some(&stack));
        assert_eq!(base.len(), zero.len());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&base) == bits(&zero),
            "{source:?}: scale 0 changed logits"
        );
        // And the adapter does change them at its case scale.
        let on = logits_all_with(&model, tokens, Some(&stack_for(&case, &model, source)));
        assert!(
            base.iter().zip(&on).any(|(a, b)| (a - b).abs() > 1e-3),
            "{source:?}: adapter had no effect"
        );
    }
}

/// The two files of each suite adapter hold the same delta once the PEFT one's q/k
/// rows are permuted for llama (and are not, for qwen2); GGUF tensors and
/// unpermuted PEFT tensors are views of the file maps.
#[test]
fn peft_and_gguf_files_give_the_same_deltas() {
    let root = conformance();
    let mut n = 0;
    for family in ["llama-gqa", "qwen2"] {
        let model = Model::load_gguf(&root.join(format!("models/{family}-F32.gguf"))).unwrap();
        for name in ["all-r8", "qv-r4"] {
            let g = gguf_lora::load(
                &root.join(format!("models/{family}-lora-{name}.gguf")),
                &model,
            )
            .unwrap();
            let p = peft::load(
                &root.join(format!("models/{family}-lora-{name}-peft")),
                &model,
            )
            .unwrap();
            assert_eq!(g.len(), p.len(), "{family} {name}");
            assert_eq!(g.len(), if name == "all-r8" { 14 } else { 4 });
            for (layer, proj, gd) in g.iter() {
                let pd = p.get(layer, proj).expect("same projections");
                let (gv, pv) = (gd.dense().unwrap(), pd.dense().unwrap());
                let max = gv.iter().fold(0f32, |a, &b| a.max(b.abs()));
                let err = gv
                    .iter()
                    .zip(&pv)
                    .fold(0f32, |a, (&x, &y)| a.max((x - y).abs()));
                assert!(
                    max > 0.0 && err <= 1e-5 * max,
                    "{family} {name} layer {layer} {proj}: max diff {err} (max {max})"
                );
                let (TensorDelta::Lora(gl), TensorDelta::Lora(pl)) = (gd, pd) else {
                    panic!("LoRA deltas expected");
                };
                assert!(gl.a.is_mapped() && gl.b.is_mapped());
                let permuted = family == "llama-gqa" && matches!(proj, Proj::Q | Proj::K);
                assert!(pl.a.is_mapped());
                assert_eq!(pl.b.is_mapped(), !permuted, "{family} {proj}");
                n += 1;
            }
        }
    }
    assert_eq!(n, 2 * (14 + 4));
}
