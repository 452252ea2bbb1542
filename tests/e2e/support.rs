//! Test support: real Postgres databases, pipeline files, Delta readers and the
//! Postgres oracle for the client features.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int32Type, Int64Type};
pub use pipeline::changelog::Lsn;
use pipeline::config::{LakeConfig, Pipeline, PipelineConfig, SourceConfig};
pub use pipeline::sink::{Lake, LakeTable};
use pipeline::source::ConnInfo;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const AS_OF: &str = "2020-08-23";

pub fn pg_base() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn dump_path() -> Option<PathBuf> {
    let p = repo().join("../shared/dumps/de_test_task_db");
    p.exists().then_some(p)
}

/// The CRM schema, as `pipeline db seed` creates it.
pub const SCHEMA_SQL: &str = include_str!("../../src/db/schema.sql");

/// A fresh database `db` (dropped with its slots first), with the CRM schema.
pub async fn fresh_db(db: &str) -> (ConnInfo, tokio_postgres::Client) {
    seeded_db(db, 0).await
}

pub async fn seeded_db(db: &str, users: usize) -> (ConnInfo, tokio_postgres::Client) {
    seeded_db_at(&pg_base(), db, users).await
}

/// As `seeded_db`, on the server at `base` (`postgres://user@host:port`): `pipeline db
/// seed` (dev tooling of the binary) with a fixed seed.
pub async fn seeded_db_at(
    base: &str,
    db: &str,
    users: usize,
) -> (ConnInfo, tokio_postgres::Client) {
    // `base` may carry URL parameters (`?sslmode=…`): they go after the database.
    let url = match base.split_once('?') {
        Some((server, params)) => format!("{server}/{db}?{params}"),
        None => format!("{base}/{db}"),
    };
    let info = ConnInfo::parse(&url).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["db", "seed", "--clean", "--seed", "7", "--users"])
        .arg(users.to_string())
        .arg("--url")
        .arg(info.libpq_url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "pipeline db seed {db}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = pipeline::source::connect(&info, 3).await.unwrap();
    (info, client)
}

pub struct TestPipeline {
    /// Keeps the pipeline file (and a local lake) alive for the test.
    tmp: Option<tempfile::TempDir>,
    /// The temporary directory holding the pipeline file; a local lake is `<dir>/lake`.
    pub dir: PathBuf,
    pub file: PathBuf,
    /// What `file` holds; change it with [`TestPipeline::update`].
    pub config: PipelineConfig,
    pub lake: Lake,
    pub slot: String,
    /// The source database, to drop the slot when the test ends.
    url: String,
}

/// Writes a pipeline file for database `info` with its own slot, publication and a lake
/// in a temporary directory.
pub fn pipeline_file(info: &ConnInfo, name: &str, as_of: Option<&str>) -> TestPipeline {
    pipeline_file_with_lake(info, name, as_of, None)
}

/// As `pipeline_file`, with the lake at `lake` (url, storage options) when given.
pub fn pipeline_file_with_lake(
    info: &ConnInfo,
    name: &str,
    as_of: Option<&str>,
    lake: Option<(String, BTreeMap<String, String>)>,
) -> TestPipeline {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (url, options) =
        lake.unwrap_or_else(|| (dir.join("lake").display().to_string(), BTreeMap::new()));
    let slot = format!("t_{name}");
    let mut source = SourceConfig::new(
        info.libpq_url(),
        format!("p_{name}"),
        &["user", "loan", "payment"],
    );
    source.slot = Some(slot.clone());
    let mut lake_config = LakeConfig::new(&url);
    lake_config.storage_options = options.clone();
    let features = vec![repo().join("feature_defs/client_features.yaml")];
    let mut config = PipelineConfig::new(name, source, lake_config, features);
    config.clock.as_of = as_of.map(String::from);
    let file = dir.join("pipeline.yaml");
    config.save(&file).unwrap();
    TestPipeline {
        tmp: Some(tmp),
        lake: Lake::new(&url, &options).unwrap(),
        dir,
        file,
        config,
        slot,
        url: info.url.clone(),
    }
}

/// Drops the test's slot once the test is over, so a run of the whole suite never holds
/// more slots than tests running at once (Postgres' default `max_replication_slots` is 10).
/// A slot still in use (a pipeline the test left running) is left alone.
impl Drop for TestPipeline {
    fn drop(&mut self) {
        if self.tmp.is_none() {
            return; // kept for a post-mortem
        }
        let (url, slot) = (self.url.clone(), self.slot.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1 AND NOT active",
                        &[&slot],
                    )
                    .await
                    .ok()
            })
        })
        .join();
    }
}

impl TestPipeline {
    pub fn load(&self) -> Pipeline {
        Pipeline::load(&self.file).unwrap()
    }

    /// Changes the pipeline's config and saves it to its file.
    pub fn update(&mut self, change: impl FnOnce(&mut PipelineConfig)) {
        change(&mut self.config);
        self.config.save(&self.file).unwrap();
    }

    /// Keeps the directory (pipeline file, lake, logs) after the test, for a post-mortem.
    pub fn keep(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            std::mem::forget(tmp);
            eprintln!("kept {} for inspection", self.dir.display());
        }
    }
}

/// The one table of the sink-level tests.
pub fn t() -> LakeTable {
    LakeTable::features("t")
}

/// Runs `sql_over_t` over the Delta table `path` of the lake (registered as `t`). A read
/// beside the maintainer can meet its checkpoint or log cleanup half done, so a failed read
/// is tried again for a few seconds before the test fails, with the error.
pub async fn read_delta(lake: &Lake, path: &LakeTable, sql_over_t: &str) -> Vec<RecordBatch> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match query_delta(lake, path, sql_over_t).await {
            Ok(batches) => return batches,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reading {}{path} failed, trying again: {e}", lake.root());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot read the Delta table at {}{path}: {e}", lake.root()),
        }
    }
}

/// As `read_delta`, or None while the table does not exist yet (cannot be loaded).
pub async fn try_read_delta(
    lake: &Lake,
    path: &LakeTable,
    sql_over_t: &str,
) -> Option<Vec<RecordBatch>> {
    query_delta(lake, path, sql_over_t).await.ok()
}

/// Loads the table and runs the query; only a failed load is an error (the query's own
/// errors are a test's bug, and panic).
async fn query_delta(
    lake: &Lake,
    path: &LakeTable,
    sql_over_t: &str,
) -> Result<Vec<RecordBatch>, pipeline::sink::SinkError> {
    let table = lake.existing_table(path).await?;
    let ctx = datafusion::prelude::SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("t", table.table_provider().await.unwrap())
        .unwrap();
    Ok(ctx.sql(sql_over_t).await.unwrap().collect().await.unwrap())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub paid_loans_count: Option<i64>,
    pub days_since_last_late_payment: Option<i32>,
    pub profit_in_last_90_days_rate: Option<f64>,
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        _ => false,
    }
}

impl Features {
    pub fn same(&self, o: &Features) -> bool {
        self.paid_loans_count == o.paid_loans_count
            && self.days_since_last_late_payment == o.days_since_last_late_payment
            && close(
                self.profit_in_last_90_days_rate,
                o.profit_in_last_90_days_rate,
            )
    }
}

/// Latest feature row per client (highest `_lsn`), deleted clients left out; empty
/// while the table does not exist.
pub async fn latest_features(lake: &Lake) -> BTreeMap<i64, Features> {
    let batches = try_read_delta(
        lake,
        &LakeTable::features("client_features"),
        "SELECT client_id, paid_loans_count, days_since_last_late_payment, profit_in_last_90_days_rate, _deleted
           FROM (SELECT *, row_number() OVER (PARTITION BY client_id ORDER BY _lsn DESC, computed_at DESC) AS rn FROM t)
          WHERE rn = 1",
    )
    .await
    .unwrap_or_default();
    let mut out = BTreeMap::new();
    for b in batches {
        let id = b.column(0).as_primitive::<Int64Type>();
        let paid = b.column(1).as_primitive::<Int64Type>();
        let days = b.column(2).as_primitive::<Int32Type>();
        let rate = b.column(3).as_primitive::<Float64Type>();
        let deleted = b.column(4).as_boolean();
        for i in 0..b.num_rows() {
            if deleted.value(i) {
                continue;
            }
            out.insert(
                id.value(i),
                Features {
                    paid_loans_count: paid.is_valid(i).then(|| paid.value(i)),
                    days_since_last_late_payment: days.is_valid(i).then(|| days.value(i)),
                    profit_in_last_90_days_rate: rate.is_valid(i).then(|| rate.value(i)),
                },
            );
        }
    }
    out
}

/// The feature definitions, written independently as plain Postgres SQL.
pub const ORACLE_SQL: &str = r#"
WITH params AS (SELECT $1::date AS a),
paid AS (
  SELECT client_id, count(*) AS n FROM loan WHERE status = 'paid' GROUP BY client_id),
late AS (
  SELECT l.client_id, max(p.created_on) AS last_late
    FROM payment p JOIN loan l ON l.id = p.loan_id CROSS JOIN params
   WHERE p.status = 'late' AND p.created_on <= params.a
   GROUP BY l.client_id),
issued AS (
  SELECT l.id, l.client_id, l.amount FROM loan l CROSS JOIN params
   WHERE l.status IN ('active', 'paid', 'overdue')
     AND l.created_on > params.a - 90 AND l.created_on <= params.a),
issued_amount AS (SELECT client_id, sum(amount) AS amount FROM issued GROUP BY client_id),
issued_interest AS (
  SELECT i.client_id, sum(coalesce(p.interest, 0)) AS interest
    FROM issued i JOIN payment p ON p.loan_id = i.id CROSS JOIN params
   WHERE p.created_on <= params.a
   GROUP BY i.client_id)
SELECT u.id::bigint,
       coalesce(paid.n, 0)::bigint,
       (params.a - late.last_late)::int,
       CASE WHEN ia.amount IS NULL OR ia.amount = 0 THEN NULL
            ELSE (coalesce(ii.interest, 0) / ia.amount)::float8 END
  FROM "user" u CROSS JOIN params
  LEFT JOIN paid ON paid.client_id = u.id
  LEFT JOIN late ON late.client_id = u.id
  LEFT JOIN issued_amount ia ON ia.client_id = u.id
  LEFT JOIN issued_interest ii ON ii.client_id = u.id
"#;

pub async fn oracle(client: &tokio_postgres::Client, as_of: &str) -> BTreeMap<i64, Features> {
    let date = chrono::NaiveDate::parse_from_str(as_of, "%Y-%m-%d").unwrap();
    client
        .query(ORACLE_SQL, &[&date])
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                Features {
                    paid_loans_count: r.get(1),
                    days_since_last_late_payment: r.get(2),
                    profit_in_last_90_days_rate: r.get(3),
                },
            )
        })
        .collect()
}

/// Differences between the lake and the oracle (at most `limit` described).
pub fn diff(
    lake: &BTreeMap<i64, Features>,
    oracle: &BTreeMap<i64, Features>,
    limit: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    for (id, want) in oracle {
        match lake.get(id) {
            None => out.push(format!("client {id}: missing, want {want:?}")),
            Some(got) if !got.same(want) => {
                out.push(format!("client {id}: got {got:?}, want {want:?}"))
            }
            _ => {}
        }
    }
    for id in lake.keys().filter(|id| !oracle.contains_key(id)) {
        out.push(format!("client {id}: in the lake but not in Postgres"));
    }
    let n = out.len();
    out.truncate(limit);
    if n > limit {
        out.push(format!("… {} more", n - limit));
    }
    out
}

/// Polls until the lake's latest features equal the oracle, or fails with the diff.
pub async fn wait_until_oracle_matches(
    lake: &Lake,
    client: &tokio_postgres::Client,
    as_of: &str,
    timeout: Duration,
) {
    if let Err(d) = oracle_matches_within(lake, client, as_of, timeout).await {
        panic!("{d}");
    }
}

/// As `wait_until_oracle_matches`, returning the difference instead of failing.
pub async fn oracle_matches_within(
    lake: &Lake,
    client: &tokio_postgres::Client,
    as_of: &str,
    timeout: Duration,
) -> Result<(), String> {
    let want = oracle(client, as_of).await;
    let started = Instant::now();
    loop {
        let got = latest_features(lake).await;
        let d = diff(&got, &want, 10);
        if d.is_empty() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "lake does not match the oracle after {timeout:?}:\n{}",
                d.join("\n")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the pipeline in-process until `cancel` (or the end with `once`).
pub fn spawn_pipeline(
    p: Pipeline,
    once: bool,
) -> (
    tokio::task::JoinHandle<Result<pipeline::runner::RunSummary, pipeline::runner::RunError>>,
    tokio_util::sync::CancellationToken,
) {
    // The pipeline's log, shown for failing tests (`RUST_LOG` picks the level).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pipeline=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let handle = tokio::spawn(async move {
        pipeline::runner::run(
            &p,
            pipeline::runner::RunOptions {
                once,
                ..Default::default()
            },
            c,
        )
        .await
    });
    (handle, cancel)
}

/// Waits until the pipeline's slot is streaming (past the snapshot) so changes are not racing
/// the snapshot in assertions about what was snapshotted.
pub async fn wait_slot_active(client: &tokio_postgres::Client, slot: &str) {
    for _ in 0..300 {
        let r = client
            .query_opt(
                "SELECT r.state FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                  WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        // `startup` while the snapshot is copied; `catchup`/`streaming` once replicating.
        if r.is_some_and(|r| r.get::<_, String>(0) != "startup") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("slot {slot} never became active");
}

/// Count of rows in a raw mirror table, and of distinct (_lsn, _seq, id).
pub async fn raw_counts(lake: &Lake, table: &str) -> (i64, i64) {
    let b = read_delta(
        lake,
        &LakeTable::raw(table),
        "SELECT count(*), count(DISTINCT (_lsn, _seq, id)) FROM t",
    )
    .await;
    let b = &b[0];
    (
        b.column(0).as_primitive::<Int64Type>().value(0),
        b.column(1).as_primitive::<Int64Type>().value(0),
    )
}

/// `SELECT count(*) …` as a number.
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}
