//! Descriptor kinds beyond plain files and pipes, one module each. Every
//! module has the same two entry points:
//!
//! * `dump(ctx, desc)` fills the kind-specific part of a [`pb::FileDesc`]
//!   from a descriptor of a stopped process, or returns a refusal message
//!   (it becomes "cannot dump pid P: fd N (link): message");
//! * `restore(desc, ctx)` creates an equivalent open file description in
//!   floe's own process; floe then hands it to the restored processes.
use crate::image::ImageReader;
use crate::procfs::FdInfo;
use floe_proto::image as pb;
use std::collections::HashMap;
use std::os::fd::OwnedFd;

pub mod epoll;
pub mod eventfd;
pub mod inotify;
pub mod memfd;
pub mod signalfd;
pub mod socket;
pub mod timerfd;

/// What a kind's `dump` gets to look at.
pub struct DumpCtx<'a> {
    pub pid: i32,
    pub fd: i32,
    /// readlink of /proc/PID/fd/FD, e.g. "anon_inode:[eventfd]", "socket:[123]".
    pub link: &'a str,
    pub info: &'a FdInfo,
    /// Full text of /proc/PID/fdinfo/FD (kind-specific lines live here).
    pub fdinfo: &'a str,
    /// Saved byte strings (file contents, queued data); push and record the index.
    pub blobs: &'a mut Vec<Vec<u8>>,
    /// --ext-unix-sk: datagram unix sockets may be connected outside the tree.
    pub ext_unix_sk: bool,
    /// --tcp-established: established TCP connections are dumped with TCP_REPAIR.
    pub tcp_established: bool,
    /// Sockets left in TCP repair mode by this dump (see [`socket::Repaired`]).
    pub repaired: &'a mut socket::Repaired,
    /// The descriptors are only checked now (a migration's first pass) and
    /// read again at the final freeze: states that pass (connections
    /// waiting to be accepted, messages waiting to be read) are let through.
    pub passing_ok: bool,
}

/// What a kind's `restore` gets.
pub struct RestoreCtx<'a> {
    pub img: &'a ImageReader,
    /// Descriptions already opened, by index in Manifest.files (epoll targets).
    pub opened: &'a [Option<OwnedFd>],
    /// Scratch space shared across calls (e.g. the other end of a socket pair), keyed by the module.
    pub stash: &'a mut HashMap<String, OwnedFd>,
    /// Shared memory objects already created for mappings, by shmem inode.
    pub shm: &'a HashMap<u64, OwnedFd>,
    /// --tcp-close: established TCP connections come back closed.
    pub tcp_close: bool,
    /// Keep restored connections in repair mode (silent) until the tree is
    /// released (live migration: until the source commits).
    pub tcp_hold: bool,
    /// Connections held in repair mode, released by the caller.
    pub held: &'a mut Vec<socket::HeldConn>,
}

/// Which kind a descriptor link names, if one of this module's.
pub fn kind_of(link: &str) -> Option<pb::FdKind> {
    Some(match link {
        "anon_inode:[eventfd]" => pb::FdKind::Eventfd,
        "anon_inode:[signalfd]" => pb::FdKind::Signalfd,
        "anon_inode:[timerfd]" => pb::FdKind::Timerfd,
        "anon_inode:[eventpoll]" => pb::FdKind::Epoll,
        "anon_inode:inotify" => pb::FdKind::Inotify,
        l if l.starts_with("/memfd:") => pb::FdKind::Memfd,
        l if l.starts_with("socket:") => pb::FdKind::UnixSocket, // refined by socket::dump
        _ => return None,
    })
}

/// Dispatches to the kind's dump.
pub fn dump(kind: pb::FdKind, ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    d.kind = kind as i32;
    match kind {
        pb::FdKind::Eventfd => eventfd::dump(ctx, d),
        pb::FdKind::Signalfd => signalfd::dump(ctx, d),
        pb::FdKind::Timerfd => timerfd::dump(ctx, d),
        pb::FdKind::Epoll => epoll::dump(ctx, d),
        pb::FdKind::Inotify => inotify::dump(ctx, d),
        pb::FdKind::Memfd => memfd::dump(ctx, d),
        pb::FdKind::UnixSocket | pb::FdKind::InetSocket | pb::FdKind::NetlinkSocket => socket::dump(ctx, d),
        _ => Err("this kind of descriptor is not supported".into()),
    }
}

/// Whether descriptions of this kind must be opened after all others.
pub fn restore_last(kind: pb::FdKind) -> bool {
    kind == pb::FdKind::Epoll
}

/// Dispatches to the kind's restore.
pub fn restore(kind: pb::FdKind, d: &pb::FileDesc, ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    match kind {
        pb::FdKind::Eventfd => eventfd::restore(d, ctx),
        pb::FdKind::Signalfd => signalfd::restore(d, ctx),
        pb::FdKind::Timerfd => timerfd::restore(d, ctx),
        pb::FdKind::Epoll => epoll::restore(d, ctx),
        pb::FdKind::Inotify => inotify::restore(d, ctx),
        pb::FdKind::Memfd => memfd::restore(d, ctx),
        pb::FdKind::UnixSocket | pb::FdKind::InetSocket | pb::FdKind::NetlinkSocket => socket::restore(d, ctx),
        _ => Err("this kind of descriptor cannot be restored".into()),
    }
}

/// After a process's descriptors are collected: epoll registrations name
/// descriptor numbers; turn them into description indices.
pub fn resolve_epoll(d: &mut pb::FileDesc, refs: &[pb::FdRef]) -> Result<(), String> {
    if let Some(ep) = d.epoll.as_mut() {
        for item in &mut ep.items {
            let r = refs
                .iter()
                .find(|r| r.fd == item.tfd)
                .ok_or_else(|| format!("epoll watches fd {} which is no longer open under that number", item.tfd))?;
            item.file = r.file;
        }
    }
    Ok(())
}
