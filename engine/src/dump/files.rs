//! File descriptors: what each one is, whether this version can restore it,
//! and which descriptors (across the whole tree) share one open file
//! description.
use super::{proc_err, DumpError};
use crate::procfs;
use crate::sys::task;
use floe_proto::image as pb;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

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

/// Largest deleted file whose contents a dump saves.
pub const MAX_DELETED_FILE: u64 = 1 << 30;

/// Open file descriptions of the tree, deduplicated.
#[derive(Default)]
pub struct FileTable {
    pub files: Vec<pb::FileDesc>,
    /// First holder (pid, fd) and inode of each description.
    owners: Vec<(i32, i32, u64)>,
    by_ino: HashMap<u64, Vec<usize>>,
    /// Pipes whose buffered data was saved already.
    pipes_saved: HashSet<u64>,
    tree: HashSet<i32>,
    /// --ext-unix-sk was given.
    pub ext_unix_sk: bool,
    /// --tcp-established was given.
    pub tcp_established: bool,
    /// Sockets put in TCP repair mode.
    pub repaired: crate::fdkinds::socket::Repaired,
    /// Deleted files whose contents were saved, by (dev, inode): their blob.
    /// A file open, mapped or run by several processes is saved once and
    /// restored as one file.
    deleted: HashMap<(u64, u64), i32>,
    /// Deleted files that are mapped or run are only marked (`-1` blobs):
    /// a live migration sends their contents another way.
    pub mapped_deleted_elsewhere: bool,
    /// Descriptors are read again at the final freeze (see
    /// [`crate::fdkinds::DumpCtx::passing_ok`]).
    pub passing_ok: bool,
}

impl FileTable {
    pub fn new(tree: &[i32]) -> Self {
        Self { tree: tree.iter().copied().collect(), ..Default::default() }
    }

    /// Collects the descriptors of `pid`, adding new descriptions to the table.
    pub fn collect(
        &mut self,
        pid: i32,
        shell_job: bool,
        file_locks: bool,
        blobs: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<pb::FdRef>, DumpError> {
        let mut out = Vec::new();
        for fd in procfs::fds(pid).map_err(proc_err(pid, "fd"))? {
            let info = procfs::fdinfo(pid, fd).map_err(proc_err(pid, "fdinfo"))?;
            let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
            let mut existing = None;
            for &idx in self.by_ino.get(&info.ino).map(Vec::as_slice).unwrap_or(&[]) {
                let (opid, ofd, _) = self.owners[idx];
                if task::same_file(opid, ofd, pid, fd).unwrap_or(false) {
                    existing = Some(idx);
                    break;
                }
            }
            let idx = match existing {
                Some(i) => i,
                None => {
                    let mut desc = self.describe(pid, fd, &info, shell_job, blobs)?;
                    if info.flags & libc::O_ASYNC as u32 != 0 {
                        self.async_owner(pid, fd, &mut desc)?;
                    }
                    self.files.push(desc);
                    self.owners.push((pid, fd, info.ino));
                    let i = self.files.len() - 1;
                    self.by_ino.entry(info.ino).or_default().push(i);
                    i
                }
            };
            let mut r = pb::FdRef { fd, file: idx as u32, cloexec, posix_locks: Vec::new() };
            for line in &info.locks {
                let link = procfs::readlink(pid, &format!("fd/{fd}")).unwrap_or_default();
                let lock = parse_lock(line)
                    .map_err(|what| DumpError::Refused { pid, what: format!("fd {fd} ({link}): {what}") })?;
                if !file_locks {
                    return Err(DumpError::Refused {
                        pid,
                        what: format!(
                            "fd {fd} ({link}) holds a file lock ({line}); pass --file-locks to dump it with its locks"
                        ),
                    });
                }
                if lock.kind == LOCK_POSIX {
                    if !r.posix_locks.contains(&lock) {
                        r.posix_locks.push(lock);
                    }
                } else if !self.files[idx].locks.contains(&lock) {
                    self.files[idx].locks.push(lock);
                }
            }
            out.push(r);
        }
        // Epoll registrations name descriptor numbers of this process.
        for (i, (opid, ofd, _)) in self.owners.iter().enumerate() {
            if *opid == pid && self.files[i].kind == pb::FdKind::Epoll as i32 {
                crate::fdkinds::resolve_epoll(&mut self.files[i], &out)
                    .map_err(|what| DumpError::Refused { pid, what: format!("fd {ofd} (epoll): {what}") })?;
            }
        }
        Ok(out)
    }

    /// Signal-driven I/O: who gets the signal, and which signal.
    fn async_owner(&self, pid: i32, fd: i32, d: &mut pb::FileDesc) -> Result<(), DumpError> {
        let err = |what: String| DumpError::Refused { pid, what: format!("fd {fd} (O_ASYNC): {what}") };
        let pidfd = task::pidfd_open(pid).map_err(|e| err(format!("pidfd_open failed ({e})")))?;
        let own = task::pidfd_getfd(&pidfd, fd).map_err(|e| err(format!("pidfd_getfd failed ({e})")))?;
        let (kind, owner) = task::get_owner(&own).map_err(|e| err(format!("F_GETOWN_EX failed ({e})")))?;
        let sig = task::fcntl_int(&own, task::F_GETSIG, 0).map_err(|e| err(format!("F_GETSIG failed ({e})")))?;
        if owner != 0 && !self.tree.contains(&owner) {
            // A process group is fine when its leader is in the tree.
            return Err(err(format!("its signals go to {owner}, which is not in the dumped tree")));
        }
        d.owner_type = kind;
        d.owner_pid = owner;
        d.async_sig = sig;
        Ok(())
    }

    /// Refuses pipes with an end held outside the tree (the restored pipe
    /// would lose its peer). Run after every process was collected.
    pub fn check_pipes(&self) -> Result<(), DumpError> {
        let mut modes: HashMap<u64, (bool, bool, i32, i32)> = HashMap::new();
        for (f, (pid, fd, _)) in self.files.iter().zip(&self.owners) {
            if f.kind == pb::FdKind::Pipe as i32 {
                let e = modes.entry(f.pipe_id).or_insert((false, false, *pid, *fd));
                if f.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                    e.1 = true;
                } else {
                    e.0 = true;
                }
            }
        }
        for (ino, (has_r, has_w, pid, fd)) in modes {
            if has_r && has_w {
                continue;
            }
            if let Some(holder) = outside_holder(&format!("pipe:[{ino}]"), &self.tree) {
                return Err(DumpError::Refused {
                    pid,
                    what: format!(
                        "fd {fd} (pipe:[{ino}]): the other end is held by {} outside the dumped tree",
                        procfs::describe(holder)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses FIFOs that a process outside the tree has open too: it would
    /// keep the FIFO's buffer alive, and restoring the saved bytes would
    /// queue them twice. Run after every process was collected.
    pub fn check_fifos(&self) -> Result<(), DumpError> {
        let mut seen = HashSet::new();
        for (f, (pid, fd, _)) in self.files.iter().zip(&self.owners) {
            if f.kind != pb::FdKind::Fifo as i32 || !seen.insert(f.pipe_id) {
                continue;
            }
            if let Some(holder) = outside_holder(&f.path, &self.tree) {
                return Err(DumpError::Refused {
                    pid: *pid,
                    what: format!(
                        "fd {fd} (FIFO {}): {} outside the dumped tree has it open too; its buffered data cannot \
                         move with the tree",
                        f.path,
                        procfs::describe(holder)
                    ),
                });
            }
        }
        Ok(())
    }

    fn describe(
        &mut self,
        pid: i32,
        fd: i32,
        info: &procfs::FdInfo,
        shell_job: bool,
        blobs: &mut Vec<Vec<u8>>,
    ) -> Result<pb::FileDesc, DumpError> {
        let link = procfs::readlink(pid, &format!("fd/{fd}")).map_err(proc_err(pid, "fd"))?;
        let refuse = |what: String| DumpError::Refused { pid, what: format!("fd {fd} ({link}): {what}") };
        let flags = info.flags & !(libc::O_CLOEXEC as u32);
        if link.contains("io_uring") {
            return Err(refuse("io_uring instances cannot be checkpointed".into()));
        }
        let kind = crate::fdkinds::kind_of(&link);
        if kind.is_none() && link.starts_with("anon_inode:") {
            return Err(refuse(format!(
                "{} descriptors are not supported yet",
                link.trim_start_matches("anon_inode:")
            )));
        }
        let fpath = procfs::path(pid, &format!("fd/{fd}"));
        let meta = std::fs::metadata(&fpath).map_err(proc_err(pid, "fd"))?;
        let ft = meta.file_type();
        let mut d = pb::FileDesc {
            kind: pb::FdKind::Unspecified as i32,
            path: link.clone(),
            flags,
            pos: info.pos,
            file: Some(file_id(&meta)),
            rdev: meta.rdev(),
            blob: -1,
            pipe_id: 0,
            pipe_size: 0,
            ..Default::default()
        };
        if let Some(kind) = kind {
            let text =
                std::fs::read_to_string(procfs::path(pid, &format!("fdinfo/{fd}"))).map_err(proc_err(pid, "fdinfo"))?;
            let mut ctx = crate::fdkinds::DumpCtx {
                pid,
                fd,
                link: &link,
                info,
                fdinfo: &text,
                blobs,
                ext_unix_sk: self.ext_unix_sk,
                tcp_established: self.tcp_established,
                repaired: &mut self.repaired,
                passing_ok: self.passing_ok,
            };
            crate::fdkinds::dump(kind, &mut ctx, &mut d).map_err(refuse)?;
        } else if link.starts_with("pipe:") {
            d.kind = pb::FdKind::Pipe as i32;
            d.pipe_id = meta.ino();
            self.save_pipe(pid, fd, &mut d, blobs)
                .map_err(|e| refuse(format!("cannot read its buffered data ({e})")))?;
        } else if ft.is_file() {
            if let Some(orig) = link.strip_suffix(" (deleted)").filter(|_| meta.nlink() == 0) {
                d.kind = pb::FdKind::DeletedFile as i32;
                d.path = orig.to_string();
                d.blob = self.save_deleted(&fpath, &meta, blobs).map_err(|source| DumpError::Io {
                    pid,
                    what: format!("cannot save deleted file {orig} (fd {fd})"),
                    source,
                })?;
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
            if link.ends_with(" (deleted)") {
                return Err(refuse("the FIFO was removed from the filesystem; nothing could open it again".into()));
            }
            check_same_file(&link, &meta).map_err(refuse)?;
            d.kind = pb::FdKind::Fifo as i32;
            d.pipe_id = meta.ino();
            self.save_pipe(pid, fd, &mut d, blobs)
                .map_err(|e| refuse(format!("cannot read its buffered data ({e})")))?;
        } else {
            return Err(refuse("this kind of file is not supported".into()));
        }
        Ok(d)
    }

    /// The blob holding the contents of the deleted file `meta` (opened
    /// through `path`, a /proc link), saved now if no other descriptor or
    /// mapping of the tree saved it already.
    pub fn save_deleted(
        &mut self,
        path: &std::path::Path,
        meta: &std::fs::Metadata,
        blobs: &mut Vec<Vec<u8>>,
    ) -> std::io::Result<i32> {
        if let Some(b) = self.deleted.get(&(meta.dev(), meta.ino())) {
            return Ok(*b);
        }
        if meta.size() > MAX_DELETED_FILE {
            return Err(std::io::Error::other(format!(
                "it holds {} bytes; floe saves deleted files of up to {} MiB (they are held in memory)",
                meta.size(),
                MAX_DELETED_FILE >> 20
            )));
        }
        let mut data = Vec::with_capacity(meta.size() as usize);
        std::fs::File::open(path)?.read_to_end(&mut data)?;
        let b = blobs.len() as i32;
        blobs.push(data);
        self.deleted.insert((meta.dev(), meta.ino()), b);
        Ok(b)
    }

    /// Saves a pipe's buffered bytes without consuming them: a second read
    /// end is opened through /proc and tee(2)'d into a private pipe.
    fn save_pipe(&mut self, pid: i32, fd: i32, d: &mut pb::FileDesc, blobs: &mut Vec<Vec<u8>>) -> std::io::Result<()> {
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(procfs::path(pid, &format!("fd/{fd}")))?;
        let size = task::fcntl_int(&reader, libc::F_GETPIPE_SZ, 0)?;
        d.pipe_size = size as u32;
        if !self.pipes_saved.insert(d.pipe_id) {
            return Ok(());
        }
        let (tmp_r, tmp_w) = task::pipe()?;
        task::fcntl_int(&tmp_w, libc::F_SETPIPE_SZ, size)?;
        let mut data = Vec::new();
        let n = match task::tee(&reader, &tmp_w, size as usize) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
            Err(e) => return Err(e),
        };
        if n > 0 {
            drop(tmp_w);
            std::fs::File::from(tmp_r).read_to_end(&mut data)?;
            d.blob = blobs.len() as i32;
            blobs.push(data);
        }
        Ok(())
    }
}

pub const LOCK_POSIX: i32 = 1;
pub const LOCK_FLOCK: i32 = 2;
pub const LOCK_OFD: i32 = 3;

/// Parses a lock line from fdinfo ("1: FLOCK  ADVISORY  WRITE 123 00:1f:456 0 EOF").
fn parse_lock(line: &str) -> Result<pb::FileLock, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return Err(format!("cannot parse lock line {line:?}"));
    }
    let kind = match f[1] {
        "POSIX" => LOCK_POSIX,
        "FLOCK" => LOCK_FLOCK,
        "OFDLCK" => LOCK_OFD,
        other => return Err(format!("{other} locks (leases, delegations) cannot be checkpointed")),
    };
    if f[2] != "ADVISORY" {
        return Err(format!("{} locks are not supported", f[2]));
    }
    let write = match f[3] {
        "WRITE" => true,
        "READ" => false,
        other => return Err(format!("lock type {other} is not supported")),
    };
    let start: u64 = f[6].parse().map_err(|_| format!("cannot parse lock start in {line:?}"))?;
    let len = if f[7] == "EOF" {
        0
    } else {
        let end: u64 = f[7].parse().map_err(|_| format!("cannot parse lock end in {line:?}"))?;
        end.saturating_sub(start) + 1
    };
    Ok(pb::FileLock { kind, write, start, len })
}

/// A process outside `tree` holding a descriptor whose link is `link`.
fn outside_holder(link: &str, tree: &HashSet<i32>) -> Option<i32> {
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if tree.contains(&pid) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for f in fds.flatten() {
            if std::fs::read_link(f.path()).map(|l| l.to_string_lossy() == link).unwrap_or(false) {
                return Some(pid);
            }
        }
    }
    None
}

fn check_same_file(path: &str, meta: &std::fs::Metadata) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.dev() == meta.dev() && m.ino() == meta.ino() => Ok(()),
        Ok(_) => Err(format!("the path {path} now names a different file than the open one")),
        Err(e) => Err(format!("the path {path} cannot be reached from floe ({e})")),
    }
}
