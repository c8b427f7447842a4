//! The command line, for people and DaemonSets rather than runtimes: `--help`, `--version`,
//! `install` and `uninstall`.
//!
//! `install` puts the plugin on a node: it validates our entry with the plugin's own parser
//! (as the runtime will hand it over), copies this (static) binary into the node's CNI bin
//! directory and chains the entry at the end of the node's network configuration list. The
//! entry declares the capability that has containerd and CRI-O pass each pod's annotations
//! (pod.rs), unless it says otherwise. Every
//! write is a rename of a complete file, so the runtime never reads half of one. With `--watch`
//! it stays and repairs both when they change (a primary CNI rewriting its conflist drops our
//! entry), until SIGTERM or SIGINT. `uninstall` takes our entry out of every conflist and
//! removes the binary.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{json, Value};
use thiserror::Error;

use crate::netconf::{CniArgs, NetConf, PodCapture};
use crate::pod::ANNOTATIONS_CAPABILITY;
use crate::protocol::{PluginError, SUPPORTED_VERSIONS};

/// Our `type` in a conflist, which is also the name of the installed binary.
const PLUGIN_TYPE: &str = "istio-capture-cni";
/// What `--version` prints after the name.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CNI spec 0.3.0, 0.3.1, 0.4.0, 1.0.0)");

#[derive(Debug, Parser)]
#[command(
    name = "istio-capture-cni",
    version = VERSION,
    about = "A chained CNI plugin that programs Istio's sidecar capture in each pod's network namespace",
    long_about = "A chained CNI plugin that programs Istio's sidecar capture in each pod's network namespace.\n\n\
        Container runtimes run it with CNI_COMMAND (ADD, DEL, CHECK, VERSION) and the other CNI_* variables set, \
        the network configuration on stdin, and no arguments; it then answers as the CNI specification says. \
        Run by people, its subcommands put it on a node and take it off.",
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the plugin on this node and chain it into the node's CNI configuration.
    Install(InstallArgs),
    /// Take our entry out of the node's CNI configuration and remove the plugin's binary.
    Uninstall(NodeDirs),
}

/// Where the node's CNI directories are, as mounted in this container.
#[derive(Debug, Clone, Args)]
struct NodeDirs {
    /// The node's CNI plugin directory.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/host/opt/cni/bin", value_name = "DIR")]
    cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory; the first *.conflist in it gets our entry.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/host/etc/cni/net.d", value_name = "DIR")]
    cni_conf_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
struct InstallArgs {
    #[command(flatten)]
    dirs: NodeDirs,
    /// JSON file holding our plugin entry ({"type": "istio-capture-cni", "capture": {...}}), refused
    /// (nothing installed) unless the plugin itself would accept it; the capability
    /// "io.kubernetes.cri.pod-annotations" is declared in it unless it sets that itself
    /// [default: native nftables, Istio CNI's capture defaults, kube-system excluded].
    #[arg(long, env = "PLUGIN_CONFIG", value_name = "FILE")]
    plugin_config: Option<PathBuf>,
    /// Keep running and repair the installation every SECONDS (for a DaemonSet's container), until
    /// SIGTERM or SIGINT.
    #[arg(long, value_name = "SECONDS")]
    watch: Option<u64>,
    /// With --watch: on SIGTERM or SIGINT, uninstall before exiting. Without it, the plugin and
    /// its entry stay (pods keep being captured), and the exit message says so.
    #[arg(long, requires = "watch")]
    uninstall_on_exit: bool,
}

#[derive(Debug, Error)]
enum InstallError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("no *.conflist in {0}: is the node's primary CNI installed yet? (single-plugin *.conf files are not chained)")]
    NoConflist(PathBuf),
    #[error("{path}: {why}")]
    BadJson { path: PathBuf, why: String },
    #[error("{entry}: the plugin would refuse it, so it was not installed: {error}")]
    InvalidEntry { entry: String, error: PluginError },
    #[error(
        "this build of istio-capture-cni loads shared libraries ({0}), which a node may lack or have in other \
         versions: install a static build (scripts/build.sh links it statically)"
    )]
    NotStatic(String),
    #[error("cannot wait for SIGTERM: {0}")]
    Signals(nix::Error),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Install(args) => match args.watch {
            None => finish("install", install(&args)),
            Some(seconds) => watch(args, Duration::from_secs(seconds.max(1))),
        },
        Command::Uninstall(dirs) => finish("uninstall", uninstall(&dirs)),
    }
}

/// Prints what changed, or the error; the exit code says which.
fn finish(what: &str, result: Result<Vec<String>, InstallError>) -> ExitCode {
    match result {
        Ok(changes) => {
            changes.iter().for_each(|change| eprintln!("istio-capture-cni {what}: {change}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("istio-capture-cni {what}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Installs every `period` until SIGTERM or SIGINT. As a container's PID 1 the process gets no
/// signal it has no handler for, so both are blocked in every thread and waited for here, while
/// another thread repairs; an install in progress finishes before the exit.
fn watch(args: InstallArgs, period: Duration) -> ExitCode {
    let stop = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT]);
    if let Err(e) = stop.thread_block() {
        return finish("install", Err(InstallError::Signals(e)));
    }
    let busy = Arc::new(Mutex::new(()));
    let repairer = Arc::clone(&busy);
    let installing = args.clone();
    std::thread::spawn(move || loop {
        {
            let _busy = repairer.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = finish("install", install(&installing));
        }
        std::thread::sleep(period);
    });
    let signal = match stop.wait() {
        Ok(signal) => signal,
        Err(e) => return finish("install", Err(InstallError::Signals(e))),
    };
    let _busy = busy.lock().unwrap_or_else(PoisonError::into_inner);
    eprintln!("istio-capture-cni install: {signal}: exiting");
    if args.uninstall_on_exit {
        return finish("uninstall", uninstall(&args.dirs));
    }
    match installed(&args.dirs) {
        Ok(left) if left.is_empty() => {}
        Ok(left) => eprintln!(
            "istio-capture-cni install: left in place (new pods are still captured; `istio-capture-cni uninstall` \
             removes them): {}",
            left.join(", ")
        ),
        Err(e) => eprintln!("istio-capture-cni install: cannot tell what is left in place: {e}"),
    }
    ExitCode::SUCCESS
}

/// Makes the node match; returns what had to change (nothing when it already did). Everything
/// is checked before anything is written.
fn install(args: &InstallArgs) -> Result<Vec<String>, InstallError> {
    let (mut entry, entry_name) = match &args.plugin_config {
        Some(path) => (read_json(path)?, path.display().to_string()),
        None => (
            json!({
                "type": PLUGIN_TYPE,
                "excludeNamespaces": ["kube-system"],
                "capture": { "nativeNftables": true }
            }),
            "the default entry".to_string(),
        ),
    };
    if entry.get("type") != Some(&json!(PLUGIN_TYPE)) {
        let why = format!("the plugin entry must have \"type\": \"{PLUGIN_TYPE}\"");
        return Err(InstallError::BadJson { path: PathBuf::from(entry_name), why });
    }
    declare_annotations_capability(&mut entry).map_err(|why| InstallError::BadJson { path: PathBuf::from(&entry_name), why })?;
    let conflist = find_conflist(&args.dirs.cni_conf_dir)?;
    let list = read_json(&conflist)?;
    validate(&entry, &list).map_err(|error| InstallError::InvalidEntry { entry: entry_name, error })?;
    let exe = std::env::current_exe().map_err(io_error("find", Path::new("/proc/self/exe")))?;
    let maps_path = Path::new("/proc/self/maps");
    let maps = fs::read_to_string(maps_path).map_err(io_error("read", maps_path))?;
    let libraries = shared_libraries(&maps, &exe);
    if !libraries.is_empty() {
        return Err(InstallError::NotStatic(libraries.join(", ")));
    }

    let mut changes = Vec::new();
    let binary = args.dirs.cni_bin_dir.join(PLUGIN_TYPE);
    if copy_if_changed(&exe, &binary, 0o755)? {
        changes.push(format!("installed {}", binary.display()));
    }
    if chain(&conflist, list, entry)? {
        changes.push(format!("chained {PLUGIN_TYPE} into {}", conflist.display()));
    }
    Ok(changes)
}

/// Has the runtime pass each pod's annotations (without them no pod is captured, unless the
/// entry opts into capturing all pods), unless the entry already says whether it wants them.
fn declare_annotations_capability(entry: &mut Value) -> Result<(), String> {
    let capabilities = entry
        .as_object_mut()
        .ok_or("the plugin entry is not a JSON object")?
        .entry("capabilities")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("\"capabilities\" is not an object")?;
    capabilities.entry(ANNOTATIONS_CAPABILITY).or_insert(Value::Bool(true));
    Ok(())
}

/// Refuses what the plugin would refuse at every ADD: `entry` is parsed as the runtime hands it
/// over (with the list's `cniVersion` and `name`), by the plugin's own parser, for a pod that
/// overrides nothing.
fn validate(entry: &Value, list: &Value) -> Result<(), PluginError> {
    let version = list.get("cniVersion").and_then(Value::as_str).unwrap_or_default();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(PluginError::Version(version.to_string()));
    }
    let mut conf = entry.clone();
    conf["cniVersion"] = json!(version);
    conf["name"] = list.get("name").cloned().unwrap_or(Value::Null);
    let conf = NetConf::parse(conf.to_string().as_bytes())?;
    PodCapture::new(&conf, &CniArgs::default())?.config().map(drop)
}

/// The files `maps` (a `/proc/PID/maps`) shows mapped besides the executable itself: the
/// loader and shared libraries, none for a static build.
fn shared_libraries(maps: &str, exe: &Path) -> Vec<String> {
    let mut files: Vec<String> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.starts_with('/') && Path::new(path) != exe)
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Takes our entries out of every conflist, then removes the binary (in that order, so that no
/// list names a plugin that is gone); returns what changed.
fn uninstall(dirs: &NodeDirs) -> Result<Vec<String>, InstallError> {
    let mut changes = Vec::new();
    for conflist in conflists(&dirs.cni_conf_dir)? {
        let mut list = read_json(&conflist)?;
        let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else { continue };
        let before = plugins.len();
        plugins.retain(|plugin| !is_ours(plugin));
        if plugins.len() != before {
            write_json(&conflist, &list)?;
            changes.push(format!("removed {PLUGIN_TYPE} from {}", conflist.display()));
        }
    }
    let binary = dirs.cni_bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => changes.push(format!("removed {}", binary.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("remove", &binary)(e)),
    }
    Ok(changes)
}

/// What of ours is on the node: the binary, and the conflists holding our entry.
fn installed(dirs: &NodeDirs) -> Result<Vec<String>, InstallError> {
    let binary = dirs.cni_bin_dir.join(PLUGIN_TYPE);
    let mut found: Vec<String> = binary.exists().then(|| binary.display().to_string()).into_iter().collect();
    for conflist in conflists(&dirs.cni_conf_dir)? {
        let list = read_json(&conflist)?;
        if list.get("plugins").and_then(Value::as_array).is_some_and(|plugins| plugins.iter().any(is_ours)) {
            found.push(format!("our entry in {}", conflist.display()));
        }
    }
    Ok(found)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type") == Some(&json!(PLUGIN_TYPE))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = fs::read(path).map_err(io_error("read", path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::BadJson { path: path.to_path_buf(), why: e.to_string() })
}

fn write_json(path: &Path, value: &Value) -> Result<(), InstallError> {
    let text =
        serde_json::to_vec_pretty(value).map_err(|e| InstallError::BadJson { path: path.to_path_buf(), why: e.to_string() })?;
    replace_file(path, &text, 0o644)
}

/// Writes `contents` to `path` through a temporary file and a rename.
fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.new"));
    fs::write(&temporary, contents).map_err(io_error("write", &temporary))?;
    fs::set_permissions(&temporary, fs::Permissions::from_mode(mode)).map_err(io_error("chmod", &temporary))?;
    fs::rename(&temporary, path).map_err(io_error("rename into", path))
}

fn copy_if_changed(from: &Path, to: &Path, mode: u32) -> Result<bool, InstallError> {
    let contents = fs::read(from).map_err(io_error("read", from))?;
    if fs::read(to).is_ok_and(|current| current == contents) {
        return Ok(false);
    }
    replace_file(to, &contents, mode)?;
    Ok(true)
}

/// The `*.conflist` files of `dir`, by name.
fn conflists(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut lists: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_error("list", dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "conflist"))
        .collect();
    lists.sort();
    Ok(lists)
}

/// The configuration the runtime uses: the first `*.conflist` by name.
fn find_conflist(dir: &Path) -> Result<PathBuf, InstallError> {
    conflists(dir)?.into_iter().next().ok_or_else(|| InstallError::NoConflist(dir.to_path_buf()))
}

/// Puts `entry` last in `list`'s plugins (read from `conflist`), replacing an older entry of
/// ours; false when the list already holds exactly that.
fn chain(conflist: &Path, mut list: Value, entry: Value) -> Result<bool, InstallError> {
    let bad = |why: &str| InstallError::BadJson { path: conflist.to_path_buf(), why: why.to_string() };
    let plugins = list.get_mut("plugins").and_then(Value::as_array_mut).ok_or_else(|| bad("no \"plugins\" list"))?;
    let before = plugins.clone();
    plugins.retain(|plugin| !is_ours(plugin));
    plugins.push(entry);
    if *plugins == before {
        return Ok(false);
    }
    write_json(conflist, &list)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn list() -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]})
    }

    #[test]
    fn chaining_appends_once_and_replaces_our_old_entry_and_uninstall_takes_it_out() {
        let dir = std::env::temp_dir().join(format!("capture-cni-chain-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("10-bridge.conflist");
        fs::write(&path, list().to_string()).unwrap();
        let ours = json!({"type": PLUGIN_TYPE, "capture": {"nativeNftables": true}});
        assert!(chain(&path, read_json(&path).unwrap(), ours.clone()).unwrap());
        assert!(!chain(&path, read_json(&path).unwrap(), ours).unwrap(), "a second install changes nothing");
        assert!(chain(&path, read_json(&path).unwrap(), json!({"type": PLUGIN_TYPE})).unwrap());
        assert_eq!(read_json(&path).unwrap()["plugins"], json!([{"type": "bridge"}, {"type": PLUGIN_TYPE}]));
        assert_eq!(find_conflist(&dir).unwrap(), path);

        let dirs = NodeDirs { cni_bin_dir: dir.join("bin"), cni_conf_dir: dir.clone() };
        assert_eq!(installed(&dirs).unwrap(), [format!("our entry in {}", path.display())]);
        assert_eq!(uninstall(&dirs).unwrap(), [format!("removed {PLUGIN_TYPE} from {}", path.display())]);
        assert_eq!(read_json(&path).unwrap(), list());
        assert!(uninstall(&dirs).unwrap().is_empty(), "a second uninstall changes nothing");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_are_validated_as_the_plugin_reads_them() {
        let refused = |entry: Value| validate(&entry, &list()).unwrap_err().to_string();
        assert!(validate(&json!({"type": PLUGIN_TYPE, "capture": {"proxyPort": 15001}}), &list()).is_ok());
        assert!(refused(json!({"type": PLUGIN_TYPE, "capture": {"proxyPort": "70000"}})).contains("proxyPort: \"70000\""));
        assert!(refused(json!({"type": PLUGIN_TYPE, "proxyPort": "15001"})).contains("unknown key \"proxyPort\""));
        assert!(refused(json!({"type": PLUGIN_TYPE, "capture": {"proxyPorts": 1}})).contains("\"proxyPorts\""));
        assert!(refused(json!({"type": PLUGIN_TYPE, "excludeNamespaces": "kube-system"})).contains("excludeNamespaces"));
        let old = json!({"cniVersion": "0.2.0", "name": "k8s", "plugins": []});
        assert!(validate(&json!({"type": PLUGIN_TYPE}), &old).unwrap_err().to_string().contains("\"0.2.0\""));
    }

    #[test]
    fn the_entry_asks_for_pod_annotations_unless_it_says_otherwise() {
        let mut entry = json!({"type": PLUGIN_TYPE});
        declare_annotations_capability(&mut entry).unwrap();
        assert_eq!(entry["capabilities"], json!({ ANNOTATIONS_CAPABILITY: true }));
        let mut with_others = json!({"type": PLUGIN_TYPE, "capabilities": {"portMappings": true}});
        declare_annotations_capability(&mut with_others).unwrap();
        assert_eq!(with_others["capabilities"], json!({"portMappings": true, ANNOTATIONS_CAPABILITY: true}));
        let mut declined = json!({"type": PLUGIN_TYPE, "capabilities": { ANNOTATIONS_CAPABILITY: false }});
        declare_annotations_capability(&mut declined).unwrap();
        assert_eq!(declined["capabilities"][ANNOTATIONS_CAPABILITY], false);
        let mut broken = json!({"type": PLUGIN_TYPE, "capabilities": []});
        assert!(declare_annotations_capability(&mut broken).unwrap_err().contains("capabilities"));
    }

    #[test]
    fn a_static_build_maps_no_file_but_itself() {
        let exe = Path::new("/opt/cni/bin/istio-capture-cni");
        let static_maps = "55d0c0a00000-55d0c0a4d000 r--p 00000000 08:01 42 /opt/cni/bin/istio-capture-cni\n\
                           7ffc8e5f2000-7ffc8e613000 rw-p 00000000 00:00 0 [stack]\n";
        assert!(shared_libraries(static_maps, exe).is_empty());
        let dynamic = format!(
            "{static_maps}7f1-7f2 r--p 00000000 08:01 7 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7f3-7f4 r-xp 00001000 08:01 7 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        );
        assert_eq!(shared_libraries(&dynamic, exe), ["/usr/lib/x86_64-linux-gnu/libc.so.6"]);
    }

    #[test]
    fn the_version_names_every_supported_cni_version() {
        for version in SUPPORTED_VERSIONS {
            assert!(VERSION.contains(version), "{VERSION}");
        }
        Cli::command().debug_assert();
    }
}
