//! One run of the tool: build the ruleset, hand it to the chosen backend, then routes.
//!
//! This is the only place that sequences the steps, so "what happens, in which order, and
//! what is undone when a step fails" reads top to bottom here.

use std::fmt::Write;

use thiserror::Error;

use std::time::Duration;

use crate::config::{CaptureConfig, DnsCapture};
use crate::iptables::{self, IptablesError, IptablesOptions};
use crate::model::{self, Dialect};
use crate::namespace::{self, NamespaceError};
use crate::nftables::{self, NftError};
use crate::routes::{self, RouteError, RoutePlan};
use crate::Outcome;

pub use crate::iptables::Operation;

/// Which netfilter interface programs the rules.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Iptables(IptablesOptions),
    Nftables,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub config: CaptureConfig,
    pub backend: Backend,
    pub operation: Operation,
    /// Print what would be sent and change nothing.
    pub dry_run: bool,
    /// How long to wait for a concurrent run (ours, or another xtables user) to finish.
    pub lock_wait: Duration,
}

/// What happened, for the caller to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// With `dry_run`: everything that would have been sent.
    pub dry_run: Option<String>,
    /// Things the user should know that did not stop the run.
    pub warnings: Vec<String>,
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error(transparent)]
    Nftables(#[from] NftError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Routes(RouteError),
    #[error("{source}\nthe capture rules of this run were rolled back")]
    RoutesRolledBack { source: RouteError },
    #[error("{source}\nrolling the capture rules back also failed: {rollback}")]
    RoutesRollbackFailed { source: RouteError, rollback: Box<CaptureError> },
    #[error("the capture in this network namespace is not as requested:\n  {}", differences.join("\n  "))]
    NotInPlace { differences: Vec<String> },
}

/// Istio's words when DNS capture is asked for but there is nothing to capture.
const NO_DNS_SERVERS: &str = "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided \
     (the pod's resolv.conf names no nameserver). DNS capture disabled.";

pub fn run(req: &Request) -> Result<Report, CaptureError> {
    let routes = RoutePlan::for_config(&req.config);
    // Refuse a plan that would break routing before any rule is touched.
    routes.check().map_err(CaptureError::Routes)?;
    let _lock = if req.dry_run { None } else { Some(namespace::lock(req.lock_wait)?) };
    let mut report = match req.backend {
        Backend::Iptables(opts) => run_iptables(req, opts, &routes),
        Backend::Nftables => run_nftables(req, &routes),
    }?;
    if matches!(&req.config.dns, DnsCapture::Servers { v4, v6 } if v4.is_empty() && v6.is_empty()) {
        report.warnings.insert(0, NO_DNS_SERVERS.to_string());
    }
    Ok(report)
}

/// Checks, changing nothing, that the namespace holds exactly what an apply of `config` would
/// leave there (rules and routes). `lock_wait` bounds the wait for a run in progress, so that a
/// half-finished one is not judged.
pub fn verify(config: &CaptureConfig, backend: Backend, lock_wait: Duration) -> Result<(), CaptureError> {
    let routes = RoutePlan::for_config(config);
    routes.check().map_err(CaptureError::Routes)?;
    let _lock = namespace::lock(lock_wait)?;
    let mut differences = match backend {
        Backend::Iptables(opts) => iptables::differences(&model::build(config, Dialect::Iptables), opts)?,
        Backend::Nftables => nftables::differences(&model::build(config, Dialect::Nftables))?,
    };
    let missing = routes::missing(&routes).map_err(CaptureError::Routes)?;
    differences.extend(missing.into_iter().map(|command| format!("routing: missing `{command}`")));
    if differences.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::NotInPlace { differences })
    }
}

fn run_nftables(req: &Request, routes: &RoutePlan) -> Result<Report, CaptureError> {
    let ruleset = model::build(&req.config, Dialect::Nftables);
    if req.dry_run {
        let mut text = match req.operation {
            Operation::Apply { .. } => nftables::script(&ruleset),
            Operation::Cleanup => nftables::cleanup_script(),
        };
        text.push_str(&describe_routes(req.operation, routes));
        return Ok(Report { outcome: Outcome::Unchanged, dry_run: Some(text), warnings: Vec::new() });
    }
    let (outcome, warnings) = match req.operation {
        // --force-apply has nothing to force here: an exact ruleset is already what we'd send.
        Operation::Apply { reconcile, .. } => apply_with_routes(
            routes,
            || nftables::apply(&ruleset, reconcile).map_err(CaptureError::from),
            // Only a fresh install can be undone exactly (by deleting what we just created).
            |outcome| match outcome {
                Outcome::Applied => nftables::cleanup().map(drop).map_err(CaptureError::from),
                _ => Ok(()),
            },
        )?,
        Operation::Cleanup => (nftables::cleanup()?, remove_routes(routes)?),
    };
    Ok(Report { outcome, dry_run: None, warnings })
}

fn run_iptables(req: &Request, opts: IptablesOptions, routes: &RoutePlan) -> Result<Report, CaptureError> {
    let ruleset = model::build(&req.config, Dialect::Iptables);
    let plan = iptables::plan(&ruleset, req.operation, opts)?;
    if req.dry_run {
        let mut text = String::new();
        if plan.steps.is_empty() {
            text.push_str("# nothing to change in the rules: they are already as requested\n");
        }
        for step in &plan.steps {
            let _ = writeln!(text, "# {}\n{}", step.command(), step.payload);
        }
        text.push_str(&describe_routes(req.operation, routes));
        return Ok(Report { outcome: plan.outcome, dry_run: Some(text), warnings: Vec::new() });
    }
    let (outcome, warnings) = match req.operation {
        Operation::Apply { .. } => apply_with_routes(
            routes,
            || iptables::execute(&plan, req.lock_wait).map_err(CaptureError::from),
            |_| iptables::undo(&plan, req.lock_wait).map_err(CaptureError::from),
        )?,
        Operation::Cleanup => (iptables::execute(&plan, req.lock_wait)?, remove_routes(routes)?),
    };
    Ok(Report { outcome, dry_run: None, warnings })
}

/// The `ip` commands the routing step would run, for --dry-run.
fn describe_routes(op: Operation, routes: &RoutePlan) -> String {
    let lines = match op {
        Operation::Apply { .. } => routes.describe(),
        Operation::Cleanup => routes.describe_removal(),
    };
    lines.iter().map(|l| format!("# then: {l}\n")).collect()
}

/// Applies the rules and the routing they rely on concurrently (they are independent, and the
/// init container's start-up time is the pod's). If either fails, what the other did in this
/// run is taken back: nothing is left half-applied. A namespace without IPv6 keeps its IPv4
/// capture and gets a warning.
fn apply_with_routes(
    routes: &RoutePlan,
    apply_rules: impl FnOnce() -> Result<Outcome, CaptureError>,
    undo_rules: impl FnOnce(&Outcome) -> Result<(), CaptureError>,
) -> Result<(Outcome, Vec<String>), CaptureError> {
    let mut added = routes::Added::default();
    let (rules, routing) = std::thread::scope(|scope| {
        let routing = scope.spawn(|| routes::apply_tracked(routes, &mut added));
        let rules = apply_rules();
        (rules, routing.join().expect("routing thread panicked"))
    });
    let warnings = match (&rules, routing) {
        (_, Ok(())) => Vec::new(),
        (_, Err(e @ RouteError::Ipv6Disabled { .. })) => vec![e.to_string()],
        (Err(_), Err(_)) => Vec::new(),
        (Ok(outcome), Err(source)) => {
            let _ = routes::undo(&added);
            return Err(match undo_rules(outcome) {
                Ok(()) => CaptureError::RoutesRolledBack { source },
                Err(rollback) => CaptureError::RoutesRollbackFailed { source, rollback: Box::new(rollback) },
            });
        }
    };
    match rules {
        Ok(outcome) => Ok((outcome, warnings)),
        Err(e) => {
            // The rules undid themselves; take back the routing this run added.
            let _ = routes::undo(&added);
            Err(e)
        }
    }
}

/// Cleanup's routing step: remove what the capture needed.
fn remove_routes(routes: &RoutePlan) -> Result<Vec<String>, CaptureError> {
    routes::remove(routes).map(|()| Vec::new()).map_err(CaptureError::Routes)
}
