//! The decision flow over real HTTP: an application committed as the CRM would, decided
//! on features that include it (model score + rules), audited to Delta; and the
//! validation errors of rules and model files.

use crate::serve::{serve, Served};
use crate::support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn apply(pg: &tokio_postgres::Client, client: i64, loan: i64, amount: f64) -> String {
    pg.batch_execute(&format!(
        "BEGIN; INSERT INTO \"user\" (id, created_on) VALUES ({client}, DATE '2020-08-23'); \
         INSERT INTO loan (id, client_id, amount, created_on, duration, status) \
         VALUES ({loan}, {client}, {amount}, DATE '2020-08-23', 90, 'application'); COMMIT;"
    ))
    .await
    .unwrap();
    pg.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

async fn decide(api: &Served, body: Value) -> (u16, Value) {
    api.post("/v1/decisions", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_is_decided_on_features_that_include_it_and_audited() {
    let (info, pg) = seeded_db("pt_decide", 50).await;
    let mut p = pipeline_file(&info, "decide", Some(AS_OF));
    p.update(|c| c.decisions = Some(repo().join("decisions/loan_rules.yaml")));
    let api = serve(&mut p, |_| {}).await;

    // A large first loan: rejected by the rule, whatever the score.
    let lsn = apply(&pg, 7_000_001, 7_000_001, 7000.0).await;
    let (status, d) = decide(
        &api,
        json!({"client_id": 7_000_001, "loan_id": 7_000_001, "min_lsn": lsn}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["decision"], "reject", "{d}");
    assert!(
        d["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("LARGE_FIRST_LOAN")),
        "{d}"
    );
    assert_eq!(d["features"]["application_amount"], json!(7000.0), "{d}");
    assert_eq!(d["features"]["paid_loans_count"], json!(0), "{d}");
    let score = d["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "{d}");
    assert!(
        d["model"].as_str().unwrap().starts_with("loan_default@"),
        "{d}"
    );
    for t in ["wait", "features", "score", "rules", "total"] {
        assert!(d["timings_ms"][t].as_f64().is_some(), "{t}: {d}");
    }
    assert!(
        d["watermark"].as_str().unwrap().parse::<Lsn>().unwrap() >= lsn.parse().unwrap(),
        "{d}"
    );
    let rejected_lsn = d["lsn"].as_str().unwrap().to_string();

    // A small one: the large-first-loan rule does not hold.
    let lsn = apply(&pg, 7_000_002, 7_000_002, 500.0).await;
    let (status, d) = decide(
        &api,
        json!({"client_id": 7_000_002, "loan_id": 7_000_002, "min_lsn": lsn}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert!(
        !d["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("LARGE_FIRST_LOAN")),
        "{d}"
    );
    let small = d["score"].as_f64().unwrap();
    let want = if small >= 0.5 { "reject" } else { "approve" };
    assert_eq!(
        d["decision"], want,
        "no other rule holds for a new client: {d}"
    );

    // Errors name what is wrong.
    let (status, d) = decide(&api, json!({"client_id": 7_000_002, "loan_id": 7_000_001})).await;
    assert_eq!(
        (status, d["error"]["code"].as_str()),
        (409, Some("application_mismatch")),
        "{d}"
    );
    let (status, d) = decide(&api, json!({"client_id": 7_000_002, "loan_id": 99_999_999})).await;
    assert_eq!(
        (status, d["error"]["code"].as_str()),
        (404, Some("unknown_application")),
        "{d}"
    );
    let (status, d) = decide(&api, json!({"client_id": 7_000_002})).await;
    assert_eq!(status, 400, "{d}");
    assert!(
        d["error"]["message"].as_str().unwrap().contains("loan_id"),
        "{d}"
    );
    let (status, d) = decide(&api, json!({"client_id": 1, "loan_id": 1, "amount": 3})).await;
    assert_eq!(status, 400, "{d}");
    assert!(
        d["error"]["message"].as_str().unwrap().contains("amount"),
        "{d}"
    );

    // The audit trail: both decisions, with the features served and their LSN.
    let started = Instant::now();
    let table = LakeTable::decisions("loan_decisions");
    let rows = loop {
        let b = try_read_delta(
            &p.lake,
            &table,
            "SELECT decision, features, features_lsn, model, array_to_string(reasons, ',') FROM t ORDER BY decided_at",
        )
        .await
        .unwrap_or_default();
        let rows: Vec<(String, String, String, String, String)> = b
            .iter()
            .flat_map(|b| {
                use arrow::array::AsArray;
                let col = |i: usize| {
                    let c = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8)
                        .unwrap();
                    (0..b.num_rows())
                        .map(move |r| c.as_string::<i32>().value(r).to_string())
                        .collect::<Vec<_>>()
                };
                let (a, f, l, m, r) = (col(0), col(1), col(2), col(3), col(4));
                (0..b.num_rows())
                    .map(move |i| {
                        (
                            a[i].clone(),
                            f[i].clone(),
                            l[i].clone(),
                            m[i].clone(),
                            r[i].clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        if rows.len() >= 2 || started.elapsed() > Duration::from_secs(15) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (decision, features, features_lsn, model, reasons) = &rows[0];
    assert_eq!(decision, "reject");
    assert!(reasons.contains("LARGE_FIRST_LOAN"), "{reasons}");
    assert_eq!(features_lsn, &rejected_lsn);
    assert!(model.starts_with("loan_default@"));
    let f: Value = serde_json::from_str(features).unwrap();
    assert_eq!(f["application_amount"], json!(7000.0));

    // Online/offline consistency: once the served rows are in Delta and the pipeline is
    // stopped, `backfill --verify` (nothing to rebuild: it checks every table) compares
    // each served value with the feature table at the served LSN.
    let lsns: Vec<i64> = rows
        .iter()
        .map(|r| r.2.parse::<Lsn>().unwrap().as_i64())
        .collect();
    let in_delta = format!(
        "SELECT count(DISTINCT _lsn) FROM t WHERE _lsn IN ({})",
        lsns.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let features_table = LakeTable::features("client_features");
    let started = Instant::now();
    loop {
        let b = read_delta(&p.lake, &features_table, &in_delta).await;
        use arrow::array::AsArray;
        let n = b[0]
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0) as usize;
        let distinct: std::collections::HashSet<_> = lsns.iter().collect();
        if n == distinct.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "served rows never reached Delta"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(api);
    let mut out = None;
    for _ in 0..100 {
        let o = crate::pipeline_bin()
            .args(["backfill", "--verify"])
            .arg(&p.file)
            .output()
            .unwrap();
        // The killed pipeline's slot is released a moment after.
        if String::from_utf8_lossy(&o.stderr).contains("is in use") {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        out = Some(o);
        break;
    }
    let out = out.expect("the slot was never released");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("served client_features (decisions/loan_decisions): 2 decisions")
            && stdout.contains("feature values compared, 0 mismatched")
            && stdout.contains(" 0 without a feature row"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_model_errors_name_what_is_wrong() {
    let (info, _pg) = seeded_db("pt_decide_validate", 5).await;
    let mut p = pipeline_file(&info, "decide_validate", Some(AS_OF));
    let rules = std::fs::read_to_string(repo().join("decisions/loan_rules.yaml"))
        .unwrap()
        .replace(
            "../models/loan_default.onnx",
            &repo()
                .join("models/loan_default.onnx")
                .display()
                .to_string(),
        );
    let validate = |p: &TestPipeline| {
        let out = crate::pipeline_bin()
            .arg("validate")
            .arg(&p.file)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let file = p.dir.join("rules.yaml");
    p.update(|c| c.decisions = Some(file.clone()));

    std::fs::write(&file, &rules).unwrap();
    let (ok, out) = validate(&p);
    assert!(ok && out.contains("3 rules, model loan_default@"), "{out}");

    // An expression over a column nobody serves: file, rule, line.
    std::fs::write(
        &file,
        rules.replace(
            "days_since_last_late_payment < 30",
            "days_since_last_late < 30",
        ),
    )
    .unwrap();
    let (ok, out) = validate(&p);
    assert!(!ok, "{out}");
    assert!(
        out.contains("rules.yaml")
            && out.contains("rule `recent_late_payment`")
            && out.contains("line "),
        "{out}"
    );
    // Not a boolean.
    std::fs::write(&file, rules.replace("score >= 0.5", "score + 1")).unwrap();
    let (ok, out) = validate(&p);
    assert!(
        !ok && out.contains("rule `high_risk_score`") && out.contains("not a boolean"),
        "{out}"
    );
    // The model takes an input the file no longer provides: both named.
    std::fs::write(
        &file,
        rules.replace("columns: [amount, duration]", "columns: [amount]"),
    )
    .unwrap();
    let (ok, out) = validate(&p);
    assert!(!ok, "{out}");
    assert!(
        out.contains("loan_default.onnx")
            && out.contains("application_duration")
            && out.contains("application_amount"),
        "{out}"
    );
    // A file that is not a model.
    std::fs::write(p.dir.join("bad.onnx"), b"not a model").unwrap();
    std::fs::write(
        &file,
        rules.replace(
            &repo()
                .join("models/loan_default.onnx")
                .display()
                .to_string(),
            &p.dir.join("bad.onnx").display().to_string(),
        ),
    )
    .unwrap();
    let (ok, out) = validate(&p);
    assert!(!ok && out.contains("bad.onnx"), "{out}");
}
