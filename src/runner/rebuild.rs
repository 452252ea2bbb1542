//! State recovery without a re-snapshot: the current image of each source table is
//! the latest change of each primary key in its raw mirror, up to the resume point. A
//! table's state checkpoint, when there is a usable one, stands in for its rows below
//! the checkpoint's LSN ([`crate::sink::checkpoint`]), so a restart reads the keys plus
//! the changes since, not the whole history.

use super::RunError;
use crate::changelog::{self, Lsn, Op, TableId, LSN, OP};
use crate::config::quote_ident;
use crate::features::{FeatureEngine, FeatureError};
use crate::serve::Online;
use crate::sink::checkpoint::{self, Checkpoint};
use crate::sink::{DeltaSink, Lake, LakeTable};
use crate::source::TableSchema;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
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
    let (lsn, op) = (quote_ident(LSN), quote_ident(OP));
    for (t, schema) in schemas.iter().enumerate() {
        let path = LakeTable::raw_of(&schema.name);
        let ctx = session_over(tables(&path), &path, "raw").await?;

        let truncate = checkpoint::last_truncate(&ctx, "raw", resume_at)
            .await
            .map_err(|e| RunError::Rebuild {
                table: path.clone(),
                source: Box::new(e),
            })?;
        let after_truncate = truncate.map(checkpoint::after_truncate).unwrap_or_default();
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
            load_checkpoint(ck, &path, &want, &mut load).await?;
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

/// Hands every row of `path`'s checkpoint `ck`, cast to `want`, to `load`.
async fn load_checkpoint(
    ck: Checkpoint,
    path: &LakeTable,
    want: &SchemaRef,
    load: &mut impl FnMut(&RecordBatch) -> Result<(), RunError>,
) -> Result<(), RunError> {
    let ctx = session_over(Some(ck.table), &LakeTable::checkpoint_of(path), "ck").await?;
    stream_rows(&ctx, "SELECT * FROM ck", path, want, load).await
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
            load_checkpoint(ck, &path, &want, &mut load).await?;
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
