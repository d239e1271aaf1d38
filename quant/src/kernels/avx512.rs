use super::RowsFn;
use crate::GgmlType;

pub(super) fn rows_fn(_w: GgmlType) -> Option<RowsFn> {
    None
}
