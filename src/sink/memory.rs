//! An in-memory [`Destination`] for unit tests of the stages that write through one
//! (the processor, the snapshot writer). Never used for what users run.

use super::{ensure_table, Destination, LakeTable, ResumePoint, SinkError, TableProgress, Writes};
use crate::changelog::Lsn;
use arrow::array::RecordBatch;
use std::collections::BTreeMap;

/// What the next commit does instead of succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Nothing lands; the commit fails as an unreachable store would.
    Fail,
    /// Every table lands, but the reply is lost: the commit reports a failure.
    LoseReply,
}

/// One table's commit, as it landed.
#[derive(Debug, Clone)]
pub(crate) struct Landed {
    pub table: LakeTable,
    pub lsn: Lsn,
    pub rows: Vec<RecordBatch>,
}

#[derive(Default)]
pub(crate) struct MemoryStaged {
    rows: BTreeMap<LakeTable, Vec<RecordBatch>>,
}

pub(crate) struct MemorySink {
    progress: ResumePoint,
    /// Every table commit in order.
    pub landed: Vec<Landed>,
    pub next_fault: Option<Fault>,
}

impl MemorySink {
    /// A lake with these tables, each holding nothing.
    pub(crate) fn new(tables: impl IntoIterator<Item = LakeTable>) -> MemorySink {
        MemorySink {
            progress: ResumePoint::new(tables.into_iter().map(|t| (t, TableProgress::default()))),
            landed: Vec::new(),
            next_fault: None,
        }
    }

    /// Rows committed to `table` (every commit, in order).
    pub(crate) fn rows(&self, table: &LakeTable) -> usize {
        self.landed
            .iter()
            .filter(|l| &l.table == table)
            .flat_map(|l| &l.rows)
            .map(RecordBatch::num_rows)
            .sum()
    }

    fn land(&mut self, writes: Writes, lsn: Lsn, snapshot: bool) -> Result<(), SinkError> {
        let fault = self.next_fault.take();
        if fault == Some(Fault::Fail) {
            return Err(unreachable_store());
        }
        for (table, rows) in writes {
            if self.progress.tables().all(|(t, _)| t != &table) {
                return Err(SinkError::Unknown(table));
            }
            let empty = rows.iter().all(|b| b.num_rows() == 0);
            if self.progress.committed(&table) >= lsn || (empty && !snapshot) {
                continue;
            }
            self.progress.record(&table, lsn, snapshot);
            self.landed.push(Landed { table, lsn, rows });
        }
        match fault {
            Some(Fault::LoseReply) => Err(unreachable_store()),
            _ => Ok(()),
        }
    }
}

fn unreachable_store() -> SinkError {
    SinkError::Store {
        path: "memory".into(),
        source: deltalake::ObjectStoreError::Generic {
            store: "memory",
            source: "connection reset".into(),
        },
    }
}

impl Destination for MemorySink {
    type Staged = MemoryStaged;

    fn resume_point(&self) -> &ResumePoint {
        &self.progress
    }

    async fn write_snapshot_part(&mut self, writes: Writes, lsn: Lsn) -> Result<(), SinkError> {
        self.land(writes, lsn, true)
    }

    async fn write_snapshot(&mut self, mut writes: Writes, lsn: Lsn) -> Result<(), SinkError> {
        let tables: Vec<LakeTable> = self.progress.tables().map(|(t, _)| t.clone()).collect();
        for t in &tables {
            ensure_table(&mut writes, t);
        }
        self.land(writes, lsn, true)
    }

    async fn stage(
        &self,
        staged: &mut MemoryStaged,
        table: &LakeTable,
        rows: &RecordBatch,
    ) -> Result<(), SinkError> {
        staged
            .rows
            .entry(table.clone())
            .or_default()
            .push(rows.clone());
        Ok(())
    }

    async fn commit(
        &mut self,
        mut writes: Writes,
        lsn: Lsn,
        staged: MemoryStaged,
    ) -> Result<(), SinkError> {
        for (table, mut rows) in staged.rows {
            ensure_table(&mut writes, &table);
            let entry = writes
                .iter_mut()
                .find(|(t, _)| t == &table)
                .expect("ensured");
            rows.append(&mut entry.1);
            entry.1 = rows;
        }
        self.land(writes, lsn, false)
    }
}
