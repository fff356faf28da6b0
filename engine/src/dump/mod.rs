//! `floe dump`: freeze → collect → write.
//!
//! The process is seized with ptrace and interrupted, its state read from
//! ptrace, /proc and a few syscalls injected into it, its present pages
//! copied with process_vm_readv while a second thread checksums and writes
//! them, and the image committed atomically. Until the image is committed
//! nothing is changed for good: every error path puts the registers back and
//! detaches, so the process carries on as before.
pub(crate) mod checks;
mod files;
pub(crate) mod freeze;
pub(crate) mod memory;
mod parasite;
mod settle;

pub use files::{simple_device, LOCK_FLOCK, LOCK_OFD, LOCK_POSIX, MAX_DELETED_FILE};
pub use memory::{
    is_vdso_part, is_zero, ChunkConsumer, PageChunk, Recycler, StreamItem, NONZERO_MARK,
    STREAM_BATCH as STREAM_BATCH_BYTES,
};

use crate::image::{ImageError, ImageWriter};
use crate::inject::{InjectError, Injector};
use crate::procfs;
use crate::sys::ptrace::{self, UserRegs};
use crate::sys::task;
use floe_proto::image as pb;
use freeze::FrozenTree;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to dump and how.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    pub leave_running: bool,
    pub shell_job: bool,
    /// Dump flock/POSIX/OFD locks (without it a held lock is refused).
    pub file_locks: bool,
    /// Allow datagram unix sockets connected to a named peer outside the tree.
    pub ext_unix_sk: bool,
    /// Dump established TCP connections with TCP_REPAIR (without it they are refused).
    pub tcp_established: bool,
    /// The nftables table holding those connections still (recorded in the
    /// manifest so that restore removes it); set by [`dump`].
    pub net_lock: String,
    /// Incremental: the parent image (relative to `dir` unless absolute).
    pub prev_images_dir: Option<PathBuf>,
    /// Keep per-page checksums so that a later dump can build on this one.
    pub track_mem: bool,
    /// Pre-dump: stop the processes only to collect state, copy pages while
    /// they run, never kill them; the image serves only as a parent.
    pub pre_dump: bool,
    /// After writing, drop from the parent images every page this image supersedes.
    pub auto_dedup: bool,
    /// "auto", "uffd", "soft-dirty" or "hash".
    pub dirty_tracker: String,
    pub force: bool,
    /// Live migration's final freeze: per pid, the mappings (with VmFlags)
    /// the last pass read from smaps, when nothing can have changed a flag
    /// since (see `sys::syscall_watch`). A process whose /proc/PID/maps
    /// still shows exactly those mappings takes their flags, sparing the
    /// page-table walk of smaps inside the freeze.
    pub vma_flags_from: Option<std::sync::Arc<std::collections::HashMap<i32, Vec<procfs::MapEntry>>>>,
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
    /// Dirty-tracker work while stopped (uffd: registering and scanning;
    /// soft-dirty: reading and clearing the bits); part of collect_ms.
    pub scan_ms: f64,
    /// Adding the tree's TCP connections to the network lock (part of collect_ms).
    pub lock_ms: f64,
    /// Reading established TCP connections with TCP_REPAIR (part of collect_ms).
    pub tcp_repair_ms: f64,
    /// Removing the network lock after a --leave-running dump (part of release_ms).
    pub unlock_ms: f64,
    /// Resuming the processes, or killing them (and the kernel freeing
    /// their memory) after a dump without --leave-running.
    pub release_ms: f64,
    pub total_ms: f64,
}

/// Outcome of a dump.
#[derive(Debug, serde::Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub processes: usize,
    pub threads: usize,
    pub dir: PathBuf,
    pub vmas: usize,
    pub fds: usize,
    pub page_bytes: u64,
    pub image_bytes: u64,
    pub left_running: bool,
    /// Pages found unchanged in the parent chain or identical to a stored page.
    pub reused_pages: u64,
    /// Bytes freed in parent images by --auto-dedup.
    pub dedup_freed: u64,
    pub dirty_tracker: String,
    pub timings: DumpTimings,
    /// Stream mode (live migration): the manifest, not written anywhere.
    #[serde(skip)]
    pub manifest: Option<pb::Manifest>,
    /// Migration final dump: per process, every page range it has.
    #[serde(skip)]
    pub present: Vec<(i32, Vec<(u64, u64)>)>,
    /// Sockets left in TCP repair mode: dropping this takes them out (the
    /// process runs on); `keep()` leaves them in it (the process dies).
    #[serde(skip)]
    pub repaired: crate::fdkinds::socket::Repaired,
    /// The mappings (with VmFlags) the dump read, per process.
    #[serde(skip)]
    pub maps: Vec<(i32, Vec<procfs::MapEntry>)>,
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
    #[error(transparent)]
    Track(#[from] crate::track::TrackError),
    #[error("network lock: {0}")]
    NetLock(#[from] floe_netfilter::NetfilterError),
}

/// Packets carrying this mark pass floe's network locks.
pub const NET_LOCK_MARK: u32 = 0x0f10_e10c;

/// The established TCP connections of a frozen tree, for the network lock.
pub(crate) fn tree_connections(frozen: &FrozenTree) -> Vec<floe_netfilter::ConnTuple> {
    frozen
        .procs
        .iter()
        .filter(|p| !p.zombie)
        .flat_map(|p| crate::fdkinds::socket::tcp_tuples(p.pid))
        .map(|(l, r)| floe_netfilter::ConnTuple::new(l, r))
        .collect()
}

/// At a freeze, how long the tree first runs to accept the connections
/// waiting in its listeners' accept queues, or to let other passing states
/// go ([`settle`]) (doubled at each further run), and how many runs it
/// gets: 2 + 4 + ... + 64 = 126 ms.
const SETTLE_RUN: Duration = Duration::from_millis(2);
const SETTLE_RUNS: u32 = 6;

/// Closes the TCP listeners of the frozen tree of `root` to new connections
/// ([`crate::fdkinds::socket::ListenerGate`]). Then, while connections wait
/// in their accept queues or the tree holds another state that passes
/// ([`settle::scan`], which finds the listeners too), lets the tree run briefly and freezes it
/// again with `refreeze`. Connections still waiting after the last run are
/// refused here; other passing states are left for the dump to refuse with
/// its own message. Returns the gate (dropped, it opens the listeners
/// again) and how often the tree ran.
pub(crate) fn close_listeners(
    root: i32,
    frozen: &mut FrozenTree,
    refreeze: &mut dyn FnMut() -> Result<FrozenTree, DumpError>,
) -> Result<(crate::fdkinds::socket::ListenerGate, u32), DumpError> {
    let pids = |f: &FrozenTree| -> Vec<i32> { f.procs.iter().filter(|p| !p.zombie).map(|p| p.pid).collect() };
    let found = settle::scan(&pids(frozen));
    let gate = crate::fdkinds::socket::ListenerGate::close(found.listeners).map_err(|e| DumpError::Refused {
        pid: root,
        what: format!("cannot close a TCP listener of the tree to new connections ({e})"),
    })?;
    let waiting_at_freeze = gate.waiting();
    let mut passing = found.passing;
    let mut thaws = 0;
    while gate.waiting() > 0 || !passing.is_empty() {
        if thaws == SETTLE_RUNS {
            if gate.waiting() == 0 {
                break;
            }
            return Err(DumpError::Refused {
                pid: root,
                what: format!(
                    "{} connection(s) still wait in its listeners' accept queues after it ran {} ms (in {thaws} runs) \
                     to accept them; connections not yet accepted cannot be checkpointed",
                    gate.waiting(),
                    SETTLE_RUN.as_millis() * ((1 << thaws) - 1)
                ),
            });
        }
        if thaws == 0 && !passing.is_empty() {
            tracing::info!(states = ?passing, "letting the tree run briefly: states that pass were found at the freeze");
        }
        frozen.resume_in_place()?;
        std::thread::sleep(SETTLE_RUN * (1 << thaws));
        *frozen = refreeze()?;
        // Listeners made meanwhile are not closed; the dump refuses one that has connections waiting.
        passing = settle::scan(&pids(frozen)).passing;
        thaws += 1;
    }
    if gate.closed() > 0 || gate.open > 0 || thaws > 0 {
        tracing::info!(
            closed = gate.closed(),
            waiting_at_freeze,
            thaws,
            left_open = gate.open,
            "listeners closed for the final freeze (thaws: runs to accept waiting connections or let passing \
             states go; left open: listeners with a socket filter of their own)"
        );
    }
    Ok((gate, thaws))
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

/// Dumps the process tree rooted at `opts.pid` into `opts.dir`.
pub fn dump(opts: &DumpOptions) -> Result<DumpReport, DumpError> {
    let t0 = Instant::now();
    let pid = opts.pid;
    let pre = checks::preflight(pid, opts)?;
    let incremental = opts.prev_images_dir.is_some() || opts.track_mem || opts.pre_dump;
    let tracker = if incremental { resolve_tracker(&opts.dirty_tracker)? } else { crate::track::Tracker::Hash };
    // The parent chain is read before anything is stopped.
    let parent = match &opts.prev_images_dir {
        Some(rel) => Some(open_parent(pid, &opts.dir, rel)?),
        None => None,
    };
    // Indexed before the freeze: it grows with the parent chain.
    let index = parent.as_ref().map(|p| p.index(tracker != crate::track::Tracker::Uffd));
    let writer = ImageWriter::create(&opts.dir, opts.force)?;
    // Established connections are held still by a network lock prepared
    // before the freeze (its elements are added inside it).
    let mut lock = None;
    let mut opts = opts.clone();
    if opts.tcp_established && !opts.pre_dump {
        let hex: String = writer.image_id[..6].iter().map(|b| format!("{b:02x}")).collect();
        match floe_netfilter::Lock::prepare(&format!("floe_dump_{hex}"), NET_LOCK_MARK) {
            Ok(l) => {
                opts.net_lock = l.name().to_string();
                lock = Some(l);
            }
            Err(e) => {
                writer.abort();
                return Err(e.into());
            }
        }
    }
    let opts = &opts;
    let mut timings = DumpTimings::default();
    let t_freeze = Instant::now();
    let frozen = FrozenTree::freeze(pid);
    timings.freeze_ms = ms(t_freeze.elapsed());
    let mut frozen = match frozen {
        Ok(f) => f,
        Err(e) => {
            writer.abort();
            return Err(e);
        }
    };
    let mut t_freeze = t_freeze;
    // Listeners take no new connection while the tree is dumped; those
    // already waiting are accepted by the tree itself in short runs.
    let gate = if opts.pre_dump {
        None
    } else {
        match close_listeners(pid, &mut frozen, &mut || FrozenTree::freeze(pid)) {
            Ok((g, thaws)) => {
                if thaws > 0 {
                    t_freeze = Instant::now();
                }
                Some(g)
            }
            Err(e) => {
                writer.abort();
                return Err(e);
            }
        }
    };
    if let Some(l) = &lock {
        let conns = tree_connections(&frozen);
        match l.lock(&conns) {
            Ok(d) => timings.lock_ms = ms(d),
            Err(e) => {
                writer.abort();
                drop(frozen);
                return Err(e.into());
            }
        }
    }
    let base = parent.as_ref().map(Parent::base);
    let mut out = Output::Image(&writer);
    let result = if opts.pre_dump {
        pre_dump_frozen(opts, &mut out, &mut frozen, &mut timings, t0, base.as_ref(), index, tracker)
    } else {
        dump_frozen(opts, &pre, &mut out, &mut frozen, &mut timings, t0, base.as_ref(), index, tracker)
    };
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            writer.abort();
            drop(frozen); // resumes every task
            return Err(e);
        }
    };
    let t_release = Instant::now();
    if frozen.released() {
        // Pre-dump: the processes ran on since the state was collected.
    } else if opts.leave_running || opts.pre_dump {
        // Connections leave repair mode silently and listeners take
        // connections again, then the tree runs on.
        drop(std::mem::take(&mut report.repaired));
        drop(gate);
        frozen.resume()?;
        timings.frozen_ms = ms(t_freeze.elapsed());
        if let Some(l) = lock.take() {
            timings.unlock_ms = ms(l.unlock()?);
        }
    } else {
        // Connections stay in repair mode: they close without FIN or RST,
        // and the lock stays until restore removes it (the peers' packets
        // are dropped meanwhile, not answered with a reset).
        std::mem::take(&mut report.repaired).keep();
        if let Some(l) = lock.take() {
            l.persist();
        }
        // The image is complete: the process is gone from here on, however
        // long the kernel takes to tear its memory down.
        timings.frozen_ms = ms(t_freeze.elapsed());
        frozen.kill()?;
        // Only now: a listener that a process outside the tree shares (socket
        // activation) takes connections there again, and no other is left.
        drop(gate);
    }
    timings.release_ms = ms(t_release.elapsed());
    if opts.auto_dedup && opts.prev_images_dir.is_some() {
        report.dedup_freed = crate::image::dedup::dedup(&opts.dir)?;
    }
    report.timings = timings;
    report.timings.total_ms = ms(t0.elapsed());
    tracing::info!(pid, processes = report.processes, timings = ?report.timings, page_bytes = report.page_bytes, "dump complete");
    Ok(report)
}

/// Pre-dump: the processes are stopped only to read their mappings and
/// scan the dirty tracker; page contents are copied while they run. The
/// image holds the page data and mappings only (it serves as a parent).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pre_dump_frozen(
    opts: &DumpOptions,
    out: &mut Output<'_>,
    frozen: &mut FrozenTree,
    timings: &mut DumpTimings,
    t0: Instant,
    parent: Option<&Base>,
    index: Option<memory::Incremental>,
    tracker: crate::track::Tracker,
) -> Result<DumpReport, DumpError> {
    let root = opts.pid;
    let t_collect = Instant::now();
    let use_uffd = tracker == crate::track::Tracker::Uffd;
    let soft_dirty = tracker == crate::track::Tracker::SoftDirty;
    let mut tracked: Vec<Tracked> = Vec::new();
    // Per live process: (pid, ppid, pages written since the parent (None: unknown), ranges scanned).
    let mut scans: Vec<(i32, i32, Option<Ranges>)> = Vec::new();
    // uffd trackers kept by a holder: scanned after the tree runs again
    // (index in `scans`, tracker, whether it ended at the parent image).
    let mut deferred: Vec<(usize, crate::track::UffdTracker, bool)> = Vec::new();
    for i in 0..frozen.procs.len() {
        let (pid, ppid, zombie) = (frozen.procs[i].pid, frozen.procs[i].ppid, frozen.procs[i].zombie);
        if zombie {
            continue;
        }
        let mut dirty = None;
        if use_uffd {
            let t_scan = Instant::now();
            if let Some(t) = crate::track::holder::fetch(pid)? {
                // Trusted only if the tracker's last scan was for exactly this parent.
                let trusted = parent.is_some_and(|p| epoch::matches(pid, &p.epoch));
                epoch::invalidate(pid);
                deferred.push((scans.len(), t, trusted));
            } else {
                // A new tracker is injected into the process: only while it is stopped.
                let ranges = tracked_ranges(pid)?;
                let (t, written) = track_ranges(frozen, i, pid, &ranges, None)?;
                dirty = written.map(|w| with_unscanned(w, &ranges));
                tracked.push(t);
            }
            timings.scan_ms += ms(t_scan.elapsed());
        } else if soft_dirty {
            let t_scan = Instant::now();
            dirty = soft_dirty_scan(pid, parent.is_some())?;
            timings.scan_ms += ms(t_scan.elapsed());
        }
        scans.push((pid, ppid, dirty));
    }
    frozen.resume_in_place()?;
    timings.collect_ms = ms(t_collect.elapsed());
    timings.frozen_ms = timings.freeze_ms + timings.collect_ms;
    protect_tracked(&mut tracked, &mut timings.scan_ms)?;
    // The scan needs no stop: PAGEMAP_SCAN reports and write-protects each
    // page atomically, so a page written after its turn is reported by the
    // next pass, and one written before it by this one.
    for (j, mut t, trusted) in deferred {
        let t_scan = Instant::now();
        let pid = scans[j].0;
        let Ok(ranges) = tracked_ranges(pid) else { continue }; // it exited meanwhile
        let new = t.untracked(&ranges);
        t.register(&new)?;
        let written = t.dirty(pid, &ranges)?;
        // Anything outside the scanned ranges (mapped after this point) counts as written.
        scans[j].2 = trusted.then(|| with_unscanned(written, &ranges));
        tracked.push(Tracked { pid, tracker: t });
        timings.scan_ms += ms(t_scan.elapsed());
    }

    let t_mem = Instant::now();
    let mut sink = out.sink()?;
    sink.incremental(index.unwrap_or_default());
    sink.tolerate_races(true);
    if tracker != crate::track::Tracker::Hash {
        // Nothing compares pages: a stream checksums whole batches instead.
        sink.skip_page_hashes();
    }
    let mut processes = Vec::with_capacity(scans.len());
    let mut shmem = memory::ShmemCoverage::new();
    let mut layouts = Vec::new();
    for (pid, ppid, dirty) in &scans {
        // Read while running: a process that exited meanwhile is skipped. A
        // migration's target rebuilds mappings from these: they must carry
        // the VM flags (growsdown, advice) exactly, so smaps there.
        let maps = if matches!(out, Output::Stream { .. }) { procfs::maps(*pid, true) } else { pre_dump_maps(*pid) };
        let Ok(maps) = maps else { continue };
        let plans = memory::classify(*pid, &maps, &mut shmem)?;
        layouts.push((*pid, maps));
        let vmas: Vec<pb::Vma> = plans.iter().map(|v| v.pb.clone()).collect();
        sink.announce(memory::StreamItem::Layout(pb::Process {
            pid: *pid,
            ppid: *ppid,
            vmas: vmas.clone(),
            ..Default::default()
        }))?;
        let runs = sink.dump_process(*pid, *ppid, &plans, dirty.as_deref())?;
        processes.push(pb::Process { pid: *pid, ppid: *ppid, vmas, page_runs: runs, ..Default::default() });
    }
    let reused_pages = sink.reused_pages();
    let pages = sink.finish(&[])?;
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
        root_pid: root,
        processes,
        pages_file_size: pages.file_size,
        image_id: out.id().to_vec(),
        parent: parent.and_then(|p| p.link.clone()),
        pre_dump: true,
        dirty_tracker: tracker.name().to_string(),
        ..Default::default()
    };
    let nr_procs = manifest.processes.len();
    let nr_vmas = manifest.processes.iter().map(|p| p.vmas.len()).sum();
    let (manifest_len, manifest) = out.commit(manifest, pages.file)?;
    for t in tracked {
        crate::track::holder::hold(t.pid, t.tracker)?;
        epoch::record(t.pid, &out.id());
    }
    timings.commit_ms = ms(t_commit.elapsed());
    timings.total_ms = ms(t0.elapsed());
    Ok(DumpReport {
        pid: root,
        dir: opts.dir.clone(),
        processes: nr_procs,
        threads: frozen.procs.iter().map(|p| p.threads.len()).sum(),
        vmas: nr_vmas,
        fds: 0,
        page_bytes: pages.page_bytes,
        image_bytes: pages.file_size + manifest_len,
        left_running: true,
        reused_pages,
        dedup_freed: 0,
        dirty_tracker: tracker.name().to_string(),
        timings: timings.clone(),
        manifest,
        present: Vec::new(),
        repaired: Default::default(),
        maps: layouts,
    })
}

/// Soft-dirty: the pages written since the last clear (when there is a
/// parent to compare with), then a new clear. The process is stopped.
fn soft_dirty_scan(pid: i32, has_parent: bool) -> Result<Option<Ranges>, DumpError> {
    let maps = procfs::maps(pid, false).map_err(proc_err(pid, "maps"))?;
    let ranges: Ranges = maps
        .iter()
        .filter(|m| !memory::is_vdso_part(&m.path) && m.path != "[vsyscall]")
        .map(|m| (m.start, m.end))
        .collect();
    // Pages outside these mappings were not there: nothing to compare.
    let written = if has_parent { Some(crate::track::softdirty::dirty(pid, &ranges)?) } else { None };
    crate::track::softdirty::clear(pid)?;
    Ok(written)
}

/// The mappings a pre-dump copies. smaps walks every page table to count
/// pages (about 15 ms per GiB); the VM flags it adds only matter for
/// hugetlb and device mappings, so it is read only when a mapping may be
/// one of those (the final dump always reads it and refuses them).
fn pre_dump_maps(pid: i32) -> std::io::Result<Vec<procfs::MapEntry>> {
    let maps = procfs::maps(pid, false)?;
    let maybe_special = |p: &str| {
        (p.starts_with("/dev/") && !p.starts_with("/dev/shm/") && !p.starts_with("/dev/zero"))
            || p.contains("anon_hugepage")
            || p.starts_with("/SYSV")
    };
    if maps.iter().any(|m| maybe_special(&m.path)) {
        return procfs::maps(pid, true);
    }
    Ok(maps)
}

/// `written` plus every gap between the `scanned` ranges (both sorted).
fn with_unscanned(written: Ranges, scanned: &[(u64, u64)]) -> Ranges {
    let mut all = written;
    let mut cur = 0u64;
    let mut sorted = scanned.to_vec();
    sorted.sort_unstable();
    for (s, e) in sorted {
        if s > cur {
            all.push((cur, s));
        }
        cur = cur.max(e);
    }
    all.push((cur, u64::MAX));
    merge_ranges(all)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn dump_frozen(
    opts: &DumpOptions,
    pre: &checks::Preflight,
    out: &mut Output<'_>,
    frozen: &mut FrozenTree,
    timings: &mut DumpTimings,
    t0: Instant,
    parent: Option<&Base>,
    index: Option<memory::Incremental>,
    tracker: crate::track::Tracker,
) -> Result<DumpReport, DumpError> {
    let root = opts.pid;
    checks::after_freeze(frozen, pre, root)?;
    let t_collect = Instant::now();
    let pids: Vec<i32> = frozen.procs.iter().map(|p| p.pid).collect();
    let mut files = files::FileTable::new(&pids);
    files.ext_unix_sk = opts.ext_unix_sk;
    files.tcp_established = opts.tcp_established;
    // A migration's target gets mapped deleted files before the first pass
    // (the agents send them): not read again inside a freeze.
    files.mapped_deleted_elsewhere = !matches!(out, Output::Image(_));
    // A migration's first pass: the final freeze reads the descriptors again.
    files.passing_ok = matches!(out, Output::Stream { .. });
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut processes = Vec::with_capacity(frozen.procs.len());
    let mut plans = Vec::with_capacity(frozen.procs.len());
    let mut shmem = memory::ShmemCoverage::new();
    // uffd: per process, the pages written since the parent image (None: unknown, compare them all).
    let incremental = parent.is_some() || opts.track_mem || opts.pre_dump;
    let use_uffd = tracker == crate::track::Tracker::Uffd && incremental;
    let mut tracked: Vec<Tracked> = Vec::new();
    let mut dirty: Vec<Option<Vec<(u64, u64)>>> = Vec::new();
    let mut layouts = Vec::new();
    // Collecting injects syscalls into every thread: tracer and tree on one CPU.
    let tids: Vec<i32> = frozen.procs.iter().flat_map(|p| p.threads.iter().map(|t| t.tid)).collect();
    let pin = crate::pin::CpuPin::here(tids);
    for i in 0..frozen.procs.len() {
        let (proc_pb, vmas, maps) = collect_process(opts, pre, frozen, i, &pin, &mut files, &mut blobs, &mut shmem)?;
        if !proc_pb.zombie {
            layouts.push((proc_pb.pid, maps));
        }
        let mut d = None;
        if use_uffd && !proc_pb.zombie {
            let t_scan = Instant::now();
            let (t, written) = track_process(frozen, i, &proc_pb, parent.map(|p| p.epoch.as_slice()))?;
            timings.scan_ms += ms(t_scan.elapsed());
            d = written;
            tracked.push(t);
        } else if tracker == crate::track::Tracker::SoftDirty && !proc_pb.zombie && incremental {
            let t_scan = Instant::now();
            d = soft_dirty_scan(proc_pb.pid, parent.is_some())?;
            timings.scan_ms += ms(t_scan.elapsed());
        }
        dirty.push(d);
        processes.push(proc_pb);
        plans.push(vmas);
    }
    drop(pin);
    files.check_pipes()?;
    files.check_fifos()?;
    timings.collect_ms = ms(t_collect.elapsed());
    timings.tcp_repair_ms = files.repaired.ms;

    let t_mem = Instant::now();
    let mut sink = out.sink()?;
    sink.share_cow(processes.len() > 1);
    if parent.is_some() || opts.track_mem || opts.pre_dump {
        sink.incremental(index.unwrap_or_default());
    }
    if tracker != crate::track::Tracker::Hash {
        sink.skip_page_hashes();
    }
    if parent.is_some_and(|p| p.link.is_none()) {
        // A migration's base: pages "in the parent" are on the target already.
        sink.content_dedup(false);
    }
    let sysv_ids: std::collections::BTreeSet<u64> =
        processes.iter().flat_map(|p| &p.vmas).filter(|v| v.sysv).map(|v| v.shmem_id).collect();
    let sysv_shm = memory::sysv_segments(&sysv_ids)?;
    if matches!(out, Output::Stream { .. }) {
        // Live migration's first pass: the target builds the tree from this.
        let state = pb::Manifest {
            format_version: crate::image::FORMAT_VERSION,
            floe_version: env!("CARGO_PKG_VERSION").to_string(),
            root_pid: root,
            processes: processes.clone(),
            files: files.files.clone(),
            sysv_shm: sysv_shm.clone(),
            image_id: out.id().to_vec(),
            pre_dump: true,
            dirty_tracker: tracker.name().to_string(),
            ..Default::default()
        };
        sink.announce(memory::StreamItem::State(Box::new(state)))?;
    }
    if opts.pre_dump {
        // Everything but the pages is collected: let the processes run
        // (their connections out of repair mode first).
        drop(std::mem::take(&mut files.repaired));
        frozen.resume_in_place()?;
        timings.frozen_ms = ms(t_collect.elapsed()) + timings.freeze_ms;
        sink.tolerate_races(true);
    }
    protect_tracked(&mut tracked, &mut timings.scan_ms)?;
    let mut present = Vec::new();
    let announce_layout = matches!(out, Output::ImageStreamedPages(..));
    for ((p, vmas), d) in processes.iter_mut().zip(&plans).zip(&dirty) {
        if !p.zombie {
            if announce_layout {
                // The target brings the mappings up to date before the pages.
                let layout = pb::Process { pid: p.pid, ppid: p.ppid, vmas: p.vmas.clone(), ..Default::default() };
                sink.announce(memory::StreamItem::Layout(layout))?;
            }
            p.page_runs = sink.dump_process(p.pid, p.ppid, vmas, d.as_deref())?;
            if parent.is_some_and(|p| p.link.is_none()) {
                // Migration: every page the process has, then only those the
                // target lacks (none in the image if they went with the stream).
                present.push((p.pid, page_ranges(&p.page_runs)));
                p.page_runs.retain(|r| r.image == 0 && !out.pages_streamed());
            }
        }
    }
    let reused_pages = sink.reused_pages();
    let pages = out.finish_pages(sink, &blobs)?;
    timings.memory_ms = ms(t_mem.elapsed());

    let t_commit = Instant::now();
    let nr_fds = processes.iter().map(|p| p.fds.len()).sum();
    let nr_vmas = processes.iter().map(|p| p.vmas.len()).sum();
    let nr_threads = processes.iter().map(|p| p.threads.len()).sum();
    let manifest = pb::Manifest {
        format_version: crate::image::FORMAT_VERSION,
        floe_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        root_pid: root,
        processes,
        files: files.files,
        pages_file_size: pages.file_size,
        blobs: pages.blobs,
        image_id: out.id().to_vec(),
        sysv_shm,
        parent: parent.and_then(|p| p.link.clone()),
        pre_dump: opts.pre_dump,
        dirty_tracker: tracker.name().to_string(),
        net_lock: opts.net_lock.clone(),
    };
    let nr_procs = manifest.processes.len();
    let (manifest_len, manifest) = out.commit(manifest, pages.file)?;
    // The image is safe: keep tracking for the next one, or stop.
    for t in tracked {
        if opts.pre_dump || opts.track_mem {
            crate::track::holder::hold(t.pid, t.tracker)?;
            epoch::record(t.pid, &out.id());
        } else {
            drop(t.tracker);
            crate::track::holder::stop(t.pid)?;
        }
    }
    timings.commit_ms = ms(t_commit.elapsed());
    timings.total_ms = ms(t0.elapsed());
    Ok(DumpReport {
        pid: root,
        dir: opts.dir.clone(),
        processes: nr_procs,
        threads: nr_threads,
        vmas: nr_vmas,
        fds: nr_fds,
        page_bytes: pages.page_bytes,
        image_bytes: pages.file_size + manifest_len,
        left_running: opts.leave_running || opts.pre_dump,
        reused_pages,
        dedup_freed: 0,
        dirty_tracker: tracker.name().to_string(),
        timings: timings.clone(),
        manifest,
        present,
        repaired: std::mem::take(&mut files.repaired),
        maps: layouts,
    })
}

/// Sorted, merged address ranges covered by `runs`.
pub(crate) fn page_ranges(runs: &[pb::PageRun]) -> Ranges {
    merge_ranges(runs.iter().map(|r| (r.vaddr, r.vaddr + r.nr_pages * memory::PAGE)).collect())
}

/// `v` sorted, with overlapping and touching ranges merged.
pub(crate) fn merge_ranges(mut v: Ranges) -> Ranges {
    v.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Where a dump's pages and manifest go.
pub(crate) enum Output<'a> {
    /// An image directory.
    Image(&'a ImageWriter),
    /// Live migration: page batches go to a consumer as they are read and
    /// the manifest is returned in the report; nothing is written.
    Stream { id: [u8; 16], consumer: Option<memory::ChunkConsumer> },
    /// Live migration's final freeze: page batches go to a consumer, the
    /// rest (manifest, saved file contents) to an image directory whose
    /// page runs are left empty (the pages went with the stream).
    ImageStreamedPages(&'a ImageWriter, Option<memory::ChunkConsumer>),
}

impl Output<'_> {
    /// The id of the image (or pass) being produced.
    fn id(&self) -> [u8; 16] {
        match self {
            Output::Image(w) | Output::ImageStreamedPages(w, _) => w.image_id,
            Output::Stream { id, .. } => *id,
        }
    }

    /// The pages went to a consumer, not into the image.
    fn pages_streamed(&self) -> bool {
        !matches!(self, Output::Image(_))
    }

    /// Finishes `sink`; an image whose pages were streamed gets a pages file
    /// holding only the saved file contents.
    fn finish_pages(&self, sink: memory::PageSink, blobs: &[Vec<u8>]) -> Result<memory::PagesOut, DumpError> {
        let out = sink.finish(blobs)?;
        let Output::ImageStreamedPages(w, _) = self else { return Ok(out) };
        let file = w.open_pages()?;
        let (blobs, file_size) =
            memory::write_blobs(&file, w.pages_tmp_path(), crate::image::PAGES_DATA_OFFSET, blobs)?;
        Ok(memory::PagesOut { blobs, file_size, page_bytes: out.page_bytes, file: Some(file) })
    }

    fn sink(&mut self) -> Result<memory::PageSink, DumpError> {
        match self {
            Output::Image(w) => memory::PageSink::start(w.open_pages()?, w.pages_tmp_path()),
            Output::Stream { consumer, .. } | Output::ImageStreamedPages(_, consumer) => {
                let c = consumer.take().ok_or_else(|| DumpError::Refused {
                    pid: 0,
                    what: "page stream already used by this pass".into(),
                })?;
                memory::PageSink::start_stream(c)
            }
        }
    }

    /// Writes the image (Image) or hands the manifest back (Stream).
    /// Returns the manifest's encoded length.
    fn commit(
        &self,
        manifest: pb::Manifest,
        pages: Option<std::fs::File>,
    ) -> Result<(u64, Option<pb::Manifest>), DumpError> {
        match (self, pages) {
            (Output::Image(w) | Output::ImageStreamedPages(w, _), Some(f)) => Ok((w.commit(&manifest, f)?, None)),
            (Output::Image(_) | Output::ImageStreamedPages(..), None) => {
                Err(DumpError::Refused { pid: manifest.root_pid, what: "pages file missing at commit".into() })
            }
            (Output::Stream { .. }, _) => {
                use floe_proto::Message;
                Ok((manifest.encoded_len() as u64, Some(manifest)))
            }
        }
    }
}

/// What an incremental dump builds on: the parent image (`link`), or for
/// a live migration's passes nothing on disk (`link` None: the "parent" is
/// what the target already has). `epoch` is the id the dirty tracker's last
/// scan must have ended at to be trusted.
pub(crate) struct Base {
    pub link: Option<pb::ParentRef>,
    pub epoch: Vec<u8>,
}

/// The parent chain of an incremental dump.
struct Parent {
    link: pb::ParentRef,
    chain: crate::image::ImageChain,
}

impl Parent {
    fn base(&self) -> Base {
        Base { link: Some(self.link.clone()), epoch: self.link.image_id.clone() }
    }

    /// Where each page of the chain is, by address and by content.
    /// `by_addr`: also index every page by address (the hash tracker
    /// compares each page; the uffd tracker takes clean spans in bulk).
    fn index(&self, by_addr: bool) -> memory::Incremental {
        let mut inc = memory::Incremental::default();
        let Some(newest) = self.chain.images.first() else { return inc };
        let pages: u64 = newest.manifest.processes.iter().flat_map(|p| &p.page_runs).map(|r| r.nr_pages).sum();
        // Sized once: growing a map of a million entries rehashes it many times.
        let pages = usize::try_from(pages).unwrap_or(0).min(1 << 26);
        inc.by_hash.reserve(pages);
        if by_addr {
            inc.by_addr.reserve(pages);
        }
        // Only the newest parent: its runs describe every page it had, and
        // a dedup of its chain never removes what it points at (older
        // ancestors' other pages may be gone).
        for p in &newest.manifest.processes {
            let mut runs: Vec<pb::PageRun> = p
                .page_runs
                .iter()
                .map(|r| pb::PageRun { image: r.image + 1, page_hashes: Vec::new(), ..r.clone() })
                .collect();
            runs.sort_unstable_by_key(|r| r.vaddr);
            inc.runs.insert(p.pid, runs);
            for r in &p.page_runs {
                // open_parent checked that every run has them.
                let Some(hashes) = self.chain.run_page_hashes(0, r) else { continue };
                for (k, h) in hashes.chunks_exact(16).enumerate() {
                    let mut hash = [0u8; 16];
                    hash.copy_from_slice(h);
                    let loc =
                        memory::PageLoc { image: 1 + r.image, offset: r.file_offset + k as u64 * memory::PAGE, hash };
                    if by_addr {
                        inc.by_addr.entry((p.pid, r.vaddr + k as u64 * memory::PAGE)).or_insert(loc);
                    }
                    inc.by_hash.entry(hash).or_insert(loc);
                }
            }
        }
        inc
    }
}

fn open_parent(pid: i32, dir: &std::path::Path, rel: &std::path::Path) -> Result<Parent, DumpError> {
    // A relative parent is relative to the new image's directory, which must exist to resolve "..".
    std::fs::create_dir_all(dir).map_err(|source| DumpError::Io {
        pid,
        what: format!("cannot create image directory {}", dir.display()),
        source,
    })?;
    let pdir = if rel.is_absolute() { rel.to_path_buf() } else { dir.join(rel) };
    if let Ok(why) = std::fs::read_to_string(pdir.join(crate::image::dedup::MARKER)) {
        return Err(DumpError::Refused {
            pid,
            what: format!("parent image {} was deduplicated: {}", pdir.display(), why.trim()),
        });
    }
    let chain = crate::image::ImageChain::open(&pdir)?;
    {
        let img = chain.newest();
        let hashed =
            img.manifest.processes.iter().flat_map(|p| &p.page_runs).all(|r| chain.run_page_hashes(0, r).is_some());
        if !hashed {
            return Err(DumpError::Refused {
                pid,
                what: format!(
                    "parent image {} has no per-page checksums; take parents with `floe pre-dump` or `floe dump --track-mem`",
                    img.dir.display()
                ),
            });
        }
    }
    let link =
        pb::ParentRef { dir: rel.to_string_lossy().into_owned(), image_id: chain.newest().manifest.image_id.clone() };
    Ok(Parent { link, chain })
}

/// The dirty tracker for this dump: checked against what the kernel offers.
pub(crate) fn resolve_tracker(name: &str) -> Result<crate::track::Tracker, DumpError> {
    Ok(crate::track::Tracker::resolve(if name.is_empty() { "auto" } else { name })?)
}

/// Sorted, disjoint address ranges.
type Ranges = Vec<(u64, u64)>;

/// Dirty tracking state of one process during an incremental dump.
struct Tracked {
    pid: i32,
    tracker: crate::track::UffdTracker,
}

/// Write-protects what the new trackers in `tracked` registered, before any
/// page is read: out of the freeze (about 8 ms per GiB), see
/// [`crate::track::UffdTracker::protect`]. Adds its time to `scan_ms`.
fn protect_tracked(tracked: &mut [Tracked], scan_ms: &mut f64) -> Result<(), DumpError> {
    let t = Instant::now();
    for t in tracked.iter_mut() {
        t.tracker.protect(t.pid)?;
    }
    *scan_ms += ms(t.elapsed());
    Ok(())
}

/// Takes up or starts uffd tracking of process `idx` (stopped): returns the
/// tracker and the pages written since the parent image, if that is known.
fn track_process(
    frozen: &mut FrozenTree,
    idx: usize,
    p: &pb::Process,
    parent_id: Option<&[u8]>,
) -> Result<(Tracked, Option<Ranges>), DumpError> {
    let ranges: Ranges = p
        .vmas
        .iter()
        .filter(|v| v.prot != 0 && v.kind != pb::VmaKind::FileShared as i32)
        .map(|v| (v.start, v.end))
        .collect();
    track_ranges(frozen, idx, p.pid, &ranges, parent_id)
}

/// Which image a kept uffd tracker last ended at: its answer ("written since
/// the previous scan") is only about the parent if the parent is that image.
/// Invalidated before every scan, so a dump that fails after scanning leaves
/// no trusted state behind.
mod epoch {
    use std::path::PathBuf;

    fn path(pid: i32) -> PathBuf {
        PathBuf::from(format!("/run/floe/track-{pid}.last"))
    }

    fn hex(id: &[u8]) -> String {
        id.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn matches(pid: i32, image_id: &[u8]) -> bool {
        std::fs::read_to_string(path(pid)).map(|s| s.trim() == hex(image_id)).unwrap_or(false)
    }

    pub fn invalidate(pid: i32) {
        let _ = std::fs::remove_file(path(pid));
    }

    pub fn record(pid: i32, image_id: &[u8]) {
        let p = path(pid);
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Err(e) = std::fs::write(&p, hex(image_id)) {
            tracing::warn!(pid, error = %e, "cannot record the tracker's image; the next dump compares every page");
        }
    }
}

/// The ranges of `pid` a uffd tracker covers: every accessible mapping but
/// the vdso block and shared file mappings.
fn tracked_ranges(pid: i32) -> Result<Ranges, DumpError> {
    let maps = procfs::maps(pid, false).map_err(proc_err(pid, "maps"))?;
    Ok(maps
        .iter()
        .filter(|m| {
            m.prot() != 0
                && !memory::is_vdso_part(&m.path)
                && m.path != "[vsyscall]"
                && !(m.shared && m.path.starts_with('/') && !m.path.ends_with(" (deleted)"))
        })
        .map(|m| (m.start, m.end))
        .collect())
}

/// Takes up (from its holder) or starts uffd tracking of `ranges` of process
/// `idx` (stopped) and returns the pages written since, when known.
fn track_ranges(
    frozen: &mut FrozenTree,
    idx: usize,
    pid: i32,
    ranges: &[(u64, u64)],
    parent_id: Option<&[u8]>,
) -> Result<(Tracked, Option<Ranges>), DumpError> {
    if let Some(mut t) = crate::track::holder::fetch(pid)? {
        // Trusted only if the tracker's last scan was for exactly this parent.
        let trusted = parent_id.is_some_and(|id| epoch::matches(pid, id));
        epoch::invalidate(pid);
        let new = t.untracked(ranges);
        t.register(&new)?;
        let written = t.dirty(pid, ranges)?;
        return Ok((Tracked { pid, tracker: t }, trusted.then_some(written)));
    }
    epoch::invalidate(pid);
    // No tracker kept for it: start one now; this dump compares every page.
    let fp = &frozen.procs[idx];
    let leader = fp.threads.first().ok_or_else(|| DumpError::Refused { pid, what: "no main thread".into() })?;
    let maps = procfs::maps(pid, false).map_err(proc_err(pid, "maps"))?;
    let vdso = memory::vdso_block(pid, &maps)?;
    let gadget = Injector::find_gadget(pid, vdso.vdso_start, vdso.vdso_end)?;
    let mut inj = Injector::new(pid, leader.regs, gadget);
    frozen.mark_injected(pid);
    // Registered only: the caller write-protects (Tracked::protect) once the tree runs again.
    let t = crate::track::uffd_start_unprotected(pid, &mut inj, ranges)?;
    Ok((Tracked { pid, tracker: t }, None))
}

/// Everything about one process except its page data.
#[allow(clippy::too_many_arguments)]
fn collect_process(
    opts: &DumpOptions,
    pre: &checks::Preflight,
    frozen: &mut FrozenTree,
    idx: usize,
    pin: &crate::pin::CpuPin,
    files: &mut files::FileTable,
    blobs: &mut Vec<Vec<u8>>,
    shmem: &mut memory::ShmemCoverage,
) -> Result<(pb::Process, Vec<memory::VmaPlan>, Vec<procfs::MapEntry>), DumpError> {
    let fp = &frozen.procs[idx];
    let pid = fp.pid;
    let ppid = fp.ppid;
    let sf = procfs::stat_fields(pid).map_err(proc_err(pid, "stat"))?;
    // Unknown (no sysfs): every thread's CPU set is recorded as it is.
    let online = procfs::online_cpus().ok();
    if fp.zombie {
        let p = pb::Process {
            pid,
            ppid,
            pgid: procfs::stat_field(&sf, 5) as i32,
            sid: procfs::stat_field(&sf, 6) as i32,
            zombie: true,
            exit_status: procfs::stat_field(&sf, 52) as i32,
            comm: std::fs::read_to_string(procfs::path(pid, "comm"))
                .unwrap_or_default()
                .trim_end_matches('\n')
                .to_string(),
            ..Default::default()
        };
        return Ok((p, Vec::new(), Vec::new()));
    }
    let tids: Vec<i32> = fp.threads.iter().map(|t| t.tid).collect();
    let regs: Vec<UserRegs> = fp.threads.iter().map(|t| t.regs).collect();
    let mut masks = Vec::with_capacity(tids.len());
    for &tid in &tids {
        masks.push(ptrace::get_sigmask(tid).map_err(|source| DumpError::Ptrace {
            pid: tid,
            op: "getsigmask",
            source,
        })?);
    }
    let earlier = opts.vma_flags_from.as_ref().and_then(|m| m.get(&pid));
    let reused = match earlier {
        Some(e) => procfs::maps_with_flags_of(pid, e).map_err(proc_err(pid, "maps"))?,
        None => None,
    };
    tracing::debug!(pid, flags_reused = reused.is_some(), "mappings read");
    let maps = match reused {
        Some(m) => m,
        None => procfs::maps(pid, true).map_err(proc_err(pid, "smaps"))?,
    };
    let vdso = memory::vdso_block(pid, &maps)?;
    let gadget = Injector::find_gadget(pid, vdso.vdso_start, vdso.vdso_end)?;
    let mut injs: Vec<Injector> = tids.iter().zip(&regs).map(|(t, r)| Injector::new(*t, *r, gadget)).collect();
    for &tid in &tids {
        frozen.mark_injected(tid);
    }
    let mut timers = posix_timers(pid)?;
    let ids: Vec<i32> = timers.iter().map(|t| t.id).collect();
    // Caught and ignored signals, plus SIGCHLD whose flags matter even with SIG_DFL.
    let st = procfs::status(pid).map_err(proc_err(pid, "status"))?;
    let sig_query = st.sig_cgt | st.sig_ign | (1 << (libc::SIGCHLD - 1));
    let par = parasite::collect(&mut injs, &masks, &ids, sig_query)?;
    for (t, (value, interval)) in timers.iter_mut().zip(&par.timers) {
        t.value_ns = *value;
        t.interval_ns = *interval;
    }
    // Only SECBIT_KEEP_CAPS (bit 4) is restored; anything else would silently differ.
    if par.securebits & !(1 << 4) != 0 {
        return Err(DumpError::Refused {
            pid,
            what: format!("it sets securebits {:#x}, which this version cannot restore", par.securebits),
        });
    }
    let mut threads = Vec::with_capacity(tids.len());
    // Only a multi-threaded process can have threads with credentials of their own.
    let main = if tids.len() > 1 { Some(procfs::status(pid).map_err(proc_err(pid, "status"))?) } else { None };
    for (i, &tid) in tids.iter().enumerate() {
        let pt = |op: &'static str| move |source| DumpError::Ptrace { pid: tid, op, source };
        let xstate = ptrace::get_xstate(tid).map_err(pt("getregset xstate"))?;
        let rseq = ptrace::get_rseq(tid).map_err(pt("get rseq configuration"))?;
        let (robust, robust_len) = task::get_robust_list(tid).map_err(|source| DumpError::Io {
            pid: tid,
            what: "get_robust_list failed".into(),
            source,
        })?;
        // Signals are read after injection: anything that arrived meanwhile stayed pending.
        let pending = ptrace::peek_siginfo(tid, false).map_err(pt("peeksiginfo"))?;
        let comm = std::fs::read_to_string(procfs::path(pid, &format!("task/{tid}/comm")))
            .map_err(proc_err(pid, "comm"))?
            .trim_end_matches('\n')
            .to_string();
        let extra = &par.threads[i];
        let seccomp = ptrace::seccomp_filters(tid)
            .map_err(pt("seccomp get filter"))?
            .into_iter()
            .map(|(insns, flags)| pb::SeccompFilter { insns, flags })
            .collect::<Vec<_>>();
        // Its own CPU set, not the one it is pinned to while collecting.
        let sched = thread_sched(pid, tid, online.as_deref(), pin.original(tid))?;
        const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 8;
        if seccomp.iter().any(|f| f.flags & SECCOMP_FILTER_FLAG_NEW_LISTENER != 0) {
            return Err(DumpError::Refused {
                pid,
                what: format!(
                    "thread {tid} has a seccomp filter with a user-notification listener, which cannot be restored"
                ),
            });
        }
        let creds = thread_creds(pid, tid, main.as_ref())?;
        threads.push(pb::Thread {
            creds,
            timerslack_ns: extra.timerslack_ns,
            tid,
            gpregs: regs_to_bytes(&regs[i]),
            xstate,
            sigmask: masks[i],
            pending: pending.into_iter().map(|s| pb::PendingSignal { siginfo: s.to_vec() }).collect(),
            altstack: Some(extra.altstack),
            rseq: (rseq.ptr != 0).then_some(pb::Rseq { ptr: rseq.ptr, len: rseq.len, sig: rseq.sig }),
            robust_list: robust,
            robust_list_len: robust_len,
            clear_child_tid: extra.clear_child_tid,
            comm,
            seccomp,
            cpu_affinity: sched.cpu_affinity,
            sched_policy: sched.sched_policy,
            sched_priority: sched.sched_priority,
            nice: sched.nice,
            ioprio: sched.ioprio,
        });
    }
    let shared_pending = ptrace::peek_siginfo(pid, true).map_err(|source| DumpError::Ptrace {
        pid,
        op: "peeksiginfo shared",
        source,
    })?;
    let mut vmas = memory::classify(pid, &maps, shmem)?;
    let fds = files.collect(pid, opts.shell_job, opts.file_locks, blobs)?;
    let elsewhere = files.mapped_deleted_elsewhere;
    for v in vmas.iter_mut().filter(|v| v.pb.deleted && !elsewhere) {
        let mf = procfs::path(pid, &format!("map_files/{:x}-{:x}", v.pb.start, v.pb.end));
        let saved = std::fs::metadata(&mf).and_then(|meta| files.save_deleted(&mf, &meta, blobs));
        v.pb.deleted_blob = saved.map_err(|source| DumpError::Io {
            pid,
            what: format!("cannot save deleted file {} mapped at {:#x}", v.pb.path, v.pb.start),
            source,
        })?;
    }
    let mut p = build_process(pid, pre, opts, &sf, &par)?;
    if p.exe_path.ends_with(" (deleted)") {
        let exe = procfs::path(pid, "exe");
        let saved = std::fs::metadata(&exe).and_then(|meta| match meta.nlink() {
            0 if files.mapped_deleted_elsewhere => Ok(Some(-1)),
            0 => files.save_deleted(&exe, &meta, blobs).map(Some),
            _ => Ok(None),
        });
        let blob = saved.map_err(|source| DumpError::Io {
            pid,
            what: format!("cannot save its deleted executable {}", p.exe_path),
            source,
        })?;
        let Some(blob) = blob else {
            return Err(DumpError::Refused {
                pid,
                what: format!(
                    "its executable {} was unlinked from that path but other links to it remain; floe cannot tell \
                     which path to restore it at",
                    p.exe_path
                ),
            });
        };
        p.exe_path = p.exe_path.trim_end_matches(" (deleted)").to_string();
        p.exe_blob = Some(blob);
    }
    p.ppid = ppid;
    p.threads = threads;
    p.shared_pending = shared_pending.into_iter().map(|s| pb::PendingSignal { siginfo: s.to_vec() }).collect();
    p.vmas = vmas.iter().map(|v| v.pb.clone()).collect();
    p.fds = fds;
    p.vdso = Some(vdso.pb);
    p.posix_timers = timers;
    Ok((p, vmas, maps))
}

/// A thread's own credentials, when they differ from those of the
/// process's main thread (`main`, None for the main thread itself).
fn thread_creds(pid: i32, tid: i32, main: Option<&procfs::Status>) -> Result<Option<pb::ThreadCreds>, DumpError> {
    let Some(m) = main.filter(|_| tid != pid) else { return Ok(None) };
    let t = procfs::task_status(pid, tid).map_err(proc_err(pid, "task status"))?;
    let caps = |s: &procfs::Status| (s.cap_inh, s.cap_prm, s.cap_eff, s.cap_bnd, s.cap_amb);
    if t.uids == m.uids && t.gids == m.gids && t.groups == m.groups && caps(&t) == caps(m) {
        return Ok(None);
    }
    Ok(Some(pb::ThreadCreds {
        uid: t.uids[0],
        euid: t.uids[1],
        suid: t.uids[2],
        fsuid: t.uids[3],
        gid: t.gids[0],
        egid: t.gids[1],
        sgid: t.gids[2],
        fsgid: t.gids[3],
        groups: t.groups,
        cap_inh: t.cap_inh,
        cap_prm: t.cap_prm,
        cap_eff: t.cap_eff,
        cap_bnd: t.cap_bnd,
        cap_amb: t.cap_amb,
    }))
}

/// A thread's CPU affinity (`cpus`, or read now; empty if it may use every
/// CPU in `online`), scheduling policy and priority, nice value and I/O
/// priority (only those fields set).
fn thread_sched(
    pid: i32,
    tid: i32,
    online: Option<&[usize]>,
    cpus: Option<task::CpuSet>,
) -> Result<pb::Thread, DumpError> {
    let sys = |what: &'static str| move |source| DumpError::Io { pid, what: format!("{what} of thread {tid}"), source };
    let cpus = match cpus {
        Some(c) => c.cpus(),
        None => task::get_affinity(tid).map_err(sys("sched_getaffinity"))?.cpus(),
    };
    let cpu_affinity = if online.is_some_and(|o| o.iter().all(|c| cpus.contains(c))) {
        Vec::new()
    } else {
        let mut bits = vec![0u8; cpus.iter().max().map_or(0, |m| m / 8 + 1)];
        for c in cpus {
            bits[c / 8] |= 1 << (c % 8);
        }
        bits
    };
    let (policy, priority) = task::get_scheduler(tid).map_err(sys("sched_getscheduler"))?;
    if policy & !task::SCHED_RESET_ON_FORK == task::SCHED_DEADLINE {
        return Err(DumpError::Refused {
            pid,
            what: format!("thread {tid} runs under SCHED_DEADLINE, which this version cannot restore"),
        });
    }
    let sf = procfs::task_stat_fields(pid, tid).map_err(proc_err(pid, "task stat"))?;
    let ioprio = task::get_ioprio(tid).map_err(sys("ioprio_get"))?;
    Ok(pb::Thread {
        ioprio,
        cpu_affinity,
        sched_policy: policy,
        sched_priority: priority,
        nice: procfs::stat_field(&sf, 19) as i64 as i32,
        ..Default::default()
    })
}

/// POSIX timers listed in /proc/PID/timers (values are filled in by the parasite).
fn posix_timers(pid: i32) -> Result<Vec<pb::PosixTimer>, DumpError> {
    let text = std::fs::read_to_string(procfs::path(pid, "timers")).map_err(proc_err(pid, "timers"))?;
    let mut out: Vec<pb::PosixTimer> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        if k == "ID" {
            out.push(pb::PosixTimer { id: v.parse().unwrap_or(-1), ..Default::default() });
            continue;
        }
        let Some(t) = out.last_mut() else { continue };
        match k {
            "signal" => {
                let (sig, val) = v.split_once('/').unwrap_or((v, "0"));
                t.signo = sig.parse().unwrap_or(0);
                t.sival = u64::from_str_radix(val, 16).unwrap_or(0);
            }
            "notify" => {
                let (how, target) = v.split_once('/').unwrap_or((v, ""));
                t.notify = match how {
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD_ID,
                    _ => libc::SIGEV_SIGNAL,
                };
                t.notify_tid = target.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            "ClockID" => t.clockid = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    if let Some(bad) = out.iter().find(|t| t.id < 0) {
        return Err(DumpError::Refused { pid, what: format!("cannot parse POSIX timer entry {}", bad.id) });
    }
    Ok(out)
}

fn build_process(
    pid: i32,
    pre: &checks::Preflight,
    opts: &DumpOptions,
    sf: &[String],
    par: &parasite::Collected,
) -> Result<pb::Process, DumpError> {
    let st = procfs::status(pid).map_err(proc_err(pid, "status"))?;
    let auxv = std::fs::read(procfs::path(pid, "auxv")).map_err(proc_err(pid, "auxv"))?;
    let exe_path = procfs::readlink(pid, "exe").map_err(proc_err(pid, "exe"))?;
    // A deleted executable keeps its suffix here: collect_process saves it.
    let exe_meta = std::fs::metadata(procfs::path(pid, "exe")).map_err(proc_err(pid, "exe"))?;
    let mut cwd = procfs::readlink(pid, "cwd").map_err(proc_err(pid, "cwd"))?;
    // A removed directory is empty and has no name: restore makes one like it.
    let cwd_deleted = cwd.ends_with(" (deleted)");
    if cwd_deleted {
        cwd.truncate(cwd.len() - " (deleted)".len());
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
    let oom_score_adj = std::fs::read_to_string(procfs::path(pid, "oom_score_adj"))
        .map_err(proc_err(pid, "oom_score_adj"))?
        .trim()
        .parse()
        .unwrap_or(0);
    let timerslack_ns = std::fs::read_to_string(procfs::path(pid, "timerslack_ns"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(50_000);
    // /proc/PID/limits is readable where prlimit64 on another user's
    // process needs CAP_SYS_RESOURCE.
    let rlimits: Vec<pb::Rlimit> = procfs::limits(pid)
        .map_err(proc_err(pid, "limits"))?
        .into_iter()
        .enumerate()
        .map(|(res, (cur, max))| pb::Rlimit { resource: res as u32, cur, max })
        .collect();
    let f = |n| procfs::stat_field(sf, n);
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
    let (pgid, sid) = if pid == opts.pid { (pre.pgid, pre.sid) } else { (f(5) as i32, f(6) as i32) };
    Ok(pb::Process {
        pid,
        ppid: st.ppid,
        pgid,
        sid,
        comm,
        cmdline: procfs::cmdline(pid).unwrap_or_default(),
        exe_path,
        exe_id: Some(files::file_id(&exe_meta)),
        cwd,
        cwd_deleted,
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
        sigactions: par.sigactions.clone(),
        rlimits,
        itimers: par.itimers.clone(),
        pdeathsig: par.pdeathsig,
        child_subreaper: par.child_subreaper,
        thp_disabled: par.thp_disabled,
        mlock_future: par.mlock_future,
        ksm_merge_any: std::fs::read_to_string(procfs::path(pid, "ksm_stat"))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == "ksm_merge_any: yes")),
        dumpable: par.dumpable,
        timerslack_ns,
        oom_score_adj,
        umask: st.umask as u64,
        shell_job: opts.shell_job,
        cap_eff: st.cap_eff,
        cap_prm: st.cap_prm,
        cap_inh: st.cap_inh,
        cap_bnd: st.cap_bnd,
        no_new_privs: st.no_new_privs,
        cap_amb: st.cap_amb,
        nice: f(19) as i64 as i32,
        securebits: par.securebits,
        ..Default::default()
    })
}
