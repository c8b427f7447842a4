//! Kernel ip sets (`ipset`) over netlink, through our one netlink client: list, create and
//! fill, swap and destroy. The iptables backend keeps the set form's lists in them: `hash:net`
//! sets (one per family) for addresses, `bitmap:port` sets for ports, matched by `-m set`.
//!
//! This module speaks the kernel's interface and nothing else: which sets a capture wants,
//! and when they change, is the backend's.

mod wire;

use std::fmt;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::Cidr;
use crate::drift::count;
use crate::family::IpFamily;
use crate::netlink::{NetlinkError, Protocol, Socket};

/// How long a destroy is tried again while the kernel still counts a reference that is going
/// away (iptables-nft releases the matches of deleted rules after its transaction, in the
/// background).
const RELEASE_WAIT: Duration = Duration::from_millis(500);

// Error numbers of <linux/netfilter/ipset/ip_set.h> and the type headers.
const ERR_PROTOCOL: i32 = 4097;
const ERR_FIND_TYPE: i32 = 4098;
const ERR_MAX_SETS: i32 = 4099;
const ERR_BUSY: i32 = 4100;
const ERR_EXIST_SETNAME2: i32 = 4101;
const ERR_TYPE_MISMATCH: i32 = 4102;
const ERR_EXIST: i32 = 4103;
const ERR_INVALID_CIDR: i32 = 4104;
const ERR_INVALID_FAMILY: i32 = 4106;
const ERR_REFERENCED: i32 = 4108;
/// The first type-specific error: `IPSET_ERR_HASH_FULL`, `IPSET_ERR_BITMAP_RANGE`.
const ERR_TYPE_SPECIFIC: i32 = 4352;

/// Why an ip set operation failed, naming the set and the kernel's refusal.
#[derive(Debug, Error)]
pub enum IpsetError {
    #[error("could not reach the kernel's ip sets: {0}")]
    Netlink(#[source] NetlinkError),
    #[error(
        "the kernel has no ip sets (it lacks ip_set, CONFIG_IP_SET); the set form of the iptables backend needs ip_set, \
         ip_set_hash_net, ip_set_bitmap_port and xt_set"
    )]
    NoIpSets,
    #[error("the kernel refused to {action} ip set {set}: {reason}")]
    Refused { action: &'static str, set: String, reason: String },
    #[error("the kernel refused to list its ip sets: {reason}")]
    ListRefused { reason: String },
    #[error(
        "ip set {set} is still in use ({}): a rule or set that is not this capture's refers to it, so it was left in place",
        count(*references as usize, "reference")
    )]
    InUse { set: String, references: u32 },
}

impl IpsetError {
    /// The kernel has no ip sets at all (nfnetlink knows no such subsystem): then it holds none.
    pub(crate) fn kernel_lacks_ip_sets(&self) -> bool {
        matches!(self, IpsetError::NoIpSets)
    }
}

/// What the kernel's error number means for an ip set of `kind`.
fn reason(errno: i32, kind: Option<SetKind>) -> String {
    let type_name = kind.map_or("its type", SetKind::type_name);
    match errno {
        libc::EPERM => "operation not permitted: ip sets need CAP_NET_ADMIN in the network namespace".to_string(),
        ERR_FIND_TYPE => format!(
            "the kernel lacks the ip set type {type_name} (revision {}; module ip_set_{}); the set form of the \
             iptables backend needs ip_set, ip_set_hash_net, ip_set_bitmap_port and xt_set",
            kind.map_or(0, SetKind::revision),
            type_name.replace(':', "_")
        ),
        ERR_PROTOCOL => format!("the kernel does not accept the request (ip set protocol {})", wire::PROTOCOL),
        ERR_MAX_SETS => "the kernel holds as many ip sets as it allows".to_string(),
        ERR_BUSY | ERR_REFERENCED => "it is in use by a rule or another set".to_string(),
        ERR_EXIST_SETNAME2 => "the set to swap with does not exist".to_string(),
        ERR_TYPE_MISMATCH => "the two sets differ in type or family, and the kernel swaps only sets of one kind".to_string(),
        ERR_EXIST | libc::EEXIST => "a set or member of that name already exists".to_string(),
        ERR_INVALID_CIDR => "a prefix length it does not take".to_string(),
        ERR_INVALID_FAMILY => "a family its type does not take".to_string(),
        ERR_TYPE_SPECIFIC if matches!(kind, Some(SetKind::Net(_))) => "the set is full (maxelem)".to_string(),
        ERR_TYPE_SPECIFIC if kind == Some(SetKind::Port) => "a port outside the set's range".to_string(),
        libc::ENOENT => "no such set".to_string(),
        errno => std::io::Error::from_raw_os_error(errno).to_string(),
    }
}

/// The kinds of set the capture makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SetKind {
    /// `hash:net` of one family: prefixes.
    Net(IpFamily),
    /// `bitmap:port range 0-65535`: ports, of TCP or UDP packets, of either family.
    Port,
}

impl SetKind {
    pub fn type_name(self) -> &'static str {
        match self {
            SetKind::Net(_) => "hash:net",
            SetKind::Port => "bitmap:port",
        }
    }

    /// The type revision we create: the newest that kernels since 4.3 (2015) all have.
    fn revision(self) -> u8 {
        match self {
            SetKind::Net(_) => 6,
            SetKind::Port => 3,
        }
    }

    /// The family the kernel keeps: a `hash:net` set's, none (`NFPROTO_UNSPEC`) for ports.
    fn nfproto(self) -> u8 {
        (match self {
            SetKind::Net(IpFamily::V4) => libc::NFPROTO_IPV4,
            SetKind::Net(IpFamily::V6) => libc::NFPROTO_IPV6,
            SetKind::Port => libc::NFPROTO_UNSPEC,
        }) as u8
    }

    /// The kind of a listed set, if it is one we make.
    fn of(type_name: &str, family: u8) -> Option<SetKind> {
        [SetKind::Net(IpFamily::V4), SetKind::Net(IpFamily::V6), SetKind::Port]
            .into_iter()
            .find(|kind| kind.type_name() == type_name && kind.nfproto() == family)
    }
}

/// `hash:net family inet`, as `ipset` writes a set's type and family.
fn describe_type(type_name: &str, family: u8) -> String {
    match i32::from(family) {
        libc::NFPROTO_IPV4 => format!("{type_name} family inet"),
        libc::NFPROTO_IPV6 => format!("{type_name} family inet6"),
        _ => type_name.to_string(),
    }
}

impl fmt::Display for SetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe_type(self.type_name(), self.nfproto()))
    }
}

/// One member of a set, as `ipset` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Member {
    Net(Cidr),
    Port(u16),
    /// A `hash:net` exception (`nomatch`): addresses it covers are not matched.
    NetExcept(Cidr),
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Member::Net(cidr) => write!(f, "{cidr}"),
            Member::Port(port) => write!(f, "{port}"),
            Member::NetExcept(cidr) => write!(f, "{cidr} nomatch"),
        }
    }
}

/// A set to create: its name, kind and members (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetSpec {
    pub name: String,
    pub kind: SetKind,
    pub members: Vec<Member>,
}

impl SetSpec {
    pub fn new(name: &str, kind: SetKind, mut members: Vec<Member>) -> SetSpec {
        members.sort_unstable();
        SetSpec { name: name.to_string(), kind, members }
    }

    /// The same set under another name.
    pub fn named(&self, name: &str) -> SetSpec {
        SetSpec { name: name.to_string(), ..self.clone() }
    }

    /// Buckets for about one member each, so that filling it never grows the table.
    fn hashsize(&self) -> u32 {
        u32::try_from(self.members.len().next_power_of_two()).unwrap_or(u32::MAX).max(64)
    }

    /// Room for twice the members (the kernel splits the limit among the table's regions).
    fn maxelem(&self) -> u32 {
        self.hashsize().saturating_mul(2).max(65536)
    }

    /// `ipset restore` lines that make this set.
    pub fn restore_lines(&self) -> Vec<String> {
        let create = match self.kind {
            SetKind::Net(_) => {
                format!("create {} {} hashsize {} maxelem {}", self.name, self.kind, self.hashsize(), self.maxelem())
            }
            SetKind::Port => format!("create {} {} range 0-65535", self.name, self.kind),
        };
        std::iter::once(create).chain(self.members.iter().map(|m| format!("add {} {m}", self.name))).collect()
    }
}

/// A set the kernel holds, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FoundSet {
    pub name: String,
    pub type_name: String,
    pub family: u8,
    /// Its kind, when it is one we make.
    pub kind: Option<SetKind>,
    /// The members we can read (of a kind we make), sorted.
    pub members: Vec<Member>,
    /// Members of other kinds.
    pub others: usize,
    /// How many members the kernel counts.
    pub elements: u32,
    /// How many rules (and list sets) refer to it.
    pub references: u32,
    /// Its members expire.
    pub timeout: bool,
}

impl FoundSet {
    fn new(listed: wire::Listed) -> FoundSet {
        let header = listed.header.unwrap_or_default();
        FoundSet {
            kind: SetKind::of(&header.type_name, header.family),
            name: listed.name,
            type_name: header.type_name,
            family: header.family,
            members: listed.members,
            others: listed.others,
            elements: header.elements,
            references: header.references,
            timeout: header.timeout,
        }
    }

    /// Its type and family as `ipset` writes them, e.g. `hash:net family inet`.
    pub fn describe_type(&self) -> String {
        let kind = describe_type(&self.type_name, self.family);
        if self.timeout {
            format!("{kind} timeout")
        } else {
            kind
        }
    }

    /// The set to create to have it back as it is, when it is of a kind we make (without
    /// expiring members).
    pub fn spec(&self) -> Option<SetSpec> {
        let kind = self.kind.filter(|_| !self.timeout && self.others == 0)?;
        Some(SetSpec::new(&self.name, kind, self.members.clone()))
    }
}

/// A netlink socket to the kernel's ip sets, in the calling thread's network namespace.
pub(crate) struct IpSets(Socket);

impl IpSets {
    pub fn open() -> Result<IpSets, IpsetError> {
        Socket::open(Protocol::Netfilter).map(IpSets).map_err(IpsetError::Netlink)
    }

    /// The name of every set.
    pub fn names(&mut self) -> Result<Vec<String>, IpsetError> {
        match self.0.dump(&mut wire::list_names(), wire::parse_listed) {
            Ok(listed) => Ok(listed.into_iter().map(|entry| entry.name).collect()),
            // nfnetlink's answer to a subsystem it does not have.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(IpsetError::NoIpSets),
            Err(e) => Err(match e.raw_os_error() {
                Some(errno) => IpsetError::ListRefused { reason: reason(errno, None) },
                None => IpsetError::Netlink(e),
            }),
        }
    }

    /// The set `name` with its members; `None` when there is none.
    pub fn list(&mut self, name: &str) -> Result<Option<FoundSet>, IpsetError> {
        match self.0.dump(&mut wire::list(name), wire::parse_listed) {
            Ok(listed) => Ok(wire::fold(listed).into_iter().find(|set| set.name == name)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(refusal(e, "list", name, None)),
        }
    }

    /// Creates the set `spec` describes, filled; an existing set of its name is an error. A set
    /// that cannot be filled is destroyed again.
    pub fn create(&mut self, spec: &SetSpec) -> Result<(), IpsetError> {
        let kind = Some(spec.kind);
        self.send(wire::create(spec)).map_err(|e| refusal(e, "create", &spec.name, kind))?;
        for message in wire::add(&spec.name, &spec.members) {
            if let Err(e) = self.send(message) {
                let _ = self.send(wire::destroy(&spec.name));
                return Err(refusal(e, "fill", &spec.name, kind));
            }
        }
        Ok(())
    }

    /// Swaps what the sets `a` and `b` hold.
    pub fn swap(&mut self, a: &str, b: &str) -> Result<(), IpsetError> {
        self.send(wire::swap(a, b)).map_err(|e| refusal(e, "swap", &format!("{a} with {b}"), None))
    }

    /// Destroys the set `name` (none of that name: nothing to do). One still in use is
    /// tried again for a moment (see [`RELEASE_WAIT`]), then reported with its references.
    pub fn destroy(&mut self, name: &str) -> Result<(), IpsetError> {
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            match self.send(wire::destroy(name)) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(ERR_BUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) if e.raw_os_error() == Some(ERR_BUSY) => {
                    let references = self.list(name).ok().flatten().map_or(0, |set| set.references);
                    return Err(IpsetError::InUse { set: name.to_string(), references });
                }
                Err(e) => return Err(refusal(e, "destroy", name, None)),
            }
        }
    }

    fn send(&mut self, mut message: Vec<u8>) -> Result<(), NetlinkError> {
        self.0.request(&mut message, |_| Ok(None::<()>)).map(drop)
    }
}

/// The kernel's errno as a refusal naming the set; anything else as it is.
fn refusal(error: NetlinkError, action: &'static str, set: &str, kind: Option<SetKind>) -> IpsetError {
    match error.raw_os_error() {
        Some(errno) => IpsetError::Refused { action, set: set.to_string(), reason: reason(errno, kind) },
        None => IpsetError::Netlink(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_what_the_kernel_lacks_or_forbids() {
        assert!(reason(libc::EPERM, None).contains("CAP_NET_ADMIN"));
        let missing = reason(ERR_FIND_TYPE, Some(SetKind::Net(IpFamily::V4)));
        assert!(missing.contains("hash:net") && missing.contains("ip_set_hash_net") && missing.contains("xt_set"), "{missing}");
        assert_eq!(reason(ERR_TYPE_SPECIFIC, Some(SetKind::Net(IpFamily::V6))), "the set is full (maxelem)");
        assert_eq!(reason(ERR_TYPE_SPECIFIC, Some(SetKind::Port)), "a port outside the set's range");
        assert_eq!(reason(libc::ENOMEM, None), std::io::Error::from_raw_os_error(libc::ENOMEM).to_string());
        let error = refusal(NetlinkError::System(std::io::Error::from_raw_os_error(ERR_BUSY)), "destroy", "s", None);
        assert_eq!(error.to_string(), "the kernel refused to destroy ip set s: it is in use by a rule or another set");
    }

    #[test]
    fn restore_lines_are_ipset_syntax() {
        let net = SetSpec::new(
            "n",
            SetKind::Net(IpFamily::V4),
            vec![Member::Net("192.168.0.0/16".parse().unwrap()), Member::Net("10.0.0.0/8".parse().unwrap())],
        );
        assert_eq!(
            net.restore_lines(),
            ["create n hash:net family inet hashsize 64 maxelem 65536", "add n 10.0.0.0/8", "add n 192.168.0.0/16"]
        );
        let ports = SetSpec::new("p", SetKind::Port, vec![Member::Port(443), Member::Port(80)]);
        assert_eq!(ports.restore_lines(), ["create p bitmap:port range 0-65535", "add p 80", "add p 443"]);
        let big = SetSpec::new("b", SetKind::Net(IpFamily::V6), vec![Member::Port(1); 5000]);
        assert_eq!((big.hashsize(), big.maxelem()), (8192, 65536));
    }

    #[test]
    fn only_the_kinds_we_make_are_recognised() {
        assert_eq!(SetKind::of("hash:net", libc::NFPROTO_IPV6 as u8), Some(SetKind::Net(IpFamily::V6)));
        assert_eq!(SetKind::of("bitmap:port", 0), Some(SetKind::Port));
        assert_eq!(SetKind::of("hash:ip", libc::NFPROTO_IPV4 as u8), None);
        assert_eq!(SetKind::of("hash:net", 0), None);
        assert_eq!(SetKind::Net(IpFamily::V6).to_string(), "hash:net family inet6");
    }
}
