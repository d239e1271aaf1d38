//! `train::job::run`, the one entry to training used by the CLI, the C ABI and
//! Python: results are written only on completion, cancellation stops after the
//! asked step and leaves a checkpoint that resumes to the same result, and bad
//! options fail before any step.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use graft_adapters::train::job::{
    self, Control, JobSpec, MethodKind, OutputFormat, Progress, TrainData,
};
use graft_adapters::train::tasks::{generate, Task};
use graft_adapters::train::TrainError;
use graft_runtime::model::Model;
use graft_runtime::tokenizer::Tokenizer;

fn base() -> (Model, Tokenizer) {
    let m = Model::load(
        &common::conformance().join("models/llama-gqa-Q8_0.gguf"),
        None,
    )
    .unwrap();
    let t = Tokenizer::from_gguf(m.gguf.as_ref().unwrap()).unwrap();
    (m, t)
}

fn spec(dir: &std::path::Path, method: MethodKind, out: &str) -> JobSpec {
    JobSpec {
        method,
        data: TrainData::Records(generate(Task::Reverse, 40, 3)),
        out: dir.join(out),
        steps: 6,
        batch: 4,
        rank: 4,
        eval_max: 4,
        ..JobSpec::default()
    }
}

#[test]
fn every_method_writes_its_default_format_and_reports() {
    let (m, tok) = base();
    let dir = common::temp_dir("job-methods");
    for (method, out) in [
        (MethodKind::Lora, "a.gguf"),
        (MethodKind::Sara, "a.sara.safetensors"),
        (MethodKind::Rps, "a.rps"),
    ] {
        let s = spec(dir.as_path(), method, out);
        let mut steps_seen = Vec::new();
        let mut started = 0;
        let report = job::run(&m, &tok, &s, &mut |p| {
            match p {
                Progress::Started { steps, .. } => {
                    assert_eq!(*steps, 6);
                    started += 1;
                }
                Progress::Step { stats, .. } => steps_seen.push(stats.step),
                _ => {}
            }
            Control::Continue
        })
        .unwrap();
        assert_eq!(started, 1);
        assert_eq!(steps_seen, (1..=6).collect::<Vec<_>>());
        assert_eq!(report.steps, 6);
        assert!(report.train_loss.is_finite() && report.eval_loss.is_finite());
        assert_eq!(report.eval_records, 4);
        assert!(report.eval_exact_match.is_some());
        let written = std::fs::metadata(&s.out).unwrap().len();
        assert!(written > 0);
        assert_eq!(report.out_bytes, written);
        // What was written loads as an adapter of this model.
        graft_adapters::load_adapter(&s.out, &m).unwrap();
    }
}

#[test]
fn cancel_stops_after_the_step_writes_no_result_and_resumes_exactly() {
    let (m, tok) = base();
    let dir = common::temp_dir("job-cancel");
    let ck = dir.as_path().join("ck.safetensors");
    let mut s = spec(dir.as_path(), MethodKind::Lora, "cancelled.gguf");
    s.checkpoint = Some(ck.clone());
    let err = job::run(&m, &tok, &s, &mut |p| match p {
        Progress::Step { stats, .. } if stats.step == 2 => Control::Cancel,
        _ => Control::Continue,
    })
    .unwrap_err();
    assert!(matches!(err, TrainError::Cancelled { step: 2 }), "{err}");
    assert!(!s.out.exists(), "a cancelled run must not write its result");
    assert!(ck.exists());

    // Resuming from the checkpoint gives the same file as running straight through.
    s.resume = Some(ck);
    s.checkpoint = None;
    s.out = dir.as_path().join("resumed.gguf");
    let mut first_step = None;
    job::run(&m, &tok, &s, &mut |p| {
        if let Progress::Step { stats, .. } = p {
            first_step.get_or_insert(stats.step);
        }
        Control::Continue
    })
    .unwrap();
    assert_eq!(first_step, Some(3));
    let straight = spec(dir.as_path(), MethodKind::Lora, "straight.gguf");
    job::run(&m, &tok, &straight, &mut |_| Control::Continue).unwrap();
    assert_eq!(
        std::fs::read(&s.out).unwrap(),
        std::fs::read(&straight.out).unwrap()
    );
}

#[test]
fn bad_options_fail_before_training() {
    let (m, tok) = base();
    let dir = common::temp_dir("job-badopts");
    let mut calls = 0;
    let mut count = |_: &Progress| {
        calls += 1;
        Control::Continue
    };
    let mut s = spec(dir.as_path(), MethodKind::Sara, "x.gguf");
    s.format = Some(OutputFormat::Peft);
    let e = job::run(&m, &tok, &s, &mut count).unwrap_err();
    assert!(
        e.to_string().contains("cannot be written as format Peft"),
        "{e}"
    );

    let mut s = spec(dir.as_path(), MethodKind::Lora, "x.gguf");
    s.targets = "q,nonsense".into();
    assert!(job::run(&m, &tok, &s, &mut count).is_err());

    let mut s = spec(dir.as_path(), MethodKind::Lora, "x.gguf");
    s.data = TrainData::File(dir.as_path().join("missing.jsonl"));
    let e = job::run(&m, &tok, &s, &mut count).unwrap_err();
    assert!(e.to_string().contains("missing.jsonl"), "{e}");

    let mut s = spec(dir.as_path(), MethodKind::Lora, "x.gguf");
    s.data = TrainData::Records(Vec::new());
    let e = job::run(&m, &tok, &s, &mut count).unwrap_err();
    assert!(e.to_string().contains("no training examples"), "{e}");

    // retention data is read up front: a missing file or plain text fails at once
    let mut s = spec(dir.as_path(), MethodKind::Lora, "x.gguf");
    s.retention_data = Some(dir.as_path().join("gone.jsonl"));
    let e = job::run(&m, &tok, &s, &mut count).unwrap_err();
    assert!(e.to_string().contains("gone.jsonl"), "{e}");
    let text = dir.as_path().join("plain.txt");
    std::fs::write(&text, "just some text\n").unwrap();
    s.retention_data = Some(text);
    let e = job::run(&m, &tok, &s, &mut count).unwrap_err();
    assert!(e.to_string().contains("must be .jsonl records"), "{e}");
    assert_eq!(calls, 0);
    assert!(!dir.as_path().join("x.gguf").exists());
}
