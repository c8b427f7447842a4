//! From the backend-neutral [`Ruleset`] to nft rules: which table and chain each rule lands
//! in, and its terms in the order Istio's nftables tool writes them.
//!
//! The order matters beyond looks: nft compiles a rule left to right, so the same conditions
//! written in another order are different bytecode. Istio's nft rules list their conditions
//! in an order of their own (interface, protocol, address, conntrack state, ports, marks,
//! owner), except the DNS rules, which were written separately: the nat DNS redirects name
//! the server first (`ip daddr S tcp dport 53`) and the raw-table conntrack-zone rules name
//! the port first (`udp dport 53 ip daddr S`). A term list is the single source for both the script text
//! ([`std::fmt::Display`]) and the netlink expressions (`expr.rs`).

use std::fmt::{self, Write};

use super::schema::{base_chain, chain_name, chain_rank, table_name, BaseChain, TABLE_ORDER};
use crate::config::Cidr;
use crate::family::IpFamily;
use crate::model::sets::{AddrRange, Set, SetElements, SetList};
use crate::model::{Action, Chain, CtState, Match, OwnerKind, Protocol, Rule, Ruleset, Table};

/// One of our tables with its named sets (set form) and its chains in creation order; only
/// chains that hold rules exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TablePlan {
    pub table: Table,
    pub sets: Vec<Set>,
    pub chains: Vec<ChainPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainPlan {
    pub chain: Chain,
    pub base: Option<BaseChain>,
    /// Rules in their final order (Istio's inserts already replayed).
    pub rules: Vec<NftRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NftRule {
    pub terms: Vec<Term>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Source,
    Destination,
}

/// One word group of an nft rule: a condition, a statement or the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Term {
    InInterface(String),
    OutInterface(String),
    L4Proto(Protocol),
    Address {
        direction: Direction,
        cidr: Cidr,
        negated: bool,
    },
    /// `proto` is `None` only when the rule names no protocol (then `th`, any transport).
    Port {
        proto: Option<Protocol>,
        direction: Direction,
        port: u16,
        negated: bool,
    },
    PortNotIn {
        proto: Option<Protocol>,
        ports: Vec<u16>,
    },
    /// `ip|ip6 daddr @NAME`: the destination is in a named set of this table.
    AddressInSet {
        family: IpFamily,
        list: SetList,
    },
    /// `tcp|udp dport @NAME`
    PortInSet {
        proto: Option<Protocol>,
        list: SetList,
    },
    CtState(CtState),
    Mark {
        mark: u32,
        negated: bool,
    },
    ConnMark(u32),
    Owner {
        kind: OwnerKind,
        id: u32,
        negated: bool,
    },
    Counter,
    Redirect(u16),
    Tproxy {
        family: IpFamily,
        port: u16,
    },
    SetMark(u32),
    /// `ct mark set meta mark`
    SaveMark,
    /// `meta mark set ct mark`
    RestoreMark,
    CtZone(u16),
    Return,
    Accept,
    Drop,
    Jump(Chain),
}

/// Our tables, in Istio's order, each with the chains that have rules.
pub(super) fn plan(ruleset: &Ruleset) -> Vec<TablePlan> {
    let chains = ruleset.chains(|_| true);
    TABLE_ORDER
        .into_iter()
        .filter_map(|table| {
            // `chains` holds only chains that have rules: the others are never created.
            let mut in_table: Vec<_> = chains.iter().filter(|c| c.table == table).collect();
            if in_table.is_empty() {
                return None;
            }
            in_table.sort_by_key(|c| chain_rank(table, c.chain));
            let chains = in_table
                .into_iter()
                .map(|c| ChainPlan {
                    chain: c.chain,
                    base: base_chain(table, c.chain),
                    rules: c.rules.iter().map(|r| nft_rule(r)).collect(),
                })
                .collect();
            let sets = ruleset.sets.iter().filter(|s| s.table == table).cloned().collect();
            Some(TablePlan { table, sets, chains })
        })
        .collect()
}

/// Which of Istio's condition orders a rule follows (see the module docs).
#[derive(Clone, Copy)]
enum Style {
    Main,
    DnsRedirect,
    DnsZone,
}

impl Style {
    fn of(rule: &Rule) -> Style {
        match (rule.table, rule.chain) {
            (Table::Raw, _) => Style::DnsZone,
            (Table::Nat, Chain::OutputDns) => Style::DnsRedirect,
            _ => Style::Main,
        }
    }

    /// Position of a condition in this style; conditions of equal rank keep the model's order.
    fn rank(self, term: &Term) -> u8 {
        let kind = match term {
            Term::InInterface(_) | Term::OutInterface(_) => 0,
            Term::L4Proto(_) => 1,
            Term::Address { .. } | Term::AddressInSet { .. } => 2,
            Term::CtState(_) => 3,
            Term::Port { .. } | Term::PortNotIn { .. } | Term::PortInSet { .. } => 4,
            Term::Mark { .. } | Term::ConnMark(_) => 5,
            _ => 6,
        };
        match (self, kind) {
            (Style::Main, k) => k,
            (Style::DnsRedirect, 2) => 0,
            (Style::DnsZone, 2) => 5,
            (_, k) => k,
        }
    }
}

fn nft_rule(rule: &Rule) -> NftRule {
    let proto = rule.matches.iter().find_map(|m| match m {
        Match::Protocol(p) => Some(*p),
        _ => None,
    });
    let style = Style::of(rule);
    let mut terms: Vec<Term> = rule.matches.iter().map(|m| condition(m, proto)).collect();
    terms.sort_by_key(|t| style.rank(t));
    // The TPROXY rule's address says which stack it serves (`tproxy ip` or `tproxy ip6`).
    let family = rule.address_family().unwrap_or(IpFamily::V4);
    terms.extend(statements(&rule.action, family));
    NftRule { terms }
}

fn condition(m: &Match, proto: Option<Protocol>) -> Term {
    match m {
        Match::InInterface(name) => Term::InInterface(name.clone()),
        Match::OutInterface(name) => Term::OutInterface(name.clone()),
        Match::Protocol(p) => Term::L4Proto(*p),
        Match::Source(cidr) => Term::Address { direction: Direction::Source, cidr: *cidr, negated: false },
        Match::Destination { cidr, negated } => {
            Term::Address { direction: Direction::Destination, cidr: *cidr, negated: *negated }
        }
        Match::DestPort { port, negated } => {
            Term::Port { proto, direction: Direction::Destination, port: *port, negated: *negated }
        }
        Match::SourcePort(port) => Term::Port { proto, direction: Direction::Source, port: *port, negated: false },
        Match::DestPortNotIn(ports) => Term::PortNotIn { proto, ports: ports.clone() },
        Match::DestinationInSet(list) => {
            Term::AddressInSet { family: list.family().expect("an address list has a family"), list: *list }
        }
        Match::DestPortInSet(list) => Term::PortInSet { proto, list: *list },
        Match::Owner { kind, id, negated } => Term::Owner { kind: *kind, id: *id, negated: *negated },
        Match::Mark { mark, negated } => Term::Mark { mark: *mark, negated: *negated },
        Match::ConnMark(mark) => Term::ConnMark(*mark),
        Match::CtState(state) => Term::CtState(*state),
    }
}

/// The counter goes right before the verdict, or before the one statement a rule has; the
/// TPROXY rule carries its mark and verdict itself (`tproxy ... meta mark set M counter accept`).
fn statements(action: &Action, family: IpFamily) -> Vec<Term> {
    let last = match action {
        Action::Jump(chain) => Term::Jump(*chain),
        Action::Return => Term::Return,
        Action::Accept => Term::Accept,
        Action::Drop => Term::Drop,
        Action::Redirect(port) => Term::Redirect(*port),
        Action::Tproxy { port, mark } => {
            return vec![Term::Tproxy { family, port: *port }, Term::SetMark(*mark), Term::Counter, Term::Accept]
        }
        Action::SetMark(mark) => Term::SetMark(*mark),
        Action::SaveMark => Term::SaveMark,
        Action::RestoreMark => Term::RestoreMark,
        Action::CtZone(zone) => Term::CtZone(*zone),
    };
    vec![Term::Counter, last]
}

fn proto_name(proto: Option<Protocol>) -> &'static str {
    match proto {
        Some(Protocol::Tcp) => "tcp",
        Some(Protocol::Udp) => "udp",
        None => "th",
    }
}

/// How nft names the family: `ip` or `ip6`.
pub(super) fn nft_family(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn not(negated: bool) -> &'static str {
    if negated {
        "!= "
    } else {
        ""
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Quoted: nft would read some legal interface names as keywords or numbers.
            Term::InInterface(name) => write!(f, "iifname \"{name}\""),
            Term::OutInterface(name) => write!(f, "oifname \"{name}\""),
            Term::L4Proto(p) => write!(f, "meta l4proto {}", proto_name(Some(*p))),
            Term::Address { direction, cidr, negated } => {
                let family = nft_family(IpFamily::of(cidr.addr()));
                let field = match direction {
                    Direction::Source => "saddr",
                    Direction::Destination => "daddr",
                };
                write!(f, "{family} {field} {}{cidr}", not(*negated))
            }
            Term::Port { proto, direction, port, negated } => {
                let field = match direction {
                    Direction::Source => "sport",
                    Direction::Destination => "dport",
                };
                write!(f, "{} {field} {}{port}", proto_name(*proto), not(*negated))
            }
            Term::PortNotIn { proto, ports } => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                write!(f, "{} dport != {{ {} }}", proto_name(*proto), list.join(", "))
            }
            Term::AddressInSet { family, list } => write!(f, "{} daddr @{}", nft_family(*family), list.name()),
            Term::PortInSet { proto, list } => write!(f, "{} dport @{}", proto_name(*proto), list.name()),
            Term::CtState(CtState::Invalid) => f.write_str("ct state invalid"),
            Term::CtState(CtState::RelatedEstablished) => f.write_str("ct state related,established"),
            Term::Mark { mark, negated } => write!(f, "meta mark {}{mark}", not(*negated)),
            Term::ConnMark(mark) => write!(f, "ct mark {mark}"),
            Term::Owner { kind, id, negated } => {
                let key = match kind {
                    OwnerKind::Uid => "skuid",
                    OwnerKind::Gid => "skgid",
                };
                write!(f, "meta {key} {}{id}", not(*negated))
            }
            Term::Counter => f.write_str("counter"),
            Term::Redirect(port) => write!(f, "redirect to :{port}"),
            Term::Tproxy { family, port } => write!(f, "tproxy {} to :{port}", nft_family(*family)),
            Term::SetMark(mark) => write!(f, "meta mark set {mark}"),
            Term::SaveMark => f.write_str("ct mark set meta mark"),
            Term::RestoreMark => f.write_str("meta mark set ct mark"),
            Term::CtZone(zone) => write!(f, "ct zone set {zone}"),
            Term::Return => f.write_str("return"),
            Term::Accept => f.write_str("accept"),
            Term::Drop => f.write_str("drop"),
            Term::Jump(chain) => write!(f, "jump {}", chain_name(*chain)),
        }
    }
}

impl fmt::Display for NftRule {
    /// Written term by term into the one output (the script of every run is rendered for the log).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            fmt::Display::fmt(term, f)?;
        }
        Ok(())
    }
}

/// `add chain inet T C [{ type .. hook .. priority N ; }]`
pub(super) fn add_chain_line(table: Table, chain: &ChainPlan) -> String {
    let mut line = String::new();
    let _ = write_chain_line(&mut line, table, chain);
    line
}

fn write_chain_line(out: &mut impl fmt::Write, table: Table, chain: &ChainPlan) -> fmt::Result {
    write!(out, "add chain inet {} {}", table_name(table), chain_name(chain.chain))?;
    match chain.base {
        Some(base) => {
            write!(out, " {{ type {} hook {} priority {} ; }}", base.kind.name(), base.hook.name(), base.priority)
        }
        None => Ok(()),
    }
}

/// `add rule inet T C ...`
pub(super) fn add_rule_line(table: Table, chain: Chain, rule: &NftRule) -> String {
    let mut line = String::new();
    let _ = write_rule_line(&mut line, table, chain, rule);
    line
}

fn write_rule_line(out: &mut impl fmt::Write, table: Table, chain: Chain, rule: &NftRule) -> fmt::Result {
    write!(out, "add rule inet {} {} {rule}", table_name(table), chain_name(chain))
}

/// A named set's type and flags in nft's words: addresses are interval sets (a range or a
/// prefix is one element), ports a plain set.
pub(super) fn set_type(list: SetList) -> &'static str {
    match list.family() {
        Some(IpFamily::V4) => "type ipv4_addr; flags interval;",
        Some(IpFamily::V6) => "type ipv6_addr; flags interval;",
        None => "type inet_service;",
    }
}

/// `add set inet T NAME { type ..; flags ..; }`
pub(super) fn add_set_line(table: Table, set: &Set) -> String {
    format!("add set inet {} {} {{ {} }}", table_name(table), set.list.name(), set_type(set.list))
}

/// `add element inet T NAME { a, b, .. }`, the elements written as nft prints them.
fn write_element_line(out: &mut impl fmt::Write, table: Table, set: &Set) -> fmt::Result {
    write!(out, "add element inet {} {} {{ ", table_name(table), set.list.name())?;
    match &set.elements {
        SetElements::Ports(ports) => write_list(out, ports.iter()),
        SetElements::Ranges(ranges) => write_list(out, ranges.iter().map(NftRange)),
    }?;
    out.write_str(" }")
}

fn write_list<T: fmt::Display>(out: &mut impl fmt::Write, items: impl Iterator<Item = T>) -> fmt::Result {
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.write_str(", ")?;
        }
        write!(out, "{item}")?;
    }
    Ok(())
}

/// An address range as nft prints a set element: `A` for one address, `A/N` for a prefix,
/// `A-B` for any other range.
pub(super) struct NftRange<'r>(pub &'r AddrRange);

impl fmt::Display for NftRange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let AddrRange { first, last } = *self.0;
        let number = |addr: std::net::IpAddr| match addr {
            std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
            std::net::IpAddr::V6(a) => u128::from(a),
        };
        let (low, high) = (number(first), number(last));
        let width = if first.is_ipv4() { 32 } else { 128 };
        // The range is one prefix when its size is a power of two and `first` is aligned to it
        // (the whole space included, whose size overflows).
        let host_bits =
            (high - low).checked_add(1).map_or(128, |size| if size.is_power_of_two() { size.trailing_zeros() } else { 129 });
        if first == last {
            write!(f, "{first}")
        } else if host_bits <= width && low.trailing_zeros() >= host_bits {
            write!(f, "{first}/{}", width - host_bits)
        } else {
            write!(f, "{first}-{last}")
        }
    }
}

/// The script of a fresh install: the same tables, sets, chains and rules, in the same order,
/// as the netlink batch `apply` sends to a namespace holding nothing of ours.
pub(super) fn script(plan: &[TablePlan]) -> String {
    let mut out = String::with_capacity(8192);
    for table in plan {
        let _ = writeln!(out, "add table inet {}", table_name(table.table));
        for set in &table.sets {
            out += &add_set_line(table.table, set);
            out.push('\n');
            let _ = write_element_line(&mut out, table.table, set);
            out.push('\n');
        }
        for chain in &table.chains {
            let _ = write_chain_line(&mut out, table.table, chain);
            out.push('\n');
        }
        for chain in &table.chains {
            for rule in &chain.rules {
                let _ = write_rule_line(&mut out, table.table, chain.chain, rule);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::{parse_cidrs, DnsCapture, InboundPorts, InterceptionMode, OutboundRanges};
    use crate::model::{build, Dialect};
    use crate::settings::CaptureConfig;

    fn script_of(cfg: &CaptureConfig) -> String {
        script(&plan(&build(cfg, Dialect::Nftables)))
    }

    #[test]
    fn base_config_is_one_nat_table_with_only_the_chains_that_have_rules() {
        let n = "add rule inet istio-proxy-nat";
        let expected = format!(
            "add table inet istio-proxy-nat
add chain inet istio-proxy-nat output {{ type nat hook output priority -100 ; }}
add chain inet istio-proxy-nat istio-inbound
add chain inet istio-proxy-nat istio-redirect
add chain inet istio-proxy-nat istio-in-redirect
add chain inet istio-proxy-nat istio-output
{n} output counter jump istio-output
{n} istio-inbound meta l4proto tcp tcp dport 15008 counter return
{n} istio-redirect meta l4proto tcp counter redirect to :15001
{n} istio-in-redirect meta l4proto tcp counter redirect to :15006
{n} istio-output oifname \"lo\" ip saddr 127.0.0.6/32 counter return
{n} istio-output oifname \"lo\" meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 meta skuid 1337 counter jump istio-in-redirect
{n} istio-output oifname \"lo\" meta skuid != 1337 counter return
{n} istio-output meta skuid 1337 counter return
{n} istio-output oifname \"lo\" meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 meta skgid 1337 counter jump istio-in-redirect
{n} istio-output oifname \"lo\" meta skgid != 1337 counter return
{n} istio-output meta skgid 1337 counter return
{n} istio-output ip daddr 127.0.0.1/32 counter return
"
        );
        assert_eq!(script_of(&CaptureConfig::default()), expected);
    }

    #[test]
    fn dns_rules_keep_istios_own_condition_orders() {
        let cfg = CaptureConfig {
            dns: DnsCapture::Servers { v4: vec![Ipv4Addr::new(10, 96, 0, 10)], v6: vec![] },
            ..CaptureConfig::default()
        };
        let text = script_of(&cfg);
        // nat: the server first, then the port (with the port set in the proxy's lo rule).
        assert!(
            text.contains("istio-output-dns ip daddr 10.96.0.10/32 meta l4proto tcp tcp dport 53 counter redirect to :15053\n")
        );
        assert!(text.contains("tcp dport != { 53, 15008 } meta skuid 1337 counter jump istio-in-redirect\n"));
        // raw: the port first, then the server.
        assert!(text.contains("istio-output-dns meta l4proto udp udp dport 53 ip daddr 10.96.0.10/32 counter ct zone set 2\n"));
        assert!(text.contains("istio-inbound meta l4proto udp udp sport 53 ip saddr 10.96.0.10/32 counter ct zone set 1\n"));
        assert!(text.contains("add chain inet istio-proxy-raw prerouting { type filter hook prerouting priority -300 ; }\n"));
    }

    #[test]
    fn tproxy_rules_carry_mark_and_verdict_and_the_mark_return_comes_first() {
        let cfg = CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::All { except: vec![] },
            ipv6: true,
            outbound_ranges: OutboundRanges::Only(parse_cidrs("-i", "10.0.0.0/12").unwrap()),
            ..CaptureConfig::default()
        };
        let text = script_of(&cfg);
        let m = "add rule inet istio-proxy-mangle";
        assert!(text.contains(&format!(
            "{m} istio-tproxy meta l4proto tcp ip6 daddr != ::1/128 tproxy ip6 to :15006 meta mark set 1337 counter accept\n"
        )));
        assert!(text.contains("add chain inet istio-proxy-mangle output { type route hook output priority -150 ; }\n"));
        let first_output_rule = text.lines().find(|l| l.starts_with("add rule inet istio-proxy-nat istio-output "));
        assert_eq!(first_output_rule, Some("add rule inet istio-proxy-nat istio-output meta mark 1337 counter return"));
        // Inserts are replayed: the mark return heads mangle istio-inbound, IPv6 before IPv4.
        let inbound: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{m} istio-inbound "))).collect();
        assert_eq!(inbound[0], format!("{m} istio-inbound meta l4proto tcp meta mark 1337 counter return"));
        assert!(inbound[1].contains("ip6 saddr ::6/128"), "{inbound:?}");
    }

    #[test]
    fn the_set_form_declares_and_fills_each_set_before_the_chains() {
        let cfg = CaptureConfig {
            use_sets: true,
            outbound_ranges: OutboundRanges::All,
            outbound_ranges_exclude: parse_cidrs("-x", "10.96.0.0/12,1.2.3.4/30,1.2.3.8/31,192.168.1.1/32,fd00::/8").unwrap(),
            outbound_ports_exclude: vec![5432, 53],
            ..CaptureConfig::default()
        };
        let text = script_of(&cfg);
        let head: Vec<&str> = text.lines().take(6).collect();
        assert_eq!(
            head,
            [
                "add table inet istio-proxy-nat",
                "add set inet istio-proxy-nat istio-out-ports-exclude { type inet_service; }",
                "add element inet istio-proxy-nat istio-out-ports-exclude { 53, 5432 }",
                "add set inet istio-proxy-nat istio-out-cidrs-exclude-v4 { type ipv4_addr; flags interval; }",
                "add element inet istio-proxy-nat istio-out-cidrs-exclude-v4 { 1.2.3.4-1.2.3.9, 10.96.0.0/12, 192.168.1.1 }",
                "add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }",
            ]
        );
        // IPv6 is not programmed: no set of that family.
        assert!(!text.contains("-v6"), "{text}");
        let n = "add rule inet istio-proxy-nat istio-output";
        for rule in [
            format!("{n} meta l4proto tcp tcp dport @istio-out-ports-exclude counter return"),
            format!("{n} meta l4proto udp udp dport @istio-out-ports-exclude counter return"),
            format!("{n} ip daddr @istio-out-cidrs-exclude-v4 counter return"),
        ] {
            assert!(text.contains(&format!("{rule}\n")), "{rule} missing from:\n{text}");
        }
    }

    #[test]
    fn ranges_print_as_nft_prints_set_elements() {
        let shown = |first: &str, last: &str| {
            NftRange(&AddrRange { first: first.parse().unwrap(), last: last.parse().unwrap() }).to_string()
        };
        assert_eq!(shown("10.0.0.1", "10.0.0.1"), "10.0.0.1");
        assert_eq!(shown("10.0.0.0", "10.0.1.255"), "10.0.0.0/23");
        assert_eq!(shown("10.0.0.1", "10.0.0.2"), "10.0.0.1-10.0.0.2");
        assert_eq!(shown("10.0.0.0", "10.0.2.255"), "10.0.0.0-10.0.2.255");
        assert_eq!(shown("0.0.0.0", "255.255.255.255"), "0.0.0.0/0");
        assert_eq!(shown("240.0.0.0", "255.255.255.255"), "240.0.0.0/4");
        assert_eq!(shown("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), "::/0");
        assert_eq!(shown("::1", "::1"), "::1");
        assert_eq!(shown("fd00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), "fd00::/8");
        assert_eq!(shown("fd00::1", "fd00::2"), "fd00::1-fd00::2");
    }
}
