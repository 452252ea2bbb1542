//! Table maintenance beside the appends: checkpoints, compaction and vacuum keep a table fed
//! by many small commits compact, with every row still there exactly once.

use crate::support::*;
use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use pipeline::sink::{maintain_table, DeltaSink, Lake, Maintainer, MaintenanceConfig};
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
        target_file_mb: 16,
        vacuum_retention_hours: 1,
    };
    let (maintainer, task) = Maintainer::spawn(lake.clone(), config.clone());
    let mut sink = DeltaSink::open(
        lake.clone(),
        "maint".into(),
        vec![("t".into(), schema.clone())],
    )
    .await
    .unwrap()
    .with_maintainer(maintainer);
    let commits = 45i64;
    for v in 1..=commits {
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![v]))])
            .unwrap();
        sink.commit(vec![("t".into(), vec![batch])], v as u64)
            .await
            .unwrap();
    }
    drop(sink); // closes the maintainer's channel once it has seen every commit
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap();

    let log = dir.path().join("lake/t/_delta_log");
    let checkpoints = std::fs::read_dir(&log)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".checkpoint.parquet")
        })
        .count();
    assert!(checkpoints >= 2, "checkpoints written: {checkpoints}");
    let table = lake.existing_table("t").await.unwrap();
    // 40 one-row files compacted into one, plus the 5 appended after the compaction.
    assert!(
        active_files(&table) <= 6,
        "active files: {}",
        active_files(&table)
    );
    let rows = read_delta(
        &lake,
        "t",
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
    let report = maintain_table(&lake, "t", &config, true).await.unwrap();
    let table = lake.existing_table("t").await.unwrap();
    assert_eq!(active_files(&table), 1, "after maintain: {report:?}");
    assert_eq!(
        report.files_vacuumed, 0,
        "files removed < 1 h ago are kept for old readers"
    );
    let rows = read_delta(&lake, "t", "SELECT count(*), sum(v) FROM t").await;
    assert_eq!(
        (col_at(&rows, 0), col_at(&rows, 1)),
        (commits, commits * (commits + 1) / 2),
        "maintain took {:?}",
        started.elapsed()
    );
}

fn col_at(rows: &[RecordBatch], i: usize) -> i64 {
    rows[0].column(i).as_primitive::<Int64Type>().value(0)
}
