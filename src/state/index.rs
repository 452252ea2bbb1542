//! Secondary indexes of one state table: for each column a feature mapping looks up,
//! value → primary keys, plus each row's indexed values by slot so that a row's own
//! values are read without hashing.

use super::key::{key_at, Key};
use arrow::array::ArrayRef;
use datafusion::common::HashMap;
use smallvec::SmallVec;

/// Primary keys of the rows holding one value of an indexed column: most values (a
/// loan's payment, a client's loans) have one or a few, kept inline.
type Postings = SmallVec<[Key; 1]>;

/// Answers "which rows have value v in column c" for the indexed columns. An indexed
/// column that is the primary key itself keeps no map: the table's own key → slot map
/// answers it, and the methods here say so by returning `None`.
pub(crate) struct Indexes {
    /// Indexed columns, by position in the table.
    columns: Vec<usize>,
    maps: Vec<Option<HashMap<Key, Postings>>>,
    /// Per slot, the value of each indexed column that has a map: `stride` entries per
    /// slot, `stored_at[idx]` locating index `idx`'s.
    values: Vec<Key>,
    stored_at: Vec<Option<usize>>,
    stride: usize,
}

impl Indexes {
    pub(crate) fn new(key_columns: &[usize], columns: Vec<usize>) -> Indexes {
        let maps: Vec<Option<HashMap<Key, Postings>>> = columns
            .iter()
            .map(|&c| (key_columns != [c]).then(HashMap::new))
            .collect();
        let mut stride = 0;
        let stored_at = maps
            .iter()
            .map(|m| {
                m.as_ref().map(|_| {
                    stride += 1;
                    stride - 1
                })
            })
            .collect();
        Indexes {
            columns,
            maps,
            values: Vec::new(),
            stored_at,
            stride,
        }
    }

    /// Position of `column` among the indexed columns, if indexed.
    pub(crate) fn position(&self, column: usize) -> Option<usize> {
        self.columns.iter().position(|&c| c == column)
    }

    /// Primary keys of rows whose indexed column `idx` equals `value`; `None` when that
    /// column is the primary key.
    pub(crate) fn postings(&self, idx: usize, value: &Key) -> Option<&[Key]> {
        let map = self.maps[idx].as_ref()?;
        Some(map.get(value).map(|p| p.as_slice()).unwrap_or(&[]))
    }

    /// The distinct non-NULL values of indexed column `idx`; `None` when that column is
    /// the primary key.
    pub(crate) fn distinct_values(&self, idx: usize) -> Option<Vec<Key>> {
        let map = self.maps[idx].as_ref()?;
        Some(map.keys().filter(|k| **k != Key::Null).cloned().collect())
    }

    /// Value of indexed column `idx` in the row at `slot`; `None` when that column is the
    /// primary key.
    pub(crate) fn value_at(&self, slot: u32, idx: usize) -> Option<&Key> {
        let at = self.stored_at[idx]?;
        Some(&self.values[slot as usize * self.stride + at])
    }

    /// Room for `rows` more rows (see `StateTable::expect_rows`).
    pub(crate) fn reserve(&mut self, rows: usize) {
        self.values.reserve_exact(rows * self.stride);
    }

    /// Indexes row `row` of `image` (the table's columns), stored at `slot` with
    /// primary key `pk`; `slots` is the row store's slot count.
    pub(crate) fn insert(
        &mut self,
        slot: u32,
        pk: &Key,
        image: &[ArrayRef],
        row: usize,
        slots: usize,
    ) {
        if self.values.len() < slots * self.stride {
            self.values.resize(slots * self.stride, Key::Null);
        }
        let at = slot as usize * self.stride;
        for (j, &c) in self.columns.iter().enumerate() {
            let (Some(map), Some(k)) = (&mut self.maps[j], self.stored_at[j]) else {
                continue;
            };
            let v = key_at(&image[c], row);
            map.entry(v.clone()).or_default().push(pk.clone());
            self.values[at + k] = v;
        }
    }

    /// Moves the row with primary key `pk` from slot `old` to `slot`, indexing row `row`
    /// of `image` there: only the values that changed move between postings (an update
    /// rarely changes the columns rows are looked up by).
    pub(crate) fn replace(
        &mut self,
        old: u32,
        slot: u32,
        pk: &Key,
        image: &[ArrayRef],
        row: usize,
        slots: usize,
    ) {
        if self.values.len() < slots * self.stride {
            self.values.resize(slots * self.stride, Key::Null);
        }
        let (from, to) = (old as usize * self.stride, slot as usize * self.stride);
        for (j, &c) in self.columns.iter().enumerate() {
            let (Some(map), Some(k)) = (&mut self.maps[j], self.stored_at[j]) else {
                continue;
            };
            let v = key_at(&image[c], row);
            let was = std::mem::replace(&mut self.values[from + k], Key::Null);
            if was != v {
                unpost(map, &was, pk);
                map.entry(v.clone()).or_default().push(pk.clone());
            }
            self.values[to + k] = v;
        }
    }

    /// Forgets the row at `slot` with primary key `pk`.
    pub(crate) fn remove(&mut self, slot: u32, pk: &Key) {
        let at = slot as usize * self.stride;
        for (map, k) in self.maps.iter_mut().zip(&self.stored_at) {
            let (Some(map), Some(k)) = (map, k) else {
                continue;
            };
            let v = std::mem::replace(&mut self.values[at + k], Key::Null);
            unpost(map, &v, pk);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.values.clear();
        self.maps.iter_mut().flatten().for_each(HashMap::clear);
    }
}
/// Takes `pk` out of the posting list of `value`, dropping the list once empty.
fn unpost(map: &mut HashMap<Key, Postings>, value: &Key, pk: &Key) {
    if let Some(pks) = map.get_mut(value) {
        pks.retain(|p| p != pk);
        if pks.is_empty() {
            map.remove(value);
        }
    }
}
