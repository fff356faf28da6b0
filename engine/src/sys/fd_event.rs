//! Raw syscalls for the event descriptor kinds (see fdkinds/): eventfd,
//! signalfd and timerfd, plus pidfd_getfd to look at a dumped process's
//! timerfd from floe.
//!
//! Every descriptor created here is close-on-exec in floe; the restored
//! process gets its own close-on-exec bit from the image.
use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of the kernel's `sigset_t` on x86_64 (64 signals), what signalfd4
/// expects as its `sizemask` argument.
const KERNEL_SIGSET_SIZE: usize = 8;
const _: () = assert!(std::mem::size_of::<u64>() == KERNEL_SIGSET_SIZE);

/// `TFD_IOC_SET_TICKS`: `_IOW('T', 0, __u64)` (needs CONFIG_CHECKPOINT_RESTORE).
const TFD_IOC_SET_TICKS: libc::c_ulong =
    (1 << 30) | ((std::mem::size_of::<u64>() as libc::c_ulong) << 16) | ((b'T' as libc::c_ulong) << 8);
const _: () = assert!(TFD_IOC_SET_TICKS == 0x4008_5400);

const NS_PER_SEC: u64 = 1_000_000_000;
const _: () = assert!(std::mem::size_of::<libc::itimerspec>() == 32);

/// Wraps a successful descriptor-returning call.
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = cvt(ret)?;
    // SAFETY: the call succeeded, so `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec { tv_sec: (ns / NS_PER_SEC) as libc::time_t, tv_nsec: (ns % NS_PER_SEC) as libc::c_long }
}

fn nanos(ts: &libc::timespec) -> u64 {
    (ts.tv_sec.max(0) as u64).saturating_mul(NS_PER_SEC).saturating_add(ts.tv_nsec.max(0) as u64)
}

// ---------------------------------------------------------------------------
// eventfd

/// eventfd(0, flags | EFD_CLOEXEC). `flags` may hold EFD_NONBLOCK and EFD_SEMAPHORE.
pub fn eventfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes integers and returns a new descriptor.
    let r = unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) };
    owned(r as libc::c_long)
}

/// Adds `value` to an eventfd counter (write(2) of one u64). On a fresh
/// counter this never blocks for any value below `u64::MAX`.
pub fn eventfd_add(fd: &impl AsRawFd, value: u64) -> io::Result<()> {
    let buf = value.to_ne_bytes();
    // SAFETY: `buf` is valid for reads of its 8 bytes for the duration of the call.
    let r = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    let n = cvt(r as libc::c_long)?;
    if n as usize != buf.len() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// signalfd

/// A new signalfd for the signals in `mask` (bit N-1 = signal N, the format
/// of fdinfo's "sigmask:"), with `flags` (SFD_NONBLOCK) plus SFD_CLOEXEC.
pub fn signalfd(mask: u64, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: signalfd4 reads KERNEL_SIGSET_SIZE bytes from `&mask`, a live
    // u64 of exactly that size; -1 asks for a new descriptor.
    let r = unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1 as libc::c_long,
            &mask as *const u64,
            KERNEL_SIGSET_SIZE,
            (flags | libc::SFD_CLOEXEC) as libc::c_long,
        )
    };
    owned(r)
}

// ---------------------------------------------------------------------------
// timerfd

/// timerfd_create(clockid, flags | TFD_CLOEXEC). `flags` may hold TFD_NONBLOCK.
pub fn timerfd_create(clockid: i32, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes integers and returns a new descriptor.
    let r = unsafe { libc::timerfd_create(clockid, flags | libc::TFD_CLOEXEC) };
    owned(r as libc::c_long)
}

/// timerfd_settime(fd, flags, {value_ns, interval_ns}). A zero value
/// disarms the timer (the interval is still remembered, as the kernel does).
pub fn timerfd_settime(fd: &impl AsRawFd, flags: i32, value_ns: u64, interval_ns: u64) -> io::Result<()> {
    let its = libc::itimerspec { it_interval: timespec(interval_ns), it_value: timespec(value_ns) };
    // SAFETY: `its` is a valid itimerspec for reading; no old value is requested.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, &its, std::ptr::null_mut()) };
    cvt(r as libc::c_long).map(drop)
}

/// timerfd_gettime: (time left until the next expiration, interval), in ns.
///
/// On a periodic timer that expired and was not read yet, this also folds
/// the missed periods into the pending tick count and re-arms the timer for
/// its next period (what the owner's own read or gettime would do).
pub fn timerfd_gettime(fd: &impl AsRawFd) -> io::Result<(u64, u64)> {
    // SAFETY: itimerspec is plain old data; all-zero is a valid value.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: `its` is valid for writes of one itimerspec.
    let r = unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut its) };
    cvt(r as libc::c_long)?;
    Ok((nanos(&its.it_value), nanos(&its.it_interval)))
}

/// Sets the number of pending expirations of a timerfd (TFD_IOC_SET_TICKS;
/// `ticks` must be non-zero). Readers are woken as after an expiration.
pub fn timerfd_set_ticks(fd: &impl AsRawFd, ticks: u64) -> io::Result<()> {
    // SAFETY: the ioctl reads one u64 from the pointer, which refers to a live local.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks as *const u64) };
    cvt(r as libc::c_long).map(drop)
}

/// clock_gettime(clockid) in ns (for re-arming absolute timers).
pub fn clock_now_ns(clockid: i32) -> io::Result<u64> {
    // SAFETY: timespec is plain old data; all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes of one timespec.
    let r = unsafe { libc::clock_gettime(clockid, &mut ts) };
    cvt(r as libc::c_long)?;
    Ok(nanos(&ts))
}

// ---------------------------------------------------------------------------
// pidfd

/// Duplicates descriptor `fd` of process `pid` into floe (pidfd_open +
/// pidfd_getfd): the copy shares the open file description. Close-on-exec.
pub fn fd_of_process(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers and returns a new descriptor.
    let pidfd = owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) })?;
    // SAFETY: pidfd_getfd takes integers and returns a new descriptor.
    owned(unsafe {
        libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd() as libc::c_long, fd as libc::c_long, 0 as libc::c_long)
    })
}
