//! Fault tests: the pipeline process is killed with SIGKILL at random moments while a
//! load runs; afterwards the lake must hold every committed source change exactly once.
//!
//! An audit trigger in Postgres counts every row change the load makes, independently of
//! replication, so "nothing missing" is checked against Postgres, not against ourselves.

use crate::support::*;
use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AUDIT_SQL: &str = r#"
CREATE TABLE audit_changes (tbl text NOT NULL, op text NOT NULL);
CREATE FUNCTION audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit_changes VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;
CREATE TRIGGER audit_user AFTER INSERT OR UPDATE OR DELETE ON "user"
  FOR EACH ROW EXECUTE FUNCTION audit_change();
CREATE TRIGGER audit_loan AFTER INSERT OR UPDATE OR DELETE ON loan
  FOR EACH ROW EXECUTE FUNCTION audit_change();
CREATE TRIGGER audit_payment AFTER INSERT OR UPDATE OR DELETE ON payment
  FOR EACH ROW EXECUTE FUNCTION audit_change();
"#;

/// One random transaction of the CRM's kind of writes (1–4 statements).
async fn random_transaction(client: &mut tokio_postgres::Client, rng: &mut ChaCha8Rng) {
    let tx = client.transaction().await.unwrap();
    for _ in 0..rng.random_range(1..=4) {
        let pick = rng.random_range(0..100);
        let loan: i32 = rng.random_range(1..=4000);
        let sql = match pick {
            0..=24 => format!(
                "UPDATE loan SET status = (ARRAY['application','active','paid','overdue'])[{}], \
                 updated_on = DATE '2020-08-{:02}' WHERE id = {loan}",
                rng.random_range(1..=4),
                rng.random_range(1..=23)
            ),
            25..=39 => format!(
                "INSERT INTO loan SELECT coalesce(max(id), 0) + 1, {}, {}, DATE '2020-{:02}-{:02}', 30, \
                 NULL, 'active', NULL FROM loan",
                rng.random_range(1..=2000),
                rng.random_range(0..5000),
                rng.random_range(5..=8),
                rng.random_range(1..=23)
            ),
            40..=54 => format!(
                "INSERT INTO payment SELECT coalesce(max(id), 0) + 1, {loan}, 100, 90, {}, '{}', \
                 DATE '2020-{:02}-{:02}' FROM payment",
                rng.random_range(0..50),
                if rng.random_bool(0.5) { "late" } else { "on_time" },
                rng.random_range(5..=9),
                rng.random_range(1..=28)
            ),
            55..=69 => format!(
                "UPDATE payment SET status = CASE WHEN status = 'late' THEN 'on_time' ELSE 'late' END, \
                 interest = {} WHERE loan_id = {loan}",
                rng.random_range(0..80)
            ),
            70..=79 => format!("DELETE FROM payment WHERE loan_id = {loan}"),
            80..=89 => format!("DELETE FROM loan WHERE id = {loan}"),
            90..=94 => "INSERT INTO \"user\" (id, created_on, first_name) \
                        SELECT coalesce(max(id), 0) + 1, DATE '2020-08-01', 'Jörg' FROM \"user\""
                .to_string(),
            _ => format!(
                "UPDATE loan SET amount = amount + 1 WHERE client_id = {}",
                rng.random_range(1..=2000)
            ),
        };
        tx.batch_execute(&sql).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// Inserts one client (the next id) in a transaction of its own.
pub(crate) async fn add_user(client: &tokio_postgres::Client, created_on: &str, name: &str) {
    client
        .execute(
            "INSERT INTO \"user\" (id, created_on, first_name) \
             SELECT max(id) + 1, $1::text::date, $2::text FROM \"user\"",
            &[&created_on, &name],
        )
        .await
        .unwrap();
}

/// Runs random transactions until `stop`; returns how many committed.
pub(crate) fn spawn_load(
    url: String,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            random_transaction(&mut client, &mut rng).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
        }
        n
    })
}

pub(crate) async fn wait_slot_released(client: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let active: Option<bool> = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        if active != Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} still held by a killed process"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `pipeline run`, kills it with SIGKILL after `delay`.
pub(crate) fn run_and_kill(p: &TestPipeline, delay: Duration, log_path: &std::path::Path) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .arg("run")
        .arg(&p.file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap(); // SIGKILL
    }
    let status = child.wait().unwrap();
    if status.code().is_some_and(|c| c != 0) {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "pipeline failed on its own ({status}) before being killed; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// `pipeline run --once`, which must succeed.
pub(crate) fn run_once(p: &TestPipeline, what: &str) {
    run_ok(p, &["run", "--once"], what);
}

/// `pipeline <command…> <p's file>`, which must succeed.
pub(crate) fn run_ok(p: &TestPipeline, command: &[&str], what: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(command)
        .arg(&p.file)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Per table: rows in the raw mirror, distinct `(_lsn, _seq, id)`, and streamed changes
/// (rows after the snapshot, which sits at the lowest `_lsn`).
pub(crate) async fn raw_change_counts(lake: &Lake, table: &str) -> (i64, i64, i64) {
    let b = read_delta(
        lake,
        &LakeTable::raw(table),
        "SELECT count(*), count(DISTINCT (_lsn, _seq, id)), \
                count(*) FILTER (WHERE _lsn > (SELECT min(_lsn) FROM t)) FROM t",
    )
    .await;
    let col = |i: usize| b[0].column(i).as_primitive::<Int64Type>().value(0);
    (col(0), col(1), col(2))
}

/// The table's current image replayed from the raw mirror: id → row text.
async fn raw_image(lake: &Lake, table: &str, cols: &str) -> BTreeMap<i64, String> {
    let sql = format!(
        "SELECT CAST(id AS BIGINT), concat_ws('|', {cols}) FROM \
           (SELECT *, row_number() OVER (PARTITION BY id ORDER BY _lsn DESC, _seq DESC) AS rn FROM t) \
         WHERE rn = 1 AND _op <> 'delete'"
    );
    let mut out = BTreeMap::new();
    for b in read_delta(lake, &LakeTable::raw(table), &sql).await {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let text = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
        let text = text.as_string::<i32>();
        for i in 0..b.num_rows() {
            out.insert(ids.value(i), text.value(i).to_string());
        }
    }
    out
}

async fn pg_image(
    client: &tokio_postgres::Client,
    table: &str,
    cols: &str,
) -> BTreeMap<i64, String> {
    client
        .query(
            &format!("SELECT id::bigint, concat_ws('|', {cols}) FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A seeded database whose audit table counts every row change, independently of replication.
pub(crate) async fn audited_db(db: &str) -> (pipeline::source::ConnInfo, tokio_postgres::Client) {
    audited_db_at(&pg_base(), db).await
}

/// As `audited_db`, on the server at `base`.
pub(crate) async fn audited_db_at(
    base: &str,
    db: &str,
) -> (pipeline::source::ConnInfo, tokio_postgres::Client) {
    let (info, client) = seeded_db_at(base, db, 2000).await;
    client.batch_execute(AUDIT_SQL).await.unwrap();
    (info, client)
}

/// After a final catch-up: every committed row change is in the raw mirror exactly once,
/// the replayed image equals Postgres, and the latest features equal the oracle.
pub(crate) async fn assert_lake_equals_postgres(
    p: &TestPipeline,
    client: &tokio_postgres::Client,
    transactions: usize,
) {
    let audit: BTreeMap<String, i64> = client
        .query("SELECT tbl, count(*) FROM audit_changes GROUP BY tbl", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("load committed {transactions} transactions; row changes by table: {audit:?}");
    for (table, quoted, cols) in [
        ("user", "\"user\"", "id, first_name"),
        // Floats are left out: Postgres and Arrow print them differently.
        ("loan", "loan", "client_id, status, created_on, updated_on"),
        ("payment", "payment", "loan_id, status, created_on"),
    ] {
        let (total, distinct, streamed) = raw_change_counts(&p.lake, table).await;
        assert_eq!(total, distinct, "raw/{table}: duplicate (_lsn, _seq, id)");
        assert_eq!(
            streamed,
            audit.get(table).copied().unwrap_or(0),
            "raw/{table}: streamed changes != row changes committed in Postgres"
        );
        let lake = raw_image(&p.lake, table, cols).await;
        let pg = pg_image(client, quoted, cols).await;
        assert_eq!(lake.len(), pg.len(), "raw/{table}: row count of the image");
        let wrong: Vec<_> = pg
            .iter()
            .filter(|(id, row)| lake.get(id) != Some(row))
            .take(5)
            .collect();
        assert!(
            wrong.is_empty(),
            "raw/{table}: rows differ from Postgres: {wrong:?}"
        );
    }
    wait_until_oracle_matches(&p.lake, client, AS_OF, Duration::from_secs(5)).await;
}

/// SIGKILL at random moments (during the snapshot, state rebuild, batching and commits)
/// while a load runs; after a final `--once`, every committed change is in the raw mirror
/// exactly once and the latest features equal the Postgres oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_doubles_nothing() {
    let rounds: usize = std::env::var("FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros() as u64);
    eprintln!(
        "kill -9 test: rounds={rounds} seed={seed} (FAULT_ROUNDS / FAULT_SEED / FAULT_MAX_ROWS)"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let (info, client) = audited_db("pt_kill").await;
    let mut p = pipeline_file(&info, "kill", Some(AS_OF));
    // State checkpoints every few hundred changes, so that kills land in them too and
    // restarts rebuild from them.
    p.update(|c| c.lake.maintenance.state_checkpoint_every_changes = 300);
    // FAULT_MAX_ROWS: a small batch size sends most transactions through the pieces of
    // large transactions (e.g. 3).
    if let Ok(max_rows) = std::env::var("FAULT_MAX_ROWS") {
        p.update(|c| c.batch.max_rows = max_rows.parse().expect("FAULT_MAX_ROWS: a number"));
    }
    let log = p.dir.join("runs.log");

    // Killed during the initial snapshot (or just after it), before any load.
    run_and_kill(&p, Duration::from_millis(rng.random_range(100..900)), &log);
    wait_slot_released(&client, &p.slot).await;
    run_once(&p, "--once after a killed snapshot");

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(info.url.clone(), seed ^ 0x5eed, stop.clone());
    for _ in 0..rounds {
        run_and_kill(&p, Duration::from_millis(rng.random_range(200..2500)), &log);
        wait_slot_released(&client, &p.slot).await;
    }
    stop.store(true, Ordering::Relaxed);
    let transactions = load.await.unwrap();

    run_once(&p, "final --once");
    assert_lake_equals_postgres(&p, &client, transactions).await;

    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
}

/// `pipeline run --once` armed with `fault` (`<point>[:<n>]`), which must abort the
/// process at that point.
pub(crate) fn run_once_crashing_at(p: &TestPipeline, fault: &str) {
    let (status, stderr) = run_once_with_fault(p, fault);
    let point = fault.split(':').next().unwrap();
    assert!(
        !status.success() && stderr.contains(&format!("aborting at `{point}`")),
        "{fault}: the crash point was not reached ({status}): {stderr}"
    );
}

/// `pipeline run --once` with a fault armed (`PIPELINE_CRASH_AT`); returns (exit status, stderr).
pub(crate) fn run_once_with_fault(
    p: &TestPipeline,
    fault: &str,
) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "--once"])
        .arg(&p.file)
        .env("RUST_LOG", "warn")
        .env("PIPELINE_CRASH_AT", fault)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tables() -> [LakeTable; 4] {
    [
        LakeTable::raw("user"),
        LakeTable::raw("loan"),
        LakeTable::raw("payment"),
        LakeTable::features("client_features"),
    ]
}

/// Parquet files in the lake's table directories, as `table/file`.
pub(crate) fn parquet_files(lake_dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for t in tables() {
        for e in std::fs::read_dir(lake_dir.join(t.path())).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".parquet") {
                out.insert(format!("{t}/{name}"));
            }
        }
    }
    out
}

/// Parquet files the lake's tables reference, as `table/file`.
pub(crate) async fn referenced_files(lake: &Lake) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for t in tables() {
        let table = lake.existing_table(&t).await.unwrap();
        for uri in table.get_file_uris().unwrap() {
            out.insert(format!("{t}/{}", uri.rsplit('/').next().unwrap()));
        }
    }
    out
}

/// The moments a random kill rarely hits, forced: the process aborts after a batch's
/// Parquet files are written but before its Delta commit entry (orphan files, never
/// referenced afterwards), and after the commits but before the acknowledgement to
/// Postgres (the batch comes again and is recognised); and a commit whose reply is lost
/// is recognised by its txn version. The lake ends equal to Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_the_commit_boundaries_lose_and_double_nothing() {
    let (info, client) = audited_db("pt_crash_points").await;
    let p = pipeline_file(&info, "crash_points", Some(AS_OF));
    run_once(&p, "--once snapshot");
    let lake_dir = p.dir.join("lake");
    let mut transactions = 0;
    for (round, fault) in [
        "before_delta_commit:2",
        "before_ack:1",
        "lost_commit_reply:3",
    ]
    .into_iter()
    .enumerate()
    {
        let stop = Arc::new(AtomicBool::new(false));
        let load = spawn_load(info.url.clone(), 0xc0de + round as u64, stop.clone());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        transactions += load.await.unwrap();

        let files_before = parquet_files(&lake_dir);
        let point = fault.split(':').next().unwrap();
        if point == "lost_commit_reply" {
            let (status, stderr) = run_once_with_fault(&p, fault);
            assert!(status.success(), "{fault}: {stderr}");
            assert!(
                stderr.contains("treating it as committed"),
                "{fault}: the lost reply was not recognised by the txn version: {stderr}"
            );
        } else {
            run_once_crashing_at(&p, fault);
        }
        if point == "before_delta_commit" {
            let referenced = referenced_files(&p.lake).await;
            let orphans: Vec<String> = parquet_files(&lake_dir)
                .difference(&files_before)
                .filter(|f| !referenced.contains(*f))
                .cloned()
                .collect();
            assert!(
                !orphans.is_empty(),
                "the crash before a commit entry left no written-but-uncommitted Parquet file"
            );
            run_once(&p, "--once after the crash before a commit");
            let referenced = referenced_files(&p.lake).await;
            assert!(
                orphans.iter().all(|f| !referenced.contains(f)),
                "an orphan Parquet file of the crashed write became part of a table: {orphans:?}"
            );
            eprintln!("{fault}: orphan Parquet files, never referenced: {orphans:?}");
        } else {
            run_once(&p, &format!("--once after {fault}"));
        }
    }
    assert_lake_equals_postgres(&p, &client, transactions).await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
}

/// A batch replayed after a crash may be cut differently from the first time. Here the
/// first run commits a new client's loan everywhere (its features count the loan) and is
/// killed before the acknowledgement; the loan is then deleted; the replay gets both
/// transactions in one batch, where the loan is inserted and deleted. The client must be
/// recomputed from that batch's row images, or it keeps the loan in its features.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cut_differently_recomputes_entities_touched_in_between() {
    let (info, client) = audited_db("pt_replay_cut").await;
    let p = pipeline_file(&info, "replay_cut", Some(AS_OF));
    // A client without loans, in the snapshot.
    add_user(&client, "2020-08-01", "Ann").await;
    run_once(&p, "--once snapshot");
    // The audit counts streamed changes only.
    client
        .batch_execute("DELETE FROM audit_changes")
        .await
        .unwrap();
    // Her first loan, issued in the 90-day window: her profit rate becomes 0.0.
    client
        .batch_execute(
            "INSERT INTO loan SELECT max(l.id) + 1, (SELECT max(id) FROM \"user\"), 1000,
               DATE '2020-08-20', 30, NULL, 'active', NULL FROM loan l",
        )
        .await
        .unwrap();
    // Committed to raw/loan and the features, then killed before the acknowledgement:
    // raw/user and raw/payment stay at the snapshot, so the replay starts there.
    run_once_crashing_at(&p, "before_ack:1");
    client
        .batch_execute("DELETE FROM loan WHERE id = (SELECT max(id) FROM loan)")
        .await
        .unwrap();
    run_once(&p, "--once replaying both transactions");
    // Without her loan again: NULL, not the 0.0 of the first run.
    assert_lake_equals_postgres(&p, &client, 2).await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
}
