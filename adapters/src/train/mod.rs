//! On-device training: backward passes for every op of the decoder over frozen
//! quantized (or float) weights, trainable parameterisations (LoRA, SaRA, STABLE-RPS,
//! full), AdamW, data and the training loop behind `graft train`.
//!
//! Everything is generic over the scalar ([`real::Real`]): f32 trains, f64 checks the
//! gradients by finite differences through the same code.

pub mod data;
pub mod init;
pub mod job;
pub mod linalg;
pub mod method;
pub mod net;
pub mod ops;
pub mod optim;
pub mod real;
pub mod sara;
pub mod tasks;
pub mod trainer;

use graft_quant::QuantError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{tensor}: {source}")]
    Quant { tensor: String, source: QuantError },
    /// Shapes that do not fit the model (a programming or configuration error).
    #[error("shape: {0}")]
    Shape(String),
    /// Bad training data (the message names the file, line and field).
    #[error("data: {0}")]
    Data(String),
    /// An option that cannot work with this model or method.
    #[error("config: {0}")]
    Config(String),
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    /// The caller asked to stop ([`job::Control::Cancel`]); the checkpoint, if one was
    /// asked for, holds this step.
    #[error("training cancelled after step {step}")]
    Cancelled { step: usize },
    #[error(transparent)]
    Adapter(#[from] crate::AdapterError),
    #[error(transparent)]
    Model(#[from] graft_runtime::model::ModelError),
}

impl TrainError {
    pub(crate) fn quant(tensor: &str, source: QuantError) -> Self {
        TrainError::Quant {
            tensor: tensor.to_owned(),
            source,
        }
    }
}
