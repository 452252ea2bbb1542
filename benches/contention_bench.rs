//! Delta commit contention on one table: 1, 2 and 4 writers appending small batches to the
//! same table at once (each with its own handle, as separate processes would), on a local
//! lake and on an S3 lake (s3s-fs on loopback). Each writer's commit retries on the version
//! it lost to another writer (delta-rs' commit loop). Reported: total commits/s, per-commit
//! latency percentiles, commits that ran out of retries (`failed`), and commits reported
//! successful whose version another writer overwrote (`lost`: s3s-fs checks If-None-Match
//! and writes in two steps, so two puts of one key at once can both pass; AWS S3 and a
//! local lake decide atomically).
//!
//! Run: `cargo bench --bench contention_bench`. Knobs: BENCH_COMMITS (per writer, default 100).

mod common;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use common::{knob, percentile};
use deltalake::protocol::SaveMode;
use pipeline::sink::{Lake, LakeTable};
use std::sync::Arc;
use std::time::Instant;

fn batch(writer: i64, i: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("writer", DataType::Int64, false),
        Field::new("n", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![writer; 10])),
            Arc::new(Int64Array::from(vec![i; 10])),
        ],
    )
    .unwrap()
}

async fn run(lake: &Lake, writers: i64, commits: i64) -> Outcome {
    let path = LakeTable::raw(format!("contention_{writers}"));
    // Created by one commit first, so every writer appends to an existing table.
    lake.table(&path)
        .await
        .unwrap()
        .write(vec![batch(-1, 0)])
        .with_save_mode(SaveMode::Append)
        .await
        .unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let lake = lake.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut table = lake.table(&path).await.unwrap();
            let (mut took, mut failed) = (Vec::new(), 0);
            for i in 0..commits {
                let t = Instant::now();
                match table
                    .clone()
                    .write(vec![batch(w, i)])
                    .with_save_mode(SaveMode::Append)
                    .await
                {
                    Ok(t) => table = t,
                    // Out of commit retries: counted, then the next commit from a reload.
                    Err(_) => {
                        failed += 1;
                        table = lake.table(&path).await.unwrap();
                    }
                }
                took.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            (took, failed)
        }));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (took, f) = t.await.unwrap();
        all.extend(took);
        failed += f;
    }
    let wall = started.elapsed().as_secs_f64();
    // Versions after the creating one: one per commit that landed. Fewer than the commits
    // reported successful means a commit overwrote another (a store whose conditional
    // put is not atomic).
    let versions = lake.table(&path).await.unwrap().version().unwrap_or(0) as i64;
    all.sort_by(f64::total_cmp);
    let landed = versions;
    Outcome {
        rate: landed as f64 / wall,
        ms: all,
        failed,
        lost: writers * commits - failed - landed,
    }
}

struct Outcome {
    rate: f64,
    ms: Vec<f64>,
    failed: i64,
    lost: i64,
}

fn main() {
    let commits: i64 = knob("BENCH_COMMITS", 100);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s3 = common::S3Server::start(dir.path());
    let mut lakes = vec![(
        "local",
        pipeline::config::LakeConfig::new(dir.path().join("lake").display().to_string()),
    )];
    if let Some(s3) = &s3 {
        lakes.push(("s3s-fs", s3.lake("contention")));
    }
    if s3.is_some() {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    for (name, config) in lakes {
        let lake = Lake::new(&config.url, &config.storage_options).unwrap();
        for writers in [1, 2, 4] {
            let Outcome {
                rate,
                ms,
                failed,
                lost,
            } = rt.block_on(run(&lake, writers, commits));
            println!(
                "contention lake={name} writers={writers} commits={} landed_per_s={rate:.0} \
                 failed={failed} lost={lost} commit_ms p50={:.1} p90={:.1} p99={:.1} max={:.1}",
                ms.len(),
                percentile(&ms, 0.5),
                percentile(&ms, 0.9),
                percentile(&ms, 0.99),
                ms[ms.len() - 1]
            );
        }
    }
}
