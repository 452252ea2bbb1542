//! `lake.maintenance`: checkpoints, compaction and vacuum beside the appends.

use super::Invalid;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Write a checkpoint after this many commits to a table (0 = never).
    pub checkpoint_every_commits: u64,
    /// Compact a table's small files after this many commits (0 = never). The rewrite
    /// runs in the background and lands with the table's next append, so a short cycle
    /// keeps the number of files (and the cost of each commit) small.
    pub compact_every_commits: u64,
    /// Files smaller than this are compacted.
    pub small_file_mb: u64,
    /// Size compaction aims for.
    pub target_file_mb: u64,
    /// Vacuum (delete files no table version within the retention references) this often
    /// (0 = never in the background; `pipeline maintain` vacuums too).
    pub vacuum_every_minutes: u64,
    /// Vacuum keeps files removed less than this long ago for readers of old versions.
    pub vacuum_retention_hours: u64,
    /// Commit files older than this that precede a checkpoint are deleted (time travel
    /// reaches back this far). Set on each table as `delta.logRetentionDuration`.
    pub log_retention_minutes: u64,
    /// Checkpoints keep the `remove` tombstones of files removed less than this long ago.
    /// Every compaction leaves one per small file, and a reader loads them all, so a long
    /// window slows every read of a table fed every 200 ms. Vacuum does not need them (it
    /// lists the files). Set on each table as `delta.deletedFileRetentionDuration`.
    pub tombstone_retention_minutes: u64,
    /// Write a state checkpoint (each table's newest row per key, which a restart reads
    /// instead of the whole history) after this many changes (0 = never).
    pub state_checkpoint_every_changes: u64,
    /// ... or after this many minutes with any change (0 = only by changes).
    pub state_checkpoint_every_minutes: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            checkpoint_every_commits: 100,
            compact_every_commits: 20,
            small_file_mb: 4,
            target_file_mb: 128,
            vacuum_every_minutes: 60,
            vacuum_retention_hours: 168,
            log_retention_minutes: 10,
            tombstone_retention_minutes: 1,
            state_checkpoint_every_changes: 200_000,
            state_checkpoint_every_minutes: 10,
        }
    }
}

impl MaintenanceConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.vacuum_retention_hours < 1 {
            // Vacuum deletes unreferenced files older than this; a shorter window could
            // delete the Parquet files of an append that has not committed yet.
            return Err(Invalid::at("vacuum_retention_hours", "must be at least 1"));
        }
        if self.small_file_mb > self.target_file_mb {
            return Err(Invalid::at(
                "small_file_mb",
                "must not exceed target_file_mb (a compacted file would be small again)",
            ));
        }
        Ok(())
    }

    /// The Delta table properties that carry this configuration to every writer and
    /// checkpoint of a table.
    pub fn table_properties(&self) -> HashMap<String, String> {
        HashMap::from([
            (
                "delta.logRetentionDuration".to_string(),
                format!("interval {} minutes", self.log_retention_minutes),
            ),
            (
                "delta.deletedFileRetentionDuration".to_string(),
                format!("interval {} minutes", self.tombstone_retention_minutes),
            ),
        ])
    }
}
