//! What both traffic paths share: accept → find the original destination → dial → relay →
//! account. `inbound.rs` and `outbound.rs` supply the two steps that differ.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::{ProxyConfig, RelayMode};
use crate::copy::{self, Close, Transferred};
use crate::drain::{InFlight, Stop};
use crate::metrics::{Direction, Metrics, PathMetrics, Refusal};
use crate::socket::{self, Source};
use crate::timers::Timers;

/// One way into the pod or out of it.
pub trait TrafficPath: Send + Sync + 'static {
    const DIRECTION: Direction;

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
    timers: Timers,
}

impl Shared {
    pub fn new(config: &ProxyConfig, metrics: Arc<Metrics>, in_flight: InFlight, timers: Timers) -> Shared {
        Shared {
            metrics,
            in_flight,
            capture_ports: config.capture_ports(),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            relay: config.relay,
            timers,
        }
    }
}

/// Accepts connections on `listener` until `stop`, each handled in its own task.
pub async fn serve<P: TrafficPath>(listener: TcpListener, path: Arc<P>, shared: Arc<Shared>, mut stop: Stop) {
    loop {
        let (client, peer) = tokio::select! {
            () = stop.stopped() => return,
            accepted = socket::accept(&listener, P::DIRECTION.label(), &shared.timers) => accepted,
        };
        tokio::spawn(handle(client, peer, path.clone(), shared.clone()));
    }
}

async fn handle<P: TrafficPath>(client: TcpStream, accepted_from: SocketAddr, path: Arc<P>, shared: Arc<Shared>) {
    // accept() reports the peer in the socket's own family; logs and TPROXY want it plain.
    let (ipv6, peer) = (accepted_from.is_ipv6(), socket::canonical(accepted_from));
    let metrics = shared.metrics.path(P::DIRECTION);
    let _active = metrics.accepted();
    let direction = P::DIRECTION.label();
    let Some(_slot) = shared.in_flight.admit() else {
        metrics.refused(Refusal::Limit);
        warn!(direction, src = %peer, "refused: --max-connections are already in flight");
        return reset(&client);
    };
    let started = Instant::now();
    match forward(&client, peer, ipv6, &*path, &shared, metrics).await {
        Ok((dest, bytes, close)) => debug!(
            direction,
            src = %peer,
            dst = %dest,
            upstream_bytes = bytes.upstream,
            downstream_bytes = bytes.downstream,
            duration_ms = started.elapsed().as_millis() as u64,
            close = %describe(&close),
            "connection closed"
        ),
        Err(error) => {
            if let ForwardError::Loop(_) = error {
                warn!(direction, src = %peer, %error, "refused");
            } else {
                let duration_ms = started.elapsed().as_millis() as u64;
                debug!(direction, src = %peer, duration_ms, close = %error, "connection closed");
            }
            reset(&client);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no original destination: {0}")]
    NoDestination(io::Error),
    #[error("loop: {0} is the proxy's own listener")]
    Loop(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    ConnectTimeout(SocketAddr, Duration),
}

async fn forward<P: TrafficPath>(
    client: &TcpStream,
    peer: SocketAddr,
    ipv6: bool,
    path: &P,
    shared: &Shared,
    metrics: &PathMetrics,
) -> Result<(SocketAddr, Transferred, Close), ForwardError> {
    let dest = path.destination(client, ipv6).map_err(ForwardError::NoDestination)?;
    if is_own_listener(dest, &shared.capture_ports, socket::is_local) {
        metrics.refused(Refusal::Loop);
        return Err(ForwardError::Loop(dest));
    }

    let dialing = Instant::now();
    let connecting = shared.timers.timeout(shared.connect_timeout, socket::connect(dest, path.source(peer, dest)));
    let upstream = match connecting.await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            metrics.connect_failed();
            return Err(ForwardError::Connect(dest, error));
        }
        Err(_) => {
            metrics.connect_failed();
            return Err(ForwardError::ConnectTimeout(dest, shared.connect_timeout));
        }
    };
    metrics.connected_in(dialing.elapsed());

    let (upstream_total, downstream_total) = metrics.byte_counters();
    let totals = copy::Totals { upstream: upstream_total, downstream: downstream_total };
    let (bytes, close) = copy::relay(client, &upstream, shared.relay, shared.idle_timeout, &shared.timers, totals).await;
    if let Close::Failed(..) = close {
        // Whichever side failed is gone; the other learns it with a reset, not a clean FIN.
        reset(client);
        reset(&upstream);
    }
    Ok((dest, bytes, close))
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

    /// An idle relayed connection costs its task, two socket registrations and nothing else:
    /// keep the task to a few hundred bytes (it was 1,680 with an async block per direction).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let config = ProxyConfig::parse_from(["capture-proxy"]).unwrap();
        let shared = Arc::new(Shared::new(&config, Arc::default(), InFlight::new(1), Timers::current()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let task = handle(client, addr, Arc::new(crate::outbound::Outbound), shared);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "a connection's task takes {size} bytes");
    }

    #[test]
    fn close_reasons_read_well_in_logs() {
        assert_eq!(describe(&Close::Finished), "finished");
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(describe(&Close::Failed(copy::Side::Upstream, reset)), "upstream failed: connection reset");
    }
}
