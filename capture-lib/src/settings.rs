//! Istio's capture settings as users write them (flag values, environment variables, CNI
//! configuration keys), turned into a [`CaptureConfig`] and a [`Backend`] in one place, so the
//! istio-iptables CLI and the CNI plugin give every setting the same meaning and defaults.
//!
//! Front ends fill a [`Settings`] from their own sources and pass the [`SettingNames`] their
//! users know, so an error names the flag or configuration key that holds the bad value.

use crate::capture::Backend;
use crate::config::{self, CaptureConfig, ConfigError, DnsCapture, InterceptionMode};
use crate::iptables::{IptablesOptions, Variant};

/// The proxy UID when none is given (Istio's istio-proxy user).
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// Values in Istio's syntax: comma lists, `*`, user and group names, `REDIRECT`/`TPROXY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub proxy_port: String,
    pub inbound_capture_port: String,
    pub inbound_tunnel_port: String,
    /// Empty: [`DEFAULT_PROXY_UID`].
    pub proxy_uid: String,
    /// Empty: the proxy UIDs.
    pub proxy_gid: String,
    pub interception_mode: String,
    pub inbound_ports: String,
    pub exclude_inbound_ports: String,
    pub outbound_ranges: String,
    pub exclude_outbound_ranges: String,
    pub outbound_ports: String,
    pub exclude_outbound_ports: String,
    pub exclude_interfaces: String,
    pub kube_virt_interfaces: String,
    pub tproxy_mark: String,
    pub tproxy_route_table: String,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub drop_invalid: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`; `None` is unset (everyone's traffic).
    pub owner_groups: Option<String>,
    pub owner_groups_exclude: String,
    /// Empty: 127.0.0.1/32.
    pub ipv4_loopback_cidr: String,
    pub native_nftables: bool,
    /// `legacy`, `nft`, or empty to detect.
    pub iptables_variant: String,
}

impl Default for Settings {
    /// Istio's defaults.
    fn default() -> Self {
        Self {
            proxy_port: "15001".into(),
            inbound_capture_port: "15006".into(),
            inbound_tunnel_port: "15008".into(),
            proxy_uid: String::new(),
            proxy_gid: String::new(),
            interception_mode: "REDIRECT".into(),
            inbound_ports: String::new(),
            exclude_inbound_ports: String::new(),
            outbound_ranges: String::new(),
            exclude_outbound_ranges: String::new(),
            outbound_ports: String::new(),
            exclude_outbound_ports: String::new(),
            exclude_interfaces: String::new(),
            kube_virt_interfaces: String::new(),
            tproxy_mark: "1337".into(),
            tproxy_route_table: "133".into(),
            redirect_dns: false,
            capture_all_dns: false,
            drop_invalid: false,
            owner_groups: None,
            owner_groups_exclude: String::new(),
            ipv4_loopback_cidr: String::new(),
            native_nftables: false,
            iptables_variant: String::new(),
        }
    }
}

/// What each setting is called where users write it.
#[derive(Debug, Clone, Copy)]
pub struct SettingNames {
    pub proxy_port: &'static str,
    pub inbound_capture_port: &'static str,
    pub inbound_tunnel_port: &'static str,
    pub proxy_uid: &'static str,
    pub proxy_gid: &'static str,
    pub inbound_ports: &'static str,
    pub exclude_inbound_ports: &'static str,
    pub outbound_ranges: &'static str,
    pub exclude_outbound_ranges: &'static str,
    pub outbound_ports: &'static str,
    pub exclude_outbound_ports: &'static str,
    pub exclude_interfaces: &'static str,
    pub kube_virt_interfaces: &'static str,
    pub tproxy_mark: &'static str,
    pub tproxy_route_table: &'static str,
    pub iptables_variant: &'static str,
}

impl SettingNames {
    /// Istio's istio-iptables flags.
    pub const ISTIO_FLAGS: SettingNames = SettingNames {
        proxy_port: "--envoy-port",
        inbound_capture_port: "--inbound-capture-port",
        inbound_tunnel_port: "--inbound-tunnel-port",
        proxy_uid: "--proxy-uid",
        proxy_gid: "--proxy-gid",
        inbound_ports: "--istio-inbound-ports",
        exclude_inbound_ports: "--istio-local-exclude-ports",
        outbound_ranges: "--istio-service-cidr",
        exclude_outbound_ranges: "--istio-service-exclude-cidr",
        outbound_ports: "--istio-outbound-ports",
        exclude_outbound_ports: "--istio-local-outbound-ports-exclude",
        exclude_interfaces: "--istio-exclude-interfaces",
        kube_virt_interfaces: "--kube-virt-interfaces",
        tproxy_mark: "--istio-inbound-tproxy-mark",
        tproxy_route_table: "--istio-inbound-tproxy-route-table",
        iptables_variant: "--force-iptables-binary",
    };
}

impl Settings {
    /// Validates every setting; reads nothing from the namespace, so `ipv6` is left false
    /// and DNS capture limited to the pod's resolvers is left off for the caller to complete.
    pub fn capture_config(&self, names: &SettingNames) -> Result<CaptureConfig, ConfigError> {
        // A list of only commas (`-u ,`) is as empty as `""`: with no proxy UID at all the
        // proxy's own traffic would be captured, and raw OUTPUT would jump to an empty chain.
        let proxy_uids = match config::parse_uids(names.proxy_uid, &self.proxy_uid)? {
            uids if uids.is_empty() => vec![DEFAULT_PROXY_UID],
            uids => uids,
        };
        let proxy_gids = match config::parse_gids(names.proxy_gid, &self.proxy_gid)? {
            gids if gids.is_empty() => proxy_uids.clone(),
            gids => gids,
        };
        let mode = self.interception_mode.parse::<InterceptionMode>()?;
        let tproxy = mode == InterceptionMode::Tproxy;
        let host_ipv4_loopback = match self.ipv4_loopback_cidr.as_str() {
            "" => CaptureConfig::default().host_ipv4_loopback,
            cidr => config::parse_loopback_cidr(cidr)?,
        };
        Ok(CaptureConfig {
            proxy_port: config::parse_port(names.proxy_port, &self.proxy_port)?,
            inbound_capture_port: config::parse_port(names.inbound_capture_port, &self.inbound_capture_port)?,
            inbound_tunnel_port: config::parse_port(names.inbound_tunnel_port, &self.inbound_tunnel_port)?,
            proxy_uids,
            proxy_gids,
            mode,
            inbound_ports: config::parse_inbound_ports(
                names.inbound_ports,
                &self.inbound_ports,
                names.exclude_inbound_ports,
                &self.exclude_inbound_ports,
            )?,
            outbound_ranges: config::parse_outbound_ranges(names.outbound_ranges, &self.outbound_ranges)?,
            outbound_ranges_exclude: config::parse_cidrs(names.exclude_outbound_ranges, &self.exclude_outbound_ranges)?,
            outbound_ports_include: config::parse_ports(names.outbound_ports, &self.outbound_ports)?,
            outbound_ports_exclude: config::parse_ports(names.exclude_outbound_ports, &self.exclude_outbound_ports)?,
            exclude_interfaces: config::parse_interfaces(names.exclude_interfaces, &self.exclude_interfaces)?,
            kube_virt_interfaces: config::parse_interfaces(names.kube_virt_interfaces, &self.kube_virt_interfaces)?,
            tproxy_mark: config::parse_tproxy_mark(names.tproxy_mark, &self.tproxy_mark, tproxy)?,
            tproxy_route_table: config::parse_tproxy_route_table(names.tproxy_route_table, &self.tproxy_route_table, tproxy)?,
            owner_groups: config::parse_owner_groups(
                self.owner_groups.as_deref(),
                &self.owner_groups_exclude,
                self.native_nftables,
            )?,
            dns: if self.redirect_dns && self.capture_all_dns { DnsCapture::All } else { DnsCapture::Off },
            drop_invalid: self.drop_invalid,
            ipv6: false,
            host_ipv4_loopback,
        })
    }

    /// The netfilter interface to program with.
    pub fn backend(&self, names: &SettingNames) -> Result<Backend, ConfigError> {
        if self.native_nftables {
            return Ok(Backend::Nftables);
        }
        let variant = match self.iptables_variant.as_str() {
            "" => None,
            v => Some(
                Variant::parse(v)
                    .ok_or_else(|| ConfigError::IptablesVariant { setting: names.iptables_variant, value: v.to_string() })?,
            ),
        };
        Ok(Backend::Iptables(IptablesOptions { variant }))
    }

    /// Whether DNS capture needs the pod's resolvers (only queries to them are captured).
    pub fn needs_dns_servers(&self) -> bool {
        self.redirect_dns && !self.capture_all_dns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InboundPorts, OutboundRanges};

    const NAMES: SettingNames = SettingNames::ISTIO_FLAGS;

    #[test]
    fn proxy_uid_and_gid_lists_of_only_commas_mean_the_defaults() {
        let cfg =
            Settings { proxy_uid: ",".into(), proxy_gid: ",,".into(), ..Settings::default() }.capture_config(&NAMES).unwrap();
        assert_eq!((cfg.proxy_uids, cfg.proxy_gids), (vec![DEFAULT_PROXY_UID], vec![DEFAULT_PROXY_UID]));
    }

    #[test]
    fn defaults_are_istios() {
        let cfg = Settings::default().capture_config(&NAMES).unwrap();
        assert_eq!(cfg, CaptureConfig::default());
    }

    #[test]
    fn gids_follow_uids_and_lists_parse() {
        let settings = Settings {
            proxy_uid: "7,8".into(),
            inbound_ports: "*".into(),
            exclude_inbound_ports: "15020,15021".into(),
            outbound_ranges: "10.0.0.0/8".into(),
            ..Settings::default()
        };
        let cfg = settings.capture_config(&NAMES).unwrap();
        assert_eq!(cfg.proxy_gids, vec![7, 8]);
        assert_eq!(cfg.inbound_ports, InboundPorts::All { except: vec![15020, 15021] });
        assert!(matches!(cfg.outbound_ranges, OutboundRanges::Only(v) if v.len() == 1));
    }

    #[test]
    fn errors_name_the_front_ends_setting() {
        let bad = |settings: Settings| settings.capture_config(&NAMES).unwrap_err().to_string();
        let err = bad(Settings { exclude_inbound_ports: "99999".into(), ..Settings::default() });
        assert!(err.starts_with("--istio-local-exclude-ports: \"99999\""), "{err}");
        let err = bad(Settings { exclude_outbound_ranges: "*".into(), ..Settings::default() });
        assert!(err.starts_with("--istio-service-exclude-cidr:"), "{err}");
        let err = Settings { iptables_variant: "x".into(), ..Settings::default() }.backend(&NAMES).unwrap_err();
        assert_eq!(err.to_string(), "--force-iptables-binary: \"x\" is not an iptables variant (expected legacy or nft)");
    }

    #[test]
    fn tproxy_refusals_name_the_front_ends_setting() {
        let tproxy = |mark: &str, table: &str| Settings {
            interception_mode: "TPROXY".into(),
            tproxy_mark: mark.into(),
            tproxy_route_table: table.into(),
            ..Settings::default()
        };
        let err = tproxy("0", "133").capture_config(&NAMES).unwrap_err().to_string();
        assert!(err.starts_with("--istio-inbound-tproxy-mark: mark 0"), "{err}");
        let err = tproxy("1337", "254").capture_config(&NAMES).unwrap_err().to_string();
        assert!(err.starts_with("--istio-inbound-tproxy-route-table: route table 254"), "{err}");
        let redirect = Settings { interception_mode: "REDIRECT".into(), ..tproxy("0", "254") };
        assert!(redirect.capture_config(&NAMES).is_ok(), "unused outside TPROXY mode");
    }

    #[test]
    fn owner_group_limit_follows_the_backend() {
        let groups = (1..=50).map(|g| g.to_string()).collect::<Vec<_>>().join(",");
        let settings = Settings { owner_groups: Some(groups), ..Settings::default() };
        assert!(settings.capture_config(&NAMES).is_err());
        assert!(Settings { native_nftables: true, ..settings }.capture_config(&NAMES).is_ok());
    }

    #[test]
    fn dns_modes() {
        let all = Settings { redirect_dns: true, capture_all_dns: true, ..Settings::default() };
        assert_eq!(all.capture_config(&NAMES).unwrap().dns, DnsCapture::All);
        assert!(!all.needs_dns_servers());
        let servers = Settings { redirect_dns: true, ..Settings::default() };
        assert!(servers.needs_dns_servers());
    }
}
