//! Mappings and page contents.
//!
//! Only pages that hold data are saved: present or swapped anonymous pages,
//! and the privately modified (copy-on-write) pages of private file
//! mappings. Holes are never faulted in and the shared zero page is skipped.
use super::{proc_err, DumpError};
use crate::procfs::{self, MapEntry};
use crate::sys::memory::{self as mem, PageRegion, Range, ScanQuery};
use floe_proto::image as pb;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc;

pub const PAGE: u64 = 4096;
/// Largest run of pages checksummed as one unit.
const RUN_PAGES: u64 = 512;
/// Bytes copied per process_vm_readv batch (and largest stream chunk).
pub const BATCH: usize = 16 << 20;
/// Largest stream chunk (live migration): small enough that a chunk stays
/// in the CPU caches from the copy out of the process through the zero-page
/// check, the checksum and the copy into the transport.
pub const STREAM_BATCH: usize = 2 << 20;
const BUFFERS: usize = 3;

pub struct VdsoInfo {
    pub vdso_start: u64,
    pub vdso_end: u64,
    pub pb: pb::VdsoBlock,
}

pub fn is_vdso_part(name: &str) -> bool {
    matches!(name, "[vvar]" | "[vvar_vclock]" | "[vdso]")
}

/// Finds the [vvar]/[vvar_vclock]/[vdso] block and fingerprints the vdso code.
pub fn vdso_block(pid: i32, maps: &[MapEntry]) -> Result<VdsoInfo, DumpError> {
    let parts: Vec<&MapEntry> = maps.iter().filter(|m| is_vdso_part(&m.path)).collect();
    let vdso = parts.iter().find(|m| m.path == "[vdso]").ok_or_else(|| DumpError::Refused {
        pid,
        what: "it has no [vdso] mapping, which this version needs to drive it".into(),
    })?;
    for w in parts.windows(2) {
        if w[0].end != w[1].start {
            return Err(DumpError::Refused {
                pid,
                what: "its vvar/vdso mappings are not contiguous (moved by the program)".into(),
            });
        }
    }
    let mut code = vec![0u8; vdso.len() as usize];
    let n = mem::read_remote(pid, &mut code, &[Range { addr: vdso.start, len: vdso.len() }])
        .map_err(|source| DumpError::Memory { pid, addr: vdso.start, source })?;
    code.truncate(n);
    let first = parts.first().map(|m| m.start).unwrap_or(vdso.start);
    let last = parts.last().map(|m| m.end).unwrap_or(vdso.end);
    Ok(VdsoInfo {
        vdso_start: vdso.start,
        vdso_end: vdso.end,
        pb: pb::VdsoBlock {
            start: first,
            end: last,
            parts: parts
                .iter()
                .map(|m| pb::Vma {
                    start: m.start,
                    end: m.end,
                    prot: m.prot(),
                    name: m.path.clone(),
                    ..Default::default()
                })
                .collect(),
            vdso_blake3: blake3::hash(&code).as_bytes().to_vec(),
        },
    })
}

/// A mapping to save, with the page query that selects its data pages.
pub struct VmaPlan {
    pub pb: pb::Vma,
    pub scan: Option<ScanQuery>,
    pub readable: bool,
}

const ADVICE: [&str; 7] = ["hg", "nh", "dd", "dc", "wf", "mg", "lo"];

/// Object offsets (in pages) of shared memory objects whose pages are
/// already saved through an earlier mapping, by shmem inode.
pub type ShmemCoverage = std::collections::HashMap<u64, Vec<(u64, u64)>>;

pub fn classify(pid: i32, maps: &[MapEntry], covered: &mut ShmemCoverage) -> Result<Vec<VmaPlan>, DumpError> {
    let mut out = Vec::new();
    for m in maps {
        if m.path == "[vsyscall]" || is_vdso_part(&m.path) {
            continue;
        }
        let refuse = |what: String| DumpError::Refused {
            pid,
            what: format!("mapping {:#x}-{:#x} {}: {what}", m.start, m.end, m.path),
        };
        if m.has_flag("ht") {
            return Err(refuse("hugetlbfs mappings are not supported yet".into()));
        }
        if m.has_flag("io") || m.has_flag("pf") {
            return Err(refuse("device (I/O) mappings cannot be checkpointed".into()));
        }
        let present_any = mem::PAGE_IS_PRESENT | mem::PAGE_IS_SWAPPED;
        let ret = mem::PAGE_IS_PRESENT | mem::PAGE_IS_SWAPPED | mem::PAGE_IS_PFNZERO;
        // PAGE_IS_FILE is left out where it does not matter: asking for it
        // makes the kernel look up every page's struct page (vm_normal_page),
        // about 15 ms per GiB, where the other categories are PTE bits.
        let anon_private = ScanQuery {
            category_inverted: mem::PAGE_IS_PFNZERO,
            category_mask: mem::PAGE_IS_PFNZERO,
            category_anyof_mask: present_any,
            return_mask: ret,
            flags: 0,
            max_pages: 0,
        };
        let file_private = ScanQuery {
            category_inverted: mem::PAGE_IS_PFNZERO | mem::PAGE_IS_FILE,
            category_mask: mem::PAGE_IS_PFNZERO | mem::PAGE_IS_FILE,
            return_mask: ret | mem::PAGE_IS_FILE,
            ..anon_private
        };
        let shared = ScanQuery { category_inverted: 0, category_mask: 0, ..anon_private };
        let mut v = pb::Vma {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            growsdown: m.has_flag("gd"),
            advice: m.vmflags.iter().filter(|f| ADVICE.contains(&f.as_str())).cloned().collect(),
            deleted_blob: -1,
            ..Default::default()
        };
        let anon_like = m.path.is_empty() || m.path.starts_with("[anon:") || m.path == "[heap]" || m.path == "[stack]";
        let scan;
        if anon_like {
            if m.shared {
                return Err(refuse("unnamed shared mapping of unknown kind".into()));
            }
            v.kind = pb::VmaKind::AnonPrivate as i32;
            v.name = m.path.clone();
            scan = Some(anon_private);
        } else if m.shared
            && (m.path == "/dev/zero (deleted)"
                || m.path.starts_with("[anon_shmem:")
                || m.path.starts_with("/memfd:")
                || m.path.starts_with("/SYSV"))
        {
            v.kind = pb::VmaKind::AnonShared as i32;
            v.name = m.path.clone();
            v.sysv = m.path.starts_with("/SYSV");
            let mf = procfs::path(pid, &format!("map_files/{:x}-{:x}", m.start, m.end));
            let meta = std::fs::metadata(&mf).map_err(proc_err(pid, "map_files"))?;
            v.shmem_id = meta.ino();
            v.shmem_size = meta.size();
            if let Some(name) = m.path.strip_prefix("/memfd:") {
                v.memfd_name = name.strip_suffix(" (deleted)").unwrap_or(name).to_string();
            }
            // Save the object's pages once: skip a mapping whose range an earlier one covered.
            let (first, last) = (m.offset / PAGE, m.offset / PAGE + m.len() / PAGE);
            let ranges = covered.entry(v.shmem_id).or_default();
            let done = ranges.iter().any(|(a, b)| *a <= first && last <= *b);
            if !done {
                ranges.push((first, last));
            }
            v.pgoff = m.offset;
            scan = if done { None } else { Some(shared) };
        } else if m.path.starts_with('/') {
            let deleted = m.path.strip_suffix(" (deleted)");
            if deleted.is_some() && m.path.starts_with("/SYSV") {
                return Err(refuse("private attachments of System V shared memory are not supported".into()));
            }

            let mf = procfs::path(pid, &format!("map_files/{:x}-{:x}", m.start, m.end));
            let meta = std::fs::metadata(&mf).map_err(proc_err(pid, "map_files"))?;
            if !meta.file_type().is_file() {
                return Err(refuse("only regular files can be mapped by a restorable process".into()));
            }
            match deleted {
                // Its contents are saved with the rest of the state
                // (collect_process). A memfd mapped privately is saved the
                // same way and comes back as a memfd of its name.
                Some(orig) if meta.nlink() == 0 => {
                    v.path = orig.to_string();
                    v.deleted = true;
                    if let Some(name) = orig.strip_prefix("/memfd:") {
                        v.memfd_name = name.to_string();
                        v.shmem_id = meta.ino();
                    }
                }
                Some(_) => {
                    return Err(refuse(
                        "the file was unlinked from this path but other links to it remain; floe cannot tell \
                         which path to restore it at"
                            .into(),
                    ))
                }
                None => {
                    match std::fs::metadata(&m.path) {
                        Ok(p) if p.dev() == meta.dev() && p.ino() == meta.ino() => {}
                        Ok(_) => return Err(refuse("the file at this path was replaced after it was mapped".into())),
                        Err(e) => return Err(refuse(format!("the mapped file cannot be reached from floe ({e})"))),
                    }
                    v.path = m.path.clone();
                }
            }
            v.pgoff = m.offset;
            v.file = Some(super::files::file_id(&meta));
            if m.shared {
                v.kind = pb::VmaKind::FileShared as i32;
                scan = None;
            } else {
                v.kind = pb::VmaKind::FilePrivate as i32;
                scan = Some(file_private);
            }
        } else {
            return Err(refuse("special mapping is not supported".into()));
        }
        out.push(VmaPlan { pb: v, scan, readable: m.read });
    }
    Ok(out)
}

pub struct PagesOut {
    pub blobs: Vec<pb::Blob>,
    pub file_size: u64,
    pub page_bytes: u64,
    /// pages.img (None in stream mode).
    pub file: Option<File>,
}

struct RunPlan {
    vaddr: u64,
    len: u64,
    readable: bool,
}

/// Finds each mapping's data pages.
fn plan_runs(pid: i32, vmas: &[VmaPlan]) -> Result<Vec<RunPlan>, DumpError> {
    let pm_path = procfs::path(pid, "pagemap");
    let pagemap = File::open(&pm_path).map_err(proc_err(pid, "pagemap"))?;
    let mut runs = Vec::new();
    let mut regions: Vec<PageRegion> = Vec::new();
    for v in vmas {
        let Some(q) = v.scan else { continue };
        regions.clear();
        match mem::pagemap_scan_all(&pagemap, v.pb.start, v.pb.end, &q, &mut regions) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                classic_scan(pid, &pagemap, v, &mut regions)?;
            }
            Err(source) => return Err(DumpError::Proc { pid, path: "pagemap (PAGEMAP_SCAN)".into(), source }),
        }
        let regions = drop_wp_markers(&pagemap, std::mem::take(&mut regions));
        for r in &regions {
            let mut a = r.start.max(v.pb.start);
            let end = r.end.min(v.pb.end);
            while a < end {
                let len = (end - a).min(RUN_PAGES * PAGE);
                runs.push(RunPlan { vaddr: a, len, readable: v.readable });
                a += len;
            }
        }
    }
    Ok(runs)
}

/// PAGEMAP_SCAN reports the uffd-wp markers a write-protected hole gets as
/// "swapped". The classic pagemap tells them apart from real swap entries
/// (swap type 0x1f is reserved for such special entries): holes are not
/// data and must not be read (that would fill them in).
fn drop_wp_markers(pagemap: &File, regions: Vec<PageRegion>) -> Vec<PageRegion> {
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        if r.categories & mem::PAGE_IS_PRESENT != 0 || r.categories & mem::PAGE_IS_SWAPPED == 0 {
            out.push(r);
            continue;
        }
        let pages = (r.end - r.start) / PAGE;
        let mut buf = vec![0u8; (pages * 8) as usize];
        if pagemap.read_exact_at(&mut buf, r.start / PAGE * 8).is_err() {
            out.push(r);
            continue;
        }
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(e);
            let e = u64::from_le_bytes(a);
            let real_swap = e & (1 << 62) != 0 && e & 0x1f != 0x1f;
            if real_swap {
                let s = r.start + i as u64 * PAGE;
                match out.last_mut() {
                    Some(l) if l.end == s && l.categories == r.categories => l.end += PAGE,
                    _ => out.push(PageRegion { start: s, end: s + PAGE, categories: r.categories }),
                }
            }
        }
    }
    out
}

/// Pre-6.7 kernels: read 8 bytes per page from /proc/PID/pagemap.
fn classic_scan(pid: i32, pagemap: &File, v: &VmaPlan, out: &mut Vec<PageRegion>) -> Result<(), DumpError> {
    let private_file = v.pb.kind == pb::VmaKind::FilePrivate as i32;
    let pages = (v.pb.end - v.pb.start) / PAGE;
    let mut buf = vec![0u8; (pages * 8) as usize];
    pagemap.read_exact_at(&mut buf, v.pb.start / PAGE * 8).map_err(|source| DumpError::Proc {
        pid,
        path: "pagemap".into(),
        source,
    })?;
    for (i, e) in buf.chunks_exact(8).enumerate() {
        let mut a = [0u8; 8];
        a.copy_from_slice(e);
        let e = u64::from_le_bytes(a);
        // Swap type 0x1f: a uffd-wp marker on a hole, not swapped data.
        let present = e & (1 << 63) != 0 || (e & (1 << 62) != 0 && e & 0x1f != 0x1f);
        let file_page = e & (1 << 61) != 0;
        if present && !(private_file && file_page) {
            let s = v.pb.start + i as u64 * PAGE;
            match out.last_mut() {
                Some(l) if l.end == s => l.end += PAGE,
                _ => out.push(PageRegion { start: s, end: s + PAGE, categories: 0 }),
            }
        }
    }
    Ok(())
}

/// What goes to the writer thread: page data (the buffer, the bytes of it
/// used, their offset in pages.img, and in stream mode the process and the
/// runs describing them), a buffer to give back, or a stream announcement.
#[allow(clippy::large_enum_variant)] // one per 16 MiB batch
enum Chunk {
    Data { buf: Vec<u8>, len: usize, offset: u64, pid: i32, runs: Vec<pb::PageRun> },
    Recycle(Vec<u8>),
    Announce(StreamItem),
}

/// Page data of one batch, in stream mode (live migration): `runs` are
/// this image's runs (`image` 0; `page_hashes` only when the sink hashes pages) whose `file_offset`s
/// count from the start of `data[..len]`.
pub struct PageChunk {
    pub pid: i32,
    pub runs: Vec<pb::PageRun>,
    pub data: Vec<u8>,
    pub len: usize,
    /// Hands `data` back to the sink for reuse once consumed (optional).
    pub recycle: Recycler,
}

/// What a stream-mode sink hands on, in order.
#[allow(clippy::large_enum_variant)] // a few per pass
pub enum StreamItem {
    /// The tree's whole state without page data (first pass, before any page).
    State(Box<pb::Manifest>),
    /// A process's mappings, before its pages (later passes).
    Layout(pb::Process),
    Pages(PageChunk),
}

/// Where a stream-mode sink's items go; called on the sink's writer
/// thread, so a slow consumer holds back the page copy. Buffers can be
/// handed back through [`PageChunk::recycle`] to spare allocations.
pub type ChunkConsumer = Box<dyn FnMut(StreamItem) -> std::io::Result<()> + Send>;
/// Returns spent [`PageChunk::data`] buffers to the sink.
pub type Recycler = mpsc::Sender<Vec<u8>>;

/// Keys of `Incremental::by_hash` are blake3 prefixes, already uniformly
/// distributed: their first eight bytes serve as the hash (hashing them
/// again with SipHash costs more than the whole lookup).
#[derive(Default, Clone, Copy)]
pub struct HashKeyBuild;

#[derive(Default)]
pub struct HashKey(u64);

impl std::hash::Hasher for HashKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= (*b as u64) << (8 * i);
        }
    }
}

impl std::hash::BuildHasher for HashKeyBuild {
    type Hasher = HashKey;

    fn build_hasher(&self) -> HashKey {
        HashKey(0)
    }
}

/// Streams page data into pages.img: the caller's thread reads and
/// checksums, a writer thread writes. One sink serves every process of a
/// dump, so the pages of all of them land in one file.
pub struct PageSink {
    tx: Option<mpsc::SyncSender<Chunk>>,
    ret_rx: mpsc::Receiver<Vec<u8>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<Option<File>>>>,
    path: std::path::PathBuf,
    offset: u64,
    allocated: usize,
    page_bytes: u64,
    /// Detect pages a child still shares copy-on-write with its parent (same
    /// physical frame at the same address) and store them once.
    share_cow: bool,
    /// Per-page checksums and deduplication (incremental images, pre-dumps,
    /// --track-mem): set with [`PageSink::incremental`].
    inc: Option<Incremental>,
    /// Pre-dump: the processes run while pages are copied; a batch that can
    /// no longer be read (unmapped meanwhile) is skipped, not an error.
    tolerate_races: bool,
    /// Runs stored so far, by (vaddr, pages): their frames, offset and checksum.
    stored: std::collections::HashMap<(u64, u64), Vec<StoredRun>>,
    /// Stream mode: batches go to a consumer, not to pages.img.
    stream: bool,
    /// Identical pages stored once (off in stream mode: the consumer cannot
    /// point back at data it already passed on).
    content_dedup: bool,
    /// Hash every page (off in stream mode when nothing compares pages: the
    /// stream's consumer checksums whole batches, which is several times
    /// cheaper than 4 KiB at a time). Without it, `page_hashes` hold
    /// [`ZERO_MARK`] for zero pages and 0xff.. for the others.
    hash_pages: bool,
}

/// A stored run's physical frames, file offset, checksum and process.
type StoredRun = (Vec<u64>, u64, Vec<u8>, i32);

/// Where a page's bytes are: image (0 = the one being written, k = k-th
/// ancestor), file offset, and its 16-byte blake3 prefix.
#[derive(Debug, Clone, Copy)]
pub struct PageLoc {
    pub image: u32,
    pub offset: u64,
    pub hash: [u8; 16],
}

/// Pages known from the parent chain and from this image so far.
#[derive(Default)]
pub struct Incremental {
    /// The newest parent's runs per pid, sorted by address, with `image`
    /// already relative to the image being written: they describe every page
    /// the parent had.
    pub runs: std::collections::HashMap<i32, Vec<pb::PageRun>>,
    /// (pid, page address) -> the page at that address in the newest parent that has it.
    pub by_addr: std::collections::HashMap<(i32, u64), PageLoc>,
    /// Content -> some stored copy (content deduplication).
    pub by_hash: std::collections::HashMap<[u8; 16], PageLoc, HashKeyBuild>,
    /// Pages referenced instead of stored (statistics).
    pub reused: u64,
}

/// Splits [s, e) by the sorted, disjoint `dirty` ranges: (start, end, clean).
fn split_clean(s: u64, e: u64, dirty: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut a = s;
    let mut i = dirty.partition_point(|(_, de)| *de <= a);
    while a < e {
        match dirty.get(i) {
            Some(&(ds, de)) if ds < e => {
                if ds > a {
                    out.push((a, ds, true));
                    a = ds;
                }
                let stop = de.min(e);
                if stop > a {
                    out.push((a, stop, false));
                    a = stop;
                }
                i += 1;
            }
            _ => {
                out.push((a, e, true));
                a = e;
            }
        }
    }
    out
}

/// `page_hashes` entry of a zero page when pages are not hashed.
pub const ZERO_MARK: [u8; 16] = [0; 16];
/// `page_hashes` entry of a non-zero page when pages are not hashed.
pub const NONZERO_MARK: [u8; 16] = [0xff; 16];

/// Whether every byte of `page` is zero (an OR over 8-byte words, which
/// the compiler vectorizes).
pub fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let rest = words.remainder();
    let or = words.fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8])));
    or == 0 && rest.iter().all(|b| *b == 0)
}

pub fn hash16(page: &[u8]) -> [u8; 16] {
    let mut h = [0u8; 16];
    h.copy_from_slice(&blake3::hash(page).as_bytes()[..16]);
    h
}

/// Appends a page to the run being built, or starts a new one.
fn push_page(out: &mut Vec<pb::PageRun>, cur: &mut Option<pb::PageRun>, vaddr: u64, loc: PageLoc) {
    if let Some(c) = cur.as_mut() {
        let n = c.nr_pages;
        if c.vaddr + n * PAGE == vaddr
            && c.image == loc.image
            && c.file_offset + n * PAGE == loc.offset
            && n < RUN_PAGES
        {
            c.nr_pages += 1;
            if c.image == 0 {
                c.page_hashes.extend_from_slice(&loc.hash);
            }
            return;
        }
    }
    if let Some(done) = cur.take() {
        out.push(done);
    }
    *cur = Some(pb::PageRun {
        vaddr,
        nr_pages: 1,
        file_offset: loc.offset,
        blake3: Vec::new(),
        cow: false,
        image: loc.image,
        // Pages in an ancestor keep their checksums there (ImageChain::run_page_hashes).
        page_hashes: if loc.image == 0 { loc.hash.to_vec() } else { Vec::new() },
    });
}

/// Physical frame numbers of `pages` pages at `vaddr` (0 where unknown).
fn frames(pagemap: &File, vaddr: u64, pages: u64) -> Vec<u64> {
    let mut buf = vec![0u8; (pages * 8) as usize];
    if pagemap.read_exact_at(&mut buf, vaddr / PAGE * 8).is_err() {
        return vec![0; pages as usize];
    }
    buf.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let e = u64::from_le_bytes(a);
            if e & (1 << 63) != 0 {
                e & ((1 << 55) - 1)
            } else {
                0
            }
        })
        .collect()
}

impl PageSink {
    pub fn start(file: File, path: &Path) -> Result<Self, DumpError> {
        let (tx, rx) = mpsc::sync_channel::<Chunk>(BUFFERS - 1);
        let (ret_tx, ret_rx) = mpsc::channel::<Vec<u8>>();
        let writer = std::thread::Builder::new()
            .name("floe-pages-writer".into())
            .spawn(move || -> std::io::Result<Option<File>> {
                for c in rx {
                    match c {
                        Chunk::Data { buf, len, offset, .. } => {
                            file.write_all_at(&buf[..len], offset)?;
                            let _ = ret_tx.send(buf);
                        }
                        Chunk::Recycle(buf) => {
                            let _ = ret_tx.send(buf);
                        }
                        Chunk::Announce(_) => {}
                    }
                }
                Ok(Some(file))
            })
            .map_err(|source| DumpError::Io { pid: 0, what: "cannot start the page writer thread".into(), source })?;
        Ok(Self::with_writer(tx, ret_rx, writer, path, false))
    }

    /// Stream mode: every batch of stored pages goes to `consume` (on a
    /// thread of the sink's) instead of a file. Always incremental (per-page
    /// checksums) and without content deduplication. Blobs are not kept.
    pub fn start_stream(mut consume: ChunkConsumer) -> Result<Self, DumpError> {
        let (tx, rx) = mpsc::sync_channel::<Chunk>(BUFFERS - 1);
        let (ret_tx, ret_rx) = mpsc::channel::<Vec<u8>>();
        let writer = std::thread::Builder::new()
            .name("floe-pages-stream".into())
            .spawn(move || -> std::io::Result<Option<File>> {
                for c in rx {
                    match c {
                        Chunk::Data { buf, len: 0, .. } | Chunk::Recycle(buf) => {
                            let _ = ret_tx.send(buf);
                        }
                        Chunk::Data { buf, len, pid, runs, .. } => {
                            let recycle = ret_tx.clone();
                            consume(StreamItem::Pages(PageChunk { pid, runs, data: buf, len, recycle }))?;
                        }
                        Chunk::Announce(item) => consume(item)?,
                    }
                }
                Ok(None)
            })
            .map_err(|source| DumpError::Io { pid: 0, what: "cannot start the page stream thread".into(), source })?;
        let mut sink = Self::with_writer(tx, ret_rx, writer, Path::new("(page stream)"), true);
        sink.inc = Some(Incremental::default());
        sink.content_dedup = false;
        Ok(sink)
    }

    fn with_writer(
        tx: mpsc::SyncSender<Chunk>,
        ret_rx: mpsc::Receiver<Vec<u8>>,
        writer: std::thread::JoinHandle<std::io::Result<Option<File>>>,
        path: &Path,
        stream: bool,
    ) -> Self {
        Self {
            tx: Some(tx),
            ret_rx,
            writer: Some(writer),
            path: path.to_path_buf(),
            offset: crate::image::PAGES_DATA_OFFSET,
            allocated: 0,
            page_bytes: 0,
            share_cow: false,
            inc: None,
            tolerate_races: false,
            stored: std::collections::HashMap::new(),
            stream,
            content_dedup: true,
            hash_pages: true,
        }
    }

    /// Per-page checksums, reuse of unchanged pages from the parent chain
    /// (`inc.by_addr`) and content deduplication. Turns copy-on-write
    /// detection off (content deduplication stores those pages once anyway).
    pub fn incremental(&mut self, inc: Incremental) {
        self.inc = Some(inc);
        self.share_cow = false;
    }

    /// Stream mode: hands `item` to the consumer, in order with the pages.
    /// Does nothing when writing an image.
    pub fn announce(&mut self, item: StreamItem) -> Result<(), DumpError> {
        if !self.stream {
            return Ok(());
        }
        let sent = self.tx.as_ref().map(|tx| tx.send(Chunk::Announce(item)).is_ok()).unwrap_or(false);
        if !sent {
            return Err(self.join_writer(0).err().unwrap_or(DumpError::Io {
                pid: 0,
                what: "page stream stopped".into(),
                source: std::io::Error::other("stream consumer gone"),
            }));
        }
        Ok(())
    }

    /// Stream mode: stops hashing each page (see `hash_pages`).
    pub fn skip_page_hashes(&mut self) {
        if self.stream {
            self.hash_pages = false;
        }
    }

    /// Turns content deduplication off or on (incremental mode).
    pub fn content_dedup(&mut self, on: bool) {
        self.content_dedup = on && !self.stream;
    }

    /// Pages are read from running processes (pre-dump).
    pub fn tolerate_races(&mut self, on: bool) {
        self.tolerate_races = on;
    }

    /// Pages referenced from the chain or deduplicated instead of stored.
    pub fn reused_pages(&self) -> u64 {
        self.inc.as_ref().map(|i| i.reused).unwrap_or(0)
    }

    /// Turns on copy-on-write sharing detection (for trees of processes).
    pub fn share_cow(&mut self, on: bool) {
        self.share_cow = on;
    }

    fn join_writer(&mut self, pid: i32) -> Result<Option<File>, DumpError> {
        self.tx = None;
        let w = self.writer.take().ok_or_else(|| DumpError::Io {
            pid,
            what: "page writer already stopped".into(),
            source: std::io::Error::other("writer gone"),
        })?;
        match w.join() {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(source)) => {
                Err(DumpError::Io { pid, what: format!("cannot write {}", self.path.display()), source })
            }
            Err(_) => Err(DumpError::Io {
                pid,
                what: "page writer thread panicked".into(),
                source: std::io::Error::other("panic"),
            }),
        }
    }

    /// Copies the data pages of one process.
    /// `ppid` marks runs shared copy-on-write with the parent (`PageRun.cow`).
    /// `dirty`: the pages written since the parent image (a dirty tracker's
    /// answer); other pages the parent has are referenced without reading.
    pub fn dump_process(
        &mut self,
        pid: i32,
        ppid: i32,
        vmas: &[VmaPlan],
        dirty: Option<&[(u64, u64)]>,
    ) -> Result<Vec<pb::PageRun>, DumpError> {
        let t_plan = std::time::Instant::now();
        let mut runs = plan_runs(pid, vmas)?;
        tracing::debug!(pid, plan_ms = t_plan.elapsed().as_secs_f64() * 1000.0, runs = runs.len(), "pages planned");
        let mut out_runs = Vec::with_capacity(runs.len());
        if let (Some(dirty), Some(inc)) = (dirty, self.inc.as_mut()) {
            // Clean spans are taken from the parent's runs in bulk; the rest is read.
            let parent_runs = inc.runs.get(&pid).map(Vec::as_slice).unwrap_or(&[]);
            let mut keep = Vec::with_capacity(runs.len());
            for r in runs {
                for (s, e, clean) in split_clean(r.vaddr, r.vaddr + r.len, dirty) {
                    let mut a = s;
                    if clean {
                        let mut k = parent_runs.partition_point(|p| p.vaddr + p.nr_pages * PAGE <= a);
                        while a < e && k < parent_runs.len() && parent_runs[k].vaddr < e {
                            let p = &parent_runs[k];
                            if p.vaddr > a {
                                keep.push(RunPlan { vaddr: a, len: p.vaddr - a, readable: r.readable });
                                a = p.vaddr;
                            }
                            let stop = e.min(p.vaddr + p.nr_pages * PAGE);
                            let first = ((a - p.vaddr) / PAGE) as usize;
                            let n = ((stop - a) / PAGE) as usize;
                            out_runs.push(pb::PageRun {
                                vaddr: a,
                                nr_pages: n as u64,
                                file_offset: p.file_offset + first as u64 * PAGE,
                                blake3: Vec::new(),
                                cow: false,
                                image: p.image,
                                // In an ancestor: its checksums stay there.
                                page_hashes: Vec::new(),
                            });
                            inc.reused += n as u64;
                            a = stop;
                            k += 1;
                        }
                    }
                    if a < e {
                        keep.push(RunPlan { vaddr: a, len: e - a, readable: r.readable });
                    }
                }
            }
            runs = keep;
        }
        let mem_file = File::open(procfs::path(pid, "mem")).map_err(proc_err(pid, "mem"))?;
        // Pages still shared copy-on-write with an already dumped process
        // point at the data stored for it.
        let mut run_frames: Vec<Vec<u64>> = Vec::new();
        if self.share_cow {
            let pagemap = File::open(procfs::path(pid, "pagemap")).map_err(proc_err(pid, "pagemap"))?;
            let mut keep = Vec::with_capacity(runs.len());
            for r in runs {
                let f = frames(&pagemap, r.vaddr, r.len / PAGE);
                let hit = (!f.contains(&0))
                    .then(|| self.stored.get(&(r.vaddr, r.len / PAGE)))
                    .flatten()
                    .and_then(|v| v.iter().find(|(pf, _, _, _)| *pf == f));
                match hit.cloned() {
                    Some((_, off, hash, owner)) => {
                        out_runs.push(pb::PageRun {
                            vaddr: r.vaddr,
                            nr_pages: r.len / PAGE,
                            file_offset: off,
                            blake3: hash.clone(),
                            // Shared with the parent itself: restore can inherit it by fork.
                            cow: owner == ppid,
                            image: 0,
                            page_hashes: Vec::new(),
                        });
                        // Its own children may share it with this process in turn.
                        self.stored.entry((r.vaddr, r.len / PAGE)).or_default().push((f, off, hash, pid));
                    }
                    None => {
                        keep.push(r);
                        run_frames.push(f);
                    }
                }
            }
            runs = keep;
        }
        let (mut t_read, mut t_hash, mut t_wait) = (0f64, 0f64, 0f64);
        let batch = if self.stream { STREAM_BATCH } else { BATCH };
        let mut i = 0usize;
        while i < runs.len() {
            // Take as many runs as fit in one batch.
            let mut j = i;
            let mut total = 0usize;
            while j < runs.len() && (j == i || total + runs[j].len as usize <= batch) && j - i < mem::MAX_IOV {
                total += runs[j].len as usize;
                j += 1;
            }
            let t = std::time::Instant::now();
            let mut buf = match self.ret_rx.try_recv() {
                Ok(b) => b,
                Err(_) if self.allocated < BUFFERS || self.stream => {
                    self.allocated += 1;
                    vec![0u8; total]
                }
                Err(_) => match self.ret_rx.recv() {
                    Ok(b) => b,
                    Err(_) => {
                        return Err(self.join_writer(pid).err().unwrap_or(DumpError::Io {
                            pid,
                            what: "page writer stopped".into(),
                            source: std::io::Error::other("writer gone"),
                        }))
                    }
                },
            };
            if buf.len() < total {
                buf.resize(total, 0);
            }
            t_wait += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            if let Err(e) = read_batch(pid, &mem_file, &runs[i..j], &mut buf[..total]) {
                if !self.tolerate_races {
                    return Err(e);
                }
                tracing::debug!(pid, error = %e, "pre-dump: pages changed under us, skipped");
                let _ = self.ret_tx_back(buf);
                i = j;
                continue;
            }
            t_read += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            if let Some(inc) = self.inc.as_mut() {
                // Page by page: reuse what the chain has, store the rest compacted.
                let mut stored = 0usize;
                let mut cur: Option<pb::PageRun> = None;
                let mut o = 0usize;
                let first_run = out_runs.len();
                let dedup = self.content_dedup;
                let hash_pages = self.hash_pages;
                for r in &runs[i..j] {
                    for k in 0..(r.len / PAGE) {
                        let vaddr = r.vaddr + k * PAGE;
                        let at = o + (k * PAGE) as usize;
                        // Without per-page hashes (a stream whose consumer checks whole
                        // batches), only zero pages get a recognizable marker.
                        let h = if hash_pages {
                            hash16(&buf[at..at + PAGE as usize])
                        } else if is_zero(&buf[at..at + PAGE as usize]) {
                            ZERO_MARK
                        } else {
                            NONZERO_MARK
                        };
                        let known = inc
                            .by_addr
                            .get(&(pid, vaddr))
                            .filter(|l| l.hash == h)
                            .or_else(|| if dedup { inc.by_hash.get(&h) } else { None })
                            .copied();
                        let loc = match known {
                            Some(l) => {
                                inc.reused += 1;
                                l
                            }
                            None => {
                                let dst = stored * PAGE as usize;
                                if dst != at {
                                    buf.copy_within(at..at + PAGE as usize, dst);
                                }
                                let l = PageLoc { image: 0, offset: self.offset + dst as u64, hash: h };
                                if dedup {
                                    inc.by_hash.insert(h, l);
                                }
                                stored += 1;
                                l
                            }
                        };
                        push_page(&mut out_runs, &mut cur, vaddr, loc);
                    }
                    // A run never crosses a planned run (and so a mapping) boundary.
                    if let Some(done) = cur.take() {
                        out_runs.push(done);
                    }
                    o += r.len as usize;
                }
                if let Some(done) = cur.take() {
                    out_runs.push(done);
                }
                t_hash += t.elapsed().as_secs_f64();
                let len = stored * PAGE as usize;
                let runs = if self.stream {
                    out_runs[first_run..]
                        .iter()
                        .filter(|r| r.image == 0)
                        .map(|r| pb::PageRun { file_offset: r.file_offset - self.offset, ..r.clone() })
                        .collect()
                } else {
                    Vec::new()
                };
                let chunk = Chunk::Data { buf, len, offset: self.offset, pid, runs };
                let sent = self.tx.as_ref().map(|tx| tx.send(chunk).is_ok()).unwrap_or(false);
                if !sent {
                    return Err(self.join_writer(pid).err().unwrap_or(DumpError::Io {
                        pid,
                        what: "page writer stopped".into(),
                        source: std::io::Error::other("writer gone"),
                    }));
                }
                self.offset += len as u64;
                self.page_bytes += len as u64;
                i = j;
                continue;
            }
            let mut o = 0usize;
            for (k, r) in runs[i..j].iter().enumerate() {
                let data = &buf[o..o + r.len as usize];
                let run = pb::PageRun {
                    vaddr: r.vaddr,
                    nr_pages: r.len / PAGE,
                    file_offset: self.offset + o as u64,
                    blake3: blake3::hash(data).as_bytes().to_vec(),
                    cow: false,
                    image: 0,
                    page_hashes: Vec::new(),
                };
                if let Some(f) = run_frames.get_mut(i + k) {
                    if !f.contains(&0) {
                        self.stored.entry((r.vaddr, r.len / PAGE)).or_default().push((
                            std::mem::take(f),
                            run.file_offset,
                            run.blake3.clone(),
                            pid,
                        ));
                    }
                }
                out_runs.push(run);
                o += r.len as usize;
            }
            t_hash += t.elapsed().as_secs_f64();
            let chunk = Chunk::Data { buf, len: total, offset: self.offset, pid, runs: Vec::new() };
            let sent = self.tx.as_ref().map(|tx| tx.send(chunk).is_ok()).unwrap_or(false);
            if !sent {
                return Err(self.join_writer(pid).err().unwrap_or(DumpError::Io {
                    pid,
                    what: "page writer stopped".into(),
                    source: std::io::Error::other("writer gone"),
                }));
            }
            self.offset += total as u64;
            self.page_bytes += total as u64;
            i = j;
        }
        tracing::debug!(pid, read_s = t_read, hash_s = t_hash, wait_s = t_wait, "page copy breakdown");
        Ok(out_runs)
    }

    /// Gives an unused buffer back to the pool.
    fn ret_tx_back(&mut self, buf: Vec<u8>) -> Result<(), ()> {
        // Sending an empty chunk returns the buffer through the writer.
        match self.tx.as_ref() {
            Some(tx) => tx.send(Chunk::Recycle(buf)).map_err(drop),
            None => Err(()),
        }
    }

    /// Waits for the writer, then appends the blobs.
    pub fn finish(mut self, blobs: &[Vec<u8>]) -> Result<PagesOut, DumpError> {
        let file = self.join_writer(0)?;
        let Some(file) = file else {
            return Ok(PagesOut { blobs: Vec::new(), file_size: self.offset, page_bytes: self.page_bytes, file: None });
        };
        let (out_blobs, file_size) = write_blobs(&file, &self.path, self.offset, blobs)?;
        Ok(PagesOut { blobs: out_blobs, file_size, page_bytes: self.page_bytes, file: Some(file) })
    }
}

/// Appends `blobs` (saved file contents, socket queues) to a pages file at
/// `offset`; returns their index entries and the file's new size.
pub(crate) fn write_blobs(
    file: &File,
    path: &Path,
    mut offset: u64,
    blobs: &[Vec<u8>],
) -> Result<(Vec<pb::Blob>, u64), DumpError> {
    let mut out = Vec::with_capacity(blobs.len());
    for b in blobs {
        file.write_all_at(b, offset).map_err(|source| DumpError::Io {
            pid: 0,
            what: format!("cannot write {}", path.display()),
            source,
        })?;
        out.push(pb::Blob { file_offset: offset, len: b.len() as u64, blake3: blake3::hash(b).as_bytes().to_vec() });
        offset += b.len() as u64;
    }
    Ok((out, offset))
}

fn read_batch(pid: i32, mem_file: &File, runs: &[RunPlan], buf: &mut [u8]) -> Result<(), DumpError> {
    let mut o = 0usize;
    let mut k = 0usize;
    while k < runs.len() {
        if !runs[k].readable {
            // Not readable by the process itself: /proc/PID/mem can still read it.
            let r = &runs[k];
            mem_file.read_exact_at(&mut buf[o..o + r.len as usize], r.vaddr).map_err(|source| DumpError::Memory {
                pid,
                addr: r.vaddr,
                source,
            })?;
            o += r.len as usize;
            k += 1;
            continue;
        }
        let mut e = k;
        let mut len = 0usize;
        while e < runs.len() && runs[e].readable {
            len += runs[e].len as usize;
            e += 1;
        }
        let ranges: Vec<Range> = runs[k..e].iter().map(|r| Range { addr: r.vaddr, len: r.len }).collect();
        let n = mem::read_remote(pid, &mut buf[o..o + len], &ranges).map_err(|source| DumpError::Memory {
            pid,
            addr: runs[k].vaddr,
            source,
        })?;
        if n != len {
            let addr = runs[k].vaddr + n as u64;
            return Err(DumpError::Memory { pid, addr, source: std::io::Error::from_raw_os_error(libc::EFAULT) });
        }
        o += len;
        k = e;
    }
    Ok(())
}

/// The System V segments (from /proc/sysvipc/shm) whose ids are in `ids`.
pub fn sysv_segments(ids: &std::collections::BTreeSet<u64>) -> Result<Vec<pb::SysvShm>, DumpError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string("/proc/sysvipc/shm").map_err(|source| DumpError::Proc {
        pid: 0,
        path: "/proc/sysvipc/shm".into(),
        source,
    })?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 {
            continue;
        }
        let shmid: u64 = f[1].parse().unwrap_or(u64::MAX);
        if !ids.contains(&shmid) {
            continue;
        }
        out.push(pb::SysvShm {
            key: f[0].parse::<i64>().unwrap_or(0) as i32,
            shmid: shmid as i32,
            mode: u32::from_str_radix(f[2], 8).unwrap_or(0o600),
            size: f[3].parse().unwrap_or(0),
            uid: f[7].parse().unwrap_or(0),
            gid: f[8].parse().unwrap_or(0),
        });
    }
    if out.len() != ids.len() {
        return Err(DumpError::Refused {
            pid: 0,
            what: "a System V shared memory segment vanished while dumping".into(),
        });
    }
    Ok(out)
}
