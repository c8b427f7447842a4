//! capture-proxy: the sidecar data plane behind istio-iptables. It accepts the connections
//! the capture rules send to its outbound (15001) and inbound (15006) ports and forwards
//! each to its original destination, like Envoy's virtualOutbound/virtualInbound listeners
//! in passthrough mode.

#![deny(unsafe_code)]

mod admin;
mod config;
mod drain;
mod inbound;
mod metrics;
mod outbound;
mod privileges;
mod proxy;
mod relay;
mod socket;
mod timers;
mod worker;

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
use crate::proxy::{Shared, TrafficPath};
use crate::worker::{StopHandle, Worker};

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
    // The main thread's runtime serves the admin endpoints and the signals; the workers run
    // their own event loops (worker.rs). It starts no thread, and its signal handlers go in
    // first, so that no signal kills the proxy unannounced.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    let terminated = {
        let _main = runtime.enter();
        drain::termination_signal().map_err(Error::Runtime)?
    };
    privileges::check_uid(nix::unistd::getuid().as_raw(), config.proxy_uid, config.allow_any_uid)?;
    privileges::acquire(config.inbound_mode)?;
    raise_open_files_limit();
    let workers = match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = Listeners::bind(&config, workers)?;
    // Capabilities belong to threads: drop them while this is the only one, so that every
    // thread started later inherits the reduced set.
    privileges::drop_unneeded(config.inbound_mode)?;

    let metrics = Arc::new(metrics::Metrics::default());
    let in_flight = InFlight::new(config.max_connections);
    let shared = Arc::new(Shared::new(&config, metrics.clone(), in_flight.clone()));
    let inbound: Arc<dyn TrafficPath> = Arc::new(Inbound { mode: config.inbound_mode, tproxy_mark: config.tproxy_mark });
    let outbound: Arc<dyn TrafficPath> = Arc::new(Outbound);
    let mut stop_handles = Vec::new();
    for (index, own) in listeners.workers.into_iter().enumerate() {
        let paths =
            own.outbound.into_iter().map(|l| (l, outbound.clone())).chain(own.inbound.into_iter().map(|l| (l, inbound.clone())));
        stop_handles.push(start_worker(index, paths.collect(), &shared)?);
    }
    info!(workers, "listening");

    let admin = Admin {
        health: listeners.health,
        metrics: listeners.metrics,
        state: Arc::new(admin::State { ready: false.into(), metrics }),
    };
    runtime.block_on(supervise(&config, admin, stop_handles, in_flight, terminated))
}

/// Every listener of a run, bound before any capability is dropped.
struct Listeners {
    workers: Vec<WorkerListeners>,
    health: Vec<std::net::TcpListener>,
    metrics: Vec<std::net::TcpListener>,
}

/// One worker's own outbound and inbound listeners: each worker binds the capture ports with
/// SO_REUSEPORT and the kernel spreads connections over them, as over Envoy's workers.
struct WorkerListeners {
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<std::net::TcpListener>,
}

impl Listeners {
    fn bind(config: &ProxyConfig, workers: usize) -> Result<Listeners, Error> {
        let transparent = config.inbound_mode == InboundMode::Tproxy;
        let worker = |_| {
            Ok(WorkerListeners {
                outbound: bind_both_families("outbound", config.outbound_port, false, true)?,
                inbound: bind_both_families("inbound", config.inbound_port, transparent, true)?,
            })
        };
        Ok(Listeners {
            workers: (0..workers).map(worker).collect::<Result<_, Error>>()?,
            health: bind_both_families("health", config.health_port, false, false)?,
            metrics: bind_both_families("metrics", config.metrics_port, false, false)?,
        })
    }
}

/// An IPv4 and an IPv6 listener on `port`; IPv4 only where the kernel has no IPv6.
fn bind_both_families(
    role: &'static str,
    port: u16,
    transparent: bool,
    per_worker: bool,
) -> Result<Vec<std::net::TcpListener>, Error> {
    let mut listeners = Vec::with_capacity(2);
    for ipv6 in [false, true] {
        let addr = socket::any(ipv6, port);
        match socket::listen(addr, transparent, per_worker) {
            Ok(listener) => listeners.push(listener),
            Err(e) if ipv6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => warn!(role, "no IPv6 in this kernel"),
            Err(source) => return Err(Error::Listen { role, addr, source }),
        }
    }
    Ok(listeners)
}

/// Starts a worker: a thread running its own event loop over its own listeners and what they
/// accept. No connection ever crosses threads, so there are no cross-thread wake-ups: on two
/// CPUs this measured a quarter less CPU per connection than one shared work-stealing runtime.
fn start_worker(
    index: usize,
    listeners: Vec<(std::net::TcpListener, Arc<dyn TrafficPath>)>,
    shared: &Arc<Shared>,
) -> Result<StopHandle, Error> {
    let (worker, stop) = Worker::new(listeners, shared.clone()).map_err(Error::Runtime)?;
    std::thread::Builder::new().name(format!("worker-{index}")).spawn(move || worker.run()).map_err(Error::Runtime)?;
    Ok(stop)
}

/// The admin endpoints, served by the main thread.
struct Admin {
    health: Vec<std::net::TcpListener>,
    metrics: Vec<std::net::TcpListener>,
    state: Arc<admin::State>,
}

/// Serves the admin endpoints until `terminated` (SIGTERM), then stops accepting everywhere and drains.
async fn supervise(
    config: &ProxyConfig,
    admin: Admin,
    workers: Vec<StopHandle>,
    in_flight: InFlight,
    terminated: impl std::future::Future<Output = &'static str>,
) -> Result<(), Error> {
    let (trigger, stop) = drain::stop_channel();
    for (listeners, endpoint) in [(admin.health, Endpoint::Health), (admin.metrics, Endpoint::Metrics)] {
        for listener in listeners {
            let listener = TcpListener::from_std(listener).map_err(Error::Runtime)?;
            tokio::spawn(admin::serve(listener, endpoint, admin.state.clone(), stop.clone()));
        }
    }
    admin.state.ready.store(true, Relaxed);
    info!(
        outbound = config.outbound_port,
        inbound = config.inbound_port,
        mode = ?config.inbound_mode,
        relay = ?config.relay,
        "ready"
    );

    let signal = terminated.await;
    admin.state.ready.store(false, Relaxed);
    trigger.fire();
    for worker in workers {
        worker.stop().await.map_err(Error::Runtime)?;
    }
    info!(signal, in_flight = in_flight.count(), deadline = ?config.drain_timeout, "draining");
    match in_flight.settle(config.drain_timeout).await {
        0 => info!("drained"),
        left => warn!(left, "drain deadline passed; closing the remaining connections"),
    }
    Ok(())
}

/// Each connection holds two descriptors (four while it splices, through a pooled pipe); the
/// default soft limit of 1024 would cap the proxy far below --max-connections.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
