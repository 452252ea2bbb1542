//! The processor: turns one [`ChangeBatch`] into committed, durable tables and says
//! which LSN may then be acknowledged. It has two halves that run side by side, so
//! that the next batch is applied and computed while this one commits:
//!
//! - [`Compute`]: unchanged TOAST values filled from state, the batch applied to state
//!   (collecting the entities it touched), their features computed and published
//!   online (the watermark moves to the batch's end), the rows to write handed on as
//!   [`Work`]. A piece of a large transaction is applied and its raw rows handed on to
//!   be written ahead.
//! - [`Committer`]: in order, every touched raw and feature table committed through the
//!   [`Destination`], each tagged with the batch's end LSN; returns the LSN to
//!   acknowledge once all are durable.
//!
//! Online values may so be served before their Delta commit is durable; a crash in
//! between replays the same transactions from the slot and commits the same values.

use super::thread_time::ThreadClock;
use super::{policy, RunError};
use crate::batch::{BatchKind, ChangeBatch};
use crate::changelog::{Lsn, LSN};
use crate::features::{FeatureEngine, FeatureRows, Touched};
use crate::serve::Online;
use crate::sink::{Destination, LakeTable, SinkError, Writes};
use crate::source::TableSchema;
use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::Int64Type;
use std::time::{Duration, Instant};

/// What the committer does with one batch, in the order the batches came.
pub(crate) enum Work {
    /// A piece of a large transaction: its raw rows, written ahead without a commit.
    Stage(Vec<(LakeTable, RecordBatch)>),
    /// Batches of transactions (one, or several merged into a group commit): their raw
    /// rows and features, one commit per table.
    Commit {
        raw: Writes,
        features: Writes,
        batch: BatchInfo,
    },
    /// Transactions without rows for our tables (e.g. a read-your-writes fence) ended
    /// at this LSN: nothing to write, acknowledge once everything before is durable.
    Progress(Lsn),
    /// The end of a `--once` run.
    End,
}

/// What the log line and the metrics of a committed batch (or group of batches) say.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchInfo {
    pub end_lsn: Lsn,
    /// The earliest source commit in it (its latency is the group's worst).
    pub commit_ts_micros: i64,
    pub transactions: usize,
    pub rows: usize,
    /// Batches in the group.
    pub batches: usize,
    pub first_received: Instant,
    /// How long applying and computing took, over the group.
    pub compute: Duration,
    /// When the (last) batch was computed: the wait for the committer starts.
    pub computed: Instant,
}

impl Work {
    /// Change rows it carries (for bounding what waits for the committer).
    pub(crate) fn rows(&self) -> usize {
        match self {
            Work::Stage(raw) => raw.iter().map(|(_, b)| b.num_rows()).sum(),
            Work::Commit { batch, .. } => batch.rows,
            Work::Progress(_) | Work::End => 0,
        }
    }

    /// Can join a group commit: batches and progress, not the pieces of a large
    /// transaction (their files are staged in order) nor the end.
    pub(crate) fn groups(&self) -> bool {
        matches!(self, Work::Commit { .. } | Work::Progress(_))
    }

    /// `self` then `next` as one work: the tables' rows side by side (each row keeps its
    /// own `_lsn`), tagged with the later end LSN. Both must [`Work::groups`].
    pub(crate) fn merge(self, next: Work) -> Work {
        match (self, next) {
            (Work::Progress(a), Work::Progress(b)) => Work::Progress(a.max(b)),
            (
                Work::Progress(lsn),
                Work::Commit {
                    raw,
                    features,
                    mut batch,
                },
            )
            | (
                Work::Commit {
                    raw,
                    features,
                    mut batch,
                },
                Work::Progress(lsn),
            ) => {
                batch.end_lsn = batch.end_lsn.max(lsn);
                Work::Commit {
                    raw,
                    features,
                    batch,
                }
            }
            (
                Work::Commit {
                    mut raw,
                    mut features,
                    batch: a,
                },
                Work::Commit {
                    raw: more_raw,
                    features: more_features,
                    batch: b,
                },
            ) => {
                extend_writes(&mut raw, more_raw);
                extend_writes(&mut features, more_features);
                let batch = BatchInfo {
                    end_lsn: a.end_lsn.max(b.end_lsn),
                    commit_ts_micros: a.commit_ts_micros.min(b.commit_ts_micros),
                    transactions: a.transactions + b.transactions,
                    rows: a.rows + b.rows,
                    batches: a.batches + b.batches,
                    first_received: a.first_received.min(b.first_received),
                    compute: a.compute + b.compute,
                    computed: a.computed.max(b.computed),
                };
                Work::Commit {
                    raw,
                    features,
                    batch,
                }
            }
            (a, _) => a,
        }
    }
}

/// Adds `more`'s rows to `writes`, table by table (one entry per table).
fn extend_writes(writes: &mut Writes, more: Writes) {
    for (path, rows) in more {
        match writes.iter_mut().find(|(p, _)| *p == path) {
            Some((_, have)) => have.extend(rows),
            None => writes.push((path, rows)),
        }
    }
}

/// The apply-and-compute half (see the module doc).
pub(crate) struct Compute<'a> {
    engine: &'a FeatureEngine,
    schemas: &'a [TableSchema],
    online: Option<&'a Online>,
    /// Entities touched by the pieces of a large transaction seen so far.
    large: Option<Touched>,
}

impl<'a> Compute<'a> {
    pub(crate) fn new(
        engine: &'a FeatureEngine,
        schemas: &'a [TableSchema],
        online: Option<&'a Online>,
    ) -> Self {
        Compute {
            engine,
            schemas,
            online,
            large: None,
        }
    }

    /// Applies `batch` to state, computes and publishes the features it changes, and
    /// returns what must be written.
    pub(crate) async fn compute(&mut self, mut batch: ChangeBatch) -> Result<Work, RunError> {
        let started = Instant::now();
        let clock = ThreadClock::start();
        // Before anything reads the rows: the raw mirror and state get the full image.
        self.engine
            .state()
            .fill_unchanged_toast(&mut batch)
            .map_err(crate::features::FeatureError::from)?;
        match batch.kind {
            BatchKind::Piece => {
                let engine = self.engine;
                let touched = self.large.get_or_insert_with(|| engine.no_entities());
                engine.apply(&batch, touched)?;
                tracing::info!(
                    rows = batch.rows,
                    touched = touched.len(),
                    commit_lsn = %batch.commit_lsn,
                    "large transaction: piece applied"
                );
                Ok(Work::Stage(raw_rows(self.schemas, &batch)))
            }
            BatchKind::Transactions => {
                let mut touched = self
                    .large
                    .take()
                    .unwrap_or_else(|| self.engine.no_entities());
                self.engine.apply(&batch, &mut touched)?;
                let applied = started.elapsed();
                let features = self
                    .engine
                    .compute_touched(touched, batch.commit_lsn, batch.commit_ts_micros)
                    .await?;
                let computed = started.elapsed();
                if let Some(online) = self.online {
                    for f in &features {
                        online.apply(&f.table, &f.batch);
                    }
                    online.advance(batch.end_lsn);
                    metrics::histogram!(crate::metrics::COMMIT_TO_ONLINE)
                        .record(crate::metrics::since_commit(batch.commit_ts_micros));
                }
                let raw = raw_rows(self.schemas, &batch)
                    .into_iter()
                    .map(|(path, rows)| (path, vec![rows]))
                    .collect();
                if let Some(spent) = clock.slow() {
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    tracing::debug!(rows = batch.rows, apply_ms = ms(applied),
                        features_ms = ms(computed - applied), %spent, "slow compute");
                }
                Ok(Work::Commit {
                    raw,
                    features: feature_writes(features),
                    batch: BatchInfo {
                        end_lsn: batch.end_lsn,
                        commit_ts_micros: batch.commit_ts_micros,
                        transactions: batch.transactions,
                        rows: batch.rows,
                        batches: 1,
                        first_received: batch.first_received,
                        compute: started.elapsed(),
                        computed: Instant::now(),
                    },
                })
            }
            BatchKind::Progress => {
                if let Some(online) = self.online {
                    online.advance(batch.end_lsn);
                }
                Ok(Work::Progress(batch.end_lsn))
            }
            BatchKind::End if self.large.is_some() => Err(RunError::PiecesWithoutEnd),
            BatchKind::End => Ok(Work::End),
        }
    }
}

/// The commit half (see the module doc): owns the destination (`&mut D` will do).
pub(crate) struct Committer<D: Destination> {
    sink: D,
    /// Files written ahead for a large transaction, committed with its end.
    staged: Option<(D::Staged, usize)>,
}

impl<D: Destination + Sync> Committer<D> {
    pub(crate) fn new(sink: D) -> Self {
        Committer { sink, staged: None }
    }

    /// Writes `work`. `Some(lsn)`: every table the batch touches holds it durably,
    /// acknowledge `lsn`. `None`: nothing to acknowledge (a piece, or the end).
    pub(crate) async fn commit(&mut self, work: Work) -> Result<Option<Lsn>, RunError> {
        match work {
            Work::Stage(raw) => {
                let (staged, rows) = self.staged.get_or_insert_with(Default::default);
                for (path, batch) in raw {
                    self.sink
                        .stage(staged, &path, &batch)
                        .await
                        .map_err(raw_write_error)?;
                    *rows += batch.num_rows();
                }
                crate::fault::crash_point("large_txn_piece");
                tracing::info!(
                    rows_so_far = *rows,
                    "large transaction: piece written ahead"
                );
                Ok(None)
            }
            Work::Commit {
                raw,
                features,
                batch,
            } => {
                let staged = self.staged.take().map(|(s, _)| s).unwrap_or_default();
                let mut writes: Writes = Vec::with_capacity(raw.len() + features.len());
                for (path, rows) in raw {
                    let committed = self.sink.resume_point().committed(&path);
                    let rows = rows
                        .iter()
                        .map(|r| not_yet_committed(r, committed))
                        .collect::<Result<Vec<_>, _>>()?;
                    writes.push((path, rows));
                }
                writes.extend(features);
                self.sink
                    .commit(writes, batch.end_lsn, staged)
                    .await
                    .map_err(raw_write_error)?;
                metrics::histogram!(crate::metrics::COMMIT_TO_DURABLE)
                    .record(crate::metrics::since_commit(batch.commit_ts_micros));
                Ok(Some(batch.end_lsn))
            }
            // Everything before it is durable (the works come in order).
            Work::Progress(lsn) => Ok(Some(lsn)),
            Work::End => Ok(None),
        }
    }
}

/// Both halves in one, one batch at a time (the unit tests drive it so).
#[cfg(test)]
pub(crate) struct Processor<'a, D: Destination> {
    compute: Compute<'a>,
    committer: Committer<D>,
}

#[cfg(test)]
impl<'a, D: Destination + Sync> Processor<'a, D> {
    pub(crate) fn new(engine: &'a FeatureEngine, sink: D, schemas: &'a [TableSchema]) -> Self {
        Processor {
            compute: Compute::new(engine, schemas, None),
            committer: Committer::new(sink),
        }
    }

    pub(crate) async fn process(&mut self, batch: ChangeBatch) -> Result<Option<Lsn>, RunError> {
        let work = self.compute.compute(batch).await?;
        self.committer.commit(work).await
    }
}

/// The batch's raw rows by raw table (all of them: the committer drops those a table
/// already holds).
fn raw_rows(schemas: &[TableSchema], batch: &ChangeBatch) -> Vec<(LakeTable, RecordBatch)> {
    schemas
        .iter()
        .zip(&batch.tables)
        .filter_map(|(schema, rows)| {
            let changes = rows.as_ref()?;
            Some((LakeTable::raw_of(&schema.name), changes.rows().clone()))
        })
        .collect()
}

/// A raw table refusing a batch for good (not the store being away) gets the way out.
fn raw_write_error(e: SinkError) -> RunError {
    if e.table().is_some_and(LakeTable::is_raw) && policy::sink(&e) != policy::Action::Retry {
        RunError::RawWrite {
            source: Box::new(e),
        }
    } else {
        e.into()
    }
}

pub(crate) fn feature_writes(features: Vec<FeatureRows>) -> Writes {
    features
        .into_iter()
        .map(|f| (LakeTable::features(f.table), vec![f.batch]))
        .collect()
}

/// Rows whose transaction commits at or after `committed` (an end LSN already in the
/// table); after a crash between table commits, a table keeps only what it lacks.
fn not_yet_committed(rows: &RecordBatch, committed: Lsn) -> Result<RecordBatch, RunError> {
    let lsn = rows
        .column_by_name(LSN)
        .expect("raw batches have _lsn")
        .as_primitive::<Int64Type>();
    let committed = committed.as_i64();
    if lsn.values().iter().all(|&l| l >= committed) {
        return Ok(rows.clone());
    }
    let keep: BooleanArray = lsn.iter().map(|l| l.map(|l| l >= committed)).collect();
    Ok(arrow::compute::filter_record_batch(rows, &keep)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{raw_schema, Changes, Op};
    use crate::config::{Pipeline, TableName};
    use crate::sink::memory::{Fault, MemorySink};
    use crate::source::ColumnInfo;
    use arrow::array::TimestampMicrosecondArray;
    use arrow::array::{ArrayRef, Date32Array, Float64Array, Int32Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    use std::time::Instant;

    /// 2020-08-01, as days and as micros since the epoch.
    const DAY: i32 = 18_475;
    const COMMIT_TS: i64 = DAY as i64 * 86_400_000_000;

    fn table(name: &str, columns: &[(&str, DataType)]) -> TableSchema {
        let infos = columns
            .iter()
            .map(|(n, t)| ColumnInfo {
                name: n.to_string(),
                type_oid: 0,
                declared: (0, -1),
                type_name: format!("{t}"),
                data_type: t.clone(),
            })
            .collect();
        let fields: Vec<Field> = columns
            .iter()
            .enumerate()
            .map(|(i, (n, t))| Field::new(*n, t.clone(), i != 0))
            .collect();
        TableSchema {
            name: TableName::parse(name),
            oid: 0,
            columns: infos,
            key: vec![0],
            schema: Arc::new(Schema::new(fields)),
        }
    }

    /// The CRM's tables, with the columns the features read.
    fn schemas() -> Vec<TableSchema> {
        use DataType::*;
        vec![
            table("user", &[("id", Int32)]),
            table(
                "loan",
                &[
                    ("id", Int32),
                    ("client_id", Int32),
                    ("amount", Float64),
                    ("created_on", Date32),
                    ("status", Utf8),
                    ("updated_on", Date32),
                ],
            ),
            table(
                "payment",
                &[
                    ("id", Int32),
                    ("loan_id", Int64),
                    ("interest", Float64),
                    ("status", Utf8),
                    ("created_on", Date32),
                ],
            ),
        ]
    }

    async fn engine(schemas: &[TableSchema]) -> FeatureEngine {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/loan_features.yaml");
        let pipeline = Pipeline::load(&file).unwrap();
        FeatureEngine::new(&pipeline, schemas).await.unwrap()
    }

    fn sink() -> MemorySink {
        MemorySink::new([
            LakeTable::raw("user"),
            LakeTable::raw("loan"),
            LakeTable::raw("payment"),
            LakeTable::features("client_features"),
        ])
    }

    /// Raw change rows of `schema`: the row image columns, then `op`s at `lsn`.
    fn changes(schema: &TableSchema, image: Vec<ArrayRef>, op: Op, lsn: u64) -> RecordBatch {
        let n = image[0].len();
        let mut cols = image;
        cols.push(Arc::new(StringArray::from(vec![op.as_str(); n])));
        cols.push(Arc::new(Int64Array::from(vec![lsn as i64; n])));
        cols.push(Arc::new(Int64Array::from_iter_values(0..n as i64)));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from(vec![COMMIT_TS; n]).with_timezone("UTC"),
        ));
        RecordBatch::try_new(raw_schema(&schema.schema), cols).unwrap()
    }

    fn users(s: &[TableSchema], ids: &[i32], lsn: u64) -> RecordBatch {
        changes(
            &s[0],
            vec![Arc::new(Int32Array::from(ids.to_vec()))],
            Op::Insert,
            lsn,
        )
    }

    /// Paid loans `ids` of client `client`.
    fn paid_loans(s: &[TableSchema], ids: &[i32], client: i32, lsn: u64) -> RecordBatch {
        let n = ids.len();
        let image: Vec<ArrayRef> = vec![
            Arc::new(Int32Array::from(ids.to_vec())),
            Arc::new(Int32Array::from(vec![client; n])),
            Arc::new(Float64Array::from(vec![100.0; n])),
            Arc::new(Date32Array::from(vec![DAY - 10; n])),
            Arc::new(StringArray::from(vec!["paid"; n])),
            Arc::new(Date32Array::from(vec![DAY - 5; n])),
        ];
        changes(&s[1], image, Op::Insert, lsn)
    }

    fn batch(kind: BatchKind, tables: Vec<Option<RecordBatch>>, commit: u64) -> ChangeBatch {
        let rows = tables.iter().flatten().map(RecordBatch::num_rows).sum();
        ChangeBatch {
            kind,
            unchanged_toast: vec![Vec::new(); tables.len()],
            tables: tables
                .into_iter()
                .map(|t| t.map(|rows| Changes::decode(rows).unwrap()))
                .collect(),
            end_lsn: Lsn::new(commit + 8),
            commit_lsn: Lsn::new(commit),
            commit_ts_micros: COMMIT_TS,
            transactions: usize::from(kind == BatchKind::Transactions),
            rows,
            first_received: Instant::now(),
        }
    }

    /// `paid_loans_count` per client in the feature rows committed at `lsn`.
    fn paid_counts(sink: &MemorySink, lsn: Lsn) -> Vec<(i64, i64)> {
        let features = LakeTable::features("client_features");
        let mut out = Vec::new();
        for landed in sink
            .landed
            .iter()
            .filter(|l| l.table == features && l.lsn == lsn)
        {
            for b in &landed.rows {
                let keys = b.column(0).as_primitive::<Int64Type>();
                let counts = b
                    .column_by_name("paid_loans_count")
                    .unwrap()
                    .as_primitive::<Int64Type>();
                out.extend((0..b.num_rows()).map(|i| (keys.value(i), counts.value(i))));
            }
        }
        out.sort_unstable();
        out
    }

    #[tokio::test]
    async fn a_batch_commits_raw_and_feature_tables_and_returns_its_end_lsn() {
        let s = schemas();
        let engine = engine(&s).await;
        let mut sink = sink();
        let mut p = Processor::new(&engine, &mut sink, &s);
        let b = batch(
            BatchKind::Transactions,
            vec![
                Some(users(&s, &[1, 2], 100)),
                Some(paid_loans(&s, &[10, 11], 1, 100)),
                None,
            ],
            100,
        );
        assert_eq!(p.process(b).await.unwrap(), Some(Lsn::new(108)));
        assert_eq!(sink.rows(&LakeTable::raw("user")), 2);
        assert_eq!(sink.rows(&LakeTable::raw("loan")), 2);
        assert_eq!(sink.rows(&LakeTable::raw("payment")), 0);
        assert_eq!(paid_counts(&sink, Lsn::new(108)), vec![(1, 2), (2, 0)]);
        let lake = sink.resume_point();
        assert_eq!(lake.committed(&LakeTable::raw("loan")), Lsn::new(108));
        // A table the batch did not touch records nothing.
        assert_eq!(lake.committed(&LakeTable::raw("payment")), Lsn::ZERO);
    }

    #[tokio::test]
    async fn each_batch_computes_on_its_own_entities_though_the_plan_is_reused() {
        let s = schemas();
        let engine = engine(&s).await;
        let mut sink = sink();
        let mut p = Processor::new(&engine, &mut sink, &s);
        let first = vec![
            Some(users(&s, &[1, 2], 100)),
            Some(paid_loans(&s, &[10, 11], 1, 100)),
            None,
        ];
        p.process(batch(BatchKind::Transactions, first, 100))
            .await
            .unwrap();
        // The joins' build sides of the first run must not be seen again.
        let second = vec![
            Some(users(&s, &[3], 200)),
            Some(paid_loans(&s, &[30], 3, 200)),
            None,
        ];
        p.process(batch(BatchKind::Transactions, second, 200))
            .await
            .unwrap();
        let third = vec![None, Some(paid_loans(&s, &[12], 1, 300)), None];
        p.process(batch(BatchKind::Transactions, third, 300))
            .await
            .unwrap();
        assert_eq!(paid_counts(&sink, Lsn::new(108)), vec![(1, 2), (2, 0)]);
        assert_eq!(paid_counts(&sink, Lsn::new(208)), vec![(3, 1)]);
        assert_eq!(paid_counts(&sink, Lsn::new(308)), vec![(1, 3)]);
    }

    #[tokio::test]
    async fn a_replayed_batch_is_acknowledged_without_a_second_write() {
        let s = schemas();
        let engine = engine(&s).await;
        let mut sink = sink();
        let make = || {
            batch(
                BatchKind::Transactions,
                vec![
                    Some(users(&s, &[1], 100)),
                    Some(paid_loans(&s, &[10], 1, 100)),
                    None,
                ],
                100,
            )
        };
        Processor::new(&engine, &mut sink, &s)
            .process(make())
            .await
            .unwrap();
        let landed = sink.landed.len();
        // After a restart the same batch comes again from the slot.
        let replay = Processor::new(&engine, &mut sink, &s)
            .process(make())
            .await
            .unwrap();
        assert_eq!(replay, Some(Lsn::new(108)));
        assert_eq!(sink.landed.len(), landed, "nothing written twice");
        assert_eq!(sink.rows(&LakeTable::raw("loan")), 1);
    }

    #[tokio::test]
    async fn a_large_transaction_commits_its_pieces_once_with_its_end() {
        let s = schemas();
        let engine = engine(&s).await;
        let mut sink = sink();
        let mut p = Processor::new(&engine, &mut sink, &s);
        let u = batch(
            BatchKind::Transactions,
            vec![Some(users(&s, &[1, 2], 50)), None, None],
            50,
        );
        p.process(u).await.unwrap();
        for (ids, client) in [(&[10, 11][..], 1), (&[20][..], 2)] {
            let piece = batch(
                BatchKind::Piece,
                vec![None, Some(paid_loans(&s, ids, client, 100)), None],
                100,
            );
            assert_eq!(
                p.process(piece).await.unwrap(),
                None,
                "a piece is not acknowledged"
            );
        }
        let end = batch(
            BatchKind::Transactions,
            vec![None, Some(paid_loans(&s, &[12], 1, 100)), None],
            100,
        );
        assert_eq!(p.process(end).await.unwrap(), Some(Lsn::new(108)));
        let loan_commits: Vec<_> = sink
            .landed
            .iter()
            .filter(|l| l.table == LakeTable::raw("loan"))
            .collect();
        assert_eq!(
            loan_commits.len(),
            1,
            "one commit for the whole transaction"
        );
        assert_eq!(sink.rows(&LakeTable::raw("loan")), 4);
        // Both pieces' entities are recomputed with the end.
        assert_eq!(paid_counts(&sink, Lsn::new(108)), vec![(1, 3), (2, 1)]);
    }

    #[tokio::test]
    async fn pieces_without_their_end_are_an_error() {
        let s = schemas();
        let engine = engine(&s).await;
        let mut sink = sink();
        let mut p = Processor::new(&engine, &mut sink, &s);
        let piece = batch(
            BatchKind::Piece,
            vec![None, Some(paid_loans(&s, &[10], 1, 100)), None],
            100,
        );
        p.process(piece).await.unwrap();
        let end = batch(BatchKind::End, vec![None, None, None], 0);
        assert!(matches!(
            p.process(end).await,
            Err(RunError::PiecesWithoutEnd)
        ));
        assert!(sink.landed.is_empty());
    }

    #[tokio::test]
    async fn a_lost_reply_is_not_acknowledged_and_the_replay_writes_nothing_twice() {
        let s = schemas();
        let engine = engine(&s).await;
        let make = |s: &[TableSchema]| {
            batch(
                BatchKind::Transactions,
                vec![
                    Some(users(s, &[1], 100)),
                    Some(paid_loans(s, &[10], 1, 100)),
                    None,
                ],
                100,
            )
        };
        for fault in [Fault::LoseReply, Fault::Fail] {
            let mut sink = sink();
            sink.next_fault = Some(fault);
            let err = Processor::new(&engine, &mut sink, &s)
                .process(make(&s))
                .await
                .unwrap_err();
            assert_eq!(policy::action(&err), policy::Action::Retry, "{err}");
            let landed = sink.landed.len();
            assert_eq!(landed > 0, fault == Fault::LoseReply);
            let replay = Processor::new(&engine, &mut sink, &s)
                .process(make(&s))
                .await
                .unwrap();
            assert_eq!(replay, Some(Lsn::new(108)));
            assert_eq!(sink.rows(&LakeTable::raw("loan")), 1, "{fault:?}");
            assert_eq!(paid_counts(&sink, Lsn::new(108)), vec![(1, 1)], "{fault:?}");
        }
    }
}
