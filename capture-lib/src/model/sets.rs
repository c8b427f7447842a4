//! The set form (`--use-ip-sets`): each of the capture's lists (ports, destination ranges)
//! becomes one named kernel set matched by one rule, instead of one rule per entry, so a new
//! connection costs the same whatever the list's length. The decisions are the rule form's:
//! consecutive rules with one action become one rule over the union of their entries.
//!
//! This module says which lists become sets, what they are called and what they hold, in a
//! canonical form both backends load and compare against: ports sorted without duplicates;
//! addresses as sorted, disjoint, non-adjacent ranges, each also given as its fewest prefixes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Cidr;
use crate::family::IpFamily;
use crate::model::Table;

/// A list the set form matches with one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetList {
    /// Inbound ports never captured (`-d`, with `-b '*'`).
    InboundPortsExclude,
    /// The only inbound ports captured (`-b 80,443`).
    InboundPortsInclude,
    /// Outbound ports never captured, TCP and UDP (`-o`).
    OutboundPortsExclude,
    /// Outbound TCP ports always captured (`-q`).
    OutboundPortsInclude,
    /// Outbound destinations never captured (`-x`), one set per family.
    OutboundRangesExclude(IpFamily),
    /// The only outbound destinations captured (`-i`), one set per family.
    OutboundRangesInclude(IpFamily),
}

impl SetList {
    pub const ALL: [SetList; 8] = [
        SetList::InboundPortsExclude,
        SetList::InboundPortsInclude,
        SetList::OutboundPortsExclude,
        SetList::OutboundPortsInclude,
        SetList::OutboundRangesExclude(IpFamily::V4),
        SetList::OutboundRangesExclude(IpFamily::V6),
        SetList::OutboundRangesInclude(IpFamily::V4),
        SetList::OutboundRangesInclude(IpFamily::V6),
    ];

    /// The set's name in the kernel, the same in both backends. Every name is at most 27 bytes,
    /// so an ip set name (31 bytes at most) has room for a 4-byte suffix.
    pub fn name(self) -> &'static str {
        match self {
            SetList::InboundPortsExclude => "istio-in-ports-exclude",
            SetList::InboundPortsInclude => "istio-in-ports-include",
            SetList::OutboundPortsExclude => "istio-out-ports-exclude",
            SetList::OutboundPortsInclude => "istio-out-ports-include",
            SetList::OutboundRangesExclude(IpFamily::V4) => "istio-out-cidrs-exclude-v4",
            SetList::OutboundRangesExclude(IpFamily::V6) => "istio-out-cidrs-exclude-v6",
            SetList::OutboundRangesInclude(IpFamily::V4) => "istio-out-cidrs-include-v4",
            SetList::OutboundRangesInclude(IpFamily::V6) => "istio-out-cidrs-include-v6",
        }
    }

    /// The list a set of ours is named for, if `name` is one of ours.
    pub fn named(name: &str) -> Option<SetList> {
        SetList::ALL.into_iter().find(|list| list.name() == name)
    }

    /// The family of an address list; `None` for a port list.
    pub fn family(self) -> Option<IpFamily> {
        match self {
            SetList::OutboundRangesExclude(family) | SetList::OutboundRangesInclude(family) => Some(family),
            _ => None,
        }
    }
}

/// What a set holds, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SetElements {
    /// Ports, sorted, each once.
    Ports(Vec<u16>),
    /// Addresses of one family: sorted, disjoint, non-adjacent ranges.
    Ranges(Vec<AddrRange>),
}

/// One set of the set form: its list, the table of the rules that match it (an nftables set
/// lives in its rules' table), and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Set {
    pub list: SetList,
    pub table: Table,
    pub elements: SetElements,
}

impl Set {
    pub fn ports(list: SetList, table: Table, ports: &[u16]) -> Set {
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        Set { list, table, elements: SetElements::Ports(ports) }
    }

    /// The set of `list`'s family over the entries of `cidrs` in that family.
    pub fn ranges(list: SetList, table: Table, cidrs: &[Cidr]) -> Set {
        let family = list.family().expect("an address list has a family");
        let cidrs = cidrs.iter().filter(|c| IpFamily::of(c.addr()) == family);
        Set { list, table, elements: SetElements::Ranges(AddrRange::merge(family, cidrs)) }
    }

    pub fn is_empty(&self) -> bool {
        match &self.elements {
            SetElements::Ports(ports) => ports.is_empty(),
            SetElements::Ranges(ranges) => ranges.is_empty(),
        }
    }
}

/// The addresses from `first` to `last`, both included, of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

/// An address as a number (IPv4 in the low 32 bits).
fn number(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn address(family: IpFamily, n: u128) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

fn bits(family: IpFamily) -> u32 {
    match family {
        IpFamily::V4 => 32,
        IpFamily::V6 => 128,
    }
}

/// `2^host_bits - 1`: the host part of a prefix with that many host bits.
fn host_mask(host_bits: u32) -> u128 {
    if host_bits == 0 {
        0
    } else {
        u128::MAX >> (128 - host_bits)
    }
}

impl AddrRange {
    /// The union of `cidrs` (all of `family`) as sorted, disjoint, non-adjacent ranges: overlaps
    /// and duplicates collapse, neighbours join.
    pub fn merge<'c>(family: IpFamily, cidrs: impl Iterator<Item = &'c Cidr>) -> Vec<AddrRange> {
        let width = bits(family);
        let mut spans: Vec<(u128, u128)> = cidrs
            .map(|c| {
                let first = number(c.addr());
                (first, first | host_mask(width - u32::from(c.prefix())))
            })
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(spans.len());
        for (first, last) in spans {
            match merged.last_mut() {
                // `first - 1` cannot underflow: an earlier span starts at or below it.
                Some(prev) if first <= prev.1 || first - 1 == prev.1 => prev.1 = prev.1.max(last),
                _ => merged.push((first, last)),
            }
        }
        merged.into_iter().map(|(first, last)| AddrRange { first: address(family, first), last: address(family, last) }).collect()
    }

    fn family(&self) -> IpFamily {
        IpFamily::of(self.first)
    }

    /// The fewest prefixes covering exactly this range, in order, none wider than half the
    /// address space (kernel ip sets of type `hash:net` hold no `/0`).
    pub fn prefixes(&self) -> Vec<Cidr> {
        let family = self.family();
        let width = bits(family);
        let (mut first, last) = (number(self.first), number(self.last));
        let mut out = Vec::new();
        loop {
            // The widest prefix starting at `first`: as many host bits as `first` has trailing
            // zeros, fewer while it would pass `last`, and never the whole space.
            let mut host_bits = first.trailing_zeros().min(width - 1);
            while first | host_mask(host_bits) > last {
                host_bits -= 1;
            }
            let prefix = (width - host_bits) as u8;
            out.push(Cidr::new(address(family, first), prefix).expect("a prefix within the family's width"));
            let end = first | host_mask(host_bits);
            if end >= last {
                return out;
            }
            first = end + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cidrs;

    fn ranges(family: IpFamily, text: &str) -> Vec<String> {
        let cidrs = parse_cidrs("-x", text).unwrap();
        AddrRange::merge(family, cidrs.iter().filter(|c| IpFamily::of(c.addr()) == family))
            .iter()
            .map(|r| format!("{}-{}", r.first, r.last))
            .collect()
    }

    fn prefixes(first: &str, last: &str) -> Vec<String> {
        let range = AddrRange { first: first.parse().unwrap(), last: last.parse().unwrap() };
        range.prefixes().iter().map(|c| format!("{}/{}", c.addr(), c.prefix())).collect()
    }

    #[test]
    fn overlaps_duplicates_and_neighbours_merge() {
        assert_eq!(
            ranges(IpFamily::V4, "10.0.0.0/24,10.0.1.0/24,10.0.0.128/25,10.0.0.0/24,192.168.1.1/32,192.168.1.3/32"),
            ["10.0.0.0-10.0.1.255", "192.168.1.1-192.168.1.1", "192.168.1.3-192.168.1.3"]
        );
        assert_eq!(ranges(IpFamily::V4, "10.0.0.0/8,0.0.0.0/0"), ["0.0.0.0-255.255.255.255"]);
        assert_eq!(ranges(IpFamily::V6, "fd00::/8,::/0,10.0.0.0/8"), ["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]);
        assert_eq!(ranges(IpFamily::V6, "fd00::1/128,fd00::2/128"), ["fd00::1-fd00::2"]);
        assert!(ranges(IpFamily::V6, "10.0.0.0/8").is_empty());
    }

    #[test]
    fn ranges_become_their_fewest_prefixes() {
        assert_eq!(prefixes("10.0.0.0", "10.0.1.255"), ["10.0.0.0/23"]);
        assert_eq!(prefixes("10.0.0.1", "10.0.0.6"), ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]);
        assert_eq!(prefixes("192.168.1.3", "192.168.1.3"), ["192.168.1.3/32"]);
        assert_eq!(prefixes("0.0.0.0", "255.255.255.255"), ["0.0.0.0/1", "128.0.0.0/1"]);
        assert_eq!(prefixes("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), ["::/1", "8000::/1"]);
        assert_eq!(prefixes("255.255.255.255", "255.255.255.255"), ["255.255.255.255/32"]);
        assert_eq!(prefixes("fd00::1", "fd00::2"), ["fd00::1/128", "fd00::2/128"]);
    }

    #[test]
    fn ports_are_sorted_once() {
        let set = Set::ports(SetList::OutboundPortsExclude, Table::Nat, &[443, 80, 443, 1]);
        assert_eq!(set.elements, SetElements::Ports(vec![1, 80, 443]));
    }

    #[test]
    fn names_fit_an_ip_set_with_a_suffix() {
        for list in SetList::ALL {
            assert!(list.name().len() <= 27, "{}", list.name());
            assert_eq!(SetList::named(list.name()), Some(list));
        }
    }
}
