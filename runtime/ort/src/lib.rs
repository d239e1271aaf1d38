//! graft-ort: graft models on the ONNX Runtime an app already ships, on whatever
//! execution provider it has, with adapters swapped per run.
//!
//! - [`graph`]: the ONNX graph of a loaded graft model (prefill and decode, KV cache
//!   in and out, LoRA A/B inputs); Q4_0/Q8_0 weights as `MatMulNBits`.
//! - [`onnx`]: the ONNX protobuf messages graft writes.
//! - [`session`]: the library loaded at run time (`ORT_DYLIB_PATH`), [`Provider`]
//!   selection, [`OrtSession`] runs with the KV cache kept as ONNX Runtime values.
//! - [`adapter`]: graft adapters as ONNX Runtime adapter objects (`.onnx_adapter`),
//!   activated per run.
//! - [`export`]: `model.onnx` + external data for any ONNX Runtime.

pub mod adapter;
pub mod export;
pub mod graph;
pub mod onnx;
pub mod session;

pub use adapter::{
    encode_onnx_adapter, lora_params, required_rank, write_onnx_adapter, OrtAdapter, Param,
};
pub use export::{export_model, ExportReport};
pub use graph::{build_graph, GraphInfo, GraphOptions, LoraSpec, OnnxModel};
pub use session::{
    available_providers, check_provider, ensure_runtime, library_path, KvState, OrtSession,
    Provider, SessionOptions, ORT_DYLIB_ENV,
};

#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    /// The ONNX Runtime library could not be found or loaded.
    #[error("ONNX Runtime: {0}")]
    Load(String),
    #[error("provider {requested}: {reason}; available: {available}")]
    Provider {
        requested: String,
        reason: String,
        available: String,
    },
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    #[error("ONNX graph: {0}")]
    Graph(String),
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("run: {0}")]
    Run(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl From<ort::Error<ort::session::builder::SessionBuilder>> for OrtError {
    fn from(e: ort::Error<ort::session::builder::SessionBuilder>) -> Self {
        OrtError::Ort(e.into())
    }
}
