//! Listing a table's `_delta_log` from a version on, by name. A commit lists the log
//! twice (the latest version before writing, then the snapshot update after), each time
//! "every entry after version N". A listing costs as much as the log has entries: the
//! local store walks the directory and reads every file's metadata, an S3 server pages
//! through the keys (s3s-fs reads the whole directory), and at a commit every 200 ms with
//! 10 minutes of log retention a table keeps thousands. When a version or two follow the
//! offset (the writer asking for the latest version), they are found by name with a few
//! `head`s; longer ranges (a snapshot update lists from its checkpoint on) are listed,
//! on a local lake by one `read_dir` that reads metadata only for the entries after the
//! offset. Anything else goes to the wrapped store.

use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::logstore::object_store::{
    self, local::LocalFileSystem, path::Path, CopyOptions, GetOptions, GetResult, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;

/// Versions probed by name before a listing is cheaper: the writer's "latest version"
/// asks about one or two; a snapshot update lists everything since its checkpoint.
const MOST_PROBED: u64 = 2;

/// Wraps the root store of a lake (see the module doc).
#[derive(Debug)]
pub(crate) struct LogProbe {
    inner: Arc<dyn ObjectStore>,
    /// On a local lake, maps object paths to directories for a listing by `read_dir`.
    local: Option<LocalFileSystem>,
}

impl LogProbe {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, local: bool) -> LogProbe {
        LogProbe {
            inner,
            local: local.then(LocalFileSystem::new),
        }
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
        write!(f, "LogProbe({})", self.inner)
    }
}

/// The file at `location`, if there is one.
async fn head(store: &dyn ObjectStore, location: Path) -> object_store::Result<Option<ObjectMeta>> {
    match store.head(&location).await {
        Ok(meta) => Ok(Some(meta)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What this pipeline's tables hold in the log `prefix` after `offset`, found by name:
/// commits `{v}.json` and checkpoints `{v}.checkpoint.parquet` (delta-rs writes
/// single-file ones) from the offset's version on, then `_last_checkpoint`; versions are
/// consecutive, so the first missing commit ends the log. `None` (list instead) when the
/// offset names no version, nothing is found at it (a version older than the log), or
/// more than [`MOST_PROBED`] versions follow it.
async fn probe_after(
    store: &dyn ObjectStore,
    prefix: &Path,
    offset: &Path,
) -> object_store::Result<Option<Vec<ObjectMeta>>> {
    let name = offset.filename().unwrap_or_default();
    let digits = name
        .get(..20)
        .filter(|d| d.bytes().all(|b| b.is_ascii_digit()));
    let Some(first) = digits.and_then(|d| d.parse::<u64>().ok()) else {
        return Ok(None);
    };
    let at = |file: String| prefix.clone().join(file.as_str());
    let mut out = Vec::new();
    for v in first.. {
        let (commit, checkpoint) = futures::try_join!(
            head(store, at(format!("{v:020}.json"))),
            head(store, at(format!("{v:020}.checkpoint.parquet"))),
        )?;
        let found = commit.is_some();
        out.extend(
            [checkpoint, commit]
                .into_iter()
                .flatten()
                .filter(|m| m.location.as_ref() > offset.as_ref()),
        );
        if !found {
            if v == first {
                return Ok(None);
            }
            break;
        }
        if v - first >= MOST_PROBED {
            return Ok(None);
        }
    }
    out.extend(head(store, at("_last_checkpoint".into())).await?);
    out.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(Some(out))
}

#[async_trait::async_trait]
impl ObjectStore for LogProbe {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let Some(log) = prefix.filter(|p| p.filename() == Some("_delta_log")) else {
            return self.inner.list_with_offset(prefix, offset);
        };
        let (inner, log, offset) = (self.inner.clone(), log.clone(), offset.clone());
        let dir = self
            .local
            .as_ref()
            .and_then(|fs| fs.path_to_filesystem(&log).ok());
        futures::stream::once(async move {
            let metas = match probe_after(inner.as_ref(), &log, &offset).await? {
                Some(found) => found,
                None => match dir {
                    Some(dir) => {
                        tokio::task::spawn_blocking(move || read_after(&dir, &log, &offset))
                            .await
                            .map_err(|e| io_error(std::io::Error::other(e)))??
                    }
                    None => {
                        inner
                            .list_with_offset(Some(&log), &offset)
                            .try_collect()
                            .await?
                    }
                },
            };
            Ok::<_, object_store::Error>(futures::stream::iter(metas.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn lists_the_log_after_an_offset_like_the_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t").join("_delta_log");
        std::fs::create_dir_all(log.join("_staged")).unwrap();
        // Versions 3..=7 (0..=2 cleaned up), a checkpoint at 5, an in-flight staging file.
        for v in 3..8u64 {
            std::fs::write(log.join(format!("{v:020}.json")), "{}").unwrap();
        }
        std::fs::write(log.join("00000000000000000005.checkpoint.parquet"), "x").unwrap();
        std::fs::write(log.join("_last_checkpoint"), "{}").unwrap();
        std::fs::write(log.join("00000000000000000008.json#1"), "x").unwrap();
        let local: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new());
        let fast = LogProbe::new(local.clone(), true);
        let prefix = Path::from_filesystem_path(&log).unwrap();
        // By name: from a commit file, and from a bare version (as the kernel asks).
        for offset in [
            "00000000000000000004.json",
            "00000000000000000005",
            "00000000000000000007.json",
        ] {
            let (got, want) = both(&fast, &local, &prefix, offset).await;
            assert_eq!(got, want, "after {offset}");
        }
        let (got, _) = both(&fast, &local, &prefix, "00000000000000000004.json").await;
        assert_eq!(
            got.len(),
            5,
            "5.json, 5.checkpoint, 6, 7, _last_checkpoint: {got:?}"
        );
        // Before the log (cleaned versions) or not a version: the whole directory is read.
        for offset in ["00000000000000000001.json", "_a"] {
            let (got, want) = both(&fast, &local, &prefix, offset).await;
            assert_eq!(got, want, "after {offset}");
        }
    }
}
