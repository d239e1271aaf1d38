//! Quantizing the suite's F32 sources must reproduce llama.cpp's quantized files:
//! same tensor types (per-tensor recipe choices) and identical bytes, for every
//! quantized model in ../shared/conformance/models.

use std::path::{Path, PathBuf};

use graft_runtime::gguf::GgufFile;
use graft_runtime::quantize::{quantize_model, FileType, QuantizeOptions};

fn conformance_models() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/models");
    assert!(
        dir.is_dir(),
        "conformance suite missing: expected {} (clone graft next to shared/)",
        dir.display()
    );
    dir
}

/// (family, file) for every quantized base model of the suite.
fn quantized_models(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read conformance models") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".gguf") else {
            continue;
        };
        if stem.contains("-lora-") || stem.starts_with("llama-2-tiny") || stem.ends_with("-F32") {
            continue;
        }
        let family = ["llama-gqa", "llama-tied", "qwen2"]
            .into_iter()
            .find(|f| stem.starts_with(&format!("{f}-")))
            .unwrap_or_else(|| panic!("unknown model family: {name}"));
        out.push((family.to_owned(), path));
    }
    out.sort();
    out
}

#[test]
fn quantizing_f32_sources_reproduces_llama_cpp_bytes() {
    let dir = conformance_models();
    let models = quantized_models(&dir);
    assert!(
        models.len() >= 15,
        "expected the suite's quantized models, found {}",
        models.len()
    );
    let tmp = std::env::temp_dir().join(format!("graft-qconf-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut checked = 0usize;
    let mut failures = Vec::new();
    for (family, path) in &models {
        let reference = GgufFile::open(path).unwrap();
        let ftype_id = reference.get_u32("general.file_type").unwrap();
        let ftype = FileType::from_id(ftype_id)
            .unwrap_or_else(|| panic!("{}: unknown file type {ftype_id}", path.display()));
        let source = dir.join(format!("{family}-F32.gguf"));
        let out = tmp.join(path.file_name().unwrap());
        quantize_model(
            &source,
            &out,
            QuantizeOptions { ftype, pure: false },
            |_| {},
        )
        .unwrap();
        let ours = GgufFile::open(&out).unwrap();
        assert_eq!(ours.get_u32("general.file_type").unwrap(), ftype_id);
        assert_eq!(
            ours.tensors().len(),
            reference.tensors().len(),
            "{}",
            path.display()
        );
        for want in reference.tensors() {
            let Some(got) = ours.tensor(&want.name) else {
                failures.push(format!("{}: {} missing", path.display(), want.name));
                continue;
            };
            if got.ty != want.ty || got.dims != want.dims {
                failures.push(format!(
                    "{}: {}: type {} dims {:?}, llama.cpp has {} {:?}",
                    path.display(),
                    want.name,
                    got.ty,
                    got.dims,
                    want.ty,
                    want.dims
                ));
            } else if ours.tensor_data(got) != reference.tensor_data(want) {
                let (a, b) = (ours.tensor_data(got), reference.tensor_data(want));
                let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
                failures.push(format!(
                    "{}: {} ({}): {diff} of {} bytes differ",
                    path.display(),
                    want.name,
                    want.ty,
                    b.len()
                ));
            }
            checked += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 300, "only {checked} tensors compared");
    eprintln!(
        "{checked} tensors in {} models identical to llama.cpp",
        models.len()
    );
}

#[test]
fn hf_checkpoint_quantizes_like_the_gguf_source() {
    // The -hf checkpoints hold the same weights as the F32 GGUFs (q/k rows in HF order):
    // converting them must give the GGUF's tensors, and quantizing must then match too.
    let dir = conformance_models();
    let tmp = std::env::temp_dir().join(format!("graft-qhf-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for family in ["llama-gqa", "llama-tied", "qwen2"] {
        for (ftype, reference) in [
            (FileType::F32, format!("{family}-F32.gguf")),
            (FileType::Q8_0, format!("{family}-Q8_0.gguf")),
        ] {
            let reference = GgufFile::open(dir.join(&reference)).unwrap();
            let out = tmp.join(format!("{family}-{ftype}.gguf"));
            quantize_model(
                &dir.join(format!("{family}-hf")),
                &out,
                QuantizeOptions { ftype, pure: false },
                |_| {},
            )
            .unwrap();
            let ours = GgufFile::open(&out).unwrap();
            assert_eq!(
                ours.tensors().len(),
                reference.tensors().len(),
                "{family} {ftype}"
            );
            for want in reference.tensors() {
                let got = ours
                    .tensor(&want.name)
                    .unwrap_or_else(|| panic!("{family} {ftype}: {} missing", want.name));
                assert_eq!(
                    (got.ty, &got.dims),
                    (want.ty, &want.dims),
                    "{family} {ftype}: {}",
                    want.name
                );
                assert!(
                    ours.tensor_data(got) == reference.tensor_data(want),
                    "{family} {ftype}: {} bytes differ",
                    want.name
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
