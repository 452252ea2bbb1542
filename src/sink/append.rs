//! One append, step by step, each step timed: the rows encoded to Parquet and uploaded,
//! one log entry naming them (with a compaction folded in when one is ready), then the
//! writer's snapshot moved to the new version. No post-commit checkpoint or log cleanup:
//! the maintainer does those off the commit path. The step times are in the
//! `pipeline_table_commit_step_seconds` metric and the `delta commit` debug line; they
//! show the cost of a commit staying flat as the table ages.

use super::compact::{Compaction, Folds};
use super::staged;
use super::{Lake, LakeTable, SinkError};
use arrow::array::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::Action;
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::{WriterProperties, WriterPropertiesBuilder};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::DeltaTable;
use std::time::Instant;

/// The table after an append.
pub(super) struct Appended {
    pub table: DeltaTable,
    /// Its files and log entry are fsynced (on a local lake); `false` when the commit
    /// went through delta-rs' own path (a schema change), which does not say what it
    /// wrote: then the caller syncs the filesystem.
    pub synced: bool,
}

/// The Parquet options every file the pipeline writes shares; `tune` adds a caller's own.
pub(super) fn parquet_properties(
    tune: impl FnOnce(WriterPropertiesBuilder) -> WriterPropertiesBuilder,
) -> WriterProperties {
    tune(
        WriterProperties::builder()
            .set_created_by(format!("pipeline {}", env!("CARGO_PKG_VERSION")))
            .set_compression(Compression::SNAPPY),
    )
    .build()
}

/// The table's files and options for an append's Parquet.
pub(super) fn writer_for(
    table: &DeltaTable,
) -> Result<RecordBatchWriter, deltalake::DeltaTableError> {
    Ok(RecordBatchWriter::for_table(table)?.with_writer_properties(parquet_properties(|b| b)))
}

/// Where an append goes: the table's path and kind, and what surrounds its commit.
pub(super) struct Target<'a> {
    pub path: &'a LakeTable,
    /// Follows its source's schema (new columns join it).
    pub evolves: bool,
    /// What the maintainer has ready to fold in.
    pub folds: Option<&'a Folds>,
    /// Where the written files are made durable.
    pub lake: &'a Lake,
}

/// Appends `batches` (after the files `writer` holds already, for a large transaction)
/// to `table` as one commit with `properties`, folding in what the target's folds have
/// ready.
pub(super) async fn append(
    mut table: DeltaTable,
    batches: Vec<RecordBatch>,
    writer: Option<RecordBatchWriter>,
    properties: CommitProperties,
    target: Target<'_>,
) -> Result<Appended, SinkError> {
    let Target {
        path,
        evolves,
        folds,
        lake,
    } = target;
    let derr = |source| SinkError::Delta {
        table: path.clone(),
        source,
    };
    let started = Instant::now();
    let mut writer = match writer {
        Some(w) => w,
        None => writer_for(&table).map_err(derr)?,
    };
    // `DeltaSink::prepare` conformed the batches to the lake's types already.
    for b in batches {
        staged::write_conformed(&mut writer, evolves, b)
            .await
            .map_err(derr)?;
    }
    let before = table.snapshot().map_err(derr)?.snapshot().arrow_schema();
    if writer.arrow_schema().fields() != before.fields() {
        // A source column was added: delta-rs' own commit writes the new schema with it.
        let mut writer = writer.with_commit_properties(properties);
        writer.flush_and_commit(&mut table).await.map_err(derr)?;
        return Ok(Appended {
            table,
            synced: false,
        });
    }
    let adds = writer.flush().await.map_err(derr)?;
    let files: Vec<String> = adds.iter().map(|a| a.path.clone()).collect();
    // The data before the log entry naming it, so that no crash leaves an entry
    // without its files.
    lake.sync_files(path, files.clone()).await?;
    let written = started.elapsed();
    let mut actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
    let compaction = folds.and_then(|f| f.take_compaction(path));
    let took_compaction = compaction.is_some();
    let mut folded = 0;
    if let Some(c) = compaction.filter(|c| c.still_applies(&table)) {
        folded = c.files_removed();
        actions.extend(Compaction::into_actions(c));
    }
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: None,
        predicate: None,
    };
    let logged = Instant::now();
    let post = CommitBuilder::from(properties)
        .with_actions(actions)
        .build(
            Some(table.snapshot().map_err(derr)?),
            table.log_store(),
            operation,
        )
        .into_prepared_commit_future()
        .await
        .map_err(derr)?
        .await
        .map_err(derr)?;
    let version = post.version;
    lake.sync_files(path, vec![LakeTable::commit_file(version)])
        .await?;
    let log = logged.elapsed();
    let moved = Instant::now();
    let finalized = post.await.map_err(derr)?;
    table.state = Some(finalized.snapshot());
    let snapshot = moved.elapsed();
    if let Ok(s) = table.snapshot() {
        metrics::gauge!(crate::metrics::TABLE_LIVE_FILES, "table" => path.to_string())
            .set(s.log_data().num_files() as f64);
    }
    if let Some(f) = folds.filter(|_| took_compaction) {
        // Landed, or dropped as stale: either way the maintainer plans the next one
        // from a snapshot at least this new.
        f.landed(path, version);
        metrics::counter!(crate::metrics::COMPACTED_FILES).increment(folded as u64);
    }
    for (step, took) in [("write", written), ("log", log), ("snapshot", snapshot)] {
        metrics::histogram!(crate::metrics::TABLE_COMMIT_STEP_SECONDS, "step" => step)
            .record(took.as_secs_f64());
    }
    tracing::debug!(table = %path, version, files = files.len(), folded,
        write_ms = written.as_secs_f64() * 1e3, log_ms = log.as_secs_f64() * 1e3,
        snapshot_ms = snapshot.as_secs_f64() * 1e3, "delta commit");
    Ok(Appended {
        table,
        synced: true,
    })
}
