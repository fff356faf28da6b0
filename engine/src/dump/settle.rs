//! States that pass, found right after a freeze: a connection still being
//! set up, messages or events waiting in a netlink socket, an inotify
//! descriptor, a ping or raw socket, or in a UDP socket that asks for
//! ancillary data with each datagram. None of them can be checkpointed as
//! it is, but each goes away once the process runs a little: the freeze
//! lets the tree run briefly while any is found ([`super::close_listeners`]),
//! and the dump refuses, with its precise message, only what is still there
//! after that.
use crate::procfs;
use crate::sys::{fd_epoll, task};

/// What passing states the processes `pids` hold, one line each.
pub(crate) fn passing_states(pids: &[i32]) -> Vec<String> {
    let mut out = Vec::new();
    for &pid in pids {
        let Ok(pidfd) = task::pidfd_open(pid) else { continue };
        let Ok(fds) = std::fs::read_dir(procfs::path(pid, "fd")) else { continue };
        for e in fds.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(link) = std::fs::read_link(e.path()) else { continue };
            let link = link.to_string_lossy();
            let state = if link.starts_with("socket:[") {
                let ino = link.trim_start_matches("socket:[").trim_end_matches(']').parse().unwrap_or(0);
                task::pidfd_getfd(&pidfd, fd).ok().and_then(|s| crate::fdkinds::socket::passing_state(&s, ino))
            } else if link == "anon_inode:inotify" {
                let queued = task::pidfd_getfd(&pidfd, fd).ok().and_then(|i| fd_epoll::bytes_queued(&i).ok());
                queued.filter(|q| *q > 0).map(|q| format!("{q} bytes of inotify events waiting"))
            } else {
                None
            };
            if let Some(s) = state {
                out.push(format!("process {pid} fd {fd}: {s}"));
            }
        }
    }
    out
}
