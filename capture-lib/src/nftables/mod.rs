//! The native nftables backend: Istio's nft ruleset, sent over netlink as one nf_tables
//! transaction (no `nft` or `iptables` binary at run time).
//!
//! Each model rule becomes one rule of an `inet` table (`istio-proxy-nat`, `-mangle`,
//! `-raw`), compiled to the same bytecode `nft -f` makes of Istio's own rule text, so
//! `nft list ruleset` prints exactly what Istio's tool leaves behind.
//!
//! [`apply`] first reads our tables back and compares them with what it would send (both
//! parsed and printed by libnftnl): equal means nothing is sent; none of ours means a plain
//! install; anything else is drift, an error unless `reconcile`, which replaces every table
//! of ours in the same transaction (add, delete, add full) so no packet sees a gap.

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

use crate::family::IpFamily;
use crate::model::{Ruleset, Table};
use crate::netlink::{NetlinkError, Refusal};
use crate::{Detail, Outcome};

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
        "the capture tables in this namespace differ from the requested ones:\n  {}\nre-run with --reconcile to replace them atomically (or --cleanup-only to remove them)",
        details.join("\n  ")
    )]
    Drift { details: Vec<String> },
}

/// The nft script of a fresh install (for `--dry-run`): what [`apply`] sends to a namespace
/// holding none of our tables, loadable with `nft -f`.
pub fn script(ruleset: &Ruleset) -> String {
    render::script(&render::plan(ruleset))
}

/// What [`apply`] did, and, with enough [`Detail`], what it sent and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// [`Detail::Sent`] and up: the nft script equivalent to the batch sent; `None` when nothing was.
    pub script: Option<String>,
    /// [`Detail::Trace`]: our tables as read back, and the decision made from them.
    pub trace: Vec<String>,
}

/// Programs `ruleset` in the current network namespace (see the module docs).
pub fn apply(ruleset: &Ruleset, reconcile: bool, detail: Detail) -> Result<Applied, NftError> {
    let plan = render::plan(ruleset);
    let mut netlink = Netlink::open().map_err(NftError::Socket)?;
    let have = read_ours(&mut netlink).map_err(NftError::Read)?;
    let mut tx = TransactionBuilder::new();
    let sent = |render: &dyn Fn() -> String| (detail >= Detail::Sent).then(render);
    let (outcome, script, decision) = if have.is_empty() && plan.is_empty() {
        (Outcome::Unchanged, None, "nothing to program and none of our tables exists: nothing to send".to_string())
    } else if have.is_empty() {
        plan.iter().for_each(|table| tx.create(table));
        (Outcome::Applied, sent(&|| render::script(&plan)), "none of our tables exists: create them".to_string())
    } else {
        let want = state::planned(&plan);
        if have == want {
            (Outcome::Unchanged, None, "our tables are exactly as planned: nothing to send".to_string())
        } else if !reconcile {
            return Err(NftError::Drift { details: described_differences(&plan, &want, &have) });
        } else {
            let stale: Vec<Table> = have.keys().filter(|t| !want.contains_key(t)).copied().collect();
            for table in &plan {
                tx.delete(table.table);
                tx.create(table);
            }
            stale.iter().for_each(|&table| tx.delete(table));
            let decision = if detail >= Detail::Trace {
                let details = described_differences(&plan, &want, &have).join("\n  ");
                format!("our tables differ from the plan; replacing them in one transaction (--reconcile):\n  {details}")
            } else {
                String::new()
            };
            (Outcome::Reconciled, sent(&|| replacement_script(&plan, &stale)), decision)
        }
    };
    let trace = if detail >= Detail::Trace {
        vec![format!("nftables: our tables as read back:\n{}", state::describe(&have)), format!("nftables: {decision}")]
    } else {
        Vec::new()
    };
    if outcome != Outcome::Unchanged {
        commit(&mut netlink, &tx.finish())?;
    }
    Ok(Applied { outcome, script, trace })
}

/// The nft script of a reconcile, in the batch's order: each planned table deleted and
/// created again, then the stale ones deleted.
fn replacement_script(plan: &[render::TablePlan], stale: &[Table]) -> String {
    let mut out = String::new();
    for table in plan {
        out += &delete_table_script(table.table);
        out += &render::script(std::slice::from_ref(table));
    }
    stale.iter().for_each(|&table| out += &delete_table_script(table));
    out
}

/// What [`TransactionBuilder::delete`] sends: adding first makes the pair succeed whether or not
/// the table exists.
fn delete_table_script(table: Table) -> String {
    format!("add table inet {0}\ndelete table inet {0}\n", schema::table_name(table))
}

/// How our tables differ from `ruleset`, in words; empty when exactly in place. Changes nothing.
pub fn differences(ruleset: &Ruleset) -> Result<Vec<String>, NftError> {
    let plan = render::plan(ruleset);
    let mut netlink = Netlink::open().map_err(NftError::Socket)?;
    let have = read_ours(&mut netlink).map_err(NftError::Read)?;
    let want = state::planned(&plan);
    Ok(if have == want { Vec::new() } else { described_differences(&plan, &want, &have) })
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

/// An nft script equivalent to `cleanup` (loadable even where the tables are absent).
pub fn cleanup_script() -> String {
    schema::TABLE_ORDER.into_iter().map(delete_table_script).collect()
}

/// Whether any of our tables exists.
pub fn holds_ours() -> Result<bool, NftError> {
    let mut netlink = Netlink::open().map_err(NftError::Socket)?;
    Ok(!our_tables(&netlink.dump(&DumpRequest::Tables).map_err(NftError::Read)?).is_empty())
}

/// Deletes our three tables, and nothing else, in one transaction.
pub fn cleanup() -> Result<Outcome, NftError> {
    let mut netlink = Netlink::open().map_err(NftError::Socket)?;
    let ours = our_tables(&netlink.dump(&DumpRequest::Tables).map_err(NftError::Read)?);
    if ours.is_empty() {
        return Ok(Outcome::NothingToRemove);
    }
    let mut tx = TransactionBuilder::new();
    ours.into_iter().for_each(|table| tx.delete(table));
    commit(&mut netlink, &tx.finish())?;
    Ok(Outcome::Removed)
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
