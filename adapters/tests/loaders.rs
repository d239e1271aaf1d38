//! Adapter loaders on small synthetic files: errors (architecture, shapes, unknown
//! modules, truncated and corrupted files, malformed configs) and PEFT semantics
//! (rsLoRA, rank/alpha patterns, layers_to_transform, fan_in_fan_out, DoRA, q/k
//! permutation) checked against dense f64 references computed here; GGUF save/load.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use graft_adapters::gguf_lora::{self, SavedAlpha};
use graft_adapters::peft::{self, PeftConfig};
use graft_adapters::{load_adapter, Adapter, AdapterError, LoraDelta, TensorDelta};
use graft_quant::{quantize_matrix, GgmlType};
use graft_runtime::gguf::{GgufValue, GgufWriter};
use graft_runtime::hf_config::{permute_qk_rows, unpermute_qk_rows};
use graft_runtime::model::{Arch, Layer, Model, ModelConfig, Proj, RopeScaling, RopeStyle, Weight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

// ---------------------------------------------------------------- fixtures

fn config(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        n_vocab: 16,
        n_embd: 32,
        n_layer: 2,
        n_ff: 64,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 8,
        n_rot: 8,
        rope_base: 10000.0,
        rope_scaling: RopeScaling::None,
        rope_style: match arch {
            Arch::Llama => RopeStyle::Normal,
            Arch::Qwen2 => RopeStyle::Neox,
        },
        rms_eps: 1e-5,
        n_ctx_train: 64,
    }
}

fn rand_vec(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-amp..amp)).collect()
}

/// A random model of `config(arch)` with weight matrices in `ty`.
fn tiny_model(arch: Arch, ty: GgmlType) -> Model {
    let c = config(arch);
    let mut rng = StdRng::seed_from_u64(11);
    let mut w = |rows: usize, cols: usize| {
        let v = rand_vec(&mut rng, rows * cols, 0.5);
        Weight::owned(ty, rows, cols, quantize_matrix(ty, &v, cols).unwrap()).unwrap()
    };
    let (d, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
    let layers = (0..c.n_layer)
        .map(|_| Layer {
            attn_norm: vec![1.0; d],
            wq: w(q, d),
            wk: w(kv, d),
            wv: w(kv, d),
            wo: w(d, q),
            bq: None,
            bk: None,
            bv: None,
            ffn_norm: vec![1.0; d],
            w_gate: w(ff, d),
            w_up: w(ff, d),
            w_down: w(d, ff),
        })
        .collect();
    let token_embd = w(c.n_vocab, d);
    Model {
        output: token_embd.clone(),
        token_embd,
        layers,
        output_norm: vec![1.0; d],
        rope_freqs: None,
        gguf: None,
        config: c,
    }
}

/// A tensor for a synthetic file: name, dtype, shape, little-endian bytes.
struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32_t(name: impl Into<String>, shape: &[usize], v: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: bytemuck::cast_slice(v).to_vec(),
    }
}

fn st_bytes(tensors: &[T]) -> Vec<u8> {
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
        )
    });
    safetensors::tensor::serialize(views, &None).unwrap()
}

/// Writes a PEFT adapter directory.
fn write_peft(name: &str, config_json: &str, tensors: &[T]) -> PathBuf {
    let dir = common::temp_dir(name);
    std::fs::write(dir.join(peft::CONFIG_FILE), config_json).unwrap();
    std::fs::write(dir.join(peft::WEIGHTS_FILE), st_bytes(tensors)).unwrap();
    dir
}

fn key(layer: usize, proj: Proj, part: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.{part}",
        proj.hf_parent(),
        proj.hf_module()
    )
}

fn shape_of(c: &ModelConfig, p: Proj) -> (usize, usize) {
    graft_adapters::delta::projection_shape(c, p)
}

/// Random PEFT A `[r, in]` and B `[out, r]` for `proj`.
struct Lora {
    layer: usize,
    proj: Proj,
    r: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

fn lora(rng: &mut StdRng, c: &ModelConfig, layer: usize, proj: Proj, r: usize) -> Lora {
    let (out, inp) = shape_of(c, proj);
    Lora {
        layer,
        proj,
        r,
        a: rand_vec(rng, r * inp, 0.3),
        b: rand_vec(rng, out * r, 0.3),
    }
}

impl Lora {
    fn tensors(&self, c: &ModelConfig) -> Vec<T> {
        let (out, inp) = shape_of(c, self.proj);
        vec![
            f32_t(
                key(self.layer, self.proj, "lora_A.weight"),
                &[self.r, inp],
                &self.a,
            ),
            f32_t(
                key(self.layer, self.proj, "lora_B.weight"),
                &[out, self.r],
                &self.b,
            ),
        ]
    }

    /// `scale * B A` in f64, `[out, in]`, rows in HF order.
    fn dense(&self, c: &ModelConfig, scale: f64) -> Vec<f64> {
        let (out, inp) = shape_of(c, self.proj);
        let mut d = vec![0f64; out * inp];
        for o in 0..out {
            for j in 0..self.r {
                let bj = self.b[o * self.r + j] as f64 * scale;
                for i in 0..inp {
                    d[o * inp + i] += bj * self.a[j * inp + i] as f64;
                }
            }
        }
        d
    }
}

/// Rows of `v` (row length `row_len`) from HF to GGUF q/k order, when the base is a
/// llama and `proj` is q or k.
fn to_model_order<T: Copy>(c: &ModelConfig, proj: Proj, v: &[T], row_len: usize) -> Vec<T> {
    match (c.arch, proj) {
        (Arch::Llama, Proj::Q) => permute_qk_rows(v, c.n_head, row_len).unwrap(),
        (Arch::Llama, Proj::K) => permute_qk_rows(v, c.n_head_kv, row_len).unwrap(),
        _ => v.to_vec(),
    }
}

fn lora_of(adapter: &Adapter, layer: usize, proj: Proj) -> &LoraDelta {
    match adapter.get(layer, proj) {
        Some(TensorDelta::Lora(l)) => l,
        other => panic!("layer {layer} {proj}: expected a LoRA delta, found {other:?}"),
    }
}

fn assert_close(ours: &[f32], reference: &[f64], rel: f64, what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let max = reference.iter().fold(0f64, |a, &b| a.max(b.abs()));
    let err = ours
        .iter()
        .zip(reference)
        .fold(0f64, |a, (&o, &r)| a.max((o as f64 - r).abs()));
    assert!(
        max > 0.0 && err <= rel * max,
        "{what}: max error {err:e}, max |ref| {max:e}"
    );
}

/// The loaded delta equals `scale * B A` of `l` (rows in the model's order).
fn assert_delta(adapter: &Adapter, c: &ModelConfig, l: &Lora, scale: f64) {
    let got = lora_of(adapter, l.layer, l.proj);
    let (_, inp) = shape_of(c, l.proj);
    let reference = to_model_order(c, l.proj, &l.dense(c, scale), inp);
    let what = format!("layer {} {}", l.layer, l.proj);
    assert_close(&got.dense().unwrap(), &reference, 1e-6, &what);
    assert!(
        (got.scale as f64 - scale).abs() <= 1e-6 * scale.abs(),
        "{what}: scale {} expected {scale}",
        got.scale
    );
}

fn err_text(r: Result<Adapter, AdapterError>) -> String {
    match r {
        Ok(a) => panic!("expected an error, loaded {} deltas", a.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_err(r: Result<Adapter, AdapterError>, needles: &[&str]) {
    let text = err_text(r);
    for n in needles {
        assert!(text.contains(n), "error {text:?} does not mention {n:?}");
    }
}

const CFG: &str = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "bias": "none"}"#;

/// A GGUF LoRA file: `tensors` are (name, ggml ne, f32 values).
fn gguf_lora_bytes(
    arch: &str,
    general_type: &str,
    alpha: Option<f32>,
    tensors: &[(String, Vec<u64>, Vec<f32>)],
) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", arch).unwrap();
    w.add_kv("general.type", general_type).unwrap();
    w.add_kv("adapter.type", "lora").unwrap();
    if let Some(a) = alpha {
        w.add_kv("adapter.lora.alpha", GgufValue::F32(a)).unwrap();
    }
    for (name, dims, v) in tensors {
        w.add_tensor(
            name.clone(),
            GgmlType::F32,
            dims,
            bytemuck::cast_slice::<f32, u8>(v).to_vec(),
        )
        .unwrap();
    }
    w.to_bytes().unwrap()
}

/// GGUF tensors (`.lora_a` ne [in, r], `.lora_b` ne [r, out]) of `l`, rows as given.
fn gguf_tensors(c: &ModelConfig, l: &Lora) -> Vec<(String, Vec<u64>, Vec<f32>)> {
    let (out, inp) = shape_of(c, l.proj);
    let base = l.proj.gguf_weight(l.layer);
    vec![
        (
            format!("{base}.lora_a"),
            vec![inp as u64, l.r as u64],
            l.a.clone(),
        ),
        (
            format!("{base}.lora_b"),
            vec![l.r as u64, out as u64],
            l.b.clone(),
        ),
    ]
}

// ---------------------------------------------------------------- GGUF LoRA

#[test]
fn gguf_lora_loads_zero_copy_with_alpha_over_rank() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(1);
    let ls = [
        lora(&mut rng, c, 0, Proj::Q, 4),
        lora(&mut rng, c, 1, Proj::Down, 4),
    ];
    let tensors: Vec<_> = ls.iter().flat_map(|l| gguf_tensors(c, l)).collect();
    let dir = common::temp_dir("gguf-ok");
    let path = dir.join("a.gguf");
    std::fs::write(
        &path,
        gguf_lora_bytes("llama", "adapter", Some(6.0), &tensors),
    )
    .unwrap();
    let a = load_adapter(&path, &m).unwrap();
    assert_eq!(a.len(), 2);
    for l in &ls {
        // GGUF LoRAs are never permuted: compare in file order.
        let got = lora_of(&a, l.layer, l.proj);
        assert!(got.a.is_mapped() && got.b.is_mapped());
        assert_close(&got.dense().unwrap(), &l.dense(c, 1.5), 1e-6, "gguf");
    }
    // alpha 0 (and absent) mean scale 1.
    for alpha in [Some(0.0), None] {
        let bytes = gguf_lora_bytes("llama", "adapter", alpha, &tensors);
        let a = gguf_lora::from_bytes(bytes, "mem", c).unwrap();
        assert_eq!(lora_of(&a, 0, Proj::Q).scale, 1.0);
    }
}

#[test]
fn gguf_lora_errors_name_the_problem() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(2);
    let l = lora(&mut rng, c, 0, Proj::V, 2);
    let good = gguf_tensors(c, &l);
    let load = |arch: &str, ty: &str, t: &[(String, Vec<u64>, Vec<f32>)]| {
        gguf_lora::from_bytes(gguf_lora_bytes(arch, ty, Some(2.0), t), "x.gguf", c)
    };
    assert!(load("llama", "adapter", &good).is_ok());
    assert_err(
        load("qwen2", "adapter", &good),
        &["x.gguf", "qwen2", "llama"],
    );
    assert_err(load("llama", "model", &good), &["general.type", "adapter"]);

    // Wrong shape: lora_a with one input too many.
    let mut bad = good.clone();
    bad[0].1[0] += 1;
    bad[0].2.extend(vec![0.0; 2]);
    assert_err(
        load("llama", "adapter", &bad),
        &["blk.0.attn_v.weight.lora_a", "[33, 2]", "[32, 2]"],
    );
    // Ranks of a and b disagree.
    let mut bad = good.clone();
    bad[1].1[0] = 1;
    bad[1].2.truncate(16);
    assert_err(
        load("llama", "adapter", &bad),
        &["blk.0.attn_v.weight.lora_a"],
    );
    // Lonely halves.
    assert_err(
        load("llama", "adapter", &good[..1]),
        &["blk.0.attn_v.weight.lora_a", "lora_b"],
    );
    assert_err(
        load("llama", "adapter", &good[1..]),
        &["blk.0.attn_v.weight.lora_b", "lora_a"],
    );
    // Unsupported base tensors and layers.
    for (name, what) in [
        ("token_embd.weight.lora_a", "token_embd.weight"),
        ("output.weight.lora_a", "output.weight"),
        ("blk.0.attn_norm.weight.lora_a", "blk.0.attn_norm.weight"),
        ("blk.5.attn_v.weight.lora_a", "layer 5"),
        ("blk.0.attn_v.weight.bias", "lora_a or .lora_b"),
    ] {
        let mut t = good.clone();
        t.push((name.to_owned(), vec![32, 2], vec![0.0; 64]));
        assert_err(load("llama", "adapter", &t), &[name, what]);
    }
}

#[test]
fn gguf_lora_every_truncation_and_corruption_is_an_error_or_valid() {
    let m = tiny_model(Arch::Qwen2, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(3);
    let l = lora(&mut rng, c, 1, Proj::K, 1);
    let bytes = gguf_lora_bytes("qwen2", "adapter", Some(1.0), &gguf_tensors(c, &l));
    assert!(gguf_lora::from_bytes(bytes.clone(), "full", c).is_ok());
    for n in 0..bytes.len() {
        let r = gguf_lora::from_bytes(bytes[..n].to_vec(), "cut", c);
        assert!(r.is_err(), "truncated at {n} of {} loaded", bytes.len());
    }
    // Through the file loader too (empty file, mid-header, mid-data).
    let dir = common::temp_dir("gguf-trunc");
    let path = dir.join("cut.gguf");
    for n in [0, 3, 4, 24, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..n]).unwrap();
        let e = err_text(load_adapter(&path, &m));
        assert!(e.contains("cut.gguf"), "{e}");
    }
    // Any single corrupted byte: an error or a loadable adapter, never a panic.
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0xA5;
        let _ = gguf_lora::from_bytes(b, "corrupt", c);
    }
}

#[test]
fn gguf_save_load_round_trip() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(4);
    let ls: Vec<Lora> = Proj::ALL
        .iter()
        .enumerate()
        .map(|(i, &p)| lora(&mut rng, c, i % 2, p, 4))
        .collect();
    let tensors: Vec<T> = ls.iter().flat_map(|l| l.tensors(c)).collect();
    let dir = write_peft("roundtrip", CFG, &tensors);
    let original = peft::load(&dir, &m).unwrap();
    let path = dir.join("out.gguf");
    // One scale (8 / 4) for every tensor: alpha = 8, A and B written exactly.
    assert_eq!(
        gguf_lora::save(&original, "llama", &path).unwrap(),
        SavedAlpha::Alpha(8.0)
    );
    let back = gguf_lora::load(&path, &m).unwrap();
    assert_eq!(back.len(), original.len());
    for (layer, proj, d) in original.iter() {
        let (o, b) = (lora_of(&original, layer, proj), lora_of(&back, layer, proj));
        assert_eq!(o.scale, b.scale);
        assert_eq!(o.a.to_f32().unwrap(), b.a.to_f32().unwrap());
        assert_eq!(o.b.to_f32().unwrap(), b.b.to_f32().unwrap());
        assert_eq!(
            d.dense().unwrap(),
            back.get(layer, proj).unwrap().dense().unwrap()
        );
    }

    // Different scales per tensor (alpha_pattern): folded into B, alpha 0.
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "alpha_pattern": {"q_proj": 3}}"#;
    let dir = write_peft("roundtrip-fold", cfg, &tensors);
    let original = peft::load(&dir, &m).unwrap();
    assert_eq!(lora_of(&original, 0, Proj::Q).scale, 0.75);
    let path = dir.join("out.gguf");
    assert_eq!(
        gguf_lora::save(&original, "llama", &path).unwrap(),
        SavedAlpha::Folded
    );
    let back = gguf_lora::load(&path, &m).unwrap();
    for (layer, proj, d) in original.iter() {
        let reference: Vec<f64> = d.dense().unwrap().iter().map(|&x| x as f64).collect();
        let got = back.get(layer, proj).unwrap().dense().unwrap();
        assert_close(&got, &reference, 1e-6, "folded round trip");
    }
}

// ---------------------------------------------------------------- PEFT semantics

#[test]
fn peft_rows_of_q_and_k_are_permuted_for_llama_only() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = tiny_model(arch, GgmlType::F32);
        let c = &m.config;
        let mut rng = StdRng::seed_from_u64(5);
        let ls: Vec<Lora> = Proj::ALL
            .iter()
            .map(|&p| lora(&mut rng, c, 1, p, 4))
            .collect();
        let tensors: Vec<T> = ls.iter().flat_map(|l| l.tensors(c)).collect();
        let dir = write_peft(&format!("perm-{}", arch.name()), CFG, &tensors);
        let a = peft::load(&dir, &m).unwrap();
        assert_eq!(a.len(), 7);
        for l in &ls {
            assert_delta(&a, c, l, 2.0);
            let d = lora_of(&a, l.layer, l.proj);
            let permuted = arch == Arch::Llama && matches!(l.proj, Proj::Q | Proj::K);
            // Zero-copy unless rows had to be rewritten.
            assert!(d.a.is_mapped());
            assert_eq!(d.b.is_mapped(), !permuted, "{arch:?} {}", l.proj);
        }
    }
}

#[test]
fn peft_rslora_scale() {
    let m = tiny_model(Arch::Qwen2, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(6);
    let l = lora(&mut rng, c, 0, Proj::Up, 4);
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"], "use_rslora": true}"#;
    let a = peft::load(&write_peft("rslora", cfg, &l.tensors(c)), &m).unwrap();
    // alpha / sqrt(r) = 8 / 2.
    assert_delta(&a, c, &l, 4.0);
}

#[test]
fn peft_rank_and_alpha_patterns_first_match_in_file_order() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(7);
    let q0 = lora(&mut rng, c, 0, Proj::Q, 2);
    let q1 = lora(&mut rng, c, 1, Proj::Q, 2);
    let v0 = lora(&mut rng, c, 0, Proj::V, 4);
    let d1 = lora(&mut rng, c, 1, Proj::Down, 6);
    let tensors: Vec<T> = [&q0, &q1, &v0, &d1]
        .iter()
        .flat_map(|l| l.tensors(c))
        .collect();
    // "self_attn.q_proj" comes first in the file, so it wins over "q_proj" (sorted
    // keys would put "q_proj" first and give rank 6, which the tensors do not have).
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"self_attn.q_proj": 2, "q_proj": 6, "layers.1.mlp.down_proj": 6},
        "alpha_pattern": {"model.layers.1.self_attn.q_proj": 1, "down_proj": 3}}"#;
    let a = peft::load(&write_peft("patterns", cfg, &tensors), &m).unwrap();
    assert_eq!(a.len(), 4);
    assert_delta(&a, c, &q0, 8.0 / 2.0);
    assert_delta(&a, c, &q1, 1.0 / 2.0);
    assert_delta(&a, c, &v0, 8.0 / 4.0);
    assert_delta(&a, c, &d1, 3.0 / 6.0);
}

#[test]
fn peft_layers_to_transform_and_unselected_modules() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(8);
    let ls: Vec<Lora> = [(0, Proj::V), (1, Proj::V), (1, Proj::O)]
        .iter()
        .map(|&(layer, p)| lora(&mut rng, c, layer, p, 4))
        .collect();
    let tensors: Vec<T> = ls.iter().flat_map(|l| l.tensors(c)).collect();
    // Only v_proj of layer 1: the other tensors are ignored, as PEFT ignores them.
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["v_proj"], "layers_to_transform": [1]}"#;
    let a = peft::load(&write_peft("layers", cfg, &tensors), &m).unwrap();
    assert_eq!(a.len(), 1);
    assert!(a.get(0, Proj::V).is_none() && a.get(1, Proj::O).is_none());
    assert_delta(&a, c, &ls[1], 1.0);
    // A single index and a layers_pattern select the same.
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["v_proj", "o_proj"], "layers_to_transform": 1, "layers_pattern": "layers"}"#;
    let a = peft::load(&write_peft("layers-int", cfg, &tensors), &m).unwrap();
    assert_eq!(a.len(), 2);
    assert_delta(&a, c, &ls[2], 1.0);
    // Nothing selected at all is an error, not an empty adapter.
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["up_proj"]}"#;
    assert_err(
        peft::load(&write_peft("layers-none", cfg, &tensors), &m),
        &["no LoRA tensor"],
    );
}

#[test]
fn peft_fan_in_fan_out() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(9);
    let ls = [
        lora(&mut rng, c, 0, Proj::K, 4),
        lora(&mut rng, c, 0, Proj::Gate, 4),
    ];
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["k_proj", "gate_proj"], "fan_in_fan_out": true}"#;
    // PEFT's own files keep lora_A [r, in] / lora_B [out, r] whatever the flag (it
    // only transposes the merged delta for Conv1D bases): loaded as they are.
    let tensors: Vec<T> = ls.iter().flat_map(|l| l.tensors(c)).collect();
    let a = peft::load(&write_peft("ffo", cfg, &tensors), &m).unwrap();
    for l in &ls {
        assert_delta(&a, c, l, 2.0);
    }
    // Conv1D-layout tensors (A as [in, r], B as [r, out]) are transposed.
    let transposed: Vec<T> = ls
        .iter()
        .flat_map(|l| {
            let (out, inp) = shape_of(c, l.proj);
            let at: Vec<f32> = (0..inp * l.r)
                .map(|k| l.a[(k % l.r) * inp + k / l.r])
                .collect();
            let bt: Vec<f32> = (0..l.r * out)
                .map(|k| l.b[(k % out) * l.r + k / out])
                .collect();
            vec![
                f32_t(key(l.layer, l.proj, "lora_A.weight"), &[inp, l.r], &at),
                f32_t(key(l.layer, l.proj, "lora_B.weight"), &[l.r, out], &bt),
            ]
        })
        .collect();
    let a = peft::load(&write_peft("ffo-t", cfg, &transposed), &m).unwrap();
    for l in &ls {
        assert_delta(&a, c, l, 2.0);
    }
    // Without the flag the transposed layout is a shape error.
    let cfg = cfg.replace("true", "false");
    assert_err(
        peft::load(&write_peft("ffo-f", &cfg, &transposed), &m),
        &["lora_A.weight", "[32, 4]", "[4, 32]"],
    );
}

/// DoRA against a dense f64 reference in HF row order: y = m / ||W + s B A||_row *
/// (W + s B A) x, on a quantized llama base (so q rows are permuted).
#[test]
fn peft_dora_matches_dense_reference() {
    for base_ty in [GgmlType::F32, GgmlType::Q8_0] {
        let m = tiny_model(Arch::Llama, base_ty);
        let c = &m.config;
        let mut rng = StdRng::seed_from_u64(10);
        let ls = [
            lora(&mut rng, c, 0, Proj::Q, 4),
            lora(&mut rng, c, 1, Proj::V, 4),
            lora(&mut rng, c, 1, Proj::Down, 4),
        ];
        let mags: Vec<Vec<f32>> = ls
            .iter()
            .map(|l| {
                let out = shape_of(c, l.proj).0;
                (0..out).map(|_| rng.gen_range(0.5..2.0)).collect()
            })
            .collect();
        let mut tensors: Vec<T> = ls.iter().flat_map(|l| l.tensors(c)).collect();
        // Both key spellings PEFT has used.
        for (i, (l, mag)) in ls.iter().zip(&mags).enumerate() {
            let part = if i == 0 {
                "lora_magnitude_vector"
            } else {
                "lora_magnitude_vector.weight"
            };
            tensors.push(f32_t(key(l.layer, l.proj, part), &[mag.len()], mag));
        }
        let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": true}"#;
        let a = peft::load(&write_peft(&format!("dora-{base_ty}"), cfg, &tensors), &m).unwrap();
        let s = 6.0 / 4.0;
        for (l, mag) in ls.iter().zip(&mags) {
            let (out, inp) = shape_of(c, l.proj);
            let w_model = m.layers[l.layer].proj(l.proj).to_f32().unwrap();
            // Base weight rows back in HF order, to build the reference there.
            let w_hf: Vec<f64> = match l.proj {
                Proj::Q => unpermute_qk_rows(&w_model, c.n_head, inp).unwrap(),
                _ => w_model.clone(),
            }
            .iter()
            .map(|&x| x as f64)
            .collect();
            let delta = l.dense(c, s);
            let x: Vec<f32> = rand_vec(&mut rng, inp, 1.0);
            let mut y_hf = vec![0f64; out];
            for o in 0..out {
                let row: Vec<f64> = (0..inp)
                    .map(|i| w_hf[o * inp + i] + delta[o * inp + i])
                    .collect();
                let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                let dot: f64 = row.iter().zip(&x).map(|(v, &xi)| v * xi as f64).sum();
                y_hf[o] = mag[o] as f64 / norm * dot;
            }
            let reference = to_model_order(c, l.proj, &y_hf, 1);
            // Ours: the base output W x (model order), then the delta.
            let mut y: Vec<f32> = (0..out)
                .map(|o| {
                    (0..inp)
                        .map(|i| w_model[o * inp + i] as f64 * x[i] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            let d = a.get(l.layer, l.proj).unwrap();
            assert!(lora_of(&a, l.layer, l.proj).dora_factor.is_some());
            d.apply(1.0, &x, 1, &mut y).unwrap();
            assert_close(&y, &reference, 1e-5, &format!("DoRA {base_ty} {}", l.proj));
        }
        // Magnitudes and use_dora must agree.
        let no_dora = cfg.replace("\"use_dora\": true", "\"use_dora\": false");
        assert_err(
            peft::load(&write_peft("dora-off", &no_dora, &tensors), &m),
            &["lora_magnitude_vector", "use_dora is false"],
        );
        let plain: Vec<T> = ls.iter().flat_map(|l| l.tensors(c)).collect();
        assert_err(
            peft::load(&write_peft("dora-missing", cfg, &plain), &m),
            &["lora_magnitude_vector", "use_dora is true"],
        );
        // DoRA cannot go into a GGUF LoRA.
        let e = gguf_lora::save(&a, "llama", &common::temp_dir("dora-save").join("x.gguf"))
            .unwrap_err();
        assert!(e.to_string().contains("DoRA"), "{e}");
    }
}

#[test]
fn peft_dtypes_and_adapter_name_infix() {
    let m = tiny_model(Arch::Qwen2, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(12);
    let l = lora(&mut rng, c, 0, Proj::O, 4);
    let (out, inp) = shape_of(c, l.proj);
    // A in F16 (zero-copy), B in F64 (converted), names with the ".default" infix.
    let a16: Vec<u8> =
        l.a.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
    let b64: Vec<u8> = l.b.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect();
    let tensors = [
        T {
            name: key(0, Proj::O, "lora_A.default.weight"),
            dtype: Dtype::F16,
            shape: vec![4, inp],
            bytes: a16,
        },
        T {
            name: key(0, Proj::O, "lora_B.default.weight"),
            dtype: Dtype::F64,
            shape: vec![out, 4],
            bytes: b64,
        },
    ];
    let a = peft::load(&write_peft("dtypes", CFG, &tensors), &m).unwrap();
    let d = lora_of(&a, 0, Proj::O);
    assert_eq!((d.a.ty, d.a.is_mapped()), (GgmlType::F16, true));
    assert_eq!((d.b.ty, d.b.is_mapped()), (GgmlType::F32, false));
    let rounded = Lora {
        a: l.a
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect(),
        ..l
    };
    assert_delta(&a, c, &rounded, 2.0);
    // Integer tensors are refused by name.
    let mut bad = tensors;
    bad[1].dtype = Dtype::I64;
    assert_err(
        peft::load(&write_peft("dtypes-int", CFG, &bad), &m),
        &["lora_B.default.weight", "I64"],
    );
}

// ---------------------------------------------------------------- PEFT errors

#[test]
fn peft_errors_name_the_tensor() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(13);
    let l = lora(&mut rng, c, 0, Proj::Q, 4);
    let good = l.tensors(c);
    let with = |name: &str, extra: T| {
        let mut t = l.tensors(c);
        t.push(extra);
        peft::load(&write_peft(name, CFG, &t), &m)
    };
    assert!(peft::load(&write_peft("err-good", CFG, &good), &m).is_ok());
    // Unknown or unsupported modules.
    for (module, what) in [
        ("model.layers.0.self_attn.rotary_emb", "rotary_emb"),
        ("model.layers.0.mlp.q_proj", "mlp.q_proj"),
        ("model.embed_tokens", "embed_tokens"),
        ("lm_head", "lm_head"),
    ] {
        let name = format!("base_model.model.{module}.lora_A.weight");
        let e = err_text(with("err-module", f32_t(&name, &[4, 32], &[0.0; 128])));
        assert!(e.contains(&name) && e.contains(what), "{e}");
    }
    for (name, what) in [
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "embedding",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.bias",
            "bias",
        ),
        ("base_model.model.lm_head.weight", "modules_to_save"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "lora_bias",
        ),
        (
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
            "layer 9",
        ),
    ] {
        let e = err_text(with("err-tensor", f32_t(name, &[4], &[0.0; 4])));
        assert!(e.contains(name) && e.contains(what), "{e}");
    }
    // Rank in the file differs from r.
    let l2 = lora(&mut rng, c, 0, Proj::Q, 2);
    assert_err(
        peft::load(&write_peft("err-rank", CFG, &l2.tensors(c)), &m),
        &[&key(0, Proj::Q, "lora_A.weight"), "[2, 32]", "[4, 32]"],
    );
    // B of the wrong height.
    let mut t = l.tensors(c);
    t[1] = f32_t(&t[1].name, &[16, 4], &l.b[..64]);
    assert_err(
        peft::load(&write_peft("err-shape", CFG, &t), &m),
        &[&key(0, Proj::Q, "lora_B.weight"), "[16, 4]", "[32, 4]"],
    );
    // Lonely halves.
    assert_err(
        peft::load(&write_peft("err-lonely", CFG, &good[..1]), &m),
        &[&key(0, Proj::Q, "lora_A.weight"), "lora_B"],
    );
    // Two adapters' tensors for one module.
    let mut t = l.tensors(c);
    t.push(f32_t(
        key(0, Proj::Q, "lora_A.other.weight"),
        &[4, 32],
        &l.a,
    ));
    assert_err(
        peft::load(&write_peft("err-dup", CFG, &t), &m),
        &["lora_A.other.weight", "second tensor"],
    );
    // Missing weights file; pickle-only checkpoint.
    let dir = common::temp_dir("err-missing");
    std::fs::write(dir.join(peft::CONFIG_FILE), CFG).unwrap();
    assert_err(peft::load(&dir, &m), &[peft::WEIGHTS_FILE]);
    std::fs::write(dir.join("adapter_model.bin"), b"x").unwrap();
    assert_err(peft::load(&dir, &m), &["adapter_model.bin"]);
}

#[test]
fn peft_every_truncation_and_corruption_of_the_weights_is_handled() {
    let m = tiny_model(Arch::Qwen2, GgmlType::F32);
    let c = &m.config;
    let mut rng = StdRng::seed_from_u64(14);
    let l = lora(&mut rng, c, 1, Proj::K, 1);
    let bytes = st_bytes(&l.tensors(c));
    let dir = write_peft(
        "trunc",
        CFG.replace("\"r\": 4", "\"r\": 1").as_str(),
        &l.tensors(c),
    );
    let weights = dir.join(peft::WEIGHTS_FILE);
    assert!(peft::load(&dir, &m).is_ok());
    for n in 0..bytes.len() {
        std::fs::write(&weights, &bytes[..n]).unwrap();
        let e = err_text(peft::load(&dir, &m));
        assert!(e.contains(peft::WEIGHTS_FILE), "truncated at {n}: {e}");
    }
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x5A;
        std::fs::write(&weights, &b).unwrap();
        let _ = peft::load(&dir, &m);
    }
}

#[test]
fn malformed_adapter_configs_are_named_errors() {
    let cases: &[(&str, &[&str])] = &[
        ("", &["not valid JSON"]),
        ("{\"peft_type\": \"LORA\"", &["not valid JSON"]),
        ("[1, 2]", &["JSON object"]),
        ("{}", &["peft_type", "missing"]),
        (r#"{"peft_type": "IA3"}"#, &["peft_type", "IA3"]),
        (
            r#"{"peft_type": "LORA", "r": 0}"#,
            &["r:", "positive integer"],
        ),
        (r#"{"peft_type": "LORA", "r": "8"}"#, &["r:", "\"8\""]),
        (r#"{"peft_type": "LORA", "r": 2.5}"#, &["r:", "2.5"]),
        (
            r#"{"peft_type": "LORA", "lora_alpha": "x"}"#,
            &["lora_alpha"],
        ),
        (
            r#"{"peft_type": "LORA", "target_modules": 5}"#,
            &["target_modules"],
        ),
        (
            r#"{"peft_type": "LORA", "target_modules": ["q_proj", 1]}"#,
            &["target_modules"],
        ),
        (
            r#"{"peft_type": "LORA", "target_modules": "q_proj("}"#,
            &["target_modules", "regex"],
        ),
        (
            r#"{"peft_type": "LORA", "bias": "some"}"#,
            &["bias", "some"],
        ),
        (r#"{"peft_type": "LORA", "use_dora": "yes"}"#, &["use_dora"]),
        (
            r#"{"peft_type": "LORA", "layers_to_transform": [-1]}"#,
            &["layers_to_transform"],
        ),
        (
            r#"{"peft_type": "LORA", "target_modules": ".*q_proj", "layers_to_transform": [0]}"#,
            &["layers_to_transform", "string"],
        ),
        (
            r#"{"peft_type": "LORA", "rank_pattern": [1]}"#,
            &["rank_pattern"],
        ),
        (
            r#"{"peft_type": "LORA", "rank_pattern": {"q_proj": 0}}"#,
            &["rank_pattern[\"q_proj\"]"],
        ),
        (
            r#"{"peft_type": "LORA", "alpha_pattern": {"(": 1}}"#,
            &["alpha_pattern", "regex"],
        ),
        (
            r#"{"peft_type": "LORA", "layer_replication": [[0, 1]]}"#,
            &["layer_replication"],
        ),
        (
            r#"{"peft_type": "LORA", "lora_bias": true}"#,
            &["lora_bias"],
        ),
    ];
    for (text, needles) in cases {
        let e = PeftConfig::parse(text.as_bytes(), "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cfg.json"), "{text}: {e}");
        for n in *needles {
            assert!(e.contains(n), "{text}: {e:?} lacks {n:?}");
        }
    }
    // Nulls mean defaults, as PEFT writes them.
    let c = PeftConfig::parse(
        br#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": null, "rank_pattern": {}, "layers_to_transform": null, "exclude_modules": null}"#,
        "cfg.json",
    )
    .unwrap();
    assert_eq!(c.rank_scale("model.layers.0.self_attn.q_proj"), (16, 2.0));
    assert!(c.targets("model.layers.0.self_attn.v_proj"));
    assert!(!c.targets("model.layers.0.self_attn.k_proj"));
    // Through the loader: the file is named.
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let dir = common::temp_dir("bad-config");
    std::fs::write(dir.join(peft::CONFIG_FILE), "{nope").unwrap();
    assert_err(
        load_adapter(&dir, &m),
        &[peft::CONFIG_FILE, "not valid JSON"],
    );
}

#[test]
fn load_adapter_dispatch() {
    let m = tiny_model(Arch::Llama, GgmlType::F32);
    let dir = common::temp_dir("dispatch");
    let sara = dir.join("s.safetensors");
    std::fs::write(&sara, b"whatever").unwrap();
    // A .safetensors file goes to the SaRA reader, which rejects this one.
    assert_err(load_adapter(&sara, &m), &["s.safetensors", "safetensors"]);
    let other = dir.join("x.bin");
    std::fs::write(&other, b"not an adapter").unwrap();
    assert_err(load_adapter(&other, &m), &["not an adapter"]);
    assert_err(load_adapter(&dir.join("missing"), &m), &["missing"]);
    // A directory without a config is a PEFT error naming the config.
    assert_err(load_adapter(&dir, &m), &[peft::CONFIG_FILE]);
}
