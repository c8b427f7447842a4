//! Terms to nf_tables expressions, the way nft 1.0 compiles the same text.
//!
//! nft adds a protocol check in front of a match that needs one (`meta nfproto ipv4` before
//! `ip daddr` in an inet table, `meta l4proto tcp` before `tcp dport`) unless the rule already
//! established it; [`Context`] tracks that, so `meta l4proto tcp ... tcp dport 53` checks the
//! protocol once, as nft does.

use std::ffi::CString;

use nftnl::expr::{
    Bitwise, Cmp, CmpOp, Conntrack, Counter, Immediate, Meta, NetworkHeaderField, Payload, Register, TransportHeaderField,
    Verdict,
};
use nftnl::Rule;

use super::raw::{CtZoneSet, NotInSet, Redirect, Tproxy};
use super::render::{Direction, Term};
use super::schema::chain_name;
use crate::config::Cidr;
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

/// Appends the expressions of `terms` to `rule`; `sets` are the anonymous sets made for
/// the rule's `PortNotIn` terms, in order.
pub(super) fn add_terms(rule: &mut Rule, terms: &[Term], sets: &[PortSet]) {
    let mut ctx = Context::default();
    let mut sets = sets.iter();
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
                let set = sets.next().expect("a port set for every port list");
                require_l4proto(rule, &mut ctx, *proto);
                rule.add_expr(&load_transport(2, 2));
                rule.add_expr(&NotInSet { set_id: set.id });
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

/// `ip|ip6 saddr|daddr [!=] C`. A prefix on a byte boundary loads just its bytes; any other
/// prefix (including /0) loads the whole address and masks it, as nft does.
fn address(rule: &mut Rule, ctx: &mut Context, direction: Direction, cidr: &Cidr, negated: bool) {
    let (nfproto, bytes, offset) = match (cidr.addr(), direction) {
        (std::net::IpAddr::V4(a), Direction::Source) => (libc::NFPROTO_IPV4, a.octets().to_vec(), 12),
        (std::net::IpAddr::V4(a), Direction::Destination) => (libc::NFPROTO_IPV4, a.octets().to_vec(), 16),
        (std::net::IpAddr::V6(a), Direction::Source) => (libc::NFPROTO_IPV6, a.octets().to_vec(), 8),
        (std::net::IpAddr::V6(a), Direction::Destination) => (libc::NFPROTO_IPV6, a.octets().to_vec(), 24),
    };
    let nfproto = nfproto as u8;
    if ctx.nfproto != Some(nfproto) {
        rule.add_expr(&Meta::NfProto);
        rule.add_expr(&Cmp::new(CmpOp::Eq, nfproto));
        ctx.nfproto = Some(nfproto);
    }
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

/// The user data nft attaches to an anonymous port set (`tcp dport { .. }`): key byte order
/// and "typeof tcp dport", which nft reads back to print the elements as ports.
pub(super) fn port_set_userdata(proto: Option<Protocol>) -> Vec<u8> {
    // nft's internal ids: BYTEORDER_BIG_ENDIAN, EXPR_PAYLOAD, PROTO_DESC_{UDP,TCP,TH}, the
    // header field `dport`.
    const BIG_ENDIAN: u32 = 2;
    const EXPR_PAYLOAD: u32 = 7;
    let desc: u32 = match proto {
        Some(Protocol::Udp) => 6,
        Some(Protocol::Tcp) => 8,
        None => 11,
    };
    const DPORT_FIELD: u32 = 2;
    let tlv = |kind: u8, value: &[u8]| -> Vec<u8> {
        let mut out = vec![kind, value.len() as u8];
        out.extend_from_slice(value);
        out
    };
    let payload = [tlv(0, &desc.to_ne_bytes()), tlv(1, &DPORT_FIELD.to_ne_bytes())].concat();
    let typeof_key = [tlv(0, &EXPR_PAYLOAD.to_ne_bytes()), tlv(1, &payload)].concat();
    [tlv(0, &BIG_ENDIAN.to_ne_bytes()), tlv(3, &typeof_key)].concat()
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
}
