//! The snapshot writer: the initial (or a re-)snapshot into state and every table.

use super::processor::feature_writes;
use super::RunError;
use crate::changelog::{self, Lsn};
use crate::features::FeatureEngine;
use crate::serve::Online;
use crate::sink::{Destination, LakeTable};
use crate::source::{InitialSnapshot, TableSchema};
use std::time::Instant;

/// Loads the snapshot into state and commits the raw tables, then computes every
/// entity's features and commits them, all at the consistent LSN; returns the rows
/// copied. State loads on a thread of its own while the raw tables encode and commit
/// (both read the copied rows, neither changes them); the features wait for both, so
/// that the snapshot's rows have left memory before the features' working set joins
/// the state.
pub(crate) async fn write_snapshot<D: Destination>(
    engine: &FeatureEngine,
    sink: &mut D,
    schemas: &[TableSchema],
    snap: InitialSnapshot,
    online: Option<&Online>,
) -> Result<usize, RunError> {
    let InitialSnapshot {
        consistent_lsn,
        tables,
        taken_at_micros,
    } = snap;
    let mut writes = Vec::new();
    let mut rows = 0;
    for (schema, batches) in schemas.iter().zip(&tables) {
        let raw = changelog::raw_schema(&schema.schema);
        let mut seq = 0i64;
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            out.push(changelog::snapshot_rows_as_changes(
                &raw,
                b,
                changelog::snapshot_row_lsn(consistent_lsn),
                taken_at_micros,
                seq,
            )?);
            seq += b.num_rows() as i64;
            rows += b.num_rows();
        }
        writes.push((LakeTable::raw_of(&schema.name), out));
    }
    let loading = engine.state().load_snapshot(tables);
    let committed = sink.write_snapshot_part(writes, consistent_lsn).await;
    let loaded = loading.await;
    committed?;
    loaded.map_err(crate::features::FeatureError::from)?;
    write_features(engine, sink, consistent_lsn, taken_at_micros, online).await?;
    Ok(rows)
}

/// Every entity's features on the loaded state, committed as the rest of the snapshot
/// (and loaded online).
async fn write_features<D: Destination>(
    engine: &FeatureEngine,
    sink: &mut D,
    lsn: Lsn,
    taken_at_micros: i64,
    online: Option<&Online>,
) -> Result<(), RunError> {
    let t0 = Instant::now();
    let features = engine.compute_all(lsn, taken_at_micros).await?;
    tracing::info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "features computed for every entity"
    );
    if let Some(online) = online {
        for f in &features {
            online.apply(&f.table, &f.batch);
        }
    }
    sink.write_snapshot(feature_writes(features), lsn).await?;
    Ok(())
}
