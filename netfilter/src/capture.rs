//! What the lock drops, kept: the locked connections' incoming segments,
//! copied to floe through `nfnetlink_log` before they are dropped.
//!
//! A peer that sends while its connection is locked loses those segments
//! and would resend them only on its own retransmission timer (at least
//! 200 ms, and a single outstanding segment is not recovered any sooner by
//! a tail loss probe). With a [`Capture`], the lock's input rules become
//! `... @conns4 log group G drop`: the kernel hands floe a copy of every
//! dropped segment, and once the connection runs again where it was
//! restored, [`reinject`] delivers the copies to it through a raw socket,
//! as if they had just arrived. TCP takes what continues its receive queue,
//! acknowledges it and wakes the process (putting the bytes into the queue
//! in repair mode instead would not wake a process waiting in `epoll`), so
//! the peer's data in flight at the freeze is answered at once.
//!
//! The copies are queued on this socket's receive buffer (raised to
//! [`RECV_BUF`]) until [`Capture::drain`] reads them; if it overflows the
//! kernel drops the surplus and the peer retransmits it on its own timer,
//! as without a capture. Each log group has one listener; [`Capture::open`]
//! takes a free one.

use crate::error::NetfilterError;
use crate::msg::{self, Writer};
use crate::sys;
use crate::ConnTuple;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// Socket receive buffer for the copies: several full receive windows.
pub const RECV_BUF: usize = 32 * 1024 * 1024;

/// At most this many payload bytes are kept; the rest is left to the peers'
/// retransmissions.
pub const MAX_KEPT: usize = 16 * 1024 * 1024;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
/// The largest copy range `nfnetlink_log` accepts.
const COPY_RANGE: u32 = 0xffff;
/// Groups floe tries: the upper half, away from the small numbers people
/// configure by hand.
const GROUP_BASE: u16 = 0xf000;
const GROUP_TRIES: u16 = 64;

const _: () = {
    assert!(NFNL_SUBSYS_ULOG as i32 == libc::NFNL_SUBSYS_ULOG);
    assert!(NFULNL_MSG_PACKET as i32 == libc::NFULNL_MSG_PACKET);
    assert!(NFULNL_MSG_CONFIG as i32 == libc::NFULNL_MSG_CONFIG);
    assert!(NFULA_PAYLOAD as i32 == libc::NFULA_PAYLOAD);
    assert!(NFULA_CFG_CMD as i32 == libc::NFULA_CFG_CMD);
    assert!(NFULA_CFG_MODE as i32 == libc::NFULA_CFG_MODE);
    assert!(NFULA_CFG_TIMEOUT as i32 == libc::NFULA_CFG_TIMEOUT);
    assert!(NFULA_CFG_QTHRESH as i32 == libc::NFULA_CFG_QTHRESH);
    assert!(NFULNL_CFG_CMD_BIND as i32 == libc::NFULNL_CFG_CMD_BIND);
    assert!(NFULNL_COPY_PACKET as i32 == libc::NFULNL_COPY_PACKET);
};

/// One dropped TCP segment of a locked connection, as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// This host's end (the packet's destination) and the peer (its source).
    pub tuple: ConnTuple,
    /// Sequence number of the first payload byte.
    pub seq: u32,
    /// SYN set (never re-delivered).
    pub syn: bool,
    /// The IP header (without IPv6 extension headers) and the TCP header,
    /// options included, as they arrived.
    pub header: Vec<u8>,
    /// The payload (what the copy holds of it).
    pub payload: Vec<u8>,
}

impl Segment {
    /// The segment an IPv4 or IPv6 packet carrying TCP holds (no IPv6
    /// extension headers), or `None` for anything else or anything
    /// malformed. A packet cut short keeps the payload bytes it has.
    pub fn parse(packet: &[u8]) -> Option<Segment> {
        parse_packet(packet)
    }
}

/// A listener on one `nfnetlink_log` group, in the network namespace the
/// calling thread was in when it was opened.
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
    group: u16,
    buf: Vec<u8>,
}

impl Capture {
    /// Binds a free log group (copying whole packets, each delivered at
    /// once) in the calling thread's network namespace.
    pub fn open() -> Result<Capture, NetfilterError> {
        let op = "opening a netlink socket for dropped packets";
        let fd = sys::netlink_socket(libc::NETLINK_NETFILTER).map_err(|e| NetfilterError::os(op, &e))?;
        let _ = sys::set_int_opt(fd.as_fd(), libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        let _ = sys::set_int_opt(fd.as_fd(), libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        // Copies of dropped packets must not be lost to an error message.
        let _ = sys::set_int_opt(fd.as_fd(), libc::SOL_NETLINK, libc::NETLINK_NO_ENOBUFS, 0);
        sys::set_int_opt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RECV_BUF as libc::c_int)
            .map_err(|e| NetfilterError::os(format!("{op}: raising its receive buffer"), &e))?;
        sys::set_recv_timeout(fd.as_fd(), Duration::from_secs(2)).map_err(|e| NetfilterError::os(op, &e))?;
        let mut cap = Capture { fd, group: 0, buf: vec![0; COPY_RANGE as usize + 4096] };
        let mut last = None;
        for i in 0..GROUP_TRIES {
            let group = GROUP_BASE + (std::process::id() as u16).wrapping_add(i) % 0x0fff;
            match cap.bind(group) {
                Ok(()) => {
                    cap.group = group;
                    tracing::debug!(group, "listening for dropped packets");
                    return Ok(cap);
                }
                // Another listener has the group.
                Err(e) if matches!(e.errno(), Some(libc::EBUSY | libc::EPERM | libc::EEXIST)) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| NetfilterError::protocol(op, "no free nfnetlink_log group")))
    }

    /// The log group the lock's rules send copies to.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Binds `group` and configures it: whole packets, no batching.
    fn bind(&mut self, group: u16) -> Result<(), NetfilterError> {
        let op = format!("binding nfnetlink_log group {group}");
        let ty = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
        let flags = msg::NLM_F_REQUEST | msg::NLM_F_ACK;
        let mut w = Writer::with_capacity(128);
        let m = w.begin_msg(ty, flags, 1, libc::AF_UNSPEC as u8, group);
        w.put(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        w.end_msg(m);
        let m = w.begin_msg(ty, flags, 2, libc::AF_UNSPEC as u8, group);
        // struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; } (packed)
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        w.put(NFULA_CFG_MODE, &mode);
        // Deliver each packet at once rather than in batches (default 100).
        w.put_be32(NFULA_CFG_QTHRESH, 1);
        w.put_be32(NFULA_CFG_TIMEOUT, 1);
        w.end_msg(m);
        let buf = w.finish().ok_or_else(|| NetfilterError::protocol(op.as_str(), "message too long"))?;
        sys::send_to_kernel(self.fd.as_fd(), &buf).map_err(|e| NetfilterError::os(op.as_str(), &e))?;
        let mut acked = [false; 2];
        while !(acked[0] && acked[1]) {
            let r = sys::recv(self.fd.as_fd(), &mut self.buf).map_err(|e| NetfilterError::os(op.as_str(), &e))?;
            for m in msg::messages(&self.buf[..r.len]) {
                let m = m.map_err(|d| NetfilterError::protocol(op.as_str(), d))?;
                if m.ty != msg::NLMSG_ERROR {
                    continue;
                }
                let ack = crate::netlink::checked_ack(&m, &op)?;
                if let Some(slot) = acked.get_mut((ack.seq as usize).wrapping_sub(1)) {
                    *slot = true;
                }
            }
        }
        Ok(())
    }

    /// Every segment copied so far (without waiting), oldest first; stops
    /// keeping payload after [`MAX_KEPT`] bytes.
    pub fn drain(&mut self) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut kept = 0usize;
        let mut overrun = false;
        loop {
            let r = match sys::recv_nowait(self.fd.as_fd(), &mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    overrun = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(group = self.group, error = %e, "cannot read dropped packets");
                    break;
                }
            };
            if r.sender != 0 {
                continue;
            }
            for m in msg::messages(&self.buf[..r.len]) {
                let Ok(m) = m else { break };
                if m.ty != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
                    continue;
                }
                let Ok(attrs) = msg::nf_attrs(&m) else { continue };
                for (ty, data) in attrs.flatten() {
                    if ty != NFULA_PAYLOAD {
                        continue;
                    }
                    if let Some(seg) = parse_packet(data) {
                        if kept + seg.payload.len() <= MAX_KEPT {
                            kept += seg.payload.len();
                            out.push(seg);
                        }
                    }
                }
            }
        }
        if overrun {
            tracing::warn!(group = self.group, "some dropped packets were not kept (socket buffer overrun)");
        }
        tracing::debug!(group = self.group, segments = out.len(), bytes = kept, "dropped packets read");
        out
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses an IPv4 or IPv6 packet carrying TCP (no IPv6 extension headers):
/// the segment, or `None` for anything else or anything malformed. A copy
/// cut short keeps the payload bytes it has.
pub(crate) fn parse_packet(p: &[u8]) -> Option<Segment> {
    let version = p.first()? >> 4;
    let (src, dst, l4, end) = match version {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(be16(p, 2)?);
            if ihl < 20 || *p.get(9)? != libc::IPPROTO_TCP as u8 || total < ihl {
                return None;
            }
            // A fragment's payload is not a segment's.
            if be16(p, 6)? & 0x3fff != 0 {
                return None;
            }
            let s: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(d)), ihl, total)
        }
        6 => {
            if *p.get(6)? != libc::IPPROTO_TCP as u8 {
                return None;
            }
            let s: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)), 40, 40 + usize::from(be16(p, 4)?))
        }
        _ => return None,
    };
    let sport = be16(p, l4)?;
    let dport = be16(p, l4 + 2)?;
    let seq = be32(p, l4 + 4)?;
    let doff = usize::from(p.get(l4 + 12)? >> 4) * 4;
    let flags = *p.get(l4 + 13)?;
    if doff < 20 {
        return None;
    }
    let start = l4 + doff;
    let end = end.min(p.len());
    let payload = p.get(start..end.max(start))?.to_vec();
    Some(Segment {
        tuple: ConnTuple::new(SocketAddr::new(dst, dport), SocketAddr::new(src, sport)),
        seq,
        syn: flags & TCP_SYN != 0,
        header: p[..start].to_vec(),
        payload,
    })
}

const TCP_SYN: u8 = 0x02;

/// One's-complement sum of `data` as big-endian 16-bit words, added to `sum`.
pub(crate) fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// RFC 1071: the one's-complement sum of a header or packet with a right
/// checksum (over the pseudo-header for TCP and UDP) is all ones.
#[cfg(test)]
pub(crate) fn verifies(pseudo: &[u8], data: &[u8]) -> bool {
    fold(sum16(sum16(0, pseudo), data)) == 0
}

pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The packet to deliver for `seg`: its headers and payload with the
/// lengths and checksums made right (a copy of a packet that was offloaded
/// or merged by GRO carries a partial checksum or a length it no longer
/// has). `None` if the headers are not what [`parse_packet`] accepted.
pub(crate) fn rebuild(seg: &Segment) -> Option<Vec<u8>> {
    let mut p = Vec::with_capacity(seg.header.len() + seg.payload.len());
    p.extend_from_slice(&seg.header);
    p.extend_from_slice(&seg.payload);
    let (l4, pseudo) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = u16::try_from(p.len()).ok()?;
            p.get_mut(2..4)?.copy_from_slice(&total.to_be_bytes());
            p.get_mut(10..12)?.copy_from_slice(&[0, 0]);
            let c = fold(sum16(0, p.get(..ihl)?));
            p[10..12].copy_from_slice(&c.to_be_bytes());
            let tcp_len = u32::try_from(p.len() - ihl).ok()?;
            let mut ph = p.get(12..20)?.to_vec();
            ph.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
            ph.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            (ihl, ph)
        }
        6 => {
            let tcp_len = u16::try_from(p.len().checked_sub(40)?).ok()?;
            p.get_mut(4..6)?.copy_from_slice(&tcp_len.to_be_bytes());
            let mut ph = p.get(8..40)?.to_vec();
            ph.extend_from_slice(&u32::from(tcp_len).to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, libc::IPPROTO_TCP as u8]);
            (40, ph)
        }
        _ => return None,
    };
    p.get_mut(l4 + 16..l4 + 18)?.copy_from_slice(&[0, 0]);
    let c = fold(sum16(sum16(0, &pseudo), &p[l4..]));
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

/// Delivers copies of `segments` (SYNs left out) to this host's stack, in
/// order, through raw sockets opened in the calling thread's network
/// namespace, as if they had just arrived; returns how many were sent. For
/// connections that run again here. The packets carry `mark` (none if 0):
/// a lock with that mark lets them through.
pub fn reinject(segments: &[Segment], mark: u32) -> Result<usize, NetfilterError> {
    let mut socks: [Option<OwnedFd>; 2] = [None, None];
    let mut sent = 0;
    for seg in segments.iter().filter(|s| !s.syn) {
        let Some(packet) = rebuild(seg) else { continue };
        let v6 = seg.tuple.local.is_ipv6();
        let slot = &mut socks[usize::from(v6)];
        let fd = match slot {
            Some(fd) => fd,
            None => {
                let op = "opening a raw socket to deliver dropped packets";
                let fd = sys::raw_socket(v6).map_err(|e| NetfilterError::os(op, &e))?;
                if mark != 0 {
                    sys::set_int_opt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
                        .map_err(|e| NetfilterError::os(format!("{op}: setting its mark"), &e))?;
                }
                slot.insert(fd)
            }
        };
        tracing::debug!(
            conn = %seg.tuple,
            seq = seg.seq,
            len = seg.payload.len(),
            "delivering a dropped segment"
        );
        match sys::send_raw(fd.as_fd(), &packet, seg.tuple.local.ip()) {
            Ok(()) => sent += 1,
            Err(e) => tracing::warn!(conn = %seg.tuple, error = %e, "cannot deliver a dropped packet"),
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v4_packet(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 20 + payload.len();
        let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&[10, 0, 0, 9, 10, 0, 0, 1]);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&6379u16.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn ipv4_segment_parses() {
        let p = v4_packet(1000, 0x18, b"GET k\r\n");
        let s = parse_packet(&p).unwrap();
        assert_eq!(s.tuple, ConnTuple::new("10.0.0.1:6379".parse().unwrap(), "10.0.0.9:40000".parse().unwrap()));
        assert_eq!((s.seq, s.syn, &s.header[..], &s.payload[..]), (1000, false, &p[..40], &b"GET k\r\n"[..]));
        let syn = parse_packet(&v4_packet(5, 0x02, b"")).unwrap();
        assert!(syn.syn && syn.payload.is_empty());
    }

    #[test]
    fn rebuilt_packets_have_right_lengths_and_checksums() {
        // Odd payload length, garbage checksums and a length it no longer has.
        let mut p = v4_packet(77, 0x18, b"hello");
        p[2..4].copy_from_slice(&9000u16.to_be_bytes());
        p[36] = 0xde;
        let s = parse_packet(&p[..40]).unwrap();
        let s = Segment { payload: b"hello".to_vec(), ..s };
        let r = rebuild(&s).unwrap();
        assert_eq!(r.len(), 45);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]), 45);
        assert!(verifies(&[], &r[..20]), "IP header checksum");
        let mut ph = r[12..20].to_vec();
        ph.extend_from_slice(&[0, 6, 0, 25]);
        assert!(verifies(&ph, &r[20..]), "TCP checksum");
        assert_eq!(parse_packet(&r).unwrap().payload, b"hello");

        let mut p6 = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
        p6.extend_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
        p6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        p6.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 7, 0, 0, 0, 0, 0x50, 0x10, 1, 0, 0, 0, 0, 0]);
        let mut s6 = parse_packet(&p6).unwrap();
        s6.payload = b"abc".to_vec();
        let r6 = rebuild(&s6).unwrap();
        assert_eq!(u16::from_be_bytes([r6[4], r6[5]]), 23);
        let mut ph6 = r6[8..40].to_vec();
        ph6.extend_from_slice(&[0, 0, 0, 23, 0, 0, 0, 6]);
        assert!(verifies(&ph6, &r6[40..]), "TCP checksum over IPv6");
    }

    #[test]
    fn ipv6_segment_parses() {
        let mut p = vec![0x60, 0, 0, 0, 0, 23, 6, 64];
        let src: Ipv6Addr = "2001:db8::9".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 7, 0, 0, 0, 0, 0x50, 0x10, 1, 0, 0, 0, 0, 0]);
        p.extend_from_slice(b"abc");
        let s = parse_packet(&p).unwrap();
        assert_eq!(s.tuple.local, "[2001:db8::1]:8080".parse().unwrap());
        assert_eq!(s.tuple.remote, "[2001:db8::9]:40000".parse().unwrap());
        assert_eq!((s.seq, &s.payload[..]), (7, &b"abc"[..]));
    }

    #[test]
    fn malformed_packets_are_ignored() {
        let good = v4_packet(1, 0x18, b"xyz");
        for n in 0..40 {
            assert!(parse_packet(&good[..n]).is_none(), "cut at {n}");
        }
        // A copy cut inside the payload keeps what it has.
        assert_eq!(parse_packet(&good[..41]).unwrap().payload, b"x");
        assert!(parse_packet(&good[..40]).unwrap().payload.is_empty());
        let mut udp = good.clone();
        udp[9] = 17;
        assert!(parse_packet(&udp).is_none());
        let mut frag = good.clone();
        frag[6] = 0x20; // more fragments
        assert!(parse_packet(&frag).is_none());
        assert!(parse_packet(&[0x75; 60]).is_none());
    }
}
