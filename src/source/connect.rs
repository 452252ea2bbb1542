//! Connections to the source database, with retry and backoff.

use super::tls::TlsSettings;
use super::SourceError;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls, Socket};

/// Session settings that fix the text formats the decoder relies on.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=1";

/// The parts of a `postgres://` URL both clients need.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The URL without its TLS parameters (those are in `tls`).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey` as libpq reads them.
    pub tls: TlsSettings,
}

impl ConnInfo {
    pub fn parse(url: &str) -> Result<ConnInfo, SourceError> {
        let (url, tls) = TlsSettings::split(url)
            .map_err(|e| SourceError::Url(format!("{}: {e}", redact(url))))?;
        let url = url.as_str();
        let cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| SourceError::Url(format!("{}: {}", redact(url), chain(&e))))?;
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
            tls,
        })
    }

    /// The URL as libpq tools (`psql`, `pg_restore`) take it, TLS parameters included.
    pub fn libpq_url(&self) -> String {
        let params: Vec<String> = self
            .tls
            .url_params()
            .into_iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(&v)))
            .collect();
        if params.is_empty() {
            return self.url.clone();
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}{}", self.url, params.join("&"))
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

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An error and its causes, `: `-separated (tokio-postgres prints only its own kind).
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

/// Whether a failed connection failed in its TLS handshake or negotiation: a retry would
/// fail the same way, an operator must fix the URL or the server's certificate.
fn is_tls_failure(error: &tokio_postgres::Error, tls: &TlsSettings) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // io::Error::source() skips the error it wraps, so look inside it.
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                return true;
            }
        }
        next = e.source();
    }
    // tokio-postgres keeps its error kinds private; "server does not support TLS" is the
    // one refusal it reports without a rustls error.
    tls.mode.requires_tls() && error.to_string() == "error performing TLS handshake"
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

/// One connection attempt; the connection task runs until the client is dropped.
async fn open<T>(cfg: &tokio_postgres::Config, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, conn) = cfg.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Connects with exponential backoff (100 ms doubling to 5 s), logging each failure.
pub async fn connect(info: &ConnInfo, attempts: u32) -> Result<Client, SourceError> {
    let mut cfg = tokio_postgres::Config::from_str(&info.url)
        .map_err(|e| SourceError::Url(format!("{}: {e}", redact(&info.url))))?;
    cfg.options(SESSION_OPTIONS)
        .application_name("pipeline")
        .connect_timeout(Duration::from_secs(5))
        .ssl_mode(info.tls.postgres_mode());
    let tls = info
        .tls
        .client_config()
        .map_err(|message| SourceError::Tls {
            target: info.target(),
            message,
        })?
        .map(tokio_postgres_rustls::MakeRustlsConnect::new);
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let connected = match &tls {
            Some(tls) => open(&cfg, tls.clone()).await,
            None => open(&cfg, NoTls).await,
        };
        match connected {
            Ok(client) => return Ok(client),
            Err(e) if is_tls_failure(&e, &info.tls) => {
                let mut message = chain(&e);
                if message == "error performing TLS handshake" {
                    message.push_str(": the server does not support TLS (it has ssl = off)");
                }
                return Err(SourceError::Tls {
                    target: info.target(),
                    message: format!("{message} (sslmode={})", info.tls.mode.as_str()),
                });
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
                    error: source,
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
