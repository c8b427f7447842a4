//! `istio-iptables`: a thin shell over capture-lib. Parse, validate, enter the namespace,
//! check privileges, run, and turn any error into one clear message and an exit code.

#![deny(unsafe_code)]

mod cli;
mod log;
mod report;

use std::ffi::OsString;
use std::process::ExitCode;

use capture_lib::capture;
use capture_lib::{namespace, validation};
use clap::FromArgMatches;

use cli::{Cli, SetupError};
use log::Logger;

/// Exit codes Istio's tooling (and its CNI repair controller) relies on.
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_VALIDATION: u8 = 126;

fn main() -> ExitCode {
    let args = arguments(std::env::args_os());
    if let Some(exit) = cli_docs::generate_if_requested(args.get(1..).unwrap_or_default(), cli::command) {
        return exit;
    }
    let matches = cli::command().get_matches_from(&args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let log = match Logger::open(&cli.log) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("istio-iptables: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Refuse bad values before touching anything, even before entering the namespace.
    let validated = cli.capture_config().and_then(|config| cli.validate_extras().map(|()| config));
    let (config, pod_root) = match validated.and_then(|config| Ok((config, cli.pod_root()?))) {
        Ok(valid) => valid,
        Err(e) => return fail(&log, EXIT_USAGE, &e),
    };
    if let Some(path) = cli.namespace_path() {
        if let Err(e) = namespace::enter(&path) {
            return fail(&log, EXIT_FAILURE, &e);
        }
    }
    let request = match cli.request(config, pod_root.as_deref()) {
        Ok(r) => r,
        Err(SetupError::Usage(e)) => return fail(&log, EXIT_USAGE, &e),
        Err(e) => return fail(&log, EXIT_FAILURE, &e),
    };
    report::log_settings(&log, &cli, &request);
    if cli.skip_rule_apply {
        log.info("--skip-rule-apply: no rules programmed");
    } else {
        if !request.dry_run {
            if let Err(e) = namespace::require_net_admin() {
                return fail(&log, EXIT_FAILURE, &e);
            }
        }
        match capture::run(&request) {
            Ok(report) => report::log_report(&log, &report),
            Err(e) if e.needs_reconcile() => {
                let hint = "re-run with --reconcile to replace it atomically, or remove it first with --cleanup-only";
                return fail(&log, EXIT_FAILURE, &format!("{e}\n{hint}"));
            }
            Err(e) => return fail(&log, EXIT_FAILURE, &e),
        }
    }
    if cli.run_validation {
        let probe = match cli.probe(&request.config) {
            Ok(p) => p,
            Err(e) => return fail(&log, EXIT_FAILURE, &e),
        };
        if let Err(e) = validation::validate(&probe) {
            return fail(&log, EXIT_VALIDATION, &e);
        }
        log.info("validation passed, iptables rules established");
    }
    ExitCode::SUCCESS
}

/// The command line without pilot-agent's subcommand word: Istio's injector writes an
/// args-only container, `[istio-iptables, -p, 15001, ...]`, for an image whose entrypoint is
/// `pilot-agent`; with this binary as the entrypoint the same arguments work unchanged.
fn arguments(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.collect();
    if args.get(1).is_some_and(|first| first == "istio-iptables") {
        args.remove(1);
    }
    args
}

#[track_caller]
fn fail(log: &Logger, code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    log.error(&error.to_string());
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        arguments(list.iter().map(OsString::from))
    }

    #[test]
    fn the_subcommand_word_is_dropped_only_in_first_place() {
        let os = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(args(&["/bin/istio-iptables", "istio-iptables", "-p", "15001"]), os(&["/bin/istio-iptables", "-p", "15001"]));
        assert_eq!(args(&["istio-iptables", "-c", "istio-iptables"]), os(&["istio-iptables", "-c", "istio-iptables"]));
        assert_eq!(args(&["istio-iptables"]), os(&["istio-iptables"]));
    }
}
