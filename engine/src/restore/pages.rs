//! Stage b driver: streams page runs from pages.img into the stub.
//!
//! A reader thread reads batches of runs and verifies each run's blake3
//! while this thread copies the previous batch into the stub, so checksum
//! cost overlaps with the page faults of the copy.
use super::{RestoreError, Tree};
use crate::image::{ImageChain, ImageError};
use crate::sys::memory::{Range, MAX_IOV};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

const BATCH: u64 = 16 << 20;
const BUFFERS: usize = 3;

struct Batch {
    pid: i32,
    buf: Vec<u8>,
    len: usize,
    ranges: Vec<Range>,
}

/// Copies every page of the image into the stub, verifying checksums.
/// Returns the number of bytes written.
pub fn load_pages(chain: &ImageChain, tree: &mut Tree) -> Result<u64, RestoreError> {
    load_pages_where(chain, tree, |_, _| true)
}

/// Like [`load_pages`], for the runs `keep(pid, run)` selects.
pub fn load_pages_where(
    chain: &ImageChain,
    tree: &mut Tree,
    keep: impl Fn(i32, &floe_proto::image::PageRun) -> bool,
) -> Result<u64, RestoreError> {
    load_pages_checked(chain, tree, keep, true)
}

/// [`load_pages`] of an image whose pages.img the caller verified as a whole
/// already (a migration's final image, checked against the blake3 its
/// source sent): the runs' checksums are not computed a second time.
pub fn load_pages_preverified(chain: &ImageChain, tree: &mut Tree) -> Result<u64, RestoreError> {
    load_pages_checked(chain, tree, |_, _| true, false)
}

fn load_pages_checked(
    chain: &ImageChain,
    tree: &mut Tree,
    keep: impl Fn(i32, &floe_proto::image::PageRun) -> bool,
    verify: bool,
) -> Result<u64, RestoreError> {
    // (pid, run) in file order; runs of one process are contiguous.
    let img = chain.newest();
    let runs: Vec<(i32, &floe_proto::image::PageRun)> = img
        .manifest
        .processes
        .iter()
        .flat_map(|p| p.page_runs.iter().map(move |r| (p.pid, r)))
        .filter(|(pid, r)| keep(*pid, r))
        .collect();
    let runs = &runs;
    let (tx, rx) = mpsc::sync_channel::<Result<Batch, ImageError>>(BUFFERS - 1);
    let (ret_tx, ret_rx) = mpsc::channel::<Vec<u8>>();
    let mut written = 0u64;
    std::thread::scope(|s| -> Result<(), RestoreError> {
        // Owned by this closure so an early error return unblocks the reader.
        let ret_tx = ret_tx;
        s.spawn(move || {
            let mut i = 0usize;
            let mut allocated = 0usize;
            while i < runs.len() {
                // Runs laid out back to back in the file are read in one pread.
                let start = runs[i].1.file_offset;
                let pid = runs[i].0;
                let image = runs[i].1.image;
                let Some((file, path)) = chain.pages_of(0, runs[i].1) else {
                    let _ = tx.send(Err(ImageError::Invalid {
                        path: img.dir.clone(),
                        what: format!("page run at {:#x} points at a missing parent image", runs[i].1.vaddr),
                    }));
                    return;
                };
                let path = path.to_path_buf();
                let mut j = i;
                let mut len = 0u64;
                while j < runs.len()
                    && runs[j].0 == pid
                    && runs[j].1.image == image
                    && runs[j].1.file_offset == start + len
                    && (j == i || len + runs[j].1.nr_pages * 4096 <= BATCH)
                    && j - i < MAX_IOV
                {
                    len += runs[j].1.nr_pages * 4096;
                    j += 1;
                }
                let mut buf = match ret_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) if allocated < BUFFERS => {
                        allocated += 1;
                        vec![0u8; BATCH.max(len) as usize]
                    }
                    Err(_) => match ret_rx.recv() {
                        Ok(b) => b,
                        Err(_) => return,
                    },
                };
                if (buf.len() as u64) < len {
                    buf.resize(len as usize, 0);
                }
                let res = file.read_exact_at(&mut buf[..len as usize], start).map_err(|source| ImageError::Io {
                    path: path.clone(),
                    what: "cannot read page data (file truncated?)",
                    source,
                });
                let res = res.and_then(|()| {
                    let mut o = 0usize;
                    let mut ranges = Vec::with_capacity(j - i);
                    for (_, r) in &runs[i..j] {
                        let n = (r.nr_pages * 4096) as usize;
                        let ok = if !verify {
                            true
                        } else if let Some(hashes) = chain.run_page_hashes(0, r) {
                            buf[o..o + n]
                                .chunks_exact(4096)
                                .zip(hashes.chunks_exact(16))
                                .all(|(page, h)| blake3::hash(page).as_bytes()[..16] == *h)
                        } else {
                            r.image == 0 && blake3::hash(&buf[o..o + n]).as_bytes()[..] == r.blake3[..]
                        };
                        if !ok {
                            return Err(ImageError::Checksum {
                                path: path.clone(),
                                what: format!(
                                    "pages at {:#x} (+{} pages, file offset {})",
                                    r.vaddr, r.nr_pages, r.file_offset
                                ),
                            });
                        }
                        ranges.push(Range { addr: r.vaddr, len: n as u64 });
                        o += n;
                    }
                    Ok(ranges)
                });
                let failed = res.is_err();
                let msg = res.map(|ranges| Batch { pid, buf, len: len as usize, ranges });
                if tx.send(msg).is_err() || failed {
                    return;
                }
                i = j;
            }
        });
        let (mut wait, mut write, mut t) = (0f64, 0f64, std::time::Instant::now());
        for msg in rx {
            let b = msg?;
            wait += t.elapsed().as_secs_f64() * 1000.0;
            t = std::time::Instant::now();
            tree.write_pages(b.pid, &b.buf[..b.len], &b.ranges)?;
            write += t.elapsed().as_secs_f64() * 1000.0;
            written += b.len as u64;
            let _ = ret_tx.send(b.buf);
            t = std::time::Instant::now();
        }
        tracing::debug!(wait_ms = wait, write_ms = write, bytes = written, "pages loaded");
        Ok(())
    })?;
    Ok(written)
}
