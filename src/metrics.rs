//! Metric names, in one place, and the Prometheus recorder `/metrics` renders. Stages
//! record through the `metrics` facade; without an installed recorder (tests, `--once`)
//! recording costs next to nothing.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Source commit → features computed and served online (seconds).
pub const COMMIT_TO_ONLINE: &str = "pipeline_commit_to_online_seconds";
/// Source commit → every Delta table of the batch committed durably (seconds).
pub const COMMIT_TO_DURABLE: &str = "pipeline_commit_to_durable_seconds";
/// Time one batch spends in a step (`step` = `compute` | `commit`).
pub const BATCH_SECONDS: &str = "pipeline_batch_seconds";
/// Change rows per batch.
pub const BATCH_ROWS: &str = "pipeline_batch_rows";
/// Change rows processed.
pub const ROWS: &str = "pipeline_rows_total";
/// Batches committed.
pub const BATCHES: &str = "pipeline_batches_total";
/// One table's Delta commit (`table` = `raw/loan`, …).
pub const TABLE_COMMIT_SECONDS: &str = "pipeline_table_commit_seconds";
/// One step of an append (`step` = `write`: Parquet encoded and uploaded, `log`: the
/// log entry, `snapshot`: the writer's snapshot moved to it; `reload`: before the
/// append, the writer's table swapped for the one the maintainer read from a new
/// checkpoint, brought up to date).
pub const TABLE_COMMIT_STEP_SECONDS: &str = "pipeline_table_commit_step_seconds";
/// One request to the lake's object store (`op` = `put`, `get`, `head`, `list`,
/// `copy`, `rename`; `list_log`: a `_delta_log` listing answered by the log cache and
/// HEADs, `list_log_listed`: one the store listed).
pub const OBJECT_STORE_SECONDS: &str = "pipeline_object_store_seconds";
/// Making a commit's files durable on a local lake (fsync).
pub const LAKE_DURABLE_SECONDS: &str = "pipeline_lake_durable_seconds";
/// One maintenance task on one table (`task` = `compact`, `checkpoint`,
/// `vacuum`, `state_checkpoint` for all tables at once).
pub const MAINTENANCE_SECONDS: &str = "pipeline_maintenance_seconds";
/// Live files of a table after its latest append (`table`): what the writer's snapshot
/// carries and each commit moves on.
pub const TABLE_LIVE_FILES: &str = "pipeline_table_live_files";
/// Small files removed by compactions folded into appends.
pub const COMPACTED_FILES: &str = "pipeline_compacted_files_total";
/// WAL the server holds for the slot, and how far the acknowledged position is behind
/// the server's current WAL position.
pub const SLOT_RETAINED_BYTES: &str = "pipeline_slot_retained_wal_bytes";
pub const SLOT_LAG_BYTES: &str = "pipeline_slot_lag_bytes";
/// The online watermark and the durable (acknowledged) LSN, as numbers.
pub const WATERMARK_LSN: &str = "pipeline_watermark_lsn";
pub const DURABLE_LSN: &str = "pipeline_durable_lsn";
/// Entities served online per feature file.
pub const ONLINE_ENTITIES: &str = "pipeline_online_entities";
/// HTTP requests (`route`, `status`).
pub const HTTP_SECONDS: &str = "pipeline_http_request_seconds";
/// Read-your-writes waits, their timeouts, and how long they waited.
pub const WAITS: &str = "pipeline_online_waits_total";
pub const WAIT_TIMEOUTS: &str = "pipeline_online_wait_timeouts_total";
pub const WAIT_SECONDS: &str = "pipeline_online_wait_seconds";
/// Fences written into the WAL for readers ahead of the watermark.
pub const FENCES: &str = "pipeline_fences_total";
/// Requests refused because `serve.max_in_flight` were being handled.
pub const SHED: &str = "pipeline_http_shed_total";

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const ROWS_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];

/// Installs the process-wide recorder; the handle renders the text `/metrics` serves.
/// Call inside the runtime: a task drains the histograms' samples every few seconds,
/// which a scrape would otherwise do (so memory stays flat when nobody scrapes).
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), ROWS_BUCKETS)?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    for (name, what) in [
        (COMMIT_TO_ONLINE, "source commit to features served online"),
        (
            COMMIT_TO_DURABLE,
            "source commit to the batch durable in Delta",
        ),
        (
            BATCH_SECONDS,
            "time a batch spends in a step (compute, commit)",
        ),
        (TABLE_COMMIT_SECONDS, "one Delta table's commit"),
        (
            TABLE_COMMIT_STEP_SECONDS,
            "one step of an append (write, log, snapshot, reload)",
        ),
        (
            LAKE_DURABLE_SECONDS,
            "fsync of a commit's files (local lake)",
        ),
        (
            MAINTENANCE_SECONDS,
            "one maintenance task (compact, checkpoint, reload, log_cleanup, vacuum)",
        ),
        (
            OBJECT_STORE_SECONDS,
            "one request to the lake's object store",
        ),
        (HTTP_SECONDS, "HTTP request handling, waits included"),
        (WAIT_SECONDS, "read-your-writes wait for min_lsn"),
    ] {
        describe_histogram!(name, Unit::Seconds, what);
    }
    describe_histogram!(BATCH_ROWS, Unit::Count, "change rows per batch");
    for (name, what) in [
        (ROWS, "change rows processed"),
        (BATCHES, "batches committed"),
        (WAITS, "requests that waited for min_lsn"),
        (WAIT_TIMEOUTS, "waits for min_lsn that timed out (504)"),
        (FENCES, "fences written for readers ahead of the watermark"),
        (SHED, "requests refused at serve.max_in_flight (503)"),
        (COMPACTED_FILES, "small files compacted into larger ones"),
    ] {
        describe_counter!(name, what);
    }
    for (name, unit, what) in [
        (
            SLOT_RETAINED_BYTES,
            Unit::Bytes,
            "WAL retained for the slot",
        ),
        (
            SLOT_LAG_BYTES,
            Unit::Bytes,
            "source WAL position minus the acknowledged LSN",
        ),
        (
            WATERMARK_LSN,
            Unit::Count,
            "LSN applied and computed (online)",
        ),
        (
            DURABLE_LSN,
            Unit::Count,
            "LSN durable in the lake and acknowledged",
        ),
        (
            ONLINE_ENTITIES,
            Unit::Count,
            "entities served online per feature file",
        ),
        (
            TABLE_LIVE_FILES,
            Unit::Count,
            "live files of a table after its latest append",
        ),
    ] {
        describe_gauge!(name, unit, what);
    }
}

/// Seconds from a source commit (Unix micros, the server's clock) to now.
pub(crate) fn since_commit(commit_ts_micros: i64) -> f64 {
    let now = chrono::Utc::now().timestamp_micros();
    (now - commit_ts_micros).max(0) as f64 / 1e6
}
