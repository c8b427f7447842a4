//! What a hostile user or pod tried against `istio-iptables` and capture-lib (issue 10, items 1
//! to 10), each in real pod namespaces: the tool must refuse what it cannot program (exit 2,
//! naming the setting), read back exactly what it wrote, say what happened when it fails, and
//! leave a namespace exactly as it found it on cleanup, whatever flags it gets then.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use capture_tests::{
    istio_iptables as tool, release_bin, require_netns, run_ok, stderr, unique, Pod, RefusingIp6tablesRestore, SEED_ARGS as SEED,
};

const NATIVE: &[&str] = &["--native-nftables"];
const IPTABLES: &[&str] = &[];

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "istio-iptables failed ({}): {}", out.status, stderr(out));
}

/// A file under the temporary directory holding `bytes`, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(bytes: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(unique("capt-file"));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The tool in the pod, in a mount namespace of its own whose /etc/resolv.conf holds `resolv_conf`
/// (as a container's does).
fn tool_with_resolv_conf(pod: &Pod, resolv_conf: &[u8], args: &[&str]) -> Output {
    let file = TempFile::new(resolv_conf);
    let mut cmd = pod.cmd("unshare");
    cmd.args(["--mount", "sh", "-c", "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"", file.path()]);
    cmd.arg(release_bin("istio-iptables")).args(args).env_remove("ISTIO_OUTBOUND_OWNER_GROUPS");
    cmd.output().expect("run istio-iptables")
}

/// A pod with an IPv4 and an IPv6 address on eth0.
fn dual_stack_pod() -> Pod {
    let pod = Pod::with_address("10.44.0.5/24");
    pod.sh("ip -6 addr add fd00:44::5/64 dev eth0 nodad");
    pod
}

/// The policy routing and addresses a capture may add, as `ip` shows them.
fn routing(pod: &Pod) -> String {
    pod.settle_ipv6();
    pod.sh("ip -4 rule; ip -6 rule; ip -4 route show table all; ip -6 route show table all; ip -6 addr show dev lo")
}

/// Everything a capture may leave in the namespace: rules of both iptables variants and
/// families, our nftables tables, and the routing.
fn capture_state(pod: &Pod) -> String {
    let ours: String = pod.nft_ruleset().split("\ntable ").filter(|t| t.contains("istio-proxy-")).collect();
    format!("{:?}\n{:?}\n{ours}\n{}", pod.rules(false), pod.rules(true), routing(pod))
}

fn has_iptables_capture(pod: &Pod) -> bool {
    pod.rules(false).iter().chain(&pod.rules(true)).any(|r| r.contains("ISTIO_"))
}

fn has_nftables_capture(pod: &Pod) -> bool {
    pod.nft_ruleset().contains("table inet istio-proxy-")
}

fn args(parts: &[&[&str]]) -> Vec<String> {
    parts.concat().into_iter().map(str::to_string).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

// Item 1: ip6tables-save prints ::1.2.3.4 where Rust prints ::102:304.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn ipv4_compatible_and_mapped_ipv6_forms_read_back_as_unchanged() {
    require_netns!();
    let pod = Pod::with_address("fd00:44::5/64");
    let resolv_conf = b"nameserver ::127.0.0.53\nnameserver ::ffff:10.96.0.10\nnameserver 10.96.0.10\n";
    #[rustfmt::skip]
    let run = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-b", "*", "--redirect-dns",
               "-i", "::1.2.3.4/128,::ffff:5.6.7.0/120,10.0.0.0/8", "-x", "::1.2.3.5/128,::0.1.0.0/112"];
    assert_ok(&tool_with_resolv_conf(&pod, resolv_conf, &run));
    let v6 = pod.rules(true);
    assert!(v6.iter().any(|r| r.contains("::1.2.3.4/128")), "{v6:#?}");
    let before = pod.iptables_save(true);
    for extra in [&[][..], &["--reconcile"]] {
        let out = tool_with_resolv_conf(&pod, resolv_conf, &[&run[..], extra].concat());
        assert_ok(&out);
        assert!(stderr(&out).contains("already in place"), "{extra:?}: {}", stderr(&out));
    }
    assert_eq!(pod.iptables_save(true), before);
}

// Item 2: iptables-restore reads `"` as a quote, `!` alone as negation.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn interface_names_iptables_restore_would_misread_are_refused() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let cases = [
        ("-c", "a\"b", "--istio-exclude-interfaces"),
        ("-k", "x\"y", "--kube-virt-interfaces"),
        ("-c", "eth0,!", "--istio-exclude-interfaces"),
    ];
    for backend in [IPTABLES, NATIVE] {
        for (flag, value, named) in cases {
            let out = tool(&pod, &[SEED, backend, &[flag, value]].concat(), &[]);
            assert_eq!(out.status.code(), Some(2), "{flag} {value}: {}", stderr(&out));
            assert!(stderr(&out).contains(named), "{flag} {value}: {}", stderr(&out));
        }
    }
    assert!(!has_iptables_capture(&pod) && !has_nftables_capture(&pod), "nothing programmed");
}

// Item 3: one owner-group rule holds every group, and each backend has a ceiling.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn owner_groups_beyond_what_a_backend_can_program_are_refused_up_front() {
    require_netns!();
    let groups = |n: u32| (1..=n).map(|g| g.to_string()).collect::<Vec<_>>().join(",");
    for (backend, most) in [(IPTABLES, 49), (NATIVE, 63)] {
        let pod = Pod::with_address("10.44.0.5/24");
        let refused = tool(&pod, &[SEED, backend].concat(), &[("ISTIO_OUTBOUND_OWNER_GROUPS", &groups(most + 1))]);
        assert_eq!(refused.status.code(), Some(2), "{backend:?} {}: {}", most + 1, stderr(&refused));
        let message = stderr(&refused);
        assert!(message.contains("ISTIO_OUTBOUND_OWNER_GROUPS") && message.contains(&most.to_string()), "{message}");
        assert!(!has_iptables_capture(&pod) && !has_nftables_capture(&pod), "nothing programmed");
        assert_ok(&tool(&pod, &[SEED, backend].concat(), &[("ISTIO_OUTBOUND_OWNER_GROUPS", &groups(most))]));
    }
}

// Item 4: every refusal of a setting happens in validation, exit 2, naming it.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn refused_settings_exit_2_naming_the_setting_before_anything_is_touched() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--iptables-lock-wait", "4000000000000000h"], &[], "--iptables-lock-wait"),
        (&["--probe-timeout", "99999999999999999999s"], &[], "--probe-timeout"),
        (&[], &[("IPTABLES_LOCK_WAIT", "4000000000000000h")], "4000000000000000h"),
        (&[], &[("PROBE_TIMEOUT", "99999999999999999999s")], "99999999999999999999s"),
        (&["-u", "4294967295"], &[], "--proxy-uid"),
        (&["-g", "4294967295"], &[], "--proxy-gid"),
        (&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "4294967295")], "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"),
        (&["-m", "TPROXY", "-t", "0"], &[], "--istio-inbound-tproxy-mark"),
        (&["-m", "TPROXY", "-r", "254"], &[], "--istio-inbound-tproxy-route-table"),
        (&["-m", "TPROXY", "-r", "0"], &[], "--istio-inbound-tproxy-route-table"),
        (&["-i", "*,junk"], &[], "--istio-service-cidr"),
        (&["-i", "10.0.0.0/8,*"], &[], "--istio-service-cidr"),
    ];
    for backend in [IPTABLES, NATIVE] {
        for (args, env, named) in cases {
            let out = tool(&pod, &[SEED, backend, args].concat(), env);
            assert_eq!(out.status.code(), Some(2), "{backend:?} {args:?} {env:?}: {}", stderr(&out));
            assert!(stderr(&out).contains(named), "{args:?} {env:?} should name {named}: {}", stderr(&out));
        }
    }
    assert!(!has_iptables_capture(&pod) && !has_nftables_capture(&pod), "nothing programmed");
    assert!(!routing(&pod).contains("fwmark"), "no policy routing either");
}

// Item 5: cleanup finds what an earlier run added by what it is, not by the flags repeated.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn cleanup_removes_what_any_earlier_run_added_whatever_flags_it_gets() {
    require_netns!();
    #[rustfmt::skip]
    let runs: [(&[&str], &[&str]); 3] = [
        (&["-i", "*", "-b", "*", "-m", "TPROXY", "--dual-stack"], &["-m", "TPROXY", "--cleanup-only"]),
        (&["-i", "*", "-b", "*", "-m", "TPROXY", "-t", "7", "-r", "70", "-c", "eth9", "-k", "eth8", "--redirect-dns",
           "--capture-all-dns", "--drop-invalid", "--dual-stack", "-u", "1337,1338"], &["--cleanup-only"]),
        (&["-i", "*", "-b", "80", "-m", "TPROXY", "-t", "16", "-r", "1000", "--dual-stack"],
         &["-m", "TPROXY", "-t", "1337", "-r", "133", "--cleanup-only"]),
    ];
    for backend in [IPTABLES, NATIVE] {
        for (apply, cleanup) in runs {
            let pod = dual_stack_pod();
            let before = capture_state(&pod);
            let apply = args(&[&SEED[..6], apply, backend]);
            assert_ok(&tool(&pod, &strs(&apply), &[]));
            assert!(routing(&pod).contains("fwmark"), "{backend:?} {apply:?}: TPROXY routing in place");
            let out = tool(&pod, &[cleanup, backend].concat(), &[]);
            assert_ok(&out);
            assert_eq!(capture_state(&pod), before, "{backend:?}: {apply:?} then {cleanup:?}");
        }
    }
}

// Item 6: iptables-nft tables and base chains the tool created go with the capture.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn iptables_cleanup_leaves_no_table_or_base_chain_it_created() {
    require_netns!();
    let full = [SEED, &["-m", "TPROXY", "--redirect-dns", "--capture-all-dns", "--drop-invalid"]].concat();
    let foreign: [&str; 3] = [
        "",
        "iptables-nft -t nat -A PREROUTING -p tcp --dport 9 -j ACCEPT",
        "iptables-nft -t mangle -P PREROUTING DROP && ip6tables-nft -t raw -A OUTPUT -j ACCEPT",
    ];
    for setup in foreign {
        let pod = Pod::with_address("fd00:44::5/64");
        if !setup.is_empty() {
            pod.sh(setup);
        }
        let before = pod.nft_ruleset();
        assert_ok(&tool(&pod, &full, &[]));
        assert_ok(&tool(&pod, &["--cleanup-only"], &[]));
        assert_eq!(pod.nft_ruleset(), before, "after `{setup}`");
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn reconcile_and_rollback_leave_no_table_or_base_chain_they_no_longer_need() {
    require_netns!();
    // A table a reconcile no longer needs goes (mangle, from TPROXY to REDIRECT).
    let pod = Pod::with_address("10.44.0.5/24");
    assert_ok(&tool(&pod, &[SEED, &["-m", "TPROXY"]].concat(), &[]));
    assert!(pod.nft_ruleset().contains("table ip mangle"));
    assert_ok(&tool(&pod, &[SEED, &["--reconcile"]].concat(), &[]));
    assert!(!pod.nft_ruleset().contains("table ip mangle"), "{}", pod.nft_ruleset());

    // And so do those a rolled-back run had made: here the IPv6 restore is refused.
    let pod = Pod::with_address("fd00:44::5/64");
    let before = pod.nft_ruleset();
    let refusing = RefusingIp6tablesRestore::new();
    let path = format!("PATH={}", refusing.path());
    let full = [SEED, &["-m", "TPROXY", "--redirect-dns", "--capture-all-dns", "--drop-invalid"]].concat();
    let out = pod.cmd("env").arg(path).arg(release_bin("istio-iptables")).args(&full).output().unwrap();
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    assert_eq!(pod.nft_ruleset(), before, "the IPv4 tables the rolled-back run made are gone");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn cni_del_leaves_no_table_or_base_chain_the_add_created() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let before = pod.nft_ruleset();
    // No pod annotations are passed here, so the entry opts into capturing every pod.
    let conf = r#"{"cniVersion":"1.0.0","name":"capnet","type":"istio-capture-cni","captureAllPods":true,"capture":{"interceptionMode":"TPROXY","redirectDNS":true,"dropInvalid":true},"prevResult":{"cniVersion":"1.0.0"}}"#;
    // Run from this test's namespace, as a runtime runs plugins from the node's: the plugin refuses
    // its own namespace.
    for command in ["ADD", "DEL"] {
        let mut child = Command::new(release_bin("istio-capture-cni"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("container-{}", pod.name))
            .env("CNI_NETNS", pod.ns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{command}: {}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        if command == "ADD" {
            assert!(has_iptables_capture(&pod), "ADD programmed the iptables backend");
        }
    }
    assert_eq!(pod.nft_ruleset(), before);
}

/// A process in the pod's network namespace with a mount namespace of its own, whose
/// /etc/resolv.conf holds `resolv_conf`: a pod's container, as far as the tool can tell.
struct Container {
    process: Child,
    _resolv_conf: TempFile,
}

impl Container {
    fn start(pod: &Pod, resolv_conf: &[u8]) -> Container {
        let file = TempFile::new(resolv_conf);
        let mut cmd = pod.cmd("unshare");
        cmd.args(["--mount", "sh", "-c", "mount --bind \"$0\" /etc/resolv.conf && exec sleep infinity", file.path()]);
        let process = cmd.stdin(Stdio::null()).spawn().unwrap();
        let container = Container { process, _resolv_conf: file };
        let seen = format!("/proc/{}/root/etc/resolv.conf", container.process.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read(&seen).ok().as_deref() != Some(resolv_conf) {
            assert!(Instant::now() < deadline, "the container never got its resolv.conf");
            std::thread::sleep(Duration::from_millis(10));
        }
        container
    }

    fn ns_path(&self) -> String {
        format!("/proc/{}/ns/net", self.process.id())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

// Item 7: from outside the pod, the tool must not capture the caller's nameservers.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn redirect_dns_through_a_namespace_path_uses_the_pods_resolv_conf_or_is_refused() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let bystander = Pod::new();
    let from_outside = |namespace: &str, extra: &[&str]| {
        let mut cmd = bystander.cmd(release_bin("istio-iptables"));
        cmd.args(SEED).args(["--network-namespace", namespace, "--redirect-dns"]).args(extra);
        cmd.output().unwrap()
    };
    // A bind-mounted namespace leads to no process, so to no resolv.conf of the pod's.
    let bind_mount = format!("/var/run/netns/{}", pod.name);
    let out = from_outside(&bind_mount, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--capture-all-dns") && stderr(&out).contains("--network-namespace"), "{}", stderr(&out));
    assert!(!has_iptables_capture(&pod));
    assert_ok(&from_outside(&bind_mount, &["--capture-all-dns"]));
    assert!(pod.rules(false).iter().any(|r| r == "-A ISTIO_OUTPUT_DNS -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053"));
    assert_ok(&tool(&pod, &["--cleanup-only"], &[]));

    // A process's namespace leads to its root, where the pod's own resolv.conf is.
    let container = Container::start(&pod, b"nameserver 10.96.7.7\n");
    assert_ok(&from_outside(&container.ns_path(), &[]));
    let dns: Vec<String> =
        pod.rules(false).into_iter().filter(|r| r.starts_with("-A ISTIO_OUTPUT_DNS ") && r.contains(" tcp ")).collect();
    assert_eq!(dns, ["-A ISTIO_OUTPUT_DNS -d 10.96.7.7/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053"]);
}

// Item 8: resolv.conf is bytes, as libc reads it; no nameserver at all is said, as Istio says it.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn resolv_conf_is_read_as_bytes_and_one_without_nameservers_is_reported() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let run = [SEED, &["--redirect-dns"]].concat();
    let out = tool_with_resolv_conf(&pod, b"# r\xe9sum\xe9 of the cluster's DNS\nnameserver 10.96.0.10\n", &run);
    assert_ok(&out);
    assert!(pod.rules(false).iter().any(|r| r.contains("-d 10.96.0.10/32")), "{:#?}", pod.rules(false));

    let pod = Pod::with_address("10.44.0.5/24");
    let out = tool_with_resolv_conf(&pod, b"search cluster.local\noptions ndots:5\n", &run);
    assert_ok(&out);
    assert!(stderr(&out).contains("no DNS servers") && stderr(&out).contains("DNS capture disabled"), "{}", stderr(&out));
    assert!(!pod.rules(false).iter().any(|r| r.contains("ISTIO_OUTPUT_DNS")));
}

/// A directory holding only `ip`, for a PATH without any iptables binary.
fn path_without_iptables() -> TempDir {
    let dir = TempDir::new();
    let ip = String::from_utf8(run_ok(Command::new("sh").args(["-c", "command -v ip"])).stdout).unwrap();
    std::os::unix::fs::symlink(ip.trim(), dir.0.join("ip")).unwrap();
    dir
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("capt-dir"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// Item 9: a failure that changed nothing says so, and what to do.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_failed_run_that_changed_nothing_says_so_and_what_to_do() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let before = capture_state(&pod);
    let no_iptables = path_without_iptables();
    let mut cmd = pod.cmd("env");
    cmd.arg(format!("PATH={}", no_iptables.0.display())).arg(release_bin("istio-iptables"));
    let out = cmd.args(SEED).args(["-m", "TPROXY"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("nothing was changed") && message.contains("--native-nftables"), "{message}");
    assert!(!message.contains("rolling back also failed"), "{message}");
    assert_eq!(capture_state(&pod), before);

    // Legacy iptables locks /run/xtables.lock, which a read-only root cannot hold.
    let script = "mount -t tmpfs -o ro tmpfs /run && exec \"$@\"";
    let mut cmd = pod.cmd("unshare");
    cmd.args(["--mount", "sh", "-c", script, "sh"]).arg(release_bin("istio-iptables")).args(SEED);
    let out = cmd.env("FORCE_IPTABLES_BINARY", "legacy").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("/run/xtables.lock") && message.contains("nothing was changed"), "{message}");
    assert!(message.contains("XTABLES_LOCKFILE") && message.contains("mount"), "the fix is named: {message}");
    assert!(!message.contains("rolling back also failed"), "{message}");
    assert_eq!(capture_state(&pod), before);
}

// Item 10: one capture per namespace, whichever backend made it.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_capture_by_the_other_backend_is_refused_replaced_with_reconcile_and_cleaned_up() {
    require_netns!();
    let present = [has_iptables_capture, has_nftables_capture];
    for (first, second) in [(0, 1), (1, 0)] {
        let backends = [IPTABLES, NATIVE];
        let pod = Pod::with_address("10.44.0.5/24");
        assert_ok(&tool(&pod, &[SEED, backends[first]].concat(), &[]));
        let state = capture_state(&pod);
        let out = tool(&pod, &[SEED, backends[second]].concat(), &[]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("--reconcile"), "{}", stderr(&out));
        assert_eq!(capture_state(&pod), state, "a refused run changes nothing");

        assert_ok(&tool(&pod, &[SEED, backends[second], &["--reconcile"]].concat(), &[]));
        assert!(present[second](&pod) && !present[first](&pod), "replaced: {}", capture_state(&pod));
        assert_ok(&tool(&pod, &[SEED, backends[second]].concat(), &[]));
    }

    // Both at once (as an earlier version could leave them): either cleanup removes both.
    for backend in [IPTABLES, NATIVE] {
        let pod = Pod::with_address("10.44.0.5/24");
        let before = capture_state(&pod);
        let script = String::from_utf8(tool(&pod, &[SEED, NATIVE, &["--dry-run"]].concat(), &[]).stdout).unwrap();
        let file = TempFile::new(script.as_bytes());
        assert_ok(&tool(&pod, SEED, &[]));
        run_ok(pod.cmd("nft").args(["-f", file.path()]));
        assert!(has_iptables_capture(&pod) && has_nftables_capture(&pod));
        assert_ok(&tool(&pod, &[backend, &["--cleanup-only"]].concat(), &[]));
        assert_eq!(capture_state(&pod), before, "{backend:?}");
    }
}
