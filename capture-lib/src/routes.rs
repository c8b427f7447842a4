//! The addresses and policy routing the capture rules rely on, programmed over rtnetlink:
//!
//! * `::6/128` on `lo`: the source the proxy binds for inbound passthrough connections. Its IPv4
//!   twin 127.0.0.6 needs nothing, since all of 127/8 is local, but IPv6 loopback is one /128.
//! * For TPROXY, `ip rule add fwmark MARK lookup TABLE` and `ip route add local default dev lo
//!   table TABLE`, so that packets the TPROXY rule marked are delivered to the local listener
//!   whatever their destination address.
//!
//! Both directions are idempotent. Before adding, we list what the kernel holds and count an
//! equal entry as done: otherwise the kernel answers "File exists" for addresses and routes and,
//! worse, silently adds a duplicate rule at the next free priority. Removal deletes every entry
//! equal to ours, including duplicates left by a tool that was not idempotent, and nothing else.
//!
//! We use synchronous netlink (a `netlink-sys` socket carrying `netlink-packet-route` messages)
//! rather than `rtnetlink`. The init container sends a handful of requests one after another,
//! so rtnetlink's tokio runtime would only add start-up work and binary size; rtnetlink builds
//! on these same message types.
//!
//! Everything acts on the network namespace of the calling thread.

use std::fmt;
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    DecodeError, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;

use crate::config::{INBOUND_PASSTHROUGH_V6, RESERVED_ROUTE_TABLES};
use crate::settings::CaptureConfig;

/// How often a listing is retried when the kernel reports it changed while being read.
const DUMP_ATTEMPTS: usize = 5;
const LOOPBACK: &str = "lo";

/// What the namespace needs besides rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// `::6/128` on `lo`.
    pub passthrough_v6: bool,
    /// Policy routing for TPROXY inbound capture.
    pub tproxy: Option<TproxyRouting>,
}

/// `ip rule add fwmark MARK lookup TABLE` + `ip route add local default dev lo table TABLE`,
/// for IPv4 and, when `ipv6`, for IPv6 too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TproxyRouting {
    pub mark: u32,
    pub table: u32,
    pub ipv6: bool,
}

#[derive(Debug, Error)]
pub enum RouteError {
    #[error(
        "IPv6 is disabled in this network namespace ({reason}): ::6/128 on lo and IPv6 TPROXY \
         routing were not set up (everything IPv4 is in place); enable IPv6 for the pod or \
         capture IPv4 only"
    )]
    Ipv6Disabled { reason: String },
    #[error(
        "TPROXY route table {0} is one the kernel uses for all traffic (0 and 254 main, \
         253 default, 255 local): a local default route there would swallow every packet; \
         choose another table (--istio-inbound-tproxy-route-table)"
    )]
    ReservedTable(u32),
    #[error(
        "TPROXY mark 0 would send every packet to the TPROXY route table; choose a non-zero \
         mark (--istio-inbound-tproxy-mark)"
    )]
    ZeroMark,
    #[error("cannot open a netlink socket to the kernel's routing: {0}")]
    Socket(#[source] io::Error),
    #[error("`{command}` failed: {source}{}", hint(.source))]
    Netlink { command: String, source: NetlinkError },
}

/// Why one netlink exchange failed.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// The kernel's answer (an errno), or the socket's.
    #[error("{0}")]
    System(#[source] io::Error),
    #[error("unreadable answer from the kernel: {0}")]
    Unreadable(#[from] DecodeError),
    #[error("the kernel's list kept changing while it was read ({DUMP_ATTEMPTS} attempts); try again")]
    KeptChanging,
}

/// What a user can do about the most likely failures.
fn hint(error: &NetlinkError) -> &'static str {
    match error {
        NetlinkError::System(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            " (this needs CAP_NET_ADMIN in the pod's network namespace)"
        }
        NetlinkError::System(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            " (a different entry already holds that place: see `ip rule show` and `ip route show table all`)"
        }
        _ => "",
    }
}

impl RoutePlan {
    pub fn for_config(cfg: &CaptureConfig) -> RoutePlan {
        RoutePlan {
            passthrough_v6: cfg.ipv6,
            tproxy: cfg.needs_tproxy_routes().then_some(TproxyRouting {
                mark: cfg.tproxy_mark,
                table: cfg.tproxy_route_table,
                ipv6: cfg.ipv6,
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// The `ip` commands `apply` is equivalent to, in its order (for `--dry-run`).
    pub fn describe(&self) -> Vec<String> {
        self.entries().iter().map(|entry| entry.command(Change::Add)).collect()
    }

    /// Every IPv4 entry comes before every IPv6 one, so a namespace without IPv6 still gets
    /// working IPv4 routing before `apply` reports [`RouteError::Ipv6Disabled`].
    fn entries(&self) -> Vec<Entry> {
        let mut entries = Vec::new();
        for family in [Family::V4, Family::V6] {
            if family == Family::V6 && self.passthrough_v6 {
                entries.push(Entry::PassthroughAddress);
            }
            if let Some(TproxyRouting { mark, table, ipv6 }) = self.tproxy {
                if family == Family::V4 || ipv6 {
                    entries.push(Entry::MarkRule { family, mark, table });
                    entries.push(Entry::LocalDefaultRoute { family, table });
                }
            }
        }
        entries
    }

    /// Refuses plans that would break the namespace's routing; `apply` and `remove` check too.
    pub fn check(&self) -> Result<(), RouteError> {
        match self.tproxy {
            // Route table 0 means "main" to the kernel; the others are consulted for every packet.
            Some(TproxyRouting { table, .. }) if RESERVED_ROUTE_TABLES.contains(&table) => Err(RouteError::ReservedTable(table)),
            // A rule with mark 0 carries no mark match at all.
            Some(TproxyRouting { mark: 0, .. }) => Err(RouteError::ZeroMark),
            _ => Ok(()),
        }
    }
}

/// Adds what the plan needs to the calling thread's network namespace; entries already there
/// are left as they are. IPv4 comes first: if IPv6 is disabled, the IPv4 part is in place when
/// [`RouteError::Ipv6Disabled`] is returned, so the caller may warn and go on.
pub fn apply(plan: &RoutePlan) -> Result<(), RouteError> {
    apply_tracked(plan, &mut Added::default())
}

/// The entries one `apply` added (those that were not there before), so that a run whose
/// rules failed can take back exactly these and nothing that an earlier run left.
#[derive(Debug, Default)]
pub struct Added(Vec<Entry>);

impl Added {
    /// The `ip` commands doing what was added, in order.
    pub fn describe(&self) -> Vec<String> {
        self.0.iter().map(|entry| entry.command(Change::Add)).collect()
    }
}

/// [`apply`], recording in `added` what it adds, even when it fails part way.
pub fn apply_tracked(plan: &RoutePlan, added: &mut Added) -> Result<(), RouteError> {
    plan.check()?;
    let mut netlink = Netlink::open()?;
    let lo = netlink.loopback_index()?;
    let (v4, v6): (Vec<Entry>, Vec<Entry>) = plan.entries().into_iter().partition(|e| e.family() == Family::V4);
    let mut add = |entry: Entry| -> Result<(), RouteError> {
        if !entry.reconcile(&mut netlink, lo, Change::Add)? {
            added.0.push(entry);
        }
        Ok(())
    };
    v4.into_iter().try_for_each(&mut add)?;
    if !v6.is_empty() {
        if let Some(reason) = ipv6_disabled() {
            return Err(RouteError::Ipv6Disabled { reason });
        }
    }
    v6.into_iter().try_for_each(add)
}

/// Every address on the calling thread's namespace's interfaces, IPv4 first, as the kernel
/// lists them (one address dump; `getifaddrs` would also dump every link).
pub fn addresses() -> Result<Vec<IpAddr>, RouteError> {
    let mut netlink = Netlink::open()?;
    let listing = netlink
        .dump(AddressMessage::dump_request(AddressFamily::Unspec))
        .map_err(|source| RouteError::Netlink { command: "ip addr show".to_string(), source })?;
    Ok(listing
        .into_iter()
        .filter_map(AddressMessage::from_dump)
        .filter_map(|message| {
            // IFA_LOCAL is the address itself where both are given (IPv4); IPv6 gives IFA_ADDRESS.
            let local = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            local.or_else(|| {
                message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })
        })
        .collect())
}

/// Removes what `added` records, newest first.
pub fn undo(added: &Added) -> Result<(), RouteError> {
    if added.0.is_empty() {
        return Ok(());
    }
    let mut netlink = Netlink::open()?;
    let lo = netlink.loopback_index()?;
    added.0.iter().rev().try_for_each(|entry| entry.reconcile(&mut netlink, lo, Change::Remove).map(drop))
}

/// What captures added to the calling thread's namespace, found by what it is, whatever
/// settings added it: every rule that sends packets by their fwmark alone to a TPROXY table
/// (one holding a `local default dev lo` route), the `local default dev lo` routes in every
/// table but the kernel's own, and `::6/128` on `lo`. In the order `remove_ours` takes them
/// away: rules first, so that no packet is sent to a table already emptied.
pub fn ours() -> Result<Vec<Found>, RouteError> {
    let mut netlink = Netlink::open()?;
    let lo = netlink.loopback_index()?;
    found_entries(&mut netlink, lo)
}

/// Removes everything [`ours`] finds (and nothing else); finding nothing is fine.
pub fn remove_ours() -> Result<(), RouteError> {
    let mut netlink = Netlink::open()?;
    let lo = netlink.loopback_index()?;
    for Found(entry) in found_entries(&mut netlink, lo)? {
        entry.reconcile(&mut netlink, lo, Change::Remove)?;
    }
    Ok(())
}

/// One entry [`ours`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found(Entry);

impl Found {
    /// The `ip` command that removes it.
    pub fn removal(&self) -> String {
        self.0.command(Change::Remove)
    }
}

fn found_entries(netlink: &mut Netlink, lo: u32) -> Result<Vec<Found>, RouteError> {
    let (mut rules, mut routes) = (Vec::new(), Vec::new());
    for family in [Family::V4, Family::V6] {
        let mut tables: Vec<u32> = Vec::new();
        for route in listing::<RouteMessage>(netlink, family, "route show table all")? {
            let table = route_table(&route);
            if !RESERVED_ROUTE_TABLES.contains(&table) && local_default_route(family, table, lo).same_as(&route) {
                tables.push(table);
                routes.push(Entry::LocalDefaultRoute { family, table });
            }
        }
        for rule in listing::<RuleMessage>(netlink, family, "rule show")? {
            let table = rule_table(&rule);
            let mark = rule.attributes.iter().find_map(|a| match a {
                RuleAttribute::FwMark(mark) => Some(*mark),
                _ => None,
            });
            if let Some(mark) = mark.filter(|&mark| tables.contains(&table) && mark_rule(family, mark, table).same_as(&rule)) {
                rules.push(Entry::MarkRule { family, mark, table });
            }
        }
    }
    let address = listing::<AddressMessage>(netlink, Family::V6, "addr show dev lo")?;
    let passthrough = address.iter().any(|found| passthrough_address(lo).same_as(found)).then_some(Entry::PassthroughAddress);
    let mut found: Vec<Found> = Vec::new();
    for entry in rules.into_iter().chain(routes).chain(passthrough) {
        if !found.contains(&Found(entry)) {
            found.push(Found(entry));
        }
    }
    Ok(found)
}

/// Every entry of one kind and family; none where the kernel has no IPv6 at all.
fn listing<E: KernelEntry>(netlink: &mut Netlink, family: Family, what: &str) -> Result<Vec<E>, RouteError> {
    match netlink.dump(E::dump_request(family.into())) {
        Ok(listing) => Ok(listing.into_iter().filter_map(E::from_dump).collect()),
        Err(NetlinkError::System(e)) if family == Family::V6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => Ok(Vec::new()),
        Err(source) => Err(RouteError::Netlink { command: format!("{} {what}", family.ip_command()), source }),
    }
}

/// The entries the plan needs that the calling thread's namespace lacks, as the `ip` commands
/// that would add them; empty when all are in place. IPv6 entries are not expected where IPv6
/// is disabled, as `apply` only warns there. Changes nothing.
pub fn missing(plan: &RoutePlan) -> Result<Vec<String>, RouteError> {
    plan.check()?;
    let mut netlink = Netlink::open()?;
    let lo = netlink.loopback_index()?;
    let ipv6_usable = ipv6_disabled().is_none();
    let mut out = Vec::new();
    for entry in plan.entries().into_iter().filter(|e| ipv6_usable || e.family() == Family::V4) {
        if !entry.reconcile(&mut netlink, lo, Change::Check)? {
            out.push(entry.command(Change::Add));
        }
    }
    Ok(out)
}

/// Why IPv6 cannot be used in the calling thread's namespace, if it cannot.
fn ipv6_disabled() -> Option<String> {
    for interface in [LOOPBACK, "all"] {
        match std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")) {
            Ok(value) if value.trim() != "0" => {
                return Some(format!("net.ipv6.conf.{interface}.disable_ipv6 = {}", value.trim()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Some("the kernel has no IPv6: /proc/sys/net/ipv6 is missing".to_string())
            }
            // Unreadable for another reason: let the kernel have the last word.
            _ => {}
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn ip_command(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip -6",
        }
    }
}

impl From<Family> for AddressFamily {
    fn from(family: Family) -> Self {
        match family {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Add,
    Remove,
    /// Only look.
    Check,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Change::Add => "add",
            Change::Remove => "del",
            Change::Check => "show",
        })
    }
}

/// One kernel entry a plan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    PassthroughAddress,
    MarkRule { family: Family, mark: u32, table: u32 },
    LocalDefaultRoute { family: Family, table: u32 },
}

impl Entry {
    fn family(self) -> Family {
        match self {
            Entry::PassthroughAddress => Family::V6,
            Entry::MarkRule { family, .. } | Entry::LocalDefaultRoute { family, .. } => family,
        }
    }

    /// The `ip` command doing the same, for dry runs and error messages.
    fn command(self, change: Change) -> String {
        match self {
            Entry::PassthroughAddress => format!("ip -6 addr {change} {INBOUND_PASSTHROUGH_V6}/128 dev {LOOPBACK}"),
            Entry::MarkRule { family, mark, table } => {
                format!("{} rule {change} fwmark {mark} lookup {table}", family.ip_command())
            }
            Entry::LocalDefaultRoute { family, table } => {
                format!("{} route {change} local default dev {LOOPBACK} table {table}", family.ip_command())
            }
        }
    }

    /// Makes the change (or only looks); returns whether the entry was there before.
    fn reconcile(self, netlink: &mut Netlink, lo: u32, change: Change) -> Result<bool, RouteError> {
        match self {
            Entry::PassthroughAddress => netlink.reconcile(passthrough_address(lo), change),
            Entry::MarkRule { family, mark, table } => netlink.reconcile(mark_rule(family, mark, table), change),
            Entry::LocalDefaultRoute { family, table } => netlink.reconcile(local_default_route(family, table, lo), change),
        }
        .map_err(|source| RouteError::Netlink { command: self.command(change), source })
    }
}

fn passthrough_address(lo: u32) -> AddressMessage {
    let address = IpAddr::V6(INBOUND_PASSTHROUGH_V6);
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet6;
    message.header.prefix_len = 128;
    message.header.index = lo;
    // Both, as `ip addr add` sends them: IFA_LOCAL is the address, IFA_ADDRESS the (absent) peer.
    message.attributes = vec![AddressAttribute::Local(address), AddressAttribute::Address(address)];
    message
}

fn mark_rule(family: Family, mark: u32, table: u32) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = family.into();
    message.header.action = RuleAction::ToTable;
    message.header.table = header_table(table);
    message.attributes = vec![RuleAttribute::Table(table), RuleAttribute::FwMark(mark)];
    message
}

fn local_default_route(family: Family, table: u32, lo: u32) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = family.into();
    message.header.table = header_table(table);
    message.header.protocol = RouteProtocol::Boot;
    message.header.scope = RouteScope::Host;
    message.header.kind = RouteType::Local;
    message.attributes = vec![RouteAttribute::Table(table), RouteAttribute::Oif(lo)];
    message
}

/// The table byte of a rule or route header. The kernel reads the full number from the table
/// attribute, which we always send; like `ip`, we put 0 in the byte when the number is too big.
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// An address, rule or route as rtnetlink carries it.
trait KernelEntry: Sized {
    fn family(&self) -> AddressFamily;
    /// The request listing every entry of this kind and family.
    fn dump_request(family: AddressFamily) -> RouteNetlinkMessage;
    fn from_dump(message: RouteNetlinkMessage) -> Option<Self>;
    /// Whether `found` is this entry: the same key and selectors, whatever details the kernel
    /// or another tool chose (priority, protocol, metric).
    fn same_as(&self, found: &Self) -> bool;
    fn add_request(self) -> RouteNetlinkMessage;
    fn delete_request(self) -> RouteNetlinkMessage;
}

impl KernelEntry for AddressMessage {
    fn family(&self) -> AddressFamily {
        self.header.family
    }

    fn dump_request(family: AddressFamily) -> RouteNetlinkMessage {
        let mut message = AddressMessage::default();
        message.header.family = family;
        RouteNetlinkMessage::GetAddress(message)
    }

    fn from_dump(message: RouteNetlinkMessage) -> Option<Self> {
        match message {
            RouteNetlinkMessage::NewAddress(address) => Some(address),
            _ => None,
        }
    }

    fn same_as(&self, found: &Self) -> bool {
        let address = |message: &AddressMessage| {
            message.attributes.iter().find_map(|attribute| match attribute {
                AddressAttribute::Local(a) | AddressAttribute::Address(a) => Some(*a),
                _ => None,
            })
        };
        self.header.family == found.header.family
            && self.header.index == found.header.index
            && self.header.prefix_len == found.header.prefix_len
            && address(self) == address(found)
    }

    fn add_request(self) -> RouteNetlinkMessage {
        RouteNetlinkMessage::NewAddress(self)
    }

    fn delete_request(self) -> RouteNetlinkMessage {
        RouteNetlinkMessage::DelAddress(self)
    }
}

impl KernelEntry for RuleMessage {
    fn family(&self) -> AddressFamily {
        self.header.family
    }

    fn dump_request(family: AddressFamily) -> RouteNetlinkMessage {
        let mut message = RuleMessage::default();
        message.header.family = family;
        RouteNetlinkMessage::GetRule(message)
    }

    fn from_dump(message: RouteNetlinkMessage) -> Option<Self> {
        match message {
            RouteNetlinkMessage::NewRule(rule) => Some(rule),
            _ => None,
        }
    }

    /// The same header selectors, table and match attributes. A rule that also matches, say,
    /// an input interface is someone else's, even if its mark and table are ours.
    fn same_as(&self, found: &Self) -> bool {
        let (ours, theirs) = (&self.header, &found.header);
        ours.family == theirs.family
            && ours.dst_len == theirs.dst_len
            && ours.src_len == theirs.src_len
            && ours.tos == theirs.tos
            && ours.action == theirs.action
            && ours.flags == theirs.flags
            && rule_table(self) == rule_table(found)
            && same_elements(&rule_selectors(self), &rule_selectors(found))
    }

    fn add_request(self) -> RouteNetlinkMessage {
        RouteNetlinkMessage::NewRule(self)
    }

    /// The listed rule as it is, priority included, so that exactly that one goes
    /// (as `ip rule flush` does).
    fn delete_request(self) -> RouteNetlinkMessage {
        RouteNetlinkMessage::DelRule(self)
    }
}

fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|attribute| match attribute {
            RuleAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(rule.header.table.into())
}

/// What a rule matches on: its attributes, less those that only say where it sits or who made
/// it, less the table (compared on its own), and less the values the kernel reports for
/// settings never given (the full mask of a plain `fwmark`, "no suppression" as -1).
fn rule_selectors(rule: &RuleMessage) -> Vec<&RuleAttribute> {
    rule.attributes
        .iter()
        .filter(|attribute| {
            !matches!(
                attribute,
                RuleAttribute::Priority(_)
                    | RuleAttribute::Protocol(_)
                    | RuleAttribute::Table(_)
                    | RuleAttribute::FwMask(u32::MAX)
                    | RuleAttribute::SuppressPrefixLen(u32::MAX)
                    | RuleAttribute::SuppressIfGroup(u32::MAX)
            )
        })
        .collect()
}

/// Equal as multisets, for attribute lists whose order the kernel chooses.
fn same_elements<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len() && a.iter().all(|x| a.iter().filter(|y| *y == x).count() == b.iter().filter(|y| *y == x).count())
}

impl KernelEntry for RouteMessage {
    fn family(&self) -> AddressFamily {
        self.header.address_family
    }

    fn dump_request(family: AddressFamily) -> RouteNetlinkMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = family;
        RouteNetlinkMessage::GetRoute(message)
    }

    fn from_dump(message: RouteNetlinkMessage) -> Option<Self> {
        match message {
            RouteNetlinkMessage::NewRoute(route) => Some(route),
            _ => None,
        }
    }

    /// The same destination, type, table and device (the key a route is known by; metric and
    /// protocol are the kernel's or the other tool's business).
    fn same_as(&self, found: &Self) -> bool {
        let (ours, theirs) = (&self.header, &found.header);
        ours.address_family == theirs.address_family
            && ours.destination_prefix_length == theirs.destination_prefix_length
            && ours.source_prefix_length == theirs.source_prefix_length
            && ours.tos == theirs.tos
            && ours.kind == theirs.kind
            && route_table(self) == route_table(found)
            && route_device(self) == route_device(found)
    }

    fn add_request(self) -> RouteNetlinkMessage {
        RouteNetlinkMessage::NewRoute(self)
    }

    /// The listed route as it is (as `ip route flush` does).
    fn delete_request(self) -> RouteNetlinkMessage {
        RouteNetlinkMessage::DelRoute(self)
    }
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

fn route_device(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|attribute| match attribute {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

/// A route netlink socket, one request at a time.
struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    fn open() -> Result<Self, RouteError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RouteError::Socket)?;
        socket.bind_auto().map_err(RouteError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(RouteError::Socket)?;
        Ok(Self { socket, sequence: 0 })
    }

    fn loopback_index(&mut self) -> Result<u32, RouteError> {
        let mut query = LinkMessage::default();
        query.attributes = vec![LinkAttribute::IfName(LOOPBACK.to_string())];
        self.request(RouteNetlinkMessage::GetLink(query), 0)
            .and_then(|answer| {
                answer
                    .into_iter()
                    .find_map(|message| match message {
                        RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                        _ => None,
                    })
                    .ok_or_else(|| NetlinkError::Unreadable("the answer holds no link".into()))
            })
            .map_err(|source| RouteError::Netlink { command: format!("ip link show dev {LOOPBACK}"), source })
    }

    /// Adds `wanted` unless an equal entry is there, deletes every equal entry, or only looks;
    /// returns whether an equal entry was there.
    fn reconcile<E: KernelEntry>(&mut self, wanted: E, change: Change) -> Result<bool, NetlinkError> {
        let found: Vec<E> = self
            .dump(E::dump_request(wanted.family()))?
            .into_iter()
            .filter_map(E::from_dump)
            .filter(|found| wanted.same_as(found))
            .collect();
        let was_there = !found.is_empty();
        match change {
            Change::Add if !was_there => self.request(wanted.add_request(), NLM_F_CREATE | NLM_F_EXCL).map(drop)?,
            Change::Add | Change::Check => {}
            Change::Remove => found.into_iter().try_for_each(|entry| self.request(entry.delete_request(), 0).map(drop))?,
        }
        Ok(was_there)
    }

    /// A listing, taken again when the kernel says it changed while being read.
    fn dump(&mut self, request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        for _ in 1..DUMP_ATTEMPTS {
            match self.request(request.clone(), NLM_F_DUMP) {
                Err(NetlinkError::KeptChanging) => continue,
                answer => return answer,
            }
        }
        self.request(request, NLM_F_DUMP)
    }

    /// Sends one request and returns the kernel's answer: the entries of a listing or of a
    /// query, nothing for a change. The acknowledgement we ask for (or the end of a listing)
    /// carries the kernel's verdict.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(NetlinkError::System)?;

        let mut entries = Vec::new();
        let mut interrupted = false;
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(NetlinkError::System)?;
            let mut rest = datagram.as_slice();
            while !rest.is_empty() {
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)?;
                // Messages in one datagram start on 4-byte boundaries.
                let length = (answer.header.length as usize).next_multiple_of(4);
                rest = rest.get(length..).unwrap_or_default();
                if answer.header.sequence_number != self.sequence {
                    continue; // a late answer to an earlier request
                }
                interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
                let verdict = match answer.payload {
                    NetlinkPayload::InnerMessage(entry) => {
                        entries.push(entry);
                        continue;
                    }
                    NetlinkPayload::Error(error) => error.code.map_or(0, |code| code.get()),
                    NetlinkPayload::Done(done) => done.code,
                    _ => continue,
                };
                return match verdict {
                    0 if interrupted => Err(NetlinkError::KeptChanging),
                    0 => Ok(entries),
                    errno => Err(NetlinkError::System(io::Error::from_raw_os_error(errno.abs()))),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InboundPorts, InterceptionMode};

    fn tproxy_config(ipv6: bool) -> CaptureConfig {
        CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::All { except: vec![] },
            ipv6,
            ..CaptureConfig::default()
        }
    }

    #[test]
    fn redirect_ipv4_needs_nothing() {
        let plan = RoutePlan::for_config(&CaptureConfig::default());
        assert_eq!(plan, RoutePlan { passthrough_v6: false, tproxy: None });
        assert!(plan.is_empty());
        assert!(plan.describe().is_empty());
    }

    #[test]
    fn redirect_ipv6_needs_only_the_passthrough_address() {
        let plan = RoutePlan::for_config(&CaptureConfig { ipv6: true, ..CaptureConfig::default() });
        assert!(!plan.is_empty());
        assert_eq!(plan.describe(), ["ip -6 addr add ::6/128 dev lo"]);
    }

    #[test]
    fn tproxy_without_inbound_ports_needs_no_routing() {
        let cfg = CaptureConfig { inbound_ports: InboundPorts::None, ..tproxy_config(false) };
        assert_eq!(RoutePlan::for_config(&cfg).tproxy, None);
    }

    #[test]
    fn tproxy_ipv4_routes_with_the_configured_mark_and_table() {
        let cfg = CaptureConfig { tproxy_mark: 7, tproxy_route_table: 1000, ..tproxy_config(false) };
        let plan = RoutePlan::for_config(&cfg);
        assert_eq!(plan.tproxy, Some(TproxyRouting { mark: 7, table: 1000, ipv6: false }));
        assert_eq!(plan.describe(), ["ip rule add fwmark 7 lookup 1000", "ip route add local default dev lo table 1000"]);
    }

    #[test]
    fn dual_stack_tproxy_describes_ipv4_first() {
        assert_eq!(
            RoutePlan::for_config(&tproxy_config(true)).describe(),
            [
                "ip rule add fwmark 1337 lookup 133",
                "ip route add local default dev lo table 133",
                "ip -6 addr add ::6/128 dev lo",
                "ip -6 rule add fwmark 1337 lookup 133",
                "ip -6 route add local default dev lo table 133",
            ]
        );
    }

    #[test]
    fn removal_commands_name_the_deletion() {
        let entry = Entry::MarkRule { family: Family::V6, mark: 1337, table: 133 };
        assert_eq!(entry.command(Change::Remove), "ip -6 rule del fwmark 1337 lookup 133");
    }

    #[test]
    fn tables_and_marks_that_would_capture_everything_are_refused() {
        for table in [0, 253, 254, 255] {
            let plan = RoutePlan { passthrough_v6: false, tproxy: Some(TproxyRouting { mark: 1337, table, ipv6: false }) };
            assert!(matches!(plan.check(), Err(RouteError::ReservedTable(t)) if t == table), "table {table}");
        }
        let zero_mark = RoutePlan { passthrough_v6: false, tproxy: Some(TproxyRouting { mark: 0, table: 133, ipv6: true }) };
        assert!(matches!(zero_mark.check(), Err(RouteError::ZeroMark)));
        assert!(RoutePlan::for_config(&tproxy_config(true)).check().is_ok());
    }

    #[test]
    fn our_rule_is_told_apart_from_kernel_details_and_from_narrower_rules() {
        let ours = mark_rule(Family::V4, 1337, 133);
        let mut as_listed = ours.clone();
        as_listed.header.table = 133;
        as_listed.attributes = vec![
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Priority(32765),
            RuleAttribute::FwMark(1337),
            RuleAttribute::FwMask(u32::MAX),
            RuleAttribute::Table(133),
            RuleAttribute::Protocol(RouteProtocol::Boot),
        ];
        assert!(ours.same_as(&as_listed));

        let mut narrower = as_listed.clone();
        narrower.attributes.push(RuleAttribute::Iifname("eth0".into()));
        assert!(!ours.same_as(&narrower));

        let mut other_table = as_listed;
        other_table.attributes.retain(|a| !matches!(a, RuleAttribute::Table(_)));
        other_table.attributes.push(RuleAttribute::Table(134));
        assert!(!ours.same_as(&other_table));
    }

    #[test]
    fn permission_errors_say_which_capability_is_missing() {
        let error = RouteError::Netlink {
            command: "ip rule add fwmark 1337 lookup 133".into(),
            source: NetlinkError::System(io::Error::from_raw_os_error(libc::EPERM)),
        };
        let message = error.to_string();
        assert!(message.starts_with("`ip rule add fwmark 1337 lookup 133` failed: Operation not permitted"), "{message}");
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
    }
}
