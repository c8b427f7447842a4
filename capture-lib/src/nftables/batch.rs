//! One nf_tables transaction, built with nftnl: tables, chains, anonymous sets and rules,
//! each message remembered in nft syntax so a kernel error can name what it refused.

use std::ffi::CString;

use nftnl::set::Set;
use nftnl::{Batch, FinalizedBatch, MsgType, NlMsg, ProtoFamily};

use super::expr::{add_terms, port_set_userdata, Port, PortSet};
use super::raw::describe_anonymous_set;
use super::render::{add_chain_line, add_rule_line, ChainPlan, NftRule, TablePlan, Term};
use super::schema::{chain_name, table_name, ChainType, Hook};
use crate::model::Table;

/// What one message of the batch does, for error reports.
#[derive(Debug, Clone)]
pub(super) struct Message {
    /// The message in nft syntax, e.g. `add rule inet istio-proxy-nat istio-output ...`.
    pub what: String,
    /// Kernel modules the message needs beyond nf_tables itself.
    pub modules: Vec<&'static str>,
}

pub(super) struct Transaction {
    pub batch: FinalizedBatch,
    /// One per message, in batch order (the batch's begin and end markers excluded).
    pub messages: Vec<Message>,
}

pub(super) struct TransactionBuilder {
    batch: Batch,
    messages: Vec<Message>,
    /// Anonymous sets are tied to their rule by an id unique within the batch.
    next_set_id: u32,
}

fn c_name(name: &str) -> CString {
    CString::new(name).expect("our table and chain names have no NUL")
}

impl TransactionBuilder {
    pub(super) fn new() -> Self {
        TransactionBuilder { batch: Batch::new(), messages: Vec::new(), next_set_id: 1 }
    }

    fn push(&mut self, msg: &impl NlMsg, kind: MsgType, what: String, modules: Vec<&'static str>) {
        self.batch.add(msg, kind);
        self.messages.push(Message { what, modules });
    }

    /// Creates the table with all its chains and rules. The table must not exist at this
    /// point of the transaction (it is new, or was deleted earlier in the same batch).
    pub(super) fn create(&mut self, plan: &TablePlan) {
        let name = table_name(plan.table);
        let table = nftnl::Table::new(c_name(name), ProtoFamily::Inet);
        self.push(&table, MsgType::Add, format!("add table inet {name}"), Vec::new());
        // Every chain exists before any rule, so jumps to later chains resolve.
        let chains: Vec<nftnl::Chain> = plan.chains.iter().map(|c| self.add_chain(&table, plan.table, c)).collect();
        for (chain_plan, chain) in plan.chains.iter().zip(&chains) {
            for rule in &chain_plan.rules {
                self.add_rule(&table, chain, plan.table, chain_plan, rule);
            }
        }
    }

    fn add_chain<'t>(&mut self, table: &'t nftnl::Table, owner: Table, plan: &ChainPlan) -> nftnl::Chain<'t> {
        let mut chain = nftnl::Chain::new(c_name(chain_name(plan.chain)), table);
        let mut modules = Vec::new();
        if let Some(base) = plan.base {
            chain.set_type(match base.kind {
                ChainType::Filter => nftnl::ChainType::Filter,
                ChainType::Nat => nftnl::ChainType::Nat,
                ChainType::Route => nftnl::ChainType::Route,
            });
            let hook = match base.hook {
                Hook::Prerouting => nftnl::Hook::PreRouting,
                Hook::Output => nftnl::Hook::Out,
            };
            chain.set_hook(hook, base.priority);
            if base.kind == ChainType::Nat {
                modules.push("nft_chain_nat");
            }
        }
        self.push(&chain, MsgType::Add, add_chain_line(owner, plan), modules);
        chain
    }

    fn add_rule(&mut self, table: &nftnl::Table, chain: &nftnl::Chain, owner: Table, plan: &ChainPlan, rule: &NftRule) {
        let what = add_rule_line(owner, plan.chain, rule);
        let modules = rule_modules(rule);
        let mut sets = Vec::new();
        for term in &rule.terms {
            if let Term::PortNotIn { proto, ports } = term {
                let set = PortSet { id: self.next_set_id, proto: *proto, ports: ports.clone() };
                self.next_set_id += 1;
                self.add_port_set(table, &set, &what);
                sets.push(set);
            }
        }
        let mut nft_rule = nftnl::Rule::new(chain);
        add_terms(&mut nft_rule, &rule.terms, &sets);
        self.push(&nft_rule, MsgType::Add, what, modules);
    }

    /// An anonymous constant set, as nft makes one for `tcp dport != { 53, 15008 }`.
    fn add_port_set(&mut self, table: &nftnl::Table, port_set: &PortSet, rule: &str) {
        let mut set = Set::<Port>::new(c"__set%d", port_set.id, table, ProtoFamily::Inet);
        for &port in &port_set.ports {
            set.add(&Port(port));
        }
        describe_anonymous_set(&set, port_set.ports.len() as u32, &port_set_userdata(port_set.proto));
        let what = format!("{rule} (its port set)");
        self.push(&set, MsgType::Add, what.clone(), Vec::new());
        for elements in set.elems_iter() {
            self.push(&elements, MsgType::Add, what.clone(), Vec::new());
        }
    }

    /// Deletes one of our tables. Adding it first makes the pair succeed whether or not the
    /// table exists, as in Istio's cleanup.
    pub(super) fn delete(&mut self, table: Table) {
        let name = table_name(table);
        let nft_table = nftnl::Table::new(c_name(name), ProtoFamily::Inet);
        self.push(&nft_table, MsgType::Add, format!("add table inet {name}"), Vec::new());
        self.push(&nft_table, MsgType::Del, format!("delete table inet {name}"), Vec::new());
    }

    pub(super) fn finish(self) -> Transaction {
        Transaction { batch: self.batch.finalize(), messages: self.messages }
    }
}

/// The modules a rule's expressions live in (those not built into nf_tables).
fn rule_modules(rule: &NftRule) -> Vec<&'static str> {
    let mut modules: Vec<&'static str> = rule
        .terms
        .iter()
        .filter_map(|term| match term {
            Term::Redirect(_) => Some("nft_redir"),
            Term::Tproxy { .. } => Some("nft_tproxy"),
            Term::CtState(_) | Term::ConnMark(_) | Term::SaveMark | Term::RestoreMark | Term::CtZone(_) => {
                Some("nft_ct")
            }
            _ => None,
        })
        .collect();
    modules.sort_unstable();
    modules.dedup();
    modules
}
