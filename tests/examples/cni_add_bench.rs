//! The CNI plugin's ADD in a node's chain, against the chain's own first plugin: Debian's
//! `bridge` (with `host-local` for addresses), which makes the pod's veth, bridge port, address,
//! routes and NAT rules. Each round, two fresh pod namespaces each get the chain's ADD as a
//! runtime runs it, one plugin after the other with the previous result: `bridge` (timed), then
//! `istio-capture-cni` (timed), once with the native nftables backend (the installer's default
//! entry) and once with the iptables backend (the same entry, `"nativeNftables": false`); the
//! order of the two alternates. Every ADD is checked to have programmed the capture, then both
//! plugins' DEL and the namespace's removal run outside the timing.
//!
//! The node's conflist is the one `istio-capture-cni install` writes into a directory of the
//! benchmark's own, after a primary conflist like the CRI tests' (tests/src/containerd.rs); each
//! plugin gets its entry as libcni hands it over (the list's `cniVersion` and `name`, the pod's
//! annotations in `runtimeConfig` when the entry declares the capability, `prevResult`), and the
//! `CNI_ARGS` containerd sends. Everything runs in a network namespace of its own (the "node"),
//! so the bridge and the NAT chains never touch the machine's network. Each ADD is timed from
//! spawn to exit by this process.
//!
//! Run as root after `scripts/build.sh` (which links the plugin statically, as it ships):
//! `cargo run --release -p capture-tests --example cni_add_bench -- [--runs N] [--bin PATH] [--plugins DIR]`
//! On a machine doing other work, run it under `chrt -f 50` (the plugins inherit the real-time
//! priority, so other work cannot preempt them); it prints how busy the machine was.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use capture_tests::bench::{linkage, options, spread, CpuTimes};
use capture_tests::cri::{INJECTED_STATUS, SIDECAR_STATUS};
use serde_json::{json, Value};

const WARMUP: usize = 2;
const NETWORK: &str = "capnet";
const SUBNET: &str = "10.78.0.0/16";
const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Nftables,
    Iptables,
}

fn main() {
    let mut runs = 30;
    let mut bin = PathBuf::from("target/release/istio-capture-cni");
    let mut plugins = PathBuf::from("/usr/lib/cni");
    options("--runs N, --bin PATH, --plugins DIR", |name, value| {
        match name {
            "--runs" => runs = value.parse().expect("--runs N"),
            "--bin" => bin = PathBuf::from(value),
            "--plugins" => plugins = PathBuf::from(value),
            _ => return false,
        }
        true
    });
    let bin = fs::canonicalize(&bin).expect("the istio-capture-cni binary (scripts/build.sh)");
    bench(&bin, &plugins, runs);
}

/// A network namespace under /run/netns, deleted on drop.
struct Namespace(String);

impl Namespace {
    fn new(name: String) -> Namespace {
        run(Command::new("ip").args(["netns", "add", &name]));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Namespace(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// `ip netns exec NS PROGRAM ARGS..`, its stdout.
    fn run(&self, program: &str, args: &[&str]) -> String {
        run(Command::new("ip").args(["netns", "exec", &self.0, program]).args(args))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// One pod's part of the chain: the `CNI_*` variables and each plugin's configuration.
struct PodCall<'a> {
    netns: &'a Namespace,
    container_id: String,
    cni_args: String,
}

impl PodCall<'_> {
    /// Runs `plugin` with `command` and `conf` on stdin; returns the microseconds from spawn to
    /// exit and its stdout, panicking with its answer when it fails.
    fn invoke(&self, plugin: &Path, command: &str, conf: &Value, plugins: &Path) -> (u128, Value) {
        let stdin = conf.to_string();
        let start = Instant::now();
        let mut child = Command::new(plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", self.netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugins)
            .env("CNI_ARGS", &self.cni_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", plugin.display()));
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let micros = start.elapsed().as_micros();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} {command} failed: {stdout}{}\nconfiguration: {stdin}",
            plugin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        (micros, serde_json::from_str(&stdout).unwrap_or(Value::Null))
    }
}

/// The node's conflist as the installer chains it: a primary conflist (bridge + host-local, its
/// reservations in `dir`) and our entry after it.
fn installed_chain(bin: &Path, dir: &Path) -> Value {
    let (bin_dir, conf_dir) = (dir.join("bin"), dir.join("net.d"));
    fs::create_dir_all(&bin_dir).unwrap();
    fs::create_dir_all(&conf_dir).unwrap();
    let primary = json!({
        "cniVersion": "1.0.0", "name": NETWORK,
        "plugins": [{
            "type": "bridge", "bridge": "capbr0", "isGateway": true, "ipMasq": true,
            "ipam": { "type": "host-local", "subnet": SUBNET, "dataDir": dir.join("ipam"), "routes": [{ "dst": "0.0.0.0/0" }] }
        }]
    });
    let conflist = conf_dir.join(format!("10-{NETWORK}.conflist"));
    fs::write(&conflist, primary.to_string()).unwrap();
    run(Command::new(bin).arg("install").arg("--cni-bin-dir").arg(&bin_dir).arg("--cni-conf-dir").arg(&conf_dir));
    serde_json::from_slice(&fs::read(&conflist).unwrap()).unwrap()
}

/// A plugin's configuration as libcni builds it from the list: the list's version and name,
/// `runtimeConfig` for the capabilities the entry declares, and the previous result.
fn plugin_conf(list: &Value, entry: &Value, prev_result: Option<&Value>) -> Value {
    let mut conf = entry.clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    if entry["capabilities"][ANNOTATIONS_CAPABILITY] == json!(true) {
        conf["runtimeConfig"] = json!({ ANNOTATIONS_CAPABILITY: { SIDECAR_STATUS: INJECTED_STATUS } });
    }
    if let Some(result) = prev_result {
        conf["prevResult"] = result.clone();
    }
    conf
}

/// Our entry with the backend's setting.
fn with_backend(entry: &Value, backend: Backend) -> Value {
    let mut entry = entry.clone();
    entry["capture"]["nativeNftables"] = json!(backend == Backend::Nftables);
    entry
}

/// Fails when the plugin's ADD left the pod without the capture (a benchmark of a no-op would be
/// worthless).
fn assert_captured(pod: &Namespace, backend: Backend) {
    let (program, args, wanted): (&str, &[&str], &str) = match backend {
        Backend::Nftables => ("nft", &["list", "ruleset"], "redirect to :15001"),
        Backend::Iptables => ("iptables-nft-save", &["-t", "nat"], "--to-ports 15001"),
    };
    let rules = pod.run(program, args);
    assert!(rules.contains(wanted), "{backend:?}: ADD left no capture in the pod:\n{rules}");
}

#[derive(Default)]
struct Timings {
    bridge: Vec<u128>,
    nftables: Vec<u128>,
    iptables: Vec<u128>,
    /// Our ADD over the bridge's, in the same pod.
    nftables_ratio: Vec<f64>,
    iptables_ratio: Vec<f64>,
}

fn bench(bin: &Path, plugins: &Path, runs: usize) {
    let id = std::process::id();
    let scratch = std::env::temp_dir().join(format!("cni-add-bench-{id}"));
    let list = installed_chain(bin, &scratch);
    let [bridge_entry, our_entry] = list["plugins"].as_array().expect("a plugins list").as_slice() else {
        panic!("the installer did not chain one entry after the bridge: {list}");
    };
    let bridge = plugins.join("bridge");
    // The node: this process and every plugin it runs live in a namespace of their own.
    let node = Namespace::new(format!("cnibench{id}node"));
    let node_ns = fs::File::open(node.path()).unwrap();
    nix::sched::setns(&node_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the node's namespace");

    let mut timings = Timings::default();
    let cpu_before = CpuTimes::now();
    for round in 0..WARMUP + runs {
        let order = if round % 2 == 0 { [Backend::Nftables, Backend::Iptables] } else { [Backend::Iptables, Backend::Nftables] };
        for backend in order {
            let name = format!("cnibench{id}r{round}{backend:?}");
            let pod = Namespace::new(name.clone());
            let call = PodCall {
                netns: &pod,
                container_id: name.clone(),
                cni_args: format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-{round};K8S_POD_INFRA_CONTAINER_ID={name};\
                     K8S_POD_UID=uid-{name}"
                ),
            };
            let bridge_conf = plugin_conf(&list, bridge_entry, None);
            let (bridge_us, result) = call.invoke(&bridge, "ADD", &bridge_conf, plugins);
            let our_conf = plugin_conf(&list, &with_backend(our_entry, backend), Some(&result));
            let (our_us, _) = call.invoke(bin, "ADD", &our_conf, plugins);
            assert_captured(&pod, backend);
            call.invoke(bin, "DEL", &our_conf, plugins);
            call.invoke(&bridge, "DEL", &plugin_conf(&list, bridge_entry, Some(&result)), plugins);
            if round < WARMUP {
                continue;
            }
            timings.bridge.push(bridge_us);
            let (ours, ratios) = match backend {
                Backend::Nftables => (&mut timings.nftables, &mut timings.nftables_ratio),
                Backend::Iptables => (&mut timings.iptables, &mut timings.iptables_ratio),
            };
            ours.push(our_us);
            ratios.push(our_us as f64 / bridge_us as f64);
        }
    }
    let busy = CpuTimes::now().busy_percent_since(&cpu_before);
    fs::remove_dir_all(&scratch).unwrap();
    report(&mut timings, runs);
    println!("\n{} is {}", bin.display(), linkage(bin));
    println!("{} is {}", bridge.display(), linkage(&bridge));
    println!("\nmachine busy {busy:.0}% of the time during the runs (2 cores: 50% is one core)");
}

fn report(t: &mut Timings, runs: usize) {
    let ms = |us: u128| us as f64 / 1000.0;
    println!("{runs} rounds after {WARMUP} warm-ups, two fresh pods a round; ADD wall time in ms, spawn to exit\n");
    println!("| plugin's ADD | min | median | max |\n| --- | ---: | ---: | ---: |");
    let rows = [
        ("bridge + host-local (both pods)", &mut t.bridge),
        ("istio-capture-cni, native nftables", &mut t.nftables),
        ("istio-capture-cni, iptables", &mut t.iptables),
    ];
    let mut medians = Vec::new();
    for (name, values) in rows {
        let (min, median, max) = spread(values);
        medians.push(median as f64);
        println!("| {name} | {:.2} | {:.2} | {:.2} |", ms(min), ms(median), ms(max));
    }
    println!("\n| istio-capture-cni ÷ bridge + host-local | ratio of medians | per pod: median (lowest–highest) |");
    println!("| --- | ---: | ---: |");
    for (name, median, ratios) in
        [("native nftables", medians[1], &mut t.nftables_ratio), ("iptables", medians[2], &mut t.iptables_ratio)]
    {
        let (low, mid, high) = spread(ratios);
        println!("| {name} | {:.2} | {mid:.2} ({low:.2}–{high:.2}) |", median / medians[0]);
    }
}
