//! ADD, DEL and CHECK: program, remove or verify the capture in the pod's namespace with
//! capture-lib, in this process (no init container, no iptables process with nftables).

use std::io;
use std::path::Path;
use std::time::Duration;

use capture_lib::capture::{self, Operation, Request};
use capture_lib::config::CaptureConfig;
use capture_lib::namespace::{self, NamespaceError};
use capture_lib::Detail;
use serde_json::Value;

use crate::netconf::{CniArgs, NetConf, PodCapture, KEY_NAMES};
use crate::protocol::{self, Command, Invocation, PluginError};

/// How long to wait for another run on the same namespace before answering "try again later".
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// What the runtime gets on success: a result (ADD, VERSION) or nothing (DEL, CHECK).
pub type Reply = Option<Value>;

/// Everything known about the request, for the error's details.
pub fn describe(invocation: &Invocation, args: Option<&CniArgs>) -> String {
    let mut out = format!("{} for container {:?}", invocation.command, invocation.container_id);
    if let Some(args) = args.filter(|a| !a.pod_name.is_empty()) {
        out.push_str(&format!(", pod {}/{}", args.pod_namespace, args.pod_name));
    }
    if let Some(netns) = &invocation.netns {
        out.push_str(&format!(", netns {}", netns.display()));
    }
    out
}

/// Handles one invocation whose configuration has been read and parsed.
pub fn handle(invocation: &Invocation, conf: &NetConf, args: &CniArgs) -> Result<Reply, PluginError> {
    if !protocol::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(PluginError::Version(conf.cni_version.clone()));
    }
    if invocation.command == Command::Check && !protocol::allows_check(&conf.cni_version) {
        return Err(PluginError::CheckNotAllowed(conf.cni_version.clone()));
    }
    // Validate everything before touching the namespace, whatever the command.
    let pod = PodCapture::new(conf, args)?;
    let config = pod.settings.capture_config(&KEY_NAMES)?;
    let backend = pod.settings.backend(&KEY_NAMES)?;
    let excluded = conf.exclude_namespaces.contains(&args.pod_namespace);
    match invocation.command {
        Command::Version => Ok(Some(protocol::version_info())),
        Command::Add => {
            if !excluded {
                let config = enter_pod(invocation, config, pod.dual_stack)?;
                let operation = Operation::Apply { reconcile: true, force: false };
                let detail = Detail::Outcome;
                let report = capture::run(&Request { config, backend, operation, dry_run: false, lock_wait: LOCK_WAIT, detail })?;
                for warning in report.warnings {
                    eprintln!("istio-capture-cni: warning: {warning}");
                }
            }
            Ok(Some(passed_through(conf)))
        }
        Command::Del => {
            if excluded || !enter_if_present(invocation)? {
                return Ok(None);
            }
            // Whatever the pod's addresses now, remove IPv6 leftovers too if it has any.
            let config = CaptureConfig { ipv6: namespace::uses_ipv6(true).unwrap_or(false), ..config };
            let operation = Operation::Cleanup;
            let request = Request { config, backend, operation, dry_run: false, lock_wait: LOCK_WAIT, detail: Detail::Outcome };
            capture::run(&request)?;
            Ok(None)
        }
        Command::Check => {
            if !excluded {
                let config = enter_pod(invocation, config, pod.dual_stack)?;
                capture::verify(&config, backend, LOCK_WAIT)?;
            }
            Ok(None)
        }
    }
}

/// A chained plugin that adds no interface returns the previous plugin's result unchanged.
fn passed_through(conf: &NetConf) -> Value {
    let mut result = conf.prev_result.clone().unwrap_or_default();
    result.entry("cniVersion").or_insert_with(|| Value::String(conf.cni_version.clone()));
    Value::Object(result)
}

/// Moves this (single-threaded) process into the pod's namespace, and checks it may change it.
fn enter(invocation: &Invocation) -> Result<(), PluginError> {
    let netns = invocation.netns.as_deref().unwrap_or(Path::new(""));
    namespace::enter(netns).map_err(PluginError::Namespace)?;
    namespace::require_net_admin().map_err(PluginError::Namespace)
}

/// Enters the pod's namespace and completes `config` with what Istio reads there: whether the
/// pod's addresses call for IPv6 rules.
fn enter_pod(invocation: &Invocation, config: CaptureConfig, dual_stack: bool) -> Result<CaptureConfig, PluginError> {
    enter(invocation)?;
    let ipv6 = namespace::uses_ipv6(dual_stack).map_err(PluginError::Namespace)?;
    Ok(CaptureConfig { ipv6, ..config })
}

/// For DEL: false when the namespace is already gone (nothing can be left in it).
fn enter_if_present(invocation: &Invocation) -> Result<bool, PluginError> {
    if invocation.netns.is_none() {
        return Ok(false);
    }
    match enter(invocation) {
        Ok(()) => Ok(true),
        Err(PluginError::Namespace(NamespaceError::Open { source, .. }))
            if source.kind() == io::ErrorKind::NotFound =>
        {
            Ok(false)
        }
        // The path exists but is no namespace any more (an unmounted bind mount).
        Err(PluginError::Namespace(NamespaceError::Enter { source: nix::errno::Errno::EINVAL, .. })) => Ok(false),
        Err(e) => Err(e),
    }
}
