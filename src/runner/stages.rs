//! One run's stages, prepared: the steps [`super::run_stages`] wires, one method each.

use super::processor::{BatchInfo, Committer, Compute, Work};
use super::thread_time::ThreadClock;
use super::{fence, rebuild, snapshot, RunError, RunSummary, SchemaOverrides};
use crate::batch::{self, BatcherOptions, ChangeBatch, SchemaChange};
use crate::changelog::Lsn;
use crate::config::Pipeline;
use crate::features::FeatureEngine;
use crate::serve::{Online, Phase};
use crate::sink::checkpoint::{self, CheckpointSpec, Checkpointer, Durable};
use crate::sink::{DeltaSink, Destination, Lake, LakeTable, Maintainer, Mark, TableSpec};
use crate::source::{self, ChangeStream, ConnInfo, SourceError, TableSchema};
use pgwire_replication::ReplicationClient;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How often the slot's retained WAL and lag are logged.
const SLOT_HEALTH_EVERY: Duration = Duration::from_secs(30);
/// Change rows computed ahead of the commit running, in batches of `batch.max_rows`:
/// the next batches are applied and served online while the Delta commits of earlier
/// ones run, and the committer takes all that waits as one group commit.
const COMPUTED_AHEAD: usize = 4;
/// Works waiting for the committer, whatever their rows (read-your-writes fences make
/// many small ones).
const WORKS_AHEAD: usize = 4096;

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
    /// Where computed features are served from, when the API is on.
    pub online: Option<Online>,
}

impl<'a> Stages<'a> {
    /// Plans the features on the source's schemas (with `overrides` from the stream),
    /// checks `wal_level`, makes sure the publication covers the tables, opens the lake.
    pub(crate) async fn prepare(
        pipeline: &'a Pipeline,
        overrides: &SchemaOverrides,
        online: Option<Online>,
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
            online,
        })
    }

    /// The online store starts loading (`phase`): emptied, on this run's schemas.
    fn begin_online(&self, phase: Phase) {
        if let Some(online) = &self.online {
            online.begin(phase, &self.engine.output_schemas());
            online.set_state(self.engine.state().clone());
        }
    }

    /// Opens every raw and feature table of the pipeline, with background maintenance.
    pub(crate) async fn open_sink(&self) -> Result<DeltaSink, RunError> {
        let app_id = self.pipeline.app_id(&self.slot);
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

    /// What the state checkpoints cover: every raw table by its primary key, every
    /// feature table by its entity key (its first column).
    pub(crate) fn checkpoint_specs(&self) -> Vec<CheckpointSpec> {
        let raw = self.schemas.iter().map(|s| CheckpointSpec {
            table: LakeTable::raw_of(&s.name),
            keys: s.key.iter().map(|&k| s.columns[k].name.clone()).collect(),
        });
        let features = self
            .engine
            .output_schemas()
            .into_iter()
            .map(|(name, schema)| CheckpointSpec {
                table: LakeTable::features(name),
                keys: vec![schema.field(0).name().clone()],
            });
        raw.chain(features).collect()
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
        self.begin_online(Phase::Snapshot);
        if resnapshot {
            let note = format!("slot {}\n", self.slot);
            self.lake
                .put_marker(Mark::ResnapshotInProgress, note)
                .await?;
        }
        if drop_slot {
            source::drop_slot(&self.client, &self.slot).await?;
        }
        // Checkpoints of the tables the snapshot replaces would be stale.
        let tables: Vec<LakeTable> = self
            .checkpoint_specs()
            .into_iter()
            .map(|s| s.table)
            .collect();
        checkpoint::invalidate(&self.lake, &tables).await?;
        let snap =
            source::create_slot_with_snapshot(repl, &self.slot, &self.conn, &self.schemas).await?;
        let lsn = snap.consistent_lsn;
        let online = self.online.as_ref();
        summary.snapshot_rows =
            snapshot::write_snapshot(&self.engine, sink, &self.schemas, snap, online).await?;
        if resnapshot {
            self.lake.remove_marker(Mark::ResnapshotInProgress).await?;
        }
        // Every table now holds the new snapshot: no backfill is left to finish.
        self.lake.remove_marker(Mark::BackfillInProgress).await?;
        summary.last_lsn = lsn;
        tracing::info!(rows = summary.snapshot_rows, %lsn,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "initial snapshot committed to the lake");
        if let Some(online) = &self.online {
            online.ready(lsn);
        }
        Ok(lsn)
    }

    /// Rebuilds state from the lake's raw tables up to `rebuild_to`, and the online
    /// features from its feature tables; the watermark starts at `skip_through` (in
    /// every table).
    pub(crate) async fn resume(
        &self,
        sink: &DeltaSink,
        rebuild_to: Lsn,
        skip_through: Lsn,
    ) -> Result<(), RunError> {
        let started = Instant::now();
        self.begin_online(Phase::Rebuilding);
        let rows = rebuild::rebuild_state(
            &self.engine,
            Some(&self.lake),
            &|p| sink.table(p).cloned(),
            &self.schemas,
            rebuild_to,
        )
        .await?;
        tracing::info!(rows, elapsed_ms = started.elapsed().as_millis() as u64,
            resume_at = %rebuild_to, "state rebuilt from the lake; resuming from the slot");
        if let Some(online) = &self.online {
            let started = Instant::now();
            let entities =
                rebuild::rebuild_online(&self.engine, &self.lake, sink, online, rebuild_to).await?;
            online.ready(skip_through);
            tracing::info!(entities, elapsed_ms = started.elapsed().as_millis() as u64,
                watermark = %skip_through, "online features loaded from the lake");
        }
        Ok(())
    }

    /// Streams changes from the slot through the batcher into the processor until
    /// cancelled, the `--once` fence, or a schema change (returned); each batch is
    /// acknowledged once every table it touches holds it durably.
    ///
    /// ```text
    /// batcher ─ChangeBatch (1)─▶ compute (this task) ─Work (COMPUTED_AHEAD)─▶ committer (task) ─durable LSN─▶ batcher
    /// ```
    pub(crate) async fn stream(
        &self,
        mut repl: ReplicationClient,
        sink: DeltaSink,
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
        // Stops this run's tasks only: the caller's token decides about a restart.
        let run_cancel = cancel.child_token();
        let (batch_tx, batch_rx) = mpsc::channel::<ChangeBatch>(1);
        let (work_tx, work_rx) = mpsc::channel::<Queued>(WORKS_AHEAD);
        let ahead = Arc::new(Semaphore::new(COMPUTED_AHEAD * batch.max_rows));
        let (ack_tx, ack_rx) = watch::channel(skip_through);
        let (durable_tx, durable_rx) = watch::channel(Durable {
            lsn: skip_through,
            changes: 0,
        });
        Checkpointer::spawn(
            self.lake.clone(),
            self.checkpoint_specs(),
            self.pipeline.config.lake.maintenance.clone(),
            durable_rx,
        );
        let batcher = batch::run(
            stream,
            self.schemas.clone(),
            opts,
            batch_tx,
            ack_rx,
            run_cancel.clone(),
        );
        let batcher = tokio::spawn(batcher);
        let committer = tokio::spawn(commit_loop(
            Committer::new(sink),
            work_rx,
            ack_tx,
            durable_tx,
        ));
        if let Some(online) = &self.online {
            let conn = self.conn.clone();
            tokio::spawn(fence::run(conn, online.clone(), run_cancel.clone()));
        }
        let compute = Compute::new(&self.engine, &self.schemas, self.online.as_ref());
        let computed = self
            .compute_loop(compute, batch_rx, work_tx, ahead, summary)
            .await;
        // The committer finishes what was computed (it ends when `work_tx` is dropped),
        // or has failed already.
        let committed = committer
            .await
            .map_err(|e| RunError::Task(format!("committer: {e}")));
        if computed.is_err() || !matches!(committed, Ok(Ok(_))) {
            run_cancel.cancel();
        }
        let batcher_result = batcher
            .await
            .map_err(|e| RunError::Task(format!("batcher: {e}")));
        run_cancel.cancel();
        let (batches, last_lsn) = committed??;
        summary.batches += batches;
        summary.last_lsn = summary.last_lsn.max(last_lsn);
        computed?;
        Ok(batcher_result??)
    }

    /// The compute half's loop: each batch applied, computed and served online, then
    /// handed to the committer; the slot's health checked meanwhile. Returns when the
    /// batcher is done (or, early, when the committer is gone: its error is the run's).
    async fn compute_loop(
        &self,
        mut compute: Compute<'_>,
        mut batches: mpsc::Receiver<ChangeBatch>,
        works: mpsc::Sender<Queued>,
        ahead: Arc<Semaphore>,
        summary: &mut RunSummary,
    ) -> Result<(), RunError> {
        let most = COMPUTED_AHEAD * self.pipeline.config.batch.max_rows;
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
            let started = Instant::now();
            summary.changes += batch.rows;
            metrics::counter!(crate::metrics::ROWS).increment(batch.rows as u64);
            let work = compute.compute(batch).await?;
            metrics::histogram!(crate::metrics::BATCH_SECONDS, "step" => "compute")
                .record(started.elapsed().as_secs_f64());
            let end = matches!(work, Work::End);
            // Waits while the rows ahead of the committer are at the bound.
            let rows = work.rows().min(most) as u32;
            let Ok(permit) = ahead.clone().acquire_many_owned(rows).await else {
                return Ok(());
            };
            if works.send((work, permit)).await.is_err() || end {
                return Ok(());
            }
        }
    }
}

/// A computed work and its share of the rows allowed ahead of the committer.
type Queued = (Work, OwnedSemaphorePermit);

/// The commit half's loop: each work made durable in order, then its LSN handed back
/// for the acknowledgement. What queued up behind a commit is merged into one group
/// commit, so that one commit per table carries many batches when they come faster than
/// a commit takes. Returns the batches committed and the last LSN; dropping `durable` on
/// return tells the batcher to finish. `progress` follows it with the changes committed,
/// for the state checkpoints.
async fn commit_loop<D: Destination + Send + Sync>(
    mut committer: Committer<D>,
    mut works: mpsc::Receiver<Queued>,
    durable: watch::Sender<Lsn>,
    progress: watch::Sender<Durable>,
) -> Result<(usize, Lsn), RunError> {
    let (mut batches, mut last, mut changes) = (0, Lsn::ZERO, 0u64);
    let mut held: Option<Queued> = None;
    loop {
        let next = match held.take() {
            Some(queued) => Some(queued),
            None => works.recv().await,
        };
        let Some((mut work, permit)) = next else {
            break;
        };
        let mut permits = vec![permit];
        while work.groups() {
            match works.try_recv() {
                Ok((next, p)) if next.groups() => {
                    work = work.merge(next);
                    permits.push(p);
                }
                Ok(other) => {
                    held = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let info: Option<BatchInfo> = match &work {
            Work::Commit { batch, .. } => Some(*batch),
            _ => None,
        };
        let started = Instant::now();
        let clock = ThreadClock::start();
        let Some(lsn) = committer.commit(work).await? else {
            continue;
        };
        if let Some(spent) = clock.slow() {
            tracing::debug!(%spent, "slow commit");
        }
        drop(permits);
        crate::fault::crash_point("before_ack");
        let _ = durable.send(lsn);
        last = lsn;
        metrics::gauge!(crate::metrics::DURABLE_LSN).set(lsn.as_u64() as f64);
        let Some(b) = info else { continue };
        changes += b.rows as u64;
        let _ = progress.send(Durable { lsn, changes });
        batches += b.batches;
        metrics::counter!(crate::metrics::BATCHES).increment(b.batches as u64);
        metrics::histogram!(crate::metrics::BATCH_ROWS).record(b.rows as f64);
        metrics::histogram!(crate::metrics::BATCH_SECONDS, "step" => "commit")
            .record(started.elapsed().as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(txns = b.transactions, rows = b.rows, batches = b.batches, end_lsn = %lsn,
            compute_ms = ms(b.compute), queue_ms = ms(started.duration_since(b.computed)),
            commit_ms = ms(started.elapsed()),
            latency_ms = ms(b.first_received.elapsed()), "batch committed");
    }
    Ok((batches, last))
}
