//! Which pods are captured, and how each pod's annotations change its capture: istio-cni's
//! pod selection (cni/pkg/plugin/plugin.go, `doAddRun`) and per-pod settings
//! (sidecar_redirect.go), read from the annotations the runtime passes rather than from the
//! Kubernetes API.
//!
//! A runtime passes a pod's annotations to a plugin entry declaring the capability
//! [`ANNOTATIONS_CAPABILITY`] (containerd 1.5 and later, CRI-O), but not its labels or its
//! containers: the injector's `sidecar.istio.io/status` annotation, which names the containers
//! it injected, is what says a pod has a sidecar.

use std::collections::BTreeMap;
use std::fmt;

use capture_lib::settings::{Front, Setting, Settings};
use serde_json::Value;

use crate::netconf::{CniArgs, NetConf};
use crate::protocol::PluginError;

/// The capability (and `runtimeConfig` key) under which runtimes pass the pod's annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// Written by Istio's injector: JSON naming the containers, init containers and volumes it added.
pub const STATUS: &str = "sidecar.istio.io/status";
/// `"false"` (Go's boolean syntax) turns injection, and so capture, off.
pub const INJECT: &str = "sidecar.istio.io/inject";
/// The injected proxy container (a sidecar container, or a native sidecar init container).
const PROXY_CONTAINER: &str = "istio-proxy";
/// The injected init container that programs the capture itself (Istio without CNI).
const INIT_CONTAINER: &str = "istio-init";

/// A pod's annotations, as the runtime passed them.
pub type Annotations = BTreeMap<String, String>;

/// Whether a pod is captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Capture,
    Skip(Skip),
}

/// Why a pod is not captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    ExcludedNamespace(String),
    /// The runtime passed no annotations at all, and the node did not opt into capturing every pod.
    NoAnnotations,
    InjectionDisabled(String),
    NotInjected,
    RunsIstioInit,
    NoProxy(Vec<String>),
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::ExcludedNamespace(namespace) => write!(f, "its namespace {namespace:?} is excluded"),
            Skip::NoAnnotations => write!(
                f,
                "the runtime passed no pod annotations, so whether the pod has a sidecar is unknown (declare the \
                 capability \"{ANNOTATIONS_CAPABILITY}\" in the plugin's entry, or set \"captureAllPods\": true)"
            ),
            Skip::InjectionDisabled(value) => write!(f, "{INJECT} is {value:?}"),
            Skip::NotInjected => write!(f, "it has no {STATUS} annotation (no sidecar was injected)"),
            Skip::RunsIstioInit => write!(f, "{STATUS} names {INIT_CONTAINER}, which captures the pod itself"),
            Skip::NoProxy(containers) => write!(f, "{STATUS} names no {PROXY_CONTAINER} container (it names {containers:?})"),
        }
    }
}

/// Istio's selection, in its order. Without annotations from the runtime, a pod is captured
/// only when the node opted into capturing every pod: one without a proxy would otherwise have
/// its traffic sent to ports where nothing listens.
pub fn select(conf: &NetConf, args: &CniArgs) -> Result<Selection, PluginError> {
    if conf.exclude_namespaces.contains(&args.pod_namespace) {
        return Ok(Selection::Skip(Skip::ExcludedNamespace(args.pod_namespace.clone())));
    }
    let Some(annotations) = &conf.pod_annotations else {
        return Ok(if conf.capture_all_pods { Selection::Capture } else { Selection::Skip(Skip::NoAnnotations) });
    };
    // Go's strconv.ParseBool, as Istio reads it; a value it cannot read disables nothing.
    if let Some(inject) = annotations.get(INJECT) {
        if go_syntax::parse_bool(inject) == Ok(false) {
            return Ok(Selection::Skip(Skip::InjectionDisabled(inject.clone())));
        }
    }
    let Some(status) = annotations.get(STATUS) else {
        return Ok(Selection::Skip(Skip::NotInjected));
    };
    let injected = injected_containers(status)?;
    Ok(if injected.iter().any(|name| name == INIT_CONTAINER) {
        Selection::Skip(Skip::RunsIstioInit)
    } else if injected.iter().any(|name| name == PROXY_CONTAINER) {
        Selection::Capture
    } else {
        Selection::Skip(Skip::NoProxy(injected))
    })
}

/// The init containers and containers the status annotation names (absent or `null` lists are empty).
fn injected_containers(status: &str) -> Result<Vec<String>, PluginError> {
    let refused = |why: String| PluginError::Annotation { name: STATUS, value: status.to_string(), why };
    let parsed: Value = serde_json::from_str(status).map_err(|e| refused(format!("not JSON: {e}")))?;
    let Value::Object(fields) = parsed else {
        return Err(refused("not a JSON object".into()));
    };
    let mut names = Vec::new();
    for field in ["initContainers", "containers"] {
        match fields.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for item in items {
                    let name = item.as_str().ok_or_else(|| refused(format!("{field}: {item} is not a container name")))?;
                    names.push(name.to_string());
                }
            }
            Some(other) => return Err(refused(format!("{field}: {other} is not a list"))),
        }
    }
    Ok(names)
}

/// Puts the pod's capture annotations (capture-lib declares which annotations each setting
/// has) over `settings`, the node's: each replaces the node's value, as in Istio it replaces the
/// default, and keeps its name, so that a later refusal names the annotation. Of a setting's
/// annotations the first the pod has wins (`istio.io/reroute-virtual-interfaces` over the
/// deprecated `traffic.sidecar.istio.io/kubevirtInterfaces`); the others are not read. As
/// Istio does, each value is first validated on its own, so that its refusal shows it whole.
pub fn apply_annotations(annotations: &Annotations, settings: &mut Settings) -> Result<(), PluginError> {
    for &setting in Setting::ALL {
        let declared = setting.declaration().annotations;
        let Some(name) = declared.iter().copied().find(|name| annotations.contains_key(*name)) else {
            continue;
        };
        let value = &annotations[name];
        let mut alone = Settings::new(Front::Annotation);
        alone.set(setting, value.clone(), name);
        if let Err(refusal) = alone.capture_config() {
            return Err(PluginError::Annotation { name, value: value.clone(), why: refusal.to_string() });
        }
        settings.set(setting, value.clone(), name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capture_lib::config::{InboundPorts, InterceptionMode, OutboundRanges};
    use capture_lib::settings::CaptureConfig;
    use serde_json::json;

    const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

    const PROXY_STATUS: &str = r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#;

    fn conf(extra: Value) -> NetConf {
        let mut entry = json!({ "cniVersion": "1.0.0", "name": "k8s", "excludeNamespaces": ["kube-system"] });
        entry.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        NetConf::parse(entry.to_string().as_bytes()).unwrap()
    }

    fn with_annotations(pairs: &[(&str, &str)]) -> NetConf {
        let annotations: serde_json::Map<String, Value> = pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        conf(json!({ "runtimeConfig": { ANNOTATIONS_CAPABILITY: annotations } }))
    }

    fn in_namespace(namespace: &str) -> CniArgs {
        CniArgs::parse(&format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-1")).unwrap()
    }

    fn selected(conf: &NetConf) -> Selection {
        select(conf, &in_namespace("shop")).unwrap()
    }

    #[test]
    fn an_injected_pod_is_captured_whether_its_proxy_is_a_container_or_a_native_sidecar() {
        assert_eq!(selected(&with_annotations(&[(STATUS, PROXY_STATUS)])), Selection::Capture);
        let native = r#"{"initContainers":["istio-validation","istio-proxy"],"containers":null}"#;
        assert_eq!(selected(&with_annotations(&[(STATUS, native)])), Selection::Capture);
    }

    #[test]
    fn pods_without_a_sidecar_are_not_captured() {
        assert_eq!(selected(&with_annotations(&[])), Selection::Skip(Skip::NotInjected));
        assert_eq!(selected(&with_annotations(&[("app", "web")])), Selection::Skip(Skip::NotInjected));
        let gateway_less = r#"{"containers":["app-helper"]}"#;
        assert_eq!(
            selected(&with_annotations(&[(STATUS, gateway_less)])),
            Selection::Skip(Skip::NoProxy(vec!["app-helper".into()]))
        );
        let with_init = r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#;
        assert_eq!(selected(&with_annotations(&[(STATUS, with_init)])), Selection::Skip(Skip::RunsIstioInit));
    }

    #[test]
    fn injection_disabled_in_go_syntax_wins_over_the_status() {
        for off in ["false", "0", "f", "F", "FALSE", "False"] {
            let conf = with_annotations(&[(STATUS, PROXY_STATUS), (INJECT, off)]);
            assert_eq!(selected(&conf), Selection::Skip(Skip::InjectionDisabled(off.into())), "{off}");
        }
        for other in ["true", "yes", ""] {
            assert_eq!(selected(&with_annotations(&[(STATUS, PROXY_STATUS), (INJECT, other)])), Selection::Capture, "{other}");
        }
    }

    #[test]
    fn excluded_namespaces_come_first() {
        let conf = with_annotations(&[(STATUS, PROXY_STATUS)]);
        let skip = select(&conf, &in_namespace("kube-system")).unwrap();
        assert_eq!(skip, Selection::Skip(Skip::ExcludedNamespace("kube-system".into())));
    }

    #[test]
    fn without_annotations_only_the_opt_in_captures() {
        assert_eq!(selected(&conf(json!({}))), Selection::Skip(Skip::NoAnnotations));
        assert!(Skip::NoAnnotations.to_string().contains("captureAllPods"));
        assert_eq!(selected(&conf(json!({ "captureAllPods": true }))), Selection::Capture);
        let excluded = select(&conf(json!({ "captureAllPods": true })), &in_namespace("kube-system")).unwrap();
        assert_eq!(excluded, Selection::Skip(Skip::ExcludedNamespace("kube-system".into())));
        // Annotations passed, the pod has none: the opt-in does not apply.
        let passed = conf(json!({ "captureAllPods": true, "runtimeConfig": { ANNOTATIONS_CAPABILITY: {} } }));
        assert_eq!(selected(&passed), Selection::Skip(Skip::NotInjected));
    }

    #[test]
    fn a_status_that_is_not_the_injectors_json_is_refused_naming_it() {
        for (status, why) in [
            ("injected", "=\"injected\": not JSON"),
            ("[]", "=\"[]\": not a JSON object"),
            (r#"{"containers":"istio-proxy"}"#, ": containers: \"istio-proxy\" is not a list"),
            (r#"{"initContainers":[1]}"#, ": initContainers: 1 is not a container name"),
        ] {
            let err = select(&with_annotations(&[(STATUS, status)]), &in_namespace("shop")).unwrap_err();
            assert!(matches!(&err, PluginError::Annotation { name: STATUS, .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains(STATUS) && message.contains(why), "{message}");
        }
    }

    fn annotated(pairs: &[(&str, &str)]) -> Result<CaptureConfig, PluginError> {
        let mut settings = Settings::new(Front::CniKey);
        let annotations = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        apply_annotations(&annotations, &mut settings)?;
        Ok(settings.capture_config()?)
    }

    #[test]
    fn each_annotation_sets_its_setting() {
        let cfg = annotated(&[
            (INTERCEPTION_MODE, "TPROXY"),
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/8"),
            ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.1.0.0/16"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080,9090"),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "5432"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "6379"),
            ("traffic.sidecar.istio.io/excludeInterfaces", "net1"),
            (KUBEVIRT_INTERFACES, "virt0"),
        ])
        .unwrap();
        assert_eq!(cfg.mode, InterceptionMode::Tproxy);
        assert!(matches!(&cfg.outbound_ranges, OutboundRanges::Only(v) if v.len() == 1));
        assert_eq!(cfg.outbound_ranges_exclude.len(), 1);
        assert_eq!(cfg.inbound_ports, InboundPorts::Only(vec![8080, 9090]));
        assert_eq!((cfg.outbound_ports_include, cfg.outbound_ports_exclude), (vec![5432], vec![6379]));
        assert_eq!(cfg.exclude_interfaces.len(), 1);
        assert_eq!(cfg.kube_virt_interfaces.len(), 1);
        let excluded = annotated(&[("traffic.sidecar.istio.io/excludeInboundPorts", "8081")]).unwrap();
        assert_eq!(excluded.inbound_ports, InboundPorts::All { except: vec![8081] });
    }

    #[test]
    fn reroute_virtual_interfaces_wins_over_kubevirt_even_when_kubevirt_is_bad() {
        let both = [(REROUTE_VIRTUAL_INTERFACES, "virt1,virt2"), (KUBEVIRT_INTERFACES, "bad name!")];
        assert_eq!(annotated(&both).unwrap().kube_virt_interfaces.len(), 2);
        let err = annotated(&[(KUBEVIRT_INTERFACES, "bad name!")]).unwrap_err().to_string();
        assert!(err.contains(KUBEVIRT_INTERFACES) && err.contains("bad name!"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_annotation_and_the_value() {
        for (annotation, value) in [
            (INTERCEPTION_MODE, "tproxy"),
            (INTERCEPTION_MODE, "NONE"),
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33"),
            ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "http"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "99999"),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "0"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "-1"),
            ("traffic.sidecar.istio.io/excludeInterfaces", "a/b"),
            (REROUTE_VIRTUAL_INTERFACES, "x".repeat(16).as_str()),
        ] {
            let err = annotated(&[(annotation, value)]).unwrap_err();
            let message = err.to_string();
            let shown_value = if value == "*" { "'*'" } else { value };
            assert!(message.contains(annotation) && message.contains(shown_value), "{annotation}={value}: {message}");
            assert_eq!(err.code(), crate::protocol::ErrorCode::InvalidConfig, "{message}");
        }
    }

    #[test]
    fn annotations_the_pod_does_not_have_keep_the_nodes_settings_and_names() {
        let mut settings = Settings::new(Front::CniKey);
        settings.set_named(Front::CniKey, "excludeOutboundPorts", "6379").unwrap();
        apply_annotations(&[("app".to_string(), "web".to_string())].into(), &mut settings).unwrap();
        assert_eq!(settings.text(Setting::ExcludeOutboundPorts), "6379");
        assert_eq!(settings.name(Setting::ExcludeOutboundPorts), "excludeOutboundPorts");
        apply_annotations(&[("traffic.sidecar.istio.io/excludeOutboundPorts".to_string(), "".to_string())].into(), &mut settings)
            .unwrap();
        assert_eq!(settings.text(Setting::ExcludeOutboundPorts), "", "an empty annotation replaces the node's value");
    }
}
