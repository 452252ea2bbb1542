//! DataFusion `TableProvider` over a `StateTable`. A scan answers equality and IN
//! filters on indexed columns from the index, and is limited to the rows of the scope
//! of the query it runs in (the rows of the entities a batch touched), never a full
//! scan unless the query has no scope. The rows are read when the plan runs (see
//! [`StateScanExec`]), so a physical plan can be run again for another scope.

use super::scan::StateScanExec;
use super::{Key, StateTable};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::HashSet;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use std::sync::{Arc, OnceLock, RwLock};

/// Which rows of each state table a query's scans may see, set on the session config
/// of the task context that runs the query (`SessionConfig::with_extension`): each
/// query carries its own, so queries over different entities can run at the same
/// time. Without it a scan sees every row (ad-hoc queries).
#[derive(Debug, Default)]
pub struct Scopes {
    /// Per state table, by its position (see [`StateTableProvider::new`]).
    pub tables: Vec<TableScope>,
}

/// The rows of one state table in a query's scope.
#[derive(Debug, Default)]
pub struct TableScope {
    /// The slots of the rows, sorted and distinct, resolved from the entities' keys once
    /// per query rather than once per scan.
    pub slots: Vec<u32>,
    /// The table's [`StateTable::version`] the slots were resolved at: a scan of a table
    /// changed since fails rather than read other rows.
    pub version: u64,
    /// The rows at `slots`, decoded by the query's first scan that needs them all.
    pub(super) scanned: OnceLock<RecordBatch>,
}

impl TableScope {
    pub fn new(slots: Vec<u32>, version: u64) -> Self {
        TableScope {
            slots,
            version,
            scanned: OnceLock::new(),
        }
    }
}

pub struct StateTableProvider {
    table: Arc<RwLock<StateTable>>,
    /// Position of this table in [`Scopes::tables`].
    position: usize,
    schema: SchemaRef,
}

impl std::fmt::Debug for StateTableProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateTableProvider").finish_non_exhaustive()
    }
}

impl StateTableProvider {
    pub fn new(table: Arc<RwLock<StateTable>>, position: usize) -> Self {
        let schema = table.read().expect("state lock").schema().clone();
        StateTableProvider {
            table,
            position,
            schema,
        }
    }
}

/// Slots of the rows selected by `filter` if it is `col = lit` or `col IN (lits)` on
/// an indexed or primary-key column.
pub(super) fn slots_for_filter(table: &StateTable, filter: &Expr) -> Option<HashSet<u32>> {
    let (column, values) = match filter {
        Expr::BinaryExpr(b) if b.op == Operator::Eq => match (&*b.left, &*b.right) {
            (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => {
                (c, vec![Key::from_scalar(v)?])
            }
            _ => return None,
        },
        Expr::InList(l) if !l.negated => match &*l.expr {
            Expr::Column(c) => {
                let mut vals = Vec::with_capacity(l.list.len());
                for e in &l.list {
                    match e {
                        Expr::Literal(v, _) => vals.push(Key::from_scalar(v)?),
                        _ => return None,
                    }
                }
                (c, vals)
            }
            _ => return None,
        },
        _ => return None,
    };
    let col = table.schema().index_of(&column.name).ok()?;
    if table.key_columns() == [col] {
        return Some(values.iter().filter_map(|v| table.slot_of(v)).collect());
    }
    let idx = table.index_of(col)?;
    let mut rows = Vec::new();
    for v in &values {
        table.lookup_slots(idx, v, &mut rows);
    }
    Some(rows.into_iter().map(|(slot, _)| slot).collect())
}

#[async_trait]
impl TableProvider for StateTableProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        let table = self.table.read().expect("state lock");
        Ok(filters
            .iter()
            .map(|f| match slots_for_filter(&table, f) {
                // Inexact: DataFusion still applies the filter, the index only prunes.
                Some(_) => TableProviderFilterPushDown::Inexact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let index_filters = {
            let table = self.table.read().expect("state lock");
            filters
                .iter()
                .filter(|f| slots_for_filter(&table, f).is_some())
                .cloned()
                .collect()
        };
        Ok(Arc::new(StateScanExec::new(
            self.table.clone(),
            self.position,
            &self.schema,
            projection,
            index_filters,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::Changes;
    use arrow::array::{Int32Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::{SessionConfig, SessionContext};

    fn inserts(rows: &RecordBatch) -> Changes {
        Changes::decode(rows.clone()).unwrap()
    }

    fn loans(ids: &[i32], clients: &[i32]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("client_id", DataType::Int32, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(ids.to_vec())),
                Arc::new(Int32Array::from(clients.to_vec())),
            ],
        )
        .unwrap()
    }

    async fn ids(ctx: &SessionContext, sql: &str) -> Result<Vec<i32>> {
        let batches = ctx.sql(sql).await?.collect().await?;
        let mut out: Vec<i32> = batches
            .iter()
            .flat_map(|b| {
                arrow::compute::cast(b.column(0), &DataType::Int64)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .iter()
                    .map(|&v| v as i32)
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    #[tokio::test]
    async fn scans_see_their_query_scope_and_refuse_a_stale_one() {
        let first = loans(&[1, 2, 3, 4], &[10, 10, 20, 30]);
        let table = StateTable::new("loan", first.schema(), vec![0], vec![1]).unwrap();
        let table = Arc::new(RwLock::new(table));
        table.write().unwrap().apply(&inserts(&first)).unwrap();
        let provider = Arc::new(StateTableProvider::new(table.clone(), 0));

        let everything = SessionContext::new();
        everything.register_table("loan", provider.clone()).unwrap();
        assert_eq!(
            ids(&everything, "SELECT id FROM loan").await.unwrap(),
            [1, 2, 3, 4]
        );

        // Scoped to client 10's loans; a filter on the primary key narrows further.
        let scope = {
            let state = table.read().unwrap();
            let mut rows = Vec::new();
            state.lookup_slots(0, &Key::Int(10), &mut rows);
            let mut slots: Vec<u32> = rows.iter().map(|(s, _)| *s).collect();
            slots.sort_unstable();
            TableScope::new(slots, state.version())
        };
        let config = SessionConfig::new().with_extension(Arc::new(Scopes {
            tables: vec![scope],
        }));
        let scoped = SessionContext::new_with_config(config);
        scoped.register_table("loan", provider).unwrap();
        assert_eq!(ids(&scoped, "SELECT id FROM loan").await.unwrap(), [1, 2]);
        assert_eq!(
            ids(&scoped, "SELECT id FROM loan WHERE id IN (2, 3)")
                .await
                .unwrap(),
            [2]
        );

        // The table changes: the scope's slots may now address other rows.
        table
            .write()
            .unwrap()
            .apply(&inserts(&loans(&[5], &[10])))
            .unwrap();
        let err = ids(&scoped, "SELECT id FROM loan").await.unwrap_err();
        assert!(err.to_string().contains("state table changed"), "{err}");
    }
}
