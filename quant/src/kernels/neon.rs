//! aarch64 NEON kernels. NOT COMPILED on the x86_64 dev box (no aarch64 std
//! offline): kept small; see Q4_0/Q8_0 below.

use super::RowsFn;
use crate::GgmlType;

pub(super) fn rows_fn(_w: GgmlType) -> Option<RowsFn> {
    None
}
