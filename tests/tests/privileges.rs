//! Least privilege, on the real kernel: each binary runs with only the capabilities it claims
//! to need, and says which one is missing when it has less. `unsafe` stays in one module.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::time::Duration;

use capture_tests::{only_capabilities, release_bin, require_netns, stderr, Pod, ProxiedPod, SEED_ARGS};

/// istio-iptables in `pod` as root whose only capabilities are `caps`.
fn capture_with(pod: &Pod, caps: &[&str], env: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut cmd = pod.cmd("setpriv");
    cmd.arg("--reuid=0").args(only_capabilities(caps)).arg(release_bin("istio-iptables")).args(SEED_ARGS).args(extra);
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn holds_capture(pod: &Pod) -> bool {
    pod.iptables_save(false).contains("ISTIO_OUTPUT") || pod.nft_ruleset().contains("istio-output")
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn istio_iptables_needs_only_net_admin_with_iptables_nft_and_native_nftables() {
    require_netns!();
    let backends = [(&[("FORCE_IPTABLES_BINARY", "nft")][..], &[][..]), (&[][..], &["--native-nftables"][..])];
    for (env, args) in backends {
        for mode in [&["-m", "REDIRECT"], &["-m", "TPROXY"]] {
            let pod = Pod::with_address("fd00:44::5/64");
            let out = capture_with(&pod, &["net_admin"], env, &[args, mode].concat());
            assert!(out.status.success(), "{env:?} {args:?} {mode:?}: {}", stderr(&out));
            assert!(holds_capture(&pod), "{env:?} {args:?} {mode:?}");
        }
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn istio_iptables_legacy_also_needs_net_raw() {
    require_netns!();
    // iptables-legacy talks to the kernel through a raw socket, hence Istio's NET_RAW.
    let legacy = [("FORCE_IPTABLES_BINARY", "legacy")];
    let pod = Pod::with_address("10.44.0.5/24");
    let out = capture_with(&pod, &["net_admin"], &legacy, &[]);
    assert!(!out.status.success(), "legacy worked without NET_RAW");
    assert!(!pod.sh("iptables-legacy-save").contains("ISTIO"), "nothing half-applied");
    let out = capture_with(&pod, &["net_admin", "net_raw"], &legacy, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(pod.sh("iptables-legacy-save").contains("-A OUTPUT -j ISTIO_OUTPUT"));
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn native_nftables_without_net_admin_names_the_capability_and_changes_nothing() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let out = capture_with(&pod, &["net_raw"], &[], &["--native-nftables"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("CAP_NET_ADMIN"), "{}", stderr(&out));
    assert!(!holds_capture(&pod));
}

/// One request through the proxy, from the pod to a server in `external` that echoes.
fn forwards_a_connection(proxied: &ProxiedPod) {
    let listener = proxied.external.enter(|| TcpListener::bind("10.44.2.1:9090").unwrap());
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4];
        stream.read_exact(&mut request).unwrap();
        stream.write_all(&request).unwrap();
    });
    let addr: SocketAddr = "10.44.2.1:9090".parse().unwrap();
    let mut stream = proxied.pod.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5))).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"ping").unwrap();
    let mut answer = [0u8; 4];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"ping");
    server.join().unwrap();
    drop(stream);
    // The proxy logs each relayed connection as it closes: proof it went through the proxy.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !proxied.log_text().contains("dst=10.44.2.1:9090") {
        assert!(std::time::Instant::now() < deadline, "not relayed by the proxy:\n{}", proxied.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn capture_proxy_redirect_runs_with_no_capabilities_at_all() {
    require_netns!();
    let proxied = ProxiedPod::new("REDIRECT", &[], &[], &["--log-level", "capture_proxy=debug"]);
    forwards_a_connection(&proxied);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn capture_proxy_tproxy_runs_with_only_net_admin() {
    require_netns!();
    let proxied = ProxiedPod::new("TPROXY", &[], &["net_admin"], &["--log-level", "capture_proxy=debug"]);
    forwards_a_connection(&proxied);
}

/// Our crates' sources, relative to the workspace root.
fn rust_sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn unsafe_code_lives_only_in_the_nftables_syscall_module() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut sources = Vec::new();
    for krate in ["capture-lib", "istio-iptables", "proxy", "cni", "cli-docs"] {
        rust_sources(&root.join(krate).join("src"), &mut sources);
    }
    let mut with_unsafe: Vec<String> = Vec::new();
    let mut allowing: Vec<String> = Vec::new();
    for path in &sources {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.strip_prefix(root).unwrap().display().to_string();
        // The lint attributes name `unsafe_code`; any other `unsafe` is unsafe code.
        if text.lines().any(|l| {
            l.contains("unsafe") && !l.trim_start().starts_with("#![deny(unsafe_code)]") && !l.contains("allow(unsafe_code)")
        }) {
            with_unsafe.push(name.clone());
        }
        if text.contains("allow(unsafe_code)") {
            allowing.push(name);
        }
    }
    assert_eq!(with_unsafe, ["capture-lib/src/nftables/raw.rs"]);
    assert_eq!(allowing, ["capture-lib/src/nftables/raw.rs"]);
    // These crate roots deny it, so a new `unsafe` anywhere else does not compile.
    for root_file in ["capture-lib/src/lib.rs", "proxy/src/main.rs", "cni/src/main.rs", "cli-docs/src/lib.rs"] {
        let text = std::fs::read_to_string(root.join(root_file)).unwrap();
        assert!(text.contains("#![deny(unsafe_code)]") || text.contains("#![forbid(unsafe_code)]"), "{root_file}");
    }
}
