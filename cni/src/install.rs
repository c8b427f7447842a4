//! `istio-capture-cni install`: what the DaemonSet runs to put the plugin on a node. It copies
//! this binary, and the libnftnl/libmnl it was loaded with, into the node's CNI bin directory
//! (the plugin finds them through its rpath, see build.rs), then chains our entry at the end of
//! the node's network configuration list. Every write is a rename of a complete file, so the
//! runtime never reads half of one. With `--watch` it stays and repairs both when they change
//! (a primary CNI rewriting its conflist drops our entry).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use thiserror::Error;

/// Our `type` in a conflist, which is also the name of the installed binary.
const PLUGIN_TYPE: &str = "istio-capture-cni";
/// Beside the binary; the plugin's rpath names it.
const LIBS_DIR: &str = "istio-capture-cni.libs";
/// The shared libraries to ship, by file-name prefix, as mapped into this process.
const SHIPPED_LIBS: [&str; 2] = ["libnftnl.so", "libmnl.so"];

#[derive(Debug, Parser)]
#[command(
    name = "istio-capture-cni install",
    about = "Installs the istio-capture-cni plugin on this node and chains it into the node's CNI configuration"
)]
struct InstallArgs {
    /// The node's CNI plugin directory, as mounted in this container.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/host/opt/cni/bin", value_name = "DIR")]
    cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory; the first *.conflist in it gets our entry.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/host/etc/cni/net.d", value_name = "DIR")]
    cni_conf_dir: PathBuf,
    /// JSON file holding our plugin entry ({"type": "istio-capture-cni", "capture": {...}})
    /// [default: native nftables, Istio CNI's capture defaults, kube-system excluded].
    #[arg(long, env = "PLUGIN_CONFIG", value_name = "FILE")]
    plugin_config: Option<PathBuf>,
    /// Keep running and repair the installation every SECONDS (for a DaemonSet's container).
    #[arg(long, value_name = "SECONDS")]
    watch: Option<u64>,
}

#[derive(Debug, Error)]
enum InstallError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(
        "no *.conflist in {0}: is the node's primary CNI installed yet? (single-plugin *.conf files are not chained)"
    )]
    NoConflist(PathBuf),
    #[error("{path}: {why}")]
    BadJson { path: PathBuf, why: String },
    #[error("this process has no {0}* mapped, so there is nothing to ship")]
    LibraryNotLoaded(&'static str),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

pub fn main() -> ExitCode {
    let args = InstallArgs::parse_from(std::env::args_os().skip(1));
    loop {
        let result = install(&args);
        match &result {
            Ok(changes) => changes.iter().for_each(|c| eprintln!("istio-capture-cni install: {c}")),
            Err(e) => eprintln!("istio-capture-cni install: error: {e}"),
        }
        match args.watch {
            Some(seconds) => std::thread::sleep(Duration::from_secs(seconds.max(1))),
            None if result.is_ok() => return ExitCode::SUCCESS,
            None => return ExitCode::FAILURE,
        }
    }
}

/// Makes the node match; returns what had to change (nothing when it already did).
fn install(args: &InstallArgs) -> Result<Vec<String>, InstallError> {
    let entry = match &args.plugin_config {
        Some(path) => read_json(path)?,
        None => json!({
            "type": PLUGIN_TYPE,
            "excludeNamespaces": ["kube-system"],
            "capture": { "nativeNftables": true }
        }),
    };
    if entry.get("type") != Some(&json!(PLUGIN_TYPE)) {
        let why = format!("the plugin entry must have \"type\": \"{PLUGIN_TYPE}\"");
        return Err(InstallError::BadJson { path: args.plugin_config.clone().unwrap_or_default(), why });
    }
    let mut changes = Vec::new();
    let exe = std::env::current_exe().map_err(io_error("find", Path::new("/proc/self/exe")))?;
    if copy_if_changed(&exe, &args.cni_bin_dir.join(PLUGIN_TYPE), 0o755)? {
        changes.push(format!("installed {}", args.cni_bin_dir.join(PLUGIN_TYPE).display()));
    }
    let libs_dir = args.cni_bin_dir.join(LIBS_DIR);
    fs::create_dir_all(&libs_dir).map_err(io_error("create", &libs_dir))?;
    for (soname, path) in loaded_libraries()? {
        if copy_if_changed(&path, &libs_dir.join(&soname), 0o644)? {
            changes.push(format!("installed {}", libs_dir.join(soname).display()));
        }
    }
    let conflist = find_conflist(&args.cni_conf_dir)?;
    if chain(&conflist, entry)? {
        changes.push(format!("chained {PLUGIN_TYPE} into {}", conflist.display()));
    }
    Ok(changes)
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = fs::read(path).map_err(io_error("read", path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::BadJson { path: path.to_path_buf(), why: e.to_string() })
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

/// The libraries to ship, by the name the loader asks for (`libnftnl.so.11`), from the files
/// mapped into this very process, so the shipped ones are the ones known to work.
fn loaded_libraries() -> Result<Vec<(String, PathBuf)>, InstallError> {
    let maps_path = Path::new("/proc/self/maps");
    let maps = fs::read_to_string(maps_path).map_err(io_error("read", maps_path))?;
    SHIPPED_LIBS
        .iter()
        .map(|prefix| {
            maps.lines()
                .filter_map(|line| line.split_whitespace().nth(5))
                .map(PathBuf::from)
                .find_map(|path| {
                    let name = path.file_name()?.to_str()?;
                    let version = name.strip_prefix(prefix)?.strip_prefix('.')?;
                    let major = version.split('.').next()?;
                    Some((format!("{prefix}.{major}"), path.clone()))
                })
                .ok_or(InstallError::LibraryNotLoaded(prefix))
        })
        .collect()
}

/// The configuration the runtime uses: the first `*.conflist` by name.
fn find_conflist(dir: &Path) -> Result<PathBuf, InstallError> {
    let mut lists: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_error("list", dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "conflist"))
        .collect();
    lists.sort();
    lists.into_iter().next().ok_or_else(|| InstallError::NoConflist(dir.to_path_buf()))
}

/// Puts `entry` last in the list's plugins, replacing an older entry of ours; false when the
/// list already holds exactly that.
fn chain(conflist: &Path, entry: Value) -> Result<bool, InstallError> {
    let mut list = read_json(conflist)?;
    let bad = |why: &str| InstallError::BadJson { path: conflist.to_path_buf(), why: why.to_string() };
    let plugins = list.get_mut("plugins").and_then(Value::as_array_mut).ok_or_else(|| bad("no \"plugins\" list"))?;
    let before = plugins.clone();
    plugins.retain(|plugin| plugin.get("type") != Some(&json!(PLUGIN_TYPE)));
    plugins.push(entry);
    if *plugins == before {
        return Ok(false);
    }
    let text = serde_json::to_vec_pretty(&list).map_err(|e| bad(&e.to_string()))?;
    replace_file(conflist, &text, 0o644)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaining_appends_once_and_replaces_our_old_entry() {
        let dir = std::env::temp_dir().join(format!("capture-cni-chain-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("10-bridge.conflist");
        fs::write(&path, r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#).unwrap();
        let ours = json!({"type": PLUGIN_TYPE, "capture": {"nativeNftables": true}});
        assert!(chain(&path, ours.clone()).unwrap());
        assert!(!chain(&path, ours).unwrap(), "a second install changes nothing");
        assert!(chain(&path, json!({"type": PLUGIN_TYPE})).unwrap());
        let list = read_json(&path).unwrap();
        assert_eq!(list["plugins"], json!([{"type": "bridge"}, {"type": PLUGIN_TYPE}]));
        assert_eq!(find_conflist(&dir).unwrap(), path);
        fs::remove_dir_all(&dir).unwrap();
    }
}
