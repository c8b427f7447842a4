//! One connection's life, the same on both traffic paths: accept → find the original
//! destination → dial → relay → account. `inbound.rs` and `outbound.rs` supply the two steps
//! that differ; the worker (worker.rs) drives connections by what epoll reports.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::config::{ProxyConfig, RelayMode};
use crate::drain::{InFlight, Slot};
use crate::metrics::{Active, Direction, Metrics, Refusal};
use crate::relay::{Close, Relay, Side, Socket, Step, Totals};
use crate::socket::{self, Source};

/// One way into the pod or out of it.
pub trait TrafficPath: Send + Sync {
    fn direction(&self) -> Direction;

    /// Where the client meant to go; `ipv6` is the family of the accepted socket.
    fn destination(&self, client: &TcpStream, ipv6: bool) -> io::Result<SocketAddr>;

    /// The address the upstream connection leaves from.
    fn source(&self, client: SocketAddr, dest: SocketAddr) -> Source;
}

/// Settings and state every connection of either path uses.
pub struct Shared {
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    capture_ports: [u16; 2],
    connect_timeout: Duration,
    idle_timeout: Duration,
    relay: RelayMode,
}

impl Shared {
    pub fn new(config: &ProxyConfig, metrics: Arc<Metrics>, in_flight: InFlight) -> Shared {
        Shared {
            metrics,
            in_flight,
            capture_ports: config.capture_ports(),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            relay: config.relay,
        }
    }
}

/// Why a connection ended before its relay began.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no original destination: {0}")]
    NoDestination(io::Error),
    #[error("loop: {0} is the proxy's own listener")]
    Loop(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    ConnectTimeout(SocketAddr, Duration),
    #[error("cannot watch its sockets: {0}")]
    Watch(io::Error),
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ending {
    Refused(ForwardError),
    Relayed(Close),
}

/// An accepted connection and its upstream, from the dial on.
pub struct Connection {
    relay: Relay,
    /// While the upstream's handshake is in flight: when it began.
    dialing: Option<Instant>,
    direction: Direction,
    peer: SocketAddr,
    dest: SocketAddr,
    started: Instant,
    /// When the relay last read anything: the idle timeout counts from here.
    last_moved: Instant,
    _slot: Slot,
    _active: Active,
}

impl Connection {
    /// Dials the original destination of `client`, accepted on `path`. A connection that is
    /// refused (over `--max-connections`, no destination, a loop, a failed connect) is counted,
    /// logged and reset here, and None returned.
    pub fn open(
        client: TcpStream,
        accepted_from: SocketAddr,
        path: &dyn TrafficPath,
        shared: &Shared,
        now: Instant,
    ) -> Option<Connection> {
        // accept() reports the peer in the socket's own family; logs and TPROXY want it plain.
        let (ipv6, peer) = (accepted_from.is_ipv6(), socket::canonical(accepted_from));
        let direction = path.direction();
        let active = shared.metrics.accepted(direction);
        let metrics = shared.metrics.path(direction);
        let Some(slot) = shared.in_flight.admit() else {
            metrics.refused(Refusal::Limit);
            warn!(direction = direction.label(), src = %peer, "refused: --max-connections are already in flight");
            reset(&client);
            return None;
        };
        let dialed = path.destination(&client, ipv6).map_err(ForwardError::NoDestination).and_then(|dest| {
            if is_own_listener(dest, &shared.capture_ports, socket::is_local) {
                metrics.refused(Refusal::Loop);
                return Err(ForwardError::Loop(dest));
            }
            match socket::connect(dest, path.source(peer, dest)) {
                Ok(dialed) => Ok((dest, dialed)),
                Err(error) => {
                    metrics.connect_failed();
                    Err(ForwardError::Connect(dest, error))
                }
            }
        });
        let (dest, dialed) = match dialed {
            Ok(dialed) => dialed,
            Err(error) => {
                log_refusal(direction, peer, &error, now.elapsed());
                reset(&client);
                return None;
            }
        };
        if dialed.connected {
            metrics.connected_in(now.elapsed());
        }
        Some(Connection {
            // The upstream has sent nothing yet; epoll says when it does.
            relay: Relay::new(Socket::new(client, true, true), Socket::new(dialed.stream, false, dialed.connected), shared.relay),
            dialing: (!dialed.connected).then_some(now),
            direction,
            peer,
            dest,
            started: now,
            last_moved: now,
            _slot: slot,
            _active: active,
        })
    }

    pub fn socket(&self, side: Side) -> &Socket {
        self.relay.socket(side)
    }

    /// Records what epoll reported for one of the two sockets.
    pub fn note(&mut self, side: Side, events: nix::sys::epoll::EpollFlags) {
        self.relay.socket_mut(side).note(events);
    }

    /// Moves the connection on as far as it can go now: finishes the dial once the upstream
    /// reports, then relays.
    pub fn step(&mut self, shared: &Shared, now: Instant) -> Result<Step, Ending> {
        if let Some(began) = self.dialing {
            if !self.relay.socket(Side::Upstream).writable() {
                return Ok(Step::Waiting);
            }
            let metrics = shared.metrics.path(self.direction);
            if let Err(error) = socket::connect_result(&self.relay.socket(Side::Upstream).stream) {
                metrics.connect_failed();
                return Err(Ending::Refused(ForwardError::Connect(self.dest, error)));
            }
            metrics.connected_in(now - began);
            self.dialing = None;
        }
        let (upstream, downstream) = shared.metrics.path(self.direction).byte_counters();
        let mut moved = false;
        let step = self.relay.step(&Totals { upstream, downstream }, &mut moved);
        if moved {
            self.last_moved = now;
        }
        match step {
            Step::Over(close) => Err(Ending::Relayed(close)),
            step => Ok(step),
        }
    }

    /// When [`Connection::expire`] is next due: the connect timeout while dialing, else the idle
    /// timeout; None for a timeout past what the clock holds.
    pub fn deadline(&self, shared: &Shared) -> Option<Instant> {
        match self.dialing {
            Some(began) => began.checked_add(shared.connect_timeout),
            None => self.last_moved.checked_add(shared.idle_timeout),
        }
    }

    /// A deadline of this connection has come: Ok with the next one if the connection lives on.
    pub fn expire(&self, shared: &Shared, now: Instant) -> Result<Option<Instant>, Ending> {
        match self.deadline(shared) {
            Some(deadline) if deadline <= now => Err(match self.dialing {
                Some(_) => {
                    shared.metrics.path(self.direction).connect_failed();
                    Ending::Refused(ForwardError::ConnectTimeout(self.dest, shared.connect_timeout))
                }
                None => Ending::Relayed(Close::Idle),
            }),
            next => Ok(next),
        }
    }

    /// Logs how the connection ended and closes both sockets: a failure on either side reaches
    /// the other as a reset, not as a clean FIN.
    pub fn end(self, ending: Ending, now: Instant) {
        let lasted = now.saturating_duration_since(self.started);
        match &ending {
            Ending::Refused(error) => {
                log_refusal(self.direction, self.peer, error, lasted);
                reset(&self.relay.socket(Side::Client).stream);
            }
            Ending::Relayed(close) => {
                let bytes = self.relay.transferred();
                debug!(
                    direction = self.direction.label(),
                    src = %self.peer,
                    dst = %self.dest,
                    upstream_bytes = bytes.upstream,
                    downstream_bytes = bytes.downstream,
                    duration_ms = lasted.as_millis() as u64,
                    close = %describe(close),
                    "connection closed"
                );
                if let Close::Failed(..) = close {
                    reset(&self.relay.socket(Side::Client).stream);
                    reset(&self.relay.socket(Side::Upstream).stream);
                }
            }
        }
    }
}

/// Logs a connection that ended before its relay began, `lasted` after it was accepted.
fn log_refusal(direction: Direction, peer: SocketAddr, error: &ForwardError, lasted: Duration) {
    let direction = direction.label();
    if let ForwardError::Loop(_) = error {
        warn!(direction, src = %peer, %error, "refused");
    } else {
        debug!(direction, src = %peer, duration_ms = lasted.as_millis() as u64, close = %error, "connection closed");
    }
}

/// A connection to one of our own capture ports on this host would come straight back to us.
fn is_own_listener(dest: SocketAddr, capture_ports: &[u16], is_local: impl Fn(IpAddr) -> bool) -> bool {
    capture_ports.contains(&dest.port()) && is_local(dest.ip())
}

/// Closing after this sends RST.
fn reset(stream: &TcpStream) {
    let _ = socket::abort_on_close(stream);
}

fn describe(close: &Close) -> String {
    match close {
        Close::Finished => "finished".to_string(),
        Close::Idle => "idle timeout".to_string(),
        Close::Failed(side, error) => format!("{side} failed: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_guard_refuses_only_local_capture_ports() {
        let local = |ip: IpAddr| ip == "10.44.0.5".parse::<IpAddr>().unwrap() || ip.is_loopback();
        let ports = [15001, 15006];
        assert!(is_own_listener("10.44.0.5:15001".parse().unwrap(), &ports, local));
        assert!(is_own_listener("127.0.0.1:15006".parse().unwrap(), &ports, local));
        assert!(!is_own_listener("10.44.0.5:8080".parse().unwrap(), &ports, local), "an app port");
        assert!(!is_own_listener("10.44.0.9:15001".parse().unwrap(), &ports, local), "another pod's proxy");
        assert!(!is_own_listener("10.44.0.5:15021".parse().unwrap(), &ports, local), "health is not captured");
    }

    /// An idle relayed connection costs this, its slot in the worker's table, one deadline and
    /// its two sockets: keep it to a few hundred bytes (it was 264 when the worker's own loop
    /// replaced a tokio task of 856 bytes with two 256-byte socket registrations).
    #[test]
    fn a_connection_stays_small() {
        let size = std::mem::size_of::<Connection>();
        assert!(size <= 288, "a connection takes {size} bytes");
    }

    #[test]
    fn close_reasons_read_well_in_logs() {
        assert_eq!(describe(&Close::Finished), "finished");
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(describe(&Close::Failed(Side::Upstream, reset)), "upstream failed: connection reset");
    }
}
