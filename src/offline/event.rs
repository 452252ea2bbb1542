//! Event time: the features recomputed through the feature engine with `as_of_date()` =
//! each spine row's date, over the source rows as the lake's raw mirror holds them.

use super::output::Picked;
use super::spine::Spine;
use super::{OfflineError, TrainingSetSummary};
use crate::changelog::Lsn;
use crate::config::{FeatureFile, Pipeline, DELETED};
use crate::sink::LakeTable;
use crate::state::{key_at, Key};
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Field;
use datafusion::common::HashSet;
use deltalake::DeltaTable;
use std::collections::{BTreeMap, HashMap};

/// Entities per query (as the stream's snapshot computes them).
const CHUNK: usize = 8_192;

/// Recomputes `file`'s features for every spine row at its date.
pub(crate) async fn recompute(
    pipeline: &Pipeline,
    file: &FeatureFile,
    spine: &Spine,
    summary: &mut TrainingSetSummary,
) -> Result<Picked, OfflineError> {
    summary.leaking = file
        .features
        .iter()
        .filter_map(|f| {
            Some((
                f.name.clone(),
                f.leaks_in_event_time.as_deref()?.trim().to_string(),
            ))
        })
        .collect();
    // The source's schemas plan the features (as `run` does); the rows come from the lake.
    let prepared = crate::runner::prepare(pipeline).await?;
    let engine = prepared.engine;
    // The raw tables commit one by one: a running pipeline may have written a
    // transaction to some and not yet to others. What the slot acknowledged is in all of
    // them (a restart rebuilds state to the same point); without a slot nothing writes.
    // Read before the tables are, so that they hold at least that.
    let slot = pipeline.slot_name(&prepared.conn.database);
    let bound = crate::source::slot_status(&prepared.client, &slot)
        .await
        .map_err(crate::runner::RunError::from)?
        .and_then(|s| s.confirmed_flush_lsn);
    summary.raw_lsn_bound = bound;
    let lake = pipeline.config.lake.open()?;
    let mut raw: HashMap<LakeTable, DeltaTable> = HashMap::new();
    for schema in &prepared.schemas {
        let path = LakeTable::raw_of(&schema.name);
        let table = lake.existing_table(&path).await?;
        summary
            .raw_versions
            .push((schema.name.name.clone(), table.version().unwrap_or(0)));
        raw.insert(path, table);
    }
    let started = std::time::Instant::now();
    let rows = crate::runner::rebuild_state(
        &engine,
        None,
        &|p| raw.get(p).cloned(),
        &prepared.schemas,
        bound.unwrap_or(Lsn::from_i64(i64::MAX)),
    )
    .await?;
    drop(raw);
    tracing::info!(
        rows,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "source rows loaded from the raw mirror"
    );

    // The spine's entities per date, each date computed once.
    let mut by_date: BTreeMap<i32, HashSet<Key>> = BTreeMap::new();
    for i in 0..spine.len() {
        match (&spine.keys[i], spine.date(i)) {
            (Key::Null, _) | (_, None) => {}
            (key, Some(d)) => {
                by_date.entry(d).or_default().insert(key.clone());
            }
        }
    }
    let progress = indicatif::ProgressBar::new(by_date.len() as u64).with_message("dates");
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg:>8} {bar:30} {pos}/{len} ({eta} left)")
            .expect("valid template"),
    );
    let n = file.features.len();
    let mut computed: Vec<RecordBatch> = Vec::with_capacity(by_date.len());
    // (date, key) → (batch, row) of a live entity; `false` for an entity state lacks.
    let mut found: HashMap<(i32, Key), Option<(usize, usize)>> = HashMap::new();
    for (date, keys) in by_date {
        // Chunked, so that a date with very many entities does not hold them all at once.
        let keys: Vec<Key> = keys.into_iter().collect();
        for chunk in keys.chunks(CHUNK) {
            let chunk: HashSet<Key> = chunk.iter().cloned().collect();
            let batch = engine
                .compute_as_of(&file.name, chunk, date, Lsn::ZERO)
                .await?;
            let deleted = batch
                .column_by_name(DELETED)
                .expect("feature rows have _deleted")
                .as_boolean();
            for row in 0..batch.num_rows() {
                let at = (!deleted.value(row)).then_some((computed.len(), row));
                found.insert((date, key_at(batch.column(0), row)), at);
            }
            computed.push(batch);
        }
        progress.inc(1);
    }
    progress.finish_and_clear();

    let mut picks = Vec::with_capacity(spine.len());
    for i in 0..spine.len() {
        let pick = match spine.date(i).filter(|_| spine.keys[i] != Key::Null) {
            None => {
                summary.no_key_or_time += 1;
                None
            }
            Some(d) => match found.get(&(d, spine.keys[i].clone())) {
                Some(Some(at)) => {
                    summary.matched += 1;
                    Some(*at)
                }
                _ => {
                    summary.deleted += 1;
                    None
                }
            },
        };
        picks.push(pick);
    }
    let schema = engine
        .output_schemas()
        .into_iter()
        .find(|(name, _)| *name == file.name)
        .map(|(_, s)| s)
        .expect("the engine plans every feature file");
    let fields: Vec<Field> = schema.fields()[1..=n]
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    Ok(Picked::from_rows(&computed, 1..n + 1, &picks, fields)?)
}
