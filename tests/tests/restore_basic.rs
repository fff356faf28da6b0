//! End-to-end: `floe dump` a single-threaded process into a directory, then
//! `floe restore` it and check from inside the restored process (fixture
//! reports) that its state survived. Needs root; skipped otherwise.
//!
//! Restored processes are not children of the test: the [`Fixture`] drop
//! guard kills them by pid and waits for /proc/PID to vanish.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::fs;
use std::process::Stdio;
use std::time::Duration;

/// The state a dump must carry: compare what memstate reports before the dump
/// with what the restored process reports.
#[test]
fn memstate_round_trip() {
    require_root!();
    let td = TestDir::new("memstate");
    let img = td.join("img");
    let mut m = Memstate::spawn(td.path());
    let pid = m.pid();

    let before = m.report();
    assert_eq!(report_num(&before, "sigusr1_count"), 1);
    assert_eq!(before["handler_on_altstack"], "1", "{before:?}");
    assert_eq!(before["sigusr2_blocked"], "1");
    let exe = exe_of(pid).unwrap();
    let cmdline = cmdline_of(pid).unwrap();
    let shared_on_disk = fs::read(&m.shared_file).unwrap();
    let sid = session_id(pid);

    dump_and_reap(&mut m.fx, &img, &[]);

    let out = restore_and_adopt(&mut m.fx, &img, &["--json"], Stdio::null());
    let json = parse_json_stdout(&out);
    assert_eq!(json_pid(&json), pid, "restore --json reported another pid: {json}");

    assert_eq!(exe_of(pid).as_ref(), Some(&exe), "/proc/{pid}/exe changed");
    assert_eq!(cmdline_of(pid).as_ref(), Some(&cmdline), "/proc/{pid}/cmdline changed");
    assert_eq!(session_id(pid), sid, "the restored process is not a session leader any more");

    let after = m.report();
    eprintln!("before: {before:#?}\nafter: {after:#?}");
    assert_eq!(report_num(&after, "pid"), pid as u64);
    assert_eq!(report_num(&after, "sigusr1_count"), 2, "one more SIGUSR1 since the dump");
    assert_reports_equal(&before, &after, &[], "memstate before dump vs after restore");

    // The handler keeps firing, on the alternate stack.
    let again = m.report();
    assert_eq!(report_num(&again, "sigusr1_count"), 3);
    assert_eq!(again["handler_on_altstack"], "1");

    // Never-touched pages of the anonymous mapping still read as zeros.
    let deep = m.deep_report();
    assert_eq!(deep["anon_holes_zero"], "1", "hole pages of the anonymous mapping are not zero after restore");
    assert_reports_equal(&before, &deep, &["anon_holes_zero"], "deep report after restore");

    // Private (COW) mapping never reaches the file; the shared one did, once.
    assert_eq!(fs::read(&m.private_file).unwrap(), m.private_content, "MAP_PRIVATE file modified on disk");
    assert_eq!(fs::read(&m.shared_file).unwrap(), shared_on_disk, "MAP_SHARED file changed by dump/restore");
    assert!(pid_alive(pid), "restored memstate died:\n{}", m.fx.log_contents());
}

/// `--leave-running`: the original keeps running untouched; restoring next
/// to it fails because the pid is taken (and creates nothing); once the
/// original is gone the image restores fine.
#[test]
fn leave_running_then_restore_side_by_side_fails() {
    require_root!();
    let td = TestDir::new("leave-running");
    let img = td.join("img");
    let mut m = Memstate::spawn(td.path());
    let pid = m.pid();
    let needle = m.ready.to_string_lossy().into_owned();

    let r1 = m.report();
    let out = dump(pid, &img, &["--leave-running"]);
    assert_ok(&out, "dump --leave-running");
    assert_image_files(&img);
    assert!(m.fx.child_running(), "--leave-running killed the process:\n{}", m.fx.log_contents());
    assert_running_untouched(pid, "after dump --leave-running");
    let r2 = m.report();
    assert_eq!(report_num(&r2, "sigusr1_count"), 2);
    assert_reports_equal(&r1, &r2, &[], "original before vs after dump --leave-running");

    let out = restore_detached(&img, &[], Stdio::null());
    let err = assert_failed_cleanly(&out, "restore while the original still runs");
    assert_mentions(&err, &["pid"], "restore over a taken pid");
    assert_mentions(&err, &[&pid.to_string()], "restore over a taken pid");
    assert_eq!(pids_with_cmdline_containing(&needle), vec![pid], "a failed restore must create no process");
    assert!(m.fx.child_running(), "the original died during the failed restore");
    assert_running_untouched(pid, "after the failed restore");
    let r3 = m.report();
    assert_eq!(report_num(&r3, "sigusr1_count"), 3);
    assert_reports_equal(&r1, &r3, &[], "original after the failed restore");

    // Now make room and restore for real: the image holds the state as of
    // the dump (one SIGUSR1 received).
    m.fx.kill_child();
    restore_and_adopt(&mut m.fx, &img, &[], Stdio::null());
    let r4 = m.report();
    assert_eq!(report_num(&r4, "sigusr1_count"), 2, "restored from the image taken after one SIGUSR1");
    assert_reports_equal(&r1, &r4, &[], "restore of a --leave-running image");
}

/// A process blocked in nanosleep keeps ticking after the restore, with no
/// tick lost or repeated.
#[test]
fn sleeper_keeps_ticking() {
    require_root!();
    let td = TestDir::new("sleeper");
    let img = td.join("img");
    let mut s = Sleeper::spawn(td.path(), 200);
    let pid = s.fx.pid;
    s.wait_ticks(3, Duration::from_secs(10));
    let r1 = s.report();
    assert!(
        wait_until(Duration::from_secs(2), || proc_state(pid) == Some('S')),
        "sleeper should be blocked in nanosleep, state {:?}",
        proc_state(pid)
    );

    dump_and_reap(&mut s.fx, &img, &[]);
    let at_dump = s.ticks();
    assert!(at_dump.len() >= 3);

    restore_and_adopt(&mut s.fx, &img, &[], Stdio::null());
    let ticks = s.wait_ticks(at_dump.len() + 5, Duration::from_secs(10));
    let ns: Vec<u64> = ticks.iter().map(|t| t.0).collect();
    let expected: Vec<u64> = (0..ns.len() as u64).collect();
    assert_eq!(ns, expected, "tick numbers must continue without gaps or duplicates");
    assert!(ticks.windows(2).all(|w| w[1].1 > w[0].1), "monotonic timestamps must keep increasing: {ticks:?}");
    let r2 = s.report();
    assert_eq!(report_num(&r2, "pid"), pid as u64);
    assert_eq!(report_num(&r2, "sigusr1_count"), report_num(&r1, "sigusr1_count") + 1);
    assert!(report_num(&r2, "next_tick") >= at_dump.len() as u64 + 5);
}

/// A process blocked in read(2) on a terminal (--shell-job): after the
/// restore, with floe's stdin on the same pty, the read completes.
#[test]
fn ttyreader_resumes_blocked_read() {
    require_root!();
    let td = TestDir::new("tty");
    let pty = Pty::open();
    let (ready, out, report) = (td.join("tty.ready"), td.join("tty.out"), td.join("tty.report"));
    let mut fx = Spawn::fixture("ttyreader", td.path())
        .arg("--ready")
        .arg(&ready)
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .stdin(pty.slave_stdio())
        .ready_file(&ready)
        .spawn();
    let pid = fx.pid;
    let got = |line: &str| fs::read_to_string(&out).unwrap_or_default().lines().any(|l| l == line);

    pty.write_master(b"before\n");
    assert!(wait_until(Duration::from_secs(5), || got("got: before")), "ttyreader did not echo the first line");
    assert!(wait_until(Duration::from_secs(5), || proc_state(pid) == Some('S')));

    // A terminal needs --shell-job.
    let refused = dump(pid, &td.join("img-refused"), &[]);
    let err = assert_failed_cleanly(&refused, "dump of a process reading a tty without --shell-job");
    assert_mentions(&err, &["tty", "terminal", "shell-job", "pts"], "tty refusal");
    assert!(fx.child_running());
    assert_running_untouched(pid, "after the refused dump");

    let img = td.join("img");
    dump_and_reap(&mut fx, &img, &["--shell-job"]);
    restore_and_adopt(&mut fx, &img, &["--shell-job"], pty.slave_stdio());

    pty.write_master(b"hello\n");
    assert!(
        wait_until(Duration::from_secs(10), || got("got: hello")),
        "restored ttyreader did not read from the terminal; out:\n{}\nlog:\n{}",
        fs::read_to_string(&out).unwrap_or_default(),
        fx.log_contents()
    );
    let r = request_report(pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(r["stdin_isatty"], "1");
    assert_eq!(report_num(&r, "lines"), 2);
    assert_eq!(report_num(&r, "sigusr1_count"), 1);
    let lines = fs::read_to_string(&out).unwrap();
    assert_eq!(lines, "got: before\ngot: hello\n");
}

/// A process spinning in user space (no syscall in progress) keeps counting.
#[test]
fn counter_interrupted_in_user_space() {
    require_root!();
    let td = TestDir::new("counter");
    let img = td.join("img");
    let (ready, report) = (td.join("counter.ready"), td.join("counter.report"));
    const EVERY: u64 = 50_000_000;
    let mut fx = Spawn::fixture("counter", td.path())
        .arg("--ready")
        .arg(&ready)
        .arg("--report")
        .arg(&report)
        .arg("--log-every")
        .arg(EVERY.to_string())
        .ready_file(&ready)
        .spawn();
    let pid = fx.pid;
    let counts = |log: &std::path::Path| numbered_lines(log, "count ");
    assert!(wait_until(Duration::from_secs(10), || counts(&fx.log).len() >= 2), "counter is not counting");
    let r1 = request_report(pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(proc_state(pid), Some('R'), "counter should be spinning in user space");

    dump_and_reap(&mut fx, &img, &[]);
    let at_dump = counts(&fx.log);

    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    let r2 = request_report(pid, &report, libc::SIGUSR1, &fx.log);
    assert!(report_num(&r2, "counter") > report_num(&r1, "counter"), "counter did not advance: {r1:?} -> {r2:?}");
    assert_eq!(report_num(&r2, "sigusr1_count"), 2);
    assert!(
        wait_until(Duration::from_secs(10), || counts(&fx.log).len() >= at_dump.len() + 3),
        "restored counter is not counting:\n{}",
        fx.log_contents()
    );
    let all = counts(&fx.log);
    let expected: Vec<u64> = (1..=all.len() as u64).map(|i| i * EVERY).collect();
    assert_eq!(all, expected, "count lines must continue without gaps or repeats");
}

/// An existing image is not overwritten without --force.
#[test]
fn dump_refuses_to_overwrite_without_force() {
    require_root!();
    let td = TestDir::new("force");
    let img = td.join("img");
    let s = Sleeper::spawn(td.path(), 200);
    let pid = s.fx.pid;

    assert_ok(&dump(pid, &img, &["--leave-running"]), "first dump");
    assert_image_files(&img);
    let manifest = img.join("manifest.img");
    let (bytes, mtime) = (fs::read(&manifest).unwrap(), fs::metadata(&manifest).unwrap().modified().unwrap());

    let out = dump(pid, &img, &["--leave-running"]);
    let err = assert_failed_cleanly(&out, "second dump into the same directory");
    assert_mentions(&err, &["force", "exist", "overwrite"], "overwrite refusal");
    assert_eq!(fs::read(&manifest).unwrap(), bytes, "the refused dump changed manifest.img");
    assert_eq!(fs::metadata(&manifest).unwrap().modified().unwrap(), mtime);
    assert_running_untouched(pid, "after the refused dump");

    assert_ok(&dump(pid, &img, &["--leave-running", "--force"]), "dump --force");
    assert_image_files(&img);
    assert_running_untouched(pid, "after dump --force");
    let n = s.ticks().len();
    s.wait_ticks(n + 2, Duration::from_secs(5));
}

/// `floe inspect` summarises an image.
#[test]
fn inspect_json_lists_pid_and_mappings() {
    require_root!();
    let td = TestDir::new("inspect");
    let img = td.join("img");
    let m = Memstate::spawn(td.path());
    let pid = m.pid();
    assert_ok(&dump(pid, &img, &["--leave-running"]), "dump --leave-running");

    let out = inspect(&img, &["--json"]);
    assert_ok(&out, "inspect --json");
    let v = parse_json_stdout(&out);
    assert_eq!(json_pid(&v), pid, "inspect: wrong pid in {v}");
    let maps = v.get("mappings").and_then(|m| m.as_array()).unwrap_or_else(|| panic!("no mappings array: {v}"));
    assert!(!maps.is_empty(), "empty mappings array");
    let maps_text = serde_json::to_string(maps).unwrap();
    let exe = fixture_path("memstate");
    for needle in [exe.to_string_lossy(), m.private_file.to_string_lossy()] {
        assert!(maps_text.contains(needle.as_ref()), "mappings do not mention {needle}: {maps_text}");
    }
    let fds = v.get("fds").and_then(|f| f.as_array()).unwrap_or_else(|| panic!("no fds array: {v}"));
    let fds_text = serde_json::to_string(fds).unwrap();
    assert!(fds.len() >= 6, "expected at least 6 fds (0-2, ro, append, deleted): {fds_text}");
    assert!(fds_text.contains(m.ro_file.to_string_lossy().as_ref()), "fds do not mention the ro file: {fds_text}");

    let out = inspect(&img, &[]);
    assert_ok(&out, "inspect");
    assert!(stdout_text(&out).contains(&pid.to_string()), "plain inspect does not show the pid");
}

// ---------------------------------------------------------------------------
// real Debian programs

/// `sleep 1000` survives a round trip with its pid.
#[test]
fn real_sleep_round_trip() {
    require_root!();
    let td = TestDir::new("sleep");
    let img = td.join("img");
    let mut fx = Spawn::program("sleep", "sleep", td.path()).arg("1000").spawn();
    let pid = fx.pid;
    assert!(wait_until(Duration::from_secs(5), || proc_state(pid) == Some('S')));
    let exe = exe_of(pid).unwrap();

    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    std::thread::sleep(Duration::from_secs(1));
    assert!(pid_alive(pid), "restored sleep exited:\n{}", fx.log_contents());
    assert_eq!(exe_of(pid), Some(exe));
    assert_eq!(cmdline_of(pid).unwrap(), b"sleep\x001000\x00");
    assert!(wait_until(Duration::from_secs(5), || proc_state(pid) == Some('S')), "state {:?}", proc_state(pid));
}

/// A python3 loop appending an incrementing counter to a file continues
/// after the restore without a gap.
#[test]
fn real_python_counter_continues() {
    require_root!();
    let td = TestDir::new("python");
    let img = td.join("img");
    let counter = td.join("counter.txt");
    let script = "import sys, time\n\
                  f = open(sys.argv[1], 'a', buffering=1)\n\
                  n = 0\n\
                  while True:\n    f.write('%d\\n' % n)\n    n += 1\n    time.sleep(0.05)\n";
    let mut fx = Spawn::program("python", python3(), td.path()).arg("-c").arg(script).arg(&counter).spawn();
    let pid = fx.pid;
    let lines = || numbered_lines(&counter, "");
    assert!(
        wait_until(Duration::from_secs(10), || lines().len() >= 5),
        "python is not counting:\n{}",
        fx.log_contents()
    );

    dump_and_reap(&mut fx, &img, &[]);
    let at_dump = lines().len();
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert!(
        wait_until(Duration::from_secs(10), || lines().len() >= at_dump + 10),
        "restored python is not counting (state {:?}):\n{}",
        proc_state(pid),
        fx.log_contents()
    );
    let all = lines();
    let expected: Vec<u64> = (0..all.len() as u64).collect();
    assert_eq!(all, expected, "counter lines must continue without gaps or repeats");
}

/// gzip interrupted mid-stream produces byte-identical output.
#[test]
fn real_gzip_output_identical() {
    require_root!();
    let td = TestDir::new("gzip");
    let img = td.join("img");
    let input = td.join("big.txt");
    write_compressible_file(&input, 200 << 20, 0x5eed);
    let (out_gz, ref_gz) = (td.join("out.gz"), td.join("ref.gz"));

    // Reference run, concurrently.
    let mut reference = Spawn::program("gzip-ref", "gzip", td.path())
        .args(["-n", "-c"])
        .arg(&input)
        .stdout(Stdio::from(fs::File::create(&ref_gz).unwrap()))
        .spawn();

    let mut fx = Spawn::program("gzip", "gzip", td.path())
        .args(["-n", "-c"])
        .arg(&input)
        .stdout(Stdio::from(fs::File::create(&out_gz).unwrap()))
        .spawn();
    let pid = fx.pid;
    let size = |p: &std::path::Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(20), || size(&out_gz) >= 2 << 20),
        "gzip output does not grow (size {}, state {:?})",
        size(&out_gz),
        proc_state(pid)
    );
    assert!(fx.child_running(), "gzip finished before it could be dumped; make the input bigger");

    dump_and_reap(&mut fx, &img, &[]);
    let at_dump = size(&out_gz);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert!(
        wait_pid_gone(pid, Duration::from_secs(60)),
        "restored gzip did not finish (state {:?}, out.gz {} bytes)",
        proc_state(pid),
        size(&out_gz)
    );
    let st = reference.reap(Duration::from_secs(60));
    assert!(st.success(), "reference gzip failed: {}", reference.log_contents());
    assert!(fx.log_contents().is_empty(), "restored gzip complained:\n{}", fx.log_contents());

    let (a, b) = (fs::read(&out_gz).unwrap(), fs::read(&ref_gz).unwrap());
    eprintln!("out.gz was {at_dump} bytes at the dump; final {} bytes, reference {} bytes", a.len(), b.len());
    assert!(at_dump < b.len() as u64, "gzip was already done at the dump");
    assert!(a == b, "restored gzip output differs from the reference ({} vs {} bytes)", a.len(), b.len());
}
