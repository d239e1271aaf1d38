//! STABLE-RPS (randomized parameter sharing, arXiv 2310.11611) for adapters.
//!
//! All adapted tensors of an adapter are *virtual*: element `i` of tensor `l` sits at
//! position `p = offset_l + i` of its pool's virtual array and reads
//! `W_l[i] = lambda_l * xi(p) * z[h(p)]` from a pool `z` of `m` trainable floats
//! ([`fold`]: the RandomFold map `h` and sign hash `xi`). Two modes
//! ([`RpsMode`]): RPS-LoRA (A tensors from pool `z_a`, B tensors from the
//! zero-initialised `z_b`, so the delta starts at zero; at `rho = m / n = 1` it is
//! LoRA) and RPS-Delta (dense deltas from one zero-initialised pool; at `rho = 1` full
//! fine-tuning of the adapted matrices).
//!
//! For training, [`RpsLayout`] describes the tensors, and three pure functions turn
//! pools into tensors and tensor gradients back into pool gradients:
//!
//! ```text
//! let layout = RpsLayout::new(&config, &[Proj::Q, Proj::V], &RpsConfig::lora(8, 16.0, Budget::Ratio(0.1)))?;
//! let mut pools = layout.init_pools(seed);       // z_a ~ U(-s0, s0), z_b = 0
//! let w = expand(&layout, &pools)?;              // one Vec per layout.tensors() entry
//! // ... forward / backward with A, B (or dense ΔW) from `w`, giving dL/dW per tensor ...
//! let mut g = scatter_grad(&layout, &grads)?;    // dL/dz per pool (the adjoint)
//! layout.apply_scaler(&mut g)?;                  // divide slot j by S_j (v1 / v5 / none)
//! // ... optimizer step on `pools` with `g` ...
//! save(path, &layout, &pools)?;                  // an .rps file; load() makes an Adapter
//! ```
//!
//! [`file`]: the `.rps` format (see `adapters/RPS_FORMAT.md`).

pub mod file;
pub mod fold;
pub mod layout;

pub use file::{adapter_from_bytes, from_bytes, load, read, save, to_bytes};
pub use fold::{RandomFold, Run, SplitMix64};
pub use layout::{
    expand, expand_tensor_into, scatter_grad, Budget, PoolMap, Role, RpsConfig, RpsLayout, RpsMode,
    Scaler, VirtualTensor, DEFAULT_SEED,
};
