//! States that pass, found right after a freeze: a connection still being
//! set up, messages or events waiting in a netlink socket, an inotify
//! descriptor, a ping or raw socket, or in a UDP socket that asks for
//! ancillary data with each datagram. None of them can be checkpointed as
//! it is, but each goes away once the process runs a little: the freeze
//! lets the tree run briefly while any is found ([`super::close_listeners`]),
//! and the dump refuses, with its precise message, only what is still there
//! after that.
use crate::fdkinds::socket::{self, AtFreeze};
use crate::procfs;
use crate::sys::{fd_epoll, task};
use std::os::fd::OwnedFd;

/// What the freeze finds in the descriptors of `pids`, in one walk.
#[derive(Default)]
pub(crate) struct Found {
    /// TCP listeners (dups of the processes' descriptors).
    pub listeners: Vec<OwnedFd>,
    /// States that pass, one line each.
    pub passing: Vec<String>,
}

/// Walks the descriptors of `pids` for TCP listeners and states that pass.
pub(crate) fn scan(pids: &[i32]) -> Found {
    let mut out = Found::default();
    for &pid in pids {
        let Ok(pidfd) = task::pidfd_open(pid) else { continue };
        let Ok(fds) = std::fs::read_dir(procfs::path(pid, "fd")) else { continue };
        for e in fds.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(link) = std::fs::read_link(e.path()) else { continue };
            let link = link.to_string_lossy();
            let state = if let Some(ino) = link.strip_prefix("socket:[").and_then(|l| l.strip_suffix(']')) {
                let Ok(sock) = task::pidfd_getfd(&pidfd, fd) else { continue };
                match socket::at_freeze(&sock, ino.parse().unwrap_or(0)) {
                    AtFreeze::Listener => {
                        out.listeners.push(sock);
                        None
                    }
                    AtFreeze::Passing(what) => Some(what),
                    AtFreeze::Other => None,
                }
            } else if link == "anon_inode:inotify" {
                let queued = task::pidfd_getfd(&pidfd, fd).ok().and_then(|i| fd_epoll::bytes_queued(&i).ok());
                queued.filter(|q| *q > 0).map(|q| format!("{q} bytes of inotify events waiting"))
            } else {
                None
            };
            if let Some(s) = state {
                out.passing.push(format!("process {pid} fd {fd}: {s}"));
            }
        }
    }
    out
}
