//! What the benchmarks (tests/examples/*_bench.rs) share: how a measured binary is linked, how
//! busy the machine was, and the spread of a set of timings.

use std::path::Path;
use std::process::Command;

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
