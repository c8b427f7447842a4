//! rtnetlink over [`Socket`]: requests and listings as `netlink-packet-route` messages.
//!
//! Synchronous, rather than the `rtnetlink` crate: the init container sends a handful of
//! requests one after another, so its tokio runtime would only add start-up work and binary
//! size; `rtnetlink` builds on these same message types.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;

use super::{NetlinkError, Protocol, Socket};

/// A route netlink socket.
pub(crate) struct Rtnetlink(Socket);

impl Rtnetlink {
    pub(crate) fn open() -> Result<Rtnetlink, NetlinkError> {
        Socket::open(Protocol::Route).map(Rtnetlink)
    }

    /// Sends `message` with `flags` (besides the request and acknowledgement flags) and returns
    /// the entries the kernel answers before its acknowledgement: those of a query, none for a
    /// change.
    pub(crate) fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.0.request(&mut bytes(message, flags), entry)
    }

    /// Every entry the listing `request` asks for.
    pub(crate) fn dump(&mut self, request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.0.dump(&mut bytes(request, 0), entry)
    }
}

fn bytes(message: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    bytes
}

fn entry(message: &[u8]) -> Result<Option<RouteNetlinkMessage>, NetlinkError> {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
        Ok(NetlinkMessage { payload: NetlinkPayload::InnerMessage(entry), .. }) => Ok(Some(entry)),
        Ok(_) => Ok(None),
        Err(e) => Err(NetlinkError::Unreadable(e.to_string())),
    }
}
