//! [`State`]: every source table's current image, as one stage. The feature engine
//! reads it through DataFusion; the snapshot and the rebuild load it; each batch is
//! applied to it; an online read API will read it too.

use super::{Key, StateError, StateTable};
use crate::batch::ChangeBatch;
use crate::changelog::{Changes, Op, TableId};
use crate::source::TableSchema;
use arrow::array::RecordBatch;
use datafusion::common::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// A handle on the state of every configured table (cheap to clone).
#[derive(Clone)]
pub struct State {
    tables: Arc<[Arc<RwLock<StateTable>>]>,
}

/// Primary keys one batch changes in one table.
pub struct Changed {
    pub keys: Vec<Key>,
    /// The table was truncated: every row it held before changed too.
    pub truncated: bool,
}

impl State {
    /// Empty state for `schemas`, each table indexed on the columns `indexed` gives it
    /// (the columns feature mappings look rows up by).
    pub fn new(
        schemas: &[TableSchema],
        indexed: impl Fn(TableId) -> Vec<usize>,
    ) -> Result<State, StateError> {
        let tables = schemas
            .iter()
            .zip(TableId::all(schemas.len()))
            .map(|(s, id)| {
                StateTable::new(&s.name.name, s.schema.clone(), s.key.clone(), indexed(id))
                    .map(|t| Arc::new(RwLock::new(t)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(State {
            tables: tables.into(),
        })
    }

    /// One table, for a DataFusion provider or a lookup.
    pub fn table(&self, id: TableId) -> &Arc<RwLock<StateTable>> {
        &self.tables[id.index()]
    }

    /// Every table read-locked at once: one consistent view.
    pub fn read(&self) -> Vec<RwLockReadGuard<'_, StateTable>> {
        self.tables.iter().map(|t| t.read().unwrap()).collect()
    }

    /// Rows in each table.
    pub fn sizes(&self) -> Vec<usize> {
        self.tables
            .iter()
            .map(|t| t.read().unwrap().len())
            .collect()
    }

    /// Loads a snapshot's rows of every table (in configured order), on a blocking
    /// thread: the caller commits the raw tables meanwhile. Resolves when every row is in.
    pub fn load_snapshot(
        &self,
        tables: Vec<Vec<RecordBatch>>,
    ) -> impl std::future::Future<Output = Result<(), StateError>> {
        let state = self.clone();
        // Spawned now, not when the returned future is first polled.
        let loading = tokio::task::spawn_blocking(move || {
            for (table, batches) in state.tables.iter().zip(&tables) {
                let mut table = table.write().unwrap();
                table.expect_rows(batches.iter().map(RecordBatch::num_rows).sum());
                for b in batches {
                    // Plain rows: every one an insert.
                    table.apply(&Changes::new(b.clone(), vec![Op::Insert; b.num_rows()]))?;
                }
            }
            Ok(())
        });
        async move { loading.await.expect("state loading panicked") }
    }

    /// Loads raw changes read back from the lake in any order (see
    /// [`StateTable::apply_unordered`]).
    pub fn load_unordered(
        &self,
        table: TableId,
        rows: &RecordBatch,
        applied: &mut HashMap<Key, (i64, i64)>,
    ) -> Result<(), StateError> {
        self.table(table)
            .write()
            .unwrap()
            .apply_unordered(rows, applied)
    }

    /// Replaces the unchanged-TOAST placeholders of `batch` by the values the rows had
    /// before it, from state (pgoutput sends no value for a TOASTed column an update did
    /// not change). Call before the batch is applied or written.
    pub fn fill_unchanged_toast(&self, batch: &mut ChangeBatch) -> Result<(), StateError> {
        for (t, cells) in batch.unchanged_toast.iter_mut().enumerate() {
            if cells.is_empty() {
                continue;
            }
            if let Some(changes) = batch.tables[t].take() {
                let filled = self.tables[t]
                    .read()
                    .unwrap()
                    .fill_unchanged(changes, cells)?;
                batch.tables[t] = Some(filled);
            }
            cells.clear();
        }
        Ok(())
    }

    /// The primary keys `batch` changes, per table.
    pub fn changed_keys(&self, batch: &ChangeBatch) -> Vec<Changed> {
        self.tables
            .iter()
            .zip(&batch.tables)
            .map(|(t, changes)| match changes {
                None => Changed {
                    keys: Vec::new(),
                    truncated: false,
                },
                Some(changes) => Changed {
                    keys: t.read().unwrap().batch_keys(changes.rows()),
                    truncated: changes.ops().contains(&Op::Truncate),
                },
            })
            .collect()
    }

    /// Applies every table's changes of `batch`, in order.
    pub fn apply(&self, batch: &ChangeBatch) -> Result<(), StateError> {
        for (table, changes) in self.tables.iter().zip(&batch.tables) {
            if let Some(changes) = changes {
                table.write().unwrap().apply(changes)?;
            }
        }
        Ok(())
    }
}
