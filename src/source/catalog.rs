//! Source table schemas read from the Postgres catalog, mapped to Arrow types.

use super::pgoutput::RelationColumn;
use super::SourceError;
use crate::config::TableName;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use std::sync::Arc;
use tokio_postgres::Client;

/// Unconstrained `numeric` has no scale; we store it as Decimal128(38, 10).
pub(crate) const UNCONSTRAINED_NUMERIC_SCALE: i8 = 10;

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    /// Base type OID (domains resolved).
    pub type_oid: u32,
    /// The declared type and modifier, as pgoutput's Relation message sends them:
    /// a change in either is a schema change of the source table.
    pub declared: (u32, i32),
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

    /// Whether a Relation message describes exactly these columns (names, declared
    /// types and modifiers, in order).
    pub fn matches(&self, relation: &[RelationColumn]) -> bool {
        self.columns.len() == relation.len()
            && self
                .columns
                .iter()
                .zip(relation)
                .all(|(c, r)| c.name == r.name && c.declared == (r.type_oid, r.typmod))
    }

    /// Names of the columns added to and dropped from this table by `relation`.
    pub fn diff(&self, relation: &[RelationColumn]) -> SchemaDiff {
        let mut d = SchemaDiff::default();
        for r in relation {
            match self.column_index(&r.name) {
                None => d.added.push(r.name.clone()),
                Some(i) if self.columns[i].declared != (r.type_oid, r.typmod) => {
                    d.retyped.push(r.name.clone())
                }
                Some(_) => {}
            }
        }
        for c in &self.columns {
            if !relation.iter().any(|r| r.name == c.name) {
                d.dropped.push(c.name.clone());
            }
        }
        d
    }

    fn new(name: TableName, oid: u32, columns: Vec<ColumnInfo>, key: Vec<usize>) -> TableSchema {
        let fields: Vec<Field> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| Field::new(&c.name, c.data_type.clone(), !key.contains(&i)))
            .collect();
        TableSchema {
            name,
            oid,
            columns,
            key,
            schema: Arc::new(Schema::new(fields)),
        }
    }
}

/// How a source table's columns changed (ALTER TABLE), by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchemaDiff {
    pub added: Vec<String>,
    pub dropped: Vec<String>,
    /// Same name, another declared type or modifier.
    pub retyped: Vec<String>,
}

impl std::fmt::Display for SchemaDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, cols) in [
            ("added", &self.added),
            ("dropped", &self.dropped),
            ("changed type of", &self.retyped),
        ] {
            if !cols.is_empty() {
                parts.push(format!("{what} {}", cols.join(", ")));
            }
        }
        if parts.is_empty() {
            parts.push("reordered columns".into());
        }
        f.write_str(&parts.join("; "))
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
                        COALESCE(a.attnum = ANY(i.indkey), false) AS is_key,
                        a.atttypid, a.atttypmod
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
                declared: (r.get(6), r.get(7)),
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
        out.push(TableSchema::new(t.clone(), oid, columns, key));
    }
    Ok(out)
}

/// The schema of `table` as a Relation message of the change stream describes it (the
/// table's columns at that point of the WAL, which the catalog may already have left
/// behind). Types are resolved through the catalog (types outlive column changes); the
/// key stays the primary key `table` had, which must still be there.
pub async fn relation_schema(
    client: &Client,
    table: &TableSchema,
    relation: &[RelationColumn],
) -> Result<TableSchema, SourceError> {
    let mut columns = Vec::with_capacity(relation.len());
    for r in relation {
        let row = client
            .query_opt(
                "SELECT COALESCE(NULLIF(typbasetype, 0), oid),
                        CASE WHEN typbasetype <> 0 THEN typtypmod ELSE $2 END,
                        format_type($1, $2)
                   FROM pg_type WHERE oid = $1",
                &[&r.type_oid, &r.typmod],
            )
            .await?;
        let (base_oid, base_typmod, type_name) = match row {
            Some(row) => (row.get(0), row.get(1), row.get(2)),
            // A type dropped since: its values arrive as text, kept as text.
            None => (r.type_oid, r.typmod, format!("type {}", r.type_oid)),
        };
        columns.push(ColumnInfo {
            name: r.name.clone(),
            type_oid: base_oid,
            declared: (r.type_oid, r.typmod),
            type_name,
            data_type: arrow_type(base_oid, base_typmod),
        });
    }
    let mut key = Vec::with_capacity(table.key.len());
    for &k in &table.key {
        let name = &table.columns[k].name;
        let i = columns
            .iter()
            .position(|c| &c.name == name)
            .ok_or_else(|| SourceError::Table {
                table: table.name.clone(),
                message: format!(
                    "lost its primary-key column `{name}` in the change stream: the engine \
                     keys its state by it. Rebuild with `pipeline resnapshot <pipeline.yaml>`"
                ),
            })?;
        key.push(i);
    }
    Ok(TableSchema::new(
        table.name.clone(),
        table.oid,
        columns,
        key,
    ))
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

    fn col(name: &str, type_oid: u32, typmod: i32) -> RelationColumn {
        RelationColumn {
            is_key: name == "id",
            name: name.into(),
            type_oid,
            typmod,
        }
    }

    #[test]
    fn relation_messages_are_compared_by_name_declared_type_and_modifier() {
        let columns = vec![col("id", 23, -1), col("amount", 1700, (12 << 16 | 2) + 4)];
        let table = TableSchema::new(
            TableName::parse("loan"),
            1,
            columns
                .iter()
                .map(|c| ColumnInfo {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    declared: (c.type_oid, c.typmod),
                    type_name: String::new(),
                    data_type: arrow_type(c.type_oid, c.typmod),
                })
                .collect(),
            vec![0],
        );
        assert!(table.matches(&columns));
        let added = [columns.clone(), vec![col("note", 25, -1)]].concat();
        assert!(!table.matches(&added));
        assert_eq!(table.diff(&added).to_string(), "added note");
        let retyped = vec![col("id", 23, -1), col("amount", 1700, (14 << 16 | 2) + 4)];
        assert_eq!(table.diff(&retyped).to_string(), "changed type of amount");
        let dropped = vec![col("id", 23, -1), col("note", 25, -1)];
        assert_eq!(
            table.diff(&dropped).to_string(),
            "added note; dropped amount"
        );
    }
}
