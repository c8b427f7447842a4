//! Who the proxy runs as: the uid the capture rules exempt, and only the capabilities its
//! inbound mode needs.

use caps::{CapSet, Capability, CapsHashSet};

use crate::config::InboundMode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "running as uid {uid}, but the capture rules exempt only uid {proxy_uid} (--proxy-uid): the proxy's own \
         upstream connections would be captured again and sent back into it. Run as uid {proxy_uid}, or pass \
         --allow-any-uid if nothing captures this process's traffic"
    )]
    WrongUid { uid: u32, proxy_uid: u32 },
    #[error(
        "TPROXY mode needs {missing} (to accept with IP_TRANSPARENT and to dial from the client's address with \
         SO_MARK), and this process does not have it: grant it (e.g. securityContext capabilities, or setpriv \
         --inh-caps=+net_admin --ambient-caps=+net_admin) or use --inbound-mode REDIRECT"
    )]
    MissingCapability { missing: Capability },
    #[error("cannot change capabilities: {0}")]
    Caps(#[from] caps::errors::CapsError),
}

/// Refuses to run as a uid the capture rules would capture.
pub fn check_uid(uid: u32, proxy_uid: u32, allow_any_uid: bool) -> Result<(), Error> {
    if uid == proxy_uid || allow_any_uid {
        Ok(())
    } else {
        Err(Error::WrongUid { uid, proxy_uid })
    }
}

/// The capabilities the proxy keeps after binding its listeners.
pub fn needed(mode: InboundMode) -> CapsHashSet {
    match mode {
        InboundMode::Redirect => CapsHashSet::new(),
        // IP_TRANSPARENT and SO_MARK, on every upstream socket.
        InboundMode::Tproxy => CapsHashSet::from([Capability::CAP_NET_ADMIN]),
    }
}

/// Makes the needed capabilities effective, or names the one that is missing.
pub fn acquire(mode: InboundMode) -> Result<(), Error> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    let needed = needed(mode);
    if let Some(&missing) = needed.iter().find(|cap| !permitted.contains(cap)) {
        return Err(Error::MissingCapability { missing });
    }
    let mut effective = caps::read(None, CapSet::Effective)?;
    effective.extend(needed);
    caps::set(None, CapSet::Effective, &effective)?;
    Ok(())
}

/// Drops every capability but the needed ones, so that nothing else is left to misuse. (The
/// bounding set only matters across execve, which the proxy never does.)
pub fn drop_unneeded(mode: InboundMode) -> Result<(), Error> {
    let needed = needed(mode);
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &needed)?;
    caps::set(None, CapSet::Permitted, &needed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_must_match_unless_allowed() {
        assert!(check_uid(1337, 1337, false).is_ok());
        assert!(check_uid(0, 1337, true).is_ok());
        let message = check_uid(0, 1337, false).unwrap_err().to_string();
        assert!(message.contains("running as uid 0") && message.contains("captured again"), "{message}");
    }

    #[test]
    fn only_tproxy_needs_net_admin() {
        assert!(needed(InboundMode::Redirect).is_empty());
        assert_eq!(needed(InboundMode::Tproxy), CapsHashSet::from([Capability::CAP_NET_ADMIN]));
        let message = Error::MissingCapability { missing: Capability::CAP_NET_ADMIN }.to_string();
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
    }
}
