//! Descriptors: floe opens (or creates) every open file description of the
//! image once, in its own process, then hands each to the processes that
//! hold it with SCM_RIGHTS over a unix socket the stub binds. Descriptions
//! shared between descriptors or processes thus stay shared, with one offset.
use super::preflight::Preflight;
use super::stub::Stub;
use super::RestoreError;
use crate::dump::simple_device;
use crate::image::ImageReader;
use crate::sys::task;
use floe_proto::image as pb;
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

/// Every description of the image, opened in floe.
pub struct OpenFiles {
    fds: Vec<Option<OwnedFd>>,
    /// Restored TCP connections kept in repair mode (`tcp_hold`).
    pub held: Vec<crate::fdkinds::socket::HeldConn>,
    /// Recreated deleted files by blob (mapped, run or open).
    deleted: super::preflight::DeletedFiles,
}

const CREATION_FLAGS: u32 = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32;
/// Status flags fcntl(F_SETFL) can change.
const SETFL_MASK: i32 = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;

fn ferr(path: &str, what: String) -> RestoreError {
    RestoreError::File { path: path.to_string(), what }
}

/// Opens description `f` of a kind the fdkinds modules handle.
#[allow(clippy::too_many_arguments)]
fn restore_kind(
    kind: pb::FdKind,
    f: &pb::FileDesc,
    img: &ImageReader,
    opened: &[Option<OwnedFd>],
    stash: &mut HashMap<String, OwnedFd>,
    shm: &HashMap<u64, OwnedFd>,
    pre: &Preflight,
    held: &mut Vec<crate::fdkinds::socket::HeldConn>,
) -> Result<OwnedFd, RestoreError> {
    let mut ctx =
        crate::fdkinds::RestoreCtx { img, opened, stash, shm, tcp_close: pre.tcp_close, tcp_hold: pre.tcp_hold, held };
    crate::fdkinds::restore(kind, f, &mut ctx).map_err(|what| ferr(&f.path, what))
}

struct PipePair {
    read: Option<OwnedFd>,
    write: Option<OwnedFd>,
    /// Keeps an end the image does not have open until every end is made.
    keep: Vec<OwnedFd>,
}

impl OpenFiles {
    /// `host_pid` maps an image pid to the pid floe sees (they differ under `-n`).
    pub fn open(
        img: &ImageReader,
        pre: &Preflight,
        shm: &HashMap<u64, OwnedFd>,
        host_pid: &dyn Fn(i32) -> Option<i32>,
    ) -> Result<Self, RestoreError> {
        let me = std::process::id();
        let mut pipes: HashMap<u64, PipePair> = HashMap::new();
        let mut fifos: HashMap<u64, OwnedFd> = HashMap::new();
        let mut fds: Vec<Option<OwnedFd>> = Vec::with_capacity(img.manifest.files.len());
        let mut stash = HashMap::new();
        let mut held = Vec::new();
        let mut later = Vec::new();
        // Deleted files by blob: descriptions of one file share it.
        let mut deleted = pre.deleted.clone();
        for (idx, f) in img.manifest.files.iter().enumerate() {
            let kind = pb::FdKind::try_from(f.kind).unwrap_or(pb::FdKind::Unspecified);
            if crate::fdkinds::restore_last(kind) {
                later.push(idx);
                fds.push(None);
                continue;
            }
            let flags = (f.flags & !CREATION_FLAGS) as i32;
            let fd = match kind {
                pb::FdKind::Regular | pb::FdKind::Directory => {
                    let fd =
                        task::open_raw(&f.path, flags).map_err(|e| ferr(&f.path, format!("cannot reopen ({e})")))?;
                    if f.pos != 0 {
                        task::seek_to(&fd, f.pos)
                            .map_err(|e| ferr(&f.path, format!("cannot seek to {} ({e})", f.pos)))?;
                    }
                    fd
                }
                pb::FdKind::CharDevice => {
                    let dev = simple_device(f.rdev).ok_or_else(|| ferr(&f.path, "unknown device".into()))?;
                    task::open_raw(dev, flags).map_err(|e| ferr(dev, format!("cannot open ({e})")))?
                }
                pb::FdKind::Tty => {
                    let t = pre
                        .terminal_fd
                        .ok_or_else(|| RestoreError::Refused { what: "no terminal for --shell-job".into() })?;
                    let p = format!("/proc/{me}/fd/{t}");
                    task::open_raw(&p, flags).map_err(|e| ferr(&p, format!("cannot reopen floe's terminal ({e})")))?
                }
                pb::FdKind::DeletedFile => {
                    // One file per deleted file, shared with its mappings.
                    let id = f.file.as_ref().map(|i| (i.dev, i.ino)).unwrap_or_default();
                    let tmp = match deleted.get(&id) {
                        Some(t) => t.clone(),
                        None => {
                            let data = img.read_blob(f.blob as usize)?;
                            let t = std::sync::Arc::new(recreate_deleted(&f.path, &data, 0o600)?);
                            deleted.insert(id, t.clone());
                            t
                        }
                    };
                    let p = format!("/proc/{me}/fd/{}", tmp.as_raw_fd());
                    let fd = task::open_raw(&p, flags)
                        .map_err(|e| ferr(&f.path, format!("cannot reopen recreated file ({e})")))?;
                    if f.pos != 0 {
                        task::seek_to(&fd, f.pos)
                            .map_err(|e| ferr(&f.path, format!("cannot seek to {} ({e})", f.pos)))?;
                    }
                    fd
                }
                pb::FdKind::Pipe => {
                    let name = format!("pipe:[{}]", f.pipe_id);
                    let pair = match pipes.entry(f.pipe_id) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let (r, w) = task::pipe().map_err(|e| ferr(&name, format!("cannot create pipe ({e})")))?;
                            if f.pipe_size > 0 {
                                task::fcntl_int(&w, libc::F_SETPIPE_SZ, f.pipe_size as i32)
                                    .map_err(|e| ferr(&name, format!("cannot set pipe size {} ({e})", f.pipe_size)))?;
                            }
                            e.insert(PipePair { read: Some(r), write: Some(w), keep: Vec::new() })
                        }
                    };
                    let want_write = flags & libc::O_ACCMODE == libc::O_WRONLY;
                    let slot = if want_write { &mut pair.write } else { &mut pair.read };
                    let fd = match slot.take() {
                        Some(fd) => {
                            // Keep a reference so a second description of this end can be reopened.
                            let copy = fd.try_clone().map_err(|e| ferr(&name, format!("dup failed ({e})")))?;
                            pair.keep.push(copy);
                            fd
                        }
                        None => {
                            let end = pair.keep.iter().find(|k| {
                                let fl = task::fcntl_int(*k, libc::F_GETFL, 0).unwrap_or(0);
                                (fl & libc::O_ACCMODE == libc::O_WRONLY) == want_write
                            });
                            let end = end.ok_or_else(|| ferr(&name, "pipe end missing".into()))?;
                            let p = format!("/proc/{me}/fd/{}", end.as_raw_fd());
                            task::open_raw(&p, (flags & libc::O_ACCMODE) | libc::O_NONBLOCK)
                                .map_err(|e| ferr(&name, format!("cannot reopen pipe end ({e})")))?
                        }
                    };
                    if f.blob >= 0 {
                        let data = img.read_blob(f.blob as usize)?;
                        let w = pair.write.as_ref().or_else(|| {
                            pair.keep.iter().find(|k| {
                                task::fcntl_int(*k, libc::F_GETFL, 0).unwrap_or(0) & libc::O_ACCMODE == libc::O_WRONLY
                            })
                        });
                        let w = w.ok_or_else(|| ferr(&name, "no write end to refill the pipe".into()))?;
                        let mut file =
                            std::fs::File::from(w.try_clone().map_err(|e| ferr(&name, format!("dup failed ({e})")))?);
                        file.write_all(&data)
                            .map_err(|e| ferr(&name, format!("cannot refill {} buffered bytes ({e})", data.len())))?;
                    }
                    task::fcntl_int(&fd, libc::F_SETFL, flags & SETFL_MASK)
                        .map_err(|e| ferr(&name, format!("cannot set status flags ({e})")))?;
                    fd
                }
                pb::FdKind::Fifo => {
                    // One reader-writer per FIFO keeps it open (so that no
                    // open blocks and the refilled bytes stay) until every
                    // description of it is made.
                    let keeper = match fifos.entry(f.pipe_id) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => e.insert(open_fifo(f)?),
                    };
                    if f.blob >= 0 {
                        let data = img.read_blob(f.blob as usize)?;
                        let mut w = std::fs::File::from(
                            keeper.try_clone().map_err(|e| ferr(&f.path, format!("dup failed ({e})")))?,
                        );
                        w.write_all(&data)
                            .map_err(|e| ferr(&f.path, format!("cannot refill {} buffered bytes ({e})", data.len())))?;
                    }
                    let p = format!("/proc/{me}/fd/{}", keeper.as_raw_fd());
                    let fd = task::open_raw(&p, (flags & libc::O_ACCMODE) | libc::O_NONBLOCK)
                        .map_err(|e| ferr(&f.path, format!("cannot open the FIFO ({e})")))?;
                    task::fcntl_int(&fd, libc::F_SETFL, flags & SETFL_MASK)
                        .map_err(|e| ferr(&f.path, format!("cannot set status flags ({e})")))?;
                    fd
                }
                pb::FdKind::Unspecified => {
                    return Err(RestoreError::Refused {
                        what: format!("{}: this kind of descriptor cannot be restored", f.path),
                    })
                }
                other => restore_kind(other, f, img, &fds, &mut stash, shm, pre, &mut held)?,
            };
            fds.push(Some(fd));
        }
        for idx in later {
            let f = &img.manifest.files[idx];
            let kind = pb::FdKind::try_from(f.kind).unwrap_or(pb::FdKind::Unspecified);
            let fd = restore_kind(kind, f, img, &fds, &mut stash, shm, pre, &mut held)?;
            fds[idx] = Some(fd);
        }
        // Signal-driven I/O: owner and signal, then O_ASYNC itself.
        for (f, fd) in img.manifest.files.iter().zip(&fds) {
            let Some(fd) = fd else { continue };
            if f.flags & libc::O_ASYNC as u32 == 0 {
                continue;
            }
            let owner = if f.owner_pid == 0 {
                0
            } else {
                host_pid(f.owner_pid)
                    .ok_or_else(|| ferr(&f.path, format!("signal owner {} is not restored", f.owner_pid)))?
            };
            let kind = if f.owner_type == 0 { task::F_OWNER_PID } else { f.owner_type };
            let set = task::set_owner(fd, kind, owner)
                .and_then(|()| task::fcntl_int(fd, task::F_SETSIG, f.async_sig))
                .and_then(|_| task::fcntl_int(fd, libc::F_GETFL, 0))
                .and_then(|fl| task::fcntl_int(fd, libc::F_SETFL, fl | libc::O_ASYNC));
            set.map_err(|e| ferr(&f.path, format!("cannot restore signal-driven I/O ({e})")))?;
        }
        Ok(Self { fds, held, deleted })
    }

    /// The recreated deleted file that was (dev, inode) `id` at the dump.
    pub fn deleted(&self, id: (u64, u64)) -> Option<&std::fs::File> {
        self.deleted.get(&id).map(|f| f.as_ref())
    }

    pub fn get(&self, idx: u32) -> Option<&OwnedFd> {
        self.fds.get(idx as usize).and_then(Option::as_ref)
    }
}

/// Opens the FIFO of `f` read-write without blocking (made again with its
/// old mode if it is gone), with the pipe size it had.
fn open_fifo(f: &pb::FileDesc) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(&f.path).is_err() {
        let mode = f.file.as_ref().map(|i| i.mode & 0o7777).unwrap_or(0o600);
        task::mkfifo(&f.path, mode).map_err(|e| ferr(&f.path, format!("cannot make the FIFO again ({e})")))?;
    }
    let k = task::open_raw(&f.path, libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .map_err(|e| ferr(&f.path, format!("cannot open the FIFO ({e})")))?;
    let meta = std::fs::File::from(k.try_clone().map_err(|e| ferr(&f.path, format!("dup failed ({e})")))?)
        .metadata()
        .map_err(|e| ferr(&f.path, format!("cannot stat the FIFO ({e})")))?;
    if !meta.file_type().is_fifo() {
        return Err(ferr(&f.path, "the process had a FIFO open here; now it is not a FIFO".into()));
    }
    if f.pipe_size > 0 {
        task::fcntl_int(&k, libc::F_SETPIPE_SZ, f.pipe_size as i32)
            .map_err(|e| ferr(&f.path, format!("cannot set pipe size {} ({e})", f.pipe_size)))?;
    }
    Ok(k)
}

/// Creates an unlinked file with `data` and permission bits `mode` in the
/// directory `path` was in.
pub(super) fn recreate_deleted(path: &str, data: &[u8], mode: u32) -> Result<std::fs::File, RestoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = std::path::Path::new(path).parent().unwrap_or(std::path::Path::new("/"));
    let err = |e: std::io::Error| ferr(path, format!("cannot recreate deleted file ({e})"));
    let mut f =
        match std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir) {
            Ok(f) => f,
            Err(_) => {
                let tmp = dir.join(format!(".floe-deleted-{}", std::process::id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(err)?;
                std::fs::remove_file(&tmp).map_err(err)?;
                f
            }
        };
    f.write_all(data).map_err(err)?;
    if mode != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(f)
}

/// Installs the process's descriptors: floe sends each description with
/// SCM_RIGHTS to a datagram socket the stub bound, the stub receives it and
/// moves it to its number.
pub fn install(stub: &mut Stub, refs: &[pb::FdRef], files: &OpenFiles, sender: &OwnedFd) -> Result<(), RestoreError> {
    let targets: Vec<i32> = refs.iter().map(|r| r.fd).collect();
    stub.installer(&targets)?;
    for r in refs {
        let fd = files
            .get(r.file)
            .ok_or_else(|| RestoreError::Refused { what: format!("fd {} refers to a missing description", r.fd) })?;
        let got = stub.receive_fd(sender, fd.as_raw_fd())?;
        let target = r.fd as u64;
        let inj = stub.leader();
        if got != target {
            let fl = if r.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
            inj.call(libc::SYS_dup3, [got, target, fl, 0, 0, 0])?;
            inj.call(libc::SYS_close, [got, 0, 0, 0, 0, 0])?;
        } else if r.cloexec {
            inj.call(libc::SYS_fcntl, [got, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64, 0, 0, 0])?;
        }
    }
    stub.close_installer()
}
