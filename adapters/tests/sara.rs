//! SaRA files: applying one equals adding its dense delta to the base weights; save/load
//! round trip is exact; truncated and corrupted files give errors, never panics.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use graft_adapters::delta::{f32_weight, projection_shape};
use graft_adapters::sara::{self, SaraMeta};
use graft_adapters::{Adapter, AdapterFormat, LoraDelta, SparseDelta, TensorDelta};
use graft_runtime::model::{Model, ModelConfig, Proj};
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};

fn model_path() -> PathBuf {
    common::conformance().join("models/llama-gqa-F32.gguf")
}

fn load_model() -> Model {
    Model::load_gguf(&model_path()).expect("load llama-gqa-F32")
}

/// A fresh file path in a directory of its own (common::temp_dir clears it).
fn tmp_path(name: &str) -> PathBuf {
    common::temp_dir(&format!("sara-{name}")).join(name)
}

const TOKENS: [u32; 12] = [
    1, 15043, 29892, 920, 526, 366, 29973, 306, 626, 2691, 29889, 13,
];

fn tokens(model: &Model) -> Vec<u32> {
    // Token ids valid for the suite's 512-piece vocabulary.
    TOKENS
        .iter()
        .map(|&t| t % model.config.n_vocab as u32)
        .collect()
}

/// A SaRA-style delta on `model`: the entries with |W0| < theta get random values.
fn sara_adapter(model: &Model, theta: f32, alpha: f32, seed: u64) -> Adapter {
    let c = &model.config;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut a = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let targets: Vec<(usize, Proj)> = Proj::ALL
        .iter()
        .map(|&p| (0, p))
        .chain([(1, Proj::Q), (1, Proj::V), (1, Proj::Down)])
        .collect();
    for (layer, proj) in targets {
        let w = model.layers[layer].proj(proj).to_f32().unwrap();
        let (rows, cols) = projection_shape(c, proj);
        assert_eq!(w.len(), rows * cols);
        let mut idx = Vec::new();
        let mut val = Vec::new();
        for (i, &x) in w.iter().enumerate() {
            if x.abs() < theta {
                idx.push(i as u32);
                val.push(rng.gen_range(-0.08f32..0.08));
            }
        }
        assert!(!idx.is_empty(), "theta {theta} selects nothing in {proj}");
        let s = SparseDelta::from_flat(rows, cols, &idx, &val, alpha).unwrap();
        a.insert(c, layer, proj, TensorDelta::Sparse(s)).unwrap();
    }
    a
}

/// `model` with `W += alpha * delta` written into its F32 weights.
fn merged_model(adapter: &Adapter) -> Model {
    let mut m = load_model();
    for (layer, proj, d) in adapter.iter() {
        let w = m.layers[layer].proj_mut(proj);
        let mut vals = w.to_f32().unwrap();
        for (v, dv) in vals.iter_mut().zip(d.dense().unwrap()) {
            *v += dv;
        }
        *w = f32_weight(w.rows, w.cols, &vals).unwrap();
    }
    m
}

fn max_rel(reference: &[f32], ours: &[f32]) -> f32 {
    assert_eq!(reference.len(), ours.len());
    let max_ref = reference.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let max_err = reference
        .iter()
        .zip(ours)
        .fold(0f32, |a, (&r, &o)| a.max((r - o).abs()));
    max_err / max_ref
}

#[test]
fn applying_a_sara_file_equals_merging_its_dense_delta() {
    let model = load_model();
    let alpha = 0.75;
    let built = sara_adapter(&model, 0.01, alpha, 7);
    let path = tmp_path("equiv.safetensors");
    let mut meta = SaraMeta::new(model.config.arch);
    meta.theta = Some(0.01);
    meta.alpha = alpha;
    sara::save(&built, &meta, &path).unwrap();
    let loaded = sara::load(&path, &model).unwrap();
    assert_eq!(loaded.format, AdapterFormat::Sara);
    assert_eq!(loaded.len(), built.len());

    let toks = tokens(&model);
    let base = common::logits_all(&model, &toks);
    let with_sara = common::logits_all_with(&model, &toks, Some(&loaded));
    let merged = merged_model(&loaded);
    let reference = common::logits_all(&merged, &toks);
    let rel = max_rel(&reference, &with_sara);
    assert!(
        rel <= 1e-5,
        "SaRA adapter vs merged weights: rel err {rel:e}"
    );
    // The delta is not a no-op.
    let moved = max_rel(&base, &with_sara);
    eprintln!(
        "{} deltas, {} entries: rel err {rel:.2e} vs merged weights, {moved:.2e} vs base",
        loaded.len(),
        loaded
            .iter()
            .map(|(_, _, d)| match d {
                TensorDelta::Sparse(s) => s.values.len(),
                TensorDelta::Lora(_) | TensorDelta::Dense(_) => 0,
            })
            .sum::<usize>()
    );
    assert!(moved > 1e-3, "delta barely changes the logits ({moved:e})");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn alpha_zero_gives_the_base() {
    let model = load_model();
    let a = sara_adapter(&model, 0.01, 1.0, 3);
    let meta = SaraMeta {
        alpha: 0.0,
        ..SaraMeta::new(model.config.arch)
    };
    // Rebuild with scale 0 (save insists the deltas' scale is the file's alpha).
    let mut zero = Adapter::new(AdapterFormat::Memory, PathBuf::new(), model.config.n_layer);
    for (l, p, d) in a.iter() {
        let TensorDelta::Sparse(s) = d else { panic!() };
        let mut s = s.clone();
        s.scale = 0.0;
        zero.insert(&model.config, l, p, TensorDelta::Sparse(s))
            .unwrap();
    }
    let bytes = sara::to_bytes(&zero, &meta, "zero").unwrap();
    let loaded = sara::from_bytes(&bytes, "zero", &model.config).unwrap();
    let toks = tokens(&model);
    let base = common::logits_all(&model, &toks);
    let with = common::logits_all_with(&model, &toks, Some(&loaded));
    assert_eq!(base, with);
}

#[test]
fn round_trip_is_bit_exact() {
    let model = load_model();
    let built = sara_adapter(&model, 0.02, 1.25, 11);
    let meta = SaraMeta {
        architecture: "llama".into(),
        theta: Some(0.02),
        alpha: 1.25,
    };
    let path = tmp_path("roundtrip.safetensors");
    sara::save(&built, &meta, &path).unwrap();
    let (loaded, lmeta) = sara::load_with_meta(&path, &model.config).unwrap();
    assert_eq!(lmeta, meta);
    assert_eq!(loaded.len(), built.len());
    for (l, p, d) in built.iter() {
        let (TensorDelta::Sparse(a), Some(TensorDelta::Sparse(b))) = (d, loaded.get(l, p)) else {
            panic!("{p} of layer {l} missing or not sparse after load");
        };
        assert_eq!(a.flat_indices(), b.flat_indices());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.values), bits(&b.values));
        assert_eq!(a.scale.to_bits(), b.scale.to_bits());
        assert_eq!(a, b);
    }
    // Saving what was loaded gives the same bytes.
    let again = sara::to_bytes(&loaded, &lmeta, "again").unwrap();
    assert_eq!(again, std::fs::read(&path).unwrap());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn from_dense_keeps_exactly_the_nonzeros() {
    let dense = [0.0, 1.5, 0.0, -0.0, -2.0, 0.0];
    let s = sara::from_dense(2, 3, &dense, 0.5).unwrap();
    assert_eq!(s.flat_indices(), vec![1, 4]);
    assert_eq!(s.values, vec![1.5, -2.0]);
    assert_eq!(s.dense(), vec![0.0, 0.75, 0.0, 0.0, -1.0, 0.0]);
    assert!(sara::from_dense(2, 3, &dense[..5], 1.0).is_err());
}

#[test]
fn save_refuses_what_the_format_cannot_hold() {
    let model = load_model();
    let c = &model.config;
    let (rows, cols) = projection_shape(c, Proj::Q);
    let meta = SaraMeta::new(c.arch);

    let mut lora = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let l = LoraDelta {
        a: f32_weight(1, cols, &vec![0.1; cols]).unwrap(),
        b: f32_weight(rows, 1, &vec![0.1; rows]).unwrap(),
        scale: 1.0,
        dora_factor: None,
    };
    lora.insert(c, 0, Proj::Q, TensorDelta::Lora(l)).unwrap();
    let e = sara::to_bytes(&lora, &meta, "f").unwrap_err().to_string();
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("sparse"),
        "{e}"
    );

    let mut scaled = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let s = SparseDelta::from_flat(rows, cols, &[3], &[1.0], 0.5).unwrap();
    scaled
        .insert(c, 0, Proj::Q, TensorDelta::Sparse(s))
        .unwrap();
    let e = sara::to_bytes(&scaled, &meta, "f").unwrap_err().to_string();
    assert!(e.contains("scale 0.5") && e.contains("alpha 1"), "{e}");

    let mut nan = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let s = SparseDelta::from_flat(rows, cols, &[3], &[f32::NAN], 1.0).unwrap();
    nan.insert(c, 0, Proj::Q, TensorDelta::Sparse(s)).unwrap();
    assert!(sara::to_bytes(&nan, &meta, "f").is_err());

    // A hand-built CSR whose row pointers run past its columns.
    let mut broken = Adapter::new(AdapterFormat::Memory, PathBuf::new(), c.n_layer);
    let mut s = SparseDelta::from_flat(rows, cols, &[3, 4], &[1.0, 2.0], 1.0).unwrap();
    s.row_ptr[1] = 5;
    broken
        .insert(c, 0, Proj::Q, TensorDelta::Sparse(s))
        .unwrap();
    assert!(sara::to_bytes(&broken, &meta, "f").is_err());

    let bad_arch = SaraMeta {
        architecture: "gpt2".into(),
        ..meta
    };
    assert!(sara::to_bytes(&scaled, &bad_arch, "f").is_err());
}

// ---- Hand-written files -------------------------------------------------------------

/// A safetensors file built tensor by tensor, so tests can corrupt any part.
#[derive(Clone)]
struct Spec {
    meta: HashMap<String, String>,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const Q: &str = "blk.0.attn_q.weight";
const K1: &str = "blk.1.attn_k.weight";

impl Spec {
    /// Layer 0 Q (256x256) with 3 entries, layer 1 K (128x256) with 2.
    fn good() -> Spec {
        let meta = [
            ("format", "graft-sara"),
            ("version", "1"),
            ("architecture", "llama"),
            ("theta", "0.002"),
            ("alpha", "1"),
            ("blk.0.attn_q.weight.shape", "256,256"),
            ("blk.1.attn_k.weight.shape", "128,256"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Spec {
            meta,
            tensors: vec![
                (
                    format!("{Q}.sara_idx"),
                    Dtype::U32,
                    vec![3],
                    u32s(&[1, 300, 65535]),
                ),
                (
                    format!("{Q}.sara_val"),
                    Dtype::F32,
                    vec![3],
                    f32s(&[0.5, -0.25, 1.0]),
                ),
                (
                    format!("{K1}.sara_idx"),
                    Dtype::U32,
                    vec![2],
                    u32s(&[0, 32767]),
                ),
                (
                    format!("{K1}.sara_val"),
                    Dtype::F32,
                    vec![2],
                    f32s(&[2.0, -3.0]),
                ),
            ],
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, &Some(self.meta.clone())).unwrap()
    }
}

fn config() -> ModelConfig {
    load_model().config
}

#[test]
fn hand_written_file_loads_as_written() {
    let c = config();
    let a = sara::from_bytes(&Spec::good().bytes(), "good", &c).unwrap();
    assert_eq!(a.len(), 2);
    let Some(TensorDelta::Sparse(q)) = a.get(0, Proj::Q) else {
        panic!("no Q delta")
    };
    assert_eq!((q.rows, q.cols), (256, 256));
    assert_eq!(q.flat_indices(), vec![1, 300, 65535]);
    assert_eq!(q.values, vec![0.5, -0.25, 1.0]);
    let d = q.dense();
    assert_eq!((d[1], d[300], d[65535], d[2]), (0.5, -0.25, 1.0, 0.0));
    let Some(TensorDelta::Sparse(k)) = a.get(1, Proj::K) else {
        panic!("no K delta")
    };
    assert_eq!(k.flat_indices(), vec![0, 32767]);
    // alpha defaults to 1 when absent; an explicit one becomes the scale.
    let mut s = Spec::good();
    s.meta.remove("alpha");
    let (_, m) = sara::from_bytes_with_meta(&s.bytes(), "f", &c).unwrap();
    assert_eq!(m.alpha, 1.0);
    s.meta.insert("alpha".into(), "0.25".into());
    let a = sara::from_bytes(&s.bytes(), "f", &c).unwrap();
    let Some(TensorDelta::Sparse(q)) = a.get(0, Proj::Q) else {
        panic!()
    };
    assert_eq!(q.scale, 0.25);
}

#[test]
fn every_truncation_is_an_error() {
    let c = config();
    let bytes = Spec::good().bytes();
    sara::from_bytes(&bytes, "full", &c).unwrap();
    for len in 0..bytes.len() {
        let r = sara::from_bytes(&bytes[..len], "cut", &c);
        let e = r
            .err()
            .unwrap_or_else(|| panic!("truncated to {len} bytes loaded"));
        assert!(e.to_string().starts_with("cut: "), "{e}");
    }
    // And trailing garbage.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    assert!(sara::from_bytes(&longer, "long", &c).is_err());
}

/// Each corruption must fail with a message holding every `needles` string.
fn expect_error(name: &str, spec: &Spec, needles: &[&str]) {
    let c = config();
    let e = match sara::from_bytes(&spec.bytes(), "bad.safetensors", &c) {
        Ok(_) => panic!("{name}: corrupted file loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.starts_with("bad.safetensors: "), "{name}: {e}");
    for n in needles {
        assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
    }
}

#[test]
fn corrupted_files_name_the_problem() {
    let q_idx = format!("{Q}.sara_idx");
    let q_val = format!("{Q}.sara_val");
    type Corrupt = Box<dyn Fn(&mut Spec)>;
    let cases: Vec<(&str, Corrupt, Vec<&str>)> = vec![
        (
            "wrong arch",
            Box::new(|s| {
                s.meta.insert("architecture".into(), "qwen2".into());
            }),
            vec!["architecture", "qwen2", "\"llama\""],
        ),
        (
            "no format",
            Box::new(|s| {
                s.meta.remove("format");
            }),
            vec!["format", "graft-sara"],
        ),
        (
            "no metadata",
            Box::new(|s| s.meta.clear()),
            vec!["format", "graft-sara"],
        ),
        (
            "version 2",
            Box::new(|s| {
                s.meta.insert("version".into(), "2".into());
            }),
            vec!["version", "\"2\"", "\"1\""],
        ),
        (
            "bad alpha",
            Box::new(|s| {
                s.meta.insert("alpha".into(), "lots".into());
            }),
            vec!["alpha", "lots", "finite"],
        ),
        (
            "infinite alpha",
            Box::new(|s| {
                s.meta.insert("alpha".into(), "inf".into());
            }),
            vec!["alpha", "finite"],
        ),
        (
            "negative theta",
            Box::new(|s| {
                s.meta.insert("theta".into(), "-1".into());
            }),
            vec!["theta", ">= 0"],
        ),
        (
            "idx as I32",
            Box::new(|s| s.tensors[0].1 = Dtype::I32),
            vec![&q_idx, "I32", "expected U32"],
        ),
        (
            "val as F16",
            Box::new(|s| {
                let t = &mut s.tensors[1];
                t.1 = Dtype::F16;
                t.3.truncate(6);
            }),
            vec![&q_val, "F16", "expected F32"],
        ),
        (
            "unsorted index",
            Box::new(|s| s.tensors[0].3 = u32s(&[300, 1, 65535])),
            vec![&q_idx, "index 1 is 1", "above the previous"],
        ),
        (
            "repeated index",
            Box::new(|s| s.tensors[0].3 = u32s(&[1, 1, 65535])),
            vec![&q_idx, "index 1 is 1", "above the previous"],
        ),
        (
            "out-of-range index",
            Box::new(|s| s.tensors[0].3 = u32s(&[1, 300, 65536])),
            vec![&q_idx, "65536", "below 65536"],
        ),
        (
            "length mismatch",
            Box::new(|s| {
                let t = &mut s.tensors[1];
                t.2 = vec![2];
                t.3 = f32s(&[0.5, -0.25]);
            }),
            vec![&q_val, "2 values", "expected 3"],
        ),
        (
            "2-D index tensor",
            Box::new(|s| s.tensors[0].2 = vec![3, 1]),
            vec![&q_idx, "[3, 1]", "one dimension"],
        ),
        (
            "wrong shape metadata",
            Box::new(|s| {
                s.meta.insert(format!("{Q}.shape"), "256,512".into());
            }),
            vec![Q, "[256, 512]", "[256, 256]"],
        ),
        (
            "transposed K shape",
            Box::new(|s| {
                s.meta.insert(format!("{K1}.shape"), "256,128".into());
            }),
            vec![K1, "[256, 128]", "[128, 256]"],
        ),
        (
            "unparsable shape",
            Box::new(|s| {
                s.meta.insert(format!("{Q}.shape"), "256x256".into());
            }),
            vec![Q, "256x256", "\"256,256\""],
        ),
        (
            "missing shape",
            Box::new(|s| {
                s.meta.remove(&format!("{Q}.shape"));
            }),
            vec![Q, "missing", "\"256,256\""],
        ),
        (
            "stray shape key",
            Box::new(|s| {
                s.meta
                    .insert("blk.0.ffn_up.weight.shape".into(), "512,256".into());
            }),
            vec!["blk.0.ffn_up.weight.shape", "no tensor pair"],
        ),
        (
            "missing value tensor",
            Box::new(|s| {
                s.tensors
                    .retain(|t| !t.0.ends_with("attn_q.weight.sara_val"))
            }),
            vec![&q_val, "missing"],
        ),
        (
            "unknown tensor",
            Box::new(|s| {
                s.tensors
                    .push(("lm_head.bias".into(), Dtype::F32, vec![1], f32s(&[1.0])))
            }),
            vec!["lm_head.bias", "unexpected tensor"],
        ),
        (
            "not a projection",
            Box::new(|s| {
                s.tensors.push((
                    "blk.0.attn_norm.weight.sara_idx".into(),
                    Dtype::U32,
                    vec![1],
                    u32s(&[0]),
                ))
            }),
            vec!["blk.0.attn_norm.weight.sara_idx", "base projection"],
        ),
        (
            "non-canonical layer number",
            Box::new(|s| {
                for t in &mut s.tensors {
                    t.0 = t.0.replace("blk.1.", "blk.01.");
                }
                let v = s.meta.remove(&format!("{K1}.shape")).unwrap();
                s.meta.insert("blk.01.attn_k.weight.shape".into(), v);
            }),
            vec!["blk.01.attn_k.weight", "base projection"],
        ),
        (
            "layer beyond the base",
            Box::new(|s| {
                for t in &mut s.tensors {
                    t.0 = t.0.replace("blk.1.", "blk.2.");
                }
                let v = s.meta.remove(&format!("{K1}.shape")).unwrap();
                s.meta.insert("blk.2.attn_k.weight.shape".into(), v);
            }),
            vec![
                "blk.2.attn_k.weight",
                "layer 2",
                "below the base's 2 layers",
            ],
        ),
        (
            "NaN value",
            Box::new(|s| s.tensors[1].3 = f32s(&[0.5, f32::NAN, 1.0])),
            vec![&q_val, "value 1 is NaN", "finite"],
        ),
    ];
    for (name, corrupt, needles) in &cases {
        let mut s = Spec::good();
        corrupt(&mut s);
        expect_error(name, &s, needles);
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Every single-byte change of a small file either loads or errors.
    let c = config();
    let bytes = Spec::good().bytes();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for pos in 0..bytes.len() {
        for _ in 0..4 {
            let mut b = bytes.clone();
            b[pos] = rng.gen();
            let _ = sara::from_bytes(&b, "flip", &c);
        }
    }
    // Header lengths near the limits.
    for n in [u64::MAX, u64::MAX - 7, 1 << 40, bytes.len() as u64] {
        let mut b = bytes.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        assert!(sara::from_bytes(&b, "len", &c).is_err());
    }
}
