//! `serve`: the online API inside `pipeline run` (features from memory, read-your-writes).

use super::Invalid;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Off: `pipeline run` serves nothing.
    pub enabled: bool,
    /// Address to listen on (`host:port`).
    pub listen: String,
    /// Bearer token every request but `/health` must carry; empty means no
    /// authentication, which is allowed only on a loopback address.
    pub token: String,
    /// Most keys one `POST /v1/features/{file}` may ask for.
    pub max_keys: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Wait for `min_lsn` when a request gives no `timeout_ms`.
    pub default_wait_ms: u64,
    /// Longest wait a request may ask for (larger `timeout_ms` values are capped).
    pub max_wait_ms: u64,
    /// Requests handled at once (waiting ones included); more are answered 503 at once,
    /// so a flood slows reads but cannot grow memory or starve the pipeline.
    pub max_in_flight: usize,
    /// Open connections; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            token: String::new(),
            max_keys: 1_000,
            max_body_bytes: 256 * 1024,
            default_wait_ms: 1_000,
            max_wait_ms: 10_000,
            max_in_flight: 1_024,
            max_connections: 4_096,
        }
    }
}

/// Shown without the token.
impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("token", &if self.token.is_empty() { "" } else { "<set>" })
            .field("max_keys", &self.max_keys)
            .field("max_wait_ms", &self.max_wait_ms)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl ServeConfig {
    /// The listen address, checked by [`ServeConfig::validate`].
    pub fn addr(&self) -> SocketAddr {
        self.listen
            .trim()
            .parse()
            .expect("validated listen address")
    }

    /// The wait a request gets for `timeout_ms` (none given: the default), capped.
    pub fn wait(&self, timeout_ms: Option<u64>) -> Duration {
        Duration::from_millis(
            timeout_ms
                .unwrap_or(self.default_wait_ms)
                .min(self.max_wait_ms),
        )
    }

    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if !self.enabled {
            return Ok(());
        }
        let addr: SocketAddr = self.listen.trim().parse().map_err(|e| {
            Invalid::at(
                "listen",
                format!("`{}` is not an address (host:port): {e}", self.listen),
            )
        })?;
        if self.token.trim().is_empty() && !addr.ip().is_loopback() {
            return Err(Invalid::at(
                "token",
                format!(
                    "listening on {addr}, which is not a loopback address, needs a bearer token \
                     (set PIPELINE_API_TOKEN): anyone on the network could read every feature"
                ),
            ));
        }
        for (at, v) in [
            ("max_keys", self.max_keys),
            ("max_body_bytes", self.max_body_bytes),
            ("max_in_flight", self.max_in_flight),
            ("max_connections", self.max_connections),
        ] {
            if v == 0 {
                return Err(Invalid::at(at, "must be positive"));
            }
        }
        // Connections idle for 2 minutes are closed; a wait must end well before.
        if self.max_wait_ms > 60_000 {
            return Err(Invalid::at("max_wait_ms", "must not exceed 60000"));
        }
        if self.default_wait_ms > self.max_wait_ms {
            return Err(Invalid::at(
                "default_wait_ms",
                format!("must not exceed max_wait_ms ({})", self.max_wait_ms),
            ));
        }
        Ok(())
    }

    /// Off, as a pipeline built in code starts (tests pick their own port).
    pub fn disabled() -> ServeConfig {
        ServeConfig {
            enabled: false,
            ..ServeConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_address_needs_a_token_and_waits_are_capped() {
        let mut c = ServeConfig::default();
        assert_eq!(c.validate(), Ok(()));
        c.listen = "0.0.0.0:8080".into();
        assert_eq!(c.validate().unwrap_err().at, "token");
        c.token = "s3cret".into();
        assert_eq!(c.validate(), Ok(()));
        c.listen = "localhost".into();
        assert_eq!(c.validate().unwrap_err().at, "listen");
        c.listen = "[::1]:9".into();
        c.max_keys = 0;
        assert_eq!(c.validate().unwrap_err().at, "max_keys");
        c.max_keys = 10;
        assert_eq!(c.wait(None), Duration::from_millis(1_000));
        assert_eq!(c.wait(Some(60_000)), Duration::from_millis(10_000));
        assert_eq!(c.wait(Some(5)), Duration::from_millis(5));
        c.enabled = false;
        c.listen = "nonsense".into();
        assert_eq!(c.validate(), Ok(()), "a disabled section is not checked");
    }
}
