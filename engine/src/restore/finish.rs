//! Stage c: everything that is not memory, then release.
use super::files::{self, OpenFiles};
use super::preflight::Preflight;
use super::stub::{Stub, SCRATCH_LEN};
use super::{RestoreError, Tree};
use crate::dump::regs_from_bytes;
use crate::image::ImageReader;
use crate::inject::Injector;
use crate::sys::ptrace::{self, UserRegs};
use crate::sys::task;
use floe_proto::image as pb;

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

/// Applies what the kernel would do on the way back to user space for a
/// syscall interrupted by the freeze: re-execute it. A sleep interrupted
/// with -ERESTART_RESTARTBLOCK is re-issued with its original arguments
/// because the kernel's restart block did not survive.
pub fn restart_fixup(regs: &mut UserRegs) {
    if (regs.orig_rax as i64) >= 0 {
        let rax = regs.rax as i64;
        if matches!(rax, ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK) {
            regs.rax = regs.orig_rax;
            regs.rip -= 2;
        }
    }
    regs.orig_rax = u64::MAX;
}

fn le(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pterr(pid: i32, op: &str) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Stub { pid, op: op.to_string(), source }
}

impl Tree {
    /// Stage c: applies the remaining state of every process and lets the
    /// tree run. Returns the root's pid.
    pub fn finish(mut self, img: &ImageReader, pre: &Preflight) -> Result<i32, RestoreError> {
        self.finish_stopped(img, pre)?;
        self.release(&img.manifest.processes)
    }

    /// Stage c without the release: every process gets its state and stays
    /// stopped (killed if the tree is dropped). Live migration's target
    /// holds here until the source commits.
    pub fn finish_stopped(&mut self, img: &ImageReader, pre: &Preflight) -> Result<(), RestoreError> {
        // Hundreds of injected syscalls: tracer and stubs on one CPU.
        let pin = crate::pin::CpuPin::here(self.procs.iter().flat_map(|s| s.tids()).collect::<Vec<_>>());
        let map: Vec<(i32, i32)> = self.procs.iter().map(|s| (s.vpid, s.pid)).collect();
        let host_pid = |vpid: i32| map.iter().find(|(v, _)| *v == vpid).map(|(_, h)| *h);
        let t0 = std::time::Instant::now();
        let mut files = OpenFiles::open(img, pre, &self.shm.objects, &host_pid)?;
        tracing::debug!(
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            files = img.manifest.files.len(),
            "descriptions opened"
        );
        self.held.append(&mut files.held);
        let procs = &img.manifest.processes;
        let mut locked = std::collections::HashSet::new();
        for (stub, p) in self.procs.iter_mut().zip(procs) {
            if !p.zombie {
                stub.finish_process(p, &files, &self.shm.sender, &img.manifest.files, &mut locked)?;
            }
        }
        drop(files);
        // Zombies exit now; their parents are still stopped and reap them later.
        for (stub, p) in self.procs.iter_mut().zip(procs) {
            if p.zombie {
                stub.become_zombie(p.exit_status, &p.comm)?;
            }
        }
        super::sysv::remove_destroyed(&img.manifest.sysv_shm);
        // Last, once nothing is injected any more: CPUs and scheduling.
        drop(pin);
        let online = crate::procfs::online_cpus().ok();
        for (stub, p) in self.procs.iter().zip(procs) {
            if !p.zombie {
                let adj = format!("/proc/{}/oom_score_adj", stub.pid);
                std::fs::write(&adj, p.oom_score_adj.to_string()).map_err(|source| RestoreError::Stub {
                    pid: stub.pid,
                    op: format!("setting oom_score_adj {}", p.oom_score_adj),
                    source,
                })?;
                for (i, (tid, th)) in stub.tids().into_iter().zip(&p.threads).enumerate() {
                    // The main thread's nice is the process's (images older
                    // than per-thread nice values have only that one).
                    let nice = if i == 0 { p.nice } else { th.nice };
                    set_sched(stub.pid, tid, th, nice, online.as_deref())?;
                }
            }
        }
        Ok(())
    }

    /// Lets a tree that [`Tree::finish_stopped`] prepared run. Returns the root's pid.
    pub fn release(mut self, procs: &[floe_proto::image::Process]) -> Result<i32, RestoreError> {
        // Connections held silent until now go live (a window probe prompts each peer).
        for h in std::mem::take(&mut self.held) {
            if let Err(e) = h.release() {
                tracing::error!(error = %e, "a restored TCP connection could not leave repair mode");
            }
        }
        // Release children before parents.
        self.finished = true;
        for (stub, p) in self.procs.iter().zip(procs).rev() {
            if p.zombie {
                continue;
            }
            for t in stub.threads.iter().rev() {
                ptrace::detach(t.pid(), 0).map_err(pterr(t.pid(), "ptrace detach"))?;
            }
        }
        Ok(self.root_pid())
    }
}

/// Gives thread `tid` (host tid) of process `pid` the CPU set, scheduling
/// policy and I/O priority `th` records, and nice value `nice`. CPUs this host
/// lacks are left out of the set (with a warning; if none is left, the
/// thread may use any CPU).
fn set_sched(pid: i32, tid: i32, th: &pb::Thread, nice: i32, online: Option<&[usize]>) -> Result<(), RestoreError> {
    let err = |op: String| move |source| RestoreError::Stub { pid, op, source };
    if !th.cpu_affinity.is_empty() {
        let want: Vec<usize> =
            (0..th.cpu_affinity.len() * 8).filter(|c| th.cpu_affinity[c / 8] & (1 << (c % 8)) != 0).collect();
        let have: Vec<usize> = match online {
            Some(o) => want.iter().copied().filter(|c| o.contains(c)).collect(),
            None => want.clone(),
        };
        if have.len() < want.len() {
            tracing::warn!(pid, tid = th.tid, cpus = ?want, kept = ?have, "the thread was bound to CPUs this host does not have");
        }
        if !have.is_empty() {
            task::set_affinity(tid, &task::CpuSet::of(&have))
                .map_err(err(format!("binding thread {} to CPUs {have:?}", th.tid)))?;
        }
    }
    // Policy first: it can reset the nice value.
    let (policy, priority) = task::get_scheduler(tid).map_err(err(format!("reading thread {}'s policy", th.tid)))?;
    if (policy, priority) != (th.sched_policy, th.sched_priority) {
        task::set_scheduler(tid, th.sched_policy, th.sched_priority).map_err(err(format!(
            "giving thread {} scheduling policy {} priority {} (real-time policies need the host to allow them)",
            th.tid, th.sched_policy, th.sched_priority
        )))?;
    }
    task::set_nice(tid, nice).map_err(err(format!("setting thread {}'s nice value {nice}", th.tid)))?;
    if task::get_ioprio(tid).map_err(err(format!("reading thread {}'s I/O priority", th.tid)))? != th.ioprio {
        task::set_ioprio(tid, th.ioprio)
            .map_err(err(format!("setting thread {}'s I/O priority {:#x}", th.tid, th.ioprio)))?;
    }
    Ok(())
}

impl Stub {
    /// Makes this stub exit with the dumped wait status, leaving a zombie.
    fn become_zombie(&mut self, status: i32, comm: &str) -> Result<(), RestoreError> {
        let pid = self.pid;
        if !comm.is_empty() {
            let at = self.put_str(0, &comm.chars().take(15).collect::<String>())?;
            self.leader().call(libc::SYS_prctl, [libc::PR_SET_NAME as u64, at, 0, 0, 0, 0])?;
        }
        let sig = status & 0x7f;
        if sig == 0 {
            let code = (status >> 8) & 0xff;
            let _ = self.leader().raw(libc::SYS_exit_group, [code as u64, 0, 0, 0, 0, 0]);
        } else {
            ptrace::set_sigmask(pid, 0).map_err(pterr(pid, "setsigmask"))?;
            let sc = self.scratch;
            self.leader().write_mem(sc, &[0u8; 32])?;
            self.leader().call(libc::SYS_rt_sigaction, [sig as u64, sc, 0, 8, 0, 0])?;
            task::kill(pid, sig).map_err(pterr(pid, "kill"))?;
            let _ = ptrace::cont(pid, sig);
        }
        loop {
            match ptrace::wait(pid) {
                Ok(ptrace::Stop::Exited(_)) | Ok(ptrace::Stop::Killed(_)) | Err(_) => break,
                Ok(ptrace::Stop::Signal(s)) => {
                    let _ = ptrace::cont(pid, s);
                }
                Ok(_) => {
                    let _ = ptrace::cont(pid, 0);
                }
            }
        }
        self.threads.clear();
        Ok(())
    }

    /// Applies one process's state; its threads stay stopped.
    fn finish_process(
        &mut self,
        p: &pb::Process,
        files: &OpenFiles,
        sock: &std::os::fd::OwnedFd,
        descs: &[pb::FileDesc],
        locked: &mut std::collections::HashSet<u32>,
    ) -> Result<(), RestoreError> {
        let pid = self.pid;
        let sc = self.scratch;
        let t0 = std::time::Instant::now();
        let calls0 = self.threads.iter().map(|t| t.count).sum::<u64>();
        let mut marks: Vec<(&str, f64)> = Vec::new();
        let mut mark = |what: &'static str| marks.push((what, t0.elapsed().as_secs_f64() * 1000.0));
        // Room for high descriptor numbers while installing; the image's limits come after.
        if let Ok((_, hard)) = task::get_rlimit(pid, libc::RLIMIT_NOFILE) {
            let _ = task::set_rlimit(pid, libc::RLIMIT_NOFILE, hard, hard);
        }
        // Nice values and policies come last (set_sched): a niced stub would
        // run every injected syscall at that priority.
        self.set_mm(p, files)?;
        mark("mm");
        files::install(self, &p.fds, files, sock)?;
        mark("files");
        for r in &p.fds {
            // flock and OFD locks belong to the description: taken once, by its first holder.
            let desc_locks = descs.get(r.file as usize).map(|d| d.locks.as_slice()).unwrap_or(&[]);
            if !desc_locks.is_empty() && locked.insert(r.file) {
                for l in desc_locks {
                    let res = if l.kind == crate::dump::LOCK_FLOCK {
                        let op = if l.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
                        self.leader().raw(libc::SYS_flock, [r.fd as u64, op as u64, 0, 0, 0, 0])?
                    } else {
                        self.leader().write_mem(sc, &task::flock_struct(l.write, l.start, l.len))?;
                        self.leader().raw(libc::SYS_fcntl, [r.fd as u64, libc::F_OFD_SETLK as u64, sc, 0, 0, 0])?
                    };
                    if res < 0 {
                        return Err(RestoreError::Refused {
                            what: format!(
                                "pid {} cannot take back its lock on fd {} ({}); another process holds a conflicting lock",
                                p.pid,
                                r.fd,
                                std::io::Error::from_raw_os_error(-res as i32)
                            ),
                        });
                    }
                }
            }
            for l in &r.posix_locks {
                self.leader().write_mem(sc, &task::flock_struct(l.write, l.start, l.len))?;
                let res = self.leader().raw(libc::SYS_fcntl, [r.fd as u64, libc::F_SETLK as u64, sc, 0, 0, 0])?;
                if res < 0 {
                    return Err(RestoreError::Refused {
                        what: format!(
                            "pid {} cannot take back its POSIX lock on fd {} ({}); another process holds a conflicting lock",
                            p.pid,
                            r.fd,
                            std::io::Error::from_raw_os_error(-res as i32)
                        ),
                    });
                }
            }
        }
        for r in &p.rlimits {
            task::set_rlimit(pid, r.resource, r.cur, r.max).map_err(|source| RestoreError::Stub {
                pid,
                op: format!(
                    "setting resource limit {} to {}/{} (raising a hard limit needs CAP_SYS_RESOURCE)",
                    r.resource, r.cur, r.max
                ),
                source,
            })?;
        }
        mark("locks_rlimits");
        // Protections: data was written through temporarily writable mappings.
        for v in &p.vmas {
            if v.kind != pb::VmaKind::FileShared as i32 {
                self.leader().call(libc::SYS_mprotect, [v.start, v.end - v.start, v.prot as u64, 0, 0, 0])?;
            }
        }
        if p.mlock_future != 0 {
            // Future mappings only: current ones were locked one by one ("lo").
            self.leader().call(libc::SYS_mlockall, [p.mlock_future as u64, 0, 0, 0, 0, 0])?;
        }
        mark("mprotect");
        // Signal dispositions: every signal, so nothing of floe's leaks through.
        for sig in 1..=64u32 {
            if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
                continue;
            }
            let act = p
                .sigactions
                .iter()
                .find(|a| a.signo == sig)
                .cloned()
                .unwrap_or(pb::SigAction { signo: sig, ..Default::default() });
            self.leader().write_mem(sc, &le(&[act.handler, act.flags, act.restorer, act.mask]))?;
            self.leader().call(libc::SYS_rt_sigaction, [sig as u64, sc, 0, 8, 0, 0])?;
        }
        mark("sigactions");
        for t in &p.itimers {
            let v =
                [t.interval_us / 1_000_000, t.interval_us % 1_000_000, t.value_us / 1_000_000, t.value_us % 1_000_000];
            self.leader().write_mem(sc, &le(&v))?;
            self.leader().call(libc::SYS_setitimer, [t.which as u64, sc, 0, 0, 0, 0])?;
        }
        self.leader().call(libc::SYS_personality, [p.personality as u64, 0, 0, 0, 0, 0])?;
        let pdeath = p.pdeathsig as u64;
        self.leader().call(libc::SYS_prctl, [libc::PR_SET_PDEATHSIG as u64, pdeath, 0, 0, 0, 0])?;
        if p.child_subreaper {
            self.leader().call(libc::SYS_prctl, [libc::PR_SET_CHILD_SUBREAPER as u64, 1, 0, 0, 0, 0])?;
        }
        if p.ksm_merge_any {
            const PR_SET_MEMORY_MERGE: u64 = 67;
            let r = self.leader().raw(libc::SYS_prctl, [PR_SET_MEMORY_MERGE, 1, 0, 0, 0, 0])?;
            if r < 0 {
                tracing::warn!(pid, error = %std::io::Error::from_raw_os_error(-r as i32), "KSM cannot merge every mapping of the restored process (PR_SET_MEMORY_MERGE); its memory is the same, only less of it may be shared");
            }
        }
        if p.thp_disabled {
            self.leader().call(libc::SYS_prctl, [libc::PR_SET_THP_DISABLE as u64, 1, 0, 0, 0, 0])?;
        }
        if p.dumpable == 0 {
            self.leader().call(libc::SYS_prctl, [libc::PR_SET_DUMPABLE as u64, 0, 0, 0, 0, 0])?;
        }
        self.leader().call(libc::SYS_umask, [p.umask, 0, 0, 0, 0, 0])?;
        if p.cwd_deleted {
            self.chdir_removed(&p.cwd)?;
        } else {
            let cwd = self.put_str(0, &p.cwd)?;
            self.leader().call(libc::SYS_chdir, [cwd, 0, 0, 0, 0, 0])?;
        }
        if p.root != "/" {
            let root = self.put_str(0, &p.root)?;
            self.leader().call(libc::SYS_chroot, [root, 0, 0, 0, 0, 0])?;
        }
        mark("process");
        // Per-thread state, each set by the thread itself.
        for (i, th) in p.threads.iter().enumerate() {
            let comm = th.comm.chars().take(15).collect::<String>();
            let at = self.put_str(0, &comm)?;
            let inj = &mut self.threads[i];
            inj.call(libc::SYS_prctl, [libc::PR_SET_NAME as u64, at, 0, 0, 0, 0])?;
            // The thread's own, or (older images) the process's.
            let slack = if th.timerslack_ns != 0 { th.timerslack_ns } else { p.timerslack_ns };
            if slack != 0 {
                inj.call(libc::SYS_prctl, [libc::PR_SET_TIMERSLACK as u64, slack, 0, 0, 0, 0])?;
            }
            let alt = th.altstack.unwrap_or(pb::Altstack { sp: 0, flags: libc::SS_DISABLE, size: 0 });
            let mut ss = le(&[alt.sp]);
            ss.extend_from_slice(&(alt.flags as u32 as u64).to_le_bytes());
            ss.extend_from_slice(&alt.size.to_le_bytes());
            inj.write_mem(sc, &ss)?;
            inj.call(libc::SYS_sigaltstack, [sc, 0, 0, 0, 0, 0])?;
            if let Some(rs) = &th.rseq {
                inj.call(libc::SYS_rseq, [rs.ptr, rs.len as u64, 0, rs.sig as u64, 0, 0])?;
            }
            if th.robust_list != 0 {
                inj.call(libc::SYS_set_robust_list, [th.robust_list, th.robust_list_len, 0, 0, 0, 0])?;
            }
            inj.call(libc::SYS_set_tid_address, [th.clear_child_tid, 0, 0, 0, 0, 0])?;
        }
        mark("threads");
        self.restore_posix_timers(p)?;
        // Pending signals stay blocked until the masks are restored below.
        for s in &p.shared_pending {
            self.queue_signal(&s.siginfo, None)?;
        }
        for th in &p.threads {
            for s in &th.pending {
                self.queue_signal(&s.siginfo, Some(th.tid))?;
            }
        }
        if p.no_new_privs {
            for inj in &mut self.threads {
                inj.call(libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0])?;
            }
        }
        self.restore_seccomp(p)?;
        for i in 0..self.threads.len() {
            // Each thread its own credentials (raw syscalls set only the caller's).
            let creds = match p.threads.get(i).and_then(|t| t.creds.clone()) {
                Some(c) => c,
                None => pb::ThreadCreds {
                    uid: p.uid,
                    euid: p.euid,
                    suid: p.suid,
                    gid: p.gid,
                    egid: p.egid,
                    sgid: p.sgid,
                    groups: p.groups.clone(),
                    cap_inh: p.cap_inh,
                    cap_prm: p.cap_prm,
                    cap_eff: p.cap_eff,
                    cap_bnd: p.cap_bnd,
                    cap_amb: p.cap_amb,
                    ..Default::default()
                },
            };
            restore_caps(&mut self.threads[i], &creds, p.securebits, sc)?;
        }
        mark("creds");
        let vmas = p.vmas.clone();
        for (i, th) in p.threads.iter().enumerate() {
            let tid = self.threads[i].pid();
            let mut regs = regs_from_bytes(&th.gpregs);
            resume_sleep_remaining(&mut self.threads[i], &mut regs, &vmas);
            restart_fixup(&mut regs);
            ptrace::set_xstate(tid, &th.xstate).map_err(pterr(
                tid,
                "restoring extended (xsave) registers: the CPU features differ from the dumping host",
            ))?;
            // The last injected syscall of this process unmaps the scratch area.
            if i == 0 {
                self.leader().call(libc::SYS_munmap, [sc, SCRATCH_LEN, 0, 0, 0, 0])?;
            }
            ptrace::set_sigmask(tid, th.sigmask).map_err(pterr(tid, "setsigmask"))?;
            ptrace::set_regs(tid, &regs).map_err(pterr(tid, "setregs"))?;
        }
        mark("registers");
        let calls = self.threads.iter().map(|t| t.count).sum::<u64>() - calls0;
        tracing::debug!(pid, vmas = p.vmas.len(), threads = p.threads.len(), calls, steps_ms = ?marks, "process state restored");
        Ok(())
    }

    /// timer_create with the dumped ids (PR_TIMER_CREATE_RESTORE_IDS), then
    /// arm each with its remaining time.
    fn restore_posix_timers(&mut self, p: &pb::Process) -> Result<(), RestoreError> {
        if p.posix_timers.is_empty() {
            return Ok(());
        }
        const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
        let sc = self.scratch;
        self.leader().call(libc::SYS_prctl, [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0]).map_err(|e| {
            RestoreError::Refused {
                what: format!(
                    "this kernel cannot recreate POSIX timers with their ids (PR_TIMER_CREATE_RESTORE_IDS: {e})"
                ),
            }
        })?;
        // /proc lists the newest first: create the oldest first so the listing order comes back.
        for t in p.posix_timers.iter().rev() {
            // struct sigevent: value, signo, notify, tid (64 bytes).
            let mut sev = vec![0u8; 64];
            sev[..8].copy_from_slice(&t.sival.to_le_bytes());
            sev[8..12].copy_from_slice(&t.signo.to_le_bytes());
            sev[12..16].copy_from_slice(&t.notify.to_le_bytes());
            sev[16..20].copy_from_slice(&t.notify_tid.to_le_bytes());
            self.leader().write_mem(sc, &sev)?;
            self.leader().write_mem(sc + 64, &t.id.to_le_bytes())?;
            self.leader().call(libc::SYS_timer_create, [t.clockid as u64, sc, sc + 64, 0, 0, 0])?;
            let mut got = [0u8; 4];
            self.leader().read_mem(sc + 64, &mut got)?;
            if i32::from_le_bytes(got) != t.id {
                return Err(RestoreError::Refused {
                    what: format!("POSIX timer {} of pid {} came back as {}", t.id, p.pid, i32::from_le_bytes(got)),
                });
            }
            let ts = |ns: u64| [ns / 1_000_000_000, ns % 1_000_000_000];
            let spec: Vec<u64> = ts(t.interval_ns).into_iter().chain(ts(t.value_ns)).collect();
            self.leader().write_mem(sc + 128, &le(&spec))?;
            self.leader().call(libc::SYS_timer_settime, [t.id as u64, 0, sc + 128, 0, 0, 0])?;
        }
        self.leader().call(libc::SYS_prctl, [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0])?;
        Ok(())
    }

    /// Installs each thread's seccomp filters, oldest first. Injected
    /// syscalls keep working afterwards because the stub is traced with
    /// PTRACE_O_SUSPEND_SECCOMP.
    fn restore_seccomp(&mut self, p: &pb::Process) -> Result<(), RestoreError> {
        if p.threads.iter().all(|t| t.seccomp.is_empty()) {
            return Ok(());
        }
        let sc = self.scratch;
        let opts = super::stub::STUB_OPTIONS | libc::PTRACE_O_SUSPEND_SECCOMP;
        for inj in &self.threads {
            ptrace::set_options(inj.pid(), opts).map_err(pterr(inj.pid(), "ptrace setoptions (suspend seccomp)"))?;
        }
        for (i, th) in p.threads.iter().enumerate() {
            for f in &th.seccomp {
                let n = f.insns.len() / 8;
                if n == 0 || f.insns.len() > 40 * 1024 {
                    return Err(RestoreError::Refused {
                        what: format!("thread {}: seccomp filter of {} bytes", th.tid, f.insns.len()),
                    });
                }
                let inj = &mut self.threads[i];
                inj.write_mem(sc + 16384, &f.insns)?;
                let mut prog = (n as u64).to_le_bytes().to_vec();
                prog.extend_from_slice(&(sc + 16384).to_le_bytes());
                inj.write_mem(sc + 12288, &prog)?;
                const SECCOMP_SET_MODE_FILTER: u64 = 1;
                inj.call(libc::SYS_seccomp, [SECCOMP_SET_MODE_FILTER, f.flags, sc + 12288, 0, 0, 0])?;
            }
        }
        Ok(())
    }

    fn queue_signal(&mut self, siginfo: &[u8], thread: Option<i32>) -> Result<(), RestoreError> {
        if siginfo.len() < 4 {
            return Ok(());
        }
        let sig = i32::from_le_bytes([siginfo[0], siginfo[1], siginfo[2], siginfo[3]]) as u64;
        let sc = self.scratch;
        // Injected: the process names itself by the pid it sees.
        let pid = self.vpid as u64;
        self.leader().write_mem(sc, siginfo)?;
        match thread {
            Some(tid) => self.leader().call(libc::SYS_rt_tgsigqueueinfo, [pid, tid as u64, sig, sc, 0, 0])?,
            None => self.leader().call(libc::SYS_rt_sigqueueinfo, [pid, sig, sc, 0, 0, 0])?,
        };
        Ok(())
    }

    /// Moves the stub into a removed directory like the one the process
    /// was in (`path`): floe creates one at `path` (or, if that name is
    /// taken again, beside it), the stub enters it, and floe removes it.
    fn chdir_removed(&mut self, path: &str) -> Result<(), RestoreError> {
        let dir = std::path::Path::new(path);
        let parent = dir.parent().unwrap_or(std::path::Path::new("/"));
        let err = |e: std::io::Error| RestoreError::File {
            path: path.to_string(),
            what: format!("cannot recreate the removed working directory ({e})"),
        };
        let made = match std::fs::create_dir(dir) {
            Ok(()) => dir.to_path_buf(),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let other = parent.join(format!(".floe-cwd-{}-{}", self.pid, std::process::id()));
                std::fs::create_dir(&other).map_err(err)?;
                other
            }
            Err(e) => return Err(err(e)),
        };
        let at = self.put_str(0, &made.to_string_lossy());
        let entered = at.and_then(|at| self.leader().call(libc::SYS_chdir, [at, 0, 0, 0, 0, 0]).map_err(Into::into));
        let removed = std::fs::remove_dir(&made);
        entered?;
        removed.map_err(err)
    }

    /// PR_SET_MM_MAP: code/data/brk/stack/args/env bounds, auxv and exe link.
    fn set_mm(&mut self, p: &pb::Process, files: &OpenFiles) -> Result<(), RestoreError> {
        let mm = p.mm.clone().unwrap_or_default();
        let sc = self.scratch;
        let exe = match p.exe_blob {
            Some(_) => {
                let id = p.exe_id.as_ref().map(|f| (f.dev, f.ino)).unwrap_or_default();
                let f = files.deleted(id).ok_or_else(|| RestoreError::File {
                    path: p.exe_path.clone(),
                    what: "was deleted, and its contents were not recreated".into(),
                })?;
                format!("/proc/{}/fd/{}", std::process::id(), std::os::fd::AsRawFd::as_raw_fd(f))
            }
            None => p.exe_path.clone(),
        };
        let exe_fd = self.open_in_stub(&exe, (libc::O_RDONLY | libc::O_CLOEXEC) as u64)?;
        let auxv_at = sc + 2048;
        if mm.auxv.len() > 1024 {
            return Err(RestoreError::Refused { what: format!("auxv of {} bytes is too large", mm.auxv.len()) });
        }
        self.leader().write_mem(auxv_at, &mm.auxv)?;
        let mut map = le(&[
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv_at,
        ]);
        map.extend_from_slice(&(mm.auxv.len() as u32).to_le_bytes());
        map.extend_from_slice(&(exe_fd as u32).to_le_bytes());
        debug_assert_eq!(map.len(), 104);
        self.leader().write_mem(sc + 1024, &map)?;
        const PR_SET_MM_MAP: u64 = 14;
        let r = self
            .leader()
            .raw(libc::SYS_prctl, [libc::PR_SET_MM as u64, PR_SET_MM_MAP, sc + 1024, map.len() as u64, 0, 0])?;
        self.leader().call(libc::SYS_close, [exe_fd, 0, 0, 0, 0, 0])?;
        if r < 0 {
            return Err(RestoreError::Stub {
                pid: self.pid,
                op: "prctl(PR_SET_MM_MAP) restoring mm fields and exe link".into(),
                source: std::io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(())
    }
}

/// Bounding set, uids/gids, then permitted/effective/inheritable and
/// ambient capabilities (in that order: changing uid clears capabilities).
/// Credentials are per thread, so this runs in every thread.
/// Sets one thread's credentials and capabilities (`p`), as the last of its
/// privileged steps; `securebits` are the process's.
fn restore_caps(inj: &mut Injector, p: &pb::ThreadCreds, securebits: u32, sc: u64) -> Result<(), RestoreError> {
    let needs_creds = [p.uid, p.euid, p.suid, p.gid, p.egid, p.sgid].iter().any(|x| *x != 0) || !p.groups.is_empty();
    if needs_creds {
        let g: Vec<u8> = p.groups.iter().flat_map(|x| x.to_le_bytes()).collect();
        inj.write_mem(sc + 8192, &g)?;
    }
    let last_cap: u64 =
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40);
    for cap in 0..=last_cap.min(63) {
        if p.cap_bnd & (1 << cap) == 0 {
            inj.call(libc::SYS_prctl, [libc::PR_CAPBSET_DROP as u64, cap, 0, 0, 0, 0])?;
        }
    }
    const SECBIT_KEEP_CAPS: u32 = 1 << 4;
    if needs_creds {
        inj.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0, 0])?;
        inj.call(libc::SYS_setgroups, [p.groups.len() as u64, sc + 8192, 0, 0, 0, 0])?;
        inj.call(libc::SYS_setresgid, [p.gid as u64, p.egid as u64, p.sgid as u64, 0, 0, 0])?;
        inj.call(libc::SYS_setresuid, [p.uid as u64, p.euid as u64, p.suid as u64, 0, 0, 0])?;
    }
    let mut data = Vec::with_capacity(32);
    data.extend_from_slice(&0x2008_0522u32.to_le_bytes()); // _LINUX_CAPABILITY_VERSION_3
    data.extend_from_slice(&0i32.to_le_bytes());
    for half in [0u32, 32] {
        for set in [p.cap_eff, p.cap_prm, p.cap_inh] {
            data.extend_from_slice(&((set >> half) as u32).to_le_bytes());
        }
    }
    inj.write_mem(sc + 512, &data)?;
    inj.call(libc::SYS_capset, [sc + 512, sc + 520, 0, 0, 0, 0]).map_err(|e| RestoreError::Refused {
        what: format!(
            "cannot restore capabilities (eff {:#x} prm {:#x} inh {:#x}): {e}",
            p.cap_eff, p.cap_prm, p.cap_inh
        ),
    })?;
    for cap in 0..=last_cap.min(63) {
        if p.cap_amb & (1 << cap) != 0 {
            const PR_CAP_AMBIENT_RAISE: u64 = 2;
            inj.call(libc::SYS_prctl, [libc::PR_CAP_AMBIENT as u64, PR_CAP_AMBIENT_RAISE, cap, 0, 0, 0])?;
        }
    }
    if needs_creds && securebits & SECBIT_KEEP_CAPS == 0 {
        inj.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 0, 0, 0, 0, 0])?;
    } else if !needs_creds && securebits & SECBIT_KEEP_CAPS != 0 {
        inj.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0, 0])?;
    }
    Ok(())
}

/// A relative nanosleep/clock_nanosleep interrupted by the freeze wrote the
/// time left to its `rem` argument. Re-issue it with that remaining time
/// (copied below the stack red zone, which the ABI leaves free) instead of
/// the full original duration.
fn resume_sleep_remaining(inj: &mut Injector, regs: &mut UserRegs, vmas: &[pb::Vma]) {
    if regs.rax as i64 != ERESTART_RESTARTBLOCK {
        return;
    }
    let (req_reg, rem) = match regs.orig_rax as i64 {
        libc::SYS_nanosleep => (0, regs.rsi),
        libc::SYS_clock_nanosleep if regs.rsi & libc::TIMER_ABSTIME as u64 == 0 => (1, regs.r10),
        _ => return,
    };
    let req = if req_reg == 0 { regs.rdi } else { regs.rdx };
    if rem == 0 || rem == req {
        return; // nothing recorded, or the same buffer (glibc sleep()): restart already resumes
    }
    let slot = (regs.rsp.wrapping_sub(128 + 16)) & !15;
    let writable = vmas.iter().any(|v| v.start <= slot && slot + 16 <= v.end && v.prot & libc::PROT_WRITE as u32 != 0);
    let mut ts = [0u8; 16];
    if !writable || inj.read_mem(rem, &mut ts).is_err() || inj.write_mem(slot, &ts).is_err() {
        return;
    }
    if req_reg == 0 {
        regs.rdi = slot;
    } else {
        regs.rdx = slot;
    }
}
