//! What the namespace needs besides rules, as entries and as the `ip` commands doing the same.

use std::fmt;

use super::RouteError;
use crate::config::{INBOUND_PASSTHROUGH_V6, RESERVED_ROUTE_TABLES};
use crate::family::IpFamily;
use crate::settings::CaptureConfig;

pub(super) const LOOPBACK: &str = "lo";

/// What the namespace needs besides rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// `::6/128` on `lo`.
    pub passthrough_v6: bool,
    /// Policy routing for TPROXY inbound capture.
    pub tproxy: Option<TproxyRouting>,
}

/// `ip rule add fwmark MARK lookup TABLE` + `ip route add local default dev lo table TABLE`,
/// for IPv4 and, when `ipv6`, for IPv6 too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TproxyRouting {
    pub mark: u32,
    pub table: u32,
    pub ipv6: bool,
}

impl RoutePlan {
    pub fn for_config(cfg: &CaptureConfig) -> RoutePlan {
        RoutePlan {
            passthrough_v6: cfg.ipv6,
            tproxy: cfg.needs_tproxy_routes().then_some(TproxyRouting {
                mark: cfg.tproxy_mark,
                table: cfg.tproxy_route_table,
                ipv6: cfg.ipv6,
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// The `ip` commands `apply` is equivalent to, in its order (for `--dry-run`).
    pub fn describe(&self) -> Vec<String> {
        self.entries().iter().map(|entry| entry.command(Change::Add)).collect()
    }

    /// Every IPv4 entry comes before every IPv6 one, so a namespace without IPv6 still gets
    /// working IPv4 routing before `apply` reports [`RouteError::Ipv6Disabled`].
    pub(super) fn entries(&self) -> Vec<Entry> {
        let mut entries = Vec::new();
        for family in IpFamily::ALL {
            if family == IpFamily::V6 && self.passthrough_v6 {
                entries.push(Entry::PassthroughAddress);
            }
            if let Some(TproxyRouting { mark, table, ipv6 }) = self.tproxy {
                if family == IpFamily::V4 || ipv6 {
                    entries.push(Entry::MarkRule { family, mark, table });
                    entries.push(Entry::LocalDefaultRoute { family, table });
                }
            }
        }
        entries
    }

    /// Refuses plans that would break the namespace's routing; `apply` and `remove` check too.
    pub fn check(&self) -> Result<(), RouteError> {
        match self.tproxy {
            // Route table 0 means "main" to the kernel; the others are consulted for every packet.
            Some(TproxyRouting { table, .. }) if RESERVED_ROUTE_TABLES.contains(&table) => Err(RouteError::ReservedTable(table)),
            // A rule with mark 0 carries no mark match at all.
            Some(TproxyRouting { mark: 0, .. }) => Err(RouteError::ZeroMark),
            _ => Ok(()),
        }
    }
}

/// `ip` or `ip -6`.
pub(super) fn ip_command(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip -6",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Add,
    Remove,
    /// Only look.
    Check,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Change::Add => "add",
            Change::Remove => "del",
            Change::Check => "show",
        })
    }
}

/// One kernel entry a plan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    PassthroughAddress,
    MarkRule { family: IpFamily, mark: u32, table: u32 },
    LocalDefaultRoute { family: IpFamily, table: u32 },
}

impl Entry {
    pub(super) fn family(self) -> IpFamily {
        match self {
            Entry::PassthroughAddress => IpFamily::V6,
            Entry::MarkRule { family, .. } | Entry::LocalDefaultRoute { family, .. } => family,
        }
    }

    /// The `ip` command doing the same, for dry runs and error messages.
    pub(super) fn command(self, change: Change) -> String {
        match self {
            Entry::PassthroughAddress => format!("ip -6 addr {change} {INBOUND_PASSTHROUGH_V6}/128 dev {LOOPBACK}"),
            Entry::MarkRule { family, mark, table } => {
                format!("{} rule {change} fwmark {mark} lookup {table}", ip_command(family))
            }
            Entry::LocalDefaultRoute { family, table } => {
                format!("{} route {change} local default dev {LOOPBACK} table {table}", ip_command(family))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InboundPorts, InterceptionMode};

    fn tproxy_config(ipv6: bool) -> CaptureConfig {
        CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::All { except: vec![] },
            ipv6,
            ..CaptureConfig::default()
        }
    }

    #[test]
    fn redirect_ipv4_needs_nothing() {
        let plan = RoutePlan::for_config(&CaptureConfig::default());
        assert_eq!(plan, RoutePlan { passthrough_v6: false, tproxy: None });
        assert!(plan.is_empty());
        assert!(plan.describe().is_empty());
    }

    #[test]
    fn redirect_ipv6_needs_only_the_passthrough_address() {
        let plan = RoutePlan::for_config(&CaptureConfig { ipv6: true, ..CaptureConfig::default() });
        assert!(!plan.is_empty());
        assert_eq!(plan.describe(), ["ip -6 addr add ::6/128 dev lo"]);
    }

    #[test]
    fn tproxy_without_inbound_ports_needs_no_routing() {
        let cfg = CaptureConfig { inbound_ports: InboundPorts::None, ..tproxy_config(false) };
        assert_eq!(RoutePlan::for_config(&cfg).tproxy, None);
    }

    #[test]
    fn tproxy_ipv4_routes_with_the_configured_mark_and_table() {
        let cfg = CaptureConfig { tproxy_mark: 7, tproxy_route_table: 1000, ..tproxy_config(false) };
        let plan = RoutePlan::for_config(&cfg);
        assert_eq!(plan.tproxy, Some(TproxyRouting { mark: 7, table: 1000, ipv6: false }));
        assert_eq!(plan.describe(), ["ip rule add fwmark 7 lookup 1000", "ip route add local default dev lo table 1000"]);
    }

    #[test]
    fn dual_stack_tproxy_describes_ipv4_first() {
        assert_eq!(
            RoutePlan::for_config(&tproxy_config(true)).describe(),
            [
                "ip rule add fwmark 1337 lookup 133",
                "ip route add local default dev lo table 133",
                "ip -6 addr add ::6/128 dev lo",
                "ip -6 rule add fwmark 1337 lookup 133",
                "ip -6 route add local default dev lo table 133",
            ]
        );
    }

    #[test]
    fn removal_commands_name_the_deletion() {
        let entry = Entry::MarkRule { family: IpFamily::V6, mark: 1337, table: 133 };
        assert_eq!(entry.command(Change::Remove), "ip -6 rule del fwmark 1337 lookup 133");
    }

    #[test]
    fn tables_and_marks_that_would_capture_everything_are_refused() {
        for table in [0, 253, 254, 255] {
            let plan = RoutePlan { passthrough_v6: false, tproxy: Some(TproxyRouting { mark: 1337, table, ipv6: false }) };
            assert!(matches!(plan.check(), Err(RouteError::ReservedTable(t)) if t == table), "table {table}");
        }
        let zero_mark = RoutePlan { passthrough_v6: false, tproxy: Some(TproxyRouting { mark: 0, table: 133, ipv6: true }) };
        assert!(matches!(zero_mark.check(), Err(RouteError::ZeroMark)));
        assert!(RoutePlan::for_config(&tproxy_config(true)).check().is_ok());
    }
}
