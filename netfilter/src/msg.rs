//! Netlink message encoding and decoding (no I/O).
//!
//! A message is a 16-byte `nlmsghdr` (length, type, flags, sequence, port
//! id; host byte order), the 4-byte `nfgenmsg` (family, version, resource
//! id in network byte order), then attributes: 4-byte header (length, type)
//! and a payload padded to 4 bytes. nf_tables integers inside attributes are
//! big-endian; everything in the headers is host-endian.

use std::mem::size_of;

/// `sizeof(struct nlmsghdr)`.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct nfgenmsg)`.
pub(crate) const NFGENMSG_LEN: usize = 4;
/// `sizeof(struct nlattr)`.
const NLA_HDRLEN: usize = 4;
/// `sizeof(struct nlmsgerr)` without the echoed request's payload.
const NLMSGERR_LEN: usize = 4 + NLMSG_HDRLEN;

const _: () = assert!(size_of::<libc::nlmsghdr>() == NLMSG_HDRLEN);
const _: () = assert!(size_of::<libc::nlattr>() == NLA_HDRLEN);
const _: () = assert!(size_of::<libc::nlmsgerr>() == NLMSGERR_LEN);

pub(crate) const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
pub(crate) const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;

pub(crate) const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
pub(crate) const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
pub(crate) const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
pub(crate) const NLM_F_DUMP_INTR: u16 = libc::NLM_F_DUMP_INTR as u16;
pub(crate) const NLM_F_EXCL: u16 = libc::NLM_F_EXCL as u16;
pub(crate) const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
pub(crate) const NLM_F_APPEND: u16 = libc::NLM_F_APPEND as u16;
/// In an error message: the echoed request was cut to its header.
const NLM_F_CAPPED: u16 = libc::NLM_F_CAPPED as u16;
/// In an error message: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = libc::NLM_F_ACK_TLVS as u16;
/// Extended-ack attribute: a human-readable message.
const NLMSGERR_ATTR_MSG: u16 = 1; // enum nlmsgerr_attrs in linux/netlink.h

const NLA_F_NESTED: u16 = libc::NLA_F_NESTED as u16;
const NLA_TYPE_MASK: u16 = libc::NLA_TYPE_MASK as u16;

/// `NFNETLINK_V0`.
const NFNETLINK_V0: u8 = 0;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages and attributes to one buffer.
#[derive(Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
    /// An attribute or nest grew past 64 KiB (its length field is 16 bits).
    overflow: bool,
}

impl Writer {
    pub(crate) fn with_capacity(cap: usize) -> Self {
        Writer { buf: Vec::with_capacity(cap), overflow: false }
    }

    /// Starts a message with its `nfgenmsg`; returns the offset to pass to
    /// [`Writer::end_msg`].
    pub(crate) fn begin_msg(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.begin_raw_msg(ty, flags, seq, &[family, NFNETLINK_V0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    /// Starts a message whose fixed header (e.g. rtnetlink's `ifaddrmsg`)
    /// is `fixed` (a multiple of 4 bytes, or padded by what follows).
    pub(crate) fn begin_raw_msg(&mut self, ty: u16, flags: u16, seq: u32, fixed: &[u8]) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by end_msg
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        self.buf.extend_from_slice(fixed);
        start
    }

    /// Finishes the message started at `start`.
    pub(crate) fn end_msg(&mut self, start: usize) {
        let len = self.buf.len() - start;
        match u32::try_from(len) {
            Ok(len) => self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes()),
            Err(_) => self.overflow = true,
        }
    }

    fn attr_header(&mut self, ty: u16, payload_len: usize) {
        let len = match u16::try_from(NLA_HDRLEN + payload_len) {
            Ok(len) => len,
            Err(_) => {
                self.overflow = true;
                0
            }
        };
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
    }

    fn pad(&mut self) {
        let padded = align4(self.buf.len());
        self.buf.resize(padded, 0);
    }

    /// An attribute holding `data`.
    pub(crate) fn put(&mut self, ty: u16, data: &[u8]) {
        self.attr_header(ty, data.len());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A NUL-terminated string attribute.
    pub(crate) fn put_str(&mut self, ty: u16, s: &str) {
        self.attr_header(ty, s.len() + 1);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// A big-endian 32-bit attribute (nf_tables' integers).
    pub(crate) fn put_be32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    /// Opens a nested attribute; returns the offset for [`Writer::end_nest`].
    pub(crate) fn nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.attr_header(ty | NLA_F_NESTED, 0);
        start
    }

    /// Closes the nested attribute opened at `start`.
    pub(crate) fn end_nest(&mut self, start: usize) {
        match u16::try_from(self.buf.len() - start) {
            Ok(len) => self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes()),
            Err(_) => self.overflow = true,
        }
    }

    /// The encoded messages, or `None` if a length field overflowed.
    pub(crate) fn finish(self) -> Option<Vec<u8>> {
        (!self.overflow).then_some(self.buf)
    }
}

/// One received netlink message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    /// Everything after the `nlmsghdr`.
    pub(crate) payload: &'a [u8],
}

fn ne_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Splits a datagram into its messages; stops with `Err` at a malformed one.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Msg<'_>, &'static str>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < NLMSG_HDRLEN {
            rest = &[];
            return Some(Err("a netlink message header is cut short"));
        }
        let len = ne_u32(rest, 0) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return Some(Err("a netlink message has an impossible length"));
        }
        let msg = Msg {
            ty: ne_u16(rest, 4),
            flags: ne_u16(rest, 6),
            seq: ne_u32(rest, 8),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = &rest[align4(len).min(rest.len())..];
        Some(Ok(msg))
    })
}

/// Splits attributes into `(type, payload)` (type without the nested and
/// byte-order flags); stops with `Err` at a malformed one.
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), &'static str>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLA_HDRLEN {
            // Fewer than 4 bytes left can only be padding.
            return None;
        }
        let len = usize::from(ne_u16(rest, 0));
        if len < NLA_HDRLEN || len > rest.len() {
            rest = &[];
            return Some(Err("a netlink attribute has an impossible length"));
        }
        let item = (ne_u16(rest, 2) & NLA_TYPE_MASK, &rest[NLA_HDRLEN..len]);
        rest = &rest[align4(len).min(rest.len())..];
        Some(Ok(item))
    })
}

/// The attributes of an nfnetlink message (after its `nfgenmsg`).
pub(crate) fn nf_attrs<'a>(
    msg: &Msg<'a>,
) -> Result<impl Iterator<Item = Result<(u16, &'a [u8]), &'static str>>, &'static str> {
    let body = msg.payload.get(NFGENMSG_LEN..).ok_or("an nfnetlink message is shorter than its nfgenmsg header")?;
    Ok(attrs(body))
}

/// A string attribute's value without its terminating NUL.
pub(crate) fn attr_str(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// An `NLMSG_ERROR` message: an acknowledgement (`errno == 0`) or an error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Ack {
    /// Positive errno, or 0 for success.
    pub(crate) errno: i32,
    /// Sequence number of the request it answers.
    pub(crate) seq: u32,
    /// The kernel's extended-ack message, if it gave one.
    pub(crate) message: Option<String>,
}

/// Decodes an `NLMSG_ERROR` message.
pub(crate) fn parse_ack(msg: &Msg<'_>) -> Result<Ack, &'static str> {
    let p = msg.payload;
    if p.len() < NLMSGERR_LEN {
        return Err("a netlink error message is cut short");
    }
    let error = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    let orig_len = ne_u32(p, 4) as usize;
    let seq = ne_u32(p, 4 + 8);
    let mut message = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // The echoed request's payload sits between the header and the
        // attributes unless the kernel capped it.
        let tlv_start = if msg.flags & NLM_F_CAPPED != 0 || error == 0 {
            NLMSGERR_LEN
        } else {
            NLMSGERR_LEN + align4(orig_len.saturating_sub(NLMSG_HDRLEN))
        };
        for attr in attrs(p.get(tlv_start..).unwrap_or(&[])) {
            let Ok((ty, data)) = attr else { break };
            if ty == NLMSGERR_ATTR_MSG {
                message = Some(attr_str(data)).filter(|m| !m.is_empty());
            }
        }
    }
    Ok(Ack { errno: error.saturating_neg(), seq, message })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn message_round_trip() {
        let mut w = Writer::default();
        let m = w.begin_msg(0x0a00, NLM_F_REQUEST | NLM_F_ACK, 7, 1, 0);
        w.put_str(1, "floe_t");
        let n = w.nest(4);
        w.put_be32(1, 0x01020304);
        w.put(2, &[9, 9, 9]);
        w.end_nest(n);
        w.end_msg(m);
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 4, 0);
        let msgs: Vec<_> = messages(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        let msg = msgs[0];
        assert_eq!((msg.ty, msg.flags, msg.seq), (0x0a00, NLM_F_REQUEST | NLM_F_ACK, 7));
        assert_eq!(&msg.payload[..4], &[1, 0, 0, 0]);
        let top: Vec<_> = nf_attrs(&msg).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].0, 1);
        assert_eq!(attr_str(top[0].1), "floe_t");
        assert_eq!(top[1].0, 4, "nested flag masked out");
        let inner: Vec<_> = attrs(top[1].1).collect::<Result<_, _>>().unwrap();
        assert_eq!(inner, vec![(1, &[1u8, 2, 3, 4][..]), (2, &[9u8, 9, 9][..])]);
    }

    #[test]
    fn oversized_nest_is_refused() {
        let mut w = Writer::default();
        let n = w.nest(1);
        w.put(2, &[0; 60000]);
        w.put(2, &[0; 60000]);
        w.end_nest(n);
        assert!(w.finish().is_none());
    }

    fn error_msg(errno: i32, seq: u32, flags: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(-errno).to_ne_bytes());
        p.extend_from_slice(&40u32.to_ne_bytes()); // echoed request: length 40
        p.extend_from_slice(&0x0a00u16.to_ne_bytes());
        p.extend_from_slice(&0u16.to_ne_bytes());
        p.extend_from_slice(&seq.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(tlvs);
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + p.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&99u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&p);
        m
    }

    #[test]
    fn acks_and_errors_decode() {
        let buf = error_msg(0, 5, 0, &[]);
        let msg = messages(&buf).next().unwrap().unwrap();
        assert_eq!(msg.ty, NLMSG_ERROR);
        assert_eq!(parse_ack(&msg).unwrap(), Ack { errno: 0, seq: 5, message: None });

        let mut tlv = Vec::new();
        tlv.extend_from_slice(&9u16.to_ne_bytes());
        tlv.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        tlv.extend_from_slice(b"oops\0\0\0\0");
        let buf = error_msg(libc::EEXIST, 6, NLM_F_CAPPED | NLM_F_ACK_TLVS, &tlv);
        let msg = messages(&buf).next().unwrap().unwrap();
        assert_eq!(parse_ack(&msg).unwrap(), Ack { errno: libc::EEXIST, seq: 6, message: Some("oops".into()) });
    }

    #[test]
    fn malformed_input_is_reported() {
        assert!(messages(&[1, 2, 3]).next().unwrap().is_err());
        let mut bad = 100u32.to_ne_bytes().to_vec();
        bad.extend_from_slice(&[0; 12]);
        assert!(messages(&bad).next().unwrap().is_err());
        assert!(attrs(&[2, 0, 1, 0]).next().unwrap().is_err());
    }
}
