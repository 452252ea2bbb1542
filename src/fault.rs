//! Fault injection for the crash tests, at the moments a random `kill -9` rarely hits.
//!
//! `PIPELINE_CRASH_AT=<point>[:<n>]` arms one point; the n-th time (default 1st) the
//! process reaches it, the fault happens:
//! - `before_delta_commit`: the process aborts (no destructors, no flush, like SIGKILL)
//!   when a Delta commit entry is about to be written, after the batch's Parquet files;
//! - `before_ack`: aborts after every table committed a batch, before Postgres is told;
//! - `large_txn_piece`: aborts after a piece of a large transaction was applied to state
//!   and written ahead, before the transaction's commit;
//! - `lost_commit_reply`: a Delta commit entry is written, then the write reports an
//!   error, as when an S3 reply is lost on the way back;
//! - `before_checkpoint_commit`: aborts while a state checkpoint is being written (its
//!   rows computed, its Delta commit not yet made).
//!
//! Unset (production), a check costs one load of a cached `None`, and lake tables are
//! opened exactly as without this module.

use deltalake::logstore::object_store::{
    self, path::Path, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use futures::stream::BoxStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

struct Armed {
    point: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("PIPELINE_CRASH_AT").ok()?;
            let (point, nth) = match spec.split_once(':') {
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                point,
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Whether any fault is armed (then lake tables are opened through [`FaultyStore`]).
pub(crate) fn enabled() -> bool {
    armed().is_some()
}

/// True exactly once: the n-th time `point` is reached while armed.
fn fires(point: &str) -> bool {
    match armed() {
        Some(a) if a.point == point => a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.nth,
        _ => false,
    }
}

/// Aborts the process at `point` when armed for it.
pub(crate) fn crash_point(point: &str) {
    if fires(point) {
        eprintln!("PIPELINE_CRASH_AT: aborting at `{point}`");
        std::process::abort();
    }
}

/// Wraps a lake's root object store to inject the commit-entry faults.
#[derive(Debug)]
pub(crate) struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
}

impl FaultyStore {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore { inner }
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

fn is_commit_entry(p: &Path) -> bool {
    let s = p.as_ref();
    s.contains("_delta_log/") && s.ends_with(".json")
}

fn lost_reply(location: &Path) -> object_store::Error {
    eprintln!("PIPELINE_CRASH_AT: reply to the write of {location} lost");
    object_store::Error::Generic {
        store: "FaultyStore",
        source: "connection reset after the request was sent (injected)".into(),
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if is_commit_entry(location) {
            crash_point("before_delta_commit");
            let result = self.inner.put_opts(location, payload, opts).await?;
            if fires("lost_commit_reply") {
                return Err(lost_reply(location));
            }
            return Ok(result);
        }
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

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        if is_commit_entry(to) {
            crash_point("before_delta_commit");
        }
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        if is_commit_entry(to) {
            crash_point("before_delta_commit");
            self.inner.rename_opts(from, to, options).await?;
            if fires("lost_commit_reply") {
                return Err(lost_reply(to));
            }
            return Ok(());
        }
        self.inner.rename_opts(from, to, options).await
    }
}
