//! Whole-process time to program the largest capture (TPROXY on every port, all outbound,
//! DNS to v4 and v6 servers, dual stack) into a fresh pod namespace, four ways:
//!
//! * `istio-iptables --native-nftables` against `nft -f` of the script it prints with `--dry-run`;
//! * `istio-iptables` (iptables backend) against bare `iptables-restore` + `ip6tables-restore` of
//!   the payloads it prints with `--dry-run` (same binaries and flags).
//!
//! Every run gets a new namespace (made and deleted outside the timing); the four commands
//! alternate, so drift on the machine spreads evenly. Each command is timed from spawn to exit
//! by this same program re-run inside the namespace (`ip netns exec NS capture_bench time ...`),
//! so both sides of a ratio pay the same timer overhead and see the pod's resolv.conf.
//!
//! Run as root after `scripts/build.sh` (which links istio-iptables statically, as it ships; the
//! report says how the measured binary is linked):
//! `cargo run --release -p capture-tests --example capture_bench -- [--runs N] [--bin PATH]`
//! On a machine doing other work, run it under `chrt -f 50` (the commands inherit the
//! real-time priority, so other work cannot preempt them); it prints how busy the machine was.

use std::fs;
use std::path::{Path, PathBuf};

use capture_tests::bench::{
    linkage, options, print_times, restore_steps, time_alternating, time_commands, Contender, CpuTimes, Namespace,
};

const WARMUP: usize = 2;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("time") {
        return time_commands(&args[1..]);
    }
    let mut runs = 30;
    let mut bin = PathBuf::from("target/release/istio-iptables");
    options("--runs N, --bin PATH", |name, value| {
        match name {
            "--runs" => runs = value.parse().expect("--runs N"),
            "--bin" => bin = PathBuf::from(value),
            _ => return false,
        }
        true
    });
    bench(&fs::canonicalize(&bin).expect("the istio-iptables binary (build with --release)"), runs);
}

/// What Istio's injector passes for a TPROXY pod (`-p -z -u -m -i -x -b -d`), plus DNS
/// capture and dual stack: the largest ruleset the tool makes.
#[rustfmt::skip]
const CAPTURE: [&str; 18] = [
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
    "--redirect-dns", "--dual-stack",
];

fn bench(bin: &Path, runs: usize) {
    let scratch = std::env::temp_dir().join(format!("capture-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let mut contenders = {
        let pod = Namespace::new(format!("nftbench{}s", std::process::id()));
        let native: Vec<&str> = CAPTURE.iter().copied().chain(["--native-nftables"]).collect();
        let script = scratch.join("capture.nft");
        fs::write(&script, pod.run(bin, &[native.as_slice(), &["--dry-run"]].concat())).unwrap();
        let restores = restore_steps(&pod.run(bin, &[CAPTURE.as_slice(), &["--dry-run"]].concat()), &scratch);
        assert_eq!(restores.len(), 2, "expected an IPv4 and an IPv6 restore");
        let ours = |extra: &[&str]| -> Vec<Vec<String>> {
            vec![["-", bin.to_str().unwrap()].iter().chain(CAPTURE.iter()).chain(extra).map(|s| s.to_string()).collect()]
        };
        let nft = vec![["-", "nft", "-f", script.to_str().unwrap()].map(String::from).to_vec()];
        vec![
            Contender::new("istio-iptables --native-nftables", ours(&["--native-nftables"])),
            Contender::new("nft -f (same ruleset)", nft),
            Contender::new("istio-iptables (iptables backend)", ours(&[])),
            Contender::new("iptables-restore + ip6tables-restore", restores),
        ]
    };
    let cpu_before = CpuTimes::now();
    time_alternating(&mut contenders, WARMUP, runs);
    let busy = CpuTimes::now().busy_percent_since(&cpu_before);
    fs::remove_dir_all(&scratch).unwrap();
    println!("{runs} runs each after {WARMUP} warm-ups, fresh namespace per run, alternating; wall time in ms\n");
    let medians = print_times(&mut contenders);
    println!("\n| ratio of medians | value | target |\n| --- | ---: | ---: |");
    println!("| native nftables / nft -f | {:.2} | ≤ 0.50 |", medians[0] / medians[1]);
    println!("| iptables backend / bare restores | {:.2} | ≤ 1.50 |", medians[2] / medians[3]);
    println!("\n{} is {}", bin.display(), linkage(bin));
    // The runs themselves keep one core busy; much more means other work skewed them.
    println!("\nmachine busy {busy:.0}% of the time during the runs (2 cores: 50% is one core)");
}
