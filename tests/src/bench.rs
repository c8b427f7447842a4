//! What the benchmarks (tests/examples/*_bench.rs) share: how a measured binary is linked, how
//! busy the machine was, the spread of a set of timings, and commands timed from spawn to exit
//! in fresh pod namespaces, taking turns.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const NAMESERVERS: &str = "nameserver 10.96.0.10\nnameserver fd00::a\n";

/// Hands each `--name value` pair of the command line to `set`, which says whether it knows the
/// name; anything else stops the benchmark with `usage`.
pub fn options(usage: &str, mut set: impl FnMut(&str, &str) -> bool) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [name, value] = pair else { panic!("{} needs a value (use {usage})", pair[0]) };
        assert!(set(name, value), "unknown option {name} (use {usage})");
    }
}

/// How `ldd` describes the binary: "statically linked", or the shared libraries it loads.
pub fn linkage(bin: &Path) -> String {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let libraries: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).filter(|l| l.contains(".so")).collect();
    if libraries.is_empty() {
        text.trim().to_string()
    } else {
        format!("dynamically linked ({})", libraries.join(", "))
    }
}

/// Jiffies the machine spent busy and in total, from `/proc/stat`.
pub struct CpuTimes {
    busy: f64,
    total: f64,
}

impl CpuTimes {
    pub fn now() -> CpuTimes {
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        let fields: Vec<f64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|f| f.parse().unwrap()).collect();
        let total: f64 = fields.iter().take(8).sum();
        // idle and iowait are the 4th and 5th fields.
        CpuTimes { busy: total - fields[3] - fields[4], total }
    }

    /// The share of the time since `earlier` the machine was busy, in percent (2 cores: 50% is one core).
    pub fn busy_percent_since(&self, earlier: &CpuTimes) -> f64 {
        100.0 * (self.busy - earlier.busy) / (self.total - earlier.total)
    }
}

/// The lowest, median and highest of `values` (sorted here; none empty).
pub fn spread<T: Copy + PartialOrd>(values: &mut [T]) -> (T, T, T) {
    values.sort_by(|a, b| a.partial_cmp(b).expect("comparable values"));
    (values[0], values[values.len() / 2], values[values.len() - 1])
}

/// Child mode of a benchmark, inside a namespace: `STDIN CMD ARGS.. [:: STDIN CMD ARGS..]..` runs
/// the commands one after another (STDIN is a file or `-` for none) and prints the total
/// microseconds from the first spawn to the last exit.
pub fn time_commands(args: &[String]) {
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

/// A pod namespace like the conformance runner's (`ip netns`), with `lo`, `eth0` carrying
/// 10.44.0.5/24 and fd00:44::5/64, and two nameservers; deleted on drop.
pub struct Namespace(String);

impl Namespace {
    pub fn new(name: String) -> Namespace {
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

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `ip netns exec NS PROGRAM ARGS..`, its stdout.
    pub fn run(&self, program: &Path, args: &[&str]) -> String {
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

/// Runs a shell script; panics when it fails.
pub fn sh(script: &str) {
    let status = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(status.success(), "{script}");
}

/// The `--dry-run` payloads of the iptables backend, as [`time_commands`] steps with the same
/// programs and flags (`# iptables-nft-restore --noflush (IPv4)` heads each payload; anything
/// else before the first, such as the ip sets, is not a restore's).
pub fn restore_steps(dry_run: &str, scratch: &Path) -> Vec<Vec<String>> {
    let mut steps: Vec<Vec<String>> = Vec::new();
    let mut payload = String::new();
    let flush = |steps: &mut Vec<Vec<String>>, payload: &mut String| {
        let payload = std::mem::take(payload);
        let file = scratch.join(format!("restore{}.rules", steps.len()));
        if let Some(step) = steps.last_mut() {
            fs::write(&file, payload).unwrap();
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
    steps
}

/// A command timed from spawn to exit by [`time_commands`] in a fresh namespace each run.
pub struct Contender {
    pub name: &'static str,
    /// [`time_commands`] arguments (steps joined by `::`).
    pub timed: Vec<String>,
    pub micros: Vec<u128>,
}

impl Contender {
    pub fn new(name: &'static str, steps: Vec<Vec<String>>) -> Contender {
        Contender { name, timed: steps.join(&"::".to_string()), micros: vec![] }
    }
}

/// Times every contender `runs` times after `warmup` rounds that do not count; within a round
/// they take turns (A B C .. A B C ..), so drift on the machine spreads evenly. Each run gets a
/// new namespace (made and deleted outside the timing) and is timed by this same program re-run
/// inside it (`ip netns exec NS BENCH time ...`), so every contender pays the same timer overhead.
pub fn time_alternating(contenders: &mut [Contender], warmup: usize, runs: usize) {
    let me = std::env::current_exe().unwrap();
    for round in 0..warmup + runs {
        for (i, contender) in contenders.iter_mut().enumerate() {
            let pod = Namespace::new(format!("bench{}x{round}c{i}", std::process::id()));
            let timed: Vec<&str> = ["time"].into_iter().chain(contender.timed.iter().map(String::as_str)).collect();
            let micros: u128 = pod.run(&me, &timed).trim().parse().unwrap();
            if round >= warmup {
                contender.micros.push(micros);
            }
        }
    }
}

/// Prints the contenders' times as a markdown table (ms) and returns their medians (µs).
pub fn print_times(contenders: &mut [Contender]) -> Vec<f64> {
    let ms = |us: u128| us as f64 / 1000.0;
    println!("| command | min | median | max |\n| --- | ---: | ---: | ---: |");
    let mut medians = Vec::new();
    for c in contenders.iter_mut() {
        let (min, median, max) = spread(&mut c.micros);
        medians.push(median as f64);
        println!("| {} | {:.2} | {:.2} | {:.2} |", c.name, ms(min), ms(median), ms(max));
    }
    medians
}
