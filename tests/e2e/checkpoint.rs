//! State checkpoints: a restart reads each table's checkpoint (its newest row per key at
//! an LSN) plus the changes after it, and gets exactly what reading the whole history
//! gives; a kill while a checkpoint is written loses nothing; a resnapshot retires them.

use crate::faults::*;
use crate::support::*;
use arrow::array::AsArray;
use pipeline::changelog::Lsn;
use pipeline::sink::checkpoint;
use pipeline::sink::LakeTable;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a test waits for the checkpointer to get somewhere. Generous: it runs at nice
/// 19, and with the whole suite on 2 cores it gets the CPU last (CI once waited more than
/// 60 s).
const CHECKPOINTER_WAIT: Duration = Duration::from_secs(180);

/// Waits for a checkpoint of `table` at or past `lsn` (a `pg_lsn` as text).
async fn wait_checkpoint(p: &TestPipeline, table: &LakeTable, at_least: &str) -> i64 {
    let want: Lsn = at_least.parse().unwrap();
    let deadline = Instant::now() + CHECKPOINTER_WAIT;
    loop {
        // Read while the pipeline writes it: a read may meet a Delta checkpoint half
        // listed (the rebuild skips a checkpoint it cannot read), so an error is "not yet".
        if let Ok(Some(c)) = checkpoint::read(&p.lake, table).await {
            if c.lsn >= want {
                return c.lsn.as_i64();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of {table} at {at_least} within {CHECKPOINTER_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start_run(p: &TestPipeline, log: &str, fault: Option<&str>) -> std::process::Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.arg("run")
        .arg(&p.file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(p.dir.join(log)).unwrap());
    if let Some(f) = fault {
        c.env("PIPELINE_CRASH_AT", f);
    }
    c.spawn().unwrap()
}

async fn load_for(url: &str, seed: u64, time: Duration) -> usize {
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(url.to_string(), seed, stop.clone());
    tokio::time::sleep(time).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_read_state_checkpoints_and_a_kill_while_writing_one_loses_nothing() {
    let (info, client) = audited_db("pt_state_ck").await;
    let mut p = pipeline_file(&info, "state_ck", Some(AS_OF));
    p.update(|c| c.lake.maintenance.state_checkpoint_every_changes = 400);
    run_once(&p, "--once snapshot");

    // Streaming under load; then one statement of more changes than the threshold, so
    // that a checkpoint is taken with everything in it.
    let mut child = start_run(&p, "run1.log", None);
    wait_slot_active(&client, &p.slot).await;
    let mut transactions = load_for(&info.url, 0xc4ec, Duration::from_secs(3)).await;
    client
        .batch_execute("UPDATE loan SET amount = amount + 1 WHERE id <= 600")
        .await
        .unwrap();
    let end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let loan_ck = wait_checkpoint(&p, &LakeTable::raw("loan"), &end).await;
    for t in [
        LakeTable::raw("user"),
        LakeTable::raw("payment"),
        LakeTable::features("client_features"),
    ] {
        wait_checkpoint(&p, &t, &end).await;
    }
    // The checkpoint of raw/loan is Postgres' loan table (no change since): the newest
    // row of each key, deleted ones left out.
    let ck = checkpoint::read(&p.lake, &LakeTable::raw("loan"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ck.lsn.as_i64(), loan_ck);
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("ck", ck.table.table_provider().await.unwrap())
        .unwrap();
    let rows = ctx
        .sql("SELECT CAST(id AS BIGINT), CAST(amount AS VARCHAR), status FROM ck")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut got = BTreeMap::new();
    for b in &rows {
        let ids = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64).unwrap();
        let text = |c: usize| {
            arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Utf8).unwrap()
        };
        let (amount, status) = (text(1), text(2));
        for i in 0..b.num_rows() {
            let v = |a: &arrow::array::ArrayRef| {
                let s = a.as_string::<i32>();
                (!arrow::array::Array::is_null(s, i)).then(|| s.value(i).to_string())
            };
            got.insert(
                ids.as_primitive::<arrow::datatypes::Int64Type>().value(i),
                (v(&amount), v(&status)),
            );
        }
    }
    let want: BTreeMap<i64, (Option<String>, Option<String>)> = client
        .query("SELECT id::bigint, amount::text, status FROM loan", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(got.len(), want.len());
    let differ: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(k).map(normalize) != Some(normalize(v)))
        .take(5)
        .collect();
    assert!(
        differ.is_empty(),
        "checkpoint rows differ from Postgres: {differ:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(p.dir.join("run1.log")).unwrap();
    let written: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("state checkpoint written"))
        .collect();
    eprintln!(
        "{} checkpoints, the last: {:?}",
        written.len(),
        written.last()
    );
    assert!(
        !written.is_empty() && !log.contains("state checkpoint failed"),
        "{log}"
    );
    wait_slot_released(&client, &p.slot).await;

    // Changes while down; the restart reads the checkpoints, then the changes after them.
    transactions += load_for(&info.url, 0xc4ed, Duration::from_secs(1)).await;
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "--once"])
        .arg(&p.file)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("rebuilding from the state checkpoint").count(),
        3,
        "each raw table from its checkpoint: {err}"
    );
    assert_lake_equals_postgres(&p, &client, transactions).await;

    // Killed while writing a checkpoint (its second table of the second round), then
    // more changes: nothing lost or doubled, features right.
    let mut child = start_run(&p, "run2.log", Some("before_checkpoint_commit:6"));
    wait_slot_active(&client, &p.slot).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(info.url.clone(), 0xc4ee, stop.clone());
    let deadline = Instant::now() + CHECKPOINTER_WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the checkpoint crash point was not reached"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    transactions += load.await.unwrap();
    let log = std::fs::read_to_string(p.dir.join("run2.log")).unwrap();
    assert!(
        !status.success() && log.contains("aborting at `before_checkpoint_commit`"),
        "{status}: {log}"
    );
    wait_slot_released(&client, &p.slot).await;
    run_once(&p, "--once after the crash in a checkpoint");
    assert_lake_equals_postgres(&p, &client, transactions).await;

    // A resnapshot replaces the tables: their checkpoints are emptied first.
    run_ok(&p, &["resnapshot"], "resnapshot");
    for t in [
        LakeTable::raw("loan"),
        LakeTable::features("client_features"),
    ] {
        assert!(
            checkpoint::read(&p.lake, &t).await.unwrap().is_none(),
            "{t}"
        );
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
}

/// Postgres prints numerics with their scale (`100.00`), the lake as cast (`100`).
fn normalize(v: &(Option<String>, Option<String>)) -> (Option<f64>, Option<String>) {
    (v.0.as_ref().and_then(|a| a.parse().ok()), v.1.clone())
}
