//! Source table schemas read from the Postgres catalog, mapped to Arrow types.

use super::SourceError;
use crate::config::TableName;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use std::sync::Arc;
use tokio_postgres::Client;

/// Unconstrained `numeric` has no scale; we store it as Decimal128(38, 10).
pub const UNCONSTRAINED_NUMERIC_SCALE: i8 = 10;

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    /// Base type OID (domains resolved).
    pub type_oid: u32,
    pub type_name: String,
    pub data_type: DataType,
}

/// One configured source table: its columns, primary key and Arrow schema.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub name: TableName,
    pub oid: u32,
    pub columns: Vec<ColumnInfo>,
    /// Indexes (into `columns`) of the primary-key columns.
    pub key: Vec<usize>,
    /// The row image only.
    pub schema: SchemaRef,
}

impl TableSchema {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// Maps a Postgres base type to the Arrow type its values are decoded into.
/// Types without a faithful Arrow counterpart keep their text form (never lost).
pub fn arrow_type(type_oid: u32, typmod: i32) -> DataType {
    match type_oid {
        16 => DataType::Boolean,
        21 => DataType::Int16,
        23 => DataType::Int32,
        20 => DataType::Int64,
        26 => DataType::Int64, // oid
        700 => DataType::Float32,
        701 => DataType::Float64,
        1700 => {
            if typmod >= 4 {
                let t = typmod - 4;
                let precision = ((t >> 16) & 0xffff) as u8;
                let scale = (t & 0xffff) as i8;
                if (1..=38).contains(&precision) && (0..=precision as i8).contains(&scale) {
                    return DataType::Decimal128(precision, scale);
                }
            }
            DataType::Decimal128(38, UNCONSTRAINED_NUMERIC_SCALE)
        }
        1082 => DataType::Date32,
        1114 => DataType::Timestamp(TimeUnit::Microsecond, None),
        1184 => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        // text, varchar, bpchar, name, json, jsonb, uuid and everything else: text form.
        _ => DataType::Utf8,
    }
}

/// Reads the schema of every configured table and checks it can be replicated.
pub async fn load_schemas(
    client: &Client,
    tables: &[TableName],
) -> Result<Vec<TableSchema>, SourceError> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        let rel = client
            .query_opt(
                "SELECT c.oid, c.relreplident::text, c.relkind::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await?
            .ok_or_else(|| SourceError::TableMissing(t.clone()))?;
        let oid: u32 = rel.get(0);
        let replident: String = rel.get(1);
        let relkind: String = rel.get(2);
        if relkind != "r" && relkind != "p" {
            return Err(SourceError::Table {
                table: t.clone(),
                message: format!("is not an ordinary table (relkind {relkind})"),
            });
        }
        let cols = client
            .query(
                "SELECT a.attname::text, a.attnum,
                        COALESCE(NULLIF(ty.typbasetype, 0), ty.oid) AS base_oid,
                        CASE WHEN ty.typbasetype <> 0 THEN ty.typtypmod ELSE a.atttypmod END,
                        format_type(a.atttypid, a.atttypmod),
                        COALESCE(a.attnum = ANY(i.indkey), false) AS is_key
                   FROM pg_attribute a
                   JOIN pg_type ty ON ty.oid = a.atttypid
                   LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let mut columns = Vec::new();
        let mut key = Vec::new();
        for (i, r) in cols.iter().enumerate() {
            let base_oid: u32 = r.get(2);
            let typmod: i32 = r.get(3);
            if r.get::<_, bool>(5) {
                key.push(i);
            }
            columns.push(ColumnInfo {
                name: r.get(0),
                type_oid: base_oid,
                type_name: r.get(4),
                data_type: arrow_type(base_oid, typmod),
            });
        }
        if key.is_empty() {
            return Err(SourceError::Table {
                table: t.clone(),
                message: "has no primary key: the engine keys its state by the primary key. \
                          Add one (ALTER TABLE … ADD PRIMARY KEY (…))"
                    .into(),
            });
        }
        if replident == "n" {
            return Err(SourceError::Table {
                table: t.clone(),
                message: "has REPLICA IDENTITY NOTHING, so updates and deletes cannot be \
                          replicated. Run ALTER TABLE … REPLICA IDENTITY DEFAULT"
                    .into(),
            });
        }
        let fields: Vec<Field> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| Field::new(&c.name, c.data_type.clone(), !key.contains(&i)))
            .collect();
        out.push(TableSchema {
            name: t.clone(),
            oid,
            columns,
            key,
            schema: Arc::new(Schema::new(fields)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_typmod_maps_to_decimal_precision_and_scale() {
        // numeric(12,2): typmod = ((12 << 16) | 2) + 4
        assert_eq!(
            arrow_type(1700, ((12 << 16) | 2) + 4),
            DataType::Decimal128(12, 2)
        );
        assert_eq!(arrow_type(1700, -1), DataType::Decimal128(38, 10));
        assert_eq!(arrow_type(23, -1), DataType::Int32);
        assert_eq!(arrow_type(3802, -1), DataType::Utf8);
    }
}
