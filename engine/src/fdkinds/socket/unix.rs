//! AF_UNIX sockets (stream, datagram, seqpacket).
//!
//! Dump reads the socket's name (getsockname), its peer, state, queue
//! lengths and shutdown bits (NETLINK_SOCK_DIAG unix_diag), its options,
//! and the data waiting in its receive queue with MSG_PEEK (SO_PEEK_OFF
//! walks the queue; message boundaries are kept for datagram and seqpacket
//! sockets). Refused: a peer held by a process outside the dumped tree
//! (with --ext-unix-sk, a datagram socket connected to a named outside
//! peer is reconnected by name instead), connections not accepted yet,
//! descriptors in flight (SCM_RIGHTS), out-of-band data, a bound socket
//! file that was removed or replaced, and queued datagrams from a named
//! sender other than the peer (their sender address would be lost).
//!
//! Restore creates every socket of a connection together, the first time
//! one of its ends is restored, and keeps the other end in the stash until
//! its own turn:
//! * a stream/seqpacket pair whose one end came from accept(2) on a
//!   listener of the image: the client connects to the restored listener
//!   and the listener accepts (both ends keep their names);
//! * any other pair: socketpair(2), with names bound afterwards;
//! * a peer that was closed: a socketpair whose other end is closed again
//!   once the queue is refilled;
//! * a datagram socket connected to a named one: connect(2) by name.
//!
//! Each end's receive queue is refilled by sending its saved bytes (or
//! messages) from its peer. Filesystem names are bound at the same path,
//! after removing the stale socket file the dead process left behind (only
//! a socket file nothing listens on), and get the saved mode and owner.
use super::{apply_opts, dumped_tree, holder, save_opts, Holder, SOCKET_OPTS, UNIX_OPTS};
use crate::fdkinds::{DumpCtx, RestoreCtx};
use crate::procfs;
use crate::sys::fd_socket;
use floe_proto::image as pb;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// unix_diag states.
const ST_CONNECTED: u32 = 1;
const ST_LISTEN: u32 = 10;
const RCV_SHUTDOWN: u32 = 1;
const SEND_SHUTDOWN: u32 = 2;
/// /proc/net/unix flag of a listening socket (__SO_ACCEPTCON).
const ACCEPTCON: u32 = 0x10000;
/// Peeks at most this many messages of one queue.
const MAX_MESSAGES: usize = 1 << 20;

fn type_name(ty: i32) -> &'static str {
    match ty {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown",
    }
}

/// A name for messages: "/run/x.sock", "@abstract", "(unnamed)".
fn show_name(name: &[u8]) -> String {
    match name.first() {
        None => "(unnamed)".into(),
        Some(0) => format!("@{}", String::from_utf8_lossy(&name[1..]).replace('\0', "@")),
        Some(_) => String::from_utf8_lossy(name).into_owned(),
    }
}

/// sun_path bytes of a raw sockaddr_un, without the trailing NULs of a
/// filesystem name.
fn name_of(raw: &[u8]) -> Vec<u8> {
    let mut n = raw.get(2..).unwrap_or(&[]).to_vec();
    if n.first().is_some_and(|b| *b != 0) {
        while n.last() == Some(&0) {
            n.pop();
        }
    }
    n
}

/// A raw sockaddr_un for `path` bytes (filesystem names get their NUL).
fn sockaddr(path: &[u8]) -> Vec<u8> {
    let mut raw = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    raw.extend_from_slice(path);
    if path.first().is_some_and(|b| *b != 0) {
        raw.push(0);
    }
    raw
}

// ---------------------------------------------------------------------------
// dump

pub fn dump(ctx: &mut DumpCtx, ino: u64, sock: &OwnedFd, d: &mut pb::FileDesc) -> Result<(), String> {
    let ty = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| format!("cannot read its type ({e})"))?;
    if !matches!(ty, libc::SOCK_STREAM | libc::SOCK_DGRAM | libc::SOCK_SEQPACKET) {
        return Err(format!("unix sockets of type {ty} are not supported"));
    }
    let diag = fd_socket::unix_diag(ino)
        .map_err(|e| format!("cannot query the kernel about it (unix_diag: {e})"))?
        .ok_or("the kernel's unix_diag does not know this socket")?;
    let name = name_of(&fd_socket::getsockname(sock).map_err(|e| format!("cannot read its name ({e})"))?);
    let mut u = pb::UnixSocket {
        r#type: ty,
        ino,
        state: diag.state as u32,
        name: name.clone(),
        shutdown: diag.shutdown as u32,
        peek_off: -1,
        ..Default::default()
    };
    let stream = ty != libc::SOCK_DGRAM;
    let connected_stream = stream && u.state == ST_CONNECTED;
    if connected_stream && !name.is_empty() {
        u.accepted_from = listener_named(&name, ty, ino).unwrap_or(0);
    }
    if name.first().is_some_and(|b| *b != 0) {
        match resolve_path(ctx.pid, &name, diag.vfs) {
            Ok((path, meta)) => {
                u.bind_path = path.to_string_lossy().into_owned();
                u.file_mode = meta.mode();
                u.file_uid = meta.uid();
                u.file_gid = meta.gid();
            }
            // A connected stream socket's name is not rebound (an accepted
            // socket shares its listener's); only the others need the file.
            Err(_) if connected_stream => {}
            Err(e) => return Err(e),
        }
    }

    if u.state == ST_LISTEN {
        let (pending, backlog) = diag.rqlen.unwrap_or((0, 0));
        if pending > 0 || !diag.icons.is_empty() {
            let from: Vec<String> = diag.icons.iter().map(|i| format!("socket:[{i}]")).collect();
            return Err(format!(
                "unix listener {} has {} connection(s) waiting to be accepted (from {}); connections not yet \
                 accepted cannot be checkpointed",
                show_name(&name),
                pending.max(diag.icons.len() as u32),
                if from.is_empty() { "?".into() } else { from.join(", ") }
            ));
        }
        u.backlog = backlog;
    } else if let Some(peer) = diag.peer {
        check_peer(ctx.pid, &mut u, peer, sock, ctx.ext_unix_sk)?;
    }

    // An unconnected seqpacket socket has no queue (and cannot be read).
    if u.state != ST_LISTEN && (ty != libc::SOCK_SEQPACKET || u.state == ST_CONNECTED) {
        save_queue(ctx, sock, &mut u, diag.rqlen.map(|r| r.0).unwrap_or(0))?;
    }
    save_opts(sock, &[SOCKET_OPTS, UNIX_OPTS], &mut u.opts);
    d.unix_socket = Some(u);
    Ok(())
}

/// Records the peer, or refuses when it cannot be restored with the socket.
fn check_peer(pid: i32, u: &mut pb::UnixSocket, peer: u32, sock: &OwnedFd, ext_unix_sk: bool) -> Result<(), String> {
    let me = format!("socket:[{}]", u.ino);
    let stream = u.r#type != libc::SOCK_DGRAM;
    if peer == 0 {
        if stream && u.state == ST_CONNECTED && u.shutdown != RCV_SHUTDOWN | SEND_SHUTDOWN {
            let to = fd_socket::getpeername(sock).map(|r| show_name(&name_of(&r))).unwrap_or_else(|_| "?".into());
            return Err(format!(
                "its connection to {to} has not been accepted yet; connections not yet accepted cannot be \
                 checkpointed"
            ));
        }
        // The peer was closed (a stream socket then has both directions shut down).
        u.peer_dead = true;
        return Ok(());
    }
    let tree = dumped_tree(pid);
    match holder(peer as u64, &tree) {
        Holder::Tree => {
            u.peer_ino = peer as u64;
            Ok(())
        }
        Holder::Outside(other) => {
            let to = fd_socket::getpeername(sock).map(|r| name_of(&r)).unwrap_or_default();
            let via = if to.is_empty() { String::new() } else { format!(" ({})", show_name(&to)) };
            if ext_unix_sk && !stream && !to.is_empty() {
                // Reconnected by name on restore (e.g. /dev/log).
                u.ext_peer = to;
                return Ok(());
            }
            let hint = if !ext_unix_sk {
                "pass --ext-unix-sk to reconnect a datagram socket to a named peer outside the tree"
            } else if stream {
                "--ext-unix-sk covers datagram sockets only: a stream connection cannot be re-established \
                 with a process that is not restored"
            } else {
                "--ext-unix-sk needs a named peer to reconnect to, and this one has no name"
            };
            Err(format!(
                "{me} is connected to socket:[{peer}]{via}, held by process {} outside the dumped tree; {hint}",
                procfs::describe(other)
            ))
        }
        Holder::Nobody => Err(format!(
            "{me} is connected to socket:[{peer}], which no process holds (is it in flight in an SCM_RIGHTS \
             message?); it cannot be checkpointed"
        )),
    }
}

/// A listening socket of type `ty` (other than `ino`) bound to `name`, from
/// /proc/net/unix: the listener an accepted socket came from.
fn listener_named(name: &[u8], ty: i32, ino: u64) -> Option<u64> {
    let text = std::fs::read("/proc/net/unix").ok()?;
    // /proc/net/unix shows abstract names with '@' for every NUL.
    let want: Vec<u8> = name.iter().map(|b| if *b == 0 { b'@' } else { *b }).collect();
    for line in text.split(|b| *b == b'\n').skip(1) {
        let f: Vec<&[u8]> = line.splitn(8, |b| *b == b' ').collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok();
        let (Some(flags), Some(t)) = (hex(f[3]), hex(f[4])) else { continue };
        let Some(i) = std::str::from_utf8(f[6]).ok().and_then(|s| s.parse::<u64>().ok()) else { continue };
        if flags & ACCEPTCON != 0 && t as i32 == ty && i != ino && f[7] == want.as_slice() {
            return Some(i);
        }
    }
    None
}

/// Linux's kernel-internal dev_t (unix_diag) to (major, minor).
fn kdev(dev: u32) -> (u64, u64) {
    ((dev >> 20) as u64, (dev & 0xfffff) as u64)
}

/// A stat(2) st_dev to (major, minor).
fn udev(dev: u64) -> (u64, u64) {
    (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff))
}

/// Where a filesystem name lives as seen from floe, checked against the
/// socket file's identity.
fn resolve_path(pid: i32, name: &[u8], vfs: Option<(u32, u32)>) -> Result<(PathBuf, std::fs::Metadata), String> {
    let p = Path::new(OsStr::from_bytes(name));
    let full = if p.is_absolute() {
        let root = procfs::readlink(pid, "root").unwrap_or_else(|_| "/".into());
        if root == "/" {
            p.to_path_buf()
        } else {
            Path::new(&root).join(p.strip_prefix("/").unwrap_or(p))
        }
    } else {
        let cwd = procfs::readlink(pid, "cwd").map_err(|e| format!("cannot read its working directory ({e})"))?;
        Path::new(&cwd).join(p)
    };
    let gone = || {
        format!(
            "it is bound to {} but that socket file was removed or replaced; this version cannot restore it",
            show_name(name)
        )
    };
    let meta = std::fs::metadata(&full).map_err(|_| gone())?;
    if !meta.file_type().is_socket() {
        return Err(gone());
    }
    if let Some((vino, vdev)) = vfs {
        if meta.ino() != vino as u64 || udev(meta.dev()) != kdev(vdev) {
            return Err(gone());
        }
    }
    if full.as_os_str().len() >= 108 {
        return Err(format!("its socket file {} has a path too long to bind again", full.display()));
    }
    Ok((full, meta))
}

/// Saves the receive queue without consuming it.
fn save_queue(ctx: &mut DumpCtx, sock: &OwnedFd, u: &mut pb::UnixSocket, queued: u32) -> Result<(), String> {
    let stream = u.r#type == libc::SOCK_STREAM;
    if stream {
        // Out-of-band byte (MSG_OOB) waiting: not supported.
        let mut one = [0u8; 1];
        if fd_socket::peek(sock, &mut one, libc::MSG_OOB).is_ok() {
            return Err("it has out-of-band data (MSG_OOB) waiting; this cannot be checkpointed yet".into());
        }
        if queued == 0 {
            u.peek_off = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(-1);
            return Ok(());
        }
    }
    let orig = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF)
        .map_err(|e| format!("cannot read SO_PEEK_OFF ({e})"))?;
    u.peek_off = orig;
    let result = if stream { peek_stream(sock, queued as usize) } else { peek_messages(sock, u) };
    // Put the process's own peek offset back, whatever happened.
    let _ = fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, orig);
    let (data, sizes) = result?;
    if !data.is_empty() || !sizes.is_empty() {
        u.queue_blob = Some(ctx.blobs.len() as i32);
        u.queue_sizes = sizes;
        ctx.blobs.push(data);
    }
    Ok(())
}

fn in_flight() -> String {
    "descriptors are in flight in its receive queue (SCM_RIGHTS); this cannot be checkpointed yet".into()
}

fn set_peek_off(sock: &OwnedFd, off: usize) -> Result<(), String> {
    let off = i32::try_from(off).map_err(|_| "its receive queue is too large to read")?;
    fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, off)
        .map_err(|e| format!("cannot set SO_PEEK_OFF to walk its receive queue ({e})"))
}

/// All `total` bytes of a stream socket's queue.
fn peek_stream(sock: &OwnedFd, total: usize) -> Result<(Vec<u8>, Vec<u32>), String> {
    set_peek_off(sock, 0)?;
    let mut data = vec![0u8; total];
    let mut got = 0;
    while got < total {
        match fd_socket::peek(sock, &mut data[got..], 0) {
            Ok(p) if p.passed_fds > 0 || p.control_truncated => return Err(in_flight()),
            Ok(p) if p.len == 0 => break,
            Ok(p) => got += p.len,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => return Err(format!("cannot read its queued data ({e})")),
        }
    }
    if got != total {
        return Err(format!("could read only {got} of the {total} bytes waiting in its receive queue"));
    }
    Ok((data, Vec::new()))
}

/// Every message of a datagram/seqpacket socket's queue, in order.
fn peek_messages(sock: &OwnedFd, u: &pb::UnixSocket) -> Result<(Vec<u8>, Vec<u32>), String> {
    let shut = u.shutdown & RCV_SHUTDOWN != 0;
    let mut data = Vec::new();
    let mut sizes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0usize;
    set_peek_off(sock, 0)?;
    while sizes.len() < MAX_MESSAGES {
        let p = match fd_socket::peek(sock, &mut buf, libc::MSG_TRUNC) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok((data, sizes)),
            Err(e) => return Err(format!("cannot read its queued messages ({e})")),
        };
        if p.passed_fds > 0 || p.control_truncated {
            return Err(in_flight());
        }
        if p.len > buf.len() {
            // Truncated: read the whole message again from its start.
            buf.resize(p.len, 0);
            set_peek_off(sock, off)?;
            continue;
        }
        // With the receive side shut down, an empty queue reads as 0 bytes
        // forever; a zero-length message is then indistinguishable.
        if p.len == 0 && shut {
            return Ok((data, sizes));
        }
        let sender = name_of(&p.name);
        if u.peer_ino == 0 && !u.peer_dead && !sender.is_empty() {
            return Err(format!(
                "a queued datagram from {} is waiting in its receive queue; its sender address cannot be \
                 restored yet",
                show_name(&sender)
            ));
        }
        data.extend_from_slice(&buf[..p.len]);
        sizes.push(p.len as u32);
        off += p.len;
    }
    Err(format!("its receive queue holds more than {MAX_MESSAGES} messages"))
}

// ---------------------------------------------------------------------------
// restore

fn key(ino: u64, stage: &str) -> String {
    format!("unix-sk:{ino}:{stage}")
}
/// Created, options set, bound (and listening): no peer, no data yet.
const BOUND: &str = "bound";
/// Fully restored: waits for its own restore call.
const READY: &str = "ready";

/// The image's unix socket with inode `ino`: (index in Manifest.files, state).
fn find<'a>(ctx: &RestoreCtx<'a>, ino: u64) -> Option<(usize, &'a pb::UnixSocket)> {
    let files: &'a [pb::FileDesc] = &ctx.img.manifest.files;
    files.iter().enumerate().find_map(|(i, f)| f.unix_socket.as_ref().filter(|u| u.ino == ino).map(|u| (i, u)))
}

fn who(u: &pb::UnixSocket) -> String {
    format!("unix {} socket:[{}] {}", type_name(u.r#type), u.ino, show_name(&u.name))
}

pub fn restore(d: &pb::FileDesc, ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let u = d.unix_socket.as_ref().ok_or("the image has no socket state for this descriptor")?;
    if let Some(fd) = ctx.stash.remove(&key(u.ino, READY)) {
        return Ok(fd);
    }
    let own = if u.state == ST_LISTEN {
        take_or_create(ctx, u)?
    } else if u.r#type != libc::SOCK_DGRAM {
        if u.peer_ino != 0 || u.peer_dead {
            return pair(ctx, u);
        }
        take_or_create(ctx, u)?
    } else if !u.ext_peer.is_empty() {
        // --ext-unix-sk: reconnect to the outside peer by name.
        let own = take_or_create(ctx, u)?;
        let target = sockaddr(&u.ext_peer);
        fd_socket::connect(&own, &target).map_err(|e| {
            format!("cannot reconnect to the external peer {} ({e}); is it running here?", show_name(&u.ext_peer))
        })?;
        own
    } else if u.peer_ino == u.ino {
        // A datagram socket connected to its own name.
        let own = take_or_create(ctx, u)?;
        let addr = bind_addr(u).ok_or_else(|| format!("{}: connected to itself but unnamed", who(u)))?;
        fd_socket::connect(&own, &addr).map_err(|e| format!("cannot connect {} to itself ({e})", who(u)))?;
        refill(ctx, &own, Some(&addr), u)?;
        own
    } else if u.peer_ino != 0 {
        let (_, p) = find(ctx, u.peer_ino)
            .ok_or_else(|| format!("{}: its peer socket:[{}] is missing from the image", who(u), u.peer_ino))?;
        if p.peer_ino == u.ino && (bind_addr(u).is_none() || bind_addr(p).is_none()) {
            return pair(ctx, u);
        }
        let own = take_or_create(ctx, u)?;
        let (peer, back) = hold(ctx, p)?;
        let target = bind_addr(p).ok_or_else(|| format!("{}: its peer has no name to connect to", who(u)))?;
        let done = fd_socket::connect(&own, &target)
            .map_err(|e| format!("cannot connect to its peer {} ({e})", show_name(&p.name)))
            .and_then(|()| refill(ctx, &peer, bind_addr(u).as_deref(), u));
        release(ctx, peer, back);
        done?;
        own
    } else if u.peer_dead {
        return pair(ctx, u);
    } else {
        let own = take_or_create(ctx, u)?;
        refill_from_strangers(ctx, u)?;
        own
    };
    finish(&own, u)?;
    Ok(own)
}

/// The address to bind `u` to (None: it stays unnamed).
fn bind_addr(u: &pb::UnixSocket) -> Option<Vec<u8>> {
    match u.name.first() {
        None => None,
        Some(0) => Some(sockaddr(&u.name)),
        Some(_) if u.bind_path.is_empty() => None,
        Some(_) => Some(sockaddr(u.bind_path.as_bytes())),
    }
}

/// Takes `u` from the stash if another socket's restore created it, else creates it.
fn take_or_create(ctx: &mut RestoreCtx, u: &pb::UnixSocket) -> Result<OwnedFd, String> {
    match ctx.stash.remove(&key(u.ino, BOUND)) {
        Some(fd) => Ok(fd),
        None => create(u, true),
    }
}

/// A new socket for `u`: options, and with `named` its name (and listen).
fn create(u: &pb::UnixSocket, named: bool) -> Result<OwnedFd, String> {
    let sock = fd_socket::socket(libc::AF_UNIX, u.r#type, 0).map_err(|e| format!("cannot create {} ({e})", who(u)))?;
    apply_opts(&sock, &u.opts).map_err(|e| format!("{}: {e}", who(u)))?;
    if named {
        bind_name(&sock, u)?;
    }
    if u.state == ST_LISTEN {
        fd_socket::listen(&sock, u.backlog as i32).map_err(|e| format!("cannot listen on {} ({e})", who(u)))?;
    }
    Ok(sock)
}

/// Binds `sock` to `u`'s name: the same abstract name, or the same path
/// after removing a stale socket file there (with the file's mode and owner).
fn bind_name(sock: &OwnedFd, u: &pb::UnixSocket) -> Result<(), String> {
    let Some(addr) = bind_addr(u) else { return Ok(()) };
    let path = (!u.bind_path.is_empty() && u.name.first() != Some(&0)).then(|| PathBuf::from(&u.bind_path));
    if let Some(p) = &path {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_socket() => {
                if fd_socket::unix_address_live(&addr, u.r#type).unwrap_or(false) {
                    return Err(format!("cannot bind {}: a live socket already answers at {}", who(u), p.display()));
                }
                std::fs::remove_file(p)
                    .map_err(|e| format!("cannot remove the stale socket file {} ({e})", p.display()))?;
            }
            Ok(_) => {
                return Err(format!("cannot bind {}: {} exists and is not a socket", who(u), p.display()));
            }
            Err(_) => {}
        }
    }
    fd_socket::bind(sock, &addr).map_err(|e| format!("cannot bind {} ({e})", who(u)))?;
    if let Some(p) = &path {
        if u.file_mode != 0 {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(u.file_mode & 0o7777))
                .map_err(|e| format!("cannot set the mode of {} ({e})", p.display()))?;
            std::os::unix::fs::chown(p, Some(u.file_uid), Some(u.file_gid))
                .map_err(|e| format!("cannot set the owner of {} ({e})", p.display()))?;
        }
    }
    Ok(())
}

/// A descriptor of another socket of the image, created (bound) if it does
/// not exist yet. Give it back with [`release`].
fn hold(ctx: &mut RestoreCtx, u: &pb::UnixSocket) -> Result<(OwnedFd, Option<String>), String> {
    if let Some((idx, _)) = find(ctx, u.ino) {
        if let Some(Some(fd)) = ctx.opened.get(idx) {
            let dup = fd.try_clone().map_err(|e| format!("cannot duplicate {} ({e})", who(u)))?;
            return Ok((dup, None));
        }
    }
    for stage in [READY, BOUND] {
        let k = key(u.ino, stage);
        if let Some(fd) = ctx.stash.remove(&k) {
            return Ok((fd, Some(k)));
        }
    }
    Ok((create(u, true)?, Some(key(u.ino, BOUND))))
}

fn release(ctx: &mut RestoreCtx, fd: OwnedFd, back: Option<String>) {
    if let Some(k) = back {
        ctx.stash.insert(k, fd);
    }
}

/// Whether `u` came from accept(2) on a listener the image holds.
fn listener_of<'a>(ctx: &RestoreCtx<'a>, u: &pb::UnixSocket) -> Option<&'a pb::UnixSocket> {
    if u.accepted_from == 0 {
        return None;
    }
    find(ctx, u.accepted_from).map(|(_, l)| l).filter(|l| l.state == ST_LISTEN && bind_addr(l).is_some())
}

/// Creates a connected pair: `u` and its peer (or, when the peer was
/// closed, a stand-in closed again at the end). Returns `u`'s end and
/// stashes the peer's.
fn pair(ctx: &mut RestoreCtx, u: &pb::UnixSocket) -> Result<OwnedFd, String> {
    let peer = if u.peer_ino != 0 {
        Some(
            find(ctx, u.peer_ino)
                .map(|(_, p)| p)
                .ok_or_else(|| format!("{}: its peer socket:[{}] is missing from the image", who(u), u.peer_ino))?,
        )
    } else {
        None
    };
    let stand_in = pb::UnixSocket { r#type: u.r#type, ino: 0, peek_off: -1, ..Default::default() };
    let p = peer.unwrap_or(&stand_in);
    let (own, other) = if let Some(l) = listener_of(ctx, u) {
        let client = create(p, false)?;
        let own = via_listener(ctx, l, &client, u)?;
        (own, client)
    } else if let Some(l) = listener_of(ctx, p) {
        let client = create(u, false)?;
        let other = via_listener(ctx, l, &client, p)?;
        (client, other)
    } else {
        let (a, b) = fd_socket::socketpair(u.r#type).map_err(|e| format!("cannot create a socket pair ({e})"))?;
        apply_opts(&a, &u.opts).map_err(|e| format!("{}: {e}", who(u)))?;
        apply_opts(&b, &p.opts).map_err(|e| format!("{}: {e}", who(p)))?;
        // Connected stream sockets keep their name only through their listener.
        if u.r#type == libc::SOCK_DGRAM {
            bind_name(&a, u)?;
            bind_name(&b, p)?;
        }
        (a, b)
    };
    refill(ctx, &other, None, u)?;
    if peer.is_some() {
        refill(ctx, &own, None, p)?;
    }
    finish(&own, u)?;
    match peer {
        Some(p) => {
            finish(&other, p)?;
            ctx.stash.insert(key(p.ino, READY), other);
        }
        None => drop(other),
    }
    Ok(own)
}

/// Connects `client` to listener `l` (restored, or created now) and accepts
/// the connection: the accepted end, which is `accepted`'s.
fn via_listener(
    ctx: &mut RestoreCtx,
    l: &pb::UnixSocket,
    client: &OwnedFd,
    accepted: &pb::UnixSocket,
) -> Result<OwnedFd, String> {
    let (lfd, back) = hold(ctx, l)?;
    let done = (|| {
        let addr = bind_addr(l).ok_or_else(|| format!("{} has no name to connect to", who(l)))?;
        fd_socket::connect(client, &addr).map_err(|e| format!("cannot connect to {} ({e})", who(l)))?;
        let s = fd_socket::accept(&lfd).map_err(|e| format!("cannot accept on {} ({e})", who(l)))?;
        apply_opts(&s, &accepted.opts).map_err(|e| format!("{}: {e}", who(accepted)))?;
        Ok(s)
    })();
    release(ctx, lfd, back);
    done
}

/// Sends `to`'s saved receive queue from `from` (to address `addr`, or to
/// `from`'s peer), keeping message boundaries.
fn refill(ctx: &RestoreCtx, from: &OwnedFd, addr: Option<&[u8]>, to: &pb::UnixSocket) -> Result<(), String> {
    let Some(blob) = to.queue_blob else { return Ok(()) };
    let data =
        ctx.img.read_blob(blob as usize).map_err(|e| format!("cannot read the queued data of {} ({e})", who(to)))?;
    let fail = |done: usize, e: std::io::Error| {
        format!("cannot refill the receive queue of {} ({} of {} bytes written: {e})", who(to), done, data.len())
    };
    if to.r#type == libc::SOCK_STREAM {
        let mut done = 0;
        while done < data.len() {
            done += fd_socket::send(from, &data[done..], addr).map_err(|e| fail(done, e))?;
        }
        return Ok(());
    }
    let mut at = 0usize;
    for &n in &to.queue_sizes {
        let msg =
            data.get(at..at + n as usize).ok_or_else(|| format!("{}: queued messages exceed their blob", who(to)))?;
        let sent = fd_socket::send(from, msg, addr).map_err(|e| fail(at, e))?;
        if sent != msg.len() {
            return Err(format!("{}: a queued message of {} bytes was cut to {sent}", who(to), msg.len()));
        }
        at += msg.len();
    }
    Ok(())
}

/// An unconnected named datagram socket's queue: its messages came from
/// unnamed senders; send them from fresh unnamed sockets (a new one when
/// the current one has too much in flight).
fn refill_from_strangers(ctx: &RestoreCtx, u: &pb::UnixSocket) -> Result<(), String> {
    let Some(blob) = u.queue_blob else { return Ok(()) };
    let addr = bind_addr(u).ok_or_else(|| format!("{}: queued messages but no name to send them to", who(u)))?;
    let data =
        ctx.img.read_blob(blob as usize).map_err(|e| format!("cannot read the queued data of {} ({e})", who(u)))?;
    let largest = u.queue_sizes.iter().copied().max().unwrap_or(0) as i32;
    let new_sender = || {
        let s = fd_socket::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0)
            .map_err(|e| format!("cannot create a socket to refill {} ({e})", who(u)))?;
        // Room for the largest message (the kernel checks the sender's buffer).
        let _ = fd_socket::setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, largest.saturating_add(4096));
        Ok::<OwnedFd, String>(s)
    };
    let mut sender = new_sender()?;
    let mut at = 0usize;
    for &n in &u.queue_sizes {
        let msg =
            data.get(at..at + n as usize).ok_or_else(|| format!("{}: queued messages exceed their blob", who(u)))?;
        let sent = match fd_socket::send(&sender, msg, Some(&addr)) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                sender = new_sender()?;
                fd_socket::send(&sender, msg, Some(&addr))
            }
            other => other,
        }
        .map_err(|e| {
            format!("cannot refill the receive queue of {} ({at} of {} bytes written: {e})", who(u), data.len())
        })?;
        if sent != msg.len() {
            return Err(format!("{}: a queued message of {} bytes was cut to {sent}", who(u), msg.len()));
        }
        at += msg.len();
    }
    Ok(())
}

/// Shutdown bits and peek offset, once the queues are refilled.
fn finish(sock: &OwnedFd, u: &pb::UnixSocket) -> Result<(), String> {
    let how = match u.shutdown & (RCV_SHUTDOWN | SEND_SHUTDOWN) {
        RCV_SHUTDOWN => Some(libc::SHUT_RD),
        SEND_SHUTDOWN => Some(libc::SHUT_WR),
        0 => None,
        _ => Some(libc::SHUT_RDWR),
    };
    // Closing a stream peer (the stand-in) shuts this end down completely.
    if let Some(how) = how.filter(|_| !(u.peer_dead && u.r#type != libc::SOCK_DGRAM)) {
        fd_socket::shutdown(sock, how).map_err(|e| format!("cannot shut down {} ({e})", who(u)))?;
    }
    if u.peek_off >= 0 {
        fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, u.peek_off)
            .map_err(|e| format!("cannot set SO_PEEK_OFF of {} ({e})", who(u)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(show_name(b""), "(unnamed)");
        assert_eq!(show_name(b"\0abc"), "@abc");
        assert_eq!(show_name(b"/tmp/x"), "/tmp/x");
        let raw = sockaddr(b"/tmp/x");
        assert_eq!(raw.len(), 2 + 6 + 1);
        assert_eq!(name_of(&raw), b"/tmp/x");
        assert_eq!(name_of(&sockaddr(b"\0ab")), b"\0ab");
        assert_eq!(name_of(&(libc::AF_UNIX as u16).to_ne_bytes()), b"");
    }

    #[test]
    fn peeks_stream_and_datagram_queues() {
        let (a, b) = fd_socket::socketpair(libc::SOCK_STREAM).expect("pair");
        for chunk in [&b"hello "[..], b"world", &[7u8; 3000]] {
            fd_socket::send(&a, chunk, None).expect("send");
        }
        let (data, sizes) = peek_stream(&b, 11 + 3000).expect("peek");
        assert!(sizes.is_empty());
        assert_eq!(&data[..11], b"hello world");
        // Nothing was consumed.
        let (again, _) = peek_stream(&b, 11 + 3000).expect("peek again");
        assert_eq!(again, data);

        let (a, b) = fd_socket::socketpair(libc::SOCK_DGRAM).expect("pair");
        let msgs: [&[u8]; 4] = [b"one", b"", &[1u8; 100_000], b"four"];
        for m in msgs {
            fd_socket::send(&a, m, None).expect("send");
        }
        let u = pb::UnixSocket { r#type: libc::SOCK_DGRAM, peer_ino: 1, ..Default::default() };
        let (data, sizes) = peek_messages(&b, &u).expect("peek");
        assert_eq!(sizes, vec![3, 0, 100_000, 4]);
        assert_eq!(data.len(), 100_007);
        assert_eq!(&data[data.len() - 4..], b"four");
    }
}
