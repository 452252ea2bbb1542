//! The spine: the rows a training set is built for, from a file or a SQL query, with
//! each row's entity key and time made explicit.

use super::OfflineError;
use crate::config::SourceConfig;
use crate::source::{self, text::ColumnBuilder, ConnInfo};
use crate::state::{key_at, Key};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Date32Type, Field, Schema, TimeUnit, TimestampMicrosecondType};
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Where the spine comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpineSource {
    /// A Parquet (`.parquet`) or CSV (`.csv`, with a header) file.
    File(PathBuf),
    /// A query run on the pipeline's source database.
    Sql(String),
}

impl SpineSource {
    /// A file when `arg` names one (or ends in `.parquet`/`.csv`), a query when it
    /// starts like one; anything else is an error saying both.
    pub fn parse(arg: &str) -> Result<SpineSource, OfflineError> {
        let path = PathBuf::from(arg);
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_lowercase);
        if path.is_file() || matches!(ext.as_deref(), Some("parquet" | "csv")) {
            return Ok(SpineSource::File(path));
        }
        let first = arg.split_whitespace().next().unwrap_or("").to_lowercase();
        let starts_like_sql = ["(", "--", "/*"].iter().any(|p| first.starts_with(p));
        if starts_like_sql || matches!(first.as_str(), "select" | "with" | "values" | "table") {
            return Ok(SpineSource::Sql(arg.to_string()));
        }
        Err(OfflineError::Spine {
            spine: arg.to_string(),
            message: "neither an existing file (.parquet, .csv) nor a SQL query (SELECT …)".into(),
        })
    }
}

impl fmt::Display for SpineSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpineSource::File(p) => write!(f, "{}", p.display()),
            SpineSource::Sql(q) => write!(
                f,
                "query `{}`",
                q.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
        }
    }
}

/// Spine times, in the form the spine gave them.
pub(crate) enum Times {
    /// Days since 1970-01-01.
    Dates(Vec<Option<i32>>),
    /// Microseconds since the epoch, UTC.
    Instants(Vec<Option<i64>>),
}

/// The loaded spine.
pub(crate) struct Spine {
    /// Every spine column, as read.
    pub(crate) rows: RecordBatch,
    /// Each row's entity key in the feature table's key type (`Key::Null` when NULL).
    pub(crate) keys: Vec<Key>,
    pub(crate) times: Times,
}

impl Spine {
    pub(crate) fn len(&self) -> usize {
        self.rows.num_rows()
    }

    /// Row `i`'s time as an instant: a date is its first microsecond (00:00 UTC).
    pub(crate) fn instant(&self, i: usize) -> Option<i64> {
        match &self.times {
            Times::Dates(d) => d[i].map(|d| d as i64 * MICROS_PER_DAY),
            Times::Instants(t) => t[i],
        }
    }

    /// Row `i`'s date (UTC).
    pub(crate) fn date(&self, i: usize) -> Option<i32> {
        match &self.times {
            Times::Dates(d) => d[i],
            Times::Instants(t) => t[i].map(|t| t.div_euclid(MICROS_PER_DAY) as i32),
        }
    }
}

/// Reads the spine and resolves its `key` and `time` columns (`key_type`: the feature
/// table's key type, which keys are cast to).
pub(crate) async fn load(
    spine: &SpineSource,
    source: &SourceConfig,
    key: &str,
    time: &str,
    key_type: &DataType,
) -> Result<Spine, OfflineError> {
    let err = |message: String| OfflineError::Spine {
        spine: spine.to_string(),
        message,
    };
    let rows = match spine {
        SpineSource::File(path) => read_file(path).await.map_err(err)?,
        SpineSource::Sql(sql) => query(source, sql).await.map_err(err)?,
    };
    let rows = plain_types(&rows).map_err(|e| err(e.to_string()))?;
    let column = |name: &str, role: &str| {
        rows.column_by_name(name).cloned().ok_or_else(|| {
            let have: Vec<&String> = rows
                .schema_ref()
                .fields()
                .iter()
                .map(|f| f.name())
                .collect();
            err(format!("no {role} column `{name}` (columns: {have:?})"))
        })
    };
    let key_col = column(key, "key")?;
    let keys = keys(&key_col, key_type).map_err(|m| err(format!("key column `{key}`: {m}")))?;
    let times =
        times(&column(time, "time")?).map_err(|m| err(format!("time column `{time}`: {m}")))?;
    tracing::info!(spine = %spine, rows = rows.num_rows(), "spine read");
    Ok(Spine { rows, keys, times })
}

/// Each row's key in `key_type`; a value that does not convert exactly (text that is
/// no number, a fraction) is an error naming the row, never a silent NULL.
fn keys(column: &ArrayRef, key_type: &DataType) -> Result<Vec<Key>, String> {
    if matches!(
        column.data_type(),
        DataType::Float16 | DataType::Float32 | DataType::Float64
    ) {
        return Err(format!(
            "{} is not a key type (cast it to an integer or text in the spine)",
            column.data_type()
        ));
    }
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let cast = cast_with_options(column, key_type, &strict).map_err(|e| {
        let bad = (0..column.len()).find(|&i| {
            column.is_valid(i) && cast(&column.slice(i, 1), key_type).is_ok_and(|c| c.is_null(0))
        });
        match bad {
            Some(i) => format!(
                "row {} ({}) does not convert to the feature table's key type {key_type}",
                i + 1,
                arrow::util::display::array_value_to_string(column, i).unwrap_or_default()
            ),
            None => format!(
                "{} does not convert to the feature table's key type {key_type}: {e}",
                column.data_type()
            ),
        }
    })?;
    Ok((0..cast.len()).map(|i| key_at(&cast, i)).collect())
}

/// A spine file's rows, in one batch.
async fn read_file(path: &Path) -> Result<RecordBatch, String> {
    if !path.is_file() {
        return Err("no such file".into());
    }
    let ctx = SessionContext::new();
    let name = path.display().to_string();
    let frame = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase)
    {
        Some(e) if e == "csv" => {
            ctx.read_csv(
                name,
                CsvReadOptions::new().has_header(true).file_extension(""),
            )
            .await
        }
        _ => {
            ctx.read_parquet(name, ParquetReadOptions::default().file_extension(""))
                .await
        }
    }
    .map_err(|e| e.to_string())?;
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame.collect().await.map_err(|e| e.to_string())?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| e.to_string())
}

/// The rows of `sql` on the source database, typed as the pipeline types source columns.
async fn query(source: &SourceConfig, sql: &str) -> Result<RecordBatch, String> {
    let conn = ConnInfo::parse(&source.url).map_err(|e| e.to_string())?;
    let client = source::connect(&conn, source.connect_retries)
        .await
        .map_err(|e| e.to_string())?;
    // Described first for the column types; run in text form, as the pipeline decodes.
    let statement = client.prepare(sql).await.map_err(|e| e.to_string())?;
    let fields: Vec<Field> = statement
        .columns()
        .iter()
        .map(|c| Field::new(c.name(), source::arrow_type(c.type_().oid(), -1), true))
        .collect();
    let mut builders: Vec<ColumnBuilder> = fields
        .iter()
        .map(|f| ColumnBuilder::new(f.data_type(), 1024))
        .collect();
    let progress = indicatif::ProgressBar::new_spinner().with_message("spine query");
    let messages = client.simple_query(sql).await.map_err(|e| e.to_string())?;
    for m in messages {
        let tokio_postgres::SimpleQueryMessage::Row(row) = m else {
            continue;
        };
        for (i, b) in builders.iter_mut().enumerate() {
            match row.get(i) {
                Some(v) => b
                    .append_text(v.as_bytes())
                    .map_err(|e| format!("column {}: {e}", fields[i].name()))?,
                None => b.append_null(),
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let columns: Vec<ArrayRef> = builders.iter_mut().map(ColumnBuilder::finish).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

/// The batch with view types (which readers of the output may not know) made plain.
fn plain_types(b: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut fields = Vec::with_capacity(b.num_columns());
    let mut columns = Vec::with_capacity(b.num_columns());
    for (f, c) in b.schema_ref().fields().iter().zip(b.columns()) {
        let want = match f.data_type() {
            DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
            DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
            other => other.clone(),
        };
        columns.push(cast(c, &want)?);
        fields.push(f.as_ref().clone().with_data_type(want));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// A time column as dates or UTC instants; text is read as dates when every value is
/// one, otherwise as timestamps.
fn times(c: &ArrayRef) -> Result<Times, String> {
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let as_dates = |a: &ArrayRef| Times::Dates(a.as_primitive::<Date32Type>().iter().collect());
    let as_instants = |a: &ArrayRef| {
        Times::Instants(
            a.as_primitive::<TimestampMicrosecondType>()
                .iter()
                .collect(),
        )
    };
    match c.data_type() {
        // A column with no value at all (e.g. an empty CSV column).
        DataType::Null => Ok(Times::Instants(vec![None; c.len()])),
        DataType::Date32 => Ok(as_dates(c)),
        DataType::Date64 => Ok(as_dates(
            &cast(c, &DataType::Date32).map_err(|e| e.to_string())?,
        )),
        // Without a zone, a timestamp is taken as UTC (the cast keeps its digits).
        DataType::Timestamp(_, _) => Ok(as_instants(&cast(c, &utc).map_err(|e| e.to_string())?)),
        // (Arrow's cast to a date would also take a timestamp's date and drop its time.)
        DataType::Utf8 if c.as_string::<i32>().iter().flatten().all(is_date) => Ok(as_dates(
            &cast_with_options(c, &DataType::Date32, &strict).map_err(|e| e.to_string())?,
        )),
        DataType::Utf8 => cast_with_options(c, &utc, &strict)
            .map(|t| as_instants(&t))
            .map_err(|e| format!("neither dates nor timestamps: {e}")),
        other => Err(format!("{other} is not a date or a timestamp")),
    }
}

/// `YYYY-MM-DD`, nothing more.
fn is_date(s: &str) -> bool {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() && s.len() == 10
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Date32Array, StringArray, TimestampMicrosecondArray};

    #[test]
    fn sources_are_told_apart_by_shape() {
        assert_eq!(
            SpineSource::parse("apps.parquet").unwrap(),
            SpineSource::File("apps.parquet".into())
        );
        assert!(matches!(
            SpineSource::parse("  select id from loan").unwrap(),
            SpineSource::Sql(_)
        ));
        assert!(matches!(
            SpineSource::parse("(SELECT 1) UNION (SELECT 2)").unwrap(),
            SpineSource::Sql(_)
        ));
        let e = SpineSource::parse("loans").unwrap_err().to_string();
        assert!(e.contains("spine loans: neither"), "{e}");
    }

    #[test]
    fn dates_and_naive_timestamps_are_utc() {
        let d: ArrayRef = Arc::new(Date32Array::from(vec![Some(18_497), None]));
        let spine = |times| Spine {
            rows: RecordBatch::new_empty(Arc::new(Schema::empty())),
            keys: vec![],
            times,
        };
        let s = spine(times(&d).unwrap());
        assert_eq!(s.instant(0), Some(18_497 * MICROS_PER_DAY));
        assert_eq!((s.date(0), s.date(1)), (Some(18_497), None));

        let naive: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![
            18_497 * MICROS_PER_DAY + 1,
        ]));
        let s = spine(times(&naive).unwrap());
        assert_eq!(s.instant(0), Some(18_497 * MICROS_PER_DAY + 1));
        assert_eq!(s.date(0), Some(18_497));

        let text: ArrayRef = Arc::new(StringArray::from(vec!["2020-08-23", "2020-08-22"]));
        assert!(matches!(times(&text).unwrap(), Times::Dates(_)));
        let text: ArrayRef = Arc::new(StringArray::from(vec!["2020-08-23T10:00:00Z"]));
        let s = spine(times(&text).unwrap());
        assert_eq!(
            s.instant(0),
            Some(18_497 * MICROS_PER_DAY + 10 * 3_600_000_000)
        );
        let bad: ArrayRef = Arc::new(StringArray::from(vec!["yesterday"]));
        assert!(times(&bad).is_err());
    }

    #[test]
    fn keys_convert_exactly_or_name_the_row() {
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("7"), None, Some("x1")]));
        let e = keys(&text, &DataType::Int64).unwrap_err();
        assert!(e.contains("row 3 (x1)"), "{e}");
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("7"), None]));
        assert_eq!(
            keys(&text, &DataType::Int64).unwrap(),
            vec![Key::Int(7), Key::Null]
        );
        let float: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![1.5]));
        assert!(keys(&float, &DataType::Int64)
            .unwrap_err()
            .contains("not a key type"));
        let none: ArrayRef = Arc::new(arrow::array::NullArray::new(2));
        assert!(matches!(times(&none).unwrap(), Times::Instants(t) if t == vec![None, None]));
    }
}
