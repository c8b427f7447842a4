//! The three kinds of kernel entry a plan needs (`::6/128` on `lo`, the fwmark rule, the local
//! default route), as rtnetlink messages: how each is added, found and removed.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::plan::{ip_command, Change, Entry, LOOPBACK};
use super::{Found, RouteError};
use crate::config::{INBOUND_PASSTHROUGH_V6, RESERVED_ROUTE_TABLES};
use crate::family::IpFamily;
use crate::netlink::route::Rtnetlink;
use crate::netlink::NetlinkError;

impl Entry {
    /// Makes the change (or only looks); returns whether the entry was there before.
    pub(super) fn reconcile(self, rtnetlink: &mut Rtnetlink, lo: u32, change: Change) -> Result<bool, RouteError> {
        match self {
            Entry::PassthroughAddress => reconcile(rtnetlink, passthrough_address(lo), change),
            Entry::MarkRule { family, mark, table } => reconcile(rtnetlink, mark_rule(family, mark, table), change),
            Entry::LocalDefaultRoute { family, table } => reconcile(rtnetlink, local_default_route(family, table, lo), change),
        }
        .map_err(|source| RouteError::Netlink { command: self.command(change), source })
    }
}

/// Adds `wanted` unless an equal entry is there, deletes every equal entry, or only looks;
/// returns whether an equal entry was there.
fn reconcile<E: KernelEntry>(rtnetlink: &mut Rtnetlink, wanted: E, change: Change) -> Result<bool, NetlinkError> {
    let found: Vec<E> = rtnetlink
        .dump(E::dump_request(wanted.family()))?
        .into_iter()
        .filter_map(E::from_dump)
        .filter(|found| wanted.same_as(found))
        .collect();
    let was_there = !found.is_empty();
    match change {
        Change::Add if !was_there => rtnetlink.request(wanted.add_request(), NLM_F_CREATE | NLM_F_EXCL).map(drop)?,
        Change::Add | Change::Check => {}
        Change::Remove => found.into_iter().try_for_each(|entry| rtnetlink.request(entry.delete_request(), 0).map(drop))?,
    }
    Ok(was_there)
}

/// The index of `lo`.
pub(super) fn loopback_index(rtnetlink: &mut Rtnetlink) -> Result<u32, RouteError> {
    let mut query = LinkMessage::default();
    query.attributes = vec![LinkAttribute::IfName(LOOPBACK.to_string())];
    rtnetlink
        .request(RouteNetlinkMessage::GetLink(query), 0)
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

/// What captures added, found by what it is (see [`super::ours`]), rules first.
pub(super) fn found_entries(rtnetlink: &mut Rtnetlink, lo: u32) -> Result<Vec<Found>, RouteError> {
    let (mut rules, mut routes) = (Vec::new(), Vec::new());
    for family in IpFamily::ALL {
        let mut tables: Vec<u32> = Vec::new();
        for route in listing::<RouteMessage>(rtnetlink, family, "route show table all")? {
            let table = route_table(&route);
            if !RESERVED_ROUTE_TABLES.contains(&table) && local_default_route(family, table, lo).same_as(&route) {
                tables.push(table);
                routes.push(Entry::LocalDefaultRoute { family, table });
            }
        }
        for rule in listing::<RuleMessage>(rtnetlink, family, "rule show")? {
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
    let address = listing::<AddressMessage>(rtnetlink, IpFamily::V6, "addr show dev lo")?;
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
fn listing<E: KernelEntry>(rtnetlink: &mut Rtnetlink, family: IpFamily, what: &str) -> Result<Vec<E>, RouteError> {
    match rtnetlink.dump(E::dump_request(family.into())) {
        Ok(listing) => Ok(listing.into_iter().filter_map(E::from_dump).collect()),
        Err(NetlinkError::System(e)) if family == IpFamily::V6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => Ok(Vec::new()),
        Err(source) => Err(RouteError::Netlink { command: format!("{} {what}", ip_command(family)), source }),
    }
}

impl From<IpFamily> for AddressFamily {
    fn from(family: IpFamily) -> Self {
        match family {
            IpFamily::V4 => AddressFamily::Inet,
            IpFamily::V6 => AddressFamily::Inet6,
        }
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

fn mark_rule(family: IpFamily, mark: u32, table: u32) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = family.into();
    message.header.action = RuleAction::ToTable;
    message.header.table = header_table(table);
    message.attributes = vec![RuleAttribute::Table(table), RuleAttribute::FwMark(mark)];
    message
}

fn local_default_route(family: IpFamily, table: u32, lo: u32) -> RouteMessage {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_rule_is_told_apart_from_kernel_details_and_from_narrower_rules() {
        let ours = mark_rule(IpFamily::V4, 1337, 133);
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
}
