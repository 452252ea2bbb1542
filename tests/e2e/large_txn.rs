//! A source transaction larger than a batch (`max_rows`) is handed on in pieces, encoded
//! into files no commit references yet, and committed with its last piece: a crash between
//! the pieces commits nothing of it, and the retry commits the transaction exactly once.

use crate::faults::{
    add_user, assert_lake_equals_postgres, audited_db, parquet_files, raw_change_counts,
    referenced_files, run_once, run_once_crashing_at,
};
use crate::support::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_a_batch_is_committed_once_after_a_crash_between_pieces() {
    let (info, client) = audited_db("pt_large_txn").await;
    let mut p = pipeline_file(&info, "large_txn", Some(AS_OF));
    p.update(|c| c.batch.max_rows = 500);
    run_once(&p, "--once snapshot");

    // One transaction touching every table, many times larger than a batch.
    client
        .batch_execute(
            "BEGIN;
             UPDATE loan SET updated_on = updated_on + 1;
             UPDATE loan SET status = 'paid' WHERE id % 7 = 0;
             UPDATE payment SET status = CASE WHEN status = 'late' THEN 'on_time' ELSE 'late' END;
             DELETE FROM payment WHERE id % 11 = 0;
             INSERT INTO \"user\" (id, created_on, first_name)
               SELECT max(id) + g, DATE '2020-08-20', 'Zoë' FROM \"user\", generate_series(1, 300) g
               GROUP BY g;
             COMMIT;",
        )
        .await
        .unwrap();
    let changes = count(&client, "SELECT count(*) FROM audit_changes").await;
    assert!(changes > 5_000, "the transaction is only {changes} rows");
    // A small one right after: it lands in the batch that carries the large one's end.
    add_user(&client, "2020-08-21", "Ola").await;

    // Killed after the third piece was applied and written ahead.
    let lake_dir = p.dir.join("lake");
    let before = parquet_files(&lake_dir);
    run_once_crashing_at(&p, "large_txn_piece:3");
    let referenced = referenced_files(&p.lake).await;
    let orphans: Vec<String> = parquet_files(&lake_dir)
        .difference(&before)
        .filter(|f| !referenced.contains(*f))
        .cloned()
        .collect();
    // Pieces are encoded as they come; a file is uploaded once it reaches its target size
    // (32 MiB), so this small transaction may have left none yet.
    eprintln!("files written ahead by the crashed run: {orphans:?}");
    for table in ["user", "loan", "payment"] {
        let (_, _, streamed) = raw_change_counts(&p.lake, table).await;
        assert_eq!(
            streamed, 0,
            "raw/{table}: a piece was committed before the transaction's end"
        );
    }

    // The retry gets the whole transaction again from the slot and commits it once.
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "--once"])
        .arg(&p.file)
        .env("RUST_LOG", "pipeline=info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("handing it on in pieces") && log.contains("large transaction complete"),
        "the transaction was not split into pieces: {log}"
    );
    assert_lake_equals_postgres(&p, &client, 2).await;
    let referenced = referenced_files(&p.lake).await;
    assert!(
        orphans.iter().all(|f| !referenced.contains(f)),
        "a file written ahead by the crashed run became part of a table: {orphans:?}"
    );
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
}
