//! The plugin's network configuration (stdin) and the per-pod overrides, merged into the
//! capture settings shared with istio-iptables, with Istio CNI's defaults.
//!
//! Capture keys are the camelCase names of istio-iptables' settings. Values take Istio's
//! syntax as strings (`"*"`, `"80,443"`), or JSON numbers, lists and booleans. Layers, each
//! overriding the one before: the `capture` object, `runtimeConfig.capture` (runtime
//! capability arguments), then `CNI_ARGS` pairs of the same keys; the pod's annotations go
//! over them all (pod.rs). Istio's own keys are read beside ours (istio_keys.rs).

use capture_lib::capture::Backend;
use capture_lib::log_level::Level;
use capture_lib::settings::{CaptureConfig, Front, Kind, Setting, Settings};
use serde_json::{Map, Value};

use crate::istio_keys::{self, IstioKeys};
use crate::pod::{self, Annotations, ANNOTATIONS_CAPABILITY};
use crate::protocol::PluginError;

/// Inbound ports Istio CNI never captures: the agent's status, health and metrics ports.
const ALWAYS_EXCLUDED_INBOUND_PORTS: [&str; 3] = ["15020", "15021", "15090"];

/// The `CNI_ARGS` keys runtimes send on their own (Kubernetes pod identity).
const RUNTIME_ARGS: [&str; 5] =
    ["IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"];

/// The keys our entry may hold: the CNI spec's (runtimes add some of them) and our own. Any
/// other is a mistake (a capture key outside `capture`, a typo) that would otherwise be ignored.
const ENTRY_KEYS: [&str; 13] = [
    "cniVersion",
    "name",
    "type",
    "args",
    "capabilities",
    "runtimeConfig",
    "prevResult",
    "ipMasq",
    "ipam",
    "dns",
    "excludeNamespaces",
    "captureAllPods",
    "capture",
];

/// What the runtime sent on stdin, as far as this plugin reads it.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    /// Pods in these Kubernetes namespaces are left alone (e.g. kube-system): ours and Istio's keys.
    pub exclude_namespaces: Vec<String>,
    /// Capture pods the runtime passes no annotations for (a runtime without the capability).
    pub capture_all_pods: bool,
    /// The pod's annotations, when the runtime passed them (`null`, Go's encoding of an empty
    /// map, is none).
    pub pod_annotations: Option<Annotations>,
    /// Istio's `plugin_log_level` (or `log_level`).
    pub log_level: Level,
    /// The previous plugin's result; an object whenever present.
    pub prev_result: Option<Map<String, Value>>,
    capture: Map<String, Value>,
    runtime_capture: Map<String, Value>,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf, PluginError> {
        let Value::Object(mut conf) = serde_json::from_slice(bytes).map_err(PluginError::Decode)? else {
            return Err(PluginError::Config("the network configuration is not a JSON object".into()));
        };
        let text = |conf: &Map<String, Value>, key: &str| match conf.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(PluginError::Config(format!("{key} must be a non-empty string"))),
        };
        let cni_version = text(&conf, "cniVersion")?;
        text(&conf, "name")?;
        let istio = IstioKeys::take(&mut conf)?;
        if let Some(unknown) = conf.keys().find(|key| !ENTRY_KEYS.contains(&key.as_str())) {
            let hint = if is_capture_key(unknown) { " (capture settings go in the \"capture\" object)" } else { "" };
            return Err(PluginError::Config(format!("unknown key {unknown:?}{hint}")));
        }
        let mut exclude_namespaces = istio_keys::names("excludeNamespaces", conf.remove("excludeNamespaces"))?;
        exclude_namespaces.extend(istio.exclude_namespaces);
        let capture_all_pods = match conf.remove("captureAllPods") {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(other) => return Err(PluginError::Config(format!("captureAllPods: {other} is not true or false"))),
        };
        let mut runtime_config = object(conf.remove("runtimeConfig"), "runtimeConfig")?.unwrap_or_default();
        let mut capture = capture_settings(conf.remove("capture"), "capture")?;
        if let Some(native) = istio.native_nftables {
            // A value that is no boolean is refused with the other settings.
            let ours = capture.get("nativeNftables").map(|ours| flag("capture.nativeNftables", ours)).transpose()?;
            match ours.as_deref().map(go_syntax::parse_bool) {
                Some(Ok(ours)) if ours != native => {
                    return Err(PluginError::Config(format!(
                        "native_nftables ({native}) and capture.nativeNftables ({ours}) disagree: give one (native_nftables \
                         is Istio's name for it)"
                    )))
                }
                _ => capture.insert("nativeNftables".into(), Value::Bool(native)),
            };
        }
        Ok(NetConf {
            cni_version,
            exclude_namespaces,
            capture_all_pods,
            pod_annotations: pod_annotations(runtime_config.remove(ANNOTATIONS_CAPABILITY))?,
            log_level: istio.log_level.unwrap_or(Level::Info),
            prev_result: object(conf.remove("prevResult"), "prevResult")?,
            capture,
            runtime_capture: capture_settings(runtime_config.remove("capture"), "runtimeConfig.capture")?,
        })
    }
}

/// The object under the key `name`, if present: any other JSON type (null too) is refused, never ignored.
fn object(value: Option<Value>, name: &str) -> Result<Option<Map<String, Value>>, PluginError> {
    match value {
        None => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(PluginError::Config(format!("{name}: {other} is not an object"))),
    }
}

/// The annotations the runtime passed: an object of strings, or `null` (how a Go runtime
/// encodes a pod's empty map); anything else is refused.
fn pod_annotations(value: Option<Value>) -> Result<Option<Annotations>, PluginError> {
    let refused = |what: String| PluginError::Config(format!("runtimeConfig.{ANNOTATIONS_CAPABILITY}: {what}"));
    match value {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(Annotations::new())),
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(name, value)| match value {
                Value::String(text) => Ok((name, text)),
                other => Err(refused(format!("the value of {name:?}, {other}, is not a string"))),
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(other) => Err(refused(format!("{other} is not an object of strings"))),
    }
}

/// The `cniVersion` a configuration declares, read without validating anything else (for the
/// replies of DEL, which reads no configuration).
pub fn declared_version(bytes: &[u8]) -> Option<String> {
    let conf: Value = serde_json::from_slice(bytes).ok()?;
    conf.get("cniVersion")?.as_str().map(str::to_string)
}

/// A capture setting's key (declared in capture-lib's settings).
fn is_capture_key(key: &str) -> bool {
    Setting::named(Front::CniKey, key).is_some()
}

/// A `capture` object: capture keys only.
fn capture_settings(value: Option<Value>, name: &str) -> Result<Map<String, Value>, PluginError> {
    let map = object(value, name)?.unwrap_or_default();
    match map.keys().find(|key| !is_capture_key(key)) {
        Some(unknown) => Err(PluginError::Config(format!("{name}: unknown setting {unknown:?}"))),
        None => Ok(map),
    }
}

/// The pod identity and capture overrides of `CNI_ARGS`.
#[derive(Debug, Clone, Default)]
pub struct CniArgs {
    pub pod_namespace: String,
    pub pod_name: String,
    overrides: Map<String, Value>,
}

impl CniArgs {
    /// `K=V;K=V`. Unknown keys are refused unless `IgnoreUnknown` is true, as the reference
    /// plugins do (runtimes set it when they add pod identity keys); like theirs, `IgnoreUnknown`
    /// is `1`, `true`, `0` or `false` in any case, and anything else is refused.
    pub fn parse(text: &str) -> Result<CniArgs, PluginError> {
        let mut pairs = Vec::new();
        for pair in text.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| PluginError::Args(format!("{pair:?} is not KEY=VALUE")))?;
            pairs.push((key, value));
        }
        let lookup = |wanted: &str| pairs.iter().find(|(k, _)| *k == wanted).map(|(_, v)| v.to_string());
        let ignore_unknown = match lookup("IgnoreUnknown") {
            None => false,
            Some(value) => match value.to_ascii_lowercase().as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => return Err(PluginError::Args(format!("IgnoreUnknown={value:?} is not 1, true, 0 or false"))),
            },
        };
        let mut overrides = Map::new();
        for (key, value) in &pairs {
            if is_capture_key(key) {
                overrides.insert(key.to_string(), Value::String(value.to_string()));
            } else if !RUNTIME_ARGS.contains(key) && !ignore_unknown {
                return Err(PluginError::Args(format!("unknown key {key:?} (set IgnoreUnknown=1 to skip unknown keys)")));
            }
        }
        Ok(CniArgs {
            pod_namespace: lookup("K8S_POD_NAMESPACE").unwrap_or_default(),
            pod_name: lookup("K8S_POD_NAME").unwrap_or_default(),
            overrides,
        })
    }
}

/// The capture of one pod, in the shared settings' terms.
#[derive(Debug, Clone)]
pub struct PodCapture {
    /// Each value keeps the name it was written under: a key, or the pod's annotation.
    pub settings: Settings,
    /// Program IPv6 whenever the pod has an IPv6 address.
    pub dual_stack: bool,
}

impl PodCapture {
    pub fn new(conf: &NetConf, args: &CniArgs) -> Result<PodCapture, PluginError> {
        let mut merged = conf.capture.clone();
        merged.extend(conf.runtime_capture.clone());
        merged.extend(args.overrides.clone());

        // Istio CNI's defaults for a pod without annotations.
        let mut settings = Settings::new(Front::CniKey);
        for (key, value) in &merged {
            let value = match Setting::named(Front::CniKey, key).map(|s| s.declaration().kind) {
                Some(Kind::Bool) => flag(key, value)?,
                _ => text(key, value)?,
            };
            settings.set_named(Front::CniKey, key, value);
        }
        // A CNI plugin cannot read the pod's resolv.conf, so DNS capture takes all port-53 traffic.
        if settings.given(Setting::CaptureAllDns).is_none() {
            let redirect_dns = settings.flag(Setting::RedirectDns)?;
            settings.set(Setting::CaptureAllDns, redirect_dns.to_string(), Setting::CaptureAllDns.name(Front::CniKey));
        }
        if settings.needs_dns_servers()? {
            return Err(PluginError::Config(format!(
                "{}: false needs the pod's resolv.conf, which a CNI plugin cannot read; \
                 leave it unset (DNS capture then takes all port-53 traffic)",
                settings.name(Setting::CaptureAllDns)
            )));
        }
        exclude_required_ports(&mut settings);
        let dual_stack = settings.flag(Setting::DualStack)?;
        Ok(PodCapture { settings, dual_stack })
    }

    /// This capture with the pod's annotations over it, as Istio's plugin reads them.
    pub fn with_annotations(mut self, annotations: &Annotations) -> Result<PodCapture, PluginError> {
        pod::apply_annotations(annotations, &mut self.settings)?;
        exclude_required_ports(&mut self.settings);
        Ok(self)
    }

    /// The validated capture and backend: every refusal a setting can cause, before any
    /// namespace is touched (ADD and CHECK, and the installer before it chains an entry).
    pub fn config(&self) -> Result<(CaptureConfig, Backend), PluginError> {
        Ok((self.settings.capture_config()?, Backend::from_settings(&self.settings)?))
    }
}

/// Istio-syntax text from a string, a number or a list of them.
fn text(key: &str, value: &Value) -> Result<String, PluginError> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let joined = match value {
        Value::Array(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>().map(|v| v.join(",")),
        other => scalar(other),
    };
    joined.ok_or_else(|| PluginError::Config(format!("{key}: {value} is not a string, a number or a list of them")))
}

/// A boolean, or its text (from CNI_ARGS; Go's forms, checked with the other settings).
fn flag(key: &str, value: &Value) -> Result<String, PluginError> {
    match value {
        Value::Bool(b) => Ok(b.to_string()),
        Value::String(s) => Ok(s.clone()),
        other => Err(PluginError::Config(format!("{key}: {other} is not true or false"))),
    }
}

/// Adds the ports Istio CNI always excludes to the inbound exclusions (the value keeps its origin).
fn exclude_required_ports(settings: &mut Settings) {
    let excluded = with_required_ports(settings.text(Setting::ExcludeInboundPorts));
    settings.set(Setting::ExcludeInboundPorts, excluded, settings.name(Setting::ExcludeInboundPorts));
}

/// `list` plus the ports Istio CNI always excludes, each once.
fn with_required_ports(list: &str) -> String {
    let mut ports: Vec<&str> = capture_lib::config::split_list(list).collect();
    for port in ALWAYS_EXCLUDED_INBOUND_PORTS {
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use capture_lib::config::{DnsCapture, InboundPorts, OutboundRanges};

    fn conf(json: &str) -> NetConf {
        NetConf::parse(json.as_bytes()).unwrap()
    }

    fn capture(json: &str, args: &str) -> Result<PodCapture, PluginError> {
        PodCapture::new(&conf(json), &CniArgs::parse(args)?)
    }

    #[test]
    fn defaults_are_istio_cnis() {
        let pod = capture(r#"{"cniVersion":"1.0.0","name":"k8s"}"#, "").unwrap();
        let cfg = pod.settings.capture_config().unwrap();
        assert_eq!(cfg.inbound_ports, InboundPorts::All { except: vec![15020, 15021, 15090] });
        assert_eq!(cfg.outbound_ranges, OutboundRanges::All);
        assert_eq!(cfg.outbound_ports_exclude, vec![15020]);
        assert_eq!((cfg.proxy_uids, cfg.proxy_gids), (vec![1337], vec![1337]));
        assert!(!pod.settings.flag(Setting::NativeNftables).unwrap() && !pod.dual_stack);
    }

    #[test]
    fn layers_override_in_order_and_lists_take_json_forms() {
        let json = r#"{"cniVersion":"1.0.0","name":"k8s",
            "capture":{"excludeInboundPorts":[8081,"15021"],"proxyUID":1000,"redirectDNS":true,"nativeNftables":true},
            "runtimeConfig":{"capture":{"proxyUID":"2000","interceptionMode":"TPROXY"}}}"#;
        let pod = capture(json, "IgnoreUnknown=1;K8S_POD_NAME=web;interceptionMode=REDIRECT;dropInvalid=true").unwrap();
        let s = &pod.settings;
        assert_eq!(s.text(Setting::ExcludeInboundPorts), "8081,15021,15020,15090");
        assert_eq!((s.text(Setting::ProxyUid), s.text(Setting::InterceptionMode)), ("2000", "REDIRECT"));
        assert!(s.flag(Setting::DropInvalid).unwrap() && s.flag(Setting::NativeNftables).unwrap());
        assert_eq!(s.capture_config().unwrap().dns, DnsCapture::All, "capture-all-DNS follows redirect-DNS");
    }

    #[test]
    fn bad_input_names_the_key() {
        let base = r#"{"cniVersion":"1.0.0","name":"k8s","capture":"#;
        let err = |capture_json: &str| NetConf::parse(format!("{base}{capture_json}}}").as_bytes()).unwrap_err().to_string();
        assert!(err(r#"{"inboundPort":"80"}"#).contains("unknown setting \"inboundPort\""));
        let bad_flag = capture(&format!(r#"{base}{{"redirectDNS":"yes"}}}}"#), "").unwrap_err();
        assert_eq!(
            bad_flag.to_string(),
            "invalid capture setting: redirectDNS: \"yes\" is not a boolean (expected true or false, 1 or 0, t or f)"
        );
        assert_eq!(bad_flag.code(), crate::protocol::ErrorCode::InvalidConfig);
        let bad_port = capture(r#"{"cniVersion":"1.0.0","name":"k8s"}"#, "excludeOutboundPorts=99999").unwrap();
        let err = bad_port.settings.capture_config().unwrap_err().to_string();
        assert!(err.starts_with("excludeOutboundPorts: \"99999\""), "{err}");
        let no_servers = capture(&format!(r#"{base}{{"redirectDNS":true,"captureAllDNS":false}}}}"#), "");
        assert!(no_servers.unwrap_err().to_string().contains("resolv.conf"));
    }

    #[test]
    fn unknown_entry_keys_are_refused_and_capture_keys_pointed_to_their_place() {
        let parse = |extra: &str| NetConf::parse(format!(r#"{{"cniVersion":"1.0.0","name":"k8s",{extra}}}"#).as_bytes());
        let misplaced = parse(r#""proxyPort":"15001""#).unwrap_err().to_string();
        assert!(misplaced.contains(r#"unknown key "proxyPort" (capture settings go in the "capture" object)"#), "{misplaced}");
        let typo = parse(r#""excludeNamespace":["kube-system"]"#).unwrap_err().to_string();
        assert_eq!(typo, r#"invalid network configuration: unknown key "excludeNamespace""#);
        let spec_keys = r#""type":"istio-capture-cni","args":{},"capabilities":{},"ipMasq":false,"ipam":{},"dns":{}"#;
        assert!(parse(spec_keys).is_ok());
    }

    #[test]
    fn pod_annotations_are_an_object_of_strings_or_null() {
        let with = |annotations: &str| {
            let json =
                format!(r#"{{"cniVersion":"1.0.0","name":"k8s","runtimeConfig":{{"{ANNOTATIONS_CAPABILITY}":{annotations}}}}}"#);
            NetConf::parse(json.as_bytes())
        };
        let passed = with(r#"{"sidecar.istio.io/status":"{}","app":"web"}"#).unwrap().pod_annotations.unwrap();
        assert_eq!(passed.get("app").map(String::as_str), Some("web"));
        assert_eq!(with("null").unwrap().pod_annotations, Some(Annotations::new()), "Go's empty map");
        assert_eq!(conf(r#"{"cniVersion":"1.0.0","name":"k8s"}"#).pod_annotations, None);
        for (bad, why) in [(r#"{"a":1}"#, r#"the value of "a", 1, is not a string"#), ("[]", "[] is not an object of strings")] {
            let err = with(bad).unwrap_err();
            assert_eq!(err.code(), crate::protocol::ErrorCode::InvalidConfig);
            assert_eq!(err.to_string(), format!("invalid network configuration: runtimeConfig.{ANNOTATIONS_CAPABILITY}: {why}"));
        }
    }

    #[test]
    fn istio_keys_join_ours() {
        let conf = conf(
            r#"{"cniVersion":"1.0.0","name":"k8s","excludeNamespaces":["kube-system"],"exclude_namespaces":["istio-system"],
                "native_nftables":true,"plugin_log_level":"error","captureAllPods":true}"#,
        );
        assert_eq!(conf.exclude_namespaces, ["kube-system", "istio-system"]);
        assert_eq!((conf.log_level, conf.capture_all_pods), (Level::Error, true));
        let pod = PodCapture::new(&conf, &CniArgs::default()).unwrap();
        assert!(pod.settings.flag(Setting::NativeNftables).unwrap(), "native_nftables is capture.nativeNftables");
        let agreeing = r#"{"cniVersion":"1.0.0","name":"k8s","native_nftables":false,"capture":{"nativeNftables":"false"}}"#;
        assert!(NetConf::parse(agreeing.as_bytes()).is_ok());
        let disagreeing = r#"{"cniVersion":"1.0.0","name":"k8s","native_nftables":false,"capture":{"nativeNftables":true}}"#;
        let err = NetConf::parse(disagreeing.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("native_nftables (false) and capture.nativeNftables (true) disagree"), "{err}");
        let typo = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","exclude_namespace":[]}"#).unwrap_err();
        assert_eq!(typo.to_string(), r#"invalid network configuration: unknown key "exclude_namespace""#);
        let not_a_flag = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","captureAllPods":"yes"}"#).unwrap_err();
        assert!(not_a_flag.to_string().contains(r#"captureAllPods: "yes" is not true or false"#), "{not_a_flag}");
    }

    #[test]
    fn annotations_replace_the_nodes_values_and_the_required_ports_stay_excluded() {
        let node = capture(r#"{"cniVersion":"1.0.0","name":"k8s","capture":{"excludeInboundPorts":"9000"}}"#, "").unwrap();
        let annotations: Annotations = [
            ("traffic.sidecar.istio.io/excludeInboundPorts".to_string(), "8081".to_string()),
            ("traffic.sidecar.istio.io/excludeOutboundPorts".to_string(), "6379".to_string()),
        ]
        .into();
        let pod = node.clone().with_annotations(&annotations).unwrap();
        assert_eq!(pod.settings.text(Setting::ExcludeInboundPorts), "8081,15020,15021,15090");
        assert_eq!(pod.settings.name(Setting::ExcludeInboundPorts), "traffic.sidecar.istio.io/excludeInboundPorts");
        let outbound = pod.settings.text(Setting::ExcludeOutboundPorts);
        assert_eq!(outbound, "6379", "as in Istio, the annotation replaces the default 15020");
        let (config, _) = node.with_annotations(&Annotations::new()).unwrap().config().unwrap();
        assert_eq!(config.inbound_ports, InboundPorts::All { except: vec![9000, 15020, 15021, 15090] });
    }

    #[test]
    fn the_declared_version_is_read_from_any_json_object() {
        assert_eq!(declared_version(br#"{"cniVersion":"0.4.0","capture":"broken"}"#).as_deref(), Some("0.4.0"));
        assert_eq!(declared_version(b"{not json"), None);
    }

    #[test]
    fn cni_args_refuse_unknown_keys_unless_told() {
        assert!(matches!(CniArgs::parse("FOO=1"), Err(PluginError::Args(_))));
        assert!(matches!(CniArgs::parse("novalue"), Err(PluginError::Args(_))));
        let args = CniArgs::parse("IgnoreUnknown=1;FOO=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1").unwrap();
        assert_eq!((args.pod_namespace.as_str(), args.pod_name.as_str()), ("shop", "web-1"));
    }

    #[test]
    fn missing_fields_and_other_shapes_are_config_errors() {
        assert!(matches!(NetConf::parse(b"[1]"), Err(PluginError::Config(_))));
        assert!(matches!(NetConf::parse(b"{\"name\":\"x\"}"), Err(PluginError::Config(m)) if m.contains("cniVersion")));
        assert!(matches!(NetConf::parse(b"{not json"), Err(PluginError::Decode(_))));
        let conf = conf(r#"{"cniVersion":"0.4.0","name":"k8s","excludeNamespaces":["kube-system"],"prevResult":{"ips":[]}}"#);
        assert_eq!(conf.exclude_namespaces, vec!["kube-system"]);
        assert!(conf.prev_result.is_some());
    }

    #[test]
    fn objects_of_another_json_type_are_refused_naming_the_key() {
        for key in ["prevResult", "runtimeConfig", "capture"] {
            for value in [r#""x""#, "7", "[{}]", "null", "true"] {
                let json = format!(r#"{{"cniVersion":"1.0.0","name":"k8s","{key}":{value}}}"#);
                let err = NetConf::parse(json.as_bytes()).unwrap_err();
                assert!(matches!(&err, PluginError::Config(m) if *m == format!("{key}: {value} is not an object")), "{err}");
            }
        }
        let nested = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","runtimeConfig":{"capture":"x"}}"#);
        assert!(matches!(nested, Err(PluginError::Config(m)) if m == r#"runtimeConfig.capture: "x" is not an object"#));
        let runtime_only = conf(r#"{"cniVersion":"1.0.0","name":"k8s","runtimeConfig":{"portMappings":[]}}"#);
        assert!(runtime_only.runtime_capture.is_empty());
    }

    #[test]
    fn ignore_unknown_is_a_boolean_as_the_reference_plugins_read_it() {
        for yes in ["1", "true", "True", "TRUE"] {
            assert!(CniArgs::parse(&format!("IgnoreUnknown={yes};FOO=1")).is_ok(), "{yes}");
        }
        for no in ["0", "false", "False"] {
            assert!(
                matches!(CniArgs::parse(&format!("IgnoreUnknown={no};FOO=1")), Err(PluginError::Args(m)) if m.contains("FOO"))
            );
        }
        for bad in ["yes", "", "2"] {
            let err = CniArgs::parse(&format!("IgnoreUnknown={bad}")).unwrap_err();
            assert!(matches!(&err, PluginError::Args(m) if m.starts_with("IgnoreUnknown=")), "{bad}: {err}");
        }
    }
}
