//! The datagrams waiting in a UDP socket: read at dump time without taking
//! them (SO_PEEK_OFF walks the queue; IP_PKTINFO / IPV6_RECVPKTINFO tell
//! where each was sent), and delivered again to the restored socket through
//! the loopback device, sender and destination kept (floe_netfilter's
//! raw-socket delivery); one sent to an address this host lacks comes to its
//! loopback address instead (see [`here`]).
//!
//! A datagram delivered again arrives on another interface, later, with
//! another TTL: a socket that asks for any of that with each datagram
//! ([`TELLTALE`]) has its queue refused instead.
use crate::sys::fd_socket;
use floe_proto::image as pb;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::OwnedFd;

/// Options whose ancillary data a datagram delivered again could not carry
/// as it was (arrival interface, TTL, TOS, original destination, arrival
/// time, GRO segments).
const TELLTALE: &[(i32, i32, &str)] = &[
    (libc::IPPROTO_IP, libc::IP_PKTINFO, "IP_PKTINFO"),
    (libc::IPPROTO_IP, libc::IP_RECVTTL, "IP_RECVTTL"),
    (libc::IPPROTO_IP, libc::IP_RECVTOS, "IP_RECVTOS"),
    (libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR, "IP_RECVORIGDSTADDR"),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, "IPV6_RECVPKTINFO"),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, "IPV6_RECVHOPLIMIT"),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, "IPV6_RECVTCLASS"),
    (libc::SOL_SOCKET, SO_TIMESTAMP_OLD, "SO_TIMESTAMP"),
    (libc::SOL_SOCKET, SO_TIMESTAMPNS_OLD, "SO_TIMESTAMPNS"),
    (libc::SOL_SOCKET, SO_TIMESTAMPING_OLD, "SO_TIMESTAMPING"),
    (libc::IPPROTO_UDP, UDP_GRO, "UDP_GRO"),
];
// x86_64 values the libc crate spells differently or lacks.
const SO_TIMESTAMP_OLD: i32 = 29;
const SO_TIMESTAMPNS_OLD: i32 = 35;
const SO_TIMESTAMPING_OLD: i32 = 37;
const UDP_GRO: i32 = 104;
/// Payload bytes of all queued datagrams together, at most.
const MAX_QUEUE_BYTES: usize = 64 << 20;

/// Puts SO_PEEK_OFF and the pktinfo options of the dumped process's socket
/// back as they were, whatever happens.
struct PeekState<'a> {
    sock: &'a OwnedFd,
    peek_off: i32,
    pktinfo: Vec<(i32, i32)>,
}

impl Drop for PeekState<'_> {
    fn drop(&mut self) {
        for (level, name) in &self.pktinfo {
            let _ = fd_socket::setsockopt_int(self.sock, *level, *name, 0);
        }
        let _ = fd_socket::setsockopt_int(self.sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, self.peek_off);
    }
}

/// Whether `sock` asks for ancillary data with each datagram that a
/// datagram delivered again could not carry ([`TELLTALE`]):
/// The first such option it has on, by name.
pub(super) fn telltale(sock: &OwnedFd) -> Option<&'static str> {
    TELLTALE
        .iter()
        .find(|(level, name, _)| fd_socket::getsockopt_int(sock, *level, *name).is_ok_and(|v| v != 0))
        .map(|(_, _, label)| *label)
}

/// The sender of a datagram, from its raw sockaddr (an IPv4 sender of an
/// IPv6 socket comes as ::ffff:a.b.c.d, and is kept as IPv4).
fn sender(raw: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*raw.first()?, *raw.get(1)?]) as i32;
    let port = u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::from((Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(raw.get(24..28)?.try_into().ok()?);
            let ip = Ipv6Addr::from(ip);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::from((v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)),
            })
        }
        _ => None,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
    }
}

fn ip_of(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// The datagrams waiting in `sock` (of `family`), and their payloads back
/// to back. `what` names the socket in messages.
pub(super) fn peek_all(sock: &OwnedFd, family: i32, what: &str) -> Result<(Vec<pb::UdpDatagram>, Vec<u8>), String> {
    if let Some(label) = telltale(sock) {
        return Err(format!(
            "{what} has datagrams waiting to be read, and it asks for {label} with each one: a datagram \
             delivered again could not carry the same; queued datagrams of such a socket cannot be checkpointed"
        ));
    }
    let peek_off = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF)
        .map_err(|e| format!("{what}: cannot read SO_PEEK_OFF ({e})"))?;
    let mut state = PeekState { sock, peek_off, pktinfo: Vec::new() };
    let mut want = vec![(libc::IPPROTO_IP, libc::IP_PKTINFO)];
    if family == libc::AF_INET6 {
        want.push((libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO));
    }
    for (level, name) in want {
        fd_socket::setsockopt_int(sock, level, name, 1)
            .map_err(|e| format!("{what}: cannot ask for the queued datagrams' destinations ({e})"))?;
        state.pktinfo.push((level, name));
    }
    fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)
        .map_err(|e| format!("{what}: cannot set SO_PEEK_OFF ({e})"))?;
    let mut buf = vec![0u8; 1 << 16];
    let (mut out, mut data) = (Vec::new(), Vec::new());
    loop {
        let p = match fd_socket::peek(sock, &mut buf, 0) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => return Err(format!("{what}: cannot read its queued datagrams ({e})")),
        };
        let from = sender(&p.name).ok_or_else(|| format!("{what}: a queued datagram has no sender address"))?;
        let to = ip_of(&p.dst).ok_or_else(|| format!("{what}: the kernel did not say where a queued datagram went"))?;
        let scope = if let SocketAddr::V6(v6) = from { v6.scope_id() } else { 0 };
        out.push(pb::UdpDatagram {
            src_addr: ip_bytes(from.ip()),
            src_port: from.port() as u32,
            src_scope_id: scope,
            dst_addr: ip_bytes(to),
            len: p.len as u32,
        });
        data.extend_from_slice(&buf[..p.len.min(buf.len())]);
        if data.len() > MAX_QUEUE_BYTES {
            return Err(format!("{what}: more than {} MiB of datagrams are waiting", MAX_QUEUE_BYTES >> 20));
        }
    }
    drop(state);
    Ok((out, data))
}

/// Delivers the saved datagrams (`queued`, payloads back to back in
/// `data`) to `sock`, restored and bound to `port`, and checks that all of
/// them are waiting in it.
pub(super) fn deliver(sock: &OwnedFd, port: u16, queued: &[pb::UdpDatagram], data: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    let mut dgrams = Vec::with_capacity(queued.len());
    for q in queued {
        let len = q.len as usize;
        let payload = data.get(at..at + len).ok_or("the saved datagrams are longer than their blob")?.to_vec();
        at += len;
        let from_ip = ip_of(&q.src_addr).ok_or("a saved datagram has a malformed sender")?;
        let to_ip = ip_of(&q.dst_addr).ok_or("a saved datagram has a malformed destination")?;
        let from = match from_ip {
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, q.src_port as u16, 0, q.src_scope_id)),
            v4 => SocketAddr::new(v4, q.src_port as u16),
        };
        dgrams.push(floe_netfilter::Datagram { from, to: SocketAddr::new(here(to_ip), port), payload });
    }
    // Room for all of them at once (a loopback copy may count more than the original).
    let rcvbuf = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0);
    let need = (data.len() * 4 + queued.len() * 2048 + (64 << 10)).min(i32::MAX as usize) as i32;
    let _ = fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, need);
    floe_netfilter::deliver_udp(&dgrams).map_err(|e| format!("cannot deliver its queued datagrams again ({e})"))?;
    let mut got = 0;
    for _ in 0..200 {
        got = count_queued(sock);
        if got >= queued.len() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    if rcvbuf > 0 {
        let _ = fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf / 2);
    }
    if got != queued.len() {
        return Err(format!("{} of its {} queued datagrams arrived again", got, queued.len()));
    }
    Ok(())
}

/// `ip` if it is an address of this host, else the loopback address of its
/// version. A datagram sent to another host's address (a socket bound to
/// the wildcard address, moved by a live migration) must still arrive here;
/// which of its addresses it was sent to, such a socket cannot see (a
/// socket that asks, with IP_PKTINFO, is refused at dump time).
fn here(ip: IpAddr) -> IpAddr {
    let local = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok();
    match ip {
        _ if local => ip,
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// How many datagrams wait in `sock` (floe's own, restored socket).
fn count_queued(sock: &OwnedFd) -> usize {
    if fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_err() {
        return 0;
    }
    let mut none = [0u8; 0];
    let mut n = 0;
    while fd_socket::peek(sock, &mut none, libc::MSG_TRUNC).is_ok() {
        n += 1;
    }
    let _ = fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_to_addresses_of_other_hosts_come_to_loopback() {
        let doc = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)); // TEST-NET-1: never configured here
        assert_eq!(here(doc), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(here(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7))), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)));
        let doc6: IpAddr = "2001:db8::1".parse().expect("address");
        assert_eq!(here(doc6), IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn ipv4_senders_of_ipv6_sockets_are_kept_as_ipv4() {
        let mut raw = vec![0u8; 28];
        raw[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        raw[2..4].copy_from_slice(&5353u16.to_be_bytes());
        raw[8..24].copy_from_slice(&Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets());
        assert_eq!(sender(&raw), Some("10.1.2.3:5353".parse().expect("address")));
        assert_eq!(ip_bytes(IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped())), vec![10, 1, 2, 3]);
    }
}
