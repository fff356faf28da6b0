//! uffd-wp (async) + PAGEMAP_SCAN tracker of another process.
//!
//! The userfaultfd is created inside the target by an injected syscall (the
//! kernel ties it to the creator's mm), taken with pidfd_getfd, and closed
//! again in the target. From then on floe drives it from outside: the ioctls
//! act on the mm the uffd was created in, whoever issues them. Writes to
//! write-protected pages are resolved by the kernel itself (WP_ASYNC): the
//! target never blocks, it pays about 1.2 µs on the first write to each page
//! after a scan.
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use super::{normalize, page_align, scan_written, split_covered, subtract, write_protect, TrackError};
use crate::inject::Injector;
use crate::sys::memory::PageRegion;
use crate::sys::task::{pidfd_getfd, pidfd_open};
use crate::sys::track as sys;

/// Output vector size of one PAGEMAP_SCAN call (regions).
const SCAN_VEC: usize = 4096;

/// Starts uffd-wp tracking of process `pid`.
///
/// `pid` must be ptrace-stopped with `inj` driving one of its threads (its
/// main thread). Steps: inject `userfaultfd(O_CLOEXEC|O_NONBLOCK|
/// UFFD_USER_MODE_ONLY)`, take it with pidfd_getfd, close it in the target,
/// UFFDIO_API with WP_ASYNC|WP_UNPOPULATED, UFFDIO_REGISTER(MODE_WP) each
/// range of `ranges` (rounded out to pages). Call [`UffdTracker::protect`]
/// next (it needs no stop): it write-protects every registered page once, so
/// that the next [`UffdTracker::dirty`] reports only pages written from then
/// on. [`uffd_start`] does both.
///
/// Ranges the kernel refuses are skipped (see [`UffdTracker::register`]);
/// [`UffdTracker::ranges`] tells which were registered. Pass one range per
/// VMA: a range spanning a refused VMA is refused whole.
///
/// Cost: with WP_UNPOPULATED the kernel also marks holes, which allocates
/// page tables for the whole registered span (about 2 MiB per GiB of
/// address space), so leave out large PROT_NONE reservations.
///
/// Fails with [`TrackError::HolderRunning`] when a [`super::holder`] already
/// tracks `pid`: its registration would make every range busy; fetch it instead.
pub fn uffd_start_unprotected(pid: i32, inj: &mut Injector, ranges: &[(u64, u64)]) -> Result<UffdTracker, TrackError> {
    if super::holder::running(pid) {
        return Err(TrackError::HolderRunning { pid });
    }
    let remote = inj
        .call(libc::SYS_userfaultfd, [sys::UFFD_FLAGS as u64, 0, 0, 0, 0, 0])
        .map_err(|source| TrackError::Inject { pid, what: "userfaultfd", source })?;
    let taken = pidfd_open(pid).map_err(|source| TrackError::Sys { pid, op: "pidfd_open", source }).and_then(|pidfd| {
        pidfd_getfd(&pidfd, remote as i32).map_err(|source| TrackError::Sys {
            pid,
            op: "pidfd_getfd of the injected userfaultfd",
            source,
        })
    });
    // Close the target's copy whatever happened: the target keeps nothing.
    let closed = inj.call(libc::SYS_close, [remote, 0, 0, 0, 0, 0]).map_err(|source| TrackError::Inject {
        pid,
        what: "close of the userfaultfd",
        source,
    });
    let fd = taken?;
    closed?;

    let want = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
    let got = sys::uffd_api(fd.as_fd(), want).map_err(|source| match source.raw_os_error() {
        Some(libc::EINVAL) => TrackError::Unsupported {
            tracker: "uffd",
            reason: "the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (linux 6.7+)".to_string(),
        },
        _ => TrackError::Sys { pid, op: "UFFDIO_API", source },
    })?;
    if got & want != want {
        return Err(TrackError::Unsupported {
            tracker: "uffd",
            reason: format!("the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (features {got:#x})"),
        });
    }

    let mut tracker = UffdTracker { fd, ranges: Vec::new(), unprotected: Vec::new() };
    tracker.unprotected = tracker.register_ranges(ranges)?;
    tracing::debug!(pid, ranges = tracker.ranges.len(), "uffd-wp tracking registered");
    Ok(tracker)
}

/// [`uffd_start_unprotected`], then [`UffdTracker::protect`]: tracking in force on return.
pub fn uffd_start(pid: i32, inj: &mut Injector, ranges: &[(u64, u64)]) -> Result<UffdTracker, TrackError> {
    let mut t = uffd_start_unprotected(pid, inj, ranges)?;
    t.protect(pid)?;
    Ok(t)
}

fn open_pagemap(pid: i32) -> Result<File, TrackError> {
    File::open(format!("/proc/{pid}/pagemap")).map_err(|source| TrackError::Sys {
        pid,
        op: "opening /proc/PID/pagemap",
        source,
    })
}

/// A live uffd-wp registration on another process's memory. Dropping it
/// closes the uffd; once no other copy (e.g. a holder's) is open, the kernel
/// removes the registration and the write protection from the process.
#[derive(Debug)]
pub struct UffdTracker {
    fd: OwnedFd,
    /// Registered ranges, sorted and merged.
    ranges: Vec<(u64, u64)>,
    /// Ranges registered by [`uffd_start_unprotected`] and not write-protected yet.
    unprotected: Vec<(u64, u64)>,
}

impl UffdTracker {
    /// Write-protects what [`uffd_start_unprotected`] registered (1 GiB: ~8 ms of
    /// PAGEMAP_SCAN), so that from now on a write marks its page. Needs no stop: call it
    /// after the process runs again, before any of its pages is read. A page written
    /// before its protection is then in what is read, one written after it is reported
    /// by the next [`dirty`](Self::dirty).
    pub fn protect(&mut self, pid: i32) -> Result<(), TrackError> {
        if self.unprotected.is_empty() {
            return Ok(());
        }
        let pagemap = open_pagemap(pid)?;
        for (start, end) in std::mem::take(&mut self.unprotected) {
            write_protect(pagemap.as_fd(), start, end).map_err(|source| TrackError::Range {
                pid,
                op: "write-protecting (PAGEMAP_SCAN)",
                start,
                end,
                source,
            })?;
        }
        tracing::debug!(pid, ranges = self.ranges.len(), "uffd-wp tracking started");
        Ok(())
    }

    /// Pages written since the previous scan (or since [`uffd_start`]), as
    /// sorted, merged, page-aligned `[start, end)` ranges, and re-protects them.
    ///
    /// Each range of `ranges` is split into its registered and unregistered
    /// parts. Registered parts are scanned (PM_SCAN_WP_MATCHING |
    /// PM_SCAN_CHECK_WPASYNC, category PAGE_IS_WRITTEN, looping until the walk
    /// reaches the end). Unregistered parts (new mappings) are returned whole.
    /// A registered part that the kernel no longer sees as registered (EPERM:
    /// it was unmapped and something else mapped there) is returned whole and
    /// forgotten, so that [`untracked`](Self::untracked) lists it again.
    ///
    /// Notes for the caller:
    /// * A freshly registered range (see [`register`](Self::register)) is
    ///   reported whole by its first scan, holes included.
    /// * Returned ranges may contain holes (pages never populated): read only
    ///   the present pages. Pages dropped with MADV_DONTNEED or munmap are not
    ///   writes and are never reported: track the present-page set separately.
    /// * Registered ranges not mentioned in `ranges` are not scanned, so their
    ///   writes stay pending for a later call.
    pub fn dirty(&mut self, pid: i32, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, TrackError> {
        let pagemap = open_pagemap(pid)?;
        let wanted = normalize(ranges.iter().map(|r| page_align(*r)).collect());
        let mut buf = vec![PageRegion::default(); SCAN_VEC];
        let mut out = Vec::new();
        let mut lost = Vec::new();
        for range in wanted {
            let (covered, uncovered) = split_covered(range, &self.ranges);
            out.extend(uncovered);
            for (start, end) in covered {
                match scan_written(pagemap.as_fd(), start, end, &mut buf) {
                    Ok(found) => out.extend(found),
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        tracing::debug!(pid, start, end, "range no longer registered; reported whole");
                        out.push((start, end));
                        lost.push((start, end));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                        return Err(TrackError::NoProgress { pid, start, end, at: start });
                    }
                    Err(source) => {
                        return Err(TrackError::Range { pid, op: "PAGEMAP_SCAN", start, end, source });
                    }
                }
            }
        }
        for r in lost {
            subtract(&mut self.ranges, r);
        }
        Ok(normalize(out))
    }

    /// Registers additional ranges (new mappings) for write-protect tracking.
    ///
    /// Neither a stopped process nor an injector is needed: UFFDIO_REGISTER
    /// acts on the mm the uffd was created in, from any process (the kernel
    /// takes that mm's mmap lock). The new pages are not write-protected here:
    /// the kernel counts never-protected pages (holes included) as written, so
    /// the next [`dirty`](Self::dirty) reports each new range whole and
    /// protects it in the same step. Register new mappings *before* that
    /// `dirty` call and copy what it returns; nothing written in between is lost.
    ///
    /// Ranges the kernel refuses are skipped: EINVAL (special mappings such as
    /// [vdso], [vvar], [vsyscall]; VM_DROPPABLE), EBUSY (already registered
    /// with another userfaultfd, e.g. the process's own), ENOMEM (no longer
    /// mapped). Other errors fail the call.
    pub fn register(&mut self, ranges: &[(u64, u64)]) -> Result<(), TrackError> {
        self.register_ranges(ranges).map(drop)
    }

    /// Registers `ranges`; returns the ones accepted.
    fn register_ranges(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, TrackError> {
        let mut added = Vec::new();
        for &r in ranges {
            let (start, end) = page_align(r);
            if start >= end {
                continue;
            }
            match sys::uffd_register_wp(self.fd.as_fd(), start, end - start) {
                Ok(()) => added.push((start, end)),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EBUSY | libc::ENOMEM)) => {
                    tracing::debug!(start, end, error = %e, "range not registered for uffd-wp");
                }
                Err(source) => return Err(TrackError::Register { start, end, source }),
            }
        }
        let mut all = std::mem::take(&mut self.ranges);
        all.extend_from_slice(&added);
        self.ranges = normalize(all);
        Ok(added)
    }

    /// The registered ranges, sorted and merged.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// The parts of `ranges` that are not registered (candidates for
    /// [`register`](Self::register)), page aligned, in address order.
    pub fn untracked(&self, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let wanted = normalize(ranges.iter().map(|r| page_align(*r)).collect());
        wanted.into_iter().flat_map(|r| split_covered(r, &self.ranges).1).collect()
    }

    /// The uffd descriptor (the registered ranges are lost; keep them with
    /// [`ranges`](Self::ranges) for [`from_fd`](Self::from_fd)).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Rebuilds a tracker from a uffd descriptor whose API handshake is done
    /// and the ranges registered with it.
    pub fn from_fd(fd: OwnedFd, ranges: Vec<(u64, u64)>) -> Self {
        UffdTracker { fd, ranges: normalize(ranges), unprotected: Vec::new() }
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
