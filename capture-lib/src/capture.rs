//! One run of the tool: build the ruleset, hand it to the chosen backend, then routes.
//!
//! This is the only place that sequences the steps, so "what happens, in which order, and
//! what is undone when a step fails" reads top to bottom here. A backend implements
//! [`RuleBackend`]: it reads the namespace and decides what to send ([`RuleBackend::plan`]),
//! and the [`RulePlan`] it returns sends that, describes it, or takes it back. Which backend
//! runs, what happens around it (routing, the other backend's capture) and what is undone
//! when a step fails is decided here and nowhere else.

use std::time::Duration;

use thiserror::Error;

use crate::config::{ConfigError, DnsCapture};
use crate::family::IpFamily;
use crate::iptables::{self, Iptables, IptablesError, IptablesOptions, Variant};
use crate::model::{self, Dialect, Ruleset};
use crate::namespace::{self, NamespaceError};
use crate::nftables::{self, NftError, Nftables};
use crate::routes::{self, RouteError, RoutePlan};
use crate::settings::{CaptureConfig, Setting, Settings};
use crate::{Detail, Outcome};

/// Which netfilter interface programs the rules.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Iptables(IptablesOptions),
    Nftables,
}

/// What to do with the ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Install; `reconcile` replaces drifted rules, `force` replaces even exact ones.
    Apply { reconcile: bool, force: bool },
    /// Remove everything of ours.
    Cleanup,
}

/// A netfilter backend, as a run drives it. It reads and changes only its own rules: the
/// routing, the lock and the other backend's capture are the run's.
pub trait RuleBackend {
    /// The capture it makes, as messages name it.
    fn capture_name(&self) -> &'static str;

    /// The dialect of the model's rules it programs.
    fn dialect(&self) -> Dialect;

    /// Reads the namespace and decides what `operation` sends; changes nothing. An apply refuses
    /// our rules drifted from `ruleset` unless `reconcile`, and replaces exact ones with `force`.
    /// A cleanup finds everything of ours by what it is, whatever settings made it.
    fn plan(&self, ruleset: &Ruleset, operation: Operation) -> Result<Box<dyn RulePlan + '_>, CaptureError>;

    /// The plan `--dry-run` describes: [`RuleBackend::plan`]'s, unless the backend says otherwise.
    fn dry_run_plan(&self, ruleset: &Ruleset, operation: Operation) -> Result<Box<dyn RulePlan + '_>, CaptureError> {
        self.plan(ruleset, operation)
    }

    /// How the namespace's rules differ from `ruleset`, in words; empty when exactly in place.
    /// Changes nothing.
    fn differences(&self, ruleset: &Ruleset) -> Result<Vec<String>, CaptureError>;

    /// True only when the namespace certainly holds none of this backend's rules, as a glance
    /// tells without reading them (no process, no parsing): a run then looks no further.
    fn holds_nothing(&self) -> bool {
        false
    }

    /// Why, when `error` says the backend cannot run here at all (its programs are not
    /// installed): the namespace then holds none of its capture.
    fn unavailable(&self, error: &CaptureError) -> Option<String> {
        let _ = error;
        None
    }
}

/// What a backend decided: the changes, ready to send.
pub trait RulePlan {
    /// What sending it does.
    fn outcome(&self) -> Outcome;

    /// Sends it. A failure leaves the rules as they were, or says that it could not.
    fn apply(&self) -> Result<Outcome, CaptureError>;

    /// Takes back what a successful [`RulePlan::apply`] changed, as far as the backend can
    /// (a step after it failed).
    fn undo(&self) -> Result<(), CaptureError>;

    /// What [`RulePlan::apply`] sends, as text a person can read and replay (empty: nothing).
    fn sent(&self) -> Vec<Sent>;

    /// What `--dry-run` prints for it.
    fn describe(&self) -> String;

    /// The state read and the decision made from it, for a debug log.
    fn trace(&self) -> Vec<String>;
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
    /// Changes to the kernel's ip sets, as the `ipset restore` input that makes them.
    IpSets { script: String },
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
    #[error("this network namespace already holds a capture made with {other}, and two captures would stack")]
    OtherBackend { other: &'static str },
}

impl CaptureError {
    /// Whether a reconciling run would replace what stopped this one (drifted rules, or the
    /// other backend's capture): each front end says how to ask for one in its own words.
    pub fn needs_reconcile(&self) -> bool {
        matches!(
            self,
            CaptureError::Iptables(IptablesError::Drift { .. } | IptablesError::SetDrift { .. })
                | CaptureError::Nftables(NftError::Drift { .. })
                | CaptureError::OtherBackend { .. }
        )
    }
}

/// Istio's words when DNS capture is asked for but there is nothing to capture.
const NO_DNS_SERVERS: &str = "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided \
     (the pod's resolv.conf names no nameserver). DNS capture disabled.";

pub fn run(req: &Request) -> Result<Report, CaptureError> {
    let routes = RoutePlan::for_config(&req.config);
    // Refuse a plan that would break routing before any rule is touched.
    routes.check().map_err(CaptureError::Routes)?;
    let _lock = if req.dry_run { None } else { Some(namespace::lock(req.lock_wait)?) };
    let backends = Backends::new(req.backend, req.lock_wait);
    let mut report = match req.operation {
        Operation::Apply { reconcile, .. } => apply(req, &routes, &backends, reconcile),
        Operation::Cleanup => cleanup(req, &backends),
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
    let backends = Backends::new(backend, lock_wait);
    let mut differences = backends.chosen().differences(&ruleset(config, backends.chosen()))?;
    if found_capture(config, backends.other(), &mut Vec::new()).is_some() {
        differences.push(format!("a capture made with {} is present too", backends.other().capture_name()));
    }
    let missing = routes::missing(&routes).map_err(CaptureError::Routes)?;
    differences.extend(missing.into_iter().map(|command| format!("routing: missing `{command}`")));
    if differences.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::NotInPlace { differences })
    }
}

/// Both backends, and which the request chose: a namespace holds one capture, so a run looks
/// at the other's too.
struct Backends {
    iptables: Iptables,
    nftables: Nftables,
    native: bool,
}

impl Backends {
    fn new(backend: Backend, lock_wait: Duration) -> Backends {
        let (options, native) = match backend {
            Backend::Iptables(options) => (options, false),
            Backend::Nftables => (IptablesOptions::default(), true),
        };
        Backends { iptables: Iptables { options, lock_wait, nf_tables: &Nftables }, nftables: Nftables, native }
    }

    fn chosen(&self) -> &dyn RuleBackend {
        if self.native {
            &self.nftables
        } else {
            &self.iptables
        }
    }

    fn other(&self) -> &dyn RuleBackend {
        if self.native {
            &self.iptables
        } else {
            &self.nftables
        }
    }

    /// Both, in the order a cleanup removes them, each with whether it is the chosen one.
    fn both(&self) -> [(&dyn RuleBackend, bool); 2] {
        [(&self.iptables, !self.native), (&self.nftables, self.native)]
    }
}

/// iptables-nft keeps its tables in nf_tables: the iptables backend asks about them through
/// the nftables backend's netlink client, so that neither backend reaches into the other.
impl iptables::NfTables for Nftables {
    fn holds_tables(&self, family: IpFamily) -> Option<bool> {
        nftables::has_iptables_tables(family).ok()
    }

    fn prune(&self, family: IpFamily, tables: &[String]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(nftables::prune_iptables_tables(family, tables)?)
    }
}

/// The model's rules for `config`, in `backend`'s dialect.
fn ruleset(config: &CaptureConfig, backend: &dyn RuleBackend) -> Ruleset {
    model::build(config, backend.dialect())
}

/// The capture `backend` made in the namespace, as the plan that removes it (`None`: there is
/// none). Where it cannot be looked at (no iptables in the image), a warning says so.
fn found_capture<'b>(
    config: &CaptureConfig,
    backend: &'b dyn RuleBackend,
    warnings: &mut Vec<String>,
) -> Option<Box<dyn RulePlan + 'b>> {
    if backend.holds_nothing() {
        return None;
    }
    match backend.plan(&ruleset(config, backend), Operation::Cleanup) {
        Ok(plan) => (plan.outcome() == Outcome::Removed).then_some(plan),
        Err(e) => {
            warnings.push(format!("could not look for a capture made with {} to replace: {e}", backend.capture_name()));
            None
        }
    }
}

fn apply(req: &Request, routes: &RoutePlan, backends: &Backends, reconcile: bool) -> Result<Report, CaptureError> {
    let chosen = backends.chosen();
    let ruleset = ruleset(&req.config, chosen);
    let plan = if req.dry_run { chosen.dry_run_plan(&ruleset, req.operation) } else { chosen.plan(&ruleset, req.operation) }?;
    let trace = if req.detail >= Detail::Trace { plan.trace() } else { Vec::new() };
    // Applying next to the other backend's capture is refused unless reconciling, which
    // replaces it.
    let mut warnings = Vec::new();
    let replaced = found_capture(&req.config, backends.other(), &mut warnings);
    if replaced.is_some() && !reconcile {
        return Err(CaptureError::OtherBackend { other: backends.other().capture_name() });
    }
    if req.dry_run {
        let mut text = plan.describe();
        text.push_str(&describe_routes(routes));
        text.extend(replaced.map(|other| other.describe()));
        return Ok(Report { dry_run: Some(text), warnings, trace, ..Report::new(plan.outcome()) });
    }
    let (mut outcome, routing_warnings, added) = apply_with_routes(routes, plan.as_ref())?;
    warnings.extend(routing_warnings);
    let mut sent = Vec::new();
    if req.detail >= Detail::Sent {
        sent = plan.sent();
        let commands = added.describe();
        if !commands.is_empty() {
            sent.push(Sent::Routing { commands });
        }
    }
    // Our capture is in place: the other backend's goes only now, so that no packet passes
    // uncaptured in between.
    if let Some(other) = replaced {
        other.apply()?;
        if req.detail >= Detail::Sent {
            sent.extend(other.sent());
        }
        outcome = Outcome::Reconciled;
    }
    Ok(Report { warnings, sent, trace, ..Report::new(outcome) })
}

/// Removes every capture from the namespace, whichever backend made it and whatever settings
/// it had: our iptables rules and chains (the chosen variant, or the detected one), our
/// nftables tables, the TPROXY routing and `::6`. Each part is tried even when another fails.
fn cleanup(req: &Request, backends: &Backends) -> Result<Report, CaptureError> {
    let mut warnings = Vec::new();
    let mut plans = Vec::new();
    for (backend, chosen) in backends.both() {
        match backend.plan(&ruleset(&req.config, backend), Operation::Cleanup) {
            Ok(plan) => plans.push(plan),
            // Native nftables needs no iptables in the image; without it there is nothing to read.
            Err(e) => match backend.unavailable(&e) {
                Some(why) if !chosen => {
                    warnings.push(format!("a capture made with {} was not looked for: {why}", backend.capture_name()))
                }
                _ => return Err(e),
            },
        }
    }
    let trace = if req.detail >= Detail::Trace { plans.iter().flat_map(|plan| plan.trace()).collect() } else { Vec::new() };
    let routing = routes::ours().map_err(CaptureError::Routes)?;
    let removals: Vec<String> = routing.iter().map(|found| found.removal()).collect();
    if req.dry_run {
        let mut text: String = plans.iter().map(|plan| plan.describe()).collect();
        text.extend(removals.iter().map(|command| format!("# then: {command}\n")));
        return Ok(Report { dry_run: Some(text), warnings, trace, ..Report::new(Outcome::Unchanged) });
    }
    let results: Vec<Result<Outcome, CaptureError>> = plans
        .iter()
        .map(|plan| plan.apply())
        .chain([routes::remove_ours().map(|()| Outcome::NothingToRemove).map_err(CaptureError::Routes)])
        .collect();
    let mut outcome = if routing.is_empty() { Outcome::NothingToRemove } else { Outcome::Removed };
    for result in results {
        if result? == Outcome::Removed {
            outcome = Outcome::Removed;
        }
    }
    let mut sent = Vec::new();
    if req.detail >= Detail::Sent {
        sent.extend(plans.iter().flat_map(|plan| plan.sent()));
        if !removals.is_empty() {
            sent.push(Sent::Routing { commands: removals });
        }
    }
    Ok(Report { warnings, sent, trace, ..Report::new(outcome) })
}

/// The `ip` commands the routing step would run, for --dry-run.
fn describe_routes(routes: &RoutePlan) -> String {
    routes.describe().iter().map(|l| format!("# then: {l}\n")).collect()
}

/// Applies the rules and the routing they rely on concurrently (they are independent, and the
/// init container's start-up time is the pod's). If either fails, what the other did in this
/// run is taken back: nothing is left half-applied. A namespace without IPv6 keeps its IPv4
/// capture and gets a warning.
fn apply_with_routes(routes: &RoutePlan, plan: &dyn RulePlan) -> Result<(Outcome, Vec<String>, routes::Added), CaptureError> {
    let mut added = routes::Added::default();
    let (rules, routing) = std::thread::scope(|scope| {
        let routing = scope.spawn(|| routes::apply_tracked(routes, &mut added));
        let rules = plan.apply();
        (rules, routing.join().expect("routing thread panicked"))
    });
    let warnings = match (&rules, routing) {
        (_, Ok(())) => Vec::new(),
        (_, Err(e @ RouteError::Ipv6Disabled { .. })) => vec![e.to_string()],
        (Err(_), Err(_)) => Vec::new(),
        (Ok(_), Err(source)) => {
            let _ = routes::undo(&added);
            return Err(match plan.undo() {
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
