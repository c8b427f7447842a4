//! Graceful shutdown: on SIGTERM (or SIGINT) stop accepting, then let in-flight connections finish, up
//! to a deadline. The same count of in-flight connections enforces `--max-connections`.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::info;

/// Installs the signal handlers now, so that from here on no signal below ends the process by
/// its default action, and returns a future that completes with the name of the first signal that
/// stops the proxy: SIGTERM (what Kubernetes sends) or SIGINT. SIGHUP, SIGUSR1 and SIGUSR2 are
/// logged and ignored: the proxy has no configuration to reload and no log to reopen, and
/// draining on a stray hang-up would take the pod's traffic down (Envoy ignores SIGHUP too).
pub fn termination_signal() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    Ok(async move {
        loop {
            let ignored = tokio::select! {
                _ = term.recv() => return "SIGTERM",
                _ = int.recv() => return "SIGINT",
                _ = hup.recv() => "SIGHUP",
                _ = usr1.recv() => "SIGUSR1",
                _ = usr2.recv() => "SIGUSR2",
            };
            info!(signal = ignored, "ignored: only SIGTERM and SIGINT stop the proxy");
        }
    })
}

/// Tells the admin endpoints' accept loops to stop (the workers have their own [`crate::worker::StopHandle`]).
pub struct Trigger(watch::Sender<bool>);

/// Held by each admin accept loop; `stopped` completes once the trigger fires (or is dropped).
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

pub fn stop_channel() -> (Trigger, Stop) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Stop(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Stop {
    pub async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The connections being relayed, at most `max` at once.
#[derive(Clone)]
pub struct InFlight {
    slots: Arc<Semaphore>,
    max: u32,
}

/// One connection's slot, given back when it is dropped.
pub type Slot = OwnedSemaphorePermit;

impl InFlight {
    pub fn new(max: u32) -> InFlight {
        InFlight { slots: Arc::new(Semaphore::new(max as usize)), max }
    }

    /// A slot for a new connection, or None when `max` are already in flight.
    pub fn admit(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok()
    }

    pub fn count(&self) -> u32 {
        self.max - self.slots.available_permits() as u32
    }

    /// Waits until no connection is in flight, for at most `deadline`; returns how many remain.
    pub async fn settle(&self, deadline: Duration) -> u32 {
        match tokio::time::timeout(deadline, self.slots.acquire_many(self.max)).await {
            Ok(_all_slots) => 0,
            Err(_) => self.count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_up_to_max_and_settles_when_slots_return() {
        let in_flight = InFlight::new(2);
        let first = in_flight.admit().expect("first slot");
        let second = in_flight.admit().expect("second slot");
        assert!(in_flight.admit().is_none(), "a third connection is over the limit");
        assert_eq!(in_flight.count(), 2);
        drop(first);
        assert_eq!(in_flight.settle(Duration::from_millis(20)).await, 1, "one still in flight at the deadline");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(second);
        });
        assert_eq!(in_flight.settle(Duration::from_secs(5)).await, 0);
    }

    #[tokio::test]
    async fn stop_reaches_every_clone() {
        let (trigger, stop) = stop_channel();
        let mut waiters: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn({
                    let mut s = stop.clone();
                    async move { s.stopped().await }
                })
            })
            .collect();
        trigger.fire();
        for waiter in waiters.drain(..) {
            tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("stopped").unwrap();
        }
    }
}
