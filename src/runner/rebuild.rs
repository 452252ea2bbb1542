//! State recovery without a re-snapshot: the current image of each source table is
//! the latest change of each primary key in its raw mirror, up to the resume point. A
//! table's state checkpoint, when there is a usable one, stands in for its rows below
//! the checkpoint's LSN ([`crate::sink::checkpoint`]), so a restart reads the keys plus
//! the changes since, not the whole history.

use super::RunError;
use crate::changelog::{self, Lsn, Op, TableId, LSN, OP, SEQ};
use crate::config::quote_ident;
use crate::features::{FeatureEngine, FeatureError};
use crate::serve::Online;
use crate::sink::checkpoint::{self, Checkpoint};
use crate::sink::{DeltaSink, Lake, LakeTable};
use crate::source::TableSchema;
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, SchemaRef};
use datafusion::common::HashMap;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use futures::StreamExt;

/// Loads into `engine` each raw table's rows as of just before `resume_at`, and returns
/// how many rows state then holds. With `checkpoints`, the lake's state checkpoints
/// stand in for the rows below theirs (offline jobs pass `None`: they read raw tables
/// at the versions they pinned).
///
/// Only the last change of each key counts (an insert or update is the row, a delete
/// means none), after the table's last truncate. The raw rows stream in whatever order
/// the files give them and state keeps, per key, the change with the highest
/// (`_lsn`, `_seq`): memory follows the number of keys, not the raw tables' history (a
/// sorted replay of the whole change log held all of it).
pub(crate) async fn rebuild_state(
    engine: &FeatureEngine,
    checkpoints: Option<&Lake>,
    tables: &impl Fn(&LakeTable) -> Option<DeltaTable>,
    schemas: &[TableSchema],
    resume_at: Lsn,
) -> Result<usize, RunError> {
    let (lsn, seq, op) = (quote_ident(LSN), quote_ident(SEQ), quote_ident(OP));
    for (t, schema) in schemas.iter().enumerate() {
        let path = LakeTable::raw_of(&schema.name);
        let err = |e: Box<dyn std::error::Error + Send + Sync>| RunError::Rebuild {
            table: path.clone(),
            source: e,
        };
        let read_err = |e: datafusion::error::DataFusionError| err(Box::new(e));
        let ctx = session_over(tables(&path), &path, "raw").await?;

        let truncate = last_truncate(&ctx, (&lsn, &seq, &op), resume_at)
            .await
            .map_err(read_err)?;
        let after_truncate = match truncate {
            Some((l, s)) => format!(" AND ({lsn} > {l} OR ({lsn} = {l} AND {seq} > {s}))"),
            None => String::new(),
        };
        // A checkpoint stands in for the rows below its LSN, unless it holds rows the
        // stream will replay or a truncate after it made them history.
        let ck = match checkpoints {
            Some(lake) => usable(lake, &path, resume_at).await,
            None => None,
        };
        let ck = ck.filter(|c| truncate.is_none_or(|(l, _)| Lsn::from_i64(l) < c.lsn));
        let from = ck.as_ref().map_or(Lsn::ZERO, |c| c.lsn);
        let want = changelog::raw_schema(&schema.schema);
        let mut applied = HashMap::new();
        let mut load = |b: &RecordBatch| {
            engine
                .state()
                .load_unordered(TableId::new(t), b, &mut applied)
                .map_err(|e| RunError::from(FeatureError::from(e)))
        };
        if let Some(ck) = ck {
            let ck_path = LakeTable::checkpoint_of(&path);
            let ck_ctx = session_over(Some(ck.table), &ck_path, "ck").await?;
            stream_rows(&ck_ctx, "SELECT * FROM ck", &path, &want, &mut load).await?;
        }
        let sql = format!(
            "SELECT * FROM raw WHERE {lsn} >= {from} AND {lsn} < {resume} \
             AND {op} <> '{truncate}'{after_truncate}",
            from = from.as_i64(),
            resume = resume_at.as_i64(),
            truncate = Op::Truncate.as_str(),
        );
        stream_rows(&ctx, &sql, &path, &want, &mut load).await?;
    }
    Ok(engine.state().sizes().iter().sum())
}

/// Runs `sql` on `ctx` and hands each result batch, cast to `want`, to `load`.
async fn stream_rows(
    ctx: &SessionContext,
    sql: &str,
    path: &LakeTable,
    want: &SchemaRef,
    load: &mut impl FnMut(&RecordBatch) -> Result<(), RunError>,
) -> Result<(), RunError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| RunError::Rebuild {
        table: path.clone(),
        source: e,
    };
    let read_err = |e: datafusion::error::DataFusionError| err(Box::new(e));
    let mut stream = ctx
        .sql(sql)
        .await
        .map_err(read_err)?
        .execute_stream()
        .await
        .map_err(read_err)?;
    while let Some(b) = stream.next().await {
        let b = conform(&b.map_err(read_err)?, want).map_err(|m| err(m.into()))?;
        load(&b)?;
    }
    Ok(())
}

/// `table`'s state checkpoint, if there is one at or below `resume_at`. A checkpoint
/// that cannot be read is skipped (with a warning): the table's rows say the same.
async fn usable(lake: &Lake, table: &LakeTable, resume_at: Lsn) -> Option<Checkpoint> {
    match checkpoint::read(lake, table).await {
        Ok(Some(c)) if c.lsn <= resume_at => {
            tracing::info!(%table, lsn = %c.lsn, "rebuilding from the state checkpoint");
            Some(c)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(%table, error = %e, "state checkpoint unreadable; reading the whole table");
            None
        }
    }
}

/// Loads `online` with every entity's newest feature row in the lake (per feature
/// table, the row with the highest `_lsn`; a tombstone means no entity), streamed in
/// file order so that memory follows the entities, not the history. Returns the
/// entities loaded.
pub(crate) async fn rebuild_online(
    engine: &FeatureEngine,
    lake: &Lake,
    sink: &DeltaSink,
    online: &Online,
    resume_at: Lsn,
) -> Result<usize, RunError> {
    for (name, want) in engine.output_schemas() {
        let path = LakeTable::features(&name);
        let ck = usable(lake, &path, resume_at).await;
        let from = ck.as_ref().map_or(Lsn::ZERO, |c| c.lsn);
        let mut load = |b: &RecordBatch| {
            online.load(&name, b);
            Ok(())
        };
        if let Some(ck) = ck {
            let ck_path = LakeTable::checkpoint_of(&path);
            let ctx = session_over(Some(ck.table), &ck_path, "ck").await?;
            stream_rows(&ctx, "SELECT * FROM ck", &path, &want, &mut load).await?;
        }
        let ctx = session_over(sink.table(&path).cloned(), &path, "f").await?;
        let sql = format!(
            "SELECT * FROM f WHERE {} >= {}",
            quote_ident(LSN),
            from.as_i64()
        );
        stream_rows(&ctx, &sql, &path, &want, &mut load).await?;
    }
    Ok(online.sizes().iter().map(|(_, n)| n).sum())
}

/// A DataFusion session with the lake table `path` (`table`, if open) registered as
/// `alias`.
pub(crate) async fn session_over(
    table: Option<DeltaTable>,
    path: &LakeTable,
    alias: &str,
) -> Result<SessionContext, RunError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| RunError::Rebuild {
        table: path.clone(),
        source: e,
    };
    let table = table.ok_or_else(|| err("the table is not open".into()))?;
    let ctx = SessionContext::new();
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| err(Box::new(e)))?;
    let provider = table.table_provider().await.map_err(|e| err(Box::new(e)))?;
    ctx.register_table(alias, provider)
        .map_err(|e| err(Box::new(e)))?;
    Ok(ctx)
}

/// `(_lsn, _seq)` of the last truncate before `resume_at`, if any. `lsn`, `seq` and
/// `op` are the quoted column names.
async fn last_truncate(
    ctx: &SessionContext,
    (lsn, seq, op): (&str, &str, &str),
    resume_at: Lsn,
) -> datafusion::error::Result<Option<(i64, i64)>> {
    let batches = ctx
        .sql(&format!(
            "SELECT {lsn}, {seq} FROM raw WHERE {op} = '{truncate}' AND {lsn} < {resume} \
             ORDER BY {lsn} DESC, {seq} DESC LIMIT 1",
            resume = resume_at.as_i64(),
            truncate = Op::Truncate.as_str(),
        ))
        .await?
        .collect()
        .await?;
    let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let value = |c: usize| -> datafusion::error::Result<i64> {
        let column = arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Int64)?;
        Ok(column.as_primitive::<Int64Type>().value(0))
    };
    Ok(Some((value(0)?, value(1)?)))
}

/// Casts a batch read back from Delta (string views, timezone spellings) to `want`. A
/// nullable column the lake does not have yet was added to the source after these rows
/// were written (the stream announces it before the first row that carries it): NULL.
pub(crate) fn conform(b: &RecordBatch, want: &SchemaRef) -> Result<RecordBatch, String> {
    let mut cols = Vec::with_capacity(want.fields().len());
    for f in want.fields() {
        match b.column_by_name(f.name()) {
            Some(c) => {
                cols.push(arrow::compute::cast(c, f.data_type()).map_err(|e| e.to_string())?)
            }
            None if f.is_nullable() => {
                cols.push(arrow::array::new_null_array(f.data_type(), b.num_rows()))
            }
            None => return Err(format!("column {} missing", f.name())),
        }
    }
    RecordBatch::try_new(want.clone(), cols).map_err(|e| e.to_string())
}
