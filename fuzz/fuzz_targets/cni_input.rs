//! The CNI plugin's whole input, as a runtime hands it over: the `CNI_*` variables (the command,
//! `CNI_NETNS`, `CNI_ARGS`) and the network configuration on stdin (our keys, Istio's conflist
//! keys, `capture`, `runtimeConfig` with the pod's annotations, `prevResult`), answered by the
//! plugin's own entry point in its dry-run mode, which decides everything the input decides and
//! touches no namespace. Nothing panics, and every refusal is a CNI error object.
//!
//! The configuration is mostly built as JSON from the names the plugin and Istio use and values
//! around their edges, so that the fuzzer gets past the decoder; sometimes it is raw bytes.

#![no_main]

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use capture_lib::settings::Setting;
use istio_capture_cni::{respond, Mode};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// Keys of the plugin's entry besides those every configuration gets below (`cniVersion`, `name`,
/// `type`, `capture`, `runtimeConfig`, `prevResult`): the rest of the CNI specification's, ours,
/// Istio CNI's, and near misses.
#[rustfmt::skip]
const ENTRY_KEYS: &[&str] = &[
    "args", "capabilities", "ipMasq", "ipam", "dns", "excludeNamespaces", "captureAllPods", "excludeNamespace",
    "plugin_log_level", "cni_agent_run_dir", "ambient_enabled", "enablement_selectors", "exclude_namespaces",
    "pod_namespace", "native_nftables", "enable_ambient_detection_retry", "kubernetes", "log_level",
    "log_uds_address", "cni_event_address", "hostNSEnterExec", "kubeconfig", "k8s_api_root", "node_name", "cni_bin_dir",
];
/// The annotations that say whether a pod has a sidecar.
const SELECTION_ANNOTATIONS: &[&str] = &["sidecar.istio.io/status", "sidecar.istio.io/inject", "status.sidecar.istio.io/port"];

/// The capture settings' CNI keys (in `capture`, `runtimeConfig.capture` and `CNI_ARGS`), and a near miss.
fn capture_keys() -> &'static [&'static str] {
    static KEYS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| Setting::ALL.iter().filter_map(|s| s.declaration().cni_key).chain(["inboundPort"]).collect())
}

/// The pod annotations Istio's plugin reads (the capture settings' from their declarations), and
/// one it does not.
fn annotation_names() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let settings = Setting::ALL.iter().flat_map(|s| s.declaration().annotations.iter().copied());
        settings.chain(SELECTION_ANNOTATIONS.iter().copied()).chain(["proxy.istio.io/config"]).collect()
    })
}

/// Keys runtimes put in `CNI_ARGS`.
const ARGS_KEYS: &[&str] =
    &["IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "FOO"];
/// Values near the edges of what the settings accept.
const VALUES: &[&str] = &[
    "",
    "*",
    "0",
    "1",
    "15001",
    "65535",
    "65536",
    "70000",
    "-1",
    "4294967295",
    "1337",
    "80,443",
    "8080,",
    ",",
    "*,80",
    "10.0.0.0/8",
    "10.0.0.0/33",
    "::/0",
    "fd00::1/128",
    "10.0.0.1",
    "REDIRECT",
    "TPROXY",
    "NONE",
    "true",
    "false",
    "TRUE",
    "1",
    "eth0",
    "lo",
    "eth0,tap0",
    "!",
    "a\"b",
    "0123456789abcdef",
    "kube-system",
    "shop",
    "legacy",
    "nft",
    "disabled",
    r#"{"containers":["istio-proxy"]}"#,
    r#"{"containers":["app"],"initContainers":["istio-init"]}"#,
    "{",
    "null",
    "debug",
    "info",
    "warn",
    "error",
    "none",
];
const VERSIONS: &[&str] = &["1.0.0", "0.4.0", "0.3.1", "0.3.0", "0.2.0", "1.1.0", ""];
const COMMANDS: &[&str] = &["ADD", "CHECK", "DEL", "VERSION", "GC", ""];

fn text(u: &mut Unstructured, pool: &[&str]) -> Result<String> {
    Ok(if u.ratio(1, 4)? { u.arbitrary::<String>()? } else { u.choose(pool)?.to_string() })
}

/// A JSON value of any type, shallow: mostly text from `pool`.
fn value(u: &mut Unstructured, pool: &[&str], depth: u32) -> Result<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Value::from(u.arbitrary::<f64>()?),
        4 if depth > 0 => Value::Array((0..u.int_in_range(0..=3)?).map(|_| value(u, pool, depth - 1)).collect::<Result<_>>()?),
        // Nested objects (Istio's `kubernetes`, `capabilities`) take the entry's key names too.
        5 if depth > 0 => Value::Object(object(u, ENTRY_KEYS, pool, depth - 1)?),
        _ => Value::String(text(u, pool)?),
    })
}

/// An object whose keys come mostly from `keys`, its values from `pool`.
fn object(u: &mut Unstructured, keys: &[&str], pool: &[&str], depth: u32) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for _ in 0..u.int_in_range(0..=4)? {
        map.insert(text(u, keys)?, value(u, pool, depth)?);
    }
    Ok(map)
}

/// The pod's annotations as containerd passes them: a string map (sometimes not).
fn annotations(u: &mut Unstructured) -> Result<Value> {
    if u.ratio(1, 8)? {
        return value(u, VALUES, 1);
    }
    let mut map = Map::new();
    for _ in 0..u.int_in_range(0..=5)? {
        map.insert(text(u, annotation_names())?, Value::String(text(u, VALUES)?));
    }
    Ok(Value::Object(map))
}

/// The network configuration on stdin.
fn configuration(u: &mut Unstructured) -> Result<Vec<u8>> {
    if u.ratio(1, 8)? {
        return Ok(u.arbitrary::<&[u8]>()?.to_vec());
    }
    let mut conf = Map::new();
    if !u.ratio(1, 16)? {
        conf.insert("cniVersion".into(), Value::String(text(u, VERSIONS)?));
    }
    if !u.ratio(1, 16)? {
        conf.insert("name".into(), Value::String(text(u, &["k8s-pod-network"])?));
    }
    conf.insert("type".into(), "istio-capture-cni".into());
    if u.arbitrary()? {
        conf.insert("capture".into(), Value::Object(object(u, capture_keys(), VALUES, 1)?));
    }
    if u.arbitrary()? {
        let mut runtime = Map::new();
        runtime.insert("io.kubernetes.cri.pod-annotations".into(), annotations(u)?);
        if u.arbitrary()? {
            runtime.insert("capture".into(), Value::Object(object(u, capture_keys(), VALUES, 1)?));
        }
        conf.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    if u.arbitrary()? {
        let ips = serde_json::json!({ "ips": [{ "address": "10.78.0.5/24", "gateway": "10.78.0.1" }] });
        conf.insert("prevResult".into(), if u.ratio(3, 4)? { ips } else { value(u, VALUES, 1)? });
    }
    for (key, value) in object(u, ENTRY_KEYS, VALUES, 2)? {
        conf.insert(key, value);
    }
    Ok(serde_json::to_vec(&Value::Object(conf)).expect("a JSON value serializes"))
}

/// `CNI_ARGS`: `K=V` pairs, mostly the runtime's and capture keys, sometimes anything.
fn cni_args(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    let mut pairs = Vec::new();
    for _ in 0..u.int_in_range(0..=4)? {
        let key = if u.arbitrary()? { text(u, ARGS_KEYS)? } else { text(u, capture_keys())? };
        pairs.push(format!("{key}={}", text(u, VALUES)?));
    }
    Ok(pairs.join(";"))
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let input = (|| -> Result<_> {
        let command = text(&mut u, COMMANDS)?;
        // A path that is no namespace (a dry run enters none anyway), absent, or anything.
        let netns = match u.int_in_range(0..=3)? {
            0 => None,
            1 => Some(u.arbitrary::<String>()?),
            _ => Some("/var/run/netns/fuzz-pod-that-is-not-there".to_string()),
        };
        Ok((command, netns, cni_args(&mut u)?, configuration(&mut u)?))
    })();
    let Ok((command, netns, args, stdin)) = input else { return };
    let var = |name: &str| match name {
        "CNI_COMMAND" => Some(command.clone()),
        "CNI_NETNS" => netns.clone(),
        "CNI_ARGS" => Some(args.clone()),
        "CNI_CONTAINERID" => Some("fuzz".to_string()),
        "CNI_IFNAME" => Some("eth0".to_string()),
        "CNI_PATH" => Some("/opt/cni/bin".to_string()),
        _ => None,
    };
    let answer = respond(var, Ok(stdin.clone()), Mode::DryRun);

    let Some(error) = answer.error else {
        match command.as_str() {
            // ADD's result and VERSION's answer are objects in a version the plugin speaks.
            "ADD" | "VERSION" => {
                let reply = answer.stdout.expect("ADD and VERSION reply");
                assert!(reply.get("cniVersion").and_then(Value::as_str).is_some_and(|v| !v.is_empty()), "{reply}");
            }
            "DEL" | "CHECK" => assert_eq!(answer.stdout, None),
            other => panic!("{other:?} accepted as a command"),
        }
        return;
    };
    // A refusal: the spec's error object, and a message for the runtime's log.
    assert!(!error.is_empty());
    let object = answer.stdout.expect("a refusal has an error object");
    let mut fields: Vec<&str> = object.as_object().expect("an object").keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["cniVersion", "code", "details", "msg"], "{object}");
    // Every refusal of input: bad version (1), environment or CNI_ARGS (4), undecodable (6),
    // invalid configuration (7). Nothing ran, so nothing failed (999) or was busy (11).
    let code = object["code"].as_u64().expect("a numeric code");
    assert!([1, 4, 6, 7].contains(&code), "code {code}: {object}");
    assert!(object["msg"].as_str().is_some_and(|m| !m.is_empty()), "{object}");
    // In the version the configuration declares when it can be read, else the latest.
    let declared = serde_json::from_slice::<Value>(&stdin).ok().and_then(|c| Some(c.get("cniVersion")?.as_str()?.to_string()));
    let version = object["cniVersion"].as_str().expect("a version string");
    assert!(version == "1.0.0" || Some(version) == declared.as_deref(), "{object}");
});
