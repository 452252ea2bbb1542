//! The supervisor: restarts a run that failed with an error the retry policy says a
//! restart may cure, with backoff, exactly as after a process restart (state rebuilt
//! from the lake, changes from the slot).

use super::policy::{self, Action};
use super::{run, RunError, RunOptions, RunSummary};
use crate::config::Pipeline;
use crate::serve::Phase;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// First wait before a restart; doubles per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that lasted this long before failing starts the backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs the pipeline; in streaming mode, failures the policy retries (Postgres or the
/// lake's store restarted or unreachable) restart it with backoff.
pub async fn run_supervised(
    pipeline: &Pipeline,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<RunSummary, RunError> {
    let mut delay = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let result = run(pipeline, opts.clone(), cancel.clone()).await;
        if let Some(online) = &opts.online {
            online.set_phase(match &result {
                Ok(_) => Phase::Stopped,
                Err(e)
                    if policy::action(e) == Action::Retry
                        && !opts.once
                        && !cancel.is_cancelled() =>
                {
                    Phase::Restarting(e.to_string())
                }
                Err(_) => Phase::Stopped,
            });
        }
        let e = match result {
            Ok(summary) => return Ok(summary),
            Err(e) => e,
        };
        match policy::action(&e) {
            Action::Retry if !opts.once && !cancel.is_cancelled() => {}
            Action::Operator { fix } => {
                tracing::error!(error = %e, fix, "pipeline stopped: needs an operator");
                return Err(e);
            }
            _ => return Err(e),
        }
        if started.elapsed() > HEALTHY_RUN {
            delay = FIRST_BACKOFF;
        }
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
            "pipeline interrupted, restarting from the lake and the slot");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Err(e),
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}
