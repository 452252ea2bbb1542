//! Rust UDFs available to every feature SQL, registered by name at start-up. A new one
//! is a file here plus one line in [`all`].

mod as_of_date;
mod days_between;
mod safe_divide;

pub(crate) use as_of_date::{AsOfClock, AsOfDate};
pub(crate) use days_between::DaysBetween;
pub(crate) use safe_divide::SafeDivide;

use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionContext;

/// Every UDF, the one list; `clock` backs `as_of_date()`.
pub(crate) fn all(clock: AsOfClock) -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::from(AsOfDate::new(clock)),
        ScalarUDF::from(DaysBetween::new()),
        ScalarUDF::from(SafeDivide::new()),
    ]
}

/// Registers every UDF of [`all`] on `ctx`.
pub(crate) fn register_all(ctx: &SessionContext, clock: AsOfClock) {
    for udf in all(clock) {
        ctx.register_udf(udf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Date32Type, Float64Type, Int32Type};

    #[tokio::test]
    async fn udfs_compute_their_definitions_through_sql() {
        let ctx = SessionContext::new();
        let clock = AsOfClock::default();
        register_all(&ctx, clock.clone());
        clock.set_days(18497); // 2020-08-23
        let sql = "SELECT days_between(as_of_date(), DATE '2020-08-20'),
                          days_between(DATE '2020-08-20', NULL),
                          safe_divide(3, 2), safe_divide(1, 0), safe_divide(NULL, 2),
                          safe_divide(CAST(7 AS BIGINT), 2.0),
                          as_of_date()";
        let b = &ctx.sql(sql).await.unwrap().collect().await.unwrap()[0];
        assert_eq!(b.column(0).as_primitive::<Int32Type>().value(0), 3);
        assert!(b.column(1).is_null(0));
        assert_eq!(b.column(2).as_primitive::<Float64Type>().value(0), 1.5);
        assert!(b.column(3).is_null(0) && b.column(4).is_null(0));
        assert_eq!(b.column(5).as_primitive::<Float64Type>().value(0), 3.5);
        assert_eq!(b.column(6).as_primitive::<Date32Type>().value(0), 18497);

        // A cached plan sees the clock move: as_of_date() is not folded at planning.
        let df = ctx.sql("SELECT as_of_date()").await.unwrap();
        let plan = df.logical_plan().clone();
        clock.set_days(100);
        let b = &ctx
            .execute_logical_plan(plan)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()[0];
        assert_eq!(b.column(0).as_primitive::<Date32Type>().value(0), 100);
    }
}
