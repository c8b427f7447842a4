//! A rule read back from nf_tables, in nft syntax: the expressions are folded back into the
//! terms `render.rs` writes (registers followed from load to use), so a rule of ours reads back
//! exactly as we render it, and one someone else added reads in the same words. What nft adds
//! on its own (the `meta nfproto` check before an address) is left out again. An expression of
//! a kind or form our rules never use shows as libnftnl dumps it, in brackets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::raw::{Expr, ExprObject, SetElement};
use super::render::NftRange;
use super::state::SetState;
use crate::config::Cidr;
use crate::model::sets::AddrRange;

/// `NF_NAT_RANGE_MAP_IPS` and `NF_NAT_RANGE_PROTO_SPECIFIED`: the flags an address or port says.
const NAT_RANGE_IMPLIED: u32 = 1 | 2;

/// What a register holds.
#[derive(Debug, Clone)]
enum Value {
    Meta(u32),
    Payload {
        base: u32,
        offset: u32,
        len: u32,
    },
    Ct(u32),
    /// `(of & mask) ^ xor`
    Masked {
        of: Box<Value>,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Data(Vec<u8>),
}

/// A register's value and the expressions that made it, shown raw if it cannot be decompiled.
#[derive(Debug, Clone)]
struct Loaded {
    value: Value,
    raw: Vec<String>,
}

/// A set a rule looks up, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LookedUp {
    /// An anonymous set, shown by its elements (keys).
    Elements(Vec<Vec<u8>>),
    /// A named set, shown by its name.
    Named(String),
}

/// The rule made of `exprs`; `sets` holds each set the rule looks up, in order (`None`: the
/// set was not found).
pub(super) fn decompile(exprs: &[ExprObject], sets: &[Option<LookedUp>]) -> String {
    let mut decompiler = Decompiler::default();
    let mut sets = sets.iter();
    for expr in exprs {
        decompiler.expr(expr, &mut sets);
    }
    decompiler.finish()
}

/// A named set's elements in nft syntax, as `nft list` prints them: ports; addresses; in an
/// interval set, each interval from an element to the next interval end (or to the end of the
/// address space) as one address, a prefix or a range. A key of another type shows in hex.
pub(super) fn set_element_words(set: &SetState) -> Vec<String> {
    let hex = |key: &[u8]| key.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let keys = || set.elements.iter().map(|e| e.key.as_slice());
    match (set.key_type, set.key_len) {
        (13, 2) => return keys().map(|k| port(k).map_or_else(|| hex(k), |p| p.to_string())).collect(),
        (7, 4) | (8, 16) if set.is_interval() => {}
        (7, 4) | (8, 16) => return keys().map(|k| address(k).map_or_else(|| hex(k), |a| a.to_string())).collect(),
        _ => return keys().map(hex).collect(),
    }
    // At one key, an interval's end comes before the next one's start.
    let mut elements: Vec<&SetElement> = set.elements.iter().collect();
    elements.sort_by(|a, b| a.key.cmp(&b.key).then(b.flags.cmp(&a.flags)));
    let mut words = Vec::new();
    let mut start: Option<IpAddr> = None;
    let mut close = |start: IpAddr, last: Option<IpAddr>| {
        if let Some(last) = last {
            words.push(NftRange(&AddrRange { first: start, last }).to_string());
        }
    };
    for element in elements {
        let Some(addr) = address(&element.key) else { continue };
        let before = previous_address(addr);
        if element.flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0 {
            // An end with no interval open is nft's leading element at the zero address.
            if let Some(open) = start.take() {
                close(open, before);
            }
        } else if let Some(open) = start.replace(addr) {
            close(open, before);
        }
    }
    if let Some(open) = start {
        let last = match open {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        };
        close(open, Some(last));
    }
    words
}

fn previous_address(addr: IpAddr) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(a) => u32::from(a).checked_sub(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(a) => u128::from(a).checked_sub(1).map(|n| IpAddr::V6(n.into())),
    }
}

#[derive(Default)]
struct Decompiler {
    /// Loaded and not yet used, in load order.
    regs: Vec<(u32, Loaded)>,
    terms: Vec<String>,
    /// The rule's `meta l4proto` and `meta nfproto`, once matched.
    l4proto: Option<u8>,
    nfproto: Option<u8>,
    /// Where the last `meta nfproto` term went: nft's own check when an address match follows it.
    nfproto_term: Option<usize>,
}

fn bracketed(text: &str) -> String {
    format!("[ {text} ]")
}

fn op_words(op: u32) -> Option<&'static str> {
    Some(match op as i32 {
        libc::NFT_CMP_EQ => "",
        libc::NFT_CMP_NEQ => "!= ",
        libc::NFT_CMP_LT => "< ",
        libc::NFT_CMP_LTE => "<= ",
        libc::NFT_CMP_GT => "> ",
        libc::NFT_CMP_GTE => ">= ",
        _ => return None,
    })
}

/// A value in the host's byte order (marks, owners, zones).
fn host_number(data: &[u8]) -> Option<u64> {
    Some(match data.len() {
        1 => u64::from(data[0]),
        2 => u64::from(u16::from_ne_bytes(data.try_into().ok()?)),
        4 => u64::from(u32::from_ne_bytes(data.try_into().ok()?)),
        8 => u64::from_ne_bytes(data.try_into().ok()?),
        _ => return None,
    })
}

/// A port, in network order.
fn port(data: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(data.try_into().ok()?))
}

fn address(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?))),
        _ => None,
    }
}

/// An interface name as nft compares it: padded with NULs, or a prefix (`eth*`) when not.
fn interface(data: &[u8]) -> String {
    match data.iter().position(|&b| b == 0) {
        Some(end) => String::from_utf8_lossy(&data[..end]).into_owned(),
        None => format!("{}*", String::from_utf8_lossy(data)),
    }
}

fn protocol_name(number: u8) -> String {
    match i32::from(number) {
        libc::IPPROTO_TCP => "tcp".to_string(),
        libc::IPPROTO_UDP => "udp".to_string(),
        _ => number.to_string(),
    }
}

/// The names of the conntrack states in `mask`, as render.rs orders them.
fn ct_states(mask: u32) -> Option<String> {
    const STATES: [(u32, &str); 5] = [(1, "invalid"), (4, "related"), (2, "established"), (8, "new"), (64, "untracked")];
    let known: u32 = STATES.iter().map(|(bit, _)| bit).sum();
    if mask == 0 || mask & !known != 0 {
        return None;
    }
    let names: Vec<&str> = STATES.iter().filter(|(bit, _)| mask & bit != 0).map(|(_, name)| *name).collect();
    Some(names.join(","))
}

/// The length of the prefix `mask` keeps; `None` unless its ones are contiguous from the left.
fn prefix_len(mask: &[u8]) -> Option<usize> {
    let ones: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
    let contiguous = mask.iter().enumerate().all(|(i, &b)| {
        let bits = ones.saturating_sub(i * 8).min(8);
        b == (0xffu16 << (8 - bits)) as u8
    });
    contiguous.then_some(ones)
}

impl Decompiler {
    fn load(&mut self, reg: u32, loaded: Loaded) {
        if let Some(i) = self.regs.iter().position(|(r, _)| *r == reg) {
            // Overwritten unused: nothing decompiles it, so it shows as it is.
            let (_, lost) = self.regs.remove(i);
            self.terms.extend(lost.raw);
        }
        self.regs.push((reg, loaded));
    }

    fn take(&mut self, reg: u32) -> Option<Loaded> {
        let i = self.regs.iter().position(|(r, _)| *r == reg)?;
        Some(self.regs.remove(i).1)
    }

    /// Writes `term`, or, when it could not be decompiled, the raw expressions behind it.
    fn write(&mut self, term: Option<String>, inputs: Vec<Loaded>, text: String) {
        match term {
            Some(term) => self.terms.push(term),
            None => {
                self.terms.extend(inputs.into_iter().flat_map(|l| l.raw));
                self.terms.push(text);
            }
        }
    }

    fn expr<'s>(&mut self, expr: &ExprObject, sets: &mut impl Iterator<Item = &'s Option<LookedUp>>) {
        match expr {
            ExprObject::Counter => self.terms.push("counter".to_string()),
            ExprObject::Lookup { sreg, flags, .. } => {
                let set = sets.next().and_then(Option::as_ref);
                let text = bracketed(&format!("lookup reg {sreg} flags {flags:#x}"));
                let lhs = self.take(*sreg);
                let term = lhs.as_ref().and_then(|lhs| self.membership(&lhs.value, *flags, set?));
                self.write(term, lhs.into_iter().collect(), text);
            }
            ExprObject::Other { text, fields: None } => self.terms.push(bracketed(text)),
            ExprObject::Other { text, fields: Some(fields) } => self.fields(fields, bracketed(text)),
        }
    }

    fn fields(&mut self, fields: &Expr, text: String) {
        let loaded = |value: Value| Loaded { value, raw: vec![text.clone()] };
        match fields {
            Expr::Meta { key, dreg: Some(reg), .. } => self.load(*reg, loaded(Value::Meta(*key))),
            Expr::Ct { key, dreg: Some(reg), .. } => self.load(*reg, loaded(Value::Ct(*key))),
            Expr::Payload { base, offset, len, dreg } => {
                self.load(*dreg, loaded(Value::Payload { base: *base, offset: *offset, len: *len }))
            }
            Expr::Immediate { dreg, data } => self.load(*dreg, loaded(Value::Data(data.clone()))),
            Expr::Bitwise { sreg, dreg, mask, xor } => match self.take(*sreg) {
                Some(input) => {
                    let value = Value::Masked { of: Box::new(input.value), mask: mask.clone(), xor: xor.clone() };
                    let raw = input.raw.into_iter().chain([text]).collect();
                    self.load(*dreg, Loaded { value, raw });
                }
                None => self.terms.push(text),
            },
            Expr::Cmp { sreg, op, data } => {
                let lhs = self.take(*sreg);
                let term = lhs.as_ref().and_then(|lhs| self.condition(&lhs.value, *op, data));
                self.write(term, lhs.into_iter().collect(), text);
            }
            Expr::Meta { key, dreg: None, sreg: Some(reg) } => {
                let value = self.take(*reg);
                let term = value.as_ref().and_then(|v| match (*key as i32, &v.value) {
                    (libc::NFT_META_MARK, Value::Data(d)) => Some(format!("meta mark set {}", host_number(d)?)),
                    (libc::NFT_META_MARK, Value::Ct(k)) if *k as i32 == libc::NFT_CT_MARK => {
                        Some("meta mark set ct mark".to_string())
                    }
                    _ => None,
                });
                self.write(term, value.into_iter().collect(), text);
            }
            Expr::Ct { key, dreg: None, sreg: Some(reg) } => {
                let value = self.take(*reg);
                let term = value.as_ref().and_then(|v| match (*key as i32, &v.value) {
                    (libc::NFT_CT_MARK, Value::Meta(k)) if *k as i32 == libc::NFT_META_MARK => {
                        Some("ct mark set meta mark".to_string())
                    }
                    (libc::NFT_CT_MARK, Value::Data(d)) => Some(format!("ct mark set {}", host_number(d)?)),
                    (libc::NFT_CT_ZONE, Value::Data(d)) => Some(format!("ct zone set {}", host_number(d)?)),
                    _ => None,
                });
                self.write(term, value.into_iter().collect(), text);
            }
            Expr::Meta { .. } | Expr::Ct { .. } => self.terms.push(text),
            Expr::Verdict { code, chain } => {
                let term = match (*code, chain) {
                    (libc::NF_ACCEPT, _) => Some("accept".to_string()),
                    (libc::NF_DROP, _) => Some("drop".to_string()),
                    (libc::NFT_RETURN, _) => Some("return".to_string()),
                    (libc::NFT_CONTINUE, _) => Some("continue".to_string()),
                    (libc::NFT_JUMP, Some(chain)) => Some(format!("jump {chain}")),
                    (libc::NFT_GOTO, Some(chain)) => Some(format!("goto {chain}")),
                    _ => None,
                };
                self.write(term, Vec::new(), text);
            }
            Expr::Redir { proto_min, proto_max, flags } | Expr::Masq { proto_min, proto_max, flags } => {
                let verb = if matches!(fields, Expr::Redir { .. }) { "redirect" } else { "masquerade" };
                let (ports, inputs) = self.ports(*proto_min, *proto_max);
                let term = (flags & !NAT_RANGE_IMPLIED == 0)
                    .then_some(ports)
                    .flatten()
                    .map(|ports| ports.map_or(verb.to_string(), |p| format!("{verb} to {p}")));
                self.write(term, inputs, text);
            }
            Expr::Tproxy { family, addr, port } => {
                let (to, inputs) = self.destination(*addr, None, *port, None);
                let term = to.map(|to| format!("tproxy {}to {to}", family_word(*family).map_or(String::new(), |f| f + " ")));
                self.write(term, inputs, text);
            }
            Expr::Nat { kind, family, addr_min, addr_max, proto_min, proto_max, flags } => {
                let (to, inputs) = self.destination(*addr_min, *addr_max, *proto_min, *proto_max);
                let verb = match *kind as i32 {
                    libc::NFT_NAT_SNAT => Some("snat"),
                    libc::NFT_NAT_DNAT => Some("dnat"),
                    _ => None,
                };
                let term = (flags & !NAT_RANGE_IMPLIED == 0)
                    .then(|| Some(format!("{} {}to {}", verb?, family_word(*family).map_or(String::new(), |f| f + " "), to?)))
                    .flatten();
                self.write(term, inputs, text);
            }
        }
    }

    /// `:P` or `:P-Q` from the port registers; `Some(None)` when there are none.
    fn ports(&mut self, min: Option<u32>, max: Option<u32>) -> (Option<Option<String>>, Vec<Loaded>) {
        let Some(min) = min else { return (Some(None), Vec::new()) };
        let low = self.take(min);
        let high = max.filter(|&max| max != min).and_then(|max| self.take(max));
        let low_port = low.as_ref().and_then(|l| data_port(&l.value));
        let shown = match (&high, low_port) {
            (_, None) => None,
            (None, Some(p)) => Some(Some(format!(":{p}"))),
            (Some(h), Some(p)) => data_port(&h.value).map(|q| Some(format!(":{p}-{q}"))),
        };
        (shown, low.into_iter().chain(high).collect())
    }

    /// `ADDR`, `ADDR:P`, `[ADDR6]:P` or `:P` from the registers of a NAT or TPROXY target.
    fn destination(
        &mut self,
        addr_min: Option<u32>,
        addr_max: Option<u32>,
        proto_min: Option<u32>,
        proto_max: Option<u32>,
    ) -> (Option<String>, Vec<Loaded>) {
        let addr = addr_min.and_then(|reg| self.take(reg));
        let mut inputs: Vec<Loaded> = addr.iter().cloned().collect();
        let ranged = addr_max.is_some_and(|max| Some(max) != addr_min);
        let (ports, port_inputs) = self.ports(proto_min, proto_max);
        inputs.extend(port_inputs);
        let address = match &addr {
            None => Some(String::new()),
            Some(Loaded { value: Value::Data(data), .. }) => match address(data) {
                Some(IpAddr::V6(a)) if proto_min.is_some() => Some(format!("[{a}]")),
                Some(a) => Some(a.to_string()),
                None => None,
            },
            Some(_) => None,
        };
        let shown = match (address, ports, ranged) {
            (Some(a), Some(p), false) if !(a.is_empty() && p.is_none()) => Some(format!("{a}{}", p.unwrap_or_default())),
            _ => None,
        };
        (shown, inputs)
    }

    /// A comparison of `lhs` with `data`, as a match term.
    fn condition(&mut self, lhs: &Value, op: u32, data: &[u8]) -> Option<String> {
        let not = op_words(op)?;
        match lhs {
            Value::Meta(key) => self.meta_condition(*key, not, op, data),
            Value::Ct(key) if *key as i32 == libc::NFT_CT_MARK => Some(format!("ct mark {not}{}", host_number(data)?)),
            Value::Payload { base, offset, len } if *base as i32 == libc::NFT_PAYLOAD_NETWORK_HEADER => {
                (data.len() == *len as usize).then_some(())?;
                self.address_condition(*offset, data, None, not)
            }
            Value::Payload { base, offset, len: 2 } if *base as i32 == libc::NFT_PAYLOAD_TRANSPORT_HEADER => {
                Some(format!("{} {not}{}", self.port_field(*offset)?, port(data)?))
            }
            Value::Masked { of, mask, xor } if xor.iter().all(|&b| b == 0) => match **of {
                Value::Payload { base, offset, len } if base as i32 == libc::NFT_PAYLOAD_NETWORK_HEADER => {
                    (data.len() == len as usize && mask.len() == data.len()).then_some(())?;
                    self.address_condition(offset, data, Some(mask), not)
                }
                Value::Ct(key) if key as i32 == libc::NFT_CT_STATE => {
                    let zero = data.iter().all(|&b| b == 0);
                    (op as i32 == libc::NFT_CMP_NEQ && zero).then_some(())?;
                    Some(format!("ct state {}", ct_states(host_number(mask)? as u32)?))
                }
                _ => None,
            },
            _ => None,
        }
    }

    fn meta_condition(&mut self, key: u32, not: &str, op: u32, data: &[u8]) -> Option<String> {
        let equal = op as i32 == libc::NFT_CMP_EQ;
        match key as i32 {
            libc::NFT_META_IIFNAME => Some(format!("iifname {not}\"{}\"", interface(data))),
            libc::NFT_META_OIFNAME => Some(format!("oifname {not}\"{}\"", interface(data))),
            libc::NFT_META_L4PROTO => {
                let [number] = data else { return None };
                if equal {
                    self.l4proto = Some(*number);
                }
                Some(format!("meta l4proto {not}{}", protocol_name(*number)))
            }
            libc::NFT_META_NFPROTO => {
                let [number] = data else { return None };
                if equal {
                    self.nfproto = Some(*number);
                    self.nfproto_term = Some(self.terms.len());
                }
                let name = match i32::from(*number) {
                    libc::NFPROTO_IPV4 => "ipv4".to_string(),
                    libc::NFPROTO_IPV6 => "ipv6".to_string(),
                    _ => number.to_string(),
                };
                Some(format!("meta nfproto {not}{name}"))
            }
            libc::NFT_META_MARK => Some(format!("meta mark {not}{}", host_number(data)?)),
            libc::NFT_META_SKUID => Some(format!("meta skuid {not}{}", host_number(data)?)),
            libc::NFT_META_SKGID => Some(format!("meta skgid {not}{}", host_number(data)?)),
            _ => None,
        }
    }

    /// `ip|ip6 saddr|daddr` and its width in bytes, for a load at `offset` of the network header.
    fn address_field(&self, offset: u32) -> Option<(&'static str, usize)> {
        let ipv4 = self.nfproto != Some(libc::NFPROTO_IPV6 as u8);
        let ipv6 = self.nfproto != Some(libc::NFPROTO_IPV4 as u8);
        Some(match offset {
            12 if ipv4 => ("ip saddr", 4),
            16 if ipv4 => ("ip daddr", 4),
            8 if ipv6 => ("ip6 saddr", 16),
            24 if ipv6 => ("ip6 daddr", 16),
            _ => return None,
        })
    }

    /// Drops nft's own `meta nfproto` check when it came right before an address match.
    fn drop_nfproto_check(&mut self) {
        if self.nfproto_term.is_some_and(|i| i + 1 == self.terms.len()) {
            self.terms.pop();
        }
    }

    /// `ip|ip6 saddr|daddr [!=] ADDR/LEN`, from a load at `offset` of the network header
    /// (`data` the loaded bytes, `mask` the prefix's mask when it does not end on a byte).
    fn address_condition(&mut self, offset: u32, data: &[u8], mask: Option<&[u8]>, not: &str) -> Option<String> {
        let (field, width) = self.address_field(offset)?;
        if data.len() > width {
            return None;
        }
        let prefix = match mask {
            Some(mask) => prefix_len(mask)?,
            None => data.len() * 8,
        };
        let mut bytes = vec![0u8; width];
        bytes[..data.len()].copy_from_slice(data);
        let addr = address(&bytes)?;
        let cidr = Cidr::new(addr, u8::try_from(prefix).ok()?)?;
        // Host bits set would make the shown prefix say something else than the rule.
        (cidr.addr() == addr).then_some(())?;
        self.drop_nfproto_check();
        Some(format!("{field} {not}{cidr}"))
    }

    fn port_field(&self, offset: u32) -> Option<String> {
        let field = match offset {
            0 => "sport",
            2 => "dport",
            _ => return None,
        };
        let proto = match self.l4proto.map(i32::from) {
            Some(libc::IPPROTO_TCP) => "tcp",
            Some(libc::IPPROTO_UDP) => "udp",
            _ => "th",
        };
        Some(format!("{proto} {field}"))
    }

    /// `lhs [!=] { a, b }` (a port in an anonymous set) or `lhs [!=] @NAME` (a port or a
    /// destination in a named set).
    fn membership(&mut self, lhs: &Value, flags: u32, set: &LookedUp) -> Option<String> {
        let Value::Payload { base, offset, len } = *lhs else { return None };
        let not = match flags as i32 {
            0 => "",
            libc::NFT_LOOKUP_F_INV => "!= ",
            _ => return None,
        };
        match (set, base as i32, len) {
            (LookedUp::Elements(elements), libc::NFT_PAYLOAD_TRANSPORT_HEADER, 2) => {
                let mut ports: Vec<u16> = elements.iter().map(|e| port(e)).collect::<Option<_>>()?;
                ports.sort_unstable();
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                Some(format!("{} {not}{{ {} }}", self.port_field(offset)?, list.join(", ")))
            }
            (LookedUp::Named(name), libc::NFT_PAYLOAD_TRANSPORT_HEADER, 2) => {
                Some(format!("{} {not}@{name}", self.port_field(offset)?))
            }
            (LookedUp::Named(name), libc::NFT_PAYLOAD_NETWORK_HEADER, _) => {
                let (field, width) = self.address_field(offset)?;
                (len as usize == width).then_some(())?;
                self.drop_nfproto_check();
                Some(format!("{field} {not}@{name}"))
            }
            _ => None,
        }
    }

    fn finish(mut self) -> String {
        let unused = std::mem::take(&mut self.regs);
        self.terms.extend(unused.into_iter().flat_map(|(_, loaded)| loaded.raw));
        self.terms.join(" ")
    }
}

fn data_port(value: &Value) -> Option<u16> {
    match value {
        Value::Data(data) => port(data),
        _ => None,
    }
}

/// `ip` or `ip6` for an `NFPROTO_*` number.
fn family_word(family: u32) -> Option<String> {
    match family as i32 {
        libc::NFPROTO_IPV4 => Some("ip".to_string()),
        libc::NFPROTO_IPV6 => Some("ip6".to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::config::{parse_cidrs, DnsCapture, InboundPorts, InterceptionMode, Interface, OutboundRanges, OwnerGroups};
    use crate::model::sets::SetElements;
    use crate::model::{build, Dialect};
    use crate::nftables::render::{plan, NftRange, Term};
    use crate::nftables::state::planned;
    use crate::settings::CaptureConfig;

    /// Istio's injected sidecar: `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*'
    /// -d 15090,15021,15020`.
    fn istio_default() -> CaptureConfig {
        CaptureConfig {
            inbound_ports: InboundPorts::All { except: vec![15090, 15021, 15020] },
            outbound_ranges: OutboundRanges::All,
            ..CaptureConfig::default()
        }
    }

    /// The same with `-m TPROXY`, dual stack and DNS capture to a server of each family.
    fn istio_tproxy() -> CaptureConfig {
        CaptureConfig {
            mode: InterceptionMode::Tproxy,
            ipv6: true,
            dns: DnsCapture::Servers {
                v4: vec![Ipv4Addr::new(10, 96, 0, 10)],
                v6: vec![Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 10)],
            },
            ..istio_default()
        }
    }

    /// Every other form a term takes: prefixes on and off byte boundaries (and /0), UDP ports,
    /// owner groups, interfaces, conntrack states, DNS capture of every query.
    fn every_other_form() -> CaptureConfig {
        CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::Only(vec![8080, 9090]),
            outbound_ranges: OutboundRanges::Only(parse_cidrs("-i", "10.0.0.0/8,fd00::/8,0.0.0.0/0").unwrap()),
            outbound_ranges_exclude: parse_cidrs("-x", "10.96.0.0/12,fd00:96::/108,192.168.1.1/32,::/0").unwrap(),
            outbound_ports_include: vec![3306],
            outbound_ports_exclude: vec![5432],
            exclude_interfaces: vec![Interface::parse("-c", "eth9").unwrap()],
            kube_virt_interfaces: vec![Interface::parse("-k", "veth-a.1").unwrap()],
            owner_groups: OwnerGroups::Only(vec![7, 4294967294]),
            dns: DnsCapture::All,
            drop_invalid: true,
            ipv6: true,
            ..CaptureConfig::default()
        }
    }

    /// Every list of [`every_other_form`] in the set form, REDIRECT: addresses and ports in
    /// named sets.
    fn set_form() -> CaptureConfig {
        let cfg = every_other_form();
        CaptureConfig {
            use_sets: true,
            mode: InterceptionMode::Redirect,
            inbound_ports: InboundPorts::All { except: vec![15090, 15021] },
            ..cfg
        }
    }

    /// Renders `cfg`, builds the batch, parses it back and decompiles every rule: each must
    /// read exactly as rendered. Returns the rendered terms, to see what was covered.
    fn assert_round_trip(cfg: &CaptureConfig) -> Vec<Term> {
        let plan = plan(&build(cfg, Dialect::Nftables));
        let read = planned(&plan);
        let mut terms = Vec::new();
        for table in &plan {
            let chains = &read[&table.table].chains;
            assert_eq!(chains.len(), table.chains.len());
            for (chain, read) in table.chains.iter().zip(chains) {
                let decompiled: Vec<String> = read.rules.iter().map(|r| r.nft()).collect();
                let rendered: Vec<String> = chain.rules.iter().map(|r| r.to_string()).collect();
                assert_eq!(decompiled, rendered, "{}", read.name);
                terms.extend(chain.rules.iter().flat_map(|r| r.terms.iter().cloned()));
            }
        }
        terms
    }

    #[test]
    fn istios_default_and_tproxy_rulesets_read_back_as_rendered() {
        assert_round_trip(&istio_default());
        assert_round_trip(&istio_tproxy());
    }

    type TermTest = &'static dyn Fn(&Term) -> bool;

    #[test]
    fn every_term_we_generate_reads_back_as_rendered() {
        let configs = [istio_default(), istio_tproxy(), every_other_form(), set_form()];
        let terms: Vec<Term> = configs.iter().flat_map(assert_round_trip).collect();
        // Each kind of term, in each of its forms, was among them.
        let seen = |wanted: &dyn Fn(&Term) -> bool| terms.iter().any(wanted);
        let forms: [(&str, TermTest); 27] = [
            ("iifname", &|t| matches!(t, Term::InInterface(_))),
            ("oifname", &|t| matches!(t, Term::OutInterface(_))),
            ("meta l4proto", &|t| matches!(t, Term::L4Proto(_))),
            ("ip6 address", &|t| matches!(t, Term::Address { cidr, .. } if !cidr.is_ipv4())),
            ("byte prefix", &|t| matches!(t, Term::Address { cidr, .. } if cidr.prefix() == 8)),
            ("bit prefix", &|t| matches!(t, Term::Address { cidr, .. } if cidr.prefix() == 12)),
            ("no prefix", &|t| matches!(t, Term::Address { cidr, .. } if cidr.prefix() == 0)),
            ("negated address", &|t| matches!(t, Term::Address { negated: true, .. })),
            ("sport", &|t| matches!(t, Term::Port { direction: super::super::render::Direction::Source, .. })),
            ("negated port", &|t| matches!(t, Term::Port { negated: true, .. })),
            ("port set", &|t| matches!(t, Term::PortNotIn { .. })),
            ("ip address set", &|t| matches!(t, Term::AddressInSet { family: crate::family::IpFamily::V4, .. })),
            ("ip6 address set", &|t| matches!(t, Term::AddressInSet { family: crate::family::IpFamily::V6, .. })),
            ("named port set", &|t| matches!(t, Term::PortInSet { proto: Some(crate::model::Protocol::Udp), .. })),
            ("ct state", &|t| matches!(t, Term::CtState(_))),
            ("meta mark", &|t| matches!(t, Term::Mark { negated: false, .. })),
            ("meta mark !=", &|t| matches!(t, Term::Mark { negated: true, .. })),
            ("ct mark", &|t| matches!(t, Term::ConnMark(_))),
            ("owner !=", &|t| matches!(t, Term::Owner { negated: true, .. })),
            ("redirect", &|t| matches!(t, Term::Redirect(_))),
            ("tproxy ip6", &|t| matches!(t, Term::Tproxy { family: crate::family::IpFamily::V6, .. })),
            ("meta mark set", &|t| matches!(t, Term::SetMark(_))),
            ("ct mark set", &|t| matches!(t, Term::SaveMark)),
            ("meta mark set ct mark", &|t| matches!(t, Term::RestoreMark)),
            ("ct zone set", &|t| matches!(t, Term::CtZone(_))),
            ("drop", &|t| matches!(t, Term::Drop)),
            ("accept", &|t| matches!(t, Term::Accept)),
        ];
        for (name, wanted) in forms {
            assert!(seen(wanted), "no {name} term was rendered");
        }
    }

    #[test]
    fn named_sets_read_back_as_nft_prints_their_elements() {
        let plan = plan(&build(&set_form(), Dialect::Nftables));
        let read = planned(&plan);
        let mut lists = Vec::new();
        for table in &plan {
            let read = &read[&table.table].sets;
            assert_eq!(read.len(), table.sets.len());
            for set in &table.sets {
                let read = read.iter().find(|r| r.name == set.list.name()).unwrap();
                let rendered: Vec<String> = match &set.elements {
                    SetElements::Ports(ports) => ports.iter().map(u16::to_string).collect(),
                    SetElements::Ranges(ranges) => ranges.iter().map(|r| NftRange(r).to_string()).collect(),
                };
                assert_eq!(read.words(), rendered, "{}", read.name);
                lists.push(set.list);
            }
        }
        assert_eq!(lists.len(), 7, "every list but the inbound ports included: {lists:?}");
        // An interval end with no interval open (nft's leading element) shows nothing; two
        // starts in a row are two intervals.
        let element = |key: [u8; 4], flags: u32| SetElement { key: key.to_vec(), flags };
        let set = SetState {
            name: "x".into(),
            key_type: 7,
            key_len: 4,
            flags: libc::NFT_SET_INTERVAL as u32,
            elements: vec![element([0; 4], 1), element([10, 0, 0, 0], 0), element([10, 0, 0, 4], 0), element([10, 0, 0, 8], 1)],
        };
        assert_eq!(set.words(), ["10.0.0.0/30", "10.0.0.4/30"]);
    }

    fn other(fields: Expr) -> ExprObject {
        ExprObject::Other { text: "(dump)".to_string(), fields: Some(fields) }
    }

    fn load_meta(key: i32) -> ExprObject {
        other(Expr::Meta { key: key as u32, dreg: Some(1), sreg: None })
    }

    fn cmp(op: i32, data: &[u8]) -> ExprObject {
        other(Expr::Cmp { sreg: 1, op: op as u32, data: data.to_vec() })
    }

    fn immediate(data: &[u8]) -> ExprObject {
        other(Expr::Immediate { dreg: 1, data: data.to_vec() })
    }

    fn verdict(code: i32, chain: Option<&str>) -> ExprObject {
        other(Expr::Verdict { code, chain: chain.map(str::to_string) })
    }

    #[test]
    fn forms_only_other_tools_write_read_in_nft_words() {
        let eth = *b"eth\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let nat = |kind: i32, family: i32| Expr::Nat {
            kind: kind as u32,
            family: family as u32,
            addr_min: Some(1),
            addr_max: None,
            proto_min: Some(2),
            proto_max: None,
            flags: 3,
        };
        let cases: Vec<(Vec<ExprObject>, &str)> = vec![
            (
                vec![load_meta(libc::NFT_META_IIFNAME), cmp(libc::NFT_CMP_NEQ, b"veth"), verdict(libc::NFT_GOTO, Some("x"))],
                "iifname != \"veth*\" goto x",
            ),
            (
                vec![load_meta(libc::NFT_META_OIFNAME), cmp(libc::NFT_CMP_EQ, &eth), verdict(libc::NFT_CONTINUE, None)],
                "oifname \"eth\" continue",
            ),
            (
                vec![
                    immediate(&[10, 0, 0, 1]),
                    other(Expr::Immediate { dreg: 2, data: 80u16.to_be_bytes().to_vec() }),
                    other(nat(libc::NFT_NAT_DNAT, libc::NFPROTO_IPV4)),
                ],
                "dnat ip to 10.0.0.1:80",
            ),
            (
                vec![
                    immediate(&Ipv6Addr::LOCALHOST.octets()),
                    other(Expr::Immediate { dreg: 2, data: 80u16.to_be_bytes().to_vec() }),
                    other(nat(libc::NFT_NAT_SNAT, libc::NFPROTO_IPV6)),
                ],
                "snat ip6 to [::1]:80",
            ),
            (vec![other(Expr::Masq { proto_min: None, proto_max: None, flags: 0 })], "masquerade"),
            (
                vec![
                    immediate(&1000u16.to_be_bytes()),
                    other(Expr::Immediate { dreg: 2, data: 2000u16.to_be_bytes().to_vec() }),
                    other(Expr::Redir { proto_min: Some(1), proto_max: Some(2), flags: 2 }),
                ],
                "redirect to :1000-2000",
            ),
            (vec![load_meta(libc::NFT_META_L4PROTO), cmp(libc::NFT_CMP_EQ, &[132])], "meta l4proto 132"),
            (
                vec![
                    load_meta(libc::NFT_META_NFPROTO),
                    cmp(libc::NFT_CMP_EQ, &[2]),
                    other(Expr::Payload { base: 1, offset: 12, len: 4, dreg: 1 }),
                    cmp(libc::NFT_CMP_EQ, &[1, 2, 3, 4]),
                ],
                "ip saddr 1.2.3.4/32",
            ),
            (
                vec![load_meta(libc::NFT_META_NFPROTO), cmp(libc::NFT_CMP_EQ, &[10]), ExprObject::Counter],
                "meta nfproto ipv6 counter",
            ),
            (
                vec![other(Expr::Payload { base: 2, offset: 2, len: 2, dreg: 1 }), cmp(libc::NFT_CMP_GT, &1024u16.to_be_bytes())],
                "th dport > 1024",
            ),
        ];
        for (exprs, expected) in cases {
            assert_eq!(decompile(&exprs, &[]), expected);
        }
    }

    #[test]
    fn what_cannot_be_decompiled_shows_as_libnftnl_dumps_it() {
        let unknown = ExprObject::Other { text: "fib daddr type => reg 1".into(), fields: None };
        assert_eq!(decompile(&[unknown, ExprObject::Counter], &[]), "[ fib daddr type => reg 1 ] counter");
        // A load compared in a way no rule of ours compares it keeps its own dump too.
        let load = ExprObject::Other {
            text: "payload load 1b @ network header + 9 => reg 1".into(),
            fields: Some(Expr::Payload { base: 1, offset: 9, len: 1, dreg: 1 }),
        };
        let compare = ExprObject::Other {
            text: "cmp eq reg 1 0x00000006".into(),
            fields: Some(Expr::Cmp { sreg: 1, op: 0, data: vec![6] }),
        };
        assert_eq!(
            decompile(&[load.clone(), compare, verdict(libc::NF_DROP, None)], &[]),
            "[ payload load 1b @ network header + 9 => reg 1 ] [ cmp eq reg 1 0x00000006 ] drop"
        );
        // A load nothing uses, and a port set that was not found.
        assert_eq!(decompile(std::slice::from_ref(&load), &[]), "[ payload load 1b @ network header + 9 => reg 1 ]");
        let lookup = ExprObject::Lookup { set: super::super::raw::SetRef::Id(1), flags: 1, sreg: 1 };
        let port = other(Expr::Payload { base: 2, offset: 2, len: 2, dreg: 1 });
        assert_eq!(decompile(&[port, lookup], &[None]), "[ (dump) ] [ lookup reg 1 flags 0x1 ]");
    }
}
