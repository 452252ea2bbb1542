//! `pipeline db`: restore a pg_dump (custom or plain format) or seed deterministic data.
//! Dev tooling for demos and tests, part of the binary, not of the engine library.

pub(crate) mod seed;

pub(crate) use seed::{seed, SeedOptions};

use pipeline::source::{connect, ConnInfo, SourceError};
use std::path::Path;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{}: {message}", file.display())]
    Dump {
        file: std::path::PathBuf,
        message: String,
    },
    #[error("`{tool}` failed: {message}")]
    Tool { tool: String, message: String },
}

/// Creates the target database if missing; with `clean`, drops it first (with any
/// replication slots on it, which would otherwise block the drop).
pub(crate) async fn prepare_database(info: &ConnInfo, clean: bool) -> Result<(), DbError> {
    let admin = connect(&info.with_database("postgres"), 8).await?;
    let db = &info.database;
    if clean {
        let slots = admin
            .query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE database = $1",
                &[db],
            )
            .await?;
        for s in slots {
            let name: String = s.get(0);
            tracing::warn!(slot = %name, "dropping replication slot of the database being recreated");
            admin
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await?;
        }
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                pipeline::config::quote_ident(db)
            ))
            .await?;
    }
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[db])
        .await?
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {}",
                pipeline::config::quote_ident(db)
            ))
            .await?;
        tracing::info!(database = %db, "created database");
    }
    Ok(())
}

/// Restores `dump` into the database of `info`: custom format (`PGDMP` magic) with
/// `pg_restore`, anything else as plain SQL with `psql`.
pub(crate) async fn restore(info: &ConnInfo, dump: &Path, clean: bool) -> Result<(), DbError> {
    let head = {
        use std::io::Read;
        let mut f = std::fs::File::open(dump).map_err(|e| DbError::Dump {
            file: dump.to_path_buf(),
            message: format!("cannot open: {e}"),
        })?;
        let mut head = [0u8; 5];
        let n = f.read(&mut head).unwrap_or(0);
        head[..n].to_vec()
    };
    prepare_database(info, clean).await?;
    let started = std::time::Instant::now();
    let url = &info.libpq_url();
    let (tool, mut cmd) = if head == b"PGDMP" {
        let mut c = Command::new("pg_restore");
        c.args([
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "-d",
            url,
        ]);
        ("pg_restore", c)
    } else {
        let mut c = Command::new("psql");
        c.args(["-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"]);
        ("psql", c)
    };
    cmd.arg(dump);
    tracing::info!(dump = %dump.display(), format = if tool == "psql" { "plain" } else { "custom" },
        target = %info.target(), "restoring");
    let spinner =
        indicatif::ProgressBar::new_spinner().with_message(format!("restoring {}", dump.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let out = cmd.output().await.map_err(|e| DbError::Tool {
        tool: tool.into(),
        message: format!("cannot run it (is the PostgreSQL client installed?): {e}"),
    })?;
    spinner.finish_and_clear();
    if !out.status.success() {
        return Err(DbError::Tool {
            tool: tool.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "restore finished"
    );
    Ok(())
}
