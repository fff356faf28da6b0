//! Parsers for the /proc files the engine reads.
use std::fs;
use std::io;
use std::path::PathBuf;

pub fn path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

/// Fields of /proc/PID/status the engine uses.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub name: String,
    pub state: char,
    pub tgid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub threads: u32,
    pub sig_pnd: u64,
    pub shd_pnd: u64,
    pub sig_blk: u64,
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    pub seccomp: u32,
    pub umask: u32,
    pub nspid: Vec<i32>,
}

fn four(v: &str) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, x) in v.split_whitespace().take(4).enumerate() {
        out[i] = x.parse().unwrap_or(0);
    }
    out
}

pub fn status(pid: i32) -> io::Result<Status> {
    Ok(parse_status(&fs::read_to_string(path(pid, "status"))?))
}

/// /proc/PID/task/TID/status: one thread's view (its own credentials).
pub fn task_status(pid: i32, tid: i32) -> io::Result<Status> {
    Ok(parse_status(&fs::read_to_string(path(pid, &format!("task/{tid}/status")))?))
}

fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let hex = || u64::from_str_radix(v, 16).unwrap_or(0);
        match k {
            "Name" => s.name = v.to_string(),
            "State" => s.state = v.chars().next().unwrap_or('?'),
            "Tgid" => s.tgid = v.parse().unwrap_or(0),
            "PPid" => s.ppid = v.parse().unwrap_or(0),
            "TracerPid" => s.tracer_pid = v.parse().unwrap_or(0),
            "Uid" => s.uids = four(v),
            "Gid" => s.gids = four(v),
            "Groups" => s.groups = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            "Threads" => s.threads = v.parse().unwrap_or(0),
            "SigPnd" => s.sig_pnd = hex(),
            "ShdPnd" => s.shd_pnd = hex(),
            "SigBlk" => s.sig_blk = hex(),
            "SigIgn" => s.sig_ign = hex(),
            "SigCgt" => s.sig_cgt = hex(),
            "CapInh" => s.cap_inh = hex(),
            "CapPrm" => s.cap_prm = hex(),
            "CapEff" => s.cap_eff = hex(),
            "CapBnd" => s.cap_bnd = hex(),
            "CapAmb" => s.cap_amb = hex(),
            "NoNewPrivs" => s.no_new_privs = v == "1",
            "Seccomp" => s.seccomp = v.parse().unwrap_or(0),
            "Umask" => s.umask = u32::from_str_radix(v, 8).unwrap_or(0o022),
            "NSpid" => s.nspid = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            _ => {}
        }
    }
    s
}

/// One line of /proc/PID/smaps (header plus VmFlags).
#[derive(Debug, Clone, Default)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    pub path: String,
    pub vmflags: Vec<String>,
}

impl MapEntry {
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ as u32;
        }
        if self.write {
            p |= libc::PROT_WRITE as u32;
        }
        if self.exec {
            p |= libc::PROT_EXEC as u32;
        }
        p
    }

    pub fn has_flag(&self, f: &str) -> bool {
        self.vmflags.iter().any(|x| x == f)
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

fn parse_map_header(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    if perms.len() < 4 {
        return None;
    }
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
        vmflags: Vec::new(),
    })
}

/// Same mapping as far as /proc/PID/maps tells (everything but VmFlags).
fn same_mapping(a: &MapEntry, b: &MapEntry) -> bool {
    (a.start, a.end, a.read, a.write, a.exec, a.shared, a.offset, a.dev_major, a.dev_minor, a.inode, &a.path)
        == (b.start, b.end, b.read, b.write, b.exec, b.shared, b.offset, b.dev_major, b.dev_minor, b.inode, &b.path)
}

/// /proc/PID/maps with the VmFlags of `earlier` (an smaps read of the same
/// process), if every mapping is still exactly as `earlier` has it; `None`
/// otherwise. maps does not walk the page tables (smaps does: ~15 ms per
/// GiB); whether a flag changed without changing the mapping is for the
/// caller to know (see `sys::syscall_watch`).
pub fn maps_with_flags_of(pid: i32, earlier: &[MapEntry]) -> io::Result<Option<Vec<MapEntry>>> {
    let mut now = maps(pid, false)?;
    if now.len() != earlier.len() || !now.iter().zip(earlier).all(|(a, b)| same_mapping(a, b)) {
        return Ok(None);
    }
    for (n, e) in now.iter_mut().zip(earlier) {
        n.vmflags = e.vmflags.clone();
    }
    Ok(Some(now))
}

/// Parses /proc/PID/smaps (for VmFlags) or /proc/PID/maps.
pub fn maps(pid: i32, with_flags: bool) -> io::Result<Vec<MapEntry>> {
    let text = fs::read_to_string(path(pid, if with_flags { "smaps" } else { "maps" }))?;
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.vmflags = rest.split_whitespace().map(str::to_string).collect();
            }
            continue;
        }
        let first = line.split(' ').next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            if let Some(m) = parse_map_header(line) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// Fields of /proc/PID/stat after the command name, indexed from field 3 (state) = 0.
pub fn stat_fields(pid: i32) -> io::Result<Vec<String>> {
    stat_fields_at(pid, "stat")
}

/// Like [`stat_fields`], for thread `tid` of process `pid`.
pub fn task_stat_fields(pid: i32, tid: i32) -> io::Result<Vec<String>> {
    stat_fields_at(pid, &format!("task/{tid}/stat"))
}

fn stat_fields_at(pid: i32, rest: &str) -> io::Result<Vec<String>> {
    let text = fs::read_to_string(path(pid, rest))?;
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    Ok(after.split_whitespace().map(str::to_string).collect())
}

/// Returns stat field number `n` (1-based, as in proc(5)) as u64.
pub fn stat_field(fields: &[String], n: usize) -> u64 {
    fields.get(n - 3).and_then(|f| f.parse::<i64>().ok()).map(|v| v as u64).unwrap_or(0)
}

/// pos and flags of /proc/PID/fdinfo/FD.
#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: i64,
    pub flags: u32,
    /// "lock:" lines (the part after "lock:"), one per lock held through it.
    pub locks: Vec<String>,
    /// Inode number of the open file ("ino:").
    pub ino: u64,
}

pub fn fdinfo(pid: i32, fd: i32) -> io::Result<FdInfo> {
    let text = fs::read_to_string(path(pid, &format!("fdinfo/{fd}")))?;
    let mut info = FdInfo::default();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            info.pos = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("flags:") {
            info.flags = u32::from_str_radix(v.trim(), 8).unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("ino:") {
            info.ino = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("lock:") {
            info.locks.push(v.trim().to_string());
        }
    }
    Ok(info)
}

/// Open descriptor numbers of a process, sorted.
pub fn fds(pid: i32) -> io::Result<Vec<i32>> {
    let mut v: Vec<i32> = fs::read_dir(path(pid, "fd"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Thread ids of a process.
pub fn tids(pid: i32) -> io::Result<Vec<i32>> {
    let mut v: Vec<i32> = fs::read_dir(path(pid, "task"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Children of a process (all its threads).
pub fn children(pid: i32) -> io::Result<Vec<i32>> {
    let mut out = Vec::new();
    for tid in tids(pid)? {
        let text = fs::read_to_string(path(pid, &format!("task/{tid}/children")))?;
        out.extend(text.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
    }
    Ok(out)
}

pub fn cmdline(pid: i32) -> io::Result<Vec<String>> {
    let raw = fs::read(path(pid, "cmdline"))?;
    Ok(raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

pub fn readlink(pid: i32, rest: &str) -> io::Result<String> {
    Ok(fs::read_link(path(pid, rest))?.to_string_lossy().into_owned())
}

/// Short description of a process for error messages: "1234 (name)".
pub fn describe(pid: i32) -> String {
    match status(pid) {
        Ok(s) => {
            let cmd = cmdline(pid).map(|c| c.join(" ")).unwrap_or_default();
            if cmd.is_empty() {
                format!("{pid} ({}, state {})", s.name, s.state)
            } else {
                format!("{pid} ({}, state {}: {cmd})", s.name, s.state)
            }
        }
        Err(_) => format!("{pid}"),
    }
}

/// Soft and hard limits from /proc/PID/limits, in resource order
/// (RLIMIT_CPU = 0 ...); "unlimited" is RLIM_INFINITY.
pub fn limits(pid: i32) -> io::Result<Vec<(u64, u64)>> {
    let text = fs::read_to_string(path(pid, "limits"))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        // The name column is 26 characters wide.
        let Some(rest) = line.get(26..) else { continue };
        let mut it = rest.split_whitespace();
        let parse = |v: Option<&str>| -> io::Result<u64> {
            match v {
                Some("unlimited") => Ok(u64::MAX),
                Some(n) => {
                    n.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad limit {n:?}")))
                }
                None => Err(io::Error::new(io::ErrorKind::InvalidData, "short limits line")),
            }
        };
        out.push((parse(it.next())?, parse(it.next())?));
    }
    if out.len() < 16 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} limits, expected 16", out.len())));
    }
    out.truncate(16);
    Ok(out)
}

/// CPUs online on this host (/sys/devices/system/cpu/online, "0-3,6").
pub fn online_cpus() -> io::Result<Vec<usize>> {
    parse_cpu_list(&fs::read_to_string("/sys/devices/system/cpu/online")?)
}

fn parse_cpu_list(text: &str) -> io::Result<Vec<usize>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad CPU list {text:?}"));
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if b < a || b >= 1 << 16 {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,6\n").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(!online_cpus().unwrap().is_empty());
    }

    #[test]
    fn flags_of_an_earlier_smaps_read_are_reused_while_mappings_stay() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        // Let exec finish: the mappings are the new image's afterwards.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let smaps = maps(pid, true).unwrap();
        let reused = maps_with_flags_of(pid, &smaps).unwrap();
        let mut moved = smaps.clone();
        moved[0].end += 4096;
        let moved = maps_with_flags_of(pid, &moved).unwrap();
        let fewer = maps_with_flags_of(pid, &smaps[1..]).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(smaps.iter().all(|m| !m.vmflags.is_empty()), "smaps has VmFlags for every mapping");
        let reused = reused.expect("mappings unchanged");
        assert!(reused.iter().zip(&smaps).all(|(a, b)| a.vmflags == b.vmflags && a.start == b.start));
        assert!(moved.is_none() && fewer.is_none());
    }
}
