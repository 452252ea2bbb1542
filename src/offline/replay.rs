//! Replay of the raw change log through the feature engine, as the stream would have
//! computed it one source transaction at a time: the snapshot's features first, then,
//! per transaction, the features of the entities it touched, stamped with its commit
//! LSN and time.
//!
//! Running the feature SQL once per transaction would cost a query per transaction.
//! Instead consecutive transactions are grouped while no entity is touched twice and
//! their `as_of_date()` is the same: an entity's rows then hold, after the group, exactly
//! what they held after the one transaction that touched it, so one query for the group
//! gives every entity the value the stream would have given it then, and each row is
//! stamped with its own transaction.

use super::OfflineError;
use crate::batch::{BatchKind, ChangeBatch};
use crate::changelog::{self, Changes, Lsn, COMMIT_TS, LSN, SEQ};
use crate::config::quote_ident;
use crate::features::{FeatureEngine, FeatureRows, Touched};
use crate::sink::LakeTable;
use crate::source::TableSchema;
use crate::state::{key_at, Key};
use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::{Int64Type, SchemaRef, TimestampMicrosecondType};
use datafusion::common::HashMap;
use datafusion::physical_plan::SendableRecordBatchStream;
use deltalake::DeltaTable;
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Entities one group's query computes at most (as the snapshot's chunks).
const MAX_GROUP_ENTITIES: usize = 8_192;

/// What to replay: the raw tables and the range of the log.
pub(crate) struct ReplayInput<'a> {
    pub schemas: &'a [TableSchema],
    pub raw: &'a std::collections::HashMap<LakeTable, DeltaTable>,
    /// The snapshot's consistent LSN (its rows sit just below it).
    pub snapshot: Lsn,
    /// Transactions whose commit LSN is below this are replayed.
    pub until: Lsn,
    /// Feature files (by position) whose rows are wanted.
    pub files: &'a [usize],
}

/// The rows a replay gives, per wanted feature file (in `files` order), and its counts.
pub(crate) struct Replayed {
    pub rows: Vec<Vec<RecordBatch>>,
    pub stats: ReplayStats,
}

#[derive(Debug, Clone, Default)]
pub struct ReplayStats {
    pub snapshot_rows: usize,
    pub transactions: usize,
    /// Change rows replayed after the snapshot.
    pub changes: usize,
    /// Feature queries run for the transactions (one per group and file).
    pub groups: usize,
    /// Entities an earlier transaction of the same group touched again only through
    /// the state after the later one (none expected): their earlier row is not written.
    pub merged: usize,
    pub snapshot_time: Duration,
    pub replay_time: Duration,
}

/// Replays the raw log of `input` through `engine` (whose state must be empty).
pub(crate) async fn replay(
    engine: &FeatureEngine,
    input: ReplayInput<'_>,
    progress: &indicatif::ProgressBar,
) -> Result<Replayed, OfflineError> {
    let started = Instant::now();
    let mut stats = ReplayStats::default();
    let names: Vec<String> = engine
        .output_schemas()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut out = Output {
        names: &names,
        files: input.files,
        rows: vec![Vec::new(); input.files.len()],
    };

    // The snapshot: state as it was loaded, every entity computed, as the stream did.
    crate::runner::rebuild_state(
        engine,
        None,
        &|p| input.raw.get(p).cloned(),
        input.schemas,
        input.snapshot,
    )
    .await?;
    stats.snapshot_rows = engine.state().sizes().iter().sum();
    let taken_at = snapshot_time(&input).await?;
    for f in engine.compute_all(input.snapshot, taken_at).await? {
        if let Some((_, i)) = out.slot_of(&f.table) {
            out.rows[i].push(f.batch);
        }
    }
    stats.snapshot_time = started.elapsed();
    tracing::info!(
        rows = stats.snapshot_rows,
        elapsed_ms = stats.snapshot_time.as_millis() as u64,
        "snapshot replayed"
    );

    // Then the transactions, in commit order.
    let replay_started = Instant::now();
    let mut log = RawLog::open(&input).await?;
    let mut group = Group::new(engine, names.len());
    let wanted = |file: usize| input.files.contains(&file);
    while let Some(txn) = log.next_transaction().await? {
        stats.transactions += 1;
        stats.changes += txn.rows;
        progress.inc(txn.rows as u64);
        let as_of = engine.as_of_days(txn.commit_ts_micros);
        if group.as_of.is_some_and(|d| d != as_of) || group.entities >= MAX_GROUP_ENTITIES {
            group.flush(engine, &mut out, &mut stats).await?;
        }
        let mut touched = engine.no_entities();
        let before = engine.touch_before(&txn, &mut touched);
        touched.retain_files(wanted);
        if touched.overlaps(&group.touched) {
            group.flush(engine, &mut out, &mut stats).await?;
        }
        engine.apply_touched(&txn, before, &mut touched)?;
        touched.retain_files(wanted);
        if touched.overlaps(&group.touched) {
            stats.merged += 1;
        }
        group.add(&touched, txn.commit_lsn, txn.commit_ts_micros, as_of);
    }
    group.flush(engine, &mut out, &mut stats).await?;
    stats.replay_time = replay_started.elapsed();
    if stats.merged > 0 {
        tracing::warn!(
            transactions = stats.merged,
            "transactions touched an entity of their group only through the state after them: \
             that entity's row of the earlier transaction is missing (verify shows whether it matters)"
        );
    }
    Ok(Replayed {
        rows: out.rows,
        stats,
    })
}

/// Where computed rows go: the wanted files' row lists.
struct Output<'a> {
    /// Every feature file's name, in the engine's order.
    names: &'a [String],
    /// The wanted files (positions in `names`).
    files: &'a [usize],
    rows: Vec<Vec<RecordBatch>>,
}

impl Output<'_> {
    /// The file's position in the engine and in `rows`, if it is wanted.
    fn slot_of(&self, table: &str) -> Option<(usize, usize)> {
        let file = self.names.iter().position(|n| n == table)?;
        Some((file, self.files.iter().position(|&f| f == file)?))
    }
}

/// The commit time the snapshot's rows carry (the time it was taken).
async fn snapshot_time(input: &ReplayInput<'_>) -> Result<i64, OfflineError> {
    let at = changelog::snapshot_row_lsn(input.snapshot).as_i64();
    let mut newest = 0i64;
    for schema in input.schemas {
        let path = LakeTable::raw_of(&schema.name);
        let ctx = crate::runner::session_over(input.raw.get(&path).cloned(), &path, "raw").await?;
        let sql = format!(
            "SELECT max({ts}) FROM raw WHERE {lsn} = {at}",
            ts = quote_ident(COMMIT_TS),
            lsn = quote_ident(LSN),
        );
        let batches = super::collect_sql(&ctx, &sql, &path).await?;
        for b in batches.iter().filter(|b| b.num_rows() > 0) {
            let c = arrow::compute::cast(
                b.column(0),
                &arrow::datatypes::DataType::Timestamp(
                    arrow::datatypes::TimeUnit::Microsecond,
                    None,
                ),
            )?;
            let c = c.as_primitive::<TimestampMicrosecondType>();
            if c.is_valid(0) {
                newest = newest.max(c.value(0));
            }
        }
    }
    Ok(newest)
}

/// Transactions grouped for one query per feature file.
struct Group {
    touched: Touched,
    /// Per feature file (by position), per entity: the commit LSN and time of the
    /// transaction that touched it (the later one, if two did).
    stamps: Vec<HashMap<Key, (i64, i64)>>,
    as_of: Option<i32>,
    /// Commit time of one of the group's transactions (they share the as-of date).
    commit_ts: i64,
    entities: usize,
}

impl Group {
    fn new(engine: &FeatureEngine, files: usize) -> Group {
        Group {
            touched: engine.no_entities(),
            stamps: vec![HashMap::new(); files],
            as_of: None,
            commit_ts: 0,
            entities: 0,
        }
    }

    fn add(&mut self, touched: &Touched, lsn: Lsn, commit_ts: i64, as_of: i32) {
        for (file, stamps) in self.stamps.iter_mut().enumerate() {
            for k in touched.of_file(file) {
                stamps.insert(k.clone(), (lsn.as_i64(), commit_ts));
            }
        }
        self.touched.extend(touched);
        self.entities = self.touched.len();
        self.as_of = Some(as_of);
        self.commit_ts = commit_ts;
    }

    /// Computes the group's entities on the current state and stamps each row with its
    /// transaction; starts an empty group.
    async fn flush(
        &mut self,
        engine: &FeatureEngine,
        out: &mut Output<'_>,
        stats: &mut ReplayStats,
    ) -> Result<(), OfflineError> {
        if self.touched.is_empty() {
            self.as_of = None;
            return Ok(());
        }
        let touched = std::mem::replace(&mut self.touched, engine.no_entities());
        let computed: Vec<FeatureRows> = engine
            .compute_touched(touched, Lsn::ZERO, self.commit_ts)
            .await?;
        for f in computed {
            let Some((file, i)) = out.slot_of(&f.table) else {
                continue;
            };
            stats.groups += 1;
            out.rows[i].push(restamp(&f.batch, &self.stamps[file])?);
        }
        self.stamps.iter_mut().for_each(HashMap::clear);
        self.as_of = None;
        self.entities = 0;
        Ok(())
    }
}

/// `batch` with each row's `_lsn` and `_commit_ts` those of its entity's transaction.
fn restamp(
    batch: &RecordBatch,
    stamps: &HashMap<Key, (i64, i64)>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let schema = batch.schema();
    let (mut lsns, mut times) = (Vec::new(), Vec::new());
    for row in 0..batch.num_rows() {
        let (l, t) = stamps
            .get(&key_at(batch.column(0), row))
            .copied()
            .expect("every computed entity was touched by a transaction of the group");
        lsns.push(l);
        times.push(t);
    }
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    let lsn_at = schema.index_of(crate::features::LSN)?;
    let ts_at = schema.index_of(crate::features::COMMIT_TS)?;
    cols[lsn_at] = Arc::new(Int64Array::from(lsns));
    cols[ts_at] = Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC"));
    RecordBatch::try_new(schema, cols)
}

/// Every raw table's change rows in the replayed range, sorted by (`_lsn`, `_seq`),
/// read one transaction at a time.
struct RawLog {
    cursors: Vec<Cursor>,
}

/// One raw table's sorted rows: the batch being read and the next row in it.
struct Cursor {
    stream: SendableRecordBatchStream,
    want: SchemaRef,
    path: LakeTable,
    batch: Option<RecordBatch>,
    row: usize,
}

impl Cursor {
    /// The `_lsn` of the next row, reading the next batch when this one is used up.
    async fn head(&mut self) -> Result<Option<i64>, OfflineError> {
        loop {
            if let Some(b) = &self.batch {
                if self.row < b.num_rows() {
                    return Ok(Some(lsns(b).value(self.row)));
                }
            }
            match self.stream.next().await {
                None => {
                    self.batch = None;
                    return Ok(None);
                }
                Some(b) => {
                    let b = b.map_err(|e| OfflineError::Read {
                        table: self.path.clone(),
                        source: Box::new(e),
                    })?;
                    let b =
                        crate::runner::conform(&b, &self.want).map_err(|m| OfflineError::Read {
                            table: self.path.clone(),
                            source: m.into(),
                        })?;
                    self.batch = Some(b);
                    self.row = 0;
                }
            }
        }
    }

    /// The rows at the head whose `_lsn` is `lsn` (one transaction's, in `_seq` order).
    async fn take(&mut self, lsn: i64) -> Result<Vec<RecordBatch>, OfflineError> {
        let mut out = Vec::new();
        while self.head().await? == Some(lsn) {
            let b = self.batch.as_ref().expect("head read a batch");
            let l = lsns(b);
            let mut end = self.row;
            while end < b.num_rows() && l.value(end) == lsn {
                end += 1;
            }
            out.push(b.slice(self.row, end - self.row));
            self.row = end;
        }
        Ok(out)
    }
}

fn lsns(b: &RecordBatch) -> &arrow::array::PrimitiveArray<Int64Type> {
    b.column_by_name(LSN)
        .expect("raw rows have _lsn")
        .as_primitive::<Int64Type>()
}

impl RawLog {
    async fn open(input: &ReplayInput<'_>) -> Result<RawLog, OfflineError> {
        let (lsn, seq) = (quote_ident(LSN), quote_ident(SEQ));
        let mut cursors = Vec::new();
        for schema in input.schemas {
            let path = LakeTable::raw_of(&schema.name);
            let ctx =
                crate::runner::session_over(input.raw.get(&path).cloned(), &path, "raw").await?;
            let sql = format!(
                "SELECT * FROM raw WHERE {lsn} >= {from} AND {lsn} < {until} ORDER BY {lsn}, {seq}",
                from = input.snapshot.as_i64(),
                until = input.until.as_i64(),
            );
            let read = |e: datafusion::error::DataFusionError| OfflineError::Read {
                table: path.clone(),
                source: Box::new(e),
            };
            let stream = ctx
                .sql(&sql)
                .await
                .map_err(read)?
                .execute_stream()
                .await
                .map_err(read)?;
            cursors.push(Cursor {
                stream,
                want: changelog::raw_schema(&schema.schema),
                path,
                batch: None,
                row: 0,
            });
        }
        Ok(RawLog { cursors })
    }

    /// The next transaction as a change batch, or none at the end of the range.
    async fn next_transaction(&mut self) -> Result<Option<ChangeBatch>, OfflineError> {
        let mut next: Option<i64> = None;
        for c in &mut self.cursors {
            if let Some(l) = c.head().await? {
                next = Some(next.map_or(l, |n| n.min(l)));
            }
        }
        let Some(lsn) = next else { return Ok(None) };
        let mut tables = Vec::with_capacity(self.cursors.len());
        let (mut rows, mut commit_ts) = (0, 0);
        for c in &mut self.cursors {
            let parts = c.take(lsn).await?;
            if parts.is_empty() {
                tables.push(None);
                continue;
            }
            let b = arrow::compute::concat_batches(&c.want, &parts)?;
            let ts = b
                .column_by_name(COMMIT_TS)
                .expect("raw rows have _commit_ts")
                .as_primitive::<TimestampMicrosecondType>();
            commit_ts = ts.value(0);
            rows += b.num_rows();
            let changes = Changes::decode(b).map_err(|e| OfflineError::Read {
                table: c.path.clone(),
                source: Box::new(e),
            })?;
            tables.push(Some(changes));
        }
        let n = tables.len();
        Ok(Some(ChangeBatch {
            kind: BatchKind::Transactions,
            tables,
            // The raw log keeps commit LSNs only; nothing here acknowledges.
            end_lsn: Lsn::from_i64(lsn),
            commit_lsn: Lsn::from_i64(lsn),
            commit_ts_micros: commit_ts,
            transactions: 1,
            rows,
            first_received: Instant::now(),
            unchanged_toast: vec![Vec::new(); n],
        }))
    }
}
