//! Refusals decided before and right after the freeze.
use super::freeze::FrozenTree;
use super::{proc_err, DumpError, DumpOptions};
use crate::procfs;
use std::collections::HashMap;

/// Facts about the root gathered before the freeze.
pub struct Preflight {
    pub pgid: i32,
    pub sid: i32,
}

const NAMESPACES: [&str; 8] = ["mnt", "pid", "net", "ipc", "uts", "user", "cgroup", "time"];

pub fn preflight(pid: i32, opts: &DumpOptions) -> Result<Preflight, DumpError> {
    if pid <= 0 {
        return Err(DumpError::NoProcess { pid });
    }
    if pid as u32 == std::process::id() {
        return Err(DumpError::Refused { pid, what: "floe cannot dump itself".into() });
    }
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(DumpError::NoProcess { pid });
    }
    let st = procfs::status(pid).map_err(proc_err(pid, "status"))?;
    if st.tgid != pid {
        return Err(DumpError::Refused { pid, what: format!("it is a thread of process {}; pass that pid", st.tgid) });
    }
    if st.state == 'Z' || st.state == 'X' {
        return Err(DumpError::Refused { pid, what: "it is a zombie".into() });
    }
    if st.tracer_pid != 0 {
        return Err(DumpError::Refused {
            pid,
            what: format!("it is traced by {}; detach the debugger or tracer first", procfs::describe(st.tracer_pid)),
        });
    }
    check_process(pid, &st)?;
    let sf = procfs::stat_fields(pid).map_err(proc_err(pid, "stat"))?;
    let pgid = procfs::stat_field(&sf, 5) as i32;
    let sid = procfs::stat_field(&sf, 6) as i32;
    if sid != pid && !opts.shell_job {
        return Err(DumpError::Refused {
            pid,
            what: format!(
                "it belongs to session {sid} (process group {pgid}) whose leader is not dumped; start it with setsid, or pass --shell-job to restore it into floe's session"
            ),
        });
    }
    check_shared_outside(pid)?;
    Ok(Preflight { pgid, sid })
}

/// Refuses shared memory (an anonymous shared mapping or a memfd) that a
/// process outside the tree maps or holds too: the restored tree would
/// get an object of its own, and the two would silently stop sharing. (A
/// System V segment is found again by its id, and is not checked here.)
/// Costs nothing for a tree without shared memory; otherwise every other
/// process's maps (and memfd descriptors) are read, before the freeze.
fn check_shared_outside(root: i32) -> Result<(), DumpError> {
    use std::os::unix::fs::MetadataExt;
    let tree: Vec<i32> = super::freeze::walk(root).into_iter().map(|(p, _)| p).collect();
    let shmem = |m: &procfs::MapEntry| {
        m.shared
            && m.inode != 0
            && (m.path == "/dev/zero (deleted)" || m.path.starts_with("/memfd:") || m.path.starts_with("[anon_shmem:"))
    };
    // (device, inode) of each shared memory object -> (pid, mapping) of the tree.
    let mut shared: HashMap<(u32, u32, u64), (i32, String)> = HashMap::new();
    for &pid in &tree {
        let Ok(maps) = procfs::maps(pid, false) else { continue };
        for m in maps.iter().filter(|m| shmem(m)) {
            let what = format!("{:#x}-{:#x} {}", m.start, m.end, m.path);
            shared.entry((m.dev_major, m.dev_minor, m.inode)).or_insert((pid, what));
        }
    }
    if shared.is_empty() {
        return Ok(());
    }
    let me = std::process::id() as i32;
    let Ok(all) = std::fs::read_dir("/proc") else { return Ok(()) };
    for e in all.flatten() {
        let Some(other) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if other == me || tree.contains(&other) {
            continue;
        }
        let mut found = procfs::maps(other, false).ok().and_then(|maps| {
            maps.into_iter().filter(|m| shmem(m)).find_map(|m| shared.get(&(m.dev_major, m.dev_minor, m.inode)))
        });
        if found.is_none() {
            // A memfd held by descriptor.
            let fds = std::fs::read_dir(procfs::path(other, "fd")).into_iter().flatten().flatten();
            found = fds
                .filter(|f| std::fs::read_link(f.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:")))
                .find_map(|f| {
                    let m = std::fs::metadata(f.path()).ok()?;
                    let (dev, ino) = (m.dev(), m.ino());
                    shared.get(&(libc::major(dev), libc::minor(dev), ino))
                });
        }
        if let Some((pid, what)) = found {
            return Err(DumpError::Refused {
                pid: *pid,
                what: format!(
                    "its shared memory {what} is shared with {} outside the dumped tree; the restored tree would \
                     get a copy of its own and the two would no longer share it: dump the tree they both belong to",
                    procfs::describe(other)
                ),
            });
        }
    }
    Ok(())
}

fn check_process(pid: i32, st: &procfs::Status) -> Result<(), DumpError> {
    if st.seccomp == 1 {
        return Err(DumpError::Refused {
            pid,
            what: "it runs in seccomp strict mode (mode 1), which cannot be checkpointed".into(),
        });
    }
    for ns in NAMESPACES {
        let theirs = procfs::readlink(pid, &format!("ns/{ns}")).map_err(proc_err(pid, "ns"))?;
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !ours.is_empty() && theirs != ours {
            return Err(DumpError::Refused {
                pid,
                what: format!("it runs in another {ns} namespace ({theirs}, floe is in {ours}); run floe inside the same namespaces"),
            });
        }
    }
    Ok(())
}

/// Per-process checks once the whole tree is stopped.
pub fn after_freeze(tree: &FrozenTree, root: &Preflight, root_pid: i32) -> Result<(), DumpError> {
    let parents: HashMap<i32, i32> = tree.procs.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut sessions = HashMap::new();
    for p in tree.procs.iter().filter(|p| !p.zombie) {
        let sf = procfs::stat_fields(p.pid).map_err(proc_err(p.pid, "stat"))?;
        sessions.insert(p.pid, procfs::stat_field(&sf, 6) as i32);
    }
    for p in tree.procs.iter().filter(|p| !p.zombie) {
        let pid = p.pid;
        let st = procfs::status(pid).map_err(proc_err(pid, "status"))?;
        check_process(pid, &st)?;
        if pid == root_pid {
            continue;
        }
        let sf = procfs::stat_fields(pid).map_err(proc_err(pid, "stat"))?;
        let pgid = procfs::stat_field(&sf, 5) as i32;
        let sid = procfs::stat_field(&sf, 6) as i32;
        let parent_sid = parents.get(&pid).and_then(|pp| sessions.get(pp)).copied().unwrap_or(root.sid);
        if sid != pid && sid != parent_sid {
            return Err(DumpError::Refused {
                pid,
                what: format!("its session {sid} is neither its own nor its parent's; this cannot be recreated"),
            });
        }
        let outside_ok = root.pgid != root_pid && pgid == root.pgid;
        if pgid != pid && !parents.contains_key(&pgid) && !outside_ok {
            return Err(DumpError::Refused {
                pid,
                what: format!("its process group {pgid} is led by a process outside the dumped tree"),
            });
        }
    }
    Ok(())
}
