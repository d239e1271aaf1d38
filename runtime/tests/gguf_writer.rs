//! The writer: every value type, layout, alignment, and the writer's own validation.

use std::time::Instant;

use graft_quant::GgmlType;
use graft_runtime::gguf::{
    GgufArray, GgufErrorKind, GgufFile, GgufValue, GgufValueType, GgufWriter,
};

fn every_value() -> Vec<(String, GgufValue)> {
    let v: Vec<GgufValue> = vec![
        GgufValue::U8(250),
        GgufValue::I8(-100),
        GgufValue::U16(65000),
        GgufValue::I16(-32000),
        GgufValue::U32(4_000_000_000),
        GgufValue::I32(-2_000_000_000),
        GgufValue::F32(-1.5e-7),
        GgufValue::Bool(true),
        GgufValue::String("héllo ▁world".into()),
        GgufValue::U64(u64::MAX),
        GgufValue::I64(i64::MIN),
        GgufValue::F64(std::f64::consts::PI),
        GgufValue::String(String::new()),
        GgufValue::Bool(false),
        GgufArray::U8(vec![0, 1, 255]).into(),
        GgufArray::I8(vec![-128, 127]).into(),
        GgufArray::U16(vec![1, 65535]).into(),
        GgufArray::I16(vec![-1, 300]).into(),
        GgufArray::U32(vec![7; 5]).into(),
        GgufArray::I32(vec![-7, 0, 7]).into(),
        GgufArray::F32(vec![0.0, -0.0, f32::INFINITY, f32::MIN_POSITIVE]).into(),
        GgufArray::Bool(vec![true, false, false]).into(),
        GgufArray::String(vec!["a".into(), "".into(), "Ġthe".into()]).into(),
        GgufArray::U64(vec![u64::MAX, 0]).into(),
        GgufArray::I64(vec![i64::MIN, i64::MAX]).into(),
        GgufArray::F64(vec![1e300, -2.5]).into(),
        GgufArray::String(vec![]).into(),
        GgufArray::F32(vec![]).into(),
    ];
    v.into_iter()
        .enumerate()
        .map(|(i, v)| (format!("test.value.{i}"), v))
        .collect()
}

#[test]
fn every_value_type_round_trips() {
    let kvs = every_value();
    let mut w = GgufWriter::new();
    for (k, v) in &kvs {
        w.add_kv(k.clone(), v.clone()).unwrap();
    }
    // every type id and array element type appears
    let mut seen: Vec<GgufValueType> = kvs.iter().map(|(_, v)| v.value_type()).collect();
    seen.extend(
        kvs.iter()
            .filter_map(|(_, v)| v.as_array())
            .map(|a| a.elem_type()),
    );
    for t in GgufValueType::ALL {
        assert!(seen.contains(&t), "{t} not covered");
    }
    let bytes = w.to_bytes().unwrap();
    assert_eq!(bytes.len() % 32, 0);
    let f = GgufFile::from_bytes(bytes.clone(), "values.gguf").unwrap();
    assert_eq!(f.metadata(), &kvs[..]);
    assert!(f.tensors().is_empty());
    // and writing it again gives the same bytes
    assert_eq!(
        GgufWriter::from_file(&f).unwrap().to_bytes().unwrap(),
        bytes
    );
}

#[test]
fn exact_layout_of_a_tiny_file() {
    let mut w = GgufWriter::new();
    w.add_kv("a", 1u8).unwrap();
    w.add_tensor("t", GgmlType::F32, &[1], 2.0f32.to_le_bytes().to_vec())
        .unwrap();
    let mut expected = Vec::new();
    expected.extend_from_slice(b"GGUF");
    expected.extend_from_slice(&3u32.to_le_bytes());
    expected.extend_from_slice(&1u64.to_le_bytes()); // tensor_count
    expected.extend_from_slice(&1u64.to_le_bytes()); // kv_count
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(b"a");
    expected.extend_from_slice(&0u32.to_le_bytes()); // uint8
    expected.push(1);
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(b"t");
    expected.extend_from_slice(&1u32.to_le_bytes()); // n_dims
    expected.extend_from_slice(&1u64.to_le_bytes()); // ne[0]
    expected.extend_from_slice(&0u32.to_le_bytes()); // F32
    expected.extend_from_slice(&0u64.to_le_bytes()); // offset
    expected.resize(96, 0); // 24 header + 14 kv + 33 info = 71 bytes, padded to 32
    expected.extend_from_slice(&2.0f32.to_le_bytes());
    expected.resize(128, 0); // data padded too
    assert_eq!(w.to_bytes().unwrap(), expected);
    assert_eq!(w.file_size().unwrap(), 128);
    let f = GgufFile::from_bytes(expected, "tiny").unwrap();
    assert_eq!(f.data_offset(), 96);
    assert_eq!(f.tensor_bytes("t").unwrap(), &2.0f32.to_le_bytes());
}

#[test]
fn empty_file() {
    let bytes = GgufWriter::new().to_bytes().unwrap();
    assert_eq!(bytes.len(), 32);
    let f = GgufFile::from_bytes(bytes, "empty").unwrap();
    assert_eq!((f.metadata().len(), f.tensors().len()), (0, 0));
    assert_eq!(f.data_offset(), 32);
}

fn tensors(w: &mut GgufWriter<'static>) {
    w.add_tensor("q8", GgmlType::Q8_0, &[64, 3], vec![1u8; 34 * 2 * 3])
        .unwrap();
    w.add_tensor("k", GgmlType::Q4_K, &[256], vec![2u8; 144])
        .unwrap();
    w.add_tensor("empty", GgmlType::F32, &[0, 4], Vec::new())
        .unwrap();
    w.add_tensor("bf", GgmlType::BF16, &[5, 1, 1, 2], vec![3u8; 20])
        .unwrap();
}

#[test]
fn custom_alignment() {
    for align in [1u32, 8, 64, 4096] {
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", "llama").unwrap();
        w.set_alignment(align).unwrap();
        tensors(&mut w);
        let bytes = w.to_bytes().unwrap();
        let f = GgufFile::from_bytes(bytes.clone(), "aligned").unwrap();
        assert_eq!(f.alignment(), align as usize);
        assert_eq!(f.get_u32("general.alignment").unwrap(), align);
        assert_eq!(f.data_offset() % align as usize, 0);
        assert_eq!(bytes.len() % align as usize, 0);
        for t in f.tensors() {
            assert_eq!(t.offset % u64::from(align), 0);
            assert_eq!(f.tensor_data(t).len(), t.n_bytes);
        }
        assert_eq!(f.tensor_bytes("bf").unwrap(), &[3u8; 20]);
        assert_eq!(f.tensor("empty").unwrap().n_bytes, 0);
        assert_eq!(
            GgufWriter::from_file(&f).unwrap().to_bytes().unwrap(),
            bytes
        );
    }
    // set_alignment replaces an existing key in place
    let mut w = GgufWriter::new();
    w.add_kv("general.alignment", 16u32).unwrap();
    w.add_kv("x", 1u8).unwrap();
    w.set_alignment(128).unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap(), "a").unwrap();
    assert_eq!(
        f.metadata()[0],
        ("general.alignment".into(), GgufValue::U32(128))
    );
    assert_eq!(f.alignment(), 128);
}

#[test]
fn writer_rejects_invalid_content() {
    let mut w = GgufWriter::new();
    w.add_kv("k", 1u32).unwrap();
    let kind = |r: Result<&mut GgufWriter, _>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => {
            let e: graft_runtime::gguf::GgufError = e;
            assert!(!e.to_string().contains('\n'));
            e.into_kind()
        }
    };
    assert!(matches!(
        kind(w.add_kv("k", 2u32)),
        GgufErrorKind::DuplicateKey { .. }
    ));
    for a in [0u32, 3, 96] {
        assert!(matches!(
            kind(w.set_alignment(a)),
            GgufErrorKind::AlignmentValue { .. }
        ));
        assert!(matches!(
            kind(w.add_kv("general.alignment", a)),
            GgufErrorKind::AlignmentValue { .. }
        ));
    }
    assert!(matches!(
        kind(w.add_kv("general.alignment", 32u64)),
        GgufErrorKind::AlignmentType { .. }
    ));
    assert!(matches!(
        kind(w.set_version(1)),
        GgufErrorKind::WriterVersion { found: 1 }
    ));
    assert!(matches!(
        kind(w.set_version(4)),
        GgufErrorKind::WriterVersion { found: 4 }
    ));
    w.add_tensor("t", GgmlType::F32, &[2], vec![0u8; 8])
        .unwrap();
    assert!(matches!(
        kind(w.add_tensor("t", GgmlType::F32, &[2], vec![0u8; 8])),
        GgufErrorKind::DuplicateTensor { .. }
    ));
    assert!(matches!(
        kind(w.add_tensor("u", GgmlType::F32, &[2], vec![0u8; 7])),
        GgufErrorKind::TensorDataSize {
            found: 7,
            expected: 8,
            ..
        }
    ));
    assert!(matches!(
        kind(w.add_tensor("u", GgmlType::F32, &[], vec![])),
        GgufErrorKind::BadDimCount { found: 0, .. }
    ));
    assert!(matches!(
        kind(w.add_tensor("u", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0u8; 4])),
        GgufErrorKind::BadDimCount { found: 5, .. }
    ));
    assert!(matches!(
        kind(w.add_tensor("u", GgmlType::Q6_K, &[128], vec![])),
        GgufErrorKind::NotBlockMultiple {
            ne0: 128,
            block: 256,
            ..
        }
    ));
    assert!(matches!(
        kind(w.add_tensor("u", GgmlType::F32, &[1 << 62, 4], vec![])),
        GgufErrorKind::ElementCountOverflow { .. }
    ));
    assert!(matches!(
        kind(w.add_tensor("x".repeat(64), GgmlType::F32, &[1], vec![0u8; 4])),
        GgufErrorKind::TensorNameTooLong { len: 64, .. }
    ));
    // the failed calls left the writer unchanged
    let f = GgufFile::from_bytes(w.to_bytes().unwrap(), "w").unwrap();
    assert_eq!(f.metadata().len(), 1);
    assert_eq!(f.tensors().len(), 1);
}

#[test]
fn write_file_and_open_with_mmap() {
    let dir = std::env::temp_dir().join(format!("graft-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "qwen2").unwrap();
    tensors(&mut w);
    w.write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.architecture().unwrap(), "qwen2");
    assert_eq!(f.tensor_bytes("k").unwrap(), &[2u8; 144][..]);
    assert_eq!(f.bytes(), &w.to_bytes().unwrap()[..]);
    drop(f);

    // an empty file and a missing file
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).unwrap_err();
    assert!(matches!(e.kind(), GgufErrorKind::Truncated { field, .. } if field == "magic"));
    assert!(e.to_string().starts_with(&empty.display().to_string()));
    let e = GgufFile::open(dir.join("missing.gguf")).unwrap_err();
    assert!(
        matches!(e.kind(), GgufErrorKind::Io { op: "open", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("missing.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A 150k-piece vocabulary (tokens, scores, token types, like a Qwen2/Llama-3 file)
/// parses in milliseconds (the bound here is loose for unoptimized test builds).
#[test]
fn vocab_of_150k_strings_parses_fast() {
    let n = 150_000;
    let tokens: Vec<String> = (0..n).map(|i| format!("Ġtok{i}")).collect();
    let merges: Vec<String> = (0..n).map(|i| format!("Ġt ok{i}")).collect();
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "gpt2").unwrap();
    w.add_kv("tokenizer.ggml.tokens", tokens.clone()).unwrap();
    w.add_kv("tokenizer.ggml.token_type", vec![1i32; n])
        .unwrap();
    w.add_kv("tokenizer.ggml.merges", merges).unwrap();
    let bytes = w.to_bytes().unwrap();
    let mut best = std::time::Duration::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        let f = GgufFile::from_bytes(bytes.clone(), "vocab.gguf").unwrap();
        best = best.min(t0.elapsed());
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            &tokens[..]
        );
    }
    eprintln!(
        "300k strings ({} MB of metadata) parsed in {best:?}",
        bytes.len() >> 20
    );
    assert!(best.as_millis() < 2000, "too slow: {best:?}");
}
