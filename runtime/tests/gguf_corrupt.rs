//! Corrupted and truncated GGUF files: each must be rejected with the specific typed
//! error, before any tensor data is used, and nothing may panic. The corrupt files are
//! mutations of a small valid file produced by the writer.

use graft_quant::GgmlType;
use graft_runtime::gguf::{GgufError, GgufErrorKind, GgufFile, GgufValueType, GgufWriter};
use rand::{Rng, SeedableRng};

const NAME: &str = "corrupt-test.gguf";

fn base() -> Vec<u8> {
    let a: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let b: Vec<u8> = (0..36u8).map(|i| i.wrapping_mul(7)).collect();
    let c: Vec<u8> = vec![0x00, 0x3c, 0x00, 0x40, 0x00, 0x42];
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").unwrap();
    w.add_kv("general.alignment", 32u32).unwrap();
    w.add_kv("test.u8", 7u8).unwrap();
    w.add_kv("test.i8", -7i8).unwrap();
    w.add_kv("test.u16", 700u16).unwrap();
    w.add_kv("test.i16", -700i16).unwrap();
    w.add_kv("test.u32", 70000u32).unwrap();
    w.add_kv("test.i32", -70000i32).unwrap();
    w.add_kv("test.f32", 0.5f32).unwrap();
    w.add_kv("test.flag", true).unwrap();
    w.add_kv("test.text", "some text").unwrap();
    w.add_kv("test.u64", 1u64 << 40).unwrap();
    w.add_kv("test.i64", -(1i64 << 40)).unwrap();
    w.add_kv("test.f64", 0.25f64).unwrap();
    w.add_kv("test.tokens", vec!["<s>", "</s>", "piece"])
        .unwrap();
    w.add_kv("test.boolarr", vec![true, false, true]).unwrap();
    w.add_kv("test.scores", vec![0.5f32, -1.0]).unwrap();
    w.add_kv("test.keyAA", 1u32).unwrap();
    w.add_kv("test.keyBB", 2u32).unwrap();
    w.add_tensor("tensor_a", GgmlType::F32, &[4, 2], a).unwrap();
    w.add_tensor("tensor_b", GgmlType::Q4_0, &[32, 2], b)
        .unwrap();
    w.add_tensor("tensor_c", GgmlType::F16, &[3], c).unwrap();
    w.to_bytes().unwrap()
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes, NAME)
}

/// The error for a corrupt file; checks its message is one line naming the file.
fn err(bytes: Vec<u8>) -> GgufErrorKind {
    match parse(bytes) {
        Ok(f) => panic!("corrupt file accepted: {f:?}"),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            assert!(msg.starts_with(NAME), "error does not name the file: {msg}");
            assert!(
                msg.contains("found"),
                "error does not say what was found: {msg}"
            );
            assert!(
                msg.contains("expected"),
                "error does not say what was expected: {msg}"
            );
            e.into_kind()
        }
    }
}

/// Position of the only occurrence of `needle`.
fn find(hay: &[u8], needle: &str) -> usize {
    let n = needle.as_bytes();
    let hits: Vec<usize> = hay
        .windows(n.len())
        .enumerate()
        .filter(|(_, w)| *w == n)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{needle:?} occurs {} times", hits.len());
    hits[0]
}

/// Position of the u32 value type of `key`.
fn type_pos(b: &[u8], key: &str) -> usize {
    find(b, key) + key.len()
}

/// Position of the value of `key`.
fn value_pos(b: &[u8], key: &str) -> usize {
    type_pos(b, key) + 4
}

/// Position of the n_dims field of tensor `name`.
fn tensor_pos(b: &[u8], name: &str) -> usize {
    find(b, name) + name.len()
}

fn tensor_n_dims(b: &[u8], name: &str) -> usize {
    let p = tensor_pos(b, name);
    u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize
}

fn tensor_type_pos(b: &[u8], name: &str) -> usize {
    tensor_pos(b, name) + 4 + 8 * tensor_n_dims(b, name)
}

fn tensor_offset_pos(b: &[u8], name: &str) -> usize {
    tensor_type_pos(b, name) + 4
}

fn get_u64(b: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap())
}

fn put_u32(b: &mut [u8], pos: usize, v: u32) {
    b[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], pos: usize, v: u64) {
    b[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
}

fn mutated(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = base();
    f(&mut b);
    b
}

#[test]
fn base_file_is_valid() {
    let f = parse(base()).unwrap();
    assert_eq!(f.metadata().len(), 19);
    assert_eq!(f.tensors().len(), 3);
    assert_eq!(f.get_str_array("test.tokens").unwrap().len(), 3);
    assert_eq!(f.tensor_bytes("tensor_c").unwrap().len(), 6);
    // data section: 32 + 64 + 32 bytes (each tensor padded to 32)
    assert_eq!(f.bytes().len() - f.data_offset(), 128);
}

// 1. truncation: every prefix fails cleanly, and the error says where.
#[test]
fn every_truncation_is_an_error() {
    let b = base();
    let f = parse(b.clone()).unwrap();
    // the last tensor's data ends 6 bytes into its 32-byte slot; the padding after it
    // is optional (ggml and llama.cpp only need the tensor bytes in the file)
    let data_end = f.data_offset() + 96 + 6;
    for len in 0..b.len() {
        let r = parse(b[..len].to_vec());
        if len < data_end {
            assert!(r.is_err(), "prefix of {len} bytes accepted");
        } else {
            assert!(r.is_ok(), "prefix of {len} bytes rejected: {:?}", r.err());
        }
    }
}

#[test]
fn truncated_inside_header() {
    let b = base();
    assert!(
        matches!(err(vec![]), GgufErrorKind::Truncated { ref field, needed: 4, available: 0, .. } if field == "magic")
    );
    assert!(
        matches!(err(b[..6].to_vec()), GgufErrorKind::Truncated { ref field, offset: 4, available: 2, .. } if field == "version")
    );
    assert!(
        matches!(err(b[..12].to_vec()), GgufErrorKind::Truncated { ref field, .. } if field == "tensor_count")
    );
    assert!(
        matches!(err(b[..20].to_vec()), GgufErrorKind::Truncated { ref field, .. } if field == "kv_count")
    );
}

#[test]
fn truncated_inside_kv_and_string() {
    let b = base();
    // inside the string value of test.text: the declared length no longer fits
    let p = value_pos(&b, "test.text") + 8 + 3;
    // keep the header counts plausible: they are checked against the whole file, so
    // cut the file but keep the last part (0-padded) is not possible; instead shrink
    // counts so the prefix passes plausibility.
    let mut t = b[..p].to_vec();
    put_u64(&mut t, 8, 0); // tensor_count
    match err(t) {
        GgufErrorKind::LengthOutOfBounds {
            field, found: 9, ..
        } => {
            assert!(
                field.contains("test.text") && field.contains("length"),
                "{field}"
            )
        }
        k => panic!("{k:?}"),
    }
    // inside a fixed-size value (u64) of a KV
    let p = value_pos(&b, "test.u64") + 3;
    let mut t = b[..p].to_vec();
    put_u64(&mut t, 8, 0);
    match err(t) {
        GgufErrorKind::Truncated {
            field,
            needed: 8,
            available: 3,
            ..
        } => {
            assert!(field.contains("test.u64"), "{field}")
        }
        k => panic!("{k:?}"),
    }
    // inside a key
    let p = find(&b, "test.f64") + 2;
    let mut t = b[..p].to_vec();
    put_u64(&mut t, 8, 0);
    match err(t) {
        GgufErrorKind::LengthOutOfBounds {
            field,
            found: 8,
            available: 2,
            ..
        } => {
            assert!(field.contains("key length"), "{field}")
        }
        k => panic!("{k:?}"),
    }
}

#[test]
fn truncated_inside_tensor_info() {
    let b = base();
    let p = tensor_offset_pos(&b, "tensor_c") + 5;
    match err(b[..p].to_vec()) {
        GgufErrorKind::Truncated {
            field,
            needed: 8,
            available: 5,
            ..
        } => {
            assert_eq!(field, "tensor \"tensor_c\" offset")
        }
        k => panic!("{k:?}"),
    }
}

#[test]
fn truncated_inside_data() {
    let b = base();
    // cut in the middle of tensor_b's data
    let f = parse(b.clone()).unwrap();
    let cut = f.data_offset() + 32 + 10;
    match err(b[..cut].to_vec()) {
        GgufErrorKind::OffsetOutOfBounds {
            tensor,
            offset: 32,
            n_bytes: 36,
            data_len: 42,
        } => assert_eq!(tensor, "tensor_b"),
        k => panic!("{k:?}"),
    }
    // cut inside the padding after the last tensor: still fine (ggml / llama.cpp only
    // need the tensor bytes themselves to be in the file)
    let end_c = f.data_offset() + 96 + 6;
    assert!(parse(b[..end_c].to_vec()).is_ok());
    match err(b[..end_c - 1].to_vec()) {
        GgufErrorKind::OffsetOutOfBounds { tensor, .. } => assert_eq!(tensor, "tensor_c"),
        k => panic!("{k:?}"),
    }
}

// 2. magic
#[test]
fn bad_magic() {
    let b = mutated(|b| b[0..4].copy_from_slice(b"GGML"));
    assert!(matches!(err(b), GgufErrorKind::BadMagic { found } if &found == b"GGML"));
}

// 3. version
#[test]
fn bad_versions() {
    for v in [0u32, 1, 4, 0x0300_0000] {
        let b = mutated(|b| put_u32(b, 4, v));
        assert!(
            matches!(err(b), GgufErrorKind::UnsupportedVersion { found } if found == v),
            "version {v}"
        );
    }
    // v2 has the v3 layout and is accepted, like ggml does
    let f = parse(mutated(|b| put_u32(b, 4, 2))).unwrap();
    assert_eq!(f.version(), 2);
}

// 4. counts
#[test]
fn huge_counts() {
    match err(mutated(|b| put_u64(b, 16, u64::MAX))) {
        GgufErrorKind::ImplausibleCount { field, found, .. } => {
            assert_eq!((field, found), ("kv_count", u64::MAX))
        }
        k => panic!("{k:?}"),
    }
    match err(mutated(|b| put_u64(b, 8, 1 << 40))) {
        GgufErrorKind::ImplausibleCount { field, found, .. } => {
            assert_eq!((field, found), ("tensor_count", 1 << 40))
        }
        k => panic!("{k:?}"),
    }
    // a count that is plausible but wrong runs into the following bytes
    assert!(parse(mutated(|b| put_u64(b, 16, 20))).is_err());
}

// 5. string lengths
#[test]
fn huge_string_lengths() {
    // value string
    let k = err(mutated(|b| {
        let p = value_pos(b, "test.text");
        put_u64(b, p, u64::MAX - 3)
    }));
    match k {
        GgufErrorKind::LengthOutOfBounds { field, found, .. } => {
            assert_eq!(found, u64::MAX - 3);
            assert!(field.contains("test.text"), "{field}");
        }
        k => panic!("{k:?}"),
    }
    // key
    let k = err(mutated(|b| {
        let p = find(b, "test.i16") - 8;
        put_u64(b, p, 1 << 50)
    }));
    assert!(
        matches!(k, GgufErrorKind::LengthOutOfBounds { found, ref field, .. } if found == 1 << 50 && field.contains("key length"))
    );
    // tensor name
    let k = err(mutated(|b| {
        let p = find(b, "tensor_b") - 8;
        put_u64(b, p, 1 << 33)
    }));
    assert!(
        matches!(k, GgufErrorKind::LengthOutOfBounds { found, ref field, .. } if found == 1 << 33 && field.contains("tensor_info[1] name"))
    );
}

// 6. array counts
#[test]
fn huge_array_counts() {
    for (key, count) in [
        ("test.tokens", u64::MAX),
        ("test.scores", u64::MAX / 2),
        ("test.boolarr", 1 << 20),
    ] {
        let k = err(mutated(|b| {
            let p = value_pos(b, key) + 4;
            put_u64(b, p, count)
        }));
        match k {
            GgufErrorKind::LengthOutOfBounds { field, found, .. } => {
                assert_eq!(found, count);
                assert!(
                    field.contains(key) && field.contains("array count"),
                    "{field}"
                );
            }
            k => panic!("{key}: {k:?}"),
        }
    }
}

// 7. value types
#[test]
fn unknown_value_types() {
    for bad in [13u32, 255, u32::MAX] {
        let k = err(mutated(|b| {
            let p = type_pos(b, "test.u32");
            put_u32(b, p, bad)
        }));
        assert!(
            matches!(k, GgufErrorKind::UnknownValueType { found, ref field } if found == bad && field.contains("test.u32")),
            "{k:?}"
        );
    }
    // array element type
    let k = err(mutated(|b| {
        let p = value_pos(b, "test.scores");
        put_u32(b, p, 13)
    }));
    assert!(
        matches!(k, GgufErrorKind::UnknownValueType { found: 13, ref field } if field.contains("test.scores"))
    );
}

// 8. nested arrays
#[test]
fn nested_array() {
    let k = err(mutated(|b| {
        let p = value_pos(b, "test.scores");
        put_u32(b, p, GgufValueType::Array.id())
    }));
    assert!(matches!(k, GgufErrorKind::NestedArray { ref field } if field.contains("test.scores")));
}

// 9. bools
#[test]
fn bad_bools() {
    let k = err(mutated(|b| {
        let p = value_pos(b, "test.flag");
        b[p] = 2
    }));
    assert!(
        matches!(k, GgufErrorKind::BadBool { found: 2, ref field } if field.contains("test.flag"))
    );
    let k = err(mutated(|b| {
        let p = value_pos(b, "test.boolarr") + 12 + 1;
        b[p] = 0xff
    }));
    assert!(
        matches!(k, GgufErrorKind::BadBool { found: 0xff, ref field } if field.contains("test.boolarr") && field.contains("[1]"))
    );
}

// 10. UTF-8
#[test]
fn invalid_utf8() {
    let k = err(mutated(|b| {
        let p = value_pos(b, "test.text") + 8;
        b[p] = 0xff
    }));
    assert!(
        matches!(k, GgufErrorKind::InvalidUtf8 { ref field, .. } if field.contains("test.text"))
    );
    let k = err(mutated(|b| {
        let p = find(b, "test.i64");
        b[p + 1] = 0xc3; // lone lead byte
    }));
    assert!(matches!(k, GgufErrorKind::InvalidUtf8 { ref field, .. } if field.contains("key")));
    let k = err(mutated(|b| {
        let p = value_pos(b, "test.tokens") + 12 + 8; // first element's bytes
        b[p] = 0x80
    }));
    assert!(
        matches!(k, GgufErrorKind::InvalidUtf8 { ref field, .. } if field.contains("test.tokens") && field.contains("[0]"))
    );
    let k = err(mutated(|b| {
        let p = find(b, "tensor_b");
        b[p] = 0xfe
    }));
    assert!(
        matches!(k, GgufErrorKind::InvalidUtf8 { ref field, .. } if field.contains("tensor_info[1] name"))
    );
}

// 11. duplicate keys
#[test]
fn duplicate_key() {
    let k = err(mutated(|b| {
        let p = find(b, "test.keyBB");
        b[p..p + 10].copy_from_slice(b"test.keyAA")
    }));
    match k {
        GgufErrorKind::DuplicateKey { key, first, second } => {
            assert_eq!((key.as_str(), first, second), ("test.keyAA", 17, 18))
        }
        k => panic!("{k:?}"),
    }
}

// 12. duplicate tensor names
#[test]
fn duplicate_tensor_name() {
    let k = err(mutated(|b| {
        let p = find(b, "tensor_c");
        b[p..p + 8].copy_from_slice(b"tensor_a")
    }));
    match k {
        GgufErrorKind::DuplicateTensor {
            name,
            first,
            second,
        } => assert_eq!((name.as_str(), first, second), ("tensor_a", 0, 2)),
        k => panic!("{k:?}"),
    }
}

// 13. alignment
#[test]
fn bad_alignment() {
    for a in [0u32, 3, 48, u32::MAX] {
        let k = err(mutated(|b| {
            let p = value_pos(b, "general.alignment");
            put_u32(b, p, a)
        }));
        assert!(
            matches!(k, GgufErrorKind::AlignmentValue { found } if found == u64::from(a)),
            "{a}: {k:?}"
        );
    }
    // right size, wrong type
    for ty in [GgufValueType::I32, GgufValueType::F32] {
        let k = err(mutated(|b| {
            let p = type_pos(b, "general.alignment");
            put_u32(b, p, ty.id())
        }));
        assert!(
            matches!(k, GgufErrorKind::AlignmentType { ref found } if found == ty.name()),
            "{k:?}"
        );
    }
    // a valid alignment the layout was not written for
    let k = err(mutated(|b| {
        let p = value_pos(b, "general.alignment");
        put_u32(b, p, 64)
    }));
    assert!(
        matches!(k, GgufErrorKind::MisalignedOffset { alignment: 64, ref tensor, .. } if tensor == "tensor_b"),
        "{k:?}"
    );
}

// 14. n_dims
#[test]
fn bad_dim_counts() {
    for n in [0u32, 5, u32::MAX] {
        let k = err(mutated(|b| {
            let p = tensor_pos(b, "tensor_b");
            put_u32(b, p, n)
        }));
        assert!(
            matches!(k, GgufErrorKind::BadDimCount { found, ref tensor } if found == n && tensor == "tensor_b"),
            "{k:?}"
        );
    }
}

// 15. dims overflow
#[test]
fn dim_overflow() {
    let k = err(mutated(|b| {
        let p = tensor_pos(b, "tensor_a") + 4;
        put_u64(b, p, 1 << 40);
        put_u64(b, p + 8, 1 << 40);
    }));
    assert!(
        matches!(k, GgufErrorKind::ElementCountOverflow { ref tensor, ref dims } if tensor == "tensor_a" && dims == &[1 << 40, 1 << 40]),
        "{k:?}"
    );
    let k = err(mutated(|b| {
        let p = tensor_pos(b, "tensor_a") + 4 + 8;
        put_u64(b, p, u64::MAX)
    }));
    assert!(
        matches!(
            k,
            GgufErrorKind::DimTooLarge {
                dim: 1,
                found: u64::MAX,
                ..
            }
        ),
        "{k:?}"
    );
    // product just at i64::MAX
    let k = err(mutated(|b| {
        let p = tensor_pos(b, "tensor_c") + 4;
        put_u64(b, p, i64::MAX as u64)
    }));
    assert!(
        matches!(k, GgufErrorKind::ElementCountOverflow { .. }),
        "{k:?}"
    );
}

// 16. ne[0] vs block size
#[test]
fn row_not_block_multiple() {
    let k = err(mutated(|b| {
        let p = tensor_pos(b, "tensor_b") + 4;
        put_u64(b, p, 48)
    }));
    match k {
        GgufErrorKind::NotBlockMultiple {
            tensor,
            ty,
            ne0,
            block,
        } => assert_eq!(
            (tensor.as_str(), ty, ne0, block),
            ("tensor_b", GgmlType::Q4_0, 48, 32)
        ),
        k => panic!("{k:?}"),
    }
}

// 17. ggml type ids
#[test]
fn unknown_tensor_types() {
    for id in [4u32, 5, 16, 29, 31, 1000, u32::MAX] {
        let b = mutated(|b| {
            let p = tensor_type_pos(b, "tensor_c");
            put_u32(b, p, id)
        });
        let e = parse(b).unwrap_err();
        assert!(e.to_string().contains(&format!("type id {id}")), "{e}");
        assert!(
            matches!(e.kind(), GgufErrorKind::UnknownTensorType { found, tensor } if *found == id && tensor == "tensor_c"),
            "{e}"
        );
    }
}

// 18. misaligned offsets
#[test]
fn misaligned_offset() {
    let k = err(mutated(|b| {
        let p = tensor_offset_pos(b, "tensor_c");
        let o = get_u64(b, p);
        put_u64(b, p, o + 4)
    }));
    assert!(
        matches!(k, GgufErrorKind::MisalignedOffset { offset: 100, alignment: 32, ref tensor } if tensor == "tensor_c"),
        "{k:?}"
    );
}

// 19. out-of-bounds offsets
#[test]
fn out_of_bounds_offsets() {
    for off in [128u64, 1 << 20, !31u64] {
        let k = err(mutated(|b| {
            let p = tensor_offset_pos(b, "tensor_c");
            put_u64(b, p, off)
        }));
        assert!(
            matches!(k, GgufErrorKind::OffsetOutOfBounds { offset, data_len: 128, ref tensor, .. } if offset == off && tensor == "tensor_c"),
            "{k:?}"
        );
    }
}

// 20. overlapping tensors
#[test]
fn overlapping_tensors() {
    let k = err(mutated(|b| {
        let p = tensor_offset_pos(b, "tensor_b");
        put_u64(b, p, 0)
    }));
    match k {
        GgufErrorKind::TensorOverlap {
            tensor,
            offset: 0,
            previous,
            previous_end: 32,
        } => assert_eq!(
            (tensor.as_str(), previous.as_str()),
            ("tensor_b", "tensor_a")
        ),
        k => panic!("{k:?}"),
    }
}

// 21. offsets that are in bounds and disjoint but not ggml's packed layout
#[test]
fn unpacked_offsets() {
    // a gap between tensor_a and tensor_b
    let k = err(mutated(|b| {
        let p = tensor_offset_pos(b, "tensor_b");
        put_u64(b, p, 64)
    }));
    assert!(
        matches!(k, GgufErrorKind::OffsetNotPacked { found: 64, expected: 32, ref tensor } if tensor == "tensor_b"),
        "{k:?}"
    );
    // out of info order: tensor_a placed after tensor_c's slot is out of bounds, so swap
    // a and c's offsets would overlap; instead start the first tensor late
    let k = err(mutated(|b| {
        let p = tensor_offset_pos(b, "tensor_a");
        put_u64(b, p, 32)
    }));
    assert!(
        matches!(
            k,
            GgufErrorKind::OffsetNotPacked {
                found: 32,
                expected: 0,
                ..
            }
        ),
        "{k:?}"
    );
}

// 22. tensor names too long (GGML_MAX_NAME)
#[test]
fn tensor_name_too_long() {
    // lengthen tensor_b's name by 64 bytes: the data section moves by exactly two
    // alignments, so everything else stays valid
    let mut b = base();
    let p = find(&b, "tensor_b");
    put_u64(&mut b, p - 8, 8 + 64);
    let tail = b.split_off(p + 8);
    b.extend_from_slice(&[b'x'; 64]);
    b.extend_from_slice(&tail);
    match err(b.clone()) {
        GgufErrorKind::TensorNameTooLong { index: 1, len: 72 } => {}
        k => panic!("{k:?}"),
    }
    // 63 bytes is the longest name ggml accepts
    let name63 = "n".repeat(63);
    let mut w = GgufWriter::new();
    w.add_tensor(name63.as_str(), GgmlType::F32, &[1], vec![0u8; 4])
        .unwrap();
    let f = parse(w.to_bytes().unwrap()).unwrap();
    assert_eq!(f.tensors()[0].name, name63);
    assert!(w
        .add_tensor("m".repeat(64), GgmlType::F32, &[1], vec![0u8; 4])
        .is_err());
}

#[test]
fn typed_getter_errors_name_the_key() {
    let f = parse(base()).unwrap();
    assert_eq!(f.get_u32("test.u8").unwrap(), 7);
    assert_eq!(f.get_u32("test.u16").unwrap(), 700);
    assert_eq!(
        f.get_u32("test.u64")
            .map_err(|e| e.into_kind())
            .unwrap_err()
            .to_string(),
        "test.u64: found 1099511627776, expected a value in 0..=4294967295"
    );
    assert_eq!(f.get_u64("test.u64").unwrap(), 1 << 40);
    assert_eq!(f.get_i64("test.i64").unwrap(), -(1 << 40));
    assert!(
        matches!(f.get_u32("test.i8").unwrap_err().kind(), GgufErrorKind::ValueOutOfRange { key, .. } if key == "test.i8")
    );
    assert!(
        matches!(f.get_u32("test.text").unwrap_err().kind(), GgufErrorKind::WrongType { key, found, .. } if key == "test.text" && found == "string")
    );
    assert!(
        matches!(f.get_str("test.tokens").unwrap_err().kind(), GgufErrorKind::WrongType { found, .. } if found == "array<string>")
    );
    assert!(
        matches!(f.get_f32("absent.key").unwrap_err().kind(), GgufErrorKind::MissingKey { key } if key == "absent.key")
    );
    assert_eq!(f.get_u32_opt("absent.key").unwrap(), None);
    assert!(f.get_u32_opt("test.text").is_err());
    assert_eq!(f.get_f32("test.f32").unwrap(), 0.5);
    assert_eq!(f.get_f64("test.f64").unwrap(), 0.25);
    assert!(f.get_bool("test.flag").unwrap());
    assert_eq!(f.get_str("test.text").unwrap(), "some text");
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_int_array("test.boolarr").map_err(|e| e.into_kind().to_string()).unwrap_err(),
        "test.boolarr: found type array<bool>, expected array of an integer type (values fitting i64)");
    let e = f.get_f32_array("test.tokens").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{NAME}: test.tokens: found type array<string>, expected array<float32>")
    );
}

/// Random corruption: any outcome but a panic is fine; what parses must be fully
/// usable and survive a rewrite.
#[test]
fn random_mutations_never_panic() {
    let b = base();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x66_75_7a_7a);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut m = b.clone();
        for _ in 0..rng.gen_range(1..4) {
            if m.is_empty() {
                break;
            }
            let i = rng.gen_range(0..m.len());
            match rng.gen_range(0..4) {
                0 => m[i] = rng.gen(),
                1 => m[i] ^= 1 << rng.gen_range(0..8),
                2 => m.truncate(i),
                _ => {
                    // overwrite an aligned u64 with an interesting value
                    let v: u64 =
                        [0, 1, 0xff, 1 << 32, u64::MAX, i64::MAX as u64][rng.gen_range(0..6)];
                    let i = i & !7;
                    if i + 8 <= m.len() {
                        m[i..i + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        if let Ok(f) = GgufFile::from_bytes(m, "mutant") {
            accepted += 1;
            let mut sum = 0u64;
            for t in f.tensors() {
                let d = f.tensor_data(t);
                assert_eq!(d.len(), t.n_bytes);
                sum = sum.wrapping_add(d.iter().map(|&x| u64::from(x)).sum::<u64>());
            }
            std::hint::black_box(sum);
            let w = GgufWriter::from_file(&f).unwrap().to_bytes().unwrap();
            let g = GgufFile::from_bytes(w, "rewritten").unwrap();
            assert_eq!(g.metadata().len(), f.metadata().len());
            assert_eq!(g.tensors(), f.tensors());
        }
    }
    eprintln!("{accepted} of 20000 mutants were still valid files");
}

/// Not corrupt: files written without the final padding (gguf-py's vocab-only files
/// end right after the KVs) are accepted, like ggml does.
#[test]
fn unpadded_tensorless_file_is_valid() {
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", "llama").unwrap();
    w.add_kv("tokenizer.ggml.tokens", vec!["a", "b"]).unwrap();
    let mut b = w.to_bytes().unwrap();
    let f = parse(b.clone()).unwrap();
    let meta_end = b.iter().rposition(|&x| x != 0).unwrap() + 1;
    b.truncate(meta_end);
    let g = parse(b).unwrap();
    assert_eq!(g.metadata(), f.metadata());
    assert_eq!(g.data_offset(), f.data_offset());
}

#[test]
fn unsupported_ggml_types_are_named() {
    let b = mutated(|b| {
        let p = tensor_type_pos(b, "tensor_c");
        put_u32(b, p, 16)
    });
    let e = parse(b).unwrap_err();
    assert!(e.to_string().contains("type id 16 (IQ2_XXS"), "{e}");
}
