//! Istio's nftables layout: table and chain names, base-chain hooks, and the order in
//! which Istio creates chains (`nft list ruleset` prints chains in creation order).

use crate::model::{Chain, Table};

/// Tables in the order Istio's transaction creates them.
pub(super) const TABLE_ORDER: [Table; 3] = [Table::Nat, Table::Mangle, Table::Raw];

pub(super) fn table_name(table: Table) -> &'static str {
    match table {
        Table::Nat => "istio-proxy-nat",
        Table::Mangle => "istio-proxy-mangle",
        Table::Raw => "istio-proxy-raw",
    }
}

/// Our table of that name, if it is one.
pub(super) fn table_named(name: &str) -> Option<Table> {
    TABLE_ORDER.into_iter().find(|&t| table_name(t) == name)
}

pub(super) fn chain_name(chain: Chain) -> &'static str {
    match chain {
        Chain::Prerouting => "prerouting",
        Chain::Output => "output",
        Chain::Inbound => "istio-inbound",
        Chain::Redirect => "istio-redirect",
        Chain::InRedirect => "istio-in-redirect",
        Chain::IstioOutput => "istio-output",
        Chain::OutputDns => "istio-output-dns",
        Chain::Divert => "istio-divert",
        Chain::Tproxy => "istio-tproxy",
        Chain::Drop => "istio-drop",
    }
}

/// Istio declares each table's chains from a fixed list; a chain the list lacks (only a
/// hand-made ruleset has one) goes last.
pub(super) fn chain_rank(table: Table, chain: Chain) -> usize {
    use Chain::*;
    let order: &[Chain] = match table {
        Table::Nat => &[Prerouting, Output, Inbound, Redirect, InRedirect, IstioOutput, OutputDns],
        Table::Mangle => &[Prerouting, Output, Divert, Tproxy, Inbound, Drop],
        Table::Raw => &[Prerouting, Output, Inbound, OutputDns],
    };
    order.iter().position(|&c| c == chain).unwrap_or(order.len())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChainType {
    Filter,
    Nat,
    Route,
}

impl ChainType {
    pub(super) fn name(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
            ChainType::Route => "route",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    Prerouting,
    Output,
}

impl Hook {
    pub(super) fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        }
    }
}

/// Where a base chain attaches to the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

/// The hook of a kernel-facing chain; `None` for Istio's own (regular) chains.
pub(super) fn base_chain(table: Table, chain: Chain) -> Option<BaseChain> {
    let hook = match chain {
        Chain::Prerouting => Hook::Prerouting,
        Chain::Output => Hook::Output,
        _ => return None,
    };
    let (kind, priority) = match (table, hook) {
        (Table::Nat, _) => (ChainType::Nat, -100),
        // Marks set in mangle output must re-route the packet, hence `route`.
        (Table::Mangle, Hook::Output) => (ChainType::Route, -150),
        (Table::Mangle, Hook::Prerouting) => (ChainType::Filter, -150),
        (Table::Raw, _) => (ChainType::Filter, -300),
    };
    Some(BaseChain { kind, hook, priority })
}
