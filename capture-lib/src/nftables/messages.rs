//! nf_tables messages: the dump requests we send, the objects the kernel lists, and our
//! batches, read back. The exchange itself is [`crate::netlink`]'s.

use super::batch::Transaction;
use super::raw::{self, ElementsObject, Object, ObjectKind, SetElement, SetRef};
use crate::family::IpFamily;
use crate::netlink::attr::{self, Attribute, Writer};
use crate::netlink::{self, Header, NetlinkError, Protocol, Refusal, Socket};

const NFNL_SUBSYS_NFTABLES: u16 = libc::NFNL_SUBSYS_NFTABLES as u16;

// Attribute numbers from <linux/netfilter/nf_tables.h> that `libc` does not carry.
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
/// The netlink header and the nf_tables `nfgenmsg` before the first attribute.
const NFT_HEADERS_LEN: usize = 20;

/// The object an nf_tables message carries; `None` for other messages.
pub(super) fn parse(msg: &[u8]) -> Result<Option<Object>, NetlinkError> {
    let Some(Header { kind, .. }) = Header::of(msg) else { return Ok(None) };
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
    raw::parse(kind, msg)
        .map(Some)
        .ok_or_else(|| NetlinkError::Unreadable("libnftnl could not parse an nf_tables message".into()))
}

/// The first attribute of `kind` in `data` (reading stops at a malformed one).
fn attribute(data: &[u8], kind: u16) -> Option<Attribute<'_>> {
    attr::attributes(data).map_while(Result::ok).find(|a| a.kind == kind)
}

/// A `NEWSETELEM` message. Read here rather than by libnftnl, which refuses the element
/// lists it builds itself (numbered 1, 2, ... where it expects every item to be 1).
fn elements(msg: &[u8]) -> Result<ElementsObject, NetlinkError> {
    let malformed = || NetlinkError::Unreadable("malformed set element message".into());
    let attrs = msg.get(NFT_HEADERS_LEN..).ok_or_else(malformed)?;
    let set = match (attribute(attrs, NFTA_SET_ELEM_LIST_SET_ID), attribute(attrs, NFTA_SET_ELEM_LIST_SET)) {
        (Some(id), _) => SetRef::Id(id.be32().map_err(|_| malformed())?),
        (None, Some(name)) => SetRef::Name(name.string()),
        (None, None) => return Err(malformed()),
    };
    let list = attribute(attrs, NFTA_SET_ELEM_LIST_ELEMENTS).map_or(&[][..], |a| a.value);
    let elements = attr::attributes(list)
        .map_while(Result::ok)
        .filter_map(|element| {
            let key = attribute(attribute(element.value, NFTA_SET_ELEM_KEY)?.value, NFTA_DATA_VALUE)?.value.to_vec();
            let flags = attribute(element.value, NFTA_SET_ELEM_FLAGS).and_then(|f| f.be32().ok()).unwrap_or(0);
            Some(SetElement { key, flags })
        })
        .collect();
    let table = attribute(attrs, NFTA_SET_ELEM_LIST_TABLE).map(|a| a.string()).unwrap_or_default();
    Ok(ElementsObject { table, set, elements })
}

/// Every message of a finished batch, begin and end markers included.
pub(super) fn batch_messages<'t>(tx: &'t Transaction) -> impl Iterator<Item = &'t [u8]> {
    tx.batch.iter().flat_map(|page| netlink::messages(page).map(|m| m.expect("nftnl builds well-formed messages")))
}

/// What a dump asks for: the object kind, and the table (and set) it is limited to.
pub(super) enum DumpRequest<'a> {
    Tables,
    /// The tables of an IP family (iptables-nft's).
    TablesOf {
        family: IpFamily,
    },
    Chains,
    /// The chains of another family's tables.
    ChainsOf {
        family: IpFamily,
    },
    Rules {
        table: &'a str,
    },
    /// The rules of another family's table.
    RulesOf {
        family: IpFamily,
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
            DumpRequest::TablesOf { family } | DumpRequest::ChainsOf { family } | DumpRequest::RulesOf { family, .. } => {
                nfproto(family)
            }
            _ => libc::NFPROTO_INET,
        } as u8;
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
        let mut body = Writer::new(&[family, libc::NFNETLINK_V0 as u8, 0, 0]);
        for (kind, value) in attrs {
            body.put_str(kind, value);
        }
        netlink::message((NFNL_SUBSYS_NFTABLES << 8) | msg as u16, &body.into_bytes())
    }
}

/// The nf_tables family of iptables-nft's tables, and of `tproxy ip|ip6`.
pub(super) fn nfproto(family: IpFamily) -> i32 {
    match family {
        IpFamily::V4 => libc::NFPROTO_IPV4,
        IpFamily::V6 => libc::NFPROTO_IPV6,
    }
}

/// A netlink socket to nf_tables.
pub(super) struct Netlink(Socket);

impl Netlink {
    pub(super) fn open() -> Result<Netlink, NetlinkError> {
        Socket::open(Protocol::Netfilter).map(Netlink)
    }

    /// All objects the request names.
    pub(super) fn dump(&mut self, request: &DumpRequest) -> Result<Vec<Object>, NetlinkError> {
        match self.0.dump(&mut request.message(), parse) {
            // What the dump is limited to vanished since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
            objects => objects,
        }
    }

    /// Sends the batch and returns the kernel's refusals (empty: it committed).
    pub(super) fn send(&mut self, tx: &Transaction) -> Result<Vec<Refusal>, NetlinkError> {
        // One send for all of nftnl's pages: the kernel reads a transaction from one
        // message buffer, so a batch split over several sends would not commit.
        let mut batch = tx.batch.iter().collect::<Vec<&[u8]>>().concat();
        self.0.send_batch(&mut batch)
    }
}
