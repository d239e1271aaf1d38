//! Building blocks for on-device training of adapters.

pub mod linalg;
pub mod sara;
