//! Source schema changes (ALTER TABLE … ADD/DROP COLUMN) while streaming: the raw
//! mirror's Delta schema follows without losing or doubling a row; a feature that reads
//! a dropped column stops the pipeline with an error naming it, and nothing after the
//! change is acknowledged.

use super::*;
use arrow::array::AsArray;
use arrow::datatypes::DataType;

/// `(op, status, note)` of every raw/loan row of loan `id`, in change order.
async fn loan_history(lake: &Lake, id: i32) -> Vec<(String, String, Option<String>)> {
    let sql = format!(
        "SELECT _op, CAST(status AS VARCHAR) AS status, CAST(note AS VARCHAR) AS note \
         FROM t WHERE id = {id} ORDER BY _lsn, _seq"
    );
    // Empty until the mirror has the column (the stages may not have seen the ALTER yet).
    let has_note = match lake.existing_table(&LakeTable::raw("loan")).await {
        Ok(t) => t
            .snapshot()
            .is_ok_and(|s| s.schema().fields().any(|f| f.name() == "note")),
        Err(_) => false,
    };
    if !has_note {
        return Vec::new();
    }
    let batches = try_read_delta(lake, &LakeTable::raw("loan"), &sql)
        .await
        .unwrap_or_default();
    let mut out = Vec::new();
    for b in batches {
        let col = |i: usize| arrow::compute::cast(b.column(i), &DataType::Utf8).unwrap();
        let (op, status, note) = (col(0), col(1), col(2));
        let (op, status, note) = (
            op.as_string::<i32>(),
            status.as_string::<i32>(),
            note.as_string::<i32>(),
        );
        for r in 0..b.num_rows() {
            out.push((
                op.value(r).to_string(),
                status.value(r).to_string(),
                (!arrow::array::Array::is_null(note, r)).then(|| note.value(r).to_string()),
            ));
        }
    }
    out
}

/// Reads with `read` until it returns at least `rows` rows (or 20 s pass).
async fn wait_for_rows<T, F>(rows: usize, read: impl Fn() -> F) -> Vec<T>
where
    F: std::future::Future<Output = Vec<T>>,
{
    let mut got = Vec::new();
    for _ in 0..200 {
        got = read().await;
        if got.len() >= rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

async fn wait_for_history(
    lake: &Lake,
    id: i32,
    rows: usize,
) -> Vec<(String, String, Option<String>)> {
    wait_for_rows(rows, || loan_history(lake, id)).await
}

const NEW_LOAN: &str = "INSERT INTO loan (id, client_id, amount, created_on, duration, \
     matured_on, status, updated_on, note) VALUES (900001, 1, 1000, '2020-08-01', 30, \
     '2020-08-31', 'active', '2020-08-01', 'first note')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_drop_column_evolve_the_raw_mirror_without_losing_a_row() {
    let (info, client) = seeded_db("pt_schema", 200).await;
    let loans_at_start = count(&client, "SELECT count(*) FROM loan").await;
    let p = pipeline_file(&info, "schema", Some(AS_OF));
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_slot_active(&client, &p.slot).await;

    for sql in [
        "UPDATE loan SET status = 'paid' WHERE id = 1",
        "ALTER TABLE loan ADD COLUMN note text",
        NEW_LOAN,
        "BEGIN; UPDATE loan SET note = 'second', status = 'paid' WHERE id = 900001; \
         UPDATE loan SET status = 'overdue' WHERE id = 2; COMMIT;",
        "ALTER TABLE loan DROP COLUMN note",
        "UPDATE loan SET status = 'overdue' WHERE id = 900001",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let want = vec![
        (
            "insert".to_string(),
            "active".to_string(),
            Some("first note".to_string()),
        ),
        ("update".into(), "paid".into(), Some("second".into())),
        ("update".into(), "overdue".into(), None),
    ];
    assert_eq!(wait_for_history(&p.lake, 900001, 3).await, want);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    cancel.cancel();
    let s = handle.await.unwrap().unwrap();
    assert!(s.schema_changes >= 2, "{s:?}");

    let (total, distinct) = raw_counts(&p.lake, "loan").await;
    assert_eq!(total, distinct, "duplicate rows in raw/loan");
    assert_eq!(total, loans_at_start + 5, "snapshot + every change once");

    // A restart on the catalog's schema (no `note`) over a lake that still has it:
    // state comes back from the evolved table, nothing is replayed twice.
    client
        .batch_execute("UPDATE loan SET status = 'paid' WHERE id = 3")
        .await
        .unwrap();
    let (handle, _) = spawn_pipeline(p.load(), true);
    let s = handle.await.unwrap().unwrap();
    assert_eq!(s.snapshot_rows, 0);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    let (total, distinct) = raw_counts(&p.lake, "loan").await;
    assert_eq!((total, distinct), (loans_at_start + 6, loans_at_start + 6));
    assert_eq!(loan_history(&p.lake, 900001).await, want);
    drop_slot(&client, &p.slot).await;
}

const NOTES_FEATURES: &str = r#"
name: loan_notes
description: Reads a column the test then drops.
entity:
  name: client
  key: client_id
  table: user
  table_key: id
sources:
  loan:
    column: client_id
features:
  - name: noted_loans
    type: bigint
    default: 0
    description: Loans with a note.
    sql: |
      SELECT client_id, count(note) AS noted_loans FROM loan GROUP BY client_id
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_reading_a_dropped_column_stops_the_pipeline_naming_it() {
    let (info, client) = seeded_db("pt_schema_drop", 50).await;
    client
        .batch_execute(
            "ALTER TABLE loan ADD COLUMN note text; UPDATE loan SET note = 'n' WHERE id % 2 = 0",
        )
        .await
        .unwrap();
    let mut p = pipeline_file(&info, "schema_drop", Some(AS_OF));
    let notes = p.dir.join("notes.yaml");
    std::fs::write(&notes, NOTES_FEATURES).unwrap();
    p.update(|c| c.features.insert(0, notes.clone()));

    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_slot_active(&client, &p.slot).await;
    client
        .batch_execute("UPDATE loan SET status = 'paid' WHERE id = 3")
        .await
        .unwrap();
    assert_eq!(wait_for_history(&p.lake, 3, 2).await.len(), 2);
    client
        .batch_execute("ALTER TABLE loan DROP COLUMN note")
        .await
        .unwrap();
    client
        .batch_execute("UPDATE loan SET status = 'overdue' WHERE id = 5")
        .await
        .unwrap();
    let result = tokio::time::timeout(STREAM_TIMEOUT, handle).await;
    cancel.cancel();
    let err = result
        .expect("the pipeline must stop on its own")
        .unwrap()
        .expect_err("a feature reads a dropped column");
    let msg = err.to_string();
    for part in ["loan", "dropped note", "noted_loans", "notes.yaml"] {
        assert!(msg.contains(part), "`{part}` missing from: {msg}");
    }
    assert_eq!(
        loan_history(&p.lake, 5).await.len(),
        1,
        "the change after the drop must not be written"
    );

    // Without the feature the pipeline goes on from the change it stopped at.
    p.update(|c| c.features.retain(|f| f != &notes));
    let (handle, _) = spawn_pipeline(p.load(), true);
    handle.await.unwrap().unwrap();
    let history = loan_history(&p.lake, 5).await;
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1].1, "overdue");
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;
    drop_slot(&client, &p.slot).await;
}

/// `amount` of every raw/loan row of loan `id`, in change order, as doubles.
async fn loan_amounts(lake: &Lake, id: i32) -> Vec<f64> {
    let sql = format!("SELECT CAST(amount AS DOUBLE) FROM t WHERE id = {id} ORDER BY _lsn, _seq");
    let batches = try_read_delta(lake, &LakeTable::raw("loan"), &sql)
        .await
        .unwrap_or_default();
    let mut out = Vec::new();
    for b in batches {
        let col = b.column(0).as_primitive::<arrow::datatypes::Float64Type>();
        out.extend(col.iter().map(|v| v.unwrap_or(f64::NAN)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_type_change_is_cast_to_the_lake_or_stops_naming_the_raw_table() {
    let (info, client) = seeded_db("pt_schema_type", 50).await;
    let p = pipeline_file(&info, "schema_type", Some(AS_OF));
    let (handle, cancel) = spawn_pipeline(p.load(), false);
    wait_slot_active(&client, &p.slot).await;

    // double precision → numeric(14,2): the new values are cast to the double column.
    for sql in [
        "ALTER TABLE loan ALTER COLUMN amount TYPE numeric(14,2)",
        "UPDATE loan SET amount = 1234.56 WHERE id = 1",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let amounts = wait_for_rows(2, || loan_amounts(&p.lake, 1)).await;
    assert_eq!(amounts.len(), 2, "{amounts:?}");
    assert_eq!(amounts[1], 1234.56);
    wait_until_oracle_matches(&p.lake, &client, AS_OF, STREAM_TIMEOUT).await;

    // date → text with a value that is no date: the raw table cannot take it (a column
    // no feature reads, so the raw mirror is what refuses it).
    for sql in [
        "ALTER TABLE loan ALTER COLUMN matured_on TYPE text",
        "UPDATE loan SET matured_on = 'not a date', amount = 1 WHERE id = 2",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let result = tokio::time::timeout(STREAM_TIMEOUT, handle).await;
    cancel.cancel();
    let err = result
        .expect("the pipeline must stop on its own")
        .unwrap()
        .expect_err("'not a date' cannot go into a date column");
    assert!(
        err.to_string().contains("raw/loan") && err.to_string().contains("pipeline resnapshot"),
        "{err}"
    );
    assert_eq!(
        loan_amounts(&p.lake, 2).await.len(),
        1,
        "the uncastable change must not be written"
    );
    let unacked = count(
        &client,
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}' \
             AND confirmed_flush_lsn < pg_current_wal_lsn()",
            p.slot
        ),
    )
    .await;
    assert_eq!(unacked, 1, "the slot must stay before the change");
    drop_slot(&client, &p.slot).await;
}
