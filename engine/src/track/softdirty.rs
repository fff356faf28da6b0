//! Soft-dirty tracker: `clear_refs` = 4 clears the soft-dirty bit of every
//! page of a process; a later write sets it again (pagemap bit 55). Needs
//! CONFIG_MEM_SOFT_DIRTY (check with [`super::Tracker::resolve`]); without it
//! the bit never gets set.
//!
//! Unlike uffd-wp, clearing needs no descriptor to keep: the state lives in
//! the process's page tables until the next clear. A new VMA is wholly
//! soft-dirty; only present or swapped pages are reported here (holes have
//! no contents to copy).
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{normalize, page_align, TrackError};
use crate::sys::track::PAGE_SIZE;

/// pagemap entry: page present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// pagemap entry: page swapped out (also uffd-wp markers, which never carry bit 55).
pub const PM_SWAPPED: u64 = 1 << 62;
/// pagemap entry: soft-dirty.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

/// pagemap entries read per pread (512 KiB).
const CHUNK_ENTRIES: u64 = 64 * 1024;

/// Clears the soft-dirty bits of every page of `pid` (writes "4" to
/// /proc/PID/clear_refs). Pages written afterwards show up in [`dirty`].
pub fn clear(pid: i32) -> Result<(), TrackError> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"4").map_err(|source| TrackError::Sys {
        pid,
        op: "writing 4 to /proc/PID/clear_refs",
        source,
    })
}

/// Present or swapped pages with the soft-dirty bit set inside `ranges`, as
/// sorted, merged, page-aligned `[start, end)` ranges.
pub fn dirty(pid: i32, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, TrackError> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(|source| TrackError::Sys {
        pid,
        op: "opening /proc/PID/pagemap",
        source,
    })?;
    let wanted = normalize(ranges.iter().map(|r| page_align(*r)).collect());
    let mut bytes = vec![0u8; (CHUNK_ENTRIES * 8) as usize];
    let mut entries = Vec::with_capacity(CHUNK_ENTRIES as usize);
    let mut out = Vec::new();
    for (start, end) in wanted {
        let mut addr = start;
        while addr < end {
            let n = ((end - addr) / PAGE_SIZE).min(CHUNK_ENTRIES);
            let buf = &mut bytes[..(n * 8) as usize];
            pagemap.read_exact_at(buf, addr / PAGE_SIZE * 8).map_err(|source| TrackError::Range {
                pid,
                op: "reading /proc/PID/pagemap",
                start: addr,
                end: addr + n * PAGE_SIZE,
                source,
            })?;
            entries.clear();
            entries.extend(
                buf.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
            );
            collect(addr, &entries, &mut out);
            addr += n * PAGE_SIZE;
        }
    }
    Ok(normalize(out))
}

/// Whether one pagemap entry is a soft-dirty page with contents.
pub fn entry_is_dirty(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0 && entry & PM_SOFT_DIRTY != 0
}

/// Appends the dirty pages of the consecutive pagemap `entries` starting at
/// address `start` to `out`, merging neighbours.
fn collect(start: u64, entries: &[u64], out: &mut Vec<(u64, u64)>) {
    for (i, &e) in entries.iter().enumerate() {
        if !entry_is_dirty(e) {
            continue;
        }
        let page = start + i as u64 * PAGE_SIZE;
        match out.last_mut() {
            Some((_, end)) if *end == page => *end = page + PAGE_SIZE,
            _ => out.push((page, page + PAGE_SIZE)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_softdirty_bits_are_parsed() {
        let pfn = 0x1234u64;
        let present_dirty = PM_PRESENT | PM_SOFT_DIRTY | pfn;
        let present_clean = PM_PRESENT | pfn;
        let swapped_dirty = PM_SWAPPED | PM_SOFT_DIRTY | 0x3f;
        let hole_dirty = PM_SOFT_DIRTY; // new VMA, never populated
        let uffd_marker = 0x4200_0000_0000_003f; // swapped + uffd-wp, not soft-dirty
        let entries =
            [present_dirty, present_dirty, present_clean, swapped_dirty, hole_dirty, uffd_marker, present_dirty];
        let base = 0x7f00_0000_0000;
        let mut out = Vec::new();
        collect(base, &entries, &mut out);
        let p = |i: u64| base + i * PAGE_SIZE;
        assert_eq!(out, vec![(p(0), p(2)), (p(3), p(4)), (p(6), p(7))]);
        // a second chunk continuing right after merges with the last range
        collect(p(7), &[present_dirty, 0], &mut out);
        assert_eq!(out.last(), Some(&(p(6), p(8))));
        assert!(!entry_is_dirty(0));
        assert!(!entry_is_dirty(uffd_marker));
    }

    #[test]
    fn track_softdirty_unavailable_on_this_kernel_gives_clear_error() {
        // CONFIG_MEM_SOFT_DIRTY is off on the development kernel (kernel-notes).
        let enabled = std::fs::read_to_string("/proc/self/smaps").map(|s| s.contains("sd ")).unwrap_or(false);
        match super::super::Tracker::resolve("soft-dirty") {
            Ok(t) => assert!(enabled, "soft-dirty resolved ({t:?}) although VmFlags never show sd"),
            Err(e) => {
                let text = e.to_string();
                eprintln!("{text}");
                assert!(text.contains("soft-dirty") && text.contains("CONFIG_MEM_SOFT_DIRTY"), "{text}");
            }
        }
    }
}
