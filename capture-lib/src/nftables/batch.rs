//! One nf_tables transaction, built with nftnl: tables, chains, anonymous sets and rules,
//! each message remembered so a kernel error can name, in nft syntax, what it refused.

use std::ffi::CString;
use std::net::{Ipv4Addr, Ipv6Addr};

use nftnl::set::Set;
use nftnl::{Batch, FinalizedBatch, MsgType, NlMsg, ProtoFamily};

use super::expr::{
    add_terms, named_set_userdata, open_interval_userdata, port_set_userdata, set_elements, Port, PortSet, RuleSets,
};
use super::raw::{add_element, describe_set, NonRecursive, Unacknowledged, ANONYMOUS_SET};
use super::render::{add_chain_line, add_rule_line, add_set_line, nft_family, ChainPlan, NftRule, TablePlan, Term};
use super::schema::{chain_name, table_name, ChainType, Hook};
use crate::family::IpFamily;
use crate::model::sets::{Set as PlannedSet, SetElements, SetList};
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
    /// A named set of the set form.
    AddSet(Table, &'p PlannedSet),
    /// Its elements (one message of those that carry them).
    AddElements(Table, &'p PlannedSet),
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
            Message::AddSet(table, set) => add_set_line(table, set),
            Message::AddElements(table, set) => {
                let count = match &set.elements {
                    SetElements::Ports(ports) => ports.len(),
                    SetElements::Ranges(ranges) => ranges.len(),
                };
                format!("add element inet {} {} {{ .. }} (of its {count} elements)", table_name(table), set.list.name())
            }
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
        // The sets, filled, before the rules that look them up.
        let named: Vec<(SetList, u32)> =
            plan.sets.iter().map(|set| (set.list, self.add_named_set(&table, plan.table, set))).collect();
        // Every chain exists before any rule, so jumps to later chains resolve.
        let chains: Vec<nftnl::Chain> = plan.chains.iter().map(|c| self.add_chain(&table, plan.table, c)).collect();
        for (chain_plan, chain) in plan.chains.iter().zip(&chains) {
            for rule in &chain_plan.rules {
                self.add_rule(&table, chain, (plan.table, chain_plan.chain), rule, &named);
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

    /// `(owner, in_chain)`: where the rule goes; `named`: the sets of its table.
    fn add_rule(
        &mut self,
        table: &nftnl::Table,
        chain: &nftnl::Chain,
        (owner, in_chain): (Table, Chain),
        rule: &'p NftRule,
        named: &[(SetList, u32)],
    ) {
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
        add_terms(&mut nft_rule, &rule.terms, &RuleSets { anonymous: &sets, named });
        self.push(&nft_rule, MsgType::Add, Message::AddRule(owner, in_chain, rule));
    }

    /// An anonymous constant set, as nft makes one for `tcp dport != { 53, 15008 }`.
    fn add_port_set(&mut self, table: &nftnl::Table, port_set: &PortSet, message: Message<'p>) {
        let mut set = Set::<Port>::new(ANONYMOUS_SET, port_set.id, table, ProtoFamily::Inet);
        for &port in &port_set.ports {
            set.add(&Port(port));
        }
        describe_set(&set, None, Some(port_set.ports.len() as u32), &port_set_userdata(port_set.proto));
        self.push_set(&set, message, message);
    }

    /// A named set and its elements, as nft creates one from `add set` and `add element`;
    /// returns its id in the batch.
    fn add_named_set(&mut self, table: &nftnl::Table, owner: Table, plan: &'p PlannedSet) -> u32 {
        let id = self.next_set_id;
        self.next_set_id += 1;
        let name = c_name(plan.list.name());
        match plan.list.family() {
            Some(IpFamily::V4) => {
                self.push_named_set(Set::<Ipv4Addr>::new_named(&name, id, table, ProtoFamily::Inet), owner, plan)
            }
            Some(IpFamily::V6) => {
                self.push_named_set(Set::<Ipv6Addr>::new_named(&name, id, table, ProtoFamily::Inet), owner, plan)
            }
            None => self.push_named_set(Set::<Port>::new_named(&name, id, table, ProtoFamily::Inet), owner, plan),
        }
        id
    }

    fn push_named_set<K>(&mut self, mut set: Set<'_, K>, owner: Table, plan: &'p PlannedSet) {
        let interval = plan.list.family().is_some();
        let flags = if interval { libc::NFT_SET_INTERVAL as u32 } else { 0 };
        describe_set(&set, Some(flags), None, &named_set_userdata());
        let open = open_interval_userdata();
        for element in set_elements(&plan.elements) {
            add_element(&mut set, &element.key, element.flags, element.open.then_some(&open[..]));
        }
        self.push_set(&set, Message::AddSet(owner, plan), Message::AddElements(owner, plan));
    }

    /// The set, then its elements in as many messages as they need (an attribute holds at most
    /// 64 KiB).
    fn push_set<K>(&mut self, set: &Set<'_, K>, message: Message<'p>, elements_message: Message<'p>) {
        self.push(set, MsgType::Add, message);
        for elements in set.elems_iter() {
            self.push(&elements, MsgType::Add, elements_message);
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
