//! HF checkpoints quantize exactly like their GGUF counterparts. (Every GGUF recipe of
//! the suite is checked byte for byte through the CLI in cli/tests/cli.rs.)

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
