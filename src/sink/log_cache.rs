//! The `_delta_log` commits a lake has seen, so that "every log entry after version N"
//! can be answered without listing the log. Delta never deletes a commit at or after the
//! newest checkpoint (log cleanup only deletes versions below a checkpoint), and a commit
//! file never changes once written. So a commit seen once at a version after the newest
//! checkpoint is still there, and the entries after such a version are the cached run
//! plus whatever follows it, found by name until the first missing version.
//!
//! Before the newest checkpoint, log cleanup deletes commits older than the log retention.
//! A run of commits all younger than half of it is still there too, and answers a listing
//! that starts before the checkpoint (a writer's snapshot update right after a checkpoint
//! lists from its own, older one); see [`LogCache::still_there`].
//!
//! It also keeps the bodies of the commits this process wrote (the kernel reads each new
//! commit back, more than once, to move a snapshot on: on an object store each read is a
//! request) and what `_last_checkpoint` said, read again after [`CHECKPOINT_HINT_TTL`] or
//! as soon as this process writes it.

use bytes::Bytes;
use deltalake::logstore::object_store::{path::Path, ObjectMeta};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a `_last_checkpoint` read stays good. This process's own checkpoints replace
/// it at once; one written by another process (`pipeline maintain`) is seen this late,
/// and until then only the commits before it could be missing from an answer: log
/// cleanup deletes commits minutes old, never the ones a writer is moving past.
pub(crate) const CHECKPOINT_HINT_TTL: Duration = Duration::from_secs(1);

/// Commit bodies kept per log: enough for every reader to catch up after a commit.
const BODIES_KEPT: u64 = 64;

/// Commits kept before the newest checkpoint: more than a checkpoint interval, so that a
/// writer whose snapshot still rests on the checkpoint before finds its commits here.
const KEPT_BEFORE_CHECKPOINT: u64 = 1_000;

/// What is known of one `_delta_log`.
#[derive(Debug, Default)]
struct Log {
    /// Commit metadata by version (as a listing or `head` returned it: the kernel takes a
    /// commit's time from its `last_modified`).
    commits: BTreeMap<u64, ObjectMeta>,
    /// The newest commits this process wrote, by version.
    bodies: BTreeMap<u64, Bytes>,
    /// `_last_checkpoint` when last read: its metadata, the version it names.
    checkpoint: Option<(Instant, Option<ObjectMeta>, Option<u64>)>,
    /// Bumped whenever this process writes or deletes `_last_checkpoint`: a read that
    /// began before must not be kept.
    checkpoint_epoch: u64,
}

/// What is known of each log directory of a lake.
#[derive(Debug, Default)]
pub(crate) struct LogCache {
    logs: Mutex<HashMap<Path, Log>>,
    /// Commits younger than this cannot have been cleaned up: half the log retention
    /// (the other half a margin for clocks and slow readers). Zero when the retention is
    /// unknown: then nothing before the newest checkpoint is answered from here.
    unexpired: chrono::Duration,
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
    /// A cache for a lake whose tables keep commit files `log_retention` before cleanup
    /// may delete them (`delta.logRetentionDuration`).
    pub(crate) fn new(log_retention: Duration) -> LogCache {
        LogCache {
            logs: Mutex::default(),
            // A retention too long for chrono is as good as unknown: nothing trusted.
            unexpired: chrono::Duration::from_std(log_retention / 2).unwrap_or_default(),
        }
    }

    /// Whether every commit of `run` (a run from [`LogCache::run_from`]) is too young for
    /// log cleanup to have deleted it. Cleanup compares a file's `last_modified` with its
    /// own clock, as this does.
    pub(crate) fn still_there(&self, run: &[ObjectMeta]) -> bool {
        let oldest = run.iter().map(|m| m.last_modified).min();
        !self.unexpired.is_zero() && oldest.is_some_and(|t| chrono::Utc::now() - t < self.unexpired)
    }

    /// The cached commits from version `from` on, up to the first version not cached.
    pub(crate) fn run_from(&self, log: &Path, from: u64) -> Vec<ObjectMeta> {
        let logs = self.logs.lock().expect("log cache lock");
        let Some(known) = logs.get(log) else {
            return Vec::new();
        };
        let mut run = Vec::new();
        for (expected, (&version, meta)) in (from..).zip(known.commits.range(from..)) {
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
            .is_some_and(|known| known.commits.contains_key(&version))
    }

    /// Remembers the commit files among `metas` (which are in `log`).
    pub(crate) fn remember<'a>(&self, log: &Path, metas: impl IntoIterator<Item = &'a ObjectMeta>) {
        let mut logs = self.logs.lock().expect("log cache lock");
        let known = logs.entry(log.clone()).or_default();
        for meta in metas {
            if let Some(version) = commit_version(&meta.location) {
                known.commits.insert(version, meta.clone());
            }
        }
    }

    /// Keeps the body of a commit this process wrote at `location`.
    pub(crate) fn remember_body(&self, location: &Path, body: Bytes) {
        let (Some(version), Some(log)) = (commit_version(location), parent(location)) else {
            return;
        };
        let mut logs = self.logs.lock().expect("log cache lock");
        let known = logs.entry(log).or_default();
        known.bodies.insert(version, body);
        let keep_from = version.saturating_sub(BODIES_KEPT);
        known.bodies = known.bodies.split_off(&keep_from);
    }

    /// The commit at `location`, when both its metadata and its body are known.
    pub(crate) fn commit(&self, location: &Path) -> Option<(ObjectMeta, Bytes)> {
        let (version, log) = (commit_version(location)?, parent(location)?);
        let logs = self.logs.lock().expect("log cache lock");
        let known = logs.get(&log)?;
        Some((
            known.commits.get(&version)?.clone(),
            known.bodies.get(&version)?.clone(),
        ))
    }

    /// What `_last_checkpoint` in `log` said, if read less than [`CHECKPOINT_HINT_TTL`]
    /// ago: its metadata (None: there was none) and the version it names.
    pub(crate) fn checkpoint_hint(&self, log: &Path) -> Option<(Option<ObjectMeta>, Option<u64>)> {
        let logs = self.logs.lock().expect("log cache lock");
        let (read_at, meta, version) = logs.get(log)?.checkpoint.as_ref()?;
        (read_at.elapsed() < CHECKPOINT_HINT_TTL).then(|| (meta.clone(), *version))
    }

    /// The epoch to pass to [`LogCache::set_checkpoint_hint`] for a read of
    /// `_last_checkpoint` in `log` that begins now.
    pub(crate) fn checkpoint_epoch(&self, log: &Path) -> u64 {
        let logs = self.logs.lock().expect("log cache lock");
        logs.get(log).map_or(0, |known| known.checkpoint_epoch)
    }

    /// Keeps what a read of `_last_checkpoint` begun at `epoch` found, unless this process
    /// has written it since (the read may have seen the old one).
    pub(crate) fn set_checkpoint_hint(
        &self,
        log: &Path,
        epoch: u64,
        meta: Option<ObjectMeta>,
        version: Option<u64>,
    ) {
        let mut logs = self.logs.lock().expect("log cache lock");
        let known = logs.entry(log.clone()).or_default();
        if known.checkpoint_epoch == epoch {
            known.checkpoint = Some((Instant::now(), meta, version));
        }
    }

    /// `_last_checkpoint` at `location` was written or deleted here: read it again.
    pub(crate) fn forget_checkpoint_hint(&self, location: &Path) {
        if location.filename() != Some("_last_checkpoint") {
            return;
        }
        let Some(log) = parent(location) else {
            return;
        };
        let mut logs = self.logs.lock().expect("log cache lock");
        let known = logs.entry(log).or_default();
        known.checkpoint = None;
        known.checkpoint_epoch += 1;
    }

    /// `checkpoint` is the newest: forgets the commits well before it (cleanup may
    /// delete them; listings start at a checkpoint, and rarely at an older one).
    pub(crate) fn checkpointed_at(&self, log: &Path, checkpoint: u64) {
        let keep_from = checkpoint.saturating_sub(KEPT_BEFORE_CHECKPOINT);
        let mut logs = self.logs.lock().expect("log cache lock");
        if let Some(known) = logs.get_mut(log) {
            known.commits = known.commits.split_off(&keep_from);
            known.bodies = known.bodies.split_off(&keep_from);
        }
    }

    /// Forgets everything seen in `log`.
    pub(crate) fn forget_log(&self, log: &Path) {
        let mut logs = self.logs.lock().expect("log cache lock");
        if let Some(known) = logs.get_mut(log) {
            // The epoch stays (and moves on): a read begun before is not kept either.
            *known = Log {
                checkpoint_epoch: known.checkpoint_epoch + 1,
                ..Log::default()
            };
        }
    }

    /// Forgets a deleted file, if it is a cached commit.
    pub(crate) fn forget(&self, location: &Path) {
        let (Some(version), Some(log)) = (commit_version(location), parent(location)) else {
            return;
        };
        let mut logs = self.logs.lock().expect("log cache lock");
        if let Some(known) = logs.get_mut(&log) {
            known.commits.remove(&version);
            known.bodies.remove(&version);
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
        cache.checkpointed_at(&log, 5 + KEPT_BEFORE_CHECKPOINT);
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

    #[test]
    fn only_commits_younger_than_half_the_retention_are_still_there() {
        let log = Path::from("lake/t/_delta_log");
        let aged = |version, minutes| ObjectMeta {
            last_modified: chrono::Utc::now() - chrono::Duration::minutes(minutes),
            ..meta(&log, version)
        };
        let cache = LogCache::new(Duration::from_secs(600));
        assert!(cache.still_there(&[aged(3, 4), aged(4, 0)]));
        assert!(
            !cache.still_there(&[aged(3, 6), aged(4, 0)]),
            "one is too old"
        );
        assert!(!cache.still_there(&[]));
        let unknown = LogCache::default();
        assert!(!unknown.still_there(&[aged(3, 0)]), "no retention: never");
    }

    #[test]
    fn bodies_are_served_once_their_commit_is_known_and_go_with_it() {
        let cache = LogCache::default();
        let log = Path::from("lake/t/_delta_log");
        let at = meta(&log, 8);
        cache.remember_body(&at.location, Bytes::from_static(b"{}"));
        assert!(
            cache.commit(&at.location).is_none(),
            "metadata not seen yet"
        );
        cache.remember(&log, [&at]);
        assert_eq!(&cache.commit(&at.location).unwrap().1[..], b"{}");
        // Only the newest bodies are kept.
        let newer = meta(&log, 8 + BODIES_KEPT + 1);
        cache.remember(&log, [&newer]);
        cache.remember_body(&newer.location, Bytes::from_static(b"[]"));
        assert!(cache.commit(&at.location).is_none());
        assert!(cache.commit(&newer.location).is_some());
        cache.forget(&newer.location);
        assert!(cache.commit(&newer.location).is_none());
    }

    #[test]
    fn the_checkpoint_hint_is_kept_until_written_here_or_too_old() {
        let cache = LogCache::default();
        let log = Path::from("lake/t/_delta_log");
        assert!(cache.checkpoint_hint(&log).is_none());
        let epoch = cache.checkpoint_epoch(&log);
        cache.set_checkpoint_hint(&log, epoch, None, Some(7));
        assert_eq!(cache.checkpoint_hint(&log).unwrap().1, Some(7));
        cache.forget_checkpoint_hint(&log.clone().join("00000000000000000007.json"));
        assert!(
            cache.checkpoint_hint(&log).is_some(),
            "only _last_checkpoint drops it"
        );
        cache.forget_checkpoint_hint(&log.clone().join("_last_checkpoint"));
        assert!(cache.checkpoint_hint(&log).is_none());
        // A read that began before this process wrote it is not kept.
        cache.set_checkpoint_hint(&log, epoch, None, Some(7));
        assert!(cache.checkpoint_hint(&log).is_none());
        let epoch = cache.checkpoint_epoch(&log);
        cache.set_checkpoint_hint(&log, epoch, None, Some(9));
        assert_eq!(cache.checkpoint_hint(&log).unwrap().1, Some(9));
    }
}
