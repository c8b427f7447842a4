//! One run of the tool: build the ruleset, hand it to the chosen backend, then routes.
//!
//! This is the only place that sequences the steps, so "what happens, in which order, and
//! what is undone when a step fails" reads top to bottom here.

use std::fmt::Write;

use thiserror::Error;

use std::time::Duration;

use crate::config::ConfigError;
use crate::config::DnsCapture;
use crate::iptables::{self, IptablesError, IptablesOptions, Variant};
use crate::model::{self, Dialect};
use crate::namespace::{self, NamespaceError};
use crate::nftables::{self, NftError};
use crate::routes::{self, RouteError, RoutePlan};
use crate::settings::CaptureConfig;
use crate::settings::{Setting, Settings};
use crate::{Detail, Outcome};

pub use crate::iptables::Operation;

/// Which netfilter interface programs the rules.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Iptables(IptablesOptions),
    Nftables,
}

impl Backend {
    /// The backend the settings choose (native nftables, or an iptables variant).
    pub fn from_settings(settings: &Settings) -> Result<Backend, ConfigError> {
        if settings.flag(Setting::NativeNftables)? {
            return Ok(Backend::Nftables);
        }
        let variant = match settings.text(Setting::IptablesVariant) {
            "" => None,
            v => Some(Variant::parse(v).ok_or_else(|| ConfigError::IptablesVariant {
                setting: settings.name(Setting::IptablesVariant),
                value: v.to_string(),
            })?),
        };
        Ok(Backend::Iptables(IptablesOptions { variant }))
    }
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
    /// What the report should describe besides the outcome.
    pub detail: Detail,
}

/// What happened, for the caller to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// With `dry_run`: everything that would have been sent.
    pub dry_run: Option<String>,
    /// Things the user should know that did not stop the run.
    pub warnings: Vec<String>,
    /// [`Detail::Sent`] and up: each change sent to the kernel, in order (none: nothing was).
    pub sent: Vec<Sent>,
    /// [`Detail::Trace`]: the state read from the namespace and the decisions made from it.
    pub trace: Vec<String>,
}

impl Report {
    fn new(outcome: Outcome) -> Report {
        Report { outcome, dry_run: None, warnings: Vec::new(), sent: Vec::new(), trace: Vec::new() }
    }
}

/// One change sent to the kernel, as text a person can read and replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// `program --noflush` fed with `input` (one per IP family, atomic per table).
    IptablesRestore { program: String, input: String },
    /// The nf_tables batch, as the nft script that makes the same change (`nft -f`).
    Nftables { script: String },
    /// The routing entries this run added, as `ip` commands.
    Routing { commands: Vec<String> },
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
    #[error(
        "this network namespace already holds a capture made with {other}, and two captures would stack; \
         re-run with --reconcile to replace it with this one, or remove it first with --cleanup-only"
    )]
    OtherBackend { other: &'static str },
}

/// Istio's words when DNS capture is asked for but there is nothing to capture.
const NO_DNS_SERVERS: &str = "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided \
     (the pod's resolv.conf names no nameserver). DNS capture disabled.";

pub fn run(req: &Request) -> Result<Report, CaptureError> {
    let routes = RoutePlan::for_config(&req.config);
    // Refuse a plan that would break routing before any rule is touched.
    routes.check().map_err(CaptureError::Routes)?;
    let _lock = if req.dry_run { None } else { Some(namespace::lock(req.lock_wait)?) };
    let mut report = match (req.operation, req.backend) {
        (Operation::Cleanup, backend) => cleanup(req, backend),
        (Operation::Apply { .. }, Backend::Iptables(opts)) => apply_iptables(req, opts, &routes),
        (Operation::Apply { reconcile, .. }, Backend::Nftables) => apply_nftables(req, reconcile, &routes),
    }?;
    if matches!(&req.config.dns, DnsCapture::Servers { v4, v6 } if v4.is_empty() && v6.is_empty()) {
        report.warnings.insert(0, NO_DNS_SERVERS.to_string());
    }
    Ok(report)
}

/// Checks, changing nothing, that the namespace holds exactly what an apply of `config` would
/// leave there (rules and routes, and no capture by the other backend). `lock_wait` bounds the
/// wait for a run in progress, so that a half-finished one is not judged.
pub fn verify(config: &CaptureConfig, backend: Backend, lock_wait: Duration) -> Result<(), CaptureError> {
    let routes = RoutePlan::for_config(config);
    routes.check().map_err(CaptureError::Routes)?;
    let _lock = namespace::lock(lock_wait)?;
    let mut differences = match backend {
        Backend::Iptables(opts) => iptables::differences(&model::build(config, Dialect::Iptables), opts)?,
        Backend::Nftables => nftables::differences(&model::build(config, Dialect::Nftables))?,
    };
    if let Some(other) = other_capture(config, backend)?.0 {
        differences.push(format!("a capture made with {} is present too", other.name()));
    }
    let missing = routes::missing(&routes).map_err(CaptureError::Routes)?;
    differences.extend(missing.into_iter().map(|command| format!("routing: missing `{command}`")));
    if differences.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::NotInPlace { differences })
    }
}

/// A capture the other backend made (both must never be active: they would stack).
enum OtherCapture {
    /// Our `inet istio-proxy-*` tables.
    Nftables,
    /// Our iptables rules, with the plan that removes them.
    Iptables(iptables::Plan),
}

impl OtherCapture {
    fn name(&self) -> &'static str {
        match self {
            OtherCapture::Nftables => "native nftables (tables inet istio-proxy-*)",
            OtherCapture::Iptables(_) => "iptables (ISTIO_* chains)",
        }
    }

    /// The dry-run text of its removal.
    fn describe_removal(&self) -> String {
        match self {
            OtherCapture::Nftables => nftables::cleanup_script(),
            OtherCapture::Iptables(plan) => describe_steps(plan),
        }
    }

    /// Removes it; returns what was sent.
    fn remove(&self, lock_wait: Duration) -> Result<Vec<Sent>, CaptureError> {
        match self {
            OtherCapture::Nftables => {
                nftables::cleanup()?;
                Ok(vec![Sent::Nftables { script: nftables::cleanup_script() }])
            }
            OtherCapture::Iptables(plan) => {
                iptables::execute(plan, lock_wait)?;
                Ok(restores(plan))
            }
        }
    }
}

/// The capture of the backend not chosen, if the namespace holds one, and the warnings of
/// looking: where iptables cannot be read (no iptables in the image), native nftables goes on.
fn other_capture(config: &CaptureConfig, chosen: Backend) -> Result<(Option<OtherCapture>, Vec<String>), CaptureError> {
    match chosen {
        Backend::Iptables(_) => Ok((nftables::holds_ours()?.then_some(OtherCapture::Nftables), Vec::new())),
        Backend::Nftables if !iptables::holds_any_table() => Ok((None, Vec::new())),
        Backend::Nftables => {
            let ruleset = model::build(config, Dialect::Iptables);
            match iptables::plan(&ruleset, Operation::Cleanup, IptablesOptions::default()) {
                Ok(plan) if plan.steps.is_empty() => Ok((None, Vec::new())),
                Ok(plan) => Ok((Some(OtherCapture::Iptables(plan)), Vec::new())),
                Err(e) => Ok((None, vec![format!("could not look for an iptables capture to replace: {e}")])),
            }
        }
    }
}

/// Applying next to the other backend's capture is refused unless `--reconcile`, which
/// replaces it: returns what to remove once our own capture is in place.
fn replaced_capture(req: &Request) -> Result<(Option<OtherCapture>, Vec<String>), CaptureError> {
    let (other, warnings) = other_capture(&req.config, req.backend)?;
    match other {
        Some(other) if !matches!(req.operation, Operation::Apply { reconcile: true, .. }) => {
            Err(CaptureError::OtherBackend { other: other.name() })
        }
        other => Ok((other, warnings)),
    }
}

fn apply_nftables(req: &Request, reconcile: bool, routes: &RoutePlan) -> Result<Report, CaptureError> {
    let ruleset = model::build(&req.config, Dialect::Nftables);
    let (replaced, mut warnings) = replaced_capture(req)?;
    if req.dry_run {
        let mut text = nftables::script(&ruleset);
        text.push_str(&describe_routes(routes));
        text.extend(replaced.map(|other| other.describe_removal()));
        return Ok(Report { dry_run: Some(text), warnings, ..Report::new(Outcome::Unchanged) });
    }
    // --force-apply has nothing to force here: an exact ruleset is already what we'd send.
    let (applied, routing_warnings, added) = apply_with_routes(
        routes,
        || nftables::apply(&ruleset, reconcile, req.detail).map_err(CaptureError::from),
        // Only a fresh install can be undone exactly (by deleting what we just created).
        |applied| match applied.outcome {
            Outcome::Applied => nftables::cleanup().map(drop).map_err(CaptureError::from),
            _ => Ok(()),
        },
    )?;
    warnings.extend(routing_warnings);
    let script = applied.script;
    let sent = sent(req.detail, || script.map(|script| Sent::Nftables { script }).into_iter().collect(), &added);
    let report = Report { warnings, sent, trace: applied.trace, ..Report::new(applied.outcome) };
    finish_replacing(report, replaced, req)
}

fn apply_iptables(req: &Request, opts: IptablesOptions, routes: &RoutePlan) -> Result<Report, CaptureError> {
    let ruleset = model::build(&req.config, Dialect::Iptables);
    let plan = iptables::plan(&ruleset, req.operation, opts)?;
    let trace = trace(req.detail, &plan);
    let (replaced, mut warnings) = replaced_capture(req)?;
    if req.dry_run {
        let mut text = describe_steps(&plan);
        text.push_str(&describe_routes(routes));
        text.extend(replaced.map(|other| other.describe_removal()));
        return Ok(Report { dry_run: Some(text), warnings, trace, ..Report::new(plan.outcome) });
    }
    let (outcome, routing_warnings, added) = apply_with_routes(
        routes,
        || iptables::execute(&plan, req.lock_wait).map_err(CaptureError::from),
        |_| iptables::undo(&plan, req.lock_wait).map_err(CaptureError::from),
    )?;
    warnings.extend(routing_warnings);
    let report = Report { warnings, sent: sent(req.detail, || restores(&plan), &added), trace, ..Report::new(outcome) };
    finish_replacing(report, replaced, req)
}

/// Our capture is in place: the other backend's goes only now, so that no packet passes
/// uncaptured in between.
fn finish_replacing(mut report: Report, replaced: Option<OtherCapture>, req: &Request) -> Result<Report, CaptureError> {
    if let Some(other) = replaced {
        let sent = other.remove(req.lock_wait)?;
        if req.detail >= Detail::Sent {
            report.sent.extend(sent);
        }
        report.outcome = Outcome::Reconciled;
    }
    Ok(report)
}

/// Removes every capture from the namespace, whichever backend made it and whatever settings
/// it had: our iptables rules and chains (`backend`'s variant, or the detected one), our
/// nftables tables, the TPROXY routing and `::6`. Each part is tried even when another fails.
fn cleanup(req: &Request, backend: Backend) -> Result<Report, CaptureError> {
    let opts = match backend {
        Backend::Iptables(opts) => opts,
        Backend::Nftables => IptablesOptions::default(),
    };
    let mut warnings = Vec::new();
    let plan = match iptables::plan(&model::build(&req.config, Dialect::Iptables), Operation::Cleanup, opts) {
        Ok(plan) => Some(plan),
        // Native nftables needs no iptables in the image; without it there is nothing to read.
        Err(IptablesError::Spawn { program, source }) if matches!(backend, Backend::Nftables) => {
            warnings.push(format!("iptables rules were not looked for: could not run {program}: {source}"));
            None
        }
        Err(e) => return Err(e.into()),
    };
    let trace = plan.as_ref().map(|plan| trace(req.detail, plan)).unwrap_or_default();
    let nftables_present = nftables::holds_ours()?;
    let routing = routes::ours().map_err(CaptureError::Routes)?;
    let removals: Vec<String> = routing.iter().map(|found| found.removal()).collect();
    if req.dry_run {
        let mut text = plan.as_ref().map(describe_steps).unwrap_or_default();
        if nftables_present {
            text.push_str(&nftables::cleanup_script());
        }
        text.extend(removals.iter().map(|command| format!("# then: {command}\n")));
        return Ok(Report { dry_run: Some(text), warnings, trace, ..Report::new(Outcome::Unchanged) });
    }
    let results = [
        plan.as_ref()
            .map_or(Ok(Outcome::NothingToRemove), |plan| iptables::execute(plan, req.lock_wait).map_err(CaptureError::from)),
        nftables::cleanup().map_err(CaptureError::from),
        routes::remove_ours().map(|()| Outcome::NothingToRemove).map_err(CaptureError::Routes),
    ];
    let mut outcome = if routing.is_empty() { Outcome::NothingToRemove } else { Outcome::Removed };
    for result in results {
        if result? == Outcome::Removed {
            outcome = Outcome::Removed;
        }
    }
    let mut sent = Vec::new();
    if req.detail >= Detail::Sent {
        sent.extend(plan.as_ref().map(restores).unwrap_or_default());
        if nftables_present {
            sent.push(Sent::Nftables { script: nftables::cleanup_script() });
        }
        if !removals.is_empty() {
            sent.push(Sent::Routing { commands: removals });
        }
    }
    Ok(Report { warnings, sent, trace, ..Report::new(outcome) })
}

/// [`Detail::Trace`]: what the iptables plan read and decided, per family.
fn trace(detail: Detail, plan: &iptables::Plan) -> Vec<String> {
    if detail >= Detail::Trace {
        plan.families.iter().map(|f| f.describe()).collect()
    } else {
        Vec::new()
    }
}

/// The restores a plan sends, as [`Sent`] records.
fn restores(plan: &iptables::Plan) -> Vec<Sent> {
    let restore = |step: &iptables::Step| Sent::IptablesRestore { program: step.program().into(), input: step.payload.clone() };
    plan.steps.iter().map(restore).collect()
}

/// [`Detail::Sent`] and up: the rules sent, then the routing this run added.
fn sent(detail: Detail, rules: impl FnOnce() -> Vec<Sent>, added: &routes::Added) -> Vec<Sent> {
    if detail < Detail::Sent {
        return Vec::new();
    }
    let mut sent = rules();
    let commands = added.describe();
    if !commands.is_empty() {
        sent.push(Sent::Routing { commands });
    }
    sent
}

/// The restores a plan would run, for --dry-run.
fn describe_steps(plan: &iptables::Plan) -> String {
    let mut text = String::new();
    if plan.steps.is_empty() {
        text.push_str("# nothing to change in the rules: they are already as requested\n");
    }
    for step in &plan.steps {
        let _ = writeln!(text, "# {}\n{}", step.command(), step.payload);
    }
    text
}

/// The `ip` commands the routing step would run, for --dry-run.
fn describe_routes(routes: &RoutePlan) -> String {
    routes.describe().iter().map(|l| format!("# then: {l}\n")).collect()
}

/// Applies the rules and the routing they rely on concurrently (they are independent, and the
/// init container's start-up time is the pod's). If either fails, what the other did in this
/// run is taken back: nothing is left half-applied. A namespace without IPv6 keeps its IPv4
/// capture and gets a warning.
fn apply_with_routes<T>(
    routes: &RoutePlan,
    apply_rules: impl FnOnce() -> Result<T, CaptureError>,
    undo_rules: impl FnOnce(&T) -> Result<(), CaptureError>,
) -> Result<(T, Vec<String>, routes::Added), CaptureError> {
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
        Ok(outcome) => Ok((outcome, warnings, added)),
        Err(e) => {
            // The rules undid themselves; take back the routing this run added.
            let _ = routes::undo(&added);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Front;

    #[test]
    fn the_backend_follows_the_settings_and_a_bad_variant_is_named() {
        let mut settings = Settings::new(Front::CniKey);
        settings.set_named(Front::CniKey, "forceIptablesBinary", "x").unwrap();
        let err = Backend::from_settings(&settings).unwrap_err().to_string();
        assert_eq!(err, "forceIptablesBinary: \"x\" is not an iptables variant (expected legacy or nft)");
        settings.set_named(Front::CniKey, "nativeNftables", "true").unwrap();
        assert!(matches!(Backend::from_settings(&settings), Ok(Backend::Nftables)));
    }
}
