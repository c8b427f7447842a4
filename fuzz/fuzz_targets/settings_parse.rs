//! Every user-facing setting, fed arbitrary strings: parsing either accepts or names the
//! setting in its error, and never panics.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use capture_lib::capture::Backend;
use capture_lib::config::{self, Interface};
use capture_lib::settings::{Front, Setting, Settings};
use libfuzzer_sys::fuzz_target;

/// Arbitrary values for an arbitrary subset of the settings, each under its flag's name.
fn settings(u: &mut Unstructured) -> arbitrary::Result<Settings> {
    let front = if u.arbitrary()? { Front::Flag } else { Front::CniKey };
    let mut settings = Settings::new(front);
    for setting in Setting::ALL {
        if let Some(text) = <Option<String>>::arbitrary(u)? {
            settings.set(*setting, text, setting.name(front));
        }
    }
    Ok(settings)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(all) = settings(&mut u) else { return };
    match all.capture_config() {
        // The rules exempt the proxy by UID and GID: a config without one would capture it.
        Ok(cfg) => assert!(!cfg.proxy_uids.is_empty() && !cfg.proxy_gids.is_empty(), "{all:?}"),
        // Errors are shown to users as they are: they must render.
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let _ = Backend::from_settings(&all);

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
    let _ = config::parse_owner_groups("i", value, "e", "", false);
    let _ = config::parse_owner_groups("i", "*", "e", value, true);
    let _ = config::parse_loopback_cidr("l", value);
    let _ = config::parse_mode("m", value);
    let _ = config::parse_resolv_conf(value.as_bytes());
});
