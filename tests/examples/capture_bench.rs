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
use std::process::{Command, Stdio};
use std::time::Instant;

use capture_tests::bench::{linkage, options, spread, CpuTimes};

const NAMESERVERS: &str = "nameserver 10.96.0.10\nnameserver fd00::a\n";
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

/// Child mode, inside the namespace: `time STDIN CMD ARGS.. [:: STDIN CMD ARGS..]..` runs
/// the commands one after another (STDIN is a file or `-` for none) and prints the total
/// microseconds from the first spawn to the last exit.
fn time_commands(args: &[String]) {
    let commands: Vec<&[String]> = args.split(|a| a == "::").collect();
    let start = Instant::now();
    for command in commands {
        let [stdin, program, argv @ ..] = command else { panic!("time: STDIN PROGRAM ARGS..") };
        let input = if stdin == "-" { Stdio::null() } else { fs::File::open(stdin).expect("stdin file").into() };
        let out = Command::new(program).args(argv).stdin(input).stdout(Stdio::null()).output().expect(program);
        if !out.status.success() {
            eprintln!("{program} failed: {}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        }
    }
    println!("{}", start.elapsed().as_micros());
}

/// A pod namespace like the conformance runner's, with both address families and two
/// nameservers; deleted on drop.
struct Namespace(String);

impl Namespace {
    fn new(name: String) -> Namespace {
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up && \
             ip -n {name} link add eth0 type veth peer name eth0peer && \
             ip -n {name} link set eth0 up && ip -n {name} link set eth0peer up && \
             ip -n {name} addr add 10.44.0.5/24 dev eth0 && \
             ip -n {name} -6 addr add fd00:44::5/64 dev eth0 nodad"
        ));
        fs::create_dir_all(format!("/etc/netns/{name}")).unwrap();
        fs::write(format!("/etc/netns/{name}/resolv.conf"), NAMESERVERS).unwrap();
        Namespace(name)
    }

    /// `ip netns exec NS PROGRAM ARGS..`, its stdout.
    fn run(&self, program: &Path, args: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.0]).arg(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program:?} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

fn sh(script: &str) {
    let status = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(status.success(), "{script}");
}

/// What Istio's injector passes for a TPROXY pod (`-p -z -u -m -i -x -b -d`), plus DNS
/// capture and dual stack: the largest ruleset the tool makes.
#[rustfmt::skip]
const CAPTURE: [&str; 18] = [
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
    "--redirect-dns", "--dual-stack",
];

struct Contender {
    name: &'static str,
    /// Arguments for the child-mode timer.
    timed: Vec<String>,
    micros: Vec<u128>,
}

fn bench(bin: &Path, runs: usize) {
    let scratch = std::env::temp_dir().join(format!("capture-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let contenders = {
        let pod = Namespace::new(format!("nftbench{}s", std::process::id()));
        let native: Vec<&str> = CAPTURE.iter().copied().chain(["--native-nftables"]).collect();
        let script = scratch.join("capture.nft");
        fs::write(&script, pod.run(bin, &[native.as_slice(), &["--dry-run"]].concat())).unwrap();
        let restores = restore_steps(&pod.run(bin, &[CAPTURE.as_slice(), &["--dry-run"]].concat()), &scratch);
        let ours = |extra: &[&str]| -> Vec<String> {
            ["-", bin.to_str().unwrap()].iter().chain(CAPTURE.iter()).chain(extra).map(|s| s.to_string()).collect()
        };
        vec![
            Contender { name: "istio-iptables --native-nftables", timed: ours(&["--native-nftables"]), micros: vec![] },
            Contender {
                name: "nft -f (same ruleset)",
                timed: vec!["-".into(), "nft".into(), "-f".into(), script.to_str().unwrap().into()],
                micros: vec![],
            },
            Contender { name: "istio-iptables (iptables backend)", timed: ours(&[]), micros: vec![] },
            Contender { name: "iptables-restore + ip6tables-restore", timed: restores, micros: vec![] },
        ]
    };
    let mut contenders = contenders;
    let me = std::env::current_exe().unwrap();
    let cpu_before = CpuTimes::now();
    for round in 0..WARMUP + runs {
        for (i, contender) in contenders.iter_mut().enumerate() {
            let pod = Namespace::new(format!("nftbench{}x{round}c{i}", std::process::id()));
            let timed: Vec<&str> = ["time"].into_iter().chain(contender.timed.iter().map(String::as_str)).collect();
            let micros: u128 = pod.run(&me, &timed).trim().parse().unwrap();
            if round >= WARMUP {
                contender.micros.push(micros);
            }
        }
    }
    let busy = CpuTimes::now().busy_percent_since(&cpu_before);
    fs::remove_dir_all(&scratch).unwrap();
    report(&mut contenders, runs);
    println!("\n{} is {}", bin.display(), linkage(bin));
    // The runs themselves keep one core busy; much more means other work skewed them.
    println!("\nmachine busy {busy:.0}% of the time during the runs (2 cores: 50% is one core)");
}

/// The `--dry-run` payloads of the iptables backend, as timer steps with the same programs
/// and flags (`# iptables-nft-restore --noflush (IPv4)` headers each payload).
fn restore_steps(dry_run: &str, scratch: &Path) -> Vec<String> {
    let mut steps: Vec<Vec<String>> = Vec::new();
    let mut payload = String::new();
    let flush = |steps: &mut Vec<Vec<String>>, payload: &mut String| {
        let file = scratch.join(format!("restore{}.rules", steps.len()));
        if let Some(step) = steps.last_mut() {
            fs::write(&file, std::mem::take(payload)).unwrap();
            step[0] = file.to_str().unwrap().to_string();
        }
    };
    for line in dry_run.lines() {
        if let Some(command) = line.strip_prefix("# ").filter(|c| c.contains("-restore")) {
            flush(&mut steps, &mut payload);
            let words = command.split_whitespace().take_while(|w| !w.starts_with('('));
            steps.push(std::iter::once("-".to_string()).chain(words.map(str::to_string)).collect());
        } else if !line.starts_with('#') {
            payload.push_str(line);
            payload.push('\n');
        }
    }
    flush(&mut steps, &mut payload);
    assert_eq!(steps.len(), 2, "expected an IPv4 and an IPv6 restore in:\n{dry_run}");
    steps.join(&"::".to_string())
}

fn report(contenders: &mut [Contender], runs: usize) {
    let ms = |us: u128| us as f64 / 1000.0;
    println!("{runs} runs each after {WARMUP} warm-ups, fresh namespace per run, alternating; wall time in ms\n");
    println!("| command | min | median | max |\n| --- | ---: | ---: | ---: |");
    let mut medians = Vec::new();
    for c in contenders.iter_mut() {
        let (min, median, max) = spread(&mut c.micros);
        medians.push(median as f64);
        println!("| {} | {:.2} | {:.2} | {:.2} |", c.name, ms(min), ms(median), ms(max));
    }
    println!("\n| ratio of medians | value | target |\n| --- | ---: | ---: |");
    println!("| native nftables / nft -f | {:.2} | ≤ 0.50 |", medians[0] / medians[1]);
    println!("| iptables backend / bare restores | {:.2} | ≤ 1.50 |", medians[2] / medians[3]);
}
