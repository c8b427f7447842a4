//! Istio's istio-iptables command line: same long names, short letters, environment
//! variables and defaults, turned into a typed capture request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capture_lib::capture::{Backend, Operation, Request};
use capture_lib::config::{self, ConfigError, DnsCapture};
use capture_lib::namespace::{self, NamespaceError};
use capture_lib::settings::{CaptureConfig, Declaration, Front, Kind, Setting, Settings, DEFAULT_PROXY_UID};
use capture_lib::validation::Probe;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, Parser};
use go_syntax::{parse_bool, parse_duration};

use crate::log::LogFlags;

const ABOUT: &str = "Programs a pod's network namespace so that its TCP traffic goes through the \
sidecar proxy: a drop-in replacement for Istio's istio-iptables (pilot-agent istio-iptables).";

/// The help's epilogue: the environment-only settings and overrides, from their declarations.
fn after_help() -> String {
    let mut text = String::from(
        "Every flag can also be set through the environment variable shown; a flag on the command line wins.\n\
         Environment-only settings:\n",
    );
    for d in Setting::ALL.iter().map(|s| s.declaration()).filter(|d| d.flag.is_none()) {
        let default = if d.default.is_empty() { String::new() } else { format!(" [default: {}]", d.default) };
        text.push_str(&format!("  {:<36} {}{default}\n", d.env.unwrap_or_default(), d.help));
    }
    text.push_str(&format!("  {ENVOY_USER:<36} user whose UID is the proxy UID when -u is empty [default: istio-proxy]\n"));
    let overrides: Vec<_> =
        Setting::ALL.iter().map(|s| s.declaration()).filter_map(|d| Some((d.env_override?, d.env?))).collect();
    let (by, of): (Vec<_>, Vec<_>) = overrides.into_iter().unzip();
    text.push_str(&format!("  {} override {}.\n", by.join(", "), of.join(", ")));
    text.push_str(
        "\nThe word istio-iptables as the first argument is accepted and skipped: Istio's injector writes the arguments\n\
         for pilot-agent, whose subcommand it is (args: [istio-iptables, -p, 15001, ...]).\n\n\
         Exit status: 0 done, 1 failure (nothing half-applied), 2 usage error, 126 validation failure.\n\
         Example (the standard sidecar setup):\n  \
         istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x \"\" -b '*' -d 15090,15021,15020",
    );
    text
}

/// Istio's variable naming the proxy's user, whose UID is the default proxy UID.
const ENVOY_USER: &str = "ENVOY_USER";

#[derive(Debug, Parser)]
#[command(name = "istio-iptables", version, about = ABOUT, after_help = after_help(), args_override_self = true)]
pub struct Cli {
    /// The capture settings (declared in capture-lib's settings module).
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Print what would be changed and change nothing.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN")]
    pub dry_run: bool,
    /// Original destination port the validation probe dials.
    #[arg(long, env = "IPTABLES_PROBE_PORT", default_value = "15002", value_name = "PORT")]
    pub iptables_probe_port: String,
    /// How long validation may take.
    #[arg(long, env = "PROBE_TIMEOUT", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub probe_timeout: Duration,
    /// Program nothing (validation only).
    #[arg(long = "skip-rule-apply", env = "SKIP_RULE_APPLY")]
    pub skip_rule_apply: bool,
    /// After programming, prove that redirection works (exit 126 if not).
    #[arg(long = "run-validation", env = "RUN_VALIDATION")]
    pub run_validation: bool,
    /// Network namespace to program (e.g. /proc/PID/ns/net or /var/run/netns/NAME): the tool enters it first.
    #[arg(long, env = "NETWORK_NAMESPACE", default_value = "", value_name = "PATH")]
    pub network_namespace: String,
    /// Running on behalf of a CNI plugin (accepted for compatibility).
    #[arg(long = "cni-mode", env = "CNI_MODE")]
    pub cni_mode: bool,
    /// Replace drifted rules atomically instead of failing.
    #[arg(long = "reconcile", env = "RECONCILE")]
    pub reconcile: bool,
    /// Remove everything this tool added, then stop.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY")]
    pub cleanup_only: bool,
    /// Rewrite the rules even when they look up to date.
    #[arg(long = "force-apply", env = "FORCE_APPLY")]
    pub force_apply: bool,
    /// How long to wait for the xtables lock, or for another capture run on this namespace.
    #[arg(long, env = "IPTABLES_LOCK_WAIT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub iptables_lock_wait: Duration,
    #[command(flatten)]
    pub log: LogFlags,
}

/// The capture settings as flags, environment variables and Istio's overriding variables, each
/// value kept with the name it came under. Built from the declarations, so a setting declared
/// there is a flag here without a line of this file changing.
#[derive(Debug, Clone)]
pub struct CaptureArgs {
    pub settings: Settings,
}

impl clap::Args for CaptureArgs {
    fn augment_args(cmd: Command) -> Command {
        Setting::ALL.iter().filter_map(|setting| flag(setting.declaration())).fold(cmd, Command::arg)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for CaptureArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut settings = Settings::new(Front::Flag);
        let env = |var: Option<&'static str>| var.and_then(|var| Some((std::env::var(var).ok()?, var)));
        for &setting in Setting::ALL {
            let d = setting.declaration();
            let given = match d.flag.map(|flag| (flag, id(flag))) {
                // Precedence: the command line, Istio's overriding variable, the flag's own variable.
                Some((flag, id)) => match (matches.value_source(id), matches.get_one::<String>(id)) {
                    (Some(ValueSource::CommandLine), Some(value)) => Some((value.clone(), flag)),
                    (source, value) => env(d.env_override).or_else(|| match (source, value, d.env) {
                        (Some(ValueSource::EnvVariable), Some(value), Some(var)) => Some((value.clone(), var)),
                        _ => None,
                    }),
                },
                None => env(d.env),
            };
            if let Some((text, origin)) = given {
                settings.set(setting, text, origin);
            }
        }
        Ok(CaptureArgs { settings })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// The command line: [`Cli`]'s arguments, its boolean run options in Go's syntax.
pub fn command() -> Command {
    Cli::command().mut_args(|arg| match arg.get_action() {
        ArgAction::SetTrue => go_bool_syntax(arg.action(ArgAction::Set)).default_value("false").value_parser(parse_bool),
        _ => arg,
    })
}

/// Go's boolean flag syntax, as pilot-agent's flags take it: `--flag`, `--flag=false`, `--flag=1`.
fn go_bool_syntax(arg: Arg) -> Arg {
    arg.value_name("BOOL").num_args(0..=1).require_equals(true).default_missing_value("true")
}

/// The clap id of a long flag: its name without the dashes.
fn id(flag: &'static str) -> &'static str {
    flag.trim_start_matches('-')
}

/// The flag of a declared setting, if it has one.
fn flag(d: &'static Declaration) -> Option<Arg> {
    let long = id(d.flag?);
    let help = match d.env_override {
        Some(var) => format!("{} (overridden by {var})", d.help),
        None => d.help.to_string(),
    };
    let mut arg = Arg::new(long).long(long).help(help).default_value(d.default).hide_default_value(d.default.is_empty());
    arg = if let Some(short) = d.short { arg.short(short) } else { arg };
    arg = if let Some(var) = d.env { arg.env(var) } else { arg };
    Some(match d.kind {
        Kind::Text(value_name) => arg.value_name(value_name),
        // Go's boolean forms, checked here so `--redirect-dns=maybe` is a usage error as for every flag.
        Kind::Bool => go_bool_syntax(arg).value_parser(|text: &str| parse_bool(text).map(|_| text.to_string())),
    })
}

/// A bad value in a flag or the environment.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Config(#[from] ConfigError),
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

    /// The capture settings, with Istio's default proxy UID (that of $ENVOY_USER) when none is given.
    pub fn settings(&self) -> Settings {
        let mut settings = self.capture.settings.clone();
        if settings.text(Setting::ProxyUid).is_empty() {
            settings.set(Setting::ProxyUid, envoy_user_uid(), ENVOY_USER);
        }
        settings
    }

    fn backend(&self) -> Result<Backend, UsageError> {
        Ok(Backend::from_settings(&self.settings())?)
    }

    /// Validates every setting; reads nothing from the namespace.
    pub fn capture_config(&self) -> Result<CaptureConfig, UsageError> {
        Ok(self.settings().capture_config()?)
    }

    /// Where the pod's files are seen from here, when the pod's resolv.conf is needed (DNS
    /// capture limited to its nameservers): from inside the pod, or through the process that
    /// `--network-namespace /proc/PID/ns/net` names. Never the caller's own resolv.conf for
    /// another namespace.
    pub fn pod_root(&self) -> Result<Option<PathBuf>, UsageError> {
        if !self.settings().needs_dns_servers()? {
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
        config.ipv6 = namespace::uses_ipv6(self.settings().flag(Setting::DualStack).map_err(UsageError::from)?)?;
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
    let user = std::env::var(ENVOY_USER).unwrap_or_else(|_| "istio-proxy".to_string());
    capture_lib::accounts::uid(&user).unwrap_or(DEFAULT_PROXY_UID).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    fn parse(args: &[&str]) -> Cli {
        let m = command().try_get_matches_from(std::iter::once("istio-iptables").chain(args.iter().copied())).unwrap();
        Cli::from_arg_matches(&m).unwrap()
    }

    #[test]
    fn cli_definition_is_consistent() {
        command().debug_assert();
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
        let redirect_dns = |args: &[&str]| parse(args).settings().flag(Setting::RedirectDns).unwrap();
        assert!(redirect_dns(&["--redirect-dns"]));
        assert!(!redirect_dns(&["--redirect-dns=false"]));
        assert!(redirect_dns(&["--redirect-dns=1"]));
        assert!(parse(&["--reconcile=T"]).reconcile);
        for flag in ["--reconcile=maybe", "--native-nftables=maybe"] {
            let err = command().try_get_matches_from(["x", flag]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
        }
    }

    #[test]
    fn every_declared_setting_with_a_flag_is_one_with_its_short_letter_and_variable() {
        let cmd = command();
        for setting in Setting::ALL {
            let d = setting.declaration();
            let Some(flag) = d.flag else {
                assert!(cmd.get_arguments().all(|a| a.get_env() != d.env.map(std::ffi::OsStr::new)), "{setting:?}");
                continue;
            };
            let arg = cmd.get_arguments().find(|a| a.get_long() == Some(id(flag))).unwrap_or_else(|| panic!("{flag}"));
            assert_eq!(arg.get_short(), d.short, "{flag}");
            assert_eq!(arg.get_env(), d.env.map(std::ffi::OsStr::new), "{flag}");
        }
    }

    #[test]
    fn values_keep_the_name_they_were_given_under() {
        let cli = parse(&["-d", "99999"]);
        assert_eq!(cli.settings().name(Setting::ExcludeInboundPorts), "--istio-local-exclude-ports");
        assert_eq!(cli.settings().name(Setting::ExcludeOutboundPorts), "--istio-local-outbound-ports-exclude");
        assert_eq!(cli.settings().given(Setting::ProxyUid).unwrap().origin, ENVOY_USER, "the default proxy UID's source");
    }

    #[test]
    fn the_help_lists_environment_only_settings_and_overrides() {
        let help = after_help();
        for var in [
            "ISTIO_OUTBOUND_OWNER_GROUPS ",
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            "ENVOY_USER",
        ] {
            assert!(help.contains(var), "{var}: {help}");
        }
        assert!(help
            .contains("ISTIO_META_DNS_CAPTURE, INVALID_DROP, ISTIO_DUAL_STACK override REDIRECT_DNS, DROP_INVALID, DUAL_STACK."));
    }

    #[test]
    fn durations_take_go_forms_and_overflow_is_a_usage_error() {
        assert_eq!(parse(&["--probe-timeout", "1m30s"]).probe_timeout, Duration::from_secs(90));
        assert_eq!(parse(&["--iptables-lock-wait", "250ms"]).iptables_lock_wait, Duration::from_millis(250));
        for (flag, value) in [("--iptables-lock-wait", "4000000000000000h"), ("--probe-timeout", "99999999999999999999s")] {
            let err = command().try_get_matches_from(["x", flag, value]).unwrap_err();
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
