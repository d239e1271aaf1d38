//! HF checkpoints quantize exactly like their GGUF counterparts. (Every GGUF recipe of
//! the suite is checked byte for byte through the CLI in cli/tests/cli.rs.)

mod common;

use graft_runtime::gguf::GgufFile;
use graft_runtime::quantize::{quantize_model, FileType, QuantizeOptions};

#[test]
fn hf_checkpoint_quantizes_like_the_gguf_source() {
    // The -hf checkpoints hold the same weights as the F32 GGUFs (q/k rows in HF order):
    // converting them must give the GGUF's tensors, and quantizing must then match too.
    let dir = common::conformance().join("models");
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

#[test]
fn dequantized_suite_tensors_stay_close_to_their_f32_source() {
    // Relative RMS error bound per type (error RMS / source RMS), a little above what
    // each format's bits allow on these Gaussian-like weights.
    fn bound(ty: graft_quant::GgmlType) -> f64 {
        use graft_quant::GgmlType as T;
        match ty {
            T::F16 => 1e-3,
            T::BF16 => 5e-3,
            T::Q8_0 => 0.01,
            T::Q6_K => 0.03,
            T::Q5_0 | T::Q5_1 | T::Q5_K => 0.06,
            T::Q4_0 | T::Q4_1 | T::Q4_K => 0.12,
            T::Q3_K => 0.25,
            T::Q2_K => 0.45,
            _ => 0.0,
        }
    }
    let dir = common::conformance().join("models");
    let mut checked = 0;
    for family in ["llama-gqa", "llama-tied", "qwen2"] {
        let source = GgufFile::open(dir.join(format!("{family}-F32.gguf"))).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with(&format!("{family}-"))
                || !name.ends_with(".gguf")
                || name.contains("lora")
            {
                continue;
            }
            let file = GgufFile::open(&path).unwrap();
            for t in file.tensors() {
                if t.ty == graft_quant::GgmlType::F32 {
                    continue;
                }
                let src = source.tensor(&t.name).unwrap();
                let row = t.row_len() as usize;
                let want =
                    graft_quant::dequantize_matrix(src.ty, source.tensor_data(src), row).unwrap();
                let got = graft_quant::dequantize_matrix(t.ty, file.tensor_data(t), row).unwrap();
                let err: f64 = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
                let norm: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
                let rel = (err / norm).sqrt();
                assert!(
                    rel <= bound(t.ty),
                    "{name} {} ({}): relative RMS error {rel:.4} > {}",
                    t.name,
                    t.ty,
                    bound(t.ty)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 290, "only {checked} tensors");
}
