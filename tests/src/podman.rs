//! podman, the real container runtime, with a configuration and a storage of the test run's own
//! (a directory under the temporary directory, named after the test process): the machine's
//! containers.conf, storage, images and containers are never read or touched. The images are
//! those `scripts/image-build.sh` builds from target/release, offline.
//!
//! The configuration is what this machine needs (shared/reference/istio-injection-and-cni.md):
//! runc (crun refuses the hybrid cgroup layout), cgroupfs, default ulimits that do not raise
//! RLIMIT_NOFILE, logs in files (`podman logs`), and the vfs storage driver, which mounts
//! nothing on the host, so a directory left by a killed run is removed with `rm -rf` by the next.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{release_bin, run_ok, unique, Pod};

/// The two images scripts/image-build.sh makes.
pub const MINIMAL_IMAGE: &str = "localhost/capture:test";
pub const IPTABLES_IMAGE: &str = "localhost/capture-iptables:test";

pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// A fresh configuration and storage holding both images. Fails (panics) where podman is
    /// not installed: scripts/provision.sh installs it.
    pub fn with_images() -> Podman {
        if let Err(e) = Command::new("podman").arg("--version").output() {
            panic!("podman cannot be run ({e}): scripts/provision.sh installs it");
        }
        remove_stale_runs();
        let dir = std::env::temp_dir().join(format!("capture-podman-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = |name: &str| dir.join(name).display().to_string();
        let containers_conf = format!(
            "[containers]\n\
             default_ulimits = [\"nofile=20000:20000\", \"nproc=20000:20000\"]\n\
             log_driver = \"k8s-file\"\n\
             [engine]\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"none\"\n\
             tmp_dir = \"{}\"\n\
             [network]\n\
             network_config_dir = \"{}\"\n",
            path("tmp"),
            path("networks"),
        );
        std::fs::write(dir.join("containers.conf"), containers_conf).unwrap();
        let storage_conf =
            format!("[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n", path("graph"), path("run"));
        std::fs::write(dir.join("storage.conf"), storage_conf).unwrap();

        let podman = Podman { dir };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image-build.sh");
        let release = release_bin("istio-iptables").parent().unwrap().to_path_buf();
        let mut build = with_private_var_lib();
        build.arg(script).arg("test").arg(release).env("ENGINE", "podman");
        run_ok(podman.configure(&mut build));
        podman
    }

    /// `image` as a docker-archive: what `ctr images import` reads, the image's name kept.
    pub fn save(&self, image: &str) -> Vec<u8> {
        let archive = self.dir.join(format!("{}.tar", unique("save")));
        let mut save = with_private_var_lib();
        save.args(["podman", "save", "--quiet", "--format", "docker-archive", "--output"]).arg(&archive).arg(image);
        run_ok(self.configure(&mut save));
        let bytes = std::fs::read(&archive).unwrap();
        std::fs::remove_file(&archive).unwrap();
        bytes
    }

    /// `podman ARGS...` under this configuration.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        self.configure(&mut cmd);
        cmd
    }

    fn configure<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf")).env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
    }

    /// Runs a container to its end in `pod`'s network namespace: `options` go to `podman run`,
    /// then the image and its arguments. Returns its exit code and `podman logs`.
    pub fn run_in(&self, pod: &Pod, options: &[String], image: &str, args: &[String]) -> Finished {
        let name = unique("ctr");
        let out = self
            .cmd()
            .args(["run", "--pull=never", "--name", &name])
            .arg(network(pod))
            .args(options)
            .arg(image)
            .args(args)
            .output();
        let out = out.expect("podman run");
        let logs = self.logs(&name);
        run_ok(self.cmd().args(["rm", &name]));
        let code = out.status.code().unwrap_or_else(|| panic!("podman run was killed: {out:?}"));
        Finished { code, logs, podman: out }
    }

    /// Starts a container in the background in `pod`'s network namespace; removed on drop.
    pub fn start_in(&self, pod: &Pod, options: &[String], image: &str, args: &[String]) -> Running<'_> {
        let name = unique("ctr");
        let mut cmd = self.cmd();
        cmd.args(["run", "--detach", "--pull=never", "--name", &name]).arg(network(pod)).args(options).arg(image).args(args);
        run_ok(&mut cmd);
        Running { podman: self, name }
    }

    /// What `podman logs NAME` prints (the container's stdout, then its stderr).
    pub fn logs(&self, name: &str) -> String {
        let out = run_ok(self.cmd().args(["logs", name]));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

/// A command prefix that runs the rest of its arguments with an empty tmpfs on /var/lib: podman
/// keeps a blob-info cache for root at a fixed path (/var/lib/containers/cache) that no
/// configuration moves, so builds and saves run in a mount namespace of their own in which it
/// goes away with them.
fn with_private_var_lib() -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation=private", "sh", "-c", "mount -t tmpfs build-var-lib /var/lib && exec \"$@\"", "sh"]);
    cmd
}

/// `--network ns:PATH`: the container joins the pod's namespace instead of getting its own.
fn network(pod: &Pod) -> String {
    format!("--network=ns:/var/run/netns/{}", pod.name)
}

/// Removes the directories of earlier test runs that are gone (killed before they could clean up).
fn remove_stale_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("capture-podman-") else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("podman")
                .env("CONTAINERS_CONF", entry.path().join("containers.conf"))
                .env("CONTAINERS_STORAGE_CONF", entry.path().join("storage.conf"))
                .args(["rm", "--all", "--force", "--time", "0"])
                .output();
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A container that ran to its end.
pub struct Finished {
    pub code: i32,
    /// `podman logs` of the container.
    pub logs: String,
    /// What `podman run` itself said (its errors, when the container could not start).
    pub podman: Output,
}

/// A container running in the background; stopped and removed on drop.
pub struct Running<'p> {
    podman: &'p Podman,
    pub name: String,
}

impl Running<'_> {
    pub fn logs(&self) -> String {
        self.podman.logs(&self.name)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- podman logs {} ---\n{}", self.name, self.logs());
        }
        let _ = self.podman.cmd().args(["rm", "--force", "--time", "0", &self.name]).output();
    }
}
