//! Running `iptables-save` and `iptables-restore`: the only processes this backend starts.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::IptablesError;

/// Which kernel interface the iptables binaries drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Legacy,
    Nft,
}

impl Variant {
    pub fn parse(value: &str) -> Option<Variant> {
        match value {
            "legacy" => Some(Variant::Legacy),
            "nft" => Some(Variant::Nft),
            _ => None,
        }
    }

    /// Istio's rule: legacy only when it already holds tables in this namespace (someone
    /// uses it here; adding nft rules beside them would split the ruleset), otherwise nft.
    pub fn detect(v6: bool) -> Variant {
        if legacy_holds_tables(v6) == Some(true) {
            Variant::Legacy
        } else {
            Variant::Nft
        }
    }
}

/// Whether iptables-legacy holds any table of the family in the current namespace (`None`:
/// cannot tell). Legacy tables are listed in /proc/net/ip{,6}_tables_names; reading that file
/// is equivalent to `iptables-legacy-save` and starts no process.
fn legacy_holds_tables(v6: bool) -> Option<bool> {
    let names = if v6 { "/proc/net/ip6_tables_names" } else { "/proc/net/ip_tables_names" };
    std::fs::read_to_string(names).ok().map(|tables| !tables.trim().is_empty())
}

/// The save/restore pair for one family and variant.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub save: String,
    pub restore: String,
    pub v6: bool,
    variant: Variant,
}

impl Binaries {
    /// `iptables-nft-save` etc., or the plain names where a distribution ships no suffixed ones.
    pub fn new(variant: Variant, v6: bool) -> Binaries {
        let base = if v6 { "ip6tables" } else { "iptables" };
        let kind = match variant {
            Variant::Legacy => "legacy",
            Variant::Nft => "nft",
        };
        let pick = |op: &str| {
            let suffixed = format!("{base}-{kind}-{op}");
            if in_path(&suffixed) {
                suffixed
            } else {
                format!("{base}-{op}")
            }
        };
        Binaries { save: pick("save"), restore: pick("restore"), v6, variant }
    }

    pub fn family(&self) -> &'static str {
        if self.v6 {
            "IPv6"
        } else {
            "IPv4"
        }
    }

    /// True when the kernel certainly holds no table of this variant and family, so there is
    /// no state to read and no process to start (iptables-nft's tables are nf_tables tables of
    /// the family).
    pub fn holds_nothing(&self) -> bool {
        match self.variant {
            Variant::Legacy => legacy_holds_tables(self.v6) == Some(false),
            Variant::Nft => crate::nftables::has_iptables_tables(self.v6).is_ok_and(|any| !any),
        }
    }

    /// The current ruleset of this family.
    pub fn save(&self) -> Result<String, IptablesError> {
        let out = Command::new(&self.save)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| IptablesError::Spawn { program: self.save.clone(), source: e })?;
        if !out.status.success() {
            return Err(IptablesError::Save {
                program: self.save.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Feeds `payload` to one `iptables-restore` (atomic per table). `noflush` keeps what the
    /// tables hold besides what the payload names; without it, named tables are replaced.
    pub fn restore(&self, payload: &str, noflush: bool, lock_wait: Duration) -> Result<(), IptablesError> {
        let mut cmd = Command::new(&self.restore);
        if noflush {
            cmd.arg("--noflush");
        }
        // Wait for the xtables lock instead of failing when another tool holds it.
        cmd.arg(format!("--wait={}", lock_wait.as_secs().max(1)));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| IptablesError::Spawn { program: self.restore.clone(), source: e })?;
        let written = child.stdin.take().map(|mut stdin| stdin.write_all(payload.as_bytes()));
        let out = child
            .wait_with_output()
            .map_err(|e| IptablesError::Spawn { program: self.restore.clone(), source: e })?;
        if out.status.success() {
            if let Some(Err(e)) = written {
                return Err(IptablesError::Spawn { program: self.restore.clone(), source: e });
            }
            return Ok(());
        }
        Err(restore_error(&self.restore, payload, &String::from_utf8_lossy(&out.stderr)))
    }
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| Path::new(&dir).join(program).is_file()))
        .unwrap_or(false)
}

/// Turns restore's stderr into an error that quotes the refused line and suggests a fix.
fn restore_error(program: &str, payload: &str, stderr: &str) -> IptablesError {
    let stderr = stderr.trim().to_string();
    // "line 7 failed" / "Error occurred at line: 7"
    let line = failing_line(&stderr).and_then(|n| payload.lines().nth(n.saturating_sub(1))).map(str::to_string);
    let hint = if stderr.contains("unable to initialize table") || stderr.contains("does not exist") || stderr.contains("No chain/target/match") {
        Some("the kernel lacks a netfilter module; load it on the node (e.g. `modprobe iptable_nat iptable_mangle iptable_raw xt_owner xt_REDIRECT xt_TPROXY xt_conntrack xt_mark xt_connmark xt_CT xt_multiport`) or try --native-nftables")
    } else if stderr.contains("xtables lock") || stderr.contains("Resource temporarily unavailable") {
        Some("another process holds the xtables lock; it was not released in time")
    } else {
        None
    };
    IptablesError::Restore { program: program.to_string(), stderr, line, hint }
}

fn failing_line(stderr: &str) -> Option<usize> {
    for marker in ["line ", "line: "] {
        if let Some(pos) = stderr.find(marker) {
            let digits: String = stderr[pos + marker.len()..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_quotes_the_refused_line() {
        let payload = "*nat\n:ISTIO_OUTPUT - [0:0]\n-A ISTIO_OUTPUT -j NOPE\nCOMMIT\n";
        let e = restore_error("iptables-nft-restore", payload, "iptables-nft-restore: line 3 failed: No chain/target/match by that name.");
        match e {
            IptablesError::Restore { line, hint, .. } => {
                assert_eq!(line.as_deref(), Some("-A ISTIO_OUTPUT -j NOPE"));
                assert!(hint.unwrap().contains("modprobe"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(failing_line("Error occurred at line: 18"), Some(18));
    }

    #[test]
    fn forced_variants() {
        assert_eq!(Variant::parse("legacy"), Some(Variant::Legacy));
        assert_eq!(Variant::parse("nft"), Some(Variant::Nft));
        assert_eq!(Variant::parse("NFT"), None);
    }
}
