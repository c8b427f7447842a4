//! The relay: moves bytes both ways between a client and its upstream until both directions
//! have ended, passing each FIN on by itself (half-close) and stopping at the first error.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::RelayMode;
use crate::socket;

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
/// moves for `idle_timeout`.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    mode: RelayMode,
    idle_timeout: Duration,
    totals: Totals<'_>,
) -> (Transferred, Close) {
    let started = Instant::now();
    let activity = Activity { started, last_ms: AtomicU64::new(0) };
    let up = Meter { conn: AtomicU64::new(0), total: totals.upstream, activity: &activity };
    let down = Meter { conn: AtomicU64::new(0), total: totals.downstream, activity: &activity };
    let splice = mode == RelayMode::Splice;
    let close = both_ways(client, upstream, &up, &down, splice, idle_timeout).await;
    (Transferred { upstream: up.conn.load(Relaxed), downstream: down.conn.load(Relaxed) }, close)
}

async fn both_ways(
    client: &TcpStream,
    upstream: &TcpStream,
    up: &Meter<'_>,
    down: &Meter<'_>,
    splice: bool,
    idle_timeout: Duration,
) -> Close {
    let relaying = async {
        let mut to_upstream = pin!(one_way(client, upstream, Side::Client, Side::Upstream, up, splice));
        let mut to_client = pin!(one_way(upstream, client, Side::Upstream, Side::Client, down, splice));
        // Once one direction has ended, the socket it read from is no longer polled for data;
        // watch it for a reset so that it still reaches the other side promptly.
        let (rest, ended_reader, side) = tokio::select! {
            ended = &mut to_upstream => { ended?; (to_client, client, Side::Client) }
            ended = &mut to_client => { ended?; (to_upstream, upstream, Side::Upstream) }
        };
        tokio::select! {
            ended = rest => ended,
            _ = ended_reader.ready(Interest::ERROR) => Err((side, socket::take_error(ended_reader))),
        }
    };
    tokio::select! {
        ended = relaying => match ended {
            Ok(()) => Close::Finished,
            Err((side, error)) => Close::Failed(side, error),
        },
        () = up.activity.idle_for(idle_timeout) => Close::Idle,
    }
}

/// Moves `from`'s bytes to `to` until `from` sends FIN, then passes the FIN on.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    reader: Side,
    writer: Side,
    meter: &Meter<'_>,
    splice: bool,
) -> Result<(), (Side, io::Error)> {
    let mut chunk = Chunk::Buffer(Buffer::new());
    loop {
        let read = loop {
            match chunk.fill(from) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => from.readable().await.map_err(|e| (reader, e))?,
                other => break other.map_err(|e| (reader, e))?,
            }
        };
        if read == 0 {
            return socket::shutdown_write(to).map_err(|e| (writer, e));
        }
        meter.activity.touch();
        let mut left = read;
        while left > 0 {
            match chunk.drain(to) {
                Ok(written) => {
                    left -= written;
                    meter.add(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await.map_err(|e| (writer, e))?,
                Err(e) => return Err((writer, e)),
            }
        }
        if splice {
            chunk.splice_if_bulk();
        }
    }
}

/// Where one direction holds bytes between reading them and writing them.
enum Chunk {
    Buffer(Buffer),
    Pipe(Pipe),
}

impl Chunk {
    /// Takes what `from` has (WouldBlock when nothing yet); 0 means FIN. Called only when
    /// the chunk is empty.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        match self {
            Chunk::Buffer(buffer) => buffer.fill(from),
            Chunk::Pipe(pipe) => pipe.fill(from),
        }
    }

    /// Gives `to` some of the held bytes (WouldBlock when it can take none now).
    fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        match self {
            Chunk::Buffer(buffer) => buffer.drain(to),
            Chunk::Pipe(pipe) => pipe.drain(to),
        }
    }

    /// Moves to splice once this direction carries bulk data (HAProxy's splice-auto): for
    /// small exchanges read/write is as cheap, and the pipe's two descriptors are not worth
    /// holding. Stays on the buffer when no pipe can be had (descriptor limit).
    fn splice_if_bulk(&mut self) {
        if let Chunk::Buffer(buffer) = self {
            if buffer.end >= Buffer::SPLICE_AFTER {
                if let Ok(pipe) = Pipe::new() {
                    *self = Chunk::Pipe(pipe);
                }
            }
        }
    }
}

/// A userspace buffer that starts small (most connections are short) and doubles, up to a
/// cap, each time a read fills it.
struct Buffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    /// Small, so that thousands of quiet connections cost little memory.
    const INITIAL: usize = 4 * 1024;
    const MAX: usize = 256 * 1024;
    /// A single read this large means bulk data.
    const SPLICE_AFTER: usize = 64 * 1024;

    fn new() -> Buffer {
        Buffer { bytes: vec![0; Self::INITIAL], start: 0, end: 0 }
    }

    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        if self.end == self.bytes.len() && self.bytes.len() < Self::MAX {
            self.bytes.resize(self.bytes.len() * 2, 0);
        }
        let capacity = self.bytes.len();
        let mut short_read = None;
        // A read that returns less than asked for has emptied the socket (TCP reads stop only
        // when the receive queue is empty), so tokio's readiness is cleared as after EAGAIN,
        // sparing the read that would only return EAGAIN. The clear keeps any event that
        // arrived after the read, exactly as for a real EAGAIN.
        let result = from.try_io(Interest::READABLE, || {
            let read = nix::unistd::read(from, &mut self.bytes)?;
            if read > 0 && read < capacity {
                short_read = Some(read);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(read)
        });
        let read = match (result, short_read) {
            (Err(e), Some(read)) if e.kind() == io::ErrorKind::WouldBlock => read,
            (result, _) => result?,
        };
        (self.start, self.end) = (0, read);
        Ok(read)
    }

    fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        let written = to.try_write(&self.bytes[self.start..self.end])?;
        self.start += written;
        Ok(written)
    }
}

/// A pipe that splice(2) moves bytes into from one socket and out of to the other, so they
/// never cross into userspace.
struct Pipe {
    read_end: OwnedFd,
    write_end: OwnedFd,
    held: usize,
}

impl Pipe {
    /// Larger than the default 64 KiB, fewer splice calls per megabyte.
    const SIZE: usize = 256 * 1024;
    const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

    fn new() -> io::Result<Self> {
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Unprivileged processes may be capped by /proc/sys/fs/pipe-max-size; the default works too.
        let _ = fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(Self::SIZE as i32));
        Ok(Pipe { read_end, write_end, held: 0 })
    }

    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        // The pipe is empty here, so EAGAIN can only mean that the socket has nothing.
        let moved =
            from.try_io(Interest::READABLE, || Ok(splice(from, None, &self.write_end, None, Self::SIZE, Self::FLAGS)?))?;
        self.held = moved;
        Ok(moved)
    }

    fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        let moved = to.try_io(Interest::WRITABLE, || Ok(splice(&self.read_end, None, to, None, self.held, Self::FLAGS)?))?;
        self.held -= moved;
        Ok(moved)
    }
}

/// When either direction last moved data.
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// Completes once nothing has moved for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.started + Duration::from_millis(self.last_ms.load(Relaxed));
            // Past what the clock can hold (Go's longest duration, about 292 years): never.
            let Some(deadline) = last.checked_add(timeout) else { return std::future::pending().await };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Counts one direction's bytes for the connection and for the process.
struct Meter<'a> {
    conn: AtomicU64,
    total: &'a AtomicU64,
    activity: &'a Activity,
}

impl Meter<'_> {
    fn add(&self, bytes: usize) {
        self.conn.fetch_add(bytes as u64, Relaxed);
        self.total.fetch_add(bytes as u64, Relaxed);
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
            let ((bytes, close), ()) =
                tokio::join!(relay(&client_end, &upstream_end, mode, Duration::from_secs(10), totals), talking);
            assert!(matches!(close, Close::Finished), "{mode:?}: {close:?}");
            assert_eq!(bytes, Transferred { upstream: 3 << 20, downstream: 1000 });
            assert_eq!((total_up.load(Relaxed), total_down.load(Relaxed)), (3 << 20, 1000));
        }
    }

    #[tokio::test]
    async fn a_reset_fails_the_relay_on_the_side_it_came_from() {
        let (client, client_end) = connected().await;
        let (_server, upstream_end) = connected().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
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
                Totals { upstream: &up, downstream: &down }
            ),
            resetting
        );
        assert!(matches!(close, Close::Failed(Side::Client, ref e) if e.kind() == io::ErrorKind::ConnectionReset), "{close:?}");
    }

    #[tokio::test]
    async fn silence_ends_the_relay_after_the_idle_timeout() {
        let (_client, client_end) = connected().await;
        let (_server, upstream_end) = connected().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let started = Instant::now();
        let (_, close) = relay(
            &client_end,
            &upstream_end,
            RelayMode::Splice,
            Duration::from_millis(100),
            Totals { upstream: &up, downstream: &down },
        )
        .await;
        assert!(matches!(close, Close::Idle), "{close:?}");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
