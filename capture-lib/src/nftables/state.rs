//! Our tables in comparable form, from the kernel's dumps or from the batch we would send.
//!
//! Both sides go through the same parser and printer (libnftnl's), so "installed equals
//! planned" is a plain comparison: rule expressions as libnftnl prints them, with counter
//! values dropped and anonymous sets replaced by their contents. Named sets (the set form's)
//! are compared on their own: type, flags and elements. A difference shows its rules in nft
//! syntax, the one planned as we render it, the one found decompiled; a set's, how many
//! elements and the first few missing and unexpected, as nft prints them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use super::batch::{Transaction, TransactionBuilder};
use super::decompile::{decompile, set_element_words, LookedUp};
use super::messages::{self, batch_messages};
use super::raw::{ChainHook, ExprObject, Object, SetElement, SetObject, SetRef};
use super::render::TablePlan;
use super::schema::{chain_name, table_name, table_named, TABLE_ORDER};
use crate::drift::{chain_rule_differences, count, some_elements, Difference, Kind};
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
    /// Each set it looks up, in order (`None`: not found).
    sets: Vec<Option<LookedUp>>,
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

/// A named set (the set form's, or one someone added to our table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SetState {
    pub name: String,
    pub key_type: u32,
    pub key_len: u32,
    pub flags: u32,
    /// Sorted.
    pub elements: Vec<SetElement>,
}

impl SetState {
    /// Its type and flags in nft's words, e.g. `type ipv4_addr; flags interval;`.
    pub fn kind(&self) -> String {
        let key = match (self.key_type, self.key_len) {
            (7, 4) => "ipv4_addr".to_string(),
            (8, 16) => "ipv6_addr".to_string(),
            (13, 2) => "inet_service".to_string(),
            (kind, len) => format!("{kind} (key of {len} bytes)"),
        };
        let mut flags = Vec::new();
        let mut rest = self.flags;
        for (bit, name) in
            [(libc::NFT_SET_CONSTANT, "constant"), (libc::NFT_SET_INTERVAL, "interval"), (libc::NFT_SET_TIMEOUT, "timeout")]
        {
            if rest & bit as u32 != 0 {
                flags.push(name.to_string());
                rest &= !(bit as u32);
            }
        }
        if rest != 0 {
            flags.push(format!("{rest:#x}"));
        }
        if flags.is_empty() {
            format!("type {key};")
        } else {
            format!("type {key}; flags {};", flags.join(","))
        }
    }

    pub fn is_interval(&self) -> bool {
        self.flags & libc::NFT_SET_INTERVAL as u32 != 0
    }

    /// Its elements in nft syntax, as `nft list` prints them.
    pub fn words(&self) -> Vec<String> {
        set_element_words(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableState {
    pub flags: u32,
    /// Named sets, by name.
    pub sets: Vec<SetState>,
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

/// A set as found, with its elements.
struct FoundSet<'o> {
    set: &'o SetObject,
    elements: Vec<SetElement>,
}

impl FoundSet<'_> {
    fn is_anonymous(&self) -> bool {
        self.set.flags & libc::NFT_SET_ANONYMOUS as u32 != 0
    }

    /// An anonymous set as compared: key type, flags and sorted contents.
    fn contents(&self) -> String {
        let mut contents: Vec<String> = self.elements.iter().map(|e| hex(&e.key)).collect();
        contents.sort();
        format!("type {} len {} flags {:#x} {{{}}}", self.set.key_type, self.set.key_len, self.set.flags, contents.join(","))
    }
}

/// Every set by table and reference.
fn found_sets(objects: &[Object]) -> HashMap<(&str, &SetRef), FoundSet<'_>> {
    let mut elements: HashMap<(&str, &SetRef), Vec<SetElement>> = HashMap::new();
    for object in objects {
        if let Object::Elements(list) = object {
            elements.entry((list.table.as_str(), &list.set)).or_default().extend(list.elements.iter().cloned());
        }
    }
    objects
        .iter()
        .filter_map(|object| match object {
            Object::Set(set) => {
                let key = (set.table.as_str(), &set.set);
                Some((key, FoundSet { set, elements: elements.remove(&key).unwrap_or_default() }))
            }
            _ => None,
        })
        .collect()
}

/// The rule `exprs` make in `table`, in comparable form: an anonymous set by its contents, a
/// named one by its name (it is compared on its own).
fn rule_state(table: &str, exprs: &[ExprObject], sets: &HashMap<(&str, &SetRef), FoundSet>) -> RuleState {
    let mut texts = Vec::with_capacity(exprs.len());
    let mut looked_up = Vec::new();
    for expr in exprs {
        texts.push(match expr {
            ExprObject::Counter => "[ counter ]".to_string(),
            ExprObject::Lookup { set, flags, .. } => {
                let (text, set) = match sets.get(&(table, set)) {
                    Some(found) if found.is_anonymous() => {
                        let keys = found.elements.iter().map(|e| e.key.clone()).collect();
                        (found.contents(), Some(LookedUp::Elements(keys)))
                    }
                    Some(found) => (format!("@{}", found.set.name), Some(LookedUp::Named(found.set.name.clone()))),
                    None => ("missing set".to_string(), None),
                };
                looked_up.push(set);
                format!("[ lookup {text} flags {flags:#x} ]")
            }
            ExprObject::Other { text, .. } => format!("[ {text} ]"),
        });
    }
    RuleState { text: texts.join(" "), exprs: exprs.to_vec(), sets: looked_up }
}

/// Builds the snapshot of our tables from parsed objects; anything of other tables is ignored.
pub(super) fn snapshot(objects: &[Object]) -> Snapshot {
    let sets = found_sets(objects);
    let mut tables = Snapshot::new();
    for object in objects {
        match object {
            Object::Table(t) => {
                if let Some(table) = table_named(&t.name) {
                    tables.insert(table, TableState { flags: t.flags, sets: Vec::new(), chains: Vec::new() });
                }
            }
            Object::Set(set) => {
                let Some(state) = table_named(&set.table).and_then(|t| tables.get_mut(&t)) else { continue };
                let found = &sets[&(set.table.as_str(), &set.set)];
                if !found.is_anonymous() {
                    let mut elements = found.elements.clone();
                    elements.sort_unstable();
                    let (key_type, key_len, flags) = (set.key_type, set.key_len, set.flags);
                    state.sets.push(SetState { name: set.name.clone(), key_type, key_len, flags, elements });
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
            Object::Elements(_) => {}
        }
    }
    // Sets are compared by name, whatever order they were created in.
    tables.values_mut().for_each(|t| t.sets.sort_by(|a, b| a.name.cmp(&b.name)));
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
        for set in &state.sets {
            let _ = writeln!(out, "  set {} {{ {} {} }}", set.name, set.kind(), count(set.elements.len(), "kernel element"));
        }
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
            (Some(w), None) => out.push(Difference::new(Kind::TableMissing, place).expected(describe_table(w))),
            (None, Some(h)) => out.push(
                Difference::new(Kind::UnexpectedTable, place)
                    .found(format!("{} (left by another configuration?)", describe_table(h))),
            ),
            (Some(w), Some(h)) => {
                if w.flags != h.flags {
                    let flags = |f: u32| format!("flags {f:#x}{}", if f & 1 != 0 { " (dormant)" } else { "" });
                    out.push(Difference::new(Kind::TableDiffers, &place).expected(flags(w.flags)).found(flags(h.flags)));
                }
                out.extend(set_differences(&place, &w.sets, &h.sets));
                let table_plan = plan.iter().find(|p| p.table == table);
                out.extend(chain_differences(&place, table_plan, &w.chains, &h.chains));
            }
        }
    }
    out
}

/// A table in words: how many chains (and sets) it holds.
fn describe_table(table: &TableState) -> String {
    let chains = count(table.chains.len(), "chain");
    if table.sets.is_empty() {
        chains
    } else {
        format!("{chains}, {}", count(table.sets.len(), "set"))
    }
}

/// A set in words: its type and flags, and how many elements it holds.
fn describe_set(set: &SetState) -> String {
    format!("{} {}", set.kind(), count(set.words().len(), "element"))
}

/// How our named sets differ: a set found but not planned (whatever its name) is unexpected,
/// as a chain is; one with other elements shows how many, and the first few missing and
/// unexpected ones, in nft syntax.
fn set_differences(table: &str, want: &[SetState], have: &[SetState]) -> Vec<Difference> {
    let mut out = Vec::new();
    let place = |name: &str| format!("{table}, set {name}");
    for h in have.iter().filter(|h| !want.iter().any(|w| w.name == h.name)) {
        out.push(Difference::new(Kind::UnexpectedSet, place(&h.name)).found(describe_set(h)));
    }
    for w in want {
        let Some(h) = have.iter().find(|h| h.name == w.name) else {
            out.push(Difference::new(Kind::SetMissing, place(&w.name)).expected(describe_set(w)));
            continue;
        };
        if (w.key_type, w.key_len, w.flags) != (h.key_type, h.key_len, h.flags) {
            out.push(Difference::new(Kind::SetDiffers, place(&w.name)).expected(describe_set(w)).found(describe_set(h)));
        } else if w.elements != h.elements {
            let (wanted, found) = (w.words(), h.words());
            let (wanted_set, found_set): (HashSet<&String>, HashSet<&String>) = (wanted.iter().collect(), found.iter().collect());
            let missing: Vec<&String> = wanted.iter().filter(|e| !found_set.contains(e)).collect();
            let unexpected: Vec<&String> = found.iter().filter(|e| !wanted_set.contains(e)).collect();
            let mut summary = vec![count(found.len(), "element")];
            summary.extend(some_elements("missing", &missing));
            summary.extend(some_elements("unexpected", &unexpected));
            if missing.is_empty() && unexpected.is_empty() {
                summary.push("the same ones, sent in other kernel elements".to_string());
            }
            let difference = Difference::new(Kind::SetDiffers, place(&w.name)).expected(count(wanted.len(), "element"));
            out.push(difference.found(summary.join("; ")));
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
        have.insert(Table::Mangle, TableState { flags: 0, sets: Vec::new(), chains: Vec::new() });
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

    fn excluding(cidrs: &str) -> Vec<TablePlan> {
        let cfg = CaptureConfig {
            use_sets: true,
            outbound_ranges_exclude: crate::config::parse_cidrs("-x", cidrs).unwrap(),
            outbound_ports_exclude: vec![5432],
            ..CaptureConfig::default()
        };
        plan(&build(&cfg, Dialect::Nftables))
    }

    #[test]
    fn set_differences_name_the_set_and_show_a_few_of_its_elements() {
        let ten: Vec<String> = (0..10).map(|i| format!("10.0.{i}.0/25")).collect();
        let plan = excluding(&ten.join(","));
        let want = planned(&plan);
        let v4 =
            "set differs: table inet istio-proxy-nat, set istio-out-cidrs-exclude-v4\n    expected: 10 elements\n    found:    ";

        // Seven gone, one widened (so gone as it was), one added.
        let have = planned(&excluding(&format!("{},10.0.9.128/32,192.168.0.0/16", ten[7..].join(","))));
        let shown: Vec<String> = differences(&plan, &want, &have).iter().map(ToString::to_string).collect();
        let found = "4 elements; 8 missing: 10.0.0.0/25, 10.0.1.0/25, 10.0.2.0/25, 10.0.3.0/25, 10.0.4.0/25 and 3 more; \
                     2 unexpected: 10.0.9.0-10.0.9.128, 192.168.0.0/16";
        assert_eq!(shown, [format!("{v4}{found}")]);

        // A set missing, one not ours, one of another type.
        let mut have = want.clone();
        let sets = &mut have.get_mut(&Table::Nat).unwrap().sets;
        let ports = sets.iter().position(|s| s.name == "istio-out-ports-exclude").unwrap();
        let mut foreign = sets.remove(ports);
        foreign.name = "mine".to_string();
        sets.push(foreign);
        sets[0].flags = 0;
        let shown: Vec<String> = differences(&plan, &want, &have).iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "unexpected set: table inet istio-proxy-nat, set mine\n    found:    type inet_service; 1 element",
                "set differs: table inet istio-proxy-nat, set istio-out-cidrs-exclude-v4\n    \
                 expected: type ipv4_addr; flags interval; 10 elements\n    found:    type ipv4_addr; 21 elements",
                "set missing: table inet istio-proxy-nat, set istio-out-ports-exclude\n    expected: type inet_service; 1 element",
            ]
        );
    }

    #[test]
    fn thousands_of_elements_go_in_several_messages_and_read_back_whole() {
        let cidrs: Vec<String> = (0..5000).map(|i| format!("10.{}.{}.0/25", i / 256, i % 256)).collect();
        let plan = excluding(&cidrs.join(","));
        let mut builder = TransactionBuilder::new();
        builder.create(&plan[0]);
        let tx = builder.finish();
        let element_messages = tx.messages.iter().filter(|m| matches!(m, super::super::batch::Message::AddElements(..))).count();
        assert!(element_messages > 1, "{element_messages} element message(s)");
        let read = planned(&plan);
        let set = read[&Table::Nat].sets.iter().find(|s| s.name == "istio-out-cidrs-exclude-v4").unwrap();
        assert_eq!(set.elements.len(), 10_001, "a start and an end per range, and the leading end");
        assert_eq!(set.words().len(), 5000);
    }
}
