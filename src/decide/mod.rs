//! Decisions: a loan application decided on fresh features, as the seed draws it:
//!
//! ```text
//! POST /v1/decisions {client_id, loan_id, min_lsn}
//!   → wait until the watermark reaches min_lsn (read-your-writes, see serve::Online)
//!   → the client's features (online store) + the application's row (engine state)
//!   → score (ONNX model, `model`) → rules (DataFusion expressions, `rules`)
//!   → {decision, score, reasons, features, lsn, model, timings_ms}
//!   → audit record queued for <lake>/decisions/<name> (`audit`, off the request path)
//! ```
//!
//! [`Decisions::compile`] checks the decisions file against the pipeline (model inputs
//! against the features and application columns, every rule's expression), for
//! `pipeline validate` and at start-up.

mod audit;
mod model;
mod rules;

use crate::config::Pipeline;
use crate::serve::http::{key_json, parse_lsn, Api, ApiError, Wait};
use crate::serve::{date_text, OnlineRow};
use crate::source::TableSchema;
use crate::state::Key;
use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Field, Float32Type, Float64Type, Int32Type, Int64Type, Schema, SchemaRef,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("model {}: {message}", file.display())]
    Model { file: PathBuf, message: String },
    #[error("{location}: {message}")]
    Rule { location: String, message: String },
    #[error("{file}: {message}")]
    Inputs { file: String, message: String },
    #[error("scoring: {0}")]
    Score(String),
    #[error("rule `{rule}`: {message}")]
    Evaluate { rule: String, message: String },
    #[error("decision audit table: {0}")]
    Audit(Box<crate::sink::SinkError>),
}

impl From<crate::sink::SinkError> for DecideError {
    fn from(e: crate::sink::SinkError) -> Self {
        DecideError::Audit(Box::new(e))
    }
}

/// How the application row is found in state and what of it the decision uses.
struct Application {
    field: String,
    table: usize,
    key_text: bool,
    entity_column: String,
    /// Source columns, and their names as inputs (`application_<column>`).
    columns: Vec<(String, Field)>,
}

/// A decisions file compiled against the pipeline: model loaded, rules planned.
pub struct Decisions {
    name: String,
    file: String,
    entity_field: String,
    application: Option<Application>,
    model: model::Model,
    /// Per model input, its column in the input row.
    model_columns: Vec<usize>,
    rules: rules::Rules,
    /// Features, then `application_<column>`s, then `score`.
    inputs: SchemaRef,
    /// How many of `inputs` are features.
    features: usize,
}

impl Decisions {
    /// Compiles `pipeline`'s decisions file (None without one) on the source `schemas`
    /// and the feature files' output schemas.
    pub fn compile(
        pipeline: &Pipeline,
        schemas: &[TableSchema],
        outputs: &[(String, SchemaRef)],
    ) -> Result<Option<Decisions>, DecideError> {
        let Some(def) = &pipeline.decisions else {
            return Ok(None);
        };
        let at = def.file.display().to_string();
        let inputs_err = |message: String| DecideError::Inputs {
            file: at.clone(),
            message,
        };
        let (_, out) = outputs
            .iter()
            .find(|(n, _)| *n == def.features)
            .ok_or_else(|| inputs_err(format!("feature file `{}` has no output", def.features)))?;
        let ff = pipeline
            .feature_files
            .iter()
            .find(|f| f.name == def.features)
            .expect("validated with the pipeline");
        let mut fields: Vec<Field> = out.fields()[1..=ff.features.len()]
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        let application = match &def.application {
            None => None,
            Some(a) => {
                let table = schemas
                    .iter()
                    .position(|s| s.name.name == a.table)
                    .ok_or_else(|| {
                        inputs_err(format!(
                            "application.table `{}` is not a source table",
                            a.table
                        ))
                    })?;
                let schema = &schemas[table];
                let column = |c: &str, at: &str| {
                    schema.schema.field_with_name(c).cloned().map_err(|_| {
                        inputs_err(format!("{at}: table {} has no column `{c}`", schema.name))
                    })
                };
                let key = column(&a.key, "application.key")?;
                if schema.key != [schema.column_index(&a.key).unwrap_or(usize::MAX)] {
                    return Err(inputs_err(format!(
                        "application.key: `{}` is not the primary key of {}",
                        a.key, schema.name
                    )));
                }
                let owner = column(&a.entity_column, "application.entity_column")?;
                if !crate::state::is_key_type(owner.data_type()) {
                    return Err(inputs_err(format!(
                        "application.entity_column: `{}` of {} is {}, not a key type",
                        a.entity_column,
                        schema.name,
                        owner.data_type()
                    )));
                }
                let mut columns = Vec::new();
                for (i, c) in a.columns.iter().enumerate() {
                    let f = column(c, &format!("application.columns[{i}]"))?;
                    let input = Field::new(format!("application_{c}"), f.data_type().clone(), true);
                    if fields.iter().any(|x| x.name() == input.name()) {
                        return Err(inputs_err(format!(
                            "application.columns[{i}]: `{}` is also a feature of {}",
                            input.name(),
                            def.features
                        )));
                    }
                    fields.push(input.clone());
                    columns.push((c.clone(), input));
                }
                Some(Application {
                    field: a.field.clone(),
                    table,
                    key_text: key.data_type() == &DataType::Utf8,
                    entity_column: a.entity_column.clone(),
                    columns,
                })
            }
        };
        fields.push(Field::new("score", DataType::Float64, false));
        let inputs = Arc::new(Schema::new(fields));
        let model = model::Model::load(&def.model)?;
        let mut model_columns = Vec::new();
        for name in &model.inputs {
            let usable = || {
                inputs.fields()[..inputs.fields().len() - 1]
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let i = inputs
                .index_of(name)
                .ok()
                .filter(|&i| i + 1 < inputs.fields().len())
                .ok_or_else(|| DecideError::Model {
                    file: def.model.clone(),
                    message: format!(
                        "input `{name}` is not a feature of {} nor an application column \
                         of {} (model inputs: {}; available: {})",
                        def.features,
                        def.file.display(),
                        model.inputs.join(", "),
                        usable()
                    ),
                })?;
            let ty = inputs.field(i).data_type();
            if !ty.is_numeric() && ty != &DataType::Boolean {
                return Err(DecideError::Model {
                    file: def.model.clone(),
                    message: format!("input `{name}` is {ty}, not a number"),
                });
            }
            model_columns.push(i);
        }
        let rules = rules::Rules::compile(def, &inputs)?;
        Ok(Some(Decisions {
            name: def.name.clone(),
            file: def.features.clone(),
            entity_field: ff.entity.key.clone(),
            features: ff.features.len(),
            application,
            model,
            model_columns,
            rules,
            inputs,
        }))
    }

    /// The model, as `name@version`.
    pub fn model_id(&self) -> &str {
        &self.model.id
    }

    /// `POST /v1/decisions` on `api`, with the audit table opened (created) in the
    /// pipeline's lake; the audit writer commits what is queued when `stop` is cancelled.
    pub async fn serve(
        self,
        api: Api,
        pipeline: &Pipeline,
        stop: CancellationToken,
    ) -> Result<(Router<Api>, tokio::task::JoinHandle<()>), DecideError> {
        let lake = pipeline.config.lake.open()?;
        let (audit, task) = audit::spawn(lake, &self.name, &pipeline.config.lake.maintenance, stop)
            .await
            .map_err(|e| DecideError::Audit(Box::new(e)))?;
        let state = Arc::new(Serving {
            decisions: self,
            api,
            audit,
        });
        let router = Router::new()
            .route("/v1/decisions", post(decide))
            .with_state(state);
        Ok((router, task))
    }
}

struct Serving {
    decisions: Decisions,
    api: Api,
    audit: audit::AuditLog,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

async fn decide(
    State(s): State<Arc<Serving>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let d = &s.decisions;
    let req: Map<String, Value> = s.api.json_body(body)?;
    let mut known = vec![d.entity_field.as_str(), "min_lsn", "timeout_ms"];
    if let Some(a) = &d.application {
        known.push(&a.field);
    }
    if let Some(k) = req.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "bad_body",
            format!("unknown field `{k}` (fields: {})", known.join(", ")),
        ));
    }
    let field = |name: &str| {
        req.get(name)
            .ok_or_else(|| ApiError::bad_request("bad_body", format!("missing field `{name}`")))
    };
    let entity = s
        .api
        .parse_keys(&d.file, std::slice::from_ref(field(&d.entity_field)?))?
        .remove(0);
    let app_key = match &d.application {
        None => None,
        Some(a) => {
            let v = field(&a.field)?;
            let key = match (a.key_text, v) {
                (true, Value::String(t)) => Some(Key::Text(t.as_str().into())),
                (false, Value::Number(n)) => n.as_i64().map(Key::Int),
                (false, Value::String(t)) => t.trim().parse().ok().map(Key::Int),
                _ => None,
            };
            Some(key.ok_or_else(|| {
                ApiError::bad_request("bad_key", format!("`{}` {v} is not a key", a.field))
            })?)
        }
    };
    let wait = Wait {
        min_lsn: req.get("min_lsn").map(parse_lsn).transpose()?,
        timeout_ms: req
            .get("timeout_ms")
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_body",
                        format!("timeout_ms {v} is not a non-negative integer"),
                    )
                })
            })
            .transpose()?,
    };

    // Wait for the caller's write, then read.
    let t = Instant::now();
    s.api.wait(wait).await?;
    let wait_ms = ms(t);
    let t = Instant::now();
    let (watermark, rows) = s
        .api
        .read(&d.file, std::slice::from_ref(&entity), Wait::default())
        .await?;
    let Some(row) = rows.into_iter().next().flatten() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_entity",
            format!("{} has no entity {}", d.file, key_json(&entity)),
        ));
    };
    let mut columns = feature_columns(&d.inputs, d.features, &row);
    if let (Some(a), Some(key)) = (&d.application, &app_key) {
        columns.extend(application_columns(&s.api, a, key, &entity)?);
    }
    let features_ms = ms(t);

    let t = Instant::now();
    let model_row: Vec<Option<f32>> = d
        .model_columns
        .iter()
        .map(|&i| as_f32(&columns[i]))
        .collect();
    let score = d.model.score(&model_row).map_err(internal)?;
    let score_ms = ms(t);

    let t = Instant::now();
    columns.push(Arc::new(Float64Array::from(vec![score])));
    let inputs =
        RecordBatch::try_new(d.inputs.clone(), columns).map_err(|e| internal(e.to_string()))?;
    let fired = d.rules.evaluate(&inputs).map_err(internal)?;
    let rules_ms = ms(t);

    let decision = if fired.is_empty() {
        "approve"
    } else {
        "reject"
    };
    let reasons: Vec<String> = fired.iter().map(|f| f.reason.clone()).collect();
    let features = inputs_json(&inputs);
    let total_ms = ms(started);
    let body = json!({
        "decision": decision,
        "score": score,
        "reasons": reasons,
        "rules": fired.iter().map(|f| f.rule.clone()).collect::<Vec<_>>(),
        "features": features,
        "feature_time": date_text(row.feature_time),
        "lsn": row.lsn.to_string(),
        "watermark": watermark.to_string(),
        "model": d.model.id,
        "timings_ms": {
            "wait": wait_ms, "features": features_ms, "score": score_ms, "rules": rules_ms,
            "total": total_ms,
        },
    });
    s.audit.record(audit::AuditRecord {
        decided_at_micros: chrono::Utc::now().timestamp_micros(),
        request: String::from_utf8_lossy(&body_text(&req)).into_owned(),
        features: features.to_string(),
        features_lsn: row.lsn,
        watermark,
        score,
        decision,
        reasons,
        model: d.model.id.clone(),
        wait_ms,
        features_ms,
        score_ms,
        rules_ms,
        total_ms,
    });
    metrics::counter!("pipeline_decisions_total", "decision" => decision).increment(1);
    Ok(axum::Json(body).into_response())
}

fn body_text(req: &Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(req).unwrap_or_default()
}

fn internal(e: impl ToString) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "decision_failed",
        e.to_string(),
    )
}

/// The served features as one-row arrays of the input schema's feature fields.
fn feature_columns(inputs: &SchemaRef, features: usize, row: &OnlineRow) -> Vec<ArrayRef> {
    inputs.fields()[..features]
        .iter()
        .map(|f| {
            json_cell(
                f.data_type(),
                row.features.get(f.name()).unwrap_or(&Value::Null),
            )
        })
        .collect()
}

/// The application's row from the engine's state: its input columns, after checking it
/// belongs to the entity the request names.
fn application_columns(
    api: &Api,
    a: &Application,
    key: &Key,
    entity: &Key,
) -> Result<Vec<ArrayRef>, ApiError> {
    let state = api.online().state().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no state yet")
    })?;
    let table = state
        .table(crate::changelog::TableId::new(a.table))
        .read()
        .unwrap();
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_application",
            format!("{} {} is not in {}", a.field, key_json(key), table.name()),
        )
    };
    let slot = table.slot_of(key).ok_or_else(not_found)?;
    let table_name = table.name().to_string();
    let row = table
        .scan(Some(&[slot]))
        .map_err(|e| internal(e.to_string()))?;
    drop(table);
    let owner = row
        .column_by_name(&a.entity_column)
        .map(|c| crate::state::key_at(c, 0));
    if owner.as_ref() != Some(entity) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "application_mismatch",
            format!(
                "{} {} belongs to {} {}, not {}",
                a.field,
                key_json(key),
                a.entity_column,
                owner.as_ref().map_or(Value::Null, key_json),
                key_json(entity)
            ),
        ));
    }
    // The source schema may have changed since the decisions were compiled.
    a.columns
        .iter()
        .map(|(c, _)| {
            row.column_by_name(c).cloned().ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    format!(
                        "{} has no column `{c}` any more: restart to recompile the decisions",
                        table_name
                    ),
                )
            })
        })
        .collect()
}

/// A one-row array of `ty` holding the served JSON value.
fn json_cell(ty: &DataType, v: &Value) -> ArrayRef {
    use arrow::array::{BooleanArray, Date32Array, Int32Array, Int64Array, StringArray};
    match ty {
        DataType::Int64 => Arc::new(Int64Array::from(vec![v.as_i64()])),
        DataType::Int32 => Arc::new(Int32Array::from(vec![v.as_i64().map(|x| x as i32)])),
        DataType::Float64 => Arc::new(Float64Array::from(vec![v.as_f64()])),
        DataType::Boolean => Arc::new(BooleanArray::from(vec![v.as_bool()])),
        DataType::Date32 => Arc::new(Date32Array::from(vec![v.as_str().and_then(|t| {
            chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .ok()
                .map(|d| {
                    (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32
                })
        })])),
        _ => Arc::new(StringArray::from(vec![v.as_str()])),
    }
}

/// A cell as a model input: numbers and booleans as f32, NULL as None.
fn as_f32(a: &ArrayRef) -> Option<f32> {
    let c = arrow::compute::cast(a, &DataType::Float32).ok()?;
    let c = c.as_primitive::<Float32Type>();
    c.is_valid(0).then(|| c.value(0))
}

/// The input row (without the score) as a JSON object.
fn inputs_json(inputs: &RecordBatch) -> Value {
    let schema = inputs.schema();
    let mut out = Map::new();
    for (f, c) in schema.fields().iter().zip(inputs.columns()) {
        if f.name() == "score" {
            continue;
        }
        out.insert(f.name().clone(), cell_json(c));
    }
    Value::Object(out)
}

fn cell_json(c: &ArrayRef) -> Value {
    if c.is_null(0) {
        return Value::Null;
    }
    match c.data_type() {
        DataType::Int64 => c.as_primitive::<Int64Type>().value(0).into(),
        DataType::Int32 => c.as_primitive::<Int32Type>().value(0).into(),
        DataType::Float64 => serde_json::Number::from_f64(c.as_primitive::<Float64Type>().value(0))
            .map_or(Value::Null, Value::Number),
        DataType::Date32 => date_text(c.as_primitive::<Date32Type>().value(0)).into(),
        DataType::Boolean => c.as_boolean().value(0).into(),
        DataType::Utf8 => c.as_string::<i32>().value(0).into(),
        _ => arrow::util::display::array_value_to_string(c, 0).map_or(Value::Null, Value::String),
    }
}
