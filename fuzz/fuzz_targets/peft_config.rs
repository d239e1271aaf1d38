//! Adapter loaders on arbitrary bytes: an `adapter_config.json` (first byte 0), a
//! GGUF LoRA file (1), or a config plus an `adapter_model.safetensors` (2: a u16
//! little-endian config length, the config, then the weights). Each must give an
//! adapter or a typed error, never a panic; a loaded adapter must be applicable.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use graft_adapters::peft::{self, PeftConfig};
use graft_adapters::{gguf_lora, Adapter};
use graft_quant::{quantize_matrix, GgmlType};
use graft_runtime::model::{
    Arch, Layer, Model, ModelConfig, Proj, RopeScaling, RopeStyle, Weight,
};
use graft_runtime::safetensors::SafetensorsModel;
use libfuzzer_sys::fuzz_target;

const MODULES: [&str; 6] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.12.self_attn.v_proj",
    "lm_head",
    "transformer.h.3.attn.c_attn",
    "",
];

fn config(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        n_vocab: 8,
        n_embd: 32,
        n_layer: 2,
        n_ff: 64,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 8,
        n_rot: 8,
        rope_base: 10000.0,
        rope_scaling: RopeScaling::None,
        rope_style: RopeStyle::Normal,
        rms_eps: 1e-5,
        n_ctx_train: 64,
    }
}

/// A small llama base with Q8_0 weights (DoRA dequantizes its rows).
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let c = config(Arch::Llama);
        let mut seed = 0u32;
        let mut w = |rows: usize, cols: usize| {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect();
            let bytes = quantize_matrix(GgmlType::Q8_0, &v, cols).expect("quantize");
            Weight::owned(GgmlType::Q8_0, rows, cols, bytes).expect("weight")
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
    })
}

/// Every delta of a loaded adapter runs on two input rows.
fn exercise(adapter: &Adapter) {
    for (layer, proj, d) in adapter.iter() {
        let (out, inp) = d.shape();
        assert!(layer < 2 && Proj::ALL.contains(&proj));
        let x: Vec<f32> = (0..2 * inp).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut y = vec![0.5f32; 2 * out];
        d.apply(0.5, &x, 2, &mut y).expect("a loaded delta applies");
    }
}

fn check_config(bytes: &[u8]) -> Option<PeftConfig> {
    let c = PeftConfig::parse(bytes, "<fuzz>").ok()?;
    assert!(c.r > 0 && c.lora_alpha.is_finite());
    for m in MODULES {
        let _ = c.targets(m);
        let _ = c.layer_index(m);
        let (r, s) = c.rank_scale(m);
        assert!(r > 0 && !s.is_nan());
    }
    Some(c)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            check_config(rest);
        }
        1 => {
            for arch in [Arch::Llama, Arch::Qwen2] {
                if let Ok(a) = gguf_lora::from_bytes(rest.to_vec(), "<fuzz>", &config(arch)) {
                    exercise(&a);
                }
            }
        }
        _ => {
            let Some((len, rest)) = rest.split_first_chunk::<2>() else {
                return;
            };
            let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
            let (cfg, weights) = rest.split_at(len);
            let Some(cfg) = check_config(cfg) else {
                return;
            };
            let Ok(st) = SafetensorsModel::from_bytes(weights.to_vec()) else {
                return;
            };
            if let Ok(a) = peft::from_parts(&cfg, &st, Path::new("<fuzz>"), model()) {
                exercise(&a);
            }
        }
    }
});
