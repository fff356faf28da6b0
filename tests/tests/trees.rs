//! End-to-end: process trees, threads, shared open file descriptions and
//! pipes. `floe dump -t ROOT` takes the whole tree rooted at ROOT (every
//! descendant, every thread, zombies included); `floe restore` brings every
//! process and thread back with its pid/tid, parent, session and process
//! group, and the tests check from inside the restored processes (fixture
//! reports) that their state carried over. Needs root; skipped otherwise.
//!
//! Fixtures: `threads` (five threads), `tree` (parent, two children, a
//! grandchild, a zombie, a shared file description and two pipes), `pipes`
//! (buffered, full, orphaned, resized and dup'd pipes); and real Debian
//! programs: a `sh` pipeline into gzip, `make`, a threaded python3.
//!
//! Restored processes are not children of the test: [`TreeGuard`] kills
//! them by pid (checking the start time) and waits for /proc/PID to vanish,
//! panics included.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long the original processes of a dumped tree (killed by floe, then
/// reaped by PID 1, which is slow here) may take to vanish.
const ORIGINALS_GONE: Duration = Duration::from_secs(10);

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

/// Panics unless the refusal names `me` as the process holding the pipe's
/// other end ("held by N ..."). A fork child of the test (another test
/// thread spawning a process) holds the test's descriptors for a moment
/// between fork and exec, so such a child is accepted too.
fn assert_holder_is(err: &str, me: u32, what: &str) {
    let n: i32 = err
        .split("held by ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("{what}: the message does not say which process holds the pipe:\n{err}"));
    if n != me as i32 {
        let parent = proc_ids(n).map(|i| i.ppid);
        assert!(
            parent.is_none() || parent == Some(me as i32),
            "{what}: the message names {n} (parent {parent:?}), not the test ({me}):\n{err}"
        );
    }
    assert_mentions_number(err, n, what);
}

/// No manifest.img or pages.img in `dir`.
fn assert_no_image(dir: &Path, what: &str) {
    for f in ["manifest.img", "pages.img"] {
        assert!(!dir.join(f).exists(), "{what}: {} exists after a refused dump", dir.join(f).display());
    }
}

/// Dumps the tree rooted at `fx` (floe kills it), reaps the root and waits
/// until every other original process (`others`) has vanished, so their
/// pids are free for the restore.
fn dump_tree_and_wait(fx: &mut Fixture, img: &Path, others: &[i32]) {
    dump_and_reap(fx, img, &[]);
    wait_all_gone(others, ORIGINALS_GONE, "original tree after the dump");
}

/// `floe restore --restore-detached --json`: registers the root with `fx`
/// and the whole restored tree with `guard`, asserts success, and returns
/// the number of processes restore reported.
fn restore_tree(fx: &mut Fixture, guard: &mut TreeGuard, img: &Path) -> u64 {
    let out = restore_detached(img, &["--json"], Stdio::null());
    fx.adopt_restored();
    guard.add_tree(fx.pid);
    assert_ok(&out, &format!("restore of the {} tree (root {})", fx.name, fx.pid));
    let json = parse_json_stdout(&out);
    assert_eq!(json_pid(&json), fx.pid, "restore --json names another root: {json}");
    json.get("processes").and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("no processes in {json}"))
}

// ---------------------------------------------------------------------------
// threads

const THREAD_NAMES: [&str; 5] = ["fx-main", "fx-spin", "fx-reader", "fx-writer", "fx-sleeper"];

fn w(i: usize, key: &str) -> String {
    format!("w{i}.{key}")
}

/// Five threads: same TIDs and names after the restore, every thread-local
/// counter continues from where it was and keeps counting, each signal
/// handler runs on its own thread's alternate stack, the mutex-protected
/// counter stays consistent, and the thread blocked in read() on a pipe fed
/// by another thread receives a message written after the restore.
#[test]
fn threads_keep_tids_names_tls_and_blocked_read() {
    require_root!();
    let td = TestDir::new("threads");
    let img = td.join("img");
    let (ready, report) = (td.join("threads.ready"), td.join("threads.report"));
    let mut fx = Spawn::fixture("threads", td.path())
        .arg("--ready")
        .arg(&ready)
        .arg("--report")
        .arg(&report)
        .ready_file(&ready)
        .spawn();
    let pid = fx.pid;
    let log = fx.log.clone();
    let rep = || request_report(pid, &report, libc::SIGUSR1, &log);

    // One message through the pipe before the dump.
    let r0 = signal_and_await_report(pid, Some(libc::SIGHUP), &report, &log, Duration::from_secs(5), |r| {
        report_num(r, "reader_msgs") >= 1
    });
    assert_eq!((r0["reader_msgs"].as_str(), r0["reader_last"].as_str(), r0["reader_bad"].as_str()), ("1", "1", "0"));

    let tids = tids_of(pid);
    assert_eq!(tids.len(), 5, "expected 5 threads, /proc/{pid}/task has {tids:?}");
    let wtids: Vec<i32> = (0..5).map(|i| report_num(&r0, &w(i, "tid")) as i32).collect();
    assert_eq!(wtids[0], pid);
    let tid_of = |i: usize| wtids[i];
    let (reader, sleeper) = (tid_of(2), tid_of(4));
    for (i, name) in THREAD_NAMES.iter().enumerate() {
        assert_eq!(thread_comm(pid, tid_of(i)).as_deref(), Some(*name), "name of thread {}", tid_of(i));
    }
    let mut sorted = wtids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, tids, "the fixture's tids differ from /proc/{pid}/task");

    // The reader sits in read(2), the sleeper in a sleep.
    let blocked_in = |tid: i32, nrs: &[i64]| {
        wait_until(Duration::from_secs(5), || {
            thread_state(pid, tid) == Some('S') && thread_syscall(pid, tid).is_some_and(|n| nrs.contains(&n))
        })
    };
    const READ: i64 = libc::SYS_read;
    const SLEEPS: [i64; 2] = [libc::SYS_nanosleep, libc::SYS_clock_nanosleep];
    assert!(
        blocked_in(reader, &[READ]),
        "reader thread {reader} is not blocked in read: {:?}",
        thread_syscall(pid, reader)
    );
    assert!(
        blocked_in(sleeper, &SLEEPS),
        "sleeper thread {sleeper} is not sleeping: {:?}",
        thread_syscall(pid, sleeper)
    );

    let before = rep();
    for i in 0..5 {
        for k in ["answered", "altstack_ok", "tls_addr_ok"] {
            assert_eq!(before[&w(i, k)], "1", "before the dump, thread {i}: {k} in {before:#?}");
        }
    }
    assert!(blocked_in(reader, &[READ]), "reader thread left read()");

    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());

    assert_eq!(tids_of(pid), tids, "thread ids changed");
    for (i, name) in THREAD_NAMES.iter().enumerate() {
        assert_eq!(thread_comm(pid, tid_of(i)).as_deref(), Some(*name), "name of thread {} after restore", tid_of(i));
    }
    assert!(blocked_in(reader, &[READ]), "restored reader is not blocked in read: {:?}", thread_syscall(pid, reader));

    let after = rep();
    eprintln!("before: {before:#?}\nafter: {after:#?}");
    assert_eq!(report_num(&after, "pid"), pid as u64);
    assert_eq!(report_num(&after, "sigusr1_count"), report_num(&before, "sigusr1_count") + 1);
    assert_eq!(report_num(&after, "threads"), 5);
    for k in ["reader_msgs", "reader_last", "reader_bad", "hups", "writes_done"] {
        assert_eq!(after[k], before[k], "{k} changed across the dump");
    }
    assert_eq!(after["shared_sum_ok"], "1", "shared counter inconsistent: {after:#?}");
    assert!(report_num(&after, "shared") >= report_num(&before, "shared"));
    for (i, name) in THREAD_NAMES.iter().enumerate() {
        assert_eq!(after[&w(i, "tid")], before[&w(i, "tid")], "thread {i}");
        assert_eq!(after[&w(i, "name")], *name, "thread {i}");
        for k in ["answered", "altstack_ok", "tls_addr_ok"] {
            assert_eq!(after[&w(i, k)], "1", "after the restore, thread {i} ({name}): {k}");
        }
        let (b, a) = (report_num(&before, &w(i, "tls")), report_num(&after, &w(i, "tls")));
        assert!(a >= b, "thread {i} ({name}): thread-local counter went back from {b} to {a}");
    }

    // The blocked reader receives a message written after the restore.
    let r3 = signal_and_await_report(pid, Some(libc::SIGHUP), &report, &log, Duration::from_secs(5), |r| {
        report_num(r, "reader_msgs") >= 2
    });
    assert_eq!((r3["reader_msgs"].as_str(), r3["reader_last"].as_str(), r3["reader_bad"].as_str()), ("2", "2", "0"));
    assert_eq!(report_num(&r3, "writes_done"), 2);

    // Every thread-local counter keeps increasing.
    std::thread::sleep(Duration::from_millis(300));
    let r4 = rep();
    for (i, name) in THREAD_NAMES.iter().enumerate() {
        let (a, b) = (report_num(&after, &w(i, "tls")), report_num(&r4, &w(i, "tls")));
        assert!(b > a, "thread {i} ({name}): thread-local counter stuck at {a} -> {b}");
    }
    assert!(report_num(&r4, "shared") > report_num(&after, "shared"));
    assert_eq!(r4["shared_sum_ok"], "1");
    assert_eq!(tids_of(pid), tids);
    assert!(pid_alive(pid), "restored threads fixture died:\n{}", fx.log_contents());
}

// ---------------------------------------------------------------------------
// a tree of processes

/// The `tree` fixture (see fixtures/tree.c) and its pids.
struct TreeFx {
    fx: Fixture,
    guard: TreeGuard,
    dir: PathBuf,
    parent: i32,
    c1: i32,
    c2: i32,
    gc: i32,
    z: i32,
}

impl TreeFx {
    fn spawn(td: &TestDir) -> Self {
        let ready = td.join("tree.ready");
        let fx = Spawn::fixture("tree", td.path())
            .arg("--ready")
            .arg(&ready)
            .arg("--dir")
            .arg(td.path())
            .ready_file(&ready)
            .spawn();
        let info = read_report(&ready);
        let get = |k: &str| report_num(&info, k) as i32;
        let mut guard = TreeGuard::new();
        let (c1, c2, gc, z) = (get("c1"), get("c2"), get("gc"), get("z"));
        guard.add_all(&[gc, c2, c1, z]);
        Self { parent: fx.pid, fx, guard, dir: td.path().to_owned(), c1, c2, gc, z }
    }

    fn all(&self) -> [i32; 5] {
        [self.parent, self.c1, self.c2, self.gc, self.z]
    }

    fn report(&self, role: &str, pid: i32) -> Report {
        let r = request_report(pid, &self.dir.join(format!("{role}.report")), libc::SIGUSR1, &self.fx.log);
        assert_eq!(r["role"], role, "{r:?}");
        assert_eq!(report_num(&r, "pid"), pid as u64, "{r:?}");
        r
    }

    fn shared_file(&self) -> PathBuf {
        self.dir.join("shared.out")
    }
}

/// Checks shared.out: 16-byte records, record k written by the parent ("P")
/// when k is even and by c1 ("C") when odd, numbered k. Returns the count.
fn check_shared_records(path: &Path) -> usize {
    let data = fs::read(path).unwrap();
    assert_eq!(data.len() % 16, 0, "{} is not made of whole 16-byte records ({} bytes)", path.display(), data.len());
    for (k, rec) in data.chunks(16).enumerate() {
        let want = format!("{} {k:013}\n", if k % 2 == 0 { 'P' } else { 'C' });
        assert_eq!(
            String::from_utf8_lossy(rec),
            want,
            "record {k} of {} is wrong: the shared offset did not carry over or was overwritten",
            path.display()
        );
    }
    data.len() / 16
}

/// Parent, two children (one in its own process group), a grandchild and a
/// zombie: pids, ppids, pgids and sids identical after the restore; the
/// shared file description keeps one offset (strict turn-taking on it
/// continues, nothing overwritten); the pipe parent -> c1 keeps the data
/// buffered at the dump and stays connected; the pipe c2 -> parent keeps
/// carrying beats; the parent reaps the zombie after the restore and sees
/// status 7.
#[test]
fn process_tree_round_trip() {
    require_root!();
    let td = TestDir::new("tree");
    let img = td.join("img");
    let mut t = TreeFx::spawn(&td);
    let (parent, c1, c2, gc, z) = (t.parent, t.c1, t.c2, t.gc, t.z);

    // Let the beats and the turn-taking run for a moment.
    signal_and_await_report(parent, None, &td.join("parent.report"), &t.fx.log, Duration::from_secs(5), |r| {
        report_num(r, "beats") >= 3 && report_num(r, "records") >= 5
    });

    let ids: Vec<ProcIds> = t.all().iter().map(|&p| proc_ids_of(p, "before the dump")).collect();
    let comm = |p: i32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let comms: Vec<String> = [parent, c1, c2, gc].iter().map(|&p| comm(p)).collect();
    eprintln!("tree before the dump: {ids:#?}");
    let [ip, i1, i2, ig, iz] = [ids[0], ids[1], ids[2], ids[3], ids[4]];
    assert_eq!(ip.sid, parent, "the parent should lead its session");
    assert_eq!((i1.ppid, i2.ppid, iz.ppid, ig.ppid), (parent, parent, parent, c2));
    assert_eq!((i1.pgid, i2.pgid, ig.pgid, iz.pgid), (parent, c2, c2, parent));
    assert!(ids.iter().all(|i| i.sid == parent), "all in the parent's session: {ids:#?}");
    assert_eq!(iz.state, 'Z', "z should be a zombie");
    let mut kids = children_of(parent);
    kids.sort_unstable();
    let mut want_kids = vec![c1, c2, z];
    want_kids.sort_unstable();
    assert_eq!(kids, want_kids);
    assert_eq!(children_of(c2), vec![gc]);

    let rp = t.report("parent", parent);
    let r1 = t.report("c1", c1);
    let r2 = t.report("c2", c2);
    let rg = t.report("gc", gc);
    assert_eq!(rp["zombie_reaped"], "0");
    assert_eq!(r1["pipe_read"], "0", "c1 must not have read the pipe yet");
    let fd = |r: &Report, k: &str| report_num(r, k) as i32;
    let shared_fd = fd(&rp, "shared_fd");
    assert_eq!(fd(&r1, "shared_fd"), shared_fd);
    assert!(same_file_description(parent, shared_fd, c1, shared_fd).unwrap(), "fork should share the description");

    dump_tree_and_wait(&mut t.fx, &img, &[c1, c2, gc, z]);
    let records_at_dump = check_shared_records(&t.shared_file());
    let file_at_dump = fs::read(t.shared_file()).unwrap();
    assert!(records_at_dump >= 5);

    let n = restore_tree(&mut t.fx, &mut t.guard, &img);
    assert_eq!(n, 5, "restore should report 5 processes");

    // Same pids, parents, groups and sessions. The root's parent is not
    // restored (it was the test; now it is whoever adopted floe's child).
    for before in &ids {
        let after = proc_ids_of(before.pid, "after the restore");
        let what = format!("process {} after the restore", before.pid);
        assert_eq!(after.pgid, before.pgid, "{what}: pgid");
        assert_eq!(after.sid, before.sid, "{what}: sid");
        if before.pid != parent {
            assert_eq!(after.ppid, before.ppid, "{what}: ppid");
        }
        assert_eq!(after.state == 'Z', before.state == 'Z', "{what}: state {} (was {})", after.state, before.state);
    }
    for (&p, c) in [parent, c1, c2, gc].iter().zip(&comms) {
        assert_eq!(&comm(p), c, "comm of {p}");
        assert_eq!(tids_of(p), vec![p], "{p} should have one thread");
    }
    let mut kids = children_of(parent);
    kids.sort_unstable();
    assert_eq!(kids, want_kids, "children of the restored parent");
    assert_eq!(children_of(c2), vec![gc], "children of the restored c2");

    // Descriptors: one shared file description; pipes connect the same pairs;
    // everyone's stdout is the same description (the log file).
    assert!(
        same_file_description(parent, shared_fd, c1, shared_fd).unwrap(),
        "shared.out is no longer one description"
    );
    for p in [c1, c2, gc] {
        assert!(same_file_description(parent, 1, p, 1).unwrap(), "stdout of {p} is not the parent's description");
    }
    let target = |p: i32, f: i32| fd_target(p, f).unwrap_or_else(|| panic!("no fd {f} in {p}"));
    let to_c1 = target(parent, fd(&rp, "pipe_w_fd"));
    assert!(to_c1.starts_with("pipe:"), "{to_c1}");
    assert_eq!(target(c1, fd(&r1, "pipe_r_fd")), to_c1, "the pipe parent -> c1 connects other ends");
    let from_c2 = target(parent, fd(&rp, "beat_r_fd"));
    assert!(from_c2.starts_with("pipe:") && from_c2 != to_c1, "{from_c2}");
    assert_eq!(target(c2, fd(&r2, "beat_w_fd")), from_c2, "the pipe c2 -> parent connects other ends");

    // Reports from inside: the sigusr1 counts continue; beats keep coming.
    let rp2 = t.report("parent", parent);
    let r12 = t.report("c1", c1);
    let r22 = t.report("c2", c2);
    let rg2 = t.report("gc", gc);
    for (b, a) in [(&rp, &rp2), (&r1, &r12), (&r2, &r22), (&rg, &rg2)] {
        assert_eq!(report_num(a, "sigusr1_count"), report_num(b, "sigusr1_count") + 1, "{a:?}");
        for k in ["ppid", "pgid", "sid"] {
            if !(a["role"] == "parent" && k == "ppid") {
                assert_eq!(a[k], b[k], "{k} as seen by {}", a["role"]);
            }
        }
    }
    assert_eq!(rp2["zombie_reaped"], "0");
    assert_eq!(r12["pipe_read"], "0");
    let rp3 =
        signal_and_await_report(parent, None, &td.join("parent.report"), &t.fx.log, Duration::from_secs(5), |r| {
            report_num(r, "beats") >= report_num(&rp2, "beats") + 3
        });
    assert_eq!(rp3["beats_ok"], "1", "beats were lost or repeated: {rp3:?}");

    // The parent reaps the zombie (status 7) and sends "end" into the pipe.
    let rp4 = signal_and_await_report(
        parent,
        Some(libc::SIGHUP),
        &td.join("parent.report"),
        &t.fx.log,
        Duration::from_secs(5),
        |r| r["zombie_reaped"] == "1" && r["end_sent"] == "1",
    );
    assert_eq!(report_num(&rp4, "zombie_rc"), z as u64, "waitpid(z) returned something else: {rp4:?}");
    assert_eq!(report_num(&rp4, "zombie_status"), 7, "the zombie's exit status was not kept: {rp4:?}");
    assert!(wait_pid_gone(z, GONE_TIMEOUT), "the reaped zombie {z} is still in /proc");

    // c1 now reads the pipe: the data buffered at the dump, in order, then "end".
    let r13 = signal_and_await_report(
        c1,
        Some(libc::SIGHUP),
        &td.join("c1.report"),
        &t.fx.log,
        Duration::from_secs(5),
        |r| r["pipe_read"] == "1",
    );
    assert_eq!(report_num(&r13, "pipe_lines"), 600, "{r13:?}");
    assert_eq!(report_num(&r13, "pipe_bytes"), 600 * 64 + 4, "{r13:?}");
    assert_eq!(r13["pipe_end"], "1", "{r13:?}");
    assert_eq!(r13["pipe_ok"], "1", "the buffered pipe data changed: {r13:?}");

    // The shared offset: turn-taking continued, nothing was overwritten.
    assert!(
        wait_until(Duration::from_secs(10), || fs::metadata(t.shared_file()).map(|m| m.len()).unwrap_or(0)
            >= (records_at_dump as u64 + 20) * 16),
        "the parent and c1 stopped taking turns on the shared file ({} bytes, {records_at_dump} records at the dump)\nlog:\n{}",
        fs::metadata(t.shared_file()).map(|m| m.len()).unwrap_or(0),
        t.fx.log_contents()
    );
    let records = check_shared_records(&t.shared_file());
    assert!(records >= records_at_dump + 20);
    assert!(fs::read(t.shared_file()).unwrap().starts_with(&file_at_dump), "records written before the dump changed");

    for p in [parent, c1, c2, gc] {
        assert!(pid_alive(p), "{p} died:\n{}", t.fx.log_contents());
    }
    t.guard.kill_all();
    t.fx.kill_all();
    wait_all_gone(&t.all(), GONE_TIMEOUT, "the restored tree after cleanup");
}

/// A zombie comes back under its own name (/proc/PID/comm, shown by ps).
#[test]
fn restored_zombie_keeps_its_name() {
    require_root!();
    let td = TestDir::new("zombie-comm");
    let img = td.join("img");
    let mut t = TreeFx::spawn(&td);
    let z = t.z;
    let comm = |p: i32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let before = comm(z);
    assert_eq!(before.trim(), "tree");
    assert_eq!(proc_state(z), Some('Z'));
    dump_tree_and_wait(&mut t.fx, &img, &[t.c1, t.c2, t.gc, z]);
    restore_tree(&mut t.fx, &mut t.guard, &img);
    assert_eq!(proc_state(z), Some('Z'), "z is not a zombie after the restore");
    assert_eq!(comm(z), before, "comm of the restored zombie {z}");
}

// ---------------------------------------------------------------------------
// pipes

/// The `pipes` fixture (see fixtures/pipes.c).
struct PipesFx {
    fx: Fixture,
    guard: TreeGuard,
    report_path: PathBuf,
    child: i32,
}

impl PipesFx {
    fn spawn(td: &TestDir, stdout: Option<Stdio>) -> Self {
        let (ready, report_path) = (td.join("pipes.ready"), td.join("pipes.report"));
        let mut s = Spawn::fixture("pipes", td.path())
            .arg("--ready")
            .arg(&ready)
            .arg("--report")
            .arg(&report_path)
            .ready_file(&ready);
        if let Some(out) = stdout {
            s = s.stdout(out);
        }
        let fx = s.spawn();
        let child = report_num(&read_report(&ready), "child") as i32;
        let mut guard = TreeGuard::new();
        guard.add(child);
        Self { fx, guard, report_path, child }
    }

    fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }

    /// SIGHUP: the fixture drains and checks every pipe; returns the report
    /// that has the results.
    fn check_all(&self) -> Report {
        let r = signal_and_await_report(
            self.fx.pid,
            Some(libc::SIGHUP),
            &self.report_path,
            &self.fx.log,
            Duration::from_secs(10),
            |r| r["checked"] == "1",
        );
        for k in ["self_ok", "big_ok", "full_ok", "orphan_ok", "empty_ok"] {
            assert_eq!(r[k], "1", "{k}: {r:#?}\nlog:\n{}", self.fx.log_contents());
        }
        assert_eq!(r["child_status"], "0", "the blocked writer did not complete its write: {r:#?}");
        r
    }
}

/// Pipes with unread data survive: both ends in one process (non-blocking,
/// dup'd), a 1 MiB pipe holding 300 KiB, a full pipe whose writer (the
/// child) is blocked in write(), a pipe whose writer has gone (data, then
/// EOF), and an empty one. Sizes, flags and buffered byte counts are equal
/// after the restore, and every byte reads back in order.
#[test]
fn pipes_keep_buffered_data() {
    require_root!();
    let td = TestDir::new("pipes");
    let img = td.join("img");
    let mut p = PipesFx::spawn(&td, None);
    let (pid, child) = (p.fx.pid, p.child);
    assert!(
        wait_until(Duration::from_secs(5), || proc_state(child) == Some('S')
            && thread_syscall(child, child) == Some(libc::SYS_write)),
        "the child should be blocked in write() on the full pipe ({:?})",
        thread_syscall(child, child)
    );
    let before = p.report();
    eprintln!("before: {before:#?}");
    for (k, v) in [
        ("self_pending", 1000),
        ("big_pending", 300 * 1024),
        ("full_pending", 65536),
        ("orphan_pending", 20),
        ("empty_pending", 0),
        ("big_size", 1 << 20),
        ("self_nonblock", 1),
        ("dup_same", 1),
        ("checked", 0),
    ] {
        assert_eq!(report_num(&before, k), v, "{k} before the dump");
    }

    dump_tree_and_wait(&mut p.fx, &img, &[child]);
    let n = restore_tree(&mut p.fx, &mut p.guard, &img);
    assert_eq!(n, 2);
    assert_eq!(proc_ids(child).map(|i| i.ppid), Some(pid), "the writer is not the parent's child any more");
    assert!(
        wait_until(Duration::from_secs(5), || thread_syscall(child, child) == Some(libc::SYS_write)),
        "the restored child is not blocked in write() ({:?})",
        thread_syscall(child, child)
    );

    let after = p.report();
    assert_eq!(report_num(&after, "sigusr1_count"), 2);
    assert_reports_equal(&before, &after, &[], "pipes before the dump vs after the restore");

    p.check_all();
    assert!(wait_pid_gone(child, GONE_TIMEOUT), "the writer was reaped but is still in /proc");
    assert!(pid_alive(pid), "pipes died:\n{}", p.fx.log_contents());
}

/// A pipe end held by a process outside the tree is refused, naming "pipe"
/// and the holder (the test), and the tree keeps running with its pipes
/// untouched. Also for a lone `sleep` whose stdin the test writes to.
#[test]
fn pipe_held_outside_the_tree_is_refused() {
    require_root!();
    let td = TestDir::new("pipe-outside");
    let me = std::process::id();

    // stdout of the pipes tree (parent and child) is a pipe read by the test.
    let mut p = PipesFx::spawn(&td, Some(Stdio::piped()));
    let (pid, child) = (p.fx.pid, p.child);
    let before = p.report();
    let img = td.join("img");
    let out = dump(pid, &img, &[]);
    let err = assert_failed_cleanly(&out, "dump of a tree whose stdout pipe the test reads");
    assert_mentions(&err, &["pipe"], "outside pipe refusal");
    assert_holder_is(&err, me, "outside pipe refusal names the holder");
    assert_no_image(&img, "outside pipe refusal");
    assert!(p.fx.child_running(), "the refused dump killed the parent");
    for q in [pid, child] {
        assert_running_untouched(q, "after the refused dump");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(p.fx.child_running(), "the parent died after the refused dump");
    assert_running_untouched(child, "200 ms after the refused dump");
    let after = p.report();
    assert_reports_equal(&before, &after, &[], "pipes after the refused dump");
    p.check_all();
    assert!(p.fx.child().unwrap().stdout.is_some(), "the pipe's read end is still ours");

    // A write end held by the test: sleep's stdin.
    let mut fx = Spawn::program("sleep-stdin", "sleep", td.path()).arg("1000").stdin(Stdio::piped()).spawn();
    let spid = fx.pid;
    assert!(wait_until(Duration::from_secs(5), || proc_state(spid) == Some('S')));
    let img2 = td.join("img-sleep");
    let err = assert_failed_cleanly(&dump(spid, &img2, &[]), "dump of sleep whose stdin the test writes");
    assert_mentions(&err, &["pipe"], "outside pipe refusal (stdin)");
    assert_holder_is(&err, me, "outside pipe refusal (stdin) names the holder");
    assert_no_image(&img2, "outside pipe refusal (stdin)");
    assert!(fx.child_running(), "the refused dump killed sleep");
    assert_running_untouched(spid, "sleep after the refused dump");
    assert!(fx.child().unwrap().stdin.is_some(), "the pipe's write end is still ours");
}

// ---------------------------------------------------------------------------
// real Debian programs

/// `sh -c 'seq 1 3000000 | gzip -1 > OUT.gz; echo done > DONE'` dumped while
/// gzip is writing: after the restore the pipeline finishes and OUT.gz
/// unpacks to exactly what `seq 1 3000000` prints.
#[test]
fn real_shell_pipeline_seq_gzip() {
    require_root!();
    let td = TestDir::new("pipeline");
    let img = td.join("img");
    let (out_gz, done) = (td.join("OUT.gz"), td.join("DONE"));
    let mut guard = TreeGuard::new();
    let mut fx = Spawn::program("pipeline", "sh", td.path())
        .arg("-c")
        .arg("seq 1 3000000 | gzip -1 > OUT.gz; echo done > DONE")
        .spawn();
    let pid = fx.pid;
    let size = || fs::metadata(&out_gz).map(|m| m.len()).unwrap_or(0);
    assert!(wait_until(Duration::from_secs(10), || size() > 0), "OUT.gz stays empty:\n{}", fx.log_contents());
    let kids = children_of(pid);
    guard.add_all(&kids);
    assert!(
        !done.exists() && kids.len() == 2,
        "the pipeline finished (or was not running: children {kids:?}) before it could be dumped"
    );

    dump_tree_and_wait(&mut fx, &img, &kids);
    let at_dump = size();
    assert!(!done.exists(), "DONE exists after the dump killed the pipeline");
    let n = restore_tree(&mut fx, &mut guard, &img);
    assert_eq!(n, 3, "sh, seq and gzip");
    assert!(
        wait_for_file(&done, Duration::from_secs(30)),
        "the restored pipeline did not finish (OUT.gz {} bytes, sh state {:?})\nlog:\n{}",
        size(),
        proc_state(pid),
        fx.log_contents()
    );
    assert!(wait_pid_gone(pid, Duration::from_secs(10)), "sh is still there after writing DONE");
    assert_eq!(fs::read_to_string(&done).unwrap(), "done\n");
    assert!(fx.log_contents().is_empty(), "the pipeline complained:\n{}", fx.log_contents());

    let unpacked = Command::new("gunzip").arg("-c").arg(&out_gz).stdin(Stdio::null()).output().unwrap();
    assert!(unpacked.status.success(), "gunzip failed: {}", String::from_utf8_lossy(&unpacked.stderr));
    let expected = Command::new("seq").args(["1", "3000000"]).stdin(Stdio::null()).output().unwrap();
    eprintln!("OUT.gz was {at_dump} bytes at the dump, {} at the end", size());
    assert!(
        unpacked.stdout == expected.stdout,
        "gunzip -c OUT.gz differs from seq 1 3000000 ({} vs {} bytes)",
        unpacked.stdout.len(),
        expected.stdout.len()
    );
}

/// `make -j1` dumped between (or during) its recipe steps: after the restore
/// it finishes, and the log holds every step exactly once, in order.
#[test]
fn real_make_finishes_every_step_once() {
    require_root!();
    let td = TestDir::new("make");
    let img = td.join("img");
    let log = td.join("log");
    let mut mk = String::from("all: step6\n");
    for i in 1..=6 {
        let dep = if i > 1 { format!(" step{}", i - 1) } else { String::new() };
        mk.push_str(&format!("step{i}:{dep}\n\tsleep 0.3 && echo step {i} >> log\n"));
    }
    mk.push_str(".PHONY: all step1 step2 step3 step4 step5 step6\n");
    fs::write(td.join("Makefile"), mk).unwrap();
    let lines = || fs::read_to_string(&log).unwrap_or_default();

    let mut guard = TreeGuard::new();
    let mut fx = Spawn::program("make", "make", td.path()).args(["-j1", "-f", "Makefile"]).spawn();
    let pid = fx.pid;
    assert!(
        wait_until(Duration::from_secs(10), || lines().lines().count() >= 2),
        "make does not progress:\n{}",
        fx.log_contents()
    );
    // Into the next recipe: make -> sh -> sleep.
    let mut tree = Vec::new();
    let comm = |p: i32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), || {
            tree = descendants_of(pid);
            tree.len() == 2 && comm(tree[1]).trim() == "sleep"
        }),
        "make is not running a recipe: descendants {tree:?}"
    );
    guard.add_all(&tree);
    assert!(fx.child_running() && lines().lines().count() < 6, "make finished before it could be dumped");

    dump_tree_and_wait(&mut fx, &img, &tree);
    let at_dump = lines();
    let n = restore_tree(&mut fx, &mut guard, &img);
    assert_eq!(n as usize, 1 + tree.len(), "restored processes (make and {tree:?})");
    assert!(
        wait_pid_gone(pid, Duration::from_secs(15)),
        "restored make did not finish (state {:?}); log:\n{}\nmake output:\n{}",
        proc_state(pid),
        lines(),
        fx.log_contents()
    );
    let want: String = (1..=6).map(|i| format!("step {i}\n")).collect();
    eprintln!("log at the dump:\n{at_dump}");
    assert_eq!(lines(), want, "every step exactly once, in order\nmake output:\n{}", fx.log_contents());
    let out = fx.log_contents();
    assert!(!out.contains("Error") && !out.contains("***"), "make reported an error:\n{out}");
}

/// A python3 program with three threads, each appending "t<i> <n>" to its
/// own file every 20 ms: every file continues without a gap or a repeat.
#[test]
fn real_python_threads_continue() {
    require_root!();
    let td = TestDir::new("python-threads");
    let img = td.join("img");
    let script = "import os, sys, threading, time\n\
                  d = sys.argv[1]\n\
                  def work(i):\n\
                  \x20   f = open(os.path.join(d, 't%d.txt' % i), 'a', buffering=1)\n\
                  \x20   n = 0\n\
                  \x20   while True:\n\
                  \x20       f.write('t%d %d\\n' % (i, n))\n\
                  \x20       n += 1\n\
                  \x20       time.sleep(0.02)\n\
                  ts = [threading.Thread(target=work, args=(i,), name='w%d' % i) for i in range(3)]\n\
                  for t in ts:\n\
                  \x20   t.start()\n\
                  for t in ts:\n\
                  \x20   t.join()\n";
    let mut fx = Spawn::program("python-threads", python3(), td.path()).arg("-c").arg(script).arg(td.path()).spawn();
    let pid = fx.pid;
    let file = |i: usize| td.join(format!("t{i}.txt"));
    let nums = |i: usize| numbered_lines(&file(i), &format!("t{i} "));
    assert!(
        wait_until(Duration::from_secs(10), || (0..3).all(|i| nums(i).len() >= 5)),
        "python threads are not writing:\n{}",
        fx.log_contents()
    );
    let tids = tids_of(pid);
    assert_eq!(tids.len(), 4, "main thread + 3 workers: {tids:?}");

    dump_and_reap(&mut fx, &img, &[]);
    let at_dump: Vec<usize> = (0..3).map(|i| nums(i).len()).collect();
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert_eq!(tids_of(pid), tids, "thread ids changed");
    assert!(
        wait_until(Duration::from_secs(10), || (0..3).all(|i| nums(i).len() >= at_dump[i] + 20)),
        "restored python threads stopped writing (at dump {at_dump:?}, now {:?}; state {:?}):\n{}",
        (0..3).map(|i| nums(i).len()).collect::<Vec<_>>(),
        proc_state(pid),
        fx.log_contents()
    );
    for (i, at) in at_dump.iter().enumerate() {
        let all = nums(i);
        let expected: Vec<u64> = (0..all.len() as u64).collect();
        assert_eq!(all, expected, "t{i}.txt must continue without gaps or repeats (at the dump: {at} lines)");
        let text = fs::read_to_string(file(i)).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == all.len(), "t{i}.txt has a torn or foreign line");
    }
    assert!(fx.log_contents().is_empty(), "python complained:\n{}", fx.log_contents());
}
