//! Helpers both benchmarks use (a directory, so Cargo does not take it for a bench).
#![allow(dead_code)] // each bench uses its own subset

use std::process::Command;

/// The `pipeline` binary Cargo built for this bench.
pub(crate) fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline")
}

/// The Postgres server the benches use, without a database.
pub(crate) fn pg_base() -> String {
    std::env::var("BENCH_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A setting from the environment, or `default`.
pub(crate) fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `sql` with psql against `url`; its output, trimmed. Panics with psql's error.
pub(crate) fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-tA", url, "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The `p` quantile (0..=1) of ascending `sorted`; NaN when empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
