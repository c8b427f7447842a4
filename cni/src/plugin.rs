//! ADD, DEL and CHECK: program, remove or verify the capture in the pod's namespace with
//! capture-lib, in this process (no init container, no iptables process with nftables).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use capture_lib::capture::{self, Backend, Operation, Report, Request};
use capture_lib::log_level::Level;
use capture_lib::namespace::{self, NamespaceError};
use capture_lib::settings::CaptureConfig;
use capture_lib::Detail;
use serde_json::Value;

use crate::netconf::{CniArgs, NetConf, PodCapture};
use crate::pod::{self, Selection};
use crate::protocol::{self, Invocation, PluginError};

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

/// ADD: programs the capture, and passes the previous plugin's result on.
pub fn add(invocation: &Invocation, conf: &NetConf, args: &CniArgs) -> Result<Reply, PluginError> {
    if let Some((config, backend, dual_stack)) = validate(invocation, conf, args)? {
        let config = enter_pod(invocation, config, dual_stack)?;
        let operation = Operation::Apply { reconcile: true, force: false };
        let request = Request { config, backend, operation, dry_run: false, lock_wait: LOCK_WAIT, detail: Detail::Outcome };
        warn(conf.log_level, capture::run(&request)?);
    }
    Ok(Some(passed_through(conf)))
}

/// CHECK: passes only when the namespace holds exactly the requested capture.
pub fn check(invocation: &Invocation, conf: &NetConf, args: &CniArgs) -> Result<Reply, PluginError> {
    refuse_early_check(conf)?;
    if let Some((config, backend, dual_stack)) = validate(invocation, conf, args)? {
        let config = enter_pod(invocation, config, dual_stack)?;
        capture::verify(&config, backend, LOCK_WAIT)?;
    }
    Ok(None)
}

/// Everything ADD and CHECK refuse, before any namespace is touched; `None` for a pod that is
/// not captured (pod.rs). The node's configuration (and the node's own namespace) is refused
/// for every pod, captured or not, so that a broken node shows at once; a pod's annotations
/// only when it is captured, as Istio reads them.
fn validate(
    invocation: &Invocation,
    conf: &NetConf,
    args: &CniArgs,
) -> Result<Option<(CaptureConfig, Backend, bool)>, PluginError> {
    if !protocol::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(PluginError::Version(conf.cni_version.clone()));
    }
    let node = PodCapture::new(conf, args)?;
    let node_config = node.config()?;
    refuse_node_namespace(invocation.netns.as_deref().unwrap_or(Path::new("")))?;
    if let Selection::Skip(why) = pod::select(conf, args)? {
        if conf.log_level >= Level::Info {
            eprintln!("istio-capture-cni: {}: not captured: {why}", describe(invocation, Some(args)));
        }
        return Ok(None);
    }
    let dual_stack = node.dual_stack;
    // Without annotations the pod's capture is the node's, already validated.
    let (config, backend) = match &conf.pod_annotations {
        Some(annotations) => node.with_annotations(annotations)?.config()?,
        None => node_config,
    };
    Ok(Some((config, backend, dual_stack)))
}

/// DEL: removes whatever capture of ours the pod's namespace holds, and succeeds when the
/// namespace is gone. It reads no configuration at all: a runtime's DEL of a failed ADD, or of
/// a pod whose node configuration broke since, carries the same broken configuration, and a
/// failing DEL stops the runtime's teardown of the whole chain (IPs, host chains and veths of
/// the plugins before us would leak). So nothing is taken from the settings, and every pod is
/// cleaned, whatever `excludeNamespaces` says now (nothing of ours is in an excluded pod).
pub fn delete(invocation: &Invocation) -> Result<Reply, PluginError> {
    let Some(netns) = invocation.netns.as_deref() else {
        return Ok(None);
    };
    // ADD never programs the node's namespace, so nothing there is ours: what is (an istio-iptables
    // run on the node, another mesh's node rules) must survive a runtime's confused DEL. Refusing
    // would stop the chain's teardown, so DEL leaves it alone and succeeds.
    match is_node_namespace(netns) {
        Ok(false) => {}
        Ok(true) => {
            eprintln!("istio-capture-cni: DEL: {} is the node's own network namespace: left alone", netns.display());
            return Ok(None);
        }
        Err(e) => {
            eprintln!("istio-capture-cni: DEL: {e}: {} left alone", netns.display());
            return Ok(None);
        }
    }
    if !enter_if_present(netns)? {
        return Ok(None);
    }
    warn(Level::Info, capture::run(&cleanup_request())?);
    Ok(None)
}

/// What DEL runs: capture-lib's cleanup finds every capture of ours by what it is (both
/// backends' rules and chains, the TPROXY routing of any mark and table, `::6`), whatever
/// settings made it, so the request's settings are mere defaults. Native nftables as the
/// backend: where iptables cannot run (a node without it), nothing of it is looked for.
fn cleanup_request() -> Request {
    Request {
        config: CaptureConfig::default(),
        backend: Backend::Nftables,
        operation: Operation::Cleanup,
        dry_run: false,
        lock_wait: LOCK_WAIT,
        detail: Detail::Outcome,
    }
}

/// What the user should know of a run that did not stop it, for the runtime's log.
fn warn(level: Level, report: Report) {
    if level < Level::Warn {
        return;
    }
    for warning in report.warnings {
        eprintln!("istio-capture-cni: warning: {warning}");
    }
}

/// A chained plugin that adds no interface returns the previous plugin's result unchanged.
fn passed_through(conf: &NetConf) -> Value {
    let mut result = conf.prev_result.clone().unwrap_or_default();
    result.entry("cniVersion").or_insert_with(|| Value::String(conf.cni_version.clone()));
    Value::Object(result)
}

/// Whether `netns` is the network namespace this process runs in: the node's, since runtimes
/// run plugins from it. Namespaces are the same when their nsfs device and inode are. A path
/// that cannot be read is not (entering it will say why).
fn is_node_namespace(netns: &Path) -> Result<bool, PluginError> {
    let own = std::fs::metadata("/proc/self/ns/net").map_err(PluginError::OwnNamespaceUnknown)?;
    Ok(std::fs::metadata(netns).is_ok_and(|given| (given.dev(), given.ino()) == (own.dev(), own.ino())))
}

/// ADD and CHECK refuse the node's own namespace (code 7).
fn refuse_node_namespace(netns: &Path) -> Result<(), PluginError> {
    match is_node_namespace(netns)? {
        true => Err(PluginError::NodeNamespace(netns.to_path_buf())),
        false => Ok(()),
    }
}

/// Moves this (single-threaded) process into the pod's namespace, and checks it may change it.
fn enter(netns: &Path) -> Result<(), PluginError> {
    namespace::enter(netns).map_err(PluginError::Namespace)?;
    namespace::require_net_admin().map_err(PluginError::Namespace)
}

/// Enters the pod's namespace and completes `config` with what Istio reads there: whether the
/// pod's addresses call for IPv6 rules.
fn enter_pod(invocation: &Invocation, config: CaptureConfig, dual_stack: bool) -> Result<CaptureConfig, PluginError> {
    enter(invocation.netns.as_deref().unwrap_or(Path::new("")))?;
    let ipv6 = namespace::uses_ipv6(dual_stack).map_err(PluginError::Namespace)?;
    Ok(CaptureConfig { ipv6, ..config })
}

/// For DEL: false when the namespace is already gone (nothing can be left in it).
fn enter_if_present(netns: &Path) -> Result<bool, PluginError> {
    match enter(netns) {
        Ok(()) => Ok(true),
        Err(PluginError::Namespace(NamespaceError::Open { source, .. })) if source.kind() == io::ErrorKind::NotFound => Ok(false),
        // The path exists but is no namespace any more (an unmounted bind mount).
        Err(PluginError::Namespace(NamespaceError::Enter { source: nix::errno::Errno::EINVAL, .. })) => Ok(false),
        Err(e) => Err(e),
    }
}

/// CHECK arrived in spec 0.4.0.
fn refuse_early_check(conf: &NetConf) -> Result<(), PluginError> {
    match protocol::allows_check(&conf.cni_version) {
        true => Ok(()),
        false => Err(PluginError::CheckNotAllowed(conf.cni_version.clone())),
    }
}

/// ADD or CHECK as far as either goes without the pod's namespace: every refusal it makes from
/// its input alone, and ADD's reply (for [`crate::Mode::DryRun`]).
pub fn dry_run(invocation: &Invocation, conf: &NetConf, args: &CniArgs) -> Result<Reply, PluginError> {
    if invocation.command == protocol::Command::Check {
        refuse_early_check(conf)?;
    }
    validate(invocation, conf, args)?;
    Ok((invocation.command == protocol::Command::Add).then(|| passed_through(conf)))
}
