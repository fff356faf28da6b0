//! Stage c: everything that is not memory, then release.
use super::preflight::Preflight;
use super::stub::{Stub, SCRATCH_LEN};
use super::RestoreError;
use crate::dump::{regs_from_bytes, simple_device};
use crate::image::ImageReader;
use crate::sys::ptrace::{self, UserRegs};
use crate::sys::task;
use floe_proto::image as pb;
use std::io::Write;
use std::os::fd::AsRawFd;

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

impl Stub {
    /// Stage c: applies the remaining state and lets the process run.
    /// Returns its pid.
    pub fn finish(mut self, img: &ImageReader, pre: &Preflight) -> Result<i32, RestoreError> {
        let m = &img.manifest;
        let p = m.process.as_ref().ok_or_else(|| RestoreError::Refused { what: "image has no process".into() })?;
        let th = p.thread.as_ref().ok_or_else(|| RestoreError::Refused { what: "image has no thread state".into() })?;
        let pid = self.pid;
        let sc = self.scratch;

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

        task::set_nice(pid, p.nice).map_err(|source| RestoreError::Stub {
            pid,
            op: format!("setting nice value {}", p.nice),
            source,
        })?;
        self.set_mm(p)?;
        self.restore_fds(img, pre)?;

        // Protections: data was written through temporarily writable mappings.
        for v in &m.vmas {
            if v.kind != pb::VmaKind::FileShared as i32 {
                self.inj.call(libc::SYS_mprotect, [v.start, v.end - v.start, v.prot as u64, 0, 0, 0])?;
            }
        }

        if p.sid == p.pid {
            self.inj.call(libc::SYS_setsid, [0; 6])?;
        } else if p.pgid == p.pid {
            self.inj.call(libc::SYS_setpgid, [0; 6])?;
        }

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
            self.inj.write_mem(sc, &le(&[act.handler, act.flags, act.restorer, act.mask]))?;
            self.inj.call(libc::SYS_rt_sigaction, [sig as u64, sc, 0, 8, 0, 0])?;
        }
        let alt = th.altstack.unwrap_or(pb::Altstack { sp: 0, flags: libc::SS_DISABLE, size: 0 });
        let mut ss = le(&[alt.sp]);
        ss.extend_from_slice(&(alt.flags as u32 as u64).to_le_bytes());
        ss.extend_from_slice(&alt.size.to_le_bytes());
        self.inj.write_mem(sc, &ss)?;
        self.inj.call(libc::SYS_sigaltstack, [sc, 0, 0, 0, 0, 0])?;
        for t in &p.itimers {
            let v =
                [t.interval_us / 1_000_000, t.interval_us % 1_000_000, t.value_us / 1_000_000, t.value_us % 1_000_000];
            self.inj.write_mem(sc, &le(&v))?;
            self.inj.call(libc::SYS_setitimer, [t.which as u64, sc, 0, 0, 0, 0])?;
        }
        self.inj.call(libc::SYS_personality, [p.personality as u64, 0, 0, 0, 0, 0])?;
        let comm = self.put_str(0, &th.comm.chars().take(15).collect::<String>())?;
        self.inj.call(libc::SYS_prctl, [libc::PR_SET_NAME as u64, comm, 0, 0, 0, 0])?;
        self.inj.call(libc::SYS_prctl, [libc::PR_SET_PDEATHSIG as u64, p.pdeathsig as u64, 0, 0, 0, 0])?;
        if p.child_subreaper {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_CHILD_SUBREAPER as u64, 1, 0, 0, 0, 0])?;
        }
        if p.thp_disabled {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_THP_DISABLE as u64, 1, 0, 0, 0, 0])?;
        }
        if p.dumpable == 0 {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_DUMPABLE as u64, 0, 0, 0, 0, 0])?;
        }
        if p.timerslack_ns != 0 {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_TIMERSLACK as u64, p.timerslack_ns, 0, 0, 0, 0])?;
        }
        self.inj.call(libc::SYS_umask, [p.umask, 0, 0, 0, 0, 0])?;
        let cwd = self.put_str(0, &p.cwd)?;
        self.inj.call(libc::SYS_chdir, [cwd, 0, 0, 0, 0, 0])?;
        if p.root != "/" {
            let root = self.put_str(0, &p.root)?;
            self.inj.call(libc::SYS_chroot, [root, 0, 0, 0, 0, 0])?;
        }
        if let Some(rs) = &th.rseq {
            self.inj.call(libc::SYS_rseq, [rs.ptr, rs.len as u64, 0, rs.sig as u64, 0, 0])?;
        }
        if th.robust_list != 0 {
            self.inj.call(libc::SYS_set_robust_list, [th.robust_list, th.robust_list_len, 0, 0, 0, 0])?;
        }
        self.inj.call(libc::SYS_set_tid_address, [th.clear_child_tid, 0, 0, 0, 0, 0])?;
        // Pending signals stay blocked until the mask is restored below.
        for s in &p.shared_pending {
            self.queue_signal(&s.siginfo, false)?;
        }
        for s in &th.pending {
            self.queue_signal(&s.siginfo, true)?;
        }
        let needs_creds =
            [p.uid, p.euid, p.suid, p.gid, p.egid, p.sgid].iter().any(|x| *x != 0) || !p.groups.is_empty();
        if needs_creds {
            let g: Vec<u8> = p.groups.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.inj.write_mem(sc, &g)?;
            self.inj.call(libc::SYS_setgroups, [p.groups.len() as u64, sc, 0, 0, 0, 0])?;
        }
        if p.no_new_privs {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0])?;
        }
        self.restore_caps(p, needs_creds)?;
        self.inj.call(libc::SYS_munmap, [sc, SCRATCH_LEN, 0, 0, 0, 0])?;

        ptrace::set_sigmask(pid, th.sigmask).map_err(|source| RestoreError::Stub {
            pid,
            op: "setsigmask".into(),
            source,
        })?;
        ptrace::set_xstate(pid, &th.xstate).map_err(|source| RestoreError::Stub {
            pid,
            op: "restoring extended (xsave) registers: the CPU features differ from the dumping host".into(),
            source,
        })?;
        let mut regs = regs_from_bytes(&th.gpregs);
        self.resume_sleep_remaining(&mut regs, &m.vmas);
        restart_fixup(&mut regs);
        ptrace::set_regs(pid, &regs).map_err(|source| RestoreError::Stub { pid, op: "setregs".into(), source })?;
        ptrace::detach(pid, 0).map_err(|source| RestoreError::Stub { pid, op: "ptrace detach".into(), source })?;
        self.finished = true;
        Ok(pid)
    }

    /// Bounding set, uids/gids, then permitted/effective/inheritable and
    /// ambient capabilities (in that order: changing uid clears capabilities).
    fn restore_caps(&mut self, p: &pb::Process, needs_creds: bool) -> Result<(), RestoreError> {
        let last_cap: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        for cap in 0..=last_cap.min(63) {
            if p.cap_bnd & (1 << cap) == 0 {
                self.inj.call(libc::SYS_prctl, [libc::PR_CAPBSET_DROP as u64, cap, 0, 0, 0, 0])?;
            }
        }
        const SECBIT_KEEP_CAPS: u32 = 1 << 4;
        if needs_creds {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0, 0])?;
            self.inj.call(libc::SYS_setresgid, [p.gid as u64, p.egid as u64, p.sgid as u64, 0, 0, 0])?;
            self.inj.call(libc::SYS_setresuid, [p.uid as u64, p.euid as u64, p.suid as u64, 0, 0, 0])?;
        }
        let sc = self.scratch;
        let mut data = Vec::with_capacity(32);
        data.extend_from_slice(&0x2008_0522u32.to_le_bytes()); // _LINUX_CAPABILITY_VERSION_3
        data.extend_from_slice(&0i32.to_le_bytes());
        for half in [0u32, 32] {
            for set in [p.cap_eff, p.cap_prm, p.cap_inh] {
                data.extend_from_slice(&((set >> half) as u32).to_le_bytes());
            }
        }
        self.inj.write_mem(sc, &data)?;
        self.inj.call(libc::SYS_capset, [sc, sc + 8, 0, 0, 0, 0]).map_err(|e| RestoreError::Refused {
            what: format!(
                "cannot restore capabilities (eff {:#x} prm {:#x} inh {:#x}): {e}",
                p.cap_eff, p.cap_prm, p.cap_inh
            ),
        })?;
        for cap in 0..=last_cap.min(63) {
            if p.cap_amb & (1 << cap) != 0 {
                const PR_CAP_AMBIENT_RAISE: u64 = 2;
                self.inj.call(libc::SYS_prctl, [libc::PR_CAP_AMBIENT as u64, PR_CAP_AMBIENT_RAISE, cap, 0, 0, 0])?;
            }
        }
        if needs_creds && p.securebits & SECBIT_KEEP_CAPS == 0 {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 0, 0, 0, 0, 0])?;
        } else if !needs_creds && p.securebits & SECBIT_KEEP_CAPS != 0 {
            self.inj.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0, 0])?;
        }
        Ok(())
    }

    /// A relative nanosleep/clock_nanosleep interrupted by the freeze wrote
    /// the time left to its `rem` argument. Re-issue it with that remaining
    /// time (copied below the stack red zone, which the ABI leaves free)
    /// instead of the full original duration.
    fn resume_sleep_remaining(&mut self, regs: &mut UserRegs, vmas: &[pb::Vma]) {
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
        let writable =
            vmas.iter().any(|v| v.start <= slot && slot + 16 <= v.end && v.prot & libc::PROT_WRITE as u32 != 0);
        let mut ts = [0u8; 16];
        if !writable || self.inj.read_mem(rem, &mut ts).is_err() || self.inj.write_mem(slot, &ts).is_err() {
            return;
        }
        if req_reg == 0 {
            regs.rdi = slot;
        } else {
            regs.rdx = slot;
        }
    }

    fn queue_signal(&mut self, siginfo: &[u8], thread: bool) -> Result<(), RestoreError> {
        if siginfo.len() < 4 {
            return Ok(());
        }
        let sig = i32::from_le_bytes([siginfo[0], siginfo[1], siginfo[2], siginfo[3]]) as u64;
        self.inj.write_mem(self.scratch, siginfo)?;
        let pid = self.pid as u64;
        if thread {
            self.inj.call(libc::SYS_rt_tgsigqueueinfo, [pid, pid, sig, self.scratch, 0, 0])?;
        } else {
            self.inj.call(libc::SYS_rt_sigqueueinfo, [pid, sig, self.scratch, 0, 0, 0])?;
        }
        Ok(())
    }

    /// PR_SET_MM_MAP: code/data/brk/stack/args/env bounds, auxv and exe link.
    fn set_mm(&mut self, p: &pb::Process) -> Result<(), RestoreError> {
        let mm = p.mm.clone().unwrap_or_default();
        let exe_fd = self.open_in_stub(&p.exe_path, (libc::O_RDONLY | libc::O_CLOEXEC) as u64)?;
        let auxv_at = self.scratch + 2048;
        if mm.auxv.len() > 1024 {
            return Err(RestoreError::Refused { what: format!("auxv of {} bytes is too large", mm.auxv.len()) });
        }
        self.inj.write_mem(auxv_at, &mm.auxv)?;
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
        self.inj.write_mem(self.scratch + 1024, &map)?;
        const PR_SET_MM_MAP: u64 = 14;
        let r = self.inj.raw(
            libc::SYS_prctl,
            [libc::PR_SET_MM as u64, PR_SET_MM_MAP, self.scratch + 1024, map.len() as u64, 0, 0],
        )?;
        self.inj.call(libc::SYS_close, [exe_fd, 0, 0, 0, 0, 0])?;
        if r < 0 {
            return Err(RestoreError::Stub {
                pid: self.pid,
                op: "prctl(PR_SET_MM_MAP) restoring mm fields and exe link".into(),
                source: std::io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(())
    }

    fn restore_fds(&mut self, img: &ImageReader, pre: &Preflight) -> Result<(), RestoreError> {
        let me = std::process::id();
        // Deleted files are recreated as unlinked files held open by floe
        // until the process has opened them through /proc.
        let mut keep: Vec<std::fs::File> = Vec::new();
        for f in &img.manifest.fds {
            let kind = pb::FdKind::try_from(f.kind).unwrap_or(pb::FdKind::Unspecified);
            let oflags = (f.flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32)) as u64;
            let path: String = match kind {
                pb::FdKind::Regular | pb::FdKind::Directory => f.path.clone(),
                pb::FdKind::CharDevice => simple_device(f.rdev).unwrap_or("/dev/null").to_string(),
                pb::FdKind::Tty => {
                    let t = pre
                        .terminal_fd
                        .ok_or_else(|| RestoreError::Refused { what: "no terminal for --shell-job".into() })?;
                    format!("/proc/{me}/fd/{t}")
                }
                pb::FdKind::DeletedFile => {
                    let data = img.read_blob(f.blob as usize)?;
                    let file = recreate_deleted(&f.path, &data)?;
                    let p = format!("/proc/{me}/fd/{}", file.as_raw_fd());
                    keep.push(file);
                    p
                }
                pb::FdKind::Unspecified => {
                    return Err(RestoreError::Refused { what: format!("fd {} has an unknown kind", f.fd) })
                }
            };
            let tmp = self.open_in_stub(&path, oflags)?;
            let target = f.fd as u64;
            if tmp != target {
                let cloexec = (f.flags & libc::O_CLOEXEC as u32) as u64;
                self.inj.call(libc::SYS_dup3, [tmp, target, cloexec, 0, 0, 0])?;
                self.inj.call(libc::SYS_close, [tmp, 0, 0, 0, 0, 0])?;
            }
            if f.pos != 0 && kind != pb::FdKind::Tty && kind != pb::FdKind::CharDevice {
                self.inj.call(libc::SYS_lseek, [target, f.pos as u64, libc::SEEK_SET as u64, 0, 0, 0])?;
            }
        }
        Ok(())
    }
}

/// Creates an unlinked file with `data` in the directory `path` was in.
fn recreate_deleted(path: &str, data: &[u8]) -> Result<std::fs::File, RestoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::path::Path::new(path).parent().unwrap_or(std::path::Path::new("/"));
    let err = |e: std::io::Error| RestoreError::File {
        path: path.into(),
        what: format!("cannot recreate deleted file ({e})"),
    };
    let mut f =
        match std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir) {
            Ok(f) => f,
            Err(_) => {
                let tmp = dir.join(format!(".floe-deleted-{}", std::process::id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(err)?;
                std::fs::remove_file(&tmp).map_err(err)?;
                f
            }
        };
    f.write_all(data).map_err(err)?;
    Ok(f)
}
