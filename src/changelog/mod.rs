//! The change model every stage shares, and the raw change log's contract.
//!
//! A change is a row image of one source table ([`TableId`]) with an [`Op`], the
//! [`Lsn`] of its transaction's commit, its position in that transaction (`_seq`) and
//! the commit time. The raw mirror (`<lake>/raw/<table>`) stores exactly that, one
//! Delta table per source table, and is what state is rebuilt from and what a backfill
//! replays: [`raw_schema`] is its schema, the column names below its contract. A
//! snapshot is written as inserts just before the slot's consistent point
//! ([`snapshot_rows_as_changes`]).

mod changes;
mod lsn;
mod op;

pub use changes::Changes;
pub use lsn::{Lsn, ParseLsnError};
pub use op::{ops, Op, UnknownOp};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use std::sync::Arc;

/// The change's operation ([`Op::as_str`]).
pub const OP: &str = "_op";
/// Commit LSN of the change's transaction.
pub const LSN: &str = "_lsn";
/// Position of the change in its transaction, from 0.
pub const SEQ: &str = "_seq";
/// Commit time of the change's transaction (UTC).
pub const COMMIT_TS: &str = "_commit_ts";

/// A source table of the pipeline: its position in `source.tables`, the same in the
/// source, batch, state and feature stages (the sink names it by its lake path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableId(usize);

impl TableId {
    pub const fn new(index: usize) -> TableId {
        TableId(index)
    }

    /// Position in the configured tables (and in every per-table list).
    pub const fn index(self) -> usize {
        self.0
    }

    /// The ids of `n` configured tables, in order.
    pub fn all(n: usize) -> impl Iterator<Item = TableId> {
        (0..n).map(TableId)
    }
}

/// The raw-mirror schema of a table with row schema `row`: the row image (every column
/// nullable: a delete's image may hold only its key) plus the change columns.
pub fn raw_schema(row: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = row
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.push(Field::new(OP, DataType::Utf8, false));
    fields.push(Field::new(LSN, DataType::Int64, false));
    fields.push(Field::new(SEQ, DataType::Int64, false));
    fields.push(Field::new(
        COMMIT_TS,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        false,
    ));
    Arc::new(Schema::new(fields))
}

/// The `_lsn` of snapshot rows: just below the consistent point, because a streamed
/// transaction's commit record may start exactly at it, and replay order (`_lsn`,
/// `_seq`) and the state rebuild (`_lsn` < resume point) must put the snapshot first.
pub fn snapshot_row_lsn(consistent: Lsn) -> Lsn {
    consistent.prev()
}

/// Snapshot rows as changes of the raw mirror: inserts at `lsn`, numbered from
/// `first_seq` (a table's snapshot is one transaction, however many batches it has).
pub fn snapshot_rows_as_changes(
    raw: &SchemaRef,
    rows: &RecordBatch,
    lsn: Lsn,
    commit_ts_micros: i64,
    first_seq: i64,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.num_rows();
    let mut cols: Vec<ArrayRef> = rows.columns().to_vec();
    cols.push(Arc::new(StringArray::from(vec![Op::Insert.as_str(); n])));
    cols.push(Arc::new(Int64Array::from(vec![lsn.as_i64(); n])));
    cols.push(Arc::new(Int64Array::from_iter_values(
        first_seq..first_seq + n as i64,
    )));
    cols.push(Arc::new(
        TimestampMicrosecondArray::from(vec![commit_ts_micros; n]).with_timezone("UTC"),
    ));
    RecordBatch::try_new(raw.clone(), cols)
}
