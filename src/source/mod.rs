//! CDC source: Postgres catalog, publication and slot set-up, the consistent initial
//! snapshot, and the pgoutput change stream.

mod catalog;
mod connect;
pub mod pgoutput;
mod snapshot;
mod stream;
pub mod text;

pub use catalog::{arrow_type, load_schemas, relation_schema, ColumnInfo, SchemaDiff, TableSchema};
pub use connect::{connect, ConnInfo, SESSION_OPTIONS};
pub use snapshot::{create_slot_with_snapshot, InitialSnapshot};
pub use stream::{ChangeStream, Op, SourceEvent, FENCE_PREFIX};

use crate::config::TableName;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid source url: {0}")]
    Url(String),
    #[error("cannot connect to Postgres at {target} after {attempts} attempts: {source}")]
    Connect {
        target: String,
        attempts: u32,
        source: tokio_postgres::Error,
    },
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("replication connection: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
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
    #[error("replication slot: {0}")]
    Slot(String),
    #[error("snapshot of {table}: {message}")]
    Snapshot { table: TableName, message: String },
}

/// Current state of the replication slot, when it exists.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: String,
    pub database: String,
    pub confirmed_flush_lsn: Option<u64>,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
}

pub async fn check_wal_level(client: &tokio_postgres::Client) -> Result<(), SourceError> {
    let row = client.query_one("SHOW wal_level", &[]).await?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(SourceError::WalLevel(level));
    }
    Ok(())
}

/// Creates the publication for exactly the configured tables, or adds missing ones.
pub async fn ensure_publication(
    client: &tokio_postgres::Client,
    name: &str,
    tables: &[TableName],
) -> Result<(), SourceError> {
    let quoted = crate::config::quote_ident(name);
    let exists = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    match exists {
        None => {
            let list: Vec<String> = tables.iter().map(TableName::quoted).collect();
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {quoted} FOR TABLE {}",
                    list.join(", ")
                ))
                .await?;
            tracing::info!(publication = name, "created publication");
        }
        Some(row) if row.get::<_, bool>(0) => {}
        Some(_) => {
            for t in tables {
                let has = client
                    .query_opt(
                        "SELECT 1 FROM pg_publication_tables
                          WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                        &[&name, &t.schema, &t.name],
                    )
                    .await?;
                if has.is_none() {
                    client
                        .batch_execute(&format!(
                            "ALTER PUBLICATION {quoted} ADD TABLE {}",
                            t.quoted()
                        ))
                        .await?;
                    tracing::info!(publication = name, table = %t, "added table to publication");
                }
            }
        }
    }
    Ok(())
}

pub async fn slot_info(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, active_pid, wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get::<_, Option<String>>(0).unwrap_or_default(),
        database: r.get::<_, Option<String>>(1).unwrap_or_default(),
        confirmed_flush_lsn: parse_lsn(r.get(2)),
        active_pid: r.get(3),
        wal_status: r.get(4),
    }))
}

/// An LSN as Postgres prints it (`16/B374D848`, read as text from a query), if any.
pub fn parse_lsn(text: Option<String>) -> Option<u64> {
    text.and_then(|s| pgwire_replication::Lsn::parse(&s).ok())
        .map(|l| l.as_u64())
}

/// Formats a 64-bit LSN the way Postgres prints it (`16/B374D848`).
pub fn lsn_string(lsn: u64) -> String {
    pgwire_replication::Lsn::from_u64(lsn).to_pg_string()
}
