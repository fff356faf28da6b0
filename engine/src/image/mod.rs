//! On-disk checkpoint image: `manifest.img` (header + protobuf manifest) and
//! `pages.img` (header + page data). See docs/image-format.md.
//!
//! Both files are written under temporary names and renamed into place only
//! when complete, manifest last, so a directory holding a `manifest.img`
//! always holds a complete image.
pub mod dedup;

use floe_proto::image::Manifest;
use floe_proto::Message;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.img";
pub const PAGES_FILE: &str = "pages.img";
pub const MANIFEST_MAGIC: [u8; 8] = *b"FLOEMAN\0";
pub const PAGES_MAGIC: [u8; 8] = *b"FLOEPGS\0";
pub const FORMAT_VERSION: u32 = 2;
/// Manifest header: magic, version, flags, payload length, blake3.
pub const MANIFEST_HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// Page data starts here in pages.img (header padded to a page).
pub const PAGES_DATA_OFFSET: u64 = 4096;
/// Largest manifest accepted when reading.
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{dir}: not a floe image (no {MANIFEST_FILE}; a dump that did not finish leaves none)")]
    NotAnImage { dir: PathBuf },
    #[error("{dir} already holds an image; pass --force to overwrite it")]
    Exists { dir: PathBuf },
    #[error("{path}: not a floe image file (bad magic {found:02x?})")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: image format version {found} is not supported (this floe reads version {FORMAT_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated ({what})")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: manifest of {len} bytes exceeds the {MAX_MANIFEST_LEN}-byte limit")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path}: checksum mismatch in {what}: the image is corrupt")]
    Checksum { path: PathBuf, what: String },
    #[error("{path}: cannot decode manifest")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: inconsistent image: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{dir}: its parent image {parent} cannot be used")]
    Parent {
        dir: PathBuf,
        parent: PathBuf,
        #[source]
        source: Box<ImageError>,
    },
    #[error(
        "{dir}: its parent image {parent} was replaced or rewritten since (image id differs); the chain is broken"
    )]
    ParentChanged { dir: PathBuf, parent: PathBuf },
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io { path: path.to_path_buf(), what, source }
}

/// Prepares an image directory for writing.
pub struct ImageWriter {
    dir: PathBuf,
    force: bool,
    pages_tmp: PathBuf,
    manifest_tmp: PathBuf,
    pub image_id: [u8; 16],
    /// fsync before the renames (off for scratch images that live only as
    /// long as the process writing them, e.g. a migration's final image).
    durable: bool,
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut id);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let h = blake3::hash(&[&id[..], &t.to_le_bytes(), &std::process::id().to_le_bytes()].concat());
    id.copy_from_slice(&h.as_bytes()[..16]);
    id
}

impl ImageWriter {
    /// Creates `dir` if needed and refuses an existing image unless `force`.
    pub fn create(dir: &Path, force: bool) -> Result<Self, ImageError> {
        fs::create_dir_all(dir).map_err(io_err(dir, "cannot create image directory"))?;
        if dir.join(MANIFEST_FILE).exists() && !force {
            return Err(ImageError::Exists { dir: dir.to_path_buf() });
        }
        let tag = std::process::id();
        Ok(Self {
            dir: dir.to_path_buf(),
            force,
            pages_tmp: dir.join(format!(".{PAGES_FILE}.tmp.{tag}")),
            manifest_tmp: dir.join(format!(".{MANIFEST_FILE}.tmp.{tag}")),
            image_id: random_id(),
            durable: true,
        })
    }

    /// Like [`ImageWriter::create`] (replacing an image there) for a scratch
    /// image nobody needs after a crash: written atomically but not synced.
    pub fn scratch(dir: &Path) -> Result<Self, ImageError> {
        let mut w = Self::create(dir, true)?;
        w.durable = false;
        Ok(w)
    }

    /// Opens the temporary pages file with its header written; data goes at
    /// [`PAGES_DATA_OFFSET`].
    pub fn open_pages(&self) -> Result<File, ImageError> {
        let p = &self.pages_tmp;
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .map_err(io_err(p, "cannot create pages file"))?;
        let mut hdr = vec![0u8; PAGES_DATA_OFFSET as usize];
        hdr[..8].copy_from_slice(&PAGES_MAGIC);
        hdr[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        hdr[16..32].copy_from_slice(&self.image_id);
        f.write_all_at(&hdr, 0).map_err(io_err(p, "cannot write pages header"))?;
        Ok(f)
    }

    pub fn pages_tmp_path(&self) -> &Path {
        &self.pages_tmp
    }

    /// Writes the manifest, syncs both files and renames them into place.
    pub fn commit(&self, manifest: &Manifest, pages: File) -> Result<u64, ImageError> {
        if self.durable {
            pages.sync_all().map_err(io_err(&self.pages_tmp, "cannot sync pages file"))?;
        }
        drop(pages);
        let payload = manifest.encode_to_vec();
        let mut buf = Vec::with_capacity(MANIFEST_HEADER_LEN + payload.len());
        buf.extend_from_slice(&MANIFEST_MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        buf.extend_from_slice(blake3::hash(&payload).as_bytes());
        buf.extend_from_slice(&payload);
        let mp = &self.manifest_tmp;
        {
            let mut f = File::create(mp).map_err(io_err(mp, "cannot create manifest"))?;
            f.write_all(&buf).map_err(io_err(mp, "cannot write manifest"))?;
            if self.durable {
                f.sync_all().map_err(io_err(mp, "cannot sync manifest"))?;
            }
        }
        let final_manifest = self.dir.join(MANIFEST_FILE);
        if self.force && final_manifest.exists() {
            // Invalidate the old image first so no mix of old and new ever looks valid.
            fs::remove_file(&final_manifest).map_err(io_err(&final_manifest, "cannot remove old manifest"))?;
        }
        let final_pages = self.dir.join(PAGES_FILE);
        fs::rename(&self.pages_tmp, &final_pages).map_err(io_err(&final_pages, "cannot rename pages file"))?;
        fs::rename(mp, &final_manifest).map_err(io_err(&final_manifest, "cannot rename manifest"))?;
        if self.durable {
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        Ok(buf.len() as u64)
    }

    /// Removes the temporary files (after a failure).
    pub fn abort(&self) {
        let _ = fs::remove_file(&self.pages_tmp);
        let _ = fs::remove_file(&self.manifest_tmp);
    }
}

/// Longest chain of parent images followed.
pub const MAX_CHAIN: usize = 64;

/// An image and its ancestors (images[0] is the one asked for).
pub struct ImageChain {
    pub images: Vec<ImageReader>,
    /// Per image, its own runs (stored in its pages.img, with per-page
    /// checksums) as (file offset, end, process index, run index), sorted by
    /// offset: where the checksums of runs pointing into it are found.
    stored: Vec<Vec<(u64, u64, usize, usize)>>,
}

impl ImageChain {
    /// Opens `dir` and every parent it names, checking each link's image id
    /// and that every run pointing into an ancestor lies inside its file.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let mut images = vec![ImageReader::open(dir)?];
        while let Some(p) = images.last().and_then(|i| i.manifest.parent.clone()) {
            let child_dir = images.last().map(|i| i.dir.clone()).unwrap_or_default();
            let pdir = if Path::new(&p.dir).is_absolute() { PathBuf::from(&p.dir) } else { child_dir.join(&p.dir) };
            if images.len() >= MAX_CHAIN {
                return Err(ImageError::Invalid {
                    path: child_dir,
                    what: format!("parent chain longer than {MAX_CHAIN} images (a loop?)"),
                });
            }
            let parent = ImageReader::open(&pdir).map_err(|e| ImageError::Parent {
                dir: child_dir.clone(),
                parent: pdir.clone(),
                source: Box::new(e),
            })?;
            if parent.manifest.image_id != p.image_id {
                return Err(ImageError::ParentChanged { dir: child_dir, parent: pdir });
            }
            images.push(parent);
        }
        let stored = images
            .iter()
            .map(|img| {
                let mut v: Vec<(u64, u64, usize, usize)> = img
                    .manifest
                    .processes
                    .iter()
                    .enumerate()
                    .flat_map(|(pi, p)| p.page_runs.iter().enumerate().map(move |(ri, r)| (pi, ri, r)))
                    .filter(|(_, _, r)| r.image == 0 && r.page_hashes.len() as u64 == r.nr_pages * 16)
                    .map(|(pi, ri, r)| (r.file_offset, r.file_offset + r.nr_pages * 4096, pi, ri))
                    .collect();
                v.sort_unstable();
                v
            })
            .collect();
        let chain = Self { images, stored };
        chain.check_links()?;
        Ok(chain)
    }

    /// Every run pointing into an ancestor lies inside its pages file, on
    /// pages stored there with checksums.
    fn check_links(&self) -> Result<(), ImageError> {
        let images = &self.images;
        for (i, img) in images.iter().enumerate() {
            for p in &img.manifest.processes {
                for r in p.page_runs.iter().filter(|r| r.image != 0) {
                    let bad = |what: String| ImageError::Invalid { path: img.dir.join(MANIFEST_FILE), what };
                    let src = images.get(i + r.image as usize).ok_or_else(|| {
                        bad(format!("page run at {:#x} of pid {} points past the oldest parent", r.vaddr, p.pid))
                    })?;
                    let end = r.file_offset.saturating_add(r.nr_pages * 4096);
                    if r.file_offset < PAGES_DATA_OFFSET || end > src.manifest.pages_file_size {
                        return Err(bad(format!(
                            "page run at {:#x} of pid {} lies outside {}",
                            r.vaddr,
                            p.pid,
                            src.pages_path.display()
                        )));
                    }
                    if r.page_hashes.is_empty() && self.run_page_hashes(i, r).is_none() {
                        return Err(bad(format!(
                            "page run at {:#x} of pid {} points at pages {} does not store with checksums",
                            r.vaddr,
                            p.pid,
                            src.pages_path.display()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The 16-byte blake3 prefix of every page of `run` (of image `from`),
    /// concatenated: its own, or those of the pages it points at in an
    /// ancestor. None when they are not recorded (a run with a whole-run
    /// checksum, or pages the ancestor does not hold).
    pub fn run_page_hashes<'a>(
        &'a self,
        from: usize,
        run: &'a floe_proto::image::PageRun,
    ) -> Option<std::borrow::Cow<'a, [u8]>> {
        let want = usize::try_from(run.nr_pages).ok()?.checked_mul(16)?;
        if run.page_hashes.len() == want {
            return Some(std::borrow::Cow::Borrowed(&run.page_hashes));
        }
        if run.image == 0 {
            return None;
        }
        let k = from.checked_add(run.image as usize)?;
        let (img, stored) = (self.images.get(k)?, self.stored.get(k)?);
        let end = run.file_offset.checked_add(run.nr_pages.checked_mul(4096)?)?;
        let mut out = Vec::with_capacity(want);
        let mut at = run.file_offset;
        let mut idx = stored.partition_point(|s| s.1 <= at);
        while at < end {
            let &(s, e, pi, ri) = stored.get(idx)?;
            if s > at {
                return None;
            }
            let src = &img.manifest.processes[pi].page_runs[ri];
            let first = ((at - s) / 4096) as usize;
            let n = ((e.min(end) - at) / 4096) as usize;
            out.extend_from_slice(src.page_hashes.get(first * 16..(first + n) * 16)?);
            at += n as u64 * 4096;
            idx += 1;
        }
        Some(std::borrow::Cow::Owned(out))
    }

    /// The image asked for.
    pub fn newest(&self) -> &ImageReader {
        &self.images[0]
    }

    /// The pages file a run of image `from` lives in.
    pub fn pages_of(&self, from: usize, run: &floe_proto::image::PageRun) -> Option<(&File, &Path)> {
        self.images.get(from + run.image as usize).map(|i| (&i.pages, i.pages_path.as_path()))
    }
}

/// A verified, opened image.
pub struct ImageReader {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub manifest_len: u64,
    pub pages: File,
    pub pages_path: PathBuf,
}

impl ImageReader {
    /// Opens and verifies the manifest and the pages header (page data is
    /// verified run by run as it is read).
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let mp = dir.join(MANIFEST_FILE);
        let mut f = File::open(&mp).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ImageError::NotAnImage { dir: dir.to_path_buf() }
            } else {
                ImageError::Io { path: mp.clone(), what: "cannot open manifest", source }
            }
        })?;
        let file_len = f.metadata().map_err(io_err(&mp, "cannot stat manifest"))?.len();
        if file_len < MANIFEST_HEADER_LEN as u64 {
            let mut head = vec![0u8; file_len as usize];
            let _ = f.read_exact(&mut head);
            if head.len() >= 8 && head[..8] != MANIFEST_MAGIC {
                return Err(ImageError::BadMagic { path: mp, found: head[..8].to_vec() });
            }
            return Err(ImageError::Truncated {
                path: mp,
                what: format!("{file_len} bytes, header alone is {MANIFEST_HEADER_LEN}"),
            });
        }
        let mut hdr = [0u8; MANIFEST_HEADER_LEN];
        f.read_exact(&mut hdr).map_err(io_err(&mp, "cannot read manifest header"))?;
        if hdr[..8] != MANIFEST_MAGIC {
            return Err(ImageError::BadMagic { path: mp, found: hdr[..8].to_vec() });
        }
        let version = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        if version != FORMAT_VERSION {
            return Err(ImageError::Version { path: mp, found: version });
        }
        let mut lenb = [0u8; 8];
        lenb.copy_from_slice(&hdr[16..24]);
        let len = u64::from_le_bytes(lenb);
        if len > MAX_MANIFEST_LEN {
            return Err(ImageError::TooLarge { path: mp, len });
        }
        if file_len != MANIFEST_HEADER_LEN as u64 + len {
            return Err(ImageError::Truncated {
                path: mp,
                what: format!(
                    "file has {} bytes of manifest, header says {len}",
                    file_len - MANIFEST_HEADER_LEN as u64
                ),
            });
        }
        let mut payload = vec![0u8; len as usize];
        f.read_exact(&mut payload).map_err(io_err(&mp, "cannot read manifest"))?;
        if blake3::hash(&payload).as_bytes() != &hdr[24..56] {
            return Err(ImageError::Checksum { path: mp, what: "manifest".into() });
        }
        let manifest =
            Manifest::decode(payload.as_slice()).map_err(|source| ImageError::Decode { path: mp.clone(), source })?;

        let pp = dir.join(PAGES_FILE);
        let pages = File::open(&pp).map_err(io_err(&pp, "cannot open pages file"))?;
        let plen = pages.metadata().map_err(io_err(&pp, "cannot stat pages file"))?.len();
        let mut phdr = [0u8; 32];
        if plen < PAGES_DATA_OFFSET {
            return Err(ImageError::Truncated { path: pp, what: format!("{plen} bytes, shorter than its header") });
        }
        pages.read_exact_at(&mut phdr, 0).map_err(io_err(&pp, "cannot read pages header"))?;
        if phdr[..8] != PAGES_MAGIC {
            return Err(ImageError::BadMagic { path: pp, found: phdr[..8].to_vec() });
        }
        let pver = u32::from_le_bytes([phdr[8], phdr[9], phdr[10], phdr[11]]);
        if pver != FORMAT_VERSION {
            return Err(ImageError::Version { path: pp, found: pver });
        }
        if phdr[16..32] != manifest.image_id[..] {
            return Err(ImageError::Invalid {
                path: pp,
                what: "pages file belongs to another image (image id differs)".into(),
            });
        }
        if plen != manifest.pages_file_size {
            return Err(ImageError::Truncated {
                path: pp,
                what: format!("{plen} bytes, manifest says {}", manifest.pages_file_size),
            });
        }
        let me = Self { dir: dir.to_path_buf(), manifest, manifest_len: file_len, pages, pages_path: pp };
        me.validate()?;
        Ok(me)
    }

    fn validate(&self) -> Result<(), ImageError> {
        let m = &self.manifest;
        let bad = |what: String| ImageError::Invalid { path: self.dir.join(MANIFEST_FILE), what };
        if m.processes.first().map(|p| p.pid) != Some(m.root_pid) {
            return Err(bad("the first process record is not the root".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &m.processes {
            if p.pid <= 0 || !seen.insert(p.pid) {
                return Err(bad(format!("process {} is listed twice or invalid", p.pid)));
            }
            if p.pid != m.root_pid && !seen.contains(&p.ppid) {
                return Err(bad(format!("process {} comes before its parent {}", p.pid, p.ppid)));
            }
            if p.zombie {
                continue;
            }
            // A pre-dump holds pages and mappings only.
            if !m.pre_dump && p.threads.first().map(|t| t.tid) != Some(p.pid) {
                return Err(bad(format!("process {} has no leader thread record", p.pid)));
            }
            for r in &p.page_runs {
                let len = r.nr_pages.checked_mul(4096).ok_or_else(|| bad("page run too long".into()))?;
                if r.vaddr % 4096 != 0 || r.vaddr.checked_add(len).is_none() {
                    return Err(bad(format!("page run at {:#x} of pid {} is misaligned", r.vaddr, p.pid)));
                }
                // A run pointing into an ancestor may carry no checksum of its
                // own: ImageChain finds the ancestor's per-page checksums.
                let hashed = r.page_hashes.len() as u64 == r.nr_pages * 16;
                if !hashed && r.image == 0 && r.blake3.len() != 32 {
                    return Err(bad(format!("page run at {:#x} of pid {} has no usable checksum", r.vaddr, p.pid)));
                }
                // Runs in an ancestor's pages.img are checked against it by ImageChain.
                if r.image == 0 {
                    let end = r.file_offset.checked_add(len).ok_or_else(|| bad("page run offset overflows".into()))?;
                    if r.file_offset < PAGES_DATA_OFFSET || end > m.pages_file_size {
                        return Err(bad(format!(
                            "page run at {:#x} of pid {} lies outside the pages file",
                            r.vaddr, p.pid
                        )));
                    }
                }
                if !p.vmas.iter().any(|v| r.vaddr >= v.start && r.vaddr + len <= v.end) {
                    return Err(bad(format!("page run at {:#x} of pid {} is outside every mapping", r.vaddr, p.pid)));
                }
            }
            for f in &p.fds {
                if f.file as usize >= m.files.len() || f.fd < 0 {
                    return Err(bad(format!("fd {} of pid {} refers to a missing file description", f.fd, p.pid)));
                }
            }
        }
        for b in &m.blobs {
            let end = b.file_offset.checked_add(b.len).ok_or_else(|| bad("blob offset overflows".into()))?;
            if b.file_offset < PAGES_DATA_OFFSET || end > m.pages_file_size || b.blake3.len() != 32 {
                return Err(bad("saved file contents lie outside the pages file".into()));
            }
        }
        Ok(())
    }

    /// The root process record.
    pub fn root(&self) -> &floe_proto::image::Process {
        // validate() guarantees the first record is the root.
        &self.manifest.processes[0]
    }

    /// Reads and verifies a blob (e.g. a deleted file's contents).
    pub fn read_blob(&self, idx: usize) -> Result<Vec<u8>, ImageError> {
        let b = self.manifest.blobs.get(idx).ok_or_else(|| ImageError::Invalid {
            path: self.dir.join(MANIFEST_FILE),
            what: format!("reference to missing saved file #{idx}"),
        })?;
        let mut buf = vec![0u8; b.len as usize];
        self.pages
            .read_exact_at(&mut buf, b.file_offset)
            .map_err(io_err(&self.pages_path, "cannot read saved file contents"))?;
        if blake3::hash(&buf).as_bytes()[..] != b.blake3[..] {
            return Err(ImageError::Checksum {
                path: self.pages_path.clone(),
                what: format!("saved file contents #{idx}"),
            });
        }
        Ok(buf)
    }

    /// Total bytes of page data.
    pub fn page_bytes(&self) -> u64 {
        self.manifest.processes.iter().flat_map(|p| &p.page_runs).map(|r| r.nr_pages * 4096).sum()
    }
}
