//! `istio-capture-cni` on a node run by containerd (Debian's), driven through containerd's CRI
//! service as a kubelet drives it: RunPodSandbox, PodSandboxStatus, StopPodSandbox and
//! RemovePodSandbox. The node's conflist is bridge + host-local + our plugin as
//! `istio-capture-cni install` chained it (its default entry: native nftables, kube-system
//! excluded); see `capture_tests::containerd` for the node. The tests of this binary share one
//! containerd.

use capture_tests::containerd::{Containerd, Footprint, RunningPod};
use capture_tests::cri::{pod_sandbox_config, CriClient};
use capture_tests::{release_bin, require_netns, run_ok, Pod};
use serde_json::json;

/// What the installer's default entry asks for, as istio-iptables flags: Istio CNI's defaults
/// (every inbound port and outbound range, 15020 excluded outbound; 15020, 15021 and 15090
/// always excluded inbound), with native nftables.
#[rustfmt::skip]
const DEFAULT_ENTRY_AS_FLAGS: &[&str] = &["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
    "-b", "*", "-d", "15020,15021,15090", "-o", "15020", "--native-nftables"];

fn run_pod(containerd: &Containerd, cri: &CriClient, name: &str, namespace: &str) -> RunningPod {
    let pod = containerd
        .run_pod(cri, &pod_sandbox_config(name, namespace))
        .unwrap_or_else(|e| panic!("RunPodSandbox {namespace}/{name}: {e}"));
    assert!(pod.netns.starts_with(containerd.netns_dir()), "{pod:?}");
    pod
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

    let pod = run_pod(&containerd, &cri, "web-1", "shop");
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
    let pod = run_pod(&containerd, &cri, "api-1", "shop");
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
    let pod = run_pod(&containerd, &cri, "coredns-1", "kube-system");
    let footprint = containerd.footprint(&pod);
    let sandbox = Pod::hold(&pod.netns);
    assert_has_address(&sandbox, &pod);
    assert_eq!(sandbox.nft_ruleset(), "");
    assert!(sandbox.rules(false).is_empty() && sandbox.rules(true).is_empty(), "{:?}", sandbox.rules(false));
    drop(sandbox);
    stop_and_remove_leaving_nothing(&containerd, &cri, &footprint);
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
    let pod = run_pod(&containerd, &cri, "web-1", "shop");
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
