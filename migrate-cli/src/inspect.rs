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

fn fd_kind_name(img: &ImageReader, r: &pb::FdRef) -> (&'static str, String, u32, i64) {
    match img.manifest.files.get(r.file as usize) {
        Some(f) => {
            let path = match (&f.netlink_socket, &f.inet_socket, f.kind == pb::FdKind::Pipe as i32) {
                (Some(n), _, _) => format!("netlink protocol {} port {}", n.protocol, n.portid),
                (_, Some(i), _) => inet_text(i),
                (None, None, true) => format!("pipe:[{}]", f.pipe_id),
                _ => f.path.clone(),
            };
            (fd_kind(f.kind), path, f.flags, f.pos)
        }
        None => ("missing", String::new(), 0, 0),
    }
}

/// "udp 0.0.0.0:53 (2 datagrams waiting)", "tcp 10.0.0.1:80 -> 10.0.0.9:4000", ...
fn inet_text(i: &pb::InetSocket) -> String {
    let ip = |b: &[u8]| match b.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(b).unwrap_or_default()).to_string(),
        16 => format!("[{}]", std::net::IpAddr::from(<[u8; 16]>::try_from(b).unwrap_or_default())),
        _ => "?".to_string(),
    };
    let kind = match (i.r#type, i.protocol) {
        (libc::SOCK_STREAM, _) => "tcp",
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => "udp",
        (libc::SOCK_DGRAM, _) => "ping",
        _ => "raw",
    };
    let mut t = format!("{kind} {}:{}", ip(&i.local_addr), i.local_port);
    if i.listening {
        t.push_str(" listening");
    }
    if i.connected {
        t.push_str(&format!(" -> {}:{}", ip(&i.remote_addr), i.remote_port));
    }
    if !i.queued.is_empty() {
        t.push_str(&format!(" ({} datagrams waiting)", i.queued.len()));
    }
    t
}

fn fd_kind(k: i32) -> &'static str {
    match pb::FdKind::try_from(k).unwrap_or(pb::FdKind::Unspecified) {
        pb::FdKind::Regular => "file",
        pb::FdKind::Directory => "dir",
        pb::FdKind::CharDevice => "chardev",
        pb::FdKind::Tty => "tty",
        pb::FdKind::DeletedFile => "deleted-file",
        pb::FdKind::Pipe => "pipe",
        pb::FdKind::Fifo => "fifo",
        pb::FdKind::Eventfd => "eventfd",
        pb::FdKind::Signalfd => "signalfd",
        pb::FdKind::Timerfd => "timerfd",
        pb::FdKind::Epoll => "epoll",
        pb::FdKind::Inotify => "inotify",
        pb::FdKind::Memfd => "memfd",
        pb::FdKind::UnixSocket => "unix-socket",
        pb::FdKind::InetSocket => "inet-socket",
        pb::FdKind::NetlinkSocket => "netlink-socket",
        pb::FdKind::Unspecified => "unknown",
    }
}

fn stored(p: &pb::Process, v: &pb::Vma) -> u64 {
    p.page_runs.iter().filter(|r| r.vaddr >= v.start && r.vaddr < v.end).map(|r| r.nr_pages * 4096).sum()
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
    let threads: usize = m.processes.iter().map(|p| p.threads.len()).sum();
    let _ = writeln!(
        o,
        "image      {} (format v{}, floe {}, dumped on {} running {})",
        img.dir.display(),
        m.format_version,
        m.floe_version,
        m.hostname,
        m.kernel_release
    );
    let _ = writeln!(
        o,
        "tree       root {}, {} process(es), {} thread(s), {} open file description(s)",
        m.root_pid,
        m.processes.len(),
        threads,
        m.files.len()
    );
    for p in &m.processes {
        let _ = writeln!(o);
        if p.zombie {
            let _ = writeln!(
                o,
                "process    pid {} ppid {} pgid {} sid {}  zombie, wait status {:#x}",
                p.pid, p.ppid, p.pgid, p.sid, p.exit_status
            );
            continue;
        }
        let th = p.threads.first().cloned().unwrap_or_default();
        let r = regs_from_bytes(&th.gpregs);
        let _ =
            writeln!(o, "process    pid {} ppid {} pgid {} sid {}  comm {:?}", p.pid, p.ppid, p.pgid, p.sid, p.comm);
        let deleted = |yes: bool| if yes { " (deleted; contents saved in the image)" } else { "" };
        let _ = writeln!(o, "exe        {}{}", p.exe_path, deleted(p.exe_blob.is_some()));
        let _ = writeln!(o, "cmdline    {}", p.cmdline.join(" "));
        let _ = writeln!(o, "cwd        {}  root {}", p.cwd, p.root);
        let _ = writeln!(o, "creds      uid {} gid {}  groups {:?}", p.uid, p.gid, p.groups);
        let tids: Vec<String> = p.threads.iter().map(|t| format!("{} ({})", t.tid, t.comm)).collect();
        let _ = writeln!(o, "threads    {}", tids.join(", "));
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
        let pending: usize = p.threads.iter().map(|t| t.pending.len()).sum::<usize>() + p.shared_pending.len();
        let _ = writeln!(o, "signals    mask {:#x}, {} handlers, {} pending", th.sigmask, p.sigactions.len(), pending);
        let _ = writeln!(o, "mappings   {}", p.vmas.len());
        let _ = writeln!(o, "  {:<29} {:<4} {:>8} {:>8}  {:<13} path", "range", "prot", "size", "stored", "kind");
        for v in &p.vmas {
            let name = if v.path.is_empty() { v.name.clone() } else { format!("{}{}", v.path, deleted(v.deleted)) };
            let _ = writeln!(
                o,
                "  {:012x}-{:012x} {:<4} {:>8} {:>8}  {:<13} {}",
                v.start,
                v.end,
                prot(v.prot),
                size(v.end - v.start),
                size(stored(p, v)),
                kind(v.kind),
                name
            );
        }
        if let Some(vd) = &p.vdso {
            let _ = writeln!(o, "  {:012x}-{:012x} vvar/vdso block", vd.start, vd.end);
        }
        let _ = writeln!(o, "fds        {}", p.fds.len());
        for r in &p.fds {
            let (k, path, flags, pos) = fd_kind_name(img, r);
            let _ =
                writeln!(o, "  {:>4} {:<12} flags {:#o} pos {:<10} desc #{:<3} {}", r.fd, k, flags, pos, r.file, path);
        }
    }
    let pages: u64 = img.page_bytes();
    let runs: usize = m.processes.iter().map(|p| p.page_runs.len()).sum();
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "image size {} ({} of pages in {} runs, manifest {})",
        size(m.pages_file_size + img.manifest_len),
        size(pages),
        runs,
        size(img.manifest_len)
    );
    o
}

fn process_json(img: &ImageReader, p: &pb::Process) -> Value {
    let th = p.threads.first().cloned().unwrap_or_default();
    let r = regs_from_bytes(&th.gpregs);
    json!({
        "pid": p.pid,
        "ppid": p.ppid,
        "pgid": p.pgid,
        "sid": p.sid,
        "zombie": p.zombie,
        "comm": p.comm,
        "exe": p.exe_path,
        "exe_deleted": p.exe_blob.is_some(),
        "cmdline": p.cmdline,
        "cwd": p.cwd,
        "threads": p.threads.iter().map(|t| json!({"tid": t.tid, "comm": t.comm})).collect::<Vec<_>>(),
        "registers": {"rip": r.rip, "rsp": r.rsp, "rax": r.rax, "orig_rax": r.orig_rax as i64, "fs_base": r.fs_base, "xstate_bytes": th.xstate.len()},
        "sigmask": th.sigmask,
        "mappings": p.vmas.iter().map(|v| json!({
            "start": v.start, "end": v.end, "size": v.end - v.start, "prot": prot(v.prot),
            "kind": kind(v.kind), "path": v.path, "deleted": v.deleted, "name": v.name, "stored_bytes": stored(p, v),
        })).collect::<Vec<_>>(),
        "fds": p.fds.iter().map(|r| {
            let (k, path, flags, pos) = fd_kind_name(img, r);
            json!({"fd": r.fd, "kind": k, "path": path, "flags": flags, "pos": pos, "description": r.file, "cloexec": r.cloexec})
        }).collect::<Vec<_>>(),
        "page_bytes": p.page_runs.iter().map(|r| r.nr_pages * 4096).sum::<u64>(),
    })
}

/// JSON view: the root process's fields at top level, every process under "processes".
pub fn to_json(img: &ImageReader) -> Value {
    let m = &img.manifest;
    let mut root = process_json(img, img.root());
    if let Value::Object(map) = &mut root {
        map.insert("dir".into(), json!(img.dir));
        map.insert("format_version".into(), json!(m.format_version));
        map.insert("floe_version".into(), json!(m.floe_version));
        map.insert("hostname".into(), json!(m.hostname));
        map.insert("kernel".into(), json!(m.kernel_release));
        map.insert("processes".into(), Value::Array(m.processes.iter().map(|p| process_json(img, p)).collect()));
        map.insert("page_bytes".into(), json!(img.page_bytes()));
        map.insert("image_bytes".into(), json!(m.pages_file_size + img.manifest_len));
    }
    root
}
