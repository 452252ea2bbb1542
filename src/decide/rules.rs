//! Decision rules, compiled once into DataFusion physical expressions over one row of
//! inputs (features, `application_<column>`s, `score`) and evaluated per request in
//! microseconds.

use super::DecideError;
use crate::config::DecisionsFile;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use std::sync::Arc;

struct Rule {
    name: String,
    reason: String,
    expr: Arc<dyn PhysicalExpr>,
}

pub(crate) struct Rules {
    rules: Vec<Rule>,
}

/// A rule that held for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fired {
    pub rule: String,
    pub reason: String,
}

impl Rules {
    /// Compiles every rule of `file` against the input row's `schema`; errors name the
    /// file, the rule and its line, and what the expression may use.
    pub(crate) fn compile(file: &DecisionsFile, schema: &SchemaRef) -> Result<Rules, DecideError> {
        let ctx = SessionContext::new();
        let df_schema =
            DFSchema::try_from(schema.as_ref().clone()).map_err(|e| DecideError::Rule {
                location: file.file.display().to_string(),
                message: e.to_string(),
            })?;
        let usable = || {
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // Some functions (coalesce, nvl…) only exist as rewrites the simplifier applies,
        // so rules are coerced and simplified as a query's filters would be.
        let simplifier = ExprSimplifier::new(
            SimplifyContext::builder()
                .with_schema(Arc::new(df_schema.clone()))
                .build(),
        );
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, def) in file.rules.iter().enumerate() {
            let err = |message: String| DecideError::Rule {
                location: file.locate(i),
                message,
            };
            let expr = ctx
                .parse_sql_expr(&def.when, &df_schema)
                .map_err(|e| err(format!("`{}`: {e} (usable: {})", def.when, usable())))?;
            let expr = simplifier
                .coerce(expr, &df_schema)
                .and_then(|e| simplifier.simplify(e))
                .and_then(|e| ctx.create_physical_expr(e, &df_schema))
                .map_err(|e| err(format!("`{}`: {e} (usable: {})", def.when, usable())))?;
            let ty = expr
                .data_type(schema)
                .map_err(|e| err(format!("`{}`: {e}", def.when)))?;
            if ty != DataType::Boolean {
                return Err(err(format!("`{}` is {ty}, not a boolean", def.when)));
            }
            rules.push(Rule {
                name: def.name.clone(),
                reason: def.reason.clone(),
                expr,
            });
        }
        Ok(Rules { rules })
    }

    /// The rules that hold for the one-row `inputs` (NULL does not hold), in order.
    pub(crate) fn evaluate(&self, inputs: &RecordBatch) -> Result<Vec<Fired>, DecideError> {
        let mut fired = Vec::new();
        for r in &self.rules {
            let value = r
                .expr
                .evaluate(inputs)
                .and_then(|v| v.into_array(inputs.num_rows()))
                .map_err(|e| DecideError::Evaluate {
                    rule: r.name.clone(),
                    message: e.to_string(),
                })?;
            let b = value.as_boolean();
            if b.is_valid(0) && b.value(0) {
                fired.push(Fired {
                    rule: r.name.clone(),
                    reason: r.reason.clone(),
                });
            }
        }
        Ok(fired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleDef;
    use arrow::array::{Float32Array, Float64Array, Int64Array};
    use arrow::datatypes::{Field, Schema};

    fn file(rules: &[(&str, &str)]) -> DecisionsFile {
        DecisionsFile {
            file: "rules.yaml".into(),
            name: "d".into(),
            description: None,
            features: "f".into(),
            application: None,
            model: "m.onnx".into(),
            rules: rules
                .iter()
                .map(|(name, when)| RuleDef {
                    name: name.to_string(),
                    when: when.to_string(),
                    reason: name.to_uppercase(),
                })
                .collect(),
            rule_lines: vec![Some(7); rules.len()],
        }
    }

    fn row(paid: Option<i64>, amount: f64, score: f32) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("paid_loans_count", DataType::Int64, true),
            Field::new("application_amount", DataType::Float64, true),
            Field::new("score", DataType::Float32, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![paid])),
                Arc::new(Float64Array::from(vec![amount])),
                Arc::new(Float32Array::from(vec![score])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn rules_hold_in_order_with_functions_that_need_simplifying_and_null_not_holding() {
        let rules = Rules::compile(
            &file(&[
                ("risky", "score >= 0.5"),
                (
                    "first",
                    "coalesce(paid_loans_count, 0) = 0 AND application_amount > 5000",
                ),
                ("few", "paid_loans_count < 2"),
            ]),
            &row(None, 0.0, 0.0).schema(),
        )
        .unwrap();
        let names = |b: &RecordBatch| {
            let fired = rules.evaluate(b).unwrap();
            fired.into_iter().map(|f| f.rule).collect::<Vec<_>>()
        };
        assert_eq!(names(&row(None, 7000.0, 0.7)), ["risky", "first"]);
        assert_eq!(names(&row(Some(1), 7000.0, 0.1)), ["few"]);
        assert!(names(&row(Some(3), 100.0, 0.2)).is_empty());
    }

    #[test]
    fn a_bad_rule_names_the_file_line_and_what_is_usable() {
        let schema = row(None, 0.0, 0.0).schema();
        let Err(DecideError::Rule { location, message }) =
            Rules::compile(&file(&[("typo", "paid_loan_count > 1")]), &schema)
        else {
            panic!("compiled a rule over an unknown column");
        };
        assert_eq!(location, "rules.yaml: rule `typo` (rules[0], line 7)");
        assert!(message.contains("usable: paid_loans_count"), "{message}");
        let Err(DecideError::Rule { message, .. }) =
            Rules::compile(&file(&[("num", "score + 1")]), &schema)
        else {
            panic!("compiled a rule that is not a boolean");
        };
        assert!(message.contains("not a boolean"), "{message}");
    }
}
