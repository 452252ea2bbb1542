//! End-to-end tests against a real PostgreSQL (wal_level=logical) and real Delta tables.
//! One test binary (each links the whole dependency tree).

// The helpers are `pub` for the test modules; nothing outside this binary can reach them.
#![allow(unreachable_pub)]

mod backfill;
mod checkpoint;
mod decide;
mod faults;
mod large_txn;
mod maintain;
mod s3;
mod schema;
mod serve;
mod source_faults;
mod support;
mod tls;
mod training;

use std::process::Command;
use std::time::Duration;
use support::*;

const STREAM_TIMEOUT: Duration = Duration::from_secs(20);

fn pipeline_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.env("RUST_LOG", "warn");
    c
}

/// (a) The shared dump, restored with `pipeline db restore`, run with `--once`: every
/// client's latest features equal the Postgres oracle, and the raw mirror holds every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_once_matches_the_oracle_for_every_client() {
    let Some(dump) = dump_path() else {
        eprintln!("skipped: ../shared/dumps/de_test_task_db not present");
        return;
    };
    let (info, _) = fresh_db("pt_dump").await;
    let out = pipeline_bin()
        .args(["db", "restore", "--clean"])
        .arg(&dump)
        .env("PG_URL", &info.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = pipeline::source::connect(&info, 3).await.unwrap();
    let p = pipeline_file(&info, "dump", Some(AS_OF));
    let out = pipeline_bin()
        .args(["run", "--once"])
        .arg(&p.file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let want = oracle(&client, AS_OF).await;
    assert_eq!(want.len(), 113_836);
    let got = latest_features(&p.lake).await;
    let d = diff(&got, &want, 20);
    assert!(d.is_empty(), "{}", d.join("\n"));
    // Some clients have each feature set, so the comparison is not vacuous.
    assert!(got.values().any(|f| f.paid_loans_count > Some(0)));
    assert!(got
        .values()
        .any(|f| f.days_since_last_late_payment.is_some()));
    assert!(got
        .values()
        .any(|f| f.profit_in_last_90_days_rate.is_some()));

    for (table, n) in [("user", 113_836), ("loan", 167_213), ("payment", 87_920)] {
        assert_eq!(raw_counts(&p.lake, table).await, (n, n), "raw/{table}");
    }
    // A second --once resumes from the slot: no re-snapshot, nothing doubled.
    let out = pipeline_bin()
        .args(["run", "--once"])
        .arg(&p.file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(raw_counts(&p.lake, "loan").await, (167_213, 167_213));

    // `pipeline status` reports the slot as Postgres has it: the acknowledged LSN, and
    // retained WAL and lag as byte counts.
    let out = pipeline_bin().arg("status").arg(&p.file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .to_string()
    };
    let confirmed: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(field("slot"), p.slot);
    assert_eq!(field("active"), "no");
    assert_eq!(field("confirmed_flush_lsn"), confirmed);
    let retained: i64 = field("retained_wal_bytes").parse().unwrap();
    let lag: i64 = field("lag_bytes").parse().unwrap();
    assert!(
        lag >= 0 && retained >= lag,
        "retained {retained}, lag {lag}"
    );
    drop_slot(&client, &p.slot).await;
    let out = pipeline_bin().arg("status").arg(&p.file).output().unwrap();
    assert!(!out.status.success(), "status of a dropped slot must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no replication slot"));
}

async fn drop_slot(client: &tokio_postgres::Client, slot: &str) {
    let _ = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
}

/// Dirty data (NULLs, zero amounts, unknown statuses, orphan payments, several payments
/// per loan, non-ASCII names) through snapshot and streaming, checked against the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_data_snapshot_and_streamed_changes_match_the_oracle() {
    let (info, client) = fresh_db("pt_dirty").await;
    client.batch_execute(SCHEMA_SQL).await.unwrap();
    client
        .batch_execute(
            r#"
        INSERT INTO "user" VALUES
          (1, '2020-01-01', 'Jüri', 'Põder', '1980-02-03', '38002030000'),
          (2, NULL, NULL, NULL, NULL, NULL),
          (3, '2019-05-05', 'Ольга', 'Šmidt', '1990-01-01', 'x'),
          (4, '2020-08-01', 'No', 'Loans', NULL, NULL);
        INSERT INTO loan VALUES
          (10, 1, 500, '2020-07-01', 30, '2020-07-31', 'paid', '2020-07-20'),
          (11, 1, 0, '2020-08-01', 30, NULL, 'active', '2020-08-01'),
          (12, 1, NULL, '2020-08-10', 30, NULL, 'overdue', '2020-08-10'),
          (13, 2, 300, '2020-06-01', 7, NULL, 'weird_status', NULL),
          (14, 2, 200, NULL, 7, NULL, 'paid', NULL),
          (15, NULL, 100, '2020-08-01', 7, NULL, 'paid', NULL),
          (16, 3, 1000, '2020-08-23', 90, NULL, 'active', '2020-08-23'),
          (17, 3, 400, '2020-05-25', 90, NULL, 'paid', '2020-05-25');
        INSERT INTO payment VALUES
          (100, 10, 550, 500, 50, 'on_time', '2020-07-15'),
          (101, 11, 10, 0, NULL, 'late', '2020-08-05'),
          (102, 12, 20, 10, 10, 'late', '2020-08-20'),
          (103, 12, 30, 10, 20, 'late', '2027-01-01'),
          (104, 999, 5, 5, 5, 'late', '2020-08-01'),
          (105, 16, 1100, 1000, 100, 'on_time', '2020-08-23'),
          (106, 16, 1100, 1000, 7.5, 'on_time', '2020-08-24'),
          (107, 13, 1, 1, 1, NULL, '2020-06-02'),
          (108, 17, 1, 1, 1, 'late', NULL);
        "#,
        )
        .await
        .unwrap();
    let p = pipeline_file(&info, "dirty", Some(AS_OF));
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    let before = latest_features(&p.lake).await;
    assert_eq!(before[&1].paid_loans_count, Some(1));
    assert_eq!(before[&1].days_since_last_late_payment, Some(3));
    assert_eq!(before[&4].paid_loans_count, Some(0));
    assert_eq!(before[&4].profit_in_last_90_days_rate, None);
    wait_slot_active(&client, &p.slot).await;

    // Inserts, updates and deletes of loans and payments, one commit each.
    for sql in [
        "INSERT INTO loan VALUES (18, 4, 250, '2020-08-15', 30, NULL, 'paid', '2020-08-15')",
        "INSERT INTO payment VALUES (109, 18, 260, 250, 10, 'late', '2020-08-22')",
        "UPDATE loan SET status = 'paid' WHERE id = 11",
        "UPDATE payment SET status = 'on_time' WHERE id = 102",
        "UPDATE loan SET client_id = 3 WHERE id = 12",
        "DELETE FROM payment WHERE id = 100",
        "DELETE FROM loan WHERE id = 17",
        "INSERT INTO loan VALUES (999, 2, 50, '2020-08-01', 7, NULL, 'active', NULL)",
        "UPDATE payment SET id = 200 WHERE id = 105",
        "DELETE FROM \"user\" WHERE id = 2",
        "INSERT INTO \"user\" VALUES (5, '2020-08-20', 'Zoë', 'O''Neil', NULL, NULL)",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    // One transaction touching several clients, then a truncate.
    client
        .batch_execute(
            "BEGIN; UPDATE loan SET status = 'paid'; INSERT INTO payment VALUES (300, 16, 1, 1, 1, 'late', '2020-08-01'); COMMIT;",
        )
        .await
        .unwrap();
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    client.batch_execute("TRUNCATE payment").await.unwrap();
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    let after = latest_features(&p.lake).await;
    assert!(
        !after.contains_key(&2),
        "deleted client has a tombstone as latest row"
    );
    assert!(after
        .values()
        .all(|f| f.days_since_last_late_payment.is_none()));
    client
        .batch_execute("INSERT INTO payment VALUES (400, 16, 1, 1, 1, 'late', '2020-08-02')")
        .await
        .unwrap();
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    cancel.cancel();
    handle.await.unwrap().unwrap();

    // State rebuilt from the raw mirror must honour the truncate: the payments before it
    // are gone, the one after it is there. A change touching every client shows both.
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_slot_active(&client, &p.slot).await;
    client
        .batch_execute("UPDATE loan SET amount = amount + 1")
        .await
        .unwrap();
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    let rebuilt = latest_features(&p.lake).await;
    assert_eq!(rebuilt[&3].days_since_last_late_payment, Some(21));
    cancel.cancel();
    handle.await.unwrap().unwrap();
    drop_slot(&client, &p.slot).await;
}

/// (b)+(c) Streaming on seeded data, then stop, change while down, restart: nothing lost
/// or doubled in the raw mirror, no re-snapshot, features right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_slot_without_loss_duplicates_or_resnapshot() {
    let (info, client) = seeded_db("pt_restart", 3000).await;
    let loans_at_start: i64 = count(&client, "SELECT count(*) FROM loan").await;
    let p = pipeline_file(&info, "restart", Some(AS_OF));

    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_slot_active(&client, &p.slot).await;
    let mut changes = 0i64;
    for i in 0..30 {
        client
            .execute(
                "UPDATE loan SET status = CASE WHEN status = 'paid' THEN 'active' ELSE 'paid' END WHERE id = $1",
                &[&(i * 7 + 1)],
            )
            .await
            .unwrap();
        changes += 1;
    }
    client
        .batch_execute("INSERT INTO loan SELECT id + 100000, client_id, amount, created_on, duration, matured_on, status, updated_on FROM loan WHERE id <= 50")
        .await
        .unwrap();
    changes += 50;
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    cancel.cancel();
    let s = handle.await.unwrap().unwrap();
    assert!(s.batches >= 1);

    // While the pipeline is down.
    client
        .batch_execute("DELETE FROM loan WHERE id BETWEEN 100001 AND 100010")
        .await
        .unwrap();
    changes += 10;
    client
        .batch_execute("UPDATE payment SET status = 'late' WHERE id <= 40")
        .await
        .unwrap();

    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    cancel.cancel();
    let s = handle.await.unwrap().unwrap();
    assert_eq!(s.snapshot_rows, 0, "restart must not re-snapshot");

    let (total, distinct) = raw_counts(&p.lake, "loan").await;
    assert_eq!(total, distinct, "duplicate rows in raw/loan");
    assert_eq!(
        total,
        loans_at_start + changes,
        "raw/loan = snapshot + every change once"
    );
    let (total, distinct) = raw_counts(&p.lake, "payment").await;
    assert_eq!(total, distinct);

    // Lake deleted to start over: the stale slot is replaced and a new snapshot taken.
    std::fs::remove_dir_all(p.dir.join("lake")).unwrap();
    let (handle, _) = spawn_pipeline(p.load(), true);
    let s = handle.await.unwrap().unwrap();
    assert_eq!(
        s.snapshot_rows as i64,
        loans_at_start
            + 40
            + count(&client, "SELECT count(*) FROM payment").await
            + count(&client, "SELECT count(*) FROM \"user\"").await
    );
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    drop_slot(&client, &p.slot).await;
}

/// `db restore` detects both dump formats (plain SQL and custom) made by pg_dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_restore_detects_plain_and_custom_dumps() {
    let (info, client) = seeded_db("pt_seed_src", 500).await;
    let want: i64 = count(&client, "SELECT count(*) FROM payment").await;
    let dir = tempfile::tempdir().unwrap();
    for (format, target) in [("p", "pt_restore_plain"), ("c", "pt_restore_custom")] {
        let file = dir.path().join(format!("dump.{format}"));
        let st = Command::new("pg_dump")
            .args(["-F", format, "-f"])
            .arg(&file)
            .arg(&info.url)
            .status()
            .unwrap();
        assert!(st.success());
        let target_url = format!("{}/{target}", pg_base());
        let out = pipeline_bin()
            .args(["db", "--url", &target_url, "restore", "--clean"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t =
            pipeline::source::connect(&pipeline::source::ConnInfo::parse(&target_url).unwrap(), 3)
                .await
                .unwrap();
        let got = count(&t, "SELECT count(*) FROM payment").await;
        assert_eq!(got, want, "format {format}");
    }
}

/// Bad input fails before touching the slot, naming the file, line and feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_the_file_line_and_feature_at_fault() {
    let (info, client) = fresh_db("pt_validate").await;
    client.batch_execute(SCHEMA_SQL).await.unwrap();
    client
        .batch_execute("CREATE TABLE nokey (a int)")
        .await
        .unwrap();
    let good = std::fs::read_to_string(repo().join("feature_defs/client_features.yaml")).unwrap();
    let cases = [
        (
            "unknown_column",
            good.replace("WHERE status = 'paid'", "WHERE stauts = 'paid'"),
            vec!["paid_loans_count", "line 17", "stauts"],
        ),
        (
            "unknown_udf",
            good.replace("days_between(", "days_betwen("),
            vec!["days_since_last_late_payment", "days_betwen"],
        ),
        (
            "bad_type",
            good.replace("type: double", "type: dubble"),
            vec!["features[2].type", "line", "dubble"],
        ),
        (
            "unknown_key",
            good.replace("    default: 0\n", "    default: 0\n    defualt: 1\n"),
            vec!["defualt", "line 20"],
        ),
    ];
    for (name, text, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&f, text).unwrap();
        let p = dir.path().join("pipeline.yaml");
        std::fs::write(
            &p,
            format!(
                "name: v\nsource:\n  url: {}\n  publication: p_v\n  slot: t_v\n  tables: [user, loan, payment]\nlake:\n  url: {}\nfeatures: [{}]\n",
                info.url,
                dir.path().join("lake").display(),
                f.display()
            ),
        )
        .unwrap();
        for cmd in ["validate", "run"] {
            let out = pipeline_bin().arg(cmd).arg(&p).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{name}/{cmd} should fail");
            assert!(err.contains(&format!("{name}.yaml")), "{name}/{cmd}: {err}");
            for n in &needles {
                assert!(err.contains(n), "{name}/{cmd}: `{n}` not in: {err}");
            }
        }
    }
    // Nothing was created on the source for a failed run.
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_v'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);

    // Missing environment variable without a default.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pipeline.yaml");
    std::fs::write(&p, "name: v\nsource:\n  url: ${PIPELINE_TEST_UNSET_VAR}\n").unwrap();
    let out = pipeline_bin().arg("validate").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 3") && err.contains("PIPELINE_TEST_UNSET_VAR"),
        "{err}"
    );

    // A table without a primary key is named.
    let p = dir.path().join("nokey.yaml");
    std::fs::write(
        &p,
        std::fs::read_to_string(repo().join("pipelines/loan_features.yaml"))
            .unwrap()
            .replace(
                "tables: [user, loan, payment]",
                "tables: [user, loan, payment, nokey]",
            )
            .replace(
                "../feature_defs",
                &repo().join("feature_defs").display().to_string(),
            )
            .replace(
                "../decisions",
                &repo().join("decisions").display().to_string(),
            ),
    )
    .unwrap();
    let out = pipeline_bin()
        .arg("validate")
        .arg(&p)
        .env("PG_URL", &info.url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("public.nokey") && err.contains("primary key"),
        "{err}"
    );
}

/// An unreachable database is retried with backoff, then reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_retried_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pipeline.yaml");
    std::fs::write(
        &p,
        format!(
            "name: v\nsource:\n  url: postgres://postgres@127.0.0.1:1/x\n  publication: p\n  slot: s\n  tables: [user, loan, payment]\n  connect_retries: 3\nlake:\n  url: {}\nfeatures: [{}]\n",
            dir.path().join("lake").display(),
            repo().join("feature_defs/client_features.yaml").display()
        ),
    )
    .unwrap();
    let out = pipeline_bin()
        .env("RUST_LOG", "info")
        .arg("validate")
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        err.matches("postgres unreachable, retrying").count(),
        2,
        "{err}"
    );
    assert!(err.contains("after 3 attempts"), "{err}");
}

/// Every supported Postgres type reaches the raw mirror with the right Arrow type and
/// value, through the snapshot and through pgoutput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_decode_to_arrow_in_snapshot_and_stream() {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::*;
    let (info, client) = fresh_db("pt_types").await;
    client.batch_execute(SCHEMA_SQL).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE typed (id int8 PRIMARY KEY, s int2, i int4, b bool, f4 float4, f8 float8,
               n numeric(12,2), nu numeric, t text, v varchar(10), d date, ts timestamp, tz timestamptz,
               j json, jb jsonb, u uuid);
             INSERT INTO typed VALUES (1, -2, 40000, true, 1.5, -2.25, 12345.67, 0.1, 'tëxt', 'v', '2020-08-23',
               '2020-08-23 10:11:12.5', '2020-08-23 10:00:00+02', '{\"a\": 1}', '{\"b\": [2]}',
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
             INSERT INTO typed (id) VALUES (2);",
        )
        .await
        .unwrap();
    let mut p = pipeline_file(&info, "types", Some(AS_OF));
    p.update(|c| c.source.tables.push("typed".into()));
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_slot_active(&client, &p.slot).await;
    client
        .batch_execute(
            "INSERT INTO typed SELECT 3, s, i, b, f4, f8, n, nu, t, v, d, ts, tz, j, jb, u FROM typed WHERE id = 1;
             UPDATE typed SET f8 = 'NaN', t = NULL WHERE id = 2;",
        )
        .await
        .unwrap();
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = try_read_delta(
            &p.lake,
            &LakeTable::raw("typed"),
            "SELECT * FROM t ORDER BY _lsn, _seq",
        )
        .await
        .unwrap_or_default();
        if rows.iter().map(|b| b.num_rows()).sum::<usize>() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    handle.await.unwrap().unwrap();
    let b = arrow::compute::concat_batches(&rows[0].schema(), &rows).unwrap();
    assert_eq!(
        b.num_rows(),
        4,
        "snapshot rows 1, 2 then streamed 3 and the update of 2"
    );
    let col = |n: &str| b.column_by_name(n).unwrap().clone();
    // Rows 0 (snapshot id 1) and 2 (streamed id 3) hold the same values.
    for r in [0, 2] {
        assert_eq!(col("s").as_primitive::<Int16Type>().value(r), -2);
        assert_eq!(col("i").as_primitive::<Int32Type>().value(r), 40000);
        assert!(col("b").as_boolean().value(r));
        assert_eq!(col("f4").as_primitive::<Float32Type>().value(r), 1.5);
        assert_eq!(col("f8").as_primitive::<Float64Type>().value(r), -2.25);
        assert_eq!(col("n").data_type(), &DataType::Decimal128(12, 2));
        assert_eq!(
            col("n").as_primitive::<Decimal128Type>().value(r),
            1_234_567
        );
        assert_eq!(
            col("nu").as_primitive::<Decimal128Type>().value(r),
            1_000_000_000
        ); // 0.1 at scale 10
        assert_eq!(col("d").as_primitive::<Date32Type>().value(r), 18497);
        let ts = col("ts");
        assert_eq!(
            arrow::compute::cast(&ts, &DataType::Int64)
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(r),
            1_598_177_472_500_000
        );
        let tz = arrow::compute::cast(&col("tz"), &DataType::Int64).unwrap();
        assert_eq!(
            tz.as_primitive::<Int64Type>().value(r),
            1_598_169_600_000_000
        );
        let s = |n: &str| {
            let a = arrow::compute::cast(&col(n), &DataType::Utf8).unwrap();
            a.as_string::<i32>().value(r).to_string()
        };
        assert_eq!(s("t"), "tëxt");
        assert_eq!(s("v"), "v");
        assert_eq!(s("j"), "{\"a\": 1}");
        assert_eq!(s("jb"), "{\"b\": [2]}");
        assert_eq!(s("u"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }
    // Row 1: id 2, all NULL; row 3: its update with NaN.
    for n in ["s", "i", "b", "f4", "n", "t", "d", "ts", "tz", "j", "u"] {
        assert!(col(n).is_null(1), "{n}");
    }
    assert!(col("f8").as_primitive::<Float64Type>().value(3).is_nan());
    let ops = arrow::compute::cast(&col("_op"), &DataType::Utf8).unwrap();
    let ops: Vec<_> = ops.as_string::<i32>().iter().flatten().collect();
    assert_eq!(ops, vec!["insert", "insert", "insert", "update"]);
    drop_slot(&client, &p.slot).await;
}

/// The replication connection is killed mid-stream (as when Postgres restarts): the
/// supervised run reconnects with backoff, rebuilds state from the lake and resumes
/// from the slot; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replication_connection_is_restarted_without_loss() {
    let (info, client) = seeded_db("pt_reconnect", 1000).await;
    let loans_at_start: i64 = count(&client, "SELECT count(*) FROM loan").await;
    let p = pipeline_file(&info, "reconnect", Some(AS_OF));
    let cancel = tokio_util::sync::CancellationToken::new();
    let (pl, c) = (p.load(), cancel.clone());
    let handle = tokio::spawn(async move {
        pipeline::runner::run_supervised(&pl, pipeline::runner::RunOptions::default(), c).await
    });
    wait_slot_active(&client, &p.slot).await;
    client
        .batch_execute("UPDATE loan SET status = 'paid' WHERE id <= 20")
        .await
        .unwrap();
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;

    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    client
        .batch_execute("DELETE FROM loan WHERE id BETWEEN 21 AND 30")
        .await
        .unwrap();
    client
        .batch_execute("UPDATE loan SET status = 'overdue' WHERE id BETWEEN 31 AND 40")
        .await
        .unwrap();
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    cancel.cancel();
    handle.await.unwrap().unwrap();

    let (total, distinct) = raw_counts(&p.lake, "loan").await;
    assert_eq!(total, distinct, "duplicates in raw/loan");
    assert_eq!(total, loans_at_start + 20 + 10 + 10);
    drop_slot(&client, &p.slot).await;
}

/// An update that leaves a TOASTed column alone: pgoutput sends no value for it ('u'),
/// and the raw mirror must still hold the full value (from the snapshot's state, from an
/// earlier streamed change, and from an earlier change in the same transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_filled_from_state_not_nulled() {
    use arrow::array::AsArray;
    let (info, client) = seeded_db("pt_toast", 50).await;
    // EXTERNAL: values over ~2 kB are stored out of line, uncompressed, so they are TOASTed.
    client
        .batch_execute(
            r#"ALTER TABLE "user" ALTER COLUMN first_name SET STORAGE EXTERNAL;
               UPDATE "user" SET first_name = repeat('s', 9000) WHERE id = 1;"#,
        )
        .await
        .unwrap();
    let p = pipeline_file(&info, "toast", Some(AS_OF));
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_slot_active(&client, &p.slot).await;
    client
        .batch_execute(
            r#"UPDATE "user" SET last_name = 'one' WHERE id = 1;
               UPDATE "user" SET first_name = repeat('t', 9000), last_name = 'zero' WHERE id = 2;
               UPDATE "user" SET last_name = 'two' WHERE id = 2;
               BEGIN;
               UPDATE "user" SET first_name = repeat('u', 9000), last_name = 'a' WHERE id = 3;
               UPDATE "user" SET last_name = 'b' WHERE id = 3;
               UPDATE "user" SET last_name = 'c' WHERE id = 3;
               UPDATE "user" SET last_name = 'three' WHERE id = 1;
               COMMIT;"#,
        )
        .await
        .unwrap();
    let sql = "SELECT id, first_name, last_name FROM t WHERE _op = 'update' ORDER BY _lsn, _seq";
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = try_read_delta(&p.lake, &LakeTable::raw("user"), sql)
            .await
            .unwrap_or_default();
        if rows.iter().map(|b| b.num_rows()).sum::<usize>() >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    handle.await.unwrap().unwrap();
    let b = arrow::compute::concat_batches(&rows[0].schema(), &rows).unwrap();
    let text = |c: usize, r: usize| {
        let a = arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Utf8).unwrap();
        let a = a.as_string::<i32>();
        (!arrow::array::Array::is_null(&a, r)).then(|| a.value(r).to_string())
    };
    let got: Vec<(String, Option<String>, Option<String>)> = (0..b.num_rows())
        .map(|r| (text(0, r).unwrap(), text(1, r), text(2, r)))
        .collect();
    let long = |c: &str| Some(c.repeat(9000));
    let want = vec![
        ("1".to_string(), long("s"), Some("one".to_string())),
        ("2".into(), long("t"), Some("zero".into())),
        ("2".into(), long("t"), Some("two".into())),
        ("3".into(), long("u"), Some("a".into())),
        ("3".into(), long("u"), Some("b".into())),
        ("3".into(), long("u"), Some("c".into())),
        ("1".into(), long("s"), Some("three".into())),
    ];
    // Compare lengths and first chars, not 9 kB strings, in the failure message.
    let short = |v: &[(String, Option<String>, Option<String>)]| -> Vec<String> {
        v.iter()
            .map(|(i, f, l)| {
                let f = f
                    .as_ref()
                    .map(|f| format!("{}x{}", &f[..1], f.len()))
                    .unwrap_or("NULL".into());
                format!("{i}: {f} {l:?}")
            })
            .collect()
    };
    assert_eq!(short(&got), short(&want));
    assert_eq!(got, want);
    drop_slot(&client, &p.slot).await;
}
