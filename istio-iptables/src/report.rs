//! What a run tells the reader of `kubectl logs -c istio-init`, in Istio's words: the
//! effective settings, then the rules applied (or that they were already in place); at debug
//! also the state read back and the plan made from it.

use std::fmt::Write;

use capture_lib::capture::{Report, Request, Sent};
use capture_lib::config::DnsCapture;
use capture_lib::settings::Setting;
use capture_lib::Outcome;

use crate::cli::Cli;
use crate::log::{Level, Logger};

/// The settings the run uses, after defaults and the environment, under the names of
/// Istio's own "Istio config:" listing (tools/common/config/config.go).
pub fn log_settings(log: &Logger, cli: &Cli, request: &Request) {
    if !log.enabled(Level::Info) {
        return;
    }
    let s = cli.settings();
    let (dns_v4, dns_v6) = match &request.config.dns {
        DnsCapture::Servers { v4, v6 } => (join(v4), join(v6)),
        DnsCapture::Off | DnsCapture::All => (String::new(), String::new()),
    };
    let text = |setting| s.text(setting);
    let flag = |setting| s.flag(setting).unwrap_or_default();
    let proxy_gid = match text(Setting::ProxyGid) {
        "" => text(Setting::ProxyUid),
        gids => gids,
    };
    let entries: [(&str, &dyn std::fmt::Display); 31] = [
        ("PROXY_PORT", &text(Setting::ProxyPort)),
        ("PROXY_INBOUND_CAPTURE_PORT", &text(Setting::InboundCapturePort)),
        ("PROXY_TUNNEL_PORT", &text(Setting::InboundTunnelPort)),
        ("PROXY_UID", &text(Setting::ProxyUid)),
        ("PROXY_GID", &proxy_gid),
        ("INBOUND_INTERCEPTION_MODE", &text(Setting::InterceptionMode)),
        ("INBOUND_TPROXY_MARK", &text(Setting::TproxyMark)),
        ("INBOUND_TPROXY_ROUTE_TABLE", &text(Setting::TproxyRouteTable)),
        ("INBOUND_PORTS_INCLUDE", &text(Setting::InboundPorts)),
        ("INBOUND_PORTS_EXCLUDE", &text(Setting::ExcludeInboundPorts)),
        ("OUTBOUND_OWNER_GROUPS_INCLUDE", &text(Setting::OwnerGroups)),
        ("OUTBOUND_OWNER_GROUPS_EXCLUDE", &text(Setting::OwnerGroupsExclude)),
        ("OUTBOUND_IP_RANGES_INCLUDE", &text(Setting::OutboundRanges)),
        ("OUTBOUND_IP_RANGES_EXCLUDE", &text(Setting::ExcludeOutboundRanges)),
        ("OUTBOUND_PORTS_INCLUDE", &text(Setting::OutboundPorts)),
        ("OUTBOUND_PORTS_EXCLUDE", &text(Setting::ExcludeOutboundPorts)),
        ("KUBE_VIRT_INTERFACES", &text(Setting::KubeVirtInterfaces)),
        ("ENABLE_INBOUND_IPV6", &request.config.ipv6),
        ("DUAL_STACK", &flag(Setting::DualStack)),
        ("DNS_CAPTURE", &flag(Setting::RedirectDns)),
        ("DROP_INVALID", &flag(Setting::DropInvalid)),
        ("CAPTURE_ALL_DNS", &flag(Setting::CaptureAllDns)),
        // Go's %s of two string slices, as Istio prints them.
        ("DNS_SERVERS", &format_args!("[{dns_v4}],[{dns_v6}]")),
        ("NETWORK_NAMESPACE", &cli.network_namespace),
        ("CNI_MODE", &cli.cni_mode),
        ("EXCLUDE_INTERFACES", &text(Setting::ExcludeInterfaces)),
        ("RECONCILE", &cli.reconcile),
        ("CLEANUP_ONLY", &cli.cleanup_only),
        ("FORCE_APPLY", &cli.force_apply),
        ("NATIVE_NFTABLES", &flag(Setting::NativeNftables)),
        ("FORCE_IPTABLES_BINARY", &text(Setting::IptablesVariant)),
    ];
    let mut text = String::from("Istio config:");
    for (name, value) in entries {
        let _ = write!(text, "\n{name}={value}");
    }
    log.info(&text);
}

fn join(addresses: &[impl std::fmt::Display]) -> String {
    addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

/// The run's report: at debug what was read and decided, at info what was sent (as Istio logs
/// its restore input or nft rules) and the outcome. A dry run prints its text on stdout.
pub fn log_report(log: &Logger, report: &Report) {
    for trace in &report.trace {
        log.debug(trace);
    }
    for sent in &report.sent {
        match sent {
            Sent::IptablesRestore { program, input } => {
                log.info(&format!("Running iptables restore with: {program} and the following input:\n{}", input.trim_end()))
            }
            Sent::Nftables { script } => log.info(&format!("nftables rules programmed:\n{}", script.trim_end())),
            Sent::IpSets { script } => log.info(&format!("ip sets programmed (as ipset restore input):\n{}", script.trim_end())),
            Sent::Routing { commands } => log.info(&format!("Added the routing the capture relies on:\n{}", commands.join("\n"))),
        }
    }
    for warning in &report.warnings {
        log.warn(warning);
    }
    if let Some(text) = &report.dry_run {
        print!("{text}");
        return;
    }
    log.info(match report.outcome {
        Outcome::Applied => "capture rules installed",
        Outcome::Unchanged => "capture rules already in place; nothing changed",
        Outcome::Reconciled => "drifted capture rules replaced",
        Outcome::Removed => "capture rules removed",
        Outcome::NothingToRemove => "no capture rules to remove",
    });
}
