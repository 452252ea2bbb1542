//! [`Online`]: what the API serves. Every entity's latest features, written by the
//! processor as soon as a batch's features are computed (before its Delta commit), and
//! the watermark: the end LSN up to which every source change has been applied to state
//! and its features computed. A reader may ask to wait until the watermark reaches its
//! own write's LSN (read-your-writes); a waiter ahead of the watermark asks for a fence,
//! so the wait never depends on the source writing anything else.

use super::table::{OnlineRow, OnlineTable};
use crate::changelog::Lsn;
use crate::state::{Key, State};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Where the run is; the API serves features only when [`Phase::Ready`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The process started; the run has not reached its source yet.
    Starting,
    /// Taking the initial snapshot (or a resnapshot).
    Snapshot,
    /// Rebuilding state and the online features from the lake.
    Rebuilding,
    /// Streaming: features are current up to the watermark.
    Ready,
    /// The run failed and is being restarted (the error).
    Restarting(String),
    /// The run ended.
    Stopped,
}

impl Phase {
    /// Why the API is not ready, in a sentence (None when ready).
    pub fn reason(&self) -> Option<String> {
        Some(match self {
            Phase::Ready => return None,
            Phase::Starting => "starting: connecting to the source".into(),
            Phase::Snapshot => "taking the initial snapshot".into(),
            Phase::Rebuilding => "rebuilding state and online features from the lake".into(),
            Phase::Restarting(e) => format!("restarting after an error: {e}"),
            Phase::Stopped => "the pipeline stopped".into(),
        })
    }
}

/// The online features of a feature file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("no feature file `{0}` in this pipeline")]
    UnknownFile(String),
    #[error("not ready: {0}")]
    NotReady(String),
}

/// The wait for `min_lsn` ran out: what was applied by then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitTimeout {
    pub watermark: Lsn,
}

struct File {
    name: String,
    table: RwLock<Option<OnlineTable>>,
}

struct Inner {
    files: Vec<File>,
    watermark: watch::Sender<Lsn>,
    phase: watch::Sender<Phase>,
    /// The highest `min_lsn` a reader waited for (it may have left since).
    wanted: AtomicU64,
    /// Woken when a reader is ahead of the watermark (see [`Online::fence_wanted`]).
    fence: Notify,
    /// The running engine's state (source rows), for lookups beside the features (a
    /// decision's application row); replaced by each run.
    state: RwLock<Option<State>>,
}

/// A cheap, cloneable handle shared by the processor (writer) and the API (readers).
#[derive(Clone)]
pub struct Online {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Online {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Online")
            .field("phase", &self.phase())
            .field("watermark", &self.watermark())
            .finish_non_exhaustive()
    }
}

impl Online {
    /// An empty store for the feature files named `files`; not ready.
    pub fn new(files: impl IntoIterator<Item = String>) -> Online {
        let files = files
            .into_iter()
            .map(|name| File {
                name,
                table: RwLock::new(None),
            })
            .collect();
        Online {
            inner: Arc::new(Inner {
                files,
                watermark: watch::channel(Lsn::ZERO).0,
                phase: watch::channel(Phase::Starting).0,
                wanted: AtomicU64::new(0),
                fence: Notify::new(),
                state: RwLock::new(None),
            }),
        }
    }

    /// A run starts loading (`phase`): every file is emptied, on its output `schemas`
    /// (by name), and nothing is served until [`Online::ready`].
    pub fn begin(&self, phase: Phase, schemas: &[(String, SchemaRef)]) {
        self.inner.phase.send_replace(phase);
        for f in &self.inner.files {
            let schema = schemas.iter().find(|(n, _)| *n == f.name);
            *f.table.write().unwrap() = schema.map(|(_, s)| OnlineTable::new(s.clone()));
        }
    }

    /// The state a run computes on (the API reads source rows from it).
    pub(crate) fn set_state(&self, state: State) {
        *self.inner.state.write().unwrap() = Some(state);
    }

    /// The running engine's state, once a run has started.
    pub fn state(&self) -> Option<State> {
        self.inner.state.read().unwrap().clone()
    }

    /// Loading is done: features are current up to `watermark`; serve.
    pub fn ready(&self, watermark: Lsn) {
        for f in &self.inner.files {
            if let Some(t) = f.table.write().unwrap().as_mut() {
                t.purge_deleted();
            }
        }
        self.inner.watermark.send_replace(watermark);
        self.inner.phase.send_replace(Phase::Ready);
    }

    /// Stops serving features, e.g. while the run restarts.
    pub fn set_phase(&self, phase: Phase) {
        self.inner.phase.send_replace(phase);
    }

    pub fn phase(&self) -> Phase {
        self.inner.phase.borrow().clone()
    }

    /// Merges feature rows read from the lake (newest `_lsn` per entity wins).
    pub(crate) fn load(&self, file: &str, rows: &RecordBatch) {
        self.with_table(file, |t| t.load(rows));
    }

    /// Publishes a batch's freshly computed rows of `file`.
    pub(crate) fn apply(&self, file: &str, rows: &RecordBatch) {
        self.with_table(file, |t| t.apply(rows));
    }

    /// Everything up to `lsn` is applied and computed: wakes the readers waiting for it.
    pub(crate) fn advance(&self, lsn: Lsn) {
        self.inner.watermark.send_if_modified(|w| {
            let moved = lsn > *w;
            *w = (*w).max(lsn);
            moved
        });
    }

    pub fn watermark(&self) -> Lsn {
        *self.inner.watermark.borrow()
    }

    /// Entities held per file (for sizes in logs and metrics).
    pub fn sizes(&self) -> Vec<(String, usize)> {
        self.inner
            .files
            .iter()
            .map(|f| {
                let n = f.table.read().unwrap().as_ref().map_or(0, OnlineTable::len);
                (f.name.clone(), n)
            })
            .collect()
    }

    fn with_table(&self, file: &str, f: impl FnOnce(&mut OnlineTable)) {
        if let Some(x) = self.inner.files.iter().find(|x| x.name == file) {
            if let Some(t) = x.table.write().unwrap().as_mut() {
                f(t);
            }
        }
    }

    /// Waits until the watermark reaches `min_lsn` (at most `timeout`), asking for a
    /// fence when it is ahead. Returns the watermark reached.
    pub async fn wait_for(&self, min_lsn: Lsn, timeout: Duration) -> Result<Lsn, WaitTimeout> {
        let mut rx = self.inner.watermark.subscribe();
        let now = *rx.borrow_and_update();
        if now >= min_lsn {
            return Ok(now);
        }
        self.inner
            .wanted
            .fetch_max(min_lsn.as_u64(), Ordering::AcqRel);
        self.inner.fence.notify_one();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|w| *w >= min_lsn)).await;
        match reached {
            Ok(Ok(w)) => Ok(*w),
            _ => Err(WaitTimeout {
                watermark: self.watermark(),
            }),
        }
    }

    /// Resolves when a reader waits for an LSN beyond both the watermark and `fenced`
    /// (the last fence's position, which covers every LSN obtained before it was
    /// written); returns the highest LSN asked for. Between fences it waits for a reader
    /// to arrive, so a reader asking for an LSN the source has not reached yet costs one
    /// fence, not a stream of them; readers arriving while a fence is in flight are
    /// covered by the next. `None`: the first call, which looks before waiting.
    pub(crate) async fn fence_wanted(&self, fenced: Option<Lsn>) -> Lsn {
        let mut look_first = fenced.is_none();
        let fenced = fenced.unwrap_or(Lsn::ZERO);
        loop {
            if !look_first {
                self.inner.fence.notified().await;
            }
            look_first = false;
            let wanted = Lsn::new(self.inner.wanted.load(Ordering::Acquire));
            if wanted > self.watermark() && wanted > fenced {
                return wanted;
            }
        }
    }

    /// The served rows of `keys` of `file`, in order (None: no such entity), and the
    /// watermark they are current to (read first, so every row is at least that new).
    pub fn read(
        &self,
        file: &str,
        keys: &[Key],
    ) -> Result<(Lsn, Vec<Option<OnlineRow>>), ReadError> {
        let f = self.file(file)?;
        // The table lock first: a run that begins again swaps the tables under it after
        // setting its phase, so a reader holding it sees either the ready table with its
        // watermark or the phase that says not ready.
        let table = f.table.read().unwrap();
        if let Some(reason) = self.phase().reason() {
            return Err(ReadError::NotReady(reason));
        }
        let watermark = self.watermark();
        let table = table
            .as_ref()
            .ok_or_else(|| ReadError::NotReady("the feature file has no output yet".into()))?;
        Ok((watermark, keys.iter().map(|k| table.get(k)).collect()))
    }

    /// Whether `file` keys entities by text (else by integers).
    pub fn text_keys(&self, file: &str) -> Result<bool, ReadError> {
        let f = self.file(file)?;
        let table = f.table.read().unwrap();
        match table.as_ref() {
            Some(t) => Ok(t.text_keys()),
            None => Err(ReadError::NotReady(
                self.phase().reason().unwrap_or_default(),
            )),
        }
    }

    fn file(&self, file: &str) -> Result<&File, ReadError> {
        self.inner
            .files
            .iter()
            .find(|f| f.name == file)
            .ok_or_else(|| ReadError::UnknownFile(file.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_ahead_of_the_watermark_asks_for_a_fence_and_wakes_when_it_passes() {
        let online = Online::new(["f".to_string()]);
        online.ready(Lsn::new(100));
        assert_eq!(
            online.wait_for(Lsn::new(50), Duration::ZERO).await,
            Ok(Lsn::new(100))
        );
        let reader = online.clone();
        let waiting =
            tokio::spawn(
                async move { reader.wait_for(Lsn::new(200), Duration::from_secs(1)).await },
            );
        assert_eq!(online.fence_wanted(None).await, Lsn::new(200));
        // A fence at 200 covers the reader: no further fence until one asks beyond it.
        let covered = tokio::time::timeout(
            Duration::from_millis(10),
            online.fence_wanted(Some(Lsn::new(200))),
        );
        assert!(covered.await.is_err());
        // A fence below what was asked (an LSN the server had not reached yet) waits for
        // the next reader instead of fencing again at once.
        let again = tokio::time::timeout(
            Duration::from_millis(10),
            online.fence_wanted(Some(Lsn::new(180))),
        );
        assert!(again.await.is_err());
        online.advance(Lsn::new(150));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!waiting.is_finished());
        online.advance(Lsn::new(250));
        assert_eq!(waiting.await.unwrap(), Ok(Lsn::new(250)));
        // Nobody waits beyond the watermark now: no fence is wanted.
        let idle = tokio::time::timeout(
            Duration::from_millis(10),
            online.fence_wanted(Some(Lsn::ZERO)),
        )
        .await;
        assert!(idle.is_err());
        // A wait that runs out reports the watermark it got to.
        assert_eq!(
            online
                .wait_for(Lsn::new(900), Duration::from_millis(5))
                .await,
            Err(WaitTimeout {
                watermark: Lsn::new(250)
            })
        );
        assert_eq!(
            online.read("g", &[]),
            Err(ReadError::UnknownFile("g".into()))
        );
        online.set_phase(Phase::Rebuilding);
        assert!(matches!(online.read("f", &[]), Err(ReadError::NotReady(_))));
    }
}
