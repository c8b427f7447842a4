//! Whether this process can make network namespaces: shared by the build script (which marks the
//! namespace tests ignored where they cannot run) and `require_netns!` (which fails where they run anyway).

use std::process::Command;

/// True when the tests can create network namespaces: effective uid 0 and `unshare --net` works.
pub fn can_run() -> bool {
    is_root() && Command::new("unshare").arg("--net").arg("true").status().map(|s| s.success()).unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}
