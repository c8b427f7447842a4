//! The set form (`--use-ip-sets`) with the iptables backend, in real pod namespaces: kernel
//! ip sets, checked independently with the `ipset` program.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Output;

use capture_tests::{istio_iptables as tool, release_bin, require_netns, stderr, Pod, RefusingIp6tablesRestore};

/// Istio's standard capture without its (empty) excluded ranges, which each test gives.
#[rustfmt::skip]
const BASE: &[&str] = &["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "-d", "15090,15021,15020"];
const EXCLUDED: &str = "10.0.0.0/8,192.168.0.0/16,10.1.0.0/16,fd00:1::/32";
const VARIANTS: [&str; 2] = ["nft", "legacy"];

/// The set form of Istio's capture, with excluded ranges of both families and ports.
fn set_form() -> Vec<&'static str> {
    [BASE, &["-x", EXCLUDED, "-o", "9000,9001", "--use-ip-sets"]].concat()
}

/// The sets [`set_form`] makes: name → (type and family, members).
fn expected_sets() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let sets: [(&str, &str, &[&str]); 4] = [
        ("istio-in-ports-exclude", "bitmap:port", &["15020", "15021", "15090"]),
        ("istio-out-ports-exclude", "bitmap:port", &["9000", "9001"]),
        ("istio-out-cidrs-exclude-v4", "hash:net family inet", &["10.0.0.0/8", "192.168.0.0/16"]),
        ("istio-out-cidrs-exclude-v6", "hash:net family inet6", &["fd00:1::/32"]),
    ];
    sets.iter().map(|(name, kind, members)| (name.to_string(), (kind.to_string(), strings(members)))).collect()
}

fn strings(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(ToString::to_string).collect()
}

/// A pod whose address is IPv6, so that both families are programmed.
fn dual_stack_pod() -> Pod {
    Pod::with_address("fd00:44::5/64")
}

fn run(pod: &Pod, args: &[&str], variant: &str) -> Output {
    tool(pod, args, &[("FORCE_IPTABLES_BINARY", variant)])
}

/// Every ip set in the pod, as `ipset save` lists it: name → (type and family, members).
/// A host prefix is written as `ipset` takes it, with its length.
fn ip_sets(pod: &Pod) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut sets: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in pod.sh("ipset save").lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, kind, rest @ ..] => {
                let family = rest.windows(2).find(|w| w[0] == "family").map(|w| format!(" family {}", w[1]));
                sets.insert(name.to_string(), (format!("{kind}{}", family.unwrap_or_default()), BTreeSet::new()));
            }
            ["add", name, member] => {
                let member = match member.parse::<IpAddr>() {
                    Ok(host) => format!("{host}/{}", if host.is_ipv4() { 32 } else { 128 }),
                    Err(_) => member.to_string(),
                };
                sets.get_mut(*name).expect("a set is created before its members").1.insert(member);
            }
            other => panic!("unexpected `ipset save` line: {other:?}"),
        }
    }
    sets
}

/// The rule lines one variant holds for one family.
fn rules(pod: &Pod, variant: &str, v6: bool) -> Vec<String> {
    let save = format!("{}-{variant}-save", if v6 { "ip6tables" } else { "iptables" });
    pod.sh(&save).lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect()
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_set_form_programs_the_sets_its_rules_match_and_a_rerun_sends_nothing() {
    require_netns!();
    for variant in VARIANTS {
        let pod = dual_stack_pod();
        let out = run(&pod, &set_form(), variant);
        assert!(out.status.success(), "{variant}: {}", stderr(&out));
        assert!(stderr(&out).contains("ip sets programmed"), "{variant}: {}", stderr(&out));
        assert_eq!(ip_sets(&pod), expected_sets(), "{variant}");
        let (v4, v6) = (rules(&pod, variant, false), rules(&pod, variant, true));
        for (rules, want) in [
            (&v4, "-A ISTIO_INBOUND -p tcp -m set --match-set istio-in-ports-exclude dst -j RETURN"),
            (&v4, "-A ISTIO_OUTPUT -p udp -m set --match-set istio-out-ports-exclude dst -j RETURN"),
            (&v4, "-A ISTIO_OUTPUT -m set --match-set istio-out-cidrs-exclude-v4 dst -j RETURN"),
            (&v6, "-A ISTIO_OUTPUT -p tcp -m set --match-set istio-out-ports-exclude dst -j RETURN"),
            (&v6, "-A ISTIO_OUTPUT -m set --match-set istio-out-cidrs-exclude-v6 dst -j RETURN"),
        ] {
            assert!(rules.contains(&want.to_string()), "{variant}: no `{want}` in {rules:#?}");
        }
        assert!(!v4.iter().chain(&v6).any(|r| r.contains("10.0.0.0/8") || r.contains("--dport 900")), "{variant}");

        let (sets, saved) = (ip_sets(&pod), (pod.iptables_save(false), pod.iptables_save(true)));
        let again = run(&pod, &set_form(), variant);
        let log = stderr(&again);
        assert!(again.status.success() && log.contains("already in place"), "{variant}: {log}");
        assert!(!log.contains("ip sets programmed") && !log.contains("Running iptables restore"), "{variant}: {log}");
        assert_eq!((ip_sets(&pod), (pod.iptables_save(false), pod.iptables_save(true))), (sets, saved), "{variant}");
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn tampered_members_are_drift_and_reconcile_swaps_in_the_planned_ones() {
    require_netns!();
    for variant in VARIANTS {
        let pod = dual_stack_pod();
        assert!(run(&pod, &set_form(), variant).status.success());
        pod.sh("ipset add istio-out-cidrs-exclude-v4 192.0.2.1 && ipset del istio-out-cidrs-exclude-v4 192.168.0.0/16");
        let tampered = ip_sets(&pod);
        let out = run(&pod, &set_form(), variant);
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{variant}: {log}");
        assert!(
            log.contains("set differs: ip set istio-out-cidrs-exclude-v4")
                && log.contains("expected: hash:net family inet, 2 members (1 missing: 192.168.0.0/16)")
                && log.contains("found:    hash:net family inet, 2 members (1 unexpected: 192.0.2.1/32)")
                && log.contains("--reconcile"),
            "{variant}: {log}"
        );
        assert_eq!(ip_sets(&pod), tampered, "{variant}: a refused run changes nothing");

        let out = run(&pod, &[&set_form()[..], &["--reconcile"]].concat(), variant);
        let log = stderr(&out);
        assert!(out.status.success() && log.contains("drifted capture rules replaced"), "{variant}: {log}");
        // Filled aside, then swapped in: the rule never sees an empty or half-filled set.
        let filled_then_swapped = [
            "create istio-out-cidrs-exclude-v4-new hash:net",
            "add istio-out-cidrs-exclude-v4-new 192.168.0.0/16",
            "swap istio-out-cidrs-exclude-v4-new istio-out-cidrs-exclude-v4",
            "destroy istio-out-cidrs-exclude-v4-new",
        ];
        let at: Vec<usize> = filled_then_swapped
            .iter()
            .map(|step| log.find(step).unwrap_or_else(|| panic!("{variant}: no `{step}` in {log}")))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{variant}: {log}");
        assert!(!log.contains("flush"), "{variant}: {log}");
        assert_eq!(ip_sets(&pod), expected_sets(), "{variant}: the planned members, and no temporary left");
        assert!(rules(&pod, variant, false)
            .contains(&"-A ISTIO_OUTPUT -m set --match-set istio-out-cidrs-exclude-v4 dst -j RETURN".into()));
        assert!(stderr(&run(&pod, &set_form(), variant)).contains("already in place"), "{variant}");
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn cleanup_removes_our_sets_and_rules_whatever_the_flags_and_keeps_foreign_sets() {
    require_netns!();
    for variant in VARIANTS {
        let pod = dual_stack_pod();
        let iptables = format!("iptables-{variant}");
        pod.sh(&format!("ipset create foreign-allow hash:ip && ipset add foreign-allow 192.0.2.7 && {iptables} -t filter -A OUTPUT -m set --match-set foreign-allow dst -j ACCEPT"));
        let foreign_rules = rules(&pod, variant, false);
        assert!(run(&pod, &set_form(), variant).status.success());
        // What a run killed between filling a temporary and swapping it in would leave.
        pod.sh("ipset create istio-out-ports-exclude-new bitmap:port range 0-65535");

        let out = run(&pod, &[BASE, &["--cleanup-only"]].concat(), variant);
        assert!(out.status.success(), "{variant}: {}", stderr(&out));
        let left = ip_sets(&pod);
        assert_eq!(left.keys().collect::<Vec<_>>(), ["foreign-allow"], "{variant}: {left:?}");
        assert_eq!(left["foreign-allow"].1, strings(&["192.0.2.7/32"]), "{variant}");
        assert_eq!(rules(&pod, variant, false), foreign_rules, "{variant}");
        assert!(rules(&pod, variant, true).is_empty(), "{variant}");
        let again = run(&pod, &[BASE, &["--cleanup-only"]].concat(), variant);
        assert!(again.status.success() && stderr(&again).contains("no capture rules"), "{variant}: {}", stderr(&again));
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_set_of_ours_a_foreign_rule_still_matches_fails_cleanup_by_name_and_the_rest_goes() {
    require_netns!();
    let pod = dual_stack_pod();
    assert!(run(&pod, &set_form(), "nft").status.success());
    let foreign = "-A OUTPUT -m set --match-set istio-out-cidrs-exclude-v4 dst -j ACCEPT";
    pod.sh(&format!("iptables-nft -t filter {foreign}"));
    let out = run(&pod, &[BASE, &["--cleanup-only"]].concat(), "nft");
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("ip set istio-out-cidrs-exclude-v4 is still in use (1 reference)"), "{log}");
    assert_eq!(ip_sets(&pod).keys().collect::<Vec<_>>(), ["istio-out-cidrs-exclude-v4"], "every other set of ours went");
    assert_eq!(rules(&pod, "nft", false), [foreign], "our rules went, the foreign one stays");
    assert!(rules(&pod, "nft", true).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn five_thousand_ranges_of_each_family_apply_and_rerun_unchanged() {
    require_netns!();
    let pod = dual_stack_pod();
    // Every other /16 of each family, so that no two merge; short, to fit one argument (128 KiB).
    let v4 = (1..=100).flat_map(|a| (0..50).map(move |b| format!("{a}.{}.0.0/16", 2 * b)));
    let v6 = (1..=5000).map(|i| format!("{:x}::/16", 2 * i));
    let ranges = v4.chain(v6).collect::<Vec<_>>().join(",");
    let args = [BASE, &["-x", &ranges, "--use-ip-sets"]].concat();
    let out = run(&pod, &args, "nft");
    assert!(out.status.success(), "{}", stderr(&out));
    let sets = ip_sets(&pod);
    for name in ["istio-out-cidrs-exclude-v4", "istio-out-cidrs-exclude-v6"] {
        assert_eq!(sets[name].1.len(), 5000, "{name}");
    }
    assert!(sets["istio-out-cidrs-exclude-v4"].1.contains("100.98.0.0/16"));
    assert!(sets["istio-out-cidrs-exclude-v6"].1.contains("2710::/16"));
    for v6 in [false, true] {
        let rules = rules(&pod, "nft", v6);
        assert!(rules.len() < 25, "one rule per list, not per range: {rules:#?}");
    }
    let again = run(&pod, &args, "nft");
    assert!(stderr(&again).contains("already in place"), "{}", stderr(&again));
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn dry_run_shows_the_sets_before_the_restores_and_touches_nothing() {
    require_netns!();
    let pod = dual_stack_pod();
    let out = run(&pod, &[&set_form()[..], &["--dry-run"]].concat(), "nft");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let create = "create istio-out-cidrs-exclude-v4 hash:net family inet hashsize 64 maxelem 65536\n";
    let (sets_at, restore_at) = (text.find(create), text.find("*nat\n"));
    assert!(sets_at.is_some() && restore_at.is_some() && sets_at < restore_at, "{text}");
    for line in ["add istio-out-cidrs-exclude-v4 10.0.0.0/8\n", "create istio-in-ports-exclude bitmap:port range 0-65535\n"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert!(ip_sets(&pod).is_empty() && pod.rules(false).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_failed_restore_takes_back_the_sets_made_and_swaps_back_the_replaced() {
    require_netns!();
    let pod = dual_stack_pod();
    let refusing = RefusingIp6tablesRestore::new();
    let failing = |args: &[&str]| {
        let mut cmd = pod.cmd(release_bin("istio-iptables"));
        cmd.args(args).env("PATH", refusing.path()).env("FORCE_IPTABLES_BINARY", "nft").output().unwrap()
    };

    let out = failing(&set_form());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    assert!(ip_sets(&pod).is_empty(), "the sets made for the new rules are gone: {:?}", ip_sets(&pod));
    assert!(pod.rules(false).is_empty() && pod.rules(true).is_empty());

    assert!(run(&pod, &set_form(), "nft").status.success());
    pod.sh("ipset add istio-out-cidrs-exclude-v4 192.0.2.1");
    let tampered = ip_sets(&pod);
    // Forced, every rule is sent again, so the IPv6 restore runs, and fails.
    let out = failing(&[&set_form()[..], &["--reconcile", "--force-apply"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    assert_eq!(ip_sets(&pod), tampered, "every set swapped back as it was, no temporary left");
}

/// `9000,9001,...`: `n` ports from `first`.
fn ports(first: u16, n: u16) -> String {
    (first..first + n).map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn port_lists_beyond_multiports_fifteen_apply_in_both_forms_and_both_variants() {
    require_netns!();
    let (excluded, included, outbound_in) = (ports(9000, 40), ports(8000, 40), ports(7000, 40));
    let every_exclusion: Vec<&str> = [BASE, &["-d", &excluded, "-o", &excluded, "-q", &outbound_in]].concat();
    let only_inbound: Vec<&str> = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-b", &included].to_vec();
    for (config, args) in [("exclusions", every_exclusion), ("inbound ports", only_inbound)] {
        for sets in [false, true] {
            for variant in VARIANTS {
                let pod = dual_stack_pod();
                let args = if sets { [&args[..], &["--use-ip-sets"]].concat() } else { args.clone() };
                let what = format!("{config}, sets {sets}, {variant}");
                let out = run(&pod, &args, variant);
                assert!(out.status.success(), "{what}: {}", stderr(&out));
                let all: Vec<String> = rules(&pod, variant, false).into_iter().chain(rules(&pod, variant, true)).collect();
                let widest = all
                    .iter()
                    .filter_map(|r| r.split(" --dports ").nth(1))
                    .map(|l| l.split(' ').next().unwrap().split(',').count())
                    .max();
                assert!(widest.unwrap_or(0) <= 15, "{what}: a multiport list of {widest:?} ports");
                let last = if config == "exclusions" { "9039" } else { "8039" };
                if sets {
                    assert!(ip_sets(&pod).values().any(|(_, members)| members.len() == 40 && members.contains(last)), "{what}");
                } else {
                    assert!(all.iter().any(|r| r.contains(&format!("--dport {last} "))), "{what}: {all:#?}");
                }
                let again = run(&pod, &args, variant);
                assert!(stderr(&again).contains("already in place"), "{what}: {}", stderr(&again));
            }
        }
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_set_of_our_name_but_another_type_is_drift_and_replaced_while_no_rule_matches_it() {
    require_netns!();
    let pod = dual_stack_pod();
    pod.sh("ipset create istio-out-cidrs-exclude-v6 hash:ip family inet6 && ipset add istio-out-cidrs-exclude-v6 fd00:1::1");
    let out = run(&pod, &set_form(), "nft");
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("found:    hash:ip family inet6, 1 member"), "{log}");
    assert!(ip_sets(&pod)["istio-out-cidrs-exclude-v6"].0 == "hash:ip family inet6" && pod.rules(false).is_empty());

    let out = run(&pod, &[&set_form()[..], &["--reconcile"]].concat(), "nft");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ip_sets(&pod), expected_sets());
}
