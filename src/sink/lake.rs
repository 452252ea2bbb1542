//! Where the lake lives: a local directory or an object-store URL (`s3://bucket/prefix`),
//! plus the storage options handed to delta-rs. Every table the pipeline or a reader opens
//! goes through here, so local and S3 lakes share one code path.

use super::log_cache::LogCache;
use super::log_probe::LogProbe;
use super::{LakeTable, Mark, SinkError};
use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::logstore::{object_store_factories, ObjectStoreRef, StorageConfig};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Once};
use url::Url;

#[derive(Clone)]
pub struct Lake {
    root: Url,
    /// Passed to delta-rs/object_store as is; may hold secrets, so never logged.
    options: HashMap<String, String>,
    /// The log commits seen by every table opened through this lake (and its clones).
    log_cache: Arc<LogCache>,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self.options.keys().collect();
        f.debug_struct("Lake")
            .field("root", &self.root.as_str())
            .field("option_keys", &keys)
            .finish()
    }
}

/// Object-store schemes this build can write to.
const SCHEMES: &[&str] = &["file", "s3", "s3a"];

fn register_object_stores() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| deltalake::aws::register_handlers(None));
}

impl Lake {
    /// `./lake`, `/abs/lake`, `file:///…`, or `s3://bucket/prefix`, with storage options
    /// (e.g. `aws_endpoint`, `aws_allow_http`); credentials also come from the standard
    /// AWS environment variables and profile chain.
    pub fn new(url: &str, options: &BTreeMap<String, String>) -> Result<Lake, SinkError> {
        register_object_stores();
        let root = lake_root(url)?;
        if !SCHEMES.contains(&root.scheme()) {
            return Err(SinkError::Url {
                url: url.to_string(),
                message: format!(
                    "unsupported scheme `{}`: use a local directory, file:// or s3://",
                    root.scheme()
                ),
            });
        }
        // Empty values mean "not set", so `key: ${VAR:-}` can leave a setting to the AWS chain.
        let options = options
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        Ok(Lake {
            root,
            options,
            log_cache: Arc::default(),
        })
    }

    /// Tells the lake how long its tables keep commit files before log cleanup may delete
    /// them (`lake.maintenance.log_retention_minutes`), so that listings of the recent log
    /// can be answered from the commits it has seen even before a newer checkpoint.
    pub fn with_log_retention(mut self, retention: std::time::Duration) -> Lake {
        self.log_cache = Arc::new(LogCache::new(retention));
        self
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    pub fn is_local(&self) -> bool {
        self.root.scheme() == "file"
    }

    /// Makes every write to the lake so far survive a power loss or an OS crash, not only
    /// a crash of this process: the step between a commit and acknowledging its LSN to
    /// Postgres. An object store has made a write durable when it answers. A local
    /// directory has not (`object_store` writes files without fsync), so the filesystem
    /// holding it is synced: data files, log entries and the directory entries naming
    /// them, in one call, whichever files the commit wrote (`syncfs`; `sync` elsewhere).
    pub async fn make_durable(&self) -> Result<(), SinkError> {
        if !self.is_local() {
            return Ok(());
        }
        let Ok(dir) = self.root.to_file_path() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let synced = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || sync_filesystem(&dir)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "local lake synced"
        );
        synced.map_err(|source| SinkError::Sync {
            path: dir.display().to_string(),
            source,
        })
    }

    /// Makes the files `relative` to `table`'s directory survive a power loss: each
    /// file and each directory naming one is fsynced. The cheap way to the guarantee of
    /// [`Lake::make_durable`] when the commit knows what it wrote: data files before
    /// the log entry naming them, then the log entry. An object store: nothing to do.
    pub async fn sync_files(
        &self,
        table: &LakeTable,
        relative: Vec<String>,
    ) -> Result<(), SinkError> {
        if !self.is_local() || relative.is_empty() {
            return Ok(());
        }
        let Ok(dir) = self.table_url(table)?.to_file_path() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let synced = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || fsync_files(&dir, &relative)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        metrics::histogram!(crate::metrics::LAKE_DURABLE_SECONDS)
            .record(started.elapsed().as_secs_f64());
        synced.map_err(|source| SinkError::Sync {
            path: dir.display().to_string(),
            source,
        })
    }

    /// The table's directory URL, `<root>/<path>/`.
    pub fn table_url(&self, table: &LakeTable) -> Result<Url, SinkError> {
        self.root
            .join(&format!("{}/", table.path()))
            .map_err(|e| SinkError::Url {
                url: self.root.to_string(),
                message: e.to_string(),
            })
    }

    /// The table, loaded if it exists, otherwise uninitialised (version None).
    pub async fn table(&self, path: &LakeTable) -> Result<DeltaTable, SinkError> {
        let mut table = self.unloaded(path)?;
        match table.load().await {
            // A table not created yet: returned uninitialised, for the caller to create.
            Ok(()) | Err(DeltaTableError::NotATable(_)) => Ok(table),
            Err(e) => Err(SinkError::Delta {
                table: path.clone(),
                source: e,
            }),
        }
    }

    /// The table on a store of its own, not read yet (version None).
    pub(crate) fn unloaded(&self, path: &LakeTable) -> Result<DeltaTable, SinkError> {
        let url = self.table_url(path)?;
        if self.is_local() {
            if let Ok(p) = url.to_file_path() {
                let _ = std::fs::create_dir_all(p);
            }
        }
        let derr = |source| SinkError::Delta {
            table: path.clone(),
            source,
        };
        let builder = DeltaTableBuilder::from_url(url.clone())
            .map_err(derr)?
            .with_storage_options(self.options.clone());
        let mut store = self.root_store(&url).map_err(derr)?;
        if crate::fault::enabled() {
            store = Arc::new(crate::fault::FaultyStore::new(store));
        }
        let store = Arc::new(LogProbe::new(
            store,
            self.is_local(),
            self.log_cache.clone(),
        ));
        builder
            .with_storage_backend(store, url)
            .build()
            .map_err(derr)
    }

    /// The object store at the root of `url`'s bucket (or filesystem), as delta-rs
    /// builds it from the storage options.
    fn root_store(&self, url: &Url) -> Result<ObjectStoreRef, DeltaTableError> {
        let scheme = Url::parse(&format!("{}://", url.scheme())).expect("a scheme is a URL");
        let config = StorageConfig::parse_options(self.options.clone())?;
        let factory = object_store_factories()
            .get(&scheme)
            .map(|f| f.value().clone())
            .ok_or_else(|| DeltaTableError::InvalidTableLocation(url.to_string()))?;
        Ok(factory.parse_url_opts(url, &config)?.0)
    }

    /// The existing table, or an error saying it is missing.
    pub async fn existing_table(&self, path: &LakeTable) -> Result<DeltaTable, SinkError> {
        let table = self.table(path).await?;
        if table.version().is_none() {
            return Err(SinkError::Missing(format!("{}{path}", self.root)));
        }
        Ok(table)
    }
}

impl Lake {
    /// The store and path of one of the pipeline's own marks.
    fn marker(&self, mark: Mark) -> Result<(ObjectStoreRef, deltalake::Path), SinkError> {
        let store =
            deltalake::logstore::store_for(&self.root, self.options.clone()).map_err(|source| {
                SinkError::Open {
                    root: self.root.to_string(),
                    source,
                }
            })?;
        Ok((store, deltalake::Path::from(mark.path())))
    }

    /// Writes `mark` (durably, before returning).
    pub async fn put_marker(&self, mark: Mark, body: String) -> Result<(), SinkError> {
        let (store, path) = self.marker(mark)?;
        store
            .put(&path, body.into())
            .await
            .map(|_| ())
            .map_err(|source| SinkError::Store {
                path: path.to_string(),
                source,
            })
    }

    pub async fn has_marker(&self, mark: Mark) -> Result<bool, SinkError> {
        let (store, path) = self.marker(mark)?;
        match store.head(&path).await {
            Ok(_) => Ok(true),
            Err(deltalake::ObjectStoreError::NotFound { .. }) => Ok(false),
            Err(source) => Err(SinkError::Store {
                path: path.to_string(),
                source,
            }),
        }
    }

    /// The mark's body, if the mark is there.
    pub async fn read_marker(&self, mark: Mark) -> Result<Option<String>, SinkError> {
        let (store, path) = self.marker(mark)?;
        let err = |source| SinkError::Store {
            path: path.to_string(),
            source,
        };
        match store.get(&path).await {
            Ok(got) => {
                let bytes = got.bytes().await.map_err(err)?;
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
            Err(deltalake::ObjectStoreError::NotFound { .. }) => Ok(None),
            Err(source) => Err(err(source)),
        }
    }

    pub async fn remove_marker(&self, mark: Mark) -> Result<(), SinkError> {
        let (store, path) = self.marker(mark)?;
        match store.delete(&path).await {
            Ok(()) | Err(deltalake::ObjectStoreError::NotFound { .. }) => Ok(()),
            Err(source) => Err(SinkError::Store {
                path: path.to_string(),
                source,
            }),
        }
    }
}

/// fsyncs `dir/f` for each of `relative`, then every directory holding one.
fn fsync_files(dir: &std::path::Path, relative: &[String]) -> std::io::Result<()> {
    let mut parents = std::collections::BTreeSet::new();
    for f in relative {
        let path = dir.join(f);
        fsync_file(&std::fs::File::open(&path)?)?;
        if let Some(parent) = path.parent() {
            parents.insert(parent.to_path_buf());
        }
    }
    for parent in parents {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// A large file is written back this much at a time before its fsync.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// fsyncs `file`, a large one in [`WRITEBACK_CHUNK`] pieces first. On ext4 (ordered
/// data) a journal commit waits for the data of every file whose blocks it allocates,
/// so another writer's fsync waited for all of a 300 MB file's in one go (~140 ms,
/// measured); piece by piece, it waits for one piece at most (~10 ms).
fn fsync_file(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = file.metadata()?.len();
        let mut offset = 0;
        while len > WRITEBACK_CHUNK && offset < len {
            let n = WRITEBACK_CHUNK.min(len - offset);
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: `file` is an open descriptor for the duration of the call.
            let r =
                unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, n as i64, flags) };
            if r != 0 {
                // Only a head start for the fsync below, which still does it all.
                break;
            }
            offset += n;
        }
    }
    file.sync_all()
}

/// Flushes the filesystem holding `dir` to disk.
fn sync_filesystem(dir: &std::path::Path) -> std::io::Result<()> {
    let dir = std::fs::File::open(dir)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: `dir` is an open descriptor for the duration of the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        dir.sync_all()?;
        // SAFETY: `sync` takes no arguments and cannot fail.
        unsafe { libc::sync() };
    }
    Ok(())
}

/// `./lake`, `/abs/lake`, `file:///…` or an object-store URL, as a directory URL.
fn lake_root(url: &str) -> Result<Url, SinkError> {
    let err = |message: String| SinkError::Url {
        url: url.to_string(),
        message,
    };
    let parsed = match Url::parse(url) {
        Ok(u) if u.scheme().len() > 1 => u,
        _ => {
            let path = std::path::Path::new(url);
            std::fs::create_dir_all(path)
                .map_err(|e| err(format!("cannot create directory: {e}")))?;
            let abs = path
                .canonicalize()
                .map_err(|e| err(format!("cannot resolve directory: {e}")))?;
            Url::from_directory_path(&abs).map_err(|_| err("not an absolute path".into()))?
        }
    };
    let mut u = parsed;
    if !u.path().ends_with('/') {
        u.set_path(&format!("{}/", u.path()));
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_directory_urls_and_unknown_schemes_are_refused() {
        let none = BTreeMap::new();
        let s3 = Lake::new("s3://bucket/prefix", &none).unwrap();
        assert_eq!(s3.root().as_str(), "s3://bucket/prefix/");
        assert_eq!(
            s3.table_url(&LakeTable::raw("loan")).unwrap().as_str(),
            "s3://bucket/prefix/raw/loan/"
        );
        assert!(!s3.is_local());
        let dir = tempfile::tempdir().unwrap();
        let local = Lake::new(dir.path().join("lake").to_str().unwrap(), &none).unwrap();
        assert!(local.is_local() && local.root().as_str().ends_with("/lake/"));
        let err = Lake::new("gs://bucket/x", &none).unwrap_err().to_string();
        assert!(err.contains("unsupported scheme `gs`"), "{err}");
    }

    #[test]
    fn debug_never_shows_option_values() {
        let mut opts = BTreeMap::new();
        opts.insert("AWS_SECRET_ACCESS_KEY".to_string(), "hunter2".to_string());
        let lake = Lake::new("s3://b/p", &opts).unwrap();
        let shown = format!("{lake:?}");
        assert!(shown.contains("aws_secret_access_key") && !shown.contains("hunter2"));
    }
}
