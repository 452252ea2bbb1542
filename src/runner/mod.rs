//! Wires the stages: source (snapshot, then change stream) → batcher → feature engine
//! (state + DataFusion) → Delta sink → acknowledgement to Postgres.
//!
//! ```text
//!  Postgres ──pgoutput──▶ batcher ──ChangeBatch (bounded)──▶ processor ──▶ Delta (raw + features)
//!     ▲                                                          │
//!     └──────────── ack LSN (only after every table commit) ◀────┘
//! ```

mod rebuild;

use crate::batch::{self, BatcherOptions, ChangeBatch, SchemaChange, LSN};
use crate::config::Pipeline;
use crate::features::{FeatureEngine, FeatureError, FeatureRows, Touched};
use crate::sink::{DeltaSink, Maintainer, SinkError, StagedFiles, TableSpec};
use crate::source::{
    self, check_wal_level, connect, create_slot_with_snapshot, ensure_publication, load_schemas,
    lsn_string, relation_schema, slot_info, ChangeStream, ConnInfo, SourceError, TableSchema,
};
use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::Int64Type;
use pgwire_replication::{ReplicationClient, ReplicationConfig};
use rebuild::rebuild_state;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    /// Boxed: Delta errors are large and would bloat every `Result` in the runner.
    #[error(transparent)]
    Sink(Box<SinkError>),
    #[error("{0}")]
    Inconsistent(String),
    #[error("{0}")]
    SlotBusy(String),
    #[error(
        "source table {table} changed in the change stream at LSN {lsn} ({change}), and the \
         features no longer plan on it: {source}. Change the feature file, then start again: \
         the pipeline resumes at that transaction (nothing from it on was acknowledged)"
    )]
    SchemaChange {
        table: String,
        lsn: String,
        change: String,
        source: Box<FeatureError>,
    },
    #[error(
        "{source}. The transaction cannot be written to the raw mirror as it stands (a source \
         column whose type changed to values the lake's column cannot hold?); nothing from it on \
         was acknowledged. Rebuild the lake on the source's current schema with `pipeline \
         resnapshot <pipeline.yaml>`"
    )]
    RawWrite { source: Box<SinkError> },
    #[error("rebuilding state from {table}: {message}")]
    Rebuild {
        table: String,
        message: String,
        /// The lake's store could not be reached (a retry may succeed).
        unreachable: bool,
    },
}

impl From<SinkError> for RunError {
    fn from(e: SinkError) -> Self {
        RunError::Sink(Box::new(e))
    }
}

impl RunError {
    /// Errors a restart may cure (lost connections, a server restart, our previous
    /// session still holding the slot), as opposed to configuration or data errors.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Source(SourceError::Connect { .. }) => true,
            RunError::Source(SourceError::Postgres(e)) => match e.as_db_error() {
                None => true,
                Some(db) => e.is_closed() || transient_sqlstate(db.code().code()),
            },
            RunError::Source(SourceError::Replication(e)) => match e {
                pgwire_replication::PgWireError::Io(_)
                | pgwire_replication::PgWireError::Task(_) => true,
                pgwire_replication::PgWireError::Server(m) => m
                    .split("SQLSTATE ")
                    .nth(1)
                    .is_some_and(|c| transient_sqlstate(c.get(..5).unwrap_or(c))),
                _ => false,
            },
            RunError::Source(SourceError::Slot(m)) => m.contains("ended unexpectedly"),
            RunError::SlotBusy(_) => true,
            RunError::Sink(e) => e.is_transient(),
            RunError::Rebuild { unreachable, .. } => *unreachable,
            _ => false,
        }
    }
}

/// Server errors that a reconnect cures: connection exceptions (class 08), the server
/// shutting down, crashed or starting up (57P01–57P03), too many connections (53300).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Runs the pipeline; in streaming mode, transient failures (Postgres restarted or
/// unreachable) restart it with backoff: state is rebuilt from the lake and streaming
/// resumes from the slot, exactly as after a process restart.
pub async fn run_supervised(
    pipeline: &Pipeline,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<RunSummary, RunError> {
    let mut delay = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        match run(pipeline, opts.clone(), cancel.clone()).await {
            Err(e) if !opts.once && !cancel.is_cancelled() && e.is_transient() => {
                if started.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_millis(500);
                }
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "pipeline interrupted, restarting from the lake and the slot");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(e),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            other => return other,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Process what was committed before the start, then exit.
    pub once: bool,
    /// Drop the slot (if any), take a new snapshot replacing every table, then exit:
    /// the way back after the slot was invalidated or lost.
    pub resnapshot: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub snapshot_rows: usize,
    pub batches: usize,
    pub changes: usize,
    pub last_lsn: u64,
    /// Source schema changes the stages were rebuilt for.
    pub schema_changes: usize,
}

/// Source tables whose running schema comes from the change stream's Relation message
/// rather than the catalog (which may be ahead of the stream), by table index.
#[derive(Default)]
struct SchemaOverrides {
    tables: BTreeMap<usize, SchemaChange>,
}

/// What `validate` and `run` share: connection, schemas and planned features.
pub struct Prepared {
    pub conn: ConnInfo,
    pub client: tokio_postgres::Client,
    pub schemas: Vec<TableSchema>,
    pub engine: FeatureEngine,
}

/// Connects, checks the source and plans every feature. Touches neither slot nor lake.
pub async fn prepare(pipeline: &Pipeline) -> Result<Prepared, RunError> {
    prepare_with(pipeline, &SchemaOverrides::default()).await
}

async fn prepare_with(
    pipeline: &Pipeline,
    overrides: &SchemaOverrides,
) -> Result<Prepared, RunError> {
    let conn = ConnInfo::parse(&pipeline.config.source.url)?;
    let client = connect(&conn, pipeline.config.source.connect_retries).await?;
    let mut schemas = load_schemas(&client, &pipeline.tables).await?;
    for (&t, change) in &overrides.tables {
        schemas[t] = relation_schema(&client, &schemas[t], &change.columns).await?;
    }
    let engine = match FeatureEngine::new(pipeline, &schemas).await {
        Ok(engine) => engine,
        Err(source) => {
            // Name the schema change a feature cannot follow, the latest first.
            let Some((_, change)) = overrides.tables.iter().max_by_key(|(_, c)| c.commit_lsn)
            else {
                return Err(source.into());
            };
            return Err(RunError::SchemaChange {
                table: schemas[change.table].name.to_string(),
                lsn: lsn_string(change.commit_lsn),
                change: change.diff.to_string(),
                source: Box::new(source),
            });
        }
    };
    Ok(Prepared {
        conn,
        client,
        schemas,
        engine,
    })
}

fn raw_path(schema: &TableSchema) -> String {
    format!("raw/{}", schema.name.name)
}

fn feature_path(name: &str) -> String {
    format!("features/{name}")
}

/// Every Delta table of the pipeline, as paths under the lake root.
pub fn table_paths(pipeline: &Pipeline) -> Vec<String> {
    let raw = pipeline.tables.iter().map(|t| format!("raw/{}", t.name));
    let features = pipeline.feature_files.iter().map(|f| feature_path(&f.name));
    raw.chain(features).collect()
}

/// Runs the pipeline until cancelled (or, with `--once`, caught up). A source schema
/// change (ALTER TABLE) rebuilds the stages on the schema the stream announced and
/// resumes at the transaction that carried it.
pub async fn run(
    pipeline: &Pipeline,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<RunSummary, RunError> {
    let mut overrides = SchemaOverrides::default();
    let mut total = RunSummary::default();
    loop {
        let (summary, change) = run_stages(pipeline, &opts, cancel.clone(), &overrides).await?;
        total.snapshot_rows += summary.snapshot_rows;
        total.batches += summary.batches;
        total.changes += summary.changes;
        total.last_lsn = total.last_lsn.max(summary.last_lsn);
        let Some(change) = change else {
            return Ok(total);
        };
        total.schema_changes += 1;
        tracing::info!(table = %pipeline.tables[change.table], change = %change.diff,
            at_lsn = %lsn_string(change.commit_lsn), "restarting the stages on the new source schema");
        overrides.tables.insert(change.table, change);
        if cancel.is_cancelled() {
            return Ok(total);
        }
    }
}

/// One run of the stages on fixed source schemas; stops at a schema change and returns it.
async fn run_stages(
    pipeline: &Pipeline,
    opts: &RunOptions,
    cancel: CancellationToken,
    overrides: &SchemaOverrides,
) -> Result<(RunSummary, Option<SchemaChange>), RunError> {
    let started = Instant::now();
    let Prepared {
        conn,
        client,
        schemas,
        engine,
    } = prepare_with(pipeline, overrides).await?;
    check_wal_level(&client).await?;
    let src = &pipeline.config.source;
    ensure_publication(&client, &src.publication, &pipeline.tables).await?;

    let slot_name = pipeline.slot_name(&conn.database);
    let app_id = format!("pipeline-{}-{}", pipeline.config.name, slot_name);
    let mut specs: Vec<TableSpec> = schemas
        .iter()
        .map(|s| TableSpec {
            path: raw_path(s),
            schema: batch::raw_schema(s),
            evolves: true,
        })
        .collect();
    specs.extend(
        engine
            .output_schemas()
            .into_iter()
            .map(|(n, s)| (feature_path(&n), s).into()),
    );
    let lake = pipeline.config.lake.open()?;
    let root = lake.root().clone();
    let (maintainer, _maintenance) =
        Maintainer::spawn(lake.clone(), pipeline.config.lake.maintenance.clone());
    // A resnapshot marks the lake before it drops the slot and clears the mark once every
    // table holds the new snapshot: a run that finds the mark finishes the resnapshot
    // instead of streaming onto a half-replaced lake.
    let resnapshot = opts.resnapshot || lake.has_marker(RESNAPSHOT_MARKER).await?;
    if resnapshot && !opts.resnapshot {
        tracing::warn!(lake = %root, "a resnapshot was interrupted: finishing it first");
    }
    let properties = pipeline.config.lake.maintenance.table_properties();
    let mut sink = DeltaSink::open_with(lake.clone(), app_id, specs, &properties)
        .await?
        .with_maintainer(maintainer);
    let lake_has_data = match lake_progress(&sink) {
        _ if resnapshot => true,
        LakeProgress::Empty => false,
        LakeProgress::InterruptedSnapshot(lsn) => {
            tracing::warn!(lake = %root, snapshot_lsn = %lsn_string(lsn),
                "the initial snapshot was only partly committed: taking it again, replacing every table");
            false
        }
        LakeProgress::Complete => true,
        LakeProgress::Partial(missing) => {
            return Err(RunError::Inconsistent(format!(
                "the lake at {root} has data from this pipeline, but {} {} none: a table \
                 deleted from the lake, or a feature file added to a running pipeline, cannot \
                 be backfilled yet. Restore the table, or rebuild every table with `pipeline \
                 resnapshot <pipeline.yaml>`",
                missing.join(", "),
                if missing.len() == 1 { "has" } else { "have" }
            )))
        }
    };
    let slot = slot_info(&client, &slot_name).await?;
    if let Some(info) = &slot {
        if info.database != conn.database || info.plugin != "pgoutput" {
            return Err(RunError::Inconsistent(format!(
                "replication slot `{}` belongs to database `{}` (plugin {}), not to `{}`: slot names \
                 are per cluster, give each pipeline its own (source.slot / PIPELINE_SLOT)",
                slot_name, info.database, info.plugin, conn.database
            )));
        }
    }
    tracing::info!(lake = %root, slot = %slot_name, slot_exists = slot.is_some(), lake_has_data, "starting");

    let repl_cfg = ReplicationConfig::new(
        conn.host.clone(),
        conn.user.clone(),
        conn.password.clone(),
        conn.database.clone(),
        slot_name.clone(),
        src.publication.clone(),
    )
    .with_port(conn.port)
    .with_options(source::SESSION_OPTIONS)
    .with_application_name(format!("pipeline-{}", pipeline.config.name))
    .with_status_interval(Duration::from_millis(100))
    .with_buffer_size(16 * 1024)
    // Without an observer the client does not track unsent feedback, and the last
    // acknowledgement before a stop (shutdown, schema change) could be dropped: the
    // batcher waits on it before closing the stream.
    .with_feedback_observer(pgwire_replication::FeedbackObserver::new(|sent| {
        tracing::trace!(?sent, "standby status sent")
    }));

    let mut summary = RunSummary::default();
    let mut repl = ReplicationClient::connect_gated(repl_cfg)
        .await
        .map_err(SourceError::from)?;
    if let Some(pid) = slot.as_ref().and_then(|i| i.active_pid) {
        return Err(RunError::SlotBusy(format!(
            "replication slot `{slot_name}` is in use by another process (pid {pid}); is another \
             pipeline running on it?"
        )));
    }
    let fresh = match (&slot, lake_has_data) {
        (slot, _) if resnapshot => {
            lake.put_marker(RESNAPSHOT_MARKER, format!("slot {slot_name}\n"))
                .await?;
            tracing::warn!(slot = %slot_name, lake = %root, slot_exists = slot.is_some(),
                "resnapshot: dropping the slot and replacing every table with a new snapshot \
                 (older versions stay readable through Delta time travel until vacuumed)");
            if slot.is_some() {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
                    .await
                    .map_err(SourceError::from)?;
            }
            true
        }
        (None, false) => true,
        (Some(_), false) => {
            // Nothing from this slot reached this lake (a first run that stopped during
            // the snapshot, or a lake deleted to start over): a new slot and snapshot
            // lose nothing for it.
            tracing::warn!(slot = %slot_name, lake = %root,
                "the lake has no data from this slot: dropping the slot and taking a new snapshot");
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
                .await
                .map_err(SourceError::from)?;
            true
        }
        (Some(info), true) if info.wal_status.as_deref() == Some("lost") => {
            return Err(RunError::Inconsistent(format!(
                "replication slot `{slot_name}` was invalidated (wal_status = lost): changes since \
                 the last run are gone from the WAL, so the lake cannot be caught up. Rebuild it \
                 consistently with `pipeline resnapshot <pipeline.yaml>` (raise \
                 max_slot_wal_keep_size, or keep the pipeline running, to avoid this)"
            )));
        }
        (Some(_), true) => false,
        (None, true) => {
            return Err(RunError::Inconsistent(format!(
                "the lake at {root} has data but replication slot `{slot_name}` does not exist: \
                 changes since the last run are lost. Rebuild the lake consistently with \
                 `pipeline resnapshot <pipeline.yaml>`"
            )));
        }
    };
    let skip_through = if fresh {
        let snap = create_slot_with_snapshot(&mut repl, &slot_name, &conn, &schemas).await?;
        let consistent_lsn = snap.consistent_lsn;
        summary.snapshot_rows = write_snapshot(&engine, &mut sink, &schemas, snap).await?;
        if resnapshot {
            lake.remove_marker(RESNAPSHOT_MARKER).await?;
        }
        summary.last_lsn = consistent_lsn;
        tracing::info!(rows = summary.snapshot_rows, elapsed_ms = started.elapsed().as_millis() as u64,
            lsn = %lsn_string(consistent_lsn), "initial snapshot committed to the lake");
        if opts.once || opts.resnapshot {
            // Everything committed before the start is in the snapshot.
            return Ok((summary, None));
        }
        consistent_lsn
    } else {
        // State must reflect exactly the transactions that will not be streamed again:
        // those committed before the slot's confirmed position (Postgres resends the rest)
        // and those in every table (the batcher skips them). A table that committed
        // further before a crash gets those changes again from the stream, not from the
        // lake, so a replayed batch sees the state it was first computed on.
        let resume_at = slot
            .as_ref()
            .and_then(|i| i.confirmed_flush_lsn)
            .unwrap_or(0)
            .max(sink.committed_everywhere());
        let rows = rebuild_state(&engine, &sink, &schemas, resume_at).await?;
        tracing::info!(rows, elapsed_ms = started.elapsed().as_millis() as u64,
            resume_at = %lsn_string(resume_at),
            "state rebuilt from the lake; resuming from the slot");
        sink.committed_everywhere()
    };

    repl.start().await.map_err(SourceError::from)?;
    repl.wait_started().await.map_err(SourceError::from)?;
    let fence_token = if opts.once {
        let token = format!(
            "{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        );
        client
            .query_one(
                "SELECT pg_logical_emit_message(false, $1, $2)::text",
                &[&source::FENCE_PREFIX, &token],
            )
            .await
            .map_err(SourceError::from)?;
        Some(token)
    } else {
        None
    };
    let stream = ChangeStream::new(repl, schemas.clone());
    let batcher_cancel = cancel.child_token();
    let (batch_tx, mut batch_rx) = mpsc::channel::<ChangeBatch>(1);
    let (ack_tx, ack_rx) = watch::channel(skip_through);
    let batcher = tokio::spawn(batch::run(
        stream,
        schemas.clone(),
        BatcherOptions {
            interval: pipeline.config.batch.interval(),
            max_rows: pipeline.config.batch.max_rows,
            skip_through,
            fence_token,
        },
        batch_tx,
        ack_rx,
        batcher_cancel.clone(),
    ));
    tracing::info!(from = %lsn_string(skip_through), "streaming changes");

    let result = async {
        let mut health = tokio::time::interval(SLOT_HEALTH_EVERY);
        // A transaction larger than one batch, between its first piece and its last.
        let mut large: Option<LargeTxn> = None;
        loop {
            let mut batch = tokio::select! {
                b = batch_rx.recv() => match b {
                    Some(b) => b,
                    None => break,
                },
                _ = health.tick() => {
                    check_slot_health(&client, &slot_name).await?;
                    continue;
                }
            };
            if batch.continues {
                let txn = large.get_or_insert_with(|| LargeTxn {
                    staged: StagedFiles::default(),
                    touched: engine.no_entities(),
                });
                stage_piece(&engine, &sink, &schemas, &mut batch, txn).await?;
                summary.changes += batch.rows;
                continue;
            }
            if large.is_some() && batch.transactions == 0 {
                return Err(RunError::Inconsistent(
                    "a large transaction's pieces were not followed by its end".into(),
                ));
            }
            if batch.transactions > 0 {
                process_batch(&engine, &mut sink, &schemas, &mut batch, large.take()).await?;
                crate::fault::crash_point("before_ack");
                let _ = ack_tx.send(batch.end_lsn);
                summary.batches += 1;
                summary.changes += batch.rows;
                summary.last_lsn = batch.end_lsn;
                tracing::info!(
                    txns = batch.transactions, rows = batch.rows, end_lsn = %lsn_string(batch.end_lsn),
                    latency_ms = batch.first_received.elapsed().as_secs_f64() * 1000.0,
                    "batch committed"
                );
            }
            if batch.last {
                break;
            }
        }
        Ok::<_, RunError>(())
    }
    .await;
    if result.is_err() {
        // Stops this run's batcher only: the caller's token decides about a restart.
        batcher_cancel.cancel();
    }
    drop(batch_rx);
    drop(ack_tx);
    let batcher_result = batcher
        .await
        .map_err(|e| RunError::Inconsistent(format!("batcher task failed: {e}")))?;
    result?;
    Ok((summary, batcher_result?))
}

/// Present in `<lake>/_pipeline/` while a resnapshot is replacing the tables.
const RESNAPSHOT_MARKER: &str = "resnapshot-in-progress";

/// How often the slot's retained WAL and lag are logged.
const SLOT_HEALTH_EVERY: Duration = Duration::from_secs(30);

/// The pipeline's replication slot as Postgres reports it (`pipeline status`, and the
/// periodic health log of `run`).
#[derive(Debug, Clone)]
pub struct SlotStatus {
    pub slot: String,
    /// The walsender streaming from it, if one is.
    pub active_pid: Option<i32>,
    /// What the pipeline has acknowledged: every change before it is durable in the lake.
    pub confirmed_flush_lsn: Option<u64>,
    /// WAL Postgres keeps for the slot (current WAL position − restart LSN).
    pub retained_wal_bytes: Option<i64>,
    /// How far the lake is behind the source (current WAL position − confirmed flush).
    pub lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` (about to lose WAL) or `lost` (invalidated).
    pub wal_status: Option<String>,
    /// WAL that can still be written before the slot is invalidated (None: no limit).
    pub safe_wal_size: Option<i64>,
}

/// The status of replication slot `slot`, or None when it does not exist.
async fn query_slot_status(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotStatus>, RunError> {
    let row = client
        .query_opt(
            // The current position read once, so that both differences share it.
            "SELECT active_pid, confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(cur.lsn, restart_lsn)::bigint,
                    pg_wal_lsn_diff(cur.lsn, confirmed_flush_lsn)::bigint,
                    wal_status, safe_wal_size
               FROM pg_replication_slots, (SELECT pg_current_wal_lsn() AS lsn) AS cur
              WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::from)?;
    Ok(row.map(|row| SlotStatus {
        slot: slot.to_string(),
        active_pid: row.get(0),
        confirmed_flush_lsn: source::parse_lsn(row.get(1)),
        retained_wal_bytes: row.get(2),
        lag_bytes: row.get(3),
        wal_status: row.get(4),
        safe_wal_size: row.get(5),
    }))
}

/// The status of `pipeline`'s replication slot, or None when it has none (it never
/// ran against this database, or the slot was dropped).
pub async fn slot_status(pipeline: &Pipeline) -> Result<Option<SlotStatus>, RunError> {
    let conn = ConnInfo::parse(&pipeline.config.source.url)?;
    let client = connect(&conn, pipeline.config.source.connect_retries).await?;
    query_slot_status(&client, &pipeline.slot_name(&conn.database)).await
}

/// Logs the slot's retained WAL and lag; an invalidated slot stops the pipeline loudly.
async fn check_slot_health(client: &tokio_postgres::Client, slot: &str) -> Result<(), RunError> {
    let Some(SlotStatus {
        retained_wal_bytes: retained,
        lag_bytes: lag,
        wal_status: status,
        safe_wal_size: safe,
        ..
    }) = query_slot_status(client, slot).await?
    else {
        return Err(RunError::Inconsistent(format!(
            "replication slot `{slot}` was dropped while the pipeline was streaming"
        )));
    };
    match status.as_deref() {
        Some("lost") => {
            return Err(RunError::Inconsistent(format!(
                "replication slot `{slot}` was invalidated (wal_status = lost): Postgres removed \
                 WAL it still needed, so changes are missing. Rebuild the lake consistently with \
                 `pipeline resnapshot <pipeline.yaml>`"
            )))
        }
        Some("unreserved") => {
            tracing::warn!(slot, retained_wal_bytes = ?retained, lag_bytes = ?lag, safe_wal_size = ?safe,
                "slot is about to lose WAL (wal_status = unreserved): the lake is falling behind")
        }
        _ => tracing::info!(slot, retained_wal_bytes = ?retained, lag_bytes = ?lag,
            wal_status = ?status, "slot health"),
    }
    Ok(())
}

/// The pieces of a transaction larger than one batch seen so far (see
/// `ChangeBatch::continues`): applied to state, their raw rows written ahead as files.
struct LargeTxn {
    staged: StagedFiles,
    touched: Touched,
}

/// Applies a piece of a large transaction to state and writes its raw rows ahead; the
/// commit comes with the transaction's last piece. If the run stops before, state is
/// rebuilt from the lake and Postgres sends the whole transaction again.
async fn stage_piece(
    engine: &FeatureEngine,
    sink: &DeltaSink,
    schemas: &[TableSchema],
    batch: &mut ChangeBatch,
    txn: &mut LargeTxn,
) -> Result<(), RunError> {
    engine.fill_unchanged_toast(batch)?;
    engine.apply(batch, &mut txn.touched)?;
    for (path, rows) in raw_writes(sink, schemas, batch)? {
        sink.stage(&mut txn.staged, &path, &rows)
            .await
            .map_err(raw_write_error)?;
    }
    crate::fault::crash_point("large_txn_piece");
    tracing::info!(
        rows_so_far = txn.staged.rows(),
        touched = txn.touched.len(),
        commit_lsn = %lsn_string(batch.commit_lsn),
        "large transaction: piece applied and written ahead"
    );
    Ok(())
}

async fn process_batch(
    engine: &FeatureEngine,
    sink: &mut DeltaSink,
    schemas: &[TableSchema],
    batch: &mut ChangeBatch,
    large: Option<LargeTxn>,
) -> Result<(), RunError> {
    // Before anything reads the rows: the raw mirror and state get the full image.
    engine.fill_unchanged_toast(batch)?;
    let (mut touched, staged) = match large {
        Some(txn) => (txn.touched, txn.staged),
        None => (engine.no_entities(), StagedFiles::default()),
    };
    engine.apply(batch, &mut touched)?;
    let features = engine
        .compute_touched(touched, batch.commit_lsn, batch.commit_ts_micros)
        .await?;
    let mut writes: Vec<(String, Vec<RecordBatch>)> = raw_writes(sink, schemas, batch)?
        .into_iter()
        .map(|(path, rows)| (path, vec![rows]))
        .collect();
    writes.extend(feature_writes(features));
    sink.commit_staged(writes, batch.end_lsn, staged)
        .await
        .map_err(raw_write_error)?;
    Ok(())
}

/// The batch's raw rows by raw-table path. After a crash between table commits, a table
/// keeps only the transactions it lacks.
fn raw_writes(
    sink: &DeltaSink,
    schemas: &[TableSchema],
    batch: &ChangeBatch,
) -> Result<Vec<(String, RecordBatch)>, RunError> {
    let mut out = Vec::new();
    for (schema, rows) in schemas.iter().zip(&batch.tables) {
        let Some(rows) = rows else { continue };
        let path = raw_path(schema);
        let rows = not_yet_committed(rows, sink.committed(&path))?;
        out.push((path, rows));
    }
    Ok(out)
}

/// A raw table refusing a batch for good (not the store being away) gets the way out.
fn raw_write_error(e: SinkError) -> RunError {
    match e.table() {
        Some(t) if t.starts_with("raw/") && !e.is_transient() => RunError::RawWrite {
            source: Box::new(e),
        },
        _ => e.into(),
    }
}

fn feature_writes(features: Vec<FeatureRows>) -> Vec<(String, Vec<RecordBatch>)> {
    features
        .into_iter()
        .map(|f| (feature_path(&f.table), vec![f.batch]))
        .collect()
}

/// Rows whose transaction commits at or after `committed` (an end LSN already in the table).
fn not_yet_committed(rows: &RecordBatch, committed: u64) -> Result<RecordBatch, RunError> {
    let lsn = rows
        .column_by_name(LSN)
        .expect("raw batches have _lsn")
        .as_primitive::<Int64Type>();
    if lsn.values().iter().all(|&l| l as u64 >= committed) {
        return Ok(rows.clone());
    }
    let keep: BooleanArray = lsn
        .iter()
        .map(|l| l.map(|l| l as u64 >= committed))
        .collect();
    arrow::compute::filter_record_batch(rows, &keep)
        .map_err(|e| RunError::Inconsistent(e.to_string()))
}

/// The `_lsn` of snapshot rows: just below the consistent point, because a streamed
/// transaction's commit record may start exactly at it, and replay order (`_lsn`, `_seq`)
/// and the state rebuild (`_lsn` < resume point) must put the snapshot strictly first.
fn snapshot_row_lsn(consistent_lsn: u64) -> u64 {
    consistent_lsn.saturating_sub(1)
}

/// Loads the snapshot into state and commits the raw tables, then computes every
/// entity's features and commits them, all at the consistent LSN. State loads on a
/// thread of its own while the raw tables encode and commit (both read the copied rows,
/// neither changes them); the features wait for both, so that the snapshot's rows have
/// left memory before the features' working set joins the state.
async fn write_snapshot(
    engine: &FeatureEngine,
    sink: &mut DeltaSink,
    schemas: &[TableSchema],
    snap: source::InitialSnapshot,
) -> Result<usize, RunError> {
    let source::InitialSnapshot {
        consistent_lsn,
        tables,
        taken_at_micros,
    } = snap;
    let mut writes = Vec::new();
    let mut rows = 0;
    for (schema, batches) in schemas.iter().zip(&tables) {
        let raw = batch::raw_schema(schema);
        let mut seq = 0i64;
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            out.push(
                batch::snapshot_rows_as_changes(
                    &raw,
                    b,
                    snapshot_row_lsn(consistent_lsn),
                    taken_at_micros,
                    seq,
                )
                .map_err(|e| RunError::Inconsistent(e.to_string()))?,
            );
            seq += b.num_rows() as i64;
            rows += b.num_rows();
        }
        writes.push((raw_path(schema), out));
    }
    let loading = engine.load_in_background(tables);
    let committed = sink.commit_snapshot_part(writes, consistent_lsn).await;
    let loaded = loading.await;
    committed?;
    loaded?;
    let t0 = Instant::now();
    let features = engine.compute_all(consistent_lsn, taken_at_micros).await?;
    tracing::info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "features computed for every entity"
    );
    sink.commit_snapshot(feature_writes(features), consistent_lsn)
        .await?;
    Ok(rows)
}

/// How far the lake got, from each table's committed txn version.
enum LakeProgress {
    /// No table has anything from this pipeline.
    Empty,
    /// Some tables hold the initial snapshot, the others nothing: the process stopped
    /// while committing the snapshot. Retaking it (replacing every table) loses nothing.
    InterruptedSnapshot(u64),
    /// Every table has data; streaming resumes from the lowest committed version.
    Complete,
    /// Tables with nothing while others went further than a snapshot (named here).
    Partial(Vec<String>),
}

fn lake_progress(sink: &DeltaSink) -> LakeProgress {
    let mut snapshots: Vec<u64> = sink
        .snapshots_by_table()
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| *v > 0)
        .collect();
    snapshots.sort_unstable();
    snapshots.dedup();
    if snapshots.len() > 1 {
        // Tables from two different snapshots: a resnapshot stopped part-way. The old
        // tables cannot be caught up from the new slot, so the snapshot is taken again.
        return LakeProgress::InterruptedSnapshot(*snapshots.last().expect("two or more"));
    }
    let by_table = sink.committed_by_table();
    let missing: Vec<String> = by_table
        .iter()
        .filter(|(_, v)| *v == 0)
        .map(|(p, _)| p.clone())
        .collect();
    let max = sink.committed_anywhere();
    if max == 0 {
        LakeProgress::Empty
    } else if missing.is_empty() {
        LakeProgress::Complete
    } else if by_table.iter().all(|(_, v)| *v == 0 || *v == max) {
        // Streaming starts only after the snapshot is in every table, so tables that all
        // stopped at one version next to empty ones can only be a part-written snapshot.
        LakeProgress::InterruptedSnapshot(max)
    } else {
        LakeProgress::Partial(missing)
    }
}
