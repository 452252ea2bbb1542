//! The processor: turns one [`ChangeBatch`] into committed, durable tables and says
//! which LSN may then be acknowledged.
//!
//! For a batch of transactions: unchanged TOAST values filled from state, the batch
//! applied to state (collecting the entities it touched), their features computed, and
//! every touched raw and feature table committed through the [`Destination`], each
//! tagged with the batch's end LSN. A piece of a large transaction is applied and its
//! raw rows written ahead; it commits with the transaction's end.

use super::{policy, RunError};
use crate::batch::{BatchKind, ChangeBatch};
use crate::changelog::{Lsn, LSN};
use crate::features::{FeatureEngine, FeatureRows, Touched};
use crate::sink::{Destination, LakeTable, SinkError, Writes};
use crate::source::TableSchema;
use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::Int64Type;

/// The pieces of a transaction larger than one batch seen so far: applied to state,
/// their raw rows written ahead.
struct LargeTxn<S> {
    staged: S,
    /// Rows written ahead so far.
    rows: usize,
    touched: Touched,
}

pub(crate) struct Processor<'a, D: Destination> {
    engine: &'a FeatureEngine,
    sink: &'a mut D,
    schemas: &'a [TableSchema],
    /// A transaction larger than one batch, between its first piece and its end.
    large: Option<LargeTxn<D::Staged>>,
}

impl<'a, D: Destination + Sync> Processor<'a, D> {
    pub(crate) fn new(
        engine: &'a FeatureEngine,
        sink: &'a mut D,
        schemas: &'a [TableSchema],
    ) -> Self {
        Processor {
            engine,
            sink,
            schemas,
            large: None,
        }
    }

    /// Processes `batch`. `Some(lsn)`: every table the batch touches holds it durably,
    /// acknowledge `lsn`. `None`: nothing to acknowledge (a piece, or the end).
    pub(crate) async fn process(
        &mut self,
        mut batch: ChangeBatch,
    ) -> Result<Option<Lsn>, RunError> {
        // Before anything reads the rows: the raw mirror and state get the full image.
        self.engine
            .state()
            .fill_unchanged_toast(&mut batch)
            .map_err(crate::features::FeatureError::from)?;
        match batch.kind {
            BatchKind::Piece => {
                self.stage_piece(&batch).await?;
                Ok(None)
            }
            BatchKind::Transactions => {
                self.commit(&batch).await?;
                Ok(Some(batch.end_lsn))
            }
            BatchKind::End if self.large.is_some() => Err(RunError::PiecesWithoutEnd),
            BatchKind::End => Ok(None),
        }
    }

    /// Applies a piece of a large transaction to state and writes its raw rows ahead;
    /// the commit comes with the transaction's end. If the run stops before, state is
    /// rebuilt from the lake and Postgres sends the whole transaction again.
    async fn stage_piece(&mut self, batch: &ChangeBatch) -> Result<(), RunError> {
        let engine = self.engine;
        let txn = self.large.get_or_insert_with(|| LargeTxn {
            staged: D::Staged::default(),
            rows: 0,
            touched: engine.no_entities(),
        });
        engine.apply(batch, &mut txn.touched)?;
        for (path, rows) in raw_writes(&*self.sink, self.schemas, batch)? {
            self.sink
                .stage(&mut txn.staged, &path, &rows)
                .await
                .map_err(raw_write_error)?;
            txn.rows += rows.num_rows();
        }
        crate::fault::crash_point("large_txn_piece");
        tracing::info!(
            rows_so_far = txn.rows,
            touched = txn.touched.len(),
            commit_lsn = %batch.commit_lsn,
            "large transaction: piece applied and written ahead"
        );
        Ok(())
    }

    async fn commit(&mut self, batch: &ChangeBatch) -> Result<(), RunError> {
        let (mut touched, staged) = match self.large.take() {
            Some(txn) => (txn.touched, txn.staged),
            None => (self.engine.no_entities(), D::Staged::default()),
        };
        self.engine.apply(batch, &mut touched)?;
        let features = self
            .engine
            .compute_touched(touched, batch.commit_lsn, batch.commit_ts_micros)
            .await?;
        let mut writes: Writes = raw_writes(&*self.sink, self.schemas, batch)?
            .into_iter()
            .map(|(path, rows)| (path, vec![rows]))
            .collect();
        writes.extend(feature_writes(features));
        self.sink
            .commit(writes, batch.end_lsn, staged)
            .await
            .map_err(raw_write_error)
    }
}

/// The batch's raw rows by raw table. After a crash between table commits, a table
/// keeps only the transactions it lacks.
fn raw_writes<D: Destination>(
    sink: &D,
    schemas: &[TableSchema],
    batch: &ChangeBatch,
) -> Result<Vec<(LakeTable, RecordBatch)>, RunError> {
    let mut out = Vec::new();
    for (schema, rows) in schemas.iter().zip(&batch.tables) {
        let Some(changes) = rows else { continue };
        let path = LakeTable::raw_of(&schema.name);
        let rows = not_yet_committed(changes.rows(), sink.resume_point().committed(&path))?;
        out.push((path, rows));
    }
    Ok(out)
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

/// Rows whose transaction commits at or after `committed` (an end LSN already in the table).
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

    /// The CRM's tables, with the columns the seed features read.
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
