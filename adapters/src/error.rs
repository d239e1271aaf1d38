//! Errors of adapter loading, validation and application.

use graft_quant::{GgmlType, QuantError};
use graft_runtime::gguf::GgufError;
use graft_runtime::model::ModelError;
use graft_runtime::safetensors::SafetensorsError;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A problem with the file as a whole (metadata, config, architecture).
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
    /// A problem with one tensor of the file.
    #[error("{file}: tensor {tensor}: {what}")]
    Tensor {
        file: String,
        tensor: String,
        what: String,
    },
    #[error("{file}: tensor {tensor}: shape {found:?}, expected {expected:?}")]
    Shape {
        file: String,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{context}: {source}")]
    Quant { context: String, source: QuantError },
    /// In-memory merging met a quantized base weight (nothing was changed).
    #[error("tensor {tensor}: base weight is {ty}; in-memory merging needs a float base (F32, F16 or BF16): write a merged model with `graft merge` instead (dequantize, add, requantize)")]
    QuantizedBase { tensor: String, ty: GgmlType },
    /// Merging or unmerging cannot proceed (wrong model, mismatched adapter).
    #[error("merge: {0}")]
    Merge(String),
    /// Registry operations (unknown name, lost compare-and-set, budget).
    #[error("adapter registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
}

pub type Result<T, E = AdapterError> = std::result::Result<T, E>;

impl AdapterError {
    pub(crate) fn invalid(file: impl Into<String>, what: impl Into<String>) -> Self {
        AdapterError::Invalid {
            file: file.into(),
            what: what.into(),
        }
    }

    pub(crate) fn tensor(
        file: impl Into<String>,
        tensor: impl Into<String>,
        what: impl Into<String>,
    ) -> Self {
        AdapterError::Tensor {
            file: file.into(),
            tensor: tensor.into(),
            what: what.into(),
        }
    }

    pub(crate) fn quant(context: impl Into<String>, source: QuantError) -> Self {
        AdapterError::Quant {
            context: context.into(),
            source,
        }
    }
}
