//! The keys of Istio's own plugin entry (istio-cni's `Config` in cni/pkg/plugin/plugin.go,
//! today's and those of earlier releases), accepted beside ours so that an entry written for
//! istio-cni works once its `type` is changed. Each key is honoured with Istio's meaning,
//! accepted and ignored (and why), or refused. JSON `null` is "unset", as Go reads it into the
//! zero value (Istio's installer writes `"exclude_namespaces": null` when none are excluded).

use capture_lib::log_level::Level;
use serde_json::{Map, Value};

use crate::protocol::PluginError;

/// What Istio's keys ask of us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioKeys {
    /// `exclude_namespaces` and `kubernetes.exclude_namespaces` (earlier Istio releases).
    pub exclude_namespaces: Vec<String>,
    /// `native_nftables`: our capture setting `nativeNftables`.
    pub native_nftables: Option<bool>,
    /// `plugin_log_level`, or `log_level` (earlier Istio releases). The plugin logs to stderr,
    /// which runtimes put in their log: from `info`, why a pod is not captured; from `warn`,
    /// what a run did not stop for (the error of a failed ADD is always written).
    pub log_level: Option<Level>,
}

/// The JSON type a key must have (or `null`).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Flag,
    List,
}

/// Top-level keys accepted and ignored, with why ignoring them is right.
const IGNORED: [(&str, Kind, &str); 7] = [
    ("cni_agent_run_dir", Kind::Text, "the directory of Istio's node agent (its kubeconfig and log socket); we need neither"),
    (
        "log_uds_address",
        Kind::Text,
        "the socket of Istio's node agent for the plugin's logs; we log to stderr, into the runtime's log",
    ),
    ("cni_event_address", Kind::Text, "the socket of Istio's node agent for ambient pods' events; we do not do ambient"),
    ("enablement_selectors", Kind::List, "which pods are ambient; we do not do ambient"),
    ("enable_ambient_detection_retry", Kind::Flag, "ambient only; we do not do ambient"),
    (
        "pod_namespace",
        Kind::Text,
        "the namespace of Istio's own agent pod, which Istio skips by name; that pod has no sidecar, so we never capture it",
    ),
    ("hostNSEnterExec", Kind::Flag, "how old istio-cni entered namespaces; we enter them in-process"),
];

/// Keys of the `kubernetes` object accepted and ignored: the pod's annotations come from the
/// runtime (the `io.kubernetes.cri.pod-annotations` capability), so the API is never asked.
const IGNORED_KUBERNETES: [(&str, Kind, &str); 4] = [
    ("kubeconfig", Kind::Text, "we do not call the Kubernetes API"),
    ("k8s_api_root", Kind::Text, "we do not call the Kubernetes API"),
    ("node_name", Kind::Text, "we do not call the Kubernetes API"),
    ("cni_bin_dir", Kind::Text, "we run no other binary from it"),
];

impl IstioKeys {
    /// Takes Istio's keys out of `conf`, checking each; what is left is for the caller.
    pub fn take(conf: &mut Map<String, Value>) -> Result<IstioKeys, PluginError> {
        for (key, kind, _why) in IGNORED {
            check_kind(key, kind, conf.remove(key))?;
        }
        if check_kind("ambient_enabled", Kind::Flag, conf.remove("ambient_enabled"))? == Some(Value::Bool(true)) {
            return Err(PluginError::Config(
                "ambient_enabled: true asks for Istio's ambient mode, which istio-capture-cni does not do (it captures \
                 pods injected with a sidecar); remove the key or set it to false"
                    .into(),
            ));
        }
        let mut keys = IstioKeys {
            exclude_namespaces: names("exclude_namespaces", conf.remove("exclude_namespaces"))?,
            native_nftables: check_kind("native_nftables", Kind::Flag, conf.remove("native_nftables"))?.and_then(|v| v.as_bool()),
            log_level: None,
        };
        let plugin_log_level = log_level("plugin_log_level", conf.remove("plugin_log_level"))?;
        let old_log_level = log_level("log_level", conf.remove("log_level"))?;
        keys.log_level = match (plugin_log_level, old_log_level) {
            (Some(new), Some(old)) if new != old => {
                return Err(PluginError::Config(format!(
                    "plugin_log_level ({new:?}) and log_level ({old:?}) disagree: give one (log_level is its older name)"
                )))
            }
            (new, old) => new.or(old),
        };
        if let Some(mut kubernetes) = object("kubernetes", conf.remove("kubernetes"))? {
            for (key, kind, _why) in IGNORED_KUBERNETES {
                check_kind(&format!("kubernetes.{key}"), kind, kubernetes.remove(key))?;
            }
            match check_kind("kubernetes.intercept_type", Kind::Text, kubernetes.remove("intercept_type"))? {
                None => {}
                Some(Value::String(kind)) if kind.is_empty() || kind == "iptables" => {}
                Some(other) => {
                    return Err(PluginError::Config(format!(
                        "kubernetes.intercept_type: {other} is not \"iptables\", istio-cni's one rule manager (the backend \
                         is chosen by native_nftables or capture.nativeNftables)"
                    )))
                }
            }
            let more = names("kubernetes.exclude_namespaces", kubernetes.remove("exclude_namespaces"))?;
            keys.exclude_namespaces.extend(more);
            if let Some(unknown) = kubernetes.keys().next() {
                return Err(PluginError::Config(format!("kubernetes: unknown key {unknown:?}")));
            }
        }
        Ok(keys)
    }
}

/// The value, unless it is `null`; refused when of another JSON type than `kind`.
fn check_kind(key: &str, kind: Kind, value: Option<Value>) -> Result<Option<Value>, PluginError> {
    let fits = match (&value, kind) {
        (None | Some(Value::Null), _) => return Ok(None),
        (Some(Value::String(_)), Kind::Text) | (Some(Value::Bool(_)), Kind::Flag) | (Some(Value::Array(_)), Kind::List) => true,
        _ => false,
    };
    if !fits {
        let expected = match kind {
            Kind::Text => "a string",
            Kind::Flag => "true or false",
            Kind::List => "a list",
        };
        return Err(PluginError::Config(format!("{key}: {} is not {expected}", value.unwrap_or_default())));
    }
    Ok(value)
}

fn log_level(key: &str, value: Option<Value>) -> Result<Option<Level>, PluginError> {
    let Some(Value::String(name)) = check_kind(key, Kind::Text, value)? else {
        return Ok(None);
    };
    let known: Vec<&str> = Level::ALL.iter().map(|level| level.name()).collect();
    Level::named(&name)
        .map(Some)
        .ok_or_else(|| PluginError::Config(format!("{key}: {name:?} is not a log level (expected {})", known.join(", "))))
}

fn object(key: &str, value: Option<Value>) -> Result<Option<Map<String, Value>>, PluginError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(PluginError::Config(format!("{key}: {other} is not an object"))),
    }
}

/// A list of namespace names.
pub fn names(key: &str, value: Option<Value>) -> Result<Vec<String>, PluginError> {
    let Some(Value::Array(items)) = check_kind(key, Kind::List, value)? else {
        return Ok(Vec::new());
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::String(name) => Ok(name),
            other => Err(PluginError::Config(format!("{key}: {other} is not a string"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn take(entry: Value) -> Result<(IstioKeys, Map<String, Value>), PluginError> {
        let mut conf = entry.as_object().unwrap().clone();
        IstioKeys::take(&mut conf).map(|keys| (keys, conf))
    }

    fn refused(entry: Value) -> String {
        take(entry).unwrap_err().to_string()
    }

    #[test]
    fn istios_installer_entries_of_every_release_are_read() {
        // What Istio's installer writes today (cni/pkg/install/cniconfig.go), null list included.
        let today = json!({ "plugin_log_level": "debug", "cni_agent_run_dir": "/var/run/istio-cni", "ambient_enabled": false,
            "enablement_selectors": [], "exclude_namespaces": null, "pod_namespace": "istio-system",
            "native_nftables": true, "enable_ambient_detection_retry": false, "type": "istio-cni" });
        let (keys, rest) = take(today).unwrap();
        assert_eq!(keys, IstioKeys { exclude_namespaces: vec![], native_nftables: Some(true), log_level: Some(Level::Debug) });
        assert_eq!(rest, *json!({ "type": "istio-cni" }).as_object().unwrap(), "ours are left for the caller");
        // Istio 1.21 and before: the kubernetes object, log_level, the node agent's sockets.
        let older = json!({ "log_level": "warn", "log_uds_address": "/var/run/istio-cni/log.sock",
            "cni_event_address": "/var/run/istio-cni/pluginevent.sock", "hostNSEnterExec": true,
            "exclude_namespaces": ["istio-system"],
            "kubernetes": { "kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig", "cni_bin_dir": "/opt/cni/bin",
                            "k8s_api_root": "", "node_name": "n1", "intercept_type": "iptables",
                            "exclude_namespaces": ["kube-system"] } });
        let (keys, rest) = take(older).unwrap();
        assert_eq!(keys.exclude_namespaces, ["istio-system", "kube-system"]);
        assert_eq!((keys.log_level, keys.native_nftables), (Some(Level::Warn), None));
        assert!(rest.is_empty());
    }

    #[test]
    fn ambient_is_refused() {
        assert!(refused(json!({ "ambient_enabled": true })).contains("ambient_enabled: true asks for Istio's ambient mode"));
    }

    #[test]
    fn values_of_the_wrong_type_or_unknown_levels_are_refused_naming_the_key() {
        for (entry, message) in [
            (json!({ "exclude_namespaces": "kube-system" }), r#"exclude_namespaces: "kube-system" is not a list"#),
            (json!({ "exclude_namespaces": [7] }), "exclude_namespaces: 7 is not a string"),
            (json!({ "native_nftables": "true" }), r#"native_nftables: "true" is not true or false"#),
            (json!({ "pod_namespace": 1 }), "pod_namespace: 1 is not a string"),
            (json!({ "plugin_log_level": "verbose" }), r#"plugin_log_level: "verbose" is not a log level"#),
            (json!({ "kubernetes": [] }), "kubernetes: [] is not an object"),
            (json!({ "kubernetes": { "kubeconfig": false } }), "kubernetes.kubeconfig: false is not a string"),
            (json!({ "kubernetes": { "intercept_type": "mock" } }), r#"kubernetes.intercept_type: "mock" is not "iptables""#),
            (json!({ "kubernetes": { "kubeconfg": "/x" } }), r#"kubernetes: unknown key "kubeconfg""#),
            (
                json!({ "plugin_log_level": "info", "log_level": "debug" }),
                "plugin_log_level (Info) and log_level (Debug) disagree",
            ),
        ] {
            let error = refused(entry.clone());
            assert!(error.contains(message), "{entry}: {error}");
        }
    }

    #[test]
    fn the_two_level_keys_may_agree() {
        let (keys, _) = take(json!({ "plugin_log_level": "none", "log_level": "none" })).unwrap();
        assert_eq!(keys.log_level, Some(Level::None));
    }
}
