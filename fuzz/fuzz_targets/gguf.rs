//! GGUF reader on arbitrary bytes: it must never panic; whatever it accepts must have
//! every tensor's data in bounds and re-serialize with the writer to a file that
//! parses to the same content (and re-serializes to the same bytes).

#![no_main]

use graft_runtime::gguf::{GgufFile, GgufWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec(), "fuzz-input") else {
        return;
    };
    let mut sum = 0u64;
    for t in file.tensors() {
        let bytes = file.tensor_data(t);
        assert_eq!(bytes.len(), t.n_bytes, "tensor {:?}", t.name);
        sum = bytes.iter().fold(sum, |a, &b| a.wrapping_add(u64::from(b)));
    }
    std::hint::black_box(sum);
    for (k, _) in file.metadata() {
        assert!(file.get(k).is_some());
    }

    let writer = GgufWriter::from_file(&file)
        .unwrap_or_else(|e| panic!("a valid file must re-serialize: {e}"));
    // A tensor-less file may declare an alignment up to 2^31 without containing the
    // padding; its (correct) rewrite would be gigabytes of zeros.
    let size = writer.file_size().unwrap_or_else(|e| panic!("{e}"));
    if size > 64 << 20 {
        return;
    }
    let written = writer
        .to_bytes()
        .unwrap_or_else(|e| panic!("a valid file must re-serialize: {e}"));
    assert_eq!(written.len() as u64, size);
    let again = GgufFile::from_bytes(written.clone(), "rewritten")
        .unwrap_or_else(|e| panic!("the writer's output must parse: {e}"));
    assert_eq!(again.tensors(), file.tensors());
    assert_eq!(again.metadata().len(), file.metadata().len());
    for t in file.tensors() {
        assert_eq!(again.tensor_data(t), file.tensor_data(t));
    }
    let rewritten = GgufWriter::from_file(&again)
        .and_then(|w| w.to_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rewritten, written, "writer output is not a fixed point");
});
