//! Freezing a process tree: every thread of every process is seized and
//! interrupted, repeating until a pass over /proc finds no task it has not
//! stopped (a stopped task cannot create new ones).
use super::DumpError;
use crate::inject::resume_with_restart;
use crate::procfs;
use crate::sys::ptrace::{self, Stop, UserRegs};
use crate::sys::task;
use std::collections::{BTreeMap, HashSet};

/// One stopped thread.
pub struct Task {
    pub tid: i32,
    pub regs: UserRegs,
    /// Syscalls were injected, so the last stop was a syscall-exit stop.
    pub injected: bool,
}

/// One process of the tree.
pub struct FrozenProc {
    pub pid: i32,
    pub ppid: i32,
    /// Leader first.
    pub threads: Vec<Task>,
    pub zombie: bool,
}

/// A stopped process tree. Dropping it resumes every task.
pub struct FrozenTree {
    pub procs: Vec<FrozenProc>,
    done: bool,
}

fn perr(pid: i32, op: &'static str) -> impl FnOnce(std::io::Error) -> DumpError {
    move |source| DumpError::Ptrace { pid, op, source }
}

/// Pre-order walk of the tree below `root`: (pid, ppid).
pub(crate) fn walk(root: i32) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    let mut stack = vec![(root, procfs::status(root).map(|s| s.ppid).unwrap_or(0))];
    let mut seen = HashSet::new();
    while let Some((pid, ppid)) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        out.push((pid, ppid));
        let mut kids = procfs::children(pid).unwrap_or_default();
        kids.sort_unstable();
        for k in kids.into_iter().rev() {
            stack.push((k, pid));
        }
    }
    out
}

impl FrozenTree {
    pub fn freeze(root: i32) -> Result<Self, DumpError> {
        let mut tree = Self { procs: Vec::new(), done: false };
        let mut index: BTreeMap<i32, usize> = BTreeMap::new();
        let mut seized: HashSet<i32> = HashSet::new();
        loop {
            let mut pending: Vec<(usize, i32)> = Vec::new();
            for (pid, ppid) in walk(root) {
                let st = match procfs::status(pid) {
                    Ok(s) => s,
                    Err(_) if pid == root => return Err(DumpError::NoProcess { pid }),
                    Err(_) => continue,
                };
                let idx = *index.entry(pid).or_insert_with(|| {
                    tree.procs.push(FrozenProc { pid, ppid, threads: Vec::new(), zombie: false });
                    tree.procs.len() - 1
                });
                if st.state == 'Z' {
                    tree.procs[idx].zombie = true;
                    continue;
                }
                for tid in procfs::tids(pid).unwrap_or_default() {
                    if seized.contains(&tid) {
                        continue;
                    }
                    match ptrace::seize(tid, ptrace::DUMP_OPTIONS) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                            return Err(DumpError::Refused {
                                pid,
                                what: format!("ptrace attach to thread {tid} not permitted (already traced, or floe lacks CAP_SYS_PTRACE)"),
                            })
                        }
                        Err(source) => return Err(DumpError::Ptrace { pid: tid, op: "seize", source }),
                    }
                    seized.insert(tid);
                    let mut t = Task { tid, regs: super::zero_regs(), injected: false };
                    if tid == pid {
                        tree.procs[idx].threads.insert(0, t);
                    } else {
                        t.injected = false;
                        tree.procs[idx].threads.push(t);
                    }
                    ptrace::interrupt(tid).map_err(perr(tid, "interrupt"))?;
                    pending.push((idx, tid));
                }
            }
            if pending.is_empty() {
                break;
            }
            for (idx, tid) in pending {
                if !wait_stopped(tid)? {
                    // The thread (or process) went away while freezing.
                    tree.procs[idx].threads.retain(|t| t.tid != tid);
                    continue;
                }
                let regs = ptrace::get_regs(tid).map_err(perr(tid, "getregs"))?;
                if let Some(t) = tree.procs[idx].threads.iter_mut().find(|t| t.tid == tid) {
                    t.regs = regs;
                }
            }
        }
        tree.procs.retain(|p| p.zombie || !p.threads.is_empty());
        if !tree.procs.iter().any(|p| p.pid == root && !p.zombie) {
            return Err(DumpError::NoProcess { pid: root });
        }
        for p in &tree.procs {
            if !p.zombie && p.threads.first().map(|t| t.tid) != Some(p.pid) {
                return Err(DumpError::Refused {
                    pid: p.pid,
                    what: "its main thread has exited while other threads run".into(),
                });
            }
        }
        Ok(tree)
    }

    /// Whether the tasks were already let go (pre-dump).
    pub fn released(&self) -> bool {
        self.done
    }

    /// Lets every task run on, keeping the record (pre-dump copies pages afterwards).
    pub fn resume_in_place(&mut self) -> Result<(), DumpError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut first_err = None;
        for p in &self.procs {
            for t in &p.threads {
                if let Err(e) = resume_with_restart(t.tid, &t.regs, t.injected) {
                    first_err.get_or_insert(DumpError::from(e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Lets every task run on, each from where it stopped.
    pub fn resume(mut self) -> Result<(), DumpError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut first_err = None;
        for p in &self.procs {
            for t in &p.threads {
                if let Err(e) = resume_with_restart(t.tid, &t.regs, t.injected) {
                    first_err.get_or_insert(DumpError::from(e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sends `sig` to every live process of the tree (it stays pending while
    /// the tasks are stopped here).
    pub fn signal_all(&self, sig: i32) -> Result<(), DumpError> {
        for p in self.procs.iter().filter(|p| !p.zombie) {
            task::kill(p.pid, sig).map_err(|source| DumpError::Io {
                pid: p.pid,
                what: format!("cannot send signal {sig}"),
                source,
            })?;
        }
        Ok(())
    }

    /// Kills every process of the tree (children first).
    pub fn kill(mut self) -> Result<(), DumpError> {
        self.done = true;
        for p in self.procs.iter().rev() {
            if p.zombie {
                continue;
            }
            task::kill(p.pid, libc::SIGKILL).map_err(|source| DumpError::Io {
                pid: p.pid,
                what: "cannot kill the dumped process".into(),
                source,
            })?;
            for t in p.threads.iter().rev() {
                loop {
                    match ptrace::wait(t.tid) {
                        Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) | Err(_) => break,
                        Ok(_) => {
                            let _ = ptrace::cont(t.tid, 0);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn mark_injected(&mut self, tid: i32) {
        for p in &mut self.procs {
            for t in &mut p.threads {
                if t.tid == tid {
                    t.injected = true;
                }
            }
        }
    }
}

/// Waits for the interrupt stop; false if the task vanished.
fn wait_stopped(tid: i32) -> Result<bool, DumpError> {
    loop {
        match ptrace::wait(tid) {
            Ok(Stop::Event) => return Ok(true),
            Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(false),
            Err(source) => return Err(DumpError::Ptrace { pid: tid, op: "wait", source }),
            Ok(Stop::Signal(sig)) => {
                // A signal raced with the freeze: let it be delivered, then stop again.
                ptrace::cont(tid, sig).map_err(perr(tid, "cont"))?;
                ptrace::interrupt(tid).map_err(perr(tid, "interrupt"))?;
            }
            Ok(Stop::Syscall) | Ok(Stop::OtherEvent(_)) => {
                ptrace::cont(tid, 0).map_err(perr(tid, "cont"))?;
            }
        }
    }
}

impl Drop for FrozenTree {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for p in &self.procs {
            for t in &p.threads {
                if let Err(e) = resume_with_restart(t.tid, &t.regs, t.injected) {
                    tracing::error!(tid = t.tid, error = %e, "could not resume a thread after a failed dump");
                }
            }
        }
    }
}
