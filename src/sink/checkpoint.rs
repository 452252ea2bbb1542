//! State checkpoints: each raw and feature table's newest row per key, as of an LSN, kept
//! as a Delta table of its own beside the lake (`_state/raw/<table>`,
//! `_state/features/<name>`), so that a restart reads the checkpoint plus the changes after
//! it instead of the whole history.
//!
//! A checkpoint at `C` holds, per key, the row with the highest (`_lsn`, `_seq`) among
//! the table's rows with `_lsn < C` (after the last truncate, deletes and tombstones left
//! out); its commit carries `txn(pipeline/state-checkpoint, C)`, so it is all there or not
//! at all. Rows below the durable LSN are in every table for good (each batch's tables
//! commit before its LSN is acknowledged), so a checkpoint is built from the lake alone:
//! the previous checkpoint plus the rows in [previous `C`, `C`). The [`Checkpointer`] does
//! that on a thread of its own, never in a batch's way.

use super::{Lake, LakeTable, SinkError};
use crate::changelog::{Lsn, Op, LSN, OP, SEQ};
use crate::config::{quote_ident, MaintenanceConfig, DELETED};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use std::collections::hash_map::{Entry, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The checkpointer's nice value: the lowest. A checkpoint rewrites the whole state
/// (seconds of CPU once there are a million rows), and nothing waits for it; at nice 5,
/// like the maintainer, its share of a busy machine's 2 cores doubled the visibility
/// latency of the batches beside it (214 ms against a p99 of 72 at 1,000 tx/s). Here it
/// runs on what the pipeline leaves: on a saturated machine it falls behind, and a
/// restart reads more changes after an older checkpoint.
const NICE: i32 = 19;

/// The `txn` app id whose version is a checkpoint's LSN.
const APP_ID: &str = "pipeline/state-checkpoint";

/// What makes a row the newest of its key in one lake table.
#[derive(Debug, Clone)]
pub struct CheckpointSpec {
    pub table: LakeTable,
    /// The key columns (a raw table's primary key, a feature table's entity key).
    pub keys: Vec<String>,
}

impl CheckpointSpec {
    fn is_raw(&self) -> bool {
        self.table.is_raw()
    }

    /// Rows that are no row: deletes in a raw table, tombstones in a feature table.
    fn gone(&self) -> String {
        match self.is_raw() {
            true => format!("{} = '{}'", quote_ident(OP), Op::Delete.as_str()),
            false => format!("{} IS TRUE", quote_ident(DELETED)),
        }
    }
}

/// A checkpoint read back: its table (to scan) and its LSN.
pub struct Checkpoint {
    pub table: DeltaTable,
    pub lsn: Lsn,
}

/// The newest checkpoint of `table`, if there is one.
pub async fn read(lake: &Lake, table: &LakeTable) -> Result<Option<Checkpoint>, SinkError> {
    let path = LakeTable::checkpoint_of(table);
    let ck = lake.table(&path).await?;
    if ck.version().is_none() {
        return Ok(None);
    }
    let lsn = txn_version(&path, &ck).await?;
    Ok((lsn > Lsn::ZERO).then_some(Checkpoint { table: ck, lsn }))
}

async fn txn_version(path: &LakeTable, table: &DeltaTable) -> Result<Lsn, SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let v = table
        .snapshot()
        .map_err(derr)?
        .transaction_version(table.log_store().as_ref(), APP_ID)
        .await
        .map_err(derr)?;
    Ok(Lsn::from_i64(v.unwrap_or(0)))
}

/// Empties the checkpoints of `tables` in one commit each (rows deleted, LSN zero), before
/// a snapshot or a backfill replaces the tables they were taken from: a stop in between
/// leaves fewer checkpoints, never a stale one.
pub async fn invalidate(lake: &Lake, tables: &[LakeTable]) -> Result<(), SinkError> {
    for table in tables {
        let path = LakeTable::checkpoint_of(table);
        let ck = lake.table(&path).await?;
        if ck.version().is_none() || txn_version(&path, &ck).await? == Lsn::ZERO {
            continue;
        }
        let txn = Transaction::new(APP_ID, 0);
        ck.delete()
            .with_commit_properties(
                CommitProperties::default().with_application_transactions(vec![txn]),
            )
            .await
            .map_err(|source| SinkError::Delta {
                table: path.clone(),
                source,
            })?;
        lake.make_durable().await?;
    }
    Ok(())
}

/// How one checkpoint went.
#[derive(Debug, Clone)]
pub struct Written {
    pub lsn: Lsn,
    pub rows: usize,
    /// Rows read after the previous checkpoint (all rows, without one).
    pub changes: u64,
    pub took: Duration,
    /// Of `took`, making the written files durable.
    pub synced: Duration,
}

/// Writes `spec`'s checkpoint at `upto` (every row below it is durable), from the
/// previous checkpoint and the rows after it. `None`: the checkpoint is at `upto` already.
pub async fn write(
    lake: &Lake,
    spec: &CheckpointSpec,
    upto: Lsn,
) -> Result<Option<Written>, SinkError> {
    let started = Instant::now();
    let path = LakeTable::checkpoint_of(&spec.table);
    let read_err = |source| SinkError::Read {
        table: spec.table.clone(),
        source,
    };
    let src = lake.existing_table(&spec.table).await?;
    let schema = arrow_schema(&spec.table, &src)?;
    let prev = read(lake, &spec.table).await?;
    let ctx = SessionContext::new();
    register(&ctx, "src", &spec.table, &src).await?;
    // The previous checkpoint counts if it is older and has the table's columns.
    let mut from = Lsn::ZERO;
    if let Some(p) = &prev {
        if p.lsn >= upto {
            return Ok(None);
        }
        if names(&arrow_schema(&path, &p.table)?) == names(&schema) {
            register(&ctx, "prev", &path, &p.table).await?;
            from = p.lsn;
        }
    }
    let (lsn, seq, op) = (quote_ident(LSN), quote_ident(SEQ), quote_ident(OP));
    let mut after = String::new();
    if spec.is_raw() {
        if let Some(t) = last_truncate(&ctx, "src", upto).await.map_err(read_err)? {
            after = after_truncate(t);
            // A truncate after the previous checkpoint makes all of it history.
            if Lsn::from_i64(t.0) >= from {
                from = Lsn::ZERO;
            }
        }
    }
    let mut range = format!("{lsn} >= {} AND {lsn} < {}", from.as_i64(), upto.as_i64());
    if spec.is_raw() {
        range.push_str(&format!(" AND {op} <> '{}'", Op::Truncate.as_str()));
    }
    range.push_str(&after);
    let cols = schema
        .fields()
        .iter()
        .map(|f| quote_ident(f.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let changes_sql = format!("SELECT {cols} FROM src WHERE {range}");
    let input = match from > Lsn::ZERO {
        true => format!("SELECT {cols} FROM prev UNION ALL {changes_sql}"),
        false => changes_sql,
    };
    let (lsn_col, seq_col) = match spec.is_raw() {
        true => (
            format!("CAST({lsn} AS BIGINT)"),
            format!("CAST({seq} AS BIGINT)"),
        ),
        false => (
            format!("CAST({lsn} AS BIGINT)"),
            "CAST(0 AS BIGINT)".to_string(),
        ),
    };
    let sql = format!(
        "SELECT {cols}, ({gone}) AS __gone, {lsn_col} AS __lsn, {seq_col} AS __seq FROM ({input})",
        gone = spec.gone(),
    );
    let input: Vec<RecordBatch> = ctx
        .sql(&sql)
        .await
        .map_err(read_err)?
        .collect()
        .await
        .map_err(read_err)?;
    // The changes read, for the log: the previous checkpoint's rows are all below `from`.
    let width = schema.fields().len();
    let changes: u64 = input
        .iter()
        .map(|b| {
            let lsn = b.column(width + 1).as_primitive::<Int64Type>();
            lsn.values().iter().filter(|&&l| l >= from.as_i64()).count() as u64
        })
        .sum();
    let keys = spec
        .keys
        .iter()
        .map(|k| schema.index_of(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(e.into()))?;
    let batches = newest_per_key(&input, &keys, width).map_err(|e| read_err(e.into()))?;
    drop(input);
    let rows = batches.iter().map(RecordBatch::num_rows).sum();
    crate::fault::crash_point("before_checkpoint_commit");
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let ck = lake.table(&path).await?;
    let txn = Transaction::new(APP_ID, upto.as_i64());
    let ck = ck
        .write(batches)
        .with_save_mode(SaveMode::Overwrite)
        .with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite)
        .with_commit_properties(
            CommitProperties::default().with_application_transactions(vec![txn]),
        )
        .await
        .map_err(derr)?;
    // An overwrite leaves only the files it wrote: those and its log entry are synced,
    // not the filesystem. `syncfs` flushed whatever else was dirty there too (a Postgres
    // on the same disk), and on ext4 every append's fsync waits behind such a flush in
    // the journal (a 400 MB one held another writer's fsync 215 ms, measured).
    let syncing = Instant::now();
    lake.sync_files(&path, written_files(&ck).map_err(derr)?)
        .await?;
    let synced = syncing.elapsed();
    // Only this pipeline reads checkpoints, and only when it starts: the files of older
    // ones can go at once.
    let (ck, _) = ck
        .vacuum()
        .with_retention_period(chrono::Duration::zero())
        .with_enforce_retention_duration(false)
        .await
        .map_err(derr)?;
    // Each checkpoint adds a few commits (write, vacuum start and end): a Delta checkpoint
    // now and then, and the commit files before it go, so the log stays short.
    let version = ck.version().unwrap_or(0);
    if version % 30 < 3 {
        deltalake::checkpoints::create_checkpoint(&ck, None)
            .await
            .map_err(derr)?;
        let cutoff = chrono::Utc::now().timestamp_millis() - 60_000;
        deltalake::checkpoints::cleanup_expired_logs_for(
            version,
            ck.log_store().as_ref(),
            cutoff,
            None,
        )
        .await
        .map_err(derr)?;
    }
    Ok(Some(Written {
        lsn: upto,
        rows,
        changes,
        took: started.elapsed(),
        synced,
    }))
}

/// The files of `table`'s current version and its log entry: after an overwrite, all
/// that the write put in the table's directory.
fn written_files(table: &DeltaTable) -> Result<Vec<String>, deltalake::DeltaTableError> {
    let mut files: Vec<String> = table
        .snapshot()?
        .log_data()
        .into_iter()
        .map(|f| f.path().into_owned())
        .collect();
    files.push(LakeTable::commit_file(table.version().unwrap_or(0)));
    Ok(files)
}

/// A row's (`_lsn`, `_seq`), and where it is: (batch, row).
type Order = (i64, i64);
type At = (usize, usize);

/// The newest row of each key among `input`'s rows, leaving out the keys whose newest row
/// is gone. Each batch's first `width` columns are the table's; after them come `__gone`,
/// `__lsn` and `__seq`, which order a key's rows. One hash pass over the rows (a window
/// function sorted all of them: about four times slower, measured).
fn newest_per_key(
    input: &[RecordBatch],
    keys: &[usize],
    width: usize,
) -> Result<Vec<RecordBatch>, ArrowError> {
    let Some(first) = input.first() else {
        return Ok(Vec::new());
    };
    let schema = first.schema();
    let fields = keys
        .iter()
        .map(|&k| SortField::new(schema.field(k).data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields)?;
    // Per key: (lsn, seq) of its newest row so far, and where that row is.
    let mut newest: HashMap<OwnedRow, (Order, At)> = HashMap::new();
    for (b, batch) in input.iter().enumerate() {
        let columns: Vec<ArrayRef> = keys.iter().map(|&k| batch.column(k).clone()).collect();
        let rows = converter.convert_columns(&columns)?;
        let lsn = batch.column(width + 1).as_primitive::<Int64Type>();
        let seq = batch.column(width + 2).as_primitive::<Int64Type>();
        for r in 0..batch.num_rows() {
            let order = (lsn.value(r), seq.value(r));
            match newest.entry(rows.row(r).owned()) {
                Entry::Occupied(mut e) if e.get().0 < order => *e.get_mut() = (order, (b, r)),
                Entry::Occupied(_) => {}
                Entry::Vacant(e) => {
                    e.insert((order, (b, r)));
                }
            }
        }
    }
    let mut keep: Vec<At> = newest
        .into_values()
        .map(|(_, at)| at)
        .filter(|&(b, r)| !input[b].column(width).as_boolean().value(r))
        .collect();
    keep.sort_unstable();
    let projected = Arc::new(schema.project(&(0..width).collect::<Vec<_>>())?);
    let mut out = Vec::new();
    for chunk in keep.chunks(64 * 1024) {
        let columns = (0..width)
            .map(|c| {
                let arrays: Vec<&dyn Array> = input.iter().map(|b| b.column(c).as_ref()).collect();
                arrow::compute::interleave(&arrays, chunk)
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(RecordBatch::try_new(projected.clone(), columns)?);
    }
    Ok(out)
}

fn names(schema: &SchemaRef) -> Vec<String> {
    schema.fields().iter().map(|f| f.name().clone()).collect()
}

fn arrow_schema(path: &LakeTable, table: &DeltaTable) -> Result<SchemaRef, SinkError> {
    Ok(table
        .snapshot()
        .map_err(|source| SinkError::Delta {
            table: path.clone(),
            source,
        })?
        .snapshot()
        .arrow_schema())
}

async fn register(
    ctx: &SessionContext,
    alias: &str,
    path: &LakeTable,
    table: &DeltaTable,
) -> Result<(), SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    table
        .update_datafusion_session(&ctx.state())
        .map_err(derr)?;
    let read_err = |source| SinkError::Read {
        table: path.clone(),
        source,
    };
    let provider = table.table_provider().await.map_err(read_err)?;
    ctx.register_table(alias, provider).map_err(read_err)?;
    Ok(())
}

/// `(_lsn, _seq)` of the last truncate below `upto` in the raw table registered in `ctx`
/// as `alias` (the rebuild's question too).
pub(crate) async fn last_truncate(
    ctx: &SessionContext,
    alias: &str,
    upto: Lsn,
) -> datafusion::error::Result<Option<(i64, i64)>> {
    let (lsn, seq, op) = (quote_ident(LSN), quote_ident(SEQ), quote_ident(OP));
    let batches = ctx
        .sql(&format!(
            "SELECT {lsn}, {seq} FROM {alias} WHERE {op} = '{}' AND {lsn} < {} \
             ORDER BY {lsn} DESC, {seq} DESC LIMIT 1",
            Op::Truncate.as_str(),
            upto.as_i64()
        ))
        .await?
        .collect()
        .await?;
    let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let value = |c: usize| -> datafusion::error::Result<i64> {
        let column = arrow::compute::cast(b.column(c), &DataType::Int64)?;
        Ok(column.as_primitive::<Int64Type>().value(0))
    };
    Ok(Some((value(0)?, value(1)?)))
}

/// An SQL condition (` AND …`) keeping the rows after the truncate at `(lsn, seq)`.
pub(crate) fn after_truncate((l, s): (i64, i64)) -> String {
    let (lsn, seq) = (quote_ident(LSN), quote_ident(SEQ));
    format!(" AND ({lsn} > {l} OR ({lsn} = {l} AND {seq} > {s}))")
}

/// The durable point the committer reached: every row below `lsn` is in the lake, and
/// `changes` rows were committed since the run started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    pub lsn: Lsn,
    pub changes: u64,
}

/// Writes checkpoints in the background when enough changes (or time) passed since the
/// last: on a thread and runtime of its own, at the maintainer's lower priority.
pub struct Checkpointer;

impl Checkpointer {
    /// Starts it for `specs`; it follows `durable` and ends when the sender is dropped.
    pub fn spawn(
        lake: Lake,
        specs: Vec<CheckpointSpec>,
        config: MaintenanceConfig,
        durable: watch::Receiver<Durable>,
    ) {
        if config.state_checkpoint_every_changes == 0 {
            return;
        }
        super::maintain::background("checkpointer", NICE, move || {
            run(lake, specs, config, durable)
        });
    }
}

async fn run(
    lake: Lake,
    specs: Vec<CheckpointSpec>,
    config: MaintenanceConfig,
    mut durable: watch::Receiver<Durable>,
) {
    let every = config.state_checkpoint_every_changes;
    let every_time = Duration::from_secs(config.state_checkpoint_every_minutes.saturating_mul(60));
    let mut last = *durable.borrow();
    let mut last_at = Instant::now();
    while durable.changed().await.is_ok() {
        let now = *durable.borrow();
        let since = now.changes.saturating_sub(last.changes);
        let timely = config.state_checkpoint_every_minutes > 0 && last_at.elapsed() >= every_time;
        if since < every && !(timely && since > 0) {
            continue;
        }
        let started = Instant::now();
        let mut rows = 0;
        let mut failed = false;
        for spec in &specs {
            match write(&lake, spec, now.lsn).await {
                Ok(Some(w)) => {
                    rows += w.rows;
                    tracing::debug!(table = %spec.table, rows = w.rows, changes = w.changes,
                        took_ms = w.took.as_millis() as u64,
                        sync_ms = w.synced.as_millis() as u64, "table checkpointed");
                }
                Ok(None) => {}
                Err(e) => {
                    // An optimisation: the next one may succeed; restarts just read more.
                    tracing::warn!(table = %spec.table, error = %e, "state checkpoint failed");
                    failed = true;
                }
            }
        }
        let took = started.elapsed();
        metrics::histogram!(crate::metrics::MAINTENANCE_SECONDS, "task" => "state_checkpoint")
            .record(took.as_secs_f64());
        tracing::info!(lsn = %now.lsn, rows, changes_since = since, failed,
            took_ms = took.as_millis() as u64, "state checkpoint written");
        last = now;
        last_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanArray, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    fn batch(ids: &[i64], values: &[&str], gone: &[bool], lsn: &[i64], seq: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, false),
            Field::new("__gone", DataType::Boolean, false),
            Field::new("__lsn", DataType::Int64, false),
            Field::new("__seq", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(StringArray::from(values.to_vec())),
                Arc::new(BooleanArray::from(gone.to_vec())),
                Arc::new(Int64Array::from(lsn.to_vec())),
                Arc::new(Int64Array::from(seq.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn keeps_each_keys_newest_row_across_batches_and_drops_gone_keys() {
        let input = [
            batch(
                &[1, 2, 3],
                &["a1", "b1", "c1"],
                &[false; 3],
                &[10, 10, 10],
                &[0, 1, 2],
            ),
            // Out of order: key 1's newest is in the first batch of this pair (lsn 20,
            // seq 1 beats seq 0), key 2 is deleted last, key 3 was deleted then inserted.
            batch(
                &[1, 1, 2, 3],
                &["a3", "a2", "", "c3"],
                &[false, false, true, false],
                &[20, 20, 30, 40],
                &[1, 0, 0, 1],
            ),
            batch(&[3, 4], &["", "d1"], &[true, false], &[40, 5], &[0, 0]),
        ];
        let out = newest_per_key(&input, &[0], 2).unwrap();
        let b = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
        assert_eq!(b.num_columns(), 2, "the ordering columns are dropped");
        let mut got: Vec<(i64, String)> = (0..b.num_rows())
            .map(|r| {
                (
                    b.column(0).as_primitive::<Int64Type>().value(r),
                    b.column(1).as_string::<i32>().value(r).to_string(),
                )
            })
            .collect();
        got.sort();
        let want = [(1, "a3"), (3, "c3"), (4, "d1")];
        assert_eq!(got, want.map(|(k, v)| (k, v.to_string())));
    }
}
