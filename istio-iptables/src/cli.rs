//! Istio's istio-iptables command line: same long names, short letters, environment
//! variables and defaults, turned into a typed capture request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capture_lib::capture::{Backend, Operation, Request};
use capture_lib::config::{self, CaptureConfig, ConfigError, DnsCapture};
use capture_lib::namespace::{self, NamespaceError};
use capture_lib::settings::{SettingNames, Settings, DEFAULT_PROXY_UID};
use capture_lib::validation::Probe;
use clap::parser::ValueSource;
use clap::{ArgMatches, Parser};
use go_syntax::{parse_bool, parse_duration};

use crate::log::LogFlags;

const ABOUT: &str = "Programs a pod's network namespace so that its TCP traffic goes through the \
sidecar proxy: a drop-in replacement for Istio's istio-iptables (pilot-agent istio-iptables).";

const AFTER_HELP: &str = "\
Every flag can also be set through the environment variable shown; a flag on the command line wins.
Environment-only settings:
  ISTIO_OUTBOUND_OWNER_GROUPS          groups (names or GIDs) whose outbound traffic is captured [default: *]
  ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE  groups whose outbound traffic is not captured (with the default '*')
  ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR    IPv4 range treated as local [default: 127.0.0.1/32]
  ENVOY_USER                           user whose UID is the proxy UID when -u is empty [default: istio-proxy]
  ISTIO_META_DNS_CAPTURE, INVALID_DROP, ISTIO_DUAL_STACK override REDIRECT_DNS, DROP_INVALID, DUAL_STACK.

The word istio-iptables as the first argument is accepted and skipped: Istio's injector writes the arguments
for pilot-agent, whose subcommand it is (args: [istio-iptables, -p, 15001, ...]).

Exit status: 0 done, 1 failure (nothing half-applied), 2 usage error, 126 validation failure.
Example (the standard sidecar setup):
  istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x \"\" -b '*' -d 15090,15021,15020";

#[derive(Debug, Parser)]
#[command(name = "istio-iptables", version, about = ABOUT, after_help = AFTER_HELP, args_override_self = true)]
pub struct Cli {
    /// Port the proxy's outbound listener uses: outbound TCP is redirected here.
    #[arg(short = 'p', long = "envoy-port", default_value = "15001", value_name = "PORT")]
    pub envoy_port: String,
    /// Port inbound TCP is redirected to (REDIRECT) or delivered to (TPROXY).
    #[arg(short = 'z', long, env = "INBOUND_CAPTURE_PORT", default_value = "15006", value_name = "PORT")]
    pub inbound_capture_port: String,
    /// HBONE tunnel port: never captured inbound.
    #[arg(short = 'e', long, env = "INBOUND_TUNNEL_PORT", default_value = "15008", value_name = "PORT")]
    pub inbound_tunnel_port: String,
    /// Comma list of UIDs (or user names) whose traffic is the proxy's and never captured
    /// [default: UID of $ENVOY_USER, else 1337].
    #[arg(short = 'u', long, env = "PROXY_UID", default_value = "", hide_default_value = true, value_name = "UIDS")]
    pub proxy_uid: String,
    /// Comma list of GIDs (or group names) whose traffic is never captured [default: the proxy UIDs].
    #[arg(short = 'g', long, env = "PROXY_GID", default_value = "", hide_default_value = true, value_name = "GIDS")]
    pub proxy_gid: String,
    /// Inbound interception mode: REDIRECT or TPROXY.
    #[arg(short = 'm', long, env = "ISTIO_INBOUND_INTERCEPTION_MODE", default_value = "REDIRECT", value_name = "MODE")]
    pub istio_inbound_interception_mode: String,
    /// Inbound ports to capture: '*' for all, a comma list, or empty for none.
    #[arg(short = 'b', long, env = "ISTIO_INBOUND_PORTS", default_value = "", value_name = "PORTS")]
    pub istio_inbound_ports: String,
    /// Inbound ports never captured (only used with -b '*').
    #[arg(short = 'd', long, env = "ISTIO_LOCAL_EXCLUDE_PORTS", default_value = "", value_name = "PORTS")]
    pub istio_local_exclude_ports: String,
    /// Interfaces whose traffic is never captured, either way.
    #[arg(short = 'c', long, env = "ISTIO_EXCLUDE_INTERFACES", default_value = "", value_name = "IFACES")]
    pub istio_exclude_interfaces: String,
    /// Outbound destinations to capture: '*' for all, comma CIDRs (IPv4 and IPv6), or empty for none.
    #[arg(short = 'i', long, env = "ISTIO_SERVICE_CIDR", default_value = "", value_name = "CIDRS")]
    pub istio_service_cidr: String,
    /// Outbound destinations never captured (comma CIDRs; '*' is refused).
    #[arg(short = 'x', long, env = "ISTIO_SERVICE_EXCLUDE_CIDR", default_value = "", value_name = "CIDRS")]
    pub istio_service_exclude_cidr: String,
    /// Outbound TCP ports always captured, whatever the destination.
    #[arg(short = 'q', long, env = "ISTIO_OUTBOUND_PORTS", default_value = "", value_name = "PORTS")]
    pub istio_outbound_ports: String,
    /// Outbound TCP and UDP ports never captured.
    #[arg(short = 'o', long, env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", default_value = "", value_name = "PORTS")]
    pub istio_local_outbound_ports_exclude: String,
    /// Virtual interfaces (KubeVirt) whose inbound traffic is treated as outbound.
    #[arg(short = 'k', long, env = "KUBE_VIRT_INTERFACES", default_value = "", value_name = "IFACES")]
    pub kube_virt_interfaces: String,
    /// Packet mark for TPROXY.
    #[arg(short = 't', long, env = "ISTIO_INBOUND_TPROXY_MARK", default_value = "1337", value_name = "MARK")]
    pub istio_inbound_tproxy_mark: String,
    /// Policy-routing table for TPROXY.
    #[arg(short = 'r', long, env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", default_value = "133", value_name = "TABLE")]
    pub istio_inbound_tproxy_route_table: String,
    /// Print what would be changed and change nothing.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub dry_run: bool,
    /// Original destination port the validation probe dials.
    #[arg(long, env = "IPTABLES_PROBE_PORT", default_value = "15002", value_name = "PORT")]
    pub iptables_probe_port: String,
    /// How long validation may take.
    #[arg(long, env = "PROBE_TIMEOUT", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub probe_timeout: Duration,
    /// Program nothing (validation only).
    #[arg(long = "skip-rule-apply", env = "SKIP_RULE_APPLY", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub skip_rule_apply: bool,
    /// After programming, prove that redirection works (exit 126 if not).
    #[arg(long = "run-validation", env = "RUN_VALIDATION", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub run_validation: bool,
    /// Capture DNS to the agent on port 15053 (overridden by ISTIO_META_DNS_CAPTURE).
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub redirect_dns: bool,
    /// Capture all port-53 traffic, not only traffic to the resolv.conf servers.
    #[arg(long = "capture-all-dns", env = "CAPTURE_ALL_DNS", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub capture_all_dns: bool,
    /// Drop conntrack-INVALID packets (overridden by INVALID_DROP).
    #[arg(long = "drop-invalid", env = "DROP_INVALID", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub drop_invalid: bool,
    /// Program IPv6 whenever the pod has an IPv6 address (overridden by ISTIO_DUAL_STACK).
    #[arg(long = "dual-stack", env = "DUAL_STACK", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub dual_stack: bool,
    /// Network namespace to program (e.g. /proc/PID/ns/net or /var/run/netns/NAME): the tool enters it first.
    #[arg(long, env = "NETWORK_NAMESPACE", default_value = "", value_name = "PATH")]
    pub network_namespace: String,
    /// Running on behalf of a CNI plugin (accepted for compatibility).
    #[arg(long = "cni-mode", env = "CNI_MODE", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub cni_mode: bool,
    /// Replace drifted rules atomically instead of failing.
    #[arg(long = "reconcile", env = "RECONCILE", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub reconcile: bool,
    /// Remove everything this tool added, then stop.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub cleanup_only: bool,
    /// Rewrite the rules even when they look up to date.
    #[arg(long = "force-apply", env = "FORCE_APPLY", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub force_apply: bool,
    /// Use native nftables (netlink, one transaction) instead of iptables.
    #[arg(long = "native-nftables", env = "NATIVE_NFTABLES", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub native_nftables: bool,
    /// iptables variant to use: legacy or nft [default: legacy only if it already holds rules, else nft].
    #[arg(long, env = "FORCE_IPTABLES_BINARY", default_value = "", hide_default_value = true, value_name = "VARIANT")]
    pub force_iptables_binary: String,
    /// How long to wait for the xtables lock, or for another capture run on this namespace.
    #[arg(long, env = "IPTABLES_LOCK_WAIT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub iptables_lock_wait: Duration,
    #[command(flatten)]
    pub log: LogFlags,
}

/// A bad value in a flag or the environment.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{var}: {value:?} is not a boolean")]
    EnvBool { var: &'static str, value: String },
    #[error(
        "--redirect-dns captures DNS to the pod's own nameservers, read from its resolv.conf, and \
         --network-namespace {0:?} leads to no process whose files hold it (a /proc/PID/ns/net path does): \
         add --capture-all-dns to capture all DNS traffic, or give the namespace of a pod process as /proc/PID/ns/net"
    )]
    NoPodResolvConf(String),
}

/// A failure reading the environment Istio derives settings from.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
}

impl Cli {
    /// An additional variable (e.g. ISTIO_META_DNS_CAPTURE) overrides the flag's own
    /// variable, but not the command line.
    pub fn apply_env_overrides(&mut self, matches: &ArgMatches) -> Result<(), UsageError> {
        let overrides: [(&str, &'static str, &mut bool); 3] = [
            ("redirect_dns", "ISTIO_META_DNS_CAPTURE", &mut self.redirect_dns),
            ("drop_invalid", "INVALID_DROP", &mut self.drop_invalid),
            ("dual_stack", "ISTIO_DUAL_STACK", &mut self.dual_stack),
        ];
        for (id, var, field) in overrides {
            if matches.value_source(id) == Some(ValueSource::CommandLine) {
                continue;
            }
            if let Ok(value) = std::env::var(var) {
                *field = parse_bool(&value).map_err(|_| UsageError::EnvBool { var, value })?;
            }
        }
        Ok(())
    }

    pub fn namespace_path(&self) -> Option<PathBuf> {
        (!self.network_namespace.is_empty()).then(|| PathBuf::from(&self.network_namespace))
    }

    pub fn operation(&self) -> Operation {
        if self.cleanup_only {
            Operation::Cleanup
        } else {
            Operation::Apply { reconcile: self.reconcile, force: self.force_apply }
        }
    }

    /// The flags and Istio's environment-only knobs, in Istio's syntax.
    pub fn settings(&self) -> Settings {
        let env = |var: &str| std::env::var(var).ok();
        Settings {
            proxy_port: self.envoy_port.clone(),
            inbound_capture_port: self.inbound_capture_port.clone(),
            inbound_tunnel_port: self.inbound_tunnel_port.clone(),
            proxy_uid: if self.proxy_uid.is_empty() { envoy_user_uid() } else { self.proxy_uid.clone() },
            proxy_gid: self.proxy_gid.clone(),
            interception_mode: self.istio_inbound_interception_mode.clone(),
            inbound_ports: self.istio_inbound_ports.clone(),
            exclude_inbound_ports: self.istio_local_exclude_ports.clone(),
            outbound_ranges: self.istio_service_cidr.clone(),
            exclude_outbound_ranges: self.istio_service_exclude_cidr.clone(),
            outbound_ports: self.istio_outbound_ports.clone(),
            exclude_outbound_ports: self.istio_local_outbound_ports_exclude.clone(),
            exclude_interfaces: self.istio_exclude_interfaces.clone(),
            kube_virt_interfaces: self.kube_virt_interfaces.clone(),
            tproxy_mark: self.istio_inbound_tproxy_mark.clone(),
            tproxy_route_table: self.istio_inbound_tproxy_route_table.clone(),
            redirect_dns: self.redirect_dns,
            capture_all_dns: self.capture_all_dns,
            drop_invalid: self.drop_invalid,
            owner_groups: env("ISTIO_OUTBOUND_OWNER_GROUPS"),
            owner_groups_exclude: env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE").unwrap_or_default(),
            ipv4_loopback_cidr: env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR").unwrap_or_default(),
            native_nftables: self.native_nftables,
            iptables_variant: self.force_iptables_binary.clone(),
        }
    }

    fn backend(&self) -> Result<Backend, UsageError> {
        Ok(self.settings().backend(&SettingNames::ISTIO_FLAGS)?)
    }

    /// Validates every setting; reads nothing from the namespace.
    pub fn capture_config(&self) -> Result<CaptureConfig, UsageError> {
        Ok(self.settings().capture_config(&SettingNames::ISTIO_FLAGS)?)
    }

    /// Where the pod's files are seen from here, when the pod's resolv.conf is needed (DNS
    /// capture limited to its nameservers): from inside the pod, or through the process that
    /// `--network-namespace /proc/PID/ns/net` names. Never the caller's own resolv.conf for
    /// another namespace.
    pub fn pod_root(&self) -> Result<Option<PathBuf>, UsageError> {
        if !self.settings().needs_dns_servers() {
            return Ok(None);
        }
        match namespace::pod_root(self.namespace_path().as_deref()) {
            Some(root) => Ok(Some(root)),
            None => Err(UsageError::NoPodResolvConf(self.network_namespace.clone())),
        }
    }

    /// The full request: the settings validated by [`Cli::capture_config`] plus what the
    /// namespace itself tells (IP families, DNS servers under `pod_root`), read as Istio reads
    /// them. Call after entering the namespace.
    pub fn request(&self, mut config: CaptureConfig, pod_root: Option<&Path>) -> Result<Request, SetupError> {
        config.ipv6 = namespace::uses_ipv6(self.dual_stack)?;
        if let Some(root) = pod_root {
            let (v4, v6) = namespace::dns_servers(root)?;
            config.dns = DnsCapture::Servers { v4, v6 };
        }
        Ok(Request {
            config,
            backend: self.backend()?,
            operation: self.operation(),
            dry_run: self.dry_run,
            lock_wait: self.iptables_lock_wait,
            detail: self.log.detail(),
        })
    }

    /// Settings that are not part of the ruleset but must still be valid.
    pub fn validate_extras(&self) -> Result<(), UsageError> {
        self.probe_port()?;
        self.backend()?;
        Ok(())
    }

    /// The redirection probe for --run-validation: over IPv6 when the pod's first address is.
    pub fn probe(&self, config: &CaptureConfig) -> Result<Probe, SetupError> {
        Ok(Probe {
            ipv6: namespace::uses_ipv6(false)?,
            listen_ports: vec![config.proxy_port, config.inbound_capture_port],
            probe_port: self.probe_port()?,
            timeout: self.probe_timeout,
        })
    }

    fn probe_port(&self) -> Result<u16, UsageError> {
        Ok(config::parse_port("--iptables-probe-port", &self.iptables_probe_port)?)
    }
}

/// Istio's default proxy UID: that of $ENVOY_USER (istio-proxy) where the user exists.
fn envoy_user_uid() -> String {
    let user = std::env::var("ENVOY_USER").unwrap_or_else(|_| "istio-proxy".to_string());
    capture_lib::accounts::uid(&user).unwrap_or(DEFAULT_PROXY_UID).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn parse(args: &[&str]) -> Cli {
        let m = Cli::command().try_get_matches_from(std::iter::once("istio-iptables").chain(args.iter().copied())).unwrap();
        Cli::from_arg_matches(&m).unwrap()
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seed_command_parses() {
        #[rustfmt::skip]
        let cli = parse(&["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]);
        let cfg = cli.capture_config().unwrap();
        assert_eq!(cfg.proxy_uids, vec![1337]);
        assert_eq!(cfg.proxy_gids, vec![1337], "GIDs default to the UIDs");
        assert_eq!(cfg.inbound_ports, config::InboundPorts::All { except: vec![15090, 15021, 15020] });
        assert_eq!(cfg.outbound_ranges, config::OutboundRanges::All);
    }

    #[test]
    fn bools_take_go_forms() {
        assert!(parse(&["--redirect-dns"]).redirect_dns);
        assert!(!parse(&["--redirect-dns=false"]).redirect_dns);
        assert!(parse(&["--reconcile=T"]).reconcile);
        assert!(Cli::command().try_get_matches_from(["x", "--reconcile=maybe"]).is_err());
    }

    #[test]
    fn durations_take_go_forms_and_overflow_is_a_usage_error() {
        assert_eq!(parse(&["--probe-timeout", "1m30s"]).probe_timeout, Duration::from_secs(90));
        assert_eq!(parse(&["--iptables-lock-wait", "250ms"]).iptables_lock_wait, Duration::from_millis(250));
        for (flag, value) in [("--iptables-lock-wait", "4000000000000000h"), ("--probe-timeout", "99999999999999999999s")] {
            let err = Cli::command().try_get_matches_from(["x", flag, value]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(err.to_string().contains("too long a duration"), "{err}");
        }
    }

    #[test]
    fn dns_servers_of_a_namespace_path_come_from_its_process_only() {
        let root = |args: &[&str]| parse(args).pod_root().map(|r| r.map(|p| p.display().to_string()));
        assert_eq!(root(&[]).unwrap(), None, "no DNS capture, no resolv.conf");
        assert_eq!(root(&["--redirect-dns"]).unwrap().as_deref(), Some("/"));
        let via_process = root(&["--redirect-dns", "--network-namespace", "/proc/7/ns/net"]).unwrap();
        assert_eq!(via_process.as_deref(), Some("/proc/7/root"));
        assert_eq!(root(&["--redirect-dns", "--capture-all-dns", "--network-namespace", "/run/netns/p"]).unwrap(), None);
        let err = root(&["--redirect-dns", "--network-namespace", "/run/netns/p"]).unwrap_err().to_string();
        assert!(err.contains("\"/run/netns/p\"") && err.contains("--capture-all-dns"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse(&["-b", "80,99999"]).capture_config().unwrap_err().to_string();
        assert!(err.contains("99999"), "{err}");
        let err = parse(&["-x", "*"]).capture_config().unwrap_err().to_string();
        assert!(err.contains("'*' is not allowed"), "{err}");
        let err = parse(&["-m", "tproxy"]).capture_config().unwrap_err().to_string();
        assert!(err.contains("\"tproxy\""), "{err}");
        let err = parse(&["-t", "0x539"]).capture_config().unwrap_err().to_string();
        assert!(err.contains("0x539"), "{err}");
        let err = parse(&["--force-iptables-binary", "x"]).validate_extras().unwrap_err().to_string();
        assert!(err.contains("\"x\""), "{err}");
    }
}
