//! Deterministic synthetic CRM data with the dump's schema and shape: users, loans
//! (application | active | paid | overdue), at most one payment per loan (on_time | late),
//! about 16% of payments scheduled after the last activity date, and a little dirt
//! (NULL interest, zero amounts, non-ASCII names) so the features' edge cases are real.

use super::{prepare_database, DbError};
use bytes::Bytes;
use chrono::{Duration, NaiveDate};
use futures::SinkExt;
use pipeline::source::{connect, ConnInfo};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write;

/// The CRM schema (the dump's tables, without data); tests create it the same way.
pub(crate) const SCHEMA_SQL: &str = include_str!("schema.sql");

#[derive(Debug, Clone)]
pub(crate) struct SeedOptions {
    pub users: usize,
    pub seed: u64,
    pub clean: bool,
}

const FIRST: &[&str] = &[
    "Mari",
    "Jaan",
    "Jüri",
    "Anna",
    "Õie",
    "Peeter",
    "Liis",
    "Märt",
    "Kätlin",
    "Sergei",
    "Ольга",
    "Zoë",
];
const LAST: &[&str] = &[
    "Tamm",
    "Saar",
    "Mägi",
    "Kask",
    "Ots",
    "Põder",
    "Lepik",
    "Šmidt",
    "Иванов",
    "O'Neil",
];
const DURATIONS: &[i64] = &[7, 14, 30, 60, 90, 180, 365, 730, 1095, 2500];

pub(crate) fn last_activity() -> NaiveDate {
    NaiveDate::from_ymd_opt(2020, 8, 23).unwrap()
}

/// Generates and loads the data; returns (users, loans, payments).
pub(crate) async fn seed(
    info: &ConnInfo,
    opts: &SeedOptions,
) -> Result<(usize, usize, usize), DbError> {
    prepare_database(info, opts.clean).await?;
    let client = connect(info, 8).await?;
    client.batch_execute(SCHEMA_SQL).await?;
    let existing: i64 = client
        .query_one(r#"SELECT count(*) FROM "user""#, &[])
        .await?
        .get(0);
    if existing > 0 {
        return Err(DbError::Tool {
            tool: "seed".into(),
            message: format!(
                "database {} already has users; use --clean to recreate it",
                info.database
            ),
        });
    }
    let (users, loans, payments, counts) = generate(opts.users, opts.seed);
    for (table, data) in [("\"user\"", users), ("loan", loans), ("payment", payments)] {
        let sink = client
            .copy_in(&format!("COPY public.{table} FROM STDIN"))
            .await?;
        futures::pin_mut!(sink);
        sink.send(Bytes::from(data)).await?;
        sink.finish().await?;
    }
    client.batch_execute("ANALYZE").await?;
    tracing::info!(
        users = counts.0,
        loans = counts.1,
        payments = counts.2,
        "seeded"
    );
    Ok(counts)
}

type Generated = (String, String, String, (usize, usize, usize));

/// The COPY text of the three tables. Same `(users, seed)` → same bytes.
pub(crate) fn generate(n_users: usize, seed: u64) -> Generated {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = NaiveDate::from_ymd_opt(2017, 1, 1).unwrap();
    let end = last_activity();
    let span = (end - start).num_days();
    let (mut users, mut loans, mut payments) = (String::new(), String::new(), String::new());
    let (mut loan_id, mut payment_id) = (0usize, 0usize);
    for uid in 1..=n_users {
        let created = start + Duration::days(rng.random_range(0..span));
        let birth = NaiveDate::from_ymd_opt(1950, 1, 1).unwrap()
            + Duration::days(rng.random_range(0..18_000));
        let first = FIRST[rng.random_range(0..FIRST.len())];
        let last = LAST[rng.random_range(0..LAST.len())];
        let _ = writeln!(
            users,
            "{uid}\t{created}\t{first}\t{last}\t{birth}\t{}",
            30_000_000_000u64 + uid as u64
        );
        // Loans per user: 0..=4, mean ≈ 1.5 like the real data.
        let n_loans = [0, 0, 1, 1, 1, 2, 2, 2, 3, 4][rng.random_range(0..10)];
        for _ in 0..n_loans {
            loan_id += 1;
            let l_created =
                created + Duration::days(rng.random_range(0..=(end - created).num_days()));
            let duration = DURATIONS[rng.random_range(0..DURATIONS.len())];
            let amount = if rng.random_ratio(1, 200) {
                0
            } else {
                rng.random_range(10..=200) * 10
            };
            let status = match rng.random_range(0..100) {
                0..=34 => "application",
                35..=49 => "active",
                50..=84 => "paid",
                _ => "overdue",
            };
            let matured = if status == "application" {
                "\\N".to_string()
            } else {
                (l_created + Duration::days(duration)).to_string()
            };
            let updated = l_created
                + Duration::days(rng.random_range(0..=(end - l_created).num_days().min(60)));
            let _ = writeln!(loans, "{loan_id}\t{uid}\t{amount}\t{l_created}\t{duration}\t{matured}\t{status}\t{updated}");
            if status == "application" || !rng.random_ratio(4, 5) {
                continue;
            }
            payment_id += 1;
            // ~16% of payments are scheduled in the future (after the last activity).
            let p_created = if rng.random_ratio(16, 100) {
                end + Duration::days(rng.random_range(1..2500))
            } else {
                l_created + Duration::days(rng.random_range(0..=(end - l_created).num_days()))
            };
            let principle = amount as f64;
            let interest = if rng.random_ratio(1, 200) {
                "\\N".to_string()
            } else {
                format!("{:.2}", principle * rng.random_range(0.01..0.4))
            };
            let p_status = if rng.random_ratio(1, 4) {
                "late"
            } else {
                "on_time"
            };
            let total = principle + interest.parse::<f64>().unwrap_or(0.0);
            let _ = writeln!(payments, "{payment_id}\t{loan_id}\t{total:.2}\t{principle}\t{interest}\t{p_status}\t{p_created}");
        }
    }
    (users, loans, payments, (n_users, loan_id, payment_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_has_the_right_shape() {
        let a = generate(2000, 7);
        let b = generate(2000, 7);
        assert_eq!(a.0, b.0);
        assert_eq!(a.2, b.2);
        let (users, loans, payments) = a.3;
        assert_eq!(users, 2000);
        assert!(loans > 2000 && loans < 4000, "{loans}");
        assert!(payments > 500 && payments < loans, "{payments}");
        let future =
            a.2.lines()
                .filter(|l| l.rsplit('\t').next().unwrap() > "2020-08-23")
                .count();
        let share = future as f64 / payments as f64;
        assert!((0.10..0.22).contains(&share), "{share}");
    }
}
