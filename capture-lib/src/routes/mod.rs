//! The addresses and policy routing the capture rules rely on, programmed over rtnetlink:
//!
//! * `::6/128` on `lo`: the source the proxy binds for inbound passthrough connections. Its IPv4
//!   twin 127.0.0.6 needs nothing, since all of 127/8 is local, but IPv6 loopback is one /128.
//! * For TPROXY, `ip rule add fwmark MARK lookup TABLE` and `ip route add local default dev lo
//!   table TABLE`, so that packets the TPROXY rule marked are delivered to the local listener
//!   whatever their destination address.
//!
//! Both directions are idempotent. Before adding, we list what the kernel holds and count an
//! equal entry as done: otherwise the kernel answers "File exists" for addresses and routes and,
//! worse, silently adds a duplicate rule at the next free priority. Removal deletes every entry
//! equal to ours, including duplicates left by a tool that was not idempotent, and nothing else.
//!
//! `plan.rs` says what is needed (and the `ip` commands doing the same); `entries.rs` how each
//! kind of entry is added, found and removed over rtnetlink.
//!
//! Everything acts on the network namespace of the calling thread.

mod entries;
mod plan;

use std::io;

use thiserror::Error;

pub use plan::{RoutePlan, TproxyRouting};

use crate::family::IpFamily;
use crate::netlink::route::Rtnetlink;
use crate::netlink::NetlinkError;
use crate::settings::Setting;
use plan::{Change, Entry, LOOPBACK};

#[derive(Debug, Error)]
pub enum RouteError {
    #[error(
        "IPv6 is disabled in this network namespace ({reason}): ::6/128 on lo and IPv6 TPROXY \
         routing were not set up (everything IPv4 is in place); enable IPv6 for the pod or \
         capture IPv4 only"
    )]
    Ipv6Disabled { reason: String },
    // Validation refuses both before a plan is made; these guard a config built by hand, and
    // name the setting by every name users know it by.
    #[error(
        "TPROXY route table {0} is one the kernel uses for all traffic (0 and 254 main, \
         253 default, 255 local): a local default route there would swallow every packet; \
         choose another table ({setting})", setting = Setting::TproxyRouteTable.known_as()
    )]
    ReservedTable(u32),
    #[error(
        "TPROXY mark 0 would send every packet to the TPROXY route table; choose a non-zero \
         mark ({setting})", setting = Setting::TproxyMark.known_as()
    )]
    ZeroMark,
    #[error("cannot open a netlink socket to the kernel's routing: {0}")]
    Socket(#[source] NetlinkError),
    #[error("`{command}` failed: {source}{}", hint(.source))]
    Netlink { command: String, source: NetlinkError },
}

/// What a user can do about the most likely failures.
fn hint(error: &NetlinkError) -> &'static str {
    match error {
        NetlinkError::System(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            " (this needs CAP_NET_ADMIN in the pod's network namespace)"
        }
        NetlinkError::System(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            " (a different entry already holds that place: see `ip rule show` and `ip route show table all`)"
        }
        _ => "",
    }
}

/// Adds what the plan needs to the calling thread's network namespace; entries already there
/// are left as they are. IPv4 comes first: if IPv6 is disabled, the IPv4 part is in place when
/// [`RouteError::Ipv6Disabled`] is returned, so the caller may warn and go on.
pub fn apply(plan: &RoutePlan) -> Result<(), RouteError> {
    apply_tracked(plan, &mut Added::default())
}

/// The entries one `apply` added (those that were not there before), so that a run whose
/// rules failed can take back exactly these and nothing that an earlier run left.
#[derive(Debug, Default)]
pub struct Added(Vec<Entry>);

impl Added {
    /// The `ip` commands doing what was added, in order.
    pub fn describe(&self) -> Vec<String> {
        self.0.iter().map(|entry| entry.command(Change::Add)).collect()
    }
}

/// [`apply`], recording in `added` what it adds, even when it fails part way.
pub fn apply_tracked(plan: &RoutePlan, added: &mut Added) -> Result<(), RouteError> {
    plan.check()?;
    let (mut rtnetlink, lo) = open()?;
    let (v4, v6): (Vec<Entry>, Vec<Entry>) = plan.entries().into_iter().partition(|e| e.family() == IpFamily::V4);
    let mut add = |entry: Entry| -> Result<(), RouteError> {
        if !entry.reconcile(&mut rtnetlink, lo, Change::Add)? {
            added.0.push(entry);
        }
        Ok(())
    };
    v4.into_iter().try_for_each(&mut add)?;
    if !v6.is_empty() {
        if let Some(reason) = ipv6_disabled() {
            return Err(RouteError::Ipv6Disabled { reason });
        }
    }
    v6.into_iter().try_for_each(add)
}

/// A route netlink socket, and the index of `lo`, which the address and the routes name.
fn open() -> Result<(Rtnetlink, u32), RouteError> {
    let mut rtnetlink = Rtnetlink::open().map_err(RouteError::Socket)?;
    let lo = entries::loopback_index(&mut rtnetlink)?;
    Ok((rtnetlink, lo))
}

/// Removes what `added` records, newest first.
pub fn undo(added: &Added) -> Result<(), RouteError> {
    if added.0.is_empty() {
        return Ok(());
    }
    let (mut rtnetlink, lo) = open()?;
    added.0.iter().rev().try_for_each(|entry| entry.reconcile(&mut rtnetlink, lo, Change::Remove).map(drop))
}

/// What captures added to the calling thread's namespace, found by what it is, whatever
/// settings added it: every rule that sends packets by their fwmark alone to a TPROXY table
/// (one holding a `local default dev lo` route), the `local default dev lo` routes in every
/// table but the kernel's own, and `::6/128` on `lo`. In the order `remove_ours` takes them
/// away: rules first, so that no packet is sent to a table already emptied.
pub fn ours() -> Result<Vec<Found>, RouteError> {
    let (mut rtnetlink, lo) = open()?;
    entries::found_entries(&mut rtnetlink, lo)
}

/// Removes everything [`ours`] finds (and nothing else); finding nothing is fine.
pub fn remove_ours() -> Result<(), RouteError> {
    let (mut rtnetlink, lo) = open()?;
    for Found(entry) in entries::found_entries(&mut rtnetlink, lo)? {
        entry.reconcile(&mut rtnetlink, lo, Change::Remove)?;
    }
    Ok(())
}

/// One entry [`ours`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found(Entry);

impl Found {
    /// The `ip` command that removes it.
    pub fn removal(&self) -> String {
        self.0.command(Change::Remove)
    }
}

/// The entries the plan needs that the calling thread's namespace lacks, as the `ip` commands
/// that would add them; empty when all are in place. IPv6 entries are not expected where IPv6
/// is disabled, as `apply` only warns there. Changes nothing.
pub fn missing(plan: &RoutePlan) -> Result<Vec<String>, RouteError> {
    plan.check()?;
    let (mut rtnetlink, lo) = open()?;
    let ipv6_usable = ipv6_disabled().is_none();
    let mut out = Vec::new();
    for entry in plan.entries().into_iter().filter(|e| ipv6_usable || e.family() == IpFamily::V4) {
        if !entry.reconcile(&mut rtnetlink, lo, Change::Check)? {
            out.push(entry.command(Change::Add));
        }
    }
    Ok(out)
}

/// Why IPv6 cannot be used in the calling thread's namespace, if it cannot.
fn ipv6_disabled() -> Option<String> {
    for interface in [LOOPBACK, "all"] {
        match std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")) {
            Ok(value) if value.trim() != "0" => {
                return Some(format!("net.ipv6.conf.{interface}.disable_ipv6 = {}", value.trim()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Some("the kernel has no IPv6: /proc/sys/net/ipv6 is missing".to_string())
            }
            // Unreadable for another reason: let the kernel have the last word.
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_say_which_capability_is_missing() {
        let error = RouteError::Netlink {
            command: "ip rule add fwmark 1337 lookup 133".into(),
            source: NetlinkError::System(io::Error::from_raw_os_error(libc::EPERM)),
        };
        let message = error.to_string();
        assert!(message.starts_with("`ip rule add fwmark 1337 lookup 133` failed: Operation not permitted"), "{message}");
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
    }
}
