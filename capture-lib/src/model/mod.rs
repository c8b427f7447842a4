//! The capture algorithm, in one place.
//!
//! [`build`] turns a [`CaptureConfig`] into a backend-neutral [`Ruleset`]: the ordered list of
//! rules Istio's tool emits, each with its table, chain, IP family and position. Nothing here
//! knows iptables syntax or netlink; the backends render what this module decides.
//!
//! The step numbers in comments follow `shared/reference/istio-capture-behaviour.md` §2.3.
//! With `--use-ip-sets`, the lists are matched through sets ([`sets`]): same decisions.

pub mod sets;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{
    Cidr, DnsCapture, InboundPorts, InterceptionMode, OutboundRanges, OwnerGroups, DNS_CAPTURE_PORT, INBOUND_PASSTHROUGH_V4,
    INBOUND_PASSTHROUGH_V6, OUTBOUND_MARK,
};
use crate::family::IpFamily;
use crate::settings::CaptureConfig;
use sets::{Set, SetList};

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
    /// Destination address is in the set of this list (set form).
    DestinationInSet(SetList),
    /// Layer-4 destination port is in the set of this list (set form).
    DestPortInSet(SetList),
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
            Match::DestinationInSet(list) => list.family(),
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

/// The rules, in the order Istio's tool emits them, and the sets they match (set form only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    /// The set form's sets, each non-empty and used by at least one rule, in order of first use.
    pub sets: Vec<Set>,
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

/// Builds the ruleset for `cfg`: Istio's algorithm, one step after another, in the order
/// Istio's tool emits the rules (`capture/run.go`, `Run`; reference §2.3 numbers the steps).
pub fn build(cfg: &CaptureConfig, dialect: Dialect) -> Ruleset {
    let mut emit = Emitter::new(cfg, dialect);
    emit.exclude_interfaces(); // 1
    emit.kube_virt_interfaces(); // 2
    if cfg.drop_invalid {
        emit.drop_invalid(); // 3
    }
    emit.tunnel_port_return(); // 4
    emit.redirect_targets(); // 5
    if cfg.inbound_ports != InboundPorts::None {
        emit.inbound_capture(); // 6
    }
    emit.outbound_jump(); // 7
    if emit.tproxy() {
        emit.tproxy_mark_return(); // our one deviation
    }
    emit.outbound_ports_exclude(); // 8
    emit.inbound_passthrough_return(); // 9
    emit.proxy_traffic(); // 10, 11
    emit.owner_groups(); // 12
    if emit.dns != Dns::Off {
        emit.dns_capture(); // 13
    }
    emit.loopback_return(); // 14
    emit.outbound_ranges_exclude(); // 15
    emit.outbound_ports_include(); // 16
    emit.outbound_ranges_include(); // 17
    if emit.tproxy() {
        emit.tproxy_bookkeeping(); // 18
    }
    emit.finish()
}

/// DNS capture as it takes effect: off when there is nothing to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dns<'c> {
    Off,
    /// Every query on port 53.
    All,
    /// Queries to these servers.
    Servers(&'c [Ipv4Addr], &'c [Ipv6Addr]),
}

impl<'c> Dns<'c> {
    fn of(cfg: &'c CaptureConfig) -> Dns<'c> {
        match &cfg.dns {
            DnsCapture::Off => Dns::Off,
            DnsCapture::All => Dns::All,
            DnsCapture::Servers { v4, v6 } if v4.is_empty() && v6.is_empty() => Dns::Off,
            DnsCapture::Servers { v4, v6 } => Dns::Servers(v4, v6),
        }
    }

    /// The servers as host prefixes, IPv4 first.
    fn servers(self) -> Vec<Cidr> {
        let Dns::Servers(v4, v6) = self else { return Vec::new() };
        let v4 = v4.iter().map(|&s| Cidr::host(IpAddr::V4(s)));
        v4.chain(v6.iter().map(|&s| Cidr::host(IpAddr::V6(s)))).collect()
    }
}

/// The rules of one run, as the steps emit them.
struct Emitter<'a> {
    cfg: &'a CaptureConfig,
    dialect: Dialect,
    dns: Dns<'a>,
    rules: Vec<Rule>,
    sets: Vec<Set>,
}

/// A rule being written: its place (by default appended, for both families), then its
/// conditions in Istio's order, then its action ([`Draft::then`]).
#[derive(Debug, Clone)]
struct Draft {
    table: Table,
    chain: Chain,
    family: Option<IpFamily>,
    position: Position,
    matches: Vec<Match>,
}

fn nat(chain: Chain) -> Draft {
    Draft::new(Table::Nat, chain)
}

fn mangle(chain: Chain) -> Draft {
    Draft::new(Table::Mangle, chain)
}

fn raw(chain: Chain) -> Draft {
    Draft::new(Table::Raw, chain)
}

impl Draft {
    fn new(table: Table, chain: Chain) -> Draft {
        Draft { table, chain, family: None, position: Position::Append, matches: Vec::new() }
    }

    /// Inserted before the rule at this 0-based index (Istio's `-I chain index+1`).
    fn inserted_at(self, index: usize) -> Draft {
        Draft { position: Position::Insert(index), ..self }
    }

    /// For `family` only (`None`: both).
    fn family(self, family: Option<IpFamily>) -> Draft {
        Draft { family, ..self }
    }

    /// For the family of `cidr` only.
    fn family_of(self, cidr: Cidr) -> Draft {
        self.family(Some(IpFamily::of(cidr.addr())))
    }

    fn with(mut self, condition: Match) -> Draft {
        self.matches.push(condition);
        self
    }

    fn protocol(self, protocol: Protocol) -> Draft {
        self.with(Match::Protocol(protocol))
    }

    fn tcp(self) -> Draft {
        self.protocol(Protocol::Tcp)
    }

    fn udp(self) -> Draft {
        self.protocol(Protocol::Udp)
    }

    fn dport(self, port: u16) -> Draft {
        self.with(Match::DestPort { port, negated: false })
    }

    fn not_dport(self, port: u16) -> Draft {
        self.with(Match::DestPort { port, negated: true })
    }

    fn sport(self, port: u16) -> Draft {
        self.with(Match::SourcePort(port))
    }

    fn src(self, cidr: Cidr) -> Draft {
        self.with(Match::Source(cidr))
    }

    fn dst(self, cidr: Cidr) -> Draft {
        self.with(Match::Destination { cidr, negated: false })
    }

    fn not_dst(self, cidr: Cidr) -> Draft {
        self.with(Match::Destination { cidr, negated: true })
    }

    fn iif(self, name: &str) -> Draft {
        self.with(Match::InInterface(name.to_string()))
    }

    fn oif(self, name: &str) -> Draft {
        self.with(Match::OutInterface(name.to_string()))
    }

    fn owner(self, (kind, id): (OwnerKind, u32)) -> Draft {
        self.with(Match::Owner { kind, id, negated: false })
    }

    fn not_owner(self, (kind, id): (OwnerKind, u32)) -> Draft {
        self.with(Match::Owner { kind, id, negated: true })
    }

    fn mark(self, mark: u32) -> Draft {
        self.with(Match::Mark { mark, negated: false })
    }

    fn not_mark(self, mark: u32) -> Draft {
        self.with(Match::Mark { mark, negated: true })
    }

    fn then(self, action: Action) -> Rule {
        let Draft { table, chain, family, position, matches } = self;
        Rule { table, chain, family, position, matches, action }
    }
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

/// The proxy's owners: each UID, then each GID.
fn proxy_owners(cfg: &CaptureConfig) -> impl Iterator<Item = (OwnerKind, u32)> + '_ {
    let uids = cfg.proxy_uids.iter().map(|&id| (OwnerKind::Uid, id));
    uids.chain(cfg.proxy_gids.iter().map(|&id| (OwnerKind::Gid, id)))
}

impl<'a> Emitter<'a> {
    fn new(cfg: &'a CaptureConfig, dialect: Dialect) -> Self {
        Emitter { cfg, dialect, dns: Dns::of(cfg), rules: Vec::new(), sets: Vec::new() }
    }

    fn finish(self) -> Ruleset {
        Ruleset { rules: self.rules, sets: self.sets, ipv6: self.cfg.ipv6 }
    }

    /// Set form: the condition "destination port in `ports`", its set kept for `table`.
    /// `None` in the rule form and for an empty list: the caller writes a rule per port.
    fn port_set(&mut self, list: SetList, table: Table, ports: &[u16]) -> Option<Match> {
        if !self.cfg.use_sets || ports.is_empty() {
            return None;
        }
        self.sets.push(Set::ports(list, table, ports));
        Some(Match::DestPortInSet(list))
    }

    /// Set form: for each family programmed with entries in `cidrs`, that family and the
    /// condition "destination in its set" (kept for nat, where every range rule lives).
    /// `None` in the rule form: the caller writes a rule per range.
    fn range_sets(&mut self, list: fn(IpFamily) -> SetList, cidrs: &[Cidr]) -> Option<Vec<(IpFamily, Match)>> {
        if !self.cfg.use_sets {
            return None;
        }
        let families = IpFamily::ALL.into_iter().filter(|&f| f == IpFamily::V4 || self.cfg.ipv6);
        let sets: Vec<Set> = families.map(|f| Set::ranges(list(f), Table::Nat, cidrs)).filter(|s| !s.is_empty()).collect();
        let conditions = sets.iter().map(|s| (s.list.family().expect("an address list"), Match::DestinationInSet(s.list)));
        let conditions = conditions.collect();
        self.sets.extend(sets);
        Some(conditions)
    }

    fn tproxy(&self) -> bool {
        self.cfg.mode == InterceptionMode::Tproxy
    }

    /// Adds `rule`; an IPv6-only rule only when IPv6 is programmed.
    fn add(&mut self, rule: Rule) {
        if rule.family != Some(IpFamily::V6) || self.cfg.ipv6 {
            self.rules.push(rule);
        }
    }

    /// A rule that exists once per family, made by `make(family)`: IPv4 first, then IPv6.
    fn per_family(&mut self, make: impl Fn(IpFamily) -> Rule) {
        for family in IpFamily::ALL {
            self.add(Rule { family: Some(family), ..make(family) });
        }
    }

    /// The family of a rule needed in IPv4 when `v4` and in IPv6 when `v6` (Istio's
    /// nftables tool emits it once, `Some(None)`); `None` when needed in neither.
    fn family_where(&self, v4: bool, v6: bool) -> Option<Option<IpFamily>> {
        match (v4, v6 && self.cfg.ipv6) {
            (true, true) => Some(None),
            (true, false) => Some(Some(IpFamily::V4)),
            (false, true) => Some(Some(IpFamily::V6)),
            (false, false) => None,
        }
    }

    /// Step 1: Excluded interfaces are never captured, either way: in nat, and with TPROXY in mangle too.
    fn exclude_interfaces(&mut self) {
        let tables: &[Table] = if self.tproxy() { &[Table::Nat, Table::Mangle] } else { &[Table::Nat] };
        for &table in tables {
            for nic in &self.cfg.exclude_interfaces {
                self.add(Draft::new(table, Chain::Prerouting).iif(nic.as_str()).then(Action::Return));
                self.add(Draft::new(table, Chain::Output).oif(nic.as_str()).then(Action::Return));
            }
        }
    }

    /// Step 2: KubeVirt interfaces: their inbound traffic is not inbound capture.
    fn kube_virt_interfaces(&mut self) {
        for nic in &self.cfg.kube_virt_interfaces {
            self.add(nat(Chain::Prerouting).inserted_at(0).iif(nic.as_str()).then(Action::Return));
        }
    }

    /// Step 3: Packets conntrack finds INVALID are dropped (Istio's nftables tool: TCP ones only).
    fn drop_invalid(&mut self) {
        let rule = mangle(Chain::Prerouting);
        let rule = if self.dialect == Dialect::Nftables { rule.tcp() } else { rule };
        self.add(rule.with(Match::CtState(CtState::Invalid)).then(Action::Jump(Chain::Drop)));
        self.add(mangle(Chain::Drop).then(Action::Drop));
    }

    /// Step 4: The tunnel port is never captured inbound.
    fn tunnel_port_return(&mut self) {
        self.add(nat(Chain::Inbound).tcp().dport(self.cfg.inbound_tunnel_port).then(Action::Return));
    }

    /// Step 5: The two redirect targets: the proxy's outbound and inbound ports.
    fn redirect_targets(&mut self) {
        self.add(nat(Chain::Redirect).tcp().then(Action::Redirect(self.cfg.proxy_port)));
        self.add(nat(Chain::InRedirect).tcp().then(Action::Redirect(self.cfg.inbound_capture_port)));
    }

    /// Step 6: Inbound capture: REDIRECT in nat, or TPROXY in mangle; every port but the excluded
    /// ones, or only the listed ones.
    fn inbound_capture(&mut self) {
        let table = if self.tproxy() { Table::Mangle } else { Table::Nat };
        if self.tproxy() {
            self.tproxy_targets();
        }
        self.add(Draft::new(table, Chain::Prerouting).tcp().then(Action::Jump(Chain::Inbound)));
        match &self.cfg.inbound_ports {
            InboundPorts::None => {}
            InboundPorts::All { except } => {
                if let Some(excluded) = self.port_set(SetList::InboundPortsExclude, table, except) {
                    self.add(Draft::new(table, Chain::Inbound).tcp().with(excluded).then(Action::Return));
                } else {
                    for &port in except {
                        self.add(Draft::new(table, Chain::Inbound).tcp().dport(port).then(Action::Return));
                    }
                }
                self.capture_inbound(Draft::new(table, Chain::Inbound).tcp());
            }
            InboundPorts::Only(ports) => {
                if let Some(included) = self.port_set(SetList::InboundPortsInclude, table, ports) {
                    self.capture_inbound(Draft::new(table, Chain::Inbound).tcp().with(included));
                } else {
                    for &port in ports {
                        self.capture_inbound(Draft::new(table, Chain::Inbound).tcp().dport(port));
                    }
                }
            }
        }
    }

    /// TPROXY's chains: ISTIO_DIVERT marks and accepts packets of connections the proxy
    /// already holds; ISTIO_TPROXY hands the others to it.
    fn tproxy_targets(&mut self) {
        let (port, mark, cfg) = (self.cfg.inbound_capture_port, self.cfg.tproxy_mark, self.cfg);
        self.add(mangle(Chain::Divert).then(Action::SetMark(mark)));
        self.add(mangle(Chain::Divert).then(Action::Accept));
        self.per_family(|family| mangle(Chain::Tproxy).not_dst(loopback(cfg, family)).tcp().then(Action::Tproxy { port, mark }));
    }

    /// The inbound traffic `inbound` matches goes to the proxy.
    fn capture_inbound(&mut self, inbound: Draft) {
        if self.tproxy() {
            let established = inbound.clone().with(Match::CtState(CtState::RelatedEstablished));
            self.add(established.then(Action::Jump(Chain::Divert)));
            self.add(inbound.then(Action::Jump(Chain::Tproxy)));
        } else {
            self.add(inbound.then(Action::Jump(Chain::InRedirect)));
        }
    }

    /// Step 7: All outbound traffic goes through ISTIO_OUTPUT.
    fn outbound_jump(&mut self) {
        self.add(nat(Chain::Output).then(Action::Jump(Chain::IstioOutput)));
    }

    /// Our one deviation (DEVIATIONS.md): the proxy's source-preserving inbound connections
    /// carry the TPROXY mark and must not be captured again on their way to the app.
    fn tproxy_mark_return(&mut self) {
        self.add(nat(Chain::IstioOutput).mark(self.cfg.tproxy_mark).then(Action::Return));
    }

    /// Step 8: Outbound ports never captured, TCP and UDP.
    fn outbound_ports_exclude(&mut self) {
        if let Some(excluded) = self.port_set(SetList::OutboundPortsExclude, Table::Nat, &self.cfg.outbound_ports_exclude) {
            self.add(nat(Chain::IstioOutput).tcp().with(excluded.clone()).then(Action::Return));
            self.add(nat(Chain::IstioOutput).udp().with(excluded).then(Action::Return));
            return;
        }
        for &port in &self.cfg.outbound_ports_exclude {
            self.add(nat(Chain::IstioOutput).tcp().dport(port).then(Action::Return));
            self.add(nat(Chain::IstioOutput).udp().dport(port).then(Action::Return));
        }
    }

    /// Step 9: Inbound passthrough: the proxy dials the app from 127.0.0.6 / ::6.
    fn inbound_passthrough_return(&mut self) {
        self.per_family(|family| nat(Chain::IstioOutput).oif("lo").src(passthrough_source(family)).then(Action::Return));
    }

    /// Steps 10 and 11: The proxy's own traffic, for each proxy UID, then each GID.
    fn proxy_traffic(&mut self) {
        for owner in proxy_owners(self.cfg) {
            self.proxy_calls_to_the_pod(owner);
            if !self.loopback_captured() {
                self.app_to_itself_return(owner);
            }
            // (c) Everything else the proxy sends goes out as it is.
            self.add(nat(Chain::IstioOutput).owner(owner).then(Action::Return));
        }
    }

    /// (a) app → VIP → proxy → proxy inbound → app: the proxy's calls to the pod over lo go
    /// to the inbound capture, but for the tunnel port; with DNS capture, a UID's rule spares
    /// port 53 too (Istio's GID rule does not).
    fn proxy_calls_to_the_pod(&mut self, owner: (OwnerKind, u32)) {
        let (cfg, tunnel) = (self.cfg, self.cfg.inbound_tunnel_port);
        let spares_dns = self.dns != Dns::Off && owner.0 == OwnerKind::Uid;
        self.per_family(|family| {
            let rule = nat(Chain::IstioOutput).oif("lo").not_dst(loopback(cfg, family)).tcp();
            let rule = if spares_dns { rule.with(Match::DestPortNotIn(vec![53, tunnel])) } else { rule.not_dport(tunnel) };
            rule.owner(owner).then(Action::Jump(Chain::InRedirect))
        });
    }

    /// Whether the include ranges name a loopback address explicitly.
    fn loopback_captured(&self) -> bool {
        matches!(&self.cfg.outbound_ranges, OutboundRanges::Only(c) if c.iter().any(Cidr::is_loopback))
    }

    /// (b) app → app over lo is not captured (with DNS capture, TCP to port 53 still is).
    fn app_to_itself_return(&mut self, owner: (OwnerKind, u32)) {
        let rule = nat(Chain::IstioOutput).oif("lo");
        let rule = if self.dns != Dns::Off { rule.tcp().not_dport(53) } else { rule };
        self.add(rule.not_owner(owner).then(Action::Return));
    }

    /// Step 12: Owner groups: every group but the excluded ones is captured, or only the listed ones.
    fn owner_groups(&mut self) {
        match &self.cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for &gid in groups {
                    self.add(nat(Chain::IstioOutput).owner((OwnerKind::Gid, gid)).then(Action::Return));
                }
            }
            OwnerGroups::Only(groups) => {
                let rule = groups.iter().fold(nat(Chain::IstioOutput), |rule, &gid| rule.not_owner((OwnerKind::Gid, gid)));
                self.add(rule.then(Action::Return));
            }
        }
    }

    /// Step 13: DNS capture (Istio's `SetupDNSRedir`): the jumps, the redirects to the agent, and
    /// the conntrack zones.
    fn dns_capture(&mut self) {
        self.dns_jumps();
        self.dns_redirects();
        self.dns_conntrack_zones();
    }

    /// The families DNS is captured in: those with servers, or both for every query.
    fn dns_families(&self) -> Option<Option<IpFamily>> {
        match self.dns {
            Dns::Off => None,
            Dns::All => self.family_where(true, true),
            Dns::Servers(v4, v6) => self.family_where(!v4.is_empty(), !v6.is_empty()),
        }
    }

    fn dns_jumps(&mut self) {
        self.add(raw(Chain::Output).then(Action::Jump(Chain::OutputDns)));
        if let Some(family) = self.dns_families() {
            self.add(nat(Chain::IstioOutput).family(family).then(Action::Jump(Chain::OutputDns)));
        }
    }

    /// TCP, then UDP: every query, or those to each server.
    fn dns_redirects(&mut self) {
        let to_agent = Action::Redirect(DNS_CAPTURE_PORT);
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let query = nat(Chain::OutputDns).protocol(protocol).dport(53);
            if self.dns == Dns::All {
                self.add(query.then(to_agent.clone()));
                continue;
            }
            for server in self.dns.servers() {
                self.add(query.clone().family_of(server).dst(server).then(to_agent.clone()));
            }
        }
    }

    /// The proxy's upstream queries (zone 1) are kept apart from the app's (zone 2).
    fn dns_conntrack_zones(&mut self) {
        for owner in proxy_owners(self.cfg) {
            self.add(raw(Chain::OutputDns).udp().dport(53).owner(owner).then(Action::CtZone(1)));
            self.add(raw(Chain::OutputDns).udp().sport(DNS_CAPTURE_PORT).owner(owner).then(Action::CtZone(2)));
        }
        if let Some(family) = self.dns_families() {
            self.add(raw(Chain::Prerouting).family(family).then(Action::Jump(Chain::Inbound)));
        }
        if self.dns == Dns::All {
            self.add(raw(Chain::OutputDns).udp().dport(53).then(Action::CtZone(2)));
            self.add(raw(Chain::Inbound).udp().sport(53).then(Action::CtZone(1)));
        }
        for server in self.dns.servers() {
            self.add(raw(Chain::OutputDns).family_of(server).udp().dport(53).dst(server).then(Action::CtZone(2)));
            self.add(raw(Chain::Inbound).family_of(server).udp().sport(53).src(server).then(Action::CtZone(1)));
        }
    }

    /// Step 14: Local traffic stays local.
    fn loopback_return(&mut self) {
        let cfg = self.cfg;
        self.per_family(|family| nat(Chain::IstioOutput).dst(loopback(cfg, family)).then(Action::Return));
    }

    /// Step 15: Excluded destinations.
    fn outbound_ranges_exclude(&mut self) {
        if let Some(sets) = self.range_sets(SetList::OutboundRangesExclude, &self.cfg.outbound_ranges_exclude) {
            for (family, excluded) in sets {
                self.add(nat(Chain::IstioOutput).family(Some(family)).with(excluded).then(Action::Return));
            }
            return;
        }
        for &cidr in &self.cfg.outbound_ranges_exclude {
            self.add(nat(Chain::IstioOutput).family_of(cidr).dst(cidr).then(Action::Return));
        }
    }

    /// Step 16: Ports always captured.
    fn outbound_ports_include(&mut self) {
        if let Some(included) = self.port_set(SetList::OutboundPortsInclude, Table::Nat, &self.cfg.outbound_ports_include) {
            self.add(nat(Chain::IstioOutput).tcp().with(included).then(Action::Jump(Chain::Redirect)));
            return;
        }
        for &port in &self.cfg.outbound_ports_include {
            self.add(nat(Chain::IstioOutput).tcp().dport(port).then(Action::Jump(Chain::Redirect)));
        }
    }

    /// Step 17: Captured destinations, IPv4 ranges first, then IPv6, each in the order given; a
    /// KubeVirt interface's inbound traffic to them is captured too (on top of PREROUTING).
    fn outbound_ranges_include(&mut self) {
        let cfg = self.cfg;
        let to_proxy = Action::Jump(Chain::Redirect);
        match &cfg.outbound_ranges {
            OutboundRanges::None => {}
            OutboundRanges::All => {
                self.add(nat(Chain::IstioOutput).then(to_proxy.clone()));
                for nic in &cfg.kube_virt_interfaces {
                    self.add(nat(Chain::Prerouting).inserted_at(0).iif(nic.as_str()).then(to_proxy.clone()));
                }
            }
            OutboundRanges::Only(cidrs) => {
                if let Some(sets) = self.range_sets(SetList::OutboundRangesInclude, cidrs) {
                    for (family, included) in sets {
                        for nic in &cfg.kube_virt_interfaces {
                            let rule = nat(Chain::Prerouting).family(Some(family)).inserted_at(0).iif(nic.as_str());
                            self.add(rule.with(included.clone()).then(to_proxy.clone()));
                        }
                        self.add(nat(Chain::IstioOutput).family(Some(family)).with(included).then(to_proxy.clone()));
                    }
                    return;
                }
                let ordered = cidrs.iter().filter(|c| c.is_ipv4()).chain(cidrs.iter().filter(|c| !c.is_ipv4()));
                for &cidr in ordered {
                    for nic in &cfg.kube_virt_interfaces {
                        let rule = nat(Chain::Prerouting).family_of(cidr).inserted_at(0).iif(nic.as_str()).dst(cidr);
                        self.add(rule.then(to_proxy.clone()));
                    }
                    self.add(nat(Chain::IstioOutput).family_of(cidr).dst(cidr).then(to_proxy.clone()));
                }
            }
        }
    }

    /// Step 18: TPROXY bookkeeping in mangle: the mark moves between packet and connection, and
    /// the proxy's own traffic to the pod is not captured inbound again.
    fn tproxy_bookkeeping(&mut self) {
        let (cfg, tmark) = (self.cfg, self.cfg.tproxy_mark);
        self.add(mangle(Chain::Prerouting).tcp().mark(tmark).then(Action::SaveMark));
        self.add(mangle(Chain::Output).tcp().oif("lo").mark(tmark).then(Action::Return));
        for owner in proxy_owners(cfg) {
            self.per_family(|family| {
                let rule = mangle(Chain::Output).not_dst(loopback(cfg, family)).tcp().oif("lo").owner(owner);
                rule.then(Action::SetMark(OUTBOUND_MARK))
            });
        }
        self.add(mangle(Chain::Output).tcp().with(Match::ConnMark(tmark)).then(Action::RestoreMark));
        self.add(mangle(Chain::Inbound).inserted_at(0).tcp().mark(tmark).then(Action::Return));
        self.per_family(|family| {
            mangle(Chain::Inbound).inserted_at(1).tcp().src(passthrough_source(family)).iif("lo").then(Action::Return)
        });
        self.add(mangle(Chain::Inbound).inserted_at(2).tcp().iif("lo").not_mark(OUTBOUND_MARK).then(Action::Return));
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
                (Match::InInterface("eth2".into()), Action::Jump(Chain::Redirect)),
                (Match::InInterface("eth1".into()), Action::Jump(Chain::Redirect)),
                (Match::InInterface("eth2".into()), Action::Return),
                (Match::InInterface("eth1".into()), Action::Return),
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
        assert_eq!(out.rules[0].matches, vec![Match::Mark { mark: 1337, negated: false }]);
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
        assert_eq!(find(&nft), vec![Match::Protocol(Protocol::Tcp), Match::CtState(CtState::Invalid)]);
    }

    #[test]
    fn set_form_has_one_rule_per_list_and_family() {
        let cfg = CaptureConfig {
            use_sets: true,
            ipv6: true,
            inbound_ports: InboundPorts::All { except: vec![15090, 15021, 15020] },
            outbound_ranges: OutboundRanges::Only(parse_cidrs("-i", "10.0.0.0/8,10.1.0.0/16,fd00::/8").unwrap()),
            outbound_ranges_exclude: parse_cidrs("-x", "192.168.0.0/16,192.168.1.0/24").unwrap(),
            outbound_ports_exclude: vec![15020, 9090],
            kube_virt_interfaces: vec![Interface::parse("-k", "eth1").unwrap()],
            ..CaptureConfig::default()
        };
        let rs = build(&cfg, Dialect::Iptables);
        let lists: Vec<SetList> = rs.sets.iter().map(|s| s.list).collect();
        assert_eq!(
            lists,
            [
                SetList::InboundPortsExclude,
                SetList::OutboundPortsExclude,
                SetList::OutboundRangesExclude(IpFamily::V4),
                SetList::OutboundRangesInclude(IpFamily::V4),
                SetList::OutboundRangesInclude(IpFamily::V6),
            ]
        );
        let users = |list: SetList| {
            rs.rules
                .iter()
                .filter(|r| {
                    r.matches.iter().any(|m| matches!(m, Match::DestinationInSet(l) | Match::DestPortInSet(l) if *l == list))
                })
                .count()
        };
        assert_eq!(users(SetList::InboundPortsExclude), 1);
        assert_eq!(users(SetList::OutboundPortsExclude), 2, "TCP and UDP");
        assert_eq!(users(SetList::OutboundRangesInclude(IpFamily::V4)), 2, "ISTIO_OUTPUT and the KubeVirt interface");
        assert!(rs
            .rules
            .iter()
            .all(|r| !r.matches.iter().any(|m| matches!(m, Match::Destination { cidr, negated: false } if !cidr.is_loopback()))));
        let v4_only = build(&CaptureConfig { ipv6: false, ..cfg.clone() }, Dialect::Iptables);
        assert!(v4_only.sets.iter().all(|s| s.list.family() != Some(IpFamily::V6)));
        assert!(build(&CaptureConfig { use_sets: false, ..cfg }, Dialect::Iptables).sets.is_empty());
    }
}
