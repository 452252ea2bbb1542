//! One table's changes from the stream, as Postgres sent them (text values), encoded
//! into the raw change log's Arrow columns ([`crate::changelog::raw_schema`]).

use super::pgoutput::Datum;
use super::text::ColumnBuilder;
use super::TableSchema;
use crate::changelog::{raw_schema, Changes, Lsn, Op};
use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringBuilder, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;
use std::sync::Arc;

/// Warnings per table and run about values that did not parse (the rest are counted).
const WARNINGS: usize = 10;

/// Accumulates one table's change rows until [`ChangeEncoder::finish`].
pub struct ChangeEncoder {
    table: TableSchema,
    schema: SchemaRef,
    columns: Vec<ColumnBuilder>,
    op: StringBuilder,
    ops: Vec<Op>,
    lsn: Vec<i64>,
    seq: Vec<i64>,
    ts: Vec<i64>,
    unchanged_toast: Vec<(usize, usize)>,
    bad_values: usize,
}

/// What one [`ChangeEncoder::finish`] hands on.
#[derive(Debug)]
pub struct Encoded {
    pub changes: Changes,
    /// The `(row, column)` cells of updates whose TOASTed value pgoutput did not send
    /// because it did not change: NULL in `changes` until filled from state.
    pub unchanged_toast: Vec<(usize, usize)>,
}

impl ChangeEncoder {
    pub fn new(table: &TableSchema) -> ChangeEncoder {
        ChangeEncoder {
            table: table.clone(),
            schema: raw_schema(&table.schema),
            columns: table
                .columns
                .iter()
                .map(|c| ColumnBuilder::new(&c.data_type, 16))
                .collect(),
            op: StringBuilder::new(),
            ops: Vec::new(),
            lsn: Vec::new(),
            seq: Vec::new(),
            ts: Vec::new(),
            unchanged_toast: Vec::new(),
            bad_values: 0,
        }
    }

    /// Rows appended since the last [`ChangeEncoder::finish`].
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends one change of a transaction committed at `lsn` (time `ts`, unix micros),
    /// `seq`-th in it. A value that does not parse as its column's type is stored as
    /// NULL with a warning: the row itself is never dropped.
    pub fn append(&mut self, op: Op, seq: i64, row: &[Datum], lsn: Lsn, ts: i64) {
        let at = self.len();
        for (i, (b, v)) in self.columns.iter_mut().zip(row).enumerate() {
            match v {
                Datum::Text(t) => {
                    if let Err(e) = b.append_text(t) {
                        self.bad_values += 1;
                        if self.bad_values <= WARNINGS {
                            tracing::warn!(table = %self.table.name,
                                column = %self.table.columns[i].name,
                                error = %e, "value stored as NULL");
                        }
                    }
                }
                Datum::Null => b.append_null(),
                // Not sent by pgoutput: a placeholder the state stage fills.
                Datum::UnchangedToast => {
                    self.unchanged_toast.push((at, i));
                    b.append_null()
                }
            }
        }
        self.op.append_value(op.as_str());
        self.ops.push(op);
        self.lsn.push(lsn.as_i64());
        self.seq.push(seq);
        self.ts.push(ts);
    }

    /// The rows appended so far, or None when there are none; starts over empty.
    pub fn finish(&mut self) -> Option<Encoded> {
        if self.is_empty() {
            return None;
        }
        let mut cols: Vec<ArrayRef> = self.columns.iter_mut().map(ColumnBuilder::finish).collect();
        cols.push(Arc::new(self.op.finish()));
        cols.push(Arc::new(Int64Array::from(std::mem::take(&mut self.lsn))));
        cols.push(Arc::new(Int64Array::from(std::mem::take(&mut self.seq))));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from(std::mem::take(&mut self.ts)).with_timezone("UTC"),
        ));
        let rows = RecordBatch::try_new(self.schema.clone(), cols).expect("builders match schema");
        Some(Encoded {
            changes: Changes::new(rows, std::mem::take(&mut self.ops)),
            unchanged_toast: std::mem::take(&mut self.unchanged_toast),
        })
    }
}
