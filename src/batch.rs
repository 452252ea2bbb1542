//! Micro-batcher: groups committed transactions from the change stream into one Arrow
//! `RecordBatch` per table. Batches are cut only at transaction boundaries: when the
//! stream goes idle (at once, so a lone change is not held back), when the oldest
//! change has waited `interval`, or when `max_rows` is reached.
//!
//! A transaction larger than `max_rows` is the exception: it is handed on in pieces of
//! `max_rows` rows as it arrives ([`BatchKind::Piece`]), so memory does not grow with
//! its size. The pieces are written ahead as unreferenced files and committed, and
//! acknowledged, only with the piece that carries the transaction's end.

use crate::changelog::{raw_schema, Lsn, Op, TableId};
use crate::source::pgoutput::{Datum, RelationColumn};
use crate::source::text::ColumnBuilder;
use crate::source::{ChangeStream, SchemaDiff, SourceError, SourceEvent, TableSchema};
use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringBuilder, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;
use std::sync::Arc;
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
    /// The end of a `--once` run: every transaction committed before the run started
    /// has been handed on. Holds no rows.
    End,
}

/// Committed transactions grouped for one pass through features and sinks.
#[derive(Debug)]
pub struct ChangeBatch {
    pub kind: BatchKind,
    /// Raw change rows per configured table (None when the table had no change).
    pub tables: Vec<Option<RecordBatch>>,
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

struct TableBuilder {
    schema: SchemaRef,
    columns: Vec<ColumnBuilder>,
    op: StringBuilder,
    lsn: Vec<i64>,
    seq: Vec<i64>,
    ts: Vec<i64>,
    unchanged_toast: Vec<(usize, usize)>,
    bad_values: usize,
}

impl TableBuilder {
    fn new(table: &TableSchema) -> Self {
        TableBuilder {
            schema: raw_schema(&table.schema),
            columns: table
                .columns
                .iter()
                .map(|c| ColumnBuilder::new(&c.data_type, 16))
                .collect(),
            op: StringBuilder::new(),
            lsn: Vec::new(),
            seq: Vec::new(),
            ts: Vec::new(),
            unchanged_toast: Vec::new(),
            bad_values: 0,
        }
    }

    fn len(&self) -> usize {
        self.lsn.len()
    }

    fn append(&mut self, table: &TableSchema, change: &StagedChange, lsn: Lsn, ts: i64) {
        for (i, (b, v)) in self.columns.iter_mut().zip(&change.row).enumerate() {
            match v {
                Datum::Text(t) => {
                    if let Err(e) = b.append_text(t) {
                        self.bad_values += 1;
                        if self.bad_values <= 10 {
                            tracing::warn!(table = %table.name, column = %table.columns[i].name,
                                error = %e, "value stored as NULL");
                        }
                    }
                }
                Datum::Null => b.append_null(),
                // Not sent by pgoutput: a placeholder the feature engine fills from state.
                Datum::UnchangedToast => {
                    self.unchanged_toast.push((self.lsn.len(), i));
                    b.append_null()
                }
            }
        }
        self.op.append_value(change.op.as_str());
        self.lsn.push(lsn.as_i64());
        self.seq.push(change.seq);
        self.ts.push(ts);
    }

    fn take_unchanged_toast(&mut self) -> Vec<(usize, usize)> {
        std::mem::take(&mut self.unchanged_toast)
    }

    fn finish(&mut self) -> Option<RecordBatch> {
        if self.len() == 0 {
            return None;
        }
        let mut cols: Vec<ArrayRef> = self.columns.iter_mut().map(ColumnBuilder::finish).collect();
        cols.push(Arc::new(self.op.finish()));
        cols.push(Arc::new(Int64Array::from(std::mem::take(&mut self.lsn))));
        cols.push(Arc::new(Int64Array::from(std::mem::take(&mut self.seq))));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from(std::mem::take(&mut self.ts)).with_timezone("UTC"),
        ));
        Some(RecordBatch::try_new(self.schema.clone(), cols).expect("builders match schema"))
    }
}

struct StagedChange {
    table: TableId,
    op: Op,
    seq: i64,
    row: Vec<Datum>,
}

struct OpenTxn {
    commit_lsn: Lsn,
    ts: i64,
    /// Already in the lake (it commits before the resume point): not staged.
    skip: bool,
    /// Changes not yet handed on (at most `max_rows`).
    changes: Vec<StagedChange>,
    /// Changes of the transaction so far, handed on or not (the next `_seq`).
    seen: i64,
    /// Pieces already handed on (see [`BatchKind::Piece`]).
    pieces: usize,
}

impl OpenTxn {
    /// The staged changes fill a piece: hand them on before reading more.
    fn piece_full(&self, max_rows: usize) -> bool {
        self.changes.len() >= max_rows
    }
}

/// Settings for one batcher run.
pub struct BatcherOptions {
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
pub struct SchemaChange {
    pub table: TableId,
    pub columns: Vec<RelationColumn>,
    /// Commit LSN of the transaction carrying the new Relation message.
    pub commit_lsn: Lsn,
    /// Relative to the schema the batcher ran on.
    pub diff: SchemaDiff,
}

/// Reads `stream` until cancelled (or the fence, or a schema change, which it returns),
/// sending batches to `out` and forwarding durable LSNs from `acks` to Postgres.
pub async fn run(
    mut stream: ChangeStream,
    schemas: Vec<TableSchema>,
    opts: BatcherOptions,
    out: mpsc::Sender<ChangeBatch>,
    mut acks: watch::Receiver<Lsn>,
    cancel: CancellationToken,
) -> Result<Option<SchemaChange>, SourceError> {
    let mut schema_change = None;
    let mut builders: Vec<TableBuilder> = schemas.iter().map(TableBuilder::new).collect();
    let mut open: Option<OpenTxn> = None;
    let mut pending = Pending::default();
    let mut done = false;
    let mut stream_ended = false;
    // End LSN of the last batch handed to the processor.
    let mut last_cut_end = Lsn::ZERO;
    // Whatever is committed in every table may be confirmed at once (a crash between
    // the lake commit and the acknowledgement leaves the slot behind the lake).
    if !opts.skip_through.is_zero() {
        stream.ack(opts.skip_through);
    }

    loop {
        let ready = pending.txns > 0
            && (done
                || pending.rows >= opts.max_rows
                || pending
                    .first_received
                    .is_some_and(|t| t.elapsed() >= opts.interval));
        // Keep reading while events are available and the batch is not full; a batch is
        // cut when reading would wait (idle) or when it is ready.
        // A transaction too large for one batch is handed on in pieces, committed batches
        // first; reading waits until the piece is sent (backpressure on the stream).
        let piece_full = !done && open.as_ref().is_some_and(|t| t.piece_full(opts.max_rows));
        let can_read = !(done || stream_ended || piece_full || (ready && open.is_none()));
        let deadline = pending
            .first_received
            .map(|t| tokio::time::Instant::from_std(t + opts.interval));

        tokio::select! {
            biased;
            _ = cancel.cancelled(), if !done => {
                // Finish at a transaction boundary; an open transaction is replayed
                // from the slot on the next run.
                done = true;
            }
            changed = acks.changed() => {
                match changed {
                    Ok(()) => stream.ack(*acks.borrow_and_update()),
                    // The processor is gone (it failed, or the run ended): nothing more can
                    // become durable, and what is pending is replayed from the slot.
                    Err(_) => break,
                }
            }
            ev = stream.next(), if can_read => {
                match ev? {
                    None => stream_ended = true,
                    Some(SourceEvent::Heartbeat { wal_end }) => {
                        // Idle (no transaction open or pending, every batch acknowledged):
                        // nothing of ours lies before `wal_end` unacknowledged, so the slot
                        // may move there. Keeps an idle slot from retaining the WAL that
                        // other tables and databases write.
                        if open.is_none() && pending.txns == 0 && *acks.borrow() >= last_cut_end {
                            stream.ack(wal_end);
                        }
                    }
                    Some(SourceEvent::SchemaChanged { table, columns }) => {
                        // The open transaction is dropped unprocessed: it is replayed
                        // from the slot, decoded with the new schema.
                        let commit_lsn = open.take().map(|t| t.commit_lsn).unwrap_or_default();
                        let diff = schemas[table.index()].diff(&columns);
                        tracing::info!(table = %schemas[table.index()].name, change = %diff,
                            at_lsn = %commit_lsn,
                            "source table schema changed: finishing the batches before it");
                        schema_change = Some(SchemaChange { table, columns, commit_lsn, diff });
                        done = true;
                    }
                    Some(ev) => {
                        if handle_event(ev, &schemas, &opts, &mut builders, &mut open, &mut pending) {
                            done = true;
                        }
                    }
                }
            }
            permit = out.reserve(), if (pending.txns > 0 && (open.is_none() || done)) || piece_full => {
                let Ok(permit) = permit else { break };
                if pending.txns > 0 {
                    let batch = pending.cut(&mut builders, BatchKind::Transactions);
                    last_cut_end = batch.end_lsn;
                    permit.send(batch);
                } else {
                    let t = open.as_mut().expect("a full piece is open");
                    permit.send(piece(t, &schemas, &mut builders, &mut pending));
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() && !ready => {}
            else => {}
        }
        if done && pending.txns == 0 && (open.is_none() || cancel.is_cancelled()) {
            if opts.fence_token.is_some() && !cancel.is_cancelled() && schema_change.is_none() {
                // Tell the processor this is the end, even with nothing pending.
                let _ = out.send(pending.cut(&mut builders, BatchKind::End)).await;
            }
            break;
        }
        if stream_ended && pending.txns == 0 {
            return Err(SourceError::StreamEnded);
        }
    }
    // Forward the final acknowledgements until the processor is finished.
    drop(out);
    while acks.changed().await.is_ok() {
        stream.ack(*acks.borrow_and_update());
    }
    stream.ack(*acks.borrow());
    // Let the worker send the last standby status before closing.
    stream.wait_acked(Duration::from_secs(2)).await;
    stream.shutdown().await;
    Ok(schema_change)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[derive(Default)]
struct Pending {
    txns: usize,
    rows: usize,
    end_lsn: Lsn,
    commit_lsn: Lsn,
    ts: i64,
    first_received: Option<Instant>,
}

impl Pending {
    fn cut(&mut self, builders: &mut [TableBuilder], kind: BatchKind) -> ChangeBatch {
        let batch = ChangeBatch {
            kind,
            unchanged_toast: builders
                .iter_mut()
                .map(TableBuilder::take_unchanged_toast)
                .collect(),
            tables: builders.iter_mut().map(TableBuilder::finish).collect(),
            end_lsn: self.end_lsn,
            commit_lsn: self.commit_lsn,
            commit_ts_micros: self.ts,
            transactions: self.txns,
            rows: self.rows,
            first_received: self.first_received.unwrap_or_else(Instant::now),
        };
        self.txns = 0;
        self.rows = 0;
        self.first_received = None;
        batch
    }
}

/// Hands on the staged changes of the open transaction as a piece (see
/// [`BatchKind::Piece`]). Only called with no committed transaction pending, so the
/// builders hold nothing else.
fn piece(
    t: &mut OpenTxn,
    schemas: &[TableSchema],
    builders: &mut [TableBuilder],
    pending: &mut Pending,
) -> ChangeBatch {
    debug_assert_eq!(pending.txns, 0);
    if t.pieces == 0 {
        tracing::info!(commit_lsn = %t.commit_lsn,
            piece_rows = t.changes.len(),
            "large transaction: handing it on in pieces, committed with its last one");
    }
    t.pieces += 1;
    let rows = t.changes.len();
    for c in t.changes.drain(..) {
        builders[c.table.index()].append(&schemas[c.table.index()], &c, t.commit_lsn, t.ts);
    }
    pending.first_received.get_or_insert_with(Instant::now);
    pending.commit_lsn = t.commit_lsn;
    pending.ts = t.ts;
    let mut batch = pending.cut(builders, BatchKind::Piece);
    batch.rows = rows;
    batch
}

/// Applies one event; returns true when the `--once` fence was reached.
fn handle_event(
    ev: SourceEvent,
    schemas: &[TableSchema],
    opts: &BatcherOptions,
    builders: &mut [TableBuilder],
    open: &mut Option<OpenTxn>,
    pending: &mut Pending,
) -> bool {
    match ev {
        SourceEvent::Begin {
            commit_lsn,
            commit_ts_micros,
        } => {
            *open = Some(OpenTxn {
                commit_lsn,
                ts: commit_ts_micros,
                // Its commit record starts at `commit_lsn` and ends after it, so it ends
                // at or before the resume point exactly when it starts before it.
                skip: commit_lsn < opts.skip_through,
                changes: Vec::new(),
                seen: 0,
                pieces: 0,
            });
        }
        SourceEvent::Change { table, op, row } => {
            if let Some(t) = open.as_mut().filter(|t| !t.skip) {
                t.changes.push(StagedChange {
                    table,
                    op,
                    seq: t.seen,
                    row,
                });
                t.seen += 1;
            }
        }
        SourceEvent::Commit {
            end_lsn,
            commit_ts_micros,
            ..
        } => {
            let Some(t) = open.take() else { return false };
            if t.skip || end_lsn <= opts.skip_through {
                tracing::debug!(%end_lsn, "skipping transaction already in the lake");
                return false;
            }
            if t.seen == 0 {
                // Transactions touching none of our tables still move the ack point.
                pending.end_lsn = end_lsn;
                return false;
            }
            pending.first_received.get_or_insert_with(Instant::now);
            for c in &t.changes {
                builders[c.table.index()].append(
                    &schemas[c.table.index()],
                    c,
                    t.commit_lsn,
                    commit_ts_micros,
                );
            }
            if t.pieces > 0 {
                tracing::info!(rows = t.seen, pieces = t.pieces + 1,
                    commit_lsn = %t.commit_lsn,
                    "large transaction complete: committing its pieces");
            }
            pending.txns += 1;
            pending.rows += t.changes.len();
            pending.end_lsn = end_lsn;
            pending.commit_lsn = t.commit_lsn;
            pending.ts = t.ts;
        }
        SourceEvent::Fence { token } => {
            if opts.fence_token.as_deref() == Some(token.as_str()) {
                return true;
            }
        }
        // Handled by the loop, which knows what is acknowledged and pending.
        SourceEvent::Heartbeat { .. } | SourceEvent::SchemaChanged { .. } => {}
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{LSN, OP, SEQ};
    use crate::config::TableName;
    use crate::source::ColumnInfo;
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Field, Int32Type, Schema};
    use std::sync::Arc;

    fn schema() -> TableSchema {
        let columns = vec![
            ColumnInfo {
                name: "id".into(),
                type_oid: 23,
                declared: (23, -1),
                type_name: "integer".into(),
                data_type: DataType::Int32,
            },
            ColumnInfo {
                name: "status".into(),
                type_oid: 1043,
                declared: (1043, -1),
                type_name: "character varying".into(),
                data_type: DataType::Utf8,
            },
        ];
        TableSchema {
            name: TableName::parse("loan"),
            oid: 1,
            schema: Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int32, false),
                Field::new("status", DataType::Utf8, true),
            ])),
            columns,
            key: vec![0],
        }
    }

    fn change(id: &str, op: Op) -> SourceEvent {
        SourceEvent::Change {
            table: TableId::new(0),
            op,
            row: vec![
                Datum::Text(id.to_string().into()),
                Datum::Text("paid".into()),
            ],
        }
    }

    /// The batcher's state between events, fed by hand.
    struct Harness {
        schemas: Vec<TableSchema>,
        opts: BatcherOptions,
        builders: Vec<TableBuilder>,
        open: Option<OpenTxn>,
        pending: Pending,
    }

    impl Harness {
        fn new(max_rows: usize, skip_through: u64, fence: Option<&str>) -> Harness {
            let skip_through = Lsn::new(skip_through);
            let schemas = vec![schema()];
            let builders = schemas.iter().map(TableBuilder::new).collect();
            Harness {
                schemas,
                opts: BatcherOptions {
                    interval: Duration::from_millis(200),
                    max_rows,
                    skip_through,
                    fence_token: fence.map(String::from),
                },
                builders,
                open: None,
                pending: Pending::default(),
            }
        }

        fn feed(&mut self, ev: SourceEvent) -> bool {
            handle_event(
                ev,
                &self.schemas,
                &self.opts,
                &mut self.builders,
                &mut self.open,
                &mut self.pending,
            )
        }

        fn begin(&mut self, commit_lsn: u64, ts: i64) {
            self.feed(SourceEvent::Begin {
                commit_lsn: Lsn::new(commit_lsn),
                commit_ts_micros: ts,
            });
        }

        fn commit(&mut self, commit_lsn: u64, end_lsn: u64, ts: i64) {
            self.feed(SourceEvent::Commit {
                commit_lsn: Lsn::new(commit_lsn),
                end_lsn: Lsn::new(end_lsn),
                commit_ts_micros: ts,
            });
        }

        fn cut(&mut self) -> ChangeBatch {
            self.pending
                .cut(&mut self.builders, BatchKind::Transactions)
        }

        /// The open transaction's staged changes as a piece, when they fill one.
        fn piece_if_full(&mut self) -> Option<ChangeBatch> {
            let t = self.open.as_mut()?;
            t.piece_full(self.opts.max_rows)
                .then(|| piece(t, &self.schemas, &mut self.builders, &mut self.pending))
        }
    }

    fn column_i64(b: &ChangeBatch, name: &str) -> Vec<i64> {
        let t = b.tables[0].as_ref().unwrap();
        let c = t.column_by_name(name).unwrap();
        c.as_primitive::<arrow::datatypes::Int64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn batches_hold_whole_transactions_in_order_and_skip_committed_ones() {
        let mut h = Harness::new(10, 100, Some("f"));
        // Already in the lake (end 90 <= 100): skipped.
        h.begin(80, 1);
        h.feed(change("1", Op::Insert));
        h.commit(80, 90, 1);
        // Two new transactions.
        h.begin(110, 2);
        h.feed(change("2", Op::Insert));
        h.feed(change("2", Op::Update));
        h.commit(110, 120, 2);
        h.begin(130, 3);
        h.feed(change("3", Op::Delete));
        assert!(!h.feed(SourceEvent::Fence {
            token: "other".into()
        }));
        // Open transaction: not in the batch yet.
        assert_eq!(h.pending.txns, 1);
        h.commit(130, 140, 3);
        assert!(h.feed(SourceEvent::Fence { token: "f".into() }));

        let b = h.cut();
        assert_eq!(
            (b.transactions, b.rows, b.end_lsn, b.commit_lsn),
            (2, 3, Lsn::new(140), Lsn::new(130))
        );
        let t = b.tables[0].as_ref().unwrap();
        let ids: Vec<i32> = t.column(0).as_primitive::<Int32Type>().values().to_vec();
        assert_eq!(ids, vec![2, 2, 3]);
        let ops: Vec<&str> = t
            .column_by_name(OP)
            .unwrap()
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        assert_eq!(ops, vec!["insert", "update", "delete"]);
        assert_eq!(column_i64(&b, LSN), vec![110, 110, 130]);
        assert_eq!(column_i64(&b, SEQ), vec![0, 1, 0]);
        // The next cut starts empty.
        assert!(h.cut().tables[0].is_none());
    }

    #[test]
    fn a_transaction_larger_than_max_rows_is_handed_on_in_pieces_then_committed_whole() {
        let mut h = Harness::new(2, 100, None);
        // Starts before the resume point: in the lake already, so nothing is staged.
        h.begin(90, 1);
        for _ in 0..5 {
            h.feed(change("1", Op::Insert));
        }
        assert!(h.open.as_ref().unwrap().changes.is_empty());
        h.commit(90, 95, 1);
        assert_eq!(h.pending.txns, 0);

        h.begin(200, 7);
        let mut pieces = Vec::new();
        for id in ["1", "2", "3", "4", "5"] {
            h.feed(change(id, Op::Update));
            pieces.extend(h.piece_if_full());
        }
        h.commit(200, 210, 7);
        let last = h.cut();
        assert_eq!(pieces.len(), 2);
        for p in &pieces {
            assert_eq!(p.kind, BatchKind::Piece);
            assert_eq!(
                (p.transactions, p.rows, p.commit_lsn),
                (0, 2, Lsn::new(200))
            );
        }
        assert_eq!(last.kind, BatchKind::Transactions);
        assert_eq!(
            (last.transactions, last.rows, last.end_lsn),
            (1, 1, Lsn::new(210))
        );
        // Rows keep their order within the transaction across pieces.
        let seqs: Vec<i64> = pieces
            .iter()
            .chain([&last])
            .flat_map(|b| column_i64(b, SEQ))
            .collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    }
}
