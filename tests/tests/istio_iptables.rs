//! `istio-iptables` (iptables backend) in real pod namespaces, entered with nsenter.

use std::process::Output;

use capture_tests::{
    istio_iptables as tool, release_bin, require_netns, run_ok, stderr, Pod, RefusingIp6tablesRestore, SEED_ARGS as SEED,
};

/// `nsenter -t PID -n iptables -t nat -S`, as a node agent would look (with the nft variant
/// named, since the tool picks it in a fresh namespace even where plain iptables is legacy).
fn nat_rules(pod: &Pod) -> String {
    String::from_utf8_lossy(&run_ok(pod.cmd("iptables-nft").args(["-t", "nat", "-S"])).stdout).into_owned()
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn seed_command_installs_istio_rules() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let out = tool(&pod, SEED, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let nat = nat_rules(&pod);
    for want in [
        "-N ISTIO_INBOUND",
        "-N ISTIO_IN_REDIRECT",
        "-N ISTIO_OUTPUT",
        "-N ISTIO_REDIRECT",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ] {
        assert!(nat.lines().any(|l| l == want), "missing `{want}` in:\n{nat}");
    }
    assert!(pod.rules(true).is_empty(), "an IPv4-only pod gets no IPv6 rules");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn second_run_changes_nothing() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    assert!(tool(&pod, SEED, &[]).status.success());
    let before = pod.iptables_save(false);
    let out = tool(&pod, SEED, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("already in place"), "{}", stderr(&out));
    assert_eq!(pod.iptables_save(false), before);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn drift_needs_reconcile_and_foreign_rules_survive() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    assert!(tool(&pod, SEED, &[]).status.success());
    let clean = pod.rules(false);
    pod.sh("iptables-nft -t nat -A OUTPUT -p tcp --dport 123 -j ACCEPT");
    // A foreign rule outside our chains is not drift.
    let out = tool(&pod, SEED, &[]);
    assert!(out.status.success() && stderr(&out).contains("already in place"), "{}", stderr(&out));

    pod.sh("iptables-nft -t nat -A ISTIO_INBOUND -p tcp --dport 9999 -j RETURN");
    let drifted = pod.rules(false);
    let out = tool(&pod, SEED, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--dport 9999") && stderr(&out).contains("--reconcile"), "{}", stderr(&out));
    assert_eq!(pod.rules(false), drifted, "a refused run changes nothing");

    let out = tool(&pod, &[SEED, &["--reconcile"]].concat(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("replaced"), "{}", stderr(&out));
    let after = pod.rules(false);
    assert!(!after.iter().any(|r| r.contains("9999")), "drift removed");
    assert!(after.iter().any(|r| r == "-A OUTPUT -p tcp -m tcp --dport 123 -j ACCEPT"), "foreign rule kept");
    let mut expected = clean.clone();
    expected.insert(0, "-A OUTPUT -p tcp -m tcp --dport 123 -j ACCEPT".into());
    let mut sorted_after = after.clone();
    sorted_after.sort();
    expected.sort();
    assert_eq!(sorted_after, expected);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn cleanup_removes_only_what_we_added() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    pod.sh("iptables-nft -t nat -N USER_CHAIN && iptables-nft -t nat -A USER_CHAIN -j RETURN && iptables-nft -t nat -A PREROUTING -j USER_CHAIN");
    pod.sh("iptables-nft -t mangle -A OUTPUT -p udp -j MARK --set-mark 7");
    let before = pod.rules(false);
    assert!(tool(&pod, &[SEED, &["-m", "TPROXY"]].concat(), &[]).status.success());
    assert!(pod.rules(false).len() > before.len() + 10);
    let out = tool(&pod, &[SEED, &["-m", "TPROXY", "--cleanup-only"]].concat(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pod.rules(false), before);
    assert!(!pod.iptables_save(false).contains("ISTIO"), "{}", pod.iptables_save(false));
    let again = tool(&pod, &[SEED, &["--cleanup-only"]].concat(), &[]);
    assert!(again.status.success() && stderr(&again).contains("no capture rules"), "{}", stderr(&again));
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn force_apply_sends_exact_rules_again_with_either_backend() {
    require_netns!();
    for (backend, logged) in
        [(&[][..], "Running iptables restore with"), (&["--native-nftables"][..], "nftables rules programmed:")]
    {
        let pod = Pod::with_address("10.44.0.5/24");
        let args = [SEED, backend].concat();
        assert!(tool(&pod, &args, &[]).status.success());
        // Both keep their tables in nf_tables, where every rule has a handle: a rule sent again gets a new one.
        let (ruleset, handles) = (pod.nft_ruleset(), pod.sh("nft -a list ruleset"));
        let out = tool(&pod, &[&args[..], &["--force-apply"]].concat(), &[]);
        let log = stderr(&out);
        assert!(out.status.success(), "{backend:?}: {log}");
        assert!(log.contains(logged) && log.contains("drifted capture rules replaced"), "{backend:?}: {log}");
        assert_eq!(pod.nft_ruleset(), ruleset, "{backend:?}");
        assert_ne!(pod.sh("nft -a list ruleset"), handles, "{backend:?}: nothing was sent again");
        let again = tool(&pod, &args, &[]);
        assert!(stderr(&again).contains("already in place"), "{backend:?}: {}", stderr(&again));
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn dry_run_prints_the_restore_input_and_touches_nothing() {
    require_netns!();
    let pod = Pod::with_address("fd00:44::5/64");
    let out = tool(&pod, &[SEED, &["--dry-run"]].concat(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(IPv4)") && text.contains("(IPv6)"), "{text}");
    assert!(text.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"), "{text}");
    assert!(pod.rules(false).is_empty() && pod.rules(true).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn ipv6_pod_gets_both_families() {
    require_netns!();
    let pod = Pod::with_address("fd00:44::5/64");
    let out = tool(&pod, SEED, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v6 = pod.rules(true);
    assert!(v6.iter().any(|r| r == "-A ISTIO_OUTPUT -d ::1/128 -j RETURN"), "{v6:?}");
    assert!(pod.rules(false).iter().any(|r| r == "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"));
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn bad_input_is_named_and_nothing_is_programmed() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    // (arguments, environment, what the error must name)
    type BadInput<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[BadInput] = &[
        (&["-b", "80,99999"], &[], "99999"),
        (&["-b", "http"], &[], "\"http\""),
        (&["-p", "0"], &[], "\"0\""),
        (&["-i", "10.0.0.0/33"], &[], "10.0.0.0/33"),
        (&["-i", "10.0.0.1"], &[], "10.0.0.1"),
        (&["-x", "*"], &[], "'*' is not allowed"),
        (&["-t", "0x539"], &[], "0x539"),
        (&["-r", "main"], &[], "\"main\""),
        (&["-c", "an-interface-name-too-long"], &[], "longer than 15 bytes"),
        (&["-m", "TPROXYY"], &[], "TPROXYY"),
        (&["-g", "no-such-group-xyz"], &[], "no-such-group-xyz"),
        (&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "no-such-group-xyz")], "no-such-group-xyz"),
        (&[], &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")], "10.0.0.1/32"),
        (&[], &[("FORCE_IPTABLES_BINARY", "fast")], "fast"),
        (&[], &[("INBOUND_TUNNEL_PORT", "abc")], "abc"),
    ];
    for (args, env, named) in cases {
        let out = tool(&pod, &[SEED, args].concat(), env);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{args:?} {env:?} should name {named}: {}", stderr(&out));
    }
    assert!(pod.rules(false).is_empty(), "nothing programmed: {:?}", pod.rules(false));
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn network_namespace_flag_enters_the_pod() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let ns = pod.ns_path();
    // Run from a second, empty namespace: only the pod may change.
    let bystander = Pod::new();
    let out = bystander
        .cmd(release_bin("istio-iptables"))
        .args(SEED)
        .args(["--network-namespace", &ns.to_string_lossy()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(pod.rules(false).iter().any(|r| r == "-A OUTPUT -j ISTIO_OUTPUT"));
    assert!(bystander.rules(false).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn missing_net_admin_is_reported_before_anything_changes() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let out = pod
        .cmd("setpriv")
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"])
        .arg(release_bin("istio-iptables"))
        .args(SEED)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("CAP_NET_ADMIN"), "{}", stderr(&out));
    assert!(pod.rules(false).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn legacy_is_used_only_where_it_already_holds_rules() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    pod.sh("iptables-legacy -t filter -A INPUT -p tcp --dport 7 -j ACCEPT");
    assert!(tool(&pod, SEED, &[]).status.success());
    assert!(pod.sh("iptables-legacy-save").contains("-A OUTPUT -j ISTIO_OUTPUT"));
    assert!(!pod.sh("iptables-nft-save").contains("ISTIO"));

    let fresh = Pod::with_address("10.44.0.5/24");
    assert!(tool(&fresh, SEED, &[("FORCE_IPTABLES_BINARY", "legacy")]).status.success());
    assert!(fresh.sh("iptables-legacy-save").contains("ISTIO_OUTPUT"));
    assert!(!fresh.sh("iptables-nft-save").contains("ISTIO"));
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_refused_ipv6_half_rolls_back_the_ipv4_half() {
    require_netns!();
    let pod = Pod::with_address("fd00:44::5/64");
    pod.sh("iptables-nft -t nat -A OUTPUT -p tcp --dport 123 -j ACCEPT");
    let before = pod.iptables_save(false);
    // Fault injection: the IPv6 restore is refused; the IPv4 half is real and must be undone.
    let refusing = RefusingIp6tablesRestore::new();
    let out = pod.cmd(release_bin("istio-iptables")).args(SEED).env("PATH", refusing.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    assert!(stderr(&out).contains("modprobe"), "the hint names the fix: {}", stderr(&out));
    assert_eq!(pod.iptables_save(false), before, "IPv4 restored exactly, foreign rule included");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn tproxy_routing_is_added_once_and_removed_on_cleanup() {
    require_netns!();
    let pod = Pod::with_address("fd00:44::5/64");
    let tproxy: Vec<&str> = [SEED, &["-m", "TPROXY"]].concat();
    for _ in 0..2 {
        let out = tool(&pod, &tproxy, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for family in ["-4", "-6"] {
        let rules = pod.sh(&format!("ip {family} rule show"));
        assert_eq!(rules.matches("fwmark 0x539 lookup 133").count(), 1, "{rules}");
        let routes = pod.sh(&format!("ip {family} route show table 133"));
        assert!(routes.contains("local default dev lo"), "{routes}");
    }
    assert!(pod.sh("ip -6 addr show dev lo").contains("::6/128"));
    let out = tool(&pod, &[&tproxy[..], &["--cleanup-only"]].concat(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for family in ["-4", "-6"] {
        assert!(!pod.sh(&format!("ip {family} rule show")).contains("0x539"));
        assert!(pod.sh(&format!("ip {family} route show table 133")).is_empty());
    }
    assert!(!pod.sh("ip -6 addr show dev lo").contains("::6/128"));
    assert!(pod.rules(false).is_empty() && pod.rules(true).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn dry_run_lists_routes_too() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let out = tool(&pod, &[SEED, &["-m", "TPROXY", "-n"]].concat(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# then: ip rule add fwmark 1337 lookup 133") || text.contains("fwmark"), "{text}");
    assert!(!pod.sh("ip rule show").contains("lookup 133"));
}

/// Runs the tool as the proxy user (validation only sees redirection for the proxy's own traffic).
fn tool_as_proxy(pod: &Pod, args: &[&str]) -> Output {
    pod.cmd("setpriv")
        .args(["--reuid=1337", "--regid=1337", "--clear-groups"])
        .arg(release_bin("istio-iptables"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn validation_passes_only_where_redirection_works() {
    require_netns!();
    let cases: [(&str, &[&str]); 5] = [
        ("10.44.0.5/24", &[]),
        ("fd00:44::5/64", &[]),
        ("10.44.0.5/24", &["-m", "TPROXY"]),
        ("10.44.0.5/24", &["--native-nftables"]),
        ("fd00:44::5/64", &["-m", "TPROXY", "--native-nftables"]),
    ];
    for (addr, extra) in cases {
        let pod = Pod::with_address(addr);
        let validate: Vec<&str> = [SEED, extra, &["--run-validation", "--skip-rule-apply", "--probe-timeout=1s"]].concat();
        let out = tool_as_proxy(&pod, &validate);
        assert_eq!(out.status.code(), Some(126), "{addr} {extra:?} without rules: {}", stderr(&out));
        assert!(stderr(&out).contains("not redirected"), "{}", stderr(&out));
        assert!(tool(&pod, &[SEED, extra].concat(), &[]).status.success());
        let out = tool_as_proxy(&pod, &validate);
        assert!(out.status.success(), "{addr} {extra:?} with rules: {}", stderr(&out));
    }
}
