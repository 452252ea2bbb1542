//! `pipeline backfill`: rebuilds the history of feature tables whose feature file was
//! added or changed, by replaying the raw change log from the snapshot through the same
//! feature engine ([`super::replay`]), and replaces each such table (schema included)
//! in one commit that says it holds what the other tables hold, so that `run` streams on.
//!
//! The pipeline must be stopped: its slot must not be in use. While the backfill runs,
//! `_pipeline/backfill-in-progress` names the tables it replaces, and `run` refuses to
//! start; a backfill stopped part-way is finished by running it again.

use super::replay::{self, ReplayInput, ReplayStats};
use super::verify::{self, Served, ServedReport, VerifyReport};
use super::OfflineError;
use crate::changelog::{Lsn, LSN};
use crate::config::{quote_ident, Pipeline};
use crate::sink::{LakeTable, Mark, TableProgress};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use deltalake::DeltaTable;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What `pipeline backfill` is asked for.
#[derive(Debug, Clone, Default)]
pub struct BackfillRequest {
    /// Feature files to rebuild even though their table matches (a changed query):
    /// feature table names or feature file paths. Those added or whose columns changed
    /// are rebuilt anyway.
    pub feature_files: Vec<String>,
    /// Compare every row the stream wrote with the replay first; write nothing unless
    /// they agree. With nothing to rebuild, checks every feature table.
    pub verify: bool,
    /// Replay (and verify) but write nothing.
    pub dry_run: bool,
}

/// Why a feature table is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The lake has no table for the feature file.
    Added,
    /// The table's columns differ from the feature file's (named: lake, file).
    ColumnsChanged {
        lake: Vec<String>,
        file: Vec<String>,
    },
    /// Named with `--feature-file`.
    Asked,
    /// An earlier backfill of it did not finish.
    Unfinished,
    /// Only verified (`--verify` with nothing to rebuild).
    VerifyOnly,
}

/// One feature table's part of a backfill.
#[derive(Debug, Clone)]
pub struct TableBackfill {
    pub table: String,
    pub reason: Reason,
    /// Rows of the rebuilt history.
    pub rows: usize,
    /// The Delta version written (none when nothing was written).
    pub version: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct BackfillSummary {
    pub tables: Vec<TableBackfill>,
    /// The snapshot the history starts from and the LSN it reaches (exclusive).
    pub snapshot: Lsn,
    pub until: Lsn,
    pub replay: ReplayStats,
    pub verify: Vec<VerifyReport>,
    /// With `--verify` and a decisions file whose audit table exists: each value served
    /// compared with the feature table at the served `_lsn`.
    pub served: Option<ServedReport>,
    /// Whether the tables were replaced.
    pub written: bool,
    pub write_time: Duration,
    pub elapsed: Duration,
}

impl BackfillSummary {
    /// Every verified table agreed with the stream, and what was served with the
    /// feature table.
    pub fn consistent(&self) -> bool {
        self.verify.iter().all(VerifyReport::is_consistent)
            && self.served.as_ref().is_none_or(ServedReport::is_consistent)
    }

    /// Source changes replayed per second (after the snapshot).
    pub fn changes_per_second(&self) -> f64 {
        self.replay.changes as f64 / self.replay.replay_time.as_secs_f64().max(1e-9)
    }
}

/// Runs a backfill of `pipeline`'s feature tables as `req` asks.
pub async fn backfill(
    pipeline: &Pipeline,
    req: &BackfillRequest,
) -> Result<BackfillSummary, OfflineError> {
    let started = Instant::now();
    let prepared = crate::runner::prepare(pipeline).await?;
    let engine = prepared.engine;
    let slot = pipeline.slot_name(&prepared.conn.database);
    // The slot's acknowledged position: every transaction before it is durable in every
    // raw table (a raw table's own txn version moves only when it gets rows), and `run`
    // streams on from it.
    let until = match slot_idle(&prepared.client, &slot).await? {
        Some(lsn) => lsn,
        None => {
            return Err(OfflineError::Request(format!(
                "replication slot `{slot}` does not exist: the lake cannot stream on from a \
                 backfill; rebuild it with `pipeline resnapshot <pipeline.yaml>`"
            )))
        }
    };
    let lake = pipeline.config.lake.open()?;
    let app_id = pipeline.app_id(&slot);

    // The snapshot the raw tables hold.
    let mut raw: HashMap<LakeTable, DeltaTable> = HashMap::new();
    let mut snapshots = Vec::new();
    for schema in &prepared.schemas {
        let path = LakeTable::raw_of(&schema.name);
        let table = lake.table(&path).await?;
        if table.version().is_none() {
            return Err(OfflineError::Request(format!(
                "the lake at {} has no {path}: a backfill replays the raw change log, which \
                 `pipeline run` writes first",
                lake.root()
            )));
        }
        let p = crate::sink::table_progress(&path, &table, &app_id).await?;
        snapshots.push((path.clone(), p.snapshot));
        raw.insert(path, table);
    }
    let snapshot = snapshots.first().map(|(_, s)| *s).unwrap_or_default();
    if snapshot.is_zero() || until < snapshot || snapshots.iter().any(|(_, s)| *s != snapshot) {
        let seen: Vec<String> = snapshots
            .iter()
            .map(|(p, s)| format!("{p} at {s}"))
            .collect();
        return Err(OfflineError::Request(format!(
            "the raw tables do not hold one complete snapshot of this pipeline's slot ({}; \
             slot at {until}): `pipeline run` finishes an interrupted snapshot first",
            seen.join(", ")
        )));
    }

    // Which feature tables: added, changed, asked for, or left unfinished.
    let schemas = engine.output_schemas();
    let previous_mark = lake.read_marker(Mark::BackfillInProgress).await?;
    let unfinished: Vec<String> = previous_mark
        .as_deref()
        .map(|body| serde_json::from_str(body).unwrap_or_default())
        .unwrap_or_default();
    let asked = resolve_asked(pipeline, &req.feature_files)?;
    let mut targets: Vec<(usize, Reason, Option<DeltaTable>)> = Vec::new();
    for (i, (name, schema)) in schemas.iter().enumerate() {
        let table = lake.table(&LakeTable::features(name)).await?;
        let existing = table.version().is_some().then_some(table);
        let empty = match &existing {
            None => true,
            // Created by a run that then refused to stream onto it.
            Some(t) => crate::sink::table_progress(&LakeTable::features(name), t, &app_id)
                .await?
                .committed
                .is_zero(),
        };
        let reason = match &existing {
            _ if empty => Some(Reason::Added),
            None => unreachable!("a missing table is empty"),
            Some(t) => {
                let lake_cols = column_names(&lake_schema(t, name)?);
                let file_cols = column_names(schema);
                if lake_cols != file_cols {
                    Some(Reason::ColumnsChanged {
                        lake: lake_cols,
                        file: file_cols,
                    })
                } else if asked.contains(&i) {
                    Some(Reason::Asked)
                } else if unfinished.contains(name) {
                    Some(Reason::Unfinished)
                } else {
                    None
                }
            }
        };
        if let Some(r) = reason {
            targets.push((i, r, existing));
        }
    }
    if targets.is_empty() && req.verify {
        for (i, (name, _)) in schemas.iter().enumerate() {
            let table = lake.existing_table(&LakeTable::features(name)).await?;
            targets.push((i, Reason::VerifyOnly, Some(table)));
        }
    }
    let mut summary = BackfillSummary {
        snapshot,
        until,
        ..Default::default()
    };
    if targets.is_empty() {
        summary.elapsed = started.elapsed();
        return Ok(summary);
    }
    let rebuilt: Vec<String> = targets
        .iter()
        .filter(|(_, r, _)| *r != Reason::VerifyOnly)
        .map(|(i, _, _)| schemas[*i].0.clone())
        .collect();
    let write = !req.dry_run && !rebuilt.is_empty();
    if write {
        // Before anything else: a run started meanwhile must not stream onto a table
        // whose history is about to be replaced. Then the slot again: a run that started
        // before the mark may have taken it since.
        let body = serde_json::to_string(&rebuilt).expect("names serialize");
        lake.put_marker(Mark::BackfillInProgress, body).await?;
        if let Err(e) = slot_idle(&prepared.client, &slot).await {
            restore_mark(&lake, previous_mark.as_deref()).await?;
            return Err(e);
        }
        // Their state checkpoints hold the old history's newest rows.
        let tables: Vec<LakeTable> = rebuilt.iter().map(LakeTable::features).collect();
        crate::sink::checkpoint::invalidate(&lake, &tables).await?;
    }
    tracing::info!(tables = ?rebuilt, %snapshot, %until, verify = req.verify, write, "backfill");

    let total = count_changes(&prepared.schemas, &raw, snapshot, until).await?;
    let progress = indicatif::ProgressBar::new(total as u64).with_message("changes");
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>8} {bar:30} {pos}/{len} ({per_sec}, {eta} left)",
        )
        .expect("valid template"),
    );
    let files: Vec<usize> = targets.iter().map(|(i, _, _)| *i).collect();
    let replayed = replay::replay(
        &engine,
        ReplayInput {
            schemas: &prepared.schemas,
            raw: &raw,
            snapshot,
            until,
            files: &files,
        },
        &progress,
    )
    .await?;
    progress.finish_and_clear();
    summary.replay = replayed.stats.clone();
    tracing::info!(
        transactions = summary.replay.transactions,
        changes = summary.replay.changes,
        groups = summary.replay.groups,
        elapsed_ms = summary.replay.replay_time.as_millis() as u64,
        changes_per_second = summary.changes_per_second() as u64,
        "raw log replayed"
    );

    if req.verify {
        for ((i, _, existing), rows) in targets.iter().zip(&replayed.rows) {
            let Some(table) = existing else { continue };
            let (name, schema) = &schemas[*i];
            let stream = read_stream_rows(table, name, schema).await?;
            if let Some(d) = pipeline.decisions.as_ref().filter(|d| d.features == *name) {
                summary.served = served_check(pipeline, &lake, d, name, stream.clone()).await?;
            }
            let report = verify::compare(name, stream, rows, (snapshot.as_i64(), until.as_i64()))?;
            tracing::info!(table = %name, compared = report.compared,
                mismatched = report.mismatched, missing = report.missing, "verified");
            summary.verify.push(report);
        }
    }

    let write = write && summary.consistent();
    if write {
        slot_idle(&prepared.client, &slot).await?;
    }
    let write_started = Instant::now();
    for ((i, reason, _), rows) in targets.into_iter().zip(replayed.rows) {
        let name = schemas[i].0.clone();
        let n = rows.iter().map(RecordBatch::num_rows).sum();
        let mut version = None;
        if write && reason != Reason::VerifyOnly {
            let table = crate::sink::replace_history(
                &lake,
                &app_id,
                &LakeTable::features(&name),
                rows,
                TableProgress {
                    committed: until,
                    snapshot,
                },
                &pipeline.config.lake.maintenance.table_properties(),
            )
            .await?;
            version = table.version();
            tracing::info!(table = %name, rows = n, ?version, "feature table replaced");
        }
        summary.tables.push(TableBackfill {
            table: name,
            reason,
            rows: n,
            version,
        });
    }
    summary.write_time = write_started.elapsed();
    summary.written = write;
    if write {
        lake.remove_marker(Mark::BackfillInProgress).await?;
    } else if !req.dry_run && !rebuilt.is_empty() {
        // Verification failed, nothing replaced: the mark as it was before this run (an
        // earlier backfill's unfinished tables still need one).
        restore_mark(&lake, previous_mark.as_deref()).await?;
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The slot's acknowledged LSN (none when the slot does not exist); an error when a
/// process is streaming from it.
async fn slot_idle(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<Lsn>, OfflineError> {
    let status = crate::source::slot_status(client, slot)
        .await
        .map_err(crate::runner::RunError::from)?;
    if let Some(pid) = status.as_ref().and_then(|s| s.active_pid) {
        return Err(OfflineError::Request(format!(
            "replication slot `{slot}` is in use (pid {pid}): stop the pipeline before a \
             backfill; `pipeline run` streams on after it"
        )));
    }
    Ok(status.map(|s| s.confirmed_flush_lsn.unwrap_or_default()))
}

/// Puts the backfill mark back as it was before this run (`previous`), or removes it.
async fn restore_mark(
    lake: &crate::sink::Lake,
    previous: Option<&str>,
) -> Result<(), OfflineError> {
    match previous {
        Some(body) => {
            lake.put_marker(Mark::BackfillInProgress, body.to_string())
                .await?
        }
        None => lake.remove_marker(Mark::BackfillInProgress).await?,
    }
    Ok(())
}

/// Every decision in the audit table of `d` (when it exists) compared with the feature
/// table's `rows` at the served `_lsn`.
async fn served_check(
    pipeline: &Pipeline,
    lake: &crate::sink::Lake,
    d: &crate::config::DecisionsFile,
    name: &str,
    rows: Vec<RecordBatch>,
) -> Result<Option<ServedReport>, OfflineError> {
    use arrow::array::{Array, AsArray};
    let path = LakeTable::decisions(&d.name);
    let table = lake.table(&path).await?;
    if table.version().is_none() {
        return Ok(None);
    }
    let key_name = pipeline
        .feature_files
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.entity.key.clone())
        .expect("the decisions file names one of the feature files");
    let int_keys = rows
        .first()
        .is_some_and(|b| b.column(0).data_type().is_integer());
    let ctx = crate::runner::session_over(Some(table), &path, "d").await?;
    let batches =
        super::collect_sql(&ctx, "SELECT request, features, features_lsn FROM d", &path).await?;
    let mut served = Vec::new();
    for b in batches {
        let text = |c: usize| arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Utf8);
        let (request, inputs, lsn) = (text(0)?, text(1)?, text(2)?);
        let (request, inputs, lsn) = (
            request.as_string::<i32>(),
            inputs.as_string::<i32>(),
            lsn.as_string::<i32>(),
        );
        for i in 0..b.num_rows() {
            served.push((|| {
                let req: serde_json::Value = serde_json::from_str(request.value(i)).ok()?;
                // As the API takes keys: a number or its text for an integer key.
                let key = match (req.get(&key_name)?, int_keys) {
                    (serde_json::Value::Number(n), true) => crate::state::Key::Int(n.as_i64()?),
                    (serde_json::Value::String(s), true) => crate::state::Key::Int(s.parse().ok()?),
                    (serde_json::Value::Number(n), false) => {
                        crate::state::Key::Text(n.to_string().into())
                    }
                    (serde_json::Value::String(s), false) => {
                        crate::state::Key::Text(s.as_str().into())
                    }
                    _ => return None,
                };
                let inputs =
                    match serde_json::from_str::<serde_json::Value>(inputs.value(i)).ok()? {
                        serde_json::Value::Object(m) => m,
                        _ => return None,
                    };
                let lsn = lsn
                    .is_valid(i)
                    .then(|| lsn.value(i).parse::<Lsn>().ok())??;
                Some(Served {
                    key,
                    inputs,
                    lsn: lsn.as_i64(),
                })
            })());
        }
    }
    let report = verify::compare_served(&path.path(), name, rows, &served)?;
    tracing::info!(
        decisions = report.decisions,
        values = report.values,
        mismatched = report.mismatched_values,
        missing = report.missing,
        "served values checked"
    );
    Ok(Some(report))
}

/// The feature files `asked` names (table name or file path), by position.
fn resolve_asked(pipeline: &Pipeline, asked: &[String]) -> Result<Vec<usize>, OfflineError> {
    let mut out = Vec::new();
    for a in asked {
        let stem = std::path::Path::new(a).file_stem().map(|s| s.to_owned());
        let found = pipeline
            .feature_files
            .iter()
            .enumerate()
            .position(|(i, f)| {
                f.name == *a
                    || pipeline.config.features.get(i).is_some_and(|p| {
                        p.as_os_str() == a.as_str()
                            || (stem.is_some() && p.file_stem() == stem.as_deref())
                    })
            });
        match found {
            Some(i) => out.push(i),
            None => {
                let names: Vec<&str> = pipeline
                    .feature_files
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect();
                return Err(OfflineError::Request(format!(
                    "--feature-file {a}: not a feature file of this pipeline (its feature \
                     tables: {})",
                    names.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

fn lake_schema(table: &DeltaTable, name: &str) -> Result<SchemaRef, OfflineError> {
    let snapshot = table.snapshot().map_err(|e| OfflineError::Read {
        table: LakeTable::features(name),
        source: Box::new(e),
    })?;
    Ok(snapshot.snapshot().arrow_schema())
}

fn column_names(schema: &SchemaRef) -> Vec<String> {
    schema.fields().iter().map(|f| f.name().clone()).collect()
}

/// Change rows the replay will read after the snapshot, for the progress bar.
async fn count_changes(
    schemas: &[crate::source::TableSchema],
    raw: &HashMap<LakeTable, DeltaTable>,
    from: Lsn,
    until: Lsn,
) -> Result<usize, OfflineError> {
    let lsn = quote_ident(LSN);
    let mut total = 0;
    for schema in schemas {
        let path = LakeTable::raw_of(&schema.name);
        let ctx = crate::runner::session_over(raw.get(&path).cloned(), &path, "raw").await?;
        let sql = format!(
            "SELECT count(*) FROM raw WHERE {lsn} >= {} AND {lsn} < {}",
            from.as_i64(),
            until.as_i64()
        );
        let batches = super::collect_sql(&ctx, &sql, &path).await?;
        if let Some(b) = batches.iter().find(|b| b.num_rows() > 0) {
            let c = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64)?;
            use arrow::array::AsArray;
            total += c.as_primitive::<arrow::datatypes::Int64Type>().value(0) as usize;
        }
    }
    Ok(total)
}

/// The feature table's rows as the stream wrote them, with the columns it shares with
/// `want` (the rebuilt schema) cast to `want`'s types.
async fn read_stream_rows(
    table: &DeltaTable,
    name: &str,
    want: &SchemaRef,
) -> Result<Vec<RecordBatch>, OfflineError> {
    let path = LakeTable::features(name);
    let ctx = crate::runner::session_over(Some(table.clone()), &path, "f").await?;
    let batches = super::collect_sql(&ctx, "SELECT * FROM f", &path).await?;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let mut fields = Vec::new();
        let mut cols = Vec::new();
        for f in want.fields() {
            if let Some(c) = b.column_by_name(f.name()) {
                cols.push(arrow::compute::cast(c, f.data_type())?);
                fields.push(f.as_ref().clone().with_nullable(true));
            }
        }
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
        out.push(RecordBatch::try_new(schema, cols)?);
    }
    Ok(out)
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Added => f.write_str("added"),
            Reason::ColumnsChanged { lake, file } => {
                let added: Vec<&String> = file.iter().filter(|c| !lake.contains(c)).collect();
                let dropped: Vec<&String> = lake.iter().filter(|c| !file.contains(c)).collect();
                write!(f, "columns changed (added {added:?}, dropped {dropped:?})")
            }
            Reason::Asked => f.write_str("asked for"),
            Reason::Unfinished => f.write_str("an earlier backfill did not finish"),
            Reason::VerifyOnly => f.write_str("verified only"),
        }
    }
}

impl std::fmt::Display for BackfillSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tables.is_empty() {
            return writeln!(
                f,
                "nothing to backfill: every feature table matches its feature file (name one \
                 with --feature-file to rebuild it, or --verify to check them)"
            );
        }
        let r = &self.replay;
        writeln!(
            f,
            "replayed the raw log from the snapshot at {} up to {}: {} snapshot rows in {:.1} s, \
             {} transactions ({} changes) in {:.1} s = {:.0} changes/s, {} feature queries",
            self.snapshot,
            self.until,
            r.snapshot_rows,
            r.snapshot_time.as_secs_f64(),
            r.transactions,
            r.changes,
            r.replay_time.as_secs_f64(),
            self.changes_per_second(),
            r.groups,
        )?;
        for v in &self.verify {
            let (mismatch, missing) = v.rates();
            writeln!(
                f,
                "verify features/{}: {} stream rows compared, {} mismatched ({:.4}%), {} missing ({:.4}%){}",
                v.table,
                v.compared,
                v.mismatched,
                mismatch * 100.0,
                v.missing,
                missing * 100.0,
                match v.beyond {
                    0 => String::new(),
                    n => format!(", {n} beyond what the raw tables hold (not compared)"),
                }
            )?;
            for (feature, n) in &v.by_feature {
                writeln!(f, "  {feature}: {n} rows differ")?;
            }
            for e in &v.examples {
                writeln!(f, "  e.g. {e}")?;
            }
        }
        if let Some(s) = &self.served {
            let n = s.decisions.max(1) as f64;
            writeln!(
                f,
                "served {} ({}): {} decisions, {} feature values compared, {} mismatched \
                 ({:.4}% of decisions), {} without a feature row at the served _lsn ({:.4}%)",
                s.table,
                s.decisions_table,
                s.decisions,
                s.values,
                s.mismatched_values,
                s.mismatched_decisions as f64 / n * 100.0,
                s.missing,
                s.missing as f64 / n * 100.0
            )?;
            for (feature, k) in &s.by_feature {
                writeln!(f, "  {feature}: {k} values differ")?;
            }
            for e in &s.examples {
                writeln!(f, "  e.g. {e}")?;
            }
        }
        for t in &self.tables {
            match t.version {
                Some(v) => writeln!(
                    f,
                    "features/{}: {} ({} rows), written as version {v}",
                    t.table, t.reason, t.rows
                )?,
                None => writeln!(
                    f,
                    "features/{}: {} ({} rows), not written",
                    t.table, t.reason, t.rows
                )?,
            }
        }
        if self.written {
            writeln!(
                f,
                "written in {:.1} s; total {:.1} s. `pipeline run` streams on from here",
                self.write_time.as_secs_f64(),
                self.elapsed.as_secs_f64()
            )?;
        }
        Ok(())
    }
}
