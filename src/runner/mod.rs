//! Wires the stages; every stage's logic lives in its own module.
//!
//! ```text
//!  Postgres ──pgoutput──▶ batcher ──ChangeBatch (bounded, 1)──▶ Compute ──Work (bounded, 4)──▶ Committer ──▶ Destination (Delta: raw + features)
//!     ▲   ▲                                                       │ features, watermark                │
//!     │   └── fencer (a reader waits beyond the watermark) ◀── Online ◀┘                                  │
//!     └──────── ack LSN (watch; only after every table of a batch is durable) ◀─────────────────────────┘
//! ```
//!
//! A run: [`prepare`] (schemas, planned features) → [`start::decide`] (snapshot, resume
//! or refuse, from the slot and the lake's [`ResumePoint`](crate::sink::ResumePoint)) →
//! [`snapshot::write_snapshot`] or [`rebuild::rebuild_state`] → the stream, where
//! [`processor::Compute`] applies each batch to state, computes its features and
//! publishes them online, and [`processor::Committer`] turns them into durable commits
//! and returns the LSN the batcher acknowledges. [`run_supervised`] restarts runs that
//! [`policy`] retries.

mod fence;
mod policy;
mod processor;
mod rebuild;
mod snapshot;
mod stages;
mod start;
mod supervise;
mod thread_time;

pub use policy::{action, Action};
pub(crate) use rebuild::{conform, rebuild_state, session_over};
pub use start::Refusal;
pub use supervise::run_supervised;

use crate::batch::SchemaChange;
use crate::changelog::{Lsn, TableId};
use crate::config::Pipeline;
use crate::features::{FeatureEngine, FeatureError};
use crate::sink::{Destination, LakeTable, Mark, SinkError};
use crate::source::{self, ConnInfo, SlotStatus, SourceError, TableSchema};
use stages::Stages;
use start::{SnapshotReason, Start, StartFacts};
use std::collections::BTreeMap;
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
    #[error(
        "a backfill of {tables} did not finish (the lake carries its mark): run `pipeline \
         backfill <pipeline.yaml>` again to finish it, then run"
    )]
    BackfillUnfinished { tables: String },
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

#[derive(Clone, Default)]
pub struct RunOptions {
    /// Process what was committed before the start, then exit.
    pub once: bool,
    /// Drop the slot (if any), take a new snapshot replacing every table, then exit:
    /// the way back after the slot was invalidated or lost.
    pub resnapshot: bool,
    /// Serve computed features from memory (the online API reads them here).
    pub online: Option<crate::serve::Online>,
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
    let stages = Stages::prepare(pipeline, overrides, opts.online.clone()).await?;
    // A resnapshot replaces every table, so it also ends an unfinished backfill.
    if let Some(body) = stages.lake.read_marker(Mark::BackfillInProgress).await? {
        if !opts.resnapshot {
            let tables: Vec<String> = serde_json::from_str(&body).unwrap_or_default();
            let tables = tables
                .iter()
                .map(|t| format!("features/{t}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RunError::BackfillUnfinished { tables });
        }
    }
    let mut sink = stages.open_sink().await?;
    let slot = source::slot_status(&stages.client, &stages.slot).await?;
    let start = start::decide(&StartFacts {
        slot: slot.as_ref(),
        slot_name: &stages.slot,
        database: &stages.conn.database,
        lake_root: stages.lake.root().as_str(),
        lake: sink.resume_point(),
        resnapshot_mark: stages.lake.has_marker(Mark::ResnapshotInProgress).await?,
        resnapshot_asked: opts.resnapshot,
    });
    log_start(&start, &stages.slot, &stages.lake, slot.as_ref());
    let resnapshot = start.is_resnapshot();
    let mut summary = RunSummary::default();
    let mut repl = match start {
        Start::Refuse(refusal) => return Err(refusal.into()),
        _ => stages.replication().await?,
    };
    let skip_through = match start {
        Start::Refuse(_) => unreachable!("returned above"),
        Start::Snapshot { drop_slot, .. } => {
            let snapshot =
                stages.snapshot(&mut repl, &mut sink, drop_slot, resnapshot, &mut summary);
            let lsn = snapshot.await?;
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
            stages.resume(&sink, rebuild_to, skip_through).await?;
            skip_through
        }
    };
    let streamed = stages.stream(repl, sink, skip_through, opts.once, &mut summary, cancel);
    let change = streamed.await?;
    Ok((summary, change))
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

/// The status of `pipeline`'s replication slot, or None when it has none (it never
/// ran against this database, or the slot was dropped).
pub async fn slot_status(pipeline: &Pipeline) -> Result<Option<SlotStatus>, RunError> {
    let conn = ConnInfo::parse(&pipeline.config.source.url)?;
    let client = source::connect(&conn, pipeline.config.source.connect_retries).await?;
    Ok(source::slot_status(&client, &pipeline.slot_name(&conn.database)).await?)
}
