//! Cross-process memory access and page-table queries.
use super::cvt;
use std::io;
use std::os::fd::AsRawFd;

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

// PAGEMAP_SCAN (linux 6.7+).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

#[repr(C)]
#[derive(Debug, Default)]
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
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30) | ((96 as libc::c_ulong) << 16) | ((b'f' as libc::c_ulong) << 8) | 16;

/// Which pages a scan selects.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    pub flags: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// Runs PAGEMAP_SCAN over [start, end) and appends matching regions to `out`.
/// Loops until the kernel reports the whole range walked.
pub fn pagemap_scan(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    q: &ScanQuery,
    out: &mut Vec<PageRegion>,
) -> io::Result<()> {
    let mut buf = vec![PageRegion::default(); 4096];
    let mut cur = start;
    while cur < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: q.flags,
            start: cur,
            end,
            walk_end: 0,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            max_pages: 0,
            category_inverted: q.category_inverted,
            category_mask: q.category_mask,
            category_anyof_mask: q.category_anyof_mask,
            return_mask: q.return_mask,
        };
        // SAFETY: `arg` is a correctly sized pm_scan_arg whose `vec` points at `buf` (vec_len entries), both live across the call.
        let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut PmScanArg) };
        let n = cvt(r as libc::c_long)? as usize;
        out.extend_from_slice(&buf[..n.min(buf.len())]);
        if arg.walk_end <= cur {
            break;
        }
        cur = arg.walk_end;
    }
    Ok(())
}
