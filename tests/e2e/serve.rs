//! The online API of a running `pipeline run` process, over real HTTP on loopback:
//! read-your-writes, served values against the Delta table, and the documented errors.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token";
const FILE: &str = "client_features";

/// A `pipeline run` process serving on a port of its own; killed when dropped.
pub struct Served {
    child: Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Turns the API on in `p` (token `TOKEN`, a free port) and starts `pipeline run`,
/// waiting until `/health` says ready.
pub async fn serve(
    p: &mut TestPipeline,
    change: impl FnOnce(&mut pipeline::config::ServeConfig),
) -> Served {
    let port = free_port();
    p.update(|c| {
        c.serve.enabled = true;
        c.serve.listen = format!("127.0.0.1:{port}");
        c.serve.token = TOKEN.into();
        change(&mut c.serve);
    });
    let log = std::fs::File::create(p.dir.join("pipeline.log")).unwrap();
    let child = crate::pipeline_bin()
        .args(["run"])
        .arg(&p.file)
        .env("RUST_LOG", "warn,pipeline=info")
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    let served = Served {
        child,
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap(),
    };
    let started = Instant::now();
    let mut served = served;
    loop {
        if let Ok(Some(exit)) = served.child.try_wait() {
            panic!(
                "pipeline run exited ({exit}) before it was ready: {}",
                std::fs::read_to_string(p.dir.join("pipeline.log")).unwrap_or_default()
            );
        }
        if let Ok(r) = served
            .http
            .get(format!("{}/health", served.base))
            .send()
            .await
        {
            if r.status() == 200 {
                return served;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not ready after 60 s: {}",
            std::fs::read_to_string(p.dir.join("pipeline.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Served {
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

async fn current_lsn(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// A new client with `paid` paid loans, committed in one transaction as the CRM would.
async fn new_client(client: &tokio_postgres::Client, id: i32, paid: i32) {
    let mut sql =
        format!("BEGIN; INSERT INTO \"user\" (id, created_on) VALUES ({id}, DATE '2020-08-20');");
    for l in 0..paid {
        sql += &format!(
            "INSERT INTO loan (id, client_id, amount, created_on, status) \
             VALUES ({}, {id}, 100, DATE '2020-08-01', 'paid');",
            id * 10 + l
        );
    }
    sql += "COMMIT;";
    client.batch_execute(&sql).await.unwrap();
}

/// (a) 1,000 rounds of CRM commit → `pg_current_wal_lsn()` → read with `min_lsn`: never
/// stale, including rounds where an unpublished table is written after the commit (the
/// wait then needs the engine's fence); every (key, lsn) served is the Delta table's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_is_never_stale_and_what_is_served_is_in_delta() {
    let (info, client) = seeded_db("pt_serve_ryw", 100).await;
    client
        .batch_execute("CREATE TABLE unpublished (id serial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let mut p = pipeline_file(&info, "serve_ryw", Some(AS_OF));
    let api = serve(&mut p, |_| {}).await;

    let rounds = 1_000;
    let mut stale = Vec::new();
    let mut served: Vec<(i64, String, Value)> = Vec::new();
    let mut took = Vec::with_capacity(rounds);
    for r in 0..rounds as i32 {
        let id = 1_000_000 + r;
        let paid = r % 3;
        new_client(&client, id, paid).await;
        if r % 2 == 1 {
            client
                .execute(
                    "INSERT INTO unpublished (note) VALUES ('after the CRM commit')",
                    &[],
                )
                .await
                .unwrap();
        }
        let lsn = current_lsn(&client).await;
        let t0 = Instant::now();
        let (status, body) = api
            .get(&format!(
                "/v1/features/{FILE}/{id}?min_lsn={lsn}&timeout_ms=5000"
            ))
            .await;
        took.push(t0.elapsed());
        if status != 200 || body["features"]["paid_loans_count"] != json!(paid) {
            stale.push(format!("round {r}: {status} {body}"));
            continue;
        }
        assert!(
            body["watermark"].as_str().unwrap().parse::<Lsn>().unwrap() >= lsn.parse().unwrap(),
            "{body}"
        );
        if r % 10 == 0 {
            let lsn = body["lsn"].as_str().unwrap().to_string();
            served.push((id.into(), lsn, body["features"].clone()));
        }
    }
    took.sort();
    eprintln!(
        "read-your-writes over HTTP: p50 {:?}, p99 {:?}, max {:?}",
        took[rounds / 2],
        took[rounds * 99 / 100],
        took[rounds - 1]
    );
    assert!(
        stale.is_empty(),
        "{} stale reads: {:#?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );

    // What was served is what the Delta table holds at the served LSN, once committed.
    let started = Instant::now();
    let missing = loop {
        let rows = delta_rows_at(&p.lake, &served).await;
        let missing: Vec<String> = served
            .iter()
            .filter(|(k, lsn, f)| rows.get(&(*k, lsn.clone())) != Some(f))
            .map(|(k, lsn, f)| {
                format!(
                    "{k}@{lsn}: served {f}, delta {:?}",
                    rows.get(&(*k, lsn.clone()))
                )
            })
            .collect();
        if missing.is_empty() || started.elapsed() > Duration::from_secs(20) {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(missing.is_empty(), "{missing:#?}");
}

/// The Delta feature rows of the served keys, by (key, `_lsn` as `X/Y`).
async fn delta_rows_at(
    lake: &Lake,
    served: &[(i64, String, Value)],
) -> BTreeMap<(i64, String), Value> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int32Type, Int64Type};
    let keys: Vec<String> = served.iter().map(|(k, _, _)| k.to_string()).collect();
    let batches = read_delta(
        lake,
        &LakeTable::features(FILE),
        &format!(
            "SELECT client_id, _lsn, paid_loans_count, days_since_last_late_payment, \
             profit_in_last_90_days_rate, paid_loans_count_pit, profit_in_last_90_days_rate_pit \
             FROM t WHERE client_id IN ({}) AND NOT _deleted",
            keys.join(",")
        ),
    )
    .await;
    let mut out = BTreeMap::new();
    for b in batches {
        let key = b.column(0).as_primitive::<Int64Type>();
        let lsn = b.column(1).as_primitive::<Int64Type>();
        let paid = b.column(2).as_primitive::<Int64Type>();
        let days = b.column(3).as_primitive::<Int32Type>();
        let rate = b.column(4).as_primitive::<Float64Type>();
        let paid_pit = b.column(5).as_primitive::<Int64Type>();
        let rate_pit = b.column(6).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let opt = |a: &dyn Array, v: Value| if a.is_null(i) { Value::Null } else { v };
            let features = json!({
                "paid_loans_count": opt(paid, paid.value(i).into()),
                "days_since_last_late_payment": opt(days, days.value(i).into()),
                "profit_in_last_90_days_rate": opt(rate, rate.value(i).into()),
                "paid_loans_count_pit": opt(paid_pit, paid_pit.value(i).into()),
                "profit_in_last_90_days_rate_pit": opt(rate_pit, rate_pit.value(i).into()),
            });
            out.insert(
                (key.value(i), Lsn::from_i64(lsn.value(i)).to_string()),
                features,
            );
        }
    }
    out
}

/// (b) The documented answers: auth, bad keys and LSNs, unknown files and entities,
/// oversized requests, wait timeouts, batch reads reporting missing keys, metrics; and a
/// non-loopback address without a token refused at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_limits_and_metrics_are_as_documented() {
    let (info, client) = seeded_db("pt_serve_api", 50).await;
    let mut p = pipeline_file(&info, "serve_api", Some(AS_OF));
    let api = serve(&mut p, |s| {
        s.max_keys = 5;
        s.max_body_bytes = 2_048;
        s.default_wait_ms = 100;
        s.max_wait_ms = 200;
    })
    .await;
    let some: i64 = client
        .query_one("SELECT min(id)::bigint FROM \"user\"", &[])
        .await
        .unwrap()
        .get(0);

    // Auth: none, wrong, right; /health needs none.
    let url = format!("{}/v1/features/{FILE}/{some}", api.base);
    let bare = reqwest::Client::new();
    let r = bare.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = bare.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        bare.get(format!("{}/health", api.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, body) = api.get(&format!("/v1/features/{FILE}/{some}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"], json!(some));
    assert!(body["features"]
        .as_object()
        .unwrap()
        .contains_key("paid_loans_count"));
    assert!(body["lsn"].as_str().unwrap().contains('/'));
    assert_eq!(body["feature_time"], "2020-08-23");

    // Errors name what is wrong.
    let (status, body) = api.get(&format!("/v1/features/{FILE}/abc")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_key")),
        "{body}"
    );
    let (status, body) = api.get("/v1/features/nope/1").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_file")),
        "{body}"
    );
    let (status, body) = api.get(&format!("/v1/features/{FILE}/999999999")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_entity")),
        "{body}"
    );
    let (status, body) = api
        .get(&format!("/v1/features/{FILE}/{some}?min_lsn=zz"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_min_lsn")),
        "{body}"
    );
    let (status, _) = api.get("/v2/nothing").await;
    assert_eq!(status, 404);

    // A wait that cannot be met: 504 with the watermark, within the capped timeout.
    let t0 = Instant::now();
    let (status, body) = api
        .get(&format!(
            "/v1/features/{FILE}/{some}?min_lsn=FFFFFF/0&timeout_ms=60000"
        ))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("wait_timeout")),
        "{body}"
    );
    assert!(body["watermark"].as_str().unwrap().contains('/'));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "capped at max_wait_ms"
    );

    // Batch reads: one row per key, missing ones reported; limits.
    let lsn = current_lsn(&client).await;
    let (status, body) = api
        .post(
            &format!("/v1/features/{FILE}"),
            &json!({"keys": [some, 999999999, some.to_string()], "min_lsn": lsn}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["found"], true);
    assert_eq!(rows[1], json!({"key": 999999999, "found": false}));
    assert_eq!(rows[2]["key"], json!(some));
    assert_eq!(body["missing"], json!([999999999]));
    let (status, body) = api
        .post(
            &format!("/v1/features/{FILE}"),
            &json!({"keys": [1, 2, 3, 4, 5, 6]}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("too_many_keys")),
        "{body}"
    );
    let (status, body) = api
        .post(
            &format!("/v1/features/{FILE}"),
            &json!({"keys": [1], "pad": "x".repeat(4_000)}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
    let (status, body) = api
        .post(&format!("/v1/features/{FILE}"), &json!({"keys": [1, "x"]}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_key")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keys[1]"),
        "{body}"
    );
    let (status, body) = api
        .post(&format!("/v1/features/{FILE}"), &json!({"kes": [1]}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_body")),
        "{body}"
    );

    // Metrics: Prometheus text with the pipeline's and the API's series.
    let text = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "pipeline_http_request_seconds_bucket",
        "pipeline_online_wait_timeouts_total",
        "pipeline_online_entities",
        "pipeline_watermark_lsn",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    drop(api);

    // Listening beyond loopback without a token is refused before anything starts.
    p.update(|c| {
        c.serve.listen = "0.0.0.0:0".into();
        c.serve.token = String::new();
    });
    let out = crate::pipeline_bin()
        .arg("validate")
        .arg(&p.file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("serve.token"),
        "{err}"
    );
}
