//! Talking to nf_tables: dumping objects and sending one batch.

use std::io;

use mnl::{Bus, NlMessages, Socket};
use nix::errno::Errno;
use nix::sys::socket::{recv, setsockopt, sockopt, MsgFlags};

use super::batch::Transaction;
use super::raw::{self, ElementsObject, Object, ObjectKind, SetRef};

const NFNL_SUBSYS_NFTABLES: u16 = libc::NFNL_SUBSYS_NFTABLES as u16;

// Attribute numbers from <linux/netfilter/nf_tables.h> that `libc` does not carry.
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
/// An attribute type without its nested / byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// The netlink header and the nf_tables `nfgenmsg` before the first attribute.
const NFT_HEADERS_LEN: usize = 20;

/// How often a dump is retried when the ruleset changed while it was read.
const DUMP_ATTEMPTS: usize = 5;

/// The fixed part of a netlink message, read without trusting alignment.
pub(super) struct Header {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
}

pub(super) fn header(msg: &[u8]) -> Header {
    let u16_at = |i: usize| u16::from_ne_bytes([msg[i], msg[i + 1]]);
    Header { kind: u16_at(4), flags: u16_at(6), seq: u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes")) }
}

/// The errno of an `NLMSG_ERROR` message (0 is an acknowledgement).
fn error_code(msg: &[u8]) -> i32 {
    msg.get(16..20).map(|b| -i32::from_ne_bytes(b.try_into().expect("4 bytes"))).unwrap_or(libc::EPROTO)
}

/// The object an nf_tables message carries; `None` for other messages.
pub(super) fn parse(msg: &[u8]) -> io::Result<Option<Object>> {
    let kind = header(msg).kind;
    if kind >> 8 != NFNL_SUBSYS_NFTABLES {
        return Ok(None);
    }
    let kind = match i32::from(kind & 0xff) {
        libc::NFT_MSG_NEWTABLE => ObjectKind::Table,
        libc::NFT_MSG_NEWCHAIN => ObjectKind::Chain,
        libc::NFT_MSG_NEWRULE => ObjectKind::Rule,
        libc::NFT_MSG_NEWSET => ObjectKind::Set,
        libc::NFT_MSG_NEWSETELEM => return elements(msg).map(|e| Some(Object::Elements(e))),
        _ => return Ok(None),
    };
    raw::parse(kind, msg).map(Some).ok_or_else(|| io::Error::other("libnftnl could not parse an nf_tables message"))
}

/// The attributes in `data`: type (flags cleared) and value.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*data.first()?, *data.get(1)?]));
        let kind = u16::from_ne_bytes([*data.get(2)?, *data.get(3)?]) & NLA_TYPE_MASK;
        let value = data.get(4..len)?;
        data = data.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}

fn attribute(data: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(data).find(|&(k, _)| k == kind).map(|(_, v)| v)
}

fn c_string(value: &[u8]) -> String {
    String::from_utf8_lossy(value.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

/// A `NEWSETELEM` message. Read here rather than by libnftnl, which refuses the element
/// lists it builds itself (numbered 1, 2, ... where it expects every item to be 1).
fn elements(msg: &[u8]) -> io::Result<ElementsObject> {
    let malformed = || io::Error::other("malformed set element message");
    let attrs = msg.get(NFT_HEADERS_LEN..).ok_or_else(malformed)?;
    let set = match (attribute(attrs, NFTA_SET_ELEM_LIST_SET_ID), attribute(attrs, NFTA_SET_ELEM_LIST_SET)) {
        (Some(id), _) => SetRef::Id(u32::from_be_bytes(id.try_into().map_err(|_| malformed())?)),
        (None, Some(name)) => SetRef::Name(c_string(name)),
        (None, None) => return Err(malformed()),
    };
    let keys = attributes(attribute(attrs, NFTA_SET_ELEM_LIST_ELEMENTS).unwrap_or_default())
        .filter_map(|(_, element)| attribute(element, NFTA_SET_ELEM_KEY))
        .filter_map(|key| attribute(key, NFTA_DATA_VALUE))
        .map(<[u8]>::to_vec)
        .collect();
    let table = attribute(attrs, NFTA_SET_ELEM_LIST_TABLE).map(c_string).unwrap_or_default();
    Ok(ElementsObject { table, set, keys })
}

/// Every message of a finished batch, begin and end markers included.
pub(super) fn batch_messages<'t>(tx: &'t Transaction) -> impl Iterator<Item = &'t [u8]> {
    tx.batch.iter().flat_map(|page| NlMessages::new(page).map(|m| m.expect("nftnl builds well-formed messages")))
}

/// The sequence numbers of a batch's nf_tables messages, in order (markers excluded).
pub(super) fn message_seqs(tx: &Transaction) -> Vec<u32> {
    batch_messages(tx).map(header).filter(|h| h.kind >> 8 == NFNL_SUBSYS_NFTABLES).map(|h| h.seq).collect()
}

/// A netlink attribute: length, type, value, padding to 4 bytes.
fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// What a dump asks for: the object kind, and the table (and set) it is limited to.
pub(super) enum DumpRequest<'a> {
    Tables,
    /// The tables of another family (`NFPROTO_IPV4`/`NFPROTO_IPV6`: iptables-nft's).
    TablesOf {
        family: u8,
    },
    Chains,
    /// The chains of another family's tables.
    ChainsOf {
        family: u8,
    },
    Rules {
        table: &'a str,
    },
    /// The rules of another family's table.
    RulesOf {
        family: u8,
        table: &'a str,
    },
    Sets {
        table: &'a str,
    },
    Elements {
        table: &'a str,
        set: &'a str,
    },
}

impl DumpRequest<'_> {
    /// `NFT_MSG_GET*` with `NLM_F_DUMP` for the inet family (or the one named).
    fn message(&self) -> Vec<u8> {
        let family = match *self {
            DumpRequest::TablesOf { family } | DumpRequest::ChainsOf { family } | DumpRequest::RulesOf { family, .. } => family,
            _ => libc::NFPROTO_INET as u8,
        };
        let (msg, attrs): (i32, Vec<(u16, &str)>) = match *self {
            DumpRequest::Tables | DumpRequest::TablesOf { .. } => (libc::NFT_MSG_GETTABLE, vec![]),
            DumpRequest::Chains | DumpRequest::ChainsOf { .. } => (libc::NFT_MSG_GETCHAIN, vec![]),
            DumpRequest::Rules { table } | DumpRequest::RulesOf { table, .. } => {
                (libc::NFT_MSG_GETRULE, vec![(NFTA_RULE_TABLE, table)])
            }
            DumpRequest::Sets { table } => (libc::NFT_MSG_GETSET, vec![(NFTA_SET_TABLE, table)]),
            DumpRequest::Elements { table, set } => {
                (libc::NFT_MSG_GETSETELEM, vec![(NFTA_SET_ELEM_LIST_TABLE, table), (NFTA_SET_ELEM_LIST_SET, set)])
            }
        };
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in below
        buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg as u16).to_ne_bytes());
        buf.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&[family, libc::NFNETLINK_V0 as u8, 0, 0]);
        for (kind, value) in attrs {
            push_attr(&mut buf, kind, &nul_terminated(value));
        }
        let len = buf.len() as u32;
        buf[..4].copy_from_slice(&len.to_ne_bytes());
        buf
    }
}

/// A kernel error for one message of a batch.
pub(super) struct Refusal {
    pub seq: u32,
    pub errno: i32,
}

pub(super) struct Netlink {
    socket: Socket,
    buffer: Vec<u8>,
}

impl Netlink {
    pub(super) fn open() -> io::Result<Netlink> {
        let socket = Socket::new(Bus::Netfilter)?;
        Ok(Netlink { socket, buffer: vec![0; nftnl::nft_nlmsg_maxsize() as usize] })
    }

    /// All inet objects the request names, retried when the ruleset changed mid-dump.
    pub(super) fn dump(&mut self, request: &DumpRequest) -> io::Result<Vec<Object>> {
        for _ in 0..DUMP_ATTEMPTS {
            if let Some(objects) = self.dump_once(request)? {
                return Ok(objects);
            }
        }
        Err(io::Error::other("the ruleset kept changing while it was read"))
    }

    /// `None` when the kernel flagged the dump as interrupted by a change.
    fn dump_once(&mut self, request: &DumpRequest) -> io::Result<Option<Vec<Object>>> {
        self.socket.send(&request.message())?;
        let mut objects = Vec::new();
        let mut interrupted = false;
        loop {
            let received = self.socket.recv_raw(&mut self.buffer)?;
            for msg in NlMessages::new(&self.buffer[..received]) {
                let msg = msg?;
                let head = header(msg);
                interrupted |= head.flags & libc::NLM_F_DUMP_INTR as u16 != 0;
                match i32::from(head.kind) {
                    libc::NLMSG_DONE => return Ok((!interrupted).then_some(objects)),
                    libc::NLMSG_ERROR => match error_code(msg) {
                        // What the dump is limited to vanished since it was listed.
                        libc::ENOENT => return Ok(Some(Vec::new())),
                        errno => return Err(io::Error::from_raw_os_error(errno)),
                    },
                    _ => objects.extend(parse(msg)?),
                }
            }
        }
    }

    /// Sends the batch and collects the kernel's refusals (empty: it committed).
    pub(super) fn send(&mut self, tx: &Transaction) -> io::Result<Vec<Refusal>> {
        // One send for all of nftnl's pages: the kernel reads a transaction from one
        // message buffer, so a batch split over several sends would not commit.
        let batch = tx.batch.iter().collect::<Vec<&[u8]>>().concat();
        // The socket must be able to hold it (the default is about 200 KiB). Best effort:
        // without CAP_NET_ADMIN only a large batch fails, with EMSGSIZE.
        let _ = setsockopt(&raw::borrow_fd(&self.socket), sockopt::SndBufForce, &batch.len());
        if self.socket.send(&batch)? < batch.len() {
            return Err(io::Error::other("the kernel took only part of the batch"));
        }
        // The kernel processes the whole batch inside sendmsg, so every answer (an error, or
        // an acknowledgement of the batch markers) is queued by now: read until none is left.
        let mut refusals = Vec::new();
        loop {
            let received = match recv(self.socket_fd(), &mut self.buffer, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(refusals),
                Err(Errno::ENOBUFS) => {
                    return Err(io::Error::other("the kernel's answers overflowed the socket; the outcome is unknown"))
                }
                Err(e) => return Err(e.into()),
            };
            for msg in NlMessages::new(&self.buffer[..received]) {
                let msg = msg?;
                let head = header(msg);
                if i32::from(head.kind) == libc::NLMSG_ERROR {
                    let code = error_code(msg);
                    if code != 0 {
                        refusals.push(Refusal { seq: head.seq, errno: code });
                    }
                }
            }
        }
    }

    fn socket_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.socket.as_raw_fd()
    }
}
