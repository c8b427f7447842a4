//! Terms to nf_tables expressions, the way nft 1.0 compiles the same text.
//!
//! nft adds a protocol check in front of a match that needs one (`meta nfproto ipv4` before
//! `ip daddr` in an inet table, `meta l4proto tcp` before `tcp dport`) unless the rule already
//! established it; [`Context`] tracks that, so `meta l4proto tcp ... tcp dport 53` checks the
//! protocol once, as nft does.

use std::ffi::CString;
use std::net::IpAddr;

use nftnl::expr::{
    Bitwise, Cmp, CmpOp, Conntrack, Counter, Immediate, Meta, NetworkHeaderField, Payload, Register, TransportHeaderField,
    Verdict,
};
use nftnl::Rule;

use super::raw::{CtZoneSet, Lookup, Redirect, Tproxy, ANONYMOUS_SET};
use super::render::{Direction, Term};
use super::schema::chain_name;
use crate::config::Cidr;
use crate::family::IpFamily;
use crate::model::sets::{SetElements, SetList};
use crate::model::{CtState, OwnerKind, Protocol};

/// The kernel's interface-name size; nft compares names over all of it.
const IFNAMSIZ: usize = 16;

/// An anonymous set a term needs, created in the batch right before its rule.
pub(super) struct PortSet {
    pub id: u32,
    pub proto: Option<Protocol>,
    pub ports: Vec<u16>,
}

/// The protocol facts a rule has established so far.
#[derive(Default)]
struct Context {
    nfproto: Option<u8>,
    l4proto: Option<u8>,
}

fn l4proto_number(proto: Protocol) -> u8 {
    match proto {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn op(negated: bool) -> CmpOp {
    if negated {
        CmpOp::Neq
    } else {
        CmpOp::Eq
    }
}

/// A header load. (nftnl names the raw offset and length "bits"; the kernel reads bytes.)
fn load_network(offset: u32, len: u32) -> Payload {
    Payload::Network(NetworkHeaderField::Raw { offset_bits: offset, length_bits: len })
}

fn load_transport(offset: u32, len: u32) -> Payload {
    Payload::Transport(TransportHeaderField::Raw { offset_bits: offset, length_bits: len })
}

/// The sets a rule looks up, each created earlier in the same batch.
pub(super) struct RuleSets<'s> {
    /// The anonymous sets made for the rule's `PortNotIn` terms, in order.
    pub anonymous: &'s [PortSet],
    /// The named sets of the rule's table, with their ids in the batch.
    pub named: &'s [(SetList, u32)],
}

impl RuleSets<'_> {
    /// Adds the lookup of `list`'s set.
    fn lookup(&self, rule: &mut Rule, list: SetList) {
        let set_id = self.named.iter().find(|(l, _)| *l == list).expect("the table holds every set its rules use").1;
        let name = CString::new(list.name()).expect("set names have no NUL");
        rule.add_expr(&Lookup { name: &name, set_id, inverted: false });
    }
}

/// Appends the expressions of `terms` to `rule`.
pub(super) fn add_terms(rule: &mut Rule, terms: &[Term], sets: &RuleSets) {
    let mut ctx = Context::default();
    let mut anonymous = sets.anonymous.iter();
    for term in terms {
        match term {
            Term::InInterface(name) => interface(rule, Meta::IifName, name),
            Term::OutInterface(name) => interface(rule, Meta::OifName, name),
            Term::L4Proto(proto) => require_l4proto(rule, &mut ctx, Some(*proto)),
            Term::Address { direction, cidr, negated } => address(rule, &mut ctx, *direction, cidr, *negated),
            Term::Port { proto, direction, port, negated } => {
                require_l4proto(rule, &mut ctx, *proto);
                let offset = match direction {
                    Direction::Source => 0,
                    Direction::Destination => 2,
                };
                rule.add_expr(&load_transport(offset, 2));
                rule.add_expr(&Cmp::new(op(*negated), port.to_be()));
            }
            Term::PortNotIn { proto, .. } => {
                let set = anonymous.next().expect("a port set for every port list");
                require_l4proto(rule, &mut ctx, *proto);
                rule.add_expr(&load_transport(2, 2));
                rule.add_expr(&Lookup { name: ANONYMOUS_SET, set_id: set.id, inverted: true });
            }
            Term::AddressInSet { family, list } => {
                let (nfproto, offset, len) = match family {
                    IpFamily::V4 => (libc::NFPROTO_IPV4, 16, 4),
                    IpFamily::V6 => (libc::NFPROTO_IPV6, 24, 16),
                };
                require_nfproto(rule, &mut ctx, nfproto as u8);
                rule.add_expr(&load_network(offset, len));
                sets.lookup(rule, *list);
            }
            Term::PortInSet { proto, list } => {
                require_l4proto(rule, &mut ctx, *proto);
                rule.add_expr(&load_transport(2, 2));
                sets.lookup(rule, *list);
            }
            Term::CtState(state) => {
                let mask = match state {
                    CtState::Invalid => nftnl::expr::ct::States::INVALID,
                    CtState::RelatedEstablished => nftnl::expr::ct::States::RELATED | nftnl::expr::ct::States::ESTABLISHED,
                };
                rule.add_expr(&Conntrack::State);
                rule.add_expr(&Bitwise::new(mask.bits(), 0u32));
                rule.add_expr(&Cmp::new(CmpOp::Neq, 0u32));
            }
            Term::Mark { mark, negated } => {
                rule.add_expr(&Meta::Mark { set: false });
                rule.add_expr(&Cmp::new(op(*negated), *mark));
            }
            Term::ConnMark(mark) => {
                rule.add_expr(&Conntrack::Mark { set: false });
                rule.add_expr(&Cmp::new(CmpOp::Eq, *mark));
            }
            Term::Owner { kind, id, negated } => {
                rule.add_expr(match kind {
                    OwnerKind::Uid => &Meta::SkUid,
                    OwnerKind::Gid => &Meta::SkGid,
                });
                rule.add_expr(&Cmp::new(op(*negated), *id));
            }
            Term::Counter => rule.add_expr(&Counter),
            Term::Redirect(port) => {
                rule.add_expr(&Immediate::new(port.to_be(), Register::Reg1));
                rule.add_expr(&Redirect);
            }
            Term::Tproxy { family, port } => {
                rule.add_expr(&Immediate::new(port.to_be(), Register::Reg1));
                rule.add_expr(&Tproxy { family: *family });
            }
            Term::SetMark(mark) => {
                rule.add_expr(&Immediate::new(*mark, Register::Reg1));
                rule.add_expr(&Meta::Mark { set: true });
            }
            Term::SaveMark => {
                rule.add_expr(&Meta::Mark { set: false });
                rule.add_expr(&Conntrack::Mark { set: true });
            }
            Term::RestoreMark => {
                rule.add_expr(&Conntrack::Mark { set: false });
                rule.add_expr(&Meta::Mark { set: true });
            }
            Term::CtZone(zone) => {
                rule.add_expr(&Immediate::new(*zone, Register::Reg1));
                rule.add_expr(&CtZoneSet);
            }
            Term::Return => rule.add_expr(&Verdict::Return),
            Term::Accept => rule.add_expr(&Verdict::Accept),
            Term::Drop => rule.add_expr(&Verdict::Drop),
            Term::Jump(chain) => {
                let chain = CString::new(chain_name(*chain)).expect("chain names have no NUL");
                rule.add_expr(&Verdict::Jump { chain });
            }
        }
    }
}

fn interface(rule: &mut Rule, key: Meta, name: &str) {
    // Interface names are at most 15 bytes (checked when the configuration was parsed).
    let mut padded = [0u8; IFNAMSIZ];
    let len = name.len().min(IFNAMSIZ);
    padded[..len].copy_from_slice(&name.as_bytes()[..len]);
    rule.add_expr(&key);
    rule.add_expr(&Cmp::new(CmpOp::Eq, &padded[..]));
}

/// `meta l4proto P`, unless the rule already checked it; `None` (`th`) needs no check.
fn require_l4proto(rule: &mut Rule, ctx: &mut Context, proto: Option<Protocol>) {
    let Some(number) = proto.map(l4proto_number) else { return };
    if ctx.l4proto != Some(number) {
        rule.add_expr(&Meta::L4Proto);
        rule.add_expr(&Cmp::new(CmpOp::Eq, number));
        ctx.l4proto = Some(number);
    }
}

/// `meta nfproto ipv4|ipv6`, unless the rule already checked it (nft's check before an
/// address in an inet table).
fn require_nfproto(rule: &mut Rule, ctx: &mut Context, nfproto: u8) {
    if ctx.nfproto != Some(nfproto) {
        rule.add_expr(&Meta::NfProto);
        rule.add_expr(&Cmp::new(CmpOp::Eq, nfproto));
        ctx.nfproto = Some(nfproto);
    }
}

/// `ip|ip6 saddr|daddr [!=] C`. A prefix on a byte boundary loads just its bytes; any other
/// prefix (including /0) loads the whole address and masks it, as nft does.
fn address(rule: &mut Rule, ctx: &mut Context, direction: Direction, cidr: &Cidr, negated: bool) {
    let (nfproto, bytes, offset) = match (cidr.addr(), direction) {
        (std::net::IpAddr::V4(a), Direction::Source) => (libc::NFPROTO_IPV4, a.octets().to_vec(), 12),
        (std::net::IpAddr::V4(a), Direction::Destination) => (libc::NFPROTO_IPV4, a.octets().to_vec(), 16),
        (std::net::IpAddr::V6(a), Direction::Source) => (libc::NFPROTO_IPV6, a.octets().to_vec(), 8),
        (std::net::IpAddr::V6(a), Direction::Destination) => (libc::NFPROTO_IPV6, a.octets().to_vec(), 24),
    };
    require_nfproto(rule, ctx, nfproto as u8);
    let prefix = usize::from(cidr.prefix());
    if prefix > 0 && prefix % 8 == 0 {
        rule.add_expr(&load_network(offset, (prefix / 8) as u32));
        rule.add_expr(&Cmp::new(op(negated), &bytes[..prefix / 8]));
    } else {
        let mask: Vec<u8> = (0..bytes.len()).map(|i| prefix_mask_byte(prefix, i)).collect();
        rule.add_expr(&load_network(offset, bytes.len() as u32));
        rule.add_expr(&Bitwise::new(&mask[..], &vec![0u8; bytes.len()][..]));
        // The address is already masked (Cidr clears host bits).
        rule.add_expr(&Cmp::new(op(negated), &bytes[..]));
    }
}

/// Byte `index` of the netmask of a `prefix`-bit prefix.
fn prefix_mask_byte(prefix: usize, index: usize) -> u8 {
    let bits = prefix.saturating_sub(index * 8).min(8);
    (0xffu16 << (8 - bits)) as u8
}

/// A user-data item: kind, length, value.
fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, value.len() as u8];
    out.extend_from_slice(value);
    out
}

/// nft's `BYTEORDER_BIG_ENDIAN`: set keys of addresses and ports.
const BIG_ENDIAN: u32 = 2;

/// The user data nft attaches to an anonymous port set (`tcp dport { .. }`): key byte order
/// and "typeof tcp dport", which nft reads back to print the elements as ports.
pub(super) fn port_set_userdata(proto: Option<Protocol>) -> Vec<u8> {
    // nft's internal ids: EXPR_PAYLOAD, PROTO_DESC_{UDP,TCP,TH}, the header field `dport`.
    const EXPR_PAYLOAD: u32 = 7;
    let desc: u32 = match proto {
        Some(Protocol::Udp) => 6,
        Some(Protocol::Tcp) => 8,
        None => 11,
    };
    const DPORT_FIELD: u32 = 2;
    let payload = [tlv(0, &desc.to_ne_bytes()), tlv(1, &DPORT_FIELD.to_ne_bytes())].concat();
    let typeof_key = [tlv(0, &EXPR_PAYLOAD.to_ne_bytes()), tlv(1, &payload)].concat();
    [tlv(0, &BIG_ENDIAN.to_ne_bytes()), tlv(3, &typeof_key)].concat()
}

/// The user data nft attaches to a named set of addresses or ports: the key byte order.
pub(super) fn named_set_userdata() -> Vec<u8> {
    tlv(0, &BIG_ENDIAN.to_ne_bytes())
}

/// One element of a named set as nft sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Element {
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END` on the address after an interval.
    pub flags: u32,
    /// The interval runs to the end of the address space, so no end element follows: nft
    /// notes that in the element's user data, to print it as a prefix.
    pub open: bool,
}

/// The user data of an element that opens an interval to the end of the address space
/// (nft's `NFTNL_UDATA_SET_ELEM_FLAGS` holding `NFTNL_SET_ELEM_F_INTERVAL_OPEN`).
pub(super) fn open_interval_userdata() -> Vec<u8> {
    tlv(1, &1u32.to_ne_bytes())
}

/// The elements nft sends for a set of `elements`: each port; for address ranges (an interval
/// set), the first address of each range and, flagged as an interval end, the address after
/// its last, in ascending order, led by an end at the zero address when the first range starts
/// above it (as nft sends a new interval set).
pub(super) fn set_elements(elements: &SetElements) -> Vec<Element> {
    let ranges = match elements {
        SetElements::Ports(ports) => {
            return ports.iter().map(|p| Element { key: p.to_be_bytes().to_vec(), flags: 0, open: false }).collect()
        }
        SetElements::Ranges(ranges) => ranges,
    };
    let end = libc::NFT_SET_ELEM_INTERVAL_END as u32;
    let bytes = |addr: IpAddr| match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut out = Vec::with_capacity(ranges.len() * 2 + 1);
    if let Some(first) = ranges.first().filter(|r| !r.first.is_unspecified()) {
        out.push(Element { key: vec![0; bytes(first.first).len()], flags: end, open: false });
    }
    for range in ranges {
        let after = next_address(range.last);
        out.push(Element { key: bytes(range.first), flags: 0, open: after.is_none() });
        if let Some(after) = after {
            out.push(Element { key: bytes(after), flags: end, open: false });
        }
    }
    out
}

/// The address after `addr`; `None` at the end of the address space.
fn next_address(addr: IpAddr) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(a) => u32::from(a).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(a) => u128::from(a).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

/// A port as an nft set key (`inet_service`, two bytes in network order).
pub(super) struct Port(pub u16);

impl nftnl::set::SetKey for Port {
    const TYPE: u32 = 13;
    const LEN: u32 = 2;

    fn data(&self) -> Box<[u8]> {
        Box::new(self.0.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks() {
        let mask = |prefix| (0..4).map(|i| prefix_mask_byte(prefix, i)).collect::<Vec<_>>();
        assert_eq!(mask(12), vec![0xff, 0xf0, 0, 0]);
        assert_eq!(mask(0), vec![0, 0, 0, 0]);
        assert_eq!(mask(31), vec![0xff, 0xff, 0xff, 0xfe]);
    }

    #[test]
    fn tcp_port_set_userdata_matches_what_nft_sends() {
        // Captured from `nft --debug=mnl` for `tcp dport != { 53, 15008 }`.
        let nft = [
            0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x03, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x08,
            0x00, 0x00, 0x00, 0x01, 0x04, 0x02, 0x00, 0x00, 0x00,
        ];
        assert_eq!(port_set_userdata(Some(Protocol::Tcp)), nft);
    }

    fn elements(cidrs: &str) -> Vec<(String, u32, bool)> {
        let cidrs = crate::config::parse_cidrs("-x", cidrs).unwrap();
        let family = IpFamily::of(cidrs[0].addr());
        let ranges = crate::model::sets::AddrRange::merge(family, cidrs.iter());
        let hex = |key: &[u8]| key.iter().map(|b| format!("{b:02x}")).collect::<String>();
        set_elements(&SetElements::Ranges(ranges)).iter().map(|e| (hex(&e.key), e.flags, e.open)).collect()
    }

    #[test]
    fn interval_elements_are_what_nft_sends_for_a_new_set() {
        // Captured from `nft --debug=netlink` for `add element .. { 1.2.3.4, 8.0.0.0/7 }` in a
        // new set: an end at the zero address leads, each interval ends at the address after it.
        let e = |key: &str, flags: u32| (key.to_string(), flags, false);
        assert_eq!(
            elements("1.2.3.4/32,8.0.0.0/7"),
            [e("00000000", 1), e("01020304", 0), e("01020305", 1), e("08000000", 0), e("0a000000", 1)]
        );
        // A first interval at the zero address needs no leading end; one reaching the end of
        // the space has no end element, and says so in its user data.
        assert_eq!(
            elements("0.0.0.0/32,255.255.255.0/24"),
            [e("00000000", 0), e("00000001", 1), ("ffffff00".to_string(), 0, true)]
        );
        assert_eq!(elements("::/0"), [("0".repeat(32), 0, true)]);
        assert_eq!(open_interval_userdata(), [0x01, 0x04, 0x01, 0x00, 0x00, 0x00]);
        assert_eq!(named_set_userdata(), [0x00, 0x04, 0x02, 0x00, 0x00, 0x00]);
        let ports = set_elements(&SetElements::Ports(vec![53, 15008]));
        assert_eq!(ports.iter().map(|e| e.key.clone()).collect::<Vec<_>>(), [vec![0, 53], vec![0x3a, 0xa0]]);
    }
}
