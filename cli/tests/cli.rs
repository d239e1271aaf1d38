//! End-to-end tests of the `graft` binary against ../shared/conformance.

mod common;

use common::{conformance, graft, tmp_dir};
use std::path::{Path, PathBuf};

use graft_runtime::gguf::GgufFile;
use graft_runtime::quantize::FileType;

/// Every entry of the models folder: GGUF files, HF checkpoints and PEFT adapters.
fn suite_entries() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(conformance().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn quantize_reproduces_every_quantized_model_of_the_suite() {
    let models = conformance().join("models");
    let out_dir = tmp_dir("quantize");
    let mut checked_files = 0;
    let mut checked_tensors = 0;
    let mut failures = Vec::new();
    for path in suite_entries() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".gguf") else {
            continue;
        };
        if stem.contains("-lora-") || stem.starts_with("llama-2-tiny") || stem.ends_with("-F32") {
            continue;
        }
        let (family, recipe) = stem.rsplit_once('-').unwrap();
        let reference = GgufFile::open(&path).unwrap();
        // The recipe named in the file name is the one llama.cpp recorded.
        let ftype = FileType::from_name(recipe).unwrap_or_else(|| panic!("recipe of {name}"));
        assert_eq!(
            reference.get_u32("general.file_type").unwrap(),
            ftype.id(),
            "{name}"
        );
        let out = out_dir.join(&name);
        let source = models.join(format!("{family}-F32.gguf"));
        let o = graft(&[
            "quantize".as_ref(),
            source.as_os_str(),
            out.as_os_str(),
            "--type".as_ref(),
            recipe.as_ref(),
        ]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ours = GgufFile::open(&out).unwrap();
        assert_eq!(ours.tensors().len(), reference.tensors().len(), "{name}");
        for want in reference.tensors() {
            let Some(got) = ours.tensor(&want.name) else {
                failures.push(format!("{name}: {} missing", want.name));
                continue;
            };
            if (got.ty, &got.dims) != (want.ty, &want.dims) {
                failures.push(format!(
                    "{name}: {}: {} {:?}, llama.cpp has {} {:?}",
                    want.name, got.ty, got.dims, want.ty, want.dims
                ));
            } else if ours.tensor_data(got) != reference.tensor_data(want) {
                let (a, b) = (ours.tensor_data(got), reference.tensor_data(want));
                let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
                failures.push(format!(
                    "{name}: {} ({}): {diff} of {} bytes differ",
                    want.name,
                    want.ty,
                    b.len()
                ));
            }
            checked_tensors += 1;
        }
        checked_files += 1;
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        checked_files >= 19,
        "only {checked_files} quantized models found"
    );
    eprintln!("{checked_tensors} tensors of {checked_files} models identical to llama.cpp's");
}

#[test]
fn inspect_succeeds_on_every_file_of_the_suite() {
    let mut n = 0;
    for path in suite_entries() {
        for json in [false, true] {
            let mut args = vec!["inspect".as_ref(), path.as_os_str()];
            if json {
                args.push("--json".as_ref());
            }
            let o = graft(&args);
            assert!(
                o.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            let stdout = String::from_utf8_lossy(&o.stdout);
            if json {
                let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
                assert!(
                    v["totals"]["tensors"].as_u64().unwrap() > 0,
                    "{}",
                    path.display()
                );
            } else {
                assert!(stdout.contains("total:"), "{}", path.display());
            }
        }
        n += 1;
    }
    assert!(n >= 30, "only {n} suite entries");
}

#[test]
fn inspect_rejects_corrupted_files_with_one_line() {
    let src = std::fs::read(conformance().join("models/llama-gqa-Q4_0.gguf")).unwrap();
    let dir = tmp_dir("corrupt");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("magic only", b"GGUF".to_vec()),
        ("bad magic", [b"GGUX".as_slice(), &src[4..]].concat()),
        ("header cut", src[..20].to_vec()),
        ("kv cut", src[..200].to_vec()),
        ("data cut", src[..src.len() - 100].to_vec()),
    ];
    let mut bad_version = src.clone();
    bad_version[4] = 9;
    cases.push(("bad version", bad_version));
    let mut huge_count = src.clone();
    huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("huge tensor count", huge_count));
    cases.push((
        "garbage",
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
    ));
    let st = std::fs::read(conformance().join("models/llama-gqa-hf/model.safetensors")).unwrap();
    cases.push(("safetensors cut", st[..st.len() / 2].to_vec()));
    for (what, bytes) in cases {
        let ext = if what.starts_with("safetensors") {
            "safetensors"
        } else {
            "gguf"
        };
        let path = dir.join(format!("{}.{ext}", what.replace(' ', "_")));
        std::fs::write(&path, bytes).unwrap();
        let o = graft(&["inspect".as_ref(), path.as_os_str()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: accepted");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{what}: not one line: {stderr}"
        );
        assert!(stderr.starts_with("error: "), "{what}: {stderr}");
    }
    let o = graft(&[
        "inspect".as_ref(),
        dir.join("does-not-exist.gguf").as_os_str(),
    ]);
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quantize_rejects_unknown_recipes() {
    let source = conformance().join("models/llama-gqa-F32.gguf");
    let out = tmp_dir("badtype").join("x.gguf");
    let o = graft(&[
        "quantize".as_ref(),
        source.as_os_str(),
        out.as_os_str(),
        "--type".as_ref(),
        "Q9_9".as_ref(),
    ]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("Q4_K_M"),
        "should list the recipes: {stderr}"
    );
    assert!(!out.exists());
}

fn read_safetensors(path: &Path) -> (Vec<i32>, Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("tokens").unwrap();
    let l = st.tensor("logits").unwrap();
    let tokens = t
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let logits = l
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (tokens, l.shape().to_vec(), logits)
}

#[test]
fn tokenize_and_logits_follow_their_contracts() {
    let root = conformance();
    let case: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("cases/llama-gqa-Q8_0/case.json")).unwrap(),
    )
    .unwrap();
    let model = root.join(case["model"].as_str().unwrap());
    let g = &case["greedy"][0];
    let prompt = g["prompt"].as_str().unwrap();
    let want: Vec<i64> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();

    let o = graft(&[
        "tokenize".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--text".as_ref(),
        prompt.as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids, want);
    let o = graft(&[
        "tokenize".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--text".as_ref(),
        prompt.as_ref(),
        "--no-bos".as_ref(),
    ]);
    let ids: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids, want[1..]);

    let dir = tmp_dir("logits");
    // --prompt adds BOS; --tokens uses the ids exactly as given.
    let a = dir.join("a.safetensors");
    let o = graft(&[
        "logits".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--prompt".as_ref(),
        prompt.as_ref(),
        "--out".as_ref(),
        a.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list = want
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let b = dir.join("b.safetensors");
    let o = graft(&[
        "logits".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "--tokens".as_ref(),
        list.as_ref(),
        "--out".as_ref(),
        b.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ta, sa, la) = read_safetensors(&a);
    let (tb, sb, lb) = read_safetensors(&b);
    assert_eq!(ta.iter().map(|&t| t as i64).collect::<Vec<_>>(), want);
    assert_eq!((ta, sa.clone()), (tb, sb));
    assert_eq!(sa, vec![want.len(), 512]);
    assert_eq!(la, lb);
    let _ = std::fs::remove_dir_all(&dir);
}
