//! User and group names, resolved from `/etc/passwd` and `/etc/group` the way Istio's own
//! binary does (Go's `os/user` without cgo: the files, no NSS). The init container's image
//! holds the account database that matters, and `istio-iptables` is linked statically, so NSS
//! modules (LDAP, systemd, ...) could not be loaded anyway.

use std::fs;

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// The UID of the user `name`, if `/etc/passwd` has one.
pub fn uid(name: &str) -> Option<u32> {
    id_in(&fs::read_to_string(PASSWD).ok()?, name, Database::Passwd)
}

/// The GID of the group `name`, if `/etc/group` has one.
pub fn gid(name: &str) -> Option<u32> {
    id_in(&fs::read_to_string(GROUP).ok()?, name, Database::Group)
}

#[derive(Clone, Copy)]
enum Database {
    /// `name:password:uid:gid:gecos:home:shell`
    Passwd,
    /// `name:password:gid:members`
    Group,
}

impl Database {
    /// Lines with fewer fields are malformed and skipped, as Go does.
    fn min_fields(self) -> usize {
        match self {
            Database::Passwd => 6,
            Database::Group => 4,
        }
    }
}

/// The numeric third field of `name`'s entry. Comments, blank and malformed lines, and NIS
/// `+`/`-` entries are skipped; the first match wins.
fn id_in(database: &str, name: &str, kind: Database) -> Option<u32> {
    if name.is_empty() || name.starts_with(['+', '-']) {
        return None;
    }
    database
        .lines()
        .map(str::trim_start)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(|fields| fields.len() >= kind.min_fields() && fields[0] == name)
        .find_map(|fields| fields[2].parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "\
# comment:x:5:5:::
root:x:0:0:root:/root:/bin/bash
  istio-proxy:x:1337:1337:istio-proxy:/:/sbin/nologin
short:x:7
+nis:x:8:8:::
bad:x:notanumber:1:::
dup:x:10:10:::
dup:x:11:11:::
";

    #[test]
    fn users_by_name() {
        let uid = |name| id_in(PASSWD_TEXT, name, Database::Passwd);
        assert_eq!(uid("root"), Some(0));
        assert_eq!(uid("istio-proxy"), Some(1337), "leading blanks are ignored");
        assert_eq!(uid("dup"), Some(10), "the first entry wins");
        assert_eq!(uid("short"), None, "too few fields");
        assert_eq!(uid("+nis"), None);
        assert_eq!(uid("nis"), None);
        assert_eq!(uid("bad"), None);
        assert_eq!(uid("# comment"), None);
        assert_eq!(uid(""), None);
        assert_eq!(uid("nobody-here"), None);
    }

    #[test]
    fn groups_by_name() {
        let text = "root:x:0:\nistio-proxy:x:1337:\nwheel:x:10:alice,bob\nbroken:x:3\n";
        let gid = |name| id_in(text, name, Database::Group);
        assert_eq!(gid("istio-proxy"), Some(1337));
        assert_eq!(gid("wheel"), Some(10));
        assert_eq!(gid("broken"), None);
        assert_eq!(gid("alice"), None, "members are not groups");
    }

    #[test]
    fn this_machine() {
        assert_eq!(uid("root"), Some(0));
        assert_eq!(gid("root"), Some(0));
    }
}
