//! Raw kernel access for `floe check`: every syscall, ioctl and `unsafe` block the
//! probes in [`crate::check`] need, behind small safe functions. Calls the engine
//! itself makes (pidfd, userfaultfd, PAGEMAP_SCAN, SO_RCVTIMEO) are not copied
//! here: the probes use the engine's own wrappers, so that they test exactly those.
//!
//! The caller may be multi-threaded, so every child created here (by `fork` or raw
//! `clone3`) runs only raw, async-signal-safe syscalls through `libc::syscall` and
//! leaves with `exit_group`: no allocation, no locks, no std. A [`Child`] kills and
//! reaps its process when dropped, so no probe can leak one.
//!
//! Kernel ABI constants and structs that older libc versions lack are written out
//! here, each struct with a compile-time size assert against the kernel's.

use std::fmt;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// errors

/// A failed system call: which call, and the errno it returned.
#[derive(Debug)]
pub struct SysError {
    /// The call that failed, e.g. `"ptrace(PTRACE_SEIZE)"`.
    pub op: &'static str,
    /// The OS error.
    pub source: io::Error,
}

impl SysError {
    fn last(op: &'static str) -> Self {
        SysError { op, source: io::Error::last_os_error() }
    }

    fn from_errno(op: &'static str, errno: i32) -> Self {
        SysError { op, source: io::Error::from_raw_os_error(errno) }
    }

    /// For `map_err` on the engine's own `io::Result` wrappers (e.g.
    /// [`super::task::pidfd_open`]): their error as a failure of `op`.
    pub fn of(op: &'static str) -> impl FnOnce(io::Error) -> SysError {
        move |source| SysError { op, source }
    }

    /// The errno, if the error came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, describe_io(&self.source))
    }
}

impl std::error::Error for SysError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Symbolic name of an errno value (`"EPERM"`), or `"errno N"` for rare ones.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// Lowercase one-line description of an I/O error: the errno name for OS errors.
pub fn describe_io(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(errno) => errno_name(errno),
        None => {
            let text = err.to_string();
            let mut chars = text.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => text,
            }
        }
    }
}

/// Turns a raw `-1`-on-error return value into a `Result`.
fn check(op: &'static str, ret: libc::c_long) -> Result<libc::c_long, SysError> {
    if ret < 0 {
        Err(SysError::last(op))
    } else {
        Ok(ret)
    }
}

/// Wraps a fresh file descriptor returned by the kernel.
fn owned_fd(op: &'static str, ret: libc::c_long) -> Result<OwnedFd, SysError> {
    let fd = check(op, ret)?;
    let fd = RawFd::try_from(fd).map_err(|_| SysError::from_errno(op, libc::EBADF))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------
// children

/// Decoded `waitpid` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEvent {
    /// The child exited with this code.
    Exited(i32),
    /// The child was killed by this signal.
    Signaled(i32),
    /// The child is in a stop: `sig` is the stop signal, `event` the ptrace event (status >> 16).
    Stopped {
        /// Stop signal.
        sig: i32,
        /// `PTRACE_EVENT_*` value, 0 for plain stops.
        event: i32,
    },
}

fn decode_status(status: i32) -> WaitEvent {
    if libc::WIFEXITED(status) {
        WaitEvent::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        WaitEvent::Signaled(libc::WTERMSIG(status))
    } else {
        WaitEvent::Stopped { sig: libc::WSTOPSIG(status), event: (status >> 16) & 0xff }
    }
}

/// A child process created by a probe. Dropping it kills it with SIGKILL (if it has
/// not been reaped yet) and reaps it, waiting at most two seconds.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    reaped: bool,
}

impl Child {
    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn waitpid_nohang(&self) -> Result<Option<i32>, SysError> {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let ret = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if ret < 0 {
            let err = SysError::last("waitpid");
            if err.errno() == Some(libc::EINTR) {
                return Ok(None);
            }
            return Err(err);
        }
        if ret == 0 {
            return Ok(None);
        }
        Ok(Some(status))
    }

    /// Waits (polling) until the child exits, is killed or stops; reports what happened.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<WaitEvent, SysError> {
        if self.reaped {
            return Err(SysError::from_errno("waitpid", libc::ECHILD));
        }
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_micros(10);
        loop {
            match self.waitpid_nohang() {
                Ok(Some(status)) => {
                    let event = decode_status(status);
                    if !matches!(event, WaitEvent::Stopped { .. }) {
                        self.reaped = true;
                    }
                    return Ok(event);
                }
                Ok(None) => {}
                Err(err) => {
                    if err.errno() == Some(libc::ECHILD) {
                        // somebody else reaped it (SIGCHLD ignored, or a wait(-1) elsewhere)
                        self.reaped = true;
                    }
                    return Err(err);
                }
            }
            if Instant::now() >= deadline {
                return Err(SysError::from_errno("waitpid", libc::ETIMEDOUT));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(2));
        }
    }

    /// Sends a signal to the child.
    pub fn signal(&self, sig: i32) -> Result<(), SysError> {
        if self.reaped || self.pid <= 0 {
            return Err(SysError::from_errno("kill", libc::ESRCH));
        }
        // SAFETY: kill takes plain integers; `pid` is our own unreaped child, so the pid
        // cannot have been recycled for another process.
        let ret = unsafe { libc::kill(self.pid, sig) };
        check("kill", ret.into()).map(drop)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.signal(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.reaped {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_timeout(left) {
                Ok(_) => {}
                Err(err) => {
                    if !self.reaped {
                        tracing::warn!(pid = self.pid, "could not reap probe child: {err}");
                    }
                    return;
                }
            }
        }
    }
}

/// `exit_group` without running any user-space exit code.
fn raw_exit(code: i32) -> ! {
    loop {
        // SAFETY: exit_group takes an integer and never returns.
        unsafe {
            libc::syscall(libc::SYS_exit_group, libc::c_long::from(code));
        }
    }
}

/// errno of the calling thread (async-signal-safe: reads a thread-local int).
fn raw_errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Child exit code for a failed raw syscall: its errno, never 0.
fn errno_exit_code() -> i32 {
    let errno = raw_errno();
    if (1..=255).contains(&errno) {
        errno
    } else {
        255
    }
}

/// Forks. In the child, runs `body` and exits with its return value.
///
/// `body` must only make raw syscalls (`libc::syscall`): the parent may be
/// multi-threaded, so the child must not allocate or take locks. This helper is
/// private so that every body lives in this file and can be checked for that.
fn fork_run<F: FnOnce() -> i32>(body: F) -> Result<Child, SysError> {
    // SAFETY: fork has no memory-safety preconditions. The child branch only runs
    // `body`, which by this private helper's contract makes raw syscalls, and then
    // leaves through exit_group without returning into the caller.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(SysError::last("fork")),
        0 => raw_exit(body()),
        pid => Ok(Child { pid, reaped: false }),
    }
}

/// Child prologue: die with the parent thread, and close every inherited fd
/// except 0-2 and `keep`.
fn child_prologue(parent: libc::pid_t, keep: Option<RawFd>) -> Result<(), i32> {
    // SAFETY: raw prctl with integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::c_long::from(libc::PR_SET_PDEATHSIG),
            libc::c_long::from(libc::SIGKILL),
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if ret < 0 {
        return Err(errno_exit_code());
    }
    // SAFETY: raw getppid, no arguments.
    let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
    if ppid != libc::c_long::from(parent) {
        // the parent died before PR_SET_PDEATHSIG took effect
        return Err(libc::ESRCH);
    }
    let close = |first: u32, last: u32| {
        if first <= last {
            // SAFETY: raw close_range with integer arguments; closing descriptors in
            // this single-threaded child cannot invalidate memory.
            unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    libc::c_long::from(first),
                    libc::c_long::from(last),
                    0 as libc::c_long,
                );
            }
        }
    };
    match keep.and_then(|fd| u32::try_from(fd).ok()) {
        Some(fd) if fd >= 3 => {
            close(3, fd - 1);
            if fd < u32::MAX {
                close(fd + 1, u32::MAX);
            }
        }
        _ => close(3, u32::MAX),
    }
    Ok(())
}

fn pause_forever() -> ! {
    loop {
        // SAFETY: raw pause, no arguments.
        unsafe {
            libc::syscall(libc::SYS_pause);
        }
    }
}

fn getpid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Forks a child that sleeps in `pause()` until killed. It keeps only fds 0-2 and
/// `keep`, and is killed if the calling thread dies.
pub fn spawn_pausing_child(keep: Option<RawFd>) -> Result<Child, SysError> {
    let parent = getpid();
    fork_run(move || match child_prologue(parent, keep) {
        Ok(()) => pause_forever(),
        Err(code) => code,
    })
}

// ---------------------------------------------------------------------------
// ptrace

const PTRACE_GETREGSET: libc::c_long = 0x4204;
const PTRACE_SEIZE: libc::c_long = 0x4206;
const PTRACE_INTERRUPT: libc::c_long = 0x4207;
const NT_PRSTATUS: libc::c_long = 1;
/// `PTRACE_EVENT_STOP`: the event of a stop caused by PTRACE_INTERRUPT.
pub const PTRACE_EVENT_STOP: i32 = 128;

/// x86_64 `struct user_regs_struct`: 27 64-bit registers.
#[repr(C)]
struct UserRegs([u64; 27]);
const _: () = assert!(size_of::<UserRegs>() == 216);

/// The registers of a stopped tracee that the probes look at.
#[derive(Debug, Clone, Copy)]
pub struct StopRegs {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// rax: the syscall's return value (e.g. -ERESTARTNOHAND).
    pub rax: i64,
    /// orig_rax: the syscall the tracee was in, or -1.
    pub orig_rax: i64,
}

/// PTRACE_SEIZE with the given options (no stop happens yet).
pub fn ptrace_seize(pid: i32, options: u32) -> Result<(), SysError> {
    // SAFETY: PTRACE_SEIZE takes no pointers: addr is 0 and data is the options value.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            PTRACE_SEIZE,
            libc::c_long::from(pid),
            0 as libc::c_long,
            libc::c_long::from(options),
        )
    };
    check("ptrace(PTRACE_SEIZE)", ret).map(drop)
}

/// PTRACE_INTERRUPT: asks a seized tracee to enter a PTRACE_EVENT_STOP.
pub fn ptrace_interrupt(pid: i32) -> Result<(), SysError> {
    // SAFETY: PTRACE_INTERRUPT takes no pointers.
    let ret = unsafe {
        libc::syscall(libc::SYS_ptrace, PTRACE_INTERRUPT, libc::c_long::from(pid), 0 as libc::c_long, 0 as libc::c_long)
    };
    check("ptrace(PTRACE_INTERRUPT)", ret).map(drop)
}

/// PTRACE_GETREGSET NT_PRSTATUS of a tracee in a ptrace stop.
pub fn ptrace_get_prstatus(pid: i32) -> Result<StopRegs, SysError> {
    let mut regs = UserRegs([0; 27]);
    let mut iov = libc::iovec { iov_base: regs.0.as_mut_ptr().cast(), iov_len: size_of::<UserRegs>() };
    // SAFETY: `iov` describes `regs`, a writable buffer of exactly iov_len bytes that
    // outlives the call; the kernel writes at most iov_len bytes and updates iov_len.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            PTRACE_GETREGSET,
            libc::c_long::from(pid),
            NT_PRSTATUS,
            &mut iov as *mut libc::iovec,
        )
    };
    check("ptrace(PTRACE_GETREGSET)", ret)?;
    if iov.iov_len != size_of::<UserRegs>() {
        return Err(SysError::from_errno("ptrace(PTRACE_GETREGSET)", libc::EIO));
    }
    // x86_64 user_regs_struct order: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx
    // rdx rsi rdi orig_rax rip cs eflags rsp ...
    let r = &regs.0;
    Ok(StopRegs { rax: r[10] as i64, orig_rax: r[15] as i64, rip: r[16], rsp: r[19] })
}

// ---------------------------------------------------------------------------
// pipes

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> Result<(OwnedFd, OwnedFd), SysError> {
    let mut fds: [libc::c_int; 2] = [-1, -1];
    // SAFETY: `fds` is a writable array of two c_ints, as pipe2 requires.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    check("pipe2", ret.into())?;
    // SAFETY: pipe2 succeeded, so both fds are new descriptors that nothing else owns.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(pair)
}

// ---------------------------------------------------------------------------
// clone3 with set_tid

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
const _: () = assert!(size_of::<CloneArgs>() == 88);

/// Child exit code of [`clone3_with_tid`] when getpid() matched the requested pid.
pub const CLONE3_PID_MATCH: i32 = 0;
/// Child exit code of [`clone3_with_tid`] when getpid() differed.
pub const CLONE3_PID_MISMATCH: i32 = 1;

/// clone3 with `set_tid = [tid]` (fork-like: no shared memory, SIGCHLD on exit).
/// The child compares its getpid() with `tid` and exits at once with
/// [`CLONE3_PID_MATCH`] or [`CLONE3_PID_MISMATCH`]. EEXIST means `tid` is taken.
pub fn clone3_with_tid(tid: i32) -> Result<Child, SysError> {
    let set_tid: [libc::pid_t; 1] = [tid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: `args` and the set_tid array it points to are valid for the call. Without
    // CLONE_VM the child gets a private copy of our memory, like fork; the child branch
    // below only makes raw syscalls and leaves through exit_group.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, size_of::<CloneArgs>()) };
    if ret == 0 {
        // SAFETY: raw getpid, no arguments.
        let me = unsafe { libc::syscall(libc::SYS_getpid) };
        raw_exit(if me == libc::c_long::from(tid) { CLONE3_PID_MATCH } else { CLONE3_PID_MISMATCH });
    }
    let pid = check("clone3", ret)?;
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| SysError::from_errno("clone3", libc::ERANGE))?;
    Ok(Child { pid, reaped: false })
}

// ---------------------------------------------------------------------------
// PR_SET_MM_MAP

const PR_SET_MM_MAP: libc::c_long = 14;
const PR_SET_MM_MAP_SIZE: libc::c_long = 15;

/// `struct prctl_mm_map`.
#[repr(C)]
#[derive(Clone, Copy)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}
const _: () = assert!(size_of::<PrctlMmMap>() == 104);

/// The size of `struct prctl_mm_map` this module was written against.
pub const PRCTL_MM_MAP_SIZE: u32 = size_of::<PrctlMmMap>() as u32;

/// The address fields of PR_SET_MM_MAP (brk is read in the child itself).
#[derive(Debug, Clone, Copy, Default)]
pub struct MmMapValues {
    /// start_code.
    pub start_code: u64,
    /// end_code.
    pub end_code: u64,
    /// start_data.
    pub start_data: u64,
    /// end_data.
    pub end_data: u64,
    /// start_brk.
    pub start_brk: u64,
    /// start_stack.
    pub start_stack: u64,
    /// arg_start.
    pub arg_start: u64,
    /// arg_end.
    pub arg_end: u64,
    /// env_start.
    pub env_start: u64,
    /// env_end.
    pub env_end: u64,
}

/// prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE): the kernel's size of `struct prctl_mm_map`.
pub fn prctl_mm_map_size() -> Result<u32, SysError> {
    let mut size: libc::c_uint = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes one unsigned int to the pointer, which points
    // at `size`; nothing else about the process changes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::c_long::from(libc::PR_SET_MM),
            PR_SET_MM_MAP_SIZE,
            &mut size as *mut libc::c_uint,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    check("prctl(PR_SET_MM_MAP_SIZE)", ret)?;
    Ok(size)
}

/// Forks a child that applies PR_SET_MM_MAP to itself with `values`, its own current
/// brk (read with the raw brk syscall after the fork), `auxv` and exe_fd = -1. The
/// child exits with 0 on success or with the errno. The values should be the
/// caller's own (the child's mm is a copy of it), so nothing changes in the child.
pub fn spawn_set_mm_map_child(values: &MmMapValues, auxv: &[u8]) -> Result<Child, SysError> {
    let auxv_size = u32::try_from(auxv.len()).map_err(|_| SysError::from_errno("prctl", libc::E2BIG))?;
    let map = PrctlMmMap {
        start_code: values.start_code,
        end_code: values.end_code,
        start_data: values.start_data,
        end_data: values.end_data,
        start_brk: values.start_brk,
        brk: 0,
        start_stack: values.start_stack,
        arg_start: values.arg_start,
        arg_end: values.arg_end,
        env_start: values.env_start,
        env_end: values.env_end,
        auxv: auxv.as_ptr() as u64,
        auxv_size,
        exe_fd: u32::MAX, // -1: keep /proc/self/exe
    };
    let parent = getpid();
    fork_run(move || {
        if let Err(code) = child_prologue(parent, None) {
            return code;
        }
        let mut map = map;
        // SAFETY: raw brk(0) only queries the current program break.
        map.brk = unsafe { libc::syscall(libc::SYS_brk, 0 as libc::c_long) } as u64;
        // SAFETY: `map` is a valid prctl_mm_map of the size passed; its auxv pointer
        // refers to the caller's buffer, present in this child's copy of the memory
        // (the caller borrows it for this call, before the fork).
        let ret = unsafe {
            libc::syscall(
                libc::SYS_prctl,
                libc::c_long::from(libc::PR_SET_MM),
                PR_SET_MM_MAP,
                &map as *const PrctlMmMap,
                size_of::<PrctlMmMap>(),
                0 as libc::c_long,
            )
        };
        if ret < 0 {
            errno_exit_code()
        } else {
            0
        }
    })
}

// ---------------------------------------------------------------------------
// anonymous mappings

/// Page size of the machine.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

/// A private anonymous read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct AnonMapping {
    addr: usize,
    len: usize,
    page: usize,
}

impl AnonMapping {
    /// Maps `pages` fresh (unpopulated) pages.
    pub fn new(pages: usize) -> Result<Self, SysError> {
        let page = page_size();
        let len =
            pages.checked_mul(page).filter(|l| *l > 0).ok_or_else(|| SysError::from_errno("mmap", libc::EINVAL))?;
        // SAFETY: an anonymous private mapping at an address chosen by the kernel
        // does not alias any existing memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(SysError::last("mmap"));
        }
        Ok(AnonMapping { addr: addr as usize, len, page })
    }

    /// Start address.
    pub fn start(&self) -> u64 {
        self.addr as u64
    }

    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        (self.addr + self.len) as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address of page `index`.
    pub fn page_addr(&self, index: usize) -> u64 {
        (self.addr + index * self.page) as u64
    }

    /// Writes `value` into the first byte of page `index` (ignored if out of range).
    pub fn touch(&mut self, index: usize, value: u8) {
        if index >= self.len / self.page {
            return;
        }
        let ptr = (self.addr + index * self.page) as *mut u8;
        // SAFETY: `ptr` lies inside this live read-write mapping, which no Rust
        // reference covers; `&mut self` rules out a concurrent store from this
        // process, and a volatile byte store cannot be elided.
        unsafe { std::ptr::write_volatile(ptr, value) };
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no references into it
        // exist (it is only accessed through raw volatile stores).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

// ---------------------------------------------------------------------------
// soft-dirty

/// Child exit code of [`spawn_soft_dirty_child`]: pagemap bit 55 set after the write.
pub const SOFT_DIRTY_SET: i32 = 0;
/// Child exit code: the page is present but bit 55 is clear.
pub const SOFT_DIRTY_CLEAR: i32 = 1;
/// Child exit code: the page is not present after the write (the read was bogus).
pub const SOFT_DIRTY_NOT_PRESENT: i32 = 2;
/// Child exit code: opening or writing /proc/self/clear_refs failed.
pub const SOFT_DIRTY_CLEAR_REFS_FAILED: i32 = 3;
/// Child exit code: opening or reading /proc/self/pagemap failed.
pub const SOFT_DIRTY_PAGEMAP_FAILED: i32 = 4;

/// pagemap entry bits.
const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_PRESENT: u64 = 1 << 63;

/// Forks a child that writes "4" to its own /proc/self/clear_refs, writes page 0 of
/// `mapping`, and reads its pagemap entry; it exits with one of the `SOFT_DIRTY_*`
/// codes. Done in a child so that clearing soft-dirty bits never touches the caller.
pub fn spawn_soft_dirty_child(mapping: &AnonMapping) -> Result<Child, SysError> {
    let addr = mapping.addr;
    let page = mapping.page;
    let parent = getpid();
    fork_run(move || {
        if let Err(code) = child_prologue(parent, None) {
            return code;
        }
        let open = |path: &std::ffi::CStr, flags: i32| {
            // SAFETY: raw openat with a NUL-terminated static path.
            unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::c_long::from(libc::AT_FDCWD),
                    path.as_ptr(),
                    libc::c_long::from(flags | libc::O_CLOEXEC),
                )
            }
        };
        let fd = open(c"/proc/self/clear_refs", libc::O_WRONLY);
        if fd < 0 {
            return SOFT_DIRTY_CLEAR_REFS_FAILED;
        }
        let four = b"4";
        // SAFETY: raw write of a 1-byte static buffer to an fd we opened.
        let wrote = unsafe { libc::syscall(libc::SYS_write, fd, four.as_ptr(), 1usize) };
        // SAFETY: raw close of the fd we opened.
        unsafe { libc::syscall(libc::SYS_close, fd) };
        if wrote != 1 {
            return SOFT_DIRTY_CLEAR_REFS_FAILED;
        }
        // SAFETY: `addr` is the start of the caller's live read-write mapping, copied
        // into this child by fork; a volatile byte store to it is in bounds.
        unsafe { std::ptr::write_volatile(addr as *mut u8, 0x5a) };
        let fd = open(c"/proc/self/pagemap", libc::O_RDONLY);
        if fd < 0 {
            return SOFT_DIRTY_PAGEMAP_FAILED;
        }
        let mut entry: u64 = 0;
        let offset = (addr / page * 8) as libc::c_long;
        // SAFETY: raw pread64 of 8 bytes into `entry`, a writable u64.
        let got = unsafe { libc::syscall(libc::SYS_pread64, fd, &mut entry as *mut u64, 8usize, offset) };
        // SAFETY: raw close of the fd we opened.
        unsafe { libc::syscall(libc::SYS_close, fd) };
        if got != 8 {
            SOFT_DIRTY_PAGEMAP_FAILED
        } else if entry & PM_PRESENT == 0 {
            SOFT_DIRTY_NOT_PRESENT
        } else if entry & PM_SOFT_DIRTY != 0 {
            SOFT_DIRTY_SET
        } else {
            SOFT_DIRTY_CLEAR
        }
    })
}

// ---------------------------------------------------------------------------
// userfaultfd (write-protect, async)

/// A userfaultfd created with `UFFD_USER_MODE_ONLY` whose API handshake enabled
/// `WP_ASYNC | WP_UNPOPULATED`: write faults on registered ranges are resolved by
/// the kernel itself, so no thread can ever block on this fd. The calls are the
/// dirty tracker's own ([`super::track`]), so `floe check` tests exactly them;
/// so is PAGEMAP_SCAN ([`super::memory::pagemap_scan`]), which the check calls
/// directly.
#[derive(Debug)]
pub struct AsyncWpUffd {
    fd: OwnedFd,
    features: u64,
}

impl AsyncWpUffd {
    /// userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY) + UFFDIO_API.
    pub fn open() -> Result<Self, SysError> {
        let fd = super::track::userfaultfd().map_err(SysError::of("userfaultfd"))?;
        let wanted = super::track::UFFD_FEATURE_WP_ASYNC | super::track::UFFD_FEATURE_WP_UNPOPULATED;
        let features =
            super::track::uffd_api(std::os::fd::AsFd::as_fd(&fd), wanted).map_err(SysError::of("ioctl(UFFDIO_API)"))?;
        if features & wanted != wanted {
            return Err(SysError::from_errno("ioctl(UFFDIO_API)", libc::EOPNOTSUPP));
        }
        Ok(AsyncWpUffd { fd, features })
    }

    /// Features the kernel reported in UFFDIO_API.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// UFFDIO_REGISTER with MODE_WP over the whole mapping.
    pub fn register_wp(&self, mapping: &AnonMapping) -> Result<(), SysError> {
        super::track::uffd_register_wp(std::os::fd::AsFd::as_fd(&self.fd), mapping.start(), mapping.len() as u64)
            .map_err(SysError::of("ioctl(UFFDIO_REGISTER)"))
    }
}

// ---------------------------------------------------------------------------
// sockets

/// socket(domain, type | SOCK_CLOEXEC, protocol).
pub fn socket(domain: i32, ty: i32, protocol: i32) -> Result<OwnedFd, SysError> {
    // SAFETY: socket takes integers and returns a new fd.
    let ret = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    owned_fd("socket", ret.into())
}

/// setsockopt with an int value.
pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> Result<(), SysError> {
    // SAFETY: the option value points at `value`, an int of the length passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    check("setsockopt", ret.into()).map(drop)
}

/// getsockopt of an int value.
pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> Result<i32, SysError> {
    let mut value: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: value/len describe a writable int; the kernel writes at most len bytes.
    let ret = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut i32).cast(), &mut len) };
    check("getsockopt", ret.into())?;
    Ok(value)
}

/// `struct sockaddr_nl`.
#[repr(C)]
struct SockaddrNl {
    family: u16,
    pad: u16,
    pid: u32,
    groups: u32,
}
const _: () = assert!(size_of::<SockaddrNl>() == 12);

/// Sends one datagram to the kernel (netlink port 0).
pub fn netlink_send(fd: BorrowedFd<'_>, msg: &[u8]) -> Result<(), SysError> {
    let addr = SockaddrNl { family: libc::AF_NETLINK as u16, pad: 0, pid: 0, groups: 0 };
    // SAFETY: `msg` is a readable buffer of the length passed and `addr` a valid
    // sockaddr_nl of the length passed.
    let ret = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const SockaddrNl).cast(),
            size_of::<SockaddrNl>() as libc::socklen_t,
        )
    };
    let sent = check("sendto", ret as libc::c_long)?;
    if sent as usize != msg.len() {
        return Err(SysError::from_errno("sendto", libc::EIO));
    }
    Ok(())
}

/// recv into `buf`; returns the datagram's full length (MSG_TRUNC), which may
/// exceed `buf.len()` if it was truncated.
pub fn recv_datagram(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, SysError> {
    // SAFETY: `buf` is a writable buffer of the length passed.
    let ret = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
    let n = check("recv", ret as libc::c_long)?;
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_child_is_killed_and_reaped_on_drop() {
        let child = spawn_pausing_child(None).expect("spawn");
        let pid = child.pid();
        drop(child);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn check_errno_names() {
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_name(9999), "errno 9999");
        let timed_out = io::Error::new(io::ErrorKind::TimedOut, "Child did not stop");
        assert_eq!(describe_io(&timed_out), "child did not stop");
    }
}
