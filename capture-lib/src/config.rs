//! The value types of the capture settings and their parsers.
//!
//! Everything a user can pass (flags, environment, CNI keys, pod annotations) arrives as
//! strings; `settings.rs` hands each to its parser here, once, with the name the user wrote
//! it under. Every error names that setting and the value refused, so nothing downstream has
//! to re-validate.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use thiserror::Error;

use crate::accounts;

/// The agent's DNS listener: DNS capture always redirects here.
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// The mark the proxy's own outbound-to-inbound traffic carries in TPROXY mode.
pub const OUTBOUND_MARK: u32 = 1338;
/// Source address the proxy binds for inbound passthrough connections.
pub const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// IPv6 twin of [`INBOUND_PASSTHROUGH_V4`].
pub const INBOUND_PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// Most owner groups a filter may name (Istio's limit).
pub const MAX_OWNER_GROUPS: usize = 64;
/// Most groups an "only these groups" filter may name with the iptables backend: its one rule
/// (`-m owner ! --gid-owner G`, four words a group) must fit iptables-restore's parser, which
/// refuses a line of more than about 200 words ("Parser cannot handle more arguments").
pub const MAX_OWNER_GROUPS_IPTABLES: usize = 49;
/// The same with native nftables: nf_tables takes at most 128 expressions a rule, and the rule
/// holds two a group (`meta skgid != G`) besides its counter and verdict.
pub const MAX_OWNER_GROUPS_NFTABLES: usize = 63;
/// Route tables the kernel consults for every packet (0 and 254 main, 253 default, 255 local):
/// a TPROXY `local default` route there would swallow all traffic.
pub const RESERVED_ROUTE_TABLES: [u32; 4] = [0, 253, 254, 255];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{setting}: {value:?} is not a valid port (expected an integer from 1 to 65535)")]
    Port { setting: &'static str, value: String },
    #[error("{setting}: {value:?} is not a valid CIDR (expected ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/64)")]
    Cidr { setting: &'static str, value: String },
    #[error("{setting}: '*' is not allowed in an exclude list")]
    WildcardExclude { setting: &'static str },
    #[error("{setting}: {value:?} is not a valid interface name ({why})")]
    Interface { setting: &'static str, value: String, why: &'static str },
    #[error("{setting}: {value:?} is not a number")]
    Number { setting: &'static str, value: String },
    #[error("{setting}: no user named {value:?} in /etc/passwd (give a numeric UID or a user listed there)")]
    UnknownUser { setting: &'static str, value: String },
    #[error("{setting}: no group named {value:?} in /etc/group (give a numeric GID or a group listed there)")]
    UnknownGroup { setting: &'static str, value: String },
    #[error("{setting}: {count} owner groups given, at most {most} are supported {why}")]
    TooManyOwnerGroups { setting: &'static str, count: usize, most: usize, why: &'static str },
    #[error("{setting}: {value} is not a valid ID ({value} is -1 to the kernel, which means no ID; iptables refuses it)")]
    NoSuchId { setting: &'static str, value: u32 },
    #[error("{setting}: '*' means every destination and cannot be combined with other entries in {value:?}")]
    WildcardInList { setting: &'static str, value: String },
    #[error("{setting}: mark 0 cannot be the TPROXY mark: every unmarked packet carries it, so all of them would be routed to the proxy and the proxy's own traffic never captured")]
    TproxyMark { setting: &'static str },
    #[error("{setting}: route table {table} cannot be the TPROXY table: the kernel consults it for every packet (0 and 254 are main, 253 default, 255 local), so its local default route would swallow all traffic")]
    TproxyRouteTable { setting: &'static str, table: u32 },
    #[error("{setting}: {value:?} is not an IPv4 loopback CIDR with a prefix from /8 to /32 (e.g. 127.0.0.1/32)")]
    Loopback { setting: &'static str, value: String },
    #[error("{setting}: {value:?} is not an inbound interception mode (expected REDIRECT or TPROXY)")]
    Mode { setting: &'static str, value: String },
    #[error("{setting}: {value:?} is not a boolean (expected true or false, 1 or 0, t or f)")]
    Bool { setting: &'static str, value: String },
    #[error("{setting}: {value:?} is not an iptables variant (expected legacy or nft)")]
    IptablesVariant { setting: &'static str, value: String },
    #[error("{setting}: {value:?} must not be empty")]
    Empty { setting: &'static str, value: String },
}

/// How inbound connections reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterceptionMode {
    /// nat REDIRECT to the inbound port; the proxy reads SO_ORIGINAL_DST.
    #[default]
    Redirect,
    /// mangle TPROXY; the proxy keeps the client's address.
    Tproxy,
}

/// Istio treats only the exact string `TPROXY` as TPROXY and everything else as REDIRECT;
/// we accept the two documented names (and empty, the default) and refuse typos.
pub fn parse_mode(setting: &'static str, value: &str) -> Result<InterceptionMode, ConfigError> {
    match value {
        "TPROXY" => Ok(InterceptionMode::Tproxy),
        "REDIRECT" | "" => Ok(InterceptionMode::Redirect),
        other => Err(ConfigError::Mode { setting, value: other.to_string() }),
    }
}

impl fmt::Display for InterceptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Redirect => "REDIRECT",
            Self::Tproxy => "TPROXY",
        })
    }
}

/// Which inbound TCP ports are captured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InboundPorts {
    /// `-b ""`: no inbound capture.
    #[default]
    None,
    /// `-b '*'`: every port except these.
    All { except: Vec<u16> },
    /// `-b 80,443`: only these.
    Only(Vec<u16>),
}

/// Which outbound destinations are captured (`-i`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OutboundRanges {
    /// `-i ""`: no outbound capture by address.
    #[default]
    None,
    /// `-i '*'`: every destination.
    All,
    /// `-i 10.0.0.0/8,fd00::/8`: these destinations.
    Only(Vec<Cidr>),
}

/// Whose outbound traffic is captured, by the socket owner's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Everyone's, except these groups.
    AllExcept(Vec<u32>),
    /// Only these groups' (empty: nobody's).
    Only(Vec<u32>),
}

impl Default for OwnerGroups {
    fn default() -> Self {
        Self::AllExcept(Vec::new())
    }
}

/// DNS capture to the agent's resolver on [`DNS_CAPTURE_PORT`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DnsCapture {
    #[default]
    Off,
    /// Only queries to these servers (the pod's resolv.conf).
    Servers { v4: Vec<Ipv4Addr>, v6: Vec<Ipv6Addr> },
    /// Every query on port 53.
    All,
}

/// An address prefix, stored with its host bits cleared (as the kernel keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then(|| Self { addr: mask(addr, prefix), prefix })
    }

    pub fn host(addr: IpAddr) -> Self {
        Self { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn is_loopback(&self) -> bool {
        self.addr.is_loopback()
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = ();
    /// `ADDRESS/PREFIX`; the prefix is required, as in Istio.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = s.split_once('/').ok_or(())?;
        let addr: IpAddr = addr.parse().map_err(|_| ())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
            return Err(());
        }
        Cidr::new(addr, prefix.parse().map_err(|_| ())?).ok_or(())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A network interface name, as the kernel allows it (at most 15 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interface(String);

impl Interface {
    pub fn parse(setting: &'static str, value: &str) -> Result<Self, ConfigError> {
        let why = if value.is_empty() {
            Some("empty")
        } else if value.len() > 15 {
            Some("longer than 15 bytes")
        } else if value == "." || value == ".." {
            Some("reserved name")
        } else if value.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control()) {
            Some("contains '/', ':', white space or a control character")
        } else if value.contains('"') {
            // The kernel allows it, but iptables-restore would read it as the start of a quoted
            // word and the rule would mean something else.
            Some("contains '\"', which iptables-restore reads as a quote")
        } else if value == "!" {
            Some("'!' alone is iptables' negation")
        } else {
            None
        };
        match why {
            Some(why) => Err(ConfigError::Interface { setting, value: value.to_string(), why }),
            None => Ok(Self(value.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits a comma list the way Istio does: empty elements are dropped.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter(|s| !s.is_empty())
}

pub fn parse_port(setting: &'static str, value: &str) -> Result<u16, ConfigError> {
    match value.parse::<u16>() {
        Ok(p) if p != 0 && value.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(ConfigError::Port { setting, value: value.to_string() }),
    }
}

pub fn parse_ports(setting: &'static str, value: &str) -> Result<Vec<u16>, ConfigError> {
    split_list(value).map(|p| parse_port(setting, p)).collect()
}

/// `include` is `*`, a port list or empty; `exclude` only matters with `*`.
pub fn parse_inbound_ports(
    include_setting: &'static str,
    include: &str,
    exclude_setting: &'static str,
    exclude: &str,
) -> Result<InboundPorts, ConfigError> {
    let except = parse_ports(exclude_setting, exclude)?;
    Ok(match include.trim() {
        "" => InboundPorts::None,
        "*" => InboundPorts::All { except },
        list => InboundPorts::Only(parse_ports(include_setting, list)?),
    })
}

pub fn parse_cidrs(setting: &'static str, value: &str) -> Result<Vec<Cidr>, ConfigError> {
    split_list(value)
        .map(|c| {
            if c == "*" {
                return Err(ConfigError::WildcardExclude { setting });
            }
            c.parse().map_err(|()| ConfigError::Cidr { setting, value: c.to_string() })
        })
        .collect()
}

/// `*` (alone, as Istio takes it), CIDRs, or empty.
pub fn parse_outbound_ranges(setting: &'static str, value: &str) -> Result<OutboundRanges, ConfigError> {
    let entries: Vec<&str> = split_list(value).collect();
    if entries == ["*"] {
        return Ok(OutboundRanges::All);
    }
    if entries.contains(&"*") {
        return Err(ConfigError::WildcardInList { setting, value: value.to_string() });
    }
    let cidrs = parse_cidrs(setting, value)?;
    Ok(if cidrs.is_empty() { OutboundRanges::None } else { OutboundRanges::Only(cidrs) })
}

pub fn parse_interfaces(setting: &'static str, value: &str) -> Result<Vec<Interface>, ConfigError> {
    split_list(value).map(|i| Interface::parse(setting, i)).collect()
}

pub fn parse_number(setting: &'static str, value: &str) -> Result<u32, ConfigError> {
    value.parse::<u32>().map_err(|_| ConfigError::Number { setting, value: value.to_string() })
}

/// A UID list: numbers, or user names from `/etc/passwd`.
pub fn parse_uids(setting: &'static str, value: &str) -> Result<Vec<u32>, ConfigError> {
    split_list(value)
        .map(|u| {
            u.parse::<u32>()
                .ok()
                .or_else(|| accounts::uid(u))
                .ok_or_else(|| ConfigError::UnknownUser { setting, value: u.to_string() })
                .and_then(|id| real_id(setting, id))
        })
        .collect()
}

/// A GID list: numbers, or group names from `/etc/group`.
pub fn parse_gids(setting: &'static str, value: &str) -> Result<Vec<u32>, ConfigError> {
    split_list(value).map(|g| resolve_group(setting, g)).collect()
}

fn resolve_group(setting: &'static str, value: &str) -> Result<u32, ConfigError> {
    value
        .parse::<u32>()
        .ok()
        .or_else(|| accounts::gid(value))
        .ok_or_else(|| ConfigError::UnknownGroup { setting, value: value.to_string() })
        .and_then(|id| real_id(setting, id))
}

/// `(uid_t)-1` and `(gid_t)-1` name no one: the kernel uses them for "unchanged".
fn real_id(setting: &'static str, id: u32) -> Result<u32, ConfigError> {
    if id == u32::MAX {
        Err(ConfigError::NoSuchId { setting, value: id })
    } else {
        Ok(id)
    }
}

/// The TPROXY mark (`-t`): any number, but 0 in TPROXY mode.
pub fn parse_tproxy_mark(setting: &'static str, value: &str, tproxy: bool) -> Result<u32, ConfigError> {
    match parse_number(setting, value)? {
        0 if tproxy => Err(ConfigError::TproxyMark { setting }),
        mark => Ok(mark),
    }
}

/// The TPROXY route table (`-r`): any number, but a reserved one in TPROXY mode.
pub fn parse_tproxy_route_table(setting: &'static str, value: &str, tproxy: bool) -> Result<u32, ConfigError> {
    match parse_number(setting, value)? {
        table if tproxy && RESERVED_ROUTE_TABLES.contains(&table) => Err(ConfigError::TproxyRouteTable { setting, table }),
        table => Ok(table),
    }
}

/// The groups whose outbound traffic is captured (`*`: everyone's) and, with `*`, those whose
/// is not. An include list becomes one rule, so the backend bounds it too (`native_nftables`).
pub fn parse_owner_groups(
    include_setting: &'static str,
    include: &str,
    exclude_setting: &'static str,
    exclude: &str,
    native_nftables: bool,
) -> Result<OwnerGroups, ConfigError> {
    let (setting, list, only) = match include.trim() {
        "*" => (exclude_setting, exclude, false),
        list => (include_setting, list, true),
    };
    let gids = parse_gids(setting, list)?;
    let (most, why) = match (only, native_nftables) {
        (true, false) => (MAX_OWNER_GROUPS_IPTABLES, "(they share one rule, and iptables-restore parses no longer rule)"),
        (true, true) => (MAX_OWNER_GROUPS_NFTABLES, "(they share one rule, and nf_tables takes no more expressions in one)"),
        (false, _) => (MAX_OWNER_GROUPS, "(Istio's limit)"),
    };
    if gids.len() > most {
        return Err(ConfigError::TooManyOwnerGroups { setting, count: gids.len(), most, why });
    }
    Ok(if only { OwnerGroups::Only(gids) } else { OwnerGroups::AllExcept(gids) })
}

/// What counts as local IPv4: an IPv4 loopback prefix between /8 and /32.
pub fn parse_loopback_cidr(setting: &'static str, value: &str) -> Result<Cidr, ConfigError> {
    let err = || ConfigError::Loopback { setting, value: value.to_string() };
    let cidr: Cidr = value.parse().map_err(|()| err())?;
    if !cidr.is_ipv4() || !cidr.is_loopback() || !(8..=32).contains(&cidr.prefix()) {
        return Err(err());
    }
    Ok(cidr)
}

/// Nameservers from a resolv.conf, split by family; unparsable entries are skipped. Read as
/// bytes, as libc reads it: a comment need not be UTF-8.
pub fn parse_resolv_conf(bytes: &[u8]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for line in bytes.split(|&b| b == b'\n') {
        let mut words = line.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty());
        if words.next() != Some(b"nameserver") {
            continue;
        }
        // Zone indices (fe80::1%eth0) cannot be matched by a rule; skip them like other junk.
        match words.next().and_then(|w| std::str::from_utf8(w).ok()).map(str::parse::<IpAddr>) {
            Some(Ok(IpAddr::V4(a))) => v4.push(a),
            Some(Ok(IpAddr::V6(a))) => v6.push(a),
            _ => {}
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_reject_junk_and_name_it() {
        assert_eq!(parse_ports("-d", "15090,15021,").unwrap(), vec![15090, 15021]);
        assert_eq!(parse_ports("-d", "80,70000"), Err(ConfigError::Port { setting: "-d", value: "70000".into() }));
        assert!(parse_ports("-d", "http").is_err());
        assert!(parse_ports("-d", "0").is_err());
        assert!(parse_ports("-d", "+80").is_err());
        assert!(parse_ports("-d", " 80").is_err());
    }

    #[test]
    fn inbound_ports_forms() {
        let parse = |include, exclude| parse_inbound_ports("-b", include, "-d", exclude);
        assert_eq!(parse("", "1").unwrap(), InboundPorts::None);
        assert_eq!(parse("*", "1,2").unwrap(), InboundPorts::All { except: vec![1, 2] });
        assert_eq!(parse("80,81", "").unwrap(), InboundPorts::Only(vec![80, 81]));
        assert_eq!(parse("80,x", ""), Err(ConfigError::Port { setting: "-b", value: "x".into() }));
        assert_eq!(parse("*", "x"), Err(ConfigError::Port { setting: "-d", value: "x".into() }));
    }

    #[test]
    fn cidrs_need_prefix_and_are_masked() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!("2001:db8::1/32".parse::<Cidr>().unwrap().to_string(), "2001:db8::/32");
        assert!("10.0.0.1".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/-1".parse::<Cidr>().is_err());
        assert!("10.0.0.0/".parse::<Cidr>().is_err());
    }

    #[test]
    fn exclude_list_refuses_wildcard() {
        assert_eq!(parse_cidrs("-x", "10.0.0.0/8,*"), Err(ConfigError::WildcardExclude { setting: "-x" }));
        assert_eq!(parse_outbound_ranges("-i", "*").unwrap(), OutboundRanges::All);
        assert_eq!(parse_outbound_ranges("-i", "").unwrap(), OutboundRanges::None);
        assert!(matches!(parse_outbound_ranges("-i", "1.2.3.0/24,::/0").unwrap(), OutboundRanges::Only(v) if v.len() == 2));
    }

    #[test]
    fn a_wildcard_stands_alone_as_in_istio() {
        assert_eq!(parse_outbound_ranges("-i", "*,").unwrap(), OutboundRanges::All);
        for value in ["*,junk", "10.0.0.0/8,*", "*,*"] {
            let err = parse_outbound_ranges("-i", value).unwrap_err();
            assert_eq!(err, ConfigError::WildcardInList { setting: "-i", value: value.into() }, "{value}");
        }
    }

    #[test]
    fn interface_names_follow_kernel_limits() {
        assert!(Interface::parse("-c", "eth0").is_ok());
        assert!(Interface::parse("-c", "veth+").is_ok());
        assert!(Interface::parse("-c", "a-very-long-name0").is_err());
        assert!(Interface::parse("-c", "a/b").is_err());
        assert!(Interface::parse("-c", "").is_err());
    }

    #[test]
    fn interface_names_iptables_restore_would_misread_are_refused() {
        // Legal to the kernel, but `-i a"b -j RETURN` reaches the kernel as `-i "ab -j RETURN"`.
        for name in ["a\"b", "\"", "!"] {
            let err = Interface::parse("-c", name).unwrap_err();
            assert!(matches!(err, ConfigError::Interface { setting: "-c", .. }), "{name}: {err}");
        }
        for name in ["eth!", "!eth0", "a'b", "a\\b", "veth+"] {
            assert!(Interface::parse("-c", name).is_ok(), "{name}");
        }
    }

    #[test]
    fn numeric_ids_and_names() {
        assert_eq!(parse_uids("-u", "3,4").unwrap(), vec![3, 4]);
        assert_eq!(parse_uids("-u", "root").unwrap(), vec![0]);
        assert!(matches!(parse_uids("-u", "no-such-user-here"), Err(ConfigError::UnknownUser { .. })));
        assert_eq!(parse_gids("-g", "root,7").unwrap(), vec![0, 7]);
        assert!(matches!(parse_gids("-g", "no-such-group-here"), Err(ConfigError::UnknownGroup { .. })));
    }

    #[test]
    fn owner_groups() {
        assert_eq!(parse_owner_groups("I", "*", "E", "", false).unwrap(), OwnerGroups::AllExcept(vec![]));
        assert_eq!(parse_owner_groups("I", "*", "E", "5", false).unwrap(), OwnerGroups::AllExcept(vec![5]));
        assert_eq!(parse_owner_groups("I", "", "E", "5", false).unwrap(), OwnerGroups::Only(vec![]));
        assert_eq!(parse_owner_groups("I", "1,2", "E", "5", false).unwrap(), OwnerGroups::Only(vec![1, 2]));
    }

    #[test]
    fn owner_group_lists_are_bounded_by_what_their_rule_can_hold() {
        let groups = |n: usize| (1..=n).map(|g| g.to_string()).collect::<Vec<_>>().join(",");
        let count = |result: Result<OwnerGroups, ConfigError>| match result {
            Err(ConfigError::TooManyOwnerGroups { count, most, .. }) => Err((count, most)),
            Ok(OwnerGroups::Only(g) | OwnerGroups::AllExcept(g)) => Ok(g.len()),
            Err(other) => panic!("{other}"),
        };
        assert_eq!(count(parse_owner_groups("I", &groups(49), "E", "", false)), Ok(49));
        assert_eq!(count(parse_owner_groups("I", &groups(50), "E", "", false)), Err((50, 49)));
        assert_eq!(count(parse_owner_groups("I", &groups(63), "E", "", true)), Ok(63));
        assert_eq!(count(parse_owner_groups("I", &groups(64), "E", "", true)), Err((64, 63)));
        // Excluded groups get a rule each: only Istio's own limit applies.
        assert_eq!(count(parse_owner_groups("I", "*", "E", &groups(64), false)), Ok(64));
        assert_eq!(count(parse_owner_groups("I", "*", "E", &groups(65), true)), Err((65, 64)));
        let message = parse_owner_groups("I", &groups(50), "E", "", false).unwrap_err().to_string();
        assert!(message.starts_with("I: 50 owner groups given, at most 49"), "{message}");
    }

    #[test]
    fn ids_of_minus_one_name_no_one() {
        assert_eq!(parse_uids("-u", "4294967294").unwrap(), vec![4294967294]);
        assert_eq!(parse_uids("-u", "1,4294967295"), Err(ConfigError::NoSuchId { setting: "-u", value: u32::MAX }));
        assert_eq!(parse_gids("-g", "4294967295"), Err(ConfigError::NoSuchId { setting: "-g", value: u32::MAX }));
    }

    #[test]
    fn tproxy_mark_and_table_that_would_capture_everything_are_refused_in_tproxy_mode() {
        assert_eq!(parse_tproxy_mark("-t", "0", true), Err(ConfigError::TproxyMark { setting: "-t" }));
        assert_eq!(parse_tproxy_mark("-t", "0", false), Ok(0));
        assert_eq!(parse_tproxy_mark("-t", "7", true), Ok(7));
        for table in RESERVED_ROUTE_TABLES {
            let refused = ConfigError::TproxyRouteTable { setting: "-r", table };
            assert_eq!(parse_tproxy_route_table("-r", &table.to_string(), true), Err(refused));
            assert_eq!(parse_tproxy_route_table("-r", &table.to_string(), false), Ok(table));
        }
        assert_eq!(parse_tproxy_route_table("-r", "252", true), Ok(252));
    }

    #[test]
    fn loopback_cidr_bounds() {
        assert_eq!(parse_loopback_cidr("L", "127.0.0.1/8").unwrap().to_string(), "127.0.0.0/8");
        assert!(parse_loopback_cidr("L", "127.0.0.1/7").is_err());
        assert!(parse_loopback_cidr("L", "10.0.0.1/32").is_err());
        assert!(parse_loopback_cidr("L", "::1/128").is_err());
        assert!(parse_loopback_cidr("L", "127.0.0.1").is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("-m", "TPROXY"), Ok(InterceptionMode::Tproxy));
        assert_eq!(parse_mode("-m", "REDIRECT"), Ok(InterceptionMode::Redirect));
        assert_eq!(parse_mode("-m", ""), Ok(InterceptionMode::Redirect));
        assert_eq!(parse_mode("-m", "tproxy"), Err(ConfigError::Mode { setting: "-m", value: "tproxy".into() }));
    }

    #[test]
    fn resolv_conf() {
        let text =
            b"# r\xe9sum\xe9\nnameserver 10.96.0.10\r\nnameserver\tfd00::a\nnameserver junk\nnameserver \xff\nsearch a b\n";
        let (v4, v6) = parse_resolv_conf(text);
        assert_eq!(v4, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(v6, vec!["fd00::a".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(parse_resolv_conf(b"search cluster.local\n"), (vec![], vec![]));
    }
}
