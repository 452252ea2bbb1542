//! The fencer: writes a read-your-writes fence into the WAL when a reader waits for an
//! LSN beyond the watermark.
//!
//! A reader's `min_lsn` is the CRM's `pg_current_wal_lsn()` after its commit, which may
//! lie past the last change the slot publishes (WAL of other tables, other databases,
//! vacuum). The stream would only carry the watermark there with the next published
//! change, or never. So the fencer writes a logical message in a transaction of its
//! own: Postgres sends it after every transaction committed before, the batcher hands
//! on a [`Progress`](crate::batch::BatchKind::Progress) batch for it, and the watermark
//! passes the reader's LSN, whether or not anything else is written.
//!
//! Fences are written at once (no grace period: it would delay exactly the reads that
//! need one), on a connection of their own, one at a time: readers arriving while one
//! is in flight are covered by the next, so the fence rate is bounded by the round
//! trip, not by the request rate.

use crate::serve::Online;
use crate::source::{self, ConnInfo};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Wait after a failed fence before trying again (the stream's own error handling
/// decides about the run).
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Writes fences for `online`'s readers until `cancel`.
pub(super) async fn run(conn: ConnInfo, online: Online, cancel: CancellationToken) {
    let mut client = None;
    let mut fenced = None;
    loop {
        let wanted = tokio::select! {
            w = online.fence_wanted(fenced) => w,
            _ = cancel.cancelled() => return,
        };
        let result = async {
            if client.is_none() {
                client = Some(source::connect(&conn, 1).await?);
            }
            source::emit_wait_fence(client.as_ref().expect("connected")).await
        }
        .await;
        match result {
            Ok(lsn) => {
                metrics::counter!(crate::metrics::FENCES).increment(1);
                tracing::trace!(%wanted, fence = %lsn, "read-your-writes fence written");
                fenced = Some(lsn);
            }
            Err(e) => {
                tracing::warn!(error = %e, %wanted, "could not write a read-your-writes fence; retrying");
                client = None;
                // The readers waiting for it have already asked: look again before
                // waiting for a new one, or they would be stranded.
                fenced = None;
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}
