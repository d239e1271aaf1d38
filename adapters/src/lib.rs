//! graft-adapters: weight deltas on a quantized base, applied without touching it.
//!
//! - [`delta`]: LoRA/DoRA and sparse (SaRA) deltas, [`Adapter`] (one delta per layer
//!   projection) and [`AdapterStack`] (several adapters with scales); both implement
//!   the runtime's `LinearDelta`, so a forward step can mix them per sequence.
//! - [`gguf_lora`], [`peft`]: LoRA loaders (llama.cpp GGUF LoRA, Hugging Face PEFT
//!   LoRA/DoRA); [`load_adapter`] picks one from the path.
//! - [`merge`]: adapters merged into float weights in memory (undoable), or into a new
//!   GGUF file for any base type.
//! - [`registry`]: named adapters loaded, replaced (compare-and-set on a generation)
//!   and evicted (LRU under count and byte limits) at runtime from any thread.
//! - [`sara`]: SaRA sparse-delta files (graft's safetensors layout).
//! - [`rps`]: STABLE-RPS randomized parameter sharing (RPS-LoRA, RPS-Delta): the
//!   RandomFold map, expand / scatter-gradient / scaler for training, `.rps` files.
//! - [`combine`]: merging several adapters into one (linear, TIES, DARE, PCB).

pub mod combine;
pub mod delta;
pub mod error;
pub mod gguf_lora;
pub mod load;
pub mod merge;
pub mod peft;
pub mod registry;
pub mod rps;
pub mod sara;
pub mod st_write;
pub mod train;

pub use delta::{
    Adapter, AdapterFormat, AdapterStack, DenseDelta, LoraDelta, SparseDelta, TensorDelta,
};
pub use error::{AdapterError, Result};
pub use graft_runtime::model::{BatchDeltas, LinearDelta, Proj};
pub use load::{load_adapter, parse_adapter_arg};
pub use merge::{merge_into, merge_to_gguf, unmerge, MergeRecord, MergeReport, OutType};
pub use registry::{AdapterHandle, Generation, Registry, RegistryError, RegistryLimits};
