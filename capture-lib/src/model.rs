//! The capture algorithm, in one place.
//!
//! [`build`] turns a [`CaptureConfig`] into a backend-neutral [`Ruleset`]: the ordered list of
//! rules Istio's tool emits, each with its table, chain, IP family and position. Nothing here
//! knows iptables syntax or netlink; the backends render what this module decides.
//!
//! The step numbers in comments follow `shared/reference/istio-capture-behaviour.md` §2.3.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{
    Cidr, DnsCapture, InboundPorts, InterceptionMode, OutboundRanges, OwnerGroups, DNS_CAPTURE_PORT, INBOUND_PASSTHROUGH_V4,
    INBOUND_PASSTHROUGH_V6, OUTBOUND_MARK,
};
use crate::family::IpFamily;
use crate::settings::CaptureConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];
}

/// Every chain the capture uses. The first two are the kernel's hooks; the rest are ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    Prerouting,
    Output,
    Inbound,
    Redirect,
    InRedirect,
    IstioOutput,
    OutputDns,
    Divert,
    Tproxy,
    Drop,
}

impl Chain {
    /// The chains this tool owns (creates, flushes and deletes).
    pub const OWNED: [Chain; 8] = [
        Chain::Inbound,
        Chain::Redirect,
        Chain::InRedirect,
        Chain::IstioOutput,
        Chain::OutputDns,
        Chain::Divert,
        Chain::Tproxy,
        Chain::Drop,
    ];

    pub fn is_hook(self) -> bool {
        matches!(self, Chain::Prerouting | Chain::Output)
    }
}

/// Where a rule goes in its chain, as Istio's tool places it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    Append,
    /// Insert before the rule at this 0-based index (iptables `-I chain index+1`).
    Insert(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerKind {
    Uid,
    Gid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtState {
    Invalid,
    /// RELATED,ESTABLISHED
    RelatedEstablished,
}

/// One condition of a rule. `negated` means "does not match".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    InInterface(String),
    OutInterface(String),
    Protocol(Protocol),
    Source(Cidr),
    Destination {
        cidr: Cidr,
        negated: bool,
    },
    /// Layer-4 destination port (the protocol comes from [`Match::Protocol`]).
    DestPort {
        port: u16,
        negated: bool,
    },
    SourcePort(u16),
    /// Destination port is none of these.
    DestPortNotIn(Vec<u16>),
    Owner {
        kind: OwnerKind,
        id: u32,
        negated: bool,
    },
    Mark {
        mark: u32,
        negated: bool,
    },
    ConnMark(u32),
    CtState(CtState),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Jump(Chain),
    Return,
    Accept,
    Drop,
    Redirect(u16),
    /// TPROXY to `port` on the local host, setting `mark`; the family picks the stack.
    Tproxy {
        port: u16,
        mark: u32,
    },
    SetMark(u32),
    /// Copy the packet mark to the connection (CONNMARK --save-mark).
    SaveMark,
    /// Copy the connection mark to the packet (CONNMARK --restore-mark).
    RestoreMark,
    CtZone(u16),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub table: Table,
    pub chain: Chain,
    /// The IP family the rule is for; `None`: both (only IPv4 when IPv6 is not programmed).
    pub family: Option<IpFamily>,
    pub position: Position,
    pub matches: Vec<Match>,
    pub action: Action,
}

impl Rule {
    /// The family this rule's addresses pin it to, if any.
    pub fn address_family(&self) -> Option<IpFamily> {
        self.matches.iter().find_map(|m| match m {
            Match::Source(c) | Match::Destination { cidr: c, .. } => Some(IpFamily::of(c.addr())),
            _ => None,
        })
    }
}

/// Istio's two tools differ in a few rules; each backend asks for the dialect it renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Iptables,
    Nftables,
}

/// The rules, in the order Istio's tool emits them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    /// Whether IPv6 rules are programmed at all.
    pub ipv6: bool,
}

/// The rules of one chain after every append and insert has been applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRules<'a> {
    pub table: Table,
    pub chain: Chain,
    pub rules: Vec<&'a Rule>,
}

impl Ruleset {
    /// Replays the emitted rules that `keep` accepts into final chain contents, in order of
    /// first use of each chain. An insert past the end appends, as both backends do.
    pub fn chains<'a>(&'a self, keep: impl Fn(&Rule) -> bool) -> Vec<ChainRules<'a>> {
        let mut out: Vec<ChainRules<'a>> = Vec::new();
        for rule in self.rules.iter().filter(|r| keep(r)) {
            let idx = match out.iter().position(|c| c.table == rule.table && c.chain == rule.chain) {
                Some(i) => i,
                None => {
                    out.push(ChainRules { table: rule.table, chain: rule.chain, rules: Vec::new() });
                    out.len() - 1
                }
            };
            let rules = &mut out[idx].rules;
            match rule.position {
                Position::Append => rules.push(rule),
                Position::Insert(i) => rules.insert(i.min(rules.len()), rule),
            }
        }
        out
    }

    /// Final chain contents of one IP family's ruleset (what ip(6)tables holds).
    pub fn family_chains(&self, family: IpFamily) -> Vec<ChainRules<'_>> {
        self.chains(|r| r.family.is_none_or(|f| f == family))
    }
}

/// Builds the ruleset for `cfg`: Istio's algorithm, step by step.
pub fn build(cfg: &CaptureConfig, dialect: Dialect) -> Ruleset {
    Builder { cfg, dialect, rules: Vec::new() }.run()
}

struct Builder<'a> {
    cfg: &'a CaptureConfig,
    dialect: Dialect,
    rules: Vec<Rule>,
}

/// The loopback destination that counts as "local" in each family.
fn loopback(cfg: &CaptureConfig, family: IpFamily) -> Cidr {
    match family {
        IpFamily::V4 => cfg.host_ipv4_loopback,
        IpFamily::V6 => Cidr::host(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    }
}

fn passthrough_source(family: IpFamily) -> Cidr {
    Cidr::host(match family {
        IpFamily::V4 => IpAddr::V4(INBOUND_PASSTHROUGH_V4),
        IpFamily::V6 => IpAddr::V6(INBOUND_PASSTHROUGH_V6),
    })
}

fn tcp() -> Match {
    Match::Protocol(Protocol::Tcp)
}

fn udp() -> Match {
    Match::Protocol(Protocol::Udp)
}

fn dport(port: u16) -> Match {
    Match::DestPort { port, negated: false }
}

fn dst(cidr: Cidr) -> Match {
    Match::Destination { cidr, negated: false }
}

fn not_dst(cidr: Cidr) -> Match {
    Match::Destination { cidr, negated: true }
}

fn owner(kind: OwnerKind, id: u32) -> Match {
    Match::Owner { kind, id, negated: false }
}

fn mark(mark: u32) -> Match {
    Match::Mark { mark, negated: false }
}

fn iif(name: &str) -> Match {
    Match::InInterface(name.to_string())
}

fn oif(name: &str) -> Match {
    Match::OutInterface(name.to_string())
}

impl Builder<'_> {
    fn push(
        &mut self,
        table: Table,
        chain: Chain,
        family: Option<IpFamily>,
        position: Position,
        matches: Vec<Match>,
        action: Action,
    ) {
        self.rules.push(Rule { table, chain, family, position, matches, action });
    }

    fn append(&mut self, table: Table, chain: Chain, matches: Vec<Match>, action: Action) {
        self.push(table, chain, None, Position::Append, matches, action);
    }

    fn insert(&mut self, table: Table, chain: Chain, index: usize, matches: Vec<Match>, action: Action) {
        self.push(table, chain, None, Position::Insert(index), matches, action);
    }

    /// A rule that exists once per family, built by `make(family)`: IPv4 first, then IPv6.
    fn per_family(&mut self, table: Table, chain: Chain, position: Position, make: impl Fn(IpFamily) -> (Vec<Match>, Action)) {
        let (m, a) = make(IpFamily::V4);
        self.push(table, chain, Some(IpFamily::V4), position, m, a);
        if self.cfg.ipv6 {
            let (m, a) = make(IpFamily::V6);
            self.push(table, chain, Some(IpFamily::V6), position, m, a);
        }
    }

    /// A rule for a single family (IPv6 ones only when IPv6 is programmed).
    fn for_family(&mut self, table: Table, chain: Chain, family: IpFamily, matches: Vec<Match>, action: Action) {
        if family == IpFamily::V6 && !self.cfg.ipv6 {
            return;
        }
        self.push(table, chain, Some(family), Position::Append, matches, action);
    }

    /// A rule needed in IPv4 when `v4`, in IPv6 when `v6` (nftables emits it once).
    fn when_families(&mut self, table: Table, chain: Chain, v4: bool, v6: bool, matches: Vec<Match>, action: Action) {
        let v6 = v6 && self.cfg.ipv6;
        let family = match (v4, v6) {
            (true, true) => None,
            (true, false) => Some(IpFamily::V4),
            (false, true) => Some(IpFamily::V6),
            (false, false) => return,
        };
        self.push(table, chain, family, Position::Append, matches, action);
    }

    fn run(mut self) -> Ruleset {
        let cfg = self.cfg;
        let tproxy = cfg.mode == InterceptionMode::Tproxy;
        let dns = self.effective_dns();

        // 1. Excluded interfaces: never captured, either way (and in mangle too for TPROXY).
        let exclude_tables: &[Table] = if tproxy { &[Table::Nat, Table::Mangle] } else { &[Table::Nat] };
        for &table in exclude_tables {
            for nic in &cfg.exclude_interfaces {
                self.append(table, Chain::Prerouting, vec![iif(nic.as_str())], Action::Return);
                self.append(table, Chain::Output, vec![oif(nic.as_str())], Action::Return);
            }
        }

        // 2. KubeVirt interfaces: their inbound traffic is not inbound capture.
        for nic in &cfg.kube_virt_interfaces {
            self.insert(Table::Nat, Chain::Prerouting, 0, vec![iif(nic.as_str())], Action::Return);
        }

        // 3. Drop conntrack-INVALID packets (Istio's nftables variant matches TCP only).
        if cfg.drop_invalid {
            let mut m = Vec::new();
            if self.dialect == Dialect::Nftables {
                m.push(tcp());
            }
            m.push(Match::CtState(CtState::Invalid));
            self.append(Table::Mangle, Chain::Prerouting, m, Action::Jump(Chain::Drop));
            self.append(Table::Mangle, Chain::Drop, vec![], Action::Drop);
        }

        // 4. The tunnel port is never captured inbound.
        self.append(Table::Nat, Chain::Inbound, vec![tcp(), dport(cfg.inbound_tunnel_port)], Action::Return);

        // 5. The two redirect targets.
        self.append(Table::Nat, Chain::Redirect, vec![tcp()], Action::Redirect(cfg.proxy_port));
        self.append(Table::Nat, Chain::InRedirect, vec![tcp()], Action::Redirect(cfg.inbound_capture_port));

        // 6. Inbound capture.
        self.inbound(tproxy);

        // 7. All outbound traffic goes through ISTIO_OUTPUT.
        self.append(Table::Nat, Chain::Output, vec![], Action::Jump(Chain::IstioOutput));

        // Our one deviation (DEVIATIONS.md): the proxy's source-preserving inbound connections
        // carry the TPROXY mark and must not be captured again on their way to the app.
        if tproxy {
            self.append(Table::Nat, Chain::IstioOutput, vec![mark(cfg.tproxy_mark)], Action::Return);
        }

        // 8. Outbound ports never captured, TCP and UDP.
        for &port in &cfg.outbound_ports_exclude {
            self.append(Table::Nat, Chain::IstioOutput, vec![tcp(), dport(port)], Action::Return);
            self.append(Table::Nat, Chain::IstioOutput, vec![udp(), dport(port)], Action::Return);
        }

        // 9. Inbound passthrough: the proxy dials the app from 127.0.0.6 / ::6.
        self.per_family(Table::Nat, Chain::IstioOutput, Position::Append, |family| {
            (vec![oif("lo"), Match::Source(passthrough_source(family))], Action::Return)
        });

        // 10, 11. The proxy's own traffic, by UID then by GID.
        let dns_on = dns != DnsCapture::Off;
        let loopback_included = matches!(&cfg.outbound_ranges, OutboundRanges::Only(c) if c.iter().any(Cidr::is_loopback));
        for (kind, ids) in [(OwnerKind::Uid, &cfg.proxy_uids), (OwnerKind::Gid, &cfg.proxy_gids)] {
            for &id in ids {
                self.proxy_owner(kind, id, dns_on && kind == OwnerKind::Uid, dns_on, loopback_included);
            }
        }

        // 12. Owner groups.
        match &cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for &gid in groups {
                    self.append(Table::Nat, Chain::IstioOutput, vec![owner(OwnerKind::Gid, gid)], Action::Return);
                }
            }
            OwnerGroups::Only(groups) => {
                let m = groups.iter().map(|&id| Match::Owner { kind: OwnerKind::Gid, id, negated: true }).collect();
                self.append(Table::Nat, Chain::IstioOutput, m, Action::Return);
            }
        }

        // 13. DNS capture.
        self.dns(&dns);

        // 14. Local traffic stays local.
        self.per_family(Table::Nat, Chain::IstioOutput, Position::Append, |family| {
            (vec![dst(loopback(cfg, family))], Action::Return)
        });

        // 15. Excluded destinations.
        for &cidr in &cfg.outbound_ranges_exclude {
            self.for_family(Table::Nat, Chain::IstioOutput, IpFamily::of(cidr.addr()), vec![dst(cidr)], Action::Return);
        }

        // 16. Ports always captured.
        for &port in &cfg.outbound_ports_include {
            self.append(Table::Nat, Chain::IstioOutput, vec![tcp(), dport(port)], Action::Jump(Chain::Redirect));
        }

        // 17. Captured destinations.
        self.outbound_ranges();

        // 18. TPROXY bookkeeping in mangle.
        if tproxy {
            self.tproxy_tail();
        }

        Ruleset { rules: self.rules, ipv6: cfg.ipv6 }
    }

    /// DNS capture is on only when there is something to capture.
    fn effective_dns(&self) -> DnsCapture {
        match &self.cfg.dns {
            DnsCapture::Servers { v4, v6 } if v4.is_empty() && v6.is_empty() => DnsCapture::Off,
            other => other.clone(),
        }
    }

    fn inbound(&mut self, tproxy: bool) {
        let cfg = self.cfg;
        if cfg.inbound_ports == InboundPorts::None {
            return;
        }
        let table = if tproxy { Table::Mangle } else { Table::Nat };
        if tproxy {
            self.append(Table::Mangle, Chain::Divert, vec![], Action::SetMark(cfg.tproxy_mark));
            self.append(Table::Mangle, Chain::Divert, vec![], Action::Accept);
            let (port, mark) = (cfg.inbound_capture_port, cfg.tproxy_mark);
            self.per_family(Table::Mangle, Chain::Tproxy, Position::Append, |family| {
                (vec![not_dst(loopback(cfg, family)), tcp()], Action::Tproxy { port, mark })
            });
        }
        self.append(table, Chain::Prerouting, vec![tcp()], Action::Jump(Chain::Inbound));

        let capture = |port: Option<u16>| -> Vec<(Vec<Match>, Action)> {
            let base = |extra: Option<Match>| {
                let mut m = vec![tcp()];
                m.extend(port.map(dport));
                m.extend(extra);
                m
            };
            if tproxy {
                vec![
                    (base(Some(Match::CtState(CtState::RelatedEstablished))), Action::Jump(Chain::Divert)),
                    (base(None), Action::Jump(Chain::Tproxy)),
                ]
            } else {
                vec![(base(None), Action::Jump(Chain::InRedirect))]
            }
        };
        let rules: Vec<(Vec<Match>, Action)> = match &cfg.inbound_ports {
            InboundPorts::None => Vec::new(),
            InboundPorts::All { except } => {
                for &port in except {
                    self.append(table, Chain::Inbound, vec![tcp(), dport(port)], Action::Return);
                }
                capture(None)
            }
            InboundPorts::Only(ports) => ports.iter().flat_map(|&p| capture(Some(p))).collect(),
        };
        for (m, a) in rules {
            self.append(table, Chain::Inbound, m, a);
        }
    }

    /// Steps 10 and 11 for one proxy UID or GID.
    fn proxy_owner(&mut self, kind: OwnerKind, id: u32, dns_ports: bool, dns_on: bool, loopback_included: bool) {
        let cfg = self.cfg;
        let tunnel = cfg.inbound_tunnel_port;
        // (a) app -> VIP -> proxy -> proxy inbound -> app: the proxy's own calls to the pod over lo.
        self.per_family(Table::Nat, Chain::IstioOutput, Position::Append, |family| {
            let ports =
                if dns_ports { Match::DestPortNotIn(vec![53, tunnel]) } else { Match::DestPort { port: tunnel, negated: true } };
            (vec![oif("lo"), not_dst(loopback(cfg, family)), tcp(), ports, owner(kind, id)], Action::Jump(Chain::InRedirect))
        });
        // (b) app -> app over lo is not captured, unless loopback was explicitly included.
        if !loopback_included {
            let mut m = vec![oif("lo")];
            if dns_on {
                m.extend([tcp(), Match::DestPort { port: 53, negated: true }]);
            }
            m.push(Match::Owner { kind, id, negated: true });
            self.append(Table::Nat, Chain::IstioOutput, m, Action::Return);
        }
        // (c) Everything else the proxy sends goes out as is.
        self.append(Table::Nat, Chain::IstioOutput, vec![owner(kind, id)], Action::Return);
    }

    fn dns(&mut self, dns: &DnsCapture) {
        let cfg = self.cfg;
        let (all, v4, v6): (bool, &[Ipv4Addr], &[Ipv6Addr]) = match dns {
            DnsCapture::Off => return,
            DnsCapture::All => (true, &[], &[]),
            DnsCapture::Servers { v4, v6 } => (false, v4, v6),
        };
        let host4 = |s: &Ipv4Addr| Cidr::host(IpAddr::V4(*s));
        let host6 = |s: &Ipv6Addr| Cidr::host(IpAddr::V6(*s));

        self.append(Table::Raw, Chain::Output, vec![], Action::Jump(Chain::OutputDns));
        let (has4, has6) = (all || !v4.is_empty(), all || !v6.is_empty());
        self.when_families(Table::Nat, Chain::IstioOutput, has4, has6, vec![], Action::Jump(Chain::OutputDns));

        for proto in [Protocol::Tcp, Protocol::Udp] {
            let p = Match::Protocol(proto);
            let redirect = Action::Redirect(DNS_CAPTURE_PORT);
            if all {
                self.append(Table::Nat, Chain::OutputDns, vec![p, dport(53)], redirect);
                continue;
            }
            for s in v4 {
                self.for_family(
                    Table::Nat,
                    Chain::OutputDns,
                    IpFamily::V4,
                    vec![p.clone(), dport(53), dst(host4(s))],
                    redirect.clone(),
                );
            }
            for s in v6 {
                self.for_family(
                    Table::Nat,
                    Chain::OutputDns,
                    IpFamily::V6,
                    vec![p.clone(), dport(53), dst(host6(s))],
                    redirect.clone(),
                );
            }
        }

        // Conntrack zones keep the proxy's upstream queries (zone 1) apart from the app's (zone 2).
        for (kind, ids) in [(OwnerKind::Uid, &cfg.proxy_uids), (OwnerKind::Gid, &cfg.proxy_gids)] {
            for &id in ids {
                self.append(Table::Raw, Chain::OutputDns, vec![udp(), dport(53), owner(kind, id)], Action::CtZone(1));
                self.append(
                    Table::Raw,
                    Chain::OutputDns,
                    vec![udp(), Match::SourcePort(DNS_CAPTURE_PORT), owner(kind, id)],
                    Action::CtZone(2),
                );
            }
        }
        self.when_families(Table::Raw, Chain::Prerouting, has4, has6, vec![], Action::Jump(Chain::Inbound));
        if all {
            self.append(Table::Raw, Chain::OutputDns, vec![udp(), dport(53)], Action::CtZone(2));
            self.append(Table::Raw, Chain::Inbound, vec![udp(), Match::SourcePort(53)], Action::CtZone(1));
            return;
        }
        let servers = v4.iter().map(host4).chain(v6.iter().map(host6));
        for server in servers {
            let family = IpFamily::of(server.addr());
            self.for_family(Table::Raw, Chain::OutputDns, family, vec![udp(), dport(53), dst(server)], Action::CtZone(2));
            self.for_family(
                Table::Raw,
                Chain::Inbound,
                family,
                vec![udp(), Match::SourcePort(53), Match::Source(server)],
                Action::CtZone(1),
            );
        }
    }

    fn outbound_ranges(&mut self) {
        let cfg = self.cfg;
        match &cfg.outbound_ranges {
            OutboundRanges::None => {}
            OutboundRanges::All => {
                self.append(Table::Nat, Chain::IstioOutput, vec![], Action::Jump(Chain::Redirect));
                for nic in &cfg.kube_virt_interfaces {
                    self.insert(Table::Nat, Chain::Prerouting, 0, vec![iif(nic.as_str())], Action::Jump(Chain::Redirect));
                }
            }
            OutboundRanges::Only(cidrs) => {
                // IPv4 ranges first, then IPv6, each in the order given.
                let ordered = cidrs.iter().filter(|c| c.is_ipv4()).chain(cidrs.iter().filter(|c| !c.is_ipv4()));
                for &cidr in ordered {
                    let family = IpFamily::of(cidr.addr());
                    if family == IpFamily::V6 && !cfg.ipv6 {
                        continue;
                    }
                    for nic in &cfg.kube_virt_interfaces {
                        self.push(
                            Table::Nat,
                            Chain::Prerouting,
                            Some(family),
                            Position::Insert(0),
                            vec![iif(nic.as_str()), dst(cidr)],
                            Action::Jump(Chain::Redirect),
                        );
                    }
                    self.for_family(Table::Nat, Chain::IstioOutput, family, vec![dst(cidr)], Action::Jump(Chain::Redirect));
                }
            }
        }
    }

    fn tproxy_tail(&mut self) {
        let cfg = self.cfg;
        let tmark = cfg.tproxy_mark;
        self.append(Table::Mangle, Chain::Prerouting, vec![tcp(), mark(tmark)], Action::SaveMark);
        self.append(Table::Mangle, Chain::Output, vec![tcp(), oif("lo"), mark(tmark)], Action::Return);
        for (kind, ids) in [(OwnerKind::Uid, &cfg.proxy_uids), (OwnerKind::Gid, &cfg.proxy_gids)] {
            for &id in ids {
                self.per_family(Table::Mangle, Chain::Output, Position::Append, |family| {
                    (vec![not_dst(loopback(cfg, family)), tcp(), oif("lo"), owner(kind, id)], Action::SetMark(OUTBOUND_MARK))
                });
            }
        }
        self.append(Table::Mangle, Chain::Output, vec![tcp(), Match::ConnMark(tmark)], Action::RestoreMark);
        self.insert(Table::Mangle, Chain::Inbound, 0, vec![tcp(), mark(tmark)], Action::Return);
        self.per_family(Table::Mangle, Chain::Inbound, Position::Insert(1), |family| {
            (vec![tcp(), Match::Source(passthrough_source(family)), iif("lo")], Action::Return)
        });
        self.insert(
            Table::Mangle,
            Chain::Inbound,
            2,
            vec![tcp(), iif("lo"), Match::Mark { mark: OUTBOUND_MARK, negated: true }],
            Action::Return,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_cidrs, Interface};

    fn count(rs: &Ruleset, table: Table, chain: Chain) -> usize {
        rs.rules.iter().filter(|r| r.table == table && r.chain == chain).count()
    }

    #[test]
    fn base_config_has_the_four_nat_chains_and_no_ipv6() {
        let rs = build(&CaptureConfig::default(), Dialect::Iptables);
        let chains: Vec<_> = rs.family_chains(IpFamily::V4).iter().map(|c| (c.table, c.chain)).collect();
        assert_eq!(
            chains,
            vec![
                (Table::Nat, Chain::Inbound),
                (Table::Nat, Chain::Redirect),
                (Table::Nat, Chain::InRedirect),
                (Table::Nat, Chain::Output),
                (Table::Nat, Chain::IstioOutput),
            ]
        );
        assert!(rs.rules.iter().all(|r| r.family != Some(IpFamily::V6)));
        // passthrough, uid (a,b,c), gid (a,b,c), loopback
        assert_eq!(count(&rs, Table::Nat, Chain::IstioOutput), 8);
    }

    #[test]
    fn kube_virt_inserts_land_on_top_in_reverse() {
        let cfg = CaptureConfig {
            kube_virt_interfaces: vec![Interface::parse("-k", "eth1").unwrap(), Interface::parse("-k", "eth2").unwrap()],
            outbound_ranges: OutboundRanges::All,
            ..CaptureConfig::default()
        };
        let rs = build(&cfg, Dialect::Iptables);
        let chains = rs.family_chains(IpFamily::V4);
        let pre = chains.iter().find(|c| c.chain == Chain::Prerouting).unwrap();
        let summary: Vec<_> = pre.rules.iter().map(|r| (r.matches[0].clone(), r.action.clone())).collect();
        assert_eq!(
            summary,
            vec![
                (iif("eth2"), Action::Jump(Chain::Redirect)),
                (iif("eth1"), Action::Jump(Chain::Redirect)),
                (iif("eth2"), Action::Return),
                (iif("eth1"), Action::Return),
            ]
        );
    }

    #[test]
    fn tproxy_adds_mangle_chains_and_the_mark_return() {
        let cfg = CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::All { except: vec![] },
            ipv6: true,
            ..CaptureConfig::default()
        };
        let rs = build(&cfg, Dialect::Iptables);
        let v6 = rs.family_chains(IpFamily::V6);
        let inbound = v6.iter().find(|c| c.table == Table::Mangle && c.chain == Chain::Inbound).unwrap();
        assert_eq!(inbound.rules.len(), 5);
        assert_eq!(inbound.rules[1].matches[1], Match::Source(passthrough_source(IpFamily::V6)));
        let out = v6.iter().find(|c| c.chain == Chain::IstioOutput).unwrap();
        assert_eq!(out.rules[0].matches, vec![mark(1337)]);
        assert!(count(&rs, Table::Nat, Chain::Inbound) == 1, "inbound capture lives in mangle");
    }

    #[test]
    fn dns_with_servers_only_where_servers_exist() {
        let cfg = CaptureConfig {
            dns: DnsCapture::Servers { v4: vec![Ipv4Addr::new(10, 0, 0, 10)], v6: vec![] },
            ipv6: true,
            ..CaptureConfig::default()
        };
        let rs = build(&cfg, Dialect::Iptables);
        let jump = rs.rules.iter().find(|r| r.chain == Chain::IstioOutput && r.action == Action::Jump(Chain::OutputDns)).unwrap();
        assert_eq!(jump.family, Some(IpFamily::V4));
        assert!(rs.family_chains(IpFamily::V6).iter().all(|c| c.chain != Chain::OutputDns || c.table == Table::Raw));
        let no_servers = CaptureConfig { dns: DnsCapture::Servers { v4: vec![], v6: vec![] }, ..cfg };
        assert!(build(&no_servers, Dialect::Iptables).rules.iter().all(|r| r.table != Table::Raw));
    }

    #[test]
    fn loopback_include_drops_the_lo_returns() {
        let cfg = CaptureConfig {
            outbound_ranges: OutboundRanges::Only(parse_cidrs("-i", "127.1.2.3/32").unwrap()),
            ..CaptureConfig::default()
        };
        let rs = build(&cfg, Dialect::Iptables);
        assert!(!rs.rules.iter().any(|r| r.matches.iter().any(|m| matches!(m, Match::Owner { negated: true, .. }))));
    }

    #[test]
    fn ipv6_ranges_are_dropped_without_ipv6() {
        let cfg = CaptureConfig {
            outbound_ranges: OutboundRanges::Only(parse_cidrs("-i", "fd00::/8,10.0.0.0/8").unwrap()),
            outbound_ranges_exclude: parse_cidrs("-x", "fd00:1::/32").unwrap(),
            ..CaptureConfig::default()
        };
        let rs = build(&cfg, Dialect::Iptables);
        assert!(rs.rules.iter().all(|r| r.address_family() != Some(IpFamily::V6)));
    }

    #[test]
    fn nft_drop_invalid_is_tcp_only() {
        let cfg = CaptureConfig { drop_invalid: true, ..CaptureConfig::default() };
        let ipt = build(&cfg, Dialect::Iptables);
        let nft = build(&cfg, Dialect::Nftables);
        let find = |rs: &Ruleset| rs.rules.iter().find(|r| r.action == Action::Jump(Chain::Drop)).unwrap().matches.clone();
        assert_eq!(find(&ipt), vec![Match::CtState(CtState::Invalid)]);
        assert_eq!(find(&nft), vec![tcp(), Match::CtState(CtState::Invalid)]);
    }
}
