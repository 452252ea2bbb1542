//! Table maintenance beside the appends: checkpoints, compaction and vacuum keep a table fed
//! by many small commits compact, with every row still there exactly once.

use crate::support::*;
use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use pipeline::config::MaintenanceConfig;
use pipeline::sink::{maintain_table, DeltaSink, Maintainer};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn active_files(table: &deltalake::DeltaTable) -> usize {
    table.get_file_uris().unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_maintenance_compacts_checkpoints_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().join("lake").to_str().unwrap(), &BTreeMap::new()).unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let config = MaintenanceConfig {
        checkpoint_every_commits: 10,
        compact_every_commits: 40,
        small_file_mb: 1,
        target_file_mb: 16,
        vacuum_every_minutes: 0,
        vacuum_retention_hours: 1,
        // Nothing older than now: every commit file before the latest checkpoint goes, and
        // checkpoints keep no tombstone.
        log_retention_minutes: 0,
        tombstone_retention_minutes: 0,
        ..MaintenanceConfig::default()
    };
    let (maintainer, task) = Maintainer::spawn(lake.clone(), config.clone());
    let mut sink = DeltaSink::open_with(
        lake.clone(),
        "maint".into(),
        vec![(t(), schema.clone())],
        &config.table_properties(),
    )
    .await
    .unwrap()
    .with_maintainer(maintainer);
    async fn append(sink: &mut DeltaSink, schema: &Arc<Schema>, v: i64) {
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![v]))])
            .unwrap();
        sink.append(vec![(t(), vec![batch])], Lsn::new(v as u64))
            .await
            .unwrap();
    }
    let mut commits = 0i64;
    while commits < 45 {
        commits += 1;
        append(&mut sink, &schema, commits).await;
    }
    // The compaction planned at commit 40 is rewritten in the background and lands with
    // an append after it is ready: keep appending, slowly, until it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    while active_files(sink.table(&t()).unwrap()) > 10 {
        assert!(Instant::now() < deadline, "no compaction landed in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
        commits += 1;
        append(&mut sink, &schema, commits).await;
    }
    drop(sink); // closes the maintainer's channel once it has seen every commit
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap();

    let log = dir.path().join("lake").join(t().path()).join("_delta_log");
    // Earlier checkpoints are gone with the log before them (retention 0): the last one
    // tells how far the maintainer got.
    let last_checkpoint = std::fs::read_to_string(log.join("_last_checkpoint")).unwrap();
    let checkpoint_version: u64 = last_checkpoint
        .split("\"version\":")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no version in _last_checkpoint: {last_checkpoint}"));
    let table = lake.existing_table(&t()).await.unwrap();
    // Every 10 commits counted from the last checkpoint, at the version the maintainer
    // sees when it gets there (later than a multiple of 10 when it lags under load).
    let last = table.version().unwrap();
    assert!(
        checkpoint_version + 10 > last && checkpoint_version >= 30,
        "checkpoints every 10 commits, the last within 10 of version {last}: {last_checkpoint}"
    );
    // 40 one-row files compacted into one, plus the few appended after the plan.
    assert!(
        active_files(&table) <= 10,
        "active files: {}",
        active_files(&table)
    );
    let rows = read_delta(
        &lake,
        &t(),
        "SELECT count(*), count(DISTINCT v), sum(v) FROM t",
    )
    .await;
    let col = |i: usize| rows[0].column(i).as_primitive::<Int64Type>().value(0);
    assert_eq!(
        (col(0), col(1), col(2)),
        (commits, commits, commits * (commits + 1) / 2)
    );

    // `pipeline maintain` path: compacts the rest; vacuum keeps files inside the retention.
    let started = Instant::now();
    let report = maintain_table(&lake, &t(), &config, true).await.unwrap();
    let table = lake.existing_table(&t()).await.unwrap();
    assert_eq!(active_files(&table), 1, "after maintain: {report:?}");
    assert_eq!(
        report.files_vacuumed, 0,
        "files removed < 1 h ago are kept for old readers"
    );
    let rows = read_delta(&lake, &t(), "SELECT count(*), sum(v) FROM t").await;
    assert_eq!(
        (col_at(&rows, 0), col_at(&rows, 1)),
        (commits, commits * (commits + 1) / 2),
        "maintain took {:?}",
        started.elapsed()
    );

    // Retention 0: the log is the checkpoint and nothing before it, and the checkpoint
    // holds no tombstone of the ~45 compacted files (a reader would load every one).
    let version = table.version().unwrap();
    let names: Vec<String> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let commits_kept: Vec<&String> = names.iter().filter(|n| n.ends_with(".json")).collect();
    assert_eq!(commits_kept.len(), 1, "log after cleanup: {names:?}");
    let checkpoint = log.join(format!("{version:020}.checkpoint.parquet"));
    let ctx = datafusion::prelude::SessionContext::new();
    let actions = ctx
        .read_parquet(
            checkpoint.to_str().unwrap(),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    ctx.register_table("cp", actions.into_view()).unwrap();
    let counts = ctx
        .sql("SELECT count(\"remove\"), count(\"add\") FROM cp")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        (col_at(&counts, 0), col_at(&counts, 1)),
        (0, 1),
        "tombstones and files in checkpoint {version}"
    );
}

fn col_at(rows: &[RecordBatch], i: usize) -> i64 {
    rows[0].column(i).as_primitive::<Int64Type>().value(0)
}
