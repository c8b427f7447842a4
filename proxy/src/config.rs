//! Command-line flags and environment, parsed once into a [`ProxyConfig`].

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How the capture rules deliver inbound connections (istio-iptables `-m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum InboundMode {
    /// NAT REDIRECT: the original destination comes from SO_ORIGINAL_DST.
    Redirect,
    /// TPROXY: the accepted socket's local address is the original destination.
    Tproxy,
}

/// How the relay moves bytes between the two sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "lower")]
pub enum RelayMode {
    /// read(2)/write(2) through a userspace buffer.
    Copy,
    /// read/write at first, then splice(2) through a pipe (no copy into userspace) once a
    /// direction carries bulk data, like HAProxy's `option splice-auto`.
    Splice,
}

/// The sidecar data plane: forwards captured connections to their original destination.
#[derive(Debug, Clone, Parser)]
#[command(name = "capture-proxy", version, about)]
pub struct ProxyConfig {
    /// Port the outbound capture rules redirect to (istio-iptables `-p`).
    #[arg(long, default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// Port the inbound capture rules redirect to (istio-iptables `-z`).
    #[arg(long, default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,

    /// Port serving `GET /healthz/ready`.
    #[arg(long, default_value_t = 15021, value_parser = clap::value_parser!(u16).range(1..))]
    pub health_port: u16,

    /// Port serving `GET /stats/prometheus`.
    #[arg(long, default_value_t = 15090, value_parser = clap::value_parser!(u16).range(1..))]
    pub metrics_port: u16,

    /// Inbound interception mode, as given to istio-iptables `-m`.
    #[arg(long, env = "INBOUND_INTERCEPTION_MODE", default_value = "REDIRECT", ignore_case = true)]
    pub inbound_mode: InboundMode,

    /// Mark put on upstream sockets in TPROXY mode (istio-iptables `-t`).
    #[arg(long, env = "INBOUND_TPROXY_MARK", default_value_t = 1337)]
    pub tproxy_mark: u32,

    /// The uid the capture rules exempt (istio-iptables `-u`); the proxy must run as it.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,

    /// Run under any uid (only safe when nothing captures this process's traffic).
    #[arg(long)]
    pub allow_any_uid: bool,

    /// How long to wait for the upstream to accept a connection, in Go's syntax (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = timeout)]
    pub connect_timeout: Duration,

    /// Close a connection when neither side has sent anything for this long (e.g. 1h, 90m).
    #[arg(long, default_value = "1h", value_parser = timeout)]
    pub idle_timeout: Duration,

    /// Connections relayed at once; more are refused with a reset.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// After SIGTERM, how long in-flight connections may run before the proxy exits (0: close them at once).
    #[arg(long, default_value = "5s", value_parser = go_syntax::parse_duration)]
    pub drain_timeout: Duration,

    /// How the relay moves bytes.
    #[arg(long, value_enum, default_value_t = RelayMode::Splice)]
    pub relay: RelayMode,

    /// Worker threads, each with its own listeners and event loop (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,

    /// Log filter, in tracing's `RUST_LOG` syntax (e.g. `info`, `capture_proxy=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl ProxyConfig {
    /// Parses flags (and their environment variables) and checks that they fit together.
    pub fn parse_from<I, T>(args: I) -> Result<ProxyConfig, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = <ProxyConfig as Parser>::try_parse_from(args)?;
        config.check_ports()?;
        Ok(config)
    }

    /// The ports the proxy forwards from: a connection to one of them is a loop.
    pub fn capture_ports(&self) -> [u16; 2] {
        [self.outbound_port, self.inbound_port]
    }

    fn check_ports(&self) -> Result<(), clap::Error> {
        let ports = [
            ("--outbound-port", self.outbound_port),
            ("--inbound-port", self.inbound_port),
            ("--health-port", self.health_port),
            ("--metrics-port", self.metrics_port),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                let message = format!("{other} and {name} are both {port}; each listener needs its own port");
                return Err(clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, message));
            }
        }
        Ok(())
    }
}

/// A timeout in Go's duration syntax, as Istio's flags take it: zero would end every
/// connection (or connect attempt) at once, so it is refused with the rest of the bad values.
fn timeout(text: &str) -> Result<Duration, String> {
    match go_syntax::parse_duration(text) {
        Ok(Duration::ZERO) => Err(format!("{text:?} would time out at once: give a duration longer than 0, such as 10s")),
        Ok(duration) => Ok(duration),
        Err(error) => Err(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ProxyConfig, clap::Error> {
        ProxyConfig::parse_from(std::iter::once("capture-proxy").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_istios_ports() {
        let config = parse(&[]).unwrap();
        assert_eq!(
            (config.outbound_port, config.inbound_port, config.health_port, config.metrics_port),
            (15001, 15006, 15021, 15090)
        );
        assert_eq!(config.proxy_uid, 1337);
        assert_eq!(config.tproxy_mark, 1337);
        assert!(!config.allow_any_uid);
    }

    #[test]
    fn inbound_mode_accepts_istio_spelling_in_any_case() {
        assert_eq!(parse(&["--inbound-mode", "TPROXY"]).unwrap().inbound_mode, InboundMode::Tproxy);
        assert_eq!(parse(&["--inbound-mode", "tproxy"]).unwrap().inbound_mode, InboundMode::Tproxy);
        assert_eq!(parse(&["--inbound-mode", "REDIRECT"]).unwrap().inbound_mode, InboundMode::Redirect);
        assert!(parse(&["--inbound-mode", "NONE"]).is_err());
    }

    #[test]
    fn ports_must_differ() {
        let err = parse(&["--inbound-port", "15001"]).unwrap_err().to_string();
        assert!(err.contains("--outbound-port and --inbound-port are both 15001"), "{err}");
        assert!(parse(&["--metrics-port", "15021"]).is_err());
        assert!(parse(&["--outbound-port", "0"]).is_err());
    }

    #[test]
    fn durations_are_gos_and_zero_or_overflowing_timeouts_are_refused() {
        let config = parse(&["--connect-timeout", "1m30s", "--idle-timeout", "1.5h", "--drain-timeout", "0"]).unwrap();
        assert_eq!(config.connect_timeout, Duration::from_secs(90));
        assert_eq!(config.idle_timeout, Duration::from_secs(5400));
        assert_eq!(config.drain_timeout, Duration::ZERO, "no drain: close at once");
        let longest = parse(&["--idle-timeout", "2562047h47m16.854775807s"]).unwrap();
        assert_eq!(longest.idle_timeout, Duration::from_nanos(i64::MAX as u64));
        for (flag, value, why) in [
            ("--idle-timeout", "0s", "longer than 0"),
            ("--connect-timeout", "0", "longer than 0"),
            ("--idle-timeout", "9999999999999999999s", "too long"),
            ("--drain-timeout", "99999999999999999h", "too long"),
            ("--idle-timeout", "7", "not a duration"),
            ("--connect-timeout", "1d", "not a duration"),
            ("--drain-timeout", "-5s", "negative"),
        ] {
            let error = parse(&[&format!("{flag}={value}")]).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{flag} {value}");
            let message = error.to_string();
            assert!(message.contains(flag) && message.contains(why), "{flag} {value}: {message}");
        }
    }

    #[test]
    fn timeouts_and_limits_from_flags() {
        let config = parse(&["--connect-timeout", "500ms", "--idle-timeout", "30s", "--max-connections", "3"]).unwrap();
        assert_eq!(config.connect_timeout, Duration::from_millis(500));
        assert_eq!(config.idle_timeout, Duration::from_secs(30));
        assert_eq!(config.max_connections, 3);
        assert!(parse(&["--max-connections", "0"]).is_err());
    }
}
