//! `--run-validation`: prove that the namespace really redirects, as Istio's istio-validation
//! container does.
//!
//! Listeners stand on the loopback address at the proxy's two capture ports. A client dials
//! the inbound passthrough address (127.0.0.6 / ::6) at a probe port nothing listens on; the
//! connection only succeeds if the OUTPUT rules redirected it to one of our listeners, and the
//! listener confirms by reading the original destination port (SO_ORIGINAL_DST). Run as the
//! proxy UID: only its traffic to the pod over `lo` is redirected this way.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};
use thiserror::Error;

use crate::config::{INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6};

#[derive(Debug, Error)]
pub enum ValidationError {
    #[error("no listener available on {addr} ports {ports:?}: {last}")]
    NoListener { addr: IpAddr, ports: Vec<u16>, last: io::Error },
    #[error(
        "iptables validation failed; workload is not ready for Istio: connections to {target} were not \
         redirected within {timeout:?} (last attempt: {last}). When using Istio CNI, this can occur if a \
         pod is scheduled before the node is ready; the repair controller (cni.repair.deletePods=true) \
         restarts such pods. Validation must run as the proxy UID."
    )]
    NotRedirected { target: SocketAddr, timeout: Duration, last: String },
}

/// What to probe.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Probe over IPv6 (the pod's first address is IPv6).
    pub ipv6: bool,
    /// The capture ports to listen on (outbound and inbound).
    pub listen_ports: Vec<u16>,
    /// The original destination port the client dials.
    pub probe_port: u16,
    pub timeout: Duration,
}

/// Succeeds once a redirected probe connection is seen; fails after `timeout`.
pub fn validate(probe: &Probe) -> Result<(), ValidationError> {
    let (listen_ip, target_ip): (IpAddr, IpAddr) = if probe.ipv6 {
        (Ipv6Addr::LOCALHOST.into(), INBOUND_PASSTHROUGH_V6.into())
    } else {
        (Ipv4Addr::LOCALHOST.into(), INBOUND_PASSTHROUGH_V4.into())
    };
    let target = SocketAddr::new(target_ip, probe.probe_port);
    let listeners = bind_listeners(listen_ip, &probe.listen_ports)?;
    let deadline = Instant::now() + probe.timeout;
    let confirmed = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let confirmed = Arc::clone(&confirmed);
            thread::spawn(move || serve(listener, target.port(), deadline, &confirmed))
        })
        .collect();
    let mut last = String::from("no attempt made");
    while !confirmed.load(Ordering::SeqCst) && Instant::now() < deadline {
        match dial(listen_ip, target, deadline) {
            Ok(()) => {}
            Err(e) => last = e.to_string(),
        }
        if confirmed.load(Ordering::SeqCst) {
            break;
        }
        thread::sleep(Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())));
    }
    for server in servers {
        let _ = server.join();
    }
    if confirmed.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(ValidationError::NotRedirected { target, timeout: probe.timeout, last })
    }
}

/// Listeners that share their ports with a proxy that may already run (SO_REUSEPORT);
/// a port that cannot be bound is skipped, as Istio does.
fn bind_listeners(ip: IpAddr, ports: &[u16]) -> Result<Vec<TcpListener>, ValidationError> {
    let mut listeners = Vec::new();
    let mut last = io::Error::other("no ports given");
    for &port in ports {
        match bind_reusable(SocketAddr::new(ip, port)) {
            Ok(l) => listeners.push(l),
            Err(e) => last = e,
        }
    }
    if listeners.is_empty() {
        return Err(ValidationError::NoListener { addr: ip, ports: ports.to_vec(), last });
    }
    Ok(listeners)
}

fn bind_reusable(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(16)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts until the deadline or confirmation; answers each connection with its original port.
fn serve(listener: TcpListener, probe_port: u16, deadline: Instant, confirmed: &AtomicBool) {
    while !confirmed.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let Some(port) = original_port(&conn) else { continue };
                let _ = conn.write_all(port.to_string().as_bytes());
                if port == probe_port {
                    confirmed.store(true, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn original_port(conn: &TcpStream) -> Option<u16> {
    let sock = SockRef::from(conn);
    let addr = match conn.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    addr.ok()?.as_socket().map(|a| a.port())
}

/// One probe connection from the loopback address; reads the listener's answer.
fn dial(source: IpAddr, target: SocketAddr, deadline: Instant) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    let budget = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
    socket.connect_timeout(&target.into(), budget.min(Duration::from_secs(1)))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbindable_ports_are_reported() {
        // Port 0 binds an ephemeral port, so use a port we hold ourselves without SO_REUSEPORT.
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let err = bind_listeners(Ipv4Addr::LOCALHOST.into(), &[port]).unwrap_err();
        assert!(matches!(err, ValidationError::NoListener { .. }), "{err}");
    }

    #[test]
    fn without_redirection_validation_times_out() {
        let probe = Probe { ipv6: false, listen_ports: vec![0], probe_port: 9, timeout: Duration::from_millis(300) };
        let err = validate(&probe).unwrap_err();
        assert!(matches!(err, ValidationError::NotRedirected { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.6:9"), "{err}");
    }
}
