//! The decisions' audit trail: every decision appended to `<lake>/decisions/<name>`
//! (request, features served with their LSN, score, decision, reasons, model, timings)
//! by a task of its own, off the request path: a request only queues its record. Records
//! go out in one commit every [`FLUSH_EVERY`] (or [`MAX_ROWS`]), with background
//! maintenance like every other table.

use crate::changelog::Lsn;
use crate::config::MaintenanceConfig;
use crate::sink::{DeltaSink, Destination, Lake, LakeTable, Maintainer, SinkError, TableSpec};
use arrow::array::{
    ArrayRef, Float64Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const FLUSH_EVERY: Duration = Duration::from_millis(500);
const MAX_ROWS: usize = 10_000;
/// Records queued at most; beyond it a record is dropped (counted, logged) rather than
/// holding a request.
const QUEUE: usize = 20_000;
/// Records held while the lake refuses commits; beyond this, new ones are dropped
/// (counted) rather than growing memory without bound.
const MAX_PENDING: usize = 5 * MAX_ROWS;
/// Wait after a failed commit before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One decision as the audit trail keeps it.
#[derive(Debug, Clone)]
pub(crate) struct AuditRecord {
    pub decided_at_micros: i64,
    /// The request body as received.
    pub request: String,
    /// The inputs (features and application columns) as JSON.
    pub features: String,
    pub features_lsn: Lsn,
    pub watermark: Lsn,
    pub score: f64,
    pub decision: &'static str,
    pub reasons: Vec<String>,
    pub model: String,
    pub wait_ms: f64,
    pub features_ms: f64,
    pub score_ms: f64,
    pub rules_ms: f64,
    pub total_ms: f64,
}

/// Where requests queue their records.
#[derive(Clone)]
pub(crate) struct AuditLog {
    tx: mpsc::Sender<AuditRecord>,
}

impl AuditLog {
    pub(crate) fn record(&self, r: AuditRecord) {
        if let Err(e) = self.tx.try_send(r) {
            metrics::counter!("pipeline_decisions_audit_dropped_total").increment(1);
            tracing::error!(error = %e, "decision audit queue full: a record was dropped");
        }
    }
}

fn schema() -> SchemaRef {
    let ms = |n: &str| Field::new(n, DataType::Float64, false);
    Arc::new(Schema::new(vec![
        Field::new(
            "decided_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("request", DataType::Utf8, false),
        Field::new("features", DataType::Utf8, false),
        Field::new("features_lsn", DataType::Utf8, false),
        Field::new("watermark", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new(
            "reasons",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ),
        Field::new("model", DataType::Utf8, false),
        ms("wait_ms"),
        ms("features_ms"),
        ms("score_ms"),
        ms("rules_ms"),
        ms("total_ms"),
    ]))
}

/// Opens (creating) the audit table and starts its writer; it commits what is queued
/// when `stop` is cancelled, then ends.
pub(crate) async fn spawn(
    lake: Lake,
    name: &str,
    maintenance: &MaintenanceConfig,
    stop: CancellationToken,
) -> Result<(AuditLog, tokio::task::JoinHandle<()>), SinkError> {
    let table = LakeTable::decisions(name);
    let spec = TableSpec {
        table: table.clone(),
        schema: schema(),
        evolves: false,
    };
    let (maintainer, _task) = Maintainer::spawn(lake.clone(), maintenance.clone());
    let sink = DeltaSink::open_with(
        lake,
        format!("decisions-{name}"),
        [spec],
        &maintenance.table_properties(),
    )
    .await?
    .with_maintainer(maintainer);
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(write_loop(sink, table, rx, stop));
    Ok((AuditLog { tx }, task))
}

async fn write_loop(
    mut sink: DeltaSink,
    table: LakeTable,
    mut rx: mpsc::Receiver<AuditRecord>,
    stop: CancellationToken,
) {
    let mut pending: Vec<AuditRecord> = Vec::new();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    // A commit's version only has to grow: the time of the commit, in micros, and
    // never below what the table holds (the clock may have stepped back since).
    let mut version = sink.resume_point().committed(&table).as_u64() as i64;
    let mut retry_at = tokio::time::Instant::now();
    loop {
        let stopping = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => {
                    if pending.len() >= MAX_PENDING {
                        metrics::counter!("pipeline_decisions_audit_dropped_total").increment(1);
                        continue;
                    }
                    pending.push(r);
                    if pending.len() < MAX_ROWS || tokio::time::Instant::now() < retry_at {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => {
                if tokio::time::Instant::now() < retry_at {
                    continue;
                }
                false
            }
            _ = stop.cancelled() => true,
        };
        if stopping {
            while let Ok(r) = rx.try_recv() {
                pending.push(r);
            }
        }
        if !pending.is_empty() {
            version = version
                .max(chrono::Utc::now().timestamp_micros())
                .saturating_add(1);
            let rows = std::mem::take(&mut pending);
            let n = rows.len();
            let batch = to_batch(&rows);
            // A failed commit is retried with the next flush: the records stay queued.
            match sink
                .append(vec![(table.clone(), vec![batch])], Lsn::new(version as u64))
                .await
            {
                Ok(()) => tracing::debug!(rows = n, %table, "decisions audited"),
                Err(e) => {
                    tracing::warn!(error = %e, rows = n, %table, "could not write the decision audit; retrying");
                    pending = rows;
                    retry_at = tokio::time::Instant::now() + RETRY_AFTER;
                }
            }
        }
        if stopping {
            if !pending.is_empty() {
                tracing::error!(rows = pending.len(), %table, "stopping with decision audit records unwritten");
            }
            return;
        }
    }
}

fn to_batch(rows: &[AuditRecord]) -> RecordBatch {
    let text = |f: &dyn Fn(&AuditRecord) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let num = |f: &dyn Fn(&AuditRecord) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(f)))
    };
    let mut reasons = ListBuilder::new(StringBuilder::new());
    for r in rows {
        for reason in &r.reasons {
            reasons.values().append_value(reason);
        }
        reasons.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.decided_at_micros))
                .with_timezone("UTC"),
        ),
        text(&|r| r.request.clone()),
        text(&|r| r.features.clone()),
        text(&|r| r.features_lsn.to_string()),
        text(&|r| r.watermark.to_string()),
        num(&|r| r.score),
        text(&|r| r.decision.to_string()),
        Arc::new(reasons.finish()),
        text(&|r| r.model.clone()),
        num(&|r| r.wait_ms),
        num(&|r| r.features_ms),
        num(&|r| r.score_ms),
        num(&|r| r.rules_ms),
        num(&|r| r.total_ms),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns match the audit schema")
}
