//! `capture_lib::routes` against the real kernel: `::6` on `lo` and the TPROXY policy routing,
//! applied and removed inside a pod's namespace and checked with `ip`.

use std::fs::File;

use capture_lib::config::{InboundPorts, InterceptionMode};
use capture_lib::routes::{self, RouteError, RoutePlan, TproxyRouting};
use capture_lib::settings::CaptureConfig;
use capture_tests::{require_netns, Pod};
use nix::sched::{setns, CloneFlags};

/// Runs `f` on a thread that has joined the pod's network namespace, since `routes` acts on
/// the calling thread's namespace (and the test's own must stay untouched).
fn in_pod<T: Send>(pod: &Pod, f: impl FnOnce() -> T + Send) -> T {
    let namespace = File::open(pod.ns_path()).expect("open the pod's namespace");
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            setns(&namespace, CloneFlags::CLONE_NEWNET).expect("setns into the pod");
            f()
        });
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn tproxy_config(ipv6: bool) -> CaptureConfig {
    CaptureConfig {
        mode: InterceptionMode::Tproxy,
        inbound_ports: InboundPorts::All { except: vec![] },
        ipv6,
        ..CaptureConfig::default()
    }
}

/// `ip ARGS`. A table that was never created reads as an empty one (the kernel keeps a table
/// once it exists, so only a namespace's first look sees the error).
fn ip(pod: &Pod, args: &str) -> String {
    let out = pod.cmd("ip").args(args.split_whitespace()).output().expect("run ip");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() || stderr.contains("table does not exist"), "ip {args}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything `routes` may touch, as `ip` shows it.
fn routing_state(pod: &Pod, table: u32) -> String {
    pod.settle_ipv6();
    [
        "-6 addr show dev lo",
        "rule show",
        "-6 rule show",
        &format!("route show table {table}"),
        &format!("-6 route show table {table}"),
    ]
    .iter()
    .map(|args| ip(pod, args))
    .collect()
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// `ip rule` shows marks in hex: 1337 is 0x539.
const OUR_RULE: &str = "fwmark 0x539 lookup 133";

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn dual_stack_tproxy_adds_each_entry_once_and_remove_restores_the_namespace() {
    require_netns!();
    let pod = Pod::new();
    let plan = RoutePlan::for_config(&tproxy_config(true));
    let before = routing_state(&pod, 133);

    in_pod(&pod, || routes::apply(&plan)).expect("first apply");
    let applied = routing_state(&pod, 133);
    assert_eq!(count(&ip(&pod, "-6 addr show dev lo"), "inet6 ::6/128 "), 1, "{applied}");
    assert_eq!(count(&ip(&pod, "rule show"), OUR_RULE), 1, "{applied}");
    assert_eq!(count(&ip(&pod, "-6 rule show"), OUR_RULE), 1, "{applied}");
    assert_eq!(ip(&pod, "route show table 133").trim(), "local default dev lo scope host");
    let v6_routes = ip(&pod, "-6 route show table 133");
    assert!(v6_routes.lines().count() == 1 && v6_routes.starts_with("local default dev lo "), "{v6_routes}");

    in_pod(&pod, || routes::apply(&plan)).expect("second apply");
    assert_eq!(routing_state(&pod, 133), applied, "a second apply changes nothing");

    in_pod(&pod, routes::remove_ours).expect("remove");
    assert_eq!(routing_state(&pod, 133), before, "remove restores the namespace");
    in_pod(&pod, routes::remove_ours).expect("second remove");
    assert_eq!(routing_state(&pod, 133), before);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn redirect_with_ipv6_adds_only_a_reachable_passthrough_address() {
    require_netns!();
    let pod = Pod::new();
    let plan = RoutePlan::for_config(&CaptureConfig { ipv6: true, ..CaptureConfig::default() });
    let rules_before = pod.sh("ip rule show; ip -6 rule show");

    in_pod(&pod, || routes::apply(&plan)).expect("apply");
    assert_eq!(count(&ip(&pod, "-6 addr show dev lo"), "inet6 ::6/128 "), 1);
    assert_eq!(pod.sh("ip rule show; ip -6 rule show"), rules_before, "REDIRECT needs no policy routing");
    pod.sh("ping -6 -c1 -W2 ::6 >/dev/null");

    in_pod(&pod, routes::remove_ours).expect("remove");
    assert_eq!(count(&ip(&pod, "-6 addr show dev lo"), "::6/128"), 0);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn ipv6_disabled_namespace_is_reported_after_ipv4_routing_is_in_place() {
    require_netns!();
    for knob in ["lo", "all"] {
        let pod = Pod::new();
        pod.sh(&format!("echo 1 > /proc/sys/net/ipv6/conf/{knob}/disable_ipv6"));
        let plan = RoutePlan::for_config(&tproxy_config(true));

        match in_pod(&pod, || routes::apply(&plan)) {
            // Setting `all` also sets every interface, so either may be the one named.
            Err(RouteError::Ipv6Disabled { reason }) => assert!(reason.ends_with("disable_ipv6 = 1"), "{reason}"),
            other => panic!("disable_ipv6 on {knob}: expected Ipv6Disabled, got {other:?}"),
        }
        assert_eq!(count(&ip(&pod, "rule show"), OUR_RULE), 1, "IPv4 rule in place ({knob})");
        assert_eq!(count(&ip(&pod, "route show table 133"), "local default dev lo"), 1, "IPv4 route ({knob})");
        assert_eq!(count(&ip(&pod, "-6 rule show"), OUR_RULE), 0, "no IPv6 rule ({knob})");

        in_pod(&pod, routes::remove_ours).expect("remove with IPv6 disabled");
        assert_eq!(count(&ip(&pod, "rule show"), OUR_RULE), 0);
        assert_eq!(ip(&pod, "route show table 133"), "");
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn duplicates_left_by_another_tool_are_not_added_to_and_all_removed() {
    require_netns!();
    let pod = Pod::new();
    // What `ip` (or a re-run of Istio's own init) leaves: the kernel accepts the same rule twice.
    pod.sh("ip rule add fwmark 1337 lookup 133 && ip rule add fwmark 1337 lookup 133 && \
         ip route add local default dev lo table 133");
    let plan = RoutePlan::for_config(&tproxy_config(false));

    in_pod(&pod, || routes::apply(&plan)).expect("apply over existing entries");
    assert_eq!(count(&ip(&pod, "rule show"), OUR_RULE), 2, "no third copy");
    assert_eq!(ip(&pod, "route show table 133").lines().count(), 1);

    in_pod(&pod, routes::remove_ours).expect("remove");
    assert_eq!(count(&ip(&pod, "rule show"), OUR_RULE), 0, "every copy removed");
    assert_eq!(ip(&pod, "route show table 133"), "");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn entries_that_are_not_ours_are_left_alone() {
    require_netns!();
    let pod = Pod::new();
    // A rule that also matches an input interface, rules to tables without a TPROXY route, other
    // routes in our table and another address on lo are someone else's.
    pod.sh("ip rule add fwmark 1337 iif eth0 lookup 133 && ip rule add fwmark 1338 lookup 134 && \
         ip -6 rule add fwmark 1337 lookup 134 && ip route add local 10.0.0.0/8 dev lo table 133 && \
         ip -6 route add local fd00::/8 dev lo table 133 && ip -6 addr add ::7/128 dev lo");
    let before = routing_state(&pod, 133) + &routing_state(&pod, 134);
    let plan = RoutePlan::for_config(&tproxy_config(true));

    in_pod(&pod, || routes::apply(&plan)).expect("apply");
    assert_eq!(count(&ip(&pod, "rule show"), OUR_RULE), 1, "a narrower rule does not stand in for ours");
    assert_eq!(count(&ip(&pod, "-6 rule show"), OUR_RULE), 1);
    assert_eq!(count(&ip(&pod, "route show table 133"), "local default dev lo"), 1);

    in_pod(&pod, routes::remove_ours).expect("remove");
    assert_eq!(routing_state(&pod, 133) + &routing_state(&pod, 134), before, "only our entries went");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn tables_above_255_and_other_marks_work() {
    require_netns!();
    let pod = Pod::new();
    let plan = RoutePlan { passthrough_v6: false, tproxy: Some(TproxyRouting { mark: 42, table: 1000, ipv6: true }) };

    for _ in 0..2 {
        in_pod(&pod, || routes::apply(&plan)).expect("apply");
        assert_eq!(count(&pod.sh("ip rule show; ip -6 rule show"), "fwmark 0x2a lookup 1000"), 2);
        assert_eq!(count(&pod.sh("ip route show table 1000; ip -6 route show table 1000"), "local default dev lo"), 2);
    }
    in_pod(&pod, routes::remove_ours).expect("remove");
    assert_eq!(count(&pod.sh("ip rule show; ip -6 rule show"), "lookup 1000"), 0);
    assert_eq!(pod.sh("ip route show table 1000; ip -6 route show table 1000"), "");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn what_earlier_runs_with_any_mark_and_table_added_is_found_and_removed() {
    require_netns!();
    let pod = Pod::new();
    let before = routing_state(&pod, 70) + &routing_state(&pod, 133);
    for (mark, table) in [(7, 70), (1337, 133)] {
        let plan = RoutePlan { passthrough_v6: true, tproxy: Some(TproxyRouting { mark, table, ipv6: true }) };
        in_pod(&pod, || routes::apply(&plan)).expect("apply");
    }
    // What a run killed between its two removals leaves: a route no rule leads to.
    pod.sh("ip -6 rule del fwmark 7 lookup 70");
    let found: Vec<String> = in_pod(&pod, routes::ours).expect("look").iter().map(|f| f.removal()).collect();
    let kind = |line: &String| ["rule", "route", "addr"].iter().position(|k| line.contains(k)).unwrap();
    assert!(found.windows(2).all(|pair| kind(&pair[0]) <= kind(&pair[1])), "rules, then routes, then ::6: {found:?}");
    let mut sorted = found.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "ip -6 addr del ::6/128 dev lo",
            "ip -6 route del local default dev lo table 133",
            "ip -6 route del local default dev lo table 70",
            "ip -6 rule del fwmark 1337 lookup 133",
            "ip route del local default dev lo table 133",
            "ip route del local default dev lo table 70",
            "ip rule del fwmark 1337 lookup 133",
            "ip rule del fwmark 7 lookup 70",
        ]
    );
    in_pod(&pod, routes::remove_ours).expect("remove");
    assert_eq!(routing_state(&pod, 70) + &routing_state(&pod, 133), before);
    assert!(in_pod(&pod, routes::ours).expect("look again").is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_conflicting_route_is_reported_with_the_command_that_failed() {
    require_netns!();
    let pod = Pod::new();
    pod.sh("ip route add blackhole default table 133");
    let plan = RoutePlan::for_config(&tproxy_config(false));

    let error = in_pod(&pod, || routes::apply(&plan)).expect_err("the blackhole holds the default slot");
    let message = error.to_string();
    assert!(message.contains("`ip route add local default dev lo table 133` failed: File exists"), "{message}");
    assert!(ip(&pod, "route show table 133").starts_with("blackhole default"), "the foreign route stays");
}
