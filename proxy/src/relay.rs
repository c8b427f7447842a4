//! The relay: moves bytes both ways between a client and its upstream until both directions
//! have ended, passing each FIN on by itself (half-close) and stopping at the first error.
//!
//! It is driven by its worker's event loop (worker.rs): the loop records what epoll reported for
//! each socket ([`Socket::note`]) and calls [`Relay::step`], which moves what can be moved now and
//! says whether the connection waits for the kernel, has more to do, or is over. A connection's
//! whole relay state is a few words: no buffer and no pipe is held while nothing is in flight.

use std::cell::RefCell;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::epoll::EpollFlags;
use nix::sys::socket::MsgFlags;

use crate::config::RelayMode;
use crate::socket;

/// Which socket of the pair something happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum Close {
    /// Both directions ended with a FIN.
    Finished,
    /// Neither side sent anything for the idle timeout.
    Idle,
    /// A socket failed (typically a reset); the other one is reset too.
    Failed(Side, io::Error),
}

/// Bytes moved by one relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Client to upstream.
    pub upstream: u64,
    /// Upstream to client.
    pub downstream: u64,
}

/// The process-wide byte counters the relay adds to as it goes.
pub struct Totals<'a> {
    pub upstream: &'a AtomicU64,
    pub downstream: &'a AtomicU64,
}

/// A socket and what epoll last said of it (edge-triggered: a flag stays set until a call finds
/// the socket empty or full, and the next event sets it again).
#[derive(Debug)]
pub struct Socket {
    pub stream: TcpStream,
    readable: bool,
    writable: bool,
    /// The peer has sent FIN (or the socket failed): what is left to read ends with that, so
    /// a short read does not mean the socket has nothing more to say.
    hung_up: bool,
    failed: bool,
}

impl Socket {
    /// A socket taken to be `readable` and `writable` until a call finds otherwise: an accepted
    /// socket's first bytes may already be there, and a socket connected at once can take a
    /// first write without waiting for epoll to say so. A socket still connecting is neither:
    /// epoll reports when its handshake ends.
    pub fn new(stream: TcpStream, readable: bool, writable: bool) -> Socket {
        Socket { stream, readable, writable, hung_up: false, failed: false }
    }

    /// Records an epoll event. An error or hang-up makes the socket readable and writable too,
    /// so that the next call reports it.
    pub fn note(&mut self, events: EpollFlags) {
        let error = events.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP);
        self.readable |= error || events.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP);
        self.writable |= error || events.contains(EpollFlags::EPOLLOUT);
        self.hung_up |= error || events.contains(EpollFlags::EPOLLRDHUP);
        self.failed |= events.contains(EpollFlags::EPOLLERR);
    }

    /// What epoll must report for a relayed socket, edge-triggered.
    pub const EVENTS: EpollFlags =
        EpollFlags::EPOLLIN.union(EpollFlags::EPOLLOUT).union(EpollFlags::EPOLLRDHUP).union(EpollFlags::EPOLLET);

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Reads into `buffer` (WouldBlock when it has nothing; 0 at FIN) with recv(2): a socket's
    /// read(2) also passes through the file layer (position lock, permission hook, fsnotify),
    /// 0.3 µs of a 1-byte round trip. A read that returns less than asked for has emptied the
    /// socket (TCP reads stop only when the receive queue is empty), so the socket counts as
    /// empty at once, sparing the read that would only return EAGAIN; anything arriving later
    /// is a new edge, which epoll reports. Not after a FIN, whose edge has come already: the
    /// next read returns its 0.
    fn recv(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.attempt_read(|stream| Ok(nix::sys::socket::recv(stream.as_raw_fd(), buffer, MsgFlags::empty())?))?;
        if read > 0 && read < buffer.len() && !self.hung_up {
            self.readable = false;
        }
        Ok(read)
    }

    /// Sends `bytes` (MSG_NOSIGNAL: a reset peer is an error, not a SIGPIPE).
    fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.attempt_write(|stream| Ok(nix::sys::socket::send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL)?))
    }

    /// Runs a read while the socket may be readable.
    fn attempt_read(&mut self, read: impl FnOnce(&TcpStream) -> io::Result<usize>) -> io::Result<usize> {
        attempt(&mut self.readable, &self.stream, read)
    }

    /// Runs a write while the socket may be writable.
    fn attempt_write(&mut self, write: impl FnOnce(&TcpStream) -> io::Result<usize>) -> io::Result<usize> {
        attempt(&mut self.writable, &self.stream, write)
    }
}

/// Runs `call` on `stream` if epoll last said it was `ready` for it (WouldBlock if not); a
/// WouldBlock from the call clears `ready` until the next event.
fn attempt(ready: &mut bool, stream: &TcpStream, call: impl FnOnce(&TcpStream) -> io::Result<usize>) -> io::Result<usize> {
    if !*ready {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let result = call(stream);
    if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
        *ready = false;
    }
    result
}

/// What a step left the connection waiting for.
#[derive(Debug)]
pub enum Step {
    /// Every direction waits for a socket: the next event resumes it.
    Waiting,
    /// A direction stopped after its share of work with more to do: step again after the
    /// worker's other connections have had theirs.
    Busy,
    /// The relay is over; the caller closes both sockets (when both directions ended, that sends
    /// the last FIN on).
    Over(Close),
}

/// Both directions of one connection.
#[derive(Debug)]
pub struct Relay {
    sockets: [Socket; 2],
    up: Flow,
    down: Flow,
}

impl Relay {
    pub fn new(client: Socket, upstream: Socket, mode: RelayMode) -> Relay {
        let splice = mode == RelayMode::Splice;
        Relay {
            sockets: [client, upstream],
            up: Flow::new(Side::Client, Side::Upstream, splice),
            down: Flow::new(Side::Upstream, Side::Client, splice),
        }
    }

    pub fn socket(&self, side: Side) -> &Socket {
        &self.sockets[side.index()]
    }

    pub fn socket_mut(&mut self, side: Side) -> &mut Socket {
        &mut self.sockets[side.index()]
    }

    pub fn transferred(&self) -> Transferred {
        Transferred { upstream: self.up.bytes, downstream: self.down.bytes }
    }

    /// Moves what can be moved now. `moved` is set when any bytes were read (the idle clock).
    pub fn step(&mut self, totals: &Totals<'_>, moved: &mut bool) -> Step {
        let mut busy = false;
        for (flow, total) in [(&mut self.up, totals.upstream), (&mut self.down, totals.downstream)] {
            match flow.advance(&mut self.sockets, total) {
                Ok(Advance::Waiting) => {}
                Ok(Advance::Busy) => busy = true,
                Err((side, error)) => return Step::Over(Close::Failed(side, error)),
            }
            *moved |= flow.progressed;
        }
        // Once one direction has ended, its FIN is passed on and the socket it read from is
        // watched for a reset. Once both have, closing both sockets next sends the last FIN.
        let ended = match (self.up.ended, self.down.ended) {
            (true, true) => return Step::Over(Close::Finished),
            (true, false) => &mut self.up,
            (false, true) => &mut self.down,
            (false, false) => return if busy { Step::Busy } else { Step::Waiting },
        };
        if let Err((side, error)) = ended.pass_fin_on(&self.sockets) {
            return Step::Over(Close::Failed(side, error));
        }
        let reader = &self.sockets[ended.reader.index()];
        if reader.failed {
            return Step::Over(Close::Failed(ended.reader, socket::take_error(&reader.stream)));
        }
        if busy {
            Step::Busy
        } else {
            Step::Waiting
        }
    }
}

/// Steps one direction takes per turn before letting the worker's other connections run.
const STEPS_PER_TURN: usize = 16;

enum Advance {
    Waiting,
    Busy,
}

/// One direction: moves `reader`'s bytes to `writer` until `reader` sends FIN, which the relay
/// passes on. While nothing is in flight it holds no buffer and no pipe: bytes are read into the
/// worker's scratch buffer (or spliced into a pooled pipe) only once `reader` is readable, and
/// written on at once; only what `writer` cannot take yet is kept, until it can.
#[derive(Debug)]
struct Flow {
    reader: Side,
    writer: Side,
    bytes: u64,
    held: Option<Held>,
    splice: bool,
    /// This direction carries bulk data: it splices from now on (HAProxy's splice-auto).
    bulk: bool,
    /// `reader` has sent FIN.
    ended: bool,
    fin_passed: bool,
    progressed: bool,
}

impl Flow {
    fn new(reader: Side, writer: Side, splice: bool) -> Flow {
        Flow { reader, writer, bytes: 0, held: None, splice, bulk: false, ended: false, fin_passed: false, progressed: false }
    }

    /// Once `reader` has sent FIN, sends it on to `writer` (half-close), once.
    fn pass_fin_on(&mut self, sockets: &[Socket; 2]) -> Result<(), (Side, io::Error)> {
        if self.ended && !self.fin_passed {
            self.fin_passed = true;
            socket::shutdown_write(&sockets[self.writer.index()].stream).map_err(|e| (self.writer, e))?;
        }
        Ok(())
    }

    fn add(&mut self, written: usize, total: &AtomicU64) {
        self.bytes += written as u64;
        total.fetch_add(written as u64, Relaxed);
    }

    /// Moves what can be moved now (setting `progressed` if it read anything).
    fn advance(&mut self, sockets: &mut [Socket; 2], total: &AtomicU64) -> Result<Advance, (Side, io::Error)> {
        self.progressed = false;
        if self.ended {
            return Ok(Advance::Waiting);
        }
        let [client, upstream] = sockets;
        let (from, to) = match self.reader {
            Side::Client => (client, upstream),
            Side::Upstream => (upstream, client),
        };
        for _ in 0..STEPS_PER_TURN {
            if let Some(held) = self.held.as_mut() {
                match held.write(to) {
                    Ok(written) => {
                        if held.is_empty() {
                            if let Some(held) = self.held.take() {
                                held.release();
                            }
                        }
                        self.add(written, total);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Advance::Waiting),
                    Err(e) => return Err((self.writer, e)),
                }
            }
            let attempt = if self.bulk { Pipe::relay(from, to) } else { relay_through_scratch(from, to) };
            let Moved { read, written, rest } = match attempt {
                Ok(moved) => moved,
                Err(Failure::Read(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Advance::Waiting),
                Err(Failure::Read(e)) => return Err((self.reader, e)),
                Err(Failure::Write(e)) => return Err((self.writer, e)),
            };
            if read == 0 {
                self.ended = true;
                return Ok(Advance::Waiting);
            }
            self.progressed = true;
            self.add(written, total);
            // A read that filled the scratch buffer means bulk data; small exchanges are as
            // cheap through the buffer.
            self.bulk |= self.splice && read == SCRATCH_SIZE;
            self.held = rest;
        }
        Ok(Advance::Busy)
    }
}

/// What one read-and-write step moved.
struct Moved {
    /// Bytes taken from the reader; 0 is its FIN.
    read: usize,
    /// Bytes the writer took at once.
    written: usize,
    /// What the writer could not take yet.
    rest: Option<Held>,
}

/// Why a step stopped: the reader (WouldBlock: nothing to read yet) or the writer failed.
enum Failure {
    Read(io::Error),
    Write(io::Error),
}

/// Bytes read but not yet written, kept by the direction only while the writer is backed up.
#[derive(Debug)]
enum Held {
    Bytes { bytes: Box<[u8]>, start: usize },
    Pipe(Pipe),
}

impl Held {
    fn is_empty(&self) -> bool {
        match self {
            Held::Bytes { bytes, start } => *start == bytes.len(),
            Held::Pipe(pipe) => pipe.held == 0,
        }
    }

    /// Writes some of the held bytes; returns how many.
    fn write(&mut self, to: &mut Socket) -> io::Result<usize> {
        match self {
            Held::Bytes { bytes, start } => {
                let written = to.send(&bytes[*start..])?;
                *start += written;
                Ok(written)
            }
            Held::Pipe(pipe) => pipe.drain(to),
        }
    }

    /// Frees what was held once it is all written: a pipe goes back to the worker's pool.
    fn release(self) {
        if let Held::Pipe(pipe) = self {
            pipe.give_back();
        }
    }
}

/// Each worker's one read buffer, lent to whichever connection is being served; a read larger
/// than this is bulk data.
const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// Reads what `from` has into the scratch buffer and writes it to `to`, keeping a copy of
/// only what `to` cannot take.
fn relay_through_scratch(from: &mut Socket, to: &mut Socket) -> Result<Moved, Failure> {
    SCRATCH.with_borrow_mut(|scratch| {
        let read = from.recv(scratch).map_err(Failure::Read)?;
        if read == 0 {
            return Ok(Moved { read, written: 0, rest: None });
        }
        let written = match to.send(&scratch[..read]) {
            Ok(written) => written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(Failure::Write(e)),
        };
        let rest = (written < read).then(|| Held::Bytes { bytes: scratch[written..read].into(), start: 0 });
        Ok(Moved { read, written, rest })
    })
}

/// A pipe that splice(2) moves bytes into from one socket and out of to the other, so they
/// never cross into userspace. Directions borrow one from their worker's pool only while
/// bytes are in it.
#[derive(Debug)]
struct Pipe {
    read_end: OwnedFd,
    write_end: OwnedFd,
    held: usize,
}

/// Empty pipes a worker keeps for the next bulk transfer; more are closed.
const PIPE_POOL: usize = 32;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// Larger than the default 64 KiB, fewer splice calls per megabyte.
    const SIZE: usize = 256 * 1024;
    const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

    /// An empty pipe from the worker's pool, or a new one.
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = PIPES.with_borrow_mut(Vec::pop) {
            return Ok(pipe);
        }
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Unprivileged processes may be capped by /proc/sys/fs/pipe-max-size; the default works too.
        let _ = fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(Self::SIZE as i32));
        Ok(Pipe { read_end, write_end, held: 0 })
    }

    /// Returns this empty pipe to the worker's pool, or closes it when the pool is full.
    fn give_back(self) {
        debug_assert_eq!(self.held, 0, "only empty pipes are pooled");
        PIPES.with_borrow_mut(|pool| {
            if pool.len() < PIPE_POOL {
                pool.push(self);
            }
        });
    }

    /// Splices what `from` has through a pooled pipe into `to`. Without a pipe to be had
    /// (descriptor limit), falls back to the scratch buffer.
    fn relay(from: &mut Socket, to: &mut Socket) -> Result<Moved, Failure> {
        let Ok(mut pipe) = Pipe::take() else { return relay_through_scratch(from, to) };
        // The pipe is empty here, so EAGAIN can only mean that the socket has nothing.
        let spliced = from.attempt_read(|stream| Ok(splice(stream, None, &pipe.write_end, None, Self::SIZE, Self::FLAGS)?));
        let read = match spliced {
            Ok(read) => read,
            Err(e) => {
                pipe.give_back();
                return Err(Failure::Read(e));
            }
        };
        if read == 0 {
            pipe.give_back();
            return Ok(Moved { read, written: 0, rest: None });
        }
        pipe.held = read;
        let written = match pipe.drain(to) {
            Ok(written) => written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(Failure::Write(e)),
        };
        let rest = if pipe.held == 0 {
            pipe.give_back();
            None
        } else {
            Some(Held::Pipe(pipe))
        };
        Ok(Moved { read, written, rest })
    }

    fn drain(&mut self, to: &mut Socket) -> io::Result<usize> {
        let (read_end, held) = (&self.read_end, self.held);
        let moved = to.attempt_write(|stream| Ok(splice(read_end, None, stream, None, held, Self::FLAGS)?))?;
        self.held -= moved;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::fd::AsFd;
    use std::time::Duration;

    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    /// A connected pair of loopback sockets: (the peer, the proxy's end, non-blocking).
    fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (end, _) = listener.accept().unwrap();
        end.set_nonblocking(true).unwrap();
        (peer, end)
    }

    /// Steps `relay` until it is over, waiting with poll(2) between steps as the worker waits
    /// with epoll, and reports readiness in epoll's terms.
    fn drive(relay: &mut Relay, totals: &Totals<'_>) -> Close {
        loop {
            match relay.step(totals, &mut false) {
                Step::Over(close) => return close,
                Step::Busy => continue,
                Step::Waiting => {}
            }
            let interest = PollFlags::POLLIN | PollFlags::POLLOUT;
            let mut fds = [Side::Client, Side::Upstream].map(|side| PollFd::new(relay.socket(side).stream.as_fd(), interest));
            poll(&mut fds, PollTimeout::from(10_000u16)).unwrap();
            let events: Vec<_> = fds.iter().map(|fd| fd.revents().unwrap_or(PollFlags::empty())).collect();
            for (side, revents) in [Side::Client, Side::Upstream].into_iter().zip(events) {
                let mut flags = EpollFlags::empty();
                for (poll_flag, epoll_flag) in [
                    (PollFlags::POLLIN, EpollFlags::EPOLLIN),
                    (PollFlags::POLLOUT, EpollFlags::EPOLLOUT),
                    (PollFlags::POLLERR, EpollFlags::EPOLLERR),
                    (PollFlags::POLLHUP, EpollFlags::EPOLLHUP),
                ] {
                    if revents.contains(poll_flag) {
                        flags |= epoll_flag;
                    }
                }
                relay.socket_mut(side).note(flags);
            }
        }
    }

    #[test]
    fn relays_bulk_both_ways_passing_each_fin_on_and_counts_it() {
        for mode in [RelayMode::Copy, RelayMode::Splice] {
            let (mut client, client_end) = connected();
            let (mut server, upstream_end) = connected();
            let (total_up, total_down) = (AtomicU64::new(0), AtomicU64::new(0));
            let request: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
            let talking = std::thread::spawn({
                let request = request.clone();
                move || {
                    let sending = std::thread::spawn(move || {
                        client.write_all(&request).unwrap();
                        client.shutdown(std::net::Shutdown::Write).unwrap();
                        client
                    });
                    let mut received = Vec::new();
                    server.read_to_end(&mut received).unwrap();
                    let mut client = sending.join().unwrap();
                    // The server answers after the client's FIN reached it.
                    server.write_all(&received[..1000]).unwrap();
                    server.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut answer = Vec::new();
                    client.read_to_end(&mut answer).unwrap();
                    (received, answer)
                }
            });
            let mut relay = Relay::new(Socket::new(client_end, true, true), Socket::new(upstream_end, false, true), mode);
            let close = drive(&mut relay, &Totals { upstream: &total_up, downstream: &total_down });
            let transferred = relay.transferred();
            // As the worker does, close both sockets as soon as the relay is over: that sends the last FIN.
            drop(relay);
            let (received, answer) = talking.join().unwrap();
            assert!(received == request, "{mode:?}: the request arrived changed");
            assert_eq!(answer, request[..1000]);
            assert!(matches!(close, Close::Finished), "{mode:?}: {close:?}");
            assert_eq!(transferred, Transferred { upstream: 3 << 20, downstream: 1000 });
            assert_eq!((total_up.load(Relaxed), total_down.load(Relaxed)), (3 << 20, 1000));
            // Bulk went through a pipe, which the finished relay gave back to this thread's pool.
            let pooled = PIPES.with_borrow(Vec::len);
            assert!(if mode == RelayMode::Splice { pooled >= 1 } else { pooled == 0 }, "{mode:?}: {pooled} pipes pooled");
        }
    }

    /// The client's first bytes reach a just connected upstream within the relay's first step,
    /// before epoll has reported the upstream writable (that would take an epoll_wait).
    #[test]
    fn the_first_bytes_go_out_in_the_first_step() {
        let (mut client, client_end) = connected();
        let (mut server, upstream_end) = connected();
        client.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut relay =
            Relay::new(Socket::new(client_end, true, true), Socket::new(upstream_end, false, true), RelayMode::Splice);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut moved = false;
        assert!(matches!(relay.step(&Totals { upstream: &up, downstream: &down }, &mut moved), Step::Waiting));
        assert!(moved, "reading the client's bytes counts as activity");
        server.set_nonblocking(true).unwrap();
        let mut received = [0; 8];
        assert_eq!(server.read(&mut received).map_err(|e| e.kind()), Ok(5));
        assert_eq!(&received[..5], b"hello");
    }

    #[test]
    fn a_reset_fails_the_relay_on_the_side_it_came_from() {
        let (client, client_end) = connected();
        let (_server, upstream_end) = connected();
        socket::abort_on_close(&client).unwrap();
        drop(client);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut relay = Relay::new(Socket::new(client_end, true, true), Socket::new(upstream_end, false, true), RelayMode::Copy);
        let close = drive(&mut relay, &Totals { upstream: &up, downstream: &down });
        assert!(matches!(close, Close::Failed(Side::Client, ref e) if e.kind() == io::ErrorKind::ConnectionReset), "{close:?}");
    }

    /// After the client's FIN, the relay no longer reads the client, but a reset from it still
    /// ends the relay at once, as a failure on the client's side.
    #[test]
    fn a_reset_after_a_half_close_still_ends_the_relay() {
        let (client, client_end) = connected();
        let (_server, upstream_end) = connected();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let totals = Totals { upstream: &up, downstream: &down };
        let mut relay = Relay::new(Socket::new(client_end, true, true), Socket::new(upstream_end, false, true), RelayMode::Copy);
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(relay.step(&totals, &mut false), Step::Waiting), "half-closed, the relay goes on");
        socket::abort_on_close(&client).unwrap();
        drop(client);
        let close = drive(&mut relay, &totals);
        // A reset on a socket whose peer had sent FIN (CLOSE_WAIT) is EPIPE to the kernel.
        assert!(matches!(close, Close::Failed(Side::Client, ref e) if e.kind() == io::ErrorKind::BrokenPipe), "{close:?}");
    }
}
