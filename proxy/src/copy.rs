//! The relay: moves bytes both ways between a client and its upstream until both directions
//! have ended, passing each FIN on by itself (half-close) and stopping at the first error.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::MsgFlags;
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::RelayMode;
use crate::socket;
use crate::timers::Timers;

/// Which socket of the pair something happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
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
    /// A socket failed (typically a reset); the caller resets the other one.
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

/// Relays between `client` and `upstream` until both directions end, one fails, or nothing
/// moves for `idle_timeout` (a timer from `timers`). The caller closes both sockets as soon as it returns: when both
/// directions ended, that sends the last FIN on.
///
/// One hand-written poll drives both directions, so a connection's whole relay state is a few
/// words and its timer: each socket's readiness is awaited through its own reader and writer
/// wake-up slots (`poll_read_ready`, `poll_write_ready`), with no waiter kept in the task.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    mode: RelayMode,
    idle_timeout: Duration,
    timers: &Timers,
    totals: Totals<'_>,
) -> (Transferred, Close) {
    let splice = mode == RelayMode::Splice;
    let mut up = Flow::new(client, upstream, Side::Client, Side::Upstream, totals.upstream, splice);
    let mut down = Flow::new(upstream, client, Side::Upstream, Side::Client, totals.downstream, splice);
    let mut idle = Idle::new(idle_timeout);
    let mut idle_timer = pin!(timers.sleep(idle_timeout));
    // The socket a direction that has ended read from is no longer polled for data: its reset
    // is watched for separately, so that it still reaches the other side promptly.
    let mut ended_reader = None;
    let close = std::future::poll_fn(|cx| {
        let mut moved = false;
        for flow in [&mut up, &mut down] {
            if let Poll::Ready(Err((side, error))) = flow.poll(cx) {
                return Poll::Ready(Close::Failed(side, error));
            }
            moved |= flow.progressed;
        }
        // Once one direction has ended, its FIN is passed on and the socket it read from is
        // watched for a reset. Once both have, closing both sockets next sends the last FIN.
        let half_closed = match (up.ended(), down.ended()) {
            (true, true) => return Poll::Ready(Close::Finished),
            (true, false) => Some((&mut up, client, Side::Client)),
            (false, true) => Some((&mut down, upstream, Side::Upstream)),
            (false, false) => None,
        };
        if let Some((ended, reader, side)) = half_closed {
            if let Err((side, error)) = ended.pass_fin_on() {
                return Poll::Ready(Close::Failed(side, error));
            }
            if let Poll::Ready(error) = watch_for_reset(&mut ended_reader, reader, cx) {
                return Poll::Ready(Close::Failed(side, error));
            }
        }
        if moved {
            idle.touch();
        }
        match idle.poll(idle_timer.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Close::Idle),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    (Transferred { upstream: up.bytes, downstream: down.bytes }, close)
}

/// A boxed wait for an error on `socket`, made the first time it is needed (only half-closed
/// connections need one); ready with the socket's error.
fn watch_for_reset<'a>(
    watch: &mut Option<Pin<Box<dyn Future<Output = io::Result<Ready>> + Send + 'a>>>,
    socket: &'a TcpStream,
    cx: &mut Context<'_>,
) -> Poll<io::Error> {
    let waiting = watch.get_or_insert_with(|| Box::pin(socket.ready(Interest::ERROR)));
    waiting.as_mut().poll(cx).map(|_| socket::take_error(socket))
}

/// When the relay last moved data, and the timer that ends it after `timeout` of silence.
struct Idle {
    timeout: Duration,
    last: Instant,
}

impl Idle {
    fn new(timeout: Duration) -> Idle {
        Idle { timeout, last: Instant::now() }
    }

    fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// Ready once nothing has moved for the timeout. The timer is only moved when it fires
    /// early, not on every step.
    fn poll(&self, mut timer: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<()> {
        while timer.as_mut().poll(cx).is_ready() {
            // Past what the clock can hold (Go's longest duration, about 292 years): never.
            let Some(deadline) = self.last.checked_add(self.timeout) else { return Poll::Pending };
            if deadline <= Instant::now() {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Steps one direction takes per poll before letting other connections run.
const STEPS_PER_POLL: usize = 16;

/// One direction: moves `from`'s bytes to `to` until `from` sends FIN, which the relay passes on.
/// While nothing is in flight it holds no buffer and no pipe: bytes are read into the worker's
/// scratch buffer (or spliced into a pooled pipe) only once `from` is readable, and written on at
/// once; only what `to` cannot take yet is kept, until it can.
struct Flow<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    reader: Side,
    writer: Side,
    total: &'a AtomicU64,
    bytes: u64,
    held: Option<Held>,
    splice: bool,
    /// This direction carries bulk data: it splices from now on (HAProxy's splice-auto).
    bulk: bool,
    /// `from` has sent FIN.
    ended: bool,
    fin_passed: bool,
    progressed: bool,
}

impl<'a> Flow<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, reader: Side, writer: Side, total: &'a AtomicU64, splice: bool) -> Self {
        Flow {
            from,
            to,
            reader,
            writer,
            total,
            bytes: 0,
            held: None,
            splice,
            bulk: false,
            ended: false,
            fin_passed: false,
            progressed: false,
        }
    }

    fn ended(&self) -> bool {
        self.ended
    }

    /// Once `from` has sent FIN, sends it on to `to` (half-close), once.
    fn pass_fin_on(&mut self) -> Result<(), (Side, io::Error)> {
        if self.ended && !self.fin_passed {
            self.fin_passed = true;
            socket::shutdown_write(self.to).map_err(|e| (self.writer, e))?;
        }
        Ok(())
    }

    fn add(&mut self, written: usize) {
        self.bytes += written as u64;
        self.total.fetch_add(written as u64, Relaxed);
    }

    /// Moves what can be moved now (setting `progressed` if it read anything): Ready(Ok) once
    /// the direction has ended, Pending while it waits for a socket.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), (Side, io::Error)>> {
        self.progressed = false;
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..STEPS_PER_POLL {
            if let Some(held) = self.held.as_mut() {
                match held.write(self.to) {
                    Ok(written) => {
                        if held.is_empty() {
                            if let Some(held) = self.held.take() {
                                held.release();
                            }
                        }
                        self.add(written);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.to.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err((self.writer, e))),
                        Poll::Pending => return Poll::Pending,
                    },
                    Err(e) => return Poll::Ready(Err((self.writer, e))),
                }
            }
            let attempt = if self.bulk { Pipe::relay(self.from, self.to) } else { relay_through_scratch(self.from, self.to) };
            let Moved { read, written, rest } = match attempt {
                Ok(moved) => moved,
                Err(Failure::Read(e)) if e.kind() == io::ErrorKind::WouldBlock => match self.from.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((self.reader, e))),
                    Poll::Pending => return Poll::Pending,
                },
                Err(Failure::Read(e)) => return Poll::Ready(Err((self.reader, e))),
                Err(Failure::Write(e)) => return Poll::Ready(Err((self.writer, e))),
            };
            if read == 0 {
                self.ended = true;
                return Poll::Ready(Ok(()));
            }
            self.progressed = true;
            self.add(written);
            // A read that filled the scratch buffer means bulk data; small exchanges are as
            // cheap through the buffer.
            self.bulk |= self.splice && read == SCRATCH_SIZE;
            self.held = rest;
        }
        // Busy: let the worker's other connections run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
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
    fn write(&mut self, to: &TcpStream) -> io::Result<usize> {
        match self {
            Held::Bytes { bytes, start } => {
                let written = to.try_write(&bytes[*start..])?;
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
fn relay_through_scratch(from: &TcpStream, to: &TcpStream) -> Result<Moved, Failure> {
    SCRATCH.with_borrow_mut(|scratch| {
        let read = read_draining(from, scratch).map_err(Failure::Read)?;
        if read == 0 {
            return Ok(Moved { read, written: 0, rest: None });
        }
        let written = match write_unreported(to, &scratch[..read]) {
            Ok(written) => written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(Failure::Write(e)),
        };
        let rest = (written < read).then(|| Held::Bytes { bytes: scratch[written..read].into(), start: 0 });
        Ok(Moved { read, written, rest })
    })
}

/// Writes to `to` even before the runtime has reported it writable: a freshly connected upstream
/// is, and the runtime learns so only from its next epoll_wait, a wake-up later. Once a write has
/// found `to` full, its direction keeps what was left and waits for the runtime's report before
/// writing again, so this never retries a full socket.
fn write_unreported(to: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let send = || Ok(nix::sys::socket::send(to.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL)?);
    let mut tried = false;
    match to.try_io(Interest::WRITABLE, || {
        tried = true;
        send()
    }) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && !tried => send(),
        result => result,
    }
}

/// Reads from `from` into `buffer` (WouldBlock when it has nothing yet; 0 at FIN), with recv(2):
/// a socket's read(2) also passes through the file layer (position lock, permission hook,
/// fsnotify), 0.3 µs of a 1-byte round trip.
fn read_draining(from: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    let capacity = buffer.len();
    let mut short_read = None;
    // A read that returns less than asked for has emptied the socket (TCP reads stop only when
    // the receive queue is empty), so tokio's readiness is cleared as after EAGAIN, sparing the
    // read that would only return EAGAIN. The clear keeps any event that arrived after the
    // read, exactly as for a real EAGAIN.
    let result = from.try_io(Interest::READABLE, || {
        let read = nix::sys::socket::recv(from.as_raw_fd(), buffer, MsgFlags::empty())?;
        if read > 0 && read < capacity {
            short_read = Some(read);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(read)
    });
    match (result, short_read) {
        (Err(e), Some(read)) if e.kind() == io::ErrorKind::WouldBlock => Ok(read),
        (result, _) => result,
    }
}

/// A pipe that splice(2) moves bytes into from one socket and out of to the other, so they
/// never cross into userspace. Directions borrow one from their worker's pool only while
/// bytes are in it.
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
    fn relay(from: &TcpStream, to: &TcpStream) -> Result<Moved, Failure> {
        let Ok(mut pipe) = Pipe::take() else { return relay_through_scratch(from, to) };
        // The pipe is empty here, so EAGAIN can only mean that the socket has nothing.
        let spliced = from.try_io(Interest::READABLE, || Ok(splice(from, None, &pipe.write_end, None, Self::SIZE, Self::FLAGS)?));
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

    fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        let moved = to.try_io(Interest::WRITABLE, || Ok(splice(&self.read_end, None, to, None, self.held, Self::FLAGS)?))?;
        self.held -= moved;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets: (the peer, the proxy's end).
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (peer, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn relays_bulk_both_ways_passing_each_fin_on_and_counts_it() {
        for mode in [RelayMode::Copy, RelayMode::Splice] {
            let (mut client, client_end) = connected().await;
            let (mut server, upstream_end) = connected().await;
            let (total_up, total_down) = (AtomicU64::new(0), AtomicU64::new(0));
            let totals = Totals { upstream: &total_up, downstream: &total_down };
            let request: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
            let talking = async {
                client.write_all(&request).await.unwrap();
                client.shutdown().await.unwrap();
                let mut received = Vec::new();
                server.read_to_end(&mut received).await.unwrap();
                assert!(received == request, "{mode:?}: the request arrived changed");
                // The server answers after the client's FIN reached it.
                server.write_all(&received[..1000]).await.unwrap();
                server.shutdown().await.unwrap();
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.unwrap();
                assert_eq!(answer, request[..1000]);
            };
            // As the proxy does, close both sockets as soon as the relay returns: that sends the last FIN.
            let relaying =
                async move { relay(&client_end, &upstream_end, mode, Duration::from_secs(10), &Timers::current(), totals).await };
            let ((bytes, close), ()) = tokio::join!(relaying, talking);
            assert!(matches!(close, Close::Finished), "{mode:?}: {close:?}");
            assert_eq!(bytes, Transferred { upstream: 3 << 20, downstream: 1000 });
            assert_eq!((total_up.load(Relaxed), total_down.load(Relaxed)), (3 << 20, 1000));
            // Bulk went through a pipe, which the finished relay gave back to this worker's pool.
            let pooled = PIPES.with_borrow(Vec::len);
            assert!(if mode == RelayMode::Splice { pooled >= 1 } else { pooled == 0 }, "{mode:?}: {pooled} pipes pooled");
        }
    }

    /// The client's first bytes reach a just connected upstream within the relay's first poll,
    /// before the runtime has reported the upstream writable (that would take an epoll_wait).
    #[tokio::test]
    async fn the_first_bytes_go_out_in_the_first_poll() {
        struct Unused;
        impl std::task::Wake for Unused {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let (mut client, client_end) = connected().await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream_end = socket::connect(listener.local_addr().unwrap(), socket::Source::Any).await.unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"hello").await.unwrap();
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let totals = Totals { upstream: &up, downstream: &down };
        let timers = Timers::current();
        let mut relaying = pin!(relay(&client_end, &upstream_end, RelayMode::Splice, Duration::from_secs(10), &timers, totals));
        let waker = std::task::Waker::from(std::sync::Arc::new(Unused));
        assert!(relaying.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
        server.set_nonblocking(true).unwrap();
        let mut received = [0; 8];
        assert_eq!(std::io::Read::read(&mut server, &mut received).map_err(|e| e.kind()), Ok(5));
        assert_eq!(&received[..5], b"hello");
    }

    #[tokio::test]
    async fn a_reset_fails_the_relay_on_the_side_it_came_from() {
        let (client, client_end) = connected().await;
        let (_server, upstream_end) = connected().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let timers = Timers::current();
        let resetting = async {
            socket::abort_on_close(&client).unwrap();
            drop(client);
        };
        let ((_, close), ()) = tokio::join!(
            relay(
                &client_end,
                &upstream_end,
                RelayMode::Copy,
                Duration::from_secs(10),
                &timers,
                Totals { upstream: &up, downstream: &down }
            ),
            resetting
        );
        assert!(matches!(close, Close::Failed(Side::Client, ref e) if e.kind() == io::ErrorKind::ConnectionReset), "{close:?}");
    }

    /// As on a worker, whose runtime has no time driver: the idle timer is another runtime's.
    #[tokio::test]
    async fn silence_ends_the_relay_after_the_idle_timeout() {
        let (_client, client_end) = connected().await;
        let (_server, upstream_end) = connected().await;
        let (client_end, upstream_end) = (client_end.into_std().unwrap(), upstream_end.into_std().unwrap());
        let timers = Timers::current();
        let worker = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
            runtime.block_on(async {
                let (client_end, upstream_end) =
                    (TcpStream::from_std(client_end).unwrap(), TcpStream::from_std(upstream_end).unwrap());
                let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
                let started = Instant::now();
                let totals = Totals { upstream: &up, downstream: &down };
                let (_, close) =
                    relay(&client_end, &upstream_end, RelayMode::Splice, Duration::from_millis(100), &timers, totals).await;
                (close, started.elapsed())
            })
        });
        let (close, elapsed) = tokio::task::spawn_blocking(move || worker.join().unwrap()).await.unwrap();
        assert!(matches!(close, Close::Idle), "{close:?}");
        assert!(elapsed >= Duration::from_millis(100));
    }
}
