//! Delta Lake sink: one Delta table per raw source table and per feature file, under
//! one lake URL. Every commit carries a `txn` action (app id, version = the batch's end
//! LSN) in the same commit as its data, so on restart each table tells how far it got.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use deltalake::writer::DeltaWriter;
use deltalake::DeltaTable;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

mod lake;
mod maintain;
mod staged;
pub use lake::Lake;
pub use maintain::{maintain_table, Maintainer, MaintenanceConfig, MaintenanceReport};
pub use staged::StagedFiles;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("lake url `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("delta table {table}: {source}")]
    Delta {
        table: String,
        source: deltalake::DeltaTableError,
    },
    #[error("delta table {table}: the lake's schema differs from the pipeline's: {message}")]
    Schema { table: String, message: String },
    #[error("delta table {0} is not open in this sink")]
    Unknown(String),
    #[error("no Delta table at {0}")]
    Missing(String),
    #[error("lake object {path}: {source}")]
    Store {
        path: String,
        source: deltalake::ObjectStoreError,
    },
    #[error("local lake {path}: could not flush commits to disk: {source}")]
    Sync {
        path: String,
        source: std::io::Error,
    },
}

impl SinkError {
    /// The lake table the error is about, if it is about one.
    pub fn table(&self) -> Option<&str> {
        match self {
            SinkError::Delta { table, .. } | SinkError::Schema { table, .. } => Some(table),
            SinkError::Unknown(t) | SinkError::Missing(t) => Some(t),
            SinkError::Url { .. } | SinkError::Store { .. } | SinkError::Sync { .. } => None,
        }
    }

    /// Errors a retry may cure: the object store unreachable or failing, a commit race.
    /// Schema, URL and data errors are not.
    pub fn is_transient(&self) -> bool {
        use deltalake::DeltaTableError as E;
        match self {
            SinkError::Delta { source, .. } => {
                matches!(
                    source,
                    E::ObjectStore { .. }
                        | E::Io { .. }
                        | E::Transaction { .. }
                        | E::VersionAlreadyExists(_)
                        | E::KernelError(_)
                        | E::Kernel { .. }
                        | E::Generic(_)
                        | E::GenericError { .. }
                ) || store_unreachable(source)
            }
            SinkError::Store { .. } | SinkError::Sync { .. } => true,
            _ => false,
        }
    }
}

/// Whether `error`, or an error it wraps, is the object store failing to answer
/// (connection refused or reset, timeouts, 5xx after the client's own retries): the lake
/// may be back later. A missing object or a refused credential is not.
pub fn store_unreachable(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(store) = e.downcast_ref::<deltalake::ObjectStoreError>() {
            return matches!(
                store,
                deltalake::ObjectStoreError::Generic { .. }
                    | deltalake::ObjectStoreError::JoinError { .. }
            );
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        next = e.source();
    }
    false
}

/// A table the sink writes: its path under the lake root and the schema of its batches.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub path: String,
    pub schema: SchemaRef,
    /// The table follows its source's schema changes: appends add new columns to the
    /// Delta schema and leave columns the batches lack NULL (a dropped source column keeps
    /// its history); a snapshot replaces the schema. Otherwise the lake's column names
    /// must equal the batches' (feature tables: a changed feature file is an error).
    pub evolves: bool,
}

impl From<(String, SchemaRef)> for TableSpec {
    fn from((path, schema): (String, SchemaRef)) -> Self {
        TableSpec {
            path,
            schema,
            evolves: false,
        }
    }
}

struct SinkTable {
    /// Taken while a write is in flight.
    table: Option<DeltaTable>,
    schema: SchemaRef,
    evolves: bool,
    /// Highest txn version committed by this pipeline (0 = none).
    committed: u64,
    /// Version of the (re)snapshot the table holds (0 = none): see `snapshot_app_id`.
    snapshot: u64,
}

/// A snapshot commit carries a second txn action, under this app id, with the snapshot's
/// LSN. Tables that disagree on it betray a (re)snapshot interrupted part-way, which
/// the versions alone cannot tell from tables that simply had no changes for a while.
fn snapshot_app_id(app_id: &str) -> String {
    format!("{app_id}/snapshot")
}

pub struct DeltaSink {
    lake: Lake,
    app_id: String,
    tables: BTreeMap<String, SinkTable>,
    /// Told about every commit; checkpoints and compacts in the background.
    maintainer: Option<Maintainer>,
}

impl DeltaSink {
    /// Opens (creating when missing) every table at `<root>/<path>` with its schema.
    pub async fn open<S: Into<TableSpec>>(
        lake: Lake,
        app_id: String,
        specs: impl IntoIterator<Item = S>,
    ) -> Result<DeltaSink, SinkError> {
        Self::open_with(lake, app_id, specs, &HashMap::new()).await
    }

    /// Like [`DeltaSink::open`], and every table carries the Delta table `properties`
    /// (e.g. the maintenance retentions): set when a table is created, and with one
    /// metadata commit on a table that lacks or differs in one. Before any append, since
    /// a metadata change fails appends committing concurrently.
    pub async fn open_with<S: Into<TableSpec>>(
        lake: Lake,
        app_id: String,
        specs: impl IntoIterator<Item = S>,
        properties: &HashMap<String, String>,
    ) -> Result<DeltaSink, SinkError> {
        let mut tables = BTreeMap::new();
        for spec in specs {
            let TableSpec {
                path,
                schema,
                evolves,
            } = spec.into();
            let derr = |source| SinkError::Delta {
                table: path.clone(),
                source,
            };
            let mut table = lake.table(&path).await?;
            let (committed, snapshot) = if table.version().is_some() {
                if !evolves {
                    check_schema(&path, &table, &schema)?;
                }
                let log_store = table.log_store();
                let state = table.snapshot().map_err(derr)?;
                let mut versions = [0u64; 2];
                for (v, app) in versions
                    .iter_mut()
                    .zip([app_id.clone(), snapshot_app_id(&app_id)])
                {
                    let txn = state
                        .transaction_version(log_store.as_ref(), &app)
                        .await
                        .map_err(derr)?;
                    *v = txn.unwrap_or(0).max(0) as u64;
                }
                let current = state.metadata().configuration();
                if properties.iter().any(|(k, v)| current.get(k) != Some(v)) {
                    table = table
                        .set_tbl_properties()
                        .with_properties(properties.clone())
                        .with_raise_if_not_exists(false)
                        .await
                        .map_err(derr)?;
                    tracing::info!(table = %path, ?properties, "table properties set");
                }
                (versions[0], versions[1])
            } else {
                // Create it with an empty commit so readers always find the table.
                table = table
                    .write(vec![RecordBatch::new_empty(schema.clone())])
                    .with_save_mode(SaveMode::Append)
                    .with_configuration(properties.iter().map(|(k, v)| (k, Some(v))))
                    .await
                    .map_err(derr)?;
                (0, 0)
            };
            tables.insert(
                path,
                SinkTable {
                    table: Some(table),
                    schema,
                    evolves,
                    committed,
                    snapshot,
                },
            );
        }
        Ok(DeltaSink {
            lake,
            app_id,
            tables,
            maintainer: None,
        })
    }

    /// Hands every later commit to `maintainer`, which then owns checkpoints (commits
    /// stop writing them inline, which would add to the latency of every 100th batch).
    pub fn with_maintainer(mut self, maintainer: Maintainer) -> DeltaSink {
        self.maintainer = Some(maintainer);
        self
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// The highest batch version committed to `path` (0 when none).
    pub fn committed(&self, path: &str) -> u64 {
        self.tables.get(path).map(|t| t.committed).unwrap_or(0)
    }

    /// The lowest committed version over all tables: everything up to it is in every table.
    pub fn committed_everywhere(&self) -> u64 {
        self.tables.values().map(|t| t.committed).min().unwrap_or(0)
    }

    /// The current table (for reads, e.g. rebuilding state).
    pub fn table(&self, path: &str) -> Option<&DeltaTable> {
        self.tables.get(path).and_then(|t| t.table.as_ref())
    }

    /// The highest batch version committed to any table (0 when none).
    pub fn committed_anywhere(&self) -> u64 {
        self.tables.values().map(|t| t.committed).max().unwrap_or(0)
    }

    /// Committed version of every table, by path.
    pub fn committed_by_table(&self) -> Vec<(String, u64)> {
        self.tables
            .iter()
            .map(|(p, t)| (p.clone(), t.committed))
            .collect()
    }

    /// The snapshot version of every table, by path (0 = holds no snapshot).
    pub fn snapshots_by_table(&self) -> Vec<(String, u64)> {
        self.tables
            .iter()
            .map(|(p, t)| (p.clone(), t.snapshot))
            .collect()
    }

    /// Appends `writes` (table path → batches) as one commit per table, concurrently,
    /// each tagged with `version`. Tables that already hold `version` are skipped, so
    /// a retried batch is never written twice. Returns when every commit is durable.
    pub async fn commit(
        &mut self,
        writes: Vec<(String, Vec<RecordBatch>)>,
        version: u64,
    ) -> Result<(), SinkError> {
        self.commit_with(writes, version, SaveMode::Append, StagedFiles::default())
            .await
    }

    /// Writes `rows` to files of the table at `path` without committing them: they join
    /// the table with the commit that is given `staged` (see [`DeltaSink::commit_staged`]).
    pub async fn stage(
        &self,
        staged: &mut StagedFiles,
        path: &str,
        rows: &RecordBatch,
    ) -> Result<(), SinkError> {
        let entry = self
            .tables
            .get(path)
            .ok_or_else(|| SinkError::Unknown(path.to_string()))?;
        let table = entry.table.as_ref().expect("no commit in flight");
        staged.write(path, table, entry.evolves, rows).await
    }

    /// Like [`DeltaSink::commit`], with the files staged for this version joining the
    /// commit of their table (one commit per table, as for any batch).
    pub async fn commit_staged(
        &mut self,
        mut writes: Vec<(String, Vec<RecordBatch>)>,
        version: u64,
        staged: StagedFiles,
    ) -> Result<(), SinkError> {
        for path in staged.writers.keys() {
            if !writes.iter().any(|(p, _)| p == path) {
                writes.push((path.clone(), Vec::new()));
            }
        }
        self.commit_with(writes, version, SaveMode::Append, staged)
            .await
    }

    /// Replaces the content of **every** table with `writes` (tables not named become
    /// empty, unless an earlier [`DeltaSink::commit_snapshot_part`] gave them this
    /// `version`), each commit tagged with `version`. Used for the initial snapshot, so
    /// that a snapshot retaken after one interrupted part-way never doubles rows, and so
    /// that every table, empty ones included, records that it holds the snapshot.
    pub async fn commit_snapshot(
        &mut self,
        mut writes: Vec<(String, Vec<RecordBatch>)>,
        version: u64,
    ) -> Result<(), SinkError> {
        for path in self.tables.keys() {
            if !writes.iter().any(|(p, _)| p == path) {
                writes.push((path.clone(), Vec::new()));
            }
        }
        self.commit_snapshot_part(writes, version).await
    }

    /// Replaces the content of the tables named in `writes` only (see
    /// [`DeltaSink::commit_snapshot`], which must follow with the rest). One table at a
    /// time: each table's rows leave memory once it has committed.
    pub async fn commit_snapshot_part(
        &mut self,
        mut writes: Vec<(String, Vec<RecordBatch>)>,
        version: u64,
    ) -> Result<(), SinkError> {
        for (path, batches) in &mut writes {
            if batches.is_empty() {
                let entry = self
                    .tables
                    .get(path)
                    .ok_or_else(|| SinkError::Unknown(path.clone()))?;
                batches.push(RecordBatch::new_empty(entry.schema.clone()));
            }
        }
        self.commit_with(writes, version, SaveMode::Overwrite, StagedFiles::default())
            .await
    }

    async fn commit_with(
        &mut self,
        writes: Vec<(String, Vec<RecordBatch>)>,
        version: u64,
        mode: SaveMode,
        mut staged: StagedFiles,
    ) -> Result<(), SinkError> {
        // The rest of a staged transaction joins its files. Cast it first, so that a value
        // the lake's column cannot hold fails before any table is taken for a commit.
        let mut prepared = Vec::with_capacity(writes.len());
        for (path, batches) in writes {
            if !self.tables.contains_key(&path) {
                return Err(SinkError::Unknown(path));
            }
            match staged.writers.remove(&path) {
                Some(w) => {
                    let conformed = batches
                        .iter()
                        .map(|b| staged::conform(&w, &path, b))
                        .collect::<Result<Vec<_>, _>>()?;
                    prepared.push((path, conformed, Some(w)));
                }
                None => prepared.push((path, batches, None)),
            }
        }
        let mut jobs = Vec::new();
        for (path, batches, writer) in prepared {
            let entry = self.tables.get_mut(&path).expect("checked above");
            let empty = batches.iter().all(|b| b.num_rows() == 0) && writer.is_none();
            if entry.committed >= version || (empty && matches!(mode, SaveMode::Append)) {
                // Staged files of a version the table holds stay unreferenced (vacuumed).
                continue;
            }
            let evolves = entry.evolves;
            let table = entry.table.take().expect("no concurrent commit");
            let app_id = self.app_id.clone();
            let mut txns = vec![Transaction::new(&app_id, version as i64)];
            if matches!(mode, SaveMode::Overwrite) {
                txns.push(Transaction::new(snapshot_app_id(&app_id), version as i64));
            }
            let inline_checkpoints = self.maintainer.is_none();
            let schema_mode = match (entry.evolves, mode) {
                (false, _) => None,
                (true, SaveMode::Overwrite) => Some(SchemaMode::Overwrite),
                (true, _) => Some(SchemaMode::Merge),
            };
            jobs.push(async move {
                let started = Instant::now();
                let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
                let props = CommitProperties::default()
                    .with_application_transactions(txns)
                    .with_create_checkpoint(inline_checkpoints);
                let backup = table.clone();
                let result = match writer {
                    // Staged files: the rest of the rows join them, one commit for all.
                    Some(writer) => {
                        let mut writer = writer.with_commit_properties(props);
                        let mut table = table;
                        async {
                            for b in batches {
                                staged::write_conformed(&mut writer, evolves, b).await?;
                            }
                            writer.flush_and_commit(&mut table).await
                        }
                        .await
                        .map(|_| table)
                    }
                    None => {
                        let mut write = table
                            .write(batches)
                            .with_save_mode(mode)
                            .with_commit_properties(props);
                        if let Some(m) = schema_mode {
                            write = write.with_schema_mode(m);
                        }
                        write.await
                    }
                };
                match result {
                    Ok(t) => {
                        tracing::debug!(table = %path, rows, version = ?t.version(),
                            elapsed_ms = started.elapsed().as_millis() as u64, "delta commit");
                        (path, Ok(t))
                    }
                    Err(e) => match committed_version(backup, &app_id).await {
                        // The commit landed but its reply was lost (or a retry raced it):
                        // the table's txn version says this batch is in, exactly once.
                        Ok((t, v)) if v >= version => {
                            tracing::warn!(table = %path, version, error = %e,
                                "commit reported an error but the table holds this batch: treating it as committed");
                            (path, Ok(t))
                        }
                        Ok((t, _)) => (path, Err((t, e))),
                        Err((t, _)) => (path, Err((t, e))),
                    },
                }
            });
        }
        let mut first_error = None;
        let results = if matches!(mode, SaveMode::Overwrite) {
            // The snapshot: one table at a time, so only one table's Parquet encoding is
            // in memory at once (the full dump's tables are large; a streamed batch is not).
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                results.push(job.await);
            }
            results
        } else {
            futures::future::join_all(jobs).await
        };
        for (path, result) in results {
            let entry = self.tables.get_mut(&path).expect("known table");
            match result {
                Ok(t) => {
                    entry.table = Some(t);
                    entry.committed = version;
                    if matches!(mode, SaveMode::Overwrite) {
                        entry.snapshot = version;
                    }
                    if let Some(m) = &self.maintainer {
                        m.committed(&path);
                    }
                }
                Err((backup, source)) => {
                    entry.table = Some(backup);
                    first_error.get_or_insert(SinkError::Delta {
                        table: path,
                        source,
                    });
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // Callers acknowledge the version to Postgres once this returns.
        self.lake.make_durable().await
    }
}

/// Reloads `table` and returns it with the txn version it holds for `app_id` (0 = none);
/// on a read error, the table as it was.
async fn committed_version(
    mut table: DeltaTable,
    app_id: &str,
) -> Result<(DeltaTable, u64), (DeltaTable, deltalake::DeltaTableError)> {
    let before = table.clone();
    if let Err(e) = table.update_state().await {
        return Err((before, e));
    }
    let version = match table.snapshot() {
        Ok(snapshot) => {
            snapshot
                .transaction_version(table.log_store().as_ref(), app_id)
                .await
        }
        Err(e) => Err(e),
    };
    match version {
        Ok(v) => Ok((table, v.unwrap_or(0).max(0) as u64)),
        Err(e) => Err((before, e)),
    }
}

fn check_schema(path: &str, table: &DeltaTable, want: &SchemaRef) -> Result<(), SinkError> {
    let snapshot = table.snapshot().map_err(|source| SinkError::Delta {
        table: path.to_string(),
        source,
    })?;
    let have: Arc<arrow::datatypes::Schema> = snapshot.snapshot().arrow_schema();
    let names = |s: &arrow::datatypes::Schema| -> Vec<String> {
        s.fields().iter().map(|f| f.name().clone()).collect()
    };
    if names(&have) != names(want) {
        return Err(SinkError::Schema {
            table: path.to_string(),
            message: format!(
                "lake has {:?}, pipeline writes {:?}",
                names(&have),
                names(want)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::ObjectStoreError;

    fn in_parquet(e: ObjectStoreError) -> SinkError {
        SinkError::Delta {
            table: "raw/user".into(),
            source: deltalake::DeltaTableError::Parquet {
                source: deltalake::parquet::errors::ParquetError::External(Box::new(e)),
            },
        }
    }

    #[test]
    fn an_unreachable_store_deep_in_an_error_is_transient_a_missing_file_is_not() {
        let unreachable = in_parquet(ObjectStoreError::Generic {
            store: "S3",
            source: "error sending request".into(),
        });
        assert!(unreachable.is_transient());
        let missing = in_parquet(ObjectStoreError::NotFound {
            path: "part-0.parquet".into(),
            source: "404".into(),
        });
        assert!(!missing.is_transient());
    }
}
