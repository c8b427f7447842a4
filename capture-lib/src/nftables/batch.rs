//! One nf_tables transaction, built with nftnl: tables, chains, anonymous sets and rules,
//! each message remembered so a kernel error can name, in nft syntax, what it refused.

use std::ffi::CString;

use nftnl::set::Set;
use nftnl::{Batch, FinalizedBatch, MsgType, NlMsg, ProtoFamily};

use super::expr::{add_terms, port_set_userdata, Port, PortSet};
use super::raw::{describe_anonymous_set, NonRecursive, Unacknowledged, ANONYMOUS_SET};
use super::render::{add_chain_line, add_rule_line, nft_family, ChainPlan, NftRule, TablePlan, Term};
use super::schema::{chain_name, table_name, ChainType, Hook};
use crate::family::IpFamily;
use crate::model::{Chain, Table};

/// What one message of the batch does. Described only when the kernel refuses it: the
/// words would cost more than building the message.
#[derive(Debug, Clone, Copy)]
pub(super) enum Message<'p> {
    AddTable(Table),
    DeleteTable(Table),
    AddChain(Table, &'p ChainPlan),
    AddRule(Table, Chain, &'p NftRule),
    /// The anonymous set (or its elements) a rule's port list needs.
    AddPortSet(Table, Chain, &'p NftRule),
    /// An empty table or chain of iptables-nft's (`family` is `ip` or `ip6`).
    DeleteEmpty {
        family: &'static str,
        table: &'p str,
        chain: Option<&'p str>,
    },
}

impl Message<'_> {
    /// The message in nft syntax, e.g. `add rule inet istio-proxy-nat istio-output ...`.
    pub(super) fn describe(&self) -> String {
        match *self {
            Message::AddTable(table) => format!("add table inet {}", table_name(table)),
            Message::DeleteTable(table) => format!("delete table inet {}", table_name(table)),
            Message::AddChain(table, chain) => add_chain_line(table, chain),
            Message::AddRule(table, chain, rule) => add_rule_line(table, chain, rule),
            Message::AddPortSet(table, chain, rule) => format!("{} (its port set)", add_rule_line(table, chain, rule)),
            Message::DeleteEmpty { family, table, chain: Some(chain) } => format!("delete chain {family} {table} {chain}"),
            Message::DeleteEmpty { family, table, chain: None } => format!("delete table {family} {table}"),
        }
    }

    /// Kernel modules the message needs beyond nf_tables itself.
    pub(super) fn modules(&self) -> Vec<&'static str> {
        match *self {
            Message::AddChain(_, chain) if chain.base.is_some_and(|b| b.kind == ChainType::Nat) => {
                vec!["nft_chain_nat"]
            }
            Message::AddRule(_, _, rule) => {
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
            _ => Vec::new(),
        }
    }
}

pub(super) struct Transaction<'p> {
    pub batch: FinalizedBatch,
    /// One per message, in batch order (the batch's begin and end markers excluded).
    pub messages: Vec<Message<'p>>,
}

pub(super) struct TransactionBuilder<'p> {
    batch: Batch,
    messages: Vec<Message<'p>>,
    /// Anonymous sets are tied to their rule by an id unique within the batch.
    next_set_id: u32,
}

fn c_name(name: &str) -> CString {
    CString::new(name).expect("our table and chain names have no NUL")
}

impl<'p> TransactionBuilder<'p> {
    pub(super) fn new() -> Self {
        TransactionBuilder { batch: Batch::new(), messages: Vec::new(), next_set_id: 1 }
    }

    fn push(&mut self, msg: &impl NlMsg, kind: MsgType, message: Message<'p>) {
        self.batch.add(&Unacknowledged(msg), kind);
        self.messages.push(message);
    }

    /// Creates the table with all its chains and rules. The table must not exist at this
    /// point of the transaction (it is new, or was deleted earlier in the same batch).
    pub(super) fn create(&mut self, plan: &'p TablePlan) {
        let table = nftnl::Table::new(c_name(table_name(plan.table)), ProtoFamily::Inet);
        self.push(&table, MsgType::Add, Message::AddTable(plan.table));
        // Every chain exists before any rule, so jumps to later chains resolve.
        let chains: Vec<nftnl::Chain> = plan.chains.iter().map(|c| self.add_chain(&table, plan.table, c)).collect();
        for (chain_plan, chain) in plan.chains.iter().zip(&chains) {
            for rule in &chain_plan.rules {
                self.add_rule(&table, chain, plan.table, chain_plan.chain, rule);
            }
        }
    }

    fn add_chain<'t>(&mut self, table: &'t nftnl::Table, owner: Table, plan: &'p ChainPlan) -> nftnl::Chain<'t> {
        let mut chain = nftnl::Chain::new(c_name(chain_name(plan.chain)), table);
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
        }
        self.push(&chain, MsgType::Add, Message::AddChain(owner, plan));
        chain
    }

    fn add_rule(&mut self, table: &nftnl::Table, chain: &nftnl::Chain, owner: Table, in_chain: Chain, rule: &'p NftRule) {
        let mut sets = Vec::new();
        for term in &rule.terms {
            if let Term::PortNotIn { proto, ports } = term {
                let set = PortSet { id: self.next_set_id, proto: *proto, ports: ports.clone() };
                self.next_set_id += 1;
                self.add_port_set(table, &set, Message::AddPortSet(owner, in_chain, rule));
                sets.push(set);
            }
        }
        let mut nft_rule = nftnl::Rule::new(chain);
        add_terms(&mut nft_rule, &rule.terms, &sets);
        self.push(&nft_rule, MsgType::Add, Message::AddRule(owner, in_chain, rule));
    }

    /// An anonymous constant set, as nft makes one for `tcp dport != { 53, 15008 }`.
    fn add_port_set(&mut self, table: &nftnl::Table, port_set: &PortSet, message: Message<'p>) {
        let mut set = Set::<Port>::new(ANONYMOUS_SET, port_set.id, table, ProtoFamily::Inet);
        for &port in &port_set.ports {
            set.add(&Port(port));
        }
        describe_anonymous_set(&set, port_set.ports.len() as u32, &port_set_userdata(port_set.proto));
        self.push(&set, MsgType::Add, message);
        for elements in set.elems_iter() {
            self.push(&elements, MsgType::Add, message);
        }
    }

    /// Deletes one of our tables. Adding it first makes the pair succeed whether or not the
    /// table exists, as in Istio's cleanup.
    pub(super) fn delete(&mut self, table: Table) {
        let nft_table = nftnl::Table::new(c_name(table_name(table)), ProtoFamily::Inet);
        self.push(&nft_table, MsgType::Add, Message::AddTable(table));
        self.push(&nft_table, MsgType::Del, Message::DeleteTable(table));
    }

    /// Deletes an iptables-nft table's empty base chains, and the table too when `whole` (it then
    /// holds nothing else); refused by the kernel if anything is in them by then.
    pub(super) fn delete_empty(&mut self, family: IpFamily, table: &'p str, chains: &[&'p str], whole: bool) {
        let proto = match family {
            IpFamily::V4 => ProtoFamily::Ipv4,
            IpFamily::V6 => ProtoFamily::Ipv6,
        };
        let family = nft_family(family);
        let nft_table = nftnl::Table::new(c_name(table), proto);
        for &chain in chains {
            let nft_chain = nftnl::Chain::new(c_name(chain), &nft_table);
            self.batch.add(&NonRecursive(&nft_chain), MsgType::Del);
            self.messages.push(Message::DeleteEmpty { family, table, chain: Some(chain) });
        }
        if whole {
            self.batch.add(&NonRecursive(&nft_table), MsgType::Del);
            self.messages.push(Message::DeleteEmpty { family, table, chain: None });
        }
    }

    pub(super) fn finish(self) -> Transaction<'p> {
        Transaction { batch: self.batch.finalize(), messages: self.messages }
    }
}
