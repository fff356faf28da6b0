//! Running syscalls inside a ptrace-stopped task.
//!
//! The task's registers are pointed at a `syscall` instruction (found in its
//! [vdso]) and it is resumed with PTRACE_SYSCALL twice: once to the syscall
//! entry stop, once to the exit stop, where `rax` holds the result. No signal
//! is used, so the task's signal state is never disturbed.
use crate::sys::memory::{read_remote, write_remote, Range};
use crate::sys::ptrace::{self, Stop, UserRegs};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("ptrace {op} on pid {pid} failed")]
    Ptrace {
        op: &'static str,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} exited while floe was working on it ({how})")]
    Died { pid: i32, how: String },
    #[error("pid {pid}: injected syscall {nr} failed: {source}")]
    Syscall {
        pid: i32,
        nr: i64,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: no syscall instruction found in [vdso] at {start:#x}")]
    NoGadget { pid: i32, start: u64 },
    #[error("pid {pid}: memory access at {addr:#x} failed")]
    Memory {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}

fn pt(op: &'static str, pid: i32) -> impl FnOnce(std::io::Error) -> InjectError {
    move |source| InjectError::Ptrace { op, pid, source }
}

/// Executes syscalls in a stopped task.
pub struct Injector {
    pid: i32,
    base: UserRegs,
    gadget: u64,
    /// Number of syscalls injected so far.
    pub count: u64,
    /// Signals that stopped the task during injection (SIGKILL/SIGSTOP cannot be blocked).
    pub swallowed: Vec<i32>,
    /// The pid (in floe's namespace) of the task the last injected
    /// fork/clone created, from its ptrace event.
    pub last_child: Option<i32>,
}

impl Injector {
    /// `base` supplies the registers not used for arguments (segment
    /// registers, flags); `gadget` is the address of a `syscall` instruction.
    pub fn new(pid: i32, base: UserRegs, gadget: u64) -> Self {
        Self { pid, base, gadget, count: 0, swallowed: Vec::new(), last_child: None }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn gadget(&self) -> u64 {
        self.gadget
    }

    pub fn set_gadget(&mut self, gadget: u64) {
        self.gadget = gadget;
    }

    /// Finds a `0f 05` byte pair in the task's vdso.
    pub fn find_gadget(pid: i32, vdso_start: u64, vdso_end: u64) -> Result<u64, InjectError> {
        let len = (vdso_end - vdso_start) as usize;
        let mut buf = vec![0u8; len];
        read_remote(pid, &mut buf, &[Range { addr: vdso_start, len: len as u64 }])
            .map_err(|source| InjectError::Memory { pid, addr: vdso_start, source })?;
        buf.windows(2)
            .position(|w| w == [0x0f, 0x05])
            .map(|off| vdso_start + off as u64)
            .ok_or(InjectError::NoGadget { pid, start: vdso_start })
    }

    /// Runs one syscall and returns the raw result (negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        let pid = self.pid;
        let mut regs = self.base;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        regs.rip = self.gadget;
        ptrace::set_regs(pid, &regs).map_err(pt("setregs", pid))?;
        self.count += 1;
        for _ in 0..2 {
            ptrace::syscall(pid, 0).map_err(pt("syscall", pid))?;
            self.wait_syscall_stop()?;
        }
        let out = ptrace::get_regs(pid).map_err(pt("getregs", pid))?;
        Ok(out.rax as i64)
    }

    /// Runs one syscall and turns a negative result into an error.
    pub fn call(&mut self, nr: i64, args: [u64; 6]) -> Result<u64, InjectError> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(InjectError::Syscall {
                pid: self.pid,
                nr,
                source: std::io::Error::from_raw_os_error((-r) as i32),
            });
        }
        Ok(r as u64)
    }

    fn wait_syscall_stop(&mut self) -> Result<(), InjectError> {
        let pid = self.pid;
        loop {
            match ptrace::wait(pid).map_err(pt("wait", pid))? {
                Stop::Syscall => return Ok(()),
                Stop::Exited(code) => return Err(InjectError::Died { pid, how: format!("exit status {code}") }),
                Stop::Killed(sig) => return Err(InjectError::Died { pid, how: format!("killed by signal {sig}") }),
                Stop::Signal(sig) => {
                    // Only unblockable signals get here; keep going and report it.
                    tracing::warn!(pid, sig, "signal arrived during syscall injection");
                    self.swallowed.push(sig);
                    ptrace::syscall(pid, 0).map_err(pt("syscall", pid))?;
                }
                Stop::OtherEvent(ev) => {
                    // PTRACE_EVENT_FORK (1), VFORK (2), CLONE (3).
                    if (1..=3).contains(&ev) {
                        self.last_child = ptrace::event_msg(pid).ok().map(|m| m as i32);
                    }
                    ptrace::syscall(pid, 0).map_err(pt("syscall", pid))?;
                }
                Stop::Event => {
                    ptrace::syscall(pid, 0).map_err(pt("syscall", pid))?;
                }
            }
        }
    }

    /// Copies bytes into the task's memory.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), InjectError> {
        let n = write_remote(self.pid, data, &[Range { addr, len: data.len() as u64 }])
            .map_err(|source| InjectError::Memory { pid: self.pid, addr, source })?;
        if n != data.len() {
            return Err(InjectError::Memory {
                pid: self.pid,
                addr,
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            });
        }
        Ok(())
    }

    /// Copies bytes out of the task's memory.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), InjectError> {
        let n = read_remote(self.pid, buf, &[Range { addr, len: buf.len() as u64 }])
            .map_err(|source| InjectError::Memory { pid: self.pid, addr, source })?;
        if n != buf.len() {
            return Err(InjectError::Memory {
                pid: self.pid,
                addr,
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            });
        }
        Ok(())
    }
}

/// Puts `regs` back and lets the task run from a stop taken inside signal
/// handling, so that a syscall it was interrupted in is restarted by the
/// kernel exactly as it would have been without floe (including
/// restart_syscall for sleeps). Needed after injection, whose last stop is a
/// syscall-exit stop where no restart logic runs.
pub fn resume_with_restart(pid: i32, regs: &UserRegs, injected: bool) -> Result<(), InjectError> {
    ptrace::set_regs(pid, regs).map_err(pt("setregs", pid))?;
    if injected {
        ptrace::interrupt(pid).map_err(pt("interrupt", pid))?;
        ptrace::cont(pid, 0).map_err(pt("cont", pid))?;
        loop {
            match ptrace::wait(pid).map_err(pt("wait", pid))? {
                Stop::Event => break,
                Stop::Exited(code) => return Err(InjectError::Died { pid, how: format!("exit status {code}") }),
                Stop::Killed(sig) => return Err(InjectError::Died { pid, how: format!("killed by signal {sig}") }),
                Stop::Signal(sig) => {
                    // A real signal: deliver it on detach rather than lose it.
                    ptrace::detach(pid, sig).map_err(pt("detach", pid))?;
                    return Ok(());
                }
                Stop::Syscall | Stop::OtherEvent(_) => ptrace::cont(pid, 0).map_err(pt("cont", pid))?,
            }
        }
    }
    ptrace::detach(pid, 0).map_err(pt("detach", pid))
}
