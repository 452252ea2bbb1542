//! Which entities a change batch touches, and which rows of each table belong to a
//! set of entities: both answered from the state's indexes, so the cost follows the
//! number of touched entities, not the size of the tables.

use super::FeatureError;
use crate::batch::ChangeBatch;
use crate::changelog::Changes;
use crate::config::{FeatureFile, SourceMapping};
use crate::source::TableSchema;
use crate::state::{is_key_type, key_at, Changed, Key, State, StateTable, TableScope};
use datafusion::common::{HashMap, HashSet};
use std::sync::RwLockReadGuard;

/// How rows of one table lead to entity keys (column positions in that table).
#[derive(Debug, Clone)]
pub enum Mapping {
    /// The column holds the entity key.
    Column(usize),
    /// The column references `ref_col` of table `target`, which maps further.
    Via {
        col: usize,
        target: usize,
        ref_col: usize,
    },
}

/// Resolves a feature file's `entity` and `sources` against the source schemas.
pub(crate) fn resolve_mappings(
    file: &FeatureFile,
    schemas: &[TableSchema],
) -> Result<Vec<Option<Mapping>>, FeatureError> {
    let table_index = |name: &str, loc: &str| {
        schemas
            .iter()
            .position(|s| s.name.name == name)
            .ok_or_else(|| FeatureError::Invalid {
                location: format!("{}: {loc}", file.file.display()),
                message: format!("table `{name}` is not a source table of the pipeline"),
            })
    };
    let column = |t: usize, name: &str, loc: &str| {
        let s = &schemas[t];
        let c = s.column_index(name).ok_or_else(|| FeatureError::Invalid {
            location: format!("{}: {loc}", file.file.display()),
            message: format!("table {} has no column `{name}`", s.name),
        })?;
        if !is_key_type(&s.columns[c].data_type) {
            return Err(FeatureError::Invalid {
                location: format!("{}: {loc}", file.file.display()),
                message: format!(
                    "column {}.{name} has type {}; mapping columns must be integers, text or dates",
                    s.name, s.columns[c].type_name
                ),
            });
        }
        Ok(c)
    };
    let mut out = vec![None; schemas.len()];
    for (name, m) in &file.sources {
        let loc = format!("sources.{name}");
        let t = table_index(name, &loc)?;
        out[t] = Some(match m {
            SourceMapping::Column(c) => Mapping::Column(column(t, c, &loc)?),
            SourceMapping::Via {
                table,
                column: col,
                references,
            } => {
                let target = table_index(table, &format!("{loc}.via.table"))?;
                Mapping::Via {
                    col: column(t, col, &format!("{loc}.via.column"))?,
                    target,
                    ref_col: column(target, references, &format!("{loc}.via.references"))?,
                }
            }
        });
    }
    Ok(out)
}

/// Columns of table `t` that some mapping looks up, in a stable order.
pub(crate) fn index_columns(t: usize, resolved: &[Vec<Option<Mapping>>]) -> Vec<usize> {
    let mut cols = Vec::new();
    let mut add = |c: usize| {
        if !cols.contains(&c) {
            cols.push(c);
        }
    };
    for file in resolved {
        match &file[t] {
            Some(Mapping::Column(c)) => add(*c),
            Some(Mapping::Via { col, .. }) => add(*col),
            None => {}
        }
        for m in file.iter().flatten() {
            if let Mapping::Via {
                target, ref_col, ..
            } = m
            {
                if *target == t {
                    add(*ref_col);
                }
            }
        }
    }
    cols
}

/// Entities the changed rows belong to in the current state.
pub(crate) fn entities(
    state: &State,
    mappings: &[Option<Mapping>],
    changed: &[Changed],
) -> HashSet<Key> {
    let tables = state.read();
    let mut out = HashSet::new();
    for (t, ch) in changed.iter().enumerate() {
        if mappings[t].is_none() {
            continue;
        }
        for pk in &ch.keys {
            entity_of(&tables, mappings, t, pk, &mut out);
        }
        if ch.truncated {
            let all: Vec<Key> = tables[t].primary_keys().cloned().collect();
            for pk in &all {
                entity_of(&tables, mappings, t, pk, &mut out);
            }
        }
    }
    out
}

fn entity_of(
    tables: &[RwLockReadGuard<'_, StateTable>],
    mappings: &[Option<Mapping>],
    t: usize,
    pk: &Key,
    out: &mut HashSet<Key>,
) {
    match &mappings[t] {
        None => {}
        Some(Mapping::Column(c)) => {
            let idx = tables[t].index_of(*c).expect("mapping columns are indexed");
            if let Some(v) = tables[t].indexed_value(pk, idx) {
                if *v != Key::Null {
                    out.insert(v.clone());
                }
            }
        }
        Some(Mapping::Via {
            col,
            target,
            ref_col,
        }) => {
            let idx = tables[t]
                .index_of(*col)
                .expect("mapping columns are indexed");
            let Some(v) = tables[t].indexed_value(pk, idx) else {
                return;
            };
            if *v == Key::Null {
                return;
            }
            let ref_idx = tables[*target].index_of(*ref_col).expect("indexed");
            for tpk in tables[*target].lookup(ref_idx, v) {
                entity_of(tables, mappings, *target, tpk, out);
            }
        }
    }
}

/// Entities the batch's row images belong to at the moment of their change. With those
/// of [`entities`] before and after the batch, this covers every state in between: a
/// loan inserted and deleted within one batch touches its client. For one run that
/// client's features would not change; but a batch replayed after a crash may be cut
/// differently from the one whose features were committed (which may have held the
/// insert only), and the replay must then recompute that client too.
pub(crate) fn row_image_entities(
    state: &State,
    mappings: &[Option<Mapping>],
    batch: &ChangeBatch,
) -> HashSet<Key> {
    let state = state.read();
    // Batch rows of each table a `Via` mapping looks into, by the referenced column.
    let mut by_ref: HashMap<(usize, usize), HashMap<Key, Vec<usize>>> = HashMap::new();
    for m in mappings.iter().flatten() {
        if let Mapping::Via {
            target, ref_col, ..
        } = m
        {
            if let Some(changes) = &batch.tables[*target] {
                let index = by_ref.entry((*target, *ref_col)).or_default();
                if index.is_empty() {
                    for i in live_images(changes) {
                        index
                            .entry(key_at(changes.rows().column(*ref_col), i))
                            .or_default()
                            .push(i);
                    }
                }
            }
        }
    }
    let images = Images {
        state: &state,
        mappings,
        batch,
        by_ref: &by_ref,
    };
    let mut out = HashSet::new();
    for (t, rows) in batch.tables.iter().enumerate() {
        let Some(changes) = rows.as_ref().filter(|_| mappings[t].is_some()) else {
            continue;
        };
        for i in live_images(changes) {
            images.entity_of(t, i, &mut out);
        }
    }
    out
}

/// Rows of a raw batch that carry a full row image (inserts and updates; a delete
/// carries only its key, a truncate nothing).
fn live_images(changes: &Changes) -> impl Iterator<Item = usize> + '_ {
    let ops = changes.ops();
    (0..ops.len()).filter(move |&i| ops[i].writes_row())
}

struct Images<'a> {
    state: &'a [RwLockReadGuard<'a, StateTable>],
    mappings: &'a [Option<Mapping>],
    batch: &'a ChangeBatch,
    by_ref: &'a HashMap<(usize, usize), HashMap<Key, Vec<usize>>>,
}

impl Images<'_> {
    /// The entities row `i` of the batch's table `t` maps to, through state and through
    /// the batch's own rows of the tables it references.
    fn entity_of(&self, t: usize, i: usize, out: &mut HashSet<Key>) {
        let rows = self.batch.tables[t]
            .as_ref()
            .expect("row of this batch")
            .rows();
        match &self.mappings[t] {
            None => {}
            Some(Mapping::Column(c)) => {
                let k = key_at(rows.column(*c), i);
                if k != Key::Null {
                    out.insert(k);
                }
            }
            Some(Mapping::Via {
                col,
                target,
                ref_col,
            }) => {
                let v = key_at(rows.column(*col), i);
                if v == Key::Null {
                    return;
                }
                let ref_idx = self.state[*target].index_of(*ref_col).expect("indexed");
                for tpk in self.state[*target].lookup(ref_idx, &v) {
                    entity_of(self.state, self.mappings, *target, tpk, out);
                }
                let in_batch = self
                    .by_ref
                    .get(&(*target, *ref_col))
                    .and_then(|m| m.get(&v));
                for &j in in_batch.into_iter().flatten() {
                    self.entity_of(*target, j, out);
                }
            }
        }
    }
}

/// For each table, the slots (sorted, distinct) of the rows that belong to `entities`.
/// Each key is hashed once here, so the scans of every feature query that follow read
/// rows by slot.
pub(crate) fn scopes(
    state: &State,
    mappings: &[Option<Mapping>],
    entities: &HashSet<Key>,
) -> Vec<TableScope> {
    let tables = state.read();
    let mut memo: Vec<Option<Vec<(u32, Key)>>> = vec![None; tables.len()];
    for t in 0..tables.len() {
        scope_of(&tables, mappings, entities, t, &mut memo);
    }
    memo.into_iter()
        .zip(&tables)
        .map(|(rows, table)| TableScope {
            slots: rows
                .unwrap_or_default()
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            version: table.version(),
        })
        .collect()
}

/// Rows (slot, primary key) of table `t` belonging to `entities`, memoized per table.
fn scope_of(
    tables: &[RwLockReadGuard<'_, StateTable>],
    mappings: &[Option<Mapping>],
    entities: &HashSet<Key>,
    t: usize,
    memo: &mut Vec<Option<Vec<(u32, Key)>>>,
) {
    if memo[t].is_some() {
        return;
    }
    let mut rows = Vec::new();
    match &mappings[t] {
        None => {}
        Some(Mapping::Column(c)) => {
            let idx = tables[t].index_of(*c).expect("indexed");
            for e in entities {
                tables[t].lookup_slots(idx, e, &mut rows);
            }
        }
        Some(Mapping::Via {
            col,
            target,
            ref_col,
        }) => {
            scope_of(tables, mappings, entities, *target, memo);
            let idx = tables[t].index_of(*col).expect("indexed");
            let ref_idx = tables[*target].index_of(*ref_col).expect("indexed");
            let target_rows = memo[*target].as_ref().expect("computed");
            for (slot, pk) in target_rows {
                let v = tables[*target].indexed_value_at(*slot, pk, ref_idx);
                // NULL references nothing (and a join on it matches nothing).
                if *v != Key::Null {
                    tables[t].lookup_slots(idx, v, &mut rows);
                }
            }
        }
    }
    // Rows of a target sharing a referenced value select the same rows twice; sorted
    // slots also make the scans read the row store in order.
    rows.sort_unstable_by_key(|(slot, _)| *slot);
    rows.dedup_by_key(|(slot, _)| *slot);
    memo[t] = Some(rows);
}
