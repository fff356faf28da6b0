//! Stage a (create the stub and its address space) and stage b (pages).
use super::preflight::{wait_pid_free, Preflight};
use super::RestoreError;
use crate::inject::Injector;
use crate::procfs;
use crate::sys::memory::{write_remote, Range};
use crate::sys::ptrace::{self, Stop};
use crate::sys::task;
use floe_proto::image as pb;
use std::collections::HashMap;
use std::ffi::CString;

/// Scratch area mapped in the stub for syscall arguments.
pub const SCRATCH_LEN: u64 = 64 * 1024;
const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// A stopped process being rebuilt from an image.
pub struct Stub {
    pub(super) pid: i32,
    pub(super) inj: Injector,
    pub(super) scratch: u64,
    pub(super) finished: bool,
}

fn stub_err(pid: i32, op: impl Into<String>) -> impl FnOnce(std::io::Error) -> RestoreError {
    let op = op.into();
    move |source| RestoreError::Stub { pid, op, source }
}

impl Stub {
    /// Stage a: creates the stopped stub with the image's pid and builds its
    /// address space (mappings without their data).
    pub fn create(m: &pb::Manifest, pre: &Preflight) -> Result<Self, RestoreError> {
        let pid = pre.pid;
        let child = spawn_with_pid(pid)?;
        // From here on, dropping `stub` kills the child.
        let mut stub =
            Self { pid: child, inj: Injector::new(child, crate::dump::zero_regs(), 0), scratch: 0, finished: false };
        ptrace::seize(child, ptrace::STUB_OPTIONS).map_err(stub_err(child, "ptrace seize"))?;
        ptrace::interrupt(child).map_err(stub_err(child, "ptrace interrupt"))?;
        loop {
            match ptrace::wait(child).map_err(stub_err(child, "wait"))? {
                Stop::Event => break,
                Stop::Exited(_) | Stop::Killed(_) => {
                    return Err(RestoreError::Stub {
                        pid: child,
                        op: "start".into(),
                        source: std::io::Error::other("stub exited"),
                    })
                }
                _ => ptrace::cont(child, 0).map_err(stub_err(child, "ptrace cont"))?,
            }
        }
        let base = ptrace::get_regs(child).map_err(stub_err(child, "getregs"))?;
        let gadget = Injector::find_gadget(child, pre.host_vdso.0, pre.host_vdso.1)?;
        stub.inj = Injector::new(child, base, gadget);
        ptrace::set_sigmask(child, u64::MAX).map_err(stub_err(child, "setsigmask"))?;
        stub.empty_address_space(pre)?;
        stub.place_vdso(m, pre)?;
        stub.map_scratch(m)?;
        stub.map_vmas(m)?;
        Ok(stub)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Drops everything the stub inherited from floe: rseq registration,
    /// descriptors, and every mapping except the vdso block.
    fn empty_address_space(&mut self, pre: &Preflight) -> Result<(), RestoreError> {
        let pid = self.pid;
        let rs = ptrace::get_rseq(pid).map_err(stub_err(pid, "get rseq"))?;
        if rs.ptr != 0 {
            const RSEQ_FLAG_UNREGISTER: u64 = 1;
            self.inj.call(libc::SYS_rseq, [rs.ptr, rs.len as u64, RSEQ_FLAG_UNREGISTER, rs.sig as u64, 0, 0])?;
        }
        self.inj.call(libc::SYS_close_range, [0, u32::MAX as u64, 0, 0, 0, 0])?;
        let maps = procfs::maps(pid, false).map_err(stub_err(pid, "read maps"))?;
        let top =
            maps.iter().filter(|m| m.path != "[vsyscall]").map(|m| m.end).max().unwrap_or(TASK_SIZE).max(TASK_SIZE);
        let (bs, be) = pre.host_block;
        if bs > 0 {
            self.inj.call(libc::SYS_munmap, [0, bs, 0, 0, 0, 0])?;
        }
        self.inj.call(libc::SYS_munmap, [be, top - be, 0, 0, 0, 0])?;
        Ok(())
    }

    /// Moves the vvar/vdso block to where the image had it.
    fn place_vdso(&mut self, m: &pb::Manifest, pre: &Preflight) -> Result<(), RestoreError> {
        let vd = m.vdso.as_ref().ok_or_else(|| RestoreError::Refused { what: "image has no vdso record".into() })?;
        let (cur_start, cur_end) = pre.host_block;
        if vd.start == cur_start {
            return Ok(());
        }
        let size = cur_end - cur_start;
        let overlaps = |a: u64, b: u64| a < b + size && b < a + size;
        let mut from = cur_start;
        if overlaps(cur_start, vd.start) {
            // Step aside first: mremap cannot move onto an overlapping range.
            let temp = [1u64 << 32, 1 << 40, 1 << 44]
                .into_iter()
                .find(|t| !overlaps(*t, cur_start) && !overlaps(*t, vd.start))
                .unwrap_or(1 << 36);
            self.move_block(pre, from, temp)?;
            from = temp;
        }
        self.move_block(pre, from, vd.start)?;
        Ok(())
    }

    fn move_block(&mut self, pre: &Preflight, from: u64, to: u64) -> Result<(), RestoreError> {
        let base = pre.host_block.0;
        // The gadget lies inside the block; it moves with it.
        let gadget_off = self.inj.gadget() - from;
        for (_, s, e) in &pre.host_parts {
            let len = e - s;
            let old = from + (s - base);
            let new = to + (s - base);
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            self.inj.call(libc::SYS_mremap, [old, len, len, flags, new, 0])?;
        }
        self.inj.set_gadget(to + gadget_off);
        Ok(())
    }

    /// Maps the scratch area in a hole of the image's layout.
    fn map_scratch(&mut self, m: &pb::Manifest) -> Result<(), RestoreError> {
        let mut used: Vec<(u64, u64)> = m.vmas.iter().map(|v| (v.start, v.end)).collect();
        if let Some(vd) = &m.vdso {
            used.push((vd.start, vd.end));
        }
        used.sort_unstable();
        // Leave a page of gap on both sides so a growsdown stack never meets it.
        let mut candidate = 0x1000_0000u64;
        for (s, e) in &used {
            if candidate + SCRATCH_LEN + 4096 <= *s {
                break;
            }
            candidate = candidate.max(e + 0x10_0000);
        }
        if candidate + SCRATCH_LEN >= TASK_SIZE {
            return Err(RestoreError::Refused { what: "no free address range for the restore scratch area".into() });
        }
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        let a = self.inj.call(libc::SYS_mmap, [candidate, SCRATCH_LEN, prot, flags, u64::MAX, 0])?;
        self.scratch = a;
        Ok(())
    }

    /// Writes a NUL-terminated string at the start of scratch (+off).
    pub(super) fn put_str(&self, off: u64, s: &str) -> Result<u64, RestoreError> {
        let c = CString::new(s)
            .map_err(|_| RestoreError::File { path: s.into(), what: "path contains a NUL byte".into() })?;
        let bytes = c.as_bytes_with_nul();
        if off + bytes.len() as u64 > SCRATCH_LEN {
            return Err(RestoreError::File { path: s.into(), what: "path too long".into() });
        }
        self.inj.write_mem(self.scratch + off, bytes)?;
        Ok(self.scratch + off)
    }

    /// Opens `path` inside the stub and returns the descriptor.
    pub(super) fn open_in_stub(&mut self, path: &str, flags: u64) -> Result<u64, RestoreError> {
        let p = self.put_str(0, path)?;
        let r = self.inj.raw(libc::SYS_openat, [libc::AT_FDCWD as u64, p, flags, 0, 0, 0])?;
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

    fn map_vmas(&mut self, m: &pb::Manifest) -> Result<(), RestoreError> {
        let mut files: HashMap<(String, bool), u64> = HashMap::new();
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        for v in &m.vmas {
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
                pb::VmaKind::AnonShared => {
                    (prot | rw, flags | (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64, u64::MAX, 0)
                }
                pb::VmaKind::FilePrivate | pb::VmaKind::FileShared => {
                    let shared = kind == pb::VmaKind::FileShared;
                    let writable = shared && v.prot & libc::PROT_WRITE as u32 != 0;
                    let key = (v.path.clone(), writable);
                    let fd = match files.get(&key) {
                        Some(fd) => *fd,
                        None => {
                            let oflags = if writable { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC;
                            let fd = self.open_in_stub(&v.path, oflags as u64)?;
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
            let got = self.inj.call(libc::SYS_mmap, [v.start, len, prot, flags, fd, off])?;
            if got != v.start {
                return Err(RestoreError::Refused {
                    what: format!("mapping {:#x}-{:#x} landed at {got:#x}", v.start, v.end),
                });
            }
            for a in &v.advice {
                if a == "lo" {
                    // mlock: fails only on RLIMIT_MEMLOCK, which is restored later; warn.
                    if let Err(e) = self.inj.call(libc::SYS_mlock, [v.start, len, 0, 0, 0, 0]) {
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
                    _ => continue,
                };
                if let Err(e) = self.inj.call(libc::SYS_madvise, [v.start, len, adv as u64, 0, 0, 0]) {
                    tracing::warn!(start = v.start, advice = %a, error = %e, "could not restore madvise flag");
                }
            }
        }
        for fd in files.into_values() {
            self.inj.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Stage b: copies `data` into the stub's memory at `ranges` (in order;
    /// their lengths add up to `data.len()`). Callable any number of times.
    pub fn write_pages(&mut self, data: &[u8], ranges: &[Range]) -> Result<(), RestoreError> {
        let n = write_remote(self.pid, data, ranges).map_err(|source| RestoreError::Memory {
            pid: self.pid,
            addr: ranges.first().map(|r| r.addr).unwrap_or(0),
            source,
        })?;
        if n != data.len() {
            let mut left = n as u64;
            let mut addr = 0;
            for r in ranges {
                if left < r.len {
                    addr = r.addr + left;
                    break;
                }
                left -= r.len;
            }
            return Err(RestoreError::Memory {
                pid: self.pid,
                addr,
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            });
        }
        Ok(())
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if !self.finished {
            let _ = task::kill(self.pid, libc::SIGKILL);
            loop {
                match ptrace::wait(self.pid) {
                    Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}

/// clone3 with set_tid, waiting out a zombie that still holds the pid.
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
