//! A worker: one thread with its own epoll instance, its own listeners (SO_REUSEPORT: the
//! kernel spreads connections over the workers, as over Envoy's) and every connection they
//! accept. Both sockets of a connection belong to one worker, so no wake-up crosses threads.
//!
//! The loop is ours rather than an async runtime's: per wake-up it reads the events, notes each
//! socket's readiness and steps the connection it belongs to, with nothing in between. Measured
//! on 1-byte round trips against a tokio runtime per worker, the runtime's wake-up machinery
//! (readiness dispatch, task wake and poll, park bookkeeping) cost 0.7–1.0 µs of each, and its
//! per-socket registrations most of an idle connection's memory (BENCHMARKS-proxy.md).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use socket2::Socket as Listening;
use tokio::sync::oneshot;
use tracing::error;

use crate::proxy::{Connection, Ending, ForwardError, Shared, TrafficPath};
use crate::relay::{Side, Socket, Step};
use crate::socket::{self, AcceptFailures};
use crate::timers::{Owner, Timers};

/// Events read per epoll_wait.
const EVENTS: usize = 256;

/// The epoll tokens of the two descriptors every worker has. The others name a socket by its
/// role (the low two bits), the slot of its listener or connection in the table, and the low 32
/// bits of that entry's id (the high half): an event read in the same batch as its connection's
/// end must not reach a new connection that took the slot meanwhile.
const STOP_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
const LISTENER: u64 = 0;
const CLIENT: u64 = 1;
const UPSTREAM: u64 = 2;

/// Tells a worker to stop accepting; its connections carry on until they end or the process exits.
pub struct StopHandle {
    wake: Arc<EventFd>,
    stopped: oneshot::Receiver<()>,
}

impl StopHandle {
    /// Returns once the worker has closed its listeners.
    pub async fn stop(self) -> io::Result<()> {
        self.wake.write(1)?;
        // An error means the worker thread is gone, and its listeners with it.
        let _ = self.stopped.await;
        Ok(())
    }
}

/// A listener and the path its connections take.
struct Listener {
    socket: Listening,
    path: Arc<dyn TrafficPath>,
    failures: AcceptFailures,
    /// Waiting out a failed accept: the timer, not readiness, resumes it.
    backing_off: bool,
}

enum Entry {
    Vacant {
        next: Option<usize>,
    },
    Listener {
        id: u64,
        listener: Listener,
    },
    /// `deadline`: when its timer is due, so that it is removed with the connection.
    Connection {
        id: u64,
        deadline: Option<Instant>,
        connection: Box<Connection>,
    },
}

impl Entry {
    fn id(&self) -> Option<u64> {
        match self {
            Entry::Listener { id, .. } | Entry::Connection { id, .. } => Some(*id),
            Entry::Vacant { .. } => None,
        }
    }
}

/// The worker's listeners and connections by slot, reusing vacant slots.
struct Table {
    entries: Vec<Entry>,
    vacant: Option<usize>,
    next_id: u64,
}

impl Table {
    fn insert(&mut self, make: impl FnOnce(u64) -> Entry) -> (usize, u64) {
        let id = self.next_id;
        self.next_id += 1;
        let slot = match self.vacant {
            Some(slot) => {
                if let Entry::Vacant { next } = self.entries[slot] {
                    self.vacant = next;
                }
                self.entries[slot] = make(id);
                slot
            }
            None => {
                self.entries.push(make(id));
                self.entries.len() - 1
            }
        };
        (slot, id)
    }

    fn remove(&mut self, slot: usize) -> Entry {
        let entry = std::mem::replace(&mut self.entries[slot], Entry::Vacant { next: self.vacant });
        self.vacant = Some(slot);
        entry
    }

    fn connection(&mut self, slot: usize) -> Option<&mut Connection> {
        match self.entries.get_mut(slot) {
            Some(Entry::Connection { connection, .. }) => Some(connection),
            _ => None,
        }
    }

    /// The slot an epoll token names, unless its entry has changed since.
    fn named_by(&self, token: u64) -> Option<usize> {
        let slot = (token as u32 >> 2) as usize;
        let id = self.entries.get(slot)?.id()?;
        (id as u32 == (token >> 32) as u32).then_some(slot)
    }

    fn owns(&self, owner: Owner) -> bool {
        self.entries.get(owner.slot).and_then(Entry::id) == Some(owner.id)
    }
}

pub struct Worker {
    epoll: Epoll,
    table: Table,
    timers: Timers,
    stop: Arc<EventFd>,
    stopped: Option<oneshot::Sender<()>>,
    shared: Arc<Shared>,
    /// Connections that stopped after their share of work with more to do.
    busy: Vec<usize>,
    now: Instant,
}

impl Worker {
    /// A worker accepting on `listeners`, each with the path its connections take.
    pub fn new(
        listeners: Vec<(std::net::TcpListener, Arc<dyn TrafficPath>)>,
        shared: Arc<Shared>,
    ) -> io::Result<(Worker, StopHandle)> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        let timers = Timers::new()?;
        let (stopped, on_stopped) = oneshot::channel();
        epoll.add(stop.as_ref(), EpollEvent::new(EpollFlags::EPOLLIN, STOP_TOKEN))?;
        epoll.add(timers.fd(), EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN))?;
        let mut worker = Worker {
            epoll,
            table: Table { entries: Vec::new(), vacant: None, next_id: 0 },
            timers,
            stop: stop.clone(),
            stopped: Some(stopped),
            shared,
            busy: Vec::new(),
            now: Instant::now(),
        };
        for (listener, path) in listeners {
            let listener = Listener { socket: listener.into(), path, failures: AcceptFailures::default(), backing_off: false };
            let (slot, id) = worker.table.insert(|id| Entry::Listener { id, listener });
            let Entry::Listener { listener, .. } = &worker.table.entries[slot] else { unreachable!("just inserted") };
            let events = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
            worker.epoll.add(&listener.socket, EpollEvent::new(events, token(Owner { slot, id }, LISTENER)))?;
        }
        Ok((worker, StopHandle { wake: stop, stopped: on_stopped }))
    }

    /// Runs until the thread ends with the process.
    pub fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); EVENTS];
        loop {
            if let Err(e) = self.turn(&mut events, EpollTimeout::NONE) {
                error!(error = %e, "epoll_wait failed; this worker stops");
                return;
            }
        }
    }

    /// Waits for events, up to `idle_wait` (not at all while a connection is busy), and acts on them.
    fn turn(&mut self, events: &mut [EpollEvent], idle_wait: EpollTimeout) -> nix::Result<()> {
        let timeout = if self.busy.is_empty() { idle_wait } else { EpollTimeout::ZERO };
        let ready = match self.epoll.wait(events, timeout) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.now = Instant::now();
        for event in &events[..ready] {
            self.dispatch(event.data(), event.events());
        }
        for slot in std::mem::take(&mut self.busy) {
            self.drive(slot);
        }
        Ok(())
    }

    fn dispatch(&mut self, token: u64, events: EpollFlags) {
        match token {
            STOP_TOKEN => self.stop_accepting(),
            TIMER_TOKEN => self.expire(),
            _ => {
                let Some(slot) = self.table.named_by(token) else { return };
                match token & 3 {
                    LISTENER => self.accept(slot),
                    role => {
                        let side = if role == CLIENT { Side::Client } else { Side::Upstream };
                        if let Some(connection) = self.table.connection(slot) {
                            connection.note(side, events);
                            self.drive(slot);
                        }
                    }
                }
            }
        }
    }

    /// Accepts until the listener has no more, or backs off after a failure.
    fn accept(&mut self, slot: usize) {
        loop {
            let Some(Entry::Listener { id, listener }) = self.table.entries.get_mut(slot) else { return };
            if listener.backing_off {
                return;
            }
            let role = listener.path.direction().label();
            let (client, peer) = match socket::accept(&listener.socket) {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPROTO)) => continue,
                Err(e) => {
                    listener.failures.failed(role, &e);
                    listener.backing_off = true;
                    let owner = Owner { slot, id: *id };
                    if let Err(e) = self.timers.add(self.now, socket::ACCEPT_BACKOFF, owner) {
                        error!(error = %e, "cannot set the accept backoff timer");
                    }
                    return;
                }
            };
            listener.failures.accepted(role);
            let path = listener.path.clone();
            if let Some(connection) = Connection::open(client, peer, path.as_ref(), &self.shared, self.now) {
                self.start(connection);
            }
        }
    }

    /// Registers a dialed connection's sockets and takes its first step.
    fn start(&mut self, connection: Connection) {
        let deadline = connection.deadline(&self.shared);
        let (slot, id) = self.table.insert(|id| Entry::Connection { id, deadline, connection: Box::new(connection) });
        let registered = (|| {
            let Some(connection) = self.table.connection(slot) else { unreachable!("just inserted") };
            for (side, role) in [(Side::Client, CLIENT), (Side::Upstream, UPSTREAM)] {
                self.epoll
                    .add(&connection.socket(side).stream, EpollEvent::new(Socket::EVENTS, token(Owner { slot, id }, role)))?;
            }
            if let Some(deadline) = deadline {
                self.timers.add_at(self.now, deadline, Owner { slot, id })?;
            }
            io::Result::Ok(())
        })();
        match registered {
            Ok(()) => self.drive(slot),
            Err(e) => self.end(slot, Ending::Refused(ForwardError::Watch(e))),
        }
    }

    /// Steps the connection in `slot` and acts on where it got to.
    fn drive(&mut self, slot: usize) {
        let Some(connection) = self.table.connection(slot) else { return };
        match connection.step(&self.shared, self.now) {
            Ok(Step::Waiting) => {}
            Ok(Step::Busy) => self.busy.push(slot),
            Ok(Step::Over(close)) => self.end(slot, Ending::Relayed(close)),
            Err(ending) => self.end(slot, ending),
        }
    }

    fn end(&mut self, slot: usize, ending: Ending) {
        // Closing a socket takes it out of the epoll set: nothing to deregister.
        if let Entry::Connection { id, deadline, connection } = self.table.remove(slot) {
            if let Some(deadline) = deadline {
                self.timers.remove(deadline, Owner { slot, id });
            }
            connection.end(ending, self.now);
        }
    }

    fn expire(&mut self) {
        let due = match self.timers.expired(self.now) {
            Ok(due) => due,
            Err(e) => {
                error!(error = %e, "cannot set the timer");
                return;
            }
        };
        for owner in due {
            if !self.table.owns(owner) {
                continue;
            }
            match &mut self.table.entries[owner.slot] {
                Entry::Listener { listener, .. } => {
                    listener.backing_off = false;
                    self.accept(owner.slot);
                }
                Entry::Connection { connection, deadline, .. } => {
                    // This deadline has left the timers; the next, if any, goes in.
                    *deadline = None;
                    match connection.expire(&self.shared, self.now) {
                        Ok(Some(next)) => match self.timers.add_at(self.now, next, owner) {
                            Ok(()) => *deadline = Some(next),
                            Err(e) => error!(error = %e, "cannot set the timer"),
                        },
                        Ok(None) => {}
                        Err(ending) => self.end(owner.slot, ending),
                    }
                }
                Entry::Vacant { .. } => {}
            }
        }
    }

    /// Closes the listeners: new connections go to no worker, and the kernel refuses them.
    fn stop_accepting(&mut self) {
        let _ = self.stop.read();
        let listeners: Vec<usize> =
            (0..self.table.entries.len()).filter(|&slot| matches!(self.table.entries[slot], Entry::Listener { .. })).collect();
        for slot in listeners {
            self.table.remove(slot);
        }
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.send(());
        }
    }
}

fn token(owner: Owner, role: u64) -> u64 {
    debug_assert!(owner.slot < 1 << 30, "a slot fits in 30 bits");
    (owner.id as u32 as u64) << 32 | (owner.slot as u64) << 2 | role
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use crate::config::ProxyConfig;
    use crate::drain::InFlight;
    use crate::metrics::{Direction, Metrics};
    use crate::socket::Source;

    /// Sends every connection to one address, as if the capture rules had.
    struct To(SocketAddr);

    impl TrafficPath for To {
        fn direction(&self) -> Direction {
            Direction::Outbound
        }
        fn destination(&self, _client: &TcpStream, _ipv6: bool) -> io::Result<SocketAddr> {
            Ok(self.0)
        }
        fn source(&self, _client: SocketAddr, _dest: SocketAddr) -> Source {
            Source::Any
        }
    }

    /// A worker on a loopback listener whose connections all go to `upstream`; its address.
    fn worker_to(upstream: SocketAddr, flags: &[&str]) -> SocketAddr {
        let config = ProxyConfig::parse_from(["capture-proxy"].iter().chain(flags)).unwrap();
        let shared = Arc::new(Shared::new(&config, Arc::new(Metrics::default()), InFlight::new(10)));
        let listener = socket::listen("127.0.0.1:0".parse().unwrap(), false, false).unwrap();
        let addr = listener.local_addr().unwrap();
        let (worker, _stop) = Worker::new(vec![(listener, Arc::new(To(upstream)))], shared).unwrap();
        std::thread::spawn(move || worker.run());
        addr
    }

    #[test]
    fn the_clients_fin_goes_on_and_the_answer_comes_back() {
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = worker_to(app.local_addr().unwrap(), &[]);
        let serving = std::thread::spawn(move || {
            let (mut stream, _) = app.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut request = Vec::new();
            stream.read_to_end(&mut request).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            stream.write_all(b"late answer").unwrap();
            request
        });
        let mut client = TcpStream::connect(proxy).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        client.write_all(b"ping\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "late answer");
        assert_eq!(serving.join().unwrap(), b"ping\n");
    }

    /// Connections that come and go leave nothing behind in the worker: no slot, no deadline.
    #[test]
    fn ended_connections_leave_no_slot_and_no_deadline() {
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let app_addr = app.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in app.incoming() {
                let mut stream = stream.unwrap();
                let mut byte = [0; 1];
                stream.read_exact(&mut byte).unwrap();
                stream.write_all(&byte).unwrap();
            }
        });
        let config = ProxyConfig::parse_from(["capture-proxy"]).unwrap();
        let shared = Arc::new(Shared::new(&config, Arc::new(Metrics::default()), InFlight::new(10)));
        let listener = socket::listen("127.0.0.1:0".parse().unwrap(), false, false).unwrap();
        let proxy = listener.local_addr().unwrap();
        let (mut worker, _stop) = Worker::new(vec![(listener, Arc::new(To(app_addr)))], shared).unwrap();
        let clients = std::thread::spawn(move || {
            for _ in 0..50 {
                let mut client = TcpStream::connect(proxy).unwrap();
                client.write_all(b"x").unwrap();
                let mut echo = [0; 1];
                client.read_exact(&mut echo).unwrap();
            }
        });
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let live = |worker: &Worker| worker.table.entries.iter().filter(|e| matches!(e, Entry::Connection { .. })).count();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !clients.is_finished() || live(&worker) > 0 {
            assert!(std::time::Instant::now() < deadline, "{} connections still open", live(&worker));
            worker.turn(&mut events, EpollTimeout::from(100u16)).unwrap();
        }
        clients.join().unwrap();
        assert_eq!(worker.timers.pending(), 0, "the ended connections' deadlines are kept");
    }

    #[test]
    fn silence_ends_a_connection_after_the_idle_timeout() {
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = worker_to(app.local_addr().unwrap(), &["--idle-timeout", "150ms"]);
        let started = std::time::Instant::now();
        let mut client = TcpStream::connect(proxy).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (mut upstream, _) = app.accept().unwrap();
        upstream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Activity puts the deadline off; then silence ends the connection, with a FIN both ways.
        std::thread::sleep(Duration::from_millis(100));
        client.write_all(b"x").unwrap();
        assert_eq!(upstream.read(&mut [0; 1]).unwrap(), 1);
        assert_eq!(client.read(&mut [0; 1]).unwrap(), 0, "the client's end was not closed");
        assert_eq!(upstream.read(&mut [0; 1]).unwrap(), 0, "the upstream's end was not closed");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "closed after {waited:?}, before 150 ms of silence");
    }

    /// A listener whose accept queue is full drops SYNs: the dial stays in progress, and the
    /// connect timeout resets the client.
    #[test]
    fn a_dial_not_answered_in_time_resets_the_client() {
        let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        full.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        full.listen(0).unwrap();
        let addr = full.local_addr().unwrap().as_socket().unwrap();
        let _filling_the_queue = TcpStream::connect(addr).unwrap();
        let proxy = worker_to(addr, &["--connect-timeout", "200ms"]);
        let started = std::time::Instant::now();
        let mut client = TcpStream::connect(proxy).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let error = client.read(&mut [0; 1]).expect_err("the client was not reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200), "reset after {waited:?}");
    }

    #[test]
    fn a_token_names_its_entry_and_not_the_next_one_in_its_slot() {
        let mut table = Table { entries: Vec::new(), vacant: None, next_id: 0 };
        let listener = |_| Listener {
            socket: socket::listen("127.0.0.1:0".parse().unwrap(), false, false).unwrap().into(),
            path: Arc::new(To("127.0.0.1:1".parse().unwrap())),
            failures: AcceptFailures::default(),
            backing_off: false,
        };
        let (slot, id) = table.insert(|id| Entry::Listener { id, listener: listener(id) });
        let first = token(Owner { slot, id }, CLIENT);
        assert_eq!(table.named_by(first), Some(slot));
        table.remove(slot);
        assert_eq!(table.named_by(first), None, "a vacant slot");
        let (again, next) = table.insert(|id| Entry::Listener { id, listener: listener(id) });
        assert_eq!(again, slot, "the slot is reused");
        assert_eq!(table.named_by(first), None, "the slot's next entry");
        assert_eq!(table.named_by(token(Owner { slot, id: next }, CLIENT)), Some(slot));
    }
}
