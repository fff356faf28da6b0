//! Migration pre-flight: what the source learns about a tree without
//! stopping it ([`gather`]), and the target's verdict ([`check`]), so that a
//! migration that cannot succeed ends before the process stops at all.
use crate::dump::DumpError;
use crate::procfs;
use floe_proto::peer as pp;
use std::collections::BTreeMap;
use std::io::Read;

fn proc_err(pid: i32, what: &str) -> impl FnOnce(std::io::Error) -> DumpError + '_ {
    move |source| DumpError::Proc { pid, path: what.to_string(), source }
}

/// blake3 of a file's contents.
fn hash_file(path: &str) -> std::io::Result<(u64, [u8; 32])> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, *h.finalize().as_bytes()))
}

/// This host's CPU feature flags.
pub fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

/// Bytes of memory the kernel says can be given out without swapping.
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn status_kb(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(procfs::path(pid, "status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// A deleted file that a process of the tree maps or runs, read whole.
pub struct DeletedContents {
    /// (dev, inode): how the state names it.
    pub id: (u64, u64),
    /// Where it was.
    pub path: String,
    pub data: Vec<u8>,
}

/// The deleted files (unlinked while mapped: a binary or library that a
/// package upgrade replaced) that the tree maps or runs, each once, read
/// through /proc while the tree runs. A migration sends them before the
/// first pass, so that the target can map them in its staged tree.
pub fn deleted_files(root: i32) -> Result<Vec<DeletedContents>, DumpError> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<DeletedContents> = Vec::new();
    for (pid, _) in crate::dump::freeze::walk(root) {
        let Ok(maps) = procfs::maps(pid, false) else { continue }; // a zombie
        let mut places: Vec<(String, std::path::PathBuf)> = Vec::new();
        if let Ok(exe) = std::fs::read_link(procfs::path(pid, "exe")) {
            let exe = exe.to_string_lossy().into_owned();
            if let Some(orig) = exe.strip_suffix(" (deleted)") {
                places.push((orig.to_string(), procfs::path(pid, "exe")));
            }
        }
        for m in &maps {
            // Shared memory is sent as pages; a memfd mapped privately is a deleted file here.
            let special = ["/dev/zero", "/SYSV", "/anon_hugepage"].iter().any(|p| m.path.starts_with(p))
                || (m.path.starts_with("/memfd:") && m.shared);
            if let Some(orig) = m.path.strip_suffix(" (deleted)").filter(|_| m.path.starts_with('/') && !special) {
                let mf = procfs::path(pid, &format!("map_files/{:x}-{:x}", m.start, m.end));
                places.push((orig.to_string(), mf));
            }
        }
        for (path, place) in places {
            let refuse = |what: String| DumpError::Refused { pid, what: format!("deleted file {path}: {what}") };
            let meta = std::fs::metadata(&place).map_err(proc_err(pid, "map_files"))?;
            let id = (meta.dev(), meta.ino());
            // Not a regular file, or other links left: the dump refuses it with the reason.
            if !meta.is_file() || meta.nlink() != 0 || out.iter().any(|d| d.id == id) {
                continue;
            }
            if meta.size() > crate::dump::MAX_DELETED_FILE {
                return Err(refuse(format!(
                    "it holds {} bytes; floe saves deleted files of up to {} MiB",
                    meta.size(),
                    crate::dump::MAX_DELETED_FILE >> 20
                )));
            }
            let mut data = Vec::with_capacity(meta.size() as usize);
            std::fs::File::open(&place)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(|e| refuse(format!("cannot read it ({e})")))?;
            out.push(DeletedContents { id, path, data });
        }
    }
    Ok(out)
}

/// Everything the target must check, read from /proc while the tree runs.
pub fn gather(root: i32, new_pidns: bool, moving: &[String]) -> Result<pp::Preflight, DumpError> {
    if !std::path::Path::new(&format!("/proc/{root}")).exists() {
        return Err(DumpError::NoProcess { pid: root });
    }
    let tree = crate::dump::freeze::walk(root);
    let mut out = pp::Preflight { root_pid: root, new_pidns, moving_addresses: moving.to_vec(), ..Default::default() };
    // path -> (why, directory, hash content)
    let mut files: BTreeMap<String, (String, bool, bool)> = BTreeMap::new();
    for &(pid, _) in &tree {
        out.pids.push(pid);
        let tasks = std::fs::read_dir(procfs::path(pid, "task")).map_err(proc_err(pid, "task"))?;
        for t in tasks.flatten() {
            if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if tid != pid {
                    out.tids.push(tid);
                }
            }
        }
        out.memory_bytes += (status_kb(pid, "VmRSS:") + status_kb(pid, "VmSwap:")) * 1024;
        for ip in crate::fdkinds::socket::bound_addresses(pid) {
            let s = ip.to_string();
            if !out.socket_addresses.contains(&s) {
                out.socket_addresses.push(s);
            }
        }
        // A zombie has no maps. A deleted executable or mapped file is sent
        // beside the state ([`deleted_files`]), not looked for on the target.
        let Ok(maps) = procfs::maps(pid, false) else { continue };
        if let Ok(exe) = std::fs::read_link(procfs::path(pid, "exe")) {
            let exe = exe.to_string_lossy().into_owned();
            if !exe.ends_with(" (deleted)") {
                files.entry(exe).or_insert((format!("executable of {pid}"), false, true));
            }
        }
        for m in &maps {
            let special = m.path.ends_with(" (deleted)")
                || m.path.starts_with("/dev/")
                || m.path.starts_with("/memfd:")
                || m.path.starts_with("/SYSV")
                || m.path.starts_with("/anon_hugepage");
            if m.path.starts_with('/') && !special {
                // Shared writable mappings change as the process runs: existence only.
                let content = !(m.shared && m.prot() & libc::PROT_WRITE as u32 != 0);
                files.entry(m.path.clone()).or_insert((format!("mapped by {pid}"), false, content));
            }
        }
        for (what, link) in [("working directory", "cwd"), ("root directory", "root")] {
            if let Ok(p) = std::fs::read_link(procfs::path(pid, link)) {
                let p = p.to_string_lossy().into_owned();
                // A removed directory is made anew, in the directory it was in.
                let (p, what) = match p.strip_suffix(" (deleted)") {
                    Some(gone) => {
                        let parent = std::path::Path::new(gone).parent().unwrap_or(std::path::Path::new("/"));
                        (parent.to_string_lossy().into_owned(), format!("directory of the removed {what} of {pid}"))
                    }
                    None => (p, format!("{what} of {pid}")),
                };
                files.entry(p).or_insert((what, true, false));
            }
        }
        if let Ok(fds) = std::fs::read_dir(procfs::path(pid, "fd")) {
            for fd in fds.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else { continue };
                let t = target.to_string_lossy().into_owned();
                let plain = t.starts_with('/') && !t.ends_with(" (deleted)") && !t.starts_with("/dev/");
                if plain && std::fs::metadata(&t).map(|m| m.is_file()).unwrap_or(false) {
                    let why = format!("open by {pid} (fd {})", fd.file_name().to_string_lossy());
                    files.entry(t).or_insert((why, false, false));
                }
            }
        }
    }
    for (path, (why, directory, content)) in files {
        let mut fc = pp::FileCheck { path: path.clone(), why, directory, ..Default::default() };
        if content {
            // A file that cannot be read here is checked for existence only.
            if let Ok((size, h)) = hash_file(&path) {
                fc.size = size;
                fc.blake3 = h.to_vec();
            }
        }
        out.files.push(fc);
    }
    out.kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let (parts, hash) = crate::restore::preflight::host_vdso_facts()
        .map_err(|e| DumpError::Refused { pid: root, what: format!("cannot read this host's vdso: {e}") })?;
    out.vdso_parts = parts;
    out.vdso_blake3 = hash.to_vec();
    out.cpu_flags = cpu_flags();
    Ok(out)
}

/// Every reason this host cannot take the tree described by `f` (empty: it can).
pub fn check(f: &pp::Preflight) -> Vec<String> {
    let mut problems = Vec::new();
    for fc in &f.files {
        let meta = match std::fs::metadata(&fc.path) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("{} ({}) is missing on this host: {e}", fc.path, fc.why));
                continue;
            }
        };
        if fc.directory {
            if !meta.is_dir() {
                problems.push(format!("{} ({}) is not a directory on this host", fc.path, fc.why));
            }
            continue;
        }
        if !meta.is_file() {
            problems.push(format!("{} ({}) is not a regular file on this host", fc.path, fc.why));
            continue;
        }
        if fc.blake3.len() == 32 {
            match hash_file(&fc.path) {
                Ok((size, h)) if h[..] == fc.blake3[..] && size == fc.size => {}
                Ok(_) => problems.push(format!("{} ({}) differs from the source host's copy", fc.path, fc.why)),
                Err(e) => problems.push(format!("{} ({}) cannot be read on this host: {e}", fc.path, fc.why)),
            }
        }
    }
    if !f.new_pidns {
        for pid in f.pids.iter().chain(&f.tids) {
            if let Err(e) = crate::restore::preflight::check_pid(*pid) {
                problems.push(e.to_string());
            }
        }
    }
    let ours = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    match crate::restore::preflight::host_vdso_facts() {
        Ok((parts, hash)) => {
            if parts != f.vdso_parts || hash[..] != f.vdso_blake3[..] {
                problems.push(format!(
                    "vdso differs (source kernel {}, this host {ours}); the target must run the same kernel build",
                    f.kernel_release
                ));
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    // Every address a socket is bound to must be here, or arrive with the migration.
    for a in &f.socket_addresses {
        // Compared as addresses: "fd00:74:0::100" and "fd00:74::100" are one.
        let ip = a.parse::<std::net::IpAddr>().ok();
        let moving = f
            .moving_addresses
            .iter()
            .any(|m| m.split('/').next().and_then(|s| s.parse::<std::net::IpAddr>().ok()) == ip && ip.is_some());
        if !moving && !address_is_local(a) {
            problems.push(format!(
                "a socket of the tree is bound to {a}, which this host does not have; add it here or pass --move-address {a}/PREFIX"
            ));
        }
    }
    let flags = cpu_flags();
    let missing: Vec<&String> = f.cpu_flags.iter().filter(|x| !flags.contains(x)).collect();
    if !missing.is_empty() {
        problems.push(format!("this host's CPU lacks features the process may use: {missing:?}"));
    }
    let avail = mem_available();
    if avail < f.memory_bytes {
        problems.push(format!(
            "not enough memory: the tree uses {} MiB, this host has {} MiB available",
            f.memory_bytes >> 20,
            avail >> 20
        ));
    }
    problems
}

/// Whether `addr` is assigned to this host (a socket can bind to it).
fn address_is_local(addr: &str) -> bool {
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else { return false };
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}
