//! The current image of one source table, kept in Arrow's compact row format and
//! indexed by primary key and (see [`super::index`]) by the columns feature mappings
//! look up.

use super::index::Indexes;
use super::key::{composite_key_at, Key};
use super::store::RowStore;
use super::StateError;
use crate::changelog::{Changes, Op, LSN, SEQ};
use arrow::array::{ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::datatypes::{Int64Type, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};
use datafusion::common::hash_map::Entry;
use datafusion::common::HashMap;

pub struct StateTable {
    name: String,
    schema: SchemaRef,
    key_columns: Vec<usize>,
    converter: RowConverter,
    /// Primary key → slot of the row in `store` (and in `indexes`).
    rows: HashMap<Key, u32>,
    store: RowStore,
    indexes: Indexes,
    /// Rows announced by [`StateTable::expect_rows`], to size the row store on first use.
    expected_rows: Option<usize>,
    /// Counts changes: slots handed out at one version address other rows (or freed
    /// ones) at another, so scans check it.
    version: u64,
}

impl StateTable {
    pub fn new(
        name: &str,
        schema: SchemaRef,
        key_columns: Vec<usize>,
        indexed: Vec<usize>,
    ) -> Result<StateTable, StateError> {
        let fields = schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields).map_err(|e| StateError::Arrow {
            table: name.to_string(),
            source: e,
        })?;
        let indexes = Indexes::new(&key_columns, indexed);
        Ok(StateTable {
            name: name.to_string(),
            schema,
            converter,
            rows: HashMap::new(),
            store: RowStore::default(),
            indexes,
            expected_rows: None,
            version: 0,
            key_columns,
        })
    }

    /// The state's version: slots from [`StateTable::lookup_slots`] and
    /// [`StateTable::slot_of`] are valid for [`StateTable::scan`] while it is unchanged.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn key_columns(&self) -> &[usize] {
        &self.key_columns
    }

    /// Position of `column` among the indexed columns, if indexed.
    pub fn index_of(&self, column: usize) -> Option<usize> {
        self.indexes.position(column)
    }

    /// Primary keys of rows whose indexed column `idx` equals `value`.
    pub fn lookup(&self, idx: usize, value: &Key) -> &[Key] {
        match self.indexes.postings(idx, value) {
            Some(pks) => pks,
            // The primary key itself: at most one row, the map's own key.
            None => self
                .rows
                .get_key_value(value)
                .map(|(k, _)| std::slice::from_ref(k))
                .unwrap_or(&[]),
        }
    }

    /// Rows whose indexed column `idx` equals `value`, as `(slot, primary key)` pairs
    /// appended to `out`. Slots stay valid until the table is next changed.
    pub fn lookup_slots(&self, idx: usize, value: &Key, out: &mut Vec<(u32, Key)>) {
        match self.indexes.postings(idx, value) {
            Some(pks) => {
                for pk in pks {
                    if let Some(&slot) = self.rows.get(pk) {
                        out.push((slot, pk.clone()));
                    }
                }
            }
            None => {
                if let Some((pk, &slot)) = self.rows.get_key_value(value) {
                    out.push((slot, pk.clone()));
                }
            }
        }
    }

    /// Value of indexed column `idx` in the row at `slot`, whose primary key is `pk`
    /// (both from [`StateTable::lookup_slots`]): no hashing.
    pub fn indexed_value_at<'a>(&'a self, slot: u32, pk: &'a Key, idx: usize) -> &'a Key {
        self.indexes.value_at(slot, idx).unwrap_or(pk)
    }

    /// Slot of the row with primary key `pk`.
    pub fn slot_of(&self, pk: &Key) -> Option<u32> {
        self.rows.get(pk).copied()
    }

    /// The distinct non-NULL values of indexed column `idx`.
    pub fn indexed_values(&self, idx: usize) -> Vec<Key> {
        self.indexes
            .distinct_values(idx)
            .unwrap_or_else(|| self.rows.keys().cloned().collect())
    }

    /// Value of indexed column `idx` in the row with primary key `pk`.
    pub fn indexed_value(&self, pk: &Key, idx: usize) -> Option<&Key> {
        let (key, &slot) = self.rows.get_key_value(pk)?;
        Some(self.indexes.value_at(slot, idx).unwrap_or(key))
    }

    /// Sizes state for `rows` more rows about to be loaded (a snapshot), so that bulk
    /// loading does not grow each structure by doubling: the copies and the freed
    /// halves that growth leaves behind cost as much memory as the state itself.
    pub fn expect_rows(&mut self, rows: usize) {
        self.rows.reserve(rows);
        self.store.reserve_slots(rows);
        self.indexes.reserve(rows);
        self.expected_rows = Some(rows);
    }

    pub fn contains(&self, pk: &Key) -> bool {
        self.rows.contains_key(pk)
    }

    pub fn primary_keys(&self) -> impl Iterator<Item = &Key> {
        self.rows.keys()
    }

    /// Primary keys of the rows in `batch` (a raw change batch or plain rows).
    pub fn batch_keys(&self, batch: &RecordBatch) -> Vec<Key> {
        let cols: Vec<&ArrayRef> = self.key_columns.iter().map(|&c| batch.column(c)).collect();
        (0..batch.num_rows())
            .map(|i| composite_key_at(&cols, i))
            .collect()
    }

    /// Applies changes (row images with their ops, in change order; plain rows are
    /// inserts).
    pub fn apply(&mut self, changes: &Changes) -> Result<(), StateError> {
        self.version += 1;
        let batch = changes.rows();
        let n = self.schema.fields().len();
        let image: Vec<ArrayRef> = batch.columns()[..n].to_vec();
        let ops = changes.ops().iter().copied();
        let rows = self
            .converter
            .convert_columns(&image)
            .map_err(|e| StateError::Arrow {
                table: self.name.clone(),
                source: e,
            })?;
        let keys = self.batch_keys(batch);
        if let Some(expected) = self.expected_rows.take() {
            // Row sizes of the first batch stand for the rest.
            let bytes: usize = (0..rows.num_rows())
                .map(|i| rows.row(i).as_ref().len())
                .sum();
            let per_row = bytes / rows.num_rows().max(1) + 1;
            self.store
                .reserve_bytes(expected * per_row + expected * per_row / 10);
        }
        for (i, (pk, op)) in keys.into_iter().zip(ops).enumerate() {
            match op {
                Op::Insert | Op::Update => {
                    if pk == Key::Null || matches!(&pk, Key::Tuple(t) if t.contains(&Key::Null)) {
                        return Err(StateError::NullKey(self.name.clone()));
                    }
                    let slot = self.store.insert(rows.row(i).as_ref());
                    let slots = self.store.slots();
                    match self.rows.insert(pk.clone(), slot) {
                        Some(old) => {
                            self.indexes.replace(old, slot, &pk, &image, i, slots);
                            self.store.remove(old);
                        }
                        None => self.indexes.insert(slot, &pk, &image, i, slots),
                    }
                }
                Op::Delete => self.remove(&pk),
                Op::Truncate => {
                    self.rows.clear();
                    self.store.clear();
                    self.indexes.clear();
                }
            }
        }
        Ok(())
    }

    /// Applies raw changes read back in any order (state rebuilt from the raw mirror):
    /// a change takes effect only if it is later, by (`_lsn`, `_seq`), than the last one
    /// applied to its key, which `applied` remembers across calls (deletes included).
    /// So the history needs no sort, and memory follows the number of keys.
    pub fn apply_unordered(
        &mut self,
        batch: &RecordBatch,
        applied: &mut HashMap<Key, (i64, i64)>,
    ) -> Result<(), StateError> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>())
                .ok_or_else(|| StateError::Arrow {
                    table: self.name.clone(),
                    source: ArrowError::SchemaError(format!("no Int64 column {name}")),
                })
        };
        let (lsn, seq) = (column(LSN)?, column(SEQ)?);
        let keys = self.batch_keys(batch);
        let mut take: Vec<u32> = Vec::new();
        let mut in_batch: HashMap<&Key, usize> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let version = (lsn.value(i), seq.value(i));
            if applied.get(key).is_some_and(|&seen| seen >= version) {
                continue;
            }
            applied.insert(key.clone(), version);
            match in_batch.entry(key) {
                Entry::Occupied(e) => take[*e.get()] = i as u32,
                Entry::Vacant(e) => {
                    e.insert(take.len());
                    take.push(i as u32);
                }
            }
        }
        let latest =
            arrow::compute::take_record_batch(batch, &UInt32Array::from(take)).map_err(|e| {
                StateError::Arrow {
                    table: self.name.clone(),
                    source: e,
                }
            })?;
        let latest = Changes::decode(latest).map_err(|source| StateError::UnknownOp {
            table: self.name.clone(),
            source,
        })?;
        self.apply(&latest)
    }

    fn remove(&mut self, pk: &Key) {
        let Some(slot) = self.rows.remove(pk) else {
            return;
        };
        self.indexes.remove(slot, pk);
        self.store.remove(slot);
    }

    /// `changes` (in order) with their unchanged-TOAST placeholder cells
    /// (`(row, column)`, sorted by row) filled with the value the row had before: from an
    /// earlier change of the same key in this batch, else from state. Called before the
    /// batch is applied. A placeholder with no earlier image (the row is unknown, or its
    /// key changed in the same update) stays NULL, and a warning says so.
    pub fn fill_unchanged(
        &self,
        changes: Changes,
        cells: &[(usize, usize)],
    ) -> Result<Changes, StateError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Source {
            Batch(usize),
            State(usize),
            Missing,
        }
        let batch = changes.rows();
        let keys = self.batch_keys(batch);
        let ops = changes.ops();
        let mut latest: HashMap<&Key, usize> = HashMap::new();
        let mut resolved: HashMap<(usize, usize), Source> = HashMap::new();
        let mut from_state: Vec<u32> = Vec::new();
        let mut state_index: HashMap<&Key, usize> = HashMap::new();
        let mut missing = 0usize;
        let mut next = cells.iter().peekable();
        for (i, pk) in keys.iter().enumerate() {
            while let Some(&&(row, col)) = next.peek() {
                if row != i {
                    break;
                }
                next.next();
                let source = match latest.get(pk) {
                    Some(&k) => resolved.get(&(k, col)).copied().unwrap_or(Source::Batch(k)),
                    None => match self.rows.get(pk) {
                        Some(&slot) => {
                            let j = *state_index.entry(pk).or_insert_with(|| {
                                from_state.push(slot);
                                from_state.len() - 1
                            });
                            Source::State(j)
                        }
                        None => Source::Missing,
                    },
                };
                missing += usize::from(source == Source::Missing);
                resolved.insert((row, col), source);
            }
            match ops[i] {
                Op::Delete => {
                    latest.remove(pk);
                }
                Op::Truncate => latest.clear(),
                Op::Insert | Op::Update => {
                    latest.insert(pk, i);
                }
            }
        }
        if missing > 0 {
            tracing::warn!(table = %self.name, cells = missing,
                "unchanged TOAST values of rows with no earlier image in state: stored as NULL");
        }
        let err = |source| StateError::Arrow {
            table: self.name.clone(),
            source,
        };
        let parser = self.converter.parser();
        let old = self
            .converter
            .convert_rows(from_state.iter().map(|&s| parser.parse(self.store.get(s))))
            .map_err(err)?;
        let mut columns = batch.columns().to_vec();
        let mut by_column: Vec<usize> = cells.iter().map(|&(_, c)| c).collect();
        by_column.sort_unstable();
        by_column.dedup();
        for c in by_column {
            let indices: Vec<(usize, usize)> = (0..batch.num_rows())
                .map(|i| match resolved.get(&(i, c)) {
                    Some(Source::Batch(k)) => (0, *k),
                    Some(Source::State(j)) => (1, *j),
                    Some(Source::Missing) | None => (0, i),
                })
                .collect();
            columns[c] =
                arrow::compute::interleave(&[&columns[c], &old[c]], &indices).map_err(err)?;
        }
        let filled = RecordBatch::try_new(batch.schema(), columns).map_err(err)?;
        Ok(changes.with_rows(filled))
    }

    /// The rows in the given slots (from [`StateTable::lookup_slots`] or
    /// [`StateTable::slot_of`] since the last change), or every row.
    pub fn scan(&self, slots: Option<&[u32]>) -> Result<RecordBatch, StateError> {
        let parser = self.converter.parser();
        let row = |&slot: &u32| parser.parse(self.store.get(slot));
        let arrays = match slots {
            Some(slots) => self.converter.convert_rows(slots.iter().map(row)),
            None => self.converter.convert_rows(self.rows.values().map(row)),
        }
        .map_err(|e| StateError::Arrow {
            table: self.name.clone(),
            source: e,
        })?;
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| StateError::Arrow {
            table: self.name.clone(),
            source: e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn changes(ids: &[i32], owners: &[Option<i32>], ops: &[&str]) -> Changes {
        Changes::decode(rows(ids, owners, ops)).unwrap()
    }

    fn rows(ids: &[i32], owners: &[Option<i32>], ops: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("client_id", DataType::Int32, true),
            Field::new("_op", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(ids.to_vec())),
                Arc::new(Int32Array::from(owners.to_vec())),
                Arc::new(StringArray::from(ops.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn applies_changes_in_order_and_keeps_indexes_right() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("client_id", DataType::Int32, true),
        ]));
        // Column 0 is the primary key (answered from the rows), column 1 a real index.
        let mut t = StateTable::new("loan", schema, vec![0], vec![1, 0]).unwrap();
        t.apply(&changes(
            &[1, 2, 3],
            &[Some(10), Some(10), Some(20)],
            &["insert"; 3],
        ))
        .unwrap();
        assert_eq!(t.lookup(0, &Key::Int(10)).len(), 2);
        // Move loan 2 to client 20, delete loan 1, re-insert 1 for client 30.
        t.apply(&changes(
            &[2, 1, 1],
            &[Some(20), None, Some(30)],
            &["update", "delete", "insert"],
        ))
        .unwrap();
        assert!(t.lookup(0, &Key::Int(10)).is_empty());
        assert_eq!(t.lookup(0, &Key::Int(20)).len(), 2);
        assert_eq!(t.indexed_value(&Key::Int(1), 0), Some(&Key::Int(30)));
        assert_eq!(t.lookup(1, &Key::Int(2)), &[Key::Int(2)]);
        assert!(t.lookup(1, &Key::Int(99)).is_empty());
        let slots: Vec<u32> = [Key::Int(2), Key::Int(99)]
            .iter()
            .filter_map(|k| t.slot_of(k))
            .collect();
        let b = t.scan(Some(&slots)).unwrap();
        assert_eq!(b.num_rows(), 1);
        assert_eq!(
            b.column(1)
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(0),
            20
        );
        t.apply(&changes(&[0], &[None], &["truncate"])).unwrap();
        assert!(t.is_empty() && t.lookup(0, &Key::Int(20)).is_empty());
    }

    #[test]
    fn changes_read_back_out_of_order_keep_each_keys_latest() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("client_id", DataType::Int32, true),
        ]));
        let raw = |ids: &[i32], owners: &[Option<i32>], ops: &[&str], versions: &[(i64, i64)]| {
            let b = rows(ids, owners, ops);
            let mut cols = b.columns().to_vec();
            let mut fields: Vec<Field> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            for (name, values) in [
                (LSN, versions.iter().map(|v| v.0).collect::<Vec<_>>()),
                (SEQ, versions.iter().map(|v| v.1).collect()),
            ] {
                fields.push(Field::new(name, DataType::Int64, false));
                cols.push(Arc::new(arrow::array::Int64Array::from(values)));
            }
            RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
        };
        let mut t = StateTable::new("loan", schema, vec![0], vec![1, 0]).unwrap();
        let mut applied = HashMap::new();
        // Key 1: inserted (10,0), updated (20,1), deleted (20,2), inserted again (30,0).
        // Key 2: inserted (10,1), deleted (40,0). Key 3: inserted (10,2) only.
        // Read back newest-file-first, and within files out of order.
        t.apply_unordered(
            &raw(
                &[1, 2, 1],
                &[Some(13), None, None],
                &["insert", "delete", "delete"],
                &[(30, 0), (40, 0), (20, 2)],
            ),
            &mut applied,
        )
        .unwrap();
        t.apply_unordered(
            &raw(
                &[1, 3, 2, 1],
                &[Some(12), Some(30), Some(20), Some(10)],
                &["update", "insert", "insert", "insert"],
                &[(20, 1), (10, 2), (10, 1), (10, 0)],
            ),
            &mut applied,
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.indexed_value(&Key::Int(1), 0), Some(&Key::Int(13)));
        assert_eq!(t.indexed_value(&Key::Int(3), 0), Some(&Key::Int(30)));
        assert!(!t.contains(&Key::Int(2)));
        assert!(t.lookup(0, &Key::Int(12)).is_empty() && t.lookup(0, &Key::Int(20)).is_empty());
    }

    #[test]
    fn unchanged_toast_cells_take_the_previous_image() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("client_id", DataType::Int32, true),
        ]));
        let mut t = StateTable::new("loan", schema, vec![0], vec![]).unwrap();
        t.apply(&changes(&[1, 2], &[Some(10), Some(20)], &["insert"; 2]))
            .unwrap();
        // Row 0: key 1 from state; row 1: key 5 inserted in this batch; row 2: key 5's
        // cell from row 1; row 3: key 9 unknown (stays NULL); row 4: key 1 again, whose
        // previous image is row 0 (itself filled from state).
        let batch = changes(
            &[1, 5, 5, 9, 1],
            &[None, Some(50), None, None, None],
            &["update", "insert", "update", "update", "update"],
        );
        let filled = t
            .fill_unchanged(batch.clone(), &[(0, 1), (2, 1), (3, 1), (4, 1)])
            .unwrap();
        let owners = filled
            .rows()
            .column(1)
            .as_primitive::<arrow::datatypes::Int32Type>();
        let got: Vec<Option<i32>> = owners.iter().collect();
        assert_eq!(got, vec![Some(10), Some(50), Some(50), None, Some(10)]);
        assert_eq!(filled.rows().num_columns(), batch.rows().num_columns());
        assert_eq!(filled.ops(), batch.ops());
    }
}
