//! Inbound: connections from outside the pod to the application, captured on the inbound
//! port. The application must see them arrive from 127.0.0.6 (REDIRECT), which the capture
//! rules let through, or from the client itself (TPROXY).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};

use crate::config::InboundMode;
use crate::metrics::Direction;
use crate::proxy::TrafficPath;
use crate::socket::{self, Source};

/// The source address the capture rules exempt from redirection (`-o lo -s 127.0.0.6`);
/// istio-iptables puts `::6/128` on lo for IPv6.
const PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

pub struct Inbound {
    pub mode: InboundMode,
    pub tproxy_mark: u32,
}

impl TrafficPath for Inbound {
    fn direction(&self) -> Direction {
        Direction::Inbound
    }

    fn destination(&self, client: &TcpStream, ipv6: bool) -> io::Result<SocketAddr> {
        match self.mode {
            InboundMode::Redirect => socket::original_destination(client, ipv6),
            // TPROXY leaves the destination untouched; but the rules still NAT-redirect the
            // proxy's own connections to the pod's address, which only SO_ORIGINAL_DST knows.
            InboundMode::Tproxy => {
                socket::original_destination(client, ipv6).or_else(|_| client.local_addr().map(socket::canonical))
            }
        }
    }

    fn source(&self, client: SocketAddr, dest: SocketAddr) -> Source {
        match self.mode {
            InboundMode::Redirect if dest.is_ipv6() => Source::Bound(IpAddr::V6(PASSTHROUGH_V6)),
            InboundMode::Redirect => Source::Bound(IpAddr::V4(PASSTHROUGH_V4)),
            InboundMode::Tproxy => Source::Spoofed { ip: client.ip(), mark: self.tproxy_mark },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_mode_dials_from_the_passthrough_address_of_the_destination_family() {
        let inbound = Inbound { mode: InboundMode::Redirect, tproxy_mark: 1337 };
        let client: SocketAddr = "10.44.1.1:40000".parse().unwrap();
        assert_eq!(inbound.source(client, "10.44.0.5:8080".parse().unwrap()), Source::Bound("127.0.0.6".parse().unwrap()));
        let client: SocketAddr = "[fd00::1]:40000".parse().unwrap();
        assert_eq!(inbound.source(client, "[fd00::5]:8080".parse().unwrap()), Source::Bound("::6".parse().unwrap()));
    }

    #[test]
    fn tproxy_mode_dials_from_the_client_with_the_mark() {
        let inbound = Inbound { mode: InboundMode::Tproxy, tproxy_mark: 0x539 };
        let client: SocketAddr = "10.44.1.1:40000".parse().unwrap();
        assert_eq!(
            inbound.source(client, "10.44.0.5:8080".parse().unwrap()),
            Source::Spoofed { ip: "10.44.1.1".parse().unwrap(), mark: 1337 }
        );
    }
}
