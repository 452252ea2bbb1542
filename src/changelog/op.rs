//! What a change did to its row.

use arrow::array::{Array, AsArray, RecordBatch};

/// The operation of one change row: the raw mirror's `_op` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// Every row of the table went (the row image is all NULL).
    Truncate,
}

impl Op {
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "insert" => Op::Insert,
            "update" => Op::Update,
            "delete" => Op::Delete,
            "truncate" => Op::Truncate,
            _ => return None,
        })
    }

    /// The change leaves a row image behind (insert or update).
    pub const fn writes_row(self) -> bool {
        matches!(self, Op::Insert | Op::Update)
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `_op` value no [`Op`] names (a lake written by something else).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown change operation `{0}`")]
pub struct UnknownOp(pub String);

/// The operation of every row of `rows`, decoded once from its `_op` column. Rows
/// without one (a snapshot's plain rows) are inserts.
pub fn ops(rows: &RecordBatch) -> Result<Vec<Op>, UnknownOp> {
    let Some(column) = rows.column_by_name(super::OP) else {
        return Ok(vec![Op::Insert; rows.num_rows()]);
    };
    let Some(text) = column.as_string_opt::<i32>() else {
        return Err(UnknownOp(format!(
            "(an _op column of type {})",
            column.data_type()
        )));
    };
    (0..text.len())
        .map(|i| {
            let s = if text.is_null(i) { "" } else { text.value(i) };
            Op::parse(s).ok_or_else(|| UnknownOp(s.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn decodes_the_op_column_once_and_refuses_unknown_values() {
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
            assert_eq!(Op::parse(op.as_str()), Some(op));
        }
        let schema = Arc::new(Schema::new(vec![Field::new(
            super::super::OP,
            DataType::Utf8,
            true,
        )]));
        let batch = |v: Vec<Option<&str>>| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(v))]).unwrap()
        };
        assert_eq!(
            ops(&batch(vec![Some("insert"), Some("delete")])),
            Ok(vec![Op::Insert, Op::Delete])
        );
        assert_eq!(
            ops(&batch(vec![Some("upsert")])),
            Err(UnknownOp("upsert".into()))
        );
        assert!(ops(&batch(vec![None])).is_err());
        let plain = RecordBatch::new_empty(Arc::new(Schema::empty()));
        assert_eq!(ops(&plain), Ok(vec![]));
    }
}
