//! `floe inspect`: a human (or JSON) view of an image.
use floe_engine::dump::regs_from_bytes;
use floe_engine::image::ImageReader;
use floe_proto::image as pb;
use serde_json::{json, Value};
use std::fmt::Write;

fn prot(p: u32) -> String {
    let mut s = String::new();
    s.push(if p & 1 != 0 { 'r' } else { '-' });
    s.push(if p & 2 != 0 { 'w' } else { '-' });
    s.push(if p & 4 != 0 { 'x' } else { '-' });
    s
}

fn kind(k: i32) -> &'static str {
    match pb::VmaKind::try_from(k).unwrap_or(pb::VmaKind::Unspecified) {
        pb::VmaKind::AnonPrivate => "anon-private",
        pb::VmaKind::AnonShared => "anon-shared",
        pb::VmaKind::FilePrivate => "file-private",
        pb::VmaKind::FileShared => "file-shared",
        pb::VmaKind::Unspecified => "unknown",
    }
}

fn fd_kind(k: i32) -> &'static str {
    match pb::FdKind::try_from(k).unwrap_or(pb::FdKind::Unspecified) {
        pb::FdKind::Regular => "file",
        pb::FdKind::Directory => "dir",
        pb::FdKind::CharDevice => "chardev",
        pb::FdKind::Tty => "tty",
        pb::FdKind::DeletedFile => "deleted-file",
        pb::FdKind::Unspecified => "unknown",
    }
}

fn stored(img: &ImageReader, v: &pb::Vma) -> u64 {
    img.manifest.page_runs.iter().filter(|r| r.vaddr >= v.start && r.vaddr < v.end).map(|r| r.nr_pages * 4096).sum()
}

fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1}M", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{}K", b / 1024)
    }
}

pub fn to_text(img: &ImageReader) -> String {
    let m = &img.manifest;
    let mut o = String::new();
    let p = m.process.clone().unwrap_or_default();
    let th = p.thread.clone().unwrap_or_default();
    let r = regs_from_bytes(&th.gpregs);
    let _ = writeln!(
        o,
        "image      {} (format v{}, floe {}, dumped on {} running {})",
        img.dir.display(),
        m.format_version,
        m.floe_version,
        m.hostname,
        m.kernel_release
    );
    let _ = writeln!(o, "process    pid {} ppid {} pgid {} sid {}  comm {:?}", p.pid, p.ppid, p.pgid, p.sid, p.comm);
    let _ = writeln!(o, "exe        {}", p.exe_path);
    let _ = writeln!(o, "cmdline    {}", p.cmdline.join(" "));
    let _ = writeln!(o, "cwd        {}  root {}", p.cwd, p.root);
    let _ = writeln!(o, "creds      uid {} gid {}  groups {:?}", p.uid, p.gid, p.groups);
    let _ = writeln!(
        o,
        "registers  rip {:#x} rsp {:#x} rax {:#x} orig_rax {} fs_base {:#x}  xstate {} bytes",
        r.rip,
        r.rsp,
        r.rax,
        r.orig_rax as i64,
        r.fs_base,
        th.xstate.len()
    );
    let _ = writeln!(
        o,
        "signals    mask {:#x}, {} handlers, {} pending",
        th.sigmask,
        p.sigactions.len(),
        th.pending.len() + p.shared_pending.len()
    );
    let _ = writeln!(o, "mappings   {}", m.vmas.len());
    let _ = writeln!(o, "  {:<29} {:<4} {:>8} {:>8}  {:<13} path", "range", "prot", "size", "stored", "kind");
    for v in &m.vmas {
        let name = if v.path.is_empty() { v.name.clone() } else { v.path.clone() };
        let _ = writeln!(
            o,
            "  {:012x}-{:012x} {:<4} {:>8} {:>8}  {:<13} {}",
            v.start,
            v.end,
            prot(v.prot),
            size(v.end - v.start),
            size(stored(img, v)),
            kind(v.kind),
            name
        );
    }
    if let Some(vd) = &m.vdso {
        let _ = writeln!(o, "  {:012x}-{:012x} vvar/vdso block", vd.start, vd.end);
    }
    let _ = writeln!(o, "fds        {}", m.fds.len());
    for f in &m.fds {
        let _ = writeln!(o, "  {:>4} {:<12} flags {:#o} pos {:<10} {}", f.fd, fd_kind(f.kind), f.flags, f.pos, f.path);
    }
    let pages: u64 = img.page_bytes();
    let _ = writeln!(
        o,
        "image size {} ({} of pages in {} runs, manifest {})",
        size(m.pages_file_size + img.manifest_len),
        size(pages),
        m.page_runs.len(),
        size(img.manifest_len)
    );
    o
}

pub fn to_json(img: &ImageReader) -> Value {
    let m = &img.manifest;
    let p = m.process.clone().unwrap_or_default();
    let th = p.thread.clone().unwrap_or_default();
    let r = regs_from_bytes(&th.gpregs);
    json!({
        "dir": img.dir,
        "format_version": m.format_version,
        "floe_version": m.floe_version,
        "hostname": m.hostname,
        "kernel": m.kernel_release,
        "pid": p.pid,
        "ppid": p.ppid,
        "pgid": p.pgid,
        "sid": p.sid,
        "comm": p.comm,
        "exe": p.exe_path,
        "cmdline": p.cmdline,
        "cwd": p.cwd,
        "registers": {"rip": r.rip, "rsp": r.rsp, "rax": r.rax, "orig_rax": r.orig_rax as i64, "fs_base": r.fs_base, "xstate_bytes": th.xstate.len()},
        "sigmask": th.sigmask,
        "mappings": m.vmas.iter().map(|v| json!({
            "start": v.start, "end": v.end, "size": v.end - v.start, "prot": prot(v.prot),
            "kind": kind(v.kind), "path": v.path, "name": v.name, "stored_bytes": stored(img, v),
        })).collect::<Vec<_>>(),
        "fds": m.fds.iter().map(|f| json!({"fd": f.fd, "kind": fd_kind(f.kind), "path": f.path, "flags": f.flags, "pos": f.pos})).collect::<Vec<_>>(),
        "page_bytes": img.page_bytes(),
        "page_runs": m.page_runs.len(),
        "image_bytes": m.pages_file_size + img.manifest_len,
    })
}
