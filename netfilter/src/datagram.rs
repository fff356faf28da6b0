//! UDP datagrams delivered to this host's stack through a raw socket, as
//! if they had just arrived: a restored UDP socket gets back the datagrams
//! that were waiting in the original one.
use crate::capture::{fold, sum16};
use crate::{sys, NetfilterError};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

/// One datagram: who sent it, where it went, what it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub payload: Vec<u8>,
}

/// The IP packet carrying `d` (IPv4 or IPv6 by its addresses, which must
/// agree), with lengths and the UDP checksum filled in; `None` when the
/// addresses differ in version or the payload does not fit a datagram.
pub fn udp_packet(d: &Datagram) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(8 + d.payload.len()).ok()?;
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&d.from.port().to_be_bytes());
    udp.extend_from_slice(&d.to.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&d.payload);
    let (mut p, pseudo) = match (d.from.ip(), d.to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(t)) => {
            let total = u16::try_from(20 + udp.len()).ok()?;
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&t.octets());
            let c = fold(sum16(0, &h));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            let mut ph = Vec::with_capacity(12);
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&t.octets());
            ph.extend_from_slice(&[0, libc::IPPROTO_UDP as u8]);
            ph.extend_from_slice(&udp_len.to_be_bytes());
            (h, ph)
        }
        (IpAddr::V6(s), IpAddr::V6(t)) => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&udp_len.to_be_bytes());
            h.extend_from_slice(&[libc::IPPROTO_UDP as u8, 64]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&t.octets());
            let mut ph = Vec::with_capacity(40);
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&t.octets());
            ph.extend_from_slice(&u32::from(udp_len).to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, libc::IPPROTO_UDP as u8]);
            (h, ph)
        }
        _ => return None,
    };
    // 0 means "no checksum" in UDP: a computed 0 is sent as all ones.
    let c = match fold(sum16(sum16(0, &pseudo), &udp)) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&udp);
    Some(p)
}

/// Delivers `datagrams` to this host's stack in order, through raw sockets
/// opened in the calling thread's network namespace; returns how many were
/// sent. Their destinations must be local addresses (they come back through
/// the loopback device).
pub fn deliver_udp(datagrams: &[Datagram]) -> Result<usize, NetfilterError> {
    let mut socks: [Option<OwnedFd>; 2] = [None, None];
    let mut sent = 0;
    for d in datagrams {
        let op = || format!("delivering a datagram {} -> {}", d.from, d.to);
        let packet = udp_packet(d)
            .ok_or_else(|| NetfilterError::protocol(op(), "mixed IP versions, or too large for one datagram"))?;
        let v6 = d.to.is_ipv6();
        let slot = &mut socks[usize::from(v6)];
        let fd = match slot {
            Some(fd) => fd,
            None => {
                let fd = sys::raw_socket(v6)
                    .map_err(|e| NetfilterError::os("opening a raw socket to deliver queued datagrams", &e))?;
                slot.insert(fd)
            }
        };
        sys::send_raw(fd.as_fd(), &packet, d.to.ip()).map_err(|e| NetfilterError::os(op(), &e))?;
        sent += 1;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::capture::verifies as sums_to_ones;

    #[test]
    fn ipv4_packet_has_right_lengths_and_checksums() {
        let d = Datagram {
            from: "10.0.0.9:5353".parse().unwrap(),
            to: "10.0.0.1:53".parse().unwrap(),
            payload: b"query".to_vec(),
        };
        let p = udp_packet(&d).unwrap();
        assert_eq!(p.len(), 20 + 8 + 5);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 33);
        assert!(sums_to_ones(&[], &p[..20]), "IPv4 header checksum");
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17, 0, 13]);
        assert!(sums_to_ones(&pseudo, &p[20..]), "UDP checksum");
        assert_eq!(&p[20..24], &[0x14, 0xe9, 0, 53]);
    }

    #[test]
    fn ipv6_packet_has_right_lengths_and_checksums() {
        let d = Datagram {
            from: "[fd00::9]:4000".parse().unwrap(),
            to: "[fd00::1]:53".parse().unwrap(),
            payload: vec![7; 3],
        };
        let p = udp_packet(&d).unwrap();
        assert_eq!(p.len(), 40 + 11);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 11);
        let mut pseudo = p[8..40].to_vec();
        pseudo.extend_from_slice(&[0, 0, 0, 11, 0, 0, 0, 17]);
        assert!(sums_to_ones(&pseudo, &p[40..]), "UDP checksum");
    }

    #[test]
    fn mixed_versions_and_oversized_payloads_are_refused() {
        let mixed = Datagram { from: "[::1]:1".parse().unwrap(), to: "127.0.0.1:2".parse().unwrap(), payload: vec![] };
        assert!(udp_packet(&mixed).is_none());
        let big = Datagram {
            from: "127.0.0.1:1".parse().unwrap(),
            to: "127.0.0.1:2".parse().unwrap(),
            payload: vec![0; 70_000],
        };
        assert!(udp_packet(&big).is_none());
    }
}
