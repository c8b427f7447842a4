//! Concurrency, locks, crashes and odd namespaces: the namespace always ends up correct.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capture_tests::{release_bin, require_netns, Pod, SEED_ARGS as SEED};

fn tool(pod: &Pod, args: &[&str]) -> Command {
    let mut cmd = pod.cmd(release_bin("istio-iptables"));
    cmd.args(SEED).args(args);
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything the namespace holds that a run may change: both iptables families, our
/// nftables tables and the TPROXY routing. (iptables-nft's own tables are compared through
/// iptables-save: the order in which the two families create them is not fixed.)
fn snapshot(pod: &Pod) -> (Vec<String>, Vec<String>, String, String) {
    let ours = pod.sh("for t in nat mangle raw; do nft list table inet istio-proxy-$t 2>/dev/null || true; done");
    (pod.rules(false), pod.rules(true), ours, pod.sh("ip -4 rule; ip -6 rule; ip -6 addr show dev lo"))
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn two_runs_at_once_leave_one_correct_ruleset() {
    require_netns!();
    for backend in [&[][..], &["--native-nftables"][..]] {
        let reference = Pod::with_address("fd00:44::5/64");
        assert!(tool(&reference, backend).status().unwrap().success());
        let want = snapshot(&reference);
        for _ in 0..4 {
            let pod = Pod::with_address("fd00:44::5/64");
            let a = tool(&pod, backend).stderr(Stdio::piped()).spawn().unwrap();
            let b = tool(&pod, backend).stderr(Stdio::piped()).spawn().unwrap();
            let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
            assert!(a.status.success() && b.status.success(), "{} / {}", stderr(&a), stderr(&b));
            let said = format!("{}{}", stderr(&a), stderr(&b));
            assert!(said.contains("installed") && said.contains("already in place"), "{backend:?}: {said}");
            assert_eq!(snapshot(&pod), want, "{backend:?}");
        }
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_concurrent_run_is_waited_for_then_reported() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    // Another run holds the namespace lock (an flock on the namespace's nsfs inode).
    let mut holder = Command::new("flock").arg(pod.ns_path()).args(["sleep", "3"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = tool(&pod, &["--iptables-lock-wait=500ms"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("another capture run"), "{}", stderr(&out));
    assert!(pod.rules(false).is_empty());
    let started = Instant::now();
    let out = tool(&pod, &["--iptables-lock-wait=10s"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(started.elapsed() >= Duration::from_millis(1500), "it waited for the holder");
    holder.wait().unwrap();
    assert!(!pod.rules(false).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_held_xtables_lock_is_waited_for_up_to_the_limit() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let lockfile = std::env::temp_dir().join(capture_tests::unique("xtlock"));
    std::fs::write(&lockfile, b"").unwrap();
    let mut holder = Command::new("flock").arg(&lockfile).args(["sleep", "4"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = tool(&pod, &["--iptables-lock-wait=1s"])
        .env("FORCE_IPTABLES_BINARY", "legacy")
        .env("XTABLES_LOCKFILE", &lockfile)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("xtables lock"), "{}", stderr(&out));
    assert!(!pod.sh("iptables-legacy-save").contains("ISTIO"), "nothing half-applied");
    holder.wait().unwrap();
    let out = tool(&pod, &[]).env("FORCE_IPTABLES_BINARY", "legacy").env("XTABLES_LOCKFILE", &lockfile).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = std::fs::remove_file(lockfile);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_run_killed_at_any_point_is_repaired_by_the_next() {
    require_netns!();
    for args in [&["-m", "TPROXY"][..], &["-m", "TPROXY", "--native-nftables"][..]] {
        let reference = Pod::with_address("fd00:44::5/64");
        assert!(tool(&reference, args).status().unwrap().success());
        let want = snapshot(&reference);
        for i in 0..10u64 {
            let pod = Pod::with_address("fd00:44::5/64");
            let mut child = tool(&pod, args).stderr(Stdio::null()).spawn().unwrap();
            std::thread::sleep(Duration::from_micros(1500 * i));
            let _ = child.kill();
            let _ = child.wait();
            let out = tool(&pod, args).output().unwrap();
            assert!(out.status.success(), "{args:?} after a kill at {}us: {}", 1500 * i, stderr(&out));
            assert_eq!(snapshot(&pod), want, "{args:?} after a kill at {}us", 1500 * i);
        }
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn ipv6_disabled_on_lo_keeps_capture_and_warns() {
    require_netns!();
    let pod = Pod::with_address("fd00:44::5/64");
    pod.sh("sysctl -qw net.ipv6.conf.lo.disable_ipv6=1");
    let out = tool(&pod, &[]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("\twarn\t") && stderr(&out).contains("disable_ipv6"), "{}", stderr(&out));
    assert!(!pod.rules(false).is_empty() && !pod.rules(true).is_empty());
}
