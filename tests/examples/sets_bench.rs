//! What a long list of excluded CIDRs costs, in the rule form (Istio's: one rule per CIDR) and the
//! set form (`--use-ip-sets`: one set, one rule), with both backends (issue #15):
//!
//! 1. new outbound connections per second through the capture with N = 0, 1,000 and 5,000
//!    excluded CIDRs, none matching the destination: 12 cells (2 backends × 2 forms × 3 lists).
//!    Each measurement gets a fresh pod namespace (`eth0` with a default route) captured with
//!    `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*' -x LIST`, in which this same program,
//!    re-run as uid 1000 (`ip netns exec NS setpriv ... sets_bench connect ...`), listens on 15001
//!    and, on one thread, opens a connection to 10.55.0.1:80, accepts it and closes both, again
//!    and again for a fixed time: every connection walks the capture's output chain and lands on
//!    the listener (a connection not captured fails the run). Before it, the capture is checked to have the
//!    form asked for: a rule per CIDR, or one rule and a set the kernel lists with N members.
//!    The cells take turns within a round, forwards then backwards, so drift on the machine
//!    spreads evenly;
//! 2. whole-process time to program the 5,000-CIDR capture into a fresh namespace: the set
//!    form and the rule form with both backends, against `nft -f` of the rule form's nft script
//!    and bare `iptables-nft-restore` of its restore payload (both printed by `--dry-run`), and
//!    `nft -f` of the set form's script.
//!
//! Run as root after `scripts/build.sh` (istio-iptables linked statically, as it ships):
//! `cargo run --release -p capture-tests --example sets_bench -- [--rounds N] [--seconds S] [--runs N] [--bin PATH]`
//! On a machine doing other work, run it under `chrt -f 50` (the clients, listeners and timed
//! commands inherit the real-time priority, so other work cannot preempt them); it prints how
//! busy the machine was and its load average.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capture_lib::family::IpFamily;
use capture_lib::model::sets::SetList;
use capture_tests::bench::{
    linkage, options, print_times, restore_steps, sh, spread, time_alternating, time_commands, Contender, CpuTimes, Namespace,
};
use socket2::{Domain, Socket, Type};

/// Istio's REDIRECT sidecar capture, all outbound and inbound, before `-x LIST`.
#[rustfmt::skip]
const CAPTURE: [&str; 13] = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "-x"];
/// The table of the native nftables backend's NAT chains.
const NAT_TABLE: &str = "istio-proxy-nat";
const LISTS: [usize; 3] = [0, 1_000, 5_000];
/// Outbound, in none of the excluded CIDRs; routed through `eth0`, captured before it leaves.
const DESTINATION: &str = "10.55.0.1:80";
/// The client's user: any but the proxy's (1337), whose traffic the capture lets through.
const CLIENT: [&str; 3] = ["--reuid=1000", "--regid=1000", "--clear-groups"];
/// Connections each client opens before it starts counting.
const CLIENT_WARMUP: u64 = 300;
/// Apply runs dropped before the counted ones.
const APPLY_WARMUP: usize = 2;

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Iptables,
    Nftables,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "native nftables",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Backend::Iptables => &[],
            Backend::Nftables => &["--native-nftables"],
        }
    }

    /// The rules of the capture's output chain in `pod`.
    fn output_rules(self, pod: &Namespace) -> usize {
        match self {
            Backend::Iptables => {
                let save = pod.run(Path::new("iptables-nft-save"), &["-t", "nat"]);
                save.lines().filter(|l| l.starts_with("-A ISTIO_OUTPUT ")).count()
            }
            Backend::Nftables => {
                let chain = pod.run(Path::new("nft"), &["list", "chain", "inet", NAT_TABLE, "istio-output"]);
                let body = chain.lines().map(str::trim).filter(|l| !l.is_empty());
                body.filter(|l| !l.starts_with("table ") && !l.starts_with("chain ") && !l.starts_with('}')).count()
            }
        }
    }

    /// The members of the set of excluded IPv4 ranges in `pod`, as the kernel reports them.
    fn excluded_set_size(self, pod: &Namespace) -> usize {
        let name = SetList::OutboundRangesExclude(IpFamily::V4).name();
        match self {
            Backend::Iptables => {
                let header = pod.run(Path::new("ipset"), &["list", "-terse", name]);
                let entries = header.lines().find_map(|l| l.strip_prefix("Number of entries: "));
                entries.expect("ipset list: no number of entries").parse().unwrap()
            }
            Backend::Nftables => {
                let set = pod.run(Path::new("nft"), &["list", "set", "inet", NAT_TABLE, name]);
                let elements = set.split_once("elements = {").map_or("", |(_, rest)| rest.split('}').next().unwrap());
                elements.split(',').filter(|e| !e.trim().is_empty()).count()
            }
        }
    }

    /// Checks that the capture in `pod` has the form asked for: a rule per excluded CIDR, or
    /// one set holding them all and one rule matching it.
    fn check_form(self, pod: &Namespace, sets: bool, excluded: usize) {
        let rules = self.output_rules(pod);
        let matching = if sets { excluded.min(1) } else { excluded };
        // The owner, loopback and redirect rules of the output chain come on top.
        assert!(
            (matching..matching + 12).contains(&rules),
            "{}, {excluded} CIDRs: {rules} rules in the output chain",
            self.name()
        );
        if sets && excluded > 0 {
            assert_eq!(self.excluded_set_size(pod), excluded, "{}: the set of excluded CIDRs", self.name());
        }
    }
}

/// One cell of the matrix and its connection rates, one a round.
struct Cell {
    backend: Backend,
    sets: bool,
    excluded: usize,
    rates: Vec<f64>,
}

impl Cell {
    fn form(&self) -> &'static str {
        if self.sets {
            "set"
        } else {
            "rule"
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("time") => return time_commands(&args[1..]),
        Some("connect") => return connect_for(&args[1..]),
        _ => {}
    }
    let (mut rounds, mut seconds, mut runs) = (5, 2.0, 15);
    let mut bin = PathBuf::from("target/release/istio-iptables");
    options("--rounds N, --seconds S, --runs N, --bin PATH", |name, value| {
        match name {
            "--rounds" => rounds = value.parse().expect("--rounds N"),
            "--seconds" => seconds = value.parse().expect("--seconds S"),
            "--runs" => runs = value.parse().expect("--runs N"),
            "--bin" => bin = PathBuf::from(value),
            _ => return false,
        }
        true
    });
    let bin = fs::canonicalize(&bin).expect("the istio-iptables binary (scripts/build.sh)");
    println!("load average before: {}", load_average());
    let cpu_before = CpuTimes::now();
    connection_rates(&bin, rounds, Duration::from_secs_f64(seconds));
    apply_times(&bin, runs);
    let busy = CpuTimes::now().busy_percent_since(&cpu_before);
    println!("\n{} is {}", bin.display(), linkage(&bin));
    println!("\nmachine busy {busy:.0}% of the time during the runs (2 cores: 50% is one core)");
    println!("load average after: {}", load_average());
}

/// `n` disjoint, non-adjacent /24s (every other one from 100.64.0.0), none holding [`DESTINATION`]:
/// the set form cannot merge them, so its set holds `n` ranges.
fn excluded_cidrs(n: usize) -> String {
    (0..n).map(|k| format!("100.{}.{}.0/24", 64 + k / 128, (k % 128) * 2)).collect::<Vec<_>>().join(",")
}

/// istio-iptables arguments for the capture with `excluded` CIDRs.
fn capture_args(backend: Backend, sets: bool, excluded: usize) -> Vec<String> {
    let form: &[&str] = if sets { &["--use-ip-sets"] } else { &[] };
    let flags = backend.flags().iter().chain(form).chain(&CAPTURE).map(|s| s.to_string());
    flags.chain([excluded_cidrs(excluded)]).collect()
}

fn connection_rates(bin: &Path, rounds: usize, duration: Duration) {
    let mut cells: Vec<Cell> = [Backend::Iptables, Backend::Nftables]
        .into_iter()
        .flat_map(|backend| [false, true].map(move |sets| (backend, sets)))
        .flat_map(|(backend, sets)| LISTS.map(move |excluded| Cell { backend, sets, excluded, rates: vec![] }))
        .collect();
    let me = std::env::current_exe().unwrap();
    let millis = duration.as_millis().to_string();
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 { (0..cells.len()).collect() } else { (0..cells.len()).rev().collect() };
        for i in order {
            let cell = &mut cells[i];
            let pod = Namespace::new(format!("setsbench{}r{round}c{i}", std::process::id()));
            sh(&format!("ip -n {} route add default via 10.44.0.1 dev eth0", pod.name()));
            let args = capture_args(cell.backend, cell.sets, cell.excluded);
            pod.run(bin, &args.iter().map(String::as_str).collect::<Vec<_>>());
            cell.backend.check_form(&pod, cell.sets, cell.excluded);
            let client: Vec<&str> =
                CLIENT.iter().copied().chain([me.to_str().unwrap(), "connect", DESTINATION, &millis]).collect();
            let out = pod.run(Path::new("setpriv"), &client);
            let [connections, micros, drops] = out.split_whitespace().map(|n| n.parse::<f64>().unwrap()).collect::<Vec<_>>()[..]
            else {
                panic!("connect printed {out:?}, not CONNECTIONS MICROS DROPS")
            };
            assert_eq!(drops, 0.0, "the listener fell behind: {drops} SYNs dropped (retransmitted a second later)");
            cell.rates.push(connections * 1e6 / micros);
        }
    }
    report_rates(&mut cells, rounds, duration);
}

fn report_rates(cells: &mut [Cell], rounds: usize, duration: Duration) {
    println!(
        "\nnew connections per second, {rounds} rounds of {:.1} s per cell (cells take turns, forwards then \
         backwards), fresh namespace each\n",
        duration.as_secs_f64()
    );
    println!("| backend | form | excluded CIDRs | conn/s: median (lowest–highest) | × N = 0: ratio of medians (per round) |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let mut targets = Vec::new();
    for i in 0..cells.len() {
        let base = i - i % LISTS.len();
        let ratios: Vec<f64> = cells[i].rates.iter().zip(&cells[base].rates).map(|(r, b)| r / b).collect();
        let (_, base_median, _) = spread(&mut cells[base].rates.clone());
        let cell = &cells[i];
        let (min, median, max) = spread(&mut cell.rates.clone());
        let (rmin, _, rmax) = spread(&mut ratios.clone());
        let ratio = median / base_median;
        println!(
            "| {} | {} | {} | {median:.0} ({min:.0}–{max:.0}) | {ratio:.2} ({rmin:.2}–{rmax:.2}) |",
            cell.backend.name(),
            cell.form(),
            cell.excluded
        );
        if cell.sets && cell.excluded == LISTS[LISTS.len() - 1] {
            targets.push((cell.backend.name(), ratio));
        }
    }
    println!("\n| set form, conn/s at 5,000 ÷ at 0 | ratio of medians | target | met |\n| --- | ---: | ---: | --- |");
    for (backend, ratio) in targets {
        println!("| {backend} | {ratio:.2} | ≥ 0.95 | {} |", if ratio >= 0.95 { "yes" } else { "no" });
    }
}

fn apply_times(bin: &Path, runs: usize) {
    let scratch = std::env::temp_dir().join(format!("sets-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let excluded = LISTS[LISTS.len() - 1];
    let ours = |backend: Backend, sets: bool| -> Vec<Vec<String>> {
        vec![["-".to_string(), bin.to_str().unwrap().to_string()]
            .into_iter()
            .chain(capture_args(backend, sets, excluded))
            .collect()]
    };
    let mut contenders = {
        let pod = Namespace::new(format!("setsbench{}s", std::process::id()));
        let dry_run = |backend: Backend, sets: bool| {
            let args: Vec<String> = capture_args(backend, sets, excluded).into_iter().chain(["--dry-run".into()]).collect();
            pod.run(bin, &args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let nft = |sets: bool| {
            let script = scratch.join(if sets { "sets.nft" } else { "rules.nft" });
            fs::write(&script, dry_run(Backend::Nftables, sets)).unwrap();
            vec![["-", "nft", "-f", script.to_str().unwrap()].map(String::from).to_vec()]
        };
        let restores = restore_steps(&dry_run(Backend::Iptables, false), &scratch);
        assert_eq!(restores.len(), 1, "expected one (IPv4) restore for a REDIRECT capture");
        vec![
            Contender::new("istio-iptables --native-nftables --use-ip-sets", ours(Backend::Nftables, true)),
            Contender::new("istio-iptables --use-ip-sets (iptables backend)", ours(Backend::Iptables, true)),
            Contender::new("nft -f (rule form)", nft(false)),
            Contender::new("iptables-restore (rule form)", restores),
            Contender::new("istio-iptables --native-nftables (rule form)", ours(Backend::Nftables, false)),
            Contender::new("istio-iptables (iptables backend, rule form)", ours(Backend::Iptables, false)),
            Contender::new("nft -f (set form)", nft(true)),
        ]
    };
    time_alternating(&mut contenders, APPLY_WARMUP, runs);
    fs::remove_dir_all(&scratch).unwrap();
    println!(
        "\nprogramming the capture with {excluded} excluded CIDRs into a fresh namespace, whole process: {runs} runs \
         each after {APPLY_WARMUP} warm-ups, alternating; wall time in ms\n"
    );
    let medians = print_times(&mut contenders);
    println!("\n| ratio of medians | value | target | met |\n| --- | ---: | ---: | --- |");
    let ratios = [
        ("native nftables, set form / nft -f of the rule form", 0, 2, Some(0.10)),
        ("iptables backend, set form / nft -f of the rule form", 1, 2, Some(0.10)),
        ("iptables backend, set form / iptables-restore of the rule form", 1, 3, None),
        ("native nftables, set form / nft -f of the set form", 0, 6, None),
        ("native nftables, rule form / nft -f of the rule form", 4, 2, None),
        ("iptables backend, rule form / iptables-restore of the rule form", 5, 3, None),
    ];
    for (what, ours, theirs, target) in ratios {
        let ratio = medians[ours] / medians[theirs];
        match target {
            Some(target) => println!("| {what} | {ratio:.3} | ≤ {target:.2} | {} |", if ratio <= target { "yes" } else { "no" }),
            None => println!("| {what} | {ratio:.3} | – | – |"),
        }
    }
}

/// Child mode, as the client's user inside a captured pod: `connect ADDRESS MILLIS` listens on
/// the proxy's port 15001 and opens [`CLIENT_WARMUP`] connections to ADDRESS, then for MILLIS
/// opens one, accepts it on the listener and closes both (the client with a reset: no TIME_WAIT
/// piles up), one after another on one thread: no wake-up of another thread in the way, no
/// listener falling behind (a dropped SYN comes back only a second later), and every connection
/// must reach the listener, which only the capture's redirect can do. Prints how many it opened,
/// in how many microseconds, and how many SYNs the namespace's listeners dropped.
fn connect_for(args: &[String]) {
    let [address, millis] = args else { panic!("connect: ADDRESS MILLIS") };
    let address: SocketAddr = address.parse().expect("connect: ADDRESS");
    let duration = Duration::from_millis(millis.parse().expect("connect: MILLIS"));
    let listener = TcpListener::bind(("0.0.0.0", 15001)).expect("listen on 15001");
    // Bounds the accept of a connection that went elsewhere.
    Socket::from(listener.try_clone().unwrap()).set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let connect = || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_linger(Some(Duration::ZERO)).unwrap();
        socket.connect(&address.into()).unwrap_or_else(|e| panic!("connect to {address}: {e} (not captured?)"));
        let (accepted, _) = listener.accept().unwrap_or_else(|e| panic!("the connection to {address} never reached :15001: {e}"));
        drop(socket);
        drop(accepted);
    };
    (0..CLIENT_WARMUP).for_each(|_| connect());
    let start = Instant::now();
    let mut connections = 0;
    while start.elapsed() < duration {
        connect();
        connections += 1;
    }
    println!("{connections} {} {}", start.elapsed().as_micros(), listen_drops());
}

/// SYNs this namespace's listeners dropped (`TcpExt: ListenDrops`).
fn listen_drops() -> u64 {
    let netstat = fs::read_to_string("/proc/net/netstat").unwrap();
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:")).map(|l| l.split_whitespace());
    let (names, values) = (tcp_ext.next().unwrap(), tcp_ext.next().unwrap());
    names.zip(values).find(|(name, _)| *name == "ListenDrops").unwrap().1.parse().unwrap()
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").unwrap().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
