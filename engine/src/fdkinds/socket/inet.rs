//! AF_INET / AF_INET6 sockets: TCP sockets that listen or are not
//! connected, and UDP sockets (bound or not, connected or not) with an
//! empty receive queue.
//!
//! Established TCP connections are dumped with TCP_REPAIR under
//! --tcp-established (see tcp_repair.rs) and refused without it, as are
//! connections in other states (being set up or half closed). So
//! are listeners with connections waiting in their accept queue, and UDP
//! sockets with datagrams waiting to be read or corked data waiting to be
//! sent: there is no way to put a datagram back with its original sender.
//!
//! Restore: socket, options (SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY,
//! TCP_NODELAY, buffer sizes, ... wherever they differ from a fresh
//! socket's), bind to the saved address and port (the dumped process is
//! dead, so the port is free), then listen(backlog) or connect.
use super::{apply_opts, opt_on, save_opts, tcp_repair, Opt, SOCKET_OPTS};
use crate::fdkinds::{DumpCtx, RestoreCtx};
use crate::sys::fd_socket;
use floe_proto::image as pb;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

const INT: usize = 4;
/// TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;
pub(super) const TCP_SYN_SENT: u8 = 2;
const TCP_CLOSE: u8 = 7;
pub(super) const TCP_LISTEN: u8 = 10;
/// Connections TCP_REPAIR saves: established, or half closed (a FIN sent,
/// received, or both).
fn repairable(state: u8) -> bool {
    matches!(state, TCP_ESTABLISHED | 4 | 5 | 8 | 9 | 11) // FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING
}
const TCP_STATE_NAMES: [&str; 12] = [
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
];
const TCP_CONGESTION_LEN: usize = 16;
const IP_BIND_ADDRESS_NO_PORT: i32 = 24;
const IPV6_FREEBIND: i32 = 78;
const IPV6_TRANSPARENT: i32 = 75;
const UDP_SEGMENT: i32 = 103;
const UDP_GRO: i32 = 104;
const LINGER: usize = std::mem::size_of::<libc::linger>();
const _: () = assert!(LINGER == 8);

/// SOL_SOCKET options of inet sockets.
pub(super) const INET_OPTS: &[Opt] = &[
    Opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR", INT),
    Opt(libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT", INT),
    Opt(libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE", INT),
    Opt(libc::SOL_SOCKET, libc::SO_BROADCAST, "SO_BROADCAST", INT),
    Opt(libc::SOL_SOCKET, libc::SO_LINGER, "SO_LINGER", LINGER),
    Opt(libc::SOL_SOCKET, libc::SO_OOBINLINE, "SO_OOBINLINE", INT),
    Opt(libc::SOL_SOCKET, libc::SO_DONTROUTE, "SO_DONTROUTE", INT),
    Opt(libc::SOL_SOCKET, libc::SO_BINDTODEVICE, "SO_BINDTODEVICE", libc::IFNAMSIZ),
];

pub(super) const IP_OPTS: &[Opt] = &[
    Opt(libc::IPPROTO_IP, libc::IP_TOS, "IP_TOS", INT),
    Opt(libc::IPPROTO_IP, libc::IP_TTL, "IP_TTL", INT),
    Opt(libc::IPPROTO_IP, libc::IP_FREEBIND, "IP_FREEBIND", INT),
    Opt(libc::IPPROTO_IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT", INT),
    Opt(libc::IPPROTO_IP, libc::IP_RECVERR, "IP_RECVERR", INT),
    Opt(libc::IPPROTO_IP, libc::IP_PKTINFO, "IP_PKTINFO", INT),
    Opt(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, "IP_MTU_DISCOVER", INT),
    Opt(libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, "IP_BIND_ADDRESS_NO_PORT", INT),
    Opt(libc::IPPROTO_IP, libc::IP_RECVTTL, "IP_RECVTTL", INT),
    Opt(libc::IPPROTO_IP, libc::IP_RECVTOS, "IP_RECVTOS", INT),
];

/// Multicast options: datagram sockets only (TCP sockets refuse to set them).
pub(super) const IP_MCAST_OPTS: &[Opt] = &[
    Opt(libc::IPPROTO_IP, libc::IP_MULTICAST_TTL, "IP_MULTICAST_TTL", INT),
    Opt(libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, "IP_MULTICAST_LOOP", INT),
];

pub(super) const IPV6_OPTS: &[Opt] = &[
    Opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY", INT),
    Opt(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS", INT),
    Opt(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS", INT),
    Opt(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, "IPV6_RECVPKTINFO", INT),
    Opt(libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, "IPV6_MTU_DISCOVER", INT),
    Opt(libc::IPPROTO_IPV6, IPV6_FREEBIND, "IPV6_FREEBIND", INT),
    Opt(libc::IPPROTO_IPV6, IPV6_TRANSPARENT, "IPV6_TRANSPARENT", INT),
    Opt(libc::IPPROTO_IPV6, libc::IPV6_RECVERR, "IPV6_RECVERR", INT),
    Opt(libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, "IPV6_RECVHOPLIMIT", INT),
];

/// Raw sockets: the ICMP type filters, header inclusion and the IPv6
/// checksum offset.
pub(super) const RAW_OPTS: &[Opt] = &[
    Opt(SOL_RAW, ICMP_FILTER, "ICMP_FILTER", INT),
    Opt(libc::IPPROTO_IP, libc::IP_HDRINCL, "IP_HDRINCL", INT),
    Opt(libc::IPPROTO_ICMPV6, ICMPV6_FILTER, "ICMPV6_FILTER", 32),
    Opt(libc::IPPROTO_IPV6, IPV6_CHECKSUM, "IPV6_CHECKSUM", INT),
];
// <linux/icmp.h>, <linux/icmpv6.h>, <linux/in6.h>
const SOL_RAW: i32 = 255;
const ICMP_FILTER: i32 = 1;
const ICMPV6_FILTER: i32 = 1;
const IPV6_CHECKSUM: i32 = 7;

pub(super) const IPV6_MCAST_OPTS: &[Opt] = &[
    Opt(libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, "IPV6_MULTICAST_HOPS", INT),
    Opt(libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, "IPV6_MULTICAST_LOOP", INT),
];

pub(super) const TCP_OPTS: &[Opt] = &[
    Opt(libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_CORK, "TCP_CORK", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_SYNCNT, "TCP_SYNCNT", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_LINGER2, "TCP_LINGER2", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, "TCP_DEFER_ACCEPT", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_FASTOPEN, "TCP_FASTOPEN", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT", INT),
    Opt(libc::IPPROTO_TCP, libc::TCP_CONGESTION, "TCP_CONGESTION", TCP_CONGESTION_LEN),
];

pub(super) const UDP_OPTS: &[Opt] = &[
    Opt(libc::IPPROTO_UDP, libc::UDP_CORK, "UDP_CORK", INT),
    Opt(libc::IPPROTO_UDP, UDP_SEGMENT, "UDP_SEGMENT", INT),
    Opt(libc::IPPROTO_UDP, UDP_GRO, "UDP_GRO", INT),
];

/// An inet address split out of a raw sockaddr.
#[derive(Debug, Clone, Default, PartialEq)]
struct Addr {
    ip: Vec<u8>,
    port: u16,
    flowinfo: u32,
    scope_id: u32,
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]])).unwrap_or(0)
}

/// Parses a raw sockaddr_in / sockaddr_in6.
fn parse_addr(family: i32, raw: &[u8]) -> Option<Addr> {
    let port = u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]);
    match family {
        libc::AF_INET => Some(Addr { ip: raw.get(4..8)?.to_vec(), port, ..Default::default() }),
        libc::AF_INET6 => Some(Addr {
            ip: raw.get(8..24)?.to_vec(),
            port,
            flowinfo: u32::from_be(u32_ne(raw, 4)),
            scope_id: u32_ne(raw, 24),
        }),
        _ => None,
    }
}

/// Builds a raw sockaddr_in / sockaddr_in6.
fn build_addr(family: i32, a: &Addr) -> Result<Vec<u8>, String> {
    let mut raw = match family {
        libc::AF_INET if a.ip.len() == 4 => {
            let mut r = vec![0u8; std::mem::size_of::<libc::sockaddr_in>()];
            r[4..8].copy_from_slice(&a.ip);
            r
        }
        libc::AF_INET6 if a.ip.len() == 16 => {
            let mut r = vec![0u8; std::mem::size_of::<libc::sockaddr_in6>()];
            r[4..8].copy_from_slice(&a.flowinfo.to_be().to_ne_bytes());
            r[8..24].copy_from_slice(&a.ip);
            r[24..28].copy_from_slice(&a.scope_id.to_ne_bytes());
            r
        }
        _ => return Err(format!("invalid address of {} bytes for family {family} in the image", a.ip.len())),
    };
    raw[..2].copy_from_slice(&(family as u16).to_ne_bytes());
    raw[2..4].copy_from_slice(&a.port.to_be_bytes());
    Ok(raw)
}

/// "127.0.0.1:80", "[::1]:80".
fn show(a: &Addr) -> String {
    match a.ip.len() {
        4 => format!("{}:{}", Ipv4Addr::new(a.ip[0], a.ip[1], a.ip[2], a.ip[3]), a.port),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a.ip);
            format!("[{}]:{}", Ipv6Addr::from(b), a.port)
        }
        _ => format!("?:{}", a.port),
    }
}

fn state_name(s: u8) -> &'static str {
    TCP_STATE_NAMES.get(s as usize).copied().unwrap_or("?")
}

pub fn dump(ctx: &mut DumpCtx, family: i32, sock: &OwnedFd, d: &mut pb::FileDesc) -> Result<(), String> {
    fn err(what: &'static str) -> impl Fn(std::io::Error) -> String {
        move |e| format!("cannot read its {what} ({e})")
    }
    let ty = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_TYPE).map_err(err("type"))?;
    let protocol = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(err("protocol"))?;
    let fam = if family == libc::AF_INET { "IPv4" } else { "IPv6" };
    // How the datagram kinds are named in messages.
    let kind = match (ty, protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => "TCP socket".to_string(),
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => "UDP socket".to_string(),
        (libc::SOCK_DGRAM, libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6) => format!("{fam} ICMP (ping) socket"),
        (libc::SOCK_RAW, p) => format!("raw {fam} socket (protocol {p})"),
        _ => return Err(format!("{fam} sockets of type {ty}, protocol {protocol} are not supported yet")),
    };
    let local_raw = fd_socket::getsockname(sock).map_err(err("local address"))?;
    let local = parse_addr(family, &local_raw).ok_or("cannot parse its local address")?;
    let peer = fd_socket::getpeername(sock).ok().and_then(|raw| parse_addr(family, &raw));
    let mut s = pb::InetSocket {
        family,
        r#type: ty,
        protocol,
        // A raw socket reports its protocol as its port: bound only to an address.
        bound: if ty == libc::SOCK_RAW { local.ip.iter().any(|b| *b != 0) } else { local.port != 0 },
        local_addr: local.ip.clone(),
        local_port: local.port as u32,
        local_scope_id: local.scope_id,
        ..Default::default()
    };
    let mut lists: Vec<&[Opt]> =
        vec![SOCKET_OPTS, INET_OPTS, if family == libc::AF_INET { IP_OPTS } else { IPV6_OPTS }];
    if protocol == libc::IPPROTO_TCP {
        let st = fd_socket::tcp_state(sock).map_err(err("TCP state (TCP_INFO)"))?;
        s.state = st.state as u32;
        match st.state {
            TCP_LISTEN => {
                if st.accept_queue > 0 && !ctx.passing_ok {
                    return Err(format!(
                        "TCP listener {} has {} connection(s) waiting in its accept queue; \
                         connections not yet accepted cannot be checkpointed",
                        show(&local),
                        st.accept_queue
                    ));
                }
                s.listening = true;
                s.backlog = st.backlog;
            }
            TCP_CLOSE => {
                // A connection that ended can leave unread data behind.
                let unread = fd_socket::ioctl_int(sock, libc::FIONREAD).unwrap_or(0);
                if unread > 0 {
                    return Err(format!(
                        "closed TCP socket {} still holds {unread} unread bytes of its connection; they cannot \
                         be checkpointed",
                        show(&local)
                    ));
                }
            }
            state if repairable(state) => {
                let remote = peer.as_ref().map(show).unwrap_or_else(|| "?".into());
                if !ctx.tcp_established {
                    let what = if state == TCP_ESTABLISHED { "an established" } else { "a half-closed" };
                    return Err(format!(
                        "it is {what} TCP connection {} -> {remote}; pass --tcp-established to \
                         checkpoint established TCP connections",
                        show(&local)
                    ));
                }
                let p = peer.as_ref().ok_or("established TCP connection without a peer address")?;
                s.connected = true;
                s.remote_addr = p.ip.clone();
                s.remote_port = p.port as u32;
                s.remote_scope_id = p.scope_id;
                s.remote_flowinfo = p.flowinfo;
                let dup = sock.try_clone().map_err(|e| format!("cannot keep the socket ({e})"))?;
                let t0 = std::time::Instant::now();
                let t = tcp_repair::dump(sock, state, ctx.blobs)
                    .map_err(|e| format!("{} -> {remote}: {e}", show(&local)))?;
                ctx.repaired.ms += t0.elapsed().as_secs_f64() * 1000.0;
                // From here the socket is in repair mode until the dump's end.
                ctx.repaired.push(dup);
                s.tcp = Some(t);
            }
            // Read again at the final freeze.
            TCP_SYN_SENT if ctx.passing_ok => {}
            TCP_SYN_SENT => {
                let remote = peer.as_ref().map(show).unwrap_or_else(|| "?".into());
                return Err(format!(
                    "it is a TCP connection {} -> {remote} still being set up (SYN_SENT); connections being set \
                     up cannot be checkpointed; retry once it is established",
                    show(&local)
                ));
            }
            other => {
                let remote = peer.as_ref().map(show).unwrap_or_else(|| "?".into());
                return Err(format!(
                    "it is a TCP connection {} -> {remote} in state {}; only established and half-closed \
                     connections can be checkpointed",
                    show(&local),
                    state_name(other)
                ));
            }
        }
        lists.push(TCP_OPTS);
    } else {
        let mut none = [0u8; 0];
        match fd_socket::peek(sock, &mut none, libc::MSG_TRUNC) {
            // Read again at the final freeze.
            Ok(_) if ctx.passing_ok => {}
            Ok(_) if protocol == libc::IPPROTO_UDP => {
                let (queued, data) = super::udp_queue::peek_all(sock, family, &format!("{kind} {}", show(&local)))?;
                s.queued = queued;
                s.queue_blob = Some(ctx.blobs.len() as i32);
                ctx.blobs.push(data);
            }
            Ok(p) => {
                return Err(format!(
                    "{kind} {} has datagrams waiting to be read (the next is {} bytes); queued datagrams \
                     cannot be checkpointed yet",
                    show(&local),
                    p.len
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => return Err(format!("cannot look at its receive queue ({e})")),
        }
        let unsent = fd_socket::ioctl_int(sock, libc::TIOCOUTQ).unwrap_or(0);
        if unsent > 0 && opt_corked(sock) {
            return Err(format!(
                "UDP socket {} holds {unsent} bytes of corked data not sent yet; they cannot be checkpointed",
                show(&local)
            ));
        }
        if let Some(p) = &peer {
            s.connected = true;
            s.remote_addr = p.ip.clone();
            s.remote_port = p.port as u32;
            s.remote_scope_id = p.scope_id;
            s.remote_flowinfo = p.flowinfo;
        }
        lists.push(if ty == libc::SOCK_RAW { RAW_OPTS } else { UDP_OPTS });
        lists.push(if family == libc::AF_INET { IP_MCAST_OPTS } else { IPV6_MCAST_OPTS });
    }
    save_opts(sock, &lists, &mut s.opts);
    d.inet_socket = Some(s);
    Ok(())
}

fn opt_corked(sock: &OwnedFd) -> bool {
    fd_socket::getsockopt_int(sock, libc::IPPROTO_UDP, libc::UDP_CORK).map(|v| v != 0).unwrap_or(false)
}

pub fn restore(d: &pb::FileDesc, ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let img = ctx.img;
    let blob = |i: i32| img.read_blob(i as usize).map_err(|e| format!("cannot read a saved socket queue ({e})"));
    let (sock, unsent) = restore_socket(d, ctx.tcp_close, &blob)?;
    if let Some(unsent) = unsent {
        let dup = sock.try_clone().map_err(|e| format!("cannot keep the restored connection ({e})"))?;
        let held = super::HeldConn { sock: dup, unsent };
        if ctx.tcp_hold {
            ctx.held.push(held);
        } else {
            held.release()?;
        }
    }
    Ok(sock)
}

/// The socket of `d`; `blob` reads a saved TCP queue. An established
/// connection comes back in repair mode, with its never-sent data.
fn restore_socket(
    d: &pb::FileDesc,
    tcp_close: bool,
    blob: &dyn Fn(i32) -> Result<Vec<u8>, String>,
) -> Result<(OwnedFd, Option<Vec<u8>>), String> {
    let s = d.inet_socket.as_ref().ok_or("the image has no socket state for this descriptor")?;
    let sock = fd_socket::socket(s.family, s.r#type, s.protocol).map_err(|e| {
        let ping = s.r#type == libc::SOCK_DGRAM && matches!(s.protocol, libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6);
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) if ping => "; floe's group must be in net.ipv4.ping_group_range",
            Some(libc::EPERM) if s.r#type == libc::SOCK_RAW => "; raw sockets need CAP_NET_RAW",
            _ => "",
        };
        format!("cannot create the socket ({e}){hint}")
    })?;
    apply_opts(&sock, &s.opts)?;
    if let Some(t) = &s.tcp {
        if tcp_close {
            // --tcp-close: a socket that never connected; the process sees the connection as gone.
            return Ok((sock, None));
        }
        let port = |p: u32| u16::try_from(p).map_err(|_| "invalid port in the image".to_string());
        let local =
            Addr { ip: s.local_addr.clone(), port: port(s.local_port)?, flowinfo: 0, scope_id: s.local_scope_id };
        let remote = Addr {
            ip: s.remote_addr.clone(),
            port: port(s.remote_port)?,
            flowinfo: s.remote_flowinfo,
            scope_id: s.remote_scope_id,
        };
        let queue = |i: i32| if i < 0 { Ok(Vec::new()) } else { blob(i) };
        let (sendq, recvq) = (queue(t.send_queue_blob)?, queue(t.recv_queue_blob)?);
        let ends = to_std(&local).zip(to_std(&remote)).ok_or("invalid address in the image")?;
        let unsent = tcp_repair::restore(
            &sock,
            t,
            s.state as u8,
            ends,
            &build_addr(s.family, &local)?,
            &build_addr(s.family, &remote)?,
            &sendq,
            &recvq,
        )
        .map_err(|e| format!("{} -> {}: {e}", show(&local), show(&remote)))?;
        return Ok((sock, Some(unsent)));
    }
    let local = Addr {
        ip: s.local_addr.clone(),
        port: u16::try_from(s.local_port).map_err(|_| "invalid port in the image")?,
        flowinfo: 0,
        scope_id: s.local_scope_id,
    };
    if s.bound {
        let raw = build_addr(s.family, &local)?;
        fd_socket::bind(&sock, &raw).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EADDRINUSE) {
                if opt_on(&s.opts, libc::SOL_SOCKET, libc::SO_REUSEADDR) {
                    "; another socket uses it"
                } else {
                    "; another socket uses it, or connections of the old process linger in TIME_WAIT \
                     (the original socket had no SO_REUSEADDR)"
                }
            } else {
                ""
            };
            format!("cannot bind to {} ({e}){hint}", show(&local))
        })?;
    }
    if s.listening {
        fd_socket::listen(&sock, s.backlog as i32).map_err(|e| format!("cannot listen on {} ({e})", show(&local)))?;
    }
    if s.connected {
        let remote = Addr {
            ip: s.remote_addr.clone(),
            port: u16::try_from(s.remote_port).map_err(|_| "invalid port in the image")?,
            flowinfo: s.remote_flowinfo,
            scope_id: s.remote_scope_id,
        };
        let raw = build_addr(s.family, &remote)?;
        fd_socket::connect(&sock, &raw).map_err(|e| format!("cannot connect to {} ({e})", show(&remote)))?;
    }
    if !s.queued.is_empty() {
        let data = blob(s.queue_blob.unwrap_or(-1))?;
        super::udp_queue::deliver(&sock, local.port, &s.queued, &data).map_err(|e| format!("{}: {e}", show(&local)))?;
    }
    Ok((sock, None))
}

/// `pid`'s inet sockets (dups taken with pidfd_getfd) and their families.
fn inet_sockets(pid: i32) -> Vec<(OwnedFd, i32)> {
    let mut out = Vec::new();
    let Ok(pidfd) = crate::sys::task::pidfd_open(pid) else { return out };
    let Ok(rd) = std::fs::read_dir(crate::procfs::path(pid, "fd")) else { return out };
    for ent in rd.flatten() {
        let is_socket = std::fs::read_link(ent.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(fd) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        let Ok(sock) = crate::sys::task::pidfd_getfd(&pidfd, fd) else { continue };
        let family = fd_socket::getsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(0);
        if family == libc::AF_INET || family == libc::AF_INET6 {
            out.push((sock, family));
        }
    }
    out
}

/// The established TCP connections among `pid`'s descriptors, as
/// (local, remote) addresses (what a network lock must hold still).
pub fn tcp_tuples(pid: i32) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
    let mut out = Vec::new();
    for (sock, family) in inet_sockets(pid) {
        let proto = fd_socket::getsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(0);
        if proto != libc::IPPROTO_TCP || !fd_socket::tcp_state(&sock).is_ok_and(|st| repairable(st.state)) {
            continue;
        }
        let l = fd_socket::getsockname(&sock).ok().and_then(|r| parse_addr(family, &r)).and_then(|a| to_std(&a));
        let r = fd_socket::getpeername(&sock).ok().and_then(|r| parse_addr(family, &r)).and_then(|a| to_std(&a));
        if let (Some(l), Some(r)) = (l, r) {
            if !out.contains(&(l, r)) {
                out.push((l, r));
            }
        }
    }
    out
}

/// The specific local addresses (not the wildcard) `pid`'s inet sockets are
/// bound to: they must exist wherever the process is restored.
pub fn bound_addresses(pid: i32) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    for (sock, family) in inet_sockets(pid) {
        let local = fd_socket::getsockname(&sock).ok().and_then(|r| parse_addr(family, &r));
        if let Some(ip) = local.as_ref().and_then(to_std).map(|a| a.ip()) {
            if !ip.is_unspecified() && !ip.is_loopback() && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

fn to_std(a: &Addr) -> Option<std::net::SocketAddr> {
    match a.ip.len() {
        4 => Some(std::net::SocketAddr::from((Ipv4Addr::new(a.ip[0], a.ip[1], a.ip[2], a.ip[3]), a.port))),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a.ip);
            Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(b),
                a.port,
                a.flowinfo,
                a.scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        let a = Addr { ip: vec![127, 0, 0, 1], port: 8080, ..Default::default() };
        let raw = build_addr(libc::AF_INET, &a).expect("v4");
        assert_eq!(parse_addr(libc::AF_INET, &raw), Some(a.clone()));
        assert_eq!(show(&a), "127.0.0.1:8080");
        let mut ip = vec![0u8; 16];
        ip[15] = 1;
        let b = Addr { ip, port: 443, flowinfo: 7, scope_id: 2 };
        let raw = build_addr(libc::AF_INET6, &b).expect("v6");
        assert_eq!(parse_addr(libc::AF_INET6, &raw), Some(b.clone()));
        assert_eq!(show(&b), "[::1]:443");
        assert!(build_addr(libc::AF_INET, &b).is_err());
    }

    #[test]
    fn restores_a_listener_on_loopback() {
        // The freed port can be taken by another test in between: retry with a new one.
        let ok = (0..5).any(|_| listener_round_trip());
        assert!(ok, "no attempt restored a listener");
    }

    /// Listener dumped and restored on the same port; false if the port was taken meanwhile.
    fn listener_round_trip() -> bool {
        let l = fd_socket::socket(libc::AF_INET, libc::SOCK_STREAM, 0).expect("socket");
        fd_socket::setsockopt_int(&l, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).expect("reuse");
        let a = Addr { ip: vec![127, 0, 0, 1], port: 0, ..Default::default() };
        fd_socket::bind(&l, &build_addr(libc::AF_INET, &a).expect("addr")).expect("bind");
        fd_socket::listen(&l, 7).expect("listen");
        let st = fd_socket::tcp_state(&l).expect("tcp_info");
        assert_eq!((st.state, st.accept_queue, st.backlog), (TCP_LISTEN, 0, 7));
        let port = parse_addr(libc::AF_INET, &fd_socket::getsockname(&l).expect("name")).expect("parse").port;
        let mut opts = Vec::new();
        save_opts(&l, &[SOCKET_OPTS, INET_OPTS, IP_OPTS, TCP_OPTS], &mut opts);
        drop(l);
        let d = pb::FileDesc {
            inet_socket: Some(pb::InetSocket {
                family: libc::AF_INET,
                r#type: libc::SOCK_STREAM,
                protocol: libc::IPPROTO_TCP,
                state: TCP_LISTEN as u32,
                bound: true,
                local_addr: vec![127, 0, 0, 1],
                local_port: port as u32,
                listening: true,
                backlog: 7,
                opts,
                ..Default::default()
            }),
            ..Default::default()
        };
        let Ok((r, _)) = restore_socket(&d, false, &|_| Err("no blobs".into())) else { return false };
        let st = fd_socket::tcp_state(&r).expect("tcp_info");
        assert_eq!((st.state, st.backlog), (TCP_LISTEN, 7));
        let got = parse_addr(libc::AF_INET, &fd_socket::getsockname(&r).expect("name")).expect("parse");
        assert_eq!(got.port, port);
        true
    }
}
