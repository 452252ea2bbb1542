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

/// The table's files smaller than `small_bytes`, oldest first, up to `target_bytes` in
/// all; `None` when fewer than two (nothing to gain).
pub(crate) fn plan(
    table: &DeltaTable,
    small_bytes: i64,
    target_bytes: i64,
) -> Result<Option<Vec<Remove>>, DeltaTableError> {
    let mut small: Vec<_> = table
        .snapshot()?
        .log_data()
        .into_iter()
        .filter(|f| f.size() < small_bytes)
        .collect();
    small.sort_by_key(|f| f.modification_time());
    let mut total = 0;
    let picked: Vec<Remove> = small
        .iter()
        .take_while(|f| {
            total += f.size();
            total <= target_bytes
        })
        .map(|f| f.remove_action(false))
        .collect();
    Ok((picked.len() >= 2).then_some(picked))
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
