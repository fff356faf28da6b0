//! Cross-process memory access and page-table queries.
use super::cvt;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// A remote address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub addr: u64,
    pub len: u64,
}

/// Most iovecs one process_vm_* call takes (UIO_MAXIOV).
pub const MAX_IOV: usize = 1024;

/// Copies the remote ranges, in order, into `local` (whose length must equal
/// their sum). Returns the number of bytes copied, which may be short when a
/// remote range is partly unmapped.
pub fn read_remote(pid: i32, local: &mut [u8], remote: &[Range]) -> io::Result<usize> {
    transfer(pid, local.as_mut_ptr(), local.len(), remote, false)
}

/// Copies `local` into the remote ranges, in order.
pub fn write_remote(pid: i32, local: &[u8], remote: &[Range]) -> io::Result<usize> {
    // The pointer is only read from when `write` is true.
    transfer(pid, local.as_ptr().cast_mut(), local.len(), remote, true)
}

fn transfer(pid: i32, base: *mut u8, len: usize, remote: &[Range], write: bool) -> io::Result<usize> {
    let total: u64 = remote.iter().map(|r| r.len).sum();
    if total != len as u64 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "local and remote sizes differ"));
    }
    let mut done = 0usize;
    let mut idx = 0usize;
    let mut skip = 0u64; // bytes of remote[idx] already done
    while idx < remote.len() {
        let mut riov = Vec::with_capacity(MAX_IOV.min(remote.len() - idx));
        let mut chunk = 0usize;
        let mut j = idx;
        let mut first_skip = skip;
        while j < remote.len() && riov.len() < MAX_IOV {
            let r = remote[j];
            riov.push(libc::iovec {
                iov_base: (r.addr + first_skip) as *mut libc::c_void,
                iov_len: (r.len - first_skip) as usize,
            });
            chunk += (r.len - first_skip) as usize;
            first_skip = 0;
            j += 1;
        }
        let liov = libc::iovec {
            // SAFETY: `done + chunk <= len`, so the pointer stays inside the caller's buffer.
            iov_base: unsafe { base.add(done) }.cast(),
            iov_len: chunk,
        };
        let n = if write {
            // SAFETY: liov describes caller memory valid for `chunk` bytes; riov are remote addresses the kernel checks.
            unsafe { libc::process_vm_writev(pid, &liov, 1, riov.as_ptr(), riov.len() as libc::c_ulong, 0) }
        } else {
            // SAFETY: liov describes caller memory valid for writes of `chunk` bytes; riov are remote addresses.
            unsafe { libc::process_vm_readv(pid, &liov, 1, riov.as_ptr(), riov.len() as libc::c_ulong, 0) }
        };
        let n = cvt(n as libc::c_long)? as usize;
        done += n;
        if n == 0 {
            return Ok(done);
        }
        if n < chunk {
            // Advance through the remote list by n bytes and stop: the next range failed.
            let mut left = n as u64;
            while left > 0 {
                let avail = remote[idx].len - skip;
                if left >= avail {
                    left -= avail;
                    idx += 1;
                    skip = 0;
                } else {
                    skip += left;
                    left = 0;
                }
            }
            return Ok(done);
        }
        idx = j;
        skip = 0;
    }
    Ok(done)
}

// ---------------------------------------------------------------------------
// PAGEMAP_SCAN (linux 6.7+): the one wrapper of the ioctl, used by the dump
// (present pages), the uffd dirty tracker ([`crate::track`]) and `floe check`
// ([`crate::check`]).

/// `PAGE_IS_WPALLOWED` category of PAGEMAP_SCAN.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN`.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGE_IS_HUGE`.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// `PM_SCAN_WP_MATCHING`: write-protect the matching pages.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (EPERM) unless every VMA in the range is registered for async WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: one range of pages with the same categories.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PAGE_IS_*` bits, masked by the query's return mask.
    pub categories: u64,
}
const _: () = assert!(size_of::<PageRegion>() == 24);

/// `struct pm_scan_arg`.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
const _: () = assert!(size_of::<PmScanArg>() == 96);

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong =
    (3 << 30) | ((size_of::<PmScanArg>() as libc::c_ulong) << 16) | ((b'f' as libc::c_ulong) << 8) | 16;
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// Which pages a PAGEMAP_SCAN selects, what it reports of them and what it
/// does to them; the address range is passed separately.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all be set (after inversion).
    pub category_mask: u64,
    /// Categories of which at least one must be set.
    pub category_anyof_mask: u64,
    /// Categories reported in each region.
    pub return_mask: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
}

/// One PAGEMAP_SCAN ioctl over [start, end) (page aligned) of a pagemap file.
/// With `out` = None no regions are returned (only the write-protection of
/// `PM_SCAN_WP_MATCHING` happens). Returns the number of regions written into
/// `out` and the address where the walk stopped.
pub fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    q: &ScanQuery,
    out: Option<&mut [PageRegion]>,
) -> io::Result<(usize, u64)> {
    let (vec, vec_len) = match out {
        Some(buf) => (buf.as_mut_ptr() as u64, buf.len() as u64),
        None => (0, 0),
    };
    let mut arg = PmScanArg {
        size: size_of::<PmScanArg>() as u64,
        flags: q.flags,
        start,
        end,
        walk_end: 0,
        vec,
        vec_len,
        max_pages: q.max_pages,
        category_inverted: q.category_inverted,
        category_mask: q.category_mask,
        category_anyof_mask: q.category_anyof_mask,
        return_mask: q.return_mask,
    };
    // SAFETY: `arg` is a valid struct pm_scan_arg; vec/vec_len are either 0/0 or
    // describe `out`, a writable slice of page_region structs that outlives the call
    // and of which the kernel writes at most vec_len entries.
    let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut PmScanArg) };
    let n = cvt(r.into())? as usize;
    Ok((n.min(vec_len as usize), arg.walk_end))
}

/// Runs PAGEMAP_SCAN over [start, end) and appends matching regions to `out`.
/// Loops until the kernel reports the whole range walked.
pub fn pagemap_scan_all(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    q: &ScanQuery,
    out: &mut Vec<PageRegion>,
) -> io::Result<()> {
    let mut buf = vec![PageRegion::default(); 4096];
    let mut cur = start;
    while cur < end {
        let (n, walk_end) = pagemap_scan(pagemap.as_fd(), cur, end, q, Some(&mut buf))?;
        out.extend_from_slice(&buf[..n]);
        if walk_end <= cur {
            break;
        }
        cur = walk_end;
    }
    Ok(())
}
