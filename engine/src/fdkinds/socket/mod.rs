//! Socket descriptors: AF_UNIX (unix.rs), AF_INET/AF_INET6 TCP, UDP, ICMP
//! (ping) and raw (inet.rs) and AF_NETLINK (netlink.rs). Everything else
//! (packet, ...) is refused.
//!
//! Dump looks at the socket through a copy of the descriptor taken with
//! pidfd_getfd: the copy shares the open file description, so socket
//! options, names and queues are the dumped process's own. Nothing is
//! consumed: queued data is read with MSG_PEEK.
//!
//! Restore creates the socket in floe (close-on-exec, non-blocking while
//! floe works on it), sets the saved options that differ from a fresh
//! socket's, binds, listens or connects, refills queues, and finally gives
//! the description its saved status flags (O_NONBLOCK).
use super::{DumpCtx, RestoreCtx};
use crate::procfs;
use crate::sys::{fd_event, fd_socket, task};
use floe_proto::image as pb;
use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

mod gate;
mod inet;
mod netlink;
mod tcp_repair;
mod udp_queue;
mod unix;

pub use gate::ListenerGate;
pub use inet::{bound_addresses, tcp_tuples};

/// Sockets a dump put in TCP repair mode (dups of the process's). Dropped
/// armed (the dump failed, or the process runs on) they leave repair mode
/// without sending anything; [`Repaired::keep`] leaves them in it, so the
/// connections close silently when the dumped process dies.
#[derive(Default)]
pub struct Repaired {
    socks: Vec<OwnedFd>,
    kept: bool,
    /// Time spent reading connections with TCP_REPAIR (ms).
    pub ms: f64,
}

impl Repaired {
    pub fn push(&mut self, s: OwnedFd) {
        self.socks.push(s);
    }

    pub fn len(&self) -> usize {
        self.socks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }

    /// The process will die (or stay frozen for good): stay in repair mode.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

/// A restored TCP connection still in repair mode (a dup of the restored
/// process's socket) and the data to send once it leaves it.
pub struct HeldConn {
    sock: OwnedFd,
    unsent: Vec<u8>,
}

impl HeldConn {
    /// Repair mode off (a window probe prompts the peer), then the unsent data.
    pub fn release(self) -> Result<(), String> {
        tcp_repair::release(&self.sock, &self.unsent)
    }
}

impl std::fmt::Debug for Repaired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repaired({} sockets, kept: {})", self.socks.len(), self.kept)
    }
}

impl Drop for Repaired {
    fn drop(&mut self) {
        if !self.kept {
            for s in &self.socks {
                tcp_repair::leave_repair(s);
            }
        }
    }
}

pub fn dump(ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    let ino = socket_ino(ctx.link).ok_or_else(|| format!("cannot parse the socket inode from {:?}", ctx.link))?;
    let sock = fd_event::fd_of_process(ctx.pid, ctx.fd)
        .map_err(|e| format!("cannot take a copy of the socket with pidfd_getfd ({e})"))?;
    let domain = fd_socket::getsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(|e| format!("cannot read its address family ({e})"))?;
    check_netns(&sock)?;
    match domain {
        libc::AF_UNIX => {
            d.kind = pb::FdKind::UnixSocket as i32;
            unix::dump(ctx, ino, &sock, d)
        }
        libc::AF_INET | libc::AF_INET6 => {
            d.kind = pb::FdKind::InetSocket as i32;
            inet::dump(ctx, domain, &sock, d)
        }
        libc::AF_NETLINK => netlink::dump(ino, &sock, d, ctx.passing_ok),
        libc::AF_PACKET => Err("packet sockets are not supported yet".into()),
        other => Err(format!("sockets of address family {other} are not supported")),
    }
}

pub fn restore(d: &pb::FileDesc, ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let fd = match pb::FdKind::try_from(d.kind) {
        Ok(pb::FdKind::UnixSocket) => unix::restore(d, ctx)?,
        Ok(pb::FdKind::InetSocket) => inet::restore(d, ctx)?,
        Ok(pb::FdKind::NetlinkSocket) => netlink::restore(d)?,
        _ => return Err("not a socket".into()),
    };
    let fl = if d.flags & libc::O_NONBLOCK as u32 != 0 { libc::O_NONBLOCK } else { 0 };
    task::fcntl_int(&fd, libc::F_SETFL, fl).map_err(|e| format!("cannot set the status flags ({e})"))?;
    Ok(fd)
}

/// What the freeze looks for in a socket ([`at_freeze`]).
pub enum AtFreeze {
    /// A TCP listener (closed to new connections by a [`ListenerGate`]).
    Listener,
    /// A state that passes once its process runs a little, and that a dump
    /// would refuse: a TCP connection being set up, or messages waiting
    /// where they cannot be saved (netlink, ping and raw sockets, UDP
    /// sockets that ask for ancillary data with each datagram).
    Passing(String),
    Other,
}

/// What the freeze makes of socket `sock` (inode `ino`).
pub fn at_freeze(sock: &OwnedFd, ino: u64) -> AtFreeze {
    let int = |level, name| fd_socket::getsockopt_int(sock, level, name).ok();
    let (Some(domain), Some(ty), Some(protocol)) = (
        int(libc::SOL_SOCKET, libc::SO_DOMAIN),
        int(libc::SOL_SOCKET, libc::SO_TYPE),
        int(libc::SOL_SOCKET, libc::SO_PROTOCOL),
    ) else {
        return AtFreeze::Other;
    };
    let passing = |what: Option<String>| what.map_or(AtFreeze::Other, AtFreeze::Passing);
    match domain {
        libc::AF_NETLINK => passing(netlink::waiting(ino).map(|b| format!("{b} bytes of netlink messages waiting"))),
        libc::AF_INET | libc::AF_INET6 if protocol == libc::IPPROTO_TCP => match fd_socket::tcp_state(sock) {
            Ok(st) if st.state == inet::TCP_LISTEN => AtFreeze::Listener,
            Ok(st) if st.state == inet::TCP_SYN_SENT => AtFreeze::Passing("a TCP connection being set up".into()),
            _ => AtFreeze::Other,
        },
        libc::AF_INET | libc::AF_INET6 => {
            let mut none = [0u8; 0];
            if fd_socket::peek(sock, &mut none, libc::MSG_TRUNC).is_err() {
                return AtFreeze::Other;
            }
            let saved = ty == libc::SOCK_DGRAM && protocol == libc::IPPROTO_UDP && udp_queue::telltale(sock).is_none();
            passing((!saved).then(|| "datagrams waiting that cannot be saved".to_string()))
        }
        _ => AtFreeze::Other,
    }
}

/// "socket:[123]" -> 123.
fn socket_ino(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Refuses sockets of another network namespace than floe's: restore
/// creates sockets in floe's.
fn check_netns(sock: &OwnedFd) -> Result<(), String> {
    let ns = match fd_socket::netns_of(sock) {
        Ok(ns) => ns,
        // Kernels without SIOCGSKNS: nothing to compare.
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
        Err(e) => return Err(format!("cannot find its network namespace ({e})")),
    };
    let theirs = std::fs::metadata(format!("/proc/self/fd/{}", ns.as_raw_fd())).map(|m| m.ino());
    let ours = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino());
    match (theirs, ours) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Ok(a), Ok(_)) => Err(format!(
            "it belongs to another network namespace (net:[{a}]) than floe's; network namespaces are not supported yet"
        )),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// the dumped tree and who holds a socket

/// Whether `pid` is stopped by this floe process (a task of the dumped tree).
fn traced_by_us(pid: i32) -> bool {
    match procfs::status(pid) {
        Ok(s) if s.tracer_pid > 0 => std::path::Path::new(&format!("/proc/self/task/{}", s.tracer_pid)).exists(),
        _ => false,
    }
}

/// The processes of the tree being dumped: every process floe has stopped
/// is traced by it, so climb from `pid` while the parent is, then take all
/// descendants.
pub(super) fn dumped_tree(pid: i32) -> HashSet<i32> {
    let mut root = pid;
    for _ in 0..4096 {
        match procfs::status(root) {
            Ok(s) if s.ppid > 0 && traced_by_us(s.ppid) => root = s.ppid,
            _ => break,
        }
    }
    let mut tree = HashSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if tree.insert(p) {
            stack.extend(procfs::children(p).unwrap_or_default());
        }
    }
    tree
}

fn holds(pid: i32, link: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|f| std::fs::read_link(f.path()).map(|l| l.as_os_str() == link).unwrap_or(false))
}

/// Who holds a descriptor of socket `ino`.
pub(super) enum Holder {
    /// A process of the dumped tree.
    Tree,
    /// A process outside it.
    Outside(i32),
    /// No process (closed, or only in flight in an SCM_RIGHTS message).
    Nobody,
}

pub(super) fn holder(ino: u64, tree: &HashSet<i32>) -> Holder {
    let link = format!("socket:[{ino}]");
    if tree.iter().any(|&p| holds(p, &link)) {
        return Holder::Tree;
    }
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else { return Holder::Nobody };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid != me && !tree.contains(&pid) && holds(pid, &link) {
            return Holder::Outside(pid);
        }
    }
    Holder::Nobody
}

// ---------------------------------------------------------------------------
// socket options

/// One option floe saves: level, name, printable name, bytes to ask for.
pub(super) struct Opt(pub i32, pub i32, pub &'static str, pub usize);

const INT: usize = 4;
/// x86_64 values the libc crate spells differently or lacks.
const SO_TIMESTAMP_OLD: i32 = 29;
const SO_RCVTIMEO_OLD: i32 = 20;
const SO_SNDTIMEO_OLD: i32 = 21;
const SO_PASSPIDFD: i32 = 76;
const SO_PASSRIGHTS: i32 = 83;
const TIMEVAL: usize = std::mem::size_of::<libc::timeval>();
const _: () = assert!(TIMEVAL == 16);

/// Options every socket kind shares.
pub(super) const SOCKET_OPTS: &[Opt] = &[
    Opt(libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF", INT),
    Opt(libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF", INT),
    Opt(libc::SOL_SOCKET, libc::SO_RCVLOWAT, "SO_RCVLOWAT", INT),
    Opt(libc::SOL_SOCKET, SO_RCVTIMEO_OLD, "SO_RCVTIMEO", TIMEVAL),
    Opt(libc::SOL_SOCKET, SO_SNDTIMEO_OLD, "SO_SNDTIMEO", TIMEVAL),
    Opt(libc::SOL_SOCKET, libc::SO_PRIORITY, "SO_PRIORITY", INT),
    Opt(libc::SOL_SOCKET, libc::SO_MARK, "SO_MARK", INT),
    Opt(libc::SOL_SOCKET, SO_TIMESTAMP_OLD, "SO_TIMESTAMP", INT),
];

/// AF_UNIX only.
pub(super) const UNIX_OPTS: &[Opt] = &[
    Opt(libc::SOL_SOCKET, libc::SO_PASSCRED, "SO_PASSCRED", INT),
    Opt(libc::SOL_SOCKET, libc::SO_PASSSEC, "SO_PASSSEC", INT),
    Opt(libc::SOL_SOCKET, SO_PASSPIDFD, "SO_PASSPIDFD", INT),
    Opt(libc::SOL_SOCKET, SO_PASSRIGHTS, "SO_PASSRIGHTS", INT),
];

/// Saves the options of `list` the socket supports.
pub(super) fn save_opts(sock: &OwnedFd, lists: &[&[Opt]], out: &mut Vec<pb::SockOpt>) {
    for Opt(level, name, label, len) in lists.iter().flat_map(|l| l.iter()) {
        match fd_socket::getsockopt(sock, *level, *name, *len) {
            Ok(value) => out.push(pb::SockOpt { level: *level, name: *name, value }),
            Err(e) => tracing::debug!(option = label, error = %e, "socket option not saved"),
        }
    }
}

fn label(o: &pb::SockOpt) -> String {
    let lists = [
        SOCKET_OPTS,
        UNIX_OPTS,
        inet::TCP_OPTS,
        inet::UDP_OPTS,
        inet::IP_OPTS,
        inet::IP_MCAST_OPTS,
        inet::IPV6_OPTS,
        inet::IPV6_MCAST_OPTS,
        inet::INET_OPTS,
        inet::RAW_OPTS,
        netlink::NETLINK_OPTS,
    ];
    for l in lists {
        if let Some(Opt(_, _, name, _)) = l.iter().find(|Opt(lv, n, _, _)| *lv == o.level && *n == o.name) {
            return (*name).to_string();
        }
    }
    format!("option {}/{}", o.level, o.name)
}

fn int_of(v: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

/// Gives a fresh socket the saved options where they differ from its own.
pub(super) fn apply_opts(sock: &OwnedFd, opts: &[pb::SockOpt]) -> Result<(), String> {
    for o in opts {
        let now = fd_socket::getsockopt(sock, o.level, o.name, o.value.len().max(INT)).unwrap_or_default();
        if now == o.value {
            continue;
        }
        let buffer = o.level == libc::SOL_SOCKET && (o.name == libc::SO_RCVBUF || o.name == libc::SO_SNDBUF);
        if buffer {
            // The kernel doubles what is set (room for its bookkeeping).
            let want = int_of(&o.value).unwrap_or(0);
            let force = if o.name == libc::SO_RCVBUF { libc::SO_RCVBUFFORCE } else { libc::SO_SNDBUFFORCE };
            let _ = fd_socket::setsockopt_int(sock, o.level, o.name, want / 2);
            if fd_socket::getsockopt_int(sock, o.level, o.name).ok() != Some(want) {
                let _ = fd_socket::setsockopt_int(sock, o.level, force, want / 2);
            }
            continue;
        }
        fd_socket::setsockopt(sock, o.level, o.name, &o.value).map_err(|e| {
            let shown = int_of(&o.value).filter(|_| o.value.len() == INT).map(|v| format!("={v}")).unwrap_or_default();
            format!("cannot set {}{shown} ({e})", label(o))
        })?;
    }
    Ok(())
}

/// Whether the saved options hold `name` at `level` with a non-zero int value.
pub(super) fn opt_on(opts: &[pb::SockOpt], level: i32, name: i32) -> bool {
    opts.iter().any(|o| o.level == level && o.name == name && int_of(&o.value).is_some_and(|v| v != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_ino("socket:[12345]"), Some(12345));
        assert_eq!(socket_ino("pipe:[1]"), None);
        assert_eq!(socket_ino("socket:[x]"), None);
    }

    #[test]
    fn options_round_trip_onto_a_fresh_socket() {
        let a = fd_socket::socket(libc::AF_INET, libc::SOCK_STREAM, 0).expect("socket");
        fd_socket::setsockopt_int(&a, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).expect("reuseaddr");
        fd_socket::setsockopt_int(&a, libc::SOL_SOCKET, libc::SO_RCVBUF, 50_000).expect("rcvbuf");
        fd_socket::setsockopt_int(&a, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1).expect("nodelay");
        let mut opts = Vec::new();
        save_opts(&a, &[SOCKET_OPTS, inet::INET_OPTS, inet::TCP_OPTS], &mut opts);
        assert!(opt_on(&opts, libc::SOL_SOCKET, libc::SO_REUSEADDR));
        let b = fd_socket::socket(libc::AF_INET, libc::SOCK_STREAM, 0).expect("socket");
        apply_opts(&b, &opts).expect("apply");
        for o in &opts {
            let got = fd_socket::getsockopt(&b, o.level, o.name, o.value.len().max(INT)).expect("get");
            assert_eq!(got, o.value, "{}", label(o));
        }
    }
}
