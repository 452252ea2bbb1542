//! Row bytes of a state table in one growing buffer, addressed by slot.
//!
//! One allocation per row (as `OwnedRow` does) costs a 40-byte handle in the hash map
//! plus the allocator's per-block overhead; at hundreds of thousands of rows that was
//! most of the state's memory. Here a row costs its bytes and a 16-byte span. Replaced
//! and deleted rows leave dead bytes behind, and the buffer is compacted once they are
//! the larger part, so the amortized cost per change stays constant.

/// Compaction is not worth it below this many dead bytes.
const MIN_COMPACT_BYTES: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct RowStore {
    data: Vec<u8>,
    /// Per slot: offset and length of its bytes in `data` (a free slot keeps a stale span).
    spans: Vec<(u64, u32)>,
    free: Vec<u32>,
    dead_bytes: usize,
}

impl RowStore {
    /// Stores `bytes` in a free or new slot.
    pub(crate) fn insert(&mut self, bytes: &[u8]) -> u32 {
        let span = self.append(bytes);
        match self.free.pop() {
            Some(slot) => {
                self.spans[slot as usize] = span;
                slot
            }
            None => {
                self.spans.push(span);
                u32::try_from(self.spans.len() - 1).expect("fewer than 2^32 rows per table")
            }
        }
    }

    /// Room for `slots` more rows without growing the slot table.
    pub(crate) fn reserve_slots(&mut self, slots: usize) {
        self.spans
            .reserve_exact(slots.saturating_sub(self.free.len()));
    }

    /// Room for `bytes` more row bytes without growing the buffer.
    pub(crate) fn reserve_bytes(&mut self, bytes: usize) {
        self.data.reserve_exact(bytes);
    }

    /// Frees `slot` (its bytes become dead).
    pub(crate) fn remove(&mut self, slot: u32) {
        self.dead_bytes += self.spans[slot as usize].1 as usize;
        self.free.push(slot);
        self.maybe_compact();
    }

    pub(crate) fn get(&self, slot: u32) -> &[u8] {
        let (offset, len) = self.spans[slot as usize];
        &self.data[offset as usize..offset as usize + len as usize]
    }

    /// Number of slots ever allocated (live or free): the bound of valid slot numbers.
    pub(crate) fn slots(&self) -> usize {
        self.spans.len()
    }

    pub(crate) fn clear(&mut self) {
        *self = RowStore::default();
    }

    fn append(&mut self, bytes: &[u8]) -> (u64, u32) {
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(bytes);
        (
            offset,
            u32::try_from(bytes.len()).expect("a row under 4 GiB"),
        )
    }

    /// Rewrites the live rows contiguously when most of the buffer is dead.
    fn maybe_compact(&mut self) {
        if self.dead_bytes < MIN_COMPACT_BYTES || self.dead_bytes * 2 < self.data.len() {
            return;
        }
        let mut free = vec![false; self.spans.len()];
        for &slot in &self.free {
            free[slot as usize] = true;
        }
        let mut data = Vec::with_capacity(self.data.len() - self.dead_bytes);
        for (slot, span) in self.spans.iter_mut().enumerate() {
            if free[slot] {
                *span = (0, 0);
                continue;
            }
            let (offset, len) = *span;
            let start = data.len() as u64;
            data.extend_from_slice(&self.data[offset as usize..offset as usize + len as usize]);
            *span = (start, len);
        }
        self.data = data;
        self.dead_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_compaction_keeps_live_rows() {
        let mut s = RowStore::default();
        let big = vec![7u8; 600 * 1024];
        let a = s.insert(b"alpha");
        let b = s.insert(&big);
        let c = s.insert(&big);
        s.remove(b);
        let d = s.insert(b"delta");
        assert_eq!(d, b, "a freed slot is reused");
        // Two dead copies of `big` are more than half the buffer: compacted.
        s.remove(c);
        assert_eq!(s.data.len(), 10);
        assert_eq!(s.get(a), b"alpha");
        assert_eq!(s.get(d), b"delta");
        let e = s.insert(b"echo");
        assert_eq!((e, s.get(e)), (c, &b"echo"[..]));
        assert_eq!(s.slots(), 3);
    }
}
