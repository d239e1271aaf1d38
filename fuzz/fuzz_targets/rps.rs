//! RPS reader on arbitrary bytes: it must never panic; whatever it accepts must expand
//! into an adapter and save back to bytes that read to the same layout and pools (and
//! save to the same bytes again).

#![no_main]

use graft_adapters::rps;
use graft_runtime::model::{Arch, ModelConfig, RopeScaling, RopeStyle};
use libfuzzer_sys::fuzz_target;

/// A small llama: Q 8x8, K/V 4x8, O 8x8, gate/up 16x8, down 8x16, two layers.
fn config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        n_vocab: 32,
        n_embd: 8,
        n_layer: 2,
        n_ff: 16,
        n_head: 2,
        n_head_kv: 1,
        head_dim: 4,
        n_rot: 4,
        rope_base: 1e4,
        rope_scaling: RopeScaling::None,
        rope_style: RopeStyle::Normal,
        rms_eps: 1e-5,
        n_ctx_train: 64,
    }
}

fn bits(pools: &[Vec<f32>]) -> Vec<Vec<u32>> {
    pools
        .iter()
        .map(|p| p.iter().map(|v| v.to_bits()).collect())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let c = config();
    let Ok((layout, pools)) = rps::from_bytes(data, "fuzz-input", &c) else {
        return;
    };
    let adapter = layout
        .to_adapter(&c, &pools, "fuzz-input".into())
        .expect("an accepted file expands");
    assert!(!adapter.is_empty());
    let bytes = rps::to_bytes(&layout, &pools, "fuzz-output").expect("re-save");
    let (again, pools2) = rps::from_bytes(&bytes, "fuzz-output", &c).expect("reload");
    assert_eq!(layout, again);
    assert_eq!(bits(&pools), bits(&pools2));
    assert_eq!(
        bytes,
        rps::to_bytes(&again, &pools2, "fuzz-output").expect("re-save")
    );
});
