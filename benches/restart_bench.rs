//! Restart time after a long history: the full dump, then BENCH_RESTART_UPDATES (default
//! 3,000,000) loan updates streamed through `pipeline run` (10,000-row transactions), then
//! restarts timed from process start to streaming again (state and online store rebuilt),
//! with the state checkpoints the run wrote, and without them (`_state` moved aside), so
//! the difference is the checkpoints'. Peak RSS of each restart is its `VmHWM` once
//! streaming.
//!
//! Per-batch cost against history: BENCH_BATCHES (default 300) single-row updates ~50 ms
//! apart, streamed right after the snapshot and again after the history, with each batch's
//! compute and commit time from the pipeline's `batch committed` log lines: flat is the claim.
//!
//! Run: `cargo bench --bench restart_bench` (needs ../shared/dumps, or set BENCH_DUMP).
//! Knobs: BENCH_RUNS (default 3), BENCH_RESTART_UPDATES, BENCH_BATCHES.

mod common;

use common::{bin, knob, percentile, pg_base, psql};
use pipeline::config::{LakeConfig, PipelineConfig, SourceConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn write_pipeline(dir: &Path, url: &str) -> PathBuf {
    let features = Path::new(env!("CARGO_MANIFEST_DIR")).join("feature_defs/client_features.yaml");
    let mut source = SourceConfig::new(url, "bench_restart_pub", &["user", "loan", "payment"]);
    source.slot = Some("bench_restart".into());
    let lake = LakeConfig::new(dir.join("lake").display().to_string());
    let mut config = PipelineConfig::new("bench", source, lake, vec![features]);
    config.clock.as_of = Some("2020-08-23".into());
    // The online store is rebuilt too: serve on a free port.
    config.serve.enabled = true;
    config.serve.listen = format!("127.0.0.1:{}", common::free_port());
    let file = dir.join("pipeline.yaml");
    config.save(&file).unwrap();
    file
}

fn drop_slot(url: &str) {
    common::drop_slot(url, "bench_restart");
}

/// Peak resident memory of a running process, MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn stop(child: &mut std::process::Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
}

/// Restarts `runs` times; (seconds to streaming, peak RSS MiB) sorted.
fn restarts(file: &Path, dir: &Path, what: &str, runs: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut took, mut rss) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let log = dir.join(format!("restart-{what}-{i}.log"));
        let (mut child, t) =
            common::start_streaming(file, &log, "warn,pipeline=info", Duration::from_secs(300));
        took.push(t.as_secs_f64());
        rss.push(peak_rss_mib(child.id()));
        stop(&mut child);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let from_ck = text.matches("rebuilding from the state checkpoint").count();
        eprintln!(
            "  {what} #{i}: {:.3} s to streaming, {from_ck} tables from checkpoints",
            t.as_secs_f64()
        );
    }
    took.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    (took, rss)
}

/// A `key=value` number from a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()?.parse().ok()
}

/// Streams `n` single-row updates ~50 ms apart; returns each batch's (compute, commit) ms.
fn batch_costs(file: &Path, dir: &Path, url: &str, what: &str, n: usize) -> (Vec<f64>, Vec<f64>) {
    let log = dir.join(format!("batches-{what}.log"));
    let (mut child, _) =
        common::start_streaming(file, &log, "warn,pipeline=info", Duration::from_secs(300));
    let skip = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    for i in 0..n {
        psql(
            url,
            &format!("UPDATE loan SET status = CASE WHEN status = 'paid' THEN 'active' ELSE 'paid' END WHERE id = {}", i * 37 % 100_000 + 1),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let (mut compute, mut commit) = (Vec::new(), Vec::new());
    for line in text
        .lines()
        .skip(skip)
        .filter(|l| l.contains("batch committed"))
    {
        if let (Some(a), Some(b)) = (field(line, "compute_ms"), field(line, "commit_ms")) {
            compute.push(a);
            commit.push(b);
        }
    }
    compute.sort_by(f64::total_cmp);
    commit.sort_by(f64::total_cmp);
    (compute, commit)
}

fn report_costs(what: &str, (compute, commit): &(Vec<f64>, Vec<f64>)) {
    println!(
        "batch_cost_{what}: batches={} compute_ms p50={:.1} p99={:.1}; commit_ms p50={:.1} p99={:.1} max={:.1}",
        commit.len(),
        percentile(compute, 0.5),
        percentile(compute, 0.99),
        percentile(commit, 0.5),
        percentile(commit, 0.99),
        commit.last().copied().unwrap_or(f64::NAN),
    );
}

fn main() {
    let runs: usize = knob("BENCH_RUNS", 3);
    let updates: i64 = knob("BENCH_RESTART_UPDATES", 3_000_000);
    let batches: usize = knob("BENCH_BATCHES", 300);
    let url = format!("{}/bench_restart", pg_base());
    common::restore_dump(&url);
    drop_slot(&url);
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), &url);
    let st = Command::new(bin())
        .args(["run", "--once"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success(), "--once snapshot");
    let fresh = batch_costs(&file, dir.path(), &url, "fresh", batches);

    // The history: updates streamed by a running pipeline.
    let (mut child, _) = common::start_streaming(
        &file,
        &dir.path().join("stream.log"),
        "warn,pipeline=info",
        Duration::from_secs(120),
    );
    let max_id: i64 = psql(&url, "SELECT max(id) FROM loan").parse().unwrap();
    let started = Instant::now();
    let (mut made, mut from) = (0i64, 0i64);
    while made < updates {
        let out = psql(
            &url,
            &format!(
                "WITH u AS (UPDATE loan SET amount = amount + 1 WHERE id > {from} AND id <= {from} + 10000 RETURNING 1) SELECT count(*) FROM u"
            ),
        );
        made += out.parse::<i64>().unwrap();
        from = if from + 10_000 >= max_id {
            0
        } else {
            from + 10_000
        };
        if made % 250_000 < 10_000 {
            eprintln!(
                "history: {made} updates ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let end = psql(&url, "SELECT pg_current_wal_lsn()::text");
    loop {
        let caught_up = psql(
            &url,
            &format!(
                "SELECT confirmed_flush_lsn >= '{end}'::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = 'bench_restart'"
            ),
        );
        if caught_up == "t" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "history streamed: {made} updates in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    stop(&mut child);
    let log = std::fs::read_to_string(dir.path().join("stream.log")).unwrap_or_default();
    let checkpoints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("state checkpoint written"))
        .collect();
    eprintln!(
        "{} state checkpoints while streaming; the last: {}",
        checkpoints.len(),
        checkpoints.last().copied().unwrap_or("none")
    );

    let aged = batch_costs(&file, dir.path(), &url, "after_history", batches);
    let (with, with_rss) = restarts(&file, dir.path(), "checkpoints", runs);
    let state = dir.path().join("lake/_state");
    let aside = dir.path().join("_state.aside");
    std::fs::rename(&state, &aside).expect("the run wrote state checkpoints");
    let (without, without_rss) = restarts(&file, dir.path(), "no-checkpoints", runs);
    drop_slot(&url);
    report_costs("fresh_lake", &fresh);
    report_costs("after_history", &aged);
    println!(
        "restart_after_updates: updates={made} runs={runs} \
         with_checkpoints median_s={:.3} max_s={:.3} peak_rss_mib={:.0}; \
         without median_s={:.3} max_s={:.3} peak_rss_mib={:.0}",
        percentile(&with, 0.5),
        with[with.len() - 1],
        percentile(&with_rss, 0.5),
        percentile(&without, 0.5),
        without[without.len() - 1],
        percentile(&without_rss, 0.5),
    );
}
