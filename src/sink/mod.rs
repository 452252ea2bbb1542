//! Delta Lake sink: one Delta table per raw source table and per feature file, under
//! one lake URL. Every commit carries a `txn` action (app id, version = the batch's end
//! LSN) in the same commit as its data, so on restart each table tells how far it got.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use url::Url;

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
}

struct SinkTable {
    /// Taken while a write is in flight.
    table: Option<DeltaTable>,
    schema: SchemaRef,
    /// Highest txn version committed by this pipeline (0 = none).
    committed: u64,
}

pub struct DeltaSink {
    root: Url,
    app_id: String,
    tables: BTreeMap<String, SinkTable>,
}

/// `./lake`, `/abs/lake`, `file:///…` or an object-store URL, as a directory URL.
pub fn lake_root(url: &str) -> Result<Url, SinkError> {
    let err = |message: String| SinkError::Url {
        url: url.to_string(),
        message,
    };
    let parsed = match Url::parse(url) {
        Ok(u) if u.scheme().len() > 1 => u,
        _ => {
            let path = std::path::Path::new(url);
            std::fs::create_dir_all(path)
                .map_err(|e| err(format!("cannot create directory: {e}")))?;
            let abs = path
                .canonicalize()
                .map_err(|e| err(format!("cannot resolve directory: {e}")))?;
            Url::from_directory_path(&abs).map_err(|_| err("not an absolute path".into()))?
        }
    };
    let mut u = parsed;
    if !u.path().ends_with('/') {
        u.set_path(&format!("{}/", u.path()));
    }
    Ok(u)
}

impl DeltaSink {
    /// Opens (creating when missing) every table at `<root>/<path>` with its schema.
    pub async fn open(
        root: Url,
        app_id: String,
        specs: Vec<(String, SchemaRef)>,
    ) -> Result<DeltaSink, SinkError> {
        let mut tables = BTreeMap::new();
        for (path, schema) in specs {
            let url = root.join(&format!("{path}/")).map_err(|e| SinkError::Url {
                url: root.to_string(),
                message: e.to_string(),
            })?;
            if url.scheme() == "file" {
                if let Ok(p) = url.to_file_path() {
                    let _ = std::fs::create_dir_all(p);
                }
            }
            let derr = |source| SinkError::Delta {
                table: path.clone(),
                source,
            };
            let mut table = DeltaTable::try_from_url(url).await.map_err(derr)?;
            let committed = if table.version().is_some() {
                check_schema(&path, &table, &schema)?;
                let log_store = table.log_store();
                let v = table
                    .snapshot()
                    .map_err(derr)?
                    .transaction_version(log_store.as_ref(), &app_id)
                    .await
                    .map_err(derr)?;
                v.unwrap_or(0).max(0) as u64
            } else {
                // Create it with an empty commit so readers always find the table.
                table = table
                    .write(vec![RecordBatch::new_empty(schema.clone())])
                    .with_save_mode(SaveMode::Append)
                    .await
                    .map_err(derr)?;
                0
            };
            tables.insert(
                path,
                SinkTable {
                    table: Some(table),
                    schema,
                    committed,
                },
            );
        }
        Ok(DeltaSink {
            root,
            app_id,
            tables,
        })
    }

    pub fn root(&self) -> &Url {
        &self.root
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

    /// Appends `writes` (table path → batches) as one commit per table, concurrently,
    /// each tagged with `version`. Tables that already hold `version` are skipped, so
    /// a retried batch is never written twice. Returns when every commit is durable.
    pub async fn commit(
        &mut self,
        writes: Vec<(String, Vec<RecordBatch>)>,
        version: u64,
    ) -> Result<(), SinkError> {
        self.commit_with(writes, version, SaveMode::Append).await
    }

    /// Replaces the content of **every** table with `writes` (tables not named become
    /// empty), each commit tagged with `version`. Used for the initial snapshot, so that a
    /// snapshot retaken after one interrupted part-way never doubles rows, and so that
    /// every table, empty ones included, records that it holds the snapshot.
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
        for (path, batches) in &mut writes {
            if batches.is_empty() {
                let entry = self
                    .tables
                    .get(path)
                    .ok_or_else(|| SinkError::Unknown(path.clone()))?;
                batches.push(RecordBatch::new_empty(entry.schema.clone()));
            }
        }
        self.commit_with(writes, version, SaveMode::Overwrite).await
    }

    async fn commit_with(
        &mut self,
        writes: Vec<(String, Vec<RecordBatch>)>,
        version: u64,
        mode: SaveMode,
    ) -> Result<(), SinkError> {
        let mut jobs = Vec::new();
        for (path, batches) in writes {
            let entry = self
                .tables
                .get_mut(&path)
                .ok_or_else(|| SinkError::Unknown(path.clone()))?;
            let empty = batches.iter().all(|b| b.num_rows() == 0);
            if entry.committed >= version || (empty && matches!(mode, SaveMode::Append)) {
                continue;
            }
            let table = entry.table.take().expect("no concurrent commit");
            let app_id = self.app_id.clone();
            jobs.push(async move {
                let started = Instant::now();
                let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
                let props = CommitProperties::default()
                    .with_application_transaction(Transaction::new(&app_id, version as i64));
                let backup = table.clone();
                let result = table
                    .write(batches)
                    .with_save_mode(mode)
                    .with_commit_properties(props)
                    .await;
                match result {
                    Ok(t) => {
                        tracing::debug!(table = %path, rows, version = ?t.version(),
                            elapsed_ms = started.elapsed().as_millis() as u64, "delta commit");
                        (path, Ok(t))
                    }
                    Err(e) => (path, Err((backup, e))),
                }
            });
        }
        let mut first_error = None;
        for (path, result) in futures::future::join_all(jobs).await {
            let entry = self.tables.get_mut(&path).expect("known table");
            match result {
                Ok(t) => {
                    entry.table = Some(t);
                    entry.committed = version;
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
