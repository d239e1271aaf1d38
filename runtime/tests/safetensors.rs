//! Safetensors reader: the conformance HF checkpoints, sharded checkpoints
//! built in a temp dir, and corrupted/truncated files, each asserting the
//! specific error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use graft_runtime::safetensors::{
    to_f32, to_f32_into, SafetensorsError, SafetensorsModel, StDtype, MAX_HEADER_LEN,
};
use rand::{Rng, SeedableRng};

const CONFORMANCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance");

/// The conformance suite's models dir; fails (never skips) when missing.
fn models_dir() -> PathBuf {
    let dir = Path::new(CONFORMANCE).join("models");
    assert!(
        dir.is_dir(),
        "conformance suite not found at {} (expected ../shared/conformance next to the repo)",
        dir.display()
    );
    dir
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("graft-st-{}-{tag}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A safetensors file image from a literal header and data bytes.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes named F32 tensors with the safetensors crate.
fn serialize_f32(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), f32_bytes(v)))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, &None).unwrap()
}

fn err_of(bytes: Vec<u8>) -> SafetensorsError {
    match SafetensorsModel::from_bytes(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn err_of_path(path: &Path) -> SafetensorsError {
    match SafetensorsModel::open(path) {
        Ok(_) => panic!("expected an error opening {}", path.display()),
        Err(e) => e,
    }
}

/// Every error message is one line and names its file.
fn assert_one_line(e: &SafetensorsError, file_part: &str) {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    assert!(
        msg.contains(file_part),
        "error does not name {file_part}: {msg}"
    );
}

const EXPECTED_COUNTS: [(&str, usize); 3] = [
    ("llama-gqa-hf", 21),
    ("llama-tied-hf", 20),
    ("qwen2-hf", 26),
];

#[test]
fn conformance_checkpoints_open() {
    let models = models_dir();
    for (name, count) in EXPECTED_COUNTS {
        let dir = models.join(name);
        let m = SafetensorsModel::open(&dir).unwrap();
        assert_eq!(m.len(), count, "{name}");
        assert_eq!(m.source(), dir.join("model.safetensors"));
        // Opening the file directly gives the same tensors.
        let f = SafetensorsModel::open(&dir.join("model.safetensors")).unwrap();
        assert_eq!(f.tensor_names(), m.tensor_names());

        let mut names = m.tensor_names().to_vec();
        names.sort();
        assert_eq!(names, m.tensor_names(), "names are sorted");
        for n in m.tensor_names() {
            let t = m.tensor(n).unwrap();
            assert_eq!(t.name, n);
            assert_eq!(t.dtype, StDtype::F32);
            assert_eq!(t.data.len(), t.shape.iter().product::<usize>() * 4);
            let info = m.tensor_info(n).unwrap();
            assert_eq!(info.dtype, "F32");
            assert_eq!(info.shape, t.shape.as_slice());
            let v = to_f32(&t);
            assert_eq!(v.len(), t.numel());
            assert!(v.iter().all(|x| x.is_finite()), "{name}/{n}");
        }
        let emb = m.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(emb.shape, vec![512, 256]);
    }
    let gqa = SafetensorsModel::open(&models.join("llama-gqa-hf")).unwrap();
    assert_eq!(
        gqa.tensor("model.layers.1.self_attn.k_proj.weight")
            .unwrap()
            .shape,
        vec![128, 256]
    );
    assert!(gqa.contains("lm_head.weight"));
    let qwen = SafetensorsModel::open(&models.join("qwen2-hf")).unwrap();
    assert_eq!(
        qwen.tensor("model.layers.0.self_attn.k_proj.bias")
            .unwrap()
            .shape,
        vec![64]
    );
    assert!(!qwen.contains("lm_head.weight"));
}

#[test]
fn f16_bf16_f32_conversion() {
    let vals = [0.0f32, 1.0, -2.5, 65504.0, 1.0e-3, -0.0];
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    let f32b = f32_bytes(&vals);
    let views = vec![
        (
            "a16",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2, 3], &f16)
                .unwrap(),
        ),
        (
            "b16",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![3, 2], &bf16)
                .unwrap(),
        ),
        (
            "c32",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![6], &f32b).unwrap(),
        ),
    ];
    let bytes = safetensors::serialize(views, &None).unwrap();
    let m = SafetensorsModel::from_bytes(bytes).unwrap();
    assert_eq!(m.tensor_names(), ["a16", "b16", "c32"]);

    let a = m.tensor("a16").unwrap();
    assert_eq!(a.dtype, StDtype::F16);
    assert_eq!(a.shape, vec![2, 3]);
    let expect16: Vec<f32> = vals
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(to_f32(&a), expect16);

    let b = m.tensor("b16").unwrap();
    assert_eq!(b.dtype, StDtype::BF16);
    let expectbf: Vec<f32> = vals
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(b.to_f32(), expectbf);

    let c = m.tensor("c32").unwrap();
    assert_eq!(m.tensor_f32("c32").unwrap(), vals);
    let mut out = vec![0.0f32; 6];
    to_f32_into(&c, &mut out).unwrap();
    assert_eq!(out, vals);
    let mut short = vec![0.0f32; 5];
    assert!(matches!(
        to_f32_into(&c, &mut short),
        Err(SafetensorsError::OutputSize {
            found: 5,
            expected: 6,
            ..
        })
    ));
}

/// Name, shape and values of a tensor.
type OwnedTensor = (String, Vec<usize>, Vec<f32>);

/// Splits the llama-gqa checkpoint into three shards plus an index.
fn write_sharded(dir: &TempDir) -> (SafetensorsModel, HashMap<String, String>) {
    let src = SafetensorsModel::open(&models_dir().join("llama-gqa-hf")).unwrap();
    let mut shards: Vec<Vec<OwnedTensor>> = vec![Vec::new(); 3];
    let mut weight_map = HashMap::new();
    for (i, n) in src.tensor_names().iter().enumerate() {
        let t = src.tensor(n).unwrap();
        let k = i % 3;
        shards[k].push((n.clone(), t.shape.clone(), to_f32(&t)));
        weight_map.insert(
            n.clone(),
            format!("model-{:05}-of-00003.safetensors", k + 1),
        );
    }
    for (k, tensors) in shards.iter().enumerate() {
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        dir.write(
            &format!("model-{:05}-of-00003.safetensors", k + 1),
            &serialize_f32(&refs),
        );
    }
    write_index(dir, &weight_map);
    (src, weight_map)
}

fn write_index(dir: &TempDir, weight_map: &HashMap<String, String>) -> PathBuf {
    let index = serde_json::json!({
        "metadata": {"total_size": 123},
        "weight_map": weight_map,
    });
    dir.write(
        "model.safetensors.index.json",
        serde_json::to_string_pretty(&index).unwrap().as_bytes(),
    )
}

#[test]
fn sharded_checkpoint_matches_single_file() {
    let dir = TempDir::new("sharded");
    let (src, _) = write_sharded(&dir);
    for open_path in [
        dir.path().to_path_buf(),
        dir.path().join("model.safetensors.index.json"),
    ] {
        let m = SafetensorsModel::open(&open_path).unwrap();
        assert_eq!(m.files().count(), 3);
        assert_eq!(m.tensor_names(), src.tensor_names());
        for n in src.tensor_names() {
            let a = src.tensor(n).unwrap();
            let b = m.tensor(n).unwrap();
            assert_eq!(a.shape, b.shape);
            assert_eq!(a.data, b.data, "{n}");
        }
        let info = m.tensor_info("model.norm.weight").unwrap();
        assert!(info
            .file
            .to_string_lossy()
            .ends_with("-of-00003.safetensors"));
    }
}

#[test]
fn sharded_missing_shard() {
    let dir = TempDir::new("missing-shard");
    let (_, _) = write_sharded(&dir);
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let e = err_of_path(dir.path());
    assert!(
        matches!(&e, SafetensorsError::ShardMissing { shard, count: 7, .. } if shard == "model-00002-of-00003.safetensors"),
        "{e}"
    );
    assert_one_line(&e, "model.safetensors.index.json");
}

#[test]
fn sharded_tensor_missing_from_shard() {
    let dir = TempDir::new("missing-tensor");
    let (_, mut wm) = write_sharded(&dir);
    // Point a tensor at the wrong shard.
    let name = "model.norm.weight".to_string();
    let right = wm[&name].clone();
    let wrong = if right.contains("00001") {
        "model-00002-of-00003.safetensors"
    } else {
        "model-00001-of-00003.safetensors"
    };
    wm.insert(name.clone(), wrong.to_string());
    write_index(&dir, &wm);
    let e = err_of_path(dir.path());
    assert!(
        matches!(&e, SafetensorsError::TensorMissingFromShard { tensor, shard, found_in: Some(f), .. }
            if *tensor == name && shard == wrong && *f == right),
        "{e}"
    );
    assert_one_line(&e, "model.safetensors.index.json");

    // A mapped tensor that no shard holds at all.
    let (_, mut wm) = write_sharded(&dir);
    wm.insert(
        "model.layers.9.mlp.up_proj.weight".into(),
        "model-00001-of-00003.safetensors".into(),
    );
    write_index(&dir, &wm);
    let e = err_of_path(dir.path());
    assert!(
        matches!(&e, SafetensorsError::TensorMissingFromShard { tensor, found_in: None, .. }
            if tensor == "model.layers.9.mlp.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn sharded_duplicate_across_shards() {
    let dir = TempDir::new("dup");
    let (_, wm) = write_sharded(&dir);
    // Add a fourth shard holding a tensor that shard 1 already holds, and map
    // something to it so it is read.
    let dup = dir.write(
        "model-extra.safetensors",
        &serialize_f32(&[
            ("extra.weight", vec![2], vec![1.0, 2.0]),
            ("model.norm.weight", vec![1], vec![0.0]),
        ]),
    );
    assert!(dup.is_file());
    let mut wm2 = wm.clone();
    wm2.insert("extra.weight".into(), "model-extra.safetensors".into());
    write_index(&dir, &wm2);
    let e = err_of_path(dir.path());
    assert!(
        matches!(&e, SafetensorsError::DuplicateAcrossShards { tensor, .. } if tensor == "model.norm.weight"),
        "{e}"
    );
    assert_one_line(&e, "model.safetensors.index.json");
}

#[test]
fn sharded_unmapped_tensor_and_bad_index() {
    let dir = TempDir::new("unmapped");
    let (_, mut wm) = write_sharded(&dir);
    let removed = "model.layers.0.mlp.up_proj.weight".to_string();
    wm.remove(&removed);
    write_index(&dir, &wm);
    let e = err_of_path(dir.path());
    assert!(
        matches!(&e, SafetensorsError::UnmappedTensor { tensor, .. } if *tensor == removed),
        "{e}"
    );

    // Shard names must be plain file names.
    let (_, mut wm) = write_sharded(&dir);
    wm.insert(removed.clone(), "../outside.safetensors".into());
    write_index(&dir, &wm);
    let e = err_of_path(dir.path());
    assert!(
        matches!(&e, SafetensorsError::IndexBadShard { tensor, .. } if *tensor == removed),
        "{e}"
    );

    // No weight_map.
    dir.write("model.safetensors.index.json", br#"{"metadata": {}}"#);
    let e = err_of_path(dir.path());
    assert!(
        matches!(e, SafetensorsError::IndexNoWeightMap { .. }),
        "{e}"
    );

    // A tensor listed twice in weight_map (serde_json maps would hide this).
    dir.write(
        "model.safetensors.index.json",
        br#"{"weight_map": {"a": "model-00001-of-00003.safetensors", "a": "model-00002-of-00003.safetensors"}}"#,
    );
    let e = err_of_path(dir.path());
    assert!(
        matches!(&e, SafetensorsError::IndexDuplicateTensor { tensor, .. } if tensor == "a"),
        "{e}"
    );

    // Not JSON.
    dir.write("model.safetensors.index.json", b"{\"weight_map\": ");
    let e = err_of_path(dir.path());
    assert!(matches!(e, SafetensorsError::IndexJson { .. }), "{e}");
    assert_one_line(&e, "model.safetensors.index.json");
}

#[test]
fn no_checkpoint_in_dir_and_missing_tensor() {
    let dir = TempDir::new("empty");
    let e = err_of_path(dir.path());
    assert!(matches!(e, SafetensorsError::NoCheckpoint { .. }), "{e}");
    let e = err_of_path(&dir.path().join("nope.safetensors"));
    assert!(matches!(e, SafetensorsError::Io { .. }), "{e}");

    let m = SafetensorsModel::from_bytes(serialize_f32(&[("x", vec![1], vec![1.0])])).unwrap();
    let e = m.tensor("y").unwrap_err();
    assert!(
        matches!(&e, SafetensorsError::TensorNotFound { tensor, .. } if tensor == "y"),
        "{e}"
    );
}

// ---- corrupted and truncated single files ----

#[test]
fn truncated_header_length() {
    for len in 0..8 {
        let e = err_of(vec![0u8; len]);
        assert!(
            matches!(e, SafetensorsError::FileTooSmall { len: l, .. } if l == len as u64),
            "{e}"
        );
        assert_one_line(&e, "<memory>");
    }
    // Also through the file path (mmap is never attempted on a short file).
    let dir = TempDir::new("short");
    let p = dir.write("model.safetensors", b"\x10\0\0");
    let e = err_of_path(&p);
    assert!(
        matches!(e, SafetensorsError::FileTooSmall { len: 3, .. }),
        "{e}"
    );
    assert_one_line(&e, "model.safetensors");
}

#[test]
fn header_length_past_end_of_file() {
    let mut bytes = raw(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes[..8].copy_from_slice(&(header_len + 5).to_le_bytes());
    let e = err_of(bytes);
    assert!(
        matches!(e, SafetensorsError::HeaderPastEnd { header_len: h, available: a, .. } if h == header_len + 5 && a == header_len + 4),
        "{e}"
    );

    // A header length beyond the limit is refused before anything else.
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    let e = err_of(huge);
    assert!(
        matches!(
            e,
            SafetensorsError::HeaderTooLarge {
                header_len: u64::MAX,
                ..
            }
        ),
        "{e}"
    );
    let mut over = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
    over.extend_from_slice(b"{}");
    assert!(matches!(
        err_of(over),
        SafetensorsError::HeaderTooLarge { .. }
    ));
}

#[test]
fn truncated_conformance_file() {
    let full = std::fs::read(models_dir().join("llama-gqa-hf/model.safetensors")).unwrap();
    // Cut inside the header.
    let e = err_of(full[..1000].to_vec());
    assert!(matches!(e, SafetensorsError::HeaderPastEnd { .. }), "{e}");
    // Cut inside the data: the last tensor's end is past the data section.
    let e = err_of(full[..full.len() - 100].to_vec());
    assert!(
        matches!(e, SafetensorsError::OffsetsOutOfBounds { .. }),
        "{e}"
    );
    // Extra bytes at the end.
    let mut long = full.clone();
    long.extend_from_slice(&[0; 16]);
    let e = err_of(long);
    assert!(
        matches!(e, SafetensorsError::TrailingData { data_len, covered, .. } if data_len == covered + 16),
        "{e}"
    );
    // The intact file parses from memory too.
    assert_eq!(SafetensorsModel::from_bytes(full).unwrap().len(), 21);
}

#[test]
fn bad_header_json() {
    let e = err_of(raw(r#"{"a":{"dtype":"F32","#, &[]));
    assert!(matches!(e, SafetensorsError::HeaderJson { .. }), "{e}");
    assert_one_line(&e, "<memory>");
    // Not an object.
    let e = err_of(raw("[1, 2]", &[]));
    assert!(matches!(e, SafetensorsError::HeaderJson { .. }), "{e}");
    // Not UTF-8.
    let e = err_of(
        raw("{\"\u{e9}\":1}", &[])
            .into_iter()
            .map(|b| if b == 0xc3 { 0xff } else { b })
            .collect(),
    );
    assert!(
        matches!(e, SafetensorsError::HeaderNotUtf8 { valid_up_to: 2, .. }),
        "{e}"
    );
    // Duplicate tensor names within one header.
    let e = err_of(raw(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    ));
    assert!(
        matches!(&e, SafetensorsError::DuplicateHeaderKey { key, .. } if key == "a"),
        "{e}"
    );
    // Bad __metadata__.
    let e = err_of(raw(r#"{"__metadata__":{"format":1}}"#, &[]));
    assert!(matches!(e, SafetensorsError::BadMetadata { .. }), "{e}");
    // A good __metadata__ is accepted and is not a tensor.
    let m = SafetensorsModel::from_bytes(raw(r#"{"__metadata__":{"format":"pt"}}"#, &[])).unwrap();
    assert!(m.is_empty());
}

#[test]
fn bad_tensor_fields() {
    let cases: [(&str, &str); 6] = [
        (r#"{"t":{"shape":[1],"data_offsets":[0,4]}}"#, "dtype"),
        (r#"{"t":{"dtype":"F32","data_offsets":[0,4]}}"#, "shape"),
        (
            r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            "shape",
        ),
        (r#"{"t":{"dtype":"F32","shape":[1]}}"#, "data_offsets"),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
            "data_offsets",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0.5,4]}}"#,
            "data_offsets",
        ),
    ];
    for (header, field) in cases {
        let e = err_of(raw(header, &[0; 4]));
        assert!(
            matches!(&e, SafetensorsError::BadField { tensor, field: f, .. } if tensor == "t" && *f == field),
            "{header}: {e}"
        );
        assert_one_line(&e, "<memory>");
    }
    let e = err_of(raw(r#"{"t":[1,2]}"#, &[]));
    assert!(matches!(e, SafetensorsError::BadField { .. }), "{e}");
}

#[test]
fn offsets_out_of_bounds() {
    let e = err_of(raw(
        r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        &[0; 8],
    ));
    assert!(
        matches!(&e, SafetensorsError::OffsetsOutOfBounds { tensor, end: 16, data_len: 8, .. } if tensor == "w"),
        "{e}"
    );
    assert_one_line(&e, "`w`");
    // Offsets that would overflow when made absolute.
    let e = err_of(raw(
        &format!(
            r#"{{"w":{{"dtype":"U8","shape":[2],"data_offsets":[{},{}]}}}}"#,
            u64::MAX - 1,
            u64::MAX
        ),
        &[0; 2],
    ));
    assert!(
        matches!(e, SafetensorsError::OffsetsOutOfBounds { .. }),
        "{e}"
    );
    let e = err_of(raw(
        r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#,
        &[0; 8],
    ));
    assert!(
        matches!(
            e,
            SafetensorsError::ReversedOffsets {
                begin: 8,
                end: 4,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn dtype_size_mismatch() {
    let e = err_of(raw(
        r#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,24]}}"#,
        &[0; 24],
    ));
    assert!(
        matches!(&e, SafetensorsError::SizeMismatch { tensor, dtype: "F16", expected: 12, found: 24, .. } if tensor == "w"),
        "{e}"
    );
    assert!(e.to_string().contains("needs 12 bytes"), "{e}");
}

#[test]
fn shape_overflow() {
    let e = err_of(raw(
        r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
        &[0; 4],
    ));
    assert!(
        matches!(&e, SafetensorsError::ShapeOverflow { tensor, .. } if tensor == "w"),
        "{e}"
    );
    // The product fits but times the dtype size does not.
    let e = err_of(raw(
        &format!(
            r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,4]}}}}"#,
            usize::MAX / 2
        ),
        &[0; 4],
    ));
    assert!(matches!(e, SafetensorsError::ShapeOverflow { .. }), "{e}");
}

#[test]
fn gaps_and_overlaps() {
    let e = err_of(raw(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
        &[0; 12],
    ));
    assert!(
        matches!(&e, SafetensorsError::NonContiguous { tensor, found: 8, expected: 4, .. } if tensor == "b"),
        "{e}"
    );
    let e = err_of(raw(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    ));
    assert!(
        matches!(
            e,
            SafetensorsError::NonContiguous {
                found: 4,
                expected: 8,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_and_unsupported_dtypes() {
    let e = err_of(raw(
        r#"{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
        &[0; 1],
    ));
    assert!(
        matches!(&e, SafetensorsError::UnknownDtype { tensor, dtype, .. } if tensor == "w" && dtype == "F4"),
        "{e}"
    );
    // An I8 tensor: the file opens, but the tensor cannot be viewed as floats.
    let m = SafetensorsModel::from_bytes(raw(
        r#"{"q":{"dtype":"I8","shape":[2,2],"data_offsets":[0,4]},"s":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[1, 2, 3, 4, 0, 0, 128, 63],
    ))
    .unwrap();
    assert_eq!(m.tensor_info("q").unwrap().dtype, "I8");
    let e = m.tensor("q").unwrap_err();
    assert!(
        matches!(&e, SafetensorsError::UnsupportedDtype { tensor, dtype: "I8", .. } if tensor == "q"),
        "{e}"
    );
    assert_one_line(&e, "`q`");
    assert_eq!(m.tensor_f32("s").unwrap(), vec![1.0]);
}

#[test]
fn zero_sized_tensors() {
    let m = SafetensorsModel::from_bytes(raw(
        r#"{"e":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]},"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}}"#,
        &[0x80, 0x3f],
    ))
    .unwrap();
    assert_eq!(m.tensor_f32("e").unwrap(), Vec::<f32>::new());
    // A 0-d tensor holds one element.
    assert_eq!(m.tensor_f32("s").unwrap(), vec![1.0]);
}

/// Random corruption of a valid file must yield Ok or a typed error, never a
/// panic (a cheap, always-run complement to the cargo-fuzz target).
#[test]
fn random_mutations_never_panic() {
    let base = serialize_f32(&[
        ("a", vec![2, 3], vec![1.0; 6]),
        ("b", vec![4], vec![2.0; 4]),
    ]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5afe);
    for _ in 0..3000 {
        let mut bytes = base.clone();
        match rng.gen_range(0..4) {
            0 => {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
            1 => bytes.truncate(rng.gen_range(0..bytes.len())),
            2 => {
                let i = rng.gen_range(8..bytes.len());
                bytes[i] = *b"{}[],:\"0123456789-e.ab"
                    .get(rng.gen_range(0..22))
                    .unwrap();
            }
            _ => {
                let n: u64 = rng.gen_range(0..200);
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
        match SafetensorsModel::from_bytes(bytes) {
            Ok(m) => {
                for n in m.tensor_names() {
                    if let Ok(t) = m.tensor(n) {
                        assert_eq!(to_f32(&t).len(), t.numel());
                    }
                }
            }
            Err(e) => {
                // graft's checks and the crate's parser must agree.
                assert!(
                    !matches!(e, SafetensorsError::ParserDisagreement { .. }),
                    "{e}"
                );
                assert!(!e.to_string().contains('\n'), "{e}");
                if std::env::var_os("GRAFT_SHOW_ERRORS").is_some() {
                    eprintln!("{e}");
                }
            }
        }
    }
}
