//! Our tables in comparable form, from the kernel's dumps or from the batch we would send.
//!
//! Both sides go through the same parser and printer (libnftnl's), so "installed equals
//! planned" is a plain comparison: rule expressions as libnftnl prints them, with counter
//! values dropped and anonymous sets replaced by their contents.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use super::batch::{Transaction, TransactionBuilder};
use super::messages::{self, batch_messages};
use super::raw::{ChainHook, ExprObject, Object, SetRef};
use super::render::{add_rule_line, TablePlan};
use super::schema::{chain_name, table_name, table_named, TABLE_ORDER};
use crate::model::Table;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainState {
    pub name: String,
    /// `type .. hook .. priority .. policy ..` for base chains.
    pub hook: Option<String>,
    pub rules: Vec<String>,
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

/// Every set by table and reference: its key type, flags and sorted contents.
fn describe_sets(objects: &[Object]) -> HashMap<(&str, &SetRef), String> {
    let mut keys: HashMap<(&str, &SetRef), Vec<String>> = HashMap::new();
    for object in objects {
        if let Object::Elements(elements) = object {
            let entry = keys.entry((elements.table.as_str(), &elements.set)).or_default();
            entry.extend(elements.keys.iter().map(|k| hex(k)));
        }
    }
    objects
        .iter()
        .filter_map(|object| match object {
            Object::Set(set) => {
                let mut contents = keys.remove(&(set.table.as_str(), &set.set)).unwrap_or_default();
                contents.sort();
                let text = format!("type {} len {} flags {:#x} {{{}}}", set.key_type, set.key_len, set.flags, contents.join(","));
                Some(((set.table.as_str(), &set.set), text))
            }
            _ => None,
        })
        .collect()
}

/// Builds the snapshot of our tables from parsed objects; anything of other tables is ignored.
pub(super) fn snapshot(objects: &[Object]) -> Snapshot {
    let sets = describe_sets(objects);
    let describe_set = |table: &str, set: &SetRef| sets.get(&(table, set)).cloned().unwrap_or_else(|| "missing set".into());

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
                    let exprs: Vec<String> = r
                        .exprs
                        .iter()
                        .map(|e| match e {
                            ExprObject::Counter => "[ counter ]".to_string(),
                            ExprObject::Lookup { set, flags } => {
                                format!("[ lookup {} flags {flags:#x} ]", describe_set(&r.table, set))
                            }
                            ExprObject::Other(text) => format!("[ {text} ]"),
                        })
                        .collect();
                    chain.rules.push(exprs.join(" "));
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
                let _ = writeln!(out, "    {rule}");
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

/// Human-readable differences between what is installed and what is planned.
pub(super) fn differences(plan: &[TablePlan], want: &Snapshot, have: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for table in TABLE_ORDER {
        let name = table_name(table);
        match (want.get(&table), have.get(&table)) {
            (None, None) => {}
            (Some(_), None) => out.push(format!("table inet {name} is missing")),
            (None, Some(_)) => out.push(format!("table inet {name} is not part of this configuration (left by another one?)")),
            (Some(w), Some(h)) => {
                if w.flags != h.flags {
                    out.push(format!("table inet {name} has flags {:#x} (e.g. dormant), expected {:#x}", h.flags, w.flags));
                }
                let table_plan = plan.iter().find(|p| p.table == table);
                out.extend(chain_differences(table, table_plan, &w.chains, &h.chains));
            }
        }
    }
    out
}

fn chain_differences(table: Table, plan: Option<&TablePlan>, want: &[ChainState], have: &[ChainState]) -> Vec<String> {
    let name = table_name(table);
    let mut out = Vec::new();
    for h in have.iter().filter(|h| !want.iter().any(|w| w.name == h.name)) {
        out.push(format!("chain inet {name} {} is not part of this configuration", h.name));
    }
    for w in want {
        let chain = format!("chain inet {name} {}", w.name);
        let Some(h) = have.iter().find(|h| h.name == w.name) else {
            out.push(format!("{chain} is missing"));
            continue;
        };
        if w.hook != h.hook {
            let show = |hook: &Option<String>| hook.clone().unwrap_or_else(|| "a regular chain".to_string());
            out.push(format!("{chain} is {}, expected {}", show(&h.hook), show(&w.hook)));
        }
        if w.rules.len() != h.rules.len() {
            out.push(format!("{chain} holds {} rules, expected {}", h.rules.len(), w.rules.len()));
        }
        if let Some(i) = (0..w.rules.len().max(h.rules.len())).find(|&i| w.rules.get(i) != h.rules.get(i)) {
            let expected = plan
                .and_then(|p| p.chains.iter().find(|c| chain_name(c.chain) == w.name))
                .and_then(|c| c.rules.get(i).map(|r| format!("`{}`", add_rule_line(table, c.chain, r))));
            let found = h.rules.get(i).map_or("nothing".to_string(), |r| format!("`{r}`"));
            out.push(format!("{chain}: rule {} is {found}, expected {}", i + 1, expected.as_deref().unwrap_or("nothing")));
        }
    }
    if out.is_empty() && want.iter().map(|c| &c.name).ne(have.iter().map(|c| &c.name)) {
        out.push(format!("table inet {name} declares its chains in another order"));
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
        assert_eq!(output.rules, vec!["[ counter ] [ immediate reg 0 jump -> istio-output ]"]);
        // The anonymous set is compared by contents: ports 53 and 15008, big-endian.
        let lookups: Vec<&String> =
            chain(&want, Table::Nat, "istio-output").rules.iter().filter(|r| r.contains("lookup")).collect();
        assert_eq!(lookups.len(), 1);
        assert!(lookups[0].contains("[ lookup type 13 len 2 flags 0x3 {0035,3aa0} flags 0x1 ]"), "{}", lookups[0]);
        let zone = &chain(&want, Table::Raw, "istio-inbound").rules[0];
        assert!(zone.ends_with("[ counter ] [ immediate reg 1 0x00000001 ] [ ct set zone with reg 1 ]"), "{zone}");
    }

    #[test]
    fn differences_name_the_table_chain_and_rule() {
        let plan = dns_plan();
        let want = planned(&plan);
        let mut have = want.clone();
        have.remove(&Table::Raw);
        let nat = have.get_mut(&Table::Nat).unwrap();
        nat.chains.retain(|c| c.name != "istio-redirect");
        let output = nat.chains.iter_mut().find(|c| c.name == "istio-output").unwrap();
        output.rules[0] = "[ immediate reg 0 accept ]".into();
        output.rules.push("[ immediate reg 0 drop ]".into());
        have.insert(Table::Mangle, TableState { flags: 0, chains: Vec::new() });
        assert_eq!(
            differences(&plan, &want, &have),
            vec![
                "chain inet istio-proxy-nat istio-redirect is missing".to_string(),
                "chain inet istio-proxy-nat istio-output holds 10 rules, expected 9".to_string(),
                "chain inet istio-proxy-nat istio-output: rule 1 is `[ immediate reg 0 accept ]`, expected \
                 `add rule inet istio-proxy-nat istio-output oifname \"lo\" ip saddr 127.0.0.6/32 counter return`"
                    .to_string(),
                "table inet istio-proxy-mangle is not part of this configuration (left by another one?)".to_string(),
                "table inet istio-proxy-raw is missing".to_string(),
            ]
        );
    }
}
