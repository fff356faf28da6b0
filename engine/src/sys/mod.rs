//! Every raw syscall and ioctl of the engine, behind small safe functions.
//!
//! Nothing outside this module contains `unsafe`. Functions return
//! `std::io::Result` carrying the kernel's errno; callers add context
//! (pid, address, path) in their own error types.
pub mod fd_epoll;
pub mod fd_event;
pub mod fd_memfd;
pub mod fd_socket;
pub mod memory;
pub mod probe;
pub mod ptrace;
pub mod syscall_watch;
pub mod task;
pub mod track;

use std::io;

/// Turns a `-1`-style libc return value into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
