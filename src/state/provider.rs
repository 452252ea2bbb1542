//! DataFusion `TableProvider` over a `StateTable`. A scan answers equality and IN
//! filters on indexed columns from the index, and is limited to the primary keys of
//! the current scope (the rows of the entities a batch touched), never a full scan
//! unless the scope says so.

use super::{Key, StateTable};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// Which rows a scan may see.
#[derive(Debug, Clone, Default)]
pub enum Scope {
    /// Every row (initial snapshot, ad-hoc queries).
    #[default]
    All,
    /// Only these primary keys.
    Keys(Arc<HashSet<Key>>),
}

pub struct StateTableProvider {
    table: Arc<RwLock<StateTable>>,
    scope: Arc<RwLock<Scope>>,
    schema: SchemaRef,
}

impl std::fmt::Debug for StateTableProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateTableProvider").finish_non_exhaustive()
    }
}

impl StateTableProvider {
    pub fn new(table: Arc<RwLock<StateTable>>, scope: Arc<RwLock<Scope>>) -> Self {
        let schema = table.read().expect("state lock").schema().clone();
        StateTableProvider {
            table,
            scope,
            schema,
        }
    }

    /// Primary keys selected by `filter` if it is `col = lit` or `col IN (lits)` on an
    /// indexed or primary-key column.
    fn keys_for_filter(&self, table: &StateTable, filter: &Expr) -> Option<HashSet<Key>> {
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
        let col = self.schema.index_of(&column.name).ok()?;
        if table.key_columns() == [col] {
            return Some(values.into_iter().collect());
        }
        let idx = table.index_of(col)?;
        Some(
            values
                .iter()
                .flat_map(|v| table.lookup(idx, v).iter().cloned())
                .collect(),
        )
    }
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
            .map(|f| match self.keys_for_filter(&table, f) {
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
        let table = self.table.read().expect("state lock");
        let mut keys: Option<HashSet<Key>> = match &*self.scope.read().expect("scope lock") {
            Scope::All => None,
            Scope::Keys(k) => Some((**k).clone()),
        };
        for f in filters {
            if let Some(fk) = self.keys_for_filter(&table, f) {
                keys = Some(match keys {
                    None => fk,
                    Some(k) => k.intersection(&fk).cloned().collect(),
                });
            }
        }
        let batch = table
            .scan(keys.as_ref())
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        drop(table);
        let exec = MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.schema.clone(),
            projection.cloned(),
        )?;
        Ok(exec)
    }
}
