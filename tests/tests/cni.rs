//! `istio-capture-cni` driven exactly as a container runtime drives a plugin chain: `CNI_*`
//! variables, the configuration on stdin, and the previous plugin's result as `prevResult`.
//! The chain starts with Debian's real `bridge` + `host-local` plugins, run in a "node"
//! namespace we make, so pods get their eth0 and address as on a real node. Like podman's CNI
//! backend, this runtime passes no pod annotations, so our entry opts into capturing all pods
//! (`captureAllPods`):
//!
//! ```text
//! node namespace: bridge capbr0 ── veth ── pod   10.77.0.x (capture, capture-proxy, app :8080)
//!                                └─ veth ── client 10.77.0.y
//! ```

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use capture_tests::{release_bin, require_netns, run_ok, unique, Pod, SEED_ARGS};
use serde_json::{json, Value};

const PLUGIN_DIR: &str = "/usr/lib/cni";
const APP_PORT: u16 = 8080;
/// A namespace path that does not exist: a run that tried to enter it would fail with code 4.
const NEVER_ENTERED: &str = "/var/run/netns/never-entered";

/// A node: a namespace holding the bridge, and host-local's address store.
struct Node {
    ns: Pod,
    ipam_dir: PathBuf,
}

impl Node {
    fn new() -> Node {
        let ipam_dir = std::env::temp_dir().join(unique("cni-ipam"));
        Node { ns: Pod::new(), ipam_dir }
    }

    fn bridge_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "capnet", "type": "bridge", "bridge": "capbr0",
            "ipam": { "type": "host-local", "subnet": "10.77.0.0/24", "dataDir": self.ipam_dir }
        })
    }

    /// Runs a plugin from the node's namespace as a runtime would.
    fn exec(&self, plugin: &Path, command: &str, pod: &Pod, conf: &Value, args: &str) -> Output {
        let mut cmd = self.runtime_cmd(plugin, command, &format!("/var/run/netns/{}", pod.name), args);
        cmd.env("CNI_CONTAINERID", format!("container-{}", pod.name));
        piped(&mut cmd, conf)
    }

    /// The command a runtime runs, in the node's namespace, for a container whose namespace is `netns`.
    fn runtime_cmd(&self, plugin: &Path, command: &str, netns: &str, args: &str) -> Command {
        let mut cmd = self.ns.cmd(plugin);
        cmd.env_clear()
            .env("PATH", host_path())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "container-1")
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", PLUGIN_DIR)
            .env("CNI_ARGS", args);
        cmd
    }

    /// ADD of the bridge plugin alone; returns its result.
    fn add_bridge(&self, pod: &Pod) -> Value {
        let out = self.exec(&Path::new(PLUGIN_DIR).join("bridge"), "ADD", pod, &self.bridge_conf(), "");
        assert!(out.status.success(), "bridge ADD failed: {}{}", text(&out.stdout), text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("bridge result")
    }

    /// Our plugin, configured as the second plugin of the `capnet` list, capturing every pod.
    fn capture(&self, command: &str, pod: &Pod, capture: Value, prev_result: Option<&Value>, args: &str) -> Output {
        let mut conf = json!({ "cniVersion": "1.0.0", "name": "capnet", "type": "istio-capture-cni", "captureAllPods": true,
                               "capture": capture });
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        self.exec(&release_bin("istio-capture-cni"), command, pod, &conf, args)
    }
}

/// A node with one pod on its bridge; returns the bridge's result too.
fn node_with_pod() -> (Node, Pod, Value) {
    let node = Node::new();
    let pod = Pod::new();
    let prev = node.add_bridge(&pod);
    (node, pod, prev)
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ipam_dir);
    }
}

/// The variant the host's `iptables` is (Debian's update-alternatives), for the iptables
/// backend: the plugin then programs the rules where this test's `iptables` commands look.
fn host_iptables_variant() -> &'static str {
    let version = run_ok(Command::new("iptables").arg("--version"));
    if text(&version.stdout).contains("legacy") {
        "legacy"
    } else {
        "nft"
    }
}

/// Runtimes run plugins with their own PATH; the iptables backend needs it.
fn host_path() -> String {
    std::env::var("PATH").unwrap_or_default()
}

fn piped(cmd: &mut Command, stdin: &Value) -> Output {
    piped_text(cmd, &stdin.to_string())
}

fn piped_text(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The CNI error object a failed invocation printed, after checking it failed.
fn cni_error(out: &Output) -> Value {
    assert!(!out.status.success(), "expected a failure, got {}", text(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no error JSON ({e}): {}", text(&out.stdout)))
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "plugin failed: {}{}", text(&out.stdout), text(&out.stderr));
}

fn pod_ip(result: &Value) -> IpAddr {
    let address = result["ips"][0]["address"].as_str().expect("an address in the bridge result");
    address.split('/').next().unwrap().parse().unwrap()
}

/// capture-proxy in the pod, as the sidecar's uid 1337.
fn start_proxy(pod: &Pod, log: &Path) -> Child {
    let mut cmd = pod.cmd("setpriv");
    cmd.args(["--reuid=1337", "--regid=1337", "--clear-groups"]).arg(release_bin("capture-proxy"));
    let log = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().expect("start capture-proxy")
}

fn wait_ready(pod: &Pod, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 15021)), Duration::from_secs(1))?;
        stream.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"))
    };
    while !pod.enter(|| ready().unwrap_or(false)) {
        assert!(
            Instant::now() < deadline,
            "capture-proxy never became ready:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn add_captures_pod_traffic_through_the_proxy_and_del_cleans_up() {
    require_netns!();
    let node = Node::new();
    let (pod, client) = (Pod::new(), Pod::new());
    let bridge_result = node.add_bridge(&pod);
    node.add_bridge(&client);

    let capture = json!({ "nativeNftables": true });
    let out = node.capture(
        "ADD",
        &pod,
        capture.clone(),
        Some(&bridge_result),
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;IgnoreUnknown=1",
    );
    assert_ok(&out);
    let result: Value = serde_json::from_slice(&out.stdout).expect("ADD prints a result");
    assert_eq!(result, bridge_result, "a chained plugin passes the previous result through unchanged");
    let ruleset = pod.nft_ruleset();
    assert!(ruleset.contains("table inet istio-proxy-nat"), "{ruleset}");
    assert!(ruleset.contains("redirect to :15006"), "{ruleset}");

    // The app answers with the address it sees the connection come from.
    let app = pod.enter(|| TcpListener::bind(("0.0.0.0", APP_PORT)).unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = app.accept().unwrap();
        conn.write_all(peer.ip().to_string().as_bytes()).unwrap();
    });
    let log = std::env::temp_dir().join(format!("{}-capture-proxy.log", pod.name));
    let mut proxy = start_proxy(&pod, &log);
    wait_ready(&pod, &log);
    let target = SocketAddr::new(pod_ip(&bridge_result), APP_PORT);
    let seen = client.enter(|| {
        let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect to the pod");
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut seen = String::new();
        conn.read_to_string(&mut seen).unwrap();
        seen
    });
    server.join().unwrap();
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!(seen, "127.0.0.6", "the app must see the proxy's inbound passthrough source");

    assert_ok(&node.capture("DEL", &pod, capture.clone(), Some(&bridge_result), ""));
    let ruleset = pod.nft_ruleset();
    assert!(!ruleset.contains("istio"), "DEL left rules behind:\n{ruleset}");
    assert_ok(&node.capture("DEL", &pod, capture, Some(&bridge_result), ""));
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn check_fails_before_add_passes_after_and_sees_drift() {
    require_netns!();
    let (node, pod, prev) = node_with_pod();
    let capture = json!({ "excludeInboundPorts": "8081", "forceIptablesBinary": host_iptables_variant() });

    let before = cni_error(&node.capture("CHECK", &pod, capture.clone(), Some(&prev), ""));
    assert_eq!(before["code"], 999);
    assert!(before["msg"].as_str().unwrap().contains("chain missing: IPv4 table nat, chain ISTIO_INBOUND\n"), "{before}");

    assert_ok(&node.capture("ADD", &pod, capture.clone(), Some(&prev), ""));
    let nat = pod.rules(false);
    assert!(nat.iter().any(|r| r == "-A ISTIO_INBOUND -p tcp -m tcp --dport 8081 -j RETURN"), "{nat:?}");
    assert!(nat.iter().any(|r| r == "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN"), "Istio CNI's exclusions: {nat:?}");
    let out = node.capture("CHECK", &pod, capture.clone(), Some(&prev), "");
    assert_ok(&out);
    assert!(out.stdout.is_empty(), "CHECK prints nothing on success");

    pod.sh("iptables-nft -t nat -A ISTIO_OUTPUT -p tcp --dport 1 -j RETURN");
    let drift = cni_error(&node.capture("CHECK", &pod, capture, Some(&prev), ""));
    let unexpected = "unexpected rule: IPv4 table nat, chain ISTIO_OUTPUT, rule 12\n    \
                      found:    -A ISTIO_OUTPUT -p tcp -m tcp --dport 1 -j RETURN";
    assert!(drift["msg"].as_str().unwrap().contains(unexpected), "{drift}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn del_is_idempotent_and_tolerates_a_missing_namespace() {
    require_netns!();
    let (node, pod, prev) = node_with_pod();
    let capture = json!({ "interceptionMode": "TPROXY", "forceIptablesBinary": host_iptables_variant() });
    assert_ok(&node.capture("ADD", &pod, capture.clone(), Some(&prev), ""));
    assert!(!pod.rules(false).is_empty());
    assert!(pod.sh("ip rule show").contains("lookup 133"));

    assert_ok(&node.capture("DEL", &pod, capture.clone(), Some(&prev), ""));
    let left = pod.iptables_save(false);
    assert!(!left.contains("ISTIO"), "DEL left rules behind:\n{left}");
    assert!(!pod.sh("ip rule show").contains("lookup 133"), "DEL left the TPROXY rule");
    assert_ok(&node.capture("DEL", &pod, capture.clone(), Some(&prev), ""));

    let gone = Pod::new();
    let name = gone.name.clone();
    drop(gone);
    assert!(!Path::new("/var/run/netns").join(&name).exists());
    let mut cmd = node.ns.cmd(release_bin("istio-capture-cni"));
    cmd.env_clear()
        .env("PATH", host_path())
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", "gone")
        .env("CNI_NETNS", format!("/var/run/netns/{name}"))
        .env("CNI_IFNAME", "eth0");
    assert_ok(&piped(&mut cmd, &json!({ "cniVersion": "1.0.0", "name": "capnet", "type": "istio-capture-cni" })));
    cmd.env_remove("CNI_NETNS");
    assert_ok(&piped(&mut cmd, &json!({ "cniVersion": "1.0.0", "name": "capnet", "type": "istio-capture-cni" })));
}

/// Configurations the plugin refuses, as the runtime hands them over: a bad value, an unknown
/// capture key, a capture key outside `capture` (each code 7 naming the key), a `capture` and a
/// `runtimeConfig` that are no objects (code 7), and undecodable JSON (code 6).
const BROKEN_CONFS: [(&str, u32, &str); 6] = [
    (r#"{"cniVersion":"1.0.0","name":"capnet","type":"istio-capture-cni","capture":{"proxyPort":"70000"}}"#, 7, "proxyPort"),
    (r#"{"cniVersion":"1.0.0","name":"capnet","type":"istio-capture-cni","capture":{"inboundPort":"80"}}"#, 7, "inboundPort"),
    (r#"{"cniVersion":"1.0.0","name":"capnet","type":"istio-capture-cni","proxyUID":"1337"}"#, 7, "proxyUID"),
    (r#"{"cniVersion":"1.0.0","name":"capnet","type":"istio-capture-cni","capture":["nativeNftables"]}"#, 7, "capture"),
    (r#"{"cniVersion":"0.4.0","name":"capnet","type":"istio-capture-cni","runtimeConfig":"x"}"#, 7, "runtimeConfig"),
    (r#"{"cniVersion":"1.0.0","name":"capnet","type":"istio-capture-cni","capture":{"#, 6, "decode"),
];

/// DEL reads no configuration: with any of the broken ones above (which ADD refuses) it still
/// removes the capture an earlier, good configuration programmed, whichever backend, mode and form,
/// and succeeds, so that the runtime goes on to tear down the rest of the chain.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn del_with_a_broken_configuration_removes_the_capture_and_succeeds() {
    require_netns!();
    let (node, pod, prev) = node_with_pod();
    // TPROXY routing of other marks and tables than Istio's too: DEL cannot know them.
    let good = [
        json!({ "nativeNftables": true, "redirectDNS": true }),
        json!({ "interceptionMode": "TPROXY", "forceIptablesBinary": host_iptables_variant() }),
        json!({ "interceptionMode": "TPROXY", "tproxyMark": "1338", "tproxyRouteTable": "134", "nativeNftables": true }),
        // The set form: nftables sets go with our tables, ip sets are found by their names.
        json!({ "useIPSets": true, "excludeOutboundIPRanges": "10.0.0.0/8,192.168.0.0/16", "excludeOutboundPorts": "9000,9001",
                "forceIptablesBinary": host_iptables_variant() }),
        json!({ "useIPSets": true, "excludeOutboundIPRanges": "10.0.0.0/8", "nativeNftables": true }),
    ];
    for (i, (broken, code, key)) in BROKEN_CONFS.into_iter().enumerate() {
        let netns = format!("/var/run/netns/{}", pod.name);
        let refused = cni_error(&piped_text(&mut node.runtime_cmd(&release_bin("istio-capture-cni"), "ADD", &netns, ""), broken));
        assert_eq!(refused["code"], code, "ADD {broken}: {refused}");
        assert!(refused["msg"].as_str().unwrap().contains(key), "ADD {broken}: {refused}");

        let capture = good[i % good.len()].clone();
        assert_ok(&node.capture("ADD", &pod, capture.clone(), Some(&prev), ""));
        assert!(!pod.nft_ruleset().is_empty() || !pod.rules(false).is_empty(), "{capture} programmed nothing");
        assert_ok(&piped_text(&mut node.runtime_cmd(&release_bin("istio-capture-cni"), "DEL", &netns, ""), broken));
        let ruleset = pod.nft_ruleset();
        assert!(!ruleset.to_lowercase().contains("istio"), "DEL with {broken} left nftables rules:\n{ruleset}");
        assert!(pod.rules(false).iter().all(|r| !r.contains("ISTIO")), "DEL with {broken} left {:?}", pod.rules(false));
        let routing = pod.sh("ip rule show; ip route show table all");
        assert!(!routing.contains("lookup 13") && !routing.contains("table 13"), "DEL with {broken} left:\n{routing}");
        assert_eq!(pod.sh("ipset list -n"), "", "DEL with {broken} left ip sets after {capture}");
    }
}

/// `CNI_NETNS` naming the plugin's own namespace (the node's), by any path: ADD and CHECK refuse
/// it with code 7 before touching anything; DEL leaves it alone and succeeds (refusing would stop
/// the runtime's teardown of the chain, and nothing there is ours: ADD never programs it). The
/// node's own capture-like rules (istio-iptables run on the node) are untouched throughout.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_node_namespace_is_refused_by_add_and_check_and_left_alone_by_del() {
    require_netns!();
    let node = Node { ns: Pod::with_address("10.76.0.1/24"), ipam_dir: std::env::temp_dir().join(unique("cni-ipam")) };
    run_ok(node.ns.cmd(release_bin("istio-iptables")).args(SEED_ARGS).arg("--native-nftables"));
    let state = || (node.ns.nft_ruleset(), node.ns.iptables_save(false), node.ns.sh("ip rule show; ip route show table all"));
    let before = state();
    assert!(before.0.contains("istio-proxy-nat"), "{}", before.0);
    let conf =
        json!({ "cniVersion": "1.0.0", "name": "capnet", "type": "istio-capture-cni", "capture": { "nativeNftables": true } });
    let plugin = release_bin("istio-capture-cni");
    let paths =
        [format!("/var/run/netns/{}", node.ns.name), format!("/proc/{}/ns/net", node.ns.pid()), "/proc/self/ns/net".into()];
    for netns in &paths {
        for command in ["ADD", "CHECK"] {
            let refused = cni_error(&piped(&mut node.runtime_cmd(&plugin, command, netns, ""), &conf));
            assert_eq!(refused["code"], 7, "{command} {netns}: {refused}");
            assert!(refused["msg"].as_str().unwrap().contains("own network namespace, the node's"), "{refused}");
        }
        let del = piped(&mut node.runtime_cmd(&plugin, "DEL", netns, ""), &conf);
        assert_ok(&del);
        assert!(text(&del.stderr).contains("the node's own network namespace: left alone"), "{}", text(&del.stderr));
    }
    assert!(state() == before, "the node's namespace was changed");
}

/// Another run holding the namespace (its lock, an flock on the namespace itself) makes ADD
/// answer "try again later" once the plugin's wait (10 s) is over.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_busy_namespace_is_try_again_later() {
    require_netns!();
    let (node, pod, prev) = node_with_pod();
    let namespace = std::fs::File::open(pod.ns_path()).unwrap();
    let _held = nix::fcntl::Flock::lock(namespace, nix::fcntl::FlockArg::LockExclusiveNonblock).expect("lock");
    let busy = cni_error(&node.capture("ADD", &pod, json!({ "nativeNftables": true }), Some(&prev), ""));
    assert_eq!(busy["code"], 11, "{busy}");
    assert!(!pod.nft_ruleset().contains("istio"), "nothing may be changed while another run holds the lock");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn excluded_namespaces_are_left_alone() {
    require_netns!();
    let (node, pod, prev) = node_with_pod();
    let conf = json!({ "cniVersion": "1.0.0", "name": "capnet", "type": "istio-capture-cni",
                       "excludeNamespaces": ["kube-system"], "captureAllPods": true, "prevResult": prev });
    let out = node.exec(&release_bin("istio-capture-cni"), "ADD", &pod, &conf, "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system");
    assert_ok(&out);
    assert!(text(&out.stderr).contains(r#"not captured: its namespace "kube-system" is excluded"#), "{}", text(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), prev);
    assert!(pod.rules(false).is_empty(), "{:?}", pod.rules(false));
    let ruleset = pod.nft_ruleset();
    assert!(!ruleset.to_lowercase().contains("istio"), "{ruleset}");
}

/// Without pod annotations from the runtime (as here, and under podman), a pod is captured only
/// when the node's entry opts in with `captureAllPods`: otherwise a pod without a proxy would
/// have its traffic sent to ports where nothing listens. The reason is in the runtime's log
/// (stderr), unless Istio's `plugin_log_level` silences it.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn without_annotations_a_pod_is_captured_only_when_the_node_opts_in() {
    require_netns!();
    let (node, pod, prev) = node_with_pod();
    let mut conf = json!({ "cniVersion": "1.0.0", "name": "capnet", "type": "istio-capture-cni",
                           "capture": { "nativeNftables": true }, "prevResult": prev });
    let out = node.exec(&release_bin("istio-capture-cni"), "ADD", &pod, &conf, "");
    assert_ok(&out);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), prev, "the previous result, passed on");
    assert_eq!(pod.nft_ruleset(), "", "a pod that may have no proxy was captured");
    assert!(text(&out.stderr).contains("not captured: the runtime passed no pod annotations"), "{}", text(&out.stderr));
    conf["plugin_log_level"] = json!("error");
    let quiet = node.exec(&release_bin("istio-capture-cni"), "ADD", &pod, &conf, "");
    assert_ok(&quiet);
    assert_eq!(text(&quiet.stderr), "", "plugin_log_level error logs no skipped pod");

    conf["captureAllPods"] = json!(true);
    assert_ok(&node.exec(&release_bin("istio-capture-cni"), "ADD", &pod, &conf, ""));
    assert!(pod.nft_ruleset().contains("redirect to :15001"), "{}", pod.nft_ruleset());
}

/// A `prevResult` that is not an object is refused (code 7) before the pod's namespace is touched,
/// for ADD and CHECK alike: nothing is programmed and no result is made up.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_prev_result_that_is_not_an_object_is_refused_before_the_pod_is_touched() {
    require_netns!();
    let (node, pod, _) = node_with_pod();
    let untouched = (pod.iptables_save(false), pod.iptables_save(true), pod.nft_ruleset());
    for (command, prev) in
        [("ADD", json!("x")), ("ADD", json!(7)), ("ADD", json!([{}])), ("ADD", json!(null)), ("CHECK", json!("x"))]
    {
        let error = cni_error(&node.capture(command, &pod, json!({}), Some(&prev), ""));
        assert_eq!(error["code"], 7, "{command} with prevResult {prev}: {error}");
        assert!(error["msg"].as_str().unwrap().contains(&format!("prevResult: {prev} is not an object")), "{error}");
    }
    assert!(untouched == (pod.iptables_save(false), pod.iptables_save(true), pod.nft_ruleset()), "the pod was changed");
}

/// Other keys and `CNI_ARGS` values of the wrong type are refused, not ignored, before the namespace is
/// entered.
#[test]
fn a_runtime_config_or_ignore_unknown_of_the_wrong_type_is_refused() {
    for runtime_config in [json!("x"), json!(["capture"]), json!(null)] {
        let conf = json!({ "cniVersion": "1.0.0", "name": "n", "runtimeConfig": runtime_config }).to_string();
        let error = cni_error(&plugin("ADD", Some(NEVER_ENTERED), &conf));
        assert_eq!(error["code"], 7, "{error}");
        assert!(error["msg"].as_str().unwrap().contains(&format!("runtimeConfig: {runtime_config} is not an object")));
    }
    for value in ["yes", "", "2"] {
        let conf = r#"{"cniVersion":"1.0.0","name":"n"}"#;
        let error = cni_error(&plugin_with_args("ADD", Some(NEVER_ENTERED), &format!("IgnoreUnknown={value}"), conf));
        assert_eq!(error["code"], 4, "IgnoreUnknown={value}: {error}");
        assert!(error["msg"].as_str().unwrap().contains("IgnoreUnknown"), "{error}");
    }
}

/// Runs the plugin with no namespace work: these fail (or answer) before touching one.
fn plugin(command: &str, netns: Option<&str>, stdin: &str) -> Output {
    plugin_with_args(command, netns, "", stdin)
}

/// [`plugin`] with `CNI_ARGS`.
fn plugin_with_args(command: &str, netns: Option<&str>, args: &str, stdin: &str) -> Output {
    let mut cmd = Command::new(release_bin("istio-capture-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", PLUGIN_DIR)
        .env("CNI_ARGS", args);
    if let Some(netns) = netns {
        cmd.env("CNI_NETNS", netns);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn version_lists_the_supported_versions() {
    let out = plugin("VERSION", None, r#"{"cniVersion":"1.0.0"}"#);
    assert_ok(&out);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
    assert_eq!(info["cniVersion"], "1.0.0");
}

#[test]
fn bad_input_gives_cni_errors_with_the_spec_codes() {
    let netns = Some(NEVER_ENTERED);
    let error = |command: &str, netns: Option<&str>, stdin: &str| cni_error(&plugin(command, netns, stdin));

    let decode = error("ADD", netns, "{not json");
    assert_eq!(decode["code"], 6, "{decode}");

    let bad_port = error(
        "ADD",
        netns,
        r#"{"cniVersion":"0.4.0","name":"n","type":"istio-capture-cni","capture":{"excludeInboundPorts":"80,99999"}}"#,
    );
    assert_eq!(bad_port["code"], 7, "{bad_port}");
    assert_eq!(bad_port["cniVersion"], "0.4.0");
    assert!(bad_port["msg"].as_str().unwrap().contains("excludeInboundPorts: \"99999\""), "{bad_port}");

    let unknown_key = error("ADD", netns, r#"{"cniVersion":"1.0.0","name":"n","capture":{"inboundPort":"80"}}"#);
    assert_eq!(unknown_key["code"], 7, "{unknown_key}");

    let version = error("ADD", netns, r#"{"cniVersion":"2.0.0","name":"n"}"#);
    assert_eq!(version["code"], 1, "{version}");

    let old_check = error("CHECK", netns, r#"{"cniVersion":"0.3.1","name":"n"}"#);
    assert_eq!(old_check["code"], 1, "{old_check}");

    let no_netns = error("ADD", None, r#"{"cniVersion":"1.0.0","name":"n"}"#);
    assert_eq!(no_netns["code"], 4, "{no_netns}");
    assert!(no_netns["msg"].as_str().unwrap().contains("CNI_NETNS"), "{no_netns}");

    let bad_args = cni_error(&plugin_with_args("ADD", netns, "SURPRISE=1", r#"{"cniVersion":"1.0.0","name":"n"}"#));
    assert_eq!(bad_args["code"], 4, "{bad_args}");
}

/// Run by people (no `CNI_COMMAND`), the plugin answers `--help` and `--version`; with
/// `CNI_COMMAND` set it is the plugin, whatever its arguments.
#[test]
fn help_and_version_are_answered_and_a_cni_command_still_wins() {
    let plugin = release_bin("istio-capture-cni");
    let help = text(&run_ok(Command::new(&plugin).env_remove("CNI_COMMAND").arg("--help")).stdout);
    for word in ["CNI_COMMAND", "install", "uninstall"] {
        assert!(help.contains(word), "--help does not mention {word}:\n{help}");
    }
    let version = text(&run_ok(Command::new(&plugin).env_remove("CNI_COMMAND").arg("--version")).stdout);
    assert!(version.starts_with(&format!("istio-capture-cni {}", env!("CARGO_PKG_VERSION"))), "{version}");
    assert!(version.contains("1.0.0"), "--version names the CNI versions: {version}");
    let install_help = text(&run_ok(Command::new(&plugin).args(["install", "--help"])).stdout);
    assert!(install_help.contains("--uninstall-on-exit"), "{install_help}");

    let as_plugin = Command::new(&plugin).env_clear().env("CNI_COMMAND", "VERSION").arg("--help").output().unwrap();
    assert_ok(&as_plugin);
    let info: Value = serde_json::from_slice(&as_plugin.stdout).expect("the CNI VERSION reply");
    assert_eq!(info["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
}

/// A node's primary CNI configuration, with keys in an order of its own and nested values.
const PRIMARY_CONFLIST: &str = r#"{"name":"capnet","cniVersion":"1.0.0","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.85.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}]}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

/// A node's CNI directories as the installer's container sees them, holding the primary CNI's
/// conflist and binary; removed on drop.
struct CniDirs {
    root: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
    list: PathBuf,
}

impl CniDirs {
    fn new() -> CniDirs {
        let root = std::env::temp_dir().join(unique("cni-install"));
        let (bin, conf) = (root.join("bin"), root.join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(bin.join("bridge"), "the primary CNI's plugin").unwrap();
        let list = conf.join("10-capnet.conflist");
        std::fs::write(&list, PRIMARY_CONFLIST).unwrap();
        CniDirs { root, bin, conf, list }
    }

    /// `istio-capture-cni SUBCOMMAND --cni-bin-dir ... --cni-conf-dir ...`
    fn installer(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(release_bin("istio-capture-cni"));
        cmd.arg(subcommand).arg("--cni-bin-dir").arg(&self.bin).arg("--cni-conf-dir").arg(&self.conf);
        cmd
    }

    fn list(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&self.list).unwrap()).unwrap()
    }

    /// The files of the bin directory, by name.
    fn binaries(&self) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(&self.bin).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// Whether the conflist is the primary CNI's again: the same JSON, keys in the same order.
    fn list_is_the_primary_one(&self) -> bool {
        // Compared as text: `Value`'s equality ignores the order of keys.
        let primary: Value = serde_json::from_str(PRIMARY_CONFLIST).unwrap();
        serde_json::to_string(&self.list()).unwrap() == serde_json::to_string(&primary).unwrap()
    }
}

impl Drop for CniDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn installer_ships_the_static_plugin_alone_and_chains_it() {
    let dirs = CniDirs::new();
    let first = run_ok(&mut dirs.installer("install"));
    assert!(text(&first.stderr).contains("chained istio-capture-cni"), "{}", text(&first.stderr));
    let second = run_ok(&mut dirs.installer("install"));
    assert!(text(&second.stderr).is_empty(), "a second install changes nothing: {}", text(&second.stderr));

    let plugins = dirs.list()["plugins"].as_array().unwrap().clone();
    let types: Vec<&Value> = plugins.iter().map(|p| &p["type"]).collect();
    assert_eq!(types, ["bridge", "portmap", "istio-capture-cni"]);
    assert_eq!(plugins[2]["capture"]["nativeNftables"], true);
    assert_eq!(plugins[2]["capabilities"], json!({ "io.kubernetes.cri.pod-annotations": true }), "runtimes pass annotations");

    // One static file: it runs on any node, whatever libraries the node has.
    assert_eq!(dirs.binaries(), ["bridge", "istio-capture-cni"]);
    let installed = dirs.bin.join("istio-capture-cni");
    let ldd = text(&run_ok(Command::new("ldd").arg(&installed)).stdout);
    assert!(ldd.contains("statically linked"), "the installed plugin is not static:\n{ldd}");
    let version = run_ok(Command::new(&installed).env_clear().env("CNI_COMMAND", "VERSION"));
    assert!(text(&version.stdout).contains("supportedVersions"));
}

/// The installer validates its entry with the plugin's own parser, as the runtime will hand it
/// over: what the plugin would refuse at every ADD is refused, naming the key, and nothing is
/// installed or chained.
#[test]
fn installer_refuses_an_entry_the_plugin_would_refuse_and_installs_nothing() {
    let dirs = CniDirs::new();
    let entries = [
        (json!({ "type": "istio-capture-cni", "capture": { "proxyPort": "70000" } }), "proxyPort: \"70000\""),
        (json!({ "type": "istio-capture-cni", "proxyPort": "15001" }), "unknown key \"proxyPort\""),
        (json!({ "type": "istio-capture-cni", "capture": { "inboundPort": "80" } }), "unknown setting \"inboundPort\""),
        (json!({ "type": "istio-capture-cni", "excludeNamespaces": "kube-system" }), "excludeNamespaces"),
        (json!({ "type": "istio-capture-cni", "capture": { "interceptionMode": "TPROXY", "tproxyMark": "0" } }), "tproxyMark"),
        // Istio's keys: ambient refused, a typo of one unknown, a bad value named.
        (json!({ "type": "istio-capture-cni", "ambient_enabled": true }), "ambient_enabled: true"),
        (json!({ "type": "istio-capture-cni", "exclude_namespace": ["kube-system"] }), "unknown key \"exclude_namespace\""),
        (json!({ "type": "istio-capture-cni", "kubernetes": { "kubeconfig": 7 } }), "kubernetes.kubeconfig: 7"),
        (json!({ "type": "istio-capture-cni", "plugin_log_level": "loud" }), "plugin_log_level: \"loud\""),
    ];
    let file = dirs.root.join("plugin.json");
    for (entry, named) in entries {
        std::fs::write(&file, entry.to_string()).unwrap();
        let out = dirs.installer("install").arg("--plugin-config").arg(&file).output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{entry}: {stderr}");
        assert!(stderr.contains(named) && stderr.contains("not installed"), "{entry}: {stderr}");
        assert_eq!(std::fs::read_to_string(&dirs.list).unwrap(), PRIMARY_CONFLIST, "{entry} was chained");
        assert_eq!(dirs.binaries(), ["bridge"], "{entry}: the plugin was installed");
    }
}

/// `uninstall` takes our entry out of every conflist (the rest keeps its meaning and key order)
/// and removes our binary, nothing else; a second run has nothing to do.
#[test]
fn uninstall_takes_out_our_entry_and_binary_and_leaves_the_rest() {
    let dirs = CniDirs::new();
    run_ok(&mut dirs.installer("install"));
    // A list our entry was chained into before another came first.
    let older = dirs.conf.join("20-older.conflist");
    let older_list = json!({ "cniVersion": "0.4.0", "name": "older",
                             "plugins": [{ "type": "ptp" }, { "type": "istio-capture-cni", "capture": {} }] });
    std::fs::write(&older, older_list.to_string()).unwrap();

    let out = run_ok(&mut dirs.installer("uninstall"));
    let said = text(&out.stderr);
    assert!(said.contains("removed istio-capture-cni from") && said.contains("20-older.conflist"), "{said}");
    assert!(dirs.list_is_the_primary_one(), "{}", dirs.list());
    let older_now: Value = serde_json::from_str(&std::fs::read_to_string(&older).unwrap()).unwrap();
    assert_eq!(older_now, json!({ "cniVersion": "0.4.0", "name": "older", "plugins": [{ "type": "ptp" }] }));
    assert_eq!(dirs.binaries(), ["bridge"]);

    let again = run_ok(&mut dirs.installer("uninstall"));
    assert!(again.stderr.is_empty(), "a second uninstall changes nothing: {}", text(&again.stderr));
}

/// The installer as a DaemonSet runs it: PID 1 of its own PID namespace (which gets no signal it
/// has no handler for), with `--watch`. SIGTERM ends it promptly; it says what it leaves in
/// place, or, with `--uninstall-on-exit`, uninstalls first.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_installer_as_pid_1_exits_on_sigterm_leaving_or_uninstalling() {
    require_netns!();
    for uninstall_on_exit in [false, true] {
        let dirs = CniDirs::new();
        let mut installer = dirs.installer("install");
        installer.args(["--watch", "1"]);
        if uninstall_on_exit {
            installer.arg("--uninstall-on-exit");
        }
        let mut unshare = Command::new("unshare");
        unshare.args(["--pid", "--fork"]).arg(installer.get_program()).args(installer.get_args());
        let mut child = unshare.stdin(Stdio::null()).stderr(Stdio::piped()).spawn().expect("unshare");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dirs.list()["plugins"].as_array().unwrap().iter().any(|p| p["type"] == "istio-capture-cni") {
            assert!(Instant::now() < deadline, "the installer never chained its entry");
            std::thread::sleep(Duration::from_millis(20));
        }
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap();
        let pid: i32 = children.split_whitespace().next().expect("unshare's child").parse().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap().to_string();
        assert!(nspid.ends_with("\t1"), "the installer is not PID 1 of its namespace: {nspid}");

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let exit = loop {
            if let Some(exit) = child.try_wait().unwrap() {
                break exit;
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                panic!("the installer ignored SIGTERM as PID 1");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut said = String::new();
        child.stderr.take().unwrap().read_to_string(&mut said).unwrap();
        assert!(exit.success(), "{exit}: {said}");
        assert!(said.contains("SIGTERM"), "{said}");
        if uninstall_on_exit {
            assert!(said.contains("removed istio-capture-cni from"), "{said}");
            assert!(dirs.list_is_the_primary_one(), "{}", dirs.list());
            assert_eq!(dirs.binaries(), ["bridge"]);
        } else {
            let left = said.lines().find(|l| l.contains("left in place")).unwrap_or_else(|| panic!("{said}"));
            assert!(left.contains(&dirs.bin.join("istio-capture-cni").display().to_string()), "{left}");
            assert!(left.contains(&dirs.list.display().to_string()), "{left}");
            assert_eq!(dirs.binaries(), ["bridge", "istio-capture-cni"]);
            assert!(!dirs.list_is_the_primary_one(), "the entry must stay");
        }
    }
}
