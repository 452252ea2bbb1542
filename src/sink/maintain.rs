//! Table maintenance, run beside the appends so a table fed every 200 ms stays as fast to
//! read as a freshly written one: checkpoints (bounded log replay), compaction of small
//! files (rewrite commits with `dataChange = false`), vacuum of files no longer referenced
//! after a retention period, and expired-log cleanup.
//!
//! It works on its own table handles: a compaction commits concurrently with appends, and
//! Delta's conflict check lets a blind append and a compaction of older files both land.

use super::{Lake, LakeTable, SinkError};
use crate::config::MaintenanceConfig;
use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Default, Clone)]
pub struct MaintenanceReport {
    pub checkpoint_version: Option<u64>,
    pub files_compacted: u64,
    pub files_written: u64,
    pub files_vacuumed: usize,
    pub logs_cleaned: usize,
}

/// Runs every due task on the table at `path` now (used by `pipeline maintain` and the
/// background maintainer).
pub async fn maintain_table(
    lake: &Lake,
    path: &LakeTable,
    config: &MaintenanceConfig,
    compact: bool,
) -> Result<MaintenanceReport, SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let mut report = MaintenanceReport::default();
    let mut table = lake.existing_table(path).await?;
    if compact {
        let target = NonZeroU64::new(config.target_file_mb.max(1) * 1024 * 1024).expect("> 0");
        let (t, metrics) = table
            .optimize()
            .with_target_size(target)
            .await
            .map_err(derr)?;
        report.files_compacted = metrics.num_files_removed;
        report.files_written = metrics.num_files_added;
        let retention = chrono::Duration::hours(config.vacuum_retention_hours as i64);
        let (t, vacuumed) = t
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
            .await
            .map_err(derr)?;
        report.files_vacuumed = vacuumed.files_deleted.len();
        table = t;
    }
    deltalake::checkpoints::create_checkpoint(&table, None)
        .await
        .map_err(derr)?;
    report.checkpoint_version = table.version();
    // The configured retention rather than the table's property, so that tables created
    // before it was set follow it too.
    let cutoff = chrono::Utc::now().timestamp_millis()
        - (config.log_retention_minutes as i64).saturating_mul(60_000);
    report.logs_cleaned = deltalake::checkpoints::cleanup_expired_logs_for(
        report.checkpoint_version.unwrap_or(0),
        table.log_store().as_ref(),
        cutoff,
        None,
    )
    .await
    .map_err(derr)?;
    Ok(report)
}

/// Handle to the background maintainer: told about each commit, never blocks the appender.
#[derive(Clone)]
pub struct Maintainer {
    tx: mpsc::Sender<LakeTable>,
}

impl Maintainer {
    /// Spawns the maintainer task for `lake`; it ends when every handle is dropped.
    pub fn spawn(
        lake: Lake,
        config: MaintenanceConfig,
    ) -> (Maintainer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(run(lake, config, rx));
        (Maintainer { tx }, task)
    }

    /// Records a commit to `path`. Dropped when the maintainer lags far behind: counts are
    /// a schedule, not a ledger.
    pub fn committed(&self, path: &LakeTable) {
        let _ = self.tx.try_send(path.clone());
    }
}

async fn run(lake: Lake, config: MaintenanceConfig, mut rx: mpsc::Receiver<LakeTable>) {
    #[derive(Default)]
    struct Counts {
        since_checkpoint: u64,
        since_compaction: u64,
    }
    let mut counts: BTreeMap<LakeTable, Counts> = BTreeMap::new();
    while let Some(path) = rx.recv().await {
        let c = counts.entry(path.clone()).or_default();
        c.since_checkpoint += 1;
        c.since_compaction += 1;
        let compact =
            config.compact_every_commits > 0 && c.since_compaction >= config.compact_every_commits;
        let checkpoint = compact
            || (config.checkpoint_every_commits > 0
                && c.since_checkpoint >= config.checkpoint_every_commits);
        if !checkpoint {
            continue;
        }
        let started = Instant::now();
        match maintain_table(&lake, &path, &config, compact).await {
            Ok(r) => {
                c.since_checkpoint = 0;
                if compact {
                    c.since_compaction = 0;
                }
                tracing::info!(table = %path, checkpoint_version = ?r.checkpoint_version,
                    files_compacted = r.files_compacted, files_written = r.files_written,
                    files_vacuumed = r.files_vacuumed, logs_cleaned = r.logs_cleaned,
                    elapsed_ms = started.elapsed().as_millis() as u64, "table maintenance");
            }
            Err(e) => {
                // Maintenance is an optimisation: a failure is retried at the next commit
                // after a pause, and never stops the appends.
                tracing::warn!(table = %path, error = %e, "table maintenance failed; will retry");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
