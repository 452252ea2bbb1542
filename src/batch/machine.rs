//! The batcher's state machine: source events in, [`ChangeBatch`]es out. No I/O and no
//! clock of its own (times are passed in), so every transition is unit-tested; the
//! `select!` loop in [`super::run`] only asks it what it can do next.

use super::{BatchKind, BatcherOptions, ChangeBatch, SchemaChange};
use crate::changelog::{Lsn, Op, TableId};
use crate::source::encode::ChangeEncoder;
use crate::source::pgoutput::Datum;
use crate::source::{SourceEvent, TableSchema};
use std::time::Instant;

/// Why the batcher stopped reading the stream.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The run was cancelled: hand on what is complete; an open transaction is replayed
    /// from the slot on the next run.
    Cancelled,
    /// The `--once` fence arrived: everything committed before the run started is in.
    Fence,
    /// A configured table's columns changed; the transaction showing it is replayed on
    /// the new schema.
    SchemaChanged(SchemaChange),
    /// The replication stream closed without being asked to.
    StreamEnded,
}

/// How the batcher's run ends, once everything before the stop is handed on.
#[derive(Debug)]
pub(crate) enum Finish {
    /// Cancelled, or the fence with the `End` batch sent.
    Done,
    SchemaChanged(SchemaChange),
    StreamEnded,
}

struct StagedChange {
    table: TableId,
    op: Op,
    seq: i64,
    row: Vec<Datum>,
}

/// The transaction being read (between Begin and Commit).
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
    /// It carries a read-your-writes fence (a logical message of the pipeline's).
    fence: bool,
}

/// Committed transactions encoded but not yet handed on.
#[derive(Default)]
struct Pending {
    txns: usize,
    rows: usize,
    end_lsn: Lsn,
    commit_lsn: Lsn,
    ts: i64,
    first_received: Option<Instant>,
    /// Transactions without rows for us ended after everything handed on (`end_lsn`):
    /// a [`BatchKind::Progress`] batch tells the processor.
    progress: bool,
}

pub(crate) struct Batcher {
    schemas: Vec<TableSchema>,
    opts: BatcherOptions,
    encoders: Vec<ChangeEncoder>,
    open: Option<OpenTxn>,
    pending: Pending,
    stop: Option<Stop>,
    /// The `End` batch of a `--once` run was handed on.
    end_sent: bool,
}

impl Batcher {
    pub(crate) fn new(schemas: Vec<TableSchema>, opts: BatcherOptions) -> Batcher {
        let encoders = schemas.iter().map(ChangeEncoder::new).collect();
        Batcher {
            schemas,
            opts,
            encoders,
            open: None,
            pending: Pending::default(),
            stop: None,
            end_sent: false,
        }
    }

    /// Whether the next event should be read now. Not after a stop, not while the open
    /// transaction's staged changes fill a piece (it must be handed on first:
    /// backpressure on the stream), and not while a ready batch waits to be handed on
    /// between transactions.
    pub(crate) fn wants_events(&self, now: Instant) -> bool {
        self.stop.is_none() && !self.piece_full() && !(self.open.is_none() && self.ready(now))
    }

    /// Whether a batch can be handed on now. Committed transactions go at every
    /// transaction boundary, so a lone change is not held back (the loop reads what is
    /// already available first); a full piece goes when nothing committed is pending.
    pub(crate) fn has_batch(&self) -> bool {
        let boundary = self.open.is_none() || self.stop.is_some();
        ((self.pending.txns > 0 || self.pending.progress) && boundary)
            || self.piece_full()
            || self.end_due()
    }

    /// When the pending transactions become due (the oldest has waited `interval`);
    /// None when nothing is pending or they are due already.
    pub(crate) fn deadline(&self, now: Instant) -> Option<Instant> {
        let first = self
            .pending
            .first_received
            .filter(|_| self.pending.txns > 0)?;
        (!self.ready(now)).then_some(first + self.opts.interval)
    }

    /// Nothing open, nothing pending: a keepalive may move the slot (see
    /// [`super::acks::Acks::keepalive`]).
    pub(crate) fn is_idle(&self) -> bool {
        self.open.is_none() && self.pending.txns == 0
    }

    /// It stopped reading (see [`Stop`]); what is pending is still handed on.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.is_some()
    }

    /// How the run ends, once the stop's batches are all handed on.
    pub(crate) fn finished(&self) -> Option<Finish> {
        let stop = self.stop.as_ref()?;
        if self.pending.txns > 0 || self.end_due() {
            return None;
        }
        Some(match stop {
            Stop::Cancelled | Stop::Fence => Finish::Done,
            Stop::SchemaChanged(change) => Finish::SchemaChanged(change.clone()),
            Stop::StreamEnded => Finish::StreamEnded,
        })
    }

    pub(crate) fn on_cancel(&mut self) {
        self.stop_with(Stop::Cancelled);
    }

    pub(crate) fn on_stream_end(&mut self) {
        self.stop_with(Stop::StreamEnded);
    }

    /// A server keepalive: the walsender has decoded the WAL up to `wal_end`, so every
    /// transaction committed before it has been received. Between transactions the
    /// watermark moves there as after a fence: a reader waiting for an LSN in WAL the
    /// slot does not publish (other tables, vacuum) is answered by the keepalive that
    /// follows that WAL, often before the fence it asked for (an fsync'd commit) comes.
    /// Acknowledging it stays the caller's (see [`super::acks::Acks`]).
    pub(crate) fn on_keepalive(&mut self, wal_end: Lsn) {
        if self.open.is_some()
            || self.stop.is_some()
            || wal_end <= self.pending.end_lsn
            || wal_end <= self.opts.skip_through
        {
            return;
        }
        self.pending.end_lsn = wal_end;
        self.pending.progress |= self.pending.txns == 0;
    }

    /// Applies one event from the stream. Keepalives go to [`Batcher::on_keepalive`]
    /// and to the acknowledgements ([`super::acks::Acks`]).
    pub(crate) fn on_event(&mut self, ev: SourceEvent, now: Instant) {
        match ev {
            SourceEvent::Begin {
                commit_lsn,
                commit_ts_micros,
            } => {
                self.open = Some(OpenTxn {
                    commit_lsn,
                    ts: commit_ts_micros,
                    // Its commit record starts at `commit_lsn` and ends after it, so it
                    // ends at or before the resume point exactly when it starts before.
                    skip: commit_lsn < self.opts.skip_through,
                    changes: Vec::new(),
                    seen: 0,
                    pieces: 0,
                    fence: false,
                });
            }
            SourceEvent::Change { table, op, row } => {
                if let Some(t) = self.open.as_mut().filter(|t| !t.skip) {
                    let seq = t.seen;
                    t.changes.push(StagedChange {
                        table,
                        op,
                        seq,
                        row,
                    });
                    t.seen += 1;
                }
            }
            SourceEvent::Commit {
                end_lsn,
                commit_ts_micros,
                ..
            } => self.on_commit(end_lsn, commit_ts_micros, now),
            SourceEvent::Fence { token } => {
                if self.opts.fence_token.as_deref() == Some(token.as_str()) {
                    self.stop_with(Stop::Fence);
                } else if let Some(t) = self.open.as_mut() {
                    t.fence = true;
                }
            }
            SourceEvent::SchemaChanged { table, columns } => {
                // The open transaction is dropped unprocessed: it is replayed from the
                // slot, decoded with the new schema.
                let commit_lsn = self.open.take().map(|t| t.commit_lsn).unwrap_or_default();
                let schema = &self.schemas[table.index()];
                let diff = schema.diff(&columns);
                tracing::info!(table = %schema.name, change = %diff, at_lsn = %commit_lsn,
                    "source table schema changed: finishing the batches before it");
                self.stop_with(Stop::SchemaChanged(SchemaChange {
                    table,
                    columns,
                    commit_lsn,
                    diff,
                }));
            }
            SourceEvent::Heartbeat { .. } => {}
        }
    }

    /// The next batch to hand on; call only when [`Batcher::has_batch`]. Committed
    /// transactions go before a piece of the open one, and the `End` batch last.
    pub(crate) fn next_batch(&mut self, now: Instant) -> ChangeBatch {
        if self.pending.txns > 0 {
            self.cut(BatchKind::Transactions, now)
        } else if self.piece_full() {
            self.piece(now)
        } else if self.pending.progress {
            self.cut(BatchKind::Progress, now)
        } else {
            debug_assert!(self.end_due());
            self.end_sent = true;
            self.cut(BatchKind::End, now)
        }
    }

    fn stop_with(&mut self, stop: Stop) {
        if self.stop.is_none() {
            // Whatever is open is incomplete and is replayed from the slot.
            self.open = None;
            self.stop = Some(stop);
        }
    }

    fn ready(&self, now: Instant) -> bool {
        // A fence's progress goes at once: a reader waits on it, and reading the next
        // transaction first could hold it behind that transaction's pieces.
        (self.pending.progress && self.pending.txns == 0)
            || (self.pending.txns > 0
                && (self.stop.is_some()
                    || self.pending.rows >= self.opts.max_rows
                    || self
                        .pending
                        .first_received
                        .is_some_and(|t| now.saturating_duration_since(t) >= self.opts.interval)))
    }

    /// The open transaction's staged changes fill a piece: hand them on first.
    fn piece_full(&self) -> bool {
        self.stop.is_none()
            && self
                .open
                .as_ref()
                .is_some_and(|t| t.changes.len() >= self.opts.max_rows)
    }

    /// A `--once` run reached its fence: the processor is told with an `End` batch.
    fn end_due(&self) -> bool {
        matches!(self.stop, Some(Stop::Fence)) && self.pending.txns == 0 && !self.end_sent
    }

    fn on_commit(&mut self, end_lsn: Lsn, commit_ts_micros: i64, now: Instant) {
        let Some(t) = self.open.take() else { return };
        if t.skip || end_lsn <= self.opts.skip_through {
            tracing::debug!(%end_lsn, "skipping transaction already in the lake");
            return;
        }
        if t.seen == 0 {
            // Transactions touching none of our tables still move the ack point; a
            // read-your-writes fence also moves the watermark its readers wait on, at
            // once when nothing is pending (else with the pending batch).
            self.pending.end_lsn = end_lsn;
            self.pending.progress |= t.fence && self.pending.txns == 0;
            return;
        }
        self.pending.first_received.get_or_insert(now);
        for c in &t.changes {
            self.encoders[c.table.index()].append(
                c.op,
                c.seq,
                &c.row,
                t.commit_lsn,
                commit_ts_micros,
            );
        }
        if t.pieces > 0 {
            tracing::info!(rows = t.seen, pieces = t.pieces + 1, commit_lsn = %t.commit_lsn,
                "large transaction complete: committing its pieces");
        }
        self.pending.txns += 1;
        self.pending.rows += t.changes.len();
        self.pending.end_lsn = end_lsn;
        self.pending.commit_lsn = t.commit_lsn;
        self.pending.ts = t.ts;
    }

    /// Hands on the staged changes of the open transaction as a piece (see
    /// [`BatchKind::Piece`]). Only with no committed transaction pending, so the
    /// encoders hold nothing else.
    fn piece(&mut self, now: Instant) -> ChangeBatch {
        debug_assert_eq!(self.pending.txns, 0);
        let t = self.open.as_mut().expect("a full piece is open");
        if t.pieces == 0 {
            tracing::info!(commit_lsn = %t.commit_lsn, piece_rows = t.changes.len(),
                "large transaction: handing it on in pieces, committed with its last one");
        }
        t.pieces += 1;
        let rows = t.changes.len();
        for c in t.changes.drain(..) {
            self.encoders[c.table.index()].append(c.op, c.seq, &c.row, t.commit_lsn, t.ts);
        }
        self.pending.first_received.get_or_insert(now);
        self.pending.commit_lsn = t.commit_lsn;
        self.pending.ts = t.ts;
        let mut batch = self.cut(BatchKind::Piece, now);
        batch.rows = rows;
        batch
    }

    fn cut(&mut self, kind: BatchKind, now: Instant) -> ChangeBatch {
        let mut tables = Vec::with_capacity(self.encoders.len());
        let mut unchanged_toast = Vec::with_capacity(self.encoders.len());
        for encoder in &mut self.encoders {
            match encoder.finish() {
                Some(e) => {
                    tables.push(Some(e.changes));
                    unchanged_toast.push(e.unchanged_toast);
                }
                None => {
                    tables.push(None);
                    unchanged_toast.push(Vec::new());
                }
            }
        }
        let p = &mut self.pending;
        let batch = ChangeBatch {
            kind,
            tables,
            unchanged_toast,
            end_lsn: p.end_lsn,
            commit_lsn: p.commit_lsn,
            commit_ts_micros: p.ts,
            transactions: p.txns,
            rows: p.rows,
            first_received: p.first_received.unwrap_or(now),
        };
        p.txns = 0;
        p.rows = 0;
        p.first_received = None;
        if !matches!(batch.kind, BatchKind::Piece) {
            p.progress = false;
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{LSN, OP, SEQ};
    use crate::config::TableName;
    use crate::source::ColumnInfo;
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema};
    use std::sync::Arc;
    use std::time::Duration;

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

    /// A batcher fed by hand, on a clock the test moves.
    struct Harness {
        b: Batcher,
        now: Instant,
    }

    impl Harness {
        fn new(max_rows: usize, skip_through: u64, fence: Option<&str>) -> Harness {
            let opts = BatcherOptions {
                interval: Duration::from_millis(200),
                max_rows,
                skip_through: Lsn::new(skip_through),
                fence_token: fence.map(String::from),
            };
            Harness {
                b: Batcher::new(vec![schema()], opts),
                now: Instant::now(),
            }
        }

        fn feed(&mut self, ev: SourceEvent) {
            self.b.on_event(ev, self.now);
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

        /// One whole transaction of `n` inserts.
        fn txn(&mut self, commit_lsn: u64, n: usize) {
            self.begin(commit_lsn, 1);
            for i in 0..n {
                self.feed(change(&i.to_string(), Op::Insert));
            }
            self.commit(commit_lsn, commit_lsn + 5, 1);
        }

        fn next(&mut self) -> Option<ChangeBatch> {
            self.b.has_batch().then(|| self.b.next_batch(self.now))
        }

        fn wants_events(&self) -> bool {
            self.b.wants_events(self.now)
        }
    }

    fn column_i64(b: &ChangeBatch, name: &str) -> Vec<i64> {
        let t = b.tables[0].as_ref().unwrap().rows();
        let c = t.column_by_name(name).unwrap();
        c.as_primitive::<Int64Type>().values().to_vec()
    }

    #[test]
    fn batches_hold_whole_transactions_in_order_and_skip_committed_ones() {
        let mut h = Harness::new(10, 100, Some("f"));
        // Already in the lake (end 90 <= 100): skipped.
        h.begin(80, 1);
        h.feed(change("1", Op::Insert));
        h.commit(80, 90, 1);
        assert!(h.next().is_none());
        // Two new transactions.
        h.begin(110, 2);
        h.feed(change("2", Op::Insert));
        h.feed(change("2", Op::Update));
        h.commit(110, 120, 2);
        h.begin(130, 3);
        h.feed(change("3", Op::Delete));
        h.feed(SourceEvent::Fence {
            token: "other".into(),
        });
        assert!(!h.b.is_stopped(), "another run's fence");
        // Open transaction: no batch until its boundary.
        assert!(!h.b.has_batch());
        h.commit(130, 140, 3);
        h.feed(SourceEvent::Fence { token: "f".into() });
        assert!(h.b.is_stopped());

        let b = h.next().unwrap();
        assert_eq!(b.kind, BatchKind::Transactions);
        assert_eq!(
            (b.transactions, b.rows, b.end_lsn, b.commit_lsn),
            (2, 3, Lsn::new(140), Lsn::new(130))
        );
        let changes = b.tables[0].as_ref().unwrap();
        let t = changes.rows();
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
        assert_eq!(changes.ops(), &[Op::Insert, Op::Update, Op::Delete]);
        assert_eq!(column_i64(&b, LSN), vec![110, 110, 130]);
        assert_eq!(column_i64(&b, SEQ), vec![0, 1, 0]);
        // Then the end of the `--once` run, empty, and the run is over.
        let end = h.next().unwrap();
        assert_eq!((end.kind, end.rows), (BatchKind::End, 0));
        assert!(end.tables[0].is_none());
        assert!(matches!(h.b.finished(), Some(Finish::Done)));
        assert!(h.next().is_none());
    }

    #[test]
    fn a_fence_transaction_moves_the_watermark_on_its_own_only_when_idle() {
        let mut h = Harness::new(10, 0, None);
        // A fence (a transactional message, no row changes) with nothing pending.
        h.begin(100, 1);
        h.feed(SourceEvent::Fence { token: "rw".into() });
        assert!(!h.b.has_batch(), "not before its commit");
        h.commit(100, 108, 1);
        assert!(
            !h.wants_events(),
            "handed on before the next transaction is read, so none can hold it back"
        );
        let b = h.next().unwrap();
        assert_eq!(
            (b.kind, b.rows, b.transactions, b.end_lsn),
            (BatchKind::Progress, 0, 0, Lsn::new(108))
        );
        assert!(b.tables.iter().all(Option::is_none));
        assert!(h.next().is_none());
        // Behind a pending transaction it only moves that batch's end.
        h.txn(200, 1);
        h.begin(300, 1);
        h.feed(SourceEvent::Fence { token: "rw".into() });
        h.commit(300, 308, 1);
        let b = h.next().unwrap();
        assert_eq!(
            (b.kind, b.transactions, b.end_lsn),
            (BatchKind::Transactions, 1, Lsn::new(308))
        );
        assert!(h.next().is_none());
    }

    #[test]
    fn a_keepalive_between_transactions_moves_the_watermark_like_a_fence() {
        let mut h = Harness::new(10, 50, None);
        h.b.on_keepalive(Lsn::new(40));
        assert!(!h.b.has_batch(), "behind the resume point");
        h.b.on_keepalive(Lsn::new(120));
        let b = h.next().unwrap();
        assert_eq!(
            (b.kind, b.rows, b.end_lsn),
            (BatchKind::Progress, 0, Lsn::new(120))
        );
        h.b.on_keepalive(Lsn::new(120));
        assert!(h.next().is_none(), "nothing new");
        // Behind a pending transaction it moves that batch's end.
        h.txn(200, 1);
        h.b.on_keepalive(Lsn::new(400));
        let b = h.next().unwrap();
        assert_eq!(
            (b.kind, b.transactions, b.end_lsn),
            (BatchKind::Transactions, 1, Lsn::new(400))
        );
        // Not inside a transaction: its commit lies beyond.
        h.begin(500, 1);
        h.b.on_keepalive(Lsn::new(510));
        assert!(!h.b.has_batch());
        h.commit(500, 508, 1);
        assert!(h.next().is_none(), "a transaction without rows, no fence");
    }

    #[test]
    fn a_transaction_larger_than_max_rows_is_handed_on_in_pieces_then_committed_whole() {
        let mut h = Harness::new(2, 100, None);
        // Starts before the resume point: in the lake already, so nothing is staged.
        h.begin(90, 1);
        for _ in 0..5 {
            h.feed(change("1", Op::Insert));
        }
        assert!(h.wants_events(), "skipped changes fill no piece");
        h.commit(90, 95, 1);
        assert!(h.b.is_idle());

        h.begin(200, 7);
        let mut pieces = Vec::new();
        for id in ["1", "2", "3", "4", "5"] {
            assert!(h.wants_events(), "reads until a piece is full");
            h.feed(change(id, Op::Update));
            if let Some(p) = h.next() {
                pieces.push(p);
            }
        }
        h.commit(200, 210, 7);
        let last = h.next().unwrap();
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

    #[test]
    fn a_full_piece_waits_for_the_committed_transactions_before_it() {
        let mut h = Harness::new(2, 0, None);
        h.txn(100, 1);
        h.begin(200, 2);
        h.feed(change("7", Op::Insert));
        h.feed(change("8", Op::Insert));
        assert!(
            !h.wants_events(),
            "a full piece stops reading (backpressure)"
        );
        let first = h.next().unwrap();
        assert_eq!(
            (first.kind, first.end_lsn),
            (BatchKind::Transactions, Lsn::new(105))
        );
        let piece = h.next().unwrap();
        assert_eq!((piece.kind, piece.rows), (BatchKind::Piece, 2));
        assert!(h.wants_events());
    }

    #[test]
    fn cuts_at_once_between_transactions_and_waits_for_an_open_one_when_due() {
        let mut h = Harness::new(3, 0, None);
        h.txn(100, 1);
        // A lone change is not held back: a batch is ready at once, and reading goes on
        // only while more is available (the loop reads first).
        assert!(h.b.has_batch() && h.wants_events());
        assert_eq!(
            h.b.deadline(h.now),
            Some(h.now + Duration::from_millis(200))
        );
        // Due by time: no more reading between transactions...
        h.now += Duration::from_millis(200);
        assert_eq!(h.b.deadline(h.now), None);
        assert!(!h.wants_events());
        // ...but an open transaction is read to its end before the cut.
        let mut h = Harness::new(3, 0, None);
        h.txn(100, 1);
        h.begin(110, 1);
        h.now += Duration::from_millis(250);
        assert!(h.wants_events() && !h.b.has_batch());
        h.feed(change("9", Op::Insert));
        h.commit(110, 115, 1);
        let b = h.next().unwrap();
        assert_eq!((b.transactions, b.end_lsn), (2, Lsn::new(115)));
        // Due by size: `max_rows` committed rows stop reading.
        h.txn(200, 3);
        assert!(!h.wants_events());
    }

    #[test]
    fn transactions_without_our_tables_move_the_acknowledgement_point() {
        let mut h = Harness::new(10, 0, None);
        h.begin(100, 1);
        h.commit(100, 105, 1);
        assert!(h.b.is_idle() && !h.b.has_batch(), "nothing to process");
        h.txn(200, 1);
        h.begin(300, 1);
        h.commit(300, 305, 1);
        let b = h.next().unwrap();
        assert_eq!((b.transactions, b.end_lsn), (1, Lsn::new(305)));
    }

    #[test]
    fn cancel_hands_on_what_is_committed_and_drops_the_open_transaction() {
        let mut h = Harness::new(10, 0, Some("f"));
        h.txn(100, 2);
        h.begin(200, 1);
        h.feed(change("5", Op::Insert));
        h.b.on_cancel();
        assert!(!h.wants_events() && h.b.finished().is_none());
        let b = h.next().unwrap();
        assert_eq!(
            (b.kind, b.rows, b.end_lsn),
            (BatchKind::Transactions, 2, Lsn::new(105))
        );
        // No End batch: a cancelled `--once` run did not reach its fence.
        assert!(h.next().is_none());
        assert!(matches!(h.b.finished(), Some(Finish::Done)));
    }

    #[test]
    fn a_schema_change_ends_the_run_before_its_transaction() {
        let mut h = Harness::new(10, 0, Some("f"));
        h.txn(100, 1);
        h.begin(200, 1);
        h.feed(change("5", Op::Insert));
        h.feed(SourceEvent::SchemaChanged {
            table: TableId::new(0),
            columns: vec![],
        });
        let b = h.next().unwrap();
        assert_eq!(b.end_lsn, Lsn::new(105));
        assert!(h.next().is_none(), "no End batch");
        match h.b.finished() {
            Some(Finish::SchemaChanged(c)) => assert_eq!(c.commit_lsn, Lsn::new(200)),
            other => panic!("expected a schema change, got {other:?}"),
        }
    }

    #[test]
    fn a_stream_that_ends_hands_on_what_is_committed_then_fails() {
        let mut h = Harness::new(10, 0, None);
        h.txn(100, 1);
        h.b.on_stream_end();
        assert!(h.b.finished().is_none());
        assert!(h.next().is_some());
        assert!(matches!(h.b.finished(), Some(Finish::StreamEnded)));
    }
}
