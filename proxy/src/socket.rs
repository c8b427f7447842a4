//! Every socket option the proxy uses, behind small safe functions.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::net::TcpStream;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, SockRef, Socket, Type};
use tracing::{debug, info, warn};

/// Listening backlog, as Envoy's default.
const BACKLOG: i32 = 1024;

/// How long an accept loop waits after a failed accept before trying again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The IPv4 or IPv6 wildcard address with `port`.
pub fn any(ipv6: bool, port: u16) -> SocketAddr {
    let ip = if ipv6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    SocketAddr::new(ip, port)
}

/// A listening socket on `addr`. IPv6 sockets are IPv6-only (an IPv4 socket sits beside
/// them), `transparent` sockets accept TPROXY'd connections for any address, and
/// `per_worker` ones (SO_REUSEPORT) let each worker have its own listener on the port.
/// Accepted connections inherit TCP_NODELAY from it: the relay already batches what it has,
/// so small writes go out at once, without a setsockopt per connection.
pub fn listen(addr: SocketAddr, transparent: bool, per_worker: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(per_worker)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if transparent {
        set_transparent(&socket, addr.is_ipv6())?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The next connection on `listener`, non-blocking (WouldBlock when there is none yet), with
/// its peer's address.
pub fn accept(listener: &Socket) -> io::Result<(TcpStream, SocketAddr)> {
    let (stream, peer) = listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = peer.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the peer is not an IP address"))?;
    Ok((stream.into(), peer))
}

/// The failed accepts of one listener in a row. A failed accept (EMFILE or ENFILE at the
/// descriptor limit, typically) leaves the connection in the backlog and the listener readable,
/// so trying again at once would spin: the caller waits [`ACCEPT_BACKOFF`] first. The first
/// failure of a run is logged as a warning, the recovery as news.
#[derive(Default)]
pub struct AcceptFailures(u64);

impl AcceptFailures {
    pub fn failed(&mut self, role: &'static str, error: &io::Error) {
        if self.0 == 0 {
            warn!(role, %error, "accept failed; retrying every {ACCEPT_BACKOFF:?}");
        } else {
            debug!(role, %error, "accept failed");
        }
        self.0 += 1;
    }

    pub fn accepted(&mut self, role: &'static str) {
        if self.0 > 0 {
            info!(role, failures = self.0, "accepting again");
            self.0 = 0;
        }
    }
}

/// The destination the client asked for before NAT REDIRECT rewrote it (SO_ORIGINAL_DST, or
/// IP6T_SO_ORIGINAL_DST on an IPv6 socket).
pub fn original_destination(stream: &TcpStream, ipv6: bool) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let original = if ipv6 { socket.original_dst_v6()? } else { socket.original_dst_v4()? };
    original
        .as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "SO_ORIGINAL_DST is not an IP address"))
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) turned back into IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Makes closing `stream` send a reset instead of a FIN (SO_LINGER 0), so a peer learns that
/// the other side of the relay failed rather than finished.
pub fn abort_on_close(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO))
}

/// Sends FIN to the peer while still reading from it (half-close).
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer already went away; the other direction will report how.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// The pending error on a socket (such as a reset), if any.
pub fn take_error(stream: &TcpStream) -> io::Error {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => e,
        Ok(None) => io::ErrorKind::ConnectionReset.into(),
    }
}

/// Where an upstream connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Whatever address the kernel picks.
    Any,
    /// A fixed local address, such as 127.0.0.6 which the capture rules let through.
    Bound(IpAddr),
    /// Someone else's address (the client's), with IP_TRANSPARENT and the given SO_MARK.
    Spoofed { ip: IpAddr, mark: u32 },
}

/// A connection being opened.
#[derive(Debug)]
pub struct Dialed {
    pub stream: TcpStream,
    /// The handshake completed within connect(): to a local address (the inbound path's
    /// upstream, always) it does, and the connection needs no wait for writability, no wake-up.
    pub connected: bool,
}

/// Starts a non-blocking TCP connection to `dest` from `source`. A connection not `connected`
/// at once is, once its socket is writable, established or failed: see [`connect_result`].
pub fn connect(dest: SocketAddr, source: Source) -> io::Result<Dialed> {
    let socket = Socket::new(Domain::for_address(dest), Type::STREAM.nonblocking().cloexec(), None)?;
    socket.set_tcp_nodelay(true)?;
    let bind_ip = match source {
        Source::Any => None,
        Source::Bound(ip) => Some(ip),
        Source::Spoofed { ip, mark } => {
            set_transparent(&socket, dest.is_ipv6())?;
            socket.set_mark(mark)?;
            Some(ip)
        }
    };
    if let Some(ip) = bind_ip {
        // Let connect() choose the port by the whole 4-tuple: binding port 0 alone would
        // reserve one of ~28k ephemeral ports per source address, TIME_WAIT included.
        setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    let connected = match socket.connect(&dest.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => socket.peer_addr().is_ok(),
        other => other.map(|()| true)?,
    };
    Ok(Dialed { stream: socket.into(), connected })
}

/// How a connection that was in progress ended, once its socket reported writable or an error.
pub fn connect_result(stream: &TcpStream) -> io::Result<()> {
    match stream.take_error()? {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// True when `ip` belongs to this network namespace: only local addresses can be bound.
pub fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let Ok(probe) = Socket::new(Domain::for_address(SocketAddr::new(ip, 0)), Type::STREAM.cloexec(), None) else {
        return false;
    };
    probe.bind(&SocketAddr::new(ip, 0).into()).is_ok()
}

fn set_transparent(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.1.2.3:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
        let v4: SocketAddr = "10.1.2.3:443".parse().unwrap();
        assert_eq!(canonical(v4), v4);
        // IPv4-compatible (deprecated ::a.b.c.d) addresses are real IPv6 addresses.
        let compatible: SocketAddr = "[::10.1.2.3]:80".parse().unwrap();
        assert_eq!(canonical(compatible), compatible);
    }

    #[test]
    fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener: Socket = listen("127.0.0.1:0".parse().unwrap(), false, false).unwrap().into();
        let client = TcpStream::connect(listener.local_addr().unwrap().as_socket().unwrap()).unwrap();
        let (accepted, peer) = accept(&listener).unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap(), "the accepted socket has Nagle's algorithm on");
        assert!(!client.nodelay().unwrap(), "a plain socket has it on by default: the check means something");
        assert_eq!(accept(&listener).map_err(|e| e.kind()).err(), Some(io::ErrorKind::WouldBlock), "non-blocking");
    }

    #[test]
    fn connects_to_a_local_listener_at_once_and_reports_a_refusal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dialed = connect(addr, Source::Bound("127.0.0.1".parse().unwrap())).unwrap();
        assert!(dialed.connected, "a local connect completes within the call");
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(dialed.stream.local_addr().unwrap(), accepted.peer_addr().unwrap());
        assert!(dialed.stream.nodelay().unwrap());
        drop(listener);
        // The refusal is known at once, but reported as the socket's error once it is writable.
        let refused = connect(addr, Source::Any).unwrap();
        assert!(!refused.connected);
        let error = connect_result(&refused.stream).expect_err("nothing listens there any more");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A listener whose accept queue is full drops SYNs: a connect to it stays in progress until
    /// the queue has room and the SYN is sent again (after a second).
    #[test]
    fn a_connect_not_answered_at_once_is_in_progress_until_the_handshake() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let _filling_the_queue = TcpStream::connect(addr).unwrap();
        let dialed = connect(addr, Source::Any).unwrap();
        assert!(!dialed.connected, "connected although the listener's queue was full");
        let writable = |millis: u16| {
            let mut fds = [PollFd::new(dialed.stream.as_fd(), PollFlags::POLLOUT)];
            poll(&mut fds, PollTimeout::from(millis)).unwrap() == 1
        };
        assert!(!writable(300), "writable before the handshake");
        socket.accept().unwrap();
        assert!(writable(5000), "the SYN was not sent again");
        connect_result(&dialed.stream).unwrap();
        assert_eq!(socket.accept().unwrap().0.peer_addr().unwrap().as_socket(), Some(dialed.stream.local_addr().unwrap()));
    }

    #[test]
    fn loopback_is_local_and_documentation_range_is_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(is_local("::".parse().unwrap()));
        assert!(!is_local("192.0.2.77".parse().unwrap()));
    }
}
