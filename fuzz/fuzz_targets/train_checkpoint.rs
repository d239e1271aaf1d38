//! Training checkpoint reader on arbitrary bytes: it must never panic, must leave the
//! trainer untouched when it refuses, and what it accepts must save back to a
//! checkpoint that loads to the same state.

#![no_main]

use std::sync::OnceLock;

use graft_adapters::train::init::{train_vocab, write_init_model, InitConfig};
use graft_adapters::train::method::{targets_for, Lora, Method};
use graft_adapters::train::trainer::{TrainConfig, Trainer};
use graft_runtime::model::{Model, Proj};
use libfuzzer_sys::fuzz_target;

/// A tiny random Llama, written once per process.
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let c = InitConfig {
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            n_head_kv: 1,
            n_ff: 32,
            n_ctx: 32,
            rope_base: 1e4,
        };
        let vocab = train_vocab(&["a b c d e f".to_owned()], 40);
        let path =
            std::env::temp_dir().join(format!("graft-fuzz-ckpt-{}.gguf", std::process::id()));
        write_init_model(&c, &vocab, "fuzz", 0, &path).expect("init model");
        let m = Model::load(&path, None).expect("load init model");
        let _ = std::fs::remove_file(&path);
        m
    })
}

fn trainer(m: &Model) -> Trainer<'_> {
    let c = &m.config;
    let lora = Lora::new(c, targets_for(c, &[Proj::Q, Proj::V]), 2, 4.0, false).expect("lora");
    Trainer::new(m, Method::Lora(lora), TrainConfig::default()).expect("trainer")
}

fuzz_target!(|data: &[u8]| {
    let m = model();
    let fresh = trainer(m);
    let mut t = trainer(m);
    if t.load_checkpoint_bytes(data, "fuzz-input").is_err() {
        assert_eq!((t.step, &t.params, &t.opt), (0, &fresh.params, &fresh.opt));
        return;
    }
    let path = std::env::temp_dir().join(format!("graft-fuzz-ckpt-{}.st", std::process::id()));
    t.save_checkpoint(&path).expect("re-save");
    let mut again = trainer(m);
    again.load_checkpoint(&path).expect("reload");
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        (again.step, &again.params, &again.opt),
        (t.step, &t.params, &t.opt)
    );
});
