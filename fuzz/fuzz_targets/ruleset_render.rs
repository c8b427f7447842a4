//! An arbitrary valid CaptureConfig through `model::build` (both dialects) and both renderers:
//! nothing panics, and every jump lands in a chain the same table declares.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Result, Unstructured};
use capture_lib::config::{Cidr, DnsCapture, InboundPorts, InterceptionMode, Interface, OutboundRanges, OwnerGroups};
use capture_lib::family::IpFamily;
use capture_lib::model::{self, Dialect, Ruleset};
use capture_lib::settings::CaptureConfig;
use capture_lib::{iptables, nftables};
use libfuzzer_sys::fuzz_target;

/// Up to `max` items made by `item`.
fn list<T>(u: &mut Unstructured, max: usize, mut item: impl FnMut(&mut Unstructured) -> Result<T>) -> Result<Vec<T>> {
    let len = u.int_in_range(0..=max)?;
    (0..len).map(|_| item(u)).collect()
}

fn port(u: &mut Unstructured) -> Result<u16> {
    u.int_in_range(1..=u16::MAX)
}

fn ports(u: &mut Unstructured) -> Result<Vec<u16>> {
    list(u, 8, port)
}

fn cidr(u: &mut Unstructured) -> Result<Cidr> {
    let (addr, max) = if u.arbitrary()? {
        (IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?)), 128)
    } else {
        (IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?)), 32)
    };
    Ok(Cidr::new(addr, u.int_in_range(0..=max)?).expect("prefix within the family's width"))
}

fn cidrs(u: &mut Unstructured) -> Result<Vec<Cidr>> {
    list(u, 6, cidr)
}

fn interfaces(u: &mut Unstructured) -> Result<Vec<Interface>> {
    let names = ["eth0", "eth1", "veth-a.1", "lo", "cni0", "x"];
    list(u, 4, |u| Ok(Interface::parse("x", u.choose(&names)?).expect("a valid name")))
}

fn ids(u: &mut Unstructured) -> Result<Vec<u32>> {
    list(u, 4, |u| u.arbitrary())
}

fn config(u: &mut Unstructured) -> Result<CaptureConfig> {
    // Settings always yield at least one proxy UID (the default when none is given).
    let mut proxy_uids = ids(u)?;
    proxy_uids.push(u.arbitrary()?);
    Ok(CaptureConfig {
        proxy_port: port(u)?,
        inbound_capture_port: port(u)?,
        inbound_tunnel_port: port(u)?,
        proxy_gids: if u.arbitrary()? { proxy_uids.clone() } else { [ids(u)?, vec![u.arbitrary()?]].concat() },
        proxy_uids,
        mode: if u.arbitrary()? { InterceptionMode::Tproxy } else { InterceptionMode::Redirect },
        inbound_ports: match u.int_in_range(0..=2)? {
            0 => InboundPorts::None,
            1 => InboundPorts::All { except: ports(u)? },
            _ => InboundPorts::Only(ports(u)?),
        },
        outbound_ranges: match u.int_in_range(0..=2)? {
            0 => OutboundRanges::None,
            1 => OutboundRanges::All,
            _ => OutboundRanges::Only(cidrs(u)?),
        },
        outbound_ranges_exclude: cidrs(u)?,
        outbound_ports_include: ports(u)?,
        outbound_ports_exclude: ports(u)?,
        exclude_interfaces: interfaces(u)?,
        kube_virt_interfaces: interfaces(u)?,
        tproxy_mark: u.arbitrary()?,
        tproxy_route_table: u.arbitrary()?,
        owner_groups: if u.arbitrary()? { OwnerGroups::AllExcept(ids(u)?) } else { OwnerGroups::Only(ids(u)?) },
        dns: match u.int_in_range(0..=2)? {
            0 => DnsCapture::Off,
            1 => DnsCapture::All,
            _ => DnsCapture::Servers {
                v4: list(u, 3, |u| Ok(Ipv4Addr::from(u.arbitrary::<u32>()?)))?,
                v6: list(u, 3, |u| Ok(Ipv6Addr::from(u.arbitrary::<u128>()?)))?,
            },
        },
        drop_invalid: u.arbitrary()?,
        use_sets: u.arbitrary()?,
        ipv6: u.arbitrary()?,
        host_ipv4_loopback: Cidr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), u.int_in_range(8..=32)?).expect("loopback"),
    })
}

/// Kernel chains: they exist without being declared.
const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
/// Verdicts and targets that are not chains.
const NOT_CHAINS: [&str; 8] = ["RETURN", "ACCEPT", "DROP", "REDIRECT", "TPROXY", "MARK", "CONNMARK", "CT"];

/// iptables-restore input: per table, every `-j`/`-g` chain target is declared (`:NAME`) and
/// holds at least one rule; no chain is declared twice.
fn check_restore_input(payload: &str) {
    let mut declared: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut filled: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut jumps: Vec<(&str, &str)> = Vec::new();
    let mut table = "";
    for line in payload.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().expect("a chain name");
            assert!(declared.entry(table).or_default().insert(chain), "{table} {chain} declared twice:\n{payload}");
        } else if let Some(rule) = line.strip_prefix("-A ").or_else(|| line.strip_prefix("-I ")) {
            let mut words = rule.split_whitespace();
            filled.entry(table).or_default().insert(words.next().expect("a chain"));
            while let Some(w) = words.next() {
                if w == "-j" || w == "-g" {
                    let target = words.next().expect("a jump target");
                    if !NOT_CHAINS.contains(&target) {
                        jumps.push((table, target));
                    }
                }
            }
        }
    }
    for (table, target) in jumps {
        assert!(
            BUILTIN.contains(&target) || declared.get(table).is_some_and(|d| d.contains(target)),
            "{table}: jump to undeclared {target}:\n{payload}"
        );
        assert!(filled.get(table).is_some_and(|f| f.contains(target)), "{table}: jump to empty {target}:\n{payload}");
    }
}

/// nft script (`add chain|rule inet TABLE CHAIN ...`): every `jump`/`goto` target is a chain
/// added to the same table, and holds at least one rule.
fn check_nft_script(script: &str) {
    let mut declared: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut filled: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut jumps: Vec<(&str, &str)> = Vec::new();
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["add", "chain", _family, table, chain, ..] => {
                assert!(declared.insert((table, chain)), "{table} {chain} added twice:\n{script}")
            }
            ["add", "rule", _family, table, chain, rest @ ..] => {
                filled.insert((table, chain));
                jumps.extend(rest.windows(2).filter(|w| w[0] == "jump" || w[0] == "goto").map(|w| (*table, w[1])));
            }
            _ => {}
        }
    }
    for jump in jumps {
        assert!(declared.contains(&jump), "{jump:?}: jump to an undeclared chain:\n{script}");
        assert!(filled.contains(&jump), "{jump:?}: jump to an empty chain:\n{script}");
    }
}

fn check(ruleset: &Ruleset) {
    // Replaying inserts and appends keeps every rule exactly once.
    let replayed: usize = ruleset.chains(|_| true).iter().map(|c| c.rules.len()).sum();
    assert_eq!(replayed, ruleset.rules.len());
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(cfg) = config(&mut u) else { return };
    let for_iptables = model::build(&cfg, Dialect::Iptables);
    check(&for_iptables);
    // IPv6 is restored only when programmed (as `iptables::plan` does).
    for family in IpFamily::ALL.into_iter().filter(|&f| f == IpFamily::V4 || cfg.ipv6) {
        check_restore_input(&iptables::install_payload(&for_iptables, family));
    }
    let for_nftables = model::build(&cfg, Dialect::Nftables);
    check(&for_nftables);
    check_nft_script(&nftables::script(&for_nftables));
});
