//! The images' filesystems without a container runtime: the directories `scripts/image-rootfs.sh`
//! assembles (what the Dockerfile's final stages copy) are used as a chroot, and the binaries run
//! from them program a pod namespace with nothing but what the image holds. tests/injector.rs runs
//! the same images under podman.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use capture_tests::{release_bin, require_netns, run_ok, unique, Pod, SEED_ARGS};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image-rootfs.sh")
}

fn release_dir() -> PathBuf {
    release_bin("istio-iptables").parent().unwrap().to_path_buf()
}

/// An image's filesystem in a temporary directory, removed on drop.
struct Rootfs(PathBuf);

impl Rootfs {
    /// The minimal image's filesystem.
    fn build() -> Rootfs {
        let dir = std::env::temp_dir().join(unique("image-rootfs"));
        run_ok(Command::new(script()).arg(&dir).arg(release_dir()));
        Rootfs(dir)
    }

    /// The iptables image's filesystem: the minimal one and what the iptables image adds.
    fn build_iptables() -> Rootfs {
        let rootfs = Rootfs::build();
        run_ok(Command::new(script()).arg("--iptables").arg(&rootfs.0).arg(release_dir()));
        rootfs
    }

    /// A root holding one binary (at /) and an empty /proc, nothing else.
    fn only(binary: &Path) -> Rootfs {
        let dir = std::env::temp_dir().join(unique("bare-rootfs"));
        std::fs::create_dir_all(dir.join("proc")).unwrap();
        std::fs::copy(binary, dir.join(binary.file_name().unwrap())).unwrap();
        Rootfs(dir)
    }

    /// Every file, relative to the root.
    fn files(&self) -> Vec<String> {
        let out = run_ok(Command::new("find").arg(&self.0).args(["-type", "f", "-printf", "/%P\n"]));
        let mut files: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        files.sort();
        files
    }

    /// Runs PROGRAM chrooted here, in the pod's network namespace, with a /proc of its own
    /// mount namespace (as a container runtime provides one).
    fn run_in(&self, pod: &Pod, program: &str, args: &[&str]) -> Output {
        self.command_in(pod, program, args).output().expect("chroot")
    }

    /// What [`Rootfs::run_in`] runs, for more environment or stdin.
    fn command_in(&self, pod: &Pod, program: &str, args: &[&str]) -> Command {
        let mut cmd = pod.cmd("unshare");
        cmd.arg(format!("--mount-proc={}/proc", self.0.display())).arg("chroot").arg(&self.0).arg(program).args(args);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BINARIES: [&str; 3] = ["/usr/local/bin/istio-iptables", "/usr/local/bin/capture-proxy", "/usr/local/bin/istio-capture-cni"];

#[test]
fn image_holds_only_the_binaries_and_their_libraries() {
    let rootfs = Rootfs::build();
    let files = rootfs.files();
    for wanted in BINARIES.iter().chain(&["/etc/passwd", "/etc/group"]) {
        assert!(files.iter().any(|f| f == wanted), "{wanted} missing from {files:?}");
    }
    for lib in ["libc.so.6", "libgcc_s.so.1", "ld-linux"] {
        assert!(files.iter().any(|f| f.contains(lib)), "{lib} missing from {files:?}");
    }
    // Only the static istio-iptables and istio-capture-cni use them.
    for lib in ["libnftnl", "libmnl"] {
        assert!(!files.iter().any(|f| f.contains(lib)), "{lib} in {files:?}");
    }
    let names: Vec<&str> = files.iter().map(|f| f.rsplit('/').next().unwrap()).collect();
    for absent in ["sh", "bash", "nft", "iptables", "iptables-nft-restore", "ip"] {
        assert!(!names.contains(&absent), "the image must not ship {absent}: {files:?}");
    }
    // Three binaries, two files in /etc, and only shared objects besides.
    assert!(files.iter().filter(|f| !f.contains(".so")).count() == 5, "unexpected files: {files:?}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn native_nftables_capture_runs_from_the_image_alone() {
    require_netns!();
    let rootfs = Rootfs::build();
    let pod = Pod::with_address("10.44.0.5/24");

    let mut args = SEED_ARGS.to_vec();
    args.push("--native-nftables");
    let out = rootfs.run_in(&pod, "/usr/local/bin/istio-iptables", &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ruleset = pod.nft_ruleset();
    for want in ["table inet istio-proxy-nat", "redirect to :15006", "redirect to :15001", "skuid 1337"] {
        assert!(ruleset.contains(want), "missing `{want}` in:\n{ruleset}");
    }

    args.push("--cleanup-only");
    let out = rootfs.run_in(&pod, "/usr/local/bin/istio-iptables", &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!pod.nft_ruleset().contains("istio"), "{}", pod.nft_ruleset());

    // The iptables backend needs userspace the image does not have, and says so, and what to use.
    let out = rootfs.run_in(&pod, "/usr/local/bin/istio-iptables", SEED_ARGS);
    assert_eq!(out.status.code(), Some(1));
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("iptables is not installed here") && message.contains("--native-nftables"), "{message}");
    assert!(message.contains("nothing was changed"), "{message}");

    let out = rootfs.run_in(&pod, "/usr/local/bin/capture-proxy", &["--version"]);
    assert!(out.status.success(), "capture-proxy does not start from the image: {}", String::from_utf8_lossy(&out.stderr));
}

/// The iptables image adds iptables and ip6tables in both variants and nothing else: the two
/// multi-call binaries under every name capture-lib runs, the libraries and xtables extensions
/// they load that the minimal image lacks, and the legacy variant's lock file.
#[test]
fn iptables_image_adds_only_iptables_and_what_it_loads() {
    let minimal = Rootfs::build().files();
    let rootfs = Rootfs::build_iptables();
    let added: Vec<String> = rootfs.files().into_iter().filter(|f| !minimal.contains(f)).collect();
    let name = |f: &String| f.rsplit('/').next().unwrap().to_string();
    let (extensions, others): (Vec<&String>, Vec<&String>) = added.iter().partition(|f| f.contains("/xtables/libxt_"));
    let mut others: Vec<String> = others.into_iter().map(name).collect();
    others.sort();
    // libnftnl and libmnl for xtables-nft-multi: the minimal image's binaries that use them are static.
    #[rustfmt::skip]
    let expected = ["libip4tc.so.2", "libip6tc.so.2", "libmnl.so.0", "libnftnl.so.11", "libxtables.so.12",
                    "xtables-legacy-multi", "xtables-nft-multi", "xtables.lock"];
    assert_eq!(others, expected, "added: {added:?}");
    assert!(added.contains(&"/run/xtables.lock".to_string()), "the lock must exist for a read-only root: {added:?}");
    let mut extensions: Vec<String> = extensions.into_iter().map(name).collect();
    extensions.sort();
    #[rustfmt::skip]
    let used = ["libxt_CONNMARK.so", "libxt_CT.so", "libxt_MARK.so", "libxt_REDIRECT.so", "libxt_TPROXY.so",
                "libxt_connmark.so", "libxt_conntrack.so", "libxt_mark.so", "libxt_multiport.so", "libxt_owner.so",
                "libxt_standard.so", "libxt_tcp.so", "libxt_udp.so"];
    assert_eq!(extensions, used);

    let sbin = rootfs.0.join("usr/sbin");
    for family in ["iptables", "ip6tables"] {
        for (variant, multi) in [("-nft", "nft"), ("-legacy", "legacy"), ("", "nft")] {
            for op in ["", "-save", "-restore"] {
                let link = std::fs::read_link(sbin.join(format!("{family}{variant}{op}"))).unwrap();
                assert_eq!(link, Path::new(&format!("xtables-{multi}-multi")), "{family}{variant}{op}");
            }
        }
    }
    let names: Vec<String> = added.iter().map(name).collect();
    for absent in ["sh", "bash", "nft", "apt", "dpkg"] {
        assert!(!names.iter().any(|n| n == absent), "the image must not ship {absent}");
    }
}

/// istio-iptables is linked statically (scripts/build.sh), like Istio's Go binary: an init
/// container image holding that one file, without even a loader, is enough to capture.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn istio_iptables_alone_captures() {
    require_netns!();
    let rootfs = Rootfs::only(&release_bin("istio-iptables"));
    let pod = Pod::with_address("10.44.0.5/24");
    let args = [SEED_ARGS, &["--native-nftables"]].concat();
    let out = rootfs.run_in(&pod, "/istio-iptables", &args);
    assert!(
        out.status.success(),
        "istio-iptables does not run alone (is it linked statically? build with scripts/build.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ruleset = pod.nft_ruleset();
    for want in ["table inet istio-proxy-nat", "redirect to :15006", "redirect to :15001"] {
        assert!(ruleset.contains(want), "missing `{want}` in:\n{ruleset}");
    }
}

/// The CNI plugin is linked statically too (scripts/build.sh): it runs on a node whatever the
/// node's glibc and libraries, as here from a root holding that one file, where it programs a
/// pod (its namespace by /proc path, the runtime on the "node") and DEL removes the capture.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn istio_capture_cni_alone_captures_and_cleans_up() {
    require_netns!();
    let plugin = release_bin("istio-capture-cni");
    let ldd = String::from_utf8_lossy(&run_ok(Command::new("ldd").arg(&plugin)).stdout).into_owned();
    assert!(ldd.contains("statically linked"), "istio-capture-cni is not static (build with scripts/build.sh):\n{ldd}");
    let rootfs = Rootfs::only(&plugin);
    let (node, pod) = (Pod::new(), Pod::with_address("10.44.0.5/24"));
    // An injected pod's annotations, as containerd passes them.
    let conf = r#"{"cniVersion":"1.0.0","name":"k8s","type":"istio-capture-cni","capture":{"nativeNftables":true},
        "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sidecar.istio.io/status":"{\"containers\":[\"istio-proxy\"]}"}}}"#;
    let run = |command: &str| {
        let mut cmd = rootfs.command_in(&node, "/istio-capture-cni", &[]);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "c1")
            .env("CNI_NETNS", format!("/proc/{}/ns/net", pod.pid()))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin");
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("chroot");
        child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{command} from a root holding only the plugin: {said}");
    };
    run("ADD");
    let ruleset = pod.nft_ruleset();
    for want in ["table inet istio-proxy-nat", "redirect to :15006", "redirect to :15001"] {
        assert!(ruleset.contains(want), "missing `{want}` in:\n{ruleset}");
    }
    run("DEL");
    assert!(!pod.nft_ruleset().contains("istio"), "{}", pod.nft_ruleset());
    let version = rootfs.run_in(&node, "/istio-capture-cni", &["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("istio-capture-cni "), "{version:?}");
}

/// What the DaemonSet runs: the installer, from the image, ships the plugin (one static file)
/// to the "node" (directories inside the chroot here) and chains it.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn cni_installer_runs_from_the_image() {
    require_netns!();
    let rootfs = Rootfs::build();
    let pod = Pod::new();
    let node = rootfs.0.join("host");
    std::fs::create_dir_all(node.join("bin")).unwrap();
    std::fs::create_dir_all(node.join("net.d")).unwrap();
    let list = node.join("net.d/10-k8s.conflist");
    std::fs::write(&list, r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"}]}"#).unwrap();

    let args = ["install", "--cni-bin-dir", "/host/bin", "--cni-conf-dir", "/host/net.d"];
    let out = rootfs.run_in(&pod, "/usr/local/bin/istio-capture-cni", &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shipped: Vec<_> = std::fs::read_dir(node.join("bin")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(shipped, ["istio-capture-cni"]);
    assert!(std::fs::read_to_string(&list).unwrap().contains("\"istio-capture-cni\""));
}
