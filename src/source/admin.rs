//! Postgres administration for the pipeline: the publication, the replication slot
//! (status, drop), the `--once` fence and the replication session's settings. One
//! query reads the slot; `run`, `status` and the periodic health log share it.

use super::{ConnInfo, SourceError, FENCE_PREFIX, SESSION_OPTIONS};
use crate::changelog::Lsn;
use crate::config::{quote_ident, TableName};
use pgwire_replication::ReplicationConfig;
use std::time::Duration;
use tokio_postgres::Client;

/// `wal_status` of a slot: how safe the WAL it needs is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalStatus {
    /// Within `max_wal_size`.
    Reserved,
    /// Beyond `max_wal_size`, kept for the slot.
    Extended,
    /// About to be removed: the slot is falling behind `max_slot_wal_keep_size`.
    Unreserved,
    /// Removed: the slot is invalidated and changes are missing.
    Lost,
}

impl WalStatus {
    fn parse(s: &str) -> Option<WalStatus> {
        Some(match s {
            "reserved" => WalStatus::Reserved,
            "extended" => WalStatus::Extended,
            "unreserved" => WalStatus::Unreserved,
            "lost" => WalStatus::Lost,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WalStatus::Reserved => "reserved",
            WalStatus::Extended => "extended",
            WalStatus::Unreserved => "unreserved",
            WalStatus::Lost => "lost",
        }
    }
}

impl std::fmt::Display for WalStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pipeline's replication slot as Postgres reports it.
#[derive(Debug, Clone)]
pub struct SlotStatus {
    pub slot: String,
    /// Output plugin (the pipeline's slots use `pgoutput`).
    pub plugin: String,
    /// The database the slot decodes.
    pub database: String,
    /// The walsender streaming from it, if one is.
    pub active_pid: Option<i32>,
    /// What the pipeline has acknowledged: every change before it is durable in the lake.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// WAL Postgres keeps for the slot (current WAL position − restart LSN).
    pub retained_wal_bytes: Option<i64>,
    /// How far the lake is behind the source (current WAL position − confirmed flush).
    pub lag_bytes: Option<i64>,
    pub wal_status: Option<WalStatus>,
    /// WAL that can still be written before the slot is invalidated (None: no limit).
    pub safe_wal_size: Option<i64>,
}

impl SlotStatus {
    /// Whether Postgres removed WAL the slot still needed.
    pub fn is_lost(&self) -> bool {
        self.wal_status == Some(WalStatus::Lost)
    }
}

/// The status of replication slot `slot`, or None when it does not exist.
pub async fn slot_status(client: &Client, slot: &str) -> Result<Option<SlotStatus>, SourceError> {
    let row = client
        .query_opt(
            // The current position read once, so that both differences share it.
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(cur.lsn, restart_lsn)::bigint,
                    pg_wal_lsn_diff(cur.lsn, confirmed_flush_lsn)::bigint,
                    wal_status, safe_wal_size
               FROM pg_replication_slots, (SELECT pg_current_wal_lsn() AS lsn) AS cur
              WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| SlotStatus {
        slot: slot.to_string(),
        plugin: row.get::<_, Option<String>>(0).unwrap_or_default(),
        database: row.get::<_, Option<String>>(1).unwrap_or_default(),
        active_pid: row.get(2),
        confirmed_flush_lsn: row.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        retained_wal_bytes: row.get(4),
        lag_bytes: row.get(5),
        wal_status: row
            .get::<_, Option<String>>(6)
            .as_deref()
            .and_then(WalStatus::parse),
        safe_wal_size: row.get(7),
    }))
}

/// Logs the slot's retained WAL and lag; a slot dropped or invalidated while streaming
/// stops the pipeline with an error saying so.
pub async fn check_slot_health(client: &Client, slot: &str) -> Result<(), SourceError> {
    let Some(s) = slot_status(client, slot).await? else {
        return Err(SourceError::SlotDropped {
            slot: slot.to_string(),
        });
    };
    let (retained, lag, safe) = (s.retained_wal_bytes, s.lag_bytes, s.safe_wal_size);
    if let Some(v) = retained {
        metrics::gauge!(crate::metrics::SLOT_RETAINED_BYTES).set(v as f64);
    }
    if let Some(v) = lag {
        metrics::gauge!(crate::metrics::SLOT_LAG_BYTES).set(v as f64);
    }
    match s.wal_status {
        Some(WalStatus::Lost) => {
            return Err(SourceError::SlotInvalidated {
                slot: slot.to_string(),
            })
        }
        Some(WalStatus::Unreserved) => {
            tracing::warn!(slot, retained_wal_bytes = ?retained, lag_bytes = ?lag, safe_wal_size = ?safe,
                "slot is about to lose WAL (wal_status = unreserved): the lake is falling behind")
        }
        status => tracing::info!(slot, retained_wal_bytes = ?retained, lag_bytes = ?lag,
            wal_status = ?status, "slot health"),
    }
    Ok(())
}

pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(())
}

pub async fn check_wal_level(client: &Client) -> Result<(), SourceError> {
    let row = client.query_one("SHOW wal_level", &[]).await?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(SourceError::WalLevel(level));
    }
    Ok(())
}

/// Creates the publication for exactly the configured tables, or adds missing ones.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[TableName],
) -> Result<(), SourceError> {
    let quoted = quote_ident(name);
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

/// Writes a fence into the WAL (a logical message the change stream recognises) and
/// returns its token: a `--once` run stops when the stream delivers it, so it has seen
/// every transaction committed before.
pub async fn emit_fence(client: &Client) -> Result<String, SourceError> {
    let token = format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    client
        .query_one(
            "SELECT pg_logical_emit_message(false, $1, $2)::text",
            &[&FENCE_PREFIX, &token],
        )
        .await?;
    Ok(token)
}

/// Writes a read-your-writes fence: a transactional logical message, so that its commit
/// flushes the WAL and wakes the walsender at once (a non-transactional one waits for
/// the WAL writer). The stream delivers it as a transaction without rows after every
/// transaction committed before it. Returns the message's position: every LSN a reader
/// obtained before the call is at or below it.
pub async fn emit_wait_fence(client: &Client) -> Result<Lsn, SourceError> {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, 'rw')::text",
            &[&FENCE_PREFIX],
        )
        .await?;
    let text: &str = row.get(0);
    text.parse()
        .map_err(|e| SourceError::Protocol(format!("pg_logical_emit_message returned {e}")))
}

/// Settings of the replication session that streams `slot` through `publication`.
pub fn replication_config(
    conn: &ConnInfo,
    slot: &str,
    publication: &str,
    application: &str,
) -> ReplicationConfig {
    ReplicationConfig::new(
        conn.host.clone(),
        conn.user.clone(),
        conn.password.clone(),
        conn.database.clone(),
        slot.to_string(),
        publication.to_string(),
    )
    .with_port(conn.port)
    .with_tls(conn.tls.replication())
    .with_options(SESSION_OPTIONS)
    .with_application_name(application.to_string())
    .with_status_interval(Duration::from_millis(100))
    .with_buffer_size(16 * 1024)
    // Without an observer the client does not track unsent feedback, and the last
    // acknowledgement before a stop (shutdown, schema change) could be dropped: the
    // batcher waits on it before closing the stream.
    .with_feedback_observer(pgwire_replication::FeedbackObserver::new(|sent| {
        tracing::trace!(?sent, "standby status sent")
    }))
}
