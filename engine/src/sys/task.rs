//! Process-level syscalls: creating the restore stub, limits, signals.
use super::cvt;
use std::io;

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
const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);

/// Creates the restore stub: a child with exactly `pid` that asks to be
/// killed when its parent dies and then waits in pause(2) forever.
///
/// The child runs only raw syscalls, so this is safe to call from a
/// multi-threaded process.
pub fn spawn_stub(pid: i32) -> io::Result<i32> {
    let tid: [i32; 1] = [pid];
    let parent = std::process::id() as libc::c_long;
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM duplicates the address space, so the
    // child owns a private copy of `args` and `tid`. The child branch below
    // only issues raw syscalls and never returns.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if r == 0 {
        // SAFETY: child side of clone3: only async-signal-safe raw syscalls, never returns.
        unsafe {
            libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::syscall(libc::SYS_getppid) != parent {
                libc::syscall(libc::SYS_exit_group, 1);
            }
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }
    cvt(r).map(|p| p as i32)
}

/// Reads a resource limit of another process.
pub fn get_rlimit(pid: i32, resource: u32) -> io::Result<(u64, u64)> {
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `old` is a valid out pointer; no new limit is passed.
    let r = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
    cvt(r as libc::c_long)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// Sets a resource limit of another process.
pub fn set_rlimit(pid: i32, resource: u32, cur: u64, max: u64) -> io::Result<()> {
    let new = libc::rlimit64 { rlim_cur: cur, rlim_max: max };
    // SAFETY: `new` is a valid pointer for reading; no old value is requested.
    let r = unsafe { libc::prlimit64(pid, resource as _, &new, std::ptr::null_mut()) };
    cvt(r as libc::c_long).map(drop)
}

/// Reads another thread's robust futex list head and length.
pub fn get_robust_list(tid: i32) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out pointers are valid for writes of their size.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &mut head as *mut u64, &mut len as *mut usize) };
    cvt(r)?;
    Ok((head, len as u64))
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::kill(pid, sig) };
    cvt(r as libc::c_long).map(drop)
}

/// Returns the calling process's umask without changing it.
pub fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; the original value is put back at once.
    let old = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    old
}

/// Whether `fd` of the calling process is a terminal.
pub fn isatty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

/// Sets the nice value of another process.
pub fn set_nice(pid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
    cvt(r as libc::c_long).map(drop)
}
