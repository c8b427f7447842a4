//! Model rules as iptables rule specifications.
//!
//! Rules are written in the canonical form `iptables-save` prints (option order, `-m tcp`,
//! hexadecimal marks, explicit target defaults), so what we feed `iptables-restore` is
//! byte-for-byte what we later read back, and state comparison is plain string equality.

use std::fmt::Write;

use crate::family::IpFamily;
use crate::model::{Action, Chain, CtState, Match, OwnerKind, Protocol, Rule, Table};

pub fn table_name(table: Table) -> &'static str {
    match table {
        Table::Mangle => "mangle",
        Table::Nat => "nat",
        Table::Raw => "raw",
    }
}

pub fn chain_name(chain: Chain) -> &'static str {
    match chain {
        Chain::Prerouting => "PREROUTING",
        Chain::Output => "OUTPUT",
        Chain::Inbound => "ISTIO_INBOUND",
        Chain::Redirect => "ISTIO_REDIRECT",
        Chain::InRedirect => "ISTIO_IN_REDIRECT",
        Chain::IstioOutput => "ISTIO_OUTPUT",
        Chain::OutputDns => "ISTIO_OUTPUT_DNS",
        Chain::Divert => "ISTIO_DIVERT",
        Chain::Tproxy => "ISTIO_TPROXY",
        Chain::Drop => "ISTIO_DROP",
    }
}

/// Names of every chain this tool may create, in any table.
pub fn owned_chain_names() -> impl Iterator<Item = &'static str> {
    Chain::OWNED.into_iter().map(chain_name)
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn not(negated: bool) -> &'static str {
    if negated {
        "! "
    } else {
        ""
    }
}

/// Where iptables-save puts each kind of match: header fields first, then extensions.
fn print_rank(m: &Match) -> u8 {
    match m {
        Match::Source(_) => 0,
        Match::Destination { .. } => 1,
        Match::InInterface(_) => 2,
        Match::OutInterface(_) => 3,
        Match::Protocol(_) => 4,
        Match::DestPort { .. } | Match::SourcePort(_) => 5,
        Match::DestPortNotIn(_) | Match::DestinationInSet(_) | Match::DestPortInSet(_) => 6,
        Match::Owner { .. } => 7,
        Match::CtState(_) => 8,
        Match::Mark { .. } => 9,
        Match::ConnMark(_) => 10,
    }
}

/// The rule specification without the `-A CHAIN` prefix, e.g. `-p tcp -j REDIRECT --to-ports 15001`.
pub fn rule_spec(rule: &Rule) -> String {
    let mut matches: Vec<&Match> = rule.matches.iter().collect();
    matches.sort_by_key(|m| print_rank(m));
    let proto = rule.matches.iter().find_map(|m| match m {
        Match::Protocol(p) => Some(proto_name(*p)),
        _ => None,
    });
    let mut out = String::new();
    for m in matches {
        // Writing to a String cannot fail.
        let _ = match m {
            Match::Source(c) => write!(out, "-s {c} "),
            // iptables-save prints no match for the whole address space (`-d 0.0.0.0/0`, `-d ::/0`).
            Match::Destination { cidr, negated: false } if cidr.prefix() == 0 => Ok(()),
            Match::Destination { cidr, negated } => write!(out, "{}-d {cidr} ", not(*negated)),
            Match::InInterface(i) => write!(out, "-i {i} "),
            Match::OutInterface(i) => write!(out, "-o {i} "),
            Match::Protocol(p) => write!(out, "-p {} ", proto_name(*p)),
            Match::DestPort { port, negated } => {
                write!(out, "-m {} {}--dport {port} ", proto.unwrap_or("tcp"), not(*negated))
            }
            Match::SourcePort(port) => write!(out, "-m {} --sport {port} ", proto.unwrap_or("tcp")),
            Match::DestPortNotIn(ports) => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                write!(out, "-m multiport ! --dports {} ", list.join(","))
            }
            // An address set matches the destination address, a port set (bitmap:port) the destination port.
            Match::DestinationInSet(list) | Match::DestPortInSet(list) => write!(out, "-m set --match-set {} dst ", list.name()),
            Match::Owner { kind, id, negated } => {
                let opt = match kind {
                    OwnerKind::Uid => "--uid-owner",
                    OwnerKind::Gid => "--gid-owner",
                };
                write!(out, "-m owner {}{opt} {id} ", not(*negated))
            }
            Match::CtState(state) => {
                let s = match state {
                    CtState::Invalid => "INVALID",
                    CtState::RelatedEstablished => "RELATED,ESTABLISHED",
                };
                write!(out, "-m conntrack --ctstate {s} ")
            }
            Match::Mark { mark, negated } => write!(out, "-m mark {}--mark {mark:#x} ", not(*negated)),
            Match::ConnMark(mark) => write!(out, "-m connmark --mark {mark:#x} "),
        };
    }
    let _ = match &rule.action {
        Action::Jump(chain) => write!(out, "-j {}", chain_name(*chain)),
        Action::Return => write!(out, "-j RETURN"),
        Action::Accept => write!(out, "-j ACCEPT"),
        Action::Drop => write!(out, "-j DROP"),
        Action::Redirect(port) => write!(out, "-j REDIRECT --to-ports {port}"),
        Action::Tproxy { port, mark } => {
            let any = match rule.address_family() {
                Some(IpFamily::V6) => "::",
                _ => "0.0.0.0",
            };
            write!(out, "-j TPROXY --on-port {port} --on-ip {any} --tproxy-mark {mark:#x}/0xffffffff")
        }
        Action::SetMark(mark) => write!(out, "-j MARK --set-xmark {mark:#x}/0xffffffff"),
        Action::SaveMark => write!(out, "-j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
        Action::RestoreMark => write!(out, "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
        Action::CtZone(zone) => write!(out, "-j CT --zone {zone}"),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build, Dialect};
    use crate::settings::CaptureConfig;

    fn lines(cfg: &CaptureConfig, family: IpFamily) -> Vec<String> {
        let rs = build(cfg, Dialect::Iptables);
        rs.family_chains(family)
            .iter()
            .flat_map(|c| c.rules.iter().map(move |r| format!("-A {} {}", chain_name(c.chain), rule_spec(r))))
            .collect()
    }

    #[test]
    fn renders_in_iptables_save_form() {
        let got = lines(&CaptureConfig::default(), IpFamily::V4);
        let want = [
            "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn set_matches_render_as_iptables_save_prints_them() {
        let cfg = CaptureConfig {
            use_sets: true,
            ipv6: true,
            inbound_ports: crate::config::InboundPorts::Only(vec![80, 443]),
            outbound_ranges_exclude: crate::config::parse_cidrs("-x", "10.0.0.0/8,fd00::/8").unwrap(),
            outbound_ports_exclude: vec![9000],
            ..CaptureConfig::default()
        };
        let (v4, v6) = (lines(&cfg, IpFamily::V4), lines(&cfg, IpFamily::V6));
        for want in [
            "-A ISTIO_INBOUND -p tcp -m set --match-set istio-in-ports-include dst -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -p udp -m set --match-set istio-out-ports-exclude dst -j RETURN",
            "-A ISTIO_OUTPUT -m set --match-set istio-out-cidrs-exclude-v4 dst -j RETURN",
        ] {
            assert!(v4.contains(&want.to_string()), "{want}: {v4:#?}");
        }
        assert!(v6.contains(&"-A ISTIO_OUTPUT -m set --match-set istio-out-cidrs-exclude-v6 dst -j RETURN".to_string()));
        assert!(!v4.iter().any(|l| l.contains("-v6 ")) && !v6.iter().any(|l| l.contains("-v4 ")));
    }

    #[test]
    fn tproxy_targets_use_hex_marks_and_family_any_address() {
        let cfg = CaptureConfig {
            mode: crate::config::InterceptionMode::Tproxy,
            inbound_ports: crate::config::InboundPorts::All { except: vec![] },
            ipv6: true,
            ..CaptureConfig::default()
        };
        let v6 = lines(&cfg, IpFamily::V6);
        assert!(v6.contains(
            &"-A ISTIO_TPROXY ! -d ::1/128 -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x539/0xffffffff"
                .to_string()
        ));
        assert!(v6.contains(&"-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 0x53a -j RETURN".to_string()));
        assert!(v6.contains(&"-A ISTIO_OUTPUT -m mark --mark 0x539 -j RETURN".to_string()));
        let v4 = lines(&cfg, IpFamily::V4);
        assert!(v4.contains(&"-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff".to_string()));
        assert!(v4.contains(
            &"-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff"
                .to_string()
        ));
    }

    #[test]
    fn the_whole_address_space_is_no_match_as_iptables_save_prints_it() {
        let cfg = CaptureConfig {
            outbound_ranges: crate::config::OutboundRanges::All,
            outbound_ranges_exclude: crate::config::parse_cidrs("-x", "0.0.0.0/0,::/0").unwrap(),
            ipv6: true,
            ..CaptureConfig::default()
        };
        for family in IpFamily::ALL {
            assert!(lines(&cfg, family).contains(&"-A ISTIO_OUTPUT -j RETURN".to_string()), "{family}");
        }
    }
}
