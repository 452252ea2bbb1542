//! Feature engine: for each change batch, recomputes the features of exactly the
//! entities the batch touched (through joins too), by running each feature file's SQL
//! over the [`State`] tables scoped to those entities.

mod mapping;
mod plan;
mod scope;
mod touched;

use crate::batch::ChangeBatch;
use crate::changelog::{Lsn, TableId};
use crate::config::{FeatureFile, Pipeline};
use crate::source::TableSchema;
use crate::state::{Key, Scopes, State, StateError, StateTableProvider};
use arrow::array::{
    new_null_array, ArrayRef, BooleanArray, Date32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::HashSet;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
pub use mapping::Mapping;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },
    #[error("{location}: {source}")]
    Plan {
        location: String,
        source: datafusion::error::DataFusionError,
    },
    #[error("feature table {table}: {source}")]
    Execute {
        table: String,
        source: datafusion::error::DataFusionError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("feature table {table}: {source}")]
    Arrow {
        table: String,
        source: arrow::error::ArrowError,
    },
    #[error("no feature table `{0}` in the pipeline's feature files")]
    UnknownTable(String),
}

pub use crate::config::{
    COMPUTED_AT, DELETED, FEATURE_TIME, OUTPUT_COMMIT_TS as COMMIT_TS, OUTPUT_LSN as LSN,
};

/// Entities per query when computing every entity's features (after a snapshot).
const ALL_ENTITIES_CHUNK: usize = 8_192;
/// Entities per query at least when a computation is split over the cores: below it a
/// query's fixed cost outweighs a second core.
const PARALLEL_CHUNK: usize = 1_024;

/// One feature file, planned.
struct CompiledFile {
    def: FeatureFile,
    /// Physical plan, made once and run for every batch (its state scans read their
    /// rows from the scopes of the task context it runs in); `as_of_date()` is
    /// volatile, so it is not folded in.
    plan: Arc<dyn ExecutionPlan>,
    /// Output schema: key, features, feature_time, _lsn, computed_at, _deleted, _commit_ts.
    schema: SchemaRef,
    /// Per source table (configured order): how its rows map to this file's entities.
    mappings: Vec<Option<Mapping>>,
    /// The source table holding one row per entity.
    entity_table: TableId,
}

/// Entities touched by changes, per feature file (see [`FeatureEngine::apply`]).
pub struct Touched(Vec<HashSet<Key>>);

/// The changed keys of a batch between [`FeatureEngine::touch_before`] and
/// [`FeatureEngine::apply_touched`].
pub struct BeforeApply(Vec<crate::state::Changed>);

impl Touched {
    /// The entities of feature file `file` (in the pipeline's order).
    pub fn of_file(&self, file: usize) -> &HashSet<Key> {
        &self.0[file]
    }

    /// Whether any entity is in both, for the same feature file.
    pub fn overlaps(&self, other: &Touched) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .any(|(a, b)| a.iter().any(|k| b.contains(k)))
    }

    /// Adds `other`'s entities.
    pub fn extend(&mut self, other: &Touched) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            a.extend(b.iter().cloned());
        }
    }

    /// Forgets the entities of the feature files `keep` rejects (by position).
    pub fn retain_files(&mut self, keep: impl Fn(usize) -> bool) {
        for (i, set) in self.0.iter_mut().enumerate() {
            if !keep(i) {
                set.clear();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(HashSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Features computed for one file and one batch.
pub struct FeatureRows {
    pub table: String,
    pub batch: RecordBatch,
}

pub struct FeatureEngine {
    ctx: SessionContext,
    clock: crate::udfs::AsOfClock,
    fixed_as_of: Option<i32>,
    state: State,
    files: Vec<CompiledFile>,
}

impl FeatureEngine {
    /// Builds empty state for `schemas`, registers the UDFs, and plans every feature
    /// of every file: errors name the file, line and feature.
    pub async fn new(pipeline: &Pipeline, schemas: &[TableSchema]) -> Result<Self, FeatureError> {
        // One partition: per-batch inputs are small, and parallelism costs more than it
        // saves at 200 ms batches. No dynamic filters: a plan that is run again must
        // not carry a filter a join derived from the previous run's rows.
        let mut config = SessionConfig::new()
            .with_target_partitions(1)
            .with_information_schema(false);
        let optimizer = &mut config.options_mut().optimizer;
        optimizer.enable_dynamic_filter_pushdown = false;
        optimizer.enable_join_dynamic_filter_pushdown = false;
        optimizer.enable_topk_dynamic_filter_pushdown = false;
        optimizer.enable_aggregate_dynamic_filter_pushdown = false;
        let ctx = SessionContext::new_with_config(config);
        let clock = crate::udfs::AsOfClock::default();
        crate::udfs::register_all(&ctx, clock.clone());

        let resolved: Vec<Vec<Option<Mapping>>> = pipeline
            .feature_files
            .iter()
            .map(|f| mapping::resolve_mappings(f, schemas))
            .collect::<Result<_, _>>()?;
        let state = State::new(schemas, |t| mapping::index_columns(t.index(), &resolved))?;
        for (t, schema) in TableId::all(schemas.len()).zip(schemas) {
            ctx.register_table(
                datafusion::common::TableReference::bare(schema.name.name.clone()),
                Arc::new(StateTableProvider::new(state.table(t).clone(), t.index())),
            )
            .map_err(|e| FeatureError::Plan {
                location: format!("table {}", schema.name),
                source: e,
            })?;
        }

        let mut files = Vec::new();
        for (def, mappings) in pipeline.feature_files.iter().zip(resolved) {
            let entity_table = schemas
                .iter()
                .position(|s| s.name.name == def.entity.table)
                .map(TableId::new)
                .expect("validated in resolve_mappings");
            let (plan, schema) = plan::plan_file(&ctx, def, &schemas[entity_table.index()]).await?;
            files.push(CompiledFile {
                def: def.clone(),
                plan,
                schema,
                mappings,
                entity_table,
            });
        }
        let fixed_as_of = pipeline
            .as_of
            .map(|d| (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32);
        Ok(FeatureEngine {
            ctx,
            clock,
            fixed_as_of,
            state,
            files,
        })
    }

    /// Output schema of each feature table, by name.
    pub fn output_schemas(&self) -> Vec<(String, SchemaRef)> {
        self.files
            .iter()
            .map(|f| (f.def.name.clone(), f.schema.clone()))
            .collect()
    }

    /// The state the features are computed on.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The as-of date (days since 1970-01-01) for a batch committed at
    /// `commit_ts_micros`: its UTC date, or the pipeline's fixed `clock.as_of`.
    pub fn as_of_days(&self, commit_ts_micros: i64) -> i32 {
        self.fixed_as_of
            .unwrap_or_else(|| commit_ts_micros.div_euclid(86_400_000_000) as i32)
    }

    /// Features of every entity (after the initial snapshot). Computed for
    /// [`ALL_ENTITIES_CHUNK`] entities at a time through the same indexed scopes as a
    /// change batch, so that memory follows the chunk rather than the tables (a query
    /// over whole tables would hold every table's rows and join state at once).
    pub async fn compute_all(
        &self,
        lsn: Lsn,
        commit_ts_micros: i64,
    ) -> Result<Vec<FeatureRows>, FeatureError> {
        let mut out = Vec::new();
        for file in &self.files {
            let entities = self.entity_keys(file);
            let stamp = self.stamp(lsn, commit_ts_micros);
            out.push(FeatureRows {
                table: file.def.name.clone(),
                batch: self.compute_chunked(file, entities, stamp).await?,
            });
        }
        Ok(out)
    }

    /// The features of `entities` of `file`, in chunks of at most [`ALL_ENTITIES_CHUNK`]
    /// and at least [`PARALLEL_CHUNK`] entities, one chunk per core at a time: each
    /// query runs on one thread.
    async fn compute_chunked(
        &self,
        file: &CompiledFile,
        entities: Vec<Key>,
        stamp: Stamp,
    ) -> Result<RecordBatch, FeatureError> {
        let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
        let size = entities
            .len()
            .div_ceil(parallel)
            .clamp(PARALLEL_CHUNK, ALL_ENTITIES_CHUNK);
        let chunks: Vec<&[Key]> = entities.chunks(size).collect();
        if let [one] = chunks[..] {
            return self
                .query(file, one.iter().cloned().collect(), stamp)
                .execute()
                .await;
        }
        let mut batches: Vec<Option<RecordBatch>> = vec![None; chunks.len()];
        // Dropped on error: aborts the queries still running.
        let mut running = tokio::task::JoinSet::new();
        let mut finish = |done: Option<Result<_, tokio::task::JoinError>>| {
            let (i, rows) = done
                .expect("a query is running")
                .expect("feature query task panicked");
            batches[i] = Some(rows?);
            Ok::<_, FeatureError>(())
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            if running.len() == parallel {
                finish(running.join_next().await)?;
            }
            let query = self.query(file, chunk.iter().cloned().collect(), stamp);
            running.spawn(async move { (i, query.execute().await) });
        }
        while !running.is_empty() {
            finish(running.join_next().await)?;
        }
        let batches: Vec<RecordBatch> = batches.into_iter().flatten().collect();
        arrow::compute::concat_batches(&file.schema, &batches).map_err(|source| {
            FeatureError::Arrow {
                table: file.def.name.clone(),
                source,
            }
        })
    }

    /// Every entity of `file`: the distinct non-NULL keys of its entity table.
    fn entity_keys(&self, file: &CompiledFile) -> Vec<Key> {
        let Some(Mapping::Column(c)) = file.mappings[file.entity_table.index()] else {
            unreachable!("the entity table maps itself through entity.table_key")
        };
        let table = self.state.table(file.entity_table).read().unwrap();
        let idx = table.index_of(c).expect("mapping columns are indexed");
        table.indexed_values(idx)
    }

    /// An empty set of touched entities, to collect over [`FeatureEngine::apply`] calls.
    pub fn no_entities(&self) -> Touched {
        Touched(vec![HashSet::new(); self.files.len()])
    }

    /// Applies `batch` to state and adds the entities it touched to `touched`: those its
    /// rows belonged to before the batch, after it, and in between (a loan moved to
    /// another client touches both; see `touched::row_image_entities`). The pieces of one
    /// large transaction are applied one by one.
    pub fn apply(&self, batch: &ChangeBatch, touched: &mut Touched) -> Result<(), FeatureError> {
        let before = self.touch_before(batch, touched);
        self.apply_touched(batch, before, touched)
    }

    /// The first half of [`FeatureEngine::apply`], which leaves state as it is: adds to
    /// `touched` the entities `batch`'s rows belong to before it and through its own row
    /// images (a referenced row's state after it is either unchanged or one of the
    /// batch's images, which the lookup sees). A replay uses it to tell whether a
    /// transaction touches an entity an earlier one already did.
    pub fn touch_before(&self, batch: &ChangeBatch, touched: &mut Touched) -> BeforeApply {
        let changed = self.state.changed_keys(batch);
        for (f, set) in self.files.iter().zip(touched.0.iter_mut()) {
            set.extend(touched::entities(&self.state, &f.mappings, &changed));
            set.extend(touched::row_image_entities(&self.state, &f.mappings, batch));
        }
        BeforeApply(changed)
    }

    /// The second half of [`FeatureEngine::apply`]: applies `batch` and adds the
    /// entities its changed rows belong to afterwards.
    pub fn apply_touched(
        &self,
        batch: &ChangeBatch,
        before: BeforeApply,
        touched: &mut Touched,
    ) -> Result<(), FeatureError> {
        let changed = before.0;
        self.state.apply(batch)?;
        for (f, set) in self.files.iter().zip(touched.0.iter_mut()) {
            set.extend(touched::entities(&self.state, &f.mappings, &changed));
        }
        Ok(())
    }

    /// Features of the `touched` entities on the current state, stamped with the commit
    /// LSN and time of the transaction they reflect.
    pub async fn compute_touched(
        &self,
        touched: Touched,
        lsn: Lsn,
        commit_ts_micros: i64,
    ) -> Result<Vec<FeatureRows>, FeatureError> {
        let mut out = Vec::new();
        for (file, entities) in self.files.iter().zip(touched.0) {
            if entities.is_empty() {
                continue;
            }
            let stamp = self.stamp(lsn, commit_ts_micros);
            let batch = if entities.len() < 2 * PARALLEL_CHUNK {
                self.query(file, entities, stamp).execute().await?
            } else {
                // A catch-up batch or a replayed group: on every core.
                self.compute_chunked(file, entities.into_iter().collect(), stamp)
                    .await?
            };
            out.push(FeatureRows {
                table: file.def.name.clone(),
                batch,
            });
        }
        Ok(out)
    }

    /// The query for the features of `entities` of `file`, stamped with `stamp`: its
    /// task context scopes every state table to their rows.
    fn query(&self, file: &CompiledFile, entities: HashSet<Key>, stamp: Stamp) -> FeatureQuery {
        // The clock is shared: every query of one call has the same as-of date.
        self.clock.set_days(stamp.as_of);
        let scopes = Scopes {
            tables: scope::scopes(&self.state, &file.mappings, &entities),
        };
        let config = self.ctx.copied_config().with_extension(Arc::new(scopes));
        // The plan's expressions are resolved: the task needs no function registry.
        let task = TaskContext::new(
            None,
            self.ctx.session_id(),
            config,
            Default::default(),
            Default::default(),
            Default::default(),
            Default::default(),
            self.ctx.runtime_env(),
        );
        FeatureQuery {
            task: Arc::new(task),
            plan: file.plan.clone(),
            table: file.def.name.clone(),
            schema: file.schema.clone(),
            features: file.def.features.len(),
            entities,
            stamp,
        }
    }

    /// The stamp of rows computed for a transaction committed at `commit_ts_micros`.
    fn stamp(&self, lsn: Lsn, commit_ts_micros: i64) -> Stamp {
        Stamp {
            as_of: self.as_of_days(commit_ts_micros),
            lsn,
            commit_ts_micros: Some(commit_ts_micros),
        }
    }

    /// Features of `entities` of the feature file `table` with `as_of_date()` =
    /// `as_of_days` (days since 1970-01-01), on the current state: an event-time
    /// recompute (training sets). Rows carry `lsn` (what state holds) and no commit time.
    /// Calls must not overlap: the as-of date is shared by the engine's queries.
    pub async fn compute_as_of(
        &self,
        table: &str,
        entities: HashSet<Key>,
        as_of_days: i32,
        lsn: Lsn,
    ) -> Result<RecordBatch, FeatureError> {
        let file = self
            .files
            .iter()
            .find(|f| f.def.name == table)
            .ok_or_else(|| FeatureError::UnknownTable(table.to_string()))?;
        let stamp = Stamp {
            as_of: as_of_days,
            lsn,
            commit_ts_micros: None,
        };
        self.query(file, entities, stamp).execute().await
    }
}

/// What every row of one computation is stamped with.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    /// `as_of_date()`, days since 1970-01-01.
    as_of: i32,
    lsn: Lsn,
    /// Commit time of the source transaction; none for a recompute.
    commit_ts_micros: Option<i64>,
}

/// One planned computation of a feature file's features for a set of entities; owns
/// what it needs, so that several can run at once on different threads.
struct FeatureQuery {
    task: Arc<TaskContext>,
    plan: Arc<dyn ExecutionPlan>,
    table: String,
    schema: SchemaRef,
    features: usize,
    entities: HashSet<Key>,
    stamp: Stamp,
}

impl FeatureQuery {
    /// Runs the query: a row per entity, stamped with the as-of date, the LSN and the
    /// time of computation, and a tombstone for each entity that no longer exists.
    async fn execute(self) -> Result<RecordBatch, FeatureError> {
        let err = |source| FeatureError::Execute {
            table: self.table.clone(),
            source,
        };
        let started = std::time::Instant::now();
        // A fresh copy of the plan's run state (joins keep their build side in it).
        let plan = reset_plan_states(self.plan.clone()).map_err(err)?;
        let prepared = started.elapsed();
        let batches = datafusion::physical_plan::collect(plan, self.task.clone())
            .await
            .map_err(err)?;
        tracing::debug!(table = %self.table, entities = self.entities.len(),
            prepare_ms = prepared.as_secs_f64() * 1e3,
            execute_ms = (started.elapsed() - prepared).as_secs_f64() * 1e3, "feature query");
        let arrow_err = |source| FeatureError::Arrow {
            table: self.table.clone(),
            source,
        };
        let value_schema = Arc::new(Schema::new(self.schema.fields()[..=self.features].to_vec()));
        let mut values =
            arrow::compute::concat_batches(&value_schema, &batches).map_err(arrow_err)?;
        let mut deleted = vec![false; values.num_rows()];
        // Entities that no longer exist: write a tombstone row.
        let present: HashSet<Key> = (0..values.num_rows())
            .map(|i| crate::state::key_at(values.column(0), i))
            .collect();
        let gone: Vec<&Key> = self
            .entities
            .iter()
            .filter(|k| !present.contains(*k))
            .collect();
        if !gone.is_empty() {
            let tomb = tombstones(&value_schema, &gone).map_err(arrow_err)?;
            values = arrow::compute::concat_batches(&value_schema, &[values, tomb])
                .map_err(arrow_err)?;
            deleted.resize(values.num_rows(), true);
        }
        let n = values.num_rows();
        let mut cols: Vec<ArrayRef> = values.columns().to_vec();
        cols.push(Arc::new(Date32Array::from(vec![self.stamp.as_of; n])));
        cols.push(Arc::new(Int64Array::from(vec![self.stamp.lsn.as_i64(); n])));
        let now = chrono::Utc::now().timestamp_micros();
        cols.push(Arc::new(
            TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC"),
        ));
        cols.push(Arc::new(BooleanArray::from(deleted)));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from(vec![self.stamp.commit_ts_micros; n])
                .with_timezone("UTC"),
        ));
        RecordBatch::try_new(self.schema.clone(), cols).map_err(arrow_err)
    }
}

/// Rows with the given keys and NULL features.
fn tombstones(schema: &SchemaRef, keys: &[&Key]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let key_col: ArrayRef = match schema.field(0).data_type() {
        DataType::Int64 => Arc::new(Int64Array::from_iter(keys.iter().map(|k| match k {
            Key::Int(i) => Some(*i),
            _ => None,
        }))),
        _ => Arc::new(StringArray::from_iter(keys.iter().map(|k| match k {
            Key::Text(s) => Some(s.to_string()),
            Key::Int(i) => Some(i.to_string()),
            _ => None,
        }))),
    };
    let mut cols = vec![key_col];
    for f in schema.fields().iter().skip(1) {
        cols.push(new_null_array(f.data_type(), keys.len()));
    }
    RecordBatch::try_new(schema.clone(), cols)
}

/// The feature table schema for `def` with entity key type `key_type`.
fn output_schema(def: &FeatureFile, key_type: DataType) -> SchemaRef {
    let mut fields = vec![Field::new(&def.entity.key, key_type, false)];
    for f in &def.features {
        fields.push(Field::new(&f.name, f.ty.arrow(), true));
    }
    fields.push(Field::new(FEATURE_TIME, DataType::Date32, false));
    fields.push(Field::new(LSN, DataType::Int64, false));
    fields.push(Field::new(
        COMPUTED_AT,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        false,
    ));
    fields.push(Field::new(DELETED, DataType::Boolean, false));
    fields.push(Field::new(
        COMMIT_TS,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        true,
    ));
    Arc::new(Schema::new(fields))
}
