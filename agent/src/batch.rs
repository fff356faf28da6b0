//! Page batches on the wire: zero pages as a bitmap, optional zstd, and a
//! blake3 of the page data that the target checks before writing anything
//! (one hash per batch: blake3 runs several times faster over 16 MiB at
//! once than over 4 KiB pages one by one).
use floe_engine::dump::PageChunk;
use floe_proto::peer::{Compression, PageBatch, Run};

const PAGE: usize = 4096;

/// A batch ready to send: the frame prefix (header + description) and the data.
pub struct Encoded {
    pub prefix: Vec<u8>,
    pub data: Vec<u8>,
    pub pages: u64,
    pub zero_pages: u64,
    pub raw_bytes: u64,
}

/// Builds the wire form of a stream chunk. `compress`: zstd level 1 when it
/// saves at least 10%. `corrupt`: test hook, flips a byte after hashing.
pub fn encode(pass: u32, mut c: PageChunk, compress: bool, corrupt: bool) -> (Encoded, Vec<u8>) {
    let pages: usize = c.runs.iter().map(|r| r.nr_pages as usize).sum();
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    let mut runs = Vec::with_capacity(c.runs.len());
    // Non-zero pages are packed to the front of the buffer, in order.
    let mut kept = 0usize;
    let mut i = 0usize;
    for r in &c.runs {
        runs.push(Run { vaddr: r.vaddr, nr_pages: r.nr_pages as u32 });
        for k in 0..r.nr_pages as usize {
            let src = r.file_offset as usize + k * PAGE;
            // The engine marks the pages it found non-zero when it does not
            // hash them: those need no second look.
            let nonzero = r.page_hashes.get(k * 16..k * 16 + 16) == Some(&floe_engine::dump::NONZERO_MARK[..]);
            if !nonzero && c.data.get(src..src + PAGE).is_some_and(floe_engine::dump::is_zero) {
                bitmap[i / 8] |= 1 << (i % 8);
            } else {
                if src != kept * PAGE {
                    c.data.copy_within(src..src + PAGE, kept * PAGE);
                }
                kept += 1;
            }
            i += 1;
        }
    }
    let raw_len = kept * PAGE;
    let hash = blake3::hash(&c.data[..raw_len]).as_bytes().to_vec();
    let mut data = c.data;
    let mut compression = Compression::None;
    let mut out = Vec::new();
    if compress && raw_len > 0 {
        if let Ok(z) = zstd::bulk::compress(&data[..raw_len], 1) {
            if z.len() < raw_len / 10 * 9 {
                out = z;
                compression = Compression::Zstd;
            }
        }
    }
    let recycled;
    if compression == Compression::None {
        data.truncate(raw_len);
        out = data;
        recycled = Vec::new();
    } else {
        recycled = data;
    }
    if corrupt && !out.is_empty() {
        let mid = out.len() / 2;
        out[mid] ^= 0x5a;
    }
    let batch = PageBatch {
        pass,
        pid: c.pid,
        runs,
        zero: bitmap,
        compression: compression as i32,
        raw_len: raw_len as u64,
        blake3: hash,
        corrupted: corrupt,
    };
    let prefix = floe_proto::frame::pages_prefix(&batch, out.len());
    let enc = Encoded {
        prefix,
        data: out,
        pages: pages as u64,
        zero_pages: (pages - kept) as u64,
        raw_bytes: raw_len as u64,
    };
    (enc, recycled)
}

/// A checked batch: where to write which bytes.
pub struct Decoded {
    pub pid: i32,
    pub pass: u32,
    /// Holds the non-zero pages at `at`, in the order of `ranges` (the frame
    /// buffer itself when the batch was not compressed).
    pub buf: Vec<u8>,
    pub at: std::ops::Range<usize>,
    /// (address, length) for `data`, in order.
    pub ranges: Vec<(u64, u64)>,
    /// (address, length) to fill with zeros.
    pub zero: Vec<(u64, u64)>,
    pub pages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("page batch for pid {pid} is malformed: {what}")]
    Malformed { pid: i32, what: String },
    #[error("page batch for pid {pid} (pass {pass}, {pages} pages from {addr:#x}) failed its checksum: corrupted in transit")]
    Checksum { pid: i32, pass: u32, addr: u64, pages: u64 },
}

/// Decompresses and verifies the batch in `frame` (a pages frame's payload,
/// whose page data starts at `data_at`); nothing is written yet. `max_raw`
/// bounds the decompressed size. The frame buffer is kept (not copied) when
/// the data was not compressed.
pub fn decode(b: &PageBatch, frame: Vec<u8>, data_at: usize, max_raw: u64) -> Result<Decoded, BatchError> {
    let payload = frame.get(data_at..).unwrap_or(&[]);
    let bad = |what: String| BatchError::Malformed { pid: b.pid, what };
    let pages: u64 = b.runs.iter().map(|r| r.nr_pages as u64).sum();
    if pages == 0 || pages * PAGE as u64 > max_raw {
        return Err(bad(format!("{pages} pages")));
    }
    if b.zero.len() as u64 != pages.div_ceil(8) {
        return Err(bad("zero-page bitmap has the wrong length".into()));
    }
    let is_zero = |i: u64| b.zero[(i / 8) as usize] & (1 << (i % 8)) != 0;
    let nonzero = (0..pages).filter(|i| !is_zero(*i)).count() as u64;
    if b.raw_len != nonzero * PAGE as u64 || b.blake3.len() != 32 {
        return Err(bad("page count and data length disagree, or no checksum".into()));
    }
    let (buf, at) = match Compression::try_from(b.compression) {
        Ok(Compression::None) => {
            let end = data_at + payload.len();
            (frame, data_at..end)
        }
        Ok(Compression::Zstd) => {
            let d = zstd::bulk::decompress(payload, b.raw_len as usize).map_err(|e| bad(format!("zstd: {e}")))?;
            let n = d.len();
            (d, 0..n)
        }
        Err(_) => return Err(bad(format!("unknown compression {}", b.compression))),
    };
    let data = &buf[at.clone()];
    if data.len() as u64 != b.raw_len {
        return Err(bad(format!("{} bytes of page data, expected {}", data.len(), b.raw_len)));
    }
    if blake3::hash(data).as_bytes()[..] != b.blake3[..] {
        let addr = b.runs.first().map(|r| r.vaddr).unwrap_or(0);
        return Err(BatchError::Checksum { pid: b.pid, pass: b.pass, addr, pages });
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut zero: Vec<(u64, u64)> = Vec::new();
    let mut i = 0u64;
    for r in &b.runs {
        if r.vaddr % PAGE as u64 != 0 || r.vaddr.checked_add(r.nr_pages as u64 * PAGE as u64).is_none() {
            return Err(bad(format!("run at {:#x} is misaligned", r.vaddr)));
        }
        for p in 0..r.nr_pages as u64 {
            let addr = r.vaddr + p * PAGE as u64;
            let list = if is_zero(i) { &mut zero } else { &mut ranges };
            match list.last_mut() {
                Some(l) if l.0 + l.1 == addr => l.1 += PAGE as u64,
                _ => list.push((addr, PAGE as u64)),
            }
            i += 1;
        }
    }
    Ok(Decoded { pid: b.pid, pass: b.pass, buf, at, ranges, zero, pages })
}
