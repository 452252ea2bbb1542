//! Micro-batcher: groups committed transactions from the change stream into one Arrow
//! `RecordBatch` per table. Batches are cut only at transaction boundaries: when the
//! stream goes idle (at once, so a lone change is not held back), when the oldest
//! change has waited `interval`, or when `max_rows` is reached.
//!
//! A transaction larger than `max_rows` is the exception: it is handed on in pieces of
//! `max_rows` rows as it arrives ([`BatchKind::Piece`]), so memory does not grow with
//! its size. The pieces are written ahead as unreferenced files and committed, and
//! acknowledged, only with the piece that carries the transaction's end.

mod acks;
mod machine;

pub(crate) use acks::Acks;
pub(crate) use machine::{Batcher, Finish};

use crate::changelog::{Changes, Lsn, TableId};
use crate::source::pgoutput::RelationColumn;
use crate::source::{ChangeStream, SchemaDiff, SourceError, SourceEvent, TableSchema};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What a [`ChangeBatch`] is, and so what the processor does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Whole committed transactions (the first may be the end of a large transaction
    /// whose pieces came before): commit them, then acknowledge `end_lsn`.
    Transactions,
    /// A piece of one transaction larger than `max_rows` whose rest follows in the next
    /// batch(es). Nothing of a piece may be committed or acknowledged before the
    /// [`BatchKind::Transactions`] batch that holds the transaction's end.
    Piece,
    /// Transactions that changed none of the configured tables (a read-your-writes
    /// fence, see `runner::fence`) ended at `end_lsn`, with nothing pending before
    /// them: everything up to it has been handed on. Holds no rows.
    Progress,
    /// The end of a `--once` run: every transaction committed before the run started
    /// has been handed on. Holds no rows.
    End,
}

/// Committed transactions grouped for one pass through features and sinks.
#[derive(Debug)]
pub struct ChangeBatch {
    pub kind: BatchKind,
    /// Raw change rows per configured table (None when the table had no change).
    pub tables: Vec<Option<Changes>>,
    /// End LSN of the last transaction: what may be acknowledged once durable.
    pub end_lsn: Lsn,
    /// Commit LSN of the last transaction.
    pub commit_lsn: Lsn,
    /// Commit time of the last transaction (unix micros).
    pub commit_ts_micros: i64,
    pub transactions: usize,
    pub rows: usize,
    /// When the first change of the batch was received (for latency metrics).
    pub first_received: Instant,
    /// Per table, the `(row, column)` cells of updates whose TOASTed value pgoutput did
    /// not send because it did not change: NULL in `tables` until filled from state.
    pub unchanged_toast: Vec<Vec<(usize, usize)>>,
}

/// Settings for one batcher run.
pub(crate) struct BatcherOptions {
    pub interval: Duration,
    pub max_rows: usize,
    /// Transactions ending at or before this LSN are already in the lake: skip them.
    pub skip_through: Lsn,
    /// For `--once`: stop after the fence message with this token.
    pub fence_token: Option<String>,
}

/// A configured table's columns changed in the stream (ALTER TABLE). The batcher stops
/// before the transaction that first shows the change: everything before it is handed
/// on, and Postgres sends that transaction again to a run on the new schema.
#[derive(Debug, Clone)]
pub(crate) struct SchemaChange {
    pub table: TableId,
    pub columns: Vec<RelationColumn>,
    /// Commit LSN of the transaction carrying the new Relation message.
    pub commit_lsn: Lsn,
    /// Relative to the schema the batcher ran on.
    pub diff: SchemaDiff,
}

/// Reads `stream` until cancelled (or the fence, or a schema change, which it returns),
/// handing batches to `out` and confirming to the slot what [`Acks`] allows: the
/// processor's durable LSNs from `durable`, and keepalive positions while idle.
pub(crate) async fn run(
    mut stream: ChangeStream,
    schemas: Vec<TableSchema>,
    opts: BatcherOptions,
    out: mpsc::Sender<ChangeBatch>,
    mut durable: watch::Receiver<Lsn>,
    cancel: CancellationToken,
) -> Result<Option<SchemaChange>, SourceError> {
    let (mut acks, now) = Acks::resuming_at(opts.skip_through);
    now.into_iter().for_each(|lsn| stream.ack(lsn));
    let mut batcher = Batcher::new(schemas, opts);

    let finish = loop {
        if let Some(finish) = batcher.finished() {
            break Some(finish);
        }
        let now = Instant::now();
        let deadline = batcher.deadline(now);
        // Biased: read what is available before cutting, so a batch is cut when reading
        // would wait (the stream is idle) or when it is due.
        tokio::select! {
            biased;
            _ = cancel.cancelled(), if !batcher.is_stopped() => batcher.on_cancel(),
            changed = durable.changed() => match changed {
                Ok(()) => {
                    let lsn = *durable.borrow_and_update();
                    acks.durable(lsn).into_iter().for_each(|l| stream.ack(l));
                }
                // The processor is gone (it failed, or the run ended): nothing more can
                // become durable, and what is pending is replayed from the slot.
                Err(_) => break None,
            },
            ev = stream.next(), if batcher.wants_events(now) => match ev? {
                None => batcher.on_stream_end(),
                Some(SourceEvent::Heartbeat { wal_end }) => {
                    let idle = batcher.is_idle();
                    acks.keepalive(wal_end, idle).into_iter().for_each(|l| stream.ack(l));
                    batcher.on_keepalive(wal_end);
                }
                Some(ev) => batcher.on_event(ev, Instant::now()),
            },
            permit = out.reserve(), if batcher.has_batch() => {
                let Ok(permit) = permit else { break None };
                let batch = batcher.next_batch(Instant::now());
                acks.handed_on(batch.end_lsn);
                permit.send(batch);
            }
            _ = sleep_until(deadline), if deadline.is_some() => {}
        }
    };
    // Forward the final acknowledgements until the processor is finished.
    drop(out);
    while durable.changed().await.is_ok() {
        let lsn = *durable.borrow_and_update();
        acks.durable(lsn).into_iter().for_each(|l| stream.ack(l));
    }
    let lsn = *durable.borrow();
    acks.durable(lsn).into_iter().for_each(|l| stream.ack(l));
    // Let the worker send the last standby status before closing.
    stream.wait_acked(Duration::from_secs(2)).await;
    stream.shutdown().await;
    match finish {
        Some(Finish::StreamEnded) => Err(SourceError::StreamEnded),
        Some(Finish::SchemaChanged(change)) => Ok(Some(change)),
        Some(Finish::Done) | None => Ok(None),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
