//! A faster listing of a local table's `_delta_log` from a version on. A commit lists the
//! log twice (the latest version, then the snapshot update), each time "every entry after
//! version N". `object_store`'s local store walks the whole directory and reads the
//! metadata of every file in it, so the cost follows the number of log files kept (at a
//! commit every 200 ms and 10 minutes of log retention, thousands). Here one `read_dir`
//! filters by name first and reads the metadata of the few entries after the offset.
//! Everything else goes to the wrapped store.

use deltalake::logstore::object_store::{
    self, local::LocalFileSystem, path::Path, CopyOptions, GetOptions, GetResult, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;

/// Wraps the root store of a local lake (see the module doc).
#[derive(Debug)]
pub(crate) struct LocalLogList {
    inner: Arc<dyn ObjectStore>,
    /// Maps object paths to filesystem paths as the wrapped store does.
    fs: LocalFileSystem,
}

impl LocalLogList {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> LocalLogList {
        LocalLogList {
            inner,
            fs: LocalFileSystem::new(),
        }
    }
}

impl std::fmt::Display for LocalLogList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalLogList({})", self.inner)
    }
}

fn io_error(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalLogList",
        source: Box::new(e),
    }
}

/// The files directly in `dir` (as `prefix`) whose path sorts after `offset`, in order.
/// Skips `object_store`'s in-flight staging files (`name#n`).
fn list_after(
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

#[async_trait::async_trait]
impl ObjectStore for LocalLogList {
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
        let log = prefix.filter(|p| p.filename() == Some("_delta_log"));
        let Some(dir) = log.and_then(|p| self.fs.path_to_filesystem(p).ok()) else {
            return self.inner.list_with_offset(prefix, offset);
        };
        let (prefix, offset) = (log.expect("checked").clone(), offset.clone());
        let listed = tokio::task::spawn_blocking(move || list_after(&dir, &prefix, &offset));
        futures::stream::once(async move {
            let metas = listed
                .await
                .map_err(|e| io_error(std::io::Error::other(e)))??;
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

    #[tokio::test]
    async fn lists_the_log_after_an_offset_like_the_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t").join("_delta_log");
        std::fs::create_dir_all(log.join("_staged")).unwrap();
        for v in 0..5u64 {
            std::fs::write(log.join(format!("{v:020}.json")), "{}").unwrap();
        }
        std::fs::write(log.join("00000000000000000003.checkpoint.parquet"), "x").unwrap();
        std::fs::write(log.join("00000000000000000005.json#1"), "x").unwrap();
        let local: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new());
        let fast = LocalLogList::new(local.clone());
        let prefix = Path::from_filesystem_path(&log).unwrap();
        let offset = prefix.clone().join("00000000000000000002.json");
        let names = |metas: Vec<ObjectMeta>| -> Vec<String> {
            metas.into_iter().map(|m| m.location.to_string()).collect()
        };
        let mut want: Vec<ObjectMeta> = local
            .list_with_offset(Some(&prefix), &offset)
            .try_collect()
            .await
            .unwrap();
        want.sort_by(|a, b| a.location.cmp(&b.location));
        let got: Vec<ObjectMeta> = fast
            .list_with_offset(Some(&prefix), &offset)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(names(got.clone()), names(want));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.iter().all(|m| m.size > 0));
    }
}
