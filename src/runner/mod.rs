//! Wires the stages; every stage's logic lives in its own module.
//!
//! ```text
//!  Postgres ──pgoutput──▶ batcher ──ChangeBatch (bounded, 1)──▶ Processor ──▶ Destination (Delta: raw + features)
//!     ▲                                                            │
//!     └──────── ack LSN (watch; only after every table is durable) ◀┘
//! ```
//!
//! A run: [`prepare`] (schemas, planned features) → [`start::decide`] (snapshot, resume
//! or refuse, from the slot and the lake's [`ResumePoint`](crate::sink::ResumePoint)) →
//! [`snapshot::write_snapshot`] or [`rebuild::rebuild_state`] → the stream loop, where the
//! [`processor::Processor`] turns each batch into durable commits and returns the LSN
//! the batcher acknowledges. [`run_supervised`] restarts runs that [`policy`] retries.

mod policy;
mod processor;
mod rebuild;
mod snapshot;
mod start;
mod supervise;

pub use policy::{action, Action};
pub use start::Refusal;
pub use supervise::run_supervised;

use crate::batch::{self, BatchKind, BatcherOptions, ChangeBatch, SchemaChange};
use crate::changelog::{Lsn, TableId};
use crate::config::Pipeline;
use crate::features::{FeatureEngine, FeatureError};
use crate::sink::{DeltaSink, LakeTable, Maintainer, Mark, SinkError, TableSpec};
use crate::source::{self, ChangeStream, ConnInfo, SlotStatus, SourceError, TableSchema};
use pgwire_replication::ReplicationClient;
use processor::Processor;
use start::{SnapshotReason, Start, StartFacts};
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
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(
        "source table {table} changed in the change stream at LSN {lsn} ({change}), and the \
         features no longer plan on it: {source}. Change the feature file, then start again: \
         the pipeline resumes at that transaction (nothing from it on was acknowledged)"
    )]
    SchemaChange {
        table: String,
        lsn: Lsn,
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
    #[error("rebuilding state from {table}: {source}")]
    Rebuild {
        table: LakeTable,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("a large transaction's pieces were not followed by its end")]
    PiecesWithoutEnd,
    #[error("{0} task failed")]
    Task(String),
    #[error("selecting the rows a table lacks: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl From<SinkError> for RunError {
    fn from(e: SinkError) -> Self {
        RunError::Sink(Box::new(e))
    }
}

impl RunError {
    /// Whether a restart may cure this error (see [`action`]).
    pub fn is_transient(&self) -> bool {
        action(self) == Action::Retry
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
    pub last_lsn: Lsn,
    /// Source schema changes the stages were rebuilt for.
    pub schema_changes: usize,
}

/// Source tables whose running schema comes from the change stream's Relation message
/// rather than the catalog (which may be ahead of the stream).
#[derive(Default)]
struct SchemaOverrides {
    tables: BTreeMap<TableId, SchemaChange>,
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
    let client = source::connect(&conn, pipeline.config.source.connect_retries).await?;
    let mut schemas = source::load_schemas(&client, &pipeline.tables).await?;
    for (&t, change) in &overrides.tables {
        let i = t.index();
        schemas[i] = source::relation_schema(&client, &schemas[i], &change.columns).await?;
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
                table: schemas[change.table.index()].name.to_string(),
                lsn: change.commit_lsn,
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
        tracing::info!(table = %pipeline.tables[change.table.index()], change = %change.diff,
            at_lsn = %change.commit_lsn, "restarting the stages on the new source schema");
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
    let src = &pipeline.config.source;
    source::check_wal_level(&client).await?;
    source::ensure_publication(&client, &src.publication, &pipeline.tables).await?;
    let slot_name = pipeline.slot_name(&conn.database);
    let lake = pipeline.config.lake.open()?;
    let mut sink = open_sink(pipeline, &lake, &slot_name, &schemas, &engine).await?;
    let slot = source::slot_status(&client, &slot_name).await?;
    let start = start::decide(&StartFacts {
        slot: slot.as_ref(),
        slot_name: &slot_name,
        database: &conn.database,
        lake_root: lake.root().as_str(),
        lake: crate::sink::Destination::resume_point(&sink),
        resnapshot_mark: lake.has_marker(Mark::ResnapshotInProgress).await?,
        resnapshot_asked: opts.resnapshot,
    });
    log_start(&start, &slot_name, &lake, slot.as_ref());
    if let Start::Refuse(refusal) = start {
        return Err(refusal.into());
    }
    let resnapshot = start.is_resnapshot();
    let application = format!("pipeline-{}", pipeline.config.name);
    let repl_cfg = source::replication_config(&conn, &slot_name, &src.publication, &application);
    let mut repl = ReplicationClient::connect_gated(repl_cfg)
        .await
        .map_err(SourceError::from)?;
    let mut summary = RunSummary::default();
    let skip_through = match start {
        Start::Refuse(_) => unreachable!("returned above"),
        Start::Snapshot { drop_slot, .. } => {
            if resnapshot {
                lake.put_marker(Mark::ResnapshotInProgress, format!("slot {slot_name}\n"))
                    .await?;
            }
            if drop_slot {
                source::drop_slot(&client, &slot_name).await?;
            }
            let snap =
                source::create_slot_with_snapshot(&mut repl, &slot_name, &conn, &schemas).await?;
            let lsn = snap.consistent_lsn;
            summary.snapshot_rows =
                snapshot::write_snapshot(&engine, &mut sink, &schemas, snap).await?;
            if resnapshot {
                lake.remove_marker(Mark::ResnapshotInProgress).await?;
            }
            summary.last_lsn = lsn;
            tracing::info!(rows = summary.snapshot_rows, elapsed_ms = started.elapsed().as_millis() as u64,
                %lsn, "initial snapshot committed to the lake");
            if opts.once || opts.resnapshot {
                // Everything committed before the start is in the snapshot.
                return Ok((summary, None));
            }
            lsn
        }
        Start::Resume {
            rebuild_to,
            skip_through,
        } => {
            let rows = rebuild::rebuild_state(&engine, &sink, &schemas, rebuild_to).await?;
            tracing::info!(rows, elapsed_ms = started.elapsed().as_millis() as u64,
                resume_at = %rebuild_to, "state rebuilt from the lake; resuming from the slot");
            skip_through
        }
    };
    let fence = match opts.once {
        true => Some(source::emit_fence(&client).await?),
        false => None,
    };
    repl.start().await.map_err(SourceError::from)?;
    repl.wait_started().await.map_err(SourceError::from)?;
    let stream = ChangeStream::new(repl, schemas.clone());
    let processor = Processor::new(&engine, &mut sink, &schemas);
    let opts = BatcherOptions {
        interval: pipeline.config.batch.interval(),
        max_rows: pipeline.config.batch.max_rows,
        skip_through,
        fence_token: fence,
    };
    let change = stream_changes(
        stream,
        &schemas,
        opts,
        processor,
        &client,
        &slot_name,
        &mut summary,
        cancel,
    )
    .await?;
    Ok((summary, change))
}

/// Opens every raw and feature table of the pipeline, with background maintenance.
async fn open_sink(
    pipeline: &Pipeline,
    lake: &crate::sink::Lake,
    slot_name: &str,
    schemas: &[TableSchema],
    engine: &FeatureEngine,
) -> Result<DeltaSink, RunError> {
    let app_id = format!("pipeline-{}-{}", pipeline.config.name, slot_name);
    let raw = schemas.iter().map(|s| TableSpec {
        table: LakeTable::raw(&s.name.name),
        schema: crate::changelog::raw_schema(&s.schema),
        evolves: true,
    });
    let features = engine
        .output_schemas()
        .into_iter()
        .map(|(n, s)| (LakeTable::features(n), s).into());
    let specs: Vec<TableSpec> = raw.chain(features).collect();
    let maintenance = &pipeline.config.lake.maintenance;
    let (maintainer, _task) = Maintainer::spawn(lake.clone(), maintenance.clone());
    let sink = DeltaSink::open_with(lake.clone(), app_id, specs, &maintenance.table_properties())
        .await?
        .with_maintainer(maintainer);
    Ok(sink)
}

fn log_start(start: &Start, slot: &str, lake: &crate::sink::Lake, status: Option<&SlotStatus>) {
    let root = lake.root();
    tracing::info!(lake = %root, slot, slot_exists = status.is_some(), ?start, "starting");
    let Start::Snapshot { reason, .. } = start else {
        return;
    };
    match reason {
        SnapshotReason::FirstRun => {}
        SnapshotReason::Interrupted(lsn) => tracing::warn!(lake = %root, snapshot_lsn = %lsn,
            "the initial snapshot was only partly committed: taking it again, replacing every table"),
        SnapshotReason::NothingFromSlot => tracing::warn!(slot, lake = %root,
            "the lake has no data from this slot: dropping the slot and taking a new snapshot"),
        SnapshotReason::Resnapshot { interrupted } => {
            if *interrupted {
                tracing::warn!(lake = %root, "a resnapshot was interrupted: finishing it first");
            }
            tracing::warn!(slot, lake = %root, slot_exists = status.is_some(),
                "resnapshot: dropping the slot and replacing every table with a new snapshot \
                 (older versions stay readable through Delta time travel until vacuumed)");
        }
    }
}

/// How often the slot's retained WAL and lag are logged.
const SLOT_HEALTH_EVERY: Duration = Duration::from_secs(30);

/// Streams changes through the batcher into `processor` until cancelled, the `--once`
/// fence, or a schema change (returned); acknowledges each batch once it is durable.
#[allow(clippy::too_many_arguments)]
async fn stream_changes(
    stream: ChangeStream,
    schemas: &[TableSchema],
    opts: BatcherOptions,
    mut processor: Processor<'_, DeltaSink>,
    client: &tokio_postgres::Client,
    slot_name: &str,
    summary: &mut RunSummary,
    cancel: CancellationToken,
) -> Result<Option<SchemaChange>, RunError> {
    tracing::info!(from = %opts.skip_through, "streaming changes");
    let batcher_cancel = cancel.child_token();
    let (batch_tx, mut batch_rx) = mpsc::channel::<ChangeBatch>(1);
    let (ack_tx, ack_rx) = watch::channel(opts.skip_through);
    let batcher = tokio::spawn(batch::run(
        stream,
        schemas.to_vec(),
        opts,
        batch_tx,
        ack_rx,
        batcher_cancel.clone(),
    ));
    let result = async {
        let mut health = tokio::time::interval(SLOT_HEALTH_EVERY);
        loop {
            let batch = tokio::select! {
                b = batch_rx.recv() => match b {
                    Some(b) => b,
                    None => return Ok(()),
                },
                _ = health.tick() => {
                    source::check_slot_health(client, slot_name).await?;
                    continue;
                }
            };
            let (kind, rows, txns, first_received) =
                (batch.kind, batch.rows, batch.transactions, batch.first_received);
            summary.changes += rows;
            if let Some(lsn) = processor.process(batch).await? {
                crate::fault::crash_point("before_ack");
                let _ = ack_tx.send(lsn);
                summary.batches += 1;
                summary.last_lsn = lsn;
                tracing::info!(txns, rows, end_lsn = %lsn,
                    latency_ms = first_received.elapsed().as_secs_f64() * 1000.0, "batch committed");
            }
            if kind == BatchKind::End {
                return Ok::<_, RunError>(());
            }
        }
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
        .map_err(|e| RunError::Task(format!("batcher: {e}")))?;
    result?;
    Ok(batcher_result?)
}

/// The status of `pipeline`'s replication slot, or None when it has none (it never
/// ran against this database, or the slot was dropped).
pub async fn slot_status(pipeline: &Pipeline) -> Result<Option<SlotStatus>, RunError> {
    let conn = ConnInfo::parse(&pipeline.config.source.url)?;
    let client = source::connect(&conn, pipeline.config.source.connect_retries).await?;
    Ok(source::slot_status(&client, &pipeline.slot_name(&conn.database)).await?)
}
