//! Netlink attributes (`struct nlattr`): written into a message body, nested, and read back.
//!
//! An attribute is a 4-byte header (length, type) and its value, padded to 4 bytes. Two
//! flags ride in the type: the value holds further attributes (`NLA_F_NESTED`), or a number
//! in network byte order (`NLA_F_NET_BYTEORDER`); some kernel interfaces (ip sets) insist
//! on them.

use super::NetlinkError;

pub(crate) const NLA_F_NESTED: u16 = 1 << 15;
pub(crate) const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
const NLA_HEADER_LEN: usize = 4;

/// A message body being written: a fixed header (such as `nfgenmsg`), then attributes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    /// A body starting with `fixed`, the header the protocol puts before its attributes.
    pub(crate) fn new(fixed: &[u8]) -> Writer {
        Writer { bytes: fixed.to_vec() }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// An attribute of `kind` (flags included) holding `value`.
    pub(crate) fn put(&mut self, kind: u16, value: &[u8]) -> &mut Writer {
        let length = u16::try_from(NLA_HEADER_LEN + value.len()).expect("an attribute fits in 64 KiB");
        self.bytes.extend_from_slice(&length.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
        self
    }

    pub(crate) fn put_u8(&mut self, kind: u16, value: u8) -> &mut Writer {
        self.put(kind, &[value])
    }

    /// A `u32` in the machine's byte order.
    pub(crate) fn put_u32(&mut self, kind: u16, value: u32) -> &mut Writer {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A `u16` in network byte order, flagged as such.
    pub(crate) fn put_be16(&mut self, kind: u16, value: u16) -> &mut Writer {
        self.put(kind | NLA_F_NET_BYTEORDER, &value.to_be_bytes())
    }

    /// A `u32` in network byte order, flagged as such.
    pub(crate) fn put_be32(&mut self, kind: u16, value: u32) -> &mut Writer {
        self.put(kind | NLA_F_NET_BYTEORDER, &value.to_be_bytes())
    }

    /// A string with its terminating NUL.
    pub(crate) fn put_str(&mut self, kind: u16, value: &str) -> &mut Writer {
        self.put(kind, &[value.as_bytes(), &[0]].concat())
    }

    /// A nested attribute of `kind` holding what `fill` writes.
    pub(crate) fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Writer)) -> &mut Writer {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0; NLA_HEADER_LEN]);
        fill(self);
        let length = u16::try_from(self.bytes.len() - start).expect("a nest fits in 64 KiB");
        self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
        self.bytes[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }
}

/// One attribute read back: its type without flags, and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attribute<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attribute<'a> {
    fn fixed<const N: usize>(&self) -> Result<[u8; N], NetlinkError> {
        self.value
            .get(..N)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| NetlinkError::Unreadable(format!("attribute {} holds {} bytes, not {N}", self.kind, self.value.len())))
    }

    pub(crate) fn u8(&self) -> Result<u8, NetlinkError> {
        self.fixed::<1>().map(|[b]| b)
    }

    pub(crate) fn be16(&self) -> Result<u16, NetlinkError> {
        self.fixed().map(u16::from_be_bytes)
    }

    pub(crate) fn be32(&self) -> Result<u32, NetlinkError> {
        self.fixed().map(u32::from_be_bytes)
    }

    pub(crate) fn bytes<const N: usize>(&self) -> Result<[u8; N], NetlinkError> {
        self.fixed()
    }

    /// A string, up to its NUL.
    pub(crate) fn string(&self) -> String {
        String::from_utf8_lossy(self.value.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    }

    /// The attributes nested in this one.
    pub(crate) fn nested(&self) -> impl Iterator<Item = Result<Attribute<'a>, NetlinkError>> {
        attributes(self.value)
    }
}

/// The attributes in `data`, in order; one that overruns `data` is an error, and ends the list.
pub(crate) fn attributes(mut data: &[u8]) -> impl Iterator<Item = Result<Attribute<'_>, NetlinkError>> {
    std::iter::from_fn(move || {
        if data.len() < NLA_HEADER_LEN {
            return None;
        }
        let length = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        let Some(value) = (length >= NLA_HEADER_LEN).then(|| data.get(NLA_HEADER_LEN..length)).flatten() else {
            let error = format!("an attribute of {length} bytes where {} remain", data.len());
            data = &[];
            return Some(Err(NetlinkError::Unreadable(error)));
        };
        data = data.get(length.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(Attribute { kind, value }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_nested_and_read_back() {
        let mut body = Writer::new(&[2, 0, 0, 0]);
        body.put_u8(1, 6).put_str(2, "abc").nest(7, |inner| {
            inner.put_be16(4, 80).put_be32(18, 0x0a00_0000);
        });
        let bytes = body.into_bytes();
        // fixed header, u8 (5 bytes + 3 padding), "abc\0" (8), nest (4 + 8 + 8)
        assert_eq!(bytes.len(), 4 + 8 + 8 + 20);
        assert_eq!(&bytes[4..12], &[5, 0, 1, 0, 6, 0, 0, 0]);
        let nest_kind = u16::from_ne_bytes([bytes[22], bytes[23]]);
        assert_eq!(nest_kind, 7 | NLA_F_NESTED);
        let port_kind = u16::from_ne_bytes([bytes[26], bytes[27]]);
        assert_eq!(port_kind, 4 | NLA_F_NET_BYTEORDER);

        let read: Vec<Attribute> = attributes(&bytes[4..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(read.iter().map(|a| a.kind).collect::<Vec<_>>(), [1, 2, 7]);
        assert_eq!(read[0].u8().unwrap(), 6);
        assert_eq!(read[1].string(), "abc");
        let inner: Vec<Attribute> = read[2].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!((inner[0].kind, inner[0].be16().unwrap()), (4, 80));
        assert_eq!((inner[1].kind, inner[1].be32().unwrap()), (18, 0x0a00_0000));
    }

    #[test]
    fn an_overrunning_or_short_attribute_is_unreadable() {
        let mut bytes = Writer::new(&[]);
        bytes.put_u32(1, 7);
        let mut bytes = bytes.into_bytes();
        bytes[0] = 12; // claims more than there is
        assert!(matches!(attributes(&bytes).next(), Some(Err(NetlinkError::Unreadable(_)))));
        bytes[0] = 2; // shorter than its own header
        assert!(matches!(attributes(&bytes).next(), Some(Err(NetlinkError::Unreadable(_)))));
        let attribute = Attribute { kind: 3, value: &[1, 2] };
        assert!(attribute.be32().is_err());
    }
}
