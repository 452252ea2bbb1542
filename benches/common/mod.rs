//! Helpers both benchmarks use (a directory, so Cargo does not take it for a bench).
#![allow(dead_code)] // each bench uses its own subset

use std::process::Command;

/// The `pipeline` binary Cargo built for this bench, or BENCH_PIPELINE_BIN (e.g. a copy
/// built from the previous commit, to compare two builds with the same bench).
pub(crate) fn bin() -> String {
    std::env::var("BENCH_PIPELINE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pipeline").into())
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

/// `url` with BENCH_SSLMODE as its `sslmode` when set (libpq's default `prefer` is TLS on a
/// server with `ssl = on`, as Debian's Postgres has).
pub(crate) fn with_sslmode(mut url: String) -> String {
    if let Ok(mode) = std::env::var("BENCH_SSLMODE") {
        url.push_str(&format!("?sslmode={mode}"));
    }
    url
}

/// BENCH_STATE_CHECKPOINT_EVERY, when set, as `lake`'s state checkpoint interval (0 = off).
pub(crate) fn apply_checkpoint_knob(lake: &mut pipeline::config::LakeConfig) {
    if let Ok(n) = std::env::var("BENCH_STATE_CHECKPOINT_EVERY") {
        lake.maintenance.state_checkpoint_every_changes =
            n.parse().expect("BENCH_STATE_CHECKPOINT_EVERY: a number");
    }
}

/// Drops the replication slot `slot` of `url`'s database if it exists.
pub(crate) fn drop_slot(url: &str, slot: &str) {
    psql(
        url,
        &format!(
            "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots \
             WHERE slot_name = '{slot}'"
        ),
    );
}

/// The `p` quantile (0..=1) of ascending `sorted`; NaN when empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// An S3-API server (s3s-fs) on loopback, for an S3 lake; stopped on drop.
pub(crate) struct S3Server {
    child: std::process::Child,
    port: u16,
    /// The directory s3s-fs keeps objects in, one file per object (`<bucket>/<key>`).
    pub(crate) data: std::path::PathBuf,
}

impl S3Server {
    /// Starts s3s-fs over `dir/s3data` with a bucket `lake`; None when s3s-fs is not
    /// installed (`bash scripts/setup-s3.sh`).
    pub(crate) fn start(dir: &std::path::Path) -> Option<S3Server> {
        let home = std::env::var("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo")
            });
        let bin = std::env::var("S3S_FS_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or(home.join("bin/s3s-fs"));
        if !bin.exists() {
            return None;
        }
        let data = dir.join("s3data");
        std::fs::create_dir_all(data.join("lake")).unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "bench", "--secret-key", "bench-secret"])
            .arg(&data)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Some(S3Server { child, port, data })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A lake at `s3://lake/<prefix>` on this server.
    pub(crate) fn lake(&self, prefix: &str) -> pipeline::config::LakeConfig {
        let mut lake = pipeline::config::LakeConfig::new(format!("s3://lake/{prefix}"));
        lake.storage_options = [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_access_key_id", "bench".into()),
            ("aws_secret_access_key", "bench-secret".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        lake
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on loopback now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The dump the benches restore: BENCH_DUMP, or the shared CRM dump.
pub(crate) fn dump() -> std::path::PathBuf {
    std::env::var("BENCH_DUMP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/dumps/de_test_task_db")
        })
}

/// `pipeline db restore --clean` of [`dump`] into the database at `url`.
pub(crate) fn restore_dump(url: &str) {
    let dump = dump();
    eprintln!("restoring {} into {url} …", dump.display());
    let st = Command::new(bin())
        .args(["db", "--url", url, "restore", "--clean"])
        .arg(&dump)
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success(), "restoring {}", dump.display());
}

/// Starts `pipeline run <file>` logging to `log` at `rust_log`; returns it once it logs
/// that it is streaming, with the time that took. Panics after `timeout`.
pub(crate) fn start_streaming(
    file: &std::path::Path,
    log: &std::path::Path,
    rust_log: &str,
    timeout: std::time::Duration,
) -> (std::process::Child, std::time::Duration) {
    let started = std::time::Instant::now();
    let child = Command::new(bin())
        .arg("run")
        .arg(file)
        .env("RUST_LOG", rust_log)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("streaming changes")
    {
        assert!(
            started.elapsed() < timeout,
            "pipeline did not start streaming: {}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (child, started.elapsed())
}

/// The highest commit version in a Delta log directory (0 when none, or no directory).
pub(crate) fn latest_version(delta_log: &std::path::Path) -> u64 {
    std::fs::read_dir(delta_log)
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".json")?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Runs the command and returns (wall time, peak RSS in MiB) of the child.
// The child is reaped by `wait4` (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
pub(crate) fn run_measured(cmd: &mut Command) -> (std::time::Duration, f64) {
    let started = std::time::Instant::now();
    let child = cmd.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; `usage` is a valid out-pointer.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "pipeline failed"
    );
    (wall, usage.ru_maxrss as f64 / 1024.0)
}

/// The examples' virtualenv (scripts/examples.sh), which has deltalake and duckdb.
pub(crate) fn bench_python() -> Option<std::path::PathBuf> {
    let p = std::env::var("BENCH_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/pipeline-examples-venv/bin/python")
        });
    p.exists().then_some(p)
}
