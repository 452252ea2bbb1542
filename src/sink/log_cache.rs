//! The `_delta_log` commits a lake has seen, so that "every log entry after version N"
//! can be answered without listing the log. Delta never deletes a commit at or after the
//! newest checkpoint (log cleanup only deletes versions below a checkpoint), and a commit
//! file never changes once written. So a commit seen once at a version after the newest
//! checkpoint is still there, and the entries after such a version are the cached run
//! plus whatever follows it, found by name until the first missing version.

use deltalake::logstore::object_store::{path::Path, ObjectMeta};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Commit metadata by log directory and version (as a listing or `head` returned it: the
/// kernel takes a commit's time from its `last_modified`).
#[derive(Debug, Default)]
pub(crate) struct LogCache {
    logs: Mutex<HashMap<Path, BTreeMap<u64, ObjectMeta>>>,
}

/// The version a log file name starts with (`{version:020}…`, as every commit and
/// checkpoint does, and as the kernel names the version it lists from).
pub(crate) fn leading_version(name: &str) -> Option<u64> {
    name.get(..20)
        .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// The version of a commit file `{version:020}.json` directly in a `_delta_log`.
fn commit_version(location: &Path) -> Option<u64> {
    let name = location.filename()?;
    leading_version(name).filter(|_| name.len() == 25 && name.ends_with(".json"))
}

impl LogCache {
    /// The cached commits from version `from` on, up to the first version not cached.
    pub(crate) fn run_from(&self, log: &Path, from: u64) -> Vec<ObjectMeta> {
        let logs = self.logs.lock().expect("log cache lock");
        let Some(commits) = logs.get(log) else {
            return Vec::new();
        };
        let mut run = Vec::new();
        for (expected, (&version, meta)) in (from..).zip(commits.range(from..)) {
            if version != expected {
                break;
            }
            run.push(meta.clone());
        }
        run
    }

    /// Whether the commit at `version` has been seen.
    pub(crate) fn knows(&self, log: &Path, version: u64) -> bool {
        let logs = self.logs.lock().expect("log cache lock");
        logs.get(log)
            .is_some_and(|commits| commits.contains_key(&version))
    }

    /// Remembers the commit files among `metas` (which are in `log`).
    pub(crate) fn remember<'a>(&self, log: &Path, metas: impl IntoIterator<Item = &'a ObjectMeta>) {
        let mut logs = self.logs.lock().expect("log cache lock");
        let commits = logs.entry(log.clone()).or_default();
        for meta in metas {
            if let Some(version) = commit_version(&meta.location) {
                commits.insert(version, meta.clone());
            }
        }
    }

    /// Forgets the commits before `version` (cleanup may delete them; none is asked for).
    pub(crate) fn forget_before(&self, log: &Path, version: u64) {
        let mut logs = self.logs.lock().expect("log cache lock");
        if let Some(commits) = logs.get_mut(log) {
            *commits = commits.split_off(&version);
        }
    }

    /// Forgets everything seen in `log`.
    pub(crate) fn forget_log(&self, log: &Path) {
        self.logs.lock().expect("log cache lock").remove(log);
    }

    /// Forgets a deleted file, if it is a cached commit.
    pub(crate) fn forget(&self, location: &Path) {
        let (Some(version), Some(log)) = (commit_version(location), parent(location)) else {
            return;
        };
        let mut logs = self.logs.lock().expect("log cache lock");
        if let Some(commits) = logs.get_mut(&log) {
            commits.remove(&version);
        }
    }
}

/// The directory holding `location`.
fn parent(location: &Path) -> Option<Path> {
    let mut parts: Vec<_> = location.parts().collect();
    parts.pop()?;
    Some(Path::from_iter(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(log: &Path, version: u64) -> ObjectMeta {
        ObjectMeta {
            location: log.clone().join(format!("{version:020}.json").as_str()),
            last_modified: chrono::Utc::now(),
            size: 10,
            e_tag: None,
            version: None,
        }
    }

    #[test]
    fn a_run_stops_at_the_first_version_not_seen() {
        let cache = LogCache::default();
        let log = Path::from("lake/t/_delta_log");
        let seen: Vec<ObjectMeta> = [3, 4, 5, 7].iter().map(|&v| meta(&log, v)).collect();
        cache.remember(&log, &seen);
        let versions = |from| -> Vec<u64> {
            cache
                .run_from(&log, from)
                .iter()
                .filter_map(|m| commit_version(&m.location))
                .collect()
        };
        assert_eq!(versions(3), [3, 4, 5]);
        assert_eq!(versions(6), Vec::<u64>::new());
        assert_eq!(versions(7), [7]);
        cache.forget(&seen[1].location);
        assert_eq!(versions(3), [3]);
        cache.forget_before(&log, 5);
        assert_eq!(versions(3), Vec::<u64>::new());
        assert_eq!(versions(5), [5]);
        // Another table's log is apart; a checkpoint or a staging file is no commit.
        assert!(cache
            .run_from(&Path::from("lake/u/_delta_log"), 5)
            .is_empty());
        for name in [
            "00000000000000000005.checkpoint.parquet",
            "00000000000000000005.json#1",
            "_last_checkpoint",
        ] {
            assert_eq!(commit_version(&log.clone().join(name)), None, "{name}");
        }
    }
}
