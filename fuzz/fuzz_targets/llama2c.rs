//! llama2.c checkpoint reader on arbitrary bytes: it must never panic; whatever it
//! accepts must re-serialize in both layouts (legacy and version 1) to files that load
//! to the same configuration and weights.

#![no_main]

use graft_runtime::model::{llama2c_to_bytes, Llama2cVersion, Model};
use libfuzzer_sys::fuzz_target;

fn weights(m: &Model) -> Vec<Vec<u8>> {
    let mut w = vec![
        m.token_embd.data().to_vec(),
        m.output.data().to_vec(),
        m.output_norm.iter().flat_map(|x| x.to_le_bytes()).collect(),
    ];
    for l in &m.layers {
        for x in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
            w.push(x.data().to_vec());
        }
        for v in [&l.attn_norm, &l.ffn_norm] {
            w.push(v.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
    }
    w
}

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::llama2c_from_bytes(data.to_vec(), "fuzz-input") else {
        return;
    };
    let original = weights(&model);
    for version in [Llama2cVersion::Legacy, Llama2cVersion::V1] {
        // The legacy format stores seq_len x head_dim unused floats: a large seq_len
        // (fine in a v1 input) makes a legacy copy too big for the fuzzer's memory.
        let freq_bytes = model
            .config
            .n_ctx_train
            .saturating_mul(model.config.head_dim)
            * 4;
        if version == Llama2cVersion::Legacy && freq_bytes > 16 << 20 {
            continue;
        }
        let bytes = llama2c_to_bytes(&model, version)
            .unwrap_or_else(|e| panic!("an accepted model must re-serialize: {e}"));
        let again = Model::llama2c_from_bytes(bytes, "rewritten")
            .unwrap_or_else(|e| panic!("the writer's output must load: {e}"));
        assert_eq!(again.config, model.config);
        assert!(weights(&again) == original, "{version:?}: weights differ");
    }
});
