//! containerd as a node runs it, started by a test with a configuration of its own: its root,
//! state, temporary files, socket, runc's state, netns mounts, CNI binaries, CNI configuration
//! and host-local's reservations all under one temporary directory, and the daemon itself in
//! a network namespace of ours (the "node"), so the bridge, its veths and the `CNI-…` NAT
//! chains the chain makes never touch the machine's own network:
//!
//! ```text
//! node namespace: containerd ── CNI chain: bridge capbr0 (10.78.0.1/24) + host-local + istio-capture-cni
//!                               └─ veth ── sandbox namespace (containerd's, under state/netns)
//! ```
//!
//! No registry: the sandbox ("pause") image is a static binary compiled here, put in a
//! single-layer OCI archive and imported with `ctr`. The node's conflist is written as a node's
//! primary CNI writes it and then chained by `istio-capture-cni install`, each file put in
//! place by a rename inside the configuration directory (containerd 1.6 reloads on a rename,
//! not on a file created there).
//!
//! Dropping a [`Containerd`] stops and removes the sandboxes still there, stops the daemon
//! and deletes its directory. containerd keeps some state where it likes whatever its
//! configuration says: shim sockets under `/run/containerd/s`, the CNI result cache under
//! `/var/lib/cni/results` (emptied by each DEL) and the `k8s.io` cgroups' parent directories.
//! Those are left alone, as on a node.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cri::api::PodSandboxConfig;
use crate::cri::{CriClient, CriError};
use crate::{process_running, release_bin, run_ok, unique, Pod};

/// The sandbox image every pod runs, built and imported by [`Containerd::start`].
pub const PAUSE_IMAGE: &str = "localhost/capture-tests/pause:1";
/// The node's network: its conflist's name and the subnet host-local hands out.
pub const NETWORK: &str = "capnet";
pub const SUBNET: &str = "10.78.0.0/24";
const BRIDGE: &str = "capbr0";
/// Where Debian's containernetworking-plugins are.
const DEBIAN_CNI_PLUGINS: &str = "/usr/lib/cni";
/// What the pause image runs: sleep until SIGINT or SIGTERM (as PID 1, which ignores both
/// unless it handles them), reaping children meanwhile.
const PAUSE_SOURCE: &str = r#"
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#;
/// How long the daemon may take to serve, and containerd to load a new CNI configuration.
const STARTUP: Duration = Duration::from_secs(30);

/// A running containerd with the node's CNI chain (see the module's documentation).
pub struct Containerd {
    dir: PathBuf,
    node: Pod,
    daemon: Child,
}

/// One containerd for every test of a test binary that wants the default node: started by the
/// first, stopped when the last one still running lets go of it.
static SHARED: Mutex<Weak<Containerd>> = Mutex::new(Weak::new());

impl Containerd {
    /// The shared node, chained with the installer's default plugin entry.
    pub fn shared() -> Arc<Containerd> {
        let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = slot.upgrade() {
            return running;
        }
        let started = Arc::new(Containerd::start(None));
        *slot = Arc::downgrade(&started);
        started
    }

    /// A node of its own, its conflist chained with `plugin_entry` (the installer's
    /// `--plugin-config`) or, with `None`, with the installer's default entry.
    /// Panics, with what is missing, when it cannot be run here.
    pub fn start(plugin_entry: Option<&Value>) -> Containerd {
        require_tools();
        let dir = std::env::temp_dir().join(unique("containerd"));
        for sub in ["root", "state", "tmp", "runc", "opt", "image", "cni/bin", "cni/net.d", "cni/ipam"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("config.toml"), config_toml(&dir)).unwrap();
        let node = Pod::new();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let daemon = node
            .cmd("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", search_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let containerd = Containerd { dir, node, daemon };
        let cri = containerd.wait_for("containerd to serve its socket", || {
            CriClient::connect(&containerd.socket()).ok().filter(|cri| cri.version().is_ok())
        });
        containerd.import_pause_image(&cri);
        for plugin in ["bridge", "host-local", "loopback"] {
            let link = containerd.cni_bin_dir().join(plugin);
            std::os::unix::fs::symlink(Path::new(DEBIAN_CNI_PLUGINS).join(plugin), link).unwrap();
        }
        let primary = json!({
            "cniVersion": "1.0.0", "name": NETWORK,
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": true,
                "ipam": { "type": "host-local", "subnet": SUBNET, "dataDir": containerd.dir.join("cni/ipam"),
                          "routes": [{ "dst": "0.0.0.0/0" }] }
            }]
        });
        let conflist = containerd.conflist_path();
        write_by_rename(&conflist, primary.to_string().as_bytes());
        containerd.install_plugin(plugin_entry);
        containerd
    }

    /// A new CRI connection (one per test thread).
    pub fn cri(&self) -> CriClient {
        CriClient::connect(&self.socket()).unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// Runs `istio-capture-cni install` on the node (replacing our entry if it differs) and
    /// waits until containerd has loaded the conflist it wrote.
    pub fn install_plugin(&self, plugin_entry: Option<&Value>) {
        let mut install = Command::new(release_bin("istio-capture-cni"));
        install.arg("install").arg("--cni-bin-dir").arg(self.cni_bin_dir()).arg("--cni-conf-dir").arg(self.cni_conf_dir());
        if let Some(entry) = plugin_entry {
            let file = self.dir.join("plugin-entry.json");
            std::fs::write(&file, entry.to_string()).unwrap();
            install.arg("--plugin-config").arg(file);
        }
        run_ok(&mut install);
        self.wait_for_conflist();
    }

    /// Puts `entry` in the node's conflist in place of ours without the installer (which refuses
    /// an entry the plugin would refuse), as a hand edit or another tool would, and waits until
    /// containerd has loaded it.
    pub fn write_plugin_entry(&self, entry: &Value) {
        let path = self.conflist_path();
        let mut list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let plugins = list["plugins"].as_array_mut().expect("a plugins list");
        plugins.retain(|plugin| plugin["type"] != "istio-capture-cni");
        plugins.push(entry.clone());
        write_by_rename(&path, list.to_string().as_bytes());
        self.wait_for_conflist();
    }

    /// Waits until containerd reports the node's conflist as it is on disk.
    fn wait_for_conflist(&self) {
        let written: Value = serde_json::from_slice(&std::fs::read(self.conflist_path()).unwrap()).unwrap();
        let cri = self.cri();
        self.wait_for("containerd to load the node's conflist", || {
            let status = cri.status().ok()?;
            (status.condition("NetworkReady") && status.cni_conflists() == [written.clone()]).then_some(())
        });
    }

    /// The node's network namespace: the bridge, the pods' host-side veths, the `CNI-…` chains.
    pub fn node(&self) -> &Pod {
        &self.node
    }

    /// The node's conflist (the first and only one in the configuration directory).
    pub fn conflist_path(&self) -> PathBuf {
        self.cni_conf_dir().join(format!("10-{NETWORK}.conflist"))
    }

    /// The addresses host-local has reserved (a file per address in its data directory).
    pub fn ip_reservations(&self) -> Vec<IpAddr> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("cni/ipam").join(NETWORK)) else {
            return Vec::new();
        };
        entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
    }

    /// Where containerd mounts sandboxes' network namespaces.
    pub fn netns_dir(&self) -> PathBuf {
        self.dir.join("state/io.containerd.grpc.v1.cri/netns")
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs a sandbox and reads back where its network is.
    pub fn run_pod(&self, cri: &CriClient, config: &PodSandboxConfig) -> Result<RunningPod, CriError> {
        let id = cri.run_pod_sandbox(config)?;
        let status = cri.pod_sandbox_status(&id)?;
        let netns = status.netns_path().unwrap_or_else(|| panic!("no netns path in {:?}", status.info));
        let ip = status.ip().unwrap_or_else(|| panic!("no pod IP in {:?}", status.status));
        Ok(RunningPod { id, netns, ip })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }

    fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!("--- containerd log (last lines) ---\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
    }

    /// Polls `ready` until it yields, failing the test (with containerd's log) when containerd
    /// exits or at [`STARTUP`].
    fn wait_for<T>(&self, what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(value) = ready() {
                return value;
            }
            assert!(process_running(self.daemon.id()), "containerd exited while waiting for {what}\n{}", self.log_tail());
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Imports the pause image (built by the first node of this process) for the CRI.
    fn import_pause_image(&self, cri: &CriClient) {
        self.import_image(cri, pause_image_archive(&self.dir.join("image")), PAUSE_IMAGE);
    }

    /// Imports an image archive (OCI layout or docker-archive, as `ctr images import` reads them)
    /// into the CRI's namespace, as a node without a registry gets its images, and waits until
    /// the CRI service knows the image as `name`.
    pub fn import_image(&self, cri: &CriClient, archive: &[u8], name: &str) {
        let mut import = Command::new("ctr");
        import.arg("--address").arg(self.socket()).args(["-n", "k8s.io", "images", "import", "-"]);
        piped(&mut import, archive);
        // The CRI service learns of imported images from containerd's events.
        self.wait_for(&format!("the CRI service to see {name}"), || cri.image_status(name).ok().flatten());
    }

    /// A directory for a pod's container logs (its sandbox's `log_directory`), made here as a
    /// kubelet makes it.
    pub fn log_directory(&self, pod: &str) -> PathBuf {
        let dir = self.dir.join("logs").join(pod);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Stops and removes every sandbox still there, so their shims exit and their namespaces,
    /// mounts and addresses are released; reports what failed.
    fn remove_sandboxes(&self) -> Vec<String> {
        let mut failures = Vec::new();
        // A daemon that never served has no sandboxes.
        let Ok(cri) = CriClient::connect(&self.socket()) else {
            return failures;
        };
        let sandboxes = cri.list_pod_sandbox(None).unwrap_or_default();
        for sandbox in sandboxes {
            if let Err(e) = cri.stop_pod_sandbox(&sandbox.id).and_then(|()| cri.remove_pod_sandbox(&sandbox.id)) {
                failures.push(e.to_string());
            }
        }
        failures
    }
}

/// A sandbox containerd runs: its id, network namespace path (containerd's mount) and IP.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub id: String,
    pub netns: PathBuf,
    pub ip: IpAddr,
}

/// What a running pod holds on the node, read while it runs: afterwards, [`Containerd::leftovers`]
/// says which of it is still there.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub pod: RunningPod,
    /// The node's end of a veth pair whose other end is in the pod's namespace: the kernel
    /// deletes both when the namespace is destroyed, whatever kept it alive until then (a mount,
    /// a process, an open file or socket), and namespace inodes are reused, so this is how
    /// "the namespace is gone" is told.
    namespace_probe: String,
    /// The bridge's end of the pod's veth pair, in the node's namespace.
    host_veth: String,
    /// The bridge plugin's per-pod NAT chain (`ipMasq`), `CNI-…`.
    nat_chain: String,
}

/// The name of the namespace probe's end in the pod.
const PROBE_IN_POD: &str = "footprint";
/// How long the kernel may take to destroy a namespace nothing holds any more (it does so
/// asynchronously, after an RCU grace period).
const NAMESPACE_TEARDOWN: Duration = Duration::from_secs(10);

impl Containerd {
    /// Reads `pod`'s footprint; panics when a part of it is missing, so that its absence later
    /// means something. Adds the namespace probe (a down veth, `footprint`, in the pod).
    pub fn footprint(&self, pod: &RunningPod) -> Footprint {
        assert!(self.ip_reservations().contains(&pod.ip), "host-local holds no reservation for {}", pod.ip);
        // `2: eth0@if5: ...`: the peer's index in the node's namespace.
        let mut eth0 = Command::new("nsenter");
        eth0.arg(format!("--net={}", pod.netns.display())).args(["ip", "-o", "link", "show", "eth0"]);
        let eth0 = String::from_utf8(run_ok(&mut eth0).stdout).unwrap();
        let peer_index = eth0.split("@if").nth(1).and_then(|rest| rest.split(':').next()).expect("eth0 is a veth").to_string();
        let links = self.node.sh("ip -o link show");
        let host_veth = links
            .lines()
            .find_map(|line| {
                let (index, rest) = line.split_once(": ")?;
                (index == peer_index).then(|| rest.split(['@', ':']).next().unwrap_or_default().to_string())
            })
            .unwrap_or_else(|| panic!("no link {peer_index} (the pod's veth peer) on the node:\n{links}"));
        let nat = self.node.iptables_save(false);
        let nat_chain = nat
            .lines()
            .find(|line| line.starts_with("-A POSTROUTING") && line.contains(&pod.id))
            .and_then(|line| line.rsplit("-j ").next())
            .unwrap_or_else(|| panic!("no POSTROUTING rule for sandbox {} on the node:\n{nat}", pod.id))
            .to_string();
        let namespace_probe = unique("probe");
        let netns = pod.netns.display();
        self.node.sh(&format!("ip link add {namespace_probe} type veth peer name {PROBE_IN_POD} netns {netns}"));
        Footprint { pod: pod.clone(), namespace_probe, host_veth, nat_chain }
    }

    /// What of `footprint` is still on the node now: host-local's reservation, NAT rules and
    /// chain, the veth, the namespace's mount, the namespace itself.
    pub fn leftovers(&self, footprint: &Footprint) -> Vec<String> {
        let Footprint { pod, namespace_probe, host_veth, nat_chain } = footprint;
        let mut left = Vec::new();
        if self.ip_reservations().contains(&pod.ip) {
            left.push(format!("host-local's reservation of {}", pod.ip));
        }
        let nat = self.node.iptables_save(false);
        left.extend(
            nat.lines()
                .filter(|line| line.contains(&pod.id) || line.contains(nat_chain.as_str()))
                .map(|line| format!("node rule: {line}")),
        );
        let links = self.node.sh("ip -o link show");
        if links.lines().any(|line| line.contains(&format!(" {host_veth}@"))) {
            left.push(format!("the node's veth {host_veth}"));
        }
        if pod.netns.exists() {
            left.push(format!("the namespace mount {}", pod.netns.display()));
        }
        if links.lines().any(|line| line.contains(&format!(" {namespace_probe}@"))) {
            left.push(format!("the namespace (its probe {namespace_probe} is still there)"));
        }
        left
    }

    /// [`Containerd::leftovers`] once the kernel has had time to destroy the namespace.
    pub fn settled_leftovers(&self, footprint: &Footprint) -> Vec<String> {
        settled(|| self.leftovers(footprint))
    }

    /// What any pod, running or not, left on the node: for a node that should have none, such
    /// as after sandboxes that failed to start (no footprint can be read of those). Every
    /// host-local reservation, every rule of the bridge plugin's per-pod `CNI-…` NAT chains,
    /// every link but `lo` and the bridge (a pod's veth), every namespace mount under
    /// containerd's directory, every sandbox the CRI lists, and every process but containerd
    /// that names containerd's directory (shims, and through them the pods' processes, which
    /// would hold their namespaces).
    pub fn node_leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self.ip_reservations().iter().map(|ip| format!("host-local's reservation of {ip}")).collect();
        let nat = self.node.iptables_save(false);
        left.extend(nat.lines().filter(|line| line.contains("CNI-")).map(|line| format!("node rule: {line}")));
        let links = self.node.sh("ip -o link show");
        left.extend(
            links
                .lines()
                .filter_map(|line| line.split(": ").nth(1))
                .map(|name| name.split('@').next().unwrap_or_default())
                .filter(|name| !["lo", BRIDGE].contains(name))
                .map(|name| format!("the node's link {name}")),
        );
        if let Ok(mounts) = std::fs::read_dir(self.netns_dir()) {
            left.extend(mounts.filter_map(|mount| Some(format!("the namespace mount {}", mount.ok()?.path().display()))));
        }
        let sandboxes = self.cri().list_pod_sandbox(None).expect("ListPodSandbox");
        left.extend(sandboxes.iter().map(|sandbox| format!("the sandbox {}", sandbox.id)));
        left.extend(self.processes_naming_its_directory().into_iter().map(|process| format!("the process {process}")));
        left
    }

    /// [`Containerd::node_leftovers`] once the kernel has had time to destroy the namespaces.
    pub fn settled_node_leftovers(&self) -> Vec<String> {
        settled(|| self.node_leftovers())
    }

    /// `PID: command line` of every process but the daemon whose command line names this
    /// node's directory (containerd's shims are given its socket's path).
    fn processes_naming_its_directory(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != self.daemon.id())
            .filter_map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline.contains(&dir).then(|| format!("{pid}: {}", cmdline.trim_end()))
            })
            .collect()
    }
}

/// What `left` finds once it finds nothing, or at [`NAMESPACE_TEARDOWN`].
fn settled(left: impl Fn() -> Vec<String>) -> Vec<String> {
    let deadline = Instant::now() + NAMESPACE_TEARDOWN;
    loop {
        let found = left();
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let failures = self.remove_sandboxes();
        if !failures.is_empty() {
            eprintln!("containerd: sandboxes left behind: {failures:?}\n{}", self.log_tail());
        }
        let pid = nix::unistd::Pid::from_raw(self.daemon.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fails the test, saying what to install, when containerd cannot run here.
fn require_tools() {
    crate::require_netns!();
    let path = search_path();
    for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "runc", "gcc", "tar", "sha256sum"] {
        let found = path.split(':').any(|dir| Path::new(dir).join(tool).is_file());
        assert!(found, "{tool} is not installed (searched {path}): run scripts/provision.sh");
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let path = Path::new(DEBIAN_CNI_PLUGINS).join(plugin);
        assert!(path.exists(), "{} is missing: run scripts/provision.sh", path.display());
    }
}

/// The test's PATH, with the sbin directories runc and iptables live in.
fn search_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/local/sbin:/usr/sbin:/sbin")
}

fn config_toml(dir: &Path) -> String {
    let path = |sub: &str| dir.join(sub).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
temp = "{tmp}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The CRI's oom_score_adj of -998 for sandboxes is refused without CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
"#,
        root = path("root"),
        state = path("state"),
        tmp = path("tmp"),
        socket = path("containerd.sock"),
        opt = path("opt"),
        runc = path("runc"),
        bin = path("cni/bin"),
        conf = path("cni/net.d"),
    )
}

/// Puts a complete file in place with a rename in its own directory, as a node's CNI
/// installers do: containerd (1.6) reloads on the rename, and never reads half a file.
pub fn write_by_rename(path: &Path, contents: &[u8]) {
    let name = path.file_name().unwrap().to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// The pause image as an OCI archive: the binary compiled, packed as the one layer of an image
/// named [`PAUSE_IMAGE`], in `work` (a directory of the caller's) the first time, kept for the
/// process's later nodes.
fn pause_image_archive(work: &Path) -> &'static [u8] {
    static ARCHIVE: OnceLock<Vec<u8>> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let mut gcc = Command::new("gcc");
        gcc.args(["-static", "-Os", "-s", "-x", "c", "-o"]).arg(work.join("pause")).arg("-");
        piped(&mut gcc, PAUSE_SOURCE.as_bytes());
        let mut tar = Command::new("tar");
        tar.args(["--owner=0", "--group=0", "--numeric-owner", "-C"]).arg(work).args(["-c", "pause"]);
        let layout = work.join("oci");
        let layer = add_blob(&layout, "application/vnd.oci.image.layer.v1.tar", &run_ok(&mut tar).stdout);
        let config = json!({
            "architecture": oci_architecture(), "os": "linux",
            "config": { "Entrypoint": ["/pause"] },
            "rootfs": { "type": "layers", "diff_ids": [layer["digest"]] }
        });
        let config = add_blob(&layout, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": [layer]
        });
        let mut manifest = add_blob(&layout, "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
        let tag = PAUSE_IMAGE.rsplit_once(':').expect("a tagged image name").1;
        manifest["annotations"] = json!({ "io.containerd.image.name": PAUSE_IMAGE, "org.opencontainers.image.ref.name": tag });
        std::fs::write(layout.join("index.json"), json!({ "schemaVersion": 2, "manifests": [manifest] }).to_string()).unwrap();
        std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        run_ok(Command::new("tar").arg("-C").arg(&layout).args(["-c", "."])).stdout
    })
}

/// Stores a blob in an OCI layout; returns its descriptor.
fn add_blob(layout: &Path, media_type: &str, contents: &[u8]) -> Value {
    let sum = piped(&mut Command::new("sha256sum"), contents);
    let hex = String::from_utf8(sum).unwrap().split_whitespace().next().expect("a digest").to_string();
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(&hex), contents).unwrap();
    json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": contents.len() })
}

/// The OCI name of this machine's architecture.
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture name for {other}"),
    }
}

/// Runs `cmd` with `stdin`; returns its stdout, panicking when it fails.
fn piped(cmd: &mut Command, stdin: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Lazily unmounts whatever is still mounted under `dir` (deepest first), so removing the
/// directory cannot reach into a mounted filesystem.
fn unmount_under(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> =
        mountinfo.lines().filter_map(|line| line.split(' ').nth(4)).filter(|point| Path::new(point).starts_with(dir)).collect();
    mounts.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in mounts {
        let _ = Command::new("umount").arg("-l").arg(point).status();
    }
}
