//! `graft export-onnx` / `export-adapter --format onnx` against Python's onnxruntime:
//! the exported model (and adapter) run by the pip package give the logits of
//! `graft logits --provider ort-cpu`, which stay within the conformance tolerance of
//! llama.cpp's. Needs ORT_DYLIB_PATH and .ort-venv (scripts/ort-env.sh); fails, never
//! skips, without them.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{conformance, graft, tmp_dir};

fn venv_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ort-venv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run scripts/ort-env.sh (installs onnxruntime into .ort-venv)",
        p.display()
    );
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH is not set: export ORT_DYLIB_PATH=\"$(bash scripts/ort-env.sh)\""
    );
    p
}

fn ok(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `graft logits --provider ort-cpu` and Python's onnxruntime on the exported model,
/// with `adapter` (a GGUF LoRA) exported and activated on both sides when given.
fn compare(model: &str, adapter: Option<&str>, tag: &str) {
    let python = venv_python();
    let root = conformance();
    let model = root.join("models").join(model);
    let dir = tmp_dir(&format!("ort-{tag}"));
    let onnx_dir = dir.join("onnx");
    let tokens = "1,15043,3186,29892,920,526,366,2599";
    let tokens: String = tokens
        .split(',')
        .map(|t| (t.parse::<u32>().unwrap() % 512).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut export: Vec<&OsStr> = vec![
        OsStr::new("export-onnx"),
        OsStr::new("-m"),
        model.as_os_str(),
        OsStr::new("--out"),
        onnx_dir.as_os_str(),
    ];
    if adapter.is_some() {
        export.extend([OsStr::new("--lora-rank"), OsStr::new("8")]);
    }
    ok(graft(&export), "graft export-onnx");
    assert!(onnx_dir.join("model.onnx").is_file());
    assert!(onnx_dir.join("model.onnx.data").is_file());

    let graft_out = dir.join("graft.safetensors");
    let mut logits: Vec<&OsStr> = vec![
        OsStr::new("logits"),
        OsStr::new("-m"),
        model.as_os_str(),
        OsStr::new("--tokens"),
        OsStr::new(&tokens),
    ];
    let adapter_path = adapter.map(|a| root.join("models").join(a));
    let onnx_adapter = dir.join("adapter.onnx_adapter");
    if let Some(a) = &adapter_path {
        logits.extend([OsStr::new("--adapter"), a.as_os_str()]);
        ok(
            graft(&[
                OsStr::new("export-adapter"),
                OsStr::new("-m"),
                model.as_os_str(),
                OsStr::new("--adapter"),
                a.as_os_str(),
                OsStr::new("--format"),
                OsStr::new("onnx"),
                OsStr::new("--lora-rank"),
                OsStr::new("8"),
                OsStr::new("-o"),
                onnx_adapter.as_os_str(),
            ]),
            "graft export-adapter",
        );
    }
    let mut on_ort = logits.clone();
    on_ort.extend([
        OsStr::new("--provider"),
        OsStr::new("ort-cpu"),
        OsStr::new("-o"),
        graft_out.as_os_str(),
    ]);
    ok(graft(&on_ort), "graft logits --provider ort-cpu");
    let ours = read_logits(&graft_out);

    let py_out = dir.join("python.f32");
    let mut py = Command::new(&python);
    py.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_logits.py"))
        .arg(&onnx_dir)
        .arg(&tokens)
        .arg(&py_out);
    if adapter.is_some() {
        py.arg(&onnx_adapter);
    }
    ok(py.output().expect("run python"), "python onnxruntime");
    let theirs: Vec<f32> = std::fs::read(&py_out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(ours.len(), theirs.len());
    let max = ours.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = ours
        .iter()
        .zip(&theirs)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("{tag}: max |graft - python| = {err:.3e} (max |logit| {max:.3})");
    assert!(
        err <= 1e-4 * max,
        "{tag}: graft and onnxruntime differ by {err} (max |logit| {max})"
    );

    // The ort-cpu logits are also llama.cpp's within the README tolerance (a sanity
    // check that the comparison is not between two wrong answers).
    let native_out = dir.join("native.safetensors");
    let mut native = logits.clone();
    native.extend([OsStr::new("-o"), native_out.as_os_str()]);
    ok(graft(&native), "graft logits (native)");
    let reference = read_logits(&native_out);
    let max_ref = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = reference
        .iter()
        .zip(&ours)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        diff <= 5e-2 * max_ref,
        "{tag}: ort-cpu and native differ by {diff} (max |logit| {max_ref})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exported_f32_model_matches_python_onnxruntime() {
    compare("llama-gqa-F32.gguf", None, "f32");
}

#[test]
fn exported_q4_0_qwen2_model_matches_python_onnxruntime() {
    compare("qwen2-Q4_0.gguf", None, "q4_0");
}

#[test]
fn exported_adapter_matches_python_onnxruntime() {
    compare(
        "llama-gqa-Q8_0.gguf",
        Some("llama-gqa-lora-all-r8.gguf"),
        "lora",
    );
}

#[test]
fn unknown_and_missing_providers_are_clear_errors() {
    let model = conformance().join("models/llama-gqa-F32.gguf");
    let out = graft(&[
        OsStr::new("logits"),
        OsStr::new("-m"),
        model.as_os_str(),
        OsStr::new("--tokens"),
        OsStr::new("1,2"),
        OsStr::new("--provider"),
        OsStr::new("ort-nnapi"),
        OsStr::new("-o"),
        tmp_dir("ort-err").join("x").as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("provider ort-nnapi"), "{err}");
    assert!(err.contains("available: native, ort-cpu"), "{err}");
}
