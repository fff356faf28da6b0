//! State only the process itself can report, read by injecting syscalls
//! into it while it is stopped. A scratch page is mapped for the results and
//! unmapped before anything else is read, so the dumped layout is untouched.
use super::DumpError;
use crate::inject::Injector;
use crate::sys::ptrace;
use floe_proto::image as pb;

/// Per-thread values only the thread itself can report.
pub struct ThreadExtra {
    pub altstack: pb::Altstack,
    pub clear_child_tid: u64,
    /// PR_GET_TIMERSLACK of the thread itself.
    pub timerslack_ns: u64,
}

pub struct Collected {
    /// Remaining value and interval (ns) of each POSIX timer asked for.
    pub timers: Vec<(u64, u64)>,
    pub sigactions: Vec<pb::SigAction>,
    /// Same order as the injectors passed in (leader first).
    pub threads: Vec<ThreadExtra>,
    pub itimers: Vec<pb::ITimer>,
    pub brk: u64,
    pub pdeathsig: i32,
    pub child_subreaper: bool,
    pub thp_disabled: bool,
    pub dumpable: i32,
    pub securebits: u32,
    /// mlockall flags in force for future mappings: 0, MCL_FUTURE, or
    /// MCL_FUTURE | MCL_ONFAULT (the scratch page came locked).
    pub mlock_future: u32,
}

/// Locked memory of `pid` in kB (`VmLck:`).
fn locked_kb(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(crate::procfs::path(pid, "status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("VmLck:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The mlockall flags for future mappings, seen from the scratch page just
/// mapped at `scratch`: locked on mapping means MCL_FUTURE (VmLck grew), and
/// its VmFlags then say whether MCL_ONFAULT too (smaps is read only then).
fn mlock_future(pid: i32, before_kb: Option<u64>, scratch: u64) -> u32 {
    let grew = matches!((before_kb, locked_kb(pid)), (Some(b), Some(a)) if a > b);
    if !grew {
        return 0;
    }
    let onfault = crate::procfs::maps(pid, true)
        .ok()
        .and_then(|maps| maps.into_iter().find(|m| m.start == scratch))
        .is_some_and(|m| m.has_flag("lf"));
    (libc::MCL_FUTURE | if onfault { libc::MCL_ONFAULT } else { 0 }) as u32
}

const SCRATCH: u64 = 4096;

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Runs the queries. `injs[0]` is the thread-group leader; `masks` are
/// the threads' signal masks, put back afterwards.
/// `sig_query` has a bit set for each signal whose disposition to read
/// (signals with the default action and no flags need no syscall).
pub fn collect(
    injs: &mut [Injector],
    masks: &[u64],
    timer_ids: &[i32],
    sig_query: u64,
) -> Result<Collected, DumpError> {
    // Keep every signal pending (not delivered) while we work.
    for inj in injs.iter() {
        let pid = inj.pid();
        ptrace::set_sigmask(pid, u64::MAX).map_err(|source| DumpError::Ptrace { pid, op: "setsigmask", source })?;
    }
    let result = (|| {
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        // MAP_SHARED anonymous memory never merges with the process's own mappings.
        let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64;
        let pid = injs[0].pid();
        let before_kb = locked_kb(pid);
        let scratch = injs[0].call(libc::SYS_mmap, [0, SCRATCH, prot, flags, u64::MAX, 0])?;
        let future = mlock_future(pid, before_kb, scratch);
        let out = query(injs, scratch, timer_ids, sig_query).map(|c| Collected { mlock_future: future, ..c });
        let unmap = injs[0].call(libc::SYS_munmap, [scratch, SCRATCH, 0, 0, 0, 0]);
        let out = out?;
        unmap?;
        Ok::<_, DumpError>(out)
    })();
    let mut restore_mask = Ok(());
    for (inj, mask) in injs.iter().zip(masks) {
        let pid = inj.pid();
        if let Err(source) = ptrace::set_sigmask(pid, *mask) {
            restore_mask = Err(DumpError::Ptrace { pid, op: "setsigmask", source });
        }
    }
    let out = result?;
    restore_mask?;
    Ok(out)
}

fn thread_query(inj: &mut Injector, scratch: u64) -> Result<ThreadExtra, DumpError> {
    let mut buf = [0u8; 24];
    inj.call(libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0])?;
    inj.read_mem(scratch, &mut buf)?;
    let altstack = pb::Altstack {
        sp: u64_at(&buf, 0),
        flags: (u64_at(&buf, 8) as u32 as i32) & !libc::SS_ONSTACK,
        size: u64_at(&buf, 16),
    };
    const PR_GET_TID_ADDRESS: u64 = 40;
    inj.call(libc::SYS_prctl, [PR_GET_TID_ADDRESS, scratch, 0, 0, 0, 0])?;
    inj.read_mem(scratch, &mut buf[..8])?;
    let timerslack_ns = inj.call(libc::SYS_prctl, [libc::PR_GET_TIMERSLACK as u64, 0, 0, 0, 0, 0])?;
    Ok(ThreadExtra { altstack, clear_child_tid: u64_at(&buf, 0), timerslack_ns })
}

fn query(injs: &mut [Injector], scratch: u64, timer_ids: &[i32], sig_query: u64) -> Result<Collected, DumpError> {
    let mut threads = Vec::with_capacity(injs.len());
    for inj in injs.iter_mut() {
        threads.push(thread_query(inj, scratch)?);
    }
    let inj = &mut injs[0];
    let mut buf = [0u8; 64];
    let mut timers = Vec::with_capacity(timer_ids.len());
    for &id in timer_ids {
        inj.call(libc::SYS_timer_gettime, [id as u64, scratch, 0, 0, 0, 0])?;
        inj.read_mem(scratch, &mut buf[..32])?;
        let ns = |o: usize| u64_at(&buf, o) * 1_000_000_000 + u64_at(&buf, o + 8);
        timers.push((ns(16), ns(0)));
    }
    let mut sigactions = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 || sig_query & (1 << (sig - 1)) == 0 {
            continue;
        }
        inj.call(libc::SYS_rt_sigaction, [sig as u64, 0, scratch, 8, 0, 0])?;
        inj.read_mem(scratch, &mut buf[..32])?;
        let act = pb::SigAction {
            signo: sig,
            handler: u64_at(&buf, 0),
            flags: u64_at(&buf, 8),
            restorer: u64_at(&buf, 16),
            mask: u64_at(&buf, 24),
        };
        if act.handler != 0 || act.flags != 0 || act.mask != 0 {
            sigactions.push(act);
        }
    }
    let mut itimers = Vec::new();
    for which in 0..3u32 {
        inj.call(libc::SYS_getitimer, [which as u64, scratch, 0, 0, 0, 0])?;
        inj.read_mem(scratch, &mut buf[..32])?;
        let us = |o: usize| u64_at(&buf, o) * 1_000_000 + u64_at(&buf, o + 8);
        let t = pb::ITimer { which, interval_us: us(0), value_us: us(16) };
        if t.interval_us != 0 || t.value_us != 0 {
            itimers.push(t);
        }
    }
    let brk = inj.call(libc::SYS_brk, [0; 6])?;
    inj.call(libc::SYS_prctl, [libc::PR_GET_PDEATHSIG as u64, scratch, 0, 0, 0, 0])?;
    inj.read_mem(scratch, &mut buf[..4])?;
    let pdeathsig = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    inj.call(libc::SYS_prctl, [libc::PR_GET_CHILD_SUBREAPER as u64, scratch, 0, 0, 0, 0])?;
    inj.read_mem(scratch, &mut buf[..4])?;
    let child_subreaper = buf[..4] != [0, 0, 0, 0];
    let thp_disabled = inj.call(libc::SYS_prctl, [libc::PR_GET_THP_DISABLE as u64, 0, 0, 0, 0, 0])? != 0;
    let dumpable = inj.call(libc::SYS_prctl, [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0])? as i32;
    Ok(Collected {
        timers,
        sigactions,
        threads,
        itimers,
        brk,
        pdeathsig,
        child_subreaper,
        thp_disabled,
        dumpable,
        securebits: inj.call(libc::SYS_prctl, [libc::PR_GET_SECUREBITS as u64, 0, 0, 0, 0, 0])? as u32,
        mlock_future: 0,
    })
}
