//! `istio-iptables`: a thin shell over capture-lib. Parse, validate, enter the namespace,
//! check privileges, run, and turn any error into one clear message and an exit code.

#![deny(unsafe_code)]

mod cli;

use std::process::ExitCode;

use capture_lib::capture::{self, Report};
use capture_lib::{namespace, validation};
use capture_lib::Outcome;
use clap::{CommandFactory, FromArgMatches};

use cli::{Cli, SetupError};

/// Exit codes Istio's tooling (and its CNI repair controller) relies on.
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_VALIDATION: u8 = 126;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if let Some(exit) = cli_docs::generate_if_requested(&args, Cli::command) {
        return exit;
    }
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = cli.apply_env_overrides(&matches) {
        return fail(EXIT_USAGE, &e);
    }
    // Refuse bad values before touching anything, even before entering the namespace.
    let validated = cli.capture_config().and_then(|config| cli.validate_extras().map(|()| config));
    let (config, pod_root) = match validated.and_then(|config| Ok((config, cli.pod_root()?))) {
        Ok(valid) => valid,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    if let Some(path) = cli.namespace_path() {
        if let Err(e) = namespace::enter(&path) {
            return fail(EXIT_FAILURE, &e);
        }
    }
    let request = match cli.request(config, pod_root.as_deref()) {
        Ok(r) => r,
        Err(SetupError::Usage(e)) => return fail(EXIT_USAGE, &e),
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    if cli.skip_rule_apply {
        info(&cli, "--skip-rule-apply: no rules programmed");
    } else {
        if !request.dry_run {
            if let Err(e) = namespace::require_net_admin() {
                return fail(EXIT_FAILURE, &e);
            }
        }
        match capture::run(&request) {
            Ok(report) => print_report(&cli, &report),
            Err(e) => return fail(EXIT_FAILURE, &e),
        }
    }
    if cli.run_validation {
        let probe = match cli.probe(&request.config) {
            Ok(p) => p,
            Err(e) => return fail(EXIT_FAILURE, &e),
        };
        if let Err(e) = validation::validate(&probe) {
            return fail(EXIT_VALIDATION, &e);
        }
        info(&cli, "validation passed, iptables rules established");
    }
    ExitCode::SUCCESS
}

fn print_report(cli: &Cli, report: &Report) {
    for w in &report.warnings {
        eprintln!("istio-iptables: warning: {w}");
    }
    if let Some(text) = &report.dry_run {
        print!("{text}");
        return;
    }
    let what = match report.outcome {
        Outcome::Applied => "capture rules installed",
        Outcome::Unchanged => "capture rules already in place; nothing changed",
        Outcome::Reconciled => "drifted capture rules replaced",
        Outcome::Removed => "capture rules removed",
        Outcome::NothingToRemove => "no capture rules to remove",
    };
    info(cli, what);
}

fn info(cli: &Cli, message: &str) {
    if cli.verbose() {
        eprintln!("istio-iptables: {message}");
    }
}

fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("istio-iptables: error: {error}");
    ExitCode::from(code)
}
