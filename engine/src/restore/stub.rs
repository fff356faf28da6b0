//! Stage a: creating the stopped process tree (stubs) and their address
//! spaces; stage b: writing pages into them.
use super::preflight::{wait_pid_free, Preflight};
use super::RestoreError;
use crate::inject::Injector;
use crate::procfs;
use crate::sys::memory::Range;
use crate::sys::ptrace::{self, Stop};
use crate::sys::task;
use floe_proto::image as pb;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Shared memory objects created so far in this restore, and floe's end of
/// the descriptor-passing socket.
pub struct Shmem {
    pub objects: HashMap<u64, OwnedFd>,
    pub sender: OwnedFd,
    /// Deleted files that mappings and executables refer to, recreated by preflight.
    pub deleted: super::preflight::DeletedFiles,
}

/// Scratch area mapped in every stub for syscall arguments.
pub const SCRATCH_LEN: u64 = 64 * 1024;
/// Where clone3 arguments go inside the scratch area.
const CLONE_ARGS_OFF: u64 = SCRATCH_LEN - 512;
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
pub(super) const STUB_OPTIONS: libc::c_int =
    ptrace::STUB_OPTIONS | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEFORK;

/// One stopped process being rebuilt.
pub struct Stub {
    /// Pid in floe's namespace (ptrace, /proc).
    pub(super) pid: i32,
    /// Pid as the process itself sees it (the image's pid).
    pub(super) vpid: i32,
    /// Leader first, then the other threads once created.
    pub(super) threads: Vec<Injector>,
    pub(super) scratch: u64,
    /// The stub's end of the descriptor-passing socket, once bound.
    pub(super) inst_sock: Option<u64>,
    /// Where the vvar/vdso block currently starts.
    pub(super) vdso_at: u64,
    /// UFFDIO_COPY filling of fresh memory, while it is on.
    pub(super) fill: Option<super::fill::Filler>,
}

/// msghdr and buffers for recvmsg inside scratch.
const MSG_OFF: u64 = 4096;

fn stub_err(pid: i32, op: impl Into<String>) -> impl FnOnce(std::io::Error) -> RestoreError {
    let op = op.into();
    move |source| RestoreError::Stub { pid, op, source }
}

/// Waits for a freshly created (auto-attached or seized) task to stop.
fn wait_new_task(tid: i32) -> Result<(), RestoreError> {
    loop {
        match ptrace::wait(tid).map_err(stub_err(tid, "wait for new task"))? {
            Stop::Event | Stop::Signal(libc::SIGSTOP) => return Ok(()),
            Stop::Exited(_) | Stop::Killed(_) => {
                return Err(RestoreError::Stub {
                    pid: tid,
                    op: "start".into(),
                    source: std::io::Error::other("task exited"),
                })
            }
            _ => ptrace::cont(tid, 0).map_err(stub_err(tid, "ptrace cont"))?,
        }
    }
}

impl Stub {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub(super) fn leader(&mut self) -> &mut Injector {
        &mut self.threads[0]
    }

    /// Creates the root stub as floe's child with `pid` and empties it.
    pub(super) fn create_root(
        pid: i32,
        pre: &Preflight,
        scratch: u64,
        ns_init: Option<i32>,
    ) -> Result<Self, RestoreError> {
        let child = match ns_init {
            Some(init) => find_ns_root(init)?,
            None => spawn_with_pid(pid)?,
        };
        let mut stub = Self {
            pid: child,
            vpid: pid,
            threads: Vec::new(),
            scratch: 0,
            inst_sock: None,
            vdso_at: pre.host_block.0,
            fill: None,
        };
        // The caller's Tree owns the pid from here; but until pushed, clean up here on error.
        let r = (|| {
            ptrace::seize(child, STUB_OPTIONS).map_err(stub_err(child, "ptrace seize"))?;
            ptrace::interrupt(child).map_err(stub_err(child, "ptrace interrupt"))?;
            wait_new_task(child)?;
            let base = ptrace::get_regs(child).map_err(stub_err(child, "getregs"))?;
            let gadget = Injector::find_gadget(child, pre.host_vdso.0, pre.host_vdso.1)?;
            stub.threads.push(Injector::new(child, base, gadget));
            ptrace::set_sigmask(child, u64::MAX).map_err(stub_err(child, "setsigmask"))?;
            stub.empty_address_space(pre, scratch)
        })();
        if let Err(e) = r {
            kill_and_reap(child, &[child]);
            return Err(e);
        }
        Ok(stub)
    }

    /// Drops everything the stub inherited from floe: rseq registration,
    /// descriptors, and every mapping except the vdso block; maps scratch.
    fn empty_address_space(&mut self, pre: &Preflight, scratch: u64) -> Result<(), RestoreError> {
        let pid = self.pid;
        let rs = ptrace::get_rseq(pid).map_err(stub_err(pid, "get rseq"))?;
        if rs.ptr != 0 {
            const RSEQ_FLAG_UNREGISTER: u64 = 1;
            self.leader().call(libc::SYS_rseq, [rs.ptr, rs.len as u64, RSEQ_FLAG_UNREGISTER, rs.sig as u64, 0, 0])?;
        }
        self.leader().call(libc::SYS_close_range, [0, u32::MAX as u64, 0, 0, 0, 0])?;
        let maps = procfs::maps(pid, false).map_err(stub_err(pid, "read maps"))?;
        let top =
            maps.iter().filter(|m| m.path != "[vsyscall]").map(|m| m.end).max().unwrap_or(TASK_SIZE).max(TASK_SIZE);
        let (bs, be) = pre.host_block;
        if bs > 0 {
            self.leader().call(libc::SYS_munmap, [0, bs, 0, 0, 0, 0])?;
        }
        self.leader().call(libc::SYS_munmap, [be, top - be, 0, 0, 0, 0])?;
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        self.scratch = self.leader().call(libc::SYS_mmap, [scratch, SCRATCH_LEN, prot, flags, u64::MAX, 0])?;
        Ok(())
    }

    /// Forks a child stub with `pid` from this one (it inherits the empty
    /// address space and the scratch area).
    pub(super) fn fork_child(&mut self, pid: i32) -> Result<Stub, RestoreError> {
        let child = self.clone3(pid, 0, libc::SIGCHLD as u64)?;
        let r = (|| {
            wait_new_task(child)?;
            let base = ptrace::get_regs(child).map_err(stub_err(child, "getregs"))?;
            let gadget = self.threads[0].gadget();
            Ok(Stub {
                pid: child,
                vpid: pid,
                threads: vec![Injector::new(child, base, gadget)],
                scratch: self.scratch,
                inst_sock: None,
                vdso_at: self.vdso_at,
                fill: None,
            })
        })();
        if r.is_err() {
            kill_and_reap(child, &[child]);
        }
        r
    }

    /// Creates thread `tid` in this process; it stays stopped.
    pub(super) fn clone_thread(&mut self, tid: i32) -> Result<(), RestoreError> {
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        let t = self.clone3(tid, flags, 0)?;
        wait_new_task(t)?;
        let base = ptrace::get_regs(t).map_err(stub_err(t, "getregs"))?;
        let gadget = self.threads[0].gadget();
        self.threads.push(Injector::new(t, base, gadget));
        Ok(())
    }

    fn clone3(&mut self, want: i32, flags: u64, exit_signal: u64) -> Result<i32, RestoreError> {
        let at = self.scratch + CLONE_ARGS_OFF;
        let tid_at = at + 128;
        let mut args = Vec::with_capacity(88);
        // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal,
        // stack, stack_size, tls, set_tid, set_tid_size, cgroup.
        for v in [flags, 0, 0, 0, exit_signal, 0, 0, 0, tid_at, 1, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        self.leader().write_mem(at, &args)?;
        self.leader().write_mem(tid_at, &want.to_le_bytes())?;
        self.leader().last_child = None;
        let r = self.leader().raw(libc::SYS_clone3, [at, 88, 0, 0, 0, 0])?;
        match r {
            // The syscall returns the pid inside the stub's namespace; ptrace
            // reports the one floe sees (they differ under `restore -n`).
            r if r > 0 => Ok(self.threads[0].last_child.unwrap_or(r as i32)),
            r if r == -(libc::EEXIST as i64) => {
                Err(RestoreError::PidTaken { pid: want, owner: procfs::describe(want) })
            }
            r => Err(RestoreError::Stub {
                pid: want,
                op: "clone3 with set_tid inside the stub".into(),
                source: std::io::Error::from_raw_os_error(-r as i32),
            }),
        }
    }

    /// Moves the vvar/vdso block to where the image had it.
    pub(super) fn place_vdso(&mut self, vd: &pb::VdsoBlock, pre: &Preflight) -> Result<(), RestoreError> {
        let cur_start = self.vdso_at;
        if vd.start == cur_start {
            return Ok(());
        }
        let size = pre.host_block.1 - pre.host_block.0;
        let overlaps = |a: u64, b: u64| a < b + size && b < a + size;
        let mut from = cur_start;
        if overlaps(cur_start, vd.start) || overlaps(self.scratch, vd.start) {
            // Step aside first: mremap cannot move onto an overlapping range.
            let temp = [1u64 << 32, 1 << 40, 1 << 44, 1 << 36]
                .into_iter()
                .find(|t| !overlaps(*t, cur_start) && !overlaps(*t, vd.start) && !overlaps(*t, self.scratch))
                .unwrap_or(1 << 38);
            self.move_block(pre, from, temp)?;
            from = temp;
        }
        self.move_block(pre, from, vd.start)?;
        self.vdso_at = vd.start;
        Ok(())
    }

    /// After a fork from a fully built parent: drops the parent's mappings
    /// this process does not have, and the pages the parent has where this
    /// process had none, keeping everything shared copy-on-write. Returns
    /// the mappings still to be created.
    /// Brings the advice (VmFlags set by madvise/mlock) of `[start, end)`
    /// from `old` to `new`: a mapping kept across a live migration's
    /// passes whose flags changed. Transparent-huge-page advice can be set
    /// but not taken back to "none"; that is refused.
    pub(super) fn change_advice(
        &mut self,
        start: u64,
        end: u64,
        old: &[String],
        new: &[String],
    ) -> Result<(), RestoreError> {
        let len = end - start;
        let has = |l: &[String], f: &str| l.iter().any(|x| x == f);
        for f in ["hg", "nh", "dd", "dc", "wf", "mg", "lo"] {
            let (had, wants) = (has(old, f), has(new, f));
            if had == wants {
                continue;
            }
            let (nr, arg) = match (f, wants) {
                ("lo", true) => (libc::SYS_mlock, 0),
                ("lo", false) => (libc::SYS_munlock, 0),
                ("hg", true) => (libc::SYS_madvise, libc::MADV_HUGEPAGE),
                ("nh", true) => (libc::SYS_madvise, libc::MADV_NOHUGEPAGE),
                // Setting the other one clears it.
                ("hg", false) | ("nh", false) if has(new, "hg") || has(new, "nh") => continue,
                ("hg", false) | ("nh", false) => {
                    return Err(RestoreError::Refused {
                        what: format!(
                            "mapping {start:#x}-{end:#x} dropped its transparent-huge-page advice during pre-copy, \
                             which a staged copy cannot reproduce; migrate it again"
                        ),
                    })
                }
                ("dd", true) => (libc::SYS_madvise, libc::MADV_DONTDUMP),
                ("dd", false) => (libc::SYS_madvise, libc::MADV_DODUMP),
                ("dc", true) => (libc::SYS_madvise, libc::MADV_DONTFORK),
                ("dc", false) => (libc::SYS_madvise, libc::MADV_DOFORK),
                ("wf", true) => (libc::SYS_madvise, libc::MADV_WIPEONFORK),
                ("wf", false) => (libc::SYS_madvise, libc::MADV_KEEPONFORK),
                ("mg", true) => (libc::SYS_madvise, libc::MADV_MERGEABLE),
                _ => (libc::SYS_madvise, libc::MADV_UNMERGEABLE),
            };
            let args =
                if nr == libc::SYS_madvise { [start, len, arg as u64, 0, 0, 0] } else { [start, len, 0, 0, 0, 0] };
            self.leader().call(nr, args).map_err(|e| RestoreError::Refused {
                what: format!("cannot give mapping {start:#x}-{end:#x} its flag {f} back: {e}"),
            })?;
        }
        Ok(())
    }

    /// `forked`: this stub was just forked from `parent`'s, so mappings the
    /// parent had with MADV_DONTFORK are not here, and those with
    /// MADV_WIPEONFORK came empty: neither can serve the child.
    /// Mappings `kept` from an earlier layout `old` (the stub's, or the
    /// parent's it was forked with) carry the old flags: gives each part
    /// the flags of its new layout.
    pub(super) fn match_advice<'v>(
        &mut self,
        old: &[pb::Vma],
        kept: impl Iterator<Item = &'v pb::Vma>,
    ) -> Result<(), RestoreError> {
        for v in kept {
            for o in old.iter().filter(|o| o.start < v.end && v.start < o.end) {
                let (mut a, mut b) = (o.advice.clone(), v.advice.clone());
                a.sort();
                b.sort();
                if a != b {
                    self.change_advice(o.start.max(v.start), o.end.min(v.end), &o.advice, &v.advice)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn inherit_layout<'a>(
        &mut self,
        parent: &pb::Process,
        me: &'a pb::Process,
        forked: bool,
    ) -> Result<Vec<&'a pb::Vma>, RestoreError> {
        let not_inherited = |pv: &pb::Vma| forked && pv.advice.iter().any(|a| a == "dc" || a == "wf");
        // A parent mapping can serve a child mapping of the same kind over
        // their overlap (bounds may differ: the kernel merges and splits
        // mappings differently in each process).
        let compatible = |pv: &pb::Vma, cv: &pb::Vma| {
            let same_offsets = pv.kind == pb::VmaKind::AnonPrivate as i32
                || pv.pgoff as i128 - pv.start as i128 == cv.pgoff as i128 - cv.start as i128;
            !not_inherited(pv)
                && pv.kind == cv.kind
                && pv.path == cv.path
                && pv.shmem_id == cv.shmem_id
                && pv.sysv == cv.sysv
                && pv.growsdown == cv.growsdown
                && pv.start < cv.end
                && cv.start < pv.end
                && same_offsets
        };
        // What each parent mapping keeps; the rest is unmapped.
        let mut kept: Vec<(u64, u64)> = Vec::new();
        for pv in &parent.vmas {
            if not_inherited(pv) && pv.advice.iter().any(|a| a == "dc") {
                // fork did not copy it: nothing to unmap.
                continue;
            }
            let mut parts: Vec<(u64, u64)> = me
                .vmas
                .iter()
                .filter(|cv| compatible(pv, cv))
                .map(|cv| (pv.start.max(cv.start), pv.end.min(cv.end)))
                .collect();
            parts.sort_unstable();
            for (a, b) in subtract((pv.start, pv.end), &parts) {
                self.leader().call(libc::SYS_munmap, [a, b - a, 0, 0, 0, 0])?;
            }
            kept.extend(parts);
        }
        kept.sort_unstable();
        let mut fresh = Vec::new();
        for cv in &me.vmas {
            // Inherited only when the kept parts cover it entirely.
            if !subtract((cv.start, cv.end), &kept).is_empty() {
                fresh.push(cv);
                continue;
            }
            if cv.kind == pb::VmaKind::AnonShared as i32 || cv.kind == pb::VmaKind::FileShared as i32 {
                continue;
            }
            // Pages the parent has and this process had not: back to a hole.
            let mine = ranges_within(&me.page_runs, cv.start, cv.end);
            for (s, e) in ranges_within(&parent.page_runs, cv.start, cv.end) {
                for (a, b) in subtract((s, e), &mine) {
                    self.leader().call(libc::SYS_madvise, [a, b - a, libc::MADV_DONTNEED as u64, 0, 0, 0])?;
                }
            }
        }
        Ok(fresh)
    }

    fn move_block(&mut self, pre: &Preflight, from: u64, to: u64) -> Result<(), RestoreError> {
        let base = pre.host_block.0;
        // The gadget lies inside the block; it moves with it.
        let gadget_off = self.threads[0].gadget() - from;
        for (_, s, e) in &pre.host_parts {
            let len = e - s;
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            self.leader().call(libc::SYS_mremap, [from + (s - base), len, len, flags, to + (s - base), 0])?;
        }
        for t in &mut self.threads {
            t.set_gadget(to + gadget_off);
        }
        Ok(())
    }

    /// Name of the stub's descriptor-passing socket (abstract namespace).
    pub(super) fn inst_name(&self) -> String {
        format!("floe-install-{}-{}", std::process::id(), self.pid)
    }

    /// Receives descriptor `fd` of floe's and returns its number in the stub
    /// (the lowest free one; the caller moves or closes it).
    pub(super) fn receive_fd(&mut self, sender: &OwnedFd, fd: RawFd) -> Result<u64, RestoreError> {
        let sc = self.scratch;
        let s = self.installer(&[])?;
        let name = self.inst_name();
        task::send_fd(sender, name.as_bytes(), fd).map_err(|source| RestoreError::Stub {
            pid: self.pid,
            op: "passing a descriptor to the stub".into(),
            source,
        })?;
        // msghdr: name 0/0, iov -> +64, iovlen 1, control -> +128 (24 bytes).
        let msg = sc + MSG_OFF;
        let mut hdr = Vec::new();
        for v in [0u64, 0, msg + 64, 1, msg + 128, 24, 0] {
            hdr.extend_from_slice(&v.to_le_bytes());
        }
        let iov: Vec<u8> = [msg + 256, 16u64].iter().flat_map(|v| v.to_le_bytes()).collect();
        let inj = self.leader();
        inj.write_mem(msg, &hdr)?;
        inj.write_mem(msg + 64, &iov)?;
        inj.call(libc::SYS_recvmsg, [s, msg, 0, 0, 0, 0])?;
        let mut cm = [0u8; 24];
        inj.read_mem(msg + 128, &mut cm)?;
        Ok(i32::from_le_bytes([cm[16], cm[17], cm[18], cm[19]]) as u64)
    }

    /// The stub's descriptor-passing socket (created and bound on first
    /// use), moved off any number in `avoid`.
    pub(super) fn installer(&mut self, avoid: &[i32]) -> Result<u64, RestoreError> {
        let sc = self.scratch;
        let s = match self.inst_sock {
            Some(s) => s,
            None => {
                let name = self.inst_name();
                let (addr, alen) = task::abstract_addr(name.as_bytes());
                let inj = self.leader();
                let s = inj.call(
                    libc::SYS_socket,
                    [libc::AF_UNIX as u64, (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64, 0, 0, 0, 0],
                )?;
                inj.write_mem(sc + 3072, task::as_bytes(&addr))?;
                inj.call(libc::SYS_bind, [s, sc + 3072, alen as u64, 0, 0, 0])?;
                s
            }
        };
        // Park it just above every number the process uses: not higher,
        // since growing the descriptor table of a multi-threaded process
        // waits for an RCU grace period (10-20 ms).
        let want = avoid.iter().copied().max().unwrap_or(0).max(0) as u64 + 1;
        let s = if s != want && (s < want || avoid.contains(&(s as i32))) {
            let inj = self.leader();
            match inj.raw(libc::SYS_dup3, [s, want, libc::O_CLOEXEC as u64, 0, 0, 0])? {
                r if r >= 0 => {
                    inj.call(libc::SYS_close, [s, 0, 0, 0, 0, 0])?;
                    want
                }
                _ if !avoid.contains(&(s as i32)) => s,
                e => {
                    return Err(RestoreError::Stub {
                        pid: self.pid,
                        op: format!("moving the descriptor-passing socket to fd {want}"),
                        source: std::io::Error::from_raw_os_error(-e as i32),
                    })
                }
            }
        } else {
            s
        };
        self.inst_sock = Some(s);
        Ok(s)
    }

    /// Closes the stub's descriptor-passing socket.
    pub(super) fn close_installer(&mut self) -> Result<(), RestoreError> {
        if let Some(s) = self.inst_sock.take() {
            self.leader().call(libc::SYS_close, [s, 0, 0, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Creates shared memory object `v.shmem_id` inside this stub (a memfd
    /// with its name, or anonymous shared memory) and returns floe's
    /// descriptor of it.
    fn create_shmem(&mut self, v: &pb::Vma) -> Result<OwnedFd, RestoreError> {
        let pid = self.pid;
        let size = v.shmem_size.max(v.pgoff + (v.end - v.start));
        if !v.memfd_name.is_empty() {
            let name = self.put_str(0, &v.memfd_name)?;
            let fd = self.leader().call(libc::SYS_memfd_create, [name, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0])?;
            self.leader().call(libc::SYS_ftruncate, [fd, size, 0, 0, 0, 0])?;
            let pidfd =
                task::pidfd_open(pid).map_err(|source| RestoreError::Stub { pid, op: "pidfd_open".into(), source })?;
            let ours = task::pidfd_getfd(&pidfd, fd as i32).map_err(|source| RestoreError::Stub {
                pid,
                op: "pidfd_getfd".into(),
                source,
            })?;
            self.leader().call(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
            return Ok(ours);
        }
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let at = self
            .leader()
            .call(libc::SYS_mmap, [0, size, rw, (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64, u64::MAX, 0])?;
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", at, at + size);
        let ours = std::fs::OpenOptions::new().read(true).write(true).open(&path).map(OwnedFd::from);
        self.leader().call(libc::SYS_munmap, [at, size, 0, 0, 0, 0])?;
        ours.map_err(|source| RestoreError::Stub { pid, op: format!("opening {path}"), source })
    }

    /// Writes a NUL-terminated string into scratch at `off`.
    pub(super) fn put_str(&mut self, off: u64, s: &str) -> Result<u64, RestoreError> {
        let c = CString::new(s)
            .map_err(|_| RestoreError::File { path: s.into(), what: "path contains a NUL byte".into() })?;
        let bytes = c.as_bytes_with_nul();
        if off + bytes.len() as u64 > CLONE_ARGS_OFF {
            return Err(RestoreError::File { path: s.into(), what: "path too long".into() });
        }
        let at = self.scratch + off;
        self.leader().write_mem(at, bytes)?;
        Ok(at)
    }

    /// Opens `path` inside the stub and returns the descriptor.
    pub(super) fn open_in_stub(&mut self, path: &str, flags: u64) -> Result<u64, RestoreError> {
        let p = self.put_str(0, path)?;
        let r = self.leader().raw(libc::SYS_openat, [libc::AT_FDCWD as u64, p, flags, 0, 0, 0])?;
        if (-4095..0).contains(&r) {
            return Err(RestoreError::File {
                path: path.into(),
                what: format!(
                    "cannot be opened by the restored process: {}",
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            });
        }
        Ok(r as u64)
    }

    /// Maps every mapping of the process (writable while pages are filled).
    pub(super) fn map_vmas<'v>(
        &mut self,
        vmas: impl IntoIterator<Item = &'v pb::Vma>,
        shm: &mut Shmem,
    ) -> Result<(), RestoreError> {
        let mut files: HashMap<(String, bool), u64> = HashMap::new();
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        for v in vmas {
            let len = v.end - v.start;
            let kind = pb::VmaKind::try_from(v.kind).unwrap_or(pb::VmaKind::Unspecified);
            let mut flags = libc::MAP_FIXED as u64;
            if v.growsdown {
                flags |= libc::MAP_GROWSDOWN as u64;
            }
            let prot = v.prot as u64;
            let (prot, flags, fd, off) = match kind {
                pb::VmaKind::AnonPrivate => {
                    (prot | rw, flags | (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64, u64::MAX, 0)
                }
                pb::VmaKind::AnonShared if v.sysv => {
                    // shmat maps the whole segment read-write; finish sets the final protection.
                    let got = self.leader().call(libc::SYS_shmat, [v.shmem_id, v.start, 0, 0, 0, 0])?;
                    if got != v.start {
                        return Err(RestoreError::Refused {
                            what: format!(
                                "System V segment {} attached at {got:#x} instead of {:#x}",
                                v.shmem_id, v.start
                            ),
                        });
                    }
                    continue;
                }
                pb::VmaKind::AnonShared if v.shmem_id != 0 => {
                    if let std::collections::hash_map::Entry::Vacant(e) = shm.objects.entry(v.shmem_id) {
                        e.insert(self.create_shmem(v)?);
                    }
                    let obj = shm.objects.get(&v.shmem_id).map(|o| o.as_raw_fd()).unwrap_or(-1);
                    let fd = self.receive_fd(&shm.sender, obj)?;
                    files.insert((format!("shmem:{}:{}", v.shmem_id, v.start), false), fd);
                    (prot | rw, flags | libc::MAP_SHARED as u64, fd, v.pgoff)
                }
                pb::VmaKind::AnonShared => {
                    (prot | rw, flags | (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64, u64::MAX, 0)
                }
                pb::VmaKind::FilePrivate | pb::VmaKind::FileShared => {
                    let shared = kind == pb::VmaKind::FileShared;
                    let writable = shared && v.prot & libc::PROT_WRITE as u32 != 0;
                    // A deleted file is opened through floe's descriptor of the recreated one.
                    let path = match v.deleted {
                        true => {
                            let id = v.file.as_ref().map(|f| (f.dev, f.ino)).unwrap_or_default();
                            let f = shm.deleted.get(&id).ok_or_else(|| RestoreError::File {
                                path: v.path.clone(),
                                what: "was deleted, and its contents were not recreated".into(),
                            })?;
                            format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd())
                        }
                        false => v.path.clone(),
                    };
                    let key = (path, writable);
                    let fd = match files.get(&key) {
                        Some(fd) => *fd,
                        None => {
                            let oflags = if writable { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC;
                            let fd = self.open_in_stub(&key.0, oflags as u64)?;
                            files.insert(key, fd);
                            fd
                        }
                    };
                    if shared {
                        (prot, flags | libc::MAP_SHARED as u64, fd, v.pgoff)
                    } else {
                        (prot | rw, flags | libc::MAP_PRIVATE as u64, fd, v.pgoff)
                    }
                }
                pb::VmaKind::Unspecified => {
                    return Err(RestoreError::Refused {
                        what: format!("mapping {:#x}-{:#x} has an unknown kind", v.start, v.end),
                    })
                }
            };
            let got = self.leader().call(libc::SYS_mmap, [v.start, len, prot, flags, fd, off])?;
            if got != v.start {
                return Err(RestoreError::Refused {
                    what: format!("mapping {:#x}-{:#x} landed at {got:#x}", v.start, v.end),
                });
            }
            for a in &v.advice {
                if a == "lo" {
                    // mlock; RLIMIT_MEMLOCK is restored later, so only warn.
                    if let Err(e) = self.leader().call(libc::SYS_mlock, [v.start, len, 0, 0, 0, 0]) {
                        tracing::warn!(start = v.start, error = %e, "could not re-lock mapping in memory");
                    }
                    continue;
                }
                let adv = match a.as_str() {
                    "hg" => libc::MADV_HUGEPAGE,
                    "nh" => libc::MADV_NOHUGEPAGE,
                    "dd" => libc::MADV_DONTDUMP,
                    "dc" => libc::MADV_DONTFORK,
                    "wf" => libc::MADV_WIPEONFORK,
                    "mg" => libc::MADV_MERGEABLE,
                    _ => continue,
                };
                if let Err(e) = self.leader().call(libc::SYS_madvise, [v.start, len, adv as u64, 0, 0, 0]) {
                    tracing::warn!(start = v.start, advice = %a, error = %e, "could not restore madvise flag");
                }
            }
        }
        for fd in files.into_values() {
            self.leader().call(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Copies `data` into the stub's memory at `ranges` (in order).
    pub fn write_pages(&mut self, data: &[u8], ranges: &[Range]) -> Result<(), RestoreError> {
        match self.fill.as_mut() {
            Some(f) => f.write(self.pid, data, ranges),
            None => super::fill::write_checked(self.pid, data, ranges),
        }
    }

    /// Writes into fresh private anonymous memory of `vmas` go through
    /// UFFDIO_COPY from now on (see [`super::fill`]). Best effort: without
    /// it pages are written as before.
    pub(super) fn start_filling<'v>(&mut self, vmas: impl IntoIterator<Item = &'v pb::Vma>) {
        let pid = self.pid;
        match super::fill::Filler::start(pid, self.leader(), vmas) {
            Ok(f) => self.fill = Some(f),
            Err(e) => tracing::debug!(pid, error = %e, "pages are written without UFFDIO_COPY"),
        }
    }

    /// Drops the UFFDIO_COPY registration (unregistered, then the uffd closed).
    /// Returns the bytes it copied and the bytes written the usual way.
    pub(super) fn stop_filling(&mut self) -> (u64, u64) {
        self.fill.take().map(|f| (f.copied, f.written)).unwrap_or_default()
    }

    pub(super) fn tids(&self) -> Vec<i32> {
        self.threads.iter().map(|t| t.pid()).collect()
    }
}

/// Address ranges of the runs within [start, end), clipped, sorted and merged.
fn ranges_within(runs: &[pb::PageRun], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = runs
        .iter()
        .map(|r| (r.vaddr.max(start), (r.vaddr + r.nr_pages * 4096).min(end)))
        .filter(|(s, e)| s < e)
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `range` minus the sorted, disjoint `holes`.
fn subtract(range: (u64, u64), holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cur = range.0;
    for &(s, e) in holes {
        if e <= cur || s >= range.1 {
            continue;
        }
        if s > cur {
            out.push((cur, s));
        }
        cur = cur.max(e);
    }
    if cur < range.1 {
        out.push((cur, range.1));
    }
    out
}

/// Kills a stub process and collects the exit of each of its tasks.
pub(super) fn kill_and_reap(pid: i32, tids: &[i32]) {
    let _ = task::kill(pid, libc::SIGKILL);
    for &t in tids.iter().rev() {
        loop {
            match ptrace::wait(t) {
                Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) | Err(_) => break,
                Ok(_) => {
                    let _ = ptrace::cont(t, 0);
                }
            }
        }
    }
}

/// The restore stub created by a new namespace's init (its only child).
fn find_ns_root(init: i32) -> Result<i32, RestoreError> {
    let t = std::time::Instant::now();
    loop {
        if let Ok(kids) = procfs::children(init) {
            if let Some(k) = kids.first() {
                return Ok(*k);
            }
        }
        if let Ok(Some(st)) = ptrace::try_wait(init) {
            return Err(RestoreError::Stub {
                pid: init,
                op: format!("pid namespace init exited early ({st:?}); is the pid above kernel.pid_max?"),
                source: std::io::Error::other("init exited"),
            });
        }
        if t.elapsed() > std::time::Duration::from_secs(5) {
            return Err(RestoreError::Stub {
                pid: init,
                op: "waiting for the pid namespace init to create the stub".into(),
                source: std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// clone3 with set_tid from floe, waiting out a zombie that still holds the pid.
fn spawn_with_pid(pid: i32) -> Result<i32, RestoreError> {
    for _ in 0..3 {
        match task::spawn_stub(pid) {
            Ok(child) => return Ok(child),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                wait_pid_free(pid)?;
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                return Err(RestoreError::Stub {
                    pid,
                    op: "clone3 with set_tid (needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN)".into(),
                    source: e,
                })
            }
            Err(e) => return Err(RestoreError::Stub { pid, op: "clone3 with set_tid".into(), source: e }),
        }
    }
    Err(RestoreError::PidTaken { pid, owner: procfs::describe(pid) })
}

/// An address range of SCRATCH_LEN free in every layout of the image.
pub(super) fn choose_scratch(m: &pb::Manifest, pre: &Preflight) -> Result<u64, RestoreError> {
    let mut used: Vec<(u64, u64)> = vec![pre.host_block];
    for p in &m.processes {
        used.extend(p.vmas.iter().map(|v| (v.start, v.end)));
        if let Some(vd) = &p.vdso {
            used.push((vd.start, vd.end));
        }
    }
    used.sort_unstable();
    // Keep a 1 MiB gap on both sides so a growsdown stack never meets it.
    let mut candidate = 0x1000_0000u64;
    for (s, e) in &used {
        if candidate + SCRATCH_LEN + 0x10_0000 <= *s {
            break;
        }
        candidate = candidate.max(e + 0x10_0000);
    }
    if candidate + SCRATCH_LEN >= TASK_SIZE {
        return Err(RestoreError::Refused { what: "no free address range for the restore scratch area".into() });
    }
    Ok(candidate)
}
