//! Raw syscalls for the memfd descriptor kinds (see fdkinds/).
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// memfd_create(2) with close-on-exec.
pub fn memfd_create(name: &str, allow_sealing: bool) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut flags = libc::MFD_CLOEXEC;
    if allow_sealing {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let r = unsafe { libc::memfd_create(c.as_ptr(), flags) };
    cvt(r as libc::c_long)?;
    // SAFETY: memfd_create succeeded, so `r` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// The seals of a memfd (F_GET_SEALS).
pub fn get_seals(fd: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: F_GET_SEALS takes no argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    cvt(r as libc::c_long).map(|v| v as u32)
}

/// Adds seals to a memfd (F_ADD_SEALS).
pub fn add_seals(fd: &impl AsRawFd, seals: u32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an integer argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) };
    cvt(r as libc::c_long).map(drop)
}
