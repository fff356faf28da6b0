//! ptrace requests used to freeze, inspect and drive a task.
use super::cvt;
use std::io;

pub type UserRegs = libc::user_regs_struct;

const _: () = assert!(std::mem::size_of::<UserRegs>() == 27 * 8);

pub const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Upper bound for the xsave area (AMX-capable CPUs need ~11 KiB).
pub const XSTATE_MAX: usize = 16 * 1024;

/// Options for a process being dumped: syscall stops are marked. If floe
/// dies, the kernel detaches and the process runs on.
pub const DUMP_OPTIONS: libc::c_int = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_SUSPEND_SECCOMP;
/// Options for a restore stub: it must not outlive a floe that died midway.
pub const STUB_OPTIONS: libc::c_int = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL;

/// Attaches to `pid` without stopping it.
pub fn seize(pid: i32, options: libc::c_int) -> io::Result<()> {
    // SAFETY: PTRACE_SEIZE takes no pointers; `options` is passed by value.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, options as usize) };
    cvt(r).map(drop)
}

/// Asks a seized task to enter a ptrace stop.
pub fn interrupt(pid: i32) -> io::Result<()> {
    // SAFETY: no pointers are involved.
    let r = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0usize, 0usize) };
    cvt(r).map(drop)
}

/// Detaches, optionally delivering `sig`.
pub fn detach(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers are involved.
    let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0usize, sig as usize) };
    cvt(r).map(drop)
}

/// Resumes the task until the next syscall entry or exit.
pub fn syscall(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers are involved.
    let r = unsafe { libc::ptrace(libc::PTRACE_SYSCALL, pid, 0usize, sig as usize) };
    cvt(r).map(drop)
}

/// Resumes the task.
pub fn cont(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers are involved.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0usize, sig as usize) };
    cvt(r).map(drop)
}

/// Reads the general-purpose registers (NT_PRSTATUS).
pub fn get_regs(pid: i32) -> io::Result<UserRegs> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut regs: UserRegs = unsafe { std::mem::zeroed() };
    let mut iov =
        libc::iovec { iov_base: (&mut regs as *mut UserRegs).cast(), iov_len: std::mem::size_of::<UserRegs>() };
    // SAFETY: iov points at a live, correctly sized buffer for the duration of the call.
    let r =
        unsafe { libc::ptrace(libc::PTRACE_GETREGSET, pid, libc::NT_PRSTATUS as usize, &mut iov as *mut libc::iovec) };
    cvt(r)?;
    Ok(regs)
}

/// Writes the general-purpose registers (NT_PRSTATUS).
pub fn set_regs(pid: i32, regs: &UserRegs) -> io::Result<()> {
    let mut copy = *regs;
    let mut iov =
        libc::iovec { iov_base: (&mut copy as *mut UserRegs).cast(), iov_len: std::mem::size_of::<UserRegs>() };
    // SAFETY: iov points at a live, correctly sized buffer for the duration of the call.
    let r =
        unsafe { libc::ptrace(libc::PTRACE_SETREGSET, pid, libc::NT_PRSTATUS as usize, &mut iov as *mut libc::iovec) };
    cvt(r).map(drop)
}

/// Reads the extended (xsave) state; the returned length is the kernel's.
pub fn get_xstate(pid: i32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: iov describes `buf`, which outlives the call; the kernel shrinks iov_len.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETREGSET, pid, NT_X86_XSTATE as usize, &mut iov as *mut libc::iovec) };
    cvt(r)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Writes the extended (xsave) state.
pub fn set_xstate(pid: i32, state: &[u8]) -> io::Result<()> {
    let mut buf = state.to_vec();
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: iov describes `buf`, which outlives the call.
    let r = unsafe { libc::ptrace(libc::PTRACE_SETREGSET, pid, NT_X86_XSTATE as usize, &mut iov as *mut libc::iovec) };
    cvt(r).map(drop)
}

/// Reads the blocked-signal mask.
pub fn get_sigmask(pid: i32) -> io::Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: the kernel writes exactly 8 bytes (the size we pass) into `mask`.
    let r = unsafe { libc::ptrace(PTRACE_GETSIGMASK as libc::c_uint, pid, 8usize, &mut mask as *mut u64) };
    cvt(r)?;
    Ok(mask)
}

/// Sets the blocked-signal mask.
pub fn set_sigmask(pid: i32, mask: u64) -> io::Result<()> {
    let m = mask;
    // SAFETY: the kernel reads exactly 8 bytes from `m`.
    let r = unsafe { libc::ptrace(PTRACE_SETSIGMASK as libc::c_uint, pid, 8usize, &m as *const u64) };
    cvt(r).map(drop)
}

/// Kernel's `struct ptrace_rseq_configuration`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RseqConfig {
    pub ptr: u64,
    pub len: u32,
    pub sig: u32,
    pub flags: u32,
    pub pad: u32,
}
const _: () = assert!(std::mem::size_of::<RseqConfig>() == 24);

/// Reads the task's rseq registration (zeroes when none).
pub fn get_rseq(pid: i32) -> io::Result<RseqConfig> {
    let mut cfg = RseqConfig::default();
    // SAFETY: the kernel writes at most `size` bytes into `cfg`.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION as libc::c_uint,
            pid,
            std::mem::size_of::<RseqConfig>(),
            &mut cfg as *mut RseqConfig,
        )
    };
    cvt(r)?;
    Ok(cfg)
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}
const _: () = assert!(std::mem::size_of::<PeekSiginfoArgs>() == 16);

/// Size of the kernel's siginfo_t.
pub const SIGINFO_SIZE: usize = 128;

/// Returns the queued signals (per-thread or shared) without dequeuing them.
pub fn peek_siginfo(pid: i32, shared: bool) -> io::Result<Vec<[u8; SIGINFO_SIZE]>> {
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; SIGINFO_SIZE]; 32];
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: buf.len() as i32,
        };
        // SAFETY: `buf` has room for `nr` siginfo records; `args` is read by the kernel.
        let r = unsafe {
            libc::ptrace(PTRACE_PEEKSIGINFO as libc::c_uint, pid, &args as *const PeekSiginfoArgs, buf.as_mut_ptr())
        };
        let n = cvt(r)? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// Outcome of waiting for a traced task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// PTRACE_EVENT_STOP (interrupt or group stop).
    Event,
    /// A syscall entry or exit stop (TRACESYSGOOD).
    Syscall,
    /// A signal-delivery stop with this signal.
    Signal(i32),
    /// Another ptrace event.
    OtherEvent(i32),
    /// The task exited with this status.
    Exited(i32),
    /// The task was killed by this signal.
    Killed(i32),
}

/// Waits for the next state change of `pid` (a tracee or child).
pub fn wait(pid: i32) -> io::Result<Stop> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(decode_status(status));
    }
}

fn decode_status(status: libc::c_int) -> Stop {
    if libc::WIFEXITED(status) {
        return Stop::Exited(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        return Stop::Killed(libc::WTERMSIG(status));
    }
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    if sig == libc::SIGTRAP | 0x80 {
        return Stop::Syscall;
    }
    if event == PTRACE_EVENT_STOP {
        return Stop::Event;
    }
    if event != 0 {
        return Stop::OtherEvent(event);
    }
    Stop::Signal(sig)
}

/// Non-blocking check whether `pid` (a child) has changed state.
pub fn try_wait(pid: i32) -> io::Result<Option<Stop>> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    Ok(Some(decode_status(status)))
}

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;

/// Changes the ptrace options of a tracee.
pub fn set_options(pid: i32, options: libc::c_int) -> io::Result<()> {
    // SAFETY: PTRACE_SETOPTIONS takes the options by value.
    let r = unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0usize, options as usize) };
    cvt(r).map(drop)
}

/// The seccomp filters of a thread, oldest first, each as raw sock_filter
/// instructions with its flags. Empty when the thread has none.
pub fn seccomp_filters(tid: i32) -> io::Result<Vec<(Vec<u8>, u64)>> {
    let mut out = Vec::new();
    for idx in 0u64.. {
        // SAFETY: with a null buffer the kernel only returns the instruction count.
        let n = unsafe {
            libc::ptrace(PTRACE_SECCOMP_GET_FILTER as libc::c_uint, tid, idx as usize, std::ptr::null_mut::<u8>())
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: past the oldest filter; EINVAL: no filter at all.
            if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) {
                break;
            }
            return Err(e);
        }
        let mut buf = vec![0u8; n as usize * 8];
        // SAFETY: `buf` holds `n` sock_filter entries (8 bytes each).
        let r = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER as libc::c_uint, tid, idx as usize, buf.as_mut_ptr()) };
        cvt(r)?;
        let mut meta = [idx, 0u64];
        // SAFETY: the kernel reads filter_off and writes flags in the 16-byte struct.
        let r = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_METADATA as libc::c_uint, tid, 16usize, meta.as_mut_ptr()) };
        let flags = if r < 0 { 0 } else { meta[1] };
        out.push((buf, flags));
    }
    out.reverse();
    Ok(out)
}

/// PTRACE_GETEVENTMSG: for a fork/clone event stop, the new task's pid in
/// the tracer's pid namespace.
pub fn event_msg(pid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: the kernel writes one unsigned long into `msg`.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, pid, 0usize, &mut msg as *mut libc::c_ulong) };
    cvt(r)?;
    Ok(msg as u64)
}
