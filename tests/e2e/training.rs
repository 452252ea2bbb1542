//! `pipeline training-set`: event time against the Postgres oracle at each spine date,
//! known time against the values the oracle gave while the stream ran.

use super::faults::run_once;
use super::*;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int32Type, Int64Type};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
use std::path::Path;

/// Runs `pipeline training-set` and returns its stdout (the summary); fails on error.
fn training_set(p: &TestPipeline, args: &[&str]) -> String {
    let out = pipeline_bin()
        .arg("training-set")
        .arg(&p.file)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "training-set {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Parquet file's rows and its training-set metadata (JSON).
fn read_parquet(path: &Path) -> (RecordBatch, serde_json::Value) {
    let file = std::fs::File::open(path).unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let meta = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| {
            kv.iter()
                .find(|kv| kv.key == pipeline::offline::METADATA_KEY)
        })
        .and_then(|kv| kv.value.clone())
        .expect("training-set metadata");
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(Result::unwrap).collect();
    (
        arrow::compute::concat_batches(&schema, &batches).unwrap(),
        serde_json::from_str(&meta).unwrap(),
    )
}

/// Row `i`'s features from the output's feature columns.
fn features_at(b: &RecordBatch, i: usize) -> Option<Features> {
    let paid = b["paid_loans_count"].as_primitive::<Int64Type>();
    let days = b["days_since_last_late_payment"].as_primitive::<Int32Type>();
    let rate = b["profit_in_last_90_days_rate"].as_primitive::<Float64Type>();
    // No feature row: every feature NULL (a count is never NULL in a computed row).
    paid.is_valid(i).then(|| Features {
        paid_loans_count: Some(paid.value(i)),
        days_since_last_late_payment: days.is_valid(i).then(|| days.value(i)),
        profit_in_last_90_days_rate: rate.is_valid(i).then(|| rate.value(i)),
    })
}

fn date_of(days: i32) -> String {
    (chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Duration::days(days as i64))
        .to_string()
}

/// Event time from a SQL spine (loans of three dates, with a label) and from a CSV spine
/// (clients × dates, an unknown client, a NULL time): every row equals the oracle's
/// value for its client at its date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_time_training_set_matches_the_oracle_at_each_date() {
    let (info, client) = seeded_db("pt_train_event", 2_000).await;
    let p = pipeline_file(&info, "train_event", Some(AS_OF));
    run_once(&p, "--once");

    let sql = "SELECT id AS loan_id, client_id, created_on, status = 'overdue' AS label FROM loan \
               WHERE created_on IN (SELECT DISTINCT created_on FROM loan \
                                    WHERE created_on <= '2020-08-23' ORDER BY 1 DESC LIMIT 3) \
                  OR created_on = (SELECT min(created_on) FROM loan)";
    let out_file = p.dir.join("event.parquet");
    let summary = training_set(
        &p,
        &[
            "--spine",
            sql,
            "--key",
            "client_id",
            "--time",
            "created_on",
            "--mode",
            "event",
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    assert!(
        summary.contains("not point-in-time correct in event time: paid_loans_count"),
        "{summary}"
    );
    let (b, meta) = read_parquet(&out_file);
    assert_eq!(meta["mode"], "event");
    assert!(
        meta["not_point_in_time_correct"]["paid_loans_count"].is_string(),
        "{meta}"
    );
    let loans = count(&client, &format!("SELECT count(*) FROM ({sql}) s")).await;
    assert_eq!(b.num_rows() as i64, loans);
    assert!(b.column_by_name("label").is_some() && b.column_by_name("loan_id").is_some());

    // The spine's columns keep their types (loan.client_id is an integer).
    let clients =
        arrow::compute::cast(&b["client_id"], &arrow::datatypes::DataType::Int64).unwrap();
    let clients = clients.as_primitive::<Int64Type>();
    let dates = b["created_on"].as_primitive::<arrow::datatypes::Date32Type>();
    let mut oracles: BTreeMap<i32, BTreeMap<i64, Features>> = BTreeMap::new();
    for i in 0..b.num_rows() {
        let d = dates.value(i);
        if let std::collections::btree_map::Entry::Vacant(e) = oracles.entry(d) {
            e.insert(oracle(&client, &date_of(d)).await);
        }
        let want = &oracles[&d][&clients.value(i)];
        let got = features_at(&b, i).unwrap_or_else(|| panic!("row {i}: no features"));
        assert!(
            got.same(want),
            "loan row {i} at {}: got {got:?}, want {want:?}",
            date_of(d)
        );
    }
    assert!(oracles.len() >= 3, "{} dates", oracles.len());

    // A CSV spine: the first 50 clients at two dates, an unknown client, a NULL time.
    let ids: Vec<i64> = oracles
        .values()
        .next()
        .unwrap()
        .keys()
        .take(50)
        .copied()
        .collect();
    let mut csv = String::from("client_id,as_of,note\n");
    for d in ["2020-08-23", "2020-02-29"] {
        for id in &ids {
            csv.push_str(&format!("{id},{d},x\n"));
        }
    }
    csv.push_str("999999999,2020-08-23,unknown\n");
    csv.push_str(&format!("{},,no time\n", ids[0]));
    let spine = p.dir.join("spine.csv");
    std::fs::write(&spine, csv).unwrap();
    // The values come from the lake's raw mirror, not the database: changed after the
    // run, it must not show (the oracle is taken before).
    let at_feb = oracle(&client, "2020-02-29").await;
    let at_aug = oracle(&client, "2020-08-23").await;
    client
        .batch_execute("UPDATE payment SET status = 'late'; UPDATE loan SET status = 'paid'")
        .await
        .unwrap();
    let out_dir = p.dir.join("event_delta");
    let summary = training_set(
        &p,
        &[
            "--spine",
            spine.to_str().unwrap(),
            "--key",
            "client_id",
            "--time",
            "as_of",
            "--mode",
            "event",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(
        summary.contains("entity deleted/absent 1, NULL key or time 1"),
        "{summary}"
    );
    let table = deltalake::open_table(url::Url::from_directory_path(&out_dir).unwrap())
        .await
        .unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("t", table.table_provider().await.unwrap())
        .unwrap();
    let batches = ctx
        .sql(
            "SELECT client_id, CAST(as_of AS VARCHAR) AS as_of, paid_loans_count, \
              days_since_last_late_payment, profit_in_last_90_days_rate FROM t",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(b.num_rows(), ids.len() * 2 + 2);
    let clients = b.column(0).as_primitive::<Int64Type>();
    let as_of = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
    let as_of = as_of.as_string::<i32>();
    let mut checked = 0;
    for i in 0..b.num_rows() {
        let id = clients.value(i);
        let got = features_at(&b, i);
        match (as_of.is_valid(i).then(|| as_of.value(i)), id) {
            (_, 999_999_999) | (None, _) => assert_eq!(got, None, "row {i}"),
            (Some(d), _) => {
                let want = if d == "2020-02-29" {
                    &at_feb[&id]
                } else {
                    &at_aug[&id]
                };
                let got = got.unwrap();
                assert!(
                    got.same(want),
                    "client {id} at {d}: got {got:?}, want {want:?}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, ids.len() * 2);
}

/// Known time while streaming: the values at instants before and after each change
/// are those the oracle gave then; before the snapshot and for an unknown client there
/// are none; `--version` pins the table as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_time_training_set_returns_what_was_known_then() {
    let (info, client) = seeded_db("pt_train_known", 300).await;
    let p = pipeline_file(&info, "train_known", Some(AS_OF));
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    let features = LakeTable::features("client_features");
    let v0 = p
        .lake
        .existing_table(&features)
        .await
        .unwrap()
        .version()
        .unwrap();

    // A client with two loans not paid yet.
    let c: i64 = client
        .query_one(
            "SELECT client_id::bigint FROM loan WHERE status <> 'paid' GROUP BY client_id \
             HAVING count(*) >= 2 ORDER BY client_id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut known = vec![(chrono::Utc::now(), oracle(&client, AS_OF).await[&c].clone())];
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .execute(
                "UPDATE loan SET status = 'paid' WHERE id = \
                 (SELECT id FROM loan WHERE client_id = $1::bigint AND status <> 'paid' ORDER BY id LIMIT 1)",
                &[&c],
            )
            .await
            .unwrap();
        wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
        known.push((chrono::Utc::now(), oracle(&client, AS_OF).await[&c].clone()));
    }
    cancel.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(
        known[2].1.paid_loans_count,
        known[0].1.paid_loans_count.map(|n| n + 2)
    );

    let ts = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    // The commit time of the first update's row: known from that microsecond on.
    let b = read_delta(
        &p.lake,
        &features,
        &format!("SELECT _commit_ts FROM t WHERE client_id = {c} ORDER BY _lsn"),
    )
    .await;
    let commit = arrow::compute::concat_batches(&b[0].schema(), &b).unwrap();
    let commit = arrow::compute::cast(
        commit.column(0),
        &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
    )
    .unwrap();
    let first_update = commit
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
        .value(1);
    let at_micros = |us: i64| chrono::DateTime::from_timestamp_micros(us).unwrap();
    let mut csv = String::from("client_id,at\n");
    for (t, _) in &known {
        csv.push_str(&format!("{c},{}\n", ts(t)));
    }
    csv.push_str(&format!("{c},{}\n", ts(&at_micros(first_update))));
    csv.push_str(&format!("{c},{}\n", ts(&at_micros(first_update - 1))));
    csv.push_str(&format!("{c},2000-01-01T00:00:00Z\n"));
    csv.push_str(&format!("999999999,{}\n", ts(&known[2].0)));
    let spine = p.dir.join("spine.csv");
    std::fs::write(&spine, csv).unwrap();
    let out = p.dir.join("known.parquet");
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "--spine".to_string(),
            spine.display().to_string(),
            "--key".into(),
            "client_id".into(),
            "--time".into(),
            "at".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let summary = training_set(
        &p,
        &args(&[]).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        summary.contains("with features 5, no feature row 2"),
        "{summary}"
    );
    let (b, meta) = read_parquet(&out);
    assert_eq!(meta["mode"], "known");
    let version = meta["feature_table_version"].as_u64().unwrap();
    assert!(version > v0 as u64, "{meta}");
    let lsn = b["_lsn"].as_primitive::<Int64Type>();
    for (i, (t, want)) in known.iter().enumerate() {
        let got = features_at(&b, i).unwrap_or_else(|| panic!("row {i} at {t}: no features"));
        assert!(got.same(want), "row {i} at {t}: got {got:?}, want {want:?}");
    }
    assert!(lsn.value(0) < lsn.value(1) && lsn.value(1) < lsn.value(2));
    let at = |i: usize| features_at(&b, i).unwrap();
    assert!(at(3).same(&known[1].1), "at the commit time: {:?}", at(3));
    assert!(at(4).same(&known[0].1), "1 µs before it: {:?}", at(4));
    assert_eq!(
        features_at(&b, 5),
        None,
        "before the snapshot nothing was known"
    );
    assert_eq!(features_at(&b, 6), None, "an unknown client");
    assert!(b["_commit_ts"].is_null(5) && b["_lsn"].is_null(6));

    // Pinned to the version after the snapshot: the later changes are not there.
    let v0s = v0.to_string();
    let pinned: Vec<String> = args(&["--version"]).into_iter().chain([v0s]).collect();
    training_set(&p, &pinned.iter().map(String::as_str).collect::<Vec<_>>());
    let (b, meta) = read_parquet(&out);
    assert_eq!(meta["feature_table_version"].as_u64(), Some(v0 as u64));
    let got = features_at(&b, 2).unwrap();
    assert!(
        got.same(&known[0].1),
        "pinned: got {got:?}, want {:?}",
        known[0].1
    );
}

/// A lake streamed before `_commit_ts` existed: on start its feature table gains the
/// column (NULL in the old rows), the stream resumes and writes it, and known time reads
/// the old rows by their `computed_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_table_without_commit_ts_gains_it_on_start() {
    use deltalake::kernel::transaction::CommitProperties;
    use deltalake::kernel::Transaction;
    use deltalake::operations::write::SchemaMode;
    use deltalake::protocol::SaveMode;
    let (info, client) = seeded_db("pt_train_upgrade", 100).await;
    let p = pipeline_file(&info, "train_upgrade", Some(AS_OF));
    run_once(&p, "--once");

    // Rewrite the feature table as the older version left it: the same rows and `txn`
    // versions (so the next run resumes), no `_commit_ts`.
    let path = LakeTable::features("client_features");
    let table = p.lake.existing_table(&path).await.unwrap();
    let app = format!("pipeline-train_upgrade-{}", p.slot);
    let mut txns = Vec::new();
    for app in [app.clone(), format!("{app}/snapshot")] {
        let snapshot = table.snapshot().unwrap();
        let v = snapshot
            .transaction_version(table.log_store().as_ref(), &app)
            .await
            .unwrap()
            .unwrap();
        txns.push(Transaction::new(app, v));
    }
    let old = read_delta(
        &p.lake,
        &path,
        "SELECT client_id, paid_loans_count, days_since_last_late_payment, \
         profit_in_last_90_days_rate, paid_loans_count_pit, profit_in_last_90_days_rate_pit, \
         feature_time, _lsn, computed_at, _deleted FROM t",
    )
    .await;
    let rows: usize = old.iter().map(RecordBatch::num_rows).sum();
    table
        .write(old)
        .with_save_mode(SaveMode::Overwrite)
        .with_schema_mode(SchemaMode::Overwrite)
        .with_commit_properties(CommitProperties::default().with_application_transactions(txns))
        .await
        .unwrap();

    // One client changes; the next run adds the column and resumes.
    let c: i64 = client
        .query_one(
            "UPDATE loan SET status = 'paid' WHERE id = (SELECT min(id) FROM loan WHERE status <> 'paid') \
             RETURNING client_id::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    run_once(&p, "--once");
    let b = read_delta(
        &p.lake,
        &path,
        &format!(
            "SELECT count(*), count(_commit_ts), count(*) FILTER (WHERE client_id = {c} AND _commit_ts IS NOT NULL) FROM t"
        ),
    )
    .await;
    let n = |i: usize| b[0].column(i).as_primitive::<Int64Type>().value(0) as usize;
    assert_eq!(
        n(0),
        rows + 1,
        "the old rows and the changed client's new one"
    );
    assert_eq!((n(1), n(2)), (1, 1), "only the new row has a commit time");

    // Known time now: every client, the old rows by computed_at.
    let out = p.dir.join("known.parquet");
    let summary = training_set(
        &p,
        &[
            "--spine",
            "SELECT id AS client_id, now() AS at FROM \"user\"",
            "--key",
            "client_id",
            "--time",
            "at",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        summary.contains("with features 100, no feature row 0"),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("{rows} feature rows predate _commit_ts")),
        "{summary}"
    );
}

/// Known time over random spines: no row ever gets a value committed after its time, and
/// each gets exactly the stream's row for its key with the highest `_lsn` among those
/// committed by then (checked against the feature table read here), at random instants
/// and at every row's own commit time and the microsecond before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_time_over_random_spines_never_leaks_and_returns_the_streamed_rows() {
    use rand::{Rng, SeedableRng};
    let (info, client) = seeded_db("pt_train_prop", 200).await;
    let p = pipeline_file(&info, "train_prop", Some(AS_OF));
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    // Changes spread over time, some clients changed several times.
    let loans: Vec<i32> = client
        .query("SELECT id FROM loan ORDER BY id LIMIT 40", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (i, id) in loans.iter().enumerate() {
        let status = ["paid", "overdue", "active"][i % 3];
        client
            .execute(
                &format!(
                    "UPDATE loan SET status = '{status}' WHERE id = {}",
                    loans[i % 15]
                ),
                &[],
            )
            .await
            .unwrap();
        if i % 4 == 0 {
            client
                .execute(&format!("DELETE FROM payment WHERE loan_id = {id}"), &[])
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    cancel.cancel();
    handle.await.unwrap().unwrap();

    // The stream's rows: per client, (_lsn, _commit_ts µs, paid_loans_count) by _lsn.
    let mut rows: BTreeMap<i64, Vec<(i64, i64, Option<i64>)>> = BTreeMap::new();
    for b in read_delta(
        &p.lake,
        &LakeTable::features("client_features"),
        "SELECT client_id, _lsn, CAST(_commit_ts AS BIGINT), paid_loans_count FROM t",
    )
    .await
    {
        let (k, l, t) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_primitive::<Int64Type>(),
            b.column(2).as_primitive::<Int64Type>(),
        );
        let paid = b.column(3).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            rows.entry(k.value(i)).or_default().push((
                l.value(i),
                t.value(i),
                paid.is_valid(i).then(|| paid.value(i)),
            ));
        }
    }
    for r in rows.values_mut() {
        r.sort();
    }
    let commits: Vec<i64> = rows.values().flatten().map(|r| r.1).collect();
    let (first, last) = (
        *commits.iter().min().unwrap(),
        *commits.iter().max().unwrap(),
    );
    let clients: Vec<i64> = rows.keys().copied().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6615);
    let mut spine: Vec<(i64, i64)> = (0..3000)
        .map(|_| {
            let c = clients[rng.random_range(0..clients.len())];
            (c, rng.random_range(first - 1_000_000..=last + 1_000_000))
        })
        .collect();
    for (c, r) in &rows {
        for &(_, t, _) in r.iter().filter(|r| r.1 > first) {
            spine.push((*c, t));
            spine.push((*c, t - 1));
        }
    }
    let at = |us: i64| {
        chrono::DateTime::from_timestamp_micros(us)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string()
    };
    let mut csv = String::from("client_id,at\n");
    for (c, t) in &spine {
        csv.push_str(&format!("{c},{}\n", at(*t)));
    }
    let file = p.dir.join("random_spine.csv");
    std::fs::write(&file, csv).unwrap();
    let out = p.dir.join("known.parquet");
    training_set(
        &p,
        &[
            "--spine",
            file.to_str().unwrap(),
            "--key",
            "client_id",
            "--time",
            "at",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let (b, _) = read_parquet(&out);
    assert_eq!(b.num_rows(), spine.len());
    let lsn = b["_lsn"].as_primitive::<Int64Type>();
    let commit =
        arrow::compute::cast(&b["_commit_ts"], &arrow::datatypes::DataType::Int64).unwrap();
    let commit = commit.as_primitive::<Int64Type>();
    let paid = b["paid_loans_count"].as_primitive::<Int64Type>();
    let mut leaks = Vec::new();
    let mut wrong = Vec::new();
    for (i, (c, t)) in spine.iter().enumerate() {
        if commit.is_valid(i) && commit.value(i) > *t {
            leaks.push(format!(
                "client {c} at {t}: value committed at {}",
                commit.value(i)
            ));
        }
        let want = rows[c]
            .iter()
            .filter(|r| r.1 <= *t)
            .max_by_key(|r| r.0)
            .map(|r| (r.0, r.2));
        let got = lsn
            .is_valid(i)
            .then(|| (lsn.value(i), paid.is_valid(i).then(|| paid.value(i))));
        if got != want {
            wrong.push(format!(
                "client {c} at {t}: got {got:?}, the stream's row {want:?}"
            ));
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leaks: {:?}",
        leaks.len(),
        &leaks[..leaks.len().min(5)]
    );
    assert!(
        wrong.is_empty(),
        "{} wrong: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// Spines that cannot be used are refused before any work, naming the file and column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spines_are_refused_naming_file_and_column() {
    let (info, _client) = seeded_db("pt_train_bad", 5).await;
    let p = pipeline_file(&info, "train_bad", Some(AS_OF));
    run_once(&p, "--once");
    for (name, csv, want) in [
        (
            "no_time.csv",
            "client_id,when\n1,2020-08-01\n",
            "no time column `at`",
        ),
        (
            "bad_key.csv",
            "client_id,at\n1,2020-08-01\nabc,2020-08-01\n",
            "key column `client_id`: row 2",
        ),
        (
            "bad_time.csv",
            "client_id,at\n1,yesterday\n",
            "time column `at`",
        ),
    ] {
        let file = p.dir.join(name);
        std::fs::write(&file, csv).unwrap();
        let out = pipeline_bin()
            .arg("training-set")
            .arg(&p.file)
            .args([
                "--spine",
                file.to_str().unwrap(),
                "--key",
                "client_id",
                "--time",
                "at",
            ])
            .args(["--out", p.dir.join("out.parquet").to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(name) && stderr.contains(want),
            "{name}: {stderr}"
        );
        assert!(!p.dir.join("out.parquet").exists());
    }
}
