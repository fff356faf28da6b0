//! `floe dump`: freeze → collect → write.
//!
//! The process is seized with ptrace and interrupted, its state read from
//! ptrace, /proc and a few syscalls injected into it, its present pages
//! copied with process_vm_readv while a second thread checksums and writes
//! them, and the image committed atomically. Until the image is committed
//! nothing is changed for good: every error path puts the registers back and
//! detaches, so the process carries on as before.
mod checks;
mod files;
mod memory;
mod parasite;

pub use files::simple_device;
pub use memory::is_vdso_part;

use crate::image::{ImageError, ImageWriter};
use crate::inject::{resume_with_restart, InjectError, Injector};
use crate::procfs;
use crate::sys::ptrace::{self, Stop, UserRegs};
use crate::sys::task;
use floe_proto::image as pb;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to dump and how.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    pub leave_running: bool,
    pub shell_job: bool,
    pub force: bool,
}

/// Per-phase timings of a dump, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DumpTimings {
    /// Seize + interrupt until the process is stopped.
    pub freeze_ms: f64,
    /// Registers, injected queries, /proc, descriptors.
    pub collect_ms: f64,
    /// Page scan + copy + checksum + write.
    pub memory_ms: f64,
    /// Manifest write, fsync and rename.
    pub commit_ms: f64,
    /// Time the process spent stopped.
    pub frozen_ms: f64,
    pub total_ms: f64,
}

/// Outcome of a dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub dir: PathBuf,
    pub vmas: usize,
    pub fds: usize,
    pub page_bytes: u64,
    pub image_bytes: u64,
    pub left_running: bool,
    pub timings: DumpTimings,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("no process with pid {pid}")]
    NoProcess { pid: i32 },
    #[error("cannot dump pid {pid}: {what}")]
    Refused { pid: i32, what: String },
    #[error("pid {pid}: cannot read {path}")]
    Proc {
        pid: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: ptrace {op} failed")]
    Ptrace {
        pid: i32,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: cannot read memory at {addr:#x}")]
    Memory {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: {what}")]
    Io {
        pid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

pub(crate) fn proc_err(pid: i32, path: &str) -> impl FnOnce(std::io::Error) -> DumpError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            DumpError::NoProcess { pid }
        } else {
            DumpError::Proc { pid, path: path.to_string(), source }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A process held in a ptrace stop. Dropping it without `kill` or `resume`
/// resumes the process exactly where it was.
struct Frozen {
    pid: i32,
    regs: UserRegs,
    injected: bool,
    done: bool,
}

impl Frozen {
    fn seize(pid: i32) -> Result<Self, DumpError> {
        ptrace::seize(pid, ptrace::DUMP_OPTIONS).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => DumpError::NoProcess { pid },
            Some(libc::EPERM) => DumpError::Refused {
                pid,
                what: "ptrace attach not permitted (already traced, or floe lacks CAP_SYS_PTRACE)".into(),
            },
            _ => DumpError::Ptrace { pid, op: "seize", source },
        })?;
        let mut me = Self { pid, regs: zero_regs(), injected: false, done: false };
        ptrace::interrupt(pid).map_err(|source| DumpError::Ptrace { pid, op: "interrupt", source })?;
        loop {
            match ptrace::wait(pid).map_err(|source| DumpError::Ptrace { pid, op: "wait", source })? {
                Stop::Event => break,
                Stop::Exited(_) | Stop::Killed(_) => {
                    me.done = true;
                    return Err(DumpError::NoProcess { pid });
                }
                Stop::Signal(sig) => {
                    // A signal raced with the freeze: keep it pending for the process.
                    ptrace::cont(pid, sig).map_err(|source| DumpError::Ptrace { pid, op: "cont", source })?;
                    ptrace::interrupt(pid).map_err(|source| DumpError::Ptrace { pid, op: "interrupt", source })?;
                }
                Stop::Syscall | Stop::OtherEvent(_) => {
                    ptrace::cont(pid, 0).map_err(|source| DumpError::Ptrace { pid, op: "cont", source })?;
                }
            }
        }
        me.regs = ptrace::get_regs(pid).map_err(|source| DumpError::Ptrace { pid, op: "getregs", source })?;
        Ok(me)
    }

    fn resume(mut self) -> Result<(), DumpError> {
        self.done = true;
        resume_with_restart(self.pid, &self.regs, self.injected)?;
        Ok(())
    }

    fn kill(mut self) -> Result<(), DumpError> {
        self.done = true;
        let pid = self.pid;
        task::kill(pid, libc::SIGKILL).map_err(|source| DumpError::Io {
            pid,
            what: "cannot kill the dumped process".into(),
            source,
        })?;
        // Collect the tracer's exit notification.
        loop {
            match ptrace::wait(pid) {
                Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) | Err(_) => break,
                Ok(_) => {
                    let _ = ptrace::cont(pid, 0);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = resume_with_restart(self.pid, &self.regs, self.injected) {
                tracing::error!(pid = self.pid, error = %e, "could not resume the process after a failed dump");
            }
        }
    }
}

pub(crate) fn zero_regs() -> UserRegs {
    regs_from_bytes(&[])
}

/// Encodes registers as 27 little-endian u64 in kernel order.
pub fn regs_to_bytes(r: &UserRegs) -> Vec<u8> {
    let f = [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx, r.rsi, r.rdi,
        r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds, r.es, r.fs, r.gs,
    ];
    f.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decodes registers written by [`regs_to_bytes`]; short input is zero-filled.
pub fn regs_from_bytes(b: &[u8]) -> UserRegs {
    let g = |i: usize| -> u64 {
        let mut a = [0u8; 8];
        if let Some(s) = b.get(i * 8..i * 8 + 8) {
            a.copy_from_slice(s);
        }
        u64::from_le_bytes(a)
    };
    UserRegs {
        r15: g(0),
        r14: g(1),
        r13: g(2),
        r12: g(3),
        rbp: g(4),
        rbx: g(5),
        r11: g(6),
        r10: g(7),
        r9: g(8),
        r8: g(9),
        rax: g(10),
        rcx: g(11),
        rdx: g(12),
        rsi: g(13),
        rdi: g(14),
        orig_rax: g(15),
        rip: g(16),
        cs: g(17),
        eflags: g(18),
        rsp: g(19),
        ss: g(20),
        fs_base: g(21),
        gs_base: g(22),
        ds: g(23),
        es: g(24),
        fs: g(25),
        gs: g(26),
    }
}

/// Dumps one process into `opts.dir`.
pub fn dump(opts: &DumpOptions) -> Result<DumpReport, DumpError> {
    let t0 = Instant::now();
    let pid = opts.pid;
    let pre = checks::preflight(pid, opts)?;
    let writer = ImageWriter::create(&opts.dir, opts.force)?;
    let result = dump_frozen(opts, &pre, &writer, t0);
    if result.is_err() {
        writer.abort();
    }
    let (mut report, frozen) = result?;
    let t_release = Instant::now();
    if opts.leave_running {
        frozen.resume()?;
    } else {
        frozen.kill()?;
    }
    report.timings.frozen_ms += ms(t_release.elapsed());
    report.timings.total_ms = ms(t0.elapsed());
    tracing::info!(pid, timings = ?report.timings, page_bytes = report.page_bytes, "dump complete");
    Ok(report)
}

fn dump_frozen(
    opts: &DumpOptions,
    pre: &checks::Preflight,
    writer: &ImageWriter,
    t0: Instant,
) -> Result<(DumpReport, Frozen), DumpError> {
    let pid = opts.pid;
    let mut timings = DumpTimings::default();
    let t_freeze = Instant::now();
    let mut frozen = Frozen::seize(pid)?;
    timings.freeze_ms = ms(t_freeze.elapsed());
    checks::after_freeze(pid)?;

    let t_collect = Instant::now();
    let regs = frozen.regs;
    let xstate = ptrace::get_xstate(pid).map_err(|source| DumpError::Ptrace { pid, op: "getregset xstate", source })?;
    let sigmask = ptrace::get_sigmask(pid).map_err(|source| DumpError::Ptrace { pid, op: "getsigmask", source })?;
    let rseq =
        ptrace::get_rseq(pid).map_err(|source| DumpError::Ptrace { pid, op: "get rseq configuration", source })?;
    let (robust, robust_len) = task::get_robust_list(pid).map_err(|source| DumpError::Io {
        pid,
        what: "get_robust_list failed".into(),
        source,
    })?;

    let maps = procfs::maps(pid, true).map_err(proc_err(pid, "smaps"))?;
    let vdso = memory::vdso_block(pid, &maps)?;
    let gadget = Injector::find_gadget(pid, vdso.vdso_start, vdso.vdso_end)?;
    let mut inj = Injector::new(pid, regs, gadget);
    frozen.injected = true;
    let par = parasite::collect(&mut inj, sigmask)?;
    // Only SECBIT_KEEP_CAPS (bit 4) is restored; anything else would silently differ.
    if par.securebits & !(1 << 4) != 0 {
        return Err(DumpError::Refused {
            pid,
            what: format!("it sets securebits {:#x}, which this version cannot restore", par.securebits),
        });
    }
    // Signals are read after injection: anything that arrived meanwhile stayed pending.
    let pending =
        ptrace::peek_siginfo(pid, false).map_err(|source| DumpError::Ptrace { pid, op: "peeksiginfo", source })?;
    let shared_pending = ptrace::peek_siginfo(pid, true).map_err(|source| DumpError::Ptrace {
        pid,
        op: "peeksiginfo shared",
        source,
    })?;

    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let vmas = memory::classify(pid, &maps, &mut blobs)?;
    let fds = files::collect(pid, opts.shell_job, &mut blobs)?;
    let process = build_process(
        pid,
        pre,
        opts,
        &regs,
        xstate,
        sigmask,
        rseq,
        (robust, robust_len),
        &par,
        pending,
        shared_pending,
    )?;
    timings.collect_ms = ms(t_collect.elapsed());

    let t_mem = Instant::now();
    let pages = writer.open_pages()?;
    let out = memory::write_pages(pid, &vmas, pages, writer.pages_tmp_path(), &blobs)?;
    timings.memory_ms = ms(t_mem.elapsed());

    let t_commit = Instant::now();
    let manifest = pb::Manifest {
        format_version: crate::image::FORMAT_VERSION,
        floe_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        process: Some(process),
        vmas: vmas.iter().map(|v| v.pb.clone()).collect(),
        page_runs: out.runs,
        fds: fds.clone(),
        pages_file_size: out.file_size,
        vdso: Some(vdso.pb.clone()),
        blobs: out.blobs,
        image_id: writer.image_id.to_vec(),
    };
    let manifest_len = writer.commit(&manifest, out.file)?;
    timings.commit_ms = ms(t_commit.elapsed());
    timings.frozen_ms = ms(t_freeze.elapsed());
    timings.total_ms = ms(t0.elapsed());
    let report = DumpReport {
        pid,
        dir: opts.dir.clone(),
        vmas: manifest.vmas.len(),
        fds: fds.len(),
        page_bytes: out.page_bytes,
        image_bytes: out.file_size + manifest_len,
        left_running: opts.leave_running,
        timings,
    };
    Ok((report, frozen))
}

#[allow(clippy::too_many_arguments)]
fn build_process(
    pid: i32,
    pre: &checks::Preflight,
    opts: &DumpOptions,
    regs: &UserRegs,
    xstate: Vec<u8>,
    sigmask: u64,
    rseq: ptrace::RseqConfig,
    robust: (u64, u64),
    par: &parasite::Collected,
    pending: Vec<[u8; ptrace::SIGINFO_SIZE]>,
    shared_pending: Vec<[u8; ptrace::SIGINFO_SIZE]>,
) -> Result<pb::Process, DumpError> {
    let st = procfs::status(pid).map_err(proc_err(pid, "status"))?;
    let sf = procfs::stat_fields(pid).map_err(proc_err(pid, "stat"))?;
    let auxv = std::fs::read(procfs::path(pid, "auxv")).map_err(proc_err(pid, "auxv"))?;
    let exe_path = procfs::readlink(pid, "exe").map_err(proc_err(pid, "exe"))?;
    if exe_path.ends_with(" (deleted)") {
        return Err(DumpError::Refused {
            pid,
            what: format!("its executable {exe_path} was deleted; restore would have nothing to map"),
        });
    }
    let exe_meta = std::fs::metadata(procfs::path(pid, "exe")).map_err(proc_err(pid, "exe"))?;
    let cwd = procfs::readlink(pid, "cwd").map_err(proc_err(pid, "cwd"))?;
    if cwd.ends_with(" (deleted)") {
        return Err(DumpError::Refused { pid, what: format!("its working directory {cwd} was deleted") });
    }
    let root = procfs::readlink(pid, "root").map_err(proc_err(pid, "root"))?;
    let comm = std::fs::read_to_string(procfs::path(pid, "comm"))
        .map_err(proc_err(pid, "comm"))?
        .trim_end_matches('\n')
        .to_string();
    let personality = std::fs::read_to_string(procfs::path(pid, "personality"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let timerslack_ns = std::fs::read_to_string(procfs::path(pid, "timerslack_ns"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(50_000);
    let mut rlimits = Vec::new();
    for res in 0..16u32 {
        let (cur, max) = task::get_rlimit(pid, res).map_err(|source| DumpError::Io {
            pid,
            what: format!("prlimit64 resource {res}"),
            source,
        })?;
        rlimits.push(pb::Rlimit { resource: res, cur, max });
    }
    let f = |n| procfs::stat_field(&sf, n);
    let mm = pb::MmFields {
        start_code: f(26),
        end_code: f(27),
        start_stack: f(28),
        start_data: f(45),
        end_data: f(46),
        start_brk: f(47),
        brk: par.brk,
        arg_start: f(48),
        arg_end: f(49),
        env_start: f(50),
        env_end: f(51),
        auxv,
    };
    let thread = pb::Thread {
        tid: pid,
        gpregs: regs_to_bytes(regs),
        xstate,
        sigmask,
        pending: pending.into_iter().map(|s| pb::PendingSignal { siginfo: s.to_vec() }).collect(),
        altstack: Some(par.altstack),
        rseq: (rseq.ptr != 0).then_some(pb::Rseq { ptr: rseq.ptr, len: rseq.len, sig: rseq.sig }),
        robust_list: robust.0,
        robust_list_len: robust.1,
        clear_child_tid: par.clear_child_tid,
        comm: comm.clone(),
    };
    Ok(pb::Process {
        pid,
        ppid: st.ppid,
        pgid: pre.pgid,
        sid: pre.sid,
        comm,
        cmdline: procfs::cmdline(pid).unwrap_or_default(),
        exe_path,
        exe_id: Some(files::file_id(&exe_meta)),
        cwd,
        root,
        uid: st.uids[0],
        euid: st.uids[1],
        suid: st.uids[2],
        fsuid: st.uids[3],
        gid: st.gids[0],
        egid: st.gids[1],
        sgid: st.gids[2],
        fsgid: st.gids[3],
        groups: st.groups.clone(),
        personality,
        mm: Some(mm),
        thread: Some(thread),
        sigactions: par.sigactions.clone(),
        shared_pending: shared_pending.into_iter().map(|s| pb::PendingSignal { siginfo: s.to_vec() }).collect(),
        rlimits,
        itimers: par.itimers.clone(),
        pdeathsig: par.pdeathsig,
        child_subreaper: par.child_subreaper,
        thp_disabled: par.thp_disabled,
        dumpable: par.dumpable,
        timerslack_ns,
        umask: st.umask as u64,
        shell_job: opts.shell_job,
        cap_eff: st.cap_eff,
        cap_prm: st.cap_prm,
        cap_inh: st.cap_inh,
        cap_bnd: st.cap_bnd,
        no_new_privs: st.no_new_privs,
        cap_amb: st.cap_amb,
        nice: procfs::stat_field(&sf, 19) as i64 as i32,
        securebits: par.securebits,
    })
}
