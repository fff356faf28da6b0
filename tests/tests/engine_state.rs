//! End-to-end: process state that floe supports but the other suites do
//! not exercise. Each fixture checks its own state after the restore and
//! reports it on SIGUSR1; the tests also look from outside (/proc, and by
//! competing for the same resources). Needs root; skipped otherwise.
//!
//! * file locks (`--file-locks`): an flock, a POSIX record lock and an OFD
//!   lock come back held by the restored process (fixture `state_locks`);
//!   without the flag the dump is refused and the process is unharmed;
//! * POSIX timers: same ids, clock, signal and value, the periodic one keeps
//!   firing and the one-shot keeps counting down (fixture `state_timers`);
//! * memory shared between a parent and its child: MAP_SHARED|MAP_ANONYMOUS,
//!   a memfd (mapped and read through its fd) and a System V segment, which
//!   keeps its id and key, also when it was removed before the restore
//!   (fixture `state_shm`);
//! * `floe restore -n`: a second copy of a process still running here, in
//!   a new pid namespace where it has its old pid (fixture `sleeper`);
//! * `--ext-unix-sk`: a datagram client of a unix server outside the dumped
//!   tree reconnects by name and no message is lost; a stream connection
//!   stays refused (fixtures `state_unixclient`, `state_unixserver`);
//! * per-thread CPU affinity, scheduling policy (SCHED_BATCH, SCHED_FIFO
//!   with reset-on-fork), real-time priority, nice value and I/O priority,
//!   and oom_score_adj (a threaded `python3`);
//! * the madvise flags of mappings, KSM's MADV_MERGEABLE included.
//!
//! Restored processes are not children of the test: [`TreeGuard`] and
//! [`Fixture::adopt_restored`] kill them by pid, panics included; System V
//! segments the fixtures create are removed by [`SysvGuard`].
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How long the killed original processes may take to vanish (PID 1 reaps
/// orphans slowly here).
const ORIGINALS_GONE: Duration = Duration::from_secs(10);

/// A fixture following the `--ready`/`--report` convention.
struct Fx {
    fx: Fixture,
    ready: PathBuf,
    report_path: PathBuf,
}

impl Fx {
    fn spawn<S: AsRef<std::ffi::OsStr>>(name: &str, td: &TestDir, extra: &[S]) -> Self {
        let ready = td.join(format!("{name}.ready"));
        let report_path = td.join(format!("{name}.report"));
        let fx = Spawn::fixture(name, td.path())
            .arg("--ready")
            .arg(&ready)
            .arg("--report")
            .arg(&report_path)
            .args(extra)
            .ready_file(&ready)
            .spawn();
        Self { fx, ready, report_path }
    }

    fn pid(&self) -> i32 {
        self.fx.pid
    }

    fn ready_info(&self) -> Report {
        read_report(&self.ready)
    }

    fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }

    /// Requests reports until `cond` holds for one (panics after 10 s).
    fn await_report(&self, what: &str, cond: impl FnMut(&Report) -> bool) -> Report {
        eprintln!("waiting for: {what}");
        signal_and_await_report(self.fx.pid, None, &self.report_path, &self.fx.log, Duration::from_secs(10), cond)
    }
}

/// Panics unless `haystack` contains `n` as a whole number (not as part of
/// a longer run of digits), e.g. a pid.
fn assert_mentions_number(haystack: &str, n: impl std::fmt::Display, what: &str) {
    let n = n.to_string();
    let found = haystack.match_indices(&n).any(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + n.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    });
    assert!(found, "{what}: expected the message to mention {n}, got:\n{haystack}");
}

/// No manifest.img or pages.img in `dir`.
fn assert_no_image(dir: &Path, what: &str) {
    for f in ["manifest.img", "pages.img"] {
        assert!(!dir.join(f).exists(), "{what}: {} exists after a refused dump", dir.join(f).display());
    }
}

/// `floe dump` without options must be refused (the process keeps running,
/// no image); returns the lower-cased message.
fn refused_dump(pid: i32, dir: &Path, extra: &[&str], what: &str) -> String {
    let out = dump(pid, dir, extra);
    let err = assert_failed_cleanly(&out, what);
    assert_no_image(dir, what);
    err
}

// ---------------------------------------------------------------------------
// file locks

/// One line of /proc/locks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcLock {
    kind: String,
    mode: String,
    pid: i32,
    start: String,
    end: String,
}

/// "maj:min:ino" as /proc/locks names a file.
fn lock_file_id(path: &Path) -> String {
    let m = fs::metadata(path).unwrap();
    let dev = m.dev();
    format!("{:02x}:{:02x}:{}", libc::major(dev), libc::minor(dev), m.ino())
}

/// The granted locks /proc/locks lists for `path` (waiters, "->", skipped).
fn proc_locks_on(path: &Path) -> Vec<ProcLock> {
    let id = lock_file_id(path);
    fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[1] == "->" || f[5] != id {
                return None;
            }
            Some(ProcLock {
                kind: f[1].to_owned(),
                mode: f[3].to_owned(),
                pid: f[4].parse().ok()?,
                start: f[6].to_owned(),
                end: f[7].to_owned(),
            })
        })
        .collect()
}

fn lock(kind: &str, mode: &str, pid: i32, start: &str, end: &str) -> ProcLock {
    ProcLock { kind: kind.into(), mode: mode.into(), pid, start: start.into(), end: end.into() }
}

/// /proc/locks holds exactly the fixture's three locks on A, B and C.
fn assert_proc_locks(pid: i32, files: &[PathBuf; 3], what: &str) {
    let want = [
        vec![lock("FLOCK", "WRITE", pid, "0", "EOF")],
        vec![lock("POSIX", "WRITE", pid, "10", "29")],
        vec![lock("OFDLCK", "READ", -1, "0", "99")],
    ];
    for (f, want) in files.iter().zip(want) {
        assert_eq!(proc_locks_on(f), want, "{what}: /proc/locks for {}", f.display());
    }
}

fn flock_struct(ty: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: struct flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

fn fcntl_lock(f: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: f is an open fd and fl a valid, writable struct flock.
    if unsafe { libc::fcntl(f.as_raw_fd(), cmd, fl as *mut libc::flock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asserts a lock attempt failed because someone else holds the lock.
fn assert_would_block(r: io::Result<()>, what: &str) {
    match r {
        Ok(()) => panic!("{what}: the test got the lock, so the fixture does not hold it"),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::EWOULDBLOCK) | Some(libc::EACCES)),
            "{what}: expected EWOULDBLOCK/EAGAIN, got {e}"
        ),
    }
}

/// The test (another process, other open file descriptions) competes for
/// the fixture's locks and loses each time.
fn assert_locks_held(pid: i32, files: &[PathBuf; 3], what: &str) {
    let open_rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p).unwrap();
    let a = open_rw(&files[0]);
    // SAFETY: flock takes an open fd and an integer operation.
    let rc = unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    let r = if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    assert_would_block(r, &format!("{what}: flock(LOCK_EX|LOCK_NB) on A"));

    let b = open_rw(&files[1]);
    let mut fl = flock_struct(libc::F_WRLCK, 15, 2);
    assert_would_block(fcntl_lock(&b, libc::F_SETLK, &mut fl), &format!("{what}: F_SETLK write on B 15..16"));
    // F_GETLK names the holder and its range.
    let mut fl = flock_struct(libc::F_WRLCK, 15, 2);
    fcntl_lock(&b, libc::F_GETLK, &mut fl).unwrap();
    assert_eq!(
        (i32::from(fl.l_type), fl.l_start, fl.l_len, fl.l_pid),
        (libc::F_WRLCK, 10, 20, pid),
        "{what}: F_GETLK on B 15..16 (type, start, len, pid)"
    );
    // Outside 10..29 nothing conflicts.
    let mut fl = flock_struct(libc::F_WRLCK, 30, 10);
    fcntl_lock(&b, libc::F_GETLK, &mut fl).unwrap();
    assert_eq!(i32::from(fl.l_type), libc::F_UNLCK, "{what}: B 30..39 should be free");

    let c = open_rw(&files[2]);
    let mut fl = flock_struct(libc::F_WRLCK, 50, 1);
    assert_would_block(fcntl_lock(&c, libc::F_OFD_SETLK, &mut fl), &format!("{what}: F_OFD_SETLK write on C 50"));
    // A read lock is compatible with the fixture's read lock.
    let mut fl = flock_struct(libc::F_RDLCK, 50, 1);
    fcntl_lock(&c, libc::F_OFD_GETLK, &mut fl).unwrap();
    assert_eq!(i32::from(fl.l_type), libc::F_UNLCK, "{what}: a read lock on C should be compatible");
}

/// The fixture's own view of its locks (from /proc/self/fdinfo).
fn assert_fixture_locks(r: &Report, pid: i32, what: &str) {
    for (k, want) in [
        ("a", format!("FLOCK WRITE {pid} 0 EOF")),
        ("b", format!("POSIX WRITE {pid} 10 29")),
        ("c", "OFDLCK READ -1 0 99".to_owned()),
    ] {
        assert_eq!(r[&format!("{k}.locks")], "1", "{what}: locks on fd {k}: {r:?}");
        assert_eq!(r[&format!("{k}.lock")], want, "{what}: lock on fd {k}: {r:?}");
    }
    assert_eq!(r["fds_ok"], "1", "{what}: the descriptors refer to other files: {r:?}");
}

/// flock, POSIX and OFD locks: refused without --file-locks (the process
/// keeps its locks and runs on), dumped with it, and held again by the
/// restored process: in its own fdinfo, in /proc/locks, and against the
/// test competing for them.
#[test]
fn file_locks_need_the_flag_and_survive_restore() {
    require_root!();
    let td = TestDir::new("locks");
    let files = [td.join("a.dat"), td.join("b.dat"), td.join("c.dat")];
    for (i, f) in files.iter().enumerate() {
        write_pattern_file(f, 4096, 40 + i as u64);
    }
    let args: Vec<&std::ffi::OsStr> = vec![
        "--file-a".as_ref(),
        files[0].as_os_str(),
        "--file-b".as_ref(),
        files[1].as_os_str(),
        "--file-c".as_ref(),
        files[2].as_os_str(),
    ];
    let mut h = Fx::spawn("state_locks", &td, &args);
    let pid = h.pid();
    let r1 = h.report();
    assert_fixture_locks(&r1, pid, "before the dump");
    assert_proc_locks(pid, &files, "before the dump");
    assert_locks_held(pid, &files, "before the dump");

    // Without --file-locks: refused, nothing changes.
    let err = refused_dump(pid, &td.join("img-refused"), &[], "dump of a lock holder without --file-locks");
    assert_mentions(&err, &["--file-locks"], "lock refusal suggests --file-locks");
    assert!(h.fx.child_running(), "the refused dump killed the fixture:\n{}", h.fx.log_contents());
    assert_running_untouched(pid, "after the refused dump");
    let r2 = h.report();
    assert_eq!(report_num(&r2, "sigusr1_count"), 2);
    assert!(report_num(&r2, "loops") > report_num(&r1, "loops"), "the main loop stopped: {r1:?} -> {r2:?}");
    assert_reports_equal(&r1, &r2, &["loops"], "after the refused dump");
    assert_proc_locks(pid, &files, "after the refused dump");

    let img = td.join("img");
    dump_and_reap(&mut h.fx, &img, &["--file-locks"]);
    for f in &files {
        assert_eq!(proc_locks_on(f), vec![], "locks on {} survived the dumped process", f.display());
    }
    restore_and_adopt(&mut h.fx, &img, &[], Stdio::null());
    assert_running_untouched(pid, "restored lock holder");
    let r3 = h.report();
    assert_eq!(report_num(&r3, "sigusr1_count"), 3, "{r3:?}");
    assert_fixture_locks(&r3, pid, "after the restore");
    assert_proc_locks(pid, &files, "after the restore");
    assert_locks_held(pid, &files, "after the restore");
    assert_reports_equal(&r2, &r3, &["loops"], "after the restore");
    h.fx.kill_all();
    for f in &files {
        assert_eq!(proc_locks_on(f), vec![], "locks on {} outlived the restored process", f.display());
    }
}

// ---------------------------------------------------------------------------
// POSIX timers

/// The entries of a /proc/PID/timers listing ("ID: N" and the lines up to
/// the next one), sorted.
fn timer_blocks(text: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("ID:") || blocks.is_empty() {
            blocks.push(String::new());
        }
        let b = blocks.last_mut().unwrap();
        b.push_str(line);
        b.push('\n');
    }
    blocks.sort();
    blocks
}

/// /proc/PID/timers keeps ids, clocks, signals, values and targets; the
/// periodic timer keeps delivering SIGUSR2 with its value and id; the
/// one-shot keeps counting down from where it was.
#[test]
fn posix_timers_keep_ids_settings_and_remaining_time() {
    require_root!();
    let td = TestDir::new("timers");
    let mut h = Fx::spawn::<&str>("state_timers", &td, &[]);
    let pid = h.pid();
    let info = h.ready_info();
    assert_eq!(report_num(&info, "periodic_id"), 1, "the periodic timer should get id 1: {info:?}");
    assert_eq!(report_num(&info, "oneshot_id"), 2, "{info:?}");
    let r0 = h.await_report("a few SIGUSR2 from the periodic timer", |r| report_num(r, "usr2_good") >= 3);
    assert_eq!(report_num(&r0, "usr2_bad"), 0, "unexpected SIGUSR2: {r0:?}");

    let timers = fs::read_to_string(format!("/proc/{pid}/timers")).unwrap();
    eprintln!("/proc/{pid}/timers:\n{timers}");
    for want in [
        "ID: 1\nsignal: 12/0000000000001234\n".to_owned(),
        format!("notify: signal/pid.{pid}\nClockID: 1\n"),
        "ID: 2\nsignal: 0/0000000000005678\n".to_owned(),
        format!("notify: none/pid.{pid}\nClockID: 1\n"),
    ] {
        assert!(timers.contains(&want), "/proc/{pid}/timers lacks {want:?}:\n{timers}");
    }
    assert!(!timers.contains("ID: 0\n"), "the deleted timer is still listed:\n{timers}");

    let r1 = h.report();
    assert_eq!(r1["gettime_ok"], "1", "{r1:?}");
    assert_eq!(report_num(&r1, "periodic.interval_ns"), 100_000_000, "{r1:?}");
    assert_eq!(report_num(&r1, "oneshot.interval_ns"), 0, "{r1:?}");
    let oneshot_at_dump = report_num(&r1, "oneshot.value_ns");
    assert!((50_000_000_000..=60_000_000_000).contains(&oneshot_at_dump), "{r1:?}");

    let img = td.join("img");
    dump_and_reap(&mut h.fx, &img, &[]);
    restore_and_adopt(&mut h.fx, &img, &[], Stdio::null());
    let after = fs::read_to_string(format!("/proc/{pid}/timers")).unwrap();
    // The listing order (newest first) is not part of a timer's state.
    assert_eq!(timer_blocks(&after), timer_blocks(&timers), "/proc/{pid}/timers changed across the restore");

    let r2 = h.report();
    assert_eq!(r2["gettime_ok"], "1", "{r2:?}");
    assert_eq!(report_num(&r2, "sigusr1_count"), report_num(&r1, "sigusr1_count") + 1);
    assert!(report_num(&r2, "usr2_good") >= report_num(&r1, "usr2_good"), "{r1:?} -> {r2:?}");
    assert_eq!(report_num(&r2, "periodic.interval_ns"), 100_000_000, "{r2:?}");
    let pv = report_num(&r2, "periodic.value_ns");
    assert!(pv > 0 && pv <= 100_000_000, "periodic timer not armed: {r2:?}");
    let ov = report_num(&r2, "oneshot.value_ns");
    assert_eq!(report_num(&r2, "oneshot.interval_ns"), 0, "{r2:?}");
    assert!(
        ov > 0 && ov <= oneshot_at_dump,
        "the one-shot's remaining time must not grow ({oneshot_at_dump} ns before the dump, {ov} ns after)"
    );
    assert!(ov >= oneshot_at_dump - 20_000_000_000, "the one-shot lost far too much time: {ov} ns");

    let good = report_num(&r2, "usr2_good");
    let r3 = h.await_report("the periodic timer to keep firing", |r| report_num(r, "usr2_good") >= good + 5);
    assert_eq!(report_num(&r3, "usr2_bad"), 0, "SIGUSR2 with a wrong si_code/value/timer id: {r3:?}");
    assert_eq!(report_num(&r3, "periodic_id"), 1);
    assert_eq!(report_num(&r3, "oneshot_id"), 2);
    assert!(report_num(&r3, "oneshot.value_ns") < ov, "the one-shot stopped counting down: {r3:?}");
    h.fx.kill_all();
}

// ---------------------------------------------------------------------------
// shared memory

/// Removes every System V shared memory segment with `key` when created and
/// when dropped (panics included).
struct SysvGuard {
    key: i32,
}

/// One line of /proc/sysvipc/shm.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SysvShm {
    key: i32,
    shmid: i32,
    size: u64,
    nattch: u64,
}

fn sysv_segments() -> Vec<SysvShm> {
    fs::read_to_string("/proc/sysvipc/shm")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(SysvShm {
                key: f.first()?.parse::<i64>().ok()? as i32,
                shmid: f.get(1)?.parse().ok()?,
                size: f.get(3)?.parse().ok()?,
                nattch: f.get(6)?.parse().ok()?,
            })
        })
        .collect()
}

fn sysv_by_id(shmid: i32) -> Option<SysvShm> {
    sysv_segments().into_iter().find(|s| s.shmid == shmid)
}

fn shm_remove(shmid: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer (a null pointer is allowed).
    if unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl SysvGuard {
    fn new(key: i32) -> Self {
        let g = Self { key };
        g.remove_all();
        g
    }

    fn remove_all(&self) {
        for s in sysv_segments().into_iter().filter(|s| s.key == self.key) {
            match shm_remove(s.shmid) {
                Ok(()) => eprintln!("removed System V segment {} (key {:#x})", s.shmid, self.key),
                Err(e) => eprintln!("warning: cannot remove System V segment {}: {e}", s.shmid),
            }
        }
    }
}

impl Drop for SysvGuard {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// (inode, path) of the mapping of `pid` that starts at `addr`.
fn mapping_at(pid: i32, addr: u64) -> Option<(u64, String)> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines().find_map(|l| {
        let mut f = l.splitn(6, ' ');
        let range = f.next()?;
        let start = u64::from_str_radix(range.split('-').next()?, 16).ok()?;
        if start != addr {
            return None;
        }
        let (_perms, _off, _dev) = (f.next()?, f.next()?, f.next()?);
        let ino: u64 = f.next()?.parse().ok()?;
        Some((ino, f.next().unwrap_or("").trim().to_owned()))
    })
}

/// Parent and child map one object per region (same inode), the memfd
/// mapping is the object behind the kept descriptor, and the System V
/// mapping names the key and has the segment's id as its inode.
fn assert_same_objects(pid: i32, child: i32, info: &Report, key: i32, shmid: i32, what: &str) {
    let addr = |k: &str| u64::from_str_radix(&info[k], 16).unwrap();
    for (k, path) in [
        ("anon_addr", "/dev/zero (deleted)".to_owned()),
        ("memfd_addr", "/memfd:floe-test (deleted)".to_owned()),
        ("sysv_addr", format!("/SYSV{key:08x} (deleted)")),
    ] {
        let p = mapping_at(pid, addr(k)).unwrap_or_else(|| panic!("{what}: parent {pid} has no mapping at {k}"));
        let c = mapping_at(child, addr(k)).unwrap_or_else(|| panic!("{what}: child {child} has no mapping at {k}"));
        assert_eq!(p.1, path, "{what}: parent's mapping at {k}");
        assert_eq!(p, c, "{what}: parent and child map different objects at {k}");
        assert_ne!(p.0, 0, "{what}: {k} has no inode");
        if k == "sysv_addr" {
            assert_eq!(p.0, shmid as u64, "{what}: the System V mapping is not segment {shmid}");
        }
        if k == "memfd_addr" {
            let fd = report_num(info, "memfd_fd");
            let link = fd_target(pid, fd as i32).unwrap_or_default();
            assert_eq!(link, "/memfd:floe-test (deleted)", "{what}: fd {fd}");
            let ino = fs::metadata(format!("/proc/{pid}/fd/{fd}")).unwrap().ino();
            assert_eq!(ino, p.0, "{what}: the memfd descriptor and mapping are different objects");
        }
    }
}

fn counters(r: &Report) -> [u64; 3] {
    [report_num(r, "anon.counter"), report_num(r, "memfd.counter"), report_num(r, "sysv.counter")]
}

/// The child increments the three counters one after the other: they are
/// never more than one apart, unless a region lost its contents.
fn assert_counters_in_step(r: &Report, what: &str) {
    let c = counters(r);
    let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
    assert!(hi - lo <= 1, "{what}: the counters (anon, memfd, sysv) drifted apart: {c:?}");
}

fn assert_shm_report(r: &Report, before: &Report, what: &str) {
    assert_eq!(r["child_alive"], "1", "{what}: {r:?}");
    assert_eq!(r["memfd.coherent"], "1", "{what}: pread on the memfd disagrees with its mapping: {r:?}");
    for k in ["anon", "memfd", "sysv"] {
        assert_eq!(r[&format!("{k}.pattern_ok")], "1", "{what}: {k} lost its contents: {r:?}");
        assert_eq!(r[&format!("{k}.hash")], before[&format!("{k}.hash")], "{what}: {k} contents");
    }
    assert_counters_in_step(r, what);
}

fn shared_memory_case(tag: &str, key_low: i32, remove_segment: bool) {
    let td = TestDir::new(tag);
    // A key of our own ("FL" + pid bits + case), removed on drop.
    let key = 0x464c_0000 | ((std::process::id() as i32 & 0xfff) << 4) | key_low;
    let _seg = SysvGuard::new(key);
    let mut h = Fx::spawn("state_shm", &td, &["--key", &key.to_string()]);
    let pid = h.pid();
    let info = h.ready_info();
    let child = report_num(&info, "child_pid") as i32;
    let shmid = report_num(&info, "shmid") as i32;
    let mut guard = TreeGuard::new();
    guard.add(child);

    let r1 = h.await_report("the child to count", |r| counters(r).iter().all(|&c| c >= 3));
    assert_shm_report(&r1, &r1, "before the dump");
    assert_same_objects(pid, child, &info, key, shmid, "before the dump");
    let seg = sysv_by_id(shmid).unwrap_or_else(|| panic!("segment {shmid} not in /proc/sysvipc/shm"));
    assert_eq!(seg, SysvShm { key, shmid, size: 64 << 10, nattch: 2 }, "before the dump");
    let r1 = h.report();

    let img = td.join("img");
    dump_and_reap(&mut h.fx, &img, &[]);
    wait_all_gone(&[child], ORIGINALS_GONE, "the original child after the dump");
    guard.kill_all();
    let seg = sysv_by_id(shmid).unwrap_or_else(|| panic!("segment {shmid} vanished with the dumped processes"));
    assert_eq!(seg.nattch, 0, "nobody should be attached after the dump: {seg:?}");
    if remove_segment {
        shm_remove(shmid).unwrap();
        assert_eq!(sysv_by_id(shmid), None, "IPC_RMID did not remove segment {shmid}");
        assert!(sysv_segments().iter().all(|s| s.key != key), "a segment with key {key:#x} is left");
    }

    restore_and_adopt(&mut h.fx, &img, &[], Stdio::null());
    guard.add(child);
    assert!(pid_alive(child), "the child {child} was not restored");
    assert_eq!(proc_ids(child).map(|i| i.ppid), Some(pid), "the restored child has another parent");
    let seg = sysv_by_id(shmid).unwrap_or_else(|| panic!("segment {shmid} does not exist after the restore"));
    assert_eq!(seg, SysvShm { key, shmid, size: 64 << 10, nattch: 2 }, "after the restore");
    assert_eq!(sysv_segments().iter().filter(|s| s.key == key).count(), 1, "more than one segment with key {key:#x}");
    assert_same_objects(pid, child, &info, key, shmid, "after the restore");

    let r2 = h.report();
    assert_eq!(report_num(&r2, "sigusr1_count"), report_num(&r1, "sigusr1_count") + 1);
    assert_eq!(report_num(&r2, "child_pid"), child as u64);
    assert_shm_report(&r2, &r1, "after the restore");
    let c1 = counters(&r1);
    let c2 = counters(&r2);
    for i in 0..3 {
        assert!(c2[i] >= c1[i], "counter {i} went back from {} to {} (memory not restored)", c1[i], c2[i]);
    }
    let r3 = h.await_report("the restored child to keep counting in all three regions", |r| {
        counters(r).iter().zip(&c2).all(|(now, then)| *now >= then + 5)
    });
    assert_shm_report(&r3, &r1, "later after the restore");
    guard.kill_all();
    h.fx.kill_all();
}

/// MAP_SHARED|MAP_ANONYMOUS, memfd and System V memory shared by a parent
/// and its child: after the restore both map the same objects again, the
/// contents survived and the child's writes reach the parent (and the
/// memfd's page cache, read through its descriptor). The System V segment,
/// still present, is reused with its id and key.
#[test]
fn shared_memory_between_parent_and_child_survives_restore() {
    require_root!();
    shared_memory_case("shm", 1, false);
}

/// As above, but the System V segment was removed after the dump: the
/// restore recreates it with the same id and key and fills it from the image.
#[test]
fn removed_sysv_segment_is_recreated_with_its_id() {
    require_root!();
    shared_memory_case("shm-removed", 2, true);
}

// ---------------------------------------------------------------------------
// restore -n

/// Pid and host pid from `floe restore --json`, and the pid to wait for.
fn restore_json_pids(v: &serde_json::Value) -> (i32, i32, i32) {
    let num = |k: &str| {
        v.get(k).and_then(serde_json::Value::as_i64).unwrap_or_else(|| panic!("restore --json has no {k}: {v}")) as i32
    };
    (num("pid"), num("host_pid"), num("wait_pid"))
}

/// A copy of a process still running here (dumped with --leave-running)
/// cannot be restored over its pid, but `restore -n` brings it back in a new
/// pid namespace, where it has its old pid; both copies run side by side.
#[test]
fn restore_into_new_pid_namespace_beside_the_original() {
    require_root!();
    let td = TestDir::new("pidns");
    let img = td.join("img");
    let mut s = Sleeper::spawn(td.path(), 50);
    let pid = s.fx.pid;
    let start = start_time(pid);
    s.wait_ticks(3, Duration::from_secs(5));
    let r1 = s.report();

    let out = dump(pid, &img, &["--leave-running"]);
    assert_ok(&out, "dump --leave-running");
    assert_image_files(&img);
    assert!(s.fx.child_running(), "--leave-running killed the sleeper");
    assert_running_untouched(pid, "after dump --leave-running");

    // The pid is taken by the original.
    let out = restore_detached(&img, &["--json"], Stdio::null());
    let err = assert_failed_cleanly(&out, "restore over the running original");
    assert_mentions_number(&err, pid, "the refusal names the pid");
    assert_mentions(&err, &["taken", "in use", "exists"], "the refusal says the pid is taken");
    assert_eq!(start_time(pid), start, "the original was replaced");

    let out = floe(&[
        "restore".as_ref(),
        "-n".as_ref(),
        "-D".as_ref(),
        img.as_os_str(),
        "--restore-detached".as_ref(),
        "--json".as_ref(),
    ]);
    let mut guard = TreeGuard::new();
    let json = out.status.success().then(|| parse_json_stdout(&out));
    if let Some(j) = &json {
        let (_, host, init) = restore_json_pids(j);
        // The namespace's init first: killing it kills the namespace.
        guard.add(init);
        guard.add(host);
    }
    assert_ok(&out, "restore -n");
    let (inner, host, init) = restore_json_pids(json.as_ref().unwrap());
    assert_eq!(inner, pid, "pid inside the new namespace");
    assert_ne!(host, pid, "host pid must differ from the original's pid");
    assert_eq!(status_field(host, "NSpid").as_deref(), Some(format!("{host}\t{pid}").as_str()), "NSpid of {host}");
    assert_eq!(status_field(init, "NSpid").as_deref(), Some(format!("{init}\t1").as_str()), "NSpid of the init");
    assert_eq!(proc_ids(host).map(|i| i.ppid), Some(init), "the restored process is not the init's child");
    assert_eq!(exe_of(host), exe_of(pid), "the copy runs another program");
    assert_eq!(cmdline_of(host), cmdline_of(pid));
    assert_running_untouched(host, "restored copy");
    assert_running_untouched(pid, "original after restore -n");
    assert_eq!(start_time(pid), start, "the original was replaced");

    // The copy answers with its pid inside the namespace and the state it
    // had at the dump, and keeps ticking.
    let c1 = request_report(host, &s.report_path, libc::SIGUSR1, &s.fx.log);
    assert_eq!(report_num(&c1, "pid"), pid as u64, "getpid() of the copy: {c1:?}");
    assert_eq!(report_num(&c1, "sigusr1_count"), report_num(&r1, "sigusr1_count") + 1, "{c1:?}");
    let o1 = s.report();
    assert_eq!(report_num(&o1, "pid"), pid as u64);
    assert_eq!(report_num(&o1, "sigusr1_count"), report_num(&r1, "sigusr1_count") + 1, "{o1:?}");
    std::thread::sleep(Duration::from_millis(300));
    let c2 = request_report(host, &s.report_path, libc::SIGUSR1, &s.fx.log);
    assert!(report_num(&c2, "next_tick") > report_num(&c1, "next_tick"), "the copy does not tick: {c1:?} -> {c2:?}");
    assert_eq!(report_num(&c2, "sigusr1_count"), report_num(&c1, "sigusr1_count") + 1);
    let o2 = s.report();
    assert!(report_num(&o2, "next_tick") > report_num(&o1, "next_tick"), "the original stopped: {o1:?} -> {o2:?}");
    assert_eq!(report_num(&o2, "sigusr1_count"), report_num(&o1, "sigusr1_count") + 1);
    // Both append to the same ticks file: tick numbers written by both.
    let twice = |ticks: &[(u64, u64)]| {
        let nums: Vec<u64> = ticks.iter().map(|t| t.0).collect();
        nums.iter().filter(|n| nums.iter().filter(|m| m == n).count() == 2).count()
    };
    assert!(
        wait_until(Duration::from_secs(5), || twice(&s.ticks()) >= 6),
        "the two copies do not both write ticks: {:?}",
        s.ticks()
    );

    guard.kill_all();
    assert!(!pid_exists(host) && !pid_exists(init), "the namespace survived its init");
    assert_running_untouched(pid, "original after the copy was killed");
    assert_eq!(start_time(pid), start);
    let o3 = s.report();
    assert_eq!(report_num(&o3, "sigusr1_count"), report_num(&o2, "sigusr1_count") + 1);
}

// ---------------------------------------------------------------------------
// --ext-unix-sk

struct UnixPeers {
    /// Declared first: killed after the client.
    server: Fixture,
    client: Fx,
    out: PathBuf,
}

impl UnixPeers {
    fn spawn(td: &TestDir, ty: &str) -> Self {
        let sock = td.join("server.sock");
        let out = td.join("server.out");
        let sready = td.join("server.ready");
        let server = Spawn::fixture("state_unixserver", td.path())
            .arg("--ready")
            .arg(&sready)
            .arg("--path")
            .arg(&sock)
            .arg("--out")
            .arg(&out)
            .arg("--type")
            .arg(ty)
            .ready_file(&sready)
            .spawn();
        let client =
            Fx::spawn("state_unixclient", td, &["--path".as_ref(), sock.as_os_str(), "--type".as_ref(), ty.as_ref()]);
        Self { server, client, out }
    }

    /// The message numbers the server received so far.
    fn received(&self) -> Vec<u64> {
        numbered_lines(&self.out, "msg ")
    }

    fn wait_received(&self, n: usize, what: &str) -> Vec<u64> {
        if !wait_until(Duration::from_secs(10), || self.received().len() >= n) {
            panic!(
                "{what}: the server got only {} messages, expected {n}\nclient log:\n{}\nserver log:\n{}",
                self.received().len(),
                self.client.fx.log_contents(),
                self.server.log_contents()
            );
        }
        self.received()
    }
}

/// Messages 0, 1, 2, ... each exactly once, in order.
fn assert_consecutive(nums: &[u64], what: &str) {
    let want: Vec<u64> = (0..nums.len() as u64).collect();
    if nums != want.as_slice() {
        let bad = nums.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(nums.len());
        panic!(
            "{what}: messages are not 0..{} in order; first difference at index {bad}: {:?}",
            nums.len(),
            &nums[bad.saturating_sub(3)..(bad + 3).min(nums.len())]
        );
    }
}

/// A datagram client of a server outside the tree: refused without
/// --ext-unix-sk (and unharmed), dumped with it, reconnected by name on
/// restore; the server receives every message number exactly once.
#[test]
fn ext_unix_sk_reconnects_datagram_client_without_a_gap() {
    require_root!();
    let td = TestDir::new("ext-unix-dgram");
    let mut p = UnixPeers::spawn(&td, "dgram");
    let pid = p.client.pid();
    p.wait_received(3, "before the dump");
    let r1 = p.client.report();

    let err = refused_dump(pid, &td.join("img-refused"), &[], "dump of an external datagram client");
    assert_mentions(&err, &["--ext-unix-sk"], "the refusal suggests --ext-unix-sk");
    assert_mentions_number(&err, p.server.pid, "the refusal names the server");
    assert!(p.client.fx.child_running(), "the refused dump killed the client");
    assert_running_untouched(pid, "after the refused dump");
    let n = p.received().len();
    p.wait_received(n + 3, "after the refused dump");
    let r2 = p.client.report();
    assert_eq!(report_num(&r2, "send_errors"), 0, "{r2:?}");
    assert!(report_num(&r2, "next_msg") > report_num(&r1, "next_msg"));

    let img = td.join("img");
    dump_and_reap(&mut p.client.fx, &img, &["--ext-unix-sk"]);
    std::thread::sleep(Duration::from_millis(200));
    let at_dump = p.received();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(p.received(), at_dump, "messages arrived while the client was not running");
    restore_and_adopt(&mut p.client.fx, &img, &[], Stdio::null());
    assert_running_untouched(pid, "restored client");
    let got = p.wait_received(at_dump.len() + 10, "after the restore");
    assert_consecutive(&got, "messages received across the dump and restore");
    let r3 = p.client.report();
    assert_eq!(report_num(&r3, "sigusr1_count"), 3, "{r3:?}");
    assert_eq!(report_num(&r3, "send_errors"), 0, "sends failed after the restore: {r3:?}");
    assert!(report_num(&r3, "next_msg") > at_dump.len() as u64, "{r3:?}");
    assert!(pid_alive(p.server.pid), "the server died");
    p.client.fx.kill_all();
}

/// --ext-unix-sk does not cover a stream connection to a listener outside
/// the tree: still refused, and the client carries on.
#[test]
fn ext_unix_sk_still_refuses_stream_connection() {
    require_root!();
    let td = TestDir::new("ext-unix-stream");
    let mut p = UnixPeers::spawn(&td, "stream");
    let pid = p.client.pid();
    p.wait_received(3, "before the dump");
    let r1 = p.client.report();

    let err = refused_dump(pid, &td.join("img"), &["--ext-unix-sk"], "dump --ext-unix-sk of a stream client");
    assert_mentions(&err, &["stream"], "the refusal explains streams are not covered");
    assert_mentions_number(&err, p.server.pid, "the refusal names the server");
    assert!(p.client.fx.child_running(), "the refused dump killed the client");
    assert_running_untouched(pid, "after the refused dump");
    let n = p.received().len();
    let got = p.wait_received(n + 3, "after the refused dump");
    assert_consecutive(&got, "stream messages");
    let r2 = p.client.report();
    assert_eq!(report_num(&r2, "send_errors"), 0, "{r2:?}");
    assert!(report_num(&r2, "next_msg") > report_num(&r1, "next_msg"));
}

// ---------------------------------------------------------------------------
// CPU affinity, scheduling policy and nice, per thread

/// A main thread with nice 2 and oom_score_adj 123; a worker bound to the
/// last CPU under SCHED_BATCH with nice 7 and I/O priority best-effort 5; a
/// SCHED_FIFO (priority 3, reset-on-fork) thread. Writes the ready file once
/// all three are set.
const PY_SCHED: &str = "import ctypes, os, sys, threading, time\n\
                        last = max(os.sched_getaffinity(0))\n\
                        os.setpriority(os.PRIO_PROCESS, 0, 2)\n\
                        open('/proc/self/oom_score_adj', 'w').write('123')\n\
                        done = []\n\
                        def batch():\n\
                        \x20   os.sched_setaffinity(0, {last})\n\
                        \x20   os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n\
                        \x20   os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)\n\
                        \x20   ctypes.CDLL(None, use_errno=True).syscall(251, 1, threading.get_native_id(), (2 << 13) | 5)\n\
                        \x20   done.append(1)\n\
                        \x20   while True: time.sleep(0.05)\n\
                        def fifo():\n\
                        \x20   os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(3))\n\
                        \x20   done.append(1)\n\
                        \x20   while True: time.sleep(0.05)\n\
                        for f in (batch, fifo):\n\
                        \x20   threading.Thread(target=f, daemon=True).start()\n\
                        while len(done) < 2: time.sleep(0.01)\n\
                        open(sys.argv[1], 'w').write('ok')\n\
                        while True: time.sleep(0.05)\n";

/// `python3 -c SCRIPT READY` in `td`, once it has written the file READY
/// (returned with the fixture).
fn python_until_ready(td: &TestDir, name: &str, script: &str) -> (Fixture, PathBuf) {
    let ready = td.join("ready");
    let fx = Spawn::program(name, python3(), td.path()).arg("-c").arg(script).arg(&ready).ready_file(&ready).spawn();
    (fx, ready)
}

/// What [`python_reporting`] puts around a script: `d` (the test dir) and
/// `report(name, text)` (writes `d/name` atomically) before it, the ready
/// file and an idle loop (signal handlers do the work) after it.
const PY_REPORT_HEAD: &str = "import os, signal, sys, time\n\
                              d = os.path.dirname(sys.argv[1])\n\
                              def report(name, text):\n\
                              \x20   t = os.path.join(d, name + '.tmp')\n\
                              \x20   open(t, 'w').write(text)\n\
                              \x20   os.rename(t, os.path.join(d, name))\n";
const PY_REPORT_TAIL: &str = "open(sys.argv[1], 'w').write('pid=%d\\n' % os.getpid())\n\
                              while True: time.sleep(0.05)\n";

/// `body` as a python process with [`PY_REPORT_HEAD`] and [`PY_REPORT_TAIL`],
/// once it is ready.
fn python_reporting(td: &TestDir, name: &str, body: &str) -> Fixture {
    python_until_ready(td, name, &format!("{PY_REPORT_HEAD}{body}{PY_REPORT_TAIL}")).0
}

/// Per thread of `pid`: (tid, sched_getscheduler with flags, rt priority, nice, Cpus_allowed_list, ioprio).
fn sched_state(pid: i32) -> Vec<(i32, i32, u64, i64, String, i64)> {
    tids_of(pid)
        .into_iter()
        .map(|tid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
            let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            // Fields 19 (nice) and 40 (rt_priority), counted from 3 after the comm.
            let nice: i64 = f[19 - 3].parse().unwrap();
            let rt: u64 = f[40 - 3].parse().unwrap();
            // SAFETY: plain syscall with an integer argument.
            let policy = unsafe { libc::sched_getscheduler(tid) };
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
            // SAFETY: plain syscall with integer arguments (IOPRIO_WHO_PROCESS = 1).
            let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, tid) };
            (tid, policy, rt, nice, cpus, ioprio)
        })
        .collect()
}

/// Each thread keeps its CPU set, scheduling policy (with reset-on-fork),
/// real-time priority, nice value and I/O priority across a dump and
/// restore, and the process its oom_score_adj.
#[test]
fn threads_keep_cpu_affinity_policy_and_nice() {
    require_root!();
    let td = TestDir::new("sched");
    let (mut fx, _) = python_until_ready(&td, "python-sched", PY_SCHED);
    let pid = fx.pid;
    let before = sched_state(pid);
    eprintln!("before: {before:?}");
    let all = sched_state(std::process::id() as i32)[0].4.clone();
    assert!(
        before.iter().any(|t| t.1 == libc::SCHED_BATCH && t.3 == 7 && t.4 != all && t.5 == (2 << 13) | 5),
        "no bound batch thread: {before:?}"
    );
    assert!(before.iter().any(|t| t.1 == libc::SCHED_FIFO | 0x4000_0000 && t.2 == 3), "no fifo thread: {before:?}");
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let after = sched_state(pid);
    assert_eq!(after, before, "scheduling state per thread after the restore");
    let adj = fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(adj.trim(), "123", "oom_score_adj after the restore");
}

// ---------------------------------------------------------------------------
// madvise flags of mappings

/// Five private anonymous mappings, each with one advice (18: MADV_WIPEONFORK,
/// which python does not name), and their
/// addresses in the ready file as `flag=hexaddr` pairs.
const PY_ADVICE: &str = "import ctypes, mmap, sys, time\n\
                         keep = []\n\
                         out = []\n\
                         for f, adv in (('mg', mmap.MADV_MERGEABLE), ('dd', mmap.MADV_DONTDUMP), \
                         ('dc', mmap.MADV_DONTFORK), ('wf', 18), ('hg', mmap.MADV_HUGEPAGE)):\n\
                         \x20   m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n\
                         \x20   m.madvise(adv)\n\
                         \x20   m[0:4] = f.encode() * 2\n\
                         \x20   keep.append(m)\n\
                         \x20   out.append('%s=%x' % (f, ctypes.addressof(ctypes.c_char.from_buffer(m))))\n\
                         open(sys.argv[1], 'w').write(' '.join(out))\n\
                         while True: time.sleep(0.05)\n";

/// The VmFlags of the mapping of `pid` that contains `addr`.
fn vmflags_at(pid: i32, addr: u64) -> Vec<String> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split(' ').next().unwrap_or("");
        if let Some((s, e)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (s, e) = (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap());
            inside = s <= addr && addr < e;
        } else if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
            return flags.split_whitespace().map(str::to_string).collect();
        }
    }
    panic!("no mapping at {addr:#x} in {pid}");
}

/// Mappings keep their madvise flags (MADV_MERGEABLE, DONTDUMP, DONTFORK,
/// WIPEONFORK, HUGEPAGE) across a dump and restore.
#[test]
fn mappings_keep_their_madvise_flags() {
    require_root!();
    let td = TestDir::new("advice");
    let (mut fx, ready) = python_until_ready(&td, "python-advice", PY_ADVICE);
    let pid = fx.pid;
    let regions: Vec<(String, u64)> = fs::read_to_string(&ready)
        .unwrap()
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), u64::from_str_radix(v, 16).unwrap())
        })
        .collect();
    assert_eq!(regions.len(), 5, "{regions:?}");
    let before: Vec<Vec<String>> = regions.iter().map(|(_, a)| vmflags_at(pid, *a)).collect();
    for ((f, a), flags) in regions.iter().zip(&before) {
        assert!(flags.contains(f), "mapping at {a:#x} lacks {f} before the dump: {flags:?}");
    }
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let after: Vec<Vec<String>> = regions.iter().map(|(_, a)| vmflags_at(pid, *a)).collect();
    assert_eq!(after, before, "VmFlags of the advised mappings after the restore ({regions:?})");
}

// ---------------------------------------------------------------------------
// deleted executable and mapped files

/// A process whose executable and a mapped file were deleted while it ran
/// (what a package upgrade does to a server's binary and libraries) is
/// dumped with both files' contents and restored with both recreated,
/// unlinked, in their directory: one file behind its descriptor and its
/// private, copy-on-write and shared mappings. Its working directory was
/// removed too, and it is back in a removed directory of that name.
#[test]
fn deleted_executable_and_mapped_file_are_recreated() {
    require_root!();
    let td = TestDir::new("deleted-maps");
    let exe = td.join("deleted_maps.copy");
    copy_program(&fixture_path("deleted_maps"), &exe);
    let (ready, report_path, data) = (td.join("dm.ready"), td.join("dm.report"), td.join("data.bin"));
    let fx = Spawn::program("deleted_maps", &exe, td.path())
        .arg("--ready")
        .arg(&ready)
        .arg("--report")
        .arg(&report_path)
        .arg("--data")
        .arg(&data)
        .arg("--self")
        .arg(&exe)
        .arg("--cwd")
        .arg(td.join("gone"))
        .ready_file(&ready)
        .spawn();
    let mut fx = Fx { fx, ready, report_path };
    let ok = |r: &Report, what: &str| {
        for k in ["ro_ok", "cow_ok", "sh_ok", "fd_sees_sh", "sh_to_fd"] {
            assert_eq!(r[k], "1", "{what}: {k} in {r:?}");
        }
        assert_eq!(r["nlink"], "0", "{what}: the mapped file has links again: {r:?}");
        let dir = td.path().to_str().unwrap();
        assert_eq!(r["cwd"], format!("{dir}/gone (deleted)"), "{what}: working directory");
        assert_eq!(r["cwd_create"], libc::ENOENT.to_string(), "{what}: a file could be made in the removed directory");
        assert!(
            r["exe"].starts_with(&format!("{dir}/")) && r["exe"].ends_with(" (deleted)"),
            "{what}: exe link {:?} is not a deleted file in {dir}",
            r["exe"]
        );
    };
    let before = fx.report();
    ok(&before, "before the dump");
    // What a live migration sends before its first pass: both files, once.
    let sent = floe_engine::migrate::preflight::deleted_files(fx.pid()).unwrap();
    let mut names: Vec<(String, usize)> = sent.iter().map(|d| (d.path.clone(), d.data.len())).collect();
    names.sort();
    let exe_len = fs::metadata(fixture_path("deleted_maps")).unwrap().len() as usize;
    assert_eq!(
        names,
        vec![(data.display().to_string(), 8 * 4096), (exe.display().to_string(), exe_len)],
        "deleted files a migration sends"
    );
    let img = td.join("img");
    dump_and_reap(&mut fx.fx, &img, &[]);
    restore_and_adopt(&mut fx.fx, &img, &[], Stdio::null());
    let after = fx.report();
    ok(&after, "after the restore");
    let maps = fs::read_to_string(format!("/proc/{}/maps", fx.pid())).unwrap();
    let dir = td.path().to_str().unwrap();
    let in_dir = maps.lines().filter(|l| l.contains(&format!(" {dir}/")) && l.ends_with(" (deleted)")).count();
    // ro, cow, sh and the executable's own mappings.
    assert!(in_dir >= 4, "expected the deleted files mapped from {dir}:\n{maps}");
    let left: Vec<String> =
        fs::read_dir(td.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(
        !left
            .iter()
            .any(|n| ["data.bin", "deleted_maps.copy", "gone"].contains(&n.as_str()) || n.starts_with(".floe-")),
        "a deleted file came back with a name: {left:?}"
    );
}

// ---------------------------------------------------------------------------
// FIFOs

/// A FIFO (`fifo`, mode 0640, beside the ready file) open twice: a
/// non-blocking reader and a blocking writer, with bytes queued. On SIGUSR1
/// the process writes more, reads everything, and reports what it read and
/// each descriptor's O_NONBLOCK in `fifo.report`.
const PY_FIFO: &str = "import fcntl\n\
                       p = os.path.join(d, 'fifo')\n\
                       os.mkfifo(p, 0o640)\n\
                       r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)\n\
                       w = os.open(p, os.O_WRONLY)\n\
                       os.write(w, b'queued-at-dump')\n\
                       def usr1(sig, frame):\n\
                       \x20   os.write(w, b'|later')\n\
                       \x20   data = os.read(r, 100)\n\
                       \x20   nb = lambda fd: int(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK != 0)\n\
                       \x20   report('fifo.report', 'data=%s\\nr_nonblock=%d\\nw_nonblock=%d\\n' % (data.decode(), nb(r), nb(w)))\n\
                       signal.signal(signal.SIGUSR1, usr1)\n";

/// A FIFO is refused while a process outside the tree has it open (its
/// buffer would outlive the dump, and the saved bytes would be queued
/// twice). Otherwise its descriptors, their flags and its queued bytes come
/// back, and the FIFO itself is made again (same mode) if it was removed.
#[test]
fn fifo_keeps_queued_bytes_and_flags() {
    require_root!();
    let td = TestDir::new("fifo");
    let mut fx = python_reporting(&td, "python-fifo", PY_FIFO);
    let fifo = td.join("fifo");
    let outside = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    let err = refused_dump(fx.pid, &td.join("refused"), &[], "dump with the FIFO open outside the tree");
    assert_mentions(&err, &["fifo", "outside the dumped tree", &std::process::id().to_string()], "FIFO refusal");
    drop(outside);
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    fs::remove_file(&fifo).unwrap();
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let meta = fs::metadata(&fifo).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()), "{} is not a FIFO again", fifo.display());
    assert_eq!(meta.mode() & 0o7777, 0o640, "mode of the FIFO made again");
    let r = request_report(fx.pid, &td.join("fifo.report"), libc::SIGUSR1, &fx.log);
    assert_eq!(r["data"], "queued-at-dump|later", "bytes read from the FIFO after the restore");
    assert_eq!((r["r_nonblock"].as_str(), r["w_nonblock"].as_str()), ("1", "0"), "O_NONBLOCK of reader, writer");
}

// ---------------------------------------------------------------------------
// netlink sockets

/// Two netlink sockets: NETLINK_ROUTE bound by the kernel (port id chosen on
/// bind) with RTMGRP_LINK and group 5 (RTNLGRP_IPV4_IFADDR) joined, and an
/// unbound NETLINK_KOBJECT_UEVENT datagram socket. SIGUSR2 sends a link
/// dump request and leaves the answer unread; SIGUSR1 reads whatever is
/// waiting, then asks for the links and reads the answer (through to
/// NLMSG_DONE), and reports in `netlink.report` the route socket's port id
/// and group mask (getsockname), its memberships (NETLINK_LIST_MEMBERSHIPS),
/// the links counted, whether the answer was addressed to its port id, and
/// the uevent socket's port id.
const PY_NETLINK: &str = "import socket, struct\n\
                          s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)\n\
                          s.bind((0, 1))\n\
                          s.setsockopt(270, 1, 5)\n\
                          u = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)\n\
                          def ask(seq):\n\
                          \x20   s.send(struct.pack('=IHHII', 32, 18, 0x301, seq, 0) + bytes(16))\n\
                          def usr2(sig, frame):\n\
                          \x20   ask(7)\n\
                          def usr1(sig, frame):\n\
                          \x20   s.setblocking(False)\n\
                          \x20   try:\n\
                          \x20       while s.recv(65536): pass\n\
                          \x20   except BlockingIOError: pass\n\
                          \x20   s.setblocking(True)\n\
                          \x20   ask(9)\n\
                          \x20   links, to_us, done = 0, 1, False\n\
                          \x20   while not done:\n\
                          \x20       buf = s.recv(65536)\n\
                          \x20       at = 0\n\
                          \x20       while at + 16 <= len(buf):\n\
                          \x20           ln, ty, fl, seq, pid = struct.unpack_from('=IHHII', buf, at)\n\
                          \x20           if seq == 9:\n\
                          \x20               to_us &= int(pid == s.getsockname()[0])\n\
                          \x20               links += ty == 16\n\
                          \x20               done = done or ty == 3\n\
                          \x20           at += (ln + 3) & ~3\n\
                          \x20   mem = struct.unpack_from('=I', s.getsockopt(270, 9, 64), 0)[0]\n\
                          \x20   port, groups = s.getsockname()\n\
                          \x20   report('netlink.report', 'port=%d\\ngroups=%d\\nmemberships=%d\\nlinks=%d\\nto_us=%d\\n\
                          uevent_port=%d\\n' % (port, groups, mem, links, to_us, u.getsockname()[0]))\n\
                          signal.signal(signal.SIGUSR1, usr1)\n\
                          signal.signal(signal.SIGUSR2, usr2)\n";

/// Netlink sockets keep their port id, multicast groups and type, and
/// answer requests after the restore; one with an unread answer waiting is
/// refused (the answer cannot be put back).
#[test]
fn netlink_sockets_keep_port_id_and_groups() {
    require_root!();
    let td = TestDir::new("netlink");
    let mut fx = python_reporting(&td, "python-netlink", PY_NETLINK);
    let report = td.join("netlink.report");
    let before = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_ne!(before["port"], "0", "the route socket has no port id: {before:?}");
    assert_eq!(before["memberships"], (1 | 1 << 4).to_string(), "groups joined: {before:?}");
    assert_eq!(before["uevent_port"], "0", "{before:?}");
    send_signal(fx.pid, libc::SIGUSR2).unwrap();
    let refused = td.join("refused");
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = dump(fx.pid, &refused, &[]);
            !out.status.success() && stderr_text(&out).contains("waiting to be read")
        }),
        "a netlink socket with an unread answer was not refused"
    );
    assert!(pid_alive(fx.pid), "the refused dump killed the process");
    // SIGUSR1 drains it.
    let drained = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(drained["port"], before["port"]);
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let after = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(after, before, "netlink sockets after the restore");
    assert_ne!(after["links"], "0", "no link in the answer: {after:?}");
    assert_eq!(after["to_us"], "1", "the answer was not addressed to the restored port id: {after:?}");
}

// ---------------------------------------------------------------------------
// ICMP (ping) datagram sockets

/// A ping socket bound to 127.0.0.1 with ICMP identifier 4242. On SIGUSR1
/// it sends an echo request to 127.0.0.1 and reports (`ping.report`)
/// whether the answer came back to it, and its bound address and port.
const PY_PING: &str = "import socket, struct\n\
                       s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)\n\
                       s.bind(('127.0.0.1', 4242))\n\
                       s.settimeout(5)\n\
                       n = [0]\n\
                       def usr1(sig, frame):\n\
                       \x20   n[0] += 1\n\
                       \x20   s.sendto(struct.pack('!BBHHH', 8, 0, 0, 0, n[0]) + b'floe', ('127.0.0.1', 0))\n\
                       \x20   data = s.recv(100)\n\
                       \x20   ty, code, ck, ident, seq = struct.unpack_from('!BBHHH', data)\n\
                       \x20   report('ping.report', 'reply=%d\\nseq_ok=%d\\nbound=%s:%d\\n' % (ty == 0, seq == n[0], *s.getsockname()))\n\
                       signal.signal(signal.SIGUSR1, usr1)\n";

/// Puts net.ipv4.ping_group_range back as it was.
struct PingGroupRange(String);

impl Drop for PingGroupRange {
    fn drop(&mut self) {
        let _ = fs::write("/proc/sys/net/ipv4/ping_group_range", &self.0);
    }
}

/// An ICMP datagram ("ping") socket keeps its address and identifier, and
/// its echo answers still reach it after the restore.
#[test]
fn ping_socket_keeps_its_identifier() {
    require_root!();
    let sysctl = "/proc/sys/net/ipv4/ping_group_range";
    let _restore = PingGroupRange(fs::read_to_string(sysctl).unwrap());
    // Ping sockets need the creator's group in this range (root's here).
    fs::write(sysctl, "0 0").unwrap();
    let td = TestDir::new("ping-socket");
    let mut fx = python_reporting(&td, "python-ping", PY_PING);
    let report = td.join("ping.report");
    let before = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!((before["reply"].as_str(), before["seq_ok"].as_str()), ("1", "1"), "{before:?}");
    assert_eq!(before["bound"], "127.0.0.1:4242");
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let after = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(after, before, "ping socket after the restore");
}

// ---------------------------------------------------------------------------
// UDP sockets with datagrams waiting

/// Three UDP sockets whose ports go to `ports`: `a` on 0.0.0.0, `b` on [::]
/// (IPv4 too), `c` on 127.0.0.1 with IP_PKTINFO on. Nothing is read until
/// SIGUSR1, which reads everything waiting in `a` and `b` and reports each
/// datagram as "first bytes:length|sender address|sender port|address it
/// was sent to"; SIGUSR2 empties `c`.
const PY_UDP_QUEUE: &str = "import socket\n\
                            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                            a.bind(('0.0.0.0', 0))\n\
                            b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
                            b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
                            b.bind(('::', 0))\n\
                            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                            c.bind(('127.0.0.1', 0))\n\
                            c.setsockopt(socket.IPPROTO_IP, 8, 1)\n\
                            def drain(s, v6):\n\
                            \x20   s.setblocking(False)\n\
                            \x20   s.setsockopt(socket.IPPROTO_IP, 8, 1)\n\
                            \x20   if v6: s.setsockopt(socket.IPPROTO_IPV6, 49, 1)\n\
                            \x20   out = []\n\
                            \x20   while True:\n\
                            \x20       try: d, anc, fl, addr = s.recvmsg(70000, 200)\n\
                            \x20       except BlockingIOError: return out\n\
                            \x20       dst = '?'\n\
                            \x20       for lvl, ty, x in anc:\n\
                            \x20           if lvl == socket.IPPROTO_IP and ty == 8: dst = socket.inet_ntoa(x[8:12])\n\
                            \x20           if lvl == socket.IPPROTO_IPV6 and ty == 50: dst = socket.inet_ntop(socket.AF_INET6, x[:16])\n\
                            \x20       out.append('%s:%d|%s|%d|%s' % (d[:8].decode(), len(d), addr[0], addr[1], dst))\n\
                            def usr1(sig, frame):\n\
                            \x20   report('udp.report', 'a=%s\\nb=%s\\n' % (','.join(drain(a, False)), ','.join(drain(b, True))))\n\
                            signal.signal(signal.SIGUSR1, usr1)\n\
                            signal.signal(signal.SIGUSR2, lambda sig, frame: drain(c, False))\n\
                            report('ports', 'a=%d\\nb=%d\\nc=%d\\n' % (a.getsockname()[1], b.getsockname()[1], c.getsockname()[1]))\n";

/// Datagrams waiting in UDP sockets come back, in order, with their
/// senders, the address each was sent to and their whole payload (one of
/// 60000 bytes), on IPv4 and dual-stack IPv6 sockets. A socket that asks
/// for IP_PKTINFO with each datagram has its waiting datagrams refused
/// (they would arrive again on the loopback device).
#[test]
fn udp_datagrams_waiting_are_delivered_again() {
    require_root!();
    let td = TestDir::new("udp-queue");
    let mut fx = python_reporting(&td, "python-udp", PY_UDP_QUEUE);
    let ports = read_report(&td.join("ports"));
    let port = |k: &str| ports[k].parse::<u16>().unwrap();
    let send = |from: &str, to: String, payload: &[u8]| {
        let s = std::net::UdpSocket::bind(from).unwrap();
        s.send_to(payload, &to).unwrap();
        s.local_addr().unwrap().port()
    };
    let (a, b) = (port("a"), port("b"));
    let p1 = send("127.0.0.1:0", format!("127.0.0.1:{a}"), b"one");
    let p2 = send("127.0.0.3:0", format!("127.0.0.2:{a}"), b"two");
    let p3 = send("127.0.0.1:0", format!("127.0.0.1:{a}"), &[b'x'; 60000]);
    let p4 = send("127.0.0.1:0", format!("127.0.0.1:{b}"), b"four");
    let p5 = send("[::1]:0", format!("[::1]:{b}"), b"five");
    let want_a = format!(
        "one:3|127.0.0.1|{p1}|127.0.0.1,two:3|127.0.0.3|{p2}|127.0.0.2,xxxxxxxx:60000|127.0.0.1|{p3}|127.0.0.1"
    );
    let want_b = format!("four:4|::ffff:127.0.0.1|{p4}|127.0.0.1,five:4|::1|{p5}|::1");

    send("127.0.0.1:0", format!("127.0.0.1:{}", port("c")), b"c");
    let err = refused_dump(fx.pid, &td.join("refused"), &[], "dump with a datagram waiting on an IP_PKTINFO socket");
    assert_mentions(&err, &["ip_pktinfo", "waiting"], "IP_PKTINFO refusal");
    send_signal(fx.pid, libc::SIGUSR2).unwrap();
    let img = td.join("img");
    assert!(
        wait_until(Duration::from_secs(5), || dump(fx.pid, &img, &[]).status.success()),
        "the dump is still refused once the IP_PKTINFO socket is empty"
    );
    fx.reap(Duration::from_secs(10));
    let shown = stdout_text(&inspect(&img, &[]));
    assert!(shown.contains(&format!("udp 0.0.0.0:{a} (3 datagrams waiting)")), "floe inspect:\n{shown}");
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let r = request_report(fx.pid, &td.join("udp.report"), libc::SIGUSR1, &fx.log);
    assert_eq!(r["a"], want_a, "datagrams of the IPv4 socket after the restore");
    assert_eq!(r["b"], want_b, "datagrams of the dual-stack socket after the restore");
}

// ---------------------------------------------------------------------------
// listeners with connections waiting to be accepted

/// A TCP server on 127.0.0.1 (port in `port`) that, every 30 ms, accepts
/// what waits in its accept queue, but only once the file `go` exists, and
/// echoes what its connections send, uppercased.
const PY_ROUNDS: &str = "import socket, threading\n\
                         l = socket.socket()\n\
                         l.bind(('127.0.0.1', 0))\n\
                         l.listen(16)\n\
                         l.setblocking(False)\n\
                         conns = []\n\
                         def rounds():\n\
                         \x20   while True:\n\
                         \x20       time.sleep(0.03)\n\
                         \x20       while os.path.exists(os.path.join(d, 'go')):\n\
                         \x20           try: c, _ = l.accept()\n\
                         \x20           except BlockingIOError: break\n\
                         \x20           c.setblocking(False)\n\
                         \x20           conns.append(c)\n\
                         \x20       for c in conns:\n\
                         \x20           try: data = c.recv(100)\n\
                         \x20           except BlockingIOError: continue\n\
                         \x20           if data: c.sendall(data.upper())\n\
                         threading.Thread(target=rounds, daemon=True).start()\n\
                         report('port', 'port=%d\\n' % l.getsockname()[1])\n";

/// `TracerPid:` of `pid` (0: not traced).
fn tracer_of(pid: i32) -> i32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Connections waiting in a listener's accept queue no longer fail a dump:
/// the listener takes no new connection while the tree is frozen, and the
/// server runs briefly until it has accepted them; they are then dumped
/// (with --tcp-established) and answer after the restore. A server that
/// does not accept them within the allowed runs is refused, and runs on.
#[test]
fn connections_waiting_to_be_accepted_are_accepted_before_the_dump() {
    require_root!();
    let td = TestDir::new("accept-queue");
    let mut fx = python_reporting(&td, "python-rounds", PY_ROUNDS);
    let port = read_report(&td.join("port"))["port"].parse::<u16>().unwrap();
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();

    // Not accepting yet: connections wait, and the dump is refused.
    let stuck = [connect(), connect()];
    let err = refused_dump(fx.pid, &td.join("refused"), &["--tcp-established"], "dump of a server not accepting");
    assert_mentions(&err, &["2 connection(s) still wait", "accept queue"], "accept-queue refusal");
    assert!(pid_alive(fx.pid), "the refused dump killed the server");
    drop(stuck);

    // Connections wait at the freeze; the server accepts them once floe
    // holds it (it may accept only in floe's short runs).
    let mut conns: Vec<std::net::TcpStream> = (0..3).map(|_| connect()).collect();
    let (pid, img) = (fx.pid, td.join("img"));
    let dumping = {
        let img = img.clone();
        std::thread::spawn(move || dump(pid, &img, &["--tcp-established", "--log-level", "info"]))
    };
    // Watched closely: floe lets the server run (untraced) for a few ms at a time.
    let t = std::time::Instant::now();
    while tracer_of(pid) == 0 && !dumping.is_finished() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_micros(200));
    }
    fs::write(td.join("go"), "").unwrap();
    let out = dumping.join().unwrap();
    assert_ok(&out, "dump of the server with connections waiting");
    fx.reap(Duration::from_secs(10));
    let log = stderr_text(&out);
    let line = log.lines().find(|l| l.contains("listeners closed")).unwrap_or_default();
    assert!(!line.contains("waiting_at_freeze=0") && !line.contains("thaws=0"), "no wait at the freeze:\n{log}");
    restore_and_adopt(&mut fx, &img, &["--tcp-established"], Stdio::null());
    for (i, c) in conns.iter_mut().enumerate() {
        use std::io::{Read, Write};
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(format!("conn{i}").as_bytes()).unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, format!("CONN{i}").as_bytes(), "answer on connection {i} after the restore");
    }
}

/// A netlink route socket whose answers the process reads in rounds, every
/// 30 ms, once the file `go` exists. SIGUSR2 asks for the links; SIGUSR1
/// reports (`nl.report`) how many answer bytes it has read.
const PY_NETLINK_ROUNDS: &str = "import socket, struct, threading\n\
                                 s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)\n\
                                 s.bind((0, 0))\n\
                                 s.setblocking(False)\n\
                                 got = [0]\n\
                                 def rounds():\n\
                                 \x20   while True:\n\
                                 \x20       time.sleep(0.03)\n\
                                 \x20       if not os.path.exists(os.path.join(d, 'go')): continue\n\
                                 \x20       try:\n\
                                 \x20           while True: got[0] += len(s.recv(65536))\n\
                                 \x20       except BlockingIOError: pass\n\
                                 threading.Thread(target=rounds, daemon=True).start()\n\
                                 signal.signal(signal.SIGUSR2, lambda sig, frame: \
                                 s.send(struct.pack('=IHHII', 32, 18, 0x301, 1, 0) + bytes(16)))\n\
                                 signal.signal(signal.SIGUSR1, lambda sig, frame: report('nl.report', 'got=%d\\n' % got[0]))\n";

/// Messages waiting in a netlink socket at the freeze, which a dump cannot
/// save, no longer fail it when the process reads them soon: the tree runs
/// briefly until they are read, then the dump goes on.
#[test]
fn passing_states_at_the_freeze_are_let_go() {
    require_root!();
    let td = TestDir::new("settle");
    let mut fx = python_reporting(&td, "python-nl-rounds", PY_NETLINK_ROUNDS);
    let pid = fx.pid;
    send_signal(pid, libc::SIGUSR2).unwrap();
    let img = td.join("img");
    let dumping = {
        let img = img.clone();
        std::thread::spawn(move || dump(pid, &img, &["--log-level", "info"]))
    };
    // The process reads only once floe holds it (in floe's short runs).
    let t = std::time::Instant::now();
    while tracer_of(pid) == 0 && !dumping.is_finished() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_micros(200));
    }
    fs::write(td.join("go"), "").unwrap();
    let out = dumping.join().unwrap();
    assert_ok(&out, "dump with a netlink answer waiting at the freeze");
    let log = stderr_text(&out);
    assert!(log.contains("netlink messages waiting") && !log.contains("thaws=0"), "no run to read them:\n{log}");
    fx.reap(Duration::from_secs(10));
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let r = request_report(pid, &td.join("nl.report"), libc::SIGUSR1, &fx.log);
    assert_ne!(r["got"], "0", "the answer was not read before the dump: {r:?}");
}

// ---------------------------------------------------------------------------
// memfds mapped privately

/// Two memfds, 4 pages each, page i filled with 'A' + i, mapped privately;
/// page 1 of each mapping is overwritten with 'p' (a private copy). The
/// descriptor of `kept` stays open, that of `gone` is closed. SIGUSR1
/// writes 'w' (then 'x', 'y', ... at the next ones) through `kept`'s
/// descriptor to its page 2, then reports each mapping's pages (first byte
/// of each) and its /proc/self/maps name.
const PY_MEMFD_PRIVATE: &str = "import mmap, ctypes\n\
                                maps = {}\n\
                                for name in ('kept', 'gone'):\n\
                                \x20   fd = os.memfd_create('floe-' + name)\n\
                                \x20   os.write(fd, b''.join(bytes([65 + i]) * 4096 for i in range(4)))\n\
                                \x20   m = mmap.mmap(fd, 4 * 4096, flags=mmap.MAP_PRIVATE)\n\
                                \x20   m[4096:8192] = b'p' * 4096\n\
                                \x20   maps[name] = (fd, m)\n\
                                os.close(maps['gone'][0])\n\
                                def where(m):\n\
                                \x20   a = ctypes.addressof(ctypes.c_char.from_buffer(m))\n\
                                \x20   for l in open('/proc/self/maps'):\n\
                                \x20       if int(l.split('-')[0], 16) == a: return l.split(None, 5)[5].strip()\n\
                                n = [0]\n\
                                def usr1(sig, frame):\n\
                                \x20   os.pwrite(maps['kept'][0], bytes([119 + n[0]]) * 4096, 2 * 4096)\n\
                                \x20   n[0] += 1\n\
                                \x20   out = ''\n\
                                \x20   for name, (fd, m) in sorted(maps.items()):\n\
                                \x20       out += '%s=%s|%s\\n' % (name, bytes(m[i * 4096] for i in range(4)).decode(), where(m))\n\
                                \x20   report('memfd.report', out)\n\
                                signal.signal(signal.SIGUSR1, usr1)\n";

/// Memfds mapped privately come back as memfds of their name, with their
/// copy-on-write pages; one whose descriptor is still open is the same
/// object as that descriptor (a write through it shows in the mapping's
/// pages that were never copied).
#[test]
fn memfds_mapped_privately_are_recreated() {
    require_root!();
    let td = TestDir::new("memfd-private");
    let mut fx = python_reporting(&td, "python-memfd", PY_MEMFD_PRIVATE);
    let report = td.join("memfd.report");
    let before = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    let want = |name: &str| format!("ApwD|/memfd:floe-{name} (deleted)");
    assert_eq!(before["kept"], want("kept"), "{before:?}");
    assert_eq!(before["gone"], "ApCD|/memfd:floe-gone (deleted)", "{before:?}");
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let after = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(after["gone"], before["gone"], "memfd mapped privately, its descriptor closed");
    assert_eq!(after["kept"], "ApxD|/memfd:floe-kept (deleted)", "memfd mapped privately, its descriptor open");
}

/// A listener of the dumped process (`port` file) that a process outside
/// the tree shares (as with socket activation) takes connections there
/// again once the dump has killed the tree: floe's filter is gone.
#[test]
fn a_listener_shared_outside_the_tree_works_after_the_dump() {
    require_root!();
    let td = TestDir::new("shared-listener");
    let body = "import socket\n\
                l = socket.socket()\n\
                l.bind(('127.0.0.1', 0))\n\
                l.listen(8)\n\
                report('port', 'port=%d\\nfd=%d\\n' % (l.getsockname()[1], l.fileno()))\n";
    let mut fx = python_reporting(&td, "python-listener", body);
    let info = read_report(&td.join("port"));
    let (port, fd) = (info["port"].parse::<u16>().unwrap(), info["fd"].parse::<i32>().unwrap());
    // The test takes its own descriptor of that listener.
    // SAFETY: plain syscalls with integer arguments; the results are checked.
    let shared = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, fx.pid, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open failed");
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        libc::close(pidfd);
        assert!(got >= 0, "pidfd_getfd failed");
        <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(got)
    };
    dump_and_reap(&mut fx, &td.join("img"), &[]);
    shared.set_nonblocking(false).unwrap();
    let client = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2));
    assert!(client.is_ok(), "the shared listener takes no connection after the dump: {client:?}");
    let (_, from) = shared.accept().unwrap();
    assert_eq!(from, client.unwrap().local_addr().unwrap(), "the shared listener accepted another connection");
}

/// A process that asked KSM to merge all its memory (PR_SET_MEMORY_MERGE)
/// still has that after a restore.
#[test]
fn ksm_merge_any_survives_restore() {
    require_root!();
    if !Path::new("/proc/self/ksm_stat").exists() {
        eprintln!("SKIPPED: this kernel has no KSM");
        return;
    }
    let td = TestDir::new("ksm");
    let body = "import ctypes\n\
                assert ctypes.CDLL(None, use_errno=True).prctl(67, 1, 0, 0, 0) == 0\n";
    let mut fx = python_reporting(&td, "python-ksm", body);
    let merge_any =
        |pid: i32| fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap().contains("ksm_merge_any: yes");
    assert!(merge_any(fx.pid), "PR_SET_MEMORY_MERGE did not take before the dump");
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert!(merge_any(fx.pid), "ksm_merge_any is gone after the restore");
}

/// After mlockall(MCL_CURRENT | MCL_FUTURE), a mapping made later is
/// locked: also after a restore. SIGUSR1 maps a fresh page and reports
/// (`mlock.report`) whether it came locked (VmFlags "lo").
#[test]
fn mlockall_future_survives_restore() {
    require_root!();
    let td = TestDir::new("mlockall");
    let body = "import ctypes, mmap\n\
                assert ctypes.CDLL(None, use_errno=True).mlockall(3) == 0\n\
                keep = []\n\
                def usr1(sig, frame):\n\
                \x20   m = mmap.mmap(-1, 4096)\n\
                \x20   keep.append(m)\n\
                \x20   a = ctypes.addressof(ctypes.c_char.from_buffer(m))\n\
                \x20   inside = False\n\
                \x20   for l in open('/proc/self/smaps'):\n\
                \x20       f = l.split()\n\
                \x20       if '-' in f[0] and not f[0].endswith(':'): inside = int(f[0].split('-')[0], 16) == a\n\
                \x20       elif inside and f[0] == 'VmFlags:': report('mlock.report', 'locked=%d\\n' % ('lo' in f))\n\
                signal.signal(signal.SIGUSR1, usr1)\n";
    let mut fx = python_reporting(&td, "python-mlockall", body);
    let report = td.join("mlock.report");
    assert_eq!(request_report(fx.pid, &report, libc::SIGUSR1, &fx.log)["locked"], "1", "before the dump");
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert_eq!(
        request_report(fx.pid, &report, libc::SIGUSR1, &fx.log)["locked"],
        "1",
        "a new mapping after the restore"
    );
}

/// Shared anonymous memory between a process and its child: dumping the
/// child alone (its parent, outside the dumped tree, shares the memory) is
/// refused naming the parent, instead of a restore in which the two no
/// longer share it; dumping the parent, with the child, works.
#[test]
fn shared_memory_with_a_process_outside_the_tree_is_refused() {
    require_root!();
    let td = TestDir::new("shared-outside");
    let body = "import mmap\n\
                m = mmap.mmap(-1, 4096)\n\
                m[0:5] = b'hello'\n\
                child = os.fork()\n\
                if child == 0:\n\
                \x20   os.setsid()\n\
                \x20   while True: time.sleep(1)\n\
                report('child', 'pid=%d\\n' % child)\n";
    let mut fx = python_reporting(&td, "python-shared", body);
    let child: i32 = read_report(&td.join("child"))["pid"].parse().unwrap();
    let _child_guard = KillPidOnDrop::new(child);
    let err = refused_dump(child, &td.join("refused"), &[], "dump of the child alone");
    assert_mentions(&err, &["shared with", &fx.pid.to_string(), "outside the dumped tree"], "shared memory refusal");
    assert!(pid_alive(child), "the refused dump killed the child");
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
}

/// A thread that changed its own credentials (raw setresgid/setresuid, as
/// servers with per-thread identities do) and timer slack keeps them across
/// a restore, while the main thread stays root. SIGUSR1 reports each thread's
/// Uid/Gid lines (`creds.report`).
#[test]
fn threads_keep_their_own_credentials() {
    require_root!();
    let td = TestDir::new("thread-creds");
    let body = "import ctypes, threading\n\
                libc = ctypes.CDLL(None, use_errno=True)\n\
                ready = threading.Event()\n\
                slack = [0]\n\
                def worker():\n\
                \x20   assert libc.syscall(119, 2000, 2000, 2000) == 0\n\
                \x20   assert libc.prctl(29, 123456, 0, 0, 0) == 0\n\
                \x20   assert libc.syscall(117, 1000, 1000, 1000) == 0\n\
                \x20   ready.set()\n\
                \x20   while True:\n\
                \x20       slack[0] = libc.prctl(30, 0, 0, 0, 0)\n\
                \x20       time.sleep(0.05)\n\
                threading.Thread(target=worker, daemon=True).start()\n\
                ready.wait()\n\
                def usr1(sig, frame):\n\
                \x20   out = ''\n\
                \x20   for t in sorted(os.listdir('/proc/self/task')):\n\
                \x20       st = open('/proc/self/task/%s/status' % t).read().splitlines()\n\
                \x20       ids = [l.split()[1] for l in st if l.startswith(('Uid:', 'Gid:'))]\n\
                \x20       out += 't%s=%s\\n' % (t, '/'.join(ids))\n\
                \x20   report('creds.report', out + 'worker_slack=%d\\n' % slack[0])\n\
                \x20   slack[0] = 0\n\
                signal.signal(signal.SIGUSR1, usr1)\n";
    let mut fx = python_reporting(&td, "python-creds", body);
    let report = td.join("creds.report");
    std::thread::sleep(Duration::from_millis(300));
    let before = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(before["worker_slack"], "123456", "{before:?}");
    assert!(before.values().any(|v| v == "1000/2000"), "no thread with its own credentials: {before:?}");
    assert_eq!(before[&format!("t{}", fx.pid)], "0/0", "main thread: {before:?}");
    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    // The worker reads its timer slack again every 50 ms (the report zeroes it).
    std::thread::sleep(Duration::from_millis(300));
    let after = request_report(fx.pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(after, before, "credentials per thread after the restore");
    assert_eq!(after["worker_slack"], "123456", "the worker's own timer slack after the restore");
}
