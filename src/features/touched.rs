//! Which entities a change batch touches: answered from the state's indexes and the
//! batch's own row images, so the cost follows the number of changed rows, not the
//! size of the tables.

use super::mapping::Mapping;
use crate::batch::ChangeBatch;
use crate::changelog::Changes;
use crate::state::{key_at, Changed, Key, State, StateTable};
use datafusion::common::{HashMap, HashSet};
use std::sync::RwLockReadGuard;

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
