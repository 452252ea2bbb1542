//! End-to-end benchmark of the `pipeline` binary against the local Postgres:
//!
//! 1. `--once` on the full dump (snapshot, raw mirror, features, commits): wall time and
//!    peak RSS of the process, over several runs.
//! 2. Single-row change → visible in the Delta feature table: a row is updated every
//!    ~50 ms (low load) and the time from COMMIT returning to the Delta commit file that
//!    carries it existing is measured, on a local-directory lake and on an S3 lake
//!    (s3s-fs on loopback), with each table's Delta commit time from the pipeline's log.
//! 3. Restart on the full dump: from process start to streaming again (state rebuilt
//!    from the lake, no re-snapshot).
//! 4. Catch-up after a backlog of changes, next to `pg_recvlogical` on the same backlog.
//! 5. Python `deltalake` read after many small commits and `pipeline maintain`.
//! 6. One transaction of about a million rows: wall time and peak RSS of its catch-up.
//!
//! Run: `cargo bench --bench pipeline_bench` (needs ../shared/dumps, or set BENCH_DUMP).
//! Knobs: BENCH_RUNS (default 3), BENCH_CHANGES (default 200), BENCH_BACKLOG (changes,
//! default 1,000,000), BENCH_COMMITS (default 10,000), BENCH_LARGE_TXN_ROWS (default
//! 1,000,000), BENCH_COMPACT_EVERY (section 5's compaction interval); 0 skips a section.
//! BENCH_SSLMODE sets the source URL's `sslmode`, BENCH_STATE_CHECKPOINT_EVERY the state
//! checkpoint interval (0 = off).

mod common;

use common::{
    bench_python, bin, knob, latest_version, percentile, pg_base, psql, run_measured, S3Server,
};
use pipeline::config::{LakeConfig, PipelineConfig, SourceConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const AS_OF: &str = "2020-08-23";

fn write_pipeline(dir: &Path, url: &str, as_of: &str) -> PathBuf {
    let lake = LakeConfig::new(dir.join("lake").display().to_string());
    write_pipeline_with_lake(dir, url, as_of, lake)
}

fn write_pipeline_with_lake(dir: &Path, url: &str, as_of: &str, mut lake: LakeConfig) -> PathBuf {
    common::apply_checkpoint_knob(&mut lake);
    let features = Path::new(env!("CARGO_MANIFEST_DIR")).join("feature_defs/client_features.yaml");
    let mut source = SourceConfig::new(url, "bench_pub", &["user", "loan", "payment"]);
    source.slot = Some("bench_slot".into());
    let mut config = PipelineConfig::new("bench", source, lake, vec![features]);
    config.clock.as_of = Some(as_of.to_string());
    let file = dir.join("pipeline.yaml");
    config.save(&file).unwrap();
    file
}

fn drop_slot(url: &str) {
    common::drop_slot(url, "bench_slot");
}

fn main() {
    let runs: usize = knob("BENCH_RUNS", 3);
    let changes: usize = knob("BENCH_CHANGES", 200);
    let url = common::with_sslmode(format!("{}/bench_dump", pg_base()));

    common::restore_dump(&url);

    // 1. --once on the full dump.
    let mut walls = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        drop_slot(&url);
        let dir = tempfile::tempdir().unwrap();
        let file = write_pipeline(dir.path(), &url, AS_OF);
        let (wall, peak) = run_measured(
            Command::new(bin())
                .args(["run", "--once"])
                .arg(&file)
                .env("RUST_LOG", "warn"),
        );
        walls.push(wall.as_secs_f64());
        rss.push(peak);
    }
    walls.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    println!(
        "once_full_dump: runs={runs} wall_s median={:.3} min={:.3} max={:.3}; peak_rss_mib median={:.1} max={:.1}",
        percentile(&walls, 0.5),
        walls[0],
        walls[walls.len() - 1],
        percentile(&rss, 0.5),
        rss[rss.len() - 1]
    );

    // 2. Change → visible latency at low load, on a local-directory lake and (when s3s-fs
    //    is installed) on an S3 lake served by s3s-fs on loopback.
    if changes > 0 {
        latency_section(&url, changes);
    }

    // 3. Restart on the full dump: state rebuilt from the lake, back to streaming. Its own
    //    lake and slot, filled by a `--once` first (the sections above drop theirs).
    drop_slot(&url);
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), &url, AS_OF);
    run_once(&file, "--once before the restarts");
    let mut restarts = Vec::new();
    for i in 0..runs {
        let (mut child, took) = start_streaming(&file, &dir.path().join(format!("restart{i}.log")));
        restarts.push(took.as_secs_f64());
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
    }
    restarts.sort_by(f64::total_cmp);
    drop_slot(&url);
    println!(
        "restart_to_streaming_s: runs={runs} median={:.3} max={:.3}",
        percentile(&restarts, 0.5),
        restarts[restarts.len() - 1]
    );

    // 4. Catch-up after a backlog of changes made while the pipeline was down, next to
    //    pg_recvlogical draining the same backlog from its own slot (the floor).
    let backlog: i64 = knob("BENCH_BACKLOG", 1_000_000);
    if backlog > 0 {
        catch_up(&url, backlog);
    }

    // 5. A feature table after many small commits and maintenance, read from Python,
    //    against the same rows written in one commit.
    let commits: u64 = knob("BENCH_COMMITS", 10_000);
    if commits > 0 {
        read_after_many_commits(&url, commits);
    }

    // 6. One source transaction far larger than a batch, caught up by `run --once`:
    //    memory must not follow its size (it is handed on in pieces of `max_rows`).
    let large: i64 = knob("BENCH_LARGE_TXN_ROWS", 1_000_000);
    if large > 0 {
        large_transaction(&url, large);
    }
}

/// `run --once` over one transaction of about `rows` loan updates (whole-table UPDATEs
/// repeated), after a `--once` snapshot: wall time and peak RSS of the catch-up.
fn large_transaction(url: &str, rows: i64) {
    drop_slot(url);
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), url, AS_OF);
    let (_, snapshot_rss) = run_measured(
        Command::new(bin())
            .args(["run", "--once"])
            .arg(&file)
            .env("RUST_LOG", "warn"),
    );
    let loans: i64 = psql(url, "SELECT count(*) FROM loan").parse().unwrap();
    let updates = (rows + loans - 1) / loans.max(1);
    let mut sql = String::from("BEGIN;");
    for _ in 0..updates {
        sql.push_str("UPDATE loan SET updated_on = updated_on;");
    }
    sql.push_str("COMMIT;");
    let t0 = Instant::now();
    psql(url, &sql);
    let made = t0.elapsed();
    let (wall, peak) = run_measured(
        Command::new(bin())
            .args(["run", "--once"])
            .arg(&file)
            .env("RUST_LOG", "warn"),
    );
    drop_slot(url);
    println!(
        "large_transaction: rows={} (one transaction, written in {:.1} s); run --once wall_s={:.2} \
         changes_per_s={:.0} peak_rss_mib={:.1} (snapshot run: {:.1})",
        updates * loans,
        made.as_secs_f64(),
        wall.as_secs_f64(),
        (updates * loans) as f64 / wall.as_secs_f64(),
        peak,
        snapshot_rss
    );
}

/// Streams single-row updates until the feature table has `commits` more versions (the
/// background maintainer checkpoints and compacts meanwhile), runs `pipeline maintain`,
/// then times a Python `deltalake` load + latest-value query against a one-commit copy.
fn read_after_many_commits(url: &str, commits: u64) {
    let Some(python) = bench_python() else {
        println!("read_after_commits: skipped (no Python venv: bash scripts/examples.sh)");
        return;
    };
    drop_slot(url);
    let dir = tempfile::tempdir().unwrap();
    // BENCH_COMPACT_EVERY: the maintainer's compaction interval (default: the pipeline's).
    let mut lake = LakeConfig::new(dir.path().join("lake").display().to_string());
    if let Ok(n) = std::env::var("BENCH_COMPACT_EVERY") {
        lake.maintenance.compact_every_commits = n.parse().expect("BENCH_COMPACT_EVERY: a number");
    }
    let file = write_pipeline_with_lake(dir.path(), url, "", lake);
    let table = dir.path().join("lake/features/client_features");
    let delta_log = table.join("_delta_log");
    let (mut child, _) = start_streaming(&file, &dir.path().join("many.log"));
    let first = latest_version(&delta_log);
    let started = Instant::now();
    let rt = runtime();
    let changes = rt.block_on(async {
        let client = connect(url).await;
        let ids: Vec<i32> = client
            .query("SELECT id FROM loan ORDER BY id LIMIT 5000", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut changes = 0usize;
        let mut reported = first;
        loop {
            let v = latest_version(&delta_log);
            if v >= first + commits {
                break changes;
            }
            if v >= reported + 1000 {
                reported = v;
                eprintln!(
                    "  {} / {commits} commits, {changes} changes, {:.0}s",
                    v - first,
                    started.elapsed().as_secs_f64()
                );
            }
            client
                .execute(
                    "UPDATE loan SET status = CASE WHEN status = 'paid' THEN 'active' ELSE 'paid' END WHERE id = $1",
                    &[&ids[changes % ids.len()]],
                )
                .await
                .unwrap();
            changes += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    drop_slot(url);
    println!(
        "read_after_commits: {commits} commits from {changes} single-row changes in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    let out = Command::new(bin())
        .arg("maintain")
        .arg(&file)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!(
        "pipeline maintain: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let st = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/read_lake_bench.py"))
        .arg(&table)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Updates loans in transactions of ≤ 10,000 rows until `target` row changes are made
/// with no pipeline running; then times `pg_recvlogical` and `pipeline run --once` over them.
fn catch_up(url: &str, target: i64) {
    drop_slot(url);
    psql(url, "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = 'bench_recv'");
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), url, "");
    run_once(&file, "snapshot before the backlog");
    psql(
        url,
        "SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')",
    );

    let rt = runtime();
    let (made, end_lsn) = rt.block_on(async {
        let client = connect(url).await;
        let max_id: i32 = client
            .query_one("SELECT max(id) FROM loan", &[])
            .await
            .unwrap()
            .get(0);
        let (mut made, mut from) = (0i64, 0i32);
        let started = Instant::now();
        while made < target {
            let n = client
                .execute(
                    "UPDATE loan SET amount = amount + 1 WHERE id > $1 AND id <= $1 + 10000",
                    &[&from],
                )
                .await
                .unwrap();
            made += n as i64;
            from = if from + 10000 >= max_id {
                0
            } else {
                from + 10000
            };
            if made % 100_000 < n as i64 {
                eprintln!(
                    "backlog: {made} changes ({:.0}s)",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let lsn: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        (made, lsn)
    });

    let started = Instant::now();
    let st = Command::new("pg_recvlogical")
        .args([
            "-d",
            url,
            "-S",
            "bench_recv",
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench_pub",
            "-E",
            &end_lsn,
        ])
        .status()
        .unwrap();
    let recv = started.elapsed().as_secs_f64();
    assert!(st.success(), "pg_recvlogical");
    psql(url, "SELECT pg_drop_replication_slot('bench_recv')");

    let started = Instant::now();
    run_once(&file, "catch-up --once");
    let ours = started.elapsed().as_secs_f64();
    drop_slot(url);
    println!(
        "catch_up: changes={made} pipeline_once_s={ours:.2} ({:.0} changes/s, incl. start-up) \
         pg_recvlogical_s={recv:.2} ({:.0} changes/s)",
        made as f64 / ours,
        made as f64 / recv
    );
}

struct Latency {
    /// COMMIT returned in Postgres → the Delta commit carrying it exists, per change (ms).
    visible_ms: Vec<f64>,
    /// Per-table Delta commit time as the pipeline logs it (ms).
    commit_ms: Vec<f64>,
    first_start: Duration,
}

/// Streams `file`'s pipeline and updates one loan every ~50 ms, `changes` times, timing
/// each from COMMIT to its Delta commit file appearing in `delta_log`.
fn change_to_visible(
    url: &str,
    file: &Path,
    dir: &Path,
    delta_log: &Path,
    changes: usize,
) -> Latency {
    let log = dir.join("run.log");
    let (mut child, first_start) =
        start_streaming_with(file, &log, "warn,pipeline=info,pipeline::sink=debug");
    let mut next_version = latest_version(delta_log) + 1;
    let rt = runtime();
    let visible_ms = rt.block_on(async {
        let client = connect(url).await;
        let ids: Vec<i32> = client
            .query("SELECT id FROM loan WHERE status IN ('paid', 'active') ORDER BY id LIMIT $1", &[&(changes as i64)])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut lat = Vec::new();
        for id in ids {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let before: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
            let before = parse_lsn(&before);
            client
                .execute(
                    "UPDATE loan SET status = CASE WHEN status = 'paid' THEN 'active' ELSE 'paid' END WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            let committed = Instant::now();
            loop {
                let path = delta_log.join(format!("{next_version:020}.json"));
                if let Ok(text) = std::fs::read_to_string(&path) {
                    next_version += 1;
                    if txn_version(&text).is_some_and(|v| v > before) {
                        break;
                    }
                    continue;
                }
                assert!(committed.elapsed() < Duration::from_secs(10), "change never became visible");
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            lat.push(committed.elapsed().as_secs_f64() * 1000.0);
        }
        lat
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let commit_ms = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("delta commit"))
        .filter_map(|l| {
            let v = &l[l.find("elapsed_ms=")? + "elapsed_ms=".len()..];
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<f64>()
                .ok()
        })
        .collect();
    Latency {
        visible_ms,
        commit_ms,
        first_start,
    }
}

fn report_latency(lake: &str, l: &Latency) {
    let mut v = l.visible_ms.clone();
    v.sort_by(f64::total_cmp);
    let mut c = l.commit_ms.clone();
    c.sort_by(f64::total_cmp);
    println!(
        "change_to_visible_ms[{lake}]: n={} p50={:.1} p90={:.1} p99={:.1} max={:.1}; first start (snapshot) to streaming {:.2}s",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.9),
        percentile(&v, 0.99),
        v[v.len() - 1],
        l.first_start.as_secs_f64()
    );
    if !c.is_empty() {
        println!(
            "delta_commit_ms[{lake}]: n={} p50={:.0} p99={:.0} max={:.0} (one table's commit: Parquet + log entry)",
            c.len(),
            percentile(&c, 0.5),
            percentile(&c, 0.99),
            c[c.len() - 1]
        );
    }
}

/// Starts `pipeline run` logging to `log`; returns once it logs that it is streaming.
/// `pipeline run --once` on `file`, which must succeed (`what` names the step).
fn run_once(file: &Path, what: &str) {
    let st = Command::new(bin())
        .args(["run", "--once"])
        .arg(file)
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success(), "{what} failed");
}

fn start_streaming(file: &Path, log: &Path) -> (Child, Duration) {
    start_streaming_with(file, log, "warn,pipeline=info")
}

fn start_streaming_with(file: &Path, log: &Path, rust_log: &str) -> (Child, Duration) {
    common::start_streaming(file, log, rust_log, Duration::from_secs(120))
}

/// A current-thread runtime for the bench's own Postgres client.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A Postgres client whose connection runs on the current runtime.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The `txn` version (our batch end LSN) in a Delta commit file.
fn txn_version(commit: &str) -> Option<u64> {
    commit.lines().find_map(|l| {
        let i = l.find("\"txn\"")?;
        let rest = &l[i..];
        let v = rest.find("\"version\":")? + "\"version\":".len();
        rest[v..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// Section 2 (see the module doc).
fn latency_section(url: &str, changes: usize) {
    drop_slot(url);
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), url, "");
    let delta_log = dir.path().join("lake/features/client_features/_delta_log");
    let local = change_to_visible(url, &file, dir.path(), &delta_log, changes);
    report_latency("local", &local);
    drop_slot(url);
    let s3_dir = tempfile::tempdir().unwrap();
    match S3Server::start(s3_dir.path()) {
        Some(server) => {
            let s3_file = write_pipeline_with_lake(s3_dir.path(), url, "", server.lake("bench"));
            // s3s-fs keeps each object as a file: a commit is visible once its file exists.
            let s3_log = server
                .data
                .join("lake/bench/features/client_features/_delta_log");
            let s3 = change_to_visible(url, &s3_file, s3_dir.path(), &s3_log, changes);
            report_latency("s3", &s3);
            drop(server);
            drop_slot(url);
        }
        None => println!(
            "change_to_visible_ms[s3]: skipped (s3s-fs not installed: bash scripts/setup-s3.sh)"
        ),
    }
}
