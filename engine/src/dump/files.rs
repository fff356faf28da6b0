//! File descriptors: what each one is, and whether this version can restore it.
use super::{proc_err, DumpError};
use crate::procfs;
use floe_proto::image as pb;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

pub fn file_id(m: &std::fs::Metadata) -> pb::FileId {
    pb::FileId {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        mode: m.mode(),
    }
}

fn major(rdev: u64) -> u64 {
    ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)
}
fn minor(rdev: u64) -> u64 {
    (rdev & 0xff) | ((rdev >> 12) & !0xff)
}

/// Character devices restored by reopening their path.
pub fn simple_device(rdev: u64) -> Option<&'static str> {
    match (major(rdev), minor(rdev)) {
        (1, 3) => Some("/dev/null"),
        (1, 5) => Some("/dev/zero"),
        (1, 7) => Some("/dev/full"),
        (1, 8) => Some("/dev/random"),
        (1, 9) => Some("/dev/urandom"),
        _ => None,
    }
}

/// Terminals (pty slaves, virtual consoles, serial lines, /dev/tty).
pub fn is_tty(rdev: u64) -> bool {
    let (ma, mi) = (major(rdev), minor(rdev));
    (136..=143).contains(&ma) || ma == 4 || (ma == 5 && mi == 0)
}

pub fn collect(pid: i32, shell_job: bool, blobs: &mut Vec<Vec<u8>>) -> Result<Vec<pb::FileDesc>, DumpError> {
    let mut out = Vec::new();
    for fd in procfs::fds(pid).map_err(proc_err(pid, "fd"))? {
        let link = procfs::readlink(pid, &format!("fd/{fd}")).map_err(proc_err(pid, "fd"))?;
        let refuse = |what: String| DumpError::Refused { pid, what: format!("fd {fd} ({link}): {what}") };
        if link.starts_with("pipe:") {
            return Err(refuse("pipes are not supported yet".into()));
        }
        if link.starts_with("socket:") {
            return Err(refuse("sockets are not supported yet".into()));
        }
        if link.contains("io_uring") {
            return Err(refuse("io_uring instances cannot be checkpointed".into()));
        }
        if link.starts_with("/memfd:") {
            return Err(refuse("memfd descriptors are not supported yet".into()));
        }
        if link.starts_with("anon_inode:") {
            return Err(refuse(format!(
                "{} descriptors are not supported yet",
                link.trim_start_matches("anon_inode:")
            )));
        }
        let info = procfs::fdinfo(pid, fd).map_err(proc_err(pid, "fdinfo"))?;
        if let Some(lock) = &info.lock {
            return Err(refuse(format!("it holds a file lock ({lock}); file locks are not supported yet")));
        }
        let fpath = procfs::path(pid, &format!("fd/{fd}"));
        let meta = std::fs::metadata(&fpath).map_err(proc_err(pid, "fd"))?;
        let ft = meta.file_type();
        let mut d = pb::FileDesc {
            fd,
            kind: pb::FdKind::Unspecified as i32,
            path: link.clone(),
            flags: info.flags,
            pos: info.pos,
            file: Some(file_id(&meta)),
            rdev: meta.rdev(),
            blob: -1,
        };
        if ft.is_file() {
            if let Some(orig) = link.strip_suffix(" (deleted)").filter(|_| meta.nlink() == 0) {
                let mut data = Vec::new();
                std::fs::File::open(&fpath).and_then(|mut f| f.read_to_end(&mut data)).map_err(|source| {
                    DumpError::Io { pid, what: format!("cannot save deleted file {orig} (fd {fd})"), source }
                })?;
                d.kind = pb::FdKind::DeletedFile as i32;
                d.path = orig.to_string();
                d.blob = blobs.len() as i32;
                blobs.push(data);
            } else {
                check_same_file(&link, &meta).map_err(refuse)?;
                d.kind = pb::FdKind::Regular as i32;
            }
        } else if ft.is_dir() {
            check_same_file(&link, &meta).map_err(refuse)?;
            d.kind = pb::FdKind::Directory as i32;
        } else if ft.is_char_device() {
            if simple_device(meta.rdev()).is_some() {
                d.kind = pb::FdKind::CharDevice as i32;
            } else if is_tty(meta.rdev()) {
                if !shell_job {
                    return Err(refuse(
                        "it is a terminal; pass --shell-job to dump a process attached to a terminal".into(),
                    ));
                }
                d.kind = pb::FdKind::Tty as i32;
            } else {
                return Err(refuse(format!(
                    "character device {}:{} is not supported",
                    major(meta.rdev()),
                    minor(meta.rdev())
                )));
            }
        } else if ft.is_fifo() {
            return Err(refuse("FIFOs are not supported yet".into()));
        } else {
            return Err(refuse("this kind of file is not supported".into()));
        }
        out.push(d);
    }
    Ok(out)
}

fn check_same_file(path: &str, meta: &std::fs::Metadata) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.dev() == meta.dev() && m.ino() == meta.ino() => Ok(()),
        Ok(_) => Err(format!("the path {path} now names a different file than the open one")),
        Err(e) => Err(format!("the path {path} cannot be reached from floe ({e})")),
    }
}
