//! Which rows of each table belong to a set of entities (the scope a feature query
//! scans), as row-store slots read from the state's indexes.

use super::mapping::Mapping;
use crate::state::{Key, State, StateTable, TableScope};
use datafusion::common::HashSet;
use std::sync::RwLockReadGuard;

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
        .map(|(rows, table)| {
            let slots = rows.unwrap_or_default().into_iter().map(|(s, _)| s);
            TableScope::new(slots.collect(), table.version())
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
