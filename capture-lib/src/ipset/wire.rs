//! ip set messages as the kernel reads and writes them (`<linux/netfilter/ipset/ip_set.h>`):
//! nfnetlink messages of subsystem `NFNL_SUBSYS_IPSET`, an `nfgenmsg`, then attributes.
//! Numbers inside the type-specific data travel in network byte order and must say so
//! (`NLA_F_NET_BYTEORDER`), and nests must be flagged `NLA_F_NESTED`, or the kernel answers
//! `IPSET_ERR_PROTOCOL`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{FoundSet, Member, SetKind, SetSpec};
use crate::config::Cidr;
use crate::netlink::attr::{attributes, Attribute, Writer, NLA_F_NET_BYTEORDER};
use crate::netlink::{self, Header, NetlinkError, HEADER_LEN};

const NFNL_SUBSYS_IPSET: u16 = libc::NFNL_SUBSYS_IPSET as u16;

/// The protocol version we speak: `IPSET_PROTOCOL_MIN`. Every kernel with ip sets over
/// netlink accepts it (the newest require at least 6, those before version 7 exactly 6);
/// version 7 only adds set indexes to listings, which we do not read.
pub(super) const PROTOCOL: u8 = 6;

// enum ipset_cmd
const CMD_CREATE: u16 = 2;
const CMD_DESTROY: u16 = 3;
const CMD_SWAP: u16 = 6;
const CMD_LIST: u16 = 7;
const CMD_ADD: u16 = 9;

// Attributes at command level.
const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_TYPENAME: u16 = 3;
const ATTR_SETNAME2: u16 = ATTR_TYPENAME;
const ATTR_REVISION: u16 = 4;
const ATTR_FAMILY: u16 = 5;
const ATTR_FLAGS: u16 = 6;
const ATTR_DATA: u16 = 7;
const ATTR_ADT: u16 = 8;
const ATTR_LINENO: u16 = 9;
// Attributes inside DATA.
const ATTR_IP: u16 = 1;
const ATTR_IP_TO: u16 = 2;
const ATTR_CIDR: u16 = 3;
const ATTR_PORT: u16 = 4;
const ATTR_PORT_TO: u16 = 5;
const ATTR_TIMEOUT: u16 = 6;
const ATTR_PROTO: u16 = 7;
const ATTR_CADT_FLAGS: u16 = 8;
const ATTR_MARK: u16 = 10;
// A member's other dimensions (MAC, set name, second address, interface), 17 to 23.
const ATTR_ETHER: u16 = 17;
const ATTR_IFACE: u16 = 23;
const ATTR_HASHSIZE: u16 = 18;
const ATTR_MAXELEM: u16 = 19;
const ATTR_ELEMENTS: u16 = 24;
const ATTR_REFERENCES: u16 = 25;
// Attributes inside IP.
const ATTR_IPADDR_IPV4: u16 = 1;
const ATTR_IPADDR_IPV6: u16 = 2;

/// `IPSET_FLAG_LIST_SETNAME`: a listing of names only.
const FLAG_LIST_SETNAME: u32 = 1 << 1;
/// `IPSET_FLAG_NOMATCH`: a `hash:net` member that is an exception, not a match.
const FLAG_NOMATCH: u32 = 1 << 2;

/// Members are added in messages of about this size: well below what one nest can hold
/// (64 KiB), and what the kernel echoes back in an error fits our receive buffer.
const ADD_MESSAGE_SIZE: usize = 32 * 1024;

/// A request: `cmd` with the attributes `fill` writes after the protocol version, and the
/// netlink flags of its own (`NLM_F_EXCL` makes create and add strict).
fn request(cmd: u16, flags: u16, fill: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut body = Writer::new(&[libc::NFPROTO_IPV4 as u8, libc::NFNETLINK_V0 as u8, 0, 0]);
    body.put_u8(ATTR_PROTOCOL, PROTOCOL);
    fill(&mut body);
    let mut message = netlink::message((NFNL_SUBSYS_IPSET << 8) | cmd, &body.into_bytes());
    message[6..8].copy_from_slice(&flags.to_ne_bytes());
    message
}

/// Creates the empty set `spec` describes; an existing set of that name is an error.
pub(super) fn create(spec: &SetSpec) -> Vec<u8> {
    request(CMD_CREATE, (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16, |body| {
        body.put_str(ATTR_SETNAME, &spec.name)
            .put_str(ATTR_TYPENAME, spec.kind.type_name())
            .put_u8(ATTR_REVISION, spec.kind.revision())
            .put_u8(ATTR_FAMILY, spec.kind.nfproto())
            .nest(ATTR_DATA, |data| match spec.kind {
                SetKind::Net(_) => {
                    data.put_be32(ATTR_HASHSIZE, spec.hashsize()).put_be32(ATTR_MAXELEM, spec.maxelem());
                }
                SetKind::Port => {
                    data.put_be16(ATTR_PORT, 0).put_be16(ATTR_PORT_TO, u16::MAX);
                }
            });
    })
}

/// Adds `members` to the set `name`, as few messages as their size allows: each carries a
/// list of members (`IPSET_ATTR_ADT`, which the kernel takes only with a line number).
pub(super) fn add(name: &str, members: &[Member]) -> Vec<Vec<u8>> {
    let mut members = members.iter().peekable();
    let mut messages = Vec::new();
    while members.peek().is_some() {
        messages.push(request(CMD_ADD, 0, |body| {
            body.put_str(ATTR_SETNAME, name).put_u32(ATTR_LINENO, 0).nest(ATTR_ADT, |list| {
                while list.len() < ADD_MESSAGE_SIZE {
                    let Some(member) = members.next() else { break };
                    list.nest(ATTR_DATA, |data| put_member(data, member));
                }
            });
        }));
    }
    messages
}

fn put_member(data: &mut Writer, member: &Member) {
    match *member {
        Member::Net(cidr) | Member::NetExcept(cidr) => {
            data.nest(ATTR_IP, |ip| match cidr.addr() {
                IpAddr::V4(a) => {
                    ip.put_be32(ATTR_IPADDR_IPV4, u32::from(a));
                }
                IpAddr::V6(a) => {
                    ip.put(ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &a.octets());
                }
            });
            data.put_u8(ATTR_CIDR, cidr.prefix());
            if matches!(member, Member::NetExcept(_)) {
                data.put_be32(ATTR_CADT_FLAGS, FLAG_NOMATCH);
            }
        }
        Member::Port(port) => {
            data.put_be16(ATTR_PORT, port);
        }
    }
}

/// Swaps the contents of `a` and `b`: each name (and whatever refers to it) then stands for
/// what the other held.
pub(super) fn swap(a: &str, b: &str) -> Vec<u8> {
    request(CMD_SWAP, 0, |body| {
        body.put_str(ATTR_SETNAME, a).put_str(ATTR_SETNAME2, b);
    })
}

/// Destroys the set `name`; one that does not exist is no error (no `NLM_F_EXCL`).
pub(super) fn destroy(name: &str) -> Vec<u8> {
    request(CMD_DESTROY, 0, |body| {
        body.put_str(ATTR_SETNAME, name);
    })
}

/// A listing of every set's name.
pub(super) fn list_names() -> Vec<u8> {
    request(CMD_LIST, 0, |body| {
        body.put_be32(ATTR_FLAGS, FLAG_LIST_SETNAME);
    })
}

/// A listing of the set `name`: its header, then its members.
pub(super) fn list(name: &str) -> Vec<u8> {
    request(CMD_LIST, 0, |body| {
        body.put_str(ATTR_SETNAME, name);
    })
}

/// One message of a listing: a set's name, and its header (in the first message of a set) and
/// members (in as many messages as they fill).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Listed {
    pub name: String,
    pub header: Option<ListedHeader>,
    pub members: Vec<Member>,
    /// Members of a kind we do not make (another type's, or with data we do not read).
    pub others: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ListedHeader {
    pub type_name: String,
    pub family: u8,
    pub elements: u32,
    pub references: u32,
    pub timeout: bool,
}

/// The set a listing message describes; `None` for any other message.
pub(super) fn parse_listed(message: &[u8]) -> Result<Option<Listed>, NetlinkError> {
    let Some(Header { kind, .. }) = Header::of(message) else { return Ok(None) };
    if kind != (NFNL_SUBSYS_IPSET << 8) | CMD_LIST {
        return Ok(None);
    }
    let attrs = message.get(HEADER_LEN + 4..).unwrap_or_default();
    let mut listed = Listed::default();
    let (mut type_name, mut family, mut data) = (None, None, None);
    for attribute in attributes(attrs) {
        let attribute = attribute?;
        match attribute.kind {
            ATTR_SETNAME => listed.name = attribute.string(),
            ATTR_TYPENAME => type_name = Some(attribute.string()),
            ATTR_FAMILY => family = Some(attribute.u8()?),
            ATTR_DATA => data = Some(attribute),
            ATTR_ADT => {
                for element in attribute.nested() {
                    match parse_member(&element?)? {
                        Some(member) => listed.members.push(member),
                        None => listed.others += 1,
                    }
                }
            }
            _ => {}
        }
    }
    if let (Some(type_name), Some(family)) = (type_name, family) {
        listed.header = Some(parse_header(type_name, family, data)?);
    }
    Ok(Some(listed))
}

fn parse_header(type_name: String, family: u8, data: Option<Attribute>) -> Result<ListedHeader, NetlinkError> {
    let mut header = ListedHeader { type_name, family, ..ListedHeader::default() };
    for attribute in data.into_iter().flat_map(|data| data.nested()) {
        let attribute = attribute?;
        match attribute.kind {
            ATTR_ELEMENTS => header.elements = attribute.be32()?,
            ATTR_REFERENCES => header.references = attribute.be32()?,
            ATTR_TIMEOUT => header.timeout = true,
            _ => {}
        }
    }
    Ok(header)
}

/// A listed member (`IPSET_ATTR_DATA`): a prefix (`hash:net`) or a port (`bitmap:port`);
/// `None` for any other kind.
fn parse_member(element: &Attribute) -> Result<Option<Member>, NetlinkError> {
    let (mut addr, mut prefix, mut port, mut nomatch, mut other) = (None, None, None, false, false);
    for attribute in element.nested() {
        let attribute = attribute?;
        match attribute.kind {
            ATTR_IP => {
                for ip in attribute.nested() {
                    let ip = ip?;
                    addr = Some(match ip.kind {
                        ATTR_IPADDR_IPV4 => IpAddr::V4(Ipv4Addr::from(ip.be32()?)),
                        ATTR_IPADDR_IPV6 => IpAddr::V6(Ipv6Addr::from(ip.bytes::<16>()?)),
                        _ => continue,
                    });
                }
            }
            ATTR_CIDR => prefix = Some(attribute.u8()?),
            ATTR_PORT => port = Some(attribute.be16()?),
            ATTR_CADT_FLAGS => nomatch = attribute.be32()? & FLAG_NOMATCH != 0,
            ATTR_IP_TO | ATTR_PORT_TO | ATTR_PROTO | ATTR_MARK | ATTR_ETHER..=ATTR_IFACE => other = true,
            // Extensions (timeouts, counters, comments) do not change what a member matches.
            _ => {}
        }
    }
    Ok(match (addr, port) {
        _ if other => None,
        (Some(addr), None) => {
            let prefix = prefix.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
            let cidr = Cidr::new(addr, prefix)
                .ok_or_else(|| NetlinkError::Unreadable(format!("a listed prefix {addr}/{prefix} out of range")))?;
            Some(if nomatch { Member::NetExcept(cidr) } else { Member::Net(cidr) })
        }
        (None, Some(port)) => Some(Member::Port(port)),
        _ => None,
    })
}

/// Folds the messages of a listing into sets: a set's later messages carry only more members.
pub(super) fn fold(listed: Vec<Listed>) -> Vec<FoundSet> {
    let mut sets: Vec<FoundSet> = Vec::new();
    for entry in listed {
        match sets.last_mut() {
            Some(set) if set.name == entry.name && entry.header.is_none() => {
                set.members.extend(entry.members);
                set.others += entry.others;
            }
            _ => sets.push(FoundSet::new(entry)),
        }
    }
    for set in &mut sets {
        set.members.sort_unstable();
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::IpFamily;
    use crate::netlink::attr::NLA_F_NESTED;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn attrs_of(message: &[u8]) -> Vec<Attribute<'_>> {
        attributes(&message[HEADER_LEN + 4..]).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn every_request_names_the_subsystem_command_and_protocol() {
        let message = destroy("istio-in-ports-exclude");
        let header = Header::of(&message).unwrap();
        assert_eq!(header.kind, 6 << 8 | 3);
        assert_eq!(header.length as usize, message.len());
        assert_eq!(&message[HEADER_LEN..HEADER_LEN + 4], &[2, 0, 0, 0], "nfgenmsg: AF_INET, version 0");
        let attrs = attrs_of(&message);
        assert_eq!((attrs[0].kind, attrs[0].u8().unwrap()), (ATTR_PROTOCOL, PROTOCOL));
        assert_eq!((attrs[1].kind, attrs[1].string()), (ATTR_SETNAME, "istio-in-ports-exclude".to_string()));
        assert_eq!(attrs[1].value.last(), Some(&0), "NUL-terminated");
    }

    #[test]
    fn create_is_exclusive_and_carries_the_types_data() {
        let spec = SetSpec::new("n", SetKind::Net(IpFamily::V6), vec![Member::Net(cidr("fd00::/8"))]);
        let message = create(&spec);
        let header = Header::of(&message).unwrap();
        assert_eq!(header.flags, (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16);
        let attrs = attrs_of(&message);
        let kinds: Vec<u16> = attrs.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [ATTR_PROTOCOL, ATTR_SETNAME, ATTR_TYPENAME, ATTR_REVISION, ATTR_FAMILY, ATTR_DATA]);
        assert_eq!(attrs[2].string(), "hash:net");
        assert_eq!(attrs[4].u8().unwrap(), libc::NFPROTO_IPV6 as u8);
        let data: Vec<Attribute> = attrs[5].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!((data[0].kind, data[0].be32().unwrap()), (ATTR_HASHSIZE, 64));
        assert_eq!((data[1].kind, data[1].be32().unwrap()), (ATTR_MAXELEM, 65536));

        let ports = create(&SetSpec::new("p", SetKind::Port, vec![Member::Port(80)]));
        let attrs = attrs_of(&ports);
        assert_eq!(attrs[2].string(), "bitmap:port");
        let data: Vec<Attribute> = attrs[5].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!(data.iter().map(|a| (a.kind, a.be16().unwrap())).collect::<Vec<_>>(), [(ATTR_PORT, 0), (ATTR_PORT_TO, 65535)]);
    }

    #[test]
    fn numbers_and_nests_carry_the_flags_the_kernel_checks() {
        let message = &add("n", &[Member::Net(cidr("10.0.0.0/8"))])[0];
        // ... ADT(nested) → DATA(nested) → IP(nested) → IPV4 (net byte order)
        let raw_kind = |at: usize| u16::from_ne_bytes([message[at + 2], message[at + 3]]);
        let attrs_start = HEADER_LEN + 4;
        let adt = attrs_start + 8 + 8 + 8; // protocol, "n\0", lineno
        assert_eq!(raw_kind(adt), ATTR_ADT | NLA_F_NESTED);
        assert_eq!(raw_kind(adt + 4), ATTR_DATA | NLA_F_NESTED);
        assert_eq!(raw_kind(adt + 8), ATTR_IP | NLA_F_NESTED);
        assert_eq!(raw_kind(adt + 12), ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER);
        assert_eq!(&message[adt + 16..adt + 20], &[10, 0, 0, 0]);
    }

    #[test]
    fn many_members_are_split_into_messages_each_holding_a_list() {
        let members: Vec<Member> =
            (0..5000u32).map(|i| Member::Net(Cidr::new(IpAddr::V4(Ipv4Addr::from(i << 8)), 24).unwrap())).collect();
        let messages = add("big", &members);
        assert!(messages.len() > 1, "5000 members do not fit one message");
        let mut back = Vec::new();
        for message in &messages {
            assert!(message.len() < 40 * 1024, "{}", message.len());
            let attrs = attrs_of(message);
            assert_eq!((attrs[2].kind, attrs[2].value), (ATTR_LINENO, &0u32.to_ne_bytes()[..]));
            for element in attrs[3].nested() {
                back.push(parse_member(&element.unwrap()).unwrap().unwrap());
            }
        }
        assert_eq!(back, members, "every member once, in order");
        assert!(add("none", &[]).is_empty());
    }

    /// A listing message as the kernel writes it.
    fn listed_message(fill: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut body = Writer::new(&[2, 0, 0, 0]);
        fill(&mut body);
        netlink::message(6 << 8 | CMD_LIST, &body.into_bytes())
    }

    #[test]
    fn a_listing_reads_back_header_and_members_across_messages() {
        let first = listed_message(|b| {
            b.put_u8(ATTR_PROTOCOL, 6).put_str(ATTR_SETNAME, "s").put_str(ATTR_TYPENAME, "hash:net").put_u8(ATTR_FAMILY, 2);
            b.put_u8(ATTR_REVISION, 7).nest(ATTR_DATA, |d| {
                d.put_be32(ATTR_HASHSIZE, 1024).put_be32(ATTR_MAXELEM, 65536).put_be32(ATTR_REFERENCES, 2);
                d.put_be32(ATTR_ELEMENTS, 3);
            });
            b.nest(ATTR_ADT, |adt| {
                adt.nest(ATTR_DATA, |d| put_member(d, &Member::Net(cidr("10.0.0.0/8"))));
                adt.nest(ATTR_DATA, |d| put_member(d, &Member::NetExcept(cidr("10.1.0.0/16"))));
            });
        });
        let second = listed_message(|b| {
            b.put_u8(ATTR_PROTOCOL, 6).put_str(ATTR_SETNAME, "s").nest(ATTR_ADT, |adt| {
                adt.nest(ATTR_DATA, |d| {
                    put_member(d, &Member::Net(cidr("192.168.0.0/16")));
                    d.put_be32(ATTR_TIMEOUT, 30);
                });
            });
        });
        let listed = [first, second].iter().map(|m| parse_listed(m).unwrap().unwrap()).collect();
        let sets = fold(listed);
        assert_eq!(sets.len(), 1);
        let set = &sets[0];
        assert_eq!((set.type_name.as_str(), set.family, set.references, set.elements), ("hash:net", 2, 2, 3));
        assert_eq!(set.kind, Some(SetKind::Net(IpFamily::V4)));
        assert_eq!(
            set.members,
            [Member::Net(cidr("10.0.0.0/8")), Member::Net(cidr("192.168.0.0/16")), Member::NetExcept(cidr("10.1.0.0/16"))]
        );
        assert_eq!(parse_listed(&netlink::message(libc::NLMSG_NOOP as u16, &[0; 4])).unwrap(), None);
    }

    #[test]
    fn members_of_other_kinds_are_counted_not_read() {
        let message = listed_message(|b| {
            b.put_str(ATTR_SETNAME, "ipport").put_str(ATTR_TYPENAME, "hash:ip,port").put_u8(ATTR_FAMILY, 2);
            b.nest(ATTR_ADT, |adt| {
                adt.nest(ATTR_DATA, |d| {
                    put_member(d, &Member::Net(cidr("10.0.0.1/32")));
                    d.put_be16(ATTR_PORT, 80).put_u8(7, 6);
                });
            });
        });
        let listed = parse_listed(&message).unwrap().unwrap();
        assert_eq!((listed.members.len(), listed.others), (0, 1));
        let sets = fold(vec![listed]);
        assert_eq!(sets[0].kind, None);
    }
}
