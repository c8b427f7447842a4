//! The Kubernetes examples under deploy/: parsed, the fields that matter asserted, and what
//! they hand our binaries (arguments, environment, plugin configuration) run through the real
//! binaries, so an example cannot drift from what the binaries accept.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use capture_tests::{release_bin, require_netns, run_ok, Pod, SEED_ARGS};
use serde::Deserialize;
use serde_json::json;
use serde_yaml::Value;

/// The binaries our images ship (scripts/image-rootfs.sh), by the path containers run them at.
const IMAGE_BINARIES: [&str; 3] =
    ["/usr/local/bin/istio-iptables", "/usr/local/bin/capture-proxy", "/usr/local/bin/istio-capture-cni"];

/// Whether `image` names one of our images (`capture` or `capture-iptables`, any registry).
fn is_ours(image: &str) -> bool {
    let name = image.rsplit('/').next().unwrap_or(image);
    name.starts_with("capture:") || name.starts_with("capture-iptables:")
}

/// The Dockerfile's ENTRYPOINT: what a container of our image without a `command` runs.
fn image_entrypoint() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile");
    let dockerfile = std::fs::read_to_string(path).unwrap();
    let entrypoints: Vec<&str> = dockerfile.lines().filter_map(|l| l.strip_prefix("ENTRYPOINT ")).collect();
    assert_eq!(entrypoints.len(), 1, "one ENTRYPOINT, shared by both images: {entrypoints:?}");
    serde_json::from_str(entrypoints[0]).expect("ENTRYPOINT in exec form")
}

/// Every document of a manifest file.
fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text).map(|doc| Value::deserialize(doc).expect("valid YAML")).collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().map(|s| s.iter().map(|v| v.as_str().expect("a string").to_string()).collect()).unwrap_or_default()
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

/// The capture-proxy sidecar, the container `name`: the exempt uid, readiness on 15021, flags the binary knows.
fn assert_sidecar(pod: &Value, name: &str) {
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15090");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");

    let proxy = container(&pod["spec"]["containers"], name);
    assert_eq!(strings(&proxy["command"]), ["/usr/local/bin/capture-proxy"]);
    let security = &proxy["securityContext"];
    assert_eq!(security["runAsUser"].as_u64(), Some(1337));
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert!(security["capabilities"]["add"].is_null(), "REDIRECT mode needs no capability");
    let probe = &proxy["readinessProbe"]["httpGet"];
    assert_eq!((probe["path"].as_str(), probe["port"].as_u64()), (Some("/healthz/ready"), Some(15021)));
    let ports: Vec<u64> = proxy["ports"].as_sequence().unwrap().iter().filter_map(|p| p["containerPort"].as_u64()).collect();
    assert!(ports.contains(&15090) && ports.contains(&15021), "{ports:?}");

    let help = String::from_utf8(run_ok(Command::new(release_bin("capture-proxy")).arg("--help")).stdout).unwrap();
    for flag in strings(&proxy["args"]).iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "capture-proxy has no {flag}");
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn init_container_pod_runs_istios_standard_capture() {
    require_netns!();
    let docs = documents("pod-init-container.yaml");
    let pod = kind(&docs, "Pod");
    let init = container(&pod["spec"]["initContainers"], "istio-init");
    assert_eq!(strings(&init["command"]), ["/usr/local/bin/istio-iptables"]);
    assert_eq!(strings(&init["args"]), SEED_ARGS);
    let security = &init["securityContext"];
    assert_eq!(strings(&security["capabilities"]["add"]), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(security["runAsUser"].as_u64(), Some(0));
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(false));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_ne!(security["privileged"].as_bool(), Some(true));
    assert_sidecar(pod, "capture-proxy");

    // The container's command line and environment, run by the real binary.
    let net = Pod::with_address("10.44.0.5/24");
    let mut cmd = net.cmd(release_bin("istio-iptables"));
    cmd.env_clear().args(strings(&init["args"])).arg("--dry-run");
    for var in init["env"].as_sequence().unwrap() {
        cmd.env(str_of(&var["name"], "env name"), str_of(&var["value"], "env value"));
    }
    let script = String::from_utf8(run_ok(&mut cmd).stdout).unwrap();
    assert!(script.contains("add table inet istio-proxy-nat"), "the image has no iptables, so nftables: {script}");
    assert!(script.contains("redirect to :15006") && script.contains("meta skuid 1337"), "{script}");
}

#[test]
fn cni_mode_pod_needs_no_init_container_and_no_capability() {
    let docs = documents("pod-cni-mode.yaml");
    let pod = kind(&docs, "Pod");
    assert!(pod["spec"]["initContainers"].is_null());
    for c in pod["spec"]["containers"].as_sequence().unwrap() {
        assert!(c["securityContext"]["capabilities"]["add"].is_null(), "{:?} adds capabilities", c["name"]);
        assert_ne!(c["securityContext"]["privileged"].as_bool(), Some(true));
    }
    // The annotation the plugin selects pods by names the sidecar, as Istio's injector writes it.
    let status: serde_json::Value =
        serde_json::from_str(str_of(&pod["metadata"]["annotations"]["sidecar.istio.io/status"], "status")).unwrap();
    assert_eq!(status["containers"], json!(["istio-proxy"]));
    assert_sidecar(pod, "istio-proxy");
}

#[test]
fn cni_daemonset_installs_and_chains_a_valid_plugin_config() {
    let docs = documents("cni-daemonset.yaml");
    let daemonset = kind(&docs, "DaemonSet");
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "the installer must not need the pod network");
    let install = container(&spec["containers"], "install-cni");
    assert_eq!(strings(&install["command"]), ["/usr/local/bin/istio-capture-cni", "install"]);
    let args = strings(&install["args"]);
    let flag = |name: &str| {
        args.iter().find_map(|a| a.strip_prefix(&format!("--{name}="))).unwrap_or_else(|| panic!("no --{name}")).to_string()
    };
    assert!(flag("watch").parse::<u64>().unwrap() > 0);

    // Each directory the installer writes is the node's, mounted where the flags point.
    let mount_of = |path: &str| {
        let mount = install["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| path.starts_with(str_of(&m["mountPath"], "mountPath")));
        let volume = str_of(&mount.unwrap_or_else(|| panic!("{path} is not mounted"))["name"], "mount name");
        spec["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == volume).unwrap().clone()
    };
    assert_eq!(mount_of(&flag("cni-bin-dir"))["hostPath"]["path"], "/opt/cni/bin");
    assert_eq!(mount_of(&flag("cni-conf-dir"))["hostPath"]["path"], "/etc/cni/net.d");
    let config_map_name = str_of(&mount_of(&flag("plugin-config"))["configMap"]["name"], "configMap name").to_string();

    let config_map = kind(&docs, "ConfigMap");
    assert_eq!(config_map["metadata"]["name"], config_map_name.as_str());
    let file = Path::new(&flag("plugin-config")).file_name().unwrap().to_str().unwrap().to_string();
    let entry: serde_json::Value = serde_json::from_str(str_of(&config_map["data"][file.as_str()], "plugin.json")).unwrap();
    assert_eq!(entry["type"], "istio-capture-cni");
    assert_eq!(entry["capture"]["nativeNftables"], true, "the image has no iptables userspace");

    // The entry as the runtime will hand it over (name and version from the list, the
    // annotations of the CNI-mode pod): it must pass validation, select the pod, and fail only
    // on the namespace, which this test does not give.
    let mut conf = entry.clone();
    conf["cniVersion"] = json!("1.0.0");
    conf["name"] = json!("k8s-pod-network");
    let pod_docs = documents("pod-cni-mode.yaml");
    let annotations = &kind(&pod_docs, "Pod")["metadata"]["annotations"];
    conf["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": serde_json::to_value(annotations).unwrap() });
    let mut child = Command::new(release_bin("istio-capture-cni"))
        .env_clear()
        .envs([("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/opt/cni/bin")])
        .env("CNI_NETNS", "/var/run/netns/no-such-pod-here")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["code"], 4, "the configuration must be valid: {error}");
}

/// Istio's injector output with our image as proxy_init: the init container is Istio's, untouched
/// (no command, the subcommand word first), and our image's entrypoint runs it as written.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn istio_injected_pod_runs_our_image_unchanged() {
    require_netns!();
    let docs = documents("pod-istio-injected.yaml");
    let spec = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let init = container(&spec["initContainers"], "istio-init");
    assert!(is_ours(str_of(&init["image"], "image")) && str_of(&init["image"], "image").contains('/'), "{:?}", init["image"]);
    assert!(str_of(&init["image"], "image").contains("capture-iptables:"), "Istio's default mode needs iptables");
    assert!(init["command"].is_null(), "Istio's injector writes no command");
    let args = strings(&init["args"]);
    assert_eq!(args[0], "istio-iptables");
    assert_eq!(args[1..args.len() - 1], *SEED_ARGS, "Istio's standard capture");
    assert_eq!(args.last().unwrap(), "--log_output_level=default:info");
    let security = &init["securityContext"];
    assert_eq!(strings(&security["capabilities"]["add"]), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(security["runAsUser"].as_u64(), Some(0));

    // Native sidecar: Istio's proxy follows istio-init as a restartable init container.
    let inits: Vec<&str> = spec["initContainers"].as_sequence().unwrap().iter().map(|c| str_of(&c["name"], "name")).collect();
    assert_eq!(inits, ["istio-init", "istio-proxy"]);
    assert_eq!(container(&spec["initContainers"], "istio-proxy")["restartPolicy"], "Always");

    // What the container runs: the image's entrypoint with the args, as written.
    let entrypoint = image_entrypoint();
    assert_eq!(entrypoint, ["/usr/local/bin/istio-iptables"]);
    let net = Pod::with_address("10.44.0.5/24");
    let mut cmd = net.cmd(release_bin("istio-iptables"));
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).args(&args).arg("--dry-run");
    let script = String::from_utf8(run_ok(&mut cmd).stdout).unwrap();
    assert!(script.contains("*nat") && script.contains("-j REDIRECT --to-ports 15006"), "iptables rules: {script}");
}

#[test]
fn every_container_runs_a_binary_the_image_ships() {
    for file in ["pod-init-container.yaml", "pod-cni-mode.yaml", "cni-daemonset.yaml", "pod-istio-injected.yaml"] {
        for doc in documents(file) {
            let spec = if doc["kind"] == "Pod" { &doc["spec"] } else { &doc["spec"]["template"]["spec"] };
            let lists = [&spec["initContainers"], &spec["containers"]];
            for c in lists.into_iter().filter_map(Value::as_sequence).flatten() {
                if c["image"].as_str().is_some_and(is_ours) {
                    let command = if c["command"].is_null() { image_entrypoint() } else { strings(&c["command"]) };
                    let program = command.first().cloned().unwrap_or_default();
                    assert!(IMAGE_BINARIES.contains(&program.as_str()), "{file}: {:?} runs {program:?}", c["name"]);
                    release_bin(program.rsplit('/').next().unwrap());
                }
            }
        }
    }
}
