//! One table's change rows with their operations decoded.

use super::{ops, Op, UnknownOp};
use arrow::array::RecordBatch;
use std::sync::Arc;

/// Change rows of one table in the raw change-log schema (or plain rows, which are
/// inserts), with each row's [`Op`] decoded once: the stages that read them (state,
/// features) match on the enum, the lake keeps the `_op` text for other readers.
#[derive(Debug, Clone)]
pub struct Changes {
    rows: RecordBatch,
    ops: Arc<[Op]>,
}

impl Changes {
    /// Rows and the op of each. Panics when the counts differ (a bug, not bad input).
    pub fn new(rows: RecordBatch, ops: impl Into<Arc<[Op]>>) -> Changes {
        let ops = ops.into();
        assert_eq!(rows.num_rows(), ops.len(), "one op per change row");
        Changes { rows, ops }
    }

    /// Rows read back from the lake: their `_op` column decoded (plain rows without one
    /// are inserts).
    pub fn decode(rows: RecordBatch) -> Result<Changes, UnknownOp> {
        let ops = ops(&rows)?;
        Ok(Changes::new(rows, ops))
    }

    pub fn rows(&self) -> &RecordBatch {
        &self.rows
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The same changes with their row images replaced (e.g. unchanged TOAST filled in).
    pub fn with_rows(self, rows: RecordBatch) -> Changes {
        Changes::new(rows, self.ops)
    }

    pub fn into_rows(self) -> RecordBatch {
        self.rows
    }
}
