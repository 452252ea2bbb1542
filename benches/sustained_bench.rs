//! Sustained-load benchmark: commit → visible in the Delta feature table over minutes, so
//! that what happens periodically (checkpoints, compaction, vacuum, log cleanup, log
//! growth) is inside the measurement.
//!
//! Each run (BENCH_SUSTAINED_RUNS, default `local:0,local:1000,s3:0`: lake `local` or `s3`
//! (s3s-fs on loopback) and background CRM transactions per second) starts `pipeline run`
//! on the full dump with a fresh lake and slot, runs `pipeline loadgen --rate R` beside it
//! (new clients and applications, payments, loan status changes on existing rows, on its
//! own connections), and a probe that every BENCH_PROBE_MS (100) commits a new client with
//! one paid loan. The probe watches `features/client_features/_delta_log`: a probe is
//! visible when a commit file adds a row for its client (clients are probed in increasing
//! id order, above every other id, so the first commit whose `maxValues.client_id`
//! reaches the id carries it). Each run lasts BENCH_MINUTES (10).
//!
//! Reported per run: commit → visible p50/p90/p99/max overall and per minute; the
//! pipeline's batches per minute (size, first change received → durable, the stage
//! times its `batch committed` lines carry); maintenance durations. Written: one CSV of
//! per-probe latencies per run and a PNG plot of latency over time (matplotlib, in a venv
//! the bench creates under ~/.cache), under BENCH_OUT (default target/tmp/sustained).
//!
//! Run: `cargo bench --bench sustained_bench` (needs ../shared/dumps, or BENCH_DUMP).
//! BENCH_SSLMODE and BENCH_STATE_CHECKPOINT_EVERY as in pipeline_bench.

mod common;

use common::{bin, free_port, knob, latest_version, percentile, pg_base, S3Server};
use pipeline::config::{LakeConfig, PipelineConfig, SourceConfig};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DB: &str = "bench_sustained";
const SLOT: &str = "bench_sustained_slot";
/// Probe ids start here (above the dump's and loadgen's ids; user.id is an int4).
const PROBE_IDS: i64 = 1_600_000_000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pg_url() -> String {
    format!("{}/{DB}", pg_base())
}

#[derive(Clone, Copy, PartialEq)]
enum LakeKind {
    Local,
    S3,
}

struct RunSpec {
    lake: LakeKind,
    rate: f64,
}

impl RunSpec {
    fn name(&self) -> String {
        let lake = match self.lake {
            LakeKind::Local => "local",
            LakeKind::S3 => "s3",
        };
        format!("{lake}-{}tps", self.rate)
    }
}

fn run_specs() -> Vec<RunSpec> {
    let spec = std::env::var("BENCH_SUSTAINED_RUNS").unwrap_or("local:0,local:1000,s3:0".into());
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let (lake, rate) = s.trim().split_once(':').expect("lake:rate");
            RunSpec {
                lake: match lake {
                    "local" => LakeKind::Local,
                    "s3" => LakeKind::S3,
                    other => panic!("BENCH_SUSTAINED_RUNS: unknown lake `{other}` (local, s3)"),
                },
                rate: rate.parse().expect("rate: transactions per second"),
            }
        })
        .collect()
}

fn main() {
    let minutes: f64 = knob("BENCH_MINUTES", 10.0);
    let probe_every = Duration::from_millis(knob("BENCH_PROBE_MS", 100));
    let out = std::env::var("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sustained"));
    std::fs::create_dir_all(&out).unwrap();

    common::restore_dump(&pg_url());

    let mut csvs = Vec::new();
    for (i, spec) in run_specs().into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let s3 = match spec.lake {
            LakeKind::Local => None,
            LakeKind::S3 => match S3Server::start(tmp.path()) {
                Some(s) => Some(s),
                None => {
                    println!(
                        "{}: skipped (s3s-fs not installed: bash scripts/setup-s3.sh)",
                        spec.name()
                    );
                    continue;
                }
            },
        };
        let (lake, delta_log) = match &s3 {
            None => (
                LakeConfig::new(tmp.path().join("lake").display().to_string()),
                tmp.path().join("lake/features/client_features/_delta_log"),
            ),
            // s3s-fs keeps each object as a file: a commit is visible once its file exists.
            Some(s) => (
                s.lake("sustained"),
                s.data
                    .join("lake/sustained/features/client_features/_delta_log"),
            ),
        };
        let first_id = PROBE_IDS + i as i64 * 20_000_000;
        let csv = out.join(format!("{}.csv", spec.name()));
        run(
            &spec,
            tmp.path(),
            lake,
            &delta_log,
            minutes,
            probe_every,
            first_id,
            &csv,
            s3.as_ref().map(S3Server::pid),
        );
        csvs.push(csv);
    }
    plot(&out, &csvs);
}

#[allow(clippy::too_many_arguments)]
fn run(
    spec: &RunSpec,
    dir: &Path,
    lake: LakeConfig,
    delta_log: &Path,
    minutes: f64,
    probe_every: Duration,
    first_id: i64,
    csv: &Path,
    s3_pid: Option<u32>,
) {
    common::psql(
        &pg_url(),
        &format!("SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE slot_name = '{SLOT}'"),
    );
    let port = free_port();
    let file = pipeline_file(dir, lake, port);
    let log = dir.join("pipeline.log");
    let child = start(&file, &log);
    println!(
        "== {}: {minutes} min, a probe every {} ms, background {} tx/s",
        spec.name(),
        probe_every.as_millis(),
        spec.rate
    );
    let secs = minutes * 60.0;
    let load = (spec.rate > 0.0).then(|| {
        let l = loadgen(&file, spec.rate, secs + 15.0);
        std::thread::sleep(Duration::from_secs(3));
        l
    });
    let started = Instant::now();
    let cpu = Cpu {
        pipeline: child.id(),
        loadgen: load.as_ref().map(Child::id),
        s3: s3_pid,
    };
    let scrapes = scrape_every_minute(port, secs, cpu);
    let probes = probe(delta_log, secs, probe_every, first_id);
    let metrics = scrape(port);
    let (mut scrapes, mut cpus) = scrapes.join().unwrap();
    scrapes.push(metrics.clone());
    cpus.push(cpu.sample());
    if let Some(l) = load {
        print_loadgen(l);
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut child = child;
    let _ = child.wait();

    let mut f = std::io::BufWriter::new(std::fs::File::create(csv).unwrap());
    writeln!(f, "run,t_s,unix_ms,client_id,visible_ms,version").unwrap();
    for p in &probes.samples {
        let at = probes.started_unix_ms + p.at_s * 1000.0;
        let (name, t, id) = (spec.name(), p.at_s, p.client_id);
        let (ms, v) = (p.visible_ms, p.version);
        writeln!(f, "{name},{t:.3},{at:.0},{id},{ms:.3},{v}").unwrap();
    }
    drop(f);
    // Kept beside the CSV, so that slow probes can be lined up with what the log says.
    let _ = std::fs::copy(&log, csv.with_extension("log"));
    let samples: Vec<(f64, f64)> = probes
        .samples
        .iter()
        .map(|p| (p.at_s, p.visible_ms))
        .collect();
    report("commit → visible in features/client_features", &samples);
    println!(
        "  probes: {} committed, {} visible ({} before their COMMIT returned), {} never seen \
         within 30 s",
        probes.committed,
        probes.samples.len(),
        probes
            .samples
            .iter()
            .filter(|p| p.visible_ms == 0.0)
            .count(),
        probes.lost
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    report_lines(
        &log_text,
        "batch committed",
        started,
        "pipeline batches (latency = first change received → durable = compute + queue + commit)",
    );
    report_lines(
        &log_text,
        "delta commit",
        started,
        "table appends (elapsed = encode + upload + log + snapshot)",
    );
    report_maintenance(&log_text);
    report_metrics(&metrics);
    report_per_minute_metrics(&scrapes);
    report_per_minute_gauges(&scrapes);
    report_per_minute_cpu(&cpus);
    if let Some(pid) = s3_pid {
        // The server shares the 2 cores: its listings walk the whole bucket.
        println!("  s3s-fs CPU so far: {:.1} s", cpu_seconds(pid));
    }
    println!("  csv: {}", csv.display());
}

fn pipeline_file(dir: &Path, mut lake: LakeConfig, port: u16) -> PathBuf {
    let features = repo().join("feature_defs/client_features.yaml");
    common::apply_checkpoint_knob(&mut lake);
    let mut source = SourceConfig::new(
        common::with_sslmode(pg_url()),
        "bench_sustained_pub",
        &["user", "loan", "payment"],
    );
    source.slot = Some(SLOT.into());
    let mut config = PipelineConfig::new("bench_sustained", source, lake, vec![features]);
    // As the product runs: the online API on (its /metrics gives the stage histograms).
    config.serve.enabled = true;
    config.serve.listen = format!("127.0.0.1:{port}");
    let file = dir.join("pipeline.yaml");
    config.save(&file).unwrap();
    file
}

/// Starts `pipeline run` logging to `log` (sink commits at debug) and waits until it streams.
fn start(file: &Path, log: &Path) -> Child {
    let rust_log = "warn,pipeline=info,pipeline::sink=debug,pipeline::runner=debug";
    common::start_streaming(file, log, rust_log, Duration::from_secs(300)).0
}

fn loadgen(file: &Path, rate: f64, secs: f64) -> Child {
    Command::new(bin())
        .arg("loadgen")
        .arg(file)
        .args([
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{secs}s"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn print_loadgen(child: Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  loadgen: {l}");
    }
}

/// One probe: committed this many seconds after the first, its client id, commit →
/// visible ms, and the feature table version that carried it (to line it up with the
/// pipeline's `delta commit` log line for that version).
#[derive(Clone, Copy)]
struct Sample {
    at_s: f64,
    client_id: i64,
    visible_ms: f64,
    version: u64,
}

struct Probes {
    samples: Vec<Sample>,
    committed: usize,
    lost: usize,
    /// Wall-clock time of the first probe (unix ms), to line probes up with the log.
    started_unix_ms: f64,
}

/// Commits a probe every `every` for `secs` on one connection while a thread watches
/// `delta_log`; returns the probes' latencies.
fn probe(delta_log: &Path, secs: f64, every: Duration, first_id: i64) -> Probes {
    // (client id, when its COMMIT returned), in commit order.
    let pending: Arc<Mutex<VecDeque<(i64, Instant)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0;
    let watcher = {
        let (pending, done, delta_log) = (pending.clone(), done.clone(), delta_log.to_path_buf());
        std::thread::spawn(move || watch(&delta_log, &pending, &done, started))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let committed = rt.block_on(async {
        let (pg, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let probes = (secs / every.as_secs_f64()) as usize;
        let mut n = 0;
        while n < probes {
            tokio::time::sleep_until((started + every * n as u32).into()).await;
            let id = first_id + n as i64;
            pg.batch_execute(&format!(
                "BEGIN; INSERT INTO \"user\" (id, created_on) VALUES ({id}, CURRENT_DATE); \
                 INSERT INTO loan (id, client_id, amount, created_on, status) \
                 VALUES ({id}, {id}, 100, CURRENT_DATE, 'paid'); COMMIT;"
            ))
            .await
            .unwrap();
            pending.lock().unwrap().push_back((id, Instant::now()));
            n += 1;
        }
        n
    });
    // Give the last probes time to land, then stop the watcher.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = watcher.join().unwrap();
    let lost = pending.lock().unwrap().len();
    Probes {
        samples,
        committed,
        lost,
        started_unix_ms,
    }
}

/// Polls the log for each next commit file; resolves the pending probes it carries.
fn watch(
    delta_log: &Path,
    pending: &Mutex<VecDeque<(i64, Instant)>>,
    done: &std::sync::atomic::AtomicBool,
    started: Instant,
) -> Vec<Sample> {
    let mut next = latest_version(delta_log) + 1;
    let mut out = Vec::new();
    // (highest key added, when seen) per version read, in order. A probe may be in the
    // lake before its COMMIT returns (the walsender sends a transaction once its WAL is
    // flushed, before the client hears back), so it is resolved against every version
    // seen, not only those read after it was queued: such a probe counts 0 ms.
    let mut seen_versions: VecDeque<(i64, Instant, u64)> = VecDeque::new();
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        resolve(
            &mut pending.lock().unwrap(),
            &seen_versions,
            started,
            &mut out,
        );
        let path = delta_log.join(format!("{next:020}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        };
        let seen = Instant::now();
        // An object store may show a file before its last byte: parse whole lines only.
        let Some(max_key) = max_added_key(&text) else {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        };
        next += 1;
        if let Some(key) = max_key {
            seen_versions.push_back((key, seen, next - 1));
            if seen_versions.len() > 1000 {
                seen_versions.pop_front();
            }
        }
    }
    out
}

/// Pops the pending probes a version seen carries, oldest first, into `out` (commit →
/// seen is 0 when seen first).
fn resolve(
    pending: &mut VecDeque<(i64, Instant)>,
    seen_versions: &VecDeque<(i64, Instant, u64)>,
    started: Instant,
    out: &mut Vec<Sample>,
) {
    while let Some(&(id, committed)) = pending.front() {
        let Some(&(_, seen, version)) = seen_versions.iter().find(|(key, ..)| *key >= id) else {
            break;
        };
        pending.pop_front();
        out.push(Sample {
            at_s: committed.duration_since(started).as_secs_f64(),
            client_id: id,
            visible_ms: seen.saturating_duration_since(committed).as_secs_f64() * 1000.0,
            version,
        });
    }
}

/// The highest `client_id` a commit adds with `dataChange` (Some(None) for a commit that
/// adds none, e.g. a compaction); None when the file is not complete yet.
fn max_added_key(commit: &str) -> Option<Option<i64>> {
    let mut max = None;
    let mut complete = false;
    for line in commit.lines() {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v.get("commitInfo").is_some() {
            complete = true;
        }
        let Some(add) = v.get("add") else { continue };
        if add["dataChange"] != serde_json::Value::Bool(true) {
            continue;
        }
        let stats: serde_json::Value = serde_json::from_str(add["stats"].as_str()?).ok()?;
        if let Some(k) = stats["maxValues"]["client_id"].as_i64() {
            max = max.max(Some(k));
        }
    }
    complete.then_some(max)
}

/// `label: n, p50, p90, p99, max` in ms, then the same per minute.
fn report(label: &str, samples: &[(f64, f64)]) {
    let line = |xs: &mut Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        format!(
            "n={} p50 {:.1} ms, p90 {:.1}, p99 {:.1}, max {:.1}",
            xs.len(),
            percentile(xs, 0.5),
            percentile(xs, 0.9),
            percentile(xs, 0.99),
            xs.last().copied().unwrap_or(f64::NAN)
        )
    };
    println!(
        "{label}: {}",
        line(&mut samples.iter().map(|s| s.1).collect())
    );
    for (m, mut xs) in per_minute(samples.iter().copied()) {
        println!("  minute {:>2}: {}", m + 1, line(&mut xs));
    }
}

fn per_minute(samples: impl Iterator<Item = (f64, f64)>) -> BTreeMap<usize, Vec<f64>> {
    let mut by: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (t, v) in samples {
        by.entry((t / 60.0) as usize).or_default().push(v);
    }
    by
}

/// Numeric `key=value` fields of a tracing line.
fn fields(line: &str) -> BTreeMap<&str, f64> {
    line.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k, v.trim_end_matches(',').parse().ok()?))
        })
        .collect()
}

/// The pipeline's log lines containing `needle` during the run, per minute: count and
/// p50/p99 of every number they carry (rows, `*_ms`).
fn report_lines(log: &str, needle: &str, started: Instant, label: &str) {
    let t0 = chrono::Utc::now() - chrono::Duration::from_std(started.elapsed()).unwrap();
    let mut per_min: BTreeMap<usize, Vec<BTreeMap<&str, f64>>> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(needle)) {
        let Some(ts) = line
            .split_whitespace()
            .next()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        else {
            continue;
        };
        let t = (ts.with_timezone(&chrono::Utc) - t0).num_milliseconds() as f64 / 1000.0;
        if t < 0.0 {
            continue;
        }
        per_min
            .entry((t / 60.0) as usize)
            .or_default()
            .push(fields(line));
    }
    println!("{label}:");
    for (m, batches) in per_min {
        let mut keys: Vec<&str> = batches.iter().flat_map(|b| b.keys().copied()).collect();
        keys.sort();
        keys.dedup();
        let mut parts = vec![format!("{} batches", batches.len())];
        for k in keys {
            let mut xs: Vec<f64> = batches.iter().filter_map(|b| b.get(k).copied()).collect();
            xs.sort_by(f64::total_cmp);
            parts.push(format!(
                "{k} p50 {:.0} p99 {:.0}",
                percentile(&xs, 0.5),
                percentile(&xs, 0.99)
            ));
        }
        println!("  minute {:>2}: {}", m + 1, parts.join(", "));
    }
}

/// The maintainer's lines (compaction rewrites, checkpoints, vacuums): how often and
/// how long, per table and task.
fn report_maintenance(log: &str) {
    const TASKS: [(&str, &str); 4] = [
        ("compaction rewritten", "compact"),
        ("checkpoint written", "checkpoint"),
        ("files_vacuumed", "vacuum"),
        ("table maintenance", "maintain"),
    ];
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in log.lines() {
        let Some((_, task)) = TASKS.iter().find(|(needle, _)| line.contains(needle)) else {
            continue;
        };
        let table = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("table="))
            .unwrap_or("?");
        if let Some(ms) = fields(line).get("elapsed_ms") {
            by.entry(format!("{table} {task}")).or_default().push(*ms);
        }
    }
    if by.is_empty() {
        println!("maintenance: none logged");
    }
    for (what, mut xs) in by {
        xs.sort_by(f64::total_cmp);
        println!(
            "maintenance {what}: {} runs, p50 {:.0} ms, max {:.0}",
            xs.len(),
            percentile(&xs, 0.5),
            xs.last().copied().unwrap_or(f64::NAN)
        );
    }
}

/// User + system CPU seconds process `pid` has used (Linux `/proc`).
fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15 of stat(5); the fields kept start at 3.
    proc_stat(pid).map_or(0.0, |(_, f)| {
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / clock_ticks()
    })
}

/// The pipeline's `/metrics` text (empty when it does not answer).
fn scrape(port: u16) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        })
}

/// Scrapes `/metrics` and samples CPU use at the start of each whole minute of a run of
/// `secs` (the caller adds the last one), so that sums can be told apart per minute.
type Scrapes = (Vec<String>, Vec<BTreeMap<&'static str, f64>>);
fn scrape_every_minute(port: u16, secs: f64, cpu: Cpu) -> std::thread::JoinHandle<Scrapes> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut out = (vec![scrape(port)], vec![cpu.sample()]);
        for minute in 1..secs.ceil() as u64 / 60 + 1 {
            let at = started + Duration::from_secs(minute * 60);
            if at.duration_since(started).as_secs_f64() >= secs {
                break;
            }
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            out.0.push(scrape(port));
            out.1.push(cpu.sample());
        }
        out
    })
}

/// The processes whose CPU use a run reports per minute: on 2 cores they share, what
/// grows in one shows as latency in another.
#[derive(Clone, Copy)]
struct Cpu {
    pipeline: u32,
    loadgen: Option<u32>,
    s3: Option<u32>,
}

impl Cpu {
    /// Cumulative CPU seconds of each process (Postgres: every server process, plus the
    /// postmaster's reaped children such as autovacuum workers) and of the whole machine
    /// (`busy`, from /proc/stat).
    fn sample(&self) -> BTreeMap<&'static str, f64> {
        let mut out = BTreeMap::from([("pipeline", cpu_seconds(self.pipeline))]);
        if let Some(pid) = self.loadgen {
            out.insert("loadgen", cpu_seconds(pid));
        }
        if let Some(pid) = self.s3 {
            out.insert("s3s-fs", cpu_seconds(pid));
        }
        out.insert("postgres", postgres_cpu_seconds());
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal …: busy is all but idle + iowait.
        let idle = ticks.get(3).unwrap_or(&0.0) + ticks.get(4).unwrap_or(&0.0);
        let total: f64 = ticks.iter().take(8).sum();
        out.insert("busy", (total - idle) / clock_ticks());
        out
    }
}

fn clock_ticks() -> f64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Fields 3… of `/proc/<pid>/stat` (after the command name, which may hold spaces) and
/// the command name.
fn proc_stat(pid: u32) -> Option<(String, Vec<f64>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let fields = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    Some((comm, fields))
}

/// CPU seconds of every `postgres` process alive now, plus what the postmaster's exited
/// children used (its cutime + cstime).
fn postgres_cpu_seconds() -> f64 {
    let mut ticks = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Some((comm, f)) = proc_stat(pid) else {
            continue;
        };
        if comm != "postgres" {
            continue;
        }
        // Fields from 3: ppid is index 1, utime/stime 11/12, cutime/cstime 13/14.
        ticks += f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0);
        let parent = f.get(1).map(|p| *p as u32).and_then(proc_stat);
        if parent.is_none_or(|(c, _)| c != "postgres") {
            ticks += f.get(13).unwrap_or(&0.0) + f.get(14).unwrap_or(&0.0);
        }
    }
    ticks / clock_ticks()
}

/// CPU seconds per minute of each process sampled, from consecutive samples.
fn report_per_minute_cpu(samples: &[BTreeMap<&'static str, f64>]) {
    let Some(first) = samples.first() else { return };
    for name in first.keys() {
        let cells: Vec<String> = samples
            .windows(2)
            .map(|w| format!("{:.1}", w[1].get(name).unwrap_or(&0.0) - w[0][name]))
            .collect();
        println!("  per minute CPU s {name}: {}", cells.join(" "));
    }
}

/// Each sample line of one scrape as (metric, labels, value).
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            Some((metric, labels.trim_end_matches('}'), value.parse().ok()?))
        })
}

/// `{labels} → (sum, count)` of histogram `name` in one scrape.
fn histogram_sums(text: &str, name: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let (sum, count) = (format!("{name}_sum"), format!("{name}_count"));
    for (metric, labels, value) in samples(text) {
        if metric == sum {
            out.entry(labels.to_string()).or_default().0 = value;
        } else if metric == count {
            out.entry(labels.to_string()).or_default().1 = value;
        }
    }
    out
}

/// Per minute, the mean of each series of the histograms whose growth matters (object
/// store requests, append steps, maintenance), from consecutive scrapes.
fn report_per_minute_metrics(scrapes: &[String]) {
    for name in [
        "pipeline_object_store_seconds",
        "pipeline_table_commit_step_seconds",
        "pipeline_lake_durable_seconds",
        "pipeline_maintenance_seconds",
    ] {
        let sums: Vec<_> = scrapes.iter().map(|s| histogram_sums(s, name)).collect();
        let series: std::collections::BTreeSet<&String> =
            sums.iter().flat_map(|m| m.keys()).collect();
        for labels in series {
            let cells: Vec<String> = sums
                .windows(2)
                .map(|w| {
                    let (s0, c0) = w[0].get(labels).copied().unwrap_or_default();
                    let (s1, c1) = w[1].get(labels).copied().unwrap_or_default();
                    let n = c1 - c0;
                    if n > 0.0 {
                        format!("{:.1}ms×{n}", (s1 - s0) / n * 1000.0)
                    } else {
                        "-".into()
                    }
                })
                .collect();
            println!("  per minute {name}{{{labels}}}: {}", cells.join(" "));
        }
    }
}

/// `{labels} → value` of gauge `name` in one scrape.
fn gauge_values(text: &str, name: &str) -> BTreeMap<String, f64> {
    samples(text)
        .filter(|(metric, ..)| *metric == name)
        .map(|(_, labels, value)| (labels.to_string(), value))
        .collect()
}

/// At each minute's end, the gauges whose growth would explain a commit's growing cost:
/// each table's live files, the entities served online.
fn report_per_minute_gauges(scrapes: &[String]) {
    for name in ["pipeline_table_live_files", "pipeline_online_entities"] {
        let values: Vec<_> = scrapes
            .iter()
            .skip(1)
            .map(|s| gauge_values(s, name))
            .collect();
        let series: std::collections::BTreeSet<&String> =
            values.iter().flat_map(|m| m.keys()).collect();
        for labels in series {
            let cells: Vec<String> = values
                .iter()
                .map(|m| m.get(labels).map_or("-".into(), |v| format!("{v:.0}")))
                .collect();
            println!("  per minute {name}{{{labels}}}: {}", cells.join(" "));
        }
    }
}

/// Mean of each histogram the pipeline exports for batches and table commits.
fn report_metrics(text: &str) {
    for name in [
        "pipeline_batch_seconds",
        "pipeline_commit_to_durable_seconds",
        "pipeline_commit_to_online_seconds",
        "pipeline_table_commit_seconds",
    ] {
        for (labels, (sum, count)) in histogram_sums(text, name) {
            if count > 0.0 {
                let labels = if labels.is_empty() {
                    String::new()
                } else {
                    format!("{{{labels}}}")
                };
                println!(
                    "  metric {name}{labels}: n={count} mean {:.1} ms",
                    sum / count * 1000.0
                );
            }
        }
    }
}

/// Plots latency over time for every run into `out/latency.png` with matplotlib from a
/// venv under ~/.cache (created on first use).
fn plot(out: &Path, csvs: &[PathBuf]) {
    if csvs.is_empty() {
        return;
    }
    let venv = PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/pipeline-bench-venv");
    let python = venv.join("bin/python");
    let ok = python.exists()
        || (Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&python)
                .args(["-m", "pip", "install", "-q", "matplotlib"])
                .status()
                .is_ok_and(|s| s.success()));
    let png = out.join("latency.png");
    let plotted = ok
        && Command::new(&python)
            .arg(repo().join("benches/plot_latency.py"))
            .arg(&png)
            .args(csvs)
            .status()
            .is_ok_and(|s| s.success());
    if plotted {
        println!("plot: {}", png.display());
    } else {
        println!("plot: skipped (matplotlib unavailable)");
    }
}
