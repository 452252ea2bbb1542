//! CDC source: Postgres catalog, publication and slot set-up, the consistent initial
//! snapshot, and the pgoutput change stream.

mod admin;
mod catalog;
mod connect;
pub mod encode;
pub mod pgoutput;
mod snapshot;
mod stream;
pub mod text;
pub mod tls;

pub use admin::{
    check_slot_health, check_wal_level, drop_slot, emit_fence, emit_wait_fence, ensure_publication,
    replication_config, slot_status, SlotStatus, WalStatus,
};
pub use catalog::{arrow_type, load_schemas, relation_schema, ColumnInfo, SchemaDiff, TableSchema};
pub use connect::{connect, ConnInfo, SESSION_OPTIONS};
pub use snapshot::{create_slot_with_snapshot, InitialSnapshot};
pub use stream::{ChangeStream, SourceEvent, FENCE_PREFIX};

use crate::config::TableName;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid source url: {0}")]
    Url(String),
    // tokio-postgres prints only its error's kind ("db error"), so these show the whole
    // chain themselves and are no error's `source` (which would print it twice).
    #[error(
        "cannot connect to Postgres at {target} after {attempts} attempts: {}",
        connect::chain(.error)
    )]
    Connect {
        target: String,
        attempts: u32,
        error: tokio_postgres::Error,
    },
    /// TLS could not be set up or the handshake failed: a retry fails the same way.
    #[error("TLS to Postgres at {target}: {message}")]
    Tls { target: String, message: String },
    #[error("postgres: {}", connect::chain(.0))]
    Postgres(tokio_postgres::Error),
    #[error("replication connection: {source}")]
    Replication {
        /// The server's SQLSTATE, when the server refused something.
        sqlstate: Option<String>,
        source: pgwire_replication::PgWireError,
    },
    #[error(
        "wal_level is `{0}`, logical replication needs `logical`. Fix: run \
         `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart Postgres \
         (scripts/setup-postgres.sh does both)"
    )]
    WalLevel(String),
    #[error("source table {0} does not exist")]
    TableMissing(TableName),
    #[error("source table {table} {message}")]
    Table { table: TableName, message: String },
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    /// The replication protocol did not go as it must (a reply without its row, a change
    /// before its Relation message).
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("replication stream ended unexpectedly")]
    StreamEnded,
    #[error("replication slot `{slot}` was dropped while the pipeline was streaming")]
    SlotDropped { slot: String },
    #[error(
        "replication slot `{slot}` was invalidated (wal_status = lost): Postgres removed \
         WAL it still needed, so changes are missing. Rebuild the lake consistently with \
         `pipeline resnapshot <pipeline.yaml>`"
    )]
    SlotInvalidated { slot: String },
    #[error("snapshot of {table}: {message}")]
    Snapshot { table: TableName, message: String },
    #[error("snapshot copy task failed: {0}")]
    SnapshotTask(String),
}

impl From<tokio_postgres::Error> for SourceError {
    fn from(e: tokio_postgres::Error) -> SourceError {
        SourceError::Postgres(e)
    }
}

impl From<pgwire_replication::PgWireError> for SourceError {
    fn from(source: pgwire_replication::PgWireError) -> SourceError {
        // The replication client keeps only the server's formatted message; its SQLSTATE
        // is read out once, here, for the retry policy.
        let sqlstate = match &source {
            pgwire_replication::PgWireError::Server(m) => m
                .split("SQLSTATE ")
                .nth(1)
                .and_then(|c| c.get(..5))
                .map(str::to_string),
            _ => None,
        };
        SourceError::Replication { sqlstate, source }
    }
}
