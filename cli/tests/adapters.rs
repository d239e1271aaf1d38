//! End-to-end tests of `--adapter` and `graft merge` against ../shared/conformance.

mod common;

use common::{conformance, graft, tmp_dir};
use std::ffi::OsStr;
use std::path::Path;

fn read_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// max |a - b| / max |b|
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max
}

fn logits(model: &Path, adapters: &[String], tokens: &str, out: &Path) -> Vec<f32> {
    let mut args: Vec<&OsStr> = vec![
        "logits".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--tokens".as_ref(),
        tokens.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    for a in adapters {
        args.push("--adapter".as_ref());
        args.push(a.as_ref());
    }
    let o = graft(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    read_f32(out, "logits")
}

#[test]
fn logits_with_an_adapter_match_llama_cpp_and_merge_matches_unmerged() {
    let root = conformance();
    let case_dir = root.join("cases/llama-gqa-F32+all-r8@0.5");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case_dir.join("case.json")).unwrap())
            .unwrap();
    let model = root.join(case["model"].as_str().unwrap());
    let ad = &case["adapters"][0];
    let scale = ad["scale"].as_f64().unwrap();
    let gguf_arg = format!(
        "{}:{scale}",
        root.join(ad["gguf"].as_str().unwrap()).display()
    );
    let peft_arg = format!(
        "{}:{scale}",
        root.join(ad["peft"].as_str().unwrap()).display()
    );
    let want = read_f32(&case_dir.join("expected.safetensors"), "seq0.logits");
    let tokens_bytes = std::fs::read(case_dir.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&tokens_bytes).unwrap();
    let tokens: Vec<String> = st
        .tensor("seq0.tokens")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()).to_string())
        .collect();
    let tokens = tokens.join(",");

    let dir = tmp_dir("adapters");
    let base = logits(&model, &[], &tokens, &dir.join("base.safetensors"));
    let with_gguf = logits(
        &model,
        std::slice::from_ref(&gguf_arg),
        &tokens,
        &dir.join("g.safetensors"),
    );
    let with_peft = logits(&model, &[peft_arg], &tokens, &dir.join("p.safetensors"));
    // F32 row of the suite's tolerance table is 1e-3 relative; we are far inside.
    assert!(
        rel_err(&with_gguf, &want) < 1e-3,
        "{}",
        rel_err(&with_gguf, &want)
    );
    assert!(
        rel_err(&with_peft, &want) < 1e-3,
        "{}",
        rel_err(&with_peft, &want)
    );
    assert!(rel_err(&base, &want) > 1e-2, "the adapter must matter");

    // graft merge into the F32 base, keep types: the merged model's logits equal the
    // unmerged adapter's (F16 KV cache rounding allows a little more than 1e-5).
    let merged = dir.join("merged.gguf");
    let o = graft(&[
        "merge".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--adapter".as_ref(),
        gguf_arg.as_ref(),
        "-o".as_ref(),
        merged.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let from_merged = logits(&merged, &[], &tokens, &dir.join("m.safetensors"));
    assert!(rel_err(&from_merged, &with_gguf) < 1e-4);

    // Merging to Q8_0 gives a smaller file that still tracks the adapter.
    let merged_q8 = dir.join("merged-q8.gguf");
    let o = graft(&[
        "merge".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--adapter".as_ref(),
        gguf_arg.as_ref(),
        "-o".as_ref(),
        merged_q8.as_os_str(),
        "--type".as_ref(),
        "Q8_0".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::metadata(&merged_q8).unwrap().len() < std::fs::metadata(&merged).unwrap().len()
    );
    let from_q8 = logits(&merged_q8, &[], &tokens, &dir.join("q.safetensors"));
    assert!(rel_err(&from_q8, &with_gguf) < 5e-2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_adapters_fail_with_one_clear_line() {
    let root = conformance();
    let model = root.join("models/llama-gqa-Q8_0.gguf");
    let dir = tmp_dir("bad-adapters");
    let qwen_lora = root.join("models/qwen2-lora-all-r8.gguf");
    let missing = dir.join("missing.gguf");
    let out = dir.join("x.safetensors");
    for (adapter, needle) in [
        (qwen_lora.display().to_string(), "architecture"),
        (missing.display().to_string(), "missing.gguf"),
        (format!("{}:", qwen_lora.display()), "scale"),
    ] {
        let o = graft(&[
            "logits".as_ref(),
            "-m".as_ref(),
            model.as_os_str(),
            "--tokens".as_ref(),
            "1,2,3".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
            "--adapter".as_ref(),
            adapter.as_ref(),
        ]);
        assert!(!o.status.success(), "{adapter} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{adapter}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = graft(&[
        "merge".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "-o".as_ref(),
        dir.join("m.gguf").as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--adapter"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_throughput_prints_one_json_line() {
    let root = conformance();
    let model = root.join("models/llama-gqa-Q8_0.gguf");
    let a = root.join("models/llama-gqa-lora-all-r8.gguf");
    let b = root.join("models/llama-gqa-lora-qv-r4-peft");
    let o = graft(&[
        "bench".as_ref(),
        "throughput".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--num-prompts".as_ref(),
        "6".as_ref(),
        "--input-len".as_ref(),
        "9".as_ref(),
        "--output-len".as_ref(),
        "5".as_ref(),
        "--adapters".as_ref(),
        "3".as_ref(),
        "--adapter".as_ref(),
        a.as_os_str(),
        "--adapter".as_ref(),
        b.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["num_prompts"], 6);
    assert_eq!(v["adapters"], 3);
    for key in [
        "requests_per_s",
        "tokens_per_s",
        "output_tokens_per_s",
        "elapsed_s",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    // 6 requests x 5 tokens over 1 + (steps - 1) steps: every token was generated.
    let out_tok_s = v["output_tokens_per_s"].as_f64().unwrap();
    let secs = v["elapsed_s"].as_f64().unwrap();
    assert!((out_tok_s * secs - 30.0).abs() < 1e-6, "{v}");
}
