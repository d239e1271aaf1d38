//! graft-adapters: weight deltas on a quantized base, applied without touching it.
//!
//! - [`delta`]: LoRA/DoRA and sparse (SaRA) deltas, [`Adapter`] (one delta per layer
//!   projection) and [`AdapterStack`] (several adapters with scales); both implement
//!   the runtime's `LinearDelta`, so a forward step can mix them per sequence.
//! - [`sara`]: SaRA sparse-delta files (graft's safetensors layout).
//! - [`combine`]: merging several adapters into one (linear, TIES, DARE, PCB).

pub mod combine;
pub mod delta;
pub mod error;
pub mod sara;

pub use delta::{Adapter, AdapterFormat, AdapterStack, LoraDelta, SparseDelta, TensorDelta};
pub use error::{AdapterError, Result};
