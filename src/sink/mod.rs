//! The destination of every change: the lake. One Delta table per raw source table and
//! per feature file, under one lake URL ([`LakeTable`] names them). Every commit carries a
//! `txn` action (app id, version = the batch's end LSN) in the same commit as its data,
//! so on restart each table tells how far it got ([`ResumePoint`]).
//!
//! [`Destination`] is the contract the runner writes through; [`DeltaSink`] implements
//! it on a [`Lake`]. Maintenance (checkpoints, compaction, vacuum) runs beside it.

use crate::changelog::Lsn;
use arrow::array::RecordBatch;
use std::collections::BTreeMap;
use std::future::Future;

mod append;
pub mod checkpoint;
mod compact;
mod delta;
mod lake;
mod layout;
mod log_cache;
mod log_files;
mod log_probe;
mod maintain;
#[cfg(test)]
pub(crate) mod memory;
mod staged;
pub(crate) use delta::{replace_history, table_progress};
pub use delta::{DeltaSink, TableSpec};
pub use lake::Lake;
pub use layout::{LakeTable, Mark, TableKind};
pub use maintain::{maintain_table, Maintainer, MaintenanceReport};
pub use staged::StagedFiles;

/// Rows for some tables of the lake, by table.
pub type Writes = Vec<(LakeTable, Vec<RecordBatch>)>;

/// Adds `table` to `writes`, with no rows, unless it is there.
fn ensure_table(writes: &mut Writes, table: &LakeTable) {
    if !writes.iter().any(|(t, _)| t == table) {
        writes.push((table.clone(), Vec::new()));
    }
}

/// Where change batches and snapshots go, with durability in the contract: once a
/// write returns `Ok`, what it wrote survives a crash of this process and of the
/// machine, so the caller may acknowledge its LSN to Postgres. On `Err` nothing may be
/// acknowledged; some tables may hold the write, which the [`ResumePoint`] then shows.
///
/// Writes are idempotent per table and LSN: a table that already holds `lsn` skips it,
/// so a batch replayed after a crash (or a commit whose reply was lost) is never
/// written twice.
pub trait Destination {
    /// Files written ahead for one large transaction (see [`Destination::stage`]).
    type Staged: Default + Send;

    /// How far each table got: read when the destination opens, moved by every commit.
    fn resume_point(&self) -> &ResumePoint;

    /// Replaces the content of the tables named in `writes` with a snapshot taken at
    /// `lsn`, one table at a time (each table's rows leave memory once it committed).
    /// [`Destination::write_snapshot`] must follow with the rest.
    fn write_snapshot_part(
        &mut self,
        writes: Writes,
        lsn: Lsn,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Replaces the content of **every** table not yet holding the snapshot at `lsn`
    /// with `writes` (tables not named become empty), so that a snapshot retaken after
    /// one interrupted part-way never doubles rows, and every table records it.
    fn write_snapshot(
        &mut self,
        writes: Writes,
        lsn: Lsn,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Writes `rows` ahead for `table` without committing them: they join the table
    /// with the commit that is given `staged`. A stop before leaves them unreferenced.
    fn stage(
        &self,
        staged: &mut Self::Staged,
        table: &LakeTable,
        rows: &RecordBatch,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Appends `writes` and the `staged` files as one commit per table, each tagged
    /// with `lsn` (the batch's end LSN). Durable when it returns `Ok`.
    fn commit(
        &mut self,
        writes: Writes,
        lsn: Lsn,
        staged: Self::Staged,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// A borrowed destination is one too, so that a stage may own either (the unit tests
/// keep theirs to inspect it afterwards).
impl<D: Destination + Send + Sync> Destination for &mut D {
    type Staged = D::Staged;

    fn resume_point(&self) -> &ResumePoint {
        (**self).resume_point()
    }

    fn write_snapshot_part(
        &mut self,
        writes: Writes,
        lsn: Lsn,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).write_snapshot_part(writes, lsn)
    }

    fn write_snapshot(
        &mut self,
        writes: Writes,
        lsn: Lsn,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).write_snapshot(writes, lsn)
    }

    fn stage(
        &self,
        staged: &mut Self::Staged,
        table: &LakeTable,
        rows: &RecordBatch,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).stage(staged, table, rows)
    }

    fn commit(
        &mut self,
        writes: Writes,
        lsn: Lsn,
        staged: Self::Staged,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).commit(writes, lsn, staged)
    }
}

/// What one table of the lake holds from this pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableProgress {
    /// Highest batch version (an end LSN) committed (zero: none).
    pub committed: Lsn,
    /// Version of the (re)snapshot the table holds (zero: none).
    pub snapshot: Lsn,
}

/// How far every table of the lake got: where a run resumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumePoint {
    tables: BTreeMap<LakeTable, TableProgress>,
}

impl ResumePoint {
    pub fn new(tables: impl IntoIterator<Item = (LakeTable, TableProgress)>) -> ResumePoint {
        ResumePoint {
            tables: tables.into_iter().collect(),
        }
    }

    /// Every table, in path order.
    pub fn tables(&self) -> impl Iterator<Item = (&LakeTable, &TableProgress)> {
        self.tables.iter()
    }

    /// The highest batch version committed to `table` (zero when none).
    pub fn committed(&self, table: &LakeTable) -> Lsn {
        self.tables
            .get(table)
            .map(|t| t.committed)
            .unwrap_or_default()
    }

    /// The lowest committed version over all tables: everything up to it is in every table.
    pub fn committed_everywhere(&self) -> Lsn {
        self.tables
            .values()
            .map(|t| t.committed)
            .min()
            .unwrap_or_default()
    }

    /// The highest committed version of any table (zero when none).
    pub fn committed_anywhere(&self) -> Lsn {
        self.tables
            .values()
            .map(|t| t.committed)
            .max()
            .unwrap_or_default()
    }

    /// Records a commit of `table` at `lsn` (a snapshot's too, when `snapshot`).
    pub(crate) fn record(&mut self, table: &LakeTable, lsn: Lsn, snapshot: bool) {
        let t = self.tables.entry(table.clone()).or_default();
        t.committed = lsn;
        if snapshot {
            t.snapshot = lsn;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("lake url `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("delta table {table}: {source}")]
    Delta {
        table: LakeTable,
        source: deltalake::DeltaTableError,
    },
    #[error("delta table {table}: the lake's schema differs from the pipeline's: {message}")]
    Schema { table: LakeTable, message: String },
    #[error("delta table {0} is not open in this sink")]
    Unknown(LakeTable),
    #[error("lake {root}: {source}")]
    Open {
        root: String,
        source: deltalake::DeltaTableError,
    },
    #[error("no Delta table at {0}")]
    Missing(String),
    #[error("lake object {path}: {source}")]
    Store {
        path: String,
        source: deltalake::ObjectStoreError,
    },
    #[error("delta table {table}: reading it: {source}")]
    Read {
        table: LakeTable,
        source: datafusion::error::DataFusionError,
    },
    #[error("local lake {path}: could not flush commits to disk: {source}")]
    Sync {
        path: String,
        source: std::io::Error,
    },
}

impl SinkError {
    /// The lake table the error is about, if it is about one.
    pub fn table(&self) -> Option<&LakeTable> {
        match self {
            SinkError::Delta { table, .. }
            | SinkError::Schema { table, .. }
            | SinkError::Read { table, .. } => Some(table),
            SinkError::Unknown(t) => Some(t),
            SinkError::Missing(_)
            | SinkError::Url { .. }
            | SinkError::Open { .. }
            | SinkError::Store { .. }
            | SinkError::Sync { .. } => None,
        }
    }
}
