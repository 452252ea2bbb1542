//! Decoding of Postgres text-format values (pgoutput and COPY both use it) into Arrow
//! builders. The sessions pin `DateStyle=ISO` and `TimeZone=UTC`, so formats are fixed.

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, TimeUnit};
use chrono::{NaiveDate, NaiveDateTime};
use std::sync::Arc;

const EPOCH: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();

/// An Arrow builder for one column, fed with Postgres text values.
pub enum ColumnBuilder {
    Boolean(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    TimestampTz(TimestampMicrosecondBuilder),
    Text(StringBuilder),
}

impl ColumnBuilder {
    pub fn new(data_type: &DataType, capacity: usize) -> ColumnBuilder {
        match data_type {
            DataType::Boolean => ColumnBuilder::Boolean(BooleanBuilder::with_capacity(capacity)),
            DataType::Int16 => ColumnBuilder::Int16(Int16Builder::with_capacity(capacity)),
            DataType::Int32 => ColumnBuilder::Int32(Int32Builder::with_capacity(capacity)),
            DataType::Int64 => ColumnBuilder::Int64(Int64Builder::with_capacity(capacity)),
            DataType::Float32 => ColumnBuilder::Float32(Float32Builder::with_capacity(capacity)),
            DataType::Float64 => ColumnBuilder::Float64(Float64Builder::with_capacity(capacity)),
            DataType::Decimal128(p, s) => ColumnBuilder::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(*p, *s)
                    .expect("valid decimal type"),
                *p,
                *s,
            ),
            DataType::Date32 => ColumnBuilder::Date(Date32Builder::with_capacity(capacity)),
            DataType::Timestamp(TimeUnit::Microsecond, None) => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity))
            }
            DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) => ColumnBuilder::TimestampTz(
                TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone(tz.clone()),
            ),
            _ => ColumnBuilder::Text(StringBuilder::with_capacity(capacity, capacity * 16)),
        }
    }

    pub fn append_null(&mut self) {
        match self {
            ColumnBuilder::Boolean(b) => b.append_null(),
            ColumnBuilder::Int16(b) => b.append_null(),
            ColumnBuilder::Int32(b) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Float64(b) => b.append_null(),
            ColumnBuilder::Decimal(b, ..) => b.append_null(),
            ColumnBuilder::Date(b) => b.append_null(),
            ColumnBuilder::Timestamp(b) | ColumnBuilder::TimestampTz(b) => b.append_null(),
            ColumnBuilder::Text(b) => b.append_null(),
        }
    }

    /// Appends a text value. A value that has no Arrow representation (a date of
    /// `infinity`, a numeric `NaN`) is appended as NULL and reported as `Err`, so the
    /// caller can log it with the table and column.
    pub fn append_text(&mut self, v: &[u8]) -> Result<(), String> {
        let s = std::str::from_utf8(v).map_err(|e| {
            self.append_null();
            format!("invalid UTF-8: {e}")
        })?;
        let parsed: Result<(), String> =
            match self {
                ColumnBuilder::Boolean(b) => match s {
                    "t" | "true" => {
                        b.append_value(true);
                        Ok(())
                    }
                    "f" | "false" => {
                        b.append_value(false);
                        Ok(())
                    }
                    _ => Err(format!("`{s}` is not a boolean")),
                },
                ColumnBuilder::Int16(b) => s.parse().map(|x| b.append_value(x)).map_err(err(s)),
                ColumnBuilder::Int32(b) => s.parse().map(|x| b.append_value(x)).map_err(err(s)),
                ColumnBuilder::Int64(b) => s.parse().map(|x| b.append_value(x)).map_err(err(s)),
                ColumnBuilder::Float32(b) => s.parse().map(|x| b.append_value(x)).map_err(err(s)),
                ColumnBuilder::Float64(b) => s.parse().map(|x| b.append_value(x)).map_err(err(s)),
                ColumnBuilder::Decimal(b, p, sc) => {
                    arrow::compute::kernels::cast_utils::parse_decimal::<
                        arrow::datatypes::Decimal128Type,
                    >(s, *p, *sc)
                    .map(|x| b.append_value(x))
                    .map_err(|e| format!("`{s}` does not fit decimal({p},{sc}): {e}"))
                }
                ColumnBuilder::Date(b) => parse_date(s).map(|d| b.append_value(d)),
                ColumnBuilder::Timestamp(b) => parse_timestamp(s).map(|t| b.append_value(t)),
                ColumnBuilder::TimestampTz(b) => parse_timestamptz(s).map(|t| b.append_value(t)),
                ColumnBuilder::Text(b) => {
                    b.append_value(s);
                    Ok(())
                }
            };
        parsed.inspect_err(|_| self.append_null())
    }

    pub fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Boolean(b) => Arc::new(b.finish()),
            ColumnBuilder::Int16(b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b, ..) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) | ColumnBuilder::TimestampTz(b) => Arc::new(b.finish()),
            ColumnBuilder::Text(b) => Arc::new(b.finish()),
        }
    }
}

fn err<E: std::fmt::Display>(s: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("`{s}`: {e}")
}

/// `YYYY-MM-DD` → days since 1970-01-01.
pub fn parse_date(s: &str) -> Result<i32, String> {
    // The common shape is read digit by digit: a snapshot has one date per row and
    // column, and chrono's format-string parser costs several times more. Anything
    // else (years past 9999, `BC`, `infinity`) takes chrono's path and its errors.
    if let Some(days) = ymd_fast(s.as_bytes()) {
        return Ok(days);
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| (d - EPOCH).num_days() as i32)
        .map_err(|e| format!("`{s}` is not a representable date: {e}"))
}

/// Days since 1970-01-01 of a date written exactly `YYYY-MM-DD`, if valid.
fn ymd_fast(b: &[u8]) -> Option<i32> {
    let [y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] = *b else {
        return None;
    };
    let digits = [y0, y1, y2, y3, m0, m1, d0, d1];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = |hi: &[u8]| {
        hi.iter()
            .fold(0u32, |acc, &c| acc * 10 + u32::from(c - b'0'))
    };
    let date = NaiveDate::from_ymd_opt(n(&digits[..4]) as i32, n(&digits[4..6]), n(&digits[6..]))?;
    Some((date - EPOCH).num_days() as i32)
}

fn parse_timestamp(s: &str) -> Result<i64, String> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .map(|t| t.and_utc().timestamp_micros())
        .map_err(|e| format!("`{s}` is not a representable timestamp: {e}"))
}

fn parse_timestamptz(s: &str) -> Result<i64, String> {
    // Postgres prints offsets as +HH, +HH:MM or +HH:MM:SS; pad +HH so chrono can read it.
    let padded;
    let s2 = match s.rfind(['+', '-']) {
        Some(pos) if pos > 10 && s.len() - pos == 3 => {
            padded = format!("{s}:00");
            padded.as_str()
        }
        _ => s,
    };
    chrono::DateTime::parse_from_str(s2, "%Y-%m-%d %H:%M:%S%.f%:z")
        .map(|t| t.timestamp_micros())
        .map_err(|e| format!("`{s}` is not a representable timestamptz: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Date32Type, Decimal128Type, Float64Type, TimestampMicrosecondType};

    #[test]
    fn decodes_postgres_text_values() {
        let mut d = ColumnBuilder::new(&DataType::Date32, 4);
        d.append_text(b"2020-08-23").unwrap();
        assert!(d.append_text(b"2020-02-30").is_err(), "no such day");
        assert_eq!(parse_date("1969-12-31"), Ok(-1));
        assert_eq!(parse_date("0001-01-01"), Ok(-719162));
        assert!(d.append_text(b"infinity").is_err());
        d.append_null();
        let a = d.finish();
        let a = a.as_primitive::<Date32Type>();
        assert_eq!(a.value(0), 18497);
        assert!(a.is_null(1) && a.is_null(2) && a.is_null(3));

        let mut f = ColumnBuilder::new(&DataType::Float64, 2);
        f.append_text(b"NaN").unwrap();
        f.append_text(b"-Infinity").unwrap();
        let a = f.finish();
        let a = a.as_primitive::<Float64Type>();
        assert!(a.value(0).is_nan() && a.value(1) == f64::NEG_INFINITY);

        let mut n = ColumnBuilder::new(&DataType::Decimal128(10, 2), 2);
        n.append_text(b"-12.5").unwrap();
        assert!(n.append_text(b"NaN").is_err());
        let a = n.finish();
        assert_eq!(a.as_primitive::<Decimal128Type>().value(0), -1250);

        let mut t = ColumnBuilder::new(
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            2,
        );
        t.append_text(b"2020-08-23 10:00:00.5+02").unwrap();
        let a = t.finish();
        let want = chrono::DateTime::parse_from_rfc3339("2020-08-23T08:00:00.5Z").unwrap();
        assert_eq!(
            a.as_primitive::<TimestampMicrosecondType>().value(0),
            want.timestamp_micros()
        );

        let mut s = ColumnBuilder::new(&DataType::Utf8, 1);
        s.append_text("Jõgeva Šmidt".as_bytes()).unwrap();
        assert_eq!(s.finish().as_string::<i32>().value(0), "Jõgeva Šmidt");
    }
}
