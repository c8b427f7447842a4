//! `capture_lib::nftables` against the real kernel, inside pod namespaces: exactness against
//! its own script, idempotence, atomicity, drift, and other people's tables.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use capture_lib::capture::{self, Backend, CaptureError, Operation, RuleBackend};
use capture_lib::config::{parse_cidrs, DnsCapture, InboundPorts, InterceptionMode, Interface, OutboundRanges};
use capture_lib::model::{self, Action, Chain, Dialect, Position, Rule, Ruleset, Table};
use capture_lib::nftables::{self, NftError, Nftables};
use capture_lib::settings::CaptureConfig;
use capture_lib::Outcome;
use capture_tests::{istio_iptables, require_netns, run_ok, stderr, unique, Pod};

/// Plans `operation` and applies the plan, as a run does. The backend acts on the calling
/// thread's namespace, so it runs on a thread in the pod's.
fn run(pod: &Pod, ruleset: &Ruleset, operation: Operation) -> Result<Outcome, NftError> {
    pod.enter(|| Nftables.plan(ruleset, operation).and_then(|plan| plan.apply())).map_err(|e| match e {
        CaptureError::Nftables(e) => e,
        other => panic!("not an nftables error: {other}"),
    })
}

fn apply(pod: &Pod, ruleset: &Ruleset, reconcile: bool) -> Result<Outcome, NftError> {
    run(pod, ruleset, Operation::Apply { reconcile, force: false })
}

fn cleanup(pod: &Pod) -> Result<Outcome, NftError> {
    run(pod, &Ruleset { rules: Vec::new(), sets: Vec::new(), ipv6: false }, Operation::Cleanup)
}

fn ruleset(cfg: &CaptureConfig) -> Ruleset {
    model::build(cfg, Dialect::Nftables)
}

/// The largest ruleset: TPROXY on every port, dual stack, DNS to v4 and v6 servers, an
/// excluded NIC and address ranges (every table, both port-set styles, tproxy ip and ip6).
fn largest() -> Ruleset {
    ruleset(&CaptureConfig {
        mode: InterceptionMode::Tproxy,
        inbound_ports: InboundPorts::All { except: vec![15090, 15021] },
        outbound_ranges: OutboundRanges::All,
        outbound_ranges_exclude: parse_cidrs("-x", "10.96.0.0/12,fd00:96::/108").unwrap(),
        exclude_interfaces: vec![Interface::parse("-c", "eth9").unwrap()],
        dns: DnsCapture::Servers {
            v4: vec![Ipv4Addr::new(10, 96, 0, 10)],
            v6: vec![Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 10)],
        },
        drop_invalid: true,
        ipv6: true,
        ..CaptureConfig::default()
    })
}

fn base() -> Ruleset {
    ruleset(&CaptureConfig::default())
}

/// Loads an nft script into the pod with `nft -f`.
fn nft_load(pod: &Pod, script: &str) {
    let path = std::env::temp_dir().join(format!("{}.nft", unique("nftscript")));
    std::fs::write(&path, script).unwrap();
    run_ok(pod.cmd("nft").arg("-f").arg(&path));
    std::fs::remove_file(&path).unwrap();
}

/// Every rule as the kernel holds it, expression by expression (`nft --debug=netlink`), with
/// counter values dropped.
fn bytecode(pod: &Pod) -> String {
    let mut out = String::new();
    for line in pod.sh("nft --debug=netlink list ruleset").lines() {
        let mut words = line.split(' ');
        let mut kept = Vec::new();
        while let Some(word) = words.next() {
            if matches!(word, "pkts" | "packets" | "bytes") {
                words.next(); // the count
            } else {
                kept.push(word);
            }
        }
        out += &kept.join(" ");
        out.push('\n');
    }
    out
}

/// The ruleset with rule handles: unchanged handles mean nothing was re-created.
fn with_handles(pod: &Pod) -> String {
    pod.sh("nft -a list ruleset")
}

/// Applies `rules` to a new pod and checks the result against `nft -f` of their script (the
/// dry run's) in another: the same listing, the same bytecode. Returns the pod and its listing.
fn applied_as_its_script_loads(rules: &Ruleset) -> (Pod, String) {
    let pod = Pod::new();
    assert_eq!(apply(&pod, rules, false).unwrap(), Outcome::Applied);
    let reference = Pod::new();
    nft_load(&reference, &nftables::script(rules));
    let installed = pod.nft_ruleset();
    assert_eq!(installed, reference.nft_ruleset(), "the batch and `nft -f` of its script differ");
    assert_eq!(bytecode(&pod), bytecode(&reference), "same text, different bytecode");
    (pod, installed)
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn apply_matches_its_own_script_and_a_second_apply_sends_nothing() {
    require_netns!();
    let rules = largest();
    let (pod, installed) = applied_as_its_script_loads(&rules);
    for expected in ["tproxy ip6 to :15006", "tcp dport != { 53, 15008 }", "ct zone set 2", "type route hook output"] {
        assert!(installed.contains(expected), "{expected:?} missing from:\n{installed}");
    }

    let before = with_handles(&pod);
    assert_eq!(apply(&pod, &rules, false).unwrap(), Outcome::Unchanged);
    assert_eq!(apply(&pod, &rules, true).unwrap(), Outcome::Unchanged);
    assert_eq!(with_handles(&pod), before, "an unchanged apply re-created rules");

    assert_eq!(cleanup(&pod).unwrap(), Outcome::Removed);
    assert_eq!(pod.nft_ruleset(), "");
    assert_eq!(cleanup(&pod).unwrap(), Outcome::NothingToRemove);
}

/// `nat output jump istio-redirect` while istio-redirect has no rules, so it is never created:
/// the kernel refuses that rule after the table and chains were already in the batch.
fn jumps_to_a_missing_chain() -> Ruleset {
    let rule = Rule {
        table: Table::Nat,
        chain: Chain::Output,
        family: None,
        position: Position::Append,
        matches: vec![],
        action: Action::Jump(Chain::Redirect),
    };
    Ruleset { rules: vec![rule], sets: Vec::new(), ipv6: false }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_refused_batch_changes_nothing() {
    require_netns!();
    let pod = Pod::new();
    let err = apply(&pod, &jumps_to_a_missing_chain(), false).unwrap_err();
    let NftError::Refused { what, error, .. } = &err else { panic!("expected a refusal, got {err}") };
    assert_eq!(what, "add rule inet istio-proxy-nat output counter jump istio-redirect");
    assert_eq!(error.raw_os_error(), Some(nix::errno::Errno::ENOENT as i32));
    assert!(err.to_string().contains("names a chain that does not exist"), "{err}");
    assert_eq!(pod.nft_ruleset(), "", "the table and chain before the refused rule were kept");

    // Replacing a working ruleset with a broken one keeps the working one whole.
    assert_eq!(apply(&pod, &base(), false).unwrap(), Outcome::Applied);
    let before = with_handles(&pod);
    assert!(matches!(apply(&pod, &jumps_to_a_missing_chain(), true), Err(NftError::Refused { .. })));
    assert_eq!(with_handles(&pod), before);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn other_tables_survive_apply_reconcile_and_cleanup() {
    require_netns!();
    let pod = Pod::new();
    pod.sh("nft add table inet filter && \
         nft add chain inet filter input '{ type filter hook input priority 0; }' && \
         nft add rule inet filter input tcp dport 22 counter accept && \
         iptables-nft -t nat -A OUTPUT -p tcp --dport 9999 -j RETURN");
    let foreign = || (pod.sh("nft list table inet filter"), pod.sh("iptables-nft-save -t nat | grep -e '^-A'"));
    let before = foreign();
    assert!(before.1.contains("--dport 9999"), "{}", before.1);

    assert_eq!(apply(&pod, &base(), false).unwrap(), Outcome::Applied);
    assert_eq!(foreign(), before);
    assert_eq!(apply(&pod, &largest(), true).unwrap(), Outcome::Reconciled);
    assert_eq!(foreign(), before);
    assert_eq!(cleanup(&pod).unwrap(), Outcome::Removed);
    assert_eq!(foreign(), before);
    assert!(!pod.sh("nft list tables").contains("istio-proxy"), "our tables outlived cleanup");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn drift_is_refused_without_reconcile_and_repaired_with_it() {
    require_netns!();
    let fresh = Pod::new();
    apply(&fresh, &base(), false).unwrap();

    let pod = Pod::new();
    apply(&pod, &base(), false).unwrap();
    pod.sh("nft add rule inet istio-proxy-nat istio-output tcp dport 123 accept");
    let edited = with_handles(&pod);
    let err = apply(&pod, &base(), false).unwrap_err();
    let NftError::Drift { details } = &err else { panic!("expected drift, got {err}") };
    let unexpected = "unexpected rule: table inet istio-proxy-nat, chain istio-output, rule 9\n    \
                      found:    meta l4proto tcp tcp dport 123 accept";
    assert_eq!(details, &[unexpected.to_string()]);
    assert!(!err.to_string().contains("--"), "the library names no front end's flag: {err}");
    assert!(CaptureError::from(err).needs_reconcile());
    assert_eq!(with_handles(&pod), edited, "a refused apply changed the ruleset");

    assert_eq!(apply(&pod, &base(), true).unwrap(), Outcome::Reconciled);
    assert_eq!(pod.nft_ruleset(), fresh.nft_ruleset());
    assert_eq!(apply(&pod, &base(), false).unwrap(), Outcome::Unchanged);
}

/// The handle of the first rule of `chain` (in `istio-proxy-nat`) that contains `text`.
fn rule_handle(pod: &Pod, chain: &str, text: &str) -> String {
    let listing = pod.sh(&format!("nft -a list chain inet istio-proxy-nat {chain}"));
    let line = listing.lines().find(|l| l.contains(text)).unwrap_or_else(|| panic!("no {text:?} in:\n{listing}"));
    line.rsplit_once("# handle ").expect("a handle").1.trim().to_string()
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn drift_and_check_show_the_expected_and_the_found_rule_in_nft_syntax() {
    require_netns!();
    let pod = Pod::new();
    apply(&pod, &base(), false).unwrap();
    let handle = rule_handle(&pod, "istio-output", "ip saddr 127.0.0.6");
    pod.sh(&format!(
        "nft replace rule inet istio-proxy-nat istio-output handle {handle} oifname lo ip saddr 127.0.0.7 counter return && \
         nft delete rule inet istio-proxy-nat istio-redirect handle {} && \
         nft add rule inet istio-proxy-nat istio-redirect 'udp dport {{ 1, 2 }} ip daddr != 10.0.0.0/8 meta mark set 7 dnat ip to 10.1.2.3:8080'",
        rule_handle(&pod, "istio-redirect", "redirect to :15001")
    ));
    let expected = [
        "rule differs: table inet istio-proxy-nat, chain istio-redirect, rule 1\n    \
         expected: meta l4proto tcp counter redirect to :15001\n    \
         found:    meta l4proto udp udp dport { 1, 2 } ip daddr != 10.0.0.0/8 meta mark set 7 dnat ip to 10.1.2.3:8080",
        "rule differs: table inet istio-proxy-nat, chain istio-output, rule 1\n    \
         expected: oifname \"lo\" ip saddr 127.0.0.6/32 counter return\n    \
         found:    oifname \"lo\" ip saddr 127.0.0.7/32 counter return",
    ];
    let err = apply(&pod, &base(), false).unwrap_err();
    let NftError::Drift { details } = &err else { panic!("expected drift, got {err}") };
    assert_eq!(details, &expected);
    assert!(err.to_string().ends_with(&format!("\n  {}", expected.join("\n  "))), "{err}");

    // CHECK (the CNI plugin's) says the same.
    let cfg = CaptureConfig::default();
    let check = pod.enter(|| capture::verify(&cfg, Backend::Nftables, Duration::from_secs(5))).unwrap_err();
    let check = check.to_string();
    assert!(check.contains(&format!("\n  {}", expected.join("\n  "))), "{check}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn force_sends_exact_tables_again_and_still_refuses_drift() {
    require_netns!();
    let pod = Pod::new();
    let forced = Operation::Apply { reconcile: false, force: true };
    assert_eq!(run(&pod, &largest(), forced).unwrap(), Outcome::Applied, "nothing to force in an empty namespace");
    let (ruleset, handles) = (pod.nft_ruleset(), with_handles(&pod));
    assert_eq!(run(&pod, &largest(), forced).unwrap(), Outcome::Reconciled);
    assert_eq!(pod.nft_ruleset(), ruleset);
    assert_ne!(with_handles(&pod), handles, "the tables were not sent again");

    pod.sh("nft add rule inet istio-proxy-nat istio-output tcp dport 123 accept");
    let edited = with_handles(&pod);
    let err = run(&pod, &largest(), forced).unwrap_err();
    assert!(matches!(err, NftError::Drift { .. }), "force alone does not replace drifted tables: {err}");
    assert_eq!(with_handles(&pod), edited);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_table_left_by_another_configuration_is_drift_and_reconcile_deletes_it() {
    require_netns!();
    let pod = Pod::new();
    apply(&pod, &largest(), false).unwrap();
    let err = apply(&pod, &base(), false).unwrap_err();
    assert!(err.to_string().contains("unexpected table: table inet istio-proxy-mangle\n"), "{err}");
    assert_eq!(apply(&pod, &base(), true).unwrap(), Outcome::Reconciled);
    let tables = pod.sh("nft list tables");
    assert_eq!(tables, "table inet istio-proxy-nat\n");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_batch_of_several_pages_commits_whole_and_reads_back() {
    require_netns!();
    // 3000 include ranges: a batch of several nftnl pages, and dumps of several reads.
    let ranges: Vec<String> = (0..3000).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
    let rules = ruleset(&CaptureConfig {
        outbound_ranges: OutboundRanges::Only(parse_cidrs("-i", &ranges.join(",")).unwrap()),
        ..CaptureConfig::default()
    });
    let pod = Pod::new();
    assert_eq!(apply(&pod, &rules, false).unwrap(), Outcome::Applied);
    assert_eq!(pod.nft_ruleset().matches("jump istio-redirect").count(), 3000);
    assert_eq!(apply(&pod, &rules, false).unwrap(), Outcome::Unchanged);
}

/// The set form of every list, in both layouts: REDIRECT with inbound ports excluded (sets in
/// nat, a KubeVirt interface's PREROUTING rule too), and TPROXY with only some inbound ports
/// captured (that set in mangle). The ranges hold a single address, a range that is no prefix
/// (two merged prefixes), one reaching the end of the address space, and in each family a first
/// range above the zero address (nft's leading element).
fn set_forms() -> [Ruleset; 2] {
    let redirect = CaptureConfig {
        use_sets: true,
        ipv6: true,
        inbound_ports: InboundPorts::All { except: vec![15090, 15021, 15020] },
        outbound_ranges: OutboundRanges::Only(parse_cidrs("-i", "10.0.0.0/8,172.16.0.0/12,fd00::/8").unwrap()),
        outbound_ranges_exclude: parse_cidrs(
            "-x",
            "10.96.0.0/12,192.168.1.1/32,1.2.3.4/30,1.2.3.8/31,240.0.0.0/4,fd00:96::/108,::1/128,ffff::/16",
        )
        .unwrap(),
        outbound_ports_include: vec![3306, 6379],
        outbound_ports_exclude: vec![5432, 53],
        kube_virt_interfaces: vec![Interface::parse("-k", "veth-a.1").unwrap()],
        ..CaptureConfig::default()
    };
    let tproxy = CaptureConfig {
        mode: InterceptionMode::Tproxy,
        inbound_ports: InboundPorts::Only(vec![8080, 9090]),
        outbound_ranges: OutboundRanges::All,
        ..redirect.clone()
    };
    [ruleset(&redirect), ruleset(&tproxy)]
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_set_form_is_what_nft_makes_of_its_script_and_a_second_apply_sends_nothing() {
    require_netns!();
    for rules in set_forms() {
        let (pod, installed) = applied_as_its_script_loads(&rules);
        let v4 = "\tset istio-out-cidrs-exclude-v4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 1.2.3.4-1.2.3.9, 10.96.0.0/12,\n\t\t\t     192.168.1.1, 240.0.0.0/4 }\n";
        assert!(installed.contains(v4), "{installed}");
        let expected = [
            "\t\telements = { ::1,\n\t\t\t     fd00:96::/108,\n\t\t\t     ffff::/16 }\n",
            "\tset istio-out-ports-exclude {\n\t\ttype inet_service\n\t\telements = { 53, 5432 }\n",
            "ip daddr @istio-out-cidrs-exclude-v4 counter return\n",
            "ip6 daddr @istio-out-cidrs-exclude-v6 counter return\n",
            "udp dport @istio-out-ports-exclude counter return\n",
            "tcp dport @istio-out-ports-include counter jump istio-redirect\n",
        ];
        for expected in expected {
            assert!(installed.contains(expected), "{expected:?} missing from:\n{installed}");
        }

        let before = with_handles(&pod);
        assert_eq!(apply(&pod, &rules, false).unwrap(), Outcome::Unchanged);
        assert_eq!(with_handles(&pod), before, "an unchanged apply re-created rules or sets");
        assert_eq!(cleanup(&pod).unwrap(), Outcome::Removed);
        assert_eq!(pod.nft_ruleset(), "", "a set outlived cleanup");
    }
    let [redirect, tproxy] = &set_forms();
    let kube_virt = "add rule inet istio-proxy-nat prerouting iifname \"veth-a.1\" ip6 daddr @istio-out-cidrs-include-v6 counter jump istio-redirect\n";
    assert!(nftables::script(redirect).contains(kube_virt));
    let script = nftables::script(tproxy);
    assert!(script.contains("add set inet istio-proxy-mangle istio-in-ports-include { type inet_service; }\n"), "{script}");
    assert!(script.contains("add element inet istio-proxy-mangle istio-in-ports-include { 8080, 9090 }\n"), "{script}");
    assert!(
        script.contains(
            "meta l4proto tcp ct state related,established tcp dport @istio-in-ports-include counter jump istio-divert\n"
        ),
        "{script}"
    );
}

/// istio-iptables with the set form over the native backend.
const SET_FORM: &[&str] = &[
    "--native-nftables",
    "--use-ip-sets",
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "10.96.0.0/12,192.168.1.1/32",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn changed_set_elements_and_a_foreign_set_are_drift_refused_until_reconciled() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let run = |extra: &[&str]| istio_iptables(&pod, &[SET_FORM, extra].concat(), &[]);
    assert!(run(&[]).status.success());
    let fresh = pod.nft_ruleset();
    let set = "table inet istio-proxy-nat, set istio-out-cidrs-exclude-v4";
    let tampering = [
        (
            "nft add element inet istio-proxy-nat istio-out-cidrs-exclude-v4 { 1.2.3.4 }",
            "found:    3 elements; 1 unexpected: 1.2.3.4",
        ),
        (
            "nft delete element inet istio-proxy-nat istio-out-cidrs-exclude-v4 { 10.96.0.0/12 }",
            "found:    1 element; 1 missing: 10.96.0.0/12",
        ),
    ];
    for (tamper, found) in tampering {
        pod.sh(tamper);
        let tampered = with_handles(&pod);
        let out = run(&[]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let expected = format!("set differs: {set}\n    expected: 2 elements\n    {found}\n");
        assert!(stderr(&out).contains(&expected) && stderr(&out).contains("--reconcile"), "{}", stderr(&out));
        assert_eq!(with_handles(&pod), tampered, "a refused run changed the ruleset");
        assert!(run(&["--reconcile"]).status.success());
        assert_eq!(pod.nft_ruleset(), fresh);
    }

    // A set of a name not ours in our table is drift too, as a chain is.
    pod.sh("nft add set inet istio-proxy-nat mine '{ type ipv4_addr; flags interval; }' && \
            nft add element inet istio-proxy-nat mine '{ 10.0.0.0/8 }'");
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let unexpected =
        "unexpected set: table inet istio-proxy-nat, set mine\n    found:    type ipv4_addr; flags interval; 1 element\n";
    assert!(stderr(&out).contains(unexpected), "{}", stderr(&out));
    assert!(run(&["--reconcile"]).status.success());
    assert_eq!(pod.nft_ruleset(), fresh);
    assert!(stderr(&run(&[])).contains("already in place"));

    assert!(run(&["--cleanup-only"]).status.success());
    assert_eq!(pod.nft_ruleset(), "", "cleanup left a table or set");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn five_thousand_cidrs_of_each_family_go_in_sets_and_read_back() {
    require_netns!();
    // Disjoint, non-adjacent prefixes: 10,000 ranges, 20,000 kernel elements over several
    // element messages and dump parts.
    let v4 = (0..5000).map(|i| format!("10.{}.{}.0/25", i / 256, i % 256));
    let v6 = (0..5000).map(|i| format!("fd00:{i:x}::/64"));
    let cidrs: Vec<String> = v4.chain(v6).collect();
    let rules = ruleset(&CaptureConfig {
        use_sets: true,
        ipv6: true,
        outbound_ranges: OutboundRanges::All,
        outbound_ranges_exclude: parse_cidrs("-x", &cidrs.join(",")).unwrap(),
        ..CaptureConfig::default()
    });
    let (pod, installed) = applied_as_its_script_loads(&rules);
    assert_eq!(apply(&pod, &rules, false).unwrap(), Outcome::Unchanged);

    // A big set's drift shows counts and the first few elements.
    pod.sh("nft delete element inet istio-proxy-nat istio-out-cidrs-exclude-v6 \
            '{ fd00::/64, fd00:1::/64, fd00:2::/64, fd00:3::/64, fd00:4::/64, fd00:5::/64, fd00:6::/64 }'");
    let err = apply(&pod, &rules, false).unwrap_err();
    let NftError::Drift { details } = &err else { panic!("expected drift, got {err}") };
    let expected = "set differs: table inet istio-proxy-nat, set istio-out-cidrs-exclude-v6\n    \
                    expected: 5000 elements\n    \
                    found:    4993 elements; 7 missing: fd00::/64, fd00:1::/64, fd00:2::/64, fd00:3::/64, fd00:4::/64 and 2 more";
    assert_eq!(details, &[expected.to_string()]);
    assert_eq!(apply(&pod, &rules, true).unwrap(), Outcome::Reconciled);
    assert_eq!(pod.nft_ruleset(), installed);
}
