//! Online/offline consistency: every row the stream wrote compared with the replayed
//! value at the same `(key, _lsn)`, i.e. the replayed row of the key with the highest
//! `_lsn` at or below it (the stream computes per batch of transactions, the replay per
//! transaction: the stream's row at a batch's LSN must equal the replay's after the
//! last transaction of the batch that touched the key).

use crate::config::{COMPUTED_AT, FEATURE_TIME, OUTPUT_COMMIT_TS, OUTPUT_LSN};
use crate::state::{key_at, Key};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::HashMap;
use std::collections::BTreeMap;

/// Relative tolerance for floating-point features: a sum over the same rows in another
/// order may differ in the last bits.
const FLOAT_TOLERANCE: f64 = 1e-9;

/// Examples of mismatches kept for the report.
const EXAMPLES: usize = 5;

/// What a comparison found for one feature table.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub table: String,
    /// Rows the stream wrote that were compared.
    pub compared: usize,
    /// Rows with at least one feature (or the deletion flag) different.
    pub mismatched: usize,
    /// Stream rows for which the replay has no row of the key at or below its `_lsn`.
    pub missing: usize,
    /// Stream rows of transactions beyond the replayed range (not compared).
    pub beyond: usize,
    /// Per compared feature, the rows where it differs.
    pub by_feature: BTreeMap<String, usize>,
    /// A few mismatches, described.
    pub examples: Vec<String>,
}

impl VerifyReport {
    pub fn is_consistent(&self) -> bool {
        self.mismatched == 0 && self.missing == 0
    }

    /// Mismatched and missing rows as fractions of the compared rows.
    pub fn rates(&self) -> (f64, f64) {
        let n = self.compared.max(1) as f64;
        (self.mismatched as f64 / n, self.missing as f64 / n)
    }
}

/// A column read as one of the types values are compared in.
enum Values {
    Int(arrow::array::PrimitiveArray<Int64Type>),
    Float(arrow::array::PrimitiveArray<Float64Type>),
    Text(arrow::array::StringArray),
}

impl Values {
    fn of(col: &ArrayRef) -> Result<Values, arrow::error::ArrowError> {
        Self::of_with(col, false)
    }

    /// As [`Values::of`]; with `dates_as_text`, dates compare as `YYYY-MM-DD` (as JSON
    /// carries them).
    fn of_with(col: &ArrayRef, dates_as_text: bool) -> Result<Values, arrow::error::ArrowError> {
        let t = col.data_type();
        let date_as_number = *t == DataType::Date32 && !dates_as_text;
        Ok(
            if t.is_integer() || *t == DataType::Boolean || date_as_number {
                let c = arrow::compute::cast(col, &DataType::Int64)?;
                Values::Int(c.as_primitive::<Int64Type>().clone())
            } else if t.is_floating() || matches!(t, DataType::Decimal128(..)) {
                let c = arrow::compute::cast(col, &DataType::Float64)?;
                Values::Float(c.as_primitive::<Float64Type>().clone())
            } else {
                let c = arrow::compute::cast(col, &DataType::Utf8)?;
                Values::Text(c.as_string::<i32>().clone())
            },
        )
    }

    fn show(&self, i: usize) -> String {
        match self {
            _ if self.is_null(i) => "NULL".into(),
            Values::Int(a) => a.value(i).to_string(),
            Values::Float(a) => a.value(i).to_string(),
            Values::Text(a) => format!("{:?}", a.value(i)),
        }
    }

    fn is_null(&self, i: usize) -> bool {
        match self {
            Values::Int(a) => a.is_null(i),
            Values::Float(a) => a.is_null(i),
            Values::Text(a) => a.is_null(i),
        }
    }

    /// Whether row `i` here equals row `j` of `other` (same column of the other side).
    fn same(&self, i: usize, other: &Values, j: usize) -> bool {
        match (self.is_null(i), other.is_null(j)) {
            (true, true) => return true,
            (false, false) => {}
            _ => return false,
        }
        match (self, other) {
            (Values::Int(a), Values::Int(b)) => a.value(i) == b.value(j),
            (Values::Float(a), Values::Float(b)) => {
                let (x, y) = (a.value(i), b.value(j));
                x == y
                    || (x.is_nan() && y.is_nan())
                    || (x - y).abs() <= FLOAT_TOLERANCE * x.abs().max(y.abs()).max(1.0)
            }
            (Values::Text(a), Values::Text(b)) => a.value(i) == b.value(j),
            _ => self.show(i) == other.show(j),
        }
    }
}

/// One side's rows: per key, (`_lsn`, batch, row) sorted by `_lsn`.
pub(crate) struct Side {
    batches: Vec<RecordBatch>,
    by_key: HashMap<Key, Vec<(i64, usize, usize)>>,
}

impl Side {
    fn new(batches: Vec<RecordBatch>) -> Side {
        let mut by_key: HashMap<Key, Vec<(i64, usize, usize)>> = HashMap::new();
        for (b, batch) in batches.iter().enumerate() {
            let Some(lsn) = batch.column_by_name(OUTPUT_LSN) else {
                continue;
            };
            let lsn = arrow::compute::cast(lsn, &DataType::Int64).expect("_lsn is an integer");
            let lsn = lsn.as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                by_key
                    .entry(key_at(batch.column(0), row))
                    .or_default()
                    .push((lsn.value(row), b, row));
            }
        }
        for rows in by_key.values_mut() {
            rows.sort_unstable();
        }
        Side { batches, by_key }
    }

    /// The row of `key` with the highest `_lsn` at or below `lsn`: (its `_lsn`, batch, row).
    fn at(&self, key: &Key, lsn: i64) -> Option<(i64, usize, usize)> {
        let rows = self.by_key.get(key)?;
        let i = rows.partition_point(|r| r.0 <= lsn);
        i.checked_sub(1).map(|i| rows[i])
    }
}

/// Compares every row of `stream` (the feature table as the stream wrote it) that the
/// replay covers, the snapshot's (at `snapshot`) and those of transactions below `until`
/// (a table may hold a batch beyond it after a crash), with the `replayed` rows of the
/// same table, on the features both have.
pub(crate) fn compare(
    table: &str,
    stream: Vec<RecordBatch>,
    replayed: &[RecordBatch],
    (snapshot, until): (i64, i64),
) -> Result<VerifyReport, arrow::error::ArrowError> {
    let mut report = VerifyReport {
        table: table.to_string(),
        ..Default::default()
    };
    let replay = Side::new(replayed.to_vec());
    let Some(first) = replay.batches.first() else {
        report.missing = stream.iter().map(RecordBatch::num_rows).sum();
        report.compared = report.missing;
        return Ok(report);
    };
    // (An empty replay cannot happen past the snapshot: every entity has a row there.)
    let reserved = [FEATURE_TIME, OUTPUT_LSN, COMPUTED_AT, OUTPUT_COMMIT_TS];
    let key_name = first.schema().field(0).name().clone();
    // The features both sides have (by name), and the deletion flag.
    let columns: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| *n != key_name && !reserved.contains(&n.as_str()))
        .filter(|n| {
            stream
                .first()
                .is_some_and(|b| b.schema().column_with_name(n).is_some())
        })
        .collect();
    let values = |b: &RecordBatch| -> Result<Vec<Values>, arrow::error::ArrowError> {
        columns
            .iter()
            .map(|c| Values::of(b.column_by_name(c).expect("compared columns exist")))
            .collect()
    };
    let replay_values: Vec<Vec<Values>> = replay
        .batches
        .iter()
        .map(values)
        .collect::<Result<_, _>>()?;
    for batch in &stream {
        let ours = values(batch)?;
        let lsn = arrow::compute::cast(
            batch
                .column_by_name(OUTPUT_LSN)
                .expect("feature rows have _lsn"),
            &DataType::Int64,
        )?;
        let lsn = lsn.as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            if lsn.value(row) >= until && lsn.value(row) != snapshot {
                report.beyond += 1;
                continue;
            }
            report.compared += 1;
            let key = key_at(batch.column(0), row);
            let at = lsn.value(row);
            let found = replay.at(&key, at);
            let Some((replay_lsn, b, r)) = found else {
                report.missing += 1;
                if report.examples.len() < EXAMPLES {
                    report.examples.push(format!(
                        "{key_name} {key:?} at _lsn {at}: no replayed row at or before it"
                    ));
                }
                continue;
            };
            let mut differs = Vec::new();
            for (c, name) in columns.iter().enumerate() {
                if !ours[c].same(row, &replay_values[b][c], r) {
                    *report.by_feature.entry(name.clone()).or_default() += 1;
                    differs.push(format!(
                        "{name}: stream {} replay {}",
                        ours[c].show(row),
                        replay_values[b][c].show(r)
                    ));
                }
            }
            if !differs.is_empty() {
                report.mismatched += 1;
                if report.examples.len() < EXAMPLES {
                    report.examples.push(format!(
                        "{key_name} {key:?} at _lsn {at} (replayed at {replay_lsn}): {}",
                        differs.join(", ")
                    ));
                }
            }
        }
    }
    Ok(report)
}

/// What the decision service served, compared with the feature table.
#[derive(Debug, Clone, Default)]
pub struct ServedReport {
    /// The audit table read (`decisions/<name>`) and the feature table.
    pub decisions_table: String,
    pub table: String,
    pub decisions: usize,
    /// Feature values compared (those of the table's features in each decision).
    pub values: usize,
    pub mismatched_values: usize,
    /// Decisions with at least one value different.
    pub mismatched_decisions: usize,
    /// Decisions whose entity has no row at or below the served `_lsn`, or whose
    /// request or record could not be read.
    pub missing: usize,
    pub by_feature: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

impl ServedReport {
    pub fn is_consistent(&self) -> bool {
        self.mismatched_values == 0 && self.missing == 0
    }
}

/// One decision as the audit trail has it: the request's entity key, the inputs served
/// (features and application columns, JSON) and the `_lsn` of the feature row read.
pub(crate) struct Served {
    pub key: Key,
    pub inputs: serde_json::Map<String, serde_json::Value>,
    pub lsn: i64,
}

/// Compares each served feature value with the feature table's row for the entity at
/// the served `_lsn` (its highest at or below it): what a known-time training set at
/// that moment gives. `table` holds the feature table's rows.
pub(crate) fn compare_served(
    decisions_table: &str,
    table: &str,
    rows: Vec<RecordBatch>,
    served: &[Option<Served>],
) -> Result<ServedReport, arrow::error::ArrowError> {
    let mut report = ServedReport {
        decisions_table: decisions_table.to_string(),
        table: table.to_string(),
        decisions: served.len(),
        ..Default::default()
    };
    let side = Side::new(rows);
    let features: Vec<String> = side
        .batches
        .first()
        .map(|b| {
            b.schema()
                .fields()
                .iter()
                .skip(1)
                .map(|f| f.name().clone())
                .filter(|n| !n.starts_with('_') && n != FEATURE_TIME && n != COMPUTED_AT)
                .collect()
        })
        .unwrap_or_default();
    let values: Vec<Vec<Values>> = side
        .batches
        .iter()
        .map(|b| {
            features
                .iter()
                .map(|c| Values::of_with(b.column_by_name(c).expect("feature column"), true))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    for s in served {
        let Some(s) = s else {
            report.missing += 1;
            continue;
        };
        let Some((_, b, r)) = side.at(&s.key, s.lsn) else {
            report.missing += 1;
            if report.examples.len() < EXAMPLES {
                report.examples.push(format!(
                    "{:?} served at _lsn {}: no feature row at or before it",
                    s.key, s.lsn
                ));
            }
            continue;
        };
        let mut differs = Vec::new();
        for (c, name) in features.iter().enumerate() {
            let Some(v) = s.inputs.get(name) else {
                continue;
            };
            report.values += 1;
            if !values[b][c].same_as_json(r, v) {
                report.mismatched_values += 1;
                *report.by_feature.entry(name.clone()).or_default() += 1;
                differs.push(format!("{name}: served {v} table {}", values[b][c].show(r)));
            }
        }
        if !differs.is_empty() {
            report.mismatched_decisions += 1;
            if report.examples.len() < EXAMPLES {
                report.examples.push(format!(
                    "{:?} served at _lsn {}: {}",
                    s.key,
                    s.lsn,
                    differs.join(", ")
                ));
            }
        }
    }
    Ok(report)
}

impl Values {
    /// Whether row `i` equals the JSON value `v` (as the API writes values).
    fn same_as_json(&self, i: usize, v: &serde_json::Value) -> bool {
        use serde_json::Value as J;
        match v {
            J::Null => self.is_null(i),
            _ if self.is_null(i) => false,
            J::Number(n) => match self {
                Values::Int(a) => n.as_i64() == Some(a.value(i)),
                Values::Float(a) => n.as_f64().is_some_and(|x| {
                    let y = a.value(i);
                    x == y || (x - y).abs() <= FLOAT_TOLERANCE * x.abs().max(y.abs()).max(1.0)
                }),
                Values::Text(a) => a.value(i) == n.to_string(),
            },
            J::Bool(b) => matches!(self, Values::Int(a) if a.value(i) == i64::from(*b)),
            J::String(s) => match self {
                Values::Text(a) => a.value(i) == s,
                other => other.show(i) == *s,
            },
            J::Array(_) | J::Object(_) => false,
        }
    }
}
