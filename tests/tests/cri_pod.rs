//! A whole injected pod on a node run by containerd (Debian's), through its CRI service as a
//! kubelet runs it: RunPodSandbox (the CNI chain, bridge + host-local + istio-capture-cni as
//! `istio-capture-cni install` chained it, makes the pod's network and captures it), then
//! CreateContainer and StartContainer for capture-proxy as uid 1337 (the injected `istio-proxy`
//! container) and for an application, both from our minimal image as scripts/image-build.sh
//! builds it, exported by podman and imported into containerd (no registry). Then real
//! connections: a client on the node calls the app, which calls a server on the node, and the
//! proxy's own metrics count one inbound and one outbound connection.
//!
//! ```text
//! node namespace: client, server 10.78.0.1:9090 (capbr0) ── veth ── pod eth0 [capture-proxy (1337), app :8080 (1000)]
//! ```
//!
//! Run `scripts/build.sh` first (the release binaries go into the image; pod-app is mounted).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use capture_tests::containerd::{Containerd, RunningPod};
use capture_tests::cri::api::{
    Capability, ContainerConfig, ContainerMetadata, ContainerState, ImageSpec, Int64Value, LinuxContainerConfig,
    LinuxContainerSecurityContext, Mount, PodSandboxConfig,
};
use capture_tests::cri::{pod_sandbox_config, CriClient, INJECTED_STATUS, SIDECAR_STATUS};
use capture_tests::podman::{Podman, MINIMAL_IMAGE};
use capture_tests::{http_get, metric, release_bin, require_netns, serve_peer_address, Pod};

/// The app's port, and the node's server the app calls.
const APP_PORT: u16 = 8080;
const SERVER: &str = "10.78.0.1:9090";

/// A container as a kubelet configures it for a restricted pod: the image's user replaced by
/// `uid`, every capability dropped, no privilege escalation, a read-only root, the log under
/// the sandbox's log directory.
fn container(name: &str, command: &[&str], uid: i64, mounts: Vec<Mount>) -> ContainerConfig {
    let security_context = LinuxContainerSecurityContext {
        capabilities: Some(Capability { drop_capabilities: vec!["ALL".into()], ..Default::default() }),
        run_as_user: Some(Int64Value { value: uid }),
        run_as_group: Some(Int64Value { value: uid }),
        readonly_rootfs: true,
        no_new_privs: true,
    };
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: MINIMAL_IMAGE.into() }),
        command: command.iter().map(|word| word.to_string()).collect(),
        mounts,
        log_path: format!("{name}/0.log"),
        linux: Some(LinuxContainerConfig { security_context: Some(security_context) }),
        ..Default::default()
    }
}

/// A container the pod runs, with where its log is.
struct Container<'c> {
    cri: &'c CriClient,
    id: String,
    log: std::path::PathBuf,
}

impl Container<'_> {
    fn create_and_start<'c>(
        cri: &'c CriClient,
        pod: &RunningPod,
        sandbox: &PodSandboxConfig,
        config: &ContainerConfig,
    ) -> Container<'c> {
        let name = &config.metadata.as_ref().unwrap().name;
        let id = cri.create_container(&pod.id, config, sandbox).unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"));
        cri.start_container(&id).unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        let log = Path::new(&sandbox.log_directory).join(&config.log_path);
        Container { cri, id, log }
    }

    /// The container's output so far, as the CRI logs it (`TIME STREAM TAG MESSAGE` a line).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the container as a kubelet does (its stop signal, then SIGKILL after `grace`);
    /// returns its exit code.
    fn stop(&self, grace: Duration) -> i32 {
        self.cri.stop_container(&self.id, grace.as_secs() as i64).expect("StopContainer");
        let status = self.cri.container_status(&self.id).expect("ContainerStatus");
        assert_eq!(status.state, ContainerState::Exited as i32, "{status:?}");
        status.exit_code
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn an_injected_pods_containers_pass_inbound_and_outbound_traffic_through_the_proxy() {
    require_netns!();
    let image = Podman::with_images().save(MINIMAL_IMAGE);
    let containerd = Containerd::start(None);
    let cri = containerd.cri();
    containerd.import_image(&cri, &image, MINIMAL_IMAGE);

    let mut sandbox_config = pod_sandbox_config("web-1", "shop");
    sandbox_config.annotations.insert(SIDECAR_STATUS.into(), INJECTED_STATUS.into());
    sandbox_config.log_directory = containerd.log_directory("shop_web-1").display().to_string();
    let pod = containerd.run_pod(&cri, &sandbox_config).expect("RunPodSandbox");
    let footprint = containerd.footprint(&pod);
    let sandbox = Pod::hold(&pod.netns);
    let programmed = sandbox.nft_ruleset();
    assert!(programmed.contains("redirect to :15001") && programmed.contains("redirect to :15006"), "{programmed}");

    // As uid 1337, the one the capture exempts (capture-proxy refuses to run as any other).
    let proxy_config = container("istio-proxy", &["/usr/local/bin/capture-proxy", "--inbound-mode", "REDIRECT"], 1337, vec![]);
    let proxy = Container::create_and_start(&cri, &pod, &sandbox_config, &proxy_config);
    sandbox.wait_proxy_ready(|| proxy.log());
    let app_binary = Mount {
        container_path: "/usr/local/bin/pod-app".into(),
        host_path: release_bin("pod-app").display().to_string(),
        readonly: true,
    };
    let app_config = container("app", &["/usr/local/bin/pod-app", &APP_PORT.to_string()], 1000, vec![app_binary]);
    let app = Container::create_and_start(&cri, &pod, &sandbox_config, &app_config);
    sandbox.wait_http_ok("the app", APP_PORT, "/", || app.log());
    serve_peer_address(containerd.node().enter(|| TcpListener::bind(SERVER)).expect("bind the node's server"), "external");

    let app_addr = SocketAddr::new(pod.ip, APP_PORT);
    let (status, body) = containerd
        .node()
        .enter(|| http_get(app_addr, &format!("/call/{SERVER}")))
        .unwrap_or_else(|e| panic!("the client's request failed: {e}\n{}", proxy.log()));
    assert_eq!(status, "200", "{body}");
    // REDIRECT hands the app the proxy's connection from the inbound passthrough address; the
    // proxy's upstream connection leaves from the pod's own address.
    assert_eq!(body, format!("app saw 127.0.0.6; {SERVER} said: external saw {}", pod.ip));
    for direction in ["inbound", "outbound"] {
        sandbox.expect_proxy_metric(&format!(r#"capture_proxy_connections_active{{direction="{direction}"}}"#), 0);
        let text = sandbox.proxy_metrics();
        let total = metric(&text, &format!(r#"capture_proxy_connections_total{{direction="{direction}"}}"#));
        assert_eq!(total, 1, "one {direction} connection through the proxy\n{text}\n{}", proxy.log());
    }

    // As a kubelet ends a pod: its containers (the app has no SIGTERM handler, as PID 1 it
    // ignores the signal: no grace), then the sandbox.
    app.stop(Duration::ZERO);
    assert_eq!(proxy.stop(Duration::from_secs(10)), 0, "capture-proxy stops cleanly on SIGTERM:\n{}", proxy.log());
    drop(sandbox);
    cri.stop_pod_sandbox(&pod.id).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox");
    assert_eq!(containerd.settled_leftovers(&footprint), Vec::<String>::new());
    assert_eq!(containerd.settled_node_leftovers(), Vec::<String>::new());
}
