//! Raw calls of the dirty-page trackers ([`crate::track`]): userfaultfd
//! ioctls, the seqpacket socket of the tracker holder, and the holder process
//! itself. PAGEMAP_SCAN is [`super::memory::pagemap_scan`].
//!
//! The holder is forked from a possibly multi-threaded process, so everything
//! it runs after the fork ([`spawn_holder`]) uses inline `syscall`
//! instructions only: no libc wrappers (no errno), no allocation, no locks,
//! no panics. Its buffers are prepared before the fork.
//!
//! x86_64 only, like the rest of the engine.
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::cvt;

/// Page size (x86_64).
pub const PAGE_SIZE: u64 = 4096;

// ---------------------------------------------------------------------------
// userfaultfd

/// `UFFD_USER_MODE_ONLY` flag of userfaultfd(2): lets a target without
/// CAP_SYS_PTRACE create it (kernel-mode writes are still tracked by WP_ASYNC).
pub const UFFD_USER_MODE_ONLY: i32 = 1;
/// Flags for the userfaultfd injected into a target.
pub const UFFD_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_WP_UNPOPULATED`: holes in registered ranges get write-protect markers too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFD_FEATURE_SIGBUS`: a fault in a registered range gets SIGBUS at once
/// instead of waiting for a handler.
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFDIO_COPY_MODE_DONTWAKE`: nothing waits on the range, skip the wake-up.
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
const _: () = assert!(size_of::<UffdioApi>() == 24);

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
const _: () = assert!(size_of::<UffdioRange>() == 16);

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
const _: () = assert!(size_of::<UffdioRegister>() == 32);

/// `_IOC(dir, type, nr, size)` of the asm-generic ioctl encoding (dir: 1 write, 2 read, 3 both).
const fn ioc(dir: libc::c_ulong, ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    (dir << 30) | ((size as libc::c_ulong) << 16) | ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    /// Bytes copied, or a negative errno when none were.
    copy: i64,
}
const _: () = assert!(size_of::<UffdioCopy>() == 40);

const UFFDIO_API: libc::c_ulong = ioc(3, 0xaa, 0x3f, size_of::<UffdioApi>());
const UFFDIO_COPY: libc::c_ulong = ioc(3, 0xaa, 0x03, size_of::<UffdioCopy>());
const UFFDIO_UNREGISTER: libc::c_ulong = ioc(2, 0xaa, 0x01, size_of::<UffdioRange>());
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const UFFDIO_REGISTER: libc::c_ulong = ioc(3, 0xaa, 0x00, size_of::<UffdioRegister>());
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);

/// userfaultfd([`UFFD_FLAGS`]) in the calling process (for probing the kernel).
pub fn userfaultfd() -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes integer flags and returns a new descriptor.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::c_long::from(UFFD_FLAGS)) };
    let fd = cvt(r)?;
    // SAFETY: the kernel just returned `fd` as a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// UFFDIO_API handshake asking for `features`; returns the features the kernel reports.
pub fn uffd_api(uffd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes exactly one struct uffdio_api, which `api` is.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    cvt(r.into())?;
    Ok(api.features)
}

/// UFFDIO_REGISTER with MODE_WP over [start, start+len) of the mm the uffd
/// was created in (not necessarily the caller's).
pub fn uffd_register_wp(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one struct uffdio_register,
    // which `reg` is. The uffd has WP_ASYNC, so faults in the range never wait for a
    // handler: the registration cannot hang the tracked process.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg as *mut UffdioRegister) };
    cvt(r.into()).map(drop)
}

/// UFFDIO_REGISTER with MODE_MISSING over [start, start+len) of the uffd's
/// mm: pages missing there can then be filled with [`uffd_copy`].
pub fn uffd_register_missing(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one struct uffdio_register,
    // which `reg` is. A fault in the range cannot wait for a handler: the uffds floe
    // registers this way are UFFD_USER_MODE_ONLY (kernel accesses fail with EFAULT)
    // with UFFD_FEATURE_SIGBUS (user accesses get SIGBUS).
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg as *mut UffdioRegister) };
    cvt(r.into()).map(drop)
}

/// UFFDIO_UNREGISTER of [start, start+len) of the uffd's mm: the range's
/// registration ends now, even while a copy of the descriptor lives on
/// elsewhere (a child forked meanwhile, before its exec).
pub fn uffd_unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads exactly one struct uffdio_range, which `range` is.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range as *mut UffdioRange) };
    cvt(r.into()).map(drop)
}

/// UFFDIO_COPY of `src` (in the caller's memory) to `dst` in the uffd's mm:
/// allocates each missing page and copies into it in one step. Returns the
/// bytes copied, fewer than `src.len()` (but not 0) when it stopped early;
/// an error when it copied nothing (EEXIST: the page at `dst` is present).
pub fn uffd_copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> io::Result<u64> {
    let mut c =
        UffdioCopy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: UFFDIO_COPY_MODE_DONTWAKE, copy: 0 };
    // SAFETY: UFFDIO_COPY reads and writes one struct uffdio_copy, which `c` is,
    // and reads `len` bytes at `src`, which `src` holds for the whole call. It
    // writes only into the uffd's mm, never into the caller's memory.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut c as *mut UffdioCopy) };
    if r == 0 {
        return Ok(src.len() as u64);
    }
    let err = io::Error::last_os_error();
    if c.copy > 0 {
        Ok(c.copy as u64)
    } else {
        Err(err)
    }
}

// ---------------------------------------------------------------------------
// unix seqpacket sockets (holder protocol, caller side)

fn owned(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = cvt(r)?;
    // SAFETY: the kernel just returned `fd` as a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new descriptor.
    owned(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) }.into())
}

/// A SOCK_SEQPACKET socket connected to the abstract name `name`.
pub fn seqpacket_connect(name: &[u8]) -> io::Result<OwnedFd> {
    let sock = seqpacket_socket()?;
    let (addr, len) = super::task::abstract_addr(name);
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the duration of the call.
    let r = unsafe { libc::connect(sock.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    cvt(r.into())?;
    Ok(sock)
}

/// Sends one message.
pub fn send_msg(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    // SAFETY: `data` is readable for its length during the call.
    let r = unsafe { libc::send(sock.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    let n = cvt(r as libc::c_long)? as usize;
    if n != data.len() {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok(())
}

/// One received message: its length, the descriptors that came with it
/// (close-on-exec), and whether it was truncated to fit the buffer.
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    pub truncated: bool,
}

/// Receives one message into `buf`, accepting up to 4 descriptors.
pub fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for a cmsghdr with up to 4 ints, 8-byte aligned.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain old data; all-zero is valid; fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>();
    // SAFETY: every pointer in `msg` refers to live locals (`iov` → `buf`, `cbuf`)
    // with the lengths given.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let len = cvt(r as libc::c_long)? as usize;
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel just filled,
    // staying within msg_controllen; each SCM_RIGHTS payload is a packed int array.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<i32>();
                for i in 0..data_len / size_of::<i32>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // The kernel installed each received descriptor for us.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let truncated = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
    Ok(Received { len, fds, truncated })
}

/// SO_PEERCRED of a connected unix socket: (pid, uid). For the connecting side
/// this is the process that called listen().
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<(i32, u32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len describe a writable ucred; the kernel writes at most len bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    cvt(r.into())?;
    Ok((cred.pid, cred.uid))
}

/// SO_RCVTIMEO.
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros().into(),
    };
    // SAFETY: the option value points at `tv`, a timeval of the length passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    cvt(r.into()).map(drop)
}

/// Effective uid of the calling process.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and takes no arguments.
    unsafe { libc::geteuid() }
}

// ---------------------------------------------------------------------------
// raw syscalls for forked children

/// One raw system call; returns the kernel's result (negative errno on
/// failure). Never touches errno or any other libc state.
///
/// # Safety
/// The arguments must be valid for syscall `nr`: pointers must point at live
/// memory of the size the syscall reads or writes.
#[inline(always)]
unsafe fn raw(nr: libc::c_long, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: x86_64 syscall ABI: number in rax, arguments in rdi, rsi, rdx, r10,
    // r8, r9; the kernel clobbers rcx and r11 only. The asm is not marked `nomem`,
    // so the compiler assumes memory may be read and written, as the kernel does.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// exit_group, never returns.
fn raw_exit(code: i32) -> ! {
    loop {
        // SAFETY: exit_group takes an integer and does not return.
        unsafe { raw(libc::SYS_exit_group, [code as u64, 0, 0, 0, 0, 0]) };
    }
}

/// fork() as a raw clone(SIGCHLD): 0 in the child, the child's pid (or -errno) in the parent.
///
/// # Safety
/// The child is a copy of only the calling thread of a possibly multi-threaded
/// process: it must run raw syscalls only and leave through [`raw_exit`].
unsafe fn raw_fork() -> i64 {
    // SAFETY: clone with SIGCHLD and no stack is fork(); the caller guarantees the
    // child's code is async-signal-safe.
    unsafe { raw(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]) }
}

/// Closes every descriptor except those in `keep` (raw close_range calls).
fn raw_close_all_but(keep: &mut [u32]) {
    keep.sort_unstable();
    let mut next: u32 = 0;
    for &k in keep.iter() {
        if k > next {
            // SAFETY: close_range takes integers; closing descriptors in this
            // single-threaded child cannot invalidate memory.
            unsafe { raw(libc::SYS_close_range, [u64::from(next), u64::from(k - 1), 0, 0, 0, 0]) };
        }
        next = k.saturating_add(1);
    }
    // SAFETY: as above.
    unsafe { raw(libc::SYS_close_range, [u64::from(next), u64::from(u32::MAX), 0, 0, 0, 0]) };
}

fn raw_waitpid(pid: i32) -> io::Result<i32> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(status);
    }
}

/// An anonymous private mapping prepared before a fork, unmapped on drop (in
/// the parent only; children leave through exit_group).
struct RawArea {
    ptr: *mut u8,
    len: usize,
}

impl RawArea {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RawArea { ptr: p.cast(), len })
    }
}

impl Drop for RawArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no reference into it outlives it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------
// the holder process

/// Bytes per message the holder sends.
pub const HOLDER_CHUNK: usize = 64 * 1024;
/// The holder exits after this long without a request.
pub const HOLDER_IDLE_MS: i32 = 24 * 3600 * 1000;
/// How long the holder waits for a request on an accepted connection, or for
/// room to send a reply.
const HOLDER_IO_MS: i32 = 5000;
/// Scratch room of the holder for reading /proc/self/maps.
const MAPS_SCRATCH: usize = 1024 * 1024;
/// Scratch room for the list of mappings to drop (pairs of u64).
const DROP_SCRATCH: usize = 256 * 1024;

/// What a holder serves.
pub struct HolderSpec<'a> {
    /// Abstract unix socket name (without the leading NUL) the holder binds.
    pub name: &'a [u8],
    /// pidfd of the tracked process: the holder exits when it becomes readable.
    pub pidfd: BorrowedFd<'a>,
    /// The descriptor handed out (SCM_RIGHTS) on "get".
    pub uffd: BorrowedFd<'a>,
    /// The reply to "get", sent in [`HOLDER_CHUNK`]-byte messages, the
    /// descriptor attached to the first.
    pub payload: &'a [u8],
    /// Offset in `payload` where the holder stores its own pid (u32 LE).
    pub pid_offset: usize,
    /// Peers with this uid (or uid 0) are served; others are hung up on.
    pub allowed_uid: u32,
}

/// Everything the holder needs, on the stack before the fork.
#[derive(Clone, Copy)]
struct HolderCtx {
    addr: libc::sockaddr_un,
    addr_len: libc::socklen_t,
    /// Write end of the readiness pipe: the holder writes its bind/listen
    /// result there (i32 LE: 0 or errno).
    ready: i32,
    pidfd: i32,
    uffd: i32,
    area: *mut u8,
    area_len: usize,
    payload_len: usize,
    pid_offset: usize,
    allowed_uid: u32,
}

/// Double-forks (setsid in between) a holder process serving `spec` and
/// returns once it listens on `spec.name`; `EADDRINUSE` when the name is
/// taken. The listening socket exists only in the holder, never in the
/// (possibly multi-threaded) caller, so no concurrently forked child can
/// inherit it and keep the name bound after the holder is gone.
///
/// The holder closes every other descriptor, binds and listens, reports
/// readiness, resets its signal handlers, unmaps the anonymous memory it
/// inherited (heap, anonymous mmaps, memfd and shared-anonymous mappings)
/// except its own stack and buffers, and then loops:
///
/// * poll the listening socket and the pidfd, 24 h timeout: pidfd readable
///   (the process exited) or timeout → exit;
/// * accept a connection; hang up on peers whose uid is neither 0 nor
///   `allowed_uid`; wait up to 5 s for one message: `get` → send the payload
///   with the descriptor attached, `stop` → exit; then close the connection.
///
/// Safe to call from a multi-threaded process: after the fork only raw
/// syscalls run.
pub fn spawn_holder(spec: &HolderSpec<'_>) -> io::Result<()> {
    if spec.pid_offset + 4 > spec.payload.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let payload_room = spec.payload.len().div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
    let area = RawArea::new(payload_room + MAPS_SCRATCH + DROP_SCRATCH)?;
    // SAFETY: `area` is a fresh writable mapping of at least payload.len() bytes
    // that does not overlap `payload`.
    unsafe { std::ptr::copy_nonoverlapping(spec.payload.as_ptr(), area.ptr, spec.payload.len()) };
    let (ready_r, ready_w) = super::task::pipe()?;
    let (addr, addr_len) = super::task::abstract_addr(spec.name);
    let ctx = HolderCtx {
        addr,
        addr_len,
        ready: ready_w.as_raw_fd(),
        pidfd: spec.pidfd.as_raw_fd(),
        uffd: spec.uffd.as_raw_fd(),
        area: area.ptr,
        area_len: area.len,
        payload_len: spec.payload.len(),
        pid_offset: spec.pid_offset,
        allowed_uid: spec.allowed_uid,
    };
    // SAFETY: the child branch runs only raw syscalls (setsid, clone, exit_group
    // and then holder_main, which is written for that) and never returns.
    let child = unsafe { raw_fork() };
    if child == 0 {
        // SAFETY: setsid takes no arguments.
        unsafe { raw(libc::SYS_setsid, [0; 6]) };
        // SAFETY: as above: the grandchild runs holder_main only, which never returns.
        let grandchild = unsafe { raw_fork() };
        if grandchild == 0 {
            holder_main(&ctx);
        }
        raw_exit(if grandchild < 0 { 1 } else { 0 });
    }
    drop(ready_w);
    if child < 0 {
        return Err(io::Error::from_raw_os_error(-child as i32));
    }
    let status = raw_waitpid(child as i32)?;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(io::Error::other("the holder's intermediate child failed to fork"));
    }
    let mut p = libc::pollfd { fd: ready_r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: `p` is one pollfd the kernel reads and updates.
    let r = unsafe { libc::poll(&mut p, 1, HOLDER_IO_MS) };
    if r <= 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "the holder did not report readiness"));
    }
    let mut word = [0u8; 4];
    // SAFETY: read writes at most 4 bytes into `word`.
    let n = unsafe { libc::read(ready_r.as_raw_fd(), word.as_mut_ptr().cast(), 4) };
    if n != 4 {
        return Err(io::Error::other("the holder died before listening"));
    }
    match i32::from_le_bytes(word) {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// socket + bind + listen on the holder's name; the listening fd or -errno.
fn holder_listen(ctx: &HolderCtx) -> i64 {
    // SAFETY: socket takes integers.
    let fd = unsafe {
        raw(libc::SYS_socket, [libc::AF_UNIX as u64, (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64, 0, 0, 0, 0])
    };
    if fd < 0 {
        return fd;
    }
    // SAFETY: bind reads addr_len bytes of the sockaddr_un in `ctx`.
    let r = unsafe {
        raw(libc::SYS_bind, [fd as u64, (&ctx.addr as *const libc::sockaddr_un) as u64, ctx.addr_len as u64, 0, 0, 0])
    };
    // SAFETY: listen takes integers.
    let r = if r < 0 { r } else { unsafe { raw(libc::SYS_listen, [fd as u64, 16, 0, 0, 0, 0]) } };
    if r < 0 {
        // SAFETY: close takes an integer.
        unsafe { raw(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]) };
        return r;
    }
    fd
}

/// The holder's body. Raw syscalls only; never returns.
fn holder_main(ctx: &HolderCtx) -> ! {
    let name = *b"floe-track\0";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `name`.
    unsafe { raw(libc::SYS_prctl, [libc::PR_SET_NAME as u64, name.as_ptr() as u64, 0, 0, 0, 0]) };
    let root = *b"/\0";
    // SAFETY: chdir reads the NUL-terminated path in `root`.
    unsafe { raw(libc::SYS_chdir, [root.as_ptr() as u64, 0, 0, 0, 0, 0]) };
    let mut keep = [ctx.ready as u32, ctx.pidfd as u32, ctx.uffd as u32];
    raw_close_all_but(&mut keep);
    let listen = holder_listen(ctx);
    let status = if listen < 0 { (-listen) as i32 } else { 0 };
    let word = status.to_le_bytes();
    // SAFETY: write reads 4 bytes from `word`; close takes an integer.
    unsafe {
        raw(libc::SYS_write, [ctx.ready as u64, word.as_ptr() as u64, 4, 0, 0, 0]);
        raw(libc::SYS_close, [ctx.ready as u64, 0, 0, 0, 0, 0]);
    }
    if listen < 0 {
        raw_exit(1);
    }
    let listen = listen as i32;
    reset_signals();
    scrub_memory(ctx);
    // SAFETY: getpid takes no arguments.
    let me = unsafe { raw(libc::SYS_getpid, [0; 6]) } as u32;
    // SAFETY: pid_offset + 4 <= payload_len <= area_len (checked before the fork).
    unsafe { std::ptr::write_unaligned(ctx.area.add(ctx.pid_offset).cast::<u32>(), me.to_le()) };

    loop {
        let mut fds = [
            libc::pollfd { fd: listen, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: ctx.pidfd, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is an array of 2 pollfd the kernel reads and updates.
        let r = unsafe { raw(libc::SYS_poll, [fds.as_mut_ptr() as u64, 2, HOLDER_IDLE_MS as u64, 0, 0, 0]) };
        if r == -(libc::EINTR as i64) {
            continue;
        }
        if r <= 0 || fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            // idle timeout, poll failure, the tracked process exited, or the socket broke
            raw_exit(0);
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: accept4 with null address pointers takes integers only.
        let conn = unsafe { raw(libc::SYS_accept4, [listen as u64, 0, 0, libc::SOCK_CLOEXEC as u64, 0, 0]) };
        if conn < 0 {
            continue;
        }
        let conn = conn as i32;
        let stop = serve(ctx, conn);
        if stop {
            // Unbind the name before the requester sees the hang-up.
            // SAFETY: close takes an integer.
            unsafe { raw(libc::SYS_close, [listen as u64, 0, 0, 0, 0, 0]) };
            // SAFETY: as above.
            unsafe { raw(libc::SYS_close, [conn as u64, 0, 0, 0, 0, 0]) };
            raw_exit(0);
        }
        // SAFETY: close takes an integer.
        unsafe { raw(libc::SYS_close, [conn as u64, 0, 0, 0, 0, 0]) };
    }
}

/// Handles one connection; returns true on "stop".
fn serve(ctx: &HolderCtx, conn: i32) -> bool {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len describe a writable ucred; the kernel writes at most len bytes.
    let r = unsafe {
        raw(
            libc::SYS_getsockopt,
            [
                conn as u64,
                libc::SOL_SOCKET as u64,
                libc::SO_PEERCRED as u64,
                (&mut cred as *mut libc::ucred) as u64,
                (&mut len as *mut libc::socklen_t) as u64,
                0,
            ],
        )
    };
    if r < 0 || (cred.uid != 0 && cred.uid != ctx.allowed_uid) {
        return false;
    }
    if !raw_poll1(conn, libc::POLLIN) {
        return false;
    }
    let mut req = [0u8; 16];
    // SAFETY: recvfrom writes at most 16 bytes into `req`; null address pointers.
    let n =
        unsafe { raw(libc::SYS_recvfrom, [conn as u64, req.as_mut_ptr() as u64, 16, libc::MSG_DONTWAIT as u64, 0, 0]) };
    match n {
        3 if req[..3] == *b"get" => {
            send_payload(ctx, conn);
            false
        }
        4 if req[..4] == *b"stop" => true,
        _ => false,
    }
}

/// poll() one descriptor for `events` with the I/O timeout; true when ready.
fn raw_poll1(fd: i32, events: libc::c_short) -> bool {
    loop {
        let mut p = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: `p` is one pollfd the kernel reads and updates.
        let r = unsafe { raw(libc::SYS_poll, [(&mut p as *mut libc::pollfd) as u64, 1, HOLDER_IO_MS as u64, 0, 0, 0]) };
        if r == -(libc::EINTR as i64) {
            continue;
        }
        return r > 0 && p.revents & events != 0;
    }
}

/// Sends the payload in chunks, the uffd attached to the first.
fn send_payload(ctx: &HolderCtx, conn: i32) {
    // cmsghdr { len: u64, level: i32, type: i32 } followed by one int: CMSG_SPACE(4) = 24.
    let cbuf: [u64; 3] =
        [16 + 4, (libc::SOL_SOCKET as u32 as u64) | ((libc::SCM_RIGHTS as u32 as u64) << 32), ctx.uffd as u32 as u64];
    let mut off = 0usize;
    while off < ctx.payload_len {
        let n = HOLDER_CHUNK.min(ctx.payload_len - off);
        // SAFETY: off + n <= payload_len <= area_len.
        let base = unsafe { ctx.area.add(off) };
        let mut iov = libc::iovec { iov_base: base.cast(), iov_len: n };
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if off == 0 {
            msg.msg_control = cbuf.as_ptr().cast_mut().cast();
            msg.msg_controllen = size_of::<[u64; 3]>();
        }
        loop {
            // SAFETY: `msg` points at `iov` (→ the payload area) and `cbuf`, all live.
            let r = unsafe {
                raw(
                    libc::SYS_sendmsg,
                    [
                        conn as u64,
                        (&msg as *const libc::msghdr) as u64,
                        (libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) as u64,
                        0,
                        0,
                        0,
                    ],
                )
            };
            if r == -(libc::EINTR as i64) {
                continue;
            }
            if r == -(libc::EAGAIN as i64) {
                if raw_poll1(conn, libc::POLLOUT) {
                    continue;
                }
                return;
            }
            if r != n as i64 {
                return;
            }
            break;
        }
        off += n;
    }
}

/// SIG_DFL for every signal (SIG_IGN for SIGPIPE), no alternate stack, nothing blocked.
fn reset_signals() {
    // struct stack_t { ss_sp, ss_flags (int, padded), ss_size }
    let ss: [u64; 3] = [0, libc::SS_DISABLE as u64, 0];
    // SAFETY: sigaltstack reads one stack_t from `ss`; no old stack is requested.
    unsafe { raw(libc::SYS_sigaltstack, [ss.as_ptr() as u64, 0, 0, 0, 0, 0]) };
    for sig in 1..=64u64 {
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        // kernel struct sigaction: handler, flags, restorer, mask
        let handler = if sig == libc::SIGPIPE as u64 { 1 } else { 0 };
        let act: [u64; 4] = [handler, 0, 0, 0];
        // SAFETY: rt_sigaction reads one kernel sigaction from `act`; sigsetsize 8.
        unsafe { raw(libc::SYS_rt_sigaction, [sig, act.as_ptr() as u64, 0, 8, 0, 0]) };
    }
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask reads 8 bytes from `empty`; no old mask is requested.
    unsafe { raw(libc::SYS_rt_sigprocmask, [libc::SIG_SETMASK as u64, (&empty as *const u64) as u64, 0, 8, 0, 0]) };
}

/// Unmaps the inherited anonymous memory the holder does not need, so that it
/// does not pin the caller's heap and buffers for a day. Kept: the mappings
/// holding the stack, the thread pointer area and the holder's area, plus all
/// file-backed and special ([vdso], [stack]…) mappings. Best effort.
fn scrub_memory(ctx: &HolderCtx) {
    let marker = 0u8;
    let sp = &marker as *const u8 as u64;
    let mut fs_base: u64 = 0;
    // SAFETY: ARCH_GET_FS writes the fs base into `fs_base`.
    unsafe { raw(libc::SYS_arch_prctl, [0x1003, (&mut fs_base as *mut u64) as u64, 0, 0, 0, 0]) };
    let keep = [sp, fs_base, ctx.area as u64];
    let payload_room = ctx.area_len - MAPS_SCRATCH - DROP_SCRATCH;
    // SAFETY: both scratch slices lie inside the holder's own area, after the
    // payload, do not overlap, and nothing else refers to them.
    let (maps, drops) = unsafe {
        (
            std::slice::from_raw_parts_mut(ctx.area.add(payload_room), MAPS_SCRATCH),
            std::slice::from_raw_parts_mut(ctx.area.add(payload_room + MAPS_SCRATCH).cast::<u64>(), DROP_SCRATCH / 8),
        )
    };
    let path = *b"/proc/self/maps\0";
    for _pass in 0..16 {
        // SAFETY: openat reads the NUL-terminated path in `path`.
        let fd = unsafe {
            raw(
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, path.as_ptr() as u64, (libc::O_RDONLY | libc::O_CLOEXEC) as u64, 0, 0, 0],
            )
        };
        if fd < 0 {
            return;
        }
        let mut len = 0usize;
        let mut complete = false;
        while len < maps.len() {
            let room = &mut maps[len..];
            // SAFETY: read writes at most room.len() bytes into `room`.
            let n = unsafe { raw(libc::SYS_read, [fd as u64, room.as_mut_ptr() as u64, room.len() as u64, 0, 0, 0]) };
            if n == -(libc::EINTR as i64) {
                continue;
            }
            if n <= 0 {
                complete = n == 0;
                break;
            }
            len += n as usize;
        }
        // SAFETY: close takes an integer.
        unsafe { raw(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]) };
        let found = droppable_mappings(&maps[..len], &keep, drops);
        for pair in drops[..found * 2].chunks_exact(2) {
            // SAFETY: unmapping inherited mappings that contain none of the
            // holder's stack, thread area or buffers; the holder never touches them.
            unsafe { raw(libc::SYS_munmap, [pair[0], pair[1] - pair[0], 0, 0, 0, 0]) };
        }
        if complete && found * 2 < drops.len() {
            return;
        }
        if found == 0 {
            return;
        }
    }
}

/// Parses /proc/self/maps text and writes (start, end) pairs of the mappings
/// to drop into `out`; returns how many pairs. A mapping is dropped when it is
/// anonymous private memory (inode 0 with no name, `[heap]` or `[anon:…]`),
/// a memfd, shared anonymous memory or SysV shm, and contains no `keep`
/// address. Incomplete trailing lines are ignored. No allocation, no panics.
pub(crate) fn droppable_mappings(text: &[u8], keep: &[u64], out: &mut [u64]) -> usize {
    // Only whole lines: a read cut short may have cut a name off.
    let whole = match text.iter().rposition(|b| *b == b'\n') {
        Some(pos) => text.get(..pos).unwrap_or(&[]),
        None => &[],
    };
    let mut found = 0usize;
    for line in whole.split(|b| *b == b'\n') {
        if found * 2 + 2 > out.len() {
            break;
        }
        let Some(m) = parse_maps_line(line) else { continue };
        let anon = m.inode == 0 && (m.path.is_empty() || m.path == b"[heap]" || m.path.starts_with(b"[anon:"));
        let shared = m.path.starts_with(b"/memfd:") || m.path.starts_with(b"/dev/zero") || m.path.starts_with(b"/SYSV");
        if !(anon || shared) || keep.iter().any(|k| (m.start..m.end).contains(k)) {
            continue;
        }
        out[found * 2] = m.start;
        out[found * 2 + 1] = m.end;
        found += 1;
    }
    found
}

struct MapsLine<'a> {
    start: u64,
    end: u64,
    inode: u64,
    path: &'a [u8],
}

/// One maps line: `start-end perms offset dev inode   path`. A line cut off
/// before the inode field (a truncated read) gives None.
fn parse_maps_line(line: &[u8]) -> Option<MapsLine<'_>> {
    let mut fields = line.splitn(6, |b| *b == b' ');
    let range = fields.next()?;
    let _perms = fields.next()?;
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = parse_num(fields.next()?, 10)?;
    let rest = fields.next().unwrap_or(&[]);
    let skip = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
    let path = rest.get(skip..).unwrap_or(&[]);
    let dash = range.iter().position(|b| *b == b'-')?;
    let start = parse_num(range.get(..dash)?, 16)?;
    let end = parse_num(range.get(dash + 1..)?, 16)?;
    if end <= start {
        return None;
    }
    Some(MapsLine { start, end, inode, path })
}

fn parse_num(s: &[u8], radix: u64) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        let d = match b {
            b'0'..=b'9' => u64::from(b - b'0'),
            b'a'..=b'f' if radix == 16 => u64::from(b - b'a' + 10),
            _ => return None,
        };
        v = v.checked_mul(radix)?.checked_add(d)?;
    }
    Some(v)
}

// ---------------------------------------------------------------------------
// test support: a child that writes the pages it is told to

#[cfg(test)]
pub mod testing {
    use super::*;

    /// Command asking the writer to write every page of its buffer.
    pub const WRITE_ALL: u64 = u64::MAX - 1;
    const EXIT: u64 = u64::MAX;

    /// A forked child owning a `len`-byte private anonymous buffer at `base`
    /// (untouched at start). It reads page indexes from a pipe, writes one
    /// byte into each page and acknowledges with one byte. It is killed when
    /// the thread that created it exits, and on drop.
    pub struct Writer {
        pub pid: i32,
        pub base: u64,
        pub len: u64,
        cmd: OwnedFd,
        ack: OwnedFd,
        reaped: bool,
    }

    impl Writer {
        pub fn spawn(len: u64) -> io::Result<Writer> {
            let area = RawArea::new(len as usize)?;
            let (cmd_r, cmd_w) = super::super::task::pipe()?;
            let (ack_r, ack_w) = super::super::task::pipe()?;
            let base = area.ptr as u64;
            let (cr, aw) = (cmd_r.as_raw_fd(), ack_w.as_raw_fd());
            // SAFETY: the child runs writer_main, raw syscalls and volatile stores only.
            let pid = unsafe { raw_fork() };
            if pid == 0 {
                writer_main(cr, aw, base, len);
            }
            if pid < 0 {
                return Err(io::Error::from_raw_os_error(-pid as i32));
            }
            drop(area); // the parent's copy; the child keeps its own
            Ok(Writer { pid: pid as i32, base, len, cmd: cmd_w, ack: ack_r, reaped: false })
        }

        fn command(&self, v: u64) -> io::Result<()> {
            let b = v.to_le_bytes();
            // SAFETY: writes 8 bytes from `b`.
            let n = unsafe { libc::write(self.cmd.as_raw_fd(), b.as_ptr().cast(), 8) };
            if n != 8 {
                return Err(io::Error::last_os_error());
            }
            let mut a = [0u8; 1];
            // SAFETY: reads at most 1 byte into `a`.
            let n = unsafe { libc::read(self.ack.as_raw_fd(), a.as_mut_ptr().cast(), 1) };
            if n != 1 {
                return Err(io::Error::other("writer child did not acknowledge"));
            }
            Ok(())
        }

        /// Writes one byte into each page index, in order, and waits for it.
        pub fn write_pages(&self, pages: &[u64]) -> io::Result<()> {
            for &p in pages {
                self.command(p)?;
            }
            Ok(())
        }

        /// Writes every page of the buffer.
        pub fn write_all(&self) -> io::Result<()> {
            self.command(WRITE_ALL)
        }

        /// Address of page `i`.
        pub fn page(&self, i: u64) -> u64 {
            self.base + i * PAGE_SIZE
        }
    }

    impl Drop for Writer {
        fn drop(&mut self) {
            if !self.reaped {
                // SAFETY: kill/waitpid on our own unreaped child.
                unsafe {
                    libc::kill(self.pid, libc::SIGKILL);
                    let mut st = 0;
                    libc::waitpid(self.pid, &mut st, libc::__WALL);
                }
                self.reaped = true;
            }
        }
    }

    /// Forks a child that switches to `uid`, connects to the abstract name,
    /// sends `get` and exits with 0 when the server hung up without sending
    /// anything (EOF or ECONNRESET), 1 when it got a reply, 2 when a syscall failed. Returns the exit code.
    pub fn get_as_uid(uid: u32, name: &[u8]) -> io::Result<i32> {
        let (addr, len) = super::super::task::abstract_addr(name);
        // SAFETY: the child runs raw syscalls only and leaves through raw_exit.
        let pid = unsafe { raw_fork() };
        if pid == 0 {
            let u = u64::from(uid);
            // SAFETY: setresuid takes integers.
            if unsafe { raw(libc::SYS_setresuid, [u, u, u, 0, 0, 0]) } < 0 {
                raw_exit(2);
            }
            // SAFETY: socket takes integers.
            let fd = unsafe { raw(libc::SYS_socket, [libc::AF_UNIX as u64, libc::SOCK_SEQPACKET as u64, 0, 0, 0, 0]) };
            // SAFETY: connect reads `len` bytes of `addr`, a live sockaddr_un.
            let r = unsafe {
                raw(libc::SYS_connect, [fd as u64, (&addr as *const libc::sockaddr_un) as u64, len as u64, 0, 0, 0])
            };
            if fd < 0 || r < 0 {
                raw_exit(2);
            }
            let get = *b"get";
            let mut buf = [0u8; 64];
            // SAFETY: sendto reads 3 bytes of `get`; recvfrom writes at most 64 bytes into `buf`.
            let n = unsafe {
                raw(libc::SYS_sendto, [fd as u64, get.as_ptr() as u64, 3, 0, 0, 0]);
                raw(libc::SYS_recvfrom, [fd as u64, buf.as_mut_ptr() as u64, 64, 0, 0, 0])
            };
            raw_exit(match n {
                // ECONNRESET: the server closed with our request unread
                0 => 0,
                n if n == -(libc::ECONNRESET as i64) => 0,
                n if n > 0 => 1,
                _ => 2,
            });
        }
        if pid < 0 {
            return Err(io::Error::from_raw_os_error(-pid as i32));
        }
        let status = raw_waitpid(pid as i32)?;
        Ok(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 })
    }

    fn writer_main(cmd: i32, ack: i32, base: u64, len: u64) -> ! {
        // SAFETY: prctl with integer arguments.
        unsafe { raw(libc::SYS_prctl, [libc::PR_SET_PDEATHSIG as u64, libc::SIGKILL as u64, 0, 0, 0, 0]) };
        let mut keep = [cmd as u32, ack as u32];
        raw_close_all_but(&mut keep);
        let pages = len / PAGE_SIZE;
        let mut counter: u8 = 0;
        loop {
            let mut v = [0u8; 8];
            // SAFETY: read writes at most 8 bytes into `v`.
            let n = unsafe { raw(libc::SYS_read, [cmd as u64, v.as_mut_ptr() as u64, 8, 0, 0, 0]) };
            if n == -(libc::EINTR as i64) {
                continue;
            }
            if n != 8 {
                raw_exit(0);
            }
            let v = u64::from_le_bytes(v);
            counter = counter.wrapping_add(1);
            match v {
                EXIT => raw_exit(0),
                WRITE_ALL => {
                    for i in 0..pages {
                        // SAFETY: page i < pages lies inside the child's buffer mapping.
                        unsafe { std::ptr::write_volatile((base + i * PAGE_SIZE) as *mut u8, counter) };
                    }
                }
                i if i < pages => {
                    // SAFETY: as above.
                    unsafe { std::ptr::write_volatile((base + i * PAGE_SIZE) as *mut u8, counter) };
                }
                _ => {}
            }
            let a = [1u8];
            // SAFETY: write reads 1 byte from `a`.
            unsafe { raw(libc::SYS_write, [ack as u64, a.as_ptr() as u64, 1, 0, 0, 0]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_maps_parsing_picks_anonymous_mappings() {
        let text = b"55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1234   /usr/bin/floe\n\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n\
7f0000100000-7f0000200000 rw-p 00000000 00:00 0                          [heap]\n\
7f0000200000-7f0000300000 rw-s 00000000 00:01 77                         /memfd:pages (deleted)\n\
7f0000300000-7f0000400000 rw-p 00000000 00:00 0                          [anon:glibc]\n\
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]\n\
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0                          [vdso]\n\
7f0000400000-7f0000500000 rw-p 00000000 00:00 0\n\
7f0000500000-7f0000600000 rw-p 00000000 00:00 0";
        let mut out = [0u64; 32];
        // keep the mapping holding 0x7f0000400010
        let n = droppable_mappings(text, &[0x7f00_0040_0010], &mut out);
        assert_eq!(
            &out[..n * 2],
            &[
                0x7f00_0000_0000,
                0x7f00_0010_0000,
                0x7f00_0010_0000,
                0x7f00_0020_0000,
                0x7f00_0020_0000,
                0x7f00_0030_0000,
                0x7f00_0030_0000,
                0x7f00_0040_0000
            ]
        );
        // output room for only one pair
        let mut small = [0u64; 2];
        assert_eq!(droppable_mappings(text, &[], &mut small), 1);
    }
}
