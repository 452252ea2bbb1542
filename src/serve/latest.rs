//! Reads of the Delta feature tables: an entity's latest features (`pipeline latest`),
//! and every entity's, to load the online store when a run resumes.

use crate::sink::{Lake, LakeTable, SinkError};
use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("feature table {table}: {message}")]
    Read { table: String, message: String },
}

/// Latest row (highest `_lsn`) of each requested entity in `<lake>/features/<table>`.
pub async fn latest(
    lake: &Lake,
    table: &str,
    key_column: &str,
    keys: &[String],
) -> Result<Vec<RecordBatch>, ServeError> {
    let err = |e: &dyn std::fmt::Display| ServeError::Read {
        table: table.to_string(),
        message: e.to_string(),
    };
    let t = lake.existing_table(&LakeTable::features(table)).await?;
    let ctx = SessionContext::new();
    t.update_datafusion_session(&ctx.state())
        .map_err(|e| err(&e))?;
    ctx.register_table("f", t.table_provider().await.map_err(|e| err(&e))?)
        .map_err(|e| err(&e))?;
    let key = crate::config::quote_ident(key_column);
    let filter = if keys.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = keys
            .iter()
            .map(|k| match k.parse::<i64>() {
                Ok(n) => n.to_string(),
                Err(_) => format!("'{}'", k.replace('\'', "''")),
            })
            .collect();
        format!("WHERE {key} IN ({})", list.join(", "))
    };
    let sql = format!(
        "SELECT * EXCEPT (rn) FROM (SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY _lsn DESC, computed_at DESC) AS rn \
         FROM f {filter}) WHERE rn = 1 ORDER BY {key}"
    );
    ctx.sql(&sql)
        .await
        .map_err(|e| err(&e))?
        .collect()
        .await
        .map_err(|e| err(&e))
}
