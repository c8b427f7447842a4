//! The iptables backend: one `iptables-restore` per family, atomic per table.
//!
//! The plan compares the kernel's current state (`iptables-save`) with the model, rule by
//! rule, and decides: install (nothing of ours there), nothing (already exact), or replace
//! (drifted; only with `--reconcile`). A replacement deletes our rules and rewrites our
//! chains inside the same table transaction, so no packet ever sees a half-built ruleset.
//! If a later restore fails, the tables touched so far are restored from the saved state.

mod exec;
mod render;
mod sets;
mod shapes;
mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::time::Duration;

use thiserror::Error;

use exec::Binaries;
pub use exec::Variant;
use render::{chain_name, owned_chain_names, rule_spec, table_name};
use shapes::is_our_shape;
use state::{jump_target, parse_save, SaveState, TableState};

use crate::capture::{CaptureError, Operation, RuleBackend, RulePlan, Sent};
use crate::drift::{chain_rule_differences, count, Difference, Kind};
use crate::family::IpFamily;
use crate::ipset::IpsetError;
use crate::model::{Dialect, Position, Ruleset};
use crate::settings::Setting;
use crate::Outcome;

#[derive(Debug, Error)]
pub enum IptablesError {
    #[error("could not run {program}: {source}{}", exec::spawn_hint(source))]
    Spawn { program: String, source: std::io::Error },
    #[error(
        "{program} takes the xtables lock {} and cannot open it: {source}\n  hint: mount a writable volume at {} \
         (in a pod: an emptyDir), point XTABLES_LOCKFILE at a writable file, or use native nftables \
         ({}), which takes no such lock", path.display(), path.parent().unwrap_or(path).display(),
         Setting::NativeNftables.known_as()
    )]
    Lock { program: String, path: std::path::PathBuf, source: std::io::Error },
    #[error("{program} failed: {stderr}")]
    Save { program: String, stderr: String },
    #[error("{program} refused the rules: {stderr}{}{}", line.as_ref().map(|l| format!("\n  refused line: {l}")).unwrap_or_default(), hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    Restore { program: String, stderr: String, line: Option<String>, hint: Option<String> },
    #[error("the {family} capture rules in this namespace differ from the requested ones:\n  {}", details.join("\n  "))]
    Drift { family: IpFamily, details: Vec<String> },
    #[error("{source}\nthe namespace was rolled back to its previous rules")]
    RolledBack { source: Box<IptablesError> },
    #[error("{source}\nrolling back also failed ({rollback}); the namespace may hold part of the new rules: remove the capture (a cleanup run), then run again")]
    RollbackFailed { source: Box<IptablesError>, rollback: Box<IptablesError> },
    #[error("{source}\nnothing was changed")]
    NothingChanged { source: Box<IptablesError> },
    #[error("the {family} rules are in place, but removing the tables left empty failed: {source}")]
    Prune { family: IpFamily, source: Box<dyn std::error::Error + Send + Sync> },
    #[error(transparent)]
    Ipset(#[from] IpsetError),
    #[error("the capture's ip sets in this namespace differ from the requested ones:\n  {}", details.join("\n  "))]
    SetDrift { details: Vec<String> },
    #[error(
        "ip set {set} is {found}, where the capture needs {wanted}; the kernel swaps only sets of one kind, and a rule \
         matches this one: remove it (a cleanup run removes the capture with its sets), then run again"
    )]
    SetOfAnotherKind { set: String, found: String, wanted: String },
    #[error("{}", errors.join("\n"))]
    SetsLeft { errors: Vec<String> },
}

/// How to reach iptables.
#[derive(Debug, Clone, Copy, Default)]
pub struct IptablesOptions {
    /// `FORCE_IPTABLES_BINARY`; `None` detects per family as Istio does.
    pub variant: Option<Variant>,
}

/// What this backend asks of nf_tables, where iptables-nft keeps its tables. It is given one
/// (the nftables backend's netlink client answers), so that it speaks no netlink itself.
pub trait NfTables: Sync + std::fmt::Debug {
    /// Whether nf_tables holds any table of the family; `None` when it cannot tell.
    fn holds_tables(&self, family: IpFamily) -> Option<bool>;

    /// iptables-nft keeps a table and its base chains once a rule went into them, even after
    /// every rule is gone, and each hooked chain still costs every packet: deletes, among
    /// `tables` of the family, the base chains left with no rule and an accepting policy, and
    /// the tables left with nothing. Anything added meanwhile stays, and so does the rest.
    fn prune(&self, family: IpFamily, tables: &[String]) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// The iptables backend: how to reach iptables, how long to wait for its lock, and nf_tables.
#[derive(Debug, Clone, Copy)]
pub struct Iptables {
    pub options: IptablesOptions,
    /// How long a restore waits for the xtables lock.
    pub lock_wait: Duration,
    pub nf_tables: &'static dyn NfTables,
}

/// One family's restore, ready to run (or to print for --dry-run).
#[derive(Debug)]
struct Step {
    bins: Binaries,
    payload: String,
    /// The tables this step touches as they were before, to put back on failure.
    rollback: String,
    /// Tables the payload may leave without a rule of ours, which iptables-nft keeps, with
    /// hooked base chains. (A rollback replaces whole tables, so it leaves none.)
    emptied: Vec<String>,
}

impl Step {
    /// The command line that would run, for --dry-run output.
    fn command(&self) -> String {
        format!("{} --noflush ({})", self.bins.restore, self.bins.family)
    }
}

/// What [`Iptables::plan`] decided: a restore per family that changes anything, and the ip
/// sets the rules match, made before the restores and removed after them.
#[derive(Debug)]
struct Plan {
    backend: Iptables,
    steps: Vec<Step>,
    sets: sets::SetPlan,
    outcome: Outcome,
    /// What was read and decided, per family, for a debug log.
    families: Vec<FamilyPlan>,
}

/// One family's state as `plan` read it, and what it decided.
#[derive(Debug)]
struct FamilyPlan {
    family: IpFamily,
    /// The save program that read the state; `None` when the kernel holds no table of the
    /// family, so there was nothing to read.
    read_with: Option<String>,
    state: SaveState,
    decision: String,
}

impl FamilyPlan {
    /// The state read back and the decision, as text.
    fn describe(&self) -> String {
        let state = match &self.read_with {
            None => "no table of this family in the kernel, nothing to read".to_string(),
            Some(program) => {
                let tables: String = self.state.values().map(|t| t.raw.as_str()).collect();
                format!("current state ({program}):\n{}", tables.trim_end())
            }
        };
        format!("{family}: {state}\n{family} plan: {}", self.decision, family = self.family)
    }
}

impl RuleBackend for Iptables {
    fn capture_name(&self) -> &'static str {
        "iptables (ISTIO_* chains)"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Iptables
    }

    fn plan(&self, ruleset: &Ruleset, operation: Operation) -> Result<Box<dyn RulePlan + '_>, CaptureError> {
        Ok(Box::new(self.read_and_decide(ruleset, operation)?))
    }

    /// Like `plan`, looks at IPv6 only when the ruleset programs it.
    fn differences(&self, ruleset: &Ruleset) -> Result<Vec<String>, CaptureError> {
        let mut out = Vec::new();
        for family in IpFamily::ALL.into_iter().filter(|&f| f == IpFamily::V4 || ruleset.ipv6) {
            let current = parse_save(&self.binaries(family).save()?);
            out.extend(Desired::new(ruleset, family).drift(&current, family).iter().map(ToString::to_string));
        }
        let wanted = sets::wanted(ruleset);
        let found = sets::read(!wanted.is_empty()).map_err(IptablesError::Ipset)?;
        out.extend(sets::differences(&wanted, &found).iter().map(ToString::to_string));
        Ok(out)
    }

    /// No table of either variant or family: reads two files and asks nf_tables twice. Ip sets
    /// of ours without rules are no capture (nothing matches them); a cleanup still removes them.
    fn holds_nothing(&self) -> bool {
        IpFamily::ALL
            .into_iter()
            .all(|family| exec::legacy_holds_tables(family) == Some(false) && self.nf_tables.holds_tables(family) == Some(false))
    }

    fn unavailable(&self, error: &CaptureError) -> Option<String> {
        match error {
            CaptureError::Iptables(IptablesError::Spawn { program, source }) => {
                Some(format!("could not run {program}: {source}"))
            }
            _ => None,
        }
    }
}

impl Iptables {
    /// The save/restore pair for a family: the forced variant, or the one Istio would detect.
    fn binaries(&self, family: IpFamily) -> Binaries {
        Binaries::new(self.options.variant.unwrap_or_else(|| Variant::detect(family)), family)
    }

    /// Reads the namespace and decides what to send, per family. Touches nothing.
    fn read_and_decide(&self, ruleset: &Ruleset, op: Operation) -> Result<Plan, IptablesError> {
        let mut steps = Vec::new();
        let mut outcome = match op {
            Operation::Apply { .. } => Outcome::Unchanged,
            Operation::Cleanup => Outcome::NothingToRemove,
        };
        // IPv6 not programmed: its state is not needed to apply, but cleanup still looks.
        let families: Vec<IpFamily> =
            IpFamily::ALL.into_iter().filter(|&f| f == IpFamily::V4 || ruleset.ipv6 || op == Operation::Cleanup).collect();
        let mut planned = Vec::new();
        for (bins, read) in self.read_states(&families) {
            let family = bins.family;
            let needed = family == IpFamily::V4 || ruleset.ipv6;
            let (current, read_with) = match read {
                Ok(read) => read,
                Err(_) if !needed => continue,
                Err(e) => return Err(e),
            };
            let desired = if needed { Desired::new(ruleset, family) } else { Desired::default() };
            let residue = desired.residue(&current);
            let decided = decide(&desired, &current, &residue, op, family)?;
            outcome = strongest(outcome, decided.outcome);
            if let Some(payload) = decided.payload {
                let rollback = rollback_payload(&current, &payload);
                let wanted = |table: &String| op != Operation::Cleanup && desired.tables.contains_key(table.as_str());
                let emptied = residue.into_keys().filter(|t| !wanted(t)).collect();
                steps.push(Step { bins, payload, rollback, emptied });
            }
            planned.push(FamilyPlan { family, read_with, state: current, decision: decided.why });
        }
        let held_nothing = planned.iter().all(|family| family.read_with.is_none());
        let sets = self.plan_sets(ruleset, op, held_nothing)?;
        outcome = strongest(outcome, sets.outcome);
        Ok(Plan { backend: *self, steps, sets, outcome, families: planned })
    }

    /// The ip sets' part of the plan. A cleanup that cannot read them still removes the rules.
    /// A rule-form apply to a namespace that `held_nothing` of iptables lists no sets: no rule
    /// can match one of ours there, and one a crash left behind is a cleanup's to remove, so the
    /// common first run stays as fast as before the set form.
    fn plan_sets(&self, ruleset: &Ruleset, op: Operation, held_nothing: bool) -> Result<sets::SetPlan, IptablesError> {
        let wanted = if op == Operation::Cleanup { Vec::new() } else { sets::wanted(ruleset) };
        if wanted.is_empty() && op != Operation::Cleanup && held_nothing {
            return sets::decide(&wanted, Vec::new(), op);
        }
        match sets::read(!wanted.is_empty()) {
            Ok(found) => sets::decide(&wanted, found, op),
            Err(e) if op == Operation::Cleanup => Ok(sets::unreadable(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Each family's current state, read concurrently (two processes at most, none for a family
    /// that holds no table at all, and no thread unless two are read).
    fn read_states(&self, families: &[IpFamily]) -> Vec<(Binaries, ReadState)> {
        let (empty, to_read): (Vec<Binaries>, Vec<Binaries>) =
            families.iter().map(|&family| self.binaries(family)).partition(|bins| bins.holds_nothing(self.nf_tables));
        let read = |bins: Binaries| {
            let state = bins.save().map(|text| (parse_save(&text), Some(bins.save.clone())));
            (bins, state)
        };
        let mut states: Vec<(Binaries, ReadState)> = if to_read.len() > 1 {
            std::thread::scope(|scope| {
                let readers: Vec<_> = to_read.into_iter().map(|bins| scope.spawn(move || read(bins))).collect();
                readers.into_iter().map(|r| r.join().expect("state reader panicked")).collect()
            })
        } else {
            to_read.into_iter().map(read).collect()
        };
        states.extend(empty.into_iter().map(|bins| (bins, Ok((SaveState::new(), None)))));
        states.sort_by_key(|(bins, _)| bins.family);
        states
    }
}

/// The restore input that installs `ruleset` for one family in a namespace holding nothing of
/// ours. Reads no state: what `plan` sends to a fresh namespace, for fuzzing and review.
pub fn install_payload(ruleset: &Ruleset, family: IpFamily) -> String {
    Desired::new(ruleset, family).payload(&BTreeMap::new(), true)
}

/// The state of one family, and the save program that read it (`None`: the family holds no table).
type ReadState = Result<(SaveState, Option<String>), IptablesError>;

/// One family's decision: the restore input to send (`None`: nothing), why, and the outcome.
struct Decision {
    payload: Option<String>,
    why: String,
    outcome: Outcome,
}

/// Decides, from one family's current state and what of ours it holds, what `op` sends:
/// install where nothing of ours is, nothing where ours is exact (unless forced), a
/// replacement where it drifted (only with `reconcile`), or the removal of everything of ours.
fn decide(
    desired: &Desired,
    current: &SaveState,
    residue: &BTreeMap<String, TableResidue>,
    op: Operation,
    family: IpFamily,
) -> Result<Decision, IptablesError> {
    let decision = |payload, why: &str, outcome| Decision { payload, why: why.to_string(), outcome };
    Ok(match op {
        Operation::Cleanup if residue.is_empty() => {
            decision(None, "nothing of ours: nothing to remove", Outcome::NothingToRemove)
        }
        Operation::Cleanup => decision(Some(desired.payload(residue, false)), "remove our chains and rules", Outcome::Removed),
        Operation::Apply { .. } if residue.is_empty() => {
            decision(Some(desired.payload(residue, true)), "nothing of ours yet: install", Outcome::Applied)
        }
        Operation::Apply { reconcile, force } => {
            let drift: Vec<String> = desired.drift(current, family).iter().map(ToString::to_string).collect();
            if drift.is_empty() && !force {
                decision(None, "our rules are exactly as planned: nothing to send", Outcome::Unchanged)
            } else if drift.is_empty() {
                let why = "our rules are as planned; rewriting them, as forced";
                decision(Some(desired.payload(residue, true)), why, Outcome::Reconciled)
            } else if reconcile {
                let why = format!("our rules differ from the plan; replacing them (reconciling):\n  {}", drift.join("\n  "));
                decision(Some(desired.payload(residue, true)), &why, Outcome::Reconciled)
            } else {
                return Err(IptablesError::Drift { family, details: drift });
            }
        }
    })
}

/// The strongest outcome of the families': Reconciled over Applied over Unchanged, Removed
/// over NothingToRemove.
fn strongest(a: Outcome, b: Outcome) -> Outcome {
    let rank = |outcome| match outcome {
        Outcome::Unchanged | Outcome::NothingToRemove => 0,
        Outcome::Applied | Outcome::Removed => 1,
        Outcome::Reconciled => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

impl RulePlan for Plan {
    fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Runs the plan; on failure puts every table it touched back as it was. The families are
    /// independent, so their restores run concurrently.
    fn apply(&self) -> Result<Outcome, CaptureError> {
        Ok(self.execute()?)
    }

    /// Puts every table the plan touches back as it was before the plan was made, and the ip
    /// sets: those the old rules match first, those only the new rules matched after.
    fn undo(&self) -> Result<(), CaptureError> {
        self.sets.undo_before_rules().map_err(IptablesError::Ipset)?;
        undo_steps(&self.steps.iter().collect::<Vec<_>>(), self.backend.lock_wait)?;
        Ok(self.sets.undo_after_rules().map_err(IptablesError::Ipset)?)
    }

    /// The ip sets made before the restores, the restores, the ip sets removed after them.
    fn sent(&self) -> Vec<Sent> {
        let sets = |before| Some(self.sets.script(before)).filter(|s| !s.is_empty()).map(|script| Sent::IpSets { script });
        let restore = |step: &Step| Sent::IptablesRestore { program: step.bins.restore.clone(), input: step.payload.clone() };
        sets(true).into_iter().chain(self.steps.iter().map(restore)).chain(sets(false)).collect()
    }

    /// The ip set changes (as `ipset restore` input) and the restores the plan would run.
    fn describe(&self) -> String {
        let mut text = String::new();
        let before = self.sets.script(true);
        if !before.is_empty() {
            let _ = write!(text, "# ip sets, before the restores (ipset restore)\n{before}\n");
        }
        if self.steps.is_empty() {
            text.push_str("# nothing to change in the rules: they are already as requested\n");
        }
        for step in &self.steps {
            let _ = writeln!(text, "# {}\n{}", step.command(), step.payload);
        }
        let after = self.sets.script(false);
        if !after.is_empty() {
            let _ = write!(text, "# ip sets, after the restores (ipset restore)\n{after}\n");
        }
        text
    }

    fn trace(&self) -> Vec<String> {
        self.families.iter().map(FamilyPlan::describe).chain([self.sets.describe()]).collect()
    }
}

impl Plan {
    fn execute(&self) -> Result<Outcome, IptablesError> {
        let lock_wait = self.backend.lock_wait;
        if let Err(e) = self.steps.iter().try_for_each(|step| step.bins.check_lock()) {
            return Err(IptablesError::NothingChanged { source: Box::new(e) });
        }
        // The sets the new rules match exist, filled, before any restore.
        self.sets.prepare()?;
        let results: Vec<Result<(), IptablesError>> = std::thread::scope(|scope| {
            let restores: Vec<_> =
                self.steps.iter().map(|step| scope.spawn(move || step.bins.restore(&step.payload, true, lock_wait))).collect();
            restores.into_iter().map(|r| r.join().expect("restore thread panicked")).collect()
        });
        let mut touched = Vec::new();
        let mut failure = None;
        for (step, result) in self.steps.iter().zip(results) {
            match result {
                Ok(()) => touched.push(step),
                Err(e) => {
                    if !e.changed_nothing() {
                        touched.push(step);
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        let Some(err) = failure else {
            // Every restore is in: the sets no rule matches any more and what the restores
            // emptied go now (a failure here undoes nothing).
            let sets_finished = self.sets.finish();
            self.steps.iter().try_for_each(|step| step.bins.prune(self.backend.nf_tables, &step.emptied))?;
            sets_finished?;
            return Ok(self.outcome);
        };
        let rolled_back = undo_steps(&touched, lock_wait).and_then(|()| Ok(self.sets.take_back()?));
        Err(match rolled_back {
            Ok(()) if touched.is_empty() => IptablesError::NothingChanged { source: Box::new(err) },
            Ok(()) => IptablesError::RolledBack { source: Box::new(err) },
            Err(rollback) => IptablesError::RollbackFailed { source: Box::new(err), rollback: Box::new(rollback) },
        })
    }
}

fn undo_steps(steps: &[&Step], lock_wait: Duration) -> Result<(), IptablesError> {
    for step in steps.iter().rev() {
        step.bins.restore(&step.rollback, false, lock_wait)?;
    }
    Ok(())
}

impl IptablesError {
    /// Whether the failed command certainly changed nothing: it never ran, or it stopped at
    /// the xtables lock, before reading its input.
    fn changed_nothing(&self) -> bool {
        match self {
            IptablesError::Spawn { .. } | IptablesError::Lock { .. } => true,
            IptablesError::Restore { stderr, .. } => exec::stopped_at_lock(stderr),
            _ => false,
        }
    }
}

/// Replacing a table without --noflush with its saved dump restores it exactly; a table that
/// did not exist comes back empty.
fn rollback_payload(current: &SaveState, payload: &str) -> String {
    payload
        .lines()
        .filter_map(|l| l.strip_prefix('*'))
        .map(|table| match current.get(table) {
            Some(saved) => saved.raw.clone(),
            None => format!("*{table}\nCOMMIT\n"),
        })
        .collect()
}

fn is_our_chain(name: &str) -> bool {
    owned_chain_names().any(|ours| ours == name)
}

/// A rule in a kernel hook chain (PREROUTING/OUTPUT), which other tools share with us.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HookRule {
    spec: String,
    /// Inserted at the top (Istio's `-I CHAIN 1`) rather than appended.
    top: bool,
}

/// One table of the desired state for one family.
#[derive(Debug, Default)]
struct DesiredTable {
    /// Our chains with their full contents, in order of first use.
    owned: Vec<(&'static str, Vec<String>)>,
    /// Our rules in the kernel's chains, in final order.
    hooks: Vec<(&'static str, Vec<HookRule>)>,
}

impl DesiredTable {
    fn hook_specs(&self, chain: &str) -> Vec<&str> {
        self.hooks.iter().filter(|(c, _)| *c == chain).flat_map(|(_, rules)| rules.iter().map(|r| r.spec.as_str())).collect()
    }
}

/// Everything of ours found in one table: rules in shared chains and our chains.
#[derive(Debug, Default)]
struct TableResidue {
    hook_rules: Vec<(String, String)>,
    chains: Vec<String>,
}

#[derive(Debug, Default)]
struct Desired {
    tables: BTreeMap<&'static str, DesiredTable>,
}

impl Desired {
    fn new(ruleset: &Ruleset, family: IpFamily) -> Desired {
        let mut tables: BTreeMap<&'static str, DesiredTable> = BTreeMap::new();
        for chain in ruleset.family_chains(family) {
            let table = tables.entry(table_name(chain.table)).or_default();
            let name = chain_name(chain.chain);
            if chain.chain.is_hook() {
                let rules =
                    chain.rules.iter().map(|r| HookRule { spec: rule_spec(r), top: r.position != Position::Append }).collect();
                table.hooks.push((name, rules));
            } else {
                table.owned.push((name, chain.rules.iter().map(|r| rule_spec(r)).collect()));
            }
        }
        Desired { tables }
    }

    /// Is this rule of a shared chain ours? It jumps to one of our chains, or it is exactly
    /// one of the rules we would put there.
    /// Or it has the shape of a rule any configuration puts there (see `shapes`), since an
    /// earlier run may have had other settings. `state` is the table it is in.
    fn is_ours(&self, table: &str, chain: &str, spec: &str, state: &TableState) -> bool {
        jump_target(spec).is_some_and(is_our_chain)
            || self.tables.get(table).is_some_and(|t| t.hook_specs(chain).contains(&spec))
            || is_our_shape(table, chain, spec, state.chains.iter().any(|c| is_our_chain(c)))
    }

    /// What of ours the namespace holds, per table.
    fn residue(&self, current: &SaveState) -> BTreeMap<String, TableResidue> {
        let mut out = BTreeMap::new();
        for (table, state) in current {
            let mut found = TableResidue::default();
            for chain in &state.chains {
                if is_our_chain(chain) {
                    found.chains.push(chain.clone());
                    continue;
                }
                for spec in state.chain_rules(chain) {
                    if self.is_ours(table, chain, spec, state) {
                        found.hook_rules.push((chain.clone(), spec.clone()));
                    }
                }
            }
            if !found.chains.is_empty() || !found.hook_rules.is_empty() {
                out.insert(table.clone(), found);
            }
        }
        out
    }

    /// Differences between what is there and what we want (`family`'s rules); empty when exact.
    fn drift(&self, current: &SaveState, family: IpFamily) -> Vec<Difference> {
        let empty = TableState::default();
        let place = |table: &str, chain: &str| format!("{family} table {table}, chain {chain}");
        let line = |chain: &str, spec: &str| format!("-A {chain} {spec}");
        let mut out = Vec::new();
        for (table, want) in &self.tables {
            let have = current.get(*table).unwrap_or(&empty);
            for (chain, rules) in &want.owned {
                if !have.has_chain(chain) {
                    out.push(Difference::new(Kind::ChainMissing, place(table, chain)).expected(count(rules.len(), "rule")));
                    continue;
                }
                let found = have.chain_rules(chain);
                let (show_want, show_found) = (|i: usize| line(chain, &rules[i]), |i: usize| line(chain, &found[i]));
                out.extend(chain_rule_differences(&place(table, chain), (rules, found), |i| i + 1, show_want, show_found));
            }
        }
        // Our rules in the shared chains: those wanted, and those another configuration left.
        let mut shared: BTreeSet<(&str, &str)> = BTreeSet::new();
        for (table, want) in &self.tables {
            shared.extend(want.hooks.iter().map(|(chain, _)| (*table, *chain)));
        }
        for (table, state) in current {
            shared.extend(state.chains.iter().filter(|c| !is_our_chain(c)).map(|c| (table.as_str(), c.as_str())));
        }
        for (table, chain) in shared {
            let have = current.get(table).unwrap_or(&empty);
            // Our rules among everyone's, with their positions in the chain.
            let (positions, ours): (Vec<usize>, Vec<&str>) = have
                .chain_rules(chain)
                .iter()
                .enumerate()
                .filter(|(_, spec)| self.is_ours(table, chain, spec, have))
                .map(|(i, spec)| (i + 1, spec.as_str()))
                .unzip();
            let wanted = self.tables.get(table).map_or_else(Vec::new, |t| t.hook_specs(chain));
            let (show_want, show_found) = (|i: usize| line(chain, wanted[i]), |i: usize| line(chain, ours[i]));
            out.extend(chain_rule_differences(&place(table, chain), (&wanted, &ours), |i| positions[i], show_want, show_found));
        }
        for (table, state) in current {
            let want = self.tables.get(table.as_str());
            for chain in state.chains.iter().filter(|c| is_our_chain(c)) {
                if !want.is_some_and(|w| w.owned.iter().any(|(c, _)| c == chain)) {
                    let found = format!("{} (left by another configuration?)", count(state.chain_rules(chain).len(), "rule"));
                    out.push(Difference::new(Kind::UnexpectedChain, place(table, chain)).found(found));
                }
            }
        }
        out
    }

    /// The restore input that installs the desired state (`install`), removing our residue
    /// first in the same table transaction; or, without `install`, only removes it.
    fn payload(&self, residue: &BTreeMap<String, TableResidue>, install: bool) -> String {
        let empty = DesiredTable::default();
        let mut tables: Vec<&str> = residue.keys().map(String::as_str).collect();
        if install {
            tables.extend(self.tables.keys().copied());
        }
        tables.sort_unstable();
        tables.dedup();
        let mut out = String::new();
        for table in tables {
            let want = if install { self.tables.get(table).unwrap_or(&empty) } else { &empty };
            let found = residue.get(table);
            let _ = writeln!(out, "*{table}");
            for (chain, spec) in found.iter().flat_map(|r| &r.hook_rules) {
                let _ = writeln!(out, "-D {chain} {spec}");
            }
            // Declaring a chain creates it, or flushes it when it exists.
            let stale: Vec<&String> =
                found.iter().flat_map(|r| &r.chains).filter(|c| !want.owned.iter().any(|(o, _)| o == c)).collect();
            for chain in want.owned.iter().map(|(c, _)| *c).chain(stale.iter().map(|c| c.as_str())) {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            for chain in &stale {
                let _ = writeln!(out, "-X {chain}");
            }
            for (chain, rules) in &want.owned {
                for spec in rules {
                    let _ = writeln!(out, "-A {chain} {spec}");
                }
            }
            for (chain, rules) in &want.hooks {
                for rule in rules.iter().filter(|r| !r.top) {
                    let _ = writeln!(out, "-A {chain} {}", rule.spec);
                }
                // Inserting at 1 in reverse leaves them on top in their final order.
                for rule in rules.iter().filter(|r| r.top).rev() {
                    let _ = writeln!(out, "-I {chain} 1 {}", rule.spec);
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InboundPorts, InterceptionMode};
    use crate::model::{build, Dialect};
    use crate::settings::CaptureConfig;

    fn desired(cfg: &CaptureConfig) -> Desired {
        Desired::new(&build(cfg, Dialect::Iptables), IpFamily::V4)
    }

    /// The state the kernel would hold after loading `payload` into an empty namespace.
    fn as_saved(d: &Desired) -> SaveState {
        let mut text = String::new();
        for (table, t) in &d.tables {
            let _ = writeln!(text, "*{table}");
            for chain in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
                let _ = writeln!(text, ":{chain} ACCEPT [0:0]");
            }
            for (c, _) in &t.owned {
                let _ = writeln!(text, ":{c} - [0:0]");
            }
            for (c, rules) in &t.hooks {
                for r in rules.iter().filter(|r| r.top) {
                    let _ = writeln!(text, "-A {c} {}", r.spec);
                }
                for r in rules.iter().filter(|r| !r.top) {
                    let _ = writeln!(text, "-A {c} {}", r.spec);
                }
            }
            for (c, rules) in &t.owned {
                for r in rules {
                    let _ = writeln!(text, "-A {c} {r}");
                }
            }
            text.push_str("COMMIT\n");
        }
        parse_save(&text)
    }

    #[test]
    fn fresh_install_declares_chains_then_rules() {
        let d = desired(&CaptureConfig::default());
        let p = d.payload(&BTreeMap::new(), true);
        assert!(p.starts_with("*nat\n:ISTIO_INBOUND - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A ISTIO_INBOUND"));
        assert!(p.contains("-A OUTPUT -j ISTIO_OUTPUT\n"));
        assert!(p.ends_with("COMMIT\n"));
        assert!(!p.contains("-D ") && !p.contains("-X "));
    }

    #[test]
    fn exact_state_has_no_drift_and_edits_are_named() {
        let cfg = CaptureConfig { inbound_ports: InboundPorts::All { except: vec![15090] }, ..CaptureConfig::default() };
        let d = desired(&cfg);
        let mut state = as_saved(&d);
        assert!(d.drift(&state, IpFamily::V4).is_empty());
        let nat = state.get_mut("nat").unwrap();
        nat.rules.get_mut("ISTIO_INBOUND").unwrap().push("-p tcp -m tcp --dport 123 -j ACCEPT".into());
        nat.rules.get_mut("OUTPUT").unwrap().insert(0, "-p tcp -m tcp --dport 123 -j ACCEPT".into());
        let drift: Vec<String> = d.drift(&state, IpFamily::V4).iter().map(ToString::to_string).collect();
        assert_eq!(
            drift,
            vec!["unexpected rule: IPv4 table nat, chain ISTIO_INBOUND, rule 4\n    found:    -A ISTIO_INBOUND -p tcp -m tcp --dport 123 -j ACCEPT"]
        );
    }

    #[test]
    fn stale_chains_are_drift_and_get_deleted_on_replace() {
        let tproxy = CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::Only(vec![80]),
            ..CaptureConfig::default()
        };
        let old = as_saved(&desired(&tproxy));
        let d = desired(&CaptureConfig::default());
        let drift: Vec<String> = d.drift(&old, IpFamily::V4).iter().map(ToString::to_string).collect();
        assert!(drift.contains(&"unexpected chain: IPv4 table mangle, chain ISTIO_DIVERT\n    found:    2 rules (left by another configuration?)".to_string()), "{drift:?}");
        let residue = d.residue(&old);
        let p = d.payload(&residue, true);
        assert!(p.contains("*mangle\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n"), "{p}");
        assert!(p.contains("-X ISTIO_DIVERT\n") && p.contains("-X ISTIO_TPROXY\n"), "{p}");
        assert!(!p.contains("-X ISTIO_OUTPUT"), "{p}");
    }

    #[test]
    fn cleanup_removes_only_ours() {
        let d = desired(&CaptureConfig::default());
        let mut state = as_saved(&d);
        state.get_mut("nat").unwrap().rules.get_mut("OUTPUT").unwrap().push("-p tcp -m tcp --dport 123 -j ACCEPT".into());
        let residue = d.residue(&state);
        let p = d.payload(&residue, false);
        assert!(p.contains("-D OUTPUT -j ISTIO_OUTPUT\n"));
        assert!(!p.contains("--dport 123"));
        assert!(p.contains("-X ISTIO_OUTPUT\n") && !p.contains("-A "));
    }

    #[test]
    fn cleanup_with_other_settings_removes_every_rule_an_earlier_run_added() {
        let earlier = CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::All { except: vec![] },
            tproxy_mark: 7,
            proxy_uids: vec![1337, 1338],
            exclude_interfaces: crate::config::parse_interfaces("-c", "eth9").unwrap(),
            kube_virt_interfaces: crate::config::parse_interfaces("-k", "eth8").unwrap(),
            ..CaptureConfig::default()
        };
        let mut state = as_saved(&desired(&earlier));
        let foreign = "-p udp -j ACCEPT".to_string();
        state.get_mut("mangle").unwrap().rules.get_mut("OUTPUT").unwrap().push(foreign.clone());
        let now = desired(&CaptureConfig::default());
        let residue = now.residue(&state);
        let removed: usize = residue.values().map(|r| r.hook_rules.len()).sum();
        let added: usize =
            state.values().map(|t| t.rules.iter().filter(|(c, _)| !is_our_chain(c)).map(|(_, r)| r.len()).sum::<usize>()).sum();
        assert_eq!(removed, added - 1, "every rule in a shared chain but the foreign one: {residue:?}");
        let payload = now.payload(&residue, false);
        assert!(payload.contains("-D PREROUTING -i eth9 -j RETURN\n") && payload.contains("-D PREROUTING -i eth8 -j RETURN\n"));
        assert!(payload.contains("-D OUTPUT -o lo -p tcp -m mark --mark 0x7 -j RETURN\n"), "{payload}");
        assert!(!payload.contains(&foreign), "{payload}");
        let drift = now.drift(&state, IpFamily::V4);
        assert!(drift.iter().any(|d| d.place.starts_with("IPv4 table mangle, chain OUTPUT, rule")), "{drift:?}");
    }

    #[test]
    fn a_lone_interface_return_without_our_chains_is_someone_elses() {
        let mut state = SaveState::new();
        let nat = state.entry("nat".into()).or_default();
        nat.chains = vec!["PREROUTING".into()];
        nat.rules.insert("PREROUTING".into(), vec!["-i eth9 -j RETURN".into()]);
        assert!(desired(&CaptureConfig::default()).residue(&state).is_empty());
    }

    #[test]
    fn force_rewrites_exact_rules_and_only_reconcile_replaces_drifted_ones() {
        let d = desired(&CaptureConfig::default());
        let apply = |reconcile, force| Operation::Apply { reconcile, force };
        let fresh = decide(&d, &SaveState::new(), &BTreeMap::new(), apply(false, true), IpFamily::V4).unwrap();
        assert_eq!(fresh.outcome, Outcome::Applied, "nothing to force in an empty namespace");

        let exact = as_saved(&d);
        let residue = d.residue(&exact);
        let plain = decide(&d, &exact, &residue, apply(false, false), IpFamily::V4).unwrap();
        assert_eq!((plain.payload, plain.outcome), (None, Outcome::Unchanged));
        let forced = decide(&d, &exact, &residue, apply(false, true), IpFamily::V4).unwrap();
        assert_eq!(forced.outcome, Outcome::Reconciled);
        assert_eq!(forced.payload, Some(d.payload(&residue, true)), "{}", forced.why);
        assert!(forced.why.contains("as forced"), "{}", forced.why);

        let mut drifted = exact.clone();
        drifted.get_mut("nat").unwrap().rules.get_mut("ISTIO_INBOUND").unwrap().push("-p tcp -j ACCEPT".into());
        let residue = d.residue(&drifted);
        let refused = decide(&d, &drifted, &residue, apply(false, true), IpFamily::V4);
        assert!(
            matches!(refused, Err(IptablesError::Drift { family: IpFamily::V4, .. })),
            "force alone replaces no drifted rules"
        );
        let replaced = decide(&d, &drifted, &residue, apply(true, false), IpFamily::V4).unwrap();
        assert_eq!(replaced.outcome, Outcome::Reconciled);
        assert!(replaced.why.contains("(reconciling)") && replaced.why.contains("-p tcp -j ACCEPT"), "{}", replaced.why);
    }

    #[test]
    fn the_families_outcome_is_the_strongest() {
        assert_eq!(strongest(Outcome::Applied, Outcome::Unchanged), Outcome::Applied);
        assert_eq!(strongest(Outcome::Reconciled, Outcome::Applied), Outcome::Reconciled);
        assert_eq!(strongest(Outcome::Unchanged, Outcome::Reconciled), Outcome::Reconciled);
        assert_eq!(strongest(Outcome::NothingToRemove, Outcome::Removed), Outcome::Removed);
        assert_eq!(strongest(Outcome::Removed, Outcome::NothingToRemove), Outcome::Removed);
    }

    #[test]
    fn top_rules_are_inserted_in_reverse() {
        let cfg = CaptureConfig {
            kube_virt_interfaces: crate::config::parse_interfaces("-k", "eth1,eth2").unwrap(),
            ..CaptureConfig::default()
        };
        let p = desired(&cfg).payload(&BTreeMap::new(), true);
        let i1 = p.find("-I PREROUTING 1 -i eth1 -j RETURN").unwrap();
        let i2 = p.find("-I PREROUTING 1 -i eth2 -j RETURN").unwrap();
        assert!(i1 < i2, "eth2 ends on top, as Istio leaves it: {p}");
    }
}
