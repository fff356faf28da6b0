//! Raw syscalls for the epoll and inotify descriptor kinds (see fdkinds/).
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Takes ownership of a descriptor a successful syscall returned.
fn owned(r: libc::c_long) -> io::Result<OwnedFd> {
    let r = cvt(r)?;
    // SAFETY: the syscall succeeded, so `r` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

// ---------------------------------------------------------------------------
// epoll

/// `struct epoll_params` (linux/eventpoll.h): busy-poll settings of an epoll instance.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpollParams {
    pub busy_poll_usecs: u32,
    pub busy_poll_budget: u16,
    pub prefer_busy_poll: u8,
    pad: u8,
}
const _: () = assert!(std::mem::size_of::<EpollParams>() == 8);
const _: () = assert!(std::mem::size_of::<EpollParams>() == std::mem::size_of::<libc::epoll_params>());

impl EpollParams {
    pub fn new(busy_poll_usecs: u32, busy_poll_budget: u16, prefer_busy_poll: u8) -> Self {
        Self { busy_poll_usecs, busy_poll_budget, prefer_busy_poll, pad: 0 }
    }
}

/// epoll_create1(2); close-on-exec in floe (the installed copy gets the dumped flag).
pub fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with an integer argument.
    let r = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    owned(r as libc::c_long)
}

/// Reads the busy-poll parameters of an epoll instance (EPIOCGPARAMS).
pub fn get_params(ep: &impl AsRawFd) -> io::Result<EpollParams> {
    let mut p = EpollParams::default();
    // SAFETY: `p` is a valid, writable `struct epoll_params` for the ioctl.
    let r = unsafe { libc::ioctl(ep.as_raw_fd(), libc::EPIOCGPARAMS, &mut p as *mut EpollParams) };
    cvt(r as libc::c_long)?;
    Ok(p)
}

/// Sets the busy-poll parameters of an epoll instance (EPIOCSPARAMS).
pub fn set_params(ep: &impl AsRawFd, p: &EpollParams) -> io::Result<()> {
    // SAFETY: `p` points at a valid `struct epoll_params` the kernel only reads.
    let r = unsafe { libc::ioctl(ep.as_raw_fd(), libc::EPIOCSPARAMS, p as *const EpollParams) };
    cvt(r as libc::c_long).map(drop)
}

/// `struct kcmp_epoll_slot` (linux/kcmp.h).
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}
const _: () = assert!(std::mem::size_of::<KcmpEpollSlot>() == 12);

/// Whether the file registered in epoll `efd` of `pid` under number `tfd`
/// (the `toff`-th registration with that number) is the description `pid`
/// has open at `tfd` right now (kcmp KCMP_EPOLL_TFD).
pub fn registered_is_open(pid: i32, efd: i32, tfd: i32, toff: u32) -> io::Result<bool> {
    const KCMP_EPOLL_TFD: libc::c_long = 7;
    let slot = KcmpEpollSlot { efd: efd as u32, tfd: tfd as u32, toff };
    // SAFETY: `slot` is a valid kcmp_epoll_slot the kernel only reads during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid as libc::c_long,
            pid as libc::c_long,
            KCMP_EPOLL_TFD,
            tfd as libc::c_long,
            &slot as *const KcmpEpollSlot,
        )
    };
    Ok(cvt(r)? == 0)
}

/// One registration to make: description `src` (a descriptor of floe),
/// registered under the number `tfd` of the restored process.
#[derive(Clone, Copy, Debug)]
pub struct Registration {
    pub src: RawFd,
    pub tfd: i32,
    pub events: u32,
    pub data: u64,
}

fn epoll_add_raw(ep: RawFd, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    cvt(r as libc::c_long).map(drop)
}

fn rlimit_nofile() -> io::Result<libc::rlimit> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `rl` is a valid out pointer.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    cvt(r as libc::c_long)?;
    Ok(rl)
}

fn set_rlimit_nofile(rl: &libc::rlimit) -> io::Result<()> {
    // SAFETY: `rl` is a valid pointer for reading.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, rl) };
    cvt(r as libc::c_long).map(drop)
}

/// Adds every registration to epoll `ep` under its own descriptor number.
///
/// An epoll item is keyed by (file, descriptor number): the restored process
/// can only modify or delete an item (EPOLL_CTL_MOD/DEL) if it was added
/// under the number the process uses. floe's own table may hold anything at
/// those numbers, so this runs in a short-lived thread that first gives
/// itself a private copy of the descriptor table (unshare(CLONE_FILES)),
/// puts each description at its number there and adds it. The items stay
/// when that table goes away: epoll drops an item only when the file itself
/// is released, and floe still holds every description.
///
/// On failure returns the index of the failing registration (None: setup
/// failed) and the error.
pub fn add_at_numbers(ep: BorrowedFd<'_>, regs: &[Registration]) -> Result<(), (Option<usize>, io::Error)> {
    if regs.is_empty() {
        return Ok(());
    }
    let base = regs.iter().map(|r| r.tfd).max().unwrap_or(0).max(2) + 1;
    // dup3 to a number at or above RLIMIT_NOFILE fails: raise it for the
    // duration (the limit is per process; it is put back below).
    let need = base as u64 + regs.len() as u64 + 2;
    let old = rlimit_nofile().map_err(|e| (None, e))?;
    let raised = old.rlim_cur < need;
    if raised {
        let top = old.rlim_max.max(need);
        let new = libc::rlimit { rlim_cur: top, rlim_max: top };
        set_rlimit_nofile(&new).map_err(|e| (None, e))?;
    }
    let ep_raw = ep.as_raw_fd();
    let res = std::thread::scope(|s| {
        let worker = std::thread::Builder::new().name("floe-epoll".into()).spawn_scoped(s, || {
            // SAFETY: plain syscall with an integer argument; from here on this
            // thread has its own descriptor table, so the numbers below are
            // private to it and released when the thread exits.
            let r = unsafe { libc::unshare(libc::CLONE_FILES) };
            cvt(r as libc::c_long).map_err(|e| (None, e))?;
            // Move the epoll and every source above all target numbers first,
            // so placing one target never overwrites another source.
            let dup_high = |fd: RawFd| -> io::Result<RawFd> {
                // SAFETY: F_DUPFD_CLOEXEC takes an integer argument.
                let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) };
                cvt(r as libc::c_long).map(|v| v as RawFd)
            };
            let ep_high = dup_high(ep_raw).map_err(|e| (None, e))?;
            let mut high = Vec::with_capacity(regs.len());
            for (i, r) in regs.iter().enumerate() {
                high.push(dup_high(r.src).map_err(|e| (Some(i), e))?);
            }
            for (i, (r, &h)) in regs.iter().zip(&high).enumerate() {
                // SAFETY: dup3 on descriptors of this thread's private table;
                // whatever `tfd` held there is only a private copy.
                let d = unsafe { libc::dup3(h, r.tfd, libc::O_CLOEXEC) };
                cvt(d as libc::c_long).map_err(|e| (Some(i), e))?;
                epoll_add_raw(ep_high, r.tfd, r.events, r.data).map_err(|e| (Some(i), e))?;
            }
            Ok::<(), (Option<usize>, io::Error)>(())
        });
        match worker {
            Ok(w) => w.join().unwrap_or_else(|_| Err((None, io::Error::other("registration thread panicked")))),
            Err(e) => Err((None, e)),
        }
    });
    if raised {
        let _ = set_rlimit_nofile(&old);
    }
    res
}

// ---------------------------------------------------------------------------
// inotify

/// inotify_init1(2) with `flags` (IN_NONBLOCK) and IN_CLOEXEC.
pub fn inotify_init(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with an integer argument.
    let r = unsafe { libc::inotify_init1(flags | libc::IN_CLOEXEC) };
    owned(r as libc::c_long)
}

/// inotify_add_watch(2); returns the watch descriptor.
pub fn add_watch(fd: &impl AsRawFd, path: &Path, mask: u32) -> io::Result<i32> {
    let c = cpath(path)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let r = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    cvt(r as libc::c_long).map(|v| v as i32)
}

/// inotify_rm_watch(2).
pub fn rm_watch(fd: &impl AsRawFd, wd: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
    cvt(r as libc::c_long).map(drop)
}

/// Bytes ready to be read (FIONREAD).
pub fn bytes_queued(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the valid pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    cvt(r as libc::c_long)?;
    Ok(n.max(0) as usize)
}

/// Reads and discards everything queued on a non-blocking descriptor.
pub fn drain(fd: &impl AsRawFd) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(()),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        if r == 0 {
            return Ok(());
        }
    }
}

/// Largest file handle the kernel hands out (MAX_HANDLE_SZ).
pub const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}
const _: () = assert!(std::mem::size_of::<FileHandle>() == 8 + MAX_HANDLE_SZ);

/// open_by_handle_at(2) with O_PATH: the object a file handle names, found
/// through `mount` (any descriptor on the same filesystem).
pub fn open_by_handle(mount: &impl AsRawFd, handle_type: i32, handle: &[u8]) -> io::Result<OwnedFd> {
    if handle.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut fh = FileHandle { handle_bytes: handle.len() as u32, handle_type, f_handle: [0; MAX_HANDLE_SZ] };
    fh.f_handle[..handle.len()].copy_from_slice(handle);
    // SAFETY: `fh` is a valid file_handle whose handle_bytes does not exceed
    // its buffer; the kernel only reads it.
    let r = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&mut fh as *mut FileHandle).cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    owned(r as libc::c_long)
}
