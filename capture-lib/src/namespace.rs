//! The pod network namespace we program: entering it, checking we may change it, and
//! reading what Istio derives from it (IP families in use, DNS servers).

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, Flock, FlockArg};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NamespaceError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("cannot enter network namespace {path}: {source} (entering another namespace needs CAP_SYS_ADMIN)")]
    Enter { path: String, source: nix::Error },
    #[error("missing capability CAP_NET_ADMIN: programming netfilter rules and routes needs it (run as root, or add NET_ADMIN to the container's securityContext.capabilities)")]
    MissingNetAdmin,
    #[error("cannot read capabilities: {0}")]
    Capabilities(String),
    #[error("cannot list interface addresses: {0}")]
    Addresses(String),
    #[error("no valid local IP address found (no non-loopback, non-link-local address on any interface)")]
    NoAddress,
    #[error("failed to load {path}: {source}")]
    ResolvConf { path: String, source: std::io::Error },
    #[error("another capture run has been changing this network namespace for more than {0:?}; try again later")]
    Busy(Duration),
    #[error("cannot lock the network namespace: {0}")]
    Lock(String),
}

/// Moves the calling thread (and every process it starts later) into the namespace at `path`,
/// e.g. `/proc/<pid>/ns/net` or `/var/run/netns/<name>`. Call before starting threads.
pub fn enter(path: &Path) -> Result<(), NamespaceError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| NamespaceError::Open { path: shown.clone(), source })?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|source| NamespaceError::Enter { path: shown, source })
}

/// Held while a run reads and changes the namespace (and by the processes it starts); released
/// on drop, once those have exited too.
#[derive(Debug)]
pub struct NamespaceLock {
    _held: Flock<File>,
}

/// Serialises runs on the calling thread's namespace, so that two started at once cannot both
/// see an empty namespace and both install (the second then finds the rules in place).
/// The lock is an flock on the namespace's own nsfs inode, shared by every process that
/// enters it, whatever its mount namespace (Istio's CNI uses the same file as xtables lock).
pub fn lock(wait: Duration) -> Result<NamespaceLock, NamespaceError> {
    let deadline = Instant::now() + wait;
    let mut file = File::open("/proc/thread-self/ns/net").map_err(|e| NamespaceError::Lock(e.to_string()))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => {
                // The processes this run starts (iptables-restore) inherit the lock, so a run
                // killed while one of them still writes keeps the namespace locked until it
                // has finished: the next run never reads a state that is about to change.
                fcntl(&*held, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| NamespaceError::Lock(e.to_string()))?;
                return Ok(NamespaceLock { _held: held });
            }
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(NamespaceError::Busy(wait)),
            Err((_, e)) => return Err(NamespaceError::Lock(e.to_string())),
        }
    }
}

/// Fails, naming the capability, unless this process may change network configuration.
pub fn require_net_admin() -> Result<(), NamespaceError> {
    match caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_NET_ADMIN) {
        Ok(true) => Ok(()),
        Ok(false) => Err(NamespaceError::MissingNetAdmin),
        Err(e) => Err(NamespaceError::Capabilities(e.to_string())),
    }
}

/// Whether to program IPv6, decided as Istio does from the namespace's own addresses
/// (loopback and link-local ignored): without dual-stack the first address's family
/// decides; with dual-stack any IPv6 address does.
pub fn uses_ipv6(dual_stack: bool) -> Result<bool, NamespaceError> {
    let addrs = crate::routes::addresses().map_err(|e| NamespaceError::Addresses(e.to_string()))?;
    ipv6_from_addresses(&addrs, dual_stack)
}

fn ipv6_from_addresses(addrs: &[IpAddr], dual_stack: bool) -> Result<bool, NamespaceError> {
    let mut usable = addrs.iter().filter(|a| !a.is_loopback() && !is_link_local(a)).peekable();
    let first = **usable.peek().ok_or(NamespaceError::NoAddress)?;
    Ok(if dual_stack { usable.any(IpAddr::is_ipv6) } else { first.is_ipv6() })
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The nameservers of the namespace's resolv.conf, split by family.
pub fn dns_servers(path: &Path) -> Result<(Vec<std::net::Ipv4Addr>, Vec<std::net::Ipv6Addr>), NamespaceError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| NamespaceError::ResolvConf { path: path.display().to_string(), source })?;
    Ok(crate::config::parse_resolv_conf(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn first_usable_address_decides_without_dual_stack() {
        assert!(!ipv6_from_addresses(&ips(&["127.0.0.1", "10.0.0.5", "fd00::5"]), false).unwrap());
        assert!(ipv6_from_addresses(&ips(&["::1", "fe80::1", "fd00::5", "10.0.0.5"]), false).unwrap());
        assert!(ipv6_from_addresses(&ips(&["10.0.0.5", "fd00::5"]), true).unwrap());
        assert!(!ipv6_from_addresses(&ips(&["10.0.0.5", "fe80::5"]), true).unwrap());
        assert!(matches!(ipv6_from_addresses(&ips(&["127.0.0.1", "fe80::1", "169.254.1.1"]), false), Err(NamespaceError::NoAddress)));
    }
}
