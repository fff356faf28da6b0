//! `floe dedup` and `--auto-dedup`: once an incremental image exists, its
//! ancestors need keep only the pages it still points at. Everything else
//! in their pages.img is deallocated (a hole), so a chain takes little more
//! space than its newest image. Afterwards the ancestors can no longer be
//! restored on their own: their checksums would fail, and restore says so.
use super::{ImageChain, ImageError, PAGES_DATA_OFFSET};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// File left in each deduplicated ancestor, saying which image it now serves.
pub const MARKER: &str = "DEDUPLICATED";

/// Punches out of every ancestor of `dir` what the image in `dir` does not
/// reference. Returns the bytes of disk space freed.
pub fn dedup(dir: &Path) -> Result<u64, ImageError> {
    let chain = ImageChain::open(dir)?;
    let newest = chain.newest();
    let mut keep: Vec<Vec<(u64, u64)>> = vec![Vec::new(); chain.images.len()];
    for p in &newest.manifest.processes {
        for r in p.page_runs.iter().filter(|r| r.image != 0) {
            if let Some(k) = keep.get_mut(r.image as usize) {
                k.push((r.file_offset, r.file_offset + r.nr_pages * 4096));
            }
        }
    }
    let mut freed = 0u64;
    for (k, img) in chain.images.iter().enumerate().skip(1) {
        let path = &img.pages_path;
        let io = |source| ImageError::Io { path: path.clone(), what: "cannot deduplicate", source };
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let before = f.metadata().map_err(io)?.blocks();
        let mut ranges = std::mem::take(&mut keep[k]);
        ranges.sort_unstable();
        let mut cur = PAGES_DATA_OFFSET;
        let end = img.manifest.pages_file_size;
        let mut holes = Vec::new();
        for (s, e) in ranges {
            if s > cur {
                holes.push((cur, s));
            }
            cur = cur.max(e);
        }
        if cur < end {
            holes.push((cur, end));
        }
        for (s, e) in holes {
            crate::sys::task::punch_hole(&f, s, e - s).map_err(io)?;
        }
        f.sync_all().map_err(io)?;
        let note = format!(
            "pages that {} does not need were removed; restore or build on {} instead\n",
            newest.dir.display(),
            newest.dir.display()
        );
        std::fs::write(img.dir.join(MARKER), note).map_err(|source| ImageError::Io {
            path: img.dir.join(MARKER),
            what: "cannot mark the image as deduplicated",
            source,
        })?;
        let after = f.metadata().map_err(io)?.blocks();
        freed += before.saturating_sub(after) * 512;
    }
    Ok(freed)
}
