//! Every GGUF file of the conformance suite must parse, and writing back what was
//! read (same metadata, same tensors, same order) must give the identical bytes.

use std::path::PathBuf;
use std::time::Instant;

use graft_runtime::gguf::{GgufFile, GgufWriter};

fn conformance_models() -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance/models"
    ));
    assert!(
        dir.is_dir(),
        "conformance suite missing: expected the GGUF models in {} (the suite lives in \
         ../shared/conformance relative to the workspace root); this test must not be skipped",
        dir.display()
    );
    dir
}

fn gguf_files() -> Vec<PathBuf> {
    let dir = conformance_models();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "expected the conformance GGUF files in {}, found {}",
        dir.display(),
        files.len()
    );
    files
}

#[test]
fn conformance_files_round_trip_byte_identical() {
    for path in gguf_files() {
        let original = std::fs::read(&path).expect("read model");
        let t0 = Instant::now();
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let parse = t0.elapsed();
        let written = GgufWriter::from_file(&file)
            .and_then(|w| w.to_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            written.len(),
            original.len(),
            "{}: rewritten size differs",
            path.display()
        );
        if let Some(i) = written.iter().zip(&original).position(|(a, b)| a != b) {
            panic!(
                "{}: rewritten file differs first at byte {i} (data section at {})",
                path.display(),
                file.data_offset()
            );
        }
        eprintln!(
            "{}: v{} {} kv, {} tensors, alignment {}, parsed in {parse:?}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            file.version(),
            file.metadata().len(),
            file.tensors().len(),
            file.alignment()
        );
    }
}

#[test]
fn conformance_metadata_reads_as_expected() {
    let dir = conformance_models();
    let f = GgufFile::open(dir.join("llama-gqa-Q4_K_M.gguf")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 256);
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 4);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 2);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "llama");
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 512);
    assert_eq!(f.get_f32_array("tokenizer.ggml.scores").unwrap().len(), 512);
    assert_eq!(
        f.get_int_array("tokenizer.ggml.token_type").unwrap().len(),
        512
    );
    // errors name the key
    let e = f.get_str("llama.block_count").unwrap_err();
    assert!(e.to_string().contains("llama.block_count"), "{e}");
    let e = f.get_u32("no.such.key").unwrap_err();
    assert!(e.to_string().contains("no.such.key"), "{e}");

    let emb = f.tensor("token_embd.weight").expect("token_embd");
    assert_eq!(emb.dims, vec![256, 512]);
    assert_eq!(emb.row_len(), 256);
    assert_eq!(emb.n_rows(), 512);
    assert_eq!(emb.n_elements(), 256 * 512);
    assert_eq!(f.tensor_data(emb).len(), emb.n_bytes);
    assert_eq!(emb.n_bytes, emb.row_bytes() * 512);
    for t in f.tensors() {
        assert_eq!(t.offset % f.alignment() as u64, 0);
        assert_eq!(f.tensor_data(t).len(), t.n_bytes);
    }
}

/// The 32000-piece Llama-2 vocabulary parses fast (150k-piece vocabularies scale
/// linearly from this).
#[test]
fn large_vocab_parses_fast() {
    let path = conformance_models().join("llama-2-tiny-random.gguf");
    let bytes = std::fs::read(&path).expect("read");
    let t0 = Instant::now();
    let f =
        GgufFile::from_bytes(bytes, path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
    let dt = t0.elapsed();
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        32000
    );
    eprintln!("32k vocab parsed in {dt:?}");
}
