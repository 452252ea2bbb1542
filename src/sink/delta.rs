//! [`DeltaSink`]: the [`Destination`] on Delta tables of a [`Lake`]. One commit per table
//! per batch, the tables of a batch committed concurrently, each carrying a `txn` action
//! whose version is the batch's end LSN.

use super::append;
use super::compact::{self, Folds};
use super::staged::{self, StagedFiles};
use super::{ensure_table, Writes};
use super::{Destination, Lake, LakeTable, Maintainer, ResumePoint, SinkError, TableProgress};
use crate::changelog::Lsn;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use deltalake::writer::RecordBatchWriter;
use deltalake::DeltaTable;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// A table the sink writes and the schema of its batches.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub table: LakeTable,
    pub schema: SchemaRef,
    /// The table follows its source's schema changes: appends add new columns to the
    /// Delta schema and leave columns the batches lack NULL (a dropped source column keeps
    /// its history); a snapshot replaces the schema. Otherwise the lake's column names
    /// must equal the batches' (feature tables: a changed feature file is an error).
    pub evolves: bool,
}

impl From<(LakeTable, SchemaRef)> for TableSpec {
    fn from((table, schema): (LakeTable, SchemaRef)) -> Self {
        TableSpec {
            table,
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
    tables: BTreeMap<LakeTable, SinkTable>,
    progress: ResumePoint,
    /// Told about every commit; checkpoints and compacts in the background.
    maintainer: Option<Maintainer>,
}

/// How a commit writes its table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CommitKind {
    /// Appends rows (a change batch).
    Append,
    /// Replaces the table's content (a snapshot).
    Replace,
}

/// One table's part of a commit, ready to go.
struct TableCommit {
    path: LakeTable,
    batches: Vec<RecordBatch>,
    /// Files of a large transaction written ahead, which the rows join.
    writer: Option<RecordBatchWriter>,
}

impl DeltaSink {
    /// Opens (creating when missing) every table of `specs` with its schema.
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
        let mut progress = Vec::new();
        for spec in specs {
            let TableSpec {
                table: path,
                schema,
                evolves,
            } = spec.into();
            let (table, p) =
                open_table(&lake, &app_id, &path, &schema, evolves, properties).await?;
            progress.push((path.clone(), p));
            tables.insert(
                path,
                SinkTable {
                    table: Some(table),
                    schema,
                    evolves,
                },
            );
        }
        Ok(DeltaSink {
            lake,
            app_id,
            tables,
            progress: ResumePoint::new(progress),
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

    /// The current table (for reads, e.g. rebuilding state).
    pub fn table(&self, path: &LakeTable) -> Option<&DeltaTable> {
        self.tables.get(path).and_then(|t| t.table.as_ref())
    }

    /// Appends `writes` as one commit per table tagged with `lsn` (see
    /// [`Destination::commit`]), without staged files.
    pub async fn append(&mut self, writes: Writes, lsn: Lsn) -> Result<(), SinkError> {
        self.commit_with(writes, lsn, CommitKind::Append, StagedFiles::default())
            .await
    }

    async fn commit_with(
        &mut self,
        writes: Writes,
        version: Lsn,
        kind: CommitKind,
        staged: StagedFiles,
    ) -> Result<(), SinkError> {
        let prepared = self.prepare(writes, staged)?;
        let mut jobs = Vec::new();
        for commit in prepared {
            let entry = self
                .tables
                .get_mut(&commit.path)
                .expect("checked in prepare");
            let empty = commit.batches.iter().all(|b| b.num_rows() == 0) && commit.writer.is_none();
            if self.progress.committed(&commit.path) >= version
                || (empty && kind == CommitKind::Append)
            {
                // Staged files of a version the table holds stay unreferenced (vacuumed).
                continue;
            }
            let table = entry.table.take().expect("no concurrent commit");
            let props = CommitProps {
                app_id: self.app_id.clone(),
                version,
                kind,
                evolves: entry.evolves,
                inline_checkpoints: self.maintainer.is_none(),
                lake: self.lake.clone(),
                folds: self.maintainer.as_ref().map(|m| m.folds().clone()),
            };
            jobs.push(commit_table(table, commit, props));
        }
        let results = if kind == CommitKind::Replace {
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
        // Appends fsync what they wrote; the rest (a snapshot, a schema change, a commit
        // whose reply was lost) syncs the lake's filesystem.
        let synced =
            kind == CommitKind::Append && results.iter().all(|(_, r)| matches!(r, Ok((_, true))));
        let results = results
            .into_iter()
            .map(|(path, r)| (path, r.map(|(t, _)| t)))
            .collect();
        self.finish(results, version, kind)?;
        // Callers acknowledge the version to Postgres once this returns.
        if synced {
            Ok(())
        } else {
            self.lake.make_durable().await
        }
    }

    /// Checks every table is open here and casts the rest of a staged transaction to
    /// its files' schema, before any table is taken for a commit: a value the lake's
    /// column cannot hold fails without a partial commit.
    fn prepare(
        &self,
        writes: Writes,
        mut staged: StagedFiles,
    ) -> Result<Vec<TableCommit>, SinkError> {
        let mut prepared = Vec::with_capacity(writes.len());
        for (path, batches) in writes {
            if !self.tables.contains_key(&path) {
                return Err(SinkError::Unknown(path));
            }
            let commit = match staged.writers.remove(&path) {
                Some(w) => TableCommit {
                    batches: batches
                        .iter()
                        .map(|b| staged::conform(&w, &path, b))
                        .collect::<Result<Vec<_>, _>>()?,
                    writer: Some(w),
                    path,
                },
                None => {
                    let entry = &self.tables[&path];
                    // A source column whose type changed is written in the lake's type,
                    // checked for every table before any commits.
                    let batches = match entry.table.as_ref().map(|t| t.snapshot()) {
                        Some(Ok(s)) => {
                            let lake_schema = s.snapshot().arrow_schema();
                            batches
                                .iter()
                                .map(|b| staged::conform_to(&path, b, &lake_schema))
                                .collect::<Result<Vec<_>, _>>()?
                        }
                        _ => batches,
                    };
                    TableCommit {
                        path,
                        batches,
                        writer: None,
                    }
                }
            };
            prepared.push(commit);
        }
        Ok(prepared)
    }

    /// Puts the tables back and records the commits; the first failure is returned.
    fn finish(
        &mut self,
        results: Vec<(LakeTable, TableResult)>,
        version: Lsn,
        kind: CommitKind,
    ) -> Result<(), SinkError> {
        let mut first_error = None;
        for (path, result) in results {
            let entry = self.tables.get_mut(&path).expect("known table");
            match result {
                Ok(t) => {
                    if let Some(m) = &self.maintainer {
                        m.committed(&path, &t);
                    }
                    entry.table = Some(t);
                    self.progress
                        .record(&path, version, kind == CommitKind::Replace);
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
        first_error.map_or(Ok(()), Err)
    }

    /// Adds an empty batch for every table of the sink that `writes` does not name yet.
    fn with_every_table(&self, mut writes: Writes) -> Writes {
        for path in self.tables.keys() {
            ensure_table(&mut writes, path);
        }
        writes
    }
}

impl Destination for DeltaSink {
    type Staged = StagedFiles;

    fn resume_point(&self) -> &ResumePoint {
        &self.progress
    }

    async fn write_snapshot_part(&mut self, mut writes: Writes, lsn: Lsn) -> Result<(), SinkError> {
        for (path, batches) in &mut writes {
            if batches.is_empty() {
                let entry = self
                    .tables
                    .get(path)
                    .ok_or_else(|| SinkError::Unknown(path.clone()))?;
                batches.push(RecordBatch::new_empty(entry.schema.clone()));
            }
        }
        self.commit_with(writes, lsn, CommitKind::Replace, StagedFiles::default())
            .await
    }

    async fn write_snapshot(&mut self, writes: Writes, lsn: Lsn) -> Result<(), SinkError> {
        let writes = self.with_every_table(writes);
        self.write_snapshot_part(writes, lsn).await
    }

    async fn stage(
        &self,
        staged: &mut StagedFiles,
        path: &LakeTable,
        rows: &RecordBatch,
    ) -> Result<(), SinkError> {
        let entry = self
            .tables
            .get(path)
            .ok_or_else(|| SinkError::Unknown(path.clone()))?;
        let table = entry.table.as_ref().expect("no commit in flight");
        staged.write(path, table, entry.evolves, rows).await
    }

    async fn commit(
        &mut self,
        mut writes: Writes,
        lsn: Lsn,
        staged: StagedFiles,
    ) -> Result<(), SinkError> {
        // A table with staged files commits even when the batch's end has no rows for it.
        for path in staged.writers.keys() {
            ensure_table(&mut writes, path);
        }
        self.commit_with(writes, lsn, CommitKind::Append, staged)
            .await
    }
}

/// What every table's commit of one call shares.
struct CommitProps {
    app_id: String,
    version: Lsn,
    kind: CommitKind,
    evolves: bool,
    inline_checkpoints: bool,
    lake: Lake,
    /// What the maintainer has ready to fold into appends.
    folds: Option<Folds>,
}

/// The table after its commit (and whether the commit made its files durable itself),
/// or as it was with the error.
type CommitResult = Result<(DeltaTable, bool), (DeltaTable, deltalake::DeltaTableError)>;
type TableResult = Result<DeltaTable, (DeltaTable, deltalake::DeltaTableError)>;

/// Commits one table's part: its rows (joining its staged files, if any) and the `txn`
/// actions. A commit that reports an error but whose `txn` the table holds afterwards
/// (the reply was lost, or a retry raced it) counts as committed, exactly once.
async fn commit_table(
    table: DeltaTable,
    commit: TableCommit,
    props: CommitProps,
) -> (LakeTable, CommitResult) {
    let TableCommit {
        path,
        batches,
        writer,
    } = commit;
    let started = Instant::now();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut txns = vec![Transaction::new(&props.app_id, props.version.as_i64())];
    if props.kind == CommitKind::Replace {
        txns.push(Transaction::new(
            snapshot_app_id(&props.app_id),
            props.version.as_i64(),
        ));
    }
    let commit_properties = CommitProperties::default()
        .with_application_transactions(txns)
        .with_create_checkpoint(props.inline_checkpoints)
        // Listing and pruning the log at every commit grows with the log; the maintainer
        // does it after each checkpoint.
        .with_cleanup_expired_logs((!props.inline_checkpoints).then_some(false));
    let backup = table.clone();
    let result = match props.kind {
        CommitKind::Append => {
            let table = match props.folds.as_ref().and_then(|f| f.take_fresh(&path)) {
                Some(fresh) => {
                    let started = Instant::now();
                    let table = compact::continue_from(table, fresh).await;
                    metrics::histogram!(crate::metrics::TABLE_COMMIT_STEP_SECONDS, "step" => "reload")
                        .record(started.elapsed().as_secs_f64());
                    table
                }
                None => table,
            };
            let target = append::Target {
                path: &path,
                evolves: props.evolves,
                folds: props.folds.as_ref(),
                lake: &props.lake,
            };
            append::append(table, batches, writer, commit_properties, target)
                .await
                .map(|a| (a.table, a.synced))
        }
        CommitKind::Replace => {
            let (mode, schema_mode) = match props.evolves {
                false => (SaveMode::Overwrite, None),
                true => (SaveMode::Overwrite, Some(SchemaMode::Overwrite)),
            };
            let mut write = table
                .write(batches)
                .with_save_mode(mode)
                .with_commit_properties(commit_properties);
            if let Some(m) = schema_mode {
                write = write.with_schema_mode(m);
            }
            write
                .await
                .map(|t| (t, false))
                .map_err(|source| SinkError::Delta {
                    table: path.clone(),
                    source,
                })
        }
    };
    let version = props.version;
    match result {
        Ok((t, synced)) => {
            metrics::histogram!(crate::metrics::TABLE_COMMIT_SECONDS, "table" => path.to_string())
                .record(started.elapsed().as_secs_f64());
            tracing::trace!(table = %path, rows, version = ?t.version(),
                elapsed_ms = started.elapsed().as_millis() as u64, "table committed");
            (path, Ok((t, synced)))
        }
        Err(e) => {
            let e = match e {
                SinkError::Delta { source, .. } => source,
                other => deltalake::DeltaTableError::Generic(other.to_string()),
            };
            match committed_version(backup, &props.app_id).await {
                Ok((t, v)) if v >= version => {
                    tracing::warn!(table = %path, %version, error = %e,
                        "commit reported an error but the table holds this batch: treating it as committed");
                    (path, Ok((t, false)))
                }
                Ok((t, _)) | Err((t, _)) => (path, Err((t, e))),
            }
        }
    }
}

/// Opens (creating when missing) one table and reads what it holds from `app_id`.
async fn open_table(
    lake: &Lake,
    app_id: &str,
    path: &LakeTable,
    schema: &SchemaRef,
    evolves: bool,
    properties: &HashMap<String, String>,
) -> Result<(DeltaTable, TableProgress), SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let mut table = lake.table(path).await?;
    if table.version().is_none() {
        // Create it with an empty commit so readers always find the table.
        let table = table
            .write(vec![RecordBatch::new_empty(schema.clone())])
            .with_save_mode(SaveMode::Append)
            .with_configuration(properties.iter().map(|(k, v)| (k, Some(v))))
            .await
            .map_err(derr)?;
        return Ok((table, TableProgress::default()));
    }
    if !evolves {
        table = add_columns_added_since(path, table, schema).await?;
        check_schema(path, &table, schema)?;
    }
    let progress = table_progress(path, &table, app_id).await?;
    let current = table.snapshot().map_err(derr)?.metadata().configuration();
    if properties.iter().any(|(k, v)| current.get(k) != Some(v)) {
        table = table
            .set_tbl_properties()
            .with_properties(properties.clone())
            .with_raise_if_not_exists(false)
            .await
            .map_err(derr)?;
        tracing::info!(table = %path, ?properties, "table properties set");
    }
    Ok((table, progress))
}

/// How far `table` got for `app_id`: the txn versions of its batches and of its snapshot.
pub(crate) async fn table_progress(
    path: &LakeTable,
    table: &DeltaTable,
    app_id: &str,
) -> Result<TableProgress, SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let log_store = table.log_store();
    let state = table.snapshot().map_err(derr)?;
    let mut versions = [Lsn::ZERO; 2];
    for (v, app) in versions
        .iter_mut()
        .zip([app_id.to_string(), snapshot_app_id(app_id)])
    {
        let txn = state
            .transaction_version(log_store.as_ref(), &app)
            .await
            .map_err(derr)?;
        *v = Lsn::from_i64(txn.unwrap_or(0));
    }
    Ok(TableProgress {
        committed: versions[0],
        snapshot: versions[1],
    })
}

/// Replaces `path`'s content and schema with `batches` (creating the table, with
/// `properties`, when missing) in one commit that says the table holds the batches up
/// to `progress.committed` of the snapshot at `progress.snapshot`, as a stream from that
/// snapshot would have left it. Earlier versions stay readable by time travel until
/// vacuumed. Durable when it returns.
pub(crate) async fn replace_history(
    lake: &Lake,
    app_id: &str,
    path: &LakeTable,
    batches: Vec<RecordBatch>,
    progress: TableProgress,
    properties: &HashMap<String, String>,
) -> Result<DeltaTable, SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let table = lake.table(path).await?;
    let create = table.version().is_none();
    let txns = vec![
        Transaction::new(app_id, progress.committed.as_i64()),
        Transaction::new(snapshot_app_id(app_id), progress.snapshot.as_i64()),
    ];
    let mut write = table
        .write(batches)
        .with_save_mode(SaveMode::Overwrite)
        .with_schema_mode(SchemaMode::Overwrite)
        .with_commit_properties(CommitProperties::default().with_application_transactions(txns));
    if create {
        write = write.with_configuration(properties.iter().map(|(k, v)| (k, Some(v))));
    }
    let table = write.await.map_err(derr)?;
    lake.make_durable().await?;
    Ok(table)
}

/// Reloads `table` and returns it with the txn version it holds for `app_id` (zero =
/// none); on a read error, the table as it was.
async fn committed_version(
    mut table: DeltaTable,
    app_id: &str,
) -> Result<(DeltaTable, Lsn), (DeltaTable, deltalake::DeltaTableError)> {
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
        Ok(v) => Ok((table, Lsn::from_i64(v.unwrap_or(0)))),
        Err(e) => Err((before, e)),
    }
}

/// Adds to a fixed-schema table the columns every such table has gained since it was
/// created ([`ADDED_SINCE`]), which the pipeline writes and the lake lacks: rows written
/// before read NULL there. Any other difference is for [`check_schema`] to report.
async fn add_columns_added_since(
    path: &LakeTable,
    table: DeltaTable,
    want: &SchemaRef,
) -> Result<DeltaTable, SinkError> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let have = table.snapshot().map_err(derr)?.snapshot().arrow_schema();
    let missing: Vec<deltalake::kernel::StructField> = want
        .fields()
        .iter()
        .filter(|f| ADDED_SINCE.contains(&f.name().as_str()) && f.is_nullable())
        .filter(|f| have.field_with_name(f.name()).is_err())
        .map(|f| f.as_ref().try_into_kernel())
        .collect::<Result<_, _>>()
        .map_err(|e| derr(e.into()))?;
    if missing.is_empty() {
        return Ok(table);
    }
    let names: Vec<String> = missing.iter().map(|f| f.name().to_string()).collect();
    // Only when that is the whole difference: otherwise nothing is committed and the
    // schema check names what differs.
    let after: Vec<&String> = have
        .fields()
        .iter()
        .map(|f| f.name())
        .chain(&names)
        .collect();
    if !after.into_iter().eq(want.fields().iter().map(|f| f.name())) {
        return Ok(table);
    }
    let table = table
        .add_columns()
        .with_fields(missing)
        .await
        .map_err(derr)?;
    tracing::info!(table = %path, columns = ?names, "columns added (NULL in earlier rows)");
    Ok(table)
}

/// Reserved columns added to every feature table after its first release.
const ADDED_SINCE: [&str; 1] = [crate::config::OUTPUT_COMMIT_TS];

fn check_schema(path: &LakeTable, table: &DeltaTable, want: &SchemaRef) -> Result<(), SinkError> {
    let snapshot = table.snapshot().map_err(|source| SinkError::Delta {
        table: path.clone(),
        source,
    })?;
    let have: Arc<arrow::datatypes::Schema> = snapshot.snapshot().arrow_schema();
    let names = |s: &arrow::datatypes::Schema| -> Vec<String> {
        s.fields().iter().map(|f| f.name().clone()).collect()
    };
    if names(&have) != names(want) {
        let hint = match path.kind() {
            super::TableKind::Features => {
                ": its feature file changed; rebuild the table's history with `pipeline \
                 backfill <pipeline.yaml>`, then run again"
            }
            _ => "",
        };
        return Err(SinkError::Schema {
            table: path.clone(),
            message: format!(
                "lake has {:?}, pipeline writes {:?}{hint}",
                names(&have),
                names(want)
            ),
        });
    }
    Ok(())
}
