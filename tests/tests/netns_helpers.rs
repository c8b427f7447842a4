//! The namespace helpers themselves: a pod is isolated, reachable with nsenter, and freed.

use capture_tests::{link, require_netns, Pod};

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn pod_is_isolated_and_freed() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let addrs = pod.sh("ip -o addr show dev eth0");
    assert!(addrs.contains("10.44.0.5/24"), "{addrs}");
    assert!(pod.rules(false).is_empty(), "a new pod holds no rules");
    let name = pod.name.clone();
    drop(pod);
    assert!(!std::path::Path::new(&format!("/var/run/netns/{name}")).exists());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn linked_pods_reach_each_other() {
    require_netns!();
    let (a, b) = (Pod::new(), Pod::new());
    link(&a, "eth0", "192.0.2.1/24", &b, "eth0", "192.0.2.2/24");
    a.sh("ping -c1 -W2 192.0.2.2 >/dev/null");
}
