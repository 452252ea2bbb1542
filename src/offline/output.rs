//! The training set's table: the spine's columns plus the picked feature columns,
//! written as a Parquet file or a Delta table with what it was built from in its
//! metadata.

use super::spine::Spine;
use super::{OfflineError, TrainingSetRequest, TrainingSetSummary};
use crate::config::LakeConfig;
use arrow::array::{new_null_array, Array, ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use std::ops::Range;
use std::sync::Arc;

/// The metadata key (Parquet key-value metadata, Delta commit info) holding what a
/// training set was built from, as JSON.
pub const METADATA_KEY: &str = "pipeline.training_set";

/// Feature columns with one value per spine row.
pub(crate) struct Picked {
    pub(crate) fields: Vec<Field>,
    pub(crate) columns: Vec<ArrayRef>,
}

impl Picked {
    /// Columns `columns` of `sources`, row `picks[i]` (batch, row) for spine row `i`;
    /// NULL where there is none. `fields` describe the columns taken.
    pub(crate) fn from_rows(
        sources: &[RecordBatch],
        columns: Range<usize>,
        picks: &[Option<(usize, usize)>],
        fields: Vec<Field>,
    ) -> Result<Picked, arrow::error::ArrowError> {
        // A one-row all-NULL source for the rows without a pick.
        let null_source = sources.len();
        let indices: Vec<(usize, usize)> = picks
            .iter()
            .map(|p| p.unwrap_or((null_source, 0)))
            .collect();
        let mut out = Vec::with_capacity(fields.len());
        for (c, field) in columns.zip(&fields) {
            let mut arrays: Vec<ArrayRef> = sources
                .iter()
                .map(|b| arrow::compute::cast(b.column(c), field.data_type()))
                .collect::<Result<_, _>>()?;
            arrays.push(new_null_array(field.data_type(), 1));
            let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
            out.push(arrow::compute::interleave(&refs, &indices)?);
        }
        Ok(Picked {
            fields,
            columns: out,
        })
    }
}

/// Refuses a spine that has a column the training set adds (before any work).
pub(crate) fn check_names(spine: &Spine, added: &[&str]) -> Result<(), OfflineError> {
    match added
        .iter()
        .find(|a| spine.rows.schema_ref().field_with_name(a).is_ok())
    {
        Some(name) => Err(OfflineError::Request(format!(
            "the spine has a column `{name}`, which the training set adds: rename it in the spine"
        ))),
        None => Ok(()),
    }
}

/// Refuses an output inside the lake (a Delta output there would replace a lake table)
/// and a Parquet output that is not a local path.
pub(crate) fn check_out(out: &str, lake: &LakeConfig) -> Result<(), OfflineError> {
    let err = |message: &str| OfflineError::Output {
        out: out.to_string(),
        message: message.to_string(),
    };
    let is_url = url::Url::parse(out).is_ok_and(|u| u.scheme().len() > 1);
    if is_url && out.to_lowercase().ends_with(".parquet") {
        return Err(err(
            "a Parquet output is a local file; for object storage write a Delta table (no .parquet)",
        ));
    }
    let absolute = |p: &str| {
        let p = std::path::Path::new(p.strip_prefix("file://").unwrap_or(p));
        std::path::absolute(p).ok()
    };
    let inside = match (
        is_url,
        lake.url.contains("://") && !lake.url.starts_with("file://"),
    ) {
        (true, true) => out.starts_with(lake.url.trim_end_matches('/')),
        (false, false) => matches!(
            (absolute(out), absolute(&lake.url)),
            (Some(o), Some(l)) if o.starts_with(&l)
        ),
        _ => false,
    };
    if inside {
        return Err(err(
            "inside the pipeline's lake: write training sets elsewhere",
        ));
    }
    Ok(())
}

/// The spine's columns followed by the picked ones (names checked by [`check_names`]).
pub(crate) fn assemble(spine: &Spine, picked: Picked) -> Result<RecordBatch, OfflineError> {
    let mut fields: Vec<Field> = spine
        .rows
        .schema_ref()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(picked.fields);
    let mut columns = spine.rows.columns().to_vec();
    columns.extend(picked.columns);
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// What the training set was built from, as recorded in its metadata.
fn metadata(req: &TrainingSetRequest, summary: &TrainingSetSummary) -> String {
    let leaking: serde_json::Map<String, serde_json::Value> = summary
        .leaking
        .iter()
        .map(|(f, why)| (f.clone(), why.clone().into()))
        .collect();
    serde_json::json!({
        "mode": req.mode.as_str(),
        "feature_table": summary.feature_table,
        "feature_table_version": summary.table_version,
        "raw_table_versions": summary.raw_versions.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "spine": req.spine.to_string(),
        "key": req.key,
        "time": req.time,
        "rows": summary.rows,
        "rows_without_features": summary.missing + summary.deleted + summary.no_key_or_time,
        "not_point_in_time_correct": leaking,
        "created_at": chrono::Utc::now().to_rfc3339(),
    })
    .to_string()
}

/// Writes `batch` to `out`: a `.parquet` file, or else a Delta table (replaced), on the
/// lake's storage options when it is a URL.
pub(crate) async fn write(
    out: &str,
    batch: RecordBatch,
    lake: &LakeConfig,
    req: &TrainingSetRequest,
    summary: &TrainingSetSummary,
) -> Result<(), OfflineError> {
    let err = |message: String| OfflineError::Output {
        out: out.to_string(),
        message,
    };
    let meta = metadata(req, summary);
    if out.to_lowercase().ends_with(".parquet") {
        return write_parquet(out, batch, meta).map_err(err);
    }
    let url = match url::Url::parse(out) {
        Ok(u) if u.scheme().len() > 1 => u,
        // A path (a one-letter scheme is a Windows drive).
        _ => {
            let dir = std::path::Path::new(out);
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            let dir = dir.canonicalize().map_err(|e| err(e.to_string()))?;
            url::Url::from_directory_path(&dir).map_err(|()| err("not a directory path".into()))?
        }
    };
    let mut table = deltalake::DeltaTableBuilder::from_url(url)
        .map_err(|e| err(e.to_string()))?
        .with_storage_options(lake.storage_options.clone().into_iter().collect())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let exists = match table.load().await {
        Ok(()) => true,
        Err(deltalake::DeltaTableError::NotATable(_)) => false,
        Err(e) => return Err(err(e.to_string())),
    };
    let mut write = table
        .write(vec![batch])
        .with_save_mode(if exists {
            SaveMode::Overwrite
        } else {
            SaveMode::Append
        })
        .with_commit_properties(
            CommitProperties::default().with_metadata([(METADATA_KEY.to_string(), meta.into())]),
        );
    if exists {
        write = write.with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite);
    }
    write.await.map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn write_parquet(out: &str, batch: RecordBatch, meta: String) -> Result<(), String> {
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::basic::Compression;
    use datafusion::parquet::file::metadata::KeyValue;
    use datafusion::parquet::file::properties::WriterProperties;
    let path = std::path::Path::new(out);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    // Written beside and renamed: a reader never sees half a file.
    let partial = path.with_extension("parquet.partial");
    let file = std::fs::File::create(&partial).map_err(|e| e.to_string())?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new(METADATA_KEY.to_string(), meta)]))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(|e| e.to_string())?;
    const CHUNK: usize = 64 * 1024;
    let mut at = 0;
    while at < batch.num_rows() {
        let len = CHUNK.min(batch.num_rows() - at);
        writer
            .write(&batch.slice(at, len))
            .map_err(|e| e.to_string())?;
        at += len;
    }
    writer.close().map_err(|e| e.to_string())?;
    std::fs::rename(&partial, path).map_err(|e| e.to_string())
}
