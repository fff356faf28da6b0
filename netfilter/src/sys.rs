//! Every raw syscall of the crate, behind small safe functions.
//!
//! Nothing outside this module contains `unsafe`. Functions return
//! `std::io::Result` carrying the kernel's errno; callers add the operation
//! in [`crate::NetfilterError`].

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

// The kernel structures this module hands to the kernel by pointer.
const _: () = assert!(size_of::<libc::sockaddr_nl>() == 12);
const _: () = assert!(size_of::<libc::timeval>() == 2 * size_of::<libc::c_long>());
const _: () = assert!(size_of::<libc::sockaddr_in>() == 16);
const _: () = assert!(size_of::<libc::sockaddr_in6>() == 28);

/// A netlink socket address naming the kernel (port 0, no groups).
fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value
    // (and has to be, for its padding field).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

/// `socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, protocol)`.
///
/// The socket belongs to the calling thread's network namespace at the
/// time of the call, and stays there.
pub(crate) fn netlink_socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt(fd, level, name, &value, sizeof(int))`.
pub(crate) fn set_int_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points to a live c_int whose size is passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_RCVTIMEO`: a blocking receive fails with `EAGAIN` after `timeout`.
pub(crate) fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value points to a live timeval whose size is passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `sendto(fd, buf, 0, kernel)`: one datagram to the kernel; returns the
/// number of bytes sent.
pub(crate) fn send_to_kernel(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let addr = kernel_addr();
    loop {
        // SAFETY: buf is valid for buf.len() bytes and addr is a live
        // sockaddr_nl whose size is passed.
        let ret = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One received netlink datagram.
pub(crate) struct Received {
    /// Bytes stored in the buffer.
    pub(crate) len: usize,
    /// The datagram was longer than the buffer (and was cut).
    pub(crate) truncated: bool,
    /// Sender's netlink port id; 0 is the kernel.
    pub(crate) sender: u32,
}

/// `recvfrom(fd, buf, MSG_TRUNC)`: one datagram, blocking up to the
/// socket's receive timeout (`EAGAIN`/`EWOULDBLOCK` when it expires).
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv_flags(fd, buf, 0)
}

/// Like [`recv`] but never waits: `EAGAIN`/`EWOULDBLOCK` when nothing is queued.
pub(crate) fn recv_nowait(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT)
}

fn recv_flags(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    loop {
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut addr_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf is valid for writes of buf.len() bytes; addr and
        // addr_len are live and addr_len holds addr's size.
        let ret = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC | flags,
                (&mut addr as *mut libc::sockaddr_nl).cast(),
                &mut addr_len,
            )
        };
        if ret >= 0 {
            let full = ret as usize;
            return Ok(Received { len: full.min(buf.len()), truncated: full > buf.len(), sender: addr.nl_pid });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A raw socket that sends whole IP packets (`IPPROTO_RAW`, header
/// included), IPv6 if `v6`.
pub(crate) fn raw_socket(v6: bool) -> io::Result<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if v6 {
        // Implied by IPPROTO_RAW since Linux 4.5; explicit for clarity.
        set_int_opt(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, 1)?;
    }
    Ok(fd)
}

/// `sendto(fd, packet, 0, dst)`: one whole IP packet on a [`raw_socket`]
/// (the address only routes it; port 0).
pub(crate) fn send_raw(fd: BorrowedFd<'_>, packet: &[u8], dst: std::net::IpAddr) -> io::Result<()> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match dst {
        std::net::IpAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned
            // for a sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
            size_of::<libc::sockaddr_in>()
        }
        std::net::IpAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned
            // for a sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = v6.octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    loop {
        // SAFETY: packet is valid for packet.len() bytes; ss is a live
        // sockaddr of `len` bytes.
        let ret = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&ss as *const libc::sockaddr_storage).cast(),
                len as libc::socklen_t,
            )
        };
        if ret >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `if_nametoindex(name)`, in the calling thread's network namespace.
pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a live NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i)
}

/// `if_indextoname(index)`, in the calling thread's network namespace.
pub(crate) fn if_name(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}
