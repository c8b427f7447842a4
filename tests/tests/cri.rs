//! `istio-capture-cni` on a node run by containerd (Debian's), driven through containerd's CRI
//! service as a kubelet drives it: RunPodSandbox, PodSandboxStatus, StopPodSandbox and
//! RemovePodSandbox. The node's conflist is bridge + host-local + our plugin as
//! `istio-capture-cni install` chained it (its default entry: native nftables, kube-system
//! excluded, the capability through which containerd passes each pod's annotations); see
//! `capture_tests::containerd` for the node. The tests that want the default node share one
//! containerd; those that look at the whole node (nothing left by failed pods) or change its
//! configuration start their own.

use capture_tests::containerd::{Containerd, Footprint, RunningPod};
use capture_tests::cri::api::PodSandboxConfig;
use capture_tests::cri::{pod_sandbox_config, CriClient, INJECTED_STATUS, SIDECAR_STATUS};
use capture_tests::{release_bin, require_netns, run_ok, Pod};
use serde_json::json;

/// What the installer's default entry asks for, as istio-iptables flags: Istio CNI's defaults
/// (every inbound port and outbound range, 15020 excluded outbound; 15020, 15021 and 15090
/// always excluded inbound), with native nftables.
#[rustfmt::skip]
const DEFAULT_ENTRY_AS_FLAGS: &[&str] = &["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
    "-b", "*", "-d", "15020,15021,15090", "-o", "15020", "--native-nftables"];

/// A pod with these annotations.
fn annotated(name: &str, namespace: &str, annotations: &[(&str, &str)]) -> PodSandboxConfig {
    let mut config = pod_sandbox_config(name, namespace);
    config.annotations = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    config
}

/// A pod Istio's injector gave a sidecar, with these annotations besides.
fn injected(name: &str, namespace: &str, annotations: &[(&str, &str)]) -> PodSandboxConfig {
    let mut config = annotated(name, namespace, annotations);
    config.annotations.insert(SIDECAR_STATUS.into(), INJECTED_STATUS.into());
    config
}

fn run_pod(containerd: &Containerd, cri: &CriClient, config: &PodSandboxConfig) -> RunningPod {
    let metadata = config.metadata.as_ref().expect("metadata");
    let pod =
        containerd.run_pod(cri, config).unwrap_or_else(|e| panic!("RunPodSandbox {}/{}: {e}", metadata.namespace, metadata.name));
    assert!(pod.netns.starts_with(containerd.netns_dir()), "{pod:?}");
    pod
}

/// What a capture consists of in a namespace: the nftables ruleset, the policy routing rules
/// and TPROXY's route table (Istio's 133).
fn capture_state(pod: &Pod) -> String {
    // `ip` fails on a table that was never made.
    let routing = pod.sh("ip rule show; echo '--- table 133'; ip route show table 133 2>/dev/null || true");
    format!("{}--- rules\n{routing}", pod.nft_ruleset())
}

/// Nothing of a capture: no nftables or iptables rules, no policy routing but the kernel's.
fn assert_nothing_programmed(sandbox: &Pod, pod: &str) {
    assert_eq!(sandbox.nft_ruleset(), "", "{pod}");
    assert!(sandbox.rules(false).is_empty() && sandbox.rules(true).is_empty(), "{pod}: {:?}", sandbox.rules(false));
    let routing = sandbox.sh("ip rule show; ip route show table all");
    assert!(!routing.contains("fwmark") && !routing.contains("table 133"), "{pod}:\n{routing}");
}

/// The pod's namespace holds the address the chain gave it (so the chain did run there).
fn assert_has_address(sandbox: &Pod, pod: &RunningPod) {
    let addresses = sandbox.sh("ip -o addr show dev eth0");
    assert!(addresses.contains(&format!("inet {}/", pod.ip)), "{pod:?}: {addresses}");
}

/// Stops and removes the pod as a kubelet does; nothing of it may be left on the node.
fn stop_and_remove_leaving_nothing(containerd: &Containerd, cri: &CriClient, footprint: &Footprint) {
    let id = &footprint.pod.id;
    cri.stop_pod_sandbox(id).expect("StopPodSandbox");
    cri.remove_pod_sandbox(id).expect("RemovePodSandbox");
    assert_eq!(containerd.settled_leftovers(footprint), Vec::<String>::new());
    let listed = cri.list_pod_sandbox(None).expect("ListPodSandbox");
    assert!(listed.iter().all(|sandbox| &sandbox.id != id), "the removed sandbox is still listed");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_pod_is_captured_as_istio_iptables_does_and_clean_after_stop() {
    require_netns!();
    let containerd = Containerd::shared();
    let cri = containerd.cri();
    let chain = cri.status().expect("Status").cni_conflists();
    let types: Vec<_> = chain.iter().flat_map(|list| list["plugins"].as_array().unwrap()).map(|p| &p["type"]).collect();
    assert_eq!(types, ["bridge", "istio-capture-cni"], "the chain containerd reports: {chain:?}");

    let pod = run_pod(&containerd, &cri, &injected("web-1", "shop", &[]));
    // Held open, so that it can be looked into after containerd lets go of it at Stop.
    let sandbox = Pod::hold(&pod.netns);
    assert_has_address(&sandbox, &pod);
    let twin = Pod::with_address(&format!("{}/24", pod.ip));
    run_ok(twin.cmd(release_bin("istio-iptables")).args(DEFAULT_ENTRY_AS_FLAGS));
    let programmed = sandbox.nft_ruleset();
    assert!(programmed.contains("redirect to :15001") && programmed.contains("redirect to :15006"), "{programmed}");
    assert_eq!(programmed, twin.nft_ruleset(), "the plugin and istio-iptables differ for the same settings");

    cri.stop_pod_sandbox(&pod.id).expect("StopPodSandbox");
    assert!(!pod.netns.exists(), "containerd unmounts the namespace after DEL");
    assert_eq!(sandbox.nft_ruleset(), "", "DEL left rules in the pod's namespace");
    assert!(sandbox.rules(false).is_empty() && sandbox.rules(true).is_empty(), "{:?}", sandbox.rules(false));
    let links = sandbox.sh("ip -o link show");
    assert_eq!(links.lines().count(), 1, "only lo is left after DEL:\n{links}");

    // The second DEL, without a namespace (CNI_NETNS empty): containerd logs each teardown of the
    // whole chain, and fails RemovePodSandbox when one fails.
    cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox (its DEL without a namespace) failed");
    let teardown = format!(r#"TearDown network for sandbox \"{}\" successfully"#, pod.id);
    assert_eq!(containerd.log().matches(&teardown).count(), 2, "Stop and Remove each tear the network down");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn stop_and_remove_leave_nothing_on_the_node() {
    require_netns!();
    let containerd = Containerd::shared();
    let cri = containerd.cri();
    let pod = run_pod(&containerd, &cri, &injected("api-1", "shop", &[]));
    let footprint = containerd.footprint(&pod);
    // What leftovers() finds while the pod runs, so that finding none afterwards means something.
    let running = containerd.leftovers(&footprint);
    for part in ["reservation", "node rule: -A POSTROUTING", "node rule: -A CNI-", "veth", "namespace mount", "probe"] {
        assert!(running.iter().any(|found| found.contains(part)), "{part:?} not found while the pod runs: {running:#?}");
    }

    stop_and_remove_leaving_nothing(&containerd, &cri, &footprint);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_pod_in_an_excluded_namespace_gets_nothing_programmed() {
    require_netns!();
    let containerd = Containerd::shared();
    let cri = containerd.cri();
    // Injected, so that only the namespace keeps it from being captured.
    let pod = run_pod(&containerd, &cri, &injected("coredns-1", "kube-system", &[]));
    let footprint = containerd.footprint(&pod);
    let sandbox = Pod::hold(&pod.netns);
    assert_has_address(&sandbox, &pod);
    assert_nothing_programmed(&sandbox, "kube-system/coredns-1");
    assert_logged(&containerd, "kube-system/coredns-1", r#"not captured: its namespace "kube-system" is excluded"#);
    drop(sandbox);
    stop_and_remove_leaving_nothing(&containerd, &cri, &footprint);
}

/// The plugin's line about `pod` (namespace/name) in containerd's log (the plugin's stderr goes there) says `what`.
fn assert_logged(containerd: &Containerd, pod: &str, what: &str) {
    let log = containerd.log();
    let said = log
        .lines()
        .any(|line| line.contains("istio-capture-cni") && line.contains(&format!("pod {pod},")) && line.contains(what));
    assert!(said, "containerd's log has no line about {pod} saying {what:?}:\n{log}");
}

/// Istio's selection, from the annotations containerd passes: a pod is captured only when the
/// injector's status names its istio-proxy; not without the status (a pod with no annotations
/// at all, one with others), not when injection is disabled, not when the pod runs istio-init
/// itself, not when its status names no proxy. Each gets its address and nothing else, and the
/// reason is in the runtime's log.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn pods_without_an_injected_sidecar_get_nothing_programmed() {
    require_netns!();
    let containerd = Containerd::shared();
    let cri = containerd.cri();
    let istio_init = r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"]}"#;
    let no_proxy = r#"{"initContainers":null,"containers":["log-shipper"],"volumes":null}"#;
    let cases = [
        ("plain-1", vec![], "it has no sidecar.istio.io/status annotation"),
        (
            "other-1",
            vec![("app.kubernetes.io/name", "web"), ("prometheus.io/scrape", "true")],
            "it has no sidecar.istio.io/status annotation",
        ),
        (
            "disabled-1",
            vec![(SIDECAR_STATUS, INJECTED_STATUS), ("sidecar.istio.io/inject", "false")],
            "sidecar.istio.io/inject is \"false\"",
        ),
        (
            "istio-init-1",
            vec![(SIDECAR_STATUS, istio_init)],
            "sidecar.istio.io/status names istio-init, which captures the pod itself",
        ),
        ("no-proxy-1", vec![(SIDECAR_STATUS, no_proxy)], "sidecar.istio.io/status names no istio-proxy container"),
    ];
    for (name, annotations, reason) in cases {
        let pod = run_pod(&containerd, &cri, &annotated(name, "shop", &annotations));
        let sandbox = Pod::hold(&pod.netns);
        assert_has_address(&sandbox, &pod);
        assert_nothing_programmed(&sandbox, name);
        assert_logged(&containerd, &format!("shop/{name}"), &format!("not captured: {reason}"));
        drop(sandbox);
        cri.stop_pod_sandbox(&pod.id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox");
    }
}

/// istio-iptables' flags for the installer's default entry with some of them replaced (or added).
fn default_flags_with(replaced: &[(&str, &str)]) -> Vec<String> {
    let mut flags: Vec<String> = DEFAULT_ENTRY_AS_FLAGS.iter().map(|f| f.to_string()).collect();
    for (flag, value) in replaced {
        match flags.iter().position(|f| f == flag) {
            Some(at) => flags[at + 1] = value.to_string(),
            None => flags.extend([flag.to_string(), value.to_string()]),
        }
    }
    flags
}

/// Names and values: annotations, or istio-iptables flags.
type Pairs = &'static [(&'static str, &'static str)];

/// Each of Istio's capture annotations, with a value, and the istio-iptables flags that ask for
/// the same capture (Istio CNI's defaults for the rest, as in the default entry).
#[rustfmt::skip]
const ANNOTATION_CASES: [(Pairs, Pairs); 11] = [
    (&[("sidecar.istio.io/interceptionMode", "TPROXY")], &[("-m", "TPROXY")]),
    (&[("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.96.0.0/12,192.168.0.0/16")], &[("-i", "10.96.0.0/12,192.168.0.0/16")]),
    (&[("traffic.sidecar.istio.io/excludeOutboundIPRanges", "169.254.169.254/32")], &[("-x", "169.254.169.254/32")]),
    (&[("traffic.sidecar.istio.io/includeInboundPorts", "8080,9090")], &[("-b", "8080,9090")]),
    // The ports Istio CNI always excludes are kept.
    (&[("traffic.sidecar.istio.io/excludeInboundPorts", "8081")], &[("-d", "8081,15020,15021,15090")]),
    (&[("traffic.sidecar.istio.io/includeOutboundPorts", "5432")], &[("-q", "5432")]),
    // Replaces Istio CNI's default (15020), as in Istio.
    (&[("traffic.sidecar.istio.io/excludeOutboundPorts", "6379,11211")], &[("-o", "6379,11211")]),
    (&[("traffic.sidecar.istio.io/excludeInterfaces", "net1")], &[("-c", "net1")]),
    (&[("traffic.sidecar.istio.io/kubevirtInterfaces", "virt0")], &[("-k", "virt0")]),
    (&[("istio.io/reroute-virtual-interfaces", "virt1,virt2")], &[("-k", "virt1,virt2")]),
    // reroute-virtual-interfaces wins over the deprecated kubevirtInterfaces.
    (&[("istio.io/reroute-virtual-interfaces", "virt1"), ("traffic.sidecar.istio.io/kubevirtInterfaces", "virt0")], &[("-k", "virt1")]),
];

/// Each annotation changes the pod's capture exactly as istio-iptables' flag for it does, with
/// Istio CNI's defaults and precedence (TPROXY's routing included): the sandbox's namespace and
/// a twin programmed by istio-iptables hold the same, and differ from the default capture.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn each_annotation_is_programmed_as_istio_iptables_programs_its_flag() {
    require_netns!();
    let containerd = Containerd::shared();
    let cri = containerd.cri();
    let default_twin = Pod::with_address("10.78.0.250/24");
    run_ok(default_twin.cmd(release_bin("istio-iptables")).args(DEFAULT_ENTRY_AS_FLAGS));
    let default_capture = capture_state(&default_twin);
    for (i, (annotations, flags)) in ANNOTATION_CASES.into_iter().enumerate() {
        let pod = run_pod(&containerd, &cri, &injected(&format!("annotated-{i}"), "shop", annotations));
        let sandbox = Pod::hold(&pod.netns);
        let twin = Pod::with_address(&format!("{}/24", pod.ip));
        run_ok(twin.cmd(release_bin("istio-iptables")).args(default_flags_with(flags)));
        let programmed = capture_state(&sandbox);
        assert_eq!(programmed, capture_state(&twin), "{annotations:?}: the plugin and istio-iptables {flags:?} differ");
        assert_ne!(programmed, default_capture, "{annotations:?} changed nothing");
        drop(sandbox);
        cri.stop_pod_sandbox(&pod.id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox");
    }
}

/// A bad value in any capture annotation (or a status that is not the injector's JSON) fails
/// the pod at RunPodSandbox with the plugin's error naming the annotation and the value, and
/// the runtime's teardown of the failed sandbox leaves nothing on the node: no host-local IP,
/// no host chain, no namespace, no sandbox, no process.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_bad_annotation_fails_the_pod_naming_it_and_leaves_nothing_behind() {
    require_netns!();
    let containerd = Containerd::start(None);
    let cri = containerd.cri();
    #[rustfmt::skip]
    let bad = [
        ("sidecar.istio.io/interceptionMode", "tproxy"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33"),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.1"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "http"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "99999"),
        ("traffic.sidecar.istio.io/includeOutboundPorts", "5432,0"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "-1"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0/1"),
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "a-name-too-long-for-linux"),
        ("istio.io/reroute-virtual-interfaces", "virt 0"),
    ];
    for (i, (annotation, value)) in bad.into_iter().enumerate() {
        let config = injected(&format!("bad-{i}"), "shop", &[(annotation, value)]);
        let error = containerd.run_pod(&cri, &config).expect_err("a pod with a bad annotation started").to_string();
        assert!(
            error.contains("istio-capture-cni") && error.contains(annotation) && error.contains(value),
            "{annotation}={value}: the error does not name both: {error}"
        );
    }
    let not_json = annotated("bad-status", "shop", &[(SIDECAR_STATUS, "injected")]);
    let error = containerd.run_pod(&cri, &not_json).expect_err("a pod with a broken status started").to_string();
    assert!(error.contains(r#"sidecar.istio.io/status="injected": not JSON"#), "{error}");
    assert_eq!(containerd.settled_node_leftovers(), Vec::<String>::new());
}

/// Node configurations the plugin refuses, each with the key its error must name: a bad value,
/// an unknown capture key, a capture key outside `capture`, a `capture` that is no object.
fn broken_entries() -> [(serde_json::Value, &'static str); 4] {
    [
        (json!({ "type": "istio-capture-cni", "capture": { "proxyPort": "70000" } }), "proxyPort"),
        (json!({ "type": "istio-capture-cni", "capture": { "inboundPort": "80" } }), "inboundPort"),
        (json!({ "type": "istio-capture-cni", "excludeInboundPorts": "8081" }), "excludeInboundPorts"),
        (json!({ "type": "istio-capture-cni", "capture": "REDIRECT" }), "capture"),
    ]
}

/// A broken node configuration fails every pod at RunPodSandbox, naming the key, and the
/// runtime's teardown of each failed attempt (DEL of the whole chain, with the same broken
/// configuration) leaves nothing: before DEL stopped reading the configuration, our failing DEL
/// stopped the teardown, and each attempt leaked its IP and its `CNI-…` chain.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_broken_node_config_fails_pods_and_20_attempts_leave_nothing_behind() {
    require_netns!();
    let containerd = Containerd::start(None);
    let cri = containerd.cri();
    let mut attempts = 0;
    for (entry, key) in broken_entries() {
        containerd.write_plugin_entry(&entry);
        for _ in 0..5 {
            attempts += 1;
            let name = format!("broken-{attempts}");
            let error = containerd.run_pod(&cri, &pod_sandbox_config(&name, "shop")).expect_err("a pod started").to_string();
            assert!(
                error.contains("istio-capture-cni") && error.contains(key),
                "{entry}: the error does not name {key}: {error}"
            );
        }
    }
    assert_eq!(attempts, 20);
    assert_eq!(containerd.settled_node_leftovers(), Vec::<String>::new());
}

/// A pod captured under a good configuration stops and is removed cleanly after the node's
/// configuration broke: DEL, given the broken configuration, still removes the capture (here
/// the iptables backend's TPROXY rules, and routing by a mark and table of the configuration's
/// own, which DEL cannot read) and succeeds, so the chain's teardown runs.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_captured_pod_stops_and_is_removed_cleanly_after_the_node_config_broke() {
    require_netns!();
    let capture = json!({ "interceptionMode": "TPROXY", "tproxyMark": "1338", "tproxyRouteTable": "134" });
    let entry = json!({ "type": "istio-capture-cni", "capture": capture });
    let containerd = Containerd::start(Some(&entry));
    let cri = containerd.cri();
    let pod = run_pod(&containerd, &cri, &injected("web-1", "shop", &[]));
    let footprint = containerd.footprint(&pod);
    let sandbox = Pod::hold(&pod.netns);
    assert!(sandbox.rules(false).iter().any(|rule| rule.contains("-j TPROXY")), "{:?}", sandbox.rules(false));
    assert!(sandbox.sh("ip rule show").contains("fwmark 0x53a lookup 134"), "{}", sandbox.sh("ip rule show"));

    let [bad_value, .., not_an_object] = broken_entries();
    containerd.write_plugin_entry(&bad_value.0);
    cri.stop_pod_sandbox(&pod.id).expect("StopPodSandbox with a broken node configuration");
    assert!(sandbox.rules(false).is_empty() && sandbox.rules(true).is_empty(), "{:?}", sandbox.rules(false));
    assert_eq!(sandbox.nft_ruleset(), "", "DEL left rules or tables in the pod's namespace");
    let routing = sandbox.sh("ip rule show; ip route show table all");
    assert!(!routing.contains("lookup 134") && !routing.contains("table 134"), "DEL left the TPROXY routing:\n{routing}");
    drop(sandbox);
    containerd.write_plugin_entry(&not_an_object.0);
    cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox with a broken node configuration");
    assert_eq!(containerd.settled_leftovers(&footprint), Vec::<String>::new());
    assert_eq!(containerd.settled_node_leftovers(), Vec::<String>::new());
}
