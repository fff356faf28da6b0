//! Keeping a tracer and its tracees on one CPU while it drives them.
//!
//! Every injected syscall is a round trip: the tracer sets registers and
//! resumes the tracee, the tracee runs the syscall and stops, the tracer
//! wakes. When the two sit on different CPUs, each step wakes the other
//! CPU, which in a virtual machine that halts idle vCPUs costs tens of
//! microseconds: measured on the reference VM, a migrated process's state
//! took 10-13 ms to apply instead of 2 ms whenever that happened (~100
//! injected calls). On one CPU each step is a plain context switch.
//!
//! [`CpuPin`] pins the calling thread and the given tasks to the CPU the
//! caller runs on, and gives every task its old CPU set back when dropped.
use crate::sys::task::{self, CpuSet};

/// Tasks pinned to the caller's CPU, with the CPU sets to give back.
pub struct CpuPin {
    saved: Vec<(i32, CpuSet)>,
}

impl CpuPin {
    /// Pins the calling thread and `tids`. Best effort: a task that cannot
    /// be pinned (gone, or its cpuset excludes this CPU) runs where it may.
    pub fn here(tids: impl IntoIterator<Item = i32>) -> Self {
        let mut saved = Vec::new();
        let Some(cpu) = task::current_cpu() else { return Self { saved } };
        let one = CpuSet::one(cpu);
        // 0: the calling thread.
        for tid in std::iter::once(0).chain(tids) {
            if let Ok(old) = task::get_affinity(tid) {
                if task::set_affinity(tid, &one).is_ok() {
                    saved.push((tid, old));
                }
            }
        }
        Self { saved }
    }
}

impl CpuPin {
    /// The CPU set task `tid` had before it was pinned (None if it was not).
    pub fn original(&self, tid: i32) -> Option<CpuSet> {
        self.saved.iter().find(|(t, _)| *t == tid && tid != 0).map(|(_, s)| *s)
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        // Tasks first, the caller last (it may move once unpinned).
        for (tid, old) in self.saved.iter().rev() {
            if let Err(e) = task::set_affinity(*tid, old) {
                if e.raw_os_error() != Some(libc::ESRCH) {
                    tracing::warn!(tid, error = %e, "cannot give a task its CPU set back");
                }
            }
        }
    }
}
