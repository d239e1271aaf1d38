//! Arbitrary bytes parsed as a safetensors file (and, when UTF-8, as an HF
//! config.json) must give Ok or a typed error, never a panic.
//!
//! Run: `cargo +nightly fuzz run safetensors` from the repository root.

#![no_main]

use std::path::Path;

use graft_runtime::hf_config::HfConfig;
use graft_runtime::safetensors::{to_f32, SafetensorsModel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = SafetensorsModel::from_bytes(data.to_vec()) {
        for name in model.tensor_names() {
            let info = model.tensor_info(name);
            assert!(info.is_ok());
            if let Ok(view) = model.tensor(name) {
                let elements: usize = view.shape.iter().product();
                assert_eq!(view.data.len(), elements * view.dtype.size());
                assert_eq!(to_f32(&view).len(), elements);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = HfConfig::parse(text, Path::new("<fuzz>"));
    }
});
