//! One netlink client for both kernel interfaces we program: rtnetlink (addresses, rules,
//! routes) and nf_tables (dumps and batches). Callers build and read the message bodies;
//! this module owns the socket and the exchange:
//!
//! * every request gets a sequence number of its own, and a batch one per message;
//! * every answer must carry that sequence number and our port id (the one the kernel gave
//!   our socket, read back with getsockname); anything else is refused, as libmnl's
//!   `mnl_cb_run` refuses it for Mullvad's client and for `nft`;
//! * a listing (dump) must end with `NLMSG_DONE` and is read again when the kernel flags it
//!   as changed while being read (`NLM_F_DUMP_INTR`);
//! * acknowledgements and errors are decoded into an errno.
//!
//! Everything acts on the network namespace the socket was opened in: the calling thread's.

pub(crate) mod attr;
pub(crate) mod route;

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, getsockname, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use thiserror::Error;

/// How often a listing is taken when the kernel reports it changed while being read.
const DUMP_ATTEMPTS: usize = 5;
/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
pub(crate) const HEADER_LEN: usize = 16;
/// Room for one datagram. The kernel fills a listing's datagrams up to 32 KiB, and echoes a
/// refused message (at most 64 KiB, libnftnl's limit) in its error.
const RECEIVE_BUFFER: usize = 64 * 1024 + 4096;

/// Why one netlink exchange failed.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// The kernel's answer (an errno), or the socket's.
    #[error("{0}")]
    System(#[source] io::Error),
    #[error("unreadable answer from the kernel: {0}")]
    Unreadable(String),
    /// An answer to another request or for another socket: the exchange cannot be trusted.
    #[error(
        "an answer that is not ours (sequence number {sequence}, port id {port_id}; expected {}, port id {expected_port_id})",
        numbers(.expected)
    )]
    NotOurs { sequence: u32, port_id: u32, expected: Range<u32>, expected_port_id: u32 },
    #[error("the kernel's list kept changing while it was read ({DUMP_ATTEMPTS} attempts); try again")]
    KeptChanging,
}

/// `7`, or `20 to 24`.
fn numbers(range: &Range<u32>) -> String {
    match range.len() {
        1 => range.start.to_string(),
        _ => format!("{} to {}", range.start, range.end.wrapping_sub(1)),
    }
}

impl NetlinkError {
    fn errno(errno: i32) -> Self {
        NetlinkError::System(io::Error::from_raw_os_error(errno))
    }

    /// The kernel's errno, if it answered with one.
    pub(crate) fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::System(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

impl From<Errno> for NetlinkError {
    fn from(errno: Errno) -> Self {
        NetlinkError::errno(errno as i32)
    }
}

/// The fixed part of a netlink message, read without trusting alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub length: u32,
    pub kind: u16,
    pub flags: u16,
    pub sequence: u32,
    pub port_id: u32,
}

impl Header {
    /// The header `message` starts with; `None` if it is too short to hold one.
    pub(crate) fn of(message: &[u8]) -> Option<Header> {
        let u16_at = |i: usize| u16::from_ne_bytes([message[i], message[i + 1]]);
        let u32_at = |i: usize| u32::from_ne_bytes([message[i], message[i + 1], message[i + 2], message[i + 3]]);
        (message.len() >= HEADER_LEN).then(|| Header {
            length: u32_at(0),
            kind: u16_at(4),
            flags: u16_at(6),
            sequence: u32_at(8),
            port_id: u32_at(12),
        })
    }
}

/// A request with an empty header (type `kind`) before `body`; the socket sets its flags and
/// sequence number when sending it.
pub(crate) fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let length = u32::try_from(HEADER_LEN + body.len()).expect("a netlink message fits in 4 GiB");
    let mut message = Vec::with_capacity(HEADER_LEN + body.len());
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&[0; 10]); // flags, sequence number, port id
    message.extend_from_slice(body);
    message
}

/// The messages of a datagram or batch, each checked to lie within it. Messages start on
/// 4-byte boundaries.
pub(crate) fn messages(mut bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], NetlinkError>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let length = Header::of(bytes).map_or(0, |header| header.length as usize);
        if length < HEADER_LEN || length > bytes.len() {
            let error = format!("a message of {length} bytes where {} remain", bytes.len());
            bytes = &[];
            return Some(Err(NetlinkError::Unreadable(error)));
        }
        let message = &bytes[..length];
        bytes = bytes.get(length.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(message))
    })
}

/// The `int` an `NLMSG_ERROR` or `NLMSG_DONE` message carries after its header: 0, or a
/// negated errno. A `NLMSG_DONE` without one (old kernels) means 0.
fn status(message: &[u8]) -> i32 {
    message.get(HEADER_LEN..HEADER_LEN + 4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

/// Refuses a message that does not answer one of `sequences` on the socket `port_id`.
fn check_ours(header: &Header, port_id: u32, sequences: &Range<u32>) -> Result<(), NetlinkError> {
    if header.port_id == port_id && sequences.contains(&header.sequence) {
        return Ok(());
    }
    Err(NetlinkError::NotOurs {
        sequence: header.sequence,
        port_id: header.port_id,
        expected: sequences.clone(),
        expected_port_id: port_id,
    })
}

/// How the answer to one request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A listing (`NLM_F_DUMP`): the entries, then `NLMSG_DONE`.
    Done,
    /// A request asking for an acknowledgement (`NLM_F_ACK`): any entries, then `NLMSG_ERROR` 0.
    Acknowledgement,
}

/// The answer to one request, read datagram by datagram.
#[derive(Debug)]
struct Answer {
    port_id: u32,
    sequence: u32,
    ending: Ending,
    /// The kernel flagged the listing as changed while being read.
    interrupted: bool,
}

impl Answer {
    /// Reads one datagram, handing each entry to `entry`; `true` once the answer is complete.
    /// The kernel's errno, an interrupted listing, or a message that is not ours is an error.
    fn read(&mut self, datagram: &[u8], entry: &mut dyn FnMut(&[u8]) -> Result<(), NetlinkError>) -> Result<bool, NetlinkError> {
        let mut messages = messages(datagram);
        while let Some(message) = messages.next() {
            let message = message?;
            let header = Header::of(message).expect("messages() yields whole headers");
            check_ours(&header, self.port_id, &(self.sequence..self.sequence.wrapping_add(1)))?;
            self.interrupted |= header.flags & libc::NLM_F_DUMP_INTR as u16 != 0;
            let status = match i32::from(header.kind) {
                libc::NLMSG_ERROR => status(message),
                libc::NLMSG_DONE if self.ending == Ending::Done => status(message),
                libc::NLMSG_DONE => return Err(NetlinkError::Unreadable("the end of a listing where none was asked for".into())),
                kind if kind < libc::NLMSG_MIN_TYPE => continue, // NLMSG_NOOP, NLMSG_OVERRUN
                _ => {
                    entry(message)?;
                    continue;
                }
            };
            if messages.next().is_some() {
                return Err(NetlinkError::Unreadable("messages after the end of the answer".into()));
            }
            return match status {
                0 if self.ending == Ending::Done && header.kind != libc::NLMSG_DONE as u16 => {
                    Err(NetlinkError::Unreadable("an acknowledgement where the listing should end".into()))
                }
                0 if self.interrupted => Err(NetlinkError::errno(libc::EINTR)),
                0 => Ok(true),
                errno => Err(NetlinkError::errno(errno.saturating_abs())),
            };
        }
        Ok(false)
    }
}

/// A kernel error for one message of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Which message, counted from 0 in the batch as sent (its begin marker included).
    pub position: usize,
    pub errno: i32,
}

/// Reads one datagram of the answers to a batch numbered `sequences` (the first message
/// `sequences.start`): every message must be ours; errors are collected.
fn read_refusals(datagram: &[u8], port_id: u32, sequences: &Range<u32>, refusals: &mut Vec<Refusal>) -> Result<(), NetlinkError> {
    for message in messages(datagram) {
        let message = message?;
        let header = Header::of(message).expect("messages() yields whole headers");
        check_ours(&header, port_id, sequences)?;
        if i32::from(header.kind) == libc::NLMSG_ERROR && status(message) != 0 {
            let position = header.sequence.wrapping_sub(sequences.start) as usize;
            refusals.push(Refusal { position, errno: status(message).saturating_abs() });
        }
    }
    Ok(())
}

/// The kernel protocol a socket talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Route,
    Netfilter,
}

/// A netlink socket to the kernel, one request at a time.
pub(crate) struct Socket {
    fd: OwnedFd,
    port_id: u32,
    /// The last sequence number given out.
    sequence: u32,
    buffer: Vec<u8>,
}

impl Socket {
    pub(crate) fn open(protocol: Protocol) -> Result<Socket, NetlinkError> {
        let protocol = match protocol {
            Protocol::Route => SockProtocol::NetlinkRoute,
            Protocol::Netfilter => SockProtocol::NetlinkNetFilter,
        };
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol)?;
        // Port id 0: the kernel picks a free one, which its answers then carry.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let port_id = getsockname::<NetlinkAddr>(fd.as_raw_fd())?.pid();
        Ok(Socket { fd, port_id, sequence: 0, buffer: vec![0; RECEIVE_BUFFER] })
    }

    /// The entries of a listing: `request` (made by [`message`]) is sent with `NLM_F_DUMP`, and
    /// each entry the kernel lists goes through `parse`, which keeps what it returns. Taken
    /// again when the kernel says the list changed while being read.
    pub(crate) fn dump<T>(
        &mut self,
        request: &mut [u8],
        mut parse: impl FnMut(&[u8]) -> Result<Option<T>, NetlinkError>,
    ) -> Result<Vec<T>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            match self.exchange(request, Ending::Done, &mut parse) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                answer => return answer,
            }
        }
        Err(NetlinkError::KeptChanging)
    }

    /// Sends `request` (made by [`message`], its own flags set) asking for an acknowledgement;
    /// returns what `parse` keeps of the entries answered before it (a query's), and the
    /// kernel's errno as an error.
    pub(crate) fn request<T>(
        &mut self,
        request: &mut [u8],
        mut parse: impl FnMut(&[u8]) -> Result<Option<T>, NetlinkError>,
    ) -> Result<Vec<T>, NetlinkError> {
        self.exchange(request, Ending::Acknowledgement, &mut parse)
    }

    fn exchange<T>(
        &mut self,
        request: &mut [u8],
        ending: Ending,
        parse: &mut impl FnMut(&[u8]) -> Result<Option<T>, NetlinkError>,
    ) -> Result<Vec<T>, NetlinkError> {
        let flags = match ending {
            Ending::Done => libc::NLM_F_REQUEST | libc::NLM_F_DUMP,
            Ending::Acknowledgement => libc::NLM_F_REQUEST | libc::NLM_F_ACK,
        } as u16;
        let sequence = self.number(request, flags);
        self.send(request)?;
        let mut answer = Answer { port_id: self.port_id, sequence, ending, interrupted: false };
        let mut entries = Vec::new();
        loop {
            let received = self.receive(MsgFlags::empty())?;
            let complete = answer.read(&self.buffer[..received], &mut |message| {
                entries.extend(parse(message)?);
                Ok(())
            })?;
            if complete {
                return Ok(entries);
            }
        }
    }

    /// Gives `message` the next sequence number, our port id (0: the kernel fills it) and,
    /// besides its own, `flags`; returns the number.
    fn number(&mut self, message: &mut [u8], flags: u16) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        let own = u16::from_ne_bytes([message[6], message[7]]);
        message[6..8].copy_from_slice(&(own | flags).to_ne_bytes());
        message[8..12].copy_from_slice(&self.sequence.to_ne_bytes());
        message[12..16].copy_from_slice(&0u32.to_ne_bytes());
        self.sequence
    }

    /// Numbers each message of `batch` in turn; returns the numbers given.
    fn number_batch(&mut self, batch: &mut [u8]) -> Range<u32> {
        let first = self.sequence.wrapping_add(1);
        let mut at = 0;
        while let Some(header) = batch.get(at..).and_then(Header::of) {
            self.number(&mut batch[at..], 0);
            at += (header.length as usize).next_multiple_of(4).max(HEADER_LEN);
        }
        first..self.sequence.wrapping_add(1)
    }

    /// Sends a batch (its begin and end markers included) in one datagram, numbering its messages
    /// in order, and returns the kernel's refusals: empty when it committed.
    pub(crate) fn send_batch(&mut self, batch: &mut [u8]) -> Result<Vec<Refusal>, NetlinkError> {
        let sequences = self.number_batch(batch);
        // The socket must be able to hold the batch (the default is about 200 KiB). Best effort:
        // without CAP_NET_ADMIN only a large batch fails, with EMSGSIZE.
        let _ = setsockopt(&self.fd, sockopt::SndBufForce, &batch.len());
        self.send(batch)?;
        // The kernel processes the whole batch inside sendmsg, so every answer (an error, or an
        // acknowledgement of the batch markers) is queued by now: read until none is left.
        let mut refusals = Vec::new();
        loop {
            let received = match self.receive(MsgFlags::MSG_DONTWAIT) {
                Ok(received) => received,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(refusals),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(NetlinkError::System(io::Error::other(
                        "the kernel's answers overflowed the socket; the outcome is unknown",
                    )))
                }
                Err(e) => return Err(e),
            };
            read_refusals(&self.buffer[..received], self.port_id, &sequences, &mut refusals)?;
        }
    }

    fn send(&self, message: &[u8]) -> Result<(), NetlinkError> {
        let sent = sendto(self.fd.as_raw_fd(), message, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
        if sent < message.len() {
            return Err(NetlinkError::System(io::Error::other("the kernel took only part of the message")));
        }
        Ok(())
    }

    /// One datagram into the buffer; its length.
    fn receive(&mut self, flags: MsgFlags) -> Result<usize, NetlinkError> {
        loop {
            // MSG_TRUNC: the datagram's whole length, so that one too long for the buffer shows.
            match recv(self.fd.as_raw_fd(), &mut self.buffer, flags | MsgFlags::MSG_TRUNC) {
                Ok(length) if length > self.buffer.len() => {
                    return Err(NetlinkError::Unreadable(format!("an answer of {length} bytes, more than we can read")))
                }
                Ok(length) => return Ok(length),
                Err(Errno::EINTR) => continue, // a signal, not the kernel's answer
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u32 = 4242;

    /// A message as the kernel sends it: header, then `body`.
    fn answer(kind: i32, flags: i32, sequence: u32, port_id: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_ne_bytes());
        bytes.extend_from_slice(&(kind as u16).to_ne_bytes());
        bytes.extend_from_slice(&(flags as u16).to_ne_bytes());
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes.extend_from_slice(&port_id.to_ne_bytes());
        bytes.extend_from_slice(body);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    fn entry(sequence: u32, port_id: u32, flags: i32) -> Vec<u8> {
        answer(libc::RTM_NEWROUTE.into(), libc::NLM_F_MULTI | flags, sequence, port_id, &[7; 12])
    }

    fn done(sequence: u32, port_id: u32, status: i32) -> Vec<u8> {
        answer(libc::NLMSG_DONE, libc::NLM_F_MULTI, sequence, port_id, &status.to_ne_bytes())
    }

    fn nlmsg_error(sequence: u32, port_id: u32, status: i32) -> Vec<u8> {
        // The status, then the header of the request it answers.
        let mut body = status.to_ne_bytes().to_vec();
        body.extend_from_slice(&answer(libc::RTM_NEWRULE.into(), 0, sequence, 0, &[])[..HEADER_LEN]);
        answer(libc::NLMSG_ERROR, 0, sequence, port_id, &body)
    }

    /// Reads `datagrams` as the answer to request 7 on socket `PORT`: the entries, or the error.
    fn read(ending: Ending, datagrams: &[Vec<u8>]) -> Result<(Vec<Vec<u8>>, bool), NetlinkError> {
        let mut answer = Answer { port_id: PORT, sequence: 7, ending, interrupted: false };
        let mut entries = Vec::new();
        let mut complete = false;
        for datagram in datagrams {
            assert!(!complete, "a datagram after the end");
            complete = answer.read(datagram, &mut |message| {
                entries.push(message.to_vec());
                Ok(())
            })?;
        }
        Ok((entries, complete))
    }

    #[test]
    fn a_listing_is_its_entries_up_to_done() {
        let datagrams = [[entry(7, PORT, 0), entry(7, PORT, 0)].concat(), done(7, PORT, 0)];
        let (entries, complete) = read(Ending::Done, &datagrams).unwrap();
        assert!(complete);
        assert_eq!(entries, [entry(7, PORT, 0), entry(7, PORT, 0)]);

        let (_, complete) = read(Ending::Done, &datagrams[..1]).unwrap();
        assert!(!complete, "a listing goes on until NLMSG_DONE");
    }

    #[test]
    fn an_answer_to_another_request_is_refused() {
        for stale in [entry(6, PORT, 0), done(8, PORT, 0), nlmsg_error(6, PORT, 0)] {
            let error = read(Ending::Done, &[[entry(7, PORT, 0), stale].concat()]).unwrap_err();
            assert!(matches!(error, NetlinkError::NotOurs { sequence: 6 | 8, port_id: PORT, .. }), "{error:?}");
        }
        let error = read(Ending::Acknowledgement, &[nlmsg_error(8, PORT, 0)]).unwrap_err();
        assert_eq!(error.to_string(), "an answer that is not ours (sequence number 8, port id 4242; expected 7, port id 4242)");
    }

    #[test]
    fn an_answer_for_another_port_is_refused() {
        for port_id in [0, PORT + 1] {
            let error = read(Ending::Done, &[entry(7, port_id, 0)]).unwrap_err();
            assert!(matches!(error, NetlinkError::NotOurs { sequence: 7, port_id: p, .. } if p == port_id), "{error:?}");
            let error = read(Ending::Acknowledgement, &[nlmsg_error(7, port_id, 0)]).unwrap_err();
            assert!(matches!(error, NetlinkError::NotOurs { .. }), "{error:?}");
        }
    }

    #[test]
    fn the_kernels_errno_is_the_error() {
        let error = read(Ending::Acknowledgement, &[nlmsg_error(7, PORT, -libc::EEXIST)]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EEXIST));
        let error = read(Ending::Done, &[[entry(7, PORT, 0), done(7, PORT, -libc::ENOBUFS)].concat()]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOBUFS));
        let error = read(Ending::Done, &[nlmsg_error(7, PORT, -libc::EAFNOSUPPORT)]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EAFNOSUPPORT));
    }

    #[test]
    fn a_request_ends_with_its_acknowledgement() {
        let (entries, complete) =
            read(Ending::Acknowledgement, &[[entry(7, PORT, 0), nlmsg_error(7, PORT, 0)].concat()]).unwrap();
        assert!(complete);
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn a_listing_must_end_with_done() {
        let error = read(Ending::Done, &[nlmsg_error(7, PORT, 0)]).unwrap_err();
        assert!(matches!(error, NetlinkError::Unreadable(_)), "{error:?}");
        let error = read(Ending::Acknowledgement, &[done(7, PORT, 0)]).unwrap_err();
        assert!(matches!(error, NetlinkError::Unreadable(_)), "{error:?}");
        let error = read(Ending::Done, &[[done(7, PORT, 0), entry(7, PORT, 0)].concat()]).unwrap_err();
        assert!(matches!(error, NetlinkError::Unreadable(_)), "{error:?}");
    }

    #[test]
    fn an_interrupted_listing_is_read_to_its_end_and_reported() {
        let datagrams = [entry(7, PORT, libc::NLM_F_DUMP_INTR), done(7, PORT, 0)];
        let mut answer = Answer { port_id: PORT, sequence: 7, ending: Ending::Done, interrupted: false };
        assert!(!answer.read(&datagrams[0], &mut |_| Ok(())).unwrap());
        let error = answer.read(&datagrams[1], &mut |_| Ok(())).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINTR));
    }

    #[test]
    fn a_truncated_message_is_unreadable() {
        let mut datagram = entry(7, PORT, 0);
        datagram.truncate(20);
        assert!(matches!(read(Ending::Done, &[datagram]), Err(NetlinkError::Unreadable(_))));
        assert!(matches!(read(Ending::Done, &[vec![1, 0, 0, 0]]), Err(NetlinkError::Unreadable(_))));
    }

    #[test]
    fn batch_refusals_name_the_message_and_stray_answers_are_refused() {
        let sequences = 20..25;
        let datagram = [nlmsg_error(20, PORT, 0), nlmsg_error(22, PORT, -libc::ENOENT), nlmsg_error(24, PORT, 0)].concat();
        let mut refusals = Vec::new();
        read_refusals(&datagram, PORT, &sequences, &mut refusals).unwrap();
        assert_eq!(refusals, [Refusal { position: 2, errno: libc::ENOENT }]);

        for (sequence, port_id) in [(25, PORT), (19, PORT), (22, PORT + 1)] {
            let error =
                read_refusals(&nlmsg_error(sequence, port_id, -libc::EINVAL), PORT, &sequences, &mut refusals).unwrap_err();
            assert!(matches!(error, NetlinkError::NotOurs { .. }), "{error:?}");
        }
        let error = read_refusals(&nlmsg_error(25, PORT, 0), PORT, &sequences, &mut refusals).unwrap_err();
        assert!(error.to_string().contains("expected 20 to 24"), "{error}");
    }

    #[test]
    fn requests_are_numbered_in_order_and_keep_their_own_flags() {
        let mut socket = Socket::open(Protocol::Route).expect("a netlink socket (no privilege needed)");
        let mut first = message(libc::RTM_NEWROUTE, &[0; 12]);
        first[6..8].copy_from_slice(&(libc::NLM_F_CREATE as u16).to_ne_bytes());
        let sequence = socket.number(&mut first, libc::NLM_F_REQUEST as u16);
        let header = Header::of(&first).unwrap();
        assert_eq!((header.length, header.kind), (28, libc::RTM_NEWROUTE));
        assert_eq!(header.flags, (libc::NLM_F_CREATE | libc::NLM_F_REQUEST) as u16);
        assert_eq!((header.sequence, header.port_id), (sequence, 0));

        // The second message is padded to 4 bytes, as in a batch.
        let mut batch = [message(1, &[0; 4]), message(2, &[0; 6]), vec![0; 2], message(3, &[])].concat();
        assert_eq!(socket.number_batch(&mut batch), sequence + 1..sequence + 4);
        let headers: Vec<(u16, u32)> =
            messages(&batch).map(|m| Header::of(m.unwrap()).unwrap()).map(|h| (h.kind, h.sequence)).collect();
        assert_eq!(headers, [(1, sequence + 1), (2, sequence + 2), (3, sequence + 3)]);
        assert_ne!(socket.port_id, 0, "the kernel gave the socket a port id");
    }
}
