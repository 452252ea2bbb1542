//! Offline work on the full dump (issue 19): training sets and backfills, with the
//! `pipeline` binary against the local Postgres.
//!
//! 1. `run --once` on the restored dump, then an **event-time** training set for every
//!    loan application (spine from SQL): wall time and peak RSS over BENCH_RUNS runs.
//! 2. History: BENCH_PASSES passes that each update every loan once, in
//!    BENCH_TXNS_PER_PASS transactions, then BENCH_SMALL_TXNS single-row transactions;
//!    `run --once` catches up (the feature table grows past a million rows).
//! 3. **Known-time** training set for BENCH_SPINE_ROWS spine rows (random clients, random
//!    instants over the streamed history, from a Parquet file), next to DuckDB's `ASOF
//!    JOIN` on the same feature rows exported to Parquet (when the examples' virtualenv
//!    exists: `bash scripts/examples.sh` makes it).
//! 4. **Backfill** of the feature file (`--feature-file client_features`): the replay of
//!    every streamed change with `--verify --dry-run`, then for real (the table
//!    replaced); changes per second as the command reports them, wall time and peak RSS.
//!
//! Run: `cargo bench --bench offline_bench` (needs ../shared/dumps, or set BENCH_DUMP).

mod common;

use common::{bench_python, bin, knob, percentile, pg_base, psql, run_measured};
use pipeline::config::{LakeConfig, PipelineConfig, SourceConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

const AS_OF: &str = "2020-08-23";
const SLOT: &str = "offline_bench_slot";

fn write_pipeline(dir: &Path, url: &str) -> PathBuf {
    let features = Path::new(env!("CARGO_MANIFEST_DIR")).join("feature_defs/client_features.yaml");
    let mut source = SourceConfig::new(url, "offline_bench_pub", &["user", "loan", "payment"]);
    source.slot = Some(SLOT.into());
    let lake = LakeConfig::new(dir.join("lake").display().to_string());
    let mut config = PipelineConfig::new("offline_bench", source, lake, vec![features]);
    config.clock.as_of = Some(AS_OF.to_string());
    let file = dir.join("pipeline.yaml");
    config.save(&file).unwrap();
    file
}

fn drop_slot(url: &str) {
    common::drop_slot(url, SLOT);
}

fn pipeline(args: &[&str], file: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg(args[0]).arg(file).args(&args[1..]);
    c.env("RUST_LOG", "warn");
    c
}

/// Runs `cmd` `runs` times; prints wall and peak RSS (median, max) under `name`.
fn measure(name: &str, runs: usize, mut cmd: impl FnMut() -> Command) {
    let (mut walls, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (wall, peak) = run_measured(cmd().stdout(std::process::Stdio::null()));
        walls.push(wall.as_secs_f64());
        rss.push(peak);
    }
    walls.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    println!(
        "{name}: runs={runs} wall_s median={:.2} min={:.2} max={:.2}; peak_rss_mib median={:.0} max={:.0}",
        percentile(&walls, 0.5),
        walls[0],
        walls[walls.len() - 1],
        percentile(&rss, 0.5),
        rss[rss.len() - 1]
    );
}

fn main() {
    let runs: usize = knob("BENCH_RUNS", 3);
    let url = format!("{}/bench_offline", pg_base());
    common::restore_dump(&url);
    drop_slot(&url);
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), &url);
    let (wall, _) = run_measured(&mut pipeline(&["run", "--once"], &file));
    println!("once_full_dump: wall_s={:.2}", wall.as_secs_f64());

    // 1. Event time over every loan application.
    let spine_sql =
        "SELECT id AS loan_id, client_id, created_on, status = 'overdue' AS label FROM loan";
    let out = dir.path().join("event.parquet");
    measure("event_time_every_loan", runs, || {
        let mut c = pipeline(&["training-set"], &file);
        c.args([
            "--mode",
            "event",
            "--spine",
            spine_sql,
            "--key",
            "client_id",
        ])
        .args(["--time", "created_on", "--out"])
        .arg(&out);
        c
    });

    // 2. Streamed history.
    let passes: usize = knob("BENCH_PASSES", 10);
    let per_pass: usize = knob("BENCH_TXNS_PER_PASS", 100);
    let small: usize = knob("BENCH_SMALL_TXNS", 100_000);
    let first_at = chrono::Utc::now();
    let t0 = Instant::now();
    if passes > 0 {
        psql(
            &url,
            &format!(
                "DO $$ BEGIN FOR p IN 1..{passes} LOOP FOR k IN 0..{} LOOP \
                 UPDATE loan SET updated_on = updated_on WHERE id % {per_pass} = k; COMMIT; \
                 END LOOP; END LOOP; END $$",
                per_pass - 1
            ),
        );
    }
    if small > 0 {
        psql(
            &url,
            &format!(
                "DO $$ DECLARE n int := (SELECT max(id) FROM loan); BEGIN FOR i IN 1..{small} LOOP \
                 UPDATE loan SET updated_on = updated_on WHERE id = 1 + (i * 7919) % n; COMMIT; \
                 END LOOP; END $$"
            ),
        );
    }
    let made = t0.elapsed();
    let last_at = chrono::Utc::now();
    let (wall, peak) = run_measured(&mut pipeline(&["run", "--once"], &file));
    let changes: i64 = psql(
        &url,
        &format!("SELECT {passes}::bigint * count(*) + {small} FROM loan"),
    )
    .parse()
    .unwrap();
    let feature_rows = count_rows(&dir.path().join("lake/features/client_features"));
    println!(
        "history: {changes} changes ({passes} passes of {per_pass} transactions over every loan, \
         {small} single-row transactions) made in {:.1} s; run --once caught up in {:.1} s \
         (peak RSS {peak:.0} MiB); feature table {feature_rows} rows",
        made.as_secs_f64(),
        wall.as_secs_f64()
    );

    // 3. Known time over the streamed history.
    let spine_rows: usize = knob("BENCH_SPINE_ROWS", 1_000_000);
    let spine = dir.path().join("spine.parquet");
    let clients: i64 = psql(&url, "SELECT max(id) FROM \"user\"").parse().unwrap();
    write_spine(&spine, spine_rows, clients, first_at, last_at);
    let known_out = dir.path().join("known.parquet");
    measure(&format!("known_time_{spine_rows}_rows"), runs, || {
        let mut c = pipeline(&["training-set"], &file);
        c.args([
            "--mode",
            "known",
            "--key",
            "client_id",
            "--time",
            "at",
            "--spine",
        ])
        .arg(&spine)
        .arg("--out")
        .arg(&known_out);
        c
    });
    match bench_python() {
        Some(python) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/asof_duckdb.py");
            let out = Command::new(python)
                .arg(script)
                .arg(dir.path().join("lake/features/client_features"))
                .arg(&spine)
                .arg(runs.to_string())
                .output()
                .unwrap();
            print!("{}", String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                println!(
                    "duckdb_asof: failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        None => println!("duckdb_asof: skipped (no Python venv: bash scripts/examples.sh)"),
    }

    // 4. Backfill: replay and verify without writing, then for real.
    for (name, extra) in [
        ("backfill_verify_dry_run", &["--verify", "--dry-run"][..]),
        ("backfill_write", &[][..]),
    ] {
        let t = Instant::now();
        let mut c = pipeline(&["backfill", "--feature-file", "client_features"], &file);
        c.args(extra);
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{name}: wall_s={:.2}", t.elapsed().as_secs_f64());
        for line in stdout.lines() {
            println!("  {line}");
        }
    }
    let (wall, peak) = run_measured(
        pipeline(&["backfill", "--feature-file", "client_features"], &file)
            .stdout(std::process::Stdio::null()),
    );
    println!(
        "backfill_write_again: wall_s={:.2} peak_rss_mib={peak:.0}",
        wall.as_secs_f64()
    );
    drop_slot(&url);
}

/// Rows of a Delta table, from the add actions' stats would need a reader: DataFusion.
fn count_rows(table: &Path) -> i64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let lake = pipeline::sink::Lake::new(
            &table
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .display()
                .to_string(),
            &Default::default(),
        )
        .unwrap();
        let t = lake
            .existing_table(&pipeline::sink::LakeTable::features("client_features"))
            .await
            .unwrap();
        let ctx = datafusion::prelude::SessionContext::new();
        t.update_datafusion_session(&ctx.state()).unwrap();
        ctx.register_table("t", t.table_provider().await.unwrap())
            .unwrap();
        let b = ctx
            .sql("SELECT count(*) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        use arrow::array::AsArray;
        b[0].column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
    })
}

/// A spine of `rows` (client_id, at): clients uniform in 1..=clients, instants uniform in
/// [from, to] (UTC), as Parquet.
fn write_spine(
    path: &Path,
    rows: usize,
    clients: i64,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) {
    use arrow::array::{Int64Array, RecordBatch, TimestampMicrosecondArray};
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let (a, b) = (from.timestamp_micros(), to.timestamp_micros());
    let ids: Vec<i64> = (0..rows).map(|_| rng.random_range(1..=clients)).collect();
    let ats: Vec<i64> = (0..rows).map(|_| rng.random_range(a..=b)).collect();
    let batch = RecordBatch::try_from_iter([
        (
            "client_id",
            Arc::new(Int64Array::from(ids)) as arrow::array::ArrayRef,
        ),
        (
            "at",
            Arc::new(TimestampMicrosecondArray::from(ats).with_timezone("UTC")),
        ),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w =
        datafusion::parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}
