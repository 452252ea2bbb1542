//! Files written ahead of their commit: the pieces of a source transaction too large for
//! one batch are encoded to Parquet in the table's directory as they arrive, so memory
//! stays bounded, and only the commit that carries the transaction's end references them.
//! A crash before that commit leaves files no log entry names; vacuum removes them.

use super::{LakeTable, SinkError};
use arrow::array::RecordBatch;
use arrow::compute::CastOptions;
use arrow::datatypes::{Schema, SchemaRef};
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use deltalake::DeltaTable;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest staged Parquet file (it is uploaded in parts as it grows).
const STAGED_FILE_BYTES: u64 = 32 * 1024 * 1024;
/// Largest row group: parquet holds the one being built in memory, and its default
/// (a million rows) would let memory follow a large transaction after all.
const STAGED_ROW_GROUP_BYTES: usize = 8 * 1024 * 1024;

/// Per table, the open writer holding a transaction's files written so far.
#[derive(Default)]
pub struct StagedFiles {
    pub(super) writers: BTreeMap<LakeTable, RecordBatchWriter>,
    rows: usize,
}

impl StagedFiles {
    /// Rows written ahead so far, over all tables.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Encodes `rows` into files of `table` (at `path`), opening its writer on first use.
    pub(super) async fn write(
        &mut self,
        path: &LakeTable,
        table: &DeltaTable,
        evolves: bool,
        rows: &RecordBatch,
    ) -> Result<(), SinkError> {
        let derr = |source| SinkError::Delta {
            table: path.clone(),
            source,
        };
        if !self.writers.contains_key(path) {
            let properties = super::append::parquet_properties(|b| {
                b.set_max_row_group_bytes(Some(STAGED_ROW_GROUP_BYTES))
            });
            let writer = RecordBatchWriter::for_table(table)
                .map_err(derr)?
                .with_writer_properties(properties)
                .with_target_file_size(STAGED_FILE_BYTES);
            self.writers.insert(path.clone(), writer);
        }
        let writer = self.writers.get_mut(path).expect("inserted above");
        let conformed = conform(writer, path, rows)?;
        write_conformed(writer, evolves, conformed)
            .await
            .map_err(derr)?;
        self.rows += rows.num_rows();
        Ok(())
    }
}

/// `rows` with each column cast to the type `writer`'s table has for it: a source column
/// whose type changed is written in the lake's type (as appends through the write builder
/// do), and values that do not fit are an error naming the table and column.
pub(super) fn conform(
    writer: &RecordBatchWriter,
    path: &LakeTable,
    rows: &RecordBatch,
) -> Result<RecordBatch, SinkError> {
    cast_to(rows, &writer.arrow_schema()).map_err(|message| SinkError::Schema {
        table: path.clone(),
        message,
    })
}

/// `rows` cast to the types `lake_schema` has for its columns (see [`conform`]).
pub(super) fn conform_to(
    path: &LakeTable,
    rows: &RecordBatch,
    lake_schema: &SchemaRef,
) -> Result<RecordBatch, SinkError> {
    cast_to(rows, lake_schema).map_err(|message| SinkError::Schema {
        table: path.clone(),
        message,
    })
}

/// Writes conformed `rows` through `writer`: a table that follows its source's schema
/// takes new columns and leaves missing ones NULL.
pub(super) async fn write_conformed(
    writer: &mut RecordBatchWriter,
    evolves: bool,
    rows: RecordBatch,
) -> Result<(), deltalake::DeltaTableError> {
    if rows.num_rows() == 0 {
        return Ok(());
    }
    let mode = if evolves {
        WriteMode::MergeSchema
    } else {
        WriteMode::Default
    };
    writer.write_with_mode(rows, mode).await
}

/// Casts each column of `rows` that `table` has with another type to that type.
fn cast_to(rows: &RecordBatch, table: &SchemaRef) -> Result<RecordBatch, String> {
    let mut fields = Vec::with_capacity(rows.num_columns());
    let mut columns = Vec::with_capacity(rows.num_columns());
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    for (field, column) in rows.schema().fields().iter().zip(rows.columns()) {
        match table.field_with_name(field.name()) {
            Ok(want) if want.data_type() != field.data_type() => {
                let cast = arrow::compute::cast_with_options(column, want.data_type(), &options)
                    .map_err(|e| {
                        format!(
                            "column {} is {} in the lake and {} in the source: {e}",
                            field.name(),
                            want.data_type(),
                            field.data_type()
                        )
                    })?;
                fields.push(
                    field
                        .as_ref()
                        .clone()
                        .with_data_type(want.data_type().clone()),
                );
                columns.push(cast);
            }
            _ => {
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}
