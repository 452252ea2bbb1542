//! End-to-end benchmark of the `pipeline` binary against the local Postgres:
//!
//! 1. `--once` on the full dump (snapshot, raw mirror, features, commits): wall time and
//!    peak RSS of the process, over several runs.
//! 2. Single-row change → visible in the Delta feature table: a row is updated every
//!    ~50 ms (low load) and the time from COMMIT returning to the Delta commit file that
//!    carries it existing is measured.
//!
//! Run: `cargo bench --bench pipeline_bench` (needs ../shared/dumps, or set BENCH_DUMP).
//! Knobs: BENCH_RUNS (default 3), BENCH_CHANGES (default 200).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const AS_OF: &str = "2020-08-23";

fn pg_base() -> String {
    std::env::var("BENCH_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline")
}

fn write_pipeline(dir: &Path, url: &str, as_of: &str) -> PathBuf {
    let features = Path::new(env!("CARGO_MANIFEST_DIR")).join("feature_defs/client_features.yaml");
    let file = dir.join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            "name: bench\nsource:\n  url: {url}\n  publication: bench_pub\n  slot: bench_slot\n  tables: [user, loan, payment]\n\
             lake:\n  url: {}\nfeatures:\n  - {}\nclock:\n  as_of: {as_of}\n",
            dir.join("lake").display(),
            features.display()
        ),
    )
    .unwrap();
    file
}

fn psql(url: &str, sql: &str) -> String {
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

fn drop_slot(url: &str) {
    psql(
        url,
        "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = 'bench_slot'",
    );
}

/// Runs the command and returns (wall time, peak RSS in MiB) of the child.
// The child is reaped by `wait4` (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (Duration, f64) {
    let started = Instant::now();
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let dump = std::env::var("BENCH_DUMP")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/dumps/de_test_task_db")
        });
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let changes: usize = std::env::var("BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let url = format!("{}/bench_dump", pg_base());

    eprintln!("restoring {} into bench_dump …", dump.display());
    let st = Command::new(bin())
        .args(["db", "--url", &url, "restore", "--clean"])
        .arg(&dump)
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());

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

    // 2. Change → visible latency at low load.
    drop_slot(&url);
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), &url, "");
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let mut child = Command::new(bin())
        .args(["run"])
        .arg(&file)
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()
        .unwrap();
    let log_path = dir.path().join("run.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("streaming changes")
    {
        assert!(
            Instant::now() < deadline,
            "pipeline did not start streaming"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let delta_log = dir.path().join("lake/features/client_features/_delta_log");
    let mut next_version = latest_version(&delta_log) + 1;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let latencies = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
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
    drop_slot(&url);
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "change_to_visible_ms: n={} p50={:.1} p90={:.1} p99={:.1} max={:.1}",
        sorted.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.9),
        percentile(&sorted, 0.99),
        sorted[sorted.len() - 1]
    );
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn latest_version(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".json")?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
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
