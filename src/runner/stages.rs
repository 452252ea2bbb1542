//! One run's stages, prepared: the steps [`super::run_stages`] wires, one method each.

use super::processor::Processor;
use super::{rebuild, snapshot, RunError, RunSummary, SchemaOverrides};
use crate::batch::{self, BatchKind, BatcherOptions, ChangeBatch, SchemaChange};
use crate::changelog::Lsn;
use crate::config::Pipeline;
use crate::features::FeatureEngine;
use crate::sink::{DeltaSink, Lake, LakeTable, Maintainer, Mark, TableSpec};
use crate::source::{self, ChangeStream, ConnInfo, SourceError, TableSchema};
use pgwire_replication::ReplicationClient;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How often the slot's retained WAL and lag are logged.
const SLOT_HEALTH_EVERY: Duration = Duration::from_secs(30);

/// What one run of the stages works with: the source checked, the features planned,
/// the lake opened.
pub(super) struct Stages<'a> {
    pub pipeline: &'a Pipeline,
    pub conn: ConnInfo,
    pub client: tokio_postgres::Client,
    pub schemas: Vec<TableSchema>,
    pub engine: FeatureEngine,
    pub lake: Lake,
    pub slot: String,
}

impl<'a> Stages<'a> {
    /// Plans the features on the source's schemas (with `overrides` from the stream),
    /// checks `wal_level`, makes sure the publication covers the tables, opens the lake.
    pub(crate) async fn prepare(
        pipeline: &'a Pipeline,
        overrides: &SchemaOverrides,
    ) -> Result<Stages<'a>, RunError> {
        let super::Prepared {
            conn,
            client,
            schemas,
            engine,
        } = super::prepare_with(pipeline, overrides).await?;
        let src = &pipeline.config.source;
        source::check_wal_level(&client).await?;
        source::ensure_publication(&client, &src.publication, &pipeline.tables).await?;
        let slot = pipeline.slot_name(&conn.database);
        let lake = pipeline.config.lake.open()?;
        Ok(Stages {
            pipeline,
            conn,
            client,
            schemas,
            engine,
            lake,
            slot,
        })
    }

    /// Opens every raw and feature table of the pipeline, with background maintenance.
    pub(crate) async fn open_sink(&self) -> Result<DeltaSink, RunError> {
        let app_id = format!("pipeline-{}-{}", self.pipeline.config.name, self.slot);
        let raw = self.schemas.iter().map(|s| TableSpec {
            table: LakeTable::raw_of(&s.name),
            schema: crate::changelog::raw_schema(&s.schema),
            evolves: true,
        });
        let features = self
            .engine
            .output_schemas()
            .into_iter()
            .map(|(n, s)| (LakeTable::features(n), s).into());
        let specs: Vec<TableSpec> = raw.chain(features).collect();
        let maintenance = &self.pipeline.config.lake.maintenance;
        let (maintainer, _task) = Maintainer::spawn(self.lake.clone(), maintenance.clone());
        let lake = self.lake.clone();
        let sink = DeltaSink::open_with(lake, app_id, specs, &maintenance.table_properties())
            .await?
            .with_maintainer(maintainer);
        Ok(sink)
    }

    /// The replication connection, not yet streaming.
    pub(crate) async fn replication(&self) -> Result<ReplicationClient, RunError> {
        let src = &self.pipeline.config.source;
        let application = format!("pipeline-{}", self.pipeline.config.name);
        let cfg =
            source::replication_config(&self.conn, &self.slot, &src.publication, &application);
        Ok(ReplicationClient::connect_gated(cfg)
            .await
            .map_err(SourceError::from)?)
    }

    /// Takes a new snapshot into state and every table (dropping the old slot first when
    /// told); a resnapshot is marked in the lake until it is complete. Returns the
    /// consistent LSN the stream starts from.
    pub(crate) async fn snapshot(
        &self,
        repl: &mut ReplicationClient,
        sink: &mut DeltaSink,
        drop_slot: bool,
        resnapshot: bool,
        summary: &mut RunSummary,
    ) -> Result<Lsn, RunError> {
        let started = Instant::now();
        if resnapshot {
            let note = format!("slot {}\n", self.slot);
            self.lake
                .put_marker(Mark::ResnapshotInProgress, note)
                .await?;
        }
        if drop_slot {
            source::drop_slot(&self.client, &self.slot).await?;
        }
        let snap =
            source::create_slot_with_snapshot(repl, &self.slot, &self.conn, &self.schemas).await?;
        let lsn = snap.consistent_lsn;
        summary.snapshot_rows =
            snapshot::write_snapshot(&self.engine, sink, &self.schemas, snap).await?;
        if resnapshot {
            self.lake.remove_marker(Mark::ResnapshotInProgress).await?;
        }
        summary.last_lsn = lsn;
        tracing::info!(rows = summary.snapshot_rows, %lsn,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "initial snapshot committed to the lake");
        Ok(lsn)
    }

    /// Rebuilds state from the lake's raw tables up to `rebuild_to`.
    pub(crate) async fn resume(&self, sink: &DeltaSink, rebuild_to: Lsn) -> Result<(), RunError> {
        let started = Instant::now();
        let rows = rebuild::rebuild_state(&self.engine, sink, &self.schemas, rebuild_to).await?;
        tracing::info!(rows, elapsed_ms = started.elapsed().as_millis() as u64,
            resume_at = %rebuild_to, "state rebuilt from the lake; resuming from the slot");
        Ok(())
    }

    /// Streams changes from the slot through the batcher into the processor until
    /// cancelled, the `--once` fence, or a schema change (returned); each batch is
    /// acknowledged once every table it touches holds it durably.
    pub(crate) async fn stream(
        &self,
        mut repl: ReplicationClient,
        sink: &mut DeltaSink,
        skip_through: Lsn,
        once: bool,
        summary: &mut RunSummary,
        cancel: CancellationToken,
    ) -> Result<Option<SchemaChange>, RunError> {
        let fence_token = match once {
            true => Some(source::emit_fence(&self.client).await?),
            false => None,
        };
        repl.start().await.map_err(SourceError::from)?;
        repl.wait_started().await.map_err(SourceError::from)?;
        let stream = ChangeStream::new(repl, self.schemas.clone());
        let batch = &self.pipeline.config.batch;
        let opts = BatcherOptions {
            interval: batch.interval(),
            max_rows: batch.max_rows,
            skip_through,
            fence_token,
        };
        tracing::info!(from = %skip_through, "streaming changes");
        let batcher_cancel = cancel.child_token();
        let (batch_tx, batch_rx) = mpsc::channel::<ChangeBatch>(1);
        let (ack_tx, ack_rx) = watch::channel(skip_through);
        let schemas = self.schemas.clone();
        let batcher = batch::run(
            stream,
            schemas,
            opts,
            batch_tx,
            ack_rx,
            batcher_cancel.clone(),
        );
        let batcher = tokio::spawn(batcher);
        let processor = Processor::new(&self.engine, sink, &self.schemas);
        let result = self.process(processor, batch_rx, ack_tx, summary).await;
        if result.is_err() {
            // Stops this run's batcher only: the caller's token decides about a restart.
            batcher_cancel.cancel();
        }
        let batcher_result = batcher
            .await
            .map_err(|e| RunError::Task(format!("batcher: {e}")))?;
        result?;
        Ok(batcher_result?)
    }

    /// The processor's loop: each batch made durable, then its LSN handed back for the
    /// acknowledgement; the slot's health logged meanwhile. Dropping the channels on
    /// return tells the batcher to finish.
    async fn process(
        &self,
        mut processor: Processor<'_, DeltaSink>,
        mut batches: mpsc::Receiver<ChangeBatch>,
        durable: watch::Sender<Lsn>,
        summary: &mut RunSummary,
    ) -> Result<(), RunError> {
        let mut health = tokio::time::interval(SLOT_HEALTH_EVERY);
        loop {
            let batch = tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => b,
                    None => return Ok(()),
                },
                _ = health.tick() => {
                    source::check_slot_health(&self.client, &self.slot).await?;
                    continue;
                }
            };
            let (kind, rows, txns, first_received) = (
                batch.kind,
                batch.rows,
                batch.transactions,
                batch.first_received,
            );
            summary.changes += rows;
            if let Some(lsn) = processor.process(batch).await? {
                crate::fault::crash_point("before_ack");
                let _ = durable.send(lsn);
                summary.batches += 1;
                summary.last_lsn = lsn;
                tracing::info!(txns, rows, end_lsn = %lsn,
                    latency_ms = first_received.elapsed().as_secs_f64() * 1000.0, "batch committed");
            }
            if kind == BatchKind::End {
                return Ok(());
            }
        }
    }
}
