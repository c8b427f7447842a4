//! Recognising the rules a capture puts in the kernel's shared chains (PREROUTING, OUTPUT),
//! whatever settings made them, so that cleanup and `--reconcile` also remove what an earlier
//! run with other flags left (another TPROXY mark, other excluded interfaces or proxy owners).
//!
//! Rules that jump to one of our chains are recognised by their target. The others are every
//! rule the model can emit there, rendered once with stand-in values (an interface, an owner,
//! a mark, a loopback range) whose words then match any value of the same kind.

use std::sync::OnceLock;

use super::render::{chain_name, rule_spec, table_name};
use crate::config::{Cidr, DnsCapture, InboundPorts, InterceptionMode, Interface, OutboundRanges};
use crate::family::IpFamily;
use crate::model::{self, Action, Dialect, Match};
use crate::settings::CaptureConfig;

const ANY_INTERFACE: &str = "any-interface";
const ANY_ID: u32 = 4_000_000_001;
const ANY_MARK: u32 = 0x7fff_fffe;
const ANY_LOOPBACK: &str = "127.255.255.254/32";

/// One word of a shape.
#[derive(Debug, PartialEq, Eq)]
enum Word {
    Exactly(String),
    /// A name we could have programmed (so a restore can delete it again).
    Interface,
    /// A UID, GID or mark, decimal or hexadecimal.
    Number,
    Cidr,
}

impl Word {
    fn of(rendered: &str) -> Word {
        match rendered {
            ANY_INTERFACE => Word::Interface,
            ANY_LOOPBACK => Word::Cidr,
            w if w == ANY_ID.to_string() || w == format!("{ANY_MARK:#x}") => Word::Number,
            w => Word::Exactly(w.to_string()),
        }
    }

    fn matches(&self, word: &str) -> bool {
        match self {
            Word::Exactly(w) => w == word,
            Word::Interface => Interface::parse("", word).is_ok(),
            Word::Number => {
                word.parse::<u32>().is_ok() || word.strip_prefix("0x").is_some_and(|h| u32::from_str_radix(h, 16).is_ok())
            }
            Word::Cidr => word.parse::<Cidr>().is_ok(),
        }
    }
}

/// A rule of ours in a shared chain, with the words a configuration chooses left open.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    table: &'static str,
    chain: &'static str,
    words: Vec<Word>,
    /// It matches an interface and nothing else (`-i NIC -j RETURN`), which another tool may
    /// well write too: taken as ours only where the table holds our chains.
    weak: bool,
}

/// Whether `spec` in `table`'s `chain` has the shape of a rule a capture puts there (other than a
/// jump to our chains). `beside_our_chains`: the table holds one of our chains.
pub(super) fn is_our_shape(table: &str, chain: &str, spec: &str, beside_our_chains: bool) -> bool {
    let words: Vec<&str> = spec.split(' ').collect();
    shapes().iter().any(|shape| {
        shape.table == table
            && shape.chain == chain
            && (beside_our_chains || !shape.weak)
            && shape.words.len() == words.len()
            && shape.words.iter().zip(&words).all(|(want, word)| want.matches(word))
    })
}

fn shapes() -> &'static [Shape] {
    static SHAPES: OnceLock<Vec<Shape>> = OnceLock::new();
    SHAPES.get_or_init(|| {
        let mut shapes: Vec<Shape> = Vec::new();
        for mode in [InterceptionMode::Redirect, InterceptionMode::Tproxy] {
            let ruleset = model::build(&every_feature(mode), Dialect::Iptables);
            for family in IpFamily::ALL {
                for chain in ruleset.family_chains(family).into_iter().filter(|c| c.chain.is_hook()) {
                    for rule in chain.rules.iter().filter(|r| !matches!(r.action, Action::Jump(_))) {
                        let shape = Shape {
                            table: table_name(chain.table),
                            chain: chain_name(chain.chain),
                            words: rule_spec(rule).split(' ').map(Word::of).collect(),
                            weak: rule.matches.iter().all(|m| matches!(m, Match::InInterface(_) | Match::OutInterface(_))),
                        };
                        if !shapes.contains(&shape) {
                            shapes.push(shape);
                        }
                    }
                }
            }
        }
        shapes
    })
}

/// A configuration that puts every kind of rule into the shared chains, with stand-in values.
fn every_feature(mode: InterceptionMode) -> CaptureConfig {
    let any_interface = vec![Interface::parse("", ANY_INTERFACE).expect("a valid name")];
    CaptureConfig {
        mode,
        inbound_ports: InboundPorts::All { except: vec![] },
        outbound_ranges: OutboundRanges::All,
        exclude_interfaces: any_interface.clone(),
        kube_virt_interfaces: any_interface,
        proxy_uids: vec![ANY_ID],
        proxy_gids: vec![ANY_ID],
        tproxy_mark: ANY_MARK,
        host_ipv4_loopback: ANY_LOOPBACK.parse().expect("a valid CIDR"),
        dns: DnsCapture::All,
        drop_invalid: true,
        ipv6: true,
        ..CaptureConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tproxy_bookkeeping_of_any_mark_and_owner_is_recognised() {
        let ours = [
            ("PREROUTING", "-p tcp -m mark --mark 0x7 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
            ("OUTPUT", "-o lo -p tcp -m mark --mark 0x10 -j RETURN"),
            ("OUTPUT", "! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1338 -j MARK --set-xmark 0x53a/0xffffffff"),
            ("OUTPUT", "! -d ::1/128 -o lo -p tcp -m owner --gid-owner 7 -j MARK --set-xmark 0x53a/0xffffffff"),
            ("OUTPUT", "-p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
        ];
        for (chain, spec) in ours {
            assert!(is_our_shape("mangle", chain, spec, false), "{chain} {spec}");
        }
        let foreign = [
            ("PREROUTING", "-p udp -m mark --mark 0x7 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
            ("OUTPUT", "-o eth0 -p tcp -m mark --mark 0x10 -j RETURN"),
            ("OUTPUT", "! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1338 -j MARK --set-xmark 0x7/0xffffffff"),
            ("OUTPUT", "-p tcp -m mark --mark 0x10 -j RETURN"),
        ];
        for (chain, spec) in foreign {
            assert!(!is_our_shape("mangle", chain, spec, true), "{chain} {spec}");
        }
        assert!(!is_our_shape("nat", "OUTPUT", "-o lo -p tcp -m mark --mark 0x10 -j RETURN", true), "wrong table");
    }

    #[test]
    fn interface_returns_are_ours_only_beside_our_chains() {
        for (table, chain, spec) in [
            ("nat", "PREROUTING", "-i eth9 -j RETURN"),
            ("nat", "OUTPUT", "-o eth9 -j RETURN"),
            ("mangle", "PREROUTING", "-i veth+ -j RETURN"),
        ] {
            assert!(is_our_shape(table, chain, spec, true), "{table} {chain} {spec}");
            assert!(!is_our_shape(table, chain, spec, false), "{table} {chain} {spec}");
        }
        assert!(!is_our_shape("nat", "PREROUTING", "-i a\"b -j RETURN", true), "not a name we could program");
        assert!(!is_our_shape("nat", "PREROUTING", "-i eth9 -p tcp -j RETURN", true));
        assert!(!is_our_shape("raw", "PREROUTING", "-i eth9 -j RETURN", true), "we put none in raw");
    }
}
