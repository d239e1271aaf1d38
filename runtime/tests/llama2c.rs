//! llama2.c checkpoints: a conformance model written in both llama2.c layouts loads
//! back with bit-identical logits; a checkpoint built here from the spec (independently
//! of the writer) puts every array where run.c reads it; header corruption gives the
//! specific typed error; models llama2.c cannot express are refused.

mod common;

use std::path::PathBuf;

use common::*;
use graft_quant::GgmlType;
use graft_runtime::model::{
    is_llama2c_path, llama2c_to_bytes, write_llama2c, Llama2cError, Llama2cVersion, Model,
    ModelError, RopeScaling, RopeStyle,
};

const MAGIC: u32 = 0x616b_3432;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("graft-llama2c-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn suite_model(name: &str) -> Model {
    let path = conformance().join("models").join(name);
    Model::load(&path, None).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn set_i32(b: &mut [u8], at: usize, v: i32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Asserts identical logits (bit for bit) at every position of `tokens`.
fn assert_same_logits(a: &Model, b: &Model, tokens: &[u32], what: &str) {
    let (la, lb) = (logits_all(a, tokens), logits_all(b, tokens));
    assert_eq!(la.len(), tokens.len() * a.config.n_vocab, "{what}");
    if bits(&la) != bits(&lb) {
        let first = la
            .iter()
            .zip(&lb)
            .position(|(x, y)| x.to_bits() != y.to_bits())
            .unwrap();
        panic!(
            "{what}: logits differ first at position {} token {}: {} vs {}",
            first / a.config.n_vocab,
            first % a.config.n_vocab,
            la[first],
            lb[first]
        );
    }
}

/// Bytes of a checkpoint with these sizes (from formats.md section 6, not from the
/// writer): legacy header `dim, hidden, n_layers, n_heads, n_kv_heads, vocab_size,
/// seq_len` or v1 header; array sizes in floats.
#[derive(Clone, Copy)]
struct Dims {
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq: usize,
}

const TINY: Dims = Dims {
    dim: 8,
    hidden: 12,
    layers: 2,
    heads: 2,
    kv_heads: 1,
    vocab: 5,
    seq: 3,
};

impl Dims {
    fn head_size(&self) -> usize {
        self.dim / self.heads
    }
    fn kv_dim(&self) -> usize {
        self.head_size() * self.kv_heads
    }
    /// (name, floats) of each array in the spec's file order.
    fn arrays(&self, version: Llama2cVersion, shared: bool) -> Vec<(&'static str, usize)> {
        let (d, h, l, kv, v) = (
            self.dim,
            self.hidden,
            self.layers,
            self.kv_dim(),
            self.vocab,
        );
        let mut a = match version {
            Llama2cVersion::Legacy => vec![
                ("token_embedding", v * d),
                ("rms_att", l * d),
                ("wq", l * d * d),
                ("wk", l * kv * d),
                ("wv", l * kv * d),
                ("wo", l * d * d),
                ("rms_ffn", l * d),
                ("w1", l * h * d),
                ("w2", l * d * h),
                ("w3", l * h * d),
                ("rms_final", d),
                ("freq_cis_real", self.seq * self.head_size() / 2),
                ("freq_cis_imag", self.seq * self.head_size() / 2),
            ],
            Llama2cVersion::V1 => vec![
                ("rms_att", l * d),
                ("rms_ffn", l * d),
                ("rms_final", d),
                ("token_embedding", v * d),
                ("wq", l * d * d),
                ("wk", l * kv * d),
                ("wv", l * kv * d),
                ("wo", l * d * d),
                ("w1", l * h * d),
                ("w2", l * d * h),
                ("w3", l * h * d),
            ],
        };
        if !shared {
            a.push(("wcls", v * d));
        }
        a
    }

    /// A checkpoint whose every value says which array and element it is; returns the
    /// bytes and each array's values.
    fn build(
        &self,
        version: Llama2cVersion,
        shared: bool,
    ) -> (Vec<u8>, Vec<(&'static str, Vec<f32>)>) {
        let vocab = if version == Llama2cVersion::Legacy && !shared {
            -(self.vocab as i32)
        } else {
            self.vocab as i32
        };
        let params = [
            self.dim as i32,
            self.hidden as i32,
            self.layers as i32,
            self.heads as i32,
            self.kv_heads as i32,
            vocab,
            self.seq as i32,
        ];
        let mut out = Vec::new();
        if version == Llama2cVersion::V1 {
            out.extend(MAGIC.to_le_bytes());
            out.extend(1i32.to_le_bytes());
        }
        for p in params {
            out.extend(p.to_le_bytes());
        }
        if version == Llama2cVersion::V1 {
            out.push(u8::from(shared));
            out.resize(256, 0);
        }
        let mut arrays = Vec::new();
        for (id, (name, n)) in self.arrays(version, shared).into_iter().enumerate() {
            let values: Vec<f32> = (0..n)
                .map(|k| ((id + 1) * 1000 + k) as f32 * 0.001)
                .collect();
            for v in &values {
                out.extend(v.to_le_bytes());
            }
            arrays.push((name, values));
        }
        (out, arrays)
    }
}

fn array<'a>(arrays: &'a [(&str, Vec<f32>)], name: &str) -> &'a [f32] {
    &arrays.iter().find(|(n, _)| *n == name).unwrap().1
}

/// Layer `i`'s part of an `[L, ...]` array.
fn layer_part<'a>(
    arrays: &'a [(&str, Vec<f32>)],
    name: &str,
    layers: usize,
    i: usize,
) -> &'a [f32] {
    let a = array(arrays, name);
    let n = a.len() / layers;
    &a[i * n..(i + 1) * n]
}

#[test]
fn every_array_lands_where_run_c_reads_it() {
    let t = TINY;
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        for shared in [false, true] {
            let what = format!("{version:?} shared={shared}");
            let (bytes, arrays) = t.build(version, shared);
            let m = Model::llama2c_from_bytes(bytes.clone(), "tiny.bin")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let c = &m.config;
            assert_eq!(
                (
                    c.n_embd,
                    c.n_ff,
                    c.n_layer,
                    c.n_head,
                    c.n_head_kv,
                    c.n_vocab
                ),
                (t.dim, t.hidden, t.layers, t.heads, t.kv_heads, t.vocab),
                "{what}"
            );
            assert_eq!(
                (c.head_dim, c.n_rot, c.n_ctx_train),
                (4, 4, t.seq),
                "{what}"
            );
            assert_eq!(c.rope_style, RopeStyle::Normal);
            assert_eq!(c.rope_base, 10000.0);
            assert_eq!(c.rms_eps, 1e-5);
            assert_eq!(c.rope_scaling, RopeScaling::None);
            let f = |w: &graft_runtime::model::Weight| w.to_f32().unwrap();
            assert_eq!(
                f(&m.token_embd),
                array(&arrays, "token_embedding"),
                "{what}"
            );
            assert_eq!(m.output_norm, array(&arrays, "rms_final"), "{what}");
            let wcls = if shared { "token_embedding" } else { "wcls" };
            assert_eq!(f(&m.output), array(&arrays, wcls), "{what}");
            for (i, l) in m.layers.iter().enumerate() {
                let part = |name| layer_part(&arrays, name, t.layers, i);
                assert_eq!(l.attn_norm, part("rms_att"), "{what} layer {i}");
                assert_eq!(f(&l.wq), part("wq"), "{what} layer {i}");
                assert_eq!(f(&l.wk), part("wk"), "{what} layer {i}");
                assert_eq!(f(&l.wv), part("wv"), "{what} layer {i}");
                assert_eq!(f(&l.wo), part("wo"), "{what} layer {i}");
                assert_eq!(l.ffn_norm, part("rms_ffn"), "{what} layer {i}");
                assert_eq!(f(&l.w_gate), part("w1"), "{what} layer {i}");
                assert_eq!(f(&l.w_down), part("w2"), "{what} layer {i}");
                assert_eq!(f(&l.w_up), part("w3"), "{what} layer {i}");
                assert!(l.bq.is_none() && l.bk.is_none() && l.bv.is_none());
                assert_eq!((l.wq.rows, l.wq.cols), (t.dim, t.dim));
                assert_eq!((l.wk.rows, l.wk.cols), (t.kv_dim(), t.dim));
                assert_eq!((l.w_down.rows, l.w_down.cols), (t.dim, t.hidden));
            }
            // It runs.
            let logits = logits_all(&m, &[0, 4, 2]);
            assert!(logits.iter().all(|v| v.is_finite()), "{what}");

            // The writer reproduces the file, except the legacy freq_cis tables
            // (unused by run.c), which it writes as zeros.
            let mut expected = bytes.clone();
            if version == Llama2cVersion::Legacy {
                let freq = 2 * t.seq * t.head_size() / 2 * 4;
                let end = expected.len() - if shared { 0 } else { t.vocab * t.dim * 4 };
                expected[end - freq..end].fill(0);
            }
            let written = llama2c_to_bytes(&m, version).unwrap();
            assert!(written == expected, "{what}: writer output differs");
        }
    }
}

#[test]
fn conformance_model_round_trips_with_identical_logits() {
    let case = load_cases()
        .into_iter()
        .find(|c| c.adapters.is_empty() && c.model.ends_with("models/llama-gqa-F32.gguf"))
        .expect("base case for llama-gqa-F32.gguf");
    let reference = Model::load(&case.model, None).unwrap();
    let rc = reference.config.clone();
    assert_eq!((rc.rope_base, rc.rms_eps), (10000.0, 1e-5));
    assert_eq!(rc.rope_style, RopeStyle::Normal);
    assert!(rc.n_head_kv < rc.n_head, "llama-gqa is GQA");
    assert!(!case.seqs.is_empty());

    let dir = temp_dir("roundtrip");
    for (version, file) in [
        (Llama2cVersion::Legacy, "llama-gqa-legacy.bin"),
        (Llama2cVersion::V1, "llama-gqa-v1.bin"),
    ] {
        let path = dir.join(file);
        write_llama2c(&reference, &path, version).unwrap();
        let bytes = std::fs::read(&path).unwrap();

        // Header and size as formats.md describes them.
        let d = Dims {
            dim: rc.n_embd,
            hidden: rc.n_ff,
            layers: rc.n_layer,
            heads: rc.n_head,
            kv_heads: rc.n_head_kv,
            vocab: rc.n_vocab,
            seq: rc.n_ctx_train,
        };
        let floats: usize = d.arrays(version, false).iter().map(|a| a.1).sum();
        let (params_at, header_len) = match version {
            Llama2cVersion::Legacy => (0, 28),
            Llama2cVersion::V1 => {
                assert_eq!(u32::from_le_bytes(bytes[0..4].try_into().unwrap()), MAGIC);
                assert_eq!(i32_at(&bytes, 4), 1);
                assert_eq!(bytes[36], 0, "shared_classifier");
                assert!(bytes[37..256].iter().all(|&b| b == 0), "padding");
                (8, 256)
            }
        };
        assert_eq!(bytes.len(), header_len + 4 * floats, "{file} size");
        let vocab = if version == Llama2cVersion::Legacy {
            -(d.vocab as i32)
        } else {
            d.vocab as i32
        };
        let want = [
            d.dim as i32,
            d.hidden as i32,
            d.layers as i32,
            d.heads as i32,
            d.kv_heads as i32,
            vocab,
            d.seq as i32,
        ];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(
                i32_at(&bytes, params_at + 4 * i),
                *w,
                "{file} header int {i}"
            );
        }

        // Load through the generic entry point (the .bin hook) and explicitly.
        assert!(is_llama2c_path(&path));
        let loaded = Model::load(&path, None).unwrap();
        let explicit = Model::load_llama2c(&path).unwrap();
        assert_eq!(loaded.config, rc, "{file}");
        assert_eq!(explicit.config, rc, "{file}");
        assert!(loaded.gguf.is_none());
        assert_eq!(loaded.token_embd.ty, GgmlType::F32);

        for (i, (tokens, _)) in case.seqs.iter().enumerate() {
            assert_same_logits(&reference, &loaded, tokens, &format!("{file} seq{i}"));
        }
        for g in &case.greedy {
            assert_same_logits(
                &reference,
                &explicit,
                &g.prompt_ids,
                &format!("{file} {:?}", g.prompt),
            );
        }
        eprintln!(
            "{file}: {} bytes, logits bit-identical to the GGUF model on {} sequences and {} prompts",
            bytes.len(),
            case.seqs.len(),
            case.greedy.len()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shared_classifier_round_trips() {
    let mut m = suite_model("llama-gqa-F32.gguf");
    m.output = m.token_embd.clone();
    let tokens: Vec<u32> = (0..40)
        .map(|i| (i * 37 + 5) % m.config.n_vocab as u32)
        .collect();
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        let bytes = llama2c_to_bytes(&m, version).unwrap();
        match version {
            Llama2cVersion::Legacy => assert_eq!(i32_at(&bytes, 20), m.config.n_vocab as i32),
            Llama2cVersion::V1 => assert_eq!(bytes[36], 1),
        }
        let unshared = {
            let mut u = suite_model("llama-gqa-F32.gguf");
            u.config.n_ctx_train = m.config.n_ctx_train;
            llama2c_to_bytes(&u, version).unwrap()
        };
        assert_eq!(
            unshared.len() - bytes.len(),
            4 * m.config.n_vocab * m.config.n_embd,
            "{version:?}: no wcls"
        );
        let back = Model::llama2c_from_bytes(bytes, "shared").unwrap();
        assert_eq!(back.output.data(), back.token_embd.data());
        assert_same_logits(&m, &back, &tokens, &format!("{version:?} shared"));
    }
}

#[test]
fn quantized_models_are_written_dequantized() {
    let q = suite_model("llama-gqa-Q8_0.gguf");
    let bytes = llama2c_to_bytes(&q, Llama2cVersion::V1).unwrap();
    let back = Model::llama2c_from_bytes(bytes, "q8").unwrap();
    let pairs = |m: &Model| {
        let mut w = vec![m.token_embd.clone(), m.output.clone()];
        for l in &m.layers {
            w.extend(
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].map(|x| x.clone()),
            );
        }
        w
    };
    for (a, b) in pairs(&q).iter().zip(pairs(&back)) {
        assert_eq!(b.ty, GgmlType::F32);
        assert_eq!(bits(&a.to_f32().unwrap()), bits(&b.to_f32().unwrap()));
    }
}

#[test]
fn quantize_at_load() {
    let m = suite_model("llama-gqa-F32.gguf");
    let dir = temp_dir("quantize");
    let path = dir.join("m.bin");
    write_llama2c(&m, &path, Llama2cVersion::V1).unwrap();
    let q = Model::load(&path, Some(GgmlType::Q8_0)).unwrap();
    assert_eq!(q.layers[0].wq.ty, GgmlType::Q8_0);
    assert_eq!(q.layers[0].attn_norm, m.layers[0].attn_norm);
    let case = load_cases()
        .into_iter()
        .find(|c| c.adapters.is_empty() && c.model.ends_with("models/llama-gqa-F32.gguf"))
        .unwrap();
    let (tokens, reference) = &case.seqs[0];
    let ours = logits_all(&q, tokens);
    compare_logits("Q8_0", reference, &ours, q.config.n_vocab).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gguf_named_bin_still_loads_as_gguf() {
    let dir = temp_dir("gguf-bin");
    let path = dir.join("model.bin");
    std::fs::copy(conformance().join("models/llama-gqa-F32.gguf"), &path).unwrap();
    assert!(!is_llama2c_path(&path));
    let m = Model::load(&path, None).unwrap();
    assert!(m.gguf.is_some());
    std::fs::remove_dir_all(&dir).ok();
}

// ---- refusals ----

fn refused_property(m: &Model) -> String {
    let dir = temp_dir("refuse");
    let path = dir.join("refused.bin");
    let err = write_llama2c(m, &path, Llama2cVersion::V1).unwrap_err();
    assert!(!path.exists(), "nothing is written when refused");
    let msg = err.to_string();
    assert!(msg.contains("refused.bin"), "{msg}");
    match err {
        ModelError::Llama2c(Llama2cError::Unexpressible { property, .. }) => property.to_owned(),
        e => panic!("expected Unexpressible, got {e}"),
    }
}

#[test]
fn inexpressible_models_are_refused() {
    assert_eq!(
        refused_property(&suite_model("qwen2-F32.gguf")),
        "attention biases"
    );
    assert_eq!(
        refused_property(&suite_model("llama-tied-F32.gguf")),
        "rope base"
    );
    let base = || suite_model("llama-gqa-F32.gguf");
    let mut m = base();
    m.config.rope_style = RopeStyle::Neox;
    assert_eq!(refused_property(&m), "rope style");
    let mut m = base();
    m.config.rms_eps = 1e-6;
    assert_eq!(refused_property(&m), "rms_norm_eps");
    let mut m = base();
    m.config.head_dim /= 2;
    assert_eq!(refused_property(&m), "head_dim");
    let mut m = base();
    m.config.n_rot /= 2;
    assert_eq!(refused_property(&m), "rope dimension count");
    let mut m = base();
    m.config.rope_scaling = RopeScaling::Linear { factor: 2.0 };
    assert_eq!(refused_property(&m), "rope scaling");
    let mut m = base();
    m.rope_freqs = Some(vec![1.0; m.config.n_rot / 2]);
    assert_eq!(refused_property(&m), "rope frequency factors");
}

// ---- header corruption ----

fn err_of(bytes: Vec<u8>) -> Llama2cError {
    match Model::llama2c_from_bytes(bytes, "corrupt.bin") {
        Ok(_) => panic!("corrupt file accepted"),
        Err(ModelError::Llama2c(e)) => {
            assert!(e.to_string().starts_with("corrupt.bin: "), "{e}");
            e
        }
        Err(e) => panic!("expected a llama2.c error, got {e}"),
    }
}

/// (field, found) of a header error.
fn header_err(bytes: Vec<u8>) -> (&'static str, String) {
    match err_of(bytes) {
        Llama2cError::Header { field, found, .. } => (field, found),
        e => panic!("expected a header error, got {e}"),
    }
}

const FIELDS: [&str; 7] = [
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "seq_len",
];

fn params_at(version: Llama2cVersion) -> usize {
    match version {
        Llama2cVersion::Legacy => 0,
        Llama2cVersion::V1 => 8,
    }
}

#[test]
fn bad_magic_and_version() {
    let (good, _) = TINY.build(Llama2cVersion::V1, false);
    let mut b = good.clone();
    b[0..4].copy_from_slice(b"ak43");
    let (field, found) = header_err(b);
    assert_eq!(field, "magic");
    assert!(found.contains("ak43"), "{found}");
    let mut b = good.clone();
    b[0..4].copy_from_slice(b"GGUF");
    assert_eq!(header_err(b).0, "magic");
    for v in [0, 2, -1] {
        let mut b = good.clone();
        set_i32(&mut b, 4, v);
        assert_eq!(header_err(b), ("version", v.to_string()));
    }
    let mut b = good.clone();
    b[36] = 2;
    assert_eq!(header_err(b), ("shared_classifier", "2".to_owned()));
}

#[test]
fn zero_and_negative_sizes() {
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        let (good, _) = TINY.build(version, false);
        for (i, field) in FIELDS.iter().enumerate() {
            for v in [0, -8, i32::MIN] {
                if v < 0 && version == Llama2cVersion::Legacy && *field == "vocab_size" {
                    continue; // the unshared-classifier flag
                }
                let mut b = good.clone();
                set_i32(&mut b, params_at(version) + 4 * i, v);
                assert_eq!(header_err(b), (*field, v.to_string()), "{version:?}");
            }
        }
    }
}

#[test]
fn head_counts_must_divide() {
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        let (good, _) = TINY.build(version, false);
        let at = params_at(version);
        // n_heads 3 does not divide dim 8.
        let mut b = good.clone();
        set_i32(&mut b, at + 12, 3);
        assert_eq!(header_err(b), ("n_heads", "3".to_owned()));
        // n_kv_heads 3 > n_heads 2; then 3 with n_heads 4 (divides dim, not n_heads).
        let mut b = good.clone();
        set_i32(&mut b, at + 16, 3);
        assert_eq!(header_err(b), ("n_kv_heads", "3".to_owned()));
        let mut b = good.clone();
        set_i32(&mut b, at + 12, 4);
        set_i32(&mut b, at + 16, 3);
        assert_eq!(header_err(b), ("n_kv_heads", "3".to_owned()));
        // dim 6 / n_heads 2: an odd head size cannot be rotated in pairs.
        let mut b = good.clone();
        set_i32(&mut b, at, 6);
        assert_eq!(header_err(b), ("dim", "6".to_owned()));
    }
}

#[test]
fn file_length_must_match_exactly() {
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        let (good, _) = TINY.build(version, false);
        let n = good.len() as u64;
        for cut in [1, 4, 100] {
            let b = good[..good.len() - cut].to_vec();
            match err_of(b) {
                Llama2cError::Truncated {
                    found, expected, ..
                } => assert_eq!((found, expected), (n - cut as u64, n)),
                e => panic!("{version:?}: expected Truncated, got {e}"),
            }
        }
        for extra in [1, 4, 4096] {
            let mut b = good.clone();
            b.resize(good.len() + extra, 0);
            match err_of(b) {
                Llama2cError::TooLong {
                    found, expected, ..
                } => assert_eq!((found, expected), (n + extra as u64, n)),
                e => panic!("{version:?}: expected TooLong, got {e}"),
            }
        }
        // Cut inside the header.
        let header = match version {
            Llama2cVersion::Legacy => 28,
            Llama2cVersion::V1 => 256,
        };
        for len in [0, 3, 20, header - 1] {
            match err_of(good[..len].to_vec()) {
                Llama2cError::Truncated {
                    found, expected, ..
                } => {
                    assert_eq!(found, len as u64);
                    assert!(expected > found);
                }
                e => panic!("{version:?} len {len}: expected Truncated, got {e}"),
            }
        }
    }
}

#[test]
fn size_overflow_is_an_error() {
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        let (mut b, _) = TINY.build(version, false);
        let at = params_at(version);
        for (i, v) in [1 << 30, 1 << 30, i32::MAX, 1, 1, 1 << 30, 1 << 30]
            .into_iter()
            .enumerate()
        {
            set_i32(&mut b, at + 4 * i, v);
        }
        match err_of(b) {
            Llama2cError::Overflow { .. } => {}
            e => panic!("{version:?}: expected Overflow, got {e}"),
        }
        // Huge but representable sizes: the file is far too short, nothing is read.
        let (mut b, _) = TINY.build(version, false);
        set_i32(&mut b, at, 1 << 20);
        set_i32(&mut b, at + 4, 1 << 20);
        match err_of(b) {
            Llama2cError::Truncated { expected, .. } => assert!(expected > 1 << 40),
            e => panic!("{version:?}: expected Truncated, got {e}"),
        }
    }
}

#[test]
fn errors_name_the_file() {
    let dir = temp_dir("names");
    let (mut b, _) = TINY.build(Llama2cVersion::Legacy, false);
    set_i32(&mut b, 12, 3);
    let path = dir.join("bad-heads.bin");
    std::fs::write(&path, &b).unwrap();
    for err in [
        Model::load(&path, None).unwrap_err(),
        Model::load_llama2c(&path).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("n_heads"),
            "{msg}"
        );
    }
    let missing = dir.join("missing.bin");
    let msg = Model::load_llama2c(&missing).unwrap_err().to_string();
    assert!(msg.contains("missing.bin"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn random_mutations_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x11a2c);
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        let (good, _) = TINY.build(version, false);
        let header = params_at(version) + 29;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..header.min(b.len()));
                b[i] = rng.gen();
            }
            if rng.gen_bool(0.2) {
                let len = rng.gen_range(0..b.len());
                b.truncate(len);
            }
            if let Ok(m) = Model::llama2c_from_bytes(b, "mutated") {
                // Whatever loads must re-serialize and load again.
                let again = llama2c_to_bytes(&m, version).unwrap();
                Model::llama2c_from_bytes(again, "rewritten").unwrap();
            }
        }
    }
}
