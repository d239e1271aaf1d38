//! On-device training end to end through the CLI: a LoRA trained on the bundled
//! default model quantized to Q4_0 reaches the task's accuracy, and the file it writes
//! answers held-out prompts through `graft run`; a model pretrained from nothing
//! (`init-model` + `train --method full`) learns and loads.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::{graft, tmp_dir};

fn default_model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/graft-default.gguf");
    assert!(
        p.is_file(),
        "the bundled default model is missing: {}",
        p.display()
    );
    p
}

fn ok(args: &[&OsStr]) -> String {
    let out = graft(args);
    assert!(
        out.status.success(),
        "graft {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn report(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn lora_on_a_q4_0_base_reaches_the_task_accuracy() {
    let dir = tmp_dir("train-lora");
    let q4 = dir.join("base-q4_0.gguf");
    ok(&[
        "quantize".as_ref(),
        default_model().as_os_str(),
        q4.as_os_str(),
        "--type".as_ref(),
        "Q4_0".as_ref(),
    ]);
    let data = dir.join("add.jsonl");
    ok(&[
        "gen-data".as_ref(),
        "--task".as_ref(),
        "add".as_ref(),
        "-n".as_ref(),
        "2000".as_ref(),
        "--seed".as_ref(),
        "11".as_ref(),
        "-o".as_ref(),
        data.as_os_str(),
    ]);
    let lora = dir.join("add.gguf");
    let r = report(&ok(&[
        "train".as_ref(),
        "-m".as_ref(),
        q4.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        lora.as_os_str(),
        "--steps".as_ref(),
        "1500".as_ref(),
        "--batch".as_ref(),
        "16".as_ref(),
        "--lr".as_ref(),
        "3e-3".as_ref(),
        "--rank".as_ref(),
        "16".as_ref(),
        "--alpha".as_ref(),
        "32".as_ref(),
        "--eval-max".as_ref(),
        "100".as_ref(),
    ]));
    let acc = r["eval_exact_match"].as_f64().unwrap();
    assert!(acc >= 0.95, "held-out exact match {acc} < 0.95: {r}");
    assert_eq!(r["eval_records"], 100);
    // The written adapter runs through the inference engine on the same base.
    let text = ok(&[
        "run".as_ref(),
        "-m".as_ref(),
        q4.as_os_str(),
        "--adapter".as_ref(),
        lora.as_os_str(),
        "-p".as_ref(),
        "add: 4 + 3 =".as_ref(),
        "-n".as_ref(),
        "6".as_ref(),
        "--temp".as_ref(),
        "0".as_ref(),
    ]);
    assert_eq!(text.trim(), "7");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn pretraining_from_nothing_learns_and_loads() {
    let dir = tmp_dir("train-full");
    let init = dir.join("init.gguf");
    ok(&[
        "init-model".as_ref(),
        "-o".as_ref(),
        init.as_os_str(),
        "--n-embd".as_ref(),
        "64".as_ref(),
        "--n-layer".as_ref(),
        "2".as_ref(),
        "--n-ff".as_ref(),
        "128".as_ref(),
        "--vocab".as_ref(),
        "400".as_ref(),
    ]);
    let data = dir.join("base.jsonl");
    ok(&[
        "gen-data".as_ref(),
        "--task".as_ref(),
        "base".as_ref(),
        "-n".as_ref(),
        "400".as_ref(),
        "-o".as_ref(),
        data.as_os_str(),
    ]);
    let out = dir.join("model.gguf");
    let ck = dir.join("ck.safetensors");
    let r = report(&ok(&[
        "train".as_ref(),
        "--method".as_ref(),
        "full".as_ref(),
        "-m".as_ref(),
        init.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--steps".as_ref(),
        "60".as_ref(),
        "--lr".as_ref(),
        "3e-3".as_ref(),
        "--checkpoint".as_ref(),
        ck.as_os_str(),
    ]));
    // A random model's loss is about ln(vocab) = 6.0; the grammar is learnable.
    let loss = r["eval_loss"].as_f64().unwrap();
    assert!(loss < 4.5, "eval loss {loss}: {r}");
    assert!(ck.is_file());
    let text = ok(&[
        "run".as_ref(),
        "-m".as_ref(),
        out.as_os_str(),
        "-p".as_ref(),
        "The red".as_ref(),
        "-n".as_ref(),
        "4".as_ref(),
        "--temp".as_ref(),
        "0".as_ref(),
    ]);
    // 60 steps teach the grammar's statistics, not fluent text: the model loads and
    // runs (it may well stop at once).
    let _ = text;
    // Bad data is a clear error naming the file and line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\"}\n").unwrap();
    let e = graft(&[
        "train".as_ref(),
        "-m".as_ref(),
        init.as_os_str(),
        "--data".as_ref(),
        bad.as_os_str(),
        "--out".as_ref(),
        dir.join("x.gguf").as_os_str(),
    ]);
    assert!(!e.status.success());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        msg.contains("bad.jsonl:1") && msg.contains("completion"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
