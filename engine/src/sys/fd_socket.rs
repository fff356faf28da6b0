//! Raw syscalls for the socket descriptor kinds (see fdkinds/socket/):
//! creating, binding and connecting sockets, socket options, looking at
//! receive queues without consuming them, and the NETLINK_SOCK_DIAG
//! unix_diag query that tells a unix socket's peer, name and queue lengths.
//!
//! Socket addresses travel as raw bytes (a `struct sockaddr_*` exactly as
//! the kernel returns or takes it); fdkinds/socket/ builds and parses them.
//! Every descriptor created here is close-on-exec and non-blocking in floe;
//! the restored process gets its own status flags from the image.
use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Wraps a successful descriptor-returning call.
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = cvt(ret)?;
    // SAFETY: the call succeeded, so `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

const STORAGE_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();
const _: () = assert!(STORAGE_LEN == 128);

/// Copies a raw socket address into an aligned `sockaddr_storage`.
fn storage(addr: &[u8]) -> io::Result<(libc::sockaddr_storage, libc::socklen_t)> {
    if addr.len() > STORAGE_LEN {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: `ss` is STORAGE_LEN bytes long and `addr` at most that; the
    // regions cannot overlap (one is a fresh local).
    unsafe {
        std::ptr::copy_nonoverlapping(addr.as_ptr(), (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(), addr.len())
    };
    Ok((ss, addr.len() as libc::socklen_t))
}

/// The first `len` bytes of a `sockaddr_storage` the kernel filled in.
fn storage_bytes(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Vec<u8> {
    let len = (len as usize).min(STORAGE_LEN);
    // SAFETY: `ss` is a live sockaddr_storage of STORAGE_LEN bytes, and
    // `len` is clamped to that size.
    unsafe { std::slice::from_raw_parts((ss as *const libc::sockaddr_storage).cast::<u8>(), len) }.to_vec()
}

/// socket(domain, ty | SOCK_CLOEXEC | SOCK_NONBLOCK, protocol).
pub fn socket(domain: i32, ty: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new descriptor.
    let r = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, protocol) };
    owned(r as libc::c_long)
}

/// An AF_UNIX socketpair of type `ty`, both ends close-on-exec and non-blocking.
pub fn socketpair(ty: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r =
        unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
    cvt(r as libc::c_long)?;
    // SAFETY: socketpair succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// bind(2) to a raw socket address.
pub fn bind(fd: &impl AsRawFd, addr: &[u8]) -> io::Result<()> {
    let (ss, len) = storage(addr)?;
    // SAFETY: `ss` is a valid address buffer of at least `len` bytes.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) };
    cvt(r as libc::c_long).map(drop)
}

/// connect(2) to a raw socket address.
pub fn connect(fd: &impl AsRawFd, addr: &[u8]) -> io::Result<()> {
    let (ss, len) = storage(addr)?;
    // SAFETY: `ss` is a valid address buffer of at least `len` bytes.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) };
    cvt(r as libc::c_long).map(drop)
}

pub fn listen(fd: &impl AsRawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: listen takes integers only.
    let r = unsafe { libc::listen(fd.as_raw_fd(), backlog) };
    cvt(r as libc::c_long).map(drop)
}

/// accept4(2) without the peer address; the new socket is close-on-exec and non-blocking.
pub fn accept(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed and mean "don't report the peer".
    let r = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    owned(r as libc::c_long)
}

/// getsockname(2) as raw bytes.
pub fn getsockname(fd: &impl AsRawFd) -> io::Result<Vec<u8>> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = STORAGE_LEN as libc::socklen_t;
    // SAFETY: `ss` is writable for `len` bytes and `len` is a valid in/out pointer.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) };
    cvt(r as libc::c_long)?;
    Ok(storage_bytes(&ss, len))
}

/// getpeername(2) as raw bytes.
pub fn getpeername(fd: &impl AsRawFd) -> io::Result<Vec<u8>> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = STORAGE_LEN as libc::socklen_t;
    // SAFETY: `ss` is writable for `len` bytes and `len` is a valid in/out pointer.
    let r = unsafe { libc::getpeername(fd.as_raw_fd(), (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) };
    cvt(r as libc::c_long)?;
    Ok(storage_bytes(&ss, len))
}

/// shutdown(2) with SHUT_RD, SHUT_WR or SHUT_RDWR.
pub fn shutdown(fd: &impl AsRawFd, how: i32) -> io::Result<()> {
    // SAFETY: shutdown takes integers only.
    let r = unsafe { libc::shutdown(fd.as_raw_fd(), how) };
    cvt(r as libc::c_long).map(drop)
}

/// getsockopt(2) into a buffer of `max` bytes; returns what the kernel wrote.
pub fn getsockopt(fd: &impl AsRawFd, level: i32, name: i32, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; max];
    let mut len = max as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes and `len` is a valid in/out pointer.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut len) };
    cvt(r as libc::c_long)?;
    buf.truncate((len as usize).min(max));
    Ok(buf)
}

/// setsockopt(2) with a raw value.
pub fn setsockopt(fd: &impl AsRawFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is readable for its length for the duration of the call.
    let r =
        unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), value.len() as libc::socklen_t) };
    cvt(r as libc::c_long).map(drop)
}

/// An integer socket option.
pub fn getsockopt_int(fd: &impl AsRawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` is a writable int and `len` its size.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
    cvt(r as libc::c_long)?;
    Ok(v)
}

pub fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    setsockopt(fd, level, name, &value.to_ne_bytes())
}

/// Sends `data` without blocking and without SIGPIPE, to `addr` when given
/// (sendto) or to the connected peer. Returns the bytes accepted.
pub fn send(fd: &impl AsRawFd, data: &[u8], addr: Option<&[u8]>) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let r = match addr {
        Some(a) => {
            let (ss, len) = storage(a)?;
            // SAFETY: `data` is readable for its length and `ss` holds `len` address bytes.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    flags,
                    (&ss as *const libc::sockaddr_storage).cast(),
                    len,
                )
            }
        }
        // SAFETY: `data` is readable for its length.
        None => unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), flags) },
    };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// What one peek at a receive queue found.
#[derive(Debug, Default)]
pub struct Peeked {
    /// Bytes copied into the buffer, or with MSG_TRUNC the datagram's full length.
    pub len: usize,
    /// Address of the sender (datagram sockets; empty when unnamed).
    pub name: Vec<u8>,
    /// Descriptors the message carried with SCM_RIGHTS (they were installed
    /// in floe by the peek and are closed again here).
    pub passed_fds: usize,
    /// The kernel had more ancillary data than fit (MSG_CTRUNC).
    pub control_truncated: bool,
    /// Where the datagram was sent (4 or 16 bytes) when IP_PKTINFO or
    /// IPV6_RECVPKTINFO is on; empty otherwise.
    pub dst: Vec<u8>,
}

/// recvmsg(MSG_PEEK | MSG_DONTWAIT | `flags`): looks at queued data without
/// consuming it. SCM_RIGHTS descriptors that come along are counted and closed.
pub fn peek(fd: &impl AsRawFd, buf: &mut [u8], flags: i32) -> io::Result<Peeked> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // 4 KiB of control space, 8-byte aligned: room for 253 descriptors plus credentials.
    let mut control = [0u64; 512];
    // SAFETY: msghdr is plain old data; the fields are filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut ss as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = STORAGE_LEN as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let all = flags | libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: every pointer in `msg` refers to live locals (or `buf`) sized as declared.
    let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, all) };
    let len = cvt(r as libc::c_long)? as usize;
    let mut out = Peeked {
        len,
        name: storage_bytes(&ss, msg.msg_namelen),
        passed_fds: 0,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        dst: Vec::new(),
    };
    let int = std::mem::size_of::<libc::c_int>();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed cmsg headers; CMSG_FIRSTHDR/NXTHDR stay within them,
    // SCM_RIGHTS payloads are arrays of ints read unaligned, and a pktinfo
    // payload is read as the bytes its cmsg_len covers. Each descriptor
    // was just installed in this process for us and is owned by nobody else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let payload = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..payload / int {
                    let raw = std::ptr::read_unaligned(data.add(i * int).cast::<libc::c_int>());
                    drop(OwnedFd::from_raw_fd(raw));
                    out.passed_fds += 1;
                }
            }
            let data = libc::CMSG_DATA(c);
            let payload = (*c).cmsg_len as usize - (data as usize - c as usize);
            let bytes = std::slice::from_raw_parts(data, payload);
            // in_pktinfo: ifindex, spec_dst, addr; in6_pktinfo: addr, ifindex.
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) if payload >= 12 => out.dst = bytes[8..12].to_vec(),
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if payload >= 20 => out.dst = bytes[..16].to_vec(),
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(out)
}

/// One classic BPF instruction (struct sock_filter).
#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}
const _: () = assert!(std::mem::size_of::<SockFilter>() == 8);

/// struct sock_fprog.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}
const _: () = assert!(std::mem::size_of::<SockFprog>() == 16);

/// Attaches the one-instruction socket filter `ret #keep`: 0 drops every
/// packet, u32::MAX keeps every packet whole.
pub fn attach_filter(fd: &impl AsRawFd, keep: u32) -> io::Result<()> {
    let program = [SockFilter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: keep }];
    let prog = SockFprog { len: 1, filter: program.as_ptr() };
    // SAFETY: `prog` points at `program`, both live for the call; the kernel copies the program.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const SockFprog).cast(),
            std::mem::size_of::<SockFprog>() as libc::socklen_t,
        )
    };
    cvt(r as libc::c_long).map(drop)
}

/// Removes a socket's filter.
pub fn detach_filter(fd: &impl AsRawFd) -> io::Result<()> {
    let zero: libc::c_int = 0;
    // SAFETY: SO_DETACH_FILTER ignores its value; `zero` is a live int.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_FILTER,
            (&zero as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r as libc::c_long).map(drop)
}

/// Instructions of the socket's filter (0: none).
pub fn filter_len(fd: &impl AsRawFd) -> io::Result<u32> {
    let mut len: libc::socklen_t = 0;
    // SAFETY: with a zero length SO_GET_FILTER writes nothing to the
    // (null) buffer and stores the filter's length in `len`.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_GET_FILTER, std::ptr::null_mut(), &mut len)
    };
    cvt(r as libc::c_long)?;
    Ok(len)
}

/// An ioctl that writes one int (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD).
pub fn ioctl_int(fd: &impl AsRawFd, req: libc::c_ulong) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these requests write exactly one int to the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    cvt(r as libc::c_long)?;
    Ok(v)
}

/// The network namespace a socket lives in (SIOCGSKNS), as a new descriptor.
pub fn netns_of(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGSKNS as _, 0) };
    owned(r as libc::c_long)
}

/// The part of TCP_INFO floe uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpState {
    /// TCP_ESTABLISHED (1) .. TCP_CLOSING (11).
    pub state: u8,
    /// For a listener: connections waiting in the accept queue.
    pub accept_queue: u32,
    /// For a listener: the backlog given to listen(2) (capped by somaxconn).
    pub backlog: u32,
}

const _: () = assert!(std::mem::size_of::<libc::tcp_info>() >= 32);

/// getsockopt(TCP_INFO). For listeners the kernel reports the accept queue
/// length in `tcpi_unacked` and the backlog in `tcpi_sacked`.
pub fn tcp_state(fd: &impl AsRawFd) -> io::Result<TcpState> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `ti` is writable for `len` bytes; the kernel copies at most that.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut ti as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    cvt(r as libc::c_long)?;
    Ok(TcpState { state: ti.tcpi_state, accept_queue: ti.tcpi_unacked, backlog: ti.tcpi_sacked })
}

// ---------------------------------------------------------------------------
// unix_diag (NETLINK_SOCK_DIAG)

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// `struct unix_diag_req` (linux/unix_diag.h).
#[repr(C)]
struct UnixDiagReq {
    sdiag_family: u8,
    sdiag_protocol: u8,
    pad: u16,
    udiag_states: u32,
    udiag_ino: u32,
    udiag_show: u32,
    udiag_cookie: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<UnixDiagReq>() == 24);

#[repr(C)]
struct DiagRequest {
    hdr: libc::nlmsghdr,
    req: UnixDiagReq,
}
const _: () = assert!(std::mem::size_of::<libc::nlmsghdr>() == 16);
const _: () = assert!(std::mem::size_of::<DiagRequest>() == 40);

/// Size of `struct unix_diag_msg` (family, type, state, pad, ino, cookie[2]).
const UNIX_DIAG_MSG_LEN: usize = 16;
const NLMSG_HDR_LEN: usize = 16;

/// What unix_diag reports about one unix socket.
#[derive(Debug, Clone, Default)]
pub struct UnixDiag {
    pub ty: u8,
    /// TCP_ESTABLISHED (1), TCP_CLOSE (7) or TCP_LISTEN (10).
    pub state: u8,
    pub ino: u32,
    /// Bound name (sun_path bytes; abstract names start with NUL).
    pub name: Option<Vec<u8>>,
    /// (inode, kernel dev_t) of the socket file of a filesystem name.
    pub vfs: Option<(u32, u32)>,
    /// Inode of the peer; Some(0) when the peer is gone (or not accepted yet).
    pub peer: Option<u32>,
    /// Listeners: inodes of the clients whose connections wait to be accepted.
    pub icons: Vec<u32>,
    /// Listeners: (accept queue length, backlog); others: (bytes queued to
    /// read (first datagram only for SOCK_DGRAM), bytes not yet read by the peer).
    pub rqlen: Option<(u32, u32)>,
    /// sk_shutdown bits (1 = RCV_SHUTDOWN, 2 = SEND_SHUTDOWN).
    pub shutdown: u8,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

/// Asks the kernel about the unix socket with inode `ino` (in floe's network
/// namespace). Ok(None) when no such socket exists.
pub fn unix_diag(ino: u64) -> io::Result<Option<UnixDiag>> {
    let ino32 = u32::try_from(ino).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: socket takes integers and returns a new descriptor.
    let nl =
        owned(
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) }
                as libc::c_long,
        )?;
    let req = DiagRequest {
        hdr: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<DiagRequest>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        req: UnixDiagReq {
            sdiag_family: libc::AF_UNIX as u8,
            sdiag_protocol: 0,
            pad: 0,
            udiag_states: u32::MAX,
            udiag_ino: ino32,
            udiag_show: UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN,
            // INET_DIAG_NOCOOKIE: match by inode alone.
            udiag_cookie: [u32::MAX, u32::MAX],
        },
    };
    // SAFETY: `req` is a live repr(C) struct readable for its full size;
    // an unconnected netlink socket sends to the kernel.
    let r = unsafe {
        libc::send(nl.as_raw_fd(), (&req as *const DiagRequest).cast(), std::mem::size_of::<DiagRequest>(), 0)
    };
    cvt(r as libc::c_long)?;
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: `buf` is writable for its length.
    let r = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = cvt(r as libc::c_long)? as usize;
    parse_unix_diag(&buf[..n.min(buf.len())])
}

fn bad_reply() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed unix_diag reply")
}

fn parse_unix_diag(b: &[u8]) -> io::Result<Option<UnixDiag>> {
    let len = u32_at(b, 0).ok_or_else(bad_reply)? as usize;
    let ty = u16_at(b, 4).ok_or_else(bad_reply)?;
    if ty == libc::NLMSG_ERROR as u16 {
        let err = u32_at(b, NLMSG_HDR_LEN).ok_or_else(bad_reply)? as i32;
        return match -err {
            0 => Ok(None),
            libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if ty != SOCK_DIAG_BY_FAMILY || len > b.len() || len < NLMSG_HDR_LEN + UNIX_DIAG_MSG_LEN {
        return Err(bad_reply());
    }
    let m = &b[NLMSG_HDR_LEN..len];
    let mut d = UnixDiag { ty: m[1], state: m[2], ino: u32_at(m, 4).ok_or_else(bad_reply)?, ..Default::default() };
    let mut at = UNIX_DIAG_MSG_LEN;
    while at + 4 <= m.len() {
        let alen = u16_at(m, at).ok_or_else(bad_reply)? as usize;
        let aty = u16_at(m, at + 2).ok_or_else(bad_reply)? & 0x3fff;
        if alen < 4 || at + alen > m.len() {
            return Err(bad_reply());
        }
        let v = &m[at + 4..at + alen];
        match aty {
            UNIX_DIAG_NAME => d.name = Some(v.to_vec()),
            UNIX_DIAG_VFS => d.vfs = u32_at(v, 0).zip(u32_at(v, 4)),
            UNIX_DIAG_PEER => d.peer = u32_at(v, 0),
            UNIX_DIAG_ICONS => d.icons = v.chunks_exact(4).filter_map(|c| u32_at(c, 0)).collect(),
            UNIX_DIAG_RQLEN => d.rqlen = u32_at(v, 0).zip(u32_at(v, 4)),
            UNIX_DIAG_SHUTDOWN => d.shutdown = v.first().copied().unwrap_or(0),
            _ => {}
        }
        at += (alen + 3) & !3;
    }
    Ok(Some(d))
}

/// Whether a live socket answers at the unix address `addr` (a connect of
/// type `ty` succeeds). A stale socket file gives ECONNREFUSED: Ok(false).
pub fn unix_address_live(addr: &[u8], ty: i32) -> io::Result<bool> {
    let s = socket(libc::AF_UNIX, ty, 0)?;
    match connect(&s, addr) {
        Ok(()) => Ok(true),
        // Non-blocking connect to a listener with a full backlog: someone is there.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        // A socket of another type is bound there: it is live.
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => Ok(true),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketpair_round_trip_and_peek() {
        let (a, b) = socketpair(libc::SOCK_DGRAM).expect("socketpair");
        assert_eq!(send(&a, b"one", None).expect("send"), 3);
        assert_eq!(send(&a, b"", None).expect("send"), 0);
        let mut buf = [0u8; 16];
        let p = peek(&b, &mut buf, 0).expect("peek");
        assert_eq!(p.len, 3);
        assert_eq!(&buf[..3], b"one");
        assert_eq!(p.passed_fds, 0);
    }

    #[test]
    fn sockaddr_round_trip() {
        let s = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).expect("socket");
        let mut a = vec![0u8; 16];
        a[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        a[4..8].copy_from_slice(&[127, 0, 0, 1]);
        bind(&s, &a).expect("bind");
        let got = getsockname(&s).expect("getsockname");
        assert_eq!(got.len(), 16);
        assert_eq!(&got[4..8], &[127, 0, 0, 1]);
        assert_ne!(u16::from_be_bytes([got[2], got[3]]), 0);
    }

    #[test]
    fn parse_error_reply() {
        let mut b = vec![0u8; 36];
        b[..4].copy_from_slice(&36u32.to_ne_bytes());
        b[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        b[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert!(parse_unix_diag(&b).expect("parse").is_none());
    }
}
