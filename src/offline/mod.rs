//! Offline work on the lake: point-in-time training sets from the same feature files the
//! stream computes (`pipeline training-set`), and backfills of added or changed feature
//! files by replaying the raw change log through the feature engine (`pipeline
//! backfill`, [`mod@backfill`]), checked against what the stream wrote ([`verify`]).
//!
//! A *spine* names what to train on: one row per example with an entity key, a time and
//! any other columns (labels, ids), from a Parquet or CSV file or a SQL query against the
//! source database ([`spine`]). Each row gets the features as of its time, in one of two
//! modes ([`Mode`]):
//!
//! - **known time** ([`known`]): the row the pipeline wrote for the entity with the
//!   highest `_lsn` among those whose source commit time (`_commit_ts`) is at or before
//!   the spine time. Exactly what the decision service could have read then: nothing
//!   later can leak, and the result is reproducible (the feature table's version is
//!   recorded in the output; `--version` pins one).
//! - **event time** ([`event`]): the features recomputed through the same feature SQL
//!   with `as_of_date()` = the spine row's date, over the source rows as the lake's raw
//!   mirror holds them now. For history before the pipeline started. Point-in-time
//!   correct only for features whose queries filter every input by dates
//!   <= `as_of_date()`; the others say why not in their feature file
//!   (`leaks_in_event_time`), and the output and summary name them.
//!
//! The result ([`output`]) is the spine's columns plus the features (and, in known
//! mode, the `_lsn` and `_commit_ts` each value came from), as a Parquet file or a
//! Delta table with what was read recorded in its metadata.

mod backfill;
mod event;
mod known;
mod output;
mod replay;
mod spine;
mod verify;

pub use backfill::{backfill, BackfillRequest, BackfillSummary, Reason, TableBackfill};
pub use output::METADATA_KEY;
pub use replay::ReplayStats;
pub use spine::SpineSource;
pub use verify::{ServedReport, VerifyReport};

use crate::config::{FeatureFile, Pipeline};
use crate::features::FeatureError;
use crate::runner::RunError;
use crate::sink::{LakeTable, SinkError};
use std::fmt;
use std::time::{Duration, Instant};

/// How a spine row's time selects feature values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// What the pipeline had computed by then (`_commit_ts` <= time).
    Known,
    /// Recomputed with `as_of_date()` = the row's date over the lake's source rows.
    Event,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Known => "known",
            Mode::Event => "event",
        }
    }
}

/// What `pipeline training-set` is asked for.
#[derive(Debug, Clone)]
pub struct TrainingSetRequest {
    pub spine: SpineSource,
    /// Spine column holding the entity key.
    pub key: String,
    /// Spine column holding the time: a DATE, a TIMESTAMP (without a zone: UTC) or
    /// text in either form. A date as a known time is its first instant (00:00 UTC).
    pub time: String,
    pub mode: Mode,
    /// Known mode: the feature table version to read (default: the latest).
    pub version: Option<u64>,
    /// Feature table (default: the pipeline's first feature file).
    pub table: Option<String>,
    /// A `.parquet` file, otherwise a Delta table (directory or URL), replaced.
    pub out: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("spine {spine}: {message}")]
    Spine { spine: String, message: String },
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Sink(Box<SinkError>),
    #[error("reading {table}: {source}")]
    Read {
        table: LakeTable,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("building the training set: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("writing {out}: {message}")]
    Output { out: String, message: String },
}

impl From<SinkError> for OfflineError {
    fn from(e: SinkError) -> Self {
        OfflineError::Sink(Box::new(e))
    }
}

/// What a training set holds, for the summary and the output's metadata.
#[derive(Debug, Clone, Default)]
pub struct TrainingSetSummary {
    pub mode: Option<Mode>,
    pub feature_table: String,
    pub out: String,
    pub rows: usize,
    /// Rows with feature values.
    pub matched: usize,
    /// Rows whose key had no feature row (by then): NULL features.
    pub missing: usize,
    /// Rows whose entity was deleted by then (known) or is not in the source (event).
    pub deleted: usize,
    /// Rows with a NULL key or time: NULL features.
    pub no_key_or_time: usize,
    /// Known mode: the feature table version read.
    pub table_version: Option<u64>,
    /// Event mode: each raw table's version read.
    pub raw_versions: Vec<(String, u64)>,
    /// Event mode: source rows committed before this LSN (the slot's acknowledged
    /// position) were read; none: every row (no slot).
    pub raw_lsn_bound: Option<crate::changelog::Lsn>,
    /// Known mode: feature rows without `_commit_ts` (written before it existed), known
    /// from their `computed_at` instead (later than their commit: nothing leaks).
    pub rows_known_by_computed_at: usize,
    /// Event mode: features the recompute cannot make point-in-time correct, and why.
    pub leaking: Vec<(String, String)>,
    pub elapsed: Duration,
}

impl fmt::Display for TrainingSetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = self.mode.map_or("?", Mode::as_str);
        writeln!(
            f,
            "training set {} ({mode} time, {}): {} rows in {:.1} s",
            self.out,
            self.feature_table,
            self.rows,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  with features {}, no feature row {}, entity deleted/absent {}, NULL key or time {}",
            self.matched, self.missing, self.deleted, self.no_key_or_time
        )?;
        if let Some(v) = self.table_version {
            writeln!(f, "  read features/{} at version {v}", self.feature_table)?;
        }
        if self.rows_known_by_computed_at > 0 {
            writeln!(
                f,
                "  {} feature rows predate _commit_ts: known from their computed_at",
                self.rows_known_by_computed_at
            )?;
        }
        if !self.raw_versions.is_empty() {
            let v: Vec<String> = self
                .raw_versions
                .iter()
                .map(|(t, v)| format!("raw/{t}@{v}"))
                .collect();
            let bound = match self.raw_lsn_bound {
                Some(l) => format!(", source rows committed before {l}"),
                None => String::new(),
            };
            writeln!(f, "  recomputed over {}{bound}", v.join(", "))?;
        }
        for (feature, why) in &self.leaking {
            writeln!(
                f,
                "  not point-in-time correct in event time: {feature} ({why})"
            )?;
        }
        Ok(())
    }
}

/// Builds the training set `req` asks for from `pipeline`'s lake and writes it.
pub async fn training_set(
    pipeline: &Pipeline,
    req: &TrainingSetRequest,
) -> Result<TrainingSetSummary, OfflineError> {
    let started = Instant::now();
    let file = feature_file(pipeline, req.table.as_deref())?;
    if req.mode == Mode::Event && req.version.is_some() {
        return Err(OfflineError::Request(
            "--version pins the feature table read in known mode; event mode recomputes \
             from the raw tables"
                .into(),
        ));
    }
    output::check_out(&req.out, &pipeline.config.lake)?;
    let lake = pipeline.config.lake.open()?;
    let features_table = LakeTable::features(&file.name);
    let feature_schema = known::feature_schema(&lake, &features_table).await?;
    let key_type = feature_schema
        .field_with_name(&file.entity.key)
        .map_err(|_| OfflineError::Read {
            table: features_table.clone(),
            source: format!("no key column {}", file.entity.key).into(),
        })?
        .data_type()
        .clone();
    let spine = spine::load(
        &req.spine,
        &pipeline.config.source,
        &req.key,
        &req.time,
        &key_type,
    )
    .await?;
    let mut added: Vec<&str> = file.features.iter().map(|f| f.name.as_str()).collect();
    if req.mode == Mode::Known {
        added.extend([crate::config::OUTPUT_LSN, crate::config::OUTPUT_COMMIT_TS]);
    }
    output::check_names(&spine, &added)?;
    let mut summary = TrainingSetSummary {
        mode: Some(req.mode),
        feature_table: file.name.clone(),
        out: req.out.clone(),
        rows: spine.len(),
        ..Default::default()
    };
    let picked = match req.mode {
        Mode::Known => known::join(&lake, file, &spine, req.version, &mut summary).await?,
        Mode::Event => event::recompute(pipeline, file, &spine, &mut summary).await?,
    };
    let batch = output::assemble(&spine, picked)?;
    summary.elapsed = started.elapsed();
    output::write(&req.out, batch, &pipeline.config.lake, req, &summary).await?;
    summary.elapsed = started.elapsed();
    tracing::info!(out = %req.out, mode = req.mode.as_str(), rows = summary.rows,
        matched = summary.matched, missing = summary.missing,
        elapsed_ms = summary.elapsed.as_millis() as u64, "training set written");
    Ok(summary)
}

/// The feature file named `table`, or the pipeline's first.
fn feature_file<'p>(
    pipeline: &'p Pipeline,
    table: Option<&str>,
) -> Result<&'p FeatureFile, OfflineError> {
    match table {
        None => pipeline
            .feature_files
            .first()
            .ok_or_else(|| OfflineError::Request("the pipeline has no feature files".into())),
        Some(t) => pipeline
            .feature_files
            .iter()
            .find(|f| f.name == t)
            .ok_or_else(|| {
                OfflineError::Request(format!(
                    "no feature table `{t}` in {} (it has: {})",
                    pipeline.file.display(),
                    pipeline
                        .feature_files
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
    }
}

/// The rows of `sql` over a session on the lake table `table`; errors name the table.
pub(crate) async fn collect_sql(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
    table: &LakeTable,
) -> Result<Vec<arrow::array::RecordBatch>, OfflineError> {
    let read = |e: datafusion::error::DataFusionError| OfflineError::Read {
        table: table.clone(),
        source: Box::new(e),
    };
    ctx.sql(sql)
        .await
        .map_err(read)?
        .collect()
        .await
        .map_err(read)
}
