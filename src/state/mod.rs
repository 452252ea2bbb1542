//! In-memory current image of every source table, built from the snapshot and kept
//! up to date by change batches. Exposed to DataFusion as indexed table providers.

mod key;
mod provider;
mod store;
mod table;

pub use key::{is_key_type, key_at, Key};
pub use provider::{Scopes, StateTableProvider, TableScope};
pub use table::StateTable;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state of table {table}: {source}")]
    Arrow {
        table: String,
        source: arrow::error::ArrowError,
    },
    #[error("table {0}: a row arrived with a NULL primary key")]
    NullKey(String),
    #[error("table {table}: unknown change operation `{op}`")]
    UnknownOp { table: String, op: String },
}
