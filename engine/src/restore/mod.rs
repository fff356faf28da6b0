//! `floe restore`: stub → map → fill → finish.
//!
//! Restore runs in three stages with a stable API, because live migration
//! runs the first two on the target while the source still runs:
//!
//! 1. [`Tree::create`] (after [`Preflight::check`]) creates the stopped
//!    process tree: the root with the image's PID (clone3 `set_tid` from
//!    floe), each child forked inside its parent (clone3 `set_tid` injected),
//!    sessions and process groups, then every thread; it empties each address
//!    space, moves the vdso where the image had it and maps every mapping.
//! 2. [`Tree::write_pages`] copies page data into one process (callable many
//!    times; [`load_pages`] streams a whole image with checksums verified).
//! 3. [`Tree::finish`] applies the remaining state (mm fields, descriptors,
//!    signals, limits, credentials, registers) and lets the tree run.
//!
//! Dropping a tree that was not finished kills every process in it: a failed
//! restore leaves no process behind.
mod files;
mod fill;
pub use fill::PageWriter;
mod finish;
mod pages;
pub mod preflight;
mod stub;
mod sysv;

pub use pages::{load_pages, load_pages_preverified, load_pages_where};
pub use preflight::Preflight;
pub use stub::Stub;

use floe_proto::image as pb;
use std::os::fd::AsFd;

/// The stopped process tree being restored.
pub struct Tree {
    pub(crate) procs: Vec<Stub>,
    finished: bool,
    pub(crate) shm: stub::Shmem,
    /// The new pid namespace's init (floe's child) under `restore -n`.
    pub ns_init: Option<i32>,
    /// Restored TCP connections still in repair mode, released with the tree.
    pub(crate) held: Vec<crate::fdkinds::socket::HeldConn>,
}

/// Runs `build` with the init of a new pid namespace under `restore -n`
/// (None otherwise), killing that init if `build` fails.
fn with_ns_init<T>(
    m: &pb::Manifest,
    pre: &Preflight,
    build: impl FnOnce(Option<i32>) -> Result<T, RestoreError>,
) -> Result<T, RestoreError> {
    let ns_init = if pre.new_pidns {
        let root = m.processes.first().map(|p| p.pid).unwrap_or(1);
        Some(crate::sys::task::spawn_ns_init(root).map_err(|source| RestoreError::Stub {
            pid: root,
            op: "creating a new pid namespace (needs CAP_SYS_ADMIN)".into(),
            source,
        })?)
    } else {
        None
    };
    let r = build(ns_init);
    if r.is_err() {
        if let Some(init) = ns_init {
            let _ = crate::sys::task::kill(init, libc::SIGKILL);
            let _ = crate::sys::ptrace::wait(init);
        }
    }
    r
}

impl Tree {
    /// Stage a: creates every process and thread, stopped, with its address
    /// space mapped but not filled.
    pub fn create(m: &pb::Manifest, pre: &Preflight) -> Result<Self, RestoreError> {
        with_ns_init(m, pre, |ns_init| Self::create_in(m, pre, ns_init))
    }

    fn create_in(m: &pb::Manifest, pre: &Preflight, ns_init: Option<i32>) -> Result<Self, RestoreError> {
        let (mut tree, _) = Self::start(m, pre, ns_init)?;
        for p in &m.processes[1..] {
            let parent = tree.index_of(p.ppid).ok_or_else(|| RestoreError::Refused {
                what: format!("process {} has no parent {} in the image", p.pid, p.ppid),
            })?;
            let child = tree.procs[parent].fork_child(p.pid)?;
            tree.procs.push(child);
            let i = tree.procs.len() - 1;
            tree.set_session(i, p)?;
        }
        // Groups led by another process of the tree exist only now.
        for (i, p) in m.processes.iter().enumerate() {
            if !p.zombie && p.pgid != p.pid && tree.index_of(p.pgid).is_some() {
                tree.procs[i].leader().call(libc::SYS_setpgid, [0, p.pgid as u64, 0, 0, 0, 0])?;
            }
        }
        sysv::ensure_segments(&m.sysv_shm)?;
        for (i, p) in m.processes.iter().enumerate() {
            if p.zombie {
                continue;
            }
            let vd = p
                .vdso
                .as_ref()
                .ok_or_else(|| RestoreError::Refused { what: format!("process {} has no vdso record", p.pid) })?;
            tree.procs[i].place_vdso(vd, pre)?;
            tree.procs[i].map_vmas(&p.vmas, &mut tree.shm)?;
            for t in &p.threads[1..] {
                tree.procs[i].clone_thread(t.tid)?;
            }
        }
        Ok(tree)
    }

    /// Stages a and b in one pass, for a restore from a complete image: each
    /// process is built and filled before its children are forked from it,
    /// so memory they shared copy-on-write is shared again. Returns the tree
    /// and the bytes written.
    pub fn create_filled(chain: &ImageChain, pre: &Preflight) -> Result<(Self, u64, f64), RestoreError> {
        with_ns_init(&chain.newest().manifest, pre, |ns_init| Self::create_filled_in(chain, pre, ns_init))
    }

    fn create_filled_in(
        chain: &ImageChain,
        pre: &Preflight,
        ns_init: Option<i32>,
    ) -> Result<(Self, u64, f64), RestoreError> {
        let m = &chain.newest().manifest;
        let (mut tree, root) = Self::start(m, pre, ns_init)?;
        sysv::ensure_segments(&m.sysv_shm)?;
        let vdso_of = |p: &pb::Process| {
            p.vdso
                .clone()
                .ok_or_else(|| RestoreError::Refused { what: format!("process {} has no vdso record", p.pid) })
        };
        tree.procs[0].place_vdso(&vdso_of(root)?, pre)?;
        tree.procs[0].map_vmas(&root.vmas, &mut tree.shm)?;
        let t = Instant::now();
        if worth_filling(root) {
            tree.procs[0].start_filling(&root.vmas);
        }
        let mut bytes = load_pages_where(chain, &mut tree, |pid, _| pid == root.pid)?;
        // Before the fork: children start without the registration anyway
        // (no UFFD_FEATURE_EVENT_FORK), but their copy-on-write pages are
        // present and must not be "filled".
        tree.procs[0].stop_filling();
        let mut pages_ms = ms(t);
        for p in &m.processes[1..] {
            let parent = tree.index_of(p.ppid).ok_or_else(|| RestoreError::Refused {
                what: format!("process {} has no parent {} in the image", p.pid, p.ppid),
            })?;
            let child = tree.procs[parent].fork_child(p.pid)?;
            tree.procs.push(child);
            let i = tree.procs.len() - 1;
            tree.set_session(i, p)?;
            if p.zombie {
                continue;
            }
            let fresh = tree.procs[i].inherit_layout(&m.processes[parent], p, true)?;
            // Only mappings kept from the parent still hold its pages: a `cow`
            // run elsewhere (the parent's mapping had other bounds) is written.
            let kept: Vec<(u64, u64)> = p
                .vmas
                .iter()
                .filter(|v| !fresh.iter().any(|f| f.start == v.start && f.end == v.end))
                .map(|v| (v.start, v.end))
                .collect();
            tree.procs[i].place_vdso(&vdso_of(p)?, pre)?;
            tree.procs[i]
                .match_advice(&m.processes[parent].vmas, p.vmas.iter().filter(|v| kept.contains(&(v.start, v.end))))?;
            tree.procs[i].map_vmas(fresh.iter().copied(), &mut tree.shm)?;
            let t = Instant::now();
            if worth_filling(p) {
                // Only the child's own new mappings are empty.
                tree.procs[i].start_filling(fresh);
            }
            let inherited =
                |r: &pb::PageRun| r.cow && kept.iter().any(|(s, e)| *s <= r.vaddr && r.vaddr + r.nr_pages * 4096 <= *e);
            bytes += load_pages_where(chain, &mut tree, |pid, r| pid == p.pid && !inherited(r))?;
            tree.procs[i].stop_filling();
            pages_ms += ms(t);
        }
        for (i, p) in m.processes.iter().enumerate() {
            if !p.zombie && p.pgid != p.pid && tree.index_of(p.pgid).is_some() {
                tree.procs[i].leader().call(libc::SYS_setpgid, [0, p.pgid as u64, 0, 0, 0, 0])?;
            }
        }
        for (i, p) in m.processes.iter().enumerate() {
            if !p.zombie {
                for t in &p.threads[1..] {
                    tree.procs[i].clone_thread(t.tid)?;
                }
            }
        }
        Ok((tree, bytes, pages_ms))
    }

    /// The root stub (emptied, in its session) and the tree around it.
    fn start<'m>(
        m: &'m pb::Manifest,
        pre: &Preflight,
        ns_init: Option<i32>,
    ) -> Result<(Self, &'m pb::Process), RestoreError> {
        let scratch = stub::choose_scratch(m, pre)?;
        let root = m.processes.first().ok_or_else(|| RestoreError::Refused { what: "image has no process".into() })?;
        let sender = crate::sys::task::unix_dgram_socket().map_err(|source| RestoreError::Stub {
            pid: 0,
            op: "creating the descriptor-passing socket".into(),
            source,
        })?;
        // A memfd that is mapped privately is the same object as its
        // descriptors and shared mappings, if any (by inode).
        let mut objects = std::collections::HashMap::new();
        for ((_, ino), f) in &pre.deleted {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(f.as_ref())));
            if link.is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:")) {
                let dup = f.as_fd().try_clone_to_owned().map_err(|source| RestoreError::Stub {
                    pid: 0,
                    op: "keeping a recreated memfd".into(),
                    source,
                })?;
                objects.insert(*ino, dup);
            }
        }
        let shm = stub::Shmem { objects, sender, deleted: pre.deleted.clone() };
        let mut tree = Tree {
            procs: vec![Stub::create_root(root.pid, pre, scratch, ns_init)?],
            finished: false,
            shm,
            ns_init,
            held: Vec::new(),
        };
        tree.set_session(0, root)?;
        Ok((tree, root))
    }

    fn set_session(&mut self, i: usize, p: &pb::Process) -> Result<(), RestoreError> {
        if p.zombie && p.sid != p.pid && p.pgid != p.pid {
            return Ok(());
        }
        if p.sid == p.pid {
            self.procs[i].leader().call(libc::SYS_setsid, [0; 6])?;
        } else if p.pgid == p.pid {
            self.procs[i].leader().call(libc::SYS_setpgid, [0; 6])?;
        }
        Ok(())
    }

    /// Index of the process whose pid (as the image and the restored
    /// processes see it) is `vpid`.
    fn index_of(&self, vpid: i32) -> Option<usize> {
        self.procs.iter().position(|s| s.vpid == vpid)
    }

    /// The root process's pid.
    pub fn root_pid(&self) -> i32 {
        self.procs.first().map(|s| s.pid).unwrap_or(0)
    }

    /// Brings process `new.pid`'s mappings from `old.vmas` (what the stub has)
    /// to `new.vmas`, keeping the pages of every part both share (live
    /// migration: the process mapped, unmapped or resized mappings between
    /// two pre-copy passes). Returns the ranges whose pages were kept.
    pub fn relayout(&mut self, old: &pb::Process, new: &pb::Process) -> Result<Vec<(u64, u64)>, RestoreError> {
        let i = self
            .index_of(new.pid)
            .ok_or_else(|| RestoreError::Refused { what: format!("no process {} in this restore", new.pid) })?;
        // Page runs play no part here: inherit_layout holes nothing without them.
        let strip = |p: &pb::Process| pb::Process { vmas: p.vmas.clone(), ..Default::default() };
        let (old, new) = (strip(old), strip(new));
        let fresh = self.procs[i].inherit_layout(&old, &new, false)?;
        let kept: Vec<&pb::Vma> =
            new.vmas.iter().filter(|v| !fresh.iter().any(|f| f.start == v.start && f.end == v.end)).collect();
        // A kept mapping keeps the stub's flags: bring them to the new ones.
        self.procs[i].match_advice(&old.vmas, kept.iter().copied())?;
        let kept = kept.iter().map(|v| (v.start, v.end)).collect();
        self.procs[i].map_vmas(fresh, &mut self.shm)?;
        Ok(kept)
    }

    /// Drops the pages of process `pid` in `ranges` (they read as zero, or
    /// as the file's contents in a private file mapping, again).
    pub fn drop_pages(&mut self, pid: i32, ranges: &[(u64, u64)]) -> Result<(), RestoreError> {
        let i = self
            .index_of(pid)
            .ok_or_else(|| RestoreError::Refused { what: format!("no process {pid} in this restore") })?;
        for &(s, e) in ranges {
            self.procs[i].leader().call(libc::SYS_madvise, [s, e - s, libc::MADV_DONTNEED as u64, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Pids and thread ids of every process, as the image numbers them.
    pub fn task_ids(&self) -> Vec<(i32, Vec<i32>)> {
        self.procs.iter().map(|s| (s.vpid, s.tids())).collect()
    }

    /// Stage b: copies `data` into process `pid` (the image's pid) at `ranges` (in order).
    pub fn write_pages(
        &mut self,
        pid: i32,
        data: &[u8],
        ranges: &[crate::sys::memory::Range],
    ) -> Result<(), RestoreError> {
        let i = self
            .index_of(pid)
            .ok_or_else(|| RestoreError::Refused { what: format!("no process {pid} in this restore") })?;
        self.procs[i].write_pages(data, ranges)
    }
}

/// Enough pages in `p`'s image for UFFDIO_COPY filling (a few injected
/// syscalls to set up) to pay.
fn worth_filling(p: &pb::Process) -> bool {
    const MIN_PAGES: u64 = 512;
    p.page_runs.iter().map(|r| r.nr_pages).sum::<u64>() >= MIN_PAGES
}

impl Tree {
    /// Pages written into fresh private anonymous memory of the processes
    /// of `m` go through UFFDIO_COPY (allocated and filled in one step)
    /// until [`Tree::stop_filling`]. For a tree that only receives pages it
    /// lacks, such as a live migration's first pass.
    pub fn start_filling(&mut self, m: &floe_proto::image::Manifest) {
        for p in m.processes.iter().filter(|p| !p.zombie) {
            if let Some(i) = self.index_of(p.pid) {
                self.procs[i].start_filling(&p.vmas);
            }
        }
    }

    /// While some stub is being filled ([`Tree::start_filling`]): a writer
    /// other threads can use for its pages (see [`PageWriter`]). None when
    /// no stub is, or when the descriptors cannot be shared.
    pub fn page_writer(&self) -> Option<PageWriter> {
        let mut procs = std::collections::HashMap::new();
        let mut filling = false;
        for s in &self.procs {
            let handle = match s.fill.as_ref() {
                Some(f) => Some(f.handle().ok()?),
                None => None,
            };
            filling |= handle.is_some();
            procs.insert(s.vpid, (s.pid, handle));
        }
        filling.then(|| PageWriter::new(procs))
    }

    /// Back to process_vm_writev for every page; the stubs keep no trace of
    /// the filling. Call before anything else changes their mappings.
    /// Returns the bytes written by UFFDIO_COPY and the other bytes
    /// written meanwhile.
    pub fn stop_filling(&mut self) -> (u64, u64) {
        self.procs.iter_mut().map(|s| s.stop_filling()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Creates each process's descriptor-passing socket now, above every
    /// descriptor number it has in `m`. Growing the descriptor table of a
    /// multi-threaded process waits for an RCU grace period (10-20 ms):
    /// live migration's staging can afford that, its final restore cannot.
    pub fn park_installers(&mut self, m: &floe_proto::image::Manifest) -> Result<(), RestoreError> {
        for p in m.processes.iter().filter(|p| !p.zombie) {
            let Some(i) = self.index_of(p.pid) else { continue };
            let fds: Vec<i32> = p.fds.iter().map(|r| r.fd).collect();
            self.procs[i].installer(&fds)?;
        }
        Ok(())
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if !self.finished {
            for s in self.procs.iter().rev() {
                stub::kill_and_reap(s.pid, &s.tids());
            }
        }
    }
}

use crate::image::{ImageChain, ImageError};
use crate::inject::InjectError;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    pub shell_job: bool,
    /// Restore into a new pid namespace (the image's pids need not be free).
    pub new_pidns: bool,
    /// Restore established TCP connections (TCP_REPAIR).
    pub tcp_established: bool,
    /// Restore established TCP connections closed.
    pub tcp_close: bool,
    /// Keep restored TCP connections silent (repair mode) until
    /// [`Tree::release`] (live migration's target, until the commit).
    pub tcp_hold: bool,
}

/// Per-phase timings of a restore, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreTimings {
    pub open_ms: f64,
    pub preflight_ms: f64,
    pub create_ms: f64,
    pub pages_ms: f64,
    pub finish_ms: f64,
    /// Removing the dump's network lock (--tcp-established).
    pub unlock_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub pid: i32,
    /// The root's pid as seen from floe (differs from `pid` under `-n`).
    pub host_pid: i32,
    /// What to wait for to learn the root's exit status (the namespace's init under `-n`).
    pub wait_pid: i32,
    pub processes: usize,
    pub page_bytes: u64,
    pub timings: RestoreTimings,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("pid {pid} is taken by {owner}; stop that process or restore in a new pid namespace")]
    PidTaken { pid: i32, owner: String },
    #[error(
        "pid {pid} is still held by a zombie after {secs} s (its parent has not reaped it); retry when it is gone"
    )]
    PidZombie { pid: i32, secs: u64 },
    #[error("pid {pid} is above this host's kernel.pid_max ({max}); raise /proc/sys/kernel/pid_max")]
    PidMax { pid: i32, max: i64 },
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error("image does not fit this host: {what}")]
    Incompatible { what: String },
    #[error("{what}")]
    Refused { what: String },
    #[error("restore stub {pid}: {op} failed")]
    Stub {
        pid: i32,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("restore stub {pid}: cannot write memory at {addr:#x}")]
    Memory {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Inject(#[from] InjectError),
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Runs all three stages on an image directory. The process is left
/// running; it is a child of the caller.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport, RestoreError> {
    let t0 = Instant::now();
    let mut timings = RestoreTimings::default();
    if let Ok(why) = std::fs::read_to_string(opts.dir.join(crate::image::dedup::MARKER)) {
        return Err(RestoreError::Refused {
            what: format!("{} was deduplicated into a newer image: {}", opts.dir.display(), why.trim()),
        });
    }
    let chain = ImageChain::open(&opts.dir)?;
    let img = chain.newest();
    if img.manifest.pre_dump {
        return Err(RestoreError::Refused {
            what: format!(
                "{} is a pre-dump (its pages were copied while the processes ran); restore from a dump that builds on it",
                opts.dir.display()
            ),
        });
    }
    timings.open_ms = ms(t0);
    let t = Instant::now();
    let pre = Preflight::check(img, opts)?;
    timings.preflight_ms = ms(t);
    let t = Instant::now();
    let (tree, page_bytes, pages_ms) = Tree::create_filled(&chain, &pre)?;
    // Pages are written while the tree is built (see create_filled).
    timings.pages_ms = pages_ms;
    timings.create_ms = ms(t) - pages_ms;
    let t = Instant::now();
    let ns_init = tree.ns_init;
    let host_pid = tree.finish(img, &pre)?;
    let pid = img.root().pid;
    timings.finish_ms = ms(t);
    // The connections exist again: let their peers' packets through.
    let lock = &img.manifest.net_lock;
    if !lock.is_empty() && (opts.tcp_established || opts.tcp_close) {
        let t = Instant::now();
        match floe_netfilter::remove_table(lock) {
            Ok(false) => tracing::warn!(table = %lock, "the network lock of this image was already gone"),
            Ok(true) => {}
            Err(e) => {
                tracing::error!(table = %lock, error = %e, "cannot remove the network lock; delete the nftables table by hand")
            }
        }
        timings.unlock_ms = ms(t);
    }
    timings.total_ms = ms(t0);
    tracing::info!(pid, timings = ?timings, page_bytes, "restore complete");
    Ok(RestoreReport {
        pid,
        host_pid,
        wait_pid: ns_init.unwrap_or(host_pid),
        processes: img.manifest.processes.len(),
        page_bytes,
        timings,
    })
}

/// Waits for a restored process (a child of the caller) to exit and returns
/// its exit code (128 + signal when killed).
pub fn wait_exit(pid: i32) -> Result<i32, RestoreError> {
    use crate::sys::ptrace::{wait, Stop};
    loop {
        match wait(pid).map_err(|source| RestoreError::Stub {
            pid,
            op: "wait for the restored process".into(),
            source,
        })? {
            Stop::Exited(code) => return Ok(code),
            Stop::Killed(sig) => return Ok(128 + sig),
            _ => continue,
        }
    }
}
