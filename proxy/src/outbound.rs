//! Outbound: connections from the application to anywhere, captured on the outbound port
//! and sent on to where they were going. The proxy's uid is exempt from capture, so a
//! plain connect does not come back.

use std::io;
use std::net::{SocketAddr, TcpStream};

use crate::metrics::Direction;
use crate::proxy::TrafficPath;
use crate::socket::{self, Source};

pub struct Outbound;

impl TrafficPath for Outbound {
    fn direction(&self) -> Direction {
        Direction::Outbound
    }

    fn destination(&self, client: &TcpStream, ipv6: bool) -> io::Result<SocketAddr> {
        socket::original_destination(client, ipv6)
    }

    fn source(&self, _client: SocketAddr, _dest: SocketAddr) -> Source {
        Source::Any
    }
}
