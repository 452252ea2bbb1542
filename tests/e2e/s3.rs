//! The lake on a real S3-API server (s3s-fs on loopback, installed by scripts/setup-s3.sh):
//! snapshot, streaming, kill -9 and a 30 s outage of the S3 server, checked against Postgres.

use crate::faults::*;
use crate::support::*;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ACCESS_KEY: &str = "pipeline-test";
const SECRET_KEY: &str = "pipeline-test-secret";
const BUCKET: &str = "lake";

/// An s3s-fs process serving a temporary directory on a loopback port; stop and start it
/// again on the same port and data to simulate an outage.
pub struct S3Server {
    data: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

fn s3s_fs_binary() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS_BIN") {
        return PathBuf::from(p);
    }
    let cargo_bin = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"))
        .join("bin/s3s-fs");
    assert!(
        cargo_bin.exists(),
        "s3s-fs not found at {}: run `bash scripts/setup-s3.sh` (or set S3S_FS_BIN)",
        cargo_bin.display()
    );
    cargo_bin
}

impl S3Server {
    pub fn start() -> S3Server {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(data.path().join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = S3Server {
            data,
            port,
            child: None,
        };
        s.resume();
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The lake URL and storage options of a lake under `prefix`.
    pub fn lake(&self, prefix: &str) -> (String, BTreeMap<String, String>) {
        let options = [
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", "true".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_access_key_id", ACCESS_KEY.to_string()),
            ("aws_secret_access_key", SECRET_KEY.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        (format!("s3://{BUCKET}/{prefix}"), options)
    }

    /// Starts the server (again) on the same port and data directory.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.data.path().join("s3s-fs.log")).unwrap();
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The highest Delta `txn` version in any of the lake's tables under `prefix`, read from
    /// s3s-fs's files (works while the server is down). A batch is acknowledged once the
    /// tables it touches hold it; the others legitimately keep older versions.
    pub fn committed_txn_version(&self, prefix: &str) -> u64 {
        let root = self.data.path().join(BUCKET).join(prefix);
        let mut highest_anywhere = 0;
        for kind in ["raw", "features"] {
            for table in std::fs::read_dir(root.join(kind)).unwrap() {
                let log = table.unwrap().path().join("_delta_log");
                let highest = std::fs::read_dir(&log)
                    .unwrap()
                    .filter_map(|e| {
                        let path = e.ok()?.path();
                        (path.extension()? == "json").then(|| std::fs::read_to_string(path).ok())?
                    })
                    .flat_map(|commit| txn_versions(&commit))
                    .max()
                    .unwrap_or(0);
                highest_anywhere = highest_anywhere.max(highest);
            }
        }
        highest_anywhere
    }

    /// Kills the server (SIGKILL): requests in flight fail, new ones are refused.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A pipeline process that a failing assertion must not leave streaming.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("S3_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    )
}

/// Snapshot and streaming into an S3 lake, with the pipeline killed (SIGKILL) at random
/// moments and the S3 server down for 30 s mid-stream: the slot is not acknowledged while
/// S3 is down, the pipeline catches up when it returns, and the lake ends equal to Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_lake_survives_kill_9_and_an_s3_outage() {
    let mut s3 = S3Server::start();
    let (info, client) = audited_db("pt_s3").await;
    let p = pipeline_file_with_lake(&info, "s3", Some(AS_OF), Some(s3.lake("pt_s3")));
    let log = p.dir.join("runs.log");

    run_once(&p, "--once on an S3 lake");
    wait_until_oracle_matches(&p.lake, &client, AS_OF, Duration::from_secs(5)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(info.url.clone(), 0x53, stop.clone());
    for delay_ms in [700, 1900, 1300] {
        run_and_kill(&p, Duration::from_millis(delay_ms), &log);
        wait_slot_released(&client, &p.slot).await;
    }

    // Streaming while the S3 server goes away and comes back.
    let mut pipeline = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .arg("run")
            .arg(&p.file)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(p.dir.join("outage.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // Mid-stream: once it streams (state rebuilt from the lake), plus a few batches.
    let started = Instant::now();
    while !std::fs::read_to_string(p.dir.join("outage.log"))
        .unwrap_or_default()
        .contains("streaming changes")
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never streamed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    s3.stop();
    // During the outage the slot may move only as far as the lake holds, read from
    // s3s-fs's files directly (nothing can commit while it is down, so an acknowledgement
    // past every table's newest txn version would be one of nothing durable). The slot
    // may still move up to what landed before the stop: an acknowledgement can trail its
    // commits by more than the second waited on a loaded machine. Loss is also ruled out
    // by the end: lake = Postgres after restarts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_stop = parse_lsn(&confirmed_flush(&client, &p.slot).await);
    let outage_started = Instant::now();
    let mut samples = 0;
    while outage_started.elapsed() < outage().saturating_sub(Duration::from_secs(1)) {
        let confirmed = parse_lsn(&confirmed_flush(&client, &p.slot).await);
        let in_lake = s3.committed_txn_version("pt_s3");
        if confirmed > at_stop.max(in_lake) {
            let log = std::fs::read_to_string(p.dir.join("outage.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "the slot moved to {confirmed:#x} during the outage ({:.1} s in; {at_stop:#x} \
                 at the stop); the lake holds up to {in_lake:#x}. Pipeline log, newest first:\n{}",
                outage_started.elapsed().as_secs_f64(),
                tail.join("\n")
            );
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(samples >= 10);
    s3.resume();
    stop.store(true, Ordering::Relaxed);
    let transactions = load.await.unwrap();
    let caught_up = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        wait_until_oracle_matches(&p.lake, &client, AS_OF, Duration::from_secs(90)),
    ))
    .await;
    if let Err(panic) = caught_up {
        // The pipeline's own account of the outage, for whoever reads the failure.
        let log = std::fs::read_to_string(p.dir.join("outage.log")).unwrap_or_default();
        let ours: Vec<&str> = log.lines().filter(|l| l.contains(" pipeline")).collect();
        eprintln!(
            "pipeline log:\n{}",
            ours[ours.len().saturating_sub(40)..].join("\n")
        );
        std::panic::resume_unwind(panic);
    }
    assert!(
        pipeline.0.try_wait().unwrap().is_none(),
        "the pipeline exited during the S3 outage instead of retrying"
    );
    unsafe { libc::kill(pipeline.0.id() as i32, libc::SIGTERM) };
    let status = pipeline.0.wait().unwrap();
    assert!(status.success(), "graceful stop after the outage: {status}");

    run_once(&p, "final --once");
    assert_lake_equals_postgres(&p, &client, transactions).await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
}

/// The `version`s of the `txn` actions in a Delta commit file.
fn txn_versions(commit: &str) -> Vec<u64> {
    commit
        .lines()
        .filter(|l| l.starts_with("{\"txn\""))
        .filter_map(|l| {
            let v = &l[l.find("\"version\":")? + "\"version\":".len()..];
            v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect()
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn one_column_batch(
    schema: &arrow::datatypes::SchemaRef,
    values: Vec<i64>,
) -> arrow::array::RecordBatch {
    arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(arrow::array::Int64Array::from(values))],
    )
    .unwrap()
}

/// Two writers with different app ids appending to one table: each Delta version is
/// created with a conditional write (If-None-Match on S3, an atomic no-replace link on a
/// local disk), so exactly one writer wins it and the other gets a conflict, re-reads
/// the log and retries on top; no commit is overwritten.
///
/// On S3 the writers alternate, each committing on a stale view of the table, so every
/// commit after the first goes through the conflict path: s3s-fs checks If-None-Match and
/// then writes, not atomically, so two puts of one key in the same instant could both pass
/// there (AWS S3 decides them atomically). The truly simultaneous race runs on a local lake.
async fn two_writers_never_overwrite(lake: &Lake, simultaneous: bool) -> i64 {
    use arrow::datatypes::{DataType, Field, Schema};
    use pipeline::sink::DeltaSink;
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let spec = || vec![(t(), schema.clone())];
    let mut a = DeltaSink::open(lake.clone(), "writer-a".into(), spec())
        .await
        .unwrap();
    let mut b = DeltaSink::open(lake.clone(), "writer-b".into(), spec())
        .await
        .unwrap();
    let rounds = 15i64;
    let batch = |v: i64| vec![(t(), vec![one_column_batch(&schema, vec![v])])];
    if simultaneous {
        tokio::join!(
            async {
                for v in 1..=rounds {
                    a.append(batch(v), Lsn::new(v as u64)).await.unwrap();
                }
            },
            async {
                for v in 1..=rounds {
                    b.append(batch(-v), Lsn::new(v as u64)).await.unwrap();
                }
            }
        );
    } else {
        for v in 1..=rounds {
            a.append(batch(v), Lsn::new(v as u64)).await.unwrap();
            b.append(batch(-v), Lsn::new(v as u64)).await.unwrap();
        }
    }
    let rows = read_delta(
        lake,
        &t(),
        "SELECT count(*), count(DISTINCT v), sum(abs(v)) FROM t",
    )
    .await;
    use arrow::array::AsArray;
    let col = |i: usize| {
        rows[0]
            .column(i)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
    };
    assert_eq!(
        (col(0), col(1)),
        (2 * rounds, 2 * rounds),
        "every commit of both writers, once"
    );
    assert_eq!(col(2), rounds * (rounds + 1));
    let table = lake.existing_table(&t()).await.unwrap();
    assert_eq!(
        table.version(),
        Some(2 * rounds as u64),
        "one Delta version per commit (plus the create)"
    );
    rounds
}

/// Two writers on one table (S3, and simultaneous on a local lake): no commit lost. And a
/// writer whose commit landed but which did not see the reply (modelled by a second sink
/// of the same app id with a stale view) recognises the commit by its txn version
/// instead of writing the batch twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_commits_are_never_overwritten_and_a_lost_reply_is_recognised() {
    use arrow::datatypes::{DataType, Field, Schema};
    use pipeline::sink::{DeltaSink, Destination, Lake};
    let dir = tempfile::tempdir().unwrap();
    let local = Lake::new(dir.path().to_str().unwrap(), &Default::default()).unwrap();
    two_writers_never_overwrite(&local, true).await;

    let s3 = S3Server::start();
    let (url, options) = s3.lake("writers");
    let lake = Lake::new(&url, &options).unwrap();
    let rounds = two_writers_never_overwrite(&lake, false).await;
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let spec = || vec![(t(), schema.clone())];

    // A stale writer of app `writer-a` retries version 15, which is already committed.
    let mut stale = DeltaSink::open(lake.clone(), "writer-a".into(), spec())
        .await
        .unwrap();
    assert_eq!(
        stale.resume_point().committed(&t()),
        Lsn::new(rounds as u64)
    );
    let mut a2 = DeltaSink::open(lake.clone(), "writer-a".into(), spec())
        .await
        .unwrap();
    a2.append(
        vec![(t(), vec![one_column_batch(&schema, vec![100])])],
        Lsn::new(16),
    )
    .await
    .unwrap();
    // `stale` did not see version 16 land (its reply was "lost"): its retry must not add it again.
    stale
        .append(
            vec![(t(), vec![one_column_batch(&schema, vec![100])])],
            Lsn::new(16),
        )
        .await
        .unwrap();
    assert_eq!(stale.resume_point().committed(&t()), Lsn::new(16));
    let rows = read_delta(&lake, &t(), "SELECT count(*) FROM t WHERE v = 100").await;
    assert_eq!(
        col_of(&rows),
        1,
        "the batch of version 16 is in the table exactly once"
    );
}

fn col_of(rows: &[arrow::array::RecordBatch]) -> i64 {
    use arrow::array::AsArray;
    rows[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0)
}
