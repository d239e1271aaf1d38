//! graft-runtime: model files (GGUF, safetensors, HF config), and later tokenizers,
//! the forward pass, KV cache, sampling and execution providers.

pub mod chat;
pub mod generate;
pub mod gguf;
pub mod hf_config;
pub mod kv_cache;
pub mod model;
pub mod quantize;
pub mod safetensors;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;
