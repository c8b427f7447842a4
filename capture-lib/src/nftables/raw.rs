//! What we need from libnftnl beyond the `nftnl` crate's safe API: four expressions it lacks
//! (`redir`, `tproxy`, `ct zone set`, `lookup` of a set made in the same batch), the set
//! attributes and interval elements nft sends, messages without the acknowledgement flag, and
//! parsing nf_tables messages (the kernel's dumps and our own batch) into plain values, rule
//! expressions included (their fields, for `decompile.rs`).
//!
//! This is the only module of the crate with `unsafe` code. Every libnftnl object made here
//! is either handed over to the `nftnl` crate (an expression belongs to its rule from then
//! on, an element to its set) or freed exactly once, on every path, by the `Owned` guard below.
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr};
use std::ptr::NonNull;

use nftnl::expr::{Expression, Register};
use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::set::Set;
use nftnl::{MsgType, NlMsg, Rule};

use crate::family::IpFamily;
// libnftnl calls libmnl, which `nftnl-sys` names but never uses: naming it here keeps libmnl in
// the link, after libnftnl, as a static link needs it.
use mnl_sys as _;

/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect carries a port (what nft sends for `to :P`).
const NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

/// A new expression of kind `name` with 32-bit attributes set.
fn expr_with(name: &CStr, attrs: &[(u32, u32)]) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; libnftnl copies nothing
    // from it and returns either NULL or a fresh expression we own.
    let expr = NonNull::new(unsafe { sys::nftnl_expr_alloc(name.as_ptr()) })
        .unwrap_or_else(|| panic!("libnftnl has no {name:?} expression (libnftnl too old?)"));
    for &(attr, value) in attrs {
        // SAFETY: `expr` is the live expression allocated above; the attribute ids are those
        // libnftnl defines for this expression kind.
        unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value) };
    }
    expr
}

/// `redirect to :P`, with the port already in register 1 (as nft compiles it).
pub(super) struct Redirect;

impl Expression for Redirect {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let reg = Register::Reg1.to_raw();
        expr_with(
            c"redir",
            &[
                (sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN, reg),
                (sys::NFTNL_EXPR_REDIR_REG_PROTO_MAX, reg),
                (sys::NFTNL_EXPR_REDIR_FLAGS, NAT_RANGE_PROTO_SPECIFIED),
            ],
        )
    }
}

/// `tproxy ip|ip6 to :P`, with the port already in register 1.
pub(super) struct Tproxy {
    pub family: IpFamily,
}

impl Expression for Tproxy {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let family = super::messages::nfproto(self.family);
        expr_with(
            c"tproxy",
            &[(sys::NFTNL_EXPR_TPROXY_FAMILY, family as u32), (sys::NFTNL_EXPR_TPROXY_REG_PORT, Register::Reg1.to_raw())],
        )
    }
}

/// `ct zone set Z`, with the zone already in register 1.
pub(super) struct CtZoneSet;

impl Expression for CtZoneSet {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        expr_with(
            c"ct",
            &[(sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_ZONE as u32), (sys::NFTNL_EXPR_CT_SREG, Register::Reg1.to_raw())],
        )
    }
}

/// The name nft gives an anonymous set; the kernel replaces `%d` with a free number.
pub(super) const ANONYMOUS_SET: &CStr = c"__set%d";

/// `[!=] @set`: register 1 is (not) in the set of this name created earlier in the same batch
/// with this id (an anonymous set's name is [`ANONYMOUS_SET`], the kernel numbers it).
pub(super) struct Lookup<'n> {
    pub name: &'n CStr,
    pub set_id: u32,
    pub inverted: bool,
}

impl Expression for Lookup<'_> {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let mut attrs =
            vec![(sys::NFTNL_EXPR_LOOKUP_SREG, Register::Reg1.to_raw()), (sys::NFTNL_EXPR_LOOKUP_SET_ID, self.set_id)];
        // nft sends the flags only to invert.
        if self.inverted {
            attrs.push((sys::NFTNL_EXPR_LOOKUP_FLAGS, libc::NFT_LOOKUP_F_INV as u32));
        }
        let expr = expr_with(c"lookup", &attrs);
        // SAFETY: `expr` is live; libnftnl copies the NUL-terminated name.
        unsafe { sys::nftnl_expr_set_str(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SET as u16, self.name.as_ptr()) };
        expr
    }
}

/// What nft gives a set beyond what `nftnl::set::Set` sets: its flags (a named set's: interval
/// or none), the number of elements (an anonymous set's: the kernel sizes it by that), and the
/// user data nft reads back to print it.
pub(super) fn describe_set<K>(set: &Set<'_, K>, flags: Option<u32>, size: Option<u32>, userdata: &[u8]) {
    let set = set.as_ptr().as_ptr();
    // SAFETY: `set` is owned by the live `Set` borrowed for this call; libnftnl copies the
    // `userdata.len()` bytes it is given.
    unsafe {
        if let Some(flags) = flags {
            sys::nftnl_set_set_u32(set, sys::NFTNL_SET_FLAGS as u16, flags);
        }
        if let Some(size) = size {
            sys::nftnl_set_set_u32(set, sys::NFTNL_SET_DESC_SIZE as u16, size);
        }
        sys::nftnl_set_set_data(set, sys::NFTNL_SET_USERDATA as u16, userdata.as_ptr().cast(), userdata.len() as u32);
    }
}

/// Adds an element to the set's list (sent by `Set::elems_iter`): its key, its flags (an
/// interval's end) and its user data (`None`: none), as nft builds interval elements, which
/// `Set::add` cannot.
pub(super) fn add_element<K>(set: &mut Set<'_, K>, key: &[u8], flags: u32, userdata: Option<&[u8]>) {
    // SAFETY: the allocator returns NULL or a new element, which `nftnl_set_elem_add` below
    // hands to the set (it frees it with itself); the setters copy `key` and `userdata`.
    unsafe {
        let elem = NonNull::new(sys::nftnl_set_elem_alloc()).expect("libnftnl: out of memory").as_ptr();
        sys::nftnl_set_elem_set(elem, sys::NFTNL_SET_ELEM_KEY as u16, key.as_ptr().cast(), key.len() as u32);
        if flags != 0 {
            sys::nftnl_set_elem_set_u32(elem, sys::NFTNL_SET_ELEM_FLAGS as u16, flags);
        }
        if let Some(data) = userdata {
            sys::nftnl_set_elem_set(elem, sys::NFTNL_SET_ELEM_USERDATA as u16, data.as_ptr().cast(), data.len() as u32);
        }
        sys::nftnl_set_elem_add(set.as_ptr().as_ptr(), elem);
    }
}

/// A message sent without asking for an acknowledgement, as nft sends its batches: the
/// kernel still answers every error, and one answer per message would only cost time.
pub(super) struct Unacknowledged<'a, T>(pub &'a T);

// SAFETY: writes exactly what the wrapped message writes, then clears one flag in it.
unsafe impl<T: NlMsg> NlMsg for Unacknowledged<'_, T> {
    unsafe fn write(&self, buf: *mut std::ffi::c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: the caller gives room for the largest message (the trait's contract); the
        // wrapped message writes its netlink header at `buf`, flags at byte 6.
        unsafe {
            self.0.write(buf, seq, msg_type);
            let flags = buf.cast::<u8>().add(6).cast::<u16>();
            flags.write_unaligned(flags.read_unaligned() & !(libc::NLM_F_ACK as u16));
        }
    }
}

/// A deletion the kernel refuses (EBUSY) when the object is not empty, instead of deleting
/// what it holds: whatever another tool added meanwhile stays, and the batch changes nothing.
pub(super) struct NonRecursive<'a, T>(pub &'a T);

/// `NLM_F_NONREC` from <linux/netlink.h>, which `libc` does not carry.
const NLM_F_NONREC: u16 = 0x100;

// SAFETY: writes exactly what the wrapped message writes, then changes two flags in it.
unsafe impl<T: NlMsg> NlMsg for NonRecursive<'_, T> {
    unsafe fn write(&self, buf: *mut std::ffi::c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: as for `Unacknowledged`: the wrapped message writes its header at `buf`, flags
        // at byte 6, within the room the caller gives.
        unsafe {
            Unacknowledged(self.0).write(buf, seq, msg_type);
            let flags = buf.cast::<u8>().add(6).cast::<u16>();
            flags.write_unaligned(flags.read_unaligned() | NLM_F_NONREC);
        }
    }
}

/// Which set a lookup or element list names. Our batch names anonymous sets by id (the
/// kernel picks the `__setN` name); the kernel's dumps name them by that name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum SetRef {
    Id(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableObject {
    pub name: String,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainHook {
    pub kind: String,
    pub hook: u32,
    pub priority: i32,
    /// Absent when the chain was created without one (the kernel then accepts).
    pub policy: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainObject {
    pub table: String,
    pub name: String,
    pub hook: Option<ChainHook>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ExprObject {
    /// Counters are compared without their values.
    Counter,
    Lookup {
        set: SetRef,
        flags: u32,
        sreg: u32,
    },
    Other {
        /// libnftnl's own rendering, e.g. `payload load 2b @ transport header + 2 => reg 1`.
        text: String,
        /// Its fields, for the kinds and forms our rules use; `None` for any other.
        fields: Option<Expr>,
    },
}

/// The fields of an expression (registers by their kernel number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Expr {
    Meta {
        key: u32,
        dreg: Option<u32>,
        sreg: Option<u32>,
    },
    /// A header load (a payload write reads as `None`).
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    /// `(reg & mask) ^ xor` (a shift reads as `None`).
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Verdict {
        code: i32,
        chain: Option<String>,
    },
    /// A conntrack key of the packet's own direction (one with a direction reads as `None`).
    Ct {
        key: u32,
        dreg: Option<u32>,
        sreg: Option<u32>,
    },
    Redir {
        proto_min: Option<u32>,
        proto_max: Option<u32>,
        flags: u32,
    },
    Masq {
        proto_min: Option<u32>,
        proto_max: Option<u32>,
        flags: u32,
    },
    Tproxy {
        family: u32,
        addr: Option<u32>,
        port: Option<u32>,
    },
    Nat {
        kind: u32,
        family: u32,
        addr_min: Option<u32>,
        addr_max: Option<u32>,
        proto_min: Option<u32>,
        proto_max: Option<u32>,
        flags: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RuleObject {
    pub table: String,
    pub chain: String,
    pub exprs: Vec<ExprObject>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SetObject {
    pub table: String,
    /// How lookups and element lists name it (our batch: by id).
    pub set: SetRef,
    /// Its name (an anonymous set's, in our batch, is [`ANONYMOUS_SET`]).
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
}

/// One element: its key and flags (`NFT_SET_ELEM_INTERVAL_END` ends an interval).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SetElement {
    pub key: Vec<u8>,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ElementsObject {
    pub table: String,
    pub set: SetRef,
    pub elements: Vec<SetElement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Object {
    Table(TableObject),
    Chain(ChainObject),
    Rule(RuleObject),
    Set(SetObject),
    Elements(ElementsObject),
}

/// The kinds of nf_tables message [`parse`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ObjectKind {
    Table,
    Chain,
    Rule,
    Set,
}

/// A libnftnl object, freed on drop.
struct Owned<T> {
    ptr: NonNull<T>,
    free: unsafe extern "C" fn(*const T),
}

impl<T> Owned<T> {
    fn new(alloc: unsafe extern "C" fn() -> *mut T, free: unsafe extern "C" fn(*const T)) -> Self {
        // SAFETY: the libnftnl allocators take no arguments and return NULL or a new object.
        let ptr = NonNull::new(unsafe { alloc() }).expect("libnftnl: out of memory");
        Owned { ptr, free }
    }

    fn get(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the matching allocator and is freed only here.
        unsafe { (self.free)(self.ptr.as_ptr()) }
    }
}

/// Copies a C string libnftnl returned (NULL reads as empty).
fn string(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-NULL strings from libnftnl getters are NUL-terminated and live as long as
    // the object they belong to, which outlives this copy.
    unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
}

/// Parses one nf_tables message of `kind`. `msg` must be one whole netlink message, aligned
/// for `nlmsghdr` (as `netlink::messages` yields them from a batch or a received datagram); `None` means libnftnl refused it.
/// (Set elements are read in `messages.rs`: libnftnl refuses the element lists it builds.)
pub(super) fn parse(kind: ObjectKind, msg: &[u8]) -> Option<Object> {
    let header_len = std::mem::size_of::<libc::nlmsghdr>();
    assert!(msg.len() >= header_len && msg.as_ptr().cast::<libc::nlmsghdr>().is_aligned(), "not a netlink message");
    let declared = u32::from_ne_bytes(msg[..4].try_into().expect("4 bytes")) as usize;
    assert!(declared <= msg.len(), "truncated netlink message");
    let nlh = msg.as_ptr().cast::<libc::nlmsghdr>();
    // SAFETY: `nlh` points at an aligned header whose declared length lies within `msg`,
    // which outlives the call; libnftnl only reads it.
    unsafe {
        match kind {
            ObjectKind::Table => parse_table(nlh).map(Object::Table),
            ObjectKind::Chain => parse_chain(nlh).map(Object::Chain),
            ObjectKind::Rule => parse_rule(nlh).map(Object::Rule),
            ObjectKind::Set => parse_set(nlh).map(Object::Set),
        }
    }
}

// The `parse_*` functions below share one contract.
// # Safety
// `nlh` must point at a whole, aligned netlink message that stays alive during the call.

unsafe fn parse_table(nlh: *const libc::nlmsghdr) -> Option<TableObject> {
    let table = Owned::new(sys::nftnl_table_alloc, sys::nftnl_table_free);
    // SAFETY: `nlh` per this function's contract; `table` is live.
    unsafe {
        if sys::nftnl_table_nlmsg_parse(nlh, table.get()) < 0 {
            return None;
        }
        Some(TableObject {
            name: string(sys::nftnl_table_get_str(table.get(), sys::NFTNL_TABLE_NAME as u16)),
            flags: sys::nftnl_table_get_u32(table.get(), sys::NFTNL_TABLE_FLAGS as u16),
        })
    }
}

unsafe fn parse_chain(nlh: *const libc::nlmsghdr) -> Option<ChainObject> {
    let chain = Owned::new(sys::nftnl_chain_alloc, sys::nftnl_chain_free);
    let c = chain.get();
    // SAFETY: `nlh` per this function's contract; `c` is live and the getters read attributes it holds.
    unsafe {
        if sys::nftnl_chain_nlmsg_parse(nlh, c) < 0 {
            return None;
        }
        let is_set = |attr: u32| sys::nftnl_chain_is_set(c, attr as u16);
        let hook = is_set(sys::NFTNL_CHAIN_HOOKNUM).then(|| ChainHook {
            kind: string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TYPE as u16)),
            hook: sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16),
            priority: sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16),
            policy: is_set(sys::NFTNL_CHAIN_POLICY).then(|| sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_POLICY as u16)),
        });
        Some(ChainObject {
            table: string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16)),
            name: string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16)),
            hook,
        })
    }
}

unsafe fn parse_rule(nlh: *const libc::nlmsghdr) -> Option<RuleObject> {
    let rule = Owned::new(sys::nftnl_rule_alloc, sys::nftnl_rule_free);
    // SAFETY: `nlh` per this function's contract; `rule` is live while its expressions are read, and the iterator is
    // destroyed before `rule` is freed.
    unsafe {
        if sys::nftnl_rule_nlmsg_parse(nlh, rule.get()) < 0 {
            return None;
        }
        let iter = sys::nftnl_expr_iter_create(rule.get());
        if iter.is_null() {
            return None;
        }
        let mut exprs = Vec::new();
        loop {
            let expr = sys::nftnl_expr_iter_next(iter);
            if expr.is_null() {
                break;
            }
            exprs.push(describe_expr(expr));
        }
        sys::nftnl_expr_iter_destroy(iter);
        Some(RuleObject {
            table: string(sys::nftnl_rule_get_str(rule.get(), sys::NFTNL_RULE_TABLE as u16)),
            chain: string(sys::nftnl_rule_get_str(rule.get(), sys::NFTNL_RULE_CHAIN as u16)),
            exprs,
        })
    }
}

/// The attributes of one expression, read with libnftnl's getters.
struct Attributes(*mut sys::nftnl_expr);

impl Attributes {
    /// # Safety
    /// `expr` must be a live expression that outlives the value returned.
    unsafe fn of(expr: *mut sys::nftnl_expr) -> Self {
        Attributes(expr)
    }

    fn is_set(&self, attr: u32) -> bool {
        // SAFETY: `self.0` is live (the contract of `of`); any attribute id may be asked.
        unsafe { sys::nftnl_expr_is_set(self.0, attr as u16) }
    }

    fn u32(&self, attr: u32) -> Option<u32> {
        // SAFETY: as for `is_set`; the attribute is a 32-bit one of this kind when set.
        self.is_set(attr).then(|| unsafe { sys::nftnl_expr_get_u32(self.0, attr as u16) })
    }

    fn string(&self, attr: u32) -> Option<String> {
        // SAFETY: as for `is_set`; a set string attribute is NUL-terminated.
        self.is_set(attr).then(|| string(unsafe { sys::nftnl_expr_get_str(self.0, attr as u16) }))
    }

    fn bytes(&self, attr: u32) -> Option<Vec<u8>> {
        let mut len = 0u32;
        // SAFETY: as for `is_set`; libnftnl returns the attribute's storage and its length in
        // bytes, which stays valid while the expression lives, longer than this copy.
        let data = unsafe { sys::nftnl_expr_get(self.0, attr as u16, &mut len) }.cast::<u8>();
        (!data.is_null()).then(|| unsafe { std::slice::from_raw_parts(data, len as usize) }.to_vec())
    }

    /// The fields of an expression named `name`, for the kinds and forms our rules use.
    fn fields(&self, name: &str) -> Option<Expr> {
        use sys::*;
        Some(match name {
            "meta" => Expr::Meta {
                key: self.u32(NFTNL_EXPR_META_KEY)?,
                dreg: self.u32(NFTNL_EXPR_META_DREG),
                sreg: self.u32(NFTNL_EXPR_META_SREG),
            },
            "payload" if !self.is_set(NFTNL_EXPR_PAYLOAD_SREG) => Expr::Payload {
                base: self.u32(NFTNL_EXPR_PAYLOAD_BASE)?,
                offset: self.u32(NFTNL_EXPR_PAYLOAD_OFFSET)?,
                len: self.u32(NFTNL_EXPR_PAYLOAD_LEN)?,
                dreg: self.u32(NFTNL_EXPR_PAYLOAD_DREG)?,
            },
            "cmp" => Expr::Cmp {
                sreg: self.u32(NFTNL_EXPR_CMP_SREG)?,
                op: self.u32(NFTNL_EXPR_CMP_OP)?,
                data: self.bytes(NFTNL_EXPR_CMP_DATA)?,
            },
            "bitwise" if self.u32(NFTNL_EXPR_BITWISE_OP).unwrap_or(0) == 0 => Expr::Bitwise {
                sreg: self.u32(NFTNL_EXPR_BITWISE_SREG)?,
                dreg: self.u32(NFTNL_EXPR_BITWISE_DREG)?,
                mask: self.bytes(NFTNL_EXPR_BITWISE_MASK)?,
                xor: self.bytes(NFTNL_EXPR_BITWISE_XOR)?,
            },
            "immediate" => match self.u32(NFTNL_EXPR_IMM_VERDICT) {
                Some(code) => Expr::Verdict { code: code as i32, chain: self.string(NFTNL_EXPR_IMM_CHAIN) },
                None => Expr::Immediate { dreg: self.u32(NFTNL_EXPR_IMM_DREG)?, data: self.bytes(NFTNL_EXPR_IMM_DATA)? },
            },
            "ct" if !self.is_set(NFTNL_EXPR_CT_DIR) => Expr::Ct {
                key: self.u32(NFTNL_EXPR_CT_KEY)?,
                dreg: self.u32(NFTNL_EXPR_CT_DREG),
                sreg: self.u32(NFTNL_EXPR_CT_SREG),
            },
            "redir" => Expr::Redir {
                proto_min: self.u32(NFTNL_EXPR_REDIR_REG_PROTO_MIN),
                proto_max: self.u32(NFTNL_EXPR_REDIR_REG_PROTO_MAX),
                flags: self.u32(NFTNL_EXPR_REDIR_FLAGS).unwrap_or(0),
            },
            "masq" => Expr::Masq {
                proto_min: self.u32(NFTNL_EXPR_MASQ_REG_PROTO_MIN),
                proto_max: self.u32(NFTNL_EXPR_MASQ_REG_PROTO_MAX),
                flags: self.u32(NFTNL_EXPR_MASQ_FLAGS).unwrap_or(0),
            },
            "tproxy" => Expr::Tproxy {
                family: self.u32(NFTNL_EXPR_TPROXY_FAMILY).unwrap_or(0),
                addr: self.u32(NFTNL_EXPR_TPROXY_REG_ADDR),
                port: self.u32(NFTNL_EXPR_TPROXY_REG_PORT),
            },
            "nat" => Expr::Nat {
                kind: self.u32(NFTNL_EXPR_NAT_TYPE)?,
                family: self.u32(NFTNL_EXPR_NAT_FAMILY).unwrap_or(0),
                addr_min: self.u32(NFTNL_EXPR_NAT_REG_ADDR_MIN),
                addr_max: self.u32(NFTNL_EXPR_NAT_REG_ADDR_MAX),
                proto_min: self.u32(NFTNL_EXPR_NAT_REG_PROTO_MIN),
                proto_max: self.u32(NFTNL_EXPR_NAT_REG_PROTO_MAX),
                flags: self.u32(NFTNL_EXPR_NAT_FLAGS).unwrap_or(0),
            },
            _ => return None,
        })
    }
}

/// # Safety
/// `expr` must be a live expression of a live rule.
unsafe fn describe_expr(expr: *mut sys::nftnl_expr) -> ExprObject {
    // SAFETY: per this function's contract: `expr` outlives `attrs`, which lives only here.
    let attrs = unsafe { Attributes::of(expr) };
    let name = attrs.string(sys::NFTNL_EXPR_NAME).unwrap_or_default();
    match name.as_str() {
        "counter" => ExprObject::Counter,
        "lookup" => ExprObject::Lookup {
            set: match attrs.u32(sys::NFTNL_EXPR_LOOKUP_SET_ID) {
                Some(id) => SetRef::Id(id),
                None => SetRef::Name(attrs.string(sys::NFTNL_EXPR_LOOKUP_SET).unwrap_or_default()),
            },
            flags: attrs.u32(sys::NFTNL_EXPR_LOOKUP_FLAGS).unwrap_or(0),
            sreg: attrs.u32(sys::NFTNL_EXPR_LOOKUP_SREG).unwrap_or(0),
        },
        _ => {
            let mut buf = [0 as c_char; 1024];
            // SAFETY: per this function's contract; libnftnl writes at most `buf.len()` bytes,
            // NUL-terminated.
            unsafe { sys::nftnl_expr_snprintf(buf.as_mut_ptr(), buf.len(), expr, sys::NFTNL_OUTPUT_DEFAULT, 0) };
            ExprObject::Other { text: format!("{name} {}", string(buf.as_ptr()).trim_end()), fields: attrs.fields(&name) }
        }
    }
}

/// # Safety
/// `set` must be a live, parsed set.
unsafe fn set_ref(set: *const sys::nftnl_set) -> SetRef {
    // SAFETY: per this function's contract.
    unsafe {
        if sys::nftnl_set_is_set(set, sys::NFTNL_SET_ID as u16) {
            SetRef::Id(sys::nftnl_set_get_u32(set, sys::NFTNL_SET_ID as u16))
        } else {
            SetRef::Name(string(sys::nftnl_set_get_str(set, sys::NFTNL_SET_NAME as u16)))
        }
    }
}

unsafe fn parse_set(nlh: *const libc::nlmsghdr) -> Option<SetObject> {
    let set = Owned::new(sys::nftnl_set_alloc, sys::nftnl_set_free);
    let s = set.get();
    // SAFETY: `nlh` per this function's contract; `s` is live.
    unsafe {
        if sys::nftnl_set_nlmsg_parse(nlh, s) < 0 {
            return None;
        }
        Some(SetObject {
            table: string(sys::nftnl_set_get_str(s, sys::NFTNL_SET_TABLE as u16)),
            set: set_ref(s),
            name: string(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16)),
            flags: sys::nftnl_set_get_u32(s, sys::NFTNL_SET_FLAGS as u16),
            key_type: sys::nftnl_set_get_u32(s, sys::NFTNL_SET_KEY_TYPE as u16),
            key_len: sys::nftnl_set_get_u32(s, sys::NFTNL_SET_KEY_LEN as u16),
        })
    }
}
