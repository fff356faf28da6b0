//! The source side of a live migration: pre-copy passes and the final freeze.
use crate::dump::checks;
use crate::dump::freeze::FrozenTree;
use crate::dump::memory::{ChunkConsumer, Incremental, PageLoc, PAGE};
use crate::dump::{dump_frozen, pre_dump_frozen, Base, DumpError, DumpOptions, DumpReport, DumpTimings, Output};
use crate::fdkinds::socket::ListenerGate;
use crate::image::ImageWriter;
use crate::track::Tracker;
use floe_proto::image as pb;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// What to migrate and how.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    pub pid: i32,
    /// "auto", "uffd", "soft-dirty" or "hash".
    pub dirty_tracker: String,
    pub file_locks: bool,
    pub ext_unix_sk: bool,
    /// Migrate established TCP connections (TCP_REPAIR under a network lock).
    pub tcp_established: bool,
}

/// One pre-copy pass.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PassReport {
    pub pass: u32,
    /// Time the tree was stopped.
    pub frozen_ms: f64,
    /// Dirty-tracker scan (part of frozen_ms).
    pub scan_ms: f64,
    /// Whole pass, page copy included.
    pub total_ms: f64,
    /// Pages handed to the consumer.
    pub pages_sent: u64,
    /// Pages the target already had.
    pub pages_reused: u64,
}

/// Per process: which pages the target holds, and (hash tracker) their hashes.
#[derive(Default)]
struct Known {
    /// Sorted, disjoint.
    ranges: Vec<(u64, u64)>,
    hashes: HashMap<u64, [u8; 16]>,
}

/// A process tree being pre-copied. Dropping it stops dirty tracking and
/// resumes the tree if it is frozen.
pub struct Source {
    opts: DumpOptions,
    pre: checks::Preflight,
    tracker: Tracker,
    /// Id of the last pass (the tracker's scans are trusted only from it).
    epoch: Option<[u8; 16]>,
    known: HashMap<i32, Known>,
    /// Pids of the tree at pass 0, in order.
    pids: Vec<i32>,
    frozen: Option<FrozenTree>,
    /// A SIGSTOP is queued to the frozen tree (see [`Source::park`]).
    parked: bool,
    /// The final freeze's network lock and the connections it left in
    /// repair mode: both end with the tree (kill) or before it runs again.
    lock: Option<floe_netfilter::Lock>,
    repaired: crate::fdkinds::socket::Repaired,
    /// The final freeze's closed listeners (see [`ListenerGate`]).
    gate: Option<ListenerGate>,
    /// Counts the tree's syscalls that can change a mapping's VmFlags
    /// without changing /proc/PID/maps (None: eBPF unavailable).
    watch: Option<crate::sys::syscall_watch::SyscallWatch>,
    /// The watch could not start (no eBPF): not tried again.
    no_watch: bool,
    /// The mappings, with VmFlags, the last pass read (after its stop).
    last_maps: std::sync::Arc<HashMap<i32, Vec<crate::procfs::MapEntry>>>,
    passes: u32,
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(b) = std::fs::read("/proc/sys/kernel/random/uuid") {
        let h = blake3::hash(&b);
        id.copy_from_slice(&h.as_bytes()[..16]);
    }
    id
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn ms_of(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Syscalls (x86-64) after which a mapping's VmFlags may differ while
/// /proc/PID/maps shows it unchanged: madvise, mlock, munlock, mlockall,
/// munlockall, prctl (PR_SET_MEMORY_MERGE, PR_SET_THP_DISABLE),
/// mlock2, process_madvise and mseal.
const FLAG_SYSCALLS: [u32; 9] = [28, 149, 150, 151, 152, 157, 325, 440, 462];

impl Source {
    /// Checks that the tree can be migrated at all (nothing is stopped).
    pub fn new(o: &SourceOptions) -> Result<Self, DumpError> {
        let opts = DumpOptions {
            pid: o.pid,
            leave_running: true,
            file_locks: o.file_locks,
            ext_unix_sk: o.ext_unix_sk,
            tcp_established: o.tcp_established,
            dirty_tracker: if o.dirty_tracker.is_empty() { "auto".into() } else { o.dirty_tracker.clone() },
            ..Default::default()
        };
        let pre = checks::preflight(o.pid, &opts)?;
        let tracker = crate::dump::resolve_tracker(&opts.dirty_tracker)?;
        Ok(Self {
            opts,
            pre,
            tracker,
            epoch: None,
            known: HashMap::new(),
            pids: Vec::new(),
            frozen: None,
            parked: false,
            lock: None,
            gate: None,
            repaired: Default::default(),
            watch: None,
            no_watch: false,
            last_maps: Default::default(),
            passes: 0,
        })
    }

    /// The dirty tracker in use.
    pub fn tracker(&self) -> &'static str {
        self.tracker.name()
    }

    /// Bytes of page data the target holds.
    pub fn known_bytes(&self) -> u64 {
        self.known.values().flat_map(|k| &k.ranges).map(|(s, e)| e - s).sum()
    }

    /// Freezes the tree, checking it is the same set of processes as at pass 0.
    fn freeze(&mut self) -> Result<FrozenTree, DumpError> {
        let frozen = FrozenTree::freeze(self.opts.pid)?;
        let pids: Vec<i32> = frozen.procs.iter().map(|p| p.pid).collect();
        if self.passes > 0 && pids != self.pids {
            let gone: Vec<i32> = self.pids.iter().filter(|p| !pids.contains(p)).copied().collect();
            let new: Vec<i32> = pids.iter().filter(|p| !self.pids.contains(p)).copied().collect();
            return Err(DumpError::Refused {
                pid: self.opts.pid,
                what: format!(
                    "the process tree changed during pre-copy (exited: {gone:?}, new: {new:?}); migrate it again"
                ),
            });
        }
        self.pids = pids;
        Ok(frozen)
    }

    /// What the target holds, as the "parent" of the next pass.
    fn base_and_index(&self) -> (Option<Base>, Incremental) {
        let mut inc = Incremental::default();
        let Some(epoch) = self.epoch else { return (None, inc) };
        for (pid, k) in &self.known {
            let runs = k
                .ranges
                .iter()
                .flat_map(|&(s, e)| {
                    // Runs of at most 512 pages, as images have.
                    (s..e).step_by(512 * PAGE as usize).map(move |a| (a, ((e - a) / PAGE).min(512)))
                })
                .map(|(a, n)| pb::PageRun { vaddr: a, nr_pages: n, image: 1, ..Default::default() })
                .collect();
            inc.runs.insert(*pid, runs);
            for (va, h) in &k.hashes {
                inc.by_addr.insert((*pid, *va), PageLoc { image: 1, offset: 0, hash: *h });
            }
        }
        (Some(Base { link: None, epoch: epoch.to_vec() }), inc)
    }

    /// With the tree stopped at a pass: counts from now on the syscalls that
    /// can change VmFlags behind /proc/PID/maps (started at the first pass,
    /// reset at every later one). Anything in flight when the tree stopped
    /// has finished or will start again, so a count of zero at the final
    /// freeze means the flags the pass reads after this point still hold.
    fn watch_flag_syscalls(&mut self) {
        match &self.watch {
            Some(w) => {
                for &pid in &self.pids {
                    if let Err(e) = w.reset(pid) {
                        tracing::debug!(pid, error = %e, "cannot reset the syscall watch");
                        self.watch = None;
                        return;
                    }
                }
            }
            None if self.passes == 0 && !self.no_watch => {
                match crate::sys::syscall_watch::SyscallWatch::start(&self.pids, &FLAG_SYSCALLS) {
                    Ok(w) => self.watch = Some(w),
                    Err(e) => {
                        tracing::info!(error = %e, "no eBPF syscall watch: the final freeze reads smaps (about 15 ms per GiB)")
                    }
                }
            }
            None => {}
        }
    }

    /// Before the first pass's freeze: starts the syscall watch and reads the
    /// tree's mappings with their VmFlags (smaps walks every page table:
    /// ~15 ms per GiB, which would otherwise stop the tree that long). A brief
    /// stop between the two lets every syscall that began before the watch
    /// finish, so one that changes a flag is either in what smaps shows or
    /// counted. None without eBPF (the freeze reads smaps itself).
    fn flags_before_first_freeze(&mut self) -> Option<std::sync::Arc<HashMap<i32, Vec<crate::procfs::MapEntry>>>> {
        let pids: Vec<i32> = crate::dump::freeze::walk(self.opts.pid).into_iter().map(|(p, _)| p).collect();
        match crate::sys::syscall_watch::SyscallWatch::start(&pids, &FLAG_SYSCALLS) {
            Ok(w) => self.watch = Some(w),
            Err(e) => {
                tracing::info!(error = %e, "no eBPF syscall watch: freezes read smaps (about 15 ms per GiB)");
                self.no_watch = true;
                return None;
            }
        }
        drop(FrozenTree::freeze(self.opts.pid).ok()?);
        let mut maps = HashMap::new();
        for pid in pids {
            maps.insert(pid, crate::procfs::maps(pid, true).ok()?);
        }
        Some(std::sync::Arc::new(maps))
    }

    /// At the final freeze: the last pass's mappings if no watched syscall
    /// ran since (see [`Source::watch_flag_syscalls`]).
    fn flags_still_valid(&self) -> Option<std::sync::Arc<HashMap<i32, Vec<crate::procfs::MapEntry>>>> {
        let w = self.watch.as_ref()?;
        let quiet = self.pids.iter().all(|&pid| w.count(pid).is_ok_and(|n| n == 0));
        tracing::debug!(quiet, "VmFlags of the last pass");
        quiet.then(|| self.last_maps.clone())
    }

    /// Records what a pass (or the final dump) left on the target.
    fn learn(&mut self, processes: &[pb::Process]) {
        let hashed = self.tracker == Tracker::Hash;
        for p in processes.iter().filter(|p| !p.zombie) {
            let merged = crate::dump::page_ranges(&p.page_runs);
            let k = self.known.entry(p.pid).or_default();
            if hashed {
                let mut hashes = HashMap::with_capacity(k.hashes.len());
                for r in &p.page_runs {
                    for i in 0..r.nr_pages {
                        let va = r.vaddr + i * PAGE;
                        let h = if r.image == 0 {
                            r.page_hashes.get(i as usize * 16..i as usize * 16 + 16).and_then(|h| h.try_into().ok())
                        } else {
                            k.hashes.get(&va).copied()
                        };
                        if let Some(h) = h {
                            hashes.insert(va, h);
                        }
                    }
                }
                k.hashes = hashes;
            }
            k.ranges = merged;
        }
    }

    /// One pre-copy pass: the tree is stopped for the tracker scan (pass 0:
    /// also for collecting its whole state), then the pages the target lacks
    /// go to `consumer` while it runs. Returns the pass's manifest (pass 0:
    /// the full state without page data; later passes: mappings only) and
    /// its report.
    pub fn pass(&mut self, consumer: ChunkConsumer) -> Result<(pb::Manifest, PassReport), DumpError> {
        let t0 = Instant::now();
        let mut timings = DumpTimings::default();
        let early = if self.passes == 0 { self.flags_before_first_freeze() } else { None };
        let t_freeze = Instant::now();
        let mut frozen = self.freeze()?;
        timings.freeze_ms = ms(t_freeze);
        // The mappings' flags read before this freeze hold if no watched syscall ran since.
        let vma_flags_from = early.filter(|_| self.flags_still_valid().is_some());
        tracing::debug!(reused = vma_flags_from.is_some(), "VmFlags read before the first freeze");
        self.watch_flag_syscalls();
        let id = random_id();
        let mut out = Output::Stream { id, consumer: Some(consumer) };
        let (base, index) = self.base_and_index();
        let opts = DumpOptions { pre_dump: true, vma_flags_from, ..self.opts.clone() };
        let r: Result<DumpReport, DumpError> = if self.passes == 0 {
            dump_frozen(&opts, &self.pre, &mut out, &mut frozen, &mut timings, t0, None, Some(index), self.tracker)
        } else {
            pre_dump_frozen(&opts, &mut out, &mut frozen, &mut timings, t0, base.as_ref(), Some(index), self.tracker)
        };
        // An error resumes the tree (FrozenTree's drop); a pass leaves it running.
        let mut report = r?;
        drop(frozen);
        self.last_maps = std::sync::Arc::new(std::mem::take(&mut report.maps).into_iter().collect());
        let manifest = report.manifest.ok_or_else(|| DumpError::Refused {
            pid: self.opts.pid,
            what: "pre-copy pass produced no manifest".into(),
        })?;
        self.learn(&manifest.processes);
        self.epoch = Some(id);
        let pass = PassReport {
            pass: self.passes,
            frozen_ms: report.timings.frozen_ms,
            scan_ms: report.timings.scan_ms,
            total_ms: ms(t0),
            pages_sent: report.page_bytes / PAGE,
            pages_reused: report.reused_pages,
        };
        self.passes += 1;
        Ok((strip_pages(manifest), pass))
    }

    /// Freezes the tree for good and writes into `dir` an image holding its
    /// whole state and the pages the target lacks. The tree stays frozen:
    /// call [`Source::kill`] once the target runs it, or [`Source::resume`].
    /// Returns the report; `present` lists, per process, every page range
    /// the process has (the target drops what it holds outside them).
    /// `lock` (prepared by the caller) gets the tree's established TCP
    /// connections right after the freeze, before they are read.
    ///
    /// With `pages`, the pages go to that consumer (like a pass's, the
    /// mappings announced first) and the image holds everything else.
    pub fn freeze_final(
        &mut self,
        dir: &Path,
        lock: Option<floe_netfilter::Lock>,
        pages: Option<ChunkConsumer>,
    ) -> Result<DumpReport, DumpError> {
        if self.passes == 0 {
            return Err(DumpError::Refused {
                pid: self.opts.pid,
                what: "final freeze before any pre-copy pass".into(),
            });
        }
        let mut t0 = Instant::now();
        let mut timings = DumpTimings::default();
        let mut t_freeze = Instant::now();
        let mut frozen = self.freeze()?;
        timings.freeze_ms = ms(t_freeze);
        // Listeners take no new connection from here on; connections already
        // waiting in an accept queue are accepted by the process in short thaws.
        let pid = self.opts.pid;
        let (gate, thaws) = crate::dump::close_listeners(pid, &mut frozen, &mut || self.freeze())?;
        if thaws > 0 {
            // The tree ran meanwhile: the downtime starts at the last freeze.
            (t0, t_freeze) = (Instant::now(), Instant::now());
        }
        if let Some(l) = &lock {
            let conns = crate::dump::tree_connections(&frozen);
            timings.lock_ms = ms_of(l.lock(&conns)?);
        }
        // Read once by the agent, then deleted: no fsync in the downtime.
        let writer = ImageWriter::scratch(dir)?;
        let mut out = match pages {
            Some(c) => Output::ImageStreamedPages(&writer, Some(c)),
            None => Output::Image(&writer),
        };
        let (base, index) = self.base_and_index();
        let opts =
            DumpOptions { dir: dir.to_path_buf(), vma_flags_from: self.flags_still_valid(), ..self.opts.clone() };
        let r = dump_frozen(
            &opts,
            &self.pre,
            &mut out,
            &mut frozen,
            &mut timings,
            t0,
            base.as_ref(),
            Some(index),
            self.tracker,
        );
        let mut report = match r {
            Ok(r) => r,
            Err(e) => {
                writer.abort();
                return Err(e);
            }
        };
        report.timings.frozen_ms = ms(t_freeze);
        report.timings.total_ms = ms(t0);
        self.repaired = std::mem::take(&mut report.repaired);
        self.lock = lock;
        self.gate = Some(gate);
        self.frozen = Some(frozen);
        Ok(report)
    }

    /// Time since... whether the tree is frozen by the final pass.
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// Makes the frozen tree stay stopped even if this process dies: a
    /// SIGSTOP is queued to every process, taken when ptrace lets go of them
    /// (a crash of the caller included). [`Source::resume`] cancels it with
    /// SIGCONT (which the processes then see); [`Source::kill`] is unaffected.
    pub fn park(&mut self) -> Result<(), DumpError> {
        let f = self.frozen.as_ref().ok_or_else(|| DumpError::Refused {
            pid: self.opts.pid,
            what: "the tree is not frozen; nothing to park".into(),
        })?;
        f.signal_all(libc::SIGSTOP)?;
        self.parked = true;
        Ok(())
    }

    /// Lets a finally frozen tree run again (the migration was aborted).
    pub fn resume(&mut self) -> Result<(), DumpError> {
        self.stop_tracking();
        let r = match self.frozen.take() {
            Some(f) => {
                if self.parked {
                    // Discards the pending SIGSTOP.
                    f.signal_all(libc::SIGCONT)?;
                    self.parked = false;
                }
                // Connections leave repair mode silently, and listeners take
                // connections again, before the tree runs.
                drop(std::mem::take(&mut self.repaired));
                drop(self.gate.take());
                f.resume()
            }
            None => Ok(()),
        };
        self.unlock();
        r
    }

    /// Removes the network lock, if any.
    fn unlock(&mut self) {
        if let Some(l) = self.lock.take() {
            if let Err(e) = l.unlock() {
                tracing::error!(error = %e, "cannot remove the network lock");
            }
        }
    }

    /// Kills the finally frozen tree (the target runs it now).
    pub fn kill(&mut self) -> Result<(), DumpError> {
        // Its connections stay in repair mode: they close without a FIN or RST.
        std::mem::take(&mut self.repaired).keep();
        let r = match self.frozen.take() {
            Some(f) => f.kill(),
            None => {
                Err(DumpError::Refused { pid: self.opts.pid, what: "the tree is not frozen; nothing killed".into() })
            }
        };
        // After the kill: a listener shared with a process outside the tree
        // (socket activation) takes connections there again.
        drop(self.gate.take());
        self.unlock();
        r
    }

    /// Ends dirty tracking: no registration is left in the processes.
    pub fn stop_tracking(&self) {
        for pid in &self.pids {
            if let Err(e) = crate::track::holder::stop(*pid) {
                tracing::warn!(pid, error = %e, "cannot stop dirty tracking");
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if self.frozen.is_some() || self.passes > 0 {
            self.stop_tracking();
        }
        // A frozen tree left over resumes when its FrozenTree drops.
    }
}

/// A pass's manifest without page runs (the pages went to the consumer).
fn strip_pages(mut m: pb::Manifest) -> pb::Manifest {
    for p in &mut m.processes {
        p.page_runs.clear();
    }
    m
}
