//! Table maintenance, run beside the appends so a table fed every 200 ms stays as fast to
//! read as a freshly written one: checkpoints (bounded log replay), compaction of small
//! files (rewrite commits with `dataChange = false`), vacuum of files no longer referenced
//! after a retention period, and expired-log cleanup.
//!
//! In the background it never commits: the sink hands it the table after each commit,
//! compactions are rewritten here and land with the table's next append
//! ([`compact`]), checkpoints and log cleanup write no log entry, and vacuum deletes
//! files without delta-rs' vacuum commits. So no append ever waits on it or retries.
//! `pipeline maintain` ([`maintain_table`]) is the offline path, with delta-rs' own
//! optimize and vacuum.

use super::compact::{self, Folds};
use super::{Lake, LakeTable, SinkError};
use crate::config::MaintenanceConfig;
use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::DeltaTable;
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
    report.logs_cleaned = deltalake::checkpoints::cleanup_expired_logs_for(
        report.checkpoint_version.unwrap_or(0),
        table.log_store().as_ref(),
        log_cleanup_cutoff(config),
        None,
    )
    .await
    .map_err(derr)?;
    Ok(report)
}

/// Commit files last modified before this (ms since the epoch) may be deleted: the
/// configured retention rather than the table's property, so that tables created before
/// it was set follow it too.
fn log_cleanup_cutoff(config: &MaintenanceConfig) -> i64 {
    let minutes = i64::try_from(config.log_retention_minutes).unwrap_or(i64::MAX);
    let retention_ms = minutes.saturating_mul(60_000);
    chrono::Utc::now()
        .timestamp_millis()
        .saturating_sub(retention_ms)
}

/// How much less CPU the maintainer's thread claims than the pipeline's (a Linux nice
/// value). Checkpoints and compactions are CPU work that yields rarely; on the runtime the
/// batches use, each held a worker for tens of milliseconds (single ~100 ms visibility
/// outliers on 2 cores). On a thread of its own the kernel shares the cores between it
/// and the batches in slices of a few milliseconds, and a little lower priority lets a
/// batch's threads go first. Not much lower: on a saturated machine (an S3 lake on 2
/// cores) nice 10 starved it, its compactions fell behind and every commit grew slower.
const NICE: i32 = 5;

/// Lowers the calling thread's priority to `nice` (on Linux the nice value is a thread's
/// own; the threads it starts inherit it).
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its arguments; 0 names the calling thread.
        let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0;
        if failed {
            tracing::debug!(error = %std::io::Error::last_os_error(),
                "table maintenance keeps the pipeline's priority");
        }
    }
}

/// Runs the future `make` returns on a thread of its own at `nice` ([`NICE`] for the
/// maintainer), on a one-worker runtime (multi-thread, not current-thread: on a
/// current-thread runtime delta-rs starts a background thread and runtime per engine it
/// makes, whose connections die with it).
/// For work that helps but is not needed (maintenance, state checkpoints): a failure to
/// start it is logged, not returned.
pub(super) fn background<F, Fut>(name: &'static str, nice: i32, make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let started = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_priority(nice);
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(name)
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(make()),
                Err(e) => tracing::warn!(error = %e, thread = name, "no runtime: not started"),
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, thread = name, "could not start");
    }
}

/// Handle to the background maintainer: told about each commit (with the table as it
/// committed), never blocks the appender. It runs on a runtime of its own, so every table
/// it is handed is moved onto a store of its own first ([`Tracked`]): an object-store
/// client's connections belong to the runtime that opened them.
#[derive(Clone)]
pub struct Maintainer {
    tx: mpsc::Sender<(LakeTable, DeltaTable)>,
    folds: Folds,
}

impl Maintainer {
    /// Starts the maintainer for `lake` on a thread of its own (see [`NICE`]); it ends
    /// when every handle is dropped, and the returned task with it.
    pub fn spawn(
        lake: Lake,
        config: MaintenanceConfig,
    ) -> (Maintainer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let folds = Folds::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_folds = folds.clone();
        // Maintenance is an optimisation: without its thread the appends go on.
        background("maintainer", NICE, move || async move {
            run(lake, config, thread_folds, rx).await;
            let _ = done_tx.send(());
        });
        let task = tokio::spawn(async move {
            let _ = done_rx.await;
        });
        (Maintainer { tx, folds }, task)
    }

    /// Records a commit to `path`, which left `table`. Dropped when the maintainer lags
    /// far behind: counts are a schedule, not a ledger.
    pub(crate) fn committed(&self, path: &LakeTable, table: &DeltaTable) {
        let _ = self.tx.try_send((path.clone(), table.clone()));
    }

    /// Where compactions and fresh tables wait for the sink.
    pub(crate) fn folds(&self) -> &Folds {
        &self.folds
    }
}

/// One table as the maintainer follows it.
struct Tracked {
    /// The newest snapshot a commit left, on the maintainer's own store.
    table: DeltaTable,
    since_checkpoint: u64,
    since_compaction: u64,
    /// When expired commit files are next deleted (at the first checkpoint after it);
    /// never when the retention is too long to count to.
    next_log_cleanup: Option<Instant>,
}

async fn run(
    lake: Lake,
    config: MaintenanceConfig,
    folds: Folds,
    mut rx: mpsc::Receiver<(LakeTable, DeltaTable)>,
) {
    let mut tables: BTreeMap<LakeTable, Tracked> = BTreeMap::new();
    let mut last_vacuum = Instant::now();
    let note = |tables: &mut BTreeMap<LakeTable, Tracked>, path: LakeTable, table: DeltaTable| {
        if !tables.contains_key(&path) {
            let own = match lake.unloaded(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(table = %path, error = %e, "table maintenance skipped");
                    return;
                }
            };
            // The tables of a batch commit together: counted from zero, every table's
            // checkpoint (and compaction) would fall due at the same commit and run back
            // to back, a burst of CPU the appends beside it feel.
            let nth = tables.len() as u64;
            let tracked = Tracked {
                table: own,
                since_checkpoint: stagger(nth, config.checkpoint_every_commits),
                since_compaction: stagger(nth, config.compact_every_commits),
                next_log_cleanup: Instant::now()
                    .checked_add(log_cleanup_every(&config).mul_f64(spread(nth))),
            };
            tables.insert(path.clone(), tracked);
        }
        let t = tables.get_mut(&path).expect("inserted above");
        t.table.state = table.state;
        t.since_checkpoint += 1;
        t.since_compaction += 1;
    };
    while let Some((path, table)) = rx.recv().await {
        // Only the newest table of each matters: the commits queued meanwhile just count.
        note(&mut tables, path, table);
        while let Ok((path, table)) = rx.try_recv() {
            note(&mut tables, path, table);
        }
        for (path, t) in &tables {
            folds.advance_fresh(path, &t.table).await;
        }
        for (path, t) in tables.iter_mut() {
            if let Err(e) = maintain_due(&lake, &config, &folds, path, t).await {
                // Maintenance is an optimisation: a failure is retried at a later commit
                // after a pause, and never stops the appends.
                tracing::warn!(table = %path, error = %e, "table maintenance failed; will retry");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
        let every = Duration::from_secs(config.vacuum_every_minutes.saturating_mul(60));
        if config.vacuum_every_minutes > 0 && last_vacuum.elapsed() >= every {
            last_vacuum = Instant::now();
            for (path, t) in &tables {
                if let Err(e) = vacuum(&config, path, &t.table).await {
                    tracing::warn!(table = %path, error = %e, "vacuum failed; will retry");
                }
            }
        }
    }
}

/// Where the `nth` table's count of commits starts, so that tables due every `every`
/// commits fall due at commits spread over that cycle (golden-ratio steps: any number of
/// tables stays evenly spread).
fn stagger(nth: u64, every: u64) -> u64 {
    let offset = spread(nth) * every as f64;
    (offset as u64).min(every.saturating_sub(1))
}

/// Where in a cycle the `nth` table starts, as a fraction in [0, 1).
fn spread(nth: u64) -> f64 {
    const STEP: f64 = 0.618_033_988_75;
    (nth as f64 * STEP).fract()
}

/// Log cleanup lists the whole log (on s3s-fs, the whole bucket): once every quarter of
/// the retention is enough to keep the log near its retention. Each table's first
/// cleanup comes at its own point of that period ([`spread`]): at 1,000 tx/s the four
/// tables' cleanups (each listing ~10,000 commit files) falling within seconds of each
/// other was the slowest minute of a 10-minute run.
fn log_cleanup_every(config: &MaintenanceConfig) -> Duration {
    Duration::from_secs(config.log_retention_minutes.saturating_mul(60)) / 4
}

/// Compacts and checkpoints `t` when due.
async fn maintain_due(
    lake: &Lake,
    config: &MaintenanceConfig,
    folds: &Folds,
    path: &LakeTable,
    t: &mut Tracked,
) -> Result<(), SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let version = t.table.version().unwrap_or(0);
    if config.compact_every_commits > 0
        && t.since_compaction >= config.compact_every_commits
        && !folds.busy(path, version)
    {
        t.since_compaction = 0;
        let started = Instant::now();
        let mb = |n: u64| (n.max(1) * 1024 * 1024) as i64;
        let target = mb(config.target_file_mb);
        if let Some(removes) =
            compact::plan(&t.table, mb(config.small_file_mb), target).map_err(derr)?
        {
            let compaction = compact::rewrite(&t.table, removes, target as u64)
                .await
                .map_err(derr)?;
            lake.sync_files(path, compaction.added_paths()).await?;
            tracing::info!(table = %path, version, files = compaction.files_removed(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "compaction rewritten; lands with the next append");
            folds.offer_compaction(path, compaction);
            metrics::histogram!(crate::metrics::MAINTENANCE_SECONDS, "task" => "compact")
                .record(started.elapsed().as_secs_f64());
        }
    }
    if config.checkpoint_every_commits > 0 && t.since_checkpoint >= config.checkpoint_every_commits
    {
        t.since_checkpoint = 0;
        let started = Instant::now();
        deltalake::checkpoints::create_checkpoint(&t.table, None)
            .await
            .map_err(derr)?;
        let written = started.elapsed();
        // The writer continues from a table read from this checkpoint: a snapshot that
        // only ever grows by each commit gets slower to move forward. Offered before the
        // cleanup so that the writer's snapshot updates list the log (from its old
        // checkpoint) for as few commits as possible.
        let fresh = lake.existing_table(path).await?;
        folds.offer_fresh(path, fresh);
        let reloaded = started.elapsed();
        let cleaned = if t.next_log_cleanup.is_some_and(|at| Instant::now() >= at) {
            t.next_log_cleanup = Instant::now().checked_add(log_cleanup_every(config));
            deltalake::checkpoints::cleanup_expired_logs_for(
                version,
                t.table.log_store().as_ref(),
                log_cleanup_cutoff(config),
                None,
            )
            .await
            .map(Some)
            .map_err(derr)?
        } else {
            None
        };
        let elapsed = started.elapsed();
        let mut tasks = vec![("checkpoint", written), ("reload", reloaded - written)];
        if cleaned.is_some() {
            tasks.push(("log_cleanup", elapsed - reloaded));
        }
        for (task, took) in tasks {
            metrics::histogram!(crate::metrics::MAINTENANCE_SECONDS, "task" => task)
                .record(took.as_secs_f64());
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let cleaned = cleaned.unwrap_or(0);
        tracing::info!(table = %path, checkpoint_version = version, logs_cleaned = cleaned,
            elapsed_ms = ms(elapsed), write_ms = ms(written), reload_ms = ms(reloaded - written),
            cleanup_ms = ms(elapsed - reloaded), "checkpoint written");
    }
    Ok(())
}

/// Deletes the files no version inside the retention references. A dry run of delta-rs'
/// vacuum finds them and the deletes follow here: the real vacuum commits twice (start
/// and end), beside the appends, which is what the maintainer never does.
async fn vacuum(
    config: &MaintenanceConfig,
    path: &LakeTable,
    table: &DeltaTable,
) -> Result<usize, SinkError> {
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let started = Instant::now();
    let retention = chrono::Duration::hours(config.vacuum_retention_hours as i64);
    let (_, found) = table
        .clone()
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
        .with_dry_run(true)
        .await
        .map_err(derr)?;
    let store = table.object_store();
    for f in &found.files_deleted {
        let file = deltalake::Path::from(f.as_str());
        match store.delete(&file).await {
            Ok(()) | Err(deltalake::ObjectStoreError::NotFound { .. }) => {}
            Err(source) => {
                return Err(SinkError::Store {
                    path: f.clone(),
                    source,
                })
            }
        }
    }
    metrics::histogram!(crate::metrics::MAINTENANCE_SECONDS, "task" => "vacuum")
        .record(started.elapsed().as_secs_f64());
    tracing::info!(table = %path, files_vacuumed = found.files_deleted.len(),
        elapsed_ms = started.elapsed().as_millis() as u64, "vacuum");
    Ok(found.files_deleted.len())
}

#[cfg(test)]
mod tests {
    use super::{log_cleanup_every, spread, stagger, MaintenanceConfig};

    #[test]
    fn staggered_tables_fall_due_at_different_commits() {
        let starts: Vec<u64> = (0..4).map(|n| stagger(n, 100)).collect();
        assert_eq!(starts, vec![0, 61, 23, 85]);
        // Each comes due within one cycle, and `every` of 0 or 1 still works.
        assert!((0..50).all(|n| stagger(n, 20) < 20));
        assert_eq!(stagger(3, 0), 0);
        assert_eq!(stagger(3, 1), 0);
        // Log cleanups start at the same fractions of their period.
        assert_eq!(spread(0), 0.0);
        assert!((1..50).all(|n| spread(n) > 0.0 && spread(n) < 1.0));
        // A retention too long to add to a clock is no panic.
        let config = MaintenanceConfig {
            log_retention_minutes: u64::MAX,
            ..MaintenanceConfig::default()
        };
        for n in 0..4 {
            let first = log_cleanup_every(&config).mul_f64(spread(n));
            let _ = std::time::Instant::now().checked_add(first);
        }
    }
}
