//! The set form's lists as kernel ip sets: what a ruleset wants (one set per list, named as
//! the model names it), what the namespace holds of ours, and the changes between them,
//! made around the restores so that no rule ever sees a missing, empty or half-filled set:
//!
//! * a new set is created, filled, before the restore whose rules match it;
//! * a changed set is replaced by a filled temporary (`NAME-new`) swapped in, never flushed
//!   and refilled; the temporary, now holding the old members, goes after the restores (one
//!   of another type or family, which the kernel does not swap, is replaced only while no
//!   rule matches it);
//! * a set of ours no longer used goes after the restores, once no rule matches it.
//!
//! Sets are recognised by name, like chains: a list's name, or it with [`TEMPORARY`]. No
//! other set is ever touched.

use std::fmt::Write;

use crate::capture::Operation;
use crate::drift::{count, some_elements, Difference, Kind};
use crate::ipset::{FoundSet, IpSets, IpsetError, Member, SetKind, SetSpec};
use crate::model::sets::{Set, SetElements, SetList};
use crate::model::Ruleset;
use crate::Outcome;

use super::IptablesError;

/// What a set's name ends with while it is being filled, before it is swapped in.
const TEMPORARY: &str = "-new";

/// The kernel set that holds `set`.
fn spec(set: &Set) -> SetSpec {
    let (kind, members) = match &set.elements {
        SetElements::Ports(ports) => (SetKind::Port, ports.iter().map(|&p| Member::Port(p)).collect()),
        SetElements::Ranges(ranges) => {
            let family = set.list.family().expect("an address list has a family");
            (SetKind::Net(family), ranges.iter().flat_map(|r| r.prefixes()).map(Member::Net).collect())
        }
    };
    SetSpec::new(set.list.name(), kind, members)
}

/// The sets `ruleset` matches, each once.
pub(super) fn wanted(ruleset: &Ruleset) -> Vec<SetSpec> {
    let mut wanted: Vec<SetSpec> = Vec::new();
    for set in &ruleset.sets {
        if !wanted.iter().any(|w| w.name == set.list.name()) {
            wanted.push(spec(set));
        }
    }
    wanted
}

fn temporary(name: &str) -> String {
    format!("{name}{TEMPORARY}")
}

/// Whether the set `name` is ours: a list's, or one being filled for a list.
fn is_ours(name: &str) -> bool {
    SetList::named(name).or_else(|| name.strip_suffix(TEMPORARY).and_then(SetList::named)).is_some()
}

/// Every set of ours the namespace holds, with its members. A kernel without ip sets holds
/// none; where `needed`, that is an error instead.
pub(super) fn read(needed: bool) -> Result<Vec<FoundSet>, IpsetError> {
    let mut sets = IpSets::open()?;
    let names = match sets.names() {
        Err(e) if e.kernel_lacks_ip_sets() && !needed => return Ok(Vec::new()),
        names => names?,
    };
    let mut found = Vec::new();
    for name in names.iter().filter(|name| is_ours(name)) {
        // One destroyed meanwhile is not there.
        found.extend(sets.list(name)?);
    }
    Ok(found)
}

/// One change to the kernel's sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SetOp {
    /// Create the set, filled.
    Create(SetSpec),
    /// Swap what two sets hold.
    Swap(String, String),
    Destroy(String),
}

impl SetOp {
    fn run(&self, sets: &mut IpSets) -> Result<(), IpsetError> {
        match self {
            SetOp::Create(spec) => sets.create(spec),
            SetOp::Swap(a, b) => sets.swap(a, b),
            SetOp::Destroy(name) => sets.destroy(name),
        }
    }

    /// As `ipset restore` input.
    fn lines(&self) -> Vec<String> {
        match self {
            SetOp::Create(spec) => spec.restore_lines(),
            SetOp::Swap(a, b) => vec![format!("swap {a} {b}")],
            SetOp::Destroy(name) => vec![format!("destroy {name}")],
        }
    }
}

/// Runs `ops` in order, up to the first failure: how many ran, and the failure.
fn run(ops: &[SetOp]) -> Result<(), (usize, IpsetError)> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut sets = IpSets::open().map_err(|e| (0, e))?;
    for (done, op) in ops.iter().enumerate() {
        op.run(&mut sets).map_err(|e| (done, e))?;
    }
    Ok(())
}

/// Runs every one of `ops`, even after a failure; the failures.
fn run_all(ops: &[SetOp]) -> Vec<IpsetError> {
    if ops.is_empty() {
        return Vec::new();
    }
    match IpSets::open() {
        Ok(mut sets) => ops.iter().filter_map(|op| op.run(&mut sets).err()).collect(),
        Err(e) => vec![e],
    }
}

/// The sets' part of a plan: what was found, and the changes before and after the restores.
#[derive(Debug)]
pub(super) struct SetPlan {
    found: Vec<FoundSet>,
    /// Before the restores: new sets, filled; changed ones swapped for filled temporaries.
    before: Vec<SetOp>,
    /// After the restores: the temporaries (holding the old members), the sets no longer used.
    after: Vec<SetOp>,
    /// Why the sets could not be read; a cleanup removes the rules all the same, then says so.
    unreadable: Option<String>,
    pub outcome: Outcome,
    decision: String,
}

/// `hash:net family inet, 3 members`.
fn describe(kind: &str, members: usize) -> String {
    format!("{kind}, {}", count(members, "member"))
}

/// ` (2 missing: 10.0.0.0/8, 10.1.0.0/16)`: the first few of `members`, or nothing.
fn some_members(members: &[&Member], what: &str) -> String {
    some_elements(what, members).map(|some| format!(" ({some})")).unwrap_or_default()
}

fn place(name: &str) -> String {
    format!("ip set {name}")
}

/// Whether `found` holds exactly what `want` says, so that rules match the same through it.
fn holds(found: &FoundSet, want: &SetSpec) -> bool {
    found.kind == Some(want.kind) && !found.timeout && found.others == 0 && found.members == want.members
}

/// How the sets of ours differ from `wanted`: missing, differing (type, family or members)
/// and unexpected ones (ours, but not wanted).
pub(super) fn differences(wanted: &[SetSpec], found: &[FoundSet]) -> Vec<Difference> {
    let mut out = Vec::new();
    for want in wanted {
        let expected = describe(&want.kind.to_string(), want.members.len());
        match found.iter().find(|f| f.name == want.name) {
            None => out.push(Difference::new(Kind::SetMissing, place(&want.name)).expected(expected)),
            Some(have) if holds(have, want) => {}
            Some(have) => {
                let missing: Vec<&Member> = want.members.iter().filter(|m| have.members.binary_search(m).is_err()).collect();
                let unexpected: Vec<&Member> = have.members.iter().filter(|m| want.members.binary_search(m).is_err()).collect();
                let found = describe(&have.describe_type(), have.elements as usize);
                out.push(
                    Difference::new(Kind::SetDiffers, place(&want.name))
                        .expected(expected + &some_members(&missing, "missing"))
                        .found(found + &some_members(&unexpected, "unexpected")),
                );
            }
        }
    }
    for have in found.iter().filter(|f| !wanted.iter().any(|w| w.name == f.name)) {
        let found = describe(&have.describe_type(), have.elements as usize) + " (left by another configuration?)";
        out.push(Difference::new(Kind::UnexpectedSet, place(&have.name)).found(found));
    }
    out
}

/// Decides what `op` changes in the sets: creates the missing ones, replaces those that differ
/// (with `reconcile`; with `force`, also those exactly in place), removes ours no longer used;
/// a cleanup removes every set of ours. Differences other than missing sets are drift.
pub(super) fn decide(wanted: &[SetSpec], found: Vec<FoundSet>, op: Operation) -> Result<SetPlan, IptablesError> {
    let mut plan = SetPlan::new(Outcome::Unchanged);
    let (reconcile, force) = match op {
        Operation::Cleanup => {
            plan.after = found.iter().map(|f| SetOp::Destroy(f.name.clone())).collect();
            plan.outcome = if found.is_empty() { Outcome::NothingToRemove } else { Outcome::Removed };
            plan.decision = if found.is_empty() { "none of ours".into() } else { "destroy ours, after the rules".into() };
            plan.found = found;
            return Ok(plan);
        }
        Operation::Apply { reconcile, force } => (reconcile, force),
    };
    let drift: Vec<Difference> = differences(wanted, &found).into_iter().filter(|d| d.kind != Kind::SetMissing).collect();
    if !drift.is_empty() && !reconcile {
        return Err(IptablesError::SetDrift { details: drift.iter().map(ToString::to_string).collect() });
    }
    let mut outcome = Outcome::Unchanged;
    let mut replaced = Vec::new();
    for want in wanted {
        match found.iter().find(|f| f.name == want.name) {
            None => {
                plan.before.push(SetOp::Create(want.clone()));
                outcome = super::strongest(outcome, Outcome::Applied);
            }
            Some(have) if holds(have, want) && !force => {}
            Some(have) if have.kind == Some(want.kind) => {
                let new = temporary(&want.name);
                if found.iter().any(|f| f.name == new) {
                    plan.before.push(SetOp::Destroy(new.clone()));
                }
                plan.before.push(SetOp::Create(want.named(&new)));
                plan.before.push(SetOp::Swap(new.clone(), want.name.clone()));
                plan.after.push(SetOp::Destroy(new.clone()));
                replaced.push(new);
                outcome = Outcome::Reconciled;
            }
            // Of another kind, which the kernel does not swap; no rule matches it, so it can go first.
            Some(have) if have.references == 0 => {
                plan.before.extend([SetOp::Destroy(want.name.clone()), SetOp::Create(want.clone())]);
                outcome = Outcome::Reconciled;
            }
            Some(have) => {
                return Err(IptablesError::SetOfAnotherKind {
                    set: want.name.clone(),
                    found: have.describe_type(),
                    wanted: want.kind.to_string(),
                })
            }
        }
    }
    for unused in found.iter().filter(|f| !wanted.iter().any(|w| w.name == f.name) && !replaced.contains(&f.name)) {
        plan.after.push(SetOp::Destroy(unused.name.clone()));
        outcome = Outcome::Reconciled;
    }
    plan.decision = match outcome {
        Outcome::Unchanged => "ours are exactly as planned: nothing to send".into(),
        _ if drift.is_empty() && force => "replacing ours, as forced".into(),
        _ if drift.is_empty() => "create the missing ones".into(),
        _ => {
            let drift: Vec<String> = drift.iter().map(ToString::to_string).collect();
            format!("ours differ from the plan; replacing them (reconciling):\n  {}", drift.join("\n  "))
        }
    };
    plan.outcome = outcome;
    plan.found = found;
    Ok(plan)
}

/// For a cleanup whose sets could not be read: the rules go all the same, then the error.
pub(super) fn unreadable(error: IpsetError) -> SetPlan {
    let decision = format!("could not read them: {error}");
    SetPlan { unreadable: Some(error.to_string()), decision, ..SetPlan::new(Outcome::NothingToRemove) }
}

impl SetPlan {
    fn new(outcome: Outcome) -> SetPlan {
        SetPlan { found: Vec::new(), before: Vec::new(), after: Vec::new(), unreadable: None, outcome, decision: String::new() }
    }

    /// Sends the changes due before the restores. On failure, takes back those it made.
    pub(super) fn prepare(&self) -> Result<(), IptablesError> {
        let Err((done, error)) = run(&self.before) else { return Ok(()) };
        let source = Box::new(IptablesError::Ipset(error));
        Err(match self.take_back_first(done) {
            Ok(()) => IptablesError::NothingChanged { source },
            Err(rollback) => IptablesError::RollbackFailed { source, rollback: Box::new(IptablesError::Ipset(rollback)) },
        })
    }

    /// Sends the changes due after the restores, every one of them even after a failure.
    pub(super) fn finish(&self) -> Result<(), IptablesError> {
        let mut errors: Vec<String> = run_all(&self.after).iter().map(ToString::to_string).collect();
        errors.extend(self.unreadable.clone());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(IptablesError::SetsLeft { errors })
        }
    }

    /// Takes back what [`SetPlan::prepare`] did, once the rules are as they were (a restore
    /// failed): the swaps are swapped back, the sets made destroyed.
    pub(super) fn take_back(&self) -> Result<(), IpsetError> {
        self.take_back_first(self.before.len())
    }

    fn take_back_first(&self, done: usize) -> Result<(), IpsetError> {
        first_error(run_all(&self.taking_back(done)?))
    }

    /// The changes that take back the first `done` of those before the restores, in order.
    fn taking_back(&self, done: usize) -> Result<Vec<SetOp>, IpsetError> {
        let mut ops = Vec::new();
        for op in self.before[..done].iter().rev() {
            match op {
                SetOp::Create(spec) => ops.push(SetOp::Destroy(spec.name.clone())),
                SetOp::Swap(a, b) => ops.push(SetOp::Swap(a.clone(), b.clone())),
                SetOp::Destroy(name) => ops.extend(self.rebuilt(name)?),
            }
        }
        Ok(ops)
    }

    /// Undoing a finished plan, the changes to make before the rules are put back: the sets
    /// destroyed come back and the old members return to those swapped, as they were found.
    pub(super) fn undo_before_rules(&self) -> Result<(), IpsetError> {
        first_error(run_all(&self.undoing_before_rules()?))
    }

    fn undoing_before_rules(&self) -> Result<Vec<SetOp>, IpsetError> {
        let mut ops = Vec::new();
        for op in self.before.iter().chain(&self.after) {
            match op {
                SetOp::Swap(new, name) => {
                    let old = self.found.iter().find(|f| &f.name == name).and_then(FoundSet::spec);
                    let old = old.ok_or_else(|| cannot_rebuild(name))?;
                    ops.extend([
                        SetOp::Create(old.named(new)),
                        SetOp::Swap(new.clone(), name.clone()),
                        SetOp::Destroy(new.clone()),
                    ]);
                }
                SetOp::Destroy(name) => ops.extend(self.rebuilt(name)?),
                SetOp::Create(_) => {}
            }
        }
        Ok(ops)
    }

    /// Undoing a finished plan, the changes to make once the rules are put back: the sets it
    /// created are destroyed.
    pub(super) fn undo_after_rules(&self) -> Result<(), IpsetError> {
        first_error(run_all(&self.undoing_after_rules()))
    }

    fn undoing_after_rules(&self) -> Vec<SetOp> {
        let created = self.before.iter().filter_map(|op| match op {
            SetOp::Create(spec) if !spec.name.ends_with(TEMPORARY) => Some(SetOp::Destroy(spec.name.clone())),
            _ => None,
        });
        created.collect()
    }

    /// The found set `name` made again, as it was (a temporary of ours held nothing of use).
    fn rebuilt(&self, name: &str) -> Result<Option<SetOp>, IpsetError> {
        match self.found.iter().find(|f| f.name == name) {
            None => Ok(None),
            Some(_) if name.ends_with(TEMPORARY) => Ok(None),
            Some(found) => found.spec().map(|spec| Some(SetOp::Create(spec))).ok_or_else(|| cannot_rebuild(name)),
        }
    }

    /// `ipset restore` input for the changes before (`true`) or after the restores.
    pub(super) fn script(&self, before: bool) -> String {
        let ops = if before { &self.before } else { &self.after };
        ops.iter().flat_map(SetOp::lines).map(|line| line + "\n").collect()
    }

    /// What was read and decided, for a debug log.
    pub(super) fn describe(&self) -> String {
        let mut text = String::from("ip sets: ");
        if self.found.is_empty() {
            text.push_str("none of ours");
        }
        for (i, set) in self.found.iter().enumerate() {
            let separator = if i == 0 { "" } else { "; " };
            let _ = write!(text, "{separator}{} ({})", set.name, describe(&set.describe_type(), set.elements as usize));
        }
        let _ = write!(text, "\nip sets plan: {}", self.decision);
        text
    }
}

fn cannot_rebuild(name: &str) -> IpsetError {
    IpsetError::Refused { action: "put back", set: name.to_string(), reason: "it was of a kind this tool does not make".into() }
}

fn first_error(errors: Vec<IpsetError>) -> Result<(), IpsetError> {
    errors.into_iter().next().map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_cidrs, InboundPorts, OutboundRanges};
    use crate::family::IpFamily;
    use crate::model::{build, Dialect};
    use crate::settings::CaptureConfig;

    fn set_form() -> CaptureConfig {
        CaptureConfig {
            use_sets: true,
            ipv6: true,
            inbound_ports: InboundPorts::All { except: vec![15090, 15021] },
            outbound_ranges: OutboundRanges::All,
            outbound_ranges_exclude: parse_cidrs("-x", "10.0.0.0/8,10.1.0.0/16,0.0.0.0/0,fd00::/8").unwrap(),
            ..CaptureConfig::default()
        }
    }

    /// What the kernel would list for `spec`.
    fn found(spec: &SetSpec) -> FoundSet {
        FoundSet {
            name: spec.name.clone(),
            type_name: spec.kind.type_name().into(),
            family: match spec.kind {
                SetKind::Net(IpFamily::V4) => 2,
                SetKind::Net(IpFamily::V6) => 10,
                SetKind::Port => 0,
            },
            kind: Some(spec.kind),
            members: spec.members.clone(),
            others: 0,
            elements: spec.members.len() as u32,
            references: 1,
            timeout: false,
        }
    }

    fn apply(reconcile: bool, force: bool) -> Operation {
        Operation::Apply { reconcile, force }
    }

    #[test]
    fn wanted_sets_hold_the_lists_prefixes_and_ports() {
        let wanted = wanted(&build(&set_form(), Dialect::Iptables));
        let names: Vec<&str> = wanted.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["istio-in-ports-exclude", "istio-out-cidrs-exclude-v4", "istio-out-cidrs-exclude-v6"]);
        assert_eq!(wanted[0].members, [Member::Port(15021), Member::Port(15090)]);
        let v4: Vec<String> = wanted[1].members.iter().map(ToString::to_string).collect();
        assert_eq!(v4, ["0.0.0.0/1", "128.0.0.0/1"], "0.0.0.0/0 covers the rest, and hash:net holds no /0");
        assert_eq!(wanted[2].kind, SetKind::Net(IpFamily::V6));
    }

    #[test]
    fn missing_sets_are_created_before_and_exact_ones_left_alone() {
        let wanted = wanted(&build(&set_form(), Dialect::Iptables));
        let fresh = decide(&wanted, Vec::new(), apply(false, false)).unwrap();
        assert_eq!(fresh.outcome, Outcome::Applied);
        assert_eq!(fresh.before, wanted.iter().cloned().map(SetOp::Create).collect::<Vec<_>>());
        assert!(fresh.after.is_empty());
        assert!(fresh
            .script(true)
            .starts_with("create istio-in-ports-exclude bitmap:port range 0-65535\nadd istio-in-ports-exclude 15021\n"));

        let exact = decide(&wanted, wanted.iter().map(found).collect(), apply(false, false)).unwrap();
        assert_eq!((exact.outcome, exact.before.len(), exact.after.len()), (Outcome::Unchanged, 0, 0));
    }

    #[test]
    fn a_differing_set_is_drift_and_reconcile_swaps_in_a_filled_temporary() {
        let wanted = wanted(&build(&set_form(), Dialect::Iptables));
        let mut have: Vec<FoundSet> = wanted.iter().map(found).collect();
        let tampered: Member = Member::Net("192.0.2.1/32".parse().unwrap());
        have[1].members.push(tampered);
        have[1].members.sort_unstable();
        have[1].elements += 1;
        let refused = decide(&wanted, have.clone(), apply(false, true)).unwrap_err();
        let IptablesError::SetDrift { details } = &refused else { panic!("{refused:?}") };
        assert_eq!(
            details,
            &["set differs: ip set istio-out-cidrs-exclude-v4\n    expected: hash:net family inet, 2 members\n    \
               found:    hash:net family inet, 3 members (1 unexpected: 192.0.2.1/32)"]
        );
        let replaced = decide(&wanted, have, apply(true, false)).unwrap();
        assert_eq!(replaced.outcome, Outcome::Reconciled);
        let new = "istio-out-cidrs-exclude-v4-new".to_string();
        assert_eq!(
            replaced.before,
            [SetOp::Create(wanted[1].named(&new)), SetOp::Swap(new.clone(), "istio-out-cidrs-exclude-v4".into())]
        );
        assert_eq!(replaced.after, [SetOp::Destroy(new)]);
        assert!(replaced.decision.contains("(reconciling)"), "{}", replaced.decision);
    }

    #[test]
    fn force_replaces_exact_sets_and_unused_ones_go_after_the_rules() {
        let wanted = wanted(&build(&set_form(), Dialect::Iptables));
        let forced = decide(&wanted, wanted.iter().map(found).collect(), apply(false, true)).unwrap();
        assert_eq!((forced.outcome, forced.before.len(), forced.after.len()), (Outcome::Reconciled, 6, 3));

        let leftover = found(&SetSpec::new("istio-out-ports-include", SetKind::Port, vec![Member::Port(9)]));
        let refused = decide(&wanted, vec![leftover.clone()], apply(false, false)).unwrap_err();
        assert!(refused.to_string().contains("unexpected set: ip set istio-out-ports-include"), "{refused}");
        let reconciled = decide(&wanted, vec![leftover], apply(true, false)).unwrap();
        assert_eq!(reconciled.after, [SetOp::Destroy("istio-out-ports-include".into())]);
        assert_eq!(reconciled.before.len(), 3, "the wanted ones are created");
    }

    #[test]
    fn a_set_of_another_kind_is_replaced_only_while_no_rule_matches_it() {
        let wanted = wanted(&build(&set_form(), Dialect::Iptables));
        let mut other = found(&wanted[1]);
        other.type_name = "hash:ip".into();
        other.kind = None;
        let error = decide(&wanted, vec![other.clone()], apply(true, false)).unwrap_err().to_string();
        assert!(error.contains("istio-out-cidrs-exclude-v4 is hash:ip family inet") && error.contains("cleanup"), "{error}");

        other.references = 0;
        let plan = decide(&wanted, vec![other], apply(true, false)).unwrap();
        let v4 = &wanted[1];
        assert_eq!(plan.before[1..3], [SetOp::Destroy(v4.name.clone()), SetOp::Create(v4.clone())]);
        assert!(plan.taking_back(3).is_err(), "a hash:ip set cannot be made again");
    }

    #[test]
    fn cleanup_destroys_every_set_of_ours_and_only_ours() {
        assert!(is_ours("istio-out-cidrs-include-v6") && is_ours("istio-in-ports-exclude-new"));
        assert!(!is_ours("istio-other") && !is_ours("kube-proxy-set") && !is_ours("istio-in-ports-exclude-old"));
        let sets = vec![found(&SetSpec::new("istio-in-ports-exclude-new", SetKind::Port, vec![]))];
        let cleanup = decide(&[], sets, Operation::Cleanup).unwrap();
        assert_eq!(
            (cleanup.outcome, cleanup.after.clone()),
            (Outcome::Removed, vec![SetOp::Destroy("istio-in-ports-exclude-new".into())])
        );
        assert_eq!(decide(&[], Vec::new(), Operation::Cleanup).unwrap().outcome, Outcome::NothingToRemove);
    }

    #[test]
    fn what_was_done_is_taken_back_and_a_finished_plan_undone_as_found() {
        let wanted = wanted(&build(&set_form(), Dialect::Iptables));
        let mut have: Vec<FoundSet> = wanted.iter().map(found).collect();
        have.remove(0);
        have[0].members.pop();
        let old_v4 = have[0].clone();
        let unused = found(&SetSpec::new("istio-out-ports-include", SetKind::Port, vec![Member::Port(9)]));
        have.push(unused.clone());
        let plan = decide(&wanted, have, apply(true, false)).unwrap();
        let (v4, new) = ("istio-out-cidrs-exclude-v4".to_string(), "istio-out-cidrs-exclude-v4-new".to_string());
        assert_eq!(
            plan.before,
            [SetOp::Create(wanted[0].clone()), SetOp::Create(wanted[1].named(&new)), SetOp::Swap(new.clone(), v4.clone())]
        );
        assert_eq!(plan.after, [SetOp::Destroy(new.clone()), SetOp::Destroy(unused.name.clone())]);

        // A restore failed: what ran is taken back, last first.
        assert_eq!(
            plan.taking_back(3).unwrap(),
            [SetOp::Swap(new.clone(), v4.clone()), SetOp::Destroy(new.clone()), SetOp::Destroy(wanted[0].name.clone())]
        );
        assert_eq!(plan.taking_back(1).unwrap(), [SetOp::Destroy(wanted[0].name.clone())]);

        // Routing failed after all of it: the old members and the unused set come back before
        // the old rules do, the new set goes once they are back.
        assert_eq!(
            plan.undoing_before_rules().unwrap(),
            [
                SetOp::Create(old_v4.spec().unwrap().named(&new)),
                SetOp::Swap(new.clone(), v4),
                SetOp::Destroy(new),
                SetOp::Create(unused.spec().unwrap()),
            ]
        );
        assert_eq!(plan.undoing_after_rules(), [SetOp::Destroy(wanted[0].name.clone())]);
    }
}
