//! A worker's timers (connect and idle timeouts, the accept backoff): deadlines in an ordered set,
//! with one timerfd in the worker's epoll set armed for the earliest. A connection's deadline is
//! removed when it ends: a heap that kept it until it came would grow by one entry per connection
//! made within the idle timeout (an hour by default), under churn without bound.
//!
//! The worker's epoll_wait never has a timeout. With one, the kernel arms and cancels a timer on
//! every wake-up: with every relayed connection holding an idle timer, that cost 1.3 µs of each
//! 1-byte round trip's 26 (BENCHMARKS-proxy.md). The timerfd is set only when the earliest
//! deadline moves earlier, which a relayed byte never does: an idle deadline is checked when it
//! comes, against the connection's last activity, and put back later if it moved.

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// What a deadline belongs to: a slot of the worker's table and the id of what was in it then,
/// so that a deadline outliving its connection never touches the slot's next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub slot: usize,
    pub id: u64,
}

pub struct Timers {
    fd: TimerFd,
    deadlines: BTreeSet<(Instant, Owner)>,
    /// The deadline the timerfd is set for, if any.
    armed: Option<Instant>,
}

impl Timers {
    pub fn new() -> io::Result<Timers> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
        Ok(Timers { fd, deadlines: BTreeSet::new(), armed: None })
    }

    /// The descriptor to watch for readability.
    pub fn fd(&self) -> &TimerFd {
        &self.fd
    }

    /// Calls `owner` back through [`Timers::expired`] once `after` has passed from `now`;
    /// a duration past what the clock can hold never comes.
    pub fn add(&mut self, now: Instant, after: Duration, owner: Owner) -> io::Result<()> {
        match now.checked_add(after) {
            Some(deadline) => self.add_at(now, deadline, owner),
            None => Ok(()),
        }
    }

    pub fn add_at(&mut self, now: Instant, deadline: Instant, owner: Owner) -> io::Result<()> {
        self.deadlines.insert((deadline, owner));
        self.arm(now)
    }

    /// How many deadlines are waiting.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.deadlines.len()
    }

    /// Forgets a deadline that has not come. The timerfd stays set: if it fires for nothing,
    /// [`Timers::expired`] sets it for the next one.
    pub fn remove(&mut self, deadline: Instant, owner: Owner) {
        self.deadlines.remove(&(deadline, owner));
    }

    /// The owners whose deadline has come by `now`, earliest first; the timerfd is then set for
    /// the next one.
    pub fn expired(&mut self, now: Instant) -> io::Result<Vec<Owner>> {
        // Clear the expiration count the timerfd holds (EAGAIN: it fired for an earlier setting).
        let _ = self.fd.wait();
        self.armed = None;
        let mut due = Vec::new();
        while let Some(&(deadline, owner)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            due.push(owner);
            self.deadlines.pop_first();
        }
        self.arm(now)?;
        Ok(due)
    }

    /// Sets the timerfd for the earliest deadline, unless it already is set for one as early.
    fn arm(&mut self, now: Instant) -> io::Result<()> {
        let Some((earliest, _)) = self.deadlines.first() else { return Ok(()) };
        if self.armed.is_some_and(|armed| armed <= *earliest) {
            return Ok(());
        }
        // A relative setting of at least 1 ns: zero would disarm the timer.
        let after = earliest.saturating_duration_since(now).max(Duration::from_nanos(1));
        self.fd.set(Expiration::OneShot(TimeSpec::from_duration(after)), TimerSetTimeFlags::empty())?;
        self.armed = Some(*earliest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;

    fn owner(slot: usize) -> Owner {
        Owner { slot, id: slot as u64 }
    }

    /// Waits for the timerfd to fire; false after a second.
    fn fires(timers: &Timers) -> bool {
        let mut fds = [PollFd::new(timers.fd().as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(1000u16)).unwrap() == 1
    }

    #[test]
    fn deadlines_come_in_order_and_the_timerfd_follows_the_earliest() {
        let mut timers = Timers::new().unwrap();
        let start = Instant::now();
        timers.add(start, Duration::from_millis(60), owner(1)).unwrap();
        timers.add(start, Duration::from_millis(20), owner(2)).unwrap();
        timers.add(start, Duration::MAX, owner(3)).unwrap();
        assert!(fires(&timers));
        let now = Instant::now();
        assert!(now - start >= Duration::from_millis(20), "fired after {:?}", now - start);
        assert_eq!(timers.expired(now).unwrap(), vec![owner(2)]);
        assert!(fires(&timers), "re-armed for the next deadline");
        let now = Instant::now();
        assert!(now - start >= Duration::from_millis(60));
        assert_eq!(timers.expired(now).unwrap(), vec![owner(1)]);
        assert!(!fires(&timers), "a deadline past what the clock holds never comes");
    }

    #[test]
    fn a_removed_deadline_never_comes() {
        let mut timers = Timers::new().unwrap();
        let start = Instant::now();
        let soon = start + Duration::from_millis(10);
        timers.add_at(start, soon, owner(1)).unwrap();
        timers.add(start, Duration::from_millis(30), owner(2)).unwrap();
        timers.remove(soon, owner(1));
        assert_eq!(timers.deadlines.len(), 1, "the removed deadline is not kept");
        assert!(fires(&timers), "set for the removed deadline, the timerfd fires");
        assert_eq!(timers.expired(Instant::now()).unwrap(), vec![], "but nothing is due");
        assert!(fires(&timers));
        assert_eq!(timers.expired(Instant::now()).unwrap(), vec![owner(2)]);
    }

    #[test]
    fn a_later_deadline_leaves_the_timerfd_alone() {
        let mut timers = Timers::new().unwrap();
        let start = Instant::now();
        timers.add(start, Duration::from_millis(10), owner(1)).unwrap();
        let armed = timers.armed;
        timers.add(start, Duration::from_secs(10), owner(2)).unwrap();
        assert_eq!(timers.armed, armed);
        assert!(fires(&timers));
        assert_eq!(timers.expired(Instant::now()).unwrap(), vec![owner(1)]);
    }
}
