//! The pod network namespace we program: entering it, checking we may change it, and
//! reading what Istio derives from it (IP families in use, DNS servers).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::RouteNetlinkMessage;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, Flock, FlockArg};
use thiserror::Error;

use crate::netlink::route::Rtnetlink;
use crate::netlink::NetlinkError;

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
    Addresses(#[source] NetlinkError),
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
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| NamespaceError::Enter { path: shown, source })
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
    let addrs = addresses().map_err(NamespaceError::Addresses)?;
    ipv6_from_addresses(&addrs, dual_stack)
}

/// Every address on the calling thread's namespace's interfaces, IPv4 first, as the kernel
/// lists them (one address dump; `getifaddrs` would also dump every link).
fn addresses() -> Result<Vec<IpAddr>, NetlinkError> {
    // The default query names no family: every family.
    let listing = Rtnetlink::open()?.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
    Ok(listing
        .into_iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewAddress(address) => Some(address),
            _ => None,
        })
        .filter_map(|address| {
            // IFA_LOCAL is the address itself where both are given (IPv4); IPv6 gives IFA_ADDRESS.
            let local = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            local.or_else(|| {
                address.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })
        })
        .collect())
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

/// The root under which the pod's files are seen from here: ours when the tool runs in the pod
/// (no namespace path given), else the root of the process a `/proc/PID/ns/net` (or
/// `/proc/PID/task/TID/ns/net`) path names. `None` for a path that names no process, such as a
/// bind mount under /var/run/netns: the pod's files cannot be found from there.
pub fn pod_root(namespace: Option<&Path>) -> Option<PathBuf> {
    let Some(namespace) = namespace else { return Some(PathBuf::from("/")) };
    let process = |name: &str| name.bytes().all(|b| b.is_ascii_digit()) || name == "self" || name == "thread-self";
    let parts: Vec<&str> = namespace.to_str()?.split('/').collect();
    match parts.as_slice() {
        ["", "proc", pid, "ns", "net"] | ["", "proc", pid, "task", _, "ns", "net"] if !pid.is_empty() && process(pid) => {
            Some(PathBuf::from(format!("/proc/{pid}/root")))
        }
        _ => None,
    }
}

/// The nameservers of the pod's resolv.conf (`etc/resolv.conf` under `root`, which symbolic
/// links inside cannot leave), split by family.
pub fn dns_servers(root: &Path) -> Result<(Vec<Ipv4Addr>, Vec<Ipv6Addr>), NamespaceError> {
    let path = root.join("etc/resolv.conf");
    let error = |source: std::io::Error| NamespaceError::ResolvConf { path: path.display().to_string(), source };
    let bytes = read_in_root(root, Path::new("etc/resolv.conf")).map_err(error)?;
    Ok(crate::config::parse_resolv_conf(&bytes))
}

/// Reads `path` as if `root` were `/`: a container's absolute symbolic link (say to
/// /run/systemd/resolve/stub-resolv.conf) must not lead to the host's file.
fn read_in_root(root: &Path, path: &Path) -> std::io::Result<Vec<u8>> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::io::Read;
    let dir = File::open(root)?;
    let how = OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC).resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let mut file = match openat2(&dir, path, how) {
        Ok(fd) => File::from(fd),
        // Kernels before 5.6 lack openat2.
        Err(nix::errno::Errno::ENOSYS) => File::open(root.join(path))?,
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
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
        assert!(matches!(
            ipv6_from_addresses(&ips(&["127.0.0.1", "fe80::1", "169.254.1.1"]), false),
            Err(NamespaceError::NoAddress)
        ));
    }

    #[test]
    fn the_pods_files_are_found_only_through_a_process() {
        let root = |path: Option<&str>| pod_root(path.map(Path::new)).map(|p| p.display().to_string());
        assert_eq!(root(None).as_deref(), Some("/"));
        assert_eq!(root(Some("/proc/42/ns/net")).as_deref(), Some("/proc/42/root"));
        assert_eq!(root(Some("/proc/42/task/43/ns/net")).as_deref(), Some("/proc/42/root"));
        assert_eq!(root(Some("/proc/self/ns/net")).as_deref(), Some("/proc/self/root"));
        for elsewhere in ["/var/run/netns/pod", "/proc/42/ns/mnt", "/proc//ns/net", "/proc/4x2/ns/net", "proc/42/ns/net"] {
            assert_eq!(root(Some(elsewhere)), None, "{elsewhere}");
        }
    }

    #[test]
    fn resolv_conf_symbolic_links_stay_inside_the_root() {
        let root = std::env::temp_dir().join(format!("capture-root-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::write(root.join("run/resolv.conf"), b"nameserver 10.96.0.10\n").unwrap();
        let _ = std::fs::remove_file(root.join("etc/resolv.conf"));
        std::os::unix::fs::symlink("/run/resolv.conf", root.join("etc/resolv.conf")).unwrap();
        let servers = dns_servers(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(servers.unwrap().0, vec![Ipv4Addr::new(10, 96, 0, 10)]);
    }
}
