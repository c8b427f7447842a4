//! Every socket option the proxy uses, behind small safe functions.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::timers::Timers;

/// Listening backlog, as Envoy's default.
const BACKLOG: i32 = 1024;

/// How long an accept loop waits after a failed accept before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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

/// The next connection on `listener` (serving `role`). A failed accept (EMFILE or ENFILE at the
/// descriptor limit, typically) leaves the connection in the backlog and the listener readable,
/// so trying again at once would spin: wait a little first, and log the first failure of a run.
pub async fn accept(listener: &TcpListener, role: &'static str, timers: &Timers) -> (TcpStream, SocketAddr) {
    let mut failures = 0u64;
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                if failures > 0 {
                    info!(role, failures, "accepting again");
                }
                return accepted;
            }
            Err(error) if failures == 0 => warn!(role, %error, "accept failed; retrying every {ACCEPT_BACKOFF:?}"),
            Err(error) => debug!(role, %error, "accept failed"),
        }
        failures += 1;
        timers.sleep(ACCEPT_BACKOFF).await;
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

/// Opens a TCP connection to `dest` from `source`.
pub async fn connect(dest: SocketAddr, source: Source) -> io::Result<TcpStream> {
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
    match socket.connect(&dest.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        other => other?,
    }
    // To a local address (the inbound path's upstream, always) the handshake has completed
    // within connect(): a connected socket needs no wait for writability, and no wake-up.
    let connected = socket.peer_addr().is_ok();
    let stream = TcpStream::from_std(socket.into())?;
    if !connected {
        stream.writable().await?;
        if let Some(error) = stream.take_error()? {
            return Err(error);
        }
    }
    Ok(stream)
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
    use std::pin::pin;

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

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = TcpListener::from_std(listen("127.0.0.1:0".parse().unwrap(), false, false).unwrap()).unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "the accepted socket has Nagle's algorithm on");
        assert!(!client.nodelay().unwrap(), "a plain socket has it on by default: the check means something");
    }

    #[tokio::test]
    async fn connects_to_a_local_listener_and_reports_a_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(addr, Source::Bound("127.0.0.1".parse().unwrap())).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(stream.local_addr().unwrap(), accepted.peer_addr().unwrap());
        assert!(stream.nodelay().unwrap());
        drop(listener);
        let refused = connect(addr, Source::Any).await.expect_err("nothing listens there any more");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A listener whose accept queue is full drops SYNs: a connect to it stays in progress until
    /// the queue has room and the SYN is sent again (after a second).
    #[tokio::test]
    async fn a_connect_not_answered_at_once_waits_for_the_handshake() {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let _filling_the_queue = std::net::TcpStream::connect(addr).unwrap();
        let mut connecting = pin!(connect(addr, Source::Any));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), connecting.as_mut()).await.is_err(),
            "connected although the listener's queue was full"
        );
        socket.accept().unwrap();
        let stream = tokio::time::timeout(Duration::from_secs(5), connecting).await.expect("the SYN was sent again").unwrap();
        assert_eq!(socket.accept().unwrap().0.peer_addr().unwrap().as_socket(), Some(stream.local_addr().unwrap()));
    }

    #[test]
    fn loopback_is_local_and_documentation_range_is_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(is_local("::".parse().unwrap()));
        assert!(!is_local("192.0.2.77".parse().unwrap()));
    }
}
