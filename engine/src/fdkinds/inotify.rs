//! inotify descriptors: the watches (path, mask) under their watch
//! descriptor numbers.
//!
//! Dump: each fdinfo "inotify wd:" line carries the watched inode's file
//! handle; it is opened with open_by_handle_at through a mount of its
//! filesystem (matched by device number in floe's mountinfo) and the path
//! read back from /proc/self/fd. A watched object that cannot be found that
//! way (deleted, filesystem without file handles, not mounted where floe can
//! see it) is refused, and so are unread queued events (they cannot be put
//! back into a new instance).
//!
//! Restore: a new instance hands out watch descriptors in increasing order
//! from 1 and never reuses a number (the kernel allocates them cyclically);
//! watches are added in wd order and gaps are filled by adding and removing
//! throwaway watches. The IN_IGNORED events this leaves are drained.
use super::{DumpCtx, RestoreCtx};
use crate::sys::{fd_epoll, task};
use floe_proto::image as pb;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Highest watch descriptor this version reproduces: every lower number that
/// is not a watch any more costs a throwaway watch at restore.
pub const MAX_WD: i32 = 1 << 20;

/// Objects throwaway watches are put on (the first not already watched).
const BURN_PATHS: &[&str] = &["/", "/proc", "/sys", "/dev", "/etc", "/usr", "/var", "/tmp", "/run"];

/// Splits fdinfo fields "key:value" into pairs.
fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace().filter_map(|t| t.split_once(':')).collect()
}

fn hex<T: TryFrom<u64>>(f: &HashMap<&str, &str>, key: &str) -> Option<T> {
    u64::from_str_radix(f.get(key)?, 16).ok().and_then(|v| T::try_from(v).ok())
}

struct Mark {
    wd: i32,
    ino: u64,
    /// Kernel-internal device number (major << 20 | minor).
    sdev: u32,
    mask: u32,
    handle: Option<(i32, Vec<u8>)>,
}

fn parse_mark(line: &str) -> Option<Mark> {
    let f = fields(line);
    let handle = match (hex::<u32>(&f, "fhandle-type"), f.get("f_handle")) {
        (Some(t), Some(h)) if h.len() % 2 == 0 => {
            let bytes: Option<Vec<u8>> =
                (0..h.len()).step_by(2).map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok()).collect();
            Some((t as i32, bytes?))
        }
        _ => None,
    };
    Some(Mark { wd: hex(&f, "wd")?, ino: hex(&f, "ino")?, sdev: hex(&f, "sdev")?, mask: hex(&f, "mask")?, handle })
}

pub fn dump(ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    let pidfd = task::pidfd_open(ctx.pid).map_err(|e| format!("pidfd_open failed ({e})"))?;
    let own = task::pidfd_getfd(&pidfd, ctx.fd).map_err(|e| format!("pidfd_getfd failed ({e})"))?;
    let queued = fd_epoll::bytes_queued(&own).map_err(|e| format!("cannot count its queued events ({e})"))?;
    if queued > 0 {
        return Err(format!(
            "{queued} bytes of unread inotify events are queued; they cannot be restored \
             (dump again once the process has read them)"
        ));
    }
    let mut watches = Vec::new();
    for line in ctx.fdinfo.lines().filter_map(|l| l.strip_prefix("inotify ")) {
        let m = parse_mark(line).ok_or_else(|| format!("unexpected inotify fdinfo line {line:?}"))?;
        if m.wd < 1 || m.wd > MAX_WD {
            return Err(format!("watch descriptor {} is too high to reproduce (at most {MAX_WD})", m.wd));
        }
        let dev = libc::makedev(m.sdev >> 20, m.sdev & 0xf_ffff);
        let path = find_path(&m, dev, ctx.pid).map_err(|why| {
            format!(
                "watch {} (mask {:#x}) is on inode {} of device {}:{} which cannot be found: {why}",
                m.wd,
                m.mask,
                m.ino,
                m.sdev >> 20,
                m.sdev & 0xf_ffff
            )
        })?;
        watches.push(pb::InotifyWatch { wd: m.wd, path, mask: m.mask, ino: m.ino, dev });
    }
    watches.sort_by_key(|w| w.wd);
    d.inotify = Some(pb::Inotify { watches });
    Ok(())
}

/// One line of /proc/self/mountinfo: device, root within the filesystem, mount point.
struct Mount {
    major: u32,
    minor: u32,
    root: String,
    point: String,
}

/// Undoes mountinfo's octal escapes (\040 for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(v) = s.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Result<Vec<Mount>, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read mountinfo ({e})"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (ma, mi) = f.get(2)?.split_once(':')?;
            Some(Mount {
                major: ma.parse().ok()?,
                minor: mi.parse().ok()?,
                root: unescape(f.get(3)?),
                point: unescape(f.get(4)?),
            })
        })
        .collect())
}

/// Whether `path` (not following a final symlink) is inode `ino` on `dev`.
fn names(path: &str, dev: u64, ino: u64) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|st| st.dev() == dev && st.ino() == ino)
}

/// The path of the watched object of process `pid`: its file handle opened
/// through a mount of its filesystem; failing that, a mount point or a
/// descriptor, cwd or root of the process that is that object. Every answer
/// is checked to name the same (device, inode) from floe.
fn find_path(m: &Mark, dev: u64, pid: i32) -> Result<String, String> {
    let (major, minor) = (m.sdev >> 20, m.sdev & 0xf_ffff);
    let mut mounts: Vec<Mount> = mounts()?.into_iter().filter(|x| x.major == major && x.minor == minor).collect();
    // Mounts of the filesystem's root first: any object is reachable there.
    mounts.sort_by_key(|x| x.root != "/");
    let why = match &m.handle {
        Some((htype, handle)) => match by_handle(&mounts, *htype, handle, dev, m.ino) {
            Ok(p) => return Ok(p),
            Err(why) => why,
        },
        None => "its filesystem gives no file handle".to_string(),
    };
    if let Some(c) = mounts.iter().find(|c| names(&c.point, dev, m.ino)) {
        return Ok(c.point.clone());
    }
    let mut places = vec!["cwd".to_string(), "root".to_string()];
    places.extend(crate::procfs::fds(pid).unwrap_or_default().iter().map(|fd| format!("fd/{fd}")));
    for place in places {
        let held = crate::procfs::path(pid, &place);
        if !std::fs::metadata(&held).is_ok_and(|st| st.dev() == dev && st.ino() == m.ino) {
            continue;
        }
        if let Ok(link) = crate::procfs::readlink(pid, &place) {
            if names(&link, dev, m.ino) {
                return Ok(link);
            }
        }
    }
    Err(why)
}

/// The path of a file handle's object, through one of `mounts`.
fn by_handle(mounts: &[Mount], htype: i32, handle: &[u8], dev: u64, ino: u64) -> Result<String, String> {
    /// FILEID_INO64_GEN(_PARENT): handles of filesystems that cannot decode them.
    const UNDECODABLE: [i32; 2] = [0x81, 0x82];
    if mounts.is_empty() {
        return Err("floe sees no mount of its filesystem".into());
    }
    let mut why = String::new();
    for c in mounts {
        // open_by_handle_at wants a real (not O_PATH) descriptor here.
        let mfd = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&c.point)
        {
            Ok(f) => f,
            Err(e) => {
                why = format!("cannot open mount point {} ({e})", c.point);
                continue;
            }
        };
        let obj = match fd_epoll::open_by_handle(&mfd, htype, handle) {
            Ok(o) => o,
            Err(e) if UNDECODABLE.contains(&htype) || e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Err("its filesystem cannot open file handles".into())
            }
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => return Err("it was deleted".into()),
            Err(e) => {
                why = format!("open_by_handle_at failed ({e})");
                continue;
            }
        };
        let link = match std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&obj))) {
            Ok(l) => l.to_string_lossy().into_owned(),
            Err(e) => {
                why = format!("cannot read its path ({e})");
                continue;
            }
        };
        if names(&link, dev, ino) {
            return Ok(link);
        }
        if link.ends_with(" (deleted)") {
            return Err("it was deleted".into());
        }
        why = format!("its path {link} names another file now (or cannot be reached)");
    }
    Err(why)
}

pub fn restore(d: &pb::FileDesc, _ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let ino = d.inotify.as_ref().ok_or("inotify record missing")?;
    let fd = fd_epoll::inotify_init(libc::IN_NONBLOCK).map_err(|e| format!("inotify_init1 failed ({e})"))?;
    let mut watches: Vec<&pb::InotifyWatch> = ino.watches.iter().collect();
    watches.sort_by_key(|w| w.wd);
    let mut next = 1;
    let mut burned = 0u32;
    for w in watches {
        if w.wd < next || w.wd > MAX_WD {
            return Err(format!("watch descriptor {} cannot be reproduced", w.wd));
        }
        while next < w.wd {
            burn(&fd, next)?;
            next += 1;
            burned += 1;
            // Keep the IN_IGNORED events of the throwaway watches from overflowing the queue.
            if burned.is_multiple_of(1024) {
                fd_epoll::drain(&fd).map_err(|e| format!("cannot drain the instance ({e})"))?;
            }
        }
        // The path names the watched object itself: never follow a symlink there.
        let mask = w.mask | libc::IN_DONT_FOLLOW | libc::IN_MASK_CREATE;
        let got = fd_epoll::add_watch(&fd, Path::new(&w.path), mask)
            .map_err(|e| format!("cannot watch {} (wd {}) ({e})", w.path, w.wd))?;
        if got != w.wd {
            return Err(format!("the watch on {} got descriptor {got} instead of {}", w.path, w.wd));
        }
        next = w.wd + 1;
    }
    fd_epoll::drain(&fd).map_err(|e| format!("cannot drain the instance ({e})"))?;
    if d.flags & libc::O_NONBLOCK as u32 == 0 {
        let fl = task::fcntl_int(&fd, libc::F_GETFL, 0).map_err(|e| format!("F_GETFL failed ({e})"))?;
        task::fcntl_int(&fd, libc::F_SETFL, fl & !libc::O_NONBLOCK)
            .map_err(|e| format!("cannot clear O_NONBLOCK ({e})"))?;
    }
    Ok(fd)
}

/// Uses up watch descriptor `want` with a throwaway watch.
fn burn(fd: &OwnedFd, want: i32) -> Result<(), String> {
    let mut last = String::from("no object to put it on");
    for p in BURN_PATHS {
        let mask = libc::IN_DELETE_SELF | libc::IN_DONT_FOLLOW | libc::IN_MASK_CREATE;
        match fd_epoll::add_watch(fd, Path::new(p), mask) {
            Ok(wd) => {
                fd_epoll::rm_watch(fd, wd).map_err(|e| format!("cannot remove a throwaway watch ({e})"))?;
                if wd != want {
                    return Err(format!("watch descriptor {want} cannot be reproduced (the kernel gave {wd})"));
                }
                return Ok(());
            }
            Err(e) => last = format!("{p}: {e}"),
        }
    }
    Err(format!("watch descriptor {want} cannot be reproduced: no throwaway watch possible ({last})"))
}
