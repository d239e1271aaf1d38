//! SaRA reader on arbitrary bytes: it must never panic; whatever it accepts must save
//! back to bytes that load to the same deltas (and save to the same bytes again).

#![no_main]

use graft_adapters::sara;
use graft_adapters::TensorDelta;
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

fn sparse_parts(d: &TensorDelta) -> (Vec<u32>, Vec<u32>, u32) {
    match d {
        TensorDelta::Sparse(s) => (
            s.flat_indices(),
            s.values.iter().map(|v| v.to_bits()).collect(),
            s.scale.to_bits(),
        ),
        TensorDelta::Lora(_) | TensorDelta::Dense(_) => panic!("a SaRA file gave a non-sparse delta"),
    }
}

fuzz_target!(|data: &[u8]| {
    let c = config();
    let Ok((adapter, meta)) = sara::from_bytes_with_meta(data, "fuzz-input", &c) else {
        return;
    };
    let bytes = sara::to_bytes(&adapter, &meta, "fuzz-output").expect("re-save");
    let (again, meta2) =
        sara::from_bytes_with_meta(&bytes, "fuzz-output", &c).expect("reload");
    assert_eq!(meta, meta2);
    assert_eq!(adapter.len(), again.len());
    for (l, p, d) in adapter.iter() {
        let e = again.get(l, p).expect("delta lost in the round trip");
        assert_eq!(sparse_parts(d), sparse_parts(e));
    }
    assert_eq!(
        bytes,
        sara::to_bytes(&again, &meta2, "fuzz-output").expect("re-save")
    );
});
