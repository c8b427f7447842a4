//! What a run tells the reader of `kubectl logs -c istio-init`, in Istio's words: the
//! effective settings, then the rules applied (or that they were already in place); at debug
//! also the state read back and the plan made from it.

use std::fmt::Write;

use capture_lib::capture::{Report, Request, Sent};
use capture_lib::config::DnsCapture;
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
    let proxy_gid = if s.proxy_gid.is_empty() { &s.proxy_uid } else { &s.proxy_gid };
    let entries: [(&str, &dyn std::fmt::Display); 31] = [
        ("PROXY_PORT", &s.proxy_port),
        ("PROXY_INBOUND_CAPTURE_PORT", &s.inbound_capture_port),
        ("PROXY_TUNNEL_PORT", &s.inbound_tunnel_port),
        ("PROXY_UID", &s.proxy_uid),
        ("PROXY_GID", proxy_gid),
        ("INBOUND_INTERCEPTION_MODE", &s.interception_mode),
        ("INBOUND_TPROXY_MARK", &s.tproxy_mark),
        ("INBOUND_TPROXY_ROUTE_TABLE", &s.tproxy_route_table),
        ("INBOUND_PORTS_INCLUDE", &s.inbound_ports),
        ("INBOUND_PORTS_EXCLUDE", &s.exclude_inbound_ports),
        ("OUTBOUND_OWNER_GROUPS_INCLUDE", &s.owner_groups.as_deref().unwrap_or("*")),
        ("OUTBOUND_OWNER_GROUPS_EXCLUDE", &s.owner_groups_exclude),
        ("OUTBOUND_IP_RANGES_INCLUDE", &s.outbound_ranges),
        ("OUTBOUND_IP_RANGES_EXCLUDE", &s.exclude_outbound_ranges),
        ("OUTBOUND_PORTS_INCLUDE", &s.outbound_ports),
        ("OUTBOUND_PORTS_EXCLUDE", &s.exclude_outbound_ports),
        ("KUBE_VIRT_INTERFACES", &s.kube_virt_interfaces),
        ("ENABLE_INBOUND_IPV6", &request.config.ipv6),
        ("DUAL_STACK", &cli.dual_stack),
        ("DNS_CAPTURE", &s.redirect_dns),
        ("DROP_INVALID", &s.drop_invalid),
        ("CAPTURE_ALL_DNS", &s.capture_all_dns),
        // Go's %s of two string slices, as Istio prints them.
        ("DNS_SERVERS", &format_args!("[{dns_v4}],[{dns_v6}]")),
        ("NETWORK_NAMESPACE", &cli.network_namespace),
        ("CNI_MODE", &cli.cni_mode),
        ("EXCLUDE_INTERFACES", &s.exclude_interfaces),
        ("RECONCILE", &cli.reconcile),
        ("CLEANUP_ONLY", &cli.cleanup_only),
        ("FORCE_APPLY", &cli.force_apply),
        ("NATIVE_NFTABLES", &s.native_nftables),
        ("FORCE_IPTABLES_BINARY", &s.iptables_variant),
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
