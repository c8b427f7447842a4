//! The proxy's timers (idle and connect timeouts, the accept backoff), kept by the main thread's
//! runtime and not by the workers'.
//!
//! A runtime with a timer pending parks in epoll_wait with a timeout: the kernel then arms and
//! cancels a timer on every wake-up, and the time driver does its bookkeeping around it. With
//! every relayed connection holding an idle timer, that cost 1.3 µs of each 1-byte round trip's
//! 26 (BENCHMARKS-proxy.md). So the workers' runtimes have no time driver: a worker's task polls
//! these timers like any other future, and the main thread wakes it when one fires, which for an
//! idle timeout is rare, not once per wake-up.

use std::future::IntoFuture;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Sleep, Timeout};

/// Makes timers kept by one runtime, whichever thread polls them.
#[derive(Clone, Debug)]
pub struct Timers(Handle);

impl Timers {
    /// Timers kept by `runtime`, which must have its time driver enabled.
    pub fn new(runtime: Handle) -> Timers {
        Timers(runtime)
    }

    /// Timers kept by the runtime the caller runs in.
    pub fn current() -> Timers {
        Timers(Handle::current())
    }

    pub fn sleep(&self, duration: Duration) -> Sleep {
        let _keeping = self.0.enter();
        tokio::time::sleep(duration)
    }

    pub fn timeout<F: IntoFuture>(&self, duration: Duration, future: F) -> Timeout<F::IntoFuture> {
        let _keeping = self.0.enter();
        tokio::time::timeout(duration, future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task on a runtime without a time driver (a worker's) sleeps and times out on timers kept
    /// by another runtime, which wakes it from its own thread.
    #[tokio::test]
    async fn a_runtime_without_timers_waits_on_another_runtimes() {
        let timers = Timers::current();
        let worker = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
            runtime.block_on(async {
                let started = std::time::Instant::now();
                timers.sleep(Duration::from_millis(30)).await;
                let slept = started.elapsed();
                let waited = timers.timeout(Duration::from_millis(30), std::future::pending::<()>()).await;
                (slept, waited.is_err())
            })
        });
        // This runtime must keep running for its timers to fire: wait for the worker without blocking it.
        let (slept, timed_out) = tokio::task::spawn_blocking(move || worker.join().unwrap()).await.unwrap();
        assert!(slept >= Duration::from_millis(30), "slept {slept:?}");
        assert!(timed_out, "the pending future was not timed out");
    }
}
