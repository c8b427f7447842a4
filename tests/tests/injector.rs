//! Our images under a real container runtime (podman), run the way Istio's sidecar injector runs
//! its own proxy_init image when `global.proxy_init.image` names ours: a container with no
//! command and exactly the arguments, environment and securityContext Istio's injection template
//! (manifests/charts/istio-control/istio-discovery/files/injection-template.yaml) writes, in the
//! pod's network namespace. Each case must exit 0 and leave the kernel holding exactly what
//! `istio-iptables` run directly with the same arguments programs in a twin namespace, and
//! `podman logs` must show the rules it applied. Then a whole pod: init container, capture-proxy
//! as the sidecar and an application, with traffic both ways through the proxy.
//!
//! The images are built once per run of this file by scripts/image-build.sh, into podman storage
//! of the run's own (capture_tests::podman). Run `scripts/build.sh` first.

use std::net::{SocketAddr, TcpListener};
use std::sync::OnceLock;

use capture_tests::podman::{Finished, Podman, IPTABLES_IMAGE, MINIMAL_IMAGE};
use capture_tests::{http_get, link, metric, release_bin, require_netns, run_ok, serve_peer_address, Pod};

static PODMAN: OnceLock<Podman> = OnceLock::new();

/// podman with both images, built once for all tests of this file.
fn podman() -> &'static Podman {
    require_netns!();
    PODMAN.get_or_init(Podman::with_images)
}

/// What Istio's injection template reads to write the istio-init container: pod annotations and
/// mesh values (Helm values), each field named after the annotation or value, with the chart's
/// defaults (`Injection::default()`).
#[derive(Clone)]
struct Injection {
    /// `sidecar.istio.io/interceptionMode` (mesh default REDIRECT)
    interception_mode: &'static str,
    /// `traffic.sidecar.istio.io/includeOutboundIPRanges` (global.proxy.includeIPRanges "*")
    include_ip_ranges: &'static str,
    /// `traffic.sidecar.istio.io/excludeOutboundIPRanges` (global.proxy.excludeIPRanges "")
    exclude_ip_ranges: &'static str,
    /// `traffic.sidecar.istio.io/includeInboundPorts` (global.proxy.includeInboundPorts "*")
    include_inbound_ports: &'static str,
    /// `traffic.sidecar.istio.io/excludeInboundPorts` (global.proxy.excludeInboundPorts "")
    exclude_inbound_ports: &'static str,
    /// `traffic.sidecar.istio.io/includeOutboundPorts`; `-q` is written only when set
    include_outbound_ports: Option<&'static str>,
    /// `traffic.sidecar.istio.io/excludeOutboundPorts`; `-o` is written only when set
    exclude_outbound_ports: Option<&'static str>,
    /// `istio.io/reroute-virtual-interfaces` (or the older `traffic.sidecar.istio.io/kubevirtInterfaces`)
    reroute_virtual_interfaces: Option<&'static str>,
    /// `traffic.sidecar.istio.io/excludeInterfaces`
    exclude_interfaces: Option<&'static str>,
    /// global.logAsJson
    log_as_json: bool,
    /// pilot.cni.enabled: the container only validates, as the proxy user
    cni: bool,
    /// global.nativeNftables
    native_nftables: bool,
    /// The mesh's ProxyMetadata, written as the container's environment.
    proxy_metadata: Vec<(&'static str, &'static str)>,
}

impl Default for Injection {
    fn default() -> Injection {
        Injection {
            interception_mode: "REDIRECT",
            include_ip_ranges: "*",
            exclude_ip_ranges: "",
            include_inbound_ports: "*",
            exclude_inbound_ports: "",
            include_outbound_ports: None,
            exclude_outbound_ports: None,
            reroute_virtual_interfaces: None,
            exclude_interfaces: None,
            log_as_json: false,
            cni: false,
            native_nftables: false,
            proxy_metadata: Vec::new(),
        }
    }
}

/// The template's `excludeInboundPort` (pkg/kube/inject/template.go): the status port (15020)
/// appended to the excluded inbound ports unless already there.
fn exclude_inbound_port(status_port: &str, excluded: &str) -> String {
    let ports: Vec<&str> = excluded.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    if ports.contains(&status_port) {
        return excluded.to_string();
    }
    ports.into_iter().chain([status_port]).collect::<Vec<_>>().join(",")
}

impl Injection {
    /// The container's `args`, as the template writes them (no `command`: the image's entrypoint runs).
    fn args(&self) -> Vec<String> {
        let mut args = vec!["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", self.interception_mode];
        args.extend(["-i", self.include_ip_ranges, "-x", self.exclude_ip_ranges, "-b", self.include_inbound_ports, "-d"]);
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        let excluded = exclude_inbound_port("15020", self.exclude_inbound_ports);
        args.push(if excluded.is_empty() { "15090,15021".to_string() } else { format!("15090,15021,{excluded}") });
        let optional = [
            ("-q", self.include_outbound_ports),
            ("-o", self.exclude_outbound_ports),
            ("-k", self.reroute_virtual_interfaces),
            ("-c", self.exclude_interfaces),
        ];
        for (flag, value) in optional {
            if let Some(value) = value {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.push("--log_output_level=default:info".to_string());
        let flags = [
            (self.log_as_json, &["--log_as_json"][..]),
            (self.cni, &["--run-validation", "--skip-rule-apply"][..]),
            (self.native_nftables, &["--native-nftables"][..]),
        ];
        args.extend(flags.iter().filter(|(on, _)| *on).flat_map(|(_, words)| words.iter().map(|w| w.to_string())));
        args
    }

    /// `podman run` options for the container's securityContext and environment. Without CNI:
    /// root with only NET_ADMIN and NET_RAW (ALL dropped), no privilege escalation, and a
    /// read-only root filesystem (Istio's template writes `readOnlyRootFilesystem: false`; ours
    /// does not need that). With CNI: the proxy user, no capability, read-only root.
    /// `--read-only-tmpfs=false`: Kubernetes mounts no tmpfs on /run or /tmp, so neither may podman.
    /// The host's resolv.conf is the pod's, as for the twin run directly.
    fn container_options(&self) -> Vec<String> {
        let security: &[&str] = if self.cni {
            &["--user=1337:1337", "--cap-drop=ALL"]
        } else {
            &["--user=0:0", "--cap-drop=ALL", "--cap-add=NET_ADMIN,NET_RAW"]
        };
        let mut options: Vec<String> = security.iter().map(|o| o.to_string()).collect();
        options.extend(
            [
                "--security-opt=no-new-privileges",
                "--read-only",
                "--read-only-tmpfs=false",
                "--volume=/etc/resolv.conf:/etc/resolv.conf:ro",
            ]
            .map(String::from),
        );
        options.extend(self.proxy_metadata.iter().map(|(name, value)| format!("--env={name}={value}")));
        options
    }

    /// `istio-iptables` run directly in `pod` with the container's arguments (without the
    /// subcommand word) and environment, and `extra` arguments.
    fn run_directly(&self, pod: &Pod, extra: &[&str]) -> std::process::Output {
        let mut cmd = pod.cmd(release_bin("istio-iptables"));
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.envs(self.proxy_metadata.iter().copied()).args(&self.args()[1..]).args(extra);
        run_ok(&mut cmd)
    }
}

#[test]
fn injected_arguments_are_the_ones_istio_writes() {
    #[rustfmt::skip]
    let istio = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
                 "-d", "15090,15021,15020", "--log_output_level=default:info"];
    assert_eq!(Injection::default().args(), istio);

    // Istio's own injection fixtures (pkg/kube/inject/testdata/inject/*.injected at 86c9f01).
    #[rustfmt::skip]
    let istio = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "127.0.0.1/24,10.96.0.1/24",
                 "-x", "10.96.0.2/24,10.96.0.3/24", "-b", "1,2,3", "-d", "15090,15021,4,5,6,15020", "-o", "7,8,9",
                 "--log_output_level=default:info"];
    assert_eq!(traffic_annotations().args(), istio, "traffic-annotations.yaml.injected");
    let cni = Injection { cni: true, ..Injection::default() }.args();
    assert_eq!(cni[cni.len() - 3..], ["--log_output_level=default:info", "--run-validation", "--skip-rule-apply"]);
    assert_eq!(exclude_inbound_port("15020", " 8081, 15020"), " 8081, 15020");
    assert_eq!(exclude_inbound_port("15020", "8081,,9000 "), "8081,9000,15020");
}

/// The backend a case runs with, and what selects it: the mesh value for native nftables, a
/// ProxyMetadata entry for the legacy iptables variant (Istio's tool honours it too; nft is
/// chosen in a fresh pod).
#[derive(Clone, Copy, Debug)]
enum Backend {
    IptablesNft,
    IptablesLegacy,
    NativeNftables,
}

impl Backend {
    fn applied_to(self, injection: &Injection) -> Injection {
        let mut injection = injection.clone();
        match self {
            Backend::IptablesNft => {}
            Backend::IptablesLegacy => injection.proxy_metadata.push(("FORCE_IPTABLES_BINARY", "legacy")),
            Backend::NativeNftables => injection.native_nftables = true,
        }
        injection
    }
}

/// The annotations of Istio's injection fixture traffic-annotations.yaml.
fn traffic_annotations() -> Injection {
    Injection {
        include_ip_ranges: "127.0.0.1/24,10.96.0.1/24",
        exclude_ip_ranges: "10.96.0.2/24,10.96.0.3/24",
        include_inbound_ports: "1,2,3",
        exclude_inbound_ports: "4,5,6",
        exclude_outbound_ports: Some("7,8,9"),
        ..Injection::default()
    }
}

/// The table of pods the injector may write, by annotation and mesh value.
fn cases() -> Vec<(&'static str, Injection)> {
    let default = Injection::default;
    vec![
        ("default", default()),
        ("TPROXY", Injection { interception_mode: "TPROXY", ..default() }),
        (
            "outbound IP ranges",
            Injection {
                include_ip_ranges: "10.96.0.0/12,192.168.0.0/16",
                exclude_ip_ranges: "10.96.0.1/32,169.254.169.254/32",
                ..default()
            },
        ),
        ("inbound ports", Injection { include_inbound_ports: "8080,9090", ..default() }),
        ("Istio's traffic-annotations fixture", traffic_annotations()),
        (
            "excluded and included ports",
            Injection {
                exclude_inbound_ports: "8081,9091",
                exclude_outbound_ports: Some("3306,6379"),
                include_outbound_ports: Some("8443"),
                ..default()
            },
        ),
        ("reroute-virtual-interfaces", Injection { reroute_virtual_interfaces: Some("eth7,tap0"), ..default() }),
        ("excludeInterfaces", Injection { exclude_interfaces: Some("eth8"), ..default() }),
        ("logAsJson", Injection { log_as_json: true, ..default() }),
        (
            "ProxyMetadata",
            Injection {
                proxy_metadata: vec![("ISTIO_META_DNS_CAPTURE", "true"), ("INVALID_DROP", "true"), ("ISTIO_DUAL_STACK", "true")],
                ..default()
            },
        ),
    ]
}

/// A pod namespace with both families on eth0, as in a dual-stack cluster.
fn dual_stack_pod() -> Pod {
    let pod = Pod::with_address("10.44.0.5/24");
    pod.sh("ip addr add fd00:44::5/64 dev eth0 nodad");
    pod
}

/// Everything istio-iptables programs: both iptables variants and families, native nftables, the
/// TPROXY policy routing and the addresses on lo.
fn kernel_state(pod: &Pod) -> String {
    let mut state = pod.iptables_save(false) + &pod.iptables_save(true) + &native_tables(&pod.nft_ruleset());
    // `ip route show table 133` fails where the table does not exist (nothing routed there yet).
    for command in ["ip rule", "ip -6 rule", "ip route show table 133", "ip -6 route show table 133", "ip -br addr show dev lo"] {
        state += &format!("# {command}\n{}", pod.sh(&format!("{command} 2>&1 || true")));
    }
    state
}

/// The native nftables tables (family inet) of `nft list ruleset`, sorted. iptables-nft's tables
/// (ip, ip6) are compared through iptables-save: nft's listing of their xt expressions is not
/// stable. Native tables are listed in the order they were created.
fn native_tables(ruleset: &str) -> String {
    let mut tables: Vec<String> = Vec::new();
    for line in ruleset.lines() {
        match tables.last_mut() {
            Some(table) if !line.starts_with("table ") => *table += &format!("{line}\n"),
            _ => tables.push(format!("{line}\n")),
        }
    }
    tables.retain(|table| table.starts_with("table inet "));
    tables.sort();
    tables.concat()
}

/// The text of a container's log: each line a JSON object with Istio's fields under
/// `--log_as_json` (its `msg` taken), plain lines otherwise.
fn log_text(finished: &Finished, json: bool) -> String {
    if !json {
        return finished.logs.clone();
    }
    let mut text = String::new();
    for line in finished.logs.lines().filter(|l| !l.is_empty()) {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("a --log_as_json line is not JSON ({e}): {line}"));
        for field in ["time", "level", "msg"] {
            assert!(entry.get(field).is_some(), "no `{field}` in {line}");
        }
        text += entry["msg"].as_str().expect("msg is a string");
        text.push('\n');
    }
    text
}

/// Runs one case from `image` with `backend`: the container exits 0, the kernel holds what the
/// twin run directly holds, and the container's log shows every line of the rules it applied
/// (what `--dry-run` prints for a fresh pod: the restore input or nft script).
fn check_case(podman: &Podman, image: &str, backend: Backend, name: &str, case: &Injection) {
    let injection = backend.applied_to(case);
    let what = format!("{name} ({backend:?}, {image}): {:?}", injection.args());
    let (pod, twin) = (dual_stack_pod(), dual_stack_pod());
    let planned = String::from_utf8(injection.run_directly(&twin, &["--dry-run"]).stdout).unwrap();
    let init = podman.run_in(&pod, &injection.container_options(), image, &injection.args());
    assert_eq!(init.code, 0, "{what}\n{}\n{:?}", init.logs, init.podman);
    injection.run_directly(&twin, &[]);
    let state = kernel_state(&pod);
    assert!(state.contains("ISTIO_") || state.contains("istio"), "{what}: nothing programmed:\n{state}");
    let direct = kernel_state(&twin);
    let only = |a: &str, b: &str| a.lines().filter(|l| !b.lines().any(|m| m == *l)).collect::<Vec<_>>().join("\n");
    assert!(
        state == direct,
        "{what}: the container and the direct run differ\nonly after the container:\n{}\nonly after the direct run:\n{}",
        only(&state, &direct),
        only(&direct, &state)
    );

    let logged = log_text(&init, injection.log_as_json);
    let rules: Vec<&str> = planned.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(rules.len() > 5, "{what}: --dry-run printed too little:\n{planned}");
    for rule in rules {
        assert!(logged.contains(rule), "{what}: the log does not show `{rule}`:\n{}", init.logs);
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn minimal_image_runs_every_injected_case_with_native_nftables() {
    let podman = podman();
    for (name, case) in cases() {
        check_case(podman, MINIMAL_IMAGE, Backend::NativeNftables, name, &case);
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn iptables_image_runs_every_injected_case_with_each_backend() {
    let podman = podman();
    for (name, case) in cases() {
        for backend in [Backend::IptablesNft, Backend::IptablesLegacy, Backend::NativeNftables] {
            check_case(podman, IPTABLES_IMAGE, backend, name, &case);
        }
    }
}

/// A second injected run (a restarted pod's init container) finds the rules in place and changes
/// nothing: the image's iptables-save reads back what its iptables-restore wrote.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn a_rerun_from_the_image_finds_the_rules_in_place() {
    let podman = podman();
    for backend in [Backend::IptablesNft, Backend::IptablesLegacy, Backend::NativeNftables] {
        let injection = backend.applied_to(&Injection { interception_mode: "TPROXY", ..Injection::default() });
        let pod = dual_stack_pod();
        let first = podman.run_in(&pod, &injection.container_options(), IPTABLES_IMAGE, &injection.args());
        assert_eq!(first.code, 0, "{backend:?}: {}", first.logs);
        let programmed = kernel_state(&pod);
        let again = podman.run_in(&pod, &injection.container_options(), IPTABLES_IMAGE, &injection.args());
        assert_eq!(again.code, 0, "{backend:?}: {}", again.logs);
        assert!(again.logs.contains("already in place"), "{backend:?}: {}", again.logs);
        assert_eq!(kernel_state(&pod), programmed, "{backend:?}");
    }
}

/// istio-cni mode: the CNI plugin programmed the pod, and the injected istio-validation container
/// (`--run-validation --skip-rule-apply`, as the proxy user, no capability) only proves that
/// redirection works; where nothing redirects it fails with Istio's 126.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn cni_mode_validation_runs_as_the_proxy_user() {
    let podman = podman();
    for (image, backend) in [(MINIMAL_IMAGE, Backend::NativeNftables), (IPTABLES_IMAGE, Backend::IptablesNft)] {
        let capture = backend.applied_to(&Injection::default());
        let validation = Injection { cni: true, ..capture.clone() };
        let pod = dual_stack_pod();
        capture.run_directly(&pod, &[]);
        let programmed = kernel_state(&pod);
        let out = podman.run_in(&pod, &validation.container_options(), image, &validation.args());
        assert_eq!(out.code, 0, "{image}: {}\n{:?}", out.logs, out.podman);
        assert_eq!(kernel_state(&pod), programmed, "{image}: validation changed the pod");

        let uncaptured = dual_stack_pod();
        let mut options = validation.container_options();
        options.push("--env=PROBE_TIMEOUT=1s".to_string());
        let out = podman.run_in(&uncaptured, &options, image, &validation.args());
        assert_eq!(out.code, 126, "{image}: validation without capture: {}", out.logs);
        assert!(out.logs.contains("validation failed"), "{image}: {}", out.logs);
    }
}

/// The pod of the end-to-end tests, with a client outside and an external server:
///
/// ```text
/// client 10.44.1.1 ── eth0 10.44.1.2 [pod: istio-init, capture-proxy, app :8080] eth1 10.44.2.2 ── external 10.44.2.1 :9090
/// ```
///
/// The init container runs Istio's arguments from the iptables image; capture-proxy runs from the
/// same image as uid 1337 (NET_ADMIN only in TPROXY mode, as Istio's sidecar); the application
/// (tests/src/bin/pod-app.rs, mounted into the minimal image, which holds the libraries it
/// loads) as uid 1000. A request from the client to the app makes the app call the external
/// server: one inbound and one outbound connection, both through the proxy.
fn injected_pod_passes_traffic_through_the_proxy(mode: &'static str) {
    let podman = podman();
    let (client, pod, external) = (Pod::new(), Pod::new(), Pod::new());
    link(&client, "eth0", "10.44.1.1/24", &pod, "eth0", "10.44.1.2/24");
    link(&pod, "eth1", "10.44.2.2/24", &external, "eth0", "10.44.2.1/24");

    let injection = Injection { interception_mode: mode, ..Injection::default() };
    let init = podman.run_in(&pod, &injection.container_options(), IPTABLES_IMAGE, &injection.args());
    assert_eq!(init.code, 0, "{mode}: {}\n{:?}", init.logs, init.podman);

    let mut sidecar = vec!["--user=1337:1337", "--cap-drop=ALL", "--read-only", "--read-only-tmpfs=false"];
    if mode == "TPROXY" {
        sidecar.push("--cap-add=NET_ADMIN");
    }
    sidecar.push("--entrypoint=/usr/local/bin/capture-proxy");
    let sidecar: Vec<String> = sidecar.into_iter().map(String::from).collect();
    let proxy = podman.start_in(&pod, &sidecar, IPTABLES_IMAGE, &["--inbound-mode".to_string(), mode.to_string()]);
    pod.wait_proxy_ready(|| proxy.logs());

    let app_options = [
        "--user=1000:1000".to_string(),
        "--cap-drop=ALL".to_string(),
        "--read-only".to_string(),
        format!("--volume={}:/usr/local/bin/pod-app:ro", release_bin("pod-app").display()),
        "--entrypoint=/usr/local/bin/pod-app".to_string(),
    ];
    let app = podman.start_in(&pod, &app_options, MINIMAL_IMAGE, &["8080".to_string()]);
    pod.wait_http_ok("the app", 8080, "/", || app.logs());
    serve_peer_address(external.enter(|| TcpListener::bind("10.44.2.1:9090")).unwrap(), "external");

    let (status, body) = client
        .enter(|| http_get(SocketAddr::from(([10, 44, 1, 2], 8080)), "/call/10.44.2.1:9090"))
        .unwrap_or_else(|e| panic!("{mode}: the client's request failed: {e}\n{}", proxy.logs()));
    assert_eq!(status, "200", "{mode}: {body}");
    // REDIRECT hands the app the proxy's connection from the inbound passthrough address;
    // TPROXY keeps the client's address.
    let app_saw = if mode == "TPROXY" { "10.44.1.1" } else { "127.0.0.6" };
    assert_eq!(body, format!("app saw {app_saw}; 10.44.2.1:9090 said: external saw 10.44.2.2"), "{mode}");

    for direction in ["inbound", "outbound"] {
        pod.expect_proxy_metric(&format!(r#"capture_proxy_connections_active{{direction="{direction}"}}"#), 0);
        let text = pod.proxy_metrics();
        let total = metric(&text, &format!(r#"capture_proxy_connections_total{{direction="{direction}"}}"#));
        assert_eq!(total, 1, "{mode}: one {direction} connection through the proxy\n{text}");
    }
    // What `kubectl logs -c istio-init` shows.
    assert!(init.logs.contains("-A ISTIO_OUTPUT"), "{mode}: the log does not show the rules:\n{}", init.logs);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn injected_pod_redirect_passes_both_ways_through_the_proxy() {
    injected_pod_passes_traffic_through_the_proxy("REDIRECT");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn injected_pod_tproxy_passes_both_ways_through_the_proxy() {
    injected_pod_passes_traffic_through_the_proxy("TPROXY");
}

/// The image's bare entrypoint explains itself instead of programming anything.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_images_without_arguments_print_help() {
    let podman = podman();
    for image in [MINIMAL_IMAGE, IPTABLES_IMAGE] {
        let out = run_ok(podman.cmd().args(["run", "--rm", "--pull=never", "--network=none", image]));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage: istio-iptables"), "{image}: {help}");
    }
}
