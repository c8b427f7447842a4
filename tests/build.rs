//! Marks the namespace tests ignored (cfg `netns_unavailable`) where they cannot run, so the runner reports
//! them as ignored instead of passing them; with `CI` set they are never marked, and fail there instead
//! (`require_netns!`). Every such test carries
//! `#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]` (checked by
//! tests/netns_guard.rs).

#[path = "src/probe.rs"]
mod probe;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(netns_unavailable)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/probe.rs");
    println!("cargo:rerun-if-env-changed=CI");
    // Probe again when another user builds (e.g. `sudo cargo test` after `cargo test`).
    println!("cargo:rerun-if-env-changed=USER");
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    if !ci && !probe::can_run() {
        println!("cargo:rustc-cfg=netns_unavailable");
    }
}
