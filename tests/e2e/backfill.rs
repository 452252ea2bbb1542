//! `pipeline backfill`: features added to a running pipeline get their history by a
//! replay of the raw log, checked against what the stream wrote and against the oracle;
//! a crash part-way is finished by running it again; a replay that disagrees with the
//! stream writes nothing.

use super::faults::run_once;
use super::*;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};
use std::collections::{BTreeMap, HashSet};

/// The point-in-time-safe features, written independently as plain Postgres SQL.
const PIT_ORACLE_SQL: &str = r#"
WITH params AS (SELECT $1::date AS a),
paid AS (
  SELECT client_id, count(*) AS n FROM loan CROSS JOIN params
   WHERE status = 'paid' AND updated_on <= params.a GROUP BY client_id),
interest AS (
  SELECT loan_id, sum(coalesce(interest, 0)) AS interest FROM payment CROSS JOIN params
   WHERE created_on <= params.a GROUP BY loan_id),
issued AS (
  SELECT l.id, l.client_id, l.amount FROM loan l CROSS JOIN params
    LEFT JOIN interest x ON x.loan_id = l.id
   WHERE l.status IN ('active', 'paid', 'overdue')
     AND l.created_on > params.a - 90 AND l.created_on <= params.a
     AND (l.updated_on <= params.a OR x.loan_id IS NOT NULL)),
agg AS (
  SELECT i.client_id, sum(i.amount) AS amount, sum(coalesce(x.interest, 0)) AS interest
    FROM issued i LEFT JOIN interest x ON x.loan_id = i.id GROUP BY i.client_id)
SELECT u.id::bigint, coalesce(paid.n, 0)::bigint,
       CASE WHEN agg.amount IS NULL OR agg.amount = 0 THEN NULL
            ELSE (agg.interest / agg.amount)::float8 END
  FROM "user" u
  LEFT JOIN paid ON paid.client_id = u.id
  LEFT JOIN agg ON agg.client_id = u.id
"#;

type Pit = (Option<i64>, Option<f64>);

async fn pit_oracle(client: &tokio_postgres::Client) -> BTreeMap<i64, Pit> {
    let date = chrono::NaiveDate::parse_from_str(AS_OF, "%Y-%m-%d").unwrap();
    client
        .query(PIT_ORACLE_SQL, &[&date])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Each live client's newest point-in-time-safe features in the lake.
async fn pit_in_lake(lake: &Lake) -> BTreeMap<i64, Pit> {
    let batches = read_delta(
        lake,
        &LakeTable::features("client_features"),
        "SELECT client_id, paid_loans_count_pit, profit_in_last_90_days_rate_pit, _deleted
           FROM (SELECT *, row_number() OVER (PARTITION BY client_id ORDER BY _lsn DESC) AS rn FROM t)
          WHERE rn = 1",
    )
    .await;
    let mut out = BTreeMap::new();
    for b in batches {
        let (id, paid) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_primitive::<Int64Type>(),
        );
        let rate = b.column(2).as_primitive::<Float64Type>();
        for i in (0..b.num_rows()).filter(|&i| !b.column(3).as_boolean().value(i)) {
            out.insert(
                id.value(i),
                (
                    paid.is_valid(i).then(|| paid.value(i)),
                    rate.is_valid(i).then(|| rate.value(i)),
                ),
            );
        }
    }
    out
}

fn assert_pit_matches(got: &BTreeMap<i64, Pit>, want: &BTreeMap<i64, Pit>) {
    let mut bad = Vec::new();
    for (id, w) in want {
        let ok = got.get(id).is_some_and(|g| {
            g.0 == w.0
                && match (g.1, w.1) {
                    (None, None) => true,
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
                    _ => false,
                }
        });
        if !ok {
            bad.push(format!("client {id}: lake {:?}, oracle {w:?}", got.get(id)));
        }
    }
    assert!(
        bad.is_empty() && got.len() == want.len(),
        "{} of {} clients differ ({} in the lake):\n{}",
        bad.len(),
        want.len(),
        got.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// `pipeline backfill <file> <args>`: (success, stdout, stderr).
fn backfill(p: &TestPipeline, args: &[&str], crash_at: Option<&str>) -> (bool, String, String) {
    let mut cmd = pipeline_bin();
    cmd.arg("backfill").arg(&p.file).args(args);
    if let Some(point) = crash_at {
        cmd.env("PIPELINE_CRASH_AT", point);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The repo's client feature file without the features from `cut_at` on, as `name`.
fn feature_file_until(p: &TestPipeline, name: &str, cut_at: &str) -> std::path::PathBuf {
    let full = std::fs::read_to_string(repo().join("feature_defs/client_features.yaml")).unwrap();
    let cut = full.find(cut_at).expect("marker in the feature file");
    let path = p.dir.join(name);
    std::fs::write(&path, &full[..cut]).unwrap();
    path
}

async fn table_version(lake: &Lake) -> u64 {
    lake.existing_table(&LakeTable::features("client_features"))
        .await
        .unwrap()
        .version()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_added_to_a_running_pipeline_is_backfilled_verified_and_streamed_on() {
    let (info, client) = seeded_db("pt_backfill", 300).await;
    let mut p = pipeline_file(&info, "backfill", Some(AS_OF));
    // The pipeline starts without the point-in-time-safe features.
    let before = feature_file_until(&p, "before.yaml", "  # Point-in-time-safe variants");
    p.update(|c| c.features = vec![before.clone()]);
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;

    // Many small transactions, some touching one client twice in a row, a loan moved
    // between clients, a client deleted with its loans, one transaction over two clients.
    let loans: Vec<(i32, i32)> = client
        .query(
            "SELECT id, client_id FROM loan WHERE status <> 'paid' ORDER BY id LIMIT 60",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (i, (loan, _)) in loans.iter().enumerate() {
        let day = if i % 2 == 0 {
            "2020-08-20"
        } else {
            "2020-08-25"
        };
        client
            .execute(
                &format!("UPDATE loan SET status = 'paid', updated_on = '{day}' WHERE id = {loan}"),
                &[],
            )
            .await
            .unwrap();
        if i % 3 == 0 {
            client
                .execute(
                    &format!(
                        "INSERT INTO payment SELECT max(id) + 1, {loan}, 100, 90, 10, 'late', '2020-08-2{}' FROM payment",
                        i % 5
                    ),
                    &[],
                )
                .await
                .unwrap();
        }
    }
    let (moved, from) = loans[1];
    let to = loans[2].1;
    client
        .batch_execute(&format!(
            "UPDATE loan SET client_id = {to} WHERE id = {moved};
             BEGIN;
             UPDATE loan SET status = 'overdue', updated_on = '2020-08-21' WHERE id = {};
             UPDATE loan SET status = 'overdue', updated_on = '2020-08-21' WHERE id = {};
             COMMIT;
             DELETE FROM payment WHERE loan_id IN (SELECT id FROM loan WHERE client_id = {from});
             DELETE FROM loan WHERE client_id = {from};
             DELETE FROM \"user\" WHERE id = {from};",
            loans[3].0, loans[4].0
        ))
        .await
        .unwrap();
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    cancel.cancel();
    handle.await.unwrap().unwrap();
    let streamed_version = table_version(&p.lake).await;
    let stream_rows = read_delta(
        &p.lake,
        &LakeTable::features("client_features"),
        "SELECT count(*) FROM t",
    )
    .await[0]
        .column(0)
        .as_primitive::<Int64Type>()
        .value(0) as usize;
    assert!(stream_rows > 300, "{stream_rows}");

    // The full feature file: `run` refuses, naming the way out.
    p.update(|c| c.features = vec![repo().join("feature_defs/client_features.yaml")]);
    let out = pipeline_bin()
        .args(["run", "--once"])
        .arg(&p.file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("pipeline backfill"),
        "{stderr}"
    );

    // A backfill killed at its commit leaves the table as it was and a mark that stops
    // `run`; running it again finishes it.
    let (ok, _, stderr) = backfill(&p, &["--verify"], Some("before_delta_commit"));
    assert!(!ok, "the armed crash must stop the backfill: {stderr}");
    assert_eq!(table_version(&p.lake).await, streamed_version);
    let out = pipeline_bin()
        .args(["run", "--once"])
        .arg(&p.file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("did not finish"),
        "{stderr}"
    );

    let (ok, stdout, stderr) = backfill(&p, &["--verify"], None);
    assert!(ok, "backfill: {stdout}{stderr}");
    eprintln!("{stdout}");
    assert!(
        stdout.contains(" 0 mismatched") && stdout.contains(" 0 missing"),
        "{stdout}"
    );
    assert!(stdout.contains("written as version"), "{stdout}");
    // Every row the stream wrote was compared, the snapshot's too.
    let compared: usize = stdout
        .split("verify features/client_features: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no verify line: {stdout}"));
    assert_eq!(compared, stream_rows, "{stdout}");
    assert_eq!(table_version(&p.lake).await, streamed_version + 1);

    // Old features as the stream left them, new ones as the oracle has them.
    let want = oracle(&client, AS_OF).await;
    let d = diff(&latest_features(&p.lake).await, &want, 10);
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert_pit_matches(&pit_in_lake(&p.lake).await, &pit_oracle(&client).await);

    // Every row carries the commit LSN and time of a source transaction (or of the
    // snapshot), and the stream's rows are all there at a finer grain.
    let raw_stamps = raw_commit_stamps(&p.lake).await;
    let rows = read_delta(
        &p.lake,
        &LakeTable::features("client_features"),
        "SELECT _lsn, CAST(_commit_ts AS BIGINT) FROM t WHERE _lsn > (SELECT min(_lsn) FROM t)",
    )
    .await;
    let mut backfilled = 0;
    for b in &rows {
        let (l, ts) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_primitive::<Int64Type>(),
        );
        for i in 0..b.num_rows() {
            backfilled += 1;
            assert!(
                raw_stamps.contains(&(l.value(i), ts.value(i))),
                "row at _lsn {} with _commit_ts {} matches no source transaction",
                l.value(i),
                ts.value(i)
            );
        }
    }
    assert!(backfilled > 60, "{backfilled} rows after the snapshot");
    // The replaced history stays readable by time travel.
    let mut old = p
        .lake
        .existing_table(&LakeTable::features("client_features"))
        .await
        .unwrap();
    old.load_version(streamed_version).await.unwrap();
    let cols = old.snapshot().unwrap().snapshot().arrow_schema();
    assert!(cols.column_with_name("paid_loans_count_pit").is_none());

    // Nothing left to do; then `run` streams on with the new features.
    let (ok, stdout, _) = backfill(&p, &[], None);
    assert!(ok && stdout.contains("nothing to backfill"), "{stdout}");
    client
        .execute(
            &format!(
                "UPDATE loan SET status = 'paid', updated_on = '2020-08-22' WHERE id = {}",
                loans[10].0
            ),
            &[],
        )
        .await
        .unwrap();
    run_once(&p, "run after the backfill");
    let d = diff(
        &latest_features(&p.lake).await,
        &oracle(&client, AS_OF).await,
        10,
    );
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert_pit_matches(&pit_in_lake(&p.lake).await, &pit_oracle(&client).await);

    // A changed definition the stream did not compute: verification finds it, names the
    // feature, and nothing is replaced.
    let version = table_version(&p.lake).await;
    let full = std::fs::read_to_string(repo().join("feature_defs/client_features.yaml")).unwrap();
    let changed = p.dir.join("changed.yaml");
    std::fs::write(
        &changed,
        full.replacen(
            "WHERE status = 'paid'\n      GROUP BY",
            "WHERE status = 'active'\n      GROUP BY",
            1,
        ),
    )
    .unwrap();
    p.update(|c| c.features = vec![changed.clone()]);
    let (ok, stdout, _) = backfill(&p, &["--verify", "--feature-file", "client_features"], None);
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("paid_loans_count:") && !stdout.contains(" 0 mismatched"),
        "{stdout}"
    );
    assert_eq!(table_version(&p.lake).await, version);
    p.update(|c| c.features = vec![repo().join("feature_defs/client_features.yaml")]);
    run_once(&p, "run after a refused backfill");
}

/// `(_lsn, _commit_ts as µs)` of every transaction in the raw mirror.
async fn raw_commit_stamps(lake: &Lake) -> HashSet<(i64, i64)> {
    let mut set = HashSet::new();
    for table in ["user", "loan", "payment"] {
        for b in read_delta(
            lake,
            &LakeTable::raw(table),
            "SELECT DISTINCT _lsn, CAST(_commit_ts AS BIGINT) FROM t",
        )
        .await
        {
            let (l, t) = (
                b.column(0).as_primitive::<Int64Type>(),
                b.column(1).as_primitive::<Int64Type>(),
            );
            for i in 0..b.num_rows() {
                set.insert((l.value(i), t.value(i)));
            }
        }
    }
    set
}
