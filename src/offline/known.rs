//! Known time: for each spine row, the feature row the pipeline wrote for its entity
//! with the highest `_lsn` among those committed at or before the row's time.

use super::output::Picked;
use super::spine::Spine;
use super::{OfflineError, TrainingSetSummary};
use crate::config::{quote_ident, FeatureFile, COMPUTED_AT, DELETED, OUTPUT_COMMIT_TS, OUTPUT_LSN};
use crate::sink::{Lake, LakeTable};
use crate::state::{key_at, Key};
use arrow::array::{new_null_array, Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimestampMicrosecondType};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The feature table's schema as the lake holds it.
pub(crate) async fn feature_schema(
    lake: &Lake,
    path: &LakeTable,
) -> Result<SchemaRef, OfflineError> {
    let table = lake.existing_table(path).await?;
    let snapshot = table.snapshot().map_err(|e| read_err(path, e))?;
    Ok(snapshot.snapshot().arrow_schema())
}

fn read_err(table: &LakeTable, e: impl std::error::Error + Send + Sync + 'static) -> OfflineError {
    OfflineError::Read {
        table: table.clone(),
        source: Box::new(e),
    }
}

/// One feature row of a spine entity: where it is and when it became known.
struct Candidate {
    commit_ts: i64,
    lsn: i64,
    batch: usize,
    row: usize,
}

/// One entity's candidates: their known times in order, and at each position the
/// (batch, row) with the highest LSN so far.
type Timeline = (Vec<i64>, Vec<(usize, usize)>);

/// Picks each spine row's feature row from `file`'s table (at `version`, or the latest)
/// and returns the picked feature columns plus `_lsn` and `_commit_ts`.
pub(crate) async fn join(
    lake: &Lake,
    file: &FeatureFile,
    spine: &Spine,
    version: Option<u64>,
    summary: &mut TrainingSetSummary,
) -> Result<Picked, OfflineError> {
    let path = LakeTable::features(&file.name);
    let mut table: DeltaTable = lake.existing_table(&path).await?;
    if let Some(v) = version {
        table
            .load_version(v)
            .await
            .map_err(|e| read_err(&path, e))?;
    }
    summary.table_version = table.version();

    let have = table
        .snapshot()
        .map_err(|e| read_err(&path, e))?
        .snapshot()
        .arrow_schema();
    // Rows written before `_commit_ts` existed are known from `computed_at`: a row is
    // computed after its commit, so that time is later, never earlier (nothing leaks).
    let has_commit_ts = have.field_with_name(OUTPUT_COMMIT_TS).is_ok();
    let wanted: HashSet<&Key> = spine.keys.iter().filter(|k| **k != Key::Null).collect();
    // Rows known after the latest spine time can be no row's pick.
    let latest = (0..spine.len()).filter_map(|i| spine.instant(i)).max();
    let mut columns = vec![quote_ident(&file.entity.key)];
    columns.extend(file.features.iter().map(|f| quote_ident(&f.name)));
    columns.extend([OUTPUT_LSN, DELETED, COMPUTED_AT].map(quote_ident));
    if has_commit_ts {
        columns.push(quote_ident(OUTPUT_COMMIT_TS));
    }
    let ctx = SessionContext::new();
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| read_err(&path, e))?;
    let provider = table
        .table_provider()
        .await
        .map_err(|e| read_err(&path, e))?;
    ctx.register_table("f", provider)
        .map_err(|e| read_err(&path, e))?;
    let mut stream = ctx
        .sql(&format!("SELECT {} FROM f", columns.join(", ")))
        .await
        .map_err(|e| read_err(&path, e))?
        .execute_stream()
        .await
        .map_err(|e| read_err(&path, e))?;
    let n = file.features.len();
    let read = stream.schema();
    // What is kept of each batch: key, features, _lsn, _commit_ts, _deleted, known at.
    let mut fields: Vec<Field> = read.fields()[..=n]
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(OUTPUT_LSN, DataType::Int64, false));
    fields.push(Field::new(OUTPUT_COMMIT_TS, utc(), true));
    fields.push(Field::new(DELETED, DataType::Boolean, false));
    fields.push(Field::new("known_at", utc(), false));
    let schema = Arc::new(Schema::new(fields));

    let progress = indicatif::ProgressBar::new_spinner()
        .with_message(format!("reading features/{}", file.name));
    let key_type = have
        .field_with_name(&file.entity.key)
        .map_err(|e| read_err(&path, e))?
        .data_type()
        .clone();
    let mut kept: Vec<RecordBatch> = Vec::new();
    let mut by_key: HashMap<Key, Vec<Candidate>> = HashMap::new();
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| read_err(&path, e))?;
        progress.inc(b.num_rows() as u64);
        let keys = cast(b.column(0), &key_type)?;
        let keys: Vec<Key> = (0..b.num_rows()).map(|i| key_at(&keys, i)).collect();
        let b = known_times(&b, n, has_commit_ts, &schema)?;
        // The spine's entities, known by the latest spine time.
        let known = b.column(n + 4).as_primitive::<TimestampMicrosecondType>();
        let mask: BooleanArray = keys
            .iter()
            .zip(known.values())
            .map(|(k, t)| Some(wanted.contains(k) && latest.is_some_and(|l| *t <= l)))
            .collect();
        let keys: Vec<Key> = keys
            .into_iter()
            .zip(mask.values().iter())
            .filter_map(|(k, keep)| keep.then_some(k))
            .collect();
        let b = arrow::compute::filter_record_batch(&b, &mask)?;
        if b.num_rows() == 0 {
            continue;
        }
        summary.rows_known_by_computed_at += b.column(n + 2).null_count();
        let lsn = b.column(n + 1).as_primitive::<Int64Type>();
        let known = b.column(n + 4).as_primitive::<TimestampMicrosecondType>();
        for (row, key) in keys.into_iter().enumerate() {
            by_key.entry(key).or_default().push(Candidate {
                commit_ts: known.value(row),
                lsn: lsn.value(row),
                batch: kept.len(),
                row,
            });
        }
        kept.push(b);
    }
    progress.finish_and_clear();

    // Per key: candidates in commit-time order, and at each position the one with the
    // highest LSN so far (commit times follow LSN order only nearly).
    let mut best: HashMap<Key, Timeline> = HashMap::with_capacity(by_key.len());
    for (key, mut c) in by_key {
        c.sort_by_key(|c| (c.commit_ts, c.lsn));
        let mut top: Vec<usize> = Vec::with_capacity(c.len());
        for (i, cand) in c.iter().enumerate() {
            top.push(match top.last() {
                Some(&p) if c[p].lsn > cand.lsn => p,
                _ => i,
            });
        }
        let times = c.iter().map(|c| c.commit_ts).collect();
        let picked = top.into_iter().map(|i| (c[i].batch, c[i].row)).collect();
        best.insert(key, (times, picked));
    }

    let mut picks = Vec::with_capacity(spine.len());
    for i in 0..spine.len() {
        let key = &spine.keys[i];
        let Some(at) = spine.instant(i).filter(|_| *key != Key::Null) else {
            summary.no_key_or_time += 1;
            picks.push(None);
            continue;
        };
        let pick = best.get(key).and_then(|(times, picked)| {
            let p = times.partition_point(|t| *t <= at);
            (p > 0).then(|| picked[p - 1])
        });
        match pick {
            None => summary.missing += 1,
            Some((b, r)) if kept[b].column(n + 3).as_boolean().value(r) => summary.deleted += 1,
            Some(_) => summary.matched += 1,
        }
        picks.push(pick);
    }
    // The features, then where they came from.
    let fields: Vec<Field> = schema.fields()[1..n + 3]
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    Ok(Picked::from_rows(&kept, 1..n + 3, &picks, fields)?)
}

/// `b` (key, features, `_lsn`, `_deleted`, `computed_at`[, `_commit_ts`]) as `schema`:
/// key, features, `_lsn`, `_commit_ts` (NULL where the row has none), `_deleted`, and
/// when the row was known: its commit time, else its `computed_at`.
fn known_times(
    b: &RecordBatch,
    n: usize,
    has_commit_ts: bool,
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let computed_at = cast(b.column(n + 3), &utc())?;
    let commit_ts = match has_commit_ts {
        true => cast(b.column(n + 4), &utc())?,
        false => new_null_array(&utc(), b.num_rows()),
    };
    let known_at = arrow::compute::kernels::zip::zip(
        &arrow::compute::is_not_null(&commit_ts)?,
        &commit_ts,
        &computed_at,
    )?;
    let mut columns: Vec<ArrayRef> = b.columns()[..=n].to_vec();
    columns.push(cast(b.column(n + 1), &DataType::Int64)?);
    columns.push(commit_ts);
    columns.push(b.column(n + 2).clone());
    columns.push(known_at);
    RecordBatch::try_new(schema.clone(), columns)
}

fn utc() -> DataType {
    DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()))
}
