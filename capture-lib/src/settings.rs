//! Every capture setting, declared once: its names in each front end (istio-iptables flag and
//! environment variable, CNI key, Istio pod annotation), its defaults, its help text; and the
//! one function that turns the values users wrote into a validated [`CaptureConfig`].
//!
//! The istio-iptables command line, the CNI plugin's keys, the error messages and the
//! documentation are all derived from [`Setting::declaration`]. A value keeps the name it was
//! written under ([`Given::origin`]), so a refusal names exactly what the user wrote: the flag,
//! the environment variable, the CNI key or the annotation.
//!
//! Adding a capture setting: one entry in `declare_settings!` below, its field in
//! [`CaptureConfig`] and its line in [`Settings::capture_config`] (both in this file), its use
//! in `model/mod.rs`, and a test.

use crate::config::{
    self, Cidr, ConfigError, DnsCapture, InboundPorts, InterceptionMode, Interface, OutboundRanges, OwnerGroups,
};

/// The proxy UID when none is given (Istio's istio-proxy user).
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// The vocabularies settings are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// istio-iptables' long flags (`--envoy-port`).
    Flag,
    /// istio-iptables' environment variables (`INBOUND_CAPTURE_PORT`).
    Env,
    /// The CNI plugin's configuration keys (`proxyPort`), in the conflist, `runtimeConfig` or `CNI_ARGS`.
    CniKey,
    /// Istio's pod annotations (`traffic.sidecar.istio.io/excludeInboundPorts`).
    Annotation,
}

/// What kind of value a setting takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Istio-syntax text; the name shown for it in help (`PORT`, `CIDRS`, ...).
    Text(&'static str),
    /// A boolean in Go's syntax (`true`, `1`, `T`, ...); a bare flag means true.
    Bool,
}

/// One setting's names, defaults and help.
#[derive(Debug, Clone, Copy)]
pub struct Declaration {
    pub kind: Kind,
    /// istio-iptables' long flag, with its dashes; `None`: environment only.
    pub flag: Option<&'static str>,
    pub short: Option<char>,
    pub env: Option<&'static str>,
    /// A second variable that overrides `env` (but not the command line), as Istio reads them.
    pub env_override: Option<&'static str>,
    pub cni_key: Option<&'static str>,
    /// Istio's pod annotations for the setting, the one that wins first.
    pub annotations: &'static [&'static str],
    /// Istio's default (istio-iptables).
    pub default: &'static str,
    /// Istio CNI's default, where it differs (its sidecar_redirect.go).
    pub cni_default: Option<&'static str>,
    pub help: &'static str,
}

impl Declaration {
    const fn text(value_name: &'static str, default: &'static str, help: &'static str) -> Declaration {
        Declaration {
            kind: Kind::Text(value_name),
            flag: None,
            short: None,
            env: None,
            env_override: None,
            cni_key: None,
            annotations: &[],
            default,
            cni_default: None,
            help,
        }
    }

    const fn bool(help: &'static str) -> Declaration {
        Declaration { kind: Kind::Bool, ..Declaration::text("BOOL", "false", help) }
    }

    const fn flag(self, short: Option<char>, long: &'static str) -> Declaration {
        Declaration { short, flag: Some(long), ..self }
    }

    const fn env(self, var: &'static str) -> Declaration {
        Declaration { env: Some(var), ..self }
    }

    const fn env_override(self, var: &'static str) -> Declaration {
        Declaration { env_override: Some(var), ..self }
    }

    const fn cni(self, key: &'static str) -> Declaration {
        Declaration { cni_key: Some(key), ..self }
    }

    const fn cni_default(self, default: &'static str) -> Declaration {
        Declaration { cni_default: Some(default), ..self }
    }

    const fn annotations(self, names: &'static [&'static str]) -> Declaration {
        Declaration { annotations: names, ..self }
    }

    /// The setting's name in `front`, if it has one there.
    pub fn name(&self, front: Front) -> Option<&'static str> {
        match front {
            Front::Flag => self.flag,
            Front::Env => self.env,
            Front::CniKey => self.cni_key,
            Front::Annotation => self.annotations.first().copied(),
        }
    }
}

macro_rules! declare_settings {
    ($($setting:ident = $declaration:expr;)+) => {
        /// A capture setting (see the module docs).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Setting { $($setting),+ }

        impl Setting {
            /// Every setting, in the order help lists them.
            pub const ALL: &'static [Setting] = &[$(Setting::$setting),+];

            pub fn declaration(self) -> &'static Declaration {
                match self {
                    $(Setting::$setting => {
                        const DECLARATION: Declaration = $declaration;
                        &DECLARATION
                    })+
                }
            }
        }
    };
}

declare_settings! {
    ProxyPort = Declaration::text("PORT", "15001", "Port the proxy's outbound listener uses: outbound TCP is redirected here")
        .flag(Some('p'), "--envoy-port")
        .cni("proxyPort");
    InboundCapturePort = Declaration::text("PORT", "15006", "Port inbound TCP is redirected to (REDIRECT) or delivered to (TPROXY)")
        .flag(Some('z'), "--inbound-capture-port")
        .env("INBOUND_CAPTURE_PORT")
        .cni("inboundCapturePort");
    InboundTunnelPort = Declaration::text("PORT", "15008", "HBONE tunnel port: never captured inbound")
        .flag(Some('e'), "--inbound-tunnel-port")
        .env("INBOUND_TUNNEL_PORT")
        .cni("inboundTunnelPort");
    ProxyUid = Declaration::text(
        "UIDS",
        "",
        "Comma list of UIDs (or user names) whose traffic is the proxy's and never captured \
         [default: UID of $ENVOY_USER, else 1337]",
    )
        .flag(Some('u'), "--proxy-uid")
        .env("PROXY_UID")
        .cni("proxyUID");
    ProxyGid = Declaration::text("GIDS", "", "Comma list of GIDs (or group names) whose traffic is never captured [default: the proxy UIDs]")
        .flag(Some('g'), "--proxy-gid")
        .env("PROXY_GID")
        .cni("proxyGID");
    InterceptionMode = Declaration::text("MODE", "REDIRECT", "Inbound interception mode: REDIRECT or TPROXY")
        .flag(Some('m'), "--istio-inbound-interception-mode")
        .env("ISTIO_INBOUND_INTERCEPTION_MODE")
        .cni("interceptionMode")
        .annotations(&["sidecar.istio.io/interceptionMode"]);
    InboundPorts = Declaration::text("PORTS", "", "Inbound ports to capture: '*' for all, a comma list, or empty for none")
        .flag(Some('b'), "--istio-inbound-ports")
        .env("ISTIO_INBOUND_PORTS")
        .cni("inboundPorts")
        .cni_default("*")
        .annotations(&["traffic.sidecar.istio.io/includeInboundPorts"]);
    ExcludeInboundPorts = Declaration::text("PORTS", "", "Inbound ports never captured (only used with -b '*')")
        .flag(Some('d'), "--istio-local-exclude-ports")
        .env("ISTIO_LOCAL_EXCLUDE_PORTS")
        .cni("excludeInboundPorts")
        .annotations(&["traffic.sidecar.istio.io/excludeInboundPorts"]);
    ExcludeInterfaces = Declaration::text("IFACES", "", "Interfaces whose traffic is never captured, either way")
        .flag(Some('c'), "--istio-exclude-interfaces")
        .env("ISTIO_EXCLUDE_INTERFACES")
        .cni("excludeInterfaces")
        .annotations(&["traffic.sidecar.istio.io/excludeInterfaces"]);
    OutboundRanges = Declaration::text(
        "CIDRS",
        "",
        "Outbound destinations to capture: '*' for all, comma CIDRs (IPv4 and IPv6), or empty for none",
    )
        .flag(Some('i'), "--istio-service-cidr")
        .env("ISTIO_SERVICE_CIDR")
        .cni("outboundIPRanges")
        .cni_default("*")
        .annotations(&["traffic.sidecar.istio.io/includeOutboundIPRanges"]);
    ExcludeOutboundRanges = Declaration::text("CIDRS", "", "Outbound destinations never captured (comma CIDRs; '*' is refused)")
        .flag(Some('x'), "--istio-service-exclude-cidr")
        .env("ISTIO_SERVICE_EXCLUDE_CIDR")
        .cni("excludeOutboundIPRanges")
        .annotations(&["traffic.sidecar.istio.io/excludeOutboundIPRanges"]);
    OutboundPorts = Declaration::text("PORTS", "", "Outbound TCP ports always captured, whatever the destination")
        .flag(Some('q'), "--istio-outbound-ports")
        .env("ISTIO_OUTBOUND_PORTS")
        .cni("outboundPorts")
        .annotations(&["traffic.sidecar.istio.io/includeOutboundPorts"]);
    ExcludeOutboundPorts = Declaration::text("PORTS", "", "Outbound TCP and UDP ports never captured")
        .flag(Some('o'), "--istio-local-outbound-ports-exclude")
        .env("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE")
        .cni("excludeOutboundPorts")
        .cni_default("15020")
        .annotations(&["traffic.sidecar.istio.io/excludeOutboundPorts"]);
    KubeVirtInterfaces = Declaration::text("IFACES", "", "Virtual interfaces (KubeVirt) whose inbound traffic is treated as outbound")
        .flag(Some('k'), "--kube-virt-interfaces")
        .env("KUBE_VIRT_INTERFACES")
        .cni("kubeVirtInterfaces")
        .annotations(&["istio.io/reroute-virtual-interfaces", "traffic.sidecar.istio.io/kubevirtInterfaces"]);
    TproxyMark = Declaration::text("MARK", "1337", "Packet mark for TPROXY")
        .flag(Some('t'), "--istio-inbound-tproxy-mark")
        .env("ISTIO_INBOUND_TPROXY_MARK")
        .cni("tproxyMark");
    TproxyRouteTable = Declaration::text("TABLE", "133", "Policy-routing table for TPROXY")
        .flag(Some('r'), "--istio-inbound-tproxy-route-table")
        .env("ISTIO_INBOUND_TPROXY_ROUTE_TABLE")
        .cni("tproxyRouteTable");
    RedirectDns = Declaration::bool("Capture DNS to the agent on port 15053")
        .flag(None, "--redirect-dns")
        .env("REDIRECT_DNS")
        .env_override("ISTIO_META_DNS_CAPTURE")
        .cni("redirectDNS");
    CaptureAllDns = Declaration::bool("Capture all port-53 traffic, not only traffic to the resolv.conf servers")
        .flag(None, "--capture-all-dns")
        .env("CAPTURE_ALL_DNS")
        .cni("captureAllDNS");
    DropInvalid = Declaration::bool("Drop conntrack-INVALID packets")
        .flag(None, "--drop-invalid")
        .env("DROP_INVALID")
        .env_override("INVALID_DROP")
        .cni("dropInvalid");
    DualStack = Declaration::bool("Program IPv6 whenever the pod has an IPv6 address")
        .flag(None, "--dual-stack")
        .env("DUAL_STACK")
        .env_override("ISTIO_DUAL_STACK")
        .cni("dualStack");
    NativeNftables = Declaration::bool("Use native nftables (netlink, one transaction) instead of iptables")
        .flag(None, "--native-nftables")
        .env("NATIVE_NFTABLES")
        .cni("nativeNftables");
    UseIpSets = Declaration::bool(
        "Match the port and CIDR lists through kernel sets (nftables sets, or ip sets with iptables), one rule per \
         list instead of one per entry: the same decisions, at a cost per connection that does not grow with the lists",
    )
        .flag(None, "--use-ip-sets")
        .env("USE_IP_SETS")
        .cni("useIPSets");
    IptablesVariant = Declaration::text(
        "VARIANT",
        "",
        "iptables variant to use: legacy or nft [default: legacy only if it already holds rules, else nft]",
    )
        .flag(None, "--force-iptables-binary")
        .env("FORCE_IPTABLES_BINARY")
        .cni("forceIptablesBinary");
    OwnerGroups = Declaration::text("GROUPS", "*", "Groups (names or GIDs) whose outbound traffic is captured")
        .env("ISTIO_OUTBOUND_OWNER_GROUPS");
    OwnerGroupsExclude = Declaration::text("GROUPS", "", "Groups whose outbound traffic is not captured (with the default '*')")
        .env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE");
    Ipv4LoopbackCidr = Declaration::text("CIDR", "127.0.0.1/32", "IPv4 range treated as local")
        .env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR");
}

impl Setting {
    /// The setting `front` calls `name`.
    pub fn named(front: Front, name: &str) -> Option<Setting> {
        Setting::ALL.iter().copied().find(|s| {
            let d = s.declaration();
            match front {
                Front::Annotation => d.annotations.contains(&name),
                Front::Env => d.env == Some(name) || d.env_override == Some(name),
                _ => d.name(front) == Some(name),
            }
        })
    }

    /// Every name users know it by, for messages every front end shows (`--native-nftables,
    /// NATIVE_NFTABLES or CNI key nativeNftables`).
    pub fn known_as(self) -> String {
        let d = self.declaration();
        let mut names: Vec<String> = [d.flag, d.env].into_iter().flatten().map(str::to_string).collect();
        names.extend(d.cni_key.map(|key| format!("CNI key {key}")));
        match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }

    /// How a user of `front` refers to it; an environment-only setting by its variable.
    pub fn name(self, front: Front) -> &'static str {
        let d = self.declaration();
        d.name(front).or(d.env).unwrap_or_default()
    }
}

/// A value as a user wrote it, and the name it was written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    pub text: String,
    /// The flag, environment variable, CNI key or annotation that held it.
    pub origin: &'static str,
}

/// The values of one run, in Istio's syntax, each with its origin; unset settings take the
/// front end's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Whose defaults apply and how unset settings are named in errors.
    front: Front,
    given: Vec<Option<Given>>,
}

impl Settings {
    /// No value given: Istio's defaults for `front` (Istio CNI's for [`Front::CniKey`] and
    /// [`Front::Annotation`]).
    pub fn new(front: Front) -> Settings {
        Settings { front, given: vec![None; Setting::ALL.len()] }
    }

    /// Sets `setting` to `text`, written under the name `origin`.
    pub fn set(&mut self, setting: Setting, text: impl Into<String>, origin: &'static str) {
        self.given[setting as usize] = Some(Given { text: text.into(), origin });
    }

    /// Sets the setting `front` calls `name`; `None` when it has no such setting.
    pub fn set_named(&mut self, front: Front, name: &str, text: impl Into<String>) -> Option<Setting> {
        let setting = Setting::named(front, name)?;
        let d = setting.declaration();
        let origin = [d.flag, d.env, d.env_override, d.cni_key]
            .into_iter()
            .flatten()
            .chain(d.annotations.iter().copied())
            .find(|known| *known == name)?;
        self.set(setting, text, origin);
        Some(setting)
    }

    /// The value given, if any.
    pub fn given(&self, setting: Setting) -> Option<&Given> {
        self.given[setting as usize].as_ref()
    }

    /// The value given, or the default.
    pub fn text(&self, setting: Setting) -> &str {
        match self.given(setting) {
            Some(given) => &given.text,
            None => self.default(setting),
        }
    }

    /// The front end's default for `setting`.
    pub fn default(&self, setting: Setting) -> &'static str {
        let d = setting.declaration();
        match self.front {
            Front::CniKey | Front::Annotation => d.cni_default.unwrap_or(d.default),
            Front::Flag | Front::Env => d.default,
        }
    }

    /// What errors call `setting`: the name its value was written under, else the front end's.
    pub fn name(&self, setting: Setting) -> &'static str {
        self.given(setting).map_or_else(|| setting.name(self.front), |given| given.origin)
    }

    /// A boolean setting.
    pub fn flag(&self, setting: Setting) -> Result<bool, ConfigError> {
        let text = self.text(setting);
        go_syntax::parse_bool(text).map_err(|_| ConfigError::Bool { setting: self.name(setting), value: text.to_string() })
    }

    fn port(&self, setting: Setting) -> Result<u16, ConfigError> {
        config::parse_port(self.name(setting), self.text(setting))
    }

    fn ports(&self, setting: Setting) -> Result<Vec<u16>, ConfigError> {
        config::parse_ports(self.name(setting), self.text(setting))
    }

    fn interfaces(&self, setting: Setting) -> Result<Vec<Interface>, ConfigError> {
        config::parse_interfaces(self.name(setting), self.text(setting))
    }

    /// Validates every setting; reads nothing from the namespace, so `ipv6` is left false
    /// and DNS capture limited to the pod's resolvers is left off for the caller to complete.
    pub fn capture_config(&self) -> Result<CaptureConfig, ConfigError> {
        use Setting as S;
        // A list of only commas (`-u ,`) is as empty as `""`: with no proxy UID at all the
        // proxy's own traffic would be captured, and raw OUTPUT would jump to an empty chain.
        let proxy_uids = match config::parse_uids(self.name(S::ProxyUid), self.text(S::ProxyUid))? {
            uids if uids.is_empty() => vec![DEFAULT_PROXY_UID],
            uids => uids,
        };
        let proxy_gids = match config::parse_gids(self.name(S::ProxyGid), self.text(S::ProxyGid))? {
            gids if gids.is_empty() => proxy_uids.clone(),
            gids => gids,
        };
        let mode = config::parse_mode(self.name(S::InterceptionMode), self.text(S::InterceptionMode))?;
        let tproxy = mode == InterceptionMode::Tproxy;
        let host_ipv4_loopback = match self.text(S::Ipv4LoopbackCidr) {
            "" => config::parse_loopback_cidr(S::Ipv4LoopbackCidr.name(self.front), self.default(S::Ipv4LoopbackCidr))?,
            cidr => config::parse_loopback_cidr(self.name(S::Ipv4LoopbackCidr), cidr)?,
        };
        let owner_groups = config::parse_owner_groups(
            self.name(S::OwnerGroups),
            self.text(S::OwnerGroups),
            self.name(S::OwnerGroupsExclude),
            self.text(S::OwnerGroupsExclude),
            self.flag(S::NativeNftables)?,
        )?;
        Ok(CaptureConfig {
            proxy_port: self.port(S::ProxyPort)?,
            inbound_capture_port: self.port(S::InboundCapturePort)?,
            inbound_tunnel_port: self.port(S::InboundTunnelPort)?,
            proxy_uids,
            proxy_gids,
            mode,
            inbound_ports: config::parse_inbound_ports(
                self.name(S::InboundPorts),
                self.text(S::InboundPorts),
                self.name(S::ExcludeInboundPorts),
                self.text(S::ExcludeInboundPorts),
            )?,
            outbound_ranges: config::parse_outbound_ranges(self.name(S::OutboundRanges), self.text(S::OutboundRanges))?,
            outbound_ranges_exclude: config::parse_cidrs(
                self.name(S::ExcludeOutboundRanges),
                self.text(S::ExcludeOutboundRanges),
            )?,
            outbound_ports_include: self.ports(S::OutboundPorts)?,
            outbound_ports_exclude: self.ports(S::ExcludeOutboundPorts)?,
            exclude_interfaces: self.interfaces(S::ExcludeInterfaces)?,
            kube_virt_interfaces: self.interfaces(S::KubeVirtInterfaces)?,
            tproxy_mark: config::parse_tproxy_mark(self.name(S::TproxyMark), self.text(S::TproxyMark), tproxy)?,
            tproxy_route_table: config::parse_tproxy_route_table(
                self.name(S::TproxyRouteTable),
                self.text(S::TproxyRouteTable),
                tproxy,
            )?,
            owner_groups,
            dns: if self.flag(S::RedirectDns)? && self.flag(S::CaptureAllDns)? { DnsCapture::All } else { DnsCapture::Off },
            drop_invalid: self.flag(S::DropInvalid)?,
            use_sets: self.flag(S::UseIpSets)?,
            ipv6: false,
            host_ipv4_loopback,
        })
    }

    /// Whether DNS capture needs the pod's resolvers (only queries to them are captured).
    pub fn needs_dns_servers(&self) -> Result<bool, ConfigError> {
        Ok(self.flag(Setting::RedirectDns)? && !self.flag(Setting::CaptureAllDns)?)
    }
}

/// Everything the rule model needs, already validated: built by [`Settings::capture_config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Outbound capture target (`-p`, 15001).
    pub proxy_port: u16,
    /// Inbound capture target (`-z`, 15006).
    pub inbound_capture_port: u16,
    /// HBONE tunnel port, never captured (`-e`, 15008).
    pub inbound_tunnel_port: u16,
    /// Owners whose traffic is the proxy's own and so never captured (`-u`, `-g`).
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub mode: InterceptionMode,
    pub inbound_ports: InboundPorts,
    pub outbound_ranges: OutboundRanges,
    pub outbound_ranges_exclude: Vec<Cidr>,
    /// Destination ports always captured, whatever the address (`-q`).
    pub outbound_ports_include: Vec<u16>,
    /// Destination ports never captured (`-o`).
    pub outbound_ports_exclude: Vec<u16>,
    pub exclude_interfaces: Vec<Interface>,
    /// Interfaces whose inbound traffic is treated as outbound (`-k`).
    pub kube_virt_interfaces: Vec<Interface>,
    pub tproxy_mark: u32,
    pub tproxy_route_table: u32,
    pub owner_groups: OwnerGroups,
    pub dns: DnsCapture,
    pub drop_invalid: bool,
    /// Match the lists through sets (`--use-ip-sets`), not one rule per entry.
    pub use_sets: bool,
    /// Program IPv6 too (derived from the pod's addresses).
    pub ipv6: bool,
    /// What counts as "local" for IPv4 (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`).
    pub host_ipv4_loopback: Cidr,
}

impl Default for CaptureConfig {
    /// Istio's defaults: what istio-iptables does with no flag and no environment.
    fn default() -> Self {
        Settings::new(Front::Flag).capture_config().expect("the declared defaults are valid")
    }
}

impl CaptureConfig {
    /// True when TPROXY inbound capture is active, which needs policy routing.
    pub fn needs_tproxy_routes(&self) -> bool {
        self.mode == InterceptionMode::Tproxy && self.inbound_ports != InboundPorts::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv4Addr};

    /// Istio's IPv4 loopback, the default of [`CaptureConfig::host_ipv4_loopback`].
    fn localhost() -> Cidr {
        Cidr::host(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    fn istio(pairs: &[(Setting, &str)]) -> Settings {
        let mut settings = Settings::new(Front::Flag);
        for (setting, text) in pairs {
            settings.set(*setting, *text, setting.name(Front::Flag));
        }
        settings
    }

    #[test]
    fn names_are_unique_in_each_front_end() {
        for front in [Front::Flag, Front::Env, Front::CniKey, Front::Annotation] {
            let mut seen = HashSet::new();
            for setting in Setting::ALL {
                let d = setting.declaration();
                let names: Vec<&str> = match front {
                    Front::Annotation => d.annotations.to_vec(),
                    Front::Env => d.env.into_iter().chain(d.env_override).collect(),
                    _ => d.name(front).into_iter().collect(),
                };
                for name in names {
                    assert!(seen.insert(name), "{name} names two settings");
                    assert_eq!(Setting::named(front, name), Some(*setting));
                }
            }
        }
        let shorts: Vec<char> = Setting::ALL.iter().filter_map(|s| s.declaration().short).collect();
        assert_eq!(shorts.len(), shorts.iter().collect::<HashSet<_>>().len());
    }

    #[test]
    fn every_setting_has_a_name_in_each_front_end_it_is_read_from() {
        for setting in Setting::ALL {
            assert!(!setting.name(Front::Flag).is_empty(), "{setting:?}");
            assert!(!setting.declaration().help.is_empty(), "{setting:?}");
        }
        assert_eq!(Setting::ProxyPort.name(Front::Flag), "--envoy-port");
        assert_eq!(Setting::OwnerGroups.name(Front::Flag), "ISTIO_OUTBOUND_OWNER_GROUPS");
        assert_eq!(Setting::ExcludeInboundPorts.name(Front::CniKey), "excludeInboundPorts");
        assert_eq!(Setting::NativeNftables.known_as(), "--native-nftables, NATIVE_NFTABLES or CNI key nativeNftables");
        assert_eq!(Setting::OwnerGroups.known_as(), "ISTIO_OUTBOUND_OWNER_GROUPS");
    }

    #[test]
    fn proxy_uid_and_gid_lists_of_only_commas_mean_the_defaults() {
        let cfg = istio(&[(Setting::ProxyUid, ","), (Setting::ProxyGid, ",,")]).capture_config().unwrap();
        assert_eq!((cfg.proxy_uids, cfg.proxy_gids), (vec![DEFAULT_PROXY_UID], vec![DEFAULT_PROXY_UID]));
    }

    #[test]
    fn defaults_are_istios() {
        let cfg = CaptureConfig::default();
        assert_eq!((cfg.proxy_port, cfg.inbound_capture_port, cfg.inbound_tunnel_port), (15001, 15006, 15008));
        assert_eq!((cfg.proxy_uids, cfg.proxy_gids), (vec![1337], vec![1337]));
        assert_eq!((cfg.tproxy_mark, cfg.tproxy_route_table), (1337, 133));
        assert_eq!((cfg.inbound_ports, cfg.outbound_ranges), (InboundPorts::None, OutboundRanges::None));
        assert_eq!(cfg.host_ipv4_loopback, localhost());
        assert_eq!(cfg.owner_groups, OwnerGroups::AllExcept(vec![]));
        let cni = Settings::new(Front::CniKey).capture_config().unwrap();
        assert_eq!((cni.inbound_ports, cni.outbound_ranges), (InboundPorts::All { except: vec![] }, OutboundRanges::All));
        assert_eq!(cni.outbound_ports_exclude, vec![15020]);
    }

    #[test]
    fn gids_follow_uids_and_lists_parse() {
        let settings = istio(&[
            (Setting::ProxyUid, "7,8"),
            (Setting::InboundPorts, "*"),
            (Setting::ExcludeInboundPorts, "15020,15021"),
            (Setting::OutboundRanges, "10.0.0.0/8"),
        ]);
        let cfg = settings.capture_config().unwrap();
        assert_eq!(cfg.proxy_gids, vec![7, 8]);
        assert_eq!(cfg.inbound_ports, InboundPorts::All { except: vec![15020, 15021] });
        assert!(matches!(cfg.outbound_ranges, OutboundRanges::Only(v) if v.len() == 1));
    }

    #[test]
    fn errors_name_what_the_user_wrote() {
        let bad = |settings: Settings| settings.capture_config().unwrap_err().to_string();
        let err = bad(istio(&[(Setting::ExcludeInboundPorts, "99999")]));
        assert!(err.starts_with("--istio-local-exclude-ports: \"99999\""), "{err}");
        let mut from_env = Settings::new(Front::Flag);
        from_env.set_named(Front::Env, "ISTIO_SERVICE_EXCLUDE_CIDR", "*").unwrap();
        assert!(bad(from_env).starts_with("ISTIO_SERVICE_EXCLUDE_CIDR:"));
        let mut annotated = Settings::new(Front::CniKey);
        annotated.set_named(Front::Annotation, "traffic.sidecar.istio.io/excludeOutboundPorts", "http").unwrap();
        assert!(bad(annotated).starts_with("traffic.sidecar.istio.io/excludeOutboundPorts: \"http\""));
        let mode = bad(istio(&[(Setting::InterceptionMode, "tproxy")]));
        assert!(mode.starts_with("--istio-inbound-interception-mode: \"tproxy\""), "{mode}");
        let flag = bad(istio(&[(Setting::DropInvalid, "maybe")]));
        assert_eq!(flag, "--drop-invalid: \"maybe\" is not a boolean (expected true or false, 1 or 0, t or f)");
        assert_eq!(Settings::new(Front::CniKey).set_named(Front::CniKey, "no-such-key", "1"), None);
    }

    #[test]
    fn tproxy_refusals_name_the_front_ends_setting() {
        let tproxy = |mark: &str, table: &str| {
            istio(&[(Setting::InterceptionMode, "TPROXY"), (Setting::TproxyMark, mark), (Setting::TproxyRouteTable, table)])
        };
        let err = tproxy("0", "133").capture_config().unwrap_err().to_string();
        assert!(err.starts_with("--istio-inbound-tproxy-mark: mark 0"), "{err}");
        let err = tproxy("1337", "254").capture_config().unwrap_err().to_string();
        assert!(err.starts_with("--istio-inbound-tproxy-route-table: route table 254"), "{err}");
        let mut redirect = tproxy("0", "254");
        redirect.set(Setting::InterceptionMode, "REDIRECT", "-m");
        assert!(redirect.capture_config().is_ok(), "unused outside TPROXY mode");
    }

    #[test]
    fn owner_group_limit_follows_the_backend() {
        let groups = (1..=50).map(|g| g.to_string()).collect::<Vec<_>>().join(",");
        let mut settings = istio(&[(Setting::OwnerGroups, &groups)]);
        let err = settings.capture_config().unwrap_err().to_string();
        assert!(err.starts_with("ISTIO_OUTBOUND_OWNER_GROUPS: 50 owner groups given, at most 49"), "{err}");
        settings.set(Setting::NativeNftables, "true", "--native-nftables");
        assert!(settings.capture_config().is_ok());
    }

    #[test]
    fn dns_modes() {
        let all = istio(&[(Setting::RedirectDns, "true"), (Setting::CaptureAllDns, "1")]);
        assert_eq!(all.capture_config().unwrap().dns, DnsCapture::All);
        assert!(!all.needs_dns_servers().unwrap());
        assert!(istio(&[(Setting::RedirectDns, "T")]).needs_dns_servers().unwrap());
    }

    #[test]
    fn an_empty_loopback_cidr_is_the_default() {
        let cfg = istio(&[(Setting::Ipv4LoopbackCidr, "")]).capture_config().unwrap();
        assert_eq!(cfg.host_ipv4_loopback, localhost());
        let err = istio(&[(Setting::Ipv4LoopbackCidr, "10.0.0.0/8")]).capture_config().unwrap_err().to_string();
        assert!(err.starts_with("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: \"10.0.0.0/8\""), "{err}");
    }
}
