//! graft-adapters: weight deltas on a quantized base, applied without touching it.
//!
//! - [`delta`]: LoRA/DoRA and sparse (SaRA) deltas, [`Adapter`] (one delta per layer
//!   projection) and [`AdapterStack`] (several adapters with scales); both implement
//!   the runtime's `LinearDelta`, so a forward step can mix them per sequence.
//! - [`merge`]: adapters merged into float weights in memory (undoable), or into a new
//!   GGUF file for any base type.

pub mod delta;
pub mod error;
pub mod merge;

pub use delta::{Adapter, AdapterFormat, AdapterStack, LoraDelta, SparseDelta, TensorDelta};
pub use error::{AdapterError, Result};
pub use merge::{merge_into, merge_to_gguf, unmerge, MergeRecord, MergeReport, OutType};
