//! Running `iptables-save` and `iptables-restore`: the only processes this backend starts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{IptablesError, NfTables};
use crate::family::IpFamily;
use crate::settings::Setting;

/// Where iptables-legacy takes its lock unless `XTABLES_LOCKFILE` says otherwise.
const XTABLES_LOCK: &str = "/run/xtables.lock";

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
    pub fn detect(family: IpFamily) -> Variant {
        if legacy_holds_tables(family) == Some(true) {
            Variant::Legacy
        } else {
            Variant::Nft
        }
    }
}

/// Whether iptables-legacy holds any table of the family in the current namespace (`None`:
/// cannot tell). Legacy tables are listed in /proc/net/ip{,6}_tables_names; reading that file
/// is equivalent to `iptables-legacy-save` and starts no process.
pub(super) fn legacy_holds_tables(family: IpFamily) -> Option<bool> {
    let names = match family {
        IpFamily::V4 => "/proc/net/ip_tables_names",
        IpFamily::V6 => "/proc/net/ip6_tables_names",
    };
    std::fs::read_to_string(names).ok().map(|tables| !tables.trim().is_empty())
}

/// The save/restore pair for one family and variant.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub save: String,
    pub restore: String,
    pub family: IpFamily,
    variant: Variant,
}

impl Binaries {
    /// `iptables-nft-save` etc., or the plain names where a distribution ships no suffixed ones.
    pub fn new(variant: Variant, family: IpFamily) -> Binaries {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
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
        Binaries { save: pick("save"), restore: pick("restore"), family, variant }
    }

    /// True when the kernel certainly holds no table of this variant and family, so there is
    /// no state to read and no process to start (iptables-nft's tables are nf_tables tables of
    /// the family).
    pub fn holds_nothing(&self, nf_tables: &dyn NfTables) -> bool {
        match self.variant {
            Variant::Legacy => legacy_holds_tables(self.family) == Some(false),
            Variant::Nft => nf_tables.holds_tables(self.family) == Some(false),
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

    /// Deletes what iptables-nft keeps of `tables` once they hold nothing: see
    /// [`NfTables::prune`]. Legacy tables cannot be deleted.
    pub fn prune(&self, nf_tables: &dyn NfTables, tables: &[String]) -> Result<(), IptablesError> {
        if self.variant != Variant::Nft || tables.is_empty() {
            return Ok(());
        }
        nf_tables.prune(self.family, tables).map_err(|source| IptablesError::Prune { family: self.family, source })
    }

    /// Legacy iptables serialises its writers with a lock file (`XTABLES_LOCKFILE`, else
    /// /run/xtables.lock) that it opens, creating it if need be, before it reads any input.
    /// Where it cannot (a read-only root), say so before any restore runs.
    pub fn check_lock(&self) -> Result<(), IptablesError> {
        let path = std::env::var_os("XTABLES_LOCKFILE").map_or_else(|| PathBuf::from(XTABLES_LOCK), PathBuf::from);
        self.check_lock_at(path)
    }

    fn check_lock_at(&self, path: PathBuf) -> Result<(), IptablesError> {
        use nix::fcntl::{open, OFlag};
        use nix::sys::stat::Mode;
        if self.variant != Variant::Legacy {
            return Ok(());
        }
        match open(&path, OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC, Mode::S_IRUSR | Mode::S_IWUSR) {
            Ok(_) => Ok(()),
            Err(errno) => Err(IptablesError::Lock { program: self.restore.clone(), path, source: errno.into() }),
        }
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
        let out = child.wait_with_output().map_err(|e| IptablesError::Spawn { program: self.restore.clone(), source: e })?;
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
    let hint = if stderr.contains("unable to initialize table")
        || stderr.contains("does not exist")
        || stderr.contains("No chain/target/match")
    {
        Some(format!(
            "the kernel lacks a netfilter module; load it on the node (e.g. `modprobe iptable_nat iptable_mangle \
             iptable_raw xt_owner xt_REDIRECT xt_TPROXY xt_conntrack xt_mark xt_connmark xt_CT xt_multiport xt_set`) or use \
             native nftables ({})",
            Setting::NativeNftables.known_as()
        ))
    } else if stderr.contains("xtables lock") || stderr.contains("Resource temporarily unavailable") {
        Some("another process holds the xtables lock; it was not released in time".to_string())
    } else {
        None
    };
    IptablesError::Restore { program: program.to_string(), stderr, line, hint }
}

/// What to do when an iptables program cannot be started.
pub fn spawn_hint(error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        format!(
            " (iptables is not installed here: install it, or use native nftables ({}), which needs no iptables program)",
            Setting::NativeNftables.known_as()
        )
    } else {
        " (is iptables installed?)".to_string()
    }
}

/// Whether a failed restore stopped at the xtables lock, before it read its input.
pub fn stopped_at_lock(stderr: &str) -> bool {
    stderr.contains("can't open lock file") || stderr.contains("Another app is currently holding the xtables lock")
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
        let e = restore_error(
            "iptables-nft-restore",
            payload,
            "iptables-nft-restore: line 3 failed: No chain/target/match by that name.",
        );
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
    fn failures_before_the_input_is_read_are_told_apart() {
        assert!(stopped_at_lock("Fatal: can't open lock file /run/xtables.lock: Read-only file system"));
        assert!(stopped_at_lock("Another app is currently holding the xtables lock. Stopped waiting after 1s."));
        assert!(!stopped_at_lock("iptables-restore: line 3 failed"));
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(spawn_hint(&missing).contains("--native-nftables"));
    }

    #[test]
    fn a_lock_file_that_cannot_be_created_is_reported_before_any_restore() {
        let bins = Binaries { save: "s".into(), restore: "r".into(), family: IpFamily::V4, variant: Variant::Legacy };
        let unopenable = PathBuf::from("/proc/no-such-dir/xtables.lock");
        let message = bins.check_lock_at(unopenable.clone()).unwrap_err().to_string();
        assert!(message.contains("/proc/no-such-dir/xtables.lock") && message.contains("XTABLES_LOCKFILE"), "{message}");
        let nft = Binaries { variant: Variant::Nft, ..bins };
        assert!(nft.check_lock_at(unopenable).is_ok(), "iptables-nft takes no lock");
    }

    #[test]
    fn forced_variants() {
        assert_eq!(Variant::parse("legacy"), Some(Variant::Legacy));
        assert_eq!(Variant::parse("nft"), Some(Variant::Nft));
        assert_eq!(Variant::parse("NFT"), None);
    }
}
