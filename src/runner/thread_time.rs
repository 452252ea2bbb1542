//! Where a slow step's wall time went, from the kernel's scheduler statistics of the
//! thread it ran on (Linux `/proc/thread-self/schedstat`): on a CPU, runnable but waiting
//! for one (the machine's cores were busy), or neither (asleep: I/O, a lock, or the task
//! waiting on another). Read only around the stages' steps, and logged only for slow ones,
//! so that a latency outlier says whether the pipeline computed, queued or waited.

use std::time::{Duration, Instant};

/// A step slower than this logs where its time went (at debug level).
const SLOW_STEP: Duration = Duration::from_millis(10);

/// The calling thread's scheduler counters at a moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThreadClock {
    started: Instant,
    thread: std::thread::ThreadId,
    counters: Option<(u64, u64)>,
}

/// How a step's wall time divides; `moved` when the task resumed on another thread, so
/// the split mixes two threads' counters and is only a hint. Shown as the `key=ms`
/// fields a slow-step log line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spent {
    total: Duration,
    on_cpu: Duration,
    runnable: Duration,
    asleep: Duration,
    moved: bool,
}

impl ThreadClock {
    pub(crate) fn start() -> ThreadClock {
        ThreadClock {
            started: Instant::now(),
            thread: std::thread::current().id(),
            counters: counters(),
        }
    }

    /// The split since [`ThreadClock::start`] when that took [`SLOW_STEP`] or more.
    pub(crate) fn slow(&self) -> Option<Spent> {
        (self.started.elapsed() >= SLOW_STEP).then(|| self.spent())
    }

    /// The split since [`ThreadClock::start`]; all of it `asleep` where the kernel keeps
    /// no schedstat.
    fn spent(&self) -> Spent {
        let wall = self.started.elapsed();
        let moved = std::thread::current().id() != self.thread;
        let (on_cpu, runnable) = match (self.counters, counters()) {
            (Some((cpu0, wait0)), Some((cpu1, wait1))) => (
                Duration::from_nanos(cpu1.saturating_sub(cpu0)),
                Duration::from_nanos(wait1.saturating_sub(wait0)),
            ),
            _ => (Duration::ZERO, Duration::ZERO),
        };
        Spent {
            total: wall,
            on_cpu,
            runnable,
            asleep: wall.saturating_sub(on_cpu + runnable),
            moved,
        }
    }
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "total_ms={:.3} on_cpu_ms={:.3} runnable_ms={:.3} asleep_ms={:.3} moved={}",
            ms(self.total),
            ms(self.on_cpu),
            ms(self.runnable),
            ms(self.asleep),
            self.moved
        )
    }
}

/// Nanoseconds on a CPU and waiting on a run queue, from the first two fields of
/// `/proc/thread-self/schedstat`.
fn counters() -> Option<(u64, u64)> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

fn parse(schedstat: &str) -> Option<(u64, u64)> {
    let mut fields = schedstat.split_whitespace().map(str::parse::<u64>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_cpu_and_run_queue_nanoseconds() {
        assert_eq!(parse("123 456 7\n"), Some((123, 456)));
        assert_eq!(parse("garbage"), None);
    }

    #[test]
    fn a_busy_thread_spends_its_time_on_a_cpu() {
        let clock = ThreadClock::start();
        let until = Instant::now() + Duration::from_millis(30);
        let mut spins = 0u64;
        while Instant::now() < until {
            spins = std::hint::black_box(spins + 1);
        }
        let spent = clock.spent();
        assert!(!spent.moved);
        assert!(
            ThreadClock::start().slow().is_none(),
            "a step just begun is not slow"
        );
        let line = clock.slow().expect("30 ms is slow").to_string();
        assert!(
            line.starts_with("total_ms=") && line.ends_with("moved=false"),
            "{line}"
        );
        if cfg!(target_os = "linux") {
            // Busy or preempted, never asleep for most of it.
            assert!(
                spent.on_cpu + spent.runnable >= Duration::from_millis(20),
                "{spent:?}"
            );
        }
    }
}
