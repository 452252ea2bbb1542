//! The physical scan of a state table. It reads its rows when executed, not when
//! planned: the rows come from the [`Scopes`] of the task context it runs in, so one
//! physical plan per feature file serves every batch (planning a feature file's joins
//! and aggregates cost more than running them on a batch's few rows).

use super::provider::slots_for_filter;
use super::{Scopes, StateTable};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use std::sync::{Arc, RwLock};

pub(crate) struct StateScanExec {
    table: Arc<RwLock<StateTable>>,
    /// Position of the table in [`Scopes::tables`].
    position: usize,
    projection: Option<Vec<usize>>,
    /// Filters an index answers (`col = lit`, `col IN (lits)`); DataFusion still
    /// applies them above the scan, the index only prunes.
    index_filters: Vec<Expr>,
    properties: Arc<PlanProperties>,
}

impl StateScanExec {
    pub(crate) fn new(
        table: Arc<RwLock<StateTable>>,
        position: usize,
        schema: &SchemaRef,
        projection: Option<&Vec<usize>>,
        index_filters: Vec<Expr>,
    ) -> Result<Self> {
        let projected = match projection {
            Some(p) => Arc::new(schema.project(p)?),
            None => schema.clone(),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(projected),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(StateScanExec {
            table,
            position,
            projection: projection.cloned(),
            index_filters,
            properties: Arc::new(properties),
        })
    }

    /// The rows this scan sees in `scopes` (all rows without a scope), projected.
    fn read(&self, scopes: Option<&Scopes>) -> Result<RecordBatch> {
        let table = self.table.read().expect("state lock");
        let scope = scopes.map(|s| &s.tables[self.position]);
        if let Some(scope) = scope.filter(|s| s.version != table.version()) {
            return Err(DataFusionError::Internal(format!(
                "state table changed ({}, version {} → {}) between resolving a query's scope and running it",
                table.name(),
                scope.version,
                table.version()
            )));
        }
        let external = |e| DataFusionError::External(Box::new(e));
        let mut slots: Option<Vec<u32>> = None;
        for f in &self.index_filters {
            let Some(selected) = slots_for_filter(&table, f) else {
                continue;
            };
            slots = Some(
                match slots.as_deref().or(scope.map(|s| s.slots.as_slice())) {
                    Some(base) => base
                        .iter()
                        .copied()
                        .filter(|s| selected.contains(s))
                        .collect(),
                    None => {
                        let mut all: Vec<u32> = selected.into_iter().collect();
                        all.sort_unstable();
                        all
                    }
                },
            );
        }
        let batch = match (slots, scope) {
            (Some(slots), _) => table.scan(Some(&slots)).map_err(external)?,
            // Several scans of one table in a query read the same scoped rows: once.
            (None, Some(scope)) => match scope.scanned.get() {
                Some(batch) => batch.clone(),
                None => {
                    let batch = table.scan(Some(&scope.slots)).map_err(external)?;
                    scope.scanned.get_or_init(|| batch).clone()
                }
            },
            (None, None) => table.scan(None).map_err(external)?,
        };
        match &self.projection {
            Some(p) => Ok(batch.project(p)?),
            None => Ok(batch),
        }
    }
}

impl std::fmt::Debug for StateScanExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateScanExec")
            .field("position", &self.position)
            .field("projection", &self.projection)
            .finish_non_exhaustive()
    }
}

impl DisplayAs for StateScanExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "StateScanExec: table={}", self.position)?;
        if !self.index_filters.is_empty() {
            let filters: Vec<String> = self.index_filters.iter().map(|e| e.to_string()).collect();
            write!(f, ", index_filters=[{}]", filters.join(", "))?;
        }
        Ok(())
    }
}

impl ExecutionPlan for StateScanExec {
    fn name(&self) -> &str {
        "StateScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "StateScanExec has one partition, asked for {partition}"
            )));
        }
        let scopes = context.session_config().get_extension::<Scopes>();
        let batch = self.read(scopes.as_deref())?;
        let schema = batch.schema();
        Ok(Box::pin(MemoryStream::try_new(vec![batch], schema, None)?))
    }
}
