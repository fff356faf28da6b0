//! AF_NETLINK sockets: protocol, type, port id, multicast groups, connected
//! destination and options. A restored socket gets its port id back, so
//! replies and notifications addressed to it arrive as before. Messages
//! waiting to be read, and a dump the kernel is still producing, cannot be
//! put back: such a socket is refused.
use super::{apply_opts, save_opts, Opt, INT, SOCKET_OPTS};
use crate::sys::fd_socket;
use floe_proto::image as pb;
use std::os::fd::OwnedFd;

/// Options of SOL_NETLINK floe saves.
pub(super) const NETLINK_OPTS: &[Opt] = &[
    Opt(libc::SOL_NETLINK, NETLINK_PKTINFO, "NETLINK_PKTINFO", INT),
    Opt(libc::SOL_NETLINK, NETLINK_BROADCAST_ERROR, "NETLINK_BROADCAST_ERROR", INT),
    Opt(libc::SOL_NETLINK, NETLINK_NO_ENOBUFS, "NETLINK_NO_ENOBUFS", INT),
    Opt(libc::SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, "NETLINK_LISTEN_ALL_NSID", INT),
    Opt(libc::SOL_NETLINK, NETLINK_CAP_ACK, "NETLINK_CAP_ACK", INT),
    Opt(libc::SOL_NETLINK, NETLINK_EXT_ACK, "NETLINK_EXT_ACK", INT),
    Opt(libc::SOL_NETLINK, NETLINK_GET_STRICT_CHK, "NETLINK_GET_STRICT_CHK", INT),
];

// <linux/netlink.h>
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
const NETLINK_PKTINFO: i32 = 3;
const NETLINK_BROADCAST_ERROR: i32 = 4;
const NETLINK_NO_ENOBUFS: i32 = 5;
const NETLINK_LISTEN_ALL_NSID: i32 = 8;
const NETLINK_LIST_MEMBERSHIPS: i32 = 9;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;
const NETLINK_GET_STRICT_CHK: i32 = 12;
/// Bytes asked for NETLINK_LIST_MEMBERSHIPS: room for 8192 groups.
const GROUPS_MAX: usize = 1024;

/// struct sockaddr_nl: family, pad, port id, group mask.
const SOCKADDR_NL_LEN: usize = 12;

fn sockaddr_nl(portid: u32, groups: u32) -> [u8; SOCKADDR_NL_LEN] {
    let mut a = [0u8; SOCKADDR_NL_LEN];
    a[..2].copy_from_slice(&(libc::AF_NETLINK as u16).to_ne_bytes());
    a[4..8].copy_from_slice(&portid.to_ne_bytes());
    a[8..12].copy_from_slice(&groups.to_ne_bytes());
    a
}

/// (port id, group mask) of a sockaddr_nl.
fn parse_nl(a: &[u8]) -> Option<(u32, u32)> {
    let word = |at: usize| a.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
    Some((word(4)?, word(8)?))
}

/// /proc/net/netlink's receive-queue bytes and dump state of socket `ino`.
fn queue_state(ino: u64) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netlink").ok()?;
    // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let parse = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        (parse(9)? == ino).then_some((parse(4)?, parse(6)?))
    })
}

/// `passing_ok`: messages waiting are let through (they are looked at again).
/// Bytes waiting in netlink socket `ino`, or a dump the kernel is still
/// answering (then at least 1); None when nothing waits.
pub(super) fn waiting(ino: u64) -> Option<u64> {
    let (rmem, dump) = queue_state(ino)?;
    (rmem > 0 || dump != 0).then_some(rmem.max(1))
}

pub(super) fn dump(ino: u64, sock: &OwnedFd, d: &mut pb::FileDesc, passing_ok: bool) -> Result<(), String> {
    let int = |level, name, what: &str| {
        fd_socket::getsockopt_int(sock, level, name).map_err(|e| format!("cannot read its {what} ({e})"))
    };
    let ty = int(libc::SOL_SOCKET, libc::SO_TYPE, "type")?;
    let protocol = int(libc::SOL_SOCKET, libc::SO_PROTOCOL, "protocol")?;
    let what = format!("netlink socket (protocol {protocol})");
    let name = fd_socket::getsockname(sock).map_err(|e| format!("{what}: cannot read its address ({e})"))?;
    let (portid, _) = parse_nl(&name).ok_or_else(|| format!("{what}: short address"))?;
    match queue_state(ino) {
        Some(_) if passing_ok => {}
        Some((rmem, _)) if rmem > 0 => {
            return Err(format!("{what}: {rmem} bytes of messages are waiting to be read; they cannot be put back"))
        }
        Some((_, dump)) if dump != 0 => {
            return Err(format!("{what}: the kernel is still answering a dump request on it; retry once it is read"))
        }
        Some(_) => {}
        // Only bound sockets are listed; an unbound one cannot have received anything.
        None if portid == 0 => {}
        None => return Err(format!("{what}: port id {portid} is not listed in /proc/net/netlink")),
    }
    let peer = fd_socket::getpeername(sock).map_err(|e| format!("{what}: cannot read its destination ({e})"))?;
    let (dst_portid, dst_groups) = parse_nl(&peer).unwrap_or((0, 0));
    let groups = fd_socket::getsockopt(sock, libc::SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, GROUPS_MAX)
        .map_err(|e| format!("{what}: cannot list its multicast groups ({e})"))?;
    let mut n = pb::NetlinkSocket { r#type: ty, protocol, portid, groups, dst_portid, dst_groups, opts: Vec::new() };
    save_opts(sock, &[SOCKET_OPTS, NETLINK_OPTS], &mut n.opts);
    d.kind = pb::FdKind::NetlinkSocket as i32;
    d.netlink_socket = Some(n);
    Ok(())
}

pub(super) fn restore(d: &pb::FileDesc) -> Result<OwnedFd, String> {
    let n = d.netlink_socket.as_ref().ok_or("netlink socket without its record")?;
    let what = format!("netlink socket (protocol {}, port id {})", n.protocol, n.portid);
    let s = fd_socket::socket(libc::AF_NETLINK, n.r#type, n.protocol)
        .map_err(|e| format!("{what}: cannot create it ({e})"))?;
    apply_opts(&s, &n.opts).map_err(|e| format!("{what}: {e}"))?;
    if n.portid != 0 {
        fd_socket::bind(&s, &sockaddr_nl(n.portid, 0)).map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRINUSE) => format!("{what}: another socket on this host has that port id"),
            _ => format!("{what}: cannot bind it ({e})"),
        })?;
    }
    for (w, word) in n.groups.chunks(4).enumerate() {
        let bits = u32::from_ne_bytes(word.try_into().map_err(|_| format!("{what}: group bitmap of odd length"))?);
        for b in (0..32).filter(|b| bits & (1 << b) != 0) {
            let group = (w * 32 + b + 1) as i32;
            fd_socket::setsockopt_int(&s, libc::SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
                .map_err(|e| format!("{what}: cannot join multicast group {group} ({e})"))?;
        }
    }
    if n.dst_portid != 0 || n.dst_groups != 0 {
        fd_socket::connect(&s, &sockaddr_nl(n.dst_portid, n.dst_groups))
            .map_err(|e| format!("{what}: cannot connect it to {}/{:#x} ({e})", n.dst_portid, n.dst_groups))?;
    }
    Ok(s)
}
