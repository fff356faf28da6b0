//! Checks run before any process is created.
use super::{RestoreError, RestoreOptions};
use crate::image::ImageReader;
use crate::procfs;
use crate::sys::memory::{read_remote, Range};
use floe_proto::image as pb;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::{Duration, Instant};

/// What preflight learned that the later stages use.
pub struct Preflight {
    pub pid: i32,
    /// Restore into a new pid namespace.
    pub new_pidns: bool,
    /// floe's descriptor that is a terminal, for `--shell-job`.
    pub terminal_fd: Option<i32>,
    /// This host's vdso block: (start, end) of [vdso] and the whole block.
    pub host_vdso: (u64, u64),
    pub host_block: (u64, u64),
    pub host_parts: Vec<(String, u64, u64)>,
    /// --tcp-close: established TCP connections come back closed.
    pub tcp_close: bool,
    /// Restored connections stay in repair mode until the tree is released.
    pub tcp_hold: bool,
    /// Deleted files that processes map or run, recreated (unlinked) from
    /// the image or from what a migration's source sent, by (dev, inode) at
    /// the dump.
    pub deleted: DeletedFiles,
}

/// Recreated deleted files (see [`Preflight::deleted`]).
pub type DeletedFiles = std::collections::HashMap<(u64, u64), std::sync::Arc<std::fs::File>>;

/// A deleted file that the image's processes map or run.
pub struct DeletedNeed<'m> {
    /// (dev, inode) at the dump.
    pub id: (u64, u64),
    /// Index into the manifest's blobs (-1: not in the image).
    pub blob: i32,
    /// Where it was.
    pub path: &'m str,
    pub mode: u32,
    pub size: u64,
}

/// The deleted files the image's processes map or run, each once.
pub fn deleted_files_of(m: &pb::Manifest) -> Vec<DeletedNeed<'_>> {
    let mut out: Vec<DeletedNeed<'_>> = Vec::new();
    for p in m.processes.iter().filter(|p| !p.zombie) {
        let vmas = p.vmas.iter().filter(|v| v.deleted).map(|v| (v.deleted_blob, v.path.as_str(), v.file.as_ref()));
        let exe = p.exe_blob.map(|b| (b, p.exe_path.as_str(), p.exe_id.as_ref()));
        for (blob, path, id) in vmas.chain(exe) {
            let id = id.cloned().unwrap_or_default();
            if !out.iter().any(|o| o.id == (id.dev, id.ino)) {
                out.push(DeletedNeed { id: (id.dev, id.ino), blob, path, mode: id.mode & 0o7777, size: id.size });
            }
        }
    }
    out
}

/// How long to wait for a zombie holding the pid to be reaped.
pub const ZOMBIE_WAIT: Duration = Duration::from_secs(10);

fn file_err(path: &str, what: impl Into<String>) -> RestoreError {
    RestoreError::File { path: path.to_string(), what: what.into() }
}

impl Preflight {
    /// Checks the image against this host, and recreates the deleted files
    /// its processes map or run (unlinked: they vanish with the restore if it fails).
    pub fn check(img: &ImageReader, opts: &RestoreOptions) -> Result<Self, RestoreError> {
        let mut pre = Self::check_state(&img.manifest, opts)?;
        for d in deleted_files_of(&img.manifest) {
            check_deleted(&img.manifest, d.path, d.blob)?;
            let data = img.read_blob(d.blob as usize)?;
            pre.deleted.insert(d.id, recreate(d.path, &data, d.mode)?);
        }
        Ok(pre)
    }

    /// [`Preflight::check`] on a manifest (live migration: the state sent
    /// by the source before any page), with the contents of the deleted
    /// files its processes map or run, by (dev, inode), sent beside it.
    pub fn check_manifest(
        m: &pb::Manifest,
        opts: &RestoreOptions,
        deleted: &std::collections::HashMap<(u64, u64), Vec<u8>>,
    ) -> Result<Self, RestoreError> {
        let mut pre = Self::check_state(m, opts)?;
        for d in deleted_files_of(m) {
            let data = deleted
                .get(&d.id)
                .ok_or_else(|| file_err(d.path, "was deleted, and its contents did not come with the process state"))?;
            if data.len() as u64 != d.size {
                return Err(file_err(
                    d.path,
                    format!("was deleted, and {} bytes of it came, not {}", data.len(), d.size),
                ));
            }
            pre.deleted.insert(d.id, recreate(d.path, data, d.mode)?);
        }
        Ok(pre)
    }

    fn check_state(m: &pb::Manifest, opts: &RestoreOptions) -> Result<Self, RestoreError> {
        let root = m
            .processes
            .first()
            .filter(|p| p.pid == m.root_pid)
            .ok_or_else(|| RestoreError::Refused { what: "the first process record is not the root".into() })?;
        let mut needs_tty = false;
        for f in &m.files {
            match pb::FdKind::try_from(f.kind).unwrap_or(pb::FdKind::Unspecified) {
                pb::FdKind::Regular => check_file(&f.path, f.file.as_ref(), false)?,
                pb::FdKind::Directory => {
                    if !std::path::Path::new(&f.path).is_dir() {
                        return Err(file_err(&f.path, "open directory is missing"));
                    }
                }
                pb::FdKind::DeletedFile => {
                    let dir = std::path::Path::new(&f.path).parent().map(|d| d.to_path_buf()).unwrap_or_default();
                    if !dir.is_dir() {
                        return Err(file_err(&f.path, "directory of the deleted file is missing"));
                    }
                }
                pb::FdKind::CharDevice => {
                    let dev = crate::dump::simple_device(f.rdev).ok_or_else(|| file_err(&f.path, "unknown device"))?;
                    let meta = std::fs::metadata(dev).map_err(|e| file_err(dev, format!("missing ({e})")))?;
                    if meta.rdev() != f.rdev {
                        return Err(file_err(dev, "is a different device on this host"));
                    }
                }
                pb::FdKind::Tty => needs_tty = true,
                pb::FdKind::Pipe
                | pb::FdKind::Eventfd
                | pb::FdKind::Signalfd
                | pb::FdKind::Timerfd
                | pb::FdKind::Epoll
                | pb::FdKind::Inotify
                | pb::FdKind::Memfd
                | pb::FdKind::UnixSocket
                | pb::FdKind::InetSocket
                | pb::FdKind::NetlinkSocket => {}
                pb::FdKind::Fifo => match std::fs::symlink_metadata(&f.path) {
                    Ok(m) if m.file_type().is_fifo() => {}
                    Ok(_) => return Err(file_err(&f.path, "the process had a FIFO open here; now it is not a FIFO")),
                    // Made again (mkfifo) where it was.
                    Err(_) => {
                        let dir = std::path::Path::new(&f.path).parent().unwrap_or(std::path::Path::new("/"));
                        if !dir.is_dir() {
                            return Err(file_err(&f.path, "the FIFO is missing, and so is its directory"));
                        }
                    }
                },
                pb::FdKind::Unspecified => {
                    return Err(RestoreError::Refused {
                        what: format!("{}: this kind of descriptor cannot be restored", f.path),
                    })
                }
            }
        }
        let (host_vdso, host_block, host_parts) = host_vdso_block()?;
        let our_parts: Vec<(String, u64)> = host_parts.iter().map(|(n, s, e)| (n.clone(), e - s)).collect();
        let mut code = vec![0u8; (host_vdso.1 - host_vdso.0) as usize];
        let me = std::process::id() as i32;
        let n = read_remote(me, &mut code, &[Range { addr: host_vdso.0, len: host_vdso.1 - host_vdso.0 }])
            .map_err(|e| RestoreError::Incompatible { what: format!("cannot read this host's vdso ({e})") })?;
        code.truncate(n);
        let our_hash = blake3::hash(&code);
        for p in &m.processes {
            if p.zombie {
                continue;
            }
            for th in &p.threads {
                if th.gpregs.len() != 27 * 8 {
                    return Err(RestoreError::Refused {
                        what: format!("thread {}: register block has {} bytes, expected 216", th.tid, th.gpregs.len()),
                    });
                }
                check_realtime(p.pid, th)?;
            }
            // Files the process maps must be here, unchanged; deleted ones
            // are recreated in the directory they were in.
            // (Deleted ones are checked and recreated by the callers.)
            for v in &p.vmas {
                let file = v.kind == pb::VmaKind::FilePrivate as i32 || v.kind == pb::VmaKind::FileShared as i32;
                if file && !v.deleted {
                    check_file(&v.path, v.file.as_ref(), true)?;
                }
            }
            if p.exe_blob.is_none() {
                check_file(&p.exe_path, p.exe_id.as_ref(), true)?;
            }
            // A removed working directory is made anew in the directory it was in.
            let parent = std::path::Path::new(&p.cwd).parent().unwrap_or(std::path::Path::new("/"));
            if p.cwd_deleted && !parent.is_dir() {
                return Err(file_err(
                    &p.cwd,
                    format!("removed working directory of process {}: the directory it was in is missing", p.pid),
                ));
            }
            let cwd = Some(("working directory", &p.cwd)).filter(|_| !p.cwd_deleted);
            for (what, path) in cwd.into_iter().chain([("root directory", &p.root)]) {
                if !std::path::Path::new(path).is_dir() {
                    return Err(file_err(path, format!("{what} of process {} is missing", p.pid)));
                }
            }
            let vd = p
                .vdso
                .as_ref()
                .ok_or_else(|| RestoreError::Refused { what: format!("process {} has no vdso record", p.pid) })?;
            let img_parts: Vec<(String, u64)> = vd.parts.iter().map(|v| (v.name.clone(), v.end - v.start)).collect();
            if img_parts != our_parts {
                return Err(RestoreError::Incompatible {
                    what: format!(
                        "vdso layout differs (image {img_parts:?}, this kernel {our_parts:?}); restore on a host running the same kernel"
                    ),
                });
            }
            if our_hash.as_bytes()[..] != vd.vdso_blake3[..] {
                return Err(RestoreError::Incompatible {
                    what: "vdso code differs from the dumping kernel's; restore on a host running the same kernel"
                        .into(),
                });
            }
        }
        let terminal_fd = if needs_tty {
            if !opts.shell_job {
                return Err(RestoreError::Refused {
                    what: "the process was attached to a terminal; pass --shell-job to attach it to floe's terminal"
                        .into(),
                });
            }
            let fd = (0..3).find(|fd| crate::sys::task::isatty(*fd));
            Some(fd.ok_or_else(|| RestoreError::Refused {
                what: "--shell-job needs floe's stdin, stdout or stderr to be a terminal".into(),
            })?)
        } else {
            None
        };
        if !opts.new_pidns {
            for p in &m.processes {
                check_pid(p.pid)?;
                for th in p.threads.iter().skip(1) {
                    check_pid(th.tid)?;
                }
            }
        }
        let established = m.files.iter().filter(|f| f.inet_socket.as_ref().is_some_and(|s| s.tcp.is_some())).count();
        if established > 0 && !opts.tcp_established && !opts.tcp_close {
            return Err(RestoreError::Refused {
                what: format!(
                    "the image holds {established} established TCP connection(s); pass --tcp-established to restore \
                     them, or --tcp-close to restore them closed"
                ),
            });
        }
        Ok(Self {
            pid: root.pid,
            new_pidns: opts.new_pidns,
            terminal_fd,
            host_vdso,
            host_block,
            host_parts,
            tcp_close: opts.tcp_close,
            tcp_hold: opts.tcp_hold,
            deleted: DeletedFiles::new(),
        })
    }
}

/// A deleted file the image holds: its blob exists.
fn check_deleted(m: &pb::Manifest, path: &str, blob: i32) -> Result<(), RestoreError> {
    if blob < 0 || blob as usize >= m.blobs.len() {
        return Err(file_err(path, "was deleted, and the image does not hold its contents"));
    }
    Ok(())
}

/// Recreates a deleted file (unlinked, in the directory it was in) and
/// keeps it read-only: a file open for writing cannot become an executable
/// (PR_SET_MM_MAP's exe_fd); the stubs open it anew.
fn recreate(path: &str, data: &[u8], mode: u32) -> Result<std::sync::Arc<std::fs::File>, RestoreError> {
    if let Some(name) = path.strip_prefix("/memfd:") {
        // A memfd mapped privately: a memfd of that name again.
        let err = |e: std::io::Error| file_err(path, format!("cannot recreate the memfd ({e})"));
        let fd = crate::sys::fd_memfd::memfd_create(name, false).map_err(err)?;
        std::os::unix::fs::FileExt::write_all_at(&std::fs::File::from(fd.try_clone().map_err(err)?), data, 0)
            .map_err(err)?;
        return Ok(std::sync::Arc::new(std::fs::File::from(fd)));
    }
    let dir = std::path::Path::new(path).parent().unwrap_or(std::path::Path::new("/"));
    if !dir.is_dir() {
        return Err(file_err(path, "was deleted, and the directory to recreate it in is missing"));
    }
    let f = super::files::recreate_deleted(path, data, mode)?;
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f)))
        .map_err(|e| file_err(path, format!("cannot reopen the recreated deleted file ({e})")))?;
    Ok(std::sync::Arc::new(ro))
}

fn check_file(path: &str, id: Option<&pb::FileId>, exact: bool) -> Result<(), RestoreError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| file_err(path, format!("needed by the image but missing or unreadable ({e})")))?;
    if !meta.is_file() {
        return Err(file_err(path, "is no longer a regular file"));
    }
    if let Some(id) = id {
        if exact && (meta.size() != id.size || meta.mtime() * 1_000_000_000 + meta.mtime_nsec() != id.mtime_ns) {
            return Err(file_err(
                path,
                format!("changed since the dump (size {} → {}); mapped files must be identical", id.size, meta.size()),
            ));
        }
        if !exact && meta.size() < id.size {
            return Err(file_err(path, format!("shrank since the dump (size {} → {})", id.size, meta.size())));
        }
    }
    Ok(())
}

/// This host's vdso block as "name:bytes" parts and the vdso code's blake3
/// (what a process restored here finds at its vdso).
pub fn host_vdso_facts() -> Result<(Vec<String>, [u8; 32]), RestoreError> {
    let (vdso, _, parts) = host_vdso_block()?;
    let mut code = vec![0u8; (vdso.1 - vdso.0) as usize];
    let me = std::process::id() as i32;
    let n = read_remote(me, &mut code, &[Range { addr: vdso.0, len: vdso.1 - vdso.0 }])
        .map_err(|e| RestoreError::Incompatible { what: format!("cannot read this host's vdso ({e})") })?;
    code.truncate(n);
    Ok((parts.iter().map(|(n, s, e)| format!("{n}:{}", e - s)).collect(), *blake3::hash(&code).as_bytes()))
}

type Parts = Vec<(String, u64, u64)>;
type HostVdso = ((u64, u64), (u64, u64), Parts);

fn host_vdso_block() -> Result<HostVdso, RestoreError> {
    let me = std::process::id() as i32;
    let maps = procfs::maps(me, false)
        .map_err(|e| RestoreError::Incompatible { what: format!("cannot read own maps ({e})") })?;
    let parts: Parts =
        maps.iter().filter(|m| crate::dump::is_vdso_part(&m.path)).map(|m| (m.path.clone(), m.start, m.end)).collect();
    let vdso = parts
        .iter()
        .find(|p| p.0 == "[vdso]")
        .map(|p| (p.1, p.2))
        .ok_or_else(|| RestoreError::Incompatible { what: "this process has no vdso".into() })?;
    let start = parts.first().map(|p| p.1).unwrap_or(vdso.0);
    let end = parts.last().map(|p| p.2).unwrap_or(vdso.1);
    Ok((vdso, (start, end), parts))
}

/// Fails unless `pid` is free, waiting (bounded) for a zombie to be reaped.
pub fn check_pid(pid: i32) -> Result<(), RestoreError> {
    let max: i64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(i64::MAX);
    if pid as i64 >= max {
        return Err(RestoreError::PidMax { pid, max });
    }
    wait_pid_free(pid)
}

pub fn wait_pid_free(pid: i32) -> Result<(), RestoreError> {
    let t = Instant::now();
    loop {
        match procfs::status(pid) {
            Err(_) => return Ok(()),
            Ok(st) if st.state == 'Z' || st.state == 'X' => {
                if t.elapsed() > ZOMBIE_WAIT {
                    return Err(RestoreError::PidZombie { pid, secs: ZOMBIE_WAIT.as_secs() });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(_) => return Err(RestoreError::PidTaken { pid, owner: procfs::describe(pid) }),
        }
    }
}

/// A real-time policy (SCHED_FIFO, SCHED_RR) must be one this host lets
/// floe give: tried on a thread of floe's own, which then exits, so that a
/// refusal (no CAP_SYS_NICE, no real-time budget in the cgroup) comes
/// before anything is created.
fn check_realtime(pid: i32, th: &pb::Thread) -> Result<(), RestoreError> {
    let policy = th.sched_policy & !crate::sys::task::SCHED_RESET_ON_FORK;
    if policy != libc::SCHED_FIFO && policy != libc::SCHED_RR {
        return Ok(());
    }
    let (want, prio) = (th.sched_policy, th.sched_priority);
    let tried = std::thread::spawn(move || crate::sys::task::set_scheduler(0, want, prio)).join();
    match tried {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RestoreError::Incompatible {
            what: format!(
                "thread {} of process {pid} runs under real-time policy {policy} priority {prio}, which this host \
                 does not allow ({e}); give floe CAP_SYS_NICE and a real-time budget, or change the thread's policy",
                th.tid
            ),
        }),
        Err(_) => Err(RestoreError::Refused { what: "the real-time policy check panicked".into() }),
    }
}
