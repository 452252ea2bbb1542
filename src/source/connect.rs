//! Connections to the source database, with retry and backoff.

use super::SourceError;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

/// Session settings that fix the text formats the decoder relies on.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=1";

/// The parts of a `postgres://` URL both clients need.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl ConnInfo {
    pub fn parse(url: &str) -> Result<ConnInfo, SourceError> {
        let cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| SourceError::Url(format!("{}: {e}", redact(url))))?;
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_string(),
        };
        Ok(ConnInfo {
            url: url.to_string(),
            host,
            port: cfg.get_ports().first().copied().unwrap_or(5432),
            user: cfg.get_user().unwrap_or("postgres").to_string(),
            password: cfg
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
            database: cfg.get_dbname().unwrap_or("postgres").to_string(),
        })
    }

    /// `host:port/db`, never the password.
    pub fn target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    pub fn with_database(&self, db: &str) -> ConnInfo {
        let mut c = self.clone();
        c.database = db.to_string();
        c.url = format_url(&c);
        c
    }
}

fn format_url(c: &ConnInfo) -> String {
    let auth = if c.password.is_empty() {
        c.user.clone()
    } else {
        format!("{}:{}", c.user, c.password)
    };
    format!("postgres://{auth}@{}:{}/{}", c.host, c.port, c.database)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Connects with exponential backoff (100 ms doubling to 5 s), logging each failure.
pub async fn connect(info: &ConnInfo, attempts: u32) -> Result<Client, SourceError> {
    let mut cfg = tokio_postgres::Config::from_str(&info.url)
        .map_err(|e| SourceError::Url(format!("{}: {e}", redact(&info.url))))?;
    cfg.options(SESSION_OPTIONS)
        .application_name("pipeline")
        .connect_timeout(Duration::from_secs(5));
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match cfg.connect(NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "postgres connection closed");
                    }
                });
                return Ok(client);
            }
            Err(e) if attempt < attempts.max(1) && e.as_db_error().is_none() => {
                tracing::warn!(
                    target_db = %info.target(), attempt, retry_in_ms = delay.as_millis() as u64,
                    error = %e, "postgres unreachable, retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            Err(source) => {
                return Err(SourceError::Connect {
                    target: info.target(),
                    attempts: attempt,
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_never_shows_passwords() {
        let c = ConnInfo::parse("postgres://app:s3cret@db.local:6543/crm").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str()),
            ("db.local", 6543, "app")
        );
        assert_eq!(c.target(), "db.local:6543/crm");
        assert_eq!(redact(&c.url), "postgres://app:***@db.local:6543/crm");
        assert_eq!(c.with_database("postgres").database, "postgres");
    }
}
