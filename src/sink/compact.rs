//! Compaction without a commit of its own. The maintainer rewrites a table's small files
//! into one in the background ([`rewrite`]) and hands the result to the sink through
//! [`Folds`]; the sink folds it into that table's next append (the removes and the new
//! file with `dataChange = false`, beside the append's rows). So maintenance never
//! commits beside an append: no "version already exists", no conflict check, no retry.
//!
//! [`Folds`] also carries the other thing the maintainer prepares for the writer: a table
//! freshly loaded from its newest checkpoint, which the writer continues from so that its
//! snapshot does not keep growing with every commit since it opened.

use super::LakeTable;
use arrow::array::{new_null_array, RecordBatch};
use arrow::datatypes::SchemaRef;
use deltalake::kernel::{Action, Add, Remove};
use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// Small files a compaction reads at a time.
const READS_AT_ONCE: usize = 8;

/// Small files rewritten into one, waiting to join the table's next append.
#[derive(Debug)]
pub(crate) struct Compaction {
    removes: Vec<Remove>,
    adds: Vec<Add>,
}

impl Compaction {
    /// The new files, relative to the table.
    pub(crate) fn added_paths(&self) -> Vec<String> {
        self.adds.iter().map(|a| a.path.clone()).collect()
    }

    pub(crate) fn files_removed(&self) -> usize {
        self.removes.len()
    }

    /// Every file it removes is still in `table` (a snapshot replacing the table since
    /// the plan, say, has removed them already: then it must not land).
    pub(crate) fn still_applies(&self, table: &DeltaTable) -> bool {
        let Ok(snapshot) = table.snapshot() else {
            return false;
        };
        let live: HashSet<String> = snapshot
            .log_data()
            .into_iter()
            .map(|f| f.path().into_owned())
            .collect();
        self.removes.iter().all(|r| live.contains(&r.path))
    }

    pub(crate) fn into_actions(self) -> Vec<Action> {
        let adds = self.adds.into_iter().map(Action::Add);
        adds.chain(self.removes.into_iter().map(Action::Remove))
            .collect()
    }
}

/// Files up to this size are the first tier: appends' files and what merging them
/// made, merged together at nearly every compaction.
const FIRST_TIER_BYTES: i64 = 64 * 1024;
/// Each next tier holds files up to this many times larger; a tier above the first is
/// merged once it has this many files, into (about) one file of the tier above.
const FAN_IN: usize = 8;

/// Which of the table's files to merge now, by size tier (as in size-tiered LSM
/// compaction): the lowest tier above the first that has [`FAN_IN`] files, else the
/// first tier when it has two or more; all of that tier, oldest first, up to
/// `target_bytes` in all. Files of `small_bytes` and more are left alone. So a
/// compaction rewrites about what was appended since the last one, not the whole table:
/// merging everything small each time rewrote a raw table's snapshot file (megabytes)
/// every few seconds, and its fsync and CPU held the appends beside it. The files stay
/// few: the first tier's plus fewer than `FAN_IN` per tier up to `small_bytes`.
pub(crate) fn plan(
    table: &DeltaTable,
    small_bytes: i64,
    target_bytes: i64,
) -> Result<Option<Vec<Remove>>, DeltaTableError> {
    let files: Vec<_> = table
        .snapshot()?
        .log_data()
        .into_iter()
        .filter(|f| f.size() < small_bytes)
        .collect();
    let sized: Vec<(i64, i64)> = files
        .iter()
        .map(|f| (f.size(), f.modification_time()))
        .collect();
    let picked = pick(&sized, target_bytes);
    Ok((!picked.is_empty()).then(|| {
        picked
            .into_iter()
            .map(|i| files[i].remove_action(false))
            .collect()
    }))
}

/// The tier of a file of `size` bytes: 0 up to [`FIRST_TIER_BYTES`], then one more per
/// factor of [`FAN_IN`].
fn tier(size: i64) -> u32 {
    let mut bound = FIRST_TIER_BYTES;
    let mut tier = 0;
    while size > bound {
        bound = bound.saturating_mul(FAN_IN as i64);
        tier += 1;
    }
    tier
}

/// [`plan`] on (size, modification time) pairs: the indexes to merge, none when no tier
/// is due.
fn pick(files: &[(i64, i64)], target_bytes: i64) -> Vec<usize> {
    let mut tiers: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &(size, _)) in files.iter().enumerate() {
        tiers.entry(tier(size)).or_default().push(i);
    }
    // A due tier above the first goes first: the first is due at nearly every round.
    let first = tiers.remove(&0).unwrap_or_default();
    let due = tiers.into_values().find(|members| members.len() >= FAN_IN);
    let Some(mut members) = due.or((first.len() >= 2).then_some(first)) else {
        return Vec::new();
    };
    members.sort_by_key(|&i| files[i].1);
    let mut total = 0;
    let picked: Vec<usize> = members
        .into_iter()
        .take_while(|&i| {
            total += files[i].0;
            total <= target_bytes
        })
        .collect();
    if picked.len() >= 2 {
        picked
    } else {
        Vec::new()
    }
}

/// Reads the files `removes` names and writes their rows as one new file of `table`
/// (not committed): the [`Compaction`] to fold into the next append.
pub(crate) async fn rewrite(
    table: &DeltaTable,
    removes: Vec<Remove>,
    target_bytes: u64,
) -> Result<Compaction, DeltaTableError> {
    let store = table.object_store();
    let mut writer = RecordBatchWriter::for_table(table)?.with_target_file_size(target_bytes);
    let schema = writer.arrow_schema();
    // Small files by definition: read whole (READS_AT_ONCE at a time, in order: on an
    // object store each read is a round trip), decoded in memory.
    let mut files = futures::stream::iter(&removes)
        .map(|remove| {
            let store = store.clone();
            let path = deltalake::Path::parse(&remove.path)
                .unwrap_or_else(|_| deltalake::Path::from(remove.path.as_str()));
            async move { store.get(&path).await?.bytes().await }
        })
        .buffered(READS_AT_ONCE);
    while let Some(bytes) = files.try_next().await? {
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()? {
            writer.write(to_schema(&batch?, &schema)?).await?;
        }
    }
    drop(files);
    let mut adds = writer.flush().await?;
    for add in &mut adds {
        add.data_change = false;
    }
    Ok(Compaction { removes, adds })
}

/// `batch` with `schema`'s columns: a column an older file lacks (added to the source
/// since) is NULL, and one whose type was widened is cast.
fn to_schema(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, DeltaTableError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast(c, field.data_type()),
            None => Ok(new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// What the maintainer has ready for one table's writer.
#[derive(Default)]
struct Slot {
    compaction: Option<Compaction>,
    /// The table version that last took (or dropped) a compaction: plans from an older
    /// snapshot would name files already removed.
    landed_at: u64,
    /// The table reloaded from its newest checkpoint.
    fresh: Option<DeltaTable>,
}

/// Shared between the maintainer, which fills it, and the sink, which takes from it at
/// a table's next append.
#[derive(Clone, Default)]
pub(crate) struct Folds {
    slots: Arc<Mutex<BTreeMap<LakeTable, Slot>>>,
}

impl Folds {
    fn with<T>(&self, path: &LakeTable, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        f(slots.entry(path.clone()).or_default())
    }

    /// A compaction is ready or the last one landed after `version`: no new plan yet.
    pub(crate) fn busy(&self, path: &LakeTable, version: u64) -> bool {
        self.with(path, |s| s.compaction.is_some() || version < s.landed_at)
    }

    pub(crate) fn offer_compaction(&self, path: &LakeTable, compaction: Compaction) {
        self.with(path, |s| s.compaction = Some(compaction));
    }

    pub(crate) fn take_compaction(&self, path: &LakeTable) -> Option<Compaction> {
        self.with(path, |s| s.compaction.take())
    }

    /// The compaction taken for `path` has landed (or was dropped) at `version`.
    pub(crate) fn landed(&self, path: &LakeTable, version: u64) {
        self.with(path, |s| s.landed_at = s.landed_at.max(version));
    }

    pub(crate) fn offer_fresh(&self, path: &LakeTable, table: DeltaTable) {
        self.with(path, |s| s.fresh = Some(table));
    }

    pub(crate) fn take_fresh(&self, path: &LakeTable) -> Option<DeltaTable> {
        self.with(path, |s| s.fresh.take())
    }

    /// Moves the reloaded table waiting for `path`'s writer forward to `newest`'s version
    /// (the writer's last commit the maintainer heard of), on the maintainer's thread:
    /// the writer then swaps it in with nothing, or a commit or two, left to replay on its
    /// own path. While it is out the writer keeps its own table for one more append.
    pub(crate) async fn advance_fresh(&self, path: &LakeTable, newest: &DeltaTable) {
        let Some(have) = newest.version() else {
            return;
        };
        let Some(mut fresh) = self.take_fresh(path) else {
            return;
        };
        if fresh.version().is_some_and(|v| v < have) {
            if let Err(e) = fresh.update_incremental(Some(have)).await {
                // The writer's own catch-up (`continue_from`) tries again or keeps its table.
                tracing::debug!(table = %path, error = %e, "reloaded table could not catch up");
            }
        }
        self.with(path, |s| {
            s.fresh.get_or_insert(fresh);
        });
    }
}

/// Moves `fresh` (loaded from a checkpoint a little while ago) forward to `current`'s
/// version and returns it; `current` when that fails or `fresh` is ahead (it cannot be,
/// the sink being the only writer, unless the table was written by someone else).
/// The snapshot moves over to `current`'s store: the maintainer's store is driven by the
/// maintainer's runtime.
pub(crate) async fn continue_from(current: DeltaTable, loaded: DeltaTable) -> DeltaTable {
    let mut fresh = DeltaTable::new(current.log_store());
    fresh.state = loaded.state;
    let (Some(have), Some(from)) = (current.version(), fresh.version()) else {
        return current;
    };
    if from > have {
        return current;
    }
    if from < have {
        if let Err(e) = fresh.update_incremental(Some(have)).await {
            tracing::debug!(error = %e, "fresh table could not catch up; keeping the current one");
            return current;
        }
    }
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: i64 = 1024;

    #[test]
    fn tiers_grow_by_the_fan_in() {
        assert_eq!(tier(1), 0);
        assert_eq!(tier(FIRST_TIER_BYTES), 0);
        assert_eq!(tier(FIRST_TIER_BYTES + 1), 1);
        assert_eq!(tier(FIRST_TIER_BYTES * FAN_IN as i64), 1);
        assert_eq!(tier(FIRST_TIER_BYTES * FAN_IN as i64 + 1), 2);
    }

    #[test]
    fn appends_merge_without_the_large_file_beside_them() {
        // A 2 MiB snapshot file, then twenty 4 KiB appends.
        let mut files = vec![(2048 * KIB, 0)];
        files.extend((1..=20).map(|t| (4 * KIB, t)));
        let picked = pick(&files, 128 * 1024 * KIB);
        assert_eq!(picked, (1..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_higher_tier_merges_only_once_it_has_the_fan_in() {
        let mid = 100 * KIB;
        let mut files: Vec<(i64, i64)> = (0..FAN_IN as i64 - 1).map(|t| (mid, t)).collect();
        files.push((4 * KIB, 100));
        assert!(
            pick(&files, i64::MAX).is_empty(),
            "one first-tier file, too few in tier 1"
        );
        files.push((mid, 50));
        let picked = pick(&files, i64::MAX);
        assert_eq!(picked.len(), FAN_IN);
        assert!(picked.iter().all(|&i| files[i].0 == mid));
        // Oldest first: the one added last (index FAN_IN, after the first-tier file).
        assert_eq!(picked.last(), Some(&FAN_IN));
    }

    #[test]
    fn a_due_higher_tier_goes_before_the_first_and_the_target_caps_a_merge() {
        let mut files: Vec<(i64, i64)> = (0..FAN_IN as i64).map(|t| (100 * KIB, t)).collect();
        files.extend((10..13).map(|t| (10 * KIB, t)));
        assert_eq!(pick(&files, i64::MAX), (0..FAN_IN).collect::<Vec<_>>());
        assert_eq!(pick(&files, 250 * KIB), vec![0, 1]);
        files.truncate(FAN_IN - 1);
        files.extend((10..13).map(|t| (10 * KIB, t)));
        assert_eq!(pick(&files, i64::MAX), vec![FAN_IN - 1, FAN_IN, FAN_IN + 1]);
    }
}
