//! Plans a feature file once at start-up: each feature's SQL alone (so an error names
//! the feature), then all of them joined onto the entity table. The combined plan is
//! made physical once (see `FeatureEngine::new`) and run again for every batch.

use super::{output_schema, FeatureError};
use crate::config::{quote_ident, FeatureFile, FeatureType};
use crate::source::TableSchema;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use std::sync::Arc;

fn sql_type(t: FeatureType) -> &'static str {
    match t {
        FeatureType::Bigint => "BIGINT",
        FeatureType::Int => "INT",
        FeatureType::Double => "DOUBLE",
        FeatureType::Text => "VARCHAR",
        FeatureType::Boolean => "BOOLEAN",
        FeatureType::Date => "DATE",
    }
}

fn sql_literal(v: &serde_yaml::Value) -> Option<String> {
    Some(match v {
        serde_yaml::Value::Null => "NULL".into(),
        serde_yaml::Value::Bool(b) => b.to_string().to_uppercase(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::String(s) => format!("'{}'", s.replace('\'', "''")),
        _ => return None,
    })
}

pub(crate) async fn plan_file(
    ctx: &SessionContext,
    def: &FeatureFile,
    entity: &TableSchema,
) -> Result<(Arc<dyn ExecutionPlan>, SchemaRef), FeatureError> {
    let key = &def.entity.key;
    let table_key_col =
        entity
            .column_index(&def.entity.table_key)
            .ok_or_else(|| FeatureError::Invalid {
                location: format!("{}: entity.table_key", def.file.display()),
                message: format!(
                    "table {} has no column `{}`",
                    entity.name, def.entity.table_key
                ),
            })?;
    let key_type = match entity.columns[table_key_col].data_type {
        DataType::Utf8 => DataType::Utf8,
        _ => DataType::Int64,
    };
    let key_sql_type = if key_type == DataType::Utf8 {
        "VARCHAR"
    } else {
        "BIGINT"
    };

    let mut selects = vec![format!(
        "CAST(e.{} AS {key_sql_type}) AS {}",
        quote_ident(&def.entity.table_key),
        quote_ident(key)
    )];
    let mut joins = Vec::new();
    for (i, f) in def.features.iter().enumerate() {
        let location = def.locate(i);
        let df = ctx.sql(&f.sql).await.map_err(|source| FeatureError::Plan {
            location: location.clone(),
            source,
        })?;
        let schema = df.schema();
        for needed in [key.as_str(), f.name.as_str()] {
            if !schema.fields().iter().any(|c| c.name() == needed) {
                let got: Vec<&str> = schema.fields().iter().map(|c| c.name().as_str()).collect();
                return Err(FeatureError::Invalid {
                    location,
                    message: format!(
                        "the query must return columns `{key}` and `{}`; it returns {got:?}",
                        f.name
                    ),
                });
            }
        }
        let alias = format!("f{i}");
        let value = format!("{alias}.{}", quote_ident(&f.name));
        let value = match &f.default {
            None => value,
            Some(d) => {
                let lit = sql_literal(d).ok_or_else(|| FeatureError::Invalid {
                    location: location.clone(),
                    message: "default must be a scalar (number, string, boolean or null)".into(),
                })?;
                format!("COALESCE({value}, {lit})")
            }
        };
        selects.push(format!(
            "CAST({value} AS {}) AS {}",
            sql_type(f.ty),
            quote_ident(&f.name)
        ));
        joins.push(format!(
            "LEFT JOIN ({}) AS {alias} ON {alias}.{} = e.{}",
            f.sql.trim().trim_end_matches(';'),
            quote_ident(key),
            quote_ident(&def.entity.table_key)
        ));
    }
    let sql = format!(
        "SELECT {} FROM {} AS e {}",
        selects.join(", "),
        quote_ident(&def.entity.table),
        joins.join(" ")
    );
    let location = format!("{}: features combined", def.file.display());
    let df = ctx.sql(&sql).await.map_err(|source| FeatureError::Plan {
        location: location.clone(),
        source,
    })?;
    // Optimized and made physical once here; each batch only runs the physical plan.
    let err = |source| FeatureError::Plan {
        location: location.clone(),
        source,
    };
    let session = ctx.state();
    let plan = session.optimize(df.logical_plan()).map_err(err)?;
    let plan = session
        .query_planner()
        .create_physical_plan(&plan, &session)
        .await
        .map_err(err)?;
    Ok((plan, output_schema(def, key_type)))
}
