//! End-to-end: `floe dump` must refuse processes (or fail part-way) with a
//! message naming the resource in the way, and leave the process running
//! exactly as before: not killed, not stopped, not traced, still answering
//! SIGUSR1 with the same state. `floe restore` must refuse a pid held by an
//! unrelated process and a directory that holds no image, creating nothing.
//! Needs root; skipped otherwise.
//!
//! The resource holders are the fixtures `uring`, `devholder`,
//! `sockholder`, `seccomped` and `withchild` (main loop in
//! `fixtures/hold.h`), plus `pidholder` to occupy a given pid.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A fixture built on `fixtures/hold.h`.
struct Holder {
    fx: Fixture,
    ready: PathBuf,
    report_path: PathBuf,
}

impl Holder {
    fn spawn(name: &str, td: &TestDir, extra: &[&str]) -> Self {
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

    /// The key=value lines of the ready file.
    fn ready_info(&self) -> Report {
        read_report(&self.ready)
    }

    fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }

    /// After a refused dump: the process is still our running child, not
    /// stopped or traced, keeps looping, and reports the same state as
    /// `before` (which was report number `reports_so_far`).
    fn assert_unharmed(&mut self, before: &Report, reports_so_far: u64, what: &str) {
        let pid = self.fx.pid;
        assert!(
            self.fx.child_running(),
            "{what}: the refused dump killed {} (pid {pid})\nlog:\n{}",
            self.fx.name,
            self.fx.log_contents()
        );
        assert_running_untouched(pid, what);
        std::thread::sleep(Duration::from_millis(200));
        assert!(self.fx.child_running(), "{what}: {} died after the refused dump", self.fx.name);
        assert_running_untouched(pid, &format!("{what} (200 ms later)"));
        let after = self.report();
        assert_eq!(report_num(&after, "pid"), pid as u64, "{what}");
        assert_eq!(
            report_num(&after, "sigusr1_count"),
            reports_so_far + 1,
            "{what}: every SIGUSR1 must be seen exactly once"
        );
        assert!(
            report_num(&after, "loops") > report_num(before, "loops"),
            "{what}: the main loop did not advance: {before:?} -> {after:?}"
        );
        assert_reports_equal(before, &after, &["loops"], what);
    }
}

/// Runs `floe dump -t PID -D DIR` (no `--leave-running`: a refusal must not
/// kill anyway) and asserts it failed cleanly without leaving an image.
/// Returns the lower-cased message.
fn refused_dump(pid: i32, dir: &Path, what: &str) -> String {
    let out = dump(pid, dir, &[]);
    let err = assert_failed_cleanly(&out, what);
    assert_no_image(dir, what);
    err
}

/// No manifest.img or pages.img in `dir` (nothing that looks like an image).
fn assert_no_image(dir: &Path, what: &str) {
    for f in ["manifest.img", "pages.img"] {
        assert!(!dir.join(f).exists(), "{what}: {} exists after a failed dump", dir.join(f).display());
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

/// Target of /proc/PID/fd/FD, e.g. "socket:[1234]".
fn fd_link(pid: i32, fd: u64) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/fd/{fd}: {e}"))
        .to_string_lossy()
        .into_owned()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// ptrace from the test (the test thread is the tracer)

fn ptrace_req(req: libc::c_uint, pid: i32, data: usize) -> io::Result<()> {
    // SAFETY: SEIZE/INTERRUPT/DETACH take no pointers: addr is 0 and data an
    // integer (options or a signal number), so no memory is touched.
    let rc = unsafe { libc::ptrace(req, pid, 0usize, data) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stops the tracee with PTRACE_INTERRUPT, waits for the stop and detaches
/// (passing on the signal if the stop was a signal-delivery stop).
fn interrupt_and_detach(pid: i32) {
    ptrace_req(libc::PTRACE_INTERRUPT, pid, 0).unwrap();
    let mut status = 0;
    // SAFETY: status is a valid, writable c_int.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    assert_eq!(rc, pid, "waitpid: {}", io::Error::last_os_error());
    assert!(libc::WIFSTOPPED(status), "tracee did not stop: status {status:#x}");
    let event = (status >> 16) & 0xff;
    let sig = if event == 0 {
        // A signal-delivery stop: hand the signal back on detach.
        libc::WSTOPSIG(status) as usize
    } else {
        0
    };
    ptrace_req(libc::PTRACE_DETACH, pid, sig).unwrap();
}

/// A tracer (the test) holds the process: the dump is refused, naming the
/// tracer; after the test detaches the process carries on as before.
#[test]
fn dump_refuses_traced_process() {
    require_root!();
    let td = TestDir::new("traced");
    let mut s = Sleeper::spawn(td.path(), 50);
    let pid = s.fx.pid;
    s.wait_ticks(2, Duration::from_secs(5));
    let r1 = s.report();

    ptrace_req(libc::PTRACE_SEIZE, pid, 0).unwrap();
    let tracer = status_field(pid, "TracerPid").unwrap();
    assert_ne!(tracer, "0", "PTRACE_SEIZE did not make us the tracer");
    // The test thread is now the tracer: no signals to the tracee and no
    // waitpid on it (a ptrace stop would be reported to us) until detached.

    let err = refused_dump(pid, &td.join("img"), "dump of a traced process");
    assert_mentions(&err, &["traced"], "traced refusal");
    assert_mentions_number(&err, &tracer, "traced refusal names the tracer");
    assert_eq!(status_field(pid, "TracerPid").as_deref(), Some(tracer.as_str()), "floe changed who traces the process");
    // Still running while traced (SEIZE does not stop it).
    let n = s.ticks().len();
    s.wait_ticks(n + 2, Duration::from_secs(5));

    interrupt_and_detach(pid);
    assert!(s.fx.child_running(), "the process died");
    assert_running_untouched(pid, "after the tracer detached");
    let n = s.ticks().len();
    let ticks = s.wait_ticks(n + 2, Duration::from_secs(5));
    let nums: Vec<u64> = ticks.iter().map(|t| t.0).collect();
    assert_eq!(nums, (0..nums.len() as u64).collect::<Vec<_>>(), "ticks must be consecutive");
    let r2 = s.report();
    assert_eq!(report_num(&r2, "sigusr1_count"), 2);
    assert!(report_num(&r2, "next_tick") > report_num(&r1, "next_tick"));
}

/// An io_uring instance cannot be checkpointed.
#[test]
fn dump_refuses_io_uring() {
    require_root!();
    let td = TestDir::new("uring");
    let mut h = Holder::spawn("uring", &td, &[]);
    let info = h.ready_info();
    if info.get("io_uring").map(String::as_str) != Some("ok") {
        eprintln!(
            "SKIPPED dump_refuses_io_uring: the kernel refuses io_uring_setup here ({})",
            info.get("errno").map(String::as_str).unwrap_or("?")
        );
        return;
    }
    let fd = report_num(&info, "uring_fd");
    let link = fd_link(h.pid(), fd);
    assert!(link.contains("io_uring"), "fd {fd} is {link}");
    let r1 = h.report();
    assert_eq!(r1["uring_enter"], "0", "{r1:?}");
    assert_eq!(r1["uring_fd_open"], "1");

    let err = refused_dump(h.pid(), &td.join("img"), "dump of an io_uring holder");
    assert_mentions(&err, &["io_uring"], "io_uring refusal");
    assert_mentions(&err, &[&format!("fd {fd}")], "io_uring refusal names the fd");
    h.assert_unharmed(&r1, 1, "after the refused io_uring dump");
}

/// A character device floe does not know how to reopen (/dev/kmsg).
#[test]
fn dump_refuses_unsupported_device() {
    require_root!();
    let td = TestDir::new("device");
    let mut h = Holder::spawn("devholder", &td, &[]);
    let info = h.ready_info();
    let device = info["device"].clone();
    let fd = report_num(&info, "dev_fd");
    let r1 = h.report();
    assert_ne!(r1["dev_rdev"], "-1:-1", "{r1:?}");

    let err = refused_dump(h.pid(), &td.join("img"), "dump of a /dev/kmsg holder");
    assert_mentions(&err, &["device"], "device refusal");
    assert_mentions(&err, &[&device], "device refusal names the device");
    assert_mentions(&err, &[&format!("fd {fd}")], "device refusal names the fd");
    h.assert_unharmed(&r1, 1, "after the refused device dump");
}

fn socket_refusal(kind: &str) {
    let td = TestDir::new(&format!("sock-{kind}"));
    let mut h = Holder::spawn("sockholder", &td, &["--kind", kind]);
    let fd = report_num(&h.ready_info(), "sock_fd");
    let link = fd_link(h.pid(), fd);
    assert!(link.starts_with("socket:"), "fd {fd} is {link}");
    let r1 = h.report();
    assert_eq!(r1["roundtrip"], "1", "{r1:?}");

    let what = format!("dump of a {kind} socket holder");
    let err = refused_dump(h.pid(), &td.join("img"), &what);
    assert_mentions(&err, &["socket"], &what);
    assert_mentions(&err, &[&link], &format!("{what}: names the socket"));
    h.assert_unharmed(&r1, 1, &format!("after the refused {what}"));
}

/// Unix socketpairs, UDP and netlink sockets are supported now
/// (tests/fd_socket.rs, engine_state.rs); a packet socket is still refused.
#[test]
fn dump_refuses_packet_socket() {
    require_root!();
    socket_refusal("packet");
}

/// A seccomp filter is saved and installed again: the restored process
/// runs under the same filter and keeps working.
#[test]
fn seccomp_filter_survives_restore() {
    require_root!();
    let td = TestDir::new("seccomp");
    let mut h = Holder::spawn("seccomped", &td, &[]);
    let pid = h.pid();
    let r1 = h.report();
    assert_eq!(r1["seccomp"], "2", "the filter is not installed: {r1:?}");
    assert_eq!(status_field(pid, "Seccomp").as_deref(), Some("2"));
    let filters = status_field(pid, "Seccomp_filters");

    let img = td.join("img");
    dump_and_reap(&mut h.fx, &img, &[]);
    restore_and_adopt(&mut h.fx, &img, &[], Stdio::null());
    assert_eq!(status_field(pid, "Seccomp").as_deref(), Some("2"), "the restored process lost its filter");
    assert_eq!(status_field(pid, "Seccomp_filters"), filters, "filter count changed");
    let r2 = h.report();
    assert_eq!(report_num(&r2, "pid"), pid as u64);
    assert_eq!(r2["seccomp"], "2");
    assert_eq!(report_num(&r2, "sigusr1_count"), 2, "{r2:?}");
    h.fx.kill_all();
}

/// A parent with a child (refused before trees were supported) round-trips:
/// both come back with their pids, the child still the parent's child.
#[test]
fn process_with_child_round_trip() {
    require_root!();
    let td = TestDir::new("child");
    let img = td.join("img");
    let mut h = Holder::spawn("withchild", &td, &[]);
    let pid = h.pid();
    let child = report_num(&h.ready_info(), "child_pid") as i32;
    // Declared after the fixture, so dropped (killed) first.
    let _original_child = KillPidOnDrop::new(child);
    let r1 = h.report();
    assert_eq!(r1["child_alive"], "1", "{r1:?}");

    dump_and_reap(&mut h.fx, &img, &[]);
    assert!(wait_pid_gone(child, Duration::from_secs(10)), "the dumped child {child} is still in /proc");
    restore_and_adopt(&mut h.fx, &img, &[], Stdio::null());
    let mut restored_child = KillPidOnDrop::new(child);
    assert!(pid_alive(child), "the child {child} was not restored");
    assert_eq!(proc_ids(child).map(|i| i.ppid), Some(pid), "the restored child has another parent");
    assert_eq!(session_id(child), session_id(pid));
    assert_running_untouched(pid, "restored parent");
    assert_running_untouched(child, "restored child");

    let r2 = h.report();
    assert_eq!(report_num(&r2, "sigusr1_count"), 2);
    assert_eq!(report_num(&r2, "child_pid"), child as u64);
    assert_eq!(r2["child_alive"], "1", "the parent does not see its child: {r2:?}");
    assert!(report_num(&r2, "loops") > report_num(&r1, "loops"), "{r1:?} -> {r2:?}");

    restored_child.kill();
    h.fx.kill_all();
    assert!(!pid_exists(h.pid()));
}

/// Not a session leader: refused unless --shell-job, which then works.
#[test]
fn dump_refuses_non_session_leader_without_shell_job() {
    require_root!();
    let td = TestDir::new("session");
    let mut fx = spawn_in_own_process_group("sleep-pgrp", "sleep", &["1000"], td.path());
    let pid = fx.pid;
    assert!(
        wait_until(Duration::from_secs(5), || {
            proc_state(pid) == Some('S') && exe_of(pid).is_some_and(|e| e.ends_with("sleep"))
        }),
        "sleep did not start (state {:?}, exe {:?})",
        proc_state(pid),
        exe_of(pid)
    );
    let sid = session_id(pid).unwrap();
    assert_ne!(sid, pid, "sleep must not be a session leader");
    let start = start_time(pid);

    let err = refused_dump(pid, &td.join("img"), "dump of a non-session-leader");
    assert_mentions(&err, &["session"], "session refusal");
    assert_mentions(&err, &["--shell-job"], "session refusal suggests --shell-job");
    assert_mentions_number(&err, sid, "session refusal names the session");
    assert!(fx.child_running(), "the refused dump killed sleep");
    assert_running_untouched(pid, "after the refused session dump");
    assert_eq!(start_time(pid), start);

    let img = td.join("img-shell-job");
    let out = dump(pid, &img, &["--shell-job", "--leave-running"]);
    assert_ok(&out, "dump --shell-job --leave-running of a non-session-leader");
    assert_image_files(&img);
    assert!(fx.child_running(), "--leave-running killed sleep");
    assert_running_untouched(pid, "after dump --shell-job --leave-running");
    assert_eq!(start_time(pid), start);
    assert_eq!(session_id(pid), Some(sid));
}

// ---------------------------------------------------------------------------
// failure in the middle of a dump

/// A tmpfs mounted for the duration of a test; unmounted (lazily) on drop,
/// panics included.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size: &str) -> io::Result<Self> {
        fs::create_dir_all(path)?;
        let src = CString::new(format!("floe-test-{}", std::process::id())).unwrap();
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let opts = CString::new(format!("size={size}")).unwrap();
        // SAFETY: all pointers are valid NUL-terminated strings that outlive
        // the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        eprintln!("mounted a {size} tmpfs on {}", path.display());
        Ok(Self { path: path.to_owned() })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: target is a valid NUL-terminated string.
        let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if rc < 0 {
            eprintln!("warning: cannot unmount {}: {}", self.path.display(), io::Error::last_os_error());
        }
    }
}

/// The pages file fills a 2 MiB tmpfs part-way through: the dump fails
/// naming the file and the cause, leaves no image, and the process (dumped
/// without --leave-running) carries on with its memory intact.
#[test]
fn dump_failing_midway_leaves_process_untouched() {
    require_root!();
    let td = TestDir::new("enospc");
    let img = td.join("img");
    let mnt = match TmpfsMount::mount(&img, "2m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED dump_failing_midway_leaves_process_untouched: cannot mount tmpfs: {e}");
            return;
        }
    };
    let mut m = Memstate::spawn(td.path());
    let pid = m.pid();
    let start = start_time(pid);
    let r1 = m.report();
    let append_before = fs::read(&m.append_file).unwrap();

    let out = dump(pid, &img, &[]);
    let err = assert_failed_cleanly(&out, "dump into a 2 MiB tmpfs");
    assert_mentions(&err, &["pages"], "ENOSPC failure names the pages file");
    assert_mentions(&err, &["no space left"], "ENOSPC failure gives the cause");
    assert_no_image(&img, "dump into a 2 MiB tmpfs");
    let left = file_names(&img);
    assert!(left.is_empty(), "the failed dump left files in the image directory: {left:?}");

    assert!(m.fx.child_running(), "the failed dump killed the process:\n{}", m.fx.log_contents());
    assert_running_untouched(pid, "after the failed dump");
    assert_eq!(start_time(pid), start, "the process was replaced");
    let r2 = m.report();
    assert_eq!(report_num(&r2, "sigusr1_count"), 2);
    assert_reports_equal(&r1, &r2, &[], "memstate before vs after the failed dump");
    assert_eq!(fs::read(&m.append_file).unwrap(), append_before, "the append file changed");
    drop(mnt);
}

// ---------------------------------------------------------------------------
// restore refusals

/// The image's pid is held by a live, unrelated process: restore fails
/// naming the pid (and its owner), creates nothing, and leaves the holder
/// alone.
#[test]
fn restore_refuses_pid_held_by_unrelated_process() {
    require_root!();
    let td = TestDir::new("pid-held");
    let img = td.join("img");
    let mut s = Sleeper::spawn(td.path(), 50);
    let pid = s.fx.pid;
    s.wait_ticks(2, Duration::from_secs(5));
    dump_and_reap(&mut s.fx, &img, &[]);
    let ticks_at_dump = s.ticks().len();

    // Occupy the pid with another sleeper (different files, different
    // parent), started through clone3(set_tid).
    let (hready, hticks, hreport) = (td.join("holder.ready"), td.join("holder.ticks"), td.join("holder.report"));
    let holder_parent = Spawn::fixture("pidholder", td.path())
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--")
        .arg(fixture_path("sleeper"))
        .arg("--ready")
        .arg(&hready)
        .arg("--ticks")
        .arg(&hticks)
        .arg("--report")
        .arg(&hreport)
        .arg("--interval-ms")
        .arg("50")
        .ready_file(&hready)
        .spawn();
    let mut holder = KillPidOnDrop::new(pid);
    assert_eq!(
        report_num(&read_report(&hready), "pid"),
        pid as u64,
        "the holder did not get pid {pid}:\n{}",
        holder_parent.log_contents()
    );
    let holder_start = holder.start_time();
    let h1 = request_report(pid, &hreport, libc::SIGUSR1, &holder_parent.log);
    assert_eq!(report_num(&h1, "sigusr1_count"), 1);

    let out = restore_detached(&img, &[], Stdio::null());
    let err = assert_failed_cleanly(&out, "restore over a pid held by another process");
    assert_mentions_number(&err, pid, "names the pid");
    assert_mentions(&err, &["taken", "in use", "held", "exists"], "says it is taken");
    assert_mentions(&err, &["sleeper"], "names the holder");

    assert!(
        pids_with_cmdline_containing(&s.ticks.to_string_lossy()).is_empty(),
        "a failed restore must create no process: {:?}",
        pids_with_cmdline_containing(&s.ticks.to_string_lossy())
    );
    assert_eq!(start_time(pid), holder_start, "the holder was replaced");
    assert_running_untouched(pid, "holder after the failed restore");
    let holder_ticks = || numbered_lines(&hticks, "tick ").len();
    let n = holder_ticks();
    assert!(
        wait_until(Duration::from_secs(5), || holder_ticks() >= n + 2),
        "the holder stopped ticking after the failed restore"
    );
    let h2 = request_report(pid, &hreport, libc::SIGUSR1, &holder_parent.log);
    assert_eq!(report_num(&h2, "sigusr1_count"), 2);
    assert!(report_num(&h2, "next_tick") > report_num(&h1, "next_tick"));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.ticks().len(), ticks_at_dump, "the original's tick file grew: something restored it");

    holder.kill();
    drop(holder_parent);
}

/// `floe restore` (and `floe inspect`) of a directory that holds no image:
/// empty, or only temporary files a failed dump could leave.
#[test]
fn restore_refuses_directory_without_image() {
    require_root!();
    let td = TestDir::new("no-image");
    let not_image = ["not an image", "not a floe image", "no image", "is this an image directory"];

    let empty = td.join("empty");
    fs::create_dir_all(&empty).unwrap();
    let leftovers = td.join("leftovers");
    fs::create_dir_all(&leftovers).unwrap();
    let mut pages = vec![0u8; 3 * 4096];
    pages[..8].copy_from_slice(b"FLOEPGS\0");
    fs::write(leftovers.join(".pages.img.tmp.4242"), &pages).unwrap();
    fs::write(leftovers.join(".pages.img.tmp.77"), b"partial").unwrap();

    for dir in [&empty, &leftovers] {
        let before = file_names(dir);
        let what = format!("restore from {}", dir.display());
        let out = restore_detached(dir, &[], Stdio::null());
        let err = assert_failed_cleanly(&out, &what);
        assert_mentions(&err, &not_image, &what);
        assert_eq!(file_names(dir), before, "{what}: the directory changed");
        assert!(!dir.join("manifest.img").exists());

        let out = inspect(dir, &[]);
        let err = assert_failed_cleanly(&out, &format!("inspect of {}", dir.display()));
        assert_mentions(&err, &not_image, "inspect of a directory without an image");
    }
}
