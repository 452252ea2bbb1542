//! In-memory current image of every source table ([`State`]), built from the snapshot
//! (or rebuilt from the raw mirror) and kept up to date by change batches. Exposed to
//! DataFusion as indexed table providers whose scans a query's [`Scopes`] limit.

mod index;
mod key;
mod provider;
mod scan;
mod stage;
mod store;
mod table;

pub use key::{is_key_type, key_at, Key};
pub use provider::{Scopes, StateTableProvider, TableScope};
pub use stage::{Changed, State};
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
    #[error("table {table}: {source}")]
    UnknownOp {
        table: String,
        source: crate::changelog::UnknownOp,
    },
}
