//! The native nftables backend: Istio's nft ruleset, sent over netlink as one nf_tables
//! transaction (no `nft` or `iptables` binary at run time).
//!
//! Each model rule becomes one rule of an `inet` table (`istio-proxy-nat`, `-mangle`,
//! `-raw`), compiled to the same bytecode `nft -f` makes of Istio's own rule text, so
//! `nft list ruleset` prints exactly what Istio's tool leaves behind. In the set form each
//! list is a named set of the table of the rules that use it, created and filled in the same
//! transaction, with the elements `nft -f` sends for it.
//!
//! A plan first reads our tables back and compares them with what it would send (both parsed
//! and printed by libnftnl): equal means nothing is sent (unless forced); none of ours means a
//! plain install; anything else is drift, an error unless `reconcile`. A replacement (drift
//! with `reconcile`, or `force`) replaces every table of ours in the same transaction (add,
//! delete, add full) so no packet sees a gap.

mod batch;
mod decompile;
mod expr;
mod messages;
mod raw;
mod render;
mod schema;
mod state;

use std::io;

use thiserror::Error;

use batch::{Message, Transaction, TransactionBuilder};
use messages::{DumpRequest, Netlink};
use raw::{Object, SetRef};
use schema::table_named;
use state::Snapshot;

use crate::capture::{CaptureError, Operation, RuleBackend, RulePlan, Sent};
use crate::family::IpFamily;
use crate::model::{Dialect, Ruleset, Table};
use crate::netlink::{NetlinkError, Refusal};
use crate::Outcome;

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot open a netlink socket to nf_tables: {0} (the tool needs CAP_NET_ADMIN in the pod's network namespace)")]
    Socket(#[source] NetlinkError),
    #[error("cannot read the current nftables ruleset: {0}")]
    Read(#[source] NetlinkError),
    #[error("cannot send the nftables transaction: {0}")]
    Send(#[source] NetlinkError),
    #[error(
        "the kernel refused the nftables transaction, so nothing was changed:\n  {what}\n  error: {error}{}\n  hint: {hint}",
        if *others > 0 { format!(" (and {others} more refusals)") } else { String::new() }
    )]
    Refused { what: String, error: io::Error, hint: String, others: usize },
    #[error(
        "the capture tables in this namespace differ from the requested ones:\n  {}",
        details.join("\n  ")
    )]
    Drift { details: Vec<String> },
    #[error(
        "the tables this run replaced cannot be put back (the kernel keeps no copy of them): the requested ones are in place"
    )]
    ReplacedNotRestorable,
}

/// The nft script of a fresh install (what `--dry-run` prints): what a plan sends to a
/// namespace holding none of our tables, loadable with `nft -f`.
pub fn script(ruleset: &Ruleset) -> String {
    render::script(&render::plan(ruleset))
}

/// The native nftables backend. It holds nothing: each step opens its own netlink socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Nftables;

/// What [`Nftables`] decided, and from what.
struct Plan {
    /// The tables the ruleset needs (none for a cleanup).
    tables: Vec<render::TablePlan>,
    /// Our tables as read back; `None` where nothing was read (a cleanup reads only their names,
    /// a dry run nothing).
    have: Option<Snapshot>,
    change: Change,
}

/// What a plan sends, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// Nothing: our tables are exactly as planned, or there is nothing to program.
    Keep,
    /// None of our tables exists: create them.
    Create,
    /// Delete and create again every planned table, and delete the `stale` ones: our tables
    /// drifted (with `reconcile`), or are exact and `forced`.
    Replace { stale: Vec<Table>, forced: bool },
    /// Delete these tables of ours (a cleanup).
    Delete(Vec<Table>),
}

impl RuleBackend for Nftables {
    fn capture_name(&self) -> &'static str {
        "native nftables (tables inet istio-proxy-*)"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Nftables
    }

    fn plan(&self, ruleset: &Ruleset, operation: Operation) -> Result<Box<dyn RulePlan + '_>, CaptureError> {
        let mut netlink = Netlink::open().map_err(NftError::Socket)?;
        let plan = match operation {
            // Our tables are found by name, whatever they hold.
            Operation::Cleanup => {
                let ours = our_tables(&netlink.dump(&DumpRequest::Tables).map_err(NftError::Read)?);
                Plan { tables: Vec::new(), have: None, change: Change::Delete(ours) }
            }
            Operation::Apply { reconcile, force } => {
                let tables = render::plan(ruleset);
                let have = read_ours(&mut netlink).map_err(NftError::Read)?;
                let change = decide(&tables, &have, reconcile, force)?;
                Plan { tables, have: Some(have), change }
            }
        };
        Ok(Box::new(plan))
    }

    /// A dry run of an apply reads nothing (so it needs no CAP_NET_ADMIN): it shows the script
    /// of a fresh install.
    fn dry_run_plan(&self, ruleset: &Ruleset, operation: Operation) -> Result<Box<dyn RulePlan + '_>, CaptureError> {
        match operation {
            Operation::Apply { .. } => Ok(Box::new(Plan { tables: render::plan(ruleset), have: None, change: Change::Create })),
            Operation::Cleanup => self.plan(ruleset, operation),
        }
    }

    fn differences(&self, ruleset: &Ruleset) -> Result<Vec<String>, CaptureError> {
        let plan = render::plan(ruleset);
        let mut netlink = Netlink::open().map_err(NftError::Socket)?;
        let have = read_ours(&mut netlink).map_err(NftError::Read)?;
        let want = state::planned(&plan);
        Ok(if have == want { Vec::new() } else { described_differences(&plan, &want, &have) })
    }
}

/// What applying `tables` over `have`, our tables as read back, sends.
fn decide(tables: &[render::TablePlan], have: &Snapshot, reconcile: bool, force: bool) -> Result<Change, NftError> {
    if have.is_empty() {
        return Ok(if tables.is_empty() { Change::Keep } else { Change::Create });
    }
    let want = state::planned(tables);
    let exact = *have == want;
    if exact && !force {
        Ok(Change::Keep)
    } else if exact || reconcile {
        Ok(Change::Replace { stale: have.keys().filter(|t| !want.contains_key(t)).copied().collect(), forced: exact })
    } else {
        Err(NftError::Drift { details: described_differences(tables, &want, have) })
    }
}

impl RulePlan for Plan {
    fn outcome(&self) -> Outcome {
        match &self.change {
            Change::Keep => Outcome::Unchanged,
            Change::Create => Outcome::Applied,
            Change::Replace { .. } => Outcome::Reconciled,
            Change::Delete(tables) if tables.is_empty() => Outcome::NothingToRemove,
            Change::Delete(_) => Outcome::Removed,
        }
    }

    fn apply(&self) -> Result<Outcome, CaptureError> {
        let mut tx = TransactionBuilder::new();
        match &self.change {
            Change::Keep => {}
            Change::Create => self.tables.iter().for_each(|table| tx.create(table)),
            Change::Replace { stale, .. } => {
                for table in &self.tables {
                    tx.delete(table.table);
                    tx.create(table);
                }
                stale.iter().for_each(|&table| tx.delete(table));
            }
            Change::Delete(tables) => tables.iter().for_each(|&table| tx.delete(table)),
        }
        send(&tx.finish())?;
        Ok(self.outcome())
    }

    /// Deletes the tables a fresh install created. A replacement is not taken back: what it
    /// replaced was not as requested.
    fn undo(&self) -> Result<(), CaptureError> {
        match self.change {
            Change::Create => {
                let mut tx = TransactionBuilder::new();
                self.tables.iter().for_each(|table| tx.delete(table.table));
                Ok(send(&tx.finish())?)
            }
            Change::Replace { .. } => Err(NftError::ReplacedNotRestorable.into()),
            Change::Keep | Change::Delete(_) => Ok(()),
        }
    }

    fn sent(&self) -> Vec<Sent> {
        let script = self.describe();
        if script.is_empty() {
            Vec::new()
        } else {
            vec![Sent::Nftables { script }]
        }
    }

    /// The nft script equivalent to the batch, in its order.
    fn describe(&self) -> String {
        match &self.change {
            Change::Keep => String::new(),
            Change::Create => render::script(&self.tables),
            Change::Replace { stale, .. } => {
                let mut out = String::new();
                for table in &self.tables {
                    out += &delete_table_script(table.table);
                    out += &render::script(std::slice::from_ref(table));
                }
                stale.iter().for_each(|&table| out += &delete_table_script(table));
                out
            }
            Change::Delete(tables) => tables.iter().map(|&table| delete_table_script(table)).collect(),
        }
    }

    fn trace(&self) -> Vec<String> {
        let decision = match (&self.change, &self.have) {
            (Change::Delete(tables), _) if tables.is_empty() => "none of our tables exists: nothing to remove".to_string(),
            (Change::Delete(tables), _) => {
                let names: Vec<&str> = tables.iter().map(|&table| schema::table_name(table)).collect();
                format!("our tables {}: delete them", names.join(", "))
            }
            (_, None) => "a dry run reads nothing: the script of a fresh install".to_string(),
            (Change::Keep, Some(have)) if have.is_empty() => {
                "nothing to program and none of our tables exists: nothing to send".to_string()
            }
            (Change::Keep, Some(_)) => "our tables are exactly as planned: nothing to send".to_string(),
            (Change::Create, Some(_)) => "none of our tables exists: create them".to_string(),
            (Change::Replace { forced: true, .. }, Some(_)) => {
                "our tables are as planned; rewriting them in one transaction, as forced".to_string()
            }
            (Change::Replace { forced: false, .. }, Some(have)) => {
                let details = described_differences(&self.tables, &state::planned(&self.tables), have).join("\n  ");
                format!("our tables differ from the plan; replacing them in one transaction (reconciling):\n  {details}")
            }
        };
        let mut trace = Vec::new();
        if let (Some(have), false) = (&self.have, matches!(self.change, Change::Delete(_))) {
            trace.push(format!("nftables: our tables as read back:\n{}", state::describe(have)));
        }
        trace.push(format!("nftables: {decision}"));
        trace
    }
}

/// What [`TransactionBuilder::delete`] sends: adding first makes the pair succeed whether or not
/// the table exists.
fn delete_table_script(table: Table) -> String {
    format!("add table inet {0}\ndelete table inet {0}\n", schema::table_name(table))
}

/// Commits a transaction, if it holds anything, on a socket of its own.
fn send(tx: &Transaction) -> Result<(), NftError> {
    if tx.messages.is_empty() {
        return Ok(());
    }
    commit(&mut Netlink::open().map_err(NftError::Socket)?, tx)
}

fn described_differences(plan: &[render::TablePlan], want: &Snapshot, have: &Snapshot) -> Vec<String> {
    state::differences(plan, want, have).iter().map(ToString::to_string).collect()
}

/// Whether nf_tables holds any table of the IPv4 (or IPv6) family: where none exists,
/// iptables-nft has nothing either, and its state need not be read with a process.
pub fn has_iptables_tables(family: IpFamily) -> Result<bool, NftError> {
    let mut netlink = Netlink::open().map_err(NftError::Socket)?;
    Ok(!netlink.dump(&DumpRequest::TablesOf { family }).map_err(NftError::Read)?.is_empty())
}

/// iptables-nft keeps a table and its base chains once a rule went into them, even after every
/// rule is gone, and each hooked chain still costs every packet. Deletes, among `tables` of the
/// IPv4 (or IPv6) family, every base chain left with no rule and an accepting policy, and each
/// of those tables left with no chain; a table or chain holding anything else stays. Should a
/// rule or chain appear meanwhile, the kernel refuses the batch and nothing changes.
pub fn prune_iptables_tables(family: IpFamily, tables: &[String]) -> Result<(), NftError> {
    let mut netlink = Netlink::open().map_err(NftError::Socket)?;
    let existing = netlink.dump(&DumpRequest::TablesOf { family }).map_err(NftError::Read)?;
    let chains = netlink.dump(&DumpRequest::ChainsOf { family }).map_err(NftError::Read)?;
    let mut tx = TransactionBuilder::new();
    for table in tables.iter().filter(|t| existing.iter().any(|o| matches!(o, Object::Table(e) if &e.name == *t))) {
        let rules = netlink.dump(&DumpRequest::RulesOf { family, table }).map_err(NftError::Read)?;
        let in_table: Vec<&raw::ChainObject> = chains
            .iter()
            .filter_map(|o| if let Object::Chain(c) = o { Some(c) } else { None })
            .filter(|c| &c.table == table)
            .collect();
        let empty: Vec<&str> = in_table
            .iter()
            .filter(|c| c.hook.as_ref().is_some_and(|h| !matches!(h.policy, Some(p) if p != libc::NF_ACCEPT as u32)))
            .filter(|c| !rules.iter().any(|r| matches!(r, Object::Rule(r) if r.chain == c.name)))
            .map(|c| c.name.as_str())
            .collect();
        tx.delete_empty(family, table, &empty, empty.len() == in_table.len());
    }
    let tx = tx.finish();
    if tx.messages.is_empty() {
        return Ok(());
    }
    match commit(&mut netlink, &tx) {
        // Something was added meanwhile (EBUSY), or is gone already: it is not ours to delete.
        Err(NftError::Refused { error, .. }) if matches!(error.raw_os_error(), Some(libc::EBUSY | libc::ENOENT)) => Ok(()),
        other => other,
    }
}

fn our_tables(objects: &[Object]) -> Vec<Table> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Table(t) => table_named(&t.name),
            _ => None,
        })
        .collect()
}

/// Everything in our tables: chains, rules, and the sets the rules use.
fn read_ours(netlink: &mut Netlink) -> Result<Snapshot, NetlinkError> {
    let mut objects = netlink.dump(&DumpRequest::Tables)?;
    let ours = our_tables(&objects);
    if ours.is_empty() {
        return Ok(Snapshot::new());
    }
    objects.extend(netlink.dump(&DumpRequest::Chains)?);
    for table in ours {
        let table = schema::table_name(table);
        objects.extend(netlink.dump(&DumpRequest::Rules { table })?);
        let sets = netlink.dump(&DumpRequest::Sets { table })?;
        for set in &sets {
            if let Object::Set(raw::SetObject { set: SetRef::Name(name), .. }) = set {
                objects.extend(netlink.dump(&DumpRequest::Elements { table, set: name })?);
            }
        }
        objects.extend(sets);
    }
    Ok(state::snapshot(&objects))
}

fn commit(netlink: &mut Netlink, tx: &Transaction) -> Result<(), NftError> {
    let refusals = netlink.send(tx).map_err(NftError::Send)?;
    let Some(first) = refusals.first() else { return Ok(()) };
    // Position 0 is the batch's begin marker; the one after our messages its end marker.
    let message = first.position.checked_sub(1).and_then(|i| tx.messages.get(i));
    Err(refused(first, message, refusals.len() - 1))
}

fn refused(refusal: &Refusal, message: Option<&Message>, others: usize) -> NftError {
    let what = message.map_or("the transaction as a whole, when the kernel committed it".to_string(), Message::describe);
    let modules = message.map(|m| m.modules().join(" ")).unwrap_or_default();
    let modprobe = if modules.is_empty() { "modprobe nf_tables".to_string() } else { format!("modprobe nf_tables {modules}") };
    let hint = match refusal.errno {
        libc::ENOENT => format!(
            "a kernel module is missing (on the node: `{modprobe}`), or the rule names a chain that does not exist (a chain exists only if it has rules)"
        ),
        libc::EOPNOTSUPP | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT => {
            format!("the kernel lacks support for this; on the node: `{modprobe}`")
        }
        libc::EPERM => "the tool needs CAP_NET_ADMIN in the pod's network namespace".to_string(),
        libc::EEXIST | libc::EBUSY => "something changed our tables at the same moment; run again".to_string(),
        libc::ELOOP => "the rules' jumps form a loop".to_string(),
        libc::EINVAL => "the kernel found the message malformed; it may be too old for this expression".to_string(),
        _ => "see the error above".to_string(),
    };
    NftError::Refused { what, error: io::Error::from_raw_os_error(refusal.errno), hint, others }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InboundPorts, InterceptionMode};
    use crate::model::build;
    use crate::settings::CaptureConfig;

    fn tables(config: &CaptureConfig) -> Vec<render::TablePlan> {
        render::plan(&build(config, Dialect::Nftables))
    }

    fn tproxy() -> CaptureConfig {
        CaptureConfig {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::All { except: vec![] },
            ..CaptureConfig::default()
        }
    }

    #[test]
    fn force_replaces_exact_tables_and_only_reconcile_replaces_drifted_ones() {
        let base = tables(&CaptureConfig::default());
        let exact = state::planned(&base);
        assert_eq!(decide(&base, &Snapshot::new(), false, true).unwrap(), Change::Create);
        assert_eq!(decide(&[], &Snapshot::new(), false, true).unwrap(), Change::Keep);
        assert_eq!(decide(&base, &exact, false, false).unwrap(), Change::Keep);
        assert_eq!(decide(&base, &exact, false, true).unwrap(), Change::Replace { stale: vec![], forced: true });

        let left = state::planned(&tables(&tproxy()));
        assert!(left.contains_key(&Table::Mangle));
        let refused = decide(&base, &left, false, true).unwrap_err();
        assert!(matches!(refused, NftError::Drift { .. }), "force alone replaces no drifted tables: {refused}");
        let replaced = decide(&base, &left, true, false).unwrap();
        assert_eq!(replaced, Change::Replace { stale: vec![Table::Mangle], forced: false });
    }

    #[test]
    fn a_forced_replacement_is_described_and_sent_as_each_table_deleted_and_created() {
        let base = tables(&CaptureConfig::default());
        let have = state::planned(&base);
        let plan = Plan { tables: base, have: Some(have), change: Change::Replace { stale: vec![], forced: true } };
        assert_eq!(plan.outcome(), Outcome::Reconciled);
        let script = plan.describe();
        let nat = "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\nadd table inet istio-proxy-nat\n";
        assert!(script.starts_with(nat), "{script}");
        assert_eq!(script.matches("add table").count(), 2, "{script}");
        assert_eq!(plan.sent(), vec![Sent::Nftables { script }]);
        assert_eq!(
            plan.trace().last().unwrap(),
            "nftables: our tables are as planned; rewriting them in one transaction, as forced"
        );
    }

    #[test]
    fn a_cleanup_deletes_the_tables_found_and_nothing_without_them() {
        let found = Plan { tables: Vec::new(), have: None, change: Change::Delete(vec![Table::Nat, Table::Mangle]) };
        assert_eq!(found.outcome(), Outcome::Removed);
        let nat_and_mangle = "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n\
                              add table inet istio-proxy-mangle\ndelete table inet istio-proxy-mangle\n";
        assert_eq!(found.describe(), nat_and_mangle);
        let none = Plan { tables: Vec::new(), have: None, change: Change::Delete(Vec::new()) };
        assert_eq!(none.outcome(), Outcome::NothingToRemove);
        assert!(none.sent().is_empty() && none.describe().is_empty());
    }
}
