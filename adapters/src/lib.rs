//! graft-adapters: weight deltas on a quantized base, applied without touching it.
//!
//! - [`delta`]: LoRA/DoRA and sparse (SaRA) deltas, [`Adapter`] (one delta per layer
//!   projection) and [`AdapterStack`] (several adapters with scales); both implement
//!   the runtime's `LinearDelta`, so a forward step can mix them per sequence.
//! - [`registry`]: named adapters loaded, replaced (compare-and-set on a generation)
//!   and evicted (LRU under count and byte limits) at runtime from any thread.

pub mod delta;
pub mod error;
pub mod registry;

pub use delta::{Adapter, AdapterFormat, AdapterStack, LoraDelta, SparseDelta, TensorDelta};
pub use error::{AdapterError, Result};
pub use registry::{AdapterHandle, Generation, Registry, RegistryError, RegistryLimits};
