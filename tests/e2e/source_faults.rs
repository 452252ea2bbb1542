//! Faults of the source database. Each test runs its own PostgreSQL cluster (initdb into a
//! temporary directory, served on a loopback port) so that restarting it, or starving its
//! slot of WAL, cannot disturb the tests sharing the machine's server.

use crate::faults::*;
use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A throwaway PostgreSQL cluster with `wal_level = logical`.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

/// The newest installed PostgreSQL's binaries (`PG_BIN` overrides).
fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN") {
        return PathBuf::from(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (or set PG_BIN)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no initdb under /usr/lib/postgresql")
        .1
}

/// Runs a server binary, as the `postgres` user when we are root (initdb refuses root).
fn pg_command(bin: &Path, tool: &str) -> Command {
    let path = bin.join(tool);
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn check(mut c: Command, what: &str) {
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PrivatePostgres {
    /// initdb (with `initdb_args`) and start with `settings` (`name=value`).
    pub fn start(initdb_args: &[&str], settings: &[&str]) -> PrivatePostgres {
        let dir = tempfile::tempdir().unwrap();
        if unsafe { libc::geteuid() } == 0 {
            check(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown the cluster directory",
            );
        }
        let bin = pg_bin();
        let mut initdb = pg_command(&bin, "initdb");
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .args(initdb_args);
        check(initdb, "initdb");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePostgres { dir, port, bin };
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nfsync = off\nshared_buffers = 16MB\nmax_wal_senders = 4\n\
             max_replication_slots = 4\n",
            pg.dir.path().display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let auto = pg.dir.path().join("data/postgresql.auto.conf");
        std::fs::write(&auto, conf).unwrap();
        pg.ctl(&["start", "-w", "-t", "60"]);
        pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Replaces `pg_hba.conf` and reloads the server.
    pub fn set_hba(&self, hba: &str) {
        std::fs::write(self.dir.path().join("data/pg_hba.conf"), hba).unwrap();
        self.ctl(&["reload"]);
    }

    fn ctl(&self, args: &[&str]) {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(args);
        check(c, &format!("pg_ctl {args:?}"));
    }

    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Restarts the server: `fast` (clean shutdown, sessions terminated) or `immediate`
    /// (a crash: no shutdown checkpoint, recovery from the WAL on start).
    pub fn restart(&self, mode: &str) {
        self.ctl(&["restart", "-w", "-t", "60", "-m", mode]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["stop", "-m", "immediate"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

async fn connect(info: &pipeline::source::ConnInfo) -> tokio_postgres::Client {
    pipeline::source::connect(info, 10).await.unwrap()
}

/// Postgres restarted twice under a streaming pipeline, once cleanly and once as a crash,
/// while a load runs between the restarts: the pipeline reconnects with backoff on its
/// own, and the lake ends equal to Postgres (every change once, features = oracle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_mid_stream_lose_nothing() {
    let pg = PrivatePostgres::start(&[], &[]);
    let (info, _) = audited_db_at(&pg.base_url(), "pt_pg_restart").await;
    let mut p = pipeline_file(&info, "pg_restart", Some(AS_OF));
    run_once(&p, "--once snapshot");

    let log = p.dir.join("run.log");
    let mut pipeline = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .arg("run")
        .arg(&p.file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut transactions = 0;
    for (round, mode) in ["fast", "immediate", ""].into_iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let load = spawn_load(info.url.clone(), 0x9e57 + round as u64, stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        transactions += load.await.unwrap();
        if !mode.is_empty() {
            pg.restart(mode);
        }
    }
    let client = connect(&info).await;
    if let Err(features) =
        oracle_matches_within(&p.lake, &client, AS_OF, Duration::from_secs(90)).await
    {
        // Seen once and not explained: keep everything, and tell whether the raw mirror
        // (which the next call checks first) or only the features went wrong.
        p.keep();
        eprintln!(
            "{features}\n--- pipeline log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_lake_equals_postgres(&p, &client, transactions).await;
        panic!("{features}");
    }
    assert!(
        pipeline.try_wait().unwrap().is_none(),
        "the pipeline exited after a Postgres restart instead of reconnecting:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    unsafe { libc::kill(pipeline.id() as i32, libc::SIGTERM) };
    assert!(pipeline.wait().unwrap().success(), "graceful stop");
    let text = std::fs::read_to_string(&log).unwrap();
    let reconnects = text.matches("pipeline interrupted, restarting").count();
    assert!(
        reconnects >= 2,
        "expected a reconnect per Postgres restart, saw {reconnects}:\n{text}"
    );

    run_once(&p, "final --once");
    assert_lake_equals_postgres(&p, &client, transactions).await;
}

/// The slot invalidated (`max_slot_wal_keep_size` exceeded) while the pipeline was down:
/// `run` refuses loudly, naming the slot and `pipeline resnapshot`; the resnapshot then
/// rebuilds every table consistently and streaming goes on from the new slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_and_resnapshot_rebuilds_the_lake() {
    // 1 MB WAL segments, so a few MB of WAL exceed the slot's allowance quickly.
    let pg = PrivatePostgres::start(&["--wal-segsize=1"], &["max_slot_wal_keep_size = 2MB"]);
    let (info, client) = audited_db_at(&pg.base_url(), "pt_slot_lost").await;
    let p = pipeline_file(&info, "slot_lost", Some(AS_OF));
    run_once(&p, "--once snapshot");

    // While the pipeline is down: a change it must not silently skip, then enough WAL
    // (and checkpoints) for Postgres to invalidate the slot.
    for sql in [
        "UPDATE loan SET status = 'paid' WHERE id IN (SELECT id FROM loan ORDER BY id LIMIT 50)",
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 60000) g",
        "SELECT pg_switch_wal()",
        "CHECKPOINT",
        "INSERT INTO filler SELECT g, repeat('y', 200) FROM generate_series(1, 60000) g",
        "SELECT pg_switch_wal()",
        "CHECKPOINT",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let status: Option<String> = client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the slot should be invalidated"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "--once"])
        .arg(&p.file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run must refuse an invalidated slot");
    assert!(
        stderr.contains(&p.slot)
            && stderr.contains("invalidated")
            && stderr.contains("pipeline resnapshot"),
        "the error names the slot, the cause and the way out: {stderr}"
    );

    run_ok(&p, &["resnapshot"], "resnapshot");
    assert!(
        !p.dir.join("lake/_pipeline/resnapshot-in-progress").exists(),
        "the resnapshot mark is cleared once every table holds the snapshot"
    );
    // Streaming goes on from the new slot.
    client
        .batch_execute(
            "DELETE FROM audit_changes; UPDATE loan SET status = 'overdue' WHERE id <= 20",
        )
        .await
        .unwrap();
    run_once(&p, "--once after the resnapshot");
    // The raw tables now start at the new snapshot; the audit counts what came after it.
    assert_lake_equals_postgres(&p, &client, 1).await;
}
