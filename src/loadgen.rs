//! `pipeline loadgen`: CRM-like traffic against the pipeline's source database (new
//! clients, loan applications, status changes, payments on existing rows), open-loop at a
//! fixed rate; with `--applications`, applications submitted as the CRM would (insert the
//! client and the loan, read `pg_current_wal_lsn()`, call `POST /v1/decisions`), timed
//! from submit to decision and checked to include the application. Dev tooling of the
//! binary, like `db`.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::config::Pipeline;
use pipeline::source::{connect, ConnInfo};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub(crate) struct LoadOptions {
    /// Background CRM transactions per second.
    pub rate: f64,
    pub duration: Duration,
    /// Applications per second submitted and decided (0: none).
    pub applications: f64,
    /// Postgres connections for the background traffic.
    pub connections: usize,
    pub seed: u64,
    /// The API (default: the pipeline's `serve.listen`).
    pub api: Option<String>,
}

/// `30s`, `5m`, `1h` or plain seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30s, 5m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "ms" => n / 1000.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Ids handed out to new rows, and rows to change.
///
/// Every client is a candidate for a new loan, the clients made during the run included,
/// and every open loan for a status change or a payment: traffic spread over the whole
/// book, as a lender's is. (A fixed sample of 20,000 clients piled ~7 loans each onto
/// them in 10 minutes at 1,000 tx/s, so each one's feature query grew through the run.)
struct Ids {
    user: AtomicI64,
    loan: AtomicI64,
    payment: AtomicI64,
    clients: Mutex<Vec<i64>>,
    loans: Mutex<Vec<(i64, String)>>,
}

/// Rows the generator draws from, at most: enough for any dump of this schema, bounded
/// memory for a large one.
const DRAWN_AT_MOST: i64 = 2_000_000;

#[derive(Default)]
struct Counts {
    txns: AtomicU64,
    errors: AtomicU64,
    behind: AtomicU64,
    apps: AtomicU64,
    app_errors: AtomicU64,
    /// Ticks skipped because every connection still had an application in flight: the
    /// generator's own limit, not a failed decision.
    app_skipped: AtomicU64,
    not_included: AtomicU64,
    approved: AtomicU64,
}

pub(crate) async fn run(p: &Pipeline, opts: LoadOptions) -> anyhow::Result<()> {
    let info = ConnInfo::parse(&p.config.source.url)?;
    let admin = connect(&info, 3).await?;
    let max = |sql: &'static str| {
        let admin = &admin;
        async move {
            let v: i64 = admin.query_one(sql, &[]).await?.get(0);
            Ok::<_, tokio_postgres::Error>(v)
        }
    };
    let ids = Arc::new(Ids {
        user: AtomicI64::new(max(r#"SELECT coalesce(max(id), 0)::bigint FROM "user""#).await? + 1),
        loan: AtomicI64::new(max("SELECT coalesce(max(id), 0)::bigint FROM loan").await? + 1),
        payment: AtomicI64::new(max("SELECT coalesce(max(id), 0)::bigint FROM payment").await? + 1),
        clients: Mutex::new(
            admin
                .query(
                    r#"SELECT id::bigint FROM "user" WHERE id IS NOT NULL LIMIT $1"#,
                    &[&DRAWN_AT_MOST],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        ),
        loans: Mutex::new(
            admin
                .query(
                    "SELECT id::bigint, status FROM loan \
                     WHERE id IS NOT NULL AND status IN ('application', 'active') LIMIT $1",
                    &[&DRAWN_AT_MOST],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
                .collect(),
        ),
    });
    if ids.clients.lock().unwrap().is_empty() {
        bail!(
            "{}: the source has no clients to generate traffic on (seed or restore it first)",
            info.target()
        );
    }
    let counts = Arc::new(Counts::default());
    let latencies = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let started = Instant::now();
    let deadline = started + opts.duration;

    let bar = ProgressBar::new(opts.duration.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
            .expect("valid template"),
    );

    // Background traffic: one task per connection, each at rate / connections.
    let mut tasks = tokio::task::JoinSet::new();
    if opts.rate > 0.0 {
        let per = opts.rate / opts.connections as f64;
        for c in 0..opts.connections {
            let client = connect(&info, 3).await?;
            let (ids, counts) = (ids.clone(), counts.clone());
            let seed = opts.seed.wrapping_add(c as u64);
            tasks.spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let every = Duration::from_secs_f64(1.0 / per);
                let mut next = Instant::now();
                while next < deadline {
                    let now = Instant::now();
                    if now < next {
                        tokio::time::sleep(next - now).await;
                    } else if now - next > every * 10 {
                        // Open loop: count what the database could not take in time.
                        counts.behind.fetch_add(1, Ordering::Relaxed);
                    }
                    next += every;
                    match crm_transaction(&client, &ids, &mut rng).await {
                        Ok(()) => counts.txns.fetch_add(1, Ordering::Relaxed),
                        Err(_) => counts.errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    }

    // Applications: submitted as the CRM would, decided through the API.
    if opts.applications > 0.0 {
        let base = opts
            .api
            .clone()
            .unwrap_or_else(|| format!("http://{}", p.config.serve.listen));
        let token = p.config.serve.token.clone();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .context("HTTP client")?;
        let every = Duration::from_secs_f64(1.0 / opts.applications);
        let conns = Arc::new(Semaphore::new(16));
        let pool: Arc<Mutex<Vec<tokio_postgres::Client>>> = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..16 {
            let client = connect(&info, 3).await?;
            pool.lock().unwrap().push(client);
        }
        let (ids, counts, latencies) = (ids.clone(), counts.clone(), latencies.clone());
        let seed = opts.seed;
        tasks.spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xA5A5);
            let mut next = Instant::now();
            let mut inflight = tokio::task::JoinSet::new();
            while next < deadline {
                let now = Instant::now();
                if now < next {
                    tokio::time::sleep(next - now).await;
                }
                next += every;
                let Ok(permit) = conns.clone().try_acquire_owned() else {
                    counts.app_skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let client_id = ids.user.fetch_add(1, Ordering::Relaxed);
                let loan_id = ids.loan.fetch_add(1, Ordering::Relaxed);
                let amount = rng.random_range(1..=60) as f64 * 100.0;
                let duration = [30i64, 60, 90, 180, 365][rng.random_range(0..5)];
                let (http, base, token, pool) = (http.clone(), base.clone(), token.clone(), pool.clone());
                let (counts, latencies) = (counts.clone(), latencies.clone());
                inflight.spawn(async move {
                    let _permit = permit;
                    let client = pool.lock().unwrap().pop().expect("a connection per permit");
                    let t0 = Instant::now();
                    let submitted_at = t0.duration_since(started).as_secs_f64();
                    let r = submit(&client, &http, &base, &token, client_id, loan_id, amount, duration).await;
                    let took = t0.elapsed().as_secs_f64() * 1000.0;
                    pool.lock().unwrap().push(client);
                    counts.apps.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(d) => {
                            latencies.lock().unwrap().push((submitted_at, took));
                            let included = d["features"]["application_amount"].as_f64() == Some(amount);
                            if !included {
                                counts.not_included.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(client_id, loan_id, decision = %d, "decision without the application");
                            }
                            if d["decision"] == "approve" {
                                counts.approved.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            counts.app_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(client_id, loan_id, error = %e, "application failed");
                        }
                    }
                });
            }
            while inflight.join_next().await.is_some() {}
        });
    }

    // Progress until every task is done.
    let ticker = {
        let (bar, counts, latencies) = (bar.clone(), counts.clone(), latencies.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let secs = started.elapsed().as_secs_f64();
                bar.set_position(secs as u64);
                let lat = latencies.lock().unwrap();
                let mut last: Vec<f64> = lat.iter().rev().take(500).map(|x| x.1).collect();
                drop(lat);
                last.sort_by(f64::total_cmp);
                bar.set_message(format!(
                    "{:.0} tx/s, {} applications, recent p99 {:.1} ms",
                    counts.txns.load(Ordering::Relaxed) as f64 / secs,
                    counts.apps.load(Ordering::Relaxed),
                    pct(&last, 0.99)
                ));
            }
        })
    };
    while let Some(r) = tasks.join_next().await {
        r.context("load task")?;
    }
    ticker.abort();
    bar.finish();

    let secs = started.elapsed().as_secs_f64();
    let c = &counts;
    println!(
        "background: {} transactions in {secs:.1} s = {:.0} tx/s (asked {}), {} errors, {} late ticks",
        c.txns.load(Ordering::Relaxed),
        c.txns.load(Ordering::Relaxed) as f64 / secs,
        opts.rate,
        c.errors.load(Ordering::Relaxed),
        c.behind.load(Ordering::Relaxed)
    );
    if opts.applications > 0.0 {
        let lat = latencies.lock().unwrap();
        let mut all: Vec<f64> = lat.iter().map(|x| x.1).collect();
        all.sort_by(f64::total_cmp);
        println!(
            "applications: {} submitted, {} decided ({} approved), {} failed, {} not submitted \
             (16 in flight); submit → decision p50 {:.1} ms, p90 {:.1}, p99 {:.1}, max {:.1}; \
             decisions without the application: {}",
            c.apps.load(Ordering::Relaxed),
            all.len(),
            c.approved.load(Ordering::Relaxed),
            c.app_errors.load(Ordering::Relaxed),
            c.app_skipped.load(Ordering::Relaxed),
            pct(&all, 0.5),
            pct(&all, 0.9),
            pct(&all, 0.99),
            all.last().copied().unwrap_or(0.0),
            c.not_included.load(Ordering::Relaxed)
        );
        // Per minute, so that growth over a long run shows.
        let minutes = (secs / 60.0).ceil() as usize;
        if minutes > 1 {
            for m in 0..minutes {
                let mut xs: Vec<f64> = lat
                    .iter()
                    .filter(|(at, _)| (*at / 60.0) as usize == m)
                    .map(|x| x.1)
                    .collect();
                xs.sort_by(f64::total_cmp);
                println!(
                    "  minute {}: {} decisions, p50 {:.1} ms, p99 {:.1}, max {:.1}",
                    m + 1,
                    xs.len(),
                    pct(&xs, 0.5),
                    pct(&xs, 0.99),
                    xs.last().copied().unwrap_or(0.0)
                );
            }
        }
        if c.not_included.load(Ordering::Relaxed) > 0 || c.app_errors.load(Ordering::Relaxed) > 0 {
            bail!("some applications failed or were decided without their own data");
        }
    }
    Ok(())
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// One application as the CRM submits it: the client and the loan in one transaction,
/// the WAL position after the commit, then the decision call waiting for it.
#[allow(clippy::too_many_arguments)]
async fn submit(
    client: &tokio_postgres::Client,
    http: &reqwest::Client,
    base: &str,
    token: &str,
    client_id: i64,
    loan_id: i64,
    amount: f64,
    duration: i64,
) -> anyhow::Result<Value> {
    client
        .batch_execute(&format!(
            "BEGIN; \
             INSERT INTO \"user\" (id, created_on, first_name) VALUES ({client_id}, CURRENT_DATE, 'Load'); \
             INSERT INTO loan (id, client_id, amount, created_on, duration, matured_on, status, updated_on) \
             VALUES ({loan_id}, {client_id}, {amount}, CURRENT_DATE, {duration}, CURRENT_DATE + {duration}, 'application', CURRENT_DATE); \
             COMMIT;"
        ))
        .await?;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let mut req = http.post(format!("{base}/v1/decisions")).json(
        &json!({"client_id": client_id, "loan_id": loan_id, "min_lsn": lsn, "timeout_ms": 5000}),
    );
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    let r = req.send().await?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}

/// One background CRM transaction on existing rows (or a new client).
async fn crm_transaction(
    client: &tokio_postgres::Client,
    ids: &Ids,
    rng: &mut ChaCha8Rng,
) -> Result<(), tokio_postgres::Error> {
    let pick = rng.random_range(0..100);
    let some_client = {
        let clients = ids.clients.lock().unwrap();
        clients[rng.random_range(0..clients.len())]
    };
    // New rows become candidates once committed: another connection may not name them sooner.
    let (mut new_client, mut new_loan) = (None, None);
    let sql = if pick < 10 {
        let id = ids.user.fetch_add(1, Ordering::Relaxed);
        new_client = Some(id);
        format!(
            "INSERT INTO \"user\" (id, created_on, first_name) VALUES ({id}, CURRENT_DATE, 'Load')"
        )
    } else if pick < 35 {
        let id = ids.loan.fetch_add(1, Ordering::Relaxed);
        let amount = rng.random_range(1..=60) * 100;
        new_loan = Some(id);
        format!(
            "INSERT INTO loan (id, client_id, amount, created_on, duration, matured_on, status, updated_on) \
             VALUES ({id}, {some_client}, {amount}, CURRENT_DATE, 90, CURRENT_DATE + 90, 'application', CURRENT_DATE)"
        )
    } else if pick < 60 {
        let mut loans = ids.loans.lock().unwrap();
        if loans.is_empty() {
            return Ok(());
        }
        let i = rng.random_range(0..loans.len());
        let (id, status) = loans[i].clone();
        let next = match status.as_str() {
            "application" => "active",
            _ if rng.random_bool(0.8) => "paid",
            _ => "overdue",
        };
        if next == "active" {
            loans[i].1 = next.into();
        } else {
            loans.swap_remove(i);
        }
        drop(loans);
        format!("UPDATE loan SET status = '{next}', updated_on = CURRENT_DATE WHERE id = {id}")
    } else {
        let loan = {
            let loans = ids.loans.lock().unwrap();
            if loans.is_empty() {
                return Ok(());
            }
            loans[rng.random_range(0..loans.len())].0
        };
        let id = ids.payment.fetch_add(1, Ordering::Relaxed);
        let late = if rng.random_bool(0.15) {
            "late"
        } else {
            "on_time"
        };
        let days = if rng.random_bool(0.16) { 30 } else { 0 };
        format!(
            "INSERT INTO payment (id, loan_id, amount, principle, interest, status, created_on) \
             VALUES ({id}, {loan}, 110, 100, 10, '{late}', CURRENT_DATE + {days})"
        )
    };
    client.batch_execute(&sql).await?;
    if let Some(id) = new_client {
        ids.clients.lock().unwrap().push(id);
    }
    if let Some(id) = new_loan {
        ids.loans.lock().unwrap().push((id, "application".into()));
    }
    Ok(())
}
