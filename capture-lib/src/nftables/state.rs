//! Our tables in comparable form, from the kernel's dumps or from the batch we would send.
//!
//! Both sides go through the same parser and printer (libnftnl's), so "installed equals
//! planned" is a plain comparison: rule expressions as libnftnl prints them, with counter
//! values dropped and anonymous sets replaced by their contents. A difference shows its rules
//! in nft syntax: the one planned as we render it, the one found decompiled.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use super::batch::{Transaction, TransactionBuilder};
use super::decompile::decompile;
use super::messages::{self, batch_messages};
use super::raw::{ChainHook, ExprObject, Object, SetRef};
use super::render::TablePlan;
use super::schema::{chain_name, table_name, table_named, TABLE_ORDER};
use crate::drift::{chain_rule_differences, count, Difference, Kind};
use crate::model::Table;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainState {
    pub name: String,
    /// `type .. hook .. priority .. policy ..` for base chains.
    pub hook: Option<String>,
    pub rules: Vec<RuleState>,
}

/// One rule: what is compared, and what it is made of, to show it.
#[derive(Debug, Clone, Eq)]
pub(super) struct RuleState {
    /// Its expressions as libnftnl prints them, counters without values, sets by contents.
    pub text: String,
    exprs: Vec<ExprObject>,
    /// The elements of each set it looks up, in order (`None`: not found).
    sets: Vec<Option<Vec<Vec<u8>>>>,
}

/// Rules are equal when their texts are: the rest only shows them (and names a set by the id
/// of our batch, or by the name the kernel gave it).
impl PartialEq for RuleState {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl RuleState {
    /// The rule in nft syntax, as `render.rs` writes rules.
    pub fn nft(&self) -> String {
        decompile(&self.exprs, &self.sets)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableState {
    pub flags: u32,
    pub chains: Vec<ChainState>,
}

/// Our tables that exist (or would), by table.
pub(super) type Snapshot = BTreeMap<Table, TableState>;

fn describe_hook(hook: &ChainHook) -> String {
    // A chain created without a policy accepts.
    let policy = match hook.policy.unwrap_or(libc::NF_ACCEPT as u32) as i32 {
        libc::NF_ACCEPT => "accept".to_string(),
        libc::NF_DROP => "drop".to_string(),
        other => other.to_string(),
    };
    let hook_name = match hook.hook as i32 {
        libc::NF_INET_PRE_ROUTING => "prerouting".to_string(),
        libc::NF_INET_LOCAL_IN => "input".to_string(),
        libc::NF_INET_FORWARD => "forward".to_string(),
        libc::NF_INET_LOCAL_OUT => "output".to_string(),
        libc::NF_INET_POST_ROUTING => "postrouting".to_string(),
        other => other.to_string(),
    };
    format!("type {} hook {hook_name} priority {} policy {policy}", hook.kind, hook.priority)
}

/// A set as compared (key type, flags and sorted contents) and its elements.
struct SetState {
    text: String,
    elements: Vec<Vec<u8>>,
}

/// Every set by table and reference.
fn describe_sets(objects: &[Object]) -> HashMap<(&str, &SetRef), SetState> {
    let mut keys: HashMap<(&str, &SetRef), Vec<Vec<u8>>> = HashMap::new();
    for object in objects {
        if let Object::Elements(elements) = object {
            keys.entry((elements.table.as_str(), &elements.set)).or_default().extend(elements.keys.iter().cloned());
        }
    }
    objects
        .iter()
        .filter_map(|object| match object {
            Object::Set(set) => {
                let elements = keys.remove(&(set.table.as_str(), &set.set)).unwrap_or_default();
                let mut contents: Vec<String> = elements.iter().map(|k| hex(k)).collect();
                contents.sort();
                let text = format!("type {} len {} flags {:#x} {{{}}}", set.key_type, set.key_len, set.flags, contents.join(","));
                Some(((set.table.as_str(), &set.set), SetState { text, elements }))
            }
            _ => None,
        })
        .collect()
}

/// The rule `exprs` make in `table`, in comparable form.
fn rule_state(table: &str, exprs: &[ExprObject], sets: &HashMap<(&str, &SetRef), SetState>) -> RuleState {
    let mut texts = Vec::with_capacity(exprs.len());
    let mut looked_up = Vec::new();
    for expr in exprs {
        texts.push(match expr {
            ExprObject::Counter => "[ counter ]".to_string(),
            ExprObject::Lookup { set, flags, .. } => {
                let set = sets.get(&(table, set));
                looked_up.push(set.map(|s| s.elements.clone()));
                format!("[ lookup {} flags {flags:#x} ]", set.map_or("missing set", |s| s.text.as_str()))
            }
            ExprObject::Other { text, .. } => format!("[ {text} ]"),
        });
    }
    RuleState { text: texts.join(" "), exprs: exprs.to_vec(), sets: looked_up }
}

/// Builds the snapshot of our tables from parsed objects; anything of other tables is ignored.
pub(super) fn snapshot(objects: &[Object]) -> Snapshot {
    let sets = describe_sets(objects);
    let mut tables = Snapshot::new();
    for object in objects {
        match object {
            Object::Table(t) => {
                if let Some(table) = table_named(&t.name) {
                    tables.insert(table, TableState { flags: t.flags, chains: Vec::new() });
                }
            }
            Object::Chain(c) => {
                if let Some(state) = table_named(&c.table).and_then(|t| tables.get_mut(&t)) {
                    state.chains.push(ChainState {
                        name: c.name.clone(),
                        hook: c.hook.as_ref().map(describe_hook),
                        rules: Vec::new(),
                    });
                }
            }
            Object::Rule(r) => {
                let chain = table_named(&r.table)
                    .and_then(|t| tables.get_mut(&t))
                    .and_then(|state| state.chains.iter_mut().find(|c| c.name == r.chain));
                if let Some(chain) = chain {
                    chain.rules.push(rule_state(&r.table, &r.exprs, &sets));
                }
            }
            Object::Set(_) | Object::Elements(_) => {}
        }
    }
    tables
}

/// Our tables as read back, in libnftnl's words (rules as expressions), for a debug log.
pub(super) fn describe(snapshot: &Snapshot) -> String {
    if snapshot.is_empty() {
        return "none of our tables exists".to_string();
    }
    let mut out = String::new();
    for (&table, state) in snapshot {
        let _ = writeln!(out, "table inet {} flags {:#x}", table_name(table), state.flags);
        for chain in &state.chains {
            let _ = writeln!(out, "  chain {} {{ {} }}", chain.name, chain.hook.as_deref().unwrap_or("regular"));
            for rule in &chain.rules {
                let _ = writeln!(out, "    {}", rule.text);
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The objects of a batch, parsed back from its bytes.
fn batch_objects(tx: &Transaction) -> Vec<Object> {
    batch_messages(tx).filter_map(|msg| messages::parse(msg).expect("our own messages parse")).collect()
}

/// What our tables look like right after a fresh install of `plan`.
pub(super) fn planned(plan: &[TablePlan]) -> Snapshot {
    let mut builder = TransactionBuilder::new();
    for table in plan {
        builder.create(table);
    }
    snapshot(&batch_objects(&builder.finish()))
}

/// How what is installed differs from what is planned, table by table.
pub(super) fn differences(plan: &[TablePlan], want: &Snapshot, have: &Snapshot) -> Vec<Difference> {
    let mut out = Vec::new();
    for table in TABLE_ORDER {
        let place = format!("table inet {}", table_name(table));
        match (want.get(&table), have.get(&table)) {
            (None, None) => {}
            (Some(w), None) => out.push(Difference::new(Kind::TableMissing, place).expected(count(w.chains.len(), "chain"))),
            (None, Some(h)) => out.push(
                Difference::new(Kind::UnexpectedTable, place)
                    .found(format!("{} (left by another configuration?)", count(h.chains.len(), "chain"))),
            ),
            (Some(w), Some(h)) => {
                if w.flags != h.flags {
                    let flags = |f: u32| format!("flags {f:#x}{}", if f & 1 != 0 { " (dormant)" } else { "" });
                    out.push(Difference::new(Kind::TableDiffers, &place).expected(flags(w.flags)).found(flags(h.flags)));
                }
                let table_plan = plan.iter().find(|p| p.table == table);
                out.extend(chain_differences(&place, table_plan, &w.chains, &h.chains));
            }
        }
    }
    out
}

/// A chain in words: its hook, if any, and how many rules it holds.
fn describe_chain(chain: &ChainState) -> String {
    let rules = count(chain.rules.len(), "rule");
    match &chain.hook {
        Some(hook) => format!("{hook}, {rules}"),
        None => rules,
    }
}

fn chain_differences(table: &str, plan: Option<&TablePlan>, want: &[ChainState], have: &[ChainState]) -> Vec<Difference> {
    let mut out = Vec::new();
    for h in have.iter().filter(|h| !want.iter().any(|w| w.name == h.name)) {
        out.push(Difference::new(Kind::UnexpectedChain, format!("{table}, chain {}", h.name)).found(describe_chain(h)));
    }
    for w in want {
        let place = format!("{table}, chain {}", w.name);
        let Some(h) = have.iter().find(|h| h.name == w.name) else {
            out.push(Difference::new(Kind::ChainMissing, place).expected(describe_chain(w)));
            continue;
        };
        if w.hook != h.hook {
            let show = |hook: &Option<String>| hook.clone().unwrap_or_else(|| "a regular chain".to_string());
            out.push(Difference::new(Kind::ChainDiffers, &place).expected(show(&w.hook)).found(show(&h.hook)));
        }
        let planned = plan.and_then(|p| p.chains.iter().find(|c| chain_name(c.chain) == w.name));
        let expected = |i: usize| planned.and_then(|c| c.rules.get(i)).map_or_else(|| w.rules[i].nft(), |r| r.to_string());
        out.extend(chain_rule_differences(&place, (&w.rules, &h.rules), |i| i + 1, expected, |i| h.rules[i].nft()));
    }
    if out.is_empty() && want.iter().map(|c| &c.name).ne(have.iter().map(|c| &c.name)) {
        let names = |chains: &[ChainState]| chains.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
        out.push(
            Difference::new(Kind::TableDiffers, table)
                .expected(format!("chains {}", names(want)))
                .found(format!("chains {}", names(have))),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::DnsCapture;
    use crate::model::{build, Dialect};
    use crate::nftables::render::plan;
    use crate::settings::CaptureConfig;

    fn dns_plan() -> Vec<TablePlan> {
        let cfg = CaptureConfig {
            dns: DnsCapture::Servers { v4: vec![Ipv4Addr::new(10, 96, 0, 10)], v6: vec![] },
            ..CaptureConfig::default()
        };
        plan(&build(&cfg, Dialect::Nftables))
    }

    fn chain<'a>(snapshot: &'a Snapshot, table: Table, name: &str) -> &'a ChainState {
        snapshot[&table].chains.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn planned_state_reads_back_what_the_batch_holds() {
        let plan = dns_plan();
        let want = planned(&plan);
        assert_eq!(want.keys().copied().collect::<Vec<_>>(), vec![Table::Nat, Table::Raw]);
        let output = chain(&want, Table::Nat, "output");
        assert_eq!(output.hook.as_deref(), Some("type nat hook output priority -100 policy accept"));
        let texts: Vec<&str> = output.rules.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, vec!["[ counter ] [ immediate reg 0 jump -> istio-output ]"]);
        // The anonymous set is compared by contents: ports 53 and 15008, big-endian.
        let lookups: Vec<&str> = chain(&want, Table::Nat, "istio-output")
            .rules
            .iter()
            .map(|r| r.text.as_str())
            .filter(|r| r.contains("lookup"))
            .collect();
        assert_eq!(lookups.len(), 1);
        assert!(lookups[0].contains("[ lookup type 13 len 2 flags 0x3 {0035,3aa0} flags 0x1 ]"), "{}", lookups[0]);
        let zone = &chain(&want, Table::Raw, "istio-inbound").rules[0].text;
        assert!(zone.ends_with("[ counter ] [ immediate reg 1 0x00000001 ] [ ct set zone with reg 1 ]"), "{zone}");
    }

    #[test]
    fn differences_name_kind_place_and_both_rules_in_nft_syntax() {
        let plan = dns_plan();
        let want = planned(&plan);
        let mut have = want.clone();
        have.remove(&Table::Raw);
        let foreign = chain(&want, Table::Nat, "istio-in-redirect").rules[0].clone();
        let nat = have.get_mut(&Table::Nat).unwrap();
        nat.chains.retain(|c| c.name != "istio-redirect");
        let output = nat.chains.iter_mut().find(|c| c.name == "istio-output").unwrap();
        output.rules[0] = foreign.clone();
        output.rules.push(foreign);
        have.insert(Table::Mangle, TableState { flags: 0, chains: Vec::new() });
        let shown: Vec<String> = differences(&plan, &want, &have).iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "chain missing: table inet istio-proxy-nat, chain istio-redirect\n    expected: 1 rule",
                "rule differs: table inet istio-proxy-nat, chain istio-output, rule 1\n    \
                 expected: oifname \"lo\" ip saddr 127.0.0.6/32 counter return\n    \
                 found:    meta l4proto tcp counter redirect to :15006",
                "unexpected rule: table inet istio-proxy-nat, chain istio-output, rule 10\n    \
                 found:    meta l4proto tcp counter redirect to :15006",
                "unexpected table: table inet istio-proxy-mangle\n    found:    0 chains (left by another configuration?)",
                "table missing: table inet istio-proxy-raw\n    expected: 4 chains",
            ]
        );
    }
}
