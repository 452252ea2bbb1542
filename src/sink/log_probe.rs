//! Listing a table's `_delta_log` from a version on, without listing it. A commit lists
//! the log twice (the latest version before writing, then the snapshot update after),
//! each time "every entry after version N", where N is the writer's version or its
//! snapshot's checkpoint. A listing costs as much as the log has entries (the local store
//! reads every file's metadata) or more (s3s-fs walks the whole bucket), and a table
//! committed every 200 ms with minutes of log retention keeps thousands. After the newest
//! checkpoint the log is answered from the commits this lake has seen ([`LogCache`]) plus
//! those found by name after them; at or before it (a table load, or the window until
//! the writer continues from a new checkpoint) the log is listed: on a local lake by one
//! `read_dir` that reads metadata only for the entries after the offset.

use super::log_cache::{leading_version, LogCache};
use super::log_files::{in_memory, whole, LogFiles};
use deltalake::logstore::object_store::{
    self, local::LocalFileSystem, path::Path, CopyOptions, GetOptions, GetResult, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;

/// Wraps the root store of a lake (see the module doc).
#[derive(Debug)]
pub(crate) struct LogProbe {
    /// The wrapped store, and on a local lake the filesystem: maps object paths to files
    /// for inline reads and to directories for a listing by `read_dir`.
    files: LogFiles,
    /// Shared by every table the lake opens.
    cache: Arc<LogCache>,
}

impl LogProbe {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, local: bool, cache: Arc<LogCache>) -> LogProbe {
        let files = LogFiles {
            inner,
            local: local.then(LocalFileSystem::new),
        };
        LogProbe { files, cache }
    }
}

fn io_error(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LogProbe",
        source: Box::new(e),
    }
}

/// The files directly in `dir` (as `prefix`) whose path sorts after `offset`: one
/// `read_dir` filtered by name before any metadata is read (the local store's listing
/// reads every file's). Skips `object_store`'s in-flight staging files (`name#n`).
fn read_after(
    dir: &std::path::Path,
    prefix: &Path,
    offset: &Path,
) -> object_store::Result<Vec<ObjectMeta>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| !n.contains('#')) else {
            continue;
        };
        let location = prefix.clone().join(name);
        if location.as_ref() <= offset.as_ref() {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Deleted by log cleanup since the read_dir.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(e)),
        };
        if !meta.is_file() {
            continue;
        }
        out.push(ObjectMeta {
            location,
            last_modified: meta.modified().map_err(io_error)?.into(),
            size: meta.len(),
            e_tag: None,
            version: None,
        });
    }
    out.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(out)
}

impl std::fmt::Display for LogProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogProbe({})", self.files.inner)
    }
}

/// The entries after `offset` in `log`, when it lies at or after the newest checkpoint
/// (which `_last_checkpoint` names): that checkpoint if the offset is its version (a
/// table load), the cached commits from the offset's version on, the ones after them
/// found by name until one is missing, and `_last_checkpoint`. Before the newest
/// checkpoint (a writer's snapshot update lists from its own, older checkpoint) cleanup
/// may be deleting: answered only when the cached run from the offset is too young for
/// it ([`LogCache::still_there`]), and without the checkpoints in between, which the
/// kernel needs no more than it needs the commits' own replay (they are only shortcuts;
/// the writer takes the table the maintainer loads from the new one at its next append).
/// `None` (list instead) when the offset names no version, lies before the newest
/// checkpoint with no such run, follows no commit this lake has seen, or the newest
/// cached commit has changed (the table was made again).
async fn cached_after(
    files: &LogFiles,
    cache: &LogCache,
    log: &Path,
    offset: &Path,
) -> object_store::Result<Option<Vec<ObjectMeta>>> {
    let Some(first) = offset.filename().and_then(leading_version) else {
        return Ok(None);
    };
    let at = |file: String| log.clone().join(file.as_str());
    let (hint, checkpointed) = read_last_checkpoint(files, cache, log).await?;
    let run = cache.run_from(log, first);
    if let Some(checkpoint) = checkpointed {
        if first < checkpoint && !cache.still_there(&run) {
            return Ok(None);
        }
        cache.checkpointed_at(log, checkpoint);
    }
    if run.is_empty() && !first.checked_sub(1).is_some_and(|v| cache.knows(log, v)) {
        // Nothing seen here yet: how many versions follow is unknown, so list once.
        return Ok(None);
    }
    if let Some(last) = run.last() {
        // Commits are immutable, but a table can be deleted and made again at the same
        // path: the newest cached one must still be the file it was (to the second, the
        // precision an S3 HEAD gives), else this log is forgotten and listed.
        let same = |now: &ObjectMeta| {
            now.size == last.size && now.last_modified.timestamp() == last.last_modified.timestamp()
        };
        if !files
            .head(&last.location)
            .await?
            .is_some_and(|now| same(&now))
        {
            cache.forget_log(log);
            return Ok(None);
        }
    }
    let mut next = first + run.len() as u64;
    let mut found = Vec::with_capacity(run.len() + 2);
    if checkpointed == Some(first) {
        // A table load from the checkpoint: its file first (a multi-part one is listed).
        match files
            .head(&at(format!("{first:020}.checkpoint.parquet")))
            .await?
        {
            Some(meta) => found.push(meta),
            None => return Ok(None),
        }
    }
    found.extend(run);
    while let Some(meta) = files.head(&at(format!("{next:020}.json"))).await? {
        cache.remember(log, [&meta]);
        found.push(meta);
        next += 1;
    }
    found.retain(|m| m.location.as_ref() > offset.as_ref());
    found.extend(hint);
    found.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(Some(found))
}

/// `_last_checkpoint`'s metadata and the version it names, if it is there. An unreadable
/// one (being replaced) names no version before any: every offset is then listed.
async fn read_last_checkpoint(
    files: &LogFiles,
    cache: &LogCache,
    log: &Path,
) -> object_store::Result<(Option<ObjectMeta>, Option<u64>)> {
    if let Some(known) = cache.checkpoint_hint(log) {
        return Ok(known);
    }
    let epoch = cache.checkpoint_epoch(log);
    let Some((meta, bytes)) = files.get(&log.clone().join("_last_checkpoint")).await? else {
        cache.set_checkpoint_hint(log, epoch, None, None);
        return Ok((None, None));
    };
    let version = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("version")?.as_u64());
    let version = Some(version.unwrap_or(u64::MAX));
    cache.set_checkpoint_hint(log, epoch, Some(meta.clone()), version);
    Ok((Some(meta), version))
}

/// Every entry after `offset` in `log`, listed: on a local lake (`dir`) by `read_dir`.
async fn list_after(
    store: Arc<dyn ObjectStore>,
    dir: Option<std::path::PathBuf>,
    log: Path,
    offset: Path,
) -> object_store::Result<Vec<ObjectMeta>> {
    match dir {
        Some(dir) => tokio::task::spawn_blocking(move || read_after(&dir, &log, &offset))
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?,
        None => {
            store
                .list_with_offset(Some(&log), &offset)
                .try_collect()
                .await
        }
    }
}

/// Times one request in [`crate::metrics::OBJECT_STORE_SECONDS`].
async fn timed<T>(op: &'static str, request: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = request.await;
    metrics::histogram!(crate::metrics::OBJECT_STORE_SECONDS, "op" => op)
        .record(started.elapsed().as_secs_f64());
    out
}

#[async_trait::async_trait]
impl ObjectStore for LogProbe {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let body = bytes::Bytes::from(payload.clone());
        // Before and after: no read of `_last_checkpoint` that overlaps the write is kept.
        self.cache.forget_checkpoint_hint(location);
        let put = timed("put", self.files.inner.put_opts(location, payload, opts)).await;
        self.cache.forget_checkpoint_hint(location);
        let put = put?;
        self.cache.remember_body(location, body);
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.files.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if let Some((meta, bytes)) = self.cache.commit(location).filter(|_| whole(&options)) {
            return Ok(in_memory(meta, bytes, options.head));
        }
        if let Some(got) = self.files.get_inline(location, &options) {
            return got;
        }
        let op = if options.head { "head" } else { "get" };
        timed(op, self.files.inner.get_opts(location, options)).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let cache = self.cache.clone();
        self.files
            .inner
            .delete_stream(locations)
            .inspect_ok(move |deleted| {
                cache.forget(deleted);
                cache.forget_checkpoint_hint(deleted);
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.files.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let Some(log) = prefix.filter(|p| p.filename() == Some("_delta_log")) else {
            return self.files.inner.list_with_offset(prefix, offset);
        };
        let (files, log, offset) = (self.files.clone(), log.clone(), offset.clone());
        let cache = self.cache.clone();
        let dir = self
            .files
            .local
            .as_ref()
            .and_then(|fs| fs.path_to_filesystem(&log).ok());
        futures::stream::once(async move {
            let started = std::time::Instant::now();
            let (metas, op) = match cached_after(&files, &cache, &log, &offset).await? {
                Some(found) => (found, "list_log"),
                None => {
                    let listed = list_after(files.inner, dir, log.clone(), offset).await?;
                    cache.remember(&log, &listed);
                    (listed, "list_log_listed")
                }
            };
            metrics::histogram!(crate::metrics::OBJECT_STORE_SECONDS, "op" => op)
                .record(started.elapsed().as_secs_f64());
            Ok::<_, object_store::Error>(futures::stream::iter(metas.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        timed("list", self.files.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.cache.forget_checkpoint_hint(to);
        timed("copy", self.files.inner.copy_opts(from, to, options)).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.cache.forget_checkpoint_hint(to);
        timed("rename", self.files.inner.rename_opts(from, to, options)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::logstore::object_store::ObjectStoreExt;

    async fn both(
        fast: &LogProbe,
        local: &Arc<dyn ObjectStore>,
        prefix: &Path,
        offset: &str,
    ) -> (Vec<String>, Vec<String>) {
        let offset = prefix.clone().join(offset);
        let names = |metas: Vec<ObjectMeta>| -> Vec<String> {
            metas.into_iter().map(|m| m.location.to_string()).collect()
        };
        let mut want: Vec<ObjectMeta> = local
            .list_with_offset(Some(prefix), &offset)
            .try_collect()
            .await
            .unwrap();
        want.sort_by(|a, b| a.location.cmp(&b.location));
        let mut got: Vec<ObjectMeta> = fast
            .list_with_offset(Some(prefix), &offset)
            .try_collect()
            .await
            .unwrap();
        // A listing's order is unspecified; the probe's is sorted.
        got.sort_by(|a, b| a.location.cmp(&b.location));
        assert!(got.iter().all(|m| m.size > 0));
        (names(got), names(want))
    }

    fn write(log: &std::path::Path, name: &str, body: &str) {
        std::fs::write(log.join(name), body).unwrap();
    }

    fn write_commits(log: &std::path::Path, versions: impl IntoIterator<Item = u64>) {
        for v in versions {
            write(log, &format!("{v:020}.json"), "{}");
        }
    }

    /// A `_delta_log` directory, the local store and a probe with its own cache on it.
    struct Fixture {
        _dir: tempfile::TempDir,
        log: std::path::PathBuf,
        local: Arc<dyn ObjectStore>,
        fast: LogProbe,
        prefix: Path,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("_delta_log");
        std::fs::create_dir_all(&log).unwrap();
        let local: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new());
        Fixture {
            fast: LogProbe::new(local.clone(), true, Arc::default()),
            prefix: Path::from_filesystem_path(&log).unwrap(),
            _dir: dir,
            log,
            local,
        }
    }

    #[tokio::test]
    async fn lists_the_log_after_an_offset_like_the_local_store() {
        let Fixture {
            _dir,
            log,
            local,
            fast,
            prefix,
        } = fixture();
        std::fs::create_dir_all(log.join("_staged")).unwrap();
        // Versions 3..=7 (0..=2 cleaned up), a checkpoint at 5, an in-flight staging file.
        write_commits(&log, 3..8);
        write(&log, "00000000000000000005.checkpoint.parquet", "x");
        write(&log, "_last_checkpoint", r#"{"version":5,"size":3}"#);
        write(&log, "00000000000000000008.json#1", "x");
        // Listed at or before the checkpoint, from the cache and by name after it; from a
        // commit file, and from a bare version (as the kernel asks).
        for offset in [
            "00000000000000000004.json",
            "00000000000000000005",
            "00000000000000000006",
            "00000000000000000007.json",
        ] {
            let (got, want) = both(&fast, &local, &prefix, offset).await;
            assert_eq!(got, want, "after {offset}");
        }
        let (got, _) = both(&fast, &local, &prefix, "00000000000000000006").await;
        assert_eq!(got.len(), 3, "6, 7, _last_checkpoint: {got:?}");
        // A commit written since is found by name.
        write(&log, "00000000000000000008.json", "{}");
        let (got, want) = both(&fast, &local, &prefix, "00000000000000000007.json").await;
        assert_eq!(got, want);
        assert_eq!(got.len(), 2, "8, _last_checkpoint: {got:?}");
        // Before the log (cleaned versions) or not a version: the whole directory is read.
        for offset in ["00000000000000000001.json", "_a"] {
            let (got, want) = both(&fast, &local, &prefix, offset).await;
            assert_eq!(got, want, "after {offset}");
        }
    }

    #[tokio::test]
    async fn commits_after_the_checkpoint_come_from_the_cache_until_deleted_through_it() {
        let Fixture {
            _dir,
            log,
            local,
            fast,
            prefix,
        } = fixture();
        write_commits(&log, 0..4);
        let (got, want) = both(&fast, &local, &prefix, "00000000000000000001").await;
        assert_eq!((got.len(), &got), (3, &want));
        // Seen once, a commit is not looked up again: one removed behind the lake's back
        // (which Delta never does after the newest checkpoint) is still answered.
        std::fs::remove_file(log.join("00000000000000000001.json")).unwrap();
        let (got, _) = both(&fast, &local, &prefix, "00000000000000000001").await;
        assert_eq!(got.len(), 3, "1, 2, 3 from the cache: {got:?}");
        // Deleted through the lake, it is forgotten: the run stops before it.
        let three = prefix.clone().join("00000000000000000003.json");
        fast.delete(&three).await.unwrap();
        let (got, _) = both(&fast, &local, &prefix, "00000000000000000001").await;
        assert_eq!(got.len(), 2, "1, 2: {got:?}");
    }

    #[tokio::test]
    async fn a_table_made_again_at_the_same_path_is_listed_afresh() {
        let Fixture {
            _dir,
            log,
            local,
            fast,
            prefix,
        } = fixture();
        write_commits(&log, 0..6);
        let (got, _) = both(&fast, &local, &prefix, "00000000000000000001").await;
        assert_eq!(got.len(), 5);
        // Deleted behind the lake's back and made again, shorter, then longer.
        std::fs::remove_dir_all(&log).unwrap();
        std::fs::create_dir_all(&log).unwrap();
        write_commits(&log, 0..3);
        let (got, want) = both(&fast, &local, &prefix, "00000000000000000001").await;
        assert_eq!((got.len(), &got), (2, &want));
        for v in 3..6u64 {
            write(&log, &format!("{v:020}.json"), "{\"again\":1}");
        }
        let (got, want) = both(&fast, &local, &prefix, "00000000000000000001").await;
        assert_eq!((got.len(), &got), (5, &want));
        let sizes: Vec<u64> = fast
            .list_with_offset(Some(&prefix), &prefix.clone().join("00000000000000000004"))
            .map_ok(|m| m.size)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(sizes, [11, 11], "4 and 5 as made again");
    }

    #[tokio::test]
    async fn before_the_checkpoint_young_commits_seen_answer_and_old_ones_are_listed() {
        let Fixture {
            _dir,
            log,
            local,
            prefix,
            ..
        } = fixture();
        let fast = LogProbe::new(
            local.clone(),
            true,
            Arc::new(LogCache::new(std::time::Duration::from_secs(600))),
        );
        write_commits(&log, 3..8);
        let (got, want) = both(&fast, &local, &prefix, "00000000000000000003").await;
        assert_eq!((got.len(), &got), (5, &want), "listed once, then known");
        // A checkpoint at 5 since (written here: the hint is read again at once), and a
        // writer still on its older one (at 2) lists from 3.
        write(&log, "00000000000000000005.checkpoint.parquet", "x");
        let hint = prefix.clone().join("_last_checkpoint");
        let body = r#"{"version":5,"size":3}"#;
        fast.put(&hint, body.into()).await.unwrap();
        std::fs::remove_file(log.join("00000000000000000004.json")).unwrap();
        let (got, mut want) = both(&fast, &local, &prefix, "00000000000000000003").await;
        want.retain(|n| !n.ends_with(".checkpoint.parquet"));
        want.push(prefix.clone().join("00000000000000000004.json").to_string());
        want.sort();
        assert_eq!(
            got, want,
            "from the cache (4 still answered), the checkpoint left out"
        );
        // A run older than half the retention may be partly gone: listed.
        let aged = LogProbe::new(
            local.clone(),
            true,
            Arc::new(LogCache::new(std::time::Duration::from_secs(600))),
        );
        write_commits(&log, [4]);
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(400);
        let three = std::fs::File::options()
            .write(true)
            .open(log.join("00000000000000000003.json"))
            .unwrap();
        three.set_modified(old).unwrap();
        let (got, want) = both(&aged, &local, &prefix, "00000000000000000003").await;
        assert_eq!((got.len(), &got), (7, &want), "listed: nothing known yet");
        std::fs::remove_file(log.join("00000000000000000004.json")).unwrap();
        let (got, want) = both(&aged, &local, &prefix, "00000000000000000003").await;
        assert_eq!((got.len(), &got), (6, &want), "listed again: 3 is too old");
    }

    #[tokio::test]
    async fn a_gap_left_by_a_running_log_cleanup_is_listed_not_taken_for_the_end() {
        let Fixture {
            _dir,
            log,
            local,
            fast,
            prefix,
        } = fixture();
        // A cleanup after the checkpoint at 10 has deleted 0 and 2 but not yet 1.
        write_commits(&log, [1, 10, 11]);
        write(&log, "00000000000000000010.checkpoint.parquet", "x");
        write(&log, "_last_checkpoint", r#"{"version":10,"size":3}"#);
        let (got, want) = both(&fast, &local, &prefix, "00000000000000000001").await;
        assert_eq!(got, want);
        assert_eq!(
            got.len(),
            5,
            "1, 10.checkpoint, 10, 11, _last_checkpoint: {got:?}"
        );
        // An unreadable `_last_checkpoint` (being replaced) lists too.
        write(&log, "_last_checkpoint", "{\"vers");
        let (got, want) = both(&fast, &local, &prefix, "00000000000000000011").await;
        assert_eq!(got, want);
    }
}
