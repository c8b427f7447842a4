//! Every user-facing setting, fed arbitrary strings: parsing either accepts or names the
//! setting in its error, and never panics.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use capture_lib::config::{self, Interface};
use capture_lib::settings::{SettingNames, Settings};
use libfuzzer_sys::fuzz_target;

const NAMES: SettingNames = SettingNames::ISTIO_FLAGS;

fn settings(u: &mut Unstructured) -> arbitrary::Result<Settings> {
    Ok(Settings {
        proxy_port: u.arbitrary()?,
        inbound_capture_port: u.arbitrary()?,
        inbound_tunnel_port: u.arbitrary()?,
        proxy_uid: u.arbitrary()?,
        proxy_gid: u.arbitrary()?,
        interception_mode: u.arbitrary()?,
        inbound_ports: u.arbitrary()?,
        exclude_inbound_ports: u.arbitrary()?,
        outbound_ranges: u.arbitrary()?,
        exclude_outbound_ranges: u.arbitrary()?,
        outbound_ports: u.arbitrary()?,
        exclude_outbound_ports: u.arbitrary()?,
        exclude_interfaces: u.arbitrary()?,
        kube_virt_interfaces: u.arbitrary()?,
        tproxy_mark: u.arbitrary()?,
        tproxy_route_table: u.arbitrary()?,
        redirect_dns: u.arbitrary()?,
        capture_all_dns: u.arbitrary()?,
        drop_invalid: u.arbitrary()?,
        owner_groups: u.arbitrary()?,
        owner_groups_exclude: u.arbitrary()?,
        ipv4_loopback_cidr: u.arbitrary()?,
        native_nftables: u.arbitrary()?,
        iptables_variant: u.arbitrary()?,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(all) = settings(&mut u) else { return };
    match all.capture_config(&NAMES) {
        // The rules exempt the proxy by UID and GID: a config without one would capture it.
        Ok(cfg) => assert!(!cfg.proxy_uids.is_empty() && !cfg.proxy_gids.is_empty(), "{all:?}"),
        // Errors are shown to users as they are: they must render.
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let _ = all.backend(&NAMES);

    // The single-value parsers, each on one arbitrary string.
    let Ok(value) = <&str>::arbitrary(&mut u) else { return };
    if let Ok(port) = config::parse_port("p", value) {
        assert_ne!(port, 0, "port 0 accepted from {value:?}");
    }
    let _ = config::parse_ports("p", value);
    let _ = config::parse_inbound_ports("b", value, "d", value);
    if let Ok(cidrs) = config::parse_cidrs("c", value) {
        // A CIDR prints in a form that parses back to itself.
        let printed: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(config::parse_cidrs("c", &printed.join(",")), Ok(cidrs));
    }
    let _ = config::parse_outbound_ranges("i", value);
    if let Ok(interfaces) = config::parse_interfaces("x", value) {
        assert!(interfaces.iter().all(|i| !i.as_str().is_empty() && i.as_str().len() <= 15), "{interfaces:?}");
    }
    let _ = Interface::parse("x", value);
    let _ = config::parse_number("n", value);
    let _ = config::parse_uids("u", value);
    let _ = config::parse_gids("g", value);
    let _ = config::parse_owner_groups(Some(value), "", false);
    let _ = config::parse_owner_groups(None, value, true);
    let _ = config::parse_loopback_cidr(value);
    let _ = config::parse_resolv_conf(value.as_bytes());
});
