//! Helpers for tests that run against the real kernel in network namespaces.
//!
//! A [`Pod`] is a network namespace held open by a sleeping process, entered the way a node
//! agent would: `nsenter -t PID -n`. Tests read like the topology they build.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub mod bench;
pub mod containerd;
pub mod cri;
pub mod podman;
mod probe;
pub use probe::can_run;

/// Path of a workspace binary built in release mode (the tests do not build them: `scripts/build.sh`
/// runs before `cargo test`, as the README's test command does).
pub fn release_bin(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let path = root.join("target/release").join(name);
    assert!(path.exists(), "{} is missing: run scripts/build.sh first", path.display());
    path
}

/// Fails the calling test when namespaces cannot be made here. Where they cannot, the build script marks
/// every such test ignored (outside CI), so reaching this means CI is set or the build saw root: a test
/// that cannot run must never pass.
#[macro_export]
macro_rules! require_netns {
    () => {
        assert!(
            $crate::can_run(),
            "needs root and network namespaces (euid 0 and `unshare --net true`), which this run lacks; it was \
             not marked ignored because CI is set or the tests were built where namespaces worked (rebuild to \
             have it ignored)"
        );
    };
}

/// Istio's standard sidecar capture: the istio-init arguments its injector writes.
#[rustfmt::skip]
pub const SEED_ARGS: &[&str] = &["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique short name (interface names must stay under 16 bytes).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A network namespace held by a `sleep` process; killed (and so freed) on drop.
pub struct Pod {
    holder: Child,
    /// Bind-mounted name under /var/run/netns, so `ip netns exec` and `ip -n` work too.
    pub name: String,
}

impl Pod {
    /// A namespace with `lo` up and nothing else.
    pub fn new() -> Pod {
        let pod = Pod::hold_with(Command::new("unshare").args(["--net", "sleep", "infinity"]));
        pod.sh("ip link set lo up");
        pod
    }

    /// Holds a namespace someone else made (a container runtime's sandbox) open, so that it
    /// can be looked into after its owner has let go of it.
    pub fn hold(netns: &Path) -> Pod {
        Pod::hold_with(Command::new("nsenter").arg(format!("--net={}", netns.display())).args(["sleep", "infinity"]))
    }

    /// Starts `holder`, a process that ends up sleeping in another network namespace, and
    /// names that namespace under /var/run/netns.
    fn hold_with(holder: &mut Command) -> Pod {
        let name = unique("pod");
        let mut holder = holder.stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{holder:?}: {e}"));
        // Wait until the holder has its namespace.
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/ns/net", holder.id())).map_or(true, |l| l == own) {
            if let Some(status) = holder.try_wait().unwrap() {
                panic!("the namespace holder exited ({status})");
            }
            if std::time::Instant::now() > deadline {
                let _ = holder.kill();
                panic!("the namespace holder never left this namespace");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let pod = Pod { holder, name };
        std::fs::create_dir_all("/var/run/netns").unwrap();
        let target = format!("/var/run/netns/{}", pod.name);
        std::fs::write(&target, b"").unwrap();
        run_ok(Command::new("mount").args(["--bind", &pod.ns_path().to_string_lossy(), &target]));
        pod
    }

    /// A namespace with `eth0` (one end of a veth pair whose other end stays inside too)
    /// carrying `addr` (e.g. `10.44.0.5/24` or `fd00:44::5/64`), like a pod's.
    pub fn with_address(addr: &str) -> Pod {
        let pod = Pod::new();
        pod.sh("ip link add eth0 type veth peer name eth0peer && ip link set eth0 up && ip link set eth0peer up");
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        pod.sh(&format!("ip addr add {addr} dev eth0{nodad}"));
        pod
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// The namespace file, for `--network-namespace` and setns.
    pub fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }

    /// Runs `f` on a thread inside this namespace. Sockets it creates stay in the namespace
    /// and can be used from any thread afterwards (servers, clients).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(self.ns_path()).expect("open the pod's netns");
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the pod");
                    f()
                })
                .join()
                .expect("closure inside the pod panicked")
        })
    }

    /// `nsenter -t PID -n PROGRAM ARGS...`
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.pid().to_string()).arg("-n").arg(program);
        c
    }

    /// Runs a shell command in the namespace and returns its output; panics on failure.
    pub fn sh(&self, script: &str) -> String {
        let out = run_ok(self.cmd("sh").arg("-c").arg(script));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (5 s at most) until no IPv6 address in the namespace is tentative. The kernel ends
    /// duplicate address detection in the background (on `lo` too, where it probes nothing) and
    /// only then adds the address's local route and drops the flag, so two snapshots of addresses
    /// or routes would otherwise differ by that alone.
    pub fn settle_ipv6(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.sh("ip -6 addr show tentative").trim().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `iptables-save`-style dump of one family's rules (comments and counters stripped).
    /// Both variants are read (nft, then legacy), so the tests hold whichever one the host's
    /// plain `iptables` is and whichever one the tool chose.
    pub fn iptables_save(&self, v6: bool) -> String {
        let family = if v6 { "ip6tables" } else { "iptables" };
        ["nft", "legacy"]
            .iter()
            .flat_map(|variant| {
                let bin = format!("{family}-{variant}-save");
                let out = self.cmd(&bin).output().unwrap_or_else(|e| panic!("{bin}: {e}"));
                String::from_utf8_lossy(&out.stdout).into_owned().lines().map(str::to_string).collect::<Vec<_>>()
            })
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{}\n", l.split(" [").next().unwrap_or(&l)))
            .collect()
    }

    /// Only the rule lines (`-A ...`) of a family's dump.
    pub fn rules(&self, v6: bool) -> Vec<String> {
        self.iptables_save(v6).lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect()
    }

    /// `nft list ruleset`, counters zeroed.
    pub fn nft_ruleset(&self) -> String {
        self.nft_listing(&["list", "ruleset"])
    }

    /// As [`Pod::nft_ruleset`], with every object's handle: the same handles mean nothing was re-created.
    pub fn nft_ruleset_with_handles(&self) -> String {
        self.nft_listing(&["-a", "list", "ruleset"])
    }

    /// `nft ARGS`, counters zeroed.
    fn nft_listing(&self, args: &[&str]) -> String {
        let out = run_ok(self.cmd("nft").args(args));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let mut l = l.to_string();
                if let Some(i) = l.find("counter packets ") {
                    let rest = &l[i..];
                    let end = rest.find(" bytes ").map(|b| b + 7).unwrap_or(rest.len());
                    let tail = rest[end..].split_once(' ').map(|(_, t)| t).unwrap_or("");
                    l = format!("{}counter {}", &l[..i], tail);
                }
                l + "\n"
            })
            .collect()
    }
    /// Waits until the capture-proxy in this namespace answers ready on :15021; `log` is shown
    /// when it never does.
    pub fn wait_proxy_ready(&self, log: impl Fn() -> String) {
        self.wait_http_ok("capture-proxy", 15021, "/healthz/ready", log);
    }

    /// Waits until `server` answers `GET path` on 127.0.0.1:`port` in this namespace with 200
    /// (over loopback, which the capture leaves alone); `log` is shown when it never does.
    pub fn wait_http_ok(&self, server: &str, port: u16, path: &str, log: impl Fn() -> String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.enter(|| http_get(SocketAddr::from(([127, 0, 0, 1], port)), path).ok());
            if status.as_ref().is_some_and(|(status, _)| status == "200") {
                return;
            }
            assert!(Instant::now() < deadline, "{server} never answered GET {path} on :{port}:\n{}", log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The metrics of the capture-proxy in this namespace, scraped from inside it.
    pub fn proxy_metrics(&self) -> String {
        let (status, body) =
            self.enter(|| http_get(SocketAddr::from(([127, 0, 0, 1], 15090)), "/stats/prometheus")).expect("scrape");
        assert_eq!(status, "200");
        body
    }

    /// Waits until the proxy's metric `series` reads `want` (the proxy accounts just after closing).
    pub fn expect_proxy_metric(&self, series: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.proxy_metrics();
            let got = metric(&text, series);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{series} is {got}, want {want}\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Default for Pod {
    fn default() -> Self {
        Pod::new()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let target = format!("/var/run/netns/{}", self.name);
        let _ = Command::new("umount").arg(&target).status();
        let _ = std::fs::remove_file(&target);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The value of one sample line of a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Serves HTTP/1.0 on `listener` from a thread of its own: every request is answered
/// `{who} saw PEER`, with the address the connection came from.
pub fn serve_peer_address(listener: std::net::TcpListener, who: &'static str) {
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let Ok(peer) = stream.peer_addr() else { continue };
            // The whole head, up to its blank line: closing with unread bytes would reset the connection.
            let mut head = BufReader::new(&stream).lines();
            while head.next().is_some_and(|line| line.is_ok_and(|l| !l.is_empty())) {}
            let body = format!("{who} saw {}", peer.ip());
            let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
}

/// `GET path` over HTTP/1.0; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// Whether process `pid` is still running (not exited, not a zombie).
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

/// Fault injection for the IPv6 half of a restore: a directory to put first on `PATH`, whose
/// `ip6tables-nft-restore` refuses any `--noflush` input as a kernel without ip6table_nat
/// would (and runs the real one otherwise). Removed on drop.
pub struct RefusingIp6tablesRestore {
    dir: PathBuf,
}

impl RefusingIp6tablesRestore {
    pub fn new() -> RefusingIp6tablesRestore {
        let dir = std::env::temp_dir().join(unique("capt"));
        std::fs::create_dir_all(&dir).unwrap();
        let real = run_ok(Command::new("sh").args(["-c", "command -v ip6tables-nft-restore"])).stdout;
        let script = format!(
            "#!/bin/sh\ncase \"$*\" in *--noflush*) cat >/dev/null; echo 'ip6tables-restore: line 2 failed: unable to initialize \
             table' >&2; exit 1;; esac\nexec {} \"$@\"\n",
            String::from_utf8(real).unwrap().trim()
        );
        std::fs::write(dir.join("ip6tables-nft-restore"), script).unwrap();
        run_ok(Command::new("chmod").arg("+x").arg(dir.join("ip6tables-nft-restore")));
        RefusingIp6tablesRestore { dir }
    }

    /// `PATH` with the refusing program first.
    pub fn path(&self) -> String {
        format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap_or_default())
    }
}

impl Default for RefusingIp6tablesRestore {
    fn default() -> Self {
        RefusingIp6tablesRestore::new()
    }
}

impl Drop for RefusingIp6tablesRestore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command and panics with its output when it fails.
/// The release `istio-iptables` run in `pod` with `args` and `env`, as a node agent would
/// (`ISTIO_OUTBOUND_OWNER_GROUPS` from the test's own environment never leaks in).
pub fn istio_iptables(pod: &Pod, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = pod.cmd(release_bin("istio-iptables"));
    cmd.args(args).env_remove("ISTIO_OUTBOUND_OWNER_GROUPS").envs(env.iter().copied());
    cmd.output().expect("run istio-iptables")
}

/// A finished process's standard error, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Joins two namespaces with a veth pair: `a_if` in `a` with `a_addr`, `b_if` in `b` with `b_addr`.
pub fn link(a: &Pod, a_if: &str, a_addr: &str, b: &Pod, b_if: &str, b_addr: &str) {
    let tmp_a = unique("va");
    let tmp_b = unique("vb");
    run_ok(Command::new("ip").args(["link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b]));
    run_ok(Command::new("ip").args(["link", "set", &tmp_a, "netns", &a.pid().to_string()]));
    run_ok(Command::new("ip").args(["link", "set", &tmp_b, "netns", &b.pid().to_string()]));
    for (pod, tmp, name, addr) in [(a, &tmp_a, a_if, a_addr), (b, &tmp_b, b_if, b_addr)] {
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        pod.sh(&format!("ip link set {tmp} name {name} && ip addr add {addr} dev {name}{nodad} && ip link set {name} up"));
    }
}

/// `setpriv` arguments that leave a program exactly `caps` (e.g. `["net_admin"]`, or none)
/// in its inheritable, ambient and bounding sets, so it cannot regain anything else.
pub fn only_capabilities(caps: &[&str]) -> Vec<String> {
    let set = std::iter::once("-all".to_string()).chain(caps.iter().map(|c| format!("+{c}"))).collect::<Vec<_>>().join(",");
    ["--inh-caps", "--ambient-caps", "--bounding-set"].iter().map(|flag| format!("{flag}={set}")).collect()
}

/// A pod holding Istio's standard capture (both families) and running capture-proxy as uid
/// 1337 with only `caps`, linked to an `external` namespace whose servers the pod dials:
///
/// ```text
/// [pod: rules, capture-proxy] eth1 10.44.2.2 ── eth0 10.44.2.1 [external]
/// ```
pub struct ProxiedPod {
    pub pod: Pod,
    pub external: Pod,
    pub proxy: ProxyProcess,
}

/// A running capture-proxy and the file its log goes to; killed on drop, and its log shown
/// when a test fails.
pub struct ProxyProcess {
    child: Child,
    log: PathBuf,
}

impl ProxyProcess {
    /// Takes over a proxy started by `cmd` (spawned here), logging to `log`.
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> ProxyProcess {
        let stderr = std::fs::File::create(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn().expect("start capture-proxy");
        ProxyProcess { child, log }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the proxy is still running (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        process_running(self.id())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- capture-proxy log ---\n{}", self.log_text());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

impl ProxiedPod {
    /// `mode` is REDIRECT or TPROXY; `capture_args` go to istio-iptables, `flags` to the proxy.
    pub fn new(mode: &str, capture_args: &[&str], caps: &[&str], flags: &[&str]) -> ProxiedPod {
        ProxiedPod::launched_by(&[], mode, capture_args, caps, flags)
    }

    /// As [`ProxiedPod::new`], with the proxy started by `launcher`, a command that runs the rest
    /// of its arguments (such as `prlimit --nofile=128:128`) after dropping to uid 1337.
    pub fn launched_by(launcher: &[&str], mode: &str, capture_args: &[&str], caps: &[&str], flags: &[&str]) -> ProxiedPod {
        let (pod, external) = (Pod::new(), Pod::new());
        link(&pod, "eth1", "10.44.2.2/24", &external, "eth0", "10.44.2.1/24");
        let seed_with_mode = SEED_ARGS.iter().map(|a| if *a == "REDIRECT" { mode } else { a });
        run_ok(pod.cmd(release_bin("istio-iptables")).args(seed_with_mode).args(capture_args));
        let log = std::env::temp_dir().join(format!("{}-capture-proxy.log", pod.name));
        let mut cmd = pod.cmd("setpriv");
        cmd.args(["--reuid=1337", "--regid=1337", "--clear-groups"]).args(only_capabilities(caps));
        cmd.args(launcher).arg(release_bin("capture-proxy")).args(["--inbound-mode", mode]).args(flags);
        let proxied = ProxiedPod { pod, external, proxy: ProxyProcess::spawn(&mut cmd, log) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !proxied.log_text().contains("ready") {
            assert!(proxied.proxy_alive(), "capture-proxy exited:\n{}", proxied.log_text());
            assert!(std::time::Instant::now() < deadline, "capture-proxy never became ready:\n{}", proxied.log_text());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        proxied
    }

    pub fn log_text(&self) -> String {
        self.proxy.log_text()
    }

    pub fn proxy_alive(&self) -> bool {
        self.proxy.alive()
    }
}
