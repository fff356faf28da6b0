//! Dirty-page trackers for incremental dumps.
//!
//! * [`Tracker::Uffd`]: userfaultfd write-protection in async mode plus
//!   PAGEMAP_SCAN ([`uffd_start`], [`UffdTracker`]). Only `userfaultfd()` runs
//!   inside the target; every ioctl is issued by floe on the target's mm.
//!   The registration lives as long as the uffd descriptor: [`holder`] keeps
//!   it alive between floe invocations, and when the last descriptor closes
//!   the kernel drops it, leaving nothing behind in the tracked process.
//! * [`Tracker::SoftDirty`]: pagemap bit 55 after `clear_refs` = 4
//!   ([`softdirty`]); needs CONFIG_MEM_SOFT_DIRTY.
//! * [`Tracker::Hash`]: no kernel help; the dump code compares page hashes.
//!
//! All ranges are `[start, end)` byte addresses, page aligned.
use std::sync::OnceLock;
use std::time::Duration;

use crate::inject::InjectError;
use crate::sys::memory::{
    pagemap_scan, PageRegion, ScanQuery, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
};
use crate::sys::track as sys;

pub mod holder;
pub mod softdirty;
mod uffd;

pub use uffd::{uffd_start, uffd_start_unprotected, UffdTracker};

/// A way of finding the pages written since the previous dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tracker {
    Uffd,
    SoftDirty,
    Hash,
}

impl Tracker {
    /// "auto" picks the best the kernel offers (uffd if the uffd-wp async +
    /// PAGEMAP_SCAN probe works, else soft-dirty if pagemap bit 55 works, else
    /// hash); explicit names ("uffd", "soft-dirty", "hash") are validated and
    /// give a clear error naming what the kernel lacks. The probes run once
    /// per process (a few hundred microseconds; soft-dirty forks a child).
    pub fn resolve(name: &str) -> Result<Tracker, TrackError> {
        match name {
            "auto" => Ok(if uffd_probe().is_ok() {
                Tracker::Uffd
            } else if soft_dirty_probe().is_ok() {
                Tracker::SoftDirty
            } else {
                Tracker::Hash
            }),
            "uffd" => match uffd_probe() {
                Ok(()) => Ok(Tracker::Uffd),
                Err(reason) => Err(TrackError::Unsupported { tracker: "uffd", reason: reason.clone() }),
            },
            "soft-dirty" | "softdirty" => match soft_dirty_probe() {
                Ok(()) => Ok(Tracker::SoftDirty),
                Err(reason) => Err(TrackError::Unsupported { tracker: "soft-dirty", reason: reason.clone() }),
            },
            "hash" => Ok(Tracker::Hash),
            other => Err(TrackError::UnknownTracker { name: other.to_string() }),
        }
    }

    /// The name accepted by [`resolve`](Self::resolve) and used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Tracker::Uffd => "uffd",
            Tracker::SoftDirty => "soft-dirty",
            Tracker::Hash => "hash",
        }
    }
}

impl std::fmt::Display for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the trackers.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("unknown dirty tracker {name:?} (expected auto, uffd, soft-dirty or hash)")]
    UnknownTracker { name: String },
    #[error("dirty tracker {tracker} is unavailable: {reason}")]
    Unsupported { tracker: &'static str, reason: String },
    #[error("pid {pid}: injecting {what} failed")]
    Inject {
        pid: i32,
        what: &'static str,
        #[source]
        source: InjectError,
    },
    #[error("pid {pid}: {op} failed")]
    Sys {
        pid: i32,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: {op} on {start:#x}-{end:#x} failed")]
    Range {
        pid: i32,
        op: &'static str,
        start: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("registering {start:#x}-{end:#x} for write-protect tracking failed")]
    Register {
        start: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: pagemap scan of {start:#x}-{end:#x} made no progress at {at:#x}")]
    NoProgress { pid: i32, start: u64, end: u64, at: u64 },
    #[error("pid {pid} is already tracked by a holder (floe-track-{pid}): fetch or stop it first")]
    HolderRunning { pid: i32 },
    #[error("pid {pid}: tracker holder floe-track-{pid}: {detail}")]
    Holder { pid: i32, detail: String },
}

// ---------------------------------------------------------------------------
// kernel probes

static UFFD_PROBE: OnceLock<Result<(), String>> = OnceLock::new();
static SOFT_DIRTY_PROBE: OnceLock<Result<(), String>> = OnceLock::new();

fn uffd_probe() -> &'static Result<(), String> {
    UFFD_PROBE.get_or_init(probe_uffd)
}

fn soft_dirty_probe() -> &'static Result<(), String> {
    SOFT_DIRTY_PROBE.get_or_init(probe_soft_dirty)
}

fn errno_text(e: &std::io::Error) -> String {
    crate::sys::probe::describe_io(e)
}

/// The exact flow of [`uffd_start`]/[`UffdTracker::dirty`] on a local
/// 4-page mapping: user-mode-only uffd, API with WP_ASYNC|WP_UNPOPULATED,
/// register WP, write-protect all, write page 2, scan: exactly page 2; rescan: nothing.
fn probe_uffd() -> Result<(), String> {
    use std::os::fd::AsFd;
    let uffd = sys::userfaultfd().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel lacks userfaultfd (CONFIG_USERFAULTFD): ENOSYS".to_string(),
        Some(libc::EPERM) => "userfaultfd(UFFD_USER_MODE_ONLY) was refused: EPERM".to_string(),
        _ => format!("userfaultfd failed: {}", errno_text(&e)),
    })?;
    let want = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
    let got = sys::uffd_api(uffd.as_fd(), want).map_err(|e| {
        format!("the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (linux 6.7+): UFFDIO_API {}", errno_text(&e))
    })?;
    if got & want != want {
        return Err(format!("the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (features {got:#x})"));
    }
    let mut map = crate::sys::probe::AnonMapping::new(4).map_err(|e| format!("mmap: {e}"))?;
    map.touch(0, 1);
    sys::uffd_register_wp(uffd.as_fd(), map.start(), map.len() as u64).map_err(|e| {
        format!(
            "the kernel lacks uffd write-protect on anonymous memory (CONFIG_PTE_MARKER_UFFD_WP): UFFDIO_REGISTER {}",
            errno_text(&e)
        )
    })?;
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let lacks_scan = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EINVAL) => {
            format!("the kernel lacks PAGEMAP_SCAN (linux 6.7+): {}", errno_text(&e))
        }
        _ => format!("PAGEMAP_SCAN failed: {}", errno_text(&e)),
    };
    let mut buf = vec![PageRegion::default(); 16];
    write_protect(pagemap.as_fd(), map.start(), map.end()).map_err(lacks_scan)?;
    map.touch(2, 7);
    let first = scan_written(pagemap.as_fd(), map.start(), map.end(), &mut buf).map_err(lacks_scan)?;
    let page2 = vec![(map.page_addr(2), map.page_addr(3))];
    if first != page2 {
        return Err(format!("uffd-wp tracking is wrong: a write to page 2 was reported as {first:x?}"));
    }
    let second = scan_written(pagemap.as_fd(), map.start(), map.end(), &mut buf).map_err(lacks_scan)?;
    if !second.is_empty() {
        return Err(format!("uffd-wp re-protect failed: a rescan reported {second:x?}"));
    }
    Ok(())
}

/// A child clears its soft-dirty bits, writes a page and reads pagemap bit 55.
fn probe_soft_dirty() -> Result<(), String> {
    use crate::sys::probe;
    let mut map = probe::AnonMapping::new(1).map_err(|e| format!("mmap: {e}"))?;
    map.touch(0, 1);
    let mut child = probe::spawn_soft_dirty_child(&map).map_err(|e| format!("fork: {e}"))?;
    match child.wait_timeout(Duration::from_secs(5)).map_err(|e| format!("soft-dirty probe child: {e}"))? {
        probe::WaitEvent::Exited(probe::SOFT_DIRTY_SET) => Ok(()),
        probe::WaitEvent::Exited(probe::SOFT_DIRTY_CLEAR) => {
            Err("the kernel lacks CONFIG_MEM_SOFT_DIRTY: pagemap bit 55 stayed clear after clear_refs=4 and a write"
                .to_string())
        }
        probe::WaitEvent::Exited(probe::SOFT_DIRTY_CLEAR_REFS_FAILED) => {
            Err("writing 4 to /proc/self/clear_refs failed".to_string())
        }
        probe::WaitEvent::Exited(probe::SOFT_DIRTY_PAGEMAP_FAILED) => {
            Err("reading /proc/self/pagemap failed".to_string())
        }
        probe::WaitEvent::Exited(probe::SOFT_DIRTY_NOT_PRESENT) => {
            Err("the written page was not present in pagemap".to_string())
        }
        other => Err(format!("soft-dirty probe child ended with {other:?}")),
    }
}

// ---------------------------------------------------------------------------
// scans shared by the probe and UffdTracker

/// The WRITTEN pages of a range, write-protecting them (again); fails with
/// EPERM unless the whole range is registered for async write-protection.
const WRITTEN_REPROTECT: ScanQuery = ScanQuery {
    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
    category_inverted: 0,
    category_mask: PAGE_IS_WRITTEN,
    category_anyof_mask: 0,
    return_mask: PAGE_IS_WRITTEN,
    max_pages: 0,
};

/// Write-protects every page of [start, end) (a PAGEMAP_SCAN with
/// WP_MATCHING|CHECK_WPASYNC and no output vector), looping until the walk
/// reaches `end`.
pub(crate) fn write_protect(pagemap: std::os::fd::BorrowedFd<'_>, start: u64, end: u64) -> std::io::Result<()> {
    let mut cur = start;
    while cur < end {
        let (_, walk_end) = pagemap_scan(pagemap, cur, end, &WRITTEN_REPROTECT, None)?;
        if walk_end <= cur {
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        cur = walk_end;
    }
    Ok(())
}

/// The WRITTEN pages of [start, end) as merged ranges, write-protecting them
/// again; loops until the walk reaches `end`. `buf` is the output vector.
pub(crate) fn scan_written(
    pagemap: std::os::fd::BorrowedFd<'_>,
    start: u64,
    end: u64,
    buf: &mut [PageRegion],
) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut cur = start;
    while cur < end {
        let (n, walk_end) = pagemap_scan(pagemap, cur, end, &WRITTEN_REPROTECT, Some(buf))?;
        out.extend(buf[..n].iter().map(|r| (r.start, r.end)));
        if walk_end <= cur {
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        cur = walk_end;
    }
    Ok(normalize(out))
}

// ---------------------------------------------------------------------------
// range sets

/// Rounds a range outwards to page boundaries.
pub(crate) fn page_align((start, end): (u64, u64)) -> (u64, u64) {
    let p = sys::PAGE_SIZE;
    (start & !(p - 1), end.div_ceil(p) * p)
}

/// Sorts ranges and merges overlapping or adjacent ones; drops empty ones.
pub(crate) fn normalize(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|(s, e)| s < e);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some((_, le)) if s <= *le => *le = (*le).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Address ranges, `[start, end)`.
pub(crate) type Ranges = Vec<(u64, u64)>;

/// Splits `range` into the parts covered by the normalized set `set` and the
/// parts it does not cover, both in address order.
pub(crate) fn split_covered(range: (u64, u64), set: &[(u64, u64)]) -> (Ranges, Ranges) {
    let (start, end) = range;
    let mut covered = Vec::new();
    let mut uncovered = Vec::new();
    let mut cur = start;
    let first = set.partition_point(|&(_, e)| e <= start);
    for &(s, e) in &set[first..] {
        if s >= end {
            break;
        }
        if s > cur {
            uncovered.push((cur, s));
        }
        let (a, b) = (s.max(cur), e.min(end));
        if a < b {
            covered.push((a, b));
        }
        cur = cur.max(b);
    }
    if cur < end {
        uncovered.push((cur, end));
    }
    (covered, uncovered)
}

/// Removes `range` from the normalized set `set`.
pub(crate) fn subtract(set: &mut Vec<(u64, u64)>, (start, end): (u64, u64)) {
    let mut out = Vec::with_capacity(set.len() + 1);
    for &(s, e) in set.iter() {
        if e <= start || s >= end {
            out.push((s, e));
            continue;
        }
        if s < start {
            out.push((s, start));
        }
        if e > end {
            out.push((end, e));
        }
    }
    *set = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::{self, Injector};
    use crate::sys::ptrace::{self, Stop, UserRegs};
    use crate::sys::track::testing::Writer;
    use crate::sys::track::PAGE_SIZE;
    use std::time::Instant;

    const MIB: u64 = 1024 * 1024;

    fn maps(pid: i32) -> Vec<(u64, u64, String)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (s, e) = f.next()?.split_once('-')?;
                let name = f.nth(4).unwrap_or("").to_string();
                Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?, name))
            })
            .collect()
    }

    /// Seizes and interrupts `pid`; returns its registers and an injector.
    fn freeze(pid: i32) -> (UserRegs, Injector) {
        ptrace::seize(pid, ptrace::DUMP_OPTIONS).expect("seize");
        ptrace::interrupt(pid).expect("interrupt");
        loop {
            match ptrace::wait(pid).expect("wait") {
                Stop::Event => break,
                Stop::Signal(sig) => ptrace::cont(pid, sig).expect("cont"),
                other => panic!("unexpected stop {other:?}"),
            }
        }
        let regs = ptrace::get_regs(pid).expect("regs");
        let (vs, ve, _) = maps(pid).into_iter().find(|m| m.2 == "[vdso]").expect("vdso");
        let gadget = Injector::find_gadget(pid, vs, ve).expect("gadget");
        (regs, Injector::new(pid, regs, gadget))
    }

    fn start(w: &Writer, ranges: &[(u64, u64)]) -> UffdTracker {
        let (regs, mut inj) = freeze(w.pid);
        let t = uffd_start(w.pid, &mut inj, ranges);
        inject::resume_with_restart(w.pid, &regs, inj.count > 0).expect("resume");
        t.expect("uffd_start")
    }

    fn pages(w: &Writer, idx: &[u64]) -> Vec<(u64, u64)> {
        normalize(idx.iter().map(|&i| (w.page(i), w.page(i + 1))).collect())
    }

    fn target_has_uffd(pid: i32) -> bool {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
    }

    fn wait_gone(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return,
                Ok(s) if s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')) => return,
                Ok(_) => {}
            }
            assert!(Instant::now() < deadline, "process {pid} still alive");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn track_resolve_names() {
        assert_eq!(Tracker::resolve("hash").expect("hash"), Tracker::Hash);
        assert_eq!(Tracker::resolve("uffd").expect("uffd works on this kernel"), Tracker::Uffd);
        let auto = Tracker::resolve("auto").expect("auto");
        assert_eq!(auto, Tracker::Uffd);
        let err = Tracker::resolve("dirty-bits").expect_err("unknown");
        assert!(err.to_string().contains("unknown dirty tracker \"dirty-bits\""), "{err}");
        for t in [Tracker::Uffd, Tracker::SoftDirty, Tracker::Hash] {
            assert_eq!(t.to_string(), t.name());
        }
    }

    #[test]
    fn track_range_sets() {
        assert_eq!(normalize(vec![(5, 9), (0, 2), (2, 3), (8, 12), (20, 20)]), vec![(0, 3), (5, 12)]);
        let set = vec![(10, 20), (30, 40)];
        assert_eq!(split_covered((0, 50), &set), (vec![(10, 20), (30, 40)], vec![(0, 10), (20, 30), (40, 50)]));
        assert_eq!(split_covered((15, 35), &set), (vec![(15, 20), (30, 35)], vec![(20, 30)]));
        assert_eq!(split_covered((21, 29), &set), (vec![], vec![(21, 29)]));
        assert_eq!(split_covered((12, 18), &set), (vec![(12, 18)], vec![]));
        let mut s = set.clone();
        subtract(&mut s, (15, 32));
        assert_eq!(s, vec![(10, 15), (32, 40)]);
        assert_eq!(page_align((0x1001, 0x2001)), (0x1000, 0x3000));
    }

    #[test]
    fn track_uffd_reports_exactly_written_pages() {
        let w = Writer::spawn(64 * MIB).expect("writer");
        // populated before tracking starts: must not be reported
        w.write_pages(&(0..100).collect::<Vec<_>>()).expect("prefill");
        let buf = (w.base, w.base + w.len);
        let mut t = start(&w, &[buf]);
        assert_eq!(t.ranges(), &[buf]);
        assert!(!target_has_uffd(w.pid), "the target kept the userfaultfd");
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), vec![], "nothing written yet");

        let written = [3, 50, 51, 52, 1000, 16383];
        w.write_pages(&written).expect("write");
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), pages(&w, &written));
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), vec![], "re-protected");

        w.write_pages(&[7, 3, 8]).expect("write");
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), pages(&w, &[3, 7, 8]));
        // a sub-range scan leaves the rest pending
        w.write_pages(&[10, 2000]).expect("write");
        assert_eq!(t.dirty(w.pid, &[(w.page(0), w.page(100))]).expect("dirty"), pages(&w, &[10]));
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), pages(&w, &[2000]));
    }

    #[test]
    fn track_uffd_skips_special_mappings_and_registers_new_ranges() {
        let w = Writer::spawn(64 * MIB).expect("writer");
        let all: Vec<(u64, u64)> = maps(w.pid).iter().map(|m| (m.0, m.1)).collect();
        let specials: Vec<(u64, u64)> = maps(w.pid)
            .iter()
            .filter(|m| ["[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"].contains(&m.2.as_str()))
            .map(|m| (m.0, m.1))
            .collect();
        assert!(!specials.is_empty());
        // everything except the buffer's upper half (a "new mapping" for the test)
        let half = w.base + w.len / 2;
        let mut ranges = Vec::new();
        for &(s, e) in &all {
            if s <= w.base && e >= w.base + w.len {
                if s < w.base {
                    ranges.push((s, w.base));
                }
                ranges.push((w.base, half));
                if e > w.base + w.len {
                    ranges.push((w.base + w.len, e));
                }
            } else {
                ranges.push((s, e));
            }
        }
        let mut t = start(&w, &ranges);
        for sp in &specials {
            assert!(t.untracked(&[*sp]) == vec![*sp], "special mapping {sp:x?} was registered");
        }
        let upper = (half, w.base + w.len);
        assert_eq!(t.untracked(&[(w.base, w.base + w.len)]), vec![upper]);

        let buf = (w.base, w.base + w.len);
        w.write_pages(&[1]).expect("write");
        // the unregistered upper half comes back whole
        let mut expect = pages(&w, &[1]);
        expect.push(upper);
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), normalize(expect));

        t.register(&[upper]).expect("register");
        assert!(t.untracked(&[buf]).is_empty());
        // first scan of a fresh registration: whole, then protected
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), vec![upper]);
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), vec![]);
        let n = w.len / PAGE_SIZE;
        w.write_pages(&[n - 1, 5]).expect("write");
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), pages(&w, &[5, n - 1]));
        // special mappings asked for are reported whole (never registered)
        assert_eq!(t.dirty(w.pid, &specials).expect("dirty"), normalize(specials.clone()));
    }

    #[test]
    fn track_holder_round_trip() {
        let w = Writer::spawn(64 * MIB).expect("writer");
        let buf = (w.base, w.base + w.len);
        let t = start(&w, &[buf]);
        // a touched 64 MiB allocation the holder must not keep
        let ballast = vec![1u8; 64 * MIB as usize];
        holder::hold(w.pid, t).expect("hold");
        assert!(holder::running(w.pid));

        let (mut t2, hpid) = holder::fetch_with_pid(w.pid).expect("fetch").expect("a holder");
        assert_eq!(t2.ranges(), &[buf]);
        w.write_pages(&[5, 9]).expect("write");
        assert_eq!(t2.dirty(w.pid, &[buf]).expect("dirty"), pages(&w, &[5, 9]));
        drop(ballast);

        let status = std::fs::read_to_string(format!("/proc/{hpid}/status")).expect("holder status");
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .expect("VmRSS");
        eprintln!("holder VmRSS {rss_kib} KiB");
        assert!(rss_kib < 32 * 1024, "holder RSS {rss_kib} KiB: inherited memory not dropped");
        assert!(status.lines().any(|l| l == "Name:\tfloe-track"), "{status}");
        // only the listening socket, the pidfd and the uffd
        // (it closes its start-up pipe right after answering hold(): allow a moment)
        let list = || -> Vec<String> {
            std::fs::read_dir(format!("/proc/{hpid}/fd"))
                .expect("holder fds")
                .filter_map(|e| Some(std::fs::read_link(e.ok()?.path()).ok()?.to_string_lossy().into_owned()))
                .collect()
        };
        let mut fds = list();
        for _ in 0..100 {
            if fds.len() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            fds = list();
        }
        assert_eq!(fds.len(), 3, "{fds:?}");
        assert!(fds.iter().any(|l| l == "anon_inode:[userfaultfd]"), "{fds:?}");
        assert!(fds.iter().any(|l| l == "anon_inode:[pidfd]"), "{fds:?}");
        assert_eq!(std::fs::read_link(format!("/proc/{hpid}/cwd")).expect("cwd"), std::path::Path::new("/"));

        // other uids are hung up on; floe's own uid is served
        let name = holder::socket_name(w.pid);
        assert_eq!(crate::sys::track::testing::get_as_uid(65534, name.as_bytes()).expect("fork"), 0);
        assert_eq!(crate::sys::track::testing::get_as_uid(0, name.as_bytes()).expect("fork"), 1);

        // a second start is refused while the holder lives
        let (regs, mut inj) = freeze(w.pid);
        let again = uffd_start(w.pid, &mut inj, &[buf]);
        inject::resume_with_restart(w.pid, &regs, inj.count > 0).expect("resume");
        assert!(matches!(again, Err(TrackError::HolderRunning { .. })), "{again:?}");

        // re-hold replaces the holder
        let t3 = holder::fetch(w.pid).expect("fetch").expect("a holder");
        holder::hold(w.pid, t3).expect("re-hold");
        let (t4, hpid2) = holder::fetch_with_pid(w.pid).expect("fetch").expect("a holder");
        assert_ne!(hpid, hpid2);
        wait_gone(hpid);
        drop(t4);

        holder::stop(w.pid).expect("stop");
        assert!(holder::fetch(w.pid).expect("fetch").is_none());
        holder::stop(w.pid).expect("stop without a holder");
        wait_gone(hpid2);
        // the fetched copy still works after the holder is gone
        w.write_pages(&[11]).expect("write");
        assert_eq!(t2.dirty(w.pid, &[buf]).expect("dirty"), pages(&w, &[11]));
    }

    #[test]
    fn track_holder_killed_leaves_nothing_behind() {
        let w = Writer::spawn(64 * MIB).expect("writer");
        let buf = (w.base, w.base + w.len);
        let t = start(&w, &[buf]);
        holder::hold(w.pid, t).expect("hold");
        let (t2, hpid) = holder::fetch_with_pid(w.pid).expect("fetch").expect("a holder");
        drop(t2);
        crate::sys::task::kill(hpid, libc::SIGKILL).expect("kill holder");
        wait_gone(hpid);
        assert!(!holder::running(w.pid));
        assert!(!target_has_uffd(w.pid));
        // A new registration of the same range succeeds: the old one is gone
        // (it would make UFFDIO_REGISTER fail with EBUSY and the range be
        // skipped). Another test thread's fork may hold an inherited copy of
        // the old uffd for a moment, hence the bounded retry.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut t = loop {
            let t = start(&w, &[buf]);
            if t.ranges() == [buf] {
                break t;
            }
            assert!(Instant::now() < deadline, "the old registration stayed: {:x?}", t.ranges());
            drop(t);
            std::thread::sleep(Duration::from_millis(10));
        };
        w.write_pages(&[4]).expect("write");
        assert_eq!(t.dirty(w.pid, &[buf]).expect("dirty"), pages(&w, &[4]));
    }

    #[test]
    fn track_holder_exits_with_the_tracked_process() {
        let mut w = Writer::spawn(4 * MIB).expect("writer");
        let t = start(&w, &[(w.base, w.base + w.len)]);
        holder::hold(w.pid, t).expect("hold");
        let (t2, hpid) = holder::fetch_with_pid(w.pid).expect("fetch").expect("a holder");
        drop(t2);
        let pid = w.pid;
        drop(std::mem::replace(&mut w, Writer::spawn(PAGE_SIZE).expect("writer")));
        wait_gone(hpid);
        assert!(!holder::running(pid));
    }

    #[test]
    fn track_holder_serves_large_range_lists() {
        // 10000 ranges = 160 KiB of payload: several 64 KiB messages
        let w = Writer::spawn(PAGE_SIZE).expect("writer");
        let ranges: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * 2 * PAGE_SIZE, (i * 2 + 1) * PAGE_SIZE)).collect();
        let uffd = crate::sys::track::userfaultfd().expect("userfaultfd");
        holder::hold(w.pid, UffdTracker::from_fd(uffd, ranges.clone())).expect("hold");
        let t = holder::fetch(w.pid).expect("fetch").expect("a holder");
        assert_eq!(t.ranges(), &ranges[..]);
        holder::stop(w.pid).expect("stop");
        assert!(!holder::running(w.pid));
    }

    /// Scan cost over 1 GiB: `cargo test -p floe-engine track_uffd_scan_1gib -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: 1 GiB of memory"]
    fn track_uffd_scan_1gib_timing() {
        let w = Writer::spawn(1024 * MIB).expect("writer");
        let buf = (w.base, w.base + w.len);
        let t0 = Instant::now();
        let mut t = start(&w, &[buf]);
        println!("uffd_start (1 GiB, unpopulated): {:?}", t0.elapsed());
        let n = w.len / PAGE_SIZE;
        for round in 0..3 {
            w.write_all().expect("write all");
            let t0 = Instant::now();
            let d = t.dirty(w.pid, &[buf]).expect("dirty");
            let all = t0.elapsed();
            assert_eq!(d, vec![buf]);
            let t0 = Instant::now();
            let d = t.dirty(w.pid, &[buf]).expect("dirty");
            let none = t0.elapsed();
            assert!(d.is_empty());
            let scattered: Vec<u64> = (0..n).step_by(16).collect();
            w.write_pages(&scattered).expect("write");
            let t0 = Instant::now();
            let d = t.dirty(w.pid, &[buf]).expect("dirty");
            let some = t0.elapsed();
            assert_eq!(d.len(), scattered.len());
            println!(
                "round {round}: all {n} pages written {all:?}; none written {none:?}; {} scattered pages {some:?}",
                scattered.len()
            );
        }
    }
}
