//! Reads of a table's small log files (`_delta_log/*.json`, `_last_checkpoint`) and their
//! metadata. On an object store they are requests. On a local lake they are read inline:
//! the local store takes every read through the blocking pool twice (open, then the
//! bytes), about a millisecond each on a busy machine, and a commit makes several such
//! reads, while the file is a few KB that was just written and sits in the page cache.

use bytes::Bytes;
use deltalake::logstore::object_store::{
    self, local::LocalFileSystem, path::Path, Attributes, GetOptions, GetResult, GetResultPayload,
    ObjectMeta, ObjectStore, ObjectStoreExt,
};
use std::sync::Arc;

/// The store of a lake, and the local filesystem behind it if it is one.
#[derive(Debug, Clone)]
pub(crate) struct LogFiles {
    pub(crate) inner: Arc<dyn ObjectStore>,
    pub(crate) local: Option<LocalFileSystem>,
}

fn io_error(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LogFiles",
        source: Box::new(e),
    }
}

/// Whether `location` is a log file read inline on a local lake.
fn is_small_log_file(location: &Path) -> bool {
    let mut parts: Vec<_> = location.parts().collect();
    let (Some(name), Some(dir)) = (parts.pop(), parts.pop()) else {
        return false;
    };
    dir.as_ref() == "_delta_log"
        && (name.as_ref().ends_with(".json") || name.as_ref() == "_last_checkpoint")
}

fn meta_of(location: &Path, m: &std::fs::Metadata) -> object_store::Result<ObjectMeta> {
    Ok(ObjectMeta {
        location: location.clone(),
        last_modified: m.modified().map_err(io_error)?.into(),
        size: m.len(),
        e_tag: None,
        version: None,
    })
}

impl LogFiles {
    /// The local file behind `location` when it is read inline (see the module doc).
    fn inline_path(&self, location: &Path) -> Option<std::path::PathBuf> {
        let fs = self.local.as_ref()?;
        is_small_log_file(location)
            .then(|| fs.path_to_filesystem(location).ok())
            .flatten()
    }

    /// The metadata of the file at `location`, if there is one.
    pub(crate) async fn head(&self, location: &Path) -> object_store::Result<Option<ObjectMeta>> {
        if let Some(file) = self.inline_path(location) {
            return match std::fs::metadata(&file) {
                Ok(m) => meta_of(location, &m).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error(e)),
            };
        }
        match self.inner.head(location).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The file at `location` and its metadata, if there is one.
    pub(crate) async fn get(
        &self,
        location: &Path,
    ) -> object_store::Result<Option<(ObjectMeta, Bytes)>> {
        if let Some(file) = self.inline_path(location) {
            return match read_inline(&file, location) {
                Ok(got) => Ok(Some(got)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            };
        }
        match self.inner.get(location).await {
            Ok(got) => {
                let meta = got.meta.clone();
                Ok(Some((meta, got.bytes().await?)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A whole-file read or HEAD of a small log file on a local lake, answered inline;
    /// None for every other request (ranges, conditions, other files, object stores).
    pub(crate) fn get_inline(
        &self,
        location: &Path,
        options: &GetOptions,
    ) -> Option<object_store::Result<GetResult>> {
        let file = self.inline_path(location).filter(|_| whole(options))?;
        let got = if options.head {
            std::fs::metadata(&file)
                .map_err(|e| not_found_or(e, location))
                .and_then(|m| meta_of(location, &m))
                .map(|meta| (meta, Bytes::new()))
        } else {
            read_inline(&file, location)
        };
        Some(got.map(|(meta, bytes)| in_memory(meta, bytes, false)))
    }
}

/// Whether `options` ask for a whole object, unconditionally.
pub(crate) fn whole(options: &GetOptions) -> bool {
    options.range.is_none()
        && options.if_match.is_none()
        && options.if_none_match.is_none()
        && options.if_modified_since.is_none()
        && options.if_unmodified_since.is_none()
        && options.version.is_none()
}

/// A read answered from memory.
pub(crate) fn in_memory(meta: ObjectMeta, bytes: Bytes, head: bool) -> GetResult {
    let bytes = if head { Bytes::new() } else { bytes };
    GetResult {
        range: 0..meta.size,
        meta,
        attributes: Attributes::default(),
        payload: GetResultPayload::Stream(Box::pin(futures::stream::once(
            async move { Ok(bytes) },
        ))),
    }
}

fn not_found_or(e: std::io::Error, location: &Path) -> object_store::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        object_store::Error::NotFound {
            path: location.to_string(),
            source: Box::new(e),
        }
    } else {
        io_error(e)
    }
}

fn read_inline(
    file: &std::path::Path,
    location: &Path,
) -> object_store::Result<(ObjectMeta, Bytes)> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).map_err(|e| not_found_or(e, location))?;
    let meta = meta_of(location, &f.metadata().map_err(io_error)?)?;
    let mut bytes = Vec::with_capacity(meta.size as usize);
    f.read_to_end(&mut bytes).map_err(io_error)?;
    let meta = ObjectMeta {
        size: bytes.len() as u64,
        ..meta
    };
    Ok((meta, Bytes::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_log_file_reads_the_same_inline_as_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t/_delta_log");
        std::fs::create_dir_all(&log).unwrap();
        std::fs::write(log.join("00000000000000000003.json"), b"{\"add\":{}}\n").unwrap();
        std::fs::write(log.join("part.parquet"), b"x").unwrap();
        let fs = LocalFileSystem::new();
        let files = LogFiles {
            inner: Arc::new(fs.clone()),
            local: Some(fs),
        };
        let root = Path::from_filesystem_path(&log).unwrap();
        let at = |name: &str| root.clone().join(name);
        let commit = at("00000000000000000003.json");
        let (meta, bytes) = files.get(&commit).await.unwrap().unwrap();
        assert_eq!(&bytes[..], b"{\"add\":{}}\n");
        let through = files.inner.head(&commit).await.unwrap();
        assert_eq!(
            (meta.size, meta.last_modified),
            (through.size, through.last_modified)
        );
        assert!(files
            .get(&at("00000000000000000004.json"))
            .await
            .unwrap()
            .is_none());
        assert!(files.head(&at("_last_checkpoint")).await.unwrap().is_none());
        // Only log files are read inline; ranges go through the store.
        assert!(files
            .get_inline(&at("part.parquet"), &GetOptions::default())
            .is_none());
        let ranged = GetOptions {
            range: Some((0..1).into()),
            ..Default::default()
        };
        assert!(files.get_inline(&commit, &ranged).is_none());
        let got = files
            .get_inline(&commit, &GetOptions::default())
            .unwrap()
            .unwrap();
        assert_eq!(&got.bytes().await.unwrap()[..], b"{\"add\":{}}\n");
        let missing = files.get_inline(&at("00000000000000000009.json"), &GetOptions::default());
        assert!(matches!(
            missing,
            Some(Err(object_store::Error::NotFound { .. }))
        ));
    }
}
