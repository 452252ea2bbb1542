//! Benchmark of the online API of `pipeline run` on the full dump, over loopback HTTP:
//!
//! 1. Peak RSS of the streaming process after the snapshot, serving off vs on.
//! 2. Online reads without a wait, open loop: one entity at BENCH_READ_RPS (1,000) for
//!    BENCH_READ_SECS (30), then 100 keys per call at 100/s.
//! 3. Read-your-writes at low load: CRM commit (a paid loan for a client) →
//!    `pg_current_wal_lsn()` → `GET …?min_lsn=` until the new value is served, for
//!    BENCH_RYW_SECS (120); every other round also writes an unpublished table after the
//!    commit (the wait then needs a fence). Stale answers are counted (must be 0).
//! 4. The same with `pipeline loadgen --rate BENCH_LOAD_RATE` (1,000 tx/s) beside it.
//! 5. Applications decided through `POST /v1/decisions` at BENCH_APPS (100)/s with the
//!    same background load, for BENCH_DECIDE_SECS (120): `pipeline loadgen`'s report.
//!
//! Latencies are reported per minute as well, so that growth over the run shows.
//! Run: `cargo bench --bench serve_bench` (needs ../shared/dumps, or BENCH_DUMP; the
//! decisions need models/loan_default.onnx). A knob set to 0 skips its section.

mod common;

use common::{bin, free_port, knob, percentile, pg_base};
use pipeline::config::{LakeConfig, PipelineConfig, SourceConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DB: &str = "bench_serve";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pg_url() -> String {
    format!("{}/{DB}", pg_base())
}

fn psql(sql: &str) -> String {
    common::psql(&pg_url(), sql)
}

fn pipeline_file(dir: &Path, port: u16, serve: bool) -> PathBuf {
    let lake = LakeConfig::new(dir.join("lake").display().to_string());
    let features = repo().join("feature_defs/client_features.yaml");
    let mut source = SourceConfig::new(pg_url(), "bench_serve_pub", &["user", "loan", "payment"]);
    source.slot = Some("bench_serve_slot".into());
    let mut config = PipelineConfig::new("bench_serve", source, lake, vec![features]);
    config.serve.enabled = serve;
    config.serve.listen = format!("127.0.0.1:{port}");
    if serve && repo().join("models/loan_default.onnx").exists() {
        config.decisions = Some(repo().join("decisions/loan_rules.yaml"));
    }
    let file = dir.join("pipeline.yaml");
    config.save(&file).unwrap();
    file
}

/// Starts `pipeline run` logging to `dir/pipeline.log` and waits until it streams.
fn start(file: &Path, dir: &Path) -> Child {
    let log = dir.join("pipeline.log");
    common::start_streaming(file, &log, "warn,pipeline=info", Duration::from_secs(300)).0
}

/// VmHWM (peak resident set) of a process, MiB.
fn peak_rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

fn stop(mut child: Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
}

fn fresh_lake(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("lake"));
    psql("SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = 'bench_serve_slot'");
}

/// `label: n, p50, p90, p99, max` in ms, then per minute when the run is longer.
fn report(label: &str, samples: &[(f64, f64)]) {
    let mut all: Vec<f64> = samples.iter().map(|s| s.1).collect();
    all.sort_by(f64::total_cmp);
    println!(
        "{label}: n={} p50 {:.2} ms, p90 {:.2}, p99 {:.2}, max {:.2}",
        all.len(),
        percentile(&all, 0.5),
        percentile(&all, 0.9),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(f64::NAN)
    );
    let minutes = samples
        .iter()
        .map(|s| (s.0 / 60.0) as usize)
        .max()
        .unwrap_or(0)
        + 1;
    if minutes > 1 {
        for m in 0..minutes {
            let mut xs: Vec<f64> = samples
                .iter()
                .filter(|s| (s.0 / 60.0) as usize == m)
                .map(|s| s.1)
                .collect();
            xs.sort_by(f64::total_cmp);
            println!(
                "  minute {}: n={} p50 {:.2} ms, p99 {:.2}, max {:.2}",
                m + 1,
                xs.len(),
                percentile(&xs, 0.5),
                percentile(&xs, 0.99),
                xs.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
}

fn main() {
    common::restore_dump(&pg_url());
    psql("CREATE TABLE IF NOT EXISTS unpublished (id serial PRIMARY KEY, note text)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // 1. Peak RSS after the snapshot, serving off vs on.
    let mut rss = Vec::new();
    for serve in [false, true] {
        fresh_lake(dir);
        let file = pipeline_file(dir, free_port(), serve);
        let child = start(&file, dir);
        std::thread::sleep(Duration::from_secs(2));
        rss.push(peak_rss(child.id()));
        stop(child);
    }
    println!(
        "peak RSS after the full-dump snapshot: serving off {:.1} MiB, on {:.1} MiB (+{:.1})",
        rss[0],
        rss[1],
        rss[1] - rss[0]
    );

    fresh_lake(dir);
    let port = free_port();
    let file = pipeline_file(dir, port, true);
    let child = start(&file, dir);
    let base = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let (pg, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let clients: Vec<i64> = pg
            .query(
                r#"SELECT id::bigint FROM "user" ORDER BY random() LIMIT 10000"#,
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();

        // 2. Reads without a wait, open loop.
        let rps: f64 = knob("BENCH_READ_RPS", 1000.0);
        let secs: f64 = knob("BENCH_READ_SECS", 30.0);
        if rps > 0.0 && secs > 0.0 {
            let one = open_loop(&http, rps, secs, |i| {
                (
                    format!(
                        "{base}/v1/features/client_features/{}",
                        clients[i % clients.len()]
                    ),
                    None,
                )
            })
            .await;
            report(&format!("online read, 1 key, {rps}/s"), &one);
            let many = open_loop(&http, 100.0, secs, |i| {
                let keys: Vec<i64> = (0..100)
                    .map(|k| clients[(i * 100 + k) % clients.len()])
                    .collect();
                (
                    format!("{base}/v1/features/client_features"),
                    Some(json!({"keys": keys})),
                )
            })
            .await;
            report("online read, 100 keys per call, 100/s", &many);
        }

        // 3. and 4. Read-your-writes, without and with background load.
        let ryw_secs: f64 = knob("BENCH_RYW_SECS", 120.0);
        if ryw_secs > 0.0 {
            let (samples, stale) = read_your_writes(&pg, &http, &base, ryw_secs, 900_000_000).await;
            report(
                "read-your-writes, low load (commit → new value served)",
                &samples,
            );
            println!("  stale: {stale} of {}", samples.len());
            let rate: f64 = knob("BENCH_LOAD_RATE", 1000.0);
            if rate > 0.0 {
                let load = loadgen(&file, rate, ryw_secs + 5.0, 0.0);
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (samples, stale) =
                    read_your_writes(&pg, &http, &base, ryw_secs, 910_000_000).await;
                report(
                    &format!("read-your-writes, {rate} tx/s background"),
                    &samples,
                );
                println!("  stale: {stale} of {}", samples.len());
                print_loadgen(load);
            }
        }
    });

    // 5. Decisions under load.
    let apps: f64 = knob("BENCH_APPS", 100.0);
    let decide_secs: f64 = knob("BENCH_DECIDE_SECS", 120.0);
    if apps > 0.0 && decide_secs > 0.0 && repo().join("models/loan_default.onnx").exists() {
        let rate: f64 = knob("BENCH_LOAD_RATE", 1000.0);
        println!("decisions: {apps}/s with {rate} tx/s background for {decide_secs} s");
        print_loadgen(loadgen(&file, rate, decide_secs, apps));
    }
    let log = std::fs::read_to_string(dir.join("pipeline.log")).unwrap_or_default();
    let lat: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("batch committed"))
        .filter_map(|l| {
            l.split("latency_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "pipeline's own batch latency (first change received → Delta durable): n={} p50 {:.1} ms, p99 {:.1}, max {:.1}",
        sorted.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    stop(child);
}

/// Requests at `rps` for `secs`, each started on time whether or not earlier ones
/// finished; returns (seconds since start, latency ms).
async fn open_loop(
    http: &reqwest::Client,
    rps: f64,
    secs: f64,
    request: impl Fn(usize) -> (String, Option<Value>),
) -> Vec<(f64, f64)> {
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / rps);
    let mut tasks = tokio::task::JoinSet::new();
    let mut out = Vec::new();
    let mut i = 0;
    while started.elapsed().as_secs_f64() < secs {
        let due = started + every * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (url, body) = request(i);
        let http = http.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let r = match body {
                Some(b) => http.post(url).json(&b).send().await,
                None => http.get(url).send().await,
            }
            .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            let _ = r.bytes().await.unwrap();
            (
                due.duration_since(started).as_secs_f64(),
                t0.elapsed().as_secs_f64() * 1000.0,
            )
        });
        while let Some(done) = tasks.try_join_next() {
            out.push(done.unwrap());
        }
        i += 1;
    }
    while let Some(done) = tasks.join_next().await {
        out.push(done.unwrap());
    }
    out
}

/// Rounds of: a new client with one paid loan committed, the WAL position read, the
/// client read with `min_lsn`. Returns (seconds since start, commit → served ms) and the
/// count of answers without the new loan.
async fn read_your_writes(
    pg: &tokio_postgres::Client,
    http: &reqwest::Client,
    base: &str,
    secs: f64,
    first_id: i64,
) -> (Vec<(f64, f64)>, usize) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut stale = 0;
    let mut r = 0i64;
    while started.elapsed().as_secs_f64() < secs {
        let id = first_id + r;
        pg.batch_execute(&format!(
            "BEGIN; INSERT INTO \"user\" (id, created_on) VALUES ({id}, CURRENT_DATE); \
             INSERT INTO loan (id, client_id, amount, created_on, status) VALUES ({id}, {id}, 100, CURRENT_DATE, 'paid'); COMMIT;"
        ))
        .await
        .unwrap();
        let t0 = Instant::now();
        if r % 2 == 1 {
            pg.batch_execute("INSERT INTO unpublished (note) VALUES ('after')")
                .await
                .unwrap();
        }
        let lsn: String = pg
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let body: Value = http
            .get(format!(
                "{base}/v1/features/client_features/{id}?min_lsn={lsn}&timeout_ms=5000"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        let took = t0.elapsed().as_secs_f64() * 1000.0;
        if body["features"]["paid_loans_count"] != json!(1) {
            stale += 1;
        }
        out.push((started.elapsed().as_secs_f64(), took));
        r += 1;
    }
    (out, stale)
}

fn loadgen(file: &Path, rate: f64, secs: f64, apps: f64) -> Child {
    Command::new(bin())
        .args(["loadgen"])
        .arg(file)
        .args([
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{secs}s"),
        ])
        .args(["--applications", &apps.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn print_loadgen(child: Child) {
    let out = child.wait_with_output().unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  loadgen: {l}");
    }
}
