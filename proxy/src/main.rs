//! capture-proxy: the sidecar data plane behind istio-iptables. It accepts the connections
//! the capture rules send to its outbound (15001) and inbound (15006) ports and forwards
//! each to its original destination, like Envoy's virtualOutbound/virtualInbound listeners
//! in passthrough mode.

#![deny(unsafe_code)]

mod admin;
mod config;
mod copy;
mod drain;
mod inbound;
mod metrics;
mod outbound;
mod privileges;
mod proxy;
mod socket;

use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::Endpoint;
use crate::config::{InboundMode, ProxyConfig};
use crate::drain::InFlight;
use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::proxy::Shared;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Privileges(#[from] privileges::Error),
    #[error("cannot listen on {addr} ({role}): {source}")]
    Listen { role: &'static str, addr: SocketAddr, source: io::Error },
    #[error("cannot start: {0}")]
    Runtime(io::Error),
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if let Some(exit) = cli_docs::generate_if_requested(&args, <ProxyConfig as clap::CommandFactory>::command) {
        return exit;
    }
    let config = ProxyConfig::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| "info".into()))
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("capture-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: ProxyConfig) -> Result<(), Error> {
    privileges::check_uid(nix::unistd::getuid().as_raw(), config.proxy_uid, config.allow_any_uid)?;
    privileges::acquire(config.inbound_mode)?;
    raise_open_files_limit();
    let listeners = Listeners::bind(&config)?;
    // Capabilities belong to threads: drop them while this is the only one, so that the
    // runtime's threads, started next, inherit the reduced set.
    privileges::drop_unneeded(config.inbound_mode)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.enable_all().build().map_err(Error::Runtime)?.block_on(serve(config, listeners))
}

/// The listeners of one run, bound before any capability is dropped.
struct Listeners {
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<std::net::TcpListener>,
    health: Vec<std::net::TcpListener>,
    metrics: Vec<std::net::TcpListener>,
}

impl Listeners {
    fn bind(config: &ProxyConfig) -> Result<Listeners, Error> {
        let transparent = config.inbound_mode == InboundMode::Tproxy;
        Ok(Listeners {
            outbound: bind_both_families("outbound", config.outbound_port, false)?,
            inbound: bind_both_families("inbound", config.inbound_port, transparent)?,
            health: bind_both_families("health", config.health_port, false)?,
            metrics: bind_both_families("metrics", config.metrics_port, false)?,
        })
    }
}

/// An IPv4 and an IPv6 listener on `port`; IPv4 only where the kernel has no IPv6.
fn bind_both_families(role: &'static str, port: u16, transparent: bool) -> Result<Vec<std::net::TcpListener>, Error> {
    let mut listeners = Vec::with_capacity(2);
    for ipv6 in [false, true] {
        let addr = socket::any(ipv6, port);
        match socket::listen(addr, transparent) {
            Ok(listener) => listeners.push(listener),
            Err(e) if ipv6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => warn!(role, "no IPv6 in this kernel"),
            Err(source) => return Err(Error::Listen { role, addr, source }),
        }
    }
    Ok(listeners)
}

async fn serve(config: ProxyConfig, listeners: Listeners) -> Result<(), Error> {
    let terminated = drain::termination_signal().map_err(Error::Runtime)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let in_flight = InFlight::new(config.max_connections);
    let shared = Arc::new(Shared::new(&config, metrics.clone(), in_flight.clone()));
    let state = Arc::new(admin::State { ready: false.into(), metrics });
    let (trigger, stop) = drain::stop_channel();

    let inbound = Arc::new(Inbound { mode: config.inbound_mode, tproxy_mark: config.tproxy_mark });
    let mut accepting = Vec::new();
    for listener in listeners.outbound {
        let listener = TcpListener::from_std(listener).map_err(Error::Runtime)?;
        accepting.push(tokio::spawn(proxy::serve(listener, Arc::new(Outbound), shared.clone(), stop.clone())));
    }
    for listener in listeners.inbound {
        let listener = TcpListener::from_std(listener).map_err(Error::Runtime)?;
        accepting.push(tokio::spawn(proxy::serve(listener, inbound.clone(), shared.clone(), stop.clone())));
    }
    for (listeners, endpoint) in [(listeners.health, Endpoint::Health), (listeners.metrics, Endpoint::Metrics)] {
        for listener in listeners {
            let listener = TcpListener::from_std(listener).map_err(Error::Runtime)?;
            tokio::spawn(admin::serve(listener, endpoint, state.clone(), stop.clone()));
        }
    }
    state.ready.store(true, Relaxed);
    info!(
        outbound = config.outbound_port,
        inbound = config.inbound_port,
        mode = ?config.inbound_mode,
        relay = ?config.relay,
        "ready"
    );

    let signal = terminated.await;
    state.ready.store(false, Relaxed);
    trigger.fire();
    for accept_loop in accepting {
        let _ = accept_loop.await;
    }
    info!(signal, in_flight = in_flight.count(), deadline = ?config.drain_timeout, "draining");
    match in_flight.settle(config.drain_timeout).await {
        0 => info!("drained"),
        left => warn!(left, "drain deadline passed; closing the remaining connections"),
    }
    Ok(())
}

/// Each connection holds two descriptors (six with splice); the default soft limit of 1024
/// would cap the proxy far below --max-connections.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
